//! The cache store: a hybrid memory and disk cache (foyer) of [`Entry`]
//! values, with purges and `Vary` variants.
//!
//! Keys. A response without `Vary` lives at `primary\0`. A response with
//! `Vary` lives at `primary\0GEN\0secondary`, and `primary\0` then holds a
//! small vary marker naming the `Vary` fields and the generation `GEN` of
//! the variants. A lookup reads the root key first, then the variant the
//! marker points to. Every key of a primary key starts with `primary\0`, so
//! an exact purge removes the root and every known variant; even variants not
//! known to the index become unreachable, because a new marker always gets a
//! new generation. Primary keys must not contain NUL.
//!
//! Expiry. foyer has no TTL: the freshness and stale windows live in the
//! entry, and [`Store::get`] removes an entry past all of them. A response
//! that carries a validator (`ETag` or `Last-Modified`), and every vary
//! marker, is kept [`KEEP_FOR_REVALIDATION`] longer: a stale copy that can
//! be revalidated is worth a conditional request answered by a small 304
//! (RFC 9111 section 4.3.1); one that cannot is only worth a full fetch.
//!
//! Digests. foyer holds each entry under the first 128 bits of the SHA-256
//! digest of its key, not the key itself: a fixed 16 bytes inside foyer's
//! record instead of an allocation per entry, and a digest no request can
//! be crafted to collide with. The key text lives once, in the purge index.
//!
//! Purge index. Purge by prefix and by tag needs to enumerate keys; the
//! store keeps an in-memory index (key to tags, tag to keys, ordered keys)
//! of every entry inserted or read since it was opened. It is not persisted:
//! the entries on disk from before a restart are reached by bans instead
//! ([`super::bans`]), tested when such an entry is read. Exact-key purges
//! need neither (see above).
//!
//! Durability. The disk tier writes on insertion, keeps a tombstone log so
//! that removals survive a restart, and recovers quietly: a corrupt entry on
//! disk (foyer's checksum or [`Entry`]'s own) is dropped and reads as a miss.
//! Disk writes are best effort by design of foyer: under pressure an entry
//! may never reach the disk.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ops::Bound;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use foyer::{
    BlockEngineConfig, DeviceBuilder, FsDeviceBuilder, HybridCache, HybridCacheBuilder,
    HybridCachePolicy, RecoverMode, S3FifoConfig,
};
use http::HeaderMap;

use super::bans::{Ban, Bans, Snapshot, Target, Verdict, Writer};
use super::control::secondary_key_of;
use super::entry::{Entry, EntryKind};

mod tiers;

/// Space reserved in a disk block besides the encoded entry: foyer's entry
/// header and alignment, and the key.
const BLOCK_OVERHEAD: usize = 64 * 1024;
const PAGE: usize = 4096;

/// How long past its freshness and stale windows a response that can be
/// revalidated (and a vary marker) stays stored.
pub const KEEP_FOR_REVALIDATION: Duration = Duration::from_secs(3600);

/// How the store is sized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// Memory tier capacity in bytes (keys plus encoded entries).
    pub memory_bytes: usize,
    /// Directory of the disk tier; `None` for memory only.
    pub disk_dir: Option<PathBuf>,
    /// Disk tier capacity in bytes.
    pub disk_bytes: usize,
    /// Largest encoded entry the store accepts; the disk tier's block and
    /// buffer sizes are derived from it so that such an entry reaches disk.
    pub max_object_bytes: usize,
}

impl StoreConfig {
    /// Disk block size: room for the largest object, 4 KiB aligned, at least
    /// 1 MiB.
    pub fn block_size(&self) -> usize {
        Self::block_size_for(self.max_object_bytes)
    }

    fn block_size_for(max_object_bytes: usize) -> usize {
        let want = max_object_bytes.saturating_add(BLOCK_OVERHEAD);
        want.div_ceil(PAGE).saturating_mul(PAGE).max(1 << 20)
    }

    /// The smallest disk tier that can hold objects of up to
    /// `max_object_bytes`: four blocks (see [`StoreConfig::block_size`]).
    /// The policy check and the default size for `--cache-dir` use it, so
    /// that a policy that passes the check opens.
    pub fn disk_needed(max_object_bytes: usize) -> usize {
        Self::block_size_for(max_object_bytes).saturating_mul(4)
    }
}

/// Why the store could not be opened or closed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The sizes cannot work together.
    #[error("cache store configuration: {0}")]
    Config(String),
    /// foyer failed to build, recover or close.
    #[error("cache store: {0}")]
    Foyer(#[from] foyer::Error),
    /// The bans could not be written when the store closed: those added
    /// since the last write that succeeded hold until the restart only.
    #[error("cache bans not saved: {0}")]
    Bans(std::io::Error),
}

/// The value type held by foyer: an entry shared without copying.
#[derive(Debug, Clone)]
struct Stored(Arc<Entry>);

impl foyer::Code for Stored {
    fn encode(&self, writer: &mut impl std::io::Write) -> foyer::Result<()> {
        self.0.encode(writer)
    }

    fn decode(reader: &mut impl std::io::Read) -> foyer::Result<Self> {
        Entry::decode(reader).map(|e| Stored(Arc::new(e)))
    }

    fn estimated_size(&self) -> usize {
        self.0.estimated_size()
    }
}

/// The result of [`Store::lookup`].
#[derive(Debug, Clone)]
pub enum Lookup {
    /// A stored response for this request (possibly stale: judge it with
    /// [`super::control::evaluate_reuse`]).
    Hit(Arc<Entry>),
    /// Responses are stored for the primary key, but none for this request's
    /// `Vary` fields.
    VaryMiss,
    /// Nothing stored under the primary key.
    Miss,
}

/// How long a removal is remembered (see [`Index::removed`]).
const REMOVAL_MEMORY_MS: u64 = 10 * 60 * 1000;
/// Forgetting old removals is tried when this many are remembered.
const REMOVALS_PRUNE_AT: usize = 4096;

#[derive(Default)]
struct Index {
    keys: BTreeSet<Box<str>>,
    key_tags: HashMap<String, Vec<String>>,
    tag_keys: HashMap<String, HashSet<String>>,
    /// When each key was last removed, Unix milliseconds. foyer's remove
    /// does not reach an entry still queued for the disk: a read can find
    /// it there (and bring it back into memory) until the write finishes.
    /// Entries that arrived before their key's removal are refused on read,
    /// until the key is stored again.
    removed: HashMap<String, u64>,
}

impl Index {
    fn add(&mut self, key: &str, entry: &Entry) {
        let known_tags = self.key_tags.get(key).map_or(&[][..], Vec::as_slice);
        if known_tags.iter().map(String::as_str).eq(entry.tags()) && self.keys.contains(key) {
            // The common case on reads: nothing to record, nothing to allocate.
            return;
        }
        if !self.keys.contains(key) {
            self.keys.insert(key.into());
        }
        let old = self.key_tags.remove(key).unwrap_or_default();
        for tag in &old {
            if !entry.tags().any(|t| t == tag) {
                self.unlink_tag(tag, key);
            }
        }
        let tags: Vec<String> = entry.tags().map(str::to_owned).collect();
        for tag in &tags {
            self.tag_keys
                .entry(tag.clone())
                .or_default()
                .insert(key.to_owned());
        }
        if !tags.is_empty() {
            self.key_tags.insert(key.to_owned(), tags);
        }
    }

    fn remove(&mut self, key: &str, at_ms: u64) {
        if self.removed.len() >= REMOVALS_PRUNE_AT {
            self.removed
                .retain(|_, t| at_ms.saturating_sub(*t) < REMOVAL_MEMORY_MS);
        }
        self.removed.insert(key.to_owned(), at_ms);
        self.keys.remove(key);
        for tag in self.key_tags.remove(key).unwrap_or_default() {
            self.unlink_tag(&tag, key);
        }
    }

    /// Whether `key` was removed after an entry that arrived at
    /// `response_time_ms` was stored.
    fn removed_since(&self, key: &str, response_time_ms: u64) -> bool {
        self.removed
            .get(key)
            .is_some_and(|&at| at >= response_time_ms)
    }

    fn unlink_tag(&mut self, tag: &str, key: &str) {
        if let Some(keys) = self.tag_keys.get_mut(tag) {
            keys.remove(key);
            if keys.is_empty() {
                self.tag_keys.remove(tag);
            }
        }
    }

    fn with_prefix(&self, prefix: &str) -> Vec<String> {
        self.keys
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|k| k.starts_with(prefix))
            .map(|k| String::from(&**k))
            .collect()
    }

    fn with_tag(&self, tag: &str) -> Vec<String> {
        self.tag_keys
            .get(tag)
            .map(|keys| keys.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// The hybrid cache store. Cheap to share behind an `Arc`.
pub struct Store {
    cache: HybridCache<u128, Stored>,
    index: Mutex<Index>,
    max_object_bytes: usize,
    last_generation: AtomicU64,
    /// When the latest removal happened, Unix milliseconds (see [`Index::removed`]).
    last_removal_ms: AtomicU64,
    /// When the store opened, Unix milliseconds: entries that arrived
    /// before are the ones the index may not know.
    opened_ms: u64,
    /// Bans for those entries; kept only with a disk tier. A lock that
    /// readers share: every read of such an entry is judged while bans
    /// exist.
    bans: Option<RwLock<Bans>>,
    /// Whether any ban (or a floor) exists: until one does, reads skip the
    /// bans without taking their lock. Never goes back to false.
    bans_present: AtomicBool,
    /// How many bans this store has added (see [`Store::get`]).
    bans_added: AtomicU64,
    /// Writes the ban file off the lock above (see [`Store::ban`]).
    ban_writer: Arc<Writer>,
    reads: Reads,
    /// foyer's counts of its tiers, for `/metrics` (see [`Store::publish_metrics`]).
    tiers: tiers::Tiers,
}

/// `portico_cache_reads_total` by result, registered once when the store
/// opens (with the recorder installed by then) so that a read counts with
/// an atomic add.
struct Reads {
    hit: metrics::Counter,
    miss: metrics::Counter,
    purged: metrics::Counter,
    expired: metrics::Counter,
}

impl Reads {
    fn new() -> Reads {
        let c = |r: &'static str| metrics::counter!("portico_cache_reads_total", "result" => r);
        Reads {
            hit: c("hit"),
            miss: c("miss"),
            purged: c("purged"),
            expired: c("expired"),
        }
    }
}

/// What foyer files an entry under: the first 128 bits of the SHA-256
/// digest of its key (see the module doc).
pub fn digest(key: &str) -> u128 {
    let hash = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    let mut first = [0u8; 16];
    first.copy_from_slice(&hash.as_ref()[..16]);
    u128::from_le_bytes(first)
}

/// The key of the root entry (plain response or vary marker) of `primary`.
pub fn root_key(primary: &str) -> String {
    let mut key = String::with_capacity(primary.len() + 1);
    key.push_str(primary);
    key.push('\0');
    key
}

/// The key of a variant of `primary`.
pub fn variant_key(primary: &str, generation: u64, secondary: &str) -> String {
    format!("{primary}\0{generation:016x}\0{secondary}")
}

fn now() -> SystemTime {
    SystemTime::now()
}

fn unix_ms(t: SystemTime) -> u64 {
    u64::try_from(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(u64::MAX)
}

/// How long an entry is kept past its windows (see the module doc).
fn keep_for(entry: &Entry) -> Duration {
    let revalidatable = entry.kind == EntryKind::VaryMarker || entry.has_validator();
    if revalidatable {
        KEEP_FOR_REVALIDATION
    } else {
        Duration::ZERO
    }
}

/// The age past which an entry is of no use: beyond its freshness (none
/// once soft-purged), its stale windows and the time it is kept for
/// revalidation.
fn useful_for(entry: &Entry) -> Duration {
    let lifetime = entry.lifetime();
    lifetime
        .freshness
        .saturating_add(lifetime.swr.max(lifetime.sie))
        .saturating_add(keep_for(entry))
}

/// Whether an entry is of no use any more at `now`.
fn is_useless(entry: &Entry, now: SystemTime) -> bool {
    entry.age_at(now) >= useful_for(entry)
}

/// When an entry stops being of any use, Unix milliseconds.
fn useless_after_ms(entry: &Entry) -> u64 {
    let life = useful_for(entry).saturating_sub(entry.initial_age());
    entry
        .response_time_ms
        .saturating_add(u64::try_from(life.as_millis()).unwrap_or(u64::MAX))
}

impl Store {
    /// Opens (and on disk, recovers) the store.
    pub async fn open(config: StoreConfig) -> Result<Store, StoreError> {
        if config.memory_bytes == 0 {
            return Err(StoreError::Config("memory_bytes must be above zero".into()));
        }
        let tiers = tiers::Tiers::default();
        let builder = HybridCacheBuilder::new()
            .with_name("portico")
            .with_metrics_registry(tiers.registry())
            .with_policy(HybridCachePolicy::WriteOnInsertion)
            .with_flush_on_close(true)
            .memory(config.memory_bytes)
            .with_shards(4)
            .with_eviction_config(S3FifoConfig::default())
            .with_weighter(|_: &u128, value: &Stored| 16 + value.0.encoded_len())
            .storage();
        let cache = match &config.disk_dir {
            None => builder.build().await?,
            Some(dir) => {
                let block_size = config.block_size();
                if config.disk_bytes < StoreConfig::disk_needed(config.max_object_bytes) {
                    return Err(StoreError::Config(format!(
                        "disk_bytes {} must hold at least 4 blocks of {block_size} bytes \
                         (the block size follows max_object_bytes)",
                        config.disk_bytes
                    )));
                }
                let device = FsDeviceBuilder::new(dir)
                    .with_capacity(config.disk_bytes)
                    .build()?;
                // One flusher gets the whole buffer pool, so one full block
                // (the largest object) always fits in a flush buffer.
                let engine = BlockEngineConfig::new(device)
                    .with_block_size(block_size)
                    .with_flushers(1)
                    .with_buffer_pool_size(2 * block_size)
                    .with_submit_queue_size_threshold(4 * block_size)
                    .with_tombstone_log(true);
                builder
                    .with_engine_config(engine)
                    .with_recover_mode(RecoverMode::Quiet)
                    .build()
                    .await?
            }
        };
        let opened_ms = unix_ms(now());
        let bans = config
            .disk_dir
            .as_ref()
            .map(|dir| Bans::load(dir, opened_ms));
        let bans_present = bans.as_ref().is_some_and(|b| !b.is_empty());
        Ok(Store {
            cache,
            index: Mutex::new(Index::default()),
            max_object_bytes: config.max_object_bytes,
            last_generation: AtomicU64::new(0),
            last_removal_ms: AtomicU64::new(0),
            opened_ms,
            bans: bans.map(RwLock::new),
            bans_present: AtomicBool::new(bans_present),
            bans_added: AtomicU64::new(0),
            ban_writer: Arc::new(Writer::default()),
            reads: Reads::new(),
            tiers,
        })
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        // The index holds no invariant a panicking holder could break
        // halfway that matters more than serving requests.
        self.index
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reads an entry by full key. Entries of no use any more (see the module doc) are
    /// removed and not returned; unreadable ones are dropped.
    pub async fn get(&self, key: &str) -> Option<Arc<Entry>> {
        let digest = digest(key);
        let found = match self.cache.get(&digest).await {
            Ok(found) => found,
            Err(error) => {
                tracing::warn!(%error, key, "cache entry unreadable; dropped");
                self.remove(key);
                return None;
            }
        };
        let Some(found) = found else {
            self.reads.miss.increment(1);
            return None;
        };
        let entry = found.value().0.clone();
        let from_disk = found.source() != foyer::Source::Memory;
        drop(found);
        // Only an entry stored before the latest removal can be a removed one.
        let removed_after_store =
            self.last_removal_ms.load(Ordering::Acquire) >= entry.response_time_ms;
        if removed_after_store && self.index().removed_since(key, entry.response_time_ms) {
            // A removed entry read back from foyer's write queue.
            self.reads.purged.increment(1);
            self.cache.remove(&digest);
            return None;
        }
        if is_useless(&entry, now()) {
            self.reads.expired.increment(1);
            self.remove(key);
            return None;
        }
        // Judged whatever foyer's source: foyer puts an entry read from
        // disk into memory before it is judged here, so a concurrent read
        // can find it in memory unjudged, and an entry read before a ban
        // stays in memory after it.
        let before_open = entry.response_time_ms < self.opened_ms;
        // Read before the bans are looked at: a ban added after this shows
        // as a change below.
        let bans_seen = self.bans_added.load(Ordering::Acquire);
        let entry = if before_open && self.bans_present.load(Ordering::Acquire) {
            self.apply_bans(key, entry)?
        } else {
            entry
        };
        self.reads.hit.increment(1);
        // What is in memory was indexed when it was stored or read from disk.
        if from_disk {
            self.index().add(key, &entry);
            // A purge that left its ban after the verdict above listed the
            // index before this entry was in it: judge again.
            if before_open && self.bans_added.load(Ordering::Acquire) != bans_seen {
                return self.apply_bans(key, entry);
            }
        }
        Some(entry)
    }

    /// The entry as the bans leave it: itself, a copy marked stale (stored
    /// in its place), or none (removed).
    fn apply_bans(&self, key: &str, entry: Arc<Entry>) -> Option<Arc<Entry>> {
        match self.judge(key, &entry) {
            Verdict::Keep => Some(entry),
            // As a soft purge does: markers and marked entries stay.
            Verdict::Stale if entry.kind != EntryKind::Response || entry.soft_purged => Some(entry),
            Verdict::Stale => {
                let mut marked = Entry::clone(&entry);
                marked.soft_purged = true;
                if is_useless(&marked, now()) {
                    self.remove(key);
                    return None;
                }
                // A purge of the key since it was read wins: the marked
                // copy must not bring it back.
                if self.index().removed_since(key, entry.response_time_ms) {
                    return None;
                }
                let marked = Arc::new(marked);
                self.insert_shared(key.to_owned(), Arc::clone(&marked));
                Some(marked)
            }
            Verdict::Purge => {
                self.reads.purged.increment(1);
                self.remove(key);
                None
            }
        }
    }

    /// What the bans say of an entry from before the store opened.
    fn judge(&self, key: &str, entry: &Entry) -> Verdict {
        let Some(bans) = &self.bans else {
            return Verdict::Keep;
        };
        // Bans are only ever added whole: a panicking holder leaves them
        // usable.
        let bans = bans.read().unwrap_or_else(PoisonError::into_inner);
        bans.judge(key, entry.response_time_ms, |tag| {
            entry.tags().any(|t| t == tag)
        })
    }

    /// Whether prefix and tag purges also leave bans for the entries on disk
    /// from before the store opened (see [`super::bans`]): true with a disk
    /// tier.
    pub fn keeps_bans(&self) -> bool {
        self.bans.is_some()
    }

    /// Records a ban for the entries on disk from before the store opened.
    /// The ban holds from now on; its file is written after the lock is
    /// released, off the async threads (see [`Store::save_bans`]).
    fn ban(&self, soft: bool, target: Target) {
        let Some(bans) = &self.bans else {
            return;
        };
        // A soft ban also covers what this run stored until now: the marked
        // copies a soft purge writes go to disk best effort, and after a
        // restart an unmarked one found there must still read as stale.
        let before_ms = if soft {
            unix_ms(now()).max(self.opened_ms)
        } else {
            self.opened_ms
        };
        let ban = Ban {
            before_ms,
            soft,
            target,
        };
        let snapshot = {
            let mut bans = bans.write().unwrap_or_else(PoisonError::into_inner);
            let snapshot = bans.record(ban);
            self.bans_present.store(true, Ordering::Release);
            snapshot
        };
        // Before the purge lists the index (see `get`).
        self.bans_added.fetch_add(1, Ordering::AcqRel);
        if let Some(snapshot) = snapshot {
            self.save_bans(snapshot);
        }
    }

    /// Writes the ban file from `snapshot` on tokio's blocking threads,
    /// or in place outside a runtime. Not awaited: [`Store::close`] writes
    /// whatever is still pending.
    fn save_bans(&self, snapshot: Snapshot) {
        let writer = Arc::clone(&self.ban_writer);
        let write = move || {
            if let Err(error) = writer.write(&snapshot) {
                tracing::error!(%error, "cache ban not saved: it holds until the next restart only");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(write)),
            Err(_) => write(),
        }
    }

    /// Writes the latest bans unless they are on disk already, waiting
    /// for a write in progress.
    async fn flush_bans(&self) -> Result<(), StoreError> {
        let Some(bans) = &self.bans else {
            return Ok(());
        };
        // The guard goes before the write is awaited.
        let snapshot = bans
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .snapshot();
        let Some(snapshot) = snapshot else {
            return Ok(());
        };
        let writer = Arc::clone(&self.ban_writer);
        let write = move || writer.write(&snapshot);
        let written = match tokio::runtime::Handle::try_current() {
            Ok(runtime) => runtime
                .spawn_blocking(write)
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e))),
            Err(_) => write(),
        };
        written.map_err(StoreError::Bans)
    }

    /// Stores an entry under a full key. Returns false (and stores nothing)
    /// when its encoding exceeds `max_object_bytes`.
    pub fn insert(&self, key: String, entry: Entry) -> bool {
        self.insert_shared(key, Arc::new(entry))
    }

    /// [`Store::insert`] for an entry that is already shared.
    fn insert_shared(&self, key: String, entry: Arc<Entry>) -> bool {
        if entry.encoded_len() > self.max_object_bytes {
            metrics::counter!("portico_cache_stores_total", "result" => "too-large").increment(1);
            return false;
        }
        {
            let mut index = self.index();
            // The new entry replaces any queued removed one in foyer too.
            index.removed.remove(&key);
            index.add(&key, &entry);
        }
        self.cache.insert(digest(&key), Stored(entry));
        metrics::counter!("portico_cache_stores_total", "result" => "stored").increment(1);
        true
    }

    /// Removes one full key, from memory and disk (a tombstone on disk).
    pub fn remove(&self, key: &str) {
        let at = u64::try_from(
            now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis(),
        )
        .unwrap_or(u64::MAX);
        self.index().remove(key, at);
        self.last_removal_ms.fetch_max(at, Ordering::AcqRel);
        self.cache.remove(&digest(key));
    }

    /// Finds the stored response for a request: the plain response under
    /// `primary`, or the variant matching the request's `Vary` fields.
    pub async fn lookup(&self, primary: &str, request: &HeaderMap) -> Lookup {
        let Some(root) = self.get(&root_key(primary)).await else {
            return Lookup::Miss;
        };
        if root.kind == EntryKind::Response {
            return Lookup::Hit(root);
        }
        let secondary = secondary_key_of(root.vary_names(), request);
        match self
            .get(&variant_key(primary, root.generation, &secondary))
            .await
        {
            Some(entry)
                if entry.kind == EntryKind::Response
                    && entry.generation == root.generation
                    && entry.same_vary(&root) =>
            {
                Lookup::Hit(entry)
            }
            _ => Lookup::VaryMiss,
        }
    }

    /// Stores a response under `primary`, as the plain response when it
    /// does not vary, else as a variant (writing or extending the vary
    /// marker). Returns false when it was too large to store.
    pub async fn store_response(&self, primary: &str, entry: Entry) -> bool {
        self.store_response_shared(primary, entry).await.1
    }

    /// [`Store::store_response`], also returning the entry as stored, shared
    /// with the store (a response served from it costs no second copy).
    pub async fn store_response_shared(
        &self,
        primary: &str,
        mut entry: Entry,
    ) -> (Arc<Entry>, bool) {
        let root = root_key(primary);
        if entry.vary_is_empty() {
            entry.generation = 0;
            let entry = Arc::new(entry);
            return (Arc::clone(&entry), self.insert_shared(root, entry));
        }
        if entry.encoded_len() > self.max_object_bytes {
            // Refused (and counted) by `insert`, before any marker is written.
            let entry = Arc::new(entry);
            return (Arc::clone(&entry), self.insert_shared(root, entry));
        }
        let marker = match self.get(&root).await {
            Some(m) if m.kind == EntryKind::VaryMarker && m.same_vary(&entry) => Some(m),
            _ => None,
        };
        let generation = marker
            .as_ref()
            .map_or_else(|| self.new_generation(), |m| m.generation);
        entry.generation = generation;
        let needs_marker = marker
            .as_ref()
            .is_none_or(|m| useless_after_ms(m) < useless_after_ms(&entry));
        let key = variant_key(primary, generation, entry.secondary_key());
        if needs_marker {
            let marker = Entry::vary_marker(&entry, generation);
            self.insert(root, marker);
        }
        let entry = Arc::new(entry);
        (Arc::clone(&entry), self.insert_shared(key, entry))
    }

    fn new_generation(&self) -> u64 {
        let clock = u64::try_from(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        )
        .unwrap_or(u64::MAX);
        let mut last = self.last_generation.load(Ordering::Relaxed);
        loop {
            let next = clock.max(last + 1);
            match self.last_generation.compare_exchange(
                last,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }

    /// Removes everything stored under `primary`: the plain response or
    /// marker, and every variant. Returns how many keys were removed.
    pub fn purge(&self, primary: &str) -> usize {
        let root = root_key(primary);
        let mut keys = self.index().with_prefix(&root);
        if !keys.contains(&root) {
            keys.push(root);
        }
        self.remove_all(keys, "key")
    }

    /// Removes every key that starts with `prefix`. Returns how many known
    /// keys were removed; entries on disk from before the store opened are
    /// removed when read (see the module doc).
    pub fn purge_prefix(&self, prefix: &str) -> usize {
        self.ban(false, Target::Prefix(prefix.to_owned()));
        let keys = self.index().with_prefix(prefix);
        self.remove_all(keys, "prefix")
    }

    /// Removes every entry tagged `tag`, as [`Store::purge_prefix`] does.
    pub fn purge_tag(&self, tag: &str) -> usize {
        self.ban(false, Target::Tag(tag.to_owned()));
        let keys = self.index().with_tag(tag);
        self.remove_all(keys, "tag")
    }

    fn remove_all(&self, keys: Vec<String>, kind: &'static str) -> usize {
        let count = keys.len();
        for key in &keys {
            self.remove(key);
        }
        metrics::counter!("portico_cache_purges_total", "kind" => kind).increment(count as u64);
        count
    }

    /// Marks every response under `primary` stale (keeping its stale
    /// windows). Returns how many entries were marked.
    pub async fn soft_purge(&self, primary: &str) -> usize {
        let root = root_key(primary);
        // Variants on disk from before the store opened are not known.
        self.ban(true, Target::Prefix(root.clone()));
        let mut keys = self.index().with_prefix(&root);
        if !keys.contains(&root) {
            keys.push(root);
        }
        self.soft_purge_all(keys).await
    }

    /// Marks every known entry tagged `tag` stale.
    pub async fn soft_purge_tag(&self, tag: &str) -> usize {
        self.ban(true, Target::Tag(tag.to_owned()));
        let keys = self.index().with_tag(tag);
        self.soft_purge_all(keys).await
    }

    /// Marks every entry whose key starts with `prefix` stale.
    pub async fn soft_purge_prefix(&self, prefix: &str) -> usize {
        self.ban(true, Target::Prefix(prefix.to_owned()));
        let keys = self.index().with_prefix(prefix);
        self.soft_purge_all(keys).await
    }

    async fn soft_purge_all(&self, keys: Vec<String>) -> usize {
        let mut count = 0;
        for key in keys {
            let Some(entry) = self.get(&key).await else {
                continue;
            };
            if entry.kind != EntryKind::Response || entry.soft_purged {
                continue;
            }
            let mut marked = Entry::clone(&entry);
            marked.soft_purged = true;
            if is_useless(&marked, now()) {
                self.remove(&key);
            } else {
                self.insert(key, marked);
            }
            count += 1;
        }
        metrics::counter!("portico_cache_purges_total", "kind" => "soft").increment(count as u64);
        count
    }

    /// Sets the gauges and counters of the tiers (evictions, bytes and
    /// objects in memory and on disk, disk write drops) for a scrape of
    /// `/metrics`: they are read from foyer here, not on the request path.
    pub fn publish_metrics(&self) {
        let memory = self.cache.memory();
        self.tiers.publish(tiers::Memory {
            bytes: memory.usage() as u64,
            objects: memory.entries() as u64,
        });
    }

    /// The memory tier's capacity in bytes.
    pub fn memory_capacity(&self) -> usize {
        self.cache.memory().capacity()
    }

    /// Flushes the memory tier and the bans to disk and closes the store.
    pub async fn close(&self) -> Result<(), StoreError> {
        let bans = self.flush_bans().await;
        self.cache.close().await?;
        bans
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::bans;
    use crate::cache::control::{response_directives, Overrides, DEFAULT_HEURISTIC_MAX};
    use crate::cache::entry::Received;
    use http::{header, HeaderValue, StatusCode};
    use std::path::Path;

    fn on_disk(dir: &Path) -> StoreConfig {
        StoreConfig {
            memory_bytes: 1 << 20,
            disk_dir: Some(dir.to_path_buf()),
            disk_bytes: 64 << 20,
            max_object_bytes: 1 << 20,
        }
    }

    /// A response fresh for an hour (and usable stale for another), tagged.
    fn tagged(tag: &str) -> Entry {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("max-age=3600, stale-while-revalidate=3600"),
        );
        headers.insert("surrogate-key", HeaderValue::from_str(tag).unwrap());
        let directives = response_directives(&headers, &[]);
        let now = SystemTime::now();
        Entry::from_response(
            Received {
                status: StatusCode::OK,
                headers,
                body: tag.as_bytes().to_vec(),
                request_headers: &HeaderMap::new(),
                request_time: now,
                response_time: now,
            },
            &directives,
            &Overrides::default(),
            DEFAULT_HEURISTIC_MAX,
        )
        .unwrap()
    }

    /// A store over `dir` holding `entries` (key, tag) from before it
    /// opened.
    async fn reopened(dir: &Path, entries: &[(&str, &str)]) -> Store {
        let store = Store::open(on_disk(dir)).await.unwrap();
        for (key, tag) in entries {
            assert!(store.insert(root_key(key), tagged(tag)));
        }
        store.close().await.unwrap();
        drop(store);
        // The next store opens strictly later than these entries arrived.
        tokio::time::sleep(Duration::from_millis(5)).await;
        Store::open(on_disk(dir)).await.unwrap()
    }

    #[tokio::test]
    async fn a_soft_purge_holds_after_a_restart_even_if_its_marked_copy_was_lost() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(on_disk(dir.path())).await.unwrap();
        let entry = tagged("news");
        assert!(store.insert(root_key("/blog/2"), entry.clone()));
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(store.soft_purge_tag("news").await, 1);
        // The marked copy's disk write is best effort: stand for one that
        // was dropped by putting the unmarked entry back.
        assert!(store.insert(root_key("/blog/2"), entry));
        store.close().await.unwrap();
        drop(store);
        tokio::time::sleep(Duration::from_millis(5)).await;
        let store = Store::open(on_disk(dir.path())).await.unwrap();
        let got = store.get(&root_key("/blog/2")).await.unwrap();
        assert!(got.soft_purged, "still stale after the restart");
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn entries_from_before_opening_are_judged_when_foyer_serves_them_from_memory() {
        let dir = tempfile::tempdir().unwrap();
        let store = reopened(
            dir.path(),
            &[
                ("/shop/1", "red"),
                ("/blog/1", "news"),
                ("/keep/1", "green"),
            ],
        )
        .await;
        // Nothing was read since opening: the purges reach no indexed
        // entry and leave bans.
        assert_eq!(store.purge_prefix("/shop/"), 0);
        assert_eq!(store.soft_purge_tag("news").await, 0);
        // foyer moves what it reads from disk into memory before `get` has
        // judged it; a concurrent read then finds it in memory. Reading
        // through foyer alone stages that gap.
        for key in ["/shop/1", "/blog/1"] {
            let digest = digest(&root_key(key));
            let first = store.cache.get(&digest).await.unwrap().unwrap();
            assert_ne!(first.source(), foyer::Source::Memory, "{key}");
            drop(first);
            let again = store.cache.get(&digest).await.unwrap().unwrap();
            assert_eq!(again.source(), foyer::Source::Memory, "{key}");
        }
        assert!(store.get(&root_key("/shop/1")).await.is_none());
        let soft = store.get(&root_key("/blog/1")).await.unwrap();
        assert!(soft.soft_purged, "a soft ban marks the entry stale");

        // Read (and so indexed, and in memory) before a ban that reaches
        // it only as a ban, as when the purge listed the index before this
        // read added the entry.
        assert!(store.get(&root_key("/keep/1")).await.is_some());
        store.ban(false, Target::Tag("green".into()));
        assert!(store.get(&root_key("/keep/1")).await.is_none());
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn closing_writes_bans_whose_write_has_not_run_yet() {
        let dir = tempfile::tempdir().unwrap();
        let store = reopened(dir.path(), &[("/a", "x")]).await;
        // As `ban` does, with the write it hands to a blocking thread not
        // run yet.
        let ban = Ban {
            before_ms: store.opened_ms,
            soft: false,
            target: Target::Prefix("/a".into()),
        };
        let pending = store.bans.as_ref().unwrap().write().unwrap().record(ban);
        assert!(pending.is_some());
        store.close().await.unwrap();
        drop(store);
        let bans = bans::Bans::load(dir.path(), unix_ms(now()));
        assert_eq!(bans.len(), 1);
        let store = Store::open(on_disk(dir.path())).await.unwrap();
        assert!(store.get(&root_key("/a")).await.is_none());
        store.close().await.unwrap();
    }

    #[test]
    fn digests_are_sha256_truncated_and_stable() {
        // SHA-256("abc") starts ba7816bf 8f01cfea 414140de 5dae2223: entries
        // on disk are found again only if this never changes.
        assert_eq!(digest("abc"), 0x2322_ae5d_de40_4141_eacf_018f_bf16_78ba);
        assert_ne!(digest(&root_key("/a")), digest(&root_key("/b")));
        assert_ne!(digest("/a\0"), digest("/a"));
    }
}
