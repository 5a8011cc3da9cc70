//! Checking rules: conditions (fields, operators, regexes, CIDRs), request
//! rules and their actions, response rules.

use super::*;

// Fields no header edit may set or add.
use crate::upstream::FRAMING_FIELDS;

impl Checker<'_> {
    // ------------------------------------------------------------ conditions

    pub(super) fn cond(&mut self, e: &ast::Expr, response_phase: bool) -> Option<Cond> {
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

    pub(super) fn field(&mut self, s: &ast::KeyPart, response_phase: bool) -> Option<Field> {
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

    pub(super) fn comparison(&mut self, c: &ast::Comparison, response_phase: bool) -> Option<Atom> {
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
                let kind = if op == CmpOp::Glob {
                    PatternKind::Glob
                } else {
                    PatternKind::Regex
                };
                let source = (kind, pattern, matches!(field, Field::Host | Field::Method));
                let compiled = match self.patterns.get(&source) {
                    Some(r) => r.clone(),
                    None => build_pattern(&source),
                };
                let re = match compiled {
                    Ok(re) => re,
                    Err(reason) => {
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
    pub(super) fn text_operand(&mut self, field: &Field, v: &Value) -> Option<String> {
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

    pub(super) fn status(&mut self, v: &Value) -> Option<u16> {
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

    pub(super) fn header_edit(&mut self, h: &ast::HeaderEdit) -> Option<HeaderEdit> {
        let name = self.string(&h.name, "a header name")?;
        let name = self.header_name(&name, h.name.span)?;
        // These describe the connection or the message's framing, which
        // Portico sets for each hop itself: an edit would break the framing
        // (or the HTTP/2 stream, where connection fields are malformed).
        if h.op == ast::HeaderOp::Add && name == http::header::HOST {
            // Two `Host` fields make a request any server must refuse (RFC
            // 9112 §3.2), and that two hops may read two ways.
            self.err(
                "invalid-header",
                h.name.span,
                "`host` is one field: `add` would send two".to_string(),
            )
            .help = Some("`set` replaces it".into());
            return None;
        }
        if h.op != ast::HeaderOp::Remove && FRAMING_FIELDS.contains(&name.as_str()) {
            self.err(
                "invalid-header",
                h.name.span,
                format!("`{name}` cannot be set: Portico frames each hop itself"),
            )
            .help = Some(
                "Connection, Keep-Alive, Proxy-Connection, TE, Trailer, Transfer-Encoding, \
                 Upgrade and Content-Length follow the message; `remove` is allowed"
                    .into(),
            );
            return None;
        }
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

    pub(super) fn rule(&mut self, r: &ast::Rule, model: &Model) -> RuleSpec {
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
                    let code = match self.status(status) {
                        Some(c) if c >= 200 => c,
                        Some(c) => {
                            // HTTP/1.1 clients would get a 500, HTTP/2 ones
                            // a broken stream.
                            self.err(
                                "invalid-status",
                                status.span,
                                format!("`respond` gives the final answer; {c} is an interim one"),
                            )
                            .help = Some("a final status is 200 to 599".into());
                            200
                        }
                        None => 200,
                    };
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

    pub(super) fn cache_block(&mut self, b: &ast::CacheBlock) -> Option<CacheSpec> {
        let mut v = self.settings("`cache`", &b.settings, CACHE);
        let key = match &b.key {
            None => CacheSpec::default_key(),
            Some((parts, span)) => {
                if parts.is_empty() {
                    self.err("missing", *span, "a cache key needs at least one part")
                        .help = Some("write `key [host, path]`".into());
                }
                let mut key: Vec<KeyPart> = parts.iter().filter_map(|p| self.key_part(p)).collect();
                // The URL's parts first, in the order written (see
                // `KeyPart::from_request_fields`).
                key.sort_by_key(KeyPart::from_request_fields);
                key
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

    pub(super) fn compress(&mut self, b: &ast::CompressBlock) -> Option<CompressSpec> {
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

    pub(super) fn response_rule(&mut self, r: &ast::Rule) -> ResponseRuleSpec {
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
}
