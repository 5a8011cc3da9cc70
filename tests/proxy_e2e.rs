//! The reverse-proxy promises, end to end: a real origin on 127.0.0.1, Portico
//! started in-process from policy text, and a real client. Each scenario
//! reads as: the servers, the policy, the requests, what must be seen.

mod common;
use common::*;

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
        assert_eq!(origin.count(), 1, "synthetic answers never reach the origin");
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
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
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

// ============================================================ header hygiene

#[tokio::test]
async fn hop_by_hop_headers_stay_on_their_hop() {
    bounded(async {
        let origin = Origin::start(|_| {
            reply(
                200,
                &[("connection", "x-origin-hop"), ("x-origin-hop", "1"), ("keep-alive", "timeout=5")],
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
                ("x-end-to-end", "kept"),
            ],
        )
        .await;
        assert_eq!(got.status, 200);
        let seen = &origin.seen()[0];
        for name in ["x-secret", "keep-alive", "te", "upgrade"] {
            assert!(seen.headers.get(name).is_none(), "{name} reached the origin");
        }
        assert_eq!(seen.headers.get("x-end-to-end").unwrap(), "kept");
        assert!(got.header("x-origin-hop").is_none());
        assert!(got.header("keep-alive").is_none());
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
        assert!(seen.headers.get("via").unwrap().to_str().unwrap().contains("portico"));
        assert!(got.header("via").unwrap().contains("portico"));
        assert_eq!(got.header("server"), Some("origin/1.0"));
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
