//! Human-friendly flag values: sizes (`8MiB`, `512k`, `1.5GB`) and durations (`5s`, `250ms`).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A byte count parsed from a human form; binary (`KiB`) and decimal (`KB`) units are both
/// accepted, and a bare `k`/`m`/`g`/`t` means the binary unit, as in most storage tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        if num.is_empty() {
            return Err(format!(
                "invalid size {s:?}: expected a number such as 8MiB"
            ));
        }
        let value: f64 = num
            .parse()
            .map_err(|_| format!("invalid size {s:?}: {num:?} is not a number"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kib" => 1 << 10,
            "kb" => 1_000,
            "m" | "mib" => 1 << 20,
            "mb" => 1_000_000,
            "g" | "gib" => 1 << 30,
            "gb" => 1_000_000_000,
            "t" | "tib" => 1 << 40,
            "tb" => 1_000_000_000_000,
            other => return Err(format!("invalid size {s:?}: unknown unit {other:?}")),
        };
        let bytes = value * mult as f64;
        if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
            return Err(format!("invalid size {s:?}: out of range"));
        }
        Ok(ByteSize(bytes.round() as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&humansize::format_size(self.0, humansize::BINARY))
    }
}

/// A duration parsed from a human form (`5s`, `250ms`, `1m 30s`); a bare number means seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if let Ok(secs) = t.parse::<f64>()
            && secs.is_finite()
            && secs >= 0.0
        {
            return Ok(HumanDuration(Duration::from_secs_f64(secs)));
        }
        humantime::parse_duration(t)
            .map(HumanDuration)
            .map_err(|e| format!("invalid duration {s:?}: {e}"))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

/// Formats a byte count for people (`8 MiB`).
pub fn human_bytes(n: u64) -> String {
    humansize::format_size(n, humansize::BINARY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!("8MiB".parse::<ByteSize>().unwrap().0, 8 << 20);
        assert_eq!("8m".parse::<ByteSize>().unwrap().0, 8 << 20);
        assert_eq!("1.5 GiB".parse::<ByteSize>().unwrap().0, 3 << 29);
        assert_eq!("10KB".parse::<ByteSize>().unwrap().0, 10_000);
        assert_eq!("4096".parse::<ByteSize>().unwrap().0, 4096);
        assert!("".parse::<ByteSize>().is_err());
        assert!("MiB".parse::<ByteSize>().is_err());
        assert!("3 parsecs".parse::<ByteSize>().is_err());
        assert!("-1".parse::<ByteSize>().is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(
            "5s".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(5)
        );
        assert_eq!(
            "250ms".parse::<HumanDuration>().unwrap().0,
            Duration::from_millis(250)
        );
        assert_eq!(
            "2".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(2)
        );
        assert!("soon".parse::<HumanDuration>().is_err());
    }
}
