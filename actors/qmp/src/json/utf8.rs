//! QEMU's "modified UTF-8" decoding rules (util/unicode.c), which decide which string
//! bytes the parser accepts and how the writer shows bytes that are not valid text.
//!
//! Runs in the supervisor on untrusted client bytes. Modified UTF-8 is UTF-8 plus the
//! overlong pair `C0 80` for U+0000; it rejects surrogates, the 66 Unicode
//! noncharacters, overlong forms and anything above U+10FFFF.

/// Smallest code point for a sequence of 2, 3, 4, 5 and 6 bytes; below it the
/// sequence is overlong.
const MIN_CODE_POINT: [u32; 5] = [0x80, 0x800, 0x1_0000, 0x20_0000, 0x400_0000];

/// Whether QEMU treats `cp` as a Unicode character it may store or print: inside the
/// Unicode range, not a surrogate and not a noncharacter (`is_valid_codepoint`).
pub(crate) fn is_valid_code_point(cp: u32) -> bool {
    cp <= 0x10_FFFF
        && !(0xFDD0..=0xFDEF).contains(&cp)
        && (cp & 0xFFFE) != 0xFFFE
        && !(0xD800..=0xDFFF).contains(&cp)
}

/// Decodes the sequence at the start of `s` like `mod_utf8_codepoint(s, 6, &end)`.
///
/// The end of the slice counts as a NUL byte, as it would in QEMU's C strings. Returns
/// the code point (`None` when invalid) and how many bytes the sequence spans; the
/// length is 0 only for an empty slice or a NUL byte.
pub(crate) fn decode(s: &[u8]) -> (Option<u32>, usize) {
    let Some(&first) = s.first() else {
        return (None, 0);
    };
    if first == 0 {
        return (None, 0);
    }
    if first < 0x80 {
        return (Some(u32::from(first)), 1);
    }
    if first >= 0xFE || first & 0x40 == 0 {
        // Impossible byte, or a continuation byte with no lead byte.
        return (None, 1);
    }
    let len = first.leading_ones() as usize;
    let mut cp = u32::from(first) & (0x7F >> len);
    for i in 1..len {
        let byte = s.get(i).copied().unwrap_or(0);
        if byte & 0xC0 != 0x80 {
            return (None, i);
        }
        cp = (cp << 6) | u32::from(byte & 0x3F);
    }
    let overlong = cp < MIN_CODE_POINT[len - 2] && !(cp == 0 && len == 2);
    if !is_valid_code_point(cp) || overlong {
        return (None, len);
    }
    (Some(cp), len)
}

/// Turns C-string bytes into text the way QEMU's JSON writer would print them: stops
/// at the first NUL, and each invalid sequence becomes one U+FFFD.
pub(crate) fn lossy(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    let mut rest = bytes;
    loop {
        let (cp, len) = decode(rest);
        if len == 0 {
            break;
        }
        out.push(cp.and_then(char::from_u32).unwrap_or('\u{FFFD}'));
        rest = &rest[len..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modified_utf8_accepts_c0_80_as_nul_and_rejects_other_overlong_forms() {
        assert_eq!(decode(b"\xC0\x80"), (Some(0), 2));
        assert_eq!(decode(b"\xC1\x81"), (None, 2));
        assert_eq!(decode(b"\xE0\x80\x80"), (None, 3));
    }

    #[test]
    fn surrogates_noncharacters_and_out_of_range_sequences_are_invalid() {
        assert_eq!(decode("\u{E9}".as_bytes()), (Some(0xE9), 2));
        assert_eq!(decode(b"\xED\xA0\x80"), (None, 3));
        assert_eq!(decode(b"\xEF\xB7\x90"), (None, 3));
        assert_eq!(decode(b"\xEF\xBF\xBE"), (None, 3));
        assert_eq!(decode(b"\xF4\x90\x80\x80"), (None, 4));
        assert_eq!(decode("\u{1F600}".as_bytes()), (Some(0x1F600), 4));
    }

    #[test]
    fn a_truncated_sequence_spans_only_the_continuation_bytes_present() {
        assert_eq!(decode(b"\xF0\x9F\x98'"), (None, 3));
        assert_eq!(decode(b"\xC3"), (None, 1));
        assert_eq!(decode(b"\xFF"), (None, 1));
        assert_eq!(decode(b"\x80"), (None, 1));
    }

    #[test]
    fn lossy_stops_at_nul_and_replaces_each_bad_sequence_once() {
        assert_eq!(lossy(b"ab\0cd"), "ab");
        assert_eq!(lossy(b"\xFF\xF0\x9F\x98x"), "\u{FFFD}\u{FFFD}x");
        assert_eq!(lossy(b"a\xC0\x80b"), "a\0b");
    }
}
