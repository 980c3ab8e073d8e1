//! The DNS plane's metrics. Label values come from fixed sets (zones, record types, response
//! codes, forwarder outcomes), never from query names.

use std::time::Duration;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};

const ZONES: [&str; 6] = [
    "mesos",
    "thisdcos.directory",
    "l4lb",
    "reverse",
    "forwarded",
    "other",
];
const TYPES: [&str; 8] = ["A", "AAAA", "SRV", "PTR", "SOA", "NS", "ANY", "other"];
const RCODES: [&str; 5] = ["NOERROR", "NXDOMAIN", "SERVFAIL", "REFUSED", "other"];

#[derive(Clone, Debug)]
pub struct Metrics {
    query_counters: std::sync::Arc<[prometheus::IntCounter]>,
    latency: Histogram,
    forwards: IntCounterVec,
    records: IntGauge,
    lag: Histogram,
    refused: IntCounterVec,
    tcp_refused: IntCounterVec,
}

impl Metrics {
    pub fn register(reg: &Registry) -> prometheus::Result<Self> {
        let queries = IntCounterVec::new(
            Opts::new(
                "dcnet_dns_queries_total",
                "DNS queries by zone, type and response code",
            ),
            &["zone", "type", "rcode"],
        )?;
        let latency = Histogram::with_opts(
            HistogramOpts::new("dcnet_dns_answer_seconds", "Time to answer a DNS query").buckets(
                vec![
                    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.25, 1.0, 5.0,
                ],
            ),
        )?;
        let forwards = IntCounterVec::new(
            Opts::new("dcnet_dns_forwarded_total", "Forwarded queries by outcome"),
            &["result"],
        )?;
        let records = IntGauge::new("dcnet_dns_records", "Records served")?;
        let lag = Histogram::with_opts(
            HistogramOpts::new(
                "dcnet_dns_state_lag_seconds",
                "Time from a new ClusterState snapshot to its records being served",
            )
            .buckets(vec![
                0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0,
            ]),
        )?;
        reg.register(Box::new(queries.clone()))?;
        reg.register(Box::new(latency.clone()))?;
        reg.register(Box::new(forwards.clone()))?;
        reg.register(Box::new(records.clone()))?;
        reg.register(Box::new(lag.clone()))?;
        let refused = IntCounterVec::new(
            Opts::new(
                "dcnet_dns_refused_packets_total",
                "Packets dropped (responses, runts) or answered FORMERR, by reason",
            ),
            &["reason"],
        )?;
        reg.register(Box::new(refused.clone()))?;
        let tcp_refused = IntCounterVec::new(
            Opts::new(
                "dcnet_dns_tcp_refused_total",
                "TCP connections closed at a bound (max_connections, max_per_client, read_timeout)",
            ),
            &["bound"],
        )?;
        reg.register(Box::new(tcp_refused.clone()))?;
        let mut counters = Vec::with_capacity(ZONES.len() * TYPES.len() * RCODES.len());
        for z in ZONES {
            for t in TYPES {
                for r in RCODES {
                    counters.push(queries.with_label_values(&[z, t, r]));
                }
            }
        }
        Ok(Self {
            query_counters: counters.into(),
            latency,
            forwards,
            records,
            lag,
            refused,
            tcp_refused,
        })
    }

    /// Counts a query. The counters of every label combination are made once up front: a
    /// labelled lookup per query (a lock and three string hashes) cost measurable QPS.
    pub(crate) fn query(&self, zone: &'static str, qtype: RecordType, rcode: ResponseCode) {
        let z = ZONES
            .iter()
            .position(|z| *z == zone)
            .unwrap_or(ZONES.len() - 1);
        let t = match qtype {
            RecordType::A => 0,
            RecordType::AAAA => 1,
            RecordType::SRV => 2,
            RecordType::PTR => 3,
            RecordType::SOA => 4,
            RecordType::NS => 5,
            RecordType::ANY => 6,
            _ => 7,
        };
        let r = match rcode {
            ResponseCode::NoError => 0,
            ResponseCode::NXDomain => 1,
            ResponseCode::ServFail => 2,
            ResponseCode::Refused => 3,
            _ => 4,
        };
        self.query_counters[(z * TYPES.len() + t) * RCODES.len() + r].inc();
    }

    pub(crate) fn latency(&self, d: Duration) {
        self.latency.observe(d.as_secs_f64());
    }

    pub(crate) fn forward(&self, result: &'static str) {
        self.forwards.with_label_values(&[result]).inc();
    }

    /// A packet the screen refused; `reason` is one of the screen's fixed strings.
    pub(crate) fn refused_packet(&self, reason: &'static str) {
        self.refused.with_label_values(&[reason]).inc();
    }

    pub(crate) fn tcp_refused(&self, bound: &'static str) {
        self.tcp_refused.with_label_values(&[bound]).inc();
    }

    pub(crate) fn zone(&self, records: usize, lag: Duration) {
        self.records.set(i64::try_from(records).unwrap_or(i64::MAX));
        self.lag.observe(lag.as_secs_f64());
    }
}
