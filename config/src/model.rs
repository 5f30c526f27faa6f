//! The configuration file's typed model (serde). Unknown fields are errors, so a typo is
//! reported instead of silently ignored. Defaults are documented on each field.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A whole configuration file.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listeners.
    #[serde(default)]
    pub listen: Listen,
    /// Admin API.
    #[serde(default)]
    pub admin: Admin,
    /// Worker threads; 0 (default) means one per core.
    #[serde(default)]
    pub workers: usize,
    /// Routing settings.
    #[serde(default)]
    pub routing: Routing,
    /// Request deadlines.
    #[serde(default)]
    pub timeouts: TimeoutsCfg,
    /// Routes by path prefix: their own deadlines (fixed or adaptive) and SLO class.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteCfg>,
    /// Region names.
    pub regions: Vec<String>,
    /// Cells.
    pub cells: Vec<CellCfg>,
    /// Slot table: which slot ranges each cell owns. Empty: contiguous equal ranges in cell
    /// order (bootstrap only; write it down before adding cells, so no slot moves).
    #[serde(default)]
    pub slots: Vec<SlotAssign>,
    /// Key → cell pins.
    #[serde(default)]
    pub overrides: BTreeMap<String, String>,
    /// Gray rules.
    #[serde(default)]
    pub gray: Vec<GrayCfg>,
    /// Request and connection limits (safe defaults; see [`Limits`]).
    #[serde(default)]
    pub limits: Limits,
    /// Graceful shutdown and binary upgrade.
    #[serde(default)]
    pub shutdown: ShutdownCfg,
    /// Health: probes, outlier ejection, breakers, failover, weights, retries.
    #[serde(default)]
    pub health: crate::health::HealthCfg,
    /// Load shedding by SLO class.
    #[serde(default)]
    pub shedding: crate::health::SheddingCfg,
    /// Traces and logs.
    #[serde(default)]
    pub telemetry: TelemetryCfg,
    /// The etcd configuration store (off unless given; `--etcd` also switches it on). With
    /// etcd, the routing part of this file (regions, routing, timeouts, cells, slots,
    /// overrides, gray) is only the fallback for an empty store; etcd is the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd: Option<EtcdCfg>,
}

/// The etcd configuration store (SPEC §6).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EtcdCfg {
    /// Client URLs, e.g. `http://127.0.0.1:2379` (several for a cluster).
    pub endpoints: Vec<String>,
    /// Key prefix (default `/cellgate/`).
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// This gateway's id under `gateways/<id>` (default: host name and proxy port).
    #[serde(default)]
    pub gateway_id: Option<String>,
}

/// Default etcd key prefix.
pub fn default_prefix() -> String {
    "/cellgate/".into()
}

/// `telemetry:` — OpenTelemetry export. Read at start; changing it needs a restart.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TelemetryCfg {
    /// OTLP/HTTP traces endpoint, e.g. `http://127.0.0.1:4318/v1/traces` (off when unset).
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// `service.name` of exported spans (default `cellgate`).
    #[serde(default = "default_service")]
    pub service_name: String,
}

impl Default for TelemetryCfg {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: default_service(),
        }
    }
}

fn default_service() -> String {
    "cellgate".into()
}

/// Listeners.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// Plain HTTP/1.1 + h2c listener (default `0.0.0.0:8080`).
    #[serde(default = "default_http")]
    pub http: String,
    /// TLS listener (HTTP/2 and HTTP/1.1 by ALPN), off unless given.
    #[serde(default)]
    pub tls: Option<TlsCfg>,
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            http: default_http(),
            tls: None,
        }
    }
}

fn default_http() -> String {
    "0.0.0.0:8080".into()
}

/// TLS listener.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsCfg {
    /// Address (default `0.0.0.0:8443`).
    #[serde(default = "default_tls")]
    pub listen: String,
    /// PEM certificate chain file.
    pub cert: String,
    /// PEM private key file.
    pub key: String,
}

fn default_tls() -> String {
    "0.0.0.0:8443".into()
}

/// Admin API.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Address (default `127.0.0.1:9901`).
    #[serde(default = "default_admin")]
    pub listen: String,
    /// Bearer token (audit actor `admin`); `CELLGATE_ADMIN_TOKEN` overrides it.
    #[serde(default)]
    pub token: Option<String>,
    /// TLS for the admin API, with client certificates required (mTLS); off unless given.
    #[serde(default)]
    pub tls: Option<AdminTlsCfg>,
    /// More bearer tokens by name (`name: token`); the name is the actor in the audit log.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tokens: BTreeMap<String, String>,
    /// Largest share of the key space (0–1) one mutation may move to another cell unless it
    /// says `force=true` (default 0.5).
    #[serde(default = "default_max_move_share")]
    pub max_move_share: f64,
    /// Directory for local control-plane state: the admin overlay, the local audit log and
    /// the last known good table. Default: `<config file>.state` next to the file; without a
    /// file, a directory under the system temp dir named after the process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<String>,
    /// The local audit log (JSON lines), used when etcd is not configured. Default
    /// `<state_dir>/audit.jsonl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_file: Option<String>,
}

impl Default for Admin {
    fn default() -> Self {
        Self {
            listen: default_admin(),
            token: None,
            tls: None,
            tokens: BTreeMap::new(),
            max_move_share: default_max_move_share(),
            state_dir: None,
            audit_file: None,
        }
    }
}

/// Admin API TLS: the server's certificate and the CA that client certificates must chain
/// to.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminTlsCfg {
    /// PEM certificate chain file.
    pub cert: String,
    /// PEM private key file.
    pub key: String,
    /// PEM file of the CA certificate(s) that sign admin client certificates.
    pub client_ca: String,
    /// Which clients must present a certificate.
    #[serde(default)]
    pub client_cert: ClientCertCfg,
}

/// `admin.tls.client_cert`.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ClientCertCfg {
    /// Every client, at the handshake.
    #[default]
    Required,
    /// Only calls to `/admin/*`: `/healthz`, `/readyz`, `/metrics` and `/ui` are served to
    /// clients without one (load-balancer and kubelet probes, scrapers that cannot present
    /// one). A certificate that is presented must still chain to `client_ca`.
    AdminOnly,
}

fn default_max_move_share() -> f64 {
    0.5
}

fn default_admin() -> String {
    "127.0.0.1:9901".into()
}

/// Routing settings.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Routing {
    /// Number of slots (default 16384). Never change it after bootstrap.
    #[serde(default = "default_slot_count")]
    pub slot_count: u32,
    /// Ordered key sources (default: header `X-User-ID`), each a one-entry map such as
    /// `header: X-User-ID`, `cookie: uid`, `query: uid`, `path_segment: 1`, `jwt: {...}`.
    #[serde(
        default = "default_sources",
        with = "serde_yaml::with::singleton_map_recursive"
    )]
    pub key_sources: Vec<KeySourceCfg>,
    /// Keyless requests.
    #[serde(default)]
    pub anonymous: AnonymousCfg,
    /// Client CIDR → region, for keyless requests.
    #[serde(default)]
    pub region_cidrs: BTreeMap<String, String>,
    /// Clients allowed to force `X-Cell-ID` and send `X-Gray-Tag` (default: none).
    #[serde(default)]
    pub trusted_cidrs: Vec<String>,
    /// What a client's own `X-Forwarded-For` becomes upstream: `append` (default, as nginx
    /// and HAProxy do: the client's address is added after it) or `replace` (for a client
    /// outside `trusted_cidrs`, only its address is sent, so it cannot pose as another).
    #[serde(default)]
    pub forwarded_for: ForwardedForCfg,
}

/// `routing.forwarded_for`.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ForwardedForCfg {
    /// Append the client's address to the `X-Forwarded-For` it sent.
    #[default]
    Append,
    /// Untrusted clients: replace it by the client's address.
    Replace,
}

impl Default for Routing {
    fn default() -> Self {
        Self {
            slot_count: default_slot_count(),
            key_sources: default_sources(),
            anonymous: AnonymousCfg::default(),
            region_cidrs: BTreeMap::new(),
            trusted_cidrs: Vec::new(),
            forwarded_for: ForwardedForCfg::default(),
        }
    }
}

fn default_slot_count() -> u32 {
    cellgate_routing::DEFAULT_SLOT_COUNT
}

fn default_sources() -> Vec<KeySourceCfg> {
    vec![KeySourceCfg::Header("X-User-ID".into())]
}

/// One key source.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum KeySourceCfg {
    /// A header.
    Header(String),
    /// A cookie.
    Cookie(String),
    /// A query parameter.
    Query(String),
    /// The n-th (0-based) non-empty path segment.
    PathSegment(usize),
    /// A JWT claim.
    Jwt(JwtCfg),
}

/// JWT key source.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JwtCfg {
    /// Header with the token (default `Authorization`; a `Bearer ` prefix is accepted).
    #[serde(default = "default_jwt_header")]
    pub header: String,
    /// Claim (default `sub`).
    #[serde(default = "default_claim")]
    pub claim: String,
    /// HS256 shared secret: verify signatures with it.
    #[serde(default)]
    pub hs256_secret: Option<String>,
    /// RS256 public key (PEM file path): verify signatures with it.
    #[serde(default)]
    pub rs256_public_key_file: Option<String>,
}

fn default_jwt_header() -> String {
    "Authorization".into()
}

fn default_claim() -> String {
    "sub".into()
}

/// Keyless requests.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct AnonymousCfg {
    /// `region` (default): best serving cell of the request's region; `reject`: 400.
    #[serde(default)]
    pub policy: AnonymousPolicyCfg,
    /// Region used when neither `X-Region-Hint` nor the client CIDR map names one.
    #[serde(default)]
    pub default_region: Option<String>,
}

/// Keyless policy.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum AnonymousPolicyCfg {
    /// Route by region.
    #[default]
    Region,
    /// Answer 400.
    Reject,
}

/// Deadlines, as durations like `250ms`, `2s`, `1m`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsCfg {
    /// Default deadline (default `15s`).
    #[serde(default = "default_timeout")]
    pub default: String,
    /// Cap on what `X-Timeout`/`grpc-timeout` may ask (default `60s`).
    #[serde(default = "default_max")]
    pub max: String,
    /// Upstream connect timeout (default `1s`).
    #[serde(default = "default_connect")]
    pub connect: String,
}

/// A route: requests whose path is `path_prefix` or below it (`/api/pay` matches
/// `/api/pay` and `/api/pay/...`, not `/api/payments`); the longest prefix wins.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteCfg {
    /// Path prefix, starting with `/`.
    pub path_prefix: String,
    /// Default deadline (default `timeouts.default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Longest deadline `X-Timeout`/`grpc-timeout` may ask for (default `timeouts.max`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_timeout: Option<String>,
    /// Adaptive default deadline: clamp(p95 × factor, min, max) of the route's answers over
    /// the last 10 s (until there are some, `timeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive_timeout: Option<AdaptiveTimeoutCfg>,
    /// SLO class of its requests that send no `X-SLO-Class`: `critical`, `standard`,
    /// `best-effort`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slo_class: Option<cellgate_routing::SloClass>,
}

/// `routes[].adaptive_timeout`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveTimeoutCfg {
    /// Multiple of the p95 (above 0, at most 100).
    pub factor: f64,
    /// Shortest deadline.
    pub min: String,
    /// Longest deadline (at most the route's `max_timeout`).
    pub max: String,
}

impl Default for TimeoutsCfg {
    fn default() -> Self {
        Self {
            default: default_timeout(),
            max: default_max(),
            connect: default_connect(),
        }
    }
}

fn default_timeout() -> String {
    "15s".into()
}
fn default_max() -> String {
    "60s".into()
}
fn default_connect() -> String {
    "1s".into()
}

/// A cell.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CellCfg {
    /// Id: letters, digits, `.`, `_`, `-`.
    pub id: String,
    /// Region (one of `regions`).
    pub region: String,
    /// State (default `active`).
    #[serde(default)]
    pub state: cellgate_routing::CellState,
    /// Base weight (default 100).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Ordered failover targets.
    #[serde(default)]
    pub failover: Vec<String>,
    /// Set by an admin switch (`POST /admin/cells/{id}/switch`): the cell whose traffic this
    /// cell's keys go to. It is tried before `failover` while the cell is not active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switched_to: Option<String>,
    /// Upstream protocol: `auto` (default; HTTP/1.1, gRPC over h2c), `http1`, `h2c`.
    #[serde(default)]
    pub protocol: cellgate_routing::UpstreamProtocol,
    /// Instance selection: `round_robin` (default; smooth WRR over the dynamic weights) or
    /// `key_affinity` (consistent hashing of the routing key over the instances).
    #[serde(default, skip_serializing_if = "is_round_robin")]
    pub balance: cellgate_routing::Balance,
    /// Instances.
    pub instances: Vec<InstanceCfg>,
    /// TLS to this cell's instances; plaintext unless given.
    #[serde(default)]
    pub tls: Option<UpstreamTlsCfg>,
}

/// TLS from the gateway to a cell's instances (TLS 1.2/1.3, ALPN `h2` for gRPC and h2c
/// cells, `http/1.1` otherwise).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsCfg {
    /// PEM file of the CA certificate(s) that instance certificates must chain to. Required
    /// unless `insecure_skip_verify` is set.
    #[serde(default)]
    pub ca_file: Option<String>,
    /// Name checked against the instance certificates (SNI); default: the host of each
    /// instance's `addr`.
    #[serde(default)]
    pub server_name: Option<String>,
    /// Accept any certificate (testing only; logged as a warning at load).
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

fn default_weight() -> u32 {
    100
}

fn is_round_robin(b: &cellgate_routing::Balance) -> bool {
    *b == cellgate_routing::Balance::RoundRobin
}

/// An instance.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InstanceCfg {
    /// Name, unique in the cell.
    pub name: String,
    /// `host:port`.
    pub addr: String,
    /// Weight (default 100).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Labels, e.g. `gray: canary`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Slots owned by a cell.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SlotAssign {
    /// Cell id.
    pub cell: String,
    /// Inclusive ranges like `0-5461`, or single slots like `17`.
    pub ranges: Vec<String>,
}

/// A gray rule.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GrayCfg {
    /// Rule name.
    pub name: String,
    /// Tag given to matching requests.
    pub tag: String,
    /// Switched on (default true).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Keys always in.
    #[serde(default)]
    pub keys: Vec<String>,
    /// Stable share of keys, 0–100.
    #[serde(default)]
    pub percent: Option<f64>,
    /// Only in these regions.
    #[serde(default)]
    pub regions: Vec<String>,
    /// Only when this header has this value.
    #[serde(default)]
    pub header: Option<HeaderMatch>,
    /// Switch the rule off automatically when its tagged instances do worse than the
    /// untagged ones of the same cells (over the instance window, `health.outlier.window`).
    #[serde(default)]
    pub guard: Option<GuardCfg>,
}

/// A canary guard.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GuardCfg {
    /// Error ratio of tagged minus untagged above which the rule is switched off (default 0.02).
    #[serde(default = "default_error_delta")]
    pub max_error_delta: f64,
    /// p95 latency of tagged minus untagged, in ms, above which the rule is switched off.
    #[serde(default)]
    pub max_p95_delta_ms: Option<u64>,
    /// Requests to the tagged instances in the window before the guard judges (default 50).
    #[serde(default = "default_guard_min")]
    pub min_requests: u64,
}

fn default_error_delta() -> f64 {
    0.02
}

fn default_guard_min() -> u64 {
    50
}

fn default_true() -> bool {
    true
}

/// Header condition.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    /// Header name.
    pub name: String,
    /// Exact value.
    pub value: String,
}

/// Request and connection limits. Every field has a safe default; what a client sees past
/// each limit is documented on the field.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Bytes of request line plus headers (default 32768). HTTP/1: past it hyper answers
    /// `431` and closes the connection. HTTP/2: the `SETTINGS_MAX_HEADER_LIST_SIZE` the
    /// gateway announces; a larger header block gets `431` from the HTTP/2 codec.
    pub max_header_bytes: usize,
    /// Number of request headers (default 100). HTTP/1: past it hyper answers `431` and
    /// closes the connection; HTTP/2: JSON `431`.
    pub max_headers: usize,
    /// Bytes of the request target (path and query; default 8192). Past it: JSON `414`.
    pub max_uri_bytes: usize,
    /// Bytes of request body (default 10485760 = 10 MiB; 0 = no limit). A larger
    /// `Content-Length` is answered with JSON `413` before any upstream is contacted; a
    /// streamed body is counted as it flows and the upstream request is aborted at the
    /// limit, answered `413` when no response has started.
    pub max_body_bytes: u64,
    /// Time a client has to send a complete request head, from its first byte (or from the
    /// connection's start for the first request; default `10s`). Past it the connection is
    /// closed without an answer (slow-loris defence). Also bounds the TLS handshake.
    pub header_read_timeout: String,
    /// A connection with no request in flight and nothing received for this long is closed
    /// (HTTP/2: with GOAWAY; default `60s`). Also how long a client may take none of an
    /// answer in flight (it stopped reading) before its connection is cut.
    pub idle_timeout: String,
    /// Client connections this gateway process holds at once (default 10000). Past it a
    /// new plaintext connection gets a `503` JSON answer and is closed; a new TLS
    /// connection is closed.
    pub max_connections: usize,
    /// HTTP/2 streams a client may have open at once on one connection (default 256).
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2 initial stream flow-control window in bytes (default 1048576).
    pub h2_stream_window: u32,
    /// HTTP/2 initial connection flow-control window in bytes (default 2097152).
    pub h2_connection_window: u32,
    /// Streams a client may open and reset before the gateway has accepted them; past it
    /// the connection is closed with GOAWAY `ENHANCE_YOUR_CALM` (HTTP/2 rapid-reset
    /// defence; default 20).
    pub h2_max_pending_accept_reset_streams: usize,
    /// Streams the gateway may reset because of client protocol errors before it closes the
    /// connection with GOAWAY (default 1024).
    pub h2_max_local_error_reset_streams: usize,
    /// Idle HTTP/1.1 connections each worker keeps open to one upstream instance for reuse
    /// (default 64, like nginx's `keepalive`; 0 = none, every request opens a connection).
    /// Past it a connection is closed when its response ends, so more requests than this in
    /// flight at once to one instance from one worker (an HTTP/2 client's streams fanned out
    /// to HTTP/1.1 upstreams) open and close connections at that rate, each leaving a socket
    /// in TIME_WAIT. Each idle connection holds ~44 KiB. Read at start.
    pub upstream_idle_per_instance: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 32 * 1024,
            max_headers: 100,
            max_uri_bytes: 8 * 1024,
            max_body_bytes: 10 * 1024 * 1024,
            header_read_timeout: "10s".into(),
            idle_timeout: "60s".into(),
            max_connections: 10_000,
            h2_max_concurrent_streams: 256,
            h2_stream_window: 1024 * 1024,
            h2_connection_window: 2 * 1024 * 1024,
            h2_max_pending_accept_reset_streams: 20,
            h2_max_local_error_reset_streams: 1024,
            upstream_idle_per_instance: 64,
        }
    }
}

/// Graceful shutdown (SIGTERM) and binary upgrade (SIGUSR2).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownCfg {
    /// How long in-flight requests may take to finish after SIGTERM (or after a new
    /// process took over the listeners) before the process exits anyway (default `30s`).
    pub grace: String,
}

impl Default for ShutdownCfg {
    fn default() -> Self {
        Self {
            grace: "30s".into(),
        }
    }
}
