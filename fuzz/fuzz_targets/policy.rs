//! Arbitrary text through the whole policy pipeline: parsing, checking and
//! rendering diagnostics never panic, and a policy that loads answers a few
//! fixed requests through `decide`, `explain`, the cache key, the response
//! rules and its own test blocks, with the decision tree agreeing with the
//! rules tried in order.

#![no_main]

use libfuzzer_sys::fuzz_target;
use portico::policy::eval::{self, Response};
use portico::policy::model::Cond;
use portico::policy::testing::{explain, run_tests, OwnedRequest};
use portico::policy::{check_text, load};

/// Requests tried on every policy that loads: `(line, headers, client address)`.
const REQUESTS: &[(&str, &[(&str, &str)], Option<&str>)] = &[
    ("GET http://example.com/", &[], None),
    (
        "GET https://shop.example.com/static/app.css?v=3",
        &[("accept-encoding", "gzip, br")],
        Some("10.1.2.3"),
    ),
    (
        "POST http://api.example.com/api/v1/users",
        &[("authorization", "Bearer x"), ("cookie", "session=abc; a=1")],
        Some("192.168.1.7"),
    ),
    ("HEAD https://a.b.c/img/logo.png?q=1&x", &[("x-a", "1")], Some("::1")),
    ("DELETE http://[::1]:8080/r1/abc/12", &[], None),
];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (source, _, diagnostics) = check_text(text, "fuzz.policy");
    let _ = source.render_all(&diagnostics);
    let policy = match load(text, "fuzz.policy") {
        Ok(p) => p,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let _ = policy.tree.dump();
    let conds: Vec<&Cond> = policy.model.rules.iter().map(|r| &r.when).collect();
    let resp_headers = http::HeaderMap::new();
    for (line, headers, ip) in REQUESTS {
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        let req = OwnedRequest::from_line(line, &headers, *ip).expect("fixed requests are valid");
        let view = req.view();
        let d = policy.decide(&view);
        assert_eq!(
            d.index,
            eval::first_match(&conds, &view),
            "the tree disagrees with first-match for {line}"
        );
        let _ = policy.cache_key(&d, &view);
        let _ = policy.decide_response(
            &view,
            &Response {
                status: 200,
                headers: &resp_headers,
            },
        );
        let _ = explain(&policy, &req);
    }
    let _ = run_tests(&policy);
});
