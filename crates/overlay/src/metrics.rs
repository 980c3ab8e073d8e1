//! The overlay's Prometheus series: one label set per peer, by node id (peers come and go with
//! nodes, so the label set is bounded by the cluster), removed with the peer.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

#[derive(Clone)]
pub struct Metrics {
    peers: IntGauge,
    rx: IntGaugeVec,
    tx: IntGaugeVec,
    handshake_age: IntGaugeVec,
    /// Packets through the TUN device, by `direction` (`read`: to encrypt, `write`:
    /// decrypted). The device's own link counters count its segments: fewer, where the
    /// offloads work.
    pub(crate) tun_packets: Tun,
}

/// A counter's `read` and `write` series.
#[derive(Clone)]
pub(crate) struct Tun {
    pub(crate) read: IntCounter,
    pub(crate) write: IntCounter,
}

impl Tun {
    fn new(reg: &Registry, name: &str, help: &str) -> prometheus::Result<Self> {
        let vec = IntCounterVec::new(Opts::new(name, help), &["direction"])?;
        reg.register(Box::new(vec.clone()))?;
        Ok(Self {
            read: vec.with_label_values(&["read"]),
            write: vec.with_label_values(&["write"]),
        })
    }
}

impl Metrics {
    pub fn register(reg: &Registry) -> prometheus::Result<Self> {
        let peers = IntGauge::new("dcnet_overlay_peers", "WireGuard peers of this node")?;
        let vec = |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["node"]);
        let rx = vec(
            "dcnet_overlay_peer_receive_bytes",
            "Bytes received from a peer since it was added",
        )?;
        let tx = vec(
            "dcnet_overlay_peer_transmit_bytes",
            "Bytes sent to a peer since it was added",
        )?;
        let handshake_age = vec(
            "dcnet_overlay_peer_handshake_age_seconds",
            "Seconds since the last handshake with a peer (absent before the first)",
        )?;
        for m in [&rx, &tx, &handshake_age] {
            reg.register(Box::new(m.clone()))?;
        }
        reg.register(Box::new(peers.clone()))?;
        let tun_packets = Tun::new(
            reg,
            "dcnet_overlay_tun_packets_total",
            "Packets read from (to encrypt) and written to (decrypted) the overlay's TUN device",
        )?;
        Ok(Self {
            peers,
            rx,
            tx,
            handshake_age,
            tun_packets,
        })
    }

    /// One peer's counters now.
    pub(crate) fn observe(&self, node: &str, rx: u64, tx: u64, handshake_age: Option<u64>) {
        self.rx.with_label_values(&[node]).set(rx as i64);
        self.tx.with_label_values(&[node]).set(tx as i64);
        match handshake_age {
            Some(age) => self
                .handshake_age
                .with_label_values(&[node])
                .set(age as i64),
            None => {
                let _ = self.handshake_age.remove_label_values(&[node]);
            }
        }
    }

    /// A peer that is gone takes its series with it.
    pub(crate) fn forget(&self, node: &str) {
        for m in [&self.rx, &self.tx, &self.handshake_age] {
            let _ = m.remove_label_values(&[node]);
        }
    }

    pub(crate) fn peers(&self, n: usize) {
        self.peers.set(n as i64);
    }
}
