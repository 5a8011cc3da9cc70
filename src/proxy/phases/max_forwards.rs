//! Max-Forwards (RFC 9110 §7.6.2): how many more hops a TRACE or OPTIONS
//! request may take. A request that may still go on is forwarded with one
//! hop less; one with none left is answered here, Portico being its final
//! recipient (RFC 9110 §9.3.7 and §9.3.8). The field means nothing for
//! other methods, which pass it on untouched and pay no lookup for it.

use super::*;

/// What a request's Max-Forwards asks of this hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Hops {
    /// Forward the request as it is: not TRACE or OPTIONS, or without
    /// Max-Forwards.
    Unlimited,
    /// Forward it with Max-Forwards set to this, one less than received.
    Left(u64),
    /// Answer it here: no hop is left.
    Exhausted,
}

/// What Max-Forwards asks of a request with `method` and `headers`; a
/// TRACE or OPTIONS whose field is not one decimal integer is refused
/// (400). The method is looked at first, so that every other request costs
/// a comparison and no field lookup.
#[inline]
pub(super) fn hops(method: &Method, headers: &HeaderMap) -> Result<Hops, ProxyError> {
    if *method != Method::TRACE && *method != Method::OPTIONS {
        return Ok(Hops::Unlimited);
    }
    let mut fields = headers.get_all(header::MAX_FORWARDS).iter();
    let Some(field) = fields.next() else {
        return Ok(Hops::Unlimited);
    };
    // `Max-Forwards = 1*DIGIT`: a second line makes a list, which is not one.
    let digits = field.as_bytes();
    if fields.next().is_some() || digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(ProxyError::BadRequest("invalid Max-Forwards"));
    }
    // Any count of hops is one; past u64, the difference is moot.
    let n = digits.iter().fold(0u64, |n, &d| {
        n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
    });
    Ok(match n {
        0 => Hops::Exhausted,
        n => Hops::Left(n - 1),
    })
}

/// The answer of the final recipient: for OPTIONS, 200 with the methods
/// `allow` lists and no content; for TRACE, 200 with the request head as
/// received (`message/http`), less the fields likely to hold secrets
/// ([`is_sensitive`]). The head is as the rules saw it: the fields the
/// client's `Connection` names are gone, and the target's percent-escapes
/// are normalised.
pub(super) fn answer(parts: &http::request::Parts, allow: &'static str) -> Response<ResponseBody> {
    if parts.method != Method::TRACE {
        let mut resp = Response::new(body::empty());
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(allow));
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(0));
        return resp;
    }
    let mut resp = Response::new(body::full(reflect(parts)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("message/http"),
    );
    // Never read as anything but the message it is.
    resp.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// A request head as an HTTP/1.1 message (RFC 9112 §2.1), without the
/// fields [`is_sensitive`] names.
fn reflect(parts: &http::request::Parts) -> Vec<u8> {
    let target = parts.uri.to_string();
    let mut out = Vec::with_capacity(64 + target.len() + parts.headers.len() * 32);
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.push(b' ');
    out.extend_from_slice(format!("{:?}", parts.version).as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        if is_sensitive(name) {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Whether a request field is likely to hold sensitive data, and so stays
/// out of a TRACE reflection (RFC 9110 §9.3.8): credentials
/// (`Authorization`, `Proxy-Authorization`), cookies, and any field whose
/// name says it carries a token, a key, a secret, a password, a session,
/// a signature or who the client is (`X-Api-Key`, `X-Auth-Token`,
/// `X-CSRF-Token`, `X-Amz-Security-Token`, `X-Forwarded-User`,
/// `X-Forwarded-Client-Cert`, `X-Amzn-Oidc-Data`, ...). A reflection is read by whatever script
/// sent the request, which must not learn what the browser or an
/// intermediary added to it; leaving out a harmless field costs nothing.
fn is_sensitive(name: &HeaderName) -> bool {
    const WORDS: [&str; 18] = [
        "auth",
        "user",
        "email",
        "principal",
        "cert",
        "oidc",
        "identity",
        "cookie",
        "token",
        "key",
        "secret",
        "passw",
        "session",
        "csrf",
        "xsrf",
        "signature",
        "credential",
        "jwt",
    ];
    // Names are lower case.
    let name = name.as_str();
    // The one common field that names software, not a person.
    name != "user-agent" && WORDS.iter().any(|w| name.contains(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_forwards_counts_trace_and_options_only() {
        let table: [(Method, &[&str], Result<Hops, ()>); 14] = [
            (Method::TRACE, &[], Ok(Hops::Unlimited)),
            (Method::OPTIONS, &["0"], Ok(Hops::Exhausted)),
            (Method::TRACE, &["0"], Ok(Hops::Exhausted)),
            (Method::TRACE, &["000"], Ok(Hops::Exhausted)),
            (Method::OPTIONS, &["1"], Ok(Hops::Left(0))),
            (Method::TRACE, &["3"], Ok(Hops::Left(2))),
            (
                Method::TRACE,
                &["99999999999999999999999"],
                Ok(Hops::Left(u64::MAX - 1)),
            ),
            (Method::TRACE, &["x"], Err(())),
            (Method::OPTIONS, &["-1"], Err(())),
            (Method::OPTIONS, &["+1"], Err(())),
            (Method::TRACE, &["1, 2"], Err(())),
            (Method::TRACE, &["2", "2"], Err(())),
            (Method::TRACE, &[""], Err(())),
            // Other methods pass any value on untouched.
            (Method::GET, &["0"], Ok(Hops::Unlimited)),
        ];
        for (method, values, want) in table {
            let mut headers = HeaderMap::new();
            for v in values {
                headers.append(header::MAX_FORWARDS, HeaderValue::from_static(v));
            }
            let got = hops(&method, &headers).map_err(|_| ());
            assert_eq!(got, want, "{method} {values:?}");
        }
        let mut bad = HeaderMap::new();
        bad.insert(header::MAX_FORWARDS, HeaderValue::from_static("x"));
        for method in [Method::GET, Method::HEAD, Method::POST, Method::DELETE] {
            assert_eq!(hops(&method, &bad).unwrap(), Hops::Unlimited, "{method}");
        }
    }

    #[test]
    fn secrets_stay_out_of_a_reflection() {
        for name in [
            "authorization",
            "proxy-authorization",
            "cookie",
            "x-api-key",
            "x-auth-token",
            "x-csrf-token",
            "x-amz-security-token",
            "x-session-id",
            "x-client-secret",
            "x-forwarded-user",
            "x-forwarded-email",
            "x-amzn-oidc-data",
            "x-ms-client-principal",
            "x-forwarded-client-cert",
            "x-ssl-client-cert",
        ] {
            assert!(is_sensitive(&HeaderName::from_static(name)), "{name}");
        }
        for name in ["host", "accept", "user-agent", "via", "x-request-id"] {
            assert!(!is_sensitive(&HeaderName::from_static(name)), "{name}");
        }
    }

    #[test]
    fn a_trace_is_reflected_as_a_message() {
        let (parts, ()) = Request::builder()
            .method(Method::TRACE)
            .uri("/a?b=1")
            .header("host", "a.test")
            .header("cookie", "s=1")
            .header("x-trace", "1")
            .header("x-trace", "2")
            .body(())
            .unwrap()
            .into_parts();
        let text = String::from_utf8(reflect(&parts)).unwrap();
        assert_eq!(
            text,
            "TRACE /a?b=1 HTTP/1.1\r\nhost: a.test\r\nx-trace: 1\r\nx-trace: 2\r\n\r\n"
        );
    }
}
