//! L4LB metrics. VIP labels are VIP names or addresses, which operators define (bounded by
//! the apps they run), never client addresses.

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::view::{BackendHealth, ViewSlot, vip_label};

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

const BACKEND_LABELS: [&str; 2] = ["vip", "backend"];

/// Per-backend metrics, read from the data plane's view when scraped. The label sets are
/// the backends in the table at that moment: a backend that leaves takes its series with it,
/// so they stay bounded however often tasks come and go, and connections pay nothing extra.
pub struct BackendMetrics {
    serving: ViewSlot,
    active: IntGaugeVec,
    total: IntCounterVec,
    up: IntGaugeVec,
}

impl BackendMetrics {
    pub(crate) fn new(serving: ViewSlot) -> prometheus::Result<Self> {
        let (active, total, up) = Self::families()?;
        Ok(Self {
            serving,
            active,
            total,
            up,
        })
    }

    fn families() -> prometheus::Result<(IntGaugeVec, IntCounterVec, IntGaugeVec)> {
        Ok((
            IntGaugeVec::new(
                Opts::new(
                    "dcnet_l4lb_backend_active_connections",
                    "Open connections (UDP: sessions) to a VIP's backend",
                ),
                &BACKEND_LABELS,
            )?,
            // Starts again from 0 when a backend leaves the table and comes back, which
            // Prometheus reads as a counter reset, like a restart.
            IntCounterVec::new(
                Opts::new(
                    "dcnet_l4lb_backend_connections_total",
                    "Connections (UDP: sessions) sent to a VIP's backend",
                ),
                &BACKEND_LABELS,
            )?,
            IntGaugeVec::new(
                Opts::new(
                    "dcnet_l4lb_backend_up",
                    "1 if a VIP's backend gets new connections; 0 while it drains or is ejected",
                ),
                &BACKEND_LABELS,
            )?,
        ))
    }
}

impl Collector for BackendMetrics {
    fn desc(&self) -> Vec<&Desc> {
        let mut descs = self.active.desc();
        descs.extend(self.total.desc());
        descs.extend(self.up.desc());
        descs
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Ok((active, total, up)) = Self::families() else {
            return Vec::new();
        };
        for served in self.serving.served() {
            let vip = vip_label(&served.key, served.name.as_deref());
            for b in &served.backends {
                let backend = b.backend.addr.to_string();
                let labels = [vip.as_str(), backend.as_str()];
                if let Some(open) = b.active {
                    active
                        .with_label_values(&labels)
                        .set(i64::try_from(open).unwrap_or(i64::MAX));
                }
                total.with_label_values(&labels).inc_by(b.total);
                up.with_label_values(&labels)
                    .set(i64::from(b.health == BackendHealth::Healthy));
            }
        }
        let mut families = active.collect();
        families.extend(total.collect());
        families.extend(up.collect());
        families
    }
}
