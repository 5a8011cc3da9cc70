//! The HTTP cache: what may be stored, for how long, and how it is kept.
//!
//! - [`control`]: pure RFC 9111 / 5861 / 9213 / 9211 decisions (storability,
//!   freshness, age, reuse, conditional requests, revalidation, `Vary`,
//!   `Cache-Status`).
//! - [`entry`]: the stored value and its checked binary encoding.
//! - [`store`]: the hybrid memory and disk store (foyer), purges by key,
//!   prefix and tag, soft purges, and `Vary` variants.
//! - [`coalesce`]: one origin request per key at a time, and hit-for-miss.
//! - [`date`]: HTTP-date parsing used by the decisions above.
//!
//! The request pipeline asks [`store::Store::lookup`], judges the entry with
//! [`control::evaluate_reuse`], and on a miss goes through a
//! [`coalesce::Coalescer`] to the origin, then stores what
//! [`control::storable`] allows.

pub mod bans;
pub mod coalesce;
pub mod control;
pub mod date;
pub mod entry;
pub mod store;

pub use coalesce::{Coalescer, Leader, Outcome, Role};
pub use control::{CacheStatus, Forward, NotStorable, Overrides, Reuse, Staleness};
pub use entry::{Entry, EntryError};
pub use store::{Lookup, Store, StoreConfig, StoreError};
