//! The UDP fast path for dcnet's own names, as Knot and NSD answer: every record is encoded
//! once when the zone is built, and a query is parsed, looked up and answered by copying
//! bytes, with no message objects in between. Anything it does not know how to answer
//! exactly (other opcodes, classes or EDNS versions, odd names, names that are not ours) goes
//! the general way, through hickory.
//!
//! Each record is kept without its owner name (TYPE CLASS TTL RDLENGTH RDATA): an answer's
//! owner is the question's name, written as a pointer to it (offset 12); an SOA's owner is the
//! zone apex, a suffix of the question's name, so a pointer into it too.

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{Name, Record, RecordType};
use hickory_proto::serialize::binary::{BinEncodable, BinEncoder, NameEncoding};

use crate::zone::{RrSets, WireSets, Zone};

/// EDNS buffer size we advertise and never exceed over UDP: no answer is ever fragmented.
pub(crate) const MAX_UDP_PAYLOAD: u16 = 1232;
const HEADER: usize = 12;
const OPT_LEN: usize = 11;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;

impl WireSets {
    /// `sets` encoded, every record with `ttl` but the SOA and NS, which carry their own.
    pub(crate) fn new(sets: &RrSets, ttl: u32) -> Self {
        // Without their owner: the root stands in for it while encoding.
        let root = Name::root();
        let encode = |records: &[Record]| {
            records
                .iter()
                .filter_map(|r| encode_record(r, false))
                .collect()
        };
        let rest = |rtype: RecordType| encode(&sets.records(&root, ttl, rtype));
        Self {
            a: rest(RecordType::A),
            aaaa: rest(RecordType::AAAA),
            srv: rest(RecordType::SRV),
            ptr: rest(RecordType::PTR),
            soa: encode(&sets.soa),
            ns: encode(&sets.ns),
            additional: sets
                .additional_records(ttl)
                .iter()
                .filter_map(|r| encode_record(r, true))
                .collect(),
        }
    }

    /// The records of one type; `None` for ANY, which the general path answers.
    fn get(&self, qtype: u16) -> Option<&[Box<[u8]>]> {
        Some(match RecordType::from(qtype) {
            RecordType::A => &self.a,
            RecordType::AAAA => &self.aaaa,
            RecordType::SRV => &self.srv,
            RecordType::PTR => &self.ptr,
            RecordType::SOA => &self.soa,
            RecordType::NS => &self.ns,
            RecordType::ANY => return None,
            _ => &[],
        })
    }
}

/// `record` in wire form, without compression; without its owner name unless `with_owner`.
fn encode_record(record: &Record, with_owner: bool) -> Option<Box<[u8]>> {
    let mut buf = Vec::with_capacity(64);
    let mut encoder = BinEncoder::new(&mut buf);
    encoder.set_name_encoding(NameEncoding::Uncompressed);
    record.emit(&mut encoder).ok()?;
    if with_owner {
        return Some(buf.into());
    }
    // An uncompressed name: a length byte and the bytes of each label, then the root's 0.
    let owner: usize = record
        .name
        .iter()
        .map(|label| 1 + label.len())
        .sum::<usize>()
        + 1;
    Some(buf.get(owner..)?.into())
}

/// A query the fast path can answer exactly, read straight from the datagram.
pub(crate) struct Query<'a> {
    datagram: &'a [u8],
    /// The question as the client sent it (name, type, class), echoed back.
    question: &'a [u8],
    name: [u8; 255],
    name_len: usize,
    pub(crate) qtype: u16,
    /// The client's EDNS buffer size, if it sent an OPT record.
    payload: Option<u16>,
}

impl<'a> Query<'a> {
    /// `None` for anything unusual: not one IN question of a standard query, a name with
    /// characters outside `[A-Za-z0-9_-]`, EDNS other than version 0, trailing bytes.
    pub(crate) fn parse(datagram: &'a [u8]) -> Option<Self> {
        let b = datagram;
        if b.len() < HEADER + 5 {
            return None;
        }
        let (flags, counts) = (&b[2..4], &b[4..12]);
        // QR=0, opcode QUERY, TC=0; one question, no answers or authority, at most an OPT.
        if flags[0] & 0xfa != 0 || counts[..6] != [0, 1, 0, 0, 0, 0] || counts[6] != 0 {
            return None;
        }
        let additional = counts[7];
        let mut name = [0u8; 255];
        let mut name_len = 0;
        let mut at = HEADER;
        loop {
            let len = usize::from(*b.get(at)?);
            at += 1;
            if len == 0 {
                break;
            }
            if len > 63 || name_len + len + 1 > name.len() {
                return None;
            }
            for &c in b.get(at..at + len)? {
                if !(c.is_ascii_alphanumeric() || c == b'-' || c == b'_') {
                    return None;
                }
                name[name_len] = c.to_ascii_lowercase();
                name_len += 1;
            }
            name[name_len] = b'.';
            name_len += 1;
            at += len;
        }
        if name_len == 0 {
            return None;
        }
        let fixed = b.get(at..at + 4)?;
        let qtype = u16::from_be_bytes([fixed[0], fixed[1]]);
        if u16::from_be_bytes([fixed[2], fixed[3]]) != CLASS_IN {
            return None;
        }
        let question = &b[HEADER..at + 4];
        at += 4;
        let payload = match additional {
            0 => None,
            1 => {
                // Root owner, type OPT, class = buffer size, extended rcode and version 0.
                let opt = b.get(at..at + OPT_LEN)?;
                if opt[0] != 0
                    || u16::from_be_bytes([opt[1], opt[2]]) != TYPE_OPT
                    || opt[5] != 0
                    || opt[6] != 0
                {
                    return None;
                }
                // Options (a cookie, say) want an answer that carries them: the general way.
                if opt[9..11] != [0, 0] {
                    return None;
                }
                at += OPT_LEN;
                Some(u16::from_be_bytes([opt[3], opt[4]]))
            }
            _ => return None,
        };
        if at != b.len() {
            return None;
        }
        Some(Self {
            datagram,
            question,
            name,
            name_len,
            qtype,
            payload,
        })
    }

    /// The question's name, lower case, with the trailing dot: the zone's key.
    pub(crate) fn name(&self) -> &str {
        std::str::from_utf8(&self.name[..self.name_len]).unwrap_or_default()
    }

    fn id(&self) -> u16 {
        u16::from_be_bytes([self.datagram[0], self.datagram[1]])
    }
}

fn wire_of(sets: &RrSets, ttl: u32) -> &WireSets {
    sets.wire.get_or_init(|| Box::new(WireSets::new(sets, ttl)))
}

/// Writes the answer to `q` from `zone` into `out` and returns its response code, or `None`
/// when the name is not ours (or the general path should answer it).
pub(crate) fn answer(
    zone: &Zone,
    q: &Query<'_>,
    recursion_available: bool,
    cap: usize,
    out: &mut Vec<u8>,
) -> Option<ResponseCode> {
    let name = q.name();
    let sets = zone.names.get(name);
    let apex = zone.apex_of(name);
    // A name is encoded when it is first asked for in this zone: names nobody asks for cost
    // nothing, and a new zone is served the moment it is built.
    let (answers, rcode): (&[Box<[u8]>], ResponseCode) = match sets {
        Some(sets) => (wire_of(sets, zone.ttl).get(q.qtype)?, ResponseCode::NoError),
        None if apex.is_some() => (&[], ResponseCode::NXDomain),
        None => return None,
    };
    let apex_soa = match apex {
        Some((apex_name, _)) => {
            let wire = wire_of(zone.names.get(apex_name.as_str())?, zone.ttl);
            Some((apex_name, wire.soa.first()?))
        }
        None => None,
    };
    // The client's buffer, and the amplification bound for a source that is not verified.
    let max = match q.payload {
        Some(p) => usize::from(p.clamp(512, MAX_UDP_PAYLOAD)),
        None => 512,
    }
    .min(cap)
    .saturating_sub(if q.payload.is_some() { OPT_LEN } else { 0 });

    out.clear();
    out.extend_from_slice(&[0; HEADER]);
    out.extend_from_slice(q.question);
    let (mut an, mut ns, mut ar) = (0u16, 0u16, 0u16);
    let mut truncated = false;
    // Answers rotate with the query id, so that clients spread over them.
    let start = if answers.is_empty() {
        0
    } else {
        usize::from(q.id()) % answers.len()
    };
    for rest in answers[start..].iter().chain(&answers[..start]) {
        if out.len() + 2 + rest.len() > max {
            truncated = true;
            break;
        }
        out.extend_from_slice(&[0xc0, 0x0c]);
        out.extend_from_slice(rest);
        an += 1;
    }
    if !truncated {
        // NODATA and NXDOMAIN carry the zone's SOA; its owner, the apex, ends the question.
        if an == 0
            && let Some((apex_name, soa)) = apex_soa
        {
            let offset = HEADER + name.len() - apex_name.len();
            if out.len() + 2 + soa.len() <= max {
                out.extend_from_slice(&[0xc0 | (offset >> 8) as u8, offset as u8]);
                out.extend_from_slice(soa);
                ns = 1;
            }
        }
        // SRV targets' addresses, as many as fit (their absence needs no TC).
        if RecordType::from(q.qtype) == RecordType::SRV
            && let Some(sets) = sets
        {
            for record in &wire_of(sets, zone.ttl).additional {
                if out.len() + record.len() > max {
                    break;
                }
                out.extend_from_slice(record);
                ar += 1;
            }
        }
    }
    if let Some(payload) = q.payload {
        let size = payload.clamp(512, MAX_UDP_PAYLOAD).to_be_bytes();
        out.extend_from_slice(&[0, 0, 41, size[0], size[1], 0, 0, 0, 0, 0, 0]);
        ar += 1;
    }
    let request_flags = &q.datagram[2..4];
    let header = &mut out[..HEADER];
    header[..2].copy_from_slice(&q.datagram[..2]);
    // QR, AA, TC, RD as asked; RA if we forward, CD as asked, the response code.
    header[2] = 0x80 | 0x04 | if truncated { 0x02 } else { 0 } | (request_flags[0] & 0x01);
    header[3] = if recursion_available { 0x80 } else { 0 }
        | (request_flags[1] & 0x10)
        | (u16::from(rcode) as u8 & 0x0f);
    header[4..6].copy_from_slice(&1u16.to_be_bytes());
    header[6..8].copy_from_slice(&an.to_be_bytes());
    header[8..10].copy_from_slice(&ns.to_be_bytes());
    header[10..12].copy_from_slice(&ar.to_be_bytes());
    Some(rcode)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query as HQuery};
    use hickory_proto::rr::Name;

    use super::*;
    use crate::records::records_from;
    use crate::records::tests::{app, cfg, node, state, task};

    fn zone() -> Zone {
        let web = app(
            r#"{"id": "/group/web", "cmd": "x", "portDefinitions": [{"port": 0, "name": "http"}, {"port": 0, "protocol": "udp"}]}"#,
        );
        let ctr = app(
            r#"{"id": "/ctr", "cmd": "x", "networks": [{"mode": "container"}],
                "container": {"portMappings": [{"containerPort": 80}]}}"#,
        );
        let big = app(r#"{"id": "/big", "cmd": "x", "portDefinitions": [{"port": 0}]}"#);
        let mut tasks = vec![
            task("group_web.1", &web, "node-1", &[31000, 31001], None),
            task("group_web.2", &web, "node-2", &[31002, 31003], None),
            task("ctr.1", &ctr, "node-1", &[], Some("10.128.0.2")),
            task("ctr.2", &ctr, "node-1", &[], Some("10.128.0.3")),
        ];
        for i in 0..60u16 {
            tasks.push(task(
                &format!("big.{i}"),
                &big,
                "node-1",
                &[31100 + i],
                None,
            ));
        }
        let mut st = state(
            vec![web, ctr, big],
            tasks,
            vec![
                (
                    "/dcnet/vips/web",
                    serde_json::json!({"name": "/web", "ip": "198.18.0.7"}),
                ),
                (
                    "/dcnet/vipready/node-1",
                    serde_json::json!({"boot": "boot-2", "vips": ["web"]}),
                ),
            ],
        );
        let mut dual = node("node-1", "192.0.2.1");
        dual.ip6 = Some("2001:db8::1".parse().unwrap());
        st.nodes.insert(dual.id.clone(), Arc::new(dual));
        records_from(&st, &cfg())
    }

    pub(crate) fn query(name: &str, rtype: RecordType, id: u16, edns: Option<u16>) -> Vec<u8> {
        let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
        msg.metadata.recursion_desired = true;
        msg.add_query(HQuery::query(Name::from_ascii(name).unwrap(), rtype));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            msg.set_edns(e);
        }
        msg.to_vec().unwrap()
    }

    pub(crate) fn ask(zone: &Zone, datagram: &[u8]) -> Option<(ResponseCode, Message, usize)> {
        let q = Query::parse(datagram)?;
        let mut out = Vec::new();
        let rcode = answer(zone, &q, true, usize::MAX, &mut out)?;
        Some((rcode, Message::from_vec(&out).unwrap(), out.len()))
    }

    /// Every name and type of a zone, with and without EDNS and with several ids, answered
    /// by the fast path and read back by hickory's parser: the records of the zone, rotated,
    /// with the SOA for NODATA and the SRV targets' addresses.
    #[test]
    fn answers_read_back_as_the_zone_s_records() {
        let zone = zone();
        let types = [
            RecordType::A,
            RecordType::AAAA,
            RecordType::SRV,
            RecordType::PTR,
            RecordType::SOA,
            RecordType::NS,
            RecordType::TXT,
        ];
        let mut checked = 0;
        for (name, sets) in &zone.names {
            for rtype in types {
                for (id, edns) in [(0, None), (1, Some(1232)), (7, Some(4096)), (9, None)] {
                    // Clients may ask in any case; the question comes back as asked.
                    let asked = name.to_uppercase();
                    let (rcode, msg, len) = ask(&zone, &query(&asked, rtype, id, edns))
                        .unwrap_or_else(|| panic!("{name} {rtype} not answered"));
                    if msg.metadata.truncation {
                        assert!(len <= if edns.is_some() { 1232 } else { 512 });
                        continue;
                    }
                    assert_eq!(rcode, ResponseCode::NoError);
                    assert_eq!(msg.metadata.id, id);
                    assert!(msg.metadata.authoritative && msg.metadata.recursion_desired);
                    assert_eq!(msg.queries[0].name().to_ascii(), asked);
                    let want = sets.records(&Name::from_ascii(name).unwrap(), zone.ttl, rtype);
                    let start = if want.is_empty() {
                        0
                    } else {
                        usize::from(id) % want.len()
                    };
                    let want: Vec<&Record> = want[start..].iter().chain(&want[..start]).collect();
                    let got: Vec<&Record> = msg.answers.iter().collect();
                    assert_eq!(got, want, "{name} {rtype}");
                    let soa: Vec<&Record> = match zone.apex_of(name) {
                        Some((_, soa)) if want.is_empty() => vec![soa],
                        _ => vec![],
                    };
                    assert_eq!(
                        msg.authorities.iter().collect::<Vec<_>>(),
                        soa,
                        "{name} {rtype}"
                    );
                    if rtype == RecordType::SRV {
                        assert_eq!(msg.additionals, sets.additional_records(zone.ttl), "{name}");
                    } else {
                        assert!(msg.additionals.is_empty());
                    }
                    assert_eq!(
                        msg.edns.as_ref().map(|e| e.max_payload()),
                        edns.map(|s| s.clamp(512, 1232))
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked > 1000, "{checked}");
    }

    /// A name is encoded on its first query and then answered from that encoding.
    #[test]
    fn a_name_is_encoded_when_first_asked_for() {
        let zone = zone();
        let name = "web-group.marathon.mesos.";
        assert!(zone.names[name].wire.get().is_none());
        assert!(zone.names["leader.mesos."].wire.get().is_none());
        let q = query(name, RecordType::A, 1, None);
        let (_, first, _) = ask(&zone, &q).unwrap();
        let encoded = &**zone.names[name].wire.get().unwrap() as *const WireSets;
        let (_, again, _) = ask(&zone, &q).unwrap();
        assert_eq!(first.answers, again.answers);
        assert!(std::ptr::eq(
            encoded,
            &**zone.names[name].wire.get().unwrap()
        ));
        assert!(
            zone.names["leader.mesos."].wire.get().is_none(),
            "not asked, not encoded"
        );
    }

    #[test]
    fn nxdomain_under_our_zones_carries_the_soa_and_other_names_are_not_ours() {
        let zone = zone();
        let (rcode, msg, _) = ask(
            &zone,
            &query("nope.marathon.mesos.", RecordType::A, 3, None),
        )
        .unwrap();
        assert_eq!(rcode, ResponseCode::NXDomain);
        assert_eq!(msg.metadata.response_code, ResponseCode::NXDomain);
        assert!(msg.answers.is_empty());
        let (_, soa) = zone.apex_of("mesos.").unwrap();
        assert_eq!(msg.authorities, std::slice::from_ref(soa));
        assert!(ask(&zone, &query("example.com.", RecordType::A, 3, None)).is_none());
        assert!(
            ask(
                &zone,
                &query("web-group.marathon.mesos.", RecordType::ANY, 3, None)
            )
            .is_none()
        );
    }

    #[test]
    fn a_long_answer_is_truncated_to_the_buffer() {
        let zone = zone();
        for (edns, limit) in [(None, 512), (Some(800), 800), (Some(8192), 1232)] {
            let (_, msg, len) = ask(
                &zone,
                &query("_big._tcp.marathon.mesos.", RecordType::SRV, 5, edns),
            )
            .unwrap();
            assert!(msg.metadata.truncation, "{edns:?}");
            assert!(len <= limit && len > limit - 60, "{edns:?}: {len} bytes");
            assert!(!msg.answers.is_empty() && msg.answers.len() < 60);
            assert!(msg.additionals.is_empty() && msg.authorities.is_empty());
        }
    }

    #[test]
    fn unusual_queries_go_the_general_way() {
        let plain = query("leader.mesos.", RecordType::A, 1, None);
        assert!(Query::parse(&plain).is_some());
        let mut response = plain.clone();
        response[2] |= 0x80;
        let mut notify = plain.clone();
        notify[2] |= 4 << 3;
        let mut chaos = plain.clone();
        let n = chaos.len();
        chaos[n - 1] = 3;
        let mut trailing = plain.clone();
        trailing.push(0);
        let mut v1 = query("leader.mesos.", RecordType::A, 1, Some(1232));
        let n = v1.len();
        v1[n - 5] = 1;
        let mut two = Message::new(1, MessageType::Query, OpCode::Query);
        two.add_query(HQuery::query(
            Name::from_ascii("a.mesos.").unwrap(),
            RecordType::A,
        ));
        two.add_query(HQuery::query(
            Name::from_ascii("b.mesos.").unwrap(),
            RecordType::A,
        ));
        let odd = query("we\\.b.mesos.", RecordType::A, 1, None);
        for (what, d) in [
            ("response", response),
            ("opcode", notify),
            ("class", chaos),
            ("trailing bytes", trailing),
            ("EDNS version", v1),
            ("two questions", two.to_vec().unwrap()),
            ("escaped label", odd),
            ("short", plain[..10].to_vec()),
        ] {
            assert!(Query::parse(&d).is_none(), "{what}");
        }
    }
}
