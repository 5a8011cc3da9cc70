//! Portico: a caching web accelerator driven by a checked, compiled policy.
//!
//! A request goes through these phases, each owned by one module:
//!
//! 1. **receive**: a listener accepts the connection (HTTP/1.1, HTTP/2, TLS)
//!    and bounds header size and read time (`proxy`).
//! 2. **decide**: the compiled policy's decision tree picks the rule that
//!    applies and with it the route, cache key, TTLs, compression, limiter and
//!    header edits (`policy`).
//! 3. **throttle**: the rule's named limiter admits the request or answers 429.
//! 4. **lookup**: the cache is asked for the key (`cache`).
//! 5. **fetch**: on a miss, one request per key goes to a server of the
//!    backend pool (`upstream`).
//! 6. **store**: the response phase rules and HTTP's caching rules decide
//!    whether and for how long it is kept.
//! 7. **deliver**: header edits, compression and Cache-Status are applied.
//! 8. **log**: one access log line and the metrics, once the response body
//!    has been sent or given up on.

pub mod admin;
pub mod cache;
pub mod cli;
pub mod compress;
pub mod demo;
pub mod log;
pub mod policy;
pub mod proxy;
pub mod run;
pub mod throttle;
pub mod upstream;
