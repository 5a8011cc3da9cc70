//! A live backend: its servers, their health and load, the balancer, and a
//! keep-alive HTTP/1.1 client (plain or TLS) that sends requests to them with
//! time limits and failover.
//!
//! Retry rules (RFC 9110 §9.2.2): a request whose connection could not be
//! made was never sent, so it goes to another server whatever its method,
//! provided its body was not read. A request that was sent and lost to a
//! reset or close before any response byte is retried only when its method is
//! idempotent and its body is empty or was never read. Anything else is
//! answered with the error: a non-idempotent request is never sent twice.

use std::error::Error as StdError;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty};
use hyper::body::{Body, Frame, SizeHint};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio_rustls::TlsConnector;

use super::balance::{self, Load, Selector};
use super::config::{BackendConfig, HealthConfig, Limits, Timeouts, UpstreamTls};
use super::conn::{self, ConnError, Connections, ExchangeError, PooledBody};
use super::health::{HealthChecker, HealthState, ProbeFuture};

/// A boxed error of a body or connector.
pub type BoxError = Box<dyn StdError + Send + Sync>;

pub(super) type UpstreamBody = UnsyncBoxBody<Bytes, BoxError>;

/// Why a request to a backend got no response.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Every server is down or ejected (or the backend has none).
    #[error("backend `{backend}` has no healthy server")]
    NoHealthyServer {
        /// The backend's name.
        backend: String,
    },
    /// The connection to a server could not be made.
    #[error("connecting to {server} failed: {source}")]
    Connect {
        /// The server's address.
        server: String,
        /// What the connector reported.
        source: BoxError,
    },
    /// The connection to a server was not made in time.
    #[error("connecting to {server} timed out")]
    ConnectTimeout {
        /// The server's address.
        server: String,
    },
    /// The server did not send a response head in time.
    #[error("{server} sent no response within {after:?}")]
    FirstByteTimeout {
        /// The server's address.
        server: String,
        /// The limit that ran out.
        after: Duration,
    },
    /// The whole exchange, attempts included, ran past its limit.
    #[error("backend `{backend}` gave no response within {after:?}")]
    TotalTimeout {
        /// The backend's name.
        backend: String,
        /// The limit that ran out.
        after: Duration,
    },
    /// The connection was closed or reset before a response arrived.
    #[error("{server} closed the connection before responding: {source}")]
    Reset {
        /// The server's address.
        server: String,
        /// What the client reported.
        source: BoxError,
    },
    /// The server answered something that is not valid HTTP/1.1.
    #[error("bad response from {server}: {source}")]
    BadResponse {
        /// The server's address.
        server: String,
        /// What the client reported.
        source: BoxError,
    },
    /// The client stopped sending its request body for the stall limit
    /// (the first-byte limit): the client's fault, not the server's.
    #[error("the request body to {server} stalled")]
    RequestBodyTimeout {
        /// The server's address.
        server: String,
    },
    /// The client's request body failed while it was being sent (the
    /// client went away, broke its framing, or outgrew a size limit): the
    /// client's fault, not the server's.
    #[error("the request body to {server} failed: {source}")]
    RequestBody {
        /// The server's address.
        server: String,
        /// What the body reported.
        source: BoxError,
    },
    /// The backend's configuration cannot be used.
    #[error("backend `{backend}`: {reason}")]
    Config {
        /// The backend's name.
        backend: String,
        /// What is wrong.
        reason: String,
    },
}

impl UpstreamError {
    /// The status the client is answered with: 503 when no server can take
    /// the request, 504 when a time limit ran out, 502 when a server failed
    /// (RFC 9110 §15.6.3-5), 400 when the client's body failed, 408 when it
    /// stalled, 500 for a backend that could not be configured.
    pub fn status(&self) -> StatusCode {
        match self {
            UpstreamError::RequestBody { .. } => StatusCode::BAD_REQUEST,
            UpstreamError::RequestBodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            UpstreamError::NoHealthyServer { .. } => StatusCode::SERVICE_UNAVAILABLE,
            UpstreamError::ConnectTimeout { .. }
            | UpstreamError::FirstByteTimeout { .. }
            | UpstreamError::TotalTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            UpstreamError::Connect { .. }
            | UpstreamError::Reset { .. }
            | UpstreamError::BadResponse { .. } => StatusCode::BAD_GATEWAY,
            UpstreamError::Config { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A short stable name of the error kind, for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            UpstreamError::NoHealthyServer { .. } => "no_healthy_server",
            UpstreamError::Connect { .. } => "connect",
            UpstreamError::ConnectTimeout { .. } => "connect_timeout",
            UpstreamError::FirstByteTimeout { .. } => "first_byte_timeout",
            UpstreamError::TotalTimeout { .. } => "total_timeout",
            UpstreamError::Reset { .. } => "reset",
            UpstreamError::BadResponse { .. } => "bad_response",
            UpstreamError::RequestBody { .. } => "request_body",
            UpstreamError::RequestBodyTimeout { .. } => "request_body_timeout",
            UpstreamError::Config { .. } => "config",
        }
    }

    /// Whether the error is the server's doing (it could not be reached,
    /// reset, timed out, or answered badly), and so counts toward ejecting
    /// it. The client's own body failing, and a backend that cannot be
    /// configured, say nothing of the server's health.
    pub fn is_server_fault(&self) -> bool {
        match self {
            UpstreamError::Connect { .. }
            | UpstreamError::ConnectTimeout { .. }
            | UpstreamError::FirstByteTimeout { .. }
            | UpstreamError::TotalTimeout { .. }
            | UpstreamError::Reset { .. }
            | UpstreamError::BadResponse { .. } => true,
            UpstreamError::NoHealthyServer { .. }
            | UpstreamError::RequestBody { .. }
            | UpstreamError::RequestBodyTimeout { .. }
            | UpstreamError::Config { .. } => false,
        }
    }
}

struct Server {
    addr: String,
    /// `Host` for requests that arrive without one, and for health probes
    /// unless the health check names its own ([`default_host`]).
    host_field: http::HeaderValue,
    /// The host part of `addr`, the TLS server name unless the policy sets one.
    host: String,
}

/// One backend's servers and the machinery to send requests to them.
pub struct Pool {
    name: String,
    servers: Box<[Server]>,
    weights: Box<[u32]>,
    backup: Box<[bool]>,
    selector: Box<dyn Selector>,
    load: Arc<Load>,
    health: Arc<HealthState>,
    conns: Arc<Connections>,
    timeouts: Timeouts,
    checker: Option<HealthChecker>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.name)
            .field(
                "servers",
                &self.servers.iter().map(|s| &s.addr).collect::<Vec<_>>(),
            )
            .field("selector", &self.selector)
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// Builds the pool for `cfg` and, when it has health checks, starts its
    /// checker (so it must be called inside a tokio runtime). Fails on a
    /// server address that is not `host:port`, and on TLS without a CA file.
    pub fn new(cfg: &BackendConfig) -> Result<Pool, UpstreamError> {
        Self::build(cfg, None)
    }

    /// [`Pool::new`] for a changed configuration of the backend `previous`
    /// serves: servers of the same address keep their health (active
    /// verdict, passive ejection; see [`HealthState::carry_over`]), so that
    /// a reload sends no traffic to a server known to be down.
    pub fn after(cfg: &BackendConfig, previous: &Pool) -> Result<Pool, UpstreamError> {
        Self::build(cfg, Some(previous))
    }

    fn build(cfg: &BackendConfig, previous: Option<&Pool>) -> Result<Pool, UpstreamError> {
        let config_error = |reason: String| UpstreamError::Config {
            backend: cfg.name.clone(),
            reason,
        };
        let server_name = cfg.tls.as_ref().and_then(|t| t.server_name.as_deref());
        let mut servers = Vec::with_capacity(cfg.servers.len());
        for s in &cfg.servers {
            let authority: Authority = s
                .addr
                .parse()
                .map_err(|e| config_error(format!("server address `{}`: {e}", s.addr)))?;
            if authority.port_u16().is_none() {
                return Err(config_error(format!(
                    "server address `{}` has no port",
                    s.addr
                )));
            }
            let host_field = default_host(&authority, server_name).map_err(config_error)?;
            servers.push(Server {
                addr: s.addr.clone(),
                host: authority.host().to_owned(),
                host_field,
            });
        }
        let weights: Box<[u32]> = cfg.servers.iter().map(|s| s.weight.max(1)).collect();
        let backup: Box<[bool]> = cfg.servers.iter().map(|s| s.backup).collect();
        let ids: Vec<&str> = cfg.servers.iter().map(|s| s.addr.as_str()).collect();
        let selector = balance::selector_for(cfg.balance, &ids, &weights);

        let tls = match &cfg.tls {
            Some(tls) => Some(tls_connector(tls).map_err(config_error)?),
            None => None,
        };
        let conns = Connections::new(servers.len(), tls, cfg.keepalive);

        let (rise, fall) = cfg.health.as_ref().map_or((1, 1), |h| (h.rise, h.fall));
        let health = HealthState::labelled(&cfg.name, &ids, rise, fall, cfg.eject);
        let mut load = Load::new(servers.len());
        if let Some(previous) = previous {
            // Before the checker starts, so its first round builds on it.
            let kept: Vec<(usize, usize)> = servers
                .iter()
                .enumerate()
                .filter_map(|(i, s)| {
                    let j = previous.servers.iter().position(|p| p.addr == s.addr)?;
                    Some((i, j))
                })
                .collect();
            health.carry_over(&previous.health, &kept, cfg.health.is_some());
            load = Load::carried(servers.len(), &previous.load, &kept);
        }
        let probe_host = match cfg.health.as_ref().and_then(|h| h.host.as_deref()) {
            Some(host) => Some(probe_host(host).map_err(config_error)?),
            None => None,
        };
        let servers: Box<[Server]> = servers.into();
        let checker = cfg.health.as_ref().map(|h| {
            let probe = Prober::new(h, probe_host, &servers, Arc::clone(&conns), cfg);
            HealthChecker::spawn(Arc::clone(&health), h.interval, h.timeout, move |i| {
                probe.probe(i)
            })
        });
        Ok(Pool {
            name: cfg.name.clone(),
            load,
            servers,
            weights,
            backup,
            selector,
            health,
            conns,
            timeouts: cfg.timeouts,
            checker,
        })
    }

    /// The backend's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The backend's time limits.
    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// Health of the servers, indexed like the configuration's server list.
    pub fn health(&self) -> &HealthState {
        &self.health
    }

    /// Requests in flight to server `i`.
    pub fn in_flight(&self, i: usize) -> u32 {
        self.load.get(i)
    }

    /// Stops active health checks (they also stop when the pool is dropped).
    pub fn shutdown(&self) {
        if let Some(c) = &self.checker {
            c.shutdown();
        }
    }

    /// Sends `req` to a server chosen by the balancer (`hash_key` feeds
    /// consistent hashing) and returns the response head with its streaming
    /// body. The request's path and query, method and headers are kept; the
    /// scheme and authority become the server's; the version is HTTP/1.1.
    /// The body counts in the server's load until it ends and names the
    /// server ([`PooledBody::server`]).
    ///
    /// `extra` holds field lines (each `name: value` and CRLF) sent after
    /// the request's own fields, as they are: the proxy's forwarding fields,
    /// which thus cost no map insert.
    ///
    /// `limits` replace the backend's own time limits where set. The total
    /// limit bounds the body too: a body still streaming when it runs out
    /// ends with an error.
    pub async fn send<B>(
        &self,
        req: Request<B>,
        extra: &[u8],
        hash_key: Option<&[u8]>,
        limits: Limits,
    ) -> Result<Response<PooledBody>, UpstreamError>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let connect = limits.connect.unwrap_or(self.timeouts.connect);
        let first_byte = limits.first_byte.unwrap_or(self.timeouts.first_byte);
        let total = limits.total.unwrap_or(self.timeouts.total);
        // One timer per try, set to whichever limit runs out first.
        let start = tokio::time::Instant::now();
        let end = start + total;
        // The first try starts now; a later one reads the clock again.
        let mut try_start = Some(start);
        let (parts, body) = req.into_parts();
        let idempotent = is_idempotent(&parts.method);
        let upgrade = parts.headers.contains_key(http::header::UPGRADE);
        let empty_body = body.is_end_stream();
        let path_and_query = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        // An empty body needs no slot: every try sends an empty one.
        let slot: Option<BodySlot<B>> = (!empty_body).then(|| Arc::new(Mutex::new(Some(body))));
        let mut headers = Some(parts.headers);
        // With one server there is no second try to keep the fields for.
        let single_try = self.servers.len() == 1;
        // Servers already tried; allocated only once a try fails.
        let mut tried: Vec<bool> = Vec::new();
        let mut last_error: Option<UpstreamError> = None;
        // Set when every server the active checks hold up is ejected: the
        // ejections are then set aside (like Envoy's panic mode, and NGINX,
        // which never takes a sole server out). They are guesses from
        // failed requests, and a backend whose servers have all come back
        // would otherwise refuse every request for the rest of a cooldown.
        let mut panic = false;
        loop {
            let pick = |panic: bool| {
                let usable = |i: usize| {
                    self.health.is_up(i)
                        && (panic || !self.health.is_ejected(i))
                        && !tried.get(i).copied().unwrap_or(false)
                };
                balance::select(
                    self.selector.as_ref(),
                    &self.weights,
                    &self.backup,
                    &self.load,
                    &usable,
                    hash_key,
                )
            };
            let mut picked = pick(panic);
            if picked.is_none() && !panic && last_error.is_none() {
                panic = true;
                picked = pick(true);
                if picked.is_some() {
                    tracing::debug!(backend = %self.name, "every server is ejected; trying them anyway");
                }
            }
            let Some(i) = picked else {
                return Err(
                    last_error.unwrap_or_else(|| UpstreamError::NoHealthyServer {
                        backend: self.name.clone(),
                    }),
                );
            };
            let unread = slot
                .as_ref()
                .filter(|slot| slot.lock().map(|s| s.is_some()).unwrap_or(false));
            let body: UpstreamBody = if let Some(slot) = unread {
                ReplayableBody {
                    slot: Arc::clone(slot),
                    taken: None,
                }
                .boxed_unsync()
            } else if empty_body {
                Empty::new().map_err(|never| match never {}).boxed_unsync()
            } else {
                // The body was consumed by a failed try and cannot be sent again.
                return Err(
                    last_error.unwrap_or_else(|| UpstreamError::NoHealthyServer {
                        backend: self.name.clone(),
                    }),
                );
            };
            let server = &self.servers[i];
            let mut upstream_req = Request::new(body);
            *upstream_req.method_mut() = parts.method.clone();
            // Origin-form (RFC 9112 section 3.2.1): absolute-form is for
            // requests to proxies, and some origins mishandle it.
            *upstream_req.uri_mut() = Uri::from(path_and_query.clone());
            let h = upstream_req.headers_mut();
            match (single_try, headers.as_ref()) {
                (true, _) => *h = headers.take().unwrap_or_default(),
                (false, Some(fields)) => h.clone_from(fields),
                (false, None) => {}
            }
            if !h.contains_key(http::header::HOST) {
                h.insert(http::header::HOST, server.host_field.clone());
            }

            let guard = self.load.enter(i);
            let try_start = try_start.take().unwrap_or_else(tokio::time::Instant::now);
            let head_by = end.min(try_start + first_byte);
            let outcome = self
                .exchange(
                    i,
                    connect,
                    upstream_req,
                    extra,
                    upgrade,
                    head_by,
                    (first_byte, end),
                )
                .await;
            let error = match outcome {
                Ok(mut resp) => {
                    self.health.record_success(i);
                    if panic {
                        self.health.readmit(i);
                    }
                    resp.body_mut().end_by(end);
                    resp.body_mut().hold_load(guard);
                    return Ok(resp);
                }
                Err(TryFailure::Error(e)) => e,
                Err(TryFailure::TimedOut) if tokio::time::Instant::now() >= end => {
                    UpstreamError::TotalTimeout {
                        backend: self.name.clone(),
                        after: total,
                    }
                }
                Err(TryFailure::TimedOut) => UpstreamError::FirstByteTimeout {
                    server: server.addr.clone(),
                    after: first_byte,
                },
            };
            drop(guard);
            // A client that aborts its upload, or sends too much, must not
            // eject a healthy server.
            if error.is_server_fault() {
                self.health.record_failure(i);
            }
            let body_still_sendable = slot
                .as_ref()
                .is_none_or(|slot| slot.lock().map(|s| s.is_some()).unwrap_or(false));
            let retry = match &error {
                UpstreamError::Connect { .. } | UpstreamError::ConnectTimeout { .. } => {
                    body_still_sendable
                }
                UpstreamError::Reset { .. } => idempotent && body_still_sendable,
                _ => false,
            };
            tracing::debug!(backend = %self.name, server = %server.addr, error = %error, retry, "upstream try failed");
            if !retry {
                return Err(error);
            }
            if tried.is_empty() {
                tried.resize(self.servers.len(), false);
            }
            tried[i] = true;
            last_error = Some(error);
        }
    }
}

/// How one try failed.
enum TryFailure {
    Error(UpstreamError),
    /// No response head by the try's deadline.
    TimedOut,
}

impl From<UpstreamError> for TryFailure {
    fn from(e: UpstreamError) -> Self {
        TryFailure::Error(e)
    }
}

impl Pool {
    /// One try on server `i`: on an idle connection when there is one, else
    /// on a new one. A request an idle connection never took (it had just
    /// closed) goes out once more on a new connection. With no response
    /// head by `head_by`, connecting included, the try has timed out; an
    /// upload's waits and the head after it get the first-byte limit of
    /// `rearm` (see [`conn::exchange`]), within its end.
    #[allow(clippy::too_many_arguments)]
    async fn exchange(
        &self,
        i: usize,
        connect: Duration,
        req: Request<UpstreamBody>,
        extra: &[u8],
        upgrade: bool,
        head_by: tokio::time::Instant,
        rearm: (Duration, tokio::time::Instant),
    ) -> Result<Response<PooledBody>, TryFailure> {
        let server = &self.servers[i];
        let failed = |e: ConnError| match e {
            ConnError::TimedOut => TryFailure::TimedOut,
            e => TryFailure::Error(e.classify(&server.addr)),
        };
        // A new connection has the connect limit, and no more than is left.
        let open = || async {
            let left = head_by.saturating_duration_since(tokio::time::Instant::now());
            match self
                .conns
                .open(&server.addr, &server.host, connect.min(left))
                .await
            {
                Err(UpstreamError::ConnectTimeout { .. }) if left < connect => {
                    Err(TryFailure::TimedOut)
                }
                other => Ok(other?),
            }
        };
        if upgrade {
            // hyper writes this request's head: the extra lines go in its map.
            let mut req = req;
            append_lines(req.headers_mut(), extra).map_err(|reason| UpstreamError::Config {
                backend: self.name.clone(),
                reason,
            })?;
            let fresh = open().await?;
            return match tokio::time::timeout_at(head_by, conn::exchange_upgrade(fresh, req)).await
            {
                Ok(result) => result.map_err(failed),
                Err(_) => Err(TryFailure::TimedOut),
            };
        }
        let mut req = req;
        let resendable = is_idempotent(req.method()) && req.body().is_end_stream();
        if let Some(idle) = self.conns.checkout(i) {
            match conn::exchange(
                idle,
                req,
                extra,
                &self.conns,
                i,
                resendable,
                head_by,
                Some(rearm),
            )
            .await
            {
                Ok(resp) => return Ok(resp),
                Err(ExchangeError::Unsent(back, e)) => {
                    tracing::debug!(server = %server.addr, error = %e, "idle connection closed; sending on a new one");
                    req = *back;
                }
                Err(ExchangeError::Failed(e)) => return Err(failed(e)),
            }
        }
        let fresh = open().await?;
        match conn::exchange(
            fresh,
            req,
            extra,
            &self.conns,
            i,
            resendable,
            head_by,
            Some(rearm),
        )
        .await
        {
            Ok(resp) => Ok(resp),
            Err(ExchangeError::Unsent(_, e) | ExchangeError::Failed(e)) => Err(failed(e)),
        }
    }
}

/// The `Host` a server is sent when nothing else names one: a request that
/// arrived without one (as HTTP/1.0 allows), or a health probe whose check
/// names none. With a TLS server name that is the name, as the server is
/// reached by it (a server that hosts several names by SNI answers another
/// with 404 or 421), and the server's port unless it is 443, https's own
/// (RFC 9110 §4.2.2, §7.2); without one, the server's address as written.
fn default_host(addr: &Authority, server_name: Option<&str>) -> Result<http::HeaderValue, String> {
    let Some(written) = server_name else {
        return http::HeaderValue::from_str(addr.as_str())
            .map_err(|e| format!("server address `{addr}`: {e}"));
    };
    // An IPv6 address is written in brackets in a URI's authority.
    let name = match written.parse::<std::net::Ipv6Addr>() {
        Ok(_) => format!("[{written}]"),
        Err(_) => written.to_owned(),
    };
    let host = match addr.port_u16() {
        Some(443) | None => name,
        Some(port) => format!("{name}:{port}"),
    };
    http::HeaderValue::try_from(host).map_err(|e| format!("TLS server name `{written}`: {e}"))
}

/// A health check's own `Host`, refused unless it is `host[:port]`.
fn probe_host(host: &str) -> Result<http::HeaderValue, String> {
    let invalid = || format!("health check host `{host}` is not host or host:port");
    if !super::codec::valid_host_field(host.as_bytes()) {
        return Err(invalid());
    }
    http::HeaderValue::from_str(host).map_err(|_| invalid())
}

/// Adds field lines as [`Pool::send`] takes them (`name: value` and CRLF
/// each) to `headers`.
fn append_lines(headers: &mut http::HeaderMap, lines: &[u8]) -> Result<(), String> {
    for line in lines.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        let colon = line.iter().position(|&b| b == b':');
        let field = colon.and_then(|at| {
            let name = http::HeaderName::from_bytes(&line[..at]).ok()?;
            let value = http::HeaderValue::from_bytes(line[at + 1..].trim_ascii()).ok()?;
            Some((name, value))
        });
        let Some((name, value)) = field else {
            return Err(format!(
                "not a field line: {:?}",
                String::from_utf8_lossy(line)
            ));
        };
        headers.append(name, value);
    }
    Ok(())
}

/// Idempotent methods (RFC 9110 §9.2.2) that may be sent again after a reset.
fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

type BodySlot<B> = Arc<Mutex<Option<B>>>;

/// A request body that stays in its shared slot until the client first reads
/// it, so a try that failed before reading can hand it to the next try.
struct ReplayableBody<B> {
    slot: BodySlot<B>,
    taken: Option<B>,
}

impl<B> Body for ReplayableBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.taken.is_none() {
            this.taken = this.slot.lock().ok().and_then(|mut s| s.take());
        }
        match this.taken.as_mut() {
            Some(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.taken {
            Some(b) => b.is_end_stream(),
            None => self
                .slot
                .lock()
                .map(|s| s.as_ref().is_none_or(|b| b.is_end_stream()))
                .unwrap_or(true),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.taken {
            Some(b) => b.size_hint(),
            None => self
                .slot
                .lock()
                .ok()
                .and_then(|s| s.as_ref().map(|b| b.size_hint()))
                .unwrap_or_else(|| SizeHint::with_exact(0)),
        }
    }
}

/// Builds the TLS connector: servers are verified against the CA file when
/// the policy names one, and against the system's roots otherwise.
///
/// The handshake offers exactly `http/1.1` by ALPN (RFC 7301), the one
/// protocol spoken to backends, for requests, upgrades and health probes
/// alike: a server that insists on ALPN then has the protocol to agree to,
/// and one that also speaks h2 is not left to guess which one is coming.
fn tls_connector(tls: &UpstreamTls) -> Result<TlsSetup, String> {
    let roots = match &tls.ca_file {
        Some(ca_file) => load_roots(ca_file)?,
        None => system_roots()?,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let server_name = match &tls.server_name {
        Some(n) => Some(
            ServerName::try_from(n.clone()).map_err(|e| format!("TLS server name `{n}`: {e}"))?,
        ),
        None => None,
    };
    Ok(TlsSetup {
        connector: TlsConnector::from(Arc::new(config)),
        server_name,
    })
}

/// The operating system's trusted roots.
fn system_roots() -> Result<rustls::RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map(|e| e.to_string())
            .unwrap_or_else(|| "none found".to_owned());
        return Err(format!(
            "no system root certificates ({why}); name a `ca_file` for the backend"
        ));
    }
    Ok(roots)
}

fn load_roots(path: &Path) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("CA file {}: {e}", path.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("CA file {}: {e}", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("CA file {}: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("CA file {} holds no certificate", path.display()));
    }
    Ok(roots)
}

/// The TLS client setup of a backend.
#[derive(Clone)]
pub(super) struct TlsSetup {
    pub(super) connector: TlsConnector,
    pub(super) server_name: Option<ServerName<'static>>,
}

/// Sends active health probes over the pool's connections.
struct Prober {
    method: Method,
    requests: Box<[(String, String, http::HeaderValue)]>,
    path: PathAndQuery,
    expect: u16,
    conns: Arc<Connections>,
    connect: Duration,
    /// A probe's whole limit.
    timeout: Duration,
    backend: String,
}

impl Prober {
    /// Probes `servers` as `h` says, each with `host` as its `Host` when
    /// the check names one, else with the server's own.
    fn new(
        h: &HealthConfig,
        host: Option<http::HeaderValue>,
        servers: &[Server],
        conns: Arc<Connections>,
        cfg: &BackendConfig,
    ) -> Self {
        let path: PathAndQuery = h
            .path
            .parse()
            .unwrap_or_else(|_| PathAndQuery::from_static("/"));
        let requests = servers
            .iter()
            .map(|s| {
                let field = host.clone().unwrap_or_else(|| s.host_field.clone());
                (s.addr.clone(), s.host.clone(), field)
            })
            .collect();
        Self {
            method: h.method.clone(),
            requests,
            path,
            expect: h.expect_status,
            conns,
            connect: cfg.timeouts.connect.min(h.timeout),
            timeout: h.timeout,
            backend: cfg.name.clone(),
        }
    }

    fn probe(&self, i: usize) -> ProbeFuture {
        let Some((addr, host, host_field)) = self.requests.get(i).cloned() else {
            return Box::pin(async { false });
        };
        let mut req = Request::new(Empty::new().map_err(|never| match never {}).boxed_unsync());
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = Uri::from(self.path.clone());
        req.headers_mut().insert(http::header::HOST, host_field);
        let conns = Arc::clone(&self.conns);
        let (expect, connect, timeout) = (self.expect, self.connect, self.timeout);
        let resendable = is_idempotent(&self.method);
        let backend = self.backend.clone();
        Box::pin(async move {
            // The whole probe, connecting included, is bounded by `timeout`
            // (by the checker too; this also ends the exchange itself).
            let due = tokio::time::Instant::now() + timeout;
            let sent = async {
                let (c, kept) = match conns.checkout(i) {
                    Some(c) => (c, true),
                    None => (conns.open(&addr, &host, connect).await?, false),
                };
                let answer = match conn::exchange(c, req, b"", &conns, i, resendable, due, None)
                    .await
                {
                    // A kept connection the server closed as the probe
                    // arrived never took it: like a request, the probe goes
                    // out once more on a new connection, so that the race
                    // with the server's keep-alive timer is no failed probe.
                    Err(ExchangeError::Unsent(back, e)) if kept => {
                        tracing::debug!(%backend, server = i, error = %e, "idle connection closed; probing on a new one");
                        let left = due.saturating_duration_since(tokio::time::Instant::now());
                        let fresh = conns.open(&addr, &host, connect.min(left)).await?;
                        conn::exchange(fresh, *back, b"", &conns, i, resendable, due, None).await
                    }
                    other => other,
                };
                match answer {
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        // The status is the verdict. A small body is read,
                        // so that the connection can be reused; a large one
                        // (a health path that is a whole page, or a stream)
                        // is dropped with its connection once past the cap,
                        // and so is one still coming when the last quarter
                        // of the probe's time begins.
                        let mut body = resp.into_body();
                        let read = async {
                            let mut left = PROBE_BODY_MAX;
                            while let Some(Ok(frame)) = body.frame().await {
                                let len = frame.data_ref().map_or(0, Bytes::len);
                                match left.checked_sub(len) {
                                    Some(rest) => left = rest,
                                    None => break,
                                }
                            }
                        };
                        let _ = tokio::time::timeout_at(due - timeout / 4, read).await;
                        Ok(status)
                    }
                    Err(ExchangeError::Unsent(_, e) | ExchangeError::Failed(e)) => {
                        Err(e.classify(&addr))
                    }
                }
            };
            match sent.await {
                Ok(status) if status == expect => true,
                Ok(status) => {
                    tracing::debug!(%backend, server = i, status, "health probe failed");
                    false
                }
                Err(e) => {
                    tracing::debug!(%backend, server = i, error = %e, "health probe failed");
                    false
                }
            }
        })
    }
}

/// Most body bytes a health probe reads before it gives the rest up.
const PROBE_BODY_MAX: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_gateway_statuses() {
        let server = || "127.0.0.1:1".to_owned();
        let cause = || -> BoxError { "x".into() };
        let table = [
            (
                UpstreamError::NoHealthyServer {
                    backend: "b".into(),
                },
                503,
            ),
            (UpstreamError::ConnectTimeout { server: server() }, 504),
            (
                UpstreamError::FirstByteTimeout {
                    server: server(),
                    after: Duration::from_secs(1),
                },
                504,
            ),
            (
                UpstreamError::TotalTimeout {
                    backend: "b".into(),
                    after: Duration::from_secs(1),
                },
                504,
            ),
            (
                UpstreamError::Connect {
                    server: server(),
                    source: cause(),
                },
                502,
            ),
            (
                UpstreamError::Reset {
                    server: server(),
                    source: cause(),
                },
                502,
            ),
            (
                UpstreamError::BadResponse {
                    server: server(),
                    source: cause(),
                },
                502,
            ),
            (
                UpstreamError::RequestBody {
                    server: server(),
                    source: cause(),
                },
                400,
            ),
            (
                UpstreamError::Config {
                    backend: "b".into(),
                    reason: "r".into(),
                },
                500,
            ),
        ];
        for (err, status) in table {
            assert_eq!(err.status().as_u16(), status, "{}", err.as_str());
            // Only the server's own failures count against it.
            assert_eq!(
                err.is_server_fault(),
                matches!(status, 502 | 504),
                "{}",
                err.as_str()
            );
        }
    }

    #[test]
    fn idempotent_methods_follow_rfc_9110() {
        for m in [
            Method::GET,
            Method::HEAD,
            Method::OPTIONS,
            Method::PUT,
            Method::DELETE,
        ] {
            assert!(is_idempotent(&m), "{m}");
        }
        for m in [Method::POST, Method::PATCH, Method::CONNECT] {
            assert!(!is_idempotent(&m), "{m}");
        }
    }

    #[test]
    fn the_default_host_is_the_tls_server_name_when_there_is_one() {
        for (addr, server_name, host) in [
            ("10.0.0.2:3000", None, "10.0.0.2:3000"),
            ("10.0.0.2:443", None, "10.0.0.2:443"),
            ("[::1]:8443", None, "[::1]:8443"),
            ("10.0.0.2:443", Some("api.example"), "api.example"),
            ("10.0.0.2:8443", Some("api.example"), "api.example:8443"),
            ("origin.internal:443", Some("api.example"), "api.example"),
            ("10.0.0.2:8443", Some("::1"), "[::1]:8443"),
            ("10.0.0.2:443", Some("10.0.0.9"), "10.0.0.9"),
        ] {
            let authority: Authority = addr.parse().unwrap();
            let field = default_host(&authority, server_name).unwrap();
            assert_eq!(field, host, "{addr} {server_name:?}");
        }
    }

    #[tokio::test]
    async fn pool_rejects_bad_configuration() {
        use crate::upstream::config::ServerConfig;
        let mut cfg = BackendConfig {
            name: "b".into(),
            servers: vec![ServerConfig::new("no-port")],
            ..Default::default()
        };
        assert!(matches!(Pool::new(&cfg), Err(UpstreamError::Config { .. })));
        cfg.servers = vec![ServerConfig::new("127.0.0.1:80")];
        cfg.tls = Some(UpstreamTls {
            ca_file: Some("/nonexistent/ca.pem".into()),
            server_name: None,
        });
        let err = Pool::new(&cfg).unwrap_err();
        assert!(err.to_string().contains("CA file"), "{err}");
        cfg.tls = None;
        for host in ["", "user@api.example", "api.example:https", "api example"] {
            cfg.health = Some(HealthConfig {
                host: Some(host.into()),
                ..HealthConfig::default()
            });
            let err = Pool::new(&cfg).unwrap_err();
            assert!(err.to_string().contains("health check host"), "{err}");
        }
    }

    #[tokio::test]
    async fn tls_without_a_ca_file_uses_the_system_roots() {
        use crate::upstream::config::ServerConfig;
        let roots = system_roots().expect("the system has root certificates");
        assert!(!roots.is_empty());
        let cfg = BackendConfig {
            name: "b".into(),
            servers: vec![ServerConfig::new("127.0.0.1:443")],
            tls: Some(UpstreamTls::default()),
            ..Default::default()
        };
        assert!(Pool::new(&cfg).is_ok());
    }

    #[tokio::test]
    async fn empty_pool_fails_fast_with_no_healthy_server() {
        let pool = Pool::new(&BackendConfig {
            name: "empty".into(),
            ..Default::default()
        })
        .unwrap();
        let req = Request::get("/").body(Empty::<Bytes>::new()).unwrap();
        let err = pool
            .send(req, b"", None, Limits::default())
            .await
            .unwrap_err();
        assert_eq!(err.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
