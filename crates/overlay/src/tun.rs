//! The TUN device, with the kernel's segmentation offloads (virtio-net headers, as a VM's
//! NIC has them): one read can carry a TCP segment of up to 64 KiB that the kernel has not
//! cut into packets, and is split here; the packets WireGuard decrypts are coalesced back
//! into such segments before they are written. A read or a write then moves up to ~45
//! packets instead of one, and the TCP stacks at both ends handle one segment per 64 KiB,
//! as they do on a veth.
//!
//! gotatun's own TUN transport reads and writes one packet per system call; this one is
//! handed to it through [`gotatun::device::DeviceBuilder::with_ip_pair`].

use std::io;
use std::sync::Arc;

use crate::Metrics;
use bytes::BytesMut;
use gotatun::packet::{Ip, Packet, PacketBufPool};
use gotatun::tun::{IpRecv, IpSend, MtuWatcher};
use tokio::sync::mpsc;
use tracing::{debug, warn};
use tun_rs::{AsyncDevice, GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

/// The most packets one read is split into, and one write coalesces. The device's GSO
/// segment limit is set to this, so that the kernel never hands over a segment that would
/// split into more.
pub(crate) const BATCH: usize = IDEAL_BATCH_SIZE;
/// Decrypted packets waiting for the writer (beyond it, WireGuard's receive loop waits).
const WRITE_QUEUE: usize = 4 * BATCH;
/// The largest segment a read returns, with its virtio-net header.
const RAW: usize = VIRTIO_NET_HDR_LEN + 65535;

/// Creates the TUN device `name` with the offloads on, and the two halves gotatun uses;
/// the writer's task runs until gotatun drops its half. Call on the runtime, in the node's
/// namespace.
pub(crate) fn open(name: &str, mtu: u16, metrics: &Metrics) -> io::Result<(TunWriter, TunReader)> {
    let build = |offload| {
        tun_rs::DeviceBuilder::new()
            .name(name)
            .offload(offload)
            .build_async()
    };
    // Where the kernel refuses the offloads, the device moves one packet per system
    // call, as gotatun's own does.
    let dev = Arc::new(build(true).or_else(|e| {
        warn!(device = name, error = %e, "the TUN device has no offloads; the overlay moves one packet per system call");
        build(false)
    })?);
    let (queue, rx) = mpsc::channel(WRITE_QUEUE);
    tokio::spawn(write_loop(dev.clone(), rx, metrics.clone()));
    let reader = TunReader {
        dev,
        raw: vec![0; RAW].into_boxed_slice(),
        bufs: Vec::with_capacity(BATCH),
        sizes: vec![0; BATCH],
        mtu: MtuWatcher::new(mtu),
        metrics: metrics.clone(),
    };
    Ok((TunWriter { queue }, reader))
}

/// What gotatun writes decrypted packets to: a queue to [`write_loop`], which takes what
/// has gathered in one go.
pub(crate) struct TunWriter {
    queue: mpsc::Sender<Packet<Ip>>,
}

impl IpSend for TunWriter {
    async fn send(&mut self, packet: Packet<Ip>) -> io::Result<()> {
        self.queue
            .send(packet)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the TUN writer has stopped"))
    }
}

/// Writes what the queue holds, coalesced per TCP (and UDP) flow, until the queue closes
/// or the device is gone.
async fn write_loop(
    dev: Arc<AsyncDevice>,
    mut queue: mpsc::Receiver<Packet<Ip>>,
    metrics: Metrics,
) {
    let mut batch = Vec::with_capacity(BATCH);
    // Each buffer is the virtio-net header's room, then a packet; one that heads a flow
    // takes the flow's coalesced segment (tun-rs coalesces only into a buffer that has the
    // room already). The memory is touched only as far as segments reach.
    let mut bufs: Vec<BytesMut> = (0..BATCH)
        .map(|_| BytesMut::with_capacity(2 * VIRTIO_NET_HDR_LEN + 65535))
        .collect();
    let mut gro = GROTable::new();
    loop {
        let n = queue.recv_many(&mut batch, BATCH).await;
        if n == 0 {
            return;
        }
        for (buf, packet) in bufs.iter_mut().zip(batch.drain(..)) {
            buf.clear();
            buf.resize(VIRTIO_NET_HDR_LEN, 0);
            buf.extend_from_slice(&packet.into_bytes());
        }
        let sent = dev
            .send_multiple(&mut gro, &mut bufs[..n], VIRTIO_NET_HDR_LEN)
            .await;
        metrics.tun_packets.write.inc_by(n as u64);
        if let Err(e) = sent {
            if gone(&e) {
                debug!(error = %e, "the TUN device is gone; its writer stops");
                return;
            }
            debug!(error = %e, "a TUN write failed");
        }
    }
}

/// What gotatun reads packets to encrypt from: a read of one (possibly 64 KiB) segment,
/// split into packets in buffers of gotatun's pool.
pub(crate) struct TunReader {
    dev: Arc<AsyncDevice>,
    raw: Box<[u8]>,
    /// Pool buffers for the next read's packets (refilled before each read).
    bufs: Vec<PoolBuf>,
    sizes: Vec<usize>,
    mtu: MtuWatcher,
    metrics: Metrics,
}

/// A buffer of gotatun's pool, as the slices tun-rs splits into.
struct PoolBuf(Packet<[u8]>);

impl AsRef<[u8]> for PoolBuf {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl AsMut<[u8]> for PoolBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

impl IpRecv for TunReader {
    async fn recv<'a>(
        &'a mut self,
        pool: &mut PacketBufPool,
    ) -> io::Result<impl Iterator<Item = Packet<Ip>> + Send + 'a> {
        let TunReader {
            dev,
            raw,
            bufs,
            sizes,
            metrics,
            ..
        } = self;
        loop {
            while bufs.len() < BATCH {
                bufs.push(PoolBuf(pool.get()));
            }
            match dev.recv_multiple(raw, bufs, sizes, 0).await {
                Ok(n) => {
                    metrics.tun_packets.read.inc_by(n as u64);
                    let sizes = &sizes[..n];
                    return Ok(bufs.drain(..n).zip(sizes).filter_map(|(buf, &len)| {
                        let mut packet = buf.0;
                        packet.truncate(len);
                        packet.try_into_ip().ok()
                    }));
                }
                // A segment that cannot be split (a bad header, more packets than BATCH)
                // is dropped, as a NIC drops a bad frame; gotatun would take any error
                // that is not the system's as the device's end.
                Err(e) if e.raw_os_error().is_none() => {
                    debug!(error = %e, "a TUN segment was dropped");
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn mtu(&self) -> MtuWatcher {
        self.mtu.clone()
    }
}

fn gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADF | libc::EBADFD | libc::ENODEV)
    )
}
