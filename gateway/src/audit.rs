//! The audit log: where admin mutations and automatic switches are recorded.
//!
//! What it is for: one small API every module can call to append an audit event
//! ([`AuditSink::append`], or [`Audit::record`] from code that must not wait), and the read
//! side behind `GET /admin/audit`. With etcd configured, records live under
//! `audit/<time>-<txid>` (admin mutations write theirs inside the switch transaction, see
//! [`cellgate_config::etcd::EtcdStore::commit`]); without it, in an append-only JSON-lines
//! file (`admin.audit_file`, default `<state dir>/audit.jsonl`), each record synced to disk
//! before the call returns.
//!
//! Example, from the health engine recording an automatic failover:
//!
//! ```ignore
//! let mut rec = AuditRecord::new(format!("gateway:{}", shared.control.gateway_id), "failover");
//! rec.target = Some("bj-1".into());
//! rec.after = serde_json::json!({"to": "bj-2", "reason": "error rate 2.1% over 30s"});
//! rec.duration_ms = 840.0;
//! shared.control.audit.record(rec); // never blocks the caller
//! ```
//!
//! What it must never do: block a worker thread, lose a record silently (failures are
//! logged with the record), or rewrite past records.

use std::future::Future;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use cellgate_config::etcd::{EtcdStore, StoreError};
pub use cellgate_config::AuditRecord;

/// A boxed future, for object-safe async methods.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why an audit record could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The local audit file failed.
    #[error("audit file {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// etcd failed.
    #[error("audit in etcd: {0}")]
    Store(#[from] StoreError),
}

/// Where audit records go. Implementations must be cheap to call concurrently.
pub trait AuditSink: Send + Sync + std::fmt::Debug {
    /// Append one record durably; returns once it is stored.
    fn append<'a>(&'a self, rec: &'a AuditRecord) -> BoxFuture<'a, Result<(), AuditError>>;
    /// The newest `limit` records, newest first.
    fn recent(&self, limit: usize) -> BoxFuture<'_, Result<Vec<AuditRecord>, AuditError>>;
}

/// The append-only local file.
#[derive(Debug)]
pub struct FileAudit {
    path: PathBuf,
    write: tokio::sync::Mutex<()>,
}

impl FileAudit {
    /// A log at `path` (created on first append).
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            write: tokio::sync::Mutex::new(()),
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Longest tail of the local file read for `recent` (older records stay in the file).
const TAIL_BYTES: u64 = 8 << 20;

fn read_tail(path: &Path, limit: usize) -> std::io::Result<Vec<AuditRecord>> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    let start = len.saturating_sub(TAIL_BYTES);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = String::new();
    f.take(TAIL_BYTES).read_to_string(&mut buf)?;
    let mut lines: Vec<&str> = buf.lines().collect();
    if start > 0 && !lines.is_empty() {
        lines.remove(0); // probably cut in the middle
    }
    Ok(lines
        .iter()
        .rev()
        .filter_map(|l| serde_json::from_str(l).ok())
        .take(limit)
        .collect())
}

impl AuditSink for FileAudit {
    fn append<'a>(&'a self, rec: &'a AuditRecord) -> BoxFuture<'a, Result<(), AuditError>> {
        Box::pin(async move {
            let err = |source| AuditError::File {
                path: self.path.clone(),
                source,
            };
            let mut line = serde_json::to_vec(rec)
                .map_err(|e| err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
            line.push(b'\n');
            let _guard = self.write.lock().await;
            let path = self.path.clone();
            tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)?;
                f.write_all(&line)?;
                f.sync_data()
            })
            .await
            .map_err(|e| err(std::io::Error::other(e)))?
            .map_err(err)
        })
    }

    fn recent(&self, limit: usize) -> BoxFuture<'_, Result<Vec<AuditRecord>, AuditError>> {
        Box::pin(async move {
            let path = self.path.clone();
            tokio::task::spawn_blocking(move || read_tail(&path, limit))
                .await
                .map_err(|e| AuditError::File {
                    path: self.path.clone(),
                    source: std::io::Error::other(e),
                })?
                .map_err(|source| AuditError::File {
                    path: self.path.clone(),
                    source,
                })
        })
    }
}

/// Records under `audit/` in etcd.
#[derive(Debug)]
pub struct EtcdAudit {
    store: EtcdStore,
}

impl EtcdAudit {
    /// Records in `store`.
    pub fn new(store: EtcdStore) -> Self {
        Self { store }
    }
}

impl AuditSink for EtcdAudit {
    fn append<'a>(&'a self, rec: &'a AuditRecord) -> BoxFuture<'a, Result<(), AuditError>> {
        Box::pin(async move {
            self.store.put_audit(rec).await?;
            Ok(())
        })
    }

    fn recent(&self, limit: usize) -> BoxFuture<'_, Result<Vec<AuditRecord>, AuditError>> {
        Box::pin(async move { Ok(self.store.audit(limit).await?) })
    }
}

/// The gateway's audit log: a sink plus the runtime that writes records for callers that
/// must not wait.
#[derive(Debug, Clone)]
pub struct Audit {
    sink: Arc<dyn AuditSink>,
    runtime: tokio::runtime::Handle,
}

impl Audit {
    /// An audit log writing to `sink`, with background writes on `runtime`.
    pub fn new(sink: Arc<dyn AuditSink>, runtime: tokio::runtime::Handle) -> Self {
        Self { sink, runtime }
    }

    /// The sink.
    pub fn sink(&self) -> Arc<dyn AuditSink> {
        Arc::clone(&self.sink)
    }

    /// Append and wait until stored.
    pub async fn append(&self, rec: &AuditRecord) -> Result<(), AuditError> {
        self.sink.append(rec).await
    }

    /// The newest `limit` records, newest first.
    pub async fn recent(&self, limit: usize) -> Result<Vec<AuditRecord>, AuditError> {
        self.sink.recent(limit).await
    }

    /// Append in the background (for automatic actions on threads that must not wait); a
    /// failure is logged with the whole record.
    pub fn record(&self, rec: AuditRecord) {
        let sink = Arc::clone(&self.sink);
        self.runtime.spawn(async move {
            if let Err(e) = sink.append(&rec).await {
                tracing::error!(error = %e, record = %serde_json::to_string(&rec).unwrap_or_default(), "audit record not stored");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn the_local_file_keeps_records_in_order_newest_first() {
        let dir = std::env::temp_dir().join(format!("cellgate-audit-{}", std::process::id()));
        let a = FileAudit::new(dir.join("audit.jsonl"));
        assert!(a.recent(10).await.unwrap().is_empty());
        for i in 0..5 {
            let mut r = AuditRecord::new("admin", "weight");
            r.target = Some(format!("c{i}"));
            a.append(&r).await.unwrap();
        }
        let got = a.recent(3).await.unwrap();
        let targets: Vec<_> = got.iter().map(|r| r.target.clone().unwrap()).collect();
        assert_eq!(targets, ["c4", "c3", "c2"]);
        let _ = std::fs::remove_dir_all(dir);
    }
}
