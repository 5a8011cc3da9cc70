//! Shared pieces of the end-to-end tests: an origin on 127.0.0.1 whose
//! answers a test scripts and whose requests it counts, Portico started
//! in-process from policy text, and a plain HTTP/1.1 client.
#![allow(dead_code)]

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use portico::run::{self, Overrides, Running};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;

/// What the origin saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: http::Method,
    pub uri: http::Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

pub type Reply = Response<Full<Bytes>>;
type Script = dyn Fn(&Seen) -> Reply + Send + Sync;

/// An origin server on a free loopback port. Every request is recorded; the
/// script decides the answer. Dropping it stops it.
pub struct Origin {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Origin {
    /// Starts an origin answering with `script`.
    pub async fn start(script: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Origin {
        Self::start_with_delay(Duration::ZERO, script).await
    }

    /// Like [`Origin::start`], each answer delayed by `delay`.
    pub async fn start_with_delay(
        delay: Duration,
        script: impl Fn(&Seen) -> Reply + Send + Sync + 'static,
    ) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        let addr = listener.local_addr().expect("origin address");
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let connections = Arc::new(AtomicUsize::new(0));
        let script: Arc<Script> = Arc::new(script);
        let (seen2, conns2) = (seen.clone(), connections.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                conns2.fetch_add(1, Ordering::SeqCst);
                let (seen, script) = (seen2.clone(), script.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (seen, script) = (seen.clone(), script.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let s = Seen {
                                method: parts.method,
                                uri: parts.uri,
                                headers: parts.headers,
                                body,
                            };
                            seen.lock().unwrap().push(s.clone());
                            if !delay.is_zero() {
                                tokio::time::sleep(delay).await;
                            }
                            Ok::<_, std::convert::Infallible>(script(&s))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Origin {
            addr,
            seen,
            connections,
            task,
        }
    }

    /// How many requests reached the origin.
    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// How many requests for this path reached the origin.
    pub fn count_path(&self, path: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.uri.path() == path)
            .count()
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Stops accepting and closes the listener.
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A response with a status, headers and body.
pub fn reply(status: u16, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Reply {
    let mut b = Response::builder().status(StatusCode::from_u16(status).unwrap());
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(body.into())).unwrap()
}

/// Starts Portico in-process with the policy text, listening on a free port
/// (and an admin listener with token `secret` on another).
pub async fn proxy(policy_text: &str) -> Running {
    proxy_with(policy_text, None).await
}

/// Like [`proxy`], with the disk cache in `cache_dir`.
pub async fn proxy_with(policy_text: &str, cache_dir: Option<&std::path::Path>) -> Running {
    let policy = portico::policy::load(policy_text, "test.policy")
        .unwrap_or_else(|e| panic!("test policy refused:\n{e}"));
    run::start(
        policy,
        None,
        Overrides {
            listen: vec!["127.0.0.1:0".into()],
            admin: Some("127.0.0.1:0".into()),
            admin_token: Some("secret".into()),
            cache_dir: cache_dir.map(|d| d.to_path_buf()),
        },
    )
    .await
    .expect("portico starts")
}

/// A policy with one backend `app` on the origin, and the given rules.
pub fn policy_for(origin: &Origin, rules: &str) -> String {
    format!(
        "backend app {{\n  server \"{}\"\n}}\n{rules}\n",
        origin.addr
    )
}

/// A finished response: status, headers and body.
#[derive(Debug)]
pub struct Got {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The Cache-Status value.
    pub fn cache_status(&self) -> &str {
        self.header("cache-status").unwrap_or("")
    }

    pub fn is_hit(&self) -> bool {
        self.cache_status().contains("; hit")
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends one request over a fresh HTTP/1.1 connection, bounded in time.
pub async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Got {
    let client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
    let mut b = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    let has_host = headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host"));
    if !has_host {
        b = b.header("host", "test.example");
    }
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(body.into())).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(10), body.collect())
        .await
        .expect("body timed out")
        .expect("body failed")
        .to_bytes();
    Got {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// `GET path` with headers.
pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Got {
    send(addr, "GET", path, headers, Bytes::new()).await
}

/// The proxy's first listener.
pub fn addr(p: &Running) -> SocketAddr {
    p.listen_addrs()[0]
}

/// Runs `f`, failing the test when it takes longer than 30 seconds.
pub async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .expect("test took too long")
}

/// Sends a request to the admin listener, with `Authorization: Bearer
/// TOKEN` when a token is given.
pub async fn admin(p: &Running, method: &str, path: &str, token: Option<&str>) -> Got {
    let at = p.admin_addr().expect("the admin listener is up");
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("authorization", a)])
        .unwrap_or_default();
    send(at, method, path, &headers, Bytes::new()).await
}

/// Waits until `cond` holds, polling every 10 ms, for at most 5 seconds.
pub async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let wait = async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(5), wait)
        .await
        .is_err()
    {
        panic!("timed out waiting for {what}");
    }
}

/// Overwrites every byte of every file under `dir` with a pattern; returns
/// how many files it changed.
pub fn scramble_files(dir: &std::path::Path) -> usize {
    let mut files = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        if path.is_dir() {
            for entry in std::fs::read_dir(&path).expect("read dir") {
                stack.push(entry.expect("dir entry").path());
            }
            continue;
        }
        let len = std::fs::metadata(&path).expect("metadata").len() as usize;
        let garbage: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
        std::fs::write(&path, garbage).expect("overwrite");
        files += 1;
    }
    files
}

/// A bare origin on a free loopback port that answers each request with the
/// same raw HTTP/1.1 bytes and closes the connection; for responses the
/// scripted [`Origin`] cannot make (a chunked body of unknown length).
pub struct RawOrigin {
    pub addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

/// Reads from `stream` until a request head has arrived (its blank line);
/// false if the stream ended or failed first.
pub async fn read_request_head(stream: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt as _;
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    true
}

impl RawOrigin {
    pub async fn start(response: Vec<u8>) -> RawOrigin {
        RawOrigin::start_with_delay(response, Duration::ZERO).await
    }

    /// [`RawOrigin::start`], answering each request after `delay`.
    pub async fn start_with_delay(response: Vec<u8>, delay: Duration) -> RawOrigin {
        use tokio::io::AsyncWriteExt as _;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        let addr = listener.local_addr().expect("origin address");
        let requests = Arc::new(AtomicUsize::new(0));
        let response = Arc::new(response);
        let counter = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                let (counter, response) = (counter.clone(), response.clone());
                tokio::spawn(async move {
                    if !read_request_head(&mut stream).await {
                        return;
                    }
                    counter.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(delay).await;
                    let _ = stream.write_all(&response).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        RawOrigin {
            addr,
            requests,
            task,
        }
    }

    /// How many requests reached it.
    pub fn count(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for RawOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A 200 response with a chunked body of `len` bytes (`i % 251` each) and
/// the given extra header lines.
pub fn chunked_response(len: usize, extra: &str) -> (Vec<u8>, Vec<u8>) {
    let body: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let mut out = format!(
        "HTTP/1.1 200 OK\r\n{extra}transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    )
    .into_bytes();
    for chunk in body.chunks(64 * 1024) {
        out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    (out, body)
}

/// A loopback address where nothing listens (bound, then released).
pub fn closed_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("address")
}

/// An origin answering every request with its `name`, that can be killed
/// outright: [`KillableOrigin::kill`] closes the listener and every open
/// connection, as a crashed server would.
pub struct KillableOrigin {
    pub addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl KillableOrigin {
    pub async fn start(name: &'static str) -> KillableOrigin {
        Self::start_with_delay(name, Duration::ZERO).await
    }

    /// Like [`KillableOrigin::start`], answering each request after `delay`
    /// (counted when it arrives), so that a kill can find requests in flight.
    pub async fn start_with_delay(name: &'static str, delay: Duration) -> KillableOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        let addr = listener.local_addr().expect("origin address");
        let requests = Arc::new(AtomicUsize::new(0));
        let tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (req2, tasks2) = (requests.clone(), tasks.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let requests = req2.clone();
                let conn = tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_req: Request<Incoming>| {
                        requests.fetch_add(1, Ordering::SeqCst);
                        async move {
                            tokio::time::sleep(delay).await;
                            Ok::<_, std::convert::Infallible>(reply(200, &[], name))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
                tasks2.lock().unwrap().push(conn.abort_handle());
            }
        });
        tasks.lock().unwrap().push(accept.abort_handle());
        KillableOrigin {
            addr,
            requests,
            tasks,
        }
    }

    pub fn count(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Closes the listener and every connection.
    pub fn kill(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

impl Drop for KillableOrigin {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts Portico in-process with only the policy's own listeners (no
/// command-line override), an admin listener with token `secret`, and the
/// policy file `path` for [`Running::reload_file`].
pub async fn proxy_bare(policy_text: &str, path: Option<std::path::PathBuf>) -> Running {
    let policy = portico::policy::load(policy_text, "test.policy")
        .unwrap_or_else(|e| panic!("test policy refused:\n{e}"));
    run::start(
        policy,
        path,
        Overrides {
            listen: vec![],
            admin: Some("127.0.0.1:0".into()),
            admin_token: Some("secret".into()),
            cache_dir: None,
        },
    )
    .await
    .expect("portico starts")
}

/// Loads policy text that must be valid.
pub fn load(policy_text: &str) -> portico::policy::Policy {
    portico::policy::load(policy_text, "test.policy")
        .unwrap_or_else(|e| panic!("test policy refused:\n{e}"))
}

/// A gzip body, decoded.
pub fn gunzip(body: &[u8]) -> String {
    let mut out = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(body), &mut out)
        .expect("a gzip body");
    out
}

/// A brotli body, decoded.
pub fn unbrotli(body: &[u8]) -> String {
    let mut out = Vec::new();
    brotli::BrotliDecompress(&mut &body[..], &mut out).expect("a brotli body");
    String::from_utf8(out).expect("text")
}

/// Writes `request` on a new connection and reads what comes back until the
/// server closes or `within` has passed.
pub async fn raw_exchange(a: SocketAddr, request: &[u8], within: Duration) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(a).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(within, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A listener that never accepts, with its accept queue filled: the kernel
/// drops further SYNs, so a connection to it is never made. Kept alive by
/// the returned listener and the connections that filled the queue.
pub async fn unanswering() -> (SocketAddr, TcpListener, Vec<tokio::net::TcpStream>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut held = Vec::new();
    for _ in 0..8 {
        let connect = tokio::net::TcpStream::connect(addr);
        match tokio::time::timeout(Duration::from_millis(300), connect).await {
            Ok(Ok(stream)) => held.push(stream),
            _ => break,
        }
    }
    let connect = tokio::net::TcpStream::connect(addr);
    let probe = tokio::time::timeout(Duration::from_millis(300), connect).await;
    assert!(probe.is_err(), "the accept queue did not fill up");
    (addr, listener, held)
}
