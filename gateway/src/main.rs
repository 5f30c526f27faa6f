//! The `cellgate` command line (SPEC §9).

use std::path::PathBuf;
use std::process::ExitCode;

use cellgate::demo;
use cellgate::server::{Gateway, RunOptions};
use cellgate_config::{Config, ConfigError, DEMO_YAML};
use clap::{Parser, Subcommand, ValueEnum};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        /// etcd endpoint (configuration store).
        #[arg(long)]
        etcd: Option<String>,
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
            listen,
            admin_listen: _,
            workers,
        } => {
            if let Some(url) = etcd {
                eprintln!("cellgate run: --etcd {url}: the etcd configuration source is not available in this build; run from a file with --config");
                return Err(ExitCode::from(2));
            }
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
            admin_listen: _,
            workers,
        } => {
            if print_config {
                print!("{DEMO_YAML}");
                return Ok(());
            }
            demo::run(listen, workers).map_err(|e| {
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
            println!(
                "{}: ok ({} regions, {} cells, {} slots, {} overrides, {} gray rules)",
                config.display(),
                table.regions().len(),
                table.cells().len(),
                table.slot_count(),
                table.overrides().len(),
                table.gray_rules().len()
            );
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
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            Ok(())
        }
    }
}
