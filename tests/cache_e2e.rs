//! The cache's HTTP semantics end to end: a real origin that counts
//! requests, Portico in-process, a plain client. Each test states one
//! promise of RFC 9111 (or of Portico's own policy) and checks it by what
//! reaches the origin and what the client sees.

mod common;
use common::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

const CACHED: &str = "rule all { route app cache { } }";

/// A proxy caching everything in front of `origin`.
async fn cached(origin: &Origin) -> portico::run::Running {
    proxy(&policy_for(origin, CACHED)).await
}

/// An IMF-fixdate (RFC 9110 section 5.6.7).
fn http_date(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][days.rem_euclid(7) as usize];
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{weekday}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        months[(month - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[test]
fn http_dates_format_and_parse_back() {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(784_111_777);
    assert_eq!(http_date(t), "Sun, 06 Nov 1994 08:49:37 GMT");
    assert_eq!(
        portico::cache::date::parse_http_date(&http_date(t)),
        Some(t)
    );
}

#[tokio::test]
async fn only_get_and_head_are_stored() {
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[("cache-control", "max-age=60")], "x")).await;
        let p = cached(&origin).await;
        for _ in 0..2 {
            let r = send(addr(&p), "POST", "/form", &[], "data").await;
            assert_eq!(r.status, 200);
            assert!(
                r.cache_status().contains("fwd=method"),
                "{}",
                r.cache_status()
            );
            assert!(!r.cache_status().contains("stored"));
        }
        assert_eq!(origin.count_path("/form"), 2);
        // A HEAD miss fills with GET; the next GET is a hit.
        let h = send(addr(&p), "HEAD", "/page", &[], "").await;
        assert_eq!(h.status, 200);
        assert!(h.body.is_empty());
        let g = get(addr(&p), "/page", &[]).await;
        assert!(g.is_hit(), "{}", g.cache_status());
        assert_eq!(g.text(), "x");
        assert_eq!(origin.count_path("/page"), 1);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_404_with_max_age_is_stored() {
    bounded(async {
        let origin =
            Origin::start(|_| reply(404, &[("cache-control", "max-age=60")], "nope")).await;
        let p = cached(&origin).await;
        let first = get(addr(&p), "/missing", &[]).await;
        assert_eq!(first.status, 404);
        let second = get(addr(&p), "/missing", &[]).await;
        assert_eq!(second.status, 404);
        assert!(second.is_hit(), "{}", second.cache_status());
        assert_eq!(origin.count_path("/missing"), 1);

        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_500_without_freshness_is_not_stored() {
    bounded(async {
        let origin = Origin::start(|_| reply(500, &[], "boom")).await;
        let p = cached(&origin).await;
        for _ in 0..2 {
            let r = get(addr(&p), "/broken", &[]).await;
            assert_eq!(r.status, 500);
            let cs = r.cache_status();
            assert!(cs.contains("fwd=uri-miss; fwd-status=500"), "{cs}");
            assert!(cs.contains("detail=status"), "{cs}");
        }
        assert_eq!(origin.count(), 2);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn no_store_and_private_are_not_stored() {
    bounded(async {
        let origin = Origin::start(|s| match s.uri.path() {
            "/ns" => reply(200, &[("cache-control", "no-store, max-age=60")], "a"),
            _ => reply(200, &[("cache-control", "private, max-age=60")], "b"),
        })
        .await;
        let p = cached(&origin).await;
        for (path, why) in [("/ns", "no-store"), ("/priv", "private")] {
            for _ in 0..2 {
                let r = get(addr(&p), path, &[]).await;
                assert_eq!(r.status, 200);
                assert!(
                    r.cache_status().contains(&format!("detail={why}")),
                    "{}",
                    r.cache_status()
                );
            }
            assert_eq!(origin.count_path(path), 2, "{path}");
        }
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn authorized_requests_are_stored_only_when_the_response_allows() {
    bounded(async {
        let origin = Origin::start(|s| {
            let cc = match s.uri.path() {
                "/plain" => "max-age=60",
                "/public" => "public, max-age=60",
                "/shared" => "s-maxage=60",
                _ => "max-age=60, must-revalidate",
            };
            reply(200, &[("cache-control", cc)], "secret-ish")
        })
        .await;
        let p = cached(&origin).await;
        let auth = [("authorization", "Bearer abc")];
        for _ in 0..2 {
            let r = get(addr(&p), "/plain", &auth).await;
            assert!(
                r.cache_status().contains("detail=authorization"),
                "{}",
                r.cache_status()
            );
        }
        assert_eq!(origin.count_path("/plain"), 2);
        for path in ["/public", "/shared", "/revalidated"] {
            get(addr(&p), path, &auth).await;
            let again = get(addr(&p), path, &auth).await;
            assert!(again.is_hit(), "{path}: {}", again.cache_status());
            assert_eq!(origin.count_path(path), 1, "{path}");
        }
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn share_authorized_stores_responses_to_authorized_requests() {
    bounded(async {
        let origin =
            Origin::start(|_| reply(200, &[("cache-control", "max-age=60")], "same")).await;
        let p = proxy(&policy_for(
            &origin,
            "rule all { route app cache { share_authorized } }",
        ))
        .await;
        let first = get(addr(&p), "/plain", &[("authorization", "Bearer abc")]).await;
        assert!(
            first.cache_status().contains("stored"),
            "{}",
            first.cache_status()
        );
        let other = get(addr(&p), "/plain", &[("authorization", "Bearer xyz")]).await;
        assert!(other.is_hit(), "{}", other.cache_status());
        assert_eq!(other.text(), "same");
        assert_eq!(origin.count_path("/plain"), 1);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn set_cookie_is_never_stored_by_default() {
    bounded(async {
        let origin = Origin::start(|_| {
            reply(
                200,
                &[("cache-control", "max-age=60"), ("set-cookie", "s=1")],
                "c",
            )
        })
        .await;
        let p = cached(&origin).await;
        for _ in 0..2 {
            let r = get(addr(&p), "/c", &[]).await;
            assert_eq!(r.header("set-cookie"), Some("s=1"));
            assert!(
                r.cache_status().contains("detail=set-cookie"),
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
async fn proxy_authentication_fields_are_not_stored() {
    bounded(async {
        let origin = Origin::start(|_| {
            reply(
                200,
                &[
                    ("cache-control", "max-age=60"),
                    ("proxy-authentication-info", "nextnonce=\"n1\""),
                    ("proxy-authenticate", "Basic realm=\"p\""),
                ],
                "x",
            )
        })
        .await;
        let p = cached(&origin).await;
        get(addr(&p), "/pa", &[]).await;
        let hit = get(addr(&p), "/pa", &[]).await;
        assert!(hit.is_hit(), "{}", hit.cache_status());
        assert_eq!(hit.header("proxy-authentication-info"), None);
        assert_eq!(hit.header("proxy-authenticate"), None);
        assert_eq!(origin.count(), 1);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn store_set_cookie_stores_without_the_cookie() {
    bounded(async {
        let origin = Origin::start(|_| {
            reply(
                200,
                &[("cache-control", "max-age=60"), ("set-cookie", "s=1")],
                "c",
            )
        })
        .await;
        let p = proxy(&policy_for(
            &origin,
            "rule all { route app cache { store_set_cookie } }",
        ))
        .await;
        let first = get(addr(&p), "/c", &[]).await;
        assert!(
            first.cache_status().contains("stored"),
            "{}",
            first.cache_status()
        );
        assert_eq!(
            first.header("set-cookie"),
            Some("s=1"),
            "the client that filled the cache gets its cookie"
        );
        let hit = get(addr(&p), "/c", &[]).await;
        assert!(hit.is_hit(), "{}", hit.cache_status());
        assert_eq!(hit.header("set-cookie"), None);
        assert_eq!(hit.text(), "c");
        assert_eq!(origin.count(), 1);
        p.shutdown().await;
    })
    .await;
}

/// A rule that removes `Set-Cookie` removes it from the answer that filled
/// the cache too, not only from the hits after it.
#[tokio::test]
async fn a_rule_s_cookie_removal_holds_for_the_filling_request() {
    bounded(async {
        let origin = Origin::start(|_| {
            reply(
                200,
                &[("cache-control", "max-age=60"), ("set-cookie", "sid=secret")],
                "c",
            )
        })
        .await;
        let p = proxy(&policy_for(
            &origin,
            r#"rule all { route app cache { store_set_cookie } response_header remove "Set-Cookie" }"#,
        ))
        .await;
        let first = get(addr(&p), "/c", &[]).await;
        assert!(first.cache_status().contains("stored"), "{}", first.cache_status());
        assert_eq!(first.header("set-cookie"), None);
        let hit = get(addr(&p), "/c", &[]).await;
        assert!(hit.is_hit());
        assert_eq!(hit.header("set-cookie"), None);
        p.shutdown().await;
    })
    .await;
}

/// The `ttl=` of a hit's Cache-Status.
fn ttl(got: &Got) -> i64 {
    let cs = got.cache_status();
    let at = cs.find("ttl=").unwrap_or_else(|| panic!("no ttl in {cs}")) + 4;
    cs[at..]
        .split(';')
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("bad ttl in {cs}"))
}

#[tokio::test]
async fn freshness_comes_from_s_maxage_max_age_expires_and_last_modified() {
    bounded(async {
        let origin = Origin::start(|s| {
            let now = std::time::SystemTime::now();
            let secs = std::time::Duration::from_secs;
            match s.uri.path() {
                "/s-maxage" => reply(200, &[("cache-control", "max-age=10, s-maxage=500")], "a"),
                "/max-age" => reply(200, &[("cache-control", "max-age=300")], "b"),
                "/expires" => reply(
                    200,
                    &[
                        ("date", &http_date(now)),
                        ("expires", &http_date(now + secs(200))),
                    ],
                    "c",
                ),
                _ => reply(
                    200,
                    &[
                        ("date", &http_date(now)),
                        ("last-modified", &http_date(now - secs(1000))),
                    ],
                    "d",
                ),
            }
        })
        .await;
        let p = cached(&origin).await;
        for (path, want) in [
            ("/s-maxage", 500),
            ("/max-age", 300),
            ("/expires", 200),
            ("/heuristic", 100),
        ] {
            get(addr(&p), path, &[]).await;
            let hit = get(addr(&p), path, &[]).await;
            assert!(hit.is_hit(), "{path}: {}", hit.cache_status());
            let t = ttl(&hit);
            assert!(
                (want - 2..=want).contains(&t),
                "{path}: ttl {t}, want {want}"
            );
            assert_eq!(origin.count_path(path), 1, "{path}");
        }
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_public_response_of_any_status_is_heuristically_fresh() {
    bounded(async {
        let origin = Origin::start(|s| {
            let now = std::time::SystemTime::now();
            let modified = http_date(now - std::time::Duration::from_secs(1000));
            let mut fields = vec![
                ("date", http_date(now)),
                ("last-modified", modified),
                ("location", "/elsewhere".to_string()),
            ];
            if s.uri.path() == "/public" {
                fields.push(("cache-control", "public".to_string()));
            }
            let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
            reply(302, &fields, "")
        })
        .await;
        let p = cached(&origin).await;
        get(addr(&p), "/public", &[]).await;
        let hit = get(addr(&p), "/public", &[]).await;
        assert_eq!(hit.status, 302);
        assert!(hit.is_hit(), "{}", hit.cache_status());
        let t = ttl(&hit);
        assert!((98..=100).contains(&t), "ttl {t}");
        assert_eq!(origin.count_path("/public"), 1);
        // Without `public`, a 302 is not heuristically cacheable.
        for _ in 0..2 {
            let r = get(addr(&p), "/plain", &[]).await;
            assert!(
                r.cache_status().contains("detail=status"),
                "{}",
                r.cache_status()
            );
        }
        assert_eq!(origin.count_path("/plain"), 2);
        p.shutdown().await;
    })
    .await;
}

/// An origin that answers every request with `response` as written, then
/// closes the connection; counts requests.
async fn raw_origin(response: &'static [u8]) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
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
                let _ = stream.write_all(response).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (at, count)
}

#[tokio::test]
async fn a_response_stored_without_date_is_dated_when_it_arrived() {
    bounded(async {
        let (at, count) = raw_origin(
            b"HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\n\
              content-length: 1\r\nconnection: close\r\n\r\nx",
        )
        .await;
        let p = proxy(&format!(
            "backend app {{\n  server \"{at}\"\n}}\n{CACHED}\n"
        ))
        .await;
        let first = get(addr(&p), "/d", &[]).await;
        let dated = first.header("date").expect("a Date").to_string();
        assert!(
            portico::cache::date::parse_http_date(&dated).is_some(),
            "{dated}"
        );
        // A hit in a later second still carries the date the response
        // arrived, not the time it is served: its Age counts from there.
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        let hit = get(addr(&p), "/d", &[]).await;
        assert!(hit.is_hit(), "{}", hit.cache_status());
        assert_eq!(hit.header("date"), Some(dated.as_str()));
        assert_eq!(count.load(Ordering::SeqCst), 1);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn age_on_hits_grows() {
    bounded(async {
        let origin =
            Origin::start(|_| reply(200, &[("cache-control", "max-age=60"), ("age", "5")], "a"))
                .await;
        let p = cached(&origin).await;
        get(addr(&p), "/a", &[]).await;
        let first = get(addr(&p), "/a", &[]).await;
        assert!(first.is_hit());
        let age1: u64 = first.header("age").unwrap().parse().unwrap();
        assert!(age1 >= 5, "age {age1}");
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        let later = get(addr(&p), "/a", &[]).await;
        let age2: u64 = later.header("age").unwrap().parse().unwrap();
        assert!(age2 > age1, "age {age1} then {age2}");
        p.shutdown().await;
    })
    .await;
}

/// A 304 that refreshes a stored copy replaces its fields with the 304's;
/// the response rules' edits to those fields are made again, and the
/// others keep theirs once.
#[tokio::test]
async fn response_rule_edits_survive_a_304_refresh() {
    bounded(async {
        let origin = Origin::start(|s| {
            let fields = [("cache-control", "max-age=60"), ("etag", "\"v1\"")];
            if s.headers.contains_key("if-none-match") {
                reply(304, &fields, "")
            } else {
                reply(200, &fields, "body")
            }
        })
        .await;
        let p = proxy(&policy_for(
            &origin,
            r#"rule all { route app cache { } }
on response {
  response_header set "cache-control" "public, max-age=60"
  response_header add "x-note" "edited"
}"#,
        ))
        .await;
        let first = get(addr(&p), "/r", &[]).await;
        assert_eq!(first.header("cache-control"), Some("public, max-age=60"));
        let refreshed = get(addr(&p), "/r", &[("cache-control", "no-cache")]).await;
        assert_eq!(origin.count(), 2);
        assert!(origin.seen()[1].headers.contains_key("if-none-match"));
        assert_eq!(refreshed.text(), "body");
        assert_eq!(
            refreshed.header("cache-control"),
            Some("public, max-age=60")
        );
        let hit = get(addr(&p), "/r", &[]).await;
        assert!(hit.is_hit(), "{}", hit.cache_status());
        assert_eq!(hit.header("cache-control"), Some("public, max-age=60"));
        assert_eq!(hit.headers.get_all("x-note").iter().count(), 1);
        p.shutdown().await;
    })
    .await;
}

/// A 304 after which the refreshed copy may no longer be stored (a response
/// rule says `cache off` for what the 304 says) still has the response
/// rules' edits made again to the fields it replaced.
#[tokio::test]
async fn response_rule_edits_survive_a_304_whose_copy_is_not_stored() {
    bounded(async {
        let origin = Origin::start(|s| {
            if s.headers.contains_key("if-none-match") {
                let fields = [("etag", "\"v1\""), ("x-version", "v2"), ("x-stop", "1")];
                reply(304, &fields, "")
            } else {
                let fields = [("cache-control", "max-age=60"), ("etag", "\"v1\"")];
                reply(200, &fields, "body")
            }
        })
        .await;
        let p = proxy(&policy_for(
            &origin,
            r#"rule all { route app cache { } }
on response { response_header set "x-version" "edited" }
on response when header("x-stop") { cache off }"#,
        ))
        .await;
        let first = get(addr(&p), "/n", &[]).await;
        assert_eq!(first.header("x-version"), Some("edited"));
        let refreshed = get(addr(&p), "/n", &[("cache-control", "no-cache")]).await;
        assert_eq!(origin.count(), 2);
        assert_eq!(
            (refreshed.status.as_u16(), refreshed.text()),
            (200, "body".to_owned())
        );
        assert!(
            refreshed.cache_status().contains("not-storable"),
            "{}",
            refreshed.cache_status()
        );
        assert_eq!(refreshed.header("x-version"), Some("edited"));
        p.shutdown().await;
    })
    .await;
}

/// An origin that answers a revalidation with 5xx: the error is passed on
/// (nothing allows the stored copy to stand in) with the response rules'
/// edits, as any other answer would be.
#[tokio::test]
async fn response_rules_see_a_5xx_answer_to_a_revalidation() {
    bounded(async {
        let origin = Origin::start(|s| {
            if s.headers.contains_key("if-none-match") {
                reply(503, &[], "down")
            } else {
                let fields = [("cache-control", "max-age=60"), ("etag", "\"v1\"")];
                reply(200, &fields, "body")
            }
        })
        .await;
        let p = proxy(&policy_for(
            &origin,
            r#"rule all { route app cache { } }
on response when status >= 500 { response_header set "x-origin-error" "yes" }"#,
        ))
        .await;
        assert_eq!(get(addr(&p), "/e", &[]).await.text(), "body");
        let failed = get(addr(&p), "/e", &[("cache-control", "no-cache")]).await;
        assert_eq!(origin.count(), 2);
        assert_eq!(failed.status, 503, "{}", failed.cache_status());
        assert_eq!(failed.header("x-origin-error"), Some("yes"));
        // The stored copy stays.
        let hit = get(addr(&p), "/e", &[]).await;
        assert!(hit.is_hit(), "{}", hit.cache_status());
        assert_eq!(hit.text(), "body");
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn request_no_cache_and_max_age_0_and_min_fresh_go_to_the_origin() {
    bounded(async {
        let origin = Origin::start(|s| {
            let inm = s.headers.contains_key("if-none-match");
            if inm {
                reply(
                    304,
                    &[("cache-control", "max-age=60"), ("etag", "\"v1\"")],
                    "",
                )
            } else {
                reply(
                    200,
                    &[("cache-control", "max-age=60"), ("etag", "\"v1\"")],
                    "body",
                )
            }
        })
        .await;
        let p = cached(&origin).await;
        get(addr(&p), "/r", &[]).await;
        let nc = get(addr(&p), "/r", &[("cache-control", "no-cache")]).await;
        assert_eq!(nc.text(), "body");
        assert!(
            nc.cache_status().contains("fwd=request"),
            "{}",
            nc.cache_status()
        );
        assert_eq!(origin.count(), 2);
        assert!(
            origin.seen()[1].headers.contains_key("if-none-match"),
            "no-cache revalidates with the stored validator"
        );
        let ma = get(addr(&p), "/r", &[("cache-control", "max-age=0")]).await;
        assert_eq!(ma.text(), "body");
        assert!(
            ma.cache_status().contains("fwd=request"),
            "{}",
            ma.cache_status()
        );
        assert_eq!(origin.count(), 3);
        let mf = get(addr(&p), "/r", &[("cache-control", "min-fresh=1000")]).await;
        assert!(
            mf.cache_status().contains("fwd=request"),
            "{}",
            mf.cache_status()
        );
        assert_eq!(origin.count(), 4);
        let plain = get(addr(&p), "/r", &[]).await;
        assert!(plain.is_hit(), "{}", plain.cache_status());
        assert_eq!(origin.count(), 4);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn max_stale_serves_stale_and_only_if_cached_answers_504_on_a_miss() {
    bounded(async {
        // Age 100 over max-age 60: stale on arrival, and kept because it
        // has a validator.
        let origin = Origin::start(|_| {
            reply(
                200,
                &[
                    ("cache-control", "max-age=60"),
                    ("age", "100"),
                    ("etag", "\"o\""),
                ],
                "old",
            )
        })
        .await;
        let p = cached(&origin).await;
        get(addr(&p), "/s", &[]).await;
        let stale = get(addr(&p), "/s", &[("cache-control", "max-stale=1000")]).await;
        assert!(stale.is_hit(), "{}", stale.cache_status());
        assert_eq!(stale.text(), "old");
        assert!(ttl(&stale) < 0);
        assert_eq!(origin.count(), 1);
        let not_enough = get(addr(&p), "/s", &[("cache-control", "max-stale=10")]).await;
        assert!(!not_enough.is_hit(), "{}", not_enough.cache_status());
        assert_eq!(origin.count(), 2);

        let miss = get(addr(&p), "/never", &[("cache-control", "only-if-cached")]).await;
        assert_eq!(miss.status, 504);
        assert_eq!(origin.count_path("/never"), 0);
        // Nothing went forward, and no origin timed out (RFC 9211 section 2.2).
        assert_eq!(miss.cache_status(), "Portico; detail=only-if-cached");
        // A stale copy that only-if-cached may not use: the same.
        let stale_only = get(addr(&p), "/s", &[("cache-control", "only-if-cached")]).await;
        assert_eq!(stale_only.status, 504);
        assert_eq!(stale_only.cache_status(), "Portico; detail=only-if-cached");
        assert_eq!(origin.count(), 2);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn stale_entries_are_revalidated_with_etag_and_304_refreshes_them() {
    bounded(async {
        let origin = Origin::start(|s| {
            if s.headers
                .get("if-none-match")
                .is_some_and(|v| v == "\"v1\"")
            {
                reply(
                    304,
                    &[("cache-control", "max-age=60"), ("etag", "\"v1\"")],
                    "",
                )
            } else {
                // Stale on arrival, so the next request revalidates.
                reply(
                    200,
                    &[
                        ("cache-control", "max-age=60"),
                        ("age", "100"),
                        ("etag", "\"v1\""),
                    ],
                    "stored body",
                )
            }
        })
        .await;
        let p = cached(&origin).await;
        get(addr(&p), "/e", &[]).await;
        let reval = get(addr(&p), "/e", &[]).await;
        assert_eq!(reval.status, 200);
        assert_eq!(reval.text(), "stored body");
        let cs = reval.cache_status();
        assert!(cs.contains("fwd=stale; fwd-status=304"), "{cs}");
        assert_eq!(origin.count(), 2);
        assert_eq!(
            origin.seen()[1].headers.get("if-none-match").unwrap(),
            "\"v1\""
        );
        let hit = get(addr(&p), "/e", &[]).await;
        assert!(hit.is_hit(), "refreshed by the 304: {}", hit.cache_status());
        assert_eq!(hit.text(), "stored body");
        assert_eq!(origin.count(), 2);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_304_naming_another_representation_does_not_refresh_the_stored_one() {
    bounded(async {
        let fetches = Arc::new(AtomicUsize::new(0));
        let seen = fetches.clone();
        let origin = Origin::start(move |s| {
            if s.headers.contains_key("if-none-match") {
                // Not modified, it says, but of another representation.
                return reply(
                    304,
                    &[("cache-control", "max-age=60"), ("etag", "\"v2\"")],
                    "",
                );
            }
            if seen.fetch_add(1, Ordering::SeqCst) == 0 {
                reply(
                    200,
                    &[
                        ("cache-control", "max-age=60"),
                        ("age", "100"),
                        ("etag", "\"v1\""),
                    ],
                    "first",
                )
            } else {
                reply(
                    200,
                    &[("cache-control", "max-age=60"), ("etag", "\"v2\"")],
                    "second",
                )
            }
        })
        .await;
        let p = cached(&origin).await;
        assert_eq!(get(addr(&p), "/t", &[]).await.text(), "first");
        let again = get(addr(&p), "/t", &[]).await;
        assert_eq!(again.text(), "second");
        assert_eq!(again.header("etag"), Some("\"v2\""));
        assert!(
            again.cache_status().contains("stored"),
            "{}",
            again.cache_status()
        );
        // The conditional request, then the whole one.
        assert_eq!(origin.count(), 3);
        assert!(!origin.seen()[2].headers.contains_key("if-none-match"));
        let hit = get(addr(&p), "/t", &[]).await;
        assert!(hit.is_hit(), "{}", hit.cache_status());
        assert_eq!(hit.text(), "second");
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_cookie_set_by_a_304_reaches_the_client_and_is_not_stored() {
    bounded(async {
        let origin = Origin::start(|s| {
            if s.headers.contains_key("if-none-match") {
                reply(
                    304,
                    &[
                        ("cache-control", "max-age=60"),
                        ("etag", "\"v1\""),
                        ("set-cookie", "seen=2"),
                    ],
                    "",
                )
            } else {
                reply(
                    200,
                    &[
                        ("cache-control", "max-age=60"),
                        ("age", "100"),
                        ("etag", "\"v1\""),
                    ],
                    "body",
                )
            }
        })
        .await;
        let p = cached(&origin).await;
        get(addr(&p), "/k", &[]).await;
        let reval = get(addr(&p), "/k", &[]).await;
        assert!(
            reval.cache_status().contains("fwd-status=304"),
            "{}",
            reval.cache_status()
        );
        assert_eq!(reval.text(), "body");
        assert_eq!(reval.header("set-cookie"), Some("seen=2"));
        let hit = get(addr(&p), "/k", &[]).await;
        assert!(hit.is_hit(), "{}", hit.cache_status());
        assert_eq!(hit.header("set-cookie"), None);
        assert_eq!(origin.count(), 2);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_no_cache_response_is_revalidated_on_every_request() {
    bounded(async {
        // RFC 9111 section 5.2.2.4: stored, but never reused without a
        // successful validation, whatever max-age says.
        let origin = Origin::start(|s| {
            if s.headers.contains_key("if-none-match") {
                reply(
                    304,
                    &[
                        ("cache-control", "no-cache, max-age=600"),
                        ("etag", "\"n\""),
                    ],
                    "",
                )
            } else {
                reply(
                    200,
                    &[
                        ("cache-control", "no-cache, max-age=600"),
                        ("etag", "\"n\""),
                    ],
                    "validated body",
                )
            }
        })
        .await;
        let p = cached(&origin).await;
        get(addr(&p), "/nc", &[]).await;
        for n in 2..=3 {
            let again = get(addr(&p), "/nc", &[]).await;
            assert_eq!(again.status, 200);
            assert_eq!(again.text(), "validated body");
            assert!(!again.is_hit(), "{}", again.cache_status());
            assert_eq!(origin.count(), n);
            let seen = &origin.seen()[n - 1];
            assert_eq!(seen.headers.get("if-none-match").unwrap(), "\"n\"");
        }
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn max_stale_does_not_apply_to_an_s_maxage_response() {
    bounded(async {
        // s-maxage implies proxy-revalidate (RFC 9111 section 5.2.2.10).
        let origin = Origin::start(|_| {
            reply(
                200,
                &[
                    ("cache-control", "s-maxage=60"),
                    ("age", "100"),
                    ("etag", "\"s\""),
                ],
                "shared",
            )
        })
        .await;
        let p = cached(&origin).await;
        get(addr(&p), "/sm", &[]).await;
        let asked = get(addr(&p), "/sm", &[("cache-control", "max-stale=1000")]).await;
        assert!(!asked.is_hit(), "{}", asked.cache_status());
        assert_eq!(origin.count(), 2);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_304_that_forbids_storing_still_delivers_the_stored_fields() {
    bounded(async {
        let origin = Origin::start(|s| {
            if s.headers.contains_key("if-none-match") {
                // The refreshed copy may not be stored any more.
                reply(304, &[("cache-control", "no-store"), ("etag", "\"v\"")], "")
            } else {
                reply(
                    200,
                    &[
                        ("cache-control", "max-age=60"),
                        ("age", "100"),
                        ("etag", "\"v\""),
                        ("content-type", "text/x-stored"),
                        ("content-language", "fr"),
                    ],
                    "stored body",
                )
            }
        })
        .await;
        let p = cached(&origin).await;
        get(addr(&p), "/ns", &[]).await;
        let r = get(addr(&p), "/ns", &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "stored body");
        assert_eq!(r.header("content-type"), Some("text/x-stored"));
        assert_eq!(r.header("content-language"), Some("fr"));
        assert_eq!(r.header("content-length"), Some("11"));
        assert!(
            r.cache_status().contains("fwd-status=304"),
            "{}",
            r.cache_status()
        );
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn stale_entries_are_revalidated_with_last_modified() {
    let modified = http_date(std::time::SystemTime::now() - std::time::Duration::from_secs(3600));
    let lm = modified.clone();
    bounded(async move {
        let origin = Origin::start(move |s| {
            if s.headers
                .get("if-modified-since")
                .is_some_and(|v| v == lm.as_str())
            {
                reply(304, &[("cache-control", "max-age=60")], "")
            } else {
                reply(
                    200,
                    &[
                        ("cache-control", "max-age=60"),
                        ("age", "100"),
                        ("last-modified", lm.as_str()),
                    ],
                    "lm body",
                )
            }
        })
        .await;
        let p = cached(&origin).await;
        get(addr(&p), "/lm", &[]).await;
        let reval = get(addr(&p), "/lm", &[]).await;
        assert_eq!(reval.text(), "lm body");
        assert!(
            reval.cache_status().contains("fwd-status=304"),
            "{}",
            reval.cache_status()
        );
        assert_eq!(
            origin.seen()[1].headers.get("if-modified-since").unwrap(),
            modified.as_str()
        );
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn client_conditionals_are_answered_304_from_the_cache() {
    bounded(async {
        let origin = Origin::start(|_| {
            reply(
                200,
                &[("cache-control", "max-age=60"), ("etag", "\"abc\"")],
                "full",
            )
        })
        .await;
        let p = cached(&origin).await;
        get(addr(&p), "/c", &[]).await;
        let nm = get(addr(&p), "/c", &[("if-none-match", "\"abc\"")]).await;
        assert_eq!(nm.status, 304);
        assert!(nm.body.is_empty());
        assert_eq!(nm.header("etag"), Some("\"abc\""));
        assert!(nm.is_hit(), "{}", nm.cache_status());
        let other = get(addr(&p), "/c", &[("if-none-match", "\"zzz\"")]).await;
        assert_eq!(other.status, 200);
        assert_eq!(other.text(), "full");
        // A conditional miss is filled whole: the origin never sees the
        // client's validator.
        let miss = get(addr(&p), "/d", &[("if-none-match", "\"abc\"")]).await;
        assert_eq!(miss.status, 304);
        assert!(!origin.seen()[1].headers.contains_key("if-none-match"));
        assert_eq!(origin.count(), 2);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_304_from_the_cache_carries_the_rule_s_edits_as_the_200_does() {
    bounded(async {
        let origin = Origin::start(|_| {
            reply(
                200,
                &[("cache-control", "max-age=60"), ("etag", "\"abc\"")],
                "full",
            )
        })
        .await;
        let p = proxy(&policy_for(
            &origin,
            "rule all { route app cache { } \
             response_header set \"Cache-Control\" \"public, max-age=600\" }",
        ))
        .await;
        let full = get(addr(&p), "/c", &[]).await;
        assert_eq!(full.header("cache-control"), Some("public, max-age=600"));
        let nm = get(addr(&p), "/c", &[("if-none-match", "\"abc\"")]).await;
        assert_eq!(nm.status, 304);
        assert_eq!(nm.header("cache-control"), Some("public, max-age=600"));
        assert_eq!(nm.header("etag"), Some("\"abc\""));
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn if_match_and_if_unmodified_since_are_answered_from_the_cache() {
    bounded(async {
        let origin = Origin::start(|s| {
            let cc = if s.uri.path() == "/private" {
                "private"
            } else {
                "max-age=60"
            };
            reply(
                200,
                &[
                    ("cache-control", cc),
                    ("etag", "\"v1\""),
                    ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT"),
                ],
                "full",
            )
        })
        .await;
        let p = cached(&origin).await;
        // The fill leaves them out; the cache answers them, on the miss too.
        let miss = get(addr(&p), "/m", &[("if-match", "\"v0\"")]).await;
        assert_eq!(miss.status, 412);
        assert!(miss.body.is_empty());
        assert!(!origin.seen()[0].headers.contains_key("if-match"));
        let held = get(addr(&p), "/m", &[("if-match", "\"v1\"")]).await;
        assert_eq!(held.status, 200);
        assert!(held.is_hit(), "{}", held.cache_status());
        assert_eq!(held.text(), "full");
        let weak = get(addr(&p), "/m", &[("if-match", "W/\"v1\"")]).await;
        assert_eq!(weak.status, 412);
        let any = get(addr(&p), "/m", &[("if-match", "*")]).await;
        assert_eq!(any.status, 200);
        let modified = get(
            addr(&p),
            "/m",
            &[("if-unmodified-since", "Sat, 05 Nov 1994 08:49:37 GMT")],
        )
        .await;
        assert_eq!(modified.status, 412);
        assert!(modified.is_hit(), "{}", modified.cache_status());
        let unmodified = get(
            addr(&p),
            "/m",
            &[("if-unmodified-since", "Sun, 06 Nov 1994 08:49:37 GMT")],
        )
        .await;
        assert_eq!(unmodified.status, 200);
        // And for a response that is not stored.
        let passed = get(addr(&p), "/private", &[("if-match", "\"v0\"")]).await;
        assert_eq!(passed.status, 412);
        assert!(
            passed.cache_status().contains("detail=private"),
            "{}",
            passed.cache_status()
        );
        assert_eq!(origin.count(), 2);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn client_conditionals_are_answered_for_a_response_that_is_not_stored() {
    bounded(async {
        let origin = Origin::start(|_| {
            reply(
                200,
                &[
                    ("cache-control", "private, max-age=60"),
                    ("etag", "\"p1\""),
                    ("set-cookie", "s=1"),
                ],
                "mine",
            )
        })
        .await;
        let p = cached(&origin).await;
        // The fill asks without the client's validator, and the answer may
        // not be stored: the validator is still answered.
        let nm = get(addr(&p), "/p", &[("if-none-match", "W/\"p1\"")]).await;
        assert_eq!(nm.status, 304);
        assert!(nm.body.is_empty());
        assert_eq!(nm.header("etag"), Some("\"p1\""));
        assert_eq!(nm.header("set-cookie"), Some("s=1"));
        assert!(
            nm.cache_status().contains("detail=private"),
            "{}",
            nm.cache_status()
        );
        let other = get(addr(&p), "/p", &[("if-none-match", "\"p0\"")]).await;
        assert_eq!(other.status, 200);
        assert_eq!(other.text(), "mine");
        assert!(origin
            .seen()
            .iter()
            .all(|s| !s.headers.contains_key("if-none-match")));
        assert_eq!(origin.count(), 2);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn targeted_cache_control_takes_precedence_and_can_be_stripped() {
    bounded(async {
        let origin = Origin::start(|s| match s.uri.path() {
            "/cdn" => reply(
                200,
                &[
                    ("cache-control", "no-store"),
                    ("cdn-cache-control", "max-age=60"),
                ],
                "cdn",
            ),
            _ => reply(
                200,
                &[
                    ("cache-control", "max-age=60"),
                    ("cdn-cache-control", "max-age=60"),
                    ("portico-cache-control", "no-store"),
                ],
                "portico",
            ),
        })
        .await;
        let p = cached(&origin).await;
        get(addr(&p), "/cdn", &[]).await;
        let hit = get(addr(&p), "/cdn", &[]).await;
        assert!(hit.is_hit(), "{}", hit.cache_status());
        assert_eq!(hit.header("cdn-cache-control"), Some("max-age=60"));
        assert_eq!(origin.count_path("/cdn"), 1);
        for _ in 0..2 {
            let r = get(addr(&p), "/portico", &[]).await;
            assert!(
                r.cache_status().contains("detail=no-store"),
                "{}",
                r.cache_status()
            );
        }
        assert_eq!(origin.count_path("/portico"), 2);
        p.shutdown().await;

        let p = proxy(&policy_for(
            &origin,
            &format!("storage {{ strip_targeted }}\n{CACHED}"),
        ))
        .await;
        let first = get(addr(&p), "/cdn", &[]).await;
        assert_eq!(first.header("cdn-cache-control"), None);
        let hit = get(addr(&p), "/cdn", &[]).await;
        assert!(hit.is_hit());
        assert_eq!(hit.header("cdn-cache-control"), None);
        assert_eq!(hit.header("cache-control"), Some("no-store"));
        // Not stored (Portico-Cache-Control says no-store): stripped all the same.
        let passed = get(addr(&p), "/portico", &[]).await;
        assert!(
            passed.cache_status().contains("detail=no-store"),
            "{}",
            passed.cache_status()
        );
        assert_eq!(passed.header("cdn-cache-control"), None);
        assert_eq!(passed.header("portico-cache-control"), None);
        assert_eq!(passed.header("cache-control"), Some("max-age=60"));
        p.shutdown().await;

        // And on a rule that does not cache.
        let p = proxy(&policy_for(
            &origin,
            "storage { strip_targeted }\nrule all { route app }",
        ))
        .await;
        let bypass = get(addr(&p), "/portico", &[]).await;
        assert!(
            bypass.cache_status().contains("fwd=bypass"),
            "{}",
            bypass.cache_status()
        );
        assert_eq!(bypass.header("cdn-cache-control"), None);
        assert_eq!(bypass.header("portico-cache-control"), None);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn vary_stores_one_variant_per_language() {
    bounded(async {
        let origin = Origin::start(|s| {
            let lang = s
                .headers
                .get("accept-language")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none")
                .to_string();
            reply(
                200,
                &[("cache-control", "max-age=60"), ("vary", "Accept-Language")],
                format!("lang={lang}"),
            )
        })
        .await;
        let p = cached(&origin).await;
        let en = get(addr(&p), "/v", &[("accept-language", "en")]).await;
        assert_eq!(en.text(), "lang=en");
        let fr = get(addr(&p), "/v", &[("accept-language", "fr")]).await;
        assert_eq!(fr.text(), "lang=fr");
        assert!(
            fr.cache_status().contains("fwd=vary-miss"),
            "{}",
            fr.cache_status()
        );
        let en2 = get(addr(&p), "/v", &[("accept-language", "en")]).await;
        assert!(en2.is_hit(), "{}", en2.cache_status());
        assert_eq!(en2.text(), "lang=en");
        let fr2 = get(addr(&p), "/v", &[("accept-language", "fr")]).await;
        assert!(fr2.is_hit(), "{}", fr2.cache_status());
        assert_eq!(fr2.text(), "lang=fr");
        assert_eq!(origin.count(), 2);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn vary_tells_a_field_sent_empty_from_one_not_sent() {
    bounded(async {
        let origin = Origin::start(|s| {
            let flag = match s.headers.get("x-flag") {
                Some(v) => format!("sent:{}", v.to_str().unwrap()),
                None => "absent".to_string(),
            };
            reply(
                200,
                &[("cache-control", "max-age=60"), ("vary", "X-Flag")],
                flag,
            )
        })
        .await;
        let p = cached(&origin).await;
        let absent = get(addr(&p), "/v", &[]).await;
        assert_eq!(absent.text(), "absent");
        let empty = get(addr(&p), "/v", &[("x-flag", "")]).await;
        assert_eq!(empty.text(), "sent:");
        assert!(
            empty.cache_status().contains("fwd=vary-miss"),
            "{}",
            empty.cache_status()
        );
        let absent2 = get(addr(&p), "/v", &[]).await;
        assert!(absent2.is_hit(), "{}", absent2.cache_status());
        assert_eq!(absent2.text(), "absent");
        let empty2 = get(addr(&p), "/v", &[("x-flag", "")]).await;
        assert!(empty2.is_hit(), "{}", empty2.cache_status());
        assert_eq!(empty2.text(), "sent:");
        assert_eq!(origin.count(), 2);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn vary_accept_encoding_is_normalised_and_vary_star_is_not_stored() {
    bounded(async {
        let origin = Origin::start(|s| match s.uri.path() {
            "/star" => reply(200, &[("cache-control", "max-age=60"), ("vary", "*")], "s"),
            _ => reply(
                200,
                &[("cache-control", "max-age=60"), ("vary", "Accept-Encoding")],
                "e",
            ),
        })
        .await;
        let p = cached(&origin).await;
        get(addr(&p), "/enc", &[("accept-encoding", "gzip")]).await;
        let shared = get(addr(&p), "/enc", &[("accept-encoding", "gzip, deflate")]).await;
        assert!(shared.is_hit(), "{}", shared.cache_status());
        assert_eq!(origin.count_path("/enc"), 1);
        let identity = get(addr(&p), "/enc", &[]).await;
        assert!(!identity.is_hit(), "{}", identity.cache_status());
        assert_eq!(origin.count_path("/enc"), 2);

        for _ in 0..2 {
            let r = get(addr(&p), "/star", &[]).await;
            assert!(
                r.cache_status().contains("detail=vary-star"),
                "{}",
                r.cache_status()
            );
        }
        assert_eq!(origin.count_path("/star"), 2);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn the_origin_is_asked_for_the_coding_the_variant_key_names() {
    bounded(async {
        // This origin answers with the first coding the request lists, as
        // origins that prefer newer codings do.
        let origin = Origin::start(|s| {
            let first = s
                .headers
                .get("accept-encoding")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(',').next())
                .unwrap_or("identity")
                .trim()
                .to_string();
            let mut r = reply(
                200,
                &[("cache-control", "max-age=60"), ("vary", "accept-encoding")],
                format!("coded as {first}"),
            );
            if first != "identity" {
                r.headers_mut()
                    .insert("content-encoding", first.parse().expect("a coding"));
            }
            r
        })
        .await;
        let p = cached(&origin).await;
        // Keyed as br, like the next client's: the stored copy must be br.
        let first = get(addr(&p), "/coded", &[("accept-encoding", "zstd, br, gzip")]).await;
        assert_eq!(first.header("content-encoding"), Some("br"));
        assert_eq!(
            origin.seen()[0].headers.get("accept-encoding").unwrap(),
            "br"
        );
        let second = get(addr(&p), "/coded", &[("accept-encoding", "gzip, br")]).await;
        assert!(second.is_hit(), "{}", second.cache_status());
        assert_eq!(second.header("content-encoding"), Some("br"));
        let plain = get(addr(&p), "/coded", &[]).await;
        assert_eq!(plain.header("content-encoding"), None);
        assert_eq!(plain.text(), "coded as identity");
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn conditionals_do_not_turn_a_stored_error_into_a_304() {
    bounded(async {
        let origin = Origin::start(|_| {
            reply(
                404,
                &[("cache-control", "max-age=60"), ("etag", "\"gone\"")],
                "no such page",
            )
        })
        .await;
        let p = cached(&origin).await;
        get(addr(&p), "/missing", &[]).await;
        for condition in ["*", "\"gone\""] {
            let r = get(addr(&p), "/missing", &[("if-none-match", condition)]).await;
            assert_eq!(r.status, 404, "RFC 9110 section 13.2.1");
            assert!(r.is_hit(), "{}", r.cache_status());
            assert_eq!(r.text(), "no such page");
        }
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn head_is_answered_from_a_stored_get() {
    bounded(async {
        let origin =
            Origin::start(|_| reply(200, &[("cache-control", "max-age=60")], "0123456789")).await;
        let p = cached(&origin).await;
        get(addr(&p), "/h", &[]).await;
        let head = send(addr(&p), "HEAD", "/h", &[], "").await;
        assert_eq!(head.status, 200);
        assert!(head.is_hit(), "{}", head.cache_status());
        assert!(head.body.is_empty());
        assert_eq!(head.header("content-length"), Some("10"));
        assert_eq!(origin.count(), 1);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn successful_unsafe_methods_invalidate_the_url_and_same_host_locations() {
    bounded(async {
        let origin = Origin::start(|s| match (s.method.as_str(), s.uri.path()) {
            ("GET", _) => reply(200, &[("cache-control", "max-age=60")], "g"),
            ("POST", "/items") => reply(
                201,
                &[
                    ("location", "/items/2"),
                    ("content-location", "http://test.example/items/3"),
                ],
                "",
            ),
            ("POST", "/elsewhere") => {
                reply(303, &[("location", "http://other.example/items/4")], "")
            }
            ("POST", "/secure") => reply(
                201,
                &[
                    ("location", "https://test.example/items/5"),
                    ("content-location", "http://test.example:8081/items/6"),
                ],
                "",
            ),
            ("POST", "/default-port") => {
                reply(201, &[("location", "http://test.example:80/items/7")], "")
            }
            ("PUT", "/fails") => reply(500, &[], ""),
            _ => reply(204, &[], ""),
        })
        .await;
        let p = cached(&origin).await;
        let other = [("host", "other.example")];
        for path in [
            "/items", "/items/2", "/items/3", "/items/5", "/items/6", "/items/7", "/fails", "/gone",
        ] {
            get(addr(&p), path, &[]).await;
        }
        get(addr(&p), "/items/4", &other).await;
        let hits = |p: &portico::run::Running,
                    path: &'static str,
                    h: &'static [(&'static str, &'static str)]| {
            let a = addr(p);
            async move { get(a, path, h).await.is_hit() }
        };
        assert!(hits(&p, "/items", &[]).await);

        send(addr(&p), "POST", "/items", &[], "new").await;
        assert!(!hits(&p, "/items", &[]).await, "the target is invalidated");
        assert!(!hits(&p, "/items/2", &[]).await, "Location is invalidated");
        assert!(
            !hits(&p, "/items/3", &[]).await,
            "Content-Location is invalidated"
        );

        send(addr(&p), "POST", "/elsewhere", &[], "").await;
        assert!(
            hits(&p, "/items/4", &[("host", "other.example")]).await,
            "another host's Location is left alone"
        );
        // The same host by another scheme or port is another origin.
        send(addr(&p), "POST", "/secure", &[], "").await;
        assert!(
            hits(&p, "/items/5", &[]).await,
            "an https Location is left alone after an http request"
        );
        assert!(
            hits(&p, "/items/6", &[]).await,
            "a Content-Location on another port is left alone"
        );
        send(addr(&p), "POST", "/default-port", &[], "").await;
        assert!(
            !hits(&p, "/items/7", &[]).await,
            "the default port written out is the same origin"
        );
        send(addr(&p), "PUT", "/fails", &[], "").await;
        assert!(
            hits(&p, "/fails", &[]).await,
            "a failed PUT invalidates nothing"
        );
        send(addr(&p), "DELETE", "/gone", &[], "").await;
        assert!(!hits(&p, "/gone", &[]).await, "DELETE invalidates");
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn ranges_are_served_from_a_stored_object() {
    bounded(async {
        let origin = Origin::start(|s| {
            assert!(
                !s.headers.contains_key("range"),
                "fills fetch whole objects"
            );
            reply(
                200,
                &[("cache-control", "max-age=60"), ("etag", "\"new\"")],
                "0123456789",
            )
        })
        .await;
        let p = cached(&origin).await;
        get(addr(&p), "/r", &[]).await;
        // If-Range (RFC 9110 section 13.1.5): the range only for the same
        // representation, else the whole of it.
        let same = get(
            addr(&p),
            "/r",
            &[("range", "bytes=2-5"), ("if-range", "\"new\"")],
        )
        .await;
        assert_eq!(same.status, 206);
        assert_eq!(same.text(), "2345");
        let changed = get(
            addr(&p),
            "/r",
            &[("range", "bytes=2-5"), ("if-range", "\"old\"")],
        )
        .await;
        assert_eq!(changed.status, 200);
        assert_eq!(changed.text(), "0123456789");
        let part = get(addr(&p), "/r", &[("range", "bytes=2-5")]).await;
        assert_eq!(part.status, 206);
        assert_eq!(part.text(), "2345");
        assert_eq!(part.header("content-range"), Some("bytes 2-5/10"));
        let tail = get(addr(&p), "/r", &[("range", "bytes=-3")]).await;
        assert_eq!(tail.text(), "789");
        // The range unit is case-insensitive (RFC 9110 section 14.1).
        let upper = get(addr(&p), "/r", &[("range", "Bytes=2-5")]).await;
        assert_eq!(upper.status, 206);
        assert_eq!(upper.text(), "2345");
        let bad = get(addr(&p), "/r", &[("range", "bytes=50-")]).await;
        assert_eq!(bad.status, 416);
        assert_eq!(bad.header("content-range"), Some("bytes */10"));
        // A range on a miss: filled whole, answered partially.
        let cold = get(addr(&p), "/cold", &[("range", "bytes=0-0")]).await;
        assert_eq!(cold.status, 206);
        assert_eq!(cold.text(), "0");
        assert_eq!(origin.count(), 2);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_suffix_range_of_an_empty_object_gets_all_of_it() {
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[("cache-control", "max-age=60")], "")).await;
        let p = cached(&origin).await;
        get(addr(&p), "/empty", &[]).await;
        // Satisfiable (RFC 9110 section 14.1.1), with no byte to send: the
        // whole, empty, representation.
        let suffix = get(addr(&p), "/empty", &[("range", "bytes=-5")]).await;
        assert!(suffix.is_hit(), "{}", suffix.cache_status());
        assert_eq!(suffix.status, 200);
        assert!(suffix.body.is_empty());
        assert_eq!(suffix.header("content-range"), None);
        // No first byte to start from: unsatisfiable.
        let from = get(addr(&p), "/empty", &[("range", "bytes=0-")]).await;
        assert_eq!(from.status, 416);
        assert_eq!(from.header("content-range"), Some("bytes */0"));
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn cache_status_is_on_every_response() {
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[("cache-control", "max-age=60")], "x")).await;
        let rules = "rule pass when path ^= \"/pass\" { route app cache off }\n\
                     rule all { route app cache { } }";
        let p = proxy(&policy_for(&origin, rules)).await;
        let miss = get(addr(&p), "/a", &[]).await;
        assert_eq!(
            miss.cache_status(),
            "Portico; fwd=uri-miss; fwd-status=200; ttl=60; stored"
        );
        let hit = get(addr(&p), "/a", &[]).await;
        assert!(
            hit.cache_status().starts_with("Portico; hit; ttl="),
            "{}",
            hit.cache_status()
        );
        let bypass = get(addr(&p), "/pass", &[]).await;
        assert_eq!(bypass.cache_status(), "Portico; fwd=bypass; fwd-status=200");
        let method = send(addr(&p), "DELETE", "/a", &[], "").await;
        assert_eq!(method.cache_status(), "Portico; fwd=method; fwd-status=200");
        let nc = get(addr(&p), "/a", &[]).await;
        assert!(
            nc.cache_status().contains("fwd=uri-miss"),
            "{}",
            nc.cache_status()
        );
        let req = get(addr(&p), "/a", &[("cache-control", "no-cache")]).await;
        assert!(
            req.cache_status()
                .contains("fwd=request; fwd-status=200; ttl=60; stored"),
            "{}",
            req.cache_status()
        );
        p.shutdown().await;

        let down = proxy(&format!(
            "backend app {{\n  server \"{}\"\n}}\n{CACHED}\n",
            closed_addr()
        ))
        .await;
        let err = get(addr(&down), "/x", &[]).await;
        assert!(err.status.is_server_error());
        // A miss whose origin failed says so: it was a miss, and why it failed.
        assert!(
            err.cache_status()
                .starts_with("Portico; fwd=uri-miss; detail=origin-error"),
            "{}",
            err.cache_status()
        );
        assert!(
            err.cache_status().contains("detail="),
            "{}",
            err.cache_status()
        );
        down.shutdown().await;
    })
    .await;
}

/// Every `Cache-Status` member of a response, in order.
fn cache_status_members(got: &Got) -> Vec<String> {
    got.headers
        .get_all("cache-status")
        .iter()
        .flat_map(|v| v.to_str().unwrap().split(','))
        .map(|m| m.trim().to_string())
        .collect()
}

#[tokio::test]
async fn cache_status_keeps_the_members_of_caches_nearer_the_origin() {
    bounded(async {
        let origin = Origin::start(|_| {
            reply(
                200,
                &[
                    ("cache-control", "max-age=60"),
                    ("cache-status", "Shield; hit; ttl=30"),
                ],
                "x",
            )
        })
        .await;
        let rules = "rule pass when path ^= \"/pass\" { route app cache off }\n\
                     rule all { route app cache { } }";
        let p = proxy(&policy_for(&origin, rules)).await;
        let miss = get(addr(&p), "/a", &[]).await;
        assert_eq!(
            cache_status_members(&miss),
            [
                "Shield; hit; ttl=30",
                "Portico; fwd=uri-miss; fwd-status=200; ttl=60; stored"
            ]
        );
        let hit = get(addr(&p), "/a", &[]).await;
        let members = cache_status_members(&hit);
        assert_eq!(members.len(), 2, "{members:?}");
        assert_eq!(members[0], "Shield; hit; ttl=30");
        assert!(members[1].starts_with("Portico; hit; ttl="), "{members:?}");
        let bypass = get(addr(&p), "/pass", &[]).await;
        assert_eq!(
            cache_status_members(&bypass),
            ["Shield; hit; ttl=30", "Portico; fwd=bypass; fwd-status=200"]
        );
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn purges_reach_every_key_of_a_url_when_the_key_takes_request_fields() {
    bounded(async {
        let origin = Origin::start(|s| {
            let lang = s
                .headers
                .get("accept-language")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string();
            reply(
                200,
                &[("cache-control", "max-age=60")],
                format!("{} {lang}", s.uri.path()),
            )
        })
        .await;
        // The header comes first as written; keys list the URL's parts first.
        let rules =
            "rule all { route app cache { key [header(\"accept-language\"), host, path] } }";
        let p = proxy(&policy_for(&origin, rules)).await;
        let fill = |path: &'static str| {
            let a = addr(&p);
            async move {
                for lang in ["en", "fr"] {
                    get(a, path, &[("accept-language", lang)]).await;
                }
            }
        };
        let hits = |path: &'static str| {
            let a = addr(&p);
            async move {
                let mut n = 0;
                for lang in ["en", "fr"] {
                    let r = get(a, path, &[("accept-language", lang)]).await;
                    assert_eq!(r.text(), format!("{path} {lang}"));
                    n += usize::from(r.is_hit());
                }
                n
            }
        };
        for path in ["/page", "/page2", "/other"] {
            fill(path).await;
            assert_eq!(hits(path).await, 2);
        }

        let r = admin(
            &p,
            "POST",
            "/purge?url=http://test.example/page",
            Some("secret"),
        )
        .await;
        assert!(r.text().contains("\"purged\":2"), "{}", r.text());
        assert_eq!(hits("/page").await, 0, "both languages purged");
        assert_eq!(hits("/page2").await, 2, "a longer path is another URL");

        let r = admin(
            &p,
            "POST",
            "/purge?prefix=http://test.example/page",
            Some("secret"),
        )
        .await;
        assert!(r.text().contains("\"purged\":4"), "{}", r.text());
        assert_eq!(hits("/other").await, 2);

        // A successful unsafe method invalidates every key of its URL too.
        assert_eq!(hits("/other").await, 2);
        let post = send(addr(&p), "POST", "/other", &[], "x").await;
        assert_eq!(post.status, 200);
        assert_eq!(hits("/other").await, 0);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn admin_purge_by_url_prefix_and_tag() {
    bounded(async {
        let origin = Origin::start(|s| {
            let tag = if s.uri.path().starts_with("/t/") {
                "red blue"
            } else {
                ""
            };
            reply(
                200,
                &[
                    ("cache-control", "max-age=60"),
                    ("surrogate-key", tag),
                    (
                        "cache-tag",
                        if s.uri.path() == "/t/3" { "green" } else { "" },
                    ),
                ],
                "x",
            )
        })
        .await;
        let p = cached(&origin).await;
        for path in ["/u", "/pre/1", "/pre/2", "/t/1", "/t/2", "/t/3"] {
            get(addr(&p), path, &[]).await;
        }
        let is_hit = |path: &'static str| {
            let a = addr(&p);
            async move { get(a, path, &[]).await.is_hit() }
        };
        let r = admin(
            &p,
            "POST",
            "/purge?url=http://test.example/u",
            Some("secret"),
        )
        .await;
        assert_eq!(r.status, 200);
        assert!(r.text().contains("\"purged\":1"), "{}", r.text());
        assert!(!is_hit("/u").await);

        let r = admin(
            &p,
            "POST",
            "/purge?prefix=http%3A%2F%2Ftest.example%2Fpre%2F",
            Some("secret"),
        )
        .await;
        assert!(r.text().contains("\"purged\":2"), "{}", r.text());
        assert!(!is_hit("/pre/1").await);
        assert!(!is_hit("/pre/2").await);

        let r = admin(&p, "POST", "/purge?tag=green", Some("secret")).await;
        assert!(r.text().contains("\"purged\":1"), "{}", r.text());
        assert!(!is_hit("/t/3").await);
        assert!(is_hit("/t/1").await);
        let r = admin(&p, "POST", "/purge?tag=blue", Some("secret")).await;
        assert!(r.text().contains("\"purged\":3"), "{}", r.text());
        assert!(!is_hit("/t/1").await);
        assert!(!is_hit("/t/2").await);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn admin_purge_needs_the_token() {
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[("cache-control", "max-age=60")], "x")).await;
        let p = cached(&origin).await;
        get(addr(&p), "/u", &[]).await;
        let none = admin(&p, "POST", "/purge?url=http://test.example/u", None).await;
        assert_eq!(none.status, 401);
        let wrong = admin(
            &p,
            "POST",
            "/purge?url=http://test.example/u",
            Some("guess"),
        )
        .await;
        assert_eq!(wrong.status, 401);
        let metrics = admin(&p, "GET", "/metrics", Some("nope")).await;
        assert_eq!(metrics.status, 401);
        assert!(get(addr(&p), "/u", &[]).await.is_hit());
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn soft_purge_serves_stale_while_refreshing() {
    bounded(async {
        let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let n2 = n.clone();
        let origin = Origin::start(move |s| {
            let v = n2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let tag = if s.uri.path() == "/t" { "k" } else { "" };
            reply(
                200,
                &[("cache-control", "max-age=60"), ("surrogate-key", tag)],
                format!("v{v}"),
            )
        })
        .await;
        let p = proxy(&policy_for(
            &origin,
            "rule all { route app cache { stale_while_revalidate 30s } }",
        ))
        .await;
        for (path, query) in [
            ("/u", "url=http://test.example/u"),
            ("/p/x", "prefix=http://test.example/p/"),
            ("/t", "tag=k"),
        ] {
            let first = get(addr(&p), path, &[]).await;
            let before = origin.count();
            let r = admin(
                &p,
                "POST",
                &format!("/purge?{query}&soft=1"),
                Some("secret"),
            )
            .await;
            assert_eq!(r.status, 200);
            assert!(r.text().contains("\"purged\":1"), "{query}: {}", r.text());
            assert!(r.text().contains("\"soft\":true"), "{}", r.text());
            let stale = get(addr(&p), path, &[]).await;
            assert_eq!(stale.text(), first.text(), "{path}: the stale copy");
            assert!(
                stale
                    .cache_status()
                    .contains("detail=stale-while-revalidate"),
                "{path}: {}",
                stale.cache_status()
            );
            eventually("the background refresh", || origin.count() == before + 1).await;
            eventually("the refreshed copy", || true).await;
            let mut fresh = get(addr(&p), path, &[]).await;
            for _ in 0..50 {
                if fresh.text() != first.text() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                fresh = get(addr(&p), path, &[]).await;
            }
            assert!(fresh.is_hit(), "{}", fresh.cache_status());
            assert_ne!(fresh.text(), first.text(), "{path}: refreshed");
            assert_eq!(origin.count(), before + 1, "{path}: one refresh");
        }
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn purge_method_is_allowed_only_from_listed_addresses() {
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[("cache-control", "max-age=60")], "x")).await;
        let allowed = format!("purge {{ allow [127.0.0.1] }}\n{CACHED}");
        let p = proxy(&policy_for(&origin, &allowed)).await;
        get(addr(&p), "/a", &[]).await;
        let r = send(addr(&p), "PURGE", "/a", &[], "").await;
        assert_eq!(r.status, 200);
        assert!(r.text().contains("\"purged\":1"), "{}", r.text());
        assert!(!get(addr(&p), "/a", &[]).await.is_hit());
        p.shutdown().await;

        let denied = format!("purge {{ allow [10.0.0.0/8] }}\n{CACHED}");
        let p = proxy(&policy_for(&origin, &denied)).await;
        get(addr(&p), "/a", &[]).await;
        let r = send(addr(&p), "PURGE", "/a", &[], "").await;
        assert_eq!(r.status, 403);
        assert!(get(addr(&p), "/a", &[]).await.is_hit());
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn metrics_count_hits_misses_and_stores() {
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[("cache-control", "max-age=60")], "x")).await;
        let p = cached(&origin).await;
        get(addr(&p), "/m", &[]).await;
        get(addr(&p), "/m", &[]).await;
        let m = admin(&p, "GET", "/metrics", Some("secret")).await;
        assert_eq!(m.status, 200);
        let text = m.text();
        for line in [
            "portico_cache_results_total{result=\"hit\"}",
            "portico_cache_results_total{result=\"uri-miss\"}",
            "portico_cache_stores_total{result=\"stored\"}",
        ] {
            assert!(text.contains(line), "missing {line} in:\n{text}");
        }
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_refetched_response_is_compressed_anew() {
    bounded(async {
        let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let n2 = n.clone();
        // Same length every time, so only the new fetch tells them apart.
        let origin = Origin::start(move |_| {
            let v = n2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            reply(
                200,
                &[
                    ("cache-control", "max-age=60"),
                    ("content-type", "text/plain"),
                ],
                format!("version {v}\n").repeat(300),
            )
        })
        .await;
        let p = proxy(&policy_for(
            &origin,
            "rule all { route app cache { } compress gzip }",
        ))
        .await;
        let gz = [("accept-encoding", "gzip")];
        assert!(gunzip(&get(addr(&p), "/v", &gz).await.body).starts_with("version 0\n"));
        let hit = get(addr(&p), "/v", &gz).await;
        assert!(hit.is_hit());
        assert!(gunzip(&hit.body).starts_with("version 0\n"));
        let r = admin(
            &p,
            "POST",
            "/purge?url=http://test.example/v",
            Some("secret"),
        )
        .await;
        assert_eq!(r.status, 200);
        // The new response is stored under the same key, with the same
        // length: its compressed copy is made from it, not reused.
        assert!(gunzip(&get(addr(&p), "/v", &gz).await.body).starts_with("version 1\n"));
        let hit = get(addr(&p), "/v", &gz).await;
        assert!(hit.is_hit());
        assert!(gunzip(&hit.body).starts_with("version 1\n"));
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_streamed_fill_is_compressed_for_its_client_and_stored_plain() {
    bounded(async {
        let text = "<p>streamed, then stored</p>\n".repeat(300);
        let mut raw = "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncache-control: max-age=60\r\n\
                       transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
            .as_bytes()
            .to_vec();
        for chunk in text.as_bytes().chunks(1000) {
            raw.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            raw.extend_from_slice(chunk);
            raw.extend_from_slice(b"\r\n");
        }
        raw.extend_from_slice(b"0\r\n\r\n");
        let origin = RawOrigin::start(raw).await;
        let policy = format!(
            "backend app {{\n  server \"{}\"\n}}\nrule all {{ route app cache {{ }} compress gzip, br }}\n",
            origin.addr
        );
        let p = proxy(&policy).await;
        let first = get(addr(&p), "/s", &[("accept-encoding", "gzip")]).await;
        assert!(first.cache_status().contains("detail=streamed"), "{}", first.cache_status());
        assert_eq!(first.header("content-encoding"), Some("gzip"));
        assert_eq!(gunzip(&first.body), text);
        let plain = get(addr(&p), "/s", &[]).await;
        assert!(plain.is_hit(), "{}", plain.cache_status());
        assert_eq!(plain.header("content-encoding"), None);
        assert_eq!(plain.text(), text);
        let br = get(addr(&p), "/s", &[("accept-encoding", "br")]).await;
        assert!(br.is_hit());
        assert_eq!(unbrotli(&br.body), text);
        assert_eq!(origin.count(), 1);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_compressed_hit_has_a_weak_etag_that_revalidates() {
    bounded(async {
        let origin = Origin::start(|_| {
            reply(
                200,
                &[
                    ("cache-control", "max-age=60"),
                    ("content-type", "text/plain"),
                    ("etag", "\"v1\""),
                ],
                "compress me ".repeat(300),
            )
        })
        .await;
        let p = proxy(&policy_for(
            &origin,
            "rule all { route app cache { } compress gzip }",
        ))
        .await;
        let gz = ("accept-encoding", "gzip");
        let first = get(addr(&p), "/e", &[gz]).await;
        assert_eq!(first.header("content-encoding"), Some("gzip"));
        assert_eq!(first.header("etag"), Some("W/\"v1\""));
        let again = get(addr(&p), "/e", &[gz, ("if-none-match", "W/\"v1\"")]).await;
        assert_eq!(again.status, 304);
        assert_eq!(again.header("etag"), Some("W/\"v1\""));
        assert_eq!(again.header("vary"), Some("accept-encoding"));
        let plain = get(addr(&p), "/e", &[("if-none-match", "\"v1\"")]).await;
        assert_eq!(plain.status, 304);
        assert_eq!(plain.header("etag"), Some("\"v1\""));
        assert_eq!(origin.count(), 1);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_large_hit_is_compressed_as_it_streams_then_from_its_copy() {
    bounded(async {
        // Well above what is compressed at once (256 KiB).
        let text: String = (0..40_000).map(|i| format!("line {i}\n")).collect();
        let body = text.clone();
        let origin = Origin::start(move |_| {
            reply(
                200,
                &[
                    ("cache-control", "max-age=60"),
                    ("content-type", "text/plain"),
                ],
                body.clone(),
            )
        })
        .await;
        let p = proxy(&policy_for(
            &origin,
            "rule all { route app cache { } compress gzip }",
        ))
        .await;
        let gz = [("accept-encoding", "gzip")];
        let head = send(addr(&p), "HEAD", "/big", &gz, "").await;
        assert_eq!(head.header("content-encoding"), Some("gzip"));
        assert_eq!(head.header("content-length"), None);
        // Compressed on the way: its length is not known in advance.
        let first = get(addr(&p), "/big", &gz).await;
        assert_eq!(first.header("content-encoding"), Some("gzip"));
        assert_eq!(first.header("content-length"), None);
        assert_eq!(gunzip(&first.body), text);
        // Then delivered from the copy kept at its end.
        let second = get(addr(&p), "/big", &gz).await;
        assert!(second.is_hit());
        assert_eq!(
            second.header("content-length"),
            Some(second.body.len().to_string().as_str())
        );
        assert_eq!(gunzip(&second.body), text);
        assert_eq!(origin.count(), 1);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_response_rule_ttl_overrides_freshness_but_not_private_or_no_store() {
    bounded(async {
        let origin = Origin::start(|s| {
            let cc = match s.uri.path() {
                "/private" => "private, max-age=600",
                "/no-store" => "no-store",
                _ => "max-age=0",
            };
            reply(200, &[("cache-control", cc)], "page")
        })
        .await;
        let p = proxy(&policy_for(
            &origin,
            "rule all { route app cache { } }\n\
             on response pages when status == 200 { cache { ttl 10m } }",
        ))
        .await;
        // The rule's ttl replaces the origin's max-age=0.
        get(addr(&p), "/short", &[]).await;
        let hit = get(addr(&p), "/short", &[]).await;
        assert!(hit.is_hit(), "{}", hit.cache_status());
        // A private or no-store page is still never shared.
        for path in ["/private", "/no-store"] {
            get(addr(&p), path, &[]).await;
            let again = get(addr(&p), path, &[]).await;
            assert!(!again.is_hit(), "{path}: {}", again.cache_status());
            assert_eq!(origin.count_path(path), 2, "{path}");
        }
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_field_the_client_names_in_connection_is_not_in_the_key() {
    bounded(async {
        let origin = Origin::start(|s| {
            let tenant = s
                .headers
                .get("x-tenant")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none")
                .to_string();
            reply(200, &[("cache-control", "max-age=60")], tenant)
        })
        .await;
        let p = proxy(&policy_for(
            &origin,
            "rule all { route app cache { key [host, path, header(\"x-tenant\")] } }",
        ))
        .await;
        let a = addr(&p);
        // The field is this hop's alone, so the origin never sees it: were
        // it in the key, the answer without it would be stored as acme's.
        let r = get(a, "/p", &[("x-tenant", "acme"), ("connection", "x-tenant")]).await;
        assert_eq!(r.text(), "none");
        let r = get(a, "/p", &[("x-tenant", "acme")]).await;
        assert_eq!(r.text(), "acme");
        assert!(!r.is_hit());
        let r = get(a, "/p", &[]).await;
        assert_eq!(r.text(), "none");
        assert!(r.is_hit());
        p.shutdown().await;
    })
    .await;
}
