//! The heartbeat message: what members tell each other several times a second, authenticated
//! with the cluster key.
//!
//! Wire format (big-endian), 168 bytes plus the sender's id and, from version 6 on, extensions:
//!
//! ```text
//!  0  magic "FRMH"            4
//!  4  version (5 or 6)        1   the format the sender wrote
//!
//!  5  state                   1   joining, active, draining, leaving, unhealthy
//!  6  weight                  2
//!  8  incarnation             8   set once per farmd start, never smaller than the previous
//!                                 one (persisted in the state directory, wall clock as a floor)
//! 16  sequence                8   +1 per round of heartbeats within an incarnation
//! 24  applied                 8   target serving set (member mask) the sender's table is written for
//! 32  config digest           8   hash of the member list and weights it was configured with
//! 40  id length               1
//! 41  network index           1   which heartbeat network the message was sent on
//! 42  oldest reader           1   v6+: the oldest version that reads this message (6); v5: 0
//! 43  reserved                5
//! 48  settled                 8   members (bit = index by id) serving in the sender's settled map
//! 56  handed over             8   the target set for which the sender has handed its buckets over
//! 64  released                8   the target set for which the sender's outgoing buckets no longer
//!                                 take new connections
//! 72  applied weights         8   the weights (config digest) of each of the four views above:
//! 80  settled weights         8   a view is a serving set and the weights its map is computed
//! 88  handed-over weights     8   with, so that a weight change moves buckets like a join does
//! 96  released weights        8
//! 104 drill id                4   a recovery drill the sender runs (0: none), on member...
//! 108 drill member            1   ...with this index (by id); that member acts as if crashed
//! 109 reserved                3
//! 112 mirror role             1   0 none, 1 secondary, 2 primary, 3 primary handing over
//! 113 mirror flags            1   1 copy complete, 2 replica in sync (primary), 4 yields the
//!                                 primary role to the peer, 8 asks the primary for a swap
//! 114 reserved                6
//! 120 mirror generation       8   the data generation of the sender's copy
//! 128 mirror seen             8   the highest generation the sender has seen its peer announce
//! 136 echo incarnation        8   the receiver's newest (incarnation, sequence) the sender has
//! 144 echo sequence           8   authenticated: the receiver's challenge, answered (see below)
//! 152 id                      n   1..=63 bytes
//! 152+n  extensions           e   v6+: (type 1, length 1, value) each; none in v5
//! 152+n+e  HMAC-SHA256        16  over everything before it, truncated
//! ```
//!
//! # Versions
//!
//! Version N reads N-1 and N, and reads a later version whose "oldest reader" byte it is
//! old enough for: a later version adds extensions (which N skips when it does not know their
//! type) and sets that byte higher only for a change N could not read correctly. A member
//! always writes its newest version, and to a peer whose current incarnation wrote only an
//! older one (an earlier release, during a rolling upgrade) also a copy in that version, right
//! after it. The older reader (farm 0.1 reads only v5) drops the newer copy and counts it as
//! `bad_version`; a newer reader drops the older copy of a peer it heard the newer version
//! from (`superseded`). Always writing the newest means two upgraded members find each other
//! whatever they heard first (answering in the version last heard would leave them at the
//! older one).
//!
//! Extensions of version 6:
//!
//! ```text
//! type 1  departed            8   members (bit = index by id) the sender saw leave by a
//!                                 planned stop and not come back: they do not count for
//!                                 quorum (see `membership`)
//! ```
//!
//! Each heartbeat is addressed to one peer and echoes that peer's own newest incarnation and
//! sequence. A receiver accepts a heartbeat only if it echoes the receiver's *current*
//! incarnation and a recent sequence of it, and only if its (incarnation, sequence) is newer
//! than anything accepted from that sender on that network in the receiver's life (never
//! forgotten, also not when the sender is declared lost). So a captured heartbeat is never
//! accepted again: not while the receiver runs (older than the newest), not after the sender
//! died (same), and not after the receiver restarted (it echoes the receiver's old
//! incarnation). See `membership`.
//!
//! Decoding never panics: truncated, oversized, foreign, unauthenticated and replayed messages
//! are rejected with a reason, which the daemon counts. [`parse`] reads a message without
//! authenticating it, so that cheap checks (sender, source address, replay) can drop a flood
//! before the HMAC is computed; [`authenticate`] checks the tag.

use hmac::{Hmac, Mac as _};
use sha2::Sha256;

use crate::transition::View;

pub const MAGIC: [u8; 4] = *b"FRMH";
/// The newest version this build writes and reads.
pub const VERSION: u8 = 6;
/// The oldest version this build reads (and writes, to a peer that speaks only that one).
pub const OLDEST: u8 = 5;
/// Bytes before the id.
pub const FIXED: usize = 152;
const TAG: usize = 16;
pub const MAX_ID: usize = 63;
/// Room for extensions, this version's and later ones'.
const MAX_EXT: usize = 512;
pub const MAX_LEN: usize = FIXED + MAX_ID + MAX_EXT + TAG;
/// Extension types.
const EXT_DEPARTED: u8 = 1;

/// A member's state as it announces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Started, not yet serving.
    Joining,
    /// Serving its share.
    Active,
    /// Handing its buckets to the others before leaving or on request.
    Draining,
    /// Stopping.
    Leaving,
    /// Its health checks fail.
    Unhealthy,
}

impl State {
    fn to_u8(self) -> u8 {
        match self {
            State::Joining => 0,
            State::Active => 1,
            State::Draining => 2,
            State::Leaving => 3,
            State::Unhealthy => 4,
        }
    }
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => State::Joining,
            1 => State::Active,
            2 => State::Draining,
            3 => State::Leaving,
            4 => State::Unhealthy,
            _ => return None,
        })
    }
}

/// A heartbeat's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    /// The wire version it was read in, or is to be written in ([`OLDEST`]..=[`VERSION`]).
    pub version: u8,
    pub id: String,
    pub state: State,
    pub weight: u16,
    pub incarnation: u64,
    pub seq: u64,
    /// The view (serving set, bit i = member i, and weights) of the bucket map the sender has
    /// applied to its data plane: a member taking buckets over waits until their previous owner
    /// has applied the move.
    pub applied: View,
    pub config_digest: u64,
    pub network: u8,
    /// The view of the sender's settled bucket map.
    pub settled: View,
    /// The target view for which the sender has finished handing over its buckets.
    pub handed_over: View,
    /// The target view for which the sender's outgoing buckets no longer take new connections
    /// (it releases them once every taker has applied the target).
    pub released: View,
    /// A recovery drill the sender runs: (drill id, non-zero; index of the member that is to act
    /// as if it crashed).
    pub drill: Option<(u32, u8)>,
    /// The sender's mirror group state.
    pub mirror: MirrorBeat,
    /// The receiver's newest (incarnation, sequence) the sender has authenticated: the answer
    /// to the receiver's challenge ((0, 0) before the sender heard it).
    pub echo: (u64, u64),
    /// v6: the members the sender saw leave by a planned stop (0 in v5).
    pub departed: u64,
}

/// What a member of a mirror group tells its peer (see `mirror`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct MirrorBeat {
    pub role: MirrorRole,
    pub flags: u8,
    pub generation: u64,
    pub seen: u64,
}

impl MirrorBeat {
    pub const COMPLETE: u8 = 1;
    pub const REPLICA_IN_SYNC: u8 = 2;
    pub const YIELDS: u8 = 4;
    pub const WANTS_SWAP: u8 = 8;
    const ALL: u8 = 15;

    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

/// A mirror group member's role as announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MirrorRole {
    /// Not in a mirror group, or starting.
    #[default]
    None,
    Secondary,
    Primary,
    /// Primary stopping its application to hand the role over (or losing it).
    Stopping,
}

impl MirrorRole {
    /// As status, metrics and JSON show it.
    pub fn name(self) -> &'static str {
        match self {
            MirrorRole::None => "none",
            MirrorRole::Secondary => "secondary",
            MirrorRole::Primary => "primary",
            MirrorRole::Stopping => "stopping",
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            MirrorRole::None => 0,
            MirrorRole::Secondary => 1,
            MirrorRole::Primary => 2,
            MirrorRole::Stopping => 3,
        }
    }
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => MirrorRole::None,
            1 => MirrorRole::Secondary,
            2 => MirrorRole::Primary,
            3 => MirrorRole::Stopping,
            _ => return None,
        })
    }
}

/// Why a datagram was not accepted. Each reason has its own counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, thiserror::Error)]
pub enum Reject {
    #[error("too short")]
    Truncated,
    #[error("too long")]
    Oversized,
    #[error("not a farm heartbeat (bad magic)")]
    BadMagic,
    #[error("unknown protocol version")]
    BadVersion,
    #[error("malformed field")]
    Malformed,
    #[error("authentication failed (wrong cluster key or altered)")]
    BadMac,
    #[error("sender is not a configured member")]
    UnknownSender,
    #[error("replayed or out of date (incarnation/sequence not newer)")]
    Replayed,
    #[error("sent by this node (a loop, or another node with this id)")]
    FromSelf,
    #[error("not from the sender's configured address on that network (spoofed or misrouted)")]
    WrongSource,
    #[error("arrived on another heartbeat network than it was sent on")]
    WrongNetwork,
    #[error("does not answer this node's current challenge (recorded before, or delayed)")]
    Stale,
    #[error("an older version's copy from a member that writes a newer one (rolling upgrade)")]
    Superseded,
}

impl Reject {
    pub const ALL: [Reject; 13] = [
        Reject::Truncated,
        Reject::Oversized,
        Reject::BadMagic,
        Reject::BadVersion,
        Reject::Malformed,
        Reject::BadMac,
        Reject::UnknownSender,
        Reject::Replayed,
        Reject::FromSelf,
        Reject::WrongSource,
        Reject::WrongNetwork,
        Reject::Stale,
        Reject::Superseded,
    ];

    /// Counter name.
    pub fn name(self) -> &'static str {
        match self {
            Reject::Truncated => "truncated",
            Reject::Oversized => "oversized",
            Reject::BadMagic => "bad_magic",
            Reject::BadVersion => "bad_version",
            Reject::Malformed => "malformed",
            Reject::BadMac => "bad_mac",
            Reject::UnknownSender => "unknown_sender",
            Reject::Replayed => "replayed",
            Reject::FromSelf => "from_self",
            Reject::WrongSource => "wrong_source",
            Reject::WrongNetwork => "wrong_network",
            Reject::Stale => "stale",
            Reject::Superseded => "superseded",
        }
    }
}

fn mac(key: &[u8; 32], data: &[u8]) -> [u8; TAG] {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(data);
    let full = m.finalize().into_bytes();
    let mut t = [0u8; TAG];
    t.copy_from_slice(&full[..TAG]);
    t
}

/// Encodes and authenticates `hb`.
pub fn encode(key: &[u8; 32], hb: &Heartbeat) -> Vec<u8> {
    let id = hb.id.as_bytes();
    assert!(
        !id.is_empty() && id.len() <= MAX_ID,
        "ids are validated by config"
    );
    assert!(
        (OLDEST..=VERSION).contains(&hb.version),
        "a version this build writes"
    );
    let v6 = hb.version >= 6;
    let mut b = Vec::with_capacity(FIXED + id.len() + 10 + TAG);
    b.extend_from_slice(&MAGIC);
    b.push(hb.version);
    b.push(hb.state.to_u8());
    b.extend_from_slice(&hb.weight.to_be_bytes());
    b.extend_from_slice(&hb.incarnation.to_be_bytes());
    b.extend_from_slice(&hb.seq.to_be_bytes());
    b.extend_from_slice(&hb.applied.serving.to_be_bytes());
    b.extend_from_slice(&hb.config_digest.to_be_bytes());
    b.push(id.len() as u8);
    b.push(hb.network);
    b.push(if v6 { 6 } else { 0 });
    b.extend_from_slice(&[0; 5]);
    for v in [hb.settled, hb.handed_over, hb.released] {
        b.extend_from_slice(&v.serving.to_be_bytes());
    }
    for v in [hb.applied, hb.settled, hb.handed_over, hb.released] {
        b.extend_from_slice(&v.weights.to_be_bytes());
    }
    let (drill_id, drill_member) = hb.drill.unwrap_or((0, 0));
    b.extend_from_slice(&drill_id.to_be_bytes());
    b.push(drill_member);
    b.extend_from_slice(&[0; 3]);
    b.push(hb.mirror.role.to_u8());
    b.push(hb.mirror.flags);
    b.extend_from_slice(&[0; 6]);
    b.extend_from_slice(&hb.mirror.generation.to_be_bytes());
    b.extend_from_slice(&hb.mirror.seen.to_be_bytes());
    b.extend_from_slice(&hb.echo.0.to_be_bytes());
    b.extend_from_slice(&hb.echo.1.to_be_bytes());
    b.extend_from_slice(id);
    if v6 && hb.departed != 0 {
        b.push(EXT_DEPARTED);
        b.push(8);
        b.extend_from_slice(&hb.departed.to_be_bytes());
    }
    let tag = mac(key, &b);
    b.extend_from_slice(&tag);
    b
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Decodes and authenticates a datagram (no replay check: see `membership`).
pub fn decode(key: &[u8; 32], b: &[u8]) -> Result<Heartbeat, Reject> {
    let hb = parse(b)?;
    authenticate(key, b)?;
    Ok(hb)
}

/// Checks the tag of a datagram [`parse`] accepted (constant-time comparison).
pub fn authenticate(key: &[u8; 32], b: &[u8]) -> Result<(), Reject> {
    let body = b.len().checked_sub(TAG).ok_or(Reject::Truncated)?;
    let want = mac(key, &b[..body]);
    let diff = want
        .iter()
        .zip(&b[body..])
        .fold(0u8, |acc, (a, c)| acc | (a ^ c));
    if diff != 0 {
        return Err(Reject::BadMac);
    }
    Ok(())
}

/// Reads a datagram's fields WITHOUT authenticating it: only for the cheap checks made before
/// [`authenticate`].
pub fn parse(b: &[u8]) -> Result<Heartbeat, Reject> {
    if b.len() > MAX_LEN {
        return Err(Reject::Oversized);
    }
    if b.len() < FIXED + 1 + TAG {
        return Err(Reject::Truncated);
    }
    if b[..4] != MAGIC {
        return Err(Reject::BadMagic);
    }
    let version = b[4];
    // v5 exactly; v6, and a later version that says v6 reads it.
    let later = version > VERSION;
    if version < OLDEST || (version >= 6 && b[42] > VERSION) {
        return Err(Reject::BadVersion);
    }
    if (version == 5 && b[42] != 0) || (version >= 6 && b[42] < 6) {
        return Err(Reject::Malformed);
    }
    let id_len = b[40] as usize;
    if id_len == 0 || id_len > MAX_ID {
        return Err(Reject::Malformed);
    }
    let end = b.len() - TAG;
    if end < FIXED + id_len {
        return Err(Reject::Truncated);
    }
    if version == 5 && end != FIXED + id_len {
        return Err(Reject::Malformed);
    }
    // Reserved bytes must be zero: one encoding per message (found by the fuzzer: they were
    // ignored, so an authenticated message from a later version would have been misread). A
    // later version may use them: it sets the oldest-reader byte when that matters.
    if !later && (b[43..48] != [0; 5] || b[109..112] != [0; 3] || b[114..120] != [0; 6]) {
        return Err(Reject::Malformed);
    }
    let known_flags = if later { 0xff } else { MirrorBeat::ALL };
    if b[113] & !known_flags != 0 {
        return Err(Reject::Malformed);
    }
    let mirror = MirrorBeat {
        role: MirrorRole::from_u8(b[112]).ok_or(Reject::Malformed)?,
        flags: b[113] & MirrorBeat::ALL,
        generation: be64(b, 120),
        seen: be64(b, 128),
    };
    let drill_id = u32::from_be_bytes(b[104..108].try_into().expect("4 bytes"));
    let drill = match (drill_id, b[108]) {
        (0, 0) => None,
        (0, _) => return Err(Reject::Malformed),
        (id, member) => Some((id, member)),
    };
    let view = |serving: usize, weights: usize| View {
        serving: be64(b, serving),
        weights: be64(b, weights),
    };
    let state = State::from_u8(b[5]).ok_or(Reject::Malformed)?;
    let id = std::str::from_utf8(&b[FIXED..FIXED + id_len]).map_err(|_| Reject::Malformed)?;
    let mut departed = 0;
    let mut seen = 0u32;
    let mut ext = &b[FIXED + id_len..end];
    while !ext.is_empty() {
        let [kind, len, rest @ ..] = ext else {
            return Err(Reject::Malformed);
        };
        let len = *len as usize;
        if rest.len() < len {
            return Err(Reject::Malformed);
        }
        let value = &rest[..len];
        ext = &rest[len..];
        if *kind < 32 {
            // One of each type at most: one encoding per message.
            if seen & (1 << kind) != 0 {
                return Err(Reject::Malformed);
            }
            seen |= 1 << kind;
        }
        match *kind {
            EXT_DEPARTED => {
                departed = u64::from_be_bytes(value.try_into().map_err(|_| Reject::Malformed)?);
                if departed == 0 {
                    return Err(Reject::Malformed);
                }
            }
            // A later version's extension: skipped. In v6 itself there is none other.
            _ if later => {}
            _ => return Err(Reject::Malformed),
        }
    }
    Ok(Heartbeat {
        version: version.min(VERSION),
        id: id.to_string(),
        state,
        weight: u16::from_be_bytes([b[6], b[7]]),
        incarnation: be64(b, 8),
        seq: be64(b, 16),
        applied: view(24, 72),
        config_digest: be64(b, 32),
        network: b[41],
        settled: view(48, 80),
        handed_over: view(56, 88),
        released: view(64, 96),
        drill,
        mirror,
        echo: (be64(b, 136), be64(b, 144)),
        departed,
    })
}

/// Replay protection for one sender on one network: a message is fresh only if its
/// (incarnation, sequence) is newer than the newest accepted. Never forgotten while farmd runs:
/// incarnations only grow, so a restarted sender is newer anyway.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct ReplayGuard {
    newest: Option<(u64, u64)>,
}

impl ReplayGuard {
    /// Whether a message numbered so would be fresh (nothing recorded).
    pub fn fresh(&self, incarnation: u64, seq: u64) -> bool {
        self.newest.is_none_or(|n| (incarnation, seq) > n)
    }

    /// Records an accepted message (returning the newest before it); refuses one that is not
    /// fresh.
    pub fn check(&mut self, incarnation: u64, seq: u64) -> Result<Option<(u64, u64)>, Reject> {
        if !self.fresh(incarnation, seq) {
            return Err(Reject::Replayed);
        }
        Ok(self.newest.replace((incarnation, seq)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_role_names_are_their_json_names() {
        for r in [
            MirrorRole::None,
            MirrorRole::Secondary,
            MirrorRole::Primary,
            MirrorRole::Stopping,
        ] {
            assert_eq!(serde_json::to_value(r).unwrap(), r.name());
        }
    }

    const KEY: [u8; 32] = [7; 32];

    fn hb() -> Heartbeat {
        Heartbeat {
            version: VERSION,
            departed: 0b1000,
            id: "web1".into(),
            state: State::Active,
            weight: 3,
            incarnation: 1_700_000_000_000,
            seq: 42,
            applied: View {
                serving: 0b011,
                weights: 0xaa,
            },
            config_digest: 0x1234,
            network: 1,
            settled: View {
                serving: 0b101,
                weights: 0xbb,
            },
            handed_over: View {
                serving: 0b111,
                weights: 0xcc,
            },
            released: View {
                serving: 0b110,
                weights: 0xdd,
            },
            drill: Some((7, 2)),
            mirror: MirrorBeat {
                role: MirrorRole::Primary,
                flags: MirrorBeat::COMPLETE | MirrorBeat::REPLICA_IN_SYNC,
                generation: 5,
                seen: 4,
            },
            echo: (1_700_000_000_001, 9),
        }
    }

    #[test]
    fn round_trip() {
        let b = encode(&KEY, &hb());
        assert_eq!(b.len(), FIXED + 4 + 10 + TAG);
        assert_eq!(decode(&KEY, &b), Ok(hb()));
        let mut none = hb();
        none.departed = 0;
        let b = encode(&KEY, &none);
        assert_eq!(b.len(), FIXED + 4 + TAG, "no extension when nothing to say");
        assert_eq!(decode(&KEY, &b), Ok(none));
    }

    #[test]
    fn every_kind_of_bad_input_is_rejected_with_its_reason() {
        let good = encode(&KEY, &hb());
        assert_eq!(decode(&[8; 32], &good), Err(Reject::BadMac), "wrong key");
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x01;
            assert!(
                decode(&KEY, &b).is_err(),
                "flipped bit in byte {i} accepted"
            );
        }
        for n in 0..good.len() {
            assert!(
                decode(&KEY, &good[..n]).is_err(),
                "truncated to {n} accepted"
            );
        }
        let mut long = good.clone();
        long.push(0);
        assert_eq!(decode(&KEY, &long), Err(Reject::Malformed));
        assert_eq!(decode(&KEY, &vec![0u8; 2000]), Err(Reject::Oversized));
        assert_eq!(
            decode(
                &KEY,
                format!("GET / HTTP/1.1\r\nHost: farm\r\n\r\n{}", "x".repeat(150)).as_bytes()
            ),
            Err(Reject::BadMagic)
        );
        let mut v = good.clone();
        v[4] = 4;
        assert_eq!(decode(&KEY, &v), Err(Reject::BadVersion), "older than v5");
        let mut v = good.clone();
        v[42] = 7;
        assert_eq!(
            decode(&KEY, &v),
            Err(Reject::BadVersion),
            "a later version that v6 cannot read"
        );
    }

    /// Re-signs `b` (without its tag) as `KEY` would.
    fn signed(mut b: Vec<u8>) -> Vec<u8> {
        let tag = mac(&KEY, &b);
        b.extend_from_slice(&tag);
        b
    }

    #[test]
    fn version_5_is_written_and_read_as_farm_0_1_does() {
        let mut h = hb();
        h.version = 5;
        let b = encode(&KEY, &h);
        assert_eq!(b.len(), FIXED + 4 + TAG, "no extensions in v5");
        assert_eq!(b[4], 5);
        assert_eq!(b[42..48], [0; 6], "v5's reserved bytes");
        h.departed = 0;
        assert_eq!(decode(&KEY, &b), Ok(h), "departures are not said in v5");
        // An extension in a v5 message is malformed (v5 has none).
        let mut x = b[..b.len() - TAG].to_vec();
        x.extend_from_slice(&[EXT_DEPARTED, 8, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(decode(&KEY, &signed(x)), Err(Reject::Malformed));
    }

    #[test]
    fn a_later_version_is_read_and_what_it_adds_is_skipped() {
        let b = encode(&KEY, &hb());
        let mut later = b[..b.len() - TAG].to_vec();
        later[4] = 9;
        // A new extension type, a reserved byte and a mirror flag this version does not know.
        later.extend_from_slice(&[77, 3, 1, 2, 3]);
        later[44] = 1;
        later[113] |= 0x40;
        let got = decode(&KEY, &signed(later.clone())).expect("v9 that v6 may read");
        assert_eq!(
            got.version, VERSION,
            "answered in the newest this build writes"
        );
        assert_eq!(got.departed, hb().departed);
        assert_eq!(got.mirror.flags, hb().mirror.flags);
        // The same unknown extension in a v6 message is malformed: one encoding per message.
        let mut v6 = b[..b.len() - TAG].to_vec();
        v6.extend_from_slice(&[77, 3, 1, 2, 3]);
        assert_eq!(decode(&KEY, &signed(v6)), Err(Reject::Malformed));
        // Extensions that run past the end, or twice the same, are malformed in any version.
        let mut cut = later.clone();
        cut.extend_from_slice(&[78, 9, 1]);
        assert_eq!(decode(&KEY, &signed(cut)), Err(Reject::Malformed));
        let mut twice = later;
        twice.extend_from_slice(&[EXT_DEPARTED, 8, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(decode(&KEY, &signed(twice)), Err(Reject::Malformed));
    }

    #[test]
    fn reserved_bytes_must_be_zero_even_when_signed() {
        // And a drill names a member only with an id: one encoding per message.
        let mut none = hb();
        none.drill = None;
        for (msg, at) in [(hb(), 47), (hb(), 110), (none, 108)] {
            let mut b = encode(&KEY, &msg);
            b.truncate(b.len() - TAG);
            b[at] = 1;
            let tag = mac(&KEY, &b);
            b.extend_from_slice(&tag);
            assert_eq!(decode(&KEY, &b), Err(Reject::Malformed), "byte {at}");
        }
    }

    #[test]
    fn replays_are_refused() {
        let mut g = ReplayGuard::default();
        assert!(g.check(5, 1).is_ok());
        assert!(g.check(5, 2).is_ok());
        assert_eq!(g.check(5, 2), Err(Reject::Replayed));
        assert_eq!(g.check(5, 1), Err(Reject::Replayed));
        assert_eq!(g.check(4, 100), Err(Reject::Replayed), "older incarnation");
        assert!(
            g.check(6, 0).is_ok(),
            "a restart (new incarnation) starts again at 0"
        );
        assert_eq!(g.check(5, 3), Err(Reject::Replayed), "the old incarnation");
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..300 {
            for _ in 0..20 {
                let b: Vec<u8> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect();
                let _ = decode(&KEY, &b);
            }
        }
    }
}
