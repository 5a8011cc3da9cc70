//! Delivering: a stored entry into a response (conditional answers,
//! ranges, compression, Age, Cache-Status), and the responses the policy
//! makes itself.

use super::*;

impl Gateway {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn serve_stale_on_error(
        &self,
        gen: &Generation,
        rule: &RuleSpec,
        parts: &http::request::Parts,
        key: &str,
        entry: &Arc<Entry>,
        fwd_status: u16,
        log: &mut Log,
    ) -> Response<ResponseBody> {
        log.cache = "stale-if-error";
        metrics::counter!("portico_cache_results_total", "result" => "stale-if-error").increment(1);
        let status = CacheStatus::Forward {
            reason: Forward::Stale,
            status: Some(fwd_status),
            ttl: None,
            stored: false,
            collapsed: false,
            detail: Some("stale-if-error"),
        };
        self.deliver(gen, rule, parts, key, entry, &status, SystemTime::now())
    }

    /// Builds the response for a stored entry (under the primary key
    /// `key`): conditional answers, ranges, compression, Age, Cache-Status,
    /// header edits.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn deliver(
        &self,
        gen: &Generation,
        rule: &RuleSpec,
        parts: &http::request::Parts,
        key: &str,
        entry: &Arc<Entry>,
        status: &CacheStatus<'_>,
        now: SystemTime,
    ) -> Response<ResponseBody> {
        let age = HeaderValue::from(entry.age_at(now).as_secs());
        // Room for what is added below (Age, Cache-Status, Content-Length,
        // Via), so that no insert has to grow the map. Names and values are
        // shared with the entry, not copied.
        let mut headers = HeaderMap::with_capacity(entry.field_count() + 4);
        for (name, value) in entry.fields() {
            headers.append(name, value);
        }
        // Preconditions apply only where the answer would be 2xx (RFC 9110
        // section 13.2.1).
        if entry.status.is_success() && control::fails_precondition(&parts.headers, &headers) {
            let mut resp = precondition_failed();
            set_cache_status(resp.headers_mut(), status);
            return resp;
        }
        if entry.status.is_success()
            && control::answers_not_modified(&parts.method, &parts.headers, &headers)
        {
            // RFC 9110 section 15.4.5: these fields as the 200 would have
            // them, the rule's edits included.
            for e in &rule.response_headers {
                e.apply(&mut headers);
            }
            let mut resp = not_modified(&headers, &[]);
            // What the 200 would have said of its coding (RFC 9110 section 15.4.5).
            if let Some(spec) = rule
                .compress
                .as_ref()
                .filter(|spec| compress::applies(spec, &headers, entry.body_len()))
            {
                compress::vary_on_accept_encoding(resp.headers_mut());
                if compress::negotiate(parts.headers.get(header::ACCEPT_ENCODING), spec).is_some() {
                    compress::weaken_etag(resp.headers_mut());
                }
            }
            resp.headers_mut().insert(header::AGE, age);
            set_cache_status(resp.headers_mut(), status);
            return resp;
        }
        headers.insert(header::AGE, age);
        strip_targeted(gen, &mut headers);
        let mut code = entry.status;
        // A large body without a kept copy is compressed as it streams.
        let mut coded_stream = None;
        let mut length_unknown = false;
        let mut payload = entry.body();
        let range = parts
            .headers
            .get(header::RANGE)
            .filter(|_| parts.method == Method::GET && code == StatusCode::OK)
            .filter(|_| control::if_range_allows(&parts.headers, &headers))
            .and_then(|v| v.to_str().ok());
        if let Some(range) = range {
            match byte_range(range, payload.len() as u64) {
                RangeAnswer::Full => {}
                RangeAnswer::Partial(start, end) => {
                    code = StatusCode::PARTIAL_CONTENT;
                    headers.insert(
                        header::CONTENT_RANGE,
                        HeaderValue::from_str(&format!("bytes {start}-{end}/{}", payload.len()))
                            .expect("digits are a valid header value"),
                    );
                    payload = payload.slice(start as usize..=end as usize);
                }
                RangeAnswer::Unsatisfiable => {
                    code = StatusCode::RANGE_NOT_SATISFIABLE;
                    headers.insert(
                        header::CONTENT_RANGE,
                        HeaderValue::from_str(&format!("bytes */{}", payload.len()))
                            .expect("digits are a valid header value"),
                    );
                    payload = Bytes::new();
                }
            }
        } else if let Some(spec) = &rule.compress {
            if compress::applies(spec, &headers, payload.len()) {
                compress::vary_on_accept_encoding(&mut headers);
                if let Some(alg) =
                    compress::negotiate(parts.headers.get(header::ACCEPT_ENCODING), spec)
                {
                    let stored = compress::Stored {
                        primary: key,
                        secondary: entry.secondary_key(),
                        generation: entry.generation,
                        received_ms: entry.response_time_ms,
                        len: payload.len(),
                    };
                    let identity = compress::Copies::identity(stored, alg, spec.level);
                    let copies = &self.inner.copies;
                    match copies.get(identity) {
                        Some(copy) => payload = copy,
                        None if payload.len() <= compress::AT_ONCE_MAX => {
                            payload = copies.get_or_compress(identity, alg, spec.level, &payload);
                        }
                        None if parts.method == Method::HEAD => length_unknown = true,
                        None => {
                            length_unknown = true;
                            coded_stream = Some(copies.compress_streaming(
                                identity,
                                alg,
                                spec.level,
                                payload.clone(),
                            ));
                        }
                    }
                    compress::mark_coded(&mut headers, alg);
                    headers.remove(header::ACCEPT_RANGES);
                }
            }
        }
        // A stored response usually carries its own length already.
        let stated = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if length_unknown {
            // Not known until the copy is made.
            headers.remove(header::CONTENT_LENGTH);
        } else if stated != Some(payload.len()) {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(payload.len()));
        }
        let body = if parts.method == Method::HEAD {
            body::empty()
        } else if let Some(coded) = coded_stream {
            coded.map_err(|never| match never {}).boxed_unsync()
        } else {
            body::full(payload)
        };
        let mut resp = Response::new(body);
        *resp.status_mut() = code;
        *resp.headers_mut() = headers;
        set_cache_status(resp.headers_mut(), status);
        for e in &rule.response_headers {
            e.apply(resp.headers_mut());
        }
        resp
    }
}

/// The 412 to a request whose `If-Match` or `If-Unmodified-Since` fails.
pub(super) fn precondition_failed() -> Response<ResponseBody> {
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = StatusCode::PRECONDITION_FAILED;
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(0));
    resp
}

/// The 304 that stands for a 2xx with `headers`: the fields RFC 9110
/// section 15.4.5 asks of it, and those named in `also`, without a body.
pub(super) fn not_modified(headers: &HeaderMap, also: &[HeaderName]) -> Response<ResponseBody> {
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = StatusCode::NOT_MODIFIED;
    let names = [
        header::CACHE_CONTROL,
        header::CONTENT_LOCATION,
        header::DATE,
        header::ETAG,
        header::EXPIRES,
        header::LAST_MODIFIED,
        header::VARY,
    ];
    for name in names.iter().chain(also) {
        for v in headers.get_all(name) {
            resp.headers_mut().append(name.clone(), v.clone());
        }
    }
    resp
}

/// Responses the policy makes itself: redirect, deny, respond, no route.
pub(super) fn synthetic(
    outcome: &Outcome,
    errors: &ErrorPages,
    request: &HeaderMap,
) -> Response<ResponseBody> {
    match outcome {
        Outcome::Redirect { status, location } => {
            let mut resp = Response::new(body::empty());
            *resp.status_mut() = StatusCode::from_u16(*status).unwrap_or(StatusCode::FOUND);
            if let Ok(v) = HeaderValue::from_str(location) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            resp.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(0));
            resp
        }
        Outcome::Deny { status } => {
            let code = StatusCode::from_u16(*status).unwrap_or(StatusCode::FORBIDDEN);
            let mut resp = Response::new(body::full(format!(
                "{} {}\n",
                code.as_u16(),
                code.canonical_reason().unwrap_or("Denied")
            )));
            *resp.status_mut() = code;
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            resp
        }
        Outcome::Respond {
            status,
            body: text,
            content_type,
        } => {
            let mut resp = Response::new(body::full(text.clone()));
            *resp.status_mut() = StatusCode::from_u16(*status).unwrap_or(StatusCode::OK);
            if let Ok(v) = HeaderValue::from_str(content_type) {
                resp.headers_mut().insert(header::CONTENT_TYPE, v);
            }
            resp
        }
        Outcome::NoRoute | Outcome::Forward(_) => {
            errors.respond(&ProxyError::NotFound, Some(request))
        }
    }
}

/// A single byte range against a representation of `len` bytes (RFC 9110 section 14).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum RangeAnswer {
    /// Not a range we answer (several ranges, other units): the whole object.
    Full,
    /// Inclusive start and end.
    Partial(u64, u64),
    Unsatisfiable,
}

pub(super) fn byte_range(header: &str, len: u64) -> RangeAnswer {
    // Range units compare case-insensitively (RFC 9110 section 14.1).
    let header = header.trim();
    let Some(spec) = header
        .get(..6)
        .filter(|unit| unit.eq_ignore_ascii_case("bytes="))
        .map(|_| &header[6..])
    else {
        return RangeAnswer::Full;
    };
    if spec.contains(',') {
        return RangeAnswer::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeAnswer::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    let parsed = match (a.is_empty(), b.is_empty()) {
        (true, false) => match b.parse::<u64>() {
            Ok(0) => return RangeAnswer::Unsatisfiable,
            // Satisfiable (RFC 9110 section 14.1.1), but an empty
            // representation has no byte to send in a 206: all of it, then.
            Ok(_) if len == 0 => return RangeAnswer::Full,
            Ok(n) => Some((len.saturating_sub(n), len.saturating_sub(1))),
            Err(_) => None,
        },
        (false, true) => a.parse::<u64>().ok().map(|s| (s, len.saturating_sub(1))),
        (false, false) => match (a.parse::<u64>(), b.parse::<u64>()) {
            (Ok(s), Ok(e)) if s <= e => Some((s, e.min(len.saturating_sub(1)))),
            _ => None,
        },
        (true, true) => None,
    };
    match parsed {
        None => RangeAnswer::Full,
        Some((s, _)) if s >= len => RangeAnswer::Unsatisfiable,
        Some((s, e)) => RangeAnswer::Partial(s, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_ranges() {
        let cases = [
            ("bytes=0-9", 100, RangeAnswer::Partial(0, 9)),
            ("bytes=90-", 100, RangeAnswer::Partial(90, 99)),
            ("bytes=-10", 100, RangeAnswer::Partial(90, 99)),
            ("bytes=50-500", 100, RangeAnswer::Partial(50, 99)),
            ("bytes=100-", 100, RangeAnswer::Unsatisfiable),
            ("bytes=-0", 100, RangeAnswer::Unsatisfiable),
            ("bytes=0-1,5-6", 100, RangeAnswer::Full),
            ("items=0-1", 100, RangeAnswer::Full),
            ("bytes=9-1", 100, RangeAnswer::Full),
            ("Bytes=0-9", 100, RangeAnswer::Partial(0, 9)),
            ("BYTES=-10", 100, RangeAnswer::Partial(90, 99)),
            ("bytes=-10", 0, RangeAnswer::Full),
            ("bytes=0-", 0, RangeAnswer::Unsatisfiable),
            ("byte", 100, RangeAnswer::Full),
        ];
        for (h, len, want) in cases {
            assert_eq!(byte_range(h, len), want, "{h}");
        }
    }
}
