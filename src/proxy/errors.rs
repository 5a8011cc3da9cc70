//! The one place where a failure on the request path becomes a status code and
//! a short error page.
//!
//! Every phase reports a [`ProxyError`]; [`ErrorPages::respond`] turns it into
//! a response whose body is plain text, or a minimal HTML page when the client
//! prefers HTML. A hook lets the integrator add headers such as `Cache-Status`
//! (RFC 9211) to every error response in one place.

use std::sync::Arc;

use http::header::{
    HeaderMap, HeaderValue, ACCEPT, ALLOW, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER,
};
use http::{Response, StatusCode};

use super::body::{self, BodyError, ResponseBody};

/// A failure on the request path, with the status it maps to.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request is malformed (400, RFC 9110 §15.5.1).
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// No route or cached object matches (404, RFC 9110 §15.5.5).
    #[error("not found")]
    NotFound,
    /// The method is not allowed; `allow` lists those that are (405, RFC 9110
    /// §15.5.6 requires an `Allow` field).
    #[error("method not allowed")]
    MethodNotAllowed {
        /// The `Allow` field value, e.g. `GET, HEAD`.
        allow: HeaderValue,
    },
    /// The request body is larger than allowed (413, RFC 9110 §15.5.14).
    #[error("request body exceeds {limit} bytes")]
    PayloadTooLarge {
        /// The configured maximum in bytes.
        limit: u64,
    },
    /// The client stopped sending its request body (408, RFC 9110
    /// §15.5.9).
    #[error("the request body stalled")]
    RequestTimeout,
    /// A rate limiter refused the request (429, RFC 6585 §4).
    #[error("too many requests")]
    TooManyRequests {
        /// Seconds until a retry may succeed, sent as `Retry-After`.
        retry_after_secs: Option<u64>,
    },
    /// The request header section is too large (431, RFC 6585 §5).
    #[error("request header fields too large")]
    HeaderTooLarge,
    /// The request target is longer than the server reads (414, RFC 9112
    /// §3).
    #[error("request target too long")]
    UriTooLong,
    /// The request needs something this server does not implement, such
    /// as a transfer coding it cannot decode (501, RFC 9110 §15.6.2).
    #[error("not implemented: {0}")]
    NotImplemented(&'static str),
    /// A bug or an unexpected internal failure (500).
    #[error("internal error: {0}")]
    Internal(String),
    /// The origin could not be reached or sent an invalid response (502).
    #[error("bad gateway: {0}")]
    BadGateway(String),
    /// No healthy origin, or the proxy is overloaded or draining (503).
    #[error("service unavailable")]
    ServiceUnavailable {
        /// Seconds until a retry may succeed, sent as `Retry-After`.
        retry_after_secs: Option<u64>,
    },
    /// The origin did not answer in time (504).
    #[error("gateway timeout")]
    GatewayTimeout,
    /// The request said `only-if-cached` and nothing stored can answer it
    /// (504, RFC 9111 §5.2.1.7); the origin was not asked.
    #[error("nothing stored for an only-if-cached request")]
    NotCached,
}

impl ProxyError {
    /// The status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::HeaderTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::UriTooLong => StatusCode::URI_TOO_LONG,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            Self::BadGateway(_) => StatusCode::BAD_GATEWAY,
            Self::ServiceUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::GatewayTimeout | Self::NotCached => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The short text shown to the client. Internal details (origin addresses,
    /// error chains) stay in the logs, never in the page.
    pub fn public_message(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "The request could not be understood.",
            Self::NotFound => "Nothing is served at this address.",
            Self::MethodNotAllowed { .. } => "This method is not allowed here.",
            Self::PayloadTooLarge { .. } => "The request body is too large.",
            Self::RequestTimeout => "The request body did not arrive in time.",
            Self::TooManyRequests { .. } => "Too many requests; slow down and retry later.",
            Self::HeaderTooLarge => "The request headers are too large.",
            Self::UriTooLong => "The request target is too long.",
            Self::Internal(_) => "An internal error occurred.",
            Self::NotImplemented(_) => "The request uses a feature this server does not support.",
            Self::BadGateway(_) => "The origin server could not be reached or answered badly.",
            Self::ServiceUnavailable { .. } => "The service is unavailable; retry later.",
            Self::GatewayTimeout => "The origin server did not answer in time.",
            Self::NotCached => {
                "Nothing stored can answer this request, which asked for a stored response only."
            }
        }
    }
}

impl From<BodyError> for ProxyError {
    fn from(e: BodyError) -> Self {
        match e {
            BodyError::TooLarge { limit } => Self::PayloadTooLarge { limit },
            BodyError::Transport(_) => Self::BadRequest("unreadable request body"),
        }
    }
}

/// Adds headers to every error response, e.g. `Cache-Status` (RFC 9211).
pub type ErrorHook = Arc<dyn Fn(&ProxyError, &mut HeaderMap) + Send + Sync>;

/// Renders [`ProxyError`]s into responses. Cheap to clone.
#[derive(Clone, Default)]
pub struct ErrorPages {
    hook: Option<ErrorHook>,
}

impl std::fmt::Debug for ErrorPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ErrorPages")
            .field("hook", &self.hook.is_some())
            .finish()
    }
}

impl ErrorPages {
    /// Error pages without a hook.
    pub fn new() -> Self {
        Self::default()
    }

    /// Error pages that call `hook` on the headers of every error response.
    pub fn with_hook(hook: ErrorHook) -> Self {
        Self { hook: Some(hook) }
    }

    /// The response for `error`. `request_headers` decides between HTML and
    /// plain text (HTML when `Accept` names `text/html`); pass `None` when the
    /// request is unknown, as for a header section that could not be parsed.
    pub fn respond(
        &self,
        error: &ProxyError,
        request_headers: Option<&HeaderMap>,
    ) -> Response<ResponseBody> {
        let status = error.status();
        let html = request_headers.is_some_and(prefers_html);
        let reason = status.canonical_reason().unwrap_or("Error");
        let (content_type, text) = if html {
            (
                HeaderValue::from_static("text/html; charset=utf-8"),
                format!(
                    "<!DOCTYPE html>\n<html><head><title>{code} {reason}</title></head>\
                     <body><h1>{code} {reason}</h1><p>{msg}</p></body></html>\n",
                    code = status.as_u16(),
                    msg = error.public_message(),
                ),
            )
        } else {
            (
                HeaderValue::from_static("text/plain; charset=utf-8"),
                format!("{} {reason}\n{}\n", status.as_u16(), error.public_message()),
            )
        };
        let mut response = Response::new(body::full(text));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, content_type);
        // Error pages are generated per request; a shared cache must not keep them.
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        match error {
            ProxyError::MethodNotAllowed { allow } => {
                headers.insert(ALLOW, allow.clone());
            }
            ProxyError::TooManyRequests {
                retry_after_secs: Some(secs),
            }
            | ProxyError::ServiceUnavailable {
                retry_after_secs: Some(secs),
            } => {
                headers.insert(RETRY_AFTER, HeaderValue::from(*secs));
            }
            _ => {}
        }
        if let Some(hook) = &self.hook {
            hook(error, headers);
        }
        response
    }
}

/// True when the `Accept` field names `text/html` with a non-zero weight.
fn prefers_html(headers: &HeaderMap) -> bool {
    headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|range| {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("");
            media.eq_ignore_ascii_case("text/html")
                && !parts.any(|p| {
                    p.strip_prefix("q=")
                        .and_then(|q| q.parse::<f32>().ok())
                        .is_some_and(|q| q == 0.0)
                })
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn all_errors() -> Vec<(ProxyError, u16)> {
        vec![
            (ProxyError::BadRequest("x"), 400),
            (ProxyError::NotFound, 404),
            (
                ProxyError::MethodNotAllowed {
                    allow: HeaderValue::from_static("GET, HEAD"),
                },
                405,
            ),
            (ProxyError::PayloadTooLarge { limit: 10 }, 413),
            (ProxyError::RequestTimeout, 408),
            (
                ProxyError::TooManyRequests {
                    retry_after_secs: Some(3),
                },
                429,
            ),
            (ProxyError::HeaderTooLarge, 431),
            (ProxyError::Internal("boom".into()), 500),
            (ProxyError::NotImplemented("x"), 501),
            (ProxyError::BadGateway("10.0.0.1:80 refused".into()), 502),
            (
                ProxyError::ServiceUnavailable {
                    retry_after_secs: None,
                },
                503,
            ),
            (ProxyError::GatewayTimeout, 504),
            (ProxyError::NotCached, 504),
        ]
    }

    async fn body_text(resp: Response<ResponseBody>) -> String {
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn every_error_maps_to_its_status_with_a_plain_page() {
        let pages = ErrorPages::new();
        for (error, code) in all_errors() {
            let resp = pages.respond(&error, None);
            assert_eq!(resp.status().as_u16(), code, "{error:?}");
            assert_eq!(resp.headers()[CONTENT_TYPE], "text/plain; charset=utf-8");
            assert_eq!(resp.headers()[CACHE_CONTROL], "no-store");
            let text = body_text(resp).await;
            assert!(text.starts_with(&code.to_string()), "{text}");
            assert!(text.contains(error.public_message()));
        }
    }

    #[tokio::test]
    async fn internal_details_stay_out_of_the_page() {
        let pages = ErrorPages::new();
        let resp = pages.respond(&ProxyError::BadGateway("10.0.0.1:80 refused".into()), None);
        assert!(!body_text(resp).await.contains("10.0.0.1"));
    }

    #[tokio::test]
    async fn html_when_the_client_accepts_it() {
        let pages = ErrorPages::new();
        let mut headers = HeaderMap::new();
        headers.insert(
            ACCEPT,
            HeaderValue::from_static("text/html,application/xhtml+xml;q=0.9"),
        );
        let resp = pages.respond(&ProxyError::NotFound, Some(&headers));
        assert_eq!(resp.headers()[CONTENT_TYPE], "text/html; charset=utf-8");
        assert!(body_text(resp).await.contains("<h1>404 Not Found</h1>"));
    }

    #[test]
    fn accept_table() {
        let cases = [
            ("text/html", true),
            ("TEXT/HTML; q=0.5", true),
            ("text/html;q=0", false),
            ("application/json", false),
            ("*/*", false),
            ("application/json, text/html", true),
        ];
        for (accept, want) in cases {
            let mut headers = HeaderMap::new();
            headers.insert(ACCEPT, HeaderValue::from_static(accept));
            assert_eq!(prefers_html(&headers), want, "{accept}");
        }
    }

    #[test]
    fn allow_and_retry_after_are_set() {
        let pages = ErrorPages::new();
        let resp = pages.respond(
            &ProxyError::MethodNotAllowed {
                allow: HeaderValue::from_static("GET, HEAD"),
            },
            None,
        );
        assert_eq!(resp.headers()[ALLOW], "GET, HEAD");
        let resp = pages.respond(
            &ProxyError::TooManyRequests {
                retry_after_secs: Some(7),
            },
            None,
        );
        assert_eq!(resp.headers()[RETRY_AFTER], "7");
    }

    #[test]
    fn hook_adds_headers_to_every_error() {
        let pages = ErrorPages::with_hook(Arc::new(|_, headers: &mut HeaderMap| {
            headers.insert(
                "cache-status",
                HeaderValue::from_static("portico; fwd=uri-miss"),
            );
        }));
        for (error, _) in all_errors() {
            let resp = pages.respond(&error, None);
            assert_eq!(resp.headers()["cache-status"], "portico; fwd=uri-miss");
        }
    }
}
