//! The disk tier end to end: what Portico stored, purged or could not read
//! before a restart, seen through a real origin that counts requests. The
//! memory tier is kept tiny so that objects live on disk.

mod common;
use common::*;
use std::path::Path;
use std::time::Duration;

/// A policy caching everything from `origin`, with its disk tier in `dir`.
fn on_disk(origin: std::net::SocketAddr, dir: &Path, max_object: &str) -> String {
    format!(
        "storage {{ memory 64KiB max_object {max_object} disk \"{}\" 16MiB }}\n\
         backend app {{\n  server \"{origin}\"\n}}\n\
         rule all {{ route app cache {{ }} }}\n",
        dir.display()
    )
}

async fn start(origin: std::net::SocketAddr, dir: &Path) -> portico::run::Running {
    proxy_with(&on_disk(origin, dir, "1MiB"), Some(dir)).await
}

#[tokio::test]
async fn a_stored_object_is_a_hit_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    bounded(async {
        let origin =
            Origin::start(|_| reply(200, &[("cache-control", "max-age=600")], "kept")).await;
        let p = start(origin.addr, dir.path()).await;
        assert_eq!(get(addr(&p), "/a", &[]).await.text(), "kept");
        p.shutdown().await;

        let p = start(origin.addr, dir.path()).await;
        let again = get(addr(&p), "/a", &[]).await;
        assert!(again.is_hit(), "{}", again.cache_status());
        assert_eq!(again.text(), "kept");
        assert_eq!(origin.count(), 1);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_purged_object_stays_purged_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[("cache-control", "max-age=600")], "x")).await;
        let p = start(origin.addr, dir.path()).await;
        get(addr(&p), "/gone", &[]).await;
        get(addr(&p), "/kept", &[]).await;
        let r = admin(
            &p,
            "POST",
            "/purge?url=http://test.example/gone",
            Some("secret"),
        )
        .await;
        assert!(r.text().contains("\"purged\":1"), "{}", r.text());
        p.shutdown().await;

        let p = start(origin.addr, dir.path()).await;
        let gone = get(addr(&p), "/gone", &[]).await;
        assert!(!gone.is_hit(), "{}", gone.cache_status());
        assert_eq!(origin.count_path("/gone"), 2);
        assert!(get(addr(&p), "/kept", &[]).await.is_hit());
        assert_eq!(origin.count_path("/kept"), 1);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_tag_purge_after_a_restart_reaches_objects_stored_before_it() {
    let dir = tempfile::tempdir().unwrap();
    bounded(async {
        let origin = Origin::start(|req| {
            let tag = if req.uri.path().starts_with("/red") {
                "red"
            } else {
                "blue"
            };
            reply(
                200,
                &[("cache-control", "max-age=600"), ("surrogate-key", tag)],
                "x",
            )
        })
        .await;
        let p = start(origin.addr, dir.path()).await;
        for path in ["/red/1", "/red/2", "/blue/1"] {
            get(addr(&p), path, &[]).await;
        }
        p.shutdown().await;
        tokio::time::sleep(Duration::from_millis(5)).await;

        // Nothing was read since the restart: no object is known yet, the
        // ban reaches them when they are read.
        let p = start(origin.addr, dir.path()).await;
        let r = admin(&p, "POST", "/purge?tag=red", Some("secret")).await;
        assert_eq!(r.status, 200);
        assert!(r.text().contains("\"purged\":0"), "{}", r.text());
        assert!(r.text().contains("\"deferred\":true"), "{}", r.text());
        let red = get(addr(&p), "/red/1", &[]).await;
        assert!(!red.is_hit(), "{}", red.cache_status());
        assert!(get(addr(&p), "/blue/1", &[]).await.is_hit());
        p.shutdown().await;

        // A third run: the ban was kept with the cache.
        let p = start(origin.addr, dir.path()).await;
        let red = get(addr(&p), "/red/2", &[]).await;
        assert!(!red.is_hit(), "{}", red.cache_status());
        assert_eq!(origin.count_path("/red/2"), 2);
        assert_eq!(origin.count_path("/blue/1"), 1);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn corrupt_cache_files_are_dropped_and_fetched_again() {
    let dir = tempfile::tempdir().unwrap();
    bounded(async {
        let origin =
            Origin::start(|_| reply(200, &[("cache-control", "max-age=600")], "pristine")).await;
        let p = start(origin.addr, dir.path()).await;
        get(addr(&p), "/a", &[]).await;
        get(addr(&p), "/b", &[]).await;
        p.shutdown().await;

        assert!(scramble_files(dir.path()) > 0, "the disk tier wrote files");

        let p = start(origin.addr, dir.path()).await;
        for path in ["/a", "/b"] {
            let r = get(addr(&p), path, &[]).await;
            assert_eq!(r.status, 200);
            assert_eq!(r.text(), "pristine");
            assert!(!r.is_hit(), "{path}: {}", r.cache_status());
            assert_eq!(origin.count_path(path), 2, "{path}");
            assert!(
                get(addr(&p), path, &[]).await.is_hit(),
                "{path}: stored again"
            );
        }
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn cache_status_does_not_say_stored_when_the_store_refused_the_entry() {
    bounded(async {
        // The body fits under max_object, the entry with its fields does not.
        let body = "q".repeat((1 << 20) - 8);
        let origin =
            Origin::start(move |_| reply(200, &[("cache-control", "max-age=600")], body.clone()))
                .await;
        let p = proxy(&policy_for(
            &origin,
            "storage { max_object 1MiB }\nrule all { route app cache { } }",
        ))
        .await;
        for n in 1..=2 {
            let r = get(addr(&p), "/edge", &[]).await;
            assert_eq!(r.body.len(), (1 << 20) - 8);
            let cs = r.cache_status();
            assert!(!cs.contains("stored"), "{cs}");
            assert!(cs.contains("detail=store-refused"), "{cs}");
            assert_eq!(origin.count(), n);
        }
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn an_object_above_max_object_streams_through_and_is_not_stored() {
    bounded(async {
        // Known length: refused on the Content-Length.
        let big = "z".repeat(3 << 20);
        let body = big.clone();
        let origin =
            Origin::start(move |_| reply(200, &[("cache-control", "max-age=600")], body.clone()))
                .await;
        let p = proxy(&policy_for(
            &origin,
            "storage { max_object 1MiB }\nrule all { route app cache { } }",
        ))
        .await;
        for _ in 0..2 {
            let r = get(addr(&p), "/big", &[]).await;
            assert_eq!(r.body.len(), big.len());
            assert!(r.body == big.as_bytes());
            assert!(
                r.cache_status().contains("detail=too-large"),
                "{}",
                r.cache_status()
            );
        }
        assert_eq!(origin.count(), 2);
        p.shutdown().await;

        // Unknown length (chunked): streamed through as it arrives, and not
        // stored once it grew past max_object.
        let (raw, body) = chunked_response(3 << 20, "cache-control: max-age=600\r\n");
        let origin = RawOrigin::start(raw).await;
        let p = proxy(&format!(
            "storage {{ max_object 1MiB }}\nbackend app {{\n  server \"{}\"\n}}\n\
             rule all {{ route app cache {{ }} }}\n",
            origin.addr
        ))
        .await;
        for _ in 0..2 {
            let r = get(addr(&p), "/stream", &[]).await;
            assert_eq!(r.status, 200);
            assert_eq!(r.body.len(), body.len());
            assert!(r.body == body, "the streamed body is intact");
            assert!(
                r.cache_status().contains("detail=streamed"),
                "{}",
                r.cache_status()
            );
        }
        assert_eq!(origin.count(), 2);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn expiry_is_checked_on_read_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    bounded(async {
        let origin =
            Origin::start(|_| reply(200, &[("cache-control", "max-age=1")], "short")).await;
        let p = start(origin.addr, dir.path()).await;
        get(addr(&p), "/e", &[]).await;
        assert!(get(addr(&p), "/e", &[]).await.is_hit());
        p.shutdown().await;
        tokio::time::sleep(Duration::from_millis(1100)).await;

        let p = start(origin.addr, dir.path()).await;
        let r = get(addr(&p), "/e", &[]).await;
        assert!(!r.is_hit(), "{}", r.cache_status());
        assert_eq!(r.text(), "short");
        assert_eq!(origin.count(), 2);
        p.shutdown().await;
    })
    .await;
}

/// The value of the sample `series` (name and labels as rendered) in a
/// Prometheus text page.
fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[tokio::test]
async fn metrics_report_evictions_and_what_each_tier_holds() {
    let dir = tempfile::tempdir().unwrap();
    bounded(async {
        const BODY: usize = 4096;
        const OBJECTS: usize = 40;
        let origin =
            Origin::start(|_| reply(200, &[("cache-control", "max-age=600")], vec![b'm'; BODY]))
                .await;
        let p = start(origin.addr, dir.path()).await;
        // 40 objects of 4 KiB and more: well past the 64 KiB memory tier.
        for i in 0..OBJECTS {
            assert_eq!(
                get(addr(&p), &format!("/m/{i}"), &[]).await.body.len(),
                BODY
            );
        }
        // Disk writes are in the background: wait until foyer reports some.
        let page = loop {
            let page = admin(&p, "GET", "/metrics", Some("secret")).await.text();
            if sample(&page, "portico_cache_disk_objects").is_some_and(|n| n > 0.0) {
                break page;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let value = |series: &str| {
            sample(&page, series).unwrap_or_else(|| panic!("no {series} in:\n{page}"))
        };
        assert!(value("portico_cache_evictions_total{tier=\"memory\"}") > 0.0);
        let memory_bytes = value("portico_cache_memory_bytes");
        let memory_objects = value("portico_cache_memory_objects");
        assert!(
            memory_objects >= 1.0 && memory_objects < OBJECTS as f64,
            "{page}"
        );
        // Each object weighs its body and more; all of them within capacity.
        assert!(memory_bytes >= memory_objects * BODY as f64, "{page}");
        assert!(memory_bytes <= (64 << 10) as f64, "{page}");
        let disk_objects = value("portico_cache_disk_objects");
        assert!(disk_objects <= OBJECTS as f64, "{page}");
        assert!(value("portico_cache_disk_bytes") > 0.0, "{page}");
        assert!(
            value("portico_cache_disk_written_bytes_total") >= disk_objects * BODY as f64,
            "{page}"
        );
        for reason in ["queue-full", "buffer-full", "young"] {
            value(&format!(
                "portico_cache_disk_write_drops_total{{reason=\"{reason}\"}}"
            ));
        }
        assert!(page.contains("# HELP portico_cache_disk_objects"), "{page}");
        p.shutdown().await;
    })
    .await;
}
