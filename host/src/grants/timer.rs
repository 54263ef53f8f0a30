//! The guest `timer` interface: waiting without holding a thread.

use std::time::Duration;

use wasmtime::component::{HasSelf, Linker};

use crate::runtime::StoreState;
use crate::world::timer;

/// The timer's slice of store state (it keeps none).
#[derive(Debug)]
pub struct Timer;

pub(crate) fn add_to_linker(linker: &mut Linker<StoreState>) -> wasmtime::Result<()> {
    timer::add_to_linker::<StoreState, HasSelf<Timer>>(linker, |s| &mut s.timer)
}

impl timer::Host for Timer {
    async fn sleep(&mut self, duration_ms: u64) {
        // The execution's deadline is enforced around the whole call, so a
        // long sleep is cut short there; this only parks the fiber.
        tokio::time::sleep(Duration::from_millis(duration_ms)).await;
    }
}
