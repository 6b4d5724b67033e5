//! Stage 3: the SHA-256 of the content is the atom's identity.

use crate::atom::{AtomIngestionRequest, ContentHash};
use crate::flow::{FnStage, Item};
use crate::outcome::Outcome;

#[derive(Debug, Clone)]
pub struct Hashed {
    pub request: AtomIngestionRequest,
    pub hash: ContentHash,
}

pub fn stage() -> FnStage<AtomIngestionRequest, Hashed, impl FnMut(Item<AtomIngestionRequest>) -> Outcome<Hashed> + Send> {
    FnStage::new(|item: Item<AtomIngestionRequest>| {
        let hash = ContentHash::of(&item.value.content);
        Outcome::Continue(Hashed { request: item.value, hash })
    })
}
