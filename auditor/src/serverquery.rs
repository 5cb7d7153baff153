//! The auditor's own connection to the audited server, used only when the operator gives credentials:
//! `CLIENT LIST` tells which user each connection that existed before attach is authenticated as.
//! The session is told to ignore this connection, so it is never audited.

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

/// A command as a RESP multibulk request.
pub(crate) fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Read one reply: a simple string, an error, or a bulk string (all CLIENT LIST and AUTH return).
fn read_reply(r: &mut BufReader<TcpStream>) -> Result<Vec<u8>> {
    let mut line = Vec::new();
    r.read_until(b'\n', &mut line)?;
    let text = String::from_utf8_lossy(&line).trim_end().to_string();
    match text.as_bytes().first() {
        Some(b'+') => Ok(text.as_bytes()[1..].to_vec()),
        Some(b'-') => bail!("server answered: {}", &text[1..]),
        Some(b'$') => {
            let n: usize = text[1..].parse().context("bad bulk length from server")?;
            if n > 64 * 1024 * 1024 {
                bail!("CLIENT LIST reply too large ({n} bytes)");
            }
            let mut buf = vec![0u8; n + 2];
            r.read_exact(&mut buf)?;
            buf.truncate(n);
            Ok(buf)
        }
        _ => bail!("unexpected reply from server: {text}"),
    }
}

/// An open connection to the server, authenticated as the operator asked.
pub struct ServerConn {
    reader: BufReader<TcpStream>,
    pub local: SocketAddr,
}

impl ServerConn {
    pub fn connect(addr: SocketAddr, user: Option<&str>, password: &str) -> Result<Self> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connecting to the audited server at {addr}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let local = stream.local_addr()?;
        let mut conn = ServerConn {
            reader: BufReader::new(stream),
            local,
        };
        let auth = match user {
            Some(u) => encode(&[b"AUTH", u.as_bytes(), password.as_bytes()]),
            None => encode(&[b"AUTH", password.as_bytes()]),
        };
        conn.reader.get_mut().write_all(&auth)?;
        read_reply(&mut conn.reader).context("authenticating to the audited server")?;
        Ok(conn)
    }

    /// fd → user of every client of the server, from `CLIENT LIST`.
    pub fn users_by_fd(&mut self) -> Result<HashMap<u32, Vec<u8>>> {
        self.reader
            .get_mut()
            .write_all(&encode(&[b"CLIENT", b"LIST"]))?;
        let list = read_reply(&mut self.reader).context("CLIENT LIST")?;
        Ok(parse_client_list(&list))
    }
}

/// Parse `CLIENT LIST` lines (`id=3 addr=... fd=8 ... user=alice ...`) into fd → user.
pub fn parse_client_list(list: &[u8]) -> HashMap<u32, Vec<u8>> {
    let mut out = HashMap::new();
    for line in String::from_utf8_lossy(list).lines() {
        let mut fd = None;
        let mut user = None;
        for field in line.split(' ') {
            if let Some(v) = field.strip_prefix("fd=") {
                fd = v.parse::<i64>().ok().filter(|&f| f >= 0).map(|f| f as u32);
            } else if let Some(v) = field.strip_prefix("user=") {
                user = Some(v.as_bytes().to_vec());
            }
        }
        if let (Some(fd), Some(user)) = (fd, user) {
            out.insert(fd, user);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_client_list() {
        let list = b"id=3 addr=127.0.0.1:5000 laddr=127.0.0.1:6379 fd=8 name= age=1 user=alice lib-name=\nid=4 addr=/tmp/s:0 fd=-1 user=default\nid=5 addr=127.0.0.1:5001 fd=9 user=default\n";
        let m = parse_client_list(list);
        assert_eq!(m.get(&8).map(Vec::as_slice), Some(&b"alice"[..]));
        assert_eq!(m.get(&9).map(Vec::as_slice), Some(&b"default"[..]));
        assert_eq!(m.len(), 2);
    }
}
