//! Throttling: the policy's named limiters (`limit NAME { rate 100/s burst 200
//! by client.ip }`), each a keyed GCRA rate limiter (governor).
//!
//! A rule that says `throttle NAME` has its requests counted under the key the
//! limiter names; a request over the rate gets 429 with Retry-After.

use crate::policy::eval::{render_key, Request};
use crate::policy::model::{LimiterId, LimiterSpec};
use governor::{DefaultKeyedRateLimiter, Quota};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

/// One named limiter and its per-key state.
pub struct Limiter {
    pub spec: LimiterSpec,
    state: DefaultKeyedRateLimiter<String>,
}

impl Limiter {
    fn new(spec: &LimiterSpec) -> Limiter {
        let count = spec.count.clamp(1, u32::MAX as u64) as u32;
        // One request is replenished every `per / count`.
        let period = (spec.per / count).max(Duration::from_nanos(1));
        let burst = NonZeroU32::new(spec.burst.clamp(1, u32::MAX as u64) as u32)
            .expect("clamped to at least 1");
        let quota = Quota::with_period(period)
            .expect("period is above zero")
            .allow_burst(burst);
        Limiter {
            spec: spec.clone(),
            state: DefaultKeyedRateLimiter::keyed(quota),
        }
    }
}

/// The limiters of a policy, indexed like `Model::limiters`.
#[derive(Clone, Default)]
pub struct Limiters {
    limiters: Vec<Arc<Limiter>>,
}

impl Limiters {
    /// Builds the limiters of a policy, keeping the state of those that did not
    /// change since `previous` (so a reload does not reset everyone's budget).
    pub fn new(specs: &[LimiterSpec], previous: Option<&Limiters>) -> Limiters {
        let limiters = specs
            .iter()
            .map(|spec| {
                previous
                    .and_then(|p| p.limiters.iter().find(|l| &l.spec == spec))
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Limiter::new(spec)))
            })
            .collect();
        Limiters { limiters }
    }

    /// Counts a request against a limiter: `Err(retry_after)` when over the rate.
    pub fn check(&self, id: LimiterId, req: &Request<'_>) -> Result<(), Duration> {
        let Some(l) = self.limiters.get(id) else {
            return Ok(());
        };
        let mut key = String::with_capacity(32);
        render_key(std::slice::from_ref(&l.spec.by), req, &mut key);
        l.state.check_key(&key).map_err(|not_until| {
            not_until
                .wait_time_from(governor::clock::Clock::now(
                    &governor::clock::DefaultClock::default(),
                ))
                .max(Duration::from_secs(1))
        })
    }

    /// Forgets keys whose budget is full again; call it now and then to bound memory.
    pub fn retain_recent(&self) {
        for l in &self.limiters {
            l.state.retain_recent();
            l.state.shrink_to_fit();
        }
    }

    /// Number of keys tracked, over all limiters.
    pub fn tracked_keys(&self) -> usize {
        self.limiters.iter().map(|l| l.state.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::KeyPart;
    use crate::policy::testing::OwnedRequest;

    fn spec(count: u64, burst: u64) -> LimiterSpec {
        LimiterSpec {
            name: "l".into(),
            count,
            per: Duration::from_secs(60),
            burst,
            by: KeyPart::ClientIp,
        }
    }

    #[test]
    fn over_the_burst_is_refused_per_key() {
        let limiters = Limiters::new(&[spec(2, 2)], None);
        let a = OwnedRequest::from_line("GET http://x/", &[], Some("10.0.0.1")).unwrap();
        let b = OwnedRequest::from_line("GET http://x/", &[], Some("10.0.0.2")).unwrap();
        assert!(limiters.check(0, &a.view()).is_ok());
        assert!(limiters.check(0, &a.view()).is_ok());
        let retry = limiters.check(0, &a.view()).unwrap_err();
        assert!(retry >= Duration::from_secs(1));
        // Another client has its own budget.
        assert!(limiters.check(0, &b.view()).is_ok());
        assert_eq!(limiters.tracked_keys(), 2);
    }

    #[test]
    fn reload_keeps_state_of_unchanged_limiters() {
        let first = Limiters::new(&[spec(1, 1)], None);
        let a = OwnedRequest::from_line("GET http://x/", &[], Some("10.0.0.1")).unwrap();
        assert!(first.check(0, &a.view()).is_ok());
        let same = Limiters::new(&[spec(1, 1)], Some(&first));
        assert!(same.check(0, &a.view()).is_err());
        let changed = Limiters::new(&[spec(5, 5)], Some(&first));
        assert!(changed.check(0, &a.view()).is_ok());
    }
}
