//! Compression end to end: a real origin, Portico in-process, a plain
//! client that decodes what it gets. Kept in a binary of its own because one
//! test reads the process-wide count of compressed copies made.

mod common;
use common::*;
use std::io::Read as _;

/// A compressible page.
fn page() -> String {
    "<p>portico keeps compressed copies</p>\n".repeat(200)
}

fn gunzip(body: &[u8]) -> String {
    let mut out = String::new();
    flate2::read::GzDecoder::new(body)
        .read_to_string(&mut out)
        .expect("a gzip body");
    out
}

fn unbrotli(body: &[u8]) -> String {
    let mut out = Vec::new();
    brotli::BrotliDecompress(&mut &body[..], &mut out).expect("a brotli body");
    String::from_utf8(out).expect("text")
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
