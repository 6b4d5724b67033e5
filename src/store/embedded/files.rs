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
pub(super) struct Table {
    pub(super) name: &'static str,
    pub(super) dir: PathBuf,
    pub(super) schema: SchemaRef,
    /// The next part sequence number. Locked for a whole write, and released
    /// only once the file is in place and the in-memory keys are updated.
    pub(super) writer: Arc<Mutex<u64>>,
}

impl Table {
    /// Creates the directory if missing, removes stale temp files, and
    /// returns the table with the visible part files (sorted by name). Not
    /// `writable`: touches nothing on disk, and a missing directory is an
    /// empty table.
    pub(super) fn open(name: &'static str, dir: PathBuf, schema: SchemaRef, writable: bool) -> Result<(Self, Vec<PathBuf>), StoreError> {
        if writable {
            fs::create_dir_all(&dir).map_err(|e| io_error(format_args!("create {}", dir.display()), e))?;
        }
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => Some(entries),
            Err(e) if !writable && e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_error(format_args!("list {}", dir.display()), e)),
        };
        let mut parts = Vec::new();
        let mut next_seq = 0u64;
        for entry in entries.into_iter().flatten() {
            let entry = entry.map_err(|e| io_error(format_args!("list {}", dir.display()), e))?;
            let file_name = entry.file_name();
            let Some(file_name) = file_name.to_str() else { continue };
            let path = entry.path();
            if file_name.starts_with(TEMP_PREFIX) && file_name.ends_with(TEMP_SUFFIX) && writable {
                tracing::warn!(path = %path.display(), "removing temp file left by an interrupted write");
                fs::remove_file(&path).map_err(|e| io_error(format_args!("remove {}", path.display()), e))?;
                continue;
            }
            // Exactly the files the listing table reads: names ending in
            // `.parquet` directly in the table directory.
            if !file_name.ends_with(PART_SUFFIX) {
                continue;
            }
            let is_file = entry
                .file_type()
                .map_err(|e| io_error(format_args!("stat {}", path.display()), e))?
                .is_file();
            if !is_file {
                continue;
            }
            if let Some(seq) = part_sequence(file_name) {
                next_seq = next_seq.max(seq.saturating_add(1));
            }
            parts.push(path);
        }
        parts.sort();
        let table = Table { name, dir, schema, writer: Arc::new(Mutex::new(next_seq)) };
        Ok((table, parts))
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

/// The sequence number of a part file name `part-<seq>-<unique>.parquet`.
pub(super) fn part_sequence(file_name: &str) -> Option<u64> {
    let rest = file_name.strip_prefix(PART_PREFIX)?;
    let digits = rest.split('-').next()?;
    digits.parse().ok()
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
    let props = WriterProperties::builder().set_compression(Compression::SNAPPY).build();
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
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_names_parse() {
        assert_eq!(part_sequence("part-00000000000000000042-abc-1-0.parquet"), Some(42));
        assert_eq!(part_sequence("other.parquet"), None);
    }
}
