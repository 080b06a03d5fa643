//! A global allocator for the daemon and benches: the system allocator, plus
//! transparent-huge-page advice on large blocks and a live-bytes count.
//!
//! Session tables are hundreds of MiB of randomly accessed memory; with 4 KiB
//! pages almost every lookup also misses the TLB. Advising huge pages on
//! blocks of 4 MiB and more (slab, indexes) removes most of those misses
//! where the kernel's THP mode is `madvise` or `always`, and is harmless
//! where it is `never`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

const HUGE_PAGE: usize = 2 << 20;
const ADVISE_FROM: usize = 4 << 20;

pub struct TandemAlloc;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);

/// Heap bytes currently allocated through [`TandemAlloc`] (0 if it is not
/// the global allocator).
pub fn live_bytes() -> usize {
    LIVE_BYTES.load(Ordering::Relaxed)
}

fn advise_huge(ptr: *mut u8, size: usize) {
    if size < ADVISE_FROM || ptr.is_null() {
        return;
    }
    let start = (ptr as usize).next_multiple_of(HUGE_PAGE);
    let end = (ptr as usize + size) & !(HUGE_PAGE - 1);
    if end > start {
        // SAFETY: [start, end) lies inside the block just allocated; advice
        // never changes its contents. Failure (THP off) is ignored.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

// SAFETY: every call is forwarded unchanged to `System`; the extra work is
// an atomic counter and a madvise hint.
unsafe impl GlobalAlloc for TandemAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is System's contract.
        let p = unsafe { System.alloc(layout) };
        advise_huge(p, layout.size());
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        let p = unsafe { System.alloc_zeroed(layout) };
        advise_huge(p, layout.size());
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new_size, Ordering::Relaxed);
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        advise_huge(p, new_size);
        p
    }
}
