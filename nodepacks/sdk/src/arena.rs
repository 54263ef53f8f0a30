//! The pack's global allocator: a bump arena over the slack of the initial
//! linear memory, then the standard allocator.
//!
//! The executor instantiates a pack afresh for every call and drops the whole
//! instance afterwards, so memory a call frees matters far less than memory
//! it grows. Rust's standard allocator on wasm takes every region it needs
//! with `memory.grow`, never from the initial memory, so even a call that
//! allocates a few bytes grows the memory, and the host must then map fresh
//! pages in and unmap them again for each call. `jarvis-pack build` links packs
//! with an initial memory larger than their stack and data; this arena hands
//! out that slack first:
//!
//! - an allocation takes the next free bytes of the arena;
//! - freeing or resizing the newest allocation gives its bytes back or grows
//!   it in place (a `Vec` or `String` being built), others are kept until the
//!   instance goes;
//! - once the arena is used up, allocations go to the standard allocator, so
//!   a call that allocates a lot wastes at most the arena's size.
//!
//! Build with `default-features = false` to keep the standard allocator (or
//! to install one of your own).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

unsafe extern "C" {
    /// First byte after the stack and static data, placed by the linker.
    static __heap_base: u8;
}

const PAGE: usize = 64 * 1024;

/// The arena allocator; see the module documentation.
#[derive(Debug)]
pub(crate) struct Arena {
    /// Next free byte; 0 until the first allocation.
    next: Cell<usize>,
    /// First byte after the arena: the end of the initial memory.
    end: Cell<usize>,
    /// First byte of the arena.
    start: Cell<usize>,
}

// A pack runs on one thread: wasm32 without the atomics feature has no others.
#[cfg(not(target_feature = "atomics"))]
unsafe impl Sync for Arena {}

impl Arena {
    /// An arena that claims its bytes on the first allocation.
    pub(crate) const fn new() -> Self {
        Self {
            next: Cell::new(0),
            end: Cell::new(0),
            start: Cell::new(0),
        }
    }

    fn init(&self) {
        let start = &raw const __heap_base as usize;
        // Nothing has grown the memory yet: every allocation so far came here.
        let end = core::arch::wasm32::memory_size(0) * PAGE;
        self.start.set(start);
        self.next.set(start);
        self.end.set(end.max(start));
    }

    fn owns(&self, ptr: *mut u8) -> bool {
        (self.start.get()..self.end.get()).contains(&(ptr as usize))
    }

    /// Bytes from the arena, or `None` if it has too few left.
    fn bump(&self, layout: Layout) -> Option<*mut u8> {
        if self.end.get() == 0 {
            self.init();
        }
        let at = self.next.get().checked_next_multiple_of(layout.align())?;
        let until = at.checked_add(layout.size())?;
        if until > self.end.get() {
            return None;
        }
        self.next.set(until);
        Some(at as *mut u8)
    }

    /// Whether `ptr..ptr+size` is the newest allocation (it ends at `next`).
    fn is_newest(&self, ptr: *mut u8, size: usize) -> bool {
        ptr as usize + size == self.next.get()
    }
}

unsafe impl GlobalAlloc for Arena {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match self.bump(layout) {
            Some(ptr) => ptr,
            None => unsafe { System.alloc(layout) },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match self.bump(layout) {
            // Arena bytes may have been handed out and given back before.
            Some(ptr) => {
                unsafe { ptr.write_bytes(0, layout.size()) };
                ptr
            }
            None => unsafe { System.alloc_zeroed(layout) },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !self.owns(ptr) {
            return unsafe { System.dealloc(ptr, layout) };
        }
        if self.is_newest(ptr, layout.size()) {
            self.next.set(ptr as usize);
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !self.owns(ptr) {
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        if self.is_newest(ptr, layout.size()) {
            if let Some(until) = (ptr as usize).checked_add(new_size)
                && until <= self.end.get()
            {
                self.next.set(until);
                return ptr;
            }
        } else if new_size <= layout.size() {
            return ptr;
        }
        // SAFETY (of the caller's contract): `layout.align()` with `new_size` is a valid layout.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        let moved = unsafe { self.alloc(new_layout) };
        if !moved.is_null() {
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        moved
    }
}
