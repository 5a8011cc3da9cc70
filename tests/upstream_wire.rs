//! Scenarios for Portico's own HTTP/1.1 client against origins on
//! 127.0.0.1 that write raw bytes: body framings (length, chunked with
//! trailers, until close), interim answers, malformed answers, bodies cut
//! short, early answers to uploads, request body framing, and the resend
//! of an idempotent request whose reused connection was lost.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use portico::upstream::{BackendConfig, Limits, Pool, ServerConfig, Timeouts, UpstreamError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Every scenario is bounded by this.
const LIMIT: Duration = Duration::from_secs(20);

fn bounded<F: std::future::Future>(f: F) -> tokio::time::Timeout<F> {
    tokio::time::timeout(LIMIT, f)
}

/// What the origin does with one request.
#[derive(Clone)]
enum Step {
    /// Writes these pieces, 20 ms apart, and keeps the connection.
    Answer(Vec<&'static [u8]>),
    /// Writes the bytes and closes the connection.
    AnswerAndClose(&'static [u8]),
    /// Closes the connection without answering.
    Hang,
    /// Answers right after the head, without reading the body, and closes.
    AnswerBeforeBody(&'static [u8]),
    /// Sends these bytes right after the head, reads the body, then sends
    /// the rest and keeps the connection.
    AnswerWhileReading(&'static [u8], &'static [u8]),
    /// Reads the head, then resets the connection (SO_LINGER 0) while the
    /// body is still coming.
    ResetAfterHead,
    /// Sends `100 Continue` (in two pieces) after the head, then reads the
    /// body and answers.
    ContinueThenAnswer(&'static [u8]),
}

/// A request as the origin read it: the head (lower-cased) and the body,
/// de-chunked.
#[derive(Debug, Clone)]
struct Seen {
    head: String,
    body: Vec<u8>,
}

struct Origin {
    server: ServerConfig,
    connections: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Origin {
    /// An origin that takes its steps from `steps` in order, whatever the
    /// connection, and closes connections when they run out.
    async fn start(steps: Vec<Step>) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = ServerConfig::new(listener.local_addr().unwrap().to_string());
        let connections = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let steps = Arc::new(Mutex::new(VecDeque::from(steps)));
        let (count, log) = (connections.clone(), seen.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let (steps, log) = (steps.clone(), log.clone());
                tokio::spawn(serve(tcp, steps, log));
            }
        });
        Origin {
            server,
            connections,
            seen,
            task,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn pool(&self) -> Pool {
        Pool::new(&BackendConfig {
            name: "raw".into(),
            servers: vec![self.server.clone()],
            timeouts: Timeouts {
                connect: Duration::from_secs(2),
                first_byte: Duration::from_secs(5),
                total: Duration::from_secs(10),
            },
            ..Default::default()
        })
        .unwrap()
    }
}

async fn serve(mut tcp: TcpStream, steps: Arc<Mutex<VecDeque<Step>>>, log: Arc<Mutex<Vec<Seen>>>) {
    let mut buf = Vec::new();
    loop {
        let Some(head) = read_head(&mut tcp, &mut buf).await else {
            return;
        };
        let Some(step) = steps.lock().unwrap().pop_front() else {
            return;
        };
        match step {
            Step::AnswerBeforeBody(bytes) => {
                log.lock().unwrap().push(Seen {
                    head,
                    body: Vec::new(),
                });
                let _ = tcp.write_all(bytes).await;
                return;
            }
            Step::AnswerWhileReading(first, rest) => {
                let _ = tcp.write_all(first).await;
                let body = read_body(&mut tcp, &mut buf, &head).await;
                log.lock().unwrap().push(Seen { head, body });
                let _ = tcp.write_all(rest).await;
            }
            Step::ResetAfterHead => {
                log.lock().unwrap().push(Seen {
                    head,
                    body: Vec::new(),
                });
                let _ = tcp.set_zero_linger();
                return;
            }
            Step::ContinueThenAnswer(bytes) => {
                // In two pieces: a partial interim head must not pass for
                // an early final answer.
                let _ = tcp.write_all(b"HTTP/1.1 100 Cont").await;
                tokio::time::sleep(Duration::from_millis(20)).await;
                let _ = tcp.write_all(b"inue\r\n\r\n").await;
                let body = read_body(&mut tcp, &mut buf, &head).await;
                log.lock().unwrap().push(Seen { head, body });
                let _ = tcp.write_all(bytes).await;
            }
            step => {
                let body = read_body(&mut tcp, &mut buf, &head).await;
                log.lock().unwrap().push(Seen { head, body });
                match step {
                    Step::Answer(pieces) => {
                        for (i, piece) in pieces.iter().enumerate() {
                            if i > 0 {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            if tcp.write_all(piece).await.is_err() {
                                return;
                            }
                        }
                    }
                    Step::AnswerAndClose(bytes) => {
                        let _ = tcp.write_all(bytes).await;
                        return;
                    }
                    _ => return,
                }
            }
        }
    }
}

async fn fill(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 4096];
    match tcp.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

/// The next request head on the connection, lower-cased, taken from `buf`.
async fn read_head(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).to_lowercase();
            buf.drain(..end + 4);
            return Some(head);
        }
        if !fill(tcp, buf).await {
            return None;
        }
    }
}

/// The request body that follows `head`, by its framing, de-chunked.
async fn read_body(tcp: &mut TcpStream, buf: &mut Vec<u8>, head: &str) -> Vec<u8> {
    if head.contains("transfer-encoding: chunked") {
        let mut body = Vec::new();
        loop {
            let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
                if !fill(tcp, buf).await {
                    return body;
                }
                continue;
            };
            let size =
                usize::from_str_radix(std::str::from_utf8(&buf[..eol]).unwrap(), 16).unwrap();
            while buf.len() < eol + 2 + size + 2 {
                if !fill(tcp, buf).await {
                    return body;
                }
            }
            body.extend_from_slice(&buf[eol + 2..eol + 2 + size]);
            buf.drain(..eol + 2 + size + 2);
            if size == 0 {
                return body;
            }
        }
    }
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    while buf.len() < length {
        if !fill(tcp, buf).await {
            break;
        }
    }
    buf.drain(..length.min(buf.len())).collect()
}

async fn get(pool: &Pool) -> Result<(StatusCode, Vec<u8>, Option<http::HeaderMap>), UpstreamError> {
    let req = Request::get("/x").body(Empty::<Bytes>::new()).unwrap();
    let resp = pool.send(req, b"", None, Limits::default()).await?;
    let status = resp.status();
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    Ok((status, collected.to_bytes().to_vec(), trailers))
}

#[tokio::test]
async fn chunked_answers_with_trailers_arrive_whole_and_keep_the_connection() {
    bounded(async {
        let origin = Origin::start(vec![
            Step::Answer(vec![
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel",
                b"lo\r\n6;name=x\r\n world\r\n0\r\n",
                b"x-sum: 11\r\n\r\n",
            ]),
            Step::Answer(vec![
                b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n",
                b"next",
            ]),
        ])
        .await;
        let pool = origin.pool();
        let (status, body, trailers) = get(&pool).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, b"hello world");
        assert_eq!(trailers.expect("trailers")["x-sum"], "11");
        let (_, body, _) = get(&pool).await.unwrap();
        assert_eq!(body, b"next");
        assert_eq!(origin.connections.load(Ordering::SeqCst), 1);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn an_answer_without_length_ends_with_its_connection() {
    bounded(async {
        let origin = Origin::start(vec![
            Step::AnswerAndClose(b"HTTP/1.1 200 OK\r\n\r\nuntil the end"),
            Step::Answer(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]),
        ])
        .await;
        let pool = origin.pool();
        assert_eq!(get(&pool).await.unwrap().1, b"until the end");
        assert_eq!(get(&pool).await.unwrap().1, b"ok");
        assert_eq!(origin.connections.load(Ordering::SeqCst), 2);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn interim_answers_are_skipped() {
    bounded(async {
        let origin = Origin::start(vec![Step::Answer(vec![
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 4\r\n\r\n",
            b"made",
        ])])
        .await;
        let (status, body, _) = get(&origin.pool()).await.unwrap();
        assert_eq!((status, body.as_slice()), (StatusCode::CREATED, &b"made"[..]));
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn an_endless_run_of_interim_answers_is_refused() {
    bounded(async {
        // 32 interim heads are taken; the 33rd is one too many.
        let flood: &'static [u8] = "HTTP/1.1 100 Continue\r\n\r\n".repeat(33).leak().as_bytes();
        let origin = Origin::start(vec![Step::Answer(vec![
            flood,
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        ])])
        .await;
        let err = get(&origin.pool()).await.unwrap_err();
        assert_eq!(err.status(), StatusCode::BAD_GATEWAY, "{err}");
        assert!(
            err.to_string().contains("interim") || format!("{err:?}").contains("TooManyInterim"),
            "{err:?}"
        );
        let origin = Origin::start(vec![Step::Answer(vec![
            "HTTP/1.1 100 Continue\r\n\r\n".repeat(32).leak().as_bytes(),
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        ])])
        .await;
        assert_eq!(get(&origin.pool()).await.unwrap().1, b"ok");
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn malformed_answers_are_bad_gateway() {
    bounded(async {
        let bad: [&'static [u8]; 5] = [
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd",
            b"HTTP/1.1 200 OK\r\ncontent-length: lots\r\n\r\n",
            b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
        ];
        for answer in bad {
            let origin = Origin::start(vec![Step::AnswerAndClose(answer)]).await;
            let err = get(&origin.pool()).await.unwrap_err();
            assert!(
                matches!(err, UpstreamError::BadResponse { .. }),
                "{}: {err}",
                String::from_utf8_lossy(answer)
            );
            assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn bodies_cut_short_or_badly_chunked_fail_and_close() {
    bounded(async {
        let broken: [&'static [u8]; 3] = [
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n",
        ];
        for answer in broken {
            let origin = Origin::start(vec![
                Step::AnswerAndClose(answer),
                Step::Answer(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]),
            ])
            .await;
            let pool = origin.pool();
            let req = Request::get("/x").body(Empty::<Bytes>::new()).unwrap();
            let resp = pool.send(req, b"", None, Limits::default()).await.unwrap();
            let err = resp.into_body().collect().await.unwrap_err();
            let text = String::from_utf8_lossy(answer);
            assert!(!err.to_string().is_empty(), "{text}");
            // The broken connection is not reused.
            assert_eq!(get(&pool).await.unwrap().1, b"ok", "{text}");
            assert_eq!(origin.connections.load(Ordering::SeqCst), 2, "{text}");
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_reused_connection_lost_before_answering_resends_only_an_idempotent_request() {
    bounded(async {
        let ok: &'static [u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        // The origin answers once, then drops the connection on the next
        // request, as when its idle timer and that request cross.
        let origin = Origin::start(vec![
            Step::Answer(vec![ok]),
            Step::Hang,
            Step::Answer(vec![ok]),
        ])
        .await;
        let pool = origin.pool();
        assert_eq!(get(&pool).await.unwrap().1, b"ok");
        assert_eq!(get(&pool).await.unwrap().1, b"ok");
        assert_eq!(origin.seen().len(), 3);
        assert_eq!(origin.connections.load(Ordering::SeqCst), 2);

        // A POST lost the same way is not sent again.
        let origin = Origin::start(vec![
            Step::Answer(vec![ok]),
            Step::Hang,
            Step::Answer(vec![ok]),
        ])
        .await;
        let pool = origin.pool();
        assert_eq!(get(&pool).await.unwrap().1, b"ok");
        let req = Request::post("/order")
            .body(Full::new(Bytes::from_static(b"1")))
            .unwrap();
        let err = pool
            .send(req, b"", None, Limits::default())
            .await
            .unwrap_err();
        assert!(matches!(err, UpstreamError::Reset { .. }), "{err}");
        assert_eq!(origin.seen().len(), 2);
    })
    .await
    .unwrap();
}

/// A request body streamed from a test: no length known in advance.
type Streamed =
    StreamBody<futures_util::stream::BoxStream<'static, Result<Frame<Bytes>, Infallible>>>;

/// A request body that sends `first`, then waits for `rest` from the test.
fn streamed(first: &'static [u8]) -> (Streamed, tokio::sync::mpsc::Sender<Bytes>) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let rest = tokio_stream_from(rx);
    let stream = futures_util::stream::iter([Ok(Frame::data(Bytes::from_static(first)))])
        .chain(rest.map(|b| Ok(Frame::data(b))))
        .boxed();
    (StreamBody::new(stream), tx)
}

fn tokio_stream_from(
    rx: tokio::sync::mpsc::Receiver<Bytes>,
) -> impl futures_util::Stream<Item = Bytes> + Send {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) })
}

/// POSTs `part one, ` at once and `part two` 100 ms later, long enough for
/// the origin to have answered something first; the answer's status and
/// body.
async fn upload_in_two_parts(pool: &Pool, fields: &[(&str, &str)]) -> (StatusCode, Bytes) {
    let (body, tx) = streamed(b"part one, ");
    let mut req = Request::post("/upload");
    for (name, value) in fields {
        req = req.header(*name, *value);
    }
    let req = req.body(body).unwrap();
    let sending = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        tx.send(Bytes::from_static(b"part two")).await.unwrap();
    });
    let resp = pool.send(req, b"", None, Limits::default()).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    sending.await.unwrap();
    (status, bytes)
}

#[tokio::test]
async fn request_bodies_are_sized_or_chunked() {
    bounded(async {
        let ok: &'static [u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        let origin = Origin::start(vec![
            Step::Answer(vec![ok]),
            Step::Answer(vec![ok]),
            Step::Answer(vec![ok]),
        ])
        .await;
        let pool = origin.pool();
        let req = Request::put("/sized")
            .header("content-length", "5")
            .body(Full::new(Bytes::from_static(b"hello")))
            .unwrap();
        pool.send(req, b"", None, Limits::default()).await.unwrap();

        let (body, tx) = streamed(b"ab");
        let req = Request::post("/streamed").body(body).unwrap();
        let sending = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            tx.send(Bytes::from_static(b"cd")).await.unwrap();
            // Dropping the sender ends the body.
        });
        let resp = pool.send(req, b"", None, Limits::default()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        sending.await.unwrap();

        let req = Request::post("/empty").body(Empty::<Bytes>::new()).unwrap();
        pool.send(req, b"", None, Limits::default()).await.unwrap();

        let seen = origin.seen();
        assert!(
            seen[0].head.contains("content-length: 5\r\n"),
            "{}",
            seen[0].head
        );
        assert_eq!(seen[0].body, b"hello");
        assert!(
            seen[1].head.contains("transfer-encoding: chunked\r\n"),
            "{}",
            seen[1].head
        );
        assert!(!seen[1].head.contains("content-length"), "{}", seen[1].head);
        assert_eq!(seen[1].body, b"abcd");
        assert!(
            seen[2].head.contains("content-length: 0\r\n"),
            "{}",
            seen[2].head
        );
        assert_eq!(origin.connections.load(Ordering::SeqCst), 1);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn an_early_answer_to_an_upload_is_delivered() {
    bounded(async {
        let origin = Origin::start(vec![Step::AnswerBeforeBody(
            b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 8\r\nconnection: close\r\n\r\ntoo much",
        )])
        .await;
        let pool = origin.pool();
        // The body never ends: only the origin's early answer ends the exchange.
        let (body, _tx) = streamed(b"the first part of a long upload");
        let req = Request::post("/upload").body(body).unwrap();
        let resp = pool.send(req, b"", None, Limits::default()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"too much");
    })
    .await
    .unwrap();
}

/// A server that answers 200 without reading the body and then closes (Go's
/// net/http does so for a large body its handler did not read) has given
/// its answer: it is delivered, whether the upload then waits for the
/// client or runs into the closed connection.
#[tokio::test]
async fn a_2xx_answer_before_the_body_then_a_close_is_delivered() {
    bounded(async {
        for answer in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"[..],
            &b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"[..],
        ] {
            // The client's body stalls: without the answer, the exchange
            // would end with the first-byte limit (a 408 for the client).
            let origin = Origin::start(vec![Step::AnswerBeforeBody(answer)]).await;
            let (body, _tx) = streamed(b"first");
            let req = Request::post("/upload").body(body).unwrap();
            let resp = impatient(&origin)
                .send(req, b"", None, Limits::default())
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&bytes[..], b"ok");

            // A body far larger than the socket buffers, all ready: the
            // writes meet the closed connection.
            let origin = Origin::start(vec![Step::AnswerBeforeBody(answer)]).await;
            let frames =
                (0..4096).map(|_| Ok::<_, Infallible>(Frame::data(Bytes::from(vec![b'x'; 1024]))));
            let req = Request::put("/big")
                .body(StreamBody::new(futures_util::stream::iter(frames)))
                .unwrap();
            let resp = origin
                .pool()
                .send(req, b"", None, Limits::default())
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&bytes[..], b"ok");
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn an_interim_answer_during_an_upload_does_not_stop_it() {
    bounded(async {
        let origin = Origin::start(vec![Step::ContinueThenAnswer(
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\ngot",
        )])
        .await;
        let (status, bytes) =
            upload_in_two_parts(&origin.pool(), &[("expect", "100-continue")]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(&bytes[..], b"got");
        assert_eq!(origin.seen()[0].body, b"part one, part two");
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn head_answers_have_no_body_whatever_their_length() {
    bounded(async {
        let origin = Origin::start(vec![
            Step::Answer(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n"]),
            Step::Answer(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]),
        ])
        .await;
        let pool = origin.pool();
        let req = Request::builder()
            .method(Method::HEAD)
            .uri("/x")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = pool.send(req, b"", None, Limits::default()).await.unwrap();
        assert_eq!(resp.headers()["content-length"], "1000");
        assert!(resp
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .is_empty());
        // The connection is free for the next request at once.
        assert_eq!(get(&pool).await.unwrap().1, b"ok");
        assert_eq!(origin.connections.load(Ordering::SeqCst), 1);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_2xx_answer_that_begins_during_an_upload_lets_the_upload_finish() {
    bounded(async {
        let origin = Origin::start(vec![Step::AnswerWhileReading(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nread\r\n",
            b"0\r\n\r\n",
        )])
        .await;
        let (status, bytes) = upload_in_two_parts(&origin.pool(), &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(&bytes[..], b"read");
        assert_eq!(origin.seen()[0].body, b"part one, part two");
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn an_upload_cut_off_on_a_reused_connection_is_not_sent_again() {
    bounded(async {
        let ok: &'static [u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        for _ in 0..3 {
            let origin = Origin::start(vec![
                Step::Answer(vec![ok]),
                Step::ResetAfterHead,
                Step::Answer(vec![ok]),
            ])
            .await;
            let pool = origin.pool();
            assert_eq!(get(&pool).await.unwrap().1, b"ok");
            // Many small frames, all ready: the reset is met by a write
            // that begins a frame, after the head and earlier frames went out.
            let frames =
                (0..4096).map(|_| Ok::<_, Infallible>(Frame::data(Bytes::from(vec![b'x'; 1024]))));
            let body = StreamBody::new(futures_util::stream::iter(frames));
            let req = Request::put("/big").body(body).unwrap();
            let err = pool
                .send(req, b"", None, Limits::default())
                .await
                .unwrap_err();
            assert!(matches!(err, UpstreamError::Reset { .. }), "{err}");
            // The origin saw the GET and the PUT's head, and nothing more.
            assert_eq!(origin.seen().len(), 2);
            assert_eq!(origin.connections.load(Ordering::SeqCst), 1);
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn extra_field_lines_go_out_after_the_request_s_own_and_into_an_upgrade_s_map() {
    bounded(async {
        let origin = Origin::start(vec![
            Step::Answer(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]),
            Step::Answer(vec![
                b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: x-test\r\n\r\n",
            ]),
        ])
        .await;
        let pool = origin.pool();
        let extra = b"x-forwarded-for: 192.0.2.1\r\nvia: 1.1 portico\r\n";
        let req = Request::get("/plain")
            .header("x-own", "1")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = pool.send(req, extra, None, Limits::default()).await.unwrap();
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok");
        let req = Request::get("/up")
            .header("connection", "upgrade")
            .header("upgrade", "x-test")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = pool.send(req, extra, None, Limits::default()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        let seen = origin.seen();
        assert_eq!(seen.len(), 2);
        let plain = seen[0].head.to_ascii_lowercase();
        let own = plain.find("x-own: 1\r\n").expect("own field");
        let xff = plain.find("x-forwarded-for: 192.0.2.1\r\n").expect("x-forwarded-for");
        assert!(own < xff, "{plain}");
        assert!(plain.contains("via: 1.1 portico\r\n"), "{plain}");
        let upgrade = seen[1].head.to_ascii_lowercase();
        assert!(upgrade.contains("x-forwarded-for: 192.0.2.1\r\n"), "{upgrade}");
        assert!(upgrade.contains("via: 1.1 portico\r\n"), "{upgrade}");
        // A line that is not a field is refused, not sent.
        let req = Request::get("/up")
            .header("connection", "upgrade")
            .header("upgrade", "x-test")
            .body(Empty::<Bytes>::new())
            .unwrap();
        assert!(pool.send(req, b"no colon\r\n", None, Limits::default()).await.is_err());
    })
    .await
    .unwrap();
}

/// A connection lost after part of the answer's head arrived is not a reset
/// "before any response byte": even a GET is not tried on another server.
#[tokio::test]
async fn an_answer_cut_short_is_not_tried_again_elsewhere() {
    bounded(async {
        let cut = Origin::start(vec![
            Step::AnswerAndClose(b"HTTP/1.1 200 OK\r\ncontent-");
            4
        ])
        .await;
        let whole = Origin::start(vec![
            Step::Answer(vec![
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
            ]);
            4
        ])
        .await;
        let pool = Pool::new(&BackendConfig {
            name: "two".into(),
            servers: vec![cut.server.clone(), whole.server.clone()],
            ..Default::default()
        })
        .unwrap();
        let mut failed = 0;
        for _ in 0..2 {
            match get(&pool).await {
                Ok((status, body, _)) => {
                    assert_eq!(status, StatusCode::OK);
                    assert_eq!(body, b"ok");
                }
                Err(e) => {
                    assert!(matches!(e, UpstreamError::BadResponse { .. }), "{e}");
                    failed += 1;
                }
            }
        }
        assert!(
            failed >= 1,
            "round robin sent one of the two to the cut server"
        );
        assert_eq!(
            failed,
            cut.seen().len(),
            "no request the cut server had was sent on"
        );
        assert_eq!(whole.seen().len(), 2 - failed);
    })
    .await
    .expect("bounded");
}

/// An origin's pool with a first-byte limit of 300 ms.
fn impatient(origin: &Origin) -> Pool {
    Pool::new(&BackendConfig {
        name: "impatient".into(),
        servers: vec![origin.server.clone()],
        timeouts: Timeouts {
            connect: Duration::from_secs(2),
            first_byte: Duration::from_millis(300),
            total: Duration::from_secs(10),
        },
        ..Default::default()
    })
    .unwrap()
}

/// The first-byte limit is for the server's answer: an upload slower than
/// it, but moving, is not cut off, and the limit runs from its end.
#[tokio::test]
async fn a_slow_upload_that_keeps_moving_is_not_timed_out() {
    bounded(async {
        let origin = Origin::start(vec![Step::Answer(vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        ])])
        .await;
        let (body, tx) = streamed(b"part 0;");
        let req = Request::post("/upload").body(body).unwrap();
        // Nine parts, 100 ms apart: three times the first-byte limit.
        let sending = tokio::spawn(async move {
            for i in 1..=9 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                tx.send(Bytes::from(format!("part {i};"))).await.unwrap();
            }
        });
        let resp = impatient(&origin)
            .send(req, b"", None, Limits::default())
            .await
            .expect("a moving upload is not timed out");
        assert_eq!(resp.status(), StatusCode::OK);
        sending.await.unwrap();
        let seen = origin.seen();
        assert!(String::from_utf8_lossy(&seen[0].body).ends_with("part 9;"));
    })
    .await
    .expect("bounded");
}

/// An upload the client stops sending gets the first-byte limit for that
/// wait, and then a 408: the client's fault, not the server's.
#[tokio::test]
async fn a_stalled_upload_times_out() {
    bounded(async {
        let origin = Origin::start(vec![Step::Answer(vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        ])])
        .await;
        let (body, tx) = streamed(b"part 0;");
        let req = Request::post("/upload").body(body).unwrap();
        let err = impatient(&origin)
            .send(req, b"", None, Limits::default())
            .await
            .unwrap_err();
        assert!(
            matches!(err, UpstreamError::RequestBodyTimeout { .. }),
            "{err}"
        );
        assert_eq!(err.status(), StatusCode::REQUEST_TIMEOUT);
        assert!(!err.is_server_fault());
        drop(tx);
    })
    .await
    .expect("bounded");
}

/// An upload the server stops reading (its window full, the client's body
/// still ready) is the server's stall: a first-byte timeout against it.
#[tokio::test]
async fn an_upload_the_server_stops_reading_times_out_against_the_server() {
    bounded(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = ServerConfig::new(listener.local_addr().unwrap().to_string());
        let deaf = tokio::spawn(async move {
            let (_tcp, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let pool = Pool::new(&BackendConfig {
            name: "deaf".into(),
            servers: vec![server],
            timeouts: Timeouts {
                connect: Duration::from_secs(2),
                first_byte: Duration::from_millis(300),
                total: Duration::from_secs(10),
            },
            ..Default::default()
        })
        .unwrap();
        // Far more than the socket buffers hold, all of it ready at once.
        let req = Request::post("/upload")
            .body(Full::new(Bytes::from(vec![b'x'; 64 << 20])))
            .unwrap();
        let err = pool
            .send(req, b"", None, Limits::default())
            .await
            .unwrap_err();
        assert!(
            matches!(err, UpstreamError::FirstByteTimeout { .. }),
            "{err}"
        );
        assert!(err.is_server_fault());
        deaf.abort();
    })
    .await
    .expect("bounded");
}

/// An upload that never has to wait (a body always ready, an origin that
/// reads as fast as it comes and never answers) spends its task's
/// cooperative budget on ready I/O: the total limit must still end it (it
/// keeps moving, so the first-byte limit does not apply while it lasts).
#[tokio::test]
async fn an_upload_that_never_waits_still_times_out() {
    bounded(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = ServerConfig::new(listener.local_addr().unwrap().to_string());
        let drain = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut sink = tokio::io::sink();
            let _ = tokio::io::copy(&mut tcp, &mut sink).await;
        });
        let pool = Pool::new(&BackendConfig {
            name: "drain".into(),
            servers: vec![server],
            timeouts: Timeouts {
                connect: Duration::from_secs(2),
                first_byte: Duration::from_millis(300),
                total: Duration::from_secs(1),
            },
            ..Default::default()
        })
        .unwrap();
        let chunk = Bytes::from(vec![b'x'; 512]);
        let endless = futures_util::stream::repeat_with(move || {
            Ok::<_, Infallible>(Frame::data(chunk.clone()))
        });
        let req = Request::post("/upload")
            .body(StreamBody::new(endless))
            .unwrap();
        let err = pool
            .send(req, b"", None, Limits::default())
            .await
            .unwrap_err();
        assert!(matches!(err, UpstreamError::TotalTimeout { .. }), "{err}");
        drain.abort();
    })
    .await
    .expect("the total limit ended the upload");
}

/// Interim heads met during an upload count toward the same cap.
#[tokio::test]
async fn interim_heads_during_an_upload_count_toward_the_cap() {
    bounded(async {
        let flood: &'static [u8] = "HTTP/1.1 100 Continue\r\n\r\n".repeat(40).leak().as_bytes();
        let origin = Origin::start(vec![Step::AnswerWhileReading(
            flood,
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        )])
        .await;
        let (body, tx) = streamed(b"part one, ");
        let req = Request::post("/upload").body(body).unwrap();
        let sending = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = tx.send(Bytes::from_static(b"part two")).await;
        });
        let err = origin
            .pool()
            .send(req, b"", None, Limits::default())
            .await
            .unwrap_err();
        assert_eq!(err.status(), StatusCode::BAD_GATEWAY, "{err}");
        assert!(format!("{err:?}").contains("TooManyInterim"), "{err:?}");
        sending.abort();
    })
    .await
    .unwrap();
}

/// A body that never stalls (an origin writing chunks as fast as it can,
/// forever) still meets the total limit.
#[tokio::test]
async fn an_endless_fast_body_still_meets_the_total_limit() {
    bounded(async {
        // A thread of its own writes, so that the reader finds bytes waiting
        // at every read however the runtime schedules its tasks.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = ServerConfig::new(listener.local_addr().unwrap().to_string());
        let flood = std::thread::spawn(move || {
            use std::io::{Read as _, Write as _};
            let (mut tcp, _) = listener.accept().unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = tcp.read(&mut buf);
            let _ = tcp.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n");
            let chunk = [b"4000\r\n".as_slice(), &[b'x'; 0x4000], b"\r\n"].concat();
            let many = chunk.repeat(8);
            // Ends when the reader, timed out, closes the connection.
            while tcp.write_all(&many).is_ok() {}
        });
        let pool = Pool::new(&BackendConfig {
            name: "flood".into(),
            servers: vec![server],
            ..Default::default()
        })
        .unwrap();
        let req = Request::get("/endless")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let limits = Limits {
            total: Some(Duration::from_millis(300)),
            ..Limits::default()
        };
        let resp = pool.send(req, b"", None, limits).await.unwrap();
        let mut body = resp.into_body();
        // Frames are read and dropped, so memory stays flat however long it runs.
        let err = loop {
            match body.frame().await {
                Some(Ok(_)) => {}
                Some(Err(e)) => break e,
                None => panic!("an endless body ended"),
            }
        };
        assert!(err.to_string().contains("total time limit"), "{err}");
        drop(body);
        tokio::task::spawn_blocking(move || flood.join().unwrap())
            .await
            .unwrap();
    })
    .await
    .expect("the total limit ended the body");
}
