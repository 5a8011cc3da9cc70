//! Requests that are not cached lookups: invalidation after unsafe
//! methods (RFC 9111 section 4.4), the PURGE method, and upgrades:
//! HTTP/1.1 `Upgrade` requests, and WebSockets over HTTP/2 (RFC 8441),
//! which reach the origin as HTTP/1.1 WebSocket upgrades.

use super::*;

impl Gateway {
    /// Unsafe methods that succeed invalidate the target URL, and the
    /// Location and Content-Location of the same origin: scheme, host and
    /// port (RFC 9111 section 4.4). `port` is the one the request's
    /// authority names, if any.
    pub(super) fn invalidate_after_unsafe(
        &self,
        gen: &Generation,
        view: &View<'_>,
        port: Option<u16>,
        resp: &HeaderMap,
    ) {
        let scheme = view.scheme.as_str();
        let default_port = |scheme: &str| if scheme == "https" { 443 } else { 80 };
        let port = port.unwrap_or(default_port(scheme));
        let mut urls = vec![format!("{scheme}://{}{}", view.host, view.path)];
        if !view.query.is_empty() {
            urls[0] = format!("{}?{}", urls[0], view.query);
        }
        for name in [header::LOCATION, header::CONTENT_LOCATION] {
            let Some(v) = resp.get(&name).and_then(|v| v.to_str().ok()) else {
                continue;
            };
            if v.starts_with('/') && !v.starts_with("//") {
                urls.push(format!("{scheme}://{}{v}", view.host));
            } else if let Ok(uri) = v.parse::<http::Uri>() {
                let same_origin = uri
                    .scheme_str()
                    .is_some_and(|s| s.eq_ignore_ascii_case(scheme))
                    && uri
                        .host()
                        .is_some_and(|h| h.eq_ignore_ascii_case(view.host))
                    && uri.port_u16().unwrap_or(default_port(scheme)) == port;
                if same_origin {
                    urls.push(v.to_string());
                }
            }
        }
        for url in urls {
            let Ok(req) = OwnedRequest::new("GET", &url, &[], None) else {
                continue;
            };
            let v = req.view();
            let d = gen.policy.decide(&v);
            if let Some(key) = gen.policy.url_key(&d, &v).map(UrlKey::new) {
                let n = key.purge(&self.inner.store);
                tracing::debug!(
                    key = key.url,
                    purged = n,
                    "invalidated after an unsafe method"
                );
            }
        }
    }

    /// `PURGE` on the main listener, from the addresses the policy allows.
    pub(super) fn purge_method(&self, gen: &Generation, view: &View<'_>) -> Response<ResponseBody> {
        let allowed = view
            .client_ip
            .is_some_and(|ip| gen.policy.model.purge.allow.iter().any(|n| n.contains(&ip)));
        if !allowed {
            return json(
                StatusCode::FORBIDDEN,
                r#"{"error":"PURGE is not allowed from this address"}"#.into(),
            );
        }
        let get = Method::GET;
        let as_get = View {
            method: &get,
            ..*view
        };
        let d = gen.policy.decide(&as_get);
        let purged = gen
            .policy
            .url_key(&d, &as_get)
            .map(|k| UrlKey::new(k).purge(&self.inner.store))
            .unwrap_or(0);
        json(StatusCode::OK, format!(r#"{{"purged":{purged}}}"#))
    }

    /// WebSocket and other upgrades: forwarded, never cached, then spliced.
    pub(super) async fn upgrade(
        &self,
        gen: &Generation,
        mut req: Request<RequestBody>,
        host: &str,
        scheme: Scheme,
        conn: &ConnInfo,
        log: &mut Log,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let (rule, backend, hash_key) = {
            let view = upgrade_view(&req, scheme, host, conn);
            let d = gen.policy.decide(&view);
            let Outcome::Forward(b) = d.rule.outcome else {
                let mut resp = synthetic(&d.rule.outcome, &self.inner.errors, req.headers());
                for e in &d.rule.response_headers {
                    e.apply(resp.headers_mut());
                }
                return Ok(resp);
            };
            // The throttle holds for upgrades too, or an Upgrade header would sidestep it.
            if let Some(limiter) = d.rule.limiter {
                if let Err(retry) = gen.limiters.check(limiter, &view) {
                    metrics::counter!("portico_throttled_total").increment(1);
                    return Err(ProxyError::TooManyRequests {
                        retry_after_secs: Some(retry.as_secs().max(1)),
                    });
                }
            }
            log.rule = d.index;
            log.backend = Some(b);
            // A `balance hash` backend keeps an upgrade (a WebSocket) on the
            // server the same key sends plain requests to.
            let hash_key =
                crate::policy::eval::hash_key(&gen.policy.model.backends[b].hash_key, &view);
            (d.rule, b, hash_key)
        };
        log.cache = "bypass";
        let BackendRuntime::Pool(pool) = &gen.backends[backend] else {
            return Err(ProxyError::BadRequest("upgrades need a server backend"));
        };
        // An HTTP/2 WebSocket (extended CONNECT) becomes an HTTP/1.1 upgrade.
        let h2_websocket = req.method() == Method::CONNECT;
        // The host the request was routed by goes in `Host` (an
        // absolute-form target's or HTTP/2's authority, as the client wrote
        // it, port included, in place of the client's `Host`), and in
        // `X-Forwarded-Host` whatever the rule's edits do to `Host`: as for
        // every other request.
        let client_host = target_authority(req.uri(), req.headers());
        let mut upstream = Request::new(body::empty());
        *upstream.uri_mut() = req.uri().clone();
        *upstream.headers_mut() = req.headers().clone();
        upstream.headers_mut().remove(header::FORWARDED);
        if req.uri().authority().is_some() {
            if let Some(v) = &client_host {
                upstream.headers_mut().insert(header::HOST, v.clone());
            }
        }
        let key = if h2_websocket {
            *upstream.method_mut() = Method::GET;
            let key = websocket::new_key()?;
            let fields = upstream.headers_mut();
            fields.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            fields.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            fields.insert(header::SEC_WEBSOCKET_KEY, key.clone());
            Some(key)
        } else {
            *upstream.method_mut() = req.method().clone();
            None
        };
        for e in &rule.request_headers {
            e.apply(upstream.headers_mut());
        }
        let forwarded = hygiene::forwarding(
            upstream.headers_mut(),
            client_host,
            &ForwardContext {
                client_ip: conn.proxied_by.unwrap_or(conn.client_addr.ip()),
                tls: conn.tls,
                trust_forwarded: conn.proxied_by.is_some(),
                via: hygiene::default_via(req.version()),
            },
        );
        let mut lines = Vec::new();
        forwarded.encode(&mut lines);
        let mut resp = pool
            .send(
                upstream,
                &lines,
                hash_key.as_deref().map(str::as_bytes),
                crate::upstream::Limits {
                    connect: rule.limits.connect_timeout,
                    first_byte: rule.limits.first_byte_timeout,
                    total: None,
                },
            )
            .await
            .map_err(|e| upstream_error(&e))?;
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(key) = &key {
                let accept = resp.headers().get(header::SEC_WEBSOCKET_ACCEPT);
                if accept != Some(&websocket::accept_for(key)) {
                    return Err(ProxyError::BadGateway(
                        "the origin's WebSocket accept does not match the key".into(),
                    ));
                }
            }
            // The server is busy with this connection until the splice
            // ends, not just for the 101's empty body: least_conn must see it.
            let load = resp.body_mut().take_load();
            match crate::proxy::upgrade::PendingUpgrade::take(&mut req, &mut resp) {
                // The listener splices it, as one of its connections.
                Ok(pending) => pending.holding(load).attach(&mut resp),
                Err(e) => return Err(ProxyError::BadGateway(e.to_string())),
            }
            if h2_websocket {
                // RFC 8441 section 5: the stream opens with a 2xx; what the
                // HTTP/1.1 handshake adds stays on the origin's side.
                *resp.status_mut() = StatusCode::OK;
                let fields = resp.headers_mut();
                for name in [
                    header::CONNECTION,
                    header::UPGRADE,
                    header::SEC_WEBSOCKET_ACCEPT,
                    header::CONTENT_LENGTH,
                ] {
                    fields.remove(name);
                }
            }
        } else if h2_websocket && resp.status().is_success() {
            // A 2xx that is not a switch would read as an open stream.
            return Err(ProxyError::BadGateway(format!(
                "the origin answered the WebSocket upgrade with {}",
                resp.status()
            )));
        } else {
            // The origin did not switch: its answer is an ordinary one,
            // and gets what any forwarded answer gets, the response rules
            // and the rule's own edits above all (a `response_header remove`
            // must not be side-stepped by adding an Upgrade).
            let status = resp.status();
            hygiene::strip_hop_by_hop(resp.headers_mut(), false);
            strip_targeted(gen, resp.headers_mut());
            let view = upgrade_view(&req, scheme, host, conn);
            let actions = gen.policy.decide_response(
                &view,
                &ResponseView {
                    status: status.as_u16(),
                    headers: resp.headers(),
                },
            );
            for e in &actions.headers {
                e.apply(resp.headers_mut());
            }
            for e in &rule.response_headers {
                e.apply(resp.headers_mut());
            }
            set_cache_status(
                resp.headers_mut(),
                &CacheStatus::Forward {
                    reason: Forward::Bypass,
                    status: Some(status.as_u16()),
                    ttl: None,
                    stored: false,
                    collapsed: false,
                    detail: None,
                },
            );
        }
        Ok(resp.map(|b| b.boxed_unsync()))
    }
}

/// What the rules see of an upgrade: an HTTP/2 WebSocket (extended
/// CONNECT) as the GET it is in HTTP/1.1.
fn upgrade_view<'a>(
    req: &'a Request<RequestBody>,
    scheme: Scheme,
    host: &'a str,
    conn: &ConnInfo,
) -> View<'a> {
    let method = if req.method() == Method::CONNECT {
        &Method::GET
    } else {
        req.method()
    };
    View {
        method,
        scheme,
        host,
        path: req.uri().path(),
        query: req.uri().query().unwrap_or(""),
        headers: req.headers(),
        client_ip: Some(conn.client_addr.ip()),
    }
}

/// The HTTP/1.1 WebSocket handshake's key and accept (RFC 6455 section 4).
mod websocket {
    use base64::Engine as _;
    use http::HeaderValue;
    use ring::rand::SecureRandom as _;

    use super::ProxyError;

    const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

    /// A fresh `Sec-WebSocket-Key`: 16 random bytes in base64.
    pub(super) fn new_key() -> Result<HeaderValue, ProxyError> {
        let mut nonce = [0u8; 16];
        ring::rand::SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| ProxyError::Internal("no randomness for a WebSocket key".into()))?;
        let key = base64::engine::general_purpose::STANDARD.encode(nonce);
        Ok(HeaderValue::from_str(&key).expect("base64 is a valid field value"))
    }

    /// The `Sec-WebSocket-Accept` an origin must answer `key` with.
    pub(super) fn accept_for(key: &HeaderValue) -> HeaderValue {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
        ctx.update(key.as_bytes());
        ctx.update(GUID.as_bytes());
        let accept = base64::engine::general_purpose::STANDARD.encode(ctx.finish());
        HeaderValue::from_str(&accept).expect("base64 is a valid field value")
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn accept_matches_the_rfc_example() {
            // RFC 6455 section 1.3.
            let key = HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ==");
            assert_eq!(accept_for(&key), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        }

        #[test]
        fn keys_are_fresh_16_byte_nonces() {
            let (a, b) = (new_key().unwrap(), new_key().unwrap());
            assert_ne!(a, b);
            let raw = base64::engine::general_purpose::STANDARD
                .decode(a.as_bytes())
                .unwrap();
            assert_eq!(raw.len(), 16);
        }
    }
}
