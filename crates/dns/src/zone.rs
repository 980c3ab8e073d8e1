//! The zone a DNS plane serves: every name's record sets, and their wire encoding once a name
//! is first asked for. Plain data: `records` builds it, `wire` and `server` answer from it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, OnceLock};

use hickory_proto::rr::rdata::{A, AAAA, PTR, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use thin_vec::ThinVec;

use crate::records::Source;

/// An SRV record's data; its target a lower-case FQDN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Srv {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    pub target: Box<str>,
}

impl std::fmt::Display for Srv {
    /// As an SRV record's data reads: `0 1 8080 web.marathon.mesos.`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} {} {}",
            self.priority, self.weight, self.port, self.target
        )
    }
}

/// The record sets of one name, kept as their data alone: the owner is the name they are
/// kept under and the TTL the zone's, so a task's A record is 4 bytes, not a `Record` of
/// 272 with a copy of its owner. [`RrSets::records`] makes the `Record`s when they are asked
/// for. The apexes' SOA and NS (a few in a zone) stay whole records.
///
/// Each list is a `ThinVec`, one pointer wide and not allocated while empty: a set holds one
/// or two kinds of records, and the zone holds a few sets per task (80 bytes a set, not 192
/// with `Vec`s).
#[derive(Clone, Debug, Default)]
pub struct RrSets {
    pub a: ThinVec<Ipv4Addr>,
    pub aaaa: ThinVec<Ipv6Addr>,
    pub srv: ThinVec<Srv>,
    /// PTR targets, lower-case FQDNs.
    pub ptr: ThinVec<Box<str>>,
    pub soa: ThinVec<Record>,
    pub ns: ThinVec<Record>,
    /// Addresses of SRV targets (the target and one address each), for the additional
    /// section.
    pub additional: ThinVec<(Box<str>, IpAddr)>,
    /// All of the above, encoded for the UDP fast path when the name is first asked for.
    /// Boxed: most names are never asked for, and a set stays small until one is.
    pub(crate) wire: OnceLock<Box<WireSets>>,
    /// The source whose part holds this set (`None`: merged from several sources, or built
    /// whole). A name with one contributor has that source's set in the zone, so the zone
    /// says who contributes it.
    pub(crate) owner: Option<Arc<Source>>,
}

impl RrSets {
    /// The records of `rtype` (every type for ANY), owned by `owner`.
    pub fn records(&self, owner: &Name, ttl: u32, rtype: RecordType) -> Vec<Record> {
        let rec = |data: RData| Record::from_rdata(owner.clone(), ttl, data);
        let mut out = Vec::new();
        let all = rtype == RecordType::ANY;
        if all || rtype == RecordType::A {
            out.extend(self.a.iter().map(|ip| rec(RData::A(A(*ip)))));
        }
        if all || rtype == RecordType::AAAA {
            out.extend(self.aaaa.iter().map(|ip| rec(RData::AAAA(AAAA(*ip)))));
        }
        if all || rtype == RecordType::SRV {
            out.extend(self.srv.iter().filter_map(|s| {
                let target = Name::from_ascii(&*s.target).ok()?;
                Some(rec(RData::SRV(SRV::new(
                    s.priority, s.weight, s.port, target,
                ))))
            }));
        }
        if all || rtype == RecordType::PTR {
            out.extend(
                self.ptr
                    .iter()
                    .filter_map(|t| Some(rec(RData::PTR(PTR(Name::from_ascii(&**t).ok()?))))),
            );
        }
        if all || rtype == RecordType::SOA {
            out.extend(self.soa.iter().cloned());
        }
        if all || rtype == RecordType::NS {
            out.extend(self.ns.iter().cloned());
        }
        out
    }

    /// The additional section of an SRV answer: each target's address records.
    pub fn additional_records(&self, ttl: u32) -> Vec<Record> {
        self.additional
            .iter()
            .filter_map(|(target, ip)| {
                let owner = Name::from_ascii(&**target).ok()?;
                let data = match *ip {
                    IpAddr::V4(v4) => RData::A(A(v4)),
                    IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
                };
                Some(Record::from_rdata(owner, ttl, data))
            })
            .collect()
    }

    /// Whether the two hold the same records (whatever either has encoded).
    pub fn same_records(&self, other: &Self) -> bool {
        self.a == other.a
            && self.aaaa == other.aaaa
            && self.srv == other.srv
            && self.ptr == other.ptr
            && self.soa == other.soa
            && self.ns == other.ns
            && self.additional == other.additional
    }

    pub fn is_empty(&self) -> bool {
        self.a.is_empty()
            && self.aaaa.is_empty()
            && self.srv.is_empty()
            && self.ptr.is_empty()
            && self.soa.is_empty()
            && self.ns.is_empty()
    }

    /// Drops spare capacity: a zone keeps its record sets for as long as nothing changes.
    pub(crate) fn shrink_to_fit(&mut self) {
        self.a.shrink_to_fit();
        self.aaaa.shrink_to_fit();
        self.srv.shrink_to_fit();
        self.ptr.shrink_to_fit();
        self.soa.shrink_to_fit();
        self.ns.shrink_to_fit();
        self.additional.shrink_to_fit();
    }

    pub(crate) fn len(&self) -> usize {
        self.a.len()
            + self.aaaa.len()
            + self.srv.len()
            + self.ptr.len()
            + self.soa.len()
            + self.ns.len()
    }
}

/// Every name dcnet answers, by lower-case FQDN (`web-group.marathon.mesos.`). A persistent
/// map: a zone that differs from the last in a few names shares all the others with it, their
/// wire encodings included.
#[derive(Clone, Debug, Default)]
pub struct Zone {
    pub revision: u64,
    /// Every record's TTL but the apexes' SOA and NS (which carry their own).
    pub ttl: u32,
    pub names: imbl::HashMap<Arc<str>, Arc<RrSets>>,
    /// The zones dcnet is authoritative for, with their SOA records.
    pub apexes: Vec<(String, Record)>,
    pub records: usize,
}

impl Zone {
    /// The authoritative zone a name falls in, if any.
    pub fn apex_of(&self, name: &str) -> Option<&(String, Record)> {
        // On the query path: no allocation.
        self.apexes.iter().find(|(apex, _)| {
            name == apex
                || (name.len() > apex.len()
                    && name.ends_with(apex.as_str())
                    && name.as_bytes()[name.len() - apex.len() - 1] == b'.')
        })
    }
}

/// A record set's records, encoded.
#[derive(Clone, Debug, Default)]
pub(crate) struct WireSets {
    pub(crate) a: Vec<Box<[u8]>>,
    pub(crate) aaaa: Vec<Box<[u8]>>,
    pub(crate) srv: Vec<Box<[u8]>>,
    pub(crate) ptr: Vec<Box<[u8]>>,
    pub(crate) soa: Vec<Box<[u8]>>,
    pub(crate) ns: Vec<Box<[u8]>>,
    /// Additional records, owner names included.
    pub(crate) additional: Vec<Box<[u8]>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A set stays small: the zone holds a few per task, most of one kind of record.
    #[test]
    fn a_record_set_is_ten_words() {
        assert_eq!(std::mem::size_of::<RrSets>(), 80);
    }
}
