//! Arbitrary bytes through the JSON bridge: `parse_line`, then
//! `json_to_avro` against the current request schema (what the decode stage
//! does with an `application/json` record) and against a record of every
//! type the bridge maps.
//!
//! Properties: no panic, no absurd allocation; failures are
//! `decode.json_syntax` / `decode.json_schema`; a converted value fits its
//! schema, encodes, and decodes back to itself; for the request schema its
//! JSON form (`avro_to_json`) converts back to the same value, and it maps
//! to the request type.
#![no_main]

use hartonomous::avro::wire::{self, HEADER_LEN};
use hartonomous::avro::{self, JsonError};
use hartonomous::outcome::{Classify, ErrorClass};
use hartonomous::topology::atom_ingestion::decode::to_request;
use hartonomous_fuzz::{json_schemas, limit_allocations, same};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    limit_allocations();
    let json = match avro::parse_line(data) {
        Ok(json) => json,
        Err(e) => {
            assert!(matches!(e, JsonError::Syntax(_)) && e.code() == "decode.json_syntax", "{e:?}");
            assert_eq!(e.class(), ErrorClass::Invalid);
            return;
        }
    };
    for (index, (what, schema)) in json_schemas().iter().enumerate() {
        let value = match avro::json_to_avro(&json, schema) {
            Ok(value) => value,
            Err(e) => {
                assert_eq!(e.code(), "decode.json_schema", "{what}: {e:?}");
                assert_eq!(e.class(), ErrorClass::Invalid);
                continue;
            }
        };
        assert!(value.validate(schema), "{what}: converted value does not fit: {value:?}");
        let bytes = match wire::encode(1, schema, &value) {
            Ok(bytes) => bytes,
            Err(e) => panic!("{what}: a converted value does not encode: {e:?}\n{value:?}"),
        };
        let back = match wire::decode(schema, schema, &bytes[HEADER_LEN..]) {
            Ok(back) => back,
            Err(e) => panic!("{what}: an encoded value does not decode: {e:?}\n{value:?}"),
        };
        assert!(same(&back, &value), "{what}: wire round trip changed the value\n{value:?}\n{back:?}");
        if index == 0 {
            let again = avro::json_to_avro(&avro::avro_to_json(&value), schema);
            assert!(again.as_ref().is_ok_and(|again| same(again, &value)), "{what}: JSON round trip: {again:?}\n{value:?}");
            if let Err(e) = to_request(&value) {
                panic!("a converted request does not map to the request type: {e:?}");
            }
        }
    }
});
