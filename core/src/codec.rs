//! The wire format of every payload shoal stores in Redis.
//!
//! A payload is one format-version byte ([`FORMAT_VERSION`]) followed by the value in
//! MessagePack (rmp-serde, structs as maps so that `#[serde(default)]` and
//! `skip_serializing_if` fields round-trip). A payload with another version byte is rejected, not
//! guessed. Both ends enforce `redis.max_message_bytes`: the writer refuses to write a larger
//! payload and the reader refuses to decode one (a peer with a larger limit wrote it). Every error
//! names the key or mailbox and the Rust type involved.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// The version byte that starts every payload.
pub const FORMAT_VERSION: u8 = 1;

/// Encodes `value` for storage at `key`, refusing payloads over `limit` bytes.
pub fn encode<T: Serialize + ?Sized>(value: &T, key: &str, limit: usize) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(64);
    out.push(FORMAT_VERSION);
    rmp_serde::encode::write_named(&mut out, value).map_err(|e| Error::Codec {
        key: key.to_string(),
        expected: std::any::type_name::<T>().to_string(),
        reason: format!("cannot encode: {e}"),
    })?;
    if out.len() > limit {
        return Err(Error::TooLarge {
            key: key.to_string(),
            size: out.len(),
            limit,
        });
    }
    Ok(out)
}

/// Decodes a payload read from `key` as a `T`, refusing payloads over `limit` bytes.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], key: &str, limit: usize) -> Result<T> {
    let codec_error = |reason: String| Error::Codec {
        key: key.to_string(),
        expected: std::any::type_name::<T>().to_string(),
        reason,
    };
    if bytes.len() > limit {
        return Err(Error::TooLarge {
            key: key.to_string(),
            size: bytes.len(),
            limit,
        });
    }
    match bytes.split_first() {
        None => Err(codec_error("empty payload".into())),
        Some((&FORMAT_VERSION, body)) => {
            let mut de = rmp_serde::Deserializer::new(std::io::Cursor::new(body));
            let value =
                T::deserialize(&mut de).map_err(|e| codec_error(format!("cannot decode: {e}")))?;
            let trailing = body.len() as u64 - de.position();
            if trailing > 0 {
                return Err(codec_error(format!(
                    "{trailing} bytes left after the value (not a {} payload)",
                    std::any::type_name::<T>()
                )));
            }
            Ok(value)
        }
        Some((&version, _)) => Err(codec_error(format!(
            "unknown format version {version} (this build reads version {FORMAT_VERSION})"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Point {
        x: i32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        label: Option<String>,
    }

    #[test]
    fn round_trips_with_version_byte() {
        let p = Point { x: 3, label: None };
        let bytes = encode(&p, "k", 1024).expect("encodes");
        assert_eq!(bytes[0], FORMAT_VERSION);
        assert_eq!(decode::<Point>(&bytes, "k", 1024).expect("decodes"), p);
        let v = (1u64, "bob".to_string(), vec![1.5f64]);
        let bytes = encode(&v, "k", 1024).expect("encodes");
        assert_eq!(
            decode::<(u64, String, Vec<f64>)>(&bytes, "k", 1024).expect("decodes"),
            v
        );
    }

    #[test]
    fn decode_errors_name_key_and_type() {
        let bytes = encode(&"text", "q:items", 1024).expect("encodes");
        match decode::<u64>(&bytes, "q:items", 1024) {
            Err(Error::Codec { key, expected, .. }) => {
                assert_eq!(key, "q:items");
                assert_eq!(expected, "u64");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decode::<u64>(&[], "k", 10),
            Err(Error::Codec { .. })
        ));
        match decode::<u64>(&[9, 1], "k", 10) {
            Err(Error::Codec { reason, .. }) => assert!(reason.contains("version 9"), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decode::<u64>(b"\x01garbage\xc1", "k", 100),
            Err(Error::Codec { .. })
        ));
    }

    #[test]
    fn limit_is_enforced_on_both_ends() {
        let big = vec![7u8; 2000];
        assert!(matches!(
            encode(&big, "k", 1024),
            Err(Error::TooLarge { size, limit: 1024, .. }) if size > 2000
        ));
        let bytes = encode(&big, "k", 4096).expect("fits");
        assert!(matches!(
            decode::<Vec<u8>>(&bytes, "k", 1024),
            Err(Error::TooLarge { .. })
        ));
    }
}
