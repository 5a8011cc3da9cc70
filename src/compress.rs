//! Compression of responses on delivery: br and gzip, negotiated from the
//! client's Accept-Encoding (RFC 9110 section 12.5.3) against the rule's
//! algorithms, for the rule's content types and minimum size.

//!
//! A stored body is compressed once per algorithm and level, not on every
//! hit: [`Copies`] keeps the compressed copies in memory, in a budget of its
//! own, under an identity that changes whenever the stored response does.

use crate::policy::model::{Algorithm, CompressSpec};
use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_ENCODING, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue};
use std::io::Write as _;

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
        if let Some(kept) = self.cache.get(&identity) {
            self.kept.increment(1);
            return kept.value().clone();
        }
        self.made.increment(1);
        let copy = Bytes::from(compress(alg, level, body));
        self.cache.insert(identity, copy.clone());
        copy
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
