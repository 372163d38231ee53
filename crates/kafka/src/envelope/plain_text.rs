//! Finding where plain JSON text ends — the closing quote, an escape or a control
//! character — eight bytes at a time; shared by the in-place reader and the writer.

/// Which bytes end a run of plain text: the closing quote, the start of an escape, and the
/// control characters JSON does not allow in text.
static ENDS_PLAIN_TEXT: [bool; 256] = {
    let mut ends = [false; 256];
    let mut byte = 0;
    while byte < 0x20 {
        ends[byte] = true;
        byte += 1;
    }
    ends[b'"' as usize] = true;
    ends[b'\\' as usize] = true;
    ends
};

/// How many bytes of plain text `bytes` starts with (up to a byte of `ENDS_PLAIN_TEXT`);
/// `None` if it has no such end. Looks at eight bytes at a time, as serde_json does.
pub(super) fn plain_text_length(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGH_BITS: u64 = ONES << 7;
    /// The high bit of each byte of `word` below `below` (the lowest such byte exactly; a
    /// byte above one found may be marked wrongly, which finding the lowest ignores).
    fn bytes_below(word: u64, below: u8) -> u64 {
        word.wrapping_sub(ONES * u64::from(below)) & !word & HIGH_BITS
    }
    let mut at = 0;
    while let Some(Ok(chunk)) = bytes.get(at..at + 8).map(<[u8; 8]>::try_from) {
        let word = u64::from_le_bytes(chunk);
        let ends = bytes_below(word, 0x20)
            | bytes_below(word ^ (ONES * u64::from(b'"')), 1)
            | bytes_below(word ^ (ONES * u64::from(b'\\')), 1);
        if ends != 0 {
            return Some(at + (ends.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    let found = bytes[at..]
        .iter()
        .position(|&byte| ENDS_PLAIN_TEXT[usize::from(byte)])?;
    Some(at + found)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The eight-at-a-time scan finds the same end as looking at each byte, wherever the
    /// end is and whatever byte it is.
    #[test]
    fn finds_the_first_end_byte_as_a_byte_by_byte_scan_does() {
        let ends: Vec<u8> = (0u8..0x20).chain([b'"', b'\\']).collect();
        let near_misses = [0x20u8, b'!', b'#', b'[', b']', 0x7f, 0x80, 0xa2, 0xdc, 0xff];
        for length in 0..24 {
            for &filler in &near_misses {
                let mut bytes = vec![filler; length];
                assert_eq!(plain_text_length(&bytes), None, "{bytes:?}");
                for &end in &ends {
                    for at in 0..length {
                        bytes[at] = end;
                        let expected = bytes.iter().position(|b| ENDS_PLAIN_TEXT[*b as usize]);
                        assert_eq!(plain_text_length(&bytes), expected, "{bytes:?}");
                        bytes[at] = filler;
                    }
                }
            }
        }
    }
}
