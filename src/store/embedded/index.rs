//! Key indexes: the keys of a table's parts up to a sequence number, in one
//! flat file, so that opening the store reads one file per table instead of
//! a column of every part.
//!
//! `<table dir>/keys.idx` holds the keys of every part whose sequence is at
//! most `covered` (see [`Index`]). Open reads it, then the key columns of
//! the parts past `covered` only (a merged part that straddles `covered` is
//! read whole: a key seen twice is the same key). The file is derived data:
//! it is written with temp file, fsync and rename, and if it is missing,
//! unreadable or of another version, open rebuilds the keys from the parts
//! and the next maintenance run writes it again. Parts are never changed
//! under it: compaction only moves rows between parts, so the keys of the
//! parts up to `covered` stay the keys in the file.
//!
//! Layout, little-endian: magic `HKEYIDX1`, kind (u8), covered (u64), the
//! topic names (u32 count, then u32 length + UTF-8 each), the entry count
//! (u64), then the fixed-size entries of the kind, then the magic again (a
//! file cut short fails the check).

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::error::io_error;
use crate::store::StoreError;

pub(super) const INDEX_FILE: &str = "keys.idx";
const MAGIC: &[u8; 8] = b"HKEYIDX1";

/// What a table's index holds, and the size of one entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// content hash (32) + topic (u32) + partition (i32) + offset (i64)
    Atoms = 1,
    /// topic (u32) + partition (i32) + offset (i64) + outcome (u8)
    Arrivals = 2,
    /// topic (u32) + partition (i32) + offset (i64)
    DeadLetters = 3,
}

impl Kind {
    pub(super) fn entry_len(self) -> usize {
        match self {
            Kind::Atoms => 48,
            Kind::Arrivals => 17,
            Kind::DeadLetters => 16,
        }
    }
}

/// A decoded index: the parts up to `covered` are in `entries`, which refer
/// to `topics` by position.
pub(super) struct Index {
    pub(super) covered: u64,
    pub(super) topics: Vec<String>,
    pub(super) entries: Vec<u8>,
    pub(super) kind: Kind,
}

impl Index {
    pub(super) fn entries(&self) -> impl Iterator<Item = &[u8]> {
        self.entries.chunks_exact(self.kind.entry_len())
    }
}

pub(super) fn path(dir: &Path) -> PathBuf {
    dir.join(INDEX_FILE)
}

/// Encodes an index; `entries` is the concatenation of fixed-size entries.
pub(super) fn encode(kind: Kind, covered: u64, topics: &[impl AsRef<str>], entries: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() + 64 + topics.iter().map(|t| t.as_ref().len() + 4).sum::<usize>());
    out.extend_from_slice(MAGIC);
    out.push(kind as u8);
    out.extend_from_slice(&covered.to_le_bytes());
    out.extend_from_slice(&(topics.len() as u32).to_le_bytes());
    for t in topics {
        out.extend_from_slice(&(t.as_ref().len() as u32).to_le_bytes());
        out.extend_from_slice(t.as_ref().as_bytes());
    }
    out.extend_from_slice(&((entries.len() / kind.entry_len()) as u64).to_le_bytes());
    out.extend_from_slice(entries);
    out.extend_from_slice(MAGIC);
    out
}

/// Reads the index of `dir` if there is a usable one of `kind`; `None`
/// (with the reason logged) means: rebuild from the parts.
pub(super) fn read(dir: &Path, kind: Kind) -> Option<Index> {
    let path = path(dir);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "key index unreadable; reading the keys from the parts");
            return None;
        }
    };
    match decode(&bytes, kind) {
        Some(index) => Some(index),
        None => {
            tracing::warn!(path = %path.display(), "key index damaged or of another version; reading the keys from the parts");
            None
        }
    }
}

fn decode(bytes: &[u8], kind: Kind) -> Option<Index> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = bytes.get(at..at.checked_add(n)?)?;
        at += n;
        Some(s)
    };
    if take(8)? != MAGIC || take(1)?[0] != kind as u8 {
        return None;
    }
    let covered = u64::from_le_bytes(take(8)?.try_into().ok()?);
    let n_topics = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
    let mut topics = Vec::with_capacity(n_topics.min(1 << 16));
    for _ in 0..n_topics {
        let len = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
        topics.push(String::from_utf8(take(len)?.to_vec()).ok()?);
    }
    let n = u64::from_le_bytes(take(8)?.try_into().ok()?) as usize;
    let entries = take(n.checked_mul(kind.entry_len())?)?.to_vec();
    if take(8)? != MAGIC || at != bytes.len() {
        return None;
    }
    Some(Index { covered, topics, entries, kind })
}

/// Writes `bytes` as the index of `dir`: temp file, fsync, rename, fsync the directory.
pub(super) fn write(dir: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let target = path(dir);
    let temp = dir.join(format!(".{INDEX_FILE}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temp, &target)?;
        File::open(dir)?.sync_all()
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&temp);
        io_error(format_args!("write {}", target.display()), e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_round_trips_and_a_damaged_one_is_refused() {
        let entries: Vec<u8> = (0..3 * 17).map(|i| i as u8).collect();
        let bytes = encode(Kind::Arrivals, 41, &["a.topic", "b"], &entries);
        let index = decode(&bytes, Kind::Arrivals).unwrap();
        assert_eq!((index.covered, index.topics.clone()), (41, vec!["a.topic".to_string(), "b".to_string()]));
        assert_eq!(index.entries().count(), 3);
        assert_eq!(index.entries().nth(1).unwrap(), &entries[17..34]);
        assert!(decode(&bytes, Kind::Atoms).is_none(), "another kind");
        assert!(decode(&bytes[..bytes.len() - 1], Kind::Arrivals).is_none(), "cut short");
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode(&longer, Kind::Arrivals).is_none(), "trailing bytes");
    }
}
