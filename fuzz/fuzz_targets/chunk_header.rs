//! The on-disk chunk header (read back from every chunk file, and during metadata rebuild
//! from whatever is on a worker's disk): decoding never panics, and what decodes re-encodes
//! to a region that decodes to the same header.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = dfs::chunk::decode_header(data) {
        let region = dfs::chunk::encode_header(&h).expect("a decoded header fits its region");
        assert_eq!(dfs::chunk::decode_header(&region).expect("re-decodes"), h);
    }
});
