//! The last known good configuration on local disk.
//!
//! What it is for: static stability. Every time a gateway fed by etcd swaps in a valid
//! table, it writes the configuration that built it (and the table version) here, so a
//! gateway restarted while etcd is unreachable starts from the same table and makes the
//! same decisions as before.
//!
//! Format: one JSON object `{"format": 1, "version": <table version>, "checksum":
//! "xxh3-64:<hex>", "config": "<the configuration as a JSON string>"}`. The checksum
//! covers the exact bytes of `config`; a torn or edited file is refused, never half-used.
//! Writes go to a temporary file that is synced and renamed over the old one. The file holds
//! secrets (`admin.token`, `admin.tokens`, the JWT `hs256_secret`), so on Unix it is
//! readable and writable by its owner only (mode `0600`).
//!
//! What it must never do: return a configuration whose checksum does not match, or leave
//! a partly written file under the final name.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::model::Config;

/// Why the last known good file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LkgError {
    /// Reading or writing failed.
    #[error("last known good table {path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// The file is not in the expected format.
    #[error("last known good table {path}: {message}")]
    Corrupt {
        /// File.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

#[derive(Serialize, Deserialize)]
struct File {
    format: u32,
    version: u64,
    checksum: String,
    config: String,
}

fn checksum(bytes: &[u8]) -> String {
    format!("xxh3-64:{:016x}", xxh3_64(bytes))
}

/// Write `config` (which built table `version`) to `path`, atomically.
pub fn save(path: &Path, version: u64, config: &Config) -> Result<(), LkgError> {
    let io = |source| LkgError::Io {
        path: path.to_owned(),
        source,
    };
    let text = serde_json::to_string(config).map_err(|e| LkgError::Corrupt {
        path: path.to_owned(),
        message: format!("cannot serialize: {e}"),
    })?;
    let file = File {
        format: 1,
        version,
        checksum: checksum(text.as_bytes()),
        config: text,
    };
    let bytes = serde_json::to_vec(&file).map_err(|e| LkgError::Corrupt {
        path: path.to_owned(),
        message: format!("cannot serialize: {e}"),
    })?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension("tmp");
    {
        let mut f = create_private(&tmp).map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

/// Create (or truncate) `path` readable and writable by its owner only: the file holds the
/// admin tokens and the JWT secret. A file left over from an earlier write keeps whatever
/// mode it had when opened, so the mode is set again explicitly.
#[cfg(unix)]
fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(f)
}

#[cfg(not(unix))]
fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::File::create(path)
}

/// Read and check `path`: the table version and the configuration (validated).
pub fn load(path: &Path) -> Result<(u64, Config), LkgError> {
    let corrupt = |message: String| LkgError::Corrupt {
        path: path.to_owned(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|source| LkgError::Io {
        path: path.to_owned(),
        source,
    })?;
    let file: File =
        serde_json::from_slice(&bytes).map_err(|e| corrupt(format!("not JSON: {e}")))?;
    if file.format != 1 {
        return Err(corrupt(format!("unknown format {}", file.format)));
    }
    let sum = checksum(file.config.as_bytes());
    if sum != file.checksum {
        return Err(corrupt(format!(
            "checksum {} does not match the content ({sum})",
            file.checksum
        )));
    }
    let config: Config =
        serde_json::from_str(&file.config).map_err(|e| corrupt(format!("configuration: {e}")))?;
    config
        .validate()
        .map_err(|e| corrupt(format!("configuration: {e}")))?;
    Ok((file.version, config))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn saved_tables_load_back_and_tampering_is_refused() {
        let dir = std::env::temp_dir().join(format!("cellgate-lkg-{}", std::process::id()));
        let path = dir.join("lkg.json");
        let cfg = Config::from_yaml(crate::DEMO_YAML).unwrap();
        save(&path, 42, &cfg).unwrap();
        let (v, back) = load(&path).unwrap();
        assert_eq!(v, 42);
        assert_eq!(back, cfg);

        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("bj-2", "bj-9")).unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("checksum"), "{e}");

        std::fs::write(&path, &text[..text.len() / 2]).unwrap();
        assert!(load(&path).unwrap_err().to_string().contains("not JSON"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[cfg(unix)]
    #[test]
    fn the_file_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("cellgate-lkg-mode-{}", std::process::id()));
        let path = dir.join("lkg.json");
        let mode = |p: &Path| {
            format!(
                "{:o}",
                std::fs::metadata(p).unwrap().permissions().mode() & 0o777
            )
        };
        let cfg = Config::from_yaml(crate::DEMO_YAML).unwrap();
        save(&path, 1, &cfg).unwrap();
        assert_eq!(mode(&path), "600");
        // A file (and a stale temporary file) left world-readable by an older version.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, "stale").unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
        save(&path, 2, &cfg).unwrap();
        assert_eq!(mode(&path), "600");
        assert_eq!(load(&path).unwrap().0, 2);
        let _ = std::fs::remove_dir_all(dir);
    }
}
