//! The Parquet part files on disk: each table's directory and writer lock, and
//! writing a part crash-safely (temp file, fsync, rename, fsync the directory).

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use tokio::sync::{Mutex, OwnedMutexGuard};

use super::error::{io_error, parquet_error};
use crate::store::StoreError;

pub(super) const PART_PREFIX: &str = "part-";
pub(super) const PART_SUFFIX: &str = ".parquet";
const TEMP_PREFIX: &str = ".part-";
pub(super) const TEMP_SUFFIX: &str = ".tmp";

/// One table directory and its writer lock.
#[derive(Clone)]
pub(super) struct Table {
    pub(super) name: &'static str,
    pub(super) dir: PathBuf,
    pub(super) schema: SchemaRef,
    /// The next part sequence number. Locked for a whole write, and released
    /// only once the file is in place and the in-memory keys are updated.
    pub(super) writer: Arc<Mutex<u64>>,
    /// Held by the one compaction of this table that may run at a time.
    pub(super) compacting: Arc<Mutex<()>>,
}

/// One part file and the sequence numbers it holds: `first == last` for a
/// part written by an insert, a range for a merged part (`compact.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Part {
    pub(super) path: PathBuf,
    pub(super) first: u64,
    pub(super) last: u64,
    pub(super) bytes: u64,
}

impl Part {
    fn covers(&self, other: &Part) -> bool {
        self.first <= other.first && other.last <= self.last && (self.first, self.last) != (other.first, other.last)
    }
}

/// The parts not covered by another part's range, sorted by `first`.
///
/// This is what makes a merge atomic for readers: the merged part
/// `part-<first>-<last>-m-…` appears with one rename, and from then on the
/// parts it holds are invisible, whether or not they are deleted yet. Two
/// parts with the same range cannot both exist (a merge only takes visible
/// parts, and a range is merged once); if they did, the first name wins.
pub(super) fn visible(mut all: Vec<Part>) -> Vec<Part> {
    all.sort_by(|a, b| (a.first, std::cmp::Reverse(a.last), &a.path).cmp(&(b.first, std::cmp::Reverse(b.last), &b.path)));
    let mut out: Vec<Part> = Vec::with_capacity(all.len());
    // Sorted by first, widest first: a part is covered iff the visible part
    // reaching furthest so far (which starts at or before it) contains it.
    let mut reach: Option<Part> = None;
    for part in all {
        if let Some(r) = &reach {
            if r.covers(&part) || (r.first, r.last) == (part.first, part.last) {
                continue;
            }
        }
        if reach.as_ref().is_none_or(|r| part.last > r.last) {
            reach = Some(part.clone());
        }
        out.push(part);
    }
    out
}

/// The parts of `all` that `shown` (its [`visible`] ones) leaves out: what
/// compaction left to delete.
pub(super) fn hidden<'a>(all: &'a [Part], shown: &'a [Part]) -> impl Iterator<Item = &'a Part> {
    all.iter().filter(|p| !shown.contains(p))
}

/// Every part file in `dir` (`*.parquet`, directly in it); a missing
/// directory is empty if `missing_ok`.
pub(super) fn list_parts(dir: &Path, missing_ok: bool) -> Result<Vec<Part>, StoreError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if missing_ok && e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(format_args!("list {}", dir.display()), e)),
    };
    let mut parts = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io_error(format_args!("list {}", dir.display()), e))?;
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else { continue };
        if !file_name.ends_with(PART_SUFFIX) {
            continue;
        }
        let path = entry.path();
        let meta = match entry.metadata() {
            Ok(m) => m,
            // Deleted between the listing and now (a compaction's clean-up).
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error(format_args!("stat {}", path.display()), e)),
        };
        if !meta.is_file() {
            continue;
        }
        // A `.parquet` file that is not a part (copied in by hand) has no
        // sequence: it is read as a part of its own, before every other.
        let (first, last) = part_range(file_name).unwrap_or((0, 0));
        parts.push(Part { path, first, last, bytes: meta.len() });
    }
    Ok(parts)
}

fn remove_temp_files(dir: &Path) -> Result<(), StoreError> {
    for entry in fs::read_dir(dir).map_err(|e| io_error(format_args!("list {}", dir.display()), e))? {
        let entry = entry.map_err(|e| io_error(format_args!("list {}", dir.display()), e))?;
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else { continue };
        if file_name.starts_with(TEMP_PREFIX) && file_name.ends_with(TEMP_SUFFIX) {
            let path = entry.path();
            tracing::warn!(path = %path.display(), "removing temp file left by an interrupted write");
            fs::remove_file(&path).map_err(|e| io_error(format_args!("remove {}", path.display()), e))?;
        }
    }
    Ok(())
}



impl Table {
    /// Creates the directory if missing, removes stale temp files, and
    /// returns the table with its visible parts (sorted by sequence; see
    /// [`visible`]). Not `writable`: touches nothing on disk, and a missing
    /// directory is an empty table.
    pub(super) fn open(name: &'static str, dir: PathBuf, schema: SchemaRef, writable: bool) -> Result<(Self, Vec<Part>), StoreError> {
        if writable {
            fs::create_dir_all(&dir).map_err(|e| io_error(format_args!("create {}", dir.display()), e))?;
            remove_temp_files(&dir)?;
        }
        let all = list_parts(&dir, !writable)?;
        let next_seq = all.iter().map(|p| p.last.saturating_add(1)).max().unwrap_or(0);
        let table = Table { name, dir, schema, writer: Arc::new(Mutex::new(next_seq)), compacting: Arc::new(Mutex::new(())) };
        Ok((table, visible(all)))
    }

    /// The parts a reader sees now: every part file not covered by a merged one.
    pub(super) fn visible_parts(&self) -> Result<Vec<Part>, StoreError> {
        Ok(visible(list_parts(&self.dir, true)?))
    }

    /// Writes `batches` as one new part file. `seq` is the held writer lock;
    /// it is released only after the file is in place and `on_visible` ran,
    /// even if the returned future is dropped early.
    pub(super) async fn write_part(
        &self,
        mut seq: OwnedMutexGuard<u64>,
        batches: Vec<RecordBatch>,
        on_visible: impl FnOnce() + Send + 'static,
    ) -> Result<(), StoreError> {
        let dir = self.dir.clone();
        let schema = self.schema.clone();
        let task = tokio::task::spawn_blocking(move || {
            let n = *seq;
            *seq = n + 1;
            let result = write_part_file(&dir, &schema, n, &batches);
            match &result {
                Ok(path) => {
                    on_visible();
                    tracing::debug!(path = %path.display(), "part written");
                }
                Err(failure) if failure.visible => on_visible(),
                Err(_) => {}
            }
            drop(seq);
            result.map(|_| ()).map_err(|failure| failure.error)
        });
        task.await.map_err(|e| StoreError::Fatal(format!("{} writer task failed: {e}", self.name)))?
    }
}

/// The sequence number of a part file name `part-<seq>-<unique>.parquet`
/// (the first one of a merged part).
#[cfg(test)]
pub(super) fn part_sequence(file_name: &str) -> Option<u64> {
    part_range(file_name).map(|(first, _)| first)
}

/// The sequence numbers a part file name holds: `part-<seq>-<unique>.parquet`
/// holds `seq`, a merged `part-<first>-<last>-m-<unique>.parquet` holds
/// `first..=last` (the unique suffix starts with hex digits, never `m`).
pub(super) fn part_range(file_name: &str) -> Option<(u64, u64)> {
    let rest = file_name.strip_prefix(PART_PREFIX)?.strip_suffix(PART_SUFFIX)?;
    let mut fields = rest.split('-');
    let first: u64 = fields.next()?.parse().ok()?;
    let second = fields.next();
    if let (Some(last), Some("m")) = (second, fields.next()) {
        if last.len() == 20 && last.bytes().all(|b| b.is_ascii_digit()) {
            let last: u64 = last.parse().ok()?;
            return (first <= last).then_some((first, last));
        }
    }
    Some((first, first))
}

/// The file name of a merged part holding `first..=last`.
pub(super) fn merged_name(first: u64, last: u64) -> String {
    format!("{PART_PREFIX}{first:020}-{last:020}-m-{}{PART_SUFFIX}", unique_suffix())
}

/// Unique within this process and, with the pid and clock, across processes.
fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{nanos:x}-{:x}-{n:x}", std::process::id())
}

struct WriteFailure {
    error: StoreError,
    /// The part became visible to queries although the write failed (its
    /// directory entry could not be made durable nor removed).
    visible: bool,
}

impl From<StoreError> for WriteFailure {
    fn from(error: StoreError) -> Self {
        WriteFailure { error, visible: false }
    }
}

/// Temp file, fsync, rename, fsync the directory.
fn write_part_file(dir: &Path, schema: &SchemaRef, seq: u64, batches: &[RecordBatch]) -> Result<PathBuf, WriteFailure> {
    let final_name = format!("{PART_PREFIX}{seq:020}-{}{PART_SUFFIX}", unique_suffix());
    let temp = dir.join(format!(".{final_name}{TEMP_SUFFIX}"));
    let path = dir.join(&final_name);

    if let Err(e) = write_parquet_file(&temp, schema, batches) {
        let _ = fs::remove_file(&temp);
        return Err(e.into());
    }
    if let Err(e) = fs::rename(&temp, &path) {
        let _ = fs::remove_file(&temp);
        return Err(io_error(format_args!("rename {} to {}", temp.display(), path.display()), e).into());
    }
    if let Err(e) = sync_dir(dir) {
        let error = io_error(format_args!("fsync {}", dir.display()), e);
        // Not durable: take it back so a retry writes it again.
        let visible = fs::remove_file(&path).is_err();
        return Err(WriteFailure { error, visible });
    }
    Ok(path)
}

pub(super) fn write_parquet_file(path: &Path, schema: &SchemaRef, batches: &[RecordBatch]) -> Result<(), StoreError> {
    let file = File::options()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| io_error(format_args!("create {}", path.display()), e))?;
    // No dictionary encoding in the parts inserts write: the columns that
    // dominate them (contents, which dedup makes unique, hashes and
    // embeddings) have no repeats, so the writer built a dictionary, gave up
    // at its size limit and wrote them plainly anyway. Measured on 5,000
    // atoms of 1 KiB with 384-d hashing embeddings: 2.6 × faster to write
    // (debug build), 2.3 % larger; the release `embedded_topology/raw_insert`
    // bench went from 41k to 57k rows/s. Compaction (`compact.rs`) writes
    // merged parts with dictionaries, where repeats across parts pay off.
    let props = WriterProperties::builder().set_compression(Compression::SNAPPY).set_dictionary_enabled(false).build();
    let context = || format!("write {}", path.display());
    let mut writer =
        ArrowWriter::try_new(&file, schema.clone(), Some(props)).map_err(|e| parquet_error(context(), e))?;
    for batch in batches {
        writer.write(batch).map_err(|e| parquet_error(context(), e))?;
    }
    writer.close().map_err(|e| parquet_error(context(), e))?;
    file.sync_all().map_err(|e| io_error(format_args!("fsync {}", path.display()), e))
}

#[cfg(unix)]
pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
pub(super) fn sync_dir(_dir: &Path) -> io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_names_parse() {
        assert_eq!(part_sequence("part-00000000000000000042-abc-1-0.parquet"), Some(42));
        assert_eq!(part_sequence("other.parquet"), None);
        assert_eq!(part_range("part-00000000000000000042-abc-1-0.parquet"), Some((42, 42)));
        assert_eq!(part_range(&merged_name(3, 17)), Some((3, 17)));
        assert_eq!(part_range("part-00000000000000000009-00000000000000000003-m-x.parquet"), None, "an empty range");
    }

    fn part(first: u64, last: u64) -> Part {
        Part { path: PathBuf::from(format!("{first}-{last}")), first, last, bytes: 1 }
    }

    #[test]
    fn a_merged_part_hides_exactly_the_parts_in_its_range() {
        let all = vec![part(0, 0), part(1, 1), part(0, 1), part(2, 2), part(3, 3), part(2, 5), part(4, 4), part(5, 5), part(6, 6), part(0, 5)];
        assert_eq!(visible(all.clone()), vec![part(0, 5), part(6, 6)]);
        assert_eq!(hidden(&all, &visible(all.clone())).count(), 8);
        assert_eq!(visible(vec![part(3, 3), part(0, 1), part(2, 2)]), vec![part(0, 1), part(2, 2), part(3, 3)]);
    }
}
