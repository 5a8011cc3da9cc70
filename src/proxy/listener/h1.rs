//! Portico's own HTTP/1.1 server loop, for the requests nearly every client
//! sends: a head with no body, on HTTP/1.0 or 1.1, asking for no upgrade
//! and expecting nothing.
//!
//! It exists for speed. hyper's server spends about a third of the
//! instructions of a pass-through request on parsing, its dispatcher and
//! encoding (callgrind, `benches/passthrough/callgrind.sh`); this loop
//! parses with httparse into uninitialised slots, makes field values slices
//! of the read buffer, writes the response head into a reused buffer and
//! the body beside it with vectored writes (no copy of a body), and keeps
//! one lazily re-armed timer per connection rather than one per request.
//!
//! Everything else goes to hyper, which has always answered it: a request
//! with a body, Transfer-Encoding, an upgrade, `Expect`, CONNECT, a head
//! that does not parse (400), one that is too large or has too many fields
//! (431), a target hyper would refuse, and HTTP/2's preface. The connection
//! is handed over with the bytes read so far ([`Rewind`]) and stays with
//! hyper for the rest of its life, so nothing is parsed twice but the one
//! head that did not fit here. A request line that alone is over the
//! head's size limit is the exception: its target is too long, and this
//! loop answers 414 itself (hyper would say 431) and closes.
//!
//! What the loop does is what hyper did for the same requests: keep-alive
//! by RFC 9112 §9.3 (HTTP/1.0 only with `keep-alive`, which the response
//! then says too), pipelined requests answered in order, the response
//! framed by its body (Content-Length when its length is known,
//! chunked for HTTP/1.1 otherwise, until close for HTTP/1.0), no body for
//! HEAD, 204 and 304, a `Date` field when the response has none, a client
//! that closes while its request is being handled cancels the handler, and
//! `Connection: close` once shutdown has begun. A client that takes none of
//! a response for `send_timeout` loses its connection.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::{pin, Pin};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{
    AUTHORIZATION, CACHE_CONTROL, CONNECTION, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_RANGE,
    CONTENT_TYPE, DATE, HOST, MAX_FORWARDS, SET_COOKIE, TE, TRAILER, TRANSFER_ENCODING,
};
use http::response::Parts;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri, Version};
use hyper::body::{Body, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tracing::debug;

use super::{respond, ConnInfo, Handler, Shared, SideWake};
use crate::proxy::body::{RequestBody, ResponseBody};
use crate::proxy::errors::ProxyError;
use crate::proxy::phases::log_unparsed;
use crate::upstream::{parsed_value, FieldNames};

/// Most fields a request head may carry here; a head with more (or a
/// listener allowing more) goes to hyper.
const MAX_FIELDS: usize = 128;
/// Initial read buffer; a head rarely needs more.
const READ_BUF: usize = 8 * 1024;
/// Most bytes queued for the client before the body is read further.
const HIGH_WATER: usize = 256 * 1024;
/// Most buffers handed to one vectored write.
const MAX_SLICES: usize = 32;
/// What is read and dropped of a refused request before its connection
/// closes, at most, and for how long.
const DRAIN_MAX: usize = 1 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(1);

/// A request head taken from the read buffer, and what its framing says.
#[derive(Debug)]
pub(super) struct Head {
    pub(super) request: Request<()>,
    /// Whether the client wants the connection kept open (RFC 9112 §9.3).
    pub(super) keep_alive: bool,
    /// Whether the client accepts trailer fields (`TE: trailers`).
    pub(super) trailers: bool,
}

/// What the start of the read buffer holds.
// Returned by value once a request; boxing the head would cost an
// allocation each time.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(super) enum Parsed {
    /// Not yet a whole head.
    Partial,
    /// A head this loop answers, taken from the buffer.
    Head(Head),
    /// Something for hyper; the buffer is as it was.
    HandOff,
    /// A request line that alone is over the head's size limit: its target
    /// is too long (414, RFC 9112 §3). The buffer is as it was.
    TargetTooLong,
}

/// Parses the request head at the start of `buf`. A head that is whole and
/// within bounds and asks for nothing this loop leaves to hyper is taken
/// from the buffer; anything else leaves the buffer untouched.
pub(super) fn parse_head(
    buf: &mut BytesMut,
    max_fields: usize,
    max_bytes: usize,
    names: &mut FieldNames,
) -> Parsed {
    if buf.is_empty() {
        return Parsed::Partial;
    }
    // Where each field's name and value lie in the head, as offsets, so the
    // values can be sliced out once the head is frozen. Left uninitialised
    // like httparse's slots: only the first `count` are written and read.
    let mut spans = [const { MaybeUninit::<[u32; 4]>::uninit() }; MAX_FIELDS];
    let (len, method, path, version, count, keep_alive, trailers) = {
        let mut fields = [const { MaybeUninit::uninit() }; MAX_FIELDS];
        let mut req = httparse::Request::new(&mut []);
        let slots = &mut fields[..max_fields.min(MAX_FIELDS)];
        let len = match httparse::ParserConfig::default()
            .parse_request_with_uninit_headers(&mut req, buf, slots)
        {
            Ok(httparse::Status::Complete(len)) if len <= max_bytes => len,
            Ok(httparse::Status::Partial) if buf.len() < max_bytes => return Parsed::Partial,
            // Over the limit (the arms above took every head within it)
            // before the request line has even ended.
            Ok(_) if !buf[..max_bytes.min(buf.len())].contains(&b'\n') => {
                return Parsed::TargetTooLong
            }
            _ => return Parsed::HandOff,
        };
        let (Some(method), Some(path), Some(minor)) = (req.method, req.path, req.version) else {
            return Parsed::HandOff;
        };
        if method == "CONNECT" || path.len() > u16::MAX as usize - 1 {
            return Parsed::HandOff;
        }
        let version = if minor == 1 {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        };
        let mut close = false;
        let mut keep = false;
        let mut trailers = false;
        let base = buf.as_ptr() as usize;
        for (span, field) in spans.iter_mut().zip(req.headers.iter()) {
            let name = field.name.as_bytes();
            let value = field.value;
            match name.len() {
                // A body, or a framing this loop does not read.
                14 if name.eq_ignore_ascii_case(b"content-length") && value != b"0" => {
                    return Parsed::HandOff
                }
                17 if name.eq_ignore_ascii_case(b"transfer-encoding") => return Parsed::HandOff,
                7 if name.eq_ignore_ascii_case(b"upgrade") => return Parsed::HandOff,
                6 if name.eq_ignore_ascii_case(b"expect") => return Parsed::HandOff,
                10 if name.eq_ignore_ascii_case(b"connection") => {
                    for token in value.split(|&b| b == b',') {
                        let token = token.trim_ascii();
                        close |= token.eq_ignore_ascii_case(b"close");
                        keep |= token.eq_ignore_ascii_case(b"keep-alive");
                    }
                }
                2 if name.eq_ignore_ascii_case(b"te") => {
                    trailers |= value.split(|&b| b == b',').any(|t| {
                        let t = t.split(|&b| b == b';').next().unwrap_or_default();
                        t.trim_ascii().eq_ignore_ascii_case(b"trailers")
                    });
                }
                _ => {}
            }
            // Offsets within a head of at most 64 KiB and change fit in u32.
            span.write([
                (name.as_ptr() as usize - base) as u32,
                name.len() as u32,
                (value.as_ptr() as usize - base) as u32,
                value.len() as u32,
            ]);
        }
        let Ok(method) = Method::from_bytes(method.as_bytes()) else {
            return Parsed::HandOff;
        };
        let path = [(path.as_ptr() as usize - base) as u32, path.len() as u32];
        let keep_alive = if version == Version::HTTP_11 {
            !close
        } else {
            keep && !close
        };
        (
            len,
            method,
            path,
            version,
            req.headers.len(),
            keep_alive,
            trailers,
        )
    };
    let head = buf.split_to(len).freeze();
    let Ok(uri) =
        Uri::from_maybe_shared(head.slice(path[0] as usize..(path[0] + path[1]) as usize))
    else {
        restore(buf, head);
        return Parsed::HandOff;
    };
    let mut fields = HeaderMap::with_capacity(count);
    for (at, span) in spans[..count].iter().enumerate() {
        // SAFETY: the loop above wrote the first `count` spans.
        let [name_at, name_len, value_at, value_len] = unsafe { span.assume_init() };
        let name = &head[name_at as usize..(name_at + name_len) as usize];
        let value = head.slice(value_at as usize..(value_at + value_len) as usize);
        let Some(name) = names.name(at, name) else {
            // A head that is hyper's after all goes to it whole.
            drop(fields);
            restore(buf, head);
            return Parsed::HandOff;
        };
        fields.append(name, parsed_value(value));
    }
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = fields;
    Parsed::Head(Head {
        request,
        keep_alive,
        trailers,
    })
}

/// Puts a taken head back in front of the rest of the buffer (rare: only
/// for a head that turned out to be hyper's after all).
fn restore(buf: &mut BytesMut, head: Bytes) {
    let mut whole = BytesMut::with_capacity(head.len() + buf.len());
    whole.extend_from_slice(&head);
    whole.extend_from_slice(buf);
    *buf = whole;
}

/// How a response body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    /// No body is sent (HEAD, 1xx, 204, 304).
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked (HTTP/1.1).
    Chunked,
    /// Until the connection closes (HTTP/1.0 without a known length).
    Close,
}

/// What the request said that shapes its response.
#[derive(Debug, Clone, Copy)]
pub(super) struct Asked {
    pub(super) version: Version,
    pub(super) head: bool,
    pub(super) keep_alive: bool,
    /// Whether trailer fields may be sent (`TE: trailers`).
    pub(super) trailers: bool,
}

/// Appends the response head to `out` and says how the body is framed and
/// whether the connection stays open after it. `closing` forces it closed
/// (shutdown has begun). The body's exact size, when known, frames it;
/// otherwise a valid Content-Length from the handler does; otherwise it is
/// chunked (HTTP/1.1) or runs until close (HTTP/1.0).
pub(super) fn encode_head(
    out: &mut BytesMut,
    parts: &Parts,
    size: &SizeHint,
    asked: Asked,
    closing: bool,
) -> (Framing, bool) {
    let status = parts.status;
    let fields = &parts.headers;
    out.reserve(96 + fields.len() * 64);
    // The server's own version, whatever the client's (RFC 9110 §2.5): an
    // HTTP/1.0 client is told what it may use, its framing stays 1.0's.
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    // One pass writes the fields and notes what decides the framing.
    let mut has_date = false;
    let mut says_close = false;
    let mut has_trailer = false;
    let mut has_connection = false;
    let mut lengths = 0;
    let mut declared: Option<&HeaderValue> = None;
    for (name, value) in fields {
        match *name {
            // Framing is this function's to write.
            CONTENT_LENGTH => {
                lengths += 1;
                declared = Some(value);
                continue;
            }
            TRANSFER_ENCODING => continue,
            // Written only with a chunked body, below.
            TRAILER => {
                has_trailer = true;
                continue;
            }
            DATE => has_date = true,
            // Written below with the connection's fate.
            CONNECTION => {
                says_close |= value
                    .as_bytes()
                    .split(|&b| b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
                has_connection = true;
                continue;
            }
            _ => {}
        }
        put_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    // Only one valid Content-Length counts, and only when the body's own
    // size is not known (it seldom is not): read it then.
    let declared = || {
        let v = declared.filter(|_| lengths == 1)?.as_bytes();
        let digits = (1..=19).contains(&v.len()) && v.iter().all(u8::is_ascii_digit);
        digits.then(|| v.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0')))
    };
    let no_body = asked.head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = if no_body {
        Framing::None
    } else if let Some(n) = size.exact() {
        Framing::Length(n)
    } else if let Some(n) = declared() {
        Framing::Length(n)
    } else if asked.version == Version::HTTP_11 {
        Framing::Chunked
    } else {
        Framing::Close
    };
    let keep_alive = asked.keep_alive
        && !closing
        && !says_close
        && framing != Framing::Close
        && !status.is_informational();
    match framing {
        Framing::Length(n) => put_length(out, n),
        Framing::Chunked => {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
            if has_trailer {
                for value in fields.get_all(TRAILER) {
                    put_field(out, b"trailer", value.as_bytes());
                }
            }
        }
        // HEAD keeps the length a GET would have had.
        Framing::None if asked.head => {
            if let Some(n) = declared().or(size.exact().filter(|&n| n > 0)) {
                put_length(out, n);
            }
        }
        Framing::None | Framing::Close => {}
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    } else {
        if has_connection {
            for value in fields.get_all(CONNECTION) {
                put_field(out, b"connection", value.as_bytes());
            }
        }
        if asked.version == Version::HTTP_10 {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
    }
    if !has_date {
        out.extend_from_slice(b"date: ");
        put_date(out);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    (framing, keep_alive)
}

fn put_field(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn put_length(out: &mut BytesMut, n: u64) {
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    out.extend_from_slice(b"\r\n");
}

thread_local! {
    /// The current second and its IMF-fixdate, formatted once a second.
    static DATE_NOW: std::cell::RefCell<(u64, String)> = const {
        std::cell::RefCell::new((u64::MAX, String::new()))
    };
}

fn put_date(out: &mut BytesMut) {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE_NOW.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != secs {
            *cached = (secs, crate::upstream::static_files::http_date(secs));
        }
        out.extend_from_slice(cached.1.as_bytes());
    });
}

/// What is queued for the client: buffers written in order with vectored
/// writes. Heads and chunk lines are written into `scratch` and split off;
/// body data is queued as it came, never copied.
struct Out {
    queue: VecDeque<Bytes>,
    scratch: BytesMut,
    queued: usize,
}

impl Out {
    fn new() -> Self {
        Self {
            queue: VecDeque::with_capacity(8),
            scratch: BytesMut::with_capacity(1024),
            queued: 0,
        }
    }

    fn push(&mut self, bytes: Bytes) {
        if !bytes.is_empty() {
            self.queued += bytes.len();
            self.queue.push_back(bytes);
        }
    }

    /// Queues what was written into `scratch`.
    fn push_scratch(&mut self) {
        let bytes = self.scratch.split().freeze();
        self.push(bytes);
    }

    /// Writes until the queue is empty; Pending when the socket is full.
    fn poll_write<IO: AsyncWrite + Unpin>(
        &mut self,
        io: &mut IO,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        while !self.queue.is_empty() {
            let n = if io.is_write_vectored() && self.queue.len() > 1 {
                let mut slices = [IoSlice::new(&[]); MAX_SLICES];
                let count = self.queue.len().min(MAX_SLICES);
                for (slice, bytes) in slices.iter_mut().zip(&self.queue) {
                    *slice = IoSlice::new(bytes);
                }
                ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices[..count]))?
            } else {
                ready!(Pin::new(&mut *io).poll_write(cx, &self.queue[0]))?
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.advance(n);
        }
        Poll::Ready(Ok(()))
    }

    fn advance(&mut self, mut n: usize) {
        self.queued -= n;
        while n > 0 {
            let front = self.queue.front_mut().expect("written bytes were queued");
            if n < front.len() {
                front.advance(n);
                return;
            }
            n -= front.len();
            self.queue.pop_front();
        }
    }
}

const CRLF: Bytes = Bytes::from_static(b"\r\n");

/// Why a response could not be sent whole; the connection is closed.
#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error("writing to the client failed: {0}")]
    Io(#[from] io::Error),
    #[error("the response body failed: {0}")]
    Body(crate::proxy::body::BoxError),
    #[error("the response body is not as long as its Content-Length")]
    Length,
    #[error("the client took nothing for {0:?}")]
    TimedOut(Duration),
    #[error("the client closed the connection")]
    ClientGone,
}

/// The connection's timer, lent to [`send_body`] for the send timeout.
///
/// Nothing is timed while writes go through: the clock is read when a
/// write blocks for the first time or after it wrote something, and the
/// timer is moved only when it is armed for later than that (it is armed
/// for the earliest moment the connection could be due, and looked at
/// again when it fires).
struct SendTimer<'a> {
    timer: Pin<&'a mut tokio::time::Sleep>,
    armed: &'a mut Instant,
    side: &'a SideWake,
    side_waker: &'a Waker,
    timeout: Duration,
    /// While a write is blocked: when the client is out of time.
    due: Option<Instant>,
    /// Whether the side wake flag was taken here (it is given back).
    looked: bool,
}

impl<'a> SendTimer<'a> {
    fn new(
        timer: Pin<&'a mut tokio::time::Sleep>,
        armed: &'a mut Instant,
        side: &'a SideWake,
        side_waker: &'a Waker,
        timeout: Duration,
    ) -> Self {
        SendTimer {
            timer,
            armed,
            side,
            side_waker,
            timeout,
            due: None,
            looked: false,
        }
    }

    /// A write (or flush) is blocked, after writing something when
    /// `progressed`. Pending, or an error once the client has taken
    /// nothing for the timeout.
    fn blocked(&mut self, progressed: bool, cx: &Context<'_>) -> Poll<Result<(), SendError>> {
        if progressed || self.due.is_none() {
            let due = Instant::now() + self.timeout;
            self.due = Some(due);
            if *self.armed > due {
                self.timer.as_mut().reset(due.into());
                *self.armed = due;
                self.side.woken.store(true, Ordering::Release);
            }
        }
        self.side.task.register(cx.waker());
        if self.side.woken.swap(false, Ordering::AcqRel) {
            self.looked = true;
            let mut side_cx = Context::from_waker(self.side_waker);
            while self.timer.as_mut().poll(&mut side_cx).is_ready() {
                let due = self.due.expect("set above");
                if Instant::now() >= due {
                    return Poll::Ready(Err(SendError::TimedOut(self.timeout)));
                }
                self.timer.as_mut().reset(due.into());
                *self.armed = due;
            }
        }
        Poll::Pending
    }

    /// Everything queued was written: the client is taking what it is sent.
    fn unblocked(&mut self) {
        self.due = None;
    }
}

impl Drop for SendTimer<'_> {
    fn drop(&mut self) {
        // What woke the side (a fired timer, shutdown) is for the receive
        // loop to look at too.
        if self.looked {
            self.side.woken.store(true, Ordering::Release);
        }
    }
}

/// Sends the queued head and the body framed by `framing`, reading the body
/// while the socket takes what is queued. A client that takes nothing for
/// `send.timeout` fails it with [`SendError::TimedOut`].
/// While the body keeps it waiting, a read notices a client that went away
/// (and the body, with whatever upstream it holds, is dropped): as while
/// the request is handled, only when nothing else was read after the head.
async fn send_body<IO: AsyncRead + AsyncWrite + Unpin>(
    io: &mut IO,
    out: &mut Out,
    body: ResponseBody,
    framing: Framing,
    trailers_allowed: Option<&HeaderValue>,
    mut send: SendTimer<'_>,
    read: &mut BytesMut,
) -> Result<(), SendError> {
    let mut watching = read.is_empty();
    let mut body = pin!(body);
    let mut left = match framing {
        Framing::Length(n) => n,
        _ => 0,
    };
    let mut done = framing == Framing::None;
    poll_fn(|cx| loop {
        if !done && out.queued < HIGH_WATER {
            match body.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    match frame.into_data() {
                        Ok(data) => match framing {
                            Framing::Length(_) => {
                                let n = data.len() as u64;
                                if n > left {
                                    return Poll::Ready(Err(SendError::Length));
                                }
                                left -= n;
                                out.push(data);
                            }
                            Framing::Chunked if !data.is_empty() => {
                                out.scratch
                                    .extend_from_slice(hex_len(data.len()).as_bytes());
                                out.scratch.extend_from_slice(b"\r\n");
                                out.push_scratch();
                                out.push(data);
                                out.push(CRLF);
                            }
                            Framing::Chunked | Framing::None => {}
                            Framing::Close => out.push(data),
                        },
                        Err(frame) => {
                            if let (Framing::Chunked, Ok(fields)) = (framing, frame.into_trailers())
                            {
                                out.scratch.extend_from_slice(b"0\r\n");
                                put_trailers(&mut out.scratch, &fields, trailers_allowed);
                                out.scratch.extend_from_slice(b"\r\n");
                                out.push_scratch();
                                done = true;
                            }
                        }
                    }
                    continue;
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(SendError::Body(e))),
                Poll::Ready(None) => {
                    match framing {
                        Framing::Length(_) if left > 0 => {
                            return Poll::Ready(Err(SendError::Length))
                        }
                        Framing::Chunked => {
                            out.scratch.extend_from_slice(b"0\r\n\r\n");
                            out.push_scratch();
                        }
                        _ => {}
                    }
                    done = true;
                    continue;
                }
                Poll::Pending => {}
            }
        }
        if out.queue.is_empty() {
            // TLS may hold what was written: a flush can block too.
            let Poll::Ready(flushed) = Pin::new(&mut *io).poll_flush(cx) else {
                return send.blocked(false, cx);
            };
            flushed?;
            send.unblocked();
            if done {
                return Poll::Ready(Ok(()));
            }
            // Waiting for the body.
            if watching {
                match poll_read_buf(io, read, cx) {
                    Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(Err(SendError::ClientGone)),
                    // The next request, pipelined: kept for later.
                    Poll::Ready(Ok(_)) => watching = false,
                    Poll::Pending => {}
                }
            }
            return Poll::Pending;
        }
        let before = out.queued;
        match out.poll_write(io, cx) {
            Poll::Ready(written) => {
                written?;
                send.unblocked();
            }
            Poll::Pending => return send.blocked(out.queued < before, cx),
        }
    })
    .await
}

/// A chunk size in hexadecimal, without an allocation.
fn hex_len(n: usize) -> HexLen {
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        digits[at] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    HexLen { digits, at }
}

struct HexLen {
    digits: [u8; 16],
    at: usize,
}

impl HexLen {
    fn as_bytes(&self) -> &[u8] {
        &self.digits[self.at..]
    }
}

/// Writes the trailer fields the response's Trailer field announced.
fn put_trailers(out: &mut BytesMut, fields: &HeaderMap, allowed: Option<&HeaderValue>) {
    let Some(allowed) = allowed else {
        return;
    };
    for (name, value) in fields {
        // Fields that frame, route or authorise a message never come as
        // trailers (RFC 9110 §6.5.1), whatever was announced.
        if matches!(
            *name,
            AUTHORIZATION
                | CACHE_CONTROL
                | CONTENT_ENCODING
                | CONTENT_LENGTH
                | CONTENT_RANGE
                | CONTENT_TYPE
                | HOST
                | MAX_FORWARDS
                | SET_COOKIE
                | TRAILER
                | TRANSFER_ENCODING
                | TE
        ) {
            continue;
        }
        let announced = allowed.as_bytes().split(|&b| b == b',').any(|t| {
            t.trim_ascii()
                .eq_ignore_ascii_case(name.as_str().as_bytes())
        });
        if announced {
            put_field(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
}

/// Reads what the client has sent into `buf`.
fn poll_read_buf<IO: AsyncRead + Unpin>(
    io: &mut IO,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < READ_BUF / 4 {
        buf.reserve(READ_BUF);
    }
    let spare = buf.spare_capacity_mut();
    let mut read = ReadBuf::uninit(spare);
    ready!(Pin::new(io).poll_read(cx, &mut read))?;
    let n = read.filled().len();
    // SAFETY: `poll_read` initialised the first `n` bytes of the spare
    // capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Poll::Ready(Ok(n))
}

/// Whether `bytes` hold the empty line that ends a head (CRLF CRLF, or the
/// bare LF LF that parsers accept).
fn ends_head(bytes: &[u8]) -> bool {
    let mut from = 0;
    while let Some(at) = bytes[from..].iter().position(|&b| b == b'\n') {
        let next = from + at + 1;
        match bytes.get(next..next + 2) {
            Some([b'\n', _]) | Some([b'\r', b'\n']) => return true,
            _ if bytes.get(next) == Some(&b'\n') => return true,
            _ => from = next,
        }
    }
    false
}

/// Serves requests on `io` until the connection ends (None) or a request
/// needs hyper: then the bytes read and not yet answered are returned, with
/// whether any request was served here, and the caller hands them and `io`
/// to hyper.
pub(super) async fn serve<IO, H>(
    io: &mut IO,
    shared: &Shared<H>,
    info: &Arc<ConnInfo>,
    opened: Instant,
) -> Option<(Bytes, bool)>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    H: Handler,
{
    let limits = &shared.limits;
    let client_addr = info.client_addr;
    let max_bytes = limits.max_header_bytes.max(READ_BUF);
    let mut read = BytesMut::with_capacity(READ_BUF);
    let mut names = FieldNames::default();
    let mut out = Out::new();
    // The first request, like the TLS handshake before it, must arrive
    // within the header timeout of the connection's opening.
    let mut due = opened + limits.header_read_timeout;
    // Whether the wait is for the first byte of a kept-alive connection's
    // next request, which may take up to the idle timeout; from that byte
    // on, the rest of the head has the header timeout (slowloris).
    let mut idle = false;
    let mut timer = pin!(tokio::time::sleep_until(due.into()));
    let mut armed = due;
    let mut stop = pin!(shared.shutdown.triggered());
    let mut stopping = false;
    // The timer and the shutdown signal wake the task through a waker of
    // their own, so they are polled only when one of them fired.
    let side = Arc::new(SideWake::default());
    let side_waker = Waker::from(Arc::clone(&side));
    let mut served = false;
    loop {
        // ---- receive
        if armed > due {
            // Sooner than the timer is set for (a keep-alive wait shorter
            // than the first one): move it, and have it polled.
            timer.as_mut().reset(due.into());
            armed = due;
            side.woken.store(true, Ordering::Release);
        }
        // How much of the buffer is known to hold no end of a head: a head
        // arriving in many small reads is parsed again only once its end
        // may have come, not on every read.
        let mut checked: usize = 0;
        let head = loop {
            let may_end = checked == 0
                || read.len() >= max_bytes
                || ends_head(&read[checked.saturating_sub(3)..]);
            if may_end {
                match parse_head(&mut read, limits.max_headers, max_bytes, &mut names) {
                    Parsed::Head(head) => break Some(head),
                    Parsed::HandOff => return Some((read.freeze(), served)),
                    Parsed::TargetTooLong => break None,
                    Parsed::Partial => {}
                }
            }
            checked = read.len();
            let got = poll_fn(|cx| {
                if let Poll::Ready(r) = poll_read_buf(io, &mut read, cx) {
                    return Poll::Ready(Some(r));
                }
                side.task.register(cx.waker());
                if !side.woken.swap(false, Ordering::AcqRel) {
                    return Poll::Pending;
                }
                let mut side_cx = Context::from_waker(&side_waker);
                if stopping || stop.as_mut().poll(&mut side_cx).is_ready() {
                    stopping = true;
                    return Poll::Ready(None);
                }
                // The timer is armed for the earliest moment the
                // connection could be due, and moved on when it was not.
                while timer.as_mut().poll(&mut side_cx).is_ready() {
                    if Instant::now() >= due {
                        debug!(%client_addr, "closing idle connection");
                        return Poll::Ready(None);
                    }
                    timer.as_mut().reset(due.into());
                    armed = due;
                }
                Poll::Pending
            })
            .await;
            match got {
                Some(Ok(n)) if n > 0 => {}
                // End of the connection, an error, shutdown or time up:
                // whatever was read of a head is dropped.
                _ => return None,
            }
            if idle {
                idle = false;
                due = Instant::now() + limits.header_read_timeout;
                if armed > due {
                    timer.as_mut().reset(due.into());
                    armed = due;
                    side.woken.store(true, Ordering::Release);
                }
            }
        };

        // ---- handle
        let (asked, response, refused) = match head {
            // Refused before it was taken: answered, logged, and the
            // connection closed, as what follows is not a head.
            None => {
                log_unparsed(client_addr.ip(), StatusCode::URI_TOO_LONG);
                let asked = Asked {
                    version: Version::HTTP_11,
                    head: false,
                    keep_alive: false,
                    trailers: false,
                };
                (
                    asked,
                    shared.errors.respond(&ProxyError::UriTooLong, None),
                    true,
                )
            }
            Some(head) => {
                let asked = Asked {
                    version: head.request.version(),
                    head: head.request.method() == Method::HEAD,
                    keep_alive: head.keep_alive,
                    trailers: head.trailers,
                };
                let request = head
                    .request
                    .map(|()| RequestBody::empty(limits.max_body_bytes));
                let response = {
                    let mut handler = pin!(respond(shared, request, Arc::clone(info)));
                    // Like hyper: while nothing else has been read, a read notices
                    // a client that went away, and the handler is dropped.
                    let mut watching = read.is_empty();
                    poll_fn(|cx| {
                        if let Poll::Ready(response) = handler.as_mut().poll(cx) {
                            return Poll::Ready(Some(response));
                        }
                        if watching {
                            match poll_read_buf(io, &mut read, cx) {
                                Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(None),
                                Poll::Ready(Ok(_)) => watching = false,
                                Poll::Pending => {}
                            }
                        }
                        side.task.register(cx.waker());
                        // The flag stays set, so that a fired timer is looked at
                        // when the next head is awaited.
                        if !stopping && side.woken.load(Ordering::Acquire) {
                            let mut side_cx = Context::from_waker(&side_waker);
                            stopping = stop.as_mut().poll(&mut side_cx).is_ready();
                        }
                        Poll::Pending
                    })
                    .await
                };
                let Some(mut response) = response else {
                    debug!(%client_addr, "client closed while its request was handled");
                    return None;
                };
                served = true;
                if response.status().is_informational() {
                    // An interim status cannot be the answer (hyper too sends 500).
                    let e = ProxyError::Internal("an interim status as the final answer".into());
                    response = shared.errors.respond(&e, None);
                }
                (asked, response, false)
            }
        };

        // ---- deliver
        let (parts, body) = response.into_parts();
        let (framing, keep_alive) =
            encode_head(&mut out.scratch, &parts, &body.size_hint(), asked, stopping);
        out.push_scratch();
        // Trailer fields go only to a client that accepts them, and only
        // those the response announced.
        let trailers = parts.headers.get(TRAILER).filter(|_| asked.trailers);
        let send = SendTimer::new(
            timer.as_mut(),
            &mut armed,
            &side,
            &side_waker,
            limits.send_timeout,
        );
        if let Err(e) = send_body(io, &mut out, body, framing, trailers, send, &mut read).await {
            debug!(%client_addr, error = %e, "response not sent whole; closing");
            return None;
        }
        if !keep_alive {
            let _ = io.shutdown().await;
            if refused {
                // The rest of the line is still coming: closing with it
                // unread would reset the connection, and the client could
                // lose the answer. It is read and dropped, for a while.
                let drain = async {
                    let mut left = DRAIN_MAX;
                    while left > 0 {
                        read.clear();
                        match poll_fn(|cx| poll_read_buf(io, &mut read, cx)).await {
                            Ok(n) if n > 0 => left = left.saturating_sub(n),
                            _ => break,
                        }
                    }
                };
                let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
            }
            return None;
        }
        // A pipelined request already begun has the header timeout for
        // the rest of its head; otherwise the connection may sit idle.
        // Empty lines after a request are not the start of another
        // (RFC 9112 §2.2 has servers ignore them): they are dropped.
        if read.iter().all(|&b| b == b'\r' || b == b'\n') {
            read.clear();
        }
        idle = read.is_empty();
        due = Instant::now()
            + if idle {
                limits.idle_timeout
            } else {
                limits.header_read_timeout
            };
    }
}

/// An IO whose first reads return bytes already read from it.
pub(super) struct Rewind<IO> {
    prefix: Bytes,
    io: IO,
}

impl<IO> Rewind<IO> {
    pub(super) fn new(prefix: Bytes, io: IO) -> Self {
        Self { prefix, io }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Rewind<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Rewind<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (Parsed, BytesMut) {
        let mut buf = BytesMut::from(text);
        let parsed = parse_head(&mut buf, 100, 64 * 1024, &mut FieldNames::default());
        (parsed, buf)
    }

    #[test]
    fn a_plain_get_is_taken_and_what_follows_stays() {
        let (parsed, rest) =
            parse("GET /a?b=1 HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\nGET /next");
        let Parsed::Head(head) = parsed else {
            panic!("not taken: {parsed:?}");
        };
        assert_eq!(head.request.uri(), "/a?b=1");
        assert_eq!(head.request.headers()["host"], "x");
        assert_eq!(head.request.headers()["accept"], "*/*");
        assert!(head.keep_alive);
        assert_eq!(&rest[..], b"GET /next");
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection() {
        let keep = |text: &str| match parse(text).0 {
            Parsed::Head(head) => head.keep_alive,
            other => panic!("not taken: {other:?}"),
        };
        assert!(!keep("GET / HTTP/1.1\r\nConnection: Close\r\n\r\n"));
        assert!(!keep("GET / HTTP/1.0\r\n\r\n"));
        assert!(keep("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"));
        assert!(keep("GET / HTTP/1.1\r\nConnection: te, x\r\n\r\n"));
    }

    #[test]
    fn what_is_hyper_s_is_left_whole() {
        for text in [
            "POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "PUT / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "GET / HTTP/1.1\r\nbad name: x\r\n\r\n",
            "GET /a b HTTP/1.1\r\n\r\n",
        ] {
            let (parsed, rest) = parse(text);
            assert!(matches!(parsed, Parsed::HandOff), "{text:?}: {parsed:?}");
            assert_eq!(&rest[..], text.as_bytes(), "{text:?}");
        }
    }

    #[test]
    fn heads_over_the_limits_go_to_hyper_and_partial_ones_wait() {
        let mut buf = BytesMut::from("GET / HTTP/1.1\r\nHost: x\r\n");
        assert!(matches!(
            parse_head(&mut buf, 100, 8192, &mut FieldNames::default()),
            Parsed::Partial
        ));
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(9000));
        let mut buf = BytesMut::from(long.as_str());
        assert!(matches!(
            parse_head(&mut buf, 100, 8192, &mut FieldNames::default()),
            Parsed::HandOff
        ));
        let mut buf = BytesMut::from(&long.as_bytes()[..8500]);
        assert!(matches!(
            parse_head(&mut buf, 100, 8192, &mut FieldNames::default()),
            Parsed::HandOff
        ));
        // A request line longer than the limit, whole or not: 414.
        let target = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(9000));
        for end in [target.len(), 8500] {
            let mut buf = BytesMut::from(&target.as_bytes()[..end]);
            assert!(matches!(
                parse_head(&mut buf, 100, 8192, &mut FieldNames::default()),
                Parsed::TargetTooLong
            ));
            assert_eq!(buf.len(), end);
        }
        let many: String = (0..5).map(|i| format!("X-{i}: v\r\n")).collect();
        let text = format!("GET / HTTP/1.1\r\n{many}\r\n");
        let mut buf = BytesMut::from(text.as_str());
        assert!(matches!(
            parse_head(&mut buf, 4, 8192, &mut FieldNames::default()),
            Parsed::HandOff
        ));
        let mut buf = BytesMut::from(text.as_str());
        assert!(matches!(
            parse_head(&mut buf, 5, 8192, &mut FieldNames::default()),
            Parsed::Head(_)
        ));
    }

    fn head_of(
        parts: &Parts,
        size: SizeHint,
        asked: Asked,
        closing: bool,
    ) -> (String, Framing, bool) {
        let mut out = BytesMut::new();
        let (framing, keep) = encode_head(&mut out, parts, &size, asked, closing);
        (String::from_utf8(out.to_vec()).unwrap(), framing, keep)
    }

    fn parts(status: u16, fields: &[(&str, &str)]) -> Parts {
        let mut response = http::Response::builder().status(status);
        for (name, value) in fields {
            response = response.header(*name, *value);
        }
        response.body(()).unwrap().into_parts().0
    }

    const GET11: Asked = Asked {
        version: Version::HTTP_11,
        head: false,
        keep_alive: true,
        trailers: false,
    };

    #[test]
    fn responses_are_framed_by_their_body() {
        let (text, framing, keep) = head_of(
            &parts(200, &[("content-length", "99"), ("x-a", "1")]),
            SizeHint::with_exact(5),
            GET11,
            false,
        );
        assert_eq!(framing, Framing::Length(5));
        assert!(keep);
        assert!(
            text.starts_with("HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 5\r\ndate: "),
            "{text}"
        );
        assert!(text.ends_with(" GMT\r\n\r\n"), "{text}");

        let (text, framing, _) = head_of(&parts(200, &[]), SizeHint::new(), GET11, false);
        assert_eq!(framing, Framing::Chunked);
        assert!(text.contains("transfer-encoding: chunked\r\n"), "{text}");

        let (_, framing, _) = head_of(
            &parts(200, &[("content-length", "7")]),
            SizeHint::new(),
            GET11,
            false,
        );
        assert_eq!(framing, Framing::Length(7));

        let old = Asked {
            version: Version::HTTP_10,
            ..GET11
        };
        let (text, framing, keep) = head_of(&parts(200, &[]), SizeHint::new(), old, false);
        assert_eq!(framing, Framing::Close);
        assert!(!keep);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("connection: close\r\n"), "{text}");
        let (text, _, keep) = head_of(&parts(200, &[]), SizeHint::with_exact(1), old, false);
        assert!(keep);
        assert!(text.contains("connection: keep-alive\r\n"), "{text}");
    }

    #[test]
    fn head_204_and_304_have_no_body() {
        let head = Asked {
            head: true,
            ..GET11
        };
        let (text, framing, _) = head_of(
            &parts(200, &[("content-length", "1234")]),
            SizeHint::with_exact(0),
            head,
            false,
        );
        assert_eq!(framing, Framing::None);
        assert!(text.contains("content-length: 1234\r\n"), "{text}");
        for status in [204, 304] {
            let (text, framing, keep) = head_of(
                &parts(status, &[("content-length", "10"), ("etag", "\"e\"")]),
                SizeHint::with_exact(0),
                GET11,
                false,
            );
            assert_eq!(framing, Framing::None);
            assert!(keep);
            assert!(!text.contains("content-length"), "{text}");
            assert!(text.contains("etag: \"e\"\r\n"), "{text}");
        }
    }

    #[test]
    fn closing_is_said_once() {
        let (text, _, keep) = head_of(&parts(200, &[]), SizeHint::with_exact(0), GET11, true);
        assert!(!keep);
        assert_eq!(text.matches("connection: close").count(), 1, "{text}");
        let (text, _, keep) = head_of(
            &parts(413, &[("connection", "close")]),
            SizeHint::with_exact(0),
            GET11,
            false,
        );
        assert!(!keep);
        assert_eq!(text.matches("connection: close").count(), 1, "{text}");
        let (text, _, _) = head_of(
            &parts(200, &[("date", "Sun, 06 Nov 1994 08:49:37 GMT")]),
            SizeHint::with_exact(0),
            GET11,
            false,
        );
        assert_eq!(text.matches("date: ").count(), 1, "{text}");
    }

    #[test]
    fn the_end_of_a_head_is_found_in_either_line_ending() {
        assert!(ends_head(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(ends_head(b"\n\r\n"));
        assert!(ends_head(b"GET / HTTP/1.1\nHost: x\n\n"));
        assert!(!ends_head(b"GET / HTTP/1.1\r\nHost: x\r\n"));
        assert!(!ends_head(b"GET / HTTP/1.1\r\nHost: x\r\n\r"));
        assert!(!ends_head(b""));
    }

    /// What the receive loop makes of `bytes` arriving in reads of `step`
    /// bytes, with its guard against parsing again before a head can end.
    fn receive(bytes: &[u8], step: usize) -> (String, Vec<u8>) {
        let mut names = FieldNames::default();
        let mut buf = BytesMut::new();
        let mut checked: usize = 0;
        let step = step.max(1);
        for (i, piece) in bytes.chunks(step).enumerate() {
            buf.extend_from_slice(piece);
            // What is left: the buffer and what has not arrived yet.
            let left =
                |buf: &BytesMut| [&buf[..], &bytes[((i + 1) * step).min(bytes.len())..]].concat();
            let may_end =
                checked == 0 || buf.len() >= 8192 || ends_head(&buf[checked.saturating_sub(3)..]);
            if may_end {
                match parse_head(&mut buf, 100, 8192, &mut names) {
                    Parsed::Head(head) => {
                        let r = &head.request;
                        let seen = format!(
                            "{} {} {:?} {:?}",
                            r.method(),
                            r.uri(),
                            r.version(),
                            r.headers()
                        );
                        return (seen, left(&buf));
                    }
                    Parsed::HandOff => return ("hand off".into(), left(&buf)),
                    Parsed::TargetTooLong => return ("too long".into(), left(&buf)),
                    Parsed::Partial => {}
                }
            }
            checked = buf.len();
        }
        ("partial".into(), buf.to_vec())
    }

    proptest::proptest! {
        /// However a head is split into reads, the loop finds the same
        /// request and leaves the same bytes; what it hands to hyper is
        /// every byte.
        #[test]
        fn reads_of_any_size_give_the_same_request(
            path in "/[a-z0-9/?=&%.-]{0,30}",
            fields in proptest::collection::vec(("[A-Za-z-]{1,12}", "[ -~]{0,20}"), 0..8),
            bare_lf in proptest::bool::ANY,
            extra in "(Content-Length: 3|Transfer-Encoding: chunked|Expect: 100-continue|Upgrade: h2c|bad name: x)?",
            tail in proptest::collection::vec(proptest::num::u8::ANY, 0..20),
            step in 1usize..64,
        ) {
            let eol = if bare_lf { "\n" } else { "\r\n" };
            let mut text = format!("GET {path} HTTP/1.1{eol}");
            for (name, value) in &fields {
                text.push_str(&format!("{name}: {value}{eol}"));
            }
            if !extra.is_empty() {
                text.push_str(&format!("{extra}{eol}"));
            }
            text.push_str(eol);
            let mut bytes = text.into_bytes();
            bytes.extend_from_slice(&tail);
            let whole = receive(&bytes, bytes.len());
            let split = receive(&bytes, step);
            proptest::prop_assert_eq!(&whole, &split);
            if whole.0 == "hand off" {
                proptest::prop_assert_eq!(&whole.1, &bytes);
            }
        }

        /// Arbitrary bytes never panic, and a head taken leaves exactly the
        /// bytes after it.
        #[test]
        fn arbitrary_bytes_are_taken_or_left_whole(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
        ) {
            let mut buf = BytesMut::from(&bytes[..]);
            match parse_head(&mut buf, 100, 8192, &mut FieldNames::default()) {
                Parsed::Head(_) => proptest::prop_assert!(bytes.ends_with(&buf)),
                Parsed::HandOff | Parsed::Partial | Parsed::TargetTooLong => {
                    proptest::prop_assert_eq!(&buf[..], &bytes[..])
                }
            }
        }
    }

    #[test]
    fn chunk_sizes_are_hexadecimal() {
        assert_eq!(hex_len(0).as_bytes(), b"0");
        assert_eq!(hex_len(255).as_bytes(), b"ff");
        assert_eq!(hex_len(0x1_0000).as_bytes(), b"10000");
    }
}
