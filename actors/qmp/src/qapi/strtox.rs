//! QEMU's number parsers for command-line (keyval) values.
//!
//! On the command line every scalar arrives as a string, and QEMU's keyval input
//! visitor converts it with `qemu_strtoi64`/`qemu_strtou64` (C `strtoimax` rules with
//! base 0: leading blanks, sign, `0x` hex, leading-`0` octal), `qemu_strtosz` (sizes
//! with `B/K/M/G/T/P/E` suffixes and fractions) and `qemu_strtod_finite`. Each must
//! consume the whole string. These functions reproduce which strings are accepted and
//! the value each yields; the visitor turns a rejection into qsd's error text.
//!
//! Runs in the supervisor on command-line text (untrusted in the sense that it is
//! user input); it never panics and never allocates in proportion to its input
//! except for the float path.

/// C `isspace` in the "C" locale.
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// What `strtoumax(s, &end, base)` reads: sign, magnitude (None on overflow), and
/// where it stopped (0 when nothing was converted).
struct Scanned {
    negative: bool,
    magnitude: Option<u64>,
    end: usize,
}

fn scan_unsigned(s: &[u8], mut base: u32) -> Scanned {
    let mut i = 0;
    while i < s.len() && is_space(s[i]) {
        i += 1;
    }
    let mut negative = false;
    if i < s.len() && (s[i] == b'+' || s[i] == b'-') {
        negative = s[i] == b'-';
        i += 1;
    }
    let hex_prefix = s.get(i) == Some(&b'0')
        && matches!(s.get(i + 1), Some(b'x' | b'X'))
        && s.get(i + 2).is_some_and(u8::is_ascii_hexdigit);
    if (base == 0 || base == 16) && hex_prefix {
        base = 16;
        i += 2;
    } else if base == 0 {
        base = if s.get(i) == Some(&b'0') { 8 } else { 10 };
    }
    let start = i;
    let mut magnitude = Some(0u64);
    while let Some(d) = s.get(i).and_then(|c| char::from(*c).to_digit(base)) {
        magnitude = magnitude
            .and_then(|m| m.checked_mul(u64::from(base)))
            .and_then(|m| m.checked_add(u64::from(d)));
        i += 1;
    }
    if i == start {
        return Scanned {
            negative,
            magnitude: Some(0),
            end: 0,
        };
    }
    Scanned {
        negative,
        magnitude,
        end: i,
    }
}

/// `qemu_strtoi64(s, NULL, 0, &v)`: None where QEMU returns an error.
pub(crate) fn strtoi64(s: &str) -> Option<i64> {
    let sc = scan_unsigned(s.as_bytes(), 0);
    if sc.end == 0 || sc.end != s.len() {
        return None;
    }
    let m = sc.magnitude?;
    if sc.negative {
        if m == 1u64 << 63 {
            Some(i64::MIN)
        } else {
            i64::try_from(m).ok().map(|v| -v)
        }
    } else {
        i64::try_from(m).ok()
    }
}

/// `qemu_strtou64(s, NULL, 0, &v)`: like `strtoumax`, a leading minus negates the
/// value modulo 2^64 (so `-1` is accepted as 18446744073709551615).
pub(crate) fn strtou64(s: &str) -> Option<u64> {
    let sc = scan_unsigned(s.as_bytes(), 0);
    if sc.end == 0 || sc.end != s.len() {
        return None;
    }
    let m = sc.magnitude?;
    Some(if sc.negative { m.wrapping_neg() } else { m })
}

/// The longest prefix of `s` (after blanks) that C `strtod` reads as a decimal
/// number, and its value; `inf`/`nan` spellings count, so the caller can reject them.
fn scan_double(s: &[u8]) -> Option<(f64, usize)> {
    let mut i = 0;
    while i < s.len() && is_space(s[i]) {
        i += 1;
    }
    let start = i;
    if i < s.len() && (s[i] == b'+' || s[i] == b'-') {
        i += 1;
    }
    let rest = &s[i..];
    for word in ["infinity", "inf", "nan"] {
        if rest.len() >= word.len() && rest[..word.len()].eq_ignore_ascii_case(word.as_bytes()) {
            return Some((f64::INFINITY, i + word.len()));
        }
    }
    let digits_start = i;
    while i < s.len() && s[i].is_ascii_digit() {
        i += 1;
    }
    let mut any_digit = i > digits_start;
    if i < s.len() && s[i] == b'.' {
        let frac_start = i + 1;
        let mut j = frac_start;
        while j < s.len() && s[j].is_ascii_digit() {
            j += 1;
        }
        if any_digit || j > frac_start {
            any_digit = true;
            i = j;
        }
    }
    if !any_digit {
        return None;
    }
    if i < s.len() && (s[i] == b'e' || s[i] == b'E') {
        let mut j = i + 1;
        if j < s.len() && (s[j] == b'+' || s[j] == b'-') {
            j += 1;
        }
        let exp_start = j;
        while j < s.len() && s[j].is_ascii_digit() {
            j += 1;
        }
        if j > exp_start {
            i = j;
        }
    }
    let text = std::str::from_utf8(&s[start..i]).ok()?;
    let text = text.strip_suffix('.').unwrap_or(text);
    let value: f64 = text.parse().ok()?;
    let mantissa_nonzero = s[digits_start..i]
        .iter()
        .take_while(|c| !matches!(c, b'e' | b'E'))
        .any(|c| (b'1'..=b'9').contains(c));
    if (value == 0.0 && mantissa_nonzero) || value.is_subnormal() {
        // strtod reports underflow as ERANGE, which QEMU treats as an error.
        return Some((f64::NAN, i));
    }
    Some((value, i))
}

/// `qemu_strtod_finite(s, NULL, &v)`: the whole string must be a finite number.
/// Hexadecimal floats (`0x1p3`), which glibc accepts, are not supported here.
pub(crate) fn strtod_finite(s: &str) -> Option<f64> {
    let (v, end) = scan_double(s.as_bytes())?;
    (end == s.len() && v.is_finite()).then_some(v)
}

/// `suffix_mul` with unit 1024.
fn suffix_mul(c: u8) -> Option<u64> {
    let power = match c.to_ascii_uppercase() {
        b'B' => 0,
        b'K' => 1,
        b'M' => 2,
        b'G' => 3,
        b'T' => 4,
        b'P' => 5,
        b'E' => 6,
        _ => return None,
    };
    Some(1u64 << (10 * power))
}

/// `qemu_strtosz(s, NULL, &v)`: a byte count with an optional binary suffix; a
/// fraction needs a suffix (`1.5M`), hex needs none (`0x10`), negatives are refused.
pub(crate) fn strtosz(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let sc = scan_unsigned(b, 10);
    let mut p = sc.end;
    let converted = sc.end != 0;
    if converted {
        let mut k = 0;
        while k < b.len() && is_space(b[k]) {
            k += 1;
        }
        if b.get(k) == Some(&b'-') {
            return None;
        }
    }
    let mut val = if converted { sc.magnitude? } else { 0 };
    let mut valf: u64 = 0;
    if converted && val == 0 && matches!(b.get(p), Some(b'x' | b'X')) {
        let hex = scan_unsigned(b, 16);
        if hex.end == 0 {
            return None;
        }
        val = hex.magnitude?;
        p = hex.end;
        if b.get(p) == Some(&b'.') || b.get(p).copied().and_then(suffix_mul).is_some() {
            return None;
        }
    } else if b.get(p) == Some(&b'.') || (!converted && s.contains('.')) {
        if converted && b.get(p) == Some(&b'.') && !b.get(p + 1).is_some_and(u8::is_ascii_digit) {
            p += 1;
        } else {
            // QEMU parses the fraction with strtod on a copy cut at the first 'e'/'E',
            // so that `1.5E` means exbibytes, not an exponent.
            let tail = &b[p..];
            let cut = tail
                .iter()
                .position(|c| *c == b'e' || *c == b'E')
                .unwrap_or(tail.len());
            let (fraction, used) = scan_double(&tail[..cut])?;
            if !fraction.is_finite() || fraction.is_sign_negative() {
                return None;
            }
            p += used;
            if fraction == 1.0 {
                val = val.checked_add(1)?;
            } else {
                valf = (fraction * 18_446_744_073_709_551_616.0) as u64;
            }
        }
    } else if !converted {
        return None;
    }
    let mul = match b.get(p).copied().and_then(suffix_mul) {
        Some(m) => {
            p += 1;
            m
        }
        None => 1,
    };
    if p != b.len() {
        return None;
    }
    if mul == 1 {
        return (valf == 0).then_some(val);
    }
    let whole = u128::from(val) * u128::from(mul);
    let frac = u128::from(valf) * u128::from(mul);
    let frac_int = frac >> 64;
    let round = (frac as u64) >> 63;
    u64::try_from(whole + frac_int + u128::from(round)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strtoi64_follows_strtoimax_base_zero() {
        assert_eq!(strtoi64("42"), Some(42));
        assert_eq!(strtoi64(" -42"), Some(-42));
        assert_eq!(strtoi64("+7"), Some(7));
        assert_eq!(strtoi64("0x10"), Some(16));
        assert_eq!(strtoi64("010"), Some(8));
        assert_eq!(strtoi64("-9223372036854775808"), Some(i64::MIN));
        assert_eq!(strtoi64("9223372036854775808"), None);
        assert_eq!(strtoi64("08"), None);
        assert_eq!(strtoi64("1M"), None);
        assert_eq!(strtoi64("12 "), None);
        assert_eq!(strtoi64(""), None);
        assert_eq!(strtoi64("0x"), None);
    }

    #[test]
    fn strtou64_wraps_negative_values() {
        assert_eq!(strtou64("-1"), Some(u64::MAX));
        assert_eq!(strtou64("18446744073709551615"), Some(u64::MAX));
        assert_eq!(strtou64("18446744073709551616"), None);
        assert_eq!(strtou64("abc"), None);
    }

    #[test]
    fn strtosz_accepts_suffixes_and_fractions_with_a_suffix() {
        assert_eq!(strtosz("1M"), Some(1 << 20));
        assert_eq!(strtosz("1m"), Some(1 << 20));
        assert_eq!(strtosz("64k"), Some(65536));
        assert_eq!(strtosz("1.5K"), Some(1536));
        assert_eq!(strtosz("1.k"), Some(1024));
        assert_eq!(strtosz("512"), Some(512));
        assert_eq!(strtosz("512B"), Some(512));
        assert_eq!(strtosz("0x10"), Some(16));
        assert_eq!(strtosz("1E"), Some(1 << 60));
        assert_eq!(strtosz("16E"), None);
        assert_eq!(strtosz("1.5"), None);
        assert_eq!(strtosz("-5"), None);
        assert_eq!(strtosz("0x10k"), None);
        assert_eq!(strtosz("1Q"), None);
        assert_eq!(strtosz(""), None);
        assert_eq!(strtosz("abc"), None);
    }

    #[test]
    fn strtod_finite_rejects_infinities_and_trailing_text() {
        assert_eq!(strtod_finite("1.5"), Some(1.5));
        assert_eq!(strtod_finite(" -2e3"), Some(-2000.0));
        assert_eq!(strtod_finite(".5"), Some(0.5));
        assert_eq!(strtod_finite("inf"), None);
        assert_eq!(strtod_finite("nan"), None);
        assert_eq!(strtod_finite("1e999"), None);
        assert_eq!(strtod_finite("1x"), None);
        assert_eq!(strtod_finite(""), None);
    }
}
