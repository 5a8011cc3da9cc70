//! Requests built from text (`GET https://host/path?q`), the `test` blocks
//! inside policy files, and the explanation of a decision.

use super::ast::{TestBlock, ValueKind};
use super::eval::{Request, Response, Scheme};
use super::model::{EditOp, HeaderEdit, Outcome, RuleSpec};
use super::{Decision, Policy};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::Duration;

/// A request owned in full, from which a [`Request`] view is taken.
#[derive(Debug, Clone)]
pub struct OwnedRequest {
    pub method: Method,
    pub scheme: Scheme,
    pub host: String,
    pub path: String,
    pub query: String,
    pub headers: HeaderMap,
    pub client_ip: Option<IpAddr>,
}

impl OwnedRequest {
    /// Builds a request from a method, an absolute URL, headers and a client address.
    pub fn new(
        method: &str,
        url: &str,
        headers: &[(String, String)],
        client_ip: Option<&str>,
    ) -> Result<OwnedRequest, String> {
        let method = Method::from_bytes(method.to_ascii_uppercase().as_bytes())
            .map_err(|_| format!("`{method}` is not an HTTP method"))?;
        let (scheme, rest) = if let Some(r) = url.strip_prefix("https://") {
            (Scheme::Https, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (Scheme::Http, r)
        } else {
            return Err(format!(
                "`{url}` is not an absolute http:// or https:// URL"
            ));
        };
        let (authority, path_query) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, "/"),
        };
        // Spelt as the running proxy reads it.
        let normalized = super::eval::normalize_escapes(path_query);
        let path_query = normalized.as_deref().unwrap_or(path_query);
        let (path, query) = path_query.split_once('?').unwrap_or((path_query, ""));
        if authority.is_empty() {
            return Err(format!("`{url}` has no host"));
        }
        let mut map = HeaderMap::new();
        for (n, v) in headers {
            let name = HeaderName::from_bytes(n.as_bytes())
                .map_err(|_| format!("`{n}` is not a valid header name"))?;
            let value = HeaderValue::from_str(v)
                .map_err(|_| format!("`{v}` is not a valid header value"))?;
            map.append(name, value);
        }
        let client_ip = client_ip
            .map(|ip| {
                ip.parse::<IpAddr>()
                    .map_err(|_| format!("`{ip}` is not an IP address"))
            })
            .transpose()?;
        Ok(OwnedRequest {
            method,
            scheme,
            // As the proxy reads a host: a root dot names the same host.
            host: {
                let host = strip_port(authority);
                match host.strip_suffix('.') {
                    Some(name) if !name.is_empty() && !name.ends_with('.') => name,
                    _ => host,
                }
                .to_ascii_lowercase()
            },
            path: path.to_string(),
            query: query.to_string(),
            headers: map,
            client_ip,
        })
    }

    /// Parses `"GET https://host/path?q"`.
    pub fn from_line(
        line: &str,
        headers: &[(String, String)],
        client_ip: Option<&str>,
    ) -> Result<OwnedRequest, String> {
        let (method, url) = line
            .trim()
            .split_once(char::is_whitespace)
            .ok_or_else(|| format!("expected \"METHOD URL\", found `{line}`"))?;
        OwnedRequest::new(method, url.trim(), headers, client_ip)
    }

    pub fn view(&self) -> Request<'_> {
        Request {
            method: &self.method,
            scheme: self.scheme,
            host: &self.host,
            path: &self.path,
            query: &self.query,
            headers: &self.headers,
            client_ip: self.client_ip,
        }
    }
}

/// The host of an authority without its port (`[::1]:80` gives `[::1]`).
pub fn strip_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return match authority.find(']') {
            Some(i) => &authority[..=i],
            None => authority,
        };
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    }
}

/// Formats a duration the way policies write it.
pub fn fmt_duration(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    for (unit, n) in [
        ("w", 604_800_000),
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms >= n && ms % n == 0 {
            return format!("{}{unit}", ms / n);
        }
    }
    format!("{ms}ms")
}

/// The outcome of one test block.
#[derive(Debug, Clone)]
pub struct TestResult {
    pub name: String,
    pub line: usize,
    /// One line per expectation that did not hold; empty when the test passed.
    pub failures: Vec<String>,
}

impl TestResult {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

fn edited(base: &HeaderMap, edits: &[HeaderEdit]) -> HeaderMap {
    let mut h = base.clone();
    for e in edits {
        e.apply(&mut h);
    }
    h
}

/// Runs every test block of a policy.
pub fn run_tests(policy: &Policy) -> Vec<TestResult> {
    policy.tests.iter().map(|t| run_test(policy, t)).collect()
}

fn arg_text(v: &super::ast::Value) -> String {
    match &v.kind {
        ValueKind::Str(s) | ValueKind::Word(s) | ValueKind::Addr(s) => s.clone(),
        ValueKind::Number(n) => n.to_string(),
        ValueKind::Duration(ms) => fmt_duration(Duration::from_millis(*ms)),
        ValueKind::Size(b) => format!("{b}B"),
        other => other.describe().to_string(),
    }
}

fn run_test(policy: &Policy, t: &TestBlock) -> TestResult {
    let line = policy.source.line_col(t.span.start).0;
    let mut failures = vec![];
    let Some(r) = &t.request else {
        return TestResult {
            name: t.name.clone(),
            line,
            failures: vec!["the test has no `request`".into()],
        };
    };
    let url = arg_text(&r.url);
    let client_ip = r.client_ip.as_ref().map(arg_text);
    let req = match OwnedRequest::new(&r.method.name, &url, &r.headers, client_ip.as_deref()) {
        Ok(req) => req,
        Err(e) => {
            return TestResult {
                name: t.name.clone(),
                line,
                failures: vec![e],
            }
        }
    };
    let view = req.view();
    let d = policy.decide(&view);
    let resp_headers = t.response.as_ref().map(|resp| {
        let mut h = HeaderMap::new();
        for (n, v) in &resp.headers {
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(n.as_bytes()),
                HeaderValue::from_str(v),
            ) {
                h.append(n, v);
            }
        }
        h
    });
    let resp_status = t
        .response
        .as_ref()
        .map(|r| arg_text(&r.status).parse::<u16>().unwrap_or(200));
    let resp_actions = match (&resp_headers, resp_status) {
        (Some(h), Some(status)) => {
            Some(policy.decide_response(&view, &Response { status, headers: h }))
        }
        _ => None,
    };
    let spec = d.rule;
    for e in &t.expects {
        let args: Vec<String> = e.args.iter().map(arg_text).collect();
        let want = args.join(" ");
        let got: String = match e.what.name.as_str() {
            "rule" => match d.index {
                Some(_) => spec.name.clone(),
                None => "none".into(),
            },
            "backend" => match &spec.outcome {
                Outcome::Forward(b) => policy.model.backends[*b].name.clone(),
                _ => "none".into(),
            },
            "cache" => if spec.cache.is_some() { "on" } else { "off" }.into(),
            "cache_key" => policy.cache_key(&d, &view).unwrap_or_else(|| "none".into()),
            "ttl" => ttl_of(spec, resp_actions.as_ref().and_then(|a| a.ttl)),
            // A response rule's window overrides the request rule's, as for `ttl`.
            "stale_while_revalidate" => spec
                .cache
                .as_ref()
                .and_then(|c| {
                    resp_actions
                        .as_ref()
                        .and_then(|a| a.stale_while_revalidate)
                        .or(c.stale_while_revalidate)
                })
                .map(fmt_duration)
                .unwrap_or_else(|| "none".into()),
            "stale_if_error" => spec
                .cache
                .as_ref()
                .and_then(|c| {
                    resp_actions
                        .as_ref()
                        .and_then(|a| a.stale_if_error)
                        .or(c.stale_if_error)
                })
                .map(fmt_duration)
                .unwrap_or_else(|| "none".into()),
            "status" => match &spec.outcome {
                Outcome::Redirect { status, .. }
                | Outcome::Deny { status }
                | Outcome::Respond { status, .. } => status.to_string(),
                Outcome::NoRoute => "404".into(),
                Outcome::Forward(_) => "forward".into(),
            },
            "location" => match &spec.outcome {
                Outcome::Redirect { location, .. } => location.clone(),
                _ => "none".into(),
            },
            "body" => match &spec.outcome {
                Outcome::Respond { body, .. } => String::from_utf8_lossy(body).into_owned(),
                _ => "none".into(),
            },
            "throttle" => spec
                .limiter
                .map(|l| policy.model.limiters[l].name.clone())
                .unwrap_or_else(|| "none".into()),
            "compress" => spec
                .compress
                .as_ref()
                .map(|c| {
                    c.algorithms
                        .iter()
                        .map(|a| a.as_str())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_else(|| "off".into()),
            "store" => match &resp_actions {
                None => {
                    failures.push(format!(
                        "line {}: `expect store` needs a `response` in the test",
                        policy.source.line_col(e.span.start).0
                    ));
                    continue;
                }
                Some(a) => (spec.cache.is_some() && !a.no_store).to_string(),
            },
            "request_header" | "response_header" => {
                let Some(name) = args.first() else {
                    failures.push("`expect request_header` needs a header name".into());
                    continue;
                };
                let headers = if e.what.name == "request_header" {
                    edited(&req.headers, &spec.request_headers)
                } else {
                    let base = resp_headers.clone().unwrap_or_default();
                    let mut h = edited(&base, &spec.response_headers);
                    if let Some(a) = &resp_actions {
                        h = edited(&h, &a.headers);
                    }
                    h
                };
                let got = headers
                    .get_all(name.as_str())
                    .iter()
                    .map(|v| v.to_str().unwrap_or("?").to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                let want_value = args[1..].join(" ");
                let got = if got.is_empty() {
                    "absent".to_string()
                } else {
                    got
                };
                let want_value = if want_value.is_empty() {
                    "absent".to_string()
                } else {
                    want_value
                };
                if got != want_value {
                    failures.push(format!(
                        "line {}: expected {} {name} to be {want_value}, got {got}",
                        policy.source.line_col(e.span.start).0,
                        e.what.name
                    ));
                }
                continue;
            }
            other => {
                failures.push(format!(
                    "line {}: unknown expectation `{other}` (rule, backend, cache, cache_key, ttl, stale_while_revalidate, stale_if_error, status, location, body, throttle, compress, store, request_header, response_header)",
                    policy.source.line_col(e.span.start).0
                ));
                continue;
            }
        };
        if got != want {
            failures.push(format!(
                "line {}: expected {} {want}, got {got}",
                policy.source.line_col(e.span.start).0,
                e.what.name
            ));
        }
    }
    TestResult {
        name: t.name.clone(),
        line,
        failures,
    }
}

fn ttl_of(spec: &RuleSpec, response_ttl: Option<Duration>) -> String {
    match (&spec.cache, response_ttl) {
        (None, _) => "none".into(),
        (Some(_), Some(t)) => fmt_duration(t),
        (Some(c), None) => c.ttl.map(fmt_duration).unwrap_or_else(|| "origin".into()),
    }
}

/// A human-readable explanation of a decision: the rule, the path through
/// the tree, and every field of the decision.
pub fn explain(policy: &Policy, req: &OwnedRequest) -> String {
    let view = req.view();
    let (d, trace) = policy.decide_traced(&view);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "request: {} {}://{}{}{}{}",
        req.method,
        req.scheme.as_str(),
        req.host,
        req.path,
        if req.query.is_empty() { "" } else { "?" },
        req.query
    );
    match d.index {
        Some(_) => {
            let _ = writeln!(
                out,
                "rule:    {} ({}:{})",
                d.rule.name, policy.source.name, d.rule.line
            );
        }
        None => {
            let _ = writeln!(out, "rule:    none matched");
        }
    }
    let _ = writeln!(out, "tree:");
    for step in &trace {
        let _ = writeln!(out, "  {step}");
    }
    explain_decision(policy, &d, &view, &mut out);
    out
}

fn explain_decision(policy: &Policy, d: &Decision<'_>, view: &Request<'_>, out: &mut String) {
    let spec = d.rule;
    let outcome = match &spec.outcome {
        Outcome::Forward(b) => {
            let b = &policy.model.backends[*b];
            let servers: Vec<String> = b
                .servers
                .iter()
                .map(|s| {
                    format!(
                        "{} weight {}{}",
                        s.addr,
                        s.weight,
                        if s.backup { " backup" } else { "" }
                    )
                })
                .collect();
            match &b.static_dir {
                Some((root, _)) => format!(
                    "route to backend `{}` (static files in {})",
                    b.name,
                    root.display()
                ),
                None => format!(
                    "route to backend `{}` [{}] balance {}",
                    b.name,
                    servers.join(", "),
                    b.balance.as_str()
                ),
            }
        }
        Outcome::Redirect { status, location } => format!("redirect {status} to {location}"),
        Outcome::Deny { status } => format!("deny with {status}"),
        Outcome::Respond { status, body, .. } => format!("respond {status} ({} bytes)", body.len()),
        Outcome::NoRoute => "404: no rule matches".to_string(),
    };
    let _ = writeln!(out, "outcome: {outcome}");
    match &spec.cache {
        None => {
            let _ = writeln!(out, "cache:   off (bypass)");
        }
        Some(c) => {
            let key = policy.cache_key(d, view).unwrap_or_default();
            let _ = writeln!(out, "cache:   key {key:?}");
            let _ = writeln!(
                out,
                "         ttl {}, stale_while_revalidate {}, stale_if_error {}, origin Cache-Control {}",
                c.ttl.map(fmt_duration).unwrap_or_else(|| "from origin".into()),
                c.stale_while_revalidate.map(fmt_duration).unwrap_or_else(|| "from origin".into()),
                c.stale_if_error.map(fmt_duration).unwrap_or_else(|| "from origin".into()),
                match c.origin {
                    super::model::OriginControl::Honor => "honored",
                    super::model::OriginControl::Ignore => "ignored",
                }
            );
        }
    }
    match &spec.compress {
        None => {
            let _ = writeln!(out, "compress: off");
        }
        Some(c) => {
            let algs: Vec<&str> = c.algorithms.iter().map(|a| a.as_str()).collect();
            let _ = writeln!(
                out,
                "compress: {} for {} from {} bytes",
                algs.join(", "),
                c.types.join(" "),
                c.min_size
            );
        }
    }
    match spec.limiter {
        None => {
            let _ = writeln!(out, "throttle: none");
        }
        Some(l) => {
            let l = &policy.model.limiters[l];
            let _ = writeln!(
                out,
                "throttle: `{}` {} per {} burst {}",
                l.name,
                l.count,
                fmt_duration(l.per),
                l.burst
            );
        }
    }
    for (label, edits) in [
        ("request headers", &spec.request_headers),
        ("response headers", &spec.response_headers),
    ] {
        for e in edits {
            let _ = writeln!(
                out,
                "{label}: {} {}{}",
                e.op.as_str(),
                e.name,
                match (&e.value, e.op) {
                    (Some(v), EditOp::Set | EditOp::Add) =>
                        format!(" = {:?}", v.to_str().unwrap_or("?")),
                    _ => String::new(),
                }
            );
        }
    }
    let l = &spec.limits;
    if l != &Default::default() {
        let _ = writeln!(
            out,
            "limits: connect {} first_byte {} total {} max_body {}",
            l.connect_timeout
                .map(fmt_duration)
                .unwrap_or_else(|| "backend".into()),
            l.first_byte_timeout
                .map(fmt_duration)
                .unwrap_or_else(|| "backend".into()),
            l.total_timeout
                .map(fmt_duration)
                .unwrap_or_else(|| "backend".into()),
            l.max_body
                .map(|b| b.to_string())
                .unwrap_or_else(|| "default".into()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_from_a_line() {
        let r = OwnedRequest::from_line(
            "get https://Shop.Example:8443/a/b?x=1",
            &[],
            Some("10.0.0.1"),
        )
        .unwrap();
        assert_eq!(r.method, Method::GET);
        assert_eq!(r.host, "shop.example");
        assert_eq!(r.path, "/a/b");
        let escaped =
            OwnedRequest::from_line("GET https://a.test/%61dmin%2f?d%61y=mon", &[], None).unwrap();
        assert_eq!(escaped.path, "/admin%2F");
        assert_eq!(escaped.query, "day=mon");
        let dotted = OwnedRequest::from_line("GET https://A.test.:8443/", &[], None).unwrap();
        assert_eq!(dotted.host, "a.test");
        assert_eq!(r.query, "x=1");
        assert!(OwnedRequest::from_line("GET /relative", &[], None).is_err());
    }

    #[test]
    fn durations_format_in_policy_units() {
        assert_eq!(fmt_duration(Duration::from_secs(7 * 86_400)), "1w");
        assert_eq!(fmt_duration(Duration::from_secs(90)), "90s");
        assert_eq!(fmt_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(fmt_duration(Duration::from_secs(3600)), "1h");
    }
}
