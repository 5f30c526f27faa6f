//! The etcd configuration store (SPEC §6): load, watch, the switch protocol, the audit
//! log, fleet registration, and bootstrap from a file.
//!
//! What this module is for: every conversation cellgate has with etcd. Keys live under a
//! prefix (default `/cellgate/`); [`crate::docs`] says what the table documents look like.
//!
//! - **Load and watch**: [`EtcdStore::load`] reads every table document and the revision
//!   it was read at; [`EtcdStore::watch`] streams changes from the next revision. A watch
//!   whose start revision was compacted reports [`StoreError::Compacted`]; the caller then
//!   loads everything again.
//! - **Switch protocol** ([`EtcdStore::commit`]): take the `locks/switch` lock under a
//!   short lease; in one transaction compare that no table document changed after the
//!   table version the change was planned against (and that the lock is still held), write
//!   the changed documents and the audit record; release the lock. Two controllers racing
//!   from the same version: one transaction succeeds, the other gets
//!   [`StoreError::Conflict`] and writes nothing.
//! - **Audit**: `audit/<unix ms>-<txid>` records, newest first on read.
//! - **Fleet**: `gateways/<id>` documents attached to a lease kept alive by their gateway.
//!
//! Limitation: a table document *deleted* after the planned version is not seen by the
//! compare (etcd keeps no revision for a deleted key); cellgate itself never deletes table
//! documents outside `config push`.
//!
//! What it must never do: sit on the request path, block a thread, or write a table
//! document outside a compare-and-swap transaction (except `config push`, which does its
//! own compare).

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, LockOptions, PutOptions,
    SortOrder, SortTarget, Txn, TxnOp, WatchOptions, WatchStream,
};

use crate::audit::AuditRecord;
use crate::docs::{self, Documents};
use crate::model::Config;

/// How long one switch may wait for the `locks/switch` lock.
pub const LOCK_WAIT: Duration = Duration::from_secs(5);
/// TTL of the lease that holds the switch lock (released early on success).
pub const LOCK_LEASE_TTL_S: i64 = 10;
/// How long any single etcd call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// Why the store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// etcd could not be reached or did not answer in time.
    #[error("etcd unavailable ({endpoints}): {message}")]
    Unavailable {
        /// The endpoints tried.
        endpoints: String,
        /// What failed.
        message: String,
    },
    /// A watch start revision was compacted away; load everything again.
    #[error("watch from revision {0} is no longer available (compacted); reloading everything")]
    Compacted(i64),
    /// The table documents changed after the version the change was planned against.
    #[error("the configuration changed after table version {base}; nothing was written — re-read and retry")]
    Conflict {
        /// The planned-against version.
        base: u64,
    },
    /// The switch lock was not obtained in time.
    #[error("another change holds {key} for more than {waited:?}; nothing was written")]
    LockBusy {
        /// The lock key.
        key: String,
        /// How long we waited.
        waited: Duration,
    },
    /// The request itself is wrong (for example pushing over an existing configuration).
    #[error("{0}")]
    Refused(String),
    /// A transaction was sent and no answer came back, and its audit record is not (yet)
    /// there to say it was applied.
    #[error("etcd did not answer the change ({message}); it may have been applied: audit record {audit_id} (GET /admin/audit) is there if it was — re-read before retrying")]
    Indeterminate {
        /// The change's audit record id, written only by its transaction.
        audit_id: String,
        /// What failed.
        message: String,
    },
}

/// One change of a table document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A document was written.
    Put {
        /// Key relative to the prefix.
        rel: String,
        /// New value.
        value: Vec<u8>,
        /// Revision of the write.
        revision: i64,
    },
    /// A document was deleted.
    Delete {
        /// Key relative to the prefix.
        rel: String,
        /// Revision of the deletion.
        revision: i64,
    },
}

/// Everything read by [`EtcdStore::load`].
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The table documents.
    pub docs: Documents,
    /// The store revision they were read at; watch from `revision + 1`.
    pub revision: i64,
}

/// A connection to the etcd cluster, scoped to a key prefix. Cheap to clone.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    prefix: String,
    endpoints: String,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .finish()
    }
}

async fn timed<T, E: std::fmt::Display>(
    store: &EtcdStore,
    what: &str,
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(store.unavailable(format!("{what}: {e}"))),
        Err(_) => Err(store.unavailable(format!("{what}: no answer within {CALL_TIMEOUT:?}"))),
    }
}

/// Attempts of one idempotent call when a member is unreachable (a request the balanced
/// channel sent to a dead member fails at once; the next goes to a live one).
const ATTEMPTS: u32 = 4;

/// Keys per page when loading the table documents.
pub const LOAD_PAGE: i64 = 2_000;

/// The end of the key range holding every key that starts with `prefix` (etcd's
/// `WithPrefix` rule: the last byte below 0xff incremented, what follows dropped).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(&last) = end.last() {
        if last < 0xff {
            if let Some(b) = end.last_mut() {
                *b = last + 1;
            }
            return end;
        }
        end.pop();
    }
    // Every byte 0xff: to the end of the keyspace.
    vec![0]
}

fn transient(e: &etcd_client::Error) -> bool {
    use etcd_client::Error as E;
    match e {
        E::TransportError(_) | E::IoError(_) => true,
        // gRPC codes UNKNOWN (2), DEADLINE_EXCEEDED (4), ABORTED (10), UNAVAILABLE (14), and
        // UNIMPLEMENTED (12): a member that has just started can answer before it has
        // registered every service (seen as "unknown service v3lockpb.Lock").
        E::GRpcStatus(s) => matches!(s.code() as i32, 2 | 4 | 10 | 12 | 14),
        _ => false,
    }
}

impl EtcdStore {
    /// Run an idempotent call with a per-attempt timeout, retrying transient failures
    /// (50 ms doubling back-off, [`ATTEMPTS`] attempts).
    async fn retry<T, Fut>(
        &self,
        what: &str,
        mut f: impl FnMut(Client) -> Fut,
    ) -> Result<T, StoreError>
    where
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut delay = Duration::from_millis(50);
        let mut attempt = 1;
        loop {
            let last = attempt >= ATTEMPTS;
            match tokio::time::timeout(CALL_TIMEOUT, f(self.client.clone())).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) if !last && transient(&e) => {
                    tracing::debug!(attempt, error = %e, "{what}: retrying");
                }
                Ok(Err(e)) => return Err(self.unavailable(format!("{what}: {e}"))),
                Err(_) if !last => {}
                Err(_) => {
                    return Err(
                        self.unavailable(format!("{what}: no answer within {CALL_TIMEOUT:?}"))
                    )
                }
            }
            tokio::time::sleep(delay).await;
            delay *= 2;
            attempt += 1;
        }
    }

    /// A client for `endpoints` (`http://host:port`) under `prefix`. Connections are made
    /// lazily: this succeeds even while etcd is down.
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Self, StoreError> {
        let joined = endpoints.join(",");
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(1))
            .with_timeout(CALL_TIMEOUT)
            // etcd refuses pings more often than every 5 s by default.
            .with_keep_alive(Duration::from_secs(6), Duration::from_secs(3))
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        let client =
            Client::connect(endpoints, Some(opts))
                .await
                .map_err(|e| StoreError::Unavailable {
                    endpoints: joined.clone(),
                    message: e.to_string(),
                })?;
        Ok(Self {
            client,
            prefix: prefix.to_owned(),
            endpoints: joined,
        })
    }

    fn unavailable(&self, message: String) -> StoreError {
        StoreError::Unavailable {
            endpoints: self.endpoints.clone(),
            message,
        }
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The full key of a relative one.
    pub fn key(&self, rel: &str) -> String {
        format!("{}{rel}", self.prefix)
    }

    fn rel<'a>(&self, key: &'a [u8]) -> Option<&'a str> {
        std::str::from_utf8(key).ok()?.strip_prefix(&self.prefix)
    }

    /// Read every table document: the table's key ranges only (never the audit log or the
    /// fleet registrations, which grow on their own), in pages of [`LOAD_PAGE`] keys so no
    /// answer nears gRPC's 4 MiB message limit (100k overrides are ~6 MB), all at the
    /// revision of the first page, so the snapshot is consistent.
    pub async fn load(&self) -> Result<Snapshot, StoreError> {
        let mut docs = Documents::default();
        let mut revision = 0i64;
        for (rel, is_prefix) in [
            (docs::SETTINGS, false),
            (docs::SLOTS, false),
            (docs::CELLS, true),
            (docs::OVERRIDES, true),
            (docs::GRAY, true),
        ] {
            let first = self.key(rel).into_bytes();
            let end = if is_prefix {
                prefix_end(&first)
            } else {
                let mut e = first.clone();
                e.push(0);
                e
            };
            let mut from = first;
            loop {
                let (start, stop, at) = (from.clone(), end.clone(), revision);
                let resp = self
                    .retry("load", |mut c| {
                        let (start, stop) = (start.clone(), stop.clone());
                        async move {
                            let mut o = GetOptions::new().with_range(stop).with_limit(LOAD_PAGE);
                            if at > 0 {
                                o = o.with_revision(at);
                            }
                            c.get(start, Some(o)).await
                        }
                    })
                    .await?;
                if revision == 0 {
                    revision = resp.header().map_or(0, |h| h.revision());
                }
                for kv in resp.kvs() {
                    if let Some(rel) = self.rel(kv.key()) {
                        if docs::is_table_key(rel) {
                            docs.put(rel.to_owned(), kv.value().to_vec(), kv.mod_revision());
                        }
                    }
                }
                match resp.kvs().last() {
                    Some(last) if resp.more() => {
                        from = last.key().to_vec();
                        from.push(0);
                    }
                    _ => break,
                }
            }
        }
        Ok(Snapshot { docs, revision })
    }

    /// Watch table documents from `from` (inclusive).
    pub async fn watch(&self, from: i64) -> Result<StoreWatch, StoreError> {
        let prefix = self.prefix.clone();
        let mut stream = self
            .retry("watch", |mut c| {
                let prefix = prefix.clone();
                async move {
                    c.watch(
                        prefix,
                        Some(
                            WatchOptions::new()
                                .with_prefix()
                                .with_start_revision(from)
                                .with_progress_notify(),
                        ),
                    )
                    .await
                }
            })
            .await?;
        // The first message acknowledges creation (or reports a compacted start).
        let first = timed(self, "watch", stream.message()).await?;
        match first {
            Some(r) if r.canceled() && r.compact_revision() > 0 => {
                return Err(StoreError::Compacted(from))
            }
            Some(r) if r.canceled() => {
                return Err(self.unavailable(format!("watch refused: {}", r.cancel_reason())))
            }
            Some(r) if r.created() => {}
            Some(_) => return Err(self.unavailable("watch: no creation acknowledgement".into())),
            None => return Err(self.unavailable("watch: stream closed at once".into())),
        }
        Ok(StoreWatch {
            stream,
            store: self.clone(),
            from,
        })
    }

    /// The switch protocol: lock, compare against `base` (the table version the change was
    /// planned against), write `changes` (`None` deletes) and `audit` in one transaction,
    /// unlock. Returns the revision of the transaction, which is the new table version.
    pub async fn commit(
        &self,
        base: u64,
        changes: &[(String, Option<Vec<u8>>)],
        audit: &AuditRecord,
    ) -> Result<i64, StoreError> {
        let mut c = self.client.clone();
        let lease = self.grant(LOCK_LEASE_TTL_S).await?;
        let result = self.commit_under_lease(lease, base, changes, audit).await;
        // The lock is already released; revoking the lease (which would also release it if
        // unlocking failed) need not delay the answer. Best effort: it expires anyway.
        tokio::spawn(async move {
            let _ = tokio::time::timeout(CALL_TIMEOUT, c.lease_revoke(lease)).await;
        });
        result
    }

    async fn commit_under_lease(
        &self,
        lease: i64,
        base: u64,
        changes: &[(String, Option<Vec<u8>>)],
        audit: &AuditRecord,
    ) -> Result<i64, StoreError> {
        let mut c = self.client.clone();
        let lock_name = self.key(docs::LOCK_SWITCH);
        // Locking again with the same lease is a no-op in etcd, so a retried lock is safe.
        let started = tokio::time::Instant::now();
        let mut delay = Duration::from_millis(50);
        let lock = loop {
            let left = LOCK_WAIT.saturating_sub(started.elapsed());
            match tokio::time::timeout(
                left,
                c.lock(
                    lock_name.as_bytes(),
                    Some(LockOptions::new().with_lease(lease)),
                ),
            )
            .await
            {
                Ok(Ok(l)) => break l,
                Ok(Err(e)) if transient(&e) && started.elapsed() + delay < LOCK_WAIT => {
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Ok(Err(e)) => return Err(self.unavailable(format!("lock {lock_name}: {e}"))),
                Err(_) => {
                    return Err(StoreError::LockBusy {
                        key: lock_name,
                        waited: LOCK_WAIT,
                    })
                }
            }
        };
        let lock_key = lock.key().to_vec();
        let audit_json = serde_json::to_vec(audit)
            .map_err(|e| StoreError::Refused(format!("cannot serialize the audit record: {e}")))?;
        let mut ops: Vec<TxnOp> = changes
            .iter()
            .map(|(rel, v)| match v {
                Some(v) => TxnOp::put(self.key(rel), v.clone(), None),
                None => TxnOp::delete(self.key(rel), None),
            })
            .collect();
        let audit_rel = format!("{}{}", docs::AUDIT, audit.id);
        ops.push(TxnOp::put(self.key(&audit_rel), audit_json, None));
        let txn = Txn::new()
            .when(self.unchanged_since(base, Some(lock_key.clone())))
            .and_then(ops);
        let mut attempts = 0;
        let resp = self
            .retry("switch transaction", |mut c| {
                attempts += 1;
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await;
        let _ = tokio::time::timeout(CALL_TIMEOUT, c.unlock(lock_key)).await;
        let resp = match resp {
            Ok(r) => r,
            // The transaction may have been applied with every answer lost: our audit
            // record says so. Asked once; without it the outcome is still unknown (a
            // transaction sent may yet be applied, and etcd may not answer at all), and the
            // error says how to find out.
            Err(e) => {
                let key = self.key(&audit_rel);
                if let Ok(r) = timed(self, "get", c.get(key, None)).await {
                    if let Some(kv) = r.kvs().first() {
                        return Ok(kv.mod_revision());
                    }
                }
                return Err(StoreError::Indeterminate {
                    audit_id: audit.id.clone(),
                    message: e.to_string(),
                });
            }
        };
        if resp.succeeded() {
            return Ok(resp.header().map_or(0, |h| h.revision()));
        }
        if attempts > 1 {
            // An earlier attempt may have been applied with its answer lost: our audit
            // record (unique id, written only by this transaction) says so.
            if let Some((_, rev)) = self.raw_get(&audit_rel).await? {
                return Ok(rev);
            }
        }
        Err(StoreError::Conflict { base })
    }

    /// Compares that hold when no table document was written after `base` (and, with a
    /// lock key, while the lock is still held).
    fn unchanged_since(&self, base: u64, lock_key: Option<Vec<u8>>) -> Vec<Compare> {
        let next = i64::try_from(base).unwrap_or(i64::MAX - 1) + 1;
        let mut cmp = vec![
            Compare::mod_revision(self.key(docs::SETTINGS), CompareOp::Less, next),
            Compare::mod_revision(self.key(docs::SLOTS), CompareOp::Less, next),
        ];
        for p in [docs::CELLS, docs::OVERRIDES, docs::GRAY] {
            cmp.push(Compare::mod_revision(self.key(p), CompareOp::Less, next).with_prefix());
        }
        if let Some(k) = lock_key {
            cmp.push(Compare::create_revision(k, CompareOp::Greater, 0));
        }
        cmp
    }

    /// Append an audit record outside a switch (automatic actions, dry runs). Returns the
    /// revision that recorded it.
    pub async fn put_audit(&self, rec: &AuditRecord) -> Result<i64, StoreError> {
        let v = serde_json::to_vec(rec)
            .map_err(|e| StoreError::Refused(format!("cannot serialize the audit record: {e}")))?;
        let key = self.key(&format!("{}{}", docs::AUDIT, rec.id));
        let r = self
            .retry("audit put", |mut c| {
                let (key, v) = (key.clone(), v.clone());
                async move { c.put(key, v, None).await }
            })
            .await?;
        Ok(r.header().map_or(0, |h| h.revision()))
    }

    /// The newest `limit` audit records, newest first.
    pub async fn audit(&self, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        let key = self.key(docs::AUDIT);
        let r = self
            .retry("audit read", |mut c| {
                let key = key.clone();
                async move {
                    c.get(
                        key,
                        Some(
                            GetOptions::new()
                                .with_prefix()
                                .with_sort(SortTarget::Key, SortOrder::Descend)
                                .with_limit(limit as i64),
                        ),
                    )
                    .await
                }
            })
            .await?;
        Ok(r.kvs()
            .iter()
            .filter_map(|kv| {
                let mut rec: AuditRecord = serde_json::from_slice(kv.value()).ok()?;
                rec.revision = Some(kv.mod_revision());
                Some(rec)
            })
            .collect())
    }

    /// Grant a lease of `ttl_s` seconds.
    pub async fn grant(&self, ttl_s: i64) -> Result<i64, StoreError> {
        Ok(self
            .retry("lease grant", |mut c| async move {
                c.lease_grant(ttl_s, None).await
            })
            .await?
            .id())
    }

    /// Renew `lease` once. Returns its remaining TTL (0 or less: it expired).
    pub async fn keep_alive_once(&self, lease: i64) -> Result<i64, StoreError> {
        let mut c = self.client.clone();
        let (mut keeper, mut stream) =
            timed(self, "lease keep-alive", c.lease_keep_alive(lease)).await?;
        timed(self, "lease keep-alive", keeper.keep_alive()).await?;
        match timed(self, "lease keep-alive", stream.message()).await? {
            Some(r) => Ok(r.ttl()),
            None => Err(self.unavailable("lease keep-alive: stream closed".into())),
        }
    }

    /// Write `gateways/<id>` attached to `lease`.
    pub async fn put_gateway(
        &self,
        id: &str,
        value: Vec<u8>,
        lease: i64,
    ) -> Result<(), StoreError> {
        let key = self.key(&format!("{}{id}", docs::GATEWAYS));
        self.retry("gateway registration", |mut c| {
            let (key, value) = (key.clone(), value.clone());
            async move {
                c.put(key, value, Some(PutOptions::new().with_lease(lease)))
                    .await
            }
        })
        .await?;
        Ok(())
    }

    /// Every registered gateway's document.
    pub async fn gateways(&self) -> Result<Vec<serde_json::Value>, StoreError> {
        let key = self.key(docs::GATEWAYS);
        let r = self
            .retry("fleet read", |mut c| {
                let key = key.clone();
                async move { c.get(key, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        Ok(r.kvs()
            .iter()
            .map(|kv| {
                serde_json::from_slice(kv.value()).unwrap_or_else(|_| {
                    serde_json::json!({
                        "id": self.rel(kv.key()).and_then(|r| r.strip_prefix(docs::GATEWAYS)),
                        "error": "unreadable registration",
                    })
                })
            })
            .collect())
    }

    /// Bootstrap the store from a (valid) configuration: write every table document and an
    /// audit record, and delete table documents the file does not have. Refuses when the
    /// store already holds a configuration unless `replace`. Returns the new revision.
    pub async fn push(
        &self,
        cfg: &Config,
        replace: bool,
        audit: &AuditRecord,
    ) -> Result<i64, StoreError> {
        let snap = self.load().await?;
        if !snap.docs.is_empty() && !replace {
            return Err(StoreError::Refused(format!(
                "{} already holds a configuration ({} documents, table version {}); pass --replace to overwrite it",
                self.prefix,
                snap.docs.docs.len(),
                snap.docs.version()
            )));
        }
        let new = docs::documents_of(cfg, snap.docs.slots_version() + 1)
            .map_err(|e| StoreError::Refused(e.to_string()))?;
        let mut changes: Vec<(String, Option<Vec<u8>>)> = snap
            .docs
            .docs
            .keys()
            .filter(|k| !new.iter().any(|(n, _)| n == *k))
            .map(|k| (k.clone(), None))
            .collect();
        changes.extend(new.into_iter().map(|(k, v)| (k, Some(v))));
        let base = u64::try_from(snap.revision).unwrap_or(0);
        self.commit(base, &changes, audit).await
    }

    /// Write a raw value under a relative key, outside the switch protocol (operators'
    /// tools and tests that write documents straight into etcd).
    pub async fn raw_put(&self, rel: &str, value: impl Into<Vec<u8>>) -> Result<i64, StoreError> {
        let (key, value): (String, Vec<u8>) = (self.key(rel), value.into());
        let r = self
            .retry("put", |mut c| {
                let (key, value) = (key.clone(), value.clone());
                async move { c.put(key, value, None).await }
            })
            .await?;
        Ok(r.header().map_or(0, |h| h.revision()))
    }

    /// Read a raw value under a relative key and its revision.
    pub async fn raw_get(&self, rel: &str) -> Result<Option<(Vec<u8>, i64)>, StoreError> {
        let key = self.key(rel);
        let r = self
            .retry("get", |mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        Ok(r.kvs()
            .first()
            .map(|kv| (kv.value().to_vec(), kv.mod_revision())))
    }

    /// Compact the store's history up to `revision`.
    pub async fn compact(&self, revision: i64) -> Result<(), StoreError> {
        let mut c = self.client.clone();
        timed(self, "compact", c.compact(revision, None)).await?;
        Ok(())
    }
}

/// A watch on the table documents.
pub struct StoreWatch {
    stream: WatchStream,
    store: EtcdStore,
    from: i64,
}

impl std::fmt::Debug for StoreWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreWatch")
            .field("from", &self.from)
            .finish()
    }
}

impl StoreWatch {
    /// The next batch of table-document changes (possibly empty: progress, or only
    /// non-table keys changed). An error ends the watch; the caller reloads.
    pub async fn next(&mut self) -> Result<Vec<Change>, StoreError> {
        let msg = self
            .stream
            .message()
            .await
            .map_err(|e| self.store.unavailable(format!("watch: {e}")))?;
        let Some(resp) = msg else {
            return Err(self.store.unavailable("watch: stream ended".into()));
        };
        if resp.canceled() {
            if resp.compact_revision() > 0 {
                return Err(StoreError::Compacted(self.from));
            }
            return Err(self
                .store
                .unavailable(format!("watch canceled: {}", resp.cancel_reason())));
        }
        let mut out = Vec::new();
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let Some(rel) = self.store.rel(kv.key()) else {
                continue;
            };
            if !docs::is_table_key(rel) {
                continue;
            }
            self.from = self.from.max(kv.mod_revision() + 1);
            out.push(match ev.event_type() {
                EventType::Put => Change::Put {
                    rel: rel.to_owned(),
                    value: kv.value().to_vec(),
                    revision: kv.mod_revision(),
                },
                EventType::Delete => Change::Delete {
                    rel: rel.to_owned(),
                    revision: kv.mod_revision(),
                },
            });
        }
        Ok(out)
    }
}
