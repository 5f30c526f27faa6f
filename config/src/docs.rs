//! The configuration as documents in a key-value store (SPEC §6), and back.
//!
//! What this module is for: the one mapping between a [`Config`] and the etcd keys under
//! the prefix — `settings`, `cells/<id>`, `slots`, `overrides/<key>`, `gray/<rule>` (the
//! *table documents*) — in both directions, so `config push`, admin mutations and the
//! gateway's watch all agree on it. Documents are JSON. Assembling validates everything
//! and names each problem by its key (`cells/bj-1: failover[0]: unknown cell "bj-9"`), so
//! an operator who wrote a bad document straight into etcd learns which one.
//!
//! What it must never do: talk to the store (that is [`crate::etcd`]) or accept a
//! document set that would not build a table.
//!
//! Formats:
//! - `settings`: `{"regions": [..], "routing": {..}, "timeouts": {..}}` (the file's keys).
//! - `cells/<id>`: a cell as in the file (`id`, `region`, `state`, `weight`, `failover`,
//!   `switched_to`, `protocol`, `instances`); `id` must equal `<id>`.
//! - `slots`: `{"version": n, "slot_count": 16384, "assign": [{"cell", "ranges"}]}`;
//!   every slot exactly once.
//! - `overrides/<key>`: `{"cell": "<id>"}`.
//! - `gray/<rule>`: a gray rule as in the file; `name` must equal `<rule>`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{ConfigError, Issue};
use crate::model::{CellCfg, Config, GrayCfg, Routing, SlotAssign, TimeoutsCfg};
use crate::mutate::{slot_assignments, slot_owners};

/// `settings`.
pub const SETTINGS: &str = "settings";
/// `slots`.
pub const SLOTS: &str = "slots";
/// `cells/<id>`.
pub const CELLS: &str = "cells/";
/// `overrides/<key>`.
pub const OVERRIDES: &str = "overrides/";
/// `gray/<rule>`.
pub const GRAY: &str = "gray/";
/// `audit/<time>-<txid>`.
pub const AUDIT: &str = "audit/";
/// `locks/switch`.
pub const LOCK_SWITCH: &str = "locks/switch";
/// `gateways/<id>`.
pub const GATEWAYS: &str = "gateways/";

/// Whether a key (relative to the prefix) is a table document: a change to it rebuilds the
/// routing table.
pub fn is_table_key(rel: &str) -> bool {
    rel == SETTINGS
        || rel == SLOTS
        || rel.starts_with(CELLS)
        || rel.starts_with(OVERRIDES)
        || rel.starts_with(GRAY)
}

/// The `settings` document.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SettingsDoc {
    /// Region names.
    pub regions: Vec<String>,
    /// Routing settings.
    #[serde(default)]
    pub routing: Routing,
    /// Deadlines.
    #[serde(default)]
    pub timeouts: TimeoutsCfg,
    /// Routes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<crate::model::RouteCfg>,
}

/// The `slots` document.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SlotsDoc {
    /// Slot table version: bumped by every change of the slot table.
    pub version: u64,
    /// Number of slots (must equal `settings.routing.slot_count`).
    pub slot_count: u32,
    /// Slot ranges per cell.
    pub assign: Vec<SlotAssign>,
}

/// An `overrides/<key>` document.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OverrideDoc {
    /// The cell the key is pinned to.
    pub cell: String,
}

/// One stored document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doc {
    /// Raw value.
    pub value: Vec<u8>,
    /// The store revision that last wrote it.
    pub mod_revision: i64,
}

/// The table documents of a store, by key relative to the prefix, with the revision of the
/// newest change among them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Documents {
    /// Documents by relative key.
    pub docs: BTreeMap<String, Doc>,
    /// Revision of the newest deletion seen (deletions leave no document behind).
    pub deleted_revision: i64,
}

impl Documents {
    /// Whether no table document is stored.
    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }

    /// The table version these documents make: the revision of the newest change to any
    /// table document. Gateways that saw the same changes compute the same version.
    pub fn version(&self) -> u64 {
        let newest = self
            .docs
            .values()
            .map(|d| d.mod_revision)
            .max()
            .unwrap_or(0)
            .max(self.deleted_revision);
        u64::try_from(newest).unwrap_or(0)
    }

    /// Record a put.
    pub fn put(&mut self, rel: String, value: Vec<u8>, mod_revision: i64) {
        self.docs.insert(
            rel,
            Doc {
                value,
                mod_revision,
            },
        );
    }

    /// Record a deletion at `revision`.
    pub fn delete(&mut self, rel: &str, revision: i64) {
        self.docs.remove(rel);
        self.deleted_revision = self.deleted_revision.max(revision);
    }

    /// The slot table version in the `slots` document (0 when absent or unreadable).
    pub fn slots_version(&self) -> u64 {
        self.docs
            .get(SLOTS)
            .and_then(|d| serde_json::from_slice::<SlotsDoc>(&d.value).ok())
            .map_or(0, |s| s.version)
    }

    /// Build the configuration: the process settings (listeners, admin, workers, etcd) come
    /// from `local`, everything a routing table reads comes from the documents. Every
    /// problem is reported, named by its key.
    pub fn assemble(&self, local: &Config) -> Result<Config, ConfigError> {
        let mut issues = Vec::new();
        let mut issue = |path: String, message: String| issues.push(Issue { path, message });
        let mut cfg = local.clone();
        cfg.cells.clear();
        cfg.slots.clear();
        cfg.overrides.clear();
        cfg.gray.clear();

        match self.docs.get(SETTINGS) {
            None => issue(
                SETTINGS.into(),
                "missing; bootstrap the store with `cellgate config push`".into(),
            ),
            Some(d) => match serde_json::from_slice::<SettingsDoc>(&d.value) {
                Ok(s) => {
                    cfg.regions = s.regions;
                    cfg.routing = s.routing;
                    cfg.timeouts = s.timeouts;
                    cfg.routes = s.routes;
                }
                Err(e) => issue(SETTINGS.into(), format!("not a settings document: {e}")),
            },
        }
        let mut slots_doc = None;
        match self.docs.get(SLOTS) {
            None => issue(
                SLOTS.into(),
                "missing; bootstrap the store with `cellgate config push`".into(),
            ),
            Some(d) => match serde_json::from_slice::<SlotsDoc>(&d.value) {
                Ok(s) => slots_doc = Some(s),
                Err(e) => issue(SLOTS.into(), format!("not a slot table document: {e}")),
            },
        }
        for (rel, d) in self.docs.range(CELLS.to_owned()..) {
            let Some(id) = rel.strip_prefix(CELLS) else {
                break;
            };
            match serde_json::from_slice::<CellCfg>(&d.value) {
                Ok(c) if c.id != id => issue(
                    rel.clone(),
                    format!("id {:?} does not match the key's id {id:?}", c.id),
                ),
                Ok(c) => cfg.cells.push(c),
                Err(e) => issue(rel.clone(), format!("not a cell document: {e}")),
            }
        }
        for (rel, d) in self.docs.range(OVERRIDES.to_owned()..) {
            let Some(key) = rel.strip_prefix(OVERRIDES) else {
                break;
            };
            match serde_json::from_slice::<OverrideDoc>(&d.value) {
                Ok(o) => {
                    cfg.overrides.insert(key.to_owned(), o.cell);
                }
                Err(e) => issue(rel.clone(), format!("not an override document: {e}")),
            }
        }
        for (rel, d) in self.docs.range(GRAY.to_owned()..) {
            let Some(name) = rel.strip_prefix(GRAY) else {
                break;
            };
            match serde_json::from_slice::<GrayCfg>(&d.value) {
                Ok(g) if g.name != name => issue(
                    rel.clone(),
                    format!("name {:?} does not match the key's name {name:?}", g.name),
                ),
                Ok(g) => cfg.gray.push(g),
                Err(e) => issue(rel.clone(), format!("not a gray rule document: {e}")),
            }
        }
        if let Some(s) = slots_doc {
            if s.slot_count != cfg.routing.slot_count {
                issue(
                    SLOTS.into(),
                    format!(
                        "slot_count {} differs from settings routing.slot_count {}",
                        s.slot_count, cfg.routing.slot_count
                    ),
                );
            }
            if s.assign.is_empty() {
                issue(SLOTS.into(), "the slot table assigns no slot".into());
            }
            cfg.slots = s.assign;
        }
        if !issues.is_empty() {
            return Err(ConfigError::Invalid(issues));
        }
        match cfg.validate() {
            Ok(()) => Ok(cfg),
            Err(ConfigError::Invalid(found)) => Err(ConfigError::Invalid(
                found.into_iter().map(|i| rename_issue(&cfg, i)).collect(),
            )),
            Err(other) => Err(other),
        }
    }
}

/// Rename a file path (`cells[2].failover[0]`) to the document that holds it
/// (`cells/bj-1: failover[0]`).
fn rename_issue(cfg: &Config, i: Issue) -> Issue {
    let indexed = |prefix: &str, doc: &str, name: &dyn Fn(usize) -> Option<String>| {
        let rest = i.path.strip_prefix(prefix)?;
        let (n, tail) = rest.split_once(']')?;
        let n: usize = n.parse().ok()?;
        let tail = tail.strip_prefix('.').unwrap_or(tail);
        Some(Issue {
            path: format!("{doc}{}", name(n)?),
            message: if tail.is_empty() {
                i.message.clone()
            } else {
                format!("{tail}: {}", i.message)
            },
        })
    };
    if let Some(r) = indexed("cells[", CELLS, &|n| cfg.cells.get(n).map(|c| c.id.clone())) {
        return r;
    }
    if let Some(r) = indexed("gray[", GRAY, &|n| cfg.gray.get(n).map(|g| g.name.clone())) {
        return r;
    }
    if let Some(rest) = i.path.strip_prefix("overrides[") {
        let key = rest.trim_end_matches(']').trim_matches('"');
        return Issue {
            path: format!("{OVERRIDES}{key}"),
            message: i.message,
        };
    }
    if i.path.starts_with("slots") {
        return Issue {
            path: SLOTS.into(),
            message: match i.path.strip_prefix("slots") {
                Some("") | None => i.message,
                Some(tail) => format!("assign{tail}: {}", i.message),
            },
        };
    }
    if i.path.starts_with("regions")
        || i.path.starts_with("routing")
        || i.path.starts_with("timeouts")
    {
        return Issue {
            path: SETTINGS.into(),
            message: format!("{}: {}", i.path, i.message),
        };
    }
    i
}

/// The table documents of a (valid) configuration, by relative key. The slot table is
/// written down explicitly (the bootstrap split materialised), with `slots_version`.
pub fn documents_of(
    cfg: &Config,
    slots_version: u64,
) -> Result<Vec<(String, Vec<u8>)>, ConfigError> {
    let ser = |what: &str, v: &dyn erased::Ser| {
        v.to_json()
            .map_err(|e| ConfigError::Parse(format!("cannot serialize {what}: {e}")))
    };
    let mut out = Vec::new();
    let settings = SettingsDoc {
        regions: cfg.regions.clone(),
        routing: cfg.routing.clone(),
        timeouts: cfg.timeouts.clone(),
        routes: cfg.routes.clone(),
    };
    out.push((SETTINGS.to_owned(), ser(SETTINGS, &settings)?));
    for c in &cfg.cells {
        out.push((format!("{CELLS}{}", c.id), ser("cell", c)?));
    }
    let owners = slot_owners(cfg).map_err(|e| ConfigError::Parse(e.to_string()))?;
    let slots = SlotsDoc {
        version: slots_version,
        slot_count: cfg.routing.slot_count,
        assign: slot_assignments(&cfg.cells, &owners),
    };
    out.push((SLOTS.to_owned(), ser(SLOTS, &slots)?));
    for (k, cell) in &cfg.overrides {
        out.push((
            format!("{OVERRIDES}{k}"),
            ser("override", &OverrideDoc { cell: cell.clone() })?,
        ));
    }
    for g in &cfg.gray {
        out.push((format!("{GRAY}{}", g.name), ser("gray rule", g)?));
    }
    Ok(out)
}

/// A changed document: `(key, before, after)`; `None` where it does not exist.
pub type DocChange = (String, Option<Vec<u8>>, Option<Vec<u8>>);

/// The documents that differ between two configurations: `(key, before, after)` where a
/// missing side is `None`. The slot table counts as changed only when an assignment
/// changed, and then carries `slots_version + 1`.
pub fn changed_documents(
    before: &Config,
    after: &Config,
    slots_version: u64,
) -> Result<Vec<DocChange>, ConfigError> {
    let b: BTreeMap<String, Vec<u8>> = documents_of(before, slots_version)?.into_iter().collect();
    let mut a: BTreeMap<String, Vec<u8>> =
        documents_of(after, slots_version)?.into_iter().collect();
    if a.get(SLOTS) != b.get(SLOTS) {
        let bumped = documents_of(after, slots_version + 1)?;
        if let Some((_, v)) = bumped.into_iter().find(|(k, _)| k == SLOTS) {
            a.insert(SLOTS.to_owned(), v);
        }
    }
    let mut out = Vec::new();
    for (k, bv) in &b {
        match a.get(k) {
            Some(av) if av == bv => {}
            Some(av) => out.push((k.clone(), Some(bv.clone()), Some(av.clone()))),
            None => out.push((k.clone(), Some(bv.clone()), None)),
        }
    }
    for (k, av) in &a {
        if !b.contains_key(k) {
            out.push((k.clone(), None, Some(av.clone())));
        }
    }
    Ok(out)
}

mod erased {
    /// Object-safe JSON serialization, so one closure serializes every document type.
    pub trait Ser {
        fn to_json(&self) -> Result<Vec<u8>, serde_json::Error>;
    }
    impl<T: serde::Serialize> Ser for T {
        fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
            serde_json::to_vec(self)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn demo() -> Config {
        Config::from_yaml(crate::DEMO_YAML).unwrap()
    }

    fn docs_of(cfg: &Config) -> Documents {
        let mut d = Documents::default();
        for (i, (k, v)) in documents_of(cfg, 1).unwrap().into_iter().enumerate() {
            d.put(k, v, 10 + i as i64);
        }
        d
    }

    #[test]
    fn a_configuration_round_trips_through_documents() {
        let cfg = demo();
        let d = docs_of(&cfg);
        let back = d.assemble(&cfg).unwrap();
        assert_eq!(back.cells, cfg.cells);
        assert_eq!(back.slots, cfg.slots);
        assert_eq!(back.gray, cfg.gray);
        assert_eq!(back.routing, cfg.routing);
        assert_eq!(d.version(), 10 + d.docs.len() as u64 - 1);
        assert_eq!(d.slots_version(), 1);
    }

    #[test]
    fn bad_documents_are_named_by_key() {
        let cfg = demo();
        let mut d = docs_of(&cfg);
        d.put("cells/bj-1".into(), b"{not json".to_vec(), 99);
        let e = d.assemble(&cfg).unwrap_err().to_string();
        assert!(e.contains("cells/bj-1: not a cell document"), "{e}");

        let mut d = docs_of(&cfg);
        let mut c = cfg.cells[2].clone();
        c.failover = vec!["nowhere".into()];
        d.put("cells/sh-1".into(), serde_json::to_vec(&c).unwrap(), 99);
        let e = d.assemble(&cfg).unwrap_err().to_string();
        assert!(
            e.contains("cells/sh-1: failover[0]: unknown cell \"nowhere\""),
            "{e}"
        );

        let mut d = docs_of(&cfg);
        let holes =
            r#"{"version":2,"slot_count":16384,"assign":[{"cell":"bj-1","ranges":["0-100"]}]}"#;
        d.put("slots".into(), holes.as_bytes().to_vec(), 99);
        let e = d.assemble(&cfg).unwrap_err().to_string();
        assert!(
            e.contains("slots: 16283 of 16384 slots have no cell"),
            "{e}"
        );

        let mut d = docs_of(&cfg);
        let unknown =
            r#"{"version":2,"slot_count":16384,"assign":[{"cell":"zz","ranges":["0-16383"]}]}"#;
        d.put("slots".into(), unknown.as_bytes().to_vec(), 99);
        let e = d.assemble(&cfg).unwrap_err().to_string();
        assert!(
            e.contains("slots: assign[0].cell: unknown cell \"zz\""),
            "{e}"
        );
    }

    #[test]
    fn changed_documents_lists_only_what_changed() {
        let cfg = demo();
        let after = crate::Mutation::Drain {
            cell: "bj-1".into(),
        }
        .apply(&cfg)
        .unwrap();
        let ch = changed_documents(&cfg, &after, 3).unwrap();
        assert_eq!(ch.len(), 1);
        assert_eq!(ch[0].0, "cells/bj-1");
        let after = crate::Mutation::MoveSlots {
            from: "bj-1".into(),
            to: "sh-1".into(),
            count: 5,
        }
        .apply(&cfg)
        .unwrap();
        let ch = changed_documents(&cfg, &after, 3).unwrap();
        assert_eq!(ch.len(), 1);
        let s: SlotsDoc = serde_json::from_slice(ch[0].2.as_ref().unwrap()).unwrap();
        assert_eq!(s.version, 4);
    }
}
