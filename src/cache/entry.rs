//! The stored value of the cache and its binary encoding.
//!
//! An [`Entry`] holds a response (status, fields, body) with what the cache
//! needs to judge it later without re-parsing its fields: when it was
//! fetched, its corrected initial age, freshness lifetime and stale windows,
//! purge tags, and its `Vary` names and secondary key.
//!
//! Encoding (all integers little-endian): magic `PTCE`, format version, kind,
//! flags, status, times and durations in milliseconds, generation, the
//! fields, tags, vary names, secondary key, body, and a trailing CRC-32 of
//! everything before it. Decoding verifies magic, version and checksum before
//! reading anything else and fails on any inconsistency: a partially valid
//! entry is never produced.

use std::io::{Read, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::control::{
    classify, corrected_initial_age, current_age, freshness_lifetime, secondary_key, stale_windows,
    strip_for_storage, vary_names, Lifetime, NotStorable, Overrides, ResponseDirectives, Staleness,
};

/// Magic bytes at the start of every encoded entry.
pub const MAGIC: [u8; 4] = *b"PTCE";
/// Current encoding version; entries of other versions are refused.
pub const FORMAT_VERSION: u8 = 1;

const FLAG_SOFT_PURGED: u8 = 1;
const FLAG_REVALIDATE: u8 = 2;
/// magic, version, kind, flags, status, 7 u64 fields.
const FIXED_LEN: usize = 4 + 1 + 1 + 1 + 2 + 7 * 8;
const CHECKSUM_LEN: usize = 4;

/// What an entry stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A stored response.
    Response,
    /// Stored under a primary key whose responses vary: names the `Vary`
    /// fields and the generation of the variants (see the store).
    VaryMarker,
}

/// A stored response and the facts that decide its reuse.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Response or vary marker.
    pub kind: EntryKind,
    /// Response status.
    pub status: StatusCode,
    /// Response fields, without `Set-Cookie`.
    pub headers: HeaderMap,
    /// Response body.
    pub body: Bytes,
    /// When the request to the origin was sent, Unix milliseconds.
    pub request_time_ms: u64,
    /// When the response arrived, Unix milliseconds.
    pub response_time_ms: u64,
    /// Corrected initial age (RFC 9111 section 4.2.3).
    pub initial_age: Duration,
    /// Freshness lifetime (RFC 9111 section 4.2.1).
    pub freshness: Duration,
    /// stale-while-revalidate window (RFC 5861 section 3).
    pub swr: Duration,
    /// stale-if-error window (RFC 5861 section 4).
    pub sie: Duration,
    /// Stale copies need validation (`must-revalidate` and the like).
    pub revalidate_when_stale: bool,
    /// Purge tags from `Surrogate-Key` and `Cache-Tag`.
    pub tags: Vec<String>,
    /// Marked stale by a soft purge: served only as stale.
    pub soft_purged: bool,
    /// The `Vary` names of the response, lowercase and sorted.
    pub vary: Vec<HeaderName>,
    /// The secondary key of the request that fetched it.
    pub secondary_key: String,
    /// Variant generation (see the store); 0 when unused.
    pub generation: u64,
}

/// A response as received from the origin, for [`Entry::from_response`].
#[derive(Debug)]
pub struct Received<'a> {
    /// Response status.
    pub status: StatusCode,
    /// Response fields.
    pub headers: HeaderMap,
    /// Response body.
    pub body: Bytes,
    /// Fields of the request that fetched it (for `Vary`).
    pub request_headers: &'a HeaderMap,
    /// When the request was sent.
    pub request_time: SystemTime,
    /// When the response arrived.
    pub response_time: SystemTime,
}

/// Why an encoded entry was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EntryError {
    /// Does not start with the magic bytes.
    #[error("not a cache entry (bad magic)")]
    BadMagic,
    /// Written by another format version.
    #[error("unsupported entry format version {0}")]
    Version(u8),
    /// The checksum does not match the content.
    #[error("entry checksum mismatch")]
    Checksum,
    /// Shorter than its own lengths say, or longer.
    #[error("entry is truncated or has trailing bytes")]
    Length,
    /// A field holds an impossible value.
    #[error("entry field `{0}` is invalid")]
    Invalid(&'static str),
    /// Reading or writing failed.
    #[error("entry i/o: {0}")]
    Io(String),
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn unix_millis(t: SystemTime) -> u64 {
    millis(t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO))
}

/// The `Surrogate-Key` field (not an `http::header` constant).
pub const SURROGATE_KEY: HeaderName = HeaderName::from_static("surrogate-key");
/// The `Cache-Tag` field.
pub const CACHE_TAG: HeaderName = HeaderName::from_static("cache-tag");

/// Tags of `Surrogate-Key` (space separated) and `Cache-Tag` (comma
/// separated), without duplicates.
pub fn purge_tags(headers: &HeaderMap) -> Vec<String> {
    let mut tags: Vec<String> = Vec::new();
    for name in [SURROGATE_KEY, CACHE_TAG] {
        for value in headers.get_all(name) {
            let Ok(text) = value.to_str() else { continue };
            for tag in text.split([' ', ',', '\t']).filter(|t| !t.is_empty()) {
                if !tags.iter().any(|t| t == tag) {
                    tags.push(tag.to_owned());
                }
            }
        }
    }
    tags
}

impl Entry {
    /// Builds the entry for a response that [`super::control::storable`]
    /// accepted: computes its age, freshness, windows, tags and secondary
    /// key, and strips `Set-Cookie`.
    pub fn from_response(
        received: Received<'_>,
        directives: &ResponseDirectives,
        overrides: &Overrides,
        heuristic_max: Duration,
    ) -> Result<Entry, NotStorable> {
        let Received {
            status,
            mut headers,
            body,
            request_headers,
            request_time,
            response_time,
        } = received;
        let vary = vary_names(&headers)?;
        let secondary_key = secondary_key(&vary, request_headers);
        let freshness = freshness_lifetime(
            status,
            directives,
            &headers,
            response_time,
            heuristic_max,
            overrides,
        );
        let (swr, sie) = stale_windows(directives, overrides);
        let initial_age = corrected_initial_age(&headers, request_time, response_time);
        strip_for_storage(&mut headers);
        Ok(Entry {
            kind: EntryKind::Response,
            status,
            tags: purge_tags(&headers),
            headers,
            body,
            request_time_ms: unix_millis(request_time),
            response_time_ms: unix_millis(response_time),
            initial_age,
            freshness,
            swr,
            sie,
            revalidate_when_stale: directives.revalidate_when_stale() && !overrides.ignore_origin,
            soft_purged: false,
            vary,
            secondary_key,
            generation: 0,
        })
    }

    /// When the response arrived.
    pub fn response_time(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.response_time_ms)
    }

    /// The numbers that decide reuse; a soft-purged entry has no freshness
    /// left but keeps its stale windows.
    pub fn lifetime(&self) -> Lifetime {
        Lifetime {
            freshness: if self.soft_purged {
                Duration::ZERO
            } else {
                self.freshness
            },
            swr: self.swr,
            sie: self.sie,
            revalidate_when_stale: self.revalidate_when_stale,
        }
    }

    /// Current age at `now` (RFC 9111 section 4.2.3).
    pub fn age_at(&self, now: SystemTime) -> Duration {
        current_age(self.initial_age, self.response_time(), now)
    }

    /// Where the entry stands at `now`.
    pub fn staleness_at(&self, now: SystemTime) -> Staleness {
        let lifetime = self.lifetime();
        classify(
            lifetime.freshness,
            self.age_at(now),
            lifetime.swr,
            lifetime.sie,
        )
    }

    /// Remaining freshness in whole seconds at `now`, negative when stale
    /// (the `ttl` of `Cache-Status`, RFC 9211 section 2.5).
    pub fn ttl_at(&self, now: SystemTime) -> i64 {
        let freshness = self.lifetime().freshness.as_secs() as i64;
        freshness.saturating_sub(self.age_at(now).as_secs() as i64)
    }

    /// Encoded length in bytes.
    pub fn encoded_len(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| 2 + n.as_str().len() + 4 + v.len())
            .sum();
        let tags: usize = self.tags.iter().map(|t| 4 + t.len()).sum();
        let vary: usize = self.vary.iter().map(|n| 2 + n.as_str().len()).sum();
        FIXED_LEN
            + 4
            + headers
            + 4
            + tags
            + 4
            + vary
            + 4
            + self.secondary_key.len()
            + 8
            + self.body.len()
            + CHECKSUM_LEN
    }

    /// Encodes the entry into a new buffer.
    pub fn encode_to_vec(&self) -> Result<Vec<u8>, EntryError> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(&MAGIC);
        out.push(FORMAT_VERSION);
        out.push(match self.kind {
            EntryKind::Response => 0,
            EntryKind::VaryMarker => 1,
        });
        let mut flags = 0;
        if self.soft_purged {
            flags |= FLAG_SOFT_PURGED;
        }
        if self.revalidate_when_stale {
            flags |= FLAG_REVALIDATE;
        }
        out.push(flags);
        out.extend_from_slice(&self.status.as_u16().to_le_bytes());
        for n in [
            self.request_time_ms,
            self.response_time_ms,
            millis(self.initial_age),
            millis(self.freshness),
            millis(self.swr),
            millis(self.sie),
            self.generation,
        ] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        put_u32(&mut out, self.headers.len())?;
        for (name, value) in &self.headers {
            put_u16(&mut out, name.as_str().len())?;
            out.extend_from_slice(name.as_str().as_bytes());
            put_u32(&mut out, value.len())?;
            out.extend_from_slice(value.as_bytes());
        }
        put_u32(&mut out, self.tags.len())?;
        for tag in &self.tags {
            put_u32(&mut out, tag.len())?;
            out.extend_from_slice(tag.as_bytes());
        }
        put_u32(&mut out, self.vary.len())?;
        for name in &self.vary {
            put_u16(&mut out, name.as_str().len())?;
            out.extend_from_slice(name.as_str().as_bytes());
        }
        put_u32(&mut out, self.secondary_key.len())?;
        out.extend_from_slice(self.secondary_key.as_bytes());
        out.extend_from_slice(&(self.body.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.body);
        let checksum = crc32fast::hash(&out);
        out.extend_from_slice(&checksum.to_le_bytes());
        Ok(out)
    }

    /// Decodes an entry, checking magic, version and checksum first.
    pub fn decode_bytes(data: Bytes) -> Result<Entry, EntryError> {
        if data.len() < 5 || data[..4] != MAGIC {
            return Err(EntryError::BadMagic);
        }
        if data[4] != FORMAT_VERSION {
            return Err(EntryError::Version(data[4]));
        }
        if data.len() < FIXED_LEN + CHECKSUM_LEN {
            return Err(EntryError::Length);
        }
        let (content, trailer) = data.split_at(data.len() - CHECKSUM_LEN);
        let expected = u32::from_le_bytes(trailer.try_into().map_err(|_| EntryError::Length)?);
        if crc32fast::hash(content) != expected {
            return Err(EntryError::Checksum);
        }
        let mut r = Reader {
            data: &data,
            pos: 5,
            end: content.len(),
        };
        let kind = match r.u8()? {
            0 => EntryKind::Response,
            1 => EntryKind::VaryMarker,
            _ => return Err(EntryError::Invalid("kind")),
        };
        let flags = r.u8()?;
        if flags & !(FLAG_SOFT_PURGED | FLAG_REVALIDATE) != 0 {
            return Err(EntryError::Invalid("flags"));
        }
        let status = StatusCode::from_u16(u16::from_le_bytes(r.array()?))
            .map_err(|_| EntryError::Invalid("status"))?;
        let request_time_ms = r.u64()?;
        let response_time_ms = r.u64()?;
        let initial_age = Duration::from_millis(r.u64()?);
        let freshness = Duration::from_millis(r.u64()?);
        let swr = Duration::from_millis(r.u64()?);
        let sie = Duration::from_millis(r.u64()?);
        let generation = r.u64()?;
        let header_count = r.u32()?;
        let mut headers = HeaderMap::with_capacity(header_count.min(r.remaining() / 6));
        for _ in 0..header_count {
            let name_len = r.u16()?;
            let name = HeaderName::from_bytes(r.take(name_len)?)
                .map_err(|_| EntryError::Invalid("header name"))?;
            let value_len = r.u32()?;
            let start = r.pos;
            r.take(value_len)?;
            // A slice of the entry, which the body keeps alive anyway.
            let value = HeaderValue::from_maybe_shared(data.slice(start..r.pos))
                .map_err(|_| EntryError::Invalid("header value"))?;
            headers.append(name, value);
        }
        let tag_count = r.u32()?;
        let mut tags = Vec::with_capacity(tag_count.min(r.remaining() / 4));
        for _ in 0..tag_count {
            let len = r.u32()?;
            tags.push(r.string(len, "tag")?);
        }
        let vary_count = r.u32()?;
        let mut vary = Vec::with_capacity(vary_count.min(r.remaining() / 2));
        for _ in 0..vary_count {
            let len = r.u16()?;
            vary.push(
                HeaderName::from_bytes(r.take(len)?).map_err(|_| EntryError::Invalid("vary"))?,
            );
        }
        let key_len = r.u32()?;
        let secondary_key = r.string(key_len, "secondary key")?;
        let body_len = usize::try_from(r.u64()?).map_err(|_| EntryError::Length)?;
        let body_start = r.pos;
        r.take(body_len)?;
        if r.pos != r.end {
            return Err(EntryError::Length);
        }
        let body = data.slice(body_start..body_start + body_len);
        Ok(Entry {
            kind,
            status,
            headers,
            body,
            request_time_ms,
            response_time_ms,
            initial_age,
            freshness,
            swr,
            sie,
            revalidate_when_stale: flags & FLAG_REVALIDATE != 0,
            tags,
            soft_purged: flags & FLAG_SOFT_PURGED != 0,
            vary,
            secondary_key,
            generation,
        })
    }
}

impl EntryError {
    /// The foyer error for this failure. Magic, version and checksum
    /// failures and malformed content use the kinds that make foyer's disk
    /// engine drop the entry and report a miss instead of an error.
    pub fn into_foyer(self) -> foyer::Error {
        let kind = match self {
            EntryError::BadMagic | EntryError::Version(_) => foyer::ErrorKind::MagicMismatch,
            EntryError::Checksum => foyer::ErrorKind::ChecksumMismatch,
            EntryError::Length | EntryError::Invalid(_) => foyer::ErrorKind::OutOfRange,
            EntryError::Io(_) => foyer::ErrorKind::Io,
        };
        foyer::Error::new(kind, self.to_string())
    }
}

impl foyer::Code for Entry {
    fn encode(&self, writer: &mut impl Write) -> foyer::Result<()> {
        let bytes = self.encode_to_vec().map_err(EntryError::into_foyer)?;
        writer.write_all(&bytes).map_err(foyer::Error::io_error)
    }

    fn decode(reader: &mut impl Read) -> foyer::Result<Self> {
        let mut buf = Vec::new();
        reader
            .read_to_end(&mut buf)
            .map_err(foyer::Error::io_error)?;
        // The body is a slice of this buffer for as long as the entry lives.
        buf.shrink_to_fit();
        Entry::decode_bytes(Bytes::from(buf)).map_err(EntryError::into_foyer)
    }

    fn estimated_size(&self) -> usize {
        self.encoded_len()
    }
}

/// The fields in memory of their own, for keeping.
///
/// The values hyper parses are slices of its read buffer, which also held
/// the start of the body: a stored copy of them would keep that whole buffer
/// (often larger than the body) alive as long as the entry. Here all values
/// share one block of exactly their total length.
pub fn compact_headers(headers: &HeaderMap) -> HeaderMap {
    let total: usize = headers.values().map(HeaderValue::len).sum();
    let mut block = Vec::with_capacity(total);
    for value in headers.values() {
        block.extend_from_slice(value.as_bytes());
    }
    let block = Bytes::from(block);
    let mut out = HeaderMap::with_capacity(headers.len());
    let mut at = 0;
    for (name, value) in headers {
        let end = at + value.len();
        let mut copy = HeaderValue::from_maybe_shared(block.slice(at..end))
            .expect("the bytes of a valid header value");
        copy.set_sensitive(value.is_sensitive());
        out.append(name.clone(), copy);
        at = end;
    }
    out
}

fn put_u16(out: &mut Vec<u8>, n: usize) -> Result<(), EntryError> {
    let n = u16::try_from(n).map_err(|_| EntryError::Invalid("length"))?;
    out.extend_from_slice(&n.to_le_bytes());
    Ok(())
}

fn put_u32(out: &mut Vec<u8>, n: usize) -> Result<(), EntryError> {
    let n = u32::try_from(n).map_err(|_| EntryError::Invalid("length"))?;
    out.extend_from_slice(&n.to_le_bytes());
    Ok(())
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    end: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.end - self.pos
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], EntryError> {
        if len > self.remaining() {
            return Err(EntryError::Length);
        }
        let out = &self.data[self.pos..self.pos + len];
        self.pos += len;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], EntryError> {
        self.take(N)?.try_into().map_err(|_| EntryError::Length)
    }

    fn u8(&mut self) -> Result<u8, EntryError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<usize, EntryError> {
        Ok(usize::from(u16::from_le_bytes(self.array()?)))
    }

    fn u32(&mut self) -> Result<usize, EntryError> {
        usize::try_from(u32::from_le_bytes(self.array()?)).map_err(|_| EntryError::Length)
    }

    fn u64(&mut self) -> Result<u64, EntryError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self, len: usize, what: &'static str) -> Result<String, EntryError> {
        std::str::from_utf8(self.take(len)?)
            .map(str::to_owned)
            .map_err(|_| EntryError::Invalid(what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::control::response_directives;
    use foyer::Code;
    use http::header;

    #[test]
    fn compacted_fields_keep_nothing_of_the_read_buffer() {
        // As hyper hands them over: values sliced out of one large buffer.
        let buffer = Bytes::from(vec![b'v'; 64 * 1024]);
        let mut received = HeaderMap::new();
        let value = |range| HeaderValue::from_maybe_shared(buffer.slice(range)).unwrap();
        received.insert(header::CONTENT_TYPE, value(0..9));
        received.append("x-multi", value(10..12));
        received.append("x-multi", value(20..21));
        let mut secret = value(30..40);
        secret.set_sensitive(true);
        received.insert(header::AUTHORIZATION, secret);
        let compact = compact_headers(&received);
        assert_eq!(compact, received);
        assert!(compact[header::AUTHORIZATION].is_sensitive());
        assert_eq!(
            compact.get_all("x-multi").iter().collect::<Vec<_>>(),
            ["vv", "v"]
        );
        drop(received);
        assert!(
            buffer.is_unique(),
            "the compacted fields still reference the read buffer"
        );
    }

    fn sample() -> Entry {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
        headers.append("x-multi", HeaderValue::from_static("1"));
        headers.append("x-multi", HeaderValue::from_static("2"));
        Entry {
            kind: EntryKind::Response,
            status: StatusCode::OK,
            headers,
            body: Bytes::from_static(b"<h1>hello</h1>"),
            request_time_ms: 1_700_000_000_000,
            response_time_ms: 1_700_000_000_250,
            initial_age: Duration::from_secs(3),
            freshness: Duration::from_secs(60),
            swr: Duration::from_secs(30),
            sie: Duration::from_secs(600),
            revalidate_when_stale: true,
            tags: vec!["product-1".into(), "home".into()],
            soft_purged: true,
            vary: vec![header::ACCEPT_ENCODING],
            secondary_key: "accept-encoding:gzip".into(),
            generation: 42,
        }
    }

    #[test]
    fn round_trips_through_foyer_code() {
        let entry = sample();
        let mut buf = Vec::new();
        entry.encode(&mut buf).unwrap();
        assert_eq!(buf.len(), entry.estimated_size());
        let back = Entry::decode(&mut &buf[..]).unwrap();
        assert_eq!(back, entry);

        let empty = Entry {
            headers: HeaderMap::new(),
            body: Bytes::new(),
            tags: vec![],
            vary: vec![],
            secondary_key: String::new(),
            kind: EntryKind::VaryMarker,
            ..sample()
        };
        let buf = empty.encode_to_vec().unwrap();
        assert_eq!(Entry::decode_bytes(Bytes::from(buf)).unwrap(), empty);
    }

    #[test]
    fn any_flipped_byte_is_refused() {
        let buf = sample().encode_to_vec().unwrap();
        for i in 0..buf.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = buf.clone();
                bad[i] ^= bit;
                assert!(
                    Entry::decode_bytes(Bytes::from(bad)).is_err(),
                    "byte {i} bit {bit:#x}"
                );
            }
        }
    }

    #[test]
    fn refusal_reasons_table() {
        let good = sample().encode_to_vec().unwrap();
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = good.clone();
            f(&mut b);
            Entry::decode_bytes(Bytes::from(b)).unwrap_err()
        };
        let reseal = |b: &mut Vec<u8>| {
            let n = b.len() - CHECKSUM_LEN;
            let crc = crc32fast::hash(&b[..n]);
            b[n..].copy_from_slice(&crc.to_le_bytes());
        };
        let table: Vec<(EntryError, EntryError)> = vec![
            (with(&|b| b[0] = b'X'), EntryError::BadMagic),
            (with(&|b| b[4] = 9), EntryError::Version(9)),
            (with(&|b| b[20] ^= 1), EntryError::Checksum),
            (with(&|b| b.truncate(3)), EntryError::BadMagic),
            (with(&|b| b.truncate(30)), EntryError::Length),
            (with(&|b| b.truncate(b.len() - 1)), EntryError::Checksum),
            (
                with(&|b| {
                    b[5] = 7;
                    reseal(b);
                }),
                EntryError::Invalid("kind"),
            ),
            (
                with(&|b| {
                    b[7] = 0;
                    b[8] = 0;
                    reseal(b);
                }),
                EntryError::Invalid("status"),
            ),
            (
                with(&|b| {
                    // One byte more after the body, resealed: lengths no longer add up.
                    let n = b.len() - CHECKSUM_LEN;
                    b.insert(n, 0);
                    reseal(b);
                }),
                EntryError::Length,
            ),
        ];
        for (i, (got, expected)) in table.into_iter().enumerate() {
            assert_eq!(got, expected, "row {i}");
        }
        assert_eq!(
            EntryError::Checksum.into_foyer().kind(),
            foyer::ErrorKind::ChecksumMismatch
        );
        assert_eq!(
            EntryError::Version(2).into_foyer().kind(),
            foyer::ErrorKind::MagicMismatch
        );
    }

    #[test]
    fn from_response_computes_lifetime_tags_and_vary() {
        let mut resp = HeaderMap::new();
        resp.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("max-age=100, stale-while-revalidate=10"),
        );
        resp.insert(header::AGE, HeaderValue::from_static("5"));
        resp.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
        resp.insert(header::SET_COOKIE, HeaderValue::from_static("a=b"));
        resp.insert(SURROGATE_KEY, HeaderValue::from_static("a b  a"));
        resp.insert("cache-tag", HeaderValue::from_static("c,b"));
        let mut req = HeaderMap::new();
        req.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let d = response_directives(&resp, &[]);
        let entry = Entry::from_response(
            Received {
                status: StatusCode::OK,
                headers: resp,
                body: Bytes::from_static(b"x"),
                request_headers: &req,
                request_time: t0,
                response_time: t0 + Duration::from_secs(1),
            },
            &d,
            &Overrides::default(),
            Duration::from_secs(86_400),
        )
        .unwrap();
        assert_eq!(entry.freshness, Duration::from_secs(100));
        assert_eq!(entry.swr, Duration::from_secs(10));
        assert_eq!(entry.initial_age, Duration::from_secs(6));
        assert_eq!(entry.tags, ["a", "b", "c"]);
        assert_eq!(entry.vary, [header::ACCEPT_ENCODING]);
        assert_eq!(entry.secondary_key, "accept-encoding:gzip");
        assert!(!entry.headers.contains_key(header::SET_COOKIE));

        let at = |s: u64| t0 + Duration::from_secs(1 + s);
        assert_eq!(entry.ttl_at(at(0)), 94);
        assert_eq!(entry.staleness_at(at(93)), Staleness::Fresh);
        assert_eq!(entry.staleness_at(at(95)), Staleness::StaleWhileRevalidate);
        assert_eq!(entry.staleness_at(at(104)), Staleness::Expired);
        assert_eq!(entry.ttl_at(at(100)), -6);

        let purged = Entry {
            soft_purged: true,
            ..entry
        };
        assert_eq!(purged.staleness_at(at(0)), Staleness::StaleWhileRevalidate);
        assert_eq!(purged.staleness_at(at(5)), Staleness::Expired);
    }
}
