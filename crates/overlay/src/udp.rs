//! WireGuard's UDP socket, sending with the kernel's segmentation offload (UDP GSO). The
//! packets one TUN read yields go to one peer, back to back, all of one size but the last:
//! they leave as one train in one `sendmsg`, which crosses the underlay's stack (its veth,
//! bridge and conntrack) once for up to [`MAX_SEGMENTS`] packets, and which the peer's
//! socket (UDP GRO, which gotatun's socket turns on) reads as one. Receiving is gotatun's.

use std::io::{self, IoSlice};
use std::net::{IpAddr, SocketAddr, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use gotatun::packet::Packet;
use gotatun::udp::socket::{UdpSocket, UdpSocketFactory};
use gotatun::udp::{UdpSend, UdpTransportFactory, UdpTransportFactoryParams};
use nix::sys::socket::{ControlMessage, MsgFlags, SockaddrStorage, sendmsg};
use tokio::io::Interest;
use tracing::warn;

/// The most packets one train carries (the kernel's limit is 64 or 128, by version).
const MAX_SEGMENTS: usize = 64;
/// The most bytes one train carries (a datagram's payload is at most 65,507 bytes).
const MAX_TRAIN: usize = 65_000;
/// The most packets gotatun hands over in one call.
const MAX_BATCH: usize = 128;

/// gotatun's socket factory, its sending half wrapped in [`GsoSend`].
pub(crate) struct GsoUdpFactory(pub(crate) UdpSocketFactory);

impl UdpTransportFactory for GsoUdpFactory {
    type Send = GsoSend;
    type Recv = UdpSocket;

    async fn bind(
        &mut self,
        params: &UdpTransportFactoryParams,
    ) -> io::Result<(Self::Send, Self::Recv)> {
        let (udp, recv) = self.0.bind(params).await?;
        let v6 = udp.local_addr()?.is_ipv6();
        Ok((
            GsoSend {
                udp,
                v6,
                gso: Arc::new(AtomicBool::new(true)),
            },
            recv,
        ))
    }
}

#[derive(Clone)]
pub(crate) struct GsoSend {
    udp: UdpSocket,
    /// A dual-stack socket: IPv4 destinations are given as IPv4-mapped IPv6.
    v6: bool,
    /// Cleared when the kernel refuses a train; every packet then goes on its own.
    gso: Arc<AtomicBool>,
}

impl GsoSend {
    /// Sends `packets` (one destination; all of one size but the last) as one train, or
    /// one by one.
    async fn send_train(&self, packets: &[(Packet, SocketAddr)]) -> io::Result<()> {
        let Some((first, dest)) = packets.first() else {
            return Ok(());
        };
        let addr = SockaddrStorage::from(self.on_socket(*dest));
        let fd = self.udp.socket().as_raw_fd();
        if packets.len() > 1 && self.gso.load(Ordering::Relaxed) {
            let iov: Vec<IoSlice<'_>> = packets.iter().map(|(p, _)| IoSlice::new(p)).collect();
            let segment = u16::try_from(first.len()).unwrap_or(u16::MAX);
            let sent = self
                .udp
                .socket()
                .async_io(Interest::WRITABLE, || {
                    let cmsg = [ControlMessage::UdpGsoSegments(&segment)];
                    sendmsg(fd, &iov, &cmsg, MsgFlags::MSG_DONTWAIT, Some(&addr))
                        .map_err(io::Error::from)
                })
                .await;
            match sent {
                Ok(_) => return Ok(()),
                Err(e) if refuses_gso(&e) => {
                    warn!(error = %e, "the kernel refused a UDP GSO send; the overlay sends its packets one by one from now on");
                    self.gso.store(false, Ordering::Relaxed);
                }
                // Anything else (a full buffer, an unreachable network) drops the train, as
                // it would drop each of its packets.
                Err(e) => return Err(e),
            }
        }
        for (packet, _) in packets {
            let iov = [IoSlice::new(packet)];
            self.udp
                .socket()
                .async_io(Interest::WRITABLE, || {
                    sendmsg(fd, &iov, &[], MsgFlags::MSG_DONTWAIT, Some(&addr))
                        .map_err(io::Error::from)
                })
                .await?;
        }
        Ok(())
    }

    fn on_socket(&self, dest: SocketAddr) -> SocketAddr {
        match dest.ip() {
            IpAddr::V4(ip) if self.v6 => {
                SocketAddrV6::new(ip.to_ipv6_mapped(), dest.port(), 0, 0).into()
            }
            _ => dest,
        }
    }
}

impl UdpSend for GsoSend {
    type SendManyBuf = ();

    async fn send_to(&self, packet: Packet, destination: SocketAddr) -> io::Result<()> {
        self.udp.send_to(packet, destination).await
    }

    fn max_number_of_packets_to_send(&self) -> usize {
        MAX_BATCH
    }

    async fn send_many_to(
        &self,
        _: &mut (),
        packets: &mut Vec<(Packet, SocketAddr)>,
    ) -> io::Result<()> {
        let mut start = 0;
        while start < packets.len() {
            let end = start + train_len(&packets[start..]);
            self.send_train(&packets[start..end]).await?;
            start = end;
        }
        packets.clear();
        Ok(())
    }

    fn local_addr(&self) -> io::Result<Option<SocketAddr>> {
        self.udp.local_addr().map(Some)
    }
}

/// The errors of a kernel or a route that cannot segment UDP (no UDP_SEGMENT, no checksum
/// offload on the way out), as opposed to a send that failed for its own reasons.
fn refuses_gso(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
    )
}

/// How many of `packets`, from the first, can go as one train: the same destination,
/// the size of the first (the last may be shorter), within the kernel's limits.
fn train_len<P: AsRef<[u8]>>(packets: &[(P, SocketAddr)]) -> usize {
    let Some((first, dest)) = packets.first() else {
        return 0;
    };
    let segment = first.as_ref().len();
    let mut total = segment;
    let mut n = 1;
    for (packet, to) in &packets[1..] {
        let len = packet.as_ref().len();
        if n == MAX_SEGMENTS || to != dest || len > segment || total + len > MAX_TRAIN {
            break;
        }
        total += len;
        n += 1;
        if len < segment {
            break;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    fn lens(packets: &[(Vec<u8>, SocketAddr)]) -> Vec<usize> {
        let mut out = Vec::new();
        let mut rest = packets;
        while !rest.is_empty() {
            let n = train_len(rest);
            out.push(n);
            rest = &rest[n..];
        }
        out
    }

    #[test]
    fn a_train_is_one_destination_of_one_size_ending_at_a_shorter_packet() {
        let p = |len: usize, port: u16| (vec![0u8; len], at(port));
        // Equal sizes to one peer, then a shorter one ends the train.
        let packets = vec![p(1000, 1), p(1000, 1), p(600, 1), p(1000, 1)];
        assert_eq!(lens(&packets), [3, 1]);
        // Another destination starts a new train; so does a longer packet.
        let packets = vec![p(1000, 1), p(1000, 2), p(1000, 2), p(1200, 2)];
        assert_eq!(lens(&packets), [1, 2, 1]);
        // No train is longer than MAX_SEGMENTS packets or MAX_TRAIN bytes.
        let packets: Vec<_> = (0..100).map(|_| p(100, 1)).collect();
        assert_eq!(lens(&packets), [MAX_SEGMENTS, 100 - MAX_SEGMENTS]);
        let packets: Vec<_> = (0..50).map(|_| p(1400, 1)).collect();
        let per = MAX_TRAIN / 1400;
        assert_eq!(lens(&packets), [per, 50 - per]);
        assert_eq!(lens(&[]), Vec::<usize>::new());
    }
}
