//! The admin overlay: admin mutations made without etcd, kept next to the configuration
//! file so that a file reload and an admin mutation compose.
//!
//! What it is for: without etcd, the *desired* configuration is the file with the overlay
//! applied on top. The overlay holds only what admin mutations changed relative to the
//! file — per cell its state, base weight and switch target, and the slot table once a
//! slot moved — so editing other parts of the file (instances, gray rules, new cells)
//! keeps working, and the admin's changes survive both reloads and restarts. Restoring a
//! cell to what the file says removes its entry.
//!
//! Rules, in order: the file is read and validated; each overlay entry for a cell the file
//! still has replaces that field; entries for cells the file no longer has are dropped
//! (with a warning); an overlay slot table replaces the file's. If the result is invalid
//! (say the file removed a cell that the overlay's slot table still uses) the reload is
//! refused with the reason and the previous table keeps serving.
//!
//! What it must never do: hold anything but these fields, or be written partially (it is
//! written to a temporary file, synced and renamed).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use cellgate_routing::CellState;
use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::model::{Config, SlotAssign};
use crate::mutate::{slot_assignments, slot_owners};

/// One cell's admin changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CellOverlay {
    /// State set by drain / switch / restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<CellState>,
    /// Base weight set by `PUT /admin/cells/{id}/weight`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Switch target; `""` clears a switch the file has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switched_to: Option<String>,
}

/// Admin changes relative to the file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminOverlay {
    /// Per cell.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub cells: BTreeMap<String, CellOverlay>,
    /// The whole slot table, once a slot moved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slots: Option<Vec<SlotAssign>>,
}

impl AdminOverlay {
    /// Whether the overlay changes nothing.
    pub fn is_empty(&self) -> bool {
        self.cells.is_empty() && self.slots.is_none()
    }

    /// What `desired` changes relative to `file`.
    pub fn diff(file: &Config, desired: &Config) -> Self {
        let mut out = Self::default();
        for d in &desired.cells {
            let Some(f) = file.cells.iter().find(|c| c.id == d.id) else {
                continue;
            };
            let mut o = CellOverlay::default();
            if d.state != f.state {
                o.state = Some(d.state);
            }
            if d.weight != f.weight {
                o.weight = Some(d.weight);
            }
            if d.switched_to != f.switched_to {
                o.switched_to = Some(d.switched_to.clone().unwrap_or_default());
            }
            if o != CellOverlay::default() {
                out.cells.insert(d.id.clone(), o);
            }
        }
        let ids = |c: &Config| -> Option<Vec<String>> {
            let owners = slot_owners(c).ok()?;
            Some(owners.into_iter().map(|i| c.cells[i].id.clone()).collect())
        };
        if ids(file) != ids(desired) {
            if let Ok(owners) = slot_owners(desired) {
                out.slots = Some(slot_assignments(&desired.cells, &owners));
            }
        }
        out
    }

    /// The file with the overlay applied, validated, and the names of overlay cells the
    /// file no longer has (dropped).
    pub fn apply(&self, file: &Config) -> Result<(Config, Vec<String>), ConfigError> {
        let mut cfg = file.clone();
        let mut dropped = Vec::new();
        for (id, o) in &self.cells {
            let Some(c) = cfg.cells.iter_mut().find(|c| &c.id == id) else {
                dropped.push(id.clone());
                continue;
            };
            if let Some(s) = o.state {
                c.state = s;
            }
            if let Some(w) = o.weight {
                c.weight = w;
            }
            if let Some(t) = &o.switched_to {
                c.switched_to = (!t.is_empty()).then(|| t.clone());
            }
        }
        if let Some(slots) = &self.slots {
            cfg.slots = slots.clone();
        }
        cfg.validate().map_err(|e| match e {
            ConfigError::Invalid(issues) => ConfigError::Invalid(
                issues
                    .into_iter()
                    .map(|mut i| {
                        i.path = format!("admin overlay: {}", i.path);
                        i
                    })
                    .collect(),
            ),
            other => other,
        })?;
        Ok((cfg, dropped))
    }

    /// Read an overlay file; a missing file is an empty overlay.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| ConfigError::Parse(format!("admin overlay {}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(ConfigError::Io {
                path: path.display().to_string(),
                message: e.to_string(),
            }),
        }
    }

    /// Write the overlay atomically (an empty overlay removes the file).
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let io = |e: std::io::Error| ConfigError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        if self.is_empty() {
            return match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(e)),
                _ => Ok(()),
            };
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let bytes = serde_json::to_vec_pretty(self)
            .map_err(|e| ConfigError::Parse(format!("admin overlay: {e}")))?;
        let tmp = path.with_extension("tmp");
        {
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(&bytes).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, path).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::Mutation;

    #[test]
    fn admin_changes_survive_a_file_edit_and_restore_clears_them() {
        let file = Config::from_yaml(crate::DEMO_YAML).unwrap();
        let desired = Mutation::Switch {
            cell: "bj-1".into(),
            to: "sh-1".into(),
        }
        .apply(&file)
        .unwrap();
        let desired = Mutation::MoveSlots {
            from: "bj-2".into(),
            to: "sh-1".into(),
            count: 7,
        }
        .apply(&desired)
        .unwrap();
        let ov = AdminOverlay::diff(&file, &desired);
        assert_eq!(ov.cells.len(), 1);
        assert!(ov.slots.is_some());

        // The file changes something else: an instance weight of sh-1.
        let mut edited = file.clone();
        edited.cells[2].instances[0].weight = 7;
        let (merged, dropped) = ov.apply(&edited).unwrap();
        assert!(dropped.is_empty());
        assert_eq!(merged.cells[0].state, CellState::Draining);
        assert_eq!(merged.cells[0].switched_to.as_deref(), Some("sh-1"));
        assert_eq!(merged.cells[2].instances[0].weight, 7);
        assert_eq!(merged.slots, desired.slots);

        let restored = Mutation::Restore {
            cell: "bj-1".into(),
        }
        .apply(&merged)
        .unwrap();
        let ov2 = AdminOverlay::diff(&edited, &restored);
        assert!(ov2.cells.is_empty());

        // The file drops a cell the overlay's slot table uses: refused, with the reason.
        let mut fewer = file.clone();
        fewer.cells.retain(|c| c.id != "sh-1");
        for c in &mut fewer.cells {
            c.failover.retain(|f| f != "sh-1");
        }
        fewer.slots.clear();
        let e = ov.apply(&fewer).unwrap_err().to_string();
        assert!(e.contains("admin overlay"), "{e}");
    }
}
