//! QEMU's JSON writer (qobject/json-writer.c): the exact bytes qsd prints for a value.
//!
//! Runs in the supervisor, on replies and events about to go to a QMP client. Objects
//! come out in QDict order, strings ASCII-only, numbers as QEMU prints them.

use super::utf8;
use crate::qdict;
use serde_json::{Number, Value};
use std::fmt::Write as _;

/// The compact form qsd sends on a normal monitor: `{"return": {}, "id": 1}`.
///
/// Members are separated by `", "`, names from values by `": "`. Empty containers are
/// `{}` and `[]`. The caller appends the message terminator `"\r\n"`.
pub fn to_string(v: &Value) -> String {
    let mut w = Writer {
        out: String::new(),
        pretty: false,
        depth: 0,
        need_comma: false,
    };
    w.value(None, v);
    w.out
}

/// The form qsd sends on a monitor with `pretty=on`, exactly as it appears on the wire
/// minus the final terminator, which the caller appends as for [`to_string`].
///
/// QEMU's writer breaks lines with `\n` and indents by four spaces per level; the
/// monitor then turns every `\n` into `\r\n`, so the returned text contains `"\r\n"`
/// line breaks. Members are separated by `",\r\n"` plus indentation (no space after
/// the comma). An empty container still gets a line break before its closing bracket:
/// `{"id": {}}` prints as `"{\r\n    \"id\": {\r\n    }\r\n}"`. Strings never contain a
/// raw line break (they are escaped), so every `\r\n` is a layout break.
pub fn to_string_pretty(v: &Value) -> String {
    let mut w = Writer {
        out: String::new(),
        pretty: true,
        depth: 0,
        need_comma: false,
    };
    w.value(None, v);
    w.out
}

/// State of QEMU's `JSONWriter`.
struct Writer {
    out: String,
    pretty: bool,
    /// Number of open containers.
    depth: usize,
    /// Whether the next item in the current container needs a separator.
    need_comma: bool,
}

impl Writer {
    fn newline(&mut self) {
        if self.pretty {
            self.out.push_str("\r\n");
            for _ in 0..self.depth {
                self.out.push_str("    ");
            }
        }
    }

    /// `maybe_comma_name`: separator (or first-item line break), then the member name.
    fn item_prefix(&mut self, name: Option<&str>) {
        if self.need_comma {
            self.out.push(',');
            if self.pretty {
                self.newline();
            } else {
                self.out.push(' ');
            }
        } else {
            if !self.out.is_empty() {
                self.newline();
            }
            self.need_comma = true;
        }
        if let Some(name) = name {
            quoted(&mut self.out, name);
            self.out.push_str(": ");
        }
    }

    fn value(&mut self, name: Option<&str>, v: &Value) {
        self.item_prefix(name);
        match v {
            Value::Null => self.out.push_str("null"),
            Value::Bool(b) => self.out.push_str(if *b { "true" } else { "false" }),
            Value::Number(n) => number(&mut self.out, n),
            Value::String(s) => quoted(&mut self.out, s),
            Value::Array(items) => {
                self.out.push('[');
                self.enter();
                for item in items {
                    self.value(None, item);
                }
                self.leave();
                self.out.push(']');
            }
            Value::Object(map) => {
                self.out.push('{');
                self.enter();
                for (k, item) in qdict::iteration_order(map.iter()) {
                    self.value(Some(k), item);
                }
                self.leave();
                self.out.push('}');
            }
        }
    }

    fn enter(&mut self) {
        self.depth += 1;
        self.need_comma = false;
    }

    fn leave(&mut self) {
        self.depth -= 1;
        self.need_comma = true;
        self.newline();
    }
}

/// A string as `quoted_str` prints it: `"` and `\` escaped, the five short control
/// escapes, every other control character, DEL and non-ASCII as `\uXXXX` (uppercase,
/// surrogate pairs beyond the BMP). `/` is not escaped. Noncharacters print as
/// `\uFFFD`, since QEMU's decoder rejects them.
fn quoted(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(c),
            _ => {
                let mut cp = u32::from(c);
                if !utf8::is_valid_code_point(cp) {
                    cp = 0xFFFD;
                }
                if cp > 0xFFFF {
                    let v = cp - 0x1_0000;
                    let _ = write!(
                        out,
                        "\\u{:04X}\\u{:04X}",
                        0xD800 + (v >> 10),
                        0xDC00 + (v & 0x3FF)
                    );
                } else {
                    let _ = write!(out, "\\u{cp:04X}");
                }
            }
        }
    }
    out.push('"');
}

fn number(out: &mut String, n: &Number) {
    if let Some(u) = n.as_u64() {
        let _ = write!(out, "{u}");
    } else if let Some(i) = n.as_i64() {
        let _ = write!(out, "{i}");
    } else if let Some(f) = n.as_f64() {
        out.push_str(&format_g17(f));
    }
}

/// A double as C's `printf("%.17g")` prints it in the C locale.
pub(crate) fn format_g17(x: f64) -> String {
    if x.is_nan() {
        return if x.is_sign_negative() { "-nan" } else { "nan" }.to_owned();
    }
    if x.is_infinite() {
        return if x < 0.0 { "-inf" } else { "inf" }.to_owned();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0" } else { "0" }.to_owned();
    }
    // 17 significant digits, correctly rounded, as d.dddddddddddddddde±x.
    let sci = format!("{:.16e}", x.abs());
    let Some((mantissa, exp)) = sci.split_once('e') else {
        return sci;
    };
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let sign = if x < 0.0 { "-" } else { "" };
    if !(-4..17).contains(&exp) {
        let (first, rest) = digits.split_at(1);
        let rest = rest.trim_end_matches('0');
        let dot = if rest.is_empty() { "" } else { "." };
        let esign = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{first}{dot}{rest}e{esign}{:02}", exp.unsigned_abs());
    }
    let (int_part, frac_part) = if exp >= 0 {
        let split = usize::try_from(exp).unwrap_or(0) + 1;
        (digits[..split].to_owned(), digits[split..].to_owned())
    } else {
        let zeros = "0".repeat(usize::try_from(-exp - 1).unwrap_or(0));
        ("0".to_owned(), format!("{zeros}{digits}"))
    };
    let frac_part = frac_part.trim_end_matches('0');
    if frac_part.is_empty() {
        format!("{sign}{int_part}")
    } else {
        format!("{sign}{int_part}.{frac_part}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Map, json};

    #[test]
    fn doubles_print_like_printf_percent_17g() {
        // Expected texts from glibc printf("%.17g") (qsd echoes ids this way).
        let cases: &[(f64, &str)] = &[
            (0.1, "0.10000000000000001"),
            (1.0, "1"),
            (1500.0, "1500"),
            (-0.0, "-0"),
            (0.0, "0"),
            (1e-5, "1.0000000000000001e-05"),
            (0.0001, "0.0001"),
            (1e16, "10000000000000000"),
            (1e17, "1e+17"),
            (1e22, "1e+22"),
            (1.2345678901234568e20, "1.2345678901234568e+20"),
            (-(2f64.powi(63)), "-9.2233720368547758e+18"),
            (5e-324, "4.9406564584124654e-324"),
            (f64::MAX, "1.7976931348623157e+308"),
            (123.456, "123.456"),
            (2.5, "2.5"),
            (0.30000000000000004, "0.30000000000000004"),
            // Exact ties at the 17th digit round to even, as glibc does.
            (1_234_567_890_123_456.0 + 0.25, "1234567890123456.2"),
            (1_234_567_890_123_456.0 + 0.75, "1234567890123456.8"),
            (f64::INFINITY, "inf"),
            (f64::NEG_INFINITY, "-inf"),
        ];
        for &(x, want) in cases {
            assert_eq!(format_g17(x), want, "{x:e}");
        }
    }

    #[test]
    fn integers_print_in_full_whether_signed_or_unsigned() {
        assert_eq!(
            to_string(&json!([0, -1, i64::MIN, u64::MAX])),
            "[0, -1, -9223372036854775808, 18446744073709551615]"
        );
    }

    #[test]
    fn strings_are_ascii_only_with_qemus_escapes() {
        let s = "\" \\ / \u{8} \u{c} \n \r \t \u{1} \u{1f} \u{7f} \u{80} \u{e9} \u{1F600} ~ \0";
        assert_eq!(
            to_string(&json!(s)),
            r#""\" \\ / \b \f \n \r \t \u0001 \u001F \u007F \u0080 \u00E9 \uD83D\uDE00 ~ \u0000""#
        );
    }

    #[test]
    fn noncharacters_print_as_the_replacement_character() {
        assert_eq!(
            to_string(&json!("\u{FDD0}\u{FFFE}\u{10FFFF}")),
            r#""\uFFFD\uFFFD\uFFFD""#
        );
    }

    #[test]
    fn objects_print_in_qdict_order_not_insertion_order() {
        let mut m = Map::new();
        m.insert("major".into(), json!(10));
        m.insert("minor".into(), json!(0));
        m.insert("micro".into(), json!(2));
        assert_eq!(
            to_string(&Value::Object(m)),
            r#"{"micro": 2, "minor": 0, "major": 10}"#
        );
    }

    #[test]
    fn compact_output_uses_comma_space_and_colon_space() {
        assert_eq!(
            to_string(&json!({"a": [1, {}, []], "b": null})),
            r#"{"a": [1, {}, []], "b": null}"#
        );
        assert_eq!(to_string(&json!({})), "{}");
        assert_eq!(to_string(&json!("x")), r#""x""#);
    }

    #[test]
    fn pretty_output_of_empty_containers_and_scalars_at_top_level() {
        assert_eq!(to_string_pretty(&json!({})), "{\r\n}");
        assert_eq!(to_string_pretty(&json!([])), "[\r\n]");
        assert_eq!(to_string_pretty(&json!(7)), "7");
        assert_eq!(
            to_string_pretty(&json!([1, [2]])),
            "[\r\n    1,\r\n    [\r\n        2\r\n    ]\r\n]"
        );
    }

    #[test]
    fn the_greeting_built_in_qemus_insertion_order_prints_as_qsd_sends_it() {
        let mut qemu = Map::new();
        qemu.insert("major".into(), json!(10));
        qemu.insert("minor".into(), json!(0));
        qemu.insert("micro".into(), json!(2));
        let mut version = Map::new();
        version.insert("qemu".into(), Value::Object(qemu));
        version.insert(
            "package".into(),
            json!("Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"),
        );
        let mut qmp = Map::new();
        qmp.insert("version".into(), Value::Object(version));
        qmp.insert("capabilities".into(), json!(["oob"]));
        let mut greeting = Map::new();
        greeting.insert("QMP".into(), Value::Object(qmp));
        assert_eq!(
            to_string(&Value::Object(greeting)),
            r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "capabilities": ["oob"]}}"#
        );
    }
}
