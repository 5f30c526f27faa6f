//! The control plane: where the desired configuration lives, how admin mutations change
//! it, and how a new routing table gets from there to the workers.
//!
//! # Desired configuration
//!
//! Every routing table is built from one *desired* [`Config`] ([`Desired`]), never edited
//! in place. Where that configuration comes from depends on the mode:
//!
//! - **Local (no etcd)**: the configuration file with the *admin overlay* applied on top
//!   (see [`cellgate_config::overlay`]). Admin mutations change the desired configuration;
//!   what differs from the file is written to `<state dir>/admin-overlay.json`, so a later
//!   file reload re-applies it and a restart keeps it. Restoring a cell to what the file
//!   says removes its entry. Without a configuration file (`cellgate demo`) the overlay
//!   lives in a per-process temporary directory.
//! - **etcd**: the table documents under the prefix ([`cellgate_config::docs`]). A task
//!   loads them all, watches from the loaded revision, and rebuilds → validates → swaps on
//!   every change; the table version is the etcd revision of the newest table document,
//!   so every gateway that saw the same documents serves the same version. An invalid
//!   document set is rejected (logged, shown in `GET /admin/table`, the last known good
//!   table keeps serving). When etcd is unreachable the gateway keeps serving, reports the
//!   store as degraded in `/readyz`, retries with back-off and reloads everything when it
//!   is back (which also covers a compacted watch revision). Each valid table's
//!   configuration is written to `<state dir>/lkg.json` (checksummed) and used at start-up
//!   when etcd cannot be reached. The file's own routing part is used only when the store
//!   is empty and no last known good table exists. Admin mutations go through the switch
//!   protocol ([`cellgate_config::etcd::EtcdStore::commit`]) and every gateway applies
//!   them from its watch.
//!
//! # Switch
//!
//! `POST /admin/cells/{id}/switch {"to": x}` sets the cell `draining` and records
//! `switched_to: x`; the table tries `x` first when walking the cell's failover targets,
//! and `/admin/route` names the switch in its reason. `restore` clears it.
//!
//! # What this module must never do
//!
//! Touch the request path: tables are built on the control runtime (a separate thread),
//! swapped whole through the `ArcSwap`, and no worker ever waits for this module. Apply a
//! mutation that was not audited first, or (with etcd) apply a mutation locally that etcd
//! did not commit.

mod etcd_sync;

pub use etcd_sync::{health_view, registration};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use cellgate_config::docs::changed_documents;
use cellgate_config::etcd::{EtcdStore, StoreError};
use cellgate_config::mutate::{impact, Impact};
use cellgate_config::overlay::AdminOverlay;
use cellgate_config::{AuditRecord, Config, ConfigError, MutateError, Mutation};
use cellgate_health::HealthRegistry;
use cellgate_routing::RoutingTable;
use serde::Serialize;

use crate::audit::{Audit, AuditError, EtcdAudit, FileAudit};
use crate::server::{GatewayError, RunOptions, Shared};

/// How long `cellgate run --etcd` waits for etcd at start-up before starting from the
/// last known good table.
pub const STARTUP_LOAD_WAIT: Duration = Duration::from_secs(3);
/// How long a mutation committed to etcd waits for this gateway's watch to apply it
/// before answering anyway.
pub const APPLY_WAIT: Duration = Duration::from_secs(3);

/// Where the desired configuration came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The configuration file (with the admin overlay).
    File,
    /// etcd.
    Etcd,
    /// The on-disk last known good table (etcd was unreachable at start-up).
    LastKnownGood,
    /// The configuration file, because the etcd prefix holds no configuration yet.
    FileFallback,
}

/// The desired configuration the serving table was built from.
#[derive(Debug, Clone)]
pub struct Desired {
    /// The configuration.
    pub config: Config,
    /// The table version built from it.
    pub version: u64,
    /// Where it came from.
    pub source: Source,
    /// The slot table version (etcd `slots` document; 0 locally).
    pub slots_version: u64,
}

/// A configuration that was refused; the previous table kept serving.
#[derive(Debug, Clone, Serialize)]
pub struct Rejection {
    /// The version (etcd revision) that was refused.
    pub version: u64,
    /// Every problem.
    pub reason: String,
    /// When.
    pub at: String,
}

/// The state of the configuration store, for `/readyz` and `/admin/table`.
#[derive(Debug, Clone, Serialize)]
pub struct StoreStatus {
    /// `file` or `etcd`.
    pub kind: &'static str,
    /// `ok`, `degraded` (unreachable: serving the last known good table), `starting`, or
    /// `empty` (etcd holds no configuration).
    pub state: &'static str,
    /// The last error, while degraded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Since when the state holds.
    pub since: String,
    /// The last time the store was read successfully.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_sync: Option<String>,
    /// The last refused configuration, until a newer one is accepted.
    pub rejected: Option<Rejection>,
}

fn now_rfc3339() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    cellgate_config::audit::rfc3339(ms)
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Admin API settings.
#[derive(Clone)]
pub struct AdminSettings {
    /// `(name, token)`: the name is the audit actor.
    pub tokens: Vec<(String, String)>,
    /// Largest share of the key space one mutation may move without `force`.
    pub max_move_share: f64,
}

impl std::fmt::Debug for AdminSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminSettings")
            .field(
                "tokens",
                &self.tokens.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field("max_move_share", &self.max_move_share)
            .finish()
    }
}

impl AdminSettings {
    /// The name of the token `presented`, if it is one of ours. Compares every token in
    /// full, without an early exit on the first differing byte.
    pub fn actor(&self, presented: &str) -> Option<&str> {
        let mut found = None;
        for (name, token) in &self.tokens {
            let a = presented.as_bytes();
            let b = token.as_bytes();
            let mut diff = u8::from(a.len() != b.len());
            for (i, &tb) in b.iter().enumerate() {
                diff |= a.get(i).copied().unwrap_or(0) ^ tb;
            }
            if diff == 0 && found.is_none() {
                found = Some(name.as_str());
            }
        }
        found
    }
}

#[derive(Debug)]
enum Backend {
    Local {
        overlay_path: PathBuf,
        /// The file's own configuration (without the overlay).
        file: ArcSwap<Config>,
    },
    Etcd {
        store: Box<EtcdStore>,
        lkg_path: PathBuf,
        /// Process settings (listeners, admin) from the file or the built-in demo.
        local: Box<Config>,
    },
}

/// Addresses this gateway serves on (for the fleet registration).
#[derive(Debug, Clone, Copy)]
pub struct Addrs {
    /// Proxy listener.
    pub proxy: SocketAddr,
    /// Admin listener.
    pub admin: SocketAddr,
}

/// Control-plane state shared with the workers through [`Shared`]. Nothing here is read
/// on the request path.
#[derive(Debug)]
pub struct ControlState {
    /// This gateway's id in the fleet (`gateways/<id>`) and in audit records.
    pub gateway_id: String,
    /// Admin API settings.
    pub admin: AdminSettings,
    /// The audit log.
    pub audit: Audit,
    backend: Backend,
    desired: ArcSwap<Desired>,
    status: ArcSwap<StoreStatus>,
    /// Serializes changes made by this process (admin mutations, file reloads).
    changes: tokio::sync::Mutex<()>,
    applied: tokio::sync::watch::Sender<u64>,
    addrs: OnceLock<Addrs>,
    started_unix_ms: u64,
}

impl ControlState {
    /// Whether etcd is the source.
    pub fn is_etcd(&self) -> bool {
        matches!(self.backend, Backend::Etcd { .. })
    }

    /// The etcd store, when configured.
    pub fn store(&self) -> Option<&EtcdStore> {
        match &self.backend {
            Backend::Etcd { store, .. } => Some(&**store),
            Backend::Local { .. } => None,
        }
    }

    /// The desired configuration the serving table was built from.
    pub fn desired(&self) -> Arc<Desired> {
        self.desired.load_full()
    }

    /// The store's state.
    pub fn status(&self) -> Arc<StoreStatus> {
        self.status.load_full()
    }

    /// Addresses, once listening.
    pub fn addrs(&self) -> Option<Addrs> {
        self.addrs.get().copied()
    }

    /// When this gateway started (Unix ms).
    pub fn started_unix_ms(&self) -> u64 {
        self.started_unix_ms
    }

    /// Subscribe to the version of each table this module swaps in.
    pub fn applied(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied.subscribe()
    }

    fn set_status(&self, f: impl FnOnce(&mut StoreStatus)) {
        let mut s = (*self.status.load_full()).clone();
        let before = s.state;
        f(&mut s);
        if s.state != before {
            s.since = now_rfc3339();
        }
        self.status.store(Arc::new(s));
    }
}

/// Install `cfg` as the desired configuration: under the table writer (the one writer of
/// the table, shared with the health controller), build its table — gray rules switched
/// off by their guard stay off — swap it in, and apply its shedding limits. `version`
/// `None` means the next local version. Returns the version now serving.
async fn install(
    shared: &Arc<Shared>,
    cfg: Config,
    version: Option<u64>,
    source: Source,
    slots_version: u64,
) -> Result<u64, ConfigError> {
    let c = &shared.control;
    let mut writer = shared.writer.lock().await;
    // The slot count never changes after bootstrap (SPEC §1): a new count remaps nearly
    // every key at once. Only a gateway still serving its fallback (no configuration in
    // etcd yet, or the last known good table) takes the store's count when it arrives.
    let serving = shared.table.load();
    let fallback = matches!(
        c.desired().source,
        Source::FileFallback | Source::LastKnownGood
    );
    if !fallback && cfg.routing.slot_count != serving.slot_count() {
        return Err(ConfigError::Invalid(vec![cellgate_config::Issue {
            path: "routing.slot_count".into(),
            message: format!(
                "{} differs from the {} in effect; the slot count never changes after bootstrap (it would move nearly every key)",
                cfg.routing.slot_count,
                serving.slot_count()
            ),
        }]));
    }
    drop(serving);
    let version = version.unwrap_or_else(|| next_version(shared));
    let mut gray = writer.gray_overlay.clone();
    gray.rearm(&cfg);
    let (shared2, cfg2, gray2) = (Arc::clone(shared), cfg.clone(), gray.clone());
    let (table, upstream_tls) = tokio::task::spawn_blocking(move || {
        let table = gray2.apply(&cfg2).build_table(version, &shared2.health)?;
        // Upstream TLS per cell is built with the table and swapped with it.
        let tls = crate::tls::UpstreamTlsMap::from_config(&cfg2)
            .map_err(|e| ConfigError::Parse(format!("upstream TLS: {e}")))?;
        Ok::<_, ConfigError>((table, tls))
    })
    .await
    .map_err(|e| ConfigError::Parse(format!("table build task failed: {e}")))??;
    shared.upstream_tls.store(Arc::new(upstream_tls));
    shared.shedding.apply(&cfg.shedding);
    writer.gray_overlay = gray;
    writer.config = cfg.clone();
    shared.table.store(Arc::new(table));
    drop(writer);
    c.desired.store(Arc::new(Desired {
        config: cfg,
        version,
        source,
        slots_version,
    }));
    c.applied.send_replace(version);
    Ok(version)
}

/// The control plane's own runtime (one thread): admin API, etcd watch, fleet
/// registration, audit writes. Shut down without waiting when dropped.
#[derive(Debug)]
pub struct ControlRuntime(Option<tokio::runtime::Runtime>);

impl ControlRuntime {
    /// A handle to spawn on it.
    pub fn handle(&self) -> Option<tokio::runtime::Handle> {
        self.0.as_ref().map(|r| r.handle().clone())
    }
}

impl Drop for ControlRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Why a control-plane operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The mutation does not fit the configuration.
    #[error(transparent)]
    Mutate(#[from] MutateError),
    /// The resulting table could not be built.
    #[error("the result would be invalid: {0}")]
    Build(ConfigError),
    /// The mutation moves more traffic than the cap allows.
    #[error("this change would move {:.1}% of keyed traffic ({slots} slots); the cap is {:.1}% (admin.max_move_share); repeat with force=true to do it anyway", share * 100.0, cap * 100.0)]
    Cap {
        /// Share it would move.
        share: f64,
        /// Slots it would reroute.
        slots: u32,
        /// The cap.
        cap: f64,
    },
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The audit log failed; nothing was changed.
    #[error("{0}; nothing was changed")]
    Audit(#[from] AuditError),
    /// Local state could not be written; nothing was changed.
    #[error("cannot persist the admin change: {0}; nothing was changed")]
    Persist(ConfigError),
    /// In etcd mode, the routing in effect does not come from the store (it holds no
    /// configuration yet, or was unreachable at start-up): a change written there now would
    /// be a stray document the fleet refuses, so none is written.
    #[error("the routing in effect comes from {0}, not from etcd: admin changes need the configuration in the store (cellgate config push) and a gateway that has loaded it; nothing was changed")]
    NotFromStore(&'static str),
    /// A restore of a cell that only health holds failed over: there is no configured
    /// state to undo, and the cell returns by itself.
    #[error("cell {cell} is failed over by health ({reason}), not by an admin change; it returns on its own once healthy again (probes pass and its dwell time is over); nothing was changed")]
    HeldByHealth {
        /// The cell.
        cell: String,
        /// Why health failed it over.
        reason: String,
    },
    /// A background task failed.
    #[error("internal: {0}")]
    Internal(String),
}

/// A mutation as requested through the admin API.
#[derive(Debug, Clone)]
pub struct MutationRequest {
    /// What.
    pub mutation: Mutation,
    /// Who (the token's name).
    pub actor: String,
    /// Only plan.
    pub dry_run: bool,
    /// Ignore the traffic cap.
    pub force: bool,
    /// The request as received, for the audit record.
    pub request: serde_json::Value,
}

/// What a mutation did (or, for a dry run, would do).
#[derive(Debug, Clone, Serialize)]
pub struct MutationOutcome {
    /// The action.
    pub action: &'static str,
    /// The cell acted on, if one.
    pub cell: Option<String>,
    /// Whether this was a dry run.
    pub dry_run: bool,
    /// Whether the change is in effect (false for dry runs and changes that change nothing).
    pub applied: bool,
    /// The table version planned against.
    pub base_version: u64,
    /// The table version now serving (after the change, when applied).
    pub table_version: u64,
    /// Slots and share of traffic that move, cells affected.
    pub plan: Impact,
    /// The cap on `plan.share_moved` without `force`.
    pub max_move_share: f64,
    /// Whether the plan exceeds the cap.
    pub exceeds_cap: bool,
    /// The audit record's id.
    pub audit_id: String,
}

/// Everything [`boot`] prepares before the workers start.
#[derive(Debug)]
pub struct Boot {
    /// The first table.
    pub table: RoutingTable,
    /// Control state for [`Shared`].
    pub state: ControlState,
    /// The control runtime.
    pub runtime: ControlRuntime,
    /// The bound admin listener.
    pub admin: std::net::TcpListener,
    /// The admin listener's TLS (client certificates verified) and its certificate, when
    /// `admin.tls` is set.
    pub admin_tls: Option<(Arc<rustls::ServerConfig>, Arc<crate::tls::CertReloader>)>,
}

fn default_state_dir(opts: &RunOptions) -> PathBuf {
    if let Some(d) = &opts.state_dir {
        return d.clone();
    }
    if let Some(d) = &opts.config.admin.state_dir {
        return PathBuf::from(d);
    }
    match &opts.config_path {
        Some(p) => {
            let mut s = p.as_os_str().to_owned();
            s.push(".state");
            PathBuf::from(s)
        }
        None => std::env::temp_dir().join(format!("cellgate-state-{}", std::process::id())),
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| cellgate_config::valid_id(s))
        .unwrap_or_else(|| "gateway".into())
}

/// The command-line overrides of `etcd.prefix` and `etcd.gateway_id` pass the checks the
/// keys get in the file; an error names the flag.
fn check_overrides(opts: &RunOptions) -> Result<(), GatewayError> {
    if let Some(p) = opts.etcd_prefix.as_deref() {
        if !cellgate_config::valid_prefix(p) {
            return Err(GatewayError::BadOption {
                flag: "--etcd-prefix",
                value: p.to_owned(),
                message: "must start and end with '/'",
            });
        }
    }
    if let Some(id) = opts.gateway_id.as_deref() {
        if !cellgate_config::valid_id(id) {
            return Err(GatewayError::BadOption {
                flag: "--gateway-id",
                value: id.to_owned(),
                message: "must be 1-64 letters, digits, '.', '_' or '-'",
            });
        }
    }
    Ok(())
}

/// Prepare the control plane: its runtime, the admin listener, the admin tokens, and the
/// first table (from the file and overlay, or from etcd, the last known good table, or the
/// file, in that order).
pub fn boot(opts: &RunOptions, health: &HealthRegistry) -> Result<Boot, GatewayError> {
    check_overrides(opts)?;
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.worker_threads(1)
        .max_blocking_threads(4)
        .thread_name("cellgate-control");
    if let Some(release) = opts.release_memory {
        b.on_thread_park(crate::server::release_on_park(release));
    }
    let rt = b.enable_all().build().map_err(GatewayError::Runtime)?;
    let admin_listen = opts
        .admin_listen
        .clone()
        .unwrap_or_else(|| opts.config.admin.listen.clone());
    let cfg = &opts.config;
    let admin_tls = match &cfg.admin.tls {
        Some(t) => {
            let server = crate::tls::admin_server_config(
                &t.cert,
                &t.key,
                &t.client_ca,
                t.client_cert == cellgate_config::ClientCertCfg::AdminOnly,
            )
            .map_err(|e| GatewayError::Control(format!("admin.tls: {e}")))?;
            Some(server)
        }
        None => None,
    };
    let admin = crate::server::bind_or_inherit("admin", &admin_listen)?;
    let admin_addr = admin.local_addr().map_err(GatewayError::Runtime)?;

    let mut tokens = Vec::new();
    match (&opts.admin_token, &cfg.admin.token) {
        (Some(t), _) | (None, Some(t)) if !t.is_empty() => {
            tokens.push(("admin".to_owned(), t.clone()))
        }
        _ => {}
    }
    for (name, t) in &cfg.admin.tokens {
        tokens.push((name.clone(), t.clone()));
    }
    if tokens.is_empty() {
        tracing::warn!("no admin token configured (admin.token, admin.tokens or CELLGATE_ADMIN_TOKEN): every /admin call will be refused");
    }
    let admin_settings = AdminSettings {
        tokens,
        max_move_share: cfg.admin.max_move_share,
    };
    let state_dir = default_state_dir(opts);
    let endpoints = opts
        .etcd
        .clone()
        .or_else(|| cfg.etcd.as_ref().map(|e| e.endpoints.clone()));
    let prefix = opts
        .etcd_prefix
        .clone()
        .or_else(|| cfg.etcd.as_ref().map(|e| e.prefix.clone()))
        .unwrap_or_else(cellgate_config::default_prefix);
    let gateway_id = opts
        .gateway_id
        .clone()
        .or_else(|| cfg.etcd.as_ref().and_then(|e| e.gateway_id.clone()))
        .unwrap_or_else(|| {
            let port = opts
                .listen
                .as_deref()
                .unwrap_or(&cfg.listen.http)
                .rsplit(':')
                .next()
                .unwrap_or("0")
                .to_owned();
            format!("{}-{port}-{}", host_name(), std::process::id())
        });
    let (applied, _) = tokio::sync::watch::channel(0u64);
    let starting_status = |kind| StoreStatus {
        kind,
        state: "ok",
        error: None,
        since: now_rfc3339(),
        last_sync: None,
        rejected: None,
    };

    let (table, desired, backend, status, sink): (_, _, _, _, Arc<dyn crate::audit::AuditSink>) =
        match endpoints {
            None => {
                let overlay_path = state_dir.join("admin-overlay.json");
                let overlay = AdminOverlay::load(&overlay_path)?;
                let (merged, dropped) = overlay.apply(cfg).map_err(|e| {
                    GatewayError::Control(format!(
                        "{e} (admin overlay {}: fix the file or remove the overlay)",
                        overlay_path.display()
                    ))
                })?;
                for d in dropped {
                    tracing::warn!(cell = %d, overlay = %overlay_path.display(), "admin overlay names a cell the configuration no longer has; ignored");
                }
                let table = merged.build_table(1, health)?;
                let audit_path = cfg
                    .admin
                    .audit_file
                    .as_ref()
                    .map(PathBuf::from)
                    .unwrap_or_else(|| state_dir.join("audit.jsonl"));
                (
                    table,
                    Desired {
                        config: merged,
                        version: 1,
                        source: Source::File,
                        slots_version: 0,
                    },
                    Backend::Local {
                        overlay_path,
                        file: ArcSwap::from_pointee(cfg.clone()),
                    },
                    starting_status("file"),
                    Arc::new(FileAudit::new(audit_path)),
                )
            }
            Some(endpoints) => {
                let lkg_path = state_dir.join("lkg.json");
                let store = rt
                    .block_on(EtcdStore::connect(&endpoints, &prefix))
                    .map_err(|e| GatewayError::Control(e.to_string()))?;
                let mut status = starting_status("etcd");
                let first = rt.block_on(async {
                    match tokio::time::timeout(STARTUP_LOAD_WAIT, store.load()).await {
                        Ok(r) => r,
                        Err(_) => Err(StoreError::Unavailable {
                            endpoints: endpoints.join(","),
                            message: format!("no answer within {STARTUP_LOAD_WAIT:?}"),
                        }),
                    }
                });
                let from_store = match first {
                    Ok(snap) if snap.docs.is_empty() => {
                        status.state = "empty";
                        status.error = Some(format!(
                            "etcd prefix {prefix} holds no configuration; bootstrap it with `cellgate config push`"
                        ));
                        None
                    }
                    Ok(snap) => {
                        status.last_sync = Some(now_rfc3339());
                        let version = snap.docs.version();
                        match snap
                            .docs
                            .assemble(cfg)
                            .and_then(|c| c.build_table(version, health).map(|t| (c, t)))
                        {
                            Ok((c, t)) => {
                                if let Err(e) = cellgate_config::lkg::save(&lkg_path, version, &c) {
                                    tracing::warn!(error = %e, "cannot write the last known good table");
                                }
                                Some((
                                    t,
                                    Desired {
                                        config: c,
                                        version,
                                        source: Source::Etcd,
                                        slots_version: snap.docs.slots_version(),
                                    },
                                ))
                            }
                            Err(e) => {
                                tracing::error!(version, error = %e, "configuration in etcd rejected at start-up; starting from the last known good table");
                                status.rejected = Some(Rejection {
                                    version,
                                    reason: e.to_string(),
                                    at: now_rfc3339(),
                                });
                                None
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "etcd unreachable at start-up; starting from the last known good table");
                        status.state = "degraded";
                        status.error = Some(e.to_string());
                        None
                    }
                };
                let (table, desired) = match from_store {
                    Some(x) => x,
                    None => match cellgate_config::lkg::load(&lkg_path) {
                        Ok((version, c)) => {
                            let t = c.build_table(version, health)?;
                            tracing::info!(version, file = %lkg_path.display(), "serving the last known good table");
                            (
                                t,
                                Desired {
                                    config: c,
                                    version,
                                    source: Source::LastKnownGood,
                                    slots_version: 0,
                                },
                            )
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "no usable last known good table; serving the configuration file's routing until etcd answers");
                            (
                                cfg.build_table(0, health)?,
                                Desired {
                                    config: cfg.clone(),
                                    version: 0,
                                    source: Source::FileFallback,
                                    slots_version: 0,
                                },
                            )
                        }
                    },
                };
                (
                    table,
                    desired,
                    Backend::Etcd {
                        store: Box::new(store.clone()),
                        lkg_path,
                        local: Box::new(cfg.clone()),
                    },
                    status,
                    Arc::new(EtcdAudit::new(store)),
                )
            }
        };
    applied.send_replace(desired.version);
    let state = ControlState {
        gateway_id,
        admin: admin_settings,
        audit: Audit::new(sink, rt.handle().clone()),
        backend,
        desired: ArcSwap::from_pointee(desired),
        status: ArcSwap::from_pointee(status),
        changes: tokio::sync::Mutex::new(()),
        applied,
        addrs: OnceLock::new(),
        started_unix_ms: unix_ms(),
    };
    tracing::debug!(admin = %admin_addr, "admin listener bound");
    Ok(Boot {
        table,
        state,
        runtime: ControlRuntime(Some(rt)),
        admin,
        admin_tls,
    })
}

/// Start the control plane's tasks on its runtime: the admin API (over TLS with client
/// certificates verified when `admin_tls` is given, its certificate files looked at every
/// `watch_interval`), and with etcd the watch and the fleet registration. Returns the admin
/// address.
pub fn start(
    shared: &Arc<Shared>,
    runtime: &ControlRuntime,
    admin: std::net::TcpListener,
    admin_tls: Option<(Arc<rustls::ServerConfig>, Arc<crate::tls::CertReloader>)>,
    proxy: SocketAddr,
    watch_interval: std::time::Duration,
) -> Result<SocketAddr, GatewayError> {
    let Some(handle) = runtime.handle() else {
        return Err(GatewayError::Control("control runtime is gone".into()));
    };
    let admin_addr = admin.local_addr().map_err(GatewayError::Runtime)?;
    let _ = shared.control.addrs.set(Addrs {
        proxy,
        admin: admin_addr,
    });
    let listener = {
        let _enter = handle.enter();
        tokio::net::TcpListener::from_std(admin).map_err(GatewayError::Runtime)?
    };
    let router = crate::admin::router(Arc::clone(shared));
    let mtls = admin_tls.is_some();
    let acceptor = admin_tls.map(|(cfg, certs)| {
        handle.spawn(crate::server::watch_certs("admin", certs, watch_interval));
        tokio_rustls::TlsAcceptor::from(cfg)
    });
    handle.spawn(crate::admin::serve(
        listener,
        acceptor,
        router,
        shared.admin_handed_over.subscribe(),
    ));
    if shared.control.is_etcd() {
        handle.spawn(etcd_sync::run(Arc::clone(shared)));
        handle.spawn(etcd_sync::fleet(Arc::clone(shared)));
    }
    tracing::info!(listener = "admin", addr = %admin_addr, mtls, "listening");
    Ok(admin_addr)
}

/// A gateway's control plane without listeners, on the current runtime (tests and tools):
/// local mode, state in `state_dir`.
pub fn standalone(config: Config, state_dir: &Path) -> Result<Arc<Shared>, GatewayError> {
    let mut opts = RunOptions::new(config);
    opts.state_dir = Some(state_dir.to_owned());
    opts.admin_listen = Some("127.0.0.1:0".into());
    let health = HealthRegistry::new();
    let boot = boot(&opts, &health)?;
    let mut state = boot.state;
    if let Ok(h) = tokio::runtime::Handle::try_current() {
        state.audit = Audit::new(state.audit_sink(), h);
    }
    // The runtime made by `boot` is not needed: the caller's runtime runs everything.
    drop(boot.runtime);
    let config = state.desired().config.clone();
    Ok(Arc::new(Shared::with_control(
        boot.table, health, config, state, None,
    )))
}

impl ControlState {
    fn audit_sink(&self) -> Arc<dyn crate::audit::AuditSink> {
        self.audit.sink()
    }
}

/// Apply a configuration file (local mode): the file with the admin overlay on top,
/// validated, built and swapped. Returns the new version, or why it was refused.
pub async fn apply_file(shared: &Arc<Shared>, file: Config) -> Result<u64, String> {
    let c = &shared.control;
    let Backend::Local {
        overlay_path,
        file: file_cfg,
    } = &c.backend
    else {
        return Err("the configuration comes from etcd; file changes are not applied".into());
    };
    let _g = c.changes.lock().await;
    let mut overlay = AdminOverlay::load(overlay_path).map_err(|e| e.to_string())?;
    let pinned = pin_implicit_slots(&c.desired().config, &file, &mut overlay);
    let file2 = file.clone();
    let overlay2 = overlay.clone();
    let merged = tokio::task::spawn_blocking(move || overlay2.apply(&file2))
        .await
        .map_err(|e| e.to_string())?;
    let result = match merged {
        Ok((merged, dropped)) => {
            for d in dropped {
                tracing::warn!(cell = %d, "admin overlay names a cell the configuration no longer has; ignored");
            }
            install(shared, merged, None, Source::File, 0).await
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(v) => {
            if let Some(kept) = pinned {
                // Kept in the admin overlay like an admin slot move, so a restart keeps
                // the owners too.
                match overlay.save(overlay_path) {
                    Ok(()) => tracing::warn!(
                        slots_kept = kept,
                        "the configuration has no slots section and its cells changed: every slot stays with its cell (adding a cell moves none); the slot table is now kept in the admin overlay (move slots with the admin API)"
                    ),
                    Err(e) => tracing::error!(
                        error = %e,
                        "cannot save the slot table kept for the changed cells; a restart would split the slots anew"
                    ),
                }
            }
            file_cfg.store(Arc::new(file));
            c.set_status(|s| s.rejected = None);
            Ok(v)
        }
        Err(e) => {
            let reason = e.to_string();
            c.set_status(|s| {
                s.rejected = Some(Rejection {
                    version: 0,
                    reason: reason.clone(),
                    at: now_rfc3339(),
                })
            });
            Err(reason)
        }
    }
}

/// A file without a `slots` section splits the slots evenly in cell order, so adding,
/// removing or reordering cells would move most keys (SPEC §4: adding a cell moves none).
/// When the configuration serving now had that implicit split too (no overlay slot table)
/// and the new file's would differ, every slot whose cell is still there stays with it; a
/// removed cell's slots go to its first failover target still there (where its keys were
/// failing over to), else to the new split's owner. The result is set as `overlay.slots`.
/// Returns how many slots were kept from moving.
fn pin_implicit_slots(prev: &Config, file: &Config, overlay: &mut AdminOverlay) -> Option<usize> {
    use cellgate_config::mutate::{slot_assignments, slot_owners};
    if overlay.slots.is_some()
        || !file.slots.is_empty()
        || !prev.slots.is_empty()
        || prev.routing.slot_count != file.routing.slot_count
    {
        return None;
    }
    let (old, new) = (slot_owners(prev).ok()?, slot_owners(file).ok()?);
    let index_of = |id: &str| file.cells.iter().position(|c| c.id == id);
    let mut kept = 0;
    let owners: Vec<usize> = old
        .iter()
        .zip(&new)
        .map(|(&o, &n)| {
            let Some(was) = prev.cells.get(o) else {
                return n;
            };
            match index_of(&was.id) {
                Some(i) => {
                    if i != n {
                        kept += 1;
                    }
                    i
                }
                None => was
                    .effective_failover()
                    .iter()
                    .find_map(|f| index_of(f))
                    .unwrap_or(n),
            }
        })
        .collect();
    if kept == 0 {
        return None;
    }
    overlay.slots = Some(slot_assignments(&file.cells, &owners));
    Some(kept)
}

fn next_version(shared: &Shared) -> u64 {
    shared
        .table
        .load()
        .version()
        .max(shared.control.desired.load().version)
        + 1
}

fn doc_json(v: &Option<Vec<u8>>) -> serde_json::Value {
    v.as_ref()
        .and_then(|b| serde_json::from_slice(b).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// Plan, audit and apply one admin mutation (see the module docs for where it goes).
pub async fn mutate(
    shared: &Arc<Shared>,
    req: MutationRequest,
) -> Result<MutationOutcome, ControlError> {
    let started = Instant::now();
    let c = &shared.control;
    // Local changes are serialized here; etcd changes are serialized by the switch lock
    // and the revision compare, so concurrent planning is fine there.
    let _guard = if c.is_etcd() {
        None
    } else {
        Some(c.changes.lock().await)
    };
    let desired = c.desired();
    if matches!(c.backend, Backend::Etcd { .. }) && desired.source != Source::Etcd {
        return Err(ControlError::NotFromStore(match desired.source {
            Source::FileFallback => {
                "the configuration file (the etcd prefix holds no configuration)"
            }
            Source::LastKnownGood => "the last known good table (etcd was unreachable)",
            Source::File | Source::Etcd => "the configuration file",
        }));
    }
    let after_cfg = req.mutation.apply(&desired.config)?;
    let before_table = shared.table.load_full();
    let next = next_version(shared);
    let shared2 = Arc::clone(shared);
    let cfg2 = after_cfg.clone();
    let (after_table, plan) = tokio::task::spawn_blocking(move || {
        let t = cfg2.build_table(next, &shared2.health)?;
        let plan = impact(&before_table, &t, cellgate_health::now_ms());
        Ok::<_, ConfigError>((t, plan))
    })
    .await
    .map_err(|e| ControlError::Internal(e.to_string()))?
    .map_err(ControlError::Build)?;
    let cap = c.admin.max_move_share;
    let exceeds_cap = plan.share_moved > cap + 1e-12;
    if exceeds_cap && !req.force && !req.dry_run {
        return Err(ControlError::Cap {
            share: plan.share_moved,
            slots: plan.slots_rerouted,
            cap,
        });
    }
    let changes = changed_documents(&desired.config, &after_cfg, desired.slots_version)
        .map_err(ControlError::Build)?;
    if let (Mutation::Restore { cell }, true) = (&req.mutation, changes.is_empty()) {
        let table = shared.table.load();
        if let Some(c) = table.cell_idx(cell).and_then(|i| table.cell(i)) {
            if c.health.is_failed_over() {
                return Err(ControlError::HeldByHealth {
                    cell: cell.clone(),
                    reason: c.health.failover_reason(),
                });
            }
        }
    }
    let mut rec = AuditRecord::new(req.actor.clone(), req.mutation.action());
    rec.target = req.mutation.cell().map(str::to_owned);
    rec.request = req.request.clone();
    rec.before = changes
        .iter()
        .map(|(k, b, _)| (k.clone(), doc_json(b)))
        .collect::<serde_json::Map<_, _>>()
        .into();
    rec.after = changes
        .iter()
        .map(|(k, _, a)| (k.clone(), doc_json(a)))
        .collect::<serde_json::Map<_, _>>()
        .into();
    rec.plan = serde_json::to_value(&plan).unwrap_or_default();
    rec.dry_run = req.dry_run;
    rec.gateway = Some(c.gateway_id.clone());
    rec.base_version = Some(desired.version);
    let mut out = MutationOutcome {
        action: req.mutation.action(),
        cell: rec.target.clone(),
        dry_run: req.dry_run,
        applied: false,
        base_version: desired.version,
        table_version: shared.table.load().version(),
        plan,
        max_move_share: cap,
        exceeds_cap,
        audit_id: rec.id.clone(),
    };
    if req.dry_run {
        rec.duration_ms = started.elapsed().as_secs_f64() * 1e3;
        c.audit.append(&rec).await?;
        return Ok(out);
    }
    if changes.is_empty() {
        // Nothing to change (already drained, same weight, ...): still audited.
        rec.duration_ms = started.elapsed().as_secs_f64() * 1e3;
        c.audit.append(&rec).await?;
        return Ok(out);
    }
    match &c.backend {
        Backend::Local { overlay_path, file } => {
            let overlay = AdminOverlay::diff(&file.load(), &after_cfg);
            let previous = AdminOverlay::load(overlay_path).map_err(ControlError::Persist)?;
            overlay.save(overlay_path).map_err(ControlError::Persist)?;
            rec.duration_ms = started.elapsed().as_secs_f64() * 1e3;
            if let Err(e) = c.audit.append(&rec).await {
                let _ = previous.save(overlay_path);
                return Err(e.into());
            }
            let v = install(
                shared,
                after_cfg,
                // Numbered under the writer lock: a health rebuild since the plan may
                // have taken the number the plan was built with.
                None,
                Source::File,
                0,
            )
            .await
            .map_err(ControlError::Build)?;
            shared.metrics.reload("admin", true);
            out.applied = true;
            out.table_version = v;
        }
        Backend::Etcd { store, .. } => {
            let writes: Vec<(String, Option<Vec<u8>>)> =
                changes.into_iter().map(|(k, _, a)| (k, a)).collect();
            rec.duration_ms = started.elapsed().as_secs_f64() * 1e3;
            let rev = store.commit(desired.version, &writes, &rec).await?;
            let rev = u64::try_from(rev).unwrap_or(0);
            let mut rx = c.applied();
            // Committed either way; `applied` says whether this gateway serves it yet (it
            // may have refused the result, say, or its watch may lag).
            out.applied = matches!(
                tokio::time::timeout(APPLY_WAIT, rx.wait_for(|v| *v >= rev)).await,
                Ok(Ok(_))
            );
            out.table_version = shared.table.load().version();
            if !out.applied {
                tracing::warn!(
                    revision = rev,
                    serving = out.table_version,
                    "admin change committed to etcd but not applied here within {APPLY_WAIT:?}"
                );
            }
        }
    }
    // Manual switches are counted with the automatic ones (SPEC §3, §8): a drain or a
    // switch as a failover from the cell to where its keys go now, a restore as a return.
    let switch_us = started.elapsed().as_micros() as u64;
    match &req.mutation {
        Mutation::Switch { cell, to } => shared.metrics.failover(cell, to, "manual", switch_us),
        Mutation::Drain { cell } => {
            let now = cellgate_health::now_ms();
            let to = after_table
                .cell_idx(cell)
                .and_then(|ci| after_table.cell(ci))
                .and_then(|c| {
                    c.failover.iter().find_map(|&f| {
                        let fc = after_table.cell(f)?;
                        fc.is_serving(now, after_table.health_policy())
                            .then(|| fc.id.to_string())
                    })
                })
                .unwrap_or_else(|| "none".to_owned());
            shared.metrics.failover(cell, &to, "drain", switch_us);
        }
        Mutation::Restore { .. } => shared.metrics.switch(switch_us),
        _ => {}
    }
    tracing::info!(
        actor = %req.actor,
        action = out.action,
        cell = out.cell.as_deref().unwrap_or("none"),
        version = out.table_version,
        slots_moved = out.plan.slots_moved,
        share_moved = out.plan.share_moved,
        "admin change applied"
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cfg(cells: &[(&str, &str)]) -> Config {
        let mut y = String::from("regions: [r1]\ncells:\n");
        for (id, failover) in cells {
            y.push_str(&format!(
                "  - {{ id: {id}, region: r1, failover: [{failover}], instances: [ {{ name: {id}-1, addr: \"127.0.0.1:9\" }} ] }}\n"
            ));
        }
        Config::from_yaml(&y).unwrap()
    }

    fn owners(c: &Config, o: &AdminOverlay) -> Vec<String> {
        let mut c = c.clone();
        c.slots = o.slots.clone().unwrap_or_default();
        cellgate_config::mutate::slot_owners(&c)
            .unwrap()
            .into_iter()
            .map(|i| c.cells[i].id.clone())
            .collect()
    }

    #[test]
    fn cells_added_or_removed_without_a_slots_section_keep_the_other_cells_slots() {
        let four = cfg(&[("a", ""), ("b", ""), ("c", ""), ("d", "c")]);
        let before = owners(&four, &AdminOverlay::default());
        // Adding a cell, first: every slot keeps its cell; the new cell gets none.
        let five = cfg(&[("n", ""), ("a", ""), ("b", ""), ("c", ""), ("d", "c")]);
        let mut o = AdminOverlay::default();
        assert!(pin_implicit_slots(&four, &five, &mut o).is_some());
        assert_eq!(owners(&five, &o), before);
        // Removing d: a, b and c keep theirs; d's go to its failover target c.
        let three = cfg(&[("a", ""), ("b", ""), ("c", "")]);
        let mut o = AdminOverlay::default();
        assert!(pin_implicit_slots(&four, &three, &mut o).is_some());
        let after = owners(&three, &o);
        for (s, (b, a)) in before.iter().zip(&after).enumerate() {
            let want = if b == "d" { "c" } else { b.as_str() };
            assert_eq!(a, want, "slot {s}");
        }
        // The same cells: nothing to pin.
        let mut o = AdminOverlay::default();
        assert!(pin_implicit_slots(&four, &four.clone(), &mut o).is_none());
        assert!(o.slots.is_none());
    }
}
