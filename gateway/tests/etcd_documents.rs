//! Documents written straight into etcd that would make a bad table — bad JSON, an unknown
//! failover target, a slot table with holes or unknown cells — are rejected: the previous
//! table keeps serving, and `/admin/table` shows the reason until a valid change arrives.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::etcd::*;
use common::*;

async fn wait_rejected(admin: SocketAddr, needle: &str) -> serde_json::Value {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let t = admin_get(admin, "/admin/table").await;
        if t["rejected"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains(needle))
        {
            return t;
        }
        assert!(
            Instant::now() < end,
            "no rejection mentioning {needle:?}: {}",
            t["rejected"]
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_accepted(admin: SocketAddr, v: u64) {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let t = admin_get(admin, "/admin/table").await;
        if t["version"].as_u64() == Some(v) && t["rejected"].is_null() {
            return;
        }
        assert!(Instant::now() < end, "version {v} never accepted: {t}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_documents_are_rejected_and_the_old_table_keeps_serving() {
    let etcd = Etcd::single().await;
    let cells = Cells::new();
    let dir = TempDir::new("docs");
    let yaml = cells.yaml();
    push(&etcd.endpoints_arg(), &dir, &yaml);
    let gw = gateway(&etcd.endpoints_arg(), &dir, &yaml, "docs-0");
    let adm = gw.admin_addr.unwrap();
    let store = etcd.store().await;
    let t = table_of(&yaml);
    let b_key = (0..10_000)
        .map(|i| format!("u{i}"))
        .find(|k| t.explain(k, 1).unwrap().home_cell == "b")
        .unwrap();
    let (good_b, _) = store.raw_get("cells/b").await.unwrap().unwrap();
    let (good_c, _) = store.raw_get("cells/c").await.unwrap().unwrap();
    let (good_slots, _) = store.raw_get("slots").await.unwrap().unwrap();

    let mut serving = version(adm).await;
    let bad_docs: [(&str, Vec<u8>, &str); 4] = [
        ("cells/b", b"{\"id\": \"b\", \"region\": ".to_vec(), "cells/b: not a cell document"),
        (
            "cells/c",
            String::from_utf8(good_c.clone())
                .unwrap()
                .replace("\"failover\":[\"a\"]", "\"failover\":[\"zz\"]")
                .into_bytes(),
            "cells/c: failover[0]: unknown cell \"zz\"",
        ),
        (
            "slots",
            br#"{"version": 9, "slot_count": 16384, "assign": [{"cell": "a", "ranges": ["0-9999"]}]}"#.to_vec(),
            "slots: 6384 of 16384 slots have no cell",
        ),
        (
            "slots",
            br#"{"version": 9, "slot_count": 16384, "assign": [{"cell": "ghost", "ranges": ["0-16383"]}]}"#.to_vec(),
            "unknown cell \"ghost\"",
        ),
    ];
    for (key, value, reason) in bad_docs {
        let rev = store.raw_put(key, value).await.unwrap();
        let t = wait_rejected(adm, reason).await;
        assert_eq!(
            t["version"].as_u64(),
            Some(serving),
            "{key}: the old table serves"
        );
        assert_eq!(t["rejected"]["version"].as_i64(), Some(rev));
        assert!(
            gw.wait_log("configuration in etcd rejected", Duration::from_secs(5))
                .await
        );
        // Traffic still flows by the old table.
        let r = get(gw.addr, "/", &[("x-user-id", &b_key)]).await;
        assert_eq!((r.status.as_u16(), r.header("x-cell-id")), (200, Some("b")));
        assert_eq!(r.echoed("x-routing-version"), Some(serving.to_string()));
        // Put the good document back: accepted at its revision, the rejection clears.
        let good = match key {
            "cells/b" => good_b.clone(),
            "cells/c" => good_c.clone(),
            _ => good_slots.clone(),
        };
        let fixed = store.raw_put(key, good).await.unwrap() as u64;
        wait_accepted(adm, fixed).await;
        serving = fixed;
    }
    // A valid change written straight into etcd is applied like any other.
    let drained = String::from_utf8(good_b)
        .unwrap()
        .replace("\"state\":\"active\"", "\"state\":\"draining\"");
    let rev = store.raw_put("cells/b", drained).await.unwrap() as u64;
    wait_accepted(adm, rev).await;
    let r = get(gw.addr, "/", &[("x-user-id", &b_key)]).await;
    assert_eq!(
        r.header("x-cell-id"),
        Some("a"),
        "b drained → its first failover target"
    );
}

/// A gateway serving its file's routing because the etcd prefix holds no configuration
/// refuses admin changes with 503: writing one document there would leave a store every
/// gateway rejects (no settings, no slots) and block `cellgate config push`. After the
/// push, the same change goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_changes_against_an_empty_store_are_refused_and_write_nothing() {
    let _serial = serial().lock().await;
    let etcd = Etcd::single().await;
    let cells = Cells::new();
    let dir = TempDir::new("docs-empty");
    let yaml = cells.yaml();
    let gw = gateway(&etcd.endpoints_arg(), &dir, &yaml, "empty-0");
    let adm = gw.admin_addr.unwrap();
    let ready = admin_get(adm, "/readyz").await;
    assert_eq!(ready["source"], "file_fallback", "{ready}");
    for dry in ["", "?dry_run=true"] {
        let err = admin(
            adm,
            http::Method::POST,
            &format!("/admin/cells/a/drain{dry}"),
            None,
        )
        .await
        .expect_err("refused");
        assert_eq!(err.0, 503, "{err:?}");
        assert!(err.1.contains("not from etcd"), "{err:?}");
    }
    let store = etcd.store().await;
    for k in ["cells/a", "settings", "slots"] {
        assert!(store.raw_get(k).await.unwrap().is_none(), "{k} written");
    }
    // The push still works, and the gateway then takes changes.
    push(&etcd.endpoints_arg(), &dir, &yaml);
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        match admin(adm, http::Method::POST, "/admin/cells/a/drain", None).await {
            Ok(v) => {
                assert_eq!(v["applied"], true, "{v}");
                break;
            }
            Err((503, _)) if Instant::now() < end => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("drain after the push: {e:?}"),
        }
    }
}

/// In etcd mode SIGHUP reloads nothing, and the gateway says so instead of ignoring it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_in_etcd_mode_is_answered_with_a_log_line() {
    let etcd = Etcd::single().await;
    let cells = Cells::new();
    let dir = TempDir::new("docs-hup");
    let yaml = cells.yaml();
    push(&etcd.endpoints_arg(), &dir, &yaml);
    let gw = gateway(&etcd.endpoints_arg(), &dir, &yaml, "hup-0");
    let pid = nix::unistd::Pid::from_raw(gw.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    assert!(
        gw.wait_log("SIGHUP: nothing reloaded", Duration::from_secs(5))
            .await,
        "no word about the SIGHUP"
    );
    // Still serving.
    let admin = gw.admin_addr.unwrap();
    assert!(version(admin).await > 0);
}

/// The load reads the table's documents only, in pages: megabytes of audit history (which
/// only grows) and thousands of overrides (several pages) neither push an answer past
/// gRPC's 4 MiB limit nor keep a gateway from loading the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_with_megabytes_of_audit_history_and_many_overrides_still_loads() {
    let _serial = serial().lock().await;
    let etcd = Etcd::single().await;
    let cells = Cells::new();
    let dir = TempDir::new("docs-big");
    let yaml = cells.yaml();
    push(&etcd.endpoints_arg(), &dir, &yaml);
    let store = std::sync::Arc::new(etcd.store().await);
    // 5 MiB of audit records (etcd takes up to 1.5 MiB per request).
    let blob = format!("{{\"pad\": \"{}\"}}", "x".repeat(1 << 20));
    for i in 0..5 {
        store
            .raw_put(&format!("audit/0000-padding-{i}"), blob.clone())
            .await
            .unwrap();
    }
    // 4,500 overrides to cell c: three pages.
    const N: usize = 4_500;
    for chunk in (0..N).collect::<Vec<_>>().chunks(100) {
        let puts: Vec<_> = chunk
            .iter()
            .map(|&i| {
                let store = std::sync::Arc::clone(&store);
                tokio::spawn(async move {
                    store
                        .raw_put(&format!("overrides/pinned-{i:05}"), r#"{"cell": "c"}"#)
                        .await
                        .unwrap();
                })
            })
            .collect();
        for p in puts {
            p.await.unwrap();
        }
    }
    let gw = gateway(&etcd.endpoints_arg(), &dir, &yaml, "big-0");
    let adm = gw.admin_addr.unwrap();
    let ready = admin_get(adm, "/readyz").await;
    assert_eq!(ready["source"], "etcd", "{ready}");
    let table = admin_get(adm, "/admin/table").await;
    assert_eq!(
        table["overrides"].as_object().map(|o| o.len()),
        Some(N),
        "every override loaded"
    );
    for k in ["pinned-00000", "pinned-02345", "pinned-04499"] {
        let r = admin_get(adm, &format!("/admin/route?key={k}")).await;
        assert_eq!(r["cell"], "c", "{k}: {r}");
    }
}

/// Documents refused for a reason local to this gateway (here a cell's upstream CA file
/// that is not on this host yet) are tried again on their own: once the file appears, the
/// gateway applies them without any further change in etcd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_refused_for_a_local_reason_apply_once_it_passes() {
    let etcd = Etcd::single().await;
    let cells = Cells::new();
    let dir = TempDir::new("docs-retry");
    let yaml = cells.yaml();
    push(&etcd.endpoints_arg(), &dir, &yaml);
    let gw = gateway(&etcd.endpoints_arg(), &dir, &yaml, "retry-0");
    let adm = gw.admin_addr.unwrap();
    let store = etcd.store().await;
    let serving = version(adm).await;
    let (good_c, _) = store.raw_get("cells/c").await.unwrap().unwrap();
    let ca_path = dir.path("late-ca.pem");
    let mut doc: serde_json::Value = serde_json::from_slice(&good_c).unwrap();
    doc["tls"] = serde_json::json!({ "ca_file": ca_path.to_str().unwrap() });
    let with_tls = doc.to_string();
    let rev = store.raw_put("cells/c", with_tls).await.unwrap() as u64;
    let t = wait_rejected(adm, "late-ca.pem").await;
    assert_eq!(t["version"].as_u64(), Some(serving), "the old table serves");
    // The file arrives; nothing changes in etcd.
    std::fs::write(&ca_path, common::tls::ca("late CA").pem).unwrap();
    let end = Instant::now() + Duration::from_secs(6);
    loop {
        let t = admin_get(adm, "/admin/table").await;
        if t["version"].as_u64() == Some(rev) && t["rejected"].is_null() {
            break;
        }
        assert!(Instant::now() < end, "never retried: {t}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `cellgate config push` takes the key prefix as `cellgate run` does: from the file's
/// `etcd.prefix` when no flag names one, so a gateway started from the same file finds
/// what was pushed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_push_uses_the_files_etcd_prefix() {
    let etcd = Etcd::single().await;
    let cells = Cells::new();
    let dir = TempDir::new("docs-prefix");
    let yaml = format!(
        "{}etcd:\n  endpoints: [\"{}\"]\n  prefix: /team-a/\n",
        cells.yaml(),
        etcd.endpoints_arg()
    );
    push(&etcd.endpoints_arg(), &dir, &yaml);
    let gw = gateway(&etcd.endpoints_arg(), &dir, &yaml, "prefix-0");
    let admin = gw.admin_addr.unwrap();
    let r = admin_get(admin, "/readyz").await;
    assert_eq!(r["source"], "etcd", "{r}");
    assert_eq!(r["store"]["state"], "ok", "{r}");
}
