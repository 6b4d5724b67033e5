//! Where results land. [`AtomStore`] is the contract; [`embedded`] keeps
//! tables as Parquet files queried with DataFusion SQL, and ClickHouse
//! implements the same contract.

pub mod embedded;
pub mod clickhouse;
pub mod status;

use std::collections::{HashMap, HashSet};

use futures::future::BoxFuture;

use crate::atom::{ArrivalOutcome, ArrivalRow, AtomRow, ContentHash, SourcePosition};
use crate::outcome::{Classify, ErrorClass};

pub use crate::dead_letter::{DeadLetterArchive, DeadLetterRow};
pub use status::{RequestLookup, RequestStatus};
use crate::inference::{CompensationRow, OutputRow, Recalled, ResultRow, Retracted};

/// The ensemble-inference store contract: results, every model's output,
/// and the state of compensations. Every write is idempotent by key (the
/// request's source position, plus the model id for outputs): writing a
/// row again changes nothing, and a row with a higher `version` replaces a
/// lower one (a retraction, `deleted = 1`, is version 2; live rows are 1).
/// When a call returns `Ok` its rows are durable.
///
/// - `retract` writes the retraction of the result and of the outputs of
///   `models` for the request at `position` (its rows carry `trace_id`, the
///   compensation's trace), and says how many of those were
///   live before (so a repeated retraction reports what the first one did
///   only if nothing was retracted in between: callers keep the first
///   report, see `inference_compensations`).
/// - `compensations` returns the furthest recorded step per position.
/// - `recall` tells, per position, how the request was answered before: its
///   recorded compensation, else its live result with its live outputs.
pub trait InferenceStore: Send + Sync + 'static {
    fn insert_outputs<'a>(&'a self, rows: &'a [OutputRow]) -> BoxFuture<'a, Result<(), StoreError>>;
    fn insert_results<'a>(&'a self, rows: &'a [ResultRow]) -> BoxFuture<'a, Result<(), StoreError>>;
    fn retract<'a>(&'a self, position: &'a SourcePosition, correlation_id: &'a str, models: &'a [String], trace_id: &'a str) -> BoxFuture<'a, Result<Retracted, StoreError>>;
    fn compensations<'a>(&'a self, positions: &'a [SourcePosition]) -> BoxFuture<'a, Result<HashMap<SourcePosition, CompensationRow>, StoreError>>;
    fn record_compensations<'a>(&'a self, rows: &'a [CompensationRow]) -> BoxFuture<'a, Result<(), StoreError>>;
    fn recall<'a>(&'a self, positions: &'a [SourcePosition]) -> BoxFuture<'a, Result<HashMap<SourcePosition, Recalled>, StoreError>>;
}

/// What an insert did. `inserted + already_present` equals the rows given.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InsertReport {
    pub inserted: usize,
    pub already_present: usize,
}

/// The atom store contract. Every store also archives dead letters
/// ([`DeadLetterArchive`]), so one connection serves both.
///
/// - `find_atoms` answers for a whole window at once (`hash IN (...)`): for
///   every stored hash, the source positions of its stored rows (normally
///   one; a second until a merge when two writers raced). The dedup stage
///   tells a redelivery of the request that created an atom (its own
///   position is there) from a repeat of the content (it is not).
/// - `insert_atoms` is idempotent by content hash: a row whose hash is already
///   stored, or that repeats within the call, is not written twice. When it
///   returns `Ok` the rows are durable, and only then may their source offsets
///   be committed.
/// - `arrival_outcomes` returns the recorded outcome of each given position
///   that has an arrival row; `insert_arrivals` is idempotent by source
///   position (at most one row per position under `FINAL`; the first written
///   wins). An arrival row is written only after the atom it names is stored,
///   so an arrival that says `created` always has its atom.
pub trait AtomStore: DeadLetterArchive {
    fn find_atoms<'a>(&'a self, hashes: &'a [ContentHash]) -> BoxFuture<'a, Result<HashMap<ContentHash, Vec<SourcePosition>>, StoreError>>;
    fn insert_atoms<'a>(&'a self, rows: &'a [AtomRow]) -> BoxFuture<'a, Result<InsertReport, StoreError>>;
    fn arrival_outcomes<'a>(&'a self, positions: &'a [SourcePosition]) -> BoxFuture<'a, Result<HashMap<SourcePosition, ArrivalOutcome>, StoreError>>;
    fn insert_arrivals<'a>(&'a self, rows: &'a [ArrivalRow]) -> BoxFuture<'a, Result<InsertReport, StoreError>>;

    /// [`insert_atoms`](Self::insert_atoms) for rows whose hashes a
    /// `find_atoms` of this store found absent moments ago (the dedup
    /// stage's look-up of the same window, which also holds back repeats
    /// in flight). A store may skip its own existence check for them, which
    /// saves ClickHouse a second look-up per window. If another writer
    /// stored one in between, the duplicate is the engine's to merge, as in
    /// any race between two writers (one row per hash under `FINAL`). A
    /// retry after an error must use `insert_atoms`: the failed attempt may
    /// have stored the rows.
    fn insert_new_atoms<'a>(&'a self, rows: &'a [AtomRow]) -> BoxFuture<'a, Result<InsertReport, StoreError>> {
        self.insert_atoms(rows)
    }

    /// [`insert_arrivals`](Self::insert_arrivals) for positions known to
    /// have no arrival row: looked up and found unrecorded, or holding a
    /// content that was not stored (an arrival is written only after its
    /// atom). The same terms as [`insert_new_atoms`](Self::insert_new_atoms).
    fn insert_new_arrivals<'a>(&'a self, rows: &'a [ArrivalRow]) -> BoxFuture<'a, Result<InsertReport, StoreError>> {
        self.insert_arrivals(rows)
    }

    /// The subset of `hashes` that is stored.
    fn existing_hashes<'a>(&'a self, hashes: &'a [ContentHash]) -> BoxFuture<'a, Result<HashSet<ContentHash>, StoreError>> {
        Box::pin(async move { Ok(self.find_atoms(hashes).await?.into_keys().collect()) })
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// I/O or connection trouble that may pass.
    #[error("store temporarily unavailable: {0}")]
    Unavailable(String),
    /// One row can never be written (the message says which and why).
    #[error("row rejected by the store: {0}")]
    RowRejected(String),
    /// The store cannot be used at all (bad path, permissions, schema mismatch).
    #[error("store unusable: {0}")]
    Fatal(String),
}

impl Classify for StoreError {
    fn class(&self) -> ErrorClass {
        match self {
            StoreError::Unavailable(_) => ErrorClass::Retry,
            StoreError::RowRejected(_) => ErrorClass::Invalid,
            StoreError::Fatal(_) => ErrorClass::Fatal,
        }
    }
}
