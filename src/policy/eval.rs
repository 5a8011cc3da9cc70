//! Walking the decision tree for one request: pure, allocation-free in the
//! common case, and benchmarked (`benches/eval.rs`).
//!
//! [`first_match`] is the reference semantics: try the rules in order. The
//! tree walk must give the same answer; a property test checks it.

use super::ast::CmpOp;
use super::model::{Atom, Cond, Field, KeyPart, ResponseActions, ResponseRuleSpec, Test};
use super::tree::{trie_child, PathIndex, RuleIdx, RuleList, Tree};
use http::{HeaderMap, Method};
use std::fmt::Write as _;
use std::net::IpAddr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// The request as the policy sees it. `host` is lowercase, without a port.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a Method,
    pub scheme: Scheme,
    pub host: &'a str,
    pub path: &'a str,
    /// The query string without `?`; empty when there is none.
    pub query: &'a str,
    pub headers: &'a HeaderMap,
    pub client_ip: Option<IpAddr>,
}

/// The response as response rules see it.
#[derive(Debug, Clone, Copy)]
pub struct Response<'a> {
    pub status: u16,
    pub headers: &'a HeaderMap,
}

/// The value of a query parameter (raw, not percent-decoded).
pub fn query_param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// The value of a cookie from the request's Cookie headers.
pub fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then_some(v)
        })
}

fn header_str<'h>(headers: &'h HeaderMap, name: &http::HeaderName) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The text of a field, or `None` when absent.
fn field_text<'a>(
    field: &Field,
    req: &Request<'a>,
    resp: Option<&Response<'a>>,
) -> Option<&'a str> {
    match field {
        Field::Method => Some(req.method.as_str()),
        Field::Scheme => Some(req.scheme.as_str()),
        Field::Host => Some(req.host),
        Field::Path => Some(req.path),
        Field::Query => Some(req.query),
        Field::QueryParam(n) => query_param(req.query, n),
        Field::Header(h) => header_str(req.headers, h),
        Field::Cookie(n) => cookie(req.headers, n),
        Field::ClientIp | Field::Status => None,
        Field::ContentType => resp
            .and_then(|r| header_str(r.headers, &http::header::CONTENT_TYPE))
            .map(|ct| ct.split(';').next().unwrap_or("").trim()),
        Field::ResponseHeader(h) => resp.and_then(|r| header_str(r.headers, h)),
    }
}

fn present(field: &Field, req: &Request<'_>, resp: Option<&Response<'_>>) -> bool {
    match field {
        Field::Header(h) => req.headers.contains_key(h),
        Field::ResponseHeader(h) => resp.is_some_and(|r| r.headers.contains_key(h)),
        other => field_text(other, req, resp).is_some(),
    }
}

fn num_cmp(op: CmpOp, a: u64, b: u64) -> bool {
    match op {
        CmpOp::Eq => a == b,
        CmpOp::Ne => a != b,
        CmpOp::Ge => a >= b,
        CmpOp::Le => a <= b,
        CmpOp::Gt => a > b,
        CmpOp::Lt => a < b,
        _ => false,
    }
}

/// Evaluates one atom. Absent fields fail every test but `!=` and `!~`.
pub fn eval_atom(a: &Atom, req: &Request<'_>, resp: Option<&Response<'_>>) -> bool {
    match (&a.field, &a.test) {
        (Field::ClientIp, Test::InNets(nets)) => req
            .client_ip
            .is_some_and(|ip| nets.iter().any(|n| n.contains(&ip))),
        (Field::Status, Test::Num(op, n)) => {
            resp.is_some_and(|r| num_cmp(*op, r.status as u64, *n))
        }
        (Field::Status, Test::InSet(set)) => resp.is_some_and(|r| {
            let s = r.status.to_string();
            set.contains(&s)
        }),
        (field, Test::Present) => present(field, req, resp),
        (field, test) => {
            let text = field_text(field, req, resp);
            match (test, text) {
                (Test::Eq(v), Some(t)) => t == v,
                (Test::Ne(v), t) => t != Some(v.as_str()),
                (Test::Prefix(v), Some(t)) => t.starts_with(v.as_str()),
                (Test::Suffix(v), Some(t)) => t.ends_with(v.as_str()),
                (Test::Matches(re), Some(t)) => re.is_match(t),
                (Test::NotMatches(re), t) => !t.is_some_and(|t| re.is_match(t)),
                (Test::InSet(set), Some(t)) => set.iter().any(|s| s == t),
                _ => false,
            }
        }
    }
}

/// Evaluates a condition.
pub fn eval_cond(c: &Cond, req: &Request<'_>, resp: Option<&Response<'_>>) -> bool {
    match c {
        Cond::True => true,
        Cond::Atom(a) => eval_atom(a, req, resp),
        Cond::And(parts) => parts.iter().all(|p| eval_cond(p, req, resp)),
        Cond::Or(parts) => parts.iter().any(|p| eval_cond(p, req, resp)),
        Cond::Not(inner) => !eval_cond(inner, req, resp),
    }
}

/// The reference semantics: the index of the first rule whose condition holds.
pub fn first_match(conds: &[&Cond], req: &Request<'_>) -> Option<usize> {
    conds.iter().position(|c| eval_cond(c, req, None))
}

/// Records the walk for `explain`.
pub trait Trace {
    fn step(&mut self, what: std::fmt::Arguments<'_>);
}

/// Traces nothing: the hot path.
pub struct NoTrace;

impl Trace for NoTrace {
    #[inline(always)]
    fn step(&mut self, _: std::fmt::Arguments<'_>) {}
}

impl Trace for Vec<String> {
    fn step(&mut self, what: std::fmt::Arguments<'_>) {
        self.push(what.to_string());
    }
}

/// The lists a request collects, held on the stack up to a point.
struct Lists<'t> {
    inline: [&'t RuleList; 24],
    len: usize,
    spill: Vec<&'t RuleList>,
}

static EMPTY: RuleList = RuleList {
    entries: Vec::new(),
    set: None,
    next_plain: Vec::new(),
};

impl<'t> Lists<'t> {
    fn new() -> Self {
        Lists {
            inline: [&EMPTY; 24],
            len: 0,
            spill: Vec::new(),
        }
    }

    #[inline]
    fn push(&mut self, l: &'t RuleList) {
        if l.entries.is_empty() {
            return;
        }
        if self.len < self.inline.len() {
            self.inline[self.len] = l;
            self.len += 1;
        } else {
            self.spill.push(l);
        }
    }

    fn get(&self, i: usize) -> &'t RuleList {
        if i < self.len {
            self.inline[i]
        } else {
            self.spill[i - self.len]
        }
    }

    fn count(&self) -> usize {
        self.len + self.spill.len()
    }
}

fn collect_index<'t, T: Trace>(
    idx: &'t PathIndex,
    path: &str,
    lists: &mut Lists<'t>,
    trace: &mut T,
) {
    if let Some(l) = idx.exact.get(path) {
        trace.step(format_args!(
            "  path == {path}: {} rule(s)",
            l.entries.len()
        ));
        lists.push(l);
    }
    let mut node = 0u32;
    if let Some(l) = &idx.trie[0].rules {
        trace.step(format_args!("  any path: {} rule(s)", l.entries.len()));
        lists.push(l);
    }
    for (i, &b) in path.as_bytes().iter().enumerate() {
        match idx.child(node, b) {
            Some(c) => node = c,
            None => break,
        }
        if let Some(l) = &idx.trie[node as usize].rules {
            trace.step(format_args!(
                "  path ^= {}: {} rule(s)",
                &path[..=i],
                l.entries.len()
            ));
            lists.push(l);
        }
    }
    // The suffix trie, from the path's last byte backwards. A node with rules
    // ends a key that is valid UTF-8, so `i` is a character boundary there.
    let mut node = 0u32;
    for (i, &b) in path.as_bytes().iter().enumerate().rev() {
        match trie_child(&idx.suffix_trie, node, b) {
            Some(c) => node = c,
            None => break,
        }
        if let Some(l) = &idx.suffix_trie[node as usize].rules {
            trace.step(format_args!(
                "  path $= {}: {} rule(s)",
                &path[i..],
                l.entries.len()
            ));
            lists.push(l);
        }
    }
}

/// Moves `h` past the entries of `list` whose regex is in the set but did not match.
#[inline]
fn skip_unmatched(list: &RuleList, m: &regex::SetMatches, h: &mut usize) {
    while let Some(e) = list.entries.get(*h) {
        match e.slot {
            Some(slot) if !m.matched(slot as usize) => {
                *h = if m.matched_any() {
                    *h + 1
                } else {
                    list.next_plain[*h] as usize
                };
            }
            _ => break,
        }
    }
}

/// Walks the tree: the index of the rule that applies, if any.
pub fn eval_tree<T: Trace>(tree: &Tree, req: &Request<'_>, trace: &mut T) -> Option<RuleIdx> {
    let mut lists = Lists::new();
    if let Some(idx) = tree.exact_hosts.get(req.host) {
        trace.step(format_args!("host == {}", req.host));
        collect_index(idx, req.path, &mut lists, trace);
    }
    if !tree.suffix_hosts.is_empty() {
        for (i, _) in req.host.match_indices('.') {
            let suffix = &req.host[i..];
            if let Some(idx) = tree.suffix_hosts.get(suffix) {
                trace.step(format_args!("host $= {suffix}"));
                collect_index(idx, req.path, &mut lists, trace);
            }
        }
    }
    trace.step(format_args!("any host"));
    collect_index(&tree.any_host, req.path, &mut lists, trace);

    // Merge the lists by rule order; each list is sorted.
    let n = lists.count();
    let mut heads = [0usize; 64];
    let mut spill_heads = vec![];
    if n > heads.len() {
        spill_heads = vec![0usize; n];
    }
    let mut set_matches: Vec<Option<regex::SetMatches>> = Vec::new();
    loop {
        // The list whose next entry comes first in policy order.
        let mut best: Option<(usize, RuleIdx)> = None;
        for li in 0..n {
            let h = if n > heads.len() {
                spill_heads[li]
            } else {
                heads[li]
            };
            let list = lists.get(li);
            if let Some(e) = list.entries.get(h) {
                if best.is_none_or(|(_, r)| e.rule < r) {
                    best = Some((li, e.rule));
                }
            }
        }
        let (li, rule) = best?;
        let list = lists.get(li);
        let h = if n > heads.len() {
            &mut spill_heads[li]
        } else {
            &mut heads[li]
        };
        let entry = &list.entries[*h];
        *h += 1;
        let residual = &tree.residuals[rule as usize];
        let path_ok = match (&residual.path_regex, entry.slot, &list.set) {
            (None, _, _) => true,
            (Some(_), Some(slot), Some(set)) => {
                if set_matches.is_empty() {
                    set_matches.resize(n, None);
                }
                let m = set_matches[li].get_or_insert_with(|| set.matches(req.path));
                m.matched(slot as usize)
            }
            (Some(re), _, _) => re.is_match(req.path),
        };
        // Once a list's set has run, jump over its entries whose regex did not match.
        if let Some(Some(m)) = set_matches.get(li) {
            let h = if n > heads.len() {
                &mut spill_heads[li]
            } else {
                &mut heads[li]
            };
            skip_unmatched(list, m, h);
        }
        let ok = path_ok && (residual.rest_is_true || eval_cond(&residual.rest, req, None));
        trace.step(format_args!(
            "  try #{} {}: {}",
            rule + 1,
            tree.names[rule as usize],
            if ok { "match" } else { "no" }
        ));
        if ok {
            return Some(rule);
        }
    }
}

/// Applies the response rules in order; later matches override earlier settings.
pub fn eval_response(
    rules: &[ResponseRuleSpec],
    req: &Request<'_>,
    resp: &Response<'_>,
) -> (ResponseActions, Vec<usize>) {
    let mut out = ResponseActions::default();
    let mut matched = vec![];
    for (i, r) in rules.iter().enumerate() {
        if !eval_cond(&r.when, req, Some(resp)) {
            continue;
        }
        matched.push(i);
        let a = &r.actions;
        out.no_store |= a.no_store;
        out.ttl = a.ttl.or(out.ttl);
        out.stale_while_revalidate = a.stale_while_revalidate.or(out.stale_while_revalidate);
        out.stale_if_error = a.stale_if_error.or(out.stale_if_error);
        out.store_set_cookie |= a.store_set_cookie;
        out.headers.extend(a.headers.iter().cloned());
    }
    (out, matched)
}

/// The key a `balance hash` backend picks a server by, or `None` when the
/// request has nothing of its own to go on: the key has header, cookie or
/// query parts and none of them is in the request (a first visit, before
/// its session cookie). Such requests are spread over the servers instead
/// of all going to the one that the empty key hashes to, as HAProxy and
/// NGINX do.
pub fn hash_key(parts: &[KeyPart], req: &Request<'_>) -> Option<String> {
    let optional = |p: &KeyPart| {
        matches!(
            p,
            KeyPart::Header(_) | KeyPart::Cookie(_) | KeyPart::QueryParam(_) | KeyPart::Query
        )
    };
    let present = |p: &KeyPart| match p {
        KeyPart::Header(h) => header_str(req.headers, h).is_some(),
        KeyPart::Cookie(n) => cookie(req.headers, n).is_some(),
        KeyPart::QueryParam(n) => query_param(req.query, n).is_some(),
        KeyPart::Query => !req.query.is_empty(),
        _ => false,
    };
    if parts.is_empty() || (parts.iter().any(optional) && !parts.iter().any(present)) {
        return None;
    }
    let mut key = String::new();
    render_key(parts, req, &mut key);
    Some(key)
}

/// Renders a key from its parts: `host` and `path` as written, other parts as
/// `|name=value` (query parameters as `?name=value`).
pub fn render_key(parts: &[KeyPart], req: &Request<'_>, out: &mut String) {
    let mut query_started = false;
    for p in parts {
        match p {
            KeyPart::Scheme => {
                out.push_str(req.scheme.as_str());
                out.push_str("://");
            }
            KeyPart::Host => out.push_str(req.host),
            KeyPart::Path => out.push_str(req.path),
            KeyPart::Query => {
                if !req.query.is_empty() {
                    out.push(if query_started { '&' } else { '?' });
                    out.push_str(req.query);
                    query_started = true;
                }
            }
            KeyPart::QueryParam(n) => {
                if let Some(v) = query_param(req.query, n) {
                    out.push(if query_started { '&' } else { '?' });
                    let _ = write!(out, "{n}={v}");
                    query_started = true;
                }
            }
            KeyPart::Header(h) => {
                let v = header_str(req.headers, h).unwrap_or("");
                let _ = write!(out, "|{}={v}", h.as_str());
            }
            KeyPart::Cookie(n) => {
                let v = cookie(req.headers, n).unwrap_or("");
                let _ = write!(out, "|cookie:{n}={v}");
            }
            KeyPart::Method => {
                let _ = write!(out, "|{}", req.method.as_str());
            }
            KeyPart::ClientIp => match req.client_ip {
                Some(ip) => {
                    let _ = write!(out, "|{ip}");
                }
                None => out.push_str("|-"),
            },
        }
    }
}

/// A request target (path and query) with its percent-escapes normalised
/// (RFC 3986 section 6.2.2): an escaped unreserved character (letters,
/// digits, `-`, `.`, `_`, `~`) is written as itself and every other escape
/// in upper case. `None` when there is nothing to change, which a target
/// without `%` learns in one scan. The running proxy applies it to every
/// request before the rules, and requests made from text (tests, `explain`,
/// purges by URL) the same way.
pub fn normalize_escapes(target: &str) -> Option<String> {
    let bytes = target.as_bytes();
    let first = bytes.iter().position(|&b| b == b'%')?;
    let hex = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    };
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(&bytes[..first]);
    let mut changed = false;
    let mut i = first;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                let c = h << 4 | l;
                if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                    out.push(c);
                    changed = true;
                } else {
                    let upper = [
                        b'%',
                        bytes[i + 1].to_ascii_uppercase(),
                        bytes[i + 2].to_ascii_uppercase(),
                    ];
                    changed |= upper[1..] != bytes[i + 1..i + 3];
                    out.extend_from_slice(&upper);
                }
                i += 3;
                continue;
            }
        }
        out.push(b);
        i += 1;
    }
    if !changed {
        return None;
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req<'a>(h: &'a HeaderMap, path: &'a str, query: &'a str) -> Request<'a> {
        Request {
            method: &Method::GET,
            scheme: Scheme::Https,
            host: "shop.example",
            path,
            query,
            headers: h,
            client_ip: None,
        }
    }

    #[test]
    fn query_and_cookie_lookup() {
        assert_eq!(query_param("a=1&v=3", "v"), Some("3"));
        assert_eq!(query_param("a=1&flag", "flag"), Some(""));
        assert_eq!(query_param("a=1", "v"), None);
        let mut h = HeaderMap::new();
        h.insert(http::header::COOKIE, "a=1; session=xyz".parse().unwrap());
        assert_eq!(cookie(&h, "session"), Some("xyz"));
        assert_eq!(cookie(&h, "nope"), None);
    }

    #[test]
    fn keys_render_parts_in_order() {
        let mut h = HeaderMap::new();
        h.insert("accept-language", "fr".parse().unwrap());
        let r = req(&h, "/app.css", "v=3&x=1");
        let cases: Vec<(Vec<KeyPart>, &str)> = vec![
            (vec![KeyPart::Host, KeyPart::Path], "shop.example/app.css"),
            (
                vec![KeyPart::Host, KeyPart::Path, KeyPart::Query],
                "shop.example/app.css?v=3&x=1",
            ),
            (
                vec![KeyPart::Path, KeyPart::QueryParam("x".into())],
                "/app.css?x=1",
            ),
            (
                vec![
                    KeyPart::Scheme,
                    KeyPart::Host,
                    KeyPart::Path,
                    KeyPart::Header(http::HeaderName::from_static("accept-language")),
                ],
                "https://shop.example/app.css|accept-language=fr",
            ),
        ];
        for (parts, want) in cases {
            let mut out = String::new();
            render_key(&parts, &r, &mut out);
            assert_eq!(out, want);
        }
    }
}
