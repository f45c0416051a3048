//! The bucket hash: SipHash-1-3 with a 128-bit cluster secret.
//!
//! SipHash is a keyed PRF: without the key a client cannot choose a source address or port that
//! lands in a bucket of its choice, so it cannot steer its traffic to one node (GitHub GLB makes
//! the same choice). The 1-3 variant (one compression round, three finalisation rounds) is the
//! one Rust's std uses for `HashMap`; it is cheap enough for the XDP fast path.
//!
//! The input is as short as the affinity allows: 4 bytes (IPv4 client address), 16 bytes (IPv6),
//! plus 2 bytes of source port for `connection` affinity. The function is written with constant
//! loop bounds only, so the eBPF verifier accepts it after LLVM unrolls it.

use crate::maps::BUCKET_MASK;

/// The 128-bit hash key, as two little-endian 64-bit halves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[repr(C)]
pub struct HashKey {
    pub k0: u64,
    pub k1: u64,
}

impl HashKey {
    /// Builds the key from 16 bytes (little-endian halves, as the SipHash reference does).
    pub const fn from_bytes(b: &[u8; 16]) -> Self {
        Self {
            k0: u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            k1: u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
        }
    }

    pub const fn to_bytes(self) -> [u8; 16] {
        let a = self.k0.to_le_bytes();
        let b = self.k1.to_le_bytes();
        [
            a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], b[0], b[1], b[2], b[3], b[4], b[5],
            b[6], b[7],
        ]
    }
}

#[inline(always)]
fn sipround(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13);
    v[1] ^= v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16);
    v[3] ^= v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21);
    v[3] ^= v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17);
    v[1] ^= v[2];
    v[2] = v[2].rotate_left(32);
}

/// SipHash-1-3 of a fixed-size message (the standard algorithm, byte for byte).
#[inline(always)]
pub fn siphash13<const N: usize>(key: &HashKey, data: &[u8; N]) -> u64 {
    let mut v = [
        key.k0 ^ 0x736f_6d65_7073_6575,
        key.k1 ^ 0x646f_7261_6e64_6f6d,
        key.k0 ^ 0x6c79_6765_6e65_7261,
        key.k1 ^ 0x7465_6462_7974_6573,
    ];
    let full = N / 8;
    let mut i = 0;
    while i < full {
        let o = i * 8;
        let m = u64::from_le_bytes([
            data[o],
            data[o + 1],
            data[o + 2],
            data[o + 3],
            data[o + 4],
            data[o + 5],
            data[o + 6],
            data[o + 7],
        ]);
        v[3] ^= m;
        sipround(&mut v);
        v[0] ^= m;
        i += 1;
    }
    // Last block: the remaining bytes, and the message length in the top byte.
    let mut b: u64 = ((N as u64) & 0xff) << 56;
    let mut j = 0;
    while j < N % 8 {
        b |= (data[full * 8 + j] as u64) << (8 * j);
        j += 1;
    }
    v[3] ^= b;
    sipround(&mut v);
    v[0] ^= b;
    v[2] ^= 0xff;
    sipround(&mut v);
    sipround(&mut v);
    sipround(&mut v);
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

/// What a packet is hashed on. IPv4 and IPv6 hash different message lengths, so an IPv4 client
/// and its IPv4-mapped IPv6 form are distinct keys (they are distinct clients on the wire too).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BucketKey {
    /// `client` affinity on IPv4 (and every IPv4 fragment).
    V4([u8; 4]),
    /// `connection` affinity on IPv4: address and source port (network order).
    V4Port([u8; 4], [u8; 2]),
    /// `client` affinity on IPv6.
    V6([u8; 16]),
    /// `connection` affinity on IPv6.
    V6Port([u8; 16], [u8; 2]),
}

impl BucketKey {
    /// The message as SipHash reads it (see `Msg`). Inlined: on BPF a call is a subprogram
    /// call, which the ARP/NDP paths would pay.
    #[inline(always)]
    pub const fn msg(self) -> Msg {
        match self {
            BucketKey::V4(a) => Msg::v4(u32::from_le_bytes(a)),
            BucketKey::V4Port(a, p) => Msg::v4_port(u32::from_le_bytes(a), u16::from_le_bytes(p)),
            BucketKey::V6(a) => Msg::v6(le64(&a, 0), le64(&a, 8)),
            BucketKey::V6Port(a, p) => {
                Msg::v6_port(le64(&a, 0), le64(&a, 8), u16::from_le_bytes(p))
            }
        }
    }
}

/// The little-endian word at byte `o` (0 or 8) of a 16-byte address: the form SipHash and the
/// VIP table compare.
#[inline(always)]
pub const fn le64(a: &[u8; 16], o: usize) -> u64 {
    u64::from_le_bytes([
        a[o],
        a[o + 1],
        a[o + 2],
        a[o + 3],
        a[o + 4],
        a[o + 5],
        a[o + 6],
        a[o + 7],
    ])
}

/// A bucket key as the words SipHash consumes: `blocks` full 8-byte blocks (0 for IPv4, 2 for
/// IPv6, the address) and the last block (the remaining bytes, little-endian, with the message
/// length in the top byte). The data plane builds it from plain loads of the packet (a
/// little-endian load of the wire bytes is exactly SipHash's reading of them), and the three
/// words identify the key exactly: they are also the tag of the per-CPU bucket cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Msg {
    pub m0: u64,
    pub m1: u64,
    pub last: u64,
}

impl Msg {
    /// `client` affinity, IPv4: `addr` is the address's 4 bytes read little-endian.
    #[inline(always)]
    pub const fn v4(addr: u32) -> Self {
        Self {
            m0: 0,
            m1: 0,
            last: (4 << 56) | addr as u64,
        }
    }
    /// `connection` affinity, IPv4: `port` is the source port's 2 bytes read little-endian.
    #[inline(always)]
    pub const fn v4_port(addr: u32, port: u16) -> Self {
        Self {
            m0: 0,
            m1: 0,
            last: (6 << 56) | ((port as u64) << 32) | addr as u64,
        }
    }
    /// `client` affinity, IPv6: the address's two halves read little-endian.
    #[inline(always)]
    pub const fn v6(a0: u64, a1: u64) -> Self {
        Self {
            m0: a0,
            m1: a1,
            last: 16 << 56,
        }
    }
    /// `connection` affinity, IPv6.
    #[inline(always)]
    pub const fn v6_port(a0: u64, a1: u64, port: u16) -> Self {
        Self {
            m0: a0,
            m1: a1,
            last: (18 << 56) | port as u64,
        }
    }

    /// Whether the message has the two full blocks of an IPv6 address.
    #[inline(always)]
    const fn long(&self) -> bool {
        self.last >> 56 >= 16
    }
}

/// SipHash-1-3 of a bucket key's message (equal to `siphash13` of its bytes).
#[inline(always)]
pub fn siphash13_msg(key: &HashKey, m: &Msg) -> u64 {
    let mut v = [
        key.k0 ^ 0x736f_6d65_7073_6575,
        key.k1 ^ 0x646f_7261_6e64_6f6d,
        key.k0 ^ 0x6c79_6765_6e65_7261,
        key.k1 ^ 0x7465_6462_7974_6573,
    ];
    if m.long() {
        v[3] ^= m.m0;
        sipround(&mut v);
        v[0] ^= m.m0;
        v[3] ^= m.m1;
        sipround(&mut v);
        v[0] ^= m.m1;
    }
    v[3] ^= m.last;
    sipround(&mut v);
    v[0] ^= m.last;
    v[2] ^= 0xff;
    sipround(&mut v);
    sipround(&mut v);
    sipround(&mut v);
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

/// The bucket of a message: the low bits of its SipHash-1-3.
#[inline(always)]
pub fn bucket_of_msg(key: &HashKey, m: &Msg) -> u32 {
    (siphash13_msg(key, m) as u32) & BUCKET_MASK
}

/// The bucket of a client: the low bits of SipHash-1-3 of the key.
#[inline(always)]
pub fn bucket_of(key: &HashKey, k: BucketKey) -> u32 {
    bucket_of_msg(key, &k.msg())
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::hash::Hasher as _;
    use std::collections::HashSet;

    fn reference(key: &HashKey, data: &[u8]) -> u64 {
        let mut h = siphasher::sip::SipHasher13::new_with_keys(key.k0, key.k1);
        h.write(data);
        h.finish()
    }

    #[test]
    fn matches_reference_implementation() {
        let key = HashKey::from_bytes(&[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]);
        let m: [u8; 18] = core::array::from_fn(|i| i as u8);
        assert_eq!(siphash13(&key, &[0u8; 0]), reference(&key, &[]));
        assert_eq!(siphash13(&key, &[0u8, 1, 2, 3]), reference(&key, &m[..4]));
        assert_eq!(
            siphash13(&key, &[0u8, 1, 2, 3, 4, 5]),
            reference(&key, &m[..6])
        );
        let m8: [u8; 8] = core::array::from_fn(|i| i as u8);
        assert_eq!(siphash13(&key, &m8), reference(&key, &m[..8]));
        let m16: [u8; 16] = core::array::from_fn(|i| i as u8);
        assert_eq!(siphash13(&key, &m16), reference(&key, &m[..16]));
        assert_eq!(siphash13(&key, &m), reference(&key, &m));
        // And many keys and inputs.
        let mut x = 0x1234_5678_9abc_def0u64;
        for _ in 0..1000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let key = HashKey {
                k0: x,
                k1: x.rotate_left(17) ^ 0x55,
            };
            let a: [u8; 16] = core::array::from_fn(|i| (x >> (i % 8 * 8)) as u8 ^ i as u8);
            assert_eq!(siphash13(&key, &a), reference(&key, &a));
        }
    }

    #[test]
    fn the_word_form_hashes_the_same_bytes() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            x
        };
        for _ in 0..1000 {
            let key = HashKey {
                k0: next(),
                k1: next(),
            };
            let a: [u8; 16] = core::array::from_fn(|i| (next() >> (i % 8)) as u8);
            let a4 = [a[0], a[1], a[2], a[3]];
            let p = [a[5], a[9]];
            let m18: [u8; 18] = core::array::from_fn(|i| if i < 16 { a[i] } else { p[i - 16] });
            let cases: [(BucketKey, u64); 4] = [
                (BucketKey::V4(a4), reference(&key, &a4)),
                (
                    BucketKey::V4Port(a4, p),
                    reference(&key, &[a4[0], a4[1], a4[2], a4[3], p[0], p[1]]),
                ),
                (BucketKey::V6(a), reference(&key, &a)),
                (BucketKey::V6Port(a, p), reference(&key, &m18)),
            ];
            for (k, want) in cases {
                assert_eq!(siphash13_msg(&key, &k.msg()), want, "{k:?}");
                assert_eq!(bucket_of(&key, k), (want as u32) & BUCKET_MASK);
            }
        }
    }

    #[test]
    fn bucket_depends_on_key_and_port() {
        let k1 = HashKey { k0: 1, k1: 2 };
        let k2 = HashKey { k0: 3, k1: 4 };
        let differs = (0..64u8).any(|i| {
            let a = [10, 0, i, 1];
            bucket_of(&k1, BucketKey::V4(a)) != bucket_of(&k2, BucketKey::V4(a))
        });
        assert!(differs, "the key must change the buckets");
        let a = [10, 0, 0, 1];
        let ports: HashSet<u32> = (0..64u16)
            .map(|p| bucket_of(&k1, BucketKey::V4Port(a, p.to_be_bytes())))
            .collect();
        assert!(ports.len() > 50, "ports must spread: {}", ports.len());
        let v6: HashSet<u32> = (0..64u8)
            .map(|i| {
                let mut a = [0u8; 16];
                a[15] = i;
                bucket_of(&k1, BucketKey::V6Port(a, [0, 80]))
            })
            .collect();
        assert!(v6.len() > 50);
    }
}
