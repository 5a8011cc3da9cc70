//! Scenarios for the upstream layer against real origins on 127.0.0.1:
//! balancing, failover, health checks, ejection, retry safety, time limits,
//! keep-alive and TLS.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use portico::upstream::{
    BackendConfig, EjectConfig, HealthConfig, KeepAlive, Limits, Pool, ServerConfig, Timeouts,
    UpstreamError, UpstreamTls,
};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

/// Every scenario is bounded by this.
const LIMIT: Duration = Duration::from_secs(20);

/// What an origin does; flags can be flipped while it runs.
#[derive(Default)]
struct Behaviour {
    /// Close each new connection after reading the request head, without answering.
    broken: AtomicBool,
    /// `/healthz` answers 500 instead of 200.
    unhealthy: AtomicBool,
    /// Milliseconds to wait before answering.
    delay_ms: AtomicUsize,
    /// When each health probe arrived.
    probed: std::sync::Mutex<Vec<Instant>>,
}

/// The path of each request on a TLS connection, beside the protocol
/// (`http/1.1`) ALPN settled on for that connection, if any.
type Negotiated = Arc<std::sync::Mutex<Vec<(String, Option<Vec<u8>>)>>>;

/// A small HTTP/1.1 origin that counts requests (not health probes) and
/// accepted connections, and answers with its name.
struct Origin {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
    behaviour: Arc<Behaviour>,
    /// With TLS: the path of every request and probe, and the protocol
    /// ALPN settled on for its connection.
    alpn: Negotiated,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Origin {
    async fn start(name: &'static str) -> Origin {
        Self::start_with(name, None).await
    }

    async fn start_with(name: &'static str, tls: Option<tokio_rustls::TlsAcceptor>) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let behaviour = Arc::new(Behaviour::default());
        let alpn = Negotiated::default();
        let (stop, mut stopped) = oneshot::channel();
        let (r, c, b) = (requests.clone(), connections.clone(), behaviour.clone());
        let noted = alpn.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let tcp = tokio::select! {
                    _ = &mut stopped => break,
                    accepted = listener.accept() => match accepted {
                        Ok((tcp, _)) => tcp,
                        Err(_) => continue,
                    },
                };
                c.fetch_add(1, Ordering::SeqCst);
                let (r, b, tls, noted) = (r.clone(), b.clone(), tls.clone(), noted.clone());
                conns.spawn(async move {
                    if b.broken.load(Ordering::SeqCst) {
                        drop_after_head(tcp, &r).await;
                        return;
                    }
                    let builder = hyper::server::conn::http1::Builder::new();
                    match tls {
                        Some(acceptor) => {
                            let Ok(s) = acceptor.accept(tcp).await else {
                                return;
                            };
                            let protocol = s.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                            let svc = service_fn(move |req: Request<Incoming>| {
                                let path = req.uri().path().to_owned();
                                noted.lock().unwrap().push((path, protocol.clone()));
                                handle(name, req, r.clone(), b.clone())
                            });
                            let _ = builder.serve_connection(TokioIo::new(s), svc).await;
                        }
                        None => {
                            let svc =
                                service_fn(move |req| handle(name, req, r.clone(), b.clone()));
                            let _ = builder.serve_connection(TokioIo::new(tcp), svc).await;
                        }
                    }
                });
            }
            // Dropping the set aborts every open connection: the origin is gone.
            drop(conns);
        });
        Origin {
            addr,
            requests,
            connections,
            behaviour,
            alpn,
            stop: Some(stop),
            task,
        }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    fn server(&self) -> ServerConfig {
        ServerConfig::new(self.addr.to_string())
    }

    /// Stops listening and closes every open connection.
    async fn kill(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.unwrap();
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn drop_after_head(mut tcp: TcpStream, requests: &AtomicUsize) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match tcp.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    requests.fetch_add(1, Ordering::SeqCst);
}

async fn handle(
    name: &'static str,
    req: Request<Incoming>,
    requests: Arc<AtomicUsize>,
    b: Arc<Behaviour>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() == "/healthz" {
        b.probed.lock().unwrap().push(Instant::now());
        let status = if b.unhealthy.load(Ordering::SeqCst) {
            500
        } else {
            200
        };
        let mut resp = Response::new(Full::new(Bytes::new()));
        *resp.status_mut() = StatusCode::from_u16(status).unwrap();
        return Ok(resp);
    }
    requests.fetch_add(1, Ordering::SeqCst);
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let delay = b.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay as u64)).await;
    }
    let answer = if body.is_empty() {
        Bytes::from_static(name.as_bytes())
    } else {
        Bytes::from(format!("{name}:{}", String::from_utf8_lossy(&body)))
    };
    Ok(Response::new(Full::new(answer)))
}

/// An address on which nothing listens.
async fn closed_port() -> ServerConfig {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    ServerConfig::new(addr.to_string())
}

fn backend(servers: Vec<ServerConfig>) -> BackendConfig {
    BackendConfig {
        name: "app".into(),
        servers,
        timeouts: Timeouts {
            connect: Duration::from_secs(2),
            first_byte: Duration::from_secs(5),
            total: Duration::from_secs(10),
        },
        ..Default::default()
    }
}

async fn get(pool: &Pool, path: &str) -> Result<String, UpstreamError> {
    send(pool, Method::GET, path, Bytes::new()).await
}

async fn send(
    pool: &Pool,
    method: Method,
    path: &str,
    body: Bytes,
) -> Result<String, UpstreamError> {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .body(Full::new(body))
        .unwrap();
    let resp = pool.send(req, b"", None, Limits::default()).await?;
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    Ok(String::from_utf8(bytes.to_vec()).unwrap())
}

async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    tokio::time::timeout(Duration::from_secs(5), async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

fn bounded<F: std::future::Future>(f: F) -> tokio::time::Timeout<F> {
    tokio::time::timeout(LIMIT, f)
}

#[tokio::test]
async fn round_robin_spreads_requests_evenly() {
    bounded(async {
        let (a, b) = (Origin::start("a").await, Origin::start("b").await);
        let pool = Pool::new(&backend(vec![a.server(), b.server()])).unwrap();
        let mut answers = Vec::new();
        for _ in 0..10 {
            answers.push(get(&pool, "/x").await.unwrap());
        }
        assert_eq!(a.requests(), 5);
        assert_eq!(b.requests(), 5);
        assert_eq!(&answers[..4], ["a", "b", "a", "b"]);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn refused_connection_fails_over_even_for_post() {
    bounded(async {
        let b = Origin::start("b").await;
        let pool = Pool::new(&backend(vec![closed_port().await, b.server()])).unwrap();
        for _ in 0..4 {
            assert_eq!(get(&pool, "/x").await.unwrap(), "b");
        }
        // Never sent to the closed port, so a POST with a body may move too.
        let answer = send(&pool, Method::POST, "/form", Bytes::from_static(b"v=1")).await;
        assert_eq!(answer.unwrap(), "b:v=1");
        assert_eq!(b.requests(), 5);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn killed_backend_traffic_moves_to_the_other() {
    bounded(async {
        let (mut a, b) = (Origin::start("a").await, Origin::start("b").await);
        let pool = Pool::new(&backend(vec![a.server(), b.server()])).unwrap();
        for _ in 0..4 {
            get(&pool, "/x").await.unwrap();
        }
        assert_eq!((a.requests(), b.requests()), (2, 2));
        a.kill().await;
        for _ in 0..10 {
            assert_eq!(get(&pool, "/x").await.unwrap(), "b");
        }
        assert_eq!((a.requests(), b.requests()), (2, 12));
    })
    .await
    .unwrap();
}

/// A server that is dead when the checks start goes down on its first failed
/// probe, not only after `fall` of them: it has no good record yet. Later,
/// a server that was up needs `fall` failures again.
#[tokio::test]
async fn a_server_failing_its_first_probe_goes_down_at_once() {
    bounded(async {
        let (a, b) = (Origin::start("a").await, Origin::start("b").await);
        a.behaviour.unhealthy.store(true, Ordering::SeqCst);
        let mut cfg = backend(vec![a.server(), b.server()]);
        cfg.health = Some(HealthConfig {
            path: "/healthz".into(),
            interval: Duration::from_millis(300),
            timeout: Duration::from_millis(200),
            rise: 1,
            fall: 3,
            ..Default::default()
        });
        let pool = Pool::new(&cfg).unwrap();
        let probes = |o: &Origin| o.behaviour.probed.lock().unwrap().len();
        wait_until("a down", || !pool.health().is_up(0)).await;
        assert_eq!(probes(&a), 1, "down after its first probe");
        // Back up, then failing again: now it takes `fall` probes.
        a.behaviour.unhealthy.store(false, Ordering::SeqCst);
        wait_until("a up", || pool.health().is_up(0)).await;
        let before = probes(&a);
        a.behaviour.unhealthy.store(true, Ordering::SeqCst);
        wait_until("a down again", || !pool.health().is_up(0)).await;
        assert!(probes(&a) - before >= 3, "{} probes", probes(&a) - before);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn health_check_takes_a_server_out_and_back_in() {
    bounded(async {
        let (a, b) = (Origin::start("a").await, Origin::start("b").await);
        let mut cfg = backend(vec![a.server(), b.server()]);
        cfg.health = Some(HealthConfig {
            path: "/healthz".into(),
            interval: Duration::from_millis(20),
            timeout: Duration::from_millis(500),
            rise: 2,
            fall: 2,
            ..Default::default()
        });
        let pool = Pool::new(&cfg).unwrap();
        a.behaviour.unhealthy.store(true, Ordering::SeqCst);
        wait_until("a marked down", || !pool.health().is_up(0)).await;
        for _ in 0..6 {
            assert_eq!(get(&pool, "/x").await.unwrap(), "b");
        }
        assert_eq!(a.requests(), 0);
        a.behaviour.unhealthy.store(false, Ordering::SeqCst);
        wait_until("a back up", || pool.health().is_up(0)).await;
        let mut answers = Vec::new();
        for _ in 0..4 {
            answers.push(get(&pool, "/x").await.unwrap());
        }
        assert!(answers.iter().any(|s| s == "a"), "{answers:?}");
        assert!(a.requests() >= 2);
    })
    .await
    .unwrap();
}

/// A server that answers every request 200 with a chunked body that never
/// ends: 16 KiB chunks as fast as they go, or with `trickle` one byte every
/// 20 ms. Counts the requests.
async fn endless(trickle: bool) -> (SocketAddr, Arc<AtomicUsize>, JoinHandle<()>) {
    use tokio::io::AsyncWriteExt as _;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&requests);
    let server = tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let counted = Arc::clone(&counted);
            tokio::spawn(async move {
                let mut head = [0u8; 1024];
                let _ = tcp.read(&mut head).await;
                counted.fetch_add(1, Ordering::SeqCst);
                let start = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
                if tcp.write_all(start).await.is_err() {
                    return;
                }
                let chunk = if trickle {
                    "1\r\nx\r\n".to_owned()
                } else {
                    format!("4000\r\n{}\r\n", "x".repeat(0x4000))
                };
                while tcp.write_all(chunk.as_bytes()).await.is_ok() {
                    if trickle {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            });
        }
    });
    (addr, requests, server)
}

/// A health path that answers 200 with a body that never ends (a stream, or
/// a page far larger than a probe needs), fast or slowly, keeps the server
/// up: the status is the verdict, and the probe does not wait for the end
/// of the body until its timeout.
#[tokio::test]
async fn a_probe_does_not_read_an_endless_body() {
    bounded(async {
        for trickle in [false, true] {
            let (addr, probes, server) = endless(trickle).await;
            let mut cfg = backend(vec![ServerConfig::new(addr.to_string())]);
            cfg.health = Some(HealthConfig {
                path: "/healthz".into(),
                interval: Duration::from_millis(50),
                timeout: Duration::from_millis(300),
                fall: 1,
                ..Default::default()
            });
            let pool = Pool::new(&cfg).unwrap();
            wait_until("three probes", || probes.load(Ordering::SeqCst) >= 3).await;
            // Past the timeout of the third probe, had it waited for the end.
            tokio::time::sleep(Duration::from_millis(400)).await;
            assert!(
                pool.health().is_up(0),
                "an endless body (trickle: {trickle}) took the server down"
            );
            server.abort();
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn probes_are_spread_over_the_interval_not_sent_in_step() {
    bounded(async {
        let interval = Duration::from_secs(1);
        let mut origins = Vec::new();
        for _ in 0..8 {
            origins.push(Origin::start("a").await);
        }
        let mut cfg = backend(origins.iter().map(Origin::server).collect());
        cfg.health = Some(HealthConfig {
            path: "/healthz".into(),
            interval,
            timeout: Duration::from_millis(500),
            ..HealthConfig::default()
        });
        let started = Instant::now();
        let pool = Pool::new(&cfg).unwrap();
        let probed = |o: &Origin| o.behaviour.probed.lock().unwrap().clone();
        tokio::time::timeout(10 * interval, async {
            while origins.iter().any(|o| probed(o).len() < 2) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("every server probed twice");
        pool.shutdown();
        let firsts: Vec<Duration> = origins.iter().map(|o| probed(o)[0] - started).collect();
        let spread = firsts
            .iter()
            .max()
            .unwrap()
            .saturating_sub(*firsts.iter().min().unwrap());
        // Eight first probes drawn over a second all within a tenth of it:
        // about one chance in ten million. In step, they are milliseconds apart.
        assert!(
            spread > interval / 10,
            "first probes within {spread:?} of each other: {firsts:?}"
        );
        // A probe is due within the interval; the slack is for a loaded machine.
        let slack = interval;
        for o in &origins {
            let times = probed(o);
            let (first, gap) = (times[0] - started, times[1] - times[0]);
            assert!(first < interval + slack, "first probe after {first:?}");
            assert!(gap < interval + slack, "probes {gap:?} apart");
        }
    })
    .await
    .unwrap();
}

/// Ejections are guesses from failed requests: when they have taken every
/// server out, requests go to the servers anyway, so that a sole server
/// back from a restart serves at once rather than after its cooldown, and
/// its first good response ends the ejection.
#[tokio::test]
async fn servers_that_are_all_ejected_are_still_tried() {
    bounded(async {
        let a = Origin::start("a").await;
        a.behaviour.broken.store(true, Ordering::SeqCst);
        let mut cfg = backend(vec![a.server()]);
        cfg.eject = EjectConfig {
            consecutive_failures: 2,
            cooldown: Duration::from_secs(60),
        };
        let pool = Pool::new(&cfg).unwrap();
        for _ in 0..2 {
            let err = get(&pool, "/x").await.unwrap_err();
            assert_eq!(err.status(), StatusCode::BAD_GATEWAY, "{err}");
        }
        assert!(pool.health().is_ejected(0));
        a.behaviour.broken.store(false, Ordering::SeqCst);
        assert_eq!(get(&pool, "/x").await.unwrap(), "a");
        assert!(!pool.health().is_ejected(0), "a good response re-admits it");
        assert_eq!(a.requests(), 3);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn passive_ejection_and_readmission_after_cooldown() {
    bounded(async {
        let (a, b) = (Origin::start("a").await, Origin::start("b").await);
        a.behaviour.broken.store(true, Ordering::SeqCst);
        let mut cfg = backend(vec![a.server(), b.server()]);
        cfg.eject = EjectConfig {
            consecutive_failures: 2,
            cooldown: Duration::from_millis(300),
        };
        let pool = Pool::new(&cfg).unwrap();
        // GETs that land on a fail there and are retried on b.
        while !pool.health().is_ejected(0) {
            assert_eq!(get(&pool, "/x").await.unwrap(), "b");
        }
        let ejected_at = Instant::now();
        assert_eq!(a.requests(), 2);
        a.behaviour.broken.store(false, Ordering::SeqCst);
        for _ in 0..6 {
            assert_eq!(get(&pool, "/x").await.unwrap(), "b");
        }
        assert_eq!(a.requests(), 2, "no traffic to an ejected server");
        wait_until("cooldown over", || !pool.health().is_ejected(0)).await;
        assert!(ejected_at.elapsed() >= Duration::from_millis(250));
        let mut answers = Vec::new();
        for _ in 0..4 {
            answers.push(get(&pool, "/x").await.unwrap());
        }
        assert!(answers.iter().any(|s| s == "a"), "{answers:?}");
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn all_servers_down_fails_fast_with_no_healthy_server() {
    bounded(async {
        let (a, b) = (Origin::start("a").await, Origin::start("b").await);
        a.behaviour.unhealthy.store(true, Ordering::SeqCst);
        b.behaviour.unhealthy.store(true, Ordering::SeqCst);
        let mut cfg = backend(vec![a.server(), b.server()]);
        cfg.health = Some(HealthConfig {
            path: "/healthz".into(),
            interval: Duration::from_millis(20),
            fall: 1,
            ..Default::default()
        });
        let pool = Pool::new(&cfg).unwrap();
        wait_until("both down", || {
            !pool.health().is_up(0) && !pool.health().is_up(1)
        })
        .await;
        let started = Instant::now();
        let err = get(&pool, "/x").await.unwrap_err();
        assert!(
            matches!(err, UpstreamError::NoHealthyServer { .. }),
            "{err}"
        );
        assert_eq!(err.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(started.elapsed() < Duration::from_millis(50));
        assert_eq!(a.requests() + b.requests(), 0);

        // Passive ejection alone does not get there: both ports refuse and
        // one failure ejects, but servers that are all ejected are tried
        // anyway, and fail as fast as they refuse.
        let mut cfg = backend(vec![closed_port().await, closed_port().await]);
        cfg.eject.consecutive_failures = 1;
        let pool = Pool::new(&cfg).unwrap();
        for _ in 0..2 {
            let err = get(&pool, "/x").await.unwrap_err();
            assert!(matches!(err, UpstreamError::Connect { .. }), "{err}");
            assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
        }
        assert!(pool.health().is_ejected(0) && pool.health().is_ejected(1));
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn non_idempotent_request_is_never_sent_twice() {
    bounded(async {
        let (a, b) = (Origin::start("a").await, Origin::start("b").await);
        a.behaviour.broken.store(true, Ordering::SeqCst);
        let mut cfg = backend(vec![a.server(), b.server()]);
        cfg.eject.consecutive_failures = 0;
        let pool = Pool::new(&cfg).unwrap();
        // Round robin sends the first request to a, which reads it and hangs up.
        let err = send(&pool, Method::POST, "/order", Bytes::from_static(b"1"))
            .await
            .unwrap_err();
        assert!(matches!(err, UpstreamError::Reset { .. }), "{err}");
        assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
        assert_eq!((a.requests(), b.requests()), (1, 0));
        // The next request goes to b first: drain it so a is picked again.
        assert_eq!(get(&pool, "/x").await.unwrap(), "b");
        // An idempotent request lost the same way is retried on b.
        assert_eq!(get(&pool, "/x").await.unwrap(), "b");
        assert_eq!((a.requests(), b.requests()), (2, 2));
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn time_limits_map_to_504() {
    bounded(async {
        let a = Origin::start("a").await;
        a.behaviour.delay_ms.store(3_000, Ordering::SeqCst);
        let mut cfg = backend(vec![a.server()]);
        cfg.timeouts.first_byte = Duration::from_millis(100);
        let pool = Pool::new(&cfg).unwrap();
        let started = Instant::now();
        let err = get(&pool, "/slow").await.unwrap_err();
        assert!(
            matches!(err, UpstreamError::FirstByteTimeout { .. }),
            "{err}"
        );
        assert_eq!(err.status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(started.elapsed() < Duration::from_secs(1));

        cfg.timeouts.first_byte = Duration::from_secs(10);
        cfg.timeouts.total = Duration::from_millis(150);
        let pool = Pool::new(&cfg).unwrap();
        let err = get(&pool, "/slow").await.unwrap_err();
        assert!(matches!(err, UpstreamError::TotalTimeout { .. }), "{err}");
        assert_eq!(err.status(), StatusCode::GATEWAY_TIMEOUT);
    })
    .await
    .unwrap();
}

/// A request that timed out may have been acted on: it never goes to a
/// second server.
#[tokio::test]
async fn a_timed_out_request_is_not_tried_on_another_server() {
    bounded(async {
        let a = Origin::start("a").await;
        let b = Origin::start("b").await;
        a.behaviour.delay_ms.store(3_000, Ordering::SeqCst);
        b.behaviour.delay_ms.store(3_000, Ordering::SeqCst);
        let mut cfg = backend(vec![a.server(), b.server()]);
        cfg.timeouts.first_byte = Duration::from_millis(100);
        let pool = Pool::new(&cfg).unwrap();
        let err = get(&pool, "/slow").await.unwrap_err();
        assert!(
            matches!(err, UpstreamError::FirstByteTimeout { .. }),
            "{err}"
        );
        // Both origins count a request as it arrives, before their delay.
        wait_until("the request reached an origin", || {
            a.requests() + b.requests() >= 1
        })
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(a.requests() + b.requests(), 1);
    })
    .await
    .unwrap();
}

/// A kept connection's head timer is armed once and re-armed lazily: it
/// must still time out a later slow answer, under a shorter limit than the
/// one it was armed for, and must not fire for a fast answer after it
/// lapsed while the connection sat idle.
#[tokio::test]
async fn a_kept_connection_times_each_answer_by_its_own_limit() {
    bounded(async {
        let a = Origin::start("a").await;
        let pool = Pool::new(&backend(vec![a.server()])).unwrap();
        let limits = |ms| Limits {
            first_byte: Some(Duration::from_millis(ms)),
            ..Limits::default()
        };
        let send = |ms| {
            let req = Request::get("/x").body(Empty::<Bytes>::new()).unwrap();
            pool.send(req, b"", None, limits(ms))
        };
        // Armed for ten seconds by the first request, which is answered at once.
        let resp = send(10_000).await.unwrap();
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "a");
        // A slow answer under 100 ms must fail at about 100 ms, not 10 s.
        a.behaviour.delay_ms.store(3_000, Ordering::SeqCst);
        let started = Instant::now();
        let err = send(100).await.unwrap_err();
        assert!(
            matches!(err, UpstreamError::FirstByteTimeout { .. }),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        // A fast answer on a kept connection whose timer lapsed while idle.
        a.behaviour.delay_ms.store(0, Ordering::SeqCst);
        let resp = send(100).await.unwrap();
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "a");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let resp = send(100).await.unwrap();
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "a");
        assert!(a.connections.load(Ordering::SeqCst) <= 2);
    })
    .await
    .unwrap();
}

/// A server that never answers a connection ([`common::unanswering`]).
async fn unanswering() -> (ServerConfig, TcpListener, Vec<TcpStream>) {
    let (addr, listener, held) = common::unanswering().await;
    (ServerConfig::new(addr.to_string()), listener, held)
}

#[tokio::test]
async fn connect_timeout_is_reported_and_fails_over() {
    bounded(async {
        let (silent, _listener, _held) = unanswering().await;
        let mut cfg = backend(vec![silent.clone()]);
        cfg.timeouts.connect = Duration::from_millis(200);
        let pool = Pool::new(&cfg).unwrap();
        let err = get(&pool, "/x").await.unwrap_err();
        assert!(matches!(err, UpstreamError::ConnectTimeout { .. }), "{err}");
        assert_eq!(err.status(), StatusCode::GATEWAY_TIMEOUT);

        // Never connected, so never sent: another server gets it.
        let b = Origin::start("b").await;
        cfg.servers = vec![silent, b.server()];
        let pool = Pool::new(&cfg).unwrap();
        assert_eq!(get(&pool, "/x").await.unwrap(), "b");
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_rule_connect_limit_replaces_the_backend_one() {
    bounded(async {
        let (silent, _listener, _held) = unanswering().await;
        let mut cfg = backend(vec![silent]);
        // Longer than the test's own bound: only the rule's limit ends it.
        cfg.timeouts.connect = Duration::from_secs(60);
        cfg.timeouts.total = Duration::from_secs(120);
        let pool = Pool::new(&cfg).unwrap();
        let req = Request::get("/x").body(Empty::<Bytes>::new()).unwrap();
        let err = pool
            .send(
                req,
                b"",
                None,
                Limits {
                    connect: Some(Duration::from_millis(200)),
                    ..Limits::default()
                },
            )
            .await
            .unwrap_err();
        assert!(matches!(err, UpstreamError::ConnectTimeout { .. }), "{err}");
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn keep_alive_connections_are_reused() {
    bounded(async {
        let a = Origin::start("a").await;
        let pool = Pool::new(&backend(vec![a.server()])).unwrap();
        for _ in 0..10 {
            assert_eq!(get(&pool, "/x").await.unwrap(), "a");
        }
        assert_eq!(a.requests(), 10);
        assert_eq!(a.connections.load(Ordering::SeqCst), 1);
        assert_eq!(
            pool.in_flight(0),
            0,
            "finished responses release their count"
        );
    })
    .await
    .unwrap();
}

/// Sends `n` requests at once and waits for all of their bodies.
async fn burst(pool: &Arc<Pool>, n: usize) {
    let mut set = JoinSet::new();
    for _ in 0..n {
        let pool = Arc::clone(pool);
        set.spawn(async move { get(&pool, "/x").await.unwrap() });
    }
    while let Some(answer) = set.join_next().await {
        assert_eq!(answer.unwrap(), "a");
    }
}

#[tokio::test]
async fn idle_connections_past_the_keepalive_cap_are_closed() {
    bounded(async {
        for (idle_max, expected) in [(32, 5), (2, 8), (0, 10)] {
            let a = Origin::start("a").await;
            // Slow answers keep all five requests of a burst in flight at once.
            a.behaviour.delay_ms.store(150, Ordering::SeqCst);
            let mut cfg = backend(vec![a.server()]);
            cfg.keepalive = KeepAlive {
                idle_max,
                ..KeepAlive::default()
            };
            let pool = Arc::new(Pool::new(&cfg).unwrap());
            burst(&pool, 5).await;
            assert_eq!(a.connections.load(Ordering::SeqCst), 5);
            // The second burst finds at most `idle_max` connections kept.
            burst(&pool, 5).await;
            assert_eq!(
                a.connections.load(Ordering::SeqCst),
                expected,
                "keepalive {idle_max}"
            );
            assert_eq!(a.requests(), 10);
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn bodiless_responses_free_their_connection_unread() {
    bounded(async {
        let a = Origin::start("a").await;
        let pool = Pool::new(&backend(vec![a.server()])).unwrap();
        for _ in 0..5 {
            let req = Request::head("/x").body(Empty::<Bytes>::new()).unwrap();
            let resp = pool.send(req, b"", None, Limits::default()).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            // The body is never read: a HEAD response has none.
            drop(resp);
        }
        assert_eq!(get(&pool, "/x").await.unwrap(), "a");
        assert_eq!(a.requests(), 6);
        assert_eq!(a.connections.load(Ordering::SeqCst), 1);
    })
    .await
    .unwrap();
}

/// An origin that answers one request per connection, then closes it
/// without saying so (no `Connection: close`). Counts connections.
async fn one_shot_origin() -> (ServerConfig, Arc<AtomicUsize>, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = ServerConfig::new(listener.local_addr().unwrap().to_string());
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match tcp.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0) + 4;
            let text = String::from_utf8_lossy(&buf[..head_end.min(buf.len())]).to_lowercase();
            let length: usize = text
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            let mut have = buf.len() - head_end.min(buf.len());
            while have < length {
                match tcp.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => have += n,
                }
            }
            use tokio::io::AsyncWriteExt;
            let _ = tcp
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
            drop(tcp);
        }
    });
    (server, accepted, task)
}

#[tokio::test]
async fn an_idle_connection_the_server_closed_is_not_used() {
    bounded(async {
        let (server, accepted, task) = one_shot_origin().await;
        let pool = Pool::new(&backend(vec![server])).unwrap();
        for n in 1..=3 {
            // POST: a request that is never retried once sent, so it must
            // not go out on the connection the origin has closed.
            let answer = send(&pool, Method::POST, "/x", Bytes::from_static(b"hi")).await;
            assert_eq!(answer.unwrap(), "ok");
            assert_eq!(accepted.load(Ordering::SeqCst), n);
            // Let the origin's close arrive while the connection is idle.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        task.abort();
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn the_total_limit_bounds_a_stalled_body() {
    bounded(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = ServerConfig::new(listener.local_addr().unwrap().to_string());
        let origin = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = tcp.read(&mut buf).await;
            use tokio::io::AsyncWriteExt;
            // Half the promised body, then nothing.
            tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let mut cfg = backend(vec![server]);
        cfg.timeouts.total = Duration::from_secs(60);
        let pool = Pool::new(&cfg).unwrap();
        let req = Request::get("/x").body(Empty::<Bytes>::new()).unwrap();
        let limits = Limits {
            total: Some(Duration::from_millis(300)),
            ..Limits::default()
        };
        let resp = pool.send(req, b"", None, limits).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let err = resp.into_body().collect().await.unwrap_err();
        assert!(err.to_string().contains("total time limit"), "{err}");
        origin.abort();
    })
    .await
    .unwrap();
}

/// An origin that answers `ok` and keeps every request head it read.
async fn recording_origin() -> (
    ServerConfig,
    Arc<std::sync::Mutex<Vec<String>>>,
    JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = ServerConfig::new(listener.local_addr().unwrap().to_string());
    let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = heads.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head: Vec<u8> = buf.drain(..end + 4).collect();
                        seen.lock()
                            .unwrap()
                            .push(String::from_utf8_lossy(&head).into_owned());
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if tcp.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                    match tcp.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    (server, heads, task)
}

#[tokio::test]
async fn requests_and_probes_use_origin_form_with_a_host() {
    bounded(async {
        let (server, heads, task) = recording_origin().await;
        let addr = server.addr.clone();
        let mut cfg = backend(vec![server]);
        cfg.health = Some(HealthConfig {
            path: "/healthz".into(),
            interval: Duration::from_millis(50),
            ..HealthConfig::default()
        });
        let pool = Pool::new(&cfg).unwrap();
        // A request without Host gets the server's; one with Host keeps it.
        assert_eq!(get(&pool, "/a?x=1").await.unwrap(), "ok");
        let req = Request::get("/b")
            .header("host", "shop.example")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = pool.send(req, b"", None, Limits::default()).await.unwrap();
        let _ = resp.into_body().collect().await.unwrap();
        wait_until("a health probe", || {
            heads.lock().unwrap().iter().any(|h| h.contains("/healthz"))
        })
        .await;
        let heads = heads.lock().unwrap().clone();
        let find = |target: &str| {
            heads
                .iter()
                .find(|h| h.starts_with(&format!("GET {target} HTTP/1.1\r\n")))
                .unwrap_or_else(|| panic!("no request for {target} in {heads:?}"))
                .to_lowercase()
        };
        assert!(find("/a?x=1").contains(&format!("host: {addr}\r\n")));
        assert!(find("/b").contains("host: shop.example\r\n"));
        assert!(find("/healthz").contains(&format!("host: {addr}\r\n")));
        pool.shutdown();
        task.abort();
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn in_flight_count_lasts_while_the_body_is_unread() {
    bounded(async {
        let a = Origin::start("a").await;
        let pool = Pool::new(&backend(vec![a.server()])).unwrap();
        let send = || {
            let req = Request::get("/x").body(Empty::<Bytes>::new()).unwrap();
            pool.send(req, b"", None, Limits::default())
        };
        let resp = send().await.unwrap();
        assert_eq!(pool.in_flight(0), 1);
        assert_eq!(resp.body().server(), Some(0));
        drop(resp);
        assert_eq!(pool.in_flight(0), 0);

        // Read to its end, the body ends the count even while still held.
        let mut body = send().await.unwrap().into_body();
        assert_eq!(pool.in_flight(0), 1);
        while let Some(frame) = body.frame().await {
            frame.unwrap();
        }
        assert_eq!(pool.in_flight(0), 0);
        assert_eq!(body.server(), None);
    })
    .await
    .unwrap();
}

fn tls_material(
    dir: &std::path::Path,
) -> (
    tokio_rustls::TlsAcceptor,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let make_ca = || {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
    };
    let ca = make_ca();
    let other_ca = make_ca();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let other_file = dir.join("other.pem");
    std::fs::write(&other_file, other_ca.pem()).unwrap();
    let key = rustls_pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .unwrap();
    (
        tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        ca_file,
        other_file,
    )
}

/// The same through a policy: `tls`, `ca_file` and `tls_server_name` as an
/// operator writes them, a request through Portico, and 502 when the CA
/// file is not the one that signed the origin's certificate.
#[tokio::test]
async fn https_backend_written_in_a_policy() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let (acceptor, ca_file, other_ca) = tls_material(dir.path());
        let a = Origin::start_with("secure", Some(acceptor)).await;
        let policy = |ca: &std::path::Path| {
            format!(
                "backend secure {{\n  server \"{}\"\n  tls\n  ca_file \"{}\"\n  tls_server_name \"localhost\"\n}}\nrule all {{ route secure cache off }}\n",
                a.addr,
                ca.display()
            )
        };
        let p = common::proxy(&policy(&ca_file)).await;
        let got = common::get(common::addr(&p), "/x", &[]).await;
        assert_eq!((got.status, got.text()), (StatusCode::OK, "secure".to_owned()));
        p.shutdown().await;

        let p = common::proxy(&policy(&other_ca)).await;
        let got = common::get(common::addr(&p), "/x", &[]).await;
        assert_eq!(got.status, StatusCode::BAD_GATEWAY);
        assert_eq!(a.requests(), 1);
        p.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn https_backend_verified_against_ca_file() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let (acceptor, ca_file, other_ca) = tls_material(dir.path());
        let a = Origin::start_with("secure", Some(acceptor)).await;
        let mut cfg = backend(vec![a.server()]);
        cfg.tls = Some(UpstreamTls {
            ca_file: Some(ca_file),
            server_name: Some("localhost".into()),
        });
        let pool = Pool::new(&cfg).unwrap();
        for _ in 0..3 {
            assert_eq!(get(&pool, "/x").await.unwrap(), "secure");
        }
        assert_eq!(
            a.connections.load(Ordering::SeqCst),
            1,
            "TLS connections are kept alive"
        );

        cfg.tls = Some(UpstreamTls {
            ca_file: Some(other_ca),
            server_name: Some("localhost".into()),
        });
        let pool = Pool::new(&cfg).unwrap();
        let err = get(&pool, "/x").await.unwrap_err();
        assert_eq!(err.status(), StatusCode::BAD_GATEWAY, "{err}");
        assert_eq!(a.requests(), 3);

        // Without a CA file the system's roots decide: a private CA is not among them.
        cfg.tls = Some(UpstreamTls {
            ca_file: None,
            server_name: Some("localhost".into()),
        });
        let pool = Pool::new(&cfg).unwrap();
        let err = get(&pool, "/x").await.unwrap_err();
        assert_eq!(err.status(), StatusCode::BAD_GATEWAY, "{err}");
        assert_eq!(a.requests(), 3);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn tls_backends_and_their_probes_are_offered_http_1_1_by_alpn() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let (acceptor, ca_file, _) = tls_material(dir.path());
        // An origin that would rather speak h2, as many do: with no
        // protocol offered it has to guess, and it must not pick h2.
        let mut config = rustls::ServerConfig::clone(acceptor.config());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let a = Origin::start_with("secure", Some(acceptor)).await;
        let mut cfg = backend(vec![a.server()]);
        cfg.tls = Some(UpstreamTls {
            ca_file: Some(ca_file),
            server_name: Some("localhost".into()),
        });
        cfg.health = Some(HealthConfig {
            path: "/healthz".into(),
            interval: Duration::from_millis(20),
            ..HealthConfig::default()
        });
        // No kept connections: each probe and request makes its own handshake.
        cfg.keepalive.idle_max = 0;
        let pool = Pool::new(&cfg).unwrap();
        for _ in 0..2 {
            assert_eq!(get(&pool, "/x").await.unwrap(), "secure");
        }
        let probes = || {
            let seen = a.alpn.lock().unwrap();
            seen.iter().filter(|(path, _)| path == "/healthz").count()
        };
        wait_until("two health probes", || probes() >= 2).await;
        pool.shutdown();
        let seen = a.alpn.lock().unwrap().clone();
        assert!(seen.iter().any(|(path, _)| path == "/x"), "{seen:?}");
        for (path, protocol) in &seen {
            assert_eq!(
                protocol.as_deref(),
                Some(&b"http/1.1"[..]),
                "the protocol of {path}'s connection"
            );
        }
    })
    .await
    .unwrap();
}

/// A TLS origin that serves one host name, as a virtual host behind SNI
/// does: `200 vhost` for requests whose `Host` is `localhost` with the
/// origin's port, `421 Misdirected Request` for any other. Keeps the `Host`
/// of every health probe.
async fn virtual_host(
    acceptor: tokio_rustls::TlsAcceptor,
) -> (
    SocketAddr,
    Arc<std::sync::Mutex<Vec<String>>>,
    JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = format!("localhost:{}", addr.port());
    let probes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = probes.clone();
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, served, seen) = (acceptor.clone(), served.clone(), seen.clone());
            conns.spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = service_fn(move |req: Request<Incoming>| {
                    let host = req
                        .headers()
                        .get(http::header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    if req.uri().path() == "/healthz" {
                        seen.lock().unwrap().push(host.clone());
                    }
                    let (status, body) = match host == served {
                        true => (StatusCode::OK, "vhost"),
                        false => (StatusCode::MISDIRECTED_REQUEST, "not here"),
                    };
                    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
                    *resp.status_mut() = status;
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, probes, task)
}

#[tokio::test]
async fn probes_of_a_virtual_host_behind_sni_name_it_in_host() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let (acceptor, ca_file, _) = tls_material(dir.path());
        let (addr, probes, task) = virtual_host(acceptor).await;
        let mut cfg = backend(vec![ServerConfig::new(addr.to_string())]);
        cfg.tls = Some(UpstreamTls {
            ca_file: Some(ca_file),
            server_name: Some("localhost".into()),
        });
        // One probe answered 421 would take the server down for good.
        let health = HealthConfig {
            path: "/healthz".into(),
            interval: Duration::from_millis(20),
            fall: 1,
            rise: 1_000,
            ..HealthConfig::default()
        };
        cfg.health = Some(health.clone());
        let pool = Pool::new(&cfg).unwrap();
        wait_until("three probes", || probes.lock().unwrap().len() >= 3).await;
        assert!(pool.health().is_up(0), "probes were refused");
        // A request without a Host is sent the server's name as well.
        let req = Request::get("/x").body(Empty::<Bytes>::new()).unwrap();
        let resp = pool.send(req, b"", None, Limits::default()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let served = format!("localhost:{}", addr.port());
        assert_eq!(probes.lock().unwrap()[0], served);
        pool.shutdown();

        // A health check's own host takes the place of the name.
        probes.lock().unwrap().clear();
        cfg.health = Some(HealthConfig {
            host: Some("elsewhere.example".into()),
            ..health
        });
        let pool = Pool::new(&cfg).unwrap();
        wait_until("the server down", || !pool.health().is_up(0)).await;
        assert_eq!(probes.lock().unwrap()[0], "elsewhere.example");
        let err = get(&pool, "/x").await.unwrap_err();
        assert_eq!(err.status(), StatusCode::SERVICE_UNAVAILABLE, "{err}");
        pool.shutdown();
        task.abort();
    })
    .await
    .unwrap();
}

/// An origin whose connections each answer one request and then read the
/// next one and hang up without answering, as an origin does whose
/// keep-alive timer ends as that request arrives. Counts connections.
async fn one_answer_per_connection() -> (ServerConfig, Arc<AtomicUsize>, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = ServerConfig::new(listener.local_addr().unwrap().to_string());
    let connections = Arc::new(AtomicUsize::new(0));
    let count = connections.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                for answer in [true, false] {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.clear();
                    if answer {
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                        if tcp.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                }
                // Dropped here: closed with the second request unanswered.
            });
        }
    });
    (server, connections, task)
}

#[tokio::test]
async fn a_probe_lost_on_a_kept_connection_goes_out_again_on_a_new_one() {
    bounded(async {
        let (server, connections, task) = one_answer_per_connection().await;
        let mut cfg = backend(vec![server]);
        cfg.health = Some(HealthConfig {
            path: "/healthz".into(),
            interval: Duration::from_millis(20),
            timeout: Duration::from_secs(2),
            // One failed probe takes the server down, and nothing here
            // brings it back.
            fall: 1,
            rise: 1_000,
            ..HealthConfig::default()
        });
        let pool = Pool::new(&cfg).unwrap();
        // The second probe goes out on the first connection, which the
        // origin closes unanswered; the third probe opens the third
        // connection only after the second probe's verdict.
        wait_until("a third connection", || {
            connections.load(Ordering::SeqCst) >= 3
        })
        .await;
        assert!(
            pool.health().is_up(0),
            "a probe the kept connection lost before any answer marked the server down"
        );
        pool.shutdown();
        task.abort();
    })
    .await
    .unwrap();
}

/// Hands out one certificate whatever the name, and notes the SNI each
/// handshake asked for.
#[derive(Debug)]
struct NotingResolver {
    key: Arc<rustls::sign::CertifiedKey>,
    seen: std::sync::Mutex<Vec<Option<String>>>,
}

impl rustls::server::ResolvesServerCert for NotingResolver {
    fn resolve(
        &self,
        hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let name = hello.server_name().map(str::to_owned);
        self.seen.lock().unwrap().push(name);
        Some(Arc::clone(&self.key))
    }
}

#[tokio::test]
async fn https_backends_get_the_configured_name_as_sni_and_are_verified_for_it() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&leaf_key, &ca)
            .unwrap();
        let key = rustls_pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap();
        let signer = rustls::crypto::ring::sign::any_supported_type(&key).unwrap();
        let resolver = Arc::new(NotingResolver {
            key: Arc::new(rustls::sign::CertifiedKey::new(
                vec![leaf.der().clone()],
                signer,
            )),
            seen: std::sync::Mutex::new(Vec::new()),
        });
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let a = Origin::start_with("secure", Some(acceptor)).await;
        let tls = |server_name: Option<&str>| UpstreamTls {
            ca_file: Some(ca_file.clone()),
            server_name: server_name.map(str::to_owned),
        };
        let seen = || resolver.seen.lock().unwrap().clone();

        // An IP address with a name set: the name is sent and verified.
        let mut cfg = backend(vec![a.server()]);
        cfg.tls = Some(tls(Some("localhost")));
        assert_eq!(
            get(&Pool::new(&cfg).unwrap(), "/x").await.unwrap(),
            "secure"
        );
        assert_eq!(seen(), [Some("localhost".to_owned())]);

        // A host name in the address is the name, with none set.
        let port = a.addr.port();
        let mut cfg = backend(vec![ServerConfig::new(format!("localhost:{port}"))]);
        cfg.tls = Some(tls(None));
        assert_eq!(
            get(&Pool::new(&cfg).unwrap(), "/x").await.unwrap(),
            "secure"
        );
        assert_eq!(seen().last(), Some(&Some("localhost".to_owned())));

        // An IP address alone sends no SNI, and the certificate, which does
        // not name 127.0.0.1, is refused.
        let mut cfg = backend(vec![a.server()]);
        cfg.tls = Some(tls(None));
        let err = get(&Pool::new(&cfg).unwrap(), "/x").await.unwrap_err();
        assert_eq!(err.status(), StatusCode::BAD_GATEWAY, "{err}");
        assert_eq!(seen().last(), Some(&None));
        assert_eq!(a.requests(), 2);
    })
    .await
    .unwrap();
}
