//! The request phases, in order: receive, decide, throttle, max-forwards,
//! lookup, fetch, store, deliver, log. [`Gateway`] is the listeners'
//! [`Handler`]; `serve` below runs the phases in sequence, `max_forwards`
//! answers a TRACE or OPTIONS with no hop left, `fill` fetches and stores,
//! `deliver` turns a stored entry into a response, `invalidate` holds the
//! requests that change the cache rather than read it, and `access` writes
//! the log line once the response body is done. The generation of the
//! policy a request started with serves it to the end, even if a reload
//! swaps in another meanwhile.

mod access;
mod deliver;
mod fill;
mod invalidate;
mod max_forwards;

pub(crate) use access::{log_refused, log_unparsed};
use access::{Access, LoggedBody};
use deliver::{not_modified, precondition_failed, synthetic};
use fill::Filled;
use max_forwards::Hops;

use super::body::{self, BoxError, RequestBody, ResponseBody};
use super::errors::{ErrorPages, ProxyError};
use super::hygiene::{self, ForwardContext, ResponseHygiene};
use super::listener::{ConnInfo, Handler};
use crate::cache::control::{
    self, CacheStatus, Forward, Overrides, RequestDirectives, Reuse, Staleness,
};
use crate::cache::entry::{Entry, Received};
use crate::cache::{Coalescer, Leader, Lookup, Outcome as Flight, Role, Store};
use crate::compress;
use crate::policy::eval::{Request as View, Response as ResponseView, Scheme};
use crate::policy::model::{BackendId, OriginControl, Outcome, RuleSpec};
use crate::policy::testing::OwnedRequest;
use crate::policy::{Decision, Policy};
use crate::throttle::Limiters;
use crate::upstream::{static_files, valid_host_field, Pool, StaticConfig, UpstreamError};
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use hyper::body::Body as _;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

/// The name in `Cache-Status` (RFC 9211 section 2).
pub const CACHE_NAME: &str = "Portico";
const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
/// Most flights for one key a request waits on before it goes to the origin
/// on its own: each flight that ends with another variant than the one the
/// request needs costs it one more.
const MAX_JOINS: usize = 4;
/// The compressed copies of hits may weigh up to this fraction of the
/// memory tier (besides it).
const COPIES_SHARE: usize = 8;
/// The methods Portico forwards, for `Allow`; a static-files backend
/// answers only [`static_files::METHODS`].
const FORWARDED_METHODS: &str = "GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, TRACE";

/// How a backend is reached.
pub enum BackendRuntime {
    Pool(Arc<Pool>),
    Static(StaticConfig),
}

/// A policy and everything built from it; replaced whole on reload.
pub struct Generation {
    pub policy: Arc<Policy>,
    pub backends: Vec<BackendRuntime>,
    pub limiters: Limiters,
    /// Targeted cache-control header names, in precedence order.
    pub targeted: Vec<HeaderName>,
}

/// The request pipeline, shared by every listener.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

struct Inner {
    current: ArcSwap<Generation>,
    store: Arc<Store>,
    coalescer: Coalescer<Arc<Entry>>,
    errors: ErrorPages,
    via: HeaderValue,
    metrics: Metrics,
    /// Compressed copies of stored bodies, for rules that compress.
    copies: compress::Copies,
}

/// What the access log says of a request.
#[derive(Default)]
struct Log {
    /// The rule's position, or `None` when no rule matched.
    rule: Option<usize>,
    backend: Option<BackendId>,
    cache: &'static str,
    /// Why the request went forward, for the Cache-Status of an error.
    forward: Option<Forward>,
    upstream: Option<Duration>,
}

/// Metric handles registered once, so that counting a request is an atomic
/// add rather than a registry lookup.
struct Metrics {
    /// By status class: 1xx to 5xx.
    requests: [metrics::Counter; 5],
    duration: metrics::Histogram,
    hits: metrics::Counter,
}

impl Metrics {
    fn new() -> Metrics {
        crate::admin::install_metrics();
        let class = |c: &'static str| metrics::counter!("portico_requests_total", "status" => c);
        Metrics {
            requests: [
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
            ],
            duration: metrics::histogram!("portico_request_duration_seconds"),
            hits: metrics::counter!("portico_cache_results_total", "result" => "hit"),
        }
    }
}

impl Gateway {
    pub fn new(generation: Generation, store: Arc<Store>) -> Gateway {
        let hit_for_miss = generation.policy.model.storage.hit_for_miss;
        let copies = compress::Copies::new(store.memory_capacity() / COPIES_SHARE);
        Gateway {
            inner: Arc::new(Inner {
                current: ArcSwap::from_pointee(generation),
                store,
                coalescer: Coalescer::new(hit_for_miss),
                errors: ErrorPages::new(),
                via: HeaderValue::from_static("1.1 portico"),
                metrics: Metrics::new(),
                copies,
            }),
        }
    }

    /// The generation now in force.
    pub fn current(&self) -> Arc<Generation> {
        self.inner.current.load_full()
    }

    /// Swaps in a new generation; requests in flight finish on the old one.
    pub fn swap(&self, generation: Generation) -> Arc<Generation> {
        self.inner.current.swap(Arc::new(generation))
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.inner.store
    }

    /// The keys a GET of `url` is stored under with the current policy, if
    /// it is cached.
    pub fn key_for_url(&self, url: &str) -> Result<Option<UrlKey>, String> {
        let gen = self.current();
        let req = OwnedRequest::new("GET", url, &[], None)?;
        let view = req.view();
        let d = gen.policy.decide(&view);
        Ok(gen.policy.url_key(&d, &view).map(UrlKey::new))
    }

    /// An upgrade, or a CONNECT: the request goes on whole, its extensions
    /// (the pending upgrade) included.
    async fn serve_switch(
        &self,
        gen: &Arc<Generation>,
        req: Request<RequestBody>,
        conn: &ConnInfo,
        log: &mut Log,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let (parts, req_body) = req.into_parts();
        let (host, scheme) = receive(&parts, conn)?;
        let host = host.into_owned();
        let req = Request::from_parts(parts, req_body);
        if req.method() != Method::CONNECT {
            return self.upgrade(gen, req, &host, scheme, conn, log).await;
        }
        // RFC 8441: a WebSocket over an HTTP/2 stream. Any other CONNECT
        // asks for a tunnel, which a reverse proxy does not offer.
        let protocol = req.extensions().get::<hyper::ext::Protocol>();
        if protocol.is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket")) {
            return self.upgrade(gen, req, &host, scheme, conn, log).await;
        }
        Err(ProxyError::MethodNotAllowed {
            allow: HeaderValue::from_static(FORWARDED_METHODS),
        })
    }

    /// Every other request. Its head stays with the caller, which needs it
    /// for the access log and an error page after this returns.
    async fn serve(
        &self,
        gen: &Arc<Generation>,
        parts: &http::request::Parts,
        req_body: RequestBody,
        conn: &ConnInfo,
        log: &mut Log,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        // ---- receive
        let (host, scheme) = receive(parts, conn)?;
        let client_ip = conn.client_addr.ip();
        let view = View {
            method: &parts.method,
            scheme,
            host: &host,
            path: parts.uri.path(),
            query: parts.uri.query().unwrap_or(""),
            headers: &parts.headers,
            client_ip: Some(client_ip),
        };
        if parts.method.as_str() == "PURGE" {
            return Ok(self.purge_method(gen, &view));
        }

        // ---- decide
        let policy = &gen.policy;
        let d = policy.decide(&view);
        let rule = d.rule;
        log.rule = d.index;
        let backend = match &rule.outcome {
            Outcome::Forward(b) => *b,
            other => {
                log.cache = "synthetic";
                let mut resp = synthetic(other, &self.inner.errors, &parts.headers);
                for e in &rule.response_headers {
                    e.apply(resp.headers_mut());
                }
                return Ok(resp);
            }
        };

        // ---- throttle: what the rule would forward is counted, answers
        // made here included
        log.backend = Some(backend);
        if let Some(limiter) = rule.limiter {
            if let Err(retry) = gen.limiters.check(limiter, &view) {
                metrics::counter!("portico_throttled_total").increment(1);
                return Err(ProxyError::TooManyRequests {
                    retry_after_secs: Some(retry.as_secs().max(1)),
                });
            }
        }

        // ---- max-forwards
        // A TRACE or OPTIONS with no hop left is answered here, as by the
        // final recipient (RFC 9110 §7.6.2), but only where the rule would
        // forward it: a rule's own answer (deny, redirect, respond) stands.
        let hops = max_forwards::hops(&parts.method, &parts.headers)?;
        if hops == Hops::Exhausted {
            log.cache = "synthetic";
            log.backend = None;
            let allow = match gen.backends[backend] {
                BackendRuntime::Static(_) => static_files::METHODS,
                BackendRuntime::Pool(_) => FORWARDED_METHODS,
            };
            let mut resp = max_forwards::answer(parts, allow);
            for e in &rule.response_headers {
                e.apply(resp.headers_mut());
            }
            return Ok(resp);
        }

        // ---- throttle: the rest of it, the body's limits
        // The rule's limit, or `http`'s: the listener let through bodies up
        // to the largest limit of any rule.
        let max_body = rule.limits.max_body.unwrap_or(policy.model.http.max_body);
        if req_body
            .size_hint()
            .exact()
            .is_some_and(|len| len > max_body)
        {
            return Err(ProxyError::PayloadTooLarge { limit: max_body });
        }
        // A body without a declared length is counted while it streams.
        let req_body = if max_body < req_body.limit() {
            req_body.with_limit(max_body)
        } else {
            req_body
        };

        // ---- lookup
        let cacheable_method = parts.method == Method::GET || parts.method == Method::HEAD;
        let key = match (&rule.cache, cacheable_method) {
            (Some(_), true) => policy.cache_key(&d, &view),
            _ => None,
        };
        let Some(key) = key else {
            let reason = if rule.cache.is_some() {
                Forward::Method
            } else {
                Forward::Bypass
            };
            log.cache = reason.as_str();
            log.forward = Some(reason);
            let unsafe_method = !parts.method.is_safe();
            let upstream = build_upstream(
                parts,
                rule,
                conn,
                hygiene::default_via(parts.version),
                false,
                hops,
            );
            let body = req_body.map_err(BoxError::from).boxed_unsync();
            let started = Instant::now();
            let result = self.fetch(gen, backend, rule, &view, upstream, body).await;
            log.upstream = Some(started.elapsed());
            let mut resp = result?;
            if unsafe_method && (resp.status().is_success() || resp.status().is_redirection()) {
                let port = target_authority(&parts.uri, &parts.headers)
                    .and_then(|a| authority_port(a.to_str().ok()?));
                self.invalidate_after_unsafe(gen, &view, port, resp.headers());
            }
            let status = resp.status().as_u16();
            hygiene::strip_hop_by_hop(resp.headers_mut(), false);
            strip_targeted(gen, resp.headers_mut());
            let actions = policy.decide_response(
                &view,
                &ResponseView {
                    status,
                    headers: resp.headers(),
                },
            );
            for e in &actions.headers {
                e.apply(resp.headers_mut());
            }
            let mut resp = compress_streamed(rule, parts, resp);
            for e in &rule.response_headers {
                e.apply(resp.headers_mut());
            }
            set_cache_status(
                resp.headers_mut(),
                &CacheStatus::Forward {
                    reason,
                    status: Some(status),
                    ttl: None,
                    stored: false,
                    collapsed: false,
                    detail: None,
                },
            );
            return Ok(resp);
        };
        let directives = RequestDirectives::from_headers(&parts.headers);
        let store = &self.inner.store;
        let lookup = store.lookup(&key, &parts.headers).await;
        let now = SystemTime::now();
        let (forward, stale) = match lookup {
            Lookup::Hit(entry) => {
                let age = entry.age_at(now);
                match control::evaluate_reuse(&directives, &entry.lifetime(), age) {
                    Reuse::Fresh | Reuse::StaleAllowed => {
                        log.cache = "hit";
                        self.inner.metrics.hits.increment(1);
                        let status = CacheStatus::Hit {
                            ttl: entry.ttl_at(now),
                            detail: None,
                        };
                        return Ok(self.deliver(gen, rule, parts, &key, &entry, &status, now));
                    }
                    Reuse::StaleWhileRevalidate => {
                        log.cache = "stale";
                        metrics::counter!("portico_cache_results_total", "result" => "stale")
                            .increment(1);
                        self.refresh_in_background(gen, &d, &key, parts, conn, &host, &entry);
                        let status = CacheStatus::Hit {
                            ttl: entry.ttl_at(now),
                            detail: Some("stale-while-revalidate"),
                        };
                        return Ok(self.deliver(gen, rule, parts, &key, &entry, &status, now));
                    }
                    Reuse::Revalidate { stale_if_error } => {
                        // RFC 9211 section 2.2: `request` when a fresh copy
                        // was refused by the request's own directives.
                        let reason = if entry.staleness_at(now) == Staleness::Fresh {
                            Forward::Request
                        } else {
                            Forward::Stale
                        };
                        (reason, Some((entry, stale_if_error)))
                    }
                    Reuse::GatewayTimeout => return Err(ProxyError::NotCached),
                }
            }
            Lookup::VaryMiss if directives.only_if_cached => return Err(ProxyError::NotCached),
            Lookup::Miss if directives.only_if_cached => return Err(ProxyError::NotCached),
            Lookup::VaryMiss => (Forward::VaryMiss, None),
            Lookup::Miss => (Forward::UriMiss, None),
        };
        let forward = if directives.no_cache && stale.is_some() {
            Forward::Request
        } else {
            forward
        };
        log.cache = forward.as_str();
        log.forward = Some(forward);
        metrics::counter!("portico_cache_results_total", "result" => forward.as_str()).increment(1);

        // ---- fetch and store, one request per key
        let mut leader = None;
        let mut forward = forward;
        for _ in 0..MAX_JOINS {
            match self.inner.coalescer.join(&key) {
                Role::Leader(l) => {
                    leader = Some(l);
                    break;
                }
                Role::Bypass => break,
                Role::Follower(follower) => {
                    metrics::counter!("portico_cache_coalesced_total").increment(1);
                    match follower.wait().await {
                        Flight::Ready(entry) if entry.serves(&parts.headers) => {
                            let now = SystemTime::now();
                            let status = CacheStatus::Forward {
                                reason: forward,
                                status: Some(entry.status.as_u16()),
                                ttl: Some(entry.ttl_at(now)),
                                stored: true,
                                collapsed: true,
                                detail: None,
                            };
                            return Ok(self.deliver(gen, rule, parts, &key, &entry, &status, now));
                        }
                        // Another variant (the response varies on a field
                        // this request sends differently): wait for, or
                        // lead, the next flight for the key.
                        Flight::Ready(_) => {
                            forward = Forward::VaryMiss;
                            log.cache = forward.as_str();
                            log.forward = Some(forward);
                        }
                        // Not storable, or the leader failed: each goes on its own.
                        Flight::NotStorable | Flight::Retry => break,
                    }
                }
            }
        }
        let started = Instant::now();
        let fetched = self
            .fill(
                gen,
                rule,
                &key,
                parts,
                conn,
                &host,
                stale.as_ref().map(|(e, _)| e),
            )
            .await;
        log.upstream = Some(started.elapsed());
        match fetched {
            Ok(Filled::Stored(entry, fwd_status, cookies, stored)) => {
                if let Some(l) = leader {
                    l.publish(Flight::Ready(entry.clone()));
                }
                let now = SystemTime::now();
                let status = CacheStatus::Forward {
                    reason: forward,
                    status: Some(fwd_status),
                    ttl: stored.then(|| entry.ttl_at(now)),
                    stored,
                    collapsed: false,
                    detail: (!stored).then_some("store-refused"),
                };
                let mut resp = self.deliver(gen, rule, parts, &key, &entry, &status, now);
                // The cookie was set for this client alone; the stored copy
                // has none. The rule's edits of `Set-Cookie` (a `remove`, say)
                // hold for it too: what they made of the copy's none is
                // replaced by what they make of the origin's cookies.
                if !cookies.is_empty() {
                    let fields = resp.headers_mut();
                    fields.remove(header::SET_COOKIE);
                    for c in cookies {
                        fields.append(header::SET_COOKIE, c);
                    }
                    for e in rule
                        .response_headers
                        .iter()
                        .filter(|e| e.name == header::SET_COOKIE)
                    {
                        e.apply(fields);
                    }
                }
                Ok(resp)
            }
            Ok(Filled::Streaming(resp, pending, max)) => {
                let mut resp =
                    compress_streamed(rule, parts, fill::tee(resp, pending, max, leader));
                strip_targeted(gen, resp.headers_mut());
                let status = resp.status().as_u16();
                set_cache_status(
                    resp.headers_mut(),
                    &CacheStatus::Forward {
                        reason: forward,
                        status: Some(status),
                        ttl: None,
                        stored: false,
                        collapsed: false,
                        detail: Some("streamed"),
                    },
                );
                for e in &rule.response_headers {
                    e.apply(resp.headers_mut());
                }
                if parts.method == Method::HEAD {
                    *resp.body_mut() = body::empty();
                }
                Ok(resp)
            }
            Ok(Filled::Passed(mut resp, detail, fwd_status)) => {
                if let Some(l) = leader {
                    l.publish(Flight::NotStorable);
                }
                let status = resp.status();
                // stale-if-error also covers an origin answering 5xx (RFC 5861 section 4).
                if status.is_server_error() {
                    if let Some((entry, true)) = &stale {
                        return Ok(self.serve_stale_on_error(
                            gen,
                            rule,
                            parts,
                            &key,
                            entry,
                            status.as_u16(),
                            log,
                        ));
                    }
                }
                strip_targeted(gen, resp.headers_mut());
                let cache_status = CacheStatus::Forward {
                    reason: forward,
                    status: Some(fwd_status),
                    ttl: None,
                    stored: false,
                    collapsed: false,
                    detail: Some(detail),
                };
                // The fill left the client's validators out: they are
                // answered here, as they are from a stored response.
                if status.is_success()
                    && control::fails_precondition(&parts.headers, resp.headers())
                {
                    let mut resp = precondition_failed();
                    set_cache_status(resp.headers_mut(), &cache_status);
                    return Ok(resp);
                }
                if status.is_success()
                    && control::answers_not_modified(&parts.method, &parts.headers, resp.headers())
                {
                    let mut headers = std::mem::take(resp.headers_mut());
                    for e in &rule.response_headers {
                        e.apply(&mut headers);
                    }
                    // The cookie was set for this client: it keeps it.
                    let mut resp = not_modified(&headers, &[header::SET_COOKIE]);
                    set_cache_status(resp.headers_mut(), &cache_status);
                    return Ok(resp);
                }
                let mut resp = compress_streamed(rule, parts, resp);
                set_cache_status(resp.headers_mut(), &cache_status);
                for e in &rule.response_headers {
                    e.apply(resp.headers_mut());
                }
                if parts.method == Method::HEAD {
                    *resp.body_mut() = body::empty();
                }
                Ok(resp)
            }
            Err(e) => {
                drop(leader);
                if let Some((entry, true)) = &stale {
                    return Ok(self.serve_stale_on_error(
                        gen,
                        rule,
                        parts,
                        &key,
                        entry,
                        e.status().as_u16(),
                        log,
                    ));
                }
                Err(e)
            }
        }
    }
}

/// Compresses a response from the origin as it streams to the client, when
/// the rule compresses and the response qualifies (see
/// [`compress::response`]). Rules without `compress` pay nothing.
fn compress_streamed(
    rule: &RuleSpec,
    parts: &http::request::Parts,
    resp: Response<ResponseBody>,
) -> Response<ResponseBody> {
    let Some(spec) = &rule.compress else {
        return resp;
    };
    let head = parts.method == Method::HEAD;
    compress::response(spec, parts.headers.get(header::ACCEPT_ENCODING), head, resp).map(
        |b| match b {
            compress::Compressible::Plain(b) => b,
            coded => coded.boxed_unsync(),
        },
    )
}

impl Handler for Gateway {
    async fn handle(
        &self,
        req: Request<RequestBody>,
        conn: Arc<ConnInfo>,
    ) -> Response<ResponseBody> {
        let started = Instant::now();
        let gen = self.current();
        let mut log = Log::default();
        let (mut parts, body) = req.into_parts();
        // Behind a trusted proxy, the client is the one it names: for
        // rules, keys, limits, the log and the forwarding fields alike.
        let trusted = &gen.policy.model.http.trust_forwarded;
        let conn = match hygiene::forwarded_client(conn.client_addr.ip(), &parts.headers, trusted) {
            Some(client) => Arc::new(ConnInfo {
                client_addr: std::net::SocketAddr::new(client, 0),
                proxied_by: Some(conn.client_addr.ip()),
                ..ConnInfo::clone(&conn)
            }),
            None => conn,
        };
        // What the client's Connection names is this hop's alone (RFC 9110
        // §7.6.1) and never reaches the origin: rules, cache keys and Vary
        // must not see it either, or an answer made without a field would
        // be stored as one made with it. An upgrade keeps `Upgrade`.
        if parts.headers.contains_key(header::CONNECTION) {
            // OPTIONS and TRACE go as themselves, counted by Max-Forwards
            // and answered here when it runs out: their Upgrade is
            // ignored, as a server may (RFC 9110 §7.8). So is that of an
            // HTTP/1.0 request, as a server must: only HTTP/1.1 switches.
            // An upgrade is a request without a body: one that has a body is
            // served as the plain request it also is, body and all.
            let keep_upgrade = parts.version == http::Version::HTTP_11
                && parts.method != Method::OPTIONS
                && parts.method != Method::TRACE
                && body.is_end_stream();
            hygiene::strip_hop_by_hop(&mut parts.headers, keep_upgrade);
        }
        // HTTP/2 clients may send a field per cookie (RFC 9113 §8.2.3): one
        // field for rules, keys, Vary, limiters and the origin alike, or a
        // rule on `header("Cookie")` would see only the first.
        if parts.version >= http::Version::HTTP_2 {
            hygiene::join_cookies(&mut parts.headers);
        }
        // One spelling per target, for rules, keys and the origin alike.
        if let Some(uri) = normalize_escapes(&parts.uri) {
            parts.uri = uri;
        }
        // An upgrade takes the request whole: what the log and an error page
        // need of its head is kept first. Any other request lends its head
        // to `serve` and keeps it.
        let (result, head) =
            if hygiene::is_upgrade(&parts.headers) || parts.method == Method::CONNECT {
                let kept = head_for_log(&parts);
                let req = Request::from_parts(parts, body);
                (self.serve_switch(&gen, req, &conn, &mut log).await, kept)
            } else {
                let result = self.serve(&gen, &parts, body, &conn, &mut log).await;
                (result, parts)
            };
        let mut resp = match result {
            Ok(resp) => resp,
            Err(e) => {
                let mut resp = self.inner.errors.respond(&e, Some(&head.headers));
                if log.cache.is_empty() {
                    log.cache = "error";
                }
                let detail = Some(error_detail(&e));
                let status = match (&e, log.forward) {
                    // Answered without asking the origin: no `fwd`
                    // (RFC 9211 section 2.2).
                    (ProxyError::NotCached, _) => CacheStatus::Answered { detail },
                    (_, reason) => CacheStatus::Forward {
                        reason: reason.unwrap_or(Forward::Bypass),
                        status: None,
                        ttl: None,
                        stored: false,
                        collapsed: false,
                        detail,
                    },
                };
                set_cache_status(resp.headers_mut(), &status);
                resp
            }
        };
        hygiene::prepare_downstream_response(
            &mut resp,
            &ResponseHygiene {
                via: &self.inner.via,
                strip_server: gen.policy.model.http.hide_server,
            },
        );
        let status = resp.status();
        // No body goes with an answer to HEAD, or with a 204 or 304,
        // whatever made it (an error page, `deny`, `respond`): HTTP/1.1
        // never writes one, and HTTP/2 would send it as DATA, a malformed
        // response (RFC 9110 §6.4.1, RFC 9113 §8.1.1). HEAD keeps the
        // length a GET would have; a 204 has none (RFC 9110 §8.6).
        if head.method == Method::HEAD
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            if !resp.body().is_end_stream() {
                let exact = resp.body().size_hint().exact();
                if let (Some(n), false) =
                    (exact, resp.headers().contains_key(header::CONTENT_LENGTH))
                {
                    resp.headers_mut()
                        .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
                }
                *resp.body_mut() = body::empty();
            }
            if status == StatusCode::NO_CONTENT {
                resp.headers_mut().remove(header::CONTENT_LENGTH);
            }
        }
        let m = &self.inner.metrics;
        m.requests[usize::from((status.as_u16() / 100).clamp(1, 5) - 1)].increment(1);
        // The log line and the duration wait for the body's end.
        let access = Access {
            started,
            gen,
            client: conn.client_addr.ip(),
            head,
            status,
            log,
            duration: m.duration.clone(),
        };
        resp.map(|inner| LoggedBody::new(inner, access).boxed_unsync())
    }
}

/// What the access log and an error page read of a request head (method,
/// URI, `Host`, `Accept`), for a request that is handed on whole.
fn head_for_log(parts: &http::request::Parts) -> http::request::Parts {
    let (mut kept, ()) = Request::new(()).into_parts();
    kept.method = parts.method.clone();
    kept.uri = parts.uri.clone();
    for name in [header::HOST, header::ACCEPT] {
        for v in parts.headers.get_all(&name) {
            kept.headers.append(name.clone(), v.clone());
        }
    }
    kept
}

/// A request on its way to a backend: its head, and its forwarding fields
/// as head lines, sent after the head's own fields.
pub(super) struct Outbound {
    head: Request<()>,
    forwarded: Vec<u8>,
}

/// The request to send upstream: the client's method, path and headers, the
/// rule's header edits, and header hygiene. For a cache fill the method is
/// GET and the client's own conditionals and ranges are dropped: the cache
/// fetches the whole object and answers those itself. `hops` is what the
/// request's Max-Forwards left of its hops: the origin gets that count.
fn build_upstream(
    parts: &http::request::Parts,
    rule: &RuleSpec,
    conn: &ConnInfo,
    via: &HeaderValue,
    fill: bool,
    hops: Hops,
) -> Outbound {
    let mut req = Request::new(());
    *req.method_mut() = if fill {
        Method::GET
    } else {
        parts.method.clone()
    };
    // The parsed path is shared, not parsed again.
    *req.uri_mut() = parts
        .uri
        .path_and_query()
        .cloned()
        .map_or_else(|| http::Uri::from_static("/"), http::Uri::from);
    // A clone of the client's map takes no hashing, and the forwarding
    // fields go to the wire, not into the map, so it need not grow.
    let mut headers = parts.headers.clone();
    // The host the client asked for, the one the request was routed by:
    // the origin gets it in `Host`, and `X-Forwarded-Host` carries it.
    let host = target_authority(&parts.uri, &parts.headers);
    if let Some(v) = &host {
        if parts.uri.authority().is_some() {
            headers.insert(header::HOST, v.clone());
        }
    }
    if fill {
        for name in [
            header::IF_NONE_MATCH,
            header::IF_MODIFIED_SINCE,
            header::IF_MATCH,
            header::IF_UNMODIFIED_SINCE,
            header::IF_RANGE,
            header::RANGE,
        ] {
            headers.remove(name);
        }
    }
    if let Hops::Left(n) = hops {
        headers.insert(header::MAX_FORWARDS, HeaderValue::from(n));
    }
    // Like the client's own X-Forwarded-* fields: its RFC 7239 field would
    // reach the origin as if Portico had written it (a rule's edit may).
    headers.remove(header::FORWARDED);
    for e in &rule.request_headers {
        e.apply(&mut headers);
    }
    let forwarded = hygiene::forwarding(
        &mut headers,
        host,
        &ForwardContext {
            // The hop this request came from is the one added: a trusted
            // proxy's chain is kept before it.
            client_ip: conn.proxied_by.unwrap_or(conn.client_addr.ip()),
            tls: conn.tls,
            trust_forwarded: conn.proxied_by.is_some(),
            via,
        },
    );
    *req.headers_mut() = headers;
    let mut lines = Vec::with_capacity(128);
    forwarded.encode(&mut lines);
    Outbound {
        head: req,
        forwarded: lines,
    }
}

/// The receive phase's checks, for every request: the host it names and
/// the scheme it came by; 400 without a host (but on HTTP/1.0, which has
/// none to send), with a `Host` field that is
/// repeated, invalid or (on HTTP/2) names another host than `:authority`,
/// with a target that is not a path (OPTIONS may name the server itself),
/// or with an absolute target of a scheme other than http or https.
fn receive<'a>(
    parts: &'a http::request::Parts,
    conn: &ConnInfo,
) -> Result<(std::borrow::Cow<'a, str>, Scheme), ProxyError> {
    let field = check_host_field(parts)?;
    let host = match host_of(parts, field) {
        Some(host) => host,
        // HTTP/1.0 needs no Host (`check_host_field` let it through): its
        // rules see an empty host, and the backend's server is sent its own.
        None if field.is_none() && parts.version < http::Version::HTTP_11 => "".into(),
        None => return Err(ProxyError::BadRequest("missing Host")),
    };
    // OPTIONS may ask about the server (`*`); CONNECT names an authority,
    // and is answered by `serve_switch`.
    if !parts.uri.path().starts_with('/')
        && parts.method != Method::OPTIONS
        && parts.method != Method::CONNECT
    {
        return Err(ProxyError::BadRequest("the request target is not a path"));
    }
    if has_dot_segment(parts.uri.path().as_bytes()) {
        return Err(ProxyError::BadRequest("a dot-segment in the path"));
    }
    // An absolute-form target (RFC 9112 §3.2.2) names http or https; any
    // other scheme is not this server's to answer.
    if let Some(scheme) = parts.uri.scheme() {
        if *scheme != http::uri::Scheme::HTTP && *scheme != http::uri::Scheme::HTTPS {
            return Err(ProxyError::BadRequest("a scheme other than http or https"));
        }
    }
    Ok((host, client_scheme(conn, &parts.headers)))
}

/// The scheme the client came by: the connection's, or behind a trusted
/// proxy (`http { trust_forwarded }`) what its `X-Forwarded-Proto` says:
/// the last value, the one the proxy next to Portico wrote (one that adds
/// to the field rather than replacing it leaves the client's own value
/// before its). A rule that redirects `http` to `https` behind a proxy
/// that ends TLS would otherwise redirect for ever.
fn client_scheme(conn: &ConnInfo, headers: &HeaderMap) -> Scheme {
    let forwarded = conn.proxied_by.and_then(|_| {
        let field = headers
            .get_all(hygiene::X_FORWARDED_PROTO)
            .iter()
            .next_back()?;
        let last = field.to_str().ok()?.rsplit(',').next()?;
        Some(last.trim().eq_ignore_ascii_case("https"))
    });
    if forwarded.unwrap_or(conn.tls) {
        Scheme::Https
    } else {
        Scheme::Http
    }
}

/// The target with its percent-escapes normalised (RFC 3986 section
/// 6.2.2): an escaped unreserved character (letters, digits, `-`, `.`, `_`,
/// `~`) is written as itself and every other escape in upper case. The
/// result names the same resource, so the origin gets it too; rules and
/// cache keys then see one spelling, and `/%61dmin` cannot pass a rule
/// written for `/admin`. `None` when there is nothing to change (a target
/// without `%` costs one scan).
fn normalize_escapes(uri: &http::Uri) -> Option<http::Uri> {
    let out = crate::policy::eval::normalize_escapes(uri.path_and_query()?.as_str())?;
    let mut builder = http::Uri::builder();
    if let Some(scheme) = uri.scheme() {
        builder = builder.scheme(scheme.clone());
    }
    if let Some(authority) = uri.authority() {
        builder = builder.authority(authority.clone());
    }
    builder.path_and_query(out).build().ok()
}

/// Whether a path holds a `.` or `..` segment, as sent or percent-encoded
/// (`%2e` is `.`, RFC 3986 §6.2.2.2), between any of the separators an
/// origin may take for `/` (`/`, `\`, `%2f`, `%5c`) and before any `;`
/// parameters. Rules match the path as it was sent, and the path goes to
/// the origin as sent: one that resolved such a segment (RFC 3986 §5.2.4)
/// would serve a path the rules never saw. One pass over the bytes, no
/// allocation.
fn has_dot_segment(path: &[u8]) -> bool {
    // Dots in the current segment so far; None once it holds anything else.
    let mut dots = Some(0u8);
    let mut rest = path;
    loop {
        let step = match rest {
            [] | [b'/' | b'\\' | b';', ..] => 1,
            [b'%', b'2', b'f' | b'F', ..] | [b'%', b'5', b'c' | b'C', ..] => 3,
            [b'.', ..] => {
                dots = dots.map(|d| d.saturating_add(1));
                rest = &rest[1..];
                continue;
            }
            [b'%', b'2', b'e' | b'E', ..] => {
                dots = dots.map(|d| d.saturating_add(1));
                rest = &rest[3..];
                continue;
            }
            [_, tail @ ..] => {
                dots = None;
                rest = tail;
                continue;
            }
        };
        // The end of a segment's name.
        if matches!(dots, Some(1 | 2)) {
            return true;
        }
        if rest.is_empty() {
            return false;
        }
        // Parameters after `;` are not part of the name.
        dots = if rest[0] == b';' { None } else { Some(0) };
        rest = &rest[step..];
    }
}

/// RFC 9112 §3.2: 400 for an HTTP/1.1 request without `Host`, and for any
/// request with more than one `Host` line or an invalid one. RFC 9113
/// §8.3.1: on HTTP/2 a `Host` beside `:authority` must name the same
/// host. (An HTTP/1.1 absolute-form target may name another host than
/// `Host`: the target wins, RFC 9112 §3.2.2, and see [`target_authority`].)
/// Returns the one `Host` field, if there is one.
fn check_host_field(parts: &http::request::Parts) -> Result<Option<&HeaderValue>, ProxyError> {
    let mut fields = parts.headers.get_all(header::HOST).iter();
    let Some(field) = fields.next() else {
        if parts.version == http::Version::HTTP_11 {
            return Err(ProxyError::BadRequest("missing Host"));
        }
        return Ok(None);
    };
    if fields.next().is_some() {
        return Err(ProxyError::BadRequest("more than one Host"));
    }
    if !valid_host_field(field.as_bytes()) {
        return Err(ProxyError::BadRequest("invalid Host"));
    }
    if parts.version == http::Version::HTTP_2 {
        if let Some(a) = parts.uri.authority() {
            if !field.as_bytes().eq_ignore_ascii_case(a.as_str().as_bytes()) {
                return Err(ProxyError::BadRequest("Host differs from :authority"));
            }
        }
    }
    Ok(Some(field))
}

/// The authority a request is for, as the origin is to see it in `Host`
/// and `X-Forwarded-Host`: the target's own when it names one (an
/// absolute-form target, or HTTP/2's `:authority`), without user
/// information, in place of the client's `Host` (RFC 9112 §3.2.2: a proxy
/// ignores the received `Host` then); else the client's `Host`. This is the
/// host [`host_of`] routes by, port included.
fn target_authority(uri: &http::Uri, headers: &HeaderMap) -> Option<HeaderValue> {
    match uri.authority() {
        Some(a) => {
            let a = a.as_str();
            let a = a.rsplit_once('@').map_or(a, |(_, host)| host);
            HeaderValue::from_str(a).ok()
        }
        None => headers.get(header::HOST).cloned(),
    }
}

/// The port an authority names (`host:port`, `[v6]:port`, user
/// information allowed); `None` without one, or with an empty one.
fn authority_port(authority: &str) -> Option<u16> {
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let after_host = match authority.strip_prefix('[') {
        Some(v6) => &v6[v6.find(']')? + 1..],
        None => authority.find(':').map_or("", |i| &authority[i..]),
    };
    after_host.strip_prefix(':')?.parse().ok()
}

/// [`host_of`], looking up the `Host` field itself.
#[cfg(test)]
fn request_host(parts: &http::request::Parts) -> Option<std::borrow::Cow<'_, str>> {
    host_of(parts, parts.headers.get(header::HOST))
}

/// The host a request names (the target's authority, else `field`, its
/// `Host`), without port or user information, in lower case; borrowed from
/// the request unless it had to be lowered.
fn host_of<'a>(
    parts: &'a http::request::Parts,
    field: Option<&'a HeaderValue>,
) -> Option<std::borrow::Cow<'a, str>> {
    // Byte searches: this runs on every request. Both sources are text:
    // an authority the URI parser took, or a field value of visible ASCII
    // (`to_str`), so every slice below falls on a character boundary.
    let raw = match parts.uri.authority() {
        Some(a) => a.as_str(),
        None => field?.to_str().ok()?,
    };
    let bytes = raw.as_bytes();
    let raw = match bytes.iter().rposition(|&b| b == b'@') {
        Some(at) => &raw[at + 1..],
        None => raw,
    };
    let bytes = raw.as_bytes();
    let host = match bytes.first() {
        Some(b'[') => match bytes.iter().position(|&b| b == b']') {
            Some(end) => &raw[..=end],
            None => raw,
        },
        _ => match bytes.iter().rposition(|&b| b == b':') {
            Some(colon) if bytes[colon + 1..].iter().all(u8::is_ascii_digit) => &raw[..colon],
            _ => raw,
        },
    };
    // A fully qualified name's root dot names the same host (RFC 1034
    // §3.1), and origins and DNS take it so: rules must see it as they
    // would without.
    let host = match host.strip_suffix('.') {
        Some(name) if !name.is_empty() && !name.ends_with('.') => name,
        _ => host,
    };
    if host.is_empty() {
        return None;
    }
    Some(if host.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(host.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(host)
    })
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

fn upstream_error(e: &UpstreamError) -> ProxyError {
    // A request body that outgrew its limit while streaming is the client's
    // fault, not the origin's (RFC 9110 section 15.5.14).
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(super::body::BodyError::TooLarge { limit }) = err.downcast_ref() {
            return ProxyError::PayloadTooLarge { limit: *limit };
        }
        source = err.source();
    }
    match e.status() {
        StatusCode::BAD_REQUEST => ProxyError::BadRequest("unreadable request body"),
        StatusCode::REQUEST_TIMEOUT => ProxyError::RequestTimeout,
        StatusCode::SERVICE_UNAVAILABLE => ProxyError::ServiceUnavailable {
            retry_after_secs: Some(1),
        },
        StatusCode::GATEWAY_TIMEOUT => ProxyError::GatewayTimeout,
        _ => ProxyError::BadGateway(e.to_string()),
    }
}

fn error_detail(e: &ProxyError) -> &'static str {
    match e {
        ProxyError::BadGateway(_) => "origin-error",
        ProxyError::GatewayTimeout => "origin-timeout",
        ProxyError::NotCached => "only-if-cached",
        ProxyError::ServiceUnavailable { .. } => "no-healthy-server",
        ProxyError::TooManyRequests { .. } => "throttled",
        ProxyError::PayloadTooLarge { .. } => "body-too-large",
        ProxyError::RequestTimeout => "body-timeout",
        ProxyError::BadRequest(_) => "bad-request",
        _ => "error",
    }
}

/// The keys one URL's GET is stored under, for purges: its key, or, when
/// the rule's key also takes request fields (a header, a cookie, the
/// client's address), every key that begins with the URL's part of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlKey {
    /// The key's text that comes from the URL.
    pub url: String,
    /// The key takes request fields too.
    pub varies: bool,
}

impl UrlKey {
    fn new((url, varies): (String, bool)) -> UrlKey {
        UrlKey { url, varies }
    }

    /// What begins every key of the URL, and of no other URL (request
    /// fields render after a `|`).
    fn all_of(&self) -> String {
        format!("{}|", self.url)
    }

    /// Removes every response stored for the URL; how many keys had one.
    pub fn purge(&self, store: &Store) -> usize {
        if self.varies {
            store.purge_prefix(&self.all_of())
        } else {
            store.purge(&self.url)
        }
    }

    /// Marks every response stored for the URL stale; how many.
    pub async fn soft_purge(&self, store: &Store) -> usize {
        if self.varies {
            store.soft_purge_prefix(&self.all_of()).await
        } else {
            store.soft_purge(&self.url).await
        }
    }
}

/// Removes the targeted cache-control fields when the storage settings say
/// they stop here (`strip_targeted`), whether or not the response is stored.
fn strip_targeted(gen: &Generation, headers: &mut HeaderMap) {
    if gen.policy.model.storage.strip_targeted {
        for name in &gen.targeted {
            headers.remove(name);
        }
    }
}

/// Adds Portico's member to `Cache-Status`. Members that caches nearer the
/// origin put there stay, in front of it: the list runs from the origin
/// towards the client (RFC 9211 section 2).
fn set_cache_status(headers: &mut HeaderMap, status: &CacheStatus<'_>) {
    // A request the cache does not handle (every pass-through request) gets
    // one of a few values, each rendered once.
    if let CacheStatus::Forward {
        reason: Forward::Bypass,
        status: Some(code @ 100..=599),
        ttl: None,
        stored: false,
        collapsed: false,
        detail: None,
    } = *status
    {
        static BYPASS: [OnceLock<HeaderValue>; 500] = [const { OnceLock::new() }; 500];
        // At most one short text per status code is kept for good; a
        // static value is cloned without touching a reference count.
        let value = BYPASS[usize::from(code - 100)]
            .get_or_init(|| HeaderValue::from_static(String::leak(status.render(CACHE_NAME))));
        headers.append(CACHE_STATUS, value.clone());
        return;
    }
    // The rendered text becomes the value without another copy.
    if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(status.render(CACHE_NAME))) {
        headers.append(CACHE_STATUS, v);
    }
}

fn json(status: StatusCode, text: String) -> Response<ResponseBody> {
    let mut resp = Response::new(body::full(text));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes_are_normalised_once() {
        let cases = [
            ("/%61dmin", Some("/admin")),
            ("/a%2fb?q=%7e%41", Some("/a%2Fb?q=~A")),
            ("/a%2Fb", None),
            ("/plain?x=1", None),
            ("/100%", None),
            ("/bad%zz%4", None),
            ("/x%2D%5f", Some("/x-_")),
        ];
        for (target, want) in cases {
            let uri: http::Uri = target.parse().unwrap();
            let got = super::normalize_escapes(&uri);
            assert_eq!(
                got.as_ref().map(|u| u.to_string()),
                want.map(String::from),
                "{target}"
            );
        }
        let absolute: http::Uri = "http://shop.example/%61pp".parse().unwrap();
        assert_eq!(
            super::normalize_escapes(&absolute).unwrap().to_string(),
            "http://shop.example/app"
        );
    }

    use super::*;

    #[test]
    fn dot_segments_are_found_however_written() {
        for path in [
            "/.",
            "/..",
            "/a/./b",
            "/a/../b",
            "/%2e",
            "/%2E%2e/b",
            "/a/.%2E",
            "/a%2f..",
            "/a%2F../b",
            "/a%5c..%5cb",
            "/a\\..\\b",
            "/a/..;p",
            "/a/.;p=1/b",
            "..",
            ".",
        ] {
            assert!(has_dot_segment(path.as_bytes()), "{path}");
        }
        for path in [
            "",
            "/",
            "*",
            "//",
            "/a",
            "/a.b",
            "/.a",
            "/a./",
            "/...",
            "/a/.../b",
            "/%2e%2e%2e",
            "/%2",
            "/%2x",
            "/a;..",
            "/a;p/b",
            "/a.;",
            "/v1..2",
            "/%2fa",
        ] {
            assert!(!has_dot_segment(path.as_bytes()), "{path}");
        }
    }

    #[test]
    fn bypass_statuses_render_as_any_other() {
        for code in [200, 404, 200, 503, 599, 100] {
            for detail in [None, Some("why")] {
                let status = CacheStatus::Forward {
                    reason: Forward::Bypass,
                    status: Some(code),
                    ttl: None,
                    stored: false,
                    collapsed: false,
                    detail,
                };
                let mut headers = HeaderMap::new();
                set_cache_status(&mut headers, &status);
                assert_eq!(headers[CACHE_STATUS], status.render(CACHE_NAME));
            }
        }
    }

    #[test]
    fn the_target_s_authority_takes_the_place_of_host() {
        let (parts, ()) = Request::builder()
            .uri("http://user@www.example:8080/x")
            .header("host", "admin.example")
            .body(())
            .unwrap()
            .into_parts();
        assert_eq!(
            target_authority(&parts.uri, &parts.headers).unwrap(),
            "www.example:8080"
        );
        assert_eq!(request_host(&parts).as_deref(), Some("www.example"));
        let (parts, ()) = Request::builder()
            .uri("/x")
            .header("host", "admin.example")
            .body(())
            .unwrap()
            .into_parts();
        assert_eq!(
            target_authority(&parts.uri, &parts.headers).unwrap(),
            "admin.example"
        );
    }

    fn host_of(req: Request<()>) -> Option<String> {
        let (parts, ()) = req.into_parts();
        request_host(&parts).map(|h| h.into_owned())
    }

    #[test]
    fn authority_ports() {
        for (authority, want) in [
            ("shop.example", None),
            ("shop.example:8080", Some(8080)),
            ("shop.example:", None),
            ("user@shop.example:81", Some(81)),
            ("[::1]", None),
            ("[::1]:8443", Some(8443)),
            ("shop.example:http", None),
        ] {
            assert_eq!(authority_port(authority), want, "{authority}");
        }
    }

    #[test]
    fn hosts_lose_ports_and_case() {
        let req = Request::builder()
            .uri("/x")
            .header("host", "Shop.Example:8080")
            .body(())
            .unwrap();
        assert_eq!(host_of(req).as_deref(), Some("shop.example"));
        for (authority, want) in [
            ("user@Shop.Example:8080", Some("shop.example")),
            ("a@b@host", Some("host")),
            ("host:", Some("host")),
            ("host:port", Some("host:port")),
            ("[::1]", Some("[::1]")),
            (":80", None),
            ("Shop.Example.:443", Some("shop.example")),
            ("shop.example..", Some("shop.example..")),
            (".", Some(".")),
        ] {
            let req = Request::builder()
                .uri("/x")
                .header("host", authority)
                .body(())
                .unwrap();
            assert_eq!(host_of(req).as_deref(), want, "{authority}");
        }
        let req = Request::builder()
            .uri("https://[::1]:8443/x")
            .body(())
            .unwrap();
        assert_eq!(host_of(req).as_deref(), Some("[::1]"));
        let req = Request::builder().uri("/x").body(()).unwrap();
        assert_eq!(host_of(req), None);
        // Already in lower case: borrowed, not copied.
        let (parts, ()) = Request::builder()
            .uri("/x")
            .header("host", "shop.example:80")
            .body(())
            .unwrap()
            .into_parts();
        assert!(matches!(
            request_host(&parts),
            Some(std::borrow::Cow::Borrowed("shop.example"))
        ));
    }
}
