//! Keep-alive HTTP/1.1 connections to a backend's servers, driven by the
//! request that holds them.
//!
//! Portico speaks HTTP/1.1 to its backends itself (the wire format is in
//! [`super::codec`]). A general-purpose client puts a channel between the
//! request and its connection: the request is a message sent to the
//! connection's state machine and the response a message sent back, and
//! each costs a queue, a oneshot and their wake-ups. A proxy needs none of
//! that: the request's own task writes the request head straight from the
//! field map (and the proxy's forwarding fields, already encoded as lines)
//! into the connection's buffer, reads the response head into
//! fields that are slices of the read buffer ([`exchange`]), and the
//! response body ([`PooledBody`]) reads the body from the same buffer and
//! puts the connection back in the server's idle list the moment the body
//! ends. No task is spawned and no other task is woken.
//!
//! The time to a response head is kept by a timer that belongs to the
//! connection, not to the request: armed by the first exchange and re-armed
//! only when it fires before the exchange then waiting is due, it costs a
//! request on a kept connection no timer registration (see `HeadTimer`).
//!
//! An idle connection is not polled. Before one is reused, it is polled once
//! without a waker: a connection the server closed, or one that sat idle too
//! long, is dropped instead. A request that the connection never took (the
//! first write failed), and an idempotent request without a body on a reused
//! connection that closed before any byte of the answer (the server's idle
//! timer and the request crossed), come back and go out on a new connection
//! (RFC 9112 §9.3.1).
//!
//! Protocol upgrades (101 Switching Protocols) hand the connection over to
//! the two peers, so an upgrade gets a new connection run by hyper on a task
//! of its own, and it is never pooled.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Waker};
use std::time::{Duration, Instant};

use super::codec::{self, BodyEncoder, Decoded, Decoder, Parsed, ProtocolError, ResponseHead};
use super::config::KeepAlive;

use bytes::{Bytes, BytesMut};
use http::{Method, Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::pool::{BoxError, TlsSetup, UpstreamBody, UpstreamError};

/// Bytes the read buffer is grown by when it is nearly full: a response
/// of up to about 32 KiB arrives in one read, and the rest of the buffer
/// serves the next responses on the connection without another
/// allocation.
const READ_CHUNK: usize = 32 * 1024;
/// The largest write buffer an idle connection keeps (a request head
/// needs far less; a large upload's buffer is let go).
const IDLE_WRITE_MAX: usize = 16 * 1024;
/// Most bytes reserved for one read of a body of known length.
const MAX_READ: usize = 256 * 1024;

/// A connection to a server, plain or TLS.
pub(super) enum UpstreamStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Why an exchange on a connection failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum ConnError {
    /// The server closed the connection before the response was complete.
    #[error("the connection closed before the response was complete")]
    Closed,
    /// Reading or writing failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The server's bytes are not HTTP/1.1 (or the request body broke its
    /// own framing).
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The request body failed while it was being sent.
    #[error("request body: {0}")]
    RequestBody(#[source] BoxError),
    /// An upgrade exchange, run by hyper, failed.
    #[error(transparent)]
    Upgrade(#[from] hyper::Error),
    /// No response head came by the exchange's deadline.
    #[error("no response head in time")]
    TimedOut,
    /// The client sent no more of its request body for the stall limit:
    /// the wait was for the client, not the server.
    #[error("the client's request body stalled")]
    UploadStalled,
    /// The connection was lost after part of an answer had arrived: not a
    /// reset before any response byte, so not one to try again elsewhere.
    #[error("the answer was cut short: {0}")]
    CutShort(#[source] Box<ConnError>),
}

impl ConnError {
    /// Sorts the error into the client's body failing, a reset (the
    /// connection was lost) or a bad response, for the retry rules, the
    /// server's health and the client's status.
    pub(super) fn classify(self, server: &str) -> UpstreamError {
        let server = server.to_owned();
        if let ConnError::UploadStalled = self {
            return UpstreamError::RequestBodyTimeout { server };
        }
        if let ConnError::RequestBody(_) | ConnError::Protocol(ProtocolError::RequestLength) = self
        {
            return UpstreamError::RequestBody {
                server,
                source: Box::new(self),
            };
        }
        let reset = match &self {
            ConnError::Closed | ConnError::Protocol(ProtocolError::Incomplete) => true,
            ConnError::Io(e) => is_reset(e.kind()),
            ConnError::Upgrade(e) => {
                e.is_incomplete_message()
                    || e.is_canceled()
                    || e.is_closed()
                    || io_source(e).is_some_and(|io| is_reset(io.kind()))
            }
            ConnError::Protocol(_)
            | ConnError::RequestBody(_)
            | ConnError::TimedOut
            | ConnError::UploadStalled
            | ConnError::CutShort(_) => false,
        };
        if reset {
            UpstreamError::Reset {
                server,
                source: Box::new(self),
            }
        } else {
            UpstreamError::BadResponse {
                server,
                source: Box::new(self),
            }
        }
    }
}

fn is_reset(kind: io::ErrorKind) -> bool {
    matches!(
        kind,
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
    )
}

fn io_source<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a io::Error> {
    let mut source = e.source();
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return Some(io);
        }
        source = err.source();
    }
    None
}

/// One open connection: the stream, what was read from it and not yet
/// taken, and the buffer requests are written from. It is always boxed, so
/// that handing it between the idle list, the exchange and the response
/// body moves a pointer.
pub(super) struct Conn {
    io: UpstreamStream,
    read: BytesMut,
    write: Vec<u8>,
    idle_since: Instant,
    /// Exchanges begun on this connection.
    uses: u32,
    /// Whether the read buffer was last grown past the usual size (for a
    /// large body): such a buffer is not kept while the connection idles.
    large_read: bool,
    /// The field names of the last response head.
    names: codec::FieldNames,
    /// The timer for the time to a response head, kept between exchanges.
    timer: HeadTimer,
    /// Interim (1xx) heads taken in this exchange, during the upload or
    /// after it: at most [`codec::MAX_INTERIM`].
    interim: u32,
}

/// A connection's timer for the time to a response head. It is armed once
/// and re-armed only when it fires before the exchange waiting is due, so
/// that an exchange on a kept connection, whose deadline is later than the
/// one the timer was armed for, costs no timer registration at all: a timer
/// armed for the first of many requests fires once, finds the current one
/// not yet due, and is armed again for it.
#[derive(Default)]
struct HeadTimer {
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl HeadTimer {
    /// Ready once `due` has passed; otherwise Pending, with `cx` woken no
    /// later than `due`.
    fn poll_due(&mut self, cx: &mut Context<'_>, due: tokio::time::Instant) -> Poll<()> {
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        loop {
            if sleep.deadline() > due {
                // Armed for a later deadline than this one: it would wake too late.
                sleep.as_mut().reset(due);
            }
            // Unconstrained: the exchange may have spent the task's budget
            // on I/O that was always ready (say a flood of interim heads),
            // and a constrained poll would then never see the deadline.
            if pin!(tokio::task::coop::unconstrained(sleep.as_mut()))
                .poll(cx)
                .is_pending()
            {
                return Poll::Pending;
            }
            if tokio::time::Instant::now() >= due {
                return Poll::Ready(());
            }
            sleep.as_mut().reset(due);
        }
    }
}

impl Conn {
    /// Reads what the server has sent into the read buffer, growing it by
    /// at least `want` bytes when it is nearly full. `Ok(0)` is the end of
    /// the connection.
    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        if self.read.capacity() - self.read.len() < READ_CHUNK / 4 {
            // One byte more than is wanted: a read that fills the buffer
            // leaves the socket marked readable, and the next look at it
            // (say, whether an idle connection is still open) costs a read
            // that finds nothing.
            let grow = want.saturating_add(1).clamp(READ_CHUNK, MAX_READ);
            self.large_read |= want > READ_CHUNK;
            self.read.reserve(grow);
        }
        pin!(self.io.read_buf(&mut self.read)).poll(cx)
    }

    /// Whether an idle connection can carry a request: one poll without a
    /// waker, which notices a close, a reset, or bytes nobody asked for.
    fn still_open(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        self.poll_fill(&mut cx, READ_CHUNK).is_pending()
    }

    /// Writes the write buffer from `*at` on; Pending when the socket is
    /// full.
    fn poll_write_out(&mut self, cx: &mut Context<'_>, at: &mut usize) -> Poll<io::Result<()>> {
        while *at < self.write.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.write[*at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *at += n;
        }
        Poll::Ready(Ok(()))
    }

    /// Counts one more interim head; an error once there are too many.
    fn take_interim(&mut self) -> Result<(), ProtocolError> {
        self.interim += 1;
        if self.interim > codec::MAX_INTERIM {
            return Err(ProtocolError::TooManyInterim);
        }
        Ok(())
    }

    /// Whether the server has already sent the head of a final answer that
    /// ends the upload: 300 or more (say 413), or any answer that closes the
    /// connection, which it may send before it has read the whole request
    /// body; or any final answer after which the server closed or reset the
    /// connection (a server that answers 200 without reading a large body,
    /// then closes, is common). Another 2xx head waits in the buffer while
    /// the body goes on (a streaming server may answer as it reads), and
    /// what follows it is read, up to [`READ_CHUNK`], only to see such a
    /// close; interim answers (100 Continue) are taken and dropped; a head
    /// still arriving is waited for, so that a partial `100 Continue` does
    /// not stop the upload.
    ///
    /// Called only when writing or the request body is pending, so a
    /// Pending here always has a waker registered on that side too.
    fn poll_early_answer(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnError>> {
        loop {
            let answered = loop {
                match peek_head(&self.read)? {
                    Peek::Interim(len) => {
                        self.take_interim()?;
                        let _ = self.read.split_to(len);
                    }
                    // The final head stays in the buffer for `read_head`.
                    Peek::Final { status, closes } if status >= 300 || closes => {
                        return Poll::Ready(Ok(()))
                    }
                    Peek::Final { .. } => break true,
                    Peek::Partial => break false,
                }
            };
            if answered && self.read.len() >= READ_CHUNK {
                // The rest of the answer waits for the end of the upload.
                return Poll::Pending;
            }
            match ready!(self.poll_fill(cx, READ_CHUNK)) {
                // Closed or reset after answering: the answer stands.
                Ok(0) | Err(_) if answered => return Poll::Ready(Ok(())),
                Ok(0) => return Poll::Ready(Err(ConnError::Closed)),
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
    }
}

/// What a look at the start of the read buffer finds.
enum Peek {
    /// A whole interim (1xx) head of this length.
    Interim(usize),
    /// A whole final head with this status, and whether it says the server
    /// closes the connection after it.
    Final { status: u16, closes: bool },
    /// Nothing whole yet.
    Partial,
}

/// Whether a response head ends its connection: `Connection: close`, or
/// HTTP/1.0 without `keep-alive`.
fn closes(response: &httparse::Response<'_, '_>) -> bool {
    let mut keep_alive = false;
    for field in response.headers.iter() {
        if !field.name.eq_ignore_ascii_case("connection") {
            continue;
        }
        for token in field.value.split(|&b| b == b',') {
            let token = token.trim_ascii();
            if token.eq_ignore_ascii_case(b"close") {
                return true;
            }
            keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
        }
    }
    response.version == Some(0) && !keep_alive
}

fn peek_head(buf: &[u8]) -> Result<Peek, ProtocolError> {
    if buf.is_empty() {
        return Ok(Peek::Partial);
    }
    let mut fields = [const { std::mem::MaybeUninit::uninit() }; codec::MAX_FIELDS];
    let mut response = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        &mut fields,
    );
    match parsed {
        Ok(httparse::Status::Complete(len)) => Ok(match response.code.unwrap_or(0) {
            code @ 100..=199 if code != 101 => Peek::Interim(len),
            status => Peek::Final {
                status,
                closes: closes(&response),
            },
        }),
        Ok(httparse::Status::Partial) if buf.len() > codec::MAX_HEAD_BYTES => {
            Err(ProtocolError::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => Ok(Peek::Partial),
        Err(e) => Err(ProtocolError::Head(e)),
    }
}

/// The idle connections of each server of one backend, and how to open more.
pub(super) struct Connections {
    /// Per server, oldest first: checkout takes the most recently used
    /// (its buffers are the likeliest to be in cache), the cap and the
    /// timeout close from the front. Boxed on purpose: a connection leaves
    /// the list by pointer.
    idle: Box<[Mutex<VecDeque<Box<Conn>>>]>,
    keepalive: KeepAlive,
    tls: Option<TlsSetup>,
}

impl Connections {
    /// Idle lists for `servers` servers, kept as `keepalive` says; `tls`
    /// wraps every new connection.
    pub(super) fn new(servers: usize, tls: Option<TlsSetup>, keepalive: KeepAlive) -> Arc<Self> {
        Arc::new(Self {
            idle: (0..servers).map(|_| Mutex::new(VecDeque::new())).collect(),
            keepalive,
            tls,
        })
    }

    /// The most recently used idle connection to server `i` that is still
    /// open, if any. Closed and expired ones met on the way are dropped.
    pub(super) fn checkout(&self, i: usize) -> Option<Box<Conn>> {
        loop {
            let mut conn = self.idle[i].lock().ok()?.pop_back()?;
            if conn.idle_since.elapsed() > self.keepalive.idle_timeout {
                continue;
            }
            if conn.still_open() {
                return Some(conn);
            }
        }
    }

    /// Puts a connection whose exchange is over, with nothing left unread,
    /// back in server `i`'s list.
    fn checkin(&self, i: usize, mut conn: Box<Conn>) {
        let Ok(mut idle) = self.idle[i].lock() else {
            return;
        };
        let now = Instant::now();
        let timeout = self.keepalive.idle_timeout;
        while idle
            .front()
            .is_some_and(|c| now.duration_since(c.idle_since) > timeout)
        {
            idle.pop_front();
        }
        if self.keepalive.idle_max == 0 {
            return;
        }
        if idle.len() >= self.keepalive.idle_max {
            // Closing it here, under the lock, is a shutdown of a socket
            // and the release of its buffers: short.
            idle.pop_front();
        }
        if conn.large_read {
            // A large body's buffer is not kept for an idle connection (its
            // capacity left says nothing of the allocation behind it); the
            // next request starts a small one.
            conn.read = BytesMut::new();
            conn.large_read = false;
        }
        if conn.write.capacity() > IDLE_WRITE_MAX {
            // Nor a large upload's.
            conn.write = Vec::new();
        }
        conn.idle_since = now;
        idle.push_back(conn);
    }

    /// Opens a connection to `addr` (`host:port`), TLS included, within
    /// `limit`.
    pub(super) async fn open(
        &self,
        addr: &str,
        host: &str,
        limit: Duration,
    ) -> Result<Box<Conn>, UpstreamError> {
        let connect_error = |source: BoxError| UpstreamError::Connect {
            server: addr.to_owned(),
            source,
        };
        let timed_out = || UpstreamError::ConnectTimeout {
            server: addr.to_owned(),
        };
        let deadline = tokio::time::Instant::now() + limit;
        let tcp = tokio::time::timeout_at(deadline, TcpStream::connect(addr))
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| connect_error(Box::new(e)))?;
        // Small requests and responses must not wait for Nagle's algorithm.
        tcp.set_nodelay(true)
            .map_err(|e| connect_error(Box::new(e)))?;
        let io = match &self.tls {
            None => UpstreamStream::Plain(tcp),
            Some(tls) => {
                let name = match &tls.server_name {
                    Some(n) => n.clone(),
                    None => ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
                        .map_err(|e| connect_error(Box::new(e)))?,
                };
                let handshake = tls.connector.connect(name, tcp);
                let stream = tokio::time::timeout_at(deadline, handshake)
                    .await
                    .map_err(|_| timed_out())?
                    .map_err(|e| connect_error(Box::new(e)))?;
                UpstreamStream::Tls(Box::new(stream))
            }
        };
        Ok(Box::new(Conn {
            io,
            read: BytesMut::new(),
            write: Vec::new(),
            idle_since: Instant::now(),
            uses: 0,
            large_read: false,
            names: codec::FieldNames::default(),
            timer: HeadTimer::default(),
            interim: 0,
        }))
    }
}

/// How an exchange on a connection failed.
pub(super) enum ExchangeError {
    /// The request did not reach the server, or may go again (see the
    /// module doc); it comes back to be sent on a new connection.
    Unsent(Box<Request<UpstreamBody>>, ConnError),
    /// The request was (perhaps partly) sent.
    Failed(ConnError),
}

/// Sends `req` on `conn` and reads the response head. The response body
/// goes on reading from the connection and returns it to server `server`'s
/// idle list of `home` when it ends. `resendable` says whether the request
/// may go out again when a reused connection closes before answering
/// (idempotent, no body). `extra` holds field lines written after the
/// request's own fields, each ending in CRLF. With no response head by
/// `due`, the exchange fails with [`ConnError::TimedOut`]. With `rearm`
/// (the first-byte limit and the end of the total limit), a request with a
/// body gets that limit for each wait of its upload that makes no progress,
/// and for the response head from when the upload ended, however long the
/// upload took; never past the end.
#[allow(clippy::too_many_arguments)]
pub(super) async fn exchange(
    mut conn: Box<Conn>,
    req: Request<UpstreamBody>,
    extra: &[u8],
    home: &Arc<Connections>,
    server: usize,
    resendable: bool,
    mut due: tokio::time::Instant,
    rearm: Option<(Duration, tokio::time::Instant)>,
) -> Result<Response<PooledBody>, ExchangeError> {
    // Out of the connection while it is borrowed by the polls below; it
    // goes back with the connection into the response body.
    let mut timer = std::mem::take(&mut conn.timer);
    let (parts, mut body) = req.into_parts();
    let head_request = parts.method == Method::HEAD;
    let empty = body.is_end_stream();
    let framing = codec::request_framing(&parts.method, empty, body.size_hint().exact());
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    conn.write.clear();
    conn.interim = 0;
    codec::encode_request_head(
        &mut conn.write,
        &parts.method,
        target,
        &parts.headers,
        extra,
        framing,
    );
    let reused = conn.uses > 0;
    conn.uses += 1;

    let mut encoder = BodyEncoder::new(framing);
    let mut body_done = empty;
    if empty {
        // Nothing to write after the head but the end of a chunked body.
        if let Err(e) = encoder.finish(&mut conn.write) {
            return Err(ExchangeError::Failed(e.into()));
        }
    }
    // Bytes of the write buffer written, and whether any byte of this
    // request went out at all (only a request of which none did may go out
    // again whatever its method).
    let mut at = 0;
    let mut wrote_any = false;
    // Steps of the upload (a body frame taken, a write done), counted to
    // tell a slow upload from a stalled one.
    let progress = AtomicU64::new(0);
    // Whether the upload's last wait was for the client's next body frame
    // (with everything before it written), not for the server to read.
    let waiting_for_client = AtomicBool::new(false);
    let rearm = rearm.filter(|_| !empty);
    // The whole request went out (Ok(true)), or the server answered before
    // it had all of it (Ok(false)).
    let mut send = |cx: &mut Context<'_>| loop {
        waiting_for_client.store(false, Ordering::Relaxed);
        let before = at;
        let written = conn.poll_write_out(cx, &mut at);
        wrote_any |= at > 0;
        if at != before {
            progress.fetch_add(1, Ordering::Relaxed);
        }
        match written {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => {
                // A server that refuses the rest of a body (say with 413)
                // often closes at once: its answer may already be here.
                if wrote_any {
                    if let Poll::Ready(Ok(())) = conn.poll_early_answer(cx) {
                        return Poll::Ready(Ok(false));
                    }
                }
                return Poll::Ready(Err((!wrote_any, ConnError::Io(e))));
            }
            Poll::Pending => {
                return match conn.poll_early_answer(cx) {
                    Poll::Ready(Ok(())) => Poll::Ready(Ok(false)),
                    Poll::Ready(Err(e)) => Poll::Ready(Err((false, e))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
        conn.write.clear();
        at = 0;
        if body_done {
            return match ready!(Pin::new(&mut conn.io).poll_flush(cx)) {
                Ok(()) => Poll::Ready(Ok(true)),
                Err(e) => Poll::Ready(Err((false, e.into()))),
            };
        }
        match Pin::new(&mut body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                // Request trailers are not forwarded.
                if let Ok(data) = frame.into_data() {
                    if let Err(e) = encoder.data(&data, &mut conn.write) {
                        return Poll::Ready(Err((false, e.into())));
                    }
                }
            }
            Poll::Ready(Some(Err(e))) => {
                return Poll::Ready(Err((false, ConnError::RequestBody(e))))
            }
            Poll::Ready(None) => {
                if let Err(e) = encoder.finish(&mut conn.write) {
                    return Poll::Ready(Err((false, e.into())));
                }
                body_done = true;
            }
            Poll::Pending => {
                // Waiting for the client: what was written must reach the
                // server meanwhile, and the server may answer early.
                match Pin::new(&mut conn.io).poll_flush(cx) {
                    Poll::Ready(Err(e)) => return Poll::Ready(Err((false, e.into()))),
                    Poll::Ready(Ok(())) => waiting_for_client.store(true, Ordering::Relaxed),
                    Poll::Pending => {}
                }
                return match conn.poll_early_answer(cx) {
                    Poll::Ready(Ok(())) => Poll::Ready(Ok(false)),
                    Poll::Ready(Err(e)) => Poll::Ready(Err((false, e))),
                    Poll::Pending => Poll::Pending,
                };
            }
        }
    };
    // A request that timed out is not sent again, whatever went out of it.
    let mut seen = 0;
    let sent = poll_fn(|cx| match send(cx) {
        Poll::Pending => {
            if let Some((limit, end)) = rearm {
                let now = progress.load(Ordering::Relaxed);
                if now != seen {
                    seen = now;
                    due = end.min(tokio::time::Instant::now() + limit);
                }
            }
            match timer.poll_due(cx, due) {
                // A client that stops sending its body is no sign of the
                // server's health (RFC 9110 section 15.5.9: 408).
                Poll::Ready(()) if waiting_for_client.load(Ordering::Relaxed) => {
                    Poll::Ready(Err((false, ConnError::UploadStalled)))
                }
                Poll::Ready(()) => Poll::Ready(Err((false, ConnError::TimedOut))),
                Poll::Pending => Poll::Pending,
            }
        }
        other => other,
    })
    .await;
    if let Some((limit, end)) = rearm {
        // The first byte is timed from the end of the upload.
        due = end.min(tokio::time::Instant::now() + limit);
    }
    let whole = match sent {
        Ok(whole) => whole,
        Err((true, e)) => {
            return Err(ExchangeError::Unsent(
                Box::new(Request::from_parts(parts, body)),
                e,
            ))
        }
        Err((false, e)) => return Err(ExchangeError::Failed(e)),
    };
    drop(body);

    let mut answered = false;
    let head = poll_fn(
        |cx| match read_head(&mut conn, cx, head_request, &mut answered) {
            Poll::Pending if timer.poll_due(cx, due).is_ready() => {
                Poll::Ready(Err(ConnError::TimedOut))
            }
            other => other,
        },
    )
    .await;
    let head = match head {
        Ok(head) => head,
        Err(e) => {
            let lost = matches!(&e, ConnError::Closed)
                || matches!(&e, ConnError::Io(io) if is_reset(io.kind()));
            if lost && reused && !answered && resendable && empty {
                return Err(ExchangeError::Unsent(
                    Box::new(Request::from_parts(parts, codec_empty_body())),
                    e,
                ));
            }
            let lost = lost || matches!(&e, ConnError::Protocol(ProtocolError::Incomplete));
            if lost && answered {
                return Err(ExchangeError::Failed(ConnError::CutShort(Box::new(e))));
            }
            return Err(ExchangeError::Failed(e));
        }
    };
    let ResponseHead {
        status,
        version,
        fields,
        body: decoder,
        keep_alive,
    } = *head;
    // A request body the server did not wait for leaves the connection in
    // no state to carry another request.
    let keep_alive = keep_alive && whole;
    conn.timer = timer;
    let mut body = PooledBody::new(Source::Own(Own {
        conn: Some(conn),
        decoder,
        ready: None,
        keep_alive,
        home: Some((Arc::clone(home), server)),
    }));
    body.take_buffered();
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    *resp.version_mut() = version;
    *resp.headers_mut() = fields;
    Ok(resp)
}

/// An empty request body, for a request that goes out once more.
fn codec_empty_body() -> UpstreamBody {
    use http_body_util::{BodyExt, Empty};
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// Reads until a final response head is in the buffer; `answered` turns
/// true with the first byte of any answer.
fn read_head(
    conn: &mut Conn,
    cx: &mut Context<'_>,
    head_request: bool,
    answered: &mut bool,
) -> Poll<Result<Box<ResponseHead>, ConnError>> {
    loop {
        if !conn.read.is_empty() {
            *answered = true;
            match codec::parse_response_head_with(&mut conn.read, head_request, &mut conn.names)? {
                Parsed::Final(head) => return Poll::Ready(Ok(head)),
                Parsed::Interim => {
                    conn.take_interim()?;
                    continue;
                }
                Parsed::Partial => {}
            }
        }
        match ready!(conn.poll_fill(cx, READ_CHUNK)) {
            Ok(0) => return Poll::Ready(Err(ConnError::Closed)),
            Ok(_) => {}
            Err(e) => return Poll::Ready(Err(e.into())),
        }
    }
}

/// Sends an upgrade request on a new connection run by hyper on a task of
/// its own, so that the connection can switch protocols after the response.
pub(super) async fn exchange_upgrade(
    conn: Box<Conn>,
    req: Request<UpstreamBody>,
) -> Result<Response<PooledBody>, ConnError> {
    let Conn { io, .. } = *conn;
    let (mut sender, driver) = http1::Builder::new()
        .handshake::<_, UpstreamBody>(TokioIo::new(io))
        .await?;
    tokio::spawn(async move {
        if let Err(e) = driver.with_upgrades().await {
            tracing::debug!(error = %e, "upgraded upstream connection ended");
        }
    });
    let resp = sender.send_request(req).await?;
    // hyper takes a body whose last coding is chunked, or one ended by
    // closing the connection, and decodes chunked alone: an answer other
    // than the switch that comes with another coding is refused here as
    // Portico's own client refuses it. Dropping the response closes the
    // connection.
    let status = resp.status();
    if status != http::StatusCode::SWITCHING_PROTOCOLS
        && status != http::StatusCode::NO_CONTENT
        && status != http::StatusCode::NOT_MODIFIED
        && resp.headers().contains_key(http::header::TRANSFER_ENCODING)
    {
        codec::check_transfer_codings(resp.headers())?;
    }
    Ok(resp.map(|inner| PooledBody::new(Source::Hyper(inner))))
}

/// A body read from one of Portico's connections.
struct Own {
    /// None once the body has ended or failed.
    conn: Option<Box<Conn>>,
    decoder: Decoder,
    /// The whole body, taken from the buffer when it came with the head.
    ready: Option<Bytes>,
    /// Whether the connection may carry another request once the body ends.
    keep_alive: bool,
    /// The idle list the connection goes back to, and its server's index.
    home: Option<(Arc<Connections>, usize)>,
}

impl Own {
    /// Gives the connection back (or closes it) once the body has ended.
    fn release(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        // Bytes past the body's end are a server error: never reuse that.
        if self.keep_alive && self.decoder.is_done() && conn.read.is_empty() {
            if let Some((home, server)) = self.home.take() {
                home.checkin(server, conn);
            }
        }
    }

    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ConnError>>> {
        if let Some(data) = self.ready.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match self.decoder.decode(&mut conn.read) {
                Ok(Decoded::Data(data)) => {
                    if self.decoder.is_done() {
                        self.release();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Decoded::Trailers(fields)) => {
                    self.release();
                    return Poll::Ready(Some(Ok(Frame::trailers(fields))));
                }
                Ok(Decoded::End) => {
                    self.release();
                    return Poll::Ready(None);
                }
                Ok(Decoded::More) => {}
                Err(e) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
            let want = self
                .decoder
                .remaining()
                .map_or(READ_CHUNK, |n| usize::try_from(n).unwrap_or(MAX_READ));
            match ready!(conn.poll_fill(cx, want)) {
                Ok(0) => {
                    self.conn = None;
                    return match self.decoder.at_eof() {
                        Ok(()) => Poll::Ready(None),
                        Err(e) => Poll::Ready(Some(Err(e.into()))),
                    };
                }
                Ok(_) => {}
                Err(e) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }
}

enum Source {
    Own(Own),
    /// The body of an upgrade exchange, read by hyper.
    Hyper(Incoming),
}

/// A response body from a server. Reading it reads its connection, which
/// goes back to the idle list when the body ends; a body dropped before its
/// end closes the connection. A body that has not ended by its deadline
/// fails with a timeout.
pub struct PooledBody {
    source: Source,
    end_by: Option<tokio::time::Instant>,
    /// Armed the first time the body has to wait for the server, so a body
    /// that arrives with its head costs no timer.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Counts this exchange in the server's load until the body ends or is
    /// dropped (least-connections and two-choices balancing).
    load: Option<super::balance::InFlightGuard>,
}

impl std::fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pooled = match &self.source {
            Source::Own(own) => own.conn.is_some(),
            Source::Hyper(_) => false,
        };
        f.debug_struct("PooledBody")
            .field("pooled", &pooled)
            .finish_non_exhaustive()
    }
}

impl PooledBody {
    fn new(source: Source) -> Self {
        Self {
            source,
            end_by: None,
            timer: None,
            load: None,
        }
    }

    /// When the body is already whole in the read buffer (it came with the
    /// head, or there is none), takes it and frees the connection now,
    /// whether or not the caller ever reads the body.
    fn take_buffered(&mut self) {
        let Source::Own(own) = &mut self.source else {
            return;
        };
        let Some(conn) = own.conn.as_mut() else {
            return;
        };
        let whole = match own.decoder {
            Decoder::Done => true,
            Decoder::Length(n) => conn.read.len() as u64 >= n,
            _ => false,
        };
        if !whole {
            return;
        }
        if let Ok(Decoded::Data(data)) = own.decoder.decode(&mut conn.read) {
            own.ready = Some(data);
        }
        own.release();
    }

    /// Counts the exchange in its server's load for as long as the body
    /// lasts.
    pub(super) fn hold_load(&mut self, guard: super::balance::InFlightGuard) {
        self.load = Some(guard);
    }

    /// Takes this exchange's count in its server's load, for a caller that
    /// keeps the exchange going after the body: an upgraded connection,
    /// whose `101` has an empty body but which is the server's for as long
    /// as it is spliced.
    pub fn take_load(&mut self) -> Option<super::balance::InFlightGuard> {
        self.load.take()
    }

    /// Index of the server that answered, in the backend's server list,
    /// while the body is still being read.
    pub fn server(&self) -> Option<usize> {
        self.load
            .as_ref()
            .map(super::balance::InFlightGuard::server)
    }

    /// Fails the body if it has not ended by `deadline`.
    pub(super) fn end_by(&mut self, deadline: tokio::time::Instant) {
        self.end_by = Some(deadline);
    }

    /// Whether the deadline has passed (arming its timer on first use).
    fn late(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(deadline) = self.end_by else {
            return false;
        };
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        // Unconstrained, like the head timer: a body always ready to read
        // spends the task's budget, and the limit must still be seen.
        if pin!(tokio::task::coop::unconstrained(timer.as_mut()))
            .poll(cx)
            .is_ready()
        {
            self.end_by = None;
            return true;
        }
        false
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = match &mut this.source {
            Source::Own(own) => own.poll_frame(cx).map_err(BoxError::from),
            Source::Hyper(inner) => Pin::new(inner).poll_frame(cx).map_err(BoxError::from),
        };
        match polled {
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                this.load = None;
                polled
            }
            Poll::Ready(Some(Ok(frame))) => {
                if this.is_end_stream() {
                    this.load = None;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => {
                if this.late(cx) {
                    this.load = None;
                    if let Source::Own(own) = &mut this.source {
                        own.conn = None;
                        own.decoder = Decoder::Done;
                    }
                    let late = io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the response body ran past the total time limit",
                    );
                    return Poll::Ready(Some(Err(Box::new(late))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.source {
            Source::Own(own) => own.ready.is_none() && own.decoder.is_done(),
            Source::Hyper(inner) => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Own(own) => {
                let ready = own.ready.as_ref().map_or(0, |b| b.len() as u64);
                match own.decoder.remaining() {
                    Some(n) => SizeHint::with_exact(n + ready),
                    None => {
                        let mut hint = SizeHint::new();
                        hint.set_lower(ready);
                        hint
                    }
                }
            }
            Source::Hyper(inner) => inner.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    fn far_off() -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_secs(60)
    }

    /// An origin on 127.0.0.1 that answers each request on one connection
    /// with a body of the next of `sizes` bytes.
    async fn origin(sizes: Vec<usize>) -> (String, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut chunk = [0u8; 4096];
            for size in sizes {
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
                let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {size}\r\n\r\n");
                tcp.write_all(answer.as_bytes()).await.unwrap();
                tcp.write_all(&vec![b'x'; size]).await.unwrap();
            }
        });
        (addr, task)
    }

    #[tokio::test]
    async fn an_idle_connection_keeps_no_large_read_buffer() {
        let sizes = vec![300 * 1024, 1024];
        let (addr, task) = origin(sizes.clone()).await;
        let conns = Connections::new(1, None, KeepAlive::default());
        for size in sizes {
            let conn = match conns.checkout(0) {
                Some(conn) => conn,
                None => conns
                    .open(&addr, "127.0.0.1", Duration::from_secs(2))
                    .await
                    .unwrap(),
            };
            let empty = Empty::new().map_err(|never| match never {}).boxed_unsync();
            let req = Request::get("/").body(empty).unwrap();
            let Ok(resp) = exchange(conn, req, b"", &conns, 0, true, far_off(), None).await else {
                panic!("exchange failed");
            };
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body.len(), size);
            drop(body);
            let mut idle = conns.idle[0].lock().unwrap();
            let conn = idle.back_mut().expect("the connection went back idle");
            if size > 2 * READ_CHUNK {
                // The large allocation was let go: a buffer still holding
                // it would take it back in place and report its size.
                conn.read.reserve(1);
                assert!(
                    conn.read.capacity() <= 2 * READ_CHUNK,
                    "{}",
                    conn.read.capacity()
                );
            } else {
                // A small one is kept for the next response, and no more.
                assert!(conn.read.capacity() > 0);
                assert!(
                    conn.read.capacity() <= READ_CHUNK,
                    "{}",
                    conn.read.capacity()
                );
            }
        }
        task.abort();
    }
}
