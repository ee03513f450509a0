//! The node's mount table: which volumes are published where, persisted on disk so a
//! restarted plugin knows its volumes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One published volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub volume_id: String,
    pub target_path: PathBuf,
    /// What the pod asked for: `clipImage NAMESPACE/NAME` or `image REF`.
    pub source: String,
    /// Digest of the arguments that identify the publish, to tell a retry from a conflict.
    pub fingerprint: String,
    /// The index served at the target (its digest).
    pub index_digest: String,
    #[serde(default)]
    pub pod_namespace: String,
    #[serde(default)]
    pub pod_name: String,
}

/// Records by volume id, saved as JSON after every change (temp file + rename).
#[derive(Debug)]
pub struct MountTable {
    path: PathBuf,
    records: BTreeMap<String, VolumeRecord>,
}

impl MountTable {
    /// Loads the table at `path`; a missing file is an empty table. A damaged file is moved
    /// aside (and reported) rather than stopping the plugin.
    pub fn load(path: &Path) -> Result<Self> {
        let records = match std::fs::read(path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(r) => r,
                Err(e) => {
                    let aside = path.with_extension("damaged");
                    tracing::error!(path = %path.display(), error = %e, "mount table is damaged; moving it aside");
                    std::fs::rename(path, &aside).ok();
                    BTreeMap::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => {
                return Err(Error::File {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        Ok(Self {
            path: path.to_owned(),
            records,
        })
    }

    fn save(&self) -> Result<()> {
        let io = |source| Error::File {
            path: self.path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let tmp = self.path.with_extension("tmp");
        let json = serde_json::to_vec_pretty(&self.records)
            .map_err(std::io::Error::other)
            .map_err(io)?;
        std::fs::write(&tmp, json).map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)
    }

    pub fn get(&self, volume_id: &str) -> Option<&VolumeRecord> {
        self.records.get(volume_id)
    }

    /// The volume published at `target`, if any.
    pub fn by_target(&self, target: &Path) -> Option<&VolumeRecord> {
        self.records.values().find(|r| r.target_path == target)
    }

    pub fn insert(&mut self, record: VolumeRecord) -> Result<()> {
        self.records.insert(record.volume_id.clone(), record);
        self.save()
    }

    pub fn remove(&mut self, volume_id: &str) -> Result<Option<VolumeRecord>> {
        let r = self.records.remove(volume_id);
        if r.is_some() {
            self.save()?;
        }
        Ok(r)
    }

    pub fn records(&self) -> Vec<VolumeRecord> {
        self.records.values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> VolumeRecord {
        VolumeRecord {
            volume_id: id.into(),
            target_path: PathBuf::from(format!("/targets/{id}")),
            source: "image x".into(),
            fingerprint: "f".into(),
            index_digest: "sha256:00".into(),
            pod_namespace: "ns".into(),
            pod_name: "pod".into(),
        }
    }

    #[test]
    fn records_survive_a_reload() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("state/volumes.json");
        let mut t = MountTable::load(&path)?;
        t.insert(record("a"))?;
        t.insert(record("b"))?;
        t.remove("a")?;
        let t = MountTable::load(&path)?;
        assert_eq!(t.records(), vec![record("b")]);
        assert_eq!(
            t.by_target(Path::new("/targets/b"))
                .map(|r| r.volume_id.as_str()),
            Some("b")
        );
        Ok(())
    }

    #[test]
    fn a_damaged_table_is_moved_aside() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("volumes.json");
        std::fs::write(&path, b"{not json")?;
        let t = MountTable::load(&path)?;
        assert!(t.is_empty());
        assert!(path.with_extension("damaged").exists());
        Ok(())
    }
}
