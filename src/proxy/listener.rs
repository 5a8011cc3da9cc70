//! Listeners: accept TCP (optionally TLS) connections, speak HTTP/1.1 and
//! HTTP/2 on them, enforce the client-side limits, and drain on shutdown.
//!
//! HTTP/1.1 requests without a body are served by Portico's own loop
//! ([`h1`]); a connection goes to hyper from its first request that needs
//! more (a body, an upgrade, a head that does not parse), and HTTP/2 goes to
//! hyper from the start.
//!
//! Each listener is one task with its own [`Shutdown`]; adding or removing a
//! listener at run time (a reload that changes the listen set) is spawning a
//! new [`Listener`] or stopping one [`ListenerHandle`], without touching the
//! others. Changing what a listener is (plain or TLS) keeps its socket:
//! [`ListenerHandle::hand_over`] takes the bound socket from the running
//! listener, which then drains, and [`Listener::from_tcp`] serves it anew,
//! so clients are never refused in between.
//!
//! Limits ([`ServerLimits`]) are enforced here, before any handler runs:
//!
//! - the request header section must arrive within `header_read_timeout`
//!   (slowloris); for a new connection the same bound covers the TLS handshake
//!   and the first request, whatever its protocol;
//! - a connection with no request in flight is closed after `idle_timeout`;
//!   on HTTP/1.1 the header timeout starts again with the first byte of the
//!   next request;
//! - a connection whose client takes nothing of what is written to it is
//!   dropped after `send_timeout` (a client that asks for a large object and
//!   never reads it would otherwise hold the connection for good);
//! - a header section over `max_header_bytes` is refused with 431 (RFC 6585
//!   §5) on HTTP/1.1, or with 431 or a stream reset on HTTP/2;
//! - a body declared larger than `max_body_bytes` is refused with 413 (RFC
//!   9110 §15.5.14) without calling the handler, and a body that grows past it
//!   fails while streaming ([`BodyError::TooLarge`]).
//!
//! An upgrade the handler attached to its response
//! ([`PendingUpgrade::attach`]) is spliced on a task of the listener's own,
//! as one of its connections: it counts toward `max_connections`, keeps
//! the connection it came on busy (an HTTP/2 tunnel shares it), closes
//! after `tunnel_idle_timeout` with no byte either way or after
//! `send_timeout` with a side taking nothing, and on shutdown has the
//! grace period like any other connection, then is dropped.
//!
//! [`PendingUpgrade::attach`]: super::upgrade::PendingUpgrade::attach
//!
//! [`BodyError::TooLarge`]: super::body::BodyError::TooLarge

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, CONNECTION};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::body::{BoxError, RequestBody, ResponseBody, Sliced, H2_PIECE};
use super::errors::{ErrorPages, ProxyError};
use super::phases::{log_refused, log_unparsed};
use super::upgrade::PendingUpgrade;

mod h1;
mod streams;

/// Client-side limits of one listener. Every field has a production default.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Time allowed for a request header section to arrive, and for a new
    /// connection to complete its TLS handshake and send its first request.
    /// On a kept-alive HTTP/1.1 connection it runs from the first byte of
    /// the next request; the wait for that byte is `idle_timeout`'s (but a
    /// connection handed to hyper, from its first request with a body on,
    /// has hyper's rule: the header timeout covers that wait too).
    /// Default 10 s.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    /// Default 60 s.
    pub idle_timeout: Duration,
    /// An upgraded (spliced) connection, a WebSocket say, with no byte
    /// either way for this long is closed. Default 10 min.
    pub tunnel_idle_timeout: Duration,
    /// A connection whose writes to the client are blocked (the client
    /// takes nothing) for this long is dropped, response in flight or not.
    /// A write that goes through starts it again, so a slow reader that
    /// keeps reading is not cut off. Portico's own HTTP/1.1 loop times it
    /// from the last blocked write that made progress; a connection served
    /// by hyper is looked at every `send_timeout`, so it goes after one to
    /// two of it. An HTTP/2 stream whose window the client keeps shut for
    /// this long is reset, its connection left open. Default 60 s.
    pub send_timeout: Duration,
    /// Largest request header section in bytes (at least 8192, which HTTP/1.1
    /// needs for its read buffer). Default 64 KiB.
    pub max_header_bytes: usize,
    /// Most header fields in one HTTP/1.1 request. Default 100.
    pub max_headers: usize,
    /// Largest request body in bytes. Default 10 MiB.
    pub max_body_bytes: u64,
    /// Most concurrent HTTP/2 streams per connection. Default 128.
    pub max_concurrent_streams: u32,
    /// How long in-flight requests, and upgraded connections, may run
    /// after shutdown begins before their connections are dropped.
    /// Default 30 s.
    pub shutdown_grace: Duration,
    /// Most client connections open at once on the listener, upgraded
    /// (spliced) ones included. At the cap the listener stops accepting;
    /// further clients wait in the kernel's accept queue until a connection
    /// closes. Default 10,000.
    pub max_connections: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            tunnel_idle_timeout: Duration::from_secs(600),
            send_timeout: Duration::from_secs(60),
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_body_bytes: 10 * 1024 * 1024,
            max_concurrent_streams: 128,
            shutdown_grace: Duration::from_secs(30),
            max_connections: 10_000,
        }
    }
}

/// How an HTTP/2 connection with prior knowledge opens (RFC 9113 §3.4), as
/// far as the HTTP/1 loop reads before it hands the connection over: the
/// version is where httparse stops.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2";

/// The smallest read buffer hyper's HTTP/1 accepts.
const MIN_H1_BUF: usize = 8192;

/// What the handler knows about the connection a request came on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client's address.
    pub client_addr: SocketAddr,
    /// The address the client connected to.
    pub local_addr: SocketAddr,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// The server name the client sent in its TLS ClientHello.
    pub sni: Option<Arc<str>>,
    /// The trusted proxy in front (`http { trust_forwarded }`) that the
    /// request came from, when `client_addr` is the client it names in
    /// `X-Forwarded-For` (with port 0) rather than the connection's peer.
    pub proxied_by: Option<IpAddr>,
}

/// Answers requests. The integrator's request pipeline implements this;
/// closures `Fn(Request<RequestBody>, Arc<ConnInfo>) -> impl Future` do too.
///
/// The handler never fails: every error becomes a response, normally through
/// [`ErrorPages`].
pub trait Handler: Send + Sync + 'static {
    /// Produces the response to `req`, received on `conn`.
    fn handle(
        &self,
        req: Request<RequestBody>,
        conn: Arc<ConnInfo>,
    ) -> impl Future<Output = Response<ResponseBody>> + Send;
}

impl<F, Fut> Handler for F
where
    F: Fn(Request<RequestBody>, Arc<ConnInfo>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<ResponseBody>> + Send,
{
    fn handle(
        &self,
        req: Request<RequestBody>,
        conn: Arc<ConnInfo>,
    ) -> impl Future<Output = Response<ResponseBody>> + Send {
        self(req, conn)
    }
}

/// A shutdown signal: once triggered it stays triggered. Clones share the
/// signal, so one `Shutdown` can stop many listeners.
#[derive(Debug, Clone)]
pub struct Shutdown {
    tx: Arc<watch::Sender<bool>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A signal not yet triggered.
    pub fn new() -> Self {
        Self {
            tx: Arc::new(watch::Sender::new(false)),
        }
    }

    /// Triggers the signal; every listener sharing it stops accepting and
    /// drains.
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    /// Whether the signal has been triggered.
    pub fn is_triggered(&self) -> bool {
        *self.tx.borrow()
    }

    /// Completes once the signal is triggered.
    pub async fn triggered(&self) {
        let mut rx = self.tx.subscribe();
        // The sender lives in `self`, so the channel cannot close here.
        let _ = rx.wait_for(|triggered| *triggered).await;
    }
}

/// Why a listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Binding the address failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The operating system's error.
        source: io::Error,
    },
}

/// A bound, not yet serving, listener.
pub struct Listener {
    tcp: TcpListener,
    local_addr: SocketAddr,
    tls: Option<TlsAcceptor>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("local_addr", &self.local_addr)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Listener {
    /// Binds `addr` (port 0 picks a free port; see [`Listener::local_addr`]).
    /// With `tls`, connections are TLS (see [`super::tls::server_config`]).
    pub async fn bind(
        addr: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Result<Self, ListenError> {
        let bind_err = |source| ListenError::Bind { addr, source };
        let tcp = TcpListener::bind(addr).await.map_err(bind_err)?;
        let local_addr = tcp.local_addr().map_err(bind_err)?;
        Ok(Self {
            tcp,
            local_addr,
            tls: tls.map(TlsAcceptor::from),
        })
    }

    /// Serves an already bound socket, such as one a running listener gave
    /// up with [`ListenerHandle::hand_over`]. With `tls`, connections are TLS.
    pub fn from_tcp(tcp: TcpListener, tls: Option<Arc<rustls::ServerConfig>>) -> io::Result<Self> {
        let local_addr = tcp.local_addr()?;
        Ok(Self {
            tcp,
            local_addr,
            tls: tls.map(TlsAcceptor::from),
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves on a new task until `shutdown` is triggered; see
    /// [`Listener::serve`].
    pub fn spawn<H: Handler>(
        self,
        handler: Arc<H>,
        limits: ServerLimits,
        errors: ErrorPages,
        shutdown: Shutdown,
    ) -> ListenerHandle {
        let local_addr = self.local_addr;
        let (limits_tx, limits_rx) = watch::channel(limits);
        let (hand_over, hand_over_rx) = mpsc::channel(1);
        let task = tokio::spawn(self.serve_with(
            handler,
            limits_rx,
            hand_over_rx,
            errors,
            shutdown.clone(),
        ));
        ListenerHandle {
            local_addr,
            shutdown,
            task,
            limits: limits_tx,
            hand_over,
        }
    }

    /// Accepts connections and serves them with `handler` until `shutdown`
    /// is triggered; then stops accepting, lets in-flight requests finish
    /// within `limits.shutdown_grace`, drops what is left, and returns.
    /// Upgraded connections the handler attached to its responses
    /// ([`PendingUpgrade::attach`]) are among them; those it spawned itself
    /// ([`PendingUpgrade::spawn`]) are not.
    pub async fn serve<H: Handler>(
        self,
        handler: Arc<H>,
        limits: ServerLimits,
        errors: ErrorPages,
        shutdown: Shutdown,
    ) {
        let (_keep, limits) = watch::channel(limits);
        let (_keep_too, hand_over) = mpsc::channel(1);
        self.serve_with(handler, limits, hand_over, errors, shutdown)
            .await;
    }

    /// [`Listener::serve`], with limits that may change while it runs (new
    /// connections get the limits in force when they are accepted), and that
    /// gives its socket to whoever asks on `hand_over` before draining.
    async fn serve_with<H: Handler>(
        self,
        handler: Arc<H>,
        mut limits: watch::Receiver<ServerLimits>,
        mut hand_over: mpsc::Receiver<oneshot::Sender<TcpListener>>,
        errors: ErrorPages,
        shutdown: Shutdown,
    ) {
        let current = limits.borrow_and_update().clone();
        let (splices, mut spliced) = mpsc::unbounded_channel();
        let mut shared = Arc::new(Shared {
            builder: builder(&current),
            builder_h1: builder_h1(&current),
            handler,
            errors,
            limits: current,
            local_addr: self.local_addr,
            shutdown: shutdown.clone(),
            splices: splices.clone(),
        });
        // `portico run` says which listener this is; the detail is for tests.
        debug!(addr = %self.local_addr, tls = self.tls.is_some(), "listener serving");
        let mut conns = JoinSet::new();
        let mut stop = pin!(shutdown.triggered());
        let mut at_cap = false;
        let mut taker = None;
        loop {
            let room = conns.len() < shared.limits.max_connections;
            if room == at_cap {
                at_cap = !room;
                if at_cap {
                    warn!(addr = %self.local_addr, max_connections = shared.limits.max_connections, "connection cap reached; new clients wait until one closes");
                    metrics::counter!("portico_connection_cap_reached_total").increment(1);
                }
            }
            tokio::select! {
                biased;
                () = &mut stop => break,
                Some(reply) = hand_over.recv() => {
                    taker = Some(reply);
                    break;
                }
                accepted = self.tcp.accept(), if room => match accepted {
                    Ok((stream, client_addr)) => {
                        conns.spawn(accept(stream, client_addr, self.tls.clone(), Arc::clone(&shared)));
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off
                        // rather than spin; accepting resumes by itself.
                        warn!(addr = %self.local_addr, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(splice) = spliced.recv() => {
                    conns.spawn(splice.run());
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                Ok(()) = limits.changed() => {
                    let next = limits.borrow_and_update().clone();
                    info!(addr = %self.local_addr, "listener limits updated");
                    shared = Arc::new(Shared {
                        builder: builder(&next),
                        builder_h1: builder_h1(&next),
                        handler: Arc::clone(&shared.handler),
                        errors: shared.errors.clone(),
                        limits: next,
                        local_addr: self.local_addr,
                        shutdown: shutdown.clone(),
                        splices: splices.clone(),
                    });
                }
            }
        }
        // A later ask finds the channel closed, not a socket that never comes.
        drop(hand_over);
        match taker {
            // Clients the kernel queued meanwhile wait for the socket's next
            // owner; the connections accepted here finish as on shutdown.
            Some(reply) => {
                if reply.send(self.tcp).is_err() {
                    warn!(addr = %self.local_addr, "the socket handed over was not taken; it is closed");
                }
                shutdown.trigger();
                info!(addr = %self.local_addr, "socket handed over");
            }
            None => drop(self.tcp),
        }
        info!(addr = %self.local_addr, connections = conns.len(), "stopped accepting; draining");
        // A connection still switching hands its splice over before it
        // ends: with the channel looked at first, the splice is spawned
        // before the set can be seen empty.
        let drain = async {
            loop {
                tokio::select! {
                    biased;
                    Some(splice) = spliced.recv() => {
                        conns.spawn(splice.run());
                    }
                    joined = conns.join_next() => if joined.is_none() { break },
                }
            }
        };
        if tokio::time::timeout(shared.limits.shutdown_grace, drain)
            .await
            .is_err()
        {
            warn!(
                addr = %self.local_addr,
                connections = conns.len(),
                "shutdown grace period over; dropping connections"
            );
            conns.shutdown().await;
        }
        info!(addr = %self.local_addr, "listener stopped");
    }
}

/// A running listener.
#[derive(Debug)]
pub struct ListenerHandle {
    local_addr: SocketAddr,
    shutdown: Shutdown,
    task: JoinHandle<()>,
    limits: watch::Sender<ServerLimits>,
    hand_over: mpsc::Sender<oneshot::Sender<TcpListener>>,
}

impl ListenerHandle {
    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Replaces the listener's limits; connections accepted from now on get
    /// them, connections already open keep theirs.
    pub fn set_limits(&self, limits: ServerLimits) {
        self.limits.send_replace(limits);
    }

    /// Stops accepting and returns the bound socket, without closing it: a
    /// client connecting meanwhile waits in the kernel's accept queue for the
    /// socket's next owner ([`Listener::from_tcp`]). The connections this
    /// listener accepted then drain as on [`ListenerHandle::stop`] (its
    /// shutdown signal is triggered, for whoever else holds it too); wait for
    /// that with [`ListenerHandle::join`]. `None` when the listener had
    /// already stopped.
    pub async fn hand_over(&self) -> Option<TcpListener> {
        let (reply, socket) = oneshot::channel();
        self.hand_over.send(reply).await.ok()?;
        socket.await.ok()
    }

    /// Triggers this listener's shutdown signal (shared with whoever else
    /// holds it).
    pub fn shutdown(&self) {
        self.shutdown.trigger();
    }

    /// Waits for the listener task to finish draining.
    pub async fn join(self) {
        if let Err(e) = self.task.await {
            warn!(addr = %self.local_addr, error = %e, "listener task failed");
        }
    }

    /// Triggers shutdown and waits until the listener has drained.
    pub async fn stop(self) {
        self.shutdown();
        self.join().await;
    }
}

struct Shared<H> {
    builder: auto::Builder<streams::StreamExec>,
    /// The same, HTTP/1.1 only: for connections that began here with an
    /// HTTP/1.1 exchange.
    builder_h1: hyper::server::conn::http1::Builder,
    handler: Arc<H>,
    errors: ErrorPages,
    limits: ServerLimits,
    local_addr: SocketAddr,
    shutdown: Shutdown,
    /// Upgrades to splice, to the listener, which spawns each among its
    /// connections.
    splices: mpsc::UnboundedSender<Splice>,
}

/// An upgraded connection to splice, with the idle and send limits of the
/// connection it came on.
struct Splice {
    pending: PendingUpgrade,
    idle: Duration,
    send: Duration,
    client_addr: SocketAddr,
    /// Keeps the connection it came on counted busy while it lasts.
    _busy: InFlight,
}

impl Splice {
    async fn run(self) {
        let client_addr = self.client_addr;
        if let Err(e) = self.pending.splice_until_idle(self.idle, self.send).await {
            debug!(%client_addr, error = %e, "upgraded connection ended");
        }
    }
}

fn builder(limits: &ServerLimits) -> auto::Builder<streams::StreamExec> {
    let mut builder = auto::Builder::new(streams::StreamExec {
        send_timeout: limits.send_timeout,
    });
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(MIN_H1_BUF))
        .max_headers(limits.max_headers)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(limits.max_concurrent_streams)
        // WebSocket over HTTP/2 (RFC 8441).
        .enable_connect_protocol();
    builder
}

/// hyper's HTTP/1.1 alone, set as [`builder`]'s HTTP/1.1 side, and with
/// an exact header size limit, which that side cannot be given: every
/// HTTP/1 connection but one that negotiated h2 by ALPN is served by it.
fn builder_h1(limits: &ServerLimits) -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(MIN_H1_BUF))
        // The buffer's bound alone lets a head that came in one read be
        // up to a read larger; this one is exact.
        .max_header_size(limits.max_header_bytes)
        .max_headers(limits.max_headers)
        .keep_alive(true);
    builder
}

async fn accept<H: Handler>(
    stream: TcpStream,
    client_addr: SocketAddr,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared<H>>,
) {
    // An IPv4 client of a dual-stack listener comes as `::ffff:a.b.c.d`:
    // rules, allow lists and the log see the IPv4 address it is.
    let client_addr = SocketAddr::new(client_addr.ip().to_canonical(), client_addr.port());
    // Small writes (headers, h2 frames) should not wait for Nagle.
    if let Err(e) = stream.set_nodelay(true) {
        debug!(%client_addr, error = %e, "set_nodelay failed");
    }
    let opened = Instant::now();
    let mut info = ConnInfo {
        client_addr,
        local_addr: shared.local_addr,
        tls: tls.is_some(),
        sni: None,
        proxied_by: None,
    };
    match tls {
        None => serve_connection(stream, info, shared, opened, false).await,
        Some(acceptor) => {
            let handshake = acceptor.accept(stream);
            match tokio::time::timeout(shared.limits.header_read_timeout, handshake).await {
                Ok(Ok(stream)) => {
                    let tls = stream.get_ref().1;
                    info.sni = tls.server_name().map(Arc::from);
                    let h2 = tls.alpn_protocol() == Some(b"h2");
                    serve_connection(stream, info, shared, opened, h2).await;
                }
                Ok(Err(e)) => debug!(%client_addr, error = %e, "TLS handshake failed"),
                Err(_) => debug!(%client_addr, "TLS handshake timed out"),
            }
        }
    }
}

/// Serves one connection: HTTP/1.1 requests without a body by Portico's
/// own loop ([`h1`]), everything from the first request that needs more
/// (and HTTP/2 from the start) by hyper.
async fn serve_connection<IO, H>(
    mut io: IO,
    info: ConnInfo,
    shared: Arc<Shared<H>>,
    opened: Instant,
    h2: bool,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Handler,
{
    let info = Arc::new(info);
    let (prefix, served) = if h2 {
        (Bytes::new(), false)
    } else {
        match h1::serve(&mut io, &shared, &info, opened).await {
            Some(rest) => rest,
            None => return,
        }
    };
    // After an HTTP/1.1 exchange the connection stays HTTP/1.1: HTTP/2's
    // preface is recognised only at its start, so only a connection that
    // opens with it (cleartext HTTP/2 with prior knowledge) or negotiated
    // h2 needs the server that speaks both.
    let h1_only = !h2 && (served || !prefix.starts_with(H2_PREFACE));
    serve_hyper(h1::Rewind::new(prefix, io), info, shared, h1_only).await;
}

/// Serves the rest of a connection with hyper.
async fn serve_hyper<IO, H>(io: IO, info: Arc<ConnInfo>, shared: Arc<Shared<H>>, h1_only: bool)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Handler,
{
    let client_addr = info.client_addr;
    let activity = Arc::new(Activity::new());
    let io = Tracked::new(io, Arc::clone(&activity));
    let service = {
        let shared = Arc::clone(&shared);
        let activity = Arc::clone(&activity);
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let guard = InFlight::start(&activity);
            let activity = Arc::clone(&activity);
            let shared = Arc::clone(&shared);
            let info = Arc::clone(&info);
            // HTTP/2 frames handed to hyper at most this large (see
            // `GuardedBody`); HTTP/1 frames go as they come.
            let piece = (req.version() == Version::HTTP_2).then_some(H2_PIECE);
            async move {
                let limit = shared.limits.max_body_bytes;
                // An HTTP/2 WebSocket opens with a 2xx to its CONNECT.
                let connect = req.method() == Method::CONNECT;
                let client_addr = info.client_addr;
                let req = req.map(|body| RequestBody::new(body, limit));
                let mut response = match transfer_coding_error(req.headers()) {
                    Some(e) => {
                        // Refused as soon as the head is in: no clock read
                        // on the way of every other request.
                        let started = Instant::now();
                        debug!(%client_addr, error = %e, "request refused");
                        let mut response = shared.errors.respond(&e, Some(req.headers()));
                        let bytes = response.body().size_hint().exact();
                        log_refused(client_addr.ip(), &req, response.status(), bytes, started);
                        // Its body is left unread: the connection cannot
                        // carry another request.
                        response
                            .headers_mut()
                            .insert(CONNECTION, HeaderValue::from_static("close"));
                        response
                    }
                    None => respond(&shared, req, info).await,
                };
                if connect || response.status() == StatusCode::SWITCHING_PROTOCOLS {
                    if let Some(pending) = PendingUpgrade::detach(&mut response) {
                        let splice = Splice {
                            pending,
                            idle: shared.limits.tunnel_idle_timeout,
                            send: shared.limits.send_timeout,
                            client_addr,
                            // An HTTP/2 tunnel rides on this connection,
                            // which is busy for as long as it lasts.
                            _busy: InFlight::start(&activity),
                        };
                        // A listener already gone drops it: the upgrade fails.
                        let _ = shared.splices.send(splice);
                    }
                }
                Ok::<_, Infallible>(response.map(|inner| GuardedBody {
                    inner,
                    pieces: Sliced::new(piece),
                    _guard: guard,
                }))
            }
        })
    };
    let io = TokioIo::new(io);
    if h1_only {
        let conn = shared
            .builder_h1
            .serve_connection(io, service)
            .with_upgrades();
        drive(
            pin!(conn),
            |c| c.graceful_shutdown(),
            refused_head,
            &activity,
            &shared,
            client_addr,
        )
        .await;
    } else {
        let conn = shared.builder.serve_connection_with_upgrades(io, service);
        drive(
            pin!(conn),
            |c| c.graceful_shutdown(),
            |e: &_| e.downcast_ref::<hyper::Error>().and_then(refused_head),
            &activity,
            &shared,
            client_addr,
        )
        .await;
    }
}

/// The status hyper answered a request head it could not take with (its
/// server's `on_error`), or None when it sent no answer: 431 for a head
/// over the size or field limits, 414 for a target too long, 400 for one
/// that does not parse. An HTTP/2 preface after HTTP/1 requests gets none.
fn refused_head(e: &hyper::Error) -> Option<StatusCode> {
    if e.is_parse_too_large() {
        // hyper gives a target too long the same kind; its message tells.
        let uri = e.to_string().contains("URI too long");
        Some(if uri {
            StatusCode::URI_TOO_LONG
        } else {
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        })
    } else if e.is_parse() && !e.is_parse_version_h2() {
        Some(StatusCode::BAD_REQUEST)
    } else {
        None
    }
}

/// Runs a hyper connection until it ends, shutting it down gracefully when
/// it has been idle too long or the listener stops. A head the connection
/// refused (`refused` says with which status) gets its access log line.
async fn drive<C, E, H>(
    mut conn: Pin<&mut C>,
    mut graceful_shutdown: impl FnMut(Pin<&mut C>),
    refused: impl Fn(&E) -> Option<StatusCode>,
    activity: &Activity,
    shared: &Shared<H>,
    client_addr: SocketAddr,
) where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let limits = &shared.limits;
    let (first, idle, send) = (
        limits.header_read_timeout,
        limits.idle_timeout,
        limits.send_timeout,
    );
    let mut due = pin!(activity.due(first, idle, send, true));
    let mut stop = pin!(shared.shutdown.triggered());
    // The connection's timer and the shutdown signal get a waker of their own, so
    // they are polled again only when one of them woke the task, not on each
    // of the several wakes of every request.
    let side = Arc::new(SideWake::default());
    let side_waker = std::task::Waker::from(Arc::clone(&side));
    let mut closing = false;
    std::future::poll_fn(|cx| loop {
        // The connection first: it is what wakes the task nearly always.
        if let Poll::Ready(result) = conn.as_mut().poll(cx) {
            if let Err(e) = result {
                debug!(%client_addr, error = %e, "connection ended with an error");
                if let Some(status) = refused(&e) {
                    log_unparsed(client_addr.ip(), status);
                }
            }
            return Poll::Ready(());
        }
        // Registered before the flag is read: a wake in between is not lost.
        side.task.register(cx.waker());
        if !side.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let mut side_cx = Context::from_waker(&side_waker);
        match due.as_mut().poll(&mut side_cx) {
            // Nothing to wait for: what the client does not take is dropped.
            Poll::Ready(Due::Stalled) => {
                debug!(%client_addr, "client took nothing for the send timeout; closing");
                return Poll::Ready(());
            }
            Poll::Ready(Due::Idle) => debug!(%client_addr, "closing idle connection"),
            // Once closing, the signal has been seen (and is not polled again).
            Poll::Pending if closing || stop.as_mut().poll(&mut side_cx).is_pending() => {
                return Poll::Pending
            }
            Poll::Pending => {}
        }
        graceful_shutdown(conn.as_mut());
        closing = true;
        // A graceful close still waits for what is being written: the send
        // timeout goes on watching it.
        due.set(activity.due(first, idle, send, false));
        side.woken.store(true, Ordering::Release);
    })
    .await;
}

/// Wakes a connection's task for its idle timer or the shutdown signal, and
/// says so. Starts woken, so that both are polled (and armed) once.
struct SideWake {
    woken: AtomicBool,
    task: futures_util::task::AtomicWaker,
}

impl Default for SideWake {
    fn default() -> Self {
        Self {
            woken: AtomicBool::new(true),
            task: futures_util::task::AtomicWaker::new(),
        }
    }
}

impl std::task::Wake for SideWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// What is wrong with an HTTP/1.1 request's transfer codings, if anything.
/// hyper takes a body whose last coding is chunked (and refuses any other
/// with 400) but decodes only that one: a coding before it would reach the
/// origin undecoded, as if the body had none. Chunked twice is malformed
/// (RFC 9112 §6.1, 400); any other coding is one not implemented here (501).
fn transfer_coding_error(headers: &http::HeaderMap) -> Option<ProxyError> {
    let mut codings = 0;
    let mut chunked = 0;
    for value in headers.get_all(http::header::TRANSFER_ENCODING) {
        for coding in value.as_bytes().split(|&b| b == b',') {
            let name = coding.split(|&b| b == b';').next().unwrap_or_default();
            let name = name.trim_ascii();
            if name.is_empty() {
                continue;
            }
            codings += 1;
            chunked += usize::from(name.eq_ignore_ascii_case(b"chunked"));
        }
    }
    match codings {
        0 | 1 => None,
        _ if chunked > 1 => Some(ProxyError::BadRequest("chunked more than once")),
        _ => Some(ProxyError::NotImplemented(
            "a transfer coding other than chunked",
        )),
    }
}

/// Applies the listener's own checks, then calls the handler.
async fn respond<H: Handler>(
    shared: &Shared<H>,
    req: Request<RequestBody>,
    info: Arc<ConnInfo>,
) -> Response<ResponseBody> {
    let limit = shared.limits.max_body_bytes;
    let version = req.version();
    // The body's exact size is its declared Content-Length (HTTP/1 and 2),
    // known without looking the field up again.
    let declared = req.body().size_hint().exact();
    let mut response = if declared.is_some_and(|len| len > limit) {
        let started = Instant::now();
        let response = shared
            .errors
            .respond(&ProxyError::PayloadTooLarge { limit }, Some(req.headers()));
        let bytes = response.body().size_hint().exact();
        log_refused(
            info.client_addr.ip(),
            &req,
            response.status(),
            bytes,
            started,
        );
        response
    } else {
        shared.handler.handle(req, info).await
    };
    // After 413 or 408 the rest of the body is unread, so the HTTP/1
    // connection cannot carry another request: say so and close (RFC 9110
    // §15.5.14, §15.5.9). HTTP/2 resets just the stream; Connection is not
    // allowed there.
    let unread_body = matches!(
        response.status(),
        StatusCode::PAYLOAD_TOO_LARGE | StatusCode::REQUEST_TIMEOUT
    );
    if unread_body && version < Version::HTTP_2 {
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Requests in flight on one connection and whether writing to it is
/// stuck, for the connection's timer.
///
/// Starting and ending a request costs two atomic operations and, when the
/// connection goes idle, one clock read: the idle timer is not re-armed per
/// request. It sleeps until the earliest moment the connection could be due
/// and, on waking, compares with when it last became idle. Writes cost
/// nothing unless one is blocked: [`Tracked`] notes a blocked write, and a
/// write that goes through after one, with two plain stores.
struct Activity {
    in_flight: AtomicUsize,
    /// Whether a request has started (the first wait is the shorter one).
    served: AtomicBool,
    /// When the connection last had no request in flight, in milliseconds
    /// since `opened`.
    idle_since_ms: AtomicU64,
    opened: Instant,
    /// Whether the last write to the client did not go through (the
    /// client is not reading).
    write_blocked: AtomicBool,
    /// Writes that went through after a blocked one: progress, to the timer.
    unblocked: AtomicU64,
    /// Bytes written to the client, for a connection that is closing.
    written: AtomicU64,
}

/// Bytes a closing connection may write in a send timeout without that
/// counting as progress: control frames (an HTTP/2 PING's answer is 17)
/// that a client can ask for while it takes no data.
const CONTROL_BYTES: u64 = 64;
/// How many send timeouts a closing connection with nothing in flight may
/// take to finish sending, progress or not.
const DRAIN_SENDS: u32 = 4;

/// Why a connection's timer went off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Due {
    /// No request in flight for the idle timeout: close gracefully.
    Idle,
    /// Writing to the client blocked, with no progress, for the send
    /// timeout: drop the connection.
    Stalled,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            in_flight: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            idle_since_ms: AtomicU64::new(0),
            opened: Instant::now(),
            write_blocked: AtomicBool::new(false),
            unblocked: AtomicU64::new(0),
            written: AtomicU64::new(0),
        }
    }

    /// Completes with [`Due::Idle`] when the connection has had no request
    /// in flight for `first` (before any request) or `idle` (afterwards),
    /// unless `idle_too` is false; and with [`Due::Stalled`] when writing
    /// to it has been blocked without progress at two looks `send` apart.
    /// With `idle_too` false (the connection is closing), a connection with
    /// no request in flight is stalled too when at two looks `send` apart
    /// no more than [`CONTROL_BYTES`] went out (what keeps it open is only
    /// what its client does not take, such as the last bytes of an HTTP/2
    /// stream behind a window held shut), or when it has been so for
    /// [`DRAIN_SENDS`] times `send`, however slowly it drains.
    async fn due(&self, first: Duration, idle: Duration, send: Duration, idle_too: bool) -> Due {
        // A request may start and end while the timer sleeps, after which the
        // connection is due `idle` after it ended: never sleep longer than that.
        let mut wake = if idle_too {
            self.opened + first.min(idle).min(send)
        } else {
            Instant::now()
        };
        // The progress count when writing was first seen blocked, and when.
        let mut blocked: Option<(u64, Instant)> = None;
        // While closing with no request in flight: the bytes written at the
        // last look that saw progress, and when; and when it was first seen.
        let mut drained: Option<(u64, Instant, Instant)> = None;
        loop {
            tokio::time::sleep_until(wake.into()).await;
            let now = Instant::now();
            // Writes are looked at again `send` from now, or sooner.
            let mut next = now + send;
            if self.write_blocked.load(Ordering::Relaxed) {
                let progress = self.unblocked.load(Ordering::Relaxed);
                match blocked {
                    Some((seen, since)) if seen == progress => {
                        if now >= since + send {
                            return Due::Stalled;
                        }
                        next = since + send;
                    }
                    _ => blocked = Some((progress, now)),
                }
            } else {
                blocked = None;
            }
            if !idle_too {
                if self.in_flight.load(Ordering::Acquire) > 0 {
                    drained = None;
                } else {
                    let written = self.written.load(Ordering::Relaxed);
                    match &mut drained {
                        None => drained = Some((written, now, now)),
                        Some((seen, since, first)) => {
                            if now >= *first + send * DRAIN_SENDS {
                                return Due::Stalled;
                            }
                            // Replies to the client's pings are no progress.
                            if written.saturating_sub(*seen) > CONTROL_BYTES {
                                (*seen, *since) = (written, now);
                            } else if now >= *since + send {
                                return Due::Stalled;
                            }
                            next = next.min(*since + send);
                        }
                    }
                }
                wake = next;
                continue;
            }
            if self.in_flight.load(Ordering::Acquire) > 0 {
                // Busy: it cannot be due before `idle` after this request ends.
                wake = next.min(now + idle);
                continue;
            }
            let served = self.served.load(Ordering::Acquire);
            let due = if served {
                self.opened
                    + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire))
                    + idle
            } else {
                self.opened + first
            };
            if now >= due {
                return Due::Idle;
            }
            wake = next.min(if served { due } else { due.min(now + idle) });
        }
    }
}

/// A connection's IO that tells its [`Activity`] when writing to the
/// client is blocked, and when a write goes through again.
struct Tracked<IO> {
    io: IO,
    activity: Arc<Activity>,
    /// The last write (or flush) was blocked.
    blocked: bool,
    /// Writes that went through after a blocked one.
    unblocked: u64,
    /// Bytes written.
    written: u64,
}

impl<IO> Tracked<IO> {
    fn new(io: IO, activity: Arc<Activity>) -> Self {
        Self {
            io,
            activity,
            blocked: false,
            unblocked: 0,
            written: 0,
        }
    }

    /// Notes how a write or flush went; costs nothing while none blocks.
    fn note<T>(&mut self, polled: &Poll<io::Result<T>>) {
        match polled {
            Poll::Pending if !self.blocked => {
                self.blocked = true;
                self.activity.write_blocked.store(true, Ordering::Relaxed);
            }
            Poll::Ready(_) if self.blocked => {
                self.blocked = false;
                self.unblocked += 1;
                self.activity
                    .unblocked
                    .store(self.unblocked, Ordering::Relaxed);
                self.activity.write_blocked.store(false, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    /// Counts the bytes of a write that went through: one plain store.
    fn count(&mut self, polled: &Poll<io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = polled {
            if *n > 0 {
                self.written += *n as u64;
                self.activity.written.store(self.written, Ordering::Relaxed);
            }
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Tracked<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Tracked<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.note(&polled);
        self.count(&polled);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.note(&polled);
        self.count(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // TLS holds written bytes until the socket takes them: a flush
        // can block too.
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.note(&polled);
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Counts one request as in flight until dropped, which happens when its
/// response body has been sent or the request was abandoned.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        activity.served.store(true, Ordering::Release);
        Self(Arc::clone(activity))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        // Record the moment before the count can read zero, so the timer
        // never pairs an idle connection with an old moment.
        let ms = u64::try_from(activity.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        activity.idle_since_ms.fetch_max(ms, Ordering::AcqRel);
        activity.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted as in flight, and on
/// HTTP/2 hands out its data in pieces of at most [`H2_PIECE`] bytes (for
/// the streams' send timeout, see `streams`).
struct GuardedBody {
    inner: ResponseBody,
    pieces: Sliced,
    _guard: InFlight,
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(piece) = this.pieces.next_piece() {
            streams::note_body_poll(true);
            return Poll::Ready(Some(Ok(Frame::data(piece))));
        }
        let polled = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => Poll::Ready(Some(Ok(Frame::data(this.pieces.cut(data))))),
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            },
            other => other,
        };
        streams::note_body_poll(matches!(&polled, Poll::Ready(Some(Ok(f))) if f.is_data()));
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.pieces.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.pieces.hint(self.inner.size_hint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// What hyper's HTTP/1 server answers to `request`, and the status
    /// [`refused_head`] reads from the error it ends with.
    async fn refused(request: Vec<u8>) -> (String, Option<StatusCode>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = ServerLimits {
            max_header_bytes: 128 * 1024,
            ..ServerLimits::default()
        };
        let server = async {
            let (stream, _) = listener.accept().await.unwrap();
            let service = hyper::service::service_fn(|_req: Request<Incoming>| async {
                Ok::<_, Infallible>(Response::new(http_body_util::Empty::<Bytes>::new()))
            });
            builder_h1(&limits)
                .serve_connection(TokioIo::new(stream), service)
                .await
        };
        let client = async {
            let mut client = TcpStream::connect(addr).await.unwrap();
            // The server may answer and close before it has read it all.
            let _ = client.write_all(&request).await;
            let _ = client.shutdown().await;
            let mut out = Vec::new();
            let _ = client.read_to_end(&mut out).await;
            String::from_utf8_lossy(&out).into_owned()
        };
        let bounded = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(server, client)
        });
        let (result, answer) = bounded.await.expect("the exchange ends");
        let status = result.err().as_ref().and_then(refused_head);
        (answer, status)
    }

    #[tokio::test]
    async fn the_status_of_a_refused_head_is_the_one_hyper_sent() {
        let long_target = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(70_000));
        let huge_head = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(140_000));
        for (request, status) in [
            ("GET / HTTP/1.1\r\nbad name: x\r\n\r\n".to_owned(), 400),
            (long_target, 414),
            (huge_head, 431),
        ] {
            let (answer, got) = refused(request.into_bytes()).await;
            assert!(
                answer.starts_with(&format!("HTTP/1.1 {status} ")),
                "{status}: {answer:.200}"
            );
            assert_eq!(got.map(|s| s.as_u16()), Some(status));
        }
        // A connection that just ends sent nothing and refused nothing.
        let (answer, got) = refused(b"GET / HTTP/1.1\r\n".to_vec()).await;
        assert_eq!((answer.as_str(), got), ("", None));
    }
}
