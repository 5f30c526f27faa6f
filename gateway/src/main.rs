//! The `cellgate` command line (SPEC §9).

use std::path::PathBuf;
use std::process::ExitCode;

use cellgate::demo;
use cellgate::server::{Gateway, RunOptions};
use cellgate_config::{Config, ConfigError, DEMO_YAML};
use clap::{Parser, Subcommand, ValueEnum};

#[global_allocator]
static GLOBAL: cellgate::alloc::Mimalloc = cellgate::alloc::Mimalloc;

/// Hands memory mimalloc holds but no longer uses back to the OS, for the calling thread.
/// mimalloc purges freed pages only from inside its own calls, so a quiet worker (say, one
/// whose connections are all idle and parked) would keep them resident. Forced: an
/// unforced collect leaves pages retired only recently, blocks freed onto full pages and
/// the arenas' delayed purges for later allocator calls, which a quiet worker does not
/// make (idle harness: 29–32 MiB resident after 10,000 clients closed, 21–24 forced).
/// Workers call it every `MEMORY_RELEASE_EVERY` from a timer, the other runtimes when they
/// go idle at most that often: a walk over the thread's pages, never per request.
#[allow(unsafe_code)]
fn release_memory() {
    // SAFETY: `mi_collect` has no preconditions; it walks the calling thread's own heap and
    // returns fully free pages to the OS.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// cellgate: routes every user to their home cell, and keeps doing so while cells fail.
#[derive(Parser, Debug)]
#[command(name = "cellgate", version, about)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "CELLGATE_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway.
    Run {
        /// Configuration file (watched; changes are hot-applied). Default: the built-in demo configuration.
        #[arg(long)]
        config: Option<PathBuf>,
        /// etcd endpoints, comma-separated (e.g. http://127.0.0.1:2379): the configuration
        /// store. The file then only gives listeners, admin and process settings.
        #[arg(long, value_delimiter = ',')]
        etcd: Option<Vec<String>>,
        /// etcd key prefix (default /cellgate/).
        #[arg(long)]
        etcd_prefix: Option<String>,
        /// This gateway's id in the fleet (default: host name, proxy port and process id).
        #[arg(long)]
        gateway_id: Option<String>,
        /// Directory for the admin overlay, local audit log and last known good table
        /// (default: <config file>.state).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Admin API bearer token (overrides admin.token).
        #[arg(
            long = "admin-token",
            env = "CELLGATE_ADMIN_TOKEN",
            hide_env_values = true
        )]
        admin_token: Option<String>,
        /// Proxy listen address (overrides `listen.http`; default 0.0.0.0:8080).
        #[arg(long)]
        listen: Option<String>,
        /// Admin API listen address (default 127.0.0.1:9901).
        #[arg(long)]
        admin_listen: Option<String>,
        /// Worker threads (default: one per core).
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Run the gateway with demo cells on loopback.
    Demo {
        /// Print the demo configuration and exit.
        #[arg(long)]
        print_config: bool,
        /// Proxy listen address (default 0.0.0.0:8080).
        #[arg(long)]
        listen: Option<String>,
        /// Admin API listen address (default 127.0.0.1:9901).
        #[arg(long)]
        admin_listen: Option<String>,
        /// Worker threads (default: one per core).
        #[arg(long)]
        workers: Option<usize>,
        /// Admin API bearer token (default demo-token).
        #[arg(
            long = "admin-token",
            env = "CELLGATE_ADMIN_TOKEN",
            hide_env_values = true
        )]
        admin_token: Option<String>,
    },
    /// Run one demo upstream instance.
    Upstream {
        /// Listen address.
        #[arg(long)]
        listen: String,
        /// Cell id it reports.
        #[arg(long)]
        cell: String,
        /// Instance name it reports.
        #[arg(long)]
        name: String,
    },
    /// Check a configuration file; every problem is named with its path.
    Validate {
        /// Configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Explain where a key is routed, offline, from a configuration file.
    Route {
        /// Configuration file.
        #[arg(long)]
        config: PathBuf,
        /// Routing key.
        #[arg(long)]
        key: String,
        /// Region of the request (checked against the file's regions).
        #[arg(long)]
        region: Option<String>,
    },
    /// Configuration store commands.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Talk to a running gateway's admin API.
    Ctl {
        /// Admin API address.
        // `global`: accepted before or after the subcommand (`ctl cells --admin ...`); not
        // `--cert`/`--key`, which must come before it (`ctl route --key <k>` is the key).
        #[arg(
            long,
            global = true,
            default_value = "127.0.0.1:9901",
            env = "CELLGATE_ADMIN"
        )]
        admin: String,
        /// Bearer token.
        #[arg(
            long,
            global = true,
            env = "CELLGATE_ADMIN_TOKEN",
            hide_env_values = true
        )]
        token: Option<String>,
        /// TLS: PEM file of the CA the admin API's certificate chains to (an admin API with
        /// `admin.tls`); turns TLS on.
        #[arg(long, global = true, env = "CELLGATE_ADMIN_CA")]
        ca: Option<String>,
        /// mTLS: PEM client certificate chain (with `--key`).
        #[arg(long, env = "CELLGATE_ADMIN_CERT", requires = "key")]
        cert: Option<String>,
        /// mTLS: PEM private key of `--cert`.
        #[arg(long, env = "CELLGATE_ADMIN_KEY", requires = "cert")]
        key: Option<String>,
        #[command(subcommand)]
        command: cellgate::ctl::CtlCommand,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Bootstrap etcd from a configuration file (cells, slots, overrides, gray rules,
    /// settings), in one transaction with an audit record.
    Push {
        /// etcd endpoints, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        etcd: Vec<String>,
        /// Configuration file.
        #[arg(long)]
        config: PathBuf,
        /// Key prefix: as `cellgate run` takes it, this flag (also `--etcd-prefix`), else
        /// the file's `etcd.prefix`, else /cellgate/.
        #[arg(long, alias = "etcd-prefix")]
        prefix: Option<String>,
        /// Overwrite a configuration already in etcd.
        #[arg(long)]
        replace: bool,
    },
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CELLGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().flatten_event(true).init(),
    }
}

/// Write `text` and a newline to stdout. A closed pipe (`cellgate ctl … | head`) ends the
/// output quietly instead of panicking as `println!` would.
fn out(text: &str) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{text}").and_then(|()| o.flush());
}

fn print_config_error(file: &str, e: &ConfigError) {
    match e {
        ConfigError::Invalid(issues) => {
            eprintln!("{file}: {} problem(s)", issues.len());
            for i in issues {
                eprintln!("  {i}");
            }
        }
        other => eprintln!("{file}: {other}"),
    }
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    cellgate_config::load_file(path).map_err(|e| {
        print_config_error(&path.display().to_string(), &e);
        ExitCode::from(1)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(code) => code,
    }
}

fn run(command: Command) -> Result<(), ExitCode> {
    match command {
        Command::Run {
            config,
            etcd,
            etcd_prefix,
            gateway_id,
            state_dir,
            admin_token,
            listen,
            admin_listen,
            workers,
        } => {
            let (cfg, path) = match &config {
                Some(p) => (load(p)?, Some(p.clone())),
                None => (
                    Config::from_yaml(DEMO_YAML).map_err(|e| {
                        print_config_error("built-in configuration", &e);
                        ExitCode::from(1)
                    })?,
                    None,
                ),
            };
            let mut opts = RunOptions::new(cfg);
            opts.config_path = path;
            opts.listen = listen;
            opts.workers = workers;
            opts.admin_listen = admin_listen;
            opts.admin_token = admin_token;
            opts.etcd = etcd;
            opts.etcd_prefix = etcd_prefix;
            opts.gateway_id = gateway_id;
            opts.state_dir = state_dir;
            opts.release_memory = Some(release_memory);
            Gateway::start(opts)
                .and_then(Gateway::run_until_signal)
                .map_err(|e| {
                    tracing::error!(error = %e, "cellgate stopped");
                    eprintln!("cellgate: {e}");
                    ExitCode::from(1)
                })
        }
        Command::Demo {
            print_config,
            listen,
            admin_listen,
            workers,
            admin_token,
        } => {
            if print_config {
                out(DEMO_YAML.trim_end_matches('\n'));
                return Ok(());
            }
            demo::run(
                listen,
                admin_listen,
                admin_token,
                workers,
                Some(release_memory),
            )
            .map_err(|e| {
                eprintln!("cellgate demo: {e}");
                ExitCode::from(1)
            })
        }
        Command::Upstream { listen, cell, name } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .map_err(|e| {
                    eprintln!("cellgate upstream: {e}");
                    ExitCode::from(1)
                })?;
            rt.block_on(async move {
                let listener = demo::upstream::bind(&listen).map_err(|e| {
                    eprintln!("cellgate upstream: cannot listen on {listen}: {e}");
                    ExitCode::from(1)
                })?;
                let addr = listener.local_addr().map_err(|_| ExitCode::from(1))?;
                tracing::info!(listener = "upstream", %addr, cell = %cell, instance = %name, "listening");
                tokio::select! {
                    r = demo::upstream::serve(listener, cell, name) => r.map_err(|e| {
                        eprintln!("cellgate upstream: {e}");
                        ExitCode::from(1)
                    }),
                    _ = tokio::signal::ctrl_c() => Ok(()),
                }
            })
        }
        Command::Validate { config } => {
            let cfg = load(&config)?;
            let table = cfg
                .build_table(1, &cellgate_health::HealthRegistry::new())
                .map_err(|e| {
                    print_config_error(&config.display().to_string(), &e);
                    ExitCode::from(1)
                })?;
            out(&format!(
                "{}: ok ({} regions, {} cells, {} slots, {} overrides, {} gray rules)",
                config.display(),
                table.regions().len(),
                table.cells().len(),
                table.slot_count(),
                table.overrides().len(),
                table.gray_rules().len()
            ));
            Ok(())
        }
        Command::Route {
            config,
            key,
            region,
        } => {
            let cfg = load(&config)?;
            let table = cfg
                .build_table(1, &cellgate_health::HealthRegistry::new())
                .map_err(|e| {
                    print_config_error(&config.display().to_string(), &e);
                    ExitCode::from(1)
                })?;
            if let Some(r) = &region {
                if table.region_idx(r).is_none() {
                    eprintln!("cellgate route: unknown region {r:?}");
                    return Err(ExitCode::from(2));
                }
            }
            let explain = table
                .explain(&key, cellgate_health::now_ms())
                .map_err(|e| {
                    eprintln!("cellgate route: {e}");
                    ExitCode::from(2)
                })?;
            let mut v = serde_json::to_value(&explain).map_err(|_| ExitCode::from(1))?;
            if let (Some(r), Some(obj)) = (region, v.as_object_mut()) {
                obj.insert("region".into(), serde_json::Value::String(r));
            }
            out(&serde_json::to_string_pretty(&v).unwrap_or_default());
            Ok(())
        }
        Command::Config {
            command:
                ConfigCommand::Push {
                    etcd,
                    config,
                    prefix,
                    replace,
                },
        } => config_push(&etcd, &config, prefix.as_deref(), replace),
        Command::Ctl {
            admin,
            token,
            ca,
            cert,
            key,
            command,
        } => {
            let tls = match (&ca, &cert) {
                (Some(ca), _) => {
                    let client = cert.as_deref().zip(key.as_deref());
                    match cellgate::ctl::AdminTls::load(ca, client) {
                        Ok(t) => Some(t),
                        Err(e) => {
                            eprintln!("cellgate ctl: {e}");
                            return Err(ExitCode::from(1));
                        }
                    }
                }
                (None, Some(_)) => {
                    eprintln!("cellgate ctl: --cert needs --ca (the CA the admin API's certificate chains to)");
                    return Err(ExitCode::from(2));
                }
                (None, None) => None,
            };
            let rt = small_runtime("cellgate ctl")?;
            match rt.block_on(cellgate::ctl::run(
                &admin,
                tls.as_ref(),
                token.as_deref(),
                &command,
            )) {
                Ok(v) => {
                    out(&serde_json::to_string_pretty(&v).unwrap_or_default());
                    Ok(())
                }
                Err(e) => {
                    eprintln!("cellgate ctl: {e}");
                    Err(ExitCode::from(1))
                }
            }
        }
    }
}

fn small_runtime(what: &str) -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("{what}: {e}");
            ExitCode::from(1)
        })
}

fn config_push(
    endpoints: &[String],
    path: &std::path::Path,
    prefix: Option<&str>,
    replace: bool,
) -> Result<(), ExitCode> {
    let cfg = load(path)?;
    let default_prefix = cellgate_config::default_prefix();
    let prefix = prefix
        .or_else(|| cfg.etcd.as_ref().map(|e| e.prefix.as_str()))
        .unwrap_or(&default_prefix);
    cfg.build_table(1, &cellgate_health::HealthRegistry::new())
        .map_err(|e| {
            print_config_error(&path.display().to_string(), &e);
            ExitCode::from(1)
        })?;
    if !cellgate_config::valid_prefix(prefix) {
        eprintln!("cellgate config push: --prefix {prefix:?} must start and end with '/'");
        return Err(ExitCode::from(2));
    }
    let rt = small_runtime("cellgate config push")?;
    let result = rt.block_on(async {
        let store = cellgate_config::etcd::EtcdStore::connect(endpoints, prefix).await?;
        let mut rec = cellgate_config::AuditRecord::new("cli", "config_push");
        rec.target = Some(path.display().to_string());
        rec.request = serde_json::json!({"file": path.display().to_string(), "replace": replace});
        store.push(&cfg, replace, &rec).await
    });
    match result {
        Ok(rev) => {
            out(&format!(
                "{}: pushed to {} under {prefix} ({} cells, {} overrides, {} gray rules); table version {rev}",
                path.display(),
                endpoints.join(","),
                cfg.cells.len(),
                cfg.overrides.len(),
                cfg.gray.len()
            ));
            Ok(())
        }
        Err(e) => {
            eprintln!("cellgate config push: {e}");
            Err(ExitCode::from(1))
        }
    }
}
