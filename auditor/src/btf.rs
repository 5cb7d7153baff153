//! Byte offsets of kernel struct members, from the kernel's BTF (`/sys/kernel/btf/vmlinux`).
//!
//! `--capture sockets` reads fields of `struct sock` in the kernel (the peer's address, the inode
//! number), whose offsets depend on the kernel's version and configuration. aya-obj parses BTF but
//! keeps its type accessors private, so this reads the little it needs: the type headers, the
//! members of structs and unions, and their names (format: Documentation/bpf/btf.rst).

use std::fmt;

/// What went wrong reading BTF.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BtfError {
    Truncated,
    BadMagic,
    UnknownKind(u32),
}

impl fmt::Display for BtfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BtfError::Truncated => write!(f, "BTF data is truncated"),
            BtfError::BadMagic => write!(f, "not BTF data (bad magic)"),
            BtfError::UnknownKind(k) => write!(f, "BTF type kind {k} is unknown"),
        }
    }
}

impl std::error::Error for BtfError {}

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;
const KIND_MAX: u32 = 19;

struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
}

struct Type {
    name_off: u32,
    kind: u32,
    /// The referenced type, for modifiers and typedefs.
    target: u32,
    members: Vec<Member>,
}

/// The struct and union layouts of one BTF blob.
pub struct Btf {
    /// Index = type id; id 0 is `void`.
    types: Vec<Type>,
    strings: Vec<u8>,
}

fn u32_at(data: &[u8], at: usize) -> Result<u32, BtfError> {
    let bytes = data.get(at..at + 4).ok_or(BtfError::Truncated)?;
    Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

impl Btf {
    /// The running kernel's BTF.
    pub fn from_kernel() -> anyhow::Result<Btf> {
        use anyhow::Context as _;
        let path = "/sys/kernel/btf/vmlinux";
        let data = std::fs::read(path).with_context(|| format!("reading {path}"))?;
        Btf::parse(&data).with_context(|| format!("parsing {path}"))
    }

    /// Parse little-endian BTF (the header, the type section and the string section).
    pub fn parse(data: &[u8]) -> Result<Btf, BtfError> {
        if data.len() < 24 {
            return Err(BtfError::Truncated);
        }
        if u16::from_le_bytes([data[0], data[1]]) != 0xeb9f {
            return Err(BtfError::BadMagic);
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
        let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
        let section = |off: usize, len: usize| {
            let start = hdr_len.checked_add(off).ok_or(BtfError::Truncated)?;
            let end = start.checked_add(len).ok_or(BtfError::Truncated)?;
            data.get(start..end).ok_or(BtfError::Truncated)
        };
        let type_data = section(type_off, type_len)?;
        let strings = section(str_off, str_len)?.to_vec();
        let mut types = vec![Type {
            name_off: 0,
            kind: 0,
            target: 0,
            members: Vec::new(),
        }];
        let mut at = 0;
        while at < type_data.len() {
            let name_off = u32_at(type_data, at)?;
            let info = u32_at(type_data, at + 4)?;
            let target = u32_at(type_data, at + 8)?;
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let bitfields = info >> 31 != 0;
            let mut members = Vec::new();
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = at + 12 * i;
                        let offset = u32_at(type_data, m + 8)?;
                        members.push(Member {
                            name_off: u32_at(type_data, m)?,
                            type_id: u32_at(type_data, m + 4)?,
                            bit_offset: if bitfields {
                                offset & 0xff_ffff
                            } else {
                                offset
                            },
                        });
                    }
                    12 * vlen
                }
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                k if k <= KIND_MAX && k != 0 => 0,
                k => return Err(BtfError::UnknownKind(k)),
            };
            at += extra;
            types.push(Type {
                name_off,
                kind,
                target,
                members,
            });
        }
        Ok(Btf { types, strings })
    }

    fn name(&self, off: u32) -> &[u8] {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        &rest[..end]
    }

    /// The struct or union a type id stands for, through typedefs and qualifiers.
    fn aggregate(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.types.get(id as usize)?;
            match t.kind {
                KIND_STRUCT | KIND_UNION => return Some(t),
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.target;
                }
                _ => return None,
            }
        }
        None
    }

    /// Member `name` of `t` (looking inside anonymous structs and unions): its bit offset and
    /// type id.
    fn member(&self, t: &Type, name: &str) -> Option<(u32, u32)> {
        for m in &t.members {
            if self.name(m.name_off) == name.as_bytes() {
                return Some((m.bit_offset, m.type_id));
            }
            if m.name_off == 0
                && let Some(inner) = self.aggregate(m.type_id)
                && let Some((bits, id)) = self.member(inner, name)
            {
                return Some((m.bit_offset + bits, id));
            }
        }
        None
    }

    /// Byte offset of `path` (member names, each inside the one before) in `struct name`, or `None`
    /// when the kernel has no such member.
    pub fn offset(&self, name: &str, path: &[&str]) -> Option<u64> {
        let mut t = self
            .types
            .iter()
            .find(|t| t.kind == KIND_STRUCT && self.name(t.name_off) == name.as_bytes())?;
        let mut bits = 0u64;
        for (i, member) in path.iter().enumerate() {
            let (at, id) = self.member(t, member)?;
            bits += u64::from(at);
            if i + 1 < path.len() {
                t = self.aggregate(id)?;
            }
        }
        bits.is_multiple_of(8).then_some(bits / 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob: `struct outer { int a; union { int b; struct inner in; }; }` with `inner` being
    /// `{ int x; int y; }` (ids: 1 int, 2 inner, 3 anonymous union, 4 outer).
    fn sample() -> Vec<u8> {
        let strings = b"\0int\0inner\0x\0y\0outer\0a\0b\0in\0".to_vec();
        let name = |s: &str| {
            let needle = format!("\0{s}\0");
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .unwrap() as u32
                + 1
        };
        let mut types = Vec::new();
        let mut push = |words: &[u32]| {
            for w in words {
                types.extend_from_slice(&w.to_le_bytes());
            }
        };
        push(&[name("int"), KIND_INT << 24, 4, 32]);
        push(&[name("inner"), KIND_STRUCT << 24 | 2, 8]);
        push(&[name("x"), 1, 0, name("y"), 1, 32]);
        push(&[0, KIND_UNION << 24 | 2, 8]);
        push(&[name("b"), 1, 0, name("in"), 2, 0]);
        push(&[name("outer"), KIND_STRUCT << 24 | 2, 12]);
        push(&[name("a"), 1, 0, 0, 3, 32]);
        let mut out = Vec::new();
        out.extend_from_slice(&0xeb9fu16.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for w in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&types);
        out.extend_from_slice(&strings);
        out
    }

    #[test]
    fn finds_members_inside_anonymous_unions_and_nested_structs() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.offset("outer", &["a"]), Some(0));
        assert_eq!(btf.offset("outer", &["b"]), Some(4));
        assert_eq!(btf.offset("outer", &["in", "y"]), Some(8));
        assert_eq!(btf.offset("outer", &["missing"]), None);
        assert_eq!(btf.offset("inner", &["y"]), Some(4));
        assert_eq!(btf.offset("nosuch", &["y"]), None);
    }

    #[test]
    fn rejects_what_is_not_btf() {
        assert_eq!(Btf::parse(&[0; 8]).err(), Some(BtfError::Truncated));
        assert_eq!(Btf::parse(&[0; 24]).err(), Some(BtfError::BadMagic));
        let mut cut = sample();
        cut.truncate(40);
        assert_eq!(Btf::parse(&cut).err(), Some(BtfError::Truncated));
    }

    #[test]
    fn reads_the_running_kernels_struct_sock() {
        // The layout every Linux kernel has had for struct sock_common's first fields.
        let Ok(btf) = Btf::from_kernel() else {
            return; // no BTF here: the sample above covers the parser
        };
        assert_eq!(btf.offset("sock", &["__sk_common", "skc_daddr"]), Some(0));
        assert_eq!(btf.offset("sock", &["__sk_common", "skc_dport"]), Some(12));
        assert_eq!(btf.offset("sock", &["__sk_common", "skc_num"]), Some(14));
        assert_eq!(btf.offset("sock", &["__sk_common", "skc_family"]), Some(16));
        assert!(btf.offset("sock", &["sk_socket"]).is_some());
    }
}
