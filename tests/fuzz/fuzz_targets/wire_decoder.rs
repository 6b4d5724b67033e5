//! Arbitrary bytes through the decode path of the processor's decode stage:
//! [`hartonomous::avro::Decoder`] over a file registry.
//!
//! Input: the first byte picks one of the registered schema ids (request
//! v1 and v2, a recursive, a wide and a deep request variant, the wrong
//! record type, an unknown id), and the rest is framed under it as the Avro
//! body; one more choice passes the rest unframed, as the whole message.
//!
//! Property: no panic, no abort (stack overflow), no allocation past the
//! caps; the answer is a value of the reader schema that maps to the
//! request type, or an `Invalid` error with a `decode.*` reason that agrees
//! with what the id names.
#![no_main]

use futures::executor::block_on;
use hartonomous::avro::wire;
use hartonomous::avro::{DecodeError, WireError};
use hartonomous::outcome::{Classify, ErrorClass};
use hartonomous::topology::atom_ingestion::decode::to_request;
use hartonomous_fuzz::{Choice, wire_fixture};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let fixture = wire_fixture();
    let Some((&pick, rest)) = data.split_first() else { return };
    let pick = usize::from(pick) % (fixture.choices.len() + 1);
    let (message, choice) = match fixture.choices.get(pick) {
        Some(&(id, choice)) => (wire::frame(id, rest), Some(choice)),
        None => (rest.to_vec(), None),
    };

    match block_on(fixture.decoder.decode(&message)) {
        Ok((id, value)) => {
            let chosen = fixture.choices.iter().find(|(i, _)| *i == id).map(|(_, c)| *c);
            assert!(matches!(chosen, Some(Choice::Request(_))), "decoded under id {id} ({chosen:?}), not a request schema");
            assert!(value.validate(fixture.decoder.reader()), "the value does not fit the reader schema: {value:?}");
            if let Err(e) = to_request(&value) {
                panic!("a value of the reader schema does not map to the request type: {e:?}");
            }
        }
        Err(e) => {
            assert_eq!(e.class(), ErrorClass::Invalid, "only the record can be at fault here: {e:?}");
            assert!(e.code().starts_with("decode."), "reason {} for {e:?}", e.code());
            match (choice, &e) {
                (Some(Choice::Unknown), DecodeError::Invalid(WireError::UnknownSchema(_))) => {}
                (Some(Choice::Unknown), _) => panic!("unknown id answered with {e:?}"),
                (Some(Choice::WrongType), DecodeError::Invalid(WireError::WrongSchema { .. })) => {}
                (Some(Choice::WrongType), _) => panic!("wrong record type answered with {e:?}"),
                (Some(Choice::Request(what)), DecodeError::Invalid(WireError::WrongSchema { .. } | WireError::UnknownSchema(_))) => {
                    panic!("{what}: a registered request schema answered with {e:?}")
                }
                _ => {}
            }
        }
    }
});
