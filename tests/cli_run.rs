//! `portico run` and `portico demo` as processes: the address read from the
//! log, reload on SIGHUP and on a changed file, a refused policy keeping the
//! running one, and SIGTERM draining a request in flight before exiting 0.

mod common;
use common::*;

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Every scenario is bounded by this.
const LIMIT: Duration = Duration::from_secs(40);

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f)
        .await
        .expect("scenario took too long")
}

/// A running `portico` process whose stderr is read line by line; killed
/// when dropped.
struct Portico {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Portico {
    /// `portico run POLICY` on a free port with one worker thread.
    fn spawn_one_thread(policy: &Path) -> Portico {
        let policy = policy.to_str().unwrap();
        Self::spawn(&["run", policy, "--listen", "127.0.0.1:0", "--threads", "1"])
    }

    fn spawn(args: &[&str]) -> Portico {
        Self::spawn_with_env(args, &[])
    }

    fn spawn_with_env(args: &[&str], env: &[(&str, &str)]) -> Portico {
        let mut child = Command::new(env!("CARGO_BIN_EXE_portico"))
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("portico starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, lines) = mpsc::channel();
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let all = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                all.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        Portico { child, lines, log }
    }

    /// Waits for a stderr line containing `needle` and returns it.
    fn wait_line(&self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!(
                    "no line with `{needle}` within {within:?}; stderr:\n{}",
                    self.log.lock().unwrap().join("\n")
                ),
            }
        }
    }

    /// The address of the proxy's listener, from its `listening` log line.
    fn listen_addr(&self) -> SocketAddr {
        let line = self.wait_line("listening addr=", Duration::from_secs(10));
        assert!(!line.contains("admin"), "{line}");
        let after = line.split("addr=").nth(1).expect("addr field");
        after
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap_or_else(|e| panic!("{e}: {line}"))
    }

    fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([format!("-{name}"), self.child.id().to_string()])
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "kill -{name} failed");
    }

    /// Waits for the process to exit and returns its exit code.
    async fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            assert!(Instant::now() < deadline, "portico did not exit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Portico {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two origins answering `a` and `b`, and a policy file in a scratch
/// directory that routes everything to `a`.
struct Site {
    a: Origin,
    b: Origin,
    dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

impl Site {
    async fn routing_to_a() -> Site {
        let a = Origin::start(|_| reply(200, &[], "a")).await;
        let b = Origin::start(|_| reply(200, &[], "b")).await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("site.policy");
        std::fs::write(&path, policy_routing_to(&a, &b, "a")).unwrap();
        Site { a, b, dir, path }
    }
}

fn policy_routing_to(a: &Origin, b: &Origin, target: &str) -> String {
    format!(
        r#"
backend a {{ server "{}" }}
backend b {{ server "{}" }}
rule all {{ route {target} cache off }}
"#,
        a.addr, b.addr
    )
}

/// Rewrites the file but keeps its modification time, so that only a
/// signal (not the file poll) can make Portico notice.
fn rewrite_quietly(path: &Path, text: &str) {
    let mtime = std::fs::metadata(path).unwrap().modified().unwrap();
    std::fs::write(path, text).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_modified(mtime).unwrap();
}

/// Waits until `GET /` through the proxy answers `want`.
async fn until_body(addr: SocketAddr, want: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got = get(addr, "/", &[]).await;
        if got.text() == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still `{}` instead of `{want}` after {within:?}",
            got.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn sighup_reloads_a_good_policy_and_refuses_a_broken_one() {
    bounded(async {
        let Site {
            a,
            b,
            dir: _dir,
            path,
        } = Site::routing_to_a().await;
        // One thread: the single-threaded runtime reloads too.
        let p = Portico::spawn_one_thread(&path);
        let addr = p.listen_addr();
        assert_eq!(get(addr, "/", &[]).await.text(), "a");

        rewrite_quietly(&path, &policy_routing_to(&a, &b, "b"));
        p.signal("HUP");
        p.wait_line("policy reloaded", Duration::from_secs(5));
        assert_eq!(get(addr, "/", &[]).await.text(), "b");

        rewrite_quietly(&path, &policy_routing_to(&a, &b, "missing_backend"));
        p.signal("HUP");
        p.wait_line("reload refused", Duration::from_secs(5));
        p.wait_line("missing_backend", Duration::from_secs(5));
        assert_eq!(get(addr, "/", &[]).await.text(), "b");
    })
    .await;
}

/// Good and broken policies, reloaded by SIGHUP while clients keep sending:
/// no request fails, the broken ones change nothing, and a slow request in
/// flight to a backend that a reload removes still finishes.
#[tokio::test]
async fn reloads_of_good_and_broken_policies_under_load_fail_no_request() {
    bounded(async {
        let a = Origin::start(|_| reply(200, &[], "a")).await;
        let b = Origin::start(|_| reply(200, &[], "b")).await;
        let slow = Origin::start_with_delay(Duration::from_millis(800), |_| {
            reply(200, &[], "slow")
        })
        .await;
        let with_slow = format!(
            "backend slow {{ server \"{}\" }}\nrule slow when path == \"/slow\" {{ route slow cache off }}\n{}",
            slow.addr,
            policy_routing_to(&a, &b, "a")
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("site.policy");
        std::fs::write(&path, &with_slow).unwrap();
        let p = Portico::spawn(&["run", path.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
        let addr = p.listen_addr();
        assert_eq!(get(addr, "/", &[]).await.text(), "a");

        let in_flight = tokio::spawn(async move { get(addr, "/slow", &[]).await });
        let deadline = Instant::now() + Duration::from_secs(5);
        while slow.count() == 0 {
            assert!(Instant::now() < deadline, "the slow request never arrived");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut clients = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let stop = stop.clone();
            clients.spawn(async move {
                let mut seen = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let got = get(addr, "/", &[]).await;
                    assert_eq!(got.status, 200, "{}", got.text());
                    seen.push(got.text());
                }
                seen
            });
        }
        for i in 0..6 {
            let to = if i % 2 == 0 { "b" } else { "a" };
            rewrite_quietly(&path, &policy_routing_to(&a, &b, to));
            p.signal("HUP");
            p.wait_line("policy reloaded", Duration::from_secs(5));
            if i == 0 {
                assert!(!in_flight.is_finished(), "the slow request ended before the reload");
            }
            until_body(addr, to, Duration::from_secs(5)).await;
            rewrite_quietly(&path, &policy_routing_to(&a, &b, "nowhere"));
            p.signal("HUP");
            p.wait_line("reload refused", Duration::from_secs(5));
            let got = get(addr, "/", &[]).await;
            assert_eq!((got.status.as_u16(), got.text()), (200, to.to_owned()));
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut total = Vec::new();
        while let Some(r) = clients.join_next().await {
            total.extend(r.expect("a client failed a request"));
        }
        assert!(total.len() >= 20, "only {} requests", total.len());
        assert!(total.iter().any(|t| t == "a") && total.iter().any(|t| t == "b"));

        let got = in_flight.await.unwrap();
        assert_eq!((got.status.as_u16(), got.text()), (200, "slow".to_owned()));
        // The reloads removed the slow backend: /slow now goes where `/` goes.
        assert_eq!(get(addr, "/slow", &[]).await.text(), "a");
        assert_eq!(slow.count(), 1);
    })
    .await;
}

/// A SIGHUP that comes while Portico starts (here while it opens a disk
/// cache given by `--cache-dir`) is acted on once it has started, and does
/// not kill it.
#[tokio::test]
async fn a_sighup_during_the_start_does_not_kill_portico() {
    bounded(async {
        let Site {
            a: _a,
            b: _b,
            dir,
            path,
        } = Site::routing_to_a().await;
        let cache = dir.path().join("cache");
        let p = Portico::spawn(&[
            "run",
            path.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--cache-dir",
            cache.to_str().unwrap(),
        ]);
        p.wait_line("starting", Duration::from_secs(10));
        p.signal("HUP");
        let addr = p.listen_addr();
        p.wait_line("SIGHUP: reloading", Duration::from_secs(5));
        assert_eq!(get(addr, "/", &[]).await.text(), "a");
        assert!(cache.is_dir(), "the disk cache is where --cache-dir says");
    })
    .await;
}

/// `--admin` opens the admin listener, its token comes from `--admin-token`
/// or else PORTICO_ADMIN_TOKEN, and SIGINT stops Portico with exit code 0.
#[tokio::test]
async fn admin_flags_and_token_variable_reach_the_admin_listener_and_sigint_stops() {
    bounded(async {
        let Site {
            a: _a,
            b: _b,
            dir: _dir,
            path,
        } = Site::routing_to_a().await;
        let path = path.to_str().unwrap();
        let base = [
            "run",
            path,
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ];
        for (flag, env, token) in [
            (Some("from-flag"), Some("from-env"), "from-flag"),
            (None, Some("from-env"), "from-env"),
        ] {
            let mut args = base.to_vec();
            if let Some(t) = flag {
                args.extend(["--admin-token", t]);
            }
            let env: Vec<(&str, &str)> = env
                .map(|t| ("PORTICO_ADMIN_TOKEN", t))
                .into_iter()
                .collect();
            let mut p = Portico::spawn_with_env(&args, &env);
            let line = p.wait_line("admin listening addr=", Duration::from_secs(10));
            let admin: SocketAddr = line
                .split("addr=")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("no address in {line}"));
            let bearer = format!("Bearer {token}");
            let got = get(admin, "/metrics", &[("authorization", &bearer)]).await;
            assert_eq!(got.status, 200, "{token}: {}", got.text());
            assert!(got.text().contains("portico_"), "{}", got.text());
            let got = get(admin, "/metrics", &[("authorization", "Bearer wrong")]).await;
            assert_eq!(got.status, 401);
            p.signal("INT");
            assert_eq!(p.wait_exit(Duration::from_secs(10)).await, Some(0));
        }
    })
    .await;
}

#[tokio::test]
async fn an_edited_policy_file_is_picked_up_without_a_signal() {
    bounded(async {
        let Site {
            a,
            b,
            dir: _dir,
            path,
        } = Site::routing_to_a().await;
        let p = Portico::spawn(&["run", path.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
        let addr = p.listen_addr();
        assert_eq!(get(addr, "/", &[]).await.text(), "a");

        std::fs::write(&path, policy_routing_to(&a, &b, "b")).unwrap();
        // A clearly different modification time, whatever the file system's granularity.
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_modified(SystemTime::now() + Duration::from_secs(5))
            .unwrap();
        until_body(addr, "b", Duration::from_secs(10)).await;
    })
    .await;
}

/// An editor (or `echo ... >`) rewrites a file in place: it is empty for a
/// moment first, and on a coarse clock the full text can even carry the
/// empty file's modification time. The watch loads neither the empty file
/// nor misses the full one.
#[tokio::test]
async fn a_policy_file_rewritten_in_place_is_loaded_only_once_whole() {
    bounded(async {
        let Site {
            a,
            b,
            dir: _dir,
            path,
        } = Site::routing_to_a().await;
        let p = Portico::spawn(&["run", path.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
        let addr = p.listen_addr();
        assert_eq!(get(addr, "/", &[]).await.text(), "a");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let asking = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut wrong = vec![];
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let got = get(addr, "/", &[]).await;
                    if got.status != 200 || !matches!(got.text().as_str(), "a" | "b") {
                        wrong.push(format!("{} {}", got.status, got.text()));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                wrong
            })
        };
        // Three edits, each leaving the file empty for longer than the watch
        // takes between two looks.
        for (turn, target) in ["b", "a", "b"].into_iter().enumerate() {
            std::fs::write(&path, "").unwrap();
            let stamp = SystemTime::now() + Duration::from_secs(5 * (turn as u64 + 1));
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            f.set_modified(stamp).unwrap();
            tokio::time::sleep(Duration::from_millis(600)).await;
            std::fs::write(&path, policy_routing_to(&a, &b, target)).unwrap();
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            f.set_modified(stamp).unwrap();
            until_body(addr, target, Duration::from_secs(10)).await;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let wrong = asking.await.unwrap();
        assert!(
            wrong.is_empty(),
            "answers from a half-written policy: {wrong:?}"
        );
    })
    .await;
}

/// A slow request in flight, a long grace and the admin listener on; the
/// request has reached the origin.
async fn draining_site(
    delay: Duration,
) -> (Origin, tempfile::TempDir, Portico, SocketAddr, SocketAddr) {
    let origin = Origin::start_with_delay(delay, |_| reply(200, &[], "finished")).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("site.policy");
    std::fs::write(
        &path,
        format!(
            "http {{ shutdown_grace 60s }}\n{}",
            policy_for(&origin, "rule all { route app cache off }")
        ),
    )
    .unwrap();
    let p = Portico::spawn(&[
        "run",
        path.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ]);
    // The proxy's listener is logged before the admin one.
    let addr = p.listen_addr();
    let admin = p.wait_line("admin listening addr=", Duration::from_secs(10));
    let admin: SocketAddr = admin
        .split("addr=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {admin}"));
    assert_eq!(get(admin, "/healthz", &[]).await.status, 200);
    tokio::spawn(async move { get(addr, "/slow", &[]).await });
    eventually("the slow request reached the origin", || {
        origin.count() == 1
    })
    .await;
    (origin, dir, p, addr, admin)
}

/// While it drains, Portico says so: its log is written as it goes (not
/// at the exit), and the admin `/healthz` answers 503, so that a load
/// balancer stops sending clients.
#[tokio::test]
async fn a_draining_portico_logs_as_it_goes_and_fails_its_health_check() {
    bounded(async {
        let (_origin, _dir, mut p, _addr, admin) = draining_site(Duration::from_secs(3)).await;
        p.signal("TERM");
        p.wait_line("shutting down", Duration::from_secs(1));
        let got = get(admin, "/healthz", &[]).await;
        assert_eq!(got.status, 503, "{}", got.text());
        assert_eq!(p.wait_exit(Duration::from_secs(10)).await, Some(0));
    })
    .await;
}

/// A second SIGTERM (or SIGINT) during the drain exits at once, with 1.
#[tokio::test]
async fn a_second_signal_ends_the_drain_at_once() {
    bounded(async {
        let (_origin, _dir, mut p, _addr, _admin) = draining_site(Duration::from_secs(30)).await;
        p.signal("TERM");
        p.wait_line("shutting down", Duration::from_secs(5));
        p.signal("INT");
        assert_eq!(p.wait_exit(Duration::from_secs(5)).await, Some(1));
        p.wait_line("a second signal", Duration::from_secs(1));
    })
    .await;
}

#[tokio::test]
async fn sigterm_drains_a_slow_request_and_exits_zero() {
    bounded(async {
        let arrived = Arc::new(tokio::sync::Notify::new());
        let signal = arrived.clone();
        let origin = Origin::start_with_delay(Duration::from_millis(1000), move |_| {
            signal.notify_one();
            reply(200, &[], "finished")
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("site.policy");
        std::fs::write(
            &path,
            policy_for(&origin, "rule all { route app cache off }"),
        )
        .unwrap();
        // One thread: the single-threaded runtime drains too.
        let mut p = Portico::spawn_one_thread(&path);
        let addr = p.listen_addr();
        let in_flight = tokio::spawn(async move { get(addr, "/slow", &[]).await });
        arrived.notified().await;
        p.signal("TERM");
        let got = in_flight.await.unwrap();
        assert_eq!(got.status, 200);
        assert_eq!(got.text(), "finished");
        let code = p.wait_exit(Duration::from_secs(10)).await;
        assert_eq!(code, Some(0));
    })
    .await;
}

#[tokio::test]
async fn run_with_a_backend_flag_serves_from_that_origin() {
    bounded(async {
        let origin =
            Origin::start(|s| reply(200, &[], format!("origin saw {}", s.uri.path()))).await;
        let backend = origin.addr.to_string();
        let p = Portico::spawn(&["run", "-b", &backend, "--listen", "127.0.0.1:0"]);
        let addr = p.listen_addr();
        let got = get(addr, "/hello", &[]).await;
        assert_eq!(got.status, 200);
        assert_eq!(got.text(), "origin saw /hello");
        assert_eq!(origin.count(), 1);
        // One access log line per request, on stderr.
        let line = p.wait_line(" access ", Duration::from_secs(3));
        for field in [
            "method=GET",
            "path=/hello",
            "status=200",
            "rule=default",
            "backend=origin",
            "bytes=17",
            "complete=true",
        ] {
            assert!(line.contains(field), "`{field}` missing from {line}");
        }
    })
    .await;
}

/// Heads the HTTP/1 server cannot take (one that does not parse, one too
/// large, one whose request line alone is too large) are answered 400, 431
/// and 414 and still get an access log line and a count, on a fresh
/// connection and on one whose earlier request had a body.
#[tokio::test]
async fn heads_that_cannot_be_taken_are_answered_and_logged() {
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[], "ok")).await;
        let backend = origin.addr.to_string();
        let p = Portico::spawn(&["run", "-b", &backend, "--listen", "127.0.0.1:0"]);
        let addr = p.listen_addr();
        let within = Duration::from_secs(5);
        let huge = format!(
            "GET /h HTTP/1.1\r\nHost: t\r\nX: {}\r\n\r\n",
            "a".repeat(40_000)
        );
        let after_body = "POST /b HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nok\
                          GET /b HTTP/1.1\r\nHost: t\r\nbad name: x\r\n\r\n";
        let long_target = format!("GET /{} HTTP/1.1\r\nHost: t\r\n\r\n", "a".repeat(400_000));
        for (request, status) in [
            ("GET /x HTTP/1.1\r\nHost: t\r\nbad name: x\r\n\r\n", "400"),
            (huge.as_str(), "431"),
            (long_target.as_str(), "414"),
            (after_body, "400"),
        ] {
            let answer = raw_exchange(addr, request.as_bytes(), within).await;
            let last = answer.rfind("HTTP/1.1 ").expect("an answer");
            assert!(
                answer[last..].starts_with(&format!("HTTP/1.1 {status} ")),
                "{answer}"
            );
            let line = p.wait_line(&format!("status={status}"), within);
            for field in ["method=- ", "path=- ", "rule=- backend=- cache=refused"] {
                assert!(line.contains(field), "`{field}` missing from {line}");
            }
        }
        // The POST before the last one was forwarded.
        assert_eq!(origin.count(), 1);
    })
    .await;
}

#[tokio::test]
async fn json_access_log_lines_parse() {
    bounded(async {
        let origin = Origin::start(|_| reply(200, &[], "ok")).await;
        let backend = origin.addr.to_string();
        let p = Portico::spawn(&[
            "run",
            "-b",
            &backend,
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ]);
        let listening = p.wait_line("\"message\":\"listening\"", Duration::from_secs(10));
        let v: serde_json::Value = serde_json::from_str(listening.trim()).expect("a JSON line");
        let addr: SocketAddr = v["fields"]["addr"].as_str().unwrap().parse().unwrap();
        assert_eq!(get(addr, "/j", &[]).await.status, 200);
        let line = p.wait_line("\"log\":\"access\"", Duration::from_secs(3));
        let v: serde_json::Value = serde_json::from_str(line.trim()).expect("a JSON line");
        assert_eq!(v["path"], "/j");
        assert_eq!(v["status"], 200);
        assert_eq!(v["cache"], "uri-miss");
        assert_eq!(v["bytes"], 2);
        assert_eq!(v["complete"], true);
    })
    .await;
}

#[tokio::test]
async fn demo_exits_zero_and_prints_the_table() {
    bounded(async {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_portico"))
            .arg("demo")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("portico demo runs");
        let mut stdout = String::new();
        let mut pipe = child.stdout.take().unwrap();
        tokio::io::AsyncReadExt::read_to_string(&mut pipe, &mut stdout)
            .await
            .unwrap();
        let status = child.wait().await.unwrap();
        assert!(status.success(), "{status:?}\n{stdout}");
        for row in [
            "requests sent",
            "cold latency (mean)",
            "warm latency (mean)",
            "speed-up",
            "hit ratio",
            "origin requests",
        ] {
            assert!(stdout.contains(row), "`{row}` missing:\n{stdout}");
        }
        // 10 pages, each fetched once from the origin, then served from the cache.
        let origin_row = stdout
            .lines()
            .find(|l| l.contains("origin requests"))
            .unwrap();
        assert!(origin_row.trim_end().ends_with(" 10"), "{origin_row}");
    })
    .await;
}
