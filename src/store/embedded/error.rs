//! Errors: [`QueryError`] for SQL queries, and which I/O, Parquet and Arrow
//! errors make the store unusable (`Fatal`) and which may pass (`Unavailable`).

use std::io;

use arrow::error::ArrowError;
use datafusion::error::DataFusionError;
use parquet::errors::ParquetError;

use crate::store::StoreError;

/// A SQL query that could not be answered: a syntax or planning error (an
/// unknown column, a typo), a statement that is not allowed (only read-only
/// queries are), or a failure while reading the tables. Carries DataFusion's
/// message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("query failed: {0}")]
pub struct QueryError(pub String);

impl From<DataFusionError> for QueryError {
    fn from(e: DataFusionError) -> Self {
        QueryError(e.to_string())
    }
}

impl From<ArrowError> for QueryError {
    fn from(e: ArrowError) -> Self {
        QueryError(e.to_string())
    }
}

/// I/O errors: a problem with the path itself (permissions, not a directory,
/// read-only file system) makes the store unusable; anything else (disk full,
/// interrupted, ...) may pass.
pub(super) fn io_error(context: impl std::fmt::Display, e: io::Error) -> StoreError {
    let msg = format!("{context}: {e}");
    match e.kind() {
        io::ErrorKind::PermissionDenied
        | io::ErrorKind::NotADirectory
        | io::ErrorKind::IsADirectory
        | io::ErrorKind::ReadOnlyFilesystem
        | io::ErrorKind::InvalidFilename
        | io::ErrorKind::InvalidInput => StoreError::Fatal(msg),
        _ => StoreError::Unavailable(msg),
    }
}

/// Parquet errors: an I/O error underneath is classified as such; anything
/// else (encoding, schema) is a bug or a corrupt file and is fatal.
pub(super) fn parquet_error(context: impl std::fmt::Display, e: ParquetError) -> StoreError {
    match e {
        ParquetError::External(inner) => match inner.downcast::<io::Error>() {
            Ok(io) => io_error(context, *io),
            Err(other) => StoreError::Fatal(format!("{context}: {other}")),
        },
        other => StoreError::Fatal(format!("{context}: {other}")),
    }
}

pub(super) fn arrow_error(context: impl std::fmt::Display, e: ArrowError) -> StoreError {
    match e {
        ArrowError::IoError(msg, io) => io_error(format!("{context}: {msg}"), io),
        other => StoreError::Fatal(format!("{context}: {other}")),
    }
}
