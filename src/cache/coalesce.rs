//! Request coalescing: one origin request per cache key at a time.
//!
//! The first request for a key that misses becomes the leader and goes to
//! the origin; requests for the same key that arrive meanwhile become
//! followers and wait for the leader's outcome instead of hitting the origin
//! too. A leader that goes away without publishing (an error, a panic, a
//! dropped connection) releases its followers with [`Outcome::Retry`]: they
//! never hang.
//!
//! Hit-for-miss: when the leader's response turned out not storable, waiting
//! on the next leader would only serialise requests that can never be served
//! from the cache, so the key is remembered as uncacheable for a short time
//! and joins answer [`Role::Bypass`] straight away (as Varnish does).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use std::time::Instant;

use tokio::sync::watch;

/// What a leader tells its followers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<T> {
    /// The response, now stored: serve it.
    Ready(T),
    /// The response could not be stored: go to the origin yourself.
    NotStorable,
    /// The leader failed or gave up: go to the origin yourself.
    Retry,
}

/// The part a request plays for its key.
#[derive(Debug)]
pub enum Role<T> {
    /// Go to the origin and publish the outcome.
    Leader(Leader<T>),
    /// Wait for the leader's outcome.
    Follower(Follower<T>),
    /// The key is known to be uncacheable (hit-for-miss): go to the origin
    /// without coalescing.
    Bypass,
}

type Slot<T> = watch::Sender<Option<Outcome<T>>>;

struct Flight<T> {
    id: u64,
    sender: Arc<Slot<T>>,
}

struct Inner<T> {
    flights: Mutex<HashMap<String, Flight<T>>>,
    uncacheable: Mutex<HashMap<String, Instant>>,
    hit_for_miss: Duration,
    next_id: AtomicU64,
    clock: Clock,
}

/// Source of the current time (replaceable in tests).
type Clock = Box<dyn Fn() -> Instant + Send + Sync>;

fn lock<V>(mutex: &Mutex<V>) -> MutexGuard<'_, V> {
    // Maps stay consistent across a panic elsewhere: every update is a
    // single insert or remove.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Coalesces concurrent misses per key. Cheap to clone; clones share state.
pub struct Coalescer<T> {
    inner: Arc<Inner<T>>,
}

impl<T> Clone for Coalescer<T> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<T: Clone + Send + Sync + 'static> Coalescer<T> {
    /// A coalescer that remembers uncacheable keys for `hit_for_miss`
    /// (zero disables hit-for-miss).
    pub fn new(hit_for_miss: Duration) -> Self {
        Self::with_clock(hit_for_miss, Box::new(Instant::now))
    }

    fn with_clock(hit_for_miss: Duration, clock: Clock) -> Self {
        Self {
            inner: Arc::new(Inner {
                flights: Mutex::new(HashMap::new()),
                uncacheable: Mutex::new(HashMap::new()),
                hit_for_miss,
                next_id: AtomicU64::new(0),
                clock,
            }),
        }
    }

    /// Joins the requests for `key`.
    pub fn join(&self, key: &str) -> Role<T> {
        {
            let mut uncacheable = lock(&self.inner.uncacheable);
            if let Some(until) = uncacheable.get(key) {
                if (self.inner.clock)() < *until {
                    return Role::Bypass;
                }
                uncacheable.remove(key);
            }
        }
        let mut flights = lock(&self.inner.flights);
        if let Some(flight) = flights.get(key) {
            return Role::Follower(Follower {
                receiver: flight.sender.subscribe(),
            });
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let sender = Arc::new(watch::Sender::new(None));
        flights.insert(
            key.to_owned(),
            Flight {
                id,
                sender: Arc::clone(&sender),
            },
        );
        Role::Leader(Leader {
            inner: Arc::clone(&self.inner),
            key: key.to_owned(),
            id,
            sender: Some(sender),
        })
    }

    /// Forgets that `key` was uncacheable (e.g. after a purge or a policy
    /// change).
    pub fn forget_uncacheable(&self, key: &str) {
        lock(&self.inner.uncacheable).remove(key);
    }

    /// Number of keys with a request in flight.
    pub fn in_flight(&self) -> usize {
        lock(&self.inner.flights).len()
    }
}

/// The leader's obligation to publish; dropping it unpublished releases the
/// followers with [`Outcome::Retry`].
pub struct Leader<T> {
    inner: Arc<Inner<T>>,
    key: String,
    id: u64,
    sender: Option<Arc<Slot<T>>>,
}

impl<T> std::fmt::Debug for Leader<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leader").field("key", &self.key).finish()
    }
}

impl<T> Leader<T> {
    /// Publishes the outcome to all followers. `NotStorable` also starts the
    /// key's hit-for-miss window.
    pub fn publish(mut self, outcome: Outcome<T>) {
        self.finish(outcome);
    }

    fn finish(&mut self, outcome: Outcome<T>) {
        let Some(sender) = self.sender.take() else {
            return;
        };
        {
            let mut flights = lock(&self.inner.flights);
            if flights.get(&self.key).is_some_and(|f| f.id == self.id) {
                flights.remove(&self.key);
            }
        }
        if matches!(outcome, Outcome::NotStorable) && !self.inner.hit_for_miss.is_zero() {
            let mut uncacheable = lock(&self.inner.uncacheable);
            let now = (self.inner.clock)();
            if uncacheable.len() >= 4096 {
                uncacheable.retain(|_, until| *until > now);
            }
            uncacheable.insert(self.key.clone(), now + self.inner.hit_for_miss);
        }
        sender.send_replace(Some(outcome));
    }
}

impl<T> Drop for Leader<T> {
    fn drop(&mut self) {
        if self.sender.is_some() {
            tracing::debug!(key = %self.key, "coalescing leader gone without an outcome");
            self.finish(Outcome::Retry);
        }
    }
}

/// A follower's handle on the leader's outcome.
#[derive(Debug)]
pub struct Follower<T> {
    receiver: watch::Receiver<Option<Outcome<T>>>,
}

impl<T: Clone> Follower<T> {
    /// Waits for the leader's outcome; [`Outcome::Retry`] if the leader is
    /// gone without one.
    pub async fn wait(mut self) -> Outcome<T> {
        loop {
            if let Some(outcome) = self.receiver.borrow_and_update().clone() {
                return outcome;
            }
            if self.receiver.changed().await.is_err() {
                return self.receiver.borrow().clone().unwrap_or(Outcome::Retry);
            }
        }
    }
}

impl<T> std::fmt::Debug for Flight<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flight").field("id", &self.id).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::Barrier;
    use tokio::time::timeout;

    const LIMIT: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn one_leader_and_many_followers_share_the_result() {
        let coalescer = Coalescer::<Arc<String>>::new(Duration::from_secs(5));
        let followers = 64;
        let leader = match coalescer.join("k") {
            Role::Leader(l) => l,
            other => panic!("expected leader, got {other:?}"),
        };
        let barrier = Arc::new(Barrier::new(followers + 1));
        let mut tasks = Vec::new();
        for _ in 0..followers {
            let coalescer = coalescer.clone();
            let barrier = Arc::clone(&barrier);
            tasks.push(tokio::spawn(async move {
                let role = coalescer.join("k");
                barrier.wait().await;
                match role {
                    Role::Follower(f) => f.wait().await,
                    other => panic!("expected follower, got {other:?}"),
                }
            }));
        }
        timeout(LIMIT, barrier.wait()).await.unwrap();
        // Another key is independent.
        assert!(matches!(coalescer.join("other"), Role::Leader(_)));
        leader.publish(Outcome::Ready(Arc::new("body".to_owned())));
        for task in tasks {
            let outcome = timeout(LIMIT, task).await.unwrap().unwrap();
            assert_eq!(outcome, Outcome::Ready(Arc::new("body".to_owned())));
        }
        assert_eq!(coalescer.in_flight(), 0);
        // The next miss leads again.
        assert!(matches!(coalescer.join("k"), Role::Leader(_)));
    }

    #[tokio::test]
    async fn a_dropped_leader_releases_followers_with_retry() {
        let coalescer = Coalescer::<u32>::new(Duration::from_secs(5));
        let Role::Leader(leader) = coalescer.join("k") else {
            panic!("expected leader")
        };
        let waiting: Vec<_> = (0..16)
            .map(|_| match coalescer.join("k") {
                Role::Follower(f) => tokio::spawn(f.wait()),
                other => panic!("expected follower, got {other:?}"),
            })
            .collect();
        // The leader's task fails (panics) while holding the guard.
        let failed = tokio::spawn(async move {
            let _leader = leader;
            panic!("origin fetch blew up");
        });
        assert!(timeout(LIMIT, failed).await.unwrap().is_err());
        for task in waiting {
            assert_eq!(timeout(LIMIT, task).await.unwrap().unwrap(), Outcome::Retry);
        }
        assert_eq!(coalescer.in_flight(), 0);
        // A retry is not a verdict on cacheability.
        assert!(matches!(coalescer.join("k"), Role::Leader(_)));
    }

    #[tokio::test]
    async fn not_storable_opens_a_hit_for_miss_window() {
        let base = Instant::now();
        let elapsed = Arc::new(AtomicU64::new(0));
        let clock = Arc::clone(&elapsed);
        let advance = |secs: u64| elapsed.fetch_add(secs, Ordering::SeqCst);
        let coalescer = Coalescer::<u32>::with_clock(
            Duration::from_secs(30),
            Box::new(move || base + Duration::from_secs(clock.load(Ordering::SeqCst))),
        );
        let Role::Leader(leader) = coalescer.join("k") else {
            panic!("expected leader")
        };
        let Role::Follower(follower) = coalescer.join("k") else {
            panic!("expected follower")
        };
        leader.publish(Outcome::NotStorable);
        assert_eq!(
            timeout(LIMIT, follower.wait()).await.unwrap(),
            Outcome::NotStorable
        );
        assert!(matches!(coalescer.join("k"), Role::Bypass));
        assert!(matches!(coalescer.join("other"), Role::Leader(_)));
        advance(29);
        assert!(matches!(coalescer.join("k"), Role::Bypass));
        advance(2);
        let Role::Leader(leader) = coalescer.join("k") else {
            panic!("window should have closed")
        };
        leader.publish(Outcome::NotStorable);
        assert!(matches!(coalescer.join("k"), Role::Bypass));
        coalescer.forget_uncacheable("k");
        assert!(matches!(coalescer.join("k"), Role::Leader(_)));
    }

    #[tokio::test]
    async fn zero_window_disables_hit_for_miss() {
        let coalescer = Coalescer::<u32>::new(Duration::ZERO);
        let Role::Leader(leader) = coalescer.join("k") else {
            panic!("expected leader")
        };
        leader.publish(Outcome::NotStorable);
        assert!(matches!(coalescer.join("k"), Role::Leader(_)));
    }

    #[tokio::test]
    async fn follower_joining_after_publish_before_removal_sees_outcome() {
        // A follower that subscribed just before the leader finished must
        // still see the value (the watch keeps the last one).
        let coalescer = Coalescer::<u32>::new(Duration::ZERO);
        let Role::Leader(leader) = coalescer.join("k") else {
            panic!("expected leader")
        };
        let Role::Follower(follower) = coalescer.join("k") else {
            panic!("expected follower")
        };
        leader.publish(Outcome::Ready(7));
        assert_eq!(
            timeout(LIMIT, follower.wait()).await.unwrap(),
            Outcome::Ready(7)
        );
    }
}
