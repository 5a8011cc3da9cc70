//! Filling the cache: sending a request upstream, deciding what may be
//! stored (RFC 9111 section 3 and the response rules), storing it,
//! revalidating stale entries, and refreshing them in the background.

use super::*;

impl Gateway {
    /// Sends a request to a backend and returns the response head with its body.
    pub(super) async fn fetch(
        &self,
        gen: &Generation,
        backend: BackendId,
        rule: &RuleSpec,
        view: &View<'_>,
        upstream: Outbound,
        body: ResponseBody,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        match &gen.backends[backend] {
            BackendRuntime::Static(cfg) => {
                let resp = static_files::serve(cfg, &upstream.head).await;
                Ok(resp.map(|b| b.map_err(BoxError::from).boxed_unsync()))
            }
            BackendRuntime::Pool(pool) => {
                let spec = &gen.policy.model.backends[backend];
                let hash_key = crate::policy::eval::hash_key(&spec.hash_key, view);
                let (parts, ()) = upstream.head.into_parts();
                let req = Request::from_parts(parts, body);
                let limits = crate::upstream::Limits {
                    connect: rule.limits.connect_timeout,
                    first_byte: rule.limits.first_byte_timeout,
                    total: rule.limits.total_timeout,
                };
                let result = pool
                    .send(
                        req,
                        &upstream.forwarded,
                        hash_key.as_deref().map(str::as_bytes),
                        limits,
                    )
                    .await;
                match result {
                    Ok(resp) => Ok(resp.map(|b| b.boxed_unsync())),
                    Err(e) => Err(upstream_error(&e)),
                }
            }
        }
    }

    /// Fetches a cacheable request and stores what may be stored.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn fill(
        &self,
        gen: &Generation,
        rule: &RuleSpec,
        key: &str,
        parts: &http::request::Parts,
        conn: &ConnInfo,
        host: &str,
        stale: Option<&Arc<Entry>>,
    ) -> Result<Filled, ProxyError> {
        let Outcome::Forward(backend) = rule.outcome else {
            return Err(ProxyError::Internal(
                "a cached rule without a backend".into(),
            ));
        };
        let cache = rule.cache.as_ref().expect("only cached rules fill");
        let mut upstream = build_upstream(
            parts,
            rule,
            conn,
            hygiene::default_via(parts.version),
            true,
            Hops::Unlimited,
        );
        // A variant's key keeps only the coding Portico prefers among those
        // the client accepts (`br`, `gzip` or `identity`): the origin is
        // asked for that one alone, so that what is stored under the key is
        // what every request with that key can decode. A rule that sets the
        // field itself keeps its value.
        if !rule
            .request_headers
            .iter()
            .any(|e| e.name == header::ACCEPT_ENCODING)
        {
            upstream.head.headers_mut().insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static(control::preferred_encoding(&parts.headers)),
            );
        }
        if let Some(entry) = stale {
            control::add_validators(&entry.headers(), upstream.head.headers_mut());
        }
        let view = View {
            method: &parts.method,
            scheme: client_scheme(conn, &parts.headers),
            host,
            path: parts.uri.path(),
            query: parts.uri.query().unwrap_or(""),
            headers: &parts.headers,
            client_ip: Some(conn.client_addr.ip()),
        };
        let request_time = SystemTime::now();
        let resp = self
            .fetch(gen, backend, rule, &view, upstream, body::empty())
            .await?;
        let response_time = SystemTime::now();
        let (mut head, resp_body) = resp.into_parts();
        hygiene::strip_hop_by_hop(&mut head.headers, false);
        let policy = &gen.policy;
        let storage = &policy.model.storage;

        // A 304 to our validators refreshes the stored copy (RFC 9111 section
        // 4.3.4), unless its strong tag says it is about another
        // representation: that one is then fetched whole.
        if head.status == StatusCode::NOT_MODIFIED {
            if stale.is_some_and(|e| !control::not_modified_selects(&e.headers(), &head.headers)) {
                tracing::debug!(key, "a 304 named another representation; fetching it whole");
                drop(resp_body);
                return Box::pin(self.fill(gen, rule, key, parts, conn, host, None)).await;
            }
            if let Some(entry) = stale {
                metrics::counter!("portico_cache_revalidations_total", "result" => "304")
                    .increment(1);
                let mut headers = entry.headers();
                control::merge_not_modified(&mut headers, &head.headers);
                // A cookie the 304 sets is for this client, never stored.
                let cookies: Vec<HeaderValue> = head
                    .headers
                    .get_all(header::SET_COOKIE)
                    .iter()
                    .cloned()
                    .collect();
                let refreshed = self.make_entry(
                    gen,
                    rule,
                    &view,
                    entry.status,
                    (headers.clone(), &head.headers),
                    entry.body_slice().to_vec(),
                    parts,
                    request_time,
                    response_time,
                );
                if let Ok(e) = refreshed {
                    let (e, stored) = self.inner.store.store_response_shared(key, e).await;
                    return Ok(Filled::Stored(e, 304, cookies, stored));
                }
                // The refreshed copy may no longer be stored: pass the old
                // body once, with the stored fields as the 304 updated them
                // (its own head describes no body) and the response rules'
                // edits made again to those it replaced.
                refreshed_edits(gen, &view, entry.status, &mut headers, &head.headers);
                head.headers = headers;
                for c in cookies {
                    head.headers.append(header::SET_COOKIE, c);
                }
                head.status = entry.status;
                let resp = Response::from_parts(head, body::full(entry.body()));
                return Ok(Filled::Passed(resp, "not-storable", 304));
            }
        }

        let actions = policy.decide_response(
            &view,
            &ResponseView {
                status: head.status.as_u16(),
                headers: &head.headers,
            },
        );
        for e in &actions.headers {
            e.apply(&mut head.headers);
        }
        if stale.is_some() && head.status.is_server_error() {
            // An error never replaces the stored copy: it stays for
            // stale-if-error and for later revalidation (RFC 5861 section
            // 4). Passed on, it has had the response rules' edits.
            metrics::counter!("portico_cache_not_stored_total", "reason" => "server-error")
                .increment(1);
            return Ok(Filled::passed(
                Response::from_parts(head, resp_body),
                "server-error",
            ));
        } else if stale.is_some() {
            metrics::counter!("portico_cache_revalidations_total", "result" => "200").increment(1);
        }
        let overrides = overrides(cache, &actions);
        let directives = control::response_directives(&head.headers, &gen.targeted);
        let verdict = if actions.no_store {
            Err("policy")
        } else {
            control::storable(
                &Method::GET,
                &parts.headers,
                head.status,
                &head.headers,
                &directives,
                &overrides,
            )
            .map_err(|n| n.as_str())
        };
        if let Err(reason) = verdict {
            metrics::counter!("portico_cache_not_stored_total", "reason" => reason).increment(1);
            return Ok(Filled::passed(
                Response::from_parts(head, resp_body),
                reason,
            ));
        }
        let max = storage.max_object;
        if content_length(&head.headers).is_some_and(|n| n > max) {
            metrics::counter!("portico_cache_not_stored_total", "reason" => "too-large")
                .increment(1);
            return Ok(Filled::passed(
                Response::from_parts(head, resp_body),
                "too-large",
            ));
        }
        if resp_body.size_hint().exact().is_none() {
            // Of unknown length (chunked, or up to the close): it may never
            // end (an event stream), so it goes to the client as it arrives
            // and is stored if it ends within the largest object.
            let pending = PendingStore {
                gateway: self.clone(),
                key: key.to_string(),
                status: head.status,
                headers: head.headers.clone(),
                request_headers: parts.headers.clone(),
                request_time,
                response_time,
                directives,
                overrides,
                heuristic_max: storage.heuristic_max,
            };
            return Ok(Filled::Streaming(
                Response::from_parts(head, resp_body),
                Box::new(pending),
                max as usize,
            ));
        }
        let (body_bytes, rest) = collect_up_to(resp_body, max as usize).await?;
        if let Some(rest) = rest {
            // Larger than the largest object: stream the rest through, store nothing.
            metrics::counter!("portico_cache_not_stored_total", "reason" => "too-large")
                .increment(1);
            let first =
                http_body_util::Full::new(Bytes::from(body_bytes)).map_err(|never| match never {});
            let chained = Chain {
                first: Some(first),
                rest,
            };
            return Ok(Filled::passed(
                Response::from_parts(head, chained.boxed_unsync()),
                "too-large",
            ));
        }
        let cookies: Vec<HeaderValue> = head
            .headers
            .get_all(header::SET_COOKIE)
            .iter()
            .cloned()
            .collect();
        let received = Received {
            status: head.status,
            headers: head.headers,
            body: body_bytes,
            request_headers: &parts.headers,
            request_time,
            response_time,
        };
        let entry =
            match Entry::from_response(received, &directives, &overrides, storage.heuristic_max) {
                Ok(e) => e,
                Err(n) => {
                    return Err(ProxyError::Internal(format!(
                        "entry refused after storable: {n}"
                    )));
                }
            };
        let (entry, stored) = self.inner.store.store_response_shared(key, entry).await;
        if !stored {
            metrics::counter!("portico_cache_not_stored_total", "reason" => "store-refused")
                .increment(1);
        }
        let status = entry.status.as_u16();
        Ok(Filled::Stored(entry, status, cookies, stored))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn make_entry(
        &self,
        gen: &Generation,
        rule: &RuleSpec,
        view: &View<'_>,
        status: StatusCode,
        (mut headers, replaced): (HeaderMap, &HeaderMap),
        body: Vec<u8>,
        parts: &http::request::Parts,
        request_time: SystemTime,
        response_time: SystemTime,
    ) -> Result<Entry, &'static str> {
        let cache = rule.cache.as_ref().ok_or("bypass")?;
        let actions = refreshed_edits(gen, view, status, &mut headers, replaced);
        if actions.no_store {
            return Err("policy");
        }
        let overrides = overrides(cache, &actions);
        let directives = control::response_directives(&headers, &gen.targeted);
        control::storable(
            &Method::GET,
            &parts.headers,
            status,
            &headers,
            &directives,
            &overrides,
        )
        .map_err(|n| n.as_str())?;
        Entry::from_response(
            Received {
                status,
                headers,
                body,
                request_headers: &parts.headers,
                request_time,
                response_time,
            },
            &directives,
            &overrides,
            gen.policy.model.storage.heuristic_max,
        )
        .map_err(|n| n.as_str())
    }

    /// stale-while-revalidate: one background refresh per key (RFC 5861 section 3).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn refresh_in_background(
        &self,
        gen: &Arc<Generation>,
        d: &Decision<'_>,
        key: &str,
        parts: &http::request::Parts,
        conn: &ConnInfo,
        host: &str,
        entry: &Arc<Entry>,
    ) {
        let Role::Leader(leader) = self.inner.coalescer.join(key) else {
            return;
        };
        let Some(index) = d.index else { return };
        let this = self.clone();
        let gen = gen.clone();
        let key = key.to_string();
        let host = host.to_string();
        let conn = conn.clone();
        let entry = entry.clone();
        let mut head = Request::new(());
        *head.method_mut() = Method::GET;
        *head.uri_mut() = parts.uri.clone();
        *head.headers_mut() = parts.headers.clone();
        let (bg_parts, ()) = head.into_parts();
        tokio::spawn(async move {
            let rule = &gen.policy.model.rules[index];
            match this
                .fill(&gen, rule, &key, &bg_parts, &conn, &host, Some(&entry))
                .await
            {
                Ok(Filled::Stored(e, ..)) => leader.publish(Flight::Ready(e)),
                Ok(Filled::Passed(..)) => leader.publish(Flight::NotStorable),
                Ok(Filled::Streaming(resp, pending, max)) => {
                    // Nobody reads it here: read it to its end, to store it.
                    let mut body = tee(resp, pending, max, Some(leader)).into_body();
                    while let Some(frame) = body.frame().await {
                        if frame.is_err() {
                            break;
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(key, error = %e, "background refresh failed");
                    drop(leader);
                }
            }
        });
    }
}

/// The result of filling the cache for a request.
pub(super) enum Filled {
    /// Stored (or refreshed); deliver from the entry. The status the origin
    /// answered, the `Set-Cookie` values (not stored) for the client whose
    /// request filled the cache, and whether the store took the entry (it
    /// refuses one whose encoding exceeds the largest object).
    Stored(Arc<Entry>, u16, Vec<HeaderValue>, bool),
    /// Not stored: pass the response through, with the reason and the
    /// status the origin answered.
    Passed(Response<ResponseBody>, &'static str, u16),
    /// Storable, of unknown length: to be streamed through [`tee`], which
    /// stores it if it ends within the given number of bytes.
    Streaming(Response<ResponseBody>, Box<PendingStore>, usize),
}

/// How long requests coalesced on a response of unknown length wait for it
/// to end and be stored. One that is still streaming then (an event stream,
/// a slow page) releases them to the origin, and the key is remembered as
/// uncacheable for a while (hit-for-miss), so that nobody queues behind a
/// stream that may never end.
const STREAM_WAIT: Duration = Duration::from_secs(1);

/// What storing a streamed response needs once its body is complete.
pub(super) struct PendingStore {
    gateway: Gateway,
    key: String,
    status: StatusCode,
    headers: HeaderMap,
    request_headers: HeaderMap,
    request_time: SystemTime,
    response_time: SystemTime,
    directives: control::ResponseDirectives,
    overrides: Overrides,
    heuristic_max: Duration,
}

impl PendingStore {
    /// Stores the response with its complete body; the entry when the
    /// store took it.
    async fn store(self, body: Vec<u8>) -> Option<Arc<Entry>> {
        let received = Received {
            status: self.status,
            headers: self.headers,
            body,
            request_headers: &self.request_headers,
            request_time: self.request_time,
            response_time: self.response_time,
        };
        let entry = Entry::from_response(
            received,
            &self.directives,
            &self.overrides,
            self.heuristic_max,
        )
        .ok()?;
        let (entry, stored) = self
            .gateway
            .inner
            .store
            .store_response_shared(&self.key, entry)
            .await;
        if !stored {
            metrics::counter!("portico_cache_not_stored_total", "reason" => "store-refused")
                .increment(1);
        }
        stored.then_some(entry)
    }
}

type SharedLeader = Arc<std::sync::Mutex<Option<Leader<Arc<Entry>>>>>;

/// Takes the leader out, once: whoever ends the flight first publishes.
fn take(leader: &Option<SharedLeader>) -> Option<Leader<Arc<Entry>>> {
    leader
        .as_ref()
        .and_then(|l| l.lock().unwrap_or_else(|e| e.into_inner()).take())
}

/// Streams a response of unknown length to the client while keeping a copy;
/// when it ends within `max` bytes, the copy is stored and handed to the
/// requests coalesced on it (see [`STREAM_WAIT`] for those that would wait
/// longer).
pub(super) fn tee(
    resp: Response<ResponseBody>,
    pending: Box<PendingStore>,
    max: usize,
    leader: Option<Leader<Arc<Entry>>>,
) -> Response<ResponseBody> {
    let leader: Option<SharedLeader> = leader.map(|l| Arc::new(std::sync::Mutex::new(Some(l))));
    if let Some(shared) = &leader {
        let shared = Arc::downgrade(shared);
        tokio::spawn(async move {
            tokio::time::sleep(STREAM_WAIT).await;
            if let Some(l) = shared.upgrade() {
                if let Some(l) = take(&Some(l)) {
                    l.publish(Flight::NotStorable);
                }
            }
        });
    }
    resp.map(|body| {
        Tee {
            body,
            copy: Vec::new(),
            max,
            pending: Some(pending),
            leader,
        }
        .boxed_unsync()
    })
}

/// The body [`tee`] hands out.
struct Tee {
    body: ResponseBody,
    copy: Vec<u8>,
    max: usize,
    /// Taken when the body ends complete, or dropped when it grows too large.
    pending: Option<Box<PendingStore>>,
    leader: Option<SharedLeader>,
}

impl hyper::body::Body for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(_)) = (frame.data_ref(), &this.pending) {
                    if this.copy.len() + data.len() > this.max {
                        // Larger than the largest object: it only streams.
                        metrics::counter!("portico_cache_not_stored_total", "reason" => "too-large")
                            .increment(1);
                        this.pending = None;
                        this.copy = Vec::new();
                        if let Some(l) = take(&this.leader) {
                            l.publish(Flight::NotStorable);
                        }
                    } else {
                        this.copy.extend_from_slice(data);
                    }
                }
            }
            std::task::Poll::Ready(None) => {
                if let Some(pending) = this.pending.take() {
                    let copy = std::mem::take(&mut this.copy);
                    let leader = take(&this.leader);
                    tokio::spawn(async move {
                        let stored = pending.store(copy).await;
                        if let Some(l) = leader {
                            match stored {
                                Some(entry) => l.publish(Flight::Ready(entry)),
                                None => l.publish(Flight::NotStorable),
                            }
                        }
                    });
                }
            }
            // A failed body is not stored; the leader, dropped with it,
            // releases whoever waits.
            std::task::Poll::Ready(Some(Err(_))) => this.pending = None,
            std::task::Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Tee {
    fn drop(&mut self) {
        // Dropped before its end (the client went away): nothing is stored,
        // and the waiters go to the origin themselves.
        drop(take(&self.leader));
    }
}

impl Filled {
    /// Passes the origin's own response through.
    fn passed(resp: Response<ResponseBody>, reason: &'static str) -> Filled {
        let status = resp.status().as_u16();
        Filled::Passed(resp, reason, status)
    }
}

pub(super) fn overrides(
    cache: &crate::policy::model::CacheSpec,
    actions: &crate::policy::model::ResponseActions,
) -> Overrides {
    Overrides {
        ttl: actions.ttl.or(cache.ttl),
        ignore_origin: cache.origin == OriginControl::Ignore,
        force_ttl: actions.ttl.is_some(),
        store_set_cookie: cache.store_set_cookie || actions.store_set_cookie,
        share_authorized: cache.share_authorized,
        stale_while_revalidate: actions
            .stale_while_revalidate
            .or(cache.stale_while_revalidate),
        stale_if_error: actions.stale_if_error.or(cache.stale_if_error),
    }
}

/// Reads a body up to `max` bytes, into a buffer of exactly the announced
/// length when there is one. Returns the bytes and, when the body is longer,
/// the unread rest (the bytes returned are then a prefix).
pub(super) async fn collect_up_to(
    mut body: ResponseBody,
    max: usize,
) -> Result<(Vec<u8>, Option<ResponseBody>), ProxyError> {
    // A stored body is held for a long time: it is collected once into the
    // buffer the entry keeps, never kept in the read buffers it arrived in.
    let expected = body
        .size_hint()
        .exact()
        .and_then(|n| usize::try_from(n).ok())
        .filter(|&n| n <= max);
    let mut buf = Vec::with_capacity(expected.unwrap_or(0));
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| ProxyError::BadGateway(format!("reading the origin's body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            buf.extend_from_slice(&data);
            if buf.len() > max {
                return Ok((buf, Some(body)));
            }
        }
    }
    Ok((buf, None))
}

/// A body that yields a buffered prefix, then the rest of a stream.
pub(super) struct Chain<A> {
    first: Option<A>,
    rest: ResponseBody,
}

impl<A> hyper::body::Body for Chain<A>
where
    A: hyper::body::Body<Data = Bytes, Error = std::convert::Infallible> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        if let Some(first) = self.first.as_mut() {
            match std::pin::Pin::new(first).poll_frame(cx) {
                std::task::Poll::Ready(Some(Ok(f))) => return std::task::Poll::Ready(Some(Ok(f))),
                std::task::Poll::Ready(_) => self.first = None,
                std::task::Poll::Pending => return std::task::Poll::Pending,
            }
        }
        std::pin::Pin::new(&mut self.rest).poll_frame(cx)
    }
}

/// The response rules' verdict on a stored copy a 304 refreshed. Their
/// edits were made before the copy was first stored; the fields the 304
/// replaced (`replaced`, its own) have lost them, and get them again. The
/// others still carry them, so an `add` is not made twice.
fn refreshed_edits(
    gen: &Generation,
    view: &View<'_>,
    status: StatusCode,
    headers: &mut HeaderMap,
    replaced: &HeaderMap,
) -> crate::policy::model::ResponseActions {
    let actions = gen.policy.decide_response(
        view,
        &ResponseView {
            status: status.as_u16(),
            headers,
        },
    );
    for e in actions
        .headers
        .iter()
        .filter(|e| replaced.contains_key(&e.name))
    {
        e.apply(headers);
    }
    actions
}
