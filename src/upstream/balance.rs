//! Selection algorithms: given the servers of a backend, their weights, their
//! load and which of them may take traffic now, pick one.
//!
//! Each algorithm is a small [`Selector`]; none does IO or allocates per pick.
//! [`select`] adds the backup rule on top of any of them: backup servers are
//! only candidates when no primary server is usable.

use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::config::Balance;

/// What a selector sees of a backend's servers at one pick.
pub struct Candidates<'a> {
    /// Weight of each server, never 0.
    pub weights: &'a [u32],
    /// Requests in flight per server.
    pub load: &'a Load,
    /// Whether server `i` may take this request (healthy, not ejected, right tier, not yet tried).
    pub usable: &'a dyn Fn(usize) -> bool,
}

impl Candidates<'_> {
    fn len(&self) -> usize {
        self.weights.len()
    }
}

/// A selection algorithm: picks the index of a usable server, or `None` when
/// there is none.
pub trait Selector: Send + Sync + std::fmt::Debug {
    /// Picks a server. `key` is the caller's affinity key; only hashing uses it.
    fn select(&self, c: &Candidates<'_>, key: Option<&[u8]>) -> Option<usize>;
}

/// Builds the selector for `balance` over servers with the given identities
/// (their addresses, which place them on the hash ring) and weights.
pub fn selector_for(balance: Balance, ids: &[&str], weights: &[u32]) -> Box<dyn Selector> {
    match balance {
        Balance::RoundRobin => Box::new(SmoothWeighted::new(weights.len())),
        Balance::LeastConn => Box::new(LeastConn::new(weights.len())),
        Balance::Random => Box::new(TwoChoices),
        Balance::Hash => Box::new(HashRing::new(ids, weights)),
    }
}

/// Picks among primary servers first and falls back to backups only when no
/// primary server is usable.
pub fn select(
    selector: &dyn Selector,
    weights: &[u32],
    backup: &[bool],
    load: &Load,
    usable: &dyn Fn(usize) -> bool,
    key: Option<&[u8]>,
) -> Option<usize> {
    let primary = |i: usize| !backup[i] && usable(i);
    let picked = selector.select(
        &Candidates {
            weights,
            load,
            usable: &primary,
        },
        key,
    );
    if picked.is_some() {
        return picked;
    }
    let secondary = |i: usize| backup[i] && usable(i);
    selector.select(
        &Candidates {
            weights,
            load,
            usable: &secondary,
        },
        key,
    )
}

/// Requests in flight per server, shared by the pool and the load-aware
/// selectors, and by the pools a reload builds for the same servers.
#[derive(Debug)]
pub struct Load {
    counts: Box<[Arc<AtomicU32>]>,
}

impl Load {
    /// Counters for `n` servers, all zero.
    pub fn new(n: usize) -> Arc<Self> {
        Arc::new(Self {
            counts: (0..n).map(|_| Arc::default()).collect(),
        })
    }

    /// Counters for `n` servers, of which those in `kept` (new index, index
    /// in `previous`) go on counting as they did in `previous`: requests and
    /// WebSockets still open through the pool a reload replaced count for
    /// the new one too, until they end.
    pub fn carried(n: usize, previous: &Load, kept: &[(usize, usize)]) -> Arc<Self> {
        let mut counts: Vec<Arc<AtomicU32>> = (0..n).map(|_| Arc::default()).collect();
        for &(i, j) in kept {
            if let (Some(slot), Some(before)) = (counts.get_mut(i), previous.counts.get(j)) {
                *slot = Arc::clone(before);
            }
        }
        Arc::new(Self {
            counts: counts.into(),
        })
    }

    /// Requests in flight to server `i`.
    pub fn get(&self, i: usize) -> u32 {
        self.counts[i].load(Ordering::Relaxed)
    }

    /// Counts one more request to server `i` until the guard is dropped.
    pub fn enter(&self, i: usize) -> InFlightGuard {
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        InFlightGuard {
            count: Arc::clone(&self.counts[i]),
            index: i,
        }
    }
}

/// One request in flight to one server; dropping it ends the count.
#[derive(Debug)]
pub struct InFlightGuard {
    count: Arc<AtomicU32>,
    index: usize,
}

impl InFlightGuard {
    /// The server this request went to.
    pub fn server(&self) -> usize {
        self.index
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Smooth weighted round robin, as nginx does it: every pick, each usable
/// server gains its weight; the richest is chosen and pays the total. Servers
/// with weights 5, 1, 1 are picked `a a b a c a a`, never in long runs.
#[derive(Debug)]
pub struct SmoothWeighted {
    current: Mutex<Vec<i64>>,
}

impl SmoothWeighted {
    /// State for `n` servers.
    pub fn new(n: usize) -> Self {
        Self {
            current: Mutex::new(vec![0; n]),
        }
    }
}

impl Selector for SmoothWeighted {
    fn select(&self, c: &Candidates<'_>, _key: Option<&[u8]>) -> Option<usize> {
        // A poisoned lock only means another pick panicked mid-update; the
        // numbers are still usable as a rotation state.
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for i in 0..c.len().min(current.len()) {
            if !(c.usable)(i) {
                continue;
            }
            let w = i64::from(c.weights[i].max(1));
            current[i] += w;
            total += w;
            if best.is_none_or(|b| current[i] > current[b]) {
                best = Some(i);
            }
        }
        if let Some(b) = best {
            current[b] -= total;
        }
        best
    }
}

/// Fewest requests in flight relative to weight; ties (every server idle,
/// say) are broken by smooth weighted round robin among the tied servers,
/// as nginx does, so that weights still count when the load does not tell
/// servers apart.
#[derive(Debug)]
pub struct LeastConn {
    ties: SmoothWeighted,
}

impl LeastConn {
    /// State for `n` servers.
    pub fn new(n: usize) -> Self {
        Self {
            ties: SmoothWeighted::new(n),
        }
    }
}

/// `true` when server `a` is less loaded than `b` relative to their weights.
fn lighter(c: &Candidates<'_>, a: usize, b: usize) -> bool {
    let la = u64::from(c.load.get(a)) * u64::from(c.weights[b].max(1));
    let lb = u64::from(c.load.get(b)) * u64::from(c.weights[a].max(1));
    la < lb
}

impl Selector for LeastConn {
    fn select(&self, c: &Candidates<'_>, _key: Option<&[u8]>) -> Option<usize> {
        let n = c.len();
        if n == 0 {
            return None;
        }
        let mut best: Option<usize> = None;
        for i in 0..n {
            if (c.usable)(i) && best.is_none_or(|b| lighter(c, i, b)) {
                best = Some(i);
            }
        }
        let best = best?;
        let tied = |i: usize| (c.usable)(i) && !lighter(c, best, i);
        self.ties.select(
            &Candidates {
                weights: c.weights,
                load: c.load,
                usable: &tied,
            },
            None,
        )
    }
}

/// The power of two choices: two weighted random picks, the less loaded wins.
#[derive(Debug, Default)]
pub struct TwoChoices;

impl TwoChoices {
    fn weighted_pick(c: &Candidates<'_>) -> Option<usize> {
        let total: u64 = (0..c.len())
            .filter(|&i| (c.usable)(i))
            .map(|i| u64::from(c.weights[i].max(1)))
            .sum();
        if total == 0 {
            return None;
        }
        let mut r = next_random() % total;
        for i in 0..c.len() {
            if !(c.usable)(i) {
                continue;
            }
            let w = u64::from(c.weights[i].max(1));
            if r < w {
                return Some(i);
            }
            r -= w;
        }
        None
    }
}

impl Selector for TwoChoices {
    fn select(&self, c: &Candidates<'_>, _key: Option<&[u8]>) -> Option<usize> {
        let a = Self::weighted_pick(c)?;
        let b = Self::weighted_pick(c).unwrap_or(a);
        Some(if lighter(c, b, a) { b } else { a })
    }
}

/// Virtual nodes per unit of weight on the hash ring.
const VNODES_PER_WEIGHT: u32 = 160;

/// Consistent hashing: each server owns `weight × 160` points on a ring of
/// 64-bit hashes of its address; a key goes to the first usable server at or
/// after its own hash. Taking a server out or adding one moves only the keys
/// it owns, about 1/N of them. Without a key, picks rotate over the ring.
#[derive(Debug)]
pub struct HashRing {
    points: Vec<(u64, u32)>,
    rotation: AtomicUsize,
}

impl HashRing {
    /// A ring for servers identified by `ids` (addresses) with `weights`.
    pub fn new(ids: &[&str], weights: &[u32]) -> Self {
        let mut points = Vec::new();
        for (i, (id, w)) in ids.iter().zip(weights).enumerate() {
            for v in 0..w.max(&1).saturating_mul(VNODES_PER_WEIGHT) {
                let mut h = Fnv::new();
                h.write(id.as_bytes());
                h.write(b"#");
                h.write(&v.to_le_bytes());
                points.push((h.finish(), i as u32));
            }
        }
        points.sort_unstable();
        Self {
            points,
            rotation: AtomicUsize::new(0),
        }
    }
}

impl Selector for HashRing {
    fn select(&self, c: &Candidates<'_>, key: Option<&[u8]>) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let start = match key {
            Some(k) => {
                let mut h = Fnv::new();
                h.write(k);
                let target = h.finish();
                self.points.partition_point(|&(p, _)| p < target)
            }
            None => self.rotation.fetch_add(1, Ordering::Relaxed),
        };
        let n = self.points.len();
        (0..n)
            .map(|step| self.points[(start + step) % n].1 as usize)
            .find(|&i| i < c.len() && (c.usable)(i))
    }
}

/// FNV-1a with a final avalanche mix (splitmix64), stable across builds and
/// platforms so a key keeps its server across restarts.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

thread_local! {
    static RNG: Cell<u64> = Cell::new(RandomState::new().hash_one(0u8) | 1);
}

/// A fast per-thread xorshift64* generator; balancing (and the spreading of
/// health probes over time) needs spread, not secrecy.
pub(super) fn next_random() -> u64 {
    RNG.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pick(sel: &dyn Selector, weights: &[u32], load: &Load, up: &[bool]) -> Option<usize> {
        let usable = |i: usize| up[i];
        sel.select(
            &Candidates {
                weights,
                load,
                usable: &usable,
            },
            None,
        )
    }

    #[test]
    fn smooth_round_robin_matches_nginx_sequence() {
        let table: &[(&[u32], &str)] = &[
            (&[5, 1, 1], "aabacaa"),
            (&[1, 1, 1], "abcabc"),
            (&[2, 1], "abaaba"),
            (&[0, 1], "abab"),
        ];
        for (weights, want) in table {
            let sel = SmoothWeighted::new(weights.len());
            let load = Load::new(weights.len());
            let up = vec![true; weights.len()];
            let got: String = (0..want.len())
                .map(|_| (b'a' + pick(&sel, weights, &load, &up).unwrap() as u8) as char)
                .collect();
            assert_eq!(&got, want, "weights {weights:?}");
        }
    }

    #[test]
    fn smooth_round_robin_skips_unusable_servers() {
        let sel = SmoothWeighted::new(3);
        let load = Load::new(3);
        let up = [true, false, true];
        for _ in 0..10 {
            assert_ne!(pick(&sel, &[1, 1, 1], &load, &up), Some(1));
        }
        assert_eq!(pick(&sel, &[1, 1, 1], &load, &[false; 3]), None);
    }

    #[test]
    fn least_conn_prefers_lowest_weighted_load_and_guard_releases() {
        let sel = LeastConn::new(3);
        let load = Load::new(3);
        let weights = [1, 1, 4];
        let up = [true; 3];
        let _a = load.enter(0);
        let _b = load.enter(2);
        let _c = load.enter(2);
        // Loads 1/1, 0/1, 2/4: server 1 is idle.
        assert_eq!(pick(&sel, &weights, &load, &up), Some(1));
        let g = load.enter(1);
        let h = load.enter(1);
        // Loads 1/1, 2/1, 2/4: server 2 is lightest relative to weight.
        assert_eq!(pick(&sel, &weights, &load, &up), Some(2));
        drop(g);
        drop(h);
        assert_eq!(load.get(1), 0);
        assert_eq!(pick(&sel, &weights, &load, &up), Some(1));
    }

    #[test]
    fn least_conn_spreads_ties() {
        let sel = LeastConn::new(3);
        let load = Load::new(3);
        let up = [true; 3];
        let mut seen = [0; 3];
        for _ in 0..30 {
            seen[pick(&sel, &[1, 1, 1], &load, &up).unwrap()] += 1;
        }
        assert_eq!(seen, [10, 10, 10]);
    }

    #[test]
    fn least_conn_ties_follow_the_weights() {
        // Sequential traffic: every pick finds every server idle.
        let sel = LeastConn::new(2);
        let load = Load::new(2);
        let mut seen = [0; 2];
        for _ in 0..1000 {
            seen[pick(&sel, &[4, 1], &load, &[true; 2]).unwrap()] += 1;
        }
        assert_eq!(seen, [800, 200]);
        // Only the servers tied for the lightest load share the picks.
        let sel = LeastConn::new(3);
        let load = Load::new(3);
        let _busy = load.enter(0);
        let mut seen = [0; 3];
        for _ in 0..40 {
            seen[pick(&sel, &[1, 3, 1], &load, &[true; 3]).unwrap()] += 1;
        }
        assert_eq!(seen, [0, 30, 10]);
    }

    #[test]
    fn two_choices_follows_weights_and_avoids_loaded_server() {
        let sel = TwoChoices;
        let load = Load::new(2);
        let up = [true; 2];
        let mut seen = [0u32; 2];
        for _ in 0..10_000 {
            seen[pick(&sel, &[3, 1], &load, &up).unwrap()] += 1;
        }
        // Equal (zero) load: the first of two picks wins ties, so shares follow weights.
        assert!((7_000..8_000).contains(&seen[0]), "{seen:?}");

        let load = Load::new(3);
        let _busy: Vec<_> = (0..5).map(|_| load.enter(0)).collect();
        let mut seen = [0u32; 3];
        for _ in 0..9_000 {
            seen[pick(&sel, &[1, 1, 1], &load, &[true; 3]).unwrap()] += 1;
        }
        // Server 0 only wins when both picks land on it: about 1/9.
        assert!(seen[0] < 1_500, "{seen:?}");
    }

    fn ring_owner(ring: &HashRing, n: usize, up: &[bool], key: &[u8]) -> usize {
        let load = Load::new(n);
        let weights = vec![1; n];
        let usable = |i: usize| up[i];
        ring.select(
            &Candidates {
                weights: &weights,
                load: &load,
                usable: &usable,
            },
            Some(key),
        )
        .unwrap()
    }

    fn addrs(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:80")).collect()
    }

    #[test]
    fn hash_ring_removal_moves_only_the_removed_servers_keys() {
        const KEYS: usize = 10_000;
        for n in [3usize, 5, 10] {
            let ids = addrs(n);
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            let ring = HashRing::new(&ids, &vec![1; n]);
            let all = vec![true; n];
            let mut less = all.clone();
            less[n / 2] = false;
            let mut moved = 0;
            for k in 0..KEYS {
                let key = format!("/object/{k}");
                let before = ring_owner(&ring, n, &all, key.as_bytes());
                let after = ring_owner(&ring, n, &less, key.as_bytes());
                if before != after {
                    assert_eq!(before, n / 2, "a key of a live server moved");
                    moved += 1;
                }
            }
            let share = moved as f64 / KEYS as f64;
            assert!(share <= 1.0 / n as f64 + 0.05, "n={n} moved {share}");
            assert!(share > 0.0);
        }
    }

    #[test]
    fn hash_ring_addition_moves_about_one_in_n_keys_to_the_new_server() {
        const KEYS: usize = 10_000;
        for n in [3usize, 5, 10] {
            let ids = addrs(n + 1);
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            let small = HashRing::new(&ids[..n], &vec![1; n]);
            let big = HashRing::new(&ids, &vec![1; n + 1]);
            let mut moved = 0;
            for k in 0..KEYS {
                let key = format!("/object/{k}");
                let before = ring_owner(&small, n, &vec![true; n], key.as_bytes());
                let after = ring_owner(&big, n + 1, &vec![true; n + 1], key.as_bytes());
                if before != after {
                    assert_eq!(after, n, "a key moved between old servers");
                    moved += 1;
                }
            }
            let share = moved as f64 / KEYS as f64;
            assert!(share <= 1.0 / (n + 1) as f64 + 0.05, "n={n} moved {share}");
        }
    }

    #[test]
    fn hash_ring_is_sticky_and_weighted() {
        let ids = ["a:1", "b:1"];
        let ring = HashRing::new(&ids, &[3, 1]);
        let load = Load::new(2);
        let usable = |_: usize| true;
        let c = Candidates {
            weights: &[3, 1],
            load: &load,
            usable: &usable,
        };
        let mut seen = [0u32; 2];
        for k in 0..10_000 {
            let key = format!("k{k}");
            let first = ring.select(&c, Some(key.as_bytes())).unwrap();
            assert_eq!(ring.select(&c, Some(key.as_bytes())), Some(first));
            seen[first] += 1;
        }
        assert!((6_500..8_500).contains(&seen[0]), "{seen:?}");
    }

    #[test]
    fn backups_only_when_no_primary_is_usable() {
        let weights = [1, 1, 1];
        let backup = [false, false, true];
        let load = Load::new(3);
        let sel = SmoothWeighted::new(3);
        let all = |_: usize| true;
        for _ in 0..6 {
            let i = select(&sel, &weights, &backup, &load, &all, None).unwrap();
            assert_ne!(i, 2);
        }
        let only_backup = |i: usize| i == 2;
        assert_eq!(
            select(&sel, &weights, &backup, &load, &only_backup, None),
            Some(2)
        );
        let none = |_: usize| false;
        assert_eq!(select(&sel, &weights, &backup, &load, &none, None), None);
    }

    proptest! {
        #[test]
        fn every_selector_returns_a_usable_server_or_none(
            servers in proptest::collection::vec((0u32..5, any::<bool>(), 0u32..4), 1..12),
            key in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..16)),
        ) {
            let weights: Vec<u32> = servers.iter().map(|s| s.0).collect();
            let up: Vec<bool> = servers.iter().map(|s| s.1).collect();
            let load = Load::new(servers.len());
            let _guards: Vec<_> = servers
                .iter()
                .enumerate()
                .flat_map(|(i, s)| (0..s.2).map(move |_| i))
                .map(|i| load.enter(i))
                .collect();
            let ids: Vec<String> = (0..servers.len()).map(|i| format!("s{i}:80")).collect();
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            let usable = |i: usize| up[i];
            for balance in [Balance::RoundRobin, Balance::LeastConn, Balance::Random, Balance::Hash] {
                let sel = selector_for(balance, &ids, &weights);
                let c = Candidates { weights: &weights, load: &load, usable: &usable };
                match sel.select(&c, key.as_deref()) {
                    Some(i) => prop_assert!(up[i], "{balance:?} picked a down server"),
                    None => prop_assert!(!up.iter().any(|&u| u), "{balance:?} found none"),
                }
            }
        }
    }
}
