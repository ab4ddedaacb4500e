//! `--metrics-listen`: Prometheus metrics (`GET /metrics`) and the status page (`GET /`, with
//! `/status.json`, `/status.js`, `/status.css`) on HTTP/1.1 with hyper 1, as the broker's API.
//! Off unless configured; loopback only unless `metrics_allow_non_loopback` is set. Read-only,
//! no authentication (see SECURITY.md). It runs on its own thread and runtime, so a scrape never
//! waits for a signature and a signature never waits for a scrape.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Semaphore;

use crate::observe::Observer;

/// Simultaneous connections; more wait in the kernel's accept queue.
pub const MAX_CONNECTIONS: usize = 16;
/// A client must send its request headers within this time.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

const PAGE: &str = include_str!("status/index.html");
const SCRIPT: &str = include_str!("status/status.js");
const STYLE: &str = include_str!("status/status.css");

/// Binds `addr` now (so a bad address is a start-up error) and serves in a background thread
/// for the life of the process. Returns the bound address.
pub fn start(addr: SocketAddr, allow_non_loopback: bool, obs: Arc<Observer>) -> Result<SocketAddr> {
    if !addr.ip().is_loopback() && !allow_non_loopback {
        bail!(
            "metrics listen address {addr} is not a loopback address: use 127.0.0.1/::1, or set \
             metrics_allow_non_loopback (--metrics-allow-non-loopback) to serve it on the network"
        );
    }
    let listener = std::net::TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr} for metrics"))?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    if !local.ip().is_loopback() {
        tracing::warn!(listen = %local, "metrics and status page on a non-loopback address (explicitly allowed): anyone who reaches it can read them");
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new().name("metrics".into()).spawn(move || {
        rt.block_on(async move {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => serve(l, obs).await,
                Err(e) => tracing::error!(error = %e, "metrics listener unusable"),
            }
        })
    })?;
    tracing::info!(listen = %local, "metrics on http://{local}/metrics, status page on http://{local}/");
    Ok(local)
}

async fn serve(listener: tokio::net::TcpListener, obs: Arc<Observer>) {
    let conns = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = conns.clone().acquire_owned().await else { return };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::debug!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let obs = obs.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req| {
                let obs = obs.clone();
                async move { Ok::<_, Infallible>(handle(&obs, req)) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(READ_TIMEOUT)
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
}

fn response(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"),
    );
    r
}

fn handle(obs: &Observer, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = response(StatusCode::METHOD_NOT_ALLOWED, "text/plain; charset=utf-8", "method not allowed\n");
        r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/metrics" => {
            response(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", obs.encode())
        }
        "/" | "/index.html" => response(StatusCode::OK, "text/html; charset=utf-8", PAGE),
        "/status.js" => response(StatusCode::OK, "text/javascript; charset=utf-8", SCRIPT),
        "/status.css" => response(StatusCode::OK, "text/css; charset=utf-8", STYLE),
        "/status.json" => match serde_json::to_vec(&obs.snapshot()) {
            Ok(v) => response(StatusCode::OK, "application/json", v),
            Err(_) => response(StatusCode::INTERNAL_SERVER_ERROR, "text/plain; charset=utf-8", "internal error\n"),
        },
        _ => response(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", "not found\n"),
    }
}
