//! The request handler behind hickory-server: authoritative answers from the current [`Zone`]
//! (one atomic load per query, no lock), everything else to the forwarder.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use hickory_proto::op::{Edns, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::{Name, Record, RecordType};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::time::Instant;
use tracing::debug;

use crate::cookie::{self, Cookies};
use crate::forward::Forwarder;
use crate::metrics::Metrics;
use crate::wire::{self, MAX_UDP_PAYLOAD};
use crate::zone::Zone;

pub(crate) struct Handler {
    pub(crate) zone: Arc<ArcSwap<Zone>>,
    pub(crate) forwarder: Option<Arc<Forwarder>>,
    pub(crate) metrics: Metrics,
    pub(crate) cookies: Cookies,
    /// A UDP answer to a source that has not shown a cookie of ours is at most this many
    /// times its query.
    pub(crate) max_amplification: usize,
}

impl Handler {
    /// The largest UDP answer `datagram` from `src` may get: what its EDNS buffer allows if it
    /// returned a server cookie of ours, else `max_amplification` times its size.
    /// `opt` is the RDATA of its OPT record, as the screen found it.
    pub(crate) fn udp_cap(
        &self,
        datagram: &[u8],
        opt: Option<&[u8]>,
        src: std::net::IpAddr,
    ) -> usize {
        let verified = opt
            .and_then(cookie::of_opt)
            .is_some_and(|(client, server)| {
                self.cookies
                    .is_valid(client, server, src, cookie::unix_now())
            });
        if verified {
            usize::MAX
        } else {
            datagram.len().saturating_mul(self.max_amplification)
        }
    }

    /// Answers a datagram for one of our names straight from the encoded zone into `out`,
    /// at most `cap` bytes. `false`: the general path must answer it (not ours, or not a
    /// plain query).
    pub(crate) fn answer_wire(&self, datagram: &[u8], cap: usize, out: &mut Vec<u8>) -> bool {
        let started = Instant::now();
        let Some(query) = wire::Query::parse(datagram) else {
            return false;
        };
        let zone = self.zone.load();
        let Some(rcode) = wire::answer(&zone, &query, self.forwarder.is_some(), cap, out) else {
            return false;
        };
        self.metrics.query(
            zone_label(query.name()),
            RecordType::from(query.qtype),
            rcode,
        );
        self.metrics.latency(started.elapsed());
        true
    }

    /// Whether the answer comes from the zone (or is an error) rather than from upstream.
    pub(crate) fn answers_locally(&self, request: &Request) -> bool {
        let Ok(info) = request.request_info() else {
            return true;
        };
        if self.forwarder.is_none() {
            return true;
        }
        let qname = info.query.name().to_string();
        let zone = self.zone.load();
        zone.names.contains_key(qname.as_str()) || zone.apex_of(&qname).is_some()
    }
}

/// Rotates a record set by a per-query offset, so that clients spread over the answers.
fn rotated(records: Vec<&Record>, offset: usize) -> Vec<&Record> {
    if records.len() < 2 {
        return records;
    }
    let k = offset % records.len();
    records[k..].iter().chain(&records[..k]).copied().collect()
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let started = Instant::now();
        // Both transports screened the packet (screen.rs) before it got here.
        let edns = request.edns.as_ref().map(|req| {
            let mut e = Edns::new();
            e.set_max_payload(req.max_payload().clamp(512, MAX_UDP_PAYLOAD));
            // A client cookie gets it back with a fresh server cookie for this client.
            if let Some((client, _)) = cookie::of_query(request.as_slice()) {
                let server = self
                    .cookies
                    .make(client, request.src().ip(), cookie::unix_now());
                let mut value = client.to_vec();
                value.extend_from_slice(&server);
                e.options_mut()
                    .insert(hickory_proto::rr::rdata::opt::EdnsOption::Unknown(
                        cookie::OPTION,
                        value,
                    ));
            }
            e
        });
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(e) = &edns {
            builder.edns(e);
        }
        let info = match request.request_info() {
            Ok(info) => info,
            Err(_) => {
                let msg = builder.error_msg(&request.metadata, ResponseCode::FormErr);
                return response
                    .send_response(msg)
                    .await
                    .unwrap_or_else(|_| serve_failed(request));
            }
        };
        if info.metadata.op_code != OpCode::Query
            || info.metadata.message_type != MessageType::Query
        {
            let msg = builder.error_msg(&request.metadata, ResponseCode::NotImp);
            return response
                .send_response(msg)
                .await
                .unwrap_or_else(|_| serve_failed(request));
        }
        // A LowerName prints lower-case already.
        let qname = info.query.name().to_string();
        let qtype = info.query.query_type();
        let zone = self.zone.load();
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.recursion_available = self.forwarder.is_some();

        let authoritative = zone
            .names
            .get(qname.as_str())
            .map(|sets| (sets, zone.apex_of(&qname)));
        let result = match authoritative {
            Some((sets, apex)) => {
                metadata.authoritative = true;
                let owned = match Name::from_ascii(&qname) {
                    Ok(owner) => sets.records(&owner, zone.ttl, qtype),
                    Err(_) => Vec::new(),
                };
                let answers = rotated(owned.iter().collect(), usize::from(request.metadata.id));
                let extra = if qtype == RecordType::SRV {
                    sets.additional_records(zone.ttl)
                } else {
                    Vec::new()
                };
                let additionals: Vec<&Record> = extra.iter().collect();
                let soa: Vec<&Record> = if answers.is_empty() {
                    apex.map(|(_, s)| s).into_iter().collect()
                } else {
                    Vec::new()
                };
                self.metrics
                    .query(zone_label(&qname), qtype, ResponseCode::NoError);
                let msg = builder.build(metadata, answers, Vec::<&Record>::new(), soa, additionals);
                response.send_response(msg).await
            }
            None => match zone.apex_of(&qname) {
                Some((_, soa)) => {
                    metadata.authoritative = true;
                    metadata.response_code = ResponseCode::NXDomain;
                    self.metrics
                        .query(zone_label(&qname), qtype, ResponseCode::NXDomain);
                    let msg = builder.build(
                        metadata,
                        Vec::<&Record>::new(),
                        Vec::<&Record>::new(),
                        [soa],
                        Vec::<&Record>::new(),
                    );
                    response.send_response(msg).await
                }
                None => {
                    drop(zone);
                    match &self.forwarder {
                        Some(fwd) => {
                            let answer = fwd.forward(request, &qname, qtype).await;
                            let mut metadata = Metadata::response_from_request(&request.metadata);
                            metadata.recursion_available = true;
                            metadata.response_code = answer.rcode;
                            metadata.truncation = answer.truncated;
                            self.metrics.query("forwarded", qtype, answer.rcode);
                            let msg = builder.build(
                                metadata,
                                answer.answers.iter(),
                                answer.authorities.iter(),
                                Vec::<&Record>::new(),
                                answer.additionals.iter(),
                            );
                            response.send_response(msg).await
                        }
                        None => {
                            self.metrics.query("other", qtype, ResponseCode::Refused);
                            let msg = builder.error_msg(&request.metadata, ResponseCode::Refused);
                            response.send_response(msg).await
                        }
                    }
                }
            },
        };
        self.metrics.latency(started.elapsed());
        match result {
            Ok(info) => info,
            Err(e) => {
                debug!(error = %e, "could not send a DNS response");
                serve_failed(request)
            }
        }
    }
}

fn serve_failed(request: &Request) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = ResponseCode::ServFail;
    hickory_proto::op::Header {
        metadata,
        counts: Default::default(),
    }
    .into()
}

/// A bounded label for metrics: which zone a name is in.
fn zone_label(name: &str) -> &'static str {
    if name.ends_with(".l4lb.thisdcos.directory.") || name.ends_with(".l4lb.") {
        "l4lb"
    } else if name.ends_with("thisdcos.directory.") {
        "thisdcos.directory"
    } else if name.ends_with(".in-addr.arpa.") || name.ends_with(".ip6.arpa.") {
        "reverse"
    } else {
        "mesos"
    }
}

/// The socket addresses a server listens on, for logs.
pub(crate) fn describe(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(SocketAddr::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
