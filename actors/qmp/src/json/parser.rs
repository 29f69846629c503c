//! The grammar side of QEMU's JSON input (json-parser.c): turns the tokens of one
//! complete message into a `serde_json::Value`.
//!
//! Runs in the supervisor on untrusted tokens. The parser is iterative (an explicit
//! stack instead of QEMU's recursion) so that the 1024 levels the streamer allows cannot
//! exhaust a small thread stack; the order in which it consumes tokens and the first
//! error it reports are the same as QEMU's recursive descent.

use super::utf8;
use super::{JsonError, SyntaxError};
use serde_json::{Map, Number, Value};

/// Kinds of complete tokens the lexer hands to the streamer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenKind {
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Colon,
    Comma,
    Integer,
    Float,
    Keyword,
    String,
}

/// One token of a message; its text is `text[start..end]` of the message buffer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Token {
    pub(crate) kind: TokenKind,
    pub(crate) start: usize,
    pub(crate) end: usize,
}

/// A container whose contents are being parsed.
enum Frame {
    /// An array; the next value parsed is its next element.
    Array(Vec<Value>),
    /// An object; the next value parsed is a key (which must turn out a string).
    Key(Map<String, Value>),
    /// An object; the next value parsed belongs to `key`.
    Member(Map<String, Value>, String),
}

/// Token cursor, with QEMU's peek/pop.
struct Cursor<'a> {
    tokens: &'a [Token],
    text: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<Token> {
        self.tokens.get(self.pos).copied()
    }

    fn pop(&mut self) -> Option<Token> {
        let t = self.peek();
        if t.is_some() {
            self.pos += 1;
        }
        t
    }

    fn text(&self, t: Token) -> &'a [u8] {
        &self.text[t.start..t.end]
    }
}

/// Result of starting to parse a value.
enum Begun {
    /// A scalar or an empty container: the value is complete.
    Done(Value),
    /// A non-empty container was opened and pushed.
    Opened,
}

fn syntax(e: SyntaxError) -> JsonError {
    JsonError::Syntax(e)
}

/// Parses the tokens of one message (`json_parser_parse`).
pub(crate) fn parse(tokens: &[Token], text: &[u8]) -> Result<Value, JsonError> {
    let mut cur = Cursor {
        tokens,
        text,
        pos: 0,
    };
    let mut stack: Vec<Frame> = Vec::new();
    loop {
        // Descend until a value is complete.
        let mut value = loop {
            match begin_value(&mut cur, &mut stack)? {
                Begun::Done(v) => break v,
                Begun::Opened => {}
            }
        };
        // Hand the value to the containers that wait for it, closing those that end.
        loop {
            match stack.pop() {
                None => return Ok(value),
                Some(Frame::Array(mut items)) => {
                    items.push(value);
                    let t = cur.pop().ok_or(syntax(SyntaxError::PrematureEoi))?;
                    match t.kind {
                        TokenKind::RSquare => value = Value::Array(items),
                        TokenKind::Comma => {
                            stack.push(Frame::Array(items));
                            break;
                        }
                        _ => return Err(syntax(SyntaxError::ExpectedListSeparator)),
                    }
                }
                Some(Frame::Key(map)) => {
                    let Value::String(key) = value else {
                        return Err(syntax(SyntaxError::KeyNotString));
                    };
                    let t = cur.pop().ok_or(syntax(SyntaxError::PrematureEoi))?;
                    if t.kind != TokenKind::Colon {
                        return Err(syntax(SyntaxError::MissingColon));
                    }
                    stack.push(Frame::Member(map, key));
                    break;
                }
                Some(Frame::Member(mut map, key)) => {
                    if map.contains_key(&key) {
                        return Err(syntax(SyntaxError::DuplicateKey));
                    }
                    map.insert(key, value);
                    let t = cur.pop().ok_or(syntax(SyntaxError::PrematureEoi))?;
                    match t.kind {
                        TokenKind::RCurly => value = Value::Object(map),
                        TokenKind::Comma => {
                            if cur.peek().is_none() {
                                return Err(syntax(SyntaxError::PrematureEoi));
                            }
                            stack.push(Frame::Key(map));
                            break;
                        }
                        _ => return Err(syntax(SyntaxError::ExpectedDictSeparator)),
                    }
                }
            }
        }
    }
}

/// `parse_value` up to the first nested value: scalars and empty containers complete
/// at once, other containers are pushed on `stack`.
fn begin_value(cur: &mut Cursor<'_>, stack: &mut Vec<Frame>) -> Result<Begun, JsonError> {
    let t = cur.peek().ok_or(syntax(SyntaxError::PrematureEoi))?;
    match t.kind {
        TokenKind::LCurly => {
            cur.pop();
            let next = cur.peek().ok_or(syntax(SyntaxError::PrematureEoi))?;
            if next.kind == TokenKind::RCurly {
                cur.pop();
                return Ok(Begun::Done(Value::Object(Map::new())));
            }
            stack.push(Frame::Key(Map::new()));
            Ok(Begun::Opened)
        }
        TokenKind::LSquare => {
            cur.pop();
            let next = cur.peek().ok_or(syntax(SyntaxError::PrematureEoi))?;
            if next.kind == TokenKind::RSquare {
                cur.pop();
                return Ok(Begun::Done(Value::Array(Vec::new())));
            }
            stack.push(Frame::Array(Vec::new()));
            Ok(Begun::Opened)
        }
        TokenKind::Integer => {
            cur.pop();
            Ok(Begun::Done(Value::Number(integer(cur.text(t)))))
        }
        TokenKind::Float => {
            cur.pop();
            Ok(Begun::Done(Value::Number(float(cur.text(t)))))
        }
        TokenKind::String => {
            cur.pop();
            Ok(Begun::Done(Value::String(string(cur.text(t))?)))
        }
        TokenKind::Keyword => {
            cur.pop();
            match cur.text(t) {
                b"true" => Ok(Begun::Done(Value::Bool(true))),
                b"false" => Ok(Begun::Done(Value::Bool(false))),
                b"null" => Ok(Begun::Done(Value::Null)),
                other => Err(syntax(SyntaxError::InvalidKeyword(utf8::lossy(other)))),
            }
        }
        TokenKind::RCurly | TokenKind::RSquare | TokenKind::Colon | TokenKind::Comma => {
            Err(syntax(SyntaxError::ExpectingValue))
        }
    }
}

/// An integer token: int64 if it fits, else uint64 if it fits, else a double, as QEMU
/// does.
fn integer(text: &[u8]) -> Number {
    let s = String::from_utf8_lossy(text);
    if let Ok(v) = s.parse::<i64>() {
        return Number::from(v);
    }
    if !s.starts_with('-')
        && let Ok(v) = s.parse::<u64>()
    {
        return Number::from(v);
    }
    float(text)
}

/// A float token, read like `strtod`. Overflow gives infinity in QEMU; JSON values
/// cannot hold it, so it saturates to the largest finite double.
fn float(text: &[u8]) -> Number {
    let s = String::from_utf8_lossy(text);
    // The lexer only passes `-?digits[.digits][(e|E)[+-]digits]`, which Rust parses.
    let v: f64 = s.parse().unwrap_or(0.0);
    let v = if v.is_infinite() {
        f64::MAX.copysign(v)
    } else {
        v
    };
    Number::from_f64(v).unwrap_or_else(|| Number::from(0))
}

/// Four hex digits at the start of `s` (`cvt4hex`); `None` if any is missing.
fn hex4(s: &[u8]) -> Option<u32> {
    let mut cp = 0;
    for i in 0..4 {
        let d = char::from(*s.get(i)?).to_digit(16)?;
        cp = (cp << 4) | d;
    }
    Some(cp)
}

/// Decodes a string token, quotes included (`parse_string`).
fn string(token: &[u8]) -> Result<String, JsonError> {
    let Some((&quote, body)) = token.split_first() else {
        return Ok(String::new());
    };
    let mut out = String::new();
    let mut i = 0;
    while let Some(&b) = body.get(i) {
        if b == quote {
            break;
        }
        if b != b'\\' {
            let (cp, len) = utf8::decode(&body[i..]);
            match cp.and_then(char::from_u32) {
                Some(c) => out.push(c),
                None => return Err(syntax(SyntaxError::InvalidUtf8)),
            }
            i += len;
            continue;
        }
        let escape_start = i;
        i += 2;
        let c = match body.get(escape_start + 1) {
            Some(b'"') => '"',
            Some(b'\'') => '\'',
            Some(b'\\') => '\\',
            Some(b'/') => '/',
            Some(b'b') => '\u{8}',
            Some(b'f') => '\u{c}',
            Some(b'n') => '\n',
            Some(b'r') => '\r',
            Some(b't') => '\t',
            Some(b'u') => {
                let mut cp = hex4(&body[i..]);
                // QEMU steps over four bytes even when they are not all hex digits.
                i += 4;
                if let Some(lead) = cp
                    && (0xD800..=0xDBFF).contains(&lead)
                    && body.get(i) == Some(&b'\\')
                    && body.get(i + 1) == Some(&b'u')
                {
                    let trail = body.get(i + 2..).and_then(hex4);
                    cp = match trail {
                        Some(trail) if (0xDC00..=0xDFFF).contains(&trail) => {
                            i += 6;
                            Some(0x1_0000 + ((lead & 0x3FF) << 10) + (trail & 0x3FF))
                        }
                        _ => None,
                    };
                }
                match cp
                    .filter(|&cp| utf8::is_valid_code_point(cp))
                    .and_then(char::from_u32)
                {
                    Some(c) => c,
                    None => {
                        // QEMU prints the escape with "%.*s": as many bytes as it
                        // stepped over, cut at the end of the token (its NUL).
                        let shown_end = (1 + i).min(token.len());
                        let shown = utf8::lossy(&token[1 + escape_start..shown_end]);
                        return Err(syntax(SyntaxError::InvalidUnicode(shown)));
                    }
                }
            }
            _ => return Err(syntax(SyntaxError::InvalidEscape)),
        };
        out.push(c);
    }
    Ok(out)
}
