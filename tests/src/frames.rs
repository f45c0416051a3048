//! Builders of crafted Ethernet frames for the XDP packet fixtures and the benchmark.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const IF_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x11];
pub const CLUSTER_MAC: [u8; 6] = [0x02, 0xfa, 0x00, 0x00, 0x00, 0x01];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0xc1];

pub fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Ethernet with one 802.1Q tag.
pub fn eth_vlan(dst: [u8; 6], src: [u8; 6], vid: u16, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(18 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&0x8100u16.to_be_bytes());
    f.extend_from_slice(&vid.to_be_bytes());
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// IPv4 fields that fixtures vary.
#[derive(Clone, Debug)]
pub struct V4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    /// Bytes of options (multiple of 4).
    pub options: usize,
    /// More-fragments flag.
    pub mf: bool,
    /// Fragment offset in 8-byte units.
    pub frag_offset: u16,
    pub id: u16,
}

impl V4 {
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, proto: u8) -> Self {
        Self {
            src,
            dst,
            proto,
            options: 0,
            mf: false,
            frag_offset: 0,
            id: 1,
        }
    }

    pub fn build(&self, payload: &[u8]) -> Vec<u8> {
        let ihl = 5 + self.options / 4;
        let total = ihl * 4 + payload.len();
        let mut h = vec![
            0x40 | ihl as u8,
            0,
            (total >> 8) as u8,
            total as u8,
            (self.id >> 8) as u8,
            self.id as u8,
        ];
        let frag = (if self.mf { 0x2000 } else { 0 }) | (self.frag_offset & 0x1fff);
        h.extend_from_slice(&frag.to_be_bytes());
        h.extend_from_slice(&[64, self.proto, 0, 0]);
        h.extend_from_slice(&self.src.octets());
        h.extend_from_slice(&self.dst.octets());
        // Options: NOPs ending with End of Options.
        for i in 0..self.options {
            h.push(if i + 1 == self.options { 0 } else { 1 });
        }
        let sum = checksum(&h);
        h[10..12].copy_from_slice(&sum.to_be_bytes());
        h.extend_from_slice(payload);
        h
    }
}

/// A TCP header (20 bytes) with SYN set.
pub fn tcp(sport: u16, dport: u16) -> Vec<u8> {
    tcp_flags(sport, dport, 0x02)
}

/// A TCP header (20 bytes) with the given flags (0x10 = ACK, 0x02 = SYN, ...).
pub fn tcp_flags(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = Vec::with_capacity(20);
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    t
}

pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::with_capacity(8 + payload.len());
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

/// ICMP (v4 or v6) message: type, code, 4 bytes of rest-of-header, body.
pub fn icmp(ty: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut m = vec![ty, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(body);
    m
}

pub fn arp(op: u16, sha: [u8; 6], spa: Ipv4Addr, tha: [u8; 6], tpa: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4];
    a.extend_from_slice(&op.to_be_bytes());
    a.extend_from_slice(&sha);
    a.extend_from_slice(&spa.octets());
    a.extend_from_slice(&tha);
    a.extend_from_slice(&tpa.octets());
    a
}

/// IPv6 header plus payload; `ext` is a chain of extension headers (already encoded, with their
/// next-header bytes right) placed before the payload, `first_nh` names the first one.
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, first_nh: u8, ext: &[u8], payload: &[u8]) -> Vec<u8> {
    let len = ext.len() + payload.len();
    let mut h = vec![0x60, 0, 0, 0, (len >> 8) as u8, len as u8, first_nh, 64];
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(ext);
    h.extend_from_slice(payload);
    h
}

/// An 8-byte hop-by-hop / destination-options header (PadN only).
pub fn ext_opts(next: u8) -> Vec<u8> {
    vec![next, 0, 1, 4, 0, 0, 0, 0]
}

/// An IPv6 fragment header.
pub fn ext_frag(next: u8, offset: u16, more: bool, id: u32) -> Vec<u8> {
    let om = (offset << 3) | more as u16;
    let mut h = vec![next, 0];
    h.extend_from_slice(&om.to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h
}

/// A neighbour solicitation for `target` with a source link-layer address option.
pub fn neighbour_solicitation(target: Ipv6Addr, sll: [u8; 6]) -> Vec<u8> {
    let mut m = vec![135, 0, 0, 0, 0, 0, 0, 0];
    m.extend_from_slice(&target.octets());
    m.extend_from_slice(&[1, 1]);
    m.extend_from_slice(&sll);
    m
}

/// Solicited-node multicast address of `a`.
pub fn solicited_node(a: Ipv6Addr) -> Ipv6Addr {
    let o = a.octets();
    Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | o[13] as u16,
        u16::from_be_bytes([o[14], o[15]]),
    )
}

/// The Internet checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
