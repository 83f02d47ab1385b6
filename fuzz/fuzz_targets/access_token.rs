//! Access token parsing and verification: never panics, never accepts a token it did not
//! sign, and re-encodes what it parses to the same text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let secret = dfs::security::ClusterSecret::from_bytes(b"fuzzing cluster secret").unwrap();
    if let Ok(t) = text.parse::<dfs::security::AccessToken>() {
        assert_eq!(t.to_string(), text.trim());
        assert!(
            t.verify(&secret, 0).is_err(),
            "accepted a forged token: {text}"
        );
    }
});
