//! Plumbing for the rayon loops of the ops: per-thread reusable [`scratch`] buffers and
//! [`SharedOut`], an output buffer that parallel tasks fill in disjoint pieces.

use std::cell::Cell;
use std::marker::PhantomData;

thread_local! {
    /// This thread's scratch buffer (empty while lent out by [`scratch`]).
    static SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Runs `f` on a buffer of `len` floats lent from the calling thread's scratch, which keeps
/// its allocation (the largest `len` seen) for the next call, so repeated ops do not allocate
/// and page-fault fresh memory each time. The contents are left over from earlier use: `f` must
/// write every element before reading it. Re-entrant: a nested call on the same thread (rayon
/// work stealing inside `f`) gets a fresh buffer instead.
pub(crate) fn scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buf = SCRATCH.take();
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    let r = f(&mut buf[..len]);
    SCRATCH.set(buf);
    r
}

/// A mutable output buffer shared by parallel tasks that each write their own elements (e.g.
/// one (segment, head) block of `[T, nh·hd]`, which is not a contiguous sub-slice).
pub(crate) struct SharedOut<'a> {
    ptr: *mut f32,
    len: usize,
    _buf: PhantomData<&'a mut [f32]>,
}

// SAFETY: `SharedOut` only hands out writes through `write`, whose contract makes every
// element written by at most one thread at a time; the buffer is borrowed mutably for `'a`.
unsafe impl Send for SharedOut<'_> {}
unsafe impl Sync for SharedOut<'_> {}

impl<'a> SharedOut<'a> {
    /// Shares `buf` (exclusively borrowed for as long as the `SharedOut` lives).
    pub(crate) fn new(buf: &'a mut [f32]) -> Self {
        SharedOut {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            _buf: PhantomData,
        }
    }

    /// Copies `src` to elements `offset..offset + src.len()`.
    ///
    /// # Panics
    /// If the range is out of bounds.
    ///
    /// # Safety
    /// No other thread may read or write any of these elements while this runs (callers give
    /// each task a disjoint set of elements).
    pub(crate) unsafe fn write(&self, offset: usize, src: &[f32]) {
        assert!(
            offset <= self.len && src.len() <= self.len - offset,
            "SharedOut::write: {offset}+{} out of bounds of {}",
            src.len(),
            self.len
        );
        // SAFETY: in bounds (checked above), `src` cannot alias the exclusively borrowed
        // buffer, and the caller guarantees no concurrent access to the range.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(offset), src.len()) };
    }
}
