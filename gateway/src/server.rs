//! The gateway process: shared state, listeners, one single-threaded runtime per worker
//! thread (each accepting on the shared listening sockets and owning its own upstream
//! pool), configuration reload, and signals.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use cellgate_config::Config;
use std::sync::atomic::{AtomicU64, Ordering};

use cellgate_health::HealthRegistry;
use cellgate_routing::RoutingTable;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::proxy::{ConnInfo, Proxy, Worker};

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
    /// The only writer of `table`: the configuration it is built from. Reloads, health
    /// transitions and weight updates all go through it, so none is lost. Never taken on
    /// the request path.
    pub writer: tokio::sync::Mutex<TableWriter>,
    /// Requests in flight through the gateway (load shedding).
    pub in_flight: AtomicU64,
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
            table: ArcSwap::from_pointee(table),
            health,
            writer: tokio::sync::Mutex::new(TableWriter::new(config)),
            in_flight: AtomicU64::new(0),
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
    /// Override of `etcd.prefix`.
    pub etcd_prefix: Option<String>,
    /// Override of `etcd.gateway_id`.
    pub gateway_id: Option<String>,
    /// Override of `admin.state_dir`.
    pub state_dir: Option<PathBuf>,
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
        }
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
    /// Bound admin API address.
    pub admin_addr: SocketAddr,
    opts: RunOptions,
    exporter_task: Option<BoxTask>,
    config_digest: Option<u64>,
    control: crate::control::ControlRuntime,
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
    /// Build the first table, bind the listeners and start the workers.
    pub fn start(opts: RunOptions) -> Result<Self, GatewayError> {
        // The file as it is now, before anyone is told we listen: an edit made after that is
        // a change the watcher must apply.
        let config_digest = opts
            .config_path
            .as_deref()
            .and_then(crate::reload::file_digest);
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
        let shared = Arc::new(Shared::with_control(
            boot.table, health, desired, boot.state, traces,
        ));

        let http_listen = opts
            .listen
            .clone()
            .unwrap_or_else(|| opts.config.listen.http.clone());
        let http = bind(&http_listen)?;
        let http_addr = http.local_addr().map_err(GatewayError::Runtime)?;
        let tls = match &opts.config.listen.tls {
            Some(t) => {
                let acceptor = TlsAcceptor::from(crate::tls::server_config(&t.cert, &t.key)?);
                Some((bind(&t.listen)?, acceptor))
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
            let shared = Arc::clone(&shared);
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
                    local.block_on(&rt, worker_main(shared, http, tls));
                })
                .map_err(GatewayError::Runtime)?;
        }
        tracing::info!(listener = "proxy", addr = %http_addr, workers, "listening");
        if let Some(a) = tls_addr {
            tracing::info!(listener = "tls", addr = %a, "listening");
        }
        let admin_addr = crate::control::start(&shared, &boot.runtime, boot.admin, http_addr)?;
        Ok(Self {
            shared,
            http_addr,
            tls_addr,
            admin_addr,
            opts,
            exporter_task,
            config_digest,
            control: boot.runtime,
        })
    }

    /// Serve until SIGTERM or SIGINT, hot-applying configuration-file changes (file watch
    /// and SIGHUP).
    pub fn run_until_signal(self) -> Result<(), GatewayError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(GatewayError::Runtime)?;
        rt.block_on(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).map_err(GatewayError::Runtime)?;
            let mut int = signal(SignalKind::interrupt()).map_err(GatewayError::Runtime)?;
            let hup = signal(SignalKind::hangup()).map_err(GatewayError::Runtime)?;
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
            }
            tokio::spawn(crate::controller::run(
                Arc::clone(&self.shared),
                self.opts.health_tick,
            ));
            if let Some(task) = self.exporter_task {
                tokio::spawn(task);
            }
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: stopping"),
                _ = int.recv() => tracing::info!("SIGINT: stopping"),
            }
            Ok(())
        })
    }
}

async fn worker_main(
    shared: Arc<Shared>,
    http: std::net::TcpListener,
    tls: Option<(std::net::TcpListener, TlsAcceptor)>,
) {
    let worker = Worker::new(shared);
    if let Some((l, acceptor)) = tls {
        match TcpListener::from_std(l) {
            Ok(l) => {
                tokio::task::spawn_local(accept_loop(Rc::clone(&worker), l, Some(acceptor)));
            }
            Err(e) => tracing::error!(error = %e, "cannot register TLS listener"),
        }
    }
    match TcpListener::from_std(http) {
        Ok(l) => accept_loop(worker, l, None).await,
        Err(e) => tracing::error!(error = %e, "cannot register proxy listener"),
    }
}

async fn accept_loop(worker: Rc<Worker>, listener: TcpListener, tls: Option<TlsAcceptor>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let worker = Rc::clone(&worker);
        let tls = tls.clone();
        tokio::task::spawn_local(async move {
            match tls {
                None => {
                    serve(
                        TokioIo::new(stream),
                        Proxy::new(worker, ConnInfo::new(peer, false)),
                    )
                    .await
                }
                Some(acceptor) => {
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(s)) => {
                            serve(
                                TokioIo::new(s),
                                Proxy::new(worker, ConnInfo::new(peer, true)),
                            )
                            .await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(client = %peer, error = %e, "TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(client = %peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

async fn serve<I>(io: I, proxy: Proxy)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
{
    let mut builder = auto::Builder::new(LocalExec);
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(1024)
        .max_pending_accept_reset_streams(64)
        .keep_alive_interval(None);
    if let Err(e) = builder
        .serve_connection(io, TowerToHyperService::new(proxy))
        .await
    {
        tracing::debug!(error = %e, "client connection ended with an error");
    }
}
