//! The VIP table kept up to date by what changed: each app keeps what it contributes (its VIP
//! ports and its tasks as backends), and a change recomputes only the apps it touches and the
//! VIPs those contribute to. [`vip_table_from`](crate::vip_table_from) stays as the oracle the
//! tests hold this to.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use dcnet_node_core::model::{AppId, VipTarget, vip_label};
use dcnet_node_core::{Changed, ClusterState};

use crate::table::{Contribution, Entry, VipKey, VipTable, contribution_of, merge_entry};

#[derive(Default)]
pub(crate) struct IncrementalTable {
    /// The snapshot applied last.
    last: Option<Arc<ClusterState>>,
    /// The VIPs each app contributes to, in the order of its contribution.
    contributions: HashMap<AppId, Vec<VipKey>>,
    /// What each app contributes to each VIP, in app order: a VIP's merge reads its parts
    /// in a row, not one lookup per app (a VIP many apps share has hundreds).
    contributors: BTreeMap<VipKey, Vec<(AppId, Entry)>>,
    /// The apps that ask for each named VIP, by its label, and the labels of each app.
    by_label: HashMap<String, BTreeSet<AppId>>,
    labels_of: HashMap<AppId, Box<[String]>>,
    table: VipTable,
}

/// What an update changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Touched {
    /// Every VIP that may differ from the table before.
    pub(crate) keys: BTreeSet<VipKey>,
    /// Whether apps or VIP allocations changed (what allocation and readiness depend on).
    pub(crate) apps_or_vips: bool,
    pub(crate) is_rebuild: bool,
}

impl IncrementalTable {
    pub(crate) fn table(&self) -> &VipTable {
        &self.table
    }

    /// Brings the table to `snap`; returns what it touched.
    pub(crate) fn update(&mut self, snap: &Arc<ClusterState>) -> Touched {
        let changes = self
            .last
            .as_ref()
            .and_then(|before| Some((before.clone(), snap.changes_since(before.revision)?)));
        let mut touched = Touched::default();
        let apps: BTreeSet<AppId> = match changes {
            Some((before, changes)) => {
                let (mut apps, all) = snap.apps_touched(&before, &changes);
                if all {
                    self.everything(snap, &mut touched)
                } else {
                    for change in &changes {
                        match change {
                            Changed::Vip(label) => {
                                touched.apps_or_vips = true;
                                if let Some(users) = self.by_label.get(label) {
                                    apps.extend(users.iter().cloned());
                                }
                            }
                            Changed::App(_) => touched.apps_or_vips = true,
                            _ => {}
                        }
                    }
                    apps
                }
            }
            None => self.everything(snap, &mut touched),
        };
        for app in apps {
            self.replace(snap, app, &mut touched.keys);
        }
        // Each VIP once, after every app's part is in: a VIP many changed apps share (a
        // burst, a rebuild) is merged once, not once per app.
        for key in &touched.keys {
            self.remerge(*key);
        }
        self.last = Some(snap.clone());
        touched
    }

    /// Every app of `snap` and of the table: a rebuild.
    fn everything(&mut self, snap: &ClusterState, touched: &mut Touched) -> BTreeSet<AppId> {
        touched.is_rebuild = true;
        touched.apps_or_vips = true;
        snap.apps
            .keys()
            .cloned()
            .chain(self.contributions.keys().cloned())
            .collect()
    }

    /// Puts `app`'s contribution in `snap` in place of the one it had, and adds the VIPs
    /// whose merge it changes to `touched` (merged by the caller).
    fn replace(&mut self, snap: &ClusterState, app: AppId, touched: &mut BTreeSet<VipKey>) {
        let new: Contribution = snap
            .apps
            .get(&app)
            .map(|a| contribution_of(snap, a))
            .unwrap_or_default();
        self.index_labels(snap, &app);
        let old = self.contributions.remove(&app).unwrap_or_default();
        let is_same = old.len() == new.len()
            && old.iter().zip(&new).all(|(old_key, (key, entry))| {
                old_key == key && self.part(key, &app) == Some(entry)
            });
        if is_same {
            if !old.is_empty() {
                self.contributions.insert(app, old);
            }
            return;
        }
        for key in &old {
            if let Some(parts) = self.contributors.get_mut(key) {
                if let Ok(i) = parts.binary_search_by(|(a, _)| a.cmp(&app)) {
                    parts.remove(i);
                }
                if parts.is_empty() {
                    self.contributors.remove(key);
                }
            }
            touched.insert(*key);
        }
        let keys: Vec<VipKey> = new.iter().map(|(key, _)| *key).collect();
        for (key, entry) in new {
            let parts = self.contributors.entry(key).or_default();
            match parts.binary_search_by(|(a, _)| a.cmp(&app)) {
                Ok(i) => parts[i].1 = entry,
                Err(i) => parts.insert(i, (app.clone(), entry)),
            }
            touched.insert(key);
        }
        if !keys.is_empty() {
            self.contributions.insert(app, keys);
        }
    }

    /// What `app` contributes to the VIP `key`.
    fn part(&self, key: &VipKey, app: &AppId) -> Option<&Entry> {
        let parts = self.contributors.get(key)?;
        let i = parts.binary_search_by(|(a, _)| a.cmp(app)).ok()?;
        Some(&parts[i].1)
    }

    /// Which named VIPs `app` asks for, whether or not they have an address yet: a change of
    /// one's allocation touches the app.
    fn index_labels(&mut self, snap: &ClusterState, app: &AppId) {
        for label in self.labels_of.remove(app).unwrap_or_default() {
            if let Some(users) = self.by_label.get_mut(&label) {
                users.remove(app);
                if users.is_empty() {
                    self.by_label.remove(&label);
                }
            }
        }
        let Some(a) = snap.apps.get(app) else {
            return;
        };
        // From the specs by reference, into a slice of its own size: collected from their
        // `into_iter`, the labels would reuse (and keep for as long as the app lives) the
        // specs' larger allocation.
        let labels: Box<[String]> = a
            .vips()
            .0
            .iter()
            .filter_map(|spec| match &spec.target {
                VipTarget::Named(name) => Some(vip_label(name)),
                VipTarget::Ip(_) => None,
            })
            .collect();
        for label in &labels {
            self.by_label
                .entry(label.clone())
                .or_default()
                .insert(app.clone());
        }
        if !labels.is_empty() {
            self.labels_of.insert(app.clone(), labels);
        }
    }

    fn remerge(&mut self, key: VipKey) {
        let mut merged: Option<Entry> = None;
        for (_, entry) in self.contributors.get(&key).into_iter().flatten() {
            merge_entry(&mut merged, entry);
        }
        match merged {
            Some(entry) => {
                self.table.insert(key, Arc::new(entry));
            }
            None => {
                self.table.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests;
