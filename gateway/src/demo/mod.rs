//! `cellgate demo`: the gateway on the built-in `examples/demo.yaml`, plus that file's six
//! upstream instances on loopback, so an operator can watch routing, gray release and
//! failover with nothing else installed.

pub mod upstream;

use cellgate_config::{Config, DEMO_YAML};

use crate::server::{Gateway, GatewayError, RunOptions};

/// Run the demo until a signal. The admin API listens on `admin_listen` (default
/// `127.0.0.1:9901`) with `admin_token` (default the demo's `demo-token`).
pub fn run(
    listen: Option<String>,
    admin_listen: Option<String>,
    admin_token: Option<String>,
    workers: Option<usize>,
    release_memory: Option<fn()>,
) -> Result<(), GatewayError> {
    let config = Config::from_yaml(DEMO_YAML)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("cellgate-demo-upstream")
        .enable_all()
        .build()
        .map_err(GatewayError::Runtime)?;
    let mut names = Vec::new();
    for cell in &config.cells {
        for inst in &cell.instances {
            let listener = upstream::bind(&inst.addr).map_err(|source| GatewayError::Listen {
                addr: inst.addr.clone(),
                source,
            })?;
            let (c, n) = (cell.id.clone(), inst.name.clone());
            rt.spawn(async move {
                if let Err(e) = upstream::serve(listener, c, n).await {
                    tracing::error!(error = %e, "demo upstream stopped");
                }
            });
            names.push(format!("{} ({})", inst.name, inst.addr));
        }
    }
    std::thread::Builder::new()
        .name("cellgate-demo".into())
        .spawn(move || rt.block_on(std::future::pending::<()>()))
        .map_err(GatewayError::Runtime)?;

    let mut opts = RunOptions::new(config);
    opts.listen = listen;
    opts.workers = workers;
    opts.admin_listen = admin_listen;
    opts.admin_token = admin_token;
    opts.release_memory = release_memory;
    let gw = Gateway::start(opts)?;
    let admin = gw.admin_addr;
    let port = gw.http_addr.port();
    eprintln!(
        "\ncellgate demo: gateway on http://127.0.0.1:{port}\n  cells: bj-1 and bj-2 (region bj), sh-1 (region sh); upstreams: {}\n\n  curl -i -H 'X-User-ID: alice' localhost:{port}/anything\n  curl -s -X POST localhost:18101/fault -d '{{\"refuse_for_s\": 10}}'   # make bj-1-a refuse connections\n  cellgate route --config examples/demo.yaml --key alice\n  curl -s -H 'Authorization: Bearer demo-token' {admin}/admin/route?key=alice\n  cellgate ctl --admin {admin} --token demo-token drain bj-2 --dry-run\n",
        names.join(", ")
    );
    gw.run_until_signal()
}
