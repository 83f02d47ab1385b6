//! Whole-file digests: recorded by the master at commit, checked by every download once all
//! chunks are in. The per-chunk CRC32C already checks each chunk's bytes; the whole-file
//! digest also proves that the right chunks came back, in the right order, and gives users a
//! checksum to compare with the file they uploaded (`b3sum`, or `sha256sum` for older files).
//!
//! New files get BLAKE3. The digest is computed in file order on one thread, and SHA-256 ran
//! there at ~2 GB/s: on a cold 2 GiB download it was a third of all CPU samples on the
//! machine and the slowest stage of the pipeline. BLAKE3, as secure a hash, runs ~7.8 GB/s on
//! one core here (SIMD over its 1 KiB chunks; `README`, Performance). Files committed before
//! carry SHA-256 and are still checked with it; files rebuilt from worker headers carry none,
//! and their chunks' CRC32Cs are all that is checked.

use sha2::Digest;

use crate::rpc::pb::FileInfo;

/// BLAKE3 of no bytes (`b3sum /dev/null`).
pub const EMPTY_BLAKE3: &str = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";

/// Whether `s` is a 256-bit digest as the master stores it: 64 lowercase hex digits.
pub fn is_hex_digest(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The whole-file digest a file carries, if any, by algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded<'a> {
    Blake3(&'a str),
    Sha256(&'a str),
    /// Rebuilt from worker chunk headers: no digest was recorded.
    None,
}

impl<'a> Recorded<'a> {
    /// The digest of `file`: BLAKE3 when it has one, else SHA-256, else none.
    pub fn of(file: &'a FileInfo) -> Self {
        if !file.blake3.is_empty() {
            Recorded::Blake3(&file.blake3)
        } else if !file.sha256.is_empty() {
            Recorded::Sha256(&file.sha256)
        } else {
            Recorded::None
        }
    }

    /// The algorithm's name as users see it (`blake3`, `sha256`), or `None`.
    pub fn algorithm(&self) -> Option<&'static str> {
        match self {
            Recorded::Blake3(_) => Some("blake3"),
            Recorded::Sha256(_) => Some("sha256"),
            Recorded::None => None,
        }
    }

    /// The hex digest, empty when none is recorded.
    pub fn hex(&self) -> &'a str {
        match self {
            Recorded::Blake3(h) | Recorded::Sha256(h) => h,
            Recorded::None => "",
        }
    }
}

/// An incremental whole-file hash, fed the file's bytes in order.
#[derive(Clone)]
pub struct FileHasher(Inner);

#[derive(Clone)]
enum Inner {
    Blake3(Box<blake3::Hasher>),
    Sha256(Box<sha2::Sha256>),
    Off,
}

impl Default for FileHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl FileHasher {
    /// The hash new uploads record (BLAKE3).
    pub fn new() -> Self {
        FileHasher(Inner::Blake3(Box::new(blake3::Hasher::new())))
    }

    /// The hash that checks `file` on download: the algorithm of its recorded digest (none
    /// when it has none, so nothing is computed for nothing).
    pub fn verifying(file: &FileInfo) -> Self {
        match Recorded::of(file) {
            Recorded::Blake3(_) => Self::new(),
            Recorded::Sha256(_) => FileHasher(Inner::Sha256(Box::default())),
            Recorded::None => FileHasher(Inner::Off),
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        match &mut self.0 {
            Inner::Blake3(h) => {
                h.update(bytes);
            }
            Inner::Sha256(h) => h.update(bytes),
            Inner::Off => {}
        }
    }

    /// The digest in lowercase hex (empty for a hasher that verifies nothing).
    pub fn finalize_hex(self) -> String {
        match self.0 {
            Inner::Blake3(h) => h.finalize().to_hex().to_string(),
            Inner::Sha256(h) => hex::encode(h.finalize()),
            Inner::Off => String::new(),
        }
    }

    /// Checks the bytes fed so far against `file`'s recorded digest; the error says which
    /// digest differed and how.
    pub fn check(self, file: &FileInfo) -> Result<(), String> {
        let recorded = Recorded::of(file);
        let got = self.finalize_hex();
        match recorded.algorithm() {
            Some(alg) if got != recorded.hex() => {
                Err(format!("file {alg} is {got}, expected {}", recorded.hex()))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(blake3: &str, sha256: &str) -> FileInfo {
        FileInfo {
            blake3: blake3.into(),
            sha256: sha256.into(),
            ..Default::default()
        }
    }

    #[test]
    fn known_digests_of_known_bytes() {
        assert_eq!(FileHasher::new().finalize_hex(), EMPTY_BLAKE3);
        let mut h = FileHasher::new();
        h.update(b"ab");
        h.update(b"c");
        // b3sum of "abc".
        assert_eq!(
            h.finalize_hex(),
            "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
        let mut h = FileHasher::verifying(&file("", &"0".repeat(64)));
        h.update(b"abc");
        // sha256sum of "abc".
        assert_eq!(
            h.finalize_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn verifies_with_the_recorded_algorithm() {
        let b3 = "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85";
        let sha = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        for f in [file(b3, ""), file("", sha), file(b3, sha)] {
            let mut h = FileHasher::verifying(&f);
            h.update(b"abc");
            assert_eq!(h.check(&f), Ok(()));
            let mut h = FileHasher::verifying(&f);
            h.update(b"abd");
            let err = h.check(&f).unwrap_err();
            assert!(err.contains("expected"), "{err}");
        }
        // A blake3 digest wins over a sha256 one, which is then not computed.
        let f = file(b3, &"0".repeat(64));
        let mut h = FileHasher::verifying(&f);
        h.update(b"abc");
        assert_eq!(h.check(&f), Ok(()));
        // Nothing recorded: nothing to check against.
        let f = file("", "");
        let mut h = FileHasher::verifying(&f);
        h.update(b"anything");
        assert_eq!(h.check(&f), Ok(()));
        assert_eq!(Recorded::of(&f).algorithm(), None);
    }

    #[test]
    fn hex_digest_shape() {
        assert!(is_hex_digest(EMPTY_BLAKE3));
        assert!(!is_hex_digest(&EMPTY_BLAKE3.to_uppercase()));
        assert!(!is_hex_digest(&EMPTY_BLAKE3[1..]));
        assert!(!is_hex_digest(""));
        assert!(!is_hex_digest(&"g".repeat(64)));
    }
}
