//! Host memory for large numeric buffers: zero-filled vectors placed, where the kernel
//! allows, on transparent huge pages.

use num_traits::Zero;

/// A zero-filled buffer of `len` elements. Buffers of 64 MiB and more (embedding tables and
/// their moments) are asked to live on transparent huge pages, before any page is touched:
/// their rows are read at random, and with 4 KiB pages nearly every row costs a TLB miss.
/// Where the kernel does not allow it the advice is ignored (results never depend on it).
pub fn zeroed<F: Zero + Clone>(len: usize) -> Vec<F> {
    let mut buf = vec![F::zero(); len];
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let bytes = std::mem::size_of_val(buf.as_slice());
        if bytes >= 64 << 20 {
            let start = buf.as_mut_ptr() as usize;
            let aligned = start.next_multiple_of(HUGE);
            let end = (start + bytes) / HUGE * HUGE;
            if end > aligned {
                // SAFETY: the range lies inside `buf`'s allocation and is 2 MiB-aligned;
                // MADV_HUGEPAGE changes only how the kernel backs the pages, not their
                // contents, and its failure is harmless.
                unsafe { libc::madvise(aligned as *mut libc::c_void, end - aligned, libc::MADV_HUGEPAGE) };
            }
        }
    }
    buf
}
