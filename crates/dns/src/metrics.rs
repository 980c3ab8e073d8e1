//! The DNS plane's metrics. Label values come from fixed sets (zones, record types, response
//! codes, forwarder outcomes), never from query names.

use std::time::Duration;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};

#[derive(Clone, Debug)]
pub struct Metrics {
    queries: IntCounterVec,
    latency: Histogram,
    forwards: IntCounterVec,
    records: IntGauge,
    lag: Histogram,
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
        Ok(Self {
            queries,
            latency,
            forwards,
            records,
            lag,
        })
    }

    pub(crate) fn query(&self, zone: &'static str, qtype: RecordType, rcode: ResponseCode) {
        let qtype = match qtype {
            RecordType::A => "A",
            RecordType::AAAA => "AAAA",
            RecordType::SRV => "SRV",
            RecordType::PTR => "PTR",
            RecordType::SOA => "SOA",
            RecordType::NS => "NS",
            RecordType::ANY => "ANY",
            _ => "other",
        };
        let rcode = match rcode {
            ResponseCode::NoError => "NOERROR",
            ResponseCode::NXDomain => "NXDOMAIN",
            ResponseCode::ServFail => "SERVFAIL",
            ResponseCode::Refused => "REFUSED",
            _ => "other",
        };
        self.queries.with_label_values(&[zone, qtype, rcode]).inc();
    }

    pub(crate) fn latency(&self, d: Duration) {
        self.latency.observe(d.as_secs_f64());
    }

    pub(crate) fn forward(&self, result: &'static str) {
        self.forwards.with_label_values(&[result]).inc();
    }

    pub(crate) fn zone(&self, records: usize, lag: Duration) {
        self.records.set(i64::try_from(records).unwrap_or(i64::MAX));
        self.lag.observe(lag.as_secs_f64());
    }
}
