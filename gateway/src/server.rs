//! The gateway process: shared state, listeners, one single-threaded runtime per worker
//! thread (each accepting on the shared listening sockets and owning its own upstream
//! pool), the connection limit, configuration and certificate reload, and signals:
//! SIGHUP reloads, SIGTERM drains (stop accepting, let in-flight requests finish within
//! `shutdown.grace`, exit), SIGINT exits at once, SIGUSR2 starts a new binary on the same
//! listening sockets ([`crate::upgrade`]).

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use cellgate_config::Config;

use cellgate_health::HealthRegistry;
use cellgate_routing::RoutingTable;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio_rustls::TlsAcceptor;

use crate::conn::{Alpn, ConnSettings};
use crate::guard::Guard;
use crate::proxy::error::ProxyError;
use crate::proxy::{ConnInfo, Proxy, Worker};
use crate::tls::{CertReload, CertReloader, UpstreamTlsMap};

/// Runs futures on the current thread's `LocalSet` (hyper's executor for a worker).
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalExec;

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: Future + 'static,
{
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}

/// State shared by all workers.
#[derive(Debug)]
pub struct Shared {
    /// The current routing table: one immutable snapshot, swapped whole.
    pub table: ArcSwap<RoutingTable>,
    /// Health state by cell and instance identity; survives table swaps.
    pub health: HealthRegistry,
    /// Upstream TLS of the cells that have it; rebuilt with the table.
    pub upstream_tls: ArcSwap<UpstreamTlsMap>,
    /// The only writer of `table`: the configuration it is built from. Reloads, health
    /// transitions and weight updates all go through it, so none is lost. Never taken on
    /// the request path.
    pub writer: tokio::sync::Mutex<TableWriter>,
    /// Requests in flight through the gateway (load shedding).
    pub in_flight: AtomicU64,
    /// The gateway is draining (SIGTERM): `/readyz` answers 503 so load balancers stop
    /// sending to it.
    pub draining: std::sync::atomic::AtomicBool,
    /// Set when a new binary took over the sockets and this process drains: its admin
    /// listener stops accepting (the new process answers on the same socket).
    pub admin_handed_over: tokio::sync::watch::Sender<bool>,
    /// Shedding limits by SLO class.
    pub shedding: SheddingLimits,
    /// Recent cell switches (newest last), for operators.
    pub switches: std::sync::Mutex<std::collections::VecDeque<SwitchEvent>>,
    /// Prometheus metrics.
    pub metrics: crate::metrics::Metrics,
    /// OTLP span exporter, when configured.
    pub traces: Option<crate::telemetry::Exporter>,
    /// Control plane: where the desired configuration comes from (file + admin overlay, or
    /// etcd), store status, audit log. Never read on the request path.
    pub control: crate::control::ControlState,
}

/// Builds tables from the current configuration.
#[derive(Debug)]
pub struct TableWriter {
    /// The configuration tables are built from.
    pub config: Config,
    /// Gray rules switched off by their guard.
    pub gray_overlay: GrayOverlay,
}

impl TableWriter {
    /// A writer over `config`.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            gray_overlay: GrayOverlay::default(),
        }
    }
}

/// Gray rules switched off by their canary guard: rule name → (the rule as configured when
/// it tripped, why). A reload keeps a rule off unless the operator changed that rule.
#[derive(Debug, Clone, Default)]
pub struct GrayOverlay(pub std::collections::BTreeMap<String, (cellgate_config::GrayCfg, String)>);

impl GrayOverlay {
    /// Forget trips of rules that `config` changed or removed.
    pub fn rearm(&mut self, config: &Config) {
        self.0
            .retain(|name, (was, _)| config.gray.iter().any(|g| &g.name == name && g == was));
    }

    /// `config` with the tripped rules switched off.
    pub fn apply(&self, config: &Config) -> Config {
        let mut c = config.clone();
        for g in c.gray.iter_mut() {
            if self.0.get(&g.name).is_some_and(|(was, _)| was == g) {
                g.enabled = false;
            }
        }
        c
    }
}

/// In-flight limits per SLO class (critical, standard, best-effort).
#[derive(Debug, Default)]
pub struct SheddingLimits {
    /// Critical requests are shed past this.
    pub max: AtomicU64,
    /// Standard requests are shed past this.
    pub standard: AtomicU64,
    /// Best-effort requests are shed past this.
    pub best_effort: AtomicU64,
}

impl SheddingLimits {
    /// Apply a configuration's `shedding:` section.
    pub fn apply(&self, c: &cellgate_config::SheddingCfg) {
        let max = c.max_in_flight.max(1);
        self.max.store(max, Ordering::Relaxed);
        self.standard.store(
            ((max as f64) * c.standard_at).floor().max(1.0) as u64,
            Ordering::Relaxed,
        );
        self.best_effort.store(
            ((max as f64) * c.best_effort_at).floor().max(1.0) as u64,
            Ordering::Relaxed,
        );
    }
}

/// One automatic or manual cell switch.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SwitchEvent {
    /// Unix time, milliseconds.
    pub at_unix_ms: u64,
    /// Cell.
    pub cell: String,
    /// `failed_over` or `returned`.
    pub action: &'static str,
    /// Why.
    pub reason: String,
    /// From detection to the new table serving, in milliseconds.
    pub switch_ms: f64,
    /// How long the cell was failed over (for returns), in milliseconds.
    pub failed_over_ms: Option<u64>,
    /// Table version that carries the switch.
    pub table_version: u64,
}

impl Shared {
    /// Shared state around a first table built from `config`, and a control plane.
    pub fn with_control(
        table: RoutingTable,
        health: HealthRegistry,
        config: Config,
        control: crate::control::ControlState,
        traces: Option<crate::telemetry::Exporter>,
    ) -> Self {
        let shedding = SheddingLimits::default();
        shedding.apply(&config.shedding);
        Self {
            upstream_tls: ArcSwap::from_pointee(UpstreamTlsMap::default()),
            table: ArcSwap::from_pointee(table),
            health,
            writer: tokio::sync::Mutex::new(TableWriter::new(config)),
            in_flight: AtomicU64::new(0),
            draining: std::sync::atomic::AtomicBool::new(false),
            admin_handed_over: tokio::sync::watch::Sender::new(false),
            shedding,
            switches: std::sync::Mutex::new(std::collections::VecDeque::new()),
            metrics: crate::metrics::Metrics::default(),
            traces,
            control,
        }
    }

    /// Build a new table version from `writer.config` and swap it in. Caller holds the writer.
    pub fn rebuild(&self, writer: &TableWriter) -> Result<u64, cellgate_config::ConfigError> {
        let next = self.table.load().version() + 1;
        let table = writer
            .gray_overlay
            .apply(&writer.config)
            .build_table(next, &self.health)?;
        self.table.store(Arc::new(table));
        Ok(next)
    }

    /// Remember a switch (bounded history).
    pub fn push_switch(&self, e: SwitchEvent) {
        // Every automatic switch is an audit event, with its reason and duration.
        let mut rec = cellgate_config::AuditRecord::new(
            format!("gateway:{}", self.control.gateway_id),
            e.action,
        );
        rec.target = (!e.cell.is_empty()).then(|| e.cell.clone());
        rec.duration_ms = e.switch_ms;
        rec.plan = serde_json::json!({
            "reason": e.reason,
            "table_version": e.table_version,
            "failed_over_ms": e.failed_over_ms,
        });
        self.control.audit.record(rec);
        let mut q = match self.switches.lock() {
            Ok(q) => q,
            Err(p) => p.into_inner(),
        };
        if q.len() >= 1000 {
            q.pop_front();
        }
        q.push_back(e);
    }
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The configuration is invalid.
    #[error("configuration: {0}")]
    Config(#[from] cellgate_config::ConfigError),
    /// A listener could not be opened.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// Address.
        addr: String,
        /// OS error.
        source: std::io::Error,
    },
    /// TLS could not be set up.
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The runtime could not start.
    #[error("runtime: {0}")]
    Runtime(std::io::Error),
    /// An option is not available.
    #[error("{0}")]
    Unsupported(String),
    /// The control plane (admin API, configuration store) could not start.
    #[error("control plane: {0}")]
    Control(String),
    /// A command-line override does not pass the check its configuration key gets.
    #[error("{flag} {value:?}: {message}")]
    BadOption {
        /// The flag (`--etcd-prefix`).
        flag: &'static str,
        /// The value given.
        value: String,
        /// What is wrong with it.
        message: &'static str,
    },
}

/// How to run the gateway.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The configuration (already validated).
    pub config: Config,
    /// The file it came from; watched for changes when set.
    pub config_path: Option<PathBuf>,
    /// Override of `listen.http`.
    pub listen: Option<String>,
    /// Override of `workers`.
    pub workers: Option<usize>,
    /// How often the file is checked for changes.
    pub watch_interval: Duration,
    /// How often the health controller publishes weights and evaluates cell failover.
    pub health_tick: Duration,
    /// Override of `admin.listen`.
    pub admin_listen: Option<String>,
    /// Admin token (`CELLGATE_ADMIN_TOKEN`), overriding `admin.token`.
    pub admin_token: Option<String>,
    /// etcd endpoints (`--etcd`), overriding `etcd.endpoints`; etcd becomes the source.
    pub etcd: Option<Vec<String>>,
    /// Override of `etcd.prefix` (`--etcd-prefix`); checked like the key.
    pub etcd_prefix: Option<String>,
    /// Override of `etcd.gateway_id` (`--gateway-id`); checked like the key.
    pub gateway_id: Option<String>,
    /// Override of `admin.state_dir`.
    pub state_dir: Option<PathBuf>,
    /// Hands memory the allocator holds but no longer uses back to the OS, for the calling
    /// thread. The binary sets it for its global allocator; each worker calls it every
    /// [`MEMORY_RELEASE_EVERY`], so memory freed by closed or parked connections does not
    /// stay resident while a worker is quiet (an allocator that only purges when it is
    /// called would otherwise keep it).
    pub release_memory: Option<fn()>,
}

/// How often each worker calls [`RunOptions::release_memory`].
pub const MEMORY_RELEASE_EVERY: Duration = Duration::from_secs(2);

/// A runtime thread-park hook that calls `release` when the thread goes idle, at most every
/// [`MEMORY_RELEASE_EVERY`] per thread: for the control-plane and signal runtimes, whose
/// threads build tables and parse configuration and would otherwise keep what they freed.
pub(crate) fn release_on_park(release: fn()) -> impl Fn() + Send + Sync + 'static {
    move || {
        thread_local!(static LAST: std::cell::Cell<Option<std::time::Instant>> = const { std::cell::Cell::new(None) });
        let now = std::time::Instant::now();
        LAST.with(|last| {
            if last
                .get()
                .is_none_or(|t| now.duration_since(t) >= MEMORY_RELEASE_EVERY)
            {
                last.set(Some(now));
                release();
            }
        });
    }
}

impl RunOptions {
    /// Options for `config` with defaults.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            config_path: None,
            listen: None,
            workers: None,
            watch_interval: Duration::from_millis(250),
            health_tick: Duration::from_millis(100),
            admin_listen: None,
            admin_token: None,
            etcd: None,
            etcd_prefix: None,
            gateway_id: None,
            state_dir: None,
            release_memory: None,
        }
    }
}

/// Client connections of the whole process, and the drain signal.
#[derive(Debug)]
pub struct Lifecycle {
    conns: AtomicUsize,
    max: usize,
    drain: watch::Sender<bool>,
    idle: Notify,
}

impl Lifecycle {
    fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            conns: AtomicUsize::new(0),
            max,
            drain: watch::Sender::new(false),
            idle: Notify::new(),
        })
    }

    /// Count a new connection, unless the process is at `limits.max_connections`.
    fn try_acquire(self: &Arc<Self>) -> Option<ConnPermit> {
        let prev = self.conns.fetch_add(1, Ordering::AcqRel);
        if prev >= self.max {
            self.release();
            return None;
        }
        Some(ConnPermit(Arc::clone(self)))
    }

    fn release(&self) {
        if self.conns.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }

    /// Client connections open now.
    pub fn connections(&self) -> usize {
        self.conns.load(Ordering::Acquire)
    }

    /// Stop accepting and close connections as their requests finish.
    pub fn start_drain(&self) {
        self.drain.send_replace(true);
    }

    /// Wait until no client connection is open, at most `grace`; `true` when none is.
    pub async fn wait_idle(&self, grace: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.idle.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.connections() == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(grace, wait).await.is_ok()
    }
}

/// One counted client connection.
#[derive(Debug)]
struct ConnPermit(Arc<Lifecycle>);

impl Drop for ConnPermit {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// A started gateway: listeners bound, workers running.
pub struct Gateway {
    /// Shared state.
    pub shared: Arc<Shared>,
    /// Bound proxy address.
    pub http_addr: SocketAddr,
    /// Bound TLS address, if any.
    pub tls_addr: Option<SocketAddr>,
    /// Connections and drain.
    pub lifecycle: Arc<Lifecycle>,
    /// Bound admin API address.
    pub admin_addr: SocketAddr,
    opts: RunOptions,
    /// The listening sockets, for a binary upgrade.
    listeners: Vec<(&'static str, std::net::TcpListener)>,
    certs: Option<Arc<CertReloader>>,
    exe: Option<PathBuf>,
    /// Pid of the new binary started by SIGUSR2 while it runs (0: none).
    successor: Arc<std::sync::atomic::AtomicU32>,
    exporter_task: Option<BoxTask>,
    config_digest: Option<u64>,
    control: crate::control::ControlRuntime,
    /// Taken by [`Gateway::run_until_signal`].
    main: Option<MainLoop>,
}

/// The main thread's runtime and the signals it serves. Set up before any worker accepts:
/// a SIGTERM that arrives while the first requests are being served must drain the
/// process, not kill it with the signal's default action.
struct MainLoop {
    rt: tokio::runtime::Runtime,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl MainLoop {
    fn new(release_memory: Option<fn()>) -> Result<Self, GatewayError> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut b = tokio::runtime::Builder::new_current_thread();
        if let Some(release) = release_memory {
            b.on_thread_park(release_on_park(release));
        }
        let rt = b.enable_all().build().map_err(GatewayError::Runtime)?;
        let _in = rt.enter();
        let on = |kind| signal(kind).map_err(GatewayError::Runtime);
        Ok(Self {
            term: on(SignalKind::terminate())?,
            int: on(SignalKind::interrupt())?,
            usr2: on(SignalKind::user_defined2())?,
            hup: on(SignalKind::hangup())?,
            rt,
        })
    }
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("http_addr", &self.http_addr)
            .field("tls_addr", &self.tls_addr)
            .field("admin_addr", &self.admin_addr)
            .finish()
    }
}

/// A background task the gateway starts when it runs.
pub type BoxTask = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// Bind a listening socket (address reuse on, non-blocking).
pub fn bind_listener(addr: &str) -> Result<std::net::TcpListener, GatewayError> {
    bind(addr)
}

/// The listening socket `name` handed over by a previous process (binary upgrade), or a
/// new one bound to `addr`.
pub fn bind_or_inherit(name: &str, addr: &str) -> Result<std::net::TcpListener, GatewayError> {
    match crate::upgrade::take_inherited(name) {
        Some(l) => {
            tracing::info!(listener = name, addr = ?l.local_addr().ok(), "using the listening socket handed over by the previous process");
            Ok(l)
        }
        None => bind(addr),
    }
}

fn bind(addr: &str) -> Result<std::net::TcpListener, GatewayError> {
    let err = |source| GatewayError::Listen {
        addr: addr.to_owned(),
        source,
    };
    let sa: SocketAddr = addr.parse().map_err(|_| {
        err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not ip:port",
        ))
    })?;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(sa),
        socket2::Type::STREAM,
        None,
    )
    .map_err(err)?;
    socket.set_reuse_address(true).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    socket.bind(&sa.into()).map_err(err)?;
    socket.listen(4096).map_err(err)?;
    Ok(socket.into())
}

impl Gateway {
    /// Build the first table, bind (or inherit) the listeners and start the workers.
    pub fn start(opts: RunOptions) -> Result<Self, GatewayError> {
        // The file as it is now, before anyone is told we listen: an edit made after that is
        // a change the watcher must apply.
        let config_digest = opts
            .config_path
            .as_deref()
            .and_then(crate::reload::file_digest);
        let main = MainLoop::new(opts.release_memory)?;
        let health = HealthRegistry::new();
        let boot = crate::control::boot(&opts, &health)?;
        let (traces, exporter_task) = match &opts.config.telemetry.otlp_endpoint {
            Some(endpoint) => {
                let (e, task) = crate::telemetry::Exporter::new(
                    endpoint.clone(),
                    opts.config.telemetry.service_name.clone(),
                );
                (Some(e), Some(Box::pin(task) as BoxTask))
            }
            None => (None, None),
        };
        let desired = boot.state.desired().config.clone();
        let upstream_tls = UpstreamTlsMap::from_config(&desired)?;
        let shared = Arc::new(Shared::with_control(
            boot.table, health, desired, boot.state, traces,
        ));
        shared.upstream_tls.store(Arc::new(upstream_tls));
        let settings = ConnSettings::new(&opts.config.limits);
        let lifecycle = Lifecycle::new(opts.config.limits.max_connections);

        let http_listen = opts
            .listen
            .clone()
            .unwrap_or_else(|| opts.config.listen.http.clone());
        let http = bind_or_inherit("proxy", &http_listen)?;
        let http_addr = http.local_addr().map_err(GatewayError::Runtime)?;
        let mut listeners = vec![("proxy", http.try_clone().map_err(GatewayError::Runtime)?)];
        let mut certs = None;
        let tls = match &opts.config.listen.tls {
            Some(t) => {
                let (cfg, reloader) = crate::tls::reloading_server_config(&t.cert, &t.key)?;
                certs = Some(reloader);
                let l = bind_or_inherit("tls", &t.listen)?;
                listeners.push(("tls", l.try_clone().map_err(GatewayError::Runtime)?));
                Some((l, TlsAcceptor::from(cfg)))
            }
            None => None,
        };
        let tls_addr = match &tls {
            Some((l, _)) => Some(l.local_addr().map_err(GatewayError::Runtime)?),
            None => None,
        };

        let workers = opts
            .workers
            .filter(|&w| w > 0)
            .or(Some(opts.config.workers).filter(|&w| w > 0))
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        for n in 0..workers {
            let ctx = WorkerCtx {
                shared: Arc::clone(&shared),
                idle_per_instance: opts.config.limits.upstream_idle_per_instance,
                settings: settings.clone(),
                lifecycle: Arc::clone(&lifecycle),
                release_memory: opts.release_memory,
            };
            let http = http.try_clone().map_err(GatewayError::Runtime)?;
            let tls = match &tls {
                Some((l, a)) => Some((l.try_clone().map_err(GatewayError::Runtime)?, a.clone())),
                None => None,
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(GatewayError::Runtime)?;
            std::thread::Builder::new()
                .name(format!("cellgate-worker-{n}"))
                .spawn(move || {
                    let local = tokio::task::LocalSet::new();
                    local.block_on(&rt, worker_main(ctx, http, tls));
                })
                .map_err(GatewayError::Runtime)?;
        }
        let pid = std::process::id();
        tracing::info!(listener = "proxy", addr = %http_addr, workers, pid, "listening");
        if let Some(a) = tls_addr {
            tracing::info!(listener = "tls", addr = %a, pid, "listening");
        }
        listeners.push((
            "admin",
            boot.admin.try_clone().map_err(GatewayError::Runtime)?,
        ));
        let admin_addr = crate::control::start(
            &shared,
            &boot.runtime,
            boot.admin,
            boot.admin_tls,
            http_addr,
            opts.watch_interval,
        )?;
        Ok(Self {
            shared,
            http_addr,
            tls_addr,
            lifecycle,
            admin_addr,
            opts,
            listeners,
            certs,
            exe: std::env::current_exe().ok(),
            successor: Arc::new(std::sync::atomic::AtomicU32::new(0)),
            exporter_task,
            config_digest,
            control: boot.runtime,
            main: Some(main),
        })
    }

    /// Serve until a signal: SIGTERM drains and returns, SIGINT returns at once, SIGUSR2
    /// starts the new binary on the same sockets, SIGHUP (and file changes) reload the
    /// configuration; certificate files are watched too.
    pub fn run_until_signal(mut self) -> Result<(), GatewayError> {
        let MainLoop {
            rt,
            mut term,
            mut int,
            mut usr2,
            hup,
        } = self.main.take().ok_or_else(|| {
            GatewayError::Runtime(std::io::Error::other("the gateway's main loop already ran"))
        })?;
        rt.block_on(async move {
            let _control = &self.control;
            if let Some(path) = self
                .opts
                .config_path
                .clone()
                .filter(|_| !self.shared.control.is_etcd())
            {
                tokio::spawn(crate::reload::watch_file(
                    Arc::clone(&self.shared),
                    path,
                    self.config_digest,
                    self.opts.watch_interval,
                    hup,
                ));
            } else if self.shared.control.is_etcd() {
                // Routing comes from etcd; say so instead of ignoring the signal silently.
                let mut hup = hup;
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        tracing::warn!("SIGHUP: nothing reloaded; in etcd mode routing changes come from etcd, and the file's other sections (health, shedding, limits) apply at restart");
                    }
                });
            }
            tokio::spawn(crate::controller::run(
                Arc::clone(&self.shared),
                self.opts.health_tick,
            ));
            if let Some(task) = self.exporter_task.take() {
                tokio::spawn(task);
            }
            if let Some(certs) = self.certs.clone() {
                tokio::spawn(watch_certs("tls", certs, self.opts.watch_interval));
            }
            crate::upgrade::signal_predecessor();
            loop {
                tokio::select! {
                    _ = term.recv() => break,
                    _ = int.recv() => {
                        tracing::info!("SIGINT: stopping now");
                        return Ok(());
                    }
                    _ = usr2.recv() => self.upgrade(),
                }
            }
            let grace = self.opts.config.shutdown.grace_duration();
            tracing::info!(
                connections = self.lifecycle.connections(),
                grace_ms = grace.as_millis() as u64,
                "SIGTERM: draining; no new connections, in-flight requests finish"
            );
            // Draining for good: /readyz says so. Not when a new binary took over the
            // sockets (it sent the SIGTERM and answers /readyz on the same admin socket:
            // the address stays ready).
            if self.successor.load(Ordering::Acquire) == 0 {
                self.shared.draining.store(true, Ordering::Release);
            } else {
                self.shared.admin_handed_over.send_replace(true);
            }
            self.lifecycle.start_drain();
            // The workers close their listening sockets as their accept loops end; close
            // this thread's copies too, so new clients are refused at once (a successor, if
            // any, holds its own) instead of waiting in the backlog until the process
            // exits. The admin listener stays, to watch the drain (unless a new binary took
            // over: then it answers there).
            self.listeners.retain(|(name, _)| *name == "admin");
            if self.lifecycle.wait_idle(grace).await {
                tracing::info!("drained; exiting");
            } else {
                tracing::warn!(
                    connections = self.lifecycle.connections(),
                    "grace period over with connections still open; exiting"
                );
            }
            Ok(())
        })
    }

    /// Start the binary this process was started from, handing it the listeners.
    fn upgrade(&self) {
        let Some(exe) = &self.exe else {
            tracing::error!("SIGUSR2: cannot tell this binary's path; no upgrade");
            return;
        };
        let ls: Vec<(&str, &std::net::TcpListener)> =
            self.listeners.iter().map(|(n, l)| (*n, l)).collect();
        match crate::upgrade::spawn_successor(exe, &ls) {
            Ok(mut child) => {
                let pid = child.id();
                tracing::info!(new_pid = pid, binary = %exe.display(), "SIGUSR2: started the new binary on the same sockets; draining once it serves");
                self.successor.store(pid, Ordering::Release);
                let successor = Arc::clone(&self.successor);
                std::thread::spawn(move || {
                    match child.wait() {
                        Ok(st) => {
                            tracing::warn!(new_pid = pid, status = %st, "the new process exited; if it never served, this process keeps serving")
                        }
                        Err(e) => {
                            tracing::warn!(new_pid = pid, error = %e, "cannot wait for the new process")
                        }
                    }
                    let _ = successor.compare_exchange(pid, 0, Ordering::AcqRel, Ordering::Acquire);
                });
            }
            Err(e) => {
                tracing::error!(binary = %exe.display(), error = %e, "SIGUSR2: cannot start the new binary; this process keeps serving")
            }
        }
    }
}

/// Look at `listener`'s certificate files at `interval`; a changed, valid pair serves new
/// connections, a bad one is refused and the old one kept.
pub(crate) async fn watch_certs(
    listener: &'static str,
    certs: Arc<CertReloader>,
    interval: Duration,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error: Option<String> = None;
    loop {
        tick.tick().await;
        let c = Arc::clone(&certs);
        let Ok(r) = tokio::task::spawn_blocking(move || c.reload()).await else {
            continue;
        };
        let (cert, key) = certs.paths();
        match r {
            CertReload::Unchanged => {}
            CertReload::Applied => {
                last_error = None;
                tracing::info!(
                    listener,
                    cert,
                    key,
                    "TLS certificate reloaded; new connections get it"
                );
            }
            CertReload::Rejected(e) => {
                if last_error.as_deref() != Some(e.as_str()) {
                    tracing::error!(listener, cert, key, error = %e, "TLS certificate rejected; the previous certificate keeps serving");
                    last_error = Some(e);
                }
            }
        }
    }
}

struct WorkerCtx {
    shared: Arc<Shared>,
    /// `limits.upstream_idle_per_instance`.
    idle_per_instance: usize,
    settings: ConnSettings,
    lifecycle: Arc<Lifecycle>,
    release_memory: Option<fn()>,
}

async fn worker_main(
    ctx: WorkerCtx,
    http: std::net::TcpListener,
    tls: Option<(std::net::TcpListener, TlsAcceptor)>,
) {
    let worker = Worker::new(Arc::clone(&ctx.shared), ctx.idle_per_instance);
    let pruned = Rc::clone(&worker);
    tokio::task::spawn_local(async move {
        let mut tick = tokio::time::interval(crate::proxy::send::POOL_PRUNE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            pruned.prune_pool();
        }
    });
    if let Some(release) = ctx.release_memory {
        tokio::task::spawn_local(async move {
            let mut tick = tokio::time::interval(MEMORY_RELEASE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                release();
            }
        });
    }
    let ctx = Rc::new(ctx);
    if let Some((l, acceptor)) = tls {
        match TcpListener::from_std(l) {
            Ok(l) => {
                tokio::task::spawn_local(accept_loop(
                    Rc::clone(&worker),
                    Rc::clone(&ctx),
                    l,
                    Some(acceptor),
                ));
            }
            Err(e) => tracing::error!(error = %e, "cannot register TLS listener"),
        }
    }
    match TcpListener::from_std(http) {
        Ok(l) => accept_loop(worker, ctx, l, None).await,
        Err(e) => tracing::error!(error = %e, "cannot register proxy listener"),
    }
    // Draining: connection tasks of this worker run until they finish; the main thread
    // decides when the process exits.
    std::future::pending::<()>().await;
}

async fn accept_loop(
    worker: Rc<Worker>,
    ctx: Rc<WorkerCtx>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
) {
    let mut drain = ctx.lifecycle.drain.subscribe();
    loop {
        if *drain.borrow_and_update() {
            break;
        }
        let accepted = tokio::select! {
            r = drain.changed() => {
                if r.is_err() {
                    break;
                }
                continue;
            }
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let now = tokio::time::Instant::now();
        let Some(permit) = ctx.lifecycle.try_acquire() else {
            tokio::task::spawn_local(refuse(stream, tls.is_some(), ctx.lifecycle.max));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let stream = crate::socket::Socket::new(stream);
        let worker = Rc::clone(&worker);
        let ctx = Rc::clone(&ctx);
        let tls = tls.clone();
        let drain = drain.clone();
        // Plaintext and TLS connections are separate tasks, so a plaintext connection's
        // task holds no TLS handshake state (memory per idle connection).
        match tls {
            None => {
                tokio::task::spawn_local(async move {
                    let _permit = permit;
                    let settings = &ctx.settings;
                    let guard = make_guard(worker, peer, false, settings);
                    crate::conn::serve(stream, Alpn::None, now, guard, settings, drain).await
                });
            }
            Some(acceptor) => {
                tokio::task::spawn_local(async move {
                    let _permit = permit;
                    let settings = &ctx.settings;
                    let left = settings.header_read;
                    match tokio::time::timeout(left, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => {
                            let alpn = match s.get_ref().1.alpn_protocol() {
                                Some(b"h2") => Alpn::H2,
                                Some(b"http/1.1") => Alpn::Http1,
                                _ => Alpn::None,
                            };
                            let guard = make_guard(worker, peer, true, settings);
                            Box::pin(crate::conn::serve(s, alpn, now, guard, settings, drain)).await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(client = %peer, error = %e, "TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(client = %peer, "TLS handshake timed out"),
                    }
                });
            }
        }
    }
}

/// The request guard maker for one accepted connection.
fn make_guard(
    worker: Rc<Worker>,
    peer: SocketAddr,
    is_tls: bool,
    settings: &crate::conn::ConnSettings,
) -> impl FnOnce(Rc<crate::conn::Activity>, bool) -> Guard {
    let proxy = Proxy::new(worker, ConnInfo::new(peer, is_tls));
    let limits = settings.request;
    move |act, h1| Guard::new(proxy, limits, act, h1)
}

/// Past `limits.max_connections`: a plaintext client gets a `503` JSON answer, then the
/// connection closes; a TLS client's connection is closed.
async fn refuse(mut stream: TcpStream, tls: bool, max: usize) {
    tracing::debug!(max, "connection refused: at the connection limit");
    if tls {
        return;
    }
    let rid = crate::proxy::ids::request_id(None);
    let e = ProxyError::Overloaded(format!(
        "the gateway is at its limit of {max} connections; retry later"
    ));
    let body = serde_json::json!({
        "error": e.to_string(),
        "request_id": rid.to_str().unwrap_or_default(),
    })
    .to_string();
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-request-id: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
        body.len(),
        rid.to_str().unwrap_or_default(),
    );
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await?;
        // Read what the client sent, so closing does not reset the answer away.
        let mut buf = [0u8; 4096];
        loop {
            let n = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await?;
            if n == 0 {
                return Ok::<(), std::io::Error>(());
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(500), write).await;
}
