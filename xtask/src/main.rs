//! Developer tasks: `cargo xtask build-ebpf` (the kernel object alone) and `cargo xtask bench`.
use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the eBPF object (auditor-ebpf) for bpfel-unknown-none, as aya-build does.
    BuildEbpf {
        /// Debug profile instead of release.
        #[arg(long)]
        debug: bool,
    },
    /// redis-benchmark against a real valkey-server without and with the auditor attached
    /// (interleaved A B A B ...), then the offline pipeline benchmark. Not part of the tests.
    Bench {
        /// A/B rounds per case (medians are reported).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Target seconds per redis-benchmark test.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Only these pipeline depths (default 1 and 16).
        #[arg(long, value_delimiter = ',')]
        pipeline: Option<Vec<u32>>,
        /// Only these value sizes (default 3 and 1024).
        #[arg(long, value_delimiter = ',')]
        data_size: Option<Vec<u32>>,
        /// Also run each round with the auditor attached but processing nothing (ring drained
        /// unread): the kernel side's share of the cost, printed as a second table.
        #[arg(long)]
        capture_only: bool,
        /// The auditor's `--capture` mode (`auto`, its default, `sockets` or `syscalls`).
        #[arg(long, default_value = "auto")]
        capture: String,
    },
}

fn workspace_root() -> std::path::PathBuf {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    dir.parent().map(|p| p.to_path_buf()).unwrap_or(dir)
}

fn build_ebpf(debug: bool) -> anyhow::Result<()> {
    let toolchain = std::env::var("EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".into());
    let root = workspace_root();
    let mut cmd = Command::new("rustup");
    cmd.current_dir(root.join("auditor-ebpf"))
        .args([
            "run",
            &toolchain,
            "cargo",
            "build",
            "--package",
            "auditor-ebpf",
            "--bins",
        ])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            [
                "--cfg=bpf_target_arch=\"x86_64\"",
                "-Cdebuginfo=2",
                "-Clink-arg=--btf",
            ]
            .join("\x1f"),
        )
        .env("CARGO_TARGET_DIR", root.join("target/ebpf"));
    if !debug {
        cmd.arg("--release");
    }
    if toolchain != "nightly" {
        cmd.env("RUSTC_BOOTSTRAP", "1");
    }
    let status = cmd
        .status()
        .context("running rustup (is the eBPF toolchain installed? run scripts/setup.sh)")?;
    if !status.success() {
        bail!("eBPF build failed: {status}");
    }
    let profile = if debug { "debug" } else { "release" };
    println!(
        "built {}",
        root.join("target/ebpf/bpfel-unknown-none")
            .join(profile)
            .join("auditor")
            .display()
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::BuildEbpf { debug } => build_ebpf(debug),
        Task::Bench {
            rounds,
            seconds,
            pipeline,
            data_size,
            capture_only,
            capture,
        } => bench::run(&bench::Options {
            rounds,
            seconds,
            pipelines: pipeline.unwrap_or_else(|| vec![1, 16]),
            data_sizes: data_size.unwrap_or_else(|| vec![3, 1024]),
            capture_only,
            capture,
            root: workspace_root(),
        }),
    }
}

mod bench;
