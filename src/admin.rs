//! The admin listener: `GET /healthz`, `GET /metrics` (Prometheus text) and
//! `POST /purge?url=URL | prefix=URL | tag=TAG [&soft=1]`.
//!
//! Everything but `/healthz` requires `Authorization: Bearer TOKEN`; without
//! a configured token those endpoints always answer 401. The token can be
//! replaced while the listener runs ([`Admin::set_token`]), as a reload does.

use crate::proxy::body::{self, RequestBody, ResponseBody};
use crate::proxy::phases::Gateway;
use crate::proxy::{ConnInfo, Handler};
use arc_swap::ArcSwapOption;
use http::header::{ALLOW, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::{Arc, OnceLock};

static METRICS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder once per process; later calls are no-ops.
pub fn install_metrics() -> Option<&'static PrometheusHandle> {
    METRICS
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0,
                ])
                .ok()?;
            let handle = builder.install_recorder().ok()?;
            // Histograms buffer their samples until drained: without a
            // periodic upkeep they would grow by every request between
            // scrapes, or forever when nobody scrapes.
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("portico-metrics".into())
                .spawn(move || loop {
                    std::thread::sleep(std::time::Duration::from_secs(5));
                    upkeep.run_upkeep();
                })
                .ok()?;
            Some(handle)
        })
        .as_ref()
}

/// The admin API's handler.
pub struct Admin {
    gateway: Gateway,
    token: ArcSwapOption<String>,
    /// Set once shutdown begins: `/healthz` then answers 503, so that a load
    /// balancer stops sending clients to listeners that no longer accept.
    draining: std::sync::atomic::AtomicBool,
}

impl Admin {
    /// The admin API over `gateway`. Installs the metrics recorder, so that
    /// what happens from now on is counted for `/metrics`.
    pub fn new(gateway: Gateway, token: Option<String>) -> Admin {
        install_metrics();
        Admin {
            gateway,
            token: ArcSwapOption::from_pointee(token),
            draining: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// From now on `/healthz` answers 503 `draining`.
    pub fn set_draining(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Replaces the token requests must carry; `None` refuses them all.
    /// Requests from now on are checked against it.
    pub fn set_token(&self, token: Option<String>) {
        self.token.store(token.map(Arc::new));
    }

    fn authorized<B>(&self, req: &Request<B>) -> bool {
        let token = self.token.load();
        let Some(token) = token.as_deref() else {
            return false;
        };
        let Some(given) = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_credentials)
        else {
            return false;
        };
        constant_time_eq(given.trim().as_bytes(), token.as_bytes())
    }

    async fn purge(&self, query: &str) -> Response<ResponseBody> {
        let mut url = None;
        let mut prefix = None;
        let mut tag = None;
        let mut soft = false;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v);
            match k {
                "url" => url = Some(v),
                "prefix" => prefix = Some(v),
                "tag" => tag = Some(v),
                "soft" => soft = v == "1" || v == "true",
                _ => {
                    return json(
                        StatusCode::BAD_REQUEST,
                        format!(r#"{{"error":"unknown parameter {}"}}"#, escape(k)),
                    )
                }
            }
        }
        let store = self.gateway.store();
        // Whether entries on disk from before the last restart are reached
        // when read, by a ban (exact hard purges need none).
        let bans = store.keeps_bans();
        let (kind, count, deferred) = match (url, prefix, tag) {
            (Some(url), None, None) => match self.gateway.key_for_url(&url) {
                Ok(Some(key)) if soft => ("url", key.soft_purge(store).await, bans),
                // Keys that take request fields go by prefix, with a ban.
                Ok(Some(key)) => ("url", key.purge(store), key.varies && bans),
                Ok(None) => ("url", 0, false),
                Err(e) => {
                    return json(
                        StatusCode::BAD_REQUEST,
                        format!(r#"{{"error":"{}"}}"#, escape(&e)),
                    )
                }
            },
            (None, Some(prefix), None) => match self.gateway.key_for_url(&prefix) {
                Ok(Some(key)) if soft => ("prefix", store.soft_purge_prefix(&key.url).await, bans),
                Ok(Some(key)) => ("prefix", store.purge_prefix(&key.url), bans),
                Ok(None) => ("prefix", 0, false),
                Err(e) => {
                    return json(
                        StatusCode::BAD_REQUEST,
                        format!(r#"{{"error":"{}"}}"#, escape(&e)),
                    )
                }
            },
            (None, None, Some(tag)) if soft => ("tag", store.soft_purge_tag(&tag).await, bans),
            (None, None, Some(tag)) => ("tag", store.purge_tag(&tag), bans),
            _ => {
                return json(
                    StatusCode::BAD_REQUEST,
                    r#"{"error":"give exactly one of url, prefix or tag"}"#.into(),
                )
            }
        };
        tracing::info!(kind, count, soft, deferred, "purge");
        json(
            StatusCode::OK,
            format!(r#"{{"purged":{count},"kind":"{kind}","soft":{soft},"deferred":{deferred}}}"#),
        )
    }
}

impl Handler for Admin {
    async fn handle(
        &self,
        req: Request<RequestBody>,
        _conn: Arc<ConnInfo>,
    ) -> Response<ResponseBody> {
        let path = req.uri().path();
        if path == "/healthz" {
            if self.draining.load(std::sync::atomic::Ordering::Relaxed) {
                return text(StatusCode::SERVICE_UNAVAILABLE, "draining\n".into());
            }
            return text(StatusCode::OK, "ok\n".into());
        }
        if !self.authorized(&req) {
            let mut resp = json(
                StatusCode::UNAUTHORIZED,
                r#"{"error":"a valid bearer token is required"}"#.into(),
            );
            resp.headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return resp;
        }
        match (req.method(), path) {
            (&Method::GET, "/metrics") => {
                self.gateway.store().publish_metrics();
                let body = install_metrics().map(|h| h.render()).unwrap_or_default();
                text(StatusCode::OK, body)
            }
            (&Method::POST, "/purge") => self.purge(req.uri().query().unwrap_or("")).await,
            (_, "/purge") => not_allowed("POST"),
            (_, "/metrics") => not_allowed("GET"),
            _ => json(StatusCode::NOT_FOUND, r#"{"error":"not found"}"#.into()),
        }
    }
}

/// The credentials of a `Bearer` authorization; the scheme's name is
/// case-insensitive (RFC 9110 §11.1).
fn bearer_credentials(value: &str) -> Option<&str> {
    let (scheme, credentials) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(credentials)
}

/// 405, with the method the endpoint takes in `Allow` (RFC 9110 §15.5.6).
fn not_allowed(allow: &'static str) -> Response<ResponseBody> {
    let mut resp = json(
        StatusCode::METHOD_NOT_ALLOWED,
        r#"{"error":"method not allowed"}"#.into(),
    );
    resp.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    resp
}

fn text(status: StatusCode, body: String) -> Response<ResponseBody> {
    let mut resp = Response::new(body::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

fn json(status: StatusCode, body: String) -> Response<ResponseBody> {
    let mut resp = Response::new(body::full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn escape(s: &str) -> String {
    serde_json::to_string(s)
        .map(|q| q[1..q.len() - 1].to_string())
        .unwrap_or_default()
}

/// Decodes `%XX` escapes and `+` in a query value.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_decode() {
        assert_eq!(
            percent_decode("https%3A%2F%2Fa.example%2Fx%3Fy%3D1"),
            "https://a.example/x?y=1"
        );
        assert_eq!(percent_decode("a+b"), "a b");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }
}
