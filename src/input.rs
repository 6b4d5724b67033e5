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
        .map(|line| json_line(line, topic))
        .collect()
}

fn json_line(line: &[u8], topic: &str) -> OutgoingRecord {
    let key = serde_json::from_slice::<serde_json::Value>(line)
        .ok()
        .and_then(|v| v.get("correlation_id").and_then(|c| c.as_str()).map(|s| s.as_bytes().to_vec()));
    let mut headers = Headers::new();
    headers.insert("content-type", JSON_CONTENT_TYPE);
    OutgoingRecord { topic: topic.to_string(), partition: None, key, payload: line.to_vec(), headers, event_time_ms: None }
}

/// Records read from an input file one at a time.
pub type RecordStream = Box<dyn Iterator<Item = Result<OutgoingRecord, InputError>> + Send>;

/// [`read`], one record at a time: memory does not grow with the file.
pub fn stream(path: &Path, topic: &str) -> Result<RecordStream, InputError> {
    use std::io::{BufRead, Read};
    let file = path.display().to_string();
    let io = |source| InputError::Io { file: file.clone(), source };
    let mut reader = std::io::BufReader::new(std::fs::File::open(path).map_err(io)?);
    let head = reader.fill_buf().map_err(io)?.to_vec();
    let topic = topic.to_string();
    if head.starts_with(WIRE_MAGIC) {
        reader.consume(WIRE_MAGIC.len());
        let mut index = 0usize;
        let next = move || -> Option<Result<OutgoingRecord, InputError>> {
            let cut = |what: &str| Some(Err(InputError::Format { file: file.clone(), message: format!("record {index}: {what} cut short") }));
            let mut len = [0u8; 4];
            match reader.read_exact(&mut len) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
                Err(e) => return Some(Err(InputError::Io { file: file.clone(), source: e })),
            }
            let klen = u32::from_be_bytes(len);
            let key = if klen == u32::MAX {
                None
            } else {
                let mut k = vec![0; klen as usize];
                if reader.read_exact(&mut k).is_err() {
                    return cut("key");
                }
                Some(k)
            };
            if reader.read_exact(&mut len).is_err() {
                return cut("payload length");
            }
            let mut payload = vec![0; u32::from_be_bytes(len) as usize];
            if reader.read_exact(&mut payload).is_err() {
                return cut("payload");
            }
            index += 1;
            Some(Ok(OutgoingRecord { topic: topic.clone(), partition: None, key, payload, headers: Headers::new(), event_time_ms: None }))
        };
        return Ok(Box::new(std::iter::from_fn(next)));
    }
    let is_json_ext = matches!(path.extension().and_then(|e| e.to_str()), Some("jsonl" | "json" | "ndjson"));
    let first = head.iter().find(|b| !b.is_ascii_whitespace());
    if !(is_json_ext || first == Some(&b'{')) {
        return Err(InputError::Format {
            file,
            message: "is neither JSON lines nor framed wire records (which start with `HRTN-WIRE1`); see `hartonomous produce --help`".into(),
        });
    }
    let lines = reader.split(b'\n').filter_map(move |line| match line {
        Err(source) => Some(Err(InputError::Io { file: file.clone(), source })),
        Ok(l) => {
            let l = l.strip_suffix(b"\r").unwrap_or(&l);
            l.iter().any(|b| !b.is_ascii_whitespace()).then(|| Ok(json_line(l, &topic)))
        }
    });
    Ok(Box::new(lines))
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
        assert!(stream(&p, "t").unwrap().next().unwrap().unwrap_err().to_string().contains("cut short"));
    }

    #[test]
    fn streaming_reads_what_read_reads() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.wire");
        write_wire(&p, &[(Some(b"k".to_vec()), vec![0, 1, 2]), (None, vec![])]).unwrap();
        let streamed: Vec<OutgoingRecord> = stream(&p, "t").unwrap().map(Result::unwrap).collect();
        assert_eq!(streamed, read(&p, "t").unwrap());
        let j = dir.path().join("x.jsonl");
        std::fs::write(&j, "{\"correlation_id\":\"c1\"}\r\n\n  \nnot json\n{}").unwrap();
        let streamed: Vec<OutgoingRecord> = stream(&j, "t").unwrap().map(Result::unwrap).collect();
        assert_eq!(streamed, read(&j, "t").unwrap());
        assert_eq!(streamed.len(), 3);
        let bad = dir.path().join("x.bin");
        std::fs::write(&bad, [1u8, 2, 3]).unwrap();
        assert!(stream(&bad, "t").is_err());
    }
}
