//! The process's memory: how much freed memory it keeps for reuse.

/// Freed memory that glibc's malloc keeps for reuse, per arena, before it
/// hands any back to the kernel: twice this.
///
/// A bulk flow frees its acknowledged records (up to 64 KiB each, a flow
/// window of them) and QUIC's receive batches in bursts of a few MiB. With
/// glibc's default thresholds (128 KiB) each burst was handed back with
/// `madvise` and, moments later, faulted in again page by page, zeroed: ~50
/// page faults per MiB moved at agent A and ~35 at agent B, some 5 % of their
/// CPU (`comsat-bench`'s "minor page faults per GB" shows it).
const KEEP_FREED: usize = 4 << 20;

/// Raises glibc's trim threshold to 2 × [`KEEP_FREED`] (and its mmap
/// threshold to [`KEEP_FREED`]) without `unsafe`: glibc's thresholds are
/// dynamic by default, and freeing a block that was mapped on its own,
/// larger than the current mmap threshold (and at most 32 MiB), raises the
/// mmap threshold to its size and the trim threshold to twice that
/// (mallopt(3), "M_MMAP_THRESHOLD"). Where an operator set either threshold
/// (`GLIBC_TUNABLES`, `MALLOC_TRIM_THRESHOLD_`), glibc keeps theirs; other C
/// libraries just see one allocation. The cost: after a burst, up to
/// 8 MiB of freed memory per arena stays mapped for the next one.
pub fn keep_freed_memory() {
    drop(std::hint::black_box(Vec::<u8>::with_capacity(KEEP_FREED)));
}
