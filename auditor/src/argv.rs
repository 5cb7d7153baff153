//! One argument of a parsed request, kept in bounded memory.

/// An argument as the request parser keeps it: a prefix of its bytes (at most the parser's keep limit)
/// and its real length. A 512 MB value costs no more than a small one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Arg {
    /// The first bytes of the argument (all of it when `prefix.len() as u64 == len`).
    pub prefix: Vec<u8>,
    /// The argument's real length in bytes, as the RESP header (or the inline line) gave it.
    pub len: u64,
    /// Some bytes of the argument were never seen (capture cap or ring-buffer loss), so even the
    /// kept prefix may be shorter than the keep limit.
    pub lost: bool,
}

impl Arg {
    pub fn new(bytes: &[u8]) -> Self {
        Arg {
            prefix: bytes.to_vec(),
            len: bytes.len() as u64,
            lost: false,
        }
    }

    /// True when the whole argument is held in `prefix`.
    pub fn is_complete(&self) -> bool {
        !self.lost && self.prefix.len() as u64 == self.len
    }

    /// ASCII-lower-cased copy of the kept bytes, as a string (command names, subcommands).
    pub fn lower(&self) -> String {
        String::from_utf8_lossy(&self.prefix).to_ascii_lowercase()
    }

    /// Case-insensitive comparison of the whole argument with an ASCII word.
    pub fn eq_ignore_case(&self, word: &str) -> bool {
        self.is_complete() && self.prefix.eq_ignore_ascii_case(word.as_bytes())
    }
}
