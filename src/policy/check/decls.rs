//! Checking declarations: listeners, admin, the storage, http and purge
//! sections, backends and limiters.

use super::*;
use crate::upstream::{valid_host_field, KeepAlive};

impl Checker<'_> {
    // ------------------------------------------------------------ declarations

    pub(super) fn listen_addr(&mut self, v: &Value, what: &str) -> Option<String> {
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

    pub(super) fn listener(&mut self, l: &ast::Listen) -> Option<ListenerConfig> {
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

    pub(super) fn admin(&mut self, a: &ast::Admin) -> Option<AdminConfig> {
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

    pub(super) fn storage(&mut self, s: &ast::Section, out: &mut StorageConfig) {
        let mut v = self.settings("`storage`", &s.settings, STORAGE);
        if let Some((Val::Size(n), _)) = v.remove("memory") {
            out.memory = n;
        }
        let mut disk_span = None;
        if let Some((Val::PathAndSize(p, n), span)) = v.remove("disk") {
            disk_span = Some(span);
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
        if let (Some((_, n)), Some(span)) = (&out.disk, disk_span) {
            // The store's own rule: four disk blocks, each holding the
            // largest object with room to spare, of at least 1MiB.
            let needed = crate::cache::StoreConfig::disk_needed(
                usize::try_from(out.max_object).unwrap_or(usize::MAX),
            ) as u64;
            if *n < needed {
                self.err(
                    "out-of-range",
                    span,
                    format!(
                        "the disk tier needs at least {} for objects of up to {}",
                        show_size(needed),
                        show_size(out.max_object)
                    ),
                )
                .help = Some("raise the disk size or lower max_object".into());
            }
        }
    }

    pub(super) fn http(&mut self, s: &ast::Section, out: &mut HttpConfig) {
        let mut v = self.settings("`http`", &s.settings, HTTP);
        if let Some((Val::Duration(d), _)) = v.remove("header_timeout") {
            out.header_timeout = d;
        }
        if let Some((Val::Duration(d), _)) = v.remove("idle_timeout") {
            out.idle_timeout = d;
        }
        if let Some((Val::Duration(d), span)) = v.remove("tunnel_idle_timeout") {
            if d.is_zero() {
                self.err(
                    "out-of-range",
                    span,
                    "`tunnel_idle_timeout` must be above zero",
                )
                .help = Some("an upgraded connection would be closed at once".into());
            } else {
                out.tunnel_idle_timeout = d;
            }
        }
        if let Some((Val::Duration(d), span)) = v.remove("send_timeout") {
            if d.is_zero() {
                self.err("out-of-range", span, "`send_timeout` must be above zero")
                    .help = Some("a response must be given some time to be sent".into());
            } else {
                out.send_timeout = d;
            }
        }
        if let Some((Val::Size(n), span)) = v.remove("max_header") {
            // HTTP/1.1 heads are read into a buffer of at least 8 KiB
            // (hyper's least), and one that fits is taken whole: a smaller
            // limit would not be kept.
            if n < 8 << 10 {
                self.err("out-of-range", span, "`max_header` must be at least 8KiB")
                    .help = Some("request heads of up to 8KiB are always read".into());
            } else {
                out.max_header = n;
            }
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
        if let Some((Val::Number(n), span)) = v.remove("max_connections") {
            if n == 0 {
                self.err("out-of-range", span, "`max_connections` must be at least 1")
                    .help = Some("a listener that accepts nobody serves nobody".into());
            } else {
                out.max_connections = n;
            }
        }
        if let Some((Val::Nets(n), _)) = v.remove("trust_forwarded") {
            out.trust_forwarded = n;
        }
    }

    pub(super) fn purge(&mut self, s: &ast::Section, out: &mut PurgeConfig) {
        let mut v = self.settings("`purge`", &s.settings, PURGE);
        if let Some((Val::Nets(n), _)) = v.remove("allow") {
            out.allow = n;
        }
    }

    pub(super) fn backend(&mut self, b: &ast::Backend) -> BackendSpec {
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
            keepalive: KeepAlive::default().idle_max,
            keepalive_timeout: KeepAlive::default().idle_timeout,
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
                host: None,
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
            if let Some((Val::Str(host), span)) = v.remove("host") {
                if valid_host_field(host.as_bytes()) {
                    health.host = Some(host);
                } else {
                    self.err(
                        "invalid-header",
                        span,
                        format!("`{host}` is not a host for the `Host` field"),
                    )
                    .help = Some("write a host or host:port, like \"api.example.com\"".into());
                }
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
        if let Some((Val::Number(n), _)) = v.remove("keepalive") {
            spec.keepalive = usize::try_from(n).unwrap_or(usize::MAX);
        }
        if let Some((Val::Duration(d), _)) = v.remove("keepalive_timeout") {
            spec.keepalive_timeout = d;
        }
        spec.tls = v.remove("tls").is_some();
        if let Some((Val::Str(s), _)) = v.remove("ca_file") {
            spec.ca_file = Some(s.into());
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

    pub(super) fn limiter(&mut self, l: &ast::Limiter) -> Option<LimiterSpec> {
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
}

/// A size in the largest binary unit that divides it, as policies write it.
fn show_size(n: u64) -> String {
    for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if n >= 1 << shift && n % (1 << shift) == 0 {
            return format!("{}{unit}", n >> shift);
        }
    }
    format!("{n}B")
}
