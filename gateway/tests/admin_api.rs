//! The admin REST API of SPEC §5 without etcd (local, file-backed state), exercised through
//! the router with `oneshot`: auth on every `/admin` path, JSON errors, every endpoint,
//! dry runs, the traffic cap, audit records, the OpenAPI description, slot moves and
//! rebalancing, and admin changes that survive file reloads and restarts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use axum::body::Body;
use axum::Router;
use cellgate::server::Shared;
use cellgate_config::{Config, DEMO_YAML};
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use common::TempDir;

const TOKEN: &str = "demo-token";

struct Api {
    shared: Arc<Shared>,
    app: Router,
    _dir: TempDir,
}

impl Api {
    fn new(cfg: Config) -> Self {
        let dir = TempDir::new("admin");
        let shared = cellgate::control::standalone(cfg, &dir.0).unwrap();
        let app = cellgate::admin::router(Arc::clone(&shared));
        Api {
            shared,
            app,
            _dir: dir,
        }
    }

    fn demo() -> Self {
        Self::new(Config::from_yaml(DEMO_YAML).unwrap())
    }

    async fn raw(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut b = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        let req = b.body(Body::from(body.unwrap_or("").to_owned())).unwrap();
        let res = self.app.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let ct = res
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned());
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        // The dashboard (HTML) and the metrics (Prometheus text) are the only non-JSON routes.
        if path == "/ui" || path == "/metrics" {
            let want = if path == "/ui" {
                "text/html"
            } else {
                "text/plain"
            };
            assert!(
                ct.as_deref().unwrap_or("").starts_with(want),
                "{path}: {ct:?}"
            );
            assert!(!bytes.is_empty(), "{path}");
            return (
                status,
                Value::String(String::from_utf8_lossy(&bytes).into_owned()),
            );
        }
        let v: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {bytes:?}"));
        assert_eq!(ct.as_deref(), Some("application/json"), "{path}");
        (status, v)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.raw(Method::GET, path, Some(TOKEN), None).await
    }

    async fn post(&self, path: &str, body: Option<&str>) -> (StatusCode, Value) {
        self.raw(Method::POST, path, Some(TOKEN), body).await
    }

    async fn put(&self, path: &str, body: &str) -> (StatusCode, Value) {
        self.raw(Method::PUT, path, Some(TOKEN), Some(body)).await
    }

    async fn route(&self, key: &str) -> Value {
        let (s, v) = self.get(&format!("/admin/route?key={key}")).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v
    }
}

/// A request for each served route that the API accepts (known cell, valid body).
fn sample_request(method: &Method, path: &str) -> (String, Option<&'static str>) {
    let p = path.replace("{id}", "bj-1");
    match (method.as_str(), path) {
        ("GET", "/admin/route") => ("/admin/route?key=alice".into(), None),
        ("POST", "/admin/cells/{id}/switch") => (p + "?dry_run=true", Some(r#"{"to": "bj-2"}"#)),
        ("PUT", "/admin/cells/{id}/weight") => (p + "?dry_run=true", Some(r#"{"weight": 100}"#)),
        ("POST", "/admin/slots/move") => (
            "/admin/slots/move?dry_run=true".into(),
            Some(r#"{"from": "bj-1", "to": "sh-1", "count": 1}"#),
        ),
        ("POST", _) | ("PUT", _) => (p + "?dry_run=true", None),
        _ => (p, None),
    }
}

#[tokio::test]
async fn every_admin_path_needs_the_bearer_token() {
    let api = Api::demo();
    let mut checked = 0;
    for r in cellgate::admin::routes() {
        let (path, body) = sample_request(&r.method, r.path);
        if !r.auth {
            let (s, _) = api.raw(r.method.clone(), &path, None, body).await;
            assert_eq!(s, StatusCode::OK, "{} {path} is open", r.method);
            continue;
        }
        for token in [None, Some("wrong-token"), Some("")] {
            let (s, v) = api.raw(r.method.clone(), &path, token, body).await;
            assert_eq!(
                s,
                StatusCode::UNAUTHORIZED,
                "{} {path} with {token:?}",
                r.method
            );
            assert!(
                v["error"].as_str().unwrap().contains("token")
                    || v["error"].as_str().unwrap().contains("credentials")
            );
        }
        let (s, v) = api.raw(r.method.clone(), &path, Some(TOKEN), body).await;
        assert_eq!(s, StatusCode::OK, "{} {path}: {v}", r.method);
        checked += 1;
    }
    assert_eq!(checked, 13);
    // Unknown /admin paths: 401 first, then a JSON 404.
    let (s, _) = api.raw(Method::GET, "/admin/nope", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, v) = api.get("/admin/nope").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(v["error"].is_string());
    // Nothing was changed by all those dry runs.
    assert_eq!(api.shared.table.load().version(), 1);
}

#[tokio::test]
async fn a_wrong_method_on_an_admin_path_needs_the_token_before_its_405() {
    let api = Api::demo();
    let mut checked = 0;
    for r in cellgate::admin::routes().iter().filter(|r| r.auth) {
        let path = r.path.replace("{id}", "bj-1");
        let wrong = if r.method == Method::DELETE {
            Method::PATCH
        } else {
            Method::DELETE
        };
        for token in [None, Some("wrong-token")] {
            let (s, v) = api.raw(wrong.clone(), &path, token, None).await;
            assert_eq!(s, StatusCode::UNAUTHORIZED, "{wrong} {path} with {token:?}");
            assert!(v["error"].is_string(), "{wrong} {path}: {v}");
        }
        let (s, v) = api.raw(wrong.clone(), &path, Some(TOKEN), None).await;
        assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED, "{wrong} {path}: {v}");
        assert!(v["error"].as_str().unwrap().contains("method"), "{v}");
        checked += 1;
    }
    assert_eq!(checked, 13);
    // The open endpoints keep answering a wrong method with 405, no token asked.
    let (s, _) = api.raw(Method::POST, "/healthz", None, None).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(api.shared.table.load().version(), 1, "nothing changed");
}

#[tokio::test]
async fn the_openapi_description_matches_the_router() {
    let api = Api::demo();
    let (s, doc) = api.get("/admin/openapi.json").await;
    assert_eq!(s, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    let routes = cellgate::admin::routes();
    for r in &routes {
        let op = &paths
            .get(r.path)
            .unwrap_or_else(|| panic!("{} is not documented", r.path))
            [r.method.as_str().to_lowercase()];
        assert!(op.is_object(), "{} {} is not documented", r.method, r.path);
        assert!(
            op["responses"]["200"].is_object(),
            "{} {}",
            r.method,
            r.path
        );
        if r.auth {
            assert!(
                op["responses"]["401"].is_object(),
                "{} {} documents 401",
                r.method,
                r.path
            );
        }
        // And the router really serves what is documented.
        let (path, body) = sample_request(&r.method, r.path);
        let (s, v) = api.raw(r.method.clone(), &path, Some(TOKEN), body).await;
        assert_eq!(s, StatusCode::OK, "{} {path}: {v}", r.method);
    }
    let documented: usize = paths
        .values()
        .map(|ops| ops.as_object().unwrap().len())
        .sum();
    assert_eq!(documented, routes.len(), "documented operations not served");
    // Mutations document dry_run, force, and their error statuses.
    for (p, m) in [
        ("/admin/cells/{id}/drain", "post"),
        ("/admin/cells/{id}/weight", "put"),
        ("/admin/rebalance", "post"),
    ] {
        let op = &doc["paths"][p][m];
        let names: Vec<&str> = op["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["name"].as_str().unwrap())
            .collect();
        assert!(
            names.contains(&"dry_run") && names.contains(&"force"),
            "{p}"
        );
        for code in ["400", "409", "422", "503"] {
            assert!(op["responses"][code].is_object(), "{p} {code}");
        }
    }
}

#[tokio::test]
async fn cells_table_and_health_endpoints_describe_the_gateway() {
    let api = Api::demo();
    let (s, v) = api.get("/admin/cells").await;
    assert_eq!(s, StatusCode::OK);
    let cells = v["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 3);
    let bj1 = &cells[0];
    assert_eq!(bj1["id"], "bj-1");
    assert_eq!(bj1["region"], "bj");
    assert_eq!(bj1["state"], "active");
    assert_eq!(bj1["weight"], 100);
    assert_eq!(bj1["slots"], 5462);
    assert_eq!(bj1["failover"], json!(["bj-2", "sh-1"]));
    assert_eq!(bj1["instances"].as_array().unwrap().len(), 2);
    assert_eq!(bj1["instances"][1]["labels"]["gray"], "canary");
    assert_eq!(bj1["score"], 1.0);
    // Effective weights in the units of the base weight (at most base × 1.5 with the RTT
    // bonus); the cell's is its instances' sum (as cellgate_cell_weight).
    let mut sum = 0.0;
    for i in bj1["instances"].as_array().unwrap() {
        let (w, e) = (
            i["weight"].as_f64().unwrap(),
            i["effective_weight"].as_f64().unwrap(),
        );
        assert!(e > 0.0 && e <= w * 1.5, "{i}");
        sum += e;
    }
    assert!(
        (bj1["effective_weight"].as_f64().unwrap() - sum).abs() < 1e-6,
        "{bj1}"
    );

    let (s, v) = api.get("/admin/cells/sh-1").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["region"], "sh");
    assert_eq!(v["slots"], 5461);
    let (s, v) = api.get("/admin/cells/zz-9").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(v["error"].as_str().unwrap().contains("zz-9"));

    let (s, t) = api.get("/admin/table").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(t["version"], 1);
    assert_eq!(t["table_version"], 1);
    assert_eq!(t["slot_count"], 16384);
    assert_eq!(
        t["slots_per_cell"],
        json!({"bj-1": 5462, "bj-2": 5461, "sh-1": 5461})
    );
    assert_eq!(t["slot_ranges"]["bj-2"], json!(["5462-10922"]));
    assert_eq!(t["gray"][0]["name"], "canary-10pct");
    assert_eq!(t["store"]["kind"], "file");
    assert!(t["rejected"].is_null());

    let (s, v) = api.raw(Method::GET, "/healthz", None, None).await;
    assert_eq!((s, v["status"].as_str()), (StatusCode::OK, Some("ok")));
    let (s, v) = api.raw(Method::GET, "/readyz", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["ready"], true);
    assert_eq!(v["store"]["state"], "ok");
    assert_eq!(v["table_version"], 1);

    let (s, v) = api.get("/admin/fleet").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["gateways"].as_array().unwrap().len(), 1);
    assert_eq!(v["gateways"][0]["table_version"], 1);
    assert_eq!(v["gateways"][0]["health"]["bj-2"]["serving"], true);
}

#[tokio::test]
async fn route_explains_a_decision_and_names_bad_input() {
    let api = Api::demo();
    let v = api.route("alice").await;
    // xxh3_64("alice") % 16384 = 5808 (pinned by the golden vectors); 5462-10922 is bj-2.
    assert_eq!(v["key"], "alice");
    assert_eq!(v["slot"], 5808);
    assert_eq!(v["home_cell"], "bj-2");
    assert_eq!(v["cell"], "bj-2");
    assert_eq!(v["table_version"], 1);
    assert!(v["reason"].as_str().unwrap().contains("slot 5808"));
    assert_eq!(v["instances"], json!(["bj-2-a", "bj-2-b"]));
    assert_eq!(v["instances_fallback"], false);

    let (s, v) = api
        .get("/admin/route?key=alice&region=sh&gray=canary")
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["region"], "sh");
    assert_eq!(v["gray_tag"], "canary");
    // bj-2 has no canary instance: a tagged request goes to its other instances, as the
    // data path does, and the answer says it fell back.
    assert_eq!(v["instances"], json!(["bj-2-a", "bj-2-b"]), "{v}");
    assert_eq!(v["instances_fallback"], true);

    for (q, needle) in [
        ("/admin/route", "key"),
        ("/admin/route?key=alice&region=mars", "mars"),
        ("/admin/route?key=alice&colour=red", "colour"),
        (
            &format!("/admin/route?key={}", "a".repeat(300)),
            "300 bytes",
        ),
    ] {
        let (s, v) = api.get(q).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{q}");
        assert!(v["error"].as_str().unwrap().contains(needle), "{q}: {v}");
    }
}

#[tokio::test]
async fn drain_switch_restore_and_weight_steer_traffic_and_are_audited() {
    let api = Api::demo();
    // alice lives in bj-2, whose failover order is bj-1 then sh-1.
    let (s, v) = api.post("/admin/cells/bj-2/drain", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["applied"], true);
    assert_eq!(v["dry_run"], false);
    assert_eq!(v["table_version"], 2);
    assert_eq!(v["plan"]["slots_moved"], 0);
    assert_eq!(v["plan"]["slots_rerouted"], 5461);
    assert!((v["plan"]["share_moved"].as_f64().unwrap() - 5461.0 / 16384.0).abs() < 1e-9);
    assert_eq!(v["plan"]["cells_affected"], json!(["bj-1", "bj-2"]));
    assert!(v.as_object().unwrap().contains_key("in_flight"));
    let r = api.route("alice").await;
    assert_eq!(
        (r["cell"].as_str(), r["home_state"].as_str()),
        (Some("bj-1"), Some("draining"))
    );
    assert_eq!(r["table_version"], 2);
    assert_eq!(api.shared.table.load().version(), 2);

    let (s, v) = api
        .post("/admin/cells/bj-2/switch", Some(r#"{"to": "sh-1"}"#))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let r = api.route("alice").await;
    assert_eq!(r["cell"], "sh-1");
    assert_eq!(r["switch"], json!({"cell": "bj-2", "to": "sh-1"}));
    assert!(
        r["reason"].as_str().unwrap().contains("switched to sh-1"),
        "{r}"
    );

    let (s, v) = api
        .put("/admin/cells/sh-1/weight", r#"{"weight": 250}"#)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (_, c) = api.get("/admin/cells/sh-1").await;
    assert_eq!(c["weight"], 250);

    let (s, _) = api.post("/admin/cells/bj-2/restore", None).await;
    assert_eq!(s, StatusCode::OK);
    let r = api.route("alice").await;
    assert_eq!(
        (r["cell"].as_str(), r["table_version"].as_u64()),
        (Some("bj-2"), Some(5))
    );
    assert!(r.get("switch").is_none());

    // The manual switches are in the failover metrics with the automatic ones.
    let (_, m) = api.raw(Method::GET, "/metrics", None, None).await;
    let m = m.as_str().unwrap();
    for line in [
        r#"cellgate_failovers_total{from="bj-2",to="bj-1",reason="drain"} 1"#,
        r#"cellgate_failovers_total{from="bj-2",to="sh-1",reason="manual"} 1"#,
        "cellgate_switch_duration_seconds_count{} 3",
    ] {
        assert!(m.lines().any(|l| l == line), "no {line:?} in\n{m}");
    }

    let (s, a) = api.get("/admin/audit?limit=10").await;
    assert_eq!(s, StatusCode::OK);
    let ev = a["events"].as_array().unwrap();
    let actions: Vec<&str> = ev.iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["restore", "weight", "switch", "drain"]);
    for e in ev {
        assert_eq!(e["actor"], "admin");
        assert_eq!(e["dry_run"], false);
        assert!(e["duration_ms"].as_f64().unwrap() >= 0.0);
        assert!(e["time"].as_str().unwrap().ends_with('Z'));
    }
    assert_eq!(ev[1]["before"]["cells/sh-1"]["weight"], 100);
    assert_eq!(ev[1]["after"]["cells/sh-1"]["weight"], 250);
    assert_eq!(ev[2]["after"]["cells/bj-2"]["switched_to"], "sh-1");
    assert_eq!(ev[3]["before"]["cells/bj-2"]["state"], "active");
    assert_eq!(ev[3]["after"]["cells/bj-2"]["state"], "draining");
    let (_, a) = api.get("/admin/audit?limit=1").await;
    assert_eq!(a["events"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_dry_run_reports_the_plan_and_changes_nothing() {
    let api = Api::demo();
    let (s, v) = api.post("/admin/cells/bj-1/drain?dry_run=true", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        (v["dry_run"].as_bool(), v["applied"].as_bool()),
        (Some(true), Some(false))
    );
    assert_eq!(v["plan"]["slots_rerouted"], 5462);
    assert_eq!(
        v["plan"]["moves"],
        json!([{"from": "bj-1", "to": "bj-2", "slots": 5462}])
    );
    assert_eq!(v["table_version"], 1);
    assert_eq!(api.shared.table.load().version(), 1);
    let (_, c) = api.get("/admin/cells/bj-1").await;
    assert_eq!(c["state"], "active");
    let (_, a) = api.get("/admin/audit").await;
    assert_eq!(a["events"][0]["dry_run"], true);
    assert_eq!(a["events"][0]["action"], "drain");
}

#[tokio::test]
async fn the_traffic_cap_refuses_big_moves_unless_forced() {
    let mut cfg = Config::from_yaml(DEMO_YAML).unwrap();
    cfg.admin.max_move_share = 0.2;
    let api = Api::new(cfg);
    let (s, v) = api.post("/admin/cells/bj-1/drain", None).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let msg = v["error"].as_str().unwrap();
    assert!(
        msg.contains("33.3%") && msg.contains("20.0%") && msg.contains("force=true"),
        "{msg}"
    );
    assert_eq!(api.shared.table.load().version(), 1);
    // A dry run says it would exceed the cap.
    let (s, v) = api.post("/admin/cells/bj-1/drain?dry_run=true", None).await;
    assert_eq!(
        (s, v["exceeds_cap"].as_bool()),
        (StatusCode::OK, Some(true))
    );
    // Small moves pass; force passes.
    let (s, _) = api
        .post(
            "/admin/slots/move",
            Some(r#"{"from": "bj-1", "to": "sh-1", "count": 100}"#),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = api.post("/admin/cells/bj-1/drain?force=true", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(api.route("alice").await["table_version"], 3);
}

#[tokio::test]
async fn malformed_requests_get_400_naming_the_problem_and_unknown_cells_404() {
    let api = Api::demo();
    let cases: Vec<(Method, &str, Option<&str>, StatusCode, &str)> = vec![
        (
            Method::POST,
            "/admin/cells/bj-1/switch",
            None,
            StatusCode::BAD_REQUEST,
            "empty",
        ),
        (
            Method::POST,
            "/admin/cells/bj-1/switch",
            Some("{\"to\": "),
            StatusCode::BAD_REQUEST,
            "not JSON",
        ),
        (
            Method::POST,
            "/admin/cells/bj-1/switch",
            Some(r#"{"too": "bj-2"}"#),
            StatusCode::BAD_REQUEST,
            "unknown field `too`",
        ),
        (
            Method::POST,
            "/admin/cells/bj-1/switch",
            Some(r#"{}"#),
            StatusCode::BAD_REQUEST,
            "missing field `to`",
        ),
        (
            Method::POST,
            "/admin/cells/bj-1/switch",
            Some(r#"{"to": "bj-1"}"#),
            StatusCode::BAD_REQUEST,
            "itself",
        ),
        (
            Method::POST,
            "/admin/cells/bj-1/switch",
            Some(r#"{"to": "zz"}"#),
            StatusCode::NOT_FOUND,
            "\"zz\"",
        ),
        (
            Method::PUT,
            "/admin/cells/bj-1/weight",
            Some(r#"{"weight": "heavy"}"#),
            StatusCode::BAD_REQUEST,
            "weight: invalid type",
        ),
        (
            Method::POST,
            "/admin/slots/move",
            Some(r#"{"slots": [1, -2], "to": "bj-2"}"#),
            StatusCode::BAD_REQUEST,
            "slots[1]: invalid value",
        ),
        (
            Method::POST,
            "/admin/slots/move",
            Some(r#"{"from": "bj-1", "to": "bj-2", "count": "5"}"#),
            StatusCode::BAD_REQUEST,
            "count: invalid type",
        ),
        (
            Method::PUT,
            "/admin/cells/bj-1/weight",
            Some(r#"{"weight": -1}"#),
            StatusCode::BAD_REQUEST,
            "invalid value",
        ),
        (
            Method::PUT,
            "/admin/cells/bj-1/weight",
            Some(r#"{"weight": 2000000}"#),
            StatusCode::BAD_REQUEST,
            "more than 1000000",
        ),
        (
            Method::PUT,
            "/admin/cells/nope/weight",
            Some(r#"{"weight": 1}"#),
            StatusCode::NOT_FOUND,
            "\"nope\"",
        ),
        (
            Method::POST,
            "/admin/cells/nope/drain",
            None,
            StatusCode::NOT_FOUND,
            "\"nope\"",
        ),
        (
            Method::POST,
            "/admin/cells/nope/restore",
            None,
            StatusCode::NOT_FOUND,
            "\"nope\"",
        ),
        (
            Method::POST,
            "/admin/cells/bj-1/drain?dry_run=maybe",
            None,
            StatusCode::BAD_REQUEST,
            "dry_run",
        ),
        (
            Method::POST,
            "/admin/cells/bj-1/drain?verbose=1",
            None,
            StatusCode::BAD_REQUEST,
            "verbose",
        ),
        (
            Method::POST,
            "/admin/slots/move",
            Some(r#"{"from": "bj-1", "to": "sh-1"}"#),
            StatusCode::BAD_REQUEST,
            "count",
        ),
        (
            Method::POST,
            "/admin/slots/move",
            Some(r#"{"from": "bj-1", "count": 3}"#),
            StatusCode::BAD_REQUEST,
            "`to`",
        ),
        (
            Method::POST,
            "/admin/slots/move",
            Some(r#"{"slots": [99999], "to": "sh-1"}"#),
            StatusCode::BAD_REQUEST,
            "slot 99999",
        ),
        (
            Method::POST,
            "/admin/slots/move",
            Some(r#"{"from": "bj-1", "to": "sh-1", "count": 99999}"#),
            StatusCode::BAD_REQUEST,
            "owns 5462 slots",
        ),
        (
            Method::POST,
            "/admin/slots/move",
            Some(r#"{"from": "zz", "to": "sh-1", "count": 1}"#),
            StatusCode::NOT_FOUND,
            "\"zz\"",
        ),
        (
            Method::POST,
            "/admin/rebalance",
            Some("please"),
            StatusCode::BAD_REQUEST,
            "no request body",
        ),
        (
            Method::GET,
            "/admin/audit?limit=0",
            None,
            StatusCode::BAD_REQUEST,
            "limit",
        ),
        (
            Method::GET,
            "/admin/audit?limit=ten",
            None,
            StatusCode::BAD_REQUEST,
            "limit",
        ),
        (
            Method::DELETE,
            "/admin/cells/bj-1",
            None,
            StatusCode::METHOD_NOT_ALLOWED,
            "method",
        ),
    ];
    for (m, path, body, status, needle) in cases {
        let (s, v) = api.raw(m.clone(), path, Some(TOKEN), body).await;
        assert_eq!(s, status, "{m} {path} {body:?}: {v}");
        let msg = v["error"].as_str().unwrap_or_default();
        assert!(
            msg.contains(needle),
            "{m} {path} {body:?}: {msg:?} lacks {needle:?}"
        );
    }
    assert_eq!(api.shared.table.load().version(), 1, "nothing changed");
    let (_, a) = api.get("/admin/audit").await;
    assert!(
        a["events"].as_array().unwrap().is_empty(),
        "refusals are not audited"
    );
}

fn four_cells(with_d: bool) -> Config {
    let mut y = String::from("admin: { token: demo-token }\nregions: [r1, r2]\ncells:\n");
    let cells: &[&str] = if with_d {
        &["a", "b", "c", "d"]
    } else {
        &["a", "b", "c"]
    };
    for (i, c) in cells.iter().enumerate() {
        y.push_str(&format!(
            "  - {{ id: {c}, region: r{}, instances: [{{ name: {c}-1, addr: \"127.0.0.1:{}\" }}] }}\n",
            1 + i % 2,
            19000 + i
        ));
    }
    y.push_str("slots:\n  - { cell: a, ranges: [\"0-5461\"] }\n  - { cell: b, ranges: [\"5462-10922\"] }\n  - { cell: c, ranges: [\"10923-16383\"] }\n");
    Config::from_yaml(&y).unwrap()
}

#[tokio::test]
async fn adding_a_cell_moves_nothing_and_rebalance_moves_the_minimum() {
    let api = Api::new(four_cells(false));
    let keys: Vec<String> = (0..2000).map(|i| format!("user-{i}")).collect();
    let mut before = Vec::new();
    for k in &keys {
        before.push(api.route(k).await["cell"].as_str().unwrap().to_owned());
    }
    // The file gains a fourth cell of equal capacity: no slot moves, no key moves.
    let v = cellgate::control::apply_file(&api.shared, four_cells(true))
        .await
        .unwrap();
    assert_eq!(v, 2);
    let (_, t) = api.get("/admin/table").await;
    assert_eq!(t["slots_per_cell"]["d"], 0);
    for (k, b) in keys.iter().zip(&before) {
        assert_eq!(api.route(k).await["cell"].as_str().unwrap(), b, "{k} moved");
    }

    // Dry run: about a quarter of the slots would move, all to d; nothing changes.
    let (s, plan) = api.post("/admin/rebalance?dry_run=true", None).await;
    assert_eq!(s, StatusCode::OK, "{plan}");
    assert_eq!(plan["plan"]["slots_moved"], 4096);
    assert!((plan["plan"]["share_moved"].as_f64().unwrap() - 0.25).abs() < 0.001);
    for m in plan["plan"]["moves"].as_array().unwrap() {
        assert_eq!(m["to"], "d");
    }
    let (_, t) = api.get("/admin/table").await;
    assert_eq!(
        (t["version"].as_u64(), t["slots_per_cell"]["d"].as_u64()),
        (Some(2), Some(0))
    );

    // The real rebalance: at most ⌈16384/4⌉ slots move, every cell within one of 4096.
    let (s, done) = api.post("/admin/rebalance", Some("{}")).await;
    assert_eq!(s, StatusCode::OK, "{done}");
    let moved = done["plan"]["slots_moved"].as_u64().unwrap();
    assert!(moved <= 16384u64.div_ceil(4), "{moved}");
    let (_, t) = api.get("/admin/table").await;
    for c in ["a", "b", "c", "d"] {
        let n = t["slots_per_cell"][c].as_i64().unwrap();
        assert!((n - 4096).abs() <= 1, "{c} has {n}");
    }
    // Keys that moved went to d and nowhere else.
    let mut moved_keys = 0;
    for (k, b) in keys.iter().zip(&before) {
        let now = api.route(k).await["cell"].as_str().unwrap().to_owned();
        if &now != b {
            assert_eq!(now, "d");
            moved_keys += 1;
        }
    }
    assert!(
        (350..=650).contains(&moved_keys),
        "{moved_keys} of 2000 keys moved"
    );
    let (_, a) = api.get("/admin/audit?limit=2").await;
    assert_eq!(a["events"][0]["action"], "rebalance");
    assert_eq!(a["events"][1]["dry_run"], true);
}

#[tokio::test]
async fn slot_moves_report_how_many_slots_moved() {
    let api = Api::demo();
    let (s, v) = api
        .post(
            "/admin/slots/move",
            Some(r#"{"from": "bj-1", "to": "sh-1", "count": 10}"#),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["plan"]["slots_moved"], 10);
    let (_, t) = api.get("/admin/table").await;
    assert_eq!(t["slots_per_cell"]["bj-1"], 5452);
    assert_eq!(t["slots_per_cell"]["sh-1"], 5471);
    // alice's slot 5808 moves to sh-1 by list; listing a slot already there moves nothing.
    let (s, v) = api
        .post(
            "/admin/slots/move",
            Some(r#"{"slots": [5808, 16383], "to": "sh-1"}"#),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["plan"]["slots_moved"], 1);
    let r = api.route("alice").await;
    assert_eq!(
        (r["home_cell"].as_str(), r["cell"].as_str()),
        (Some("sh-1"), Some("sh-1"))
    );
}

#[tokio::test]
async fn admin_changes_survive_file_reloads_and_restarts() {
    let dir = TempDir::new("overlay");
    let cfg = Config::from_yaml(DEMO_YAML).unwrap();
    let shared = cellgate::control::standalone(cfg.clone(), &dir.0).unwrap();
    let app = cellgate::admin::router(Arc::clone(&shared));
    let req = Request::post("/admin/cells/bj-2/switch")
        .header("authorization", "Bearer demo-token")
        .body(Body::from(r#"{"to": "sh-1"}"#))
        .unwrap();
    assert_eq!(
        app.clone().oneshot(req).await.unwrap().status(),
        StatusCode::OK
    );
    let alice = |s: &Shared| s.table.load().explain("alice", 1).unwrap().cell;
    assert_eq!(alice(&shared), "sh-1");

    // The file is edited (an instance weight): the switch stays.
    let mut edited = cfg.clone();
    edited.cells[2].instances[0].weight = 7;
    let v = cellgate::control::apply_file(&shared, edited.clone())
        .await
        .unwrap();
    assert_eq!(v, 3);
    assert_eq!(alice(&shared), "sh-1");
    assert_eq!(shared.table.load().cells()[2].instances[0].weight, 7);

    // A restart from the same file and state directory keeps it too.
    drop(app);
    let again = cellgate::control::standalone(edited, &dir.0).unwrap();
    assert_eq!(alice(&again), "sh-1");
    let (_, sw) = (
        (),
        again.control.desired().config.cells[1].switched_to.clone(),
    );
    assert_eq!(sw.as_deref(), Some("sh-1"));
    // The local audit log survived the restart as well.
    let events = again.control.audit.recent(10).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].action, "switch");
}
