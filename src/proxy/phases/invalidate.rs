//! Requests that are not cached lookups: invalidation after unsafe
//! methods (RFC 9111 section 4.4), the PURGE method, and upgrades.

use super::*;

impl Gateway {
    /// Unsafe methods that succeed invalidate the target URL and same-host
    /// Location and Content-Location (RFC 9111 section 4.4).
    pub(super) fn invalidate_after_unsafe(
        &self,
        gen: &Generation,
        view: &View<'_>,
        resp: &HeaderMap,
    ) {
        let scheme = view.scheme.as_str();
        let mut urls = vec![format!("{scheme}://{}{}", view.host, view.path)];
        if !view.query.is_empty() {
            urls[0] = format!("{}?{}", urls[0], view.query);
        }
        for name in [header::LOCATION, header::CONTENT_LOCATION] {
            let Some(v) = resp.get(&name).and_then(|v| v.to_str().ok()) else {
                continue;
            };
            if v.starts_with('/') {
                urls.push(format!("{scheme}://{}{v}", view.host));
            } else if let Ok(req) = OwnedRequest::new("GET", v, &[], None) {
                if req.host == view.host {
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
            if let Some(key) = gen.policy.cache_key(&d, &v) {
                let n = self.inner.store.purge(&key);
                tracing::debug!(key, purged = n, "invalidated after an unsafe method");
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
            .cache_key(&d, &as_get)
            .map(|k| self.inner.store.purge(&k))
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
        let (rule, backend) = {
            let view = View {
                method: req.method(),
                scheme,
                host,
                path: req.uri().path(),
                query: req.uri().query().unwrap_or(""),
                headers: req.headers(),
                client_ip: Some(conn.client_addr.ip()),
            };
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
            (d.rule, b)
        };
        log.cache = "bypass";
        let BackendRuntime::Pool(pool) = &gen.backends[backend] else {
            return Err(ProxyError::BadRequest("upgrades need a server backend"));
        };
        let mut upstream = Request::new(body::empty());
        *upstream.method_mut() = req.method().clone();
        *upstream.uri_mut() = req.uri().clone();
        *upstream.headers_mut() = req.headers().clone();
        for e in &rule.request_headers {
            e.apply(upstream.headers_mut());
        }
        hygiene::prepare_upstream_request(
            &mut upstream,
            &ForwardContext {
                client_ip: conn.client_addr.ip(),
                tls: conn.tls,
                trust_forwarded: false,
                via: &self.inner.via,
            },
        );
        let mut resp = pool
            .send(
                upstream,
                None,
                crate::upstream::Limits {
                    connect: rule.limits.connect_timeout,
                    first_byte: rule.limits.first_byte_timeout,
                    total: None,
                },
            )
            .await
            .map_err(|e| upstream_error(&e))?;
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            match crate::proxy::upgrade::PendingUpgrade::take(&mut req, &mut resp) {
                Ok(pending) => pending.spawn(),
                Err(e) => return Err(ProxyError::BadGateway(e.to_string())),
            }
        }
        Ok(resp.map(|b| b.boxed_unsync()))
    }
}
