//! `portico demo`: a built-in slow origin, Portico in front of it with the
//! built-in policy, a short series of requests, and a table of what changed.

use crate::policy;
use crate::run::{self, Overrides};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

/// A slow origin: every response takes `delay`, is cacheable for a minute, and is counted.
pub struct SlowOrigin {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl SlowOrigin {
    /// Starts the origin on a free loopback port.
    pub async fn start(delay: Duration) -> std::io::Result<SlowOrigin> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let requests = Arc::new(AtomicU64::new(0));
        let counter = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let counter = counter.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let counter = counter.clone();
                        async move {
                            counter.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(delay).await;
                            let body = format!(
                                "<html><body><h1>{}</h1><p>{}</p></body></html>\n",
                                req.uri().path(),
                                "slow origin content ".repeat(50)
                            );
                            Ok::<_, std::convert::Infallible>(
                                Response::builder()
                                    .header("content-type", "text/html; charset=utf-8")
                                    .header("cache-control", "public, max-age=60")
                                    .body(Full::new(Bytes::from(body)))
                                    .expect("static response parts are valid"),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(SlowOrigin {
            addr,
            requests,
            task,
        })
    }
}

impl Drop for SlowOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the demo measured.
#[derive(Debug, Clone)]
pub struct DemoReport {
    pub cold: Vec<Duration>,
    pub warm: Vec<Duration>,
    pub hits: usize,
    pub origin_requests: u64,
}

fn mean(d: &[Duration]) -> Duration {
    if d.is_empty() {
        return Duration::ZERO;
    }
    d.iter().sum::<Duration>() / d.len() as u32
}

impl DemoReport {
    pub fn table(&self) -> String {
        let cold = mean(&self.cold);
        let warm = mean(&self.warm);
        let total = self.cold.len() + self.warm.len();
        let speedup = cold.as_secs_f64() / warm.as_secs_f64().max(1e-9);
        format!(
            "\n  {:<22} {:>12}\n  {:<22} {:>12}\n  {:<22} {:>12}\n  {:<22} {:>11.0}x\n  {:<22} {:>11.0}%\n  {:<22} {:>12}\n",
            "requests sent",
            total,
            "cold latency (mean)",
            format!("{:.1} ms", cold.as_secs_f64() * 1e3),
            "warm latency (mean)",
            format!("{:.2} ms", warm.as_secs_f64() * 1e3),
            "speed-up",
            speedup,
            "hit ratio",
            100.0 * self.hits as f64 / total.max(1) as f64,
            "origin requests",
            self.origin_requests,
        )
    }
}

/// Runs the demo: `pages` distinct pages fetched cold once, then `rounds` times warm.
pub async fn run_demo(pages: usize, rounds: usize, delay: Duration) -> Result<DemoReport, String> {
    let origin = SlowOrigin::start(delay)
        .await
        .map_err(|e| format!("cannot start the demo origin: {e}"))?;
    let policy = policy::builtin(&origin.addr.to_string()).map_err(|e| e.to_string())?;
    let overrides = Overrides {
        listen: vec!["127.0.0.1:0".into()],
        ..Default::default()
    };
    let proxy = run::start(policy, None, overrides)
        .await
        .map_err(|e| format!("cannot start the proxy: {e}"))?;
    let addr = *proxy
        .listen_addrs()
        .first()
        .ok_or("the proxy has no listener")?;
    let client: hyper_util::client::legacy::Client<_, Empty<Bytes>> =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
    let mut report = DemoReport {
        cold: vec![],
        warm: vec![],
        hits: 0,
        origin_requests: 0,
    };
    for round in 0..=rounds {
        for page in 0..pages {
            let uri: hyper::Uri = format!("http://{addr}/page/{page}")
                .parse()
                .map_err(|e| format!("{e}"))?;
            let start = Instant::now();
            let resp = tokio::time::timeout(Duration::from_secs(10), client.get(uri))
                .await
                .map_err(|_| "a demo request timed out".to_string())?
                .map_err(|e| format!("a demo request failed: {e}"))?;
            let hit = resp
                .headers()
                .get("cache-status")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("; hit"));
            resp.into_body()
                .collect()
                .await
                .map_err(|e| format!("reading a demo response failed: {e}"))?;
            let took = start.elapsed();
            if round == 0 {
                report.cold.push(took);
            } else {
                report.warm.push(took);
            }
            report.hits += usize::from(hit);
        }
    }
    report.origin_requests = origin.requests.load(Ordering::Relaxed);
    proxy.shutdown().await;
    Ok(report)
}

/// `portico demo`.
pub fn main() -> i32 {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("portico demo: {e}");
            return 1;
        }
    };
    println!("Starting a slow origin (300 ms per response) and Portico in front of it...");
    let result = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(30),
            run_demo(10, 9, Duration::from_millis(300)),
        )
        .await
    });
    match result {
        Ok(Ok(report)) => {
            println!("10 pages fetched once cold (through to the origin), then 9 times each warm:");
            print!("{}", report.table());
            0
        }
        Ok(Err(e)) => {
            eprintln!("portico demo: {e}");
            1
        }
        Err(_) => {
            eprintln!("portico demo: did not finish within 30 seconds");
            1
        }
    }
}
