//! What the cache does for a slow or failing origin, end to end: request
//! coalescing, hit-for-miss, stale-while-revalidate and stale-if-error.

mod common;
use common::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CACHED: &str = "rule all { route app cache { } }";

/// Sends `n` GETs for `path` at once; returns the responses.
async fn burst(at: std::net::SocketAddr, path: &'static str, n: usize) -> Vec<Got> {
    let tasks: Vec<_> = (0..n)
        .map(|_| tokio::spawn(async move { get(at, path, &[]).await }))
        .collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.expect("request task"));
    }
    out
}

#[tokio::test]
async fn concurrent_misses_for_one_key_make_one_origin_request() {
    bounded(async {
        let origin = Origin::start_with_delay(Duration::from_millis(300), |_| {
            reply(200, &[("cache-control", "max-age=60")], "shared")
        })
        .await;
        let p = proxy(&policy_for(&origin, CACHED)).await;
        let all = burst(addr(&p), "/hot", 50).await;
        assert_eq!(origin.count(), 1, "one origin request for 50 clients");
        assert!(all.iter().all(|r| r.status == 200 && r.text() == "shared"));
        let collapsed = all
            .iter()
            .filter(|r| r.cache_status().contains("collapsed"))
            .count();
        assert!(collapsed >= 25, "only {collapsed} of 50 collapsed");
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn coalesced_waiters_get_only_their_own_variant() {
    bounded(async {
        let origin = Origin::start_with_delay(Duration::from_millis(300), |seen| {
            let lang = seen
                .headers
                .get("accept-language")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none")
                .to_string();
            reply(
                200,
                &[("cache-control", "max-age=60"), ("vary", "accept-language")],
                format!("lang={lang}"),
            )
        })
        .await;
        let p = proxy(&policy_for(&origin, CACHED)).await;
        let at = addr(&p);
        let tasks: Vec<_> = (0..10)
            .map(|i| {
                let lang = if i % 2 == 0 { "en" } else { "fr" };
                tokio::spawn(
                    async move { (lang, get(at, "/page", &[("accept-language", lang)]).await) },
                )
            })
            .collect();
        for t in tasks {
            let (lang, got) = t.await.expect("request task");
            assert_eq!(got.status, 200);
            assert_eq!(got.text(), format!("lang={lang}"), "{}", got.cache_status());
        }
        // One flight per variant: the waiters for the second variant
        // coalesce on the flight that follows the first.
        assert_eq!(origin.count(), 2);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn waiters_on_an_uncacheable_response_go_to_the_origin_at_once() {
    bounded(async {
        let delay = Duration::from_millis(500);
        let origin = Origin::start_with_delay(delay, |_| {
            reply(200, &[("cache-control", "private")], "mine")
        })
        .await;
        let p = proxy(&policy_for(&origin, CACHED)).await;
        let n = 10;
        let started = Instant::now();
        let all = burst(addr(&p), "/private", n).await;
        let took = started.elapsed();
        assert!(all.iter().all(|r| r.text() == "mine"));
        assert_eq!(origin.count(), n, "each got its own answer");
        // The leader's answer, then every waiter together: about two
        // delays, far from one after another (n delays).
        assert!(took < delay * 4, "took {took:?}");

        // Hit-for-miss: now nobody waits for a leader at all.
        let started = Instant::now();
        let all = burst(addr(&p), "/private", n).await;
        let took = started.elapsed();
        assert!(all.iter().all(|r| r.text() == "mine"));
        assert!(all.iter().all(|r| !r.cache_status().contains("collapsed")));
        assert_eq!(origin.count(), 2 * n);
        assert!(took < delay * 2 - delay / 4, "took {took:?}");
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn stale_while_revalidate_serves_at_once_and_refreshes_once() {
    bounded(async {
        let n = Arc::new(AtomicUsize::new(0));
        let seen = n.clone();
        let origin = Origin::start_with_delay(Duration::from_millis(400), move |_| {
            if seen.fetch_add(1, Ordering::SeqCst) == 0 {
                // Stale on arrival, inside its stale-while-revalidate window.
                reply(
                    200,
                    &[
                        ("cache-control", "max-age=1, stale-while-revalidate=60"),
                        ("age", "2"),
                    ],
                    "old",
                )
            } else {
                reply(200, &[("cache-control", "max-age=60")], "new")
            }
        })
        .await;
        let p = proxy(&policy_for(&origin, CACHED)).await;
        assert_eq!(get(addr(&p), "/swr", &[]).await.text(), "old");

        let started = Instant::now();
        let all = burst(addr(&p), "/swr", 10).await;
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(300),
            "stale answers took {took:?}"
        );
        for r in &all {
            assert_eq!(r.text(), "old");
            assert!(
                r.cache_status().contains("detail=stale-while-revalidate"),
                "{}",
                r.cache_status()
            );
        }
        eventually("the background refresh", || origin.count() == 2).await;
        let mut fresh = get(addr(&p), "/swr", &[]).await;
        let wait = Instant::now();
        while fresh.text() != "new" && wait.elapsed() < Duration::from_secs(3) {
            tokio::time::sleep(Duration::from_millis(20)).await;
            fresh = get(addr(&p), "/swr", &[]).await;
        }
        assert_eq!(fresh.text(), "new");
        assert!(fresh.is_hit(), "{}", fresh.cache_status());
        assert_eq!(origin.count(), 2, "exactly one background refresh");
        p.shutdown().await;
    })
    .await;
}

/// An origin whose first answer is stale on arrival with the given
/// `stale-if-error`, and which answers 500 afterwards.
async fn failing_after_first(stale_if_error: u32) -> Origin {
    let n = Arc::new(AtomicUsize::new(0));
    Origin::start(move |_| {
        if n.fetch_add(1, Ordering::SeqCst) == 0 {
            reply(
                200,
                &[
                    (
                        "cache-control",
                        &format!("max-age=1, stale-if-error={stale_if_error}"),
                    ),
                    ("age", "5"),
                ],
                "stale copy",
            )
        } else {
            reply(500, &[], "origin broke")
        }
    })
    .await
}

#[tokio::test]
async fn stale_if_error_covers_an_origin_answering_500() {
    bounded(async {
        let origin = failing_after_first(60).await;
        let p = proxy(&policy_for(&origin, CACHED)).await;
        get(addr(&p), "/sie", &[]).await;
        let r = get(addr(&p), "/sie", &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "stale copy");
        let cs = r.cache_status();
        assert!(cs.contains("fwd=stale; fwd-status=500"), "{cs}");
        assert!(cs.contains("detail=stale-if-error"), "{cs}");
        assert_eq!(origin.count(), 2);
        p.shutdown().await;

        // Outside the window the error goes through.
        let origin = failing_after_first(2).await;
        let p = proxy(&policy_for(&origin, CACHED)).await;
        get(addr(&p), "/sie", &[]).await;
        let r = get(addr(&p), "/sie", &[]).await;
        assert_eq!(r.status, 500);
        assert_eq!(r.text(), "origin broke");
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_storable_error_does_not_replace_the_stale_copy() {
    bounded(async {
        // The error carries its own freshness, so it could be stored; it
        // must not push out the stale copy that stale-if-error serves.
        let n = Arc::new(AtomicUsize::new(0));
        let origin = Origin::start(move |_| {
            if n.fetch_add(1, Ordering::SeqCst) == 0 {
                reply(
                    200,
                    &[
                        ("cache-control", "max-age=10, stale-if-error=600"),
                        ("age", "20"),
                        ("etag", "\"good\""),
                    ],
                    "stale copy",
                )
            } else {
                reply(503, &[("cache-control", "max-age=60")], "origin broke")
            }
        })
        .await;
        let p = proxy(&policy_for(&origin, CACHED)).await;
        get(addr(&p), "/err", &[]).await;
        for n in 2..=3 {
            let r = get(addr(&p), "/err", &[]).await;
            let cs = r.cache_status();
            assert_eq!(r.status, 200, "{cs}");
            assert_eq!(r.text(), "stale copy");
            assert!(cs.contains("fwd=stale; fwd-status=503"), "{cs}");
            assert_eq!(origin.count(), n, "the 503 was not stored");
        }
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn stale_if_error_covers_an_origin_that_is_down() {
    bounded(async {
        for (window, served) in [(60, true), (2, false)] {
            let origin = failing_after_first(window).await;
            let p = proxy(&policy_for(&origin, CACHED)).await;
            get(addr(&p), "/down", &[]).await;
            // The origin goes away: the same policy, pointed at a closed port.
            let dead = closed_addr();
            origin.stop();
            p.reload(load(&format!(
                "backend app {{\n  server \"{dead}\"\n}}\n{CACHED}\n"
            )))
            .await
            .expect("reload");
            let r = get(addr(&p), "/down", &[]).await;
            let cs = r.cache_status();
            if served {
                assert_eq!(r.status, 200, "{cs}");
                assert_eq!(r.text(), "stale copy");
                assert!(cs.contains("detail=stale-if-error"), "{cs}");
            } else {
                assert!(r.status.is_server_error(), "{}: {cs}", r.status);
                assert_ne!(r.text(), "stale copy");
            }
            p.shutdown().await;
        }
    })
    .await;
}

/// An origin that answers with the head and first event of an event stream
/// of unknown length, then holds the connection open; counts requests.
async fn event_stream_origin() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind origin");
    let at = listener.local_addr().expect("address");
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                counter.fetch_add(1, Ordering::SeqCst);
                let first = b"HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\n\
                    content-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n\
                    8\r\ndata: 1\n\r\n";
                let _ = stream.write_all(first).await;
                // Held open, as an event stream is, longer than the test
                // reads (the proxy drains it on shutdown).
                tokio::time::sleep(Duration::from_secs(3)).await;
            });
        }
    });
    (at, count)
}

/// Sends a GET over a raw connection and reads until `wanted` arrives.
async fn read_until(at: std::net::SocketAddr, path: &str, wanted: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut conn = tokio::net::TcpStream::connect(at).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nhost: test.example\r\n\r\n");
    conn.write_all(req.as_bytes()).await.expect("send");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let reading = async {
        while !String::from_utf8_lossy(&got).contains(wanted) {
            let n = conn.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed before {wanted:?}");
            got.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(5), reading)
        .await
        .unwrap_or_else(|_| panic!("no {wanted:?} yet: {}", String::from_utf8_lossy(&got)));
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn a_cacheable_stream_of_unknown_length_reaches_clients_as_it_arrives() {
    bounded(async {
        let (origin, count) = event_stream_origin().await;
        let p = proxy(&format!(
            "backend app {{\n  server \"{origin}\"\n}}\n{CACHED}\n"
        ))
        .await;
        let at = addr(&p);
        let first = read_until(at, "/events", "data: 1").await;
        assert!(first.contains("detail=streamed"), "{first}");
        // Others asking meanwhile are not held behind a stream that does
        // not end: each gets its own.
        let others: Vec<_> = (0..3)
            .map(|_| tokio::spawn(async move { read_until(at, "/events", "data: 1").await }))
            .collect();
        for o in others {
            o.await.expect("reader");
        }
        assert_eq!(count.load(Ordering::SeqCst), 4);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_stream_of_unknown_length_is_stored_once_it_ends() {
    bounded(async {
        let (raw, body) = chunked_response(100_000, "cache-control: max-age=60\r\n");
        let origin = RawOrigin::start(raw).await;
        let p = proxy(&format!(
            "backend app {{\n  server \"{}\"\n}}\n{CACHED}\n",
            origin.addr
        ))
        .await;
        let first = get(addr(&p), "/chunked", &[]).await;
        assert_eq!(first.body, body);
        assert!(first.cache_status().contains("detail=streamed"));
        // Stored when the last chunk went through.
        let mut hit = get(addr(&p), "/chunked", &[]).await;
        for _ in 0..50 {
            if hit.is_hit() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            hit = get(addr(&p), "/chunked", &[]).await;
        }
        assert!(hit.is_hit(), "{}", hit.cache_status());
        assert_eq!(hit.body, body);
        assert_eq!(hit.header("content-length"), Some("100000"));
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn concurrent_misses_on_a_chunked_response_make_one_origin_request() {
    bounded(async {
        let (raw, body) = chunked_response(100_000, "cache-control: max-age=60\r\n");
        let origin = RawOrigin::start_with_delay(raw, Duration::from_millis(300)).await;
        let p = proxy(&format!(
            "backend app {{\n  server \"{}\"\n}}\n{CACHED}\n",
            origin.addr
        ))
        .await;
        let all = burst(addr(&p), "/chunked", 20).await;
        assert!(all.iter().all(|r| r.status == 200 && r.body == body));
        assert_eq!(origin.count(), 1, "the waiters got the stored copy");
        p.shutdown().await;
    })
    .await;
}
