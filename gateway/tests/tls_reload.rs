//! TLS against the real binary: a certificate replaced on disk serves new connections
//! without a restart and without a failed request (a bad replacement is refused and the
//! previous one keeps serving); upstream TLS per cell (CA and name verified, or
//! `insecure_skip_verify`); the admin API's mTLS server configuration, and the admin
//! listener of the real binary serving only clients with a certificate from `client_ca`
//! (or, under `client_cert: admin_only`, its probes to anyone), its certificate reloaded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::tls::{self, ca, leaf, provider, self_signed, Pem};
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::CertificateDer;
use tokio::net::TcpStream;

fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn client_trusting(certs: &[&CertificateDer<'static>]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs {
        roots.add((*c).clone()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Full handshakes only: a resumed session presents no certificate.
    cfg.resumption = rustls::client::Resumption::disabled();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// One request on a new TLS connection; the certificate the gateway presented.
async fn tls_get(
    addr: SocketAddr,
    connector: &tokio_rustls::TlsConnector,
) -> Result<CertificateDer<'static>, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let tls = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let cert = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::get("/tls")
        .header("host", "localhost")
        .header("x-user-id", "alice")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = tx.send_request(req).await.map_err(|e| e.to_string())?;
    if res.status() != 200 {
        return Err(format!("status {}", res.status()));
    }
    res.into_body().collect().await.map_err(|e| e.to_string())?;
    Ok(cert)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_replaced_on_disk_serves_new_connections_without_a_failed_request() {
    let a = self_signed("localhost");
    let b = self_signed("localhost");
    let dir = TempDir::new("certreload");
    let (cert_path, key_path) = (dir.path("cert.pem"), dir.path("key.pem"));
    std::fs::write(&cert_path, &a.cert).unwrap();
    std::fs::write(&key_path, &a.key).unwrap();
    let up = upstream("a", "a-1");
    let yaml = config_yaml(
        &[cell("a", "r1", &[], &[("a-1", up.addr)])],
        &format!(
            "listen:\n  http: 127.0.0.1:0\n  tls: {{ listen: \"127.0.0.1:0\", cert: {}, key: {} }}\n",
            cert_path.display(),
            key_path.display()
        ),
    );
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let tls_addr = gw.tls_addr.expect("TLS listener");
    let connector = client_trusting(&[&a.der, &b.der]);
    assert_eq!(tls_get(tls_addr, &connector).await.unwrap(), a.der);

    // Clients keep opening connections while the files change.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen_b = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let (stop, ok, failures, seen_b, connector, bder) = (
            Arc::clone(&stop),
            Arc::clone(&ok),
            Arc::clone(&failures),
            Arc::clone(&seen_b),
            connector.clone(),
            b.der.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let end = Instant::now() + Duration::from_secs(30);
            while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                match tls_get(tls_addr, &connector).await {
                    Ok(c) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        if c == bder {
                            seen_b.store(true, Ordering::Relaxed);
                        }
                    }
                    Err(e) => failures.lock().unwrap().push(e),
                }
            }
        }));
    }
    // An established connection keeps working across the swap.
    let tcp = TcpStream::connect(tls_addr).await.unwrap();
    let tls = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let (mut kept, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);

    write_atomic(&cert_path, &b.cert);
    write_atomic(&key_path, &b.key);
    let t = Instant::now();
    while !seen_b.load(Ordering::Relaxed) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "new certificate never served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        gw.wait_log("TLS certificate reloaded", Duration::from_secs(5))
            .await
    );
    let req = Request::get("/kept")
        .header("host", "localhost")
        .header("x-user-id", "alice")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(kept.send_request(req).await.unwrap().status(), 200);

    // A bad replacement is refused; B keeps serving.
    write_atomic(&cert_path, "not a certificate");
    assert!(
        gw.wait_log("TLS certificate rejected", Duration::from_secs(5))
            .await
    );
    let before = ok.load(Ordering::Relaxed);
    let t = Instant::now();
    while ok.load(Ordering::Relaxed) < before + 20 {
        assert!(t.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(tls_get(tls_addr, &connector).await.unwrap(), b.der);

    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let failures = failures.lock().unwrap();
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert!(ok.load(Ordering::Relaxed) > 40);
}

/// A TLS terminator in front of a plaintext demo upstream (the cell's instance).
async fn tls_upstream(cert: &Pem, plain: SocketAddr) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let acceptor = tls::acceptor(cert, &[b"http/1.1"]);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { break };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(s).await {
                    if let Ok(mut back) = TcpStream::connect(plain).await {
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut back).await;
                    }
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_per_cell_verifies_the_ca_and_the_name() {
    let up = upstream("a", "a-1");
    let authority = ca("cellgate test CA");
    let cert = leaf(&authority, "upstream.test");
    let (tls_addr, _t) = tls_upstream(&cert, up.addr).await;
    let dir = TempDir::new("uptls");
    std::fs::write(dir.path("ca.pem"), &authority.pem).unwrap();
    let ca_path = dir.path("ca.pem").display().to_string();

    let run = |tls: String| {
        let yaml = format!(
            "regions: [r1]\ncells:\n  - id: a\n    region: r1\n    tls: {tls}\n    instances: [ {{ name: a-1, addr: \"{tls_addr}\" }} ]\n"
        );
        std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
        Gateway::start(&dir.path("c.yaml"))
    };

    // Verified against the cell's CA and name.
    let gw = run(format!(
        "{{ ca_file: {ca_path}, server_name: upstream.test }}"
    ));
    let r = get(gw.addr, "/secure-upstream", &[("x-user-id", "alice")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["cell"], "a");
    assert_eq!(r.json()["path"], "/secure-upstream");
    drop(gw);

    // The wrong name is refused: 502, nothing sent in plaintext.
    let gw = run(format!("{{ ca_file: {ca_path}, server_name: other.test }}"));
    let r = get(gw.addr, "/", &[("x-user-id", "alice")]).await;
    assert_eq!(r.status, 502, "{:?}", r.body);
    drop(gw);

    // An instance configured by host name is verified against that name without a
    // server_name (a certificate for `localhost`, the instance at `localhost:<port>`).
    let local = leaf(&authority, "localhost");
    let (local_addr, _t2) = tls_upstream(&local, up.addr).await;
    let yaml = format!(
        "regions: [r1]\ncells:\n  - id: a\n    region: r1\n    tls: {{ ca_file: {ca_path} }}\n    instances: [ {{ name: a-1, addr: \"localhost:{}\" }} ]\n",
        local_addr.port()
    );
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let r = get(gw.addr, "/by-name", &[("x-user-id", "alice")]).await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    drop(gw);

    // insecure_skip_verify accepts it without a CA (testing only).
    let gw = run("{ insecure_skip_verify: true }".into());
    assert_eq!(
        get(gw.addr, "/", &[("x-user-id", "alice")]).await.status,
        200
    );
    assert!(gw.logs_contain("not verified"));
}

/// The certificates of `ca`, as trusted roots.
fn roots_of(ca: &tls::Ca) -> Arc<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut ca.pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    Arc::new(roots)
}

/// A TLS client trusting `roots`, presenting `identity` when given (mTLS), offering ALPN
/// `http/1.1` when `http1`.
fn admin_client(
    roots: &Arc<rustls::RootCertStore>,
    identity: Option<&Pem>,
    http1: bool,
) -> tokio_rustls::TlsConnector {
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(Arc::clone(roots));
    let mut cfg = match identity {
        None => b.with_no_client_auth(),
        Some(p) => {
            let key = rustls_pemfile::private_key(&mut p.key.as_bytes())
                .unwrap()
                .unwrap();
            b.with_client_auth_cert(vec![p.der.clone()], key).unwrap()
        }
    };
    if http1 {
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    }
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// Admin mTLS material in a fresh directory: `cert.pem`/`key.pem` (a `localhost` leaf of
/// the server CA) and `client_ca.pem`; returns (server CA, client CA, an unrelated CA, dir).
fn admin_mtls_files(tag: &str) -> (tls::Ca, tls::Ca, tls::Ca, TempDir) {
    let server_ca = ca("server CA");
    let client_ca = ca("admin clients CA");
    let other_ca = ca("someone else");
    let server = leaf(&server_ca, "localhost");
    let dir = TempDir::new(tag);
    std::fs::write(dir.path("cert.pem"), &server.cert).unwrap();
    std::fs::write(dir.path("key.pem"), &server.key).unwrap();
    std::fs::write(dir.path("client_ca.pem"), &client_ca.pem).unwrap();
    (server_ca, client_ca, other_ca, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_mtls_configuration_requires_a_client_certificate_from_its_ca() {
    let (server_ca, client_ca, other_ca, dir) = admin_mtls_files("mtls");
    let cfg = cellgate::tls::admin_server_config(
        dir.path("cert.pem").to_str().unwrap(),
        dir.path("key.pem").to_str().unwrap(),
        dir.path("client_ca.pem").to_str().unwrap(),
        false,
    )
    .unwrap()
    .0;
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { break };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(s).await {
                    use tokio::io::AsyncWriteExt;
                    let _ = tls.write_all(b"admin").await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });

    let roots = roots_of(&server_ca);
    let client = |identity: Option<&Pem>| admin_client(&roots, identity, false);
    let talk = |connector: tokio_rustls::TlsConnector| async move {
        use tokio::io::AsyncReadExt;
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut tls = connector
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        tls.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(buf)
    };

    let admin = leaf(&client_ca, "operator");
    assert_eq!(talk(client(Some(&admin))).await.unwrap(), b"admin");
    assert!(
        talk(client(None)).await.is_err(),
        "no client certificate accepted"
    );
    let stranger = leaf(&other_ca, "operator");
    assert!(
        talk(client(Some(&stranger))).await.is_err(),
        "a certificate from another CA accepted"
    );
}

/// One admin request on a new TLS connection: the status and body, or why it failed
/// (handshake, the server closing the connection after it, or the request itself).
async fn admin_tls_request(
    addr: SocketAddr,
    connector: &tokio_rustls::TlsConnector,
    method: http::Method,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, String), String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let tls = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let res = tx
        .send_request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .map_err(|e| e.to_string())?;
    let status = res.status().as_u16();
    let body = res.into_body().collect().await.map_err(|e| e.to_string())?;
    Ok((
        status,
        String::from_utf8_lossy(&body.to_bytes()).into_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_with_admin_tls_serves_only_clients_with_a_certificate_from_its_ca() {
    let (server_ca, client_ca, other_ca, dir) = admin_mtls_files("adminmtls");
    let up = upstream("a", "a-1");
    let yaml = config_yaml(
        &[cell("a", "r1", &[], &[("a-1", up.addr)])],
        &format!(
            "admin:\n  token: s3cret\n  tls: {{ cert: {}, key: {}, client_ca: {} }}\n",
            dir.path("cert.pem").display(),
            dir.path("key.pem").display(),
            dir.path("client_ca.pem").display()
        ),
    );
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let admin = gw.admin_addr.expect("admin listener");

    let client = |identity: Option<&Pem>| admin_client(&roots_of(&server_ca), identity, true);
    let operator = client(Some(&leaf(&client_ca, "operator")));
    let call = |c: tokio_rustls::TlsConnector, m: http::Method, path: &'static str, token| async move {
        admin_tls_request(admin, &c, m, path, token).await
    };

    // A client certificate from client_ca and the token: served.
    let (s, body) = call(
        operator.clone(),
        http::Method::GET,
        "/admin/cells",
        Some("s3cret"),
    )
    .await
    .unwrap();
    assert_eq!(s, 200, "{body}");
    assert!(body.contains("\"a\""), "{body}");

    // `cellgate ctl` reaches it with --ca, --cert and --key; without the client
    // certificate, or without --ca for an https address, it fails with a TLS error.
    let op = leaf(&client_ca, "operator");
    std::fs::write(dir.path("server_ca.pem"), &server_ca.pem).unwrap();
    std::fs::write(dir.path("op.pem"), &op.cert).unwrap();
    std::fs::write(dir.path("op.key"), &op.key).unwrap();
    let https = format!("https://localhost:{}", admin.port());
    let ctl = |extra: &[&str]| {
        let mut args = vec!["ctl", "--admin", https.as_str(), "--token", "s3cret"];
        args.extend_from_slice(extra);
        args.push("cells");
        std::process::Command::new(env!("CARGO_BIN_EXE_cellgate"))
            .args(&args)
            .env_remove("CELLGATE_ADMIN_TOKEN")
            .output()
            .unwrap()
    };
    let (ca_p, cert_p, key_p) = (
        dir.path("server_ca.pem"),
        dir.path("op.pem"),
        dir.path("op.key"),
    );
    let (ca_s, cert_s, key_s) = (
        ca_p.to_str().unwrap(),
        cert_p.to_str().unwrap(),
        key_p.to_str().unwrap(),
    );
    let out = ctl(&["--ca", ca_s, "--cert", cert_s, "--key", key_s]);
    assert!(
        out.status.success(),
        "ctl over mTLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `route --key <k>` is the routing key, not the client key given before it.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cellgate"))
        .args(["ctl", "--admin", https.as_str(), "--token", "s3cret"])
        .args(["--ca", ca_s, "--cert", cert_s, "--key", key_s])
        .args(["route", "--key", "alice"])
        .env_remove("CELLGATE_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ctl route over mTLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"alice\""));
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"a\""));
    let out = ctl(&["--ca", ca_s]);
    assert!(!out.status.success(), "no client certificate, yet served");
    let out = ctl(&[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--ca"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The certificate does not replace the token.
    let (s, _) = call(operator.clone(), http::Method::GET, "/admin/cells", None)
        .await
        .unwrap();
    assert_eq!(s, 401);
    let (s, _) = call(
        operator.clone(),
        http::Method::DELETE,
        "/admin/cells/a",
        None,
    )
    .await
    .unwrap();
    assert_eq!(s, 401, "a wrong method without the token");

    // Plain HTTP on the admin port gets no answer.
    let plain = async {
        let s = TcpStream::connect(admin).await.map_err(|e| e.to_string())?;
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = Request::get("/admin/cells")
            .header("host", "localhost")
            .header("authorization", "Bearer s3cret")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let res = tx.send_request(req).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(res.status().as_u16())
    };
    let r = tokio::time::timeout(Duration::from_secs(10), plain)
        .await
        .expect("plain HTTP request left hanging");
    assert!(r.is_err(), "plain HTTP answered: {r:?}");
    // TLS without a client certificate, or with one from another CA: refused.
    for (what, c) in [
        ("no client certificate", client(None)),
        (
            "another CA's certificate",
            client(Some(&leaf(&other_ca, "operator"))),
        ),
    ] {
        let r = call(c, http::Method::GET, "/admin/cells", Some("s3cret")).await;
        assert!(r.is_err(), "{what}: {r:?}");
    }
    assert!(
        gw.wait_log("admin TLS handshake failed", Duration::from_secs(5))
            .await
    );

    // The failed handshakes did not take the listener down.
    let (s, body) = call(operator, http::Method::GET, "/admin/table", Some("s3cret"))
        .await
        .unwrap();
    assert_eq!(s, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_only_client_certificates_leave_the_probes_open_and_keep_admin_closed() {
    let (server_ca, client_ca, other_ca, dir) = admin_mtls_files("adminonly");
    let up = upstream("a", "a-1");
    let yaml = config_yaml(
        &[cell("a", "r1", &[], &[("a-1", up.addr)])],
        &format!(
            "admin:\n  token: s3cret\n  tls: {{ cert: {}, key: {}, client_ca: {}, client_cert: admin_only }}\n",
            dir.path("cert.pem").display(),
            dir.path("key.pem").display(),
            dir.path("client_ca.pem").display()
        ),
    );
    std::fs::write(dir.path("c.yaml"), &yaml).unwrap();
    let gw = Gateway::start(&dir.path("c.yaml"));
    let admin = gw.admin_addr.expect("admin listener");
    let roots = roots_of(&server_ca);
    let client = |identity: Option<&Pem>| admin_client(&roots, identity, true);
    let anonymous = client(None);
    // No certificate: the probes and the metrics are served...
    for path in ["/healthz", "/readyz", "/metrics"] {
        let (s, body) = admin_tls_request(admin, &anonymous, http::Method::GET, path, None)
            .await
            .unwrap();
        assert_eq!(s, 200, "{path}: {body}");
    }
    // ...and /admin is not, token or not, with a message that says what is missing.
    let (s, body) = admin_tls_request(
        admin,
        &anonymous,
        http::Method::GET,
        "/admin/cells",
        Some("s3cret"),
    )
    .await
    .unwrap();
    assert_eq!(s, 401, "{body}");
    assert!(body.contains("client certificate"), "{body}");
    let (s, _) = admin_tls_request(
        admin,
        &anonymous,
        http::Method::POST,
        "/admin/cells/a/drain",
        Some("s3cret"),
    )
    .await
    .unwrap();
    assert_eq!(s, 401);
    // A certificate from client_ca and the token: served.
    let operator = client(Some(&leaf(&client_ca, "operator")));
    let (s, body) = admin_tls_request(
        admin,
        &operator,
        http::Method::GET,
        "/admin/cells",
        Some("s3cret"),
    )
    .await
    .unwrap();
    assert_eq!(s, 200, "{body}");
    // A certificate from another CA is still refused at the handshake.
    let stranger = client(Some(&leaf(&other_ca, "operator")));
    let r = admin_tls_request(admin, &stranger, http::Method::GET, "/healthz", None).await;
    assert!(r.is_err(), "another CA's certificate: {r:?}");

    // The admin certificate is reloaded like the proxy listener's: a renewed pair on disk
    // serves new connections without a restart.
    let presented = || {
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(Arc::clone(&roots))
            .with_no_client_auth();
        cfg.resumption = rustls::client::Resumption::disabled();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        async move {
            let tcp = TcpStream::connect(admin).await.unwrap();
            let tls = connector
                .connect("localhost".try_into().unwrap(), tcp)
                .await
                .unwrap();
            tls.get_ref().1.peer_certificates().unwrap()[0].clone()
        }
    };
    let first = presented().await;
    let renewed = leaf(&server_ca, "localhost");
    assert_ne!(first, renewed.der);
    write_atomic(&dir.path("cert.pem"), &renewed.cert);
    write_atomic(&dir.path("key.pem"), &renewed.key);
    let t = Instant::now();
    while presented().await != renewed.der {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the renewed admin certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        gw.wait_log("TLS certificate reloaded", Duration::from_secs(5))
            .await
    );
    let (s, _) = admin_tls_request(admin, &anonymous, http::Method::GET, "/healthz", None)
        .await
        .unwrap();
    assert_eq!(s, 200);
}
