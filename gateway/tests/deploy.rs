//! `docker-compose.yml` describes what SPEC §10 asks — a 3-node etcd, two gateways on it,
//! demo cells in two regions, built from the repository's `Dockerfile` — and its cellgate
//! configuration is valid. (`docker compose config` also runs in `scripts/test` where the
//! compose plugin is installed; this check needs nothing but the files.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use serde_yaml::Value;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

fn compose() -> Value {
    let text = std::fs::read_to_string(format!("{ROOT}/docker-compose.yml")).unwrap();
    let mut v: Value = serde_yaml::from_str(&text).unwrap();
    v.apply_merge().unwrap();
    v
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn arg_after(cmd: &[String], flag: &str) -> Option<String> {
    cmd.iter()
        .position(|a| a == flag)
        .and_then(|i| cmd.get(i + 1).cloned())
}

#[test]
fn compose_runs_three_etcd_members_two_gateways_and_cells_in_two_regions() {
    let c = compose();
    let services = c["services"].as_mapping().unwrap();
    let names: BTreeSet<String> = services
        .keys()
        .map(|k| k.as_str().unwrap().to_owned())
        .collect();
    for (name, s) in services {
        let name = name.as_str().unwrap();
        assert!(
            s.get("image").is_some() || s.get("build").is_some(),
            "{name}"
        );
        match s.get("depends_on") {
            Some(Value::Sequence(d)) => {
                for x in d {
                    assert!(
                        names.contains(x.as_str().unwrap()),
                        "{name} depends on {x:?}"
                    );
                }
            }
            Some(Value::Mapping(d)) => {
                for x in d.keys() {
                    assert!(
                        names.contains(x.as_str().unwrap()),
                        "{name} depends on {x:?}"
                    );
                }
            }
            _ => {}
        }
        for p in strings(&s["ports"]) {
            assert!(
                p.starts_with("127.0.0.1:"),
                "{name} publishes {p} beyond loopback"
            );
        }
    }

    // Three etcd members forming one cluster.
    let etcd: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| {
            services[*n]["image"]
                .as_str()
                .is_some_and(|i| i.contains("etcd"))
        })
        .collect();
    assert_eq!(etcd.len(), 3);
    let clients: BTreeSet<String> = etcd.iter().map(|n| format!("http://{n}:2379")).collect();
    for n in &etcd {
        let s = &services[*n];
        let cluster = s["environment"]["ETCD_INITIAL_CLUSTER"].as_str().unwrap();
        for m in &etcd {
            assert!(
                cluster.contains(&format!("{m}=http://{m}:2380")),
                "{n}: {cluster}"
            );
        }
        assert_eq!(
            arg_after(&strings(&s["command"]), "--name").as_deref(),
            Some(*n)
        );
    }

    // Two gateways on all three members, built from the Dockerfile.
    let gateways: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| {
            strings(&services[*n]["command"])
                .first()
                .map(String::as_str)
                == Some("run")
        })
        .collect();
    assert_eq!(gateways.len(), 2);
    let mut ids = BTreeSet::new();
    for g in &gateways {
        let s = &services[*g];
        assert_eq!(s["build"].as_str(), Some("."));
        let cmd = strings(&s["command"]);
        let eps: BTreeSet<String> = arg_after(&cmd, "--etcd")
            .unwrap()
            .split(',')
            .map(str::to_owned)
            .collect();
        assert_eq!(eps, clients, "{g}");
        assert!(ids.insert(arg_after(&cmd, "--gateway-id").unwrap()));
        assert_eq!(
            arg_after(&cmd, "--config").as_deref(),
            Some("/etc/cellgate/compose.yaml")
        );
    }
    let dockerfile = std::fs::read_to_string(format!("{ROOT}/Dockerfile")).unwrap();
    assert!(dockerfile.contains("deploy/compose-cellgate.yaml /etc/cellgate/compose.yaml"));
    assert!(dockerfile.contains("protobuf-compiler"));

    // Every instance of the pushed configuration is a demo upstream service of its cell.
    let text = std::fs::read_to_string(format!("{ROOT}/deploy/compose-cellgate.yaml")).unwrap();
    let cfg: cellgate_config::Config = serde_yaml::from_str(&text).unwrap();
    let regions: BTreeSet<&str> = cfg.cells.iter().map(|c| c.region.as_str()).collect();
    assert!(regions.len() >= 2, "{regions:?}");
    for cell in &cfg.cells {
        for inst in &cell.instances {
            let (host, _) = inst.addr.rsplit_once(':').unwrap();
            let cmd = strings(&services[host]["command"]);
            assert_eq!(cmd.first().map(String::as_str), Some("upstream"), "{host}");
            assert_eq!(arg_after(&cmd, "--cell").as_deref(), Some(cell.id.as_str()));
            assert_eq!(
                arg_after(&cmd, "--name").as_deref(),
                Some(inst.name.as_str())
            );
        }
    }
    // The configuration is valid once its host names resolve (here: to loopback).
    let mut local = cfg.clone();
    for (i, cell) in local.cells.iter_mut().enumerate() {
        for (j, inst) in cell.instances.iter_mut().enumerate() {
            inst.addr = format!("127.0.0.1:{}", 20000 + i * 10 + j);
        }
    }
    local.admin.state_dir = None;
    local.validate().unwrap();
}
