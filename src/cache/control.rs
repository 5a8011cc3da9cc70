//! HTTP caching decisions for a shared cache, as pure functions.
//!
//! Owns: parsing `Cache-Control` (RFC 9111 section 5.2) and targeted fields
//! such as `CDN-Cache-Control` (RFC 9213); whether a response may be stored
//! (RFC 9111 section 3); its freshness lifetime and age (section 4.2); whether a
//! stored response can serve a request (sections 4 and 5.2.1), including the
//! stale-while-revalidate and stale-if-error windows (RFC 5861); answering a
//! client's conditional request from the cache (RFC 9110 section 13);
//! building a revalidation request and merging a 304 (RFC 9111 section 4.3);
//! the `Cache-Status` field (RFC 9211); and the secondary key of `Vary`
//! (RFC 9111 section 4.1).
//!
//! Nothing here does I/O or reads the clock: the caller passes the times in.
//!
//! Why not the `http-cache-semantics` crate: it has no notion of
//! stale-while-revalidate or stale-if-error windows, no targeted cache-control
//! fields, no policy overrides, and it keeps its decisions behind one opaque
//! policy object, whereas Portico stores the few numbers it needs in the
//! cache entry and needs each decision separately (with a reason enum that
//! feeds `Cache-Status` and metrics).

use std::fmt::{self, Write as _};
use std::time::{Duration, SystemTime};

use http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};

use super::date::{parse_header_date, parse_http_date};

/// RFC 9111 section 1.2.2: delta-seconds beyond 2^31 are treated as 2^31.
const DELTA_SECONDS_MAX: u64 = 1 << 31;

/// Default cap of the heuristic freshness lifetime: one day.
pub const DEFAULT_HEURISTIC_MAX: Duration = Duration::from_secs(86_400);

/// Response directives of `Cache-Control` or of a targeted field (RFC 9111
/// section 5.2.2, RFC 5861, RFC 8246).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResponseDirectives {
    /// `max-age`; an invalid value reads as zero (stale).
    pub max_age: Option<Duration>,
    /// `s-maxage`; an invalid value reads as zero (stale).
    pub s_maxage: Option<Duration>,
    /// `no-store`.
    pub no_store: bool,
    /// `no-cache` (qualified forms are treated as unqualified, as allowed by
    /// RFC 9111 section 5.2.2.4).
    pub no_cache: bool,
    /// `private` (qualified forms are treated as unqualified).
    pub private: bool,
    /// `public`.
    pub public: bool,
    /// `must-revalidate`.
    pub must_revalidate: bool,
    /// `proxy-revalidate`.
    pub proxy_revalidate: bool,
    /// `stale-while-revalidate` (RFC 5861 section 3).
    pub stale_while_revalidate: Option<Duration>,
    /// `stale-if-error` (RFC 5861 section 4).
    pub stale_if_error: Option<Duration>,
    /// `immutable` (RFC 8246).
    pub immutable: bool,
    /// True when these came from a targeted field rather than
    /// `Cache-Control`; `Expires` is then ignored (RFC 9213 section 2.2).
    pub targeted: bool,
}

impl ResponseDirectives {
    /// Parses all the given field values as one list of directives.
    pub fn parse<'a>(values: impl IntoIterator<Item = &'a HeaderValue>) -> Self {
        let mut out = Self::default();
        for value in values {
            let Ok(text) = value.to_str() else { continue };
            for_each_directive(text, |name, arg| out.apply(name, arg));
        }
        out
    }

    fn apply(&mut self, name: &str, arg: Option<&str>) {
        let is = |d: &str| name.eq_ignore_ascii_case(d);
        if is("max-age") {
            keep_min(
                &mut self.max_age,
                delta_seconds(arg).unwrap_or(Duration::ZERO),
            );
        } else if is("s-maxage") {
            keep_min(
                &mut self.s_maxage,
                delta_seconds(arg).unwrap_or(Duration::ZERO),
            );
        } else if is("no-store") {
            self.no_store = true;
        } else if is("no-cache") {
            self.no_cache = true;
        } else if is("private") {
            self.private = true;
        } else if is("public") {
            self.public = true;
        } else if is("must-revalidate") {
            self.must_revalidate = true;
        } else if is("proxy-revalidate") {
            self.proxy_revalidate = true;
        } else if is("stale-while-revalidate") {
            if let Some(d) = delta_seconds(arg) {
                keep_min(&mut self.stale_while_revalidate, d);
            }
        } else if is("stale-if-error") {
            if let Some(d) = delta_seconds(arg) {
                keep_min(&mut self.stale_if_error, d);
            }
        } else if is("immutable") {
            self.immutable = true;
        }
    }

    /// True when a stale copy must not be served without validation: the
    /// response said `must-revalidate`, `proxy-revalidate` (shared caches)
    /// or `no-cache` (RFC 9111 sections 5.2.2.2, 5.2.2.4 and 5.2.2.8).
    pub fn revalidate_when_stale(&self) -> bool {
        self.must_revalidate || self.proxy_revalidate || self.no_cache
    }
}

/// Request directives of `Cache-Control` (RFC 9111 section 5.2.1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestDirectives {
    /// `max-age`: the client will not accept a response older than this.
    pub max_age: Option<Duration>,
    /// `min-fresh`: the response must stay fresh at least this long.
    pub min_fresh: Option<Duration>,
    /// `max-stale`: the client accepts this much staleness;
    /// `Duration::MAX` when given without a value.
    pub max_stale: Option<Duration>,
    /// `only-if-cached`.
    pub only_if_cached: bool,
    /// `no-cache`.
    pub no_cache: bool,
    /// `no-store`.
    pub no_store: bool,
}

impl RequestDirectives {
    /// Parses the `Cache-Control` fields of a request.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let mut out = Self::default();
        for value in headers.get_all(header::CACHE_CONTROL) {
            let Ok(text) = value.to_str() else { continue };
            for_each_directive(text, |name, arg| out.apply(name, arg));
        }
        out
    }

    fn apply(&mut self, name: &str, arg: Option<&str>) {
        let is = |d: &str| name.eq_ignore_ascii_case(d);
        if is("max-age") {
            if let Some(d) = delta_seconds(arg) {
                keep_min(&mut self.max_age, d);
            }
        } else if is("min-fresh") {
            if let Some(d) = delta_seconds(arg) {
                self.min_fresh = Some(self.min_fresh.map_or(d, |old| old.max(d)));
            }
        } else if is("max-stale") {
            let d = match arg {
                None => Duration::MAX,
                Some(_) => match delta_seconds(arg) {
                    Some(d) => d,
                    None => return,
                },
            };
            keep_min(&mut self.max_stale, d);
        } else if is("only-if-cached") {
            self.only_if_cached = true;
        } else if is("no-cache") {
            self.no_cache = true;
        } else if is("no-store") {
            self.no_store = true;
        }
    }
}

/// The directives that govern a response in a shared cache: the first of the
/// `targeted` fields (in precedence order) that is present with a non-empty
/// value replaces `Cache-Control` (RFC 9213 section 2.2).
pub fn response_directives(headers: &HeaderMap, targeted: &[HeaderName]) -> ResponseDirectives {
    for name in targeted {
        let values = headers.get_all(name);
        if values.iter().any(|v| !v.as_bytes().trim_ascii().is_empty()) {
            let mut out = ResponseDirectives::parse(values);
            out.targeted = true;
            return out;
        }
    }
    ResponseDirectives::parse(headers.get_all(header::CACHE_CONTROL))
}

fn keep_min(slot: &mut Option<Duration>, value: Duration) {
    *slot = Some(slot.map_or(value, |old| old.min(value)));
}

/// RFC 9111 section 1.2.2 delta-seconds; quoted values are tolerated.
fn delta_seconds(arg: Option<&str>) -> Option<Duration> {
    let text = arg?.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs = text.parse::<u64>().unwrap_or(DELTA_SECONDS_MAX);
    Some(Duration::from_secs(secs.min(DELTA_SECONDS_MAX)))
}

/// Calls `f(name, argument)` for each directive of a comma-separated list;
/// quoted arguments are unquoted (escapes left in place, which only matters
/// for field-name lists that this cache treats as unqualified anyway).
fn for_each_directive<'a>(text: &'a str, mut f: impl FnMut(&'a str, Option<&'a str>)) {
    let bytes = text.as_bytes();
    let len = bytes.len();
    let mut i = 0;
    while i < len {
        while i < len && matches!(bytes[i], b' ' | b'\t' | b',') {
            i += 1;
        }
        if i >= len {
            break;
        }
        let name_start = i;
        while i < len && bytes[i] != b'=' && bytes[i] != b',' {
            i += 1;
        }
        let name = text[name_start..i].trim();
        let mut arg = None;
        if i < len && bytes[i] == b'=' {
            i += 1;
            while i < len && matches!(bytes[i], b' ' | b'\t') {
                i += 1;
            }
            if i < len && bytes[i] == b'"' {
                i += 1;
                let start = i;
                while i < len && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                let end = i.min(len);
                arg = Some(&text[start..end]);
                while i < len && bytes[i] != b',' {
                    i += 1;
                }
            } else {
                let start = i;
                while i < len && bytes[i] != b',' {
                    i += 1;
                }
                arg = Some(text[start..i].trim());
            }
        }
        if !name.is_empty() {
            f(name, arg);
        }
    }
}

/// Policy decisions that override what the origin said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// A TTL from the policy. With `ignore_origin` it replaces the origin's
    /// freshness; without, it is used only when the origin gives no explicit
    /// freshness (in place of the heuristic).
    pub ttl: Option<Duration>,
    /// Ignore the origin's `no-store`, `private`, `no-cache` and freshness
    /// information. Request-side rules (method, `Authorization`, request
    /// `no-store`) and `Vary: *` still apply.
    pub ignore_origin: bool,
    /// The TTL replaces the origin's freshness (`max-age`, `Expires`,
    /// `no-cache`) even without `ignore_origin`, as a response rule's `ttl`
    /// does; the origin's `no-store` and `private` still keep the response
    /// out of the store.
    pub force_ttl: bool,
    /// Store responses carrying `Set-Cookie`; the caller must strip the field
    /// before storing (see [`strip_for_storage`]).
    pub store_set_cookie: bool,
    /// Store responses to requests with `Authorization` even when the
    /// response does not say they may be shared: the policy vouches that
    /// they are the same for every user.
    pub share_authorized: bool,
    /// stale-while-revalidate window from the policy; replaces the origin's.
    pub stale_while_revalidate: Option<Duration>,
    /// stale-if-error window from the policy; replaces the origin's.
    pub stale_if_error: Option<Duration>,
}

/// Why a response is not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStorable {
    /// The request method is not GET or HEAD.
    Method,
    /// The status is not cacheable by default and has no explicit freshness,
    /// or is never stored here (1xx, 206, 304).
    Status,
    /// The request said `no-store` (RFC 9111 section 5.2.1.5).
    RequestNoStore,
    /// The response said `no-store` (RFC 9111 section 5.2.2.5).
    NoStore,
    /// The response said `private` (RFC 9111 section 5.2.2.7).
    Private,
    /// The request had `Authorization` and the response did not allow
    /// sharing it (RFC 9111 section 3.5).
    Authorization,
    /// The response sets a cookie and no override allows storing it.
    SetCookie,
    /// `Vary: *` never matches a later request (RFC 9111 section 4.1).
    VaryStar,
    /// A field or name is longer than an entry can hold.
    TooLarge,
}

impl NotStorable {
    /// A stable short name for logs, metrics and `Cache-Status` details.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Method => "method",
            Self::Status => "status",
            Self::RequestNoStore => "request-no-store",
            Self::NoStore => "no-store",
            Self::Private => "private",
            Self::Authorization => "authorization",
            Self::SetCookie => "set-cookie",
            Self::VaryStar => "vary-star",
            Self::TooLarge => "too-large",
        }
    }
}

impl fmt::Display for NotStorable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Statuses that are heuristically cacheable (RFC 9110 section 15.1). 206 is
/// left out: this cache does not combine partial content.
pub fn heuristically_cacheable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// Decides whether a response may be stored by a shared cache (RFC 9111
/// section 3). `directives` come from [`response_directives`].
pub fn storable(
    method: &Method,
    request: &HeaderMap,
    status: StatusCode,
    response: &HeaderMap,
    directives: &ResponseDirectives,
    overrides: &Overrides,
) -> Result<(), NotStorable> {
    if method != Method::GET && method != Method::HEAD {
        return Err(NotStorable::Method);
    }
    if RequestDirectives::from_headers(request).no_store {
        return Err(NotStorable::RequestNoStore);
    }
    let code = status.as_u16();
    if code < 200 || code == 206 || code == 304 {
        return Err(NotStorable::Status);
    }
    if !overrides.ignore_origin {
        if directives.no_store {
            return Err(NotStorable::NoStore);
        }
        if directives.private {
            return Err(NotStorable::Private);
        }
    }
    let explicit = overrides.ttl.is_some()
        || (!overrides.ignore_origin
            && (directives.public
                || directives.max_age.is_some()
                || directives.s_maxage.is_some()
                || (!directives.targeted && response.contains_key(header::EXPIRES))));
    if !explicit && !heuristically_cacheable(status) {
        return Err(NotStorable::Status);
    }
    // RFC 9111 section 3.5: the origin must allow sharing an authenticated
    // response, unless the policy says such responses are shared.
    if request.contains_key(header::AUTHORIZATION)
        && !overrides.share_authorized
        && !(directives.public || directives.s_maxage.is_some() || directives.must_revalidate)
    {
        return Err(NotStorable::Authorization);
    }
    if response.contains_key(header::SET_COOKIE) && !overrides.store_set_cookie {
        return Err(NotStorable::SetCookie);
    }
    if vary_is_star(response) {
        return Err(NotStorable::VaryStar);
    }
    Ok(())
}

/// Removes what must never be stored with a shared response: `Set-Cookie`
/// (only reachable when an override allowed storing such a response), and
/// the fields of the proxy authentication of one exchange,
/// `Proxy-Authenticate` and `Proxy-Authentication-Info` (RFC 9111 section
/// 3.1).
pub fn strip_for_storage(headers: &mut HeaderMap) {
    headers.remove(header::SET_COOKIE);
    headers.remove(header::PROXY_AUTHENTICATE);
    headers.remove(PROXY_AUTHENTICATION_INFO);
}

const PROXY_AUTHENTICATION_INFO: HeaderName = HeaderName::from_static("proxy-authentication-info");

/// Freshness lifetime of a response in a shared cache (RFC 9111 section
/// 4.2.1): `s-maxage`, then `max-age`, then `Expires` minus `Date`, then the
/// policy's default TTL, then the heuristic of section 4.2.2 (10% of the time
/// since `Last-Modified`, at most `heuristic_max`) for heuristically cacheable
/// statuses and `public` responses. With `overrides.ignore_origin` and a TTL, the TTL is the answer.
///
/// `response_time` stands in for a missing `Date`.
pub fn freshness_lifetime(
    status: StatusCode,
    directives: &ResponseDirectives,
    response: &HeaderMap,
    response_time: SystemTime,
    heuristic_max: Duration,
    overrides: &Overrides,
) -> Duration {
    if overrides.ignore_origin || (overrides.force_ttl && overrides.ttl.is_some()) {
        return overrides.ttl.unwrap_or(Duration::ZERO);
    }
    // Section 5.2.2.4: a no-cache response may be stored but must not be
    // reused without a successful validation, so it is never fresh.
    if directives.no_cache {
        return Duration::ZERO;
    }
    if let Some(s_maxage) = directives.s_maxage {
        return s_maxage;
    }
    if let Some(max_age) = directives.max_age {
        return max_age;
    }
    let date = parse_header_date(response.get(header::DATE)).unwrap_or(response_time);
    if !directives.targeted {
        if let Some(expires) = response.get(header::EXPIRES) {
            // RFC 9111 section 5.3: an invalid Expires means already expired.
            return expires
                .to_str()
                .ok()
                .and_then(parse_http_date)
                .and_then(|at| at.duration_since(date).ok())
                .unwrap_or(Duration::ZERO);
        }
    }
    if let Some(ttl) = overrides.ttl {
        return ttl;
    }
    // Section 4.2.2, and 5.2.2.9: `public` makes a response heuristically
    // cacheable whatever its status.
    if heuristically_cacheable(status) || directives.public {
        if let Some(modified) = parse_header_date(response.get(header::LAST_MODIFIED)) {
            if let Ok(since) = date.duration_since(modified) {
                return (since / 10).min(heuristic_max);
            }
        }
    }
    Duration::ZERO
}

/// The stale-while-revalidate and stale-if-error windows to store with a
/// response: the policy's when given, else the origin's; none when the
/// response requires revalidation of stale copies.
pub fn stale_windows(
    directives: &ResponseDirectives,
    overrides: &Overrides,
) -> (Duration, Duration) {
    let swr = overrides
        .stale_while_revalidate
        .or(directives.stale_while_revalidate)
        .unwrap_or(Duration::ZERO);
    let sie = overrides
        .stale_if_error
        .or(directives.stale_if_error)
        .unwrap_or(Duration::ZERO);
    if directives.revalidate_when_stale() && !overrides.ignore_origin {
        return (Duration::ZERO, Duration::ZERO);
    }
    (swr, sie)
}

/// Corrected initial age of a response when it was received (RFC 9111
/// section 4.2.3): the larger of the apparent age (`response_time - Date`)
/// and the `Age` field plus the time the request spent in flight.
pub fn corrected_initial_age(
    response: &HeaderMap,
    request_time: SystemTime,
    response_time: SystemTime,
) -> Duration {
    let date = parse_header_date(response.get(header::DATE)).unwrap_or(response_time);
    let apparent_age = response_time.duration_since(date).unwrap_or(Duration::ZERO);
    let response_delay = response_time
        .duration_since(request_time)
        .unwrap_or(Duration::ZERO);
    let age_value = response
        .get(header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| delta_seconds(Some(v)))
        .unwrap_or(Duration::ZERO);
    apparent_age.max(age_value.saturating_add(response_delay))
}

/// Current age of a stored response at `now` (RFC 9111 section 4.2.3).
pub fn current_age(
    corrected_initial_age: Duration,
    response_time: SystemTime,
    now: SystemTime,
) -> Duration {
    corrected_initial_age
        .saturating_add(now.duration_since(response_time).unwrap_or(Duration::ZERO))
}

/// Where a stored response stands in time (RFC 9111 section 4.2, RFC 5861).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Staleness {
    /// Within its freshness lifetime.
    Fresh,
    /// Stale, but may be served while it is revalidated in the background.
    StaleWhileRevalidate,
    /// Stale; may be served only when the origin fails.
    StaleIfError,
    /// Beyond every window: useless to serve.
    Expired,
}

impl Staleness {
    /// A stable short name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fresh => "fresh",
            Self::StaleWhileRevalidate => "stale-while-revalidate",
            Self::StaleIfError => "stale-if-error",
            Self::Expired => "expired",
        }
    }
}

/// Classifies a response of the given freshness lifetime and current age
/// against its stale-while-revalidate and stale-if-error windows.
pub fn classify(freshness: Duration, age: Duration, swr: Duration, sie: Duration) -> Staleness {
    if age < freshness {
        Staleness::Fresh
    } else if age < freshness.saturating_add(swr) {
        Staleness::StaleWhileRevalidate
    } else if age < freshness.saturating_add(sie) {
        Staleness::StaleIfError
    } else {
        Staleness::Expired
    }
}

/// What a stored response can do for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// Serve it as is.
    Fresh,
    /// Serve it stale because the client allowed it with `max-stale`.
    StaleAllowed,
    /// Serve it stale and revalidate in the background (RFC 5861 section 3).
    StaleWhileRevalidate,
    /// Ask the origin (conditionally where validators exist);
    /// `stale_if_error` says whether the stored copy may answer when the
    /// origin fails (RFC 5861 section 4).
    Revalidate {
        /// The stored copy may be served if the origin errors.
        stale_if_error: bool,
    },
    /// The client said `only-if-cached` and nothing usable is stored: answer
    /// 504 (RFC 9111 section 5.2.1.7).
    GatewayTimeout,
}

/// The numbers kept with a stored response that decide its reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetime {
    /// Freshness lifetime.
    pub freshness: Duration,
    /// stale-while-revalidate window.
    pub swr: Duration,
    /// stale-if-error window.
    pub sie: Duration,
    /// The response forbids serving it stale without validation.
    pub revalidate_when_stale: bool,
    /// The freshness came from `s-maxage`, which implies `proxy-revalidate`
    /// (section 5.2.2.10): a client's `max-stale` cannot make a shared
    /// cache serve it stale. The origin's own stale-while-revalidate and
    /// stale-if-error windows (RFC 5861) still apply.
    pub refuses_max_stale: bool,
}

/// Decides whether a stored response of current `age` can serve a request
/// with the given directives (RFC 9111 sections 4.2 and 5.2.1).
pub fn evaluate_reuse(request: &RequestDirectives, lifetime: &Lifetime, age: Duration) -> Reuse {
    let staleness = classify(lifetime.freshness, age, lifetime.swr, lifetime.sie);
    let fallback = |stale_if_error: bool| {
        if request.only_if_cached {
            Reuse::GatewayTimeout
        } else {
            Reuse::Revalidate { stale_if_error }
        }
    };
    // The stored copy may stand in for a failing origin only within its
    // stale-if-error window.
    let sie_ok = !lifetime.revalidate_when_stale
        && lifetime.sie > Duration::ZERO
        && age < lifetime.freshness.saturating_add(lifetime.sie);
    // RFC 9111 section 5.2.1.4: no-cache forces validation.
    if request.no_cache {
        return fallback(sie_ok);
    }
    // Section 5.2.1.1: the client will not accept an older response.
    if request.max_age.is_some_and(|max| age > max) {
        return fallback(sie_ok);
    }
    let remaining = lifetime.freshness.saturating_sub(age);
    // Section 5.2.1.3: it must stay fresh at least min-fresh longer.
    if request
        .min_fresh
        .is_some_and(|min| staleness != Staleness::Fresh || remaining < min)
    {
        return fallback(sie_ok);
    }
    if staleness == Staleness::Fresh {
        return Reuse::Fresh;
    }
    if lifetime.revalidate_when_stale {
        return fallback(false);
    }
    // Section 5.2.1.2: the client accepts this much staleness.
    let stale_for = age.saturating_sub(lifetime.freshness);
    if !lifetime.refuses_max_stale && request.max_stale.is_some_and(|max| stale_for <= max) {
        return Reuse::StaleAllowed;
    }
    match staleness {
        Staleness::StaleWhileRevalidate => Reuse::StaleWhileRevalidate,
        Staleness::StaleIfError => fallback(true),
        _ => fallback(false),
    }
}

/// Whether a request's `Range` applies to the stored response, as far as its
/// `If-Range` goes (RFC 9110 section 13.1.5): without one, always; with an
/// entity tag, when it is strong and equals the stored `ETag`; with a date,
/// when it equals the stored `Last-Modified` exactly. Otherwise the range is
/// ignored and the whole response is sent.
pub fn if_range_allows(request: &HeaderMap, stored: &HeaderMap) -> bool {
    let Some(condition) = request.get(header::IF_RANGE) else {
        return true;
    };
    let Ok(condition) = condition.to_str() else {
        return false;
    };
    let condition = condition.trim();
    if condition.starts_with('"') {
        return stored
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|etag| etag.trim() == condition);
    }
    if condition.starts_with("W/") {
        return false;
    }
    match (
        parse_http_date(condition),
        parse_header_date(stored.get(header::LAST_MODIFIED)),
    ) {
        (Some(asked), Some(modified)) => asked == modified,
        _ => false,
    }
}

/// Should the cache answer a client's conditional GET/HEAD with 304 from this
/// stored response? `If-None-Match` (weak comparison) takes precedence over
/// `If-Modified-Since`, which compares against `Last-Modified` or, without
/// one, `Date` (RFC 9110 sections 13.1.2, 13.1.3 and 13.2.2; RFC 9111
/// section 4.3.2).
pub fn answers_not_modified(method: &Method, request: &HeaderMap, stored: &HeaderMap) -> bool {
    if method != Method::GET && method != Method::HEAD {
        return false;
    }
    if request.contains_key(header::IF_NONE_MATCH) {
        let Some(etag) = stored.get(header::ETAG).and_then(|v| v.to_str().ok()) else {
            // "*" matches any current representation, even without an ETag.
            return request
                .get_all(header::IF_NONE_MATCH)
                .iter()
                .any(|v| v.as_bytes().trim_ascii() == b"*");
        };
        let Some((_, stored_tag)) = first_entity_tag(etag) else {
            return false;
        };
        return request.get_all(header::IF_NONE_MATCH).iter().any(|value| {
            let Ok(text) = value.to_str() else {
                return false;
            };
            if text.trim() == "*" {
                return true;
            }
            entity_tags(text).any(|(_, tag)| tag == stored_tag)
        });
    }
    let Some(since) = parse_header_date(request.get(header::IF_MODIFIED_SINCE)) else {
        return false;
    };
    let modified = parse_header_date(stored.get(header::LAST_MODIFIED))
        .or_else(|| parse_header_date(stored.get(header::DATE)));
    modified.is_some_and(|modified| modified <= since)
}

/// Does a client's `If-Match`, or without one its `If-Unmodified-Since`,
/// fail against this stored response, to be answered 412 (RFC 9110
/// sections 13.1.1, 13.1.4 and 13.2.2)? `If-Match` compares strongly: it
/// holds for `*` or a strong tag equal to a strong stored `ETag`.
/// `If-Unmodified-Since` fails only when the stored `Last-Modified` is
/// later; without a `Last-Modified`, or with an invalid date, it is
/// ignored. The fills leave both out, so the cache answers them (RFC 9111
/// section 4.3.2).
pub fn fails_precondition(request: &HeaderMap, stored: &HeaderMap) -> bool {
    if request.contains_key(header::IF_MATCH) {
        let stored_tag = stored
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .and_then(first_entity_tag);
        let holds = request.get_all(header::IF_MATCH).iter().any(|value| {
            let Ok(text) = value.to_str() else {
                return false;
            };
            if text.trim() == "*" {
                return true;
            }
            match stored_tag {
                Some((false, stored)) => {
                    entity_tags(text).any(|(weak, tag)| !weak && tag == stored)
                }
                _ => false,
            }
        });
        return !holds;
    }
    let Some(since) = parse_header_date(request.get(header::IF_UNMODIFIED_SINCE)) else {
        return false;
    };
    parse_header_date(stored.get(header::LAST_MODIFIED)).is_some_and(|modified| modified > since)
}

/// Iterates the entity-tags of a list as `(weak, opaque-tag)`, stopping at
/// the first malformed one (RFC 9110 section 8.8.3).
fn entity_tags(text: &str) -> impl Iterator<Item = (bool, &str)> {
    let mut rest = text;
    std::iter::from_fn(move || {
        rest = rest.trim_start_matches([' ', '\t', ',']);
        if rest.is_empty() {
            return None;
        }
        let weak = rest.starts_with("W/");
        let body = if weak { &rest[2..] } else { rest };
        let body = body.strip_prefix('"')?;
        let end = body.find('"')?;
        let tag = &body[..end];
        rest = &body[end + 1..];
        Some((weak, tag))
    })
}

fn first_entity_tag(text: &str) -> Option<(bool, &str)> {
    entity_tags(text).next()
}

/// Adds the validators of a stored response to a request to the origin:
/// `If-None-Match` from `ETag` and `If-Modified-Since` from `Last-Modified`
/// (RFC 9111 section 4.3.1). Returns false when there is nothing to validate
/// with.
pub fn add_validators(stored: &HeaderMap, request: &mut HeaderMap) -> bool {
    let mut added = false;
    if let Some(etag) = stored.get(header::ETAG) {
        request.insert(header::IF_NONE_MATCH, etag.clone());
        added = true;
    }
    if let Some(modified) = stored.get(header::LAST_MODIFIED) {
        request.insert(header::IF_MODIFIED_SINCE, modified.clone());
        added = true;
    }
    added
}

/// Whether a 304 may update this stored response (RFC 9111 section 4.3.4):
/// not when it carries a strong entity tag that the stored response does
/// not have, for it then describes another representation. A 304 with a
/// weak tag or none is taken to be about the stored response, as the
/// validators it answered came from it.
pub fn not_modified_selects(stored: &HeaderMap, not_modified: &HeaderMap) -> bool {
    let tag = |h: &HeaderMap| {
        h.get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .and_then(first_entity_tag)
            .map(|(weak, tag)| (weak, tag.to_owned()))
    };
    match tag(not_modified) {
        Some((false, new)) => tag(stored).is_some_and(|(weak, old)| !weak && old == new),
        _ => true,
    }
}

/// Fields of a 304 that must not replace the stored ones: framing and
/// content metadata that describe the stored body, hop-by-hop fields, and
/// cookies (RFC 9111 section 3.2).
fn kept_on_update(name: &HeaderName) -> bool {
    *name == header::CONTENT_LENGTH
        || *name == header::CONTENT_ENCODING
        || *name == header::CONTENT_RANGE
        || *name == header::TRANSFER_ENCODING
        || *name == header::CONNECTION
        || *name == header::TE
        || *name == header::TRAILER
        || *name == header::UPGRADE
        || *name == header::PROXY_AUTHENTICATE
        || *name == header::SET_COOKIE
        || name.as_str() == "keep-alive"
}

/// Updates a stored response's fields from a 304 (RFC 9111 section 4.3.4):
/// each field present in the 304 replaces all stored values of that name.
/// The refreshed response is as old as the 304 says: the stored `Age` goes,
/// and so does the stored `Date` when the 304 has none (the time it arrived
/// then stands in, section 4.2.3), lest the old ones keep it stale.
pub fn merge_not_modified(stored: &mut HeaderMap, not_modified: &HeaderMap) {
    stored.remove(header::AGE);
    if !not_modified.contains_key(header::DATE) {
        stored.remove(header::DATE);
    }
    for name in not_modified.keys() {
        if kept_on_update(name) {
            continue;
        }
        stored.remove(name);
        for value in not_modified.get_all(name) {
            stored.append(name.clone(), value.clone());
        }
    }
}

/// Why a request went to the origin (RFC 9211 section 2.2 `fwd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    /// The policy or configuration said not to use the cache.
    Bypass,
    /// The request method is not cacheable.
    Method,
    /// Nothing stored under the URI.
    UriMiss,
    /// Something stored under the URI, but not for this request's `Vary`.
    VaryMiss,
    /// Something was found but was unusable (stale, or the request required
    /// validation).
    Stale,
    /// The request's own directives asked for the origin.
    Request,
}

impl Forward {
    /// The RFC 9211 token.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bypass => "bypass",
            Self::Method => "method",
            Self::UriMiss => "uri-miss",
            Self::VaryMiss => "vary-miss",
            Self::Stale => "stale",
            Self::Request => "request",
        }
    }
}

/// One member of the `Cache-Status` field (RFC 9211).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheStatus<'a> {
    /// Served from the cache; `ttl` is the remaining freshness in seconds
    /// (negative when served stale).
    Hit {
        /// Remaining freshness in seconds.
        ttl: i64,
        /// Optional detail.
        detail: Option<&'a str>,
    },
    /// Went to the origin.
    Forward {
        /// Why.
        reason: Forward,
        /// The origin's status, when one arrived.
        status: Option<u16>,
        /// Remaining freshness in seconds of the stored response, when one
        /// was stored.
        ttl: Option<i64>,
        /// The response was stored.
        stored: bool,
        /// The request waited for another request to the same key.
        collapsed: bool,
        /// Optional detail, e.g. a [`NotStorable`] reason.
        detail: Option<&'a str>,
    },
    /// Answered by the cache without a stored response and without going
    /// to the origin (a 504 to `only-if-cached`): neither `hit` nor `fwd`.
    Answered {
        /// Optional detail.
        detail: Option<&'a str>,
    },
}

impl CacheStatus<'_> {
    /// Renders the field member for cache `name`, for example
    /// `Portico; hit; ttl=42` or `Portico; fwd=uri-miss; fwd-status=200; ttl=3600; stored`.
    pub fn render(&self, name: &str) -> String {
        let mut out = String::with_capacity(64);
        out.push_str(name);
        let detail = match self {
            Self::Hit { ttl, detail } => {
                out.push_str("; hit; ttl=");
                push_int(&mut out, *ttl);
                detail
            }
            Self::Forward {
                reason,
                status,
                ttl,
                stored,
                collapsed,
                detail,
            } => {
                let _ = write!(out, "; fwd={}", reason.as_str());
                if let Some(status) = status {
                    out.push_str("; fwd-status=");
                    push_int(&mut out, i64::from(*status));
                }
                if let Some(ttl) = ttl {
                    out.push_str("; ttl=");
                    push_int(&mut out, *ttl);
                }
                if *stored {
                    out.push_str("; stored");
                }
                if *collapsed {
                    out.push_str("; collapsed");
                }
                detail
            }
            Self::Answered { detail } => detail,
        };
        if let Some(detail) = detail {
            out.push_str("; detail=");
            push_sf_string_or_token(&mut out, detail);
        }
        out
    }
}

/// Appends `n` in decimal; on every hit, so without the formatting machinery.
fn push_int(out: &mut String, n: i64) {
    if n < 0 {
        out.push('-');
    }
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = n.unsigned_abs();
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    for &d in &digits[at..] {
        out.push(char::from(d));
    }
}

/// Writes a structured-field token when `text` is one, else a string
/// (RFC 8941 sections 3.3.3 and 3.3.4); non-printable characters are dropped.
fn push_sf_string_or_token(out: &mut String, text: &str) {
    let is_token = text.starts_with(|c: char| c.is_ascii_alphabetic() || c == '*')
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:/".contains(&b));
    if is_token {
        out.push_str(text);
        return;
    }
    out.push('"');
    for c in text.chars().filter(|c| (' '..='~').contains(c)) {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

fn vary_is_star(response: &HeaderMap) -> bool {
    response.get_all(header::VARY).iter().any(|v| {
        v.to_str()
            .is_ok_and(|t| t.split(',').any(|n| n.trim() == "*"))
    })
}

/// The field names a response varies on, lowercased, sorted and without
/// duplicates; `Err(VaryStar)` for `Vary: *` (RFC 9111 section 4.1).
pub fn vary_names(response: &HeaderMap) -> Result<Vec<HeaderName>, NotStorable> {
    let mut names = Vec::new();
    for value in response.get_all(header::VARY) {
        let Ok(text) = value.to_str() else { continue };
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "*" {
                return Err(NotStorable::VaryStar);
            }
            if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
                names.push(name);
            }
        }
    }
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    names.dedup();
    Ok(names)
}

/// The secondary cache key of a request for a response that varies on
/// `names`: one `name:value` line per name, values of repeated fields joined
/// with `,` and trimmed, `Accept-Encoding` reduced to the coding this cache
/// would serve ([`preferred_encoding`]); a field the request lacks is the
/// bare name, so that it matches only a request that lacks it too, not one
/// that sends it empty (RFC 9111 section 4.1). Empty when `names` is empty.
pub fn secondary_key(names: &[HeaderName], request: &HeaderMap) -> String {
    secondary_key_of(names.iter().map(HeaderName::as_str), request)
}

/// [`secondary_key`] for names given as lowercase text, as a stored entry
/// keeps them: nothing is parsed or allocated per name.
pub fn secondary_key_of<'a>(
    names: impl IntoIterator<Item = &'a str>,
    request: &HeaderMap,
) -> String {
    let mut key = String::new();
    for name in names {
        if !key.is_empty() {
            key.push('\n');
        }
        key.push_str(name);
        if name == header::ACCEPT_ENCODING.as_str() {
            key.push(':');
            key.push_str(preferred_encoding(request));
            continue;
        }
        if !request.contains_key(name) {
            continue;
        }
        key.push(':');
        let mut first = true;
        for value in request.get_all(name) {
            let Ok(text) = value.to_str() else { continue };
            if !first {
                key.push(',');
            }
            first = false;
            key.push_str(text.trim());
        }
    }
    key
}

/// The content coding a client accepts that this cache prefers: `br`, then
/// `gzip` (including `x-gzip`), else `identity` (RFC 9110 section 12.5.3;
/// a coding listed with `q=0` is refused, `*` covers unlisted codings).
pub fn preferred_encoding(request: &HeaderMap) -> &'static str {
    let mut br = None;
    let mut gzip = None;
    let mut star = None;
    for value in request.get_all(header::ACCEPT_ENCODING) {
        let Ok(text) = value.to_str() else { continue };
        for item in text.split(',') {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim();
            let mut q_positive = true;
            for param in parts {
                let param = param.trim();
                if let Some(q) = param
                    .strip_prefix("q=")
                    .or_else(|| param.strip_prefix("Q="))
                {
                    q_positive = q.trim().parse::<f32>().is_ok_and(|q| q > 0.0);
                }
            }
            if coding.eq_ignore_ascii_case("br") {
                br = Some(q_positive);
            } else if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
                gzip = Some(gzip.unwrap_or(false) || q_positive);
            } else if coding == "*" {
                star = Some(q_positive);
            }
        }
    }
    let star = star.unwrap_or(false);
    if br.unwrap_or(star) {
        "br"
    } else if gzip.unwrap_or(star) {
        "gzip"
    } else {
        "identity"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    /// Field name and value pairs of a table row.
    type Fields<'a> = &'a [(&'a str, &'a str)];

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn t(n: u64) -> SystemTime {
        UNIX_EPOCH + secs(n)
    }

    fn cc(value: &str) -> ResponseDirectives {
        response_directives(&headers(&[("cache-control", value)]), &[])
    }

    #[test]
    fn parses_response_directives() {
        let d = cc("public, max-age=60, s-maxage=\"120\", stale-while-revalidate=30, stale-if-error=600, immutable, must-revalidate, proxy-revalidate");
        assert_eq!(d.max_age, Some(secs(60)));
        assert_eq!(d.s_maxage, Some(secs(120)));
        assert_eq!(d.stale_while_revalidate, Some(secs(30)));
        assert_eq!(d.stale_if_error, Some(secs(600)));
        assert!(d.public && d.immutable && d.must_revalidate && d.proxy_revalidate);
        assert!(!d.no_store && !d.private && !d.no_cache && !d.targeted);

        let table: &[(&str, ResponseDirectives)] = &[
            (
                "no-store",
                ResponseDirectives {
                    no_store: true,
                    ..Default::default()
                },
            ),
            (
                "NO-CACHE=\"set-cookie, x-a\", private",
                ResponseDirectives {
                    no_cache: true,
                    private: true,
                    ..Default::default()
                },
            ),
            (
                "max-age=abc",
                ResponseDirectives {
                    max_age: Some(Duration::ZERO),
                    ..Default::default()
                },
            ),
            (
                "max-age=99999999999999999999",
                ResponseDirectives {
                    max_age: Some(secs(DELTA_SECONDS_MAX)),
                    ..Default::default()
                },
            ),
            (
                "max-age=60, max-age=10",
                ResponseDirectives {
                    max_age: Some(secs(10)),
                    ..Default::default()
                },
            ),
            ("stale-while-revalidate=x", ResponseDirectives::default()),
            (" , ,unknown=1,", ResponseDirectives::default()),
        ];
        for (text, expected) in table {
            assert_eq!(&cc(text), expected, "{text}");
        }
    }

    #[test]
    fn parses_request_directives() {
        let table: &[(&str, RequestDirectives)] = &[
            (
                "max-age=5, min-fresh=10",
                RequestDirectives {
                    max_age: Some(secs(5)),
                    min_fresh: Some(secs(10)),
                    ..Default::default()
                },
            ),
            (
                "max-stale",
                RequestDirectives {
                    max_stale: Some(Duration::MAX),
                    ..Default::default()
                },
            ),
            (
                "max-stale=30",
                RequestDirectives {
                    max_stale: Some(secs(30)),
                    ..Default::default()
                },
            ),
            (
                "only-if-cached, no-cache, no-store",
                RequestDirectives {
                    only_if_cached: true,
                    no_cache: true,
                    no_store: true,
                    ..Default::default()
                },
            ),
            ("max-age=oops", RequestDirectives::default()),
        ];
        for (text, expected) in table {
            assert_eq!(
                &RequestDirectives::from_headers(&headers(&[("cache-control", text)])),
                expected,
                "{text}"
            );
        }
    }

    #[test]
    fn targeted_field_replaces_cache_control_in_precedence_order() {
        let portico = HeaderName::from_static("portico-cache-control");
        let cdn = HeaderName::from_static("cdn-cache-control");
        let targets = [portico.clone(), cdn.clone()];
        let both = headers(&[
            ("cache-control", "no-store"),
            ("cdn-cache-control", "max-age=20"),
            ("portico-cache-control", "max-age=10"),
        ]);
        let d = response_directives(&both, &targets);
        assert_eq!(d.max_age, Some(secs(10)));
        assert!(d.targeted && !d.no_store);

        let cdn_only = headers(&[
            ("cache-control", "no-store"),
            ("cdn-cache-control", "max-age=20"),
        ]);
        assert_eq!(
            response_directives(&cdn_only, &targets).max_age,
            Some(secs(20))
        );

        let empty_target = headers(&[
            ("cache-control", "max-age=5"),
            ("portico-cache-control", ""),
        ]);
        let d = response_directives(&empty_target, &targets);
        assert_eq!(d.max_age, Some(secs(5)));
        assert!(!d.targeted);

        // Without a target list, targeted fields mean nothing.
        assert!(response_directives(&both, &[]).no_store);
    }

    #[test]
    fn targeted_field_makes_expires_ignored() {
        let h = headers(&[
            ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
            ("expires", "Sun, 06 Nov 1994 09:49:37 GMT"),
            ("cdn-cache-control", "public"),
        ]);
        let d = response_directives(&h, &[HeaderName::from_static("cdn-cache-control")]);
        let f = freshness_lifetime(
            StatusCode::OK,
            &d,
            &h,
            t(0),
            DEFAULT_HEURISTIC_MAX,
            &Overrides::default(),
        );
        assert_eq!(f, Duration::ZERO);
        let d = response_directives(&h, &[]);
        let f = freshness_lifetime(
            StatusCode::OK,
            &d,
            &h,
            t(0),
            DEFAULT_HEURISTIC_MAX,
            &Overrides::default(),
        );
        assert_eq!(f, secs(3600));
    }

    #[test]
    fn storable_table() {
        let none: &[(&str, &str)] = &[];
        let set_cookie_ok = Overrides {
            store_set_cookie: true,
            ..Default::default()
        };
        let ignore = Overrides {
            ignore_origin: true,
            ttl: Some(secs(60)),
            ..Default::default()
        };
        let ttl_only = Overrides {
            ttl: Some(secs(60)),
            ..Default::default()
        };
        let shared = Overrides {
            share_authorized: true,
            ..Default::default()
        };
        #[allow(clippy::type_complexity)]
        let table: &[(
            Method,
            &[(&str, &str)],
            u16,
            &[(&str, &str)],
            &Overrides,
            Result<(), NotStorable>,
        )] = &[
            (Method::GET, none, 200, none, &Overrides::default(), Ok(())),
            (Method::HEAD, none, 200, none, &Overrides::default(), Ok(())),
            (
                Method::POST,
                none,
                200,
                &[("cache-control", "max-age=60")],
                &Overrides::default(),
                Err(NotStorable::Method),
            ),
            (
                Method::GET,
                none,
                500,
                none,
                &Overrides::default(),
                Err(NotStorable::Status),
            ),
            (
                Method::GET,
                none,
                500,
                &[("cache-control", "max-age=5")],
                &Overrides::default(),
                Ok(()),
            ),
            (
                Method::GET,
                none,
                302,
                &[("expires", "Sun, 06 Nov 1994 08:49:37 GMT")],
                &Overrides::default(),
                Ok(()),
            ),
            (
                Method::GET,
                none,
                302,
                &[("cache-control", "public")],
                &Overrides::default(),
                Ok(()),
            ),
            (Method::GET, none, 503, none, &ttl_only, Ok(())),
            (
                Method::GET,
                none,
                206,
                &[("cache-control", "max-age=60")],
                &Overrides::default(),
                Err(NotStorable::Status),
            ),
            (
                Method::GET,
                none,
                304,
                &[("cache-control", "max-age=60")],
                &Overrides::default(),
                Err(NotStorable::Status),
            ),
            (Method::GET, none, 404, none, &Overrides::default(), Ok(())),
            (Method::GET, none, 410, none, &Overrides::default(), Ok(())),
            (
                Method::GET,
                &[("cache-control", "no-store")],
                200,
                none,
                &Overrides::default(),
                Err(NotStorable::RequestNoStore),
            ),
            (
                Method::GET,
                none,
                200,
                &[("cache-control", "no-store")],
                &Overrides::default(),
                Err(NotStorable::NoStore),
            ),
            (
                Method::GET,
                none,
                200,
                &[("cache-control", "private, max-age=60")],
                &Overrides::default(),
                Err(NotStorable::Private),
            ),
            (
                Method::GET,
                none,
                200,
                &[("cache-control", "private, no-store")],
                &ignore,
                Ok(()),
            ),
            (
                Method::GET,
                &[("authorization", "Basic x")],
                200,
                &[("cache-control", "max-age=60")],
                &Overrides::default(),
                Err(NotStorable::Authorization),
            ),
            (
                Method::GET,
                &[("authorization", "Basic x")],
                200,
                &[("cache-control", "max-age=60")],
                &ignore,
                Err(NotStorable::Authorization),
            ),
            (
                Method::GET,
                &[("authorization", "Basic x")],
                200,
                &[("cache-control", "max-age=60")],
                &shared,
                Ok(()),
            ),
            (
                Method::GET,
                &[("authorization", "Basic x")],
                200,
                &[("cache-control", "public")],
                &Overrides::default(),
                Ok(()),
            ),
            (
                Method::GET,
                &[("authorization", "Basic x")],
                200,
                &[("cache-control", "s-maxage=5")],
                &Overrides::default(),
                Ok(()),
            ),
            (
                Method::GET,
                &[("authorization", "Basic x")],
                200,
                &[("cache-control", "must-revalidate")],
                &Overrides::default(),
                Ok(()),
            ),
            (
                Method::GET,
                none,
                200,
                &[("set-cookie", "a=b")],
                &Overrides::default(),
                Err(NotStorable::SetCookie),
            ),
            (
                Method::GET,
                none,
                200,
                &[("set-cookie", "a=b")],
                &set_cookie_ok,
                Ok(()),
            ),
            (
                Method::GET,
                none,
                200,
                &[("vary", "accept, *")],
                &Overrides::default(),
                Err(NotStorable::VaryStar),
            ),
            (
                Method::GET,
                none,
                200,
                &[("vary", "accept-encoding")],
                &Overrides::default(),
                Ok(()),
            ),
        ];
        for (i, (method, req, status, resp, overrides, expected)) in table.iter().enumerate() {
            let req = headers(req);
            let resp = headers(resp);
            let d = response_directives(&resp, &[]);
            let got = storable(
                method,
                &req,
                StatusCode::from_u16(*status).unwrap(),
                &resp,
                &d,
                overrides,
            );
            assert_eq!(got, *expected, "row {i}");
        }
        assert_eq!(NotStorable::VaryStar.as_str(), "vary-star");
    }

    #[test]
    fn strip_for_storage_removes_set_cookie() {
        let mut h = headers(&[
            ("set-cookie", "a=b"),
            ("set-cookie", "c=d"),
            ("etag", "\"x\""),
            ("proxy-authenticate", "Basic realm=\"p\""),
            ("proxy-authentication-info", "nextnonce=\"n\""),
        ]);
        strip_for_storage(&mut h);
        assert!(!h.contains_key(header::SET_COOKIE));
        assert!(!h.contains_key(header::PROXY_AUTHENTICATE));
        assert!(!h.contains_key("proxy-authentication-info"));
        assert!(h.contains_key(header::ETAG));
    }

    #[test]
    fn freshness_lifetime_table() {
        let date = "Sun, 06 Nov 1994 08:49:37 GMT";
        let ignore = Overrides {
            ignore_origin: true,
            ttl: Some(secs(7)),
            ..Default::default()
        };
        let default_ttl = Overrides {
            ttl: Some(secs(7)),
            ..Default::default()
        };
        let one_hour = Duration::from_secs(3600);
        #[allow(clippy::type_complexity)]
        let table: &[(u16, &[(&str, &str)], &Overrides, Duration, Duration)] = &[
            (
                200,
                &[("cache-control", "max-age=60, s-maxage=30")],
                &Overrides::default(),
                one_hour,
                secs(30),
            ),
            (
                200,
                &[
                    ("cache-control", "max-age=60"),
                    ("expires", "Sun, 06 Nov 1994 10:49:37 GMT"),
                    ("date", date),
                ],
                &Overrides::default(),
                one_hour,
                secs(60),
            ),
            (
                200,
                &[("expires", "Sun, 06 Nov 1994 10:49:37 GMT"), ("date", date)],
                &Overrides::default(),
                one_hour,
                secs(7200),
            ),
            (
                200,
                &[("expires", "0"), ("date", date)],
                &Overrides::default(),
                one_hour,
                Duration::ZERO,
            ),
            (
                200,
                &[("expires", "Sun, 06 Nov 1994 07:49:37 GMT"), ("date", date)],
                &Overrides::default(),
                one_hour,
                Duration::ZERO,
            ),
            // Heuristic: 10% of 10 hours = 1 hour; capped at 30 minutes.
            (
                200,
                &[
                    ("date", date),
                    ("last-modified", "Sat, 05 Nov 1994 22:49:37 GMT"),
                ],
                &Overrides::default(),
                one_hour,
                secs(3600),
            ),
            (
                200,
                &[
                    ("date", date),
                    ("last-modified", "Sat, 05 Nov 1994 22:49:37 GMT"),
                ],
                &Overrides::default(),
                secs(1800),
                secs(1800),
            ),
            (
                500,
                &[
                    ("date", date),
                    ("last-modified", "Sat, 05 Nov 1994 22:49:37 GMT"),
                ],
                &Overrides::default(),
                one_hour,
                Duration::ZERO,
            ),
            // `public` makes any status heuristically cacheable.
            (
                302,
                &[
                    ("cache-control", "public"),
                    ("date", date),
                    ("last-modified", "Sat, 05 Nov 1994 22:49:37 GMT"),
                ],
                &Overrides::default(),
                one_hour,
                secs(3600),
            ),
            (
                302,
                &[
                    ("date", date),
                    ("last-modified", "Sat, 05 Nov 1994 22:49:37 GMT"),
                ],
                &Overrides::default(),
                one_hour,
                Duration::ZERO,
            ),
            (
                200,
                &[("date", date)],
                &Overrides::default(),
                one_hour,
                Duration::ZERO,
            ),
            (
                200,
                &[
                    ("date", date),
                    ("last-modified", "Sat, 05 Nov 1994 22:49:37 GMT"),
                ],
                &default_ttl,
                one_hour,
                secs(7),
            ),
            (
                200,
                &[("cache-control", "max-age=60")],
                &default_ttl,
                one_hour,
                secs(60),
            ),
            (
                200,
                &[("cache-control", "max-age=60, no-store")],
                &ignore,
                one_hour,
                secs(7),
            ),
        ];
        for (i, (status, resp, overrides, heuristic_max, expected)) in table.iter().enumerate() {
            let resp = headers(resp);
            let d = response_directives(&resp, &[]);
            let got = freshness_lifetime(
                StatusCode::from_u16(*status).unwrap(),
                &d,
                &resp,
                t(0),
                *heuristic_max,
                overrides,
            );
            assert_eq!(got, *expected, "row {i}");
        }
    }

    #[test]
    fn age_follows_rfc_9111_section_4_2_3() {
        // Date 784111777; request at +0, response at +2.
        let base = 784_111_777;
        let table: &[(Fields, u64, u64, u64)] = &[
            // apparent age 10 (Date 10 s before response), no Age: 10.
            (
                &[("date", "Sun, 06 Nov 1994 08:49:37 GMT")],
                base + 8,
                base + 10,
                10,
            ),
            // Age 100 plus 2 s of delay beats apparent age 10.
            (
                &[("date", "Sun, 06 Nov 1994 08:49:37 GMT"), ("age", "100")],
                base + 8,
                base + 10,
                102,
            ),
            // Date in the future: apparent age 0, delay 2.
            (
                &[("date", "Sun, 06 Nov 1994 08:49:37 GMT")],
                base - 12,
                base - 10,
                2,
            ),
            // No Date: response_time stands in.
            (&[("age", "5")], base, base + 1, 6),
            (&[("age", "junk")], base, base, 0),
        ];
        for (i, (resp, req_t, resp_t, expected)) in table.iter().enumerate() {
            let got = corrected_initial_age(&headers(resp), t(*req_t), t(*resp_t));
            assert_eq!(got, secs(*expected), "row {i}");
        }
        assert_eq!(current_age(secs(10), t(100), t(130)), secs(40));
        assert_eq!(current_age(secs(10), t(100), t(50)), secs(10));
    }

    #[test]
    fn classify_table() {
        let table = [
            (60, 0, 0, 0, Staleness::Fresh),
            (60, 59, 0, 0, Staleness::Fresh),
            (60, 60, 0, 0, Staleness::Expired),
            (60, 60, 30, 0, Staleness::StaleWhileRevalidate),
            (60, 89, 30, 300, Staleness::StaleWhileRevalidate),
            (60, 90, 30, 300, Staleness::StaleIfError),
            (60, 359, 30, 300, Staleness::StaleIfError),
            (60, 360, 30, 300, Staleness::Expired),
            (60, 100, 300, 10, Staleness::StaleWhileRevalidate),
        ];
        for (fresh, age, swr, sie, expected) in table {
            assert_eq!(
                classify(secs(fresh), secs(age), secs(swr), secs(sie)),
                expected,
                "{fresh} {age} {swr} {sie}"
            );
        }
    }

    #[test]
    fn stale_windows_table() {
        let policy = Overrides {
            stale_while_revalidate: Some(secs(5)),
            ..Default::default()
        };
        let table: &[(&str, &Overrides, (u64, u64))] = &[
            (
                "stale-while-revalidate=30, stale-if-error=60",
                &Overrides::default(),
                (30, 60),
            ),
            (
                "stale-while-revalidate=30, stale-if-error=60",
                &policy,
                (5, 60),
            ),
            (
                "stale-while-revalidate=30, must-revalidate",
                &Overrides::default(),
                (0, 0),
            ),
            (
                "stale-if-error=30, proxy-revalidate",
                &Overrides::default(),
                (0, 0),
            ),
            ("no-cache", &policy, (0, 0)),
        ];
        for (text, overrides, (swr, sie)) in table {
            assert_eq!(
                stale_windows(&cc(text), overrides),
                (secs(*swr), secs(*sie)),
                "{text}"
            );
        }
    }

    #[test]
    fn if_range_needs_a_strong_matching_validator() {
        let stored = headers(&[
            ("etag", "\"v2\""),
            ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT"),
        ]);
        let weak = headers(&[("etag", "W/\"v2\"")]);
        for (if_range, against, applies) in [
            (None, &stored, true),
            (Some("\"v2\""), &stored, true),
            (Some("\"v1\""), &stored, false),
            (Some("W/\"v2\""), &stored, false),
            (Some("W/\"v2\""), &weak, false),
            (Some("\"v2\""), &weak, false),
            (Some("Sun, 06 Nov 1994 08:49:37 GMT"), &stored, true),
            (Some("Sun, 06 Nov 1994 08:49:38 GMT"), &stored, false),
            (Some("Sun, 06 Nov 1994 08:49:37 GMT"), &weak, false),
            (Some("not a date"), &stored, false),
        ] {
            let request = match if_range {
                Some(v) => headers(&[("if-range", v)]),
                None => HeaderMap::new(),
            };
            assert_eq!(if_range_allows(&request, against), applies, "{if_range:?}");
        }
    }

    #[test]
    fn evaluate_reuse_table() {
        let lt = Lifetime {
            freshness: secs(60),
            swr: secs(30),
            sie: secs(300),
            revalidate_when_stale: false,
            refuses_max_stale: false,
        };
        let strict = Lifetime {
            revalidate_when_stale: true,
            ..lt
        };
        let plain = Lifetime {
            swr: Duration::ZERO,
            sie: Duration::ZERO,
            ..lt
        };
        let table: &[(&str, &Lifetime, u64, Reuse)] = &[
            ("", &lt, 10, Reuse::Fresh),
            ("", &lt, 70, Reuse::StaleWhileRevalidate),
            (
                "",
                &lt,
                100,
                Reuse::Revalidate {
                    stale_if_error: true,
                },
            ),
            (
                "",
                &lt,
                400,
                Reuse::Revalidate {
                    stale_if_error: false,
                },
            ),
            (
                "",
                &plain,
                61,
                Reuse::Revalidate {
                    stale_if_error: false,
                },
            ),
            (
                "no-cache",
                &lt,
                10,
                Reuse::Revalidate {
                    stale_if_error: true,
                },
            ),
            (
                "no-cache",
                &plain,
                10,
                Reuse::Revalidate {
                    stale_if_error: false,
                },
            ),
            (
                "max-age=5",
                &lt,
                10,
                Reuse::Revalidate {
                    stale_if_error: true,
                },
            ),
            ("max-age=10", &lt, 10, Reuse::Fresh),
            ("min-fresh=30", &lt, 20, Reuse::Fresh),
            (
                "min-fresh=30",
                &lt,
                40,
                Reuse::Revalidate {
                    stale_if_error: true,
                },
            ),
            ("max-stale", &lt, 1000, Reuse::StaleAllowed),
            ("max-stale=20", &lt, 70, Reuse::StaleAllowed),
            ("max-stale=5", &lt, 70, Reuse::StaleWhileRevalidate),
            (
                "max-stale",
                &strict,
                70,
                Reuse::Revalidate {
                    stale_if_error: false,
                },
            ),
            (
                "",
                &strict,
                70,
                Reuse::Revalidate {
                    stale_if_error: false,
                },
            ),
            ("only-if-cached", &lt, 10, Reuse::Fresh),
            ("only-if-cached", &lt, 70, Reuse::StaleWhileRevalidate),
            ("only-if-cached", &lt, 400, Reuse::GatewayTimeout),
            ("only-if-cached, max-stale", &lt, 400, Reuse::StaleAllowed),
            ("only-if-cached, no-cache", &lt, 10, Reuse::GatewayTimeout),
        ];
        for (text, lifetime, age, expected) in table {
            let req = RequestDirectives::from_headers(&headers(&[("cache-control", text)]));
            assert_eq!(
                evaluate_reuse(&req, lifetime, secs(*age)),
                *expected,
                "{text} age {age}"
            );
        }
    }

    #[test]
    fn conditional_requests_table() {
        let stored = headers(&[
            ("etag", "W/\"v1\""),
            ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT"),
        ]);
        let no_etag = headers(&[("date", "Sun, 06 Nov 1994 08:49:37 GMT")]);
        let table: &[(Method, Fields, &HeaderMap, bool)] = &[
            (Method::GET, &[("if-none-match", "\"v1\"")], &stored, true),
            (
                Method::HEAD,
                &[("if-none-match", "W/\"v1\"")],
                &stored,
                true,
            ),
            (
                Method::GET,
                &[("if-none-match", "\"a\", \"b,c\", W/\"v1\"")],
                &stored,
                true,
            ),
            (Method::GET, &[("if-none-match", "\"v2\"")], &stored, false),
            (Method::GET, &[("if-none-match", "*")], &stored, true),
            (Method::GET, &[("if-none-match", "*")], &no_etag, true),
            (Method::GET, &[("if-none-match", "\"v1\"")], &no_etag, false),
            // If-None-Match takes precedence over If-Modified-Since.
            (
                Method::GET,
                &[
                    ("if-none-match", "\"v2\""),
                    ("if-modified-since", "Mon, 07 Nov 1994 08:49:37 GMT"),
                ],
                &stored,
                false,
            ),
            (
                Method::GET,
                &[("if-modified-since", "Mon, 07 Nov 1994 08:49:37 GMT")],
                &stored,
                true,
            ),
            (
                Method::GET,
                &[("if-modified-since", "Sun, 06 Nov 1994 08:49:37 GMT")],
                &stored,
                true,
            ),
            (
                Method::GET,
                &[("if-modified-since", "Sat, 05 Nov 1994 08:49:37 GMT")],
                &stored,
                false,
            ),
            (
                Method::GET,
                &[("if-modified-since", "garbage")],
                &stored,
                false,
            ),
            (
                Method::GET,
                &[("if-modified-since", "Mon, 07 Nov 1994 08:49:37 GMT")],
                &no_etag,
                true,
            ),
            (Method::POST, &[("if-none-match", "\"v1\"")], &stored, false),
            (Method::GET, &[], &stored, false),
        ];
        for (i, (method, req, stored, expected)) in table.iter().enumerate() {
            assert_eq!(
                answers_not_modified(method, &headers(req), stored),
                *expected,
                "row {i}"
            );
        }
    }

    #[test]
    fn precondition_table() {
        let strong = headers(&[
            ("etag", "\"v1\""),
            ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT"),
        ]);
        let weak = headers(&[("etag", "W/\"v1\"")]);
        let bare = HeaderMap::new();
        let table: &[(Fields, &HeaderMap, bool)] = &[
            (&[("if-match", "\"v1\"")], &strong, false),
            (&[("if-match", "\"a\", \"v1\"")], &strong, false),
            (&[("if-match", "\"v2\"")], &strong, true),
            // Strong comparison: a weak tag on either side never matches.
            (&[("if-match", "W/\"v1\"")], &strong, true),
            (&[("if-match", "\"v1\"")], &weak, true),
            (&[("if-match", "*")], &strong, false),
            (&[("if-match", "*")], &bare, false),
            (&[("if-match", "\"v1\"")], &bare, true),
            (
                &[("if-unmodified-since", "Sat, 05 Nov 1994 08:49:37 GMT")],
                &strong,
                true,
            ),
            (
                &[("if-unmodified-since", "Sun, 06 Nov 1994 08:49:37 GMT")],
                &strong,
                false,
            ),
            (&[("if-unmodified-since", "garbage")], &strong, false),
            (
                &[("if-unmodified-since", "Sat, 05 Nov 1994 08:49:37 GMT")],
                &bare,
                false,
            ),
            // If-Match takes precedence over If-Unmodified-Since.
            (
                &[
                    ("if-match", "\"v1\""),
                    ("if-unmodified-since", "Sat, 05 Nov 1994 08:49:37 GMT"),
                ],
                &strong,
                false,
            ),
            (&[], &strong, false),
        ];
        for (i, (req, stored, expected)) in table.iter().enumerate() {
            assert_eq!(
                fails_precondition(&headers(req), stored),
                *expected,
                "row {i}"
            );
        }
    }

    #[test]
    fn a_304_with_another_strong_tag_selects_nothing() {
        let stored = headers(&[("etag", "\"v1\"")]);
        let weak = headers(&[("etag", "W/\"v1\"")]);
        let bare = HeaderMap::new();
        let table: &[(&HeaderMap, Fields, bool)] = &[
            (&stored, &[("etag", "\"v1\"")], true),
            (&stored, &[("etag", "\"v2\"")], false),
            (&weak, &[("etag", "\"v1\"")], false),
            (&bare, &[("etag", "\"v1\"")], false),
            (&stored, &[("etag", "W/\"v2\"")], true),
            (&stored, &[], true),
        ];
        for (i, (stored, update, expected)) in table.iter().enumerate() {
            assert_eq!(
                not_modified_selects(stored, &headers(update)),
                *expected,
                "row {i}"
            );
        }
    }

    #[test]
    fn validators_and_304_merge() {
        let stored = headers(&[
            ("etag", "\"v1\""),
            ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT"),
        ]);
        let mut req = HeaderMap::new();
        assert!(add_validators(&stored, &mut req));
        assert_eq!(req.get(header::IF_NONE_MATCH).unwrap(), "\"v1\"");
        assert_eq!(
            req.get(header::IF_MODIFIED_SINCE).unwrap(),
            "Sun, 06 Nov 1994 08:49:37 GMT"
        );
        assert!(!add_validators(&HeaderMap::new(), &mut HeaderMap::new()));

        let mut stored = headers(&[
            ("cache-control", "max-age=10"),
            ("content-length", "5"),
            ("content-type", "text/plain"),
            ("x-a", "1"),
            ("x-a", "2"),
            ("age", "100"),
            ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
        ]);
        let nm = headers(&[
            ("cache-control", "max-age=60"),
            ("content-length", "0"),
            ("x-a", "3"),
            ("set-cookie", "s=1"),
            ("connection", "close"),
        ]);
        merge_not_modified(&mut stored, &nm);
        assert_eq!(stored.get(header::CACHE_CONTROL).unwrap(), "max-age=60");
        assert_eq!(stored.get(header::CONTENT_LENGTH).unwrap(), "5");
        assert_eq!(stored.get(header::CONTENT_TYPE).unwrap(), "text/plain");
        assert_eq!(stored.get_all("x-a").iter().collect::<Vec<_>>(), ["3"]);
        assert!(!stored.contains_key(header::SET_COOKIE));
        assert!(!stored.contains_key(header::CONNECTION));
        assert!(!stored.contains_key(header::AGE), "the old age goes");
        assert!(!stored.contains_key(header::DATE), "the old date goes");
    }

    #[test]
    fn cache_status_rendering() {
        let table: &[(CacheStatus, &str)] = &[
            (
                CacheStatus::Hit {
                    ttl: 42,
                    detail: None,
                },
                "Portico; hit; ttl=42",
            ),
            (
                CacheStatus::Answered {
                    detail: Some("only-if-cached"),
                },
                "Portico; detail=only-if-cached",
            ),
            (
                CacheStatus::Hit {
                    ttl: -3,
                    detail: Some("stale-while-revalidate"),
                },
                "Portico; hit; ttl=-3; detail=stale-while-revalidate",
            ),
            (
                CacheStatus::Hit {
                    ttl: 0,
                    detail: None,
                },
                "Portico; hit; ttl=0",
            ),
            (
                CacheStatus::Hit {
                    ttl: i64::MIN,
                    detail: None,
                },
                "Portico; hit; ttl=-9223372036854775808",
            ),
            (
                CacheStatus::Hit {
                    ttl: 31_536_000,
                    detail: None,
                },
                "Portico; hit; ttl=31536000",
            ),
            (
                CacheStatus::Forward {
                    reason: Forward::UriMiss,
                    status: Some(200),
                    ttl: Some(60),
                    stored: true,
                    collapsed: false,
                    detail: None,
                },
                "Portico; fwd=uri-miss; fwd-status=200; ttl=60; stored",
            ),
            (
                CacheStatus::Forward {
                    reason: Forward::VaryMiss,
                    status: Some(200),
                    ttl: None,
                    stored: false,
                    collapsed: true,
                    detail: Some(NotStorable::SetCookie.as_str()),
                },
                "Portico; fwd=vary-miss; fwd-status=200; collapsed; detail=set-cookie",
            ),
            (
                CacheStatus::Forward {
                    reason: Forward::Bypass,
                    status: None,
                    ttl: None,
                    stored: false,
                    collapsed: false,
                    detail: Some("rule \"x\""),
                },
                "Portico; fwd=bypass; detail=\"rule \\\"x\\\"\"",
            ),
            (
                CacheStatus::Forward {
                    reason: Forward::Stale,
                    status: Some(304),
                    ttl: None,
                    stored: true,
                    collapsed: false,
                    detail: None,
                },
                "Portico; fwd=stale; fwd-status=304; stored",
            ),
            (
                CacheStatus::Forward {
                    reason: Forward::Request,
                    status: Some(200),
                    ttl: None,
                    stored: false,
                    collapsed: false,
                    detail: None,
                },
                "Portico; fwd=request; fwd-status=200",
            ),
            (
                CacheStatus::Forward {
                    reason: Forward::Method,
                    status: Some(201),
                    ttl: None,
                    stored: false,
                    collapsed: false,
                    detail: None,
                },
                "Portico; fwd=method; fwd-status=201",
            ),
        ];
        for (status, expected) in table {
            let text = status.render("Portico");
            assert_eq!(text, *expected);
            assert!(HeaderValue::from_str(&text).is_ok());
        }
    }

    #[test]
    fn vary_names_and_secondary_key() {
        let resp = headers(&[
            ("vary", "Accept-Encoding, accept-language"),
            ("vary", "X-Theme,accept-encoding"),
        ]);
        let names = vary_names(&resp).unwrap();
        let as_str: Vec<_> = names.iter().map(HeaderName::as_str).collect();
        assert_eq!(as_str, ["accept-encoding", "accept-language", "x-theme"]);
        assert_eq!(
            vary_names(&headers(&[("vary", "*")])),
            Err(NotStorable::VaryStar)
        );
        assert!(vary_names(&HeaderMap::new()).unwrap().is_empty());

        let req = headers(&[
            ("accept-encoding", "gzip, deflate, br;q=0.5"),
            ("accept-language", "  en-GB "),
            ("x-theme", "dark"),
            ("x-theme", "wide"),
        ]);
        assert_eq!(
            secondary_key(&names, &req),
            "accept-encoding:br\naccept-language:en-GB\nx-theme:dark,wide"
        );
        let bare = HeaderMap::new();
        assert_eq!(
            secondary_key(&names, &bare),
            "accept-encoding:identity\naccept-language\nx-theme"
        );
        // Sent empty is not the same as not sent.
        let empty = headers(&[("accept-language", ""), ("x-theme", " ")]);
        assert_eq!(
            secondary_key(&names, &empty),
            "accept-encoding:identity\naccept-language:\nx-theme:"
        );
        assert_eq!(secondary_key(&[], &req), "");
    }

    #[test]
    fn preferred_encoding_table() {
        let table = [
            ("", "identity"),
            ("gzip", "gzip"),
            ("x-gzip", "gzip"),
            ("gzip, br", "br"),
            ("br;q=0, gzip", "gzip"),
            ("br;q=0, gzip;q=0", "identity"),
            ("*", "br"),
            ("*, br;q=0", "gzip"),
            ("*;q=0", "identity"),
            ("deflate", "identity"),
            ("GZIP;Q=0.8", "gzip"),
        ];
        for (accept, expected) in table {
            let req = if accept.is_empty() {
                HeaderMap::new()
            } else {
                headers(&[("accept-encoding", accept)])
            };
            assert_eq!(preferred_encoding(&req), expected, "{accept}");
        }
    }
}
