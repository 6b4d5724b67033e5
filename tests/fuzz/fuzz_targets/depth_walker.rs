//! Arbitrary bytes through the depth walker (`src/avro/depth.rs`) against
//! recursive and plain writer schemas; the first byte picks the schema.
//!
//! Properties:
//! - no panic, no stack overflow, and the walk stays within its bounds: it
//!   never claims more bytes than it was given, nor a depth past the limit
//!   or past what a non-recursive schema allows;
//! - on data shallow enough for apache-avro's recursion (at most
//!   `INLINE_DEPTH` levels) the walk agrees with apache-avro: where
//!   apache-avro decodes a datum the walk took exactly as many bytes, and
//!   where the walk says the body ends early apache-avro does not decode.
//!   The walk may be stricter only where apache-avro is lenient with
//!   malformed encodings (a 10th varint byte above 1, a negative block
//!   size, items past the body's budget), listed in `LENIENT`; apache-avro
//!   is not run on those bodies, since it may read on past that point to
//!   any depth.
#![no_main]

use hartonomous::avro::depth::{INLINE_DEPTH, MAX_DEPTH, WalkError};
use hartonomous::avro::wire::{self, WireError};
use hartonomous_fuzz::walker_schemas;
use libfuzzer_sys::fuzz_target;

/// What the walk refuses and apache-avro 0.22 reads on past: a 10th varint
/// byte above 1, a negative block size, and more items in a body than one
/// collection may hold (apache-avro checks each collection on its own).
const LENIENT: &[&str] = &["varint overflows 64 bits", "negative block size", "more than this body can hold"];

fuzz_target!(|data: &[u8]| {
    let schemas = walker_schemas();
    let Some((&pick, body)) = data.split_first() else { return };
    let (what, schema, walker) = &schemas[usize::from(pick) % schemas.len()];

    match walker.walk(body, MAX_DEPTH) {
        Ok(walked) => {
            assert!(walked.len <= body.len(), "{what}: walked {} of {} bytes", walked.len, body.len());
            assert!(walked.depth <= MAX_DEPTH, "{what}: depth {} past the limit", walked.depth);
            if let Some(bound) = walker.static_depth() {
                assert!(walked.depth <= bound, "{what}: depth {} past the schema's {bound}", walked.depth);
            }
        }
        Err(WalkError::TooDeep { limit }) => {
            assert_eq!(limit, MAX_DEPTH);
            assert!(walker.static_depth().is_none_or(|d| d > MAX_DEPTH), "{what}: too deep for a schema of bounded depth");
        }
        Err(WalkError::Truncated | WalkError::Malformed(_)) => {}
    }

    // Against apache-avro, only where its recursion is bounded: the walk got
    // no deeper than INLINE_DEPTH and stopped where apache-avro stops too.
    // Past what the walk refuses and apache-avro reads on (LENIENT), the
    // data may nest to any depth (the project never decodes such a body: a
    // body that fails the walk is rejected).
    let shallow = walker.walk(body, INLINE_DEPTH);
    match &shallow {
        Err(WalkError::TooDeep { .. }) => return,
        Err(WalkError::Malformed(why)) if LENIENT.iter().any(|l| why.contains(l)) => return,
        _ => {}
    }
    let decoded = wire::decode(schema, schema, body);
    match (&shallow, &decoded) {
        (Ok(walked), Ok(_)) => assert_eq!(walked.len, body.len(), "{what}: apache-avro took the whole body"),
        (Ok(walked), Err(WireError::TrailingBytes(left))) => {
            assert_eq!(walked.len + left, body.len(), "{what}: apache-avro left {left} bytes")
        }
        (Ok(walked), Err(WireError::Truncated)) => {
            panic!("{what}: the walk took {} bytes, apache-avro wanted more than {}", walked.len, body.len())
        }
        (Err(WalkError::Truncated), Ok(_) | Err(WireError::TrailingBytes(_))) => {
            panic!("{what}: the walk ran out of input where apache-avro read a whole datum ({decoded:?})")
        }
        (Err(WalkError::Malformed(why)), Ok(_) | Err(WireError::TrailingBytes(_))) => {
            panic!("{what}: the walk rejected ({why}) what apache-avro reads ({decoded:?})")
        }
        _ => {}
    }
});
