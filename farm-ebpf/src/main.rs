//! farm's data plane: an XDP bucket filter for shared virtual IPs, plus a tc egress companion.
//!
//! `farm_xdp` (ingress, every frame): frames for a VIP are hashed into a bucket; a bucket this
//! node owns is accepted (destination MAC rewritten to the interface's, XDP_PASS), any other is
//! dropped before the stack sees it. ARP requests and IPv6 neighbour solicitations for a VIP are
//! answered here with the cluster MAC (by exactly one node: the owner of the requester's bucket);
//! the kernel never sees them. Everything else passes untouched.
//!
//! `farm_egress` (tc egress): ARP and NDP packets the kernel sends *from* a VIP (when it resolves
//! a client) get the cluster MAC as their link-layer address, so no client ever learns a node's
//! own MAC for the VIP.
//!
//! `farm_ingress` (tc ingress): sends back out the ARP/NDP answers the XDP program passed up
//! marked (so that they carry the VLAN tag their request had in the packet's metadata), and marks
//! frames the XDP program accepted as addressed to this host, for drivers that keep a stale packet
//! type after XDP (veth).
//!
//! `farm_empty`: an XDP program that only returns XDP_PASS; the benchmark's floor, and the test
//! harness's program for the switch side of veth pairs (so XDP_TX frames are received).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

// The program only exists for the BPF target (farm-daemon's build.rs builds it with aya-build).
// On the host this crate is an empty binary so that workspace-wide cargo commands work.
#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("farm-ebpf is built for bpfel-unknown-none by farm-daemon's build.rs");
}

#[cfg(target_arch = "bpf")]
mod arp;
#[cfg(target_arch = "bpf")]
mod csum;
#[cfg(target_arch = "bpf")]
mod ipv4;
#[cfg(target_arch = "bpf")]
mod ipv6;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod ndp;
#[cfg(target_arch = "bpf")]
mod ptr;
#[cfg(target_arch = "bpf")]
mod tc;
#[cfg(target_arch = "bpf")]
mod verdict;

#[cfg(target_arch = "bpf")]
use aya_ebpf::{
    bindings::xdp_action,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

#[cfg(target_arch = "bpf")]
use crate::ptr::{ETH_HLEN, load_u16_be};

#[cfg(target_arch = "bpf")]
pub const ETH_P_IP: u16 = 0x0800;
#[cfg(target_arch = "bpf")]
pub const ETH_P_IPV6: u16 = 0x86dd;
#[cfg(target_arch = "bpf")]
pub const ETH_P_ARP: u16 = 0x0806;
#[cfg(target_arch = "bpf")]
pub const ETH_P_8021Q: u16 = 0x8100;
#[cfg(target_arch = "bpf")]
pub const ETH_P_8021AD: u16 = 0x88a8;

#[cfg(target_arch = "bpf")]
#[xdp]
// The body in the entry point itself: a BPF-to-BPF call costs a call and a return, which the
// CPU's speculation mitigations make expensive (it measured ~5 ns of the per-packet cost).
#[inline(always)]
pub fn farm_xdp(ctx: XdpContext) -> u32 {
    let Some(ctl) = maps::control() else {
        return xdp_action::XDP_PASS;
    };
    // Ethernet, with at most one 802.1Q / 802.1ad tag.
    let Some(mut ethertype) = load_u16_be(&ctx, 12) else {
        maps::stat(farm_common::stat::ERR_ETH_SHORT);
        return xdp_action::XDP_PASS;
    };
    let mut l3 = ETH_HLEN;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        let Some(inner) = load_u16_be(&ctx, 16) else {
            maps::stat(farm_common::stat::ERR_VLAN_SHORT);
            return xdp_action::XDP_PASS;
        };
        ethertype = inner;
        l3 = ETH_HLEN + 4;
    }
    match ethertype {
        ETH_P_IP => ipv4::handle(&ctx, ctl, l3),
        ETH_P_IPV6 => ipv6::handle(&ctx, ctl, l3),
        ETH_P_ARP => arp::handle(&ctx, ctl, l3),
        _ => {
            maps::stat(farm_common::stat::NOT_VIP);
            xdp_action::XDP_PASS
        }
    }
}

#[cfg(target_arch = "bpf")]
#[xdp]
pub fn farm_empty(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Returns XDP_TX: run through BPF_PROG_TEST_RUN in live-frames mode it transmits a frame out of
/// an interface at line rate (the benchmark's traffic generator; farmd never attaches it).
#[cfg(target_arch = "bpf")]
#[xdp]
pub fn farm_tx(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_TX
}

#[cfg(target_arch = "bpf")]
#[classifier]
pub fn farm_egress(ctx: TcContext) -> i32 {
    tc::egress(&ctx)
}

#[cfg(target_arch = "bpf")]
#[classifier]
pub fn farm_ingress(ctx: TcContext) -> i32 {
    tc::ingress(&ctx)
}

#[cfg(target_arch = "bpf")]
#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
