//! The zone a DNS plane serves: every name's record sets, and their wire encoding once a name
//! is first asked for. Plain data: `records` builds it, `wire` and `server` answer from it.

use std::sync::{Arc, OnceLock};

use hickory_proto::rr::{Record, RecordType};

/// The record sets of one name.
#[derive(Clone, Debug, Default)]
pub struct RrSets {
    pub a: Vec<Record>,
    pub aaaa: Vec<Record>,
    pub srv: Vec<Record>,
    pub ptr: Vec<Record>,
    pub soa: Vec<Record>,
    pub ns: Vec<Record>,
    /// Address records of SRV targets, for the additional section.
    pub additional: Vec<Record>,
    /// All of the above, encoded for the UDP fast path when the name is first asked for.
    /// Boxed: most names are never asked for, and a set stays small until one is.
    pub(crate) wire: OnceLock<Box<WireSets>>,
}

impl RrSets {
    pub fn get(&self, rtype: RecordType) -> Vec<&Record> {
        match rtype {
            RecordType::A => self.a.iter().collect(),
            RecordType::AAAA => self.aaaa.iter().collect(),
            RecordType::SRV => self.srv.iter().collect(),
            RecordType::PTR => self.ptr.iter().collect(),
            RecordType::SOA => self.soa.iter().collect(),
            RecordType::NS => self.ns.iter().collect(),
            RecordType::ANY => [
                &self.a, &self.aaaa, &self.srv, &self.ptr, &self.soa, &self.ns,
            ]
            .into_iter()
            .flatten()
            .collect(),
            _ => Vec::new(),
        }
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
        for list in [
            &mut self.a,
            &mut self.aaaa,
            &mut self.srv,
            &mut self.ptr,
            &mut self.soa,
            &mut self.ns,
            &mut self.additional,
        ] {
            list.shrink_to_fit();
        }
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
    pub names: imbl::HashMap<String, Arc<RrSets>>,
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
