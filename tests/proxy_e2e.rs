//! The reverse-proxy promises, end to end: a real origin on 127.0.0.1, Portico
//! started in-process from policy text, and a real client. Each scenario
//! reads as: the servers, the policy, the requests, what must be seen.

mod common;
use common::*;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Every scenario is bounded by this.
const LIMIT: Duration = Duration::from_secs(30);

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f)
        .await
        .expect("scenario took too long")
}

// ============================================================ policy actions

#[tokio::test]
async fn routes_by_host_and_path_to_different_backends() {
    bounded(async {
        let one = Origin::start(|_| reply(200, &[], "one")).await;
        let two = Origin::start(|_| reply(200, &[], "two")).await;
        let policy = format!(
            r#"
backend one {{ server "{}" }}
backend two {{ server "{}" }}
rule api when path ^= "/api/" {{ route two cache off }}
rule shop when host == "shop.test" {{ route two cache off }}
rule rest {{ route one cache off }}
"#,
            one.addr, two.addr
        );
        let p = proxy(&policy).await;
        let a = addr(&p);
        assert_eq!(get(a, "/index", &[]).await.text(), "one");
        assert_eq!(get(a, "/api/x", &[]).await.text(), "two");
        assert_eq!(get(a, "/x", &[("host", "shop.test")]).await.text(), "two");
        assert_eq!(get(a, "/x", &[("host", "other.test")]).await.text(), "one");
        assert_eq!(one.count(), 2);
        assert_eq!(two.count(), 2);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn request_header_edits_reach_the_origin() {
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[], "ok")).await;
        let p = proxy(&policy_for(
            &origin,
            r#"rule all {
  route app
  cache off
  request_header set "X-Tenant" "blue"
  request_header remove "Cookie"
}"#,
        ))
        .await;
        let got = get(
            addr(&p),
            "/",
            &[("cookie", "session=1"), ("x-tenant", "red")],
        )
        .await;
        assert_eq!(got.status, 200);
        let seen = &origin.seen()[0];
        assert_eq!(seen.headers.get("x-tenant").unwrap(), "blue");
        assert_eq!(seen.headers.get_all("x-tenant").iter().count(), 1);
        assert!(seen.headers.get("cookie").is_none());
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn response_header_edits_reach_the_client() {
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[("x-frame-options", "ALLOW")], "ok")).await;
        let p = proxy(&policy_for(
            &origin,
            r#"rule all {
  route app
  cache off
  response_header set "X-Frame-Options" "DENY"
  response_header add "X-Served-By" "portico"
}"#,
        ))
        .await;
        let got = get(addr(&p), "/", &[]).await;
        assert_eq!(got.header("x-frame-options"), Some("DENY"));
        assert_eq!(got.headers.get_all("x-frame-options").iter().count(), 1);
        assert_eq!(got.header("x-served-by"), Some("portico"));
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn redirect_deny_respond_and_no_route() {
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[], "origin")).await;
        let p = proxy(&policy_for(
            &origin,
            r#"
rule old when path == "/old" { redirect 301 "https://new.test/new" }
rule secret when path ^= "/admin" { deny 403 }
rule ping when path == "/ping" { respond 200 "pong" content_type "text/plain" }
rule teapot when path == "/tea" { respond 418 "short and stout" content_type "application/json" }
rule app_only when path ^= "/app" { route app cache off }
"#,
        ))
        .await;
        let a = addr(&p);
        let got = get(a, "/old", &[]).await;
        assert_eq!(got.status, 301);
        assert_eq!(got.header("location"), Some("https://new.test/new"));

        let got = get(a, "/admin/users", &[]).await;
        assert_eq!(got.status, 403);

        let got = get(a, "/ping", &[]).await;
        assert_eq!(got.status, 200);
        assert_eq!(got.text(), "pong");
        assert_eq!(got.header("content-type"), Some("text/plain"));

        let got = get(a, "/tea", &[]).await;
        assert_eq!(got.status, 418);
        assert_eq!(got.text(), "short and stout");
        assert_eq!(got.header("content-type"), Some("application/json"));

        let got = get(a, "/nowhere", &[]).await;
        assert_eq!(got.status, 404);

        assert_eq!(get(a, "/app", &[]).await.text(), "origin");
        assert_eq!(
            origin.count(),
            1,
            "synthetic answers never reach the origin"
        );
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn escaped_unreserved_characters_are_one_spelling_for_rules_keys_and_origin() {
    bounded(async {
        let origin = Origin::start(|s| {
            reply(
                200,
                &[("cache-control", "max-age=60")],
                s.uri
                    .path_and_query()
                    .map(|p| p.as_str())
                    .unwrap_or("")
                    .to_owned(),
            )
        })
        .await;
        let p = proxy(&policy_for(
            &origin,
            r#"
rule secret when path ^= "/admin" { deny 403 }
rule rest { route app cache { } }
"#,
        ))
        .await;
        let a = addr(&p);
        // %61 is `a`: the same path, so the same rule.
        for path in ["/%61dmin", "/%61%64min/x", "/adm%69n"] {
            let got = get(a, path, &[]).await;
            assert_eq!(got.status, 403, "{path}");
        }
        assert_eq!(origin.count(), 0);
        // The same resource under one key, asked for in one spelling.
        let first = get(a, "/caf%65/m%65nu?d%61y=mon", &[]).await;
        assert_eq!(first.text(), "/cafe/menu?day=mon");
        let second = get(a, "/cafe/menu?day=mon", &[]).await;
        assert!(second.is_hit(), "{}", second.cache_status());
        // Reserved characters stay escaped, in one case.
        let slash = get(a, "/a%2fb", &[]).await;
        assert_eq!(slash.text(), "/a%2Fb");
        assert_eq!(origin.count(), 2);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn dot_segments_cannot_reach_a_path_the_rules_did_not_see() {
    bounded(async {
        let origin = Origin::start(|s| reply(200, &[], s.uri.path().to_owned())).await;
        let p = proxy(&policy_for(
            &origin,
            r#"
rule secret when path ^= "/admin" { deny 403 }
rule rest { route app cache off }
"#,
        ))
        .await;
        let a = addr(&p);
        // Each would be /admin to an origin that resolves dot-segments,
        // decodes %2e, %2f or %5c, takes \ for / or drops ;parameters.
        for path in [
            "/public/../admin",
            "/public/./../admin",
            "/%2e%2e/admin",
            "/public/%2E./admin",
            "/public/..%2fadmin",
            "/public%2f..%5cadmin",
            "/public\\..\\admin",
            "/public/..;x=1/admin",
            "/public/..",
        ] {
            let out = raw_exchange(
                a,
                format!("GET {path} HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
                Duration::from_secs(5),
            )
            .await;
            assert!(out.starts_with("HTTP/1.1 400 "), "{path}: {out}");
        }
        assert_eq!(origin.count(), 0);
        // Dots within a segment name are nothing special.
        for path in [
            "/a.css",
            "/.well-known/x",
            "/x/.../y",
            "/v1..2/z",
            "/%2e%2e%2e",
        ] {
            let got = get(a, path, &[]).await;
            assert_eq!(got.status, 200, "{path}");
            // Escaped unreserved characters reach the origin as themselves.
            assert_eq!(got.text(), path.replace("%2e", "."));
        }
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn rule_total_timeout_answers_504_against_a_slow_origin() {
    bounded(async {
        let origin =
            Origin::start_with_delay(Duration::from_secs(3), |_| reply(200, &[], "late")).await;
        let p = proxy(&policy_for(
            &origin,
            "rule all { route app cache off total_timeout 200ms }",
        ))
        .await;
        let started = Instant::now();
        let got = get(addr(&p), "/", &[]).await;
        assert_eq!(got.status, 504);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        p.shutdown().await;
    })
    .await;
}

/// A rule's `first_byte_timeout` and `connect_timeout` replace the
/// backend's for that rule's requests alone.
#[tokio::test]
async fn rule_first_byte_and_connect_timeouts_replace_the_backend_s() {
    bounded(async {
        let slow =
            Origin::start_with_delay(Duration::from_millis(1500), |_| reply(200, &[], "late"))
                .await;
        let (silent, _listener, _held) = unanswering().await;
        let p = proxy(&format!(
            r#"
backend slow {{
  server "{}"
  first_byte_timeout 20s
}}
backend silent {{
  server "{silent}"
  connect_timeout 60s
}}
rule head when path == "/head" {{ route slow cache off first_byte_timeout 200ms }}
rule connect when path == "/connect" {{ route silent cache off connect_timeout 200ms }}
rule all {{ route slow cache off }}
"#,
            slow.addr
        ))
        .await;
        let a = addr(&p);
        // Without the rules' limits, /head would get the late 200 and
        // /connect would outlast the test's bound.
        for path in ["/head", "/connect"] {
            let got = get(a, path, &[]).await;
            assert_eq!(got.status, 504, "{path}: {}", got.text());
        }
        // The backend's own limit is left for the other rule.
        let got = get(a, "/other", &[]).await;
        assert_eq!((got.status.as_u16(), got.text()), (200, "late".to_owned()));
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn rule_max_body_answers_413() {
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[], "stored")).await;
        let p = proxy(&policy_for(
            &origin,
            "rule all { route app cache off max_body 1KiB }",
        ))
        .await;
        let a = addr(&p);
        let got = send(a, "POST", "/upload", &[], vec![b'x'; 4096]).await;
        assert_eq!(got.status, 413);
        assert_eq!(origin.count(), 0);
        let got = send(a, "POST", "/upload", &[], vec![b'x'; 100]).await;
        assert_eq!(got.status, 200);
        assert_eq!(origin.seen()[0].body.len(), 100);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn throttle_answers_429_with_retry_after_after_the_burst() {
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[], "ok")).await;
        let p = proxy(&policy_for(
            &origin,
            r#"
limit per_client { rate 1/m burst 3 by client.ip }
rule all { route app cache off throttle per_client }
"#,
        ))
        .await;
        let a = addr(&p);
        for _ in 0..3 {
            assert_eq!(get(a, "/", &[]).await.status, 200);
        }
        let got = get(a, "/", &[]).await;
        assert_eq!(got.status, 429);
        let retry: u64 = got
            .header("retry-after")
            .expect("Retry-After")
            .parse()
            .expect("seconds");
        assert!((1..=60).contains(&retry), "{retry}");
        assert_eq!(origin.count(), 3);
        p.shutdown().await;
    })
    .await;
}

/// An origin answering `ok`, and Portico in front of it letting each
/// client address through twice a minute.
async fn throttled_to_two() -> (Origin, portico::run::Running) {
    let origin = Origin::start(|_| reply(200, &[], "ok")).await;
    let p = proxy(&policy_for(
        &origin,
        r#"
limit per_client { rate 1/m burst 2 by client.ip }
rule all { route app cache off throttle per_client }
"#,
    ))
    .await;
    (origin, p)
}

#[tokio::test]
async fn the_throttle_counts_trace_and_options_answered_by_portico() {
    bounded(async {
        let (origin, p) = throttled_to_two().await;
        let a = addr(&p);
        let hop_left = [("max-forwards", "0")];
        assert_eq!(send(a, "OPTIONS", "/", &hop_left, "").await.status, 200);
        assert_eq!(send(a, "TRACE", "/", &hop_left, "").await.status, 200);
        assert_eq!(send(a, "TRACE", "/", &hop_left, "").await.status, 429);
        assert_eq!(origin.count(), 0);
        p.shutdown().await;
    })
    .await;
}

// ============================================================ header hygiene

#[tokio::test]
async fn hop_by_hop_headers_stay_on_their_hop() {
    bounded(async {
        let origin = Origin::start(|_| {
            reply(
                200,
                &[
                    ("connection", "x-origin-hop"),
                    ("x-origin-hop", "1"),
                    ("keep-alive", "timeout=5"),
                    ("proxy-connection", "keep-alive"),
                    ("trailer", "x-checksum"),
                ],
                "ok",
            )
        })
        .await;
        let p = proxy(&policy_for(&origin, "rule all { route app cache off }")).await;
        let got = get(
            addr(&p),
            "/",
            &[
                ("connection", "x-secret"),
                ("x-secret", "1"),
                ("keep-alive", "timeout=5"),
                ("te", "trailers"),
                ("upgrade", "websocket"),
                ("proxy-connection", "keep-alive"),
                ("trailer", "x-checksum"),
                ("x-end-to-end", "kept"),
            ],
        )
        .await;
        assert_eq!(got.status, 200);
        let seen = &origin.seen()[0];
        for name in [
            "x-secret",
            "keep-alive",
            "te",
            "upgrade",
            "proxy-connection",
            "trailer",
        ] {
            assert!(
                seen.headers.get(name).is_none(),
                "{name} reached the origin"
            );
        }
        assert_eq!(seen.headers.get("x-end-to-end").unwrap(), "kept");
        assert!(got.header("x-origin-hop").is_none());
        assert!(got.header("keep-alive").is_none());
        assert!(got.header("proxy-connection").is_none());
        assert!(got.header("trailer").is_none());
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_connection_field_naming_host_leaves_the_host_the_request_was_routed_by() {
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[], "ok")).await;
        let p = proxy(&policy_for(
            &origin,
            r#"rule shop when host == "shop.test" { route app cache off }"#,
        ))
        .await;
        let got = get(
            addr(&p),
            "/",
            &[
                ("host", "shop.test"),
                ("connection", "host, x-hop"),
                ("x-hop", "1"),
            ],
        )
        .await;
        assert_eq!(got.status, 200);
        let seen = &origin.seen()[0];
        assert_eq!(seen.headers.get("host").unwrap(), "shop.test");
        assert!(seen.headers.get("x-hop").is_none());
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_host_with_its_root_dot_meets_the_rules_for_the_host() {
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[], "origin")).await;
        let p = proxy(&policy_for(
            &origin,
            r#"
rule admin when host == "admin.test" { deny 403 }
rule rest { route app cache off }
"#,
        ))
        .await;
        let a = addr(&p);
        for host in ["admin.test.", "ADMIN.test.:80"] {
            assert_eq!(get(a, "/", &[("host", host)]).await.status, 403, "{host}");
        }
        let out = raw_exchange(
            a,
            b"GET http://admin.test./ HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n",
            Duration::from_secs(5),
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 403 "), "{out}");
        assert_eq!(origin.count(), 0);
        // Only the root dot: a name ending in two is another name.
        assert_eq!(get(a, "/", &[("host", "admin.test..")]).await.status, 200);
        p.shutdown().await;
    })
    .await;
}

/// Behind a proxy named in `http { trust_forwarded }` (here the test's own
/// 127.0.0.1), the client is the last untrusted address of its
/// `X-Forwarded-For`: rules and limits see it, and the origin gets the
/// chain with the proxy appended. `X-Forwarded-Proto` from the proxy stays.
#[tokio::test]
async fn a_trusted_proxy_s_forwarded_for_names_the_client() {
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[], "ok")).await;
        let p = proxy(&format!(
            "http {{ trust_forwarded [127.0.0.1] }}\n{}",
            policy_for(
                &origin,
                r#"
rule blocked when client.ip in [203.0.113.0/24] { deny 403 }
rule to_https when scheme == http and path == "/login" { redirect 301 "https://t.test/login" }
rule all { route app cache off }
"#
            )
        ))
        .await;
        let a = addr(&p);
        let got = get(a, "/", &[("x-forwarded-for", "198.51.100.9, 203.0.113.7")]).await;
        assert_eq!(got.status, 403);
        assert_eq!(origin.count(), 0);
        let got = get(
            a,
            "/",
            &[
                ("x-forwarded-for", "203.0.113.7, 198.51.100.9"),
                ("x-forwarded-proto", "https"),
            ],
        )
        .await;
        assert_eq!(got.status, 200, "{}", got.text());
        let seen = &origin.seen()[0];
        assert_eq!(
            seen.headers.get("x-forwarded-for").unwrap(),
            "203.0.113.7, 198.51.100.9, 127.0.0.1"
        );
        assert_eq!(seen.headers.get("x-forwarded-proto").unwrap(), "https");
        // Without the field, the peer is the client.
        assert_eq!(get(a, "/", &[]).await.status, 200);
        assert_eq!(
            origin.seen()[1].headers.get("x-forwarded-for").unwrap(),
            "127.0.0.1"
        );
        // The scheme the proxy says the client used is the one rules see:
        // a redirect to https is not made again behind a proxy that ends TLS.
        let via_tls = [
            ("x-forwarded-for", "198.51.100.9"),
            ("x-forwarded-proto", "https"),
        ];
        assert_eq!(get(a, "/login", &via_tls).await.status, 200);
        let plain = [
            ("x-forwarded-for", "198.51.100.9"),
            ("x-forwarded-proto", "http"),
        ];
        assert_eq!(get(a, "/login", &plain).await.status, 301);
        // The proxy's own request (naming no client) is believed too.
        let own = [("x-forwarded-proto", "https")];
        assert_eq!(get(a, "/login", &own).await.status, 200);
        // A proxy that adds to the field leaves the client's word first:
        // the last value is the proxy's.
        let added = [
            ("x-forwarded-for", "198.51.100.9"),
            ("x-forwarded-proto", "https, http"),
        ];
        assert_eq!(get(a, "/login", &added).await.status, 301);
        p.shutdown().await;

        // From a peer that is not trusted, none of it is believed.
        let origin = Origin::start(|_| reply(200, &[], "ok")).await;
        let p = proxy(&format!(
            "http {{ trust_forwarded [10.0.0.0/8] }}\n{}",
            policy_for(
                &origin,
                r#"
rule to_https when scheme == http { redirect 301 "https://t.test/" }
rule all { route app cache off }
"#
            )
        ))
        .await;
        let spoofed = [
            ("x-forwarded-for", "10.0.0.9"),
            ("x-forwarded-proto", "https"),
        ];
        assert_eq!(get(addr(&p), "/", &spoofed).await.status, 301);
        p.shutdown().await;
    })
    .await;
}

/// An IPv4 client of an IPv6 socket (`::ffff:127.0.0.1`, as a dual-stack
/// listener sees it) is its IPv4 address to rules and to the origin.
#[tokio::test]
async fn an_ipv4_client_of_an_ipv6_socket_is_its_ipv4_address() {
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[], "ok")).await;
        let policy = portico::policy::load(
            &policy_for(
                &origin,
                r#"
rule outside when not client.ip in [127.0.0.0/8] { deny 403 }
rule all { route app cache off }
"#,
            ),
            "test.policy",
        )
        .unwrap();
        let p = portico::run::start(
            policy,
            None,
            portico::run::Overrides {
                listen: vec!["[::ffff:127.0.0.1]:0".into()],
                ..Default::default()
            },
        )
        .await
        .expect("portico starts");
        let got = get(addr(&p), "/", &[]).await;
        assert_eq!(got.status, 200, "{}", got.text());
        let seen = &origin.seen()[0];
        assert_eq!(seen.headers.get("x-forwarded-for").unwrap(), "127.0.0.1");
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn forwarding_fields_and_via_both_ways() {
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[("server", "origin/1.0")], "ok")).await;
        let p = proxy(&policy_for(&origin, "rule all { route app cache off }")).await;
        let got = get(
            addr(&p),
            "/",
            &[("host", "shop.test"), ("x-forwarded-for", "6.6.6.6")],
        )
        .await;
        let seen = &origin.seen()[0];
        assert_eq!(seen.headers.get("x-forwarded-for").unwrap(), "127.0.0.1");
        assert_eq!(seen.headers.get("x-forwarded-proto").unwrap(), "http");
        assert_eq!(seen.headers.get("x-forwarded-host").unwrap(), "shop.test");
        assert!(seen
            .headers
            .get("via")
            .unwrap()
            .to_str()
            .unwrap()
            .contains("portico"));
        assert!(got.header("via").unwrap().contains("portico"));
        assert_eq!(got.header("server"), Some("origin/1.0"));
        p.shutdown().await;

        // A rule that rewrites Host, and one that tries to set a forwarding
        // field: the origin gets the new Host, the client's host in
        // X-Forwarded-Host, and Portico's own X-Forwarded-Proto, once.
        let p = proxy(&policy_for(
            &origin,
            "rule all { route app cache off request_header set \"Host\" \"origin.internal\" request_header set \"X-Forwarded-Proto\" \"gopher\" }",
        ))
        .await;
        get(addr(&p), "/", &[("host", "shop.test")]).await;
        let seen = origin.seen().pop().unwrap();
        assert_eq!(seen.headers.get("host").unwrap(), "origin.internal");
        assert_eq!(seen.headers.get("x-forwarded-host").unwrap(), "shop.test");
        let protos: Vec<_> = seen.headers.get_all("x-forwarded-proto").iter().collect();
        assert_eq!(protos, ["http"]);
        p.shutdown().await;

        let p = proxy(&policy_for(
            &origin,
            "http { hide_server }\nrule all { route app cache off }",
        ))
        .await;
        let got = get(addr(&p), "/", &[]).await;
        assert_eq!(got.status, 200);
        assert!(got.header("server").is_none(), "{:?}", got.header("server"));
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_client_s_forwarded_field_does_not_reach_the_origin() {
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[], "ok")).await;
        let spoof = [(
            "forwarded",
            "for=203.0.113.9;proto=https;host=admin.internal",
        )];
        let p = proxy(&policy_for(&origin, "rule all { route app cache off }")).await;
        assert_eq!(get(addr(&p), "/", &spoof).await.status, 200);
        let seen = origin.seen().pop().unwrap();
        assert!(
            seen.headers.get("forwarded").is_none(),
            "{:?}",
            seen.headers
        );
        assert_eq!(seen.headers.get("x-forwarded-for").unwrap(), "127.0.0.1");
        p.shutdown().await;
        // A rule may still write one.
        let p = proxy(&policy_for(
            &origin,
            r#"rule all { route app cache off request_header set "Forwarded" "for=portico" }"#,
        ))
        .await;
        get(addr(&p), "/", &spoof).await;
        let seen = origin.seen().pop().unwrap();
        let values: Vec<_> = seen.headers.get_all("forwarded").iter().collect();
        assert_eq!(values, ["for=portico"]);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn an_absolute_target_s_host_replaces_the_host_field_upstream() {
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[], "ok")).await;
        let p = proxy(&policy_for(
            &origin,
            r#"
rule admin when host == "admin.example" { deny 403 }
rule all { route app cache off }
"#,
        ))
        .await;
        // RFC 9112 §3.2.2: the target's authority wins over `Host`, for
        // routing and for what the origin is told alike.
        let answer = raw_exchange(
            addr(&p),
            b"GET http://www.example/page HTTP/1.1\r\nHost: admin.example\r\nConnection: close\r\n\r\n",
            Duration::from_secs(5),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let seen = origin.seen().pop().expect("the origin was asked");
        assert_eq!(seen.uri, "/page");
        assert_eq!(seen.headers.get("host").unwrap(), "www.example");
        assert_eq!(seen.headers.get_all("host").iter().count(), 1);
        assert_eq!(seen.headers.get("x-forwarded-host").unwrap(), "www.example");
        // Only http and https are this server's schemes.
        for target in ["ftp://www.example/page", "FTP://www.example/page"] {
            let request = format!("GET {target} HTTP/1.1\r\nHost: www.example\r\nConnection: close\r\n\r\n");
            let answer = raw_exchange(addr(&p), request.as_bytes(), Duration::from_secs(5)).await;
            assert!(answer.starts_with("HTTP/1.1 400"), "{target}: {answer}");
        }
        let answer = raw_exchange(
            addr(&p),
            b"GET HTTPS://www.example/secure HTTP/1.1\r\nHost: www.example\r\nConnection: close\r\n\r\n",
            Duration::from_secs(5),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert_eq!(origin.count(), 2);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_repeated_or_invalid_host_gets_400() {
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[], "ok")).await;
        let p = proxy(&policy_for(&origin, "rule all { route app cache off }")).await;
        for head in [
            "GET / HTTP/1.1\r\nHost: www.example\r\nHost: admin.example\r\nConnection: close\r\n\r\n",
            "GET http://www.example/ HTTP/1.1\r\nHost: www.example\r\nHost: www.example\r\nConnection: close\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: user@admin.example\r\nConnection: close\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: www.example:http\r\nConnection: close\r\n\r\n",
            "GET http://www.example/ HTTP/1.1\r\nConnection: close\r\n\r\n",
        ] {
            let answer = raw_exchange(addr(&p), head.as_bytes(), Duration::from_secs(5)).await;
            assert!(answer.starts_with("HTTP/1.1 400"), "{head:?}: {answer}");
        }
        assert_eq!(origin.count(), 0);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn an_h2_host_field_that_differs_from_the_authority_gets_400() {
    use http_body_util::{BodyExt as _, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[], "ok")).await;
        let p = proxy(&policy_for(&origin, "rule all { route app cache off }")).await;
        let stream = tokio::net::TcpStream::connect(addr(&p)).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let mut statuses = Vec::new();
        for host in ["admin.example", "WWW.example"] {
            let req = http::Request::get("http://www.example/x")
                .header("host", host)
                .body(Empty::<bytes::Bytes>::new())
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            statuses.push(resp.status().as_u16());
            resp.into_body().collect().await.unwrap();
        }
        assert_eq!(statuses, [400, 200]);
        let seen = origin.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].headers.get("host").unwrap(), "www.example");
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn h2_cookie_fields_reach_an_http1_origin_as_one() {
    use http_body_util::{BodyExt as _, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[], "ok")).await;
        let p = proxy(&policy_for(&origin, "rule all { route app cache off }")).await;
        let stream = tokio::net::TcpStream::connect(addr(&p)).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        // HTTP/2 clients send a field per cookie (RFC 9113 §8.2.3).
        let req = http::Request::get("http://www.example/x")
            .header("cookie", "session=1")
            .header("cookie", "theme=dark")
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
        let seen = origin.seen();
        let cookies: Vec<_> = seen[0].headers.get_all("cookie").iter().collect();
        assert_eq!(cookies, ["session=1; theme=dark"]);
        p.shutdown().await;
    })
    .await;
}

/// Rules and cache keys see an HTTP/2 client's cookie fields as the one
/// field the origin gets: a session in the second field still takes the
/// request past the cache, and still tells one user's key from another's.
#[tokio::test]
async fn h2_cookie_fields_are_one_field_for_rules_and_keys() {
    use http_body_util::BodyExt as _;
    bounded(async {
        let origin = Origin::start(|s| {
            let cookie = s.headers.get("cookie").map(|c| c.to_str().unwrap().to_owned());
            reply(
                200,
                &[("cache-control", "public, max-age=60")],
                format!("page for {}", cookie.unwrap_or_default()),
            )
        })
        .await;
        let p = proxy(&policy_for(
            &origin,
            r#"rule private when path == "/p" and header("Cookie") ~ "session=" { route app cache off }
rule keyed when path == "/k" { route app cache { key [host, path, header("Cookie")] } }
rule all { route app }"#,
        ))
        .await;
        let (mut sender, conn) = h2_client(addr(&p), |_| {}).await;
        let mut ask = async |path: &str, cookies: &[&str]| {
            let mut req = http::Request::get(format!("http://h2.test{path}"));
            for c in cookies {
                req = req.header("cookie", *c);
            }
            let resp = sender
                .send_request(req.body(http_body_util::Empty::new()).unwrap())
                .await
                .unwrap();
            let status = resp.headers()["cache-status"].to_str().unwrap().to_owned();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        };
        let (status, _) = ask("/p", &["theme=dark", "session=alice"]).await;
        assert!(status.contains("fwd=bypass"), "{status}");
        let (_, body) = ask("/p", &[]).await;
        assert!(!body.contains("alice"), "{body}");
        let (_, alice) = ask("/k", &["theme=dark", "session=alice"]).await;
        assert!(alice.contains("alice"), "{alice}");
        let (status, bob) = ask("/k", &["theme=dark", "session=bob"]).await;
        assert!(bob.contains("bob"), "Bob got {bob} ({status})");
        drop(sender);
        let _ = conn.await;
        p.shutdown().await;
    })
    .await;
}

// ============================================================ HTTPS and HTTP/2

mod tls_pki {
    use bytes::Bytes;
    use http::Request;
    use http_body_util::{BodyExt as _, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    use rustls_pki_types::{CertificateDer, ServerName};
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::sync::Arc;
    use tokio::net::TcpStream;

    /// A test CA and the leaf certificates it signs, written as PEM files.
    pub struct Pki {
        pub dir: tempfile::TempDir,
        issuer: CertifiedIssuer<'static, KeyPair>,
    }

    pub type Stream = tokio_rustls::client::TlsStream<TcpStream>;

    impl Pki {
        pub fn new() -> Pki {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let issuer =
                CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
            Pki {
                dir: tempfile::tempdir().unwrap(),
                issuer,
            }
        }

        /// Issues a leaf for `san`; returns (cert path, key path, DER).
        pub fn leaf(&self, file: &str, san: &str) -> (PathBuf, PathBuf, Vec<u8>) {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(vec![san.to_owned()])
                .unwrap()
                .signed_by(&key, &self.issuer)
                .unwrap();
            let cert_path = self.dir.path().join(format!("{file}.crt"));
            let key_path = self.dir.path().join(format!("{file}.key"));
            std::fs::write(&cert_path, cert.pem()).unwrap();
            std::fs::write(&key_path, key.serialize_pem()).unwrap();
            (cert_path, key_path, cert.der().to_vec())
        }

        pub async fn connect(&self, addr: SocketAddr, sni: &str, alpn: &[&[u8]]) -> Stream {
            self.try_connect(addr, sni, alpn).await.unwrap()
        }

        /// A TLS handshake with `addr`, which may fail.
        pub async fn try_connect(
            &self,
            addr: SocketAddr,
            sni: &str,
            alpn: &[&[u8]],
        ) -> std::io::Result<Stream> {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(self.issuer.der().clone()).unwrap();
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
            let tcp = TcpStream::connect(addr).await?;
            connector
                .connect(ServerName::try_from(sni.to_owned()).unwrap(), tcp)
                .await
        }
    }

    pub fn served_leaf(stream: &Stream) -> Vec<u8> {
        let certs: &[CertificateDer<'_>] = stream.get_ref().1.peer_certificates().unwrap();
        certs[0].to_vec()
    }

    /// One HTTP/1.1 GET over the stream: (status, body).
    pub async fn h1_get<S>(stream: S, host: &str, path: &str) -> (u16, String)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::get(path)
            .header("host", host)
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// One HTTP/2 GET of `url` over the stream: (status, version, body).
    pub async fn h2_get<S>(stream: S, url: &str) -> (u16, http::Version, String)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = Request::get(url).body(Empty::<Bytes>::new()).unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let version = resp.version();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, version, String::from_utf8_lossy(&body).into_owned())
    }
}

#[tokio::test]
async fn https_sni_picks_the_certificate_and_alpn_h2_reaches_an_http1_origin() {
    bounded(async {
        use tls_pki::*;
        let origin = Origin::start(|s| {
            let host = s
                .headers
                .get("host")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            reply(200, &[], format!("{} {host}", s.uri.path()))
        })
        .await;
        let pki = Pki::new();
        let (a_cert, a_key, a_der) = pki.leaf("a", "a.test");
        let (d_cert, d_key, d_der) = pki.leaf("default", "fallback.test");
        let policy = format!(
            r#"
listen "127.0.0.1:0" tls {{
  cert "{}" key "{}" for ["a.test"]
  cert "{}" key "{}"
}}
backend app {{ server "{}" }}
rule all {{ route app cache off }}
"#,
            a_cert.display(),
            a_key.display(),
            d_cert.display(),
            d_key.display(),
            origin.addr
        );
        let p = proxy(&policy).await;
        // The policy's TLS listener comes first, then the plain override.
        let addrs = p.listen_addrs();
        assert_eq!(addrs.len(), 2, "{addrs:?}");
        let tls_addr = addrs[0];

        let stream = pki.connect(tls_addr, "a.test", &[b"http/1.1"]).await;
        assert_eq!(served_leaf(&stream), a_der);
        assert_eq!(
            h1_get(stream, "a.test", "/one").await,
            (200, "/one a.test".into())
        );

        let stream = pki.connect(tls_addr, "fallback.test", &[b"http/1.1"]).await;
        assert_eq!(served_leaf(&stream), d_der);

        let stream = pki.connect(tls_addr, "a.test", &[b"h2", b"http/1.1"]).await;
        assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (status, version, body) = h2_get(stream, "https://a.test/two").await;
        assert_eq!((status, version), (200, http::Version::HTTP_2));
        assert_eq!(body, "/two a.test");
        let seen = origin.seen();
        let last = seen.last().unwrap();
        assert_eq!(last.headers.get("x-forwarded-proto").unwrap(), "https");

        // Certificates are reloaded with the policy, on the same listener.
        let (b_cert, b_key, b_der) = pki.leaf("a-renewed", "a.test");
        let renewed = policy
            .replace(&a_cert.display().to_string(), &b_cert.display().to_string())
            .replace(&a_key.display().to_string(), &b_key.display().to_string());
        p.reload(load(&renewed)).await.unwrap();
        assert_eq!(p.listen_addrs()[0], tls_addr);
        let stream = pki.connect(tls_addr, "a.test", &[b"http/1.1"]).await;
        assert_eq!(served_leaf(&stream), b_der);
        assert_ne!(b_der, a_der);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn h2c_prior_knowledge_is_proxied() {
    bounded(async {
        let origin = Origin::start(|s| reply(200, &[], format!("{:?}", s.uri.path()))).await;
        let p = proxy(&policy_for(&origin, "rule all { route app cache off }")).await;
        let stream = tokio::net::TcpStream::connect(addr(&p)).await.unwrap();
        let (status, version, body) = tls_pki::h2_get(stream, "http://h2c.test/x").await;
        assert_eq!((status, version), (200, http::Version::HTTP_2));
        assert_eq!(body, "\"/x\"");
        assert_eq!(origin.seen()[0].headers.get("host").unwrap(), "h2c.test");
        // Via names the protocol the request was received with (RFC 9110
        // section 7.6.3).
        assert_eq!(origin.seen()[0].headers.get("via").unwrap(), "2 portico");
        p.shutdown().await;
    })
    .await;
}

/// An HTTP/2 client (prior knowledge) of the proxy at `a`, its builder set
/// up by `setup`; the connection runs on a task of its own.
async fn h2_client(
    a: std::net::SocketAddr,
    setup: impl FnOnce(&mut hyper::client::conn::http2::Builder<hyper_util::rt::TokioExecutor>),
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let stream = tokio::net::TcpStream::connect(a).await.unwrap();
    let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    setup(&mut builder);
    let (sender, conn) = builder.handshake(TokioIo::new(stream)).await.unwrap();
    (sender, tokio::spawn(conn))
}

/// Over HTTP/2 too, an answer to HEAD, and a 204, has no body, whatever
/// made it: a `deny`, an error page, a `respond`. A body there is sent as
/// DATA, which clients refuse as a malformed response.
#[tokio::test]
async fn h2_head_and_204_answers_have_no_body_whatever_made_them() {
    use http_body_util::BodyExt as _;
    bounded(async {
        let policy = format!(
            r#"backend dead {{ server "{}" }}
rule d when path == "/deny" {{ deny 403 }}
rule n when path == "/none" {{ respond 204 "x" }}
rule all {{ route dead cache off }}"#,
            closed_addr()
        );
        let p = proxy(&policy).await;
        let (mut sender, conn) = h2_client(addr(&p), |_| {}).await;
        for (method, path, status) in [
            ("HEAD", "/deny", 403),
            ("HEAD", "/dead", 502),
            ("GET", "/none", 204),
            ("HEAD", "/none", 204),
        ] {
            let req = http::Request::builder()
                .method(method)
                .uri(format!("http://h2.test{path}"))
                .body(http_body_util::Empty::new())
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            assert_eq!(resp.status(), status, "{method} {path}");
            let length = resp.headers().get("content-length").cloned();
            let body = resp.into_body().collect().await;
            let body = body
                .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
                .to_bytes();
            assert!(body.is_empty(), "{method} {path}: {body:?}");
            if status == 204 {
                assert!(length.is_none(), "{method} {path}: {length:?}");
            } else {
                assert!(length.is_some_and(|l| l != "0"), "{method} {path}");
            }
        }
        drop(sender);
        let _ = conn.await;
        p.shutdown().await;
    })
    .await;
}

/// An origin's trailers reach an HTTP/2 client without the fields no trailer
/// may carry: a connection-specific one there used to make the stream fail,
/// body and all.
#[tokio::test]
async fn h2_trailers_lose_the_fields_no_trailer_may_carry() {
    use http_body_util::BodyExt as _;
    bounded(async {
        let origin = RawOrigin::start(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-sum\r\n\r\n\
              5\r\nhello\r\n0\r\nx-sum: abc\r\nconnection: close\r\ncontent-length: 9\r\n\r\n"
                .to_vec(),
        )
        .await;
        let p = proxy(&format!(
            "backend app {{ server \"{}\" }}\nrule all {{ route app cache off }}",
            origin.addr
        ))
        .await;
        let (mut sender, conn) = h2_client(addr(&p), |_| {}).await;
        let req = http::Request::get("http://h2.test/t")
            .header("te", "trailers")
            .body(http_body_util::Empty::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let collected = resp.into_body().collect().await.expect("the whole stream");
        let trailers = collected.trailers().cloned();
        assert_eq!(collected.to_bytes(), "hello");
        let trailers = trailers.expect("trailers");
        assert_eq!(trailers.len(), 1, "{trailers:?}");
        assert_eq!(trailers["x-sum"], "abc");
        drop(sender);
        let _ = conn.await;
        p.shutdown().await;
    })
    .await;
}

/// Reads `body` to its end, pausing for `pause` after each `every` bytes
/// (counted in whole frames): the bytes read, or the error that ended it.
async fn read_paced(
    body: &mut hyper::body::Incoming,
    every: usize,
    pause: Duration,
) -> Result<usize, hyper::Error> {
    use http_body_util::BodyExt as _;
    let (mut got, mut since_pause) = (0, 0);
    while let Some(frame) = body.frame().await {
        let n = frame?.data_ref().map_or(0, |d| d.len());
        got += n;
        since_pause += n;
        if since_pause >= every {
            since_pause = 0;
            tokio::time::sleep(pause).await;
        }
    }
    Ok(got)
}

/// A GET of `path` on the host `h2.test`, for [`h2_client`].
fn h2_request(path: &str) -> http::Request<http_body_util::Empty<bytes::Bytes>> {
    http::Request::get(format!("http://h2.test{path}"))
        .body(http_body_util::Empty::new())
        .unwrap()
}

#[tokio::test]
async fn an_h2_stream_whose_window_stays_shut_is_reset_after_the_send_timeout() {
    use http_body_util::BodyExt as _;
    bounded(async {
        const BIG: usize = 8 << 20;
        let origin = Origin::start(|s| {
            if s.uri.path() == "/big" {
                reply(200, &[], vec![b'x'; BIG])
            } else {
                reply(200, &[], "small")
            }
        })
        .await;
        let p = proxy(&policy_for(
            &origin,
            "http { send_timeout 300ms }\nrule all { route app cache off }",
        ))
        .await;
        let (mut sender, _conn) = h2_client(addr(&p), |b| {
            b.initial_stream_window_size(16 * 1024);
        })
        .await;
        let held = sender.send_request(h2_request("/big")).await.unwrap();
        assert_eq!(held.status(), 200);
        // Nothing of the body is read, so its window stays shut.
        tokio::time::sleep(Duration::from_secs(2)).await;
        // The connection carries on...
        let small = sender.send_request(h2_request("/small")).await.unwrap();
        let small = small.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&small[..], b"small");
        // ...but the held stream was reset short of its body.
        let mut body = held.into_body();
        let mut got = 0;
        let ended = loop {
            match body.frame().await {
                Some(Ok(frame)) => got += frame.data_ref().map_or(0, |d| d.len()),
                Some(Err(e)) => break Err(e),
                None => break Ok(()),
            }
        };
        assert!(ended.is_err(), "the held stream delivered its whole body");
        assert!(got < BIG, "{got}");
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_slow_h2_reader_that_keeps_reading_gets_the_whole_body() {
    bounded(async {
        const LEN: usize = 2 << 20;
        let origin = Origin::start(|_| reply(200, &[], vec![b'x'; LEN])).await;
        let p = proxy(&policy_for(
            &origin,
            "http {\n  send_timeout 300ms\n  idle_timeout 300ms\n}\nrule all { route app cache off }",
        ))
        .await;
        let (mut sender, _conn) = h2_client(addr(&p), |b| {
            b.initial_stream_window_size(64 * 1024)
                .initial_connection_window_size(64 * 1024);
        })
        .await;
        let mut body = sender.send_request(h2_request("/big")).await.unwrap().into_body();
        // About 500 KiB/s: the origin's answer comes in reads far larger
        // than what this client takes in a send timeout, yet it never
        // stops taking.
        let got = read_paced(&mut body, 32 * 1024, Duration::from_millis(60))
            .await
            .expect("the stream was not reset");
        assert_eq!(got, LEN);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn an_idle_h2_connection_still_sending_to_a_slow_reader_is_not_dropped() {
    bounded(async {
        const LEN: usize = 16 * 1024;
        let origin = Origin::start(|_| reply(200, &[], vec![b'x'; LEN])).await;
        let p = proxy(&policy_for(
            &origin,
            "http {\n  send_timeout 1s\n  idle_timeout 100ms\n}\nrule all { route app cache off }",
        ))
        .await;
        let (mut sender, _conn) = h2_client(addr(&p), |b| {
            b.initial_stream_window_size(1024);
        })
        .await;
        let mut body = sender
            .send_request(h2_request("/slow"))
            .await
            .unwrap()
            .into_body();
        // The whole answer is handed over at once and waits in HTTP/2's
        // buffers while the connection idles out; taking 1 KiB every
        // 100 ms, the client needs longer than the send timeout for it.
        let got = read_paced(&mut body, 1, Duration::from_millis(100))
            .await
            .expect("the connection was not dropped");
        assert_eq!(got, LEN);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn pings_do_not_keep_open_an_idle_h2_connection_whose_client_takes_nothing() {
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[], vec![b'x'; 16 * 1024])).await;
        let p = proxy(&policy_for(
            &origin,
            "http {\n  send_timeout 300ms\n  idle_timeout 100ms\n}\nrule all { route app cache off }",
        ))
        .await;
        // A window of one byte, never opened further, and a ping every
        // 100 ms: the proxy's answers to them are all it can write.
        let (mut sender, conn) = h2_client(addr(&p), |b| {
            b.timer(hyper_util::rt::TokioTimer::new())
                .initial_stream_window_size(1)
                .keep_alive_interval(Duration::from_millis(100))
                .keep_alive_while_idle(true);
        })
        .await;
        let resp = sender.send_request(h2_request("/held")).await.unwrap();
        assert_eq!(resp.status(), 200);
        let ended = tokio::time::timeout(Duration::from_secs(10), conn).await;
        assert!(ended.is_ok(), "the connection was kept open by its pings");
        drop(resp);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn an_h2_stream_waiting_on_a_quiet_origin_is_not_reset() {
    use http_body_util::BodyExt as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    bounded(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin_addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            if !read_request_head(&mut s).await {
                return;
            }
            let mut buf = [0u8; 4096];
            s.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                  transfer-encoding: chunked\r\n\r\n8\r\ndata: 1\n\r\n",
            )
            .await
            .unwrap();
            // Quiet for over three send timeouts: a wait on the origin.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let _ = s.write_all(b"8\r\ndata: 2\n\r\n0\r\n\r\n").await;
            let _ = s.read(&mut buf).await;
        });
        let p = proxy(&format!(
            "http {{ send_timeout 300ms }}\nbackend app {{\n  server \"{origin_addr}\"\n}}\nrule all {{ route app cache off }}\n"
        ))
        .await;
        let (mut sender, _conn) = h2_client(addr(&p), |_| {}).await;
        let resp = sender.send_request(h2_request("/events")).await.unwrap();
        let body = resp.into_body().collect().await.expect("the whole stream");
        assert_eq!(&body.to_bytes()[..], b"data: 1\ndata: 2\n");
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn via_names_the_client_s_http_version() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[], "ok")).await;
        let p = proxy(&policy_for(&origin, "rule all { route app cache off }")).await;
        get(addr(&p), "/one-one", &[]).await;
        let mut conn = tokio::net::TcpStream::connect(addr(&p)).await.unwrap();
        conn.write_all(b"GET /one-zero HTTP/1.0\r\nhost: v.test\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        conn.read_to_end(&mut answer).await.unwrap();
        let text = String::from_utf8_lossy(&answer);
        assert!(
            text.starts_with("HTTP/1.") && text[8..].starts_with(" 200"),
            "{text}"
        );
        let via = |path: &str| {
            origin
                .seen()
                .iter()
                .find(|s| s.uri.path() == path)
                .and_then(|s| s.headers.get("via").cloned())
                .unwrap()
        };
        assert_eq!(via("/one-one"), "1.1 portico");
        assert_eq!(via("/one-zero"), "1.0 portico");
        p.shutdown().await;
    })
    .await;
}

/// HTTP/1.0 has no Host to send: such a request is served (by a rule that
/// matches any host), and the origin gets its server's own address as
/// `Host`. HTTP/1.1 without Host stays 400.
#[tokio::test]
async fn http_1_0_without_host_is_served_with_the_server_s_host() {
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[], "ok")).await;
        let p = proxy(&policy_for(&origin, "rule all { route app cache off }")).await;
        let within = Duration::from_secs(5);
        let answer = raw_exchange(addr(&p), b"GET /no-host HTTP/1.0\r\n\r\n", within).await;
        assert!(
            answer.starts_with("HTTP/1.") && answer[8..].starts_with(" 200"),
            "{answer}"
        );
        assert!(answer.ends_with("\r\n\r\nok"), "{answer}");
        let seen = origin.seen();
        let host = seen[0].headers.get("host").expect("a Host for the origin");
        assert_eq!(host.to_str().unwrap(), origin.addr.to_string());
        assert!(seen[0].headers.get("x-forwarded-host").is_none());
        let answer = raw_exchange(
            addr(&p),
            b"GET /no-host HTTP/1.1\r\nConnection: close\r\n\r\n",
            within,
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
        assert_eq!(origin.count(), 1);
        p.shutdown().await;
    })
    .await;
}

// ============================================================ Max-Forwards

#[tokio::test]
async fn options_with_no_hop_left_is_answered_without_the_origin() {
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[], "origin")).await;
        let p = proxy(&policy_for(&origin, "rule all { route app cache off }")).await;
        let a = addr(&p);
        let got = send(a, "OPTIONS", "/x", &[("max-forwards", "0")], "").await;
        assert_eq!(got.status, 200);
        assert_eq!(
            got.header("allow"),
            Some("GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, TRACE")
        );
        assert_eq!(got.header("content-length"), Some("0"));
        assert!(got.body.is_empty());
        // Asked about the server itself.
        let out = raw_exchange(
            a,
            b"OPTIONS * HTTP/1.1\r\nHost: a.test\r\nMax-Forwards: 0\r\nConnection: close\r\n\r\n",
            Duration::from_secs(5),
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 200 "), "{out}");
        assert!(out.contains("\r\nallow: GET, HEAD, "), "{out}");
        assert!(out.contains("\r\ncontent-length: 0\r\n"), "{out}");
        // An Upgrade does not take OPTIONS or TRACE past the count: the
        // proxy ignores it (RFC 9110 §7.8) and answers them.
        for method in ["OPTIONS", "TRACE"] {
            let request = format!(
                "{method} /x HTTP/1.1\r\nHost: a.test\r\nMax-Forwards: 0\r\nUpgrade: websocket\r\n\
                 Connection: upgrade, close\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                 Sec-WebSocket-Version: 13\r\n\r\n"
            );
            let out = raw_exchange(a, request.as_bytes(), Duration::from_secs(5)).await;
            assert!(out.starts_with("HTTP/1.1 200 "), "{method}: {out}");
        }
        assert_eq!(origin.count(), 0);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn trace_with_no_hop_left_echoes_the_head_without_secrets() {
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[], "origin")).await;
        let p = proxy(&policy_for(
            &origin,
            r#"
rule private when path ^= "/private" { deny 403 }
rule all { route app cache off }
"#,
        ))
        .await;
        let a = addr(&p);
        let got = send(
            a,
            "TRACE",
            "/t?q=1",
            &[
                ("max-forwards", "0"),
                ("cookie", "session=s3cr3t"),
                ("authorization", "Bearer s3cr3t"),
                ("proxy-authorization", "Basic s3cr3t"),
                ("x-api-key", "s3cr3t"),
                ("x-forwarded-user", "s3cr3t"),
                ("x-amzn-oidc-data", "s3cr3t"),
                ("x-trace-me", "yes"),
            ],
            "",
        )
        .await;
        assert_eq!(got.status, 200);
        assert_eq!(got.header("content-type"), Some("message/http"));
        assert_eq!(got.header("x-content-type-options"), Some("nosniff"));
        let text = got.text();
        assert!(text.starts_with("TRACE /t?q=1 HTTP/1.1\r\n"), "{text}");
        assert!(text.contains("\r\nhost: test.example\r\n"), "{text}");
        assert!(text.contains("\r\nx-trace-me: yes\r\n"), "{text}");
        assert!(text.contains("\r\nmax-forwards: 0\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\n"), "{text}");
        assert!(!text.contains("s3cr3t"), "{text}");
        for name in ["cookie", "authorization", "x-api-key"] {
            assert!(!text.contains(&format!("{name}:")), "{name}: {text}");
        }
        // What the rules refuse stays refused, however few hops are left.
        let got = send(a, "TRACE", "/private/x", &[("max-forwards", "0")], "").await;
        assert_eq!(got.status, 403);
        assert_eq!(origin.count(), 0);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn max_forwards_reaches_the_origin_one_less_for_trace_and_options_only() {
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[], "origin")).await;
        let p = proxy(&policy_for(&origin, "rule all { route app cache off }")).await;
        let a = addr(&p);
        for method in ["TRACE", "OPTIONS"] {
            let got = send(a, method, "/hop", &[("max-forwards", "3")], "").await;
            assert_eq!(got.status, 200, "{method}");
            assert_eq!(got.text(), "origin", "{method}");
        }
        // Other methods pass it on as it came, even 0.
        let got = get(a, "/get", &[("max-forwards", "0")]).await;
        assert_eq!(got.text(), "origin");
        let seen = origin.seen();
        let sent: Vec<_> = seen
            .iter()
            .map(|s| {
                let values: Vec<_> = s
                    .headers
                    .get_all("max-forwards")
                    .iter()
                    .map(|v| v.to_str().unwrap().to_owned())
                    .collect();
                (s.method.as_str().to_owned(), values)
            })
            .collect();
        assert_eq!(
            sent,
            [
                ("TRACE".to_owned(), vec!["2".to_owned()]),
                ("OPTIONS".to_owned(), vec!["2".to_owned()]),
                ("GET".to_owned(), vec!["0".to_owned()]),
            ]
        );
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn an_invalid_max_forwards_on_trace_or_options_gets_400() {
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[], "origin")).await;
        let p = proxy(&policy_for(&origin, "rule all { route app cache off }")).await;
        let a = addr(&p);
        for (method, fields) in [
            ("TRACE", "Max-Forwards: x"),
            ("OPTIONS", "Max-Forwards: -1"),
            ("TRACE", "Max-Forwards: 1, 2"),
            ("OPTIONS", "Max-Forwards: 0x1"),
            ("TRACE", "Max-Forwards: 1\r\nMax-Forwards: 1"),
        ] {
            let request = format!(
                "{method} /bad HTTP/1.1\r\nHost: a.test\r\n{fields}\r\nConnection: close\r\n\r\n"
            );
            let out = raw_exchange(a, request.as_bytes(), Duration::from_secs(5)).await;
            assert!(out.starts_with("HTTP/1.1 400 "), "{method} {fields}: {out}");
        }
        assert_eq!(origin.count(), 0);
        // The same value means nothing to a GET, which goes on with it.
        let got = get(a, "/get", &[("max-forwards", "x")]).await;
        assert_eq!(got.status, 200);
        assert_eq!(origin.seen()[0].headers["max-forwards"], "x");
        p.shutdown().await;
    })
    .await;
}

// ============================================================ backends

/// Sends `n` GETs and counts the answers by body.
async fn spread(a: std::net::SocketAddr, n: usize, headers: &[(&str, &str)]) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let got = get(a, "/", headers).await;
        assert_eq!(got.status, 200, "{}", got.text());
        out.push(got.text());
    }
    out
}

fn count_of(bodies: &[String], name: &str) -> usize {
    bodies.iter().filter(|b| *b == name).count()
}

#[tokio::test]
async fn weighted_round_robin_spreads_by_weight() {
    bounded(async {
        let a = Origin::start(|_| reply(200, &[], "a")).await;
        let b = Origin::start(|_| reply(200, &[], "b")).await;
        let policy = format!(
            r#"
backend app {{
  server "{}" weight 3
  server "{}" weight 1
}}
rule all {{ route app cache off }}
"#,
            a.addr, b.addr
        );
        let p = proxy(&policy).await;
        let bodies = spread(addr(&p), 40, &[]).await;
        let (na, nb) = (count_of(&bodies, "a"), count_of(&bodies, "b"));
        assert_eq!(na + nb, 40);
        assert!((28..=32).contains(&na), "a={na} b={nb}");
        p.shutdown().await;
    })
    .await;
}

/// `balance random` (two random choices, the lighter one taken) follows the
/// weights on average but in no fixed order, unlike round robin's
/// repeating `a a b a`. Bounds at five standard deviations: a false
/// failure is about one in a million.
#[tokio::test]
async fn random_balance_follows_weights_in_no_fixed_order() {
    bounded(async {
        let a = Origin::start(|_| reply(200, &[], "a")).await;
        let b = Origin::start(|_| reply(200, &[], "b")).await;
        let policy = format!(
            r#"
backend app {{
  server "{}" weight 3
  server "{}" weight 1
  balance random
}}
rule all {{ route app cache off }}
"#,
            a.addr, b.addr
        );
        let p = proxy(&policy).await;
        let bodies = spread(addr(&p), 200, &[]).await;
        let na = count_of(&bodies, "a");
        assert_eq!(na + count_of(&bodies, "b"), 200);
        assert!((120..=180).contains(&na), "a={na} of 200");
        let periodic = bodies.windows(5).all(|w| w[0] == w[4]);
        assert!(!periodic, "a fixed rotation: {bodies:?}");
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn hash_balance_keeps_a_user_on_one_server() {
    bounded(async {
        let a = Origin::start(|_| reply(200, &[], "a")).await;
        let b = Origin::start(|_| reply(200, &[], "b")).await;
        let policy = format!(
            r#"
backend app {{
  server "{}"
  server "{}"
  balance hash [header("X-User")]
}}
rule all {{ route app cache off }}
"#,
            a.addr, b.addr
        );
        let p = proxy(&policy).await;
        let mut servers_used = std::collections::HashSet::new();
        for user in 0..16 {
            let user = format!("user-{user}");
            let bodies = spread(addr(&p), 5, &[("x-user", &user)]).await;
            assert!(bodies.iter().all(|b| *b == bodies[0]), "{user}: {bodies:?}");
            servers_used.insert(bodies[0].clone());
        }
        assert_eq!(servers_used.len(), 2, "16 users all on one server");
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn failover_past_a_closed_port() {
    bounded(async {
        let live = Origin::start(|_| reply(200, &[], "live")).await;
        let policy = format!(
            r#"
backend app {{
  server "{}"
  server "{}"
}}
rule all {{ route app cache off }}
"#,
            closed_addr(),
            live.addr
        );
        let p = proxy(&policy).await;
        let bodies = spread(addr(&p), 10, &[]).await;
        assert_eq!(count_of(&bodies, "live"), 10);
        p.shutdown().await;
    })
    .await;
}

/// A server killed while it holds requests: a GET it had is retried on the
/// other server (a reset before any response byte), and a POST it had gets
/// 502 and is not sent again.
#[tokio::test]
async fn a_backend_killed_with_requests_in_flight() {
    bounded(async {
        for method in ["GET", "POST"] {
            let a = KillableOrigin::start_with_delay("a", Duration::from_secs(30)).await;
            let b = KillableOrigin::start("b").await;
            let policy = format!(
                "backend app {{\n  server \"{}\"\n  server \"{}\"\n}}\nrule all {{ route app cache off }}\n",
                a.addr, b.addr
            );
            let p = proxy(&policy).await;
            let target = addr(&p);
            // Round robin: of two at once, one goes to each; `a` holds its own.
            let sent: Vec<_> = (0..2)
                .map(|_| {
                    let body = if method == "GET" { "" } else { "1" };
                    tokio::spawn(async move { send(target, method, "/", &[], body).await })
                })
                .collect();
            eventually("one request at each server", || a.count() == 1 && b.count() == 1).await;
            a.kill();
            let mut got: Vec<_> = Vec::new();
            for s in sent {
                let r = s.await.unwrap();
                got.push((r.status.as_u16(), r.text()));
            }
            got.sort();
            if method == "GET" {
                assert_eq!(got, [(200, "b".to_owned()), (200, "b".to_owned())]);
                assert_eq!(b.count(), 2, "the held GET was retried once");
            } else {
                assert_eq!(got[0], (200, "b".to_owned()));
                assert_eq!(got[1].0, 502, "{got:?}");
                assert_eq!(b.count(), 1, "the POST was sent twice");
            }
            assert_eq!(a.count(), 1);
            p.shutdown().await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_backend_killed_mid_run_loses_its_traffic_without_failed_requests() {
    bounded(async {
        let a = KillableOrigin::start("a").await;
        let b = KillableOrigin::start("b").await;
        let policy = format!(
            r#"
backend app {{
  server "{}"
  server "{}"
}}
rule all {{ route app cache off }}
"#,
            a.addr, b.addr
        );
        let p = proxy(&policy).await;
        let before = spread(addr(&p), 10, &[]).await;
        assert!(count_of(&before, "a") > 0 && count_of(&before, "b") > 0);
        a.kill();
        let a_count = a.count();
        // GETs are idempotent: a refused or reset try moves to the other server.
        let after = spread(addr(&p), 20, &[]).await;
        assert_eq!(count_of(&after, "b"), 20, "{after:?}");
        assert_eq!(a.count(), a_count);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn active_health_checks_take_a_server_out_and_back_in() {
    bounded(async {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let healthy = Arc::new(AtomicBool::new(true));
        let h = healthy.clone();
        let a = Origin::start(move |s| {
            if s.uri.path() == "/healthz" && !h.load(Ordering::SeqCst) {
                reply(500, &[], "sick")
            } else {
                reply(200, &[], "a")
            }
        })
        .await;
        let b = Origin::start(|_| reply(200, &[], "b")).await;
        let policy = format!(
            r#"
backend app {{
  server "{}"
  server "{}"
  health get "/healthz" every 100ms timeout 50ms rise 1 fall 1
}}
rule all {{ route app cache off }}
"#,
            a.addr, b.addr
        );
        let (logs, _guard) = Captured::start();
        let p = proxy(&policy).await;
        let proxied_to_a = || a.seen().iter().filter(|s| s.uri.path() == "/").count();

        healthy.store(false, Ordering::SeqCst);
        // Wait for a probe to see it (every 100 ms), then no traffic goes to `a`.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let bodies = spread(addr(&p), 6, &[]).await;
            if count_of(&bodies, "b") == 6 {
                break;
            }
            assert!(Instant::now() < deadline, "`a` never taken out");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let at_a = proxied_to_a();
        let bodies = spread(addr(&p), 10, &[]).await;
        assert_eq!(count_of(&bodies, "b"), 10);
        assert_eq!(proxied_to_a(), at_a);
        // The log names the server by backend and address.
        let named = format!("app/{}", a.addr);
        assert!(
            logs.text()
                .lines()
                .any(|l| l.contains("upstream server down") && l.contains(&named)),
            "no down line naming {named}"
        );

        healthy.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let bodies = spread(addr(&p), 6, &[]).await;
            if count_of(&bodies, "a") > 0 {
                break;
            }
            assert!(Instant::now() < deadline, "`a` never brought back");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_health_check_s_host_is_the_host_of_its_probes() {
    bounded(async {
        // A virtual host: only `shop.example` is served here.
        let a = Origin::start(|s| match s.headers.get("host") {
            Some(h) if h == "shop.example" => reply(200, &[], "a"),
            _ => reply(421, &[], "not here"),
        })
        .await;
        let policy = format!(
            r#"
backend app {{
  server "{}"
  health get "/healthz" every 50ms timeout 40ms rise 1 fall 1 host "shop.example"
}}
rule all {{ route app cache off }}
"#,
            a.addr
        );
        let p = proxy(&policy).await;
        eventually("three probes", || a.count_path("/healthz") >= 3).await;
        let pool = first_pool(&p);
        assert!(pool.health().is_up(0), "probes were refused");
        let got = get(addr(&p), "/", &[("host", "shop.example")]).await;
        assert_eq!(got.status, 200, "{}", got.text());
        let probe = a.seen().into_iter().find(|s| s.uri.path() == "/healthz");
        assert_eq!(probe.unwrap().headers["host"], "shop.example");
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn all_servers_down_answers_503_fast() {
    bounded(async {
        let sick = Origin::start(|s| {
            if s.uri.path() == "/healthz" {
                reply(500, &[], "sick")
            } else {
                reply(200, &[], "should not be reached")
            }
        })
        .await;
        let policy = format!(
            r#"
backend app {{
  server "{}"
  health get "/healthz" every 100ms timeout 50ms rise 1 fall 1
}}
rule all {{ route app cache off }}
"#,
            sick.addr
        );
        let p = proxy(&policy).await;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let started = Instant::now();
            let got = get(addr(&p), "/", &[]).await;
            if got.status == 503 {
                assert!(started.elapsed() < Duration::from_millis(500));
                assert!(got.header("retry-after").is_some());
                break;
            }
            assert!(Instant::now() < deadline, "never 503: {}", got.status);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let reached = sick.count_path("/");
        assert_eq!(get(addr(&p), "/", &[]).await.status, 503);
        assert_eq!(sick.count_path("/"), reached, "a down server got a request");
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn refused_connection_is_502_and_slow_origin_is_504() {
    bounded(async {
        let policy = format!(
            "backend app {{ server \"{}\" }}\nrule all {{ route app cache off }}",
            closed_addr()
        );
        let p = proxy(&policy).await;
        let got = get(addr(&p), "/", &[]).await;
        assert_eq!(got.status, 502);
        assert!(got
            .header("content-type")
            .unwrap()
            .starts_with("text/plain"));
        // The error page follows the client's Accept, its second value too.
        let got = get(
            addr(&p),
            "/",
            &[("accept", "application/json"), ("accept", "text/html")],
        )
        .await;
        assert_eq!(got.status, 502);
        assert!(got.header("content-type").unwrap().starts_with("text/html"));
        assert!(got.text().contains("<html>"), "{}", got.text());
        p.shutdown().await;

        let slow =
            Origin::start_with_delay(Duration::from_secs(5), |_| reply(200, &[], "late")).await;
        let policy = format!(
            r#"
backend app {{
  server "{}"
  first_byte_timeout 200ms
}}
rule all {{ route app cache off }}
"#,
            slow.addr
        );
        let p = proxy(&policy).await;
        let started = Instant::now();
        let got = get(addr(&p), "/", &[]).await;
        assert_eq!(got.status, 504);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn static_files_backend_serves_validates_ranges_and_refuses_escapes() {
    bounded(async {
        let root = tempfile::tempdir().unwrap();
        let site = root.path().join("site");
        std::fs::create_dir(&site).unwrap();
        std::fs::write(site.join("hello.txt"), "hello, static world").unwrap();
        std::fs::write(root.path().join("secret.txt"), "top secret").unwrap();
        std::os::unix::fs::symlink(root.path().join("secret.txt"), site.join("link.txt")).unwrap();
        std::fs::create_dir(site.join("docs")).unwrap();
        std::fs::write(site.join("docs/index.html"), "<h1>docs</h1>").unwrap();
        let policy = format!(
            "backend files {{ static \"{}\" }}\nrule all {{ route files cache off }}",
            site.display()
        );
        let p = proxy(&policy).await;
        let a = addr(&p);

        let got = get(a, "/hello.txt", &[]).await;
        assert_eq!(got.status, 200);
        assert_eq!(got.text(), "hello, static world");
        assert_eq!(
            got.header("content-type"),
            Some("text/plain; charset=utf-8")
        );
        let etag = got.header("etag").expect("ETag").to_string();
        let modified = got
            .header("last-modified")
            .expect("Last-Modified")
            .to_string();
        let got = get(a, "/hello.txt", &[("if-modified-since", &modified)]).await;
        assert_eq!(got.status, 304);
        let got = get(a, "/docs/", &[]).await;
        assert_eq!(
            (got.status.as_u16(), got.text()),
            (200, "<h1>docs</h1>".to_owned())
        );
        assert_eq!(got.header("content-type"), Some("text/html; charset=utf-8"));

        let got = get(a, "/hello.txt", &[("if-none-match", &etag)]).await;
        assert_eq!(got.status, 304);
        assert!(got.body.is_empty());

        let got = get(a, "/hello.txt", &[("range", "bytes=7-12")]).await;
        assert_eq!(got.status, 206);
        assert_eq!(got.text(), "static");
        assert_eq!(got.header("content-range"), Some("bytes 7-12/19"));

        for path in [
            "/../secret.txt",
            "/%2e%2e/secret.txt",
            "/%2e%2e%2fsecret.txt",
            "/..%2fsecret.txt",
            "/%252e%252e/secret.txt",
            "/%252e%252e%252fsecret.txt",
            "/link.txt",
        ] {
            let got = get(a, path, &[]).await;
            assert!(
                got.status == 400 || got.status == 403 || got.status == 404,
                "{path}: {}",
                got.status
            );
            assert!(!got.text().contains("top secret"), "{path}");
        }
        assert_eq!(get(a, "/missing.txt", &[]).await.status, 404);

        let got = send(a, "OPTIONS", "/hello.txt", &[], "").await;
        assert_eq!(got.status, 204);
        assert_eq!(got.header("allow"), Some("GET, HEAD, OPTIONS"));
        let got = send(a, "TRACE", "/hello.txt", &[], "").await;
        assert_eq!(got.status, 405);
        assert_eq!(got.header("allow"), Some("GET, HEAD, OPTIONS"));
        p.shutdown().await;
    })
    .await;
}

/// A file has one path, the one rules see: `//`, `%2F`, `.` segments and a
/// `/` after a file's name cannot reach a file a rule denies.
#[tokio::test]
async fn static_files_cannot_be_reached_around_a_path_rule() {
    bounded(async {
        let site = tempfile::tempdir().unwrap();
        std::fs::create_dir(site.path().join("private")).unwrap();
        std::fs::write(site.path().join("private/key.txt"), "the key").unwrap();
        std::fs::write(site.path().join("hello.txt"), "the greeting").unwrap();
        std::fs::write(site.path().join("open.txt"), "open").unwrap();
        let policy = format!(
            r#"backend files {{ static "{}" }}
rule private when path ^= "/private/" {{ deny 403 }}
rule hello when path == "/hello.txt" {{ deny 403 }}
rule all {{ route files cache off }}"#,
            site.path().display()
        );
        let p = proxy(&policy).await;
        let a = addr(&p);
        assert_eq!(get(a, "/private/key.txt", &[]).await.status, 403);
        assert_eq!(get(a, "/hello.txt", &[]).await.status, 403);
        assert_eq!(get(a, "/open.txt", &[]).await.text(), "open");
        for path in [
            "//private/key.txt",
            "/private%2Fkey.txt",
            "/private%2fkey.txt",
            "/x/..%2fprivate/key.txt",
            "/hello.txt/",
            "//hello.txt",
            "/hello.txt//",
            "/./hello.txt",
            "/open.txt/",
        ] {
            let got = get(a, path, &[]).await;
            assert!(
                matches!(got.status.as_u16(), 400 | 403 | 404),
                "{path}: {} {}",
                got.status,
                got.text()
            );
            assert!(!got.text().contains("the "), "{path}: {}", got.text());
        }
        p.shutdown().await;
    })
    .await;
}

/// What is checked is the file that was opened: a directory on the way
/// swapped for a symlink out of the root between a check and an open leads
/// nowhere, and the length and validators are the opened file's.
#[tokio::test]
async fn a_static_directory_swapped_for_a_symlink_never_leads_outside() {
    bounded(async {
        let top = tempfile::tempdir().unwrap();
        let site = top.path().join("site");
        let outside = top.path().join("outside");
        std::fs::create_dir_all(site.join("u")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(site.join("u/f.txt"), "innocent-innocent").unwrap();
        std::fs::write(outside.join("f.txt"), "SECRET-SECRET-SECRET").unwrap();
        std::os::unix::fs::symlink(&outside, site.join("u.link")).unwrap();
        let policy = format!(
            "backend files {{ static \"{}\" }}\nrule all {{ route files cache off }}",
            site.display()
        );
        let p = proxy(&policy).await;
        let a = addr(&p);
        assert_eq!(get(a, "/u/f.txt", &[]).await.text(), "innocent-innocent");
        // `u` is by turns the real directory and a symlink out of the root,
        // as fast as renames go, while the file is asked for.
        let stop = Arc::new(AtomicBool::new(false));
        let swapper = {
            let (stop, site) = (stop.clone(), site.clone());
            std::thread::spawn(move || {
                let (u, dir, link) = (site.join("u"), site.join("u.dir"), site.join("u.link"));
                while !stop.load(Ordering::Relaxed) {
                    std::fs::rename(&u, &dir).unwrap();
                    std::fs::rename(&link, &u).unwrap();
                    std::fs::rename(&u, &link).unwrap();
                    std::fs::rename(&dir, &u).unwrap();
                }
            })
        };
        let mut served = 0;
        for _ in 0..2000 {
            let got = get(a, "/u/f.txt", &[]).await;
            let text = got.text();
            assert!(!text.contains("SECRET"), "read outside the root: {text}");
            if got.status == 200 {
                assert_eq!(text, "innocent-innocent");
                served += 1;
            }
        }
        stop.store(true, Ordering::Relaxed);
        swapper.join().unwrap();
        assert!(served > 0, "the file inside was never served");
        p.shutdown().await;
    })
    .await;
}

/// If-Match and If-Unmodified-Since that fail are 412, with or without a
/// range (RFC 9110 §13.1.1, §13.1.4); a Range beyond what u64 holds is
/// clamped to the file; the unit's case does not matter.
#[tokio::test]
async fn static_preconditions_fail_with_412_and_ranges_clamp() {
    bounded(async {
        let site = tempfile::tempdir().unwrap();
        std::fs::write(site.path().join("f.txt"), "hello").unwrap();
        let policy = format!(
            "backend files {{ static \"{}\" }}\nrule all {{ route files cache off }}",
            site.path().display()
        );
        let p = proxy(&policy).await;
        let a = addr(&p);
        let etag = get(a, "/f.txt", &[])
            .await
            .header("etag")
            .unwrap()
            .to_string();
        let weak = format!("W/{etag}");
        for range in [None, Some("bytes=0-1")] {
            for (name, value) in [
                ("if-match", "\"nope\""),
                ("if-match", weak.as_str()),
                ("if-unmodified-since", "Thu, 01 Jan 1970 00:00:00 GMT"),
            ] {
                let mut fields = vec![(name, value)];
                fields.extend(range.map(|r| ("range", r)));
                let got = get(a, "/f.txt", &fields).await;
                assert_eq!(got.status, 412, "{name}: {value} {range:?}");
                assert!(got.body.is_empty());
            }
        }
        let got = get(a, "/f.txt", &[("if-match", &etag), ("range", "bytes=1-2")]).await;
        assert_eq!((got.status.as_u16(), got.text()), (206, "el".to_owned()));
        let got = get(a, "/f.txt", &[("if-match", "*")]).await;
        assert_eq!(got.status, 200);
        for (range, want) in [
            ("bytes=0-99999999999999999999999", "bytes 0-4/5"),
            ("bytes=-99999999999999999999", "bytes 0-4/5"),
            ("Bytes=1-2", "bytes 1-2/5"),
        ] {
            let got = get(a, "/f.txt", &[("range", range)]).await;
            assert_eq!(got.status, 206, "{range}");
            assert_eq!(got.header("content-range"), Some(want), "{range}");
        }
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_large_static_file_streams_without_being_read_whole() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    bounded(async {
        let root = tempfile::tempdir().unwrap();
        // 4 GiB, sparse: the disk holds only the marker in the middle.
        const LEN: u64 = 4 << 30;
        const MARK_AT: u64 = 2 << 30;
        let file = std::fs::File::create(root.path().join("big.bin")).unwrap();
        file.set_len(LEN).unwrap();
        {
            use std::io::{Seek, Write};
            let mut file = &file;
            file.seek(std::io::SeekFrom::Start(MARK_AT)).unwrap();
            file.write_all(b"middle").unwrap();
        }
        drop(file);
        let policy = format!(
            "backend files {{ static \"{}\" }}\nrule all {{ route files cache off }}",
            root.path().display()
        );
        let p = proxy(&policy).await;

        // The head comes first, with the whole length, then the first
        // bytes; the client then goes away.
        let mut conn = tokio::net::TcpStream::connect(addr(&p)).await.unwrap();
        conn.write_all(b"GET /big.bin HTTP/1.1\r\nhost: test.example\r\n\r\n")
            .await
            .unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        let body_at = loop {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "closed before the head: {:?}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..n]);
            if let Some(i) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&seen[..body_at]).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(
            head.contains(&format!("content-length: {LEN}\r\n")),
            "{head}"
        );
        while seen.len() < body_at + 1024 {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed early");
            seen.extend_from_slice(&buf[..n]);
        }
        assert!(seen[body_at..].iter().all(|&b| b == 0));
        drop(conn);

        // A range in the middle is read from where it starts.
        let range = format!("bytes={MARK_AT}-{}", MARK_AT + 5);
        let got = get(addr(&p), "/big.bin", &[("range", &range)]).await;
        assert_eq!(got.status, 206);
        assert_eq!(got.text(), "middle");
        assert_eq!(
            got.header("content-range"),
            Some(format!("bytes {MARK_AT}-{}/{LEN}", MARK_AT + 5).as_str())
        );
        p.shutdown().await;
    })
    .await;
}

// ============================================================ upgrades

/// An origin that switches to any protocol asked for and echoes bytes back.
async fn echo_upgrade_origin() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use bytes::Bytes;
    use http::{Request, Response, StatusCode};
    use http_body_util::Empty;
    use hyper::body::Incoming;
    use hyper_util::rt::TokioIo;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            conns.spawn(async move {
                let service =
                    hyper::service::service_fn(move |mut req: Request<Incoming>| async move {
                        let proto = req.headers().get("upgrade").cloned();
                        let accept = req.headers().get("sec-websocket-key").map(|key| {
                            use base64::Engine as _;
                            let mut ctx =
                                ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
                            ctx.update(key.as_bytes());
                            ctx.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
                            base64::engine::general_purpose::STANDARD.encode(ctx.finish())
                        });
                        // `/bad-accept` answers the handshake with the wrong proof.
                        let accept = accept.map(|a| {
                            if req.uri().path() == "/bad-accept" {
                                "bm90IHRoZSBhbnN3ZXI=".to_owned()
                            } else {
                                a
                            }
                        });
                        let mut resp = Response::new(Empty::<Bytes>::new());
                        if let Some(accept) = accept {
                            resp.headers_mut()
                                .insert("sec-websocket-accept", accept.parse().unwrap());
                        }
                        // Which origin answered, for balancing scenarios.
                        resp.headers_mut()
                            .insert("x-origin-addr", addr.to_string().parse().unwrap());
                        resp.headers_mut().insert(
                            "x-origin-saw-method",
                            req.method().as_str().parse().unwrap(),
                        );
                        // What the origin saw of the forwarding fields, told back.
                        for (field, told) in [
                            ("host", "x-origin-saw-host"),
                            ("x-forwarded-host", "x-origin-saw-xfh"),
                            ("x-forwarded-for", "x-origin-saw-xff"),
                            ("via", "x-origin-saw-via"),
                            ("forwarded", "x-origin-saw-forwarded"),
                        ] {
                            if let Some(v) = req.headers().get(field).cloned() {
                                resp.headers_mut().insert(told, v);
                            }
                        }
                        // Every Cookie field, so that a count shows.
                        let cookies: Vec<&str> = req
                            .headers()
                            .get_all("cookie")
                            .iter()
                            .filter_map(|v| v.to_str().ok())
                            .collect();
                        if !cookies.is_empty() {
                            resp.headers_mut().insert(
                                "x-origin-saw-cookies",
                                cookies.join(" | ").parse().unwrap(),
                            );
                        }
                        let Some(proto) = proto else {
                            *resp.status_mut() = StatusCode::BAD_REQUEST;
                            return Ok::<_, std::convert::Infallible>(resp);
                        };
                        let on = hyper::upgrade::on(&mut req);
                        tokio::spawn(async move {
                            let Ok(upgraded) = on.await else { return };
                            let (mut r, mut w) = tokio::io::split(TokioIo::new(upgraded));
                            let _ = tokio::io::copy(&mut r, &mut w).await;
                        });
                        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                        resp.headers_mut().insert("upgrade", proto);
                        resp.headers_mut()
                            .insert("connection", http::HeaderValue::from_static("upgrade"));
                        Ok(resp)
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    (addr, task)
}

/// A proxy in front of [`echo_upgrade_origin`], and a connection to it.
async fn proxy_before_echo_origin() -> (
    portico::run::Running,
    tokio::task::JoinHandle<()>,
    tokio::net::TcpStream,
) {
    let (origin, task) = echo_upgrade_origin().await;
    // The rule rewrites Host: X-Forwarded-Host must still say what the client asked for.
    let policy = format!(
        "backend app {{ server \"{origin}\" }}\nrule all {{ route app cache off request_header set \"Host\" \"origin.internal\" }}"
    );
    let p = proxy(&policy).await;
    let stream = tokio::net::TcpStream::connect(addr(&p)).await.unwrap();
    (p, task, stream)
}

/// An HTTP/2 WebSocket opening (RFC 8441 extended CONNECT) of
/// `http://ws.test/chat`, with `fields` besides the version.
fn websocket_connect(
    fields: &[(&str, &str)],
) -> http::Request<http_body_util::Empty<bytes::Bytes>> {
    let mut req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri("http://ws.test/chat")
        .header("sec-websocket-version", "13");
    for (name, value) in fields {
        req = req.header(*name, *value);
    }
    let mut req = req.body(http_body_util::Empty::new()).unwrap();
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    req
}

/// Sends the extended CONNECT `connect` makes, again until the server's
/// SETTINGS (with ENABLE_CONNECT_PROTOCOL), which may come after the first
/// try, allow it.
async fn send_extended_connect(
    sender: &mut hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    connect: impl Fn() -> http::Request<http_body_util::Empty<bytes::Bytes>>,
) -> http::Response<hyper::body::Incoming> {
    for _ in 0..50 {
        sender.ready().await.unwrap();
        match sender.send_request(connect()).await {
            Ok(resp) => return resp,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    panic!("extended CONNECT not accepted");
}

/// Sends each message over a switched connection and expects it echoed.
async fn echo_round_trips(upgraded: hyper::upgrade::Upgraded, messages: &[&[u8]]) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut io = hyper_util::rt::TokioIo::new(upgraded);
    for msg in messages {
        io.write_all(msg).await.unwrap();
        let mut buf = vec![0; msg.len()];
        io.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, msg);
    }
}

#[tokio::test]
async fn websocket_upgrade_passes_through_and_echoes() {
    bounded(async {
        use bytes::Bytes;
        use http_body_util::Empty;
        use hyper_util::rt::TokioIo;
        let (p, task, stream) = proxy_before_echo_origin().await;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn.with_upgrades());
        let req = http::Request::get("/chat")
            .header("host", "ws.test")
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("forwarded", "for=203.0.113.9")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 101);
        assert_eq!(resp.headers().get("upgrade").unwrap(), "websocket");
        let saw = |name: &str| {
            resp.headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_owned())
        };
        assert_eq!(saw("x-origin-saw-host").as_deref(), Some("origin.internal"));
        assert_eq!(saw("x-origin-saw-xfh").as_deref(), Some("ws.test"));
        assert_eq!(saw("x-origin-saw-xff").as_deref(), Some("127.0.0.1"));
        assert_eq!(saw("x-origin-saw-forwarded"), None);
        assert!(saw("x-origin-saw-via").unwrap().contains("portico"));
        let upgraded = hyper::upgrade::on(resp)
            .await
            .expect("client side switched");
        echo_round_trips(upgraded, &[b"ping", b"second message"]).await;
        p.shutdown().await;
        task.abort();
    })
    .await;
}

/// Opens a WebSocket to the proxy at `proxy` and returns the switched
/// connection with the response head.
async fn open_websocket(
    proxy: std::net::SocketAddr,
) -> (hyper::upgrade::Upgraded, http::response::Parts) {
    open_websocket_with(proxy, &[]).await
}

/// [`open_websocket`] with more request fields.
async fn open_websocket_with(
    proxy: std::net::SocketAddr,
    fields: &[(&str, &str)],
) -> (hyper::upgrade::Upgraded, http::response::Parts) {
    use bytes::Bytes;
    use http_body_util::Empty;
    use hyper_util::rt::TokioIo;
    let stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    let mut req = http::Request::get("/chat")
        .header("host", "ws.test")
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
    for (name, value) in fields {
        req = req.header(*name, *value);
    }
    let req = req.body(Empty::<Bytes>::new()).unwrap();
    let mut resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 101);
    let upgraded = hyper::upgrade::on(&mut resp)
        .await
        .expect("client side switched");
    (upgraded, resp.into_parts().0)
}

#[tokio::test]
async fn least_conn_counts_an_open_websocket_as_a_connection() {
    bounded(async {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (one, one_task) = echo_upgrade_origin().await;
        let (two, two_task) = echo_upgrade_origin().await;
        let policy = format!(
            "backend app {{\n  server \"{one}\"\n  server \"{two}\"\n  balance least_conn\n}}\nrule all {{ route app cache off }}"
        );
        let p = proxy(&policy).await;
        let (upgraded, head) = open_websocket(addr(&p)).await;
        let busy = head.headers["x-origin-addr"].to_str().unwrap().to_owned();
        let mut ws = hyper_util::rt::TokioIo::new(upgraded);
        // The WebSocket is live (spliced both ways) before anything else is sent.
        ws.write_all(b"hello").await.unwrap();
        let mut buf = [0; 5];
        ws.read_exact(&mut buf).await.unwrap();
        // While it stays open, its server has one connection and the other none.
        for _ in 0..6 {
            let got = get(addr(&p), "/plain", &[]).await;
            let answered = got.header("x-origin-addr").unwrap();
            assert_ne!(answered, busy, "a plain request went to the server holding the WebSocket");
        }
        // A reload that changes the backend builds a new pool: the open
        // WebSocket counts there too.
        p.reload(load(&policy.replace(
            "balance least_conn",
            "balance least_conn\n  connect_timeout 3s",
        )))
        .await
        .unwrap();
        for _ in 0..6 {
            let got = get(addr(&p), "/plain", &[]).await;
            let answered = got.header("x-origin-addr").unwrap();
            assert_ne!(answered, busy, "after the reload, the WebSocket no longer counted");
        }
        drop(ws);
        p.shutdown().await;
        one_task.abort();
        two_task.abort();
    })
    .await;
}

/// `balance hash` keeps a WebSocket on the server its key sends the same
/// user's plain requests to; requests without any part of the key (no
/// `X-User` yet) are spread over the servers, not all sent to one.
#[tokio::test]
async fn hash_balance_keeps_websockets_with_their_user_and_spreads_keyless_requests() {
    bounded(async {
        let (one, one_task) = echo_upgrade_origin().await;
        let (two, two_task) = echo_upgrade_origin().await;
        let policy = format!(
            "backend app {{\n  server \"{one}\"\n  server \"{two}\"\n  balance hash [header(\"X-User\")]\n}}\nrule all {{ route app cache off }}"
        );
        let p = proxy(&policy).await;
        let mut used = std::collections::HashSet::new();
        for user in 0..6 {
            let user = format!("user-{user}");
            let plain = get(addr(&p), "/plain", &[("x-user", &user)]).await;
            let server = plain.header("x-origin-addr").unwrap().to_owned();
            used.insert(server.clone());
            for _ in 0..3 {
                let (ws, head) = open_websocket_with(addr(&p), &[("x-user", &user)]).await;
                assert_eq!(head.headers["x-origin-addr"], server.as_str(), "{user}");
                drop(ws);
            }
        }
        assert_eq!(used.len(), 2, "six users all on one server");
        let mut keyless = std::collections::HashSet::new();
        for _ in 0..20 {
            let got = get(addr(&p), "/plain", &[]).await;
            keyless.insert(got.header("x-origin-addr").unwrap().to_owned());
        }
        assert_eq!(keyless.len(), 2, "requests without a key all went to one server");
        p.shutdown().await;
        one_task.abort();
        two_task.abort();
    })
    .await;
}

/// Waits for the proxy to close `ws`, reading (and ignoring) what comes:
/// true when it did (end of stream or an error) within ten seconds.
async fn closed_by_the_proxy(ws: &mut hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>) -> bool {
    use tokio::io::AsyncReadExt as _;
    let mut buf = [0; 64];
    let end = async {
        loop {
            match ws.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), end)
        .await
        .is_ok()
}

#[tokio::test]
async fn an_idle_websocket_is_closed_after_the_tunnel_idle_timeout() {
    bounded(async {
        let (origin, task) = echo_upgrade_origin().await;
        let policy = format!(
            "http {{\n  tunnel_idle_timeout 300ms\n}}\nbackend app {{ server \"{origin}\" }}\nrule all {{ route app cache off }}"
        );
        let p = proxy(&policy).await;
        let (ws, _) = open_websocket(addr(&p)).await;
        let mut ws = hyper_util::rt::TokioIo::new(ws);
        assert!(
            closed_by_the_proxy(&mut ws).await,
            "a WebSocket with no traffic outlived the idle timeout"
        );
        p.shutdown().await;
        task.abort();
    })
    .await;
}

#[tokio::test]
async fn a_quiet_websocket_outlives_the_keep_alive_idle_timeout() {
    bounded(async {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (origin, task) = echo_upgrade_origin().await;
        // Keep-alive connections idle out after 200 ms; an open WebSocket
        // is a conversation, not an idle connection, and has its own limit.
        let policy = format!(
            "http {{\n  idle_timeout 200ms\n}}\nbackend app {{ server \"{origin}\" }}\nrule all {{ route app cache off }}"
        );
        let p = proxy(&policy).await;
        let (ws, _) = open_websocket(addr(&p)).await;
        let mut ws = hyper_util::rt::TokioIo::new(ws);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        ws.write_all(b"still here").await.unwrap();
        let mut buf = [0; 10];
        tokio::time::timeout(Duration::from_secs(5), ws.read_exact(&mut buf))
            .await
            .expect("an echo in time")
            .expect("the WebSocket is still open");
        assert_eq!(&buf, b"still here");
        p.shutdown().await;
        task.abort();
    })
    .await;
}

#[tokio::test]
async fn a_websocket_whose_client_stops_reading_is_closed_after_the_send_timeout() {
    bounded(async {
        use tokio::io::AsyncWriteExt as _;
        const SENT: usize = 64 << 20;
        let (origin, task) = echo_upgrade_origin().await;
        let policy = format!(
            "http {{\n  send_timeout 300ms\n}}\nbackend app {{ server \"{origin}\" }}\nrule all {{ route app cache off }}"
        );
        let p = proxy(&policy).await;
        let (ws, _) = open_websocket(addr(&p)).await;
        let (mut reader, mut writer) = tokio::io::split(hyper_util::rt::TokioIo::new(ws));
        // The origin echoes all of it; the client reads none for a while.
        let writing = tokio::spawn(async move {
            let chunk = vec![b'x'; 64 * 1024];
            for _ in 0..SENT / chunk.len() {
                if writer.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        // What was on its way arrives, then the end: far short of the echo.
        let mut got = Vec::new();
        let read = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut got),
        )
        .await;
        assert!(read.is_ok(), "the stalled WebSocket was not closed");
        assert!(got.len() < SENT, "{}", got.len());
        writing.abort();
        p.shutdown().await;
        task.abort();
    })
    .await;
}

#[tokio::test]
async fn an_h2_websocket_outlives_the_keep_alive_idle_and_send_timeouts() {
    bounded(async {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        let (origin, task) = echo_upgrade_origin().await;
        let p = proxy(&format!(
            "http {{\n  idle_timeout 200ms\n  send_timeout 300ms\n}}\nbackend app {{ server \"{origin}\" }}\nrule all {{ route app cache off }}"
        ))
        .await;
        let stream = tokio::net::TcpStream::connect(addr(&p)).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let resp = send_extended_connect(&mut sender, || websocket_connect(&[])).await;
        assert_eq!(resp.status(), 200);
        let upgraded = hyper::upgrade::on(resp).await.expect("the h2 stream opened");
        let mut io = TokioIo::new(upgraded);
        // Quiet for well over the idle and send timeouts together, then
        // busy: the connection carries a live tunnel, and is neither idle
        // nor stalled.
        for pause in [1000, 100, 100] {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            tokio::time::sleep(Duration::from_millis(pause)).await;
            io.write_all(b"ping").await.unwrap();
            let mut buf = [0; 4];
            tokio::time::timeout(Duration::from_secs(5), io.read_exact(&mut buf))
                .await
                .expect("an echo in time")
                .expect("the tunnel is open");
            assert_eq!(&buf, b"ping");
        }
        drop(io);
        drop(sender);
        p.shutdown().await;
        task.abort();
    })
    .await;
}

#[tokio::test]
async fn an_open_websocket_counts_toward_max_connections() {
    bounded(async {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (origin, task) = echo_upgrade_origin().await;
        let policy = format!(
            "http {{\n  max_connections 1\n}}\nbackend app {{ server \"{origin}\" }}\nrule all {{ route app cache off }}"
        );
        let p = proxy(&policy).await;
        let (ws, _) = open_websocket(addr(&p)).await;
        let mut ws = hyper_util::rt::TokioIo::new(ws);
        ws.write_all(b"hello").await.unwrap();
        let mut buf = [0; 5];
        ws.read_exact(&mut buf).await.unwrap();
        let a = addr(&p);
        let waiting = tokio::spawn(async move { get(a, "/plain", &[]).await.status });
        // At the cap the next client waits in the accept queue. Nothing
        // signals "not served", so it is given a moment to be wrongly served.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !waiting.is_finished(),
            "a client was served past the cap while the WebSocket was open"
        );
        // Closing the WebSocket makes room.
        drop(ws);
        assert_eq!(waiting.await.unwrap(), 400);
        p.shutdown().await;
        task.abort();
    })
    .await;
}

#[tokio::test]
async fn shutdown_ends_an_open_websocket_after_the_grace_period() {
    bounded(async {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (origin, task) = echo_upgrade_origin().await;
        let policy = format!(
            "http {{\n  shutdown_grace 300ms\n}}\nbackend app {{ server \"{origin}\" }}\nrule all {{ route app cache off }}"
        );
        let p = proxy(&policy).await;
        let (ws, _) = open_websocket(addr(&p)).await;
        let mut ws = hyper_util::rt::TokioIo::new(ws);
        // Spliced both ways before shutdown begins.
        ws.write_all(b"hello").await.unwrap();
        let mut buf = [0; 5];
        ws.read_exact(&mut buf).await.unwrap();
        // Shutdown waits out the grace period for the WebSocket, then drops it.
        let (_, closed) = tokio::join!(p.shutdown(), closed_by_the_proxy(&mut ws));
        assert!(closed, "a WebSocket outlived the proxy's shutdown");
        task.abort();
    })
    .await;
}

#[tokio::test]
async fn websocket_over_h2_reaches_an_http1_origin_and_echoes() {
    bounded(async {
        use bytes::Bytes;
        use http_body_util::Empty;
        use hyper_util::rt::{TokioExecutor, TokioIo};
        let (p, task, stream) = proxy_before_echo_origin().await;
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let connect = || websocket_connect(&[("cookie", "a=1"), ("cookie", "b=2")]);
        let resp = send_extended_connect(&mut sender, connect).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers().get("x-origin-saw-method").unwrap(), "GET");
        // HTTP/2 names the host in :authority alone.
        assert_eq!(resp.headers().get("x-origin-saw-xfh").unwrap(), "ws.test");
        assert_eq!(
            resp.headers().get("x-origin-saw-host").unwrap(),
            "origin.internal"
        );
        // One Cookie field for HTTP/1.1 (RFC 9113 §8.2.3).
        assert_eq!(
            resp.headers().get("x-origin-saw-cookies").unwrap(),
            "a=1; b=2"
        );
        assert!(resp.headers().get("sec-websocket-accept").is_none());
        let upgraded = hyper::upgrade::on(resp)
            .await
            .expect("the h2 stream opened");
        echo_round_trips(upgraded, &[b"ping", b"over h2"]).await;
        // An origin whose accept does not prove it read the key: 502.
        let mut req = connect();
        *req.uri_mut() = "http://ws.test/bad-accept".parse().unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 502);
        // A CONNECT that is not a WebSocket asks for a tunnel: refused.
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri("ws.test:443")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert!(resp.status().is_client_error(), "{}", resp.status());
        p.shutdown().await;
        task.abort();
    })
    .await;
}

// ============================================================ hot reload

fn two_backends(a: &Origin, b: &Origin, target: &str) -> String {
    format!(
        r#"
backend a {{ server "{}" }}
backend b {{ server "{}" }}
rule all {{ route {target} cache off }}
"#,
        a.addr, b.addr
    )
}

#[tokio::test]
async fn reload_with_a_good_policy_changes_routing() {
    bounded(async {
        let a = Origin::start(|_| reply(200, &[], "a")).await;
        let b = Origin::start(|_| reply(200, &[], "b")).await;
        let p = proxy(&two_backends(&a, &b, "a")).await;
        assert_eq!(get(addr(&p), "/", &[]).await.text(), "a");
        p.reload(load(&two_backends(&a, &b, "b"))).await.unwrap();
        assert_eq!(get(addr(&p), "/", &[]).await.text(), "b");
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn reload_applies_new_http_limits_to_a_kept_listener() {
    bounded(async {
        let origin = Origin::start(|s| reply(200, &[], format!("{} bytes", s.body.len()))).await;
        let rules = "rule all { route app cache off }";
        let p = proxy(&policy_for(&origin, rules)).await;
        let listener = addr(&p);
        let body = vec![b'x'; 100];
        let before = send(listener, "POST", "/up", &[], body.clone()).await;
        assert_eq!(before.status, 200, "{}", before.text());
        let tighter = format!("http {{ max_body 10B }}\n{}", policy_for(&origin, rules));
        p.reload(load(&tighter)).await.unwrap();
        assert_eq!(addr(&p), listener, "the listener is kept, not rebound");
        let after = send(listener, "POST", "/up", &[], body).await;
        assert_eq!(after.status, 413);
        assert_eq!(origin.count(), 1);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn reload_of_a_broken_file_keeps_the_running_policy() {
    bounded(async {
        let a = Origin::start(|_| reply(200, &[], "a")).await;
        let b = Origin::start(|_| reply(200, &[], "b")).await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("site.policy");
        let text = format!("listen \"127.0.0.1:0\"\n{}", two_backends(&a, &b, "a"));
        std::fs::write(&path, &text).unwrap();
        let p = proxy_bare(&text, Some(path.clone())).await;
        assert_eq!(get(addr(&p), "/", &[]).await.text(), "a");

        std::fs::write(&path, text.replace("route a", "route nowhere")).unwrap();
        let err = p
            .reload_file()
            .await
            .expect_err("a broken policy is refused");
        assert!(err.to_string().contains("nowhere"), "{err}");
        assert_eq!(get(addr(&p), "/", &[]).await.text(), "a");

        std::fs::write(&path, text.replace("route a", "route b")).unwrap();
        p.reload_file().await.unwrap();
        assert_eq!(get(addr(&p), "/", &[]).await.text(), "b");
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn reloads_under_load_lose_no_request() {
    bounded(async {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let a = Origin::start(|_| reply(200, &[], "a")).await;
        let b = Origin::start(|_| reply(200, &[], "b")).await;
        let p = proxy(&two_backends(&a, &b, "a")).await;
        let target = addr(&p);
        let stop = Arc::new(AtomicBool::new(false));
        let mut clients = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let stop = stop.clone();
            clients.spawn(async move {
                let mut seen = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let got = get(target, "/", &[]).await;
                    assert_eq!(got.status, 200, "{}", got.text());
                    seen.push(got.text());
                }
                seen
            });
        }
        for i in 0..10 {
            let to = if i % 2 == 0 { "b" } else { "a" };
            p.reload(load(&two_backends(&a, &b, to))).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.store(true, Ordering::SeqCst);
        let mut total = Vec::new();
        while let Some(r) = clients.join_next().await {
            total.extend(r.expect("a client failed a request"));
        }
        assert!(total.len() >= 20, "only {} requests", total.len());
        assert!(total.iter().any(|t| t == "a") && total.iter().any(|t| t == "b"));
        p.shutdown().await;
    })
    .await;
}

/// A reload that replaces a backend's pool stops its health checks at once,
/// even while a long response through the old pool keeps it alive: the
/// server the reload removed is probed no more.
#[tokio::test]
async fn a_replaced_pool_stops_probing_while_a_long_response_holds_it() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    bounded(async {
        let a = Origin::start(|_| reply(200, &[], "a")).await;
        let b = Origin::start(|_| reply(200, &[], "b")).await;
        let big = Origin::start(|_| reply(200, &[], vec![b'x'; 32 << 20])).await;
        let policy = |servers: &str| {
            format!(
                r#"
backend app {{
{servers}
  health get "/healthz" every 100ms timeout 50ms rise 1 fall 1
}}
backend big {{ server "{}" }}
rule download when path == "/big" {{ route big cache off }}
rule all {{ route app cache off }}
"#,
                big.addr
            )
        };
        let both = format!("  server \"{}\"\n  server \"{}\"", a.addr, b.addr);
        let p = proxy(&policy(&both)).await;
        eventually("a probed", || a.count_path("/healthz") >= 2).await;
        // A download the client stops reading: it stays in flight.
        let mut client = tokio::net::TcpStream::connect(addr(&p)).await.unwrap();
        client
            .write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut first = [0u8; 4096];
        let n = client.read(&mut first).await.unwrap();
        assert!(first[..n].starts_with(b"HTTP/1.1 200"));
        p.reload(load(&policy(&format!("  server \"{}\"", b.addr))))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let probed = a.count_path("/healthz");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            a.count_path("/healthz"),
            probed,
            "the removed server is still probed"
        );
        assert_eq!(get(addr(&p), "/", &[]).await.text(), "b");
        drop(client);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn reload_binds_added_listeners_and_closes_removed_ones() {
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[], "ok")).await;
        let rules = policy_for(&origin, "rule all { route app cache off }");
        let p = proxy_bare(&format!("listen \"127.0.0.1:0\"\n{rules}"), None).await;
        let first = addr(&p);
        assert_eq!(get(first, "/", &[]).await.status, 200);

        let port = closed_addr();
        p.reload(load(&format!(
            "listen \"127.0.0.1:0\"\nlisten \"{port}\"\n{rules}"
        )))
        .await
        .unwrap();
        assert_eq!(p.listen_addrs(), vec![first, port]);
        assert_eq!(get(port, "/", &[]).await.status, 200);
        assert_eq!(get(first, "/", &[]).await.status, 200);

        p.reload(load(&format!("listen \"{port}\"\n{rules}")))
            .await
            .unwrap();
        assert_eq!(p.listen_addrs(), vec![port]);
        assert!(
            tokio::net::TcpStream::connect(first).await.is_err(),
            "the removed listener still accepts"
        );
        assert_eq!(get(port, "/", &[]).await.status, 200);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_reload_moves_a_listener_between_overlapping_addresses() {
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[], "ok")).await;
        let rules = policy_for(&origin, "rule all { route app cache off }");
        let port = closed_addr().port();
        let local: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let p = proxy_bare(&format!("listen \":{port}\"\n{rules}"), None).await;
        assert_eq!(get(local, "/", &[]).await.status, 200);

        // `0.0.0.0:P` holds `127.0.0.1:P` too: the narrower one can be bound
        // only once the wider one has let its socket go, and back.
        let narrow = format!("listen \"127.0.0.1:{port}\"\n{rules}");
        p.reload(load(&narrow))
            .await
            .expect("127.0.0.1 replaces 0.0.0.0");
        assert_eq!(p.listen_addrs(), vec![local]);
        assert_eq!(get(local, "/", &[]).await.status, 200);
        let wide = format!("listen \"0.0.0.0:{port}\"\n{rules}");
        p.reload(load(&wide))
            .await
            .expect("0.0.0.0 replaces 127.0.0.1");
        assert_eq!(p.listen_addrs()[0].port(), port);
        assert_eq!(get(local, "/", &[]).await.status, 200);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_reload_returns_while_a_removed_listener_drains() {
    bounded(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // An origin that answers its one request only when told to.
        let origin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin_addr = origin.local_addr().unwrap();
        let (arrived, request_in) = tokio::sync::oneshot::channel::<()>();
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let (mut tcp, _) = origin.accept().await.unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match tcp.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let _ = arrived.send(());
            let _ = released.await;
            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nconnection: close\r\n\r\nlate";
            let _ = tcp.write_all(answer).await;
        });
        let rules = format!(
            "http {{ shutdown_grace 60s }}\nbackend app {{ server \"{origin_addr}\" }}\nrule all {{ route app cache off }}\n"
        );
        let (keep, gone) = (closed_addr(), closed_addr());
        let p = proxy_bare(&format!("listen \"{keep}\"\nlisten \"{gone}\"\n{rules}"), None).await;
        let in_flight = tokio::spawn(async move { get(gone, "/slow", &[]).await });
        request_in.await.unwrap();

        // The request on the removed listener is held by the origin: the
        // reload (and so a signal after it) does not wait for it.
        let reload = p.reload(load(&format!("listen \"{keep}\"\n{rules}")));
        tokio::time::timeout(Duration::from_secs(5), reload)
            .await
            .expect("the reload waited for the removed listener to drain")
            .unwrap();
        assert_eq!(p.listen_addrs(), vec![keep]);
        assert!(
            tokio::net::TcpStream::connect(gone).await.is_err(),
            "the removed listener still accepts"
        );
        // The request still finishes, and shutdown waits for it.
        let shutdown = tokio::spawn(async move { p.shutdown().await });
        release.send(()).unwrap();
        let got = in_flight.await.unwrap();
        assert_eq!((got.status.as_u16(), got.text()), (200, "late".into()));
        shutdown.await.unwrap();
        task.abort();
    })
    .await;
}

#[tokio::test]
async fn a_reload_that_cannot_bind_keeps_every_listener() {
    bounded(async {
        let a = Origin::start(|_| reply(200, &[], "a")).await;
        let b = Origin::start(|_| reply(200, &[], "b")).await;
        let text = format!("listen \"127.0.0.1:0\"\n{}", two_backends(&a, &b, "a"));
        let p = proxy_bare(&text, None).await;
        let before = p.listen_addrs();
        assert_eq!(get(before[0], "/", &[]).await.text(), "a");

        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let busy = taken.local_addr().unwrap();
        let with_busy = format!(
            "listen \"127.0.0.1:0\"\nlisten \"{busy}\"\n{}",
            two_backends(&a, &b, "b")
        );
        assert!(p.reload(load(&with_busy)).await.is_err(), "{busy} is taken");
        assert_eq!(
            p.listen_addrs(),
            before,
            "the failed reload lost a listener"
        );
        assert_eq!(get(before[0], "/", &[]).await.text(), "a");

        let fine = format!("listen \"127.0.0.1:0\"\n{}", two_backends(&a, &b, "b"));
        p.reload(load(&fine)).await.unwrap();
        assert_eq!(p.listen_addrs(), before);
        assert_eq!(get(before[0], "/", &[]).await.text(), "b");
        tokio::time::timeout(Duration::from_secs(5), p.shutdown())
            .await
            .expect("shutdown stops every listener");
        assert!(tokio::net::TcpStream::connect(before[0]).await.is_err());
        drop(taken);
    })
    .await;
}

/// The live pool of the proxy's first backend.
fn first_pool(p: &portico::run::Running) -> std::sync::Arc<portico::upstream::Pool> {
    match &p.gateway().current().backends[0] {
        portico::proxy::phases::BackendRuntime::Pool(pool) => pool.clone(),
        portico::proxy::phases::BackendRuntime::Static(_) => panic!("a static backend"),
    }
}

#[tokio::test]
async fn reload_that_changes_a_backend_keeps_its_dead_server_out() {
    bounded(async {
        let a = Origin::start(|_| reply(200, &[], "a")).await;
        let b = Origin::start(|_| reply(200, &[], "b")).await;
        let dead = closed_addr();
        // One request to the dead server would eject it for a minute.
        let policy = |servers: &[std::net::SocketAddr]| {
            let lines: String = servers
                .iter()
                .map(|s| format!("  server \"{s}\"\n"))
                .collect();
            format!(
                r#"
backend app {{
{lines}  health get "/healthz" every 300ms timeout 200ms rise 1 fall 2
  eject_after 1
  eject_for 60s
}}
rule all {{ route app cache off }}
"#
            )
        };
        let p = proxy(&policy(&[a.addr, dead])).await;
        let before = first_pool(&p);
        eventually("the dead server marked down", || !before.health().is_up(1)).await;

        p.reload(load(&policy(&[a.addr, dead, b.addr])))
            .await
            .unwrap();
        let after = first_pool(&p);
        assert!(
            !std::sync::Arc::ptr_eq(&before, &after),
            "a changed backend gets a new pool"
        );
        assert!(!after.health().is_up(1), "the dead server is up again");
        let mut bodies = Vec::new();
        for _ in 0..20 {
            let got = get(addr(&p), "/", &[]).await;
            assert_eq!(got.status, 200, "{}", got.text());
            bodies.push(got.text());
        }
        assert!(
            !after.health().is_ejected(1),
            "a request was tried on the dead server"
        );
        assert!(
            bodies.iter().any(|t| t == "b"),
            "the added server: {bodies:?}"
        );
        assert_eq!(a.count_path("/") + b.count_path("/"), 20);
        p.shutdown().await;
    })
    .await;
}

/// What a plain HTTP/1.1 client gets from `addr`: the first bytes of the
/// answer, empty when the server closes without answering in HTTP.
async fn plain_http_answer(addr: std::net::SocketAddr) -> Vec<u8> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: a.test\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer));
    // A reset counts as no answer too.
    let _ = read
        .await
        .expect("the listener neither answered nor closed");
    answer
}

#[tokio::test]
async fn reload_switches_a_listener_between_plain_and_tls_at_the_same_address() {
    bounded(async {
        use tls_pki::*;
        let arrived = std::sync::Arc::new(tokio::sync::Notify::new());
        let signal = arrived.clone();
        let slow = Origin::start_with_delay(Duration::from_millis(500), move |_| {
            signal.notify_one();
            reply(200, &[], "slow")
        })
        .await;
        let fast = Origin::start(|_| reply(200, &[], "fast")).await;
        let pki = Pki::new();
        let (cert, key, _) = pki.leaf("a", "a.test");
        let port = closed_addr().port();
        let backends = format!(
            r#"
backend slow {{ server "{}" }}
backend fast {{ server "{}" }}
rule slow when path == "/slow" {{ route slow cache off }}
rule rest {{ route fast cache off }}
"#,
            slow.addr, fast.addr
        );
        let plain = format!("listen \"127.0.0.1:{port}\"\n{backends}");
        let tls = format!(
            "listen \"localhost:{port}\" tls {{ cert \"{}\" key \"{}\" }}\n{backends}",
            cert.display(),
            key.display()
        );
        let p = proxy_bare(&plain, None).await;
        let at = addr(&p);
        assert_eq!(at.port(), port);
        assert_eq!(get(at, "/", &[]).await.text(), "fast");

        // A request in flight on the plain listener when it turns TLS.
        let in_flight = tokio::spawn(async move { get(at, "/slow", &[]).await });
        arrived.notified().await;
        p.reload(load(&tls))
            .await
            .expect("plain to TLS at one address");
        let got = in_flight.await.unwrap();
        assert_eq!((got.status.as_u16(), got.text()), (200, "slow".into()));
        assert_eq!(p.listen_addrs(), vec![at]);
        let stream = pki.connect(at, "a.test", &[b"http/1.1"]).await;
        assert_eq!(h1_get(stream, "a.test", "/").await, (200, "fast".into()));
        let answer = plain_http_answer(at).await;
        assert!(
            !answer.starts_with(b"HTTP/"),
            "plain HTTP still served: {}",
            String::from_utf8_lossy(&answer)
        );

        // And back, under the other spelling of the address.
        p.reload(load(&plain))
            .await
            .expect("TLS to plain at one address");
        assert_eq!(p.listen_addrs(), vec![at]);
        assert_eq!(get(at, "/", &[]).await.text(), "fast");
        assert!(
            pki.try_connect(at, "a.test", &[b"http/1.1"]).await.is_err(),
            "TLS still served"
        );

        // A new spelling of the same address keeps the listener.
        p.reload(load(&plain.replace("127.0.0.1:", "localhost:")))
            .await
            .expect("the same address, spelled otherwise");
        assert_eq!(p.listen_addrs(), vec![at]);
        assert_eq!(get(at, "/", &[]).await.text(), "fast");
        p.shutdown().await;
    })
    .await;
}

// ============================================================ shutdown and admin

#[tokio::test]
async fn shutdown_finishes_a_slow_request_and_refuses_new_connections() {
    bounded(async {
        let arrived = std::sync::Arc::new(tokio::sync::Notify::new());
        let signal = arrived.clone();
        let origin = Origin::start_with_delay(Duration::from_millis(800), move |_| {
            signal.notify_one();
            reply(200, &[], "slow but sure")
        })
        .await;
        let p = proxy(&policy_for(&origin, "rule all { route app cache off }")).await;
        let a = addr(&p);
        let in_flight = tokio::spawn(async move { get(a, "/slow", &[]).await });
        // The script runs before the origin's delay: the request is in flight.
        arrived.notified().await;
        p.shutdown().await;
        let got = in_flight.await.unwrap();
        assert_eq!(got.status, 200);
        assert_eq!(got.text(), "slow but sure");
        assert!(
            tokio::net::TcpStream::connect(a).await.is_err(),
            "a new connection was accepted after shutdown"
        );
    })
    .await;
}

/// Everything written through it, for capturing log lines.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// Captures what this test binary logs at INFO and above, into one
    /// buffer every test shares (each looks for its own paths in it). One
    /// global subscriber, installed once: with a subscriber per test
    /// thread, tests running side by side raced on tracing's cached
    /// interest in the access log's callsite, and a line could go unseen.
    fn start() -> (Captured, ()) {
        static LOGS: std::sync::OnceLock<Captured> = std::sync::OnceLock::new();
        let logs = LOGS.get_or_init(|| {
            let logs = Captured::default();
            let writer = logs.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .with_max_level(tracing::Level::INFO)
                .finish();
            tracing::subscriber::set_global_default(subscriber)
                .expect("no other global subscriber in this test binary");
            logs
        });
        (logs.clone(), ())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// The access log line for `path`, if it has been written.
    fn access_line(&self, path: &str) -> Option<String> {
        self.access_lines(path).into_iter().next()
    }

    /// Every access log line for `path` written so far, in order.
    fn access_lines(&self, path: &str) -> Vec<String> {
        let needle = format!(" path={path} ");
        self.text()
            .lines()
            .filter(|l| l.contains("portico::access") && l.contains(&needle))
            .map(str::to_owned)
            .collect()
    }

    /// Waits for the access log line of the request for `path` after the
    /// first `before` of them.
    async fn wait_access_line_after(&self, path: &str, before: usize) -> String {
        eventually(
            &format!("access log line {} for {path}", before + 1),
            || self.access_lines(path).len() > before,
        )
        .await;
        self.access_lines(path).swap_remove(before)
    }

    /// Waits for the access log line for `path`: it is written when the
    /// response body is done, which may be just after the client has it.
    async fn wait_access_line(&self, path: &str) -> String {
        eventually(&format!("the access log line for {path}"), || {
            self.access_line(path).is_some()
        })
        .await;
        self.access_line(path).unwrap()
    }
}

/// The number after `name=` in a plain log line.
fn field_u64(line: &str, name: &str) -> u64 {
    let at = line
        .find(&format!(" {name}="))
        .unwrap_or_else(|| panic!("no {name} in {line}"));
    line[at + name.len() + 2..]
        .split(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} is not a number in {line}"))
}

#[tokio::test]
async fn admin_health_metrics_with_token_and_access_log() {
    let (logs, _guard) = Captured::start();
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[], "ok")).await;
        let p = proxy(&policy_for(&origin, "rule front { route app cache off }")).await;
        assert_eq!(get(addr(&p), "/logged", &[]).await.status, 200);
        let admin = p.admin_addr().expect("admin listener");

        let got = get(admin, "/healthz", &[]).await;
        assert_eq!(got.status, 200);

        let got = get(admin, "/metrics", &[]).await;
        assert_eq!(got.status, 401);
        let got = get(admin, "/metrics", &[("authorization", "Bearer wrong")]).await;
        assert_eq!(got.status, 401);
        let got = get(admin, "/metrics", &[("authorization", "Bearer secret")]).await;
        assert_eq!(got.status, 200);
        assert!(
            got.text().contains("portico_requests_total"),
            "{}",
            got.text()
        );
        p.shutdown().await;
    })
    .await;
    let line = logs
        .access_line("/logged")
        .unwrap_or_else(|| panic!("no access log line in:\n{}", logs.text()));
    for part in [
        "status=200",
        "rule=front",
        "backend=app",
        "method=GET",
        "bytes=2",
        "complete=true",
    ] {
        assert!(line.contains(part), "{part} missing from {line}");
    }
}

#[tokio::test]
async fn admin_answers_another_method_with_405_and_allow() {
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[], "ok")).await;
        let p = proxy(&policy_for(&origin, "rule front { route app cache off }")).await;
        let purge = admin(&p, "GET", "/purge?url=http://test.example/", Some("secret")).await;
        assert_eq!(purge.status, 405);
        assert_eq!(purge.header("allow"), Some("POST"));
        let metrics = admin(&p, "POST", "/metrics", Some("secret")).await;
        assert_eq!(metrics.status, 405);
        assert_eq!(metrics.header("allow"), Some("GET"));
        // Without the token the method is not looked at.
        assert_eq!(admin(&p, "GET", "/purge?url=x", None).await.status, 401);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn admin_takes_the_bearer_scheme_in_any_case() {
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[], "ok")).await;
        let p = proxy(&policy_for(&origin, "rule front { route app cache off }")).await;
        let at = p.admin_addr().expect("admin listener");
        for scheme in ["bearer", "BEARER", "Bearer"] {
            let auth = format!("{scheme} secret");
            let got = get(at, "/metrics", &[("authorization", &auth)]).await;
            assert_eq!(got.status, 200, "{scheme}");
        }
        let got = get(at, "/metrics", &[("authorization", "Basic secret")]).await;
        assert_eq!(got.status, 401);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_reload_changes_the_admin_token() {
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[], "ok")).await;
        let text = |token: &str| {
            format!(
                "admin \"127.0.0.1:0\" token \"{token}\"\n{}",
                policy_for(&origin, "rule front { route app cache off }")
            )
        };
        let p = portico::run::start(
            load(&text("first")),
            None,
            portico::run::Overrides {
                listen: vec!["127.0.0.1:0".into()],
                ..Default::default()
            },
        )
        .await
        .expect("portico starts");
        assert_eq!(
            admin(&p, "GET", "/metrics", Some("first")).await.status,
            200
        );
        p.reload(load(&text("second"))).await.unwrap();
        let old = admin(&p, "GET", "/metrics", Some("first")).await;
        assert_eq!(old.status, 401, "the replaced token still works");
        assert_eq!(
            admin(&p, "GET", "/metrics", Some("second")).await.status,
            200
        );
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn access_log_counts_the_bytes_of_a_chunked_body() {
    let (logs, _guard) = Captured::start();
    bounded(async {
        const LEN: usize = 300_000;
        let (response, body) = chunked_response(LEN, "");
        let origin = RawOrigin::start(response).await;
        let backend = format!(
            "backend app {{\n  server \"{}\"\n}}\nrule all {{ route app cache off }}\n",
            origin.addr
        );
        let p = proxy(&backend).await;
        let got = get(addr(&p), "/logged-chunked", &[]).await;
        assert_eq!(got.status, 200);
        assert_eq!(got.body.len(), LEN);
        assert_eq!(got.body, body);
        let line = logs.wait_access_line("/logged-chunked").await;
        assert_eq!(field_u64(&line, "bytes"), LEN as u64, "{line}");
        assert!(line.contains(" complete=true"), "{line}");
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn access_log_marks_an_h2_stream_reset_behind_a_shut_window_cut_short() {
    let (logs, _guard) = Captured::start();
    bounded(async {
        // A stored 200 KB object: a hit hands its whole body over at once,
        // so the body has nothing left to read long before the client has
        // taken it.
        const LEN: usize = 200_000;
        let origin = Origin::start(|_| {
            reply(
                200,
                &[("cache-control", "public, max-age=600")],
                vec![b'x'; LEN],
            )
        })
        .await;
        let p = proxy(&policy_for(
            &origin,
            "http { send_timeout 300ms }\nrule all { route app cache { ttl 10m } }",
        ))
        .await;
        let filled = get(addr(&p), "/logged-h2-held", &[("host", "h2.test")]).await;
        assert_eq!(filled.body.len(), LEN);
        let (mut sender, _conn) = h2_client(addr(&p), |b| {
            b.initial_stream_window_size(16 * 1024);
        })
        .await;
        let held = sender
            .send_request(h2_request("/logged-h2-held"))
            .await
            .unwrap();
        assert_eq!(held.status(), 200);
        assert!(held.headers()["cache-status"]
            .to_str()
            .unwrap()
            .contains("hit"));
        let line = logs.wait_access_line_after("/logged-h2-held", 1).await;
        assert!(line.contains(" complete=false"), "{line}");
        assert!(field_u64(&line, "bytes") < LEN as u64, "{line}");
        drop(held);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn access_log_marks_a_download_cut_short() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (logs, _guard) = Captured::start();
    bounded(async {
        // An origin that streams a chunked body far larger than any socket
        // buffer, until the proxy stops taking it.
        const LEN: u64 = 64 << 20;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin_addr = listener.local_addr().unwrap();
        let origin = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            if !read_request_head(&mut s).await {
                return;
            }
            let mut out = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
            let chunk = vec![b'x'; 64 * 1024];
            for _ in 0..LEN / chunk.len() as u64 {
                out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                out.extend_from_slice(&chunk);
                out.extend_from_slice(b"\r\n");
                if s.write_all(&out).await.is_err() {
                    return;
                }
                out.clear();
            }
            let _ = s.write_all(b"0\r\n\r\n").await;
        });
        let backend = format!(
            "backend app {{\n  server \"{origin_addr}\"\n}}\nrule all {{ route app cache off }}\n"
        );
        let p = proxy(&backend).await;
        // The client reads the head and some of the body, then goes away.
        let mut client = tokio::net::TcpStream::connect(addr(&p)).await.unwrap();
        client
            .write_all(b"GET /logged-cut-short HTTP/1.1\r\nhost: t.test\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        while got.len() < 100_000 {
            let n = client.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got.starts_with(b"HTTP/1.1 200"));
        drop(client);
        let line = logs.wait_access_line("/logged-cut-short").await;
        assert!(line.contains(" complete=false"), "{line}");
        assert!(line.contains(" status=200"), "{line}");
        let bytes = field_u64(&line, "bytes");
        assert!(bytes > 0 && bytes < LEN, "{line}");
        p.shutdown().await;
        origin.abort();
    })
    .await;
}

// ============================================================ limits that must not be sidestepped

#[tokio::test]
async fn transfer_codings_other_than_one_chunked_are_refused() {
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[], "ok")).await;
        let p = proxy(&policy_for(&origin, "rule all { route app cache off }")).await;
        let a = addr(&p);
        let body = "3\r\nabc\r\n0\r\n\r\n";
        // A coding Portico does not decode would reach the origin as if the
        // body had none (RFC 9112 §6.1: 501); chunked twice is malformed.
        for (codings, status) in [
            ("gzip, chunked", "501"),
            ("chunked, chunked", "400"),
            ("gzip\r\nTransfer-Encoding: chunked", "501"),
        ] {
            let request = format!(
                "POST /up HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: {codings}\r\n\r\n{body}\
                 GET /after HTTP/1.1\r\nHost: a.test\r\n\r\n"
            );
            let out = raw_exchange(a, request.as_bytes(), Duration::from_secs(5)).await;
            assert!(out.starts_with(&format!("HTTP/1.1 {status} ")), "{codings}: {out}");
            assert!(out.contains("connection: close\r\n"), "{codings}: {out}");
            assert_eq!(out.matches("HTTP/1.1 ").count(), 1, "{codings}: {out}");
        }
        assert_eq!(origin.count(), 0);
        // One chunked coding is fine.
        let request = format!(
            "POST /up HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{body}"
        );
        let out = raw_exchange(a, request.as_bytes(), Duration::from_secs(5)).await;
        assert!(out.starts_with("HTTP/1.1 200 "), "{out}");
        assert_eq!(&origin.seen()[0].body[..], b"abc");
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn conflicting_request_framing_smuggles_no_request() {
    bounded(async {
        let origin = Origin::start(|s| reply(200, &[], s.uri.path().to_owned())).await;
        let p = proxy(&policy_for(&origin, "rule all { route app cache off }")).await;
        let a = addr(&p);
        let smuggled = "GET /smuggled HTTP/1.1\r\nHost: a.test\r\n\r\n";
        // Both: chunked wins (RFC 9112 §6.3) and the connection closes after.
        let request = format!(
            "POST /up HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n\
             Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n{smuggled}"
        );
        let out = raw_exchange(a, request.as_bytes(), Duration::from_secs(5)).await;
        assert!(out.starts_with("HTTP/1.1 200 "), "{out}");
        assert!(out.contains("connection: close\r\n"), "{out}");
        assert_eq!(out.matches("HTTP/1.1 ").count(), 1, "{out}");
        // Lengths that differ, or that are not one number: 400.
        for lengths in ["3\r\nContent-Length: 4", "+3", "3 3", "0x3"] {
            let request =
                format!("POST /up HTTP/1.1\r\nHost: a.test\r\nContent-Length: {lengths}\r\n\r\nabcd{smuggled}");
            let out = raw_exchange(a, request.as_bytes(), Duration::from_secs(5)).await;
            assert!(out.starts_with("HTTP/1.1 400 "), "{lengths}: {out}");
            assert_eq!(out.matches("HTTP/1.1 ").count(), 1, "{lengths}: {out}");
        }
        let seen = origin.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(&seen[0].body[..], b"abc");
        p.shutdown().await;
    })
    .await;
}

/// `body` gzip-coded.
fn gzipped(body: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(body).unwrap();
    encoder.finish().unwrap()
}

/// `data` as one chunk and the last chunk.
fn one_chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n0\r\n\r\n");
    out
}

/// An origin that answers every request head on a connection with
/// `response` and keeps the connection open; how many connections it took.
async fn keep_alive_raw_origin(
    response: Vec<u8>,
) -> (
    std::net::SocketAddr,
    Arc<AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    let response = Arc::new(response);
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let response = response.clone();
            tokio::spawn(async move {
                let mut read = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    while let Some(end) = read.windows(4).position(|w| w == b"\r\n\r\n") {
                        read.drain(..end + 4);
                        if stream.write_all(&response).await.is_err() {
                            return;
                        }
                    }
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => read.extend_from_slice(&buf[..n]),
                    }
                }
            });
        }
    });
    (at, connections, task)
}

#[tokio::test]
async fn an_origin_s_transfer_coding_besides_chunked_is_a_502_and_never_stored() {
    bounded(async {
        let coded = gzipped(b"hello, world");
        // RFC 9112 6.1: a coding Portico does not decode, chunked last or
        // ended by closing the connection; chunked twice is malformed.
        let cases = [
            ("gzip, chunked", one_chunk(&coded)),
            ("gzip", coded.clone()),
            ("deflate\r\nTransfer-Encoding: chunked", one_chunk(&coded)),
            ("chunked, chunked", one_chunk(&one_chunk(b"hello"))),
        ];
        for (codings, body) in cases {
            let mut response = format!(
                "HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nContent-Type: text/plain\r\n\
                 Transfer-Encoding: {codings}\r\n\r\n"
            )
            .into_bytes();
            response.extend_from_slice(&body);
            let origin = RawOrigin::start(response).await;
            let p = proxy(&format!(
                "backend app {{\n  server \"{}\"\n}}\nrule all {{ route app cache {{ ttl 10m }} }}\n",
                origin.addr
            ))
            .await;
            for _ in 0..2 {
                let got = get(addr(&p), "/coded", &[]).await;
                assert_eq!(got.status, 502, "{codings}: {}", got.text());
                assert!(got.text().starts_with("502 Bad Gateway\n"), "{codings}");
                assert!(!got.is_hit(), "{codings}: {}", got.cache_status());
            }
            assert_eq!(origin.count(), 2, "{codings}: the refused response was stored");
            p.shutdown().await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_connection_that_brought_a_refused_transfer_coding_is_not_reused() {
    bounded(async {
        let mut coded = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n".to_vec();
        coded.extend_from_slice(&one_chunk(&gzipped(b"hello")));
        let mut plain = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        plain.extend_from_slice(&one_chunk(b"hello"));
        for (response, status, opened) in [(plain, 200, 1), (coded, 502, 3)] {
            let (at, connections, origin) = keep_alive_raw_origin(response).await;
            let p = proxy(&format!(
                "backend app {{\n  server \"{at}\"\n}}\nrule all {{ route app cache off }}\n"
            ))
            .await;
            for _ in 0..3 {
                let got = get(addr(&p), "/", &[]).await;
                assert_eq!(got.status, status, "{}", got.text());
            }
            assert_eq!(connections.load(Ordering::SeqCst), opened);
            p.shutdown().await;
            origin.abort();
        }
    })
    .await;
}

#[tokio::test]
async fn a_refused_upgrade_with_a_transfer_coding_besides_chunked_is_a_502() {
    bounded(async {
        let mut response =
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                .to_vec();
        response.extend_from_slice(&one_chunk(&gzipped(b"no upgrade here")));
        let origin = RawOrigin::start(response).await;
        let p = proxy(&format!(
            "backend app {{\n  server \"{}\"\n}}\nrule all {{ route app cache off }}\n",
            origin.addr
        ))
        .await;
        let out = raw_exchange(
            addr(&p),
            b"GET /ws HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            Duration::from_secs(5),
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 502 "), "{out}");
        assert_eq!(origin.count(), 1);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn connect_is_refused_with_405_and_allow() {
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[], "ok")).await;
        let p = proxy(&policy_for(&origin, "rule all { route app cache off }")).await;
        let out = raw_exchange(
            addr(&p),
            b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\nConnection: close\r\n\r\n",
            Duration::from_secs(5),
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 405 "), "{out}");
        assert!(out.contains("\r\nallow: "), "{out}");
        assert_eq!(origin.count(), 0);
        p.shutdown().await;
    })
    .await;
}

/// Requests the listener refuses before any rule sees them still get their
/// access log line.
#[tokio::test]
async fn requests_refused_by_the_listener_are_logged() {
    bounded(async {
        let (logs, _guard) = Captured::start();
        let origin = Origin::start(|_| reply(200, &[], "ok")).await;
        let p = proxy(&format!(
            "http {{ max_body 1KiB }}\n{}",
            policy_for(&origin, "rule all { route app cache off }")
        ))
        .await;
        let a = addr(&p);
        let got = send(a, "POST", "/refused-too-large", &[], vec![b'x'; 4096]).await;
        assert_eq!(got.status, 413);
        let line = logs.wait_access_line("/refused-too-large").await;
        assert!(line.contains("status=413"), "{line}");
        assert!(line.contains("rule=- backend=- cache=\"refused\""), "{line}");

        let request = "POST /refused-coding HTTP/1.1\r\nhost: t.test\r\ntransfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n";
        let answer = raw_exchange(a, request.as_bytes(), Duration::from_secs(5)).await;
        let status = &answer[9..12];
        assert!(status.starts_with('4') || status.starts_with('5'), "{answer}");
        let line = logs.wait_access_line("/refused-coding").await;
        assert!(line.contains(&format!("status={status}")), "{line}");
        assert_eq!(origin.count(), 0);
        p.shutdown().await;
    })
    .await;
}

/// A rule's `max_body` replaces `http`'s for its requests, above it as well
/// as below; rules without one keep `http`'s, declared or streamed.
#[tokio::test]
async fn rule_max_body_can_raise_the_http_limit() {
    bounded(async {
        let origin = Origin::start(|s| reply(200, &[], format!("got {}", s.body.len()))).await;
        let rules = r#"
rule upload when path ^= "/upload" { route app cache off max_body 64KiB }
rule all { route app cache off }"#;
        let p = proxy(&format!(
            "http {{ max_body 1KiB }}\n{}",
            policy_for(&origin, rules)
        ))
        .await;
        let a = addr(&p);
        let got = send(a, "POST", "/upload/a", &[], vec![b'x'; 8192]).await;
        assert_eq!(got.status, 200);
        assert_eq!(got.text(), "got 8192");
        let got = send(a, "POST", "/other", &[], vec![b'x'; 8192]).await;
        assert_eq!(got.status, 413);
        let got = send(a, "POST", "/upload/b", &[], vec![b'x'; 70_000]).await;
        assert_eq!(got.status, 413);
        for (path, expect) in [("/upload/c", "HTTP/1.1 200"), ("/other", "HTTP/1.1 413")] {
            let chunk = "x".repeat(8000);
            let request = format!(
                "POST {path} HTTP/1.1\r\nhost: t.test\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
                chunk.len()
            );
            let answer = raw_exchange(a, request.as_bytes(), Duration::from_secs(5)).await;
            assert!(answer.starts_with(expect), "{path}: {answer}");
        }
        assert!(
            origin.seen().iter().all(|s| s.uri.path().starts_with("/upload") || s.body.len() <= 1024),
            "a request without a rule limit went over http's"
        );
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn rule_max_body_also_bounds_a_chunked_body() {
    bounded(async {
        let origin = Origin::start(|s| reply(200, &[], format!("got {}", s.body.len()))).await;
        let p = proxy(&policy_for(
            &origin,
            "rule all { route app cache off max_body 1KiB }",
        ))
        .await;
        let chunk = "x".repeat(4000);
        let request = format!(
            "POST /upload HTTP/1.1\r\nhost: t.test\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
            chunk.len()
        );
        let answer = raw_exchange(addr(&p), request.as_bytes(), Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(
            origin.seen().iter().all(|s| s.body.len() <= 1024),
            "the origin received more than max_body"
        );
        p.shutdown().await;
    })
    .await;
}

/// A backend of one server that two consecutive failures eject for a
/// minute, behind a rule that takes at most 1 KiB of body.
fn ejecting_after_two(origin: &Origin) -> String {
    format!(
        r#"
backend app {{
  server "{}"
  eject_after 2
  eject_for 60s
}}
rule all {{ route app cache off max_body 1KiB }}
"#,
        origin.addr
    )
}

#[tokio::test]
async fn bodies_over_the_limit_do_not_eject_a_healthy_server() {
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[], "ok")).await;
        let p = proxy(&ejecting_after_two(&origin)).await;
        // Each outgrows the limit while it streams, after the server took
        // the head: the try fails on the client's side.
        let chunk = "x".repeat(4000);
        let too_large = format!(
            "POST /upload HTTP/1.1\r\nhost: t.test\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
            chunk.len()
        );
        for _ in 0..3 {
            let answer = raw_exchange(addr(&p), too_large.as_bytes(), Duration::from_secs(5)).await;
            assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        }
        let got = get(addr(&p), "/after", &[]).await;
        assert_eq!(got.status, 200, "{}", got.text());
        assert_eq!(origin.count_path("/after"), 1);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn uploads_the_client_abandons_do_not_eject_a_healthy_server() {
    use tokio::io::AsyncWriteExt as _;
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[], "ok")).await;
        let p = proxy(&ejecting_after_two(&origin)).await;
        for n in 1..=2 {
            let mut s = tokio::net::TcpStream::connect(addr(&p)).await.unwrap();
            s.write_all(b"POST /upload HTTP/1.1\r\nhost: t.test\r\ncontent-length: 1000\r\n\r\n")
                .await
                .unwrap();
            s.write_all(&[b'x'; 300]).await.unwrap();
            drop(s);
            // The origin, sent the head and part of the body, sees the
            // upload end when the proxy gives it up.
            eventually("the origin to see the upload end", || origin.count() >= n).await;
        }
        let got = get(addr(&p), "/after", &[]).await;
        assert_eq!(got.status, 200, "{}", got.text());
        assert_eq!(origin.count_path("/after"), 1);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn uploads_the_client_stalls_get_408_and_do_not_eject_a_healthy_server() {
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[], "ok")).await;
        let p = proxy(&format!(
            r#"
backend app {{
  server "{}"
  eject_after 2
  eject_for 60s
  first_byte_timeout 300ms
}}
rule all {{ route app cache off }}
"#,
            origin.addr
        ))
        .await;
        let mut stalled =
            b"POST /upload HTTP/1.1\r\nhost: t.test\r\ncontent-length: 1000\r\n\r\n".to_vec();
        stalled.extend_from_slice(&[b'x'; 300]);
        for _ in 0..3 {
            // The client keeps the connection open and sends no more: the
            // wait is for the client, and the origin is not to blame.
            let out = raw_exchange(addr(&p), &stalled, Duration::from_secs(5)).await;
            assert!(out.starts_with("HTTP/1.1 408 "), "{out}");
            assert!(out.contains("connection: close\r\n"), "{out}");
        }
        let got = get(addr(&p), "/after", &[]).await;
        assert_eq!(got.status, 200, "{}", got.text());
        assert_eq!(origin.count_path("/after"), 1);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn an_h2c_upgrade_is_not_passed_on() {
    bounded(async {
        // An origin that would take the upgrade, after which every request
        // on the connection would bypass the rules.
        let origin = Origin::start(|s| {
            if s.headers.contains_key("upgrade") {
                reply(101, &[("connection", "upgrade"), ("upgrade", "h2c")], "")
            } else {
                reply(200, &[], "plain")
            }
        })
        .await;
        let p = proxy(&policy_for(&origin, "rule all { route app cache off }")).await;
        let out = raw_exchange(
            addr(&p),
            b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade, HTTP2-Settings, close\r\n\
              Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n",
            Duration::from_secs(5),
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 200 "), "{out}");
        assert!(out.ends_with("plain"), "{out}");
        let seen = &origin.seen()[0];
        assert!(seen.headers.get("upgrade").is_none());
        assert!(seen.headers.get("http2-settings").is_none());
        p.shutdown().await;
    })
    .await;
}

/// An HTTP/1.0 request cannot switch protocols: its Upgrade is ignored
/// (RFC 9110 §7.8) and it is served as a plain request, where it used to be
/// sent on as an upgrade and end in a 502.
#[tokio::test]
async fn an_http_1_0_upgrade_is_served_as_a_plain_request() {
    bounded(async {
        let origin = Origin::start(|s| {
            if s.headers.contains_key("upgrade") {
                reply(
                    101,
                    &[("connection", "upgrade"), ("upgrade", "websocket")],
                    "",
                )
            } else {
                reply(200, &[], "plain")
            }
        })
        .await;
        let p = proxy(&policy_for(&origin, "rule all { route app cache off }")).await;
        let out = raw_exchange(
            addr(&p),
            b"GET /ws HTTP/1.0\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            Duration::from_secs(5),
        )
        .await;
        assert!(
            out.starts_with("HTTP/1.0 200 ") || out.starts_with("HTTP/1.1 200 "),
            "{out}"
        );
        assert!(out.ends_with("plain"), "{out}");
        let seen = &origin.seen()[0];
        assert!(seen.headers.get("upgrade").is_none());
        p.shutdown().await;
    })
    .await;
}

/// An upgrade the origin does not take is answered like any request: the
/// rule's response edits hold (an Upgrade field cannot side-step them), and
/// a request with a body and an Upgrade goes as the plain request it also
/// is, its body with it.
#[tokio::test]
async fn an_upgrade_the_origin_ignores_is_answered_like_any_request() {
    bounded(async {
        let origin = Origin::start(|s| {
            reply(
                200,
                &[("x-secret", "internal")],
                format!("{} {}", s.method, String::from_utf8_lossy(&s.body)),
            )
        })
        .await;
        let p = proxy(&policy_for(
            &origin,
            r#"rule all { route app cache off response_header remove "X-Secret" }"#,
        ))
        .await;
        let upgrade = [("upgrade", "foo"), ("connection", "upgrade")];
        let got = send(addr(&p), "GET", "/x", &upgrade, "").await;
        assert_eq!((got.status.as_u16(), got.text()), (200, "GET ".to_owned()));
        assert!(
            got.header("x-secret").is_none(),
            "the rule's edit was side-stepped"
        );
        let started = std::time::Instant::now();
        let got = send(addr(&p), "POST", "/x", &upgrade, "hello").await;
        assert_eq!(
            (got.status.as_u16(), got.text()),
            (200, "POST hello".to_owned())
        );
        assert!(got.header("x-secret").is_none());
        assert!(started.elapsed() < Duration::from_secs(5));
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_denied_upgrade_gets_the_rules_response_headers() {
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[], "ok")).await;
        let p = proxy(&policy_for(
            &origin,
            r#"
rule no_sockets when path ^= "/ws" { deny 403 response_header set "X-Why" "no sockets" }
rule all { route app cache off }
"#,
        ))
        .await;
        let upgrade = [("connection", "upgrade"), ("upgrade", "websocket")];
        let got = get(addr(&p), "/ws", &upgrade).await;
        assert_eq!(got.status, 403);
        assert_eq!(got.header("x-why"), Some("no sockets"));
        assert_eq!(origin.count(), 0);
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn an_upgrade_header_does_not_sidestep_the_throttle() {
    bounded(async {
        let (origin, p) = throttled_to_two().await;
        let a = addr(&p);
        let upgrade = [("connection", "upgrade"), ("upgrade", "websocket")];
        let statuses: Vec<u16> = {
            let mut v = Vec::new();
            for _ in 0..5 {
                v.push(get(a, "/", &upgrade).await.status.as_u16());
            }
            v
        };
        assert_eq!(
            statuses.iter().filter(|s| **s == 429).count(),
            3,
            "{statuses:?}"
        );
        assert_eq!(origin.count(), 2);
        p.shutdown().await;
    })
    .await;
}

/// A client that goes away while the origin's body is quiet (an event
/// stream between events) is noticed at once: the upstream connection is
/// closed, not held until the origin next writes.
#[tokio::test]
async fn a_client_gone_during_a_quiet_stream_releases_the_upstream() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    bounded(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin_addr = listener.local_addr().unwrap();
        let released = Arc::new(AtomicUsize::new(0));
        let seen = released.clone();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            if !read_request_head(&mut s).await {
                return;
            }
            let mut buf = [0u8; 4096];
            let first = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                transfer-encoding: chunked\r\n\r\n8\r\ndata: 1\n\r\n";
            s.write_all(first).await.unwrap();
            // Quiet from now on: only the proxy closing ends this read.
            if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await
            {
                seen.fetch_add(1, Ordering::SeqCst);
            }
        });
        let p = proxy(&format!(
            "backend app {{\n  server \"{origin_addr}\"\n}}\nrule all {{ route app cache off }}\n"
        ))
        .await;
        let mut client = tokio::net::TcpStream::connect(addr(&p)).await.unwrap();
        client
            .write_all(b"GET /events HTTP/1.1\r\nhost: t.test\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&got).contains("data: 1") {
            let n = client.read(&mut buf).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        drop(client);
        eventually("the upstream connection closed", || {
            released.load(Ordering::SeqCst) == 1
        })
        .await;
        p.shutdown().await;
    })
    .await;
}
