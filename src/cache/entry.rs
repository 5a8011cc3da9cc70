//! The stored value of the cache and its binary encoding.
//!
//! An [`Entry`] holds a response (status, fields, body) with what the cache
//! needs to judge it later without re-parsing its fields: when it was
//! fetched, its corrected initial age, freshness lifetime and stale windows,
//! purge tags, and its `Vary` names and secondary key.
//!
//! In memory an entry is two allocations besides its small fixed part: the
//! body, of exactly its length, and one block holding the encoded fields,
//! tags, `Vary` names and secondary key. A response is collected straight
//! into the body's buffer, so storing it copies the body once, from the
//! origin's read buffers. The same bytes are what the disk tier writes.
//! (Kept apart, a body of a round size such as 16 KiB fills an allocator
//! size class exactly, where the fields appended to it would push it into
//! the next class.)
//!
//! Entries are shared as `Arc<Entry>`, and the fixed part is kept to 96
//! bytes so that the `Arc` fits a 112-byte allocation. The body and the
//! block are plain boxed slices, not reference-counted buffers: a hit hands
//! them out as [`Bytes`] that own a clone of the `Arc` ([`Entry::body`],
//! [`Entry::fields`]), so nothing is copied and no stored entry carries
//! reference counts of its own.
//!
//! Encoding on disk (all integers little-endian): magic `PTCE`, format
//! version, kind, flags, status, times and durations in milliseconds,
//! generation, body length, then the body and the block, and a trailing
//! CRC-32 of everything before it. The block holds the fields (a count,
//! then each name as one byte for a common name or 0, a 16-bit length and
//! the name, and each value with a 32-bit length), the tags (a count, each
//! with a 32-bit length), the `Vary` names (a count, each with a 16-bit
//! length) and the secondary key (a 32-bit length). Decoding verifies magic,
//! version and checksum before reading anything else and fails on any
//! inconsistency: a partially valid entry is never produced.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::control::{
    classify, corrected_initial_age, current_age, freshness_lifetime, secondary_key, stale_windows,
    strip_for_storage, vary_names, Lifetime, NotStorable, Overrides, ResponseDirectives, Staleness,
};

/// Magic bytes at the start of every encoded entry.
pub const MAGIC: [u8; 4] = *b"PTCE";
/// Current encoding version; entries of other versions are refused.
pub const FORMAT_VERSION: u8 = 4;

const FLAG_SOFT_PURGED: u8 = 1;
const FLAG_REVALIDATE: u8 = 2;
const FLAG_SHARED_MAX_AGE: u8 = 4;
/// magic, version, kind, flags, status, 6 u64 fields, body length.
const FIXED_LEN: usize = 4 + 1 + 1 + 1 + 2 + 7 * 8;
const CHECKSUM_LEN: usize = 4;

/// Field names stored as one byte (their position plus one): the ones most
/// responses carry. Others are stored by name.
static COMMON_NAMES: [HeaderName; 31] = [
    header::ACCEPT_RANGES,
    header::ACCESS_CONTROL_ALLOW_ORIGIN,
    header::AGE,
    header::ALT_SVC,
    header::CACHE_CONTROL,
    header::CONTENT_DISPOSITION,
    header::CONTENT_ENCODING,
    header::CONTENT_LANGUAGE,
    header::CONTENT_LENGTH,
    header::CONTENT_LOCATION,
    header::CONTENT_RANGE,
    header::CONTENT_SECURITY_POLICY,
    header::CONTENT_TYPE,
    header::DATE,
    header::ETAG,
    header::EXPIRES,
    header::LAST_MODIFIED,
    header::LINK,
    header::LOCATION,
    header::PRAGMA,
    header::REFERRER_POLICY,
    header::SERVER,
    header::STRICT_TRANSPORT_SECURITY,
    header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
    header::VARY,
    header::VIA,
    header::WARNING,
    header::X_CONTENT_TYPE_OPTIONS,
    header::X_FRAME_OPTIONS,
    header::X_XSS_PROTECTION,
    header::ACCESS_CONTROL_EXPOSE_HEADERS,
];

/// What an entry stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A stored response.
    Response,
    /// Stored under a primary key whose responses vary: names the `Vary`
    /// fields and the generation of the variants (see the store).
    VaryMarker,
}

/// Where the last sections of an entry's block start. The field count is
/// the block's first four bytes and the tags follow the fields: both are
/// read from the block, so that the entry stays small.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    vary: u32,
    secondary_key: u32,
}

/// A stored response and the facts that decide its reuse.
///
/// Durations are kept in milliseconds, as on disk: that keeps the entry
/// small (see the module doc).
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Response or vary marker.
    pub kind: EntryKind,
    /// Response status.
    pub status: StatusCode,
    /// When the response arrived, Unix milliseconds.
    pub response_time_ms: u64,
    /// Corrected initial age (RFC 9111 section 4.2.3), milliseconds.
    initial_age_ms: u64,
    /// Freshness lifetime (RFC 9111 section 4.2.1), milliseconds.
    freshness_ms: u64,
    /// stale-while-revalidate window (RFC 5861 section 3), milliseconds.
    swr_ms: u64,
    /// stale-if-error window (RFC 5861 section 4), milliseconds.
    sie_ms: u64,
    /// Stale copies need validation (`must-revalidate` and the like).
    pub revalidate_when_stale: bool,
    /// The freshness came from `s-maxage`: a client's `max-stale` does not
    /// apply (RFC 9111 section 5.2.2.10).
    pub shared_max_age: bool,
    /// Marked stale by a soft purge: served only as stale.
    pub soft_purged: bool,
    /// Variant generation (see the store); 0 when unused.
    pub generation: u64,
    /// The fields include `ETag` or `Last-Modified` (beside the layout, so
    /// that the entry packs into fewer bytes).
    has_validator: bool,
    /// The body.
    body: Box<[u8]>,
    /// The encoded fields, tags, vary names and secondary key.
    block: Box<[u8]>,
    layout: Layout,
}

/// The body of a shared entry, as the owner of a [`Bytes`].
struct BodyOf(Arc<Entry>);

impl AsRef<[u8]> for BodyOf {
    fn as_ref(&self) -> &[u8] {
        &self.0.body
    }
}

/// The block of a shared entry, as the owner of a [`Bytes`].
struct BlockOf(Arc<Entry>);

impl AsRef<[u8]> for BlockOf {
    fn as_ref(&self) -> &[u8] {
        &self.0.block
    }
}

/// The variable part of a new entry, for [`Entry::new`].
#[derive(Debug)]
pub struct Content<'a> {
    /// Response fields, stored as given.
    pub headers: &'a HeaderMap,
    /// The body; best collected with exactly its length as capacity, or it
    /// is moved once more to shed the spare room.
    pub body: Vec<u8>,
    /// Purge tags.
    pub tags: &'a [String],
    /// `Vary` names, lowercase and sorted.
    pub vary: &'a [HeaderName],
    /// The secondary key of the request that fetched it.
    pub secondary_key: &'a str,
}

/// A response as received from the origin, for [`Entry::from_response`].
#[derive(Debug)]
pub struct Received<'a> {
    /// Response status.
    pub status: StatusCode,
    /// Response fields.
    pub headers: HeaderMap,
    /// Response body (see [`Content::body`] about its capacity).
    pub body: Vec<u8>,
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

fn encoded_name_len(name: &HeaderName) -> usize {
    if COMMON_NAMES.contains(name) {
        1
    } else {
        1 + 2 + name.as_str().len()
    }
}

fn put_u16(out: &mut Vec<u8>, n: usize) {
    let n = u16::try_from(n).expect("checked by the caller");
    out.extend_from_slice(&n.to_le_bytes());
}

fn put_u32(out: &mut Vec<u8>, n: usize) {
    let n = u32::try_from(n).expect("checked by the caller");
    out.extend_from_slice(&n.to_le_bytes());
}

/// Encodes the fields, tags, vary names and secondary key into one block,
/// and makes the entry of the body and the block; every other fact starts at
/// zero.
fn assemble(
    kind: EntryKind,
    status: StatusCode,
    content: Content<'_>,
) -> Result<Entry, EntryError> {
    let Content {
        headers,
        mut body,
        tags,
        vary,
        secondary_key,
    } = content;
    let invalid = || EntryError::Invalid("length");
    let mut len = 4 + 4 + 4 + 4 + secondary_key.len();
    for (name, value) in headers {
        if name.as_str().len() > usize::from(u16::MAX) {
            return Err(invalid());
        }
        len += encoded_name_len(name) + 4 + value.len();
    }
    for tag in tags {
        len += 4 + tag.len();
    }
    for name in vary {
        if name.as_str().len() > usize::from(u16::MAX) {
            return Err(invalid());
        }
        len += 2 + name.as_str().len();
    }
    if u32::try_from(len).is_err() {
        return Err(invalid());
    }
    let mut block = Vec::with_capacity(len);
    put_u32(&mut block, headers.len());
    let mut has_validator = false;
    for (name, value) in headers {
        has_validator |= name == header::ETAG || name == header::LAST_MODIFIED;
        match COMMON_NAMES.iter().position(|n| n == name) {
            Some(i) => block.push(u8::try_from(i + 1).expect("a short table")),
            None => {
                block.push(0);
                put_u16(&mut block, name.as_str().len());
                block.extend_from_slice(name.as_str().as_bytes());
            }
        }
        put_u32(&mut block, value.len());
        block.extend_from_slice(value.as_bytes());
    }
    let tags_at = block.len();
    put_u32(&mut block, tags.len());
    for tag in tags {
        put_u32(&mut block, tag.len());
        block.extend_from_slice(tag.as_bytes());
    }
    let vary_at = block.len();
    put_u32(&mut block, vary.len());
    for name in vary {
        put_u16(&mut block, name.as_str().len());
        block.extend_from_slice(name.as_str().as_bytes());
    }
    let key_at = block.len();
    put_u32(&mut block, secondary_key.len());
    block.extend_from_slice(secondary_key.as_bytes());
    debug_assert_eq!(block.len(), len);
    // Kept for as long as the entry lives: no spare capacity (a no-op when
    // the body was collected into a buffer of exactly its length).
    body.shrink_to_fit();
    let at = |n: usize| u32::try_from(n).expect("checked above");
    debug_assert_eq!(tags_at, fields_end(&block));
    let layout = Layout {
        vary: at(vary_at),
        secondary_key: at(key_at),
    };
    Ok(Entry {
        kind,
        status,
        response_time_ms: 0,
        initial_age_ms: 0,
        freshness_ms: 0,
        swr_ms: 0,
        sie_ms: 0,
        revalidate_when_stale: false,
        shared_max_age: false,
        soft_purged: false,
        generation: 0,
        has_validator,
        body: body.into_boxed_slice(),
        block: block.into_boxed_slice(),
        layout,
    })
}

/// Where the fields of a well-formed block end (and its tags start).
fn fields_end(block: &[u8]) -> usize {
    let mut r = Reader {
        data: block,
        pos: 0,
        end: block.len(),
    };
    let count = r.u32().unwrap_or(0);
    // Checked when the entry was made or read: the names are skipped, not
    // parsed.
    let mut skip = || -> Result<(), EntryError> {
        if r.u8()? == 0 {
            let len = r.u16()?;
            r.take(len)?;
        }
        let len = r.u32()?;
        r.take(len)?;
        Ok(())
    };
    for _ in 0..count {
        if skip().is_err() {
            break;
        }
    }
    r.pos
}

/// Whether `bytes` may be a field value (what `HeaderValue` accepts:
/// visible characters, spaces, tabs and obs-text).
fn valid_value(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

/// Checks every section of a block read back from disk and finds where
/// they start.
fn parse_layout(data: &[u8]) -> Result<(Layout, bool), EntryError> {
    if u32::try_from(data.len()).is_err() {
        return Err(EntryError::Length);
    }
    let mut r = Reader {
        data,
        pos: 0,
        end: data.len(),
    };
    let field_count = r.u32()?;
    let mut has_validator = false;
    for _ in 0..field_count {
        let name = r.name()?;
        has_validator |= name == header::ETAG || name == header::LAST_MODIFIED;
        let len = r.u32()?;
        let start = r.pos;
        r.take(len)?;
        if !valid_value(&data[start..r.pos]) {
            return Err(EntryError::Invalid("header value"));
        }
    }
    let tags = r.pos;
    for _ in 0..r.u32()? {
        let len = r.u32()?;
        std::str::from_utf8(r.take(len)?).map_err(|_| EntryError::Invalid("tag"))?;
    }
    let vary = r.pos;
    for _ in 0..r.u32()? {
        let len = r.u16()?;
        HeaderName::from_bytes(r.take(len)?).map_err(|_| EntryError::Invalid("vary"))?;
    }
    let secondary_key = r.pos;
    let len = r.u32()?;
    std::str::from_utf8(r.take(len)?).map_err(|_| EntryError::Invalid("secondary key"))?;
    if r.pos != r.end {
        return Err(EntryError::Length);
    }
    let at = |n: usize| u32::try_from(n).map_err(|_| EntryError::Length);
    debug_assert_eq!(tags, fields_end(data));
    let layout = Layout {
        vary: at(vary)?,
        secondary_key: at(secondary_key)?,
    };
    Ok((layout, has_validator))
}

/// The fields of an entry, in their stored order.
#[derive(Debug, Clone)]
pub struct Fields<'a> {
    reader: Reader<'a>,
    /// The block as shared bytes, sliced for each value; `None` copies
    /// each value instead.
    owner: Option<Bytes>,
    left: usize,
}

impl Iterator for Fields<'_> {
    type Item = (HeaderName, HeaderValue);

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        // Checked when the entry was made or read: these cannot fail.
        let name = self.reader.name().ok()?;
        let len = self.reader.u32().ok()?;
        let start = self.reader.pos;
        self.reader.take(len).ok()?;
        let value = match &self.owner {
            Some(owner) => HeaderValue::from_maybe_shared(owner.slice(start..self.reader.pos)),
            None => HeaderValue::from_bytes(&self.reader.data[start..self.reader.pos]),
        };
        Some((name, value.ok()?))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl Entry {
    /// A new entry of `kind` and `status` holding `content`; every other
    /// fact starts at zero.
    pub fn new(
        kind: EntryKind,
        status: StatusCode,
        content: Content<'_>,
    ) -> Result<Entry, EntryError> {
        assemble(kind, status, content)
    }

    /// Builds the entry for a response that [`super::control::storable`]
    /// accepted: computes its age, freshness, windows, tags and secondary
    /// key, dates it when it has no `Date`, and strips `Set-Cookie`.
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
        let secondary = secondary_key(&vary, request_headers);
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
        // RFC 9110 section 6.6.1: a cache that stores a response without a
        // `Date` adds one, the time it was received (which also stood in for
        // it above); otherwise each hit would be dated when it is served,
        // and seem younger to a client than its `Age` says.
        if !headers.contains_key(header::DATE) {
            let secs = response_time
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            if let Ok(date) = HeaderValue::from_str(&crate::upstream::static_files::http_date(secs))
            {
                headers.insert(header::DATE, date);
            }
        }
        strip_for_storage(&mut headers);
        let tags = purge_tags(&headers);
        let content = Content {
            headers: &headers,
            body,
            tags: &tags,
            vary: &vary,
            secondary_key: &secondary,
        };
        let mut entry =
            Entry::new(EntryKind::Response, status, content).map_err(|_| NotStorable::TooLarge)?;
        entry.response_time_ms = unix_millis(response_time);
        entry.set_windows(initial_age, freshness, swr, sie);
        entry.revalidate_when_stale =
            directives.revalidate_when_stale() && !overrides.ignore_origin;
        entry.shared_max_age =
            directives.s_maxage.is_some() && !overrides.ignore_origin && !overrides.force_ttl;
        Ok(entry)
    }

    /// The vary marker for the variants of `entry`'s primary key, of
    /// `generation`: names their `Vary` fields and lives as long as `entry`.
    pub fn vary_marker(entry: &Entry, generation: u64) -> Entry {
        let vary = entry.vary();
        let content = Content {
            headers: &HeaderMap::new(),
            body: Vec::new(),
            tags: &[],
            vary: &vary,
            secondary_key: "",
        };
        let mut marker = Entry::new(EntryKind::VaryMarker, entry.status, content)
            .expect("names that fitted in the entry fit in the marker");
        marker.response_time_ms = entry.response_time_ms;
        marker.initial_age_ms = entry.initial_age_ms;
        marker.freshness_ms = entry.freshness_ms;
        marker.swr_ms = entry.swr_ms;
        marker.sie_ms = entry.sie_ms;
        marker.generation = generation;
        marker
    }

    /// Sets the corrected initial age, the freshness lifetime and the
    /// stale-while-revalidate and stale-if-error windows (kept to the
    /// millisecond).
    pub fn set_windows(
        &mut self,
        initial_age: Duration,
        freshness: Duration,
        swr: Duration,
        sie: Duration,
    ) {
        self.initial_age_ms = millis(initial_age);
        self.freshness_ms = millis(freshness);
        self.swr_ms = millis(swr);
        self.sie_ms = millis(sie);
    }

    /// The corrected initial age (RFC 9111 section 4.2.3).
    pub fn initial_age(&self) -> Duration {
        Duration::from_millis(self.initial_age_ms)
    }

    /// The body, sharing the entry: the [`Bytes`] keeps it alive.
    pub fn body(self: &Arc<Self>) -> Bytes {
        Bytes::from_owner(BodyOf(Arc::clone(self)))
    }

    /// The body, borrowed.
    pub fn body_slice(&self) -> &[u8] {
        &self.body
    }

    /// Length of the body in bytes.
    pub fn body_len(&self) -> usize {
        self.body.len()
    }

    /// The section of the block from `start` to `end`.
    fn section(&self, start: u32, end: u32) -> Reader<'_> {
        Reader {
            data: &self.block,
            pos: start as usize,
            end: end as usize,
        }
    }

    /// The stored fields; values share the entry (one [`Bytes`] owning a
    /// clone of the `Arc`, sliced for each value).
    pub fn fields(self: &Arc<Self>) -> Fields<'_> {
        Fields {
            reader: self.section(4, self.layout.vary),
            owner: Some(Bytes::from_owner(BlockOf(Arc::clone(self)))),
            left: self.field_count(),
        }
    }

    /// The stored fields, each value copied: for entries not shared yet,
    /// and for uses off the hit path.
    pub fn fields_copied(&self) -> Fields<'_> {
        Fields {
            reader: self.section(4, self.layout.vary),
            owner: None,
            left: self.field_count(),
        }
    }

    /// How many fields are stored.
    pub fn field_count(&self) -> usize {
        let count: [u8; 4] = self.block[..4].try_into().expect("a block has a count");
        u32::from_le_bytes(count) as usize
    }

    /// The stored fields as a map, values copied.
    pub fn headers(&self) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.field_count());
        for (name, value) in self.fields_copied() {
            map.append(name, value);
        }
        map
    }

    /// Whether the fields hold a validator (`ETag` or `Last-Modified`).
    pub fn has_validator(&self) -> bool {
        self.has_validator
    }

    /// Purge tags from `Surrogate-Key` and `Cache-Tag`.
    pub fn tags(&self) -> impl Iterator<Item = &str> + '_ {
        let mut r = self.section(fields_end(&self.block) as u32, self.layout.vary);
        let count = r.u32().unwrap_or(0);
        (0..count).map_while(move |_| {
            let len = r.u32().ok()?;
            std::str::from_utf8(r.take(len).ok()?).ok()
        })
    }

    /// The `Vary` names of the response, lowercase and sorted.
    pub fn vary(&self) -> Vec<HeaderName> {
        self.vary_names()
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            .collect()
    }

    /// The `Vary` names as stored text, without parsing them (checked when
    /// the entry was made or read).
    pub fn vary_names(&self) -> impl Iterator<Item = &str> + '_ {
        let mut r = self.section(self.layout.vary, self.layout.secondary_key);
        let count = r.u32().unwrap_or(0);
        (0..count).map_while(move |_| {
            let len = r.u16().ok()?;
            std::str::from_utf8(r.take(len).ok()?).ok()
        })
    }

    /// Whether the response has no `Vary` names.
    pub fn vary_is_empty(&self) -> bool {
        self.layout.secondary_key - self.layout.vary == 4
    }

    /// Whether two entries name the same `Vary` fields.
    pub fn same_vary(&self, other: &Entry) -> bool {
        self.vary_section() == other.vary_section()
    }

    fn vary_section(&self) -> &[u8] {
        &self.block[self.layout.vary as usize..self.layout.secondary_key as usize]
    }

    /// The secondary key of the request that fetched it.
    pub fn secondary_key(&self) -> &str {
        let bytes = &self.block[self.layout.secondary_key as usize + 4..];
        std::str::from_utf8(bytes).unwrap_or_default()
    }

    /// Whether this response may answer `request`: it varies on nothing, or
    /// the request's secondary key is the one it was fetched for (RFC 9111
    /// section 4.1). A response handed over by a request that coalesced
    /// with this one passes this check before it is served.
    pub fn serves(&self, request: &HeaderMap) -> bool {
        self.vary_is_empty()
            || super::control::secondary_key_of(self.vary_names(), request) == self.secondary_key()
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
                Duration::from_millis(self.freshness_ms)
            },
            swr: Duration::from_millis(self.swr_ms),
            sie: Duration::from_millis(self.sie_ms),
            revalidate_when_stale: self.revalidate_when_stale,
            refuses_max_stale: self.shared_max_age,
        }
    }

    /// Current age at `now` (RFC 9111 section 4.2.3).
    pub fn age_at(&self, now: SystemTime) -> Duration {
        current_age(self.initial_age(), self.response_time(), now)
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
        FIXED_LEN + self.body.len() + self.block.len() + CHECKSUM_LEN
    }

    /// The fixed part of the encoding.
    fn fixed(&self) -> [u8; FIXED_LEN] {
        let mut out = [0u8; FIXED_LEN];
        out[..4].copy_from_slice(&MAGIC);
        out[4] = FORMAT_VERSION;
        out[5] = match self.kind {
            EntryKind::Response => 0,
            EntryKind::VaryMarker => 1,
        };
        let mut flags = 0;
        if self.soft_purged {
            flags |= FLAG_SOFT_PURGED;
        }
        if self.revalidate_when_stale {
            flags |= FLAG_REVALIDATE;
        }
        if self.shared_max_age {
            flags |= FLAG_SHARED_MAX_AGE;
        }
        out[6] = flags;
        out[7..9].copy_from_slice(&self.status.as_u16().to_le_bytes());
        let numbers = [
            self.response_time_ms,
            self.initial_age_ms,
            self.freshness_ms,
            self.swr_ms,
            self.sie_ms,
            self.generation,
            self.body.len() as u64,
        ];
        for (i, n) in numbers.iter().enumerate() {
            out[9 + 8 * i..17 + 8 * i].copy_from_slice(&n.to_le_bytes());
        }
        out
    }

    /// Writes the encoding: the fixed part, the body, the block and the
    /// checksum, without assembling them anywhere first.
    pub fn encode_into(&self, writer: &mut impl Write) -> std::io::Result<()> {
        let fixed = self.fixed();
        let mut checksum = crc32fast::Hasher::new();
        checksum.update(&fixed);
        checksum.update(&self.body);
        checksum.update(&self.block);
        writer.write_all(&fixed)?;
        writer.write_all(&self.body)?;
        writer.write_all(&self.block)?;
        writer.write_all(&checksum.finalize().to_le_bytes())
    }

    /// Encodes the entry into a new buffer.
    pub fn encode_to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut out)
            .expect("writing to a vector does not fail");
        out
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
            end: FIXED_LEN,
        };
        let kind = match r.u8()? {
            0 => EntryKind::Response,
            1 => EntryKind::VaryMarker,
            _ => return Err(EntryError::Invalid("kind")),
        };
        let flags = r.u8()?;
        if flags & !(FLAG_SOFT_PURGED | FLAG_REVALIDATE | FLAG_SHARED_MAX_AGE) != 0 {
            return Err(EntryError::Invalid("flags"));
        }
        let status = StatusCode::from_u16(u16::from_le_bytes(r.array()?))
            .map_err(|_| EntryError::Invalid("status"))?;
        let response_time_ms = r.u64()?;
        let initial_age_ms = r.u64()?;
        let freshness_ms = r.u64()?;
        let swr_ms = r.u64()?;
        let sie_ms = r.u64()?;
        let generation = r.u64()?;
        let body_len = usize::try_from(r.u64()?).map_err(|_| EntryError::Length)?;
        let end = data.len() - CHECKSUM_LEN;
        if body_len > end - FIXED_LEN {
            return Err(EntryError::Length);
        }
        // Copied out of the read buffer, each at its exact size: an entry
        // read from disk then costs in memory what a fresh one does.
        let block: Box<[u8]> = data[FIXED_LEN + body_len..end].into();
        let (layout, has_validator) = parse_layout(&block)?;
        let body: Box<[u8]> = data[FIXED_LEN..FIXED_LEN + body_len].into();
        Ok(Entry {
            kind,
            status,
            response_time_ms,
            initial_age_ms,
            freshness_ms,
            swr_ms,
            sie_ms,
            revalidate_when_stale: flags & FLAG_REVALIDATE != 0,
            shared_max_age: flags & FLAG_SHARED_MAX_AGE != 0,
            soft_purged: flags & FLAG_SOFT_PURGED != 0,
            generation,
            has_validator,
            body,
            block,
            layout,
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
        self.encode_into(writer).map_err(foyer::Error::io_error)
    }

    fn decode(reader: &mut impl Read) -> foyer::Result<Self> {
        let mut buf = Vec::new();
        reader
            .read_to_end(&mut buf)
            .map_err(foyer::Error::io_error)?;
        // Body and block are copied out at their exact sizes; this buffer
        // is dropped.
        Entry::decode_bytes(Bytes::from(buf)).map_err(EntryError::into_foyer)
    }

    fn estimated_size(&self) -> usize {
        self.encoded_len()
    }
}

#[derive(Debug, Clone)]
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

    /// A field name: one byte for a common name, or 0 and the name.
    fn name(&mut self) -> Result<HeaderName, EntryError> {
        match self.u8()? {
            0 => {
                let len = self.u16()?;
                HeaderName::from_bytes(self.take(len)?)
                    .map_err(|_| EntryError::Invalid("header name"))
            }
            i => COMMON_NAMES
                .get(usize::from(i) - 1)
                .cloned()
                .ok_or(EntryError::Invalid("header name")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::control::response_directives;
    use foyer::Code;

    #[test]
    fn stored_fields_keep_nothing_of_the_read_buffer() {
        // As hyper hands them over: values sliced out of one large buffer.
        let buffer = Bytes::from(vec![b'v'; 64 * 1024]);
        let mut received = HeaderMap::new();
        let value = |range| HeaderValue::from_maybe_shared(buffer.slice(range)).unwrap();
        received.insert(header::CONTENT_TYPE, value(0..9));
        received.append("x-multi", value(10..12));
        received.append("x-multi", value(20..21));
        let content = Content {
            headers: &received,
            body: b"body".to_vec(),
            tags: &[],
            vary: &[],
            secondary_key: "",
        };
        let entry = Arc::new(Entry::new(EntryKind::Response, StatusCode::OK, content).unwrap());
        assert_eq!(entry.headers(), received);
        assert_eq!(
            entry
                .headers()
                .get_all("x-multi")
                .iter()
                .collect::<Vec<_>>(),
            ["vv", "v"]
        );
        drop(received);
        assert!(
            buffer.is_unique(),
            "the stored fields still reference the read buffer"
        );
    }

    fn sample() -> Entry {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
        headers.append("x-multi", HeaderValue::from_static("1"));
        headers.append("x-multi", HeaderValue::from_static("2"));
        headers.insert(header::ETAG, HeaderValue::from_static("\"v1\""));
        let content = Content {
            headers: &headers,
            body: b"<h1>hello</h1>".to_vec(),
            tags: &["product-1".into(), "home".into()],
            vary: &[header::ACCEPT_ENCODING],
            secondary_key: "accept-encoding:gzip",
        };
        let mut entry = Entry::new(EntryKind::Response, StatusCode::OK, content).unwrap();
        entry.response_time_ms = 1_700_000_000_250;
        entry.set_windows(
            Duration::from_secs(3),
            Duration::from_secs(60),
            Duration::from_secs(30),
            Duration::from_secs(600),
        );
        entry.revalidate_when_stale = true;
        entry.soft_purged = true;
        entry.generation = 42;
        entry
    }

    #[test]
    fn a_shared_entry_fits_a_112_byte_allocation() {
        // An `Arc` adds its two counts, 16 bytes, to the entry; 112 bytes is
        // one of jemalloc's size classes.
        let size = std::mem::size_of::<Entry>();
        assert!(size + 16 <= 112, "Entry is {size} bytes");
    }

    #[test]
    fn a_shared_entry_hands_out_body_and_fields_without_copying() {
        let entry = Arc::new(sample());
        let body = entry.body();
        assert_eq!(body.as_ptr(), entry.body_slice().as_ptr());
        let fields: Vec<(HeaderName, HeaderValue)> = entry.fields().collect();
        let block = entry.block.as_ptr_range();
        assert!(fields
            .iter()
            .all(|(_, v)| block.contains(&v.as_bytes().as_ptr())));
        // The body and the values keep the entry alive, not copies of it.
        assert_eq!(Arc::strong_count(&entry), 3);
        drop(body);
        drop(fields);
        assert_eq!(Arc::strong_count(&entry), 1);
    }

    #[test]
    fn the_sections_read_back_as_stored() {
        let entry = Arc::new(sample());
        assert_eq!(&entry.body()[..], b"<h1>hello</h1>");
        assert_eq!(entry.body_len(), 14);
        let fields: Vec<(HeaderName, HeaderValue)> = entry.fields().collect();
        assert_eq!(entry.field_count(), 4);
        assert_eq!(
            fields
                .iter()
                .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap()))
                .collect::<Vec<_>>(),
            [
                "content-type: text/html",
                "x-multi: 1",
                "x-multi: 2",
                "etag: \"v1\""
            ]
        );
        assert!(entry.has_validator());
        assert_eq!(entry.tags().collect::<Vec<_>>(), ["product-1", "home"]);
        assert_eq!(entry.vary(), [header::ACCEPT_ENCODING]);
        assert_eq!(entry.vary_names().collect::<Vec<_>>(), ["accept-encoding"]);
        assert!(!entry.vary_is_empty());
        assert_eq!(entry.secondary_key(), "accept-encoding:gzip");
        // The body is shared, not copied, each time it is asked for.
        assert_eq!(entry.body().as_ptr(), entry.body().as_ptr());

        let marker = Entry::vary_marker(&entry, 7);
        assert_eq!(marker.kind, EntryKind::VaryMarker);
        assert!(marker.same_vary(&entry));
        assert_eq!(marker.generation, 7);
        assert_eq!(marker.body_len(), 0);
        assert!(!marker.has_validator());
        assert_eq!(marker.freshness_ms, entry.freshness_ms);

        let plain = Entry::new(
            EntryKind::Response,
            StatusCode::OK,
            Content {
                headers: &HeaderMap::new(),
                body: Vec::with_capacity(4096),
                tags: &[],
                vary: &[],
                secondary_key: "",
            },
        )
        .unwrap();
        assert!(plain.vary_is_empty());
        assert!(!plain.same_vary(&entry));
        assert_eq!(plain.fields_copied().count(), 0);
        assert_eq!(plain.tags().count(), 0);
    }

    #[test]
    fn round_trips_through_foyer_code() {
        let entry = sample();
        let mut buf = Vec::new();
        entry.encode(&mut buf).unwrap();
        assert_eq!(buf.len(), entry.estimated_size());
        let back = Entry::decode(&mut &buf[..]).unwrap();
        assert_eq!(back, entry);
        assert_eq!(back.headers(), entry.headers());

        let empty = Entry::new(
            EntryKind::VaryMarker,
            StatusCode::OK,
            Content {
                headers: &HeaderMap::new(),
                body: Vec::new(),
                tags: &[],
                vary: &[],
                secondary_key: "",
            },
        )
        .unwrap();
        let buf = empty.encode_to_vec();
        assert_eq!(Entry::decode_bytes(Bytes::from(buf)).unwrap(), empty);
    }

    #[test]
    fn any_flipped_byte_is_refused() {
        let buf = sample().encode_to_vec();
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
        let good = sample().encode_to_vec();
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
        let body_len_at = FIXED_LEN - 8;
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
                    // One byte more at the end, resealed: lengths no longer add up.
                    let n = b.len() - CHECKSUM_LEN;
                    b.insert(n, 0);
                    reseal(b);
                }),
                EntryError::Length,
            ),
            (
                with(&|b| {
                    // A body longer than the whole entry.
                    b[body_len_at..body_len_at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
                    reseal(b);
                }),
                EntryError::Length,
            ),
            (
                with(&|b| {
                    // The first field's name index beyond the table.
                    let at = FIXED_LEN + 14 + 4;
                    b[at] = 200;
                    reseal(b);
                }),
                EntryError::Invalid("header name"),
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
    fn body_and_block_are_kept_at_their_exact_sizes() {
        let mut resp = HeaderMap::new();
        resp.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("max-age=60"),
        );
        resp.insert(header::VARY, HeaderValue::from_static("a,b"));
        resp.insert(SURROGATE_KEY, HeaderValue::from_static("a b c d e f"));
        resp.insert("x-custom-name", HeaderValue::from_static("value"));
        let mut body = Vec::with_capacity(4096);
        body.extend_from_slice(&[b'x'; 100]);
        let d = response_directives(&resp, &[]);
        let entry = Entry::from_response(
            Received {
                status: StatusCode::OK,
                headers: resp,
                body,
                request_headers: &HeaderMap::new(),
                request_time: UNIX_EPOCH,
                response_time: UNIX_EPOCH,
            },
            &d,
            &Overrides::default(),
            Duration::from_secs(60),
        )
        .unwrap();
        // cache-control (common: 1 byte), vary (1), surrogate-key and
        // x-custom-name (by name), the date it was given (1); six tags; two
        // vary names; key "a\nb" (the request sent neither).
        let fields =
            4 + (1 + 4 + 10) + (1 + 4 + 3) + (3 + 13 + 4 + 11) + (3 + 13 + 4 + 5) + (1 + 4 + 29);
        let tags = 4 + 6 * (4 + 1);
        let vary = 4 + 2 * (2 + 1);
        let key = 4 + "a\nb".len();
        assert_eq!(entry.secondary_key(), "a\nb");
        assert_eq!(entry.block.len(), fields + tags + vary + key);
        assert_eq!(entry.body.len(), 100);
        assert_eq!(
            entry.encoded_len(),
            FIXED_LEN + 100 + entry.block.len() + CHECKSUM_LEN
        );
        assert_eq!(entry.tags().count(), 6);
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
                body: b"x".to_vec(),
                request_headers: &req,
                request_time: t0,
                response_time: t0 + Duration::from_secs(1),
            },
            &d,
            &Overrides::default(),
            Duration::from_secs(86_400),
        )
        .unwrap();
        assert_eq!(entry.lifetime().freshness, Duration::from_secs(100));
        assert_eq!(entry.lifetime().swr, Duration::from_secs(10));
        assert_eq!(entry.initial_age(), Duration::from_secs(6));
        assert_eq!(entry.tags().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(entry.vary(), [header::ACCEPT_ENCODING]);
        assert_eq!(entry.secondary_key(), "accept-encoding:gzip");
        assert!(!entry.headers().contains_key(header::SET_COOKIE));
        assert!(!entry.has_validator());
        // Without a Date of its own, it is dated when it arrived.
        assert_eq!(
            entry.headers()[header::DATE],
            "Mon, 12 Jan 1970 13:46:41 GMT"
        );

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
