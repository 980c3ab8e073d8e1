//! The sockets of the calling thread's namespace, through sock_diag: list the TCP and UDP
//! sockets connected to given addresses, and destroy one (`SOCK_DESTROY`, what `ss -K` does;
//! the kernel aborts a TCP connection with a reset and disconnects a UDP socket, and its owner
//! sees `ECONNABORTED`). Unconnected UDP sockets have no peer, so a filter on the peer never
//! names one.

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, recv, send, socket,
};

use crate::nix_io;

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// nlmsghdr, inet_diag_req_v2 and inet_diag_msg (linux/inet_diag.h).
const HEADER: usize = 16;
const SOCKID: usize = 48;
const REQUEST: usize = 8 + SOCKID;
const MESSAGE: usize = 4 + SOCKID + 20;

/// One socket as sock_diag names it: enough to destroy exactly that socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketId {
    /// `IPPROTO_TCP` (6) or `IPPROTO_UDP` (17).
    pub protocol: u8,
    family: u8,
    pub local: SocketAddr,
    pub peer: SocketAddr,
    interface: u32,
    /// The socket cookie, as BPF programs see it (`bpf_get_socket_cookie`).
    pub cookie: u64,
}

/// The sockets of `protocol` (6 or 17) in this thread's namespace whose peer is one of
/// `peers` (an IPv4 peer also matches an IPv6 socket connected to it IPv4-mapped).
pub fn connected_to(protocol: u8, peers: &BTreeSet<SocketAddr>) -> io::Result<Vec<SocketId>> {
    let fd = open()?;
    let mut found = Vec::new();
    for family in [AF_INET, AF_INET6] {
        let mut req = Vec::with_capacity(HEADER + REQUEST);
        header(&mut req, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP);
        req.extend_from_slice(&[family, protocol, 0, 0]);
        req.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
        req.extend_from_slice(&[0; SOCKID]);
        finish(&mut req);
        send(fd.as_raw_fd(), &req, MsgFlags::empty()).map_err(nix_io)?;
        let mut buf = vec![0u8; 64 * 1024];
        'dump: loop {
            let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(nix_io)?;
            let mut at = 0;
            while at + HEADER <= n {
                let len = u32_at(&buf, at) as usize;
                let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
                if len < HEADER || at + len > n {
                    return Err(io::Error::other("a truncated sock_diag message"));
                }
                match kind {
                    NLMSG_DONE => break 'dump,
                    NLMSG_ERROR => return Err(error_of(&buf[at + HEADER..at + len])),
                    SOCK_DIAG_BY_FAMILY if len >= HEADER + MESSAGE => {
                        let msg = &buf[at + HEADER..at + len];
                        let id = parse(protocol, msg);
                        if peers.contains(&canonical(id.peer)) {
                            found.push(id);
                        }
                    }
                    _ => {}
                }
                at += (len + 3) & !3;
            }
        }
    }
    Ok(found)
}

/// Destroys the socket `id` names (it must still have the same cookie). A socket that closed
/// in the meantime is not an error.
pub fn destroy(id: &SocketId) -> io::Result<()> {
    let fd = open()?;
    let mut req = Vec::with_capacity(HEADER + REQUEST);
    header(&mut req, SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK);
    req.extend_from_slice(&[id.family, id.protocol, 0, 0]);
    req.extend_from_slice(&u32::MAX.to_ne_bytes());
    sockid(&mut req, id);
    finish(&mut req);
    send(fd.as_raw_fd(), &req, MsgFlags::empty()).map_err(nix_io)?;
    let mut buf = [0u8; 512];
    let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(nix_io)?;
    if n >= HEADER + 4 && u16::from_ne_bytes([buf[4], buf[5]]) == NLMSG_ERROR {
        let e = error_of(&buf[HEADER..n]);
        return match e.raw_os_error() {
            None | Some(0) | Some(2) => Ok(()), // 0: done; ENOENT: already gone
            _ => Err(e),
        };
    }
    Ok(())
}

fn open() -> io::Result<OwnedFd> {
    socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )
    .map_err(nix_io)
}

fn header(buf: &mut Vec<u8>, kind: u16, flags: u16) {
    buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by `finish`
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
}

fn finish(buf: &mut [u8]) {
    let len = buf.len() as u32;
    buf[..4].copy_from_slice(&len.to_ne_bytes());
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

/// An `NLMSG_ERROR` payload: a negative errno, 0 for an acknowledgement.
fn error_of(payload: &[u8]) -> io::Error {
    if payload.len() < 4 {
        return io::Error::other("a short netlink error");
    }
    let code = i32::from_ne_bytes([payload[0], payload[1], payload[2], payload[3]]);
    io::Error::from_raw_os_error(-code)
}

fn addr(family: u8, words: &[u8], port: [u8; 2]) -> SocketAddr {
    let port = u16::from_be_bytes(port);
    let ip = if family == AF_INET {
        IpAddr::V4(Ipv4Addr::new(words[0], words[1], words[2], words[3]))
    } else {
        let mut o = [0u8; 16];
        o.copy_from_slice(&words[..16]);
        IpAddr::V6(Ipv6Addr::from(o))
    };
    SocketAddr::new(ip, port)
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

/// An inet_diag_msg: family, state, timer, retrans, then the socket id.
fn parse(protocol: u8, msg: &[u8]) -> SocketId {
    let family = msg[0];
    let id = &msg[4..4 + SOCKID];
    SocketId {
        protocol,
        family,
        local: addr(family, &id[4..20], [id[0], id[1]]),
        peer: addr(family, &id[20..36], [id[2], id[3]]),
        interface: u32_at(id, 36),
        cookie: u64::from(u32_at(id, 40)) | (u64::from(u32_at(id, 44)) << 32),
    }
}

/// inet_diag_sockid: ports and addresses in network order, the interface, the cookie.
fn sockid(buf: &mut Vec<u8>, id: &SocketId) {
    buf.extend_from_slice(&id.local.port().to_be_bytes());
    buf.extend_from_slice(&id.peer.port().to_be_bytes());
    for a in [id.local.ip(), id.peer.ip()] {
        let mut words = [0u8; 16];
        match a {
            IpAddr::V4(v4) => words[..4].copy_from_slice(&v4.octets()),
            IpAddr::V6(v6) => words.copy_from_slice(&v6.octets()),
        }
        buf.extend_from_slice(&words);
    }
    buf.extend_from_slice(&id.interface.to_ne_bytes());
    buf.extend_from_slice(&(id.cookie as u32).to_ne_bytes());
    buf.extend_from_slice(&((id.cookie >> 32) as u32).to_ne_bytes());
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream, UdpSocket};

    use super::*;

    /// Runs as any user on loopback of the test's own namespace (the sockets are its own).
    #[test]
    fn a_connected_udp_socket_is_found_and_destroyed_and_an_unconnected_one_never_found() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let target = server.local_addr().unwrap();
        let connected = UdpSocket::bind("127.0.0.1:0").unwrap();
        connected.connect(target).unwrap();
        let unconnected = UdpSocket::bind("127.0.0.1:0").unwrap();
        unconnected.send_to(b"x", target).unwrap();
        let found = connected_to(17, &[target].into()).unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].local, connected.local_addr().unwrap());
        assert_ne!(found[0].cookie, 0);
        match destroy(&found[0]) {
            Ok(()) => {
                let pending = connected
                    .take_error()
                    .unwrap()
                    .expect("an error for the owner");
                assert_eq!(pending.raw_os_error(), Some(103), "ECONNABORTED: {pending}");
                let err = connected.send(b"y").unwrap_err();
                assert_eq!(err.raw_os_error(), Some(89), "no longer connected: {err}");
            }
            // Not root: the kernel refuses, which is all a test without privileges can see.
            Err(e) if e.raw_os_error() == Some(1) => {}
            Err(e) => panic!("{e}"),
        }
        assert!(connected_to(17, &[target].into()).unwrap().is_empty());
        unconnected.send_to(b"z", target).unwrap();
    }

    #[test]
    fn a_tcp_connection_is_found_by_its_peer() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = listener.local_addr().unwrap();
        let client = TcpStream::connect(target).unwrap();
        let found = connected_to(6, &[target].into()).unwrap();
        assert_eq!(
            found.len(),
            1,
            "only the client has the listener as its peer: {found:?}"
        );
        assert_eq!(found[0].local, client.local_addr().unwrap());
        assert!(
            connected_to(6, &["127.0.0.1:1".parse().unwrap()].into())
                .unwrap()
                .is_empty()
        );
    }
}
