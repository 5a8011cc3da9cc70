//! Body types at the client edge: the boxed response body every handler
//! returns, and the size-capped request body every handler receives.
//!
//! The request body cap is enforced while streaming, so a chunked body that
//! grows past the limit fails with [`BodyError::TooLarge`] however it is
//! framed; a declared `Content-Length` over the limit is refused earlier by the
//! listener with 413 (RFC 9110 §15.5.14) without calling the handler.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};

/// The error type carried by response bodies: anything that can go wrong while
/// streaming from an origin, a cache file or a compressor.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every response the edge sends. Unsync so that streaming
/// compressors and cache readers that are only `Send` fit.
pub type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;

/// A response body holding `bytes` in one frame.
pub fn full(bytes: impl Into<Bytes>) -> ResponseBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty response body (for 101, 204, 304 and HEAD).
pub fn empty() -> ResponseBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Why reading a request body failed.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The body grew past the configured maximum; answer 413.
    #[error("request body exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The configured maximum in bytes.
        limit: u64,
    },
    /// The client connection failed or sent a malformed body.
    #[error("reading the request body failed: {0}")]
    Transport(#[from] hyper::Error),
}

/// A request body that fails with [`BodyError::TooLarge`] once more than
/// `limit` bytes of data have been read. A request that came with no body
/// (most do) has none to read.
#[derive(Debug)]
pub struct RequestBody {
    inner: Option<Incoming>,
    remaining: u64,
    limit: u64,
}

impl RequestBody {
    /// Wraps `inner`, allowing at most `limit` bytes of data.
    pub fn new(inner: Incoming, limit: u64) -> Self {
        Self {
            inner: Some(inner),
            remaining: limit,
            limit,
        }
    }

    /// The body of a request that has none, under the limit `limit`.
    pub fn empty(limit: u64) -> Self {
        Self {
            inner: None,
            remaining: limit,
            limit,
        }
    }

    /// The configured maximum in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The same body under a new limit, counted afresh.
    pub fn with_limit(self, limit: u64) -> Self {
        Self {
            inner: self.inner,
            remaining: limit,
            limit,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > this.remaining {
                        this.remaining = 0;
                        return Poll::Ready(Some(Err(BodyError::TooLarge { limit: this.limit })));
                    }
                    this.remaining -= len;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(BodyError::Transport(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        // The inner hint stays truthful: a body over the limit errors
        // rather than being cut short.
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

/// The most bytes of an HTTP/2 response handed to the connection at once.
/// hyper polls a stream's body again only once the client's window has
/// room past what it was last given, so a stream's send timeout is a limit
/// on taking this much, whatever the size of the chunks the origin or the
/// cache sends.
pub const H2_PIECE: usize = 16 * 1024;

/// A response body's data cut into pieces of at most a given size, for
/// the wrappers that hand them out one poll at a time.
#[derive(Debug, Default)]
pub struct Sliced {
    /// Data not handed out yet, of a frame larger than a piece.
    rest: Bytes,
    /// The largest piece; none: frames go as they come.
    size: Option<usize>,
}

impl Sliced {
    /// Sliced of at most `size` bytes, or whole frames.
    pub fn new(size: Option<usize>) -> Self {
        Self {
            rest: Bytes::new(),
            size,
        }
    }

    /// The next piece of a frame already cut, if any is left.
    pub fn next_piece(&mut self) -> Option<Bytes> {
        if self.rest.is_empty() {
            return None;
        }
        let rest = std::mem::take(&mut self.rest);
        Some(self.cut(rest))
    }

    /// The first piece of `data`, the rest kept for [`Sliced::next_piece`].
    pub fn cut(&mut self, mut data: Bytes) -> Bytes {
        match self.size {
            Some(size) if data.len() > size => {
                self.rest = data.split_off(size);
                data
            }
            _ => data,
        }
    }

    /// Whether every piece has been handed out.
    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// `hint`, the body's own, with the pieces left added.
    pub fn hint(&self, hint: SizeHint) -> SizeHint {
        if self.rest.is_empty() {
            return hint;
        }
        let rest = self.rest.len() as u64;
        let mut out = SizeHint::new();
        out.set_lower(hint.lower().saturating_add(rest));
        if let Some(upper) = hint.upper() {
            out.set_upper(upper.saturating_add(rest));
        }
        out
    }
}
