//! Keep-alive HTTP/1.1 connections to a backend's servers, driven by the
//! request that holds them.
//!
//! A general-purpose pooled client drives every connection on a task of its
//! own and returns a connection to its pool from yet another task, so one
//! proxied request wakes three tasks. Here the request's own task drives the
//! connection: it polls it while the request is written and the response
//! head awaited ([`exchange`]), then the response body ([`PooledBody`])
//! polls it while the body is read and puts it back in the server's idle list
//! the moment the body ends. No task is spawned and no other task is woken.
//!
//! An idle connection is not polled. Before one is reused, it is polled once
//! without a waker: a connection the server closed, or one that sat idle too
//! long, is dropped instead. A request that the connection never took (it
//! closed first) comes back and goes out on a new connection.
//!
//! Protocol upgrades (101 Switching Protocols) need the connection to outlive
//! the exchange, so an upgrade gets a new connection driven by a task of its
//! own, and it is never pooled.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use super::config::KeepAlive;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

use super::pool::{BoxError, TlsSetup, UpstreamBody, UpstreamError, UpstreamStream};

/// One open connection: the handle requests are sent through and the state
/// machine that does the reading and writing. It is large and always boxed,
/// so that handing it between the idle list, the exchange and the response
/// body moves a pointer.
pub(super) struct Conn {
    sender: http1::SendRequest<UpstreamBody>,
    driver: http1::Connection<UpstreamStream, UpstreamBody>,
    idle_since: Instant,
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
    /// open and ready, if any. Closed and expired ones met on the way are
    /// dropped.
    pub(super) fn checkout(&self, i: usize) -> Option<Box<Conn>> {
        loop {
            let mut conn = self.idle[i].lock().ok()?.pop_back()?;
            if conn.idle_since.elapsed() > self.keepalive.idle_timeout {
                continue;
            }
            // One poll without a waker notices a close or reset the server
            // sent while the connection sat idle.
            let mut cx = Context::from_waker(Waker::noop());
            if Pin::new(&mut conn.driver).poll(&mut cx).is_ready() {
                continue;
            }
            if conn.sender.is_ready() {
                return Some(conn);
            }
        }
    }

    /// Puts a connection whose exchange is over back in server `i`'s list,
    /// if it can take another request.
    fn checkin(&self, i: usize, mut conn: Box<Conn>) {
        // The connection settles into keep-alive (or closes) when polled
        // after the last byte of the response. No waker: an idle connection
        // must not hold on to (and later wake) the task that last used it;
        // checkout polls it again.
        let mut cx = Context::from_waker(Waker::noop());
        if Pin::new(&mut conn.driver).poll(&mut cx).is_ready() || !conn.sender.is_ready() {
            return;
        }
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
        let stream = match &self.tls {
            None => UpstreamStream::Plain(TokioIo::new(tcp)),
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
                UpstreamStream::Tls(Box::new(TokioIo::new(stream)))
            }
        };
        let (sender, driver) = http1::Builder::new()
            .handshake(stream)
            .await
            .map_err(|e| connect_error(Box::new(e)))?;
        Ok(Box::new(Conn {
            sender,
            driver,
            idle_since: Instant::now(),
        }))
    }
}

/// How an exchange on a connection failed.
pub(super) enum ExchangeError {
    /// The connection closed before it took the request, which comes back
    /// unsent.
    Unsent(Box<Request<UpstreamBody>>, hyper::Error),
    /// The request was (perhaps partly) sent.
    Failed(hyper::Error),
}

/// Sends `req` on `conn`, driving the connection from this task until the
/// response head arrives. The response body goes on driving it and returns
/// it to server `server`'s idle list of `home` when it ends.
pub(super) async fn exchange(
    mut conn: Box<Conn>,
    req: Request<UpstreamBody>,
    home: &Arc<Connections>,
    server: usize,
) -> Result<Response<PooledBody>, ExchangeError> {
    let mut response = pin!(conn.sender.try_send_request(req));
    let mut conn = Some(conn);
    let head = poll_fn(|cx| {
        if let Poll::Ready(r) = response.as_mut().poll(cx) {
            return Poll::Ready(r);
        }
        if let Some(c) = conn.as_mut() {
            if Pin::new(&mut c.driver).poll(cx).is_ready() {
                // Closed: dropping the connection answers the request with
                // its error if the connection has not already done so.
                conn = None;
            }
        }
        response.as_mut().poll(cx)
    })
    .await;
    let resp = match head {
        Ok(resp) => resp,
        Err(mut e) => {
            return Err(match e.take_message() {
                Some(req) => ExchangeError::Unsent(Box::new(req), e.into_error()),
                None => ExchangeError::Failed(e.into_error()),
            })
        }
    };
    let held = conn.map(|conn| Held {
        conn,
        home: Arc::clone(home),
        server,
    });
    let (parts, inner) = resp.into_parts();
    let mut body = PooledBody::new(inner, held);
    if body.inner.is_end_stream() {
        // No body (HEAD, 204, 304, or a zero length): the connection is
        // free now, whether or not the caller ever polls the body.
        body.release();
    }
    Ok(Response::from_parts(parts, body))
}

/// Sends an upgrade request on a new connection driven by a task of its
/// own, so that the connection can switch protocols after the response.
pub(super) async fn exchange_upgrade(
    conn: Box<Conn>,
    req: Request<UpstreamBody>,
) -> Result<Response<PooledBody>, hyper::Error> {
    let Conn {
        mut sender, driver, ..
    } = *conn;
    tokio::spawn(async move {
        if let Err(e) = driver.with_upgrades().await {
            tracing::debug!(error = %e, "upgraded upstream connection ended");
        }
    });
    let resp = sender.send_request(req).await?;
    Ok(resp.map(|inner| PooledBody::new(inner, None)))
}

struct Held {
    conn: Box<Conn>,
    home: Arc<Connections>,
    server: usize,
}

/// A response body from a server. Reading it drives its connection, which
/// goes back to the idle list when the body ends; a body dropped before its
/// end closes the connection. A body that has not ended by its deadline
/// fails with a timeout.
pub struct PooledBody {
    inner: Incoming,
    held: Option<Held>,
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
        f.debug_struct("PooledBody")
            .field("pooled", &self.held.is_some())
            .finish_non_exhaustive()
    }
}

impl PooledBody {
    fn new(inner: Incoming, held: Option<Held>) -> Self {
        Self {
            inner,
            held,
            end_by: None,
            timer: None,
            load: None,
        }
    }

    /// Counts the exchange in its server's load for as long as the body
    /// lasts.
    pub(super) fn hold_load(&mut self, guard: super::balance::InFlightGuard) {
        self.load = Some(guard);
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

    fn release(&mut self) {
        self.load = None;
        if let Some(h) = self.held.take() {
            h.home.checkin(h.server, h.conn);
        }
    }

    fn settle(
        &mut self,
        polled: Poll<Option<Result<Frame<Bytes>, hyper::Error>>>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &polled {
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.release(),
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Err(_))) => self.held = None,
            Poll::Pending => {
                if let Some(deadline) = self.end_by {
                    let timer = self
                        .timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                    if timer.as_mut().poll(cx).is_ready() {
                        self.held = None;
                        self.end_by = None;
                        let late = std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "the response body ran past the total time limit",
                        );
                        return Poll::Ready(Some(Err(Box::new(late))));
                    }
                }
            }
            _ => {}
        }
        polled.map_err(Into::into)
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
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if polled.is_ready() {
            return this.settle(polled, cx);
        }
        // Nothing buffered: let the connection read more, then look again.
        if let Some(h) = this.held.as_mut() {
            if Pin::new(&mut h.conn.driver).poll(cx).is_ready() {
                this.held = None;
            }
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        this.settle(polled, cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
