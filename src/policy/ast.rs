//! The policy's syntax tree, as written: every node keeps the byte span it
//! came from, so that the checker and the tools can point at the source.
//!
//! Values are kept loosely typed here ([`Value`]); the checker turns them into
//! typed settings and reports the ones of the wrong kind.

use std::fmt;

/// A byte range in the policy text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

impl Span {
    pub fn new(start: usize, end: usize) -> Span {
        Span { start, end }
    }

    /// The smallest span that covers both.
    pub fn join(self, other: Span) -> Span {
        Span::new(self.start.min(other.start), self.end.max(other.end))
    }
}

impl From<pest::Span<'_>> for Span {
    fn from(s: pest::Span<'_>) -> Span {
        Span::new(s.start(), s.end())
    }
}

/// A name with the place it was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

/// A value as written, before the checker gives it a meaning.
#[derive(Debug, Clone, PartialEq)]
pub enum ValueKind {
    Str(String),
    /// Milliseconds.
    Duration(u64),
    /// Bytes.
    Size(u64),
    /// Events per second, as (count, per-period in milliseconds).
    Rate(u64, u64),
    Number(u64),
    /// A bare word such as `GET`.
    Word(String),
    /// An unquoted address or CIDR such as `10.0.0.0/8`.
    Addr(String),
    /// `env("NAME")`.
    Env(String),
    /// `header("Name")` and the like.
    Call(String, String),
    List(Vec<Value>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Value {
    pub kind: ValueKind,
    pub span: Span,
}

impl ValueKind {
    /// How the kind is named in diagnostics ("expected a duration, found a size").
    pub fn describe(&self) -> &'static str {
        match self {
            ValueKind::Str(_) => "a string",
            ValueKind::Duration(_) => "a duration",
            ValueKind::Size(_) => "a size",
            ValueKind::Rate(..) => "a rate",
            ValueKind::Number(_) => "a number",
            ValueKind::Word(_) => "a word",
            ValueKind::Addr(_) => "an address",
            ValueKind::Env(_) => "an env() lookup",
            ValueKind::Call(..) => "a function call",
            ValueKind::List(_) => "a list",
        }
    }
}

/// `name value...` inside a block.
#[derive(Debug, Clone, PartialEq)]
pub struct Setting {
    pub name: Ident,
    pub values: Vec<Value>,
    pub span: Span,
}

/// A whole policy file.
#[derive(Debug, Clone, Default)]
pub struct PolicyFile {
    pub listeners: Vec<Listen>,
    pub admins: Vec<Admin>,
    pub sections: Vec<Section>,
    pub backends: Vec<Backend>,
    pub limiters: Vec<Limiter>,
    pub rules: Vec<Rule>,
    pub response_rules: Vec<Rule>,
    pub tests: Vec<TestBlock>,
}

#[derive(Debug, Clone)]
pub struct Listen {
    pub addr: Value,
    pub tls: Option<Vec<Cert>>,
    pub span: Span,
}

#[derive(Debug, Clone)]
pub struct Cert {
    pub cert: Value,
    pub key: Value,
    /// Server names this certificate answers for; empty means "the default".
    pub names: Vec<Value>,
    pub span: Span,
}

#[derive(Debug, Clone)]
pub struct Admin {
    pub addr: Value,
    pub token: Option<Value>,
    pub span: Span,
}

/// `storage { ... }`, `http { ... }` or `purge { ... }`.
#[derive(Debug, Clone)]
pub struct Section {
    pub name: Ident,
    pub settings: Vec<Setting>,
    pub span: Span,
}

#[derive(Debug, Clone)]
pub struct Backend {
    pub name: Ident,
    pub servers: Vec<Server>,
    pub balance: Vec<Balance>,
    pub health: Vec<Health>,
    pub static_dir: Vec<StaticDir>,
    pub settings: Vec<Setting>,
    pub span: Span,
}

#[derive(Debug, Clone)]
pub struct Server {
    pub addr: Value,
    pub weight: Option<Value>,
    pub backup: bool,
    pub span: Span,
}

#[derive(Debug, Clone)]
pub struct Balance {
    pub algorithm: Ident,
    pub key: Option<Vec<KeyPart>>,
    pub span: Span,
}

#[derive(Debug, Clone)]
pub struct Health {
    pub method: Ident,
    pub path: Value,
    pub options: Vec<Setting>,
    pub span: Span,
}

#[derive(Debug, Clone)]
pub struct StaticDir {
    pub root: Value,
    pub options: Vec<Setting>,
    pub span: Span,
}

#[derive(Debug, Clone)]
pub struct Limiter {
    pub name: Ident,
    pub by: Option<KeyPart>,
    pub settings: Vec<Setting>,
    pub span: Span,
}

/// A part of a cache key or a hashing key: `host`, `query("v")`, `client.ip`.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyPart {
    pub name: String,
    pub arg: Option<String>,
    pub span: Span,
}

/// A request rule (`rule NAME when COND { ... }`) or a response rule
/// (`on response [NAME] when COND { ... }`).
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: Ident,
    pub when: Option<Expr>,
    pub actions: Vec<Action>,
    pub span: Span,
}

/// A condition.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    And(Box<Expr>, Box<Expr>, Span),
    Or(Box<Expr>, Box<Expr>, Span),
    Not(Box<Expr>, Span),
    Cmp(Comparison),
}

impl Expr {
    pub fn span(&self) -> Span {
        match self {
            Expr::And(_, _, s) | Expr::Or(_, _, s) | Expr::Not(_, s) => *s,
            Expr::Cmp(c) => c.span,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Prefix,
    Suffix,
    Regex,
    NotRegex,
    Glob,
    In,
    Ge,
    Le,
    Gt,
    Lt,
}

impl CmpOp {
    pub fn parse(s: &str) -> Option<CmpOp> {
        Some(match s {
            "==" => CmpOp::Eq,
            "!=" => CmpOp::Ne,
            "^=" => CmpOp::Prefix,
            "$=" => CmpOp::Suffix,
            "~" => CmpOp::Regex,
            "!~" => CmpOp::NotRegex,
            "glob" => CmpOp::Glob,
            "in" => CmpOp::In,
            ">=" => CmpOp::Ge,
            "<=" => CmpOp::Le,
            ">" => CmpOp::Gt,
            "<" => CmpOp::Lt,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CmpOp::Eq => "==",
            CmpOp::Ne => "!=",
            CmpOp::Prefix => "^=",
            CmpOp::Suffix => "$=",
            CmpOp::Regex => "~",
            CmpOp::NotRegex => "!~",
            CmpOp::Glob => "glob",
            CmpOp::In => "in",
            CmpOp::Ge => ">=",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Lt => "<",
        }
    }
}

impl fmt::Display for CmpOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `subject [op operand]`; without an operator it tests presence
/// (`header("Authorization")`).
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub subject: KeyPart,
    pub op: Option<(CmpOp, Span)>,
    pub operand: Option<Value>,
    pub span: Span,
}

#[derive(Debug, Clone)]
pub enum Action {
    Route(Ident, Span),
    Throttle(Ident, Span),
    CacheOff(Span),
    Cache(CacheBlock),
    CompressOff(Span),
    Compress(CompressBlock),
    Header(HeaderEdit),
    Redirect {
        status: Option<Value>,
        location: Value,
        span: Span,
    },
    Deny {
        status: Option<Value>,
        span: Span,
    },
    Respond {
        status: Value,
        body: Option<Value>,
        options: Vec<Setting>,
        span: Span,
    },
    Setting(Setting),
}

impl Action {
    pub fn span(&self) -> Span {
        match self {
            Action::Route(_, s)
            | Action::Throttle(_, s)
            | Action::CacheOff(s)
            | Action::CompressOff(s)
            | Action::Redirect { span: s, .. }
            | Action::Deny { span: s, .. }
            | Action::Respond { span: s, .. } => *s,
            Action::Cache(c) => c.span,
            Action::Compress(c) => c.span,
            Action::Header(h) => h.span,
            Action::Setting(s) => s.span,
        }
    }

    /// The keyword that starts the action, for diagnostics.
    pub fn keyword(&self) -> &str {
        match self {
            Action::Route(..) => "route",
            Action::Throttle(..) => "throttle",
            Action::CacheOff(_) | Action::Cache(_) => "cache",
            Action::CompressOff(_) | Action::Compress(_) => "compress",
            Action::Header(h) => {
                if h.response {
                    "response_header"
                } else {
                    "request_header"
                }
            }
            Action::Redirect { .. } => "redirect",
            Action::Deny { .. } => "deny",
            Action::Respond { .. } => "respond",
            Action::Setting(s) => &s.name.name,
        }
    }
}

#[derive(Debug, Clone)]
pub struct CacheBlock {
    pub key: Option<(Vec<KeyPart>, Span)>,
    pub origin: Option<Ident>,
    pub settings: Vec<Setting>,
    pub span: Span,
}

#[derive(Debug, Clone)]
pub struct CompressBlock {
    pub algorithms: Vec<Ident>,
    pub options: Vec<Setting>,
    pub span: Span,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderOp {
    Set,
    Add,
    Remove,
}

#[derive(Debug, Clone)]
pub struct HeaderEdit {
    /// `response_header` when true, `request_header` otherwise.
    pub response: bool,
    pub op: HeaderOp,
    pub name: Value,
    pub value: Option<Value>,
    pub span: Span,
}

/// `test "name" { request ...; response ...; expect ... }`.
#[derive(Debug, Clone)]
pub struct TestBlock {
    pub name: String,
    pub request: Option<TestRequest>,
    pub response: Option<TestResponse>,
    pub expects: Vec<Expect>,
    pub span: Span,
}

#[derive(Debug, Clone)]
pub struct TestRequest {
    pub method: Ident,
    pub url: Value,
    pub headers: Vec<(String, String)>,
    pub client_ip: Option<Value>,
    pub span: Span,
}

#[derive(Debug, Clone)]
pub struct TestResponse {
    pub status: Value,
    pub headers: Vec<(String, String)>,
    pub span: Span,
}

#[derive(Debug, Clone)]
pub struct Expect {
    pub what: Ident,
    pub args: Vec<Value>,
    pub span: Span,
}
