//! The log phase: one access log line per request (target
//! `portico::access`), and the request duration metric, written once the
//! response body has been sent to its end or given up on.
//!
//! The response body is wrapped in a [`LoggedBody`] that counts the data
//! bytes it hands to the connection and writes the line when it is dropped:
//! after its last frame, or when the connection gave up on it (the client
//! went away, a write failed or timed out, the origin broke off). The line
//! then says how many bytes went out, how long the request took to that
//! moment, and whether the body was sent whole (`complete`).

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Method, StatusCode};
use hyper::body::{Body, Frame, SizeHint};

use super::{Generation, Log};
use crate::proxy::body::{BoxError, ResponseBody, Sliced, H2_PIECE};

/// What the access log line says besides the body's bytes and end, gathered
/// by the time the response head is ready.
pub(super) struct Access {
    pub(super) started: Instant,
    pub(super) gen: Arc<Generation>,
    pub(super) client: IpAddr,
    /// The request head (or what an upgrade left of it).
    pub(super) head: http::request::Parts,
    pub(super) status: StatusCode,
    pub(super) log: Log,
    pub(super) duration: metrics::Histogram,
}

/// A response body that writes the access log line when it is dropped.
pub(super) struct LoggedBody {
    inner: ResponseBody,
    /// On HTTP/2, the data cut as the listener hands it out, so that what
    /// is counted sent was taken by the connection.
    pieces: Sliced,
    /// Data bytes handed to the connection so far.
    sent: u64,
    /// The body said it had no more frames.
    ended: bool,
    /// The body failed (the origin broke off, a cache read failed).
    failed: bool,
    access: Access,
}

impl LoggedBody {
    pub(super) fn new(inner: ResponseBody, access: Access) -> Self {
        let piece = (access.head.version == http::Version::HTTP_2).then_some(H2_PIECE);
        Self {
            inner,
            pieces: Sliced::new(piece),
            sent: 0,
            ended: false,
            failed: false,
            access,
        }
    }

    /// Whether the client got the whole body: it ended, or has nothing left
    /// (a server need not poll a body that says so), or the response has
    /// none to send (HEAD, 1xx, 204, 304: the connection does not poll it).
    fn complete(&self) -> bool {
        let status = self.access.status;
        !self.failed
            && (self.ended
                || (self.pieces.is_empty() && self.inner.is_end_stream())
                || self.access.head.method == Method::HEAD
                || status.is_informational()
                || status == StatusCode::NO_CONTENT
                || status == StatusCode::NOT_MODIFIED)
    }
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = match this.pieces.next_piece() {
            Some(piece) => Poll::Ready(Some(Ok(Frame::data(piece)))),
            None => match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => Poll::Ready(Some(Ok(Frame::data(this.pieces.cut(data))))),
                    Err(frame) => Poll::Ready(Some(Ok(frame))),
                },
                other => other,
            },
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.sent += data.len() as u64;
                }
            }
            Poll::Ready(Some(Err(_))) => this.failed = true,
            Poll::Ready(None) => this.ended = true,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.pieces.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.pieces.hint(self.inner.size_hint())
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        let complete = self.complete();
        let a = &self.access;
        let elapsed = a.started.elapsed();
        a.duration.record(elapsed.as_secs_f64());
        let model = &a.gen.policy.model;
        let head = &a.head;
        tracing::info!(
            target: "portico::access",
            client = %a.client,
            method = %head.method,
            host = %head
                .uri
                .host()
                .or_else(|| head.headers.get(header::HOST).and_then(|h| h.to_str().ok()))
                .unwrap_or("-"),
            path = %head.uri.path(),
            status = a.status.as_u16(),
            bytes = self.sent,
            complete,
            duration_us = elapsed.as_micros() as u64,
            upstream_us = a.log.upstream.map(|d| d.as_micros() as u64),
            rule = %a.log.rule.map_or("-", |i| model.rules[i].name.as_str()),
            backend = %a.log.backend.map_or("-", |i| model.backends[i].name.as_str()),
            cache = a.log.cache,
        );
    }
}

/// Logs a request that the listener answered itself (a declared body over
/// every rule's limit, a refused transfer coding) before any rule saw it:
/// the same line as any other, with no rule or backend and `cache=refused`,
/// and the same request metrics.
pub(crate) fn log_refused<B>(
    client: IpAddr,
    req: &http::Request<B>,
    status: StatusCode,
    bytes: Option<u64>,
    started: Instant,
) {
    let host = req
        .uri()
        .host()
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or("-");
    let line = Refused {
        method: req.method().as_str(),
        host,
        path: req.uri().path(),
        bytes: bytes.unwrap_or(0),
        elapsed: started.elapsed(),
    };
    line.log(client, status);
}

/// Logs a request head that could not be taken at all (400 for one that
/// does not parse, 431 for one over the size or field limits, 414 for a
/// target too long), answered by the HTTP/1 server before anything of it
/// was known: method, host and path are `-`, and so is its duration (0),
/// since no start was seen.
pub(crate) fn log_unparsed(client: IpAddr, status: StatusCode) {
    let line = Refused {
        method: "-",
        host: "-",
        path: "-",
        bytes: 0,
        elapsed: Duration::ZERO,
    };
    line.log(client, status);
}

/// An access log line for a request no rule saw.
struct Refused<'a> {
    method: &'a str,
    host: &'a str,
    path: &'a str,
    bytes: u64,
    elapsed: Duration,
}

impl Refused<'_> {
    fn log(&self, client: IpAddr, status: StatusCode) {
        let class = match status.as_u16() / 100 {
            1 => "1xx",
            2 => "2xx",
            3 => "3xx",
            4 => "4xx",
            _ => "5xx",
        };
        metrics::counter!("portico_requests_total", "status" => class).increment(1);
        metrics::histogram!("portico_request_duration_seconds").record(self.elapsed.as_secs_f64());
        tracing::info!(
            target: "portico::access",
            client = %client,
            method = %self.method,
            host = %self.host,
            path = %self.path,
            status = status.as_u16(),
            bytes = self.bytes,
            complete = true,
            duration_us = self.elapsed.as_micros() as u64,
            upstream_us = None::<u64>,
            rule = %"-",
            backend = %"-",
            cache = "refused",
        );
    }
}
