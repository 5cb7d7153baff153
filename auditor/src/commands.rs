//! What a request is: its canonical command name, its audit category, where its keys, its value and its
//! secrets are among the arguments, and the `command_args` text the audit record shows for it.
//!
//! The knowledge comes from the server itself: `command-table.json` is the reply of `COMMAND` from
//! valkey-server 9.1.2 (one entry per command: `[name, arity, flags, first, last, step, acl_categories,
//! tips, key_specs, subcommands]`), embedded at build time and parsed once by [`CommandTable::builtin`].
//! Keys are found from the key specs the same way the server's `getKeysUsingKeySpecs` does, so the
//! auditor agrees with Valkey about which arguments are keys (unlike the Valkey Audit Module, which uses a
//! hand-written first-key table and logs only the first key). The few things key specs do not say are
//! kept in small hand-checked tables below, each with the reason it exists:
//!
//! * where "the value" is (`PAYLOAD_RULES`, derived from the argument names in `COMMAND DOCS`),
//! * which arguments are secrets (`SecretRule`: AUTH, HELLO AUTH, ACL SETUSER, MIGRATE AUTH/AUTH2,
//!   CONFIG SET of password parameters),
//! * the three commands whose keys the server finds with code instead of specs (SORT, SORT_RO, MIGRATE).
//!
//! Nothing here panics on any argv: every index is bounds-checked, numbers are parsed strictly and
//! position arithmetic is done in `i64` with checked operations.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

use serde_json::Value;

use crate::argv::Arg;
use crate::record::{Category, CommandName};

/// `COMMAND` of valkey-server 9.1.2, as JSON.
const COMMAND_TABLE_JSON: &str = include_str!("command-table.json");

/// Longest command or subcommand name we look up (the longest in 9.1.2 is 20 bytes); longer names are
/// unknown without a lookup, and the lower-casing buffer lives on the stack.
const MAX_NAME_LEN: usize = 64;

/// OTHER records show each argument cut to this many bytes, then `...` (the module's layout).
const OTHER_ARG_MAX: usize = 50;
/// How many arguments an OTHER record shows (the module's layout).
const OTHER_ARGS_SHOWN: usize = 3;
/// CONFIG records show `subcommand=` and `param=` cut to this many bytes (names are at most ~40 bytes;
/// the cap only bounds what a hostile client can put in a record).
const CONFIG_FIELD_MAX: usize = 128;
/// HELLO AUTH records show protover and username cut like OTHER arguments.
const HELLO_FIELD_MAX: usize = OTHER_ARG_MAX;
/// What is written instead of a secret argument.
const REDACTED: &[u8] = b"<REDACTED>";
/// Marker after a key or payload that was cut (the module's marker).
const TRUNCATED_MARKER: &[u8] = b"...(truncated)";
/// Marker after an OTHER/CONFIG/HELLO field that was cut (the module's marker).
const CUT_MARKER: &[u8] = b"...";
/// `ACL DRYRUN user cmd args...` is checked for secrets like `cmd args...`; nesting is bounded so a
/// crafted `ACL DRYRUN u ACL DRYRUN u ...` cannot exhaust the stack.
const MAX_DRYRUN_DEPTH: usize = 4;

/// A small, fast, non-cryptographic hasher (the multiply-rotate "Fx" hash of rustc) for maps whose
/// keys an attacker cannot choose to collide: the fixed command table (looked up with client bytes,
/// but never filled with them) and connections keyed by (pid, fd).
#[derive(Clone, Copy, Debug, Default)]
pub struct FxHasher {
    hash: u64,
}

const FX_SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(FX_SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            // Assembled with shifts: a variable-length copy into a word would be a memcpy call and
            // a store-forwarding stall on these short keys.
            let word = rest
                .iter()
                .rev()
                .fold(0u64, |word, &b| (word << 8) | u64::from(b));
            self.add(word);
        }
    }

    #[inline]
    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    #[inline]
    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        // The multiply leaves the best bits at the top; the table indexes with the low ones.
        self.hash.rotate_left(26)
    }
}

/// `HashMap` hasher state for [`FxHasher`].
pub type FxBuildHasher = BuildHasherDefault<FxHasher>;

/// The embedded command table could not be understood.
#[derive(Debug)]
pub enum CommandTableError {
    /// Not JSON at all.
    Json(serde_json::Error),
    /// JSON, but not shaped like a `COMMAND` reply.
    Shape {
        /// The command entry (or `<table>`) where the problem was found.
        entry: String,
        what: &'static str,
    },
}

impl fmt::Display for CommandTableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommandTableError::Json(e) => write!(f, "command table is not valid JSON: {e}"),
            CommandTableError::Shape { entry, what } => {
                write!(f, "command table entry {entry}: {what}")
            }
        }
    }
}

impl std::error::Error for CommandTableError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CommandTableError::Json(e) => Some(e),
            CommandTableError::Shape { .. } => None,
        }
    }
}

/// Where a key spec starts looking (`begin_search`).
#[derive(Clone, Debug, PartialEq, Eq)]
enum BeginSearch {
    /// The keys start at this argv index.
    Index(i64),
    /// The keys start after this keyword; search forwards from `startfrom`, or backwards from
    /// `argc + startfrom` when it is negative.
    Keyword { keyword: String, startfrom: i64 },
    /// The server finds these keys with code (SORT's BY/GET/STORE).
    Unknown,
}

/// How a key spec finds keys from where it starts (`find_keys`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FindKeys {
    /// Keys from the start to `lastkey` (relative; negative counts from the end, or with `limit` a
    /// fraction of the remaining args), every `keystep`.
    Range {
        lastkey: i64,
        keystep: i64,
        limit: i64,
    },
    /// The number of keys is the argument at `keynumidx`; keys start `firstkey` after it.
    Keynum {
        keynumidx: i64,
        firstkey: i64,
        keystep: i64,
    },
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct KeySpec {
    begin: BeginSearch,
    find: FindKeys,
    /// The key is written: OW/RM, or an insert/update/delete operation.
    write: bool,
    /// Not a key (shard channels of SPUBLISH/SSUBSCRIBE, CLUSTERSCAN's cursor).
    not_key: bool,
    /// The spec may miss keys; the server then uses code instead (MIGRATE's KEYS).
    incomplete: bool,
}

/// How keys are found for a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeysRule {
    /// From key specs, like `getKeysUsingKeySpecs`.
    Specs,
    /// `sortGetKeys`: `argv[1]`, plus the key after the last STORE (skipping LIMIT/GET/BY arguments).
    Sort,
    /// `sortROGetKeys`: `argv[1]`.
    SortRo,
    /// `migrateGetKeys`: `argv[3]`, or the keys after KEYS when `argv[3]` is empty.
    Migrate,
    /// `georadiusGetKeys` (the specs are `variable_flags`): `argv[1]`, plus the key after the last
    /// STORE or STOREDIST.
    GeoRadius,
}

/// Which arguments of a command are secrets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SecretRule {
    None,
    /// `AUTH pw`, `AUTH user pw`.
    Auth,
    /// `HELLO [protover] [AUTH user pw] [SETNAME name]`.
    Hello,
    /// Password rules `>pw` `<pw` `#hash` `!hash` of `ACL SETUSER user rule...`.
    AclSetuser,
    /// `ACL DRYRUN user cmd args...`: the secrets of `cmd args...`.
    AclDryrun,
    /// `COMMAND GETKEYS|GETKEYSANDFLAGS cmd args...`: the secrets of `cmd args...`.
    CommandGetkeys,
    /// `MIGRATE ... AUTH pw` / `AUTH2 user pw`.
    Migrate,
    /// `CONFIG SET param value ...` with a password parameter.
    ConfigSet,
}

/// Where the value argument ("payload") of a key command is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PayloadRule {
    /// Always this argv index.
    At(usize),
    /// Starting at argv `from`, skip option words (each `(word, number of arguments it takes)`),
    /// then `then` more positional arguments; the value is the argument reached. When `expect` is
    /// set, the argument where the options end must be that word (HSETEX's FIELDS).
    AfterOptions {
        from: usize,
        options: &'static [(&'static str, usize)],
        expect: Option<&'static str>,
        then: usize,
    },
    /// XADD: `key [NOMKSTREAM] [MAXLEN|MINID [=|~] threshold [LIMIT count]] id field value ...`;
    /// the value is the first field's value.
    Xadd,
}

/// The payload rule for each key command that has a value argument.
///
/// Rule: the payload is the first argument whose `COMMAND DOCS` name is `value`, `element`, `member` or
/// `serialized-value` (for SET, MSET, HSET, LPUSH, SADD, ZADD, XADD, RESTORE...). HSET/HMSET/HSETNX/XADD
/// thus show the first *value*, not the field; SETEX/PSETEX the value, not the TTL. Commands with no such
/// argument (GET, DEL, EXPIRE, INCRBY...) have no payload. Scripting commands are the one addition: their
/// "value" is the script, SHA or function name (`argv[1]`), which is what acts on the keys and otherwise
/// would not appear in a KEY_OP record at all.
///
/// Derived with a script over command-docs-9.1.2.json (positions counted for argv, option blocks made
/// into `AfterOptions`), then checked by hand against the docs. Left out on purpose: BITFIELD and
/// GEOSEARCH(STORE) (the "value" sits inside an optional, repeatable operation), SPUBLISH (its "key"
/// is a shard channel, so it is not a key command).
const PAYLOAD_RULES: &[(&str, PayloadRule)] = {
    use PayloadRule::{AfterOptions, At, Xadd};
    &[
        ("append", At(2)),
        ("delifeq", At(2)),
        (
            "geoadd",
            AfterOptions {
                from: 2,
                options: &[("nx", 0), ("xx", 0), ("ch", 0)],
                expect: None,
                then: 2,
            },
        ),
        ("geohash", At(2)),
        ("geopos", At(2)),
        ("georadiusbymember", At(2)),
        ("georadiusbymember_ro", At(2)),
        ("getset", At(2)),
        ("hmset", At(3)),
        ("hset", At(3)),
        (
            "hsetex",
            AfterOptions {
                from: 2,
                options: &[
                    ("nx", 0),
                    ("xx", 0),
                    ("fnx", 0),
                    ("fxx", 0),
                    ("ex", 1),
                    ("px", 1),
                    ("exat", 1),
                    ("pxat", 1),
                    ("keepttl", 0),
                ],
                expect: Some("fields"),
                then: 3,
            },
        ),
        ("hsetnx", At(3)),
        ("linsert", At(4)),
        ("lpos", At(2)),
        ("lpush", At(2)),
        ("lpushx", At(2)),
        ("lrem", At(3)),
        ("lset", At(3)),
        ("mset", At(2)),
        ("msetex", At(3)),
        ("msetnx", At(2)),
        ("pfadd", At(2)),
        ("psetex", At(3)),
        ("restore", At(3)),
        ("restore-asking", At(3)),
        ("rpush", At(2)),
        ("rpushx", At(2)),
        ("sadd", At(2)),
        ("set", At(2)),
        ("setbit", At(3)),
        ("setex", At(3)),
        ("setnx", At(2)),
        ("setrange", At(3)),
        ("sismember", At(2)),
        ("smismember", At(2)),
        ("smove", At(3)),
        ("srem", At(2)),
        ("xadd", Xadd),
        (
            "zadd",
            AfterOptions {
                from: 2,
                options: &[
                    ("nx", 0),
                    ("xx", 0),
                    ("gt", 0),
                    ("lt", 0),
                    ("ch", 0),
                    ("incr", 0),
                ],
                expect: None,
                then: 1,
            },
        ),
        ("zincrby", At(3)),
        ("zmscore", At(2)),
        ("zrank", At(2)),
        ("zrem", At(2)),
        ("zrevrank", At(2)),
        ("zscore", At(2)),
        // Scripting: the script / SHA / function name.
        ("eval", At(1)),
        ("eval_ro", At(1)),
        ("evalsha", At(1)),
        ("evalsha_ro", At(1)),
        ("fcall", At(1)),
        ("fcall_ro", At(1)),
    ]
};

/// CONFIG SET parameters whose value is a secret (compared case-insensitively). Any parameter whose
/// name contains `pass` is treated the same, so module or future settings are covered too.
const SECRET_CONFIG_PARAMS: &[&str] = &[
    "requirepass",
    "masterauth",
    "primaryauth",
    "tls-key-file-pass",
    "tls-client-key-file-pass",
];

/// One command (or subcommand) of the table.
#[derive(Clone, Debug)]
struct CommandInfo {
    /// Canonical name: `set`, `config|set`. Interned, so records borrow it instead of copying.
    name: &'static str,
    key_specs: Vec<KeySpec>,
    /// Valkey's arity: the exact argument count (command name included) when positive, the
    /// minimum when negative.
    arity: i64,
    /// Has at least one real key spec (not `not_key`): the command is a KEY_OP command.
    has_keys: bool,
    keys_rule: KeysRule,
    change_reply: ChangeReply,
    secret_rule: SecretRule,
    payload: Option<PayloadRule>,
    /// Subcommands by their lower-case name after the `|` (`set` for `config|set`).
    subcommands: HashMap<Vec<u8>, CommandInfo, FxBuildHasher>,
}

/// The server's command table, parsed once.
#[derive(Clone, Debug)]
pub struct CommandTable {
    /// Top-level commands by lower-case name.
    commands: HashMap<Vec<u8>, CommandInfo, FxBuildHasher>,
}

/// What a write command's success reply says about the keys it changed (the module counts the
/// server's dirty counter, which the auditor cannot see; the reply is the next best witness).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeReply {
    /// Nothing: every write key counts (SET ... GET and GETSET answer nil after writing, and a
    /// script may answer anything).
    Unknown,
    /// A nil reply means nothing changed (SET NX refused, a timed-out BLPOP, LPOP of no key).
    NoneIfNil,
    /// Nil, or an integer 0, means nothing changed (COPY, SETNX, EXPIRE, SADD, HDEL, ...).
    NoneIfNilOrZero,
    /// The integer is the number of keys changed (DEL, UNLINK).
    Count,
    /// Only a nil reply means the write happened (SET ... NX GET answers the value it found).
    NoneUnlessNil,
    /// A pop from the first non-empty of several keys: nil means none changed, anything else
    /// names the one that did (BLPOP, BZPOPMIN, LMPOP, ...).
    OneUnlessNil,
}

impl ChangeReply {
    fn of(name: &str) -> ChangeReply {
        match name {
            "del" | "unlink" => ChangeReply::Count,
            "copy" | "setnx" | "msetnx" | "hsetnx" | "renamenx" | "expire" | "pexpire"
            | "expireat" | "pexpireat" | "persist" | "move" | "smove" | "sadd" | "srem"
            | "hdel" | "zrem" | "lrem" | "xdel" | "pfadd" | "lpushx" | "rpushx"
            | "zremrangebyscore" | "zremrangebyrank" | "zremrangebylex" => {
                ChangeReply::NoneIfNilOrZero
            }
            "getset" | "eval" | "evalsha" | "fcall" => ChangeReply::Unknown,
            "blpop" | "brpop" | "bzpopmin" | "bzpopmax" | "lmpop" | "blmpop" | "zmpop"
            | "bzmpop" => ChangeReply::OneUnlessNil,
            _ => ChangeReply::NoneIfNil,
        }
    }
}

/// What [`CommandTable::describe`] found out about one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Described {
    /// Canonical lower-case name (`set`, `config|set`); the parent's name for an unknown subcommand;
    /// the client's spelling for an unknown command.
    pub command: CommandName,
    /// The command (or at least its parent) is in the table.
    pub known: bool,
    /// AUTH (AUTH, HELLO with AUTH), CONFIG (config and its subcommands), KEY_OP (the resolved command
    /// has key specs that name real keys, whatever this argv yields), OTHER otherwise.
    pub category: Category,
    /// Indexes into args of every key, in key-spec order.
    pub keys: Vec<usize>,
    /// How many of `keys` come from key specs that write (OW, RM, or insert/update/delete).
    pub write_keys: usize,
    /// What a success reply says about how many of `write_keys` changed.
    pub change_reply: ChangeReply,
    /// Index of the value argument (see `PAYLOAD_RULES`), when the command has one and argv holds it.
    pub payload: Option<usize>,
    /// Indexes of arguments that are secrets and must never be written anywhere. Sorted, no duplicates.
    pub secrets: Vec<usize>,
    /// Of `secrets`, those shown once the command succeeded: CONFIG SET's parameter names after a
    /// password (a password typed with a space runs into the words after it, which Valkey then
    /// takes for parameters and refuses; a success proves they were parameters).
    pub shown_on_success: Vec<usize>,
    /// A command that can carry secrets (AUTH, HELLO, ACL SETUSER, CONFIG SET, ...): its error
    /// replies may quote one, so they are redacted (`session::redact_quoted`).
    pub may_quote_secrets: bool,
    /// The request's real argument count (at least `args.len()`), for OTHER's `(and N more args)`.
    pub argc: u64,
    /// The argument count passes the command's arity, so the server did not refuse it for that:
    /// a "wrong number of arguments" error then came from the command itself (`HSET h f v f2`).
    pub arity_ok: bool,
}

impl Default for Described {
    /// An empty description, to be filled by [`CommandTable::describe_into`].
    fn default() -> Self {
        Described {
            command: CommandName::Borrowed(b""),
            known: false,
            category: Category::Other,
            keys: Vec::new(),
            write_keys: 0,
            change_reply: ChangeReply::Unknown,
            payload: None,
            secrets: Vec::new(),
            shown_on_success: Vec::new(),
            may_quote_secrets: false,
            argc: 0,
            arity_ok: true,
        }
    }
}

impl Described {
    fn is_secret(&self, index: usize) -> bool {
        self.secrets.binary_search(&index).is_ok()
    }
}

impl CommandTable {
    /// Parse the embedded table of valkey 9.1.2.
    pub fn builtin() -> Result<Self, CommandTableError> {
        Self::from_json(COMMAND_TABLE_JSON)
    }

    /// Parse a `COMMAND` reply rendered as JSON (the shape of `command-table.json`).
    pub fn from_json(json: &str) -> Result<Self, CommandTableError> {
        let root: Value = serde_json::from_str(json).map_err(CommandTableError::Json)?;
        let entries = root.as_array().ok_or_else(|| CommandTableError::Shape {
            entry: "<table>".to_string(),
            what: "not an array of commands",
        })?;
        let mut commands =
            HashMap::with_capacity_and_hasher(entries.len(), FxBuildHasher::default());
        for entry in entries {
            let info = parse_entry(entry)?;
            commands.insert(info.name.as_bytes().to_vec(), info);
        }
        if commands.is_empty() {
            return Err(CommandTableError::Shape {
                entry: "<table>".to_string(),
                what: "no commands",
            });
        }
        Ok(CommandTable { commands })
    }

    /// Number of top-level commands.
    pub fn len(&self) -> usize {
        self.commands.len()
    }

    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }

    /// Resolve `argv[0]` (and `argv[1]` for container commands) to a table entry.
    /// Returns the entry, and whether it is the top-level entry for an unknown/missing subcommand.
    fn resolve(&self, args: &[Arg]) -> Option<&CommandInfo> {
        let mut buf = [0u8; MAX_NAME_LEN];
        let parent = self.commands.get(lower_name(args.first()?, &mut buf)?)?;
        if parent.subcommands.is_empty() {
            return Some(parent);
        }
        let sub = args
            .get(1)
            .and_then(|a| lower_name(a, &mut buf))
            .and_then(|name| parent.subcommands.get(name));
        Some(sub.unwrap_or(parent))
    }

    /// Classify one request: name, category, keys, payload and secrets. `argc` is the request's real
    /// argument count, which may exceed `args.len()` when the parser did not keep every argument.
    pub fn describe(&self, args: &[Arg], argc: u64) -> Described {
        let mut d = Described::default();
        self.describe_into(args, argc, &mut d);
        d
    }

    /// [`describe`](Self::describe) into `d`, reusing its buffers (every field is overwritten).
    pub fn describe_into(&self, args: &[Arg], argc: u64, d: &mut Described) {
        let argc = usize::try_from(argc).unwrap_or(usize::MAX).max(args.len());
        d.argc = argc as u64;
        d.keys.clear();
        d.secrets.clear();
        d.shown_on_success.clear();
        d.arity_ok = true;
        let Some(info) = self.resolve(args) else {
            d.command = match args.first() {
                Some(a) => CommandName::Owned(a.prefix.to_vec()),
                None => CommandName::Borrowed(b""),
            };
            d.known = false;
            if args.get(1).is_some_and(|a| a.eq_ignore_case("setuser")) {
                // ACL renamed: its SETUSER rules, as ACL SETUSER's (a selector, a password
                // typed with a space).
                self.collect_secrets(SecretRule::AclSetuser, args, 0, 0, &mut d.secrets);
            }
            unknown_command_secrets(args, &mut d.secrets);
            d.may_quote_secrets = !d.secrets.is_empty();
            d.category = Category::Other;
            d.write_keys = 0;
            d.change_reply = ChangeReply::Unknown;
            d.payload = None;
            return;
        };
        let option = |word: &str| args.iter().skip(3).any(|a| a.eq_ignore_case(word));
        d.change_reply = if info.name == "set" && option("get") {
            // The reply is the old value: with NX a value means nothing was written, with XX nil
            // means nothing was; without either the key is always written.
            if option("nx") {
                ChangeReply::NoneUnlessNil
            } else if option("xx") {
                ChangeReply::NoneIfNil
            } else {
                ChangeReply::Unknown
            }
        } else {
            info.change_reply
        };

        d.write_keys = match info.keys_rule {
            KeysRule::Specs => keys_from_specs(&info.key_specs, args, argc, &mut d.keys),
            KeysRule::Sort => sort_keys(args, argc, &mut d.keys),
            KeysRule::SortRo => {
                if args.len() > 1 {
                    d.keys.push(1);
                }
                0
            }
            KeysRule::Migrate => migrate_keys(args, argc, &mut d.keys),
            KeysRule::GeoRadius => georadius_keys(args, argc, &mut d.keys),
        };

        self.collect_secrets(info.secret_rule, args, 0, 0, &mut d.secrets);
        if !info.subcommands.is_empty() {
            // A subcommand the table does not know (`ACL SETUSR bob >pw`): its words are looked
            // at as an unknown command's.
            unknown_command_secrets(args, &mut d.secrets);
        }
        d.secrets.sort_unstable();
        d.secrets.dedup();
        if info.secret_rule == SecretRule::ConfigSet
            && let Some(&first) = d.secrets.first()
        {
            // Parameter names sit at even indexes (`CONFIG SET p1 v1 p2 v2`).
            d.shown_on_success
                .extend((first + 1..args.len()).filter(|j| j % 2 == 0));
        }
        // CONFIG SET's errors quote only its parameters and Valkey's own words, and its values
        // only matter when one is a password: without one there is nothing to hide
        // (`argument must be 'yes' or 'no'` stays as Valkey wrote it).
        d.may_quote_secrets = match info.secret_rule {
            SecretRule::None | SecretRule::ConfigSet => !d.secrets.is_empty(),
            _ => true,
        };

        d.category = if info.secret_rule == SecretRule::Auth
            || (info.secret_rule == SecretRule::Hello && hello_auth_at(args).is_some())
        {
            Category::Auth
        } else if info.name == "config" || info.name.starts_with("config|") {
            Category::Config
        } else if info.has_keys {
            Category::KeyOp
        } else {
            Category::Other
        };

        d.payload = info
            .payload
            .and_then(|rule| payload_index(rule, args))
            .filter(|&i| i < args.len());
        d.command = CommandName::Borrowed(info.name.as_bytes());
        d.known = true;
        let n = i64::try_from(argc).unwrap_or(i64::MAX);
        d.arity_ok = if info.arity >= 0 {
            n == info.arity
        } else {
            n >= -info.arity
        };
    }

    /// Append to `out` the indexes (plus `offset`) of the secrets among `args`, by `rule`.
    fn collect_secrets(
        &self,
        rule: SecretRule,
        args: &[Arg],
        offset: usize,
        depth: usize,
        out: &mut Vec<usize>,
    ) {
        match rule {
            SecretRule::None => {}
            SecretRule::Auth => match args.len() {
                0 | 1 => {}
                // AUTH pw / AUTH user pw.
                2 | 3 => out.push(offset + args.len() - 1),
                // A syntax error, but whatever was typed may hold the password: hide it all.
                n => out.extend((1..n).map(|i| offset + i)),
            },
            SecretRule::Hello => {
                // `HELLO [protover [AUTH user pw] [SETNAME name]]` (an `AUTH` in argv[1] is still
                // taken as the option). A word that is no option makes a syntax error, and may be
                // the rest of a password typed with a space in it (`... AUTH u pass word`): hidden.
                let mut i = if hello_auth_at(args) == Some(1) { 1 } else { 2 };
                while i < args.len() {
                    let a = &args[i];
                    if a.eq_ignore_case("auth") {
                        if i + 2 < args.len() {
                            out.push(offset + i + 2);
                        } else if i + 1 < args.len() {
                            // `HELLO 3 AUTH x`: a syntax error; x may well be the password.
                            out.push(offset + i + 1);
                        }
                        i += 3;
                    } else if a.eq_ignore_case("setname") {
                        i += 2;
                    } else {
                        out.push(offset + i);
                        i += 1;
                    }
                }
            }
            SecretRule::AclSetuser => {
                // Rules start after the username, but a forgotten username would make the first
                // rule argv[2]: signed rules count from 2 on. Usernames cannot start with these
                // characters anyway (`ACL SETUSER >x` makes a user named ">x", which is no secret
                // to hide from its own audit log, but hiding it is the safe mistake). From argv[3]
                // on, anything that is not a rule Valkey knows without a password in it (`(>pw)`,
                // `"on >pw"`, the second half of `>pass word`) may hold one: hidden too.
                // A username cannot hold a blank either: one that does is a name with its rules
                // in one argument (`"bob on >pw +@all"`, from a client that joined them), which
                // Valkey refuses after the password was typed.
                for (i, a) in args.iter().enumerate().skip(2) {
                    let signed = matches!(a.prefix.first(), Some(b'>' | b'<' | b'#' | b'!'));
                    let joined = i == 2 && a.prefix.iter().any(u8::is_ascii_whitespace);
                    if signed || joined || (i >= 3 && !is_plain_acl_rule(&a.prefix)) {
                        out.push(offset + i);
                    }
                }
            }
            SecretRule::AclDryrun | SecretRule::CommandGetkeys => {
                // `ACL DRYRUN user cmd ...`, `COMMAND GETKEYS cmd ...`.
                let at = if rule == SecretRule::AclDryrun { 3 } else { 2 };
                let inner = args.get(at..).unwrap_or_default();
                if depth < MAX_DRYRUN_DEPTH
                    && let Some(info) = self.resolve(inner)
                {
                    self.collect_secrets(info.secret_rule, inner, offset + at, depth + 1, out);
                } else if depth >= MAX_DRYRUN_DEPTH {
                    out.extend((at..args.len()).map(|i| offset + i));
                }
            }
            SecretRule::Migrate => {
                // The option scan of migrateGetKeys: options start at argv[6].
                let mut i = 6;
                while i < args.len() {
                    let a = &args[i];
                    if a.eq_ignore_case("keys") {
                        break;
                    } else if a.eq_ignore_case("auth") {
                        if i + 1 < args.len() {
                            out.push(offset + i + 1);
                        }
                        i += 1;
                    } else if a.eq_ignore_case("auth2") {
                        if i + 2 < args.len() {
                            out.push(offset + i + 2);
                        } else if i + 1 < args.len() {
                            // `AUTH2 x` alone: x may be the password.
                            out.push(offset + i + 1);
                        }
                        i += 2;
                    }
                    i += 1;
                }
            }
            SecretRule::ConfigSet => {
                let mut i = 2;
                while i + 1 < args.len() {
                    if is_secret_config_param(&args[i]) {
                        // The value, and every word after it: a password typed with a space runs
                        // into them (`Described::shown_on_success` names those shown on success).
                        out.extend((i + 1..args.len()).map(|j| offset + j));
                        break;
                    }
                    i += 2;
                }
            }
        }
    }
}

/// An `ACL SETUSER` rule that sets no password and holds none: a flag or reset word, a key,
/// channel or command rule, or a selector `(...)` of such rules.
fn is_plain_acl_rule(rule: &[u8]) -> bool {
    const WORDS: [&str; 14] = [
        "on",
        "off",
        "nopass",
        "resetpass",
        "reset",
        "allkeys",
        "resetkeys",
        "allchannels",
        "resetchannels",
        "allcommands",
        "nocommands",
        "clearselectors",
        "sanitize-payload",
        "skip-sanitize-payload",
    ];
    match rule {
        // One rule: several in one argument (`+@all >pw`) are refused and quoted by Valkey, and
        // one of them may be a password.
        [b'~' | b'%' | b'&' | b'+' | b'-', ..] => !rule.iter().any(u8::is_ascii_whitespace),
        [b'(', inner @ .., b')'] => inner
            .split(|b| b.is_ascii_whitespace())
            .filter(|w| !w.is_empty())
            .all(|w| w.first() != Some(&b'(') && is_plain_acl_rule(w)),
        _ => WORDS
            .iter()
            .any(|w| rule.eq_ignore_ascii_case(w.as_bytes())),
    }
}

/// ASCII-lower-case a complete, short argument into `buf` for table lookups.
fn lower_name<'b>(arg: &Arg, buf: &'b mut [u8; MAX_NAME_LEN]) -> Option<&'b [u8]> {
    if !arg.is_complete() || arg.prefix.len() > MAX_NAME_LEN {
        return None;
    }
    let out = &mut buf[..arg.prefix.len()];
    for (o, b) in out.iter_mut().zip(&arg.prefix) {
        *o = b.to_ascii_lowercase();
    }
    Some(out)
}

/// The index of the AUTH token of a HELLO request (`argv[1]` is normally the protocol version, but an
/// `AUTH` there is still treated as the option so its password is never shown).
fn hello_auth_at(args: &[Arg]) -> Option<usize> {
    // As Valkey's HELLO reads its options: the last complete `AUTH user pw` is the one it tries
    // (`HELLO 3 AUTH alice x AUTH bob pw` logs in bob). Without one, the first `AUTH` at all still
    // makes it an authentication (`HELLO 3 AUTH x`: its word may be a password).
    let mut i = if args.get(1).is_some_and(|a| a.eq_ignore_case("auth")) {
        1
    } else {
        2
    };
    let (mut complete, mut any) = (None, None);
    while i < args.len() {
        let a = &args[i];
        if a.eq_ignore_case("auth") {
            any = any.or(Some(i));
            if i + 2 < args.len() {
                complete = Some(i);
                i += 3;
                continue;
            }
        } else if a.eq_ignore_case("setname") {
            i += 2;
            continue;
        }
        i += 1;
    }
    complete.or(any)
}

fn is_secret_config_param(param: &Arg) -> bool {
    if !param.is_complete() {
        // Cannot tell what parameter it is: hide its value.
        return true;
    }
    SECRET_CONFIG_PARAMS.iter().any(|p| param.eq_ignore_case(p))
        || param
            .prefix
            .windows(4)
            .any(|w| w.eq_ignore_ascii_case(b"pass"))
}

/// Strict decimal integer like the server's `string2ll`: optional `-`, digits, no leading zeros, no
/// spaces or `+`, fits in i64.
fn parse_i64_strict(arg: &Arg) -> Option<i64> {
    if !arg.is_complete() {
        return None;
    }
    string2ll(&arg.prefix)
}

/// An integer as Valkey's `string2ll` reads one: an optional `-`, then `0` alone or digits without
/// a leading zero (no blanks, no `+`, no `-0`), within a signed 64-bit integer.
pub fn string2ll(s: &[u8]) -> Option<i64> {
    let (neg, digits) = match s.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, s),
    };
    if digits.is_empty() || (digits.len() > 1 && digits[0] == b'0') || (neg && digits == b"0") {
        return None;
    }
    let mut v: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        let d = i64::from(d - b'0');
        v = if neg {
            v.checked_mul(10)?.checked_sub(d)?
        } else {
            v.checked_mul(10)?.checked_add(d)?
        };
    }
    Some(v)
}

/// `getKeysUsingKeySpecs` in "return partial" mode: a spec that does not fit this argv (keyword
/// missing, numkeys not a number, range out of bounds) contributes no keys, the others still do.
/// Returns how many of the pushed keys come from write specs.
fn keys_from_specs(specs: &[KeySpec], args: &[Arg], argc: usize, keys: &mut Vec<usize>) -> usize {
    let argc = i64::try_from(argc).unwrap_or(i64::MAX);
    let mut write_keys = 0;
    for spec in specs {
        if spec.not_key || spec.incomplete {
            continue;
        }
        let Some((first, last, step)) = spec_range(spec, args, argc) else {
            continue;
        };
        let mut i = first;
        while i <= last {
            // argc may exceed the kept args; a key we do not have cannot be shown, but it is
            // still written (MSET of 60,000 keys modifies 60,000).
            if let Some(idx) = usize::try_from(i).ok().filter(|&idx| idx < args.len()) {
                keys.push(idx);
                if spec.write {
                    write_keys += 1;
                }
            } else {
                if spec.write && step > 0 {
                    let rest = (last - i) / step + 1;
                    write_keys += usize::try_from(rest).unwrap_or(0);
                }
                break;
            }
            let Some(next) = i.checked_add(step) else {
                break;
            };
            i = next;
        }
    }
    write_keys
}

/// First and last argv index and step of one spec's keys, or None when the spec does not apply.
fn spec_range(spec: &KeySpec, args: &[Arg], argc: i64) -> Option<(i64, i64, i64)> {
    let first = match &spec.begin {
        BeginSearch::Index(i) => *i,
        BeginSearch::Keyword { keyword, startfrom } => {
            // Only kept arguments can be compared; the bounds also keep a huge argc from making
            // this a long loop.
            let kept = i64::try_from(args.len()).unwrap_or(i64::MAX);
            let found = if *startfrom > 0 {
                // Forwards, not looking at the last argument (nothing could follow it).
                (*startfrom..argc.saturating_sub(1).min(kept)).find(|&i| arg_is(args, i, keyword))
            } else {
                let start = argc.checked_add(*startfrom)?.min(kept - 1);
                (1..=start).rev().find(|&i| arg_is(args, i, keyword))
            };
            found? + 1
        }
        BeginSearch::Unknown => return None,
    };
    let (first, last, step) = match spec.find {
        FindKeys::Range {
            lastkey,
            keystep,
            limit,
        } => {
            let last = if lastkey >= 0 {
                first.checked_add(lastkey)?
            } else if limit == 0 {
                argc.checked_add(lastkey)?
            } else {
                let remaining = argc.checked_sub(first)?;
                first.checked_add(remaining.checked_div(limit)?.checked_add(lastkey)?)?
            };
            (first, last, keystep)
        }
        FindKeys::Keynum {
            keynumidx,
            firstkey,
            keystep,
        } => {
            if keynumidx >= argc.checked_sub(first)? {
                return None;
            }
            let numkeys_at = usize::try_from(first.checked_add(keynumidx)?).ok()?;
            let numkeys = parse_i64_strict(args.get(numkeys_at)?)?;
            if numkeys < 0 {
                return None;
            }
            let first = first.checked_add(keynumidx)?.checked_add(firstkey)?;
            let last = first.checked_add(numkeys)?.checked_sub(1)?;
            (first, last, keystep)
        }
        FindKeys::Unknown => return None,
    };
    if first < 1 || last >= argc || last < first || first >= argc || step < 1 {
        return None;
    }
    Some((first, last, step))
}

fn arg_is(args: &[Arg], i: i64, word: &str) -> bool {
    usize::try_from(i)
        .ok()
        .and_then(|i| args.get(i))
        .is_some_and(|a| a.eq_ignore_case(word))
}

/// The server's `sortGetKeys`: `argv[1]` always, plus the argument after the last STORE (the store key is
/// written). LIMIT skips 2 arguments, GET and BY skip 1.
fn sort_keys(args: &[Arg], argc: usize, keys: &mut Vec<usize>) -> usize {
    if args.len() < 2 {
        return 0;
    }
    keys.push(1);
    let mut store = None;
    let mut i = 2;
    while i < args.len() {
        let a = &args[i];
        if a.eq_ignore_case("limit") {
            i += 2;
        } else if a.eq_ignore_case("get") || a.eq_ignore_case("by") {
            i += 1;
        } else if a.eq_ignore_case("store") && i + 1 < argc {
            store = Some(i + 1);
        }
        i += 1;
    }
    match store {
        Some(s) if s < args.len() => {
            keys.push(s);
            1
        }
        _ => 0,
    }
}

/// The arguments that look like secrets in a command the table does not know: a module's, or
/// one the server renamed (`rename-command CONFIG cfg-9f3a`, so `cfg-9f3a SET requirepass pw`).
/// Its shape is unknown, so any word that takes a password (`requirepass`, `masterauth`, the
/// TLS key passphrases, `AUTH`/`AUTH2`) hides the two words after it, and any ACL password rule
/// (`>pw <pw #hash !hash`) is hidden. Sorted, no duplicates.
fn unknown_command_secrets(args: &[Arg], out: &mut Vec<usize>) {
    for (i, a) in args.iter().enumerate().skip(1) {
        if SECRET_CONFIG_PARAMS
            .iter()
            .chain(&["auth", "auth2"])
            .any(|w| a.eq_ignore_case(w))
        {
            out.extend((i + 1..args.len()).take(2));
        } else if matches!(a.prefix.first(), Some(b'>' | b'<' | b'#' | b'!')) {
            out.push(i);
        }
    }
    out.sort_unstable();
    out.dedup();
}

/// The server's `georadiusGetKeys`: `argv[1]`, plus the argument after the last STORE or
/// STOREDIST (searched from argv[5]; that key is written). Two stores leave only the last one.
fn georadius_keys(args: &[Arg], argc: usize, keys: &mut Vec<usize>) -> usize {
    if args.len() > 1 {
        keys.push(1);
    }
    // As the server scans: a STORE's argument is skipped, so `STORE store b` stores to "store".
    let end = argc.min(args.len());
    let mut stored = None;
    let mut i = 5;
    while i + 1 < end {
        if args[i].eq_ignore_case("store") || args[i].eq_ignore_case("storedist") {
            stored = Some(i + 1);
            i += 1;
        }
        i += 1;
    }
    match stored {
        Some(k) => {
            keys.push(k);
            1
        }
        None => 0,
    }
}

/// The server's `migrateGetKeys`: `argv[3]`, or, with the KEYS option (`argv[3]` must then be empty),
/// every argument after KEYS. All of them are deleted from this server (unless COPY), so all count as
/// written.
fn migrate_keys(args: &[Arg], argc: usize, keys: &mut Vec<usize>) -> usize {
    let mut first = 3;
    let mut last = 3; // inclusive
    let mut i = 6;
    while i < args.len() {
        let a = &args[i];
        if a.eq_ignore_case("keys") {
            if args.get(3).is_none_or(|k| k.len > 0) {
                // "Cannot use both a key and the KEYS option": the server finds no keys.
                return 0;
            }
            first = i + 1;
            last = argc.saturating_sub(1);
            break;
        } else if a.eq_ignore_case("auth") {
            i += 1;
        } else if a.eq_ignore_case("auth2") {
            i += 2;
        }
        i += 1;
    }
    let before = keys.len();
    keys.extend((first..=last).take_while(|&k| k < args.len()));
    keys.len() - before
}

/// Where the value argument is for this argv, if the rule finds one.
fn payload_index(rule: PayloadRule, args: &[Arg]) -> Option<usize> {
    match rule {
        PayloadRule::At(i) => Some(i),
        PayloadRule::AfterOptions {
            from,
            options,
            expect,
            then,
        } => {
            let mut i = from;
            'scan: while let Some(a) = args.get(i) {
                for (word, nargs) in options {
                    if a.eq_ignore_case(word) {
                        i += 1 + nargs;
                        continue 'scan;
                    }
                }
                break;
            }
            if let Some(word) = expect
                && !args.get(i).is_some_and(|a| a.eq_ignore_case(word))
            {
                return None;
            }
            i.checked_add(then)
        }
        PayloadRule::Xadd => {
            let mut i = 2;
            loop {
                let a = args.get(i)?;
                if a.eq_ignore_case("nomkstream") {
                    i += 1;
                } else if a.eq_ignore_case("maxlen") || a.eq_ignore_case("minid") {
                    i += 1;
                    if args
                        .get(i)
                        .is_some_and(|op| op.eq_ignore_case("=") || op.eq_ignore_case("~"))
                    {
                        i += 1;
                    }
                    i += 1; // threshold
                } else if a.eq_ignore_case("limit") {
                    i += 2;
                } else {
                    break;
                }
            }
            // i is the id; then field, then value.
            Some(i + 2)
        }
    }
}

/// The one `'static` copy of a command name: every record of a known command borrows its name from
/// here (no allocation per record). Bounded by the number of distinct names ever loaded.
fn intern(name: String) -> &'static str {
    static NAMES: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let mut names = NAMES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(&known) = names.iter().find(|&&n| n == name) {
        return known;
    }
    let leaked: &'static str = Box::leak(name.into_boxed_str());
    names.push(leaked);
    leaked
}

fn parse_entry(entry: &Value) -> Result<CommandInfo, CommandTableError> {
    let shape = |entry: &str, what: &'static str| CommandTableError::Shape {
        entry: entry.to_string(),
        what,
    };
    let fields = entry
        .as_array()
        .ok_or_else(|| shape("<table>", "an entry is not an array"))?;
    let name = fields
        .first()
        .and_then(Value::as_str)
        .ok_or_else(|| shape("<table>", "an entry has no name"))?
        .to_ascii_lowercase();
    if fields.len() < 10 {
        return Err(shape(&name, "fewer than 10 fields"));
    }
    let key_specs = fields[8]
        .as_array()
        .ok_or_else(|| shape(&name, "key_specs is not an array"))?
        .iter()
        .map(|ks| parse_key_spec(ks).ok_or_else(|| shape(&name, "malformed key spec")))
        .collect::<Result<Vec<_>, _>>()?;
    let mut subcommands = HashMap::default();
    for sub in fields[9]
        .as_array()
        .ok_or_else(|| shape(&name, "subcommands is not an array"))?
    {
        let info = parse_entry(sub)?;
        let short = match info.name.split_once('|') {
            Some((parent, short)) if parent == name => short.as_bytes().to_vec(),
            _ => return Err(shape(info.name, "subcommand not named parent|sub")),
        };
        subcommands.insert(short, info);
    }
    let has_keys = key_specs.iter().any(|ks| !ks.not_key);
    let keys_rule = match name.as_str() {
        "sort" => KeysRule::Sort,
        "sort_ro" => KeysRule::SortRo,
        "migrate" => KeysRule::Migrate,
        "georadius" | "georadiusbymember" => KeysRule::GeoRadius,
        _ => KeysRule::Specs,
    };
    let secret_rule = match name.as_str() {
        "auth" => SecretRule::Auth,
        "hello" => SecretRule::Hello,
        "acl|setuser" => SecretRule::AclSetuser,
        "acl|dryrun" => SecretRule::AclDryrun,
        "command|getkeys" | "command|getkeysandflags" => SecretRule::CommandGetkeys,
        "migrate" => SecretRule::Migrate,
        "config|set" => SecretRule::ConfigSet,
        _ => SecretRule::None,
    };
    let change_reply = ChangeReply::of(&name);
    let payload = PAYLOAD_RULES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, rule)| *rule);
    let arity = fields[1]
        .as_i64()
        .ok_or_else(|| shape(&name, "arity is not an integer"))?;
    Ok(CommandInfo {
        name: intern(name),
        key_specs,
        arity,
        has_keys,
        keys_rule,
        change_reply,
        secret_rule,
        payload,
        subcommands,
    })
}

fn parse_key_spec(ks: &Value) -> Option<KeySpec> {
    let flags: Vec<&str> = ks
        .get("flags")?
        .as_array()?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let has = |f: &str| flags.iter().any(|x| x.eq_ignore_ascii_case(f));
    let bs = ks.get("begin_search")?;
    let bs_spec = bs.get("spec");
    let begin = match bs.get("type")?.as_str()? {
        "index" => BeginSearch::Index(bs_spec?.get("index")?.as_i64()?),
        "keyword" => BeginSearch::Keyword {
            keyword: bs_spec?.get("keyword")?.as_str()?.to_string(),
            startfrom: bs_spec?.get("startfrom")?.as_i64()?,
        },
        _ => BeginSearch::Unknown,
    };
    let fk = ks.get("find_keys")?;
    let fk_spec = fk.get("spec");
    let num = |k: &str| fk_spec.and_then(|s| s.get(k)).and_then(Value::as_i64);
    let find = match fk.get("type")?.as_str()? {
        "range" => FindKeys::Range {
            lastkey: num("lastkey")?,
            keystep: num("keystep")?,
            limit: num("limit")?,
        },
        "keynum" => FindKeys::Keynum {
            keynumidx: num("keynumidx")?,
            firstkey: num("firstkey")?,
            keystep: num("keystep")?,
        },
        _ => FindKeys::Unknown,
    };
    Some(KeySpec {
        begin,
        find,
        write: has("OW") || has("RM") || has("insert") || has("update") || has("delete"),
        not_key: has("not_key"),
        incomplete: has("incomplete"),
    })
}

/// Build the record's `command_args` for a described request, by `d.category`:
///
/// * KEY_OP: `key=<first key>[ payload=<value>]`, the value cut to `payload_maxsize` bytes and
///   the key to [`key_maxsize`], with `...(truncated)` when cut (or when the parser did not keep all of it); no payload when
///   `payload_disable`, when the command has no value argument, or when that argument is a secret.
/// * CONFIG: `subcommand=<argv[1] as typed>[ param=<argv[2]>]` (param for GET/SET only; never a
///   value).
/// * AUTH: `[user=<u> ]password=<REDACTED>` for AUTH (the module's `password=<REDACTED>`, with
///   the user asked for when one is given); `[protover=<n> ]user=<u> password=<REDACTED>` for
///   HELLO.
/// * anything else (OTHER, custom categories): `arg1=.. arg2=.. arg3=..`, each cut at 50 bytes with
///   `...`, then ` (and N more args)`; a secret is written `<REDACTED>`.
///
/// The result is raw bytes (the client's); escaping is the output format's job.
pub fn command_args(
    d: &Described,
    args: &[Arg],
    payload_disable: bool,
    payload_maxsize: usize,
) -> Vec<u8> {
    let mut out = Vec::new();
    command_args_into(d, args, payload_disable, payload_maxsize, &mut out);
    out
}

/// [`command_args`] appended to `out`.
/// `command_args` of a command that succeeded, where that shows more than `command_args`
/// (`Described::shown_on_success`); `None` otherwise.
pub fn command_args_on_success(
    d: &Described,
    args: &[Arg],
    payload_disable: bool,
    payload_maxsize: usize,
) -> Option<Vec<u8>> {
    if d.shown_on_success.is_empty() {
        return None;
    }
    let mut shown = d.clone();
    shown
        .secrets
        .retain(|i| d.shown_on_success.binary_search(i).is_err());
    Some(command_args(&shown, args, payload_disable, payload_maxsize))
}

/// Bytes of a key shown at least, whatever `payload_maxsize` (the module never cuts keys; their
/// prefixes are bounded for memory): `payload_maxsize 0` hides values, not which key was touched.
pub const KEY_MIN_SHOWN: usize = 255;

/// Bytes of each key shown, in `command_args` and in `keys`.
pub fn key_maxsize(payload_maxsize: usize) -> usize {
    payload_maxsize.max(KEY_MIN_SHOWN)
}

pub fn command_args_into(
    d: &Described,
    args: &[Arg],
    payload_disable: bool,
    payload_maxsize: usize,
    out: &mut Vec<u8>,
) {
    let start = out.len();
    match d.category {
        Category::KeyOp => {
            if let Some(&k) = d.keys.first() {
                out.extend_from_slice(b"key=");
                if d.is_secret(k) {
                    out.extend_from_slice(REDACTED);
                } else {
                    push_cut(
                        out,
                        args.get(k),
                        key_maxsize(payload_maxsize),
                        TRUNCATED_MARKER,
                    );
                }
            }
            if !payload_disable
                && let Some(p) = d.payload.filter(|&p| !d.is_secret(p))
                && let Some(arg) = args.get(p)
            {
                if out.len() > start {
                    out.push(b' ');
                }
                out.extend_from_slice(b"payload=");
                push_cut(out, Some(arg), payload_maxsize, TRUNCATED_MARKER);
            }
        }
        Category::Config => {
            if let Some(sub) = args.get(1) {
                out.extend_from_slice(b"subcommand=");
                push_cut(out, Some(sub), CONFIG_FIELD_MAX, CUT_MARKER);
                // The module names the first parameter; a CONFIG SET names every one it changes
                // (`CONFIG SET maxmemory-policy x requirepass y` changed the password too), so the
                // first `param=` reads as the module's and the others follow it. Never a value.
                let params: Vec<usize> = if sub.eq_ignore_case("set") {
                    (2..args.len()).step_by(2).collect()
                } else if sub.eq_ignore_case("get") {
                    vec![2]
                } else {
                    Vec::new()
                };
                const MAX_PARAMS: usize = 32;
                for (n, &i) in params.iter().enumerate() {
                    let Some(param) = args.get(i) else { break };
                    if n == MAX_PARAMS {
                        out.extend_from_slice(
                            format!(" (and {} more)", params.len() - MAX_PARAMS).as_bytes(),
                        );
                        break;
                    }
                    out.extend_from_slice(b" param=");
                    if d.is_secret(i) {
                        out.extend_from_slice(REDACTED);
                    } else {
                        push_cut(out, Some(param), CONFIG_FIELD_MAX, CUT_MARKER);
                    }
                }
            }
        }
        Category::Auth => {
            // `AUTH <user> <password>`: the user asked for, so that a failed attempt shows whom it
            // tried to become (the record's username is the user the command ran as).
            if *d.command == *b"auth"
                && args.len() >= 3
                && let Some(user) = args.get(1)
            {
                out.extend_from_slice(b"user=");
                push_field(out, d, 1, user, HELLO_FIELD_MAX);
                out.push(b' ');
            }
            if *d.command == *b"hello"
                && let Some(at) = hello_auth_at(args)
            {
                if at > 1
                    && let Some(protover) = args.get(1)
                {
                    out.extend_from_slice(b"protover=");
                    push_field(out, d, 1, protover, HELLO_FIELD_MAX);
                    out.push(b' ');
                }
                if let Some(user) = args.get(at + 1) {
                    out.extend_from_slice(b"user=");
                    push_field(out, d, at + 1, user, HELLO_FIELD_MAX);
                    out.push(b' ');
                }
            }
            out.extend_from_slice(b"password=");
            out.extend_from_slice(REDACTED);
        }
        _ => {
            // The real argument count: the parser may have kept fewer arguments than were sent.
            let argc = usize::try_from(d.argc)
                .unwrap_or(usize::MAX)
                .max(args.len())
                .max(1);
            for i in 1..=(argc - 1).min(OTHER_ARGS_SHOWN) {
                if i > 1 {
                    out.push(b' ');
                }
                out.extend_from_slice(b"arg");
                out.push(b'0' + i as u8);
                out.push(b'=');
                match args.get(i) {
                    Some(arg) => push_field(out, d, i, arg, OTHER_ARG_MAX),
                    // Sent but not kept: nothing to show but the fact that something was cut.
                    None => out.extend_from_slice(CUT_MARKER),
                }
            }
            if argc - 1 > OTHER_ARGS_SHOWN {
                out.extend_from_slice(b" (and ");
                push_decimal(out, (argc - 1 - OTHER_ARGS_SHOWN) as u64);
                out.extend_from_slice(b" more args)");
            }
        }
    }
}

fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

/// An argument for OTHER/HELLO fields: `<REDACTED>` if secret, else cut with `...`.
fn push_field(out: &mut Vec<u8>, d: &Described, index: usize, arg: &Arg, max: usize) {
    if d.is_secret(index) {
        out.extend_from_slice(REDACTED);
    } else {
        push_cut(out, Some(arg), max, CUT_MARKER);
    }
}

/// Where to cut `bytes` to at most `max` bytes: moved back to a UTF-8 character boundary (at most
/// 3 bytes) so text stays text; a plain byte cut where it is not UTF-8.
pub fn utf8_cut(bytes: &[u8], max: usize) -> usize {
    let mut cut = bytes.len().min(max);
    if cut < bytes.len() {
        let floor = cut.saturating_sub(3);
        while cut > floor && bytes.get(cut).is_some_and(|b| b & 0xC0 == 0x80) {
            cut -= 1;
        }
        if bytes.get(cut).is_some_and(|b| b & 0xC0 == 0x80) {
            cut = bytes.len().min(max);
        }
    }
    cut
}

/// Append at most `max` bytes of the argument, then `marker` when any of it is not shown. The cut is
/// moved back to a UTF-8 character boundary (at most 3 bytes) so text stays text.
fn push_cut(out: &mut Vec<u8>, arg: Option<&Arg>, max: usize, marker: &[u8]) {
    let Some(arg) = arg else { return };
    let bytes = arg.prefix.as_slice();
    let cut = utf8_cut(bytes, max);
    out.extend_from_slice(&bytes[..cut]);
    if (cut as u64) < arg.len || arg.lost {
        out.extend_from_slice(marker);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> CommandTable {
        CommandTable::builtin().expect("embedded table parses")
    }

    fn argv(words: &[&str]) -> Vec<Arg> {
        words.iter().map(|w| Arg::new(w.as_bytes())).collect()
    }

    fn describe(words: &[&str]) -> Described {
        let a = argv(words);
        table().describe(&a, a.len() as u64)
    }

    #[test]
    fn acl_setuser_hides_every_word_that_is_not_a_plain_rule() {
        let d = describe(&[
            "ACL",
            "SETUSER",
            "bob",
            "on",
            "(~k +get)",
            "+@read",
            "-del",
            "&ch",
            "%R~x",
            "nopass",
            "ResetKeys",
            "allkeys",
            ">pw",
            "<pw",
            "#h",
            "!h",
            "pw2",
            "(>pw)",
            "on >pw",
            "(~k",
        ]);
        assert_eq!(d.secrets, [12, 13, 14, 15, 16, 17, 18, 19]);
        assert!(d.may_quote_secrets);
        // The user name (argv[2]) is shown unless it looks like a password rule.
        assert_eq!(describe(&["ACL", "SETUSER", ">pw"]).secrets, [2]);
        // ... or holds a blank: rules typed into it (QA).
        let joined = describe(&["ACL", "SETUSER", "bob on >pw +@all"]);
        assert_eq!(joined.secrets, [2]);
        assert!(joined.may_quote_secrets);
        assert!(!describe(&["GET", "k"]).may_quote_secrets);
        assert!(!describe(&["CONFIG", "SET", "appendonly", "maybe"]).may_quote_secrets);
        assert!(
            describe(&["CONFIG", "SET", "appendonly", "maybe", "requirepass", "pw"])
                .may_quote_secrets
        );
    }

    #[test]
    fn hello_hides_its_password_and_every_word_that_is_no_option() {
        let secrets = |w: &[&str]| describe(w).secrets;
        assert_eq!(
            secrets(&["HELLO", "3", "AUTH", "u", "pw", "SETNAME", "n"]),
            [4]
        );
        assert_eq!(
            secrets(&["HELLO", "3", "SETNAME", "n", "AUTH", "u", "pw"]),
            [6]
        );
        assert_eq!(
            secrets(&["HELLO", "3", "AUTH", "u", "pass", "word"]),
            [4, 5]
        );
        assert_eq!(secrets(&["HELLO", "3", "AUTH", "x"]), [3]);
        assert_eq!(secrets(&["HELLO", "AUTH", "u", "pw"]), [3]);
        assert!(secrets(&["HELLO", "3"]).is_empty());
    }

    fn key_names(words: &[&str]) -> Vec<String> {
        describe(words)
            .keys
            .iter()
            .map(|&i| words[i].to_string())
            .collect()
    }

    fn args_text(words: &[&str]) -> String {
        let a = argv(words);
        let d = table().describe(&a, a.len() as u64);
        String::from_utf8(command_args(&d, &a, false, 1024)).unwrap()
    }

    #[test]
    fn table_parses_with_subcommands() {
        let t = table();
        assert!(t.len() > 200);
        assert!(
            t.commands[b"config".as_slice()]
                .subcommands
                .contains_key(b"set".as_slice())
        );
        assert!(
            t.commands[b"acl".as_slice()]
                .subcommands
                .contains_key(b"setuser".as_slice())
        );
    }

    #[test]
    fn bad_tables_are_typed_errors() {
        assert!(matches!(
            CommandTable::from_json("nope"),
            Err(CommandTableError::Json(_))
        ));
        assert!(matches!(
            CommandTable::from_json("{}"),
            Err(CommandTableError::Shape { .. })
        ));
        assert!(matches!(
            CommandTable::from_json("[]"),
            Err(CommandTableError::Shape { .. })
        ));
        assert!(matches!(
            CommandTable::from_json("[[\"get\", 2]]"),
            Err(CommandTableError::Shape { .. })
        ));
        let e = CommandTable::from_json("[1]").unwrap_err();
        assert!(e.to_string().contains("not an array"));
    }

    #[test]
    fn payload_rules_name_real_key_commands() {
        let t = table();
        for (name, _) in PAYLOAD_RULES {
            let info = t
                .commands
                .get(name.as_bytes())
                .unwrap_or_else(|| panic!("{name} not in table"));
            assert!(info.has_keys, "{name} has no keys");
        }
    }

    #[test]
    fn names_and_subcommands() {
        let d = describe(&["SET", "k", "v"]);
        assert_eq!(&*d.command, b"set");
        assert!(d.known);
        assert_eq!(
            &*describe(&["Config", "sEt", "maxmemory", "1"]).command,
            b"config|set"
        );
        assert_eq!(
            &*describe(&["acl", "SETUSER", "bob"]).command,
            b"acl|setuser"
        );
        assert_eq!(&*describe(&["CLIENT", "LIST"]).command, b"client|list");
        let d = describe(&["CLIENT", "nosuchsub"]);
        assert_eq!(&*d.command, b"client");
        assert!(d.known);
        let d = describe(&["CONFIG"]);
        assert_eq!(
            (&*d.command, d.category.clone()),
            (b"config".as_slice(), Category::Config)
        );
        let d = describe(&["NoSuchCommand", "arg"]);
        assert_eq!(&*d.command, b"NoSuchCommand");
        assert!(!d.known);
        assert_eq!(d.category, Category::Other);
        assert!(d.keys.is_empty());
        let d = table().describe(&[], 0);
        assert!(d.command.is_empty() && !d.known);
    }

    #[test]
    fn categories() {
        assert_eq!(describe(&["auth", "pw"]).category, Category::Auth);
        assert_eq!(
            describe(&["HELLO", "3", "AUTH", "u", "p"]).category,
            Category::Auth
        );
        assert_eq!(describe(&["HELLO", "3"]).category, Category::Other);
        assert_eq!(
            describe(&["HELLO", "3", "SETNAME", "auth"]).category,
            Category::Other
        );
        assert_eq!(describe(&["config", "get", "x"]).category, Category::Config);
        assert_eq!(describe(&["config", "bogus"]).category, Category::Config);
        assert_eq!(describe(&["get", "k"]).category, Category::KeyOp);
        // Static: a key command stays KEY_OP even when this argv yields no key.
        assert_eq!(describe(&["get"]).category, Category::KeyOp);
        assert_eq!(
            describe(&["eval", "return 1", "0"]).category,
            Category::KeyOp
        );
        assert_eq!(
            describe(&["object", "encoding", "k"]).category,
            Category::KeyOp
        );
        assert_eq!(describe(&["object", "help"]).category, Category::Other);
        assert_eq!(describe(&["ping"]).category, Category::Other);
        assert_eq!(
            describe(&["acl", "setuser", "bob"]).category,
            Category::Other
        );
        // Shard channels are not keys.
        assert_eq!(
            describe(&["spublish", "ch", "msg"]).category,
            Category::Other
        );
        assert!(describe(&["spublish", "ch", "msg"]).keys.is_empty());
    }

    #[test]
    fn keys_simple_and_multi() {
        assert_eq!(key_names(&["SET", "k", "v", "EX", "10"]), ["k"]);
        assert_eq!(key_names(&["SETEX", "k", "10", "v"]), ["k"]);
        assert_eq!(
            key_names(&["MSET", "a", "1", "b", "2", "c", "3"]),
            ["a", "b", "c"]
        );
        assert_eq!(key_names(&["DEL", "a", "b", "c"]), ["a", "b", "c"]);
        assert_eq!(key_names(&["MGET", "a", "b"]), ["a", "b"]);
        assert_eq!(key_names(&["HSET", "h", "f1", "v1", "f2", "v2"]), ["h"]);
        assert_eq!(
            key_names(&["LMOVE", "src", "dst", "LEFT", "RIGHT"]),
            ["src", "dst"]
        );
        assert_eq!(key_names(&["BLPOP", "a", "b", "0"]), ["a", "b"]);
        assert_eq!(key_names(&["OBJECT", "ENCODING", "k"]), ["k"]);
        assert_eq!(key_names(&["MEMORY", "USAGE", "k", "SAMPLES", "5"]), ["k"]);
        assert_eq!(
            key_names(&["BITOP", "AND", "dst", "a", "b"]),
            ["dst", "a", "b"]
        );
        assert_eq!(key_names(&["LCS", "a", "b"]), ["a", "b"]);
    }

    #[test]
    fn keys_keynum() {
        assert_eq!(
            key_names(&["ZUNIONSTORE", "dst", "2", "a", "b", "WEIGHTS", "1", "2"]),
            ["dst", "a", "b"]
        );
        assert_eq!(
            key_names(&["ZINTERCARD", "2", "a", "b", "LIMIT", "1"]),
            ["a", "b"]
        );
        assert_eq!(
            key_names(&["EVAL", "return 1", "2", "k1", "k2", "argv1"]),
            ["k1", "k2"]
        );
        assert_eq!(key_names(&["EVALSHA", "abc", "1", "k1", "x"]), ["k1"]);
        assert_eq!(key_names(&["FCALL", "f", "1", "k1"]), ["k1"]);
        assert!(key_names(&["EVAL", "return 1", "0"]).is_empty());
        // numkeys not a number, negative, leading zero, too big, out of range: no keys, no panic.
        for n in [
            "x",
            "-1",
            "01",
            "+1",
            "99999999999999999999",
            "9223372036854775807",
            "5",
        ] {
            assert!(key_names(&["EVAL", "s", n, "k"]).is_empty(), "{n}");
        }
        assert!(key_names(&["EVAL", "s"]).is_empty());
        assert_eq!(key_names(&["LMPOP", "2", "a", "b", "LEFT"]), ["a", "b"]);
    }

    #[test]
    fn keys_keyword() {
        assert_eq!(
            key_names(&["XREAD", "COUNT", "2", "STREAMS", "s1", "s2", "0", "0"]),
            ["s1", "s2"]
        );
        assert_eq!(
            key_names(&["XREAD", "STREAMS", "STREAMS", "0"]),
            ["STREAMS"]
        );
        assert_eq!(
            key_names(&[
                "XREADGROUP",
                "GROUP",
                "g",
                "c",
                "COUNT",
                "1",
                "STREAMS",
                "a",
                "b",
                ">",
                ">"
            ]),
            ["a", "b"]
        );
        assert!(key_names(&["XREAD", "COUNT", "2"]).is_empty());
        let words = ["GEORADIUS", "g", "0", "0", "1", "km", "STORE", "dst"];
        assert_eq!(key_names(&words), ["g", "dst"]);
        assert_eq!(describe(&words).write_keys, 1);
        assert_eq!(
            key_names(&["GEORADIUS", "g", "0", "0", "1", "km", "STOREDIST", "d2"]),
            ["g", "d2"]
        );
    }

    #[test]
    fn keys_migrate_and_sort() {
        let single = ["MIGRATE", "h", "6379", "key1", "0", "5000", "COPY"];
        assert_eq!(key_names(&single), ["key1"]);
        let multi = [
            "MIGRATE", "h", "6379", "", "0", "5000", "AUTH", "keys", "KEYS", "a", "b",
        ];
        assert_eq!(key_names(&multi), ["a", "b"]);
        assert_eq!(describe(&multi).write_keys, 2);
        let multi2 = [
            "MIGRATE", "h", "6379", "", "0", "5000", "AUTH2", "u", "KEYS", "KEYS", "c",
        ];
        assert_eq!(key_names(&multi2), ["c"]);
        // Both a key and KEYS: the server finds none.
        assert!(key_names(&["MIGRATE", "h", "1", "k", "0", "5", "KEYS", "a"]).is_empty());
        assert!(key_names(&["MIGRATE", "h"]).is_empty());

        assert_eq!(
            key_names(&[
                "SORT", "l", "BY", "store", "LIMIT", "0", "1", "STORE", "dst"
            ]),
            ["l", "dst"]
        );
        assert_eq!(describe(&["SORT", "l", "STORE", "dst"]).write_keys, 1);
        assert_eq!(key_names(&["SORT", "l", "GET", "#", "ALPHA"]), ["l"]);
        assert_eq!(key_names(&["SORT", "l", "STORE"]), ["l"]);
        assert_eq!(key_names(&["SORT_RO", "l", "BY", "x"]), ["l"]);
        assert!(key_names(&["SORT"]).is_empty());

        // A command the table does not know (renamed, or a module's): words that take a secret.
        assert_eq!(
            describe(&["cfg-9f3a", "SET", "requirepass", "pw", "maxmemory", "1"]).secrets,
            [3, 4]
        );
        assert_eq!(
            describe(&["acl-x", "SETUSER", "bob", "on", ">pw", "#h"]).secrets,
            [4, 5]
        );
        assert_eq!(
            describe(&[
                "acl-x",
                "SETUSER",
                "u3",
                "(>Sekr1tSel +get)",
                "on >Sekr1tSpace",
                "+@all"
            ])
            .secrets,
            [3, 4]
        );
        assert_eq!(
            describe(&[
                "mig", "h", "1", "", "0", "5", "AUTH2", "u", "pw", "KEYS", "k"
            ])
            .secrets,
            [7, 8]
        );
        assert!(describe(&["FT.SEARCH", "idx", "hello"]).secrets.is_empty());

        // GEORADIUS: the last STORE/STOREDIST wins, as COMMAND GETKEYS says on 9.1.2 (QA).
        let geo = ["GEORADIUS", "geo", "0", "0", "1", "km"];
        let with = |extra: &[&'static str]| -> Vec<&'static str> {
            geo.iter().copied().chain(extra.iter().copied()).collect()
        };
        assert_eq!(
            key_names(&with(&["STORE", "a", "STORE", "b"])),
            ["geo", "b"]
        );
        assert_eq!(
            key_names(&with(&["STORE", "a2", "STOREDIST", "b2"])),
            ["geo", "b2"]
        );
        assert_eq!(key_names(&with(&["STORE", "store", "b"])), ["geo", "store"]);
        assert_eq!(key_names(&with(&["STORE"])), ["geo"]);
        assert_eq!(describe(&with(&["STOREDIST", "d"])).write_keys, 1);
        assert_eq!(
            key_names(&[
                "GEORADIUSBYMEMBER",
                "geo",
                "m",
                "1",
                "km",
                "STORE",
                "x",
                "STORE",
                "y"
            ]),
            ["geo", "y"]
        );
    }

    #[test]
    fn write_keys_counts() {
        // Keys past the arguments the parser kept still count as written (QA: MSET of 60,000
        // keys said keys_modified=50000).
        let kept = argv(&["MSET", "a", "1", "b", "2"]);
        let d = table().describe(&kept, 120_001);
        assert_eq!((d.keys.len(), d.write_keys), (2, 60_000));
        let kept = argv(&["DEL", "a", "b"]);
        assert_eq!(table().describe(&kept, 110_001).write_keys, 110_000);
        assert_eq!(describe(&["SET", "k", "v"]).write_keys, 1);
        assert_eq!(describe(&["GET", "k"]).write_keys, 0);
        assert_eq!(describe(&["MSET", "a", "1", "b", "2"]).write_keys, 2);
        assert_eq!(describe(&["DEL", "a", "b"]).write_keys, 2);
        assert_eq!(describe(&["ZUNIONSTORE", "d", "2", "a", "b"]).write_keys, 1);
        assert_eq!(describe(&["LMOVE", "a", "b", "LEFT", "LEFT"]).write_keys, 2);
        assert_eq!(describe(&["PFCOUNT", "a"]).write_keys, 0);
    }

    #[test]
    fn short_and_odd_argv_never_panics() {
        let t = table();
        let names: Vec<String> = t
            .commands
            .values()
            .flat_map(|c| {
                std::iter::once(c.name.to_string())
                    .chain(c.subcommands.values().map(|s| s.name.to_string()))
            })
            .collect();
        let fillers = [
            "", "0", "-1", "2", "STREAMS", "KEYS", "STORE", "AUTH", "FIELDS", "MAXLEN", "~", "x",
        ];
        for name in &names {
            let mut words: Vec<String> = name.split('|').map(str::to_string).collect();
            for n in 0..12 {
                let a: Vec<Arg> = words.iter().map(|w| Arg::new(w.as_bytes())).collect();
                for argc in [a.len() as u64, a.len() as u64 + 5, u64::MAX] {
                    let d = t.describe(&a, argc);
                    assert!(d.keys.iter().all(|&k| k < a.len()), "{name} {words:?}");
                    assert!(d.payload.is_none_or(|p| p < a.len()));
                    // (Keys past the kept arguments count as written without being listed.)
                    assert!(d.write_keys <= d.keys.len() || argc > a.len() as u64);
                    let _ = command_args(&d, &a, false, 1024);
                    let _ = command_args(&d, &a, false, 0);
                }
                words.push(fillers[n % fillers.len()].to_string());
            }
        }
    }

    #[test]
    fn payload_selection() {
        let p = |words: &[&str]| describe(words).payload.map(|i| words[i].to_string());
        assert_eq!(p(&["SET", "k", "v", "EX", "1"]).as_deref(), Some("v"));
        assert_eq!(p(&["SETEX", "k", "100", "val"]).as_deref(), Some("val"));
        assert_eq!(p(&["PSETEX", "k", "100", "val"]).as_deref(), Some("val"));
        assert_eq!(p(&["SETNX", "k", "val"]).as_deref(), Some("val"));
        assert_eq!(p(&["GETSET", "k", "val"]).as_deref(), Some("val"));
        assert_eq!(p(&["APPEND", "k", "val"]).as_deref(), Some("val"));
        assert_eq!(p(&["SETRANGE", "k", "3", "val"]).as_deref(), Some("val"));
        assert_eq!(
            p(&["HSET", "h", "f1", "v1", "f2", "v2"]).as_deref(),
            Some("v1")
        );
        assert_eq!(p(&["HSETNX", "h", "f1", "v1"]).as_deref(), Some("v1"));
        assert_eq!(p(&["HMSET", "h", "f1", "v1"]).as_deref(), Some("v1"));
        assert_eq!(
            p(&["HSETEX", "h", "FNX", "EX", "10", "FIELDS", "1", "f", "v"]).as_deref(),
            Some("v")
        );
        assert_eq!(
            p(&["HSETEX", "h", "EX", "10", "BOGUS", "1", "f", "v"]),
            None
        );
        assert_eq!(p(&["LPUSH", "l", "e1", "e2"]).as_deref(), Some("e1"));
        assert_eq!(p(&["RPUSH", "l", "e1"]).as_deref(), Some("e1"));
        assert_eq!(p(&["LSET", "l", "0", "e"]).as_deref(), Some("e"));
        assert_eq!(
            p(&["LINSERT", "l", "BEFORE", "piv", "e"]).as_deref(),
            Some("e")
        );
        assert_eq!(p(&["SADD", "s", "m1", "m2"]).as_deref(), Some("m1"));
        assert_eq!(p(&["ZADD", "z", "1", "m"]).as_deref(), Some("m"));
        assert_eq!(
            p(&["ZADD", "z", "NX", "CH", "1", "m", "2", "n"]).as_deref(),
            Some("m")
        );
        assert_eq!(
            p(&["GEOADD", "g", "XX", "13.3", "38.1", "palermo"]).as_deref(),
            Some("palermo")
        );
        assert_eq!(p(&["XADD", "s", "*", "f", "v"]).as_deref(), Some("v"));
        assert_eq!(
            p(&[
                "XADD",
                "s",
                "NOMKSTREAM",
                "MAXLEN",
                "~",
                "100",
                "LIMIT",
                "5",
                "*",
                "f",
                "v"
            ])
            .as_deref(),
            Some("v")
        );
        assert_eq!(
            p(&["XADD", "s", "MINID", "5", "1-1", "f", "v"]).as_deref(),
            Some("v")
        );
        assert_eq!(p(&["MSET", "a", "1", "b", "2"]).as_deref(), Some("1"));
        assert_eq!(p(&["EVAL", "return 1", "0"]).as_deref(), Some("return 1"));
        assert_eq!(p(&["GET", "k"]), None);
        assert_eq!(p(&["DEL", "k"]), None);
        assert_eq!(p(&["EXPIRE", "k", "100"]), None);
        assert_eq!(p(&["SET", "k"]), None);
        assert_eq!(p(&["XADD", "s", "*", "f"]), None);
    }

    #[test]
    fn key_op_layout() {
        assert_eq!(
            args_text(&["set", "user:1001", "hello"]),
            "key=user:1001 payload=hello"
        );
        assert_eq!(
            args_text(&["SETEX", "k", "100", "val"]),
            "key=k payload=val"
        );
        assert_eq!(
            args_text(&["HSET", "h:1", "f1", "v1", "f2", "v2"]),
            "key=h:1 payload=v1"
        );
        assert_eq!(
            args_text(&["MSET", "m1", "a", "m2", "b"]),
            "key=m1 payload=a"
        );
        assert_eq!(args_text(&["GET", "k"]), "key=k");
        assert_eq!(args_text(&["DEL", "a", "b"]), "key=a");
        assert_eq!(args_text(&["GET"]), "");
        let a = argv(&["SET", "k", "v"]);
        let d = table().describe(&a, 3);
        assert_eq!(command_args(&d, &a, true, 1024), b"key=k");
    }

    #[test]
    fn truncation_marker() {
        let big = "x".repeat(2000);
        let a = argv(&["SET", "big:1", &big]);
        let d = table().describe(&a, 3);
        let out = command_args(&d, &a, false, 1024);
        let expect = format!("key=big:1 payload={}...(truncated)", "x".repeat(1024));
        assert_eq!(String::from_utf8(out).unwrap(), expect);
        // A key is not cut below KEY_MIN_SHOWN bytes (payload_maxsize 0 hides values, not keys).
        let out = command_args(&d, &a, false, 3);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "key=big:1 payload=xxx...(truncated)"
        );
        let long_key = "k".repeat(300);
        let a = argv(&["SET", &long_key, "v"]);
        let out = command_args(&table().describe(&a, 3), &a, false, 0);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!(
                "key={}...(truncated) payload=...(truncated)",
                &long_key[..KEY_MIN_SHOWN]
            )
        );
        // Parser kept only a prefix: marked even though under the limit.
        let mut a = argv(&["SET", "k", "abc"]);
        a[2].len = 100_000;
        let out = command_args(&table().describe(&a, 3), &a, false, 1024);
        assert_eq!(out, b"key=k payload=abc...(truncated)");
        // Exactly at the limit: no marker.
        let a = argv(&["SET", "k", "abc"]);
        assert_eq!(
            command_args(&table().describe(&a, 3), &a, false, 3),
            b"key=k payload=abc"
        );
        // UTF-8 cut backs off to a character boundary.
        let a = argv(&["SET", "k", "ééé"]);
        assert_eq!(
            String::from_utf8(command_args(&table().describe(&a, 3), &a, false, 3)).unwrap(),
            "key=k payload=é...(truncated)"
        );
    }

    #[test]
    fn config_layout() {
        assert_eq!(
            args_text(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"]),
            "subcommand=SET param=maxmemory-policy"
        );
        assert_eq!(
            args_text(&["config", "get", "maxmemory"]),
            "subcommand=get param=maxmemory"
        );
        assert_eq!(args_text(&["CONFIG", "REWRITE"]), "subcommand=REWRITE");
        assert_eq!(
            args_text(&["CONFIG", "RESETSTAT", "x"]),
            "subcommand=RESETSTAT"
        );
        assert_eq!(args_text(&["CONFIG"]), "");
    }

    #[test]
    fn other_layout() {
        assert_eq!(args_text(&["PING"]), "");
        assert_eq!(args_text(&["INFO", "server"]), "arg1=server");
        assert_eq!(
            args_text(&[
                "ECHO",
                "#S02 create ACL users (note: ACL SETUSER args incl. password)"
            ]),
            "arg1=#S02 create ACL users (note: ACL SETUSER args incl..."
        );
        assert_eq!(
            args_text(&[
                "ACL", "SETUSER", "alice", "on", ">alicepw", "~*", "&*", "+@all"
            ]),
            "arg1=SETUSER arg2=alice arg3=on (and 4 more args)"
        );
        assert_eq!(
            args_text(&["HELLO", "3", "SETNAME", "c", "x"]),
            "arg1=3 arg2=SETNAME arg3=c (and 1 more args)"
        );
        assert_eq!(args_text(&["NOSUCHCOMMAND", "arg"]), "arg1=arg");
        // Parser kept fewer args than the request had.
        let a = argv(&["ECHO"]);
        let d = table().describe(&a, 6);
        assert_eq!(
            command_args(&d, &a, false, 1024),
            b"arg1=... arg2=... arg3=... (and 2 more args)"
        );
    }

    /// Every secret case: the secret bytes never appear in command_args, in any layout setting.
    #[test]
    fn secrets_never_in_command_args() {
        let cases: &[(&[&str], &str)] = &[
            (&["AUTH", "s3cret-pw"], "s3cret-pw"),
            (&["auth", "alice", "s3cret-pw"], "s3cret-pw"),
            (&["AUTH", "a", "b", "s3cret-pw"], "s3cret-pw"),
            (
                &["HELLO", "3", "AUTH", "alice", "s3cret-pw", "SETNAME", "c"],
                "s3cret-pw",
            ),
            (&["HELLO", "AUTH", "alice", "s3cret-pw"], "s3cret-pw"),
            (&["HELLO", "2", "AUTH", "s3cret-pw"], "s3cret-pw"),
            (&["ACL", "SETUSER", "bob", ">s3cret-pw"], "s3cret-pw"),
            (
                &[
                    "ACL",
                    "SETUSER",
                    "bob",
                    "on",
                    "<s3cret-pw",
                    "#s3cret-pw",
                    "!s3cret-pw",
                    ">s3cret-pw",
                ],
                "s3cret-pw",
            ),
            (&["acl", "setuser", ">s3cret-pw"], "s3cret-pw"),
            (&["ACL", "DRYRUN", "bob", "AUTH", "s3cret-pw"], "s3cret-pw"),
            (
                &[
                    "MIGRATE",
                    "h",
                    "1",
                    "",
                    "0",
                    "5",
                    "AUTH",
                    "s3cret-pw",
                    "KEYS",
                    "a",
                ],
                "s3cret-pw",
            ),
            (
                &[
                    "MIGRATE",
                    "h",
                    "1",
                    "k",
                    "0",
                    "5",
                    "COPY",
                    "AUTH2",
                    "user",
                    "s3cret-pw",
                ],
                "s3cret-pw",
            ),
            (&["CONFIG", "SET", "requirepass", "s3cret-pw"], "s3cret-pw"),
            (
                &["CONFIG", "SET", "maxmemory", "1", "MasterAuth", "s3cret-pw"],
                "s3cret-pw",
            ),
            (
                &[
                    "config",
                    "set",
                    "primaryauth",
                    "s3cret-pw",
                    "tls-key-file-pass",
                    "s3cret-pw",
                ],
                "s3cret-pw",
            ),
            (
                &["config", "set", "tls-client-key-file-pass", "s3cret-pw"],
                "s3cret-pw",
            ),
        ];
        let t = table();
        for (words, secret) in cases {
            let a = argv(words);
            let d = t.describe(&a, a.len() as u64);
            for (i, w) in words.iter().enumerate() {
                if w.contains(secret) {
                    assert!(
                        d.secrets.contains(&i),
                        "{words:?}: arg {i} not secret ({:?})",
                        d.secrets
                    );
                }
            }
            for disable in [false, true] {
                for max in [0, 3, 1024] {
                    let out = command_args(&d, &a, disable, max);
                    assert!(
                        !out.windows(secret.len()).any(|w| w == secret.as_bytes()),
                        "{words:?} leaked: {}",
                        String::from_utf8_lossy(&out)
                    );
                }
            }
            // Nothing that is not a secret is called one (but a malformed AUTH hides everything).
            // (CONFIG SET's words after a password are shown only once it succeeded.)
            if !(words[0] == "AUTH" && words.len() > 3) {
                assert!(
                    d.secrets
                        .iter()
                        .filter(|i| !d.shown_on_success.contains(i))
                        .all(|&i| words[i].contains(secret)),
                    "{words:?} {:?}",
                    d.secrets
                );
            }
        }
        assert_eq!(
            args_text(&["ACL", "SETUSER", "bob", ">pw"]),
            "arg1=SETUSER arg2=bob arg3=<REDACTED>"
        );
        assert_eq!(
            args_text(&["AUTH", "alice", "pw"]),
            "user=alice password=<REDACTED>"
        );
        assert_eq!(args_text(&["AUTH", "pw"]), "password=<REDACTED>");
        assert_eq!(
            args_text(&["HELLO", "3", "AUTH", "alice", "alicepw", "SETNAME", "c"]),
            "protover=3 user=alice password=<REDACTED>"
        );
        assert_eq!(
            args_text(&["HELLO", "AUTH", "alice", "pw"]),
            "user=alice password=<REDACTED>"
        );
        // The last AUTH option is the one Valkey tries (QA: the record named the first).
        assert_eq!(
            args_text(&["HELLO", "3", "AUTH", "alice", "x", "AUTH", "bob", "pw"]),
            "protover=3 user=bob password=<REDACTED>"
        );
        assert_eq!(
            args_text(&["HELLO", "3", "AUTH", "alice", "pw", "AUTH", "bob"]),
            "protover=3 user=alice password=<REDACTED>"
        );
        assert_eq!(
            args_text(&["CONFIG", "SET", "requirepass", "pw"]),
            "subcommand=SET param=requirepass"
        );
        // Every setting a CONFIG SET changes is named, never a value; GET keeps the module's one.
        assert_eq!(
            args_text(&[
                "CONFIG",
                "SET",
                "maxmemory-policy",
                "x",
                "requirepass",
                "pw"
            ]),
            "subcommand=SET param=maxmemory-policy param=requirepass"
        );
        assert_eq!(
            args_text(&["CONFIG", "GET", "a", "b"]),
            "subcommand=GET param=a"
        );
        let many: Vec<String> = (0..40)
            .flat_map(|i| [format!("p{i}"), "v".into()])
            .collect();
        let mut words = vec!["CONFIG", "SET"];
        words.extend(many.iter().map(String::as_str));
        let text = args_text(&words);
        assert!(text.ends_with(" param=p31 (and 8 more)"), "{text}");
        // resetpass and other rules are not secrets.
        assert!(
            describe(&["ACL", "SETUSER", "bob", "resetpass", "on"])
                .secrets
                .is_empty()
        );
        // Deeply nested DRYRUN: bounded, and still hides the tail.
        let mut words = Vec::new();
        for _ in 0..50 {
            words.extend(["ACL", "DRYRUN", "u"]);
        }
        words.extend(["AUTH", "s3cret-pw"]);
        let d = describe(&words);
        assert!(d.secrets.contains(&(words.len() - 1)));
    }

    #[test]
    fn secret_key_and_payload_hidden() {
        // A payload that is a secret is not shown (constructed: no real command has one).
        let a = argv(&["SET", "k", "pw"]);
        let mut d = table().describe(&a, 3);
        d.secrets = vec![1, 2];
        assert_eq!(command_args(&d, &a, false, 1024), b"key=<REDACTED>");
    }

    #[test]
    fn non_utf8_and_incomplete_args() {
        let mut a = vec![Arg::new(b"SET"), Arg::new(&[0xff, 0xfe]), Arg::new(b"v\n")];
        let d = table().describe(&a, 3);
        assert_eq!(
            command_args(&d, &a, false, 1024),
            b"key=\xff\xfe payload=v\n"
        );
        // A lost command name is unknown, not misread.
        a[0].lost = true;
        assert!(!table().describe(&a, 3).known);
        let d = table().describe(&[Arg::new(&[0xc3; 100])], 1);
        assert!(!d.known);
        assert_eq!(d.command.len(), 100);
    }
}
