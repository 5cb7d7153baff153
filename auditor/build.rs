//! Builds the kernel programs (`auditor-ebpf`) with aya-build so `cargo build` yields one binary that
//! embeds its eBPF object. `AYA_BUILD_SKIP=1` writes an empty object for lint-only jobs.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("no workspace root"))?;
    let ebpf_dir = root.join("auditor-ebpf");
    let ebpf_dir = ebpf_dir.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
    println!(
        "cargo:rerun-if-changed={}",
        root.join("auditor-common/src").display()
    );
    println!("cargo:rerun-if-env-changed=EBPF_TOOLCHAIN");
    let toolchain = match std::env::var("EBPF_TOOLCHAIN") {
        Ok(t) if t != "nightly" => aya_build::Toolchain::Custom(Box::leak(t.into_boxed_str())),
        _ => aya_build::Toolchain::Nightly,
    };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "auditor-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        toolchain,
    )
}
