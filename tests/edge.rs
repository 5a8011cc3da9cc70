//! The client edge end to end: real listeners on 127.0.0.1 port 0, real
//! HTTP/1.1, HTTP/2 and TLS clients, rcgen certificates written to files.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use portico::proxy::{
    body, hygiene, CertMap, CertSource, ConnInfo, ErrorPages, Handler, Listener, ListenerHandle,
    PendingUpgrade, ProxyError, RequestBody, ResponseBody, ServerLimits, Shutdown, SniResolver,
};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use tokio::time::timeout;

/// Every test finishes well within this, or fails.
const BOUND: Duration = Duration::from_secs(10);

/// What `/large` answers: far more than the socket buffers between the
/// edge and a client hold. `/medium` answers its first 2 MiB.
const LARGE: usize = 16 << 20;
const MEDIUM: usize = 2 << 20;
static LARGE_BODY: std::sync::LazyLock<Bytes> =
    std::sync::LazyLock::new(|| Bytes::from(vec![b'x'; LARGE]));

/// Echoes what it saw; `/body` reads the body and answers its length; `/hold`
/// reports that it started and waits for `release`; an upgrade request is
/// relayed to `origin`.
struct TestHandler {
    abandoned: Arc<AtomicUsize>,
    errors: ErrorPages,
    started: mpsc::UnboundedSender<()>,
    release: Arc<Notify>,
    origin: Option<SocketAddr>,
}

impl Handler for TestHandler {
    async fn handle(
        &self,
        req: Request<RequestBody>,
        conn: Arc<ConnInfo>,
    ) -> Response<ResponseBody> {
        if hygiene::is_upgrade(req.headers()) {
            return match self.origin {
                Some(origin) => relay_upgrade(req, &conn, origin, &self.errors).await,
                None => self
                    .errors
                    .respond(&ProxyError::NotFound, Some(req.headers())),
            };
        }
        match req.uri().path() {
            "/body" => {
                let headers = req.headers().clone();
                match req.into_body().collect().await {
                    Ok(collected) => {
                        Response::new(body::full(collected.to_bytes().len().to_string()))
                    }
                    Err(e) => self.errors.respond(&ProxyError::from(e), Some(&headers)),
                }
            }
            "/hold" => {
                let _ = self.started.send(());
                let guard = Abandoned(Arc::clone(&self.abandoned));
                self.release.notified().await;
                std::mem::forget(guard);
                Response::new(body::full("released"))
            }
            "/trailers" => {
                let mut trailers = http::HeaderMap::new();
                trailers.insert("x-sum", "abc".parse().unwrap());
                trailers.insert("content-length", "999".parse().unwrap());
                trailers.insert("set-cookie", "s=1".parse().unwrap());
                let frames = futures_util::stream::iter([
                    Ok::<_, portico::proxy::BoxError>(hyper::body::Frame::data(Bytes::from(
                        "data",
                    ))),
                    Ok(hyper::body::Frame::trailers(trailers)),
                ]);
                Response::builder()
                    .header("trailer", "x-sum, content-length, set-cookie")
                    .body(http_body_util::BodyExt::boxed_unsync(
                        http_body_util::StreamBody::new(frames),
                    ))
                    .unwrap()
            }
            "/large" => Response::new(body::full(LARGE_BODY.clone())),
            "/medium" => Response::new(body::full(LARGE_BODY.slice(..MEDIUM))),
            "/interim" => Response::builder()
                .status(StatusCode::from_u16(103).unwrap())
                .body(body::empty())
                .unwrap(),
            "/stream" => {
                // Two frames and no known length.
                let frames = futures_util::stream::iter(["part one, ", "part two"].map(|s| {
                    Ok::<_, portico::proxy::BoxError>(hyper::body::Frame::data(Bytes::from(s)))
                }));
                Response::new(http_body_util::BodyExt::boxed_unsync(
                    http_body_util::StreamBody::new(frames),
                ))
            }
            path => Response::new(body::full(format!(
                "{} {} {:?} sni={}",
                req.method(),
                path,
                req.version(),
                conn.sni.as_deref().unwrap_or("-")
            ))),
        }
    }
}

/// Counts a `/hold` request dropped before it was released.
struct Abandoned(Arc<AtomicUsize>);

impl Drop for Abandoned {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Forwards an upgrade request to `origin` over HTTP/1.1 and splices the two
/// upgraded streams once the origin switches.
async fn relay_upgrade(
    mut req: Request<RequestBody>,
    conn: &ConnInfo,
    origin: SocketAddr,
    errors: &ErrorPages,
) -> Response<ResponseBody> {
    let bad_gateway =
        |e: &dyn std::fmt::Display| errors.respond(&ProxyError::BadGateway(e.to_string()), None);
    let stream = match TcpStream::connect(origin).await {
        Ok(s) => s,
        Err(e) => return bad_gateway(&e),
    };
    let (mut sender, connection) =
        match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
            Ok(pair) => pair,
            Err(e) => return bad_gateway(&e),
        };
    tokio::spawn(connection.with_upgrades());
    let mut upstream = Request::builder()
        .method(req.method())
        .uri(req.uri().path())
        .body(Empty::<Bytes>::new())
        .expect("static request parts are valid");
    *upstream.headers_mut() = req.headers().clone();
    hygiene::prepare_upstream_request(
        &mut upstream,
        &hygiene::ForwardContext {
            client_ip: conn.client_addr.ip(),
            tls: conn.tls,
            trust_forwarded: false,
            via: hygiene::default_via(req.version()),
        },
    );
    let mut origin_response = match sender.send_request(upstream).await {
        Ok(r) => r,
        Err(e) => return bad_gateway(&e),
    };
    if origin_response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return bad_gateway(&"origin refused the upgrade");
    }
    match PendingUpgrade::take(&mut req, &mut origin_response) {
        Ok(pending) => pending.spawn(),
        Err(e) => return bad_gateway(&e),
    }
    hygiene::prepare_downstream_response(
        &mut origin_response,
        &hygiene::ResponseHygiene {
            via: hygiene::default_via(Version::HTTP_11),
            strip_server: true,
        },
    );
    origin_response.map(|_| body::empty())
}

struct Edge {
    abandoned: Arc<AtomicUsize>,
    handle: ListenerHandle,
    addr: SocketAddr,
    started: mpsc::UnboundedReceiver<()>,
    release: Arc<Notify>,
}

async fn start_with(
    limits: ServerLimits,
    tls: Option<Arc<rustls::ServerConfig>>,
    origin: Option<SocketAddr>,
) -> Edge {
    let (started_tx, started) = mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    let abandoned = Arc::new(AtomicUsize::new(0));
    let handler = Arc::new(TestHandler {
        abandoned: Arc::clone(&abandoned),
        errors: ErrorPages::new(),
        started: started_tx,
        release: Arc::clone(&release),
        origin,
    });
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap(), tls)
        .await
        .unwrap();
    let handle = listener.spawn(handler, limits, ErrorPages::new(), Shutdown::new());
    Edge {
        abandoned,
        addr: handle.local_addr(),
        handle,
        started,
        release,
    }
}

async fn start(limits: ServerLimits) -> Edge {
    start_with(limits, None, None).await
}

async fn text(resp: Response<hyper::body::Incoming>) -> String {
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

async fn h1_get(addr: SocketAddr, path: &str) -> Response<hyper::body::Incoming> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", "edge.test")
        .body(Empty::<Bytes>::new())
        .unwrap();
    sender.send_request(req).await.unwrap()
}

/// Sends raw bytes and reads until the server closes or `BOUND` passes.
async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    // A reset after the response is fine: what was read is kept.
    let _ = timeout(BOUND, stream.read_to_end(&mut out)).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn port_zero_reports_bound_address() {
    let edge = start(ServerLimits::default()).await;
    assert_eq!(edge.addr.ip().to_string(), "127.0.0.1");
    assert_ne!(edge.addr.port(), 0);
    timeout(BOUND, async {
        let resp = h1_get(edge.addr, "/x").await;
        assert_eq!(resp.status(), StatusCode::OK);
    })
    .await
    .unwrap();
    timeout(BOUND, edge.handle.stop()).await.unwrap();
}

#[tokio::test]
async fn http1_request_is_served() {
    let edge = start(ServerLimits::default()).await;
    let body = timeout(BOUND, async {
        text(h1_get(edge.addr, "/hello").await).await
    })
    .await
    .unwrap();
    assert_eq!(body, "GET /hello HTTP/1.1 sni=-");
    timeout(BOUND, edge.handle.stop()).await.unwrap();
}

#[tokio::test]
async fn h2c_prior_knowledge_is_served() {
    let edge = start(ServerLimits::default()).await;
    timeout(BOUND, async {
        let stream = TcpStream::connect(edge.addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = Request::get("http://edge.test/two")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.version(), Version::HTTP_2);
        assert_eq!(text(resp).await, "GET /two HTTP/2.0 sni=-");
    })
    .await
    .unwrap();
    timeout(BOUND, edge.handle.stop()).await.unwrap();
}

/// A test CA and leaf certificates it signs, written as PEM files.
struct Pki {
    dir: tempfile::TempDir,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self {
            dir: tempfile::tempdir().unwrap(),
            issuer,
        }
    }

    /// Issues a leaf for `san`, writes it as `file`.crt/.key, and returns the
    /// source for `names` plus the leaf's DER.
    fn leaf(&self, file: &str, san: &str, names: &[&str], default: bool) -> (CertSource, Vec<u8>) {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![san.to_owned()])
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        let cert_path = self.dir.path().join(format!("{file}.crt"));
        let key_path = self.dir.path().join(format!("{file}.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        let source = CertSource {
            names: names.iter().map(|n| (*n).to_owned()).collect(),
            cert_path,
            key_path,
            default,
        };
        (source, cert.der().to_vec())
    }

    fn client(
        &self,
        alpn: &[&[u8]],
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.issuer.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }
}

type TlsClientStream = tokio_rustls::client::TlsStream<TcpStream>;

async fn tls_connect(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    sni: &str,
) -> TlsClientStream {
    let tcp = TcpStream::connect(addr).await.unwrap();
    connector
        .connect(ServerName::try_from(sni.to_owned()).unwrap(), tcp)
        .await
        .unwrap()
}

fn served_leaf(stream: &TlsClientStream) -> Vec<u8> {
    let certs: &[CertificateDer<'_>] = stream.get_ref().1.peer_certificates().unwrap();
    certs[0].to_vec()
}

async fn h1_over(stream: TlsClientStream, path: &str) -> String {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", "edge.test")
        .body(Empty::<Bytes>::new())
        .unwrap();
    text(sender.send_request(req).await.unwrap()).await
}

#[tokio::test]
async fn https_picks_the_certificate_by_sni() {
    let pki = Pki::new();
    let (a, a_der) = pki.leaf("a", "a.test", &["a.test"], false);
    let (w, w_der) = pki.leaf("wild", "*.wild.test", &["*.wild.test"], false);
    let (d, d_der) = pki.leaf("default", "fallback.test", &["fallback.test"], true);
    let resolver = Arc::new(SniResolver::new(CertMap::load(&[a, w, d]).unwrap()));
    let config = portico::proxy::tls::server_config(resolver).unwrap();
    let edge = start_with(ServerLimits::default(), Some(config), None).await;
    let client = pki.client(&[b"http/1.1"], &[&rustls::version::TLS13]);
    timeout(BOUND, async {
        // (sni, expected leaf, what the handler saw)
        let cases = [
            ("a.test", &a_der, "GET /s HTTP/1.1 sni=a.test"),
            ("x.wild.test", &w_der, "GET /s HTTP/1.1 sni=x.wild.test"),
            ("fallback.test", &d_der, "GET /s HTTP/1.1 sni=fallback.test"),
        ];
        for (sni, leaf, echo) in cases {
            let stream = tls_connect(&client, edge.addr, sni).await;
            assert_eq!(&served_leaf(&stream), leaf, "{sni}");
            assert_eq!(h1_over(stream, "/s").await, echo);
        }
        // A client without SNI (an IP address) gets the default certificate;
        // it does not verify for the IP, so only the handshake is observed.
        let tcp = TcpStream::connect(edge.addr).await.unwrap();
        let ip = ServerName::IpAddress(edge.addr.ip().into());
        let err = client.connect(ip, tcp).await.unwrap_err();
        assert!(err.to_string().contains("certificate"), "{err}");
    })
    .await
    .unwrap();
    timeout(BOUND, edge.handle.stop()).await.unwrap();
}

#[tokio::test]
async fn alpn_h2_over_tls_and_tls12_accepted() {
    let pki = Pki::new();
    let (a, _) = pki.leaf("a", "a.test", &["a.test"], true);
    let resolver = Arc::new(SniResolver::new(CertMap::load(&[a]).unwrap()));
    let config = portico::proxy::tls::server_config(resolver).unwrap();
    let edge = start_with(ServerLimits::default(), Some(config), None).await;
    timeout(BOUND, async {
        let client = pki.client(&[b"h2", b"http/1.1"], &[&rustls::version::TLS13]);
        let stream = tls_connect(&client, edge.addr, "a.test").await;
        assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = Request::get("https://a.test/h2")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(text(resp).await, "GET /h2 HTTP/2.0 sni=a.test");

        let client12 = pki.client(&[b"http/1.1"], &[&rustls::version::TLS12]);
        let stream = tls_connect(&client12, edge.addr, "a.test").await;
        assert_eq!(
            stream.get_ref().1.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_2)
        );
        assert_eq!(h1_over(stream, "/12").await, "GET /12 HTTP/1.1 sni=a.test");
    })
    .await
    .unwrap();
    timeout(BOUND, edge.handle.stop()).await.unwrap();
}

/// A ClientHello without the supported_versions extension, so its
/// `legacy_version` is the version offered: `[3, 2]` is TLS 1.1, `[3, 3]` TLS
/// 1.2. Written by hand since no TLS library at hand still speaks 1.1. It
/// offers suites, groups and signature schemes the server supports, so only
/// the version can make it fail.
fn client_hello(version: [u8; 2]) -> Vec<u8> {
    let mut hello = version.to_vec();
    hello.extend_from_slice(&[7u8; 32]); // random
    hello.push(0); // session id
                   // ECDHE-ECDSA-AES128-GCM-SHA256, ECDHE-RSA-AES128-GCM-SHA256
    hello.extend_from_slice(&[0x00, 0x04, 0xc0, 0x2b, 0xc0, 0x2f]);
    hello.extend_from_slice(&[0x01, 0x00]); // compression: null
    let extensions: &[u8] = &[
        0x00, 0x0d, 0x00, 0x06, 0x00, 0x04, 0x04, 0x03, 0x08, 0x04, // signature_algorithms
        0x00, 0x0a, 0x00, 0x06, 0x00, 0x04, 0x00, 0x1d, 0x00, 0x17, // supported_groups
        0x00, 0x0b, 0x00, 0x02, 0x01, 0x00, // ec_point_formats
    ];
    hello.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
    hello.extend_from_slice(extensions);
    let mut handshake = vec![0x01, 0x00];
    handshake.extend_from_slice(&(hello.len() as u16).to_be_bytes());
    handshake.extend_from_slice(&hello);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

/// The first TLS record the server answers `hello` with.
async fn first_record(addr: SocketAddr, hello: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(hello).await.unwrap();
    let mut header = [0u8; 5];
    stream.read_exact(&mut header).await.unwrap();
    let len = u16::from_be_bytes([header[3], header[4]]) as usize;
    let mut record = header.to_vec();
    record.resize(5 + len, 0);
    stream.read_exact(&mut record[5..]).await.unwrap();
    record
}

#[tokio::test]
async fn tls11_is_refused() {
    let pki = Pki::new();
    let (a, _) = pki.leaf("a", "a.test", &["a.test"], true);
    let resolver = Arc::new(SniResolver::new(CertMap::load(&[a]).unwrap()));
    let config = portico::proxy::tls::server_config(resolver).unwrap();
    let edge = start_with(ServerLimits::default(), Some(config), None).await;
    timeout(BOUND, async {
        // TLS 1.1: an alert record (21) carrying protocol_version (70).
        let reply = first_record(edge.addr, &client_hello([3, 2])).await;
        assert_eq!((reply[0], reply[6]), (0x15, 70), "{reply:?}");
        // The same hello as TLS 1.2 gets a ServerHello: the version alone
        // made the difference.
        let reply = first_record(edge.addr, &client_hello([3, 3])).await;
        assert_eq!((reply[0], reply[5]), (0x16, 0x02), "{reply:?}");
    })
    .await
    .unwrap();
    timeout(BOUND, edge.handle.stop()).await.unwrap();
}

#[tokio::test]
async fn certificate_reload_applies_to_new_connections() {
    let pki = Pki::new();
    let (first, first_der) = pki.leaf("first", "a.test", &["a.test"], true);
    let (second, second_der) = pki.leaf("second", "a.test", &["a.test"], true);
    let resolver = Arc::new(SniResolver::new(CertMap::load(&[first]).unwrap()));
    let config = portico::proxy::tls::server_config(Arc::clone(&resolver)).unwrap();
    let edge = start_with(ServerLimits::default(), Some(config), None).await;
    let client = pki.client(&[b"http/1.1"], &[&rustls::version::TLS13]);
    timeout(BOUND, async {
        let before = tls_connect(&client, edge.addr, "a.test").await;
        assert_eq!(served_leaf(&before), first_der);
        resolver.reload(CertMap::load(&[second]).unwrap());
        let after = tls_connect(&client, edge.addr, "a.test").await;
        assert_eq!(served_leaf(&after), second_der);
        // The connection made before the reload still works.
        assert_eq!(
            h1_over(before, "/old").await,
            "GET /old HTTP/1.1 sni=a.test"
        );
    })
    .await
    .unwrap();
    timeout(BOUND, edge.handle.stop()).await.unwrap();
}

fn small_limits() -> ServerLimits {
    ServerLimits {
        max_header_bytes: 8192,
        max_body_bytes: 1000,
        ..ServerLimits::default()
    }
}

#[tokio::test]
async fn oversized_header_gets_431() {
    let edge = start(small_limits()).await;
    let big = "a".repeat(16 * 1024);
    let request = format!("GET / HTTP/1.1\r\nHost: a\r\nX-Big: {big}\r\n\r\n");
    let reply = raw_exchange(edge.addr, request.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply}");
    // A header just under the limit still passes.
    let ok = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nX-Big: {}\r\n\r\n",
        "a".repeat(4000)
    );
    let reply = raw_exchange(edge.addr, ok.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    timeout(BOUND, edge.handle.stop()).await.unwrap();
}

#[tokio::test]
async fn oversized_h2_header_is_refused() {
    let edge = start(small_limits()).await;
    timeout(BOUND, async {
        let stream = TcpStream::connect(edge.addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = Request::get("http://edge.test/big")
            .header("x-big", "a".repeat(16 * 1024))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        // Only the stream was refused: the connection still serves.
        let req = Request::get("http://edge.test/after")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(text(resp).await, "GET /after HTTP/2.0 sni=-");
    })
    .await
    .unwrap();
    timeout(BOUND, edge.handle.stop()).await.unwrap();
}

#[tokio::test]
async fn declared_oversized_body_gets_413() {
    let edge = start(small_limits()).await;
    // The handler would answer 200 on this path without reading the body:
    // the listener refuses it first.
    let request = format!(
        "POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n\r\n{}",
        "b".repeat(5000)
    );
    let reply = raw_exchange(edge.addr, request.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    timeout(BOUND, edge.handle.stop()).await.unwrap();
}

#[tokio::test]
async fn streamed_oversized_body_gets_413() {
    let edge = start(small_limits()).await;
    let chunk = "c".repeat(600);
    let request = format!(
        "POST /body HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n258\r\n{chunk}\r\n258\r\n{chunk}\r\n0\r\n\r\n"
    );
    let reply = raw_exchange(edge.addr, request.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    // Within the limit, the body reaches the handler whole.
    let request = format!(
        "POST /body HTTP/1.1\r\nHost: a\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n258\r\n{chunk}\r\n0\r\n\r\n"
    );
    let reply = raw_exchange(edge.addr, request.as_bytes()).await;
    assert!(
        reply.starts_with("HTTP/1.1 200") && reply.ends_with("600"),
        "{reply}"
    );
    timeout(BOUND, edge.handle.stop()).await.unwrap();
}

fn short_header_timeout() -> ServerLimits {
    ServerLimits {
        header_read_timeout: Duration::from_millis(300),
        ..ServerLimits::default()
    }
}

#[tokio::test]
async fn slowloris_is_closed_after_the_header_timeout() {
    let edge = start(short_header_timeout()).await;
    let started = Instant::now();
    let mut stream = TcpStream::connect(edge.addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = timeout(BOUND, stream.read_to_end(&mut out)).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(!String::from_utf8_lossy(&out).contains("200"), "{out:?}");
    timeout(BOUND, edge.handle.stop()).await.unwrap();
}

#[tokio::test]
async fn silent_connection_is_closed_after_the_header_timeout() {
    let edge = start(short_header_timeout()).await;
    let started = Instant::now();
    let mut stream = TcpStream::connect(edge.addr).await.unwrap();
    let mut out = Vec::new();
    let _ = timeout(BOUND, stream.read_to_end(&mut out)).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(out.is_empty());
    timeout(BOUND, edge.handle.stop()).await.unwrap();
}

#[tokio::test]
async fn a_kept_alive_connection_may_idle_past_the_header_timeout() {
    let edge = start(ServerLimits {
        header_read_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_secs(2),
        ..ServerLimits::default()
    })
    .await;
    let mut stream = TcpStream::connect(edge.addr).await.unwrap();
    let mut pending = Vec::new();
    stream
        .write_all(b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let (_, body) = read_response(&mut stream, &mut pending).await;
    assert_eq!(body, "GET /one HTTP/1.1 sni=-");
    // Idle for more than the header timeout, less than the idle timeout.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stream
        .write_all(b"GET /two HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let (_, body) = read_response(&mut stream, &mut pending).await;
    assert_eq!(body, "GET /two HTTP/1.1 sni=-");
    // Idle past the idle timeout, the connection is closed.
    let mut rest = Vec::new();
    timeout(BOUND, stream.read_to_end(&mut rest))
        .await
        .expect("closed when idle")
        .unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    timeout(BOUND, edge.handle.stop()).await.unwrap();
}

/// The empty line some clients send after a request is not the start of
/// the next one: the connection still has the idle timeout, not the header
/// timeout.
#[tokio::test]
async fn an_empty_line_after_a_request_leaves_the_connection_idle() {
    let edge = start(ServerLimits {
        header_read_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_secs(5),
        ..ServerLimits::default()
    })
    .await;
    let mut stream = TcpStream::connect(edge.addr).await.unwrap();
    let mut pending = Vec::new();
    stream
        .write_all(b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n\r\n")
        .await
        .unwrap();
    let (_, body) = read_response(&mut stream, &mut pending).await;
    assert_eq!(body, "GET /one HTTP/1.1 sni=-");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stream
        .write_all(b"GET /two HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let (_, body) = read_response(&mut stream, &mut pending).await;
    assert_eq!(body, "GET /two HTTP/1.1 sni=-");
    timeout(BOUND, edge.handle.stop()).await.unwrap();
}

#[tokio::test]
async fn a_slow_head_after_a_kept_alive_request_has_the_header_timeout() {
    // The idle timeout is far past the bound: only the header timeout can
    // close this connection in time.
    let edge = start(ServerLimits {
        header_read_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_secs(600),
        ..ServerLimits::default()
    })
    .await;
    let mut stream = TcpStream::connect(edge.addr).await.unwrap();
    let mut pending = Vec::new();
    stream
        .write_all(b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let (_, body) = read_response(&mut stream, &mut pending).await;
    assert_eq!(body, "GET /one HTTP/1.1 sni=-");
    stream
        .write_all(b"GET /two HTTP/1.1\r\nHost: a\r\nX-Slow: ")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = timeout(BOUND, stream.read_to_end(&mut rest))
        .await
        .expect("a slow head is cut off by the header timeout");
    assert!(!String::from_utf8_lossy(&rest).contains("200"), "{rest:?}");
    timeout(BOUND, edge.handle.stop()).await.unwrap();
}

#[tokio::test]
async fn idle_h2_connection_is_closed() {
    let edge = start(ServerLimits {
        idle_timeout: Duration::from_millis(300),
        ..ServerLimits::default()
    })
    .await;
    timeout(BOUND, async {
        let stream = TcpStream::connect(edge.addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        let conn = tokio::spawn(conn);
        let req = Request::get("http://edge.test/once")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(text(resp).await, "GET /once HTTP/2.0 sni=-");
        let idle_since = Instant::now();
        // The server's GOAWAY and close end the client connection.
        conn.await.unwrap().unwrap();
        assert!(idle_since.elapsed() >= Duration::from_millis(250));
    })
    .await
    .unwrap();
    timeout(BOUND, edge.handle.stop()).await.unwrap();
}

#[tokio::test]
async fn idle_timer_spares_a_long_request_and_counts_from_its_end() {
    let mut edge = start(ServerLimits {
        idle_timeout: Duration::from_millis(200),
        ..ServerLimits::default()
    })
    .await;
    timeout(BOUND, async {
        let stream = TcpStream::connect(edge.addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        let conn = tokio::spawn(conn);
        let get = |path: &str| {
            Request::get(path)
                .header("host", "edge.test")
                .body(Empty::<Bytes>::new())
                .unwrap()
        };
        // A request held for three idle timeouts is not cut off.
        let held = sender.send_request(get("/hold"));
        let release = async {
            edge.started.recv().await.unwrap();
            tokio::time::sleep(Duration::from_millis(600)).await;
            edge.release.notify_one();
        };
        let (resp, ()) = tokio::join!(held, release);
        assert_eq!(text(resp.unwrap()).await, "released");
        // The connection is still open for the next request...
        sender.ready().await.unwrap();
        let resp = sender.send_request(get("/next")).await.unwrap();
        assert_eq!(text(resp).await, "GET /next HTTP/1.1 sni=-");
        // ...and closes once idle for the timeout after it.
        let idle_since = Instant::now();
        conn.await.unwrap().unwrap();
        assert!(idle_since.elapsed() >= Duration::from_millis(150));
    })
    .await
    .unwrap();
    timeout(BOUND, edge.handle.stop()).await.unwrap();
}

#[tokio::test]
async fn graceful_shutdown_lets_the_request_in_flight_finish() {
    let mut edge = start(ServerLimits::default()).await;
    let addr = edge.addr;
    let in_flight = tokio::spawn(async move { text(h1_get(addr, "/hold").await).await });
    timeout(BOUND, edge.started.recv()).await.unwrap().unwrap();

    edge.handle.shutdown();
    // The listener stops accepting before the request completes.
    timeout(BOUND, async {
        while TcpStream::connect(addr).await.is_ok() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    assert!(!in_flight.is_finished());

    edge.release.notify_one();
    assert_eq!(
        timeout(BOUND, in_flight).await.unwrap().unwrap(),
        "released"
    );
    timeout(BOUND, edge.handle.join()).await.unwrap();
}

#[tokio::test]
async fn shutdown_grace_bounds_a_stuck_request() {
    let mut edge = start(ServerLimits {
        shutdown_grace: Duration::from_millis(300),
        ..ServerLimits::default()
    })
    .await;
    let addr = edge.addr;
    let stuck = tokio::spawn(async move {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::get("/hold").body(Empty::<Bytes>::new()).unwrap();
        sender.send_request(req).await.map(|_| ())
    });
    timeout(BOUND, edge.started.recv()).await.unwrap().unwrap();
    let started = Instant::now();
    timeout(BOUND, edge.handle.stop()).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    // The never-released request was cut off, not answered.
    assert!(timeout(BOUND, stuck).await.unwrap().unwrap().is_err());
}

#[tokio::test]
async fn one_listener_stops_while_another_keeps_serving() {
    let first = start(ServerLimits::default()).await;
    let second = start(ServerLimits::default()).await;
    timeout(BOUND, first.handle.stop()).await.unwrap();
    assert!(TcpStream::connect(first.addr).await.is_err());
    let body = timeout(BOUND, async {
        text(h1_get(second.addr, "/still").await).await
    })
    .await
    .unwrap();
    assert_eq!(body, "GET /still HTTP/1.1 sni=-");
    timeout(BOUND, second.handle.stop()).await.unwrap();
}

/// A raw origin that accepts one upgrade request, switches to an echo
/// protocol, and echoes bytes back until the client closes.
async fn echo_origin() -> (SocketAddr, tokio::task::JoinHandle<String>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
        stream
            .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: echo\r\nServer: origin\r\n\r\n")
            .await
            .unwrap();
        let (mut read, mut write) = stream.split();
        tokio::io::copy(&mut read, &mut write).await.unwrap();
        String::from_utf8(head).unwrap()
    });
    (addr, task)
}

#[tokio::test]
async fn upgrade_is_spliced_to_the_origin() {
    let (origin, origin_task) = echo_origin().await;
    let edge = start_with(ServerLimits::default(), None, Some(origin)).await;
    timeout(BOUND, async {
        let mut stream = TcpStream::connect(edge.addr).await.unwrap();
        stream
            .write_all(b"GET /ws HTTP/1.1\r\nHost: edge.test\r\nConnection: Upgrade, X-Hop\r\nUpgrade: echo\r\nX-Hop: 1\r\n\r\n")
            .await
            .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 101"), "{head}");
        assert!(head.contains("upgrade: echo"), "{head}");
        assert!(head.contains("via: 1.1 portico"), "{head}");
        assert!(!head.contains("server: origin"), "{head}");

        stream.write_all(b"ping over the splice").await.unwrap();
        let mut echoed = [0u8; 20];
        stream.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"ping over the splice");
        stream.shutdown().await.unwrap();

        let origin_saw = origin_task.await.unwrap().to_ascii_lowercase();
        assert!(origin_saw.contains("upgrade: echo"), "{origin_saw}");
        assert!(origin_saw.contains("connection: upgrade"), "{origin_saw}");
        assert!(origin_saw.contains("x-forwarded-for: 127.0.0.1"), "{origin_saw}");
        assert!(!origin_saw.contains("x-hop"), "{origin_saw}");
    })
    .await
    .unwrap();
    timeout(BOUND, edge.handle.stop()).await.unwrap();
}

#[tokio::test]
async fn request_body_reaches_the_handler_over_h2() {
    let edge = start(small_limits()).await;
    timeout(BOUND, async {
        let stream = TcpStream::connect(edge.addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let small = Request::post("http://edge.test/body")
            .body(Full::new(Bytes::from(vec![1u8; 500])))
            .unwrap();
        assert_eq!(text(sender.send_request(small).await.unwrap()).await, "500");
        let big = Request::post("http://edge.test/body")
            .body(Full::new(Bytes::from(vec![1u8; 5000])))
            .unwrap();
        let resp = sender.send_request(big).await.unwrap();
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    })
    .await
    .unwrap();
    timeout(BOUND, edge.handle.stop()).await.unwrap();
}

#[tokio::test]
async fn at_the_connection_cap_new_clients_wait_for_a_free_slot() {
    let edge = start(ServerLimits {
        max_connections: 2,
        ..ServerLimits::default()
    })
    .await;
    timeout(BOUND, async {
        let request = b"GET /x HTTP/1.1\r\nhost: edge.test\r\n\r\n";
        let mut open = Vec::new();
        for _ in 0..2 {
            let mut s = TcpStream::connect(edge.addr).await.unwrap();
            s.write_all(request).await.unwrap();
            let mut buf = [0u8; 512];
            let n = s.read(&mut buf).await.unwrap();
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
            open.push(s);
        }
        // The kernel completes the handshake, but Portico does not accept.
        let mut third = TcpStream::connect(edge.addr).await.unwrap();
        third.write_all(request).await.unwrap();
        let mut buf = [0u8; 512];
        let early = timeout(Duration::from_millis(300), third.read(&mut buf)).await;
        assert!(
            early.is_err(),
            "a third connection was served at a cap of 2"
        );
        // One client leaves: the waiting one is accepted and answered.
        drop(open.pop());
        let n = third.read(&mut buf).await.unwrap();
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&buf[..n])
        );
    })
    .await
    .unwrap();
    timeout(BOUND, edge.handle.stop()).await.unwrap();
}

/// Reads one response (head and a Content-Length body) from `stream`.
async fn read_response(stream: &mut TcpStream, pending: &mut Vec<u8>) -> (String, String) {
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8(pending[..end + 4].to_vec()).unwrap();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse().unwrap());
            if pending.len() >= end + 4 + len {
                let body = String::from_utf8(pending[end + 4..end + 4 + len].to_vec()).unwrap();
                pending.drain(..end + 4 + len);
                return (head, body);
            }
        }
        let mut chunk = [0u8; 4096];
        let n = timeout(BOUND, stream.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n > 0,
            "closed before a whole response: {:?}",
            String::from_utf8_lossy(pending)
        );
        pending.extend_from_slice(&chunk[..n]);
    }
}

/// A connection with a small receive buffer, so that what its client does
/// not read backs up to the server soon.
async fn small_window_connect(addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    socket.connect(addr).await.unwrap()
}

/// A request for `path` served by Portico's own HTTP/1.1 loop (a GET) and
/// one served by hyper (it has a body).
fn by_either_server(path: &str) -> [(&'static str, String); 2] {
    [
        (
            "own loop",
            format!("GET {path} HTTP/1.1\r\nhost: a\r\n\r\n"),
        ),
        (
            "hyper",
            format!("POST {path} HTTP/1.1\r\nhost: a\r\ncontent-length: 1\r\n\r\nx"),
        ),
    ]
}

/// A send timeout short enough for a test, every other limit far off.
fn short_send_timeout() -> ServerLimits {
    ServerLimits {
        send_timeout: Duration::from_millis(500),
        ..ServerLimits::default()
    }
}

#[tokio::test]
async fn a_client_that_reads_nothing_loses_its_connection_after_the_send_timeout() {
    let edge = start(short_send_timeout()).await;
    for (server, request) in by_either_server("/large") {
        let mut stream = small_window_connect(edge.addr).await;
        stream.write_all(request.as_bytes()).await.unwrap();
        // Nothing read for well past the send timeout (hyper's connections
        // are looked at every send timeout: gone within two).
        tokio::time::sleep(Duration::from_secs(3)).await;
        // What was already on its way still arrives, then the end, short
        // of the body. A connection still open would deliver it all and
        // then wait for the next request.
        let mut got = Vec::new();
        let ended = timeout(BOUND, stream.read_to_end(&mut got)).await;
        assert!(ended.is_ok(), "{server}: the connection was not closed");
        assert!(
            got.starts_with(b"HTTP/1.1 200 OK\r\n"),
            "{server}: {:?}",
            String::from_utf8_lossy(&got[..got.len().min(200)])
        );
        assert!(got.len() < LARGE, "{server}: the whole response arrived");
    }
    timeout(BOUND, edge.handle.stop()).await.unwrap();
}

#[tokio::test]
async fn an_idle_h2_connection_behind_a_shut_window_is_closed() {
    let edge = start(ServerLimits {
        idle_timeout: Duration::from_millis(300),
        send_timeout: Duration::from_millis(500),
        ..ServerLimits::default()
    })
    .await;
    let stream = TcpStream::connect(edge.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(16 * 1024)
        .handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let req = Request::get("http://edge.test/large")
        .body(Empty::<Bytes>::new())
        .unwrap();
    // The whole body is handed to HTTP/2 at once; none of it is read, so
    // it waits behind the window with no request in flight.
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // Idle, the connection is closed gracefully; what the client does not
    // take must not keep it open for good.
    timeout(BOUND, conn)
        .await
        .expect("the connection was not closed")
        .unwrap()
        .ok();
    drop(resp);
    timeout(BOUND, edge.handle.stop()).await.unwrap();
}

#[tokio::test]
async fn a_slow_reader_that_keeps_reading_gets_the_whole_response() {
    // The idle timeout runs out during the transfer too: hyper lets go of
    // a body once its last frame is queued, and the connection, closing
    // with nothing in flight, must still finish what it is sending.
    let edge = start(ServerLimits {
        idle_timeout: Duration::from_millis(300),
        ..short_send_timeout()
    })
    .await;
    for (server, request) in by_either_server("/medium") {
        let mut stream = small_window_connect(edge.addr).await;
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        timeout(BOUND, async {
            loop {
                // A little at a time, with pauses well inside the timeout.
                tokio::time::sleep(Duration::from_millis(10)).await;
                let n = stream.read(&mut buf).await.unwrap();
                assert!(n > 0, "{server}: closed after {} bytes", got.len());
                got.extend_from_slice(&buf[..n]);
                if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                    if got.len() >= end + 4 + MEDIUM {
                        break;
                    }
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{server}: not done in time"));
        assert!(got.starts_with(b"HTTP/1.1 200 OK\r\n"), "{server}");
    }
    timeout(BOUND, edge.handle.stop()).await.unwrap();
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_and_close_when_asked() {
    let edge = start(ServerLimits::default()).await;
    let out = raw_exchange(
        edge.addr,
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let a = out.find("GET /a HTTP/1.1").expect("first answered");
    let b = out.find("GET /b HTTP/1.1").expect("second answered");
    assert!(a < b, "{out}");
    assert_eq!(out.matches("HTTP/1.1 200 OK\r\n").count(), 2, "{out}");
    // Only the last says it closes; every response has a date.
    assert_eq!(out.matches("connection: close\r\n").count(), 1, "{out}");
    assert_eq!(out.matches("\r\ndate: ").count(), 2, "{out}");
    timeout(BOUND, edge.handle.stop()).await.unwrap();
}

#[tokio::test]
async fn http_1_0_is_kept_alive_only_when_it_asks() {
    let edge = start(ServerLimits::default()).await;
    // Without keep-alive the connection ends. The status line has the
    // server's version, 1.1, whatever the client's (RFC 9110 §2.5).
    let out = raw_exchange(edge.addr, b"GET /old HTTP/1.0\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    assert!(out.contains("connection: close\r\n"), "{out}");
    assert!(out.ends_with("GET /old HTTP/1.0 sni=-"), "{out}");
    // With it, the answer says so and a second request follows.
    let mut stream = TcpStream::connect(edge.addr).await.unwrap();
    let mut pending = Vec::new();
    for path in ["/one", "/two"] {
        let req = format!("GET {path} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        stream.write_all(req.as_bytes()).await.unwrap();
        let (head, body) = read_response(&mut stream, &mut pending).await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains("connection: keep-alive\r\n"), "{head}");
        assert_eq!(body, format!("GET {path} HTTP/1.0 sni=-"));
    }
    timeout(BOUND, edge.handle.stop()).await.unwrap();
}

#[tokio::test]
async fn a_request_with_a_body_between_plain_ones_is_answered_on_the_same_connection() {
    let edge = start(ServerLimits::default()).await;
    let out = raw_exchange(
        edge.addr,
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n\
          POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
          POST /body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
          GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(out.matches("HTTP/1.1 200 OK\r\n").count(), 4, "{out}");
    let at = |needle: &str| {
        out.find(needle)
            .unwrap_or_else(|| panic!("{needle}: {out}"))
    };
    assert!(at("GET /a HTTP/1.1") < at("\r\n\r\n5"), "{out}");
    assert!(at("\r\n\r\n5") < at("\r\n\r\n3"), "{out}");
    assert!(at("\r\n\r\n3") < at("GET /c HTTP/1.1"), "{out}");
    timeout(BOUND, edge.handle.stop()).await.unwrap();
}

#[tokio::test]
async fn malformed_heads_get_400_also_after_a_served_request() {
    let edge = start(ServerLimits::default()).await;
    for prefix in ["", "GET /first HTTP/1.1\r\nHost: x\r\n\r\n"] {
        let request = format!("{prefix}GET / HTTP/1.1\r\nbad name: x\r\n\r\n");
        let out = raw_exchange(edge.addr, request.as_bytes()).await;
        assert!(out.contains("HTTP/1.1 400 Bad Request\r\n"), "{out}");
        assert_eq!(out.contains("GET /first"), !prefix.is_empty(), "{out}");
    }
    let fields: String = (0..120).map(|i| format!("X-{i}: v\r\n")).collect();
    let request = format!("GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\n{fields}\r\n");
    let out = raw_exchange(edge.addr, request.as_bytes()).await;
    assert!(out.contains("GET /a HTTP/1.1"), "{out}");
    assert!(
        out.contains("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
        "{out}"
    );
    timeout(BOUND, edge.handle.stop()).await.unwrap();
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_its_request() {
    let mut edge = start(ServerLimits::default()).await;
    let mut stream = TcpStream::connect(edge.addr).await.unwrap();
    stream
        .write_all(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    timeout(BOUND, edge.started.recv()).await.unwrap().unwrap();
    assert_eq!(edge.abandoned.load(Ordering::SeqCst), 0);
    drop(stream);
    timeout(BOUND, async {
        while edge.abandoned.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the handler was dropped when its client left");
    timeout(BOUND, edge.handle.stop()).await.unwrap();
}

#[tokio::test]
async fn head_has_no_body_and_unknown_lengths_are_chunked_or_closed() {
    let edge = start(ServerLimits::default()).await;
    let out = raw_exchange(
        edge.addr,
        b"HEAD /h HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let body = "HEAD /h HTTP/1.1 sni=-";
    assert!(
        out.contains(&format!("content-length: {}\r\n", body.len())),
        "{out}"
    );
    assert!(out.ends_with("\r\n\r\n"), "{out}");

    let out = raw_exchange(
        edge.addr,
        b"GET /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.contains("transfer-encoding: chunked\r\n"), "{out}");
    assert!(
        out.ends_with("\r\n\r\na\r\npart one, \r\n8\r\npart two\r\n0\r\n\r\n"),
        "{out}"
    );
    let out = raw_exchange(edge.addr, b"GET /stream HTTP/1.0\r\n\r\n").await;
    assert!(!out.contains("transfer-encoding"), "{out}");
    assert!(out.ends_with("\r\n\r\npart one, part two"), "{out}");
    // hyper's client reads the chunked answer too, on a kept-alive connection.
    let resp = h1_get(edge.addr, "/stream").await;
    assert_eq!(text(resp).await, "part one, part two");
    timeout(BOUND, edge.handle.stop()).await.unwrap();
}

#[tokio::test]
async fn trailers_go_only_to_clients_that_accept_them_and_never_framing_fields() {
    let edge = start(ServerLimits::default()).await;
    let asked = raw_exchange(
        edge.addr,
        b"GET /trailers HTTP/1.1\r\nHost: x\r\nTE: trailers\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        asked.contains("trailer: x-sum, content-length, set-cookie\r\n"),
        "{asked}"
    );
    assert!(
        asked.ends_with("\r\n4\r\ndata\r\n0\r\nx-sum: abc\r\n\r\n"),
        "{asked}"
    );
    let not_asked = raw_exchange(
        edge.addr,
        b"GET /trailers HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        not_asked.ends_with("\r\n4\r\ndata\r\n0\r\n\r\n"),
        "{not_asked}"
    );
    timeout(BOUND, edge.handle.stop()).await.unwrap();
}

#[tokio::test]
async fn an_interim_status_from_the_handler_becomes_500() {
    let edge = start(ServerLimits::default()).await;
    let out = raw_exchange(
        edge.addr,
        b"GET /interim HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        out.starts_with("HTTP/1.1 500 Internal Server Error\r\n"),
        "{out}"
    );
    assert!(!out.contains(" 103 "), "{out}");
    timeout(BOUND, edge.handle.stop()).await.unwrap();
}

#[tokio::test]
async fn http2_preface_after_an_http1_exchange_is_not_http2() {
    let edge = start(ServerLimits::default()).await;
    let out = raw_exchange(
        edge.addr,
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nPRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0",
    )
    .await;
    let first = out.find("GET /a HTTP/1.1 sni=-").expect("first answered") + 21;
    let rest = &out[first..];
    // hyper's HTTP/1.1 refuses the line; no HTTP/2 frame follows.
    assert!(
        rest.is_empty() || rest.starts_with("HTTP/1.1 4"),
        "{rest:?}"
    );
    timeout(BOUND, edge.handle.stop()).await.unwrap();
}
