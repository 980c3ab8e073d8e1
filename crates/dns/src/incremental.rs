//! The zone kept up to date by what changed, not rebuilt: each source (a node, a task, a VIP,
//! the leader, the apexes) keeps the records it contributes, and a change rebuilds only the
//! sources it touches and the names those contribute to. The zone's map is persistent, so
//! the zone handed to the server shares every untouched name (and its wire encoding) with
//! the one before. [`records_from`](crate::records_from) stays as the oracle the tests hold
//! this to.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use dcnet_node_core::Changed;
use dcnet_node_core::ClusterState;
use smallvec::SmallVec;

use crate::records::{
    Labels, Part, RecordConfig, Source, ancestors, in_part, merge, part_of, sources,
};
use crate::zone::{RrSets, Zone};

/// A name, kept once: the zone and the parts share it.
type Key = Arc<str>;

/// The sources of one name's records, in merge order.
type Contributors = SmallVec<[Arc<Source>; 2]>;

pub(crate) struct Incremental {
    cfg: RecordConfig,
    labels: Labels,
    apex_names: Vec<String>,
    /// The snapshot applied last (0: none yet).
    revision: u64,
    parts: HashMap<Arc<Source>, Part>,
    /// The sources of each name that more than one contributes to, in merge order; the
    /// sources are the parts' own. A name with one contributor (most: a task's own names)
    /// is not here: the zone holds that source's set, which names its owner
    /// ([`RrSets::owner`]), so a second map of every name is not needed.
    shared: HashMap<Key, Contributors>,
    /// For each ancestor name, how many names with records below it make it exist.
    ancestor_refs: HashMap<Key, usize>,
    zone: Zone,
}

/// How an update went, for metrics and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Update {
    /// Only the sources the changes touch.
    Changes { sources: usize },
    /// Everything (the first snapshot, or one further ahead than its change log reaches).
    Rebuild,
}

impl Incremental {
    pub(crate) fn new(cfg: RecordConfig) -> Self {
        let labels = Labels::of(&cfg);
        let apex_names = labels.apex_names().to_vec();
        let zone = Zone {
            ttl: cfg.ttl,
            ..Zone::default()
        };
        Self {
            cfg,
            labels,
            apex_names,
            revision: 0,
            parts: HashMap::new(),
            shared: HashMap::new(),
            ancestor_refs: HashMap::new(),
            zone,
        }
    }

    /// The zone of `snap`, from the zone of the snapshot applied before.
    pub(crate) fn update(&mut self, snap: &ClusterState) -> (Zone, Update) {
        let changes = (self.revision > 0)
            .then(|| snap.changes_since(self.revision))
            .flatten();
        let how = match changes {
            Some(changes) => {
                let touched = self.touched(snap, &changes);
                let n = touched.len();
                for source in touched {
                    self.replace(snap, source);
                }
                Update::Changes { sources: n }
            }
            None => {
                self.rebuild(snap);
                Update::Rebuild
            }
        };
        // The SOA serial is the revision: the apexes change with every snapshot.
        self.replace(snap, Source::Apex);
        self.revision = snap.revision;
        self.zone.revision = snap.revision;
        (self.zone.clone(), how)
    }

    /// The sources whose records `changes` may change.
    fn touched(&self, snap: &ClusterState, changes: &[&Changed]) -> BTreeSet<Source> {
        let mut out = BTreeSet::new();
        for change in changes {
            match change {
                Changed::Task(id) => {
                    out.insert(Source::Task(id.clone()));
                }
                Changed::App(id) => {
                    // Its tasks that are gone from the snapshot have changes of their own.
                    out.extend(snap.tasks_of(id).map(|t| Source::Task(t.id.clone())));
                }
                Changed::Node(id) => {
                    out.insert(Source::Node(id.clone()));
                    out.insert(Source::Leader);
                    // A node's addresses are in its tasks' records.
                    out.extend(snap.tasks_on(id).map(|t| Source::Task(t.id.clone())));
                }
                Changed::Leader => {
                    out.insert(Source::Leader);
                }
                Changed::Vip(label) => {
                    out.insert(Source::Vip(label.clone()));
                }
                // Only this node's readiness decides its VIP names (any node's, with none
                // configured).
                Changed::VipReady(node)
                    if self.cfg.this_node.as_ref().is_none_or(|me| me == node) =>
                {
                    out.extend(snap.vips.keys().map(|label| Source::Vip(label.clone())));
                }
                Changed::VipReady(_)
                | Changed::AppStatus(_)
                | Changed::Deployment(_)
                | Changed::Subnet(_)
                | Changed::Address(_) => {}
            }
        }
        out
    }

    fn rebuild(&mut self, snap: &ClusterState) {
        let wanted: BTreeSet<Source> = sources(snap).into_iter().collect();
        let stale: Vec<Source> = self
            .parts
            .keys()
            .filter(|s| !wanted.contains(&***s))
            .map(|s| (**s).clone())
            .collect();
        for source in stale.into_iter().chain(wanted) {
            self.replace(snap, source);
        }
    }

    /// Puts `source`'s records in `snap` in place of those it had, and rebuilds the names
    /// either touches.
    fn replace(&mut self, snap: &ClusterState, source: Source) {
        let (source, old) = match self.parts.remove_entry(&source) {
            Some((shared, old)) => (shared, old),
            None => (Arc::new(source), Part::new()),
        };
        let (mut new, apexes) = part_of(snap, &self.cfg, &self.labels, &source);
        if *source == Source::Apex {
            self.zone.apexes = apexes;
        }
        // Each touched name with its contributors as they will be, worked out while the
        // zone still holds what every name had before.
        let mut touched: Vec<(Key, Contributors)> = Vec::with_capacity(old.len() + new.len());
        for (name, _) in &old {
            if in_part(&new, name).is_none() {
                let mut c = self.contributors(name);
                c.retain(|s| **s != *source);
                touched.push((Arc::clone(name), c));
            }
        }
        for (name, sets) in &mut new {
            // The name as the zone keeps it already, if it does: one copy of each name.
            if let Some(kept) = self.kept(name) {
                *name = kept;
            }
            // A name whose records from this source did not change needs no rebuild, and
            // keeps the set the zone already holds rather than a second copy of it.
            if let Some(o) = in_part(&old, name).filter(|o| o.same_records(sets)) {
                *sets = Arc::clone(o);
                continue;
            }
            let mut c = self.contributors(name);
            if let Err(at) = c.binary_search_by(|s| (**s).cmp(&*source)) {
                c.insert(at, Arc::clone(&source));
            }
            touched.push((Arc::clone(name), c));
        }
        if !new.is_empty() {
            self.parts.insert(source, new);
        }
        for (name, c) in touched {
            self.remerge(&name, &c);
            if c.len() > 1 {
                self.shared.insert(name, c);
            } else {
                self.shared.remove(&name);
            }
        }
    }

    /// The sources of `name`'s records: the shared list, or the owner of the one set the
    /// zone holds (none for a name that only stands for the names below it).
    fn contributors(&self, name: &str) -> Contributors {
        match self.shared.get(name) {
            Some(c) => c.clone(),
            None => self
                .zone
                .names
                .get(name)
                .and_then(|s| s.owner.clone())
                .into_iter()
                .collect(),
        }
    }

    /// Rebuilds one name from its contributors, and keeps the ancestors it makes exist.
    fn remerge(&mut self, name: &Key, contributors: &[Arc<Source>]) {
        let sets: Vec<&Arc<RrSets>> = contributors
            .iter()
            .filter_map(|source| in_part(self.parts.get(source)?, name))
            .collect();
        // One contributor (most names): its sets as they are, shared with its part.
        let merged: Arc<RrSets> = match sets.as_slice() {
            [one] => Arc::clone(one),
            many => {
                let mut merged = RrSets::default();
                for sets in many {
                    merge(&mut merged, sets);
                }
                merged.shrink_to_fit();
                Arc::new(merged)
            }
        };
        let old = self.zone.names.get(&**name);
        let old_len = old.map_or(0, |s| s.len());
        // A name has records of its own (rather than only standing for the names below it)
        // when its sets are not empty.
        let was_real = old.is_some_and(|s| !s.is_empty());
        let is_real = !merged.is_empty();
        self.zone.records = self.zone.records + merged.len() - old_len;
        if is_real {
            self.zone.names.insert(Arc::clone(name), merged);
            if !was_real {
                for parent in ancestors(name, &self.apex_names) {
                    let key = self.key_of(parent);
                    *self.ancestor_refs.entry(Arc::clone(&key)).or_default() += 1;
                    if !self.zone.names.contains_key(parent) {
                        self.zone.names.insert(key, Arc::new(RrSets::default()));
                    }
                }
            }
        } else {
            if was_real {
                for parent in ancestors(name, &self.apex_names) {
                    let gone = match self.ancestor_refs.get_mut(parent) {
                        Some(n) => {
                            *n -= 1;
                            *n == 0
                        }
                        None => false,
                    };
                    if gone {
                        self.ancestor_refs.remove(parent);
                        if self.zone.names.get(parent).is_some_and(|s| s.is_empty()) {
                            self.zone.names.remove(parent);
                        }
                    }
                }
            }
            if self.ancestor_refs.contains_key(&**name) {
                self.zone
                    .names
                    .insert(Arc::clone(name), Arc::new(RrSets::default()));
            } else {
                self.zone.names.remove(&**name);
            }
        }
    }

    /// `name` as already kept (by the zone, which holds every name with records and every
    /// ancestor of one), if it is.
    fn kept(&self, name: &str) -> Option<Key> {
        self.zone.names.get_key_value(name).map(|(k, _)| k.clone())
    }

    /// `name` as already kept, or a new key.
    fn key_of(&self, name: &str) -> Key {
        self.kept(name).unwrap_or_else(|| Arc::from(name))
    }
}

#[cfg(test)]
mod tests;
