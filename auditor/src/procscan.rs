//! Finding a target's sockets in /proc: client connections that were open before the auditor
//! attached, and the listening unix sockets (to name unix clients by their socket path).

use std::collections::HashMap;
use std::fs;
use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Context as _, Result};

use crate::session::Peer;

/// An established client connection of the target, by fd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExistingConn {
    pub fd: u32,
    /// The socket's inode number.
    pub ino: u64,
    pub peer: Peer,
}

/// The path (in its own mount namespace) of the C library `pid` has mapped, if any.
pub fn mapped_libc(pid: u32) -> Option<String> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    libc_in_maps(&maps)
}

fn libc_in_maps(maps: &str) -> Option<String> {
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| {
            let name = path.rsplit('/').next().unwrap_or("");
            name.starts_with("libc.so") || (name.starts_with("libc-") && name.ends_with(".so"))
        })
        .map(str::to_string)
}

/// The inode number of the socket `pid` holds at `fd`: `Ok(None)` when the fd is closed or holds
/// something else, an error when `/proc` could not tell (no such process, no permission).
pub fn socket_at(pid: u32, fd: u32) -> std::io::Result<Option<u64>> {
    let target = match fs::read_link(format!("/proc/{pid}/fd/{fd}")) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && process_exists(pid) => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    Ok(target
        .to_str()
        .and_then(|t| t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()))
}

/// Whether the sockets `pid` holds can be read: `/proc/<pid>/fd` listed and an entry's target
/// read. For a server run by another user, both need privileges (see `privileges`); without them
/// its listening ports and open connections are unknown.
pub fn fd_access(pid: u32) -> std::io::Result<()> {
    let dir = format!("/proc/{pid}/fd");
    if let Some(entry) = fs::read_dir(&dir)?.next() {
        fs::read_link(entry?.path())?;
    }
    Ok(())
}

fn process_exists(pid: u32) -> bool {
    fs::metadata(format!("/proc/{pid}/fd")).is_ok()
}

/// The inode number of the socket `pid` holds at `fd`, if it holds one.
pub fn socket_inode(pid: u32, fd: u32) -> Option<u64> {
    socket_at(pid, fd).ok().flatten()
}

/// Whether `pid`'s `fd` still holds socket `ino` (false once it is closed or holds another file).
pub fn fd_holds_socket(pid: u32, fd: u32, ino: u64) -> bool {
    socket_inode(pid, fd) == Some(ino)
}

/// Map of socket inode → fd for every socket the process holds.
fn socket_fds(pid: u32) -> Result<HashMap<u64, u32>> {
    let dir = format!("/proc/{pid}/fd");
    let mut map = HashMap::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let Ok(entry) = entry else { continue };
        let Ok(target) = fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.to_string_lossy();
        if let Some(inode) = target
            .strip_prefix("socket:[")
            .and_then(|s| s.strip_suffix(']'))
            && let (Ok(inode), Ok(fd)) = (
                inode.parse::<u64>(),
                entry.file_name().to_string_lossy().parse::<u32>(),
            )
        {
            map.insert(inode, fd);
        }
    }
    Ok(map)
}

/// Parse one `/proc/net/tcp{,6}` address `HEX:PORT` (addresses in the kernel's in-memory order).
fn parse_addr(s: &str) -> Option<(Vec<u8>, u16)> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    // Each 32-bit word is printed as a host-order (little-endian here) integer.
    for word in addr.as_bytes().chunks(8) {
        let w = u32::from_str_radix(std::str::from_utf8(word).ok()?, 16).ok()?;
        bytes.extend_from_slice(&w.to_le_bytes());
    }
    Some((bytes, port))
}

/// The address as `/proc/net/tcp*` would show it: IPv4 (also when IPv4-mapped) as 4 bytes.
fn table_form(addr: std::net::SocketAddr) -> (Vec<u8>, u16) {
    let ip = match addr.ip() {
        std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.octets().to_vec(),
            None => v6.octets().to_vec(),
        },
    };
    (ip, addr.port())
}

/// The uid owning the TCP socket at `local` connected to `remote`, found in a `/proc/net/tcp{,6}`
/// table's text (IPv4-mapped addresses compared as IPv4).
fn tcp_socket_uid_in(
    text: &str,
    local: std::net::SocketAddr,
    remote: std::net::SocketAddr,
) -> Option<u32> {
    let (local, remote) = (table_form(local), table_form(remote));
    text.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let unmapped = |s: &str| {
            let (ip, port) = parse_addr(s)?;
            let mapped = <[u8; 16]>::try_from(ip.as_slice())
                .ok()
                .and_then(|a| Ipv6Addr::from(a).to_ipv4_mapped());
            Some((mapped.map_or(ip, |v4| v4.octets().to_vec()), port))
        };
        let found = cols.len() > 7
            && unmapped(cols[1]).as_ref() == Some(&local)
            && unmapped(cols[2]).as_ref() == Some(&remote);
        found.then(|| cols[7].parse().ok()).flatten()
    })
}

/// The uid owning the other end of a connection to this process (`peer` connected to our
/// `local`), when that end is a socket in this network namespace: `None` for a client on another
/// host or in another namespace, whose user cannot be known.
pub fn local_peer_uid(peer: std::net::SocketAddr, local: std::net::SocketAddr) -> Option<u32> {
    ["/proc/self/net/tcp", "/proc/self/net/tcp6"]
        .iter()
        .filter_map(|path| fs::read_to_string(path).ok())
        .find_map(|text| tcp_socket_uid_in(&text, peer, local))
}

/// TCP sockets from a `/proc/<pid>/net/tcp{,6}` table: inode → (local port, peer, state).
fn tcp_table(text: &str) -> Vec<(u64, u16, Peer, u8)> {
    let mut rows = Vec::new();
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 10 {
            continue;
        }
        let (Some((_, lport)), Some((raddr, rport))) = (parse_addr(cols[1]), parse_addr(cols[2]))
        else {
            continue;
        };
        let Ok(state) = u8::from_str_radix(cols[3], 16) else {
            continue;
        };
        let Ok(inode) = cols[9].parse::<u64>() else {
            continue;
        };
        let peer = match raddr.len() {
            4 => Peer {
                ip: Ipv4Addr::new(raddr[0], raddr[1], raddr[2], raddr[3]).to_string(),
                port: rport,
            },
            16 => {
                let mut a = [0u8; 16];
                a.copy_from_slice(&raddr);
                let v6 = Ipv6Addr::from(a);
                Peer {
                    ip: v6
                        .to_ipv4_mapped()
                        .map(|v| v.to_string())
                        .unwrap_or_else(|| v6.to_string()),
                    port: rport,
                }
            }
            _ => continue,
        };
        rows.push((inode, lport, peer, state));
    }
    rows
}

const TCP_ESTABLISHED: u8 = 0x01;
const TCP_LISTEN: u8 = 0x0a;

/// Client connections of `pid` that are open now: established TCP sockets whose local port is one the
/// process listens on (so its own outgoing links, e.g. to a primary, are left out), and connected
/// unix sockets accepted from one of its listening unix sockets.
pub fn existing_connections(pid: u32) -> Result<Vec<ExistingConn>> {
    let fds = socket_fds(pid)?;
    let tcp = tcp_rows(pid);
    let listen_ports = listening_ports(&tcp, &fds);
    let mut out = Vec::new();
    for (inode, lport, peer, state) in tcp {
        if state == TCP_ESTABLISHED
            && listen_ports.contains(&lport)
            && let Some(&fd) = fds.get(&inode)
        {
            out.push(ExistingConn {
                fd,
                ino: inode,
                peer,
            });
        }
    }
    if let Ok(text) = fs::read_to_string(format!("/proc/{pid}/net/unix")) {
        let listeners = unix_listeners_from(&text, &fds);
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 7 {
                continue;
            }
            let flags = u32::from_str_radix(cols[3], 16).unwrap_or(0);
            let state = cols[5];
            let Ok(inode) = cols[6].parse::<u64>() else {
                continue;
            };
            let path = cols.get(7).copied().unwrap_or("");
            // Connected (03), not listening (__SO_ACCEPTCON = 0x10000), held by the target.
            if state == "03"
                && flags & 0x10000 == 0
                && let Some(&fd) = fds.get(&inode)
                && (listeners.values().any(|p| p == path)
                    || (!listeners.is_empty() && path.is_empty()))
            {
                let shown = if path.is_empty() {
                    listeners.values().next().cloned().unwrap_or_default()
                } else {
                    path.to_string()
                };
                out.push(ExistingConn {
                    fd,
                    ino: inode,
                    peer: Peer::unix(&shown),
                });
            }
        }
    }
    out.sort_by_key(|c| c.fd);
    Ok(out)
}

fn unix_listeners_from(text: &str, fds: &HashMap<u64, u32>) -> HashMap<u32, String> {
    let mut out = HashMap::new();
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 8 {
            continue;
        }
        let flags = u32::from_str_radix(cols[3], 16).unwrap_or(0);
        let Ok(inode) = cols[6].parse::<u64>() else {
            continue;
        };
        if flags & 0x10000 != 0
            && let Some(&fd) = fds.get(&inode)
        {
            out.insert(fd, cols[7].to_string());
        }
    }
    out
}

/// Listening unix sockets of `pid`: listening fd → path (accepted unix clients are named by it).
pub fn unix_listeners(pid: u32) -> HashMap<u32, String> {
    let Ok(fds) = socket_fds(pid) else {
        return HashMap::new();
    };
    let Ok(text) = fs::read_to_string(format!("/proc/{pid}/net/unix")) else {
        return HashMap::new();
    };
    unix_listeners_from(&text, &fds)
}

/// The TCP sockets of `pid`'s network namespace (`/proc/<pid>/net/tcp{,6}`).
fn tcp_rows(pid: u32) -> Vec<(u64, u16, Peer, u8)> {
    let mut rows = Vec::new();
    for table in ["tcp", "tcp6"] {
        if let Ok(text) = fs::read_to_string(format!("/proc/{pid}/net/{table}")) {
            rows.extend(tcp_table(&text));
        }
    }
    rows
}

/// Local ports of the listening sockets among `rows` that the process holds (`fds`).
fn listening_ports(rows: &[(u64, u16, Peer, u8)], fds: &HashMap<u64, u32>) -> Vec<u16> {
    let mut ports: Vec<u16> = rows
        .iter()
        .filter(|(inode, _, _, st)| *st == TCP_LISTEN && fds.contains_key(inode))
        .map(|(_, port, _, _)| *port)
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// TCP ports `pid` listens on.
pub fn tcp_listen_ports(pid: u32) -> Vec<u16> {
    socket_fds(pid)
        .map(|fds| listening_ports(&tcp_rows(pid), &fds))
        .unwrap_or_default()
}

/// TCP addresses `pid` listens on, for the auditor's own connection to the server (CLIENT LIST).
/// Wildcard addresses are replaced by the loopback address of their family. Ordered by file
/// descriptor: Valkey opens its client listeners (`port`, then `tls-port`) before the cluster
/// bus's, so the first is the clients' port (`/proc/<pid>/net/tcp` lists in hash order).
pub fn tcp_listen_addrs(pid: u32) -> Vec<std::net::SocketAddr> {
    let Ok(fds) = socket_fds(pid) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 10 || cols[3] != "0A" {
                continue;
            }
            let Ok(inode) = cols[9].parse::<u64>() else {
                continue;
            };
            let Some(&fd) = fds.get(&inode) else {
                continue;
            };
            let Some((addr, port)) = parse_addr(cols[1]) else {
                continue;
            };
            let ip: std::net::IpAddr = match addr.len() {
                4 => {
                    let v4 = Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]);
                    if v4.is_unspecified() {
                        Ipv4Addr::LOCALHOST
                    } else {
                        v4
                    }
                    .into()
                }
                16 => {
                    let mut a = [0u8; 16];
                    a.copy_from_slice(&addr);
                    let v6 = Ipv6Addr::from(a);
                    if v6.is_unspecified() {
                        Ipv6Addr::LOCALHOST
                    } else {
                        v6
                    }
                    .into()
                }
                _ => continue,
            };
            out.push((fd, std::net::SocketAddr::new(ip, port)));
        }
    }
    out.sort_unstable_by_key(|&(fd, _)| fd);
    out.into_iter().map(|(_, addr)| addr).collect()
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd as _;

    #[test]
    fn socket_at_tells_a_closed_fd_from_an_unreadable_process() {
        let me = std::process::id();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = listener.as_raw_fd() as u32;
        let ino = super::socket_at(me, fd).unwrap().expect("a socket");
        assert!(super::fd_holds_socket(me, fd, ino));
        drop(listener);
        // (Another test's thread may have reused the number since, never for this socket.)
        assert_ne!(super::socket_at(me, fd).unwrap(), Some(ino), "closed");
        assert!(super::socket_at(u32::MAX, 3).is_err(), "no such process");
    }

    #[test]
    fn finds_the_c_library_among_the_mappings() {
        let maps = "\
00400000-00401000 r-xp 00000000 fd:01 123 /usr/bin/valkey-server
7f00-7f01 r--p 00000000 fd:01 456 /usr/lib/x86_64-linux-gnu/libcrypto.so.3
7f01-7f02 r-xp 00000000 fd:01 789 /usr/lib/x86_64-linux-gnu/libc.so.6
7f02-7f03 rw-p 00000000 00:00 0
7ffd-7ffe rw-p 00000000 00:00 0 [stack]
";
        assert_eq!(
            libc_in_maps(maps).as_deref(),
            Some("/usr/lib/x86_64-linux-gnu/libc.so.6")
        );
        assert_eq!(
            libc_in_maps("7f00-7f01 r-xp 0 fd:01 1 /lib/libc-2.31.so\n").as_deref(),
            Some("/lib/libc-2.31.so")
        );
        assert_eq!(
            libc_in_maps("00400000-00401000 r-xp 0 fd:01 1 /bin/static\n"),
            None
        );
    }

    use super::*;

    #[test]
    fn parses_proc_net_tcp_rows() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:18EB 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1234 1 0 100 0 0 10 0\n   1: 0100007F:18EB 0100007F:D3A4 01 00000000:00000000 00:00000000 00000000     0        0 5678 1 0 20 4 30 10 -1\n";
        let rows = tcp_table(text);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].1, 6379);
        assert_eq!(rows[0].3, TCP_LISTEN);
        assert_eq!(
            rows[1].2,
            Peer {
                ip: "127.0.0.1".into(),
                port: 0xD3A4
            }
        );
        assert_eq!(rows[1].0, 5678);
    }

    #[test]
    fn finds_the_user_of_a_local_peer() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_accepted, peer) = listener.accept().unwrap();
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        assert_eq!(
            local_peer_uid(peer, listener.local_addr().unwrap()),
            Some(me)
        );
        assert_eq!(peer, client.local_addr().unwrap());
        // Our own side of it is not the peer's; a peer on another host is unknown.
        let other: std::net::SocketAddr = "192.0.2.7:40000".parse().unwrap();
        assert_eq!(local_peer_uid(other, listener.local_addr().unwrap()), None);
    }

    #[test]
    fn reads_the_uid_column_and_compares_mapped_addresses_as_ipv4() {
        let v4 = "header\n   1: 0100007F:D3A4 0100007F:18EC 01 0:0 0:0 0 65534 0 5678 1\n";
        let peer: std::net::SocketAddr = "127.0.0.1:54180".parse().unwrap();
        let ours: std::net::SocketAddr = "127.0.0.1:6380".parse().unwrap();
        assert_eq!(tcp_socket_uid_in(v4, peer, ours), Some(65534));
        let mapped: std::net::SocketAddr = "[::ffff:127.0.0.1]:54180".parse().unwrap();
        assert_eq!(tcp_socket_uid_in(v4, mapped, ours), Some(65534));
        assert_eq!(
            tcp_socket_uid_in(v4, ours, peer),
            None,
            "the other end's row"
        );
        let v6 = "header\n   0: 0000000000000000FFFF00000100007F:D3A4 0000000000000000FFFF00000100007F:18EC 01 0:0 0:0 0 1000 0 9 1\n";
        assert_eq!(tcp_socket_uid_in(v6, peer, ours), Some(1000));
    }

    #[test]
    fn parses_ipv6_rows() {
        let text = "header\n   0: 00000000000000000000000001000000:18EB 00000000000000000000000001000000:C350 01 0:0 0:0 0 0 0 999 1\n";
        let rows = tcp_table(text);
        assert_eq!(
            rows[0].2,
            Peer {
                ip: "::1".into(),
                port: 50000
            }
        );
    }
}
