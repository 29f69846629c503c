//! Masking of the parts of QMP output that legitimately differ between two daemon runs.
//!
//! Runs in the test process on bytes received from a daemon (untrusted: any byte sequence
//! is accepted). Masked: event timestamps, the version numbers and package string of the
//! greeting and of `query-version`, the run's temporary directory, and the numbers of
//! auto-generated node names (`#block123`, renumbered by first appearance). Everything else,
//! including member order and spacing, is left byte for byte, because bulkhead must match it.

/// One piece of a byte pattern.
#[derive(Debug, Clone, Copy)]
enum Piece {
    /// These exact bytes.
    Lit(&'static [u8]),
    /// A JSON integer (optional `-`, digits); replaced by the given bytes.
    Int(&'static [u8]),
    /// The body of a JSON string (up to the closing unescaped `"`); replaced by the bytes.
    Str(&'static [u8]),
}

/// `"timestamp": {"seconds": N, "microseconds": N}` in qsd's member order; another order is a
/// real difference and stays unmasked.
const TIMESTAMP: &[Piece] = &[
    Piece::Lit(b"\"timestamp\": {\"seconds\": "),
    Piece::Int(b"0"),
    Piece::Lit(b", \"microseconds\": "),
    Piece::Int(b"0"),
    Piece::Lit(b"}"),
];

/// The VersionInfo object of the greeting and of `query-version`.
const VERSION: &[Piece] = &[
    Piece::Lit(b"{\"qemu\": {\"micro\": "),
    Piece::Int(b"0"),
    Piece::Lit(b", \"minor\": "),
    Piece::Int(b"0"),
    Piece::Lit(b", \"major\": "),
    Piece::Int(b"0"),
    Piece::Lit(b"}, \"package\": \""),
    Piece::Str(b"<masked>"),
    Piece::Lit(b"\"}"),
];

/// Prefix of QEMU's auto-generated node names (`id_generate(ID_BLOCK)`).
/// A snapshot's creation time (`SnapshotInfo`'s `date-sec` and `date-nsec`): each run
/// makes its images afresh, so the times differ by when the setup ran.
const SNAPSHOT_DATE_SEC: &[Piece] = &[Piece::Lit(b"\"date-sec\": "), Piece::Int(b"0")];
const SNAPSHOT_DATE_NSEC: &[Piece] = &[Piece::Lit(b"\"date-nsec\": "), Piece::Int(b"0")];
/// A snapshot's VM clock: a storage daemon's is the host's clock, so a snapshot made
/// during the run records the time too.
const SNAPSHOT_CLOCK_SEC: &[Piece] = &[Piece::Lit(b"\"vm-clock-sec\": "), Piece::Int(b"0")];
const SNAPSHOT_CLOCK_NSEC: &[Piece] = &[Piece::Lit(b"\"vm-clock-nsec\": "), Piece::Int(b"0")];

const AUTO_NODE_PREFIX: &[u8] = b"#block";

/// Masks one daemon run's output; keeps the auto-name numbering across calls.
#[derive(Debug, Default, Clone)]
pub struct Masker {
    literals: Vec<(Vec<u8>, Vec<u8>)>,
    auto_names: Vec<Vec<u8>>,
}

impl Masker {
    /// A masker with no literal replacements.
    pub fn new() -> Masker {
        Masker::default()
    }

    /// Also replaces every occurrence of `from` by `to` (for example the temp dir by `$DIR`).
    /// Longer literals are tried first, so a path and its parent can both be given.
    pub fn with_literal(mut self, from: impl AsRef<[u8]>, to: impl AsRef<[u8]>) -> Masker {
        if !from.as_ref().is_empty() {
            self.literals
                .push((from.as_ref().to_vec(), to.as_ref().to_vec()));
            self.literals.sort_by_key(|l| std::cmp::Reverse(l.0.len()));
        }
        self
    }

    /// Returns `line` with every masked part replaced.
    pub fn mask(&mut self, line: &[u8]) -> Vec<u8> {
        let mut out = line.to_vec();
        for (from, to) in &self.literals {
            out = replace_all(&out, from, to);
        }
        out = mask_pattern(&out, TIMESTAMP);
        out = mask_pattern(&out, VERSION);
        out = mask_pattern(&out, SNAPSHOT_DATE_SEC);
        out = mask_pattern(&out, SNAPSHOT_DATE_NSEC);
        out = mask_pattern(&out, SNAPSHOT_CLOCK_SEC);
        out = mask_pattern(&out, SNAPSHOT_CLOCK_NSEC);
        self.renumber_auto_names(&out)
    }

    fn renumber_auto_names(&mut self, line: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(line.len());
        let mut i = 0;
        while i < line.len() {
            if line[i..].starts_with(AUTO_NODE_PREFIX) {
                let digits_start = i + AUTO_NODE_PREFIX.len();
                let digits_end = digits_start
                    + line[digits_start..]
                        .iter()
                        .take_while(|b| b.is_ascii_digit())
                        .count();
                if digits_end > digits_start {
                    let number = line[digits_start..digits_end].to_vec();
                    let index = match self.auto_names.iter().position(|n| *n == number) {
                        Some(index) => index,
                        None => {
                            self.auto_names.push(number);
                            self.auto_names.len() - 1
                        }
                    };
                    out.extend_from_slice(AUTO_NODE_PREFIX);
                    out.extend_from_slice(format!("@{}", index + 1).as_bytes());
                    i = digits_end;
                    continue;
                }
            }
            out.push(line[i]);
            i += 1;
        }
        out
    }
}

fn replace_all(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut i = 0;
    while i < haystack.len() {
        if haystack[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(haystack[i]);
            i += 1;
        }
    }
    out
}

/// Tries to match `pattern` at the start of `input`; on success returns the replacement
/// bytes and the matched length.
fn match_at(input: &[u8], pattern: &[Piece]) -> Option<(Vec<u8>, usize)> {
    let mut pos = 0;
    let mut out = Vec::new();
    for piece in pattern {
        match *piece {
            Piece::Lit(lit) => {
                if !input[pos..].starts_with(lit) {
                    return None;
                }
                out.extend_from_slice(lit);
                pos += lit.len();
            }
            Piece::Int(replacement) => {
                let mut end = pos;
                if input.get(end) == Some(&b'-') {
                    end += 1;
                }
                let digits = input[end..]
                    .iter()
                    .take_while(|b| b.is_ascii_digit())
                    .count();
                if digits == 0 {
                    return None;
                }
                out.extend_from_slice(replacement);
                pos = end + digits;
            }
            Piece::Str(replacement) => {
                let mut end = pos;
                loop {
                    match input.get(end) {
                        None => return None,
                        Some(b'"') => break,
                        Some(b'\\') => end += 2,
                        Some(_) => end += 1,
                    }
                }
                out.extend_from_slice(replacement);
                pos = end;
            }
        }
    }
    Some((out, pos))
}

fn mask_pattern(input: &[u8], pattern: &[Piece]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        if let Some((replacement, len)) = match_at(&input[i..], pattern) {
            out.extend_from_slice(&replacement);
            i += len;
        } else {
            out.push(input[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_timestamps_are_zeroed_and_the_rest_of_the_line_kept() {
        let line = b"{\"timestamp\": {\"seconds\": 1795238302, \"microseconds\": 746112}, \"event\": \"BLOCK_EXPORT_DELETED\", \"data\": {\"id\": \"exp0\"}}\r\n";
        assert_eq!(
            Masker::new().mask(line),
            b"{\"timestamp\": {\"seconds\": 0, \"microseconds\": 0}, \"event\": \"BLOCK_EXPORT_DELETED\", \"data\": {\"id\": \"exp0\"}}\r\n".to_vec()
        );
    }

    #[test]
    fn a_timestamp_in_another_member_order_is_left_alone() {
        let line = b"{\"timestamp\": {\"microseconds\": 5, \"seconds\": 7}}";
        assert_eq!(Masker::new().mask(line), line.to_vec());
    }

    #[test]
    fn greeting_version_and_package_are_masked() {
        let line = b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, \"package\": \"Debian 1:10.0.2+ds-2+deb13u1~bpo12+1\"}, \"capabilities\": [\"oob\"]}}\r\n";
        assert_eq!(
            Masker::new().mask(line),
            b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 0, \"major\": 0}, \"package\": \"<masked>\"}, \"capabilities\": [\"oob\"]}}\r\n".to_vec()
        );
    }

    #[test]
    fn a_package_string_with_escaped_quotes_is_masked_whole() {
        let line = b"{\"return\": {\"qemu\": {\"micro\": 0, \"minor\": 1, \"major\": 0}, \"package\": \"a\\\"b\"}, \"id\": 1}";
        assert_eq!(
            Masker::new().mask(line),
            b"{\"return\": {\"qemu\": {\"micro\": 0, \"minor\": 0, \"major\": 0}, \"package\": \"<masked>\"}, \"id\": 1}".to_vec()
        );
    }

    #[test]
    fn auto_node_names_are_renumbered_by_first_appearance_across_lines() {
        let mut masker = Masker::new();
        assert_eq!(
            masker.mask(b"\"#block294\", \"#block17\", \"#block294\""),
            b"\"#block@1\", \"#block@2\", \"#block@1\"".to_vec()
        );
        assert_eq!(masker.mask(b"\"#block17\""), b"\"#block@2\"".to_vec());
    }

    #[test]
    fn the_temp_dir_is_replaced_longest_literal_first() {
        let mut masker = Masker::new()
            .with_literal("/tmp/a", "$TMP")
            .with_literal("/tmp/a/b", "$DIR");
        assert_eq!(
            masker.mask(b"\"/tmp/a/b/x.img\" \"/tmp/a/y\""),
            b"\"$DIR/x.img\" \"$TMP/y\"".to_vec()
        );
    }
}
