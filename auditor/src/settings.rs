//! Every `audit.*` setting, with the Valkey Audit Module's names, values, defaults, ranges and error
//! texts (plus the auditor's own), parsed from a config file (`audit.<name> <value>` lines), from
//! trailing command-line pairs in the module's load-argument syntax, and from `CONFIG SET`.
//!
//! A `Settings` value is immutable once published: the control port builds a new one (all or nothing)
//! and [`SharedSettings`] swaps it in, so the capture thread sees a change on its very next event.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::clock::monotonic_ns;
use crate::filter::{
    CommandSet, CustomCategories, Events, ExcludeRules, FilterConfig, PrefixFilter, ResultMode,
};
use crate::format::Format;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Protocol {
    File(PathBuf),
    /// Facility name as given (`local0`, `daemon`, ...).
    Syslog(String),
    /// `tcp host:port`: the address lives in `TcpSettings` (the module's tcp_host / tcp_port).
    Tcp,
}

/// What the bounded queue between pipeline and sink does when full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overflow {
    /// Stop reading the ring buffer (the kernel then drops and counts: the server is never slowed).
    Block,
    /// Drop the newest records, counted.
    Drop,
}

/// Delivery settings (file rolling and retention, syslog, spool, queue).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliverySettings {
    pub roll_cycle: String,
    pub max_file_size: u64,
    pub max_log_size: u64,
    pub archive_command: String,
    pub max_archive_retries: u64,
    pub fsync: String,
    pub syslog_format: String,
    pub syslog_target: String,
    pub spool_dir: PathBuf,
    pub spool_max_size: u64,
    pub max_queue_size: u64,
    pub overflow: Overflow,
}

/// The module's TCP sink settings (accepted, validated and reported; the delivery issue uses them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpSettings {
    pub host: String,
    pub port: u16,
    pub timeout_ms: u64,
    pub retry_interval_ms: u64,
    pub max_retries: u64,
    pub reconnect_on_failure: bool,
    pub buffer_on_disconnect: bool,
}

#[derive(Clone, Debug)]
pub struct Settings {
    /// enabled, always_audit_config, events, excluderules, exclude_commands, prefix_filter,
    /// custom_category, command_result_mode: what the filter stage evaluates.
    pub filter: FilterConfig,
    pub protocol: Protocol,
    pub format: Format,
    pub payload_disable: bool,
    pub payload_maxsize: usize,
    pub ignore_internal_clients: bool,
    /// Kept for compatibility: the auditor reads auth results from replies and never waits.
    pub auth_result_check_delay_ms: u64,
    pub tcp: TcpSettings,
    /// Password of the control port ("" = none). Never shown by CONFIG GET.
    pub control_requirepass: String,
    pub delivery: DeliverySettings,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            filter: FilterConfig::default(),
            protocol: Protocol::File(PathBuf::from("/var/log/valkey/audit.log")),
            format: Format::Text,
            payload_disable: false,
            payload_maxsize: 1024,
            ignore_internal_clients: true,
            auth_result_check_delay_ms: 10,
            tcp: TcpSettings {
                host: "127.0.0.1".into(),
                port: 514,
                timeout_ms: 5000,
                retry_interval_ms: 1000,
                max_retries: 3,
                reconnect_on_failure: true,
                buffer_on_disconnect: true,
            },
            control_requirepass: String::new(),
            delivery: DeliverySettings {
                roll_cycle: "never".into(),
                max_file_size: 0,
                max_log_size: 0,
                archive_command: String::new(),
                max_archive_retries: 10,
                fsync: "everysec".into(),
                syslog_format: "rfc3164".into(),
                syslog_target: "local".into(),
                spool_dir: PathBuf::from("/var/spool/auditor"),
                spool_max_size: 1024 * 1024 * 1024,
                max_queue_size: 16 * 1024 * 1024,
                overflow: Overflow::Block,
            },
        }
    }
}

/// Every setting, in the order CONFIG GET and CONFIG REWRITE list them.
pub const SETTING_NAMES: &[&str] = &[
    "audit.enabled",
    "audit.always_audit_config",
    "audit.protocol",
    "audit.format",
    "audit.events",
    "audit.payload_disable",
    "audit.payload_maxsize",
    "audit.excluderules",
    "audit.exclude_commands",
    "audit.prefix_filter",
    "audit.custom_category",
    "audit.ignore_internal_clients",
    "audit.command_result_mode",
    "audit.auth_result_check_delay_ms",
    "audit.tcp_host",
    "audit.tcp_port",
    "audit.tcp_timeout_ms",
    "audit.tcp_retry_interval_ms",
    "audit.tcp_max_retries",
    "audit.tcp_reconnect_on_failure",
    "audit.tcp_buffer_on_disconnect",
    "audit.control_requirepass",
    "audit.roll_cycle",
    "audit.max_file_size",
    "audit.max_log_size",
    "audit.archive_command",
    "audit.max_archive_retries",
    "audit.fsync",
    "audit.syslog_format",
    "audit.syslog_target",
    "audit.spool_dir",
    "audit.spool_max_size",
    "audit.max_queue_size",
    "audit.overflow",
];

/// Settings whose value is a secret: never echoed, never written to a record.
pub fn is_secret(name: &str) -> bool {
    full_name(name) == "audit.control_requirepass"
}

/// A setting that could not be applied; `Display` reads like Valkey's CONFIG SET errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingError {
    pub name: String,
    pub message: String,
    /// The name is not a setting at all (Valkey words that error differently).
    pub unknown: bool,
}

/// A config file line that sets something wrong: where, and why (as Valkey reports its own config
/// file's errors, by line and text, QA: the message named neither).
#[derive(Debug)]
pub struct ConfigLineError {
    /// 1-based.
    pub line: usize,
    pub text: String,
    pub error: SettingError,
}

impl fmt::Display for ConfigLineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: '{}': {}", self.line, self.text, self.error)
    }
}

impl std::error::Error for ConfigLineError {}

impl fmt::Display for SettingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.unknown {
            write!(
                f,
                "Unknown option or number of arguments for CONFIG SET - '{}'",
                self.name
            )
        } else {
            write!(
                f,
                "CONFIG SET failed (possibly related to argument '{}') - {}",
                self.name, self.message
            )
        }
    }
}

impl std::error::Error for SettingError {}

fn err(name: &str, message: impl Into<String>) -> SettingError {
    SettingError {
        name: name.to_string(),
        message: message.into(),
        unknown: false,
    }
}

fn full_name(name: &str) -> String {
    let lower = name.to_ascii_lowercase();
    if lower.starts_with("audit.") {
        lower
    } else {
        format!("audit.{lower}")
    }
}

/// Whether a word after the first of a value is a setting name, known or not (`audit.formatt`
/// misspelt must be refused, not become part of the value before it): `audit.` and a bare
/// identifier. The first word of a value is always the value (`audit.excluderules audit.reader`),
/// and so is the path after `file` in `audit.protocol` (`file audit.log`).
fn looks_like_a_setting(name: &str, value_so_far: &[String], word: &str) -> bool {
    if name == "audit.protocol"
        && value_so_far.len() == 1
        && value_so_far[0].eq_ignore_ascii_case("file")
    {
        return false;
    }
    word.to_ascii_lowercase()
        .strip_prefix("audit.")
        .is_some_and(|rest| {
            !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        })
}

/// The setting a start-up argument names: `audit.<name>` of a known setting, the bare name (the
/// module's load arguments: `protocol file /x.log format json`), or one of the module's legacy
/// argument names (`tcp_timeout` for `audit.tcp_timeout_ms`, ...). `None` for any other word.
fn arg_setting_name(word: &str) -> Option<&'static str> {
    const LEGACY: &[(&str, &str)] = &[
        ("tcp_timeout", "audit.tcp_timeout_ms"),
        ("tcp_retry_interval", "audit.tcp_retry_interval_ms"),
        ("tcp_reconnect", "audit.tcp_reconnect_on_failure"),
        ("tcp_buffer", "audit.tcp_buffer_on_disconnect"),
    ];
    let lower = word.to_ascii_lowercase();
    if lower.starts_with("audit.") {
        return SETTING_NAMES.iter().copied().find(|&n| n == lower);
    }
    SETTING_NAMES
        .iter()
        .copied()
        .find(|n| n.strip_prefix("audit.") == Some(lower.as_str()))
        .or_else(|| {
            LEGACY
                .iter()
                .find(|(legacy, _)| *legacy == lower)
                .map(|&(_, n)| n)
        })
}

fn parse_bool(name: &str, v: &str) -> Result<bool, SettingError> {
    match v.to_ascii_lowercase().as_str() {
        "yes" => Ok(true),
        "no" => Ok(false),
        _ => Err(err(name, "argument must be 'yes' or 'no'")),
    }
}

fn yes_no(b: bool) -> String {
    if b { "yes".into() } else { "no".into() }
}

fn parse_range(name: &str, v: &str, min: u64, max: u64) -> Result<u64, SettingError> {
    let n = crate::commands::string2ll(v.as_bytes())
        .map(i128::from)
        .ok_or_else(|| err(name, "argument couldn't be parsed into an integer"))?;
    if n < min as i128 || n > max as i128 {
        return Err(err(
            name,
            format!("argument must be between {min} and {max} inclusive"),
        ));
    }
    Ok(n as u64)
}

impl Settings {
    /// Apply one setting written in a config file or on the command line: `name` may omit the
    /// `audit.` prefix (case-insensitive like Valkey), and the value is trimmed and may be quoted.
    pub fn apply(&mut self, name: &str, value: &str) -> Result<(), SettingError> {
        self.set(&full_name(name), unquote(value.trim()))
    }

    /// [`apply`](Self::apply) for the settings read at start, where what the module accepts must
    /// not stop the auditor (the server would go unaudited): an `audit.excluderules` entry with an
    /// invalid address is left out, as the module does, and said in `warnings`. (`CONFIG SET`
    /// refuses it with the error, so that an operator sees it at once.)
    fn apply_at_start(
        &mut self,
        name: &str,
        value: &str,
        warnings: &mut Vec<String>,
    ) -> Result<(), SettingError> {
        let full = full_name(name);
        if full != "audit.excluderules" {
            return self.apply(name, value);
        }
        let (rules, skipped) = ExcludeRules::parse_skipping_bad_addresses(&unquote(value.trim()))
            .map_err(|e| err(&full, e.0))?;
        warnings.extend(
            skipped
                .into_iter()
                .map(|e| format!("{full}: {}; left out, as the Valkey Audit Module does", e.0)),
        );
        self.filter.exclude_rules = rules;
        Ok(())
    }

    /// Set one setting to `value` as it is (CONFIG SET: Valkey keeps values verbatim). `full` is
    /// the lower-case `audit.<name>`.
    fn set(&mut self, full: &str, value: String) -> Result<(), SettingError> {
        let full = full.to_string();
        let ferr = |e: crate::filter::FilterError| err(&full, e.0);
        match full.as_str() {
            "audit.enabled" => self.filter.enabled = parse_bool(&full, &value)?,
            "audit.always_audit_config" => {
                self.filter.always_audit_config = parse_bool(&full, &value)?
            }
            "audit.protocol" => self.apply_protocol(&value)?,
            "audit.format" => {
                self.format = value.parse().map_err(|_| {
                    err(
                        &full,
                        "argument(s) must be one of the following: text, json, csv",
                    )
                })?
            }
            "audit.events" => self.filter.events = Events::parse(&value).map_err(ferr)?,
            "audit.payload_disable" => self.payload_disable = parse_bool(&full, &value)?,
            "audit.payload_maxsize" => {
                self.payload_maxsize =
                    parse_range(&full, &value, 0, i64::MAX as u64)?.min(usize::MAX as u64) as usize
            }
            "audit.excluderules" => {
                self.filter.exclude_rules = ExcludeRules::parse(&value).map_err(ferr)?
            }
            "audit.exclude_commands" => {
                self.filter.exclude_commands = CommandSet::parse(&value).map_err(ferr)?
            }
            "audit.prefix_filter" => {
                self.filter.prefix_filter = PrefixFilter::parse(&value).map_err(ferr)?
            }
            "audit.custom_category" => {
                let mut custom: CustomCategories = self.filter.custom.clone();
                custom.merge(&value).map_err(ferr)?;
                self.filter.custom = custom;
            }
            "audit.ignore_internal_clients" => {
                self.ignore_internal_clients = parse_bool(&full, &value)?
            }
            "audit.command_result_mode" => {
                self.filter.result_mode = ResultMode::parse(&value).map_err(|_| {
                    err(
                        &full,
                        "argument(s) must be one of the following: failures, all",
                    )
                })?
            }
            "audit.auth_result_check_delay_ms" => {
                self.auth_result_check_delay_ms = parse_range(&full, &value, 1, 1000)?
            }
            "audit.tcp_host" => {
                if value.is_empty() || value.contains(char::is_whitespace) {
                    return Err(err(&full, "argument must be a host name or address"));
                }
                self.tcp.host = value
            }
            "audit.tcp_port" => self.tcp.port = parse_range(&full, &value, 1, 65535)? as u16,
            "audit.tcp_timeout_ms" => self.tcp.timeout_ms = parse_range(&full, &value, 100, 60000)?,
            "audit.tcp_retry_interval_ms" => {
                self.tcp.retry_interval_ms = parse_range(&full, &value, 100, 300000)?
            }
            "audit.tcp_max_retries" => self.tcp.max_retries = parse_range(&full, &value, 0, 100)?,
            "audit.tcp_reconnect_on_failure" => {
                self.tcp.reconnect_on_failure = parse_bool(&full, &value)?
            }
            "audit.tcp_buffer_on_disconnect" => {
                self.tcp.buffer_on_disconnect = parse_bool(&full, &value)?
            }
            "audit.control_requirepass" => self.control_requirepass = value,
            "audit.roll_cycle" => {
                let v = value.to_ascii_lowercase();
                if !["never", "minutely", "hourly", "daily"].contains(&v.as_str()) {
                    return Err(err(
                        &full,
                        "argument(s) must be one of the following: never, minutely, hourly, daily",
                    ));
                }
                self.delivery.roll_cycle = v
            }
            "audit.max_file_size" => {
                self.delivery.max_file_size = parse_range(&full, &value, 0, i64::MAX as u64)?
            }
            "audit.max_log_size" => {
                self.delivery.max_log_size = parse_range(&full, &value, 0, i64::MAX as u64)?
            }
            "audit.archive_command" => {
                if !value.is_empty() && !value.contains("%path") {
                    return Err(err(&full, "argument must contain %path (the rolled file)"));
                }
                // (Double quotes group words: the file sink could not run it.)
                if value.matches('"').count() % 2 == 1 {
                    return Err(err(&full, "argument has an unclosed double quote"));
                }
                self.delivery.archive_command = value
            }
            "audit.max_archive_retries" => {
                self.delivery.max_archive_retries = parse_range(&full, &value, 0, 1000)?
            }
            "audit.fsync" => {
                let v = value.to_ascii_lowercase();
                if !["no", "everysec", "always"].contains(&v.as_str()) {
                    return Err(err(
                        &full,
                        "argument(s) must be one of the following: no, everysec, always",
                    ));
                }
                self.delivery.fsync = v
            }
            "audit.syslog_format" => {
                let v = value.to_ascii_lowercase();
                if !["rfc3164", "rfc5424"].contains(&v.as_str()) {
                    return Err(err(
                        &full,
                        "argument(s) must be one of the following: rfc3164, rfc5424",
                    ));
                }
                self.delivery.syslog_format = v
            }
            "audit.syslog_target" => {
                let v = value.trim().to_string();
                let ok = v.is_empty()
                    || v == "local"
                    || ["udp://", "tcp://"].iter().any(|p| {
                        v.strip_prefix(p)
                            .and_then(|hp| hp.rsplit_once(':'))
                            .is_some_and(|(h, port)| {
                                !h.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
                            })
                    });
                if !ok {
                    return Err(err(
                        &full,
                        "argument must be local, udp://host:port or tcp://host:port",
                    ));
                }
                self.delivery.syslog_target = if v.is_empty() { "local".into() } else { v }
            }
            "audit.spool_dir" => {
                if value.is_empty() {
                    return Err(err(&full, "argument must be a directory"));
                }
                self.delivery.spool_dir = PathBuf::from(value)
            }
            "audit.spool_max_size" => {
                self.delivery.spool_max_size = parse_range(&full, &value, 0, i64::MAX as u64)?
            }
            "audit.max_queue_size" => {
                self.delivery.max_queue_size =
                    parse_range(&full, &value, 64 * 1024, i64::MAX as u64)?
            }
            "audit.overflow" => {
                self.delivery.overflow = match value.to_ascii_lowercase().as_str() {
                    "block" => Overflow::Block,
                    "drop" => Overflow::Drop,
                    _ => {
                        return Err(err(
                            &full,
                            "argument(s) must be one of the following: block, drop",
                        ));
                    }
                }
            }
            _ => {
                return Err(SettingError {
                    name: full,
                    message: "unknown setting".into(),
                    unknown: true,
                });
            }
        }
        Ok(())
    }

    fn apply_protocol(&mut self, value: &str) -> Result<(), SettingError> {
        let name = "audit.protocol";
        let (kind, rest) = value
            .trim()
            .split_once(char::is_whitespace)
            .unwrap_or((value.trim(), ""));
        match kind.to_ascii_lowercase().as_str() {
            "file" => {
                let path = rest.trim();
                if path.is_empty() {
                    return Err(err(name, "file protocol needs a path: \"file <path>\""));
                }
                self.protocol = Protocol::File(PathBuf::from(path));
                Ok(())
            }
            "syslog" => {
                let facility = rest.trim().to_ascii_lowercase();
                let facility = if facility.is_empty() {
                    "local0".to_string()
                } else {
                    facility
                };
                crate::sink::syslog::parse_facility(&facility).map_err(|e| err(name, e))?;
                self.protocol = Protocol::Syslog(facility);
                Ok(())
            }
            "tcp" => {
                let addr = rest.trim();
                if addr.contains(char::is_whitespace) {
                    return Err(err(name, "tcp protocol needs \"tcp <host:port>\""));
                }
                if !addr.is_empty() {
                    let (host, port) = addr
                        .rsplit_once(':')
                        .ok_or_else(|| err(name, "tcp protocol needs \"tcp <host:port>\""))?;
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    let port: u16 = port
                        .parse()
                        .ok()
                        .filter(|p| *p > 0)
                        .ok_or_else(|| err(name, "tcp port must be between 1 and 65535"))?;
                    if host.is_empty() {
                        return Err(err(name, "tcp protocol needs \"tcp <host:port>\""));
                    }
                    self.tcp.host = host.to_string();
                    self.tcp.port = port;
                }
                self.protocol = Protocol::Tcp;
                Ok(())
            }
            _ => Err(err(
                name,
                "argument must be \"file <path>\", \"syslog <facility>\" or \"tcp <host:port>\"",
            )),
        }
    }

    /// Apply several settings all or nothing (CONFIG SET with several pairs): names in full
    /// (`audit.format`, any case), values as they are.
    pub fn apply_all(&self, pairs: &[(String, String)]) -> Result<Settings, SettingError> {
        let mut next = self.clone();
        for (name, value) in pairs {
            let full = name.to_ascii_lowercase();
            if !full.starts_with("audit.") {
                return Err(SettingError {
                    name: name.clone(),
                    message: "unknown setting".into(),
                    unknown: true,
                });
            }
            next.set(&full, value.clone()).map_err(|mut e| {
                if e.unknown {
                    // Valkey names an unknown parameter as it was typed.
                    e.name = name.clone();
                }
                e
            })?;
        }
        Ok(next)
    }

    /// The value as CONFIG GET shows it (secrets as "").
    pub fn get(&self, name: &str) -> Option<String> {
        let full = full_name(name);
        Some(match full.as_str() {
            "audit.enabled" => yes_no(self.filter.enabled),
            "audit.always_audit_config" => yes_no(self.filter.always_audit_config),
            "audit.protocol" => self.protocol_string(),
            "audit.format" => self.format.as_str().to_string(),
            "audit.events" => self.filter.events.render(),
            "audit.payload_disable" => yes_no(self.payload_disable),
            "audit.payload_maxsize" => self.payload_maxsize.to_string(),
            "audit.excluderules" => self.filter.exclude_rules.render(),
            "audit.exclude_commands" => self.filter.exclude_commands.render(),
            "audit.prefix_filter" => self.filter.prefix_filter.render(),
            "audit.custom_category" => self.filter.custom.render(),
            "audit.ignore_internal_clients" => yes_no(self.ignore_internal_clients),
            "audit.command_result_mode" => self.filter.result_mode.render().to_string(),
            "audit.auth_result_check_delay_ms" => self.auth_result_check_delay_ms.to_string(),
            "audit.tcp_host" => self.tcp.host.clone(),
            "audit.tcp_port" => self.tcp.port.to_string(),
            "audit.tcp_timeout_ms" => self.tcp.timeout_ms.to_string(),
            "audit.tcp_retry_interval_ms" => self.tcp.retry_interval_ms.to_string(),
            "audit.tcp_max_retries" => self.tcp.max_retries.to_string(),
            "audit.tcp_reconnect_on_failure" => yes_no(self.tcp.reconnect_on_failure),
            "audit.tcp_buffer_on_disconnect" => yes_no(self.tcp.buffer_on_disconnect),
            "audit.control_requirepass" => String::new(),
            "audit.roll_cycle" => self.delivery.roll_cycle.clone(),
            "audit.max_file_size" => self.delivery.max_file_size.to_string(),
            "audit.max_log_size" => self.delivery.max_log_size.to_string(),
            "audit.archive_command" => self.delivery.archive_command.clone(),
            "audit.max_archive_retries" => self.delivery.max_archive_retries.to_string(),
            "audit.fsync" => self.delivery.fsync.clone(),
            "audit.syslog_format" => self.delivery.syslog_format.clone(),
            "audit.syslog_target" => self.delivery.syslog_target.clone(),
            "audit.spool_dir" => self.delivery.spool_dir.display().to_string(),
            "audit.spool_max_size" => self.delivery.spool_max_size.to_string(),
            "audit.max_queue_size" => self.delivery.max_queue_size.to_string(),
            "audit.overflow" => match self.delivery.overflow {
                Overflow::Block => "block".into(),
                Overflow::Drop => "drop".into(),
            },
            _ => return None,
        })
    }

    /// The value as CONFIG REWRITE writes it to the config file (secrets included: the file is the
    /// operator's own, as Valkey does with requirepass).
    fn file_value(&self, name: &str) -> Option<String> {
        if name == "audit.control_requirepass" {
            return Some(self.control_requirepass.clone());
        }
        self.get(name)
    }

    /// Apply trailing command-line words in the module's load-argument syntax: a setting name
    /// (`audit.<name>`, the bare name, or a legacy one such as `tcp_timeout`) followed by its
    /// value. A value may span several words (`protocol file /x`); it runs until the next word
    /// that names a setting. A bare `payload_disable` with no value is the module's flag.
    /// Returns warnings about what was left out (see [`apply_at_start`](Self::apply_at_start)).
    pub fn apply_args(&mut self, words: &[String]) -> Result<Vec<String>, SettingError> {
        let mut warnings = Vec::new();
        let mut i = 0;
        while i < words.len() {
            let word = &words[i];
            let Some(name) = arg_setting_name(word) else {
                return Err(if word.to_ascii_lowercase().starts_with("audit.") {
                    SettingError {
                        name: word.clone(),
                        message: "unknown setting".into(),
                        unknown: true,
                    }
                } else {
                    err(word, "expected a setting name like audit.format")
                });
            };
            // A value runs to the next setting name: the module's `protocol file <path>` is two
            // words. A word that only looks like a name (`audit.reader` in excluderules, a log
            // file `audit.log`) is part of the value.
            let mut j = i + 1;
            while j < words.len()
                && arg_setting_name(&words[j]).is_none()
                && !(j > i + 1 && looks_like_a_setting(name, &words[i + 1..j], &words[j]))
            {
                j += 1;
            }
            if j == i + 1 {
                // The module's legacy `payload_disable` is a flag.
                if name == "audit.payload_disable" && !word.starts_with("audit.") {
                    self.apply(name, "yes")?;
                    i = j;
                    continue;
                }
                return Err(err(name, "missing value"));
            }
            // An option after the settings would otherwise become part of a value, and fail with
            // the setting's own error, which does not say why.
            if let Some(option) = words[i + 1..j]
                .iter()
                .find(|w| w.starts_with("--") && w.len() > 2)
            {
                return Err(err(
                    name,
                    format!("option {option} must come before the audit.* settings"),
                ));
            }
            let value = &words[i + 1..j];
            self.apply_at_start(name, &value.join(" "), &mut warnings)
                .map_err(|mut e| {
                    // `audit.fomat csv` after a value is taken as part of that value: say so.
                    if let Some(w) = value
                        .iter()
                        .find(|w| w.to_ascii_lowercase().starts_with("audit."))
                    {
                        e.message.push_str(&format!(
                            " ('{w}' is no setting, so it was read as part of the value)"
                        ));
                    }
                    e
                })?;
            i = j;
        }
        Ok(warnings)
    }

    /// Apply a config file: `audit.<name> <value>` lines; `#` comments and other lines are ignored
    /// (a file may be shared with valkey.conf). Returns warnings, as `apply_args`.
    pub fn apply_config_text(&mut self, text: &str) -> Result<Vec<String>, ConfigLineError> {
        let mut warnings = Vec::new();
        for (at, line) in text.lines().enumerate() {
            let line = line.trim();
            if let Some((name, value)) = setting_line(line) {
                self.apply_at_start(name, value, &mut warnings)
                    .map_err(|error| ConfigLineError {
                        line: at + 1,
                        text: line.to_string(),
                        error,
                    })?;
            }
        }
        Ok(warnings)
    }

    pub fn protocol_string(&self) -> String {
        match &self.protocol {
            Protocol::File(p) => format!("file {}", p.display()),
            Protocol::Syslog(f) => format!("syslog {f}"),
            Protocol::Tcp => {
                if self.tcp.host.contains(':') {
                    format!("tcp [{}]:{}", self.tcp.host, self.tcp.port)
                } else {
                    format!("tcp {}:{}", self.tcp.host, self.tcp.port)
                }
            }
        }
    }

    /// CONFIG REWRITE: the config file's text with every `audit.*` line set to the running value, in
    /// place; duplicates dropped; comments and unrelated lines kept; settings that differ from the
    /// defaults and have no line yet appended, under a `# Generated by CONFIG REWRITE` line unless
    /// the file has one already (Valkey keeps a single one, however often it rewrites).
    pub fn rewrite_config_text(&self, original: &[u8]) -> Vec<u8> {
        const HEADER: &str = "# Generated by CONFIG REWRITE";
        let defaults = Settings::default();
        let mut seen: Vec<String> = Vec::new();
        let mut out = Vec::with_capacity(original.len() + 256);
        // Lines that are not our settings go back byte for byte (a shared valkey.conf may hold
        // any bytes); a last line without its newline gets one.
        let body = original.strip_suffix(b"\n").unwrap_or(original);
        let lines = (!original.is_empty()).then(|| body.split(|&b| b == b'\n'));
        let mut header = false;
        for line in lines.into_iter().flatten() {
            let text = std::str::from_utf8(line).ok().map(str::trim);
            header |= text == Some(HEADER);
            match text.and_then(setting_line) {
                Some((name, _)) if SETTING_NAMES.contains(&full_name(name).as_str()) => {
                    let full = full_name(name);
                    if seen.contains(&full) {
                        continue;
                    }
                    seen.push(full.clone());
                    if let Some(v) = self.file_value(&full) {
                        out.extend_from_slice(format!("{full} {}\n", quote(&v)).as_bytes());
                    }
                }
                _ => {
                    out.extend_from_slice(line);
                    out.push(b'\n');
                }
            }
        }
        for name in SETTING_NAMES {
            if seen.iter().any(|s| s == name) {
                continue;
            }
            let (now, default) = (self.file_value(name), defaults.file_value(name));
            if now == default {
                continue;
            }
            if !header {
                out.extend_from_slice(HEADER.as_bytes());
                out.push(b'\n');
                header = true;
            }
            if let Some(v) = now {
                out.extend_from_slice(format!("{name} {}\n", quote(&v)).as_bytes());
            }
        }
        out
    }
}

/// `audit.<name> <value>` on a config line, or None.
fn setting_line(line: &str) -> Option<(&str, &str)> {
    if !line.to_ascii_lowercase().starts_with("audit.") {
        return None;
    }
    Some(line.split_once(char::is_whitespace).unwrap_or((line, "")))
}

/// A config-file value: in double quotes, Valkey's escapes (`\\ \" \n \r \t \a \b \xHH`) are
/// decoded, as `CONFIG REWRITE` writes them; in single quotes, nothing is.
fn unquote(v: &str) -> String {
    let b = v.as_bytes();
    if b.len() >= 2 && b[0] == b'\'' && b[b.len() - 1] == b'\'' {
        return v[1..v.len() - 1].to_string();
    }
    if !(b.len() >= 2 && b[0] == b'"' && b[b.len() - 1] == b'"') {
        return v.to_string();
    }
    let inner = &b[1..b.len() - 1];
    let mut out = Vec::with_capacity(inner.len());
    let mut i = 0;
    while i < inner.len() {
        let c = inner[i];
        let next = inner.get(i + 1).copied();
        let hex = |at: usize| {
            inner
                .get(at..at + 2)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        };
        match (c, next) {
            (b'\\', Some(b'x')) if hex(i + 2).is_some() => {
                out.extend(hex(i + 2));
                i += 4;
                continue;
            }
            (b'\\', Some(e @ (b'\\' | b'"' | b'n' | b'r' | b't' | b'a' | b'b'))) => {
                out.push(match e {
                    b'n' => b'\n',
                    b'r' => b'\r',
                    b't' => b'\t',
                    b'a' => 7,
                    b'b' => 8,
                    e => e,
                })
            }
            _ => {
                out.push(c);
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Quote a value for the config file when it is empty or has spaces or quotes.
/// Control characters are escaped as Valkey's `sdscatrepr` does, so a value never spans lines (a
/// newline in a CONFIG SET value wrote a second, forged setting line into the file).
fn quote(v: &str) -> String {
    let plain = |c: char| !(c.is_whitespace() || c.is_control() || matches!(c, '"' | '\'' | '\\'));
    if !v.is_empty() && v.chars().all(plain) {
        return v.to_string();
    }
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\x7f' => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The running settings, shared by the control port (writer) and the capture thread (reader).
/// Every change is kept with the kernel-clock time it took effect, so the pipeline, which may run
/// a little behind the server, judges each command by the settings in force when it was sent.
#[derive(Default)]
pub struct SharedSettings {
    current: Mutex<Arc<Settings>>,
    history: Mutex<Vec<(u64, Arc<Settings>)>>,
    version: AtomicU64,
}

/// Changes kept in the history; older ones are folded into the first entry.
const HISTORY_LEN: usize = 256;

impl SharedSettings {
    pub fn new(s: Settings) -> Self {
        let s = Arc::new(s);
        SharedSettings {
            current: Mutex::new(s.clone()),
            history: Mutex::new(vec![(0, s)]),
            version: AtomicU64::new(1),
        }
    }

    /// `(monotonic ns when it took effect, settings)` for recent changes, oldest first.
    pub fn history(&self) -> Vec<(u64, Arc<Settings>)> {
        self.history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn get(&self) -> Arc<Settings> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A number that changes whenever the settings do: one atomic load per event to notice a change.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Replace the settings with `f(current)` if it succeeds; nothing changes otherwise.
    pub fn update<E>(
        &self,
        f: impl FnOnce(&Settings) -> Result<Settings, E>,
    ) -> Result<Arc<Settings>, E> {
        let mut guard = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let next = Arc::new(f(&guard)?);
        *guard = next.clone();
        {
            let mut h = self.history.lock().unwrap_or_else(|p| p.into_inner());
            h.push((monotonic_ns(), next.clone()));
            if h.len() > HISTORY_LEN {
                // The oldest kept change becomes the base for everything before it.
                let excess = h.len() - HISTORY_LEN;
                h.drain(..excess);
                h[0].0 = 0;
            }
        }
        self.version.fetch_add(1, Ordering::AcqRel);
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CONFIG REWRITE's text for a UTF-8 file.
    fn rewrite(s: &Settings, original: &str) -> String {
        String::from_utf8(s.rewrite_config_text(original.as_bytes())).unwrap()
    }

    fn words(w: &[&str]) -> Vec<String> {
        w.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn an_option_after_the_settings_is_named() {
        let mut s = Settings::default();
        let words: Vec<String> = [
            "audit.command_result_mode",
            "all",
            "--capture-cap",
            "8388608",
        ]
        .iter()
        .map(|w| w.to_string())
        .collect();
        let e = s.apply_args(&words).unwrap_err().to_string();
        assert!(
            e.contains("option --capture-cap must come before the audit.* settings"),
            "{e}"
        );
    }

    #[test]
    fn trailing_pairs_in_module_syntax() {
        let mut s = Settings::default();
        s.apply_args(&words(&[
            "audit.protocol",
            "file /tmp/a.log",
            "audit.format",
            "json",
        ]))
        .unwrap();
        assert_eq!(s.protocol, Protocol::File("/tmp/a.log".into()));
        assert_eq!(s.format, Format::Json);
        s.apply_args(&words(&[
            "audit.protocol",
            "file",
            "/tmp/b.log",
            "audit.events",
            "auth,config",
        ]))
        .unwrap();
        assert_eq!(s.protocol, Protocol::File("/tmp/b.log".into()));
        assert_eq!(s.get("audit.events").unwrap(), "auth,config");
    }

    #[test]
    fn module_load_arguments_without_the_prefix_and_legacy_names() {
        // The module's `--loadmodule ... protocol file <path> format json events keys,auth`.
        let mut s = Settings::default();
        s.apply_args(&words(&[
            "protocol",
            "file",
            "/tmp/c.log",
            "format",
            "json",
            "events",
            "keys,auth",
            "tcp_timeout",
            "700",
            "tcp_reconnect",
            "no",
            "payload_disable",
            "command_result_mode",
            "failures",
        ]))
        .unwrap();
        assert_eq!(s.protocol, Protocol::File("/tmp/c.log".into()));
        assert_eq!(s.format, Format::Json);
        assert_eq!(s.get("audit.events").unwrap(), "auth,keys");
        assert_eq!(s.get("audit.tcp_timeout_ms").unwrap(), "700");
        assert_eq!(s.get("audit.tcp_reconnect_on_failure").unwrap(), "no");
        assert!(s.payload_disable);
        assert_eq!(s.get("audit.command_result_mode").unwrap(), "failures");
        // The prefixed form still needs its value.
        let e = s
            .apply_args(&words(&["audit.payload_disable"]))
            .unwrap_err();
        assert!(e.to_string().contains("missing value"), "{e}");
    }

    #[test]
    fn a_value_word_that_only_looks_like_a_setting_is_part_of_the_value() {
        let mut s = Settings::default();
        s.apply_args(&words(&[
            "audit.excluderules",
            "audit.reader,bob",
            "audit.protocol",
            "file",
            "audit.log",
        ]))
        .unwrap();
        assert_eq!(s.get("audit.excluderules").unwrap(), "audit.reader,bob");
        assert_eq!(s.protocol, Protocol::File("audit.log".into()));
        // A misspelt name after a value: the error says how it was read.
        let e = s
            .apply_args(&words(&["audit.format", "json", "audit.fomat", "csv"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("'audit.fomat'"), "{e}");
        // Also after a value taken as it is (QA: the file became "x.log audit.formatt json").
        for first in [
            "audit.protocol",
            "audit.control_requirepass",
            "audit.spool_dir",
        ] {
            let value = if first == "audit.protocol" {
                "file /tmp/x.log"
            } else {
                "v"
            };
            let e = s
                .apply_args(&words(&[first, value, "audit.formatt", "json"]))
                .unwrap_err()
                .to_string();
            assert!(e.contains("'audit.formatt'"), "{first}: {e}");
        }
        let e = s
            .apply_args(&words(&["audit.fomat", "csv"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("'audit.fomat'"), "{e}");
        let e = s.apply_args(&words(&["json"])).unwrap_err().to_string();
        assert!(e.contains("expected a setting name"), "{e}");
    }

    #[test]
    fn config_file_lines_and_quotes() {
        let mut s = Settings::default();
        s.apply_config_text(
            "# c\nport 6379\naudit.protocol \"file /x/y.log\"\naudit.payload_maxsize 10\naudit.payload_disable yes\n",
        )
        .unwrap();
        assert_eq!(s.protocol, Protocol::File("/x/y.log".into()));
        assert_eq!(s.payload_maxsize, 10);
        assert!(s.payload_disable);
    }

    #[test]
    fn a_bad_config_file_line_is_named_by_number_and_text() {
        let mut s = Settings::default();
        let e = s
            .apply_config_text("# c\nport 6379\n\naudit.format json\naudit.payload_maxsize abc\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("line 5: 'audit.payload_maxsize abc': "),
            "{e}"
        );
        assert!(e.contains("payload_maxsize"), "{e}");
    }

    #[test]
    fn every_setting_round_trips_through_get() {
        let s = Settings::default();
        for name in SETTING_NAMES {
            let v = s.get(name).unwrap_or_else(|| panic!("{name} has no value"));
            let mut t = s.clone();
            if !is_secret(name) {
                t.apply(name, &v)
                    .unwrap_or_else(|e| panic!("{name}={v:?}: {e}"));
                assert_eq!(t.get(name).unwrap(), v, "{name}");
            }
        }
    }

    #[test]
    fn bad_values_are_refused_with_valkey_style_errors() {
        let mut s = Settings::default();
        let e = s.apply("audit.format", "xml").unwrap_err();
        assert_eq!(
            e.to_string(),
            "CONFIG SET failed (possibly related to argument 'audit.format') - argument(s) must be one of the following: text, json, csv"
        );
        assert_eq!(
            s.apply("audit.tcp_port", "70000").unwrap_err().to_string(),
            "CONFIG SET failed (possibly related to argument 'audit.tcp_port') - argument must be between 1 and 65535 inclusive"
        );
        assert_eq!(
            s.apply("audit.enabled", "maybe").unwrap_err().to_string(),
            "CONFIG SET failed (possibly related to argument 'audit.enabled') - argument must be 'yes' or 'no'"
        );
        assert_eq!(
            s.apply("audit.nope", "1").unwrap_err().to_string(),
            "Unknown option or number of arguments for CONFIG SET - 'audit.nope'"
        );
        assert!(s.apply("audit.auth_result_check_delay_ms", "0").is_err());
        assert!(s.apply("audit.payload_maxsize", "-1").is_err());
    }

    #[test]
    fn apply_all_is_all_or_nothing() {
        let s = Settings::default();
        let pairs = vec![
            ("audit.format".to_string(), "json".to_string()),
            ("audit.tcp_port".to_string(), "0".to_string()),
        ];
        assert!(s.apply_all(&pairs).is_err());
        assert_eq!(s.format, Format::Text);
        let ok = s.apply_all(&pairs[..1]).unwrap();
        assert_eq!(ok.format, Format::Json);
    }

    #[test]
    fn secret_is_never_echoed() {
        let mut s = Settings::default();
        s.apply("audit.control_requirepass", "hunter2").unwrap();
        assert_eq!(s.get("audit.control_requirepass").unwrap(), "");
        assert!(is_secret("AUDIT.CONTROL_REQUIREPASS"));
    }

    #[test]
    fn rewrite_keeps_comments_and_unrelated_lines() {
        let mut s = Settings::default();
        s.apply("audit.format", "json").unwrap();
        s.apply("audit.tcp_port", "1514").unwrap();
        s.apply("audit.protocol", "file /var/log/a b.log").unwrap();
        let original = "# my comment\nport 6379\naudit.format text\naudit.format csv\n\n# end\n";
        let text = rewrite(&s, original);
        assert!(
            text.starts_with("# my comment\nport 6379\naudit.format json\n\n# end\n"),
            "{text}"
        );
        assert!(text.contains("audit.tcp_port 1514\n"));
        assert!(text.contains("audit.protocol \"file /var/log/a b.log\"\n"));
        let mut back = Settings::default();
        back.apply_config_text(&text).unwrap();
        for name in SETTING_NAMES {
            assert_eq!(back.get(name), s.get(name), "{name}");
        }
    }

    #[test]
    fn a_value_with_control_characters_stays_on_its_line_when_rewritten() {
        // A newline in a CONFIG SET value wrote a second, forged setting line into the file.
        let pairs = [(
            "audit.archive_command".to_string(),
            "/bin/true %path\naudit.enabled\x0cno \"q\" \\ \t".to_string(),
        )];
        let s = Settings::default().apply_all(&pairs).unwrap();
        let text = rewrite(&s, "");
        assert_eq!(
            text.lines().filter(|l| l.starts_with("audit.")).count(),
            1,
            "{text}"
        );
        let mut back = Settings::default();
        back.apply_config_text(&text).unwrap();
        assert_eq!(
            back.get("audit.archive_command"),
            s.get("audit.archive_command")
        );
        assert_eq!(back.get("audit.enabled").as_deref(), Some("yes"));
    }

    #[test]
    fn config_set_values_are_kept_as_they_are() {
        let set = |name: &str, value: &str| {
            Settings::default().apply_all(&[(name.to_string(), value.to_string())])
        };
        let s = set("audit.control_requirepass", "'quoted pw'").unwrap();
        assert_eq!(s.control_requirepass, "'quoted pw'");
        // Numbers as Valkey parses them: no blanks.
        assert!(set("audit.payload_maxsize", " 12").is_err());
        // ... nor leading zeros, `-0` or more than 64 bits (Valkey's `string2ll`; QA).
        let not_int = "argument couldn't be parsed into an integer";
        for v in [
            "05",
            "00",
            "-0",
            "+5",
            "",
            "-",
            "99999999999999999999",
            "1e3",
        ] {
            let e = set("audit.payload_maxsize", v).unwrap_err();
            assert!(e.to_string().ends_with(not_int), "{v:?}: {e}");
        }
        for v in ["0", "5", "9223372036854775807"] {
            assert!(set("audit.payload_maxsize", v).is_ok(), "{v:?}");
        }
        let e = set("audit.tcp_port", "-5").unwrap_err();
        assert!(
            e.to_string().ends_with("between 1 and 65535 inclusive"),
            "{e}"
        );
        // An unknown name as typed, as Valkey echoes it.
        let e = set("AUDIT.NoSuch", "1").unwrap_err();
        assert_eq!(
            e.to_string(),
            "Unknown option or number of arguments for CONFIG SET - 'AUDIT.NoSuch'"
        );
        // Only full names, as the module registers them.
        let e = set("enabled", "yes").unwrap_err();
        assert_eq!(
            e.to_string(),
            "Unknown option or number of arguments for CONFIG SET - 'enabled'"
        );
        assert!(set("AUDIT.Enabled", "no").is_ok());
        // A word after the address is no part of it.
        let e = set("audit.protocol", "tcp 127.0.0.1:7531 extra").unwrap_err();
        assert!(
            e.to_string()
                .ends_with("tcp protocol needs \"tcp <host:port>\""),
            "{e}"
        );
        // An archive command the file sink could not split.
        let e = set("audit.archive_command", "/bin/echo \"%path").unwrap_err();
        assert!(e.to_string().contains("unclosed double quote"), "{e}");
        // Config files still take quoted values.
        let mut f = Settings::default();
        f.apply_config_text("audit.control_requirepass \"a b\"\n")
            .unwrap();
        assert_eq!(f.control_requirepass, "a b");
    }

    #[test]
    fn rewrite_keeps_lines_that_are_not_utf8_or_end_in_crlf_byte_for_byte() {
        // QA: a byte that is not UTF-8 anywhere in a shared valkey.conf made the rewrite read an
        // empty file and write back only the audit lines.
        let mut s = Settings::default();
        s.apply("audit.format", "json").unwrap();
        let original = b"# caf\xe9\r\nport 6379\r\naudit.format text\r\nmaxmemory 2gb";
        assert_eq!(
            s.rewrite_config_text(original),
            b"# caf\xe9\r\nport 6379\r\naudit.format json\nmaxmemory 2gb\n"
        );
        assert_eq!(
            s.rewrite_config_text(b""),
            b"# Generated by CONFIG REWRITE\naudit.format json\n"
        );
    }

    #[test]
    fn rewriting_again_keeps_a_single_generated_header() {
        let mut s = Settings::default();
        s.apply("audit.format", "json").unwrap();
        let original = "# my comment\nport 6379\n";
        let once = rewrite(&s, original);
        assert_eq!(
            once,
            "# my comment\nport 6379\n# Generated by CONFIG REWRITE\naudit.format json\n"
        );
        assert_eq!(rewrite(&s, &once), once);
        // A setting changed between rewrites joins the generated lines under the same header.
        s.apply("audit.tcp_port", "1514").unwrap();
        let twice = rewrite(&s, &once);
        s.apply("audit.fsync", "always").unwrap();
        let thrice = rewrite(&s, &twice);
        assert_eq!(
            thrice,
            "# my comment\nport 6379\n# Generated by CONFIG REWRITE\naudit.format json\n\
             audit.tcp_port 1514\naudit.fsync always\n"
        );
        assert_eq!(rewrite(&s, &thrice), thrice);
    }

    #[test]
    fn shared_settings_version_changes_only_on_success() {
        let shared = SharedSettings::new(Settings::default());
        let v = shared.version();
        let r: Result<_, SettingError> =
            shared.update(|s| s.apply_all(&[("audit.format".into(), "bad".into())]));
        assert!(r.is_err());
        assert_eq!(shared.version(), v);
        shared
            .update(|s| s.apply_all(&[("audit.format".into(), "csv".into())]))
            .unwrap();
        assert_ne!(shared.version(), v);
        assert_eq!(shared.get().format, Format::Csv);
    }
}
