//! The request phases, in order: receive, decide, throttle, lookup, fetch,
//! store, deliver, log. [`Gateway`] is the listeners' [`Handler`]; each phase
//! is one method below, and the generation of the policy a request started
//! with serves it to the end, even if a reload swaps in another meanwhile.

use super::body::{self, BoxError, RequestBody, ResponseBody};
use super::errors::{ErrorPages, ProxyError};
use super::hygiene::{self, ForwardContext, ResponseHygiene};
use super::listener::{ConnInfo, Handler};
use crate::cache::control::{
    self, CacheStatus, Forward, Overrides, RequestDirectives, Reuse, Staleness,
};
use crate::cache::entry::{Entry, Received};
use crate::cache::{Coalescer, Lookup, Outcome as Flight, Role, Store};
use crate::compress;
use crate::policy::eval::{Request as View, Response as ResponseView, Scheme};
use crate::policy::model::{BackendId, OriginControl, Outcome, RuleSpec};
use crate::policy::testing::{strip_port, OwnedRequest};
use crate::policy::{Decision, Policy};
use crate::throttle::Limiters;
use crate::upstream::{static_files, Pool, StaticConfig, UpstreamError};
use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use hyper::body::{Body as _, Incoming};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// The name in `Cache-Status` (RFC 9211 section 2).
pub const CACHE_NAME: &str = "Portico";
const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

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
        Gateway {
            inner: Arc::new(Inner {
                current: ArcSwap::from_pointee(generation),
                store,
                coalescer: Coalescer::new(hit_for_miss),
                errors: ErrorPages::new(),
                via: HeaderValue::from_static("1.1 portico"),
                metrics: Metrics::new(),
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

    /// The cache key a GET of `url` has under the current policy, if it is cached.
    pub fn key_for_url(&self, url: &str) -> Result<Option<String>, String> {
        let gen = self.current();
        let req = OwnedRequest::new("GET", url, &[], None)?;
        let view = req.view();
        let d = gen.policy.decide(&view);
        Ok(gen.policy.cache_key(&d, &view))
    }

    async fn serve(
        &self,
        gen: &Arc<Generation>,
        req: Request<RequestBody>,
        conn: &ConnInfo,
        log: &mut Log,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        // ---- receive
        let host = request_host(&req).ok_or(ProxyError::BadRequest("missing Host"))?;
        if !req.uri().path().starts_with('/') && req.method() != Method::OPTIONS {
            return Err(ProxyError::BadRequest("the request target is not a path"));
        }
        let scheme = if conn.tls {
            Scheme::Https
        } else {
            Scheme::Http
        };
        let client_ip = conn.client_addr.ip();
        if hygiene::is_upgrade(req.headers()) {
            return self.upgrade(gen, req, &host, scheme, conn, log).await;
        }
        let (parts, req_body) = req.into_parts();
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
        log.backend = Some(backend);

        // ---- throttle
        if let Some(limiter) = rule.limiter {
            if let Err(retry) = gen.limiters.check(limiter, &view) {
                metrics::counter!("portico_throttled_total").increment(1);
                return Err(ProxyError::TooManyRequests {
                    retry_after_secs: Some(retry.as_secs().max(1)),
                });
            }
        }
        if let (Some(max), Some(len)) = (rule.limits.max_body, content_length(&parts.headers)) {
            if len > max {
                return Err(ProxyError::PayloadTooLarge { limit: max });
            }
        }
        // A body without a declared length is counted while it streams.
        let req_body = match rule.limits.max_body {
            Some(max) if max < req_body.limit() => RequestBody::new(req_body.into_inner(), max),
            _ => req_body,
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
            let upstream = build_upstream(&parts, rule, conn, &self.inner.via, false);
            let body = req_body.map_err(BoxError::from).boxed_unsync();
            let started = Instant::now();
            let result = self.fetch(gen, backend, rule, &view, upstream, body).await;
            log.upstream = Some(started.elapsed());
            let mut resp = result?;
            if unsafe_method && (resp.status().is_success() || resp.status().is_redirection()) {
                self.invalidate_after_unsafe(gen, &view, resp.headers());
            }
            let status = resp.status().as_u16();
            hygiene::strip_hop_by_hop(resp.headers_mut(), false);
            let actions = policy.decide_response(
                &view,
                &ResponseView {
                    status,
                    headers: resp.headers(),
                },
            );
            for e in actions.headers.iter().chain(&rule.response_headers) {
                e.apply(resp.headers_mut());
            }
            set_cache_status(
                resp.headers_mut(),
                &CacheStatus::Forward {
                    reason,
                    status: Some(status),
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
                        return Ok(self.deliver(gen, rule, &parts, &entry, &status, now));
                    }
                    Reuse::StaleWhileRevalidate => {
                        log.cache = "stale";
                        metrics::counter!("portico_cache_results_total", "result" => "stale")
                            .increment(1);
                        self.refresh_in_background(gen, &d, &key, &parts, conn, &host, &entry);
                        let status = CacheStatus::Hit {
                            ttl: entry.ttl_at(now),
                            detail: Some("stale-while-revalidate"),
                        };
                        return Ok(self.deliver(gen, rule, &parts, &entry, &status, now));
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
                    Reuse::GatewayTimeout => return Err(ProxyError::GatewayTimeout),
                }
            }
            Lookup::VaryMiss if directives.only_if_cached => {
                return Err(ProxyError::GatewayTimeout)
            }
            Lookup::Miss if directives.only_if_cached => return Err(ProxyError::GatewayTimeout),
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
        let role = self.inner.coalescer.join(&key);
        let leader = match role {
            Role::Leader(leader) => Some(leader),
            Role::Follower(follower) => {
                metrics::counter!("portico_cache_coalesced_total").increment(1);
                match follower.wait().await {
                    Flight::Ready(entry) => {
                        let status = CacheStatus::Forward {
                            reason: forward,
                            status: Some(entry.status.as_u16()),
                            stored: true,
                            collapsed: true,
                            detail: None,
                        };
                        return Ok(self.deliver(
                            gen,
                            rule,
                            &parts,
                            &entry,
                            &status,
                            SystemTime::now(),
                        ));
                    }
                    // Not storable, or the leader failed: each goes on its own.
                    Flight::NotStorable | Flight::Retry => None,
                }
            }
            Role::Bypass => None,
        };
        let started = Instant::now();
        let fetched = self
            .fill(
                gen,
                rule,
                &key,
                &parts,
                conn,
                &host,
                stale.as_ref().map(|(e, _)| e),
            )
            .await;
        log.upstream = Some(started.elapsed());
        match fetched {
            Ok(Filled::Stored(entry, fwd_status, cookies)) => {
                if let Some(l) = leader {
                    l.publish(Flight::Ready(entry.clone()));
                }
                let status = CacheStatus::Forward {
                    reason: forward,
                    status: Some(fwd_status),
                    stored: true,
                    collapsed: false,
                    detail: None,
                };
                let mut resp = self.deliver(gen, rule, &parts, &entry, &status, SystemTime::now());
                // The cookie was set for this client alone; the stored copy has none.
                for c in cookies {
                    resp.headers_mut().append(header::SET_COOKIE, c);
                }
                Ok(resp)
            }
            Ok(Filled::Passed(mut resp, detail)) => {
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
                            &parts,
                            entry,
                            status.as_u16(),
                            log,
                        ));
                    }
                }
                set_cache_status(
                    resp.headers_mut(),
                    &CacheStatus::Forward {
                        reason: forward,
                        status: Some(status.as_u16()),
                        stored: false,
                        collapsed: false,
                        detail: Some(detail),
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
            Err(e) => {
                drop(leader);
                if let Some((entry, true)) = &stale {
                    return Ok(self.serve_stale_on_error(
                        gen,
                        rule,
                        &parts,
                        entry,
                        e.status().as_u16(),
                        log,
                    ));
                }
                Err(e)
            }
        }
    }

    fn serve_stale_on_error(
        &self,
        gen: &Generation,
        rule: &RuleSpec,
        parts: &http::request::Parts,
        entry: &Arc<Entry>,
        fwd_status: u16,
        log: &mut Log,
    ) -> Response<ResponseBody> {
        log.cache = "stale-if-error";
        metrics::counter!("portico_cache_results_total", "result" => "stale-if-error").increment(1);
        let status = CacheStatus::Forward {
            reason: Forward::Stale,
            status: Some(fwd_status),
            stored: false,
            collapsed: false,
            detail: Some("stale-if-error"),
        };
        self.deliver(gen, rule, parts, entry, &status, SystemTime::now())
    }

    /// Sends a request to a backend and returns the response head with its body.
    async fn fetch(
        &self,
        gen: &Generation,
        backend: BackendId,
        rule: &RuleSpec,
        view: &View<'_>,
        upstream: Request<()>,
        body: ResponseBody,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        match &gen.backends[backend] {
            BackendRuntime::Static(cfg) => {
                let resp = static_files::serve(cfg, &upstream).await;
                Ok(resp.map(|b| b.map_err(|never| match never {}).boxed_unsync()))
            }
            BackendRuntime::Pool(pool) => {
                let spec = &gen.policy.model.backends[backend];
                let hash_key = (!spec.hash_key.is_empty()).then(|| {
                    let mut k = String::new();
                    crate::policy::eval::render_key(&spec.hash_key, view, &mut k);
                    k
                });
                let (parts, ()) = upstream.into_parts();
                let req = Request::from_parts(parts, body);
                let send = pool.send(req, hash_key.as_deref().map(str::as_bytes));
                let limit = rule
                    .limits
                    .total_timeout
                    .into_iter()
                    .chain(rule.limits.first_byte_timeout)
                    .min();
                let result = match limit {
                    Some(limit) => match tokio::time::timeout(limit, send).await {
                        Ok(r) => r,
                        Err(_) => return Err(ProxyError::GatewayTimeout),
                    },
                    None => send.await,
                };
                match result {
                    Ok(resp) => {
                        Ok(resp.map(|b: Incoming| b.map_err(BoxError::from).boxed_unsync()))
                    }
                    Err(e) => Err(upstream_error(&e)),
                }
            }
        }
    }

    /// Fetches a cacheable request and stores what may be stored.
    #[allow(clippy::too_many_arguments)]
    async fn fill(
        &self,
        gen: &Generation,
        rule: &RuleSpec,
        key: &str,
        parts: &http::request::Parts,
        conn: &ConnInfo,
        host: &str,
        stale: Option<&Arc<Entry>>,
    ) -> Result<Filled, ProxyError> {
        let Outcome::Forward(backend) = rule.outcome else {
            return Err(ProxyError::Internal(
                "a cached rule without a backend".into(),
            ));
        };
        let cache = rule.cache.as_ref().expect("only cached rules fill");
        let mut upstream = build_upstream(parts, rule, conn, &self.inner.via, true);
        if let Some(entry) = stale {
            control::add_validators(&entry.headers, upstream.headers_mut());
        }
        let view = View {
            method: &parts.method,
            scheme: if conn.tls {
                Scheme::Https
            } else {
                Scheme::Http
            },
            host,
            path: parts.uri.path(),
            query: parts.uri.query().unwrap_or(""),
            headers: &parts.headers,
            client_ip: Some(conn.client_addr.ip()),
        };
        let request_time = SystemTime::now();
        let resp = self
            .fetch(gen, backend, rule, &view, upstream, body::empty())
            .await?;
        let response_time = SystemTime::now();
        let (mut head, resp_body) = resp.into_parts();
        hygiene::strip_hop_by_hop(&mut head.headers, false);
        let policy = &gen.policy;
        let storage = &policy.model.storage;

        // A 304 to our validators refreshes the stored copy (RFC 9111 section 4.3.4).
        if head.status == StatusCode::NOT_MODIFIED {
            if let Some(entry) = stale {
                metrics::counter!("portico_cache_revalidations_total", "result" => "304")
                    .increment(1);
                let mut headers = entry.headers.clone();
                control::merge_not_modified(&mut headers, &head.headers);
                let refreshed = self.make_entry(
                    gen,
                    rule,
                    &view,
                    entry.status,
                    headers,
                    entry.body.clone(),
                    parts,
                    request_time,
                    response_time,
                );
                if let Ok(e) = refreshed {
                    let e = Arc::new(e);
                    self.inner.store.store_response(key, Entry::clone(&e)).await;
                    return Ok(Filled::Stored(e, 304, Vec::new()));
                }
                // The refreshed copy may no longer be stored: pass the old body once.
                let mut resp = Response::from_parts(head, body::full(entry.body.clone()));
                *resp.status_mut() = entry.status;
                return Ok(Filled::Passed(resp, "not-storable"));
            }
        } else if stale.is_some() {
            metrics::counter!("portico_cache_revalidations_total", "result" => "200").increment(1);
        }

        let actions = policy.decide_response(
            &view,
            &ResponseView {
                status: head.status.as_u16(),
                headers: &head.headers,
            },
        );
        for e in &actions.headers {
            e.apply(&mut head.headers);
        }
        let overrides = overrides(cache, &actions);
        let directives = control::response_directives(&head.headers, &gen.targeted);
        let verdict = if actions.no_store {
            Err("policy")
        } else {
            control::storable(
                &Method::GET,
                &parts.headers,
                head.status,
                &head.headers,
                &directives,
                &overrides,
            )
            .map_err(|n| n.as_str())
        };
        if let Err(reason) = verdict {
            metrics::counter!("portico_cache_not_stored_total", "reason" => reason).increment(1);
            return Ok(Filled::Passed(
                Response::from_parts(head, resp_body),
                reason,
            ));
        }
        let max = storage.max_object;
        if content_length(&head.headers).is_some_and(|n| n > max) {
            metrics::counter!("portico_cache_not_stored_total", "reason" => "too-large")
                .increment(1);
            return Ok(Filled::Passed(
                Response::from_parts(head, resp_body),
                "too-large",
            ));
        }
        let (body_bytes, rest) = collect_up_to(resp_body, max as usize).await?;
        if let Some(rest) = rest {
            // Larger than the largest object: stream the rest through, store nothing.
            metrics::counter!("portico_cache_not_stored_total", "reason" => "too-large")
                .increment(1);
            let first = http_body_util::Full::new(body_bytes).map_err(|never| match never {});
            let chained = Chain {
                first: Some(first),
                rest,
            };
            return Ok(Filled::Passed(
                Response::from_parts(head, chained.boxed_unsync()),
                "too-large",
            ));
        }
        let cookies: Vec<HeaderValue> = head
            .headers
            .get_all(header::SET_COOKIE)
            .iter()
            .cloned()
            .collect();
        let received = Received {
            status: head.status,
            headers: head.headers,
            body: body_bytes,
            request_headers: &parts.headers,
            request_time,
            response_time,
        };
        let entry =
            match Entry::from_response(received, &directives, &overrides, storage.heuristic_max) {
                Ok(e) => e,
                Err(n) => {
                    return Err(ProxyError::Internal(format!(
                        "entry refused after storable: {n}"
                    )));
                }
            };
        let entry = Arc::new(entry);
        let stored = self
            .inner
            .store
            .store_response(key, Entry::clone(&entry))
            .await;
        if !stored {
            metrics::counter!("portico_cache_not_stored_total", "reason" => "store-refused")
                .increment(1);
        }
        let status = entry.status.as_u16();
        Ok(Filled::Stored(entry, status, cookies))
    }

    #[allow(clippy::too_many_arguments)]
    fn make_entry(
        &self,
        gen: &Generation,
        rule: &RuleSpec,
        view: &View<'_>,
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        parts: &http::request::Parts,
        request_time: SystemTime,
        response_time: SystemTime,
    ) -> Result<Entry, &'static str> {
        let cache = rule.cache.as_ref().ok_or("bypass")?;
        let actions = gen.policy.decide_response(
            view,
            &ResponseView {
                status: status.as_u16(),
                headers: &headers,
            },
        );
        if actions.no_store {
            return Err("policy");
        }
        let overrides = overrides(cache, &actions);
        let directives = control::response_directives(&headers, &gen.targeted);
        control::storable(
            &Method::GET,
            &parts.headers,
            status,
            &headers,
            &directives,
            &overrides,
        )
        .map_err(|n| n.as_str())?;
        Entry::from_response(
            Received {
                status,
                headers,
                body,
                request_headers: &parts.headers,
                request_time,
                response_time,
            },
            &directives,
            &overrides,
            gen.policy.model.storage.heuristic_max,
        )
        .map_err(|n| n.as_str())
    }

    /// stale-while-revalidate: one background refresh per key (RFC 5861 section 3).
    #[allow(clippy::too_many_arguments)]
    fn refresh_in_background(
        &self,
        gen: &Arc<Generation>,
        d: &Decision<'_>,
        key: &str,
        parts: &http::request::Parts,
        conn: &ConnInfo,
        host: &str,
        entry: &Arc<Entry>,
    ) {
        let Role::Leader(leader) = self.inner.coalescer.join(key) else {
            return;
        };
        let Some(index) = d.index else { return };
        let this = self.clone();
        let gen = gen.clone();
        let key = key.to_string();
        let host = host.to_string();
        let conn = conn.clone();
        let entry = entry.clone();
        let mut head = Request::new(());
        *head.method_mut() = Method::GET;
        *head.uri_mut() = parts.uri.clone();
        *head.headers_mut() = parts.headers.clone();
        let (bg_parts, ()) = head.into_parts();
        tokio::spawn(async move {
            let rule = &gen.policy.model.rules[index];
            match this
                .fill(&gen, rule, &key, &bg_parts, &conn, &host, Some(&entry))
                .await
            {
                Ok(Filled::Stored(e, ..)) => leader.publish(Flight::Ready(e)),
                Ok(Filled::Passed(..)) => leader.publish(Flight::NotStorable),
                Err(e) => {
                    tracing::debug!(key, error = %e, "background refresh failed");
                    drop(leader);
                }
            }
        });
    }

    /// Builds the response for a stored entry: conditional answers, ranges,
    /// compression, Age, Cache-Status, header edits.
    fn deliver(
        &self,
        gen: &Generation,
        rule: &RuleSpec,
        parts: &http::request::Parts,
        entry: &Arc<Entry>,
        status: &CacheStatus<'_>,
        now: SystemTime,
    ) -> Response<ResponseBody> {
        let storage = &gen.policy.model.storage;
        let age = HeaderValue::from(entry.age_at(now).as_secs());
        if control::answers_not_modified(&parts.method, &parts.headers, &entry.headers) {
            let mut resp = Response::new(body::empty());
            *resp.status_mut() = StatusCode::NOT_MODIFIED;
            for name in [
                header::CACHE_CONTROL,
                header::CONTENT_LOCATION,
                header::DATE,
                header::ETAG,
                header::EXPIRES,
                header::LAST_MODIFIED,
                header::VARY,
            ] {
                for v in entry.headers.get_all(&name) {
                    resp.headers_mut().append(name.clone(), v.clone());
                }
            }
            resp.headers_mut().insert(header::AGE, age);
            set_cache_status(resp.headers_mut(), status);
            return resp;
        }
        let mut headers = entry.headers.clone();
        headers.insert(header::AGE, age);
        if storage.strip_targeted {
            for name in &gen.targeted {
                headers.remove(name);
            }
        }
        let mut code = entry.status;
        let mut payload = entry.body.clone();
        let range = parts
            .headers
            .get(header::RANGE)
            .filter(|_| parts.method == Method::GET && code == StatusCode::OK)
            .and_then(|v| v.to_str().ok());
        if let Some(range) = range {
            match byte_range(range, payload.len() as u64) {
                RangeAnswer::Full => {}
                RangeAnswer::Partial(start, end) => {
                    code = StatusCode::PARTIAL_CONTENT;
                    headers.insert(
                        header::CONTENT_RANGE,
                        HeaderValue::from_str(&format!("bytes {start}-{end}/{}", payload.len()))
                            .expect("digits are a valid header value"),
                    );
                    payload = payload.slice(start as usize..=end as usize);
                }
                RangeAnswer::Unsatisfiable => {
                    code = StatusCode::RANGE_NOT_SATISFIABLE;
                    headers.insert(
                        header::CONTENT_RANGE,
                        HeaderValue::from_str(&format!("bytes */{}", payload.len()))
                            .expect("digits are a valid header value"),
                    );
                    payload = Bytes::new();
                }
            }
        } else if let Some(spec) = &rule.compress {
            if compress::applies(spec, &headers, payload.len()) {
                headers.append(header::VARY, HeaderValue::from_static("accept-encoding"));
                if let Some(alg) =
                    compress::negotiate(parts.headers.get(header::ACCEPT_ENCODING), spec)
                {
                    payload = compress::compress(alg, spec.level, &payload).into();
                    headers.insert(
                        header::CONTENT_ENCODING,
                        HeaderValue::from_static(alg.as_str()),
                    );
                    headers.remove(header::ETAG);
                }
            }
        }
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(payload.len()));
        let body = if parts.method == Method::HEAD {
            body::empty()
        } else {
            body::full(payload)
        };
        let mut resp = Response::new(body);
        *resp.status_mut() = code;
        *resp.headers_mut() = headers;
        set_cache_status(resp.headers_mut(), status);
        for e in &rule.response_headers {
            e.apply(resp.headers_mut());
        }
        resp
    }

    /// Unsafe methods that succeed invalidate the target URL and same-host
    /// Location and Content-Location (RFC 9111 section 4.4).
    fn invalidate_after_unsafe(&self, gen: &Generation, view: &View<'_>, resp: &HeaderMap) {
        let scheme = view.scheme.as_str();
        let mut urls = vec![format!("{scheme}://{}{}", view.host, view.path)];
        if !view.query.is_empty() {
            urls[0] = format!("{}?{}", urls[0], view.query);
        }
        for name in [header::LOCATION, header::CONTENT_LOCATION] {
            let Some(v) = resp.get(&name).and_then(|v| v.to_str().ok()) else {
                continue;
            };
            if v.starts_with('/') {
                urls.push(format!("{scheme}://{}{v}", view.host));
            } else if let Ok(req) = OwnedRequest::new("GET", v, &[], None) {
                if req.host == view.host {
                    urls.push(v.to_string());
                }
            }
        }
        for url in urls {
            let Ok(req) = OwnedRequest::new("GET", &url, &[], None) else {
                continue;
            };
            let v = req.view();
            let d = gen.policy.decide(&v);
            if let Some(key) = gen.policy.cache_key(&d, &v) {
                let n = self.inner.store.purge(&key);
                tracing::debug!(key, purged = n, "invalidated after an unsafe method");
            }
        }
    }

    /// `PURGE` on the main listener, from the addresses the policy allows.
    fn purge_method(&self, gen: &Generation, view: &View<'_>) -> Response<ResponseBody> {
        let allowed = view
            .client_ip
            .is_some_and(|ip| gen.policy.model.purge.allow.iter().any(|n| n.contains(&ip)));
        if !allowed {
            return json(
                StatusCode::FORBIDDEN,
                r#"{"error":"PURGE is not allowed from this address"}"#.into(),
            );
        }
        let get = Method::GET;
        let as_get = View {
            method: &get,
            ..*view
        };
        let d = gen.policy.decide(&as_get);
        let purged = gen
            .policy
            .cache_key(&d, &as_get)
            .map(|k| self.inner.store.purge(&k))
            .unwrap_or(0);
        json(StatusCode::OK, format!(r#"{{"purged":{purged}}}"#))
    }

    /// WebSocket and other upgrades: forwarded, never cached, then spliced.
    async fn upgrade(
        &self,
        gen: &Generation,
        mut req: Request<RequestBody>,
        host: &str,
        scheme: Scheme,
        conn: &ConnInfo,
        log: &mut Log,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let (rule, backend) = {
            let view = View {
                method: req.method(),
                scheme,
                host,
                path: req.uri().path(),
                query: req.uri().query().unwrap_or(""),
                headers: req.headers(),
                client_ip: Some(conn.client_addr.ip()),
            };
            let d = gen.policy.decide(&view);
            let Outcome::Forward(b) = d.rule.outcome else {
                return Ok(synthetic(
                    &d.rule.outcome,
                    &self.inner.errors,
                    req.headers(),
                ));
            };
            // The throttle holds for upgrades too, or an Upgrade header would sidestep it.
            if let Some(limiter) = d.rule.limiter {
                if let Err(retry) = gen.limiters.check(limiter, &view) {
                    metrics::counter!("portico_throttled_total").increment(1);
                    return Err(ProxyError::TooManyRequests {
                        retry_after_secs: Some(retry.as_secs().max(1)),
                    });
                }
            }
            log.rule = d.index;
            log.backend = Some(b);
            (d.rule, b)
        };
        log.cache = "bypass";
        let BackendRuntime::Pool(pool) = &gen.backends[backend] else {
            return Err(ProxyError::BadRequest("upgrades need a server backend"));
        };
        let mut upstream = Request::new(body::empty());
        *upstream.method_mut() = req.method().clone();
        *upstream.uri_mut() = req.uri().clone();
        *upstream.headers_mut() = req.headers().clone();
        for e in &rule.request_headers {
            e.apply(upstream.headers_mut());
        }
        hygiene::prepare_upstream_request(
            &mut upstream,
            &ForwardContext {
                client_ip: conn.client_addr.ip(),
                tls: conn.tls,
                trust_forwarded: false,
                via: &self.inner.via,
            },
        );
        let mut resp = pool
            .send(upstream, None)
            .await
            .map_err(|e| upstream_error(&e))?;
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            match super::upgrade::PendingUpgrade::take(&mut req, &mut resp) {
                Ok(pending) => pending.spawn(),
                Err(e) => return Err(ProxyError::BadGateway(e.to_string())),
            }
        }
        Ok(resp.map(|b| b.map_err(BoxError::from).boxed_unsync()))
    }
}

impl Handler for Gateway {
    async fn handle(
        &self,
        req: Request<RequestBody>,
        conn: Arc<ConnInfo>,
    ) -> Response<ResponseBody> {
        let started = Instant::now();
        let gen = self.current();
        // What the log and an error page need, kept before the request is consumed.
        let method = req.method().clone();
        let uri = req.uri().clone();
        let host = req.headers().get(header::HOST).cloned();
        let mut accept = HeaderMap::new();
        if let Some(v) = req.headers().get(header::ACCEPT) {
            accept.insert(header::ACCEPT, v.clone());
        }
        let mut log = Log::default();
        let mut resp = match self.serve(&gen, req, &conn, &mut log).await {
            Ok(resp) => resp,
            Err(e) => {
                let mut resp = self.inner.errors.respond(&e, Some(&accept));
                if log.cache.is_empty() {
                    log.cache = "error";
                }
                set_cache_status(
                    resp.headers_mut(),
                    &CacheStatus::Forward {
                        reason: log.forward.unwrap_or(Forward::Bypass),
                        status: None,
                        stored: false,
                        collapsed: false,
                        detail: Some(error_detail(&e)),
                    },
                );
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
        let status = resp.status().as_u16();
        let bytes = resp.body().size_hint().exact().unwrap_or(0);
        let elapsed = started.elapsed();
        let m = &self.inner.metrics;
        m.requests[usize::from((status / 100).clamp(1, 5) - 1)].increment(1);
        m.duration.record(elapsed.as_secs_f64());
        let model = &gen.policy.model;
        tracing::info!(
            target: "portico::access",
            client = %conn.client_addr.ip(),
            method = %method,
            host = %host.as_ref().and_then(|h| h.to_str().ok()).or_else(|| uri.host()).unwrap_or("-"),
            path = %uri.path(),
            status,
            bytes,
            duration_us = elapsed.as_micros() as u64,
            upstream_us = log.upstream.map(|d| d.as_micros() as u64),
            rule = %log.rule.map_or("-", |i| model.rules[i].name.as_str()),
            backend = %log.backend.map_or("-", |i| model.backends[i].name.as_str()),
            cache = log.cache,
        );
        resp
    }
}

/// The result of filling the cache for a request.
enum Filled {
    /// Stored (or refreshed); deliver from the entry. The status the origin
    /// answered, and the `Set-Cookie` values (not stored) for the client
    /// whose request filled the cache.
    Stored(Arc<Entry>, u16, Vec<HeaderValue>),
    /// Not stored: pass the origin's response through, with the reason.
    Passed(Response<ResponseBody>, &'static str),
}

fn overrides(
    cache: &crate::policy::model::CacheSpec,
    actions: &crate::policy::model::ResponseActions,
) -> Overrides {
    Overrides {
        ttl: actions.ttl.or(cache.ttl),
        ignore_origin: cache.origin == OriginControl::Ignore || actions.ttl.is_some(),
        store_set_cookie: cache.store_set_cookie || actions.store_set_cookie,
        stale_while_revalidate: actions
            .stale_while_revalidate
            .or(cache.stale_while_revalidate),
        stale_if_error: actions.stale_if_error.or(cache.stale_if_error),
    }
}

/// The request to send upstream: the client's method, path and headers, the
/// rule's header edits, and header hygiene. For a cache fill the method is
/// GET and the client's own conditionals and ranges are dropped: the cache
/// fetches the whole object and answers those itself.
fn build_upstream(
    parts: &http::request::Parts,
    rule: &RuleSpec,
    conn: &ConnInfo,
    via: &HeaderValue,
    fill: bool,
) -> Request<()> {
    let mut req = Request::new(());
    *req.method_mut() = if fill {
        Method::GET
    } else {
        parts.method.clone()
    };
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    *req.uri_mut() = path_and_query
        .parse()
        .unwrap_or_else(|_| http::Uri::from_static("/"));
    let mut headers = parts.headers.clone();
    if !headers.contains_key(header::HOST) {
        if let Some(a) = parts.uri.authority() {
            if let Ok(v) = HeaderValue::from_str(a.as_str()) {
                headers.insert(header::HOST, v);
            }
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
    *req.headers_mut() = headers;
    for e in &rule.request_headers {
        e.apply(req.headers_mut());
    }
    hygiene::prepare_upstream_request(
        &mut req,
        &ForwardContext {
            client_ip: conn.client_addr.ip(),
            tls: conn.tls,
            trust_forwarded: false,
            via,
        },
    );
    req
}

fn request_host<B>(req: &Request<B>) -> Option<String> {
    let raw = match req.uri().authority() {
        Some(a) => a.as_str(),
        None => req.headers().get(header::HOST)?.to_str().ok()?,
    };
    let host = strip_port(raw.rsplit('@').next().unwrap_or(raw));
    if host.is_empty() {
        return None;
    }
    Some(host.to_ascii_lowercase())
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
        ProxyError::ServiceUnavailable { .. } => "no-healthy-server",
        ProxyError::TooManyRequests { .. } => "throttled",
        ProxyError::PayloadTooLarge { .. } => "body-too-large",
        ProxyError::BadRequest(_) => "bad-request",
        _ => "error",
    }
}

fn set_cache_status(headers: &mut HeaderMap, status: &CacheStatus<'_>) {
    if let Ok(v) = HeaderValue::from_str(&status.render(CACHE_NAME)) {
        headers.insert(CACHE_STATUS, v);
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

/// Responses the policy makes itself: redirect, deny, respond, no route.
fn synthetic(
    outcome: &Outcome,
    errors: &ErrorPages,
    request: &HeaderMap,
) -> Response<ResponseBody> {
    match outcome {
        Outcome::Redirect { status, location } => {
            let mut resp = Response::new(body::empty());
            *resp.status_mut() = StatusCode::from_u16(*status).unwrap_or(StatusCode::FOUND);
            if let Ok(v) = HeaderValue::from_str(location) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            resp.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(0));
            resp
        }
        Outcome::Deny { status } => {
            let code = StatusCode::from_u16(*status).unwrap_or(StatusCode::FORBIDDEN);
            let mut resp = Response::new(body::full(format!(
                "{} {}\n",
                code.as_u16(),
                code.canonical_reason().unwrap_or("Denied")
            )));
            *resp.status_mut() = code;
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            resp
        }
        Outcome::Respond {
            status,
            body: text,
            content_type,
        } => {
            let mut resp = Response::new(body::full(text.clone()));
            *resp.status_mut() = StatusCode::from_u16(*status).unwrap_or(StatusCode::OK);
            if let Ok(v) = HeaderValue::from_str(content_type) {
                resp.headers_mut().insert(header::CONTENT_TYPE, v);
            }
            resp
        }
        Outcome::NoRoute | Outcome::Forward(_) => {
            errors.respond(&ProxyError::NotFound, Some(request))
        }
    }
}

/// A single byte range against a representation of `len` bytes (RFC 9110 section 14).
#[derive(Debug, PartialEq, Eq)]
enum RangeAnswer {
    /// Not a range we answer (several ranges, other units): the whole object.
    Full,
    /// Inclusive start and end.
    Partial(u64, u64),
    Unsatisfiable,
}

fn byte_range(header: &str, len: u64) -> RangeAnswer {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return RangeAnswer::Full;
    };
    if spec.contains(',') {
        return RangeAnswer::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeAnswer::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    let parsed = match (a.is_empty(), b.is_empty()) {
        (true, false) => match b.parse::<u64>() {
            Ok(0) => return RangeAnswer::Unsatisfiable,
            Ok(n) => Some((len.saturating_sub(n), len.saturating_sub(1))),
            Err(_) => None,
        },
        (false, true) => a.parse::<u64>().ok().map(|s| (s, len.saturating_sub(1))),
        (false, false) => match (a.parse::<u64>(), b.parse::<u64>()) {
            (Ok(s), Ok(e)) if s <= e => Some((s, e.min(len.saturating_sub(1)))),
            _ => None,
        },
        (true, true) => None,
    };
    match parsed {
        None => RangeAnswer::Full,
        Some((s, _)) if s >= len => RangeAnswer::Unsatisfiable,
        Some((s, e)) => RangeAnswer::Partial(s, e),
    }
}

/// Reads a body up to `max` bytes. Returns the bytes and, when the body is
/// longer, the unread rest (the bytes returned are then a prefix).
async fn collect_up_to(
    mut body: ResponseBody,
    max: usize,
) -> Result<(Bytes, Option<ResponseBody>), ProxyError> {
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| ProxyError::BadGateway(format!("reading the origin's body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            buf.extend_from_slice(&data);
            if buf.len() > max {
                return Ok((buf.freeze(), Some(body)));
            }
        }
    }
    Ok((buf.freeze(), None))
}

/// A body that yields a buffered prefix, then the rest of a stream.
struct Chain<A> {
    first: Option<A>,
    rest: ResponseBody,
}

impl<A> hyper::body::Body for Chain<A>
where
    A: hyper::body::Body<Data = Bytes, Error = std::convert::Infallible> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        if let Some(first) = self.first.as_mut() {
            match std::pin::Pin::new(first).poll_frame(cx) {
                std::task::Poll::Ready(Some(Ok(f))) => return std::task::Poll::Ready(Some(Ok(f))),
                std::task::Poll::Ready(_) => self.first = None,
                std::task::Poll::Pending => return std::task::Poll::Pending,
            }
        }
        std::pin::Pin::new(&mut self.rest).poll_frame(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_ranges() {
        let cases = [
            ("bytes=0-9", 100, RangeAnswer::Partial(0, 9)),
            ("bytes=90-", 100, RangeAnswer::Partial(90, 99)),
            ("bytes=-10", 100, RangeAnswer::Partial(90, 99)),
            ("bytes=50-500", 100, RangeAnswer::Partial(50, 99)),
            ("bytes=100-", 100, RangeAnswer::Unsatisfiable),
            ("bytes=-0", 100, RangeAnswer::Unsatisfiable),
            ("bytes=0-1,5-6", 100, RangeAnswer::Full),
            ("items=0-1", 100, RangeAnswer::Full),
            ("bytes=9-1", 100, RangeAnswer::Full),
        ];
        for (h, len, want) in cases {
            assert_eq!(byte_range(h, len), want, "{h}");
        }
    }

    #[test]
    fn hosts_lose_ports_and_case() {
        let req = Request::builder()
            .uri("/x")
            .header("host", "Shop.Example:8080")
            .body(())
            .unwrap();
        assert_eq!(request_host(&req).as_deref(), Some("shop.example"));
        let req = Request::builder()
            .uri("https://[::1]:8443/x")
            .body(())
            .unwrap();
        assert_eq!(request_host(&req).as_deref(), Some("[::1]"));
        let req = Request::builder().uri("/x").body(()).unwrap();
        assert_eq!(request_host(&req), None);
    }
}
