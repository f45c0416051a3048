//! Bounds-checked packet access: every read and write goes through these, so the verifier sees a
//! comparison against `data_end` for each one.

use core::{arch::asm, mem::size_of};

use aya_ebpf::programs::XdpContext;

pub const ETH_HLEN: usize = 14;

#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

#[inline(always)]
pub fn ptr_at_mut<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    ptr_at::<T>(ctx, off).map(|p| p as *mut T)
}

#[inline(always)]
pub fn load<T: Copy>(ctx: &XdpContext, off: usize) -> Option<T> {
    // SAFETY: ptr_at checked that size_of::<T>() bytes at `off` are inside the packet; T is a
    // plain byte array or integer read unaligned.
    ptr_at::<T>(ctx, off).map(|p| unsafe { core::ptr::read_unaligned(p) })
}

#[inline(always)]
pub fn load_u8(ctx: &XdpContext, off: usize) -> Option<u8> {
    load::<u8>(ctx, off)
}

#[inline(always)]
pub fn load_u16_be(ctx: &XdpContext, off: usize) -> Option<u16> {
    ld16(ctx, off).map(u16::from_be)
}

#[inline(always)]
pub fn store<T: Copy>(ctx: &XdpContext, off: usize, v: T) -> Option<()> {
    // SAFETY: as in `load`, bounds checked by ptr_at_mut.
    ptr_at_mut::<T>(ctx, off).map(|p| unsafe { core::ptr::write_unaligned(p, v) })
}

/// Length of the frame.
#[inline(always)]
pub fn frame_len(ctx: &XdpContext) -> u64 {
    (ctx.data_end() - ctx.data()) as u64
}

/// One load instruction of `$size` bytes at `$p`, whatever its alignment. LLVM splits every load
/// it cannot prove aligned into byte loads on BPF (a load, a shift and an or per byte), and
/// packet headers sit at any alignment; the verifier accepts unaligned packet loads on the
/// architectures that have efficient unaligned access (x86-64, arm64). The value is the bytes
/// read little-endian, as the BPF target (bpfel) reads them.
macro_rules! raw_load {
    ($size:literal, $p:expr) => {{
        let v: u64;
        // SAFETY: callers pass a pointer whose `$size` bytes were bounds-checked against
        // `data_end`; the instruction only reads them.
        unsafe {
            asm!(
                concat!("{0} = *(", $size, " *)({1} + 0)"),
                lateout(reg) v,
                in(reg) $p,
                options(nostack, readonly, preserves_flags)
            )
        };
        v
    }};
}

/// Two bytes at `off`, read little-endian (wire order in memory: `u16::from_be` gives the
/// network-order value).
#[inline(always)]
pub fn ld16(ctx: &XdpContext, off: usize) -> Option<u16> {
    let p = ptr_at::<[u8; 2]>(ctx, off)?;
    Some(raw_load!("u16", p) as u16)
}

/// Four bytes at `off`, read little-endian.
#[inline(always)]
pub fn ld32(ctx: &XdpContext, off: usize) -> Option<u32> {
    let p = ptr_at::<[u8; 4]>(ctx, off)?;
    Some(raw_load!("u32", p) as u32)
}

/// The words of a bounds-checked packet region (`Region::at`).
#[derive(Clone, Copy)]
pub struct Region(usize);

impl Region {
    /// The `N` bytes at `off`, checked once against `data_end`; the loads below stay inside.
    #[inline(always)]
    pub fn at<const N: usize>(ctx: &XdpContext, off: usize) -> Option<Self> {
        ptr_at::<[u8; N]>(ctx, off).map(|p| Self(p as usize))
    }
    #[inline(always)]
    pub fn u8(self, i: usize) -> u8 {
        // SAFETY: `i` is inside the region checked by `at` (callers use constant offsets).
        unsafe { *((self.0 + i) as *const u8) }
    }
    #[inline(always)]
    pub fn u16(self, i: usize) -> u16 {
        raw_load!("u16", self.0 + i) as u16
    }
    #[inline(always)]
    pub fn u32(self, i: usize) -> u32 {
        raw_load!("u32", self.0 + i) as u32
    }
    #[inline(always)]
    pub fn u64(self, i: usize) -> u64 {
        raw_load!("u64", self.0 + i)
    }
}
