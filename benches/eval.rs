//! How the cost of deciding a request grows with the number of rules, and
//! how long a large policy takes to load.
//!
//! The generated policies mix exact hosts, path prefixes, globs and regexes
//! (half of the rules are regexes: anchored ones with a literal prefix, a
//! share of unanchored suffix regexes, and host-bound anchored ones). The
//! last rule is always an unanchored regex, which a server that tries regexes
//! in turn reaches only after all the others.
//!
//! Run: `cargo bench --bench eval -- --warm-up-time 1 --measurement-time 3`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http::{HeaderMap, Method};
use portico::policy::eval::{Request, Scheme};
use portico::policy::{load, Policy};
use std::fmt::Write as _;
use std::hint::black_box;

const SIZES: [usize; 4] = [10, 100, 1_000, 10_000];

/// A policy of `n` rules. Counted from the end, rule kinds cycle through an
/// unanchored regex, an exact host, a path prefix, a glob, an anchored regex
/// and a host with an anchored regex.
fn policy_text(n: usize) -> String {
    let mut text = String::from("backend app {\n  server \"127.0.0.1:9000\"\n}\n");
    for i in 0..n {
        let when = match (n - 1 - i) % 6 {
            0 => format!(r#"path ~ "\\.ext{i}$""#),
            1 => format!(r#"host == "h{i}.example.com""#),
            2 => format!(r#"path ^= "/p{i}/""#),
            3 => format!(r#"path glob "/g{i}/*.css""#),
            4 => format!(r#"path ~ "^/r{i}/[a-z]+/[0-9]+$""#),
            _ => format!(r#"host == "h{i}.example.com" and path ~ "^/api/v{i}/[a-z]+$""#),
        };
        let _ = writeln!(text, "rule r{i} when {when} {{\n  route app\n}}");
    }
    text
}

/// The requests: (label, host, path, the rule it must pick).
fn requests(n: usize) -> [(&'static str, String, String, Option<usize>); 3] {
    // Rule 0 is a glob: (n - 1) % 6 == 3 for every size benchmarked.
    assert_eq!((n - 1) % 6, 3);
    [
        (
            "first",
            "www.example.com".into(),
            "/g0/app.css".into(),
            Some(0),
        ),
        (
            "last",
            "www.example.com".into(),
            format!("/downloads/file.ext{}", n - 1),
            Some(n - 1),
        ),
        (
            "none",
            "www.example.com".into(),
            "/nothing/here/index.html".into(),
            None,
        ),
    ]
}

fn request<'a>(
    method: &'a Method,
    headers: &'a HeaderMap,
    host: &'a str,
    path: &'a str,
) -> Request<'a> {
    Request {
        method,
        scheme: Scheme::Https,
        host,
        path,
        query: "",
        headers,
        client_ip: None,
    }
}

fn bench_decide(c: &mut Criterion) {
    let method = Method::GET;
    let headers = HeaderMap::new();
    let mut group = c.benchmark_group("decide");
    group.throughput(Throughput::Elements(1));
    for n in SIZES {
        let policy: Policy = load(&policy_text(n), "bench.policy").expect("generated policy loads");
        for (label, host, path, want) in requests(n) {
            let req = request(&method, &headers, &host, &path);
            assert_eq!(policy.decide(&req).index, want, "{label} with {n} rules");
            group.bench_with_input(BenchmarkId::new(label, n), &req, |b, req| {
                b.iter(|| black_box(policy.decide(black_box(req)).index))
            });
        }
    }
    group.finish();
}

fn bench_load(c: &mut Criterion) {
    let text = policy_text(10_000);
    let mut group = c.benchmark_group("load");
    group.sample_size(10);
    group.bench_function("10000", |b| {
        b.iter_with_large_drop(|| load(black_box(&text), "bench.policy").expect("loads"))
    });
    group.finish();
}

criterion_group!(benches, bench_decide, bench_load);
criterion_main!(benches);
