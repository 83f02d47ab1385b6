//! Chunk identity, checksums and the self-describing on-disk chunk format.
//!
//! A chunk file is a 4 KiB header region followed by the chunk's bytes:
//!
//! ```text
//! offset 0   magic "DFSCHNK1" (8 bytes)
//!        8   header length (u32 LE)
//!        12  CRC32C of the header bytes (u32 LE)
//!        16  ChunkHeader protobuf (format version, chunk id, file id, file name, chunk index,
//!            file version, length, CRC32C of the data, creation time)
//!        ..  zero padding up to 4096
//! 4096       data (`length` bytes)
//! ```
//!
//! The header makes every chunk describe itself, so a master's metadata can be rebuilt by
//! scanning workers; the fixed region keeps data page-aligned and lets the header be written
//! last, once the data's checksum is known.

use std::fmt;
use std::str::FromStr;

use prost::Message;
use thiserror::Error;

use crate::rpc::pb::ChunkHeader;

/// Size of the header region in front of a chunk's data.
pub const HEADER_REGION: u64 = 4096;
/// Current on-disk format version.
pub const FORMAT_VERSION: u32 = 1;
const MAGIC: &[u8; 8] = b"DFSCHNK1";
const FIXED: usize = 16;

/// A chunk's identity: 128 random bits, never derived from user input, written as 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub u128);

impl ChunkId {
    /// A fresh random id (from the OS generator).
    pub fn generate() -> ChunkId {
        ChunkId(random_u128())
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({self})")
    }
}

/// A string that is not a chunk id.
#[derive(Debug, Error)]
#[error("invalid chunk id {0:?}: expected 32 lowercase hex digits")]
pub struct BadChunkId(pub String);

impl FromStr for ChunkId {
    type Err = BadChunkId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = s.len() == 32
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !ok {
            return Err(BadChunkId(s.chars().take(64).collect()));
        }
        u128::from_str_radix(s, 16)
            .map(ChunkId)
            .map_err(|_| BadChunkId(s.to_string()))
    }
}

/// OS randomness fetched at once per thread: ids are drawn for every chunk and upload, and a
/// `getrandom` call for each (four per small file on the master) was a system call apiece.
const RANDOM_BUFFER: usize = 512;

thread_local! {
    static RANDOM: std::cell::RefCell<([u8; RANDOM_BUFFER], usize)> =
        const { std::cell::RefCell::new(([0; RANDOM_BUFFER], RANDOM_BUFFER)) };
}

/// 128 bits from the OS random source (read ahead, a buffer per thread). Falls back to time
/// and address entropy only if the OS source fails, which on Linux means a broken system; ids
/// stay unique in practice either way.
pub fn random_u128() -> u128 {
    let drawn = RANDOM.with(|r| {
        let (buf, pos) = &mut *r.borrow_mut();
        if *pos + 16 > RANDOM_BUFFER {
            getrandom::fill(buf).ok()?;
            *pos = 0;
        }
        let mut out = [0u8; 16];
        out.copy_from_slice(&buf[*pos..*pos + 16]);
        // Never hand the same bytes out twice.
        buf[*pos..*pos + 16].fill(0);
        *pos += 16;
        Some(u128::from_le_bytes(out))
    });
    drawn.unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let local = &t as *const _ as usize as u128;
        t ^ (local << 64) ^ u128::from(std::process::id())
    })
}

/// CRC32C (Castagnoli), hardware accelerated where the CPU has it.
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, data)
}

/// A header region that could not be decoded.
#[derive(Debug, Error)]
pub enum HeaderError {
    #[error("not a dfs chunk file (bad magic)")]
    BadMagic,
    #[error("chunk header is truncated")]
    Truncated,
    #[error("chunk header checksum mismatch")]
    Checksum,
    #[error("chunk header does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("chunk header has unsupported format version {0}")]
    Version(u32),
    #[error("chunk header is {0} bytes; the region holds {HEADER_REGION}")]
    TooLarge(usize),
}

/// Encodes `header` into a full header region (exactly [`HEADER_REGION`] bytes).
pub fn encode_header(header: &ChunkHeader) -> Result<Vec<u8>, HeaderError> {
    let body = header.encode_to_vec();
    if FIXED + body.len() > HEADER_REGION as usize {
        return Err(HeaderError::TooLarge(body.len()));
    }
    let mut out = Vec::with_capacity(HEADER_REGION as usize);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out.resize(HEADER_REGION as usize, 0);
    Ok(out)
}

/// Decodes a header region (at least the first bytes of a chunk file).
pub fn decode_header(region: &[u8]) -> Result<ChunkHeader, HeaderError> {
    if region.len() < FIXED {
        return Err(HeaderError::Truncated);
    }
    if &region[..8] != MAGIC {
        return Err(HeaderError::BadMagic);
    }
    let len = u32::from_le_bytes([region[8], region[9], region[10], region[11]]) as usize;
    let crc = u32::from_le_bytes([region[12], region[13], region[14], region[15]]);
    let body = region
        .get(FIXED..FIXED.saturating_add(len))
        .ok_or(HeaderError::Truncated)?;
    if crc32c::crc32c(body) != crc {
        return Err(HeaderError::Checksum);
    }
    let header = ChunkHeader::decode(body)?;
    if header.format_version != FORMAT_VERSION {
        return Err(HeaderError::Version(header.format_version));
    }
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ChunkHeader {
        ChunkHeader {
            format_version: FORMAT_VERSION,
            chunk_id: ChunkId::generate().to_string(),
            file_id: 7,
            file_name: "photo.jpg".into(),
            chunk_index: 3,
            file_version: 2,
            length: 12345,
            crc32c: 0xdead_beef,
            created_unix_ms: 1,
            ..Default::default()
        }
    }

    #[test]
    fn random_ids_stay_distinct_across_buffer_refills() {
        // Several refills of the per-thread buffer, on two threads.
        let draw = || {
            (0..4 * RANDOM_BUFFER)
                .map(|_| random_u128())
                .collect::<Vec<_>>()
        };
        let other = std::thread::spawn(draw);
        let mut all = draw();
        all.extend(other.join().unwrap());
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n, "an id was drawn twice");
        assert!(!all.contains(&0));
    }

    #[test]
    fn chunk_ids_round_trip_and_reject_junk() {
        let id = ChunkId::generate();
        assert_eq!(id.to_string().parse::<ChunkId>().unwrap(), id);
        assert_ne!(ChunkId::generate(), ChunkId::generate());
        for bad in [
            "",
            "../../etc/passwd",
            &"A".repeat(32),
            &"0".repeat(33),
            "0x12",
        ] {
            assert!(bad.parse::<ChunkId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn header_round_trip() {
        let h = sample();
        let region = encode_header(&h).unwrap();
        assert_eq!(region.len() as u64, HEADER_REGION);
        assert_eq!(decode_header(&region).unwrap(), h);
    }

    #[test]
    fn header_corruption_is_detected() {
        let mut region = encode_header(&sample()).unwrap();
        region[20] ^= 1;
        assert!(matches!(decode_header(&region), Err(HeaderError::Checksum)));
        region[0] = b'X';
        assert!(matches!(decode_header(&region), Err(HeaderError::BadMagic)));
        assert!(matches!(
            decode_header(&region[..4]),
            Err(HeaderError::Truncated)
        ));
    }
}
