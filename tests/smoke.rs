//! The shortest path through Portico: a miss, then a hit, from a real origin.

mod common;
use common::*;

#[tokio::test]
async fn miss_then_hit() {
    let origin = Origin::start(|_| reply(200, &[("cache-control", "max-age=60")], "hello")).await;
    let p = proxy(&policy_for(&origin, "rule all { route app cache { } }")).await;
    let first = get(addr(&p), "/a", &[]).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.text(), "hello");
    assert!(
        first.cache_status().contains("fwd=uri-miss"),
        "{}",
        first.cache_status()
    );
    let second = get(addr(&p), "/a", &[]).await;
    assert!(second.is_hit(), "{}", second.cache_status());
    assert_eq!(second.text(), "hello");
    assert_eq!(origin.count(), 1);
    p.shutdown().await;
}
