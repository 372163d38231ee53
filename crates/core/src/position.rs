//! Source positions. A position only ever moves forward: the runtime refuses to confirm a
//! position lower than one it already confirmed.

use std::fmt;
use std::str::FromStr;

/// A PostgreSQL write-ahead-log position (log sequence number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (hi, lo) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not an LSN (expected X/Y in hex)"))?;
        let hi = u64::from_str_radix(hi, 16).map_err(|e| format!("LSN `{s}`: {e}"))?;
        let lo = u64::from_str_radix(lo, 16).map_err(|e| format!("LSN `{s}`: {e}"))?;
        Ok(Lsn((hi << 32) | lo))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_text_round_trips() {
        let lsn: Lsn = "16/B374D848".parse().expect("valid lsn");
        assert_eq!(lsn.0, 0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert!("nope".parse::<Lsn>().is_err());
    }
}
