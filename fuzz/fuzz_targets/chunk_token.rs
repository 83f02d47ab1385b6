//! Chunk capability decoding and verification: never panics, never accepts unsigned bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let secret = dfs::security::ClusterSecret::from_bytes(b"fuzzing cluster secret").unwrap();
    let id = dfs::chunk::ChunkId(u128::from_le_bytes([7; 16]));
    for op in [
        dfs::security::ChunkOps::READ,
        dfs::security::ChunkOps::WRITE,
    ] {
        assert!(dfs::security::capability::verify(&secret, data, &id, op, 0).is_err());
    }
    let _ = dfs::security::capability::decode(&secret, data);
});
