//! The guest `clock` interface: wall-clock and monotonic time.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use wasmtime::component::{HasSelf, Linker};

use crate::runtime::StoreState;
use crate::world::clock;

/// The clock's slice of store state (it keeps none).
#[derive(Debug)]
pub struct Clock;

pub(crate) fn add_to_linker(linker: &mut Linker<StoreState>) -> wasmtime::Result<()> {
    clock::add_to_linker::<StoreState, HasSelf<Clock>>(linker, |s| &mut s.clock)
}

impl clock::Host for Clock {
    fn now(&mut self) -> wasmtime::Result<clock::Datetime> {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Ok(clock::Datetime {
            seconds: d.as_secs(),
            nanoseconds: d.subsec_nanos(),
        })
    }

    fn monotonic_now(&mut self) -> wasmtime::Result<u64> {
        Ok(monotonic_origin().elapsed().as_nanos() as u64)
    }
}

fn monotonic_origin() -> Instant {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}
