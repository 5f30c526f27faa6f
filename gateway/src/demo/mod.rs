//! `cellgate demo`: the gateway on the built-in `examples/demo.yaml`, plus that file's six
//! upstream instances on loopback, so an operator can watch routing, gray release and
//! failover with nothing else installed.

pub mod upstream;

use cellgate_config::{Config, DEMO_YAML};

use crate::server::{Gateway, GatewayError, RunOptions};

/// Run the demo until a signal.
pub fn run(listen: Option<String>, workers: Option<usize>) -> Result<(), GatewayError> {
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
    let gw = Gateway::start(opts)?;
    let port = gw.http_addr.port();
    eprintln!(
        "\ncellgate demo: gateway on http://127.0.0.1:{port}\n  cells: bj-1 and bj-2 (region bj), sh-1 (region sh); upstreams: {}\n\n  curl -i -H 'X-User-ID: alice' localhost:{port}/anything\n  curl -s -X POST localhost:18101/fault -d '{{\"refuse_for_s\": 10}}'   # make bj-1-a refuse connections\n  cellgate route --config examples/demo.yaml --key alice\n",
        names.join(", ")
    );
    gw.run_until_signal()
}
