//! The audit record: what one line of the audit log says.
//!
//! Field order follows the Valkey Audit Module (timestamp, category, command, command_args, result,
//! duration_us, keys_modified, client_id, username, client_ip, client_port, server_hostname, error),
//! then the auditor's own fields (seq, keys, pid, and the server's port and container identity).

use std::borrow::Cow;
use std::sync::Arc;

/// A command name: the command table's own (no copy, no allocation) or the client's spelling of a
/// command the table does not know.
pub type CommandName = Cow<'static, [u8]>;

/// The keys of one command, in one allocation: each key's length (4 bytes, little-endian) and bytes,
/// back to back. 32 bytes inline (records are moved several times on their way to the sink).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyList {
    bytes: Vec<u8>,
    len: u32,
}

impl KeyList {
    pub fn new() -> KeyList {
        KeyList::default()
    }

    /// Room for `keys` keys of `bytes` bytes in all.
    pub fn with_capacity(keys: usize, bytes: usize) -> KeyList {
        KeyList {
            bytes: Vec::with_capacity(bytes + 4 * keys),
            len: 0,
        }
    }

    /// Appends a key. Keys are argument prefixes, far below 4 GiB.
    pub fn push(&mut self, key: &[u8]) {
        self.bytes
            .extend_from_slice(&u32::try_from(key.len()).unwrap_or(u32::MAX).to_le_bytes());
        self.bytes
            .extend_from_slice(&key[..key.len().min(u32::MAX as usize)]);
        self.len += 1;
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        self.bytes.capacity()
    }

    /// Bytes of all keys together.
    pub fn total_bytes(&self) -> usize {
        self.bytes.len() - 4 * self.len as usize
    }

    pub fn iter(&self) -> impl Iterator<Item = &[u8]> + '_ {
        let mut rest = self.bytes.as_slice();
        std::iter::from_fn(move || {
            let (len, tail) = rest.split_first_chunk::<4>()?;
            let (key, tail) = tail.split_at(u32::from_le_bytes(*len) as usize);
            rest = tail;
            Some(key)
        })
    }
}

impl<K: AsRef<[u8]>> FromIterator<K> for KeyList {
    fn from_iter<I: IntoIterator<Item = K>>(iter: I) -> KeyList {
        let mut keys = KeyList::new();
        for k in iter {
            keys.push(k.as_ref());
        }
        keys
    }
}

/// The audited server a record came from. Shared by every record of that server (one `Arc` clone
/// per record, no copies): it changes only when the server is (re)discovered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerInfo {
    /// `server_hostname`: the host's name (the module's field).
    pub hostname: String,
    /// The server's pid as the host sees it (0 for the auditor's own records).
    pub pid: u32,
    /// The server's pid inside its own pid namespace (a container), when that differs; else 0.
    pub ns_pid: u32,
    /// The server's TCP listening port (the first one; 0 when it has none or it is not known yet).
    pub port: u16,
    /// The path of its unix listening socket (the first one), when it has no TCP port; else empty.
    pub unix_socket: Arc<str>,
    /// Container id from the server's cgroup path (docker, containerd, CRI-O, podman), or empty.
    pub container_id: String,
    /// Kubernetes pod name and namespace, when the server runs in a pod.
    pub pod_name: String,
    pub pod_namespace: String,
    /// Kubernetes node name (`NODE_NAME` of the auditor), when the server runs in a pod.
    pub node_name: String,
}

impl ServerInfo {
    /// The per-server file (`%port%`) of its records.
    pub fn file(&self) -> ServerFile {
        if self.port != 0 {
            ServerFile::Port(self.port)
        } else if !self.unix_socket.is_empty() {
            ServerFile::Unix(self.unix_socket.clone())
        } else {
            ServerFile::Auditor
        }
    }

    /// A server known only by the host name (the auditor's own records, tests).
    pub fn host(hostname: &str) -> Arc<ServerInfo> {
        Arc::new(ServerInfo {
            hostname: hostname.to_string(),
            ..ServerInfo::default()
        })
    }
}

/// Which file of a per-server file sink (`%port%` in the path) a record goes to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ServerFile {
    /// The auditor's own records (start/stop, CONFIG, losses not tied to a server), and those of
    /// a server whose listeners are not known yet.
    Auditor,
    /// A server by its TCP port.
    Port(u16),
    /// A server with no TCP port, by the path of its unix socket.
    Unix(Arc<str>),
}

/// Record category. The names are the module's (`CONNECTION`, `AUTH`, ...), plus `AUDIT` and
/// `AUDIT_LOSS` for the auditor's own records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Category {
    Connection,
    Auth,
    Config,
    KeyOp,
    Other,
    /// A custom category from `audit.custom_category` (control issue).
    Custom(String),
    /// The auditor's own start/stop records.
    Audit,
    /// Loss of data or records: cause and count in command_args.
    AuditLoss,
}

impl Category {
    pub fn as_str(&self) -> &str {
        match self {
            Category::Connection => "CONNECTION",
            Category::Auth => "AUTH",
            Category::Config => "CONFIG",
            Category::KeyOp => "KEY_OP",
            Category::Other => "OTHER",
            Category::Custom(name) => name,
            Category::Audit => "AUDIT",
            Category::AuditLoss => "AUDIT_LOSS",
        }
    }
}

/// What the server's reply said about the command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
    /// No reply was seen and none will be (CLIENT REPLY OFF/SKIP, connection closed first, reply bytes
    /// lost): the auditor does not guess.
    Unknown,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "SUCCESS",
            Outcome::Failure => "FAILURE",
            Outcome::Unknown => "UNKNOWN",
        }
    }
}

/// One audit record. Byte fields may hold any bytes a client sent; the formats escape them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Wall-clock time of the reply (or of the event), seconds since the epoch.
    pub time_unix_us: i64,
    pub category: Category,
    /// Canonical lower-case name (`set`, `config|set`), the client's spelling for unknown commands,
    /// or `connection` / `disconnection`.
    pub command: CommandName,
    /// What the record shows of the arguments (`key=... payload=...`, `arg1=...`), secrets redacted.
    pub command_args: Vec<u8>,
    pub result: Outcome,
    pub duration_us: u64,
    pub keys_modified: u64,
    pub client_id: u64,
    /// Shared with the connection (one reference count per record, no copy).
    pub username: Arc<[u8]>,
    pub client_ip: Arc<str>,
    pub client_port: u16,
    /// The server: `server_hostname`, its port, pids and container identity.
    pub server: Arc<ServerInfo>,
    /// Empty, `rejected=<msg>`, `acl_deny_reason=<r> acl_object=<o>`, or the error reply's text.
    pub error: Vec<u8>,
    /// Gapless sequence number over every record written in this run (set by the writer).
    pub seq: u64,
    /// Every key of the command, each cut to `commands::key_maxsize` of `audit.payload_maxsize`.
    pub keys: KeyList,
    /// The audited server's pid.
    pub pid: u32,
}

impl Record {
    /// A record that is not about a client command (connection events, the auditor's own AUDIT and
    /// AUDIT_LOSS records): empty client fields, result SUCCESS, to be filled in by the caller.
    pub fn event(category: Category, command: &[u8], time_unix_us: i64, hostname: &str) -> Record {
        Record::for_server(category, command, time_unix_us, ServerInfo::host(hostname))
    }

    /// As `event`, for a known server.
    pub fn for_server(
        category: Category,
        command: &[u8],
        time_unix_us: i64,
        server: Arc<ServerInfo>,
    ) -> Record {
        Record {
            time_unix_us,
            category,
            command: Cow::Owned(command.to_vec()),
            command_args: Vec::new(),
            result: Outcome::Success,
            duration_us: 0,
            keys_modified: 0,
            client_id: 0,
            username: Arc::from(&b""[..]),
            client_ip: Arc::from(""),
            client_port: 0,
            server,
            error: Vec::new(),
            seq: 0,
            keys: KeyList::new(),
            pid: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_list_keeps_every_key_and_its_bounds() {
        let cases: [&[&[u8]]; 4] = [&[], &[b"k"], &[b"", b"a", b""], &[b"one", b"two", b"three"]];
        for keys in cases {
            let list: KeyList = keys.iter().collect();
            assert_eq!(list.len(), keys.len());
            assert_eq!(list.is_empty(), keys.is_empty());
            assert_eq!(list.iter().collect::<Vec<_>>(), keys.to_vec());
            assert_eq!(
                list.total_bytes(),
                keys.iter().map(|k| k.len()).sum::<usize>()
            );
        }
    }

    #[test]
    fn key_list_is_one_allocation_of_the_announced_size() {
        let mut list = KeyList::with_capacity(2, 5);
        let cap = list.bytes.capacity();
        list.push(b"abc");
        list.push(b"de");
        assert_eq!(list.bytes.capacity(), cap);
        assert_eq!(std::mem::size_of::<KeyList>(), 32);
        // A record is moved several times between parser, queue and sink: keep it small.
        assert!(std::mem::size_of::<Record>() <= 216);
    }
}
