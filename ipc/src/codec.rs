//! The wire codec: bincode 2 (serde), little endian, varint, with a decode limit.
//!
//! Decoding is bounded twice: a message is at most [`MAX_CONTROL_MESSAGE`] bytes before
//! decoding starts, and bincode's own limit stops a hostile length prefix inside it from
//! allocating. bincode enforces its limit only when decoding, so [`encode`] checks the
//! size on the sending side too.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Largest control message, in bytes. Control messages carry names and options, never
/// I/O payloads.
pub const MAX_CONTROL_MESSAGE: usize = 64 * 1024;

/// Largest data-channel frame header (the payload follows it, bounded separately).
pub const MAX_DATA_HEADER: usize = 64 * 1024;

const CONFIG: bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_CONTROL_MESSAGE>,
> = bincode::config::standard().with_limit::<MAX_CONTROL_MESSAGE>();

/// Codec errors.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The value does not encode (or encodes to more than the limit).
    #[error("cannot encode message: {0}")]
    Encode(String),
    /// The bytes are not a valid message.
    #[error("malformed message: {0}")]
    Decode(String),
    /// Bytes were left over after the message.
    #[error("{0} trailing bytes after message")]
    Trailing(usize),
}

/// Encodes `value`, refusing results larger than [`MAX_CONTROL_MESSAGE`].
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    let bytes = bincode::serde::encode_to_vec(value, CONFIG)
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    if bytes.len() > MAX_CONTROL_MESSAGE {
        return Err(CodecError::Encode(format!(
            "{} bytes exceeds the limit",
            bytes.len()
        )));
    }
    Ok(bytes)
}

/// Decodes exactly one value from `bytes`.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    if bytes.len() > MAX_CONTROL_MESSAGE {
        return Err(CodecError::Decode(format!(
            "{} bytes exceeds the limit",
            bytes.len()
        )));
    }
    let (value, used) = bincode::serde::decode_from_slice(bytes, CONFIG)
        .map_err(|e| CodecError::Decode(e.to_string()))?;
    if used != bytes.len() {
        return Err(CodecError::Trailing(bytes.len() - used));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hostile_length_prefix_fails_without_allocating() {
        // A Vec<u8> claiming 2^60 elements: varint tag 0xFF then a u64.
        let mut bytes = vec![0xFFu8];
        bytes.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(decode::<Vec<u8>>(&bytes).is_err());
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = encode(&5u32).unwrap();
        bytes.push(0);
        assert!(matches!(
            decode::<u32>(&bytes),
            Err(CodecError::Trailing(1))
        ));
    }

    #[test]
    fn oversized_messages_are_refused_when_encoding() {
        let big = vec![1u8; MAX_CONTROL_MESSAGE + 1];
        assert!(encode(&serde_bytes::ByteBuf::from(big)).is_err());
    }
}
