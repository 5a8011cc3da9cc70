//! The checked policy: typed settings, resolved names and typed conditions.
//!
//! Everything here was validated by the checker: durations are `Duration`,
//! sizes are bytes, regexes are compiled, backend and limiter references are
//! indices. The proxy and the cache read this model; they never see the AST.

use super::ast::{CmpOp, Span};
use http::header::{HeaderName, HeaderValue};
use ipnet::IpNet;
use std::path::PathBuf;
use std::time::Duration;

/// Index of a backend in [`Model::backends`].
pub type BackendId = usize;
/// Index of a limiter in [`Model::limiters`].
pub type LimiterId = usize;

#[derive(Debug, Clone, Default)]
pub struct Model {
    pub listeners: Vec<ListenerConfig>,
    pub admin: Option<AdminConfig>,
    pub storage: StorageConfig,
    pub http: HttpConfig,
    pub purge: PurgeConfig,
    pub backends: Vec<BackendSpec>,
    pub limiters: Vec<LimiterSpec>,
    pub rules: Vec<RuleSpec>,
    pub response_rules: Vec<ResponseRuleSpec>,
}

impl Model {
    pub fn backend(&self, name: &str) -> Option<BackendId> {
        self.backends.iter().position(|b| b.name == name)
    }

    pub fn limiter(&self, name: &str) -> Option<LimiterId> {
        self.limiters.iter().position(|l| l.name == name)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    /// `host:port`; a leading `:port` means all addresses.
    pub addr: String,
    pub tls: Vec<CertConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CertConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Server names (SNI) this certificate answers for; empty: the default certificate.
    pub names: Vec<String>,
}

/// A secret given inline or read from the environment when the policy is loaded.
#[derive(Debug, Clone, PartialEq)]
pub enum Secret {
    Inline(String),
    Env(String),
}

impl Secret {
    /// The secret's value now, or `None` when the environment variable is unset.
    pub fn resolve(&self) -> Option<String> {
        match self {
            Secret::Inline(s) => Some(s.clone()),
            Secret::Env(name) => std::env::var(name).ok(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub addr: String,
    pub token: Option<Secret>,
}

/// `storage { ... }`.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageConfig {
    /// Memory tier size in bytes. Default 256 MiB.
    pub memory: u64,
    /// Disk tier directory and size in bytes; no disk tier when absent.
    pub disk: Option<(PathBuf, u64)>,
    /// Largest object stored; larger ones stream through. Default 16 MiB.
    pub max_object: u64,
    /// Targeted cache-control header names in precedence order (RFC 9213).
    pub targeted_headers: Vec<String>,
    /// Remove the targeted headers before responses reach clients.
    pub strip_targeted: bool,
    /// Cap on heuristic freshness. Default 1 day.
    pub heuristic_max: Duration,
    /// How long a key is remembered as uncacheable after a response that may not be stored.
    pub hit_for_miss: Duration,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            memory: 256 << 20,
            disk: None,
            max_object: 16 << 20,
            targeted_headers: vec!["Portico-Cache-Control".into(), "CDN-Cache-Control".into()],
            strip_targeted: false,
            heuristic_max: Duration::from_secs(86_400),
            hit_for_miss: Duration::from_secs(30),
        }
    }
}

/// `http { ... }`: client-side limits and timeouts.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpConfig {
    /// Time to read a request's headers (slowloris). Default 10 s.
    pub header_timeout: Duration,
    /// Idle keep-alive time. Default 60 s.
    pub idle_timeout: Duration,
    /// How long an upgraded connection (a WebSocket) may carry no byte
    /// either way. Default 10 min.
    pub tunnel_idle_timeout: Duration,
    /// How long a response may wait on a client that takes none of it.
    /// Default 60 s.
    pub send_timeout: Duration,
    /// Request header bytes; beyond: 431. Default 32 KiB.
    pub max_header: u64,
    /// Request body bytes; beyond: 413. Default 10 MiB.
    pub max_body: u64,
    /// Remove the backend's Server header.
    pub hide_server: bool,
    /// How long shutdown waits for in-flight requests. Default 10 s.
    pub shutdown_grace: Duration,
    /// Client connections open at once per listener. Default 10,000.
    pub max_connections: u64,
    /// Proxies in front whose `X-Forwarded-For` is believed: a request from
    /// one of them is from the last address that field names that is not
    /// one of them. Default none.
    pub trust_forwarded: Vec<IpNet>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            tunnel_idle_timeout: Duration::from_secs(600),
            send_timeout: Duration::from_secs(60),
            max_header: 32 << 10,
            max_body: 10 << 20,
            hide_server: false,
            shutdown_grace: Duration::from_secs(10),
            max_connections: 10_000,
            trust_forwarded: Vec::new(),
        }
    }
}

/// `purge { allow [...] }`: who may send the PURGE method to the main listener.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PurgeConfig {
    pub allow: Vec<IpNet>,
}

/// How a backend spreads requests over its servers: the upstream layer's own type.
pub use crate::upstream::Balance as BalanceKind;

#[derive(Debug, Clone, PartialEq)]
pub struct ServerSpec {
    pub addr: String,
    pub weight: u32,
    pub backup: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HealthSpec {
    pub method: http::Method,
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub expect_status: u16,
    pub rise: u32,
    pub fall: u32,
    /// The `Host` of every probe, when the check names one.
    pub host: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BackendSpec {
    pub name: String,
    pub span: Span,
    pub servers: Vec<ServerSpec>,
    pub balance: BalanceKind,
    /// The key hashed by `balance hash [...]`.
    pub hash_key: Vec<KeyPart>,
    pub health: Option<HealthSpec>,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub total_timeout: Duration,
    /// Passive ejection: consecutive failures before a server is taken out.
    pub eject_after: u32,
    /// Passive ejection: how long it stays out.
    pub eject_for: Duration,
    /// Idle keep-alive connections kept per server.
    pub keepalive: usize,
    /// How long an idle connection is kept.
    pub keepalive_timeout: Duration,
    pub tls: bool,
    pub ca_file: Option<PathBuf>,
    pub tls_server_name: Option<String>,
    /// A static-files backend: the directory and its index file name.
    pub static_dir: Option<(PathBuf, String)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LimiterSpec {
    pub name: String,
    /// Requests allowed per `per`.
    pub count: u64,
    pub per: Duration,
    pub burst: u64,
    pub by: KeyPart,
}

/// A piece of a request used in keys: cache keys, hashing keys, limiter keys.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeyPart {
    Scheme,
    Host,
    Path,
    Query,
    QueryParam(String),
    Header(HeaderName),
    Cookie(String),
    Method,
    ClientIp,
}

impl KeyPart {
    /// Whether the part comes from request fields (a header, a cookie, the
    /// method, the client's address) rather than from the URL. Keys list
    /// the URL's parts first, so that every key of one URL begins with the
    /// same text (purges by URL rely on it).
    pub fn from_request_fields(&self) -> bool {
        matches!(
            self,
            KeyPart::Header(_) | KeyPart::Cookie(_) | KeyPart::Method | KeyPart::ClientIp
        )
    }

    pub const NAMES: [&'static str; 9] = [
        "scheme",
        "host",
        "path",
        "query",
        "query(\"...\")",
        "header(\"...\")",
        "cookie(\"...\")",
        "method",
        "client.ip",
    ];
}

/// What a request field is compared with.
#[derive(Debug, Clone)]
pub enum Field {
    Method,
    Scheme,
    Host,
    Path,
    Query,
    QueryParam(String),
    Header(HeaderName),
    Cookie(String),
    ClientIp,
    /// Response phase only.
    Status,
    /// Response phase only: the response's Content-Type without parameters.
    ContentType,
    /// Response phase only.
    ResponseHeader(HeaderName),
}

impl Field {
    pub fn describe(&self) -> String {
        match self {
            Field::Method => "method".into(),
            Field::Scheme => "scheme".into(),
            Field::Host => "host".into(),
            Field::Path => "path".into(),
            Field::Query => "query".into(),
            Field::QueryParam(n) => format!("query({n:?})"),
            Field::Header(n) | Field::ResponseHeader(n) => format!("header({:?})", n.as_str()),
            Field::Cookie(n) => format!("cookie({n:?})"),
            Field::ClientIp => "client.ip".into(),
            Field::Status => "status".into(),
            Field::ContentType => "content_type".into(),
        }
    }
}

pub use super::pattern::Pattern;

/// A test on one field.
#[derive(Debug, Clone)]
pub enum Test {
    /// The field is present (headers, cookies, query parameters).
    Present,
    Eq(String),
    Ne(String),
    Prefix(String),
    Suffix(String),
    /// Regex (`~`) or glob: see [`Pattern`].
    Matches(Pattern),
    NotMatches(Pattern),
    InSet(Vec<String>),
    InNets(Vec<IpNet>),
    Num(CmpOp, u64),
}

#[derive(Debug, Clone)]
pub struct Atom {
    pub field: Field,
    pub test: Test,
    pub span: Span,
}

/// A typed condition.
#[derive(Debug, Clone)]
pub enum Cond {
    True,
    Atom(Box<Atom>),
    And(Vec<Cond>),
    Or(Vec<Cond>),
    Not(Box<Cond>),
}

/// What a request rule does with the request.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Forward to a backend.
    Forward(BackendId),
    Redirect {
        status: u16,
        location: String,
    },
    Deny {
        status: u16,
    },
    Respond {
        status: u16,
        body: bytes::Bytes,
        content_type: String,
    },
    /// No rule matched and there is no default: 404.
    NoRoute,
}

/// Whether the origin's Cache-Control is obeyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginControl {
    /// RFC 9111: the origin's headers decide; the policy TTL is the default.
    Honor,
    /// The policy's TTL decides, whatever the origin says.
    Ignore,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CacheSpec {
    pub key: Vec<KeyPart>,
    pub ttl: Option<Duration>,
    pub stale_while_revalidate: Option<Duration>,
    pub stale_if_error: Option<Duration>,
    pub origin: OriginControl,
    /// Store responses with Set-Cookie (the header is stripped from the stored copy).
    pub store_set_cookie: bool,
    /// Share responses to requests with Authorization.
    pub share_authorized: bool,
}

impl CacheSpec {
    /// `[scheme, host, path, query]`: what a cache key is made of unless a rule says otherwise.
    pub fn default_key() -> Vec<KeyPart> {
        vec![KeyPart::Host, KeyPart::Path, KeyPart::Query]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Br,
    Gzip,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Br => "br",
            Algorithm::Gzip => "gzip",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct CompressSpec {
    /// In order of preference.
    pub algorithms: Vec<Algorithm>,
    /// Smallest body compressed, in bytes. Default 1 KiB.
    pub min_size: u64,
    /// Content types compressed (prefixes when ending in `*`).
    pub types: Vec<String>,
    pub level: Option<u32>,
}

impl CompressSpec {
    pub fn default_types() -> Vec<String> {
        [
            "text/*",
            "application/json",
            "application/javascript",
            "application/xml",
            "image/svg+xml",
        ]
        .into_iter()
        .map(String::from)
        .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EditOp {
    Set,
    Add,
    Remove,
}

impl EditOp {
    pub fn as_str(self) -> &'static str {
        match self {
            EditOp::Set => "set",
            EditOp::Add => "add",
            EditOp::Remove => "remove",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct HeaderEdit {
    pub op: EditOp,
    pub name: HeaderName,
    pub value: Option<HeaderValue>,
}

impl HeaderEdit {
    /// Applies the edit to a header map.
    pub fn apply(&self, headers: &mut http::HeaderMap) {
        match (self.op, &self.value) {
            (EditOp::Set, Some(v)) => {
                headers.insert(self.name.clone(), v.clone());
            }
            (EditOp::Add, Some(v)) => {
                headers.append(self.name.clone(), v.clone());
            }
            _ => {
                headers.remove(&self.name);
            }
        }
    }
}

/// Per-rule overrides of backend timeouts and limits.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RuleLimits {
    pub connect_timeout: Option<Duration>,
    pub first_byte_timeout: Option<Duration>,
    pub total_timeout: Option<Duration>,
    pub max_body: Option<u64>,
}

/// A request rule, checked.
#[derive(Debug, Clone)]
pub struct RuleSpec {
    pub name: String,
    pub span: Span,
    /// 1-based line of the rule in its file.
    pub line: usize,
    pub when: Cond,
    pub outcome: Outcome,
    /// `None`: `cache off` (or nothing said): the request bypasses the cache.
    pub cache: Option<CacheSpec>,
    pub compress: Option<CompressSpec>,
    pub limiter: Option<LimiterId>,
    pub request_headers: Vec<HeaderEdit>,
    pub response_headers: Vec<HeaderEdit>,
    pub limits: RuleLimits,
}

/// What a response rule does.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResponseActions {
    /// Forbid storing the response.
    pub no_store: bool,
    /// Override the freshness lifetime.
    pub ttl: Option<Duration>,
    pub stale_while_revalidate: Option<Duration>,
    pub stale_if_error: Option<Duration>,
    pub store_set_cookie: bool,
    pub headers: Vec<HeaderEdit>,
}

/// A response rule, checked. Response rules all apply in order when they match;
/// a later rule's settings override an earlier one's.
#[derive(Debug, Clone)]
pub struct ResponseRuleSpec {
    pub name: String,
    pub span: Span,
    pub line: usize,
    pub when: Cond,
    pub actions: ResponseActions,
}
