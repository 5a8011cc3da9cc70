//! Header hygiene between client and origin, in one place.
//!
//! - Hop-by-hop fields (RFC 9110 §7.6.1) are removed in both directions:
//!   `Connection` and every field it names, plus `Keep-Alive`,
//!   `Proxy-Connection`, `TE`, `Trailer`, `Transfer-Encoding` and `Upgrade`
//!   (kept, with `Connection: upgrade`, only when the request asks to switch
//!   protocols, RFC 9110 §7.8).
//! - Requests to the origin get `X-Forwarded-For`, `X-Forwarded-Proto`,
//!   `X-Forwarded-Host` (the de facto forms of RFC 7239's `Forwarded`) and
//!   `Via` (RFC 9110 §7.6.3).
//! - Responses to the client get `Via`, and optionally lose the origin's
//!   `Server` field.

use std::net::IpAddr;

use http::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, COOKIE, HOST, SERVER, TE, TRAILER,
    TRANSFER_ENCODING, UPGRADE, VIA,
};
use http::{Request, Response, Version};

/// `X-Forwarded-For`: the chain of client addresses.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`: the scheme the client used (`http` or `https`).
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Host`: the host the client asked for.
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The fixed hop-by-hop fields, besides those named by `Connection`.
const HOP_BY_HOP: [HeaderName; 6] = [
    KEEP_ALIVE,
    PROXY_CONNECTION,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
];

/// How the client reached the proxy, for the forwarding fields.
#[derive(Debug, Clone)]
pub struct ForwardContext<'a> {
    /// The client's IP address, appended to `X-Forwarded-For`.
    pub client_ip: IpAddr,
    /// Whether the client connection was TLS (`X-Forwarded-Proto: https`).
    pub tls: bool,
    /// Keep `X-Forwarded-*` fields sent by the client (appending to
    /// `X-Forwarded-For`) instead of replacing them. Only for listeners behind
    /// a trusted load balancer: a client can write anything there.
    pub trust_forwarded: bool,
    /// The pseudonym used in `Via`.
    pub via: &'a HeaderValue,
}

/// Options for the response sent back to the client.
#[derive(Debug, Clone)]
pub struct ResponseHygiene<'a> {
    /// The pseudonym used in `Via`.
    pub via: &'a HeaderValue,
    /// Remove the origin's `Server` field.
    pub strip_server: bool,
}

/// The `Via` value for a message received with `version` by a proxy named
/// `pseudonym`, e.g. `1.1 portico` (RFC 9110 §7.6.3: protocol name omitted for
/// HTTP).
pub fn via_value(version: Version, pseudonym: &str) -> Option<HeaderValue> {
    let proto = match version {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_11 => "1.1",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "1.1",
    };
    HeaderValue::try_from(format!("{proto} {pseudonym}")).ok()
}

/// The default pseudonym with its received protocol, as cached values.
pub fn default_via(version: Version) -> &'static HeaderValue {
    static V10: HeaderValue = HeaderValue::from_static("1.0 portico");
    static V11: HeaderValue = HeaderValue::from_static("1.1 portico");
    static V2: HeaderValue = HeaderValue::from_static("2 portico");
    static V3: HeaderValue = HeaderValue::from_static("3 portico");
    match version {
        Version::HTTP_09 | Version::HTTP_10 => &V10,
        Version::HTTP_2 => &V2,
        Version::HTTP_3 => &V3,
        _ => &V11,
    }
}

/// True when `headers` ask to switch protocols: an `Upgrade` field and a
/// `Connection` field naming `upgrade` (RFC 9110 §7.8). An upgrade to
/// `h2c` is not one: past the splice every request on the connection would
/// reach the origin unseen by the rules, and the token is deprecated
/// (RFC 9113 §3.1); the request goes on as a plain one, without `Upgrade`.
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(UPGRADE)
        && connection_has_token(headers, "upgrade")
        && !upgrade_lists_h2c(headers)
}

fn upgrade_lists_h2c(headers: &HeaderMap) -> bool {
    headers.get_all(UPGRADE).iter().any(|v| {
        v.as_bytes().split(|&b| b == b',').any(|p| {
            let name = p.split(|&b| b == b'/').next().unwrap_or_default();
            name.trim_ascii().eq_ignore_ascii_case(b"h2c")
        })
    })
}

fn connection_has_token(headers: &HeaderMap, token: &str) -> bool {
    connection_tokens(headers).any(|t| t.eq_ignore_ascii_case(token))
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Removes every hop-by-hop field from `headers`. When `keep_upgrade` is set
/// and the message is an upgrade, `Upgrade` survives and `Connection` is
/// rewritten to just `upgrade`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most responses (every cache hit) have none: one pass over the names
    // is cheaper than a lookup for each hop-by-hop name.
    if !headers
        .keys()
        .any(|n| n == CONNECTION || HOP_BY_HOP.contains(n))
    {
        return;
    }
    let upgrading = keep_upgrade && is_upgrade(headers);
    if headers.contains_key(CONNECTION) {
        // Collect first: the names borrow from `headers`. Connection rarely
        // names more than a few fields, so this small Vec is the only
        // allocation here.
        let named: Vec<HeaderName> = connection_tokens(headers)
            // `close` names no field, and `keep-alive` and `upgrade` go
            // below anyway: the usual values cost no allocation.
            .filter(|t| {
                !["close", "keep-alive", "upgrade"]
                    .iter()
                    .any(|common| t.eq_ignore_ascii_case(common))
            })
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for name in named {
            // Host is end-to-end and what the request was routed by: a
            // client naming it must not have the origin see another.
            if (upgrading && name == UPGRADE) || name == HOST {
                continue;
            }
            headers.remove(name);
        }
        headers.remove(CONNECTION);
    }
    for name in HOP_BY_HOP {
        if upgrading && name == UPGRADE {
            continue;
        }
        headers.remove(name);
    }
    if upgrading {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Joins an HTTP/2 or HTTP/3 request's `Cookie` fields into one, the
/// values separated by "; ", as they must be before the request goes on
/// over HTTP/1.1 (RFC 9113 §8.2.3, RFC 9114 §4.2.1): clients send one field
/// per cookie there, and an HTTP/1.1 origin expects a single field (RFC 6265
/// §5.4). One lookup when there is at most one field.
pub fn join_cookies(headers: &mut HeaderMap) {
    if headers.get_all(COOKIE).iter().nth(1).is_none() {
        return;
    }
    let mut joined = Vec::new();
    for value in headers.get_all(COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(value.as_bytes());
    }
    // Joined field values are a field value.
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(COOKIE, value);
    }
}

/// The forwarding fields a request gets on its way to the origin, worked
/// out by [`forwarding`]. Written straight into the request head on the
/// wire ([`Forwarded::encode`]), they cost no map insert; a request that
/// hyper sends (an upgrade) gets them in its map ([`Forwarded::insert_into`]).
#[derive(Debug, Clone)]
pub struct Forwarded {
    /// Earlier hops of `X-Forwarded-For`, kept from a trusted client.
    chain: Option<String>,
    client: IpAddr,
    /// None when a trusted client's own `X-Forwarded-Proto` stays.
    proto: Option<&'static str>,
    /// `X-Forwarded-Host`; None when there is no host, or when a trusted
    /// client's own field stays.
    host: Option<HeaderValue>,
    via: HeaderValue,
}

/// The forwarding fields the client's own take the place of, unless trusted.
const FORWARDING: [HeaderName; 3] = [X_FORWARDED_FOR, X_FORWARDED_PROTO, X_FORWARDED_HOST];

/// Readies a client's fields for the origin: hop-by-hop fields removed
/// (`Upgrade` kept for an upgrade), and the forwarding fields worked out.
/// The client's own `X-Forwarded-*` fields are removed unless trusted, and
/// a trusted `X-Forwarded-For` becomes the start of the new one. `host` is
/// the host the client asked for, which becomes `X-Forwarded-Host`.
pub fn forwarding(
    headers: &mut HeaderMap,
    host: Option<HeaderValue>,
    ctx: &ForwardContext<'_>,
) -> Forwarded {
    strip_hop_by_hop(headers, true);
    let mut forwarded = Forwarded {
        chain: None,
        client: ctx.client_ip,
        proto: Some(if ctx.tls { "https" } else { "http" }),
        host,
        via: ctx.via.clone(),
    };
    // One pass over the names: most requests carry none of these.
    if !headers.keys().any(|n| FORWARDING.contains(n)) {
        return forwarded;
    }
    if ctx.trust_forwarded {
        let mut chain = String::new();
        for value in headers.get_all(X_FORWARDED_FOR).iter() {
            if let Ok(v) = value.to_str() {
                let v = v.trim();
                if !v.is_empty() {
                    chain.push_str(v);
                    chain.push_str(", ");
                }
            }
        }
        headers.remove(X_FORWARDED_FOR);
        forwarded.chain = (!chain.is_empty()).then_some(chain);
        if headers.contains_key(X_FORWARDED_PROTO) {
            forwarded.proto = None;
        }
        if headers.contains_key(X_FORWARDED_HOST) {
            forwarded.host = None;
        }
    } else {
        for name in FORWARDING {
            headers.remove(name);
        }
    }
    forwarded
}

impl Forwarded {
    /// Appends the fields as lines of a request head, each ending in CRLF.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"x-forwarded-for: ");
        if let Some(chain) = &self.chain {
            out.extend_from_slice(chain.as_bytes());
        }
        write_ip(self.client, out);
        if let Some(proto) = self.proto {
            out.extend_from_slice(b"\r\nx-forwarded-proto: ");
            out.extend_from_slice(proto.as_bytes());
        }
        if let Some(host) = &self.host {
            out.extend_from_slice(b"\r\nx-forwarded-host: ");
            out.extend_from_slice(host.as_bytes());
        }
        out.extend_from_slice(b"\r\nvia: ");
        out.extend_from_slice(self.via.as_bytes());
        out.extend_from_slice(b"\r\n");
    }

    /// Puts the fields into `headers`, `Via` after any there already.
    pub fn insert_into(self, headers: &mut HeaderMap) {
        let mut xff = self.chain.unwrap_or_default().into_bytes();
        write_ip(self.client, &mut xff);
        // An IP address and ", " are always valid field-value characters, and the
        // kept prefix came from valid values.
        if let Ok(value) = HeaderValue::from_bytes(&xff) {
            headers.insert(X_FORWARDED_FOR, value);
        }
        if let Some(proto) = self.proto {
            headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
        }
        if let Some(host) = self.host {
            headers.insert(X_FORWARDED_HOST, host);
        }
        headers.append(VIA, self.via);
    }
}

/// The client a request from `peer` is from, when `peer` is a proxy in
/// front that is trusted (`trusted`): the last address of
/// `X-Forwarded-For` that is not itself trusted, each hop having appended
/// the one it heard from (NGINX's `real_ip_recursive`). When every address
/// is trusted, the first; an entry that is not an address ends the walk,
/// as nothing before it can be believed; a request that names nobody is
/// the proxy's own (`peer`). `None` when `peer` is not trusted: it is the
/// client, and what it says of others is not believed.
pub fn forwarded_client(
    peer: IpAddr,
    headers: &HeaderMap,
    trusted: &[ipnet::IpNet],
) -> Option<IpAddr> {
    // An IPv4 peer of a dual-stack socket is `::ffff:a.b.c.d`: compared
    // as the IPv4 address it is, as every entry is.
    let trusts = |ip: &IpAddr| trusted.iter().any(|n| n.contains(&ip.to_canonical()));
    if trusted.is_empty() || !trusts(&peer) {
        return None;
    }
    let mut client = peer;
    for field in headers.get_all(X_FORWARDED_FOR).iter().rev() {
        let Ok(text) = field.to_str() else {
            return Some(client);
        };
        for entry in text.rsplit(',').map(str::trim).filter(|e| !e.is_empty()) {
            // An address, or one with a port (`192.0.2.1:4711`, `[2001:db8::1]:80`).
            let ip = entry
                .parse::<IpAddr>()
                .or_else(|_| entry.parse::<std::net::SocketAddr>().map(|a| a.ip()));
            let Ok(ip) = ip.map(|ip| ip.to_canonical()) else {
                return Some(client);
            };
            if !trusts(&ip) {
                return Some(ip);
            }
            client = ip;
        }
    }
    Some(client)
}

/// Prepares a client request for the origin, in its own field map:
/// hop-by-hop fields removed, forwarding fields and `Via` added. The
/// request's `Host` (or the URI's authority, as HTTP/2 carries it) becomes
/// `X-Forwarded-Host`.
pub fn prepare_upstream_request<B>(req: &mut Request<B>, ctx: &ForwardContext<'_>) {
    let host = req.headers().get(HOST).cloned().or_else(|| {
        req.uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    let forwarded = forwarding(req.headers_mut(), host, ctx);
    forwarded.insert_into(req.headers_mut());
}

/// Appends an address as text; IPv4, the common case, without the
/// formatting machinery, since this runs on every forwarded request.
fn write_ip(ip: IpAddr, out: &mut Vec<u8>) {
    let IpAddr::V4(v4) = ip else {
        out.extend_from_slice(ip.to_string().as_bytes());
        return;
    };
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            out.push(b'.');
        }
        if octet >= 100 {
            out.push(b'0' + octet / 100);
        }
        if octet >= 10 {
            out.push(b'0' + octet / 10 % 10);
        }
        out.push(b'0' + octet % 10);
    }
}

/// Prepares an origin response for the client: hop-by-hop fields removed
/// (except on 101, whose `Upgrade` and `Connection` complete the switch),
/// `Via` added, and `Server` removed when asked.
pub fn prepare_downstream_response<B>(resp: &mut Response<B>, opts: &ResponseHygiene<'_>) {
    let switching = resp.status() == http::StatusCode::SWITCHING_PROTOCOLS;
    let headers = resp.headers_mut();
    strip_hop_by_hop(headers, switching);
    headers.append(VIA, opts.via.clone());
    if opts.strip_server {
        headers.remove(SERVER);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_behind_trusted_proxies_is_the_last_untrusted_address() {
        let trusted: Vec<ipnet::IpNet> = ["10.0.0.0/8", "127.0.0.1/32"]
            .iter()
            .map(|n| n.parse().unwrap())
            .collect();
        let peer: IpAddr = "127.0.0.1".parse().unwrap();
        let client = |fields: &[&str], peer: IpAddr| {
            let mut h = HeaderMap::new();
            for f in fields {
                h.append(X_FORWARDED_FOR, HeaderValue::from_str(f).unwrap());
            }
            forwarded_client(peer, &h, &trusted).map(|ip| ip.to_string())
        };
        let some = |s: &str| Some(s.to_owned());
        // A client can write anything first; the hops after it are trusted.
        assert_eq!(
            client(&["6.6.6.6, 203.0.113.7, 10.1.1.1"], peer),
            some("203.0.113.7")
        );
        assert_eq!(
            client(&["6.6.6.6", "203.0.113.7:4711"], peer),
            some("203.0.113.7")
        );
        assert_eq!(client(&["[2001:db8::1]:80"], peer), some("2001:db8::1"));
        // IPv4 written as IPv6, by a dual-stack socket or a proxy: as IPv4.
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(client(&["203.0.113.7"], mapped), some("203.0.113.7"));
        assert_eq!(
            client(&["::ffff:203.0.113.7, 10.0.0.1"], peer),
            some("203.0.113.7")
        );
        // Every one trusted: the first. Garbage ends the walk.
        assert_eq!(client(&["10.0.0.2, 10.0.0.3"], peer), some("10.0.0.2"));
        assert_eq!(
            client(&["203.0.113.7, unknown, 10.0.0.3"], peer),
            some("10.0.0.3")
        );
        // Nobody named: the proxy's own request.
        assert_eq!(client(&["unknown"], peer), some("127.0.0.1"));
        assert_eq!(client(&[], peer), some("127.0.0.1"));
        // An untrusted peer is the client.
        assert_eq!(client(&["203.0.113.7"], "192.0.2.1".parse().unwrap()), None);
        let none: &[ipnet::IpNet] = &[];
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.7"));
        assert_eq!(forwarded_client(peer, &h, none), None);
    }
    use http::StatusCode;

    type Fields<'a> = &'a [(&'a str, &'a str)];

    fn ip_text(ip: IpAddr) -> String {
        let mut out = Vec::new();
        write_ip(ip, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn addresses_as_text_match_display() {
        let addrs: [std::net::IpAddr; 6] = [
            "0.0.0.0".parse().unwrap(),
            "127.0.0.1".parse().unwrap(),
            "10.20.100.255".parse().unwrap(),
            "192.168.9.99".parse().unwrap(),
            "::1".parse().unwrap(),
            "2001:db8::ff00:42:8329".parse().unwrap(),
        ];
        for ip in addrs {
            assert_eq!(ip_text(ip), ip.to_string());
        }
        for n in 0..=255u8 {
            let ip = std::net::IpAddr::from([n, 255 - n, n / 3, 7]);
            assert_eq!(ip_text(ip), ip.to_string());
        }
    }
    /// (input, trust, tls, X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host)
    type ForwardCase<'a> = (Fields<'a>, bool, bool, &'a str, &'a str, Option<&'a str>);

    fn headers(pairs: Fields<'_>) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    fn names(map: &HeaderMap) -> Vec<String> {
        let mut names: Vec<String> = map.keys().map(|k| k.as_str().to_owned()).collect();
        names.sort();
        names
    }

    #[test]
    fn cookie_fields_are_joined_into_one() {
        let mut map = headers(&[("cookie", "a=1"), ("accept", "*/*"), ("cookie", "b=2; c=3")]);
        join_cookies(&mut map);
        let cookies: Vec<_> = map.get_all(COOKIE).iter().collect();
        assert_eq!(cookies, ["a=1; b=2; c=3"]);
        let mut map = headers(&[("cookie", "a=1")]);
        join_cookies(&mut map);
        assert_eq!(map[COOKIE], "a=1");
    }

    #[test]
    fn hop_by_hop_table() {
        // (input fields, keep_upgrade, fields left)
        let cases: &[(Fields<'_>, bool, &[&str])] = &[
            (&[("accept", "*/*")], false, &["accept"]),
            (
                &[
                    ("connection", "keep-alive, x-secret"),
                    ("keep-alive", "timeout=5"),
                    ("x-secret", "1"),
                    ("accept", "*/*"),
                ],
                false,
                &["accept"],
            ),
            (
                &[
                    ("te", "trailers"),
                    ("trailer", "x-checksum"),
                    ("transfer-encoding", "chunked"),
                    ("proxy-connection", "keep-alive"),
                    ("upgrade", "websocket"),
                    ("host", "a"),
                ],
                false,
                &["host"],
            ),
            // Host is never hop-by-hop, whatever Connection names.
            (
                &[("connection", "Host, x-a"), ("host", "a"), ("x-a", "1")],
                false,
                &["host"],
            ),
            // Several Connection lines, odd spacing and case.
            (
                &[
                    ("connection", " X-One ,"),
                    ("connection", "x-two"),
                    ("x-one", "1"),
                    ("x-two", "2"),
                    ("x-three", "3"),
                ],
                false,
                &["x-three"],
            ),
            // Upgrade requested but not allowed: stripped.
            (
                &[("connection", "upgrade"), ("upgrade", "websocket")],
                false,
                &[],
            ),
            // Upgrade allowed: kept, other Connection-named fields still go.
            (
                &[
                    ("connection", "Upgrade, x-hop"),
                    ("upgrade", "websocket"),
                    ("x-hop", "1"),
                    ("sec-websocket-key", "k"),
                ],
                true,
                &["connection", "sec-websocket-key", "upgrade"],
            ),
            // Upgrade field without Connection: upgrade is not an upgrade.
            (&[("upgrade", "websocket")], true, &[]),
            // Nor is one to h2c, alone or listed.
            (
                &[
                    ("connection", "Upgrade, HTTP2-Settings"),
                    ("upgrade", "H2C"),
                    ("http2-settings", "AAMAAABkAAQAoAAAAAIAAAAA"),
                ],
                true,
                &[],
            ),
            (
                &[("connection", "upgrade"), ("upgrade", "foo/2, h2c")],
                true,
                &[],
            ),
            // Invalid names in Connection are ignored, not fatal.
            (&[("connection", "bad name, x-a"), ("x-a", "1")], false, &[]),
        ];
        for (input, keep_upgrade, want) in cases {
            let mut map = headers(input);
            strip_hop_by_hop(&mut map, *keep_upgrade);
            assert_eq!(names(&map), *want, "input {input:?}");
        }
    }

    #[test]
    fn kept_upgrade_rewrites_connection() {
        let mut map = headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        strip_hop_by_hop(&mut map, true);
        assert_eq!(map[CONNECTION], "upgrade");
        assert_eq!(map[UPGRADE], "websocket");
    }

    fn ctx(trust: bool, tls: bool) -> ForwardContext<'static> {
        ForwardContext {
            client_ip: "192.0.2.7".parse().unwrap(),
            tls,
            trust_forwarded: trust,
            via: default_via(Version::HTTP_11),
        }
    }

    fn request(pairs: Fields<'_>) -> Request<()> {
        let mut req = Request::builder().uri("/p").body(()).unwrap();
        *req.headers_mut() = headers(pairs);
        req
    }

    #[test]
    fn forwarding_fields_table() {
        let cases: &[ForwardCase<'_>] = &[
            (
                &[("host", "example.com")],
                false,
                false,
                "192.0.2.7",
                "http",
                Some("example.com"),
            ),
            (
                &[("host", "example.com")],
                false,
                true,
                "192.0.2.7",
                "https",
                Some("example.com"),
            ),
            // Untrusted: client-sent values are replaced.
            (
                &[
                    ("host", "example.com"),
                    ("x-forwarded-for", "10.0.0.1"),
                    ("x-forwarded-proto", "https"),
                    ("x-forwarded-host", "evil"),
                ],
                false,
                false,
                "192.0.2.7",
                "http",
                Some("example.com"),
            ),
            // Trusted: the chain is extended, proto and host kept.
            (
                &[
                    ("host", "example.com"),
                    ("x-forwarded-for", "10.0.0.1, 10.0.0.2"),
                    ("x-forwarded-for", "10.0.0.3"),
                    ("x-forwarded-proto", "https"),
                    ("x-forwarded-host", "front.example"),
                ],
                true,
                false,
                "10.0.0.1, 10.0.0.2, 10.0.0.3, 192.0.2.7",
                "https",
                Some("front.example"),
            ),
            (&[], false, false, "192.0.2.7", "http", None),
        ];
        for (input, trust, tls, xff, proto, host) in cases {
            let mut req = request(input);
            prepare_upstream_request(&mut req, &ctx(*trust, *tls));
            // The same fields, written as head lines instead of put in the map.
            let mut wired = request(input);
            let host_field = wired.headers().get(HOST).cloned();
            let forwarded = forwarding(wired.headers_mut(), host_field, &ctx(*trust, *tls));
            let mut lines = Vec::new();
            forwarded.encode(&mut lines);
            lines.extend_from_slice(b"\r\n");
            let mut parsed = [httparse::EMPTY_HEADER; 8];
            let Ok(httparse::Status::Complete((_, fields))) =
                httparse::parse_headers(&lines, &mut parsed)
            else {
                panic!("encoded forwarding fields do not parse: {lines:?}");
            };
            let mut from_wire = wired.headers().clone();
            for f in fields {
                from_wire.append(
                    HeaderName::from_bytes(f.name.as_bytes()).unwrap(),
                    HeaderValue::from_bytes(f.value).unwrap(),
                );
            }
            assert_eq!(&from_wire, req.headers(), "{input:?}");
            let h = req.headers();
            assert_eq!(h[X_FORWARDED_FOR], *xff, "{input:?}");
            assert_eq!(h.get_all(X_FORWARDED_FOR).iter().count(), 1);
            assert_eq!(h[X_FORWARDED_PROTO], *proto, "{input:?}");
            assert_eq!(
                h.get(X_FORWARDED_HOST).map(|v| v.to_str().unwrap()),
                *host,
                "{input:?}"
            );
            assert_eq!(h.get_all(VIA).iter().next_back().unwrap(), "1.1 portico");
        }
    }

    #[test]
    fn forwarded_host_from_h2_authority() {
        let mut req = Request::builder()
            .version(Version::HTTP_2)
            .uri("https://h2.example:8443/x")
            .body(())
            .unwrap();
        prepare_upstream_request(&mut req, &ctx(false, true));
        assert_eq!(req.headers()[X_FORWARDED_HOST], "h2.example:8443");
    }

    #[test]
    fn upstream_request_keeps_upgrade_and_strips_the_rest() {
        let mut req = request(&[
            ("host", "a"),
            ("connection", "upgrade, keep-alive"),
            ("upgrade", "websocket"),
            ("keep-alive", "5"),
            ("te", "trailers"),
            ("via", "1.0 fred"),
        ]);
        prepare_upstream_request(&mut req, &ctx(false, false));
        let h = req.headers();
        assert_eq!(h[CONNECTION], "upgrade");
        assert_eq!(h[UPGRADE], "websocket");
        assert!(!h.contains_key(KEEP_ALIVE));
        assert!(!h.contains_key(TE));
        let via: Vec<_> = h.get_all(VIA).iter().collect();
        assert_eq!(via, ["1.0 fred", "1.1 portico"]);
    }

    #[test]
    fn downstream_response_table() {
        // (status, input, strip_server, fields left)
        let cases: &[(u16, Fields<'_>, bool, &[&str])] = &[
            (
                200,
                &[
                    ("server", "apache"),
                    ("connection", "close, x-internal"),
                    ("x-internal", "1"),
                    ("transfer-encoding", "chunked"),
                    ("content-type", "text/plain"),
                ],
                true,
                &["content-type", "via"],
            ),
            (200, &[("server", "apache")], false, &["server", "via"]),
            (
                101,
                &[("connection", "upgrade"), ("upgrade", "websocket")],
                false,
                &["connection", "upgrade", "via"],
            ),
            // An Upgrade on a non-101 response is just hop-by-hop noise.
            (
                200,
                &[("connection", "upgrade"), ("upgrade", "h2c")],
                false,
                &["via"],
            ),
        ];
        for (status, input, strip_server, want) in cases {
            let mut resp = Response::new(());
            *resp.status_mut() = StatusCode::from_u16(*status).unwrap();
            *resp.headers_mut() = headers(input);
            prepare_downstream_response(
                &mut resp,
                &ResponseHygiene {
                    via: default_via(Version::HTTP_2),
                    strip_server: *strip_server,
                },
            );
            assert_eq!(names(resp.headers()), *want, "{input:?}");
            assert_eq!(resp.headers()[VIA], "2 portico");
        }
    }

    #[test]
    fn via_values() {
        assert_eq!(via_value(Version::HTTP_11, "edge-1").unwrap(), "1.1 edge-1");
        assert_eq!(via_value(Version::HTTP_2, "edge-1").unwrap(), "2 edge-1");
        assert!(via_value(Version::HTTP_11, "bad\nname").is_none());
        assert_eq!(default_via(Version::HTTP_10), "1.0 portico");
    }
}
