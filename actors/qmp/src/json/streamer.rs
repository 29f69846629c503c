//! The byte-stream side of QEMU's JSON input: the lexer state machine (json-lexer.c)
//! and the streamer that cuts the token stream into messages (json-streamer.c).
//!
//! Runs in the supervisor on untrusted client bytes. Every detail that decides what a
//! client sees after bad input is copied on purpose: which byte ends a token, that an
//! error token includes the offending byte, that the lexer then skips to a
//! resynchronisation point, and that the streamer hands a message to the parser as
//! soon as its brackets balance (or go negative).

use super::JsonError;
use super::parser::{self, Token, TokenKind};
use serde_json::Value;

/// Largest token, and largest sum of token lengths in one message (`MAX_TOKEN_SIZE`).
const MAX_TOKEN_SIZE: usize = 64 << 20;
/// Most tokens in one message (`MAX_TOKEN_COUNT`).
const MAX_TOKEN_COUNT: usize = 2 << 20;
/// Deepest bracket plus brace nesting in one message (`MAX_NESTING`).
const MAX_NESTING: i64 = 1 << 10;

/// Lexer states (json-lexer.c without the interpolation states, which QMP never uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Skipping bytes after an error until a resynchronisation point.
    Recovery,
    DqString,
    DqEscape,
    SqString,
    SqEscape,
    Zero,
    ExpDigits,
    ExpSign,
    ExpE,
    Mantissa,
    MantissaDigits,
    Digits,
    Sign,
    Keyword,
    Start,
}

/// What one transition of the lexer table does with the current byte.
#[derive(Debug, Clone, Copy)]
enum Transition {
    /// Consume the byte and go to the state. `Start` means the token was whitespace.
    Next(State),
    /// Consume the byte; it completes a token.
    Token(TokenKind),
    /// The token ended before this byte; emit it and look at the byte again.
    TokenBefore(TokenKind),
    /// Consume the byte; the token is invalid.
    Error,
    /// Recovery found a resynchronisation point; look at the byte again from `Start`.
    Resync,
}

/// The lexer table. Bytes not listed lead to an error, as in QEMU.
fn transition(state: State, b: u8) -> Transition {
    use State as S;
    use Transition as T;
    match state {
        S::Recovery => match b {
            // Structural characters, ASCII controls other than tab and the impossible
            // UTF-8 bytes are where a confused stream can start over.
            b'[' | b']' | b'{' | b'}' | b':' | b',' | 0xFE | 0xFF => T::Resync,
            b'\t' => T::Next(S::Recovery),
            0x00..=0x1F => T::Resync,
            _ => T::Next(S::Recovery),
        },
        S::DqEscape => string_byte(b, S::DqString),
        S::SqEscape => string_byte(b, S::SqString),
        S::DqString => match b {
            b'\\' => T::Next(S::DqEscape),
            b'"' => T::Token(TokenKind::String),
            _ => string_byte(b, S::DqString),
        },
        S::SqString => match b {
            b'\\' => T::Next(S::SqEscape),
            b'\'' => T::Token(TokenKind::String),
            _ => string_byte(b, S::SqString),
        },
        S::Zero => match b {
            b'0'..=b'9' => T::Error,
            b'.' => T::Next(S::Mantissa),
            _ => T::TokenBefore(TokenKind::Integer),
        },
        S::ExpDigits => match b {
            b'0'..=b'9' => T::Next(S::ExpDigits),
            _ => T::TokenBefore(TokenKind::Float),
        },
        S::ExpSign => match b {
            b'0'..=b'9' => T::Next(S::ExpDigits),
            _ => T::Error,
        },
        S::ExpE => match b {
            b'-' | b'+' => T::Next(S::ExpSign),
            b'0'..=b'9' => T::Next(S::ExpDigits),
            _ => T::Error,
        },
        S::MantissaDigits => match b {
            b'0'..=b'9' => T::Next(S::MantissaDigits),
            b'e' | b'E' => T::Next(S::ExpE),
            _ => T::TokenBefore(TokenKind::Float),
        },
        S::Mantissa => match b {
            b'0'..=b'9' => T::Next(S::MantissaDigits),
            _ => T::Error,
        },
        S::Digits => match b {
            b'0'..=b'9' => T::Next(S::Digits),
            b'e' | b'E' => T::Next(S::ExpE),
            b'.' => T::Next(S::Mantissa),
            _ => T::TokenBefore(TokenKind::Integer),
        },
        S::Sign => match b {
            b'0' => T::Next(S::Zero),
            b'1'..=b'9' => T::Next(S::Digits),
            _ => T::Error,
        },
        S::Keyword => match b {
            b'a'..=b'z' => T::Next(S::Keyword),
            _ => T::TokenBefore(TokenKind::Keyword),
        },
        S::Start => match b {
            b'"' => T::Next(S::DqString),
            b'\'' => T::Next(S::SqString),
            b'0' => T::Next(S::Zero),
            b'1'..=b'9' => T::Next(S::Digits),
            b'-' => T::Next(S::Sign),
            b'{' => T::Token(TokenKind::LCurly),
            b'}' => T::Token(TokenKind::RCurly),
            b'[' => T::Token(TokenKind::LSquare),
            b']' => T::Token(TokenKind::RSquare),
            b',' => T::Token(TokenKind::Comma),
            b':' => T::Token(TokenKind::Colon),
            b'a'..=b'z' => T::Next(S::Keyword),
            b' ' | b'\t' | b'\r' | b'\n' => T::Next(S::Start),
            _ => T::Error,
        },
    }
}

/// Inside a string (and right after a backslash) the lexer takes any byte except
/// ASCII controls and the impossible UTF-8 bytes; the parser validates the rest.
fn string_byte(b: u8, next: State) -> Transition {
    if (0x20..=0xFD).contains(&b) {
        Transition::Next(next)
    } else {
        Transition::Error
    }
}

/// QEMU's QMP input parser: feed it bytes as they arrive, get complete messages.
///
/// Each message is either a parsed value or the error qsd would report for it. The
/// number and order of results for any input equal the number and order of
/// `{"error": …}` replies and dispatched requests qsd produces for the same bytes.
/// A message is only complete once the lexer has seen the byte after its last token
/// when that token is a number or a keyword (`42` alone yields nothing yet, exactly as
/// in qsd). At end of input qsd discards a partial message silently, so there is no
/// end-of-input call; drop the streamer with the connection.
#[derive(Debug)]
pub struct JsonStreamer {
    /// Lexer state.
    state: State,
    /// Bytes of the token being lexed.
    token: Vec<u8>,
    /// Tokens of the current message; their text lives in `text`.
    tokens: Vec<Token>,
    /// Concatenated text of `tokens`.
    text: Vec<u8>,
    /// Open `{` minus `}` in the current message.
    brace_count: i64,
    /// Open `[` minus `]` in the current message.
    bracket_count: i64,
    /// `MAX_TOKEN_SIZE`; smaller only in tests, to keep them fast.
    max_token_size: usize,
    /// `MAX_TOKEN_COUNT`; smaller only in tests.
    max_token_count: usize,
}

impl Default for JsonStreamer {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonStreamer {
    /// A streamer at the start of a stream.
    pub fn new() -> Self {
        Self {
            state: State::Start,
            token: Vec::new(),
            tokens: Vec::new(),
            text: Vec::new(),
            brace_count: 0,
            bracket_count: 0,
            max_token_size: MAX_TOKEN_SIZE,
            max_token_count: MAX_TOKEN_COUNT,
        }
    }

    /// A streamer with smaller size and count limits, so that tests can check the
    /// behaviour at the limits without feeding 64 MiB.
    #[cfg(test)]
    pub(crate) fn with_limits(max_token_size: usize, max_token_count: usize) -> Self {
        Self {
            max_token_size,
            max_token_count,
            ..Self::new()
        }
    }

    /// Feeds the next chunk of the stream and returns the messages it completed, in
    /// order.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Result<Value, JsonError>> {
        let mut out = Vec::new();
        let mut rest = bytes;
        while let Some((&b, tail)) = rest.split_first() {
            let run = self.plain_string_run(rest);
            if run > 0 {
                // Same effect as feeding the bytes one by one: they only extend the
                // token, and the run stops where the size check would fire.
                self.token.extend_from_slice(&rest[..run]);
                rest = &rest[run..];
                self.check_token_size(&mut out);
            } else {
                self.feed_byte(b, &mut out);
                rest = tail;
            }
        }
        out
    }

    /// How many bytes at the start of `bytes` simply continue the string being lexed
    /// (no quote, backslash, control or impossible byte), capped so that the token
    /// grows at most to the size at which the lexer gives up.
    fn plain_string_run(&self, bytes: &[u8]) -> usize {
        let quote = match self.state {
            State::DqString => b'"',
            State::SqString => b'\'',
            _ => return 0,
        };
        let cap = (self.max_token_size + 1).saturating_sub(self.token.len());
        bytes
            .iter()
            .take(cap)
            .take_while(|&&c| (0x20..=0xFD).contains(&c) && c != quote && c != b'\\')
            .count()
    }

    fn feed_byte(&mut self, b: u8, out: &mut Vec<Result<Value, JsonError>>) {
        loop {
            match transition(self.state, b) {
                Transition::Next(State::Start) => {
                    self.token.clear();
                    self.state = State::Start;
                    break;
                }
                Transition::Next(State::Recovery) => {
                    self.state = State::Recovery;
                    break;
                }
                Transition::Next(next) => {
                    self.token.push(b);
                    self.state = next;
                    break;
                }
                Transition::Token(kind) => {
                    self.token.push(b);
                    self.process_token(kind, out);
                    self.clear_token();
                    self.state = State::Start;
                    break;
                }
                Transition::TokenBefore(kind) => {
                    self.process_token(kind, out);
                    self.clear_token();
                    self.state = State::Start;
                }
                Transition::Error => {
                    self.token.push(b);
                    // QEMU formats the token with %s, so it ends at a NUL byte.
                    let end = self
                        .token
                        .iter()
                        .position(|&c| c == 0)
                        .unwrap_or(self.token.len());
                    let text = super::utf8::lossy(&self.token[..end]);
                    self.emit(Err(JsonError::Stray(text)), out);
                    self.clear_token();
                    self.state = State::Recovery;
                    break;
                }
                Transition::Resync => {
                    self.token.clear();
                    self.state = State::Start;
                }
            }
        }
        self.check_token_size(out);
    }

    /// A single token may not grow without bound. QEMU hands the partial token to the
    /// streamer, whose size check always rejects it, and lexes on from Start.
    fn check_token_size(&mut self, out: &mut Vec<Result<Value, JsonError>>) {
        if self.token.len() > self.max_token_size {
            self.emit(Err(JsonError::TokenSizeLimit), out);
            self.clear_token();
            self.state = State::Start;
        }
    }

    /// Empties the token buffer, giving back memory a huge token took.
    fn clear_token(&mut self) {
        self.token.clear();
        if self.token.capacity() > 1 << 16 {
            self.token = Vec::new();
        }
    }

    /// The streamer's per-token step (`json_message_process_token`).
    fn process_token(&mut self, kind: TokenKind, out: &mut Vec<Result<Value, JsonError>>) {
        match kind {
            TokenKind::LCurly => self.brace_count += 1,
            TokenKind::RCurly => self.brace_count -= 1,
            TokenKind::LSquare => self.bracket_count += 1,
            TokenKind::RSquare => self.bracket_count -= 1,
            _ => {}
        }
        let len = self.token.len();
        if self.text.len() + len + 1 > self.max_token_size {
            self.emit(Err(JsonError::TokenSizeLimit), out);
            return;
        }
        if self.tokens.len() + 1 > self.max_token_count {
            self.emit(Err(JsonError::TokenCountLimit), out);
            return;
        }
        if self.bracket_count + self.brace_count > MAX_NESTING {
            self.emit(Err(JsonError::NestingDepthLimit), out);
            return;
        }
        let start = self.text.len();
        self.text.extend_from_slice(&self.token);
        self.tokens.push(Token {
            kind,
            start,
            end: self.text.len(),
        });
        // The message ends when the brackets balance, or at once when a closing token
        // has no opener: a stray ']' or '}' is a message of its own (parse error).
        if (self.brace_count > 0 || self.bracket_count > 0)
            && self.brace_count >= 0
            && self.bracket_count >= 0
        {
            return;
        }
        let result = parser::parse(&self.tokens, &self.text);
        self.emit(result, out);
    }

    /// Hands a result out and starts a new message.
    fn emit(&mut self, result: Result<Value, JsonError>, out: &mut Vec<Result<Value, JsonError>>) {
        out.push(result);
        self.brace_count = 0;
        self.bracket_count = 0;
        self.tokens.clear();
        self.text.clear();
        // A message may have been up to 64 MiB; do not keep that much per connection.
        if self.text.capacity() > 1 << 16 {
            self.text = Vec::new();
        }
        if self.tokens.capacity() > 1 << 12 {
            self.tokens = Vec::new();
        }
    }
}
