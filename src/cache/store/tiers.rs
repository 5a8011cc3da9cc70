//! What the store reports of foyer's two tiers: evictions from memory,
//! bytes and objects in memory and on disk, and disk writes dropped.
//!
//! foyer counts these itself, through a metrics registry (mixtrics) that it
//! is given when built. [`Tally`] is such a registry: the few counters and
//! gauges Portico reports are plain atomics, the rest of foyer's metrics
//! (and every histogram) go nowhere. Nothing here takes a lock, and
//! nothing is pushed to the metrics recorder on foyer's paths:
//! [`Tiers::publish`] reads the atomics when `/metrics` is scraped.

use std::borrow::Cow;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Once};

use mixtrics::metrics::{
    BoxedCounter, BoxedCounterVec, BoxedGauge, BoxedGaugeVec, BoxedHistogram, BoxedHistogramVec,
    CounterOps, CounterVecOps, GaugeOps, GaugeVecOps, HistogramOps, HistogramVecOps, RegistryOps,
};

/// One foyer counter or gauge Portico reads.
#[derive(Debug, Default)]
struct Slot(AtomicI64);

impl Slot {
    fn add(&self, n: u64) {
        self.0
            .fetch_add(i64::try_from(n).unwrap_or(i64::MAX), Ordering::Relaxed);
    }

    fn sub(&self, n: u64) {
        self.0
            .fetch_sub(i64::try_from(n).unwrap_or(i64::MAX), Ordering::Relaxed);
    }

    fn set(&self, n: u64) {
        self.0
            .store(i64::try_from(n).unwrap_or(i64::MAX), Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        u64::try_from(self.0.load(Ordering::Relaxed)).unwrap_or(0)
    }
}

/// Which of foyer's metrics Portico reads: (metric, second label or `*`
/// for any) and the slot it lands in.
const READ: [(&str, &str, Which); 12] = [
    ("foyer_memory_op_total", "evict", Which::MemoryEvicted),
    ("foyer_storage_op_total", "enqueue", Which::DiskEnqueued),
    ("foyer_storage_op_total", "delete", Which::DiskDeleted),
    (
        "foyer_storage_inner_op_total",
        "channel_overflow",
        Which::DroppedQueueFull,
    ),
    (
        "foyer_storage_inner_op_total",
        "buffer_overflow",
        Which::DroppedBufferFull,
    ),
    (
        "foyer_storage_block_engine_op_total",
        "enqueue_skip",
        Which::DroppedYoung,
    ),
    (
        "foyer_storage_block_engine_op_total",
        "indexer_conflict",
        Which::DiskReplaced,
    ),
    (
        "foyer_storage_disk_io_bytes_total",
        "write",
        Which::DiskWrittenBytes,
    ),
    (
        "foyer_storage_block_engine_block",
        "writing",
        Which::BlocksWriting,
    ),
    (
        "foyer_storage_block_engine_block",
        "evictable",
        Which::BlocksEvictable,
    ),
    (
        "foyer_storage_block_engine_block",
        "reclaiming",
        Which::BlocksReclaiming,
    ),
    (
        "foyer_storage_block_engine_block_size_bytes",
        "*",
        Which::BlockSize,
    ),
];

/// The slots of [`Counts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    /// Entries evicted from memory.
    MemoryEvicted,
    /// Entries handed to the disk tier.
    DiskEnqueued,
    /// Removals sent to the disk tier.
    DiskDeleted,
    /// Not written: the submit queue was over its threshold.
    DroppedQueueFull,
    /// Not written: the flush buffer had no room.
    DroppedBufferFull,
    /// Not written: the memory tier judged the entry too young.
    DroppedYoung,
    /// Disk entries replaced by a newer write of their key.
    DiskReplaced,
    /// Bytes written to the device.
    DiskWrittenBytes,
    /// Disk blocks being filled, full, or being reclaimed (the blocks that
    /// hold entries), and their size.
    BlocksWriting,
    BlocksEvictable,
    BlocksReclaiming,
    BlockSize,
}

const SLOTS: usize = Which::BlockSize as usize + 1;

/// The foyer metrics Portico reads.
#[derive(Debug, Default)]
pub(super) struct Counts([Slot; SLOTS]);

impl Counts {
    fn which(metric: &str, label: &str) -> Option<Which> {
        READ.iter()
            .find(|(m, l, _)| *m == metric && (*l == "*" || *l == label))
            .map(|&(_, _, w)| w)
    }

    fn get(&self, which: Which) -> u64 {
        self.0[which as usize].get()
    }

    fn dropped(&self) -> u64 {
        self.get(Which::DroppedQueueFull)
            + self.get(Which::DroppedBufferFull)
            + self.get(Which::DroppedYoung)
    }

    /// Entries written to the disk tier (handed to it and not dropped),
    /// less those replaced and removed since. Entries that leave when foyer
    /// reclaims a disk block are not seen, so this is an upper bound.
    fn disk_objects(&self) -> u64 {
        self.get(Which::DiskEnqueued)
            .saturating_sub(self.dropped())
            .saturating_sub(self.get(Which::DiskReplaced))
            .saturating_sub(self.get(Which::DiskDeleted))
    }

    /// Disk space of the blocks that hold entries: being filled, full, or
    /// being reclaimed. Whole blocks, so the entries take at most this.
    fn disk_bytes(&self) -> u64 {
        let blocks = self.get(Which::BlocksWriting)
            + self.get(Which::BlocksEvictable)
            + self.get(Which::BlocksReclaiming);
        blocks.saturating_mul(self.get(Which::BlockSize))
    }
}

/// A counter or gauge handed to foyer for a metric Portico reads.
#[derive(Debug)]
struct Handle {
    counts: Arc<Counts>,
    which: Which,
}

impl Handle {
    fn slot(&self) -> &Slot {
        &self.counts.0[self.which as usize]
    }
}

impl CounterOps for Handle {
    fn increase(&self, val: u64) {
        self.slot().add(val);
    }
}

impl GaugeOps for Handle {
    fn increase(&self, val: u64) {
        self.slot().add(val);
    }

    fn decrease(&self, val: u64) {
        self.slot().sub(val);
    }

    fn absolute(&self, val: u64) {
        self.slot().set(val);
    }
}

/// What foyer is given for everything Portico does not read.
#[derive(Debug)]
struct Nothing;

impl CounterOps for Nothing {
    fn increase(&self, _: u64) {}
}

impl GaugeOps for Nothing {
    fn increase(&self, _: u64) {}
    fn decrease(&self, _: u64) {}
    fn absolute(&self, _: u64) {}
}

impl HistogramOps for Nothing {
    fn record(&self, _: f64) {}
}

impl HistogramVecOps for Nothing {
    fn histogram(&self, _: &[Cow<'static, str>]) -> BoxedHistogram {
        Box::new(Nothing)
    }
}

/// A family of foyer metrics (`name` is the first label, the cache's name;
/// the second, where there is one, says which).
#[derive(Debug)]
struct Family {
    counts: Arc<Counts>,
    metric: Cow<'static, str>,
}

impl Family {
    /// The slot's handle, or none when Portico does not read it. The slot
    /// is found once, here: foyer's updates are one atomic add, and cost
    /// nothing for the metrics nobody reads.
    fn handle(&self, labels: &[Cow<'static, str>]) -> Option<Handle> {
        let label = labels.get(1).map_or("", |l| l.as_ref());
        Some(Handle {
            counts: Arc::clone(&self.counts),
            which: Counts::which(&self.metric, label)?,
        })
    }
}

impl CounterVecOps for Family {
    fn counter(&self, labels: &[Cow<'static, str>]) -> BoxedCounter {
        match self.handle(labels) {
            Some(h) => Box::new(h),
            None => Box::new(Nothing),
        }
    }
}

impl GaugeVecOps for Family {
    fn gauge(&self, labels: &[Cow<'static, str>]) -> BoxedGauge {
        match self.handle(labels) {
            Some(h) => Box::new(h),
            None => Box::new(Nothing),
        }
    }
}

/// The registry foyer is built with (see the module doc).
#[derive(Debug)]
pub(super) struct Tally(pub(super) Arc<Counts>);

impl Tally {
    fn family(&self, metric: Cow<'static, str>) -> Family {
        Family {
            counts: Arc::clone(&self.0),
            metric,
        }
    }
}

impl RegistryOps for Tally {
    fn register_counter_vec(
        &self,
        name: Cow<'static, str>,
        _: Cow<'static, str>,
        _: &'static [&'static str],
    ) -> BoxedCounterVec {
        Box::new(self.family(name))
    }

    fn register_gauge_vec(
        &self,
        name: Cow<'static, str>,
        _: Cow<'static, str>,
        _: &'static [&'static str],
    ) -> BoxedGaugeVec {
        Box::new(self.family(name))
    }

    fn register_histogram_vec(
        &self,
        _: Cow<'static, str>,
        _: Cow<'static, str>,
        _: &'static [&'static str],
    ) -> BoxedHistogramVec {
        Box::new(Nothing)
    }

    fn register_histogram_vec_with_buckets(
        &self,
        _: Cow<'static, str>,
        _: Cow<'static, str>,
        _: &'static [&'static str],
        _: Vec<f64>,
    ) -> BoxedHistogramVec {
        Box::new(Nothing)
    }
}

/// The memory tier's size now, as foyer weighs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Memory {
    /// Keys plus encoded entries, bytes (the store's weigher).
    pub bytes: u64,
    /// Entries.
    pub objects: u64,
}

/// The store's view of its tiers, for `/metrics`.
#[derive(Debug, Default)]
pub(super) struct Tiers {
    pub(super) counts: Arc<Counts>,
}

static DESCRIBE: Once = Once::new();

/// Registers the help text of the metrics [`Tiers::publish`] sets.
fn describe() {
    use metrics::{describe_counter, describe_gauge, Unit};
    DESCRIBE.call_once(|| {
        describe_counter!(
            "portico_cache_evictions_total",
            "Entries evicted from the memory tier to stay within its capacity \
             (with a disk tier they remain on disk, where written)"
        );
        describe_gauge!(
            "portico_cache_memory_bytes",
            Unit::Bytes,
            "Memory tier usage: keys plus encoded entries, as the capacity counts them"
        );
        describe_gauge!("portico_cache_memory_objects", "Entries in the memory tier");
        describe_gauge!(
            "portico_cache_disk_bytes",
            Unit::Bytes,
            "Disk tier space held by blocks that hold entries (being filled, full or being \
             reclaimed); whole blocks, so an upper bound of the bytes the entries take"
        );
        describe_gauge!(
            "portico_cache_disk_objects",
            "Entries on the disk tier, approximate: entries written since the store opened \
             minus those replaced or removed; entries dropped when a disk block is reclaimed, \
             and those from before a restart, are not counted"
        );
        describe_counter!(
            "portico_cache_disk_written_bytes_total",
            Unit::Bytes,
            "Bytes written to the disk tier's device"
        );
        describe_counter!(
            "portico_cache_disk_write_drops_total",
            "Entries never written to the disk tier, by reason: queue-full (the write queue \
             was over its threshold), buffer-full (no room in the flush buffer), young (the \
             memory tier's policy skipped it)"
        );
    });
}

impl Tiers {
    /// The registry to build foyer with.
    pub(super) fn registry(&self) -> mixtrics::metrics::BoxedRegistry {
        Box::new(Tally(Arc::clone(&self.counts)))
    }

    /// Sets the tier metrics from foyer's counts and the memory tier's
    /// size (read by the caller from foyer).
    pub(super) fn publish(&self, memory: Memory) {
        describe();
        let c = &self.counts;
        metrics::counter!("portico_cache_evictions_total", "tier" => "memory")
            .absolute(c.get(Which::MemoryEvicted));
        metrics::gauge!("portico_cache_memory_bytes").set(memory.bytes as f64);
        metrics::gauge!("portico_cache_memory_objects").set(memory.objects as f64);
        metrics::gauge!("portico_cache_disk_bytes").set(c.disk_bytes() as f64);
        metrics::gauge!("portico_cache_disk_objects").set(c.disk_objects() as f64);
        metrics::counter!("portico_cache_disk_written_bytes_total")
            .absolute(c.get(Which::DiskWrittenBytes));
        for (reason, slot) in [
            ("queue-full", Which::DroppedQueueFull),
            ("buffer-full", Which::DroppedBufferFull),
            ("young", Which::DroppedYoung),
        ] {
            metrics::counter!("portico_cache_disk_write_drops_total", "reason" => reason)
                .absolute(c.get(slot));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(op: &'static str) -> [Cow<'static, str>; 2] {
        ["portico".into(), op.into()]
    }

    #[test]
    fn foyer_counts_land_in_their_slots_and_the_rest_nowhere() {
        let tiers = Tiers::default();
        let registry = tiers.registry();
        let ops = registry.register_counter_vec("foyer_storage_op_total".into(), "".into(), &[]);
        ops.counter(&labels("enqueue")).increase(5);
        ops.counter(&labels("delete")).increase(1);
        ops.counter(&labels("hit")).increase(100);
        let inner =
            registry.register_counter_vec("foyer_storage_inner_op_total".into(), "".into(), &[]);
        inner.counter(&labels("buffer_overflow")).increase(1);
        let blocks =
            registry.register_gauge_vec("foyer_storage_block_engine_block".into(), "".into(), &[]);
        let size = registry.register_gauge_vec(
            "foyer_storage_block_engine_block_size_bytes".into(),
            "".into(),
            &[],
        );
        size.gauge(&["portico".into()]).absolute(1 << 20);
        let writing = blocks.gauge(&labels("writing"));
        writing.increase(1);
        blocks.gauge(&labels("evictable")).increase(2);
        blocks.gauge(&labels("clean")).increase(50);
        writing.decrease(1);

        let c = &tiers.counts;
        assert_eq!(c.dropped(), 1);
        // 5 handed over, 1 dropped, 1 removed.
        assert_eq!(c.disk_objects(), 3);
        // Two full blocks; clean ones hold nothing.
        assert_eq!(c.disk_bytes(), 2 << 20);
    }

    #[test]
    fn disk_objects_never_go_below_zero() {
        let c = Counts::default();
        c.0[Which::DiskDeleted as usize].add(3);
        c.0[Which::DiskEnqueued as usize].add(1);
        assert_eq!(c.disk_objects(), 0);
    }
}
