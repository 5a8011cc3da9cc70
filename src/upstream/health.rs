//! Health of each server of a backend: the verdict of active probes and the
//! passive ejection that follows failed requests.
//!
//! The request path only reads atomics ([`HealthState::is_usable`]); probes
//! and request outcomes write them. A server starts up, on probation: its
//! first probe takes it down if it fails, so that a server dead at start
//! does not keep getting traffic for `fall` probes. After that it goes down
//! after `fall` consecutive failed probes and comes back after `rise`
//! consecutive good ones. Independently, `consecutive_failures` failed requests eject it
//! for `cooldown`, after which it is re-admitted with a clean slate.
//!
//! Each server is probed on its own schedule: the first probe comes at a
//! random point of the first interval (of the first second when the
//! interval is longer), and each later one up to a tenth of the interval
//! early, at random. Servers, and Portico instances started
//! together, thus do not probe in step, and no server waits longer than
//! the interval between two probes (unless a probe itself takes longer), so
//! `fall` failed probes still come within `fall - 1` intervals of the first.
//!
//! When a reload changes a backend, the new state takes over what the old
//! one knew of the servers that remain ([`HealthState::carry_over`]): a
//! server known to be down or ejected does not get traffic again just
//! because the policy changed.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::balance::next_random;
use super::config::EjectConfig;

/// Health of every server of one backend.
#[derive(Debug)]
pub struct HealthState {
    base: Instant,
    eject: EjectConfig,
    rise: u32,
    fall: u32,
    servers: Box<[ServerHealth]>,
    /// How logs name each server: `backend/host:port`.
    labels: Box<[Box<str>]>,
}

#[derive(Debug)]
struct ServerHealth {
    up: AtomicBool,
    /// Whether a probe has said anything of the server yet. Until then it
    /// is up on probation: its first failed probe takes it down.
    probed: AtomicBool,
    probe_ok_streak: AtomicU32,
    probe_fail_streak: AtomicU32,
    request_fail_streak: AtomicU32,
    /// Milliseconds since `base` until which the server is ejected; 0: not ejected.
    ejected_until_ms: AtomicU64,
}

impl HealthState {
    /// State for `n` servers, all up. `rise` and `fall` (at least 1) govern
    /// active checks; `eject` governs passive ejection.
    pub fn new(n: usize, rise: u32, fall: u32, eject: EjectConfig) -> Arc<Self> {
        let labels = (0..n).map(|i| i.to_string().into()).collect();
        Self::build(n, rise, fall, eject, labels)
    }

    /// As [`HealthState::new`], for the servers `addrs` of `backend`, which
    /// logs name as `backend/addr`.
    pub fn labelled(
        backend: &str,
        addrs: &[&str],
        rise: u32,
        fall: u32,
        eject: EjectConfig,
    ) -> Arc<Self> {
        let labels = addrs
            .iter()
            .map(|a| format!("{backend}/{a}").into())
            .collect();
        Self::build(addrs.len(), rise, fall, eject, labels)
    }

    fn build(
        n: usize,
        rise: u32,
        fall: u32,
        eject: EjectConfig,
        labels: Box<[Box<str>]>,
    ) -> Arc<Self> {
        Arc::new(Self {
            labels,
            base: Instant::now(),
            eject,
            rise: rise.max(1),
            fall: fall.max(1),
            servers: (0..n)
                .map(|_| ServerHealth {
                    up: AtomicBool::new(true),
                    probed: AtomicBool::new(false),
                    probe_ok_streak: AtomicU32::new(0),
                    probe_fail_streak: AtomicU32::new(0),
                    request_fail_streak: AtomicU32::new(0),
                    ejected_until_ms: AtomicU64::new(0),
                })
                .collect(),
        })
    }

    /// Takes over `previous`'s knowledge of the servers that remain: for
    /// each `(here, there)` in `kept`, server `here` gets server `there`'s
    /// state. With `active` (this backend has health checks) that is its
    /// up or down verdict and probe streaks; without, a server stays up, as
    /// nothing here could bring it back. With passive ejection enabled here,
    /// it is the request failure streak and a running ejection, which ends
    /// when it would have, or after this backend's cooldown if sooner.
    pub fn carry_over(&self, previous: &HealthState, kept: &[(usize, usize)], active: bool) {
        let now = Instant::now();
        for &(here, there) in kept {
            let (new, old) = (&self.servers[here], &previous.servers[there]);
            if active {
                new.up
                    .store(old.up.load(Ordering::Acquire), Ordering::Release);
                new.probed
                    .store(old.probed.load(Ordering::Acquire), Ordering::Release);
                new.probe_ok_streak.store(
                    old.probe_ok_streak.load(Ordering::Relaxed),
                    Ordering::Relaxed,
                );
                new.probe_fail_streak.store(
                    old.probe_fail_streak.load(Ordering::Relaxed),
                    Ordering::Relaxed,
                );
            }
            if self.eject.consecutive_failures == 0 {
                continue;
            }
            new.request_fail_streak.store(
                old.request_fail_streak.load(Ordering::Relaxed),
                Ordering::Relaxed,
            );
            let until = old.ejected_until_ms.load(Ordering::Acquire);
            if until == 0 || !previous.is_ejected(there) {
                continue;
            }
            // Each state counts from its own base: move through an instant.
            let ends = previous.base + Duration::from_millis(until - 1);
            let ends = ends.min(now + self.eject.cooldown);
            let ms = ends.saturating_duration_since(self.base).as_millis() as u64 + 1;
            new.ejected_until_ms.store(ms, Ordering::Release);
        }
    }

    /// Number of servers.
    pub fn len(&self) -> usize {
        self.servers.len()
    }

    /// `true` when there are no servers.
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    fn now_ms(&self) -> u64 {
        // +1 keeps 0 free to mean "not ejected".
        self.base.elapsed().as_millis() as u64 + 1
    }

    /// Whether server `i` may take traffic: up by active checks and not ejected.
    pub fn is_usable(&self, i: usize) -> bool {
        self.is_up(i) && !self.is_ejected(i)
    }

    /// Whether active checks consider server `i` up.
    pub fn is_up(&self, i: usize) -> bool {
        self.servers[i].up.load(Ordering::Acquire)
    }

    /// Whether server `i` is inside an ejection cooldown.
    pub fn is_ejected(&self, i: usize) -> bool {
        let until = self.servers[i].ejected_until_ms.load(Ordering::Acquire);
        until != 0 && self.now_ms() < until
    }

    /// A request to server `i` got a response: its failure streak ends.
    pub fn record_success(&self, i: usize) {
        let s = &self.servers[i];
        if s.request_fail_streak.load(Ordering::Relaxed) != 0 {
            s.request_fail_streak.store(0, Ordering::Relaxed);
        }
    }

    /// Server `i`, sent a request although it was ejected (every server
    /// was), answered it: its ejection ends. A request that was in flight
    /// when it was ejected does not end it; nor is a later ejection than
    /// the one seen undone.
    pub fn readmit(&self, i: usize) {
        let s = &self.servers[i];
        let until = s.ejected_until_ms.load(Ordering::Acquire);
        if until != 0
            && self.now_ms() < until
            && s.ejected_until_ms
                .compare_exchange(until, 0, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            tracing::info!(
                server = &*self.labels[i],
                "upstream server re-admitted after a good response"
            );
        }
    }

    /// A request to server `i` failed (connect error, reset, timeout).
    /// Returns `true` when this failure ejected the server.
    pub fn record_failure(&self, i: usize) -> bool {
        let limit = self.eject.consecutive_failures;
        if limit == 0 {
            return false;
        }
        let s = &self.servers[i];
        let streak = s.request_fail_streak.fetch_add(1, Ordering::AcqRel) + 1;
        if streak < limit {
            return false;
        }
        s.request_fail_streak.store(0, Ordering::Release);
        let until = self.now_ms() + self.eject.cooldown.as_millis() as u64;
        s.ejected_until_ms.store(until, Ordering::Release);
        tracing::warn!(server = &*self.labels[i], cooldown = ?self.eject.cooldown, "upstream server ejected after {streak} failed requests");
        true
    }

    /// Records one active probe of server `i`. Returns `Some(up)` when the
    /// server changed state.
    pub fn record_probe(&self, i: usize, ok: bool) -> Option<bool> {
        let s = &self.servers[i];
        let first = !s.probed.load(Ordering::Acquire) && !s.probed.swap(true, Ordering::AcqRel);
        if ok {
            s.probe_fail_streak.store(0, Ordering::Relaxed);
            let streak = s.probe_ok_streak.fetch_add(1, Ordering::Relaxed) + 1;
            if streak >= self.rise && !s.up.swap(true, Ordering::AcqRel) {
                tracing::info!(
                    server = &*self.labels[i],
                    "upstream server back up after {streak} good probes"
                );
                return Some(true);
            }
        } else {
            s.probe_ok_streak.store(0, Ordering::Relaxed);
            let streak = s.probe_fail_streak.fetch_add(1, Ordering::Relaxed) + 1;
            // A server never probed has no good record to outweigh a failure.
            if (streak >= self.fall || first) && s.up.swap(false, Ordering::AcqRel) {
                tracing::warn!(
                    server = &*self.labels[i],
                    "upstream server down after {streak} failed probes"
                );
                return Some(false);
            }
        }
        None
    }
}

/// One probe of one server: resolves to `true` when the server is healthy.
pub type ProbeFuture = Pin<Box<dyn Future<Output = bool> + Send>>;

/// When the probe after one that started at `started` is due: an
/// `interval` later, less a random part of up to a tenth of it. Probes are
/// thus never further apart than the interval (as far as the probe itself
/// allows), and no two servers stay in step.
fn next_probe(started: Instant, interval: Duration) -> Instant {
    started + interval - random_below(interval / 10)
}

/// A random duration in `[0, limit)`; zero when `limit` is.
fn random_below(limit: Duration) -> Duration {
    match u64::try_from(limit.as_nanos()) {
        Ok(0) => Duration::ZERO,
        Ok(nanos) => Duration::from_nanos(next_random() % nanos),
        // Past 584 years: spread over the first of them.
        Err(_) => Duration::from_nanos(next_random()),
    }
}

/// Runs active checks for one backend until dropped or shut down.
#[derive(Debug)]
pub struct HealthChecker {
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl HealthChecker {
    /// Spawns the checker: each server is probed through `probe(i)`, first
    /// at a random point of the first `interval` (or second), then every `interval`
    /// less up to a tenth of it (see [`next_probe`]); a probe slower than
    /// `timeout` counts as failed, and one slower than the interval is
    /// followed by the next at once. Must be called inside a tokio runtime.
    pub fn spawn<P>(
        state: Arc<HealthState>,
        interval: Duration,
        timeout: Duration,
        probe: P,
    ) -> Self
    where
        P: Fn(usize) -> ProbeFuture + Send + Sync + 'static,
    {
        let (shutdown, mut stop) = watch::channel(false);
        let interval = interval.max(Duration::from_millis(1));
        let task = tokio::spawn(async move {
            let (state, probe) = (&state, &probe);
            let servers = (0..state.len()).map(|i| async move {
                tokio::time::sleep(random_below(interval.min(Duration::from_secs(1)))).await;
                loop {
                    let started = Instant::now();
                    let ok = tokio::time::timeout(timeout, probe(i))
                        .await
                        .unwrap_or(false);
                    state.record_probe(i, ok);
                    tokio::time::sleep_until(next_probe(started, interval)).await;
                }
            });
            // The servers' schedules never end; only a stop does.
            let probing = futures_util::future::join_all(servers);
            tokio::select! {
                _ = stop.changed() => {}
                _ = probing => {}
            }
        });
        Self { shutdown, task }
    }

    /// Asks the checker to stop; it does so at once, probes in flight
    /// left unanswered.
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Whether the checker task has ended.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

impl Drop for HealthChecker {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn eject(n: u32, ms: u64) -> EjectConfig {
        EjectConfig {
            consecutive_failures: n,
            cooldown: Duration::from_millis(ms),
        }
    }

    #[test]
    fn rise_and_fall_need_consecutive_probes() {
        let h = HealthState::new(1, 2, 3, eject(0, 0));
        assert!(h.is_usable(0));
        // Past its probation: one good probe.
        assert_eq!(h.record_probe(0, true), None);
        assert_eq!(h.record_probe(0, false), None);
        assert_eq!(h.record_probe(0, false), None);
        assert_eq!(h.record_probe(0, true), None); // streak broken
        assert_eq!(h.record_probe(0, false), None);
        assert_eq!(h.record_probe(0, false), None);
        assert_eq!(h.record_probe(0, false), Some(false));
        assert!(!h.is_usable(0));
        assert_eq!(h.record_probe(0, true), None);
        assert_eq!(h.record_probe(0, false), None);
        assert_eq!(h.record_probe(0, true), None);
        assert_eq!(h.record_probe(0, true), Some(true));
        assert!(h.is_usable(0));
        // A server never probed goes down on its first failure.
        let h = HealthState::new(1, 2, 3, eject(0, 0));
        assert_eq!(h.record_probe(0, false), Some(false));
    }

    #[tokio::test]
    async fn passive_ejection_lasts_the_cooldown() {
        let h = HealthState::new(2, 1, 1, eject(3, 150));
        assert!(!h.record_failure(0));
        h.record_success(0); // resets the streak
        assert!(!h.record_failure(0));
        assert!(!h.record_failure(0));
        assert!(h.record_failure(0));
        let ejected_at = Instant::now();
        assert!(!h.is_usable(0));
        assert!(h.is_usable(1));
        // The cooldown is the point of the test, so waiting for it is the signal.
        tokio::time::sleep(Duration::from_millis(170)).await;
        assert!(
            h.is_usable(0),
            "re-admitted after {:?}",
            ejected_at.elapsed()
        );
        // Re-admitted with a clean slate: one failure does not eject again.
        assert!(!h.record_failure(0));
        assert!(h.is_usable(0));
    }

    #[test]
    fn carry_over_keeps_what_was_known_of_remaining_servers() {
        let old = HealthState::new(3, 1, 2, eject(1, 60_000));
        old.record_probe(0, false);
        old.record_probe(0, false); // down
        assert!(old.record_failure(1)); // ejected
        old.record_probe(2, true); // past its probation
        old.record_probe(2, false); // one failure short of down
                                    // Server 0 stays at 0, 2 moves to 1, 1 moves to 2, a new one is 3.
        let kept = [(0, 0), (1, 2), (2, 1)];
        let new = HealthState::new(4, 1, 2, eject(1, 60_000));
        new.carry_over(&old, &kept, true);
        assert!(!new.is_up(0));
        assert!(new.is_usable(1));
        assert_eq!(
            new.record_probe(1, false),
            Some(false),
            "the streak carried"
        );
        assert!(new.is_ejected(2));
        assert!(new.is_usable(3));

        // Without active checks nothing would bring a server back up; without
        // ejection a running one would never have been started.
        let plain = HealthState::new(4, 1, 2, eject(0, 60_000));
        plain.carry_over(&old, &kept, false);
        assert!((0..4).all(|i| plain.is_usable(i)));

        // A shorter cooldown here ends the ejection sooner.
        let brief = HealthState::new(4, 1, 2, eject(1, 0));
        brief.carry_over(&old, &kept, true);
        assert!(!brief.is_ejected(2));
    }

    #[test]
    fn probes_come_at_most_an_interval_apart_and_not_in_step() {
        let start = Instant::now();
        let interval = Duration::from_secs(10);
        let next: Vec<Duration> = (0..200)
            .map(|_| next_probe(start, interval) - start)
            .collect();
        assert!(next
            .iter()
            .all(|d| *d > Duration::from_secs(9) && *d <= interval));
        assert!(next.iter().any(|d| *d != next[0]), "no jitter: {next:?}");
        let first: Vec<Duration> = (0..200).map(|_| random_below(interval)).collect();
        assert!(first.iter().all(|d| *d < interval));
        // 200 draws spread over the interval fall in both of its halves.
        assert!(first.iter().any(|d| *d < interval / 2));
        assert!(first.iter().any(|d| *d >= interval / 2));
        assert_eq!(random_below(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn zero_consecutive_failures_disables_ejection() {
        let h = HealthState::new(1, 1, 1, eject(0, 1_000));
        for _ in 0..100 {
            assert!(!h.record_failure(0));
        }
        assert!(h.is_usable(0));
    }

    async fn wait_until(what: &str, cond: impl Fn() -> bool) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while !cond() {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
    }

    #[tokio::test]
    async fn checker_probes_and_stops_when_dropped() {
        let h = HealthState::new(2, 1, 1, eject(0, 0));
        let calls = Arc::new(AtomicUsize::new(0));
        let c = Arc::clone(&calls);
        let checker = HealthChecker::spawn(
            Arc::clone(&h),
            Duration::from_millis(10),
            Duration::from_millis(20),
            move |i| {
                c.fetch_add(1, Ordering::SeqCst);
                // Server 1 never answers: the timeout fails it.
                Box::pin(async move {
                    if i == 1 {
                        std::future::pending::<()>().await;
                    }
                    true
                })
            },
        );
        wait_until("server 1 down", || !h.is_up(1)).await;
        assert!(h.is_up(0));
        drop(checker);
        tokio::task::yield_now().await;
        let seen = calls.load(Ordering::SeqCst);
        // Several intervals pass without a probe once the handle is gone.
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(calls.load(Ordering::SeqCst), seen);
    }

    #[tokio::test]
    async fn checker_stops_on_shutdown() {
        let h = HealthState::new(1, 1, 1, eject(0, 0));
        let checker =
            HealthChecker::spawn(h, Duration::from_millis(10), Duration::from_secs(1), |_| {
                Box::pin(async { true })
            });
        checker.shutdown();
        wait_until("checker end", || checker.is_finished()).await;
    }
}
