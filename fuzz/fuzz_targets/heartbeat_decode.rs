//! Fuzzes the heartbeat decoder: any bytes must give a heartbeat or a reject reason, never a
//! panic; and whatever decodes must re-encode to the same bytes (with the same key).
#![no_main]

use farm_daemon::heartbeat::{FIXED, VERSION, decode, encode};
use libfuzzer_sys::fuzz_target;

const KEY: [u8; 32] = [0x5a; 32];

fuzz_target!(|data: &[u8]| {
    if let Ok(hb) = decode(&KEY, data) {
        assert_eq!(encode(&KEY, &hb), data, "decode/encode round trip");
    }
    // Also through a valid MAC: take the input as the fields of a heartbeat, sign it, decode.
    if data.len() >= 40 {
        let mut signed = data.to_vec();
        signed.truncate(FIXED + 63);
        if signed.len() < FIXED + 1 {
            return;
        }
        signed[..4].copy_from_slice(b"FRMH");
        signed[4] = VERSION;
        let id_len = (signed.len() - FIXED).min(63);
        signed[40] = id_len as u8;
        signed[42..48].fill(0);
        signed.truncate(FIXED + id_len);
        use hmac::{Hmac, Mac as _};
        let mut m = Hmac::<sha2::Sha256>::new_from_slice(&KEY).expect("key");
        m.update(&signed);
        let tag = m.finalize().into_bytes();
        signed.extend_from_slice(&tag[..16]);
        if let Ok(hb) = decode(&KEY, &signed) {
            assert_eq!(encode(&KEY, &hb), signed);
        }
    }
});
