//! The guest `random` interface: entropy from the host, bounded per call.

use rand::RngCore;
use wasmtime::component::{HasSelf, Linker};

use crate::runtime::StoreState;
use crate::world::random;

/// Largest single `get-random-bytes` request the host serves.
const MAX_RANDOM_BYTES: u64 = 1 << 20;

/// Randomness's slice of store state (it keeps none).
#[derive(Debug)]
pub struct Random;

pub(crate) fn add_to_linker(linker: &mut Linker<StoreState>) -> wasmtime::Result<()> {
    random::add_to_linker::<StoreState, HasSelf<Random>>(linker, |s| &mut s.random)
}

impl random::Host for Random {
    fn get_random_bytes(&mut self, len: u64) -> wasmtime::Result<Vec<u8>> {
        if len > MAX_RANDOM_BYTES {
            return Err(wasmtime::format_err!(
                "get-random-bytes: {len} bytes asked, at most {MAX_RANDOM_BYTES} per call"
            ));
        }
        let mut bytes = vec![0; len as usize];
        rand::rng().fill_bytes(&mut bytes);
        Ok(bytes)
    }

    fn get_random_u64(&mut self) -> wasmtime::Result<u64> {
        Ok(rand::rng().next_u64())
    }
}
