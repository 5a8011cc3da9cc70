//! Policy text into the syntax tree: the pest grammar in `grammar/policy.pest`,
//! then one function per grammar rule that builds the AST node.
//!
//! Hostile input is bounded before pest sees it: the text's size and the
//! nesting depth of brackets are capped, and pest's call limit stops a
//! runaway parse; each limit is reported as a diagnostic.
//!
//! A large policy is cut before a top-level `rule` near its middle and the
//! two halves are parsed on two threads (pest is the larger part of loading
//! a policy of thousands of rules). The result is the same as one parse; when
//! either half fails, the whole text is parsed again so that the syntax error
//! is the one a single parse reports.

use super::ast::*;
use super::diag::Diagnostic;
use pest::iterators::Pair;
use pest::Parser as _;

#[derive(pest_derive::Parser)]
#[grammar = "grammar/policy.pest"]
struct PolicyParser;

/// The largest policy text accepted.
pub const MAX_POLICY_BYTES: usize = 16 * 1024 * 1024;
/// The deepest nesting of brackets accepted.
pub const MAX_NESTING: usize = 64;

/// Parses a policy text into its syntax tree, or the syntax error.
pub fn parse(text: &str) -> Result<PolicyFile, Diagnostic> {
    if text.len() > MAX_POLICY_BYTES {
        return Err(Diagnostic::error(
            "too-large",
            Span::new(0, 0),
            format!(
                "the policy is {} bytes, more than the limit of {} bytes",
                text.len(),
                MAX_POLICY_BYTES
            ),
        ));
    }
    check_nesting(text)?;
    // The call limit bounds each parse and only stops pathological grammars;
    // the grammar has no exponential paths, so this is a safety net.
    pest::set_call_limit(std::num::NonZeroUsize::new(200_000_000));
    if let Some(file) = split_point(text).and_then(|at| parse_halves(text, at)) {
        return Ok(file);
    }
    let mut pairs = PolicyParser::parse(Rule::policy, text).map_err(syntax_error)?;
    let policy = pairs.next().expect("the grammar always yields a policy");
    Ok(build_policy(policy))
}

/// At most this many syntax errors are reported for one text.
pub const MAX_SYNTAX_ERRORS: usize = 20;

/// The keywords that start a top-level item.
const ITEM_KEYWORDS: [&str; 10] = [
    "listen", "admin", "storage", "http", "purge", "backend", "limit", "rule", "on", "test",
];

/// The syntax errors after `first`, the error a parse of `text` reported.
///
/// pest stops at the first error. To show the next ones, parsing resumes at
/// the next line after the error that starts with a top-level keyword in
/// its first column (the convention of every example policy), as if the
/// text before it were blank; each such parse reports its own first error.
/// An item broken so badly that it swallows the next item's line hides that
/// item's errors, never invents one: every error reported is one a parse of
/// a tail of the text really meets.
pub fn further_syntax_errors(text: &str, first: &Diagnostic) -> Vec<Diagnostic> {
    let mut found = Vec::new();
    // Size and nesting limits are checked on the whole text before any
    // parse; a text over them is not parsed again.
    if first.code != "syntax" {
        return found;
    }
    let mut after = first.span.start;
    // Each tail parse costs its length: all of them together at most four
    // parses of the whole text.
    let mut budget = text.len().saturating_mul(4);
    while found.len() + 1 < MAX_SYNTAX_ERRORS {
        let Some(at) = next_item_line(text, after) else {
            break;
        };
        let Some(left) = budget.checked_sub(text.len() - at) else {
            break;
        };
        budget = left;
        let mut tail = " ".repeat(at);
        tail.push_str(&text[at..]);
        match PolicyParser::parse(Rule::policy, &tail) {
            Ok(_) => break,
            Err(e) => {
                let d = syntax_error(e);
                after = d.span.start.max(at + 1);
                found.push(d);
            }
        }
    }
    found
}

/// The start of the first line after the one holding `offset` that begins
/// with a top-level keyword.
fn next_item_line(text: &str, offset: usize) -> Option<usize> {
    let mut at = text.get(offset..)?.find('\n')? + offset + 1;
    while at < text.len() {
        let line = &text[at..];
        let starts_item = ITEM_KEYWORDS.iter().any(|k| {
            line.starts_with(k)
                && line[k.len()..]
                    .chars()
                    .next()
                    .is_some_and(char::is_whitespace)
        });
        if starts_item {
            return Some(at);
        }
        at += line.find('\n')? + 1;
    }
    None
}

/// From this size on, a policy is parsed in two halves on two threads.
const SPLIT_MIN_BYTES: usize = 64 * 1024;

/// Where a large policy can be cut in two: the first `rule` keyword in its
/// second half that starts a line outside any bracket, string or comment.
///
/// A cut there gives the same items as one parse: every declaration before
/// it either ends with `}` or can only be followed by `tls` or `token`, so
/// none reaches across the `rule` that starts the second half.
fn split_point(text: &str) -> Option<usize> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if text.len() < SPLIT_MIN_BYTES || threads < 2 {
        return None;
    }
    let bytes = text.as_bytes();
    let half = bytes.len() / 2;
    let mut depth = 0usize;
    let mut in_string = false;
    let mut in_comment = false;
    let mut escaped = false;
    let mut line_start = true;
    for (i, &b) in bytes.iter().enumerate() {
        if in_comment {
            in_comment = b != b'\n';
            line_start = !in_comment;
            continue;
        }
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' | b'\n' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'#' => in_comment = true,
            b'"' => in_string = true,
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            b'r' if line_start
                && depth == 0
                && i >= half
                && bytes[i..].starts_with(b"rule")
                && bytes.get(i + 4).is_some_and(u8::is_ascii_whitespace) =>
            {
                return Some(i);
            }
            _ => {}
        }
        line_start = match b {
            b'\n' => true,
            b' ' | b'\t' | b'\r' => line_start,
            _ => false,
        };
    }
    None
}

/// Parses the text before `at` and the text from `at` on two threads and
/// joins the two files; `None` when either half fails, so that the caller
/// parses the whole text and reports the error a single parse finds.
fn parse_halves(text: &str, at: usize) -> Option<PolicyFile> {
    // The second half is parsed behind blanks in place of the first, so that
    // its spans are offsets into the whole text.
    let mut tail_text = " ".repeat(at);
    tail_text.push_str(&text[at..]);
    let parse_part = |part: &str| {
        PolicyParser::parse(Rule::policy, part)
            .ok()
            .map(|mut pairs| {
                build_policy(pairs.next().expect("the grammar always yields a policy"))
            })
    };
    let (head, tail) = std::thread::scope(|scope| {
        let tail = scope.spawn(|| parse_part(&tail_text));
        let head = parse_part(&text[..at]);
        match tail.join() {
            Ok(tail) => (head, tail),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    });
    let (mut file, tail) = (head?, tail?);
    file.listeners.extend(tail.listeners);
    file.admins.extend(tail.admins);
    file.sections.extend(tail.sections);
    file.backends.extend(tail.backends);
    file.limiters.extend(tail.limiters);
    file.rules.extend(tail.rules);
    for mut r in tail.response_rules {
        // Unnamed response rules are numbered in the file; no written name has a `#`.
        if r.name.name.starts_with(UNNAMED_RESPONSE) {
            r.name.name = unnamed_response(file.response_rules.len());
        }
        file.response_rules.push(r);
    }
    file.tests.extend(tail.tests);
    Some(file)
}

/// Rejects text whose brackets nest deeper than [`MAX_NESTING`], outside strings and comments.
fn check_nesting(text: &str) -> Result<(), Diagnostic> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut in_comment = false;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        if in_comment {
            in_comment = c != '\n';
            continue;
        }
        if in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' | '\n' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '#' => in_comment = true,
            '"' => in_string = true,
            '(' | '[' | '{' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Err(Diagnostic::error(
                        "too-deep",
                        Span::new(i, i + 1),
                        format!("brackets nest deeper than the limit of {MAX_NESTING}"),
                    ));
                }
            }
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// How grammar rules are named in "expected ..." messages.
fn rule_label(rule: &Rule) -> String {
    match rule {
        Rule::EOI => "end of file".into(),
        Rule::ident | Rule::word | Rule::any_word | Rule::expect_word => "a name".into(),
        Rule::name | Rule::subject => {
            "a request field (method, host, path, header(\"...\"), ...)".into()
        }
        Rule::string => "a quoted string".into(),
        Rule::duration => "a duration like 30s".into(),
        Rule::size => "a size like 64MiB".into(),
        Rule::rate => "a rate like 100/s".into(),
        Rule::number => "a number".into(),
        Rule::list | Rule::key_list => "a list like [a, b]".into(),
        Rule::cmp_op => "an operator (==, !=, ^=, $=, ~, !~, glob, in, <, >)".into(),
        Rule::and_op | Rule::or_op => "`and` or `or`".into(),
        Rule::not_op => "`not`".into(),
        Rule::cond | Rule::comparison => "a condition".into(),
        Rule::block | Rule::cache_block => "`{`".into(),
        Rule::off => "`off`".into(),
        Rule::listen_decl
        | Rule::admin_decl
        | Rule::section_decl
        | Rule::section_name
        | Rule::backend_decl
        | Rule::limit_decl
        | Rule::rule_decl
        | Rule::response_decl
        | Rule::test_decl => {
            "a declaration (listen, admin, storage, http, purge, backend, limit, rule, on response, test)"
                .into()
        }
        Rule::setting => "a setting".into(),
        Rule::route_act
        | Rule::cache_act
        | Rule::compress_act
        | Rule::throttle_act
        | Rule::header_act
        | Rule::header_target
        | Rule::redirect_act
        | Rule::deny_act
        | Rule::respond_act => "an action".into(),
        Rule::header_op => "`set`, `add` or `remove`".into(),
        Rule::key_part => "a key part (host, path, query, header(\"...\"), ...)".into(),
        Rule::health_opt | Rule::health_opt_name => {
            "a health option (every, timeout, expect, rise, fall, host)".into()
        }
        Rule::compress_opt | Rule::compress_opt_name => {
            "a compression option (min, types, level)".into()
        }
        Rule::server_opt | Rule::weight_opt | Rule::backup_opt => "`weight` or `backup`".into(),
        Rule::test_request | Rule::test_response | Rule::expect_stmt => {
            "`request`, `response` or `expect`".into()
        }
        other => format!("{other:?}"),
    }
}

fn syntax_error(e: pest::error::Error<Rule>) -> Diagnostic {
    let span = match e.location {
        pest::error::InputLocation::Pos(p) => Span::new(p, p + 1),
        pest::error::InputLocation::Span((s, end)) => Span::new(s, end),
    };
    let message = match &e.variant {
        pest::error::ErrorVariant::ParsingError { positives, .. } => {
            let mut labels: Vec<String> = positives.iter().map(rule_label).collect();
            labels.sort();
            labels.dedup();
            match labels.len() {
                0 => "syntax error".to_string(),
                1 => format!("syntax error: expected {}", labels[0]),
                _ => {
                    let last = labels.pop().unwrap_or_default();
                    format!("syntax error: expected {} or {}", labels.join(", "), last)
                }
            }
        }
        pest::error::ErrorVariant::CustomError { message } => message.clone(),
    };
    Diagnostic::error("syntax", span, message)
}

fn ident(p: Pair<Rule>) -> Ident {
    Ident {
        name: p.as_str().to_string(),
        span: p.as_span().into(),
    }
}

fn unescape(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some('r') => out.push('\r'),
                Some('"') => out.push('"'),
                Some('\\') => out.push('\\'),
                // Any other escape is kept as written, so that regexes read
                // naturally: "\.css$" means the regex \.css$.
                Some(other) => {
                    out.push('\\');
                    out.push(other);
                }
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn string(p: Pair<Rule>) -> String {
    let inner = p.into_inner().next().map(|i| i.as_str()).unwrap_or("");
    unescape(inner)
}

fn split_number(s: &str) -> (u64, &str) {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    // Numbers beyond u64 saturate; the checker's range checks report them.
    let n = s[..digits].parse::<u64>().unwrap_or(u64::MAX);
    (n, &s[digits..])
}

fn duration_ms(s: &str) -> u64 {
    let (n, unit) = split_number(s);
    let mult = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => 7 * 86_400_000,
    };
    n.saturating_mul(mult)
}

fn size_bytes(s: &str) -> u64 {
    let (n, unit) = split_number(s);
    let mult: u64 = match unit {
        "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => 1_000_000_000_000,
    };
    n.saturating_mul(mult)
}

fn value(p: Pair<Rule>) -> Value {
    let span: Span = p.as_span().into();
    let kind = match p.as_rule() {
        Rule::string => ValueKind::Str(string(p)),
        Rule::duration => ValueKind::Duration(duration_ms(p.as_str())),
        Rule::size => ValueKind::Size(size_bytes(p.as_str())),
        Rule::rate => {
            let (n, rest) = split_number(p.as_str());
            let per = match rest {
                "/s" => 1_000,
                "/m" => 60_000,
                _ => 3_600_000,
            };
            ValueKind::Rate(n, per)
        }
        Rule::number => ValueKind::Number(split_number(p.as_str()).0),
        Rule::word | Rule::any_word | Rule::expect_word => ValueKind::Word(p.as_str().to_string()),
        Rule::addr => ValueKind::Addr(p.as_str().to_string()),
        Rule::env_call => ValueKind::Env(string(p.into_inner().next().expect("env has a string"))),
        Rule::call => {
            let mut inner = p.into_inner();
            let name = inner.next().expect("call has a name").as_str().to_string();
            let arg = string(inner.next().expect("call has an argument"));
            ValueKind::Call(name, arg)
        }
        Rule::list => ValueKind::List(p.into_inner().map(value).collect()),
        other => unreachable!("not a value rule: {other:?}"),
    };
    Value { kind, span }
}

fn setting(p: Pair<Rule>) -> Setting {
    let span = p.as_span().into();
    let mut inner = p.into_inner();
    let name = ident(inner.next().expect("setting has a name"));
    Setting {
        name,
        values: inner.map(value).collect(),
        span,
    }
}

/// `name value` options such as `every 5s` (the name is its own token rule).
fn option(p: Pair<Rule>) -> Setting {
    let span = p.as_span().into();
    let mut inner = p.into_inner();
    let name = ident(inner.next().expect("option has a name"));
    Setting {
        name,
        values: inner.map(value).collect(),
        span,
    }
}

fn key_part(p: Pair<Rule>) -> KeyPart {
    let span: Span = p.as_span().into();
    let inner = p.into_inner().next().expect("key part has content");
    match inner.as_rule() {
        Rule::call => {
            let mut c = inner.into_inner();
            let name = c.next().expect("call has a name").as_str().to_string();
            let arg = string(c.next().expect("call has an argument"));
            KeyPart {
                name,
                arg: Some(arg),
                span,
            }
        }
        _ => KeyPart {
            name: inner.as_str().to_string(),
            arg: None,
            span,
        },
    }
}

fn key_list(p: Pair<Rule>) -> Vec<KeyPart> {
    p.into_inner().map(key_part).collect()
}

fn build_policy(p: Pair<Rule>) -> PolicyFile {
    let mut file = PolicyFile::default();
    for item in p.into_inner() {
        match item.as_rule() {
            Rule::listen_decl => file.listeners.push(listen(item)),
            Rule::admin_decl => file.admins.push(admin(item)),
            Rule::section_decl => file.sections.push(section(item)),
            Rule::backend_decl => file.backends.push(backend(item)),
            Rule::limit_decl => file.limiters.push(limiter(item)),
            Rule::rule_decl => file.rules.push(rule(item)),
            Rule::response_decl => {
                let n = file.response_rules.len();
                file.response_rules.push(response_rule(item, n));
            }
            Rule::test_decl => file.tests.push(test_block(item)),
            Rule::EOI => {}
            other => unreachable!("unexpected item {other:?}"),
        }
    }
    file
}

fn listen(p: Pair<Rule>) -> Listen {
    let span = p.as_span().into();
    let mut inner = p.into_inner();
    let addr = value(inner.next().expect("listen has an address"));
    let tls = inner.next().map(|tls| {
        tls.into_inner()
            .map(|c| {
                let span = c.as_span().into();
                let mut ci = c.into_inner();
                let cert = value(ci.next().expect("cert path"));
                let key = value(ci.next().expect("key path"));
                let names = ci
                    .next()
                    .map(|l| l.into_inner().map(value).collect())
                    .unwrap_or_default();
                Cert {
                    cert,
                    key,
                    names,
                    span,
                }
            })
            .collect()
    });
    Listen { addr, tls, span }
}

fn admin(p: Pair<Rule>) -> Admin {
    let span = p.as_span().into();
    let mut inner = p.into_inner();
    let addr = value(inner.next().expect("admin has an address"));
    let token = inner.next().map(value);
    Admin { addr, token, span }
}

fn section(p: Pair<Rule>) -> Section {
    let span = p.as_span().into();
    let mut inner = p.into_inner();
    let name = ident(inner.next().expect("section name"));
    Section {
        name,
        settings: inner.map(setting).collect(),
        span,
    }
}

fn backend(p: Pair<Rule>) -> Backend {
    let span = p.as_span().into();
    let mut inner = p.into_inner();
    let name = ident(inner.next().expect("backend name"));
    let mut b = Backend {
        name,
        servers: vec![],
        balance: vec![],
        health: vec![],
        static_dir: vec![],
        settings: vec![],
        span,
    };
    for stmt in inner {
        let span: Span = stmt.as_span().into();
        match stmt.as_rule() {
            Rule::server_stmt => {
                let mut si = stmt.into_inner();
                let addr = value(si.next().expect("server address"));
                let mut server = Server {
                    addr,
                    weight: None,
                    backup: false,
                    span,
                };
                for opt in si {
                    let o = opt.into_inner().next().expect("server option");
                    match o.as_rule() {
                        Rule::weight_opt => {
                            server.weight = o.into_inner().next().map(value);
                        }
                        _ => server.backup = true,
                    }
                }
                b.servers.push(server);
            }
            Rule::balance_stmt => {
                let mut bi = stmt.into_inner();
                let algorithm = ident(bi.next().expect("balance algorithm"));
                let key = bi.next().map(key_list);
                b.balance.push(Balance {
                    algorithm,
                    key,
                    span,
                });
            }
            Rule::health_stmt => {
                let mut hi = stmt.into_inner();
                let method = ident(hi.next().expect("health method"));
                let path = value(hi.next().expect("health path"));
                b.health.push(Health {
                    method,
                    path,
                    options: hi.map(option).collect(),
                    span,
                });
            }
            Rule::static_stmt => {
                let mut si = stmt.into_inner();
                let root = value(si.next().expect("static root"));
                b.static_dir.push(StaticDir {
                    root,
                    options: si.map(option).collect(),
                    span,
                });
            }
            Rule::setting => b.settings.push(setting(stmt)),
            other => unreachable!("unexpected backend statement {other:?}"),
        }
    }
    b
}

fn limiter(p: Pair<Rule>) -> Limiter {
    let span = p.as_span().into();
    let mut inner = p.into_inner();
    let name = ident(inner.next().expect("limit name"));
    let mut l = Limiter {
        name,
        by: None,
        settings: vec![],
        span,
    };
    for stmt in inner {
        match stmt.as_rule() {
            Rule::by_stmt => {
                l.by = stmt.into_inner().next().map(key_part);
            }
            _ => l.settings.push(setting(stmt)),
        }
    }
    l
}

fn rule(p: Pair<Rule>) -> Rule_ {
    let span = p.as_span().into();
    let mut inner = p.into_inner();
    let name = ident(inner.next().expect("rule name"));
    rule_body(name, inner, span)
}

type Rule_ = super::ast::Rule;

const UNNAMED_RESPONSE: &str = "response#";

/// The name of the unnamed response rule at `index` among the response rules.
fn unnamed_response(index: usize) -> String {
    format!("{UNNAMED_RESPONSE}{}", index + 1)
}

fn response_rule(p: Pair<Rule>, index: usize) -> Rule_ {
    let span: Span = p.as_span().into();
    let mut inner = p.into_inner().peekable();
    let name = match inner.peek().map(|p| p.as_rule()) {
        Some(Rule::ident) => ident(inner.next().expect("peeked")),
        _ => Ident {
            name: unnamed_response(index),
            span: Span::new(span.start, span.start + "on response".len()),
        },
    };
    rule_body(name, inner, span)
}

fn rule_body<'a>(name: Ident, inner: impl Iterator<Item = Pair<'a, Rule>>, span: Span) -> Rule_ {
    let mut when = None;
    let mut actions = vec![];
    for part in inner {
        match part.as_rule() {
            Rule::cond => when = Some(cond(part)),
            Rule::block => actions = part.into_inner().map(action).collect(),
            other => unreachable!("unexpected rule part {other:?}"),
        }
    }
    Rule_ {
        name,
        when,
        actions,
        span,
    }
}

/// Operator precedence: `not` binds tightest, then `and`, then `or`.
fn cond(p: Pair<Rule>) -> Expr {
    // Shunting-yard over the flat sequence the grammar yields.
    enum Tok {
        And,
        Or,
    }
    let mut operands: Vec<Expr> = vec![];
    let mut ops: Vec<Tok> = vec![];
    let mut pending_not: Vec<Span> = vec![];

    fn reduce(operands: &mut Vec<Expr>, op: Tok) {
        let right = operands.pop().expect("right operand");
        let left = operands.pop().expect("left operand");
        let span = left.span().join(right.span());
        operands.push(match op {
            Tok::And => Expr::And(Box::new(left), Box::new(right), span),
            Tok::Or => Expr::Or(Box::new(left), Box::new(right), span),
        });
    }

    for part in p.into_inner() {
        match part.as_rule() {
            Rule::not_op => pending_not.push(part.as_span().into()),
            Rule::and_op => {
                while matches!(ops.last(), Some(Tok::And)) {
                    let op = ops.pop().expect("checked");
                    reduce(&mut operands, op);
                }
                ops.push(Tok::And);
            }
            Rule::or_op => {
                while let Some(op) = ops.pop() {
                    reduce(&mut operands, op);
                }
                ops.push(Tok::Or);
            }
            Rule::cond | Rule::comparison => {
                let mut e = if part.as_rule() == Rule::cond {
                    cond(part)
                } else {
                    Expr::Cmp(comparison(part))
                };
                while let Some(s) = pending_not.pop() {
                    let span = s.join(e.span());
                    e = Expr::Not(Box::new(e), span);
                }
                operands.push(e);
            }
            other => unreachable!("unexpected condition part {other:?}"),
        }
    }
    while let Some(op) = ops.pop() {
        reduce(&mut operands, op);
    }
    operands.pop().expect("a condition has an operand")
}

fn comparison(p: Pair<Rule>) -> Comparison {
    let span = p.as_span().into();
    let mut inner = p.into_inner();
    let subject = key_part(inner.next().expect("comparison subject"));
    let op = inner.next().map(|o| {
        (
            CmpOp::parse(o.as_str()).expect("grammar only yields known operators"),
            Span::from(o.as_span()),
        )
    });
    let operand = inner.next().map(value);
    Comparison {
        subject,
        op,
        operand,
        span,
    }
}

fn action(p: Pair<Rule>) -> Action {
    let span: Span = p.as_span().into();
    match p.as_rule() {
        Rule::route_act => Action::Route(ident(p.into_inner().next().expect("route target")), span),
        Rule::throttle_act => {
            Action::Throttle(ident(p.into_inner().next().expect("limiter name")), span)
        }
        Rule::cache_act => {
            let inner = p.into_inner().next().expect("cache body");
            match inner.as_rule() {
                Rule::off => Action::CacheOff(span),
                _ => {
                    let mut block = CacheBlock {
                        key: None,
                        origin: None,
                        settings: vec![],
                        span,
                    };
                    for stmt in inner.into_inner() {
                        match stmt.as_rule() {
                            Rule::key_stmt => {
                                let s: Span = stmt.as_span().into();
                                let list = stmt.into_inner().next().expect("key list");
                                block.key = Some((key_list(list), s));
                            }
                            Rule::origin_stmt => {
                                block.origin =
                                    Some(ident(stmt.into_inner().next().expect("origin mode")));
                            }
                            _ => block.settings.push(setting(stmt)),
                        }
                    }
                    Action::Cache(block)
                }
            }
        }
        Rule::compress_act => {
            let mut inner = p.into_inner().peekable();
            if matches!(inner.peek().map(|p| p.as_rule()), Some(Rule::off)) {
                return Action::CompressOff(span);
            }
            let mut block = CompressBlock {
                algorithms: vec![],
                options: vec![],
                span,
            };
            for part in inner {
                match part.as_rule() {
                    Rule::word => block.algorithms.push(ident(part)),
                    _ => block.options.push(option(part)),
                }
            }
            Action::Compress(block)
        }
        Rule::header_act => {
            let mut inner = p.into_inner();
            let response = inner.next().expect("header target").as_str() == "response_header";
            let op = match inner.next().expect("header op").as_str() {
                "set" => HeaderOp::Set,
                "add" => HeaderOp::Add,
                _ => HeaderOp::Remove,
            };
            let name = value(inner.next().expect("header name"));
            let value = inner.next().map(value);
            Action::Header(HeaderEdit {
                response,
                op,
                name,
                value,
                span,
            })
        }
        Rule::redirect_act => {
            let mut parts: Vec<Value> = p.into_inner().map(value).collect();
            let location = parts.pop().expect("redirect location");
            Action::Redirect {
                status: parts.pop(),
                location,
                span,
            }
        }
        Rule::deny_act => Action::Deny {
            status: p.into_inner().next().map(value),
            span,
        },
        Rule::respond_act => {
            let mut status = None;
            let mut body = None;
            let mut options = vec![];
            for part in p.into_inner() {
                match part.as_rule() {
                    Rule::number => status = Some(value(part)),
                    Rule::string => body = Some(value(part)),
                    _ => options.push(option(part)),
                }
            }
            Action::Respond {
                status: status.expect("respond has a status"),
                body,
                options,
                span,
            }
        }
        Rule::setting => Action::Setting(setting(p)),
        other => unreachable!("unexpected action {other:?}"),
    }
}

fn header_pair(p: Pair<Rule>) -> (String, String) {
    let mut inner = p.into_inner();
    let name = string(inner.next().expect("header name"));
    let value = string(inner.next().expect("header value"));
    (name, value)
}

fn test_block(p: Pair<Rule>) -> TestBlock {
    let span = p.as_span().into();
    let mut inner = p.into_inner();
    let name = string(inner.next().expect("test name"));
    let mut t = TestBlock {
        name,
        request: None,
        response: None,
        expects: vec![],
        span,
    };
    for stmt in inner {
        let span: Span = stmt.as_span().into();
        match stmt.as_rule() {
            Rule::test_request => {
                let mut ri = stmt.into_inner();
                let method = ident(ri.next().expect("request method"));
                let url = value(ri.next().expect("request url"));
                let mut req = TestRequest {
                    method,
                    url,
                    headers: vec![],
                    client_ip: None,
                    span,
                };
                for opt in ri {
                    let o = opt.into_inner().next().expect("request option");
                    match o.as_rule() {
                        Rule::header_opt => req.headers.push(header_pair(o)),
                        _ => req.client_ip = o.into_inner().next().map(value),
                    }
                }
                t.request = Some(req);
            }
            Rule::test_response => {
                let mut ri = stmt.into_inner();
                let status = value(ri.next().expect("response status"));
                t.response = Some(TestResponse {
                    status,
                    headers: ri.map(header_pair).collect(),
                    span,
                });
            }
            Rule::expect_stmt => {
                let mut ei = stmt.into_inner();
                let what = ident(ei.next().expect("expectation"));
                t.expects.push(Expect {
                    what,
                    args: ei.map(value).collect(),
                    span,
                });
            }
            other => unreachable!("unexpected test statement {other:?}"),
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_design_sketch() {
        let text = r#"
listen ":8080"
listen ":8443" tls { cert "certs/site.pem" key "certs/site.key" }
admin "127.0.0.1:9090" token env("PORTICO_ADMIN_TOKEN")
storage { memory 512MiB disk "/var/cache/portico" 20GiB max_object 64MiB }

backend app {
  server "10.0.0.2:3000" weight 2
  server "10.0.0.3:3000"
  balance least_conn
  health get "/healthz" every 5s timeout 1s
}

limit per_client { rate 100/s burst 200 by client.ip }

rule assets when path ~ "\.(css|js|png|woff2)$" {
  route app
  cache { key [host, path] ttl 7d stale_while_revalidate 1m stale_if_error 1d }
  compress br, gzip min 1KiB
}

rule api when path ^= "/api/" and not method in [POST, PUT] or client.ip in [10.0.0.0/8, ::1] {
  route app
  throttle per_client
  cache off
}

on response when status >= 500 or header("Set-Cookie") {
  cache off
}

test "assets ignore the query string" {
  request GET "https://shop.example/app.css?v=3"
  expect rule assets
  expect cache_key "shop.example/app.css"
  expect ttl 7d
}
"#;
        let p = parse(text).unwrap();
        assert_eq!(p.listeners.len(), 2);
        assert_eq!(p.backends[0].servers.len(), 2);
        assert_eq!(p.rules.len(), 2);
        assert_eq!(p.response_rules.len(), 1);
        assert_eq!(p.tests[0].expects.len(), 3);
        // `and` binds tighter than `or`; `not` tighter than `and`.
        let Some(Expr::Or(left, _, _)) = &p.rules[1].when else {
            panic!("expected or at the top: {:?}", p.rules[1].when)
        };
        let Expr::And(_, right, _) = left.as_ref() else {
            panic!("expected and under or")
        };
        assert!(matches!(right.as_ref(), Expr::Not(..)));
    }

    /// A policy large enough to be parsed in halves, with every kind of
    /// declaration, unnamed response rules and `rule` in strings and comments.
    fn large_policy() -> String {
        let mut text = String::from(
            "listen \":8080\"\nadmin \"127.0.0.1:9090\"\nbackend app { server \"127.0.0.1:1\" }\n",
        );
        for i in 0..2_000 {
            text.push_str(&format!(
                "# rule c{i} {{\nrule r{i} when path ~ \"^/r{i}/\\n\\\"rule x\" or host glob \"*.e{i}\" \
                 or header(\"x\") == \"a\\\nrule y {{\" {{\n  route app\n}}\n"
            ));
            if i % 700 == 0 {
                text.push_str("on response when status >= 500 { cache off }\n");
                text.push_str(&format!(
                    "test \"t{i}\" {{\n  request GET \"http://a/r{i}/\"\n  expect rule r{i}\n}}\n"
                ));
            }
        }
        text
    }

    fn parse_whole(text: &str) -> PolicyFile {
        build_policy(
            PolicyParser::parse(Rule::policy, text)
                .unwrap()
                .next()
                .unwrap(),
        )
    }

    #[test]
    fn large_policies_parse_in_halves_as_in_one_piece() {
        let text = large_policy();
        let at = split_point(&text).expect("large enough to split");
        assert!(
            at >= text.len() / 2 && text[at..].starts_with("rule r"),
            "{at}"
        );
        let halves = parse_halves(&text, at).expect("both halves parse");
        let whole = parse_whole(&text);
        assert!(whole.rules[1].span.end > whole.rules[1].span.start + 100);
        assert_eq!(halves.response_rules.len(), 3);
        assert_eq!(halves.response_rules[2].name.name, "response#3");
        assert_eq!(format!("{halves:?}"), format!("{whole:?}"));
        assert_eq!(format!("{:?}", parse(&text).unwrap()), format!("{whole:?}"));
    }

    #[test]
    fn an_error_in_one_half_is_the_error_of_a_whole_parse() {
        let mut text = large_policy();
        text.push_str("rule broken when path ^= { route app }\n");
        let e = parse(&text).unwrap_err();
        let whole = PolicyParser::parse(Rule::policy, &text)
            .map_err(syntax_error)
            .unwrap_err();
        assert_eq!((e.span, e.message), (whole.span, whole.message));
        // A cut that leaves a declaration open fails, so the whole text is parsed.
        let open = text.find("route app").unwrap();
        assert!(parse_halves(&text, open).is_none());
    }

    #[test]
    fn syntax_errors_resume_at_the_next_item() {
        let text = "rule a {\n  route =\n}\nrule b {\n  route x\n}\nrule c when {\n}\n";
        let first = parse(text).unwrap_err();
        assert_eq!(first.span.start, text.find('=').unwrap());
        let more = further_syntax_errors(text, &first);
        assert_eq!(more.len(), 1, "{more:?}");
        assert_eq!(more[0].span.start, text.rfind('{').unwrap());
        // A text refused for its nesting is not parsed again.
        let deep = format!("rule a when {}", "(".repeat(MAX_NESTING + 1));
        let first = parse(&deep).unwrap_err();
        assert_ne!(first.code, "syntax");
        assert!(further_syntax_errors(&deep, &first).is_empty());
    }

    #[test]
    fn syntax_error_names_what_was_expected() {
        let e = parse("rule a when path ^= { route x }").unwrap_err();
        assert_eq!(e.code, "syntax");
        assert!(e.message.contains("expected"), "{}", e.message);
    }

    #[test]
    fn unknown_escapes_are_kept_for_regexes() {
        assert_eq!(unescape(r"\.css$"), r"\.css$");
        assert_eq!(unescape(r#"a\"b\\c\n"#), "a\"b\\c\n");
        assert_eq!(unescape(r"\d+"), r"\d+");
    }

    #[test]
    fn deep_nesting_is_refused() {
        let text = format!(
            "rule a when {}path == \"/\"{} {{}}",
            "(".repeat(100),
            ")".repeat(100)
        );
        assert_eq!(parse(&text).unwrap_err().code, "too-deep");
    }

    #[test]
    fn values_have_units() {
        let p = parse("storage { memory 2MiB idle 1m rate 5/m n 7 }").unwrap();
        let kinds: Vec<_> = p.sections[0]
            .settings
            .iter()
            .map(|s| s.values[0].kind.clone())
            .collect();
        assert_eq!(
            kinds,
            vec![
                ValueKind::Size(2 << 20),
                ValueKind::Duration(60_000),
                ValueKind::Rate(5, 60_000),
                ValueKind::Number(7)
            ]
        );
    }
}
