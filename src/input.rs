//! Input files for `hartonomous run --input` and `produce`.
//!
//! Two formats:
//! - **JSON lines** (`.jsonl`, `.json`, or any file whose first non-blank
//!   byte is `{`): one JSON object per line with the schema's field names.
//!   Each line becomes one record, unchanged, with header
//!   `content-type: application/json`; the decode stage checks it against the
//!   reader schema, so a bad line is dead-lettered with its reason like any
//!   other bad record.
//! - **Framed wire records** (`.wire`): the header line `HRTN-WIRE1\n`, then
//!   per record a big-endian u32 key length (`u32::MAX` for no key), the key,
//!   a u32 payload length and the payload, which is normally Avro in the
//!   Confluent wire format. `hartonomous produce --output` writes these.

use std::path::Path;

use crate::record::{Headers, OutgoingRecord};
use crate::topology::atom_ingestion::decode::JSON_CONTENT_TYPE;

pub const WIRE_MAGIC: &[u8] = b"HRTN-WIRE1\n";

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("{file}: {source}")]
    Io { file: String, source: std::io::Error },
    #[error("{file}: {message}")]
    Format { file: String, message: String },
}

/// A record read from an input file: key and payload, plus headers.
pub fn read(path: &Path, topic: &str) -> Result<Vec<OutgoingRecord>, InputError> {
    let bytes = std::fs::read(path).map_err(|source| InputError::Io { file: path.display().to_string(), source })?;
    if bytes.starts_with(WIRE_MAGIC) {
        return read_wire(&bytes[WIRE_MAGIC.len()..], topic).map_err(|message| InputError::Format { file: path.display().to_string(), message });
    }
    let is_json_ext = matches!(path.extension().and_then(|e| e.to_str()), Some("jsonl" | "json" | "ndjson"));
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if is_json_ext || first == Some(&b'{') {
        return Ok(json_lines(&bytes, topic));
    }
    Err(InputError::Format {
        file: path.display().to_string(),
        message: "is neither JSON lines nor framed wire records (which start with `HRTN-WIRE1`); see `hartonomous produce --help`".into(),
    })
}

/// One record per non-blank line, bytes unchanged (invalid lines included:
/// they are the decode stage's to reject, with a reason).
pub fn json_lines(bytes: &[u8], topic: &str) -> Vec<OutgoingRecord> {
    bytes
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .filter(|l| l.iter().any(|b| !b.is_ascii_whitespace()))
        .map(|line| {
            let key = serde_json::from_slice::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("correlation_id").and_then(|c| c.as_str()).map(|s| s.as_bytes().to_vec()));
            let mut headers = Headers::new();
            headers.insert("content-type", JSON_CONTENT_TYPE);
            OutgoingRecord { topic: topic.to_string(), partition: None, key, payload: line.to_vec(), headers, event_time_ms: None }
        })
        .collect()
}

fn read_wire(mut bytes: &[u8], topic: &str) -> Result<Vec<OutgoingRecord>, String> {
    fn take<'a>(bytes: &mut &'a [u8], n: usize, what: &str, index: usize) -> Result<&'a [u8], String> {
        if bytes.len() < n {
            return Err(format!("record {index}: {what} cut short ({} of {n} bytes)", bytes.len()));
        }
        let (head, rest) = bytes.split_at(n);
        *bytes = rest;
        Ok(head)
    }
    let be = |b: &[u8]| u32::from_be_bytes(b.try_into().expect("4 bytes"));
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let i = out.len();
        let klen = be(take(&mut bytes, 4, "key length", i)?);
        let key = if klen == u32::MAX { None } else { Some(take(&mut bytes, klen as usize, "key", i)?.to_vec()) };
        let plen = be(take(&mut bytes, 4, "payload length", i)?);
        let payload = take(&mut bytes, plen as usize, "payload", i)?.to_vec();
        out.push(OutgoingRecord { topic: topic.to_string(), partition: None, key, payload, headers: Headers::new(), event_time_ms: None });
    }
    Ok(out)
}

/// Writes records in the framed wire format.
pub fn write_wire(path: &Path, records: &[(Option<Vec<u8>>, Vec<u8>)]) -> std::io::Result<()> {
    let mut buf = WIRE_MAGIC.to_vec();
    for (key, payload) in records {
        match key {
            Some(k) => {
                buf.extend((k.len() as u32).to_be_bytes());
                buf.extend(k);
            }
            None => buf.extend(u32::MAX.to_be_bytes()),
        }
        buf.extend((payload.len() as u32).to_be_bytes());
        buf.extend(payload);
    }
    std::fs::write(path, buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_files_round_trip_and_json_lines_keep_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.wire");
        write_wire(&p, &[(Some(b"k".to_vec()), vec![0, 1, 2]), (None, vec![])]).unwrap();
        let recs = read(&p, "t").unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].key.as_deref(), Some(&b"k"[..]));
        assert_eq!(recs[0].payload, vec![0, 1, 2]);
        assert_eq!(recs[1].key, None);

        let j = dir.path().join("x.jsonl");
        std::fs::write(&j, "{\"correlation_id\":\"c1\"}\n\nnot json\n").unwrap();
        let recs = read(&j, "t").unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].key.as_deref(), Some(&b"c1"[..]));
        assert_eq!(recs[1].payload, b"not json");

        std::fs::write(&p, [WIRE_MAGIC, &[0, 0, 0, 9][..]].concat()).unwrap();
        assert!(read(&p, "t").unwrap_err().to_string().contains("cut short"));
    }
}
