//! The `audit.*` settings this build supports, with the Valkey Audit Module's names, values and
//! defaults, parsed from a config file (`audit.<name> <value>` lines) and from trailing command-line
//! pairs in the module's load-argument syntax.

use std::fmt;
use std::path::PathBuf;

use crate::format::Format;

/// Event classes of `audit.events`, as the module spells them.
pub const EVENT_CONNECTIONS: u8 = 1 << 0;
pub const EVENT_AUTH: u8 = 1 << 1;
pub const EVENT_CONFIG: u8 = 1 << 2;
pub const EVENT_KEYS: u8 = 1 << 3;
pub const EVENT_OTHER: u8 = 1 << 4;
pub const EVENT_ALL: u8 = 0x1f;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Protocol {
    File(PathBuf),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub enabled: bool,
    pub protocol: Protocol,
    pub format: Format,
    pub events: u8,
    pub payload_disable: bool,
    pub payload_maxsize: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            enabled: true,
            protocol: Protocol::File(PathBuf::from("/var/log/valkey/audit.log")),
            format: Format::Text,
            events: EVENT_ALL,
            payload_disable: false,
            payload_maxsize: 1024,
        }
    }
}

/// A setting that could not be applied; the message reads like Valkey's CONFIG errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingError {
    pub name: String,
    pub message: String,
}

impl fmt::Display for SettingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CONFIG SET failed (possibly related to argument '{}') - {}",
            self.name, self.message
        )
    }
}

impl std::error::Error for SettingError {}

fn err(name: &str, message: impl Into<String>) -> SettingError {
    SettingError {
        name: name.to_string(),
        message: message.into(),
    }
}

fn parse_bool(name: &str, v: &str) -> Result<bool, SettingError> {
    match v.to_ascii_lowercase().as_str() {
        "yes" | "1" | "true" | "on" => Ok(true),
        "no" | "0" | "false" | "off" => Ok(false),
        _ => Err(err(name, "argument must be 'yes' or 'no'")),
    }
}

/// Parse `audit.events`: a comma list of connections, auth, config, keys, other, or all / none.
pub fn parse_events(v: &str) -> Result<u8, SettingError> {
    let mut mask = 0u8;
    for word in v.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        mask |= match word.to_ascii_lowercase().as_str() {
            "all" => EVENT_ALL,
            "none" => 0,
            "connections" | "connection" => EVENT_CONNECTIONS,
            "auth" => EVENT_AUTH,
            "config" => EVENT_CONFIG,
            "keys" => EVENT_KEYS,
            "other" => EVENT_OTHER,
            _ => {
                return Err(err(
                    "audit.events",
                    format!(
                        "unknown event type '{word}': must be a comma list of connections, auth, config, keys, other, all, none"
                    ),
                ));
            }
        };
    }
    Ok(mask)
}

pub fn render_events(mask: u8) -> String {
    if mask == EVENT_ALL {
        return "all".into();
    }
    if mask == 0 {
        return "none".into();
    }
    let names = [
        (EVENT_CONNECTIONS, "connections"),
        (EVENT_AUTH, "auth"),
        (EVENT_CONFIG, "config"),
        (EVENT_KEYS, "keys"),
        (EVENT_OTHER, "other"),
    ];
    names
        .iter()
        .filter(|(bit, _)| mask & bit != 0)
        .map(|(_, n)| *n)
        .collect::<Vec<_>>()
        .join(",")
}

impl Settings {
    /// Apply one `audit.<name> <value>` pair. `name` may be given with or without the `audit.` prefix.
    pub fn apply(&mut self, name: &str, value: &str) -> Result<(), SettingError> {
        let short = name
            .strip_prefix("audit.")
            .unwrap_or(name)
            .to_ascii_lowercase();
        let full = format!("audit.{short}");
        let value = unquote(value.trim());
        match short.as_str() {
            "enabled" => self.enabled = parse_bool(&full, &value)?,
            "protocol" => self.protocol = parse_protocol(&value)?,
            "format" => {
                self.format = value.parse().map_err(|_| {
                    err(
                        &full,
                        "argument(s) must be one of the following: text, json, csv",
                    )
                })?
            }
            "events" => self.events = parse_events(&value)?,
            "payload_disable" => self.payload_disable = parse_bool(&full, &value)?,
            "payload_maxsize" => {
                self.payload_maxsize = value
                    .parse::<u64>()
                    .map_err(|_| err(&full, "argument couldn't be parsed into an integer"))?
                    .min(usize::MAX as u64) as usize
            }
            _ => return Err(err(&full, format!("unknown setting 'audit.{short}'"))),
        }
        Ok(())
    }

    /// Apply trailing command-line words: `audit.<name>` followed by its value. A value may span
    /// several words (`audit.protocol file /x`); it runs until the next `audit.` word.
    pub fn apply_args(&mut self, words: &[String]) -> Result<(), SettingError> {
        let mut i = 0;
        while i < words.len() {
            let name = &words[i];
            if !name.starts_with("audit.") {
                return Err(err(name, "expected a setting name like audit.format"));
            }
            let mut j = i + 1;
            while j < words.len() && !words[j].starts_with("audit.") {
                j += 1;
            }
            if j == i + 1 {
                return Err(err(name, "missing value"));
            }
            self.apply(name, &words[i + 1..j].join(" "))?;
            i = j;
        }
        Ok(())
    }

    /// Apply a config file: `audit.<name> <value>` lines; `#` comments and other lines are ignored
    /// (a file may be shared with other tools).
    pub fn apply_config_text(&mut self, text: &str) -> Result<(), SettingError> {
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || !line.starts_with("audit.") {
                continue;
            }
            let (name, value) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            self.apply(name, value)?;
        }
        Ok(())
    }

    pub fn protocol_string(&self) -> String {
        match &self.protocol {
            Protocol::File(p) => format!("file {}", p.display()),
        }
    }
}

fn unquote(v: &str) -> String {
    let b = v.as_bytes();
    if b.len() >= 2
        && ((b[0] == b'"' && b[b.len() - 1] == b'"') || (b[0] == b'\'' && b[b.len() - 1] == b'\''))
    {
        v[1..v.len() - 1].to_string()
    } else {
        v.to_string()
    }
}

fn parse_protocol(v: &str) -> Result<Protocol, SettingError> {
    let (kind, rest) = v
        .trim()
        .split_once(char::is_whitespace)
        .unwrap_or((v.trim(), ""));
    match kind.to_ascii_lowercase().as_str() {
        "file" => {
            let path = rest.trim();
            if path.is_empty() {
                return Err(err(
                    "audit.protocol",
                    "file protocol needs a path: \"file <path>\"",
                ));
            }
            Ok(Protocol::File(PathBuf::from(path)))
        }
        "syslog" | "tcp" => Err(err(
            "audit.protocol",
            format!("protocol '{kind}' is not supported by this build yet; use \"file <path>\""),
        )),
        _ => Err(err(
            "audit.protocol",
            "argument must be \"file <path>\", \"syslog <facility>\" or \"tcp <host:port>\"",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_pairs_in_module_syntax() {
        let mut s = Settings::default();
        let words: Vec<String> = ["audit.protocol", "file /tmp/a.log", "audit.format", "json"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        s.apply_args(&words).unwrap();
        assert_eq!(s.protocol, Protocol::File("/tmp/a.log".into()));
        assert_eq!(s.format, Format::Json);
        let words: Vec<String> = [
            "audit.protocol",
            "file",
            "/tmp/b.log",
            "audit.events",
            "auth,config",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        s.apply_args(&words).unwrap();
        assert_eq!(s.protocol, Protocol::File("/tmp/b.log".into()));
        assert_eq!(s.events, EVENT_AUTH | EVENT_CONFIG);
    }

    #[test]
    fn config_file_lines_and_quotes() {
        let mut s = Settings::default();
        s.apply_config_text("# c\nport 6379\naudit.protocol \"file /x/y.log\"\naudit.payload_maxsize 10\naudit.payload_disable yes\n")
            .unwrap();
        assert_eq!(s.protocol, Protocol::File("/x/y.log".into()));
        assert_eq!(s.payload_maxsize, 10);
        assert!(s.payload_disable);
    }

    #[test]
    fn bad_values_are_refused_with_valkey_style_errors() {
        let mut s = Settings::default();
        let e = s.apply("audit.format", "xml").unwrap_err();
        assert_eq!(
            e.to_string(),
            "CONFIG SET failed (possibly related to argument 'audit.format') - argument(s) must be one of the following: text, json, csv"
        );
        assert!(s.apply("audit.events", "keys,bogus").is_err());
        assert!(s.apply("audit.enabled", "maybe").is_err());
        assert!(s.apply("audit.nope", "1").is_err());
        assert_eq!(s, Settings::default());
    }

    #[test]
    fn events_render() {
        assert_eq!(render_events(EVENT_ALL), "all");
        assert_eq!(render_events(0), "none");
        assert_eq!(render_events(EVENT_AUTH | EVENT_KEYS), "auth,keys");
        assert_eq!(parse_events("none").unwrap(), 0);
    }
}
