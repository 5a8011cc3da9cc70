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
            let tcp = TcpStream::connect(addr).await.unwrap();
            connector
                .connect(ServerName::try_from(sni.to_owned()).unwrap(), tcp)
                .await
                .unwrap()
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
            let host = s.headers.get("host").and_then(|v| v.to_str().ok()).unwrap_or("");
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
        assert_eq!(h1_get(stream, "a.test", "/one").await, (200, "/one a.test".into()));

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
        p.shutdown().await;
    })
    .await;
}
