//! The binary encoding of every message on NATS: one version byte, then MessagePack with field
//! names (so fields can be added with `#[serde(default)]` without breaking older readers).

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The protocol version written as the first byte of every message.
pub const VERSION: u8 = 1;

/// A message that could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("empty message")]
    Empty,
    #[error("unsupported protocol version {0} (this build speaks version {VERSION})")]
    Version(u8),
    #[error("malformed message: {0}")]
    Malformed(#[from] rmp_serde::decode::Error),
}

/// Encodes a message. Encoding our own types cannot fail (no maps with non-string keys, no
/// unsupported types), so a failure is a bug and panics.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut buf = Vec::with_capacity(256);
    buf.push(VERSION);
    rmp_serde::encode::write_named(&mut buf, msg).expect("protocol types always encode");
    buf
}

/// Decodes a message; never panics, whatever the bytes.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let (&version, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    Ok(rmp_serde::from_slice(body)?)
}
