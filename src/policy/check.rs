//! The checker: the syntax tree into the typed [`Model`], with a diagnostic
//! for every problem found, not only the first.
//!
//! In order: declarations and their names (duplicates), settings and the kinds
//! of their values, then rules (fields, operators, regexes, CIDRs, header
//! names, references to backends and limiters, conflicting actions), then the
//! lints that need the whole policy (shadowed rules, traffic that matches no
//! rule, unsafe caching).

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
    };
    let model = c.run(file);
    let mut diags = c.diags;
    diags.sort_by_key(|d| (d.span.start, d.severity));
    (model, diags)
}

struct Checker<'a> {
    diags: Vec<Diagnostic>,
    line_of: &'a dyn Fn(usize) -> usize,
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
    ("max_header", Kind::Size),
    ("max_body", Kind::Size),
    ("hide_server", Kind::Flag),
    ("shutdown_grace", Kind::Duration),
];
const PURGE: &[(&str, Kind)] = &[("allow", Kind::Nets)];
const BACKEND: &[(&str, Kind)] = &[
    ("connect_timeout", Kind::Duration),
    ("first_byte_timeout", Kind::Duration),
    ("total_timeout", Kind::Duration),
    ("eject_after", Kind::Number),
    ("eject_for", Kind::Duration),
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

    // ------------------------------------------------------------ declarations

    fn listen_addr(&mut self, v: &Value, what: &str) -> Option<String> {
        let text = self.string(v, what)?;
        let ok = match text.rsplit_once(':') {
            Some((host, port)) => {
                port.parse::<u16>().is_ok()
                    && (host.is_empty()
                        || host.parse::<std::net::IpAddr>().is_ok()
                        || (host.starts_with('[')
                            && host.ends_with(']')
                            && host[1..host.len() - 1]
                                .parse::<std::net::Ipv6Addr>()
                                .is_ok())
                        || host == "localhost")
            }
            None => false,
        };
        if !ok {
            self.err(
                "invalid-address",
                v.span,
                format!("`{text}` is not a listening address"),
            )
            .help = Some("write \":8080\", \"127.0.0.1:8080\" or \"[::1]:8080\"".into());
            return None;
        }
        Some(text)
    }

    fn listener(&mut self, l: &ast::Listen) -> Option<ListenerConfig> {
        let addr = self.listen_addr(&l.addr, "a listener")?;
        let mut tls = vec![];
        if let Some(certs) = &l.tls {
            if certs.is_empty() {
                self.err("missing", l.span, "a `tls` block needs at least one `cert`");
            }
            let mut defaults = 0;
            for c in certs {
                let cert = self.string(&c.cert, "a certificate path");
                let key = self.string(&c.key, "a key path");
                let mut names = vec![];
                for n in &c.names {
                    if let Some(s) = self.string(n, "a server name") {
                        names.push(s.to_ascii_lowercase());
                    }
                }
                if names.is_empty() {
                    defaults += 1;
                    if defaults > 1 {
                        self.err(
                            "duplicate",
                            c.span,
                            "more than one default certificate (without `for [...]`)",
                        )
                        .help = Some(
                            "name the server names of all but one with `for [\"name\"]`".into(),
                        );
                    }
                }
                if let (Some(cert), Some(key)) = (cert, key) {
                    tls.push(CertConfig {
                        cert: cert.into(),
                        key: key.into(),
                        names,
                    });
                }
            }
        }
        Some(ListenerConfig { addr, tls })
    }

    fn admin(&mut self, a: &ast::Admin) -> Option<AdminConfig> {
        let addr = self.listen_addr(&a.addr, "the admin listener")?;
        let token = match &a.token {
            None => None,
            Some(Value {
                kind: ValueKind::Env(name),
                ..
            }) => Some(Secret::Env(name.clone())),
            Some(Value {
                kind: ValueKind::Str(s),
                span,
            }) => {
                if s.is_empty() {
                    self.err("out-of-range", *span, "the admin token is empty");
                }
                Some(Secret::Inline(s.clone()))
            }
            Some(v) => {
                self.err(
                    "wrong-kind",
                    v.span,
                    format!(
                        "expected a string or env(\"NAME\"), found {}",
                        v.kind.describe()
                    ),
                );
                None
            }
        };
        Some(AdminConfig { addr, token })
    }

    fn storage(&mut self, s: &ast::Section, out: &mut StorageConfig) {
        let mut v = self.settings("`storage`", &s.settings, STORAGE);
        if let Some((Val::Size(n), _)) = v.remove("memory") {
            out.memory = n;
        }
        if let Some((Val::PathAndSize(p, n), span)) = v.remove("disk") {
            if n < 1 << 20 {
                self.err("out-of-range", span, "the disk tier needs at least 1MiB");
            }
            out.disk = Some((p, n));
        }
        if let Some((Val::Size(n), span)) = v.remove("max_object") {
            if n == 0 {
                self.err("out-of-range", span, "`max_object` must be above zero");
            }
            out.max_object = n;
        }
        if let Some((Val::Strings(names), span)) = v.remove("targeted_headers") {
            for n in &names {
                if http::HeaderName::from_bytes(n.as_bytes()).is_err() {
                    self.err(
                        "invalid-header",
                        span,
                        format!("`{n}` is not a valid header name"),
                    );
                }
            }
            out.targeted_headers = names;
        }
        if v.remove("strip_targeted").is_some() {
            out.strip_targeted = true;
        }
        if let Some((Val::Duration(d), _)) = v.remove("heuristic_max") {
            out.heuristic_max = d;
        }
        if let Some((Val::Duration(d), _)) = v.remove("hit_for_miss") {
            out.hit_for_miss = d;
        }
        if let Some((_, n)) = &out.disk {
            if out.max_object > *n / 4 {
                self.err(
                    "out-of-range",
                    s.span,
                    "`max_object` is larger than a quarter of the disk tier",
                )
                .help = Some("raise the disk size or lower max_object".into());
            }
        }
    }

    fn http(&mut self, s: &ast::Section, out: &mut HttpConfig) {
        let mut v = self.settings("`http`", &s.settings, HTTP);
        if let Some((Val::Duration(d), _)) = v.remove("header_timeout") {
            out.header_timeout = d;
        }
        if let Some((Val::Duration(d), _)) = v.remove("idle_timeout") {
            out.idle_timeout = d;
        }
        if let Some((Val::Size(n), _)) = v.remove("max_header") {
            out.max_header = n;
        }
        if let Some((Val::Size(n), _)) = v.remove("max_body") {
            out.max_body = n;
        }
        if v.remove("hide_server").is_some() {
            out.hide_server = true;
        }
        if let Some((Val::Duration(d), _)) = v.remove("shutdown_grace") {
            out.shutdown_grace = d;
        }
    }

    fn purge(&mut self, s: &ast::Section, out: &mut PurgeConfig) {
        let mut v = self.settings("`purge`", &s.settings, PURGE);
        if let Some((Val::Nets(n), _)) = v.remove("allow") {
            out.allow = n;
        }
    }

    fn backend(&mut self, b: &ast::Backend) -> BackendSpec {
        let mut spec = BackendSpec {
            name: b.name.name.clone(),
            span: b.name.span,
            servers: vec![],
            balance: BalanceKind::RoundRobin,
            hash_key: vec![],
            health: None,
            connect_timeout: Duration::from_secs(5),
            first_byte_timeout: Duration::from_secs(30),
            total_timeout: Duration::from_secs(120),
            eject_after: 5,
            eject_for: Duration::from_secs(10),
            tls: false,
            ca_file: None,
            tls_server_name: None,
            static_dir: None,
        };
        for s in &b.servers {
            let Some(addr) = self.string(&s.addr, "a server address") else {
                continue;
            };
            let valid = addr
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            if !valid {
                self.err(
                    "invalid-address",
                    s.addr.span,
                    format!("`{addr}` is not a server address"),
                )
                .help = Some("write host:port, like \"10.0.0.2:3000\"".into());
            }
            let weight = match &s.weight {
                None => 1,
                Some(w) => match self.number(w, "`weight`") {
                    Some(n) if (1..=1000).contains(&n) => n as u32,
                    Some(_) => {
                        self.err("out-of-range", w.span, "a weight is between 1 and 1000");
                        1
                    }
                    None => 1,
                },
            };
            spec.servers.push(ServerSpec {
                addr,
                weight,
                backup: s.backup,
            });
        }
        for (i, bal) in b.balance.iter().enumerate() {
            if i > 0 {
                self.err("duplicate", bal.span, "`balance` is set more than once");
                continue;
            }
            match BalanceKind::parse(&bal.algorithm.name) {
                Some(k) => spec.balance = k,
                None => {
                    let d = self.err(
                        "unknown-name",
                        bal.algorithm.span,
                        format!("unknown balancing algorithm `{}`", bal.algorithm.name),
                    );
                    d.help = Some(match suggest(&bal.algorithm.name, BalanceKind::NAMES) {
                        Some(m) => format!("did you mean `{m}`?"),
                        None => format!("use one of {}", BalanceKind::NAMES.join(", ")),
                    });
                }
            }
            match (&bal.key, spec.balance) {
                (Some(parts), BalanceKind::Hash) => {
                    spec.hash_key = parts.iter().filter_map(|p| self.key_part(p)).collect();
                }
                (None, BalanceKind::Hash) => {
                    self.err("missing", bal.span, "`balance hash` needs a key")
                        .help = Some("write `balance hash [client.ip]`".into());
                }
                (Some(_), _) => {
                    self.err(
                        "conflict",
                        bal.span,
                        format!(
                            "`balance {}` takes no key; only `hash` does",
                            spec.balance.as_str()
                        ),
                    );
                }
                (None, _) => {}
            }
        }
        for (i, h) in b.health.iter().enumerate() {
            if i > 0 {
                self.err("duplicate", h.span, "`health` is set more than once");
                continue;
            }
            let method = match h.method.name.to_ascii_uppercase().as_str() {
                "GET" => http::Method::GET,
                "HEAD" => http::Method::HEAD,
                "OPTIONS" => http::Method::OPTIONS,
                _ => {
                    self.err(
                        "unknown-name",
                        h.method.span,
                        format!("`{}` is not a health check method", h.method.name),
                    )
                    .help = Some("use get, head or options".into());
                    http::Method::GET
                }
            };
            let path = self
                .string(&h.path, "the health check path")
                .unwrap_or_default();
            if !path.starts_with('/') {
                self.err(
                    "invalid-path",
                    h.path.span,
                    "a health check path starts with `/`",
                );
            }
            let mut v = self.settings("`health`", &h.options, HEALTH);
            let mut health = HealthSpec {
                method,
                path,
                interval: Duration::from_secs(5),
                timeout: Duration::from_secs(2),
                expect_status: 200,
                rise: 2,
                fall: 3,
            };
            if let Some((Val::Duration(d), _)) = v.remove("every") {
                health.interval = d;
            }
            if let Some((Val::Duration(d), _)) = v.remove("timeout") {
                health.timeout = d;
            }
            if let Some((Val::Number(n), span)) = v.remove("expect") {
                if !(100..=599).contains(&n) {
                    self.err(
                        "invalid-status",
                        span,
                        format!("{n} is not an HTTP status code"),
                    );
                } else {
                    health.expect_status = n as u16;
                }
            }
            if let Some((Val::Number(n), _)) = v.remove("rise") {
                health.rise = n.clamp(1, 100) as u32;
            }
            if let Some((Val::Number(n), _)) = v.remove("fall") {
                health.fall = n.clamp(1, 100) as u32;
            }
            if health.timeout >= health.interval {
                self.warn(
                    "suspicious",
                    h.span,
                    "the health check timeout is not shorter than its interval",
                );
            }
            spec.health = Some(health);
        }
        for (i, st) in b.static_dir.iter().enumerate() {
            if i > 0 {
                self.err("duplicate", st.span, "`static` is set more than once");
                continue;
            }
            let root = self
                .string(&st.root, "the static directory")
                .unwrap_or_default();
            let mut v = self.settings("`static`", &st.options, STATIC);
            let index = match v.remove("index") {
                Some((Val::Str(s), _)) => s,
                _ => "index.html".to_string(),
            };
            spec.static_dir = Some((PathBuf::from(root), index));
        }
        let mut v = self.settings(&format!("backend `{}`", b.name.name), &b.settings, BACKEND);
        if let Some((Val::Duration(d), _)) = v.remove("connect_timeout") {
            spec.connect_timeout = d;
        }
        if let Some((Val::Duration(d), _)) = v.remove("first_byte_timeout") {
            spec.first_byte_timeout = d;
        }
        if let Some((Val::Duration(d), _)) = v.remove("total_timeout") {
            spec.total_timeout = d;
        }
        if let Some((Val::Number(n), _)) = v.remove("eject_after") {
            spec.eject_after = n.min(u32::MAX as u64) as u32;
        }
        if let Some((Val::Duration(d), _)) = v.remove("eject_for") {
            spec.eject_for = d;
        }
        let tls_span = v.remove("tls").map(|(_, span)| span);
        spec.tls = tls_span.is_some();
        if let Some((Val::Str(s), _)) = v.remove("ca_file") {
            spec.ca_file = Some(s.into());
        }
        if let (Some(span), None) = (tls_span, &spec.ca_file) {
            // No system trust store is read: the servers' CA must be named.
            self.err("missing", span, "`tls` towards servers needs a `ca_file`")
                .help = Some("add `ca_file \"/path/to/ca.pem\"`".into());
        }
        if let Some((Val::Str(s), _)) = v.remove("tls_server_name") {
            spec.tls_server_name = Some(s);
        }
        match (spec.servers.is_empty(), spec.static_dir.is_some()) {
            (true, false) => {
                self.err(
                    "missing",
                    b.name.span,
                    format!(
                        "backend `{}` has no `server` and no `static` directory",
                        b.name.name
                    ),
                )
                .help = Some("add `server \"host:port\"` or `static \"/path\"`".into());
            }
            (false, true) => {
                self.err(
                    "conflict",
                    b.name.span,
                    format!(
                        "backend `{}` has both servers and a static directory",
                        b.name.name
                    ),
                );
            }
            _ => {}
        }
        if !spec.servers.is_empty() && spec.servers.iter().all(|s| s.backup) {
            self.err(
                "missing",
                b.name.span,
                "every server of this backend is a backup",
            );
        }
        spec
    }

    fn limiter(&mut self, l: &ast::Limiter) -> Option<LimiterSpec> {
        let mut v = self.settings(&format!("limit `{}`", l.name.name), &l.settings, LIMIT);
        let Some((Val::Rate(count, per), _)) = v.remove("rate") else {
            self.err(
                "missing",
                l.name.span,
                format!("limit `{}` has no `rate`", l.name.name),
            )
            .help = Some("write `rate 100/s`".into());
            return None;
        };
        let burst = match v.remove("burst") {
            Some((Val::Number(n), span)) => {
                if n == 0 {
                    self.err("out-of-range", span, "`burst` must be at least 1");
                }
                n.max(1)
            }
            _ => count,
        };
        let by = match &l.by {
            Some(p) => self.key_part(p)?,
            None => KeyPart::ClientIp,
        };
        Some(LimiterSpec {
            name: l.name.name.clone(),
            count,
            per,
            burst,
            by,
        })
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

    // ------------------------------------------------------------ conditions

    fn cond(&mut self, e: &ast::Expr, response_phase: bool) -> Option<Cond> {
        Some(match e {
            ast::Expr::And(a, b, _) => {
                let (a, b) = (self.cond(a, response_phase), self.cond(b, response_phase));
                let mut parts = vec![];
                for c in [a?, b?] {
                    match c {
                        Cond::And(inner) => parts.extend(inner),
                        other => parts.push(other),
                    }
                }
                Cond::And(parts)
            }
            ast::Expr::Or(a, b, _) => {
                let (a, b) = (self.cond(a, response_phase), self.cond(b, response_phase));
                let mut parts = vec![];
                for c in [a?, b?] {
                    match c {
                        Cond::Or(inner) => parts.extend(inner),
                        other => parts.push(other),
                    }
                }
                Cond::Or(parts)
            }
            ast::Expr::Not(a, _) => Cond::Not(Box::new(self.cond(a, response_phase)?)),
            ast::Expr::Cmp(c) => Cond::Atom(Box::new(self.comparison(c, response_phase)?)),
        })
    }

    fn field(&mut self, s: &ast::KeyPart, response_phase: bool) -> Option<Field> {
        let f = match (s.name.as_str(), &s.arg) {
            ("method", None) => Field::Method,
            ("scheme", None) => Field::Scheme,
            ("host", None) => Field::Host,
            ("path", None) => Field::Path,
            ("query", None) => Field::Query,
            ("client.ip", None) => Field::ClientIp,
            ("status", None) => Field::Status,
            ("content_type", None) => Field::ContentType,
            ("query", Some(a)) => Field::QueryParam(a.clone()),
            ("cookie", Some(a)) => Field::Cookie(a.clone()),
            ("header", Some(a)) => {
                let h = self.header_name(a, s.span)?;
                if response_phase {
                    Field::ResponseHeader(h)
                } else {
                    Field::Header(h)
                }
            }
            ("req.header", Some(a)) => Field::Header(self.header_name(a, s.span)?),
            (name, _) => {
                let mut known: Vec<&str> = REQUEST_FIELDS.to_vec();
                if response_phase {
                    known.extend(["status", "content_type", "req.header(\"...\")"]);
                }
                let d = self.err(
                    "unknown-name",
                    s.span,
                    format!("unknown field `{}`", s.name),
                );
                let plain = known.iter().map(|k| k.split('(').next().unwrap_or(k));
                d.help = Some(match suggest(name, plain) {
                    Some(m) => format!("did you mean `{m}`?"),
                    None => format!("fields: {}", known.join(", ")),
                });
                return None;
            }
        };
        if !response_phase && matches!(f, Field::Status | Field::ContentType) {
            self.err(
                "wrong-phase",
                s.span,
                format!("`{}` is only known in `on response` rules", s.name),
            );
            return None;
        }
        Some(f)
    }

    fn comparison(&mut self, c: &ast::Comparison, response_phase: bool) -> Option<Atom> {
        let field = self.field(&c.subject, response_phase)?;
        let Some((op, op_span)) = c.op else {
            return match field {
                Field::Header(_)
                | Field::ResponseHeader(_)
                | Field::Cookie(_)
                | Field::QueryParam(_) => Some(Atom {
                    field,
                    test: Test::Present,
                    span: c.span,
                }),
                _ => {
                    self.err(
                        "missing",
                        c.span,
                        format!("`{}` needs an operator and a value", field.describe()),
                    )
                    .help = Some("write e.g. `path ^= \"/api/\"`; only header(), cookie() and query() can stand alone, meaning \"present\"".into());
                    None
                }
            };
        };
        let operand = c
            .operand
            .as_ref()
            .expect("grammar pairs an operator with an operand");
        let numeric = matches!(field, Field::Status);
        let ip = matches!(field, Field::ClientIp);
        let test = match op {
            CmpOp::Ge | CmpOp::Le | CmpOp::Gt | CmpOp::Lt if numeric => {
                Test::Num(op, self.status(operand)? as u64)
            }
            CmpOp::Ge | CmpOp::Le | CmpOp::Gt | CmpOp::Lt => {
                self.err(
                    "wrong-operator",
                    op_span,
                    format!(
                        "`{op}` compares numbers; `{}` is not a number",
                        field.describe()
                    ),
                );
                return None;
            }
            CmpOp::Eq | CmpOp::Ne if numeric => {
                let n = self.status(operand)? as u64;
                if op == CmpOp::Eq {
                    Test::Num(CmpOp::Eq, n)
                } else {
                    Test::Num(CmpOp::Ne, n)
                }
            }
            CmpOp::In if numeric => {
                let ValueKind::List(items) = &operand.kind else {
                    self.err(
                        "wrong-kind",
                        operand.span,
                        "`in` takes a list like [200, 301]",
                    );
                    return None;
                };
                let mut set = vec![];
                for i in items {
                    set.push(self.status(i)?.to_string());
                }
                Test::InSet(set)
            }
            CmpOp::In if ip => Test::InNets(self.nets(operand)?),
            _ if ip => {
                self.err(
                    "wrong-operator",
                    op_span,
                    "`client.ip` is tested with `in`, like `client.ip in [10.0.0.0/8]`",
                );
                return None;
            }
            _ if numeric => {
                self.err(
                    "wrong-operator",
                    op_span,
                    format!("`{op}` does not apply to `status`; use ==, !=, <, <=, >, >= or in"),
                );
                return None;
            }
            CmpOp::In => {
                let ValueKind::List(items) = &operand.kind else {
                    self.err(
                        "wrong-kind",
                        operand.span,
                        format!("`in` takes a list, found {}", operand.kind.describe()),
                    )
                    .help = Some("write a list like [GET, HEAD]".into());
                    return None;
                };
                let mut set = vec![];
                for i in items {
                    set.push(self.text_operand(&field, i)?);
                }
                Test::InSet(set)
            }
            CmpOp::Regex | CmpOp::NotRegex | CmpOp::Glob => {
                let pattern = self.string(operand, &format!("`{op}`"))?;
                let source = if op == CmpOp::Glob {
                    glob_to_regex(&pattern)
                } else {
                    pattern.clone()
                };
                let case_insensitive = matches!(field, Field::Host | Field::Method);
                let re = match regex::RegexBuilder::new(&source)
                    .size_limit(MAX_REGEX_BYTES)
                    .case_insensitive(case_insensitive)
                    .build()
                {
                    Ok(re) => re,
                    Err(e) => {
                        let reason = match e {
                            regex::Error::CompiledTooBig(_) => format!(
                                "the regex compiles to more than the limit of {MAX_REGEX_BYTES} bytes"
                            ),
                            other => other
                                .to_string()
                                .lines()
                                .last()
                                .unwrap_or("invalid")
                                .trim()
                                .trim_start_matches("error: ")
                                .to_string(),
                        };
                        self.err(
                            "invalid-regex",
                            operand.span,
                            format!("invalid regex: {reason}"),
                        );
                        return None;
                    }
                };
                if op == CmpOp::NotRegex {
                    Test::NotMatches(re)
                } else {
                    Test::Matches(re)
                }
            }
            CmpOp::Eq | CmpOp::Ne | CmpOp::Prefix | CmpOp::Suffix => {
                let text = self.text_operand(&field, operand)?;
                if matches!(field, Field::Path) && op != CmpOp::Suffix && !text.starts_with('/') {
                    self.err(
                        "invalid-path",
                        operand.span,
                        format!("a path starts with `/`; `{text}` never matches"),
                    );
                }
                match op {
                    CmpOp::Eq => Test::Eq(text),
                    CmpOp::Ne => Test::Ne(text),
                    CmpOp::Prefix => Test::Prefix(text),
                    _ => Test::Suffix(text),
                }
            }
        };
        Some(Atom {
            field,
            test,
            span: c.span,
        })
    }

    /// A text operand for a field, normalised the way requests are (host lowercase, method uppercase).
    fn text_operand(&mut self, field: &Field, v: &Value) -> Option<String> {
        let text = match &v.kind {
            ValueKind::Str(s) | ValueKind::Word(s) => s.clone(),
            ValueKind::Number(n) => n.to_string(),
            other => {
                self.err(
                    "wrong-kind",
                    v.span,
                    format!(
                        "expected a string to compare with {}, found {}",
                        field.describe(),
                        other.describe()
                    ),
                );
                return None;
            }
        };
        Some(match field {
            Field::Host => text.to_ascii_lowercase(),
            Field::Method => {
                let m = text.to_ascii_uppercase();
                if http::Method::from_bytes(m.as_bytes()).is_err() {
                    self.err(
                        "invalid-method",
                        v.span,
                        format!("`{text}` is not an HTTP method"),
                    );
                    return None;
                }
                m
            }
            Field::Scheme => {
                let s = text.to_ascii_lowercase();
                if s != "http" && s != "https" {
                    self.err(
                        "wrong-kind",
                        v.span,
                        format!("scheme is http or https, not `{text}`"),
                    );
                    return None;
                }
                s
            }
            _ => text,
        })
    }

    fn status(&mut self, v: &Value) -> Option<u16> {
        let n = self.number(v, "a status code")?;
        if (100..=599).contains(&n) {
            Some(n as u16)
        } else {
            self.err(
                "invalid-status",
                v.span,
                format!("{n} is not an HTTP status code"),
            )
            .help = Some("status codes are between 100 and 599".into());
            None
        }
    }

    // ------------------------------------------------------------ rules

    fn header_edit(&mut self, h: &ast::HeaderEdit) -> Option<HeaderEdit> {
        let name = self.string(&h.name, "a header name")?;
        let name = self.header_name(&name, h.name.span)?;
        let value = match (h.op, &h.value) {
            (ast::HeaderOp::Remove, None) => None,
            (ast::HeaderOp::Remove, Some(v)) => {
                self.err("wrong-kind", v.span, "`remove` takes only a header name");
                return None;
            }
            (_, None) => {
                self.err(
                    "missing",
                    h.span,
                    "`set` and `add` need a header name and a value",
                );
                return None;
            }
            (_, Some(v)) => {
                let text = self.string(v, "a header value")?;
                match http::HeaderValue::from_str(&text) {
                    Ok(v) => Some(v),
                    Err(_) => {
                        self.err("invalid-header", v.span, "this is not a valid header value")
                            .help =
                            Some("header values are visible ASCII without line breaks".into());
                        return None;
                    }
                }
            }
        };
        let op = match h.op {
            ast::HeaderOp::Set => EditOp::Set,
            ast::HeaderOp::Add => EditOp::Add,
            ast::HeaderOp::Remove => EditOp::Remove,
        };
        Some(HeaderEdit { op, name, value })
    }

    fn rule(&mut self, r: &ast::Rule, model: &Model) -> RuleSpec {
        let when = match &r.when {
            None => Cond::True,
            // A condition with errors never matches, so the rest of the checks still run.
            Some(e) => self.cond(e, false).unwrap_or(Cond::Or(vec![])),
        };
        let mut spec = RuleSpec {
            name: r.name.name.clone(),
            span: r.name.span,
            line: (self.line_of)(r.span.start),
            when,
            outcome: Outcome::NoRoute,
            cache: None,
            compress: None,
            limiter: None,
            request_headers: vec![],
            response_headers: vec![],
            limits: RuleLimits::default(),
        };
        let mut outcome_span: Option<(Span, &str)> = None;
        let mut cache_span: Option<Span> = None;
        let mut compress_span: Option<Span> = None;
        let mut throttle_span: Option<Span> = None;
        let mut settings = vec![];
        for a in &r.actions {
            let kw = a.keyword().to_string();
            let is_outcome = matches!(
                a,
                Action::Route(..)
                    | Action::Redirect { .. }
                    | Action::Deny { .. }
                    | Action::Respond { .. }
            );
            if is_outcome {
                if let Some((first, first_kw)) = outcome_span {
                    let line = (self.line_of)(first.start);
                    self.err(
                        "conflict",
                        a.span(),
                        format!("`{kw}` conflicts with `{first_kw}` on line {line}: a rule has one outcome"),
                    )
                    .help = Some("keep one of route, redirect, deny and respond".into());
                    continue;
                }
                outcome_span = Some((
                    a.span(),
                    match a {
                        Action::Route(..) => "route",
                        Action::Redirect { .. } => "redirect",
                        Action::Deny { .. } => "deny",
                        _ => "respond",
                    },
                ));
            }
            let once = |c: &mut Checker, slot: &mut Option<Span>, span: Span| -> bool {
                if let Some(first) = slot {
                    let line = (c.line_of)(first.start);
                    c.err(
                        "conflict",
                        span,
                        format!("`{kw}` is already given on line {line}"),
                    );
                    false
                } else {
                    *slot = Some(span);
                    true
                }
            };
            match a {
                Action::Route(name, _) => match model.backend(&name.name) {
                    Some(id) => spec.outcome = Outcome::Forward(id),
                    None => {
                        let d = self.err(
                            "undefined-name",
                            name.span,
                            format!("backend `{}` is not defined", name.name),
                        );
                        d.help =
                            suggest(&name.name, model.backends.iter().map(|b| b.name.as_str()))
                                .map(|m| format!("did you mean `{m}`?"));
                    }
                },
                Action::Redirect {
                    status, location, ..
                } => {
                    let code = match status {
                        None => 302,
                        Some(v) => match self.status(v) {
                            Some(c) if matches!(c, 301 | 302 | 303 | 307 | 308) => c,
                            Some(c) => {
                                self.err(
                                    "invalid-status",
                                    v.span,
                                    format!("{c} is not a redirect status"),
                                )
                                .help = Some("use 301, 302, 303, 307 or 308".into());
                                302
                            }
                            None => 302,
                        },
                    };
                    if let Some(loc) = self.string(location, "a redirect location") {
                        if http::HeaderValue::from_str(&loc).is_err() {
                            self.err(
                                "invalid-header",
                                location.span,
                                "the location is not a valid header value",
                            );
                        }
                        spec.outcome = Outcome::Redirect {
                            status: code,
                            location: loc,
                        };
                    }
                }
                Action::Deny { status, .. } => {
                    let code = match status {
                        None => 403,
                        Some(v) => match self.status(v) {
                            Some(c) if c >= 400 => c,
                            Some(c) => {
                                self.err(
                                    "invalid-status",
                                    v.span,
                                    format!("`deny` answers an error; {c} is not 4xx or 5xx"),
                                );
                                403
                            }
                            None => 403,
                        },
                    };
                    spec.outcome = Outcome::Deny { status: code };
                }
                Action::Respond {
                    status,
                    body,
                    options,
                    ..
                } => {
                    let code = self.status(status).unwrap_or(200);
                    let body = body
                        .as_ref()
                        .and_then(|b| self.string(b, "a response body"))
                        .unwrap_or_default();
                    let mut v = self.settings("`respond`", options, RESPOND);
                    let content_type = match v.remove("content_type") {
                        Some((Val::Str(s), span)) => {
                            if http::HeaderValue::from_str(&s).is_err() {
                                self.err(
                                    "invalid-header",
                                    span,
                                    "the content type is not a valid header value",
                                );
                            }
                            s
                        }
                        _ => "text/plain; charset=utf-8".to_string(),
                    };
                    spec.outcome = Outcome::Respond {
                        status: code,
                        body: body.into(),
                        content_type,
                    };
                }
                Action::Throttle(name, span) => {
                    if once(self, &mut throttle_span, *span) {
                        match model.limiter(&name.name) {
                            Some(id) => spec.limiter = Some(id),
                            None => {
                                let d = self.err(
                                    "undefined-name",
                                    name.span,
                                    format!("limit `{}` is not defined", name.name),
                                );
                                d.help = suggest(
                                    &name.name,
                                    model.limiters.iter().map(|l| l.name.as_str()),
                                )
                                .map(|m| format!("did you mean `{m}`?"));
                            }
                        }
                    }
                }
                Action::CacheOff(span) => {
                    once(self, &mut cache_span, *span);
                }
                Action::Cache(block) => {
                    if once(self, &mut cache_span, block.span) {
                        spec.cache = self.cache_block(block);
                    }
                }
                Action::CompressOff(span) => {
                    once(self, &mut compress_span, *span);
                }
                Action::Compress(block) => {
                    if once(self, &mut compress_span, block.span) {
                        spec.compress = self.compress(block);
                    }
                }
                Action::Header(h) => {
                    if let Some(edit) = self.header_edit(h) {
                        if h.response {
                            spec.response_headers.push(edit);
                        } else {
                            spec.request_headers.push(edit);
                        }
                    }
                }
                Action::Setting(s) => settings.push(s),
            }
        }
        let mut v = self.settings(&format!("rule `{}`", r.name.name), settings, RULE);
        if let Some((Val::Duration(d), _)) = v.remove("connect_timeout") {
            spec.limits.connect_timeout = Some(d);
        }
        if let Some((Val::Duration(d), _)) = v.remove("first_byte_timeout") {
            spec.limits.first_byte_timeout = Some(d);
        }
        if let Some((Val::Duration(d), _)) = v.remove("total_timeout") {
            spec.limits.total_timeout = Some(d);
        }
        if let Some((Val::Size(n), _)) = v.remove("max_body") {
            spec.limits.max_body = Some(n);
        }
        let forwards = matches!(spec.outcome, Outcome::Forward(_));
        if outcome_span.is_none() {
            self.err(
                "missing",
                r.name.span,
                format!(
                    "rule `{}` says neither route, redirect, deny nor respond",
                    r.name.name
                ),
            )
            .help = Some("add `route BACKEND`".into());
        } else if !forwards && outcome_span.is_some_and(|(_, kw)| kw != "route") {
            if let (Some(span), Some(_)) = (cache_span, &spec.cache) {
                self.warn(
                    "ignored",
                    span,
                    "`cache` has no effect on a rule that does not route to a backend",
                );
            }
        }
        spec
    }

    fn cache_block(&mut self, b: &ast::CacheBlock) -> Option<CacheSpec> {
        let mut v = self.settings("`cache`", &b.settings, CACHE);
        let key = match &b.key {
            None => CacheSpec::default_key(),
            Some((parts, span)) => {
                if parts.is_empty() {
                    self.err("missing", *span, "a cache key needs at least one part")
                        .help = Some("write `key [host, path]`".into());
                }
                parts.iter().filter_map(|p| self.key_part(p)).collect()
            }
        };
        let origin = match &b.origin {
            None => OriginControl::Honor,
            Some(w) if w.name == "honor" || w.name == "honour" => OriginControl::Honor,
            Some(w) if w.name == "ignore" => OriginControl::Ignore,
            Some(w) => {
                self.err(
                    "unknown-name",
                    w.span,
                    format!("`origin {}`: expected `honor` or `ignore`", w.name),
                );
                OriginControl::Honor
            }
        };
        let dur = |v: &mut HashMap<&str, (Val, Span)>, name: &str| match v.remove(name) {
            Some((Val::Duration(d), _)) => Some(d),
            _ => None,
        };
        let ttl = dur(&mut v, "ttl");
        if origin == OriginControl::Ignore && ttl.is_none() {
            self.err("missing", b.span, "`origin ignore` needs a `ttl`")
                .help = Some("add `ttl 10m`".into());
        }
        Some(CacheSpec {
            key,
            ttl,
            stale_while_revalidate: dur(&mut v, "stale_while_revalidate"),
            stale_if_error: dur(&mut v, "stale_if_error"),
            origin,
            store_set_cookie: v.remove("store_set_cookie").is_some(),
            share_authorized: v.remove("share_authorized").is_some(),
        })
    }

    fn compress(&mut self, b: &ast::CompressBlock) -> Option<CompressSpec> {
        let mut algorithms = vec![];
        for a in &b.algorithms {
            let alg = match a.name.as_str() {
                "br" | "brotli" => Algorithm::Br,
                "gzip" => Algorithm::Gzip,
                other => {
                    let d = self.err(
                        "unknown-name",
                        a.span,
                        format!("unknown compression algorithm `{other}`"),
                    );
                    d.help = Some(match suggest(other, ["br", "gzip"]) {
                        Some(m) => format!("did you mean `{m}`?"),
                        None => "use br or gzip".into(),
                    });
                    continue;
                }
            };
            if algorithms.contains(&alg) {
                self.err("duplicate", a.span, format!("`{}` is listed twice", a.name));
            } else {
                algorithms.push(alg);
            }
        }
        let mut v = self.settings("`compress`", &b.options, COMPRESS);
        let min_size = match v.remove("min") {
            Some((Val::Size(n), _)) => n,
            _ => 1024,
        };
        let types = match v.remove("types") {
            Some((Val::Strings(t), _)) => t,
            _ => CompressSpec::default_types(),
        };
        let level = match v.remove("level") {
            Some((Val::Number(n), span)) => {
                if n > 11 {
                    self.err(
                        "out-of-range",
                        span,
                        "a compression level is between 0 and 11",
                    );
                }
                Some(n as u32)
            }
            _ => None,
        };
        Some(CompressSpec {
            algorithms,
            min_size,
            types,
            level,
        })
    }

    fn response_rule(&mut self, r: &ast::Rule) -> ResponseRuleSpec {
        let when = match &r.when {
            None => Cond::True,
            Some(e) => self.cond(e, true).unwrap_or(Cond::Or(vec![])),
        };
        let mut actions = ResponseActions::default();
        let mut cache_span: Option<Span> = None;
        for a in &r.actions {
            match a {
                Action::CacheOff(span) | Action::Cache(ast::CacheBlock { span, .. })
                    if cache_span.is_some() =>
                {
                    let line = (self.line_of)(cache_span.unwrap_or_default().start);
                    self.err(
                        "conflict",
                        *span,
                        format!("`cache` is already given on line {line}"),
                    );
                }
                Action::CacheOff(span) => {
                    cache_span = Some(*span);
                    actions.no_store = true;
                }
                Action::Cache(b) => {
                    cache_span = Some(b.span);
                    if let Some((_, span)) = &b.key {
                        self.err(
                            "wrong-phase",
                            *span,
                            "the cache key is chosen by request rules; a response rule cannot change it",
                        );
                    }
                    if let Some(o) = &b.origin {
                        self.err("wrong-phase", o.span, "`origin` belongs to request rules");
                    }
                    let mut v =
                        self.settings("a response rule's `cache`", &b.settings, RESPONSE_CACHE);
                    if let Some((Val::Duration(d), _)) = v.remove("ttl") {
                        actions.ttl = Some(d);
                    }
                    if let Some((Val::Duration(d), _)) = v.remove("stale_while_revalidate") {
                        actions.stale_while_revalidate = Some(d);
                    }
                    if let Some((Val::Duration(d), _)) = v.remove("stale_if_error") {
                        actions.stale_if_error = Some(d);
                    }
                    actions.store_set_cookie = v.remove("store_set_cookie").is_some();
                }
                Action::Header(h) if h.response => {
                    if let Some(e) = self.header_edit(h) {
                        actions.headers.push(e);
                    }
                }
                other => {
                    self.err(
                        "wrong-phase",
                        other.span(),
                        format!("`{}` is not allowed in an `on response` rule", other.keyword()),
                    )
                    .help = Some("response rules may use `cache off`, `cache { ttl ... }` and `response_header`".into());
                }
            }
        }
        ResponseRuleSpec {
            name: r.name.name.clone(),
            span: r.name.span,
            line: (self.line_of)(r.span.start),
            when,
            actions,
        }
    }

    // ------------------------------------------------------------ whole-policy lints

    fn lint_rules(&mut self, file: &ast::PolicyFile, model: &Model) {
        // Shadowing: a rule covered by an earlier rule can never match.
        let scopes: Vec<Option<Scope>> = model.rules.iter().map(|r| Scope::of(&r.when)).collect();
        let exact: Vec<bool> = model
            .rules
            .iter()
            .map(|r| Scope::is_exact(&r.when))
            .collect();
        for (j, rj) in model.rules.iter().enumerate() {
            let Some(sj) = &scopes[j] else { continue };
            for i in 0..j {
                let Some(si) = &scopes[i] else { continue };
                if exact[i] && si.covers(sj) {
                    let line = model.rules[i].line;
                    self.warn(
                        "shadowed",
                        rj.span,
                        format!(
                            "rule `{}` can never match: rule `{}` on line {line} matches every request it would",
                            rj.name, model.rules[i].name
                        ),
                    )
                    .help = Some("move it above that rule, or narrow the earlier rule".into());
                    break;
                }
            }
        }
        // Traffic that matches no rule.
        let catch_all = model.rules.iter().any(|r| matches!(r.when, Cond::True));
        if !catch_all && !model.rules.is_empty() {
            let last = file.rules.last().expect("non-empty");
            self.warn(
                "no-default",
                last.name.span,
                "requests that match no rule get 404: there is no rule without `when`",
            )
            .help = Some(
                "add a last rule without a condition, like `rule default { route app }`".into(),
            );
        }
        if model.rules.is_empty() && (!model.backends.is_empty() || !model.listeners.is_empty()) {
            self.warn(
                "no-default",
                Span::new(0, 0),
                "the policy has no rules: every request gets 404",
            )
            .help = Some("add `rule default { route BACKEND }`".into());
        }
        // Unsafe caching.
        for (r, ast_rule) in model.rules.iter().zip(&file.rules) {
            let Some(cache) = &r.cache else { continue };
            if !cache.share_authorized && requires_header(&r.when, &http::header::AUTHORIZATION) {
                self.warn(
                    "unsafe-cache",
                    ast_rule.name.span,
                    format!("rule `{}` caches requests that carry Authorization", r.name),
                )
                .help = Some("say `share_authorized` in its cache block if responses are the same for every user".into());
            }
            if let Some(name) = requires_cookie(&r.when) {
                if cache
                    .key
                    .iter()
                    .all(|k| *k != KeyPart::Cookie(name.clone()))
                {
                    self.warn(
                        "unsafe-cache",
                        ast_rule.name.span,
                        format!("rule `{}` caches requests that carry cookie `{name}`, but the cookie is not in its cache key", r.name),
                    )
                    .help = Some(format!("add cookie(\"{name}\") to the key, or `cache off` for these requests"));
                }
            }
        }
        for (r, ast_rule) in model.response_rules.iter().zip(&file.response_rules) {
            if r.actions.ttl.is_some()
                && !r.actions.store_set_cookie
                && requires_header(&r.when, &http::header::SET_COOKIE)
            {
                self.warn(
                    "unsafe-cache",
                    ast_rule.span,
                    "this rule sets a TTL on responses with Set-Cookie, which are never stored unless you say `store_set_cookie`",
                );
            } else if r.actions.store_set_cookie {
                self.warn(
                    "unsafe-cache",
                    ast_rule.span,
                    "responses with Set-Cookie will be stored (the Set-Cookie header is removed from the stored copy)",
                )
                .help = Some("make sure the cookie is not needed by the client".into());
            }
        }
    }

    fn unused(&mut self, file: &ast::PolicyFile, model: &Model) {
        for (id, b) in model.backends.iter().enumerate() {
            // A duplicate is already an error; references resolve to the first.
            let duplicate = model.backends[..id].iter().any(|o| o.name == b.name);
            if !duplicate
                && !model
                    .rules
                    .iter()
                    .any(|r| r.outcome == Outcome::Forward(id))
            {
                self.warn(
                    "unused",
                    b.span,
                    format!("backend `{}` is never routed to", b.name),
                );
            }
        }
        for (id, l) in model.limiters.iter().enumerate() {
            let duplicate = model.limiters[..id].iter().any(|o| o.name == l.name);
            if !duplicate && !model.rules.iter().any(|r| r.limiter == Some(id)) {
                let span = file
                    .limiters
                    .iter()
                    .find(|al| al.name.name == l.name)
                    .map(|al| al.name.span)
                    .unwrap_or_default();
                self.warn("unused", span, format!("limit `{}` is never used", l.name));
            }
        }
    }
}

/// Does the condition only match requests that carry this header?
fn requires_header(c: &Cond, name: &http::HeaderName) -> bool {
    match c {
        Cond::Atom(a) => match (&a.field, &a.test) {
            (Field::Header(h) | Field::ResponseHeader(h), t) => {
                h == name && !matches!(t, Test::Ne(_) | Test::NotMatches(_))
            }
            _ => false,
        },
        Cond::And(parts) => parts.iter().any(|p| requires_header(p, name)),
        Cond::Or(parts) => !parts.is_empty() && parts.iter().all(|p| requires_header(p, name)),
        _ => false,
    }
}

/// The cookie a condition requires to be present, if any.
fn requires_cookie(c: &Cond) -> Option<String> {
    match c {
        Cond::Atom(a) => match (&a.field, &a.test) {
            (Field::Cookie(n), t) if !matches!(t, Test::Ne(_) | Test::NotMatches(_)) => {
                Some(n.clone())
            }
            _ => None,
        },
        Cond::And(parts) => parts.iter().find_map(requires_cookie),
        _ => None,
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

/// Translates a glob (`*` any run but `/`, `**` any run, `?` one character) into an anchored regex.
pub fn glob_to_regex(glob: &str) -> String {
    let mut out = String::from("^");
    let mut chars = glob.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '*' if chars.peek() == Some(&'*') => {
                chars.next();
                out.push_str(".*");
            }
            '*' => out.push_str("[^/]*"),
            '?' => out.push_str("[^/]"),
            other => out.push_str(&regex::escape(&other.to_string())),
        }
    }
    out.push('$');
    out
}

/// The part of a rule's condition that the shadowing lint understands: a
/// conjunction of host, path and method constraints.
#[derive(Debug, Default)]
struct Scope {
    hosts: Option<Vec<String>>,
    host_suffix: Option<String>,
    path_exact: Option<String>,
    path_prefix: Option<String>,
    methods: Option<Vec<String>>,
}

impl Scope {
    /// The scope of a condition, or `None` when it has parts outside the lint's reach
    /// (those still count as narrowing when it is the later rule).
    fn of(c: &Cond) -> Option<Scope> {
        let mut s = Scope::default();
        let parts: &[Cond] = match c {
            Cond::True => &[],
            Cond::And(parts) => parts,
            other => std::slice::from_ref(other),
        };
        for p in parts {
            let Cond::Atom(a) = p else { continue };
            match (&a.field, &a.test) {
                (Field::Host, Test::Eq(h)) => s.hosts = Some(vec![h.clone()]),
                (Field::Host, Test::InSet(hs)) => s.hosts = Some(hs.clone()),
                (Field::Host, Test::Suffix(x)) => s.host_suffix = Some(x.clone()),
                (Field::Path, Test::Eq(p)) => s.path_exact = Some(p.clone()),
                (Field::Path, Test::Prefix(p)) => s.path_prefix = Some(p.clone()),
                (Field::Method, Test::Eq(m)) => s.methods = Some(vec![m.clone()]),
                (Field::Method, Test::InSet(ms)) => s.methods = Some(ms.clone()),
                _ => {}
            }
        }
        Some(s)
    }

    /// Is the whole condition made of constraints that `Scope` records?
    fn is_exact(c: &Cond) -> bool {
        let parts: &[Cond] = match c {
            Cond::True => return true,
            Cond::And(parts) => parts,
            other => std::slice::from_ref(other),
        };
        parts.iter().all(|p| match p {
            Cond::Atom(a) => matches!(
                (&a.field, &a.test),
                (Field::Host, Test::Eq(_) | Test::InSet(_) | Test::Suffix(_))
                    | (Field::Path, Test::Eq(_) | Test::Prefix(_))
                    | (Field::Method, Test::Eq(_) | Test::InSet(_))
            ),
            _ => false,
        })
    }

    /// Does every request in `other` also fall in `self`?
    fn covers(&self, other: &Scope) -> bool {
        let hosts_ok = match (&self.hosts, &other.hosts) {
            (None, _) => true,
            (Some(mine), Some(theirs)) => theirs.iter().all(|h| mine.contains(h)),
            (Some(_), None) => false,
        };
        let suffix_ok = match &self.host_suffix {
            None => true,
            Some(x) => {
                other
                    .host_suffix
                    .as_ref()
                    .is_some_and(|o| o.ends_with(x.as_str()))
                    || other
                        .hosts
                        .as_ref()
                        .is_some_and(|hs| hs.iter().all(|h| h.ends_with(x.as_str())))
            }
        };
        let their_path = other.path_exact.as_ref().or(other.path_prefix.as_ref());
        let exact_ok = match &self.path_exact {
            None => true,
            Some(p) => other.path_exact.as_ref() == Some(p),
        };
        let prefix_ok = match &self.path_prefix {
            None => true,
            Some(p) => their_path.is_some_and(|t| t.starts_with(p.as_str())),
        };
        let methods_ok = match (&self.methods, &other.methods) {
            (None, _) => true,
            (Some(mine), Some(theirs)) => theirs.iter().all(|m| mine.contains(m)),
            (Some(_), None) => false,
        };
        hosts_ok && suffix_ok && exact_ok && prefix_ok && methods_ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_become_anchored_regexes() {
        let re = regex::Regex::new(&glob_to_regex("/static/*.css")).unwrap();
        assert!(re.is_match("/static/a.css"));
        assert!(!re.is_match("/static/a/b.css"));
        let re = regex::Regex::new(&glob_to_regex("/img/**")).unwrap();
        assert!(re.is_match("/img/a/b.png"));
    }

    #[test]
    fn nets_parse_addresses_and_cidrs() {
        assert!(parse_net("10.0.0.0/8").is_some());
        assert!(parse_net("::1").is_some());
        assert!(parse_net("10.0.0.0/33").is_none());
        assert!(parse_net("nope").is_none());
    }
}
