//! Property tests for everything that parses untrusted bytes: file names, access tokens, chunk
//! capabilities and on-disk chunk headers. The same functions have `cargo fuzz` targets in
//! `fuzz/`; these run in the normal test run with a bounded number of cases.

use std::path::{Component, Path};

use dfs::chunk::{self, ChunkId};
use dfs::rpc::pb::ChunkHeader;
use dfs::security::capability::{self, ChunkGrant};
use dfs::security::{AccessToken, ChunkOps, ClusterSecret, TokenKind};
use proptest::prelude::*;

fn secret() -> ClusterSecret {
    ClusterSecret::from_bytes(b"property tests secret").unwrap()
}

fn kind() -> impl Strategy<Value = TokenKind> {
    prop_oneof![
        Just(TokenKind::ReadWrite),
        Just(TokenKind::ReadOnly),
        Just(TokenKind::Worker)
    ]
}

fn ops() -> impl Strategy<Value = ChunkOps> {
    prop_oneof![
        Just(ChunkOps::READ),
        Just(ChunkOps::WRITE),
        Just(ChunkOps::READ_WRITE)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        // Failures print their minimal input; nothing is written into the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Whatever the input, a name the master accepts is one plain path component: it can
    /// never climb out of, or reach into, a directory.
    #[test]
    fn accepted_names_are_single_plain_components(name in any::<String>()) {
        if dfs::names::validate(&name).is_ok() {
            let comps: Vec<Component> = Path::new(&name).components().collect();
            prop_assert_eq!(comps.len(), 1);
            prop_assert!(matches!(comps[0], Component::Normal(_)));
            prop_assert!(name.len() <= dfs::names::MAX_NAME_BYTES);
            prop_assert!(!name.chars().any(char::is_control));
        }
    }

    #[test]
    fn names_with_separators_or_controls_are_refused(
        a in "[a-z]{0,5}",
        b in "[a-z]{0,5}",
        bad in prop_oneof![Just('/'), Just('\\'), Just('\0'), Just('\n'), Just('\x7f')],
    ) {
        let name = format!("{a}{bad}{b}");
        prop_assert!(dfs::names::validate(&name).is_err());
    }

    #[test]
    fn token_text_never_panics_and_random_text_never_verifies(text in any::<String>()) {
        if let Ok(t) = text.parse::<AccessToken>() {
            // One spelling per token: what parses re-encodes to the same text.
            prop_assert_eq!(t.to_string(), text.trim());
            prop_assert!(t.verify(&secret(), 0).is_err());
        }
    }

    #[test]
    fn tokens_round_trip_and_any_edit_breaks_them(
        kind in kind(),
        subject in "[A-Za-z0-9._@:-]{1,64}",
        expires in prop_oneof![Just(0u64), 1u64..u64::MAX],
        pos in any::<prop::sample::Index>(),
        replacement in any::<char>(),
    ) {
        let s = secret();
        let t = AccessToken::mint(&s, kind, &subject, expires).unwrap();
        let text = t.to_string();
        let back = dfs::security::token::check(&s, &text, 0).unwrap();
        prop_assert_eq!(&back, &t);
        // Change one character: it must fail to parse or fail to verify.
        let mut chars: Vec<char> = text.chars().collect();
        let i = pos.index(chars.len());
        if chars[i] != replacement {
            chars[i] = replacement;
            let edited: String = chars.into_iter().collect();
            prop_assert!(dfs::security::token::check(&s, &edited, 0).is_err(), "{}", edited);
        }
    }

    #[test]
    fn capability_bytes_never_panic_and_random_bytes_never_verify(
        bytes in prop::collection::vec(any::<u8>(), 0..128),
        id in any::<u128>(),
        op in ops(),
    ) {
        let r = capability::verify(&secret(), &bytes, &ChunkId(id), op, 0);
        prop_assert!(r.is_err());
    }

    #[test]
    fn capabilities_grant_exactly_what_was_signed(
        id in any::<u128>(),
        granted in ops(),
        asked in ops(),
        other in any::<u128>(),
        flip in 0usize..capability::TOKEN_LEN * 8,
    ) {
        let s = secret();
        let grant = ChunkGrant { chunk: ChunkId(id), ops: granted, expires_unix_ms: 2_000 };
        let t = capability::mint(&s, &grant);
        let allowed = matches!(
            (granted, asked),
            (ChunkOps::READ_WRITE, _) | (ChunkOps::READ, ChunkOps::READ) | (ChunkOps::WRITE, ChunkOps::WRITE)
        );
        prop_assert_eq!(capability::verify(&s, &t, &ChunkId(id), asked, 1_999).is_ok(), allowed);
        prop_assert!(capability::verify(&s, &t, &ChunkId(id), asked, 2_000).is_err());
        if other != id {
            prop_assert!(capability::verify(&s, &t, &ChunkId(other), asked, 0).is_err());
        }
        let mut bent = t.clone();
        bent[flip / 8] ^= 1 << (flip % 8);
        prop_assert!(capability::verify(&s, &bent, &ChunkId(id), asked, 0).is_err());
    }

    #[test]
    fn chunk_header_regions_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        let _ = chunk::decode_header(&bytes);
    }

    #[test]
    fn chunk_headers_round_trip_and_detect_corruption(
        id in any::<u128>(),
        file_id in any::<u64>(),
        name in "[^/\\\\\\x00-\\x1f]{1,100}",
        index in any::<u32>(),
        length in any::<u64>(),
        crc in any::<u32>(),
        flip in 0usize..(16 + 64) * 8,
    ) {
        let h = ChunkHeader {
            format_version: chunk::FORMAT_VERSION,
            chunk_id: ChunkId(id).to_string(),
            file_id,
            file_name: name,
            chunk_index: index,
            length,
            crc32c: crc,
            ..Default::default()
        };
        let region = chunk::encode_header(&h).unwrap();
        prop_assert_eq!(chunk::decode_header(&region).unwrap(), h);
        // A flipped bit in the fixed part or the body is caught (padding is not covered).
        let mut bent = region.clone();
        bent[flip / 8] ^= 1 << (flip % 8);
        let body_len = u32::from_le_bytes([region[8], region[9], region[10], region[11]]) as usize;
        if flip / 8 < 16 + body_len {
            prop_assert!(chunk::decode_header(&bent).is_err());
        }
    }
}
