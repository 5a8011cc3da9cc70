//! The compiled decision tree gives exactly the answers of the ordered rule
//! list: for random policies (written as text, loaded through the whole
//! pipeline) and random requests drawn from the same small vocabularies, the
//! rule [`Policy::decide`] picks is the first rule, in policy order, whose
//! condition holds ([`eval::first_match`]).

use http::{HeaderMap, HeaderValue, Method};
use portico::policy::eval::{self, Request, Scheme};
use portico::policy::model::Cond;
use portico::policy::{self, Policy};
use proptest::prelude::*;
use std::fmt::Write as _;
use std::net::IpAddr;

const HOSTS: &[&str] = &[
    "a.example",
    "b.example",
    "shop.a.example",
    "x.y.example",
    "other.org",
    "a.b.c",
    "example",
];
const SUFFIXES: &[&str] = &[".example", ".a.example", ".org", ".c", ".b.c", ".y.example"];
const PATHS: &[&str] = &[
    "/",
    "/a",
    "/ab",
    "/abc.css",
    "/api",
    "/api/",
    "/api/v1/users",
    "/api/v2/items/42",
    "/API/v1/users",
    "/static/app.css",
    "/static/img/logo.png",
    "/img/a.png",
    "/r1/abc/12",
    "/r1/abc/x",
    "/docs/index.html",
    "/docs/",
];
const PREFIXES: &[&str] = &[
    "/", "/a", "/ab", "/api", "/api/", "/api/v1", "/static/", "/img", "/r1/", "/docs",
];
/// Anchored regexes (with and without literal prefixes) and unanchored ones.
const REGEXES: &[&str] = &[
    r"^/api/v[0-9]+/",
    r"^/static/.*\.css$",
    r"^/r1/[a-z]+/[0-9]+$",
    r"^/a",
    r"^/(api|img)/",
    r"^/ab?c?",
    r"(?i)^/API/",
    r"^/docs/[a-z]+\.html$",
    r"^/$",
    r"^[a-z/]+$",
    r"\.css$",
    r"\.png$",
    r"v[12]",
    r"/[0-9]+$",
    r"img",
    r"^(/a|/b)",
    r"(^/x)|css",
    r"users$",
    r"(?i)\.PNG$",
    r"(a|b)\.css$",
    r"/v[0-9]/[a-z]+$",
];
const PATH_SUFFIXES: &[&str] = &[".css", ".png", "users", "/", "c.css", "42"];
const GLOBS: &[&str] = &[
    "/static/*.css",
    "/img/**",
    "/api/*/users",
    "/*.css",
    "/a?c.css",
    "/docs/*",
    "/**",
];
const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE"];
const NETS: &[&str] = &["10.0.0.0/8", "192.168.1.0/24", "::1/128"];
const IPS: &[&str] = &["10.1.2.3", "192.168.1.7", "192.168.2.7", "::1", "8.8.8.8"];

/// A generated condition, rendered as policy text.
#[derive(Debug, Clone)]
enum C {
    HostEq(usize),
    HostIn(Vec<usize>),
    HostSuffix(usize),
    PathEq(usize),
    PathPrefix(usize),
    PathSuffix(usize),
    PathRegex(usize),
    PathGlob(usize),
    MethodEq(usize),
    MethodIn(Vec<usize>),
    Header(bool),
    HeaderEq(bool, u8),
    Cookie,
    CookieEq(u8),
    Query,
    QueryEq(u8),
    ClientIp(Vec<usize>),
    And(Vec<C>),
    Or(Vec<C>),
    Not(Box<C>),
}

fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        if c == '\\' || c == '"' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

fn header_name(b: bool) -> &'static str {
    if b {
        "X-B"
    } else {
        "X-A"
    }
}

fn list(items: &[usize], vocab: &[&str], quoted: bool) -> String {
    let parts: Vec<String> = items
        .iter()
        .map(|&i| {
            if quoted {
                quote(vocab[i])
            } else {
                vocab[i].to_string()
            }
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

impl C {
    fn render(&self, out: &mut String) {
        let _ = match self {
            C::HostEq(i) => write!(out, "host == {}", quote(HOSTS[*i])),
            C::HostIn(is) => write!(out, "host in {}", list(is, HOSTS, true)),
            C::HostSuffix(i) => write!(out, "host $= {}", quote(SUFFIXES[*i])),
            C::PathEq(i) => write!(out, "path == {}", quote(PATHS[*i])),
            C::PathPrefix(i) => write!(out, "path ^= {}", quote(PREFIXES[*i])),
            C::PathSuffix(i) => write!(out, "path $= {}", quote(PATH_SUFFIXES[*i])),
            C::PathRegex(i) => write!(out, "path ~ {}", quote(REGEXES[*i])),
            C::PathGlob(i) => write!(out, "path glob {}", quote(GLOBS[*i])),
            C::MethodEq(i) => write!(out, "method == {}", METHODS[*i]),
            C::MethodIn(is) => write!(out, "method in {}", list(is, METHODS, false)),
            C::Header(b) => write!(out, "header({})", quote(header_name(*b))),
            C::HeaderEq(b, v) => write!(out, "header({}) == \"{v}\"", quote(header_name(*b))),
            C::Cookie => write!(out, "cookie(\"session\")"),
            C::CookieEq(v) => write!(out, "cookie(\"session\") == \"{v}\""),
            C::Query => write!(out, "query(\"q\")"),
            C::QueryEq(v) => write!(out, "query(\"q\") == \"{v}\""),
            C::ClientIp(is) => write!(out, "client.ip in {}", list(is, NETS, false)),
            C::And(parts) | C::Or(parts) => {
                let op = if matches!(self, C::And(_)) {
                    " and "
                } else {
                    " or "
                };
                out.push('(');
                for (i, p) in parts.iter().enumerate() {
                    if i > 0 {
                        out.push_str(op);
                    }
                    p.render(out);
                }
                out.push(')');
                Ok(())
            }
            C::Not(inner) => {
                out.push_str("not (");
                inner.render(out);
                out.push(')');
                Ok(())
            }
        };
    }
}

fn indexes(n: usize, max: usize) -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(0..n, 1..=max)
}

fn atom() -> impl Strategy<Value = C> {
    prop_oneof![
        3 => (0..HOSTS.len()).prop_map(C::HostEq),
        1 => indexes(HOSTS.len(), 3).prop_map(C::HostIn),
        2 => (0..SUFFIXES.len()).prop_map(C::HostSuffix),
        2 => (0..PATHS.len()).prop_map(C::PathEq),
        3 => (0..PREFIXES.len()).prop_map(C::PathPrefix),
        2 => (0..PATH_SUFFIXES.len()).prop_map(C::PathSuffix),
        4 => (0..REGEXES.len()).prop_map(C::PathRegex),
        2 => (0..GLOBS.len()).prop_map(C::PathGlob),
        1 => (0..METHODS.len()).prop_map(C::MethodEq),
        1 => indexes(METHODS.len(), 3).prop_map(C::MethodIn),
        1 => any::<bool>().prop_map(C::Header),
        1 => (any::<bool>(), 1..3u8).prop_map(|(b, v)| C::HeaderEq(b, v)),
        1 => Just(C::Cookie),
        1 => (1..3u8).prop_map(C::CookieEq),
        1 => Just(C::Query),
        1 => (1..3u8).prop_map(C::QueryEq),
        1 => indexes(NETS.len(), 2).prop_map(C::ClientIp),
    ]
}

fn cond() -> impl Strategy<Value = C> {
    atom().prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            3 => prop::collection::vec(inner.clone(), 2..=4).prop_map(C::And),
            1 => prop::collection::vec(inner.clone(), 2..=3).prop_map(C::Or),
            1 => inner.prop_map(|c| C::Not(Box::new(c))),
        ]
    })
}

/// A rule's condition: none, or mostly a conjunction whose parts the tree can index.
fn when() -> impl Strategy<Value = Option<C>> {
    prop_oneof![
        1 => Just(None),
        6 => cond().prop_map(Some),
    ]
}

fn policy_text(rules: &[Option<C>]) -> String {
    let mut text = String::from("backend b {\n  server \"127.0.0.1:9000\"\n}\n");
    for (i, r) in rules.iter().enumerate() {
        let _ = write!(text, "rule r{i} ");
        if let Some(c) = r {
            text.push_str("when ");
            c.render(&mut text);
        }
        text.push_str(" {\n  route b\n}\n");
    }
    text
}

/// A generated request: indexes into the vocabularies.
#[derive(Debug, Clone)]
struct Req {
    host: usize,
    path: usize,
    method: usize,
    headers: Vec<(bool, u8)>,
    cookie: Option<u8>,
    query: Option<u8>,
    ip: Option<usize>,
}

fn request() -> impl Strategy<Value = Req> {
    (
        0..HOSTS.len(),
        0..PATHS.len(),
        0..METHODS.len(),
        prop::collection::vec((any::<bool>(), 1..3u8), 0..=2),
        prop::option::of(1..3u8),
        prop::option::of(1..3u8),
        prop::option::of(0..IPS.len()),
    )
        .prop_map(|(host, path, method, headers, cookie, query, ip)| Req {
            host,
            path,
            method,
            headers,
            cookie,
            query,
            ip,
        })
}

struct Owned {
    method: Method,
    headers: HeaderMap,
    query: String,
    ip: Option<IpAddr>,
}

impl Req {
    fn owned(&self) -> Owned {
        let mut headers = HeaderMap::new();
        for (b, v) in &self.headers {
            headers.append(header_name(*b), HeaderValue::from(*v as u32));
        }
        if let Some(v) = self.cookie {
            headers.append(
                http::header::COOKIE,
                HeaderValue::from_str(&format!("a=0; session={v}")).expect("ascii"),
            );
        }
        Owned {
            method: Method::from_bytes(METHODS[self.method].as_bytes()).expect("method"),
            headers,
            query: self.query.map(|v| format!("x=1&q={v}")).unwrap_or_default(),
            ip: self.ip.map(|i| IPS[i].parse().expect("ip")),
        }
    }
}

fn view<'a>(r: &Req, o: &'a Owned) -> Request<'a> {
    Request {
        method: &o.method,
        scheme: Scheme::Https,
        host: HOSTS[r.host],
        path: PATHS[r.path],
        query: &o.query,
        headers: &o.headers,
        client_ip: o.ip,
    }
}

fn load(text: &str) -> Policy {
    match policy::load(text, "generated.policy") {
        Ok(p) => p,
        Err(e) => panic!("generated policy does not load:\n{text}\n{e}"),
    }
}

/// The tree's answer and the ordered list's answer for one request.
fn both(policy: &Policy, req: &Request<'_>) -> (Option<usize>, Option<usize>) {
    let conds: Vec<&Cond> = policy.model.rules.iter().map(|r| &r.when).collect();
    (policy.decide(req).index, eval::first_match(&conds, req))
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 300,
        rng_algorithm: proptest::test_runner::RngAlgorithm::XorShift,
        ..ProptestConfig::default()
    })]

    #[test]
    fn tree_agrees_with_first_match(
        rules in prop::collection::vec(when(), 1..=40),
        requests in prop::collection::vec(request(), 50),
    ) {
        let text = policy_text(&rules);
        let policy = load(&text);
        prop_assert_eq!(policy.model.rules.len(), rules.len());
        for r in &requests {
            let owned = r.owned();
            let req = view(r, &owned);
            let (tree, list) = both(&policy, &req);
            prop_assert_eq!(tree, list, "request {:?}\npolicy:\n{}\ntree:\n{}", r, text, policy.tree.dump());
        }
    }
}

/// Many path regexes in one leaf are answered by one regex set; the set must
/// agree with trying them in turn, including entries without a regex in between.
#[test]
fn regex_sets_agree_with_first_match() {
    let mut rules: Vec<Option<C>> = (0..REGEXES.len()).map(|i| Some(C::PathRegex(i))).collect();
    rules.insert(3, Some(C::MethodEq(2)));
    rules.insert(7, Some(C::And(vec![C::PathRegex(10), C::Header(false)])));
    rules.push(None);
    let policy = load(&policy_text(&rules));
    assert!(policy.tree.dump().contains("[regex set]"));
    for path in 0..PATHS.len() {
        for method in [0, 2] {
            for headers in [vec![], vec![(false, 1)]] {
                let r = Req {
                    host: 0,
                    path,
                    method,
                    headers,
                    cookie: None,
                    query: None,
                    ip: None,
                };
                let owned = r.owned();
                let (tree, list) = both(&policy, &view(&r, &owned));
                assert_eq!(tree, list, "{r:?}");
            }
        }
    }
}
