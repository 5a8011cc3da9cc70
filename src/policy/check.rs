//! The checker: the syntax tree into the typed [`Model`], with a diagnostic
//! for every problem found, not only the first.
//!
//! In order: declarations and their names (duplicates), settings and the kinds
//! of their values, then rules (fields, operators, regexes, CIDRs, header
//! names, references to backends and limiters, conflicting actions), then the
//! lints that need the whole policy (shadowed rules, traffic that matches no
//! rule, unsafe caching).

mod decls;
mod lints;
mod rules;

use super::ast::{self, Action, CmpOp, Span, Value, ValueKind};
use super::diag::{suggest, Diagnostic};
use super::model::*;
use ipnet::IpNet;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

/// The largest compiled size of one regex, in bytes.
pub const MAX_REGEX_BYTES: usize = 1 << 20;

/// Checks a parsed policy. `line_of` turns a byte offset into a 1-based line.
pub fn check(file: &ast::PolicyFile, line_of: &dyn Fn(usize) -> usize) -> (Model, Vec<Diagnostic>) {
    let mut c = Checker {
        diags: vec![],
        line_of,
        patterns: compile_patterns(pattern_sources(file)),
    };
    let model = c.run(file);
    let mut diags = c.diags;
    diags.sort_by_key(|d| (d.span.start, d.severity));
    (model, diags)
}

struct Checker<'a> {
    diags: Vec<Diagnostic>,
    line_of: &'a dyn Fn(usize) -> usize,
    /// Every regex and glob of the policy, compiled up front on all cores.
    patterns: HashMap<PatternSource, Result<Pattern, String>>,
}

/// How a pattern is written in a condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum PatternKind {
    /// `~` and `!~`.
    Regex,
    /// `glob`.
    Glob,
}

/// A pattern of a condition: how it is written, its text, and whether it is
/// matched without regard to case (host and method).
type PatternSource = (PatternKind, String, bool);

/// Compiles a regex or glob under the policy's limits; the error is the
/// reason, for a diagnostic.
fn build_pattern((kind, text, case_insensitive): &PatternSource) -> Result<Pattern, String> {
    use super::pattern::PatternError;
    let built = match kind {
        PatternKind::Regex => Pattern::new(text, *case_insensitive, MAX_REGEX_BYTES),
        PatternKind::Glob => Pattern::glob(text, *case_insensitive, MAX_REGEX_BYTES),
    };
    built.map_err(|e| match e {
        PatternError::TooBig => {
            format!("the regex compiles to more than the limit of {MAX_REGEX_BYTES} bytes")
        }
        PatternError::Syntax(text) => text
            .lines()
            .last()
            .unwrap_or("invalid")
            .trim()
            .trim_start_matches("error: ")
            .to_string(),
        PatternError::Other(text) => text,
    })
}

/// The regexes and globs of the rules' conditions.
fn pattern_sources(file: &ast::PolicyFile) -> Vec<PatternSource> {
    fn walk(e: &ast::Expr, out: &mut Vec<PatternSource>) {
        match e {
            ast::Expr::And(a, b, _) | ast::Expr::Or(a, b, _) => {
                walk(a, out);
                walk(b, out);
            }
            ast::Expr::Not(a, _) => walk(a, out),
            ast::Expr::Cmp(c) => {
                let (
                    Some((op, _)),
                    Some(Value {
                        kind: ValueKind::Str(p),
                        ..
                    }),
                ) = (c.op, &c.operand)
                else {
                    return;
                };
                let ci =
                    c.subject.arg.is_none() && matches!(c.subject.name.as_str(), "host" | "method");
                match op {
                    CmpOp::Regex | CmpOp::NotRegex => out.push((PatternKind::Regex, p.clone(), ci)),
                    CmpOp::Glob => out.push((PatternKind::Glob, p.clone(), ci)),
                    _ => {}
                }
            }
        }
    }
    let mut out = vec![];
    for r in file.rules.iter().chain(&file.response_rules) {
        if let Some(e) = &r.when {
            walk(e, &mut out);
        }
    }
    out
}

/// Compiles the patterns on every core: regex compilation dominates checking
/// a large policy. The threads take the patterns in small batches from a
/// shared counter, so that cheap patterns (literals, globs) and costly ones
/// spread evenly whatever their order.
fn compile_patterns(
    mut sources: Vec<PatternSource>,
) -> HashMap<PatternSource, Result<Pattern, String>> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    const BATCH: usize = 32;
    sources.sort_unstable();
    sources.dedup();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(sources.len() / 64 + 1);
    if threads <= 1 {
        return sources
            .into_iter()
            .map(|s| {
                let p = build_pattern(&s);
                (s, p)
            })
            .collect();
    }
    let next = AtomicUsize::new(0);
    let work = || {
        let mut built = vec![];
        loop {
            let from = next.fetch_add(BATCH, Ordering::Relaxed);
            if from >= sources.len() {
                break;
            }
            let batch = &sources[from..(from + BATCH).min(sources.len())];
            built.extend(
                batch
                    .iter()
                    .enumerate()
                    .map(|(i, s)| (from + i, build_pattern(s))),
            );
        }
        built
    };
    let mut compiled: Vec<Option<Result<Pattern, String>>> = vec![None; sources.len()];
    std::thread::scope(|scope| {
        let handles: Vec<_> = (1..threads).map(|_| scope.spawn(work)).collect();
        let mine = work();
        for part in handles.into_iter().map(|h| match h.join() {
            Ok(part) => part,
            Err(panic) => std::panic::resume_unwind(panic),
        }) {
            for (i, p) in part {
                compiled[i] = Some(p);
            }
        }
        for (i, p) in mine {
            compiled[i] = Some(p);
        }
    });
    sources
        .into_iter()
        .zip(compiled)
        .map(|(s, p)| {
            let p = p.expect("every batch was compiled");
            (s, p)
        })
        .collect()
}

/// The kind of value a setting takes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Duration,
    Size,
    Number,
    Str,
    Rate,
    /// A setting with no value, such as `hide_server`.
    Flag,
    /// A list of addresses or CIDRs.
    Nets,
    /// A list of strings.
    Strings,
    /// A path string then a size (`disk "/var/cache" 20GiB`).
    PathAndSize,
}

impl Kind {
    fn expected(self) -> &'static str {
        match self {
            Kind::Duration => "a duration like 30s",
            Kind::Size => "a size like 64MiB",
            Kind::Number => "a number",
            Kind::Str => "a quoted string",
            Kind::Rate => "a rate like 100/s",
            Kind::Flag => "no value",
            Kind::Nets => "a list of addresses or CIDRs like [10.0.0.0/8, \"::1\"]",
            Kind::Strings => "a list of strings like [\"text/*\"]",
            Kind::PathAndSize => "a directory and a size like \"/var/cache/portico\" 20GiB",
        }
    }
}

/// A typed setting value.
#[derive(Debug, Clone)]
enum Val {
    Duration(Duration),
    Size(u64),
    Number(u64),
    Str(String),
    Rate(u64, Duration),
    Flag,
    Nets(Vec<IpNet>),
    Strings(Vec<String>),
    PathAndSize(PathBuf, u64),
}

const STORAGE: &[(&str, Kind)] = &[
    ("memory", Kind::Size),
    ("disk", Kind::PathAndSize),
    ("max_object", Kind::Size),
    ("targeted_headers", Kind::Strings),
    ("strip_targeted", Kind::Flag),
    ("heuristic_max", Kind::Duration),
    ("hit_for_miss", Kind::Duration),
];
const HTTP: &[(&str, Kind)] = &[
    ("header_timeout", Kind::Duration),
    ("idle_timeout", Kind::Duration),
    ("tunnel_idle_timeout", Kind::Duration),
    ("send_timeout", Kind::Duration),
    ("max_header", Kind::Size),
    ("max_body", Kind::Size),
    ("hide_server", Kind::Flag),
    ("shutdown_grace", Kind::Duration),
    ("max_connections", Kind::Number),
    ("trust_forwarded", Kind::Nets),
];
const PURGE: &[(&str, Kind)] = &[("allow", Kind::Nets)];
const BACKEND: &[(&str, Kind)] = &[
    ("connect_timeout", Kind::Duration),
    ("first_byte_timeout", Kind::Duration),
    ("total_timeout", Kind::Duration),
    ("eject_after", Kind::Number),
    ("eject_for", Kind::Duration),
    ("keepalive", Kind::Number),
    ("keepalive_timeout", Kind::Duration),
    ("tls", Kind::Flag),
    ("ca_file", Kind::Str),
    ("tls_server_name", Kind::Str),
];
const HEALTH: &[(&str, Kind)] = &[
    ("every", Kind::Duration),
    ("timeout", Kind::Duration),
    ("expect", Kind::Number),
    ("rise", Kind::Number),
    ("fall", Kind::Number),
    ("host", Kind::Str),
];
const STATIC: &[(&str, Kind)] = &[("index", Kind::Str)];
const LIMIT: &[(&str, Kind)] = &[("rate", Kind::Rate), ("burst", Kind::Number)];
const CACHE: &[(&str, Kind)] = &[
    ("ttl", Kind::Duration),
    ("stale_while_revalidate", Kind::Duration),
    ("stale_if_error", Kind::Duration),
    ("store_set_cookie", Kind::Flag),
    ("share_authorized", Kind::Flag),
];
const RESPONSE_CACHE: &[(&str, Kind)] = &[
    ("ttl", Kind::Duration),
    ("stale_while_revalidate", Kind::Duration),
    ("stale_if_error", Kind::Duration),
    ("store_set_cookie", Kind::Flag),
];
const RULE: &[(&str, Kind)] = &[
    ("connect_timeout", Kind::Duration),
    ("first_byte_timeout", Kind::Duration),
    ("total_timeout", Kind::Duration),
    ("max_body", Kind::Size),
];
const COMPRESS: &[(&str, Kind)] = &[
    ("min", Kind::Size),
    ("types", Kind::Strings),
    ("level", Kind::Number),
];
const RESPOND: &[(&str, Kind)] = &[("content_type", Kind::Str)];

/// Request fields that conditions may test.
const REQUEST_FIELDS: &[&str] = &[
    "method",
    "scheme",
    "host",
    "path",
    "query",
    "client.ip",
    "query(\"...\")",
    "header(\"...\")",
    "cookie(\"...\")",
];

impl Checker<'_> {
    fn err(&mut self, code: &'static str, span: Span, msg: impl Into<String>) -> &mut Diagnostic {
        self.diags.push(Diagnostic::error(code, span, msg));
        self.diags.last_mut().expect("just pushed")
    }

    fn warn(&mut self, code: &'static str, span: Span, msg: impl Into<String>) -> &mut Diagnostic {
        self.diags.push(Diagnostic::warning(code, span, msg));
        self.diags.last_mut().expect("just pushed")
    }

    fn run(&mut self, file: &ast::PolicyFile) -> Model {
        let mut model = Model::default();
        self.duplicates("backend", file.backends.iter().map(|b| &b.name));
        self.duplicates("limit", file.limiters.iter().map(|l| &l.name));
        self.duplicates(
            "rule",
            file.rules
                .iter()
                .chain(&file.response_rules)
                .map(|r| &r.name),
        );
        let test_names: Vec<ast::Ident> = file
            .tests
            .iter()
            .map(|t| ast::Ident {
                name: t.name.clone(),
                span: t.span,
            })
            .collect();
        self.duplicates("test", test_names.iter());

        for l in &file.listeners {
            if let Some(listener) = self.listener(l) {
                model.listeners.push(listener);
            }
        }
        for (i, a) in file.admins.iter().enumerate() {
            if i > 0 {
                self.err("duplicate", a.span, "`admin` is declared more than once")
                    .help = Some("keep one admin listener".into());
                continue;
            }
            model.admin = self.admin(a);
        }
        let mut seen_sections: HashMap<&str, Span> = HashMap::new();
        for s in &file.sections {
            if seen_sections.insert(&s.name.name, s.span).is_some() {
                self.err(
                    "duplicate",
                    s.name.span,
                    format!("`{}` is declared more than once", s.name.name),
                )
                .help = Some("merge the settings into one block".into());
            }
            match s.name.name.as_str() {
                "storage" => self.storage(s, &mut model.storage),
                "http" => self.http(s, &mut model.http),
                _ => self.purge(s, &mut model.purge),
            }
        }
        for b in &file.backends {
            model.backends.push(self.backend(b));
        }
        for l in &file.limiters {
            if let Some(spec) = self.limiter(l) {
                model.limiters.push(spec);
            }
        }
        for r in &file.rules {
            let spec = self.rule(r, &model);
            model.rules.push(spec);
        }
        for r in &file.response_rules {
            let spec = self.response_rule(r);
            model.response_rules.push(spec);
        }
        self.lint_rules(file, &model);
        self.unused(file, &model);
        model
    }

    fn duplicates<'i>(&mut self, what: &str, names: impl Iterator<Item = &'i ast::Ident>) {
        let mut seen: HashMap<&str, Span> = HashMap::new();
        for n in names {
            if let Some(first) = seen.get(n.name.as_str()) {
                let line = (self.line_of)(first.start);
                self.err(
                    "duplicate",
                    n.span,
                    format!("{what} `{}` is already defined on line {line}", n.name),
                )
                .help = Some("names must be unique; rename one of them".into());
            } else {
                seen.insert(&n.name, n.span);
            }
        }
    }

    // ------------------------------------------------------------ values

    fn string(&mut self, v: &Value, what: &str) -> Option<String> {
        match &v.kind {
            ValueKind::Str(s) => Some(s.clone()),
            other => {
                self.err(
                    "wrong-kind",
                    v.span,
                    format!(
                        "expected a quoted string for {what}, found {}",
                        other.describe()
                    ),
                );
                None
            }
        }
    }

    fn number(&mut self, v: &Value, what: &str) -> Option<u64> {
        match &v.kind {
            ValueKind::Number(n) => Some(*n),
            other => {
                self.err(
                    "wrong-kind",
                    v.span,
                    format!("expected a number for {what}, found {}", other.describe()),
                );
                None
            }
        }
    }

    fn nets(&mut self, v: &Value) -> Option<Vec<IpNet>> {
        let items: &[Value] = match &v.kind {
            ValueKind::List(items) => items,
            _ => std::slice::from_ref(v),
        };
        let mut out = vec![];
        let mut ok = true;
        for item in items {
            let text = match &item.kind {
                ValueKind::Str(s) | ValueKind::Addr(s) => s.as_str(),
                other => {
                    self.err(
                        "wrong-kind",
                        item.span,
                        format!("expected an address or CIDR, found {}", other.describe()),
                    );
                    ok = false;
                    continue;
                }
            };
            match parse_net(text) {
                Some(n) => out.push(n),
                None => {
                    self.err(
                        "invalid-cidr",
                        item.span,
                        format!("`{text}` is not an IP address or CIDR"),
                    )
                    .help =
                        Some("write an address like 10.0.0.1 or a network like 10.0.0.0/8".into());
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }

    fn value(&mut self, s: &ast::Setting, kind: Kind) -> Option<Val> {
        let wrong = |c: &mut Checker, v: &Value| {
            c.err(
                "wrong-kind",
                v.span,
                format!(
                    "`{}` takes {}, found {}",
                    s.name.name,
                    kind.expected(),
                    v.kind.describe()
                ),
            )
            .help = Some(format!("expected {}", kind.expected()));
        };
        let arity = match kind {
            Kind::Flag => 0,
            Kind::PathAndSize => 2,
            _ => 1,
        };
        if s.values.len() != arity {
            let span = s.values.get(arity).map(|v| v.span).unwrap_or(s.name.span);
            let msg = if s.values.len() < arity {
                format!("`{}` needs {}", s.name.name, kind.expected())
            } else {
                format!(
                    "`{}` takes {}; this value is one too many",
                    s.name.name,
                    kind.expected()
                )
            };
            self.err("wrong-kind", span, msg).help = Some(format!("expected {}", kind.expected()));
            return None;
        }
        let v = s.values.first();
        Some(match (kind, v.map(|v| &v.kind)) {
            (Kind::Flag, None) => Val::Flag,
            (Kind::Duration, Some(ValueKind::Duration(ms))) => {
                Val::Duration(Duration::from_millis(*ms))
            }
            (Kind::Size, Some(ValueKind::Size(b))) => Val::Size(*b),
            (Kind::Number, Some(ValueKind::Number(n))) => Val::Number(*n),
            (Kind::Str, Some(ValueKind::Str(t))) => Val::Str(t.clone()),
            (Kind::Rate, Some(ValueKind::Rate(n, per))) => {
                if *n == 0 {
                    self.err(
                        "out-of-range",
                        s.values[0].span,
                        "a rate must be above zero",
                    );
                    return None;
                }
                Val::Rate(*n, Duration::from_millis(*per))
            }
            (Kind::Nets, Some(_)) => Val::Nets(self.nets(&s.values[0])?),
            (Kind::Strings, Some(ValueKind::List(items))) => {
                let mut out = vec![];
                for item in items {
                    out.push(self.string(item, &format!("`{}`", s.name.name))?);
                }
                Val::Strings(out)
            }
            (Kind::PathAndSize, Some(ValueKind::Str(p))) => match &s.values[1].kind {
                ValueKind::Size(b) => Val::PathAndSize(PathBuf::from(p), *b),
                _ => {
                    wrong(self, &s.values[1]);
                    return None;
                }
            },
            (_, Some(_)) => {
                wrong(self, &s.values[0]);
                return None;
            }
            (_, None) => return None,
        })
    }

    /// Checks a block's settings against its schema and returns the typed values by name.
    fn settings<'s>(
        &mut self,
        block: &str,
        settings: impl IntoIterator<Item = &'s ast::Setting>,
        schema: &[(&'static str, Kind)],
    ) -> HashMap<&'static str, (Val, Span)> {
        let mut out: HashMap<&'static str, (Val, Span)> = HashMap::new();
        for s in settings {
            let Some(&(name, kind)) = schema.iter().find(|(n, _)| *n == s.name.name) else {
                let d = self.err(
                    "unknown-setting",
                    s.name.span,
                    format!("unknown setting `{}` in {block}", s.name.name),
                );
                d.help = Some(
                    match suggest(&s.name.name, schema.iter().map(|(n, _)| *n)) {
                        Some(m) => format!("did you mean `{m}`?"),
                        None => format!(
                            "known settings: {}",
                            schema
                                .iter()
                                .map(|(n, _)| *n)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    },
                );
                continue;
            };
            if let Some((_, first)) = out.get(name) {
                let line = (self.line_of)(first.start);
                self.err(
                    "duplicate",
                    s.name.span,
                    format!("`{name}` is already set on line {line}"),
                );
                continue;
            }
            if let Some(v) = self.value(s, kind) {
                out.insert(name, (v, s.span));
            }
        }
        out
    }

    fn key_part(&mut self, p: &ast::KeyPart) -> Option<KeyPart> {
        Some(match (p.name.as_str(), &p.arg) {
            ("scheme", None) => KeyPart::Scheme,
            ("host", None) => KeyPart::Host,
            ("path", None) => KeyPart::Path,
            ("query", None) => KeyPart::Query,
            ("method", None) => KeyPart::Method,
            ("client.ip", None) => KeyPart::ClientIp,
            ("query", Some(a)) => KeyPart::QueryParam(a.clone()),
            ("cookie", Some(a)) => KeyPart::Cookie(a.clone()),
            ("header", Some(a)) => KeyPart::Header(self.header_name(a, p.span)?),
            (name, _) => {
                let d = self.err(
                    "unknown-name",
                    p.span,
                    format!("`{name}` is not a key part"),
                );
                d.help = Some(
                    match suggest(
                        name,
                        [
                            "scheme",
                            "host",
                            "path",
                            "query",
                            "method",
                            "client.ip",
                            "header",
                            "cookie",
                        ],
                    ) {
                        Some(m) => format!("did you mean `{m}`?"),
                        None => format!("use one of {}", KeyPart::NAMES.join(", ")),
                    },
                );
                return None;
            }
        })
    }

    fn header_name(&mut self, name: &str, span: Span) -> Option<http::HeaderName> {
        match http::HeaderName::from_bytes(name.as_bytes()) {
            Ok(h) => Some(h),
            Err(_) => {
                self.err(
                    "invalid-header",
                    span,
                    format!("`{name}` is not a valid header name"),
                )
                .help = Some("header names are letters, digits and - (no spaces or colons)".into());
                None
            }
        }
    }
}

/// Parses `10.0.0.1` or `10.0.0.0/8` (or IPv6 forms).
pub fn parse_net(text: &str) -> Option<IpNet> {
    if text.contains('/') {
        text.parse::<IpNet>().ok()
    } else {
        text.parse::<std::net::IpAddr>().ok().map(IpNet::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which rules the shadowing lint reports, for a list of conditions.
    fn shadowed(conds: &[&str]) -> Vec<String> {
        let mut text = String::from("backend b { server \"127.0.0.1:1\" }\n");
        for (i, c) in conds.iter().enumerate() {
            text.push_str(&format!("rule r{i} when {c} {{ route b }}\n"));
        }
        text.push_str("rule fallback { route b }\n");
        let (_, _, diags) = crate::policy::check_text(&text, "t");
        diags
            .iter()
            .filter(|d| d.code == "shadowed")
            .map(|d| d.message.split('`').nth(1).unwrap_or("").to_string())
            .collect()
    }

    #[test]
    fn shadowing_is_found_through_the_index() {
        let cases: &[(&[&str], &[&str])] = &[
            (&[r#"path ^= "/a""#, r#"path ^= "/a/b""#], &["r1"]),
            (&[r#"path ^= "/a/b""#, r#"path ^= "/a""#], &[]),
            (
                &[r#"path == "/x""#, r#"path == "/x" and method == GET"#],
                &["r1"],
            ),
            (
                &[
                    r#"host == "a.test""#,
                    r#"host == "a.test" and path ^= "/p""#,
                ],
                &["r1"],
            ),
            (&[r#"host == "a.test""#, r#"host == "b.test""#], &[]),
            (
                &[r#"host $= ".test""#, r#"host in ["a.test", "b.test"]"#],
                &["r1"],
            ),
            (
                &[
                    r#"host $= ".test""#,
                    r#"host $= ".x.test" and path ^= "/q""#,
                ],
                &["r1"],
            ),
            (
                &[
                    r#"method in [GET, HEAD]"#,
                    r#"method == GET and path ^= "/""#,
                ],
                &["r1"],
            ),
            (&[r#"method == GET"#, r#"method in [GET, POST]"#], &[]),
            // A rule with a test the lint does not understand never shadows.
            (
                &[r#"path ^= "/a" and header("X")"#, r#"path ^= "/a/b""#],
                &[],
            ),
            (
                &[r#"path ^= "/a""#, r#"path ^= "/b""#, r#"path ^= "/b/c""#],
                &["r2"],
            ),
        ];
        for (conds, want) in cases {
            assert_eq!(shadowed(conds), *want, "{conds:?}");
        }
    }

    #[test]
    fn nets_parse_addresses_and_cidrs() {
        assert!(parse_net("10.0.0.0/8").is_some());
        assert!(parse_net("::1").is_some());
        assert!(parse_net("10.0.0.0/33").is_none());
        assert!(parse_net("nope").is_none());
    }
}
