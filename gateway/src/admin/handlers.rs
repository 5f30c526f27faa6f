//! The admin API's handlers: each reads the serving table (and the desired configuration
//! it was built from) once, or hands a mutation to [`crate::control::mutate`].

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::{Extension, Json};
use cellgate_config::mutate::slot_assignments;
use cellgate_config::Mutation;
use cellgate_routing::RoutingTable;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{Actor, AppError, JsonBody};
use crate::control::{self, MutationRequest};
use crate::server::Shared;

type Params = Result<Query<Vec<(String, String)>>, axum::extract::rejection::QueryRejection>;

fn params(q: Params, allowed: &[&str]) -> Result<BTreeMap<String, String>, AppError> {
    let Query(pairs) =
        q.map_err(|e| AppError::BadRequest(format!("malformed query string: {e}")))?;
    let mut out = BTreeMap::new();
    for (k, v) in pairs {
        if !allowed.contains(&k.as_str()) {
            return Err(AppError::BadRequest(format!(
                "unknown query parameter {k:?}; this endpoint takes {}",
                if allowed.is_empty() {
                    "none".to_owned()
                } else {
                    allowed.join(", ")
                }
            )));
        }
        if out.insert(k.clone(), v).is_some() {
            return Err(AppError::BadRequest(format!(
                "query parameter {k:?} is given twice"
            )));
        }
    }
    Ok(out)
}

fn flag(p: &BTreeMap<String, String>, name: &str) -> Result<bool, AppError> {
    match p.get(name).map(String::as_str) {
        None | Some("false" | "0" | "no") => Ok(false),
        Some("" | "true" | "1" | "yes") => Ok(true),
        Some(other) => Err(AppError::BadRequest(format!(
            "{name}: expected true or false, got {other:?}"
        ))),
    }
}

pub(super) async fn not_found() -> AppError {
    AppError::NotFound("no such endpoint; see GET /admin/openapi.json".into())
}

pub(super) async fn method_not_allowed() -> impl IntoResponse {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        [(header::CONTENT_TYPE, "application/json")],
        json!({"error": "method not allowed on this endpoint; see GET /admin/openapi.json"})
            .to_string(),
    )
}

pub(super) async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Ready while a table is serving (always, once started) until the gateway drains (503:
/// load balancers stop sending new connections); the store's state is reported beside it:
/// a degraded store does not make the gateway unready, it keeps serving.
pub(super) async fn readyz(State(s): State<Arc<Shared>>) -> (StatusCode, Json<Value>) {
    let status = s.control.status();
    let d = s.control.desired();
    let draining = s.draining.load(std::sync::atomic::Ordering::Acquire);
    (
        if draining {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        },
        Json(json!({
            "ready": !draining,
            "draining": draining,
            "table_version": s.table.load().version(),
            "source": d.source,
            "store": &*status,
        })),
    )
}

fn cell_view(t: &RoutingTable, s: &Shared, idx: usize, slots: &[u32], now: u64) -> Value {
    let Some(c) = t.cells().get(idx) else {
        return Value::Null;
    };
    let desired = s.control.desired();
    let cfg = desired.config.cells.iter().find(|x| *x.id == *c.id);
    let p = t.health_policy();
    let up = c
        .instances
        .iter()
        .filter(|i| i.health.is_available(now, p))
        .count();

    let rtts: Vec<f64> = c
        .instances
        .iter()
        .filter_map(|i| i.health.rtt_ms())
        .collect();
    let instances: Vec<Value> = c
        .instances
        .iter()
        .map(|i| {
            let (requests, failures) = i.health.counts();
            json!({
                "name": &*i.name,
                "addr": i.addr.to_string(),
                "weight": i.weight,
                "effective_weight": f64::from(i.effective) / 100.0,
                "labels": &*i.labels,
                "available": i.health.is_available(now, p),
                "score": i.health.score(),
                "rtt_ms": i.health.rtt_ms(),
                "in_flight": i.health.in_flight(),
                "ejected_for_ms": i.health.ejected_until().saturating_sub(now),
                "requests": requests,
                "failures": failures,
            })
        })
        .collect();
    json!({
        "id": &*c.id,
        "region": &*c.region,
        "state": c.state.as_str(),
        "configured_state": c.configured_state.as_str(),
        "serving": c.is_serving(now, p),
        "weight": c.weight,
        "effective_weight": c.effective_weight(),
        "failover": cfg.map(|x| x.failover.clone()),
        "switched_to": cfg.and_then(|x| x.switched_to.clone()),
        "slots": slots.get(idx).copied().unwrap_or(0),
        // Mean of the instances' health scores (unavailable ones 0), and of their RTT
        // EWMAs where known.
        "score": c.health_score(now, p),
        "rtt_ms": if rtts.is_empty() { Value::Null } else { json!(rtts.iter().sum::<f64>() / rtts.len() as f64) },
        "instances_up": up,
        "in_flight": c.health.in_flight(),
        "instances": instances,
    })
}

pub(super) async fn cells(
    State(s): State<Arc<Shared>>,
    q: Params,
) -> Result<Json<Value>, AppError> {
    params(q, &[])?;
    let t = s.table.load_full();
    let now = cellgate_health::now_ms();
    let slots = t.slots_per_cell();
    let cells: Vec<Value> = (0..t.cells().len())
        .map(|i| cell_view(&t, &s, i, &slots, now))
        .collect();
    Ok(Json(json!({"table_version": t.version(), "cells": cells})))
}

pub(super) async fn cell(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, AppError> {
    let t = s.table.load_full();
    let idx = t
        .cell_idx(&id)
        .ok_or_else(|| AppError::NotFound(format!("unknown cell {id:?}")))?;
    let now = cellgate_health::now_ms();
    let mut v = cell_view(&t, &s, usize::from(idx), &t.slots_per_cell(), now);
    if let Some(o) = v.as_object_mut() {
        o.insert("table_version".into(), json!(t.version()));
    }
    Ok(Json(v))
}

async fn run_mutation(
    s: &Arc<Shared>,
    actor: Actor,
    q: Params,
    mutation: Mutation,
    body: Value,
) -> Result<Json<Value>, AppError> {
    let p = params(q, &["dry_run", "force"])?;
    let dry_run = flag(&p, "dry_run")?;
    let force = flag(&p, "force")?;
    let out = control::mutate(
        s,
        MutationRequest {
            mutation,
            actor: actor.0,
            dry_run,
            force,
            request: json!({"body": body, "dry_run": dry_run, "force": force}),
        },
    )
    .await?;
    Ok(Json(
        serde_json::to_value(out).map_err(|e| AppError::Internal(e.to_string()))?,
    ))
}

fn known_cell(s: &Shared, id: &str) -> Result<(), AppError> {
    if s.table.load().cell_idx(id).is_none() {
        return Err(AppError::NotFound(format!("unknown cell {id:?}")));
    }
    Ok(())
}

pub(super) async fn drain(
    State(s): State<Arc<Shared>>,
    Extension(actor): Extension<Actor>,
    Path(id): Path<String>,
    q: Params,
) -> Result<Json<Value>, AppError> {
    known_cell(&s, &id)?;
    let mut v = run_mutation(&s, actor, q, Mutation::Drain { cell: id }, Value::Null)
        .await?
        .0;
    if let Some(o) = v.as_object_mut() {
        // Requests already in the cell finish there; this is how many are still running.
        let t = s.table.load();
        let in_flight = o
            .get("cell")
            .and_then(Value::as_str)
            .and_then(|id| t.cell_idx(id))
            .and_then(|i| t.cell(i))
            .map(|c| c.health.in_flight());
        o.insert("in_flight".into(), json!(in_flight));
    }
    Ok(Json(v))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SwitchBody {
    to: String,
}

pub(super) async fn switch(
    State(s): State<Arc<Shared>>,
    Extension(actor): Extension<Actor>,
    Path(id): Path<String>,
    q: Params,
    body: JsonBody<SwitchBody>,
) -> Result<Json<Value>, AppError> {
    known_cell(&s, &id)?;
    run_mutation(
        &s,
        actor,
        q,
        Mutation::Switch {
            cell: id,
            to: body.value.to,
        },
        body.raw,
    )
    .await
}

pub(super) async fn restore(
    State(s): State<Arc<Shared>>,
    Extension(actor): Extension<Actor>,
    Path(id): Path<String>,
    q: Params,
) -> Result<Json<Value>, AppError> {
    known_cell(&s, &id)?;
    run_mutation(&s, actor, q, Mutation::Restore { cell: id }, Value::Null).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WeightBody {
    weight: u32,
}

pub(super) async fn weight(
    State(s): State<Arc<Shared>>,
    Extension(actor): Extension<Actor>,
    Path(id): Path<String>,
    q: Params,
    body: JsonBody<WeightBody>,
) -> Result<Json<Value>, AppError> {
    known_cell(&s, &id)?;
    run_mutation(
        &s,
        actor,
        q,
        Mutation::Weight {
            cell: id,
            weight: body.value.weight,
        },
        body.raw,
    )
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MoveBody {
    from: Option<String>,
    to: Option<String>,
    count: Option<u32>,
    slots: Option<Vec<u32>>,
}

pub(super) async fn slots_move(
    State(s): State<Arc<Shared>>,
    Extension(actor): Extension<Actor>,
    q: Params,
    body: JsonBody<MoveBody>,
) -> Result<Json<Value>, AppError> {
    const SHAPES: &str = r#"give either {"from": "<cell>", "to": "<cell>", "count": n} or {"slots": [..], "to": "<cell>"}"#;
    let b = body.value;
    let Some(to) = b.to else {
        return Err(AppError::BadRequest(format!(
            "request body: missing field `to`; {SHAPES}"
        )));
    };
    let mutation = match (b.from, b.count, b.slots) {
        (Some(from), Some(count), None) => Mutation::MoveSlots { from, to, count },
        (None, None, Some(slots)) => Mutation::MoveSlotList { slots, to },
        (Some(_), None, None) => {
            return Err(AppError::BadRequest(format!(
                "request body: missing field `count`; {SHAPES}"
            )))
        }
        (None, Some(_), None) => {
            return Err(AppError::BadRequest(format!(
                "request body: missing field `from`; {SHAPES}"
            )))
        }
        _ => return Err(AppError::BadRequest(format!("request body: {SHAPES}"))),
    };
    run_mutation(&s, actor, q, mutation, body.raw).await
}

pub(super) async fn rebalance(
    State(s): State<Arc<Shared>>,
    Extension(actor): Extension<Actor>,
    q: Params,
    body: axum::body::Bytes,
) -> Result<Json<Value>, AppError> {
    let text = String::from_utf8_lossy(&body);
    let t = text.trim();
    if !(t.is_empty() || t == "{}") {
        return Err(AppError::BadRequest(
            "rebalance takes no request body (or {})".into(),
        ));
    }
    run_mutation(&s, actor, q, Mutation::Rebalance, Value::Null).await
}

pub(super) async fn explain(
    State(s): State<Arc<Shared>>,
    q: Params,
) -> Result<Json<Value>, AppError> {
    let p = params(q, &["key", "region", "gray"])?;
    let key = p
        .get("key")
        .filter(|k| !k.is_empty())
        .ok_or_else(|| AppError::BadRequest("query parameter key is required".into()))?;
    let t = s.table.load_full();
    if let Some(r) = p.get("region") {
        if t.region_idx(r).is_none() {
            return Err(AppError::BadRequest(format!(
                "region: unknown region {r:?} (known: {})",
                t.regions()
                    .iter()
                    .map(|r| r.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    let now = cellgate_health::now_ms();
    let e = t
        .explain(key, now)
        .map_err(|e| AppError::BadRequest(format!("key: {e}")))?;
    let mut v = serde_json::to_value(&e).map_err(|e| AppError::Internal(e.to_string()))?;
    let desired = s.control.desired();
    let home = desired.config.cells.iter().find(|c| c.id == e.home_cell);
    let Some(o) = v.as_object_mut() else {
        return Err(AppError::Internal("explain is not an object".into()));
    };
    if let Some(to) = home.and_then(|c| c.switched_to.as_ref()) {
        let reason = format!(
            "{}; {} was switched to {to} by an admin, so {to} is tried first",
            e.reason, e.home_cell
        );
        o.insert("reason".into(), json!(reason));
        o.insert("switch".into(), json!({"cell": e.home_cell, "to": to}));
    }
    if let Some(r) = p.get("region") {
        o.insert("region".into(), json!(r));
    }
    let tag = p.get("gray").cloned().or(e.gray_tag.clone());
    if let Some(tag) = &tag {
        o.insert("gray_tag".into(), json!(tag));
    }
    if let Some(ci) = t.cell_idx(&e.cell).and_then(|i| t.cell(i)) {
        // As the data path picks: the instances matching the request's tag (untagged ones
        // for an untagged request); when none of them can take it, any of the cell's.
        let usable = |i: &&cellgate_routing::Instance| {
            i.weight > 0 && i.health.is_available(now, t.health_policy())
        };
        let matching: Vec<&str> = ci
            .instances
            .iter()
            .filter(usable)
            .filter(|i| i.gray.as_deref() == tag.as_deref())
            .map(|i| &*i.name)
            .collect();
        let fallback = matching.is_empty();
        let pick: Vec<&str> = if fallback {
            ci.instances
                .iter()
                .filter(usable)
                .map(|i| &*i.name)
                .collect()
        } else {
            matching
        };
        o.insert("instances".into(), json!(pick));
        o.insert(
            "instances_fallback".into(),
            json!(fallback && !pick.is_empty()),
        );
    }
    Ok(Json(v))
}

pub(super) async fn table(
    State(s): State<Arc<Shared>>,
    q: Params,
) -> Result<Json<Value>, AppError> {
    params(q, &[])?;
    let t = s.table.load_full();
    let d = s.control.desired();
    let status = s.control.status();
    let per = t.slots_per_cell();
    let mut slots_per_cell = serde_json::Map::new();
    for (c, n) in t.cells().iter().zip(&per) {
        slots_per_cell.insert(c.id.to_string(), json!(n));
    }
    let owners: Vec<usize> = t.slots().iter().map(|&c| usize::from(c)).collect();
    let ranges: serde_json::Map<String, Value> = slot_assignments(&d.config.cells, &owners)
        .into_iter()
        .map(|a| (a.cell, json!(a.ranges)))
        .collect();
    // What serves: a cell's state in the table (health may have failed it over) beside the
    // configured one, and a gray rule's `enabled` as the table has it (its guard may have
    // switched it off).
    let cells: Vec<Value> = d
        .config
        .cells
        .iter()
        .map(|c| {
            let state = t
                .cell_idx(&c.id)
                .and_then(|i| t.cell(i))
                .map_or(c.state.as_str(), |tc| tc.state.as_str());
            json!({
                "id": c.id, "region": c.region, "state": state,
                "configured_state": c.state.as_str(), "weight": c.weight,
                "failover": c.failover, "switched_to": c.switched_to,
            })
        })
        .collect();
    let gray: Vec<Value> = d
        .config
        .gray
        .iter()
        .map(|g| {
            let mut v = serde_json::to_value(g).unwrap_or(Value::Null);
            if let (Some(o), Some(r)) = (
                v.as_object_mut(),
                t.gray_rules().iter().find(|r| *r.name == *g.name),
            ) {
                o.insert("enabled".into(), json!(r.enabled));
            }
            v
        })
        .collect();
    let overrides: BTreeMap<&str, &str> = t
        .overrides()
        .iter()
        .filter_map(|(k, c)| Some((k, &*t.cell(c)?.id)))
        .collect();
    Ok(Json(json!({
        "version": t.version(),
        // The name every other answer uses for it.
        "table_version": t.version(),
        "source": d.source,
        "slot_count": t.slot_count(),
        "slots_version": d.slots_version,
        "slots_per_cell": slots_per_cell,
        "slot_ranges": ranges,
        "cells": cells,
        "overrides": overrides,
        "gray": gray,
        "store": &*status,
        "rejected": status.rejected,
    })))
}

pub(super) async fn audit(
    State(s): State<Arc<Shared>>,
    q: Params,
) -> Result<Json<Value>, AppError> {
    let p = params(q, &["limit"])?;
    let limit = match p.get("limit") {
        None => 50,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| {
                AppError::BadRequest(format!("limit: {l:?} is not a number from 1 to 1000"))
            })?,
    };
    let events = s.control.audit.recent(limit).await?;
    Ok(Json(json!({"events": events})))
}

/// The dashboard: one static page (it asks for the token and calls this API).
pub(super) async fn ui() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("../../assets/ui.html"),
    )
}

/// Prometheus text exposition.
pub(super) async fn metrics(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(&s),
    )
}

pub(super) async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], super::OPENAPI)
}

pub(super) async fn fleet(
    State(s): State<Arc<Shared>>,
    q: Params,
) -> Result<Json<Value>, AppError> {
    params(q, &[])?;
    let me = control::registration(&s);
    let id = s.control.gateway_id.clone();
    let Some(store) = s.control.store() else {
        return Ok(Json(json!({"self": id, "gateways": [me]})));
    };
    match store.gateways().await {
        Ok(mut list) => {
            if !list.iter().any(|g| g["id"] == json!(id)) {
                list.push(me);
            }
            list.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
            Ok(Json(json!({"self": id, "gateways": list})))
        }
        Err(e) => Ok(Json(json!({
            "self": id,
            "gateways": [me],
            "error": format!("fleet unavailable: {e}"),
        }))),
    }
}
