//! Purges by prefix and by tag that must reach entries stored before a
//! restart.
//!
//! The purge index knows only the entries written or read since the store
//! opened; foyer files entries under digests, so the keys of what was on
//! disk before cannot be listed. A prefix or tag purge therefore also leaves
//! a ban: a rule that any entry stored before the store opened, read from
//! disk later, is tested against (its key for a prefix, its tags for a tag)
//! and purged (or, for a soft purge, marked stale) when it matches. Entries
//! stored or read since the store opened need no ban: the index reached
//! them when the purge ran.
//!
//! Bans are kept in a small file in the cache directory, rewritten whole
//! (written aside, synced, renamed) on every new ban, so they outlive the
//! next restart too. The bans are changed in memory under the store's
//! lock; the file is written from a [`Snapshot`] taken there, by a
//! [`Writer`] after the lock is released, so that reads judged against the
//! bans never wait for the disk. Snapshots carry a generation: a slow write
//! of an older one never replaces a newer file.
//!
//! Nothing tells when the last entry a ban could match is gone, so bans
//! are kept up to [`MAX_BANS`]; past that, the oldest are folded into a
//! floor: every entry stored before it counts as purged. That purges more
//! than was asked, never less. A ban file that cannot be read is treated
//! the same way, with the floor at the time the store opened.
//!
//! File format, one item per line: `floor MS` and
//! `ban BEFORE_MS SOFT prefix|tag HEX`, where `BEFORE_MS` is when the store
//! that made the ban opened, `SOFT` is 0 or 1 and `HEX` the prefix or tag
//! in hexadecimal.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

/// Most bans kept before the oldest are folded into the floor.
pub const MAX_BANS: usize = 1024;

/// File name of the bans in the cache directory.
pub const FILE_NAME: &str = "portico-bans";

/// What a ban matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Keys that start with this prefix.
    Prefix(String),
    /// Entries carrying this tag.
    Tag(String),
}

/// One ban.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ban {
    /// It applies to entries that arrived before this time (Unix
    /// milliseconds): when the store that made it opened.
    pub before_ms: u64,
    /// Mark stale instead of removing.
    pub soft: bool,
    /// What it matches.
    pub target: Target,
}

/// What a ban decides for an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No ban matches.
    Keep,
    /// A soft ban matches: serve only as stale.
    Stale,
    /// A ban (or the floor) removes it.
    Purge,
}

/// The bans of a store, and where they are kept.
#[derive(Debug, Default)]
pub struct Bans {
    /// Entries that arrived before this time are purged.
    floor_ms: u64,
    bans: Vec<Ban>,
    file: Option<PathBuf>,
    /// Bumped on every change since the bans were loaded (see [`Snapshot`]).
    generation: u64,
}

/// The bans as their file is to hold them, taken under the lock that
/// guards them and written after it is released (see [`Writer`]).
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Which change of the bans this is; a later one is greater.
    generation: u64,
    text: String,
    file: PathBuf,
}

/// Writes [`Snapshot`]s of one ban file, in order: a snapshot older than
/// the one last written is skipped, so a write that was overtaken never
/// replaces newer bans with older ones.
#[derive(Debug, Default)]
pub struct Writer {
    /// Generation of the snapshot last written. The lock is held across
    /// the write, so writes never interleave.
    written: Mutex<u64>,
}

impl Writer {
    /// Writes `snapshot` unless a snapshot as new or newer was written
    /// already. Blocks on disk I/O: call it off the async threads.
    pub fn write(&self, snapshot: &Snapshot) -> std::io::Result<()> {
        // The generation is only set after a whole write, so it is right
        // even when a writer panicked mid-write.
        let mut written = self.written.lock().unwrap_or_else(PoisonError::into_inner);
        if snapshot.generation <= *written {
            return Ok(());
        }
        snapshot.write_file()?;
        *written = snapshot.generation;
        Ok(())
    }
}

impl Snapshot {
    /// Which change of the bans this snapshot holds.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn write_file(&self) -> std::io::Result<()> {
        let aside = self.file.with_extension("new");
        let mut out = std::fs::File::create(&aside)?;
        out.write_all(self.text.as_bytes())?;
        out.sync_all()?;
        std::fs::rename(&aside, &self.file)?;
        // The rename itself must reach the disk, or a crash loses the ban.
        if let Some(dir) = self.file.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

impl Bans {
    /// The bans kept in `dir` (none when there is no file yet). A file that
    /// cannot be read or parsed puts the floor at `opened_ms`: everything
    /// stored before is purged rather than risk serving what was purged.
    pub fn load(dir: &Path, opened_ms: u64) -> Bans {
        let file = dir.join(FILE_NAME);
        let mut bans = Bans {
            file: Some(file.clone()),
            ..Bans::default()
        };
        let text = match std::fs::read_to_string(&file) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return bans,
            Err(error) => {
                tracing::error!(%error, file = %file.display(), "cache bans unreadable; entries stored before now count as purged");
                bans.floor_ms = opened_ms;
                return bans;
            }
        };
        match parse(&text) {
            Some((floor_ms, list)) => {
                bans.floor_ms = floor_ms;
                bans.bans = list;
            }
            None => {
                tracing::error!(file = %file.display(), "cache bans malformed; entries stored before now count as purged");
                bans.floor_ms = opened_ms;
            }
        }
        bans
    }

    /// Whether no entry can be banned.
    pub fn is_empty(&self) -> bool {
        self.floor_ms == 0 && self.bans.is_empty()
    }

    /// How many bans are kept (the floor aside).
    pub fn len(&self) -> usize {
        self.bans.len()
    }

    /// The verdict for an entry stored under `key` that arrived at
    /// `arrived_ms`; `has_tag` tells whether it carries a tag (asked only
    /// of tag bans, so that an entry's tags need not be collected).
    pub fn judge(&self, key: &str, arrived_ms: u64, has_tag: impl Fn(&str) -> bool) -> Verdict {
        if arrived_ms < self.floor_ms {
            return Verdict::Purge;
        }
        let mut verdict = Verdict::Keep;
        for ban in self.bans.iter().filter(|b| arrived_ms < b.before_ms) {
            let hit = match &ban.target {
                Target::Prefix(prefix) => key.starts_with(prefix.as_str()),
                Target::Tag(tag) => has_tag(tag),
            };
            if hit {
                if !ban.soft {
                    return Verdict::Purge;
                }
                verdict = Verdict::Stale;
            }
        }
        verdict
    }

    /// Adds a ban in memory. Past [`MAX_BANS`], the oldest bans become
    /// the floor. Returns what the file is to hold now, when the bans
    /// changed and are kept in a file; write it with a [`Writer`].
    /// A repeat of a kept ban (same target, same store) adds nothing; a
    /// hard repeat of a soft ban hardens it. Sites that purge the same tag
    /// on every publish then keep one ban per tag and restart, not one per
    /// purge.
    pub fn record(&mut self, ban: Ban) -> Option<Snapshot> {
        if let Some(kept) = self
            .bans
            .iter_mut()
            .find(|b| b.before_ms == ban.before_ms && b.target == ban.target)
        {
            if kept.soft && !ban.soft {
                kept.soft = false;
                self.generation += 1;
                return self.snapshot();
            }
            return None;
        }
        self.bans.push(ban);
        if self.bans.len() > MAX_BANS {
            let folded = self.bans.len() - MAX_BANS;
            for old in self.bans.drain(..folded) {
                self.floor_ms = self.floor_ms.max(old.before_ms);
            }
        }
        self.generation += 1;
        self.snapshot()
    }

    /// What the file is to hold now; none when the bans are not kept in a
    /// file or have not changed since they were loaded.
    pub fn snapshot(&self) -> Option<Snapshot> {
        let file = self.file.as_ref()?;
        if self.generation == 0 {
            return None;
        }
        let mut text = format!("floor {}\n", self.floor_ms);
        for ban in &self.bans {
            let (kind, value) = match &ban.target {
                Target::Prefix(p) => ("prefix", p),
                Target::Tag(t) => ("tag", t),
            };
            let _ = write!(text, "ban {} {} {kind} ", ban.before_ms, u8::from(ban.soft));
            for b in value.bytes() {
                let _ = write!(text, "{b:02x}");
            }
            text.push('\n');
        }
        Some(Snapshot {
            generation: self.generation,
            text,
            file: file.clone(),
        })
    }
}

fn parse(text: &str) -> Option<(u64, Vec<Ban>)> {
    let mut floor = 0;
    let mut bans = Vec::new();
    for line in text.lines() {
        let mut words = line.split(' ');
        match words.next()? {
            "floor" => floor = words.next()?.parse().ok()?,
            "ban" => {
                let before_ms = words.next()?.parse().ok()?;
                let soft = match words.next()? {
                    "0" => false,
                    "1" => true,
                    _ => return None,
                };
                let kind = words.next()?;
                let value = unhex(words.next()?)?;
                let target = match kind {
                    "prefix" => Target::Prefix(value),
                    "tag" => Target::Tag(value),
                    _ => return None,
                };
                bans.push(Ban {
                    before_ms,
                    soft,
                    target,
                });
            }
            _ => return None,
        }
        if words.next().is_some() {
            return None;
        }
    }
    Some((floor, bans))
}

fn unhex(hex: &str) -> Option<String> {
    if hex.len() % 2 != 0 {
        return None;
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Bans {
        /// [`Bans::record`] and a write in place.
        fn add(&mut self, ban: Ban) -> std::io::Result<()> {
            match self.record(ban) {
                Some(snapshot) => snapshot.write_file(),
                None => Ok(()),
            }
        }

        fn judge_tags(&self, key: &str, arrived_ms: u64, tags: &[&str]) -> Verdict {
            self.judge(key, arrived_ms, |tag| tags.contains(&tag))
        }
    }

    fn ban(before_ms: u64, soft: bool, target: Target) -> Ban {
        Ban {
            before_ms,
            soft,
            target,
        }
    }

    #[test]
    fn judges_by_prefix_tag_time_and_softness() {
        let mut bans = Bans::default();
        bans.add(ban(100, false, Target::Prefix("a.example/shop/".into())))
            .unwrap();
        bans.add(ban(100, true, Target::Tag("news".into())))
            .unwrap();
        let table: &[(&str, u64, &[&str], Verdict)] = &[
            ("a.example/shop/1\0", 99, &[], Verdict::Purge),
            // Arrived after the store that made the ban opened: the index
            // reached it then.
            ("a.example/shop/1\0", 100, &[], Verdict::Keep),
            ("a.example/blog/1\0", 99, &[], Verdict::Keep),
            ("a.example/blog/1\0", 99, &["news"], Verdict::Stale),
            ("a.example/shop/2\0", 50, &["news"], Verdict::Purge),
        ];
        for (key, at, tags, want) in table {
            assert_eq!(bans.judge_tags(key, *at, tags), *want, "{key} {at}");
        }
        assert_eq!(bans.judge_tags("x", 1, &[]), Verdict::Keep);
    }

    #[test]
    fn repeated_bans_are_kept_once_and_a_hard_repeat_hardens() {
        let dir = tempfile::tempdir().unwrap();
        let mut bans = Bans::load(dir.path(), 1_000);
        for _ in 0..3 {
            bans.add(ban(100, true, Target::Tag("news".into())))
                .unwrap();
        }
        assert_eq!(bans.len(), 1);
        assert_eq!(bans.judge_tags("k", 50, &["news"]), Verdict::Stale);
        bans.add(ban(100, false, Target::Tag("news".into())))
            .unwrap();
        assert_eq!(bans.len(), 1);
        assert_eq!(bans.judge_tags("k", 50, &["news"]), Verdict::Purge);
        // A ban of a later store is another ban.
        bans.add(ban(200, false, Target::Tag("news".into())))
            .unwrap();
        assert_eq!(bans.len(), 2);
        assert_eq!(Bans::load(dir.path(), 3_000).len(), 2);
    }

    #[test]
    fn survive_a_reload_and_fold_into_the_floor() {
        let dir = tempfile::tempdir().unwrap();
        let mut bans = Bans::load(dir.path(), 1_000);
        assert!(bans.is_empty());
        bans.add(ban(500, true, Target::Tag("odd tag\nwith newline".into())))
            .unwrap();
        bans.add(ban(600, false, Target::Prefix("h/p ".into())))
            .unwrap();
        let again = Bans::load(dir.path(), 2_000);
        assert_eq!(again.bans, bans.bans);
        assert_eq!(again.floor_ms, 0);

        let mut many = Bans::load(dir.path(), 2_000);
        for i in 0..MAX_BANS as u64 {
            many.add(ban(700 + i, false, Target::Tag(format!("t{i}"))))
                .unwrap();
        }
        assert_eq!(many.len(), MAX_BANS);
        // The two oldest bans (500 and 600) were folded: everything that
        // arrived before 600 is purged, whatever its key or tags.
        assert_eq!(many.floor_ms, 600);
        assert_eq!(many.judge_tags("any", 599, &[]), Verdict::Purge);
        assert_eq!(many.judge_tags("any", 600, &[]), Verdict::Keep);
        assert_eq!(Bans::load(dir.path(), 3_000).floor_ms, 600);
    }

    #[test]
    fn an_unreadable_file_purges_everything_stored_before_opening() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), "ban 5 2 prefix zz\n").unwrap();
        let bans = Bans::load(dir.path(), 1_234);
        assert_eq!(bans.judge_tags("k", 1_233, &[]), Verdict::Purge);
        assert_eq!(bans.judge_tags("k", 1_234, &[]), Verdict::Keep);
    }

    #[test]
    fn a_snapshot_overtaken_by_a_newer_one_is_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut bans = Bans::load(dir.path(), 1_000);
        assert!(bans.snapshot().is_none(), "nothing changed since loading");
        let older = bans
            .record(ban(100, false, Target::Prefix("a/".into())))
            .unwrap();
        let newer = bans
            .record(ban(100, false, Target::Tag("t".into())))
            .unwrap();
        assert!(newer.generation() > older.generation());
        assert!(
            bans.record(ban(100, false, Target::Tag("t".into())))
                .is_none(),
            "a repeat changes nothing"
        );
        let writer = Writer::default();
        writer.write(&newer).unwrap();
        // The older write arrives late, as a slow blocking task would.
        writer.write(&older).unwrap();
        let again = Bans::load(dir.path(), 2_000);
        assert_eq!(again.bans, bans.bans);
        assert_eq!(again.judge_tags("k", 50, &["t"]), Verdict::Purge);
    }
}
