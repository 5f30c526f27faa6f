//! The process's global allocator: mimalloc, called so that ordinary layouts take its fast
//! path. The binary installs it with `#[global_allocator]`; benchmarks that time code the
//! gateway runs install the same one, so they measure the memory layout production gets.
//! Nothing here may allocate or panic.
#![allow(unsafe_code)]

/// mimalloc as the global allocator, asked for alignment only when a layout needs more than
/// any block already has. (The `mimalloc` crate's allocator passes every layout to
/// `mi_malloc_aligned`, whose fast path covers only small power-of-two-friendly sizes: a
/// connection's 8 KiB read buffer or a request's future took its over-allocating slow
/// path, several times per request.)
pub struct Mimalloc;

impl Mimalloc {
    /// Whether a plain mimalloc block satisfies `layout`'s alignment: every block is
    /// aligned to 8, and blocks of 16 bytes or more to 16 (`MI_MAX_ALIGN_SIZE`).
    #[inline]
    fn plain(align: usize, size: usize) -> bool {
        align <= 8 || (align <= 16 && size >= 16)
    }
}

// SAFETY: every pointer handed out comes from mimalloc with at least the layout's size and
// alignment (`plain` holds exactly when mimalloc's own guarantee covers the alignment;
// otherwise the aligned entry points are used), and is freed or resized only by mimalloc,
// which finds a block's heap and size from the pointer alone.
unsafe impl std::alloc::GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let (size, align) = (layout.size(), layout.align());
        if Self::plain(align, size) {
            libmimalloc_sys::mi_malloc(size).cast()
        } else {
            libmimalloc_sys::mi_malloc_aligned(size, align).cast()
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        let (size, align) = (layout.size(), layout.align());
        if Self::plain(align, size) {
            libmimalloc_sys::mi_zalloc(size).cast()
        } else {
            libmimalloc_sys::mi_zalloc_aligned(size, align).cast()
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: std::alloc::Layout) {
        libmimalloc_sys::mi_free(ptr.cast());
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        if Self::plain(layout.align(), new_size) {
            libmimalloc_sys::mi_realloc(ptr.cast(), new_size).cast()
        } else {
            libmimalloc_sys::mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
        }
    }
}
