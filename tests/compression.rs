//! Compression end to end: a real origin, Portico in-process, a plain
//! client that decodes what it gets. Kept in a binary of its own because one
//! test reads the process-wide count of compressed copies made.

mod common;
use common::*;

/// A compressible page.
fn page() -> String {
    "<p>portico keeps compressed copies</p>\n".repeat(200)
}

/// The value of a counter line in a Prometheus scrape, 0 when absent.
fn counter(scrape: &str, series: &str) -> u64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn hits_are_compressed_once_per_coding() {
    bounded(async {
        let origin = Origin::start(|_| {
            reply(
                200,
                &[
                    ("cache-control", "max-age=60"),
                    ("content-type", "text/html"),
                ],
                page(),
            )
        })
        .await;
        let rules = "rule all { route app cache { } compress br, gzip }";
        let p = proxy(&policy_for(&origin, rules)).await;
        for _ in 0..4 {
            let r = get(addr(&p), "/page", &[("accept-encoding", "br")]).await;
            assert_eq!(r.header("content-encoding"), Some("br"));
            assert_eq!(unbrotli(&r.body), page());
            assert_eq!(
                r.header("content-length"),
                Some(r.body.len().to_string().as_str())
            );
        }
        for _ in 0..3 {
            let r = get(addr(&p), "/page", &[("accept-encoding", "gzip")]).await;
            assert_eq!(r.header("content-encoding"), Some("gzip"));
            assert_eq!(gunzip(&r.body), page());
        }
        let plain = get(addr(&p), "/page", &[]).await;
        assert_eq!(plain.header("content-encoding"), None);
        assert_eq!(plain.text(), page());
        assert!(plain
            .header("vary")
            .is_some_and(|v| v.contains("accept-encoding")));
        assert_eq!(origin.count(), 1);
        let scrape = admin(&p, "GET", "/metrics", Some("secret")).await.text();
        // One copy per coding, then the kept copy for every other delivery.
        assert_eq!(
            counter(&scrape, "portico_compressed_copies_total{result=\"made\"}"),
            2,
            "{scrape}"
        );
        assert_eq!(
            counter(
                &scrape,
                "portico_compressed_copies_total{result=\"reused\"}"
            ),
            5,
            "{scrape}"
        );
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn uncached_responses_are_compressed_as_they_stream() {
    bounded(async {
        let origin = Origin::start(|_| {
            reply(
                200,
                &[("content-type", "text/html"), ("etag", "\"p1\"")],
                page(),
            )
        })
        .await;
        let rules = "rule all { route app compress gzip, br }";
        let p = proxy(&policy_for(&origin, rules)).await;
        let gz = get(addr(&p), "/page", &[("accept-encoding", "gzip")]).await;
        assert_eq!(gz.header("content-encoding"), Some("gzip"));
        assert_eq!(gunzip(&gz.body), page());
        assert!(gz.body.len() < page().len() / 4);
        // The coded body is another sequence of bytes with the same content.
        assert_eq!(gz.header("etag"), Some("W/\"p1\""));
        assert_eq!(gz.header("vary"), Some("accept-encoding"));
        let br = get(
            addr(&p),
            "/page",
            &[("accept-encoding", "br;q=1, gzip;q=0.5")],
        )
        .await;
        assert_eq!(br.header("content-encoding"), Some("br"));
        assert_eq!(unbrotli(&br.body), page());
        let plain = get(addr(&p), "/page", &[]).await;
        assert_eq!(plain.header("content-encoding"), None);
        assert_eq!(plain.text(), page());
        assert_eq!(plain.header("etag"), Some("\"p1\""));
        assert_eq!(plain.header("vary"), Some("accept-encoding"));
        let head = send(
            addr(&p),
            "HEAD",
            "/page",
            &[("accept-encoding", "gzip")],
            "",
        )
        .await;
        assert_eq!(head.status, 200);
        assert_eq!(head.header("content-encoding"), Some("gzip"));
        assert!(head.body.is_empty());
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn partial_and_coded_responses_pass_as_they_are() {
    bounded(async {
        let origin = Origin::start(|s| match s.uri.path() {
            "/part" => reply(
                206,
                &[
                    ("content-type", "text/html"),
                    ("content-range", "bytes 0-3999/8000"),
                ],
                page()[..4000].to_owned(),
            ),
            "/coded" => reply(
                200,
                &[("content-type", "text/html"), ("content-encoding", "gzip")],
                "not really gzip, but the origin says so",
            ),
            _ => reply(
                200,
                &[
                    ("content-type", "image/png"),
                    ("cache-control", "no-transform"),
                ],
                page(),
            ),
        })
        .await;
        let rules = "rule all { route app compress gzip }";
        let p = proxy(&policy_for(&origin, rules)).await;
        let gz = [("accept-encoding", "gzip")];
        let part = get(addr(&p), "/part", &gz).await;
        assert_eq!(part.status, 206);
        assert_eq!(part.header("content-encoding"), None);
        assert_eq!(part.text(), page()[..4000]);
        let coded = get(addr(&p), "/coded", &gz).await;
        assert_eq!(coded.text(), "not really gzip, but the origin says so");
        let png = get(addr(&p), "/png", &gz).await;
        assert_eq!(png.header("content-encoding"), None);
        assert_eq!(png.text(), page());
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn an_event_stream_is_compressed_without_holding_events_back() {
    use http_body_util::BodyExt as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    bounded(async {
        // An origin that sends one event, then holds the stream open until
        // the test has seen that event, then sends a second and ends.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin_addr = listener.local_addr().unwrap();
        let seen_first = std::sync::Arc::new(tokio::sync::Notify::new());
        let release = seen_first.clone();
        let origin = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = stream.read(&mut buf).await.unwrap();
                assert!(n > 0, "request cut short");
                head.extend_from_slice(&buf[..n]);
            }
            let first = "data: one\n\n";
            let second = "data: two\n\n";
            let start = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                 transfer-encoding: chunked\r\n\r\n{:x}\r\n{first}\r\n",
                first.len()
            );
            stream.write_all(start.as_bytes()).await.unwrap();
            release.notified().await;
            let end = format!("{:x}\r\n{second}\r\n0\r\n\r\n", second.len());
            stream.write_all(end.as_bytes()).await.unwrap();
        });
        let policy = format!(
            "backend app {{\n  server \"{origin_addr}\"\n}}\nrule all {{ route app compress gzip }}\n"
        );
        let p = proxy(&policy).await;
        let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let req = http::Request::get(format!("http://{}/events", addr(&p)))
            .header("host", "test.example")
            .header("accept-encoding", "gzip")
            .body(http_body_util::Empty::new())
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.headers()["content-encoding"], "gzip");
        let mut body = resp.into_body();
        let mut decoder = flate2::write::GzDecoder::new(Vec::new());
        // The first event decodes before the origin sends the second.
        while !String::from_utf8_lossy(decoder.get_ref()).contains("data: one") {
            let frame = body.frame().await.expect("more body").expect("a frame");
            if let Ok(data) = frame.into_data() {
                std::io::Write::write_all(&mut decoder, &data).unwrap();
                std::io::Write::flush(&mut decoder).unwrap();
            }
        }
        assert!(!String::from_utf8_lossy(decoder.get_ref()).contains("two"));
        seen_first.notify_one();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                std::io::Write::write_all(&mut decoder, &data).unwrap();
            }
        }
        let all = decoder.finish().unwrap();
        assert_eq!(String::from_utf8(all).unwrap(), "data: one\n\ndata: two\n\n");
        origin.await.unwrap();
        p.shutdown().await;
    })
    .await;
}
