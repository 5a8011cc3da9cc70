//! Plain data describing one backend: its servers, how requests are spread
//! over them, how their health is judged, and the time limits of a request.
//!
//! These types carry no behaviour; the compiled policy fills them in and
//! [`crate::upstream::Pool::new`] turns them into a live pool.

use std::path::PathBuf;
use std::time::Duration;

/// One backend: a named set of origin servers, or a static directory.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BackendConfig {
    /// The name the policy routes to, used in logs and errors.
    pub name: String,
    /// The origin servers; at least one when `static_dir` is `None`.
    pub servers: Vec<ServerConfig>,
    /// How a server is chosen for each request. Default: round robin.
    pub balance: Balance,
    /// Active health checks; `None` means servers are only judged passively.
    pub health: Option<HealthConfig>,
    /// Passive ejection after failed requests.
    pub eject: EjectConfig,
    /// Time limits of one upstream exchange.
    pub timeouts: Timeouts,
    /// How many idle connections are kept per server, and for how long.
    pub keepalive: KeepAlive,
    /// TLS to the servers; `None` means plain HTTP/1.1.
    pub tls: Option<UpstreamTls>,
    /// Serve files from a directory instead of proxying.
    pub static_dir: Option<StaticConfig>,
}

/// One origin server of a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// `host:port` to connect to.
    pub addr: String,
    /// Relative share of traffic; 0 is treated as 1. Default: 1.
    pub weight: u32,
    /// A backup server only takes traffic when no primary server is usable.
    pub backup: bool,
}

impl ServerConfig {
    /// A primary server of weight 1 at `addr`.
    pub fn new(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            weight: 1,
            backup: false,
        }
    }
}

/// The selection algorithm of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Balance {
    /// Smooth weighted round robin (the nginx algorithm).
    #[default]
    RoundRobin,
    /// Fewest requests in flight relative to weight.
    LeastConn,
    /// The less loaded of two weighted random picks ("power of two choices").
    Random,
    /// Consistent hashing of a caller-provided key on a ring of virtual nodes.
    Hash,
}

impl Balance {
    /// The names policies use, in the order of the variants.
    pub const NAMES: [&'static str; 4] = ["round_robin", "least_conn", "random", "hash"];

    /// The algorithm a policy names, if it is one.
    pub fn parse(s: &str) -> Option<Balance> {
        Some(match s {
            "round_robin" => Balance::RoundRobin,
            "least_conn" => Balance::LeastConn,
            "random" => Balance::Random,
            "hash" => Balance::Hash,
            _ => return None,
        })
    }

    /// The policy-language spelling of the algorithm.
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
            Balance::LeastConn => "least_conn",
            Balance::Random => "random",
            Balance::Hash => "hash",
        }
    }
}

/// Active health checking: a probe request sent to every server about each
/// `interval`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    /// Probe method. Default: GET.
    pub method: http::Method,
    /// Probe path, starting with `/`. Default: `/`.
    pub path: String,
    /// The most time between two probes of a server: each comes up to a
    /// tenth of it early, at random, and the first at a random point of the
    /// first interval, so that servers are not all probed at once.
    /// Default: 5 s.
    pub interval: Duration,
    /// Time allowed for the probe's response head. Default: 2 s.
    pub timeout: Duration,
    /// The status a healthy server answers. Default: 200.
    pub expect_status: u16,
    /// Consecutive successful probes that bring a down server back. Default: 2.
    pub rise: u32,
    /// Consecutive failed probes that take an up server down. Default: 3.
    pub fall: u32,
    /// The `Host` of every probe, `host[:port]`. Default: what a request
    /// without `Host` gets (see [`UpstreamTls::server_name`]), the
    /// server's address without a TLS server name.
    pub host: Option<String>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            method: http::Method::GET,
            path: "/".to_owned(),
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            expect_status: 200,
            rise: 2,
            fall: 3,
            host: None,
        }
    }
}

/// Passive ejection: a server whose requests keep failing is set aside for a while.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EjectConfig {
    /// Consecutive failed requests (connect errors, resets, timeouts) that
    /// eject a server; 0 disables ejection. Default: 5.
    pub consecutive_failures: u32,
    /// How long an ejected server is skipped. Default: 10 s.
    pub cooldown: Duration,
}

impl Default for EjectConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            cooldown: Duration::from_secs(10),
        }
    }
}

/// Time limits of one upstream exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP (and TLS) connection establishment. Default: 5 s.
    pub connect: Duration,
    /// From starting one attempt (connection included) to its response head. Default: 30 s.
    pub first_byte: Duration,
    /// The whole exchange, all attempts and the response body included.
    /// Default: 120 s.
    pub total: Duration,
}

/// One request's own time limits; each one set replaces the backend's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Replaces [`Timeouts::connect`].
    pub connect: Option<Duration>,
    /// Replaces [`Timeouts::first_byte`].
    pub first_byte: Option<Duration>,
    /// Replaces [`Timeouts::total`].
    pub total: Option<Duration>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            first_byte: Duration::from_secs(30),
            total: Duration::from_secs(120),
        }
    }
}

/// Idle keep-alive connections kept per server.
///
/// An idle connection holds its read and write buffers (up to about
/// 48 KiB: 32 for reading, 16 for writing) and its socket buffers, so
/// a burst of traffic would otherwise leave every connection it opened
/// sitting on that memory until the timeout. Past `idle_max`, the
/// connection idle the longest is closed, as NGINX's `keepalive` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepAlive {
    /// Idle connections kept per server; 0 closes each connection after
    /// its exchange. Default: 32.
    pub idle_max: usize,
    /// How long an idle connection is kept. Default: 60 s.
    pub idle_timeout: Duration,
}

impl Default for KeepAlive {
    fn default() -> Self {
        Self {
            idle_max: 32,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// TLS towards the servers of a backend, verified against `ca_file` or,
/// without one, the operating system's roots ([`crate::upstream::Pool::new`]
/// fails when there are none to read).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UpstreamTls {
    /// PEM file of the certificate authorities trusted for the servers.
    pub ca_file: Option<PathBuf>,
    /// Name to verify (and send as SNI); default: the host part of each
    /// server's address. When set, it is also the `Host` of health probes
    /// and of requests that arrive without one, with the server's port
    /// unless that is 443: a server reached by this name is likely to
    /// serve it alone, and to refuse any other (421, RFC 9110 §15.5.20).
    pub server_name: Option<String>,
}

/// A directory served as a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticConfig {
    /// The directory; nothing outside it is ever served.
    pub root: PathBuf,
    /// File served for a directory. Default: `index.html`.
    pub index: String,
}

impl StaticConfig {
    /// Serve `root` with the default index file name.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            index: "index.html".to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_documented_values() {
        let t = Timeouts::default();
        assert_eq!(t.connect, Duration::from_secs(5));
        assert_eq!(t.first_byte, Duration::from_secs(30));
        assert_eq!(t.total, Duration::from_secs(120));
        let e = EjectConfig::default();
        assert_eq!(e.consecutive_failures, 5);
        assert_eq!(e.cooldown, Duration::from_secs(10));
        assert_eq!(BackendConfig::default().balance, Balance::RoundRobin);
        assert_eq!(ServerConfig::new("a:1").weight, 1);
    }
}
