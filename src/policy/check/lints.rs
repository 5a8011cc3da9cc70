//! Lints over the whole policy: shadowed rules, traffic that matches no rule,
//! unsafe caching, unused backends and limiters.

use super::*;
use std::collections::HashMap;

impl Checker<'_> {
    // ------------------------------------------------------------ whole-policy lints

    pub(super) fn lint_rules(&mut self, file: &ast::PolicyFile, model: &Model) {
        // Shadowing: a rule covered by an earlier rule can never match. Only
        // rules made wholly of host, path and method tests can cover others;
        // they are indexed by host and path so that each rule meets only the
        // earlier rules that could cover it.
        let mut index = ShadowIndex::default();
        for (j, rj) in model.rules.iter().enumerate() {
            let Some(sj) = Scope::of(&rj.when) else {
                continue;
            };
            let first = index
                .candidates(&sj)
                .into_iter()
                .filter(|&i| index.scopes[i].1.covers(&sj))
                .map(|i| index.scopes[i].0)
                .min();
            if let Some(i) = first {
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
            }
            if Scope::is_exact(&rj.when) {
                index.add(j, sj);
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

    pub(super) fn unused(&mut self, file: &ast::PolicyFile, model: &Model) {
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
    pub(super) fn of(c: &Cond) -> Option<Scope> {
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
    pub(super) fn is_exact(c: &Cond) -> bool {
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
    pub(super) fn covers(&self, other: &Scope) -> bool {
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

/// The rules that can shadow later ones, by host and then by path, looked
/// up with borrowed keys (no allocation per lookup).
#[derive(Default)]
struct ShadowIndex {
    /// (rule index, its scope).
    scopes: Vec<(usize, Scope)>,
    any_host: PathMap,
    exact_hosts: HashMap<String, PathMap>,
    /// Keyed by the suffix with its leading dot.
    suffix_hosts: HashMap<String, PathMap>,
}

#[derive(Default)]
struct PathMap {
    any: Vec<usize>,
    exact: HashMap<String, Vec<usize>>,
    prefix: HashMap<String, Vec<usize>>,
}

impl PathMap {
    fn add(&mut self, scope: &Scope, pos: usize) {
        match (&scope.path_exact, &scope.path_prefix) {
            (Some(p), _) => self.exact.entry(p.clone()).or_default().push(pos),
            (None, Some(p)) => self.prefix.entry(p.clone()).or_default().push(pos),
            (None, None) => self.any.push(pos),
        }
    }

    fn candidates(&self, s: &Scope, out: &mut Vec<usize>) {
        out.extend_from_slice(&self.any);
        if let Some(v) = s
            .path_exact
            .as_ref()
            .and_then(|p| self.exact.get(p.as_str()))
        {
            out.extend_from_slice(v);
        }
        if self.prefix.is_empty() {
            return;
        }
        if let Some(p) = s.path_exact.as_ref().or(s.path_prefix.as_ref()) {
            for (i, _) in p.char_indices().chain([(p.len(), ' ')]) {
                if let Some(v) = self.prefix.get(&p[..i]) {
                    out.extend_from_slice(v);
                }
            }
        }
    }
}

impl ShadowIndex {
    fn add(&mut self, rule: usize, scope: Scope) {
        let pos = self.scopes.len();
        match (&scope.hosts, &scope.host_suffix) {
            (Some(hs), _) => {
                for h in hs {
                    self.exact_hosts
                        .entry(h.clone())
                        .or_default()
                        .add(&scope, pos);
                }
            }
            (None, Some(x)) => self
                .suffix_hosts
                .entry(x.clone())
                .or_default()
                .add(&scope, pos),
            (None, None) => self.any_host.add(&scope, pos),
        }
        self.scopes.push((rule, scope));
    }

    /// Positions of the rules that might cover `s` (to be confirmed with `covers`).
    fn candidates(&self, s: &Scope) -> Vec<usize> {
        let mut out = vec![];
        if self.scopes.is_empty() {
            return out;
        }
        self.any_host.candidates(s, &mut out);
        let names = s.hosts.iter().flatten().chain(&s.host_suffix);
        for name in names {
            if !name.starts_with('.') {
                if let Some(m) = self.exact_hosts.get(name.as_str()) {
                    m.candidates(s, &mut out);
                }
            }
            if self.suffix_hosts.is_empty() {
                continue;
            }
            for (i, _) in name.match_indices('.') {
                if let Some(m) = self.suffix_hosts.get(&name[i..]) {
                    m.candidates(s, &mut out);
                }
            }
        }
        out
    }
}
