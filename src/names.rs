//! File-name rules, checked by the master for every request that names a file.
//!
//! The namespace is flat: a name is one path component, so it can never escape a directory
//! when a client writes a download next to others, and it is never used to build a path on a
//! worker (chunk files are named by generated ids).

use thiserror::Error;

/// Longest accepted name, in bytes (the common file-system limit).
pub const MAX_NAME_BYTES: usize = 255;

/// Why a name was refused.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum NameError {
    #[error("file name is empty")]
    Empty,
    #[error("file name is {0} bytes long; the limit is {MAX_NAME_BYTES}")]
    TooLong(usize),
    #[error("file name may not be \".\" or \"..\"")]
    Dots,
    #[error("file name may not contain '/' or '\\' (names are flat)")]
    Separator,
    #[error("file name may not contain NUL or control characters")]
    Control,
}

/// Checks `name` against the namespace rules.
pub fn validate(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(NameError::TooLong(name.len()));
    }
    if name == "." || name == ".." {
        return Err(NameError::Dots);
    }
    if name.contains(['/', '\\']) {
        return Err(NameError::Separator);
    }
    if name.chars().any(char::is_control) {
        return Err(NameError::Control);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for n in [
            "photo.jpg",
            "a",
            "..hidden",
            "été 2024.txt",
            &"x".repeat(255),
        ] {
            assert_eq!(validate(n), Ok(()), "{n}");
        }
    }

    #[test]
    fn refuses_bad_names() {
        assert_eq!(validate(""), Err(NameError::Empty));
        assert_eq!(validate("."), Err(NameError::Dots));
        assert_eq!(validate(".."), Err(NameError::Dots));
        assert_eq!(validate("a/b"), Err(NameError::Separator));
        assert_eq!(validate("..\\x"), Err(NameError::Separator));
        assert_eq!(validate("a\0b"), Err(NameError::Control));
        assert_eq!(validate("a\nb"), Err(NameError::Control));
        assert_eq!(validate("a\u{7f}"), Err(NameError::Control));
        assert_eq!(validate(&"x".repeat(256)), Err(NameError::TooLong(256)));
    }
}
