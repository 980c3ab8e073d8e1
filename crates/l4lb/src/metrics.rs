//! L4LB metrics. VIP labels are VIP names or addresses, which operators define (bounded by
//! the apps they run), never client addresses.

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

#[derive(Clone, Debug)]
pub struct Metrics {
    connections: IntCounterVec,
    vips: IntGauge,
}

impl Metrics {
    pub fn register(reg: &Registry) -> prometheus::Result<Self> {
        let connections = IntCounterVec::new(
            Opts::new(
                "dcnet_l4lb_connections_total",
                "Connections (UDP: sessions) through VIPs by outcome",
            ),
            &["vip", "result"],
        )?;
        let vips = IntGauge::new("dcnet_l4lb_vips", "VIPs the data plane serves")?;
        reg.register(Box::new(connections.clone()))?;
        reg.register(Box::new(vips.clone()))?;
        Ok(Self { connections, vips })
    }

    pub(crate) fn connection(&self, vip: &str, result: &'static str) {
        self.connections.with_label_values(&[vip, result]).inc();
    }

    pub(crate) fn vips(&self, n: usize) {
        self.vips.set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}
