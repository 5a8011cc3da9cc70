//! Compression of responses on delivery: br and gzip, negotiated from the
//! client's Accept-Encoding (RFC 9110 section 12.5.3) against the rule's
//! algorithms, for the rule's content types and minimum size.

//!
//! A stored body is compressed once per algorithm and level, not on every
//! hit: [`Copies`] keeps the compressed copies in memory, in a budget of its
//! own, under an identity that changes whenever the stored response does.

use crate::policy::model::{Algorithm, CompressSpec};
use bytes::Bytes;
use http::header::{
    ACCEPT_RANGES, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE,
    ETAG, VARY,
};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use hyper::body::{Body, Frame, SizeHint};
use std::io::Write as _;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Bytes a kept copy is weighed at besides its body: the key, the handle
/// and foyer's record.
const COPY_OVERHEAD: usize = 96;

/// What tells one stored response from another, for [`Copies::identity`].
#[derive(Debug, Clone, Copy)]
pub struct Stored<'a> {
    /// The primary cache key.
    pub primary: &'a str,
    /// The secondary key (the `Vary` fields' values).
    pub secondary: &'a str,
    /// The variant generation.
    pub generation: u64,
    /// When the response was received, Unix milliseconds.
    pub received_ms: u64,
    /// Body length.
    pub len: usize,
}

/// Compressed copies of stored bodies, so that delivering a hit costs a
/// lookup rather than a compression. Least useful copies are evicted when
/// the budget is full; a copy is never found for a response other than the
/// one it was made from, since its identity includes what tells stored
/// responses apart (see [`Copies::identity`]).
#[derive(Clone)]
pub struct Copies {
    cache: foyer::Cache<u128, Bytes>,
    kept: metrics::Counter,
    made: metrics::Counter,
}

impl Copies {
    /// Copies weighing at most `budget` bytes in all.
    pub fn new(budget: usize) -> Copies {
        Copies {
            cache: foyer::CacheBuilder::new(budget.max(1))
                .with_shards(4)
                .with_weighter(|_: &u128, body: &Bytes| COPY_OVERHEAD + body.len())
                .build(),
            kept: metrics::counter!("portico_compressed_copies_total", "result" => "reused"),
            made: metrics::counter!("portico_compressed_copies_total", "result" => "made"),
        }
    }

    /// The identity of a stored response's copy: its primary key,
    /// secondary key and variant generation, when it was received (a
    /// refetch or a refresh changes it), its length, and the algorithm and
    /// level.
    pub fn identity(stored: Stored<'_>, alg: Algorithm, level: Option<u32>) -> u128 {
        let Stored {
            primary,
            secondary,
            generation,
            received_ms,
            len,
        } = stored;
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for part in [primary, secondary] {
            ctx.update(&(part.len() as u64).to_le_bytes());
            ctx.update(part.as_bytes());
        }
        ctx.update(&generation.to_le_bytes());
        ctx.update(&received_ms.to_le_bytes());
        ctx.update(&(len as u64).to_le_bytes());
        ctx.update(alg.as_str().as_bytes());
        ctx.update(&level.map_or(u64::MAX, u64::from).to_le_bytes());
        let hash = ctx.finish();
        let mut first = [0u8; 16];
        first.copy_from_slice(&hash.as_ref()[..16]);
        u128::from_le_bytes(first)
    }

    /// The copy of `body` under `identity`, compressed now if none is kept.
    pub fn get_or_compress(
        &self,
        identity: u128,
        alg: Algorithm,
        level: Option<u32>,
        body: &[u8],
    ) -> Bytes {
        if let Some(kept) = self.get(identity) {
            return kept;
        }
        self.made.increment(1);
        let copy = Bytes::from(compress(alg, level, body));
        self.cache.insert(identity, copy.clone());
        copy
    }

    /// The kept copy under `identity`, if any.
    pub fn get(&self, identity: u128) -> Option<Bytes> {
        let kept = self.cache.get(&identity)?;
        self.kept.increment(1);
        Some(kept.value().clone())
    }

    /// A body that compresses `body` as it streams, in pieces, and keeps
    /// the copy under `identity` once it has all been sent: for bodies too
    /// large to compress at once without holding up the other requests on
    /// the same thread.
    pub fn compress_streaming(
        &self,
        identity: u128,
        alg: Algorithm,
        level: Option<u32>,
        body: Bytes,
    ) -> Keeping {
        Keeping {
            inner: Compressing::new(Pieces(body), alg, level),
            sent: Vec::new(),
            copies: self.cache.clone(),
            made: self.made.clone(),
            identity,
        }
    }

    /// Bytes the kept copies weigh.
    pub fn usage(&self) -> usize {
        self.cache.usage()
    }
}

/// The algorithm to use for a client, or `None` for identity.
///
/// The client's q-values rank the choices; ties go to the policy's order.
/// `q=0` refuses an algorithm; `*` stands for any algorithm not named.
pub fn negotiate(accept: Option<&HeaderValue>, spec: &CompressSpec) -> Option<Algorithm> {
    let accept = accept?.to_str().ok()?;
    let mut best: Option<(u16, usize, Algorithm)> = None;
    for (rank, alg) in spec.algorithms.iter().enumerate() {
        let Some(q) = qvalue(accept, alg.as_str()) else {
            continue;
        };
        if q == 0 {
            continue;
        }
        // Higher q first, then earlier in the policy.
        if best.is_none_or(|(bq, brank, _)| q > bq || (q == bq && rank < brank)) {
            best = Some((q, rank, *alg));
        }
    }
    best.map(|(_, _, a)| a)
}

/// The q-value (0..=1000) the header gives a coding, or `None` when it is not acceptable.
fn qvalue(accept: &str, coding: &str) -> Option<u16> {
    let mut wildcard = None;
    for item in accept.split(',') {
        let mut parts = item.split(';');
        let name = parts.next().unwrap_or("").trim();
        let q = parts
            .find_map(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .or_else(|| p.trim().strip_prefix("Q="))
            })
            .map(parse_q)
            .unwrap_or(1000);
        if name.eq_ignore_ascii_case(coding) {
            return Some(q);
        }
        if name == "*" {
            wildcard = Some(q);
        }
    }
    wildcard
}

fn parse_q(s: &str) -> u16 {
    let s = s.trim();
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let int: u16 = int.parse().unwrap_or(0);
    if int >= 1 {
        return 1000;
    }
    let mut v = 0u16;
    for (i, c) in frac.chars().take(3).enumerate() {
        let d = c.to_digit(10).unwrap_or(0) as u16;
        v += d * [100, 10, 1][i];
    }
    v
}

/// Whether a response of this length and these headers should be compressed.
pub fn applies(spec: &CompressSpec, headers: &HeaderMap, len: usize) -> bool {
    if (len as u64) < spec.min_size || headers.contains_key(CONTENT_ENCODING) {
        return false;
    }
    let no_transform = headers
        .get_all(CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|d| d.trim().eq_ignore_ascii_case("no-transform"))
        });
    if no_transform {
        return false;
    }
    let Some(ct) = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let ct = ct.split(';').next().unwrap_or("").trim();
    spec.types.iter().any(|t| match t.strip_suffix('*') {
        Some(prefix) => ct.len() >= prefix.len() && ct[..prefix.len()].eq_ignore_ascii_case(prefix),
        None => ct.eq_ignore_ascii_case(t),
    })
}

/// Marks a response as varying on `Accept-Encoding`, once.
pub fn vary_on_accept_encoding(headers: &mut HeaderMap) {
    let named = headers
        .get_all(VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|n| n.trim().eq_ignore_ascii_case("accept-encoding") || n.trim() == "*");
    if !named {
        headers.append(VARY, HeaderValue::from_static("accept-encoding"));
    }
}

/// Sets the fields of a response whose body is now coded with `alg`:
/// `Content-Encoding`, and a weak `ETag` (the coded body is not the same
/// bytes, but the same content: a conditional request with it still
/// matches the stored response, RFC 9110 section 8.8.3).
pub fn mark_coded(headers: &mut HeaderMap, alg: Algorithm) {
    headers.insert(CONTENT_ENCODING, HeaderValue::from_static(alg.as_str()));
    weaken_etag(headers);
}

/// Makes a strong `ETag` weak.
pub fn weaken_etag(headers: &mut HeaderMap) {
    if let Some(tag) = headers.get(ETAG) {
        if !tag.as_bytes().starts_with(b"W/") {
            let mut weak = Vec::with_capacity(tag.len() + 2);
            weak.extend_from_slice(b"W/");
            weak.extend_from_slice(tag.as_bytes());
            match HeaderValue::from_bytes(&weak) {
                Ok(v) => {
                    headers.insert(ETAG, v);
                }
                Err(_) => {
                    headers.remove(ETAG);
                }
            }
        }
    }
}

/// Compresses a response on its way to the client, as its body streams,
/// when the rule's `compress` applies to it and the client accepts one of
/// its algorithms. A response of unknown length counts as long enough.
/// Partial (206), bodiless (204, 304) and already coded responses pass as
/// they are; for `HEAD` only the fields change.
pub fn response<B>(
    spec: &CompressSpec,
    accept: Option<&HeaderValue>,
    head: bool,
    resp: Response<B>,
) -> Response<Compressible<B>> {
    let (mut parts, body) = resp.into_parts();
    let alg = on_the_fly(spec, accept, parts.status, &mut parts.headers);
    let body = match alg {
        Some(alg) if !head => {
            Compressible::Coded(Box::new(Compressing::new(body, alg, spec.level)))
        }
        _ => Compressible::Plain(body),
    };
    Response::from_parts(parts, body)
}

/// Decides on compressing a streamed response and sets its fields.
fn on_the_fly(
    spec: &CompressSpec,
    accept: Option<&HeaderValue>,
    status: StatusCode,
    headers: &mut HeaderMap,
) -> Option<Algorithm> {
    if status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || status == StatusCode::PARTIAL_CONTENT
        || status.is_informational()
        || headers.contains_key(CONTENT_RANGE)
    {
        return None;
    }
    let len = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(usize::MAX);
    if !applies(spec, headers, len) {
        return None;
    }
    vary_on_accept_encoding(headers);
    let alg = negotiate(accept, spec)?;
    mark_coded(headers, alg);
    headers.remove(CONTENT_LENGTH);
    headers.remove(ACCEPT_RANGES);
    Some(alg)
}

/// A response body, compressed on the way or not.
pub enum Compressible<B> {
    /// As the origin sent it.
    Plain(B),
    /// Compressed as it streams.
    Coded(Box<Compressing<B>>),
}

impl<B> Body for Compressible<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.get_mut() {
            Compressible::Plain(b) => Pin::new(b).poll_frame(cx),
            Compressible::Coded(c) => Pin::new(c.as_mut()).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Compressible::Plain(b) => b.is_end_stream(),
            Compressible::Coded(c) => c.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Compressible::Plain(b) => b.size_hint(),
            Compressible::Coded(_) => SizeHint::default(),
        }
    }
}

/// Bodies up to this length are compressed at once on a hit that finds no
/// kept copy; longer ones are compressed as they stream
/// ([`Copies::compress_streaming`]).
pub const AT_ONCE_MAX: usize = 256 * 1024;

/// How much of a stored body [`Pieces`] hands the encoder at a time.
const PIECE: usize = 64 * 1024;

/// A stored body handed on in pieces.
struct Pieces(Bytes);

impl Body for Pieces {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let rest = &mut self.get_mut().0;
        if rest.is_empty() {
            return Poll::Ready(None);
        }
        let piece = rest.split_to(PIECE.min(rest.len()));
        Poll::Ready(Some(Ok(Frame::data(piece))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

/// A stored body compressed as it streams, whose copy is kept once the
/// whole of it has been sent (a client that leaves early keeps nothing).
pub struct Keeping {
    inner: Compressing<Pieces>,
    sent: Vec<Bytes>,
    copies: foyer::Cache<u128, Bytes>,
    /// Counted when the copy is kept, not when a client that leaves early
    /// started it.
    made: metrics::Counter,
    identity: u128,
}

impl Body for Keeping {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        // Pieces are always ready, so the encoder hands on full pieces
        // and then the end.
        let frame = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.sent.push(data.clone());
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(never)) => match never {},
            None => {
                let mut copy = Vec::with_capacity(this.sent.iter().map(Bytes::len).sum());
                for piece in this.sent.drain(..) {
                    copy.extend_from_slice(&piece);
                }
                this.copies.insert(this.identity, Bytes::from(copy));
                this.made.increment(1);
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}

/// Compressed output is handed on once this much has gathered, or when
/// the origin pauses.
const EMIT_AT: usize = 16 * 1024;

/// A streaming encoder writing into a buffer. (It lives in a boxed
/// [`Compressing`], so its size costs no move.)
#[allow(clippy::large_enum_variant)]
enum Encoder {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Br(Box<brotli::CompressorWriter<Vec<u8>>>),
}

impl Encoder {
    fn new(alg: Algorithm, level: Option<u32>) -> Encoder {
        match alg {
            Algorithm::Gzip => Encoder::Gzip(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::new(level.unwrap_or(6).min(9)),
            )),
            Algorithm::Br => Encoder::Br(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                4096,
                level.unwrap_or(5).min(11),
                22,
            ))),
        }
    }

    // Writing into a Vec cannot fail, so neither can these.
    fn write(&mut self, data: &[u8]) {
        let _ = match self {
            Encoder::Gzip(e) => e.write_all(data),
            Encoder::Br(e) => e.write_all(data),
        };
    }

    fn flush(&mut self) {
        let _ = match self {
            Encoder::Gzip(e) => e.flush(),
            Encoder::Br(e) => e.flush(),
        };
    }

    fn output(&mut self) -> &mut Vec<u8> {
        match self {
            Encoder::Gzip(e) => e.get_mut(),
            Encoder::Br(e) => e.get_mut(),
        }
    }

    fn take(&mut self) -> Bytes {
        Bytes::from(std::mem::take(self.output()))
    }

    fn finish(self) -> Bytes {
        match self {
            Encoder::Gzip(e) => Bytes::from(e.finish().unwrap_or_default()),
            Encoder::Br(e) => Bytes::from(e.into_inner()),
        }
    }
}

/// A body compressed as it streams. Output is handed on in pieces of about
/// [`EMIT_AT`], and whatever is pending is flushed whenever the inner body
/// has nothing ready, so an event stream or a slow page reaches the client
/// as promptly as it would uncompressed. Trailers pass after the data.
pub struct Compressing<B> {
    inner: B,
    encoder: Option<Encoder>,
    /// Input written since the last flush.
    unflushed: bool,
    trailers: Option<HeaderMap>,
}

impl<B> Compressing<B> {
    /// Compresses `inner` with `alg` at `level`.
    pub fn new(inner: B, alg: Algorithm, level: Option<u32>) -> Compressing<B> {
        Compressing {
            inner,
            encoder: Some(Encoder::new(alg, level)),
            unflushed: false,
            trailers: None,
        }
    }
}

impl<B> Body for Compressing<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        loop {
            let Some(encoder) = this.encoder.as_mut() else {
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            };
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        encoder.write(&data);
                        this.unflushed = true;
                        if encoder.output().len() >= EMIT_AT {
                            return Poll::Ready(Some(Ok(Frame::data(encoder.take()))));
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            this.trailers = Some(trailers);
                        }
                    }
                },
                Poll::Ready(Some(Err(e))) => {
                    this.encoder = None;
                    this.trailers = None;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => {
                    let rest = this.encoder.take().map(Encoder::finish).unwrap_or_default();
                    if !rest.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(rest))));
                    }
                }
                Poll::Pending => {
                    if this.unflushed {
                        this.unflushed = false;
                        encoder.flush();
                        if !encoder.output().is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(encoder.take()))));
                        }
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.encoder.is_none() && self.trailers.is_none()
    }
}

/// Compresses a body. Levels: brotli 0-11 (default 5), gzip 0-9 (default 6).
pub fn compress(alg: Algorithm, level: Option<u32>, body: &[u8]) -> Vec<u8> {
    match alg {
        Algorithm::Gzip => {
            let level = flate2::Compression::new(level.unwrap_or(6).min(9));
            let mut enc = flate2::write::GzEncoder::new(Vec::with_capacity(body.len() / 3), level);
            // Writing into a Vec cannot fail.
            let _ = enc.write_all(body);
            enc.finish().unwrap_or_default()
        }
        Algorithm::Br => {
            let mut out = Vec::with_capacity(body.len() / 3);
            let params = brotli::enc::BrotliEncoderParams {
                quality: level.unwrap_or(5).min(11) as i32,
                lgwin: 22,
                ..Default::default()
            };
            let mut input = body;
            let _ = brotli::BrotliCompress(&mut input, &mut out, &params);
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    fn spec(algs: &[Algorithm]) -> CompressSpec {
        CompressSpec {
            algorithms: algs.to_vec(),
            min_size: 100,
            types: CompressSpec::default_types(),
            level: None,
        }
    }

    #[test]
    fn negotiation_follows_q_values_then_policy_order() {
        let both = spec(&[Algorithm::Br, Algorithm::Gzip]);
        let cases = [
            ("gzip, deflate, br", Some(Algorithm::Br)),
            ("gzip", Some(Algorithm::Gzip)),
            ("br;q=0.5, gzip;q=0.8", Some(Algorithm::Gzip)),
            ("br;q=0, gzip;q=0", None),
            ("identity", None),
            ("*", Some(Algorithm::Br)),
            ("*;q=0.1, br;q=0", Some(Algorithm::Gzip)),
        ];
        for (accept, want) in cases {
            let v = HeaderValue::from_static(accept);
            assert_eq!(negotiate(Some(&v), &both), want, "{accept}");
        }
        assert_eq!(negotiate(None, &both), None);
    }

    #[test]
    fn applies_to_listed_types_above_the_minimum() {
        let s = spec(&[Algorithm::Gzip]);
        let mut h = HeaderMap::new();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        assert!(applies(&s, &h, 1000));
        assert!(!applies(&s, &h, 10));
        h.insert(
            CACHE_CONTROL,
            HeaderValue::from_static("public, no-transform"),
        );
        assert!(!applies(&s, &h, 1000));
        let mut img = HeaderMap::new();
        img.insert(CONTENT_TYPE, HeaderValue::from_static("image/png"));
        assert!(!applies(&s, &img, 1000));
        let mut done = HeaderMap::new();
        done.insert(CONTENT_TYPE, HeaderValue::from_static("text/css"));
        done.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        assert!(!applies(&s, &done, 1000));
    }

    #[test]
    fn compressed_bodies_round_trip() {
        let body = "hello portico ".repeat(200);
        let gz = compress(Algorithm::Gzip, None, body.as_bytes());
        let mut out = String::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(out, body);
        assert!(gz.len() < body.len() / 5);
        let br = compress(Algorithm::Br, Some(4), body.as_bytes());
        let mut out = Vec::new();
        brotli::BrotliDecompress(&mut &br[..], &mut out).unwrap();
        assert_eq!(out, body.as_bytes());
    }
}
