//! Bounds-checked packet access: every read and write goes through these, so the verifier sees a
//! comparison against `data_end` for each one.

use core::mem::size_of;

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
    load::<[u8; 2]>(ctx, off).map(u16::from_be_bytes)
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
