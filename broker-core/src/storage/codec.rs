//! Stored records carry a format byte before their postcard body, so that a record written today
//! can still be read after its struct changes: a new layout gets a new format byte and the reader
//! keeps decoding the old one.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};

/// The only record layout so far.
const FORMAT_V1: u8 = 1;

pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    postcard::to_extend(value, vec![FORMAT_V1]).map_err(|e| Error::Storage(format!("encode: {e}")))
}

/// Encodes `value` followed by `tail` bytes stored raw. Payloads go in the tail: serde would
/// write them element by element, which the profile showed as a hot spot in the writer.
pub(crate) fn encode_with_tail<T: Serialize>(value: &T, tail: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(64 + tail.len());
    out.push(FORMAT_V1);
    let mut out =
        postcard::to_extend(value, out).map_err(|e| Error::Storage(format!("encode: {e}")))?;
    out.extend_from_slice(tail);
    Ok(out)
}

/// Decodes what [`encode_with_tail`] wrote: the value and the raw tail.
pub(crate) fn decode_with_tail<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, &[u8])> {
    match bytes.split_first() {
        Some((&FORMAT_V1, body)) => {
            postcard::take_from_bytes(body).map_err(|e| Error::Storage(format!("decode: {e}")))
        }
        Some((other, _)) => Err(Error::Storage(format!("unknown record format {other}"))),
        None => Err(Error::Storage("empty record".into())),
    }
}

pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    match bytes.split_first() {
        Some((&FORMAT_V1, body)) => {
            postcard::from_bytes(body).map_err(|e| Error::Storage(format!("decode: {e}")))
        }
        Some((other, _)) => Err(Error::Storage(format!("unknown record format {other}"))),
        None => Err(Error::Storage("empty record".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refuse_unknown_format() {
        let v = (7u64, String::from("k"), vec![1u8, 2, 3]);
        let bytes = encode(&v).unwrap();
        assert_eq!(bytes[0], FORMAT_V1);
        let back: (u64, String, Vec<u8>) = decode(&bytes).unwrap();
        assert_eq!(back, v);
        let mut bad = bytes.clone();
        bad[0] = 9;
        assert_eq!(
            decode::<(u64, String, Vec<u8>)>(&bad).unwrap_err().code(),
            "storage"
        );
        assert!(decode::<u8>(&[]).is_err());
        let with_tail = encode_with_tail(&v, b"{\"raw\": 1}").unwrap();
        let (back, tail): ((u64, String, Vec<u8>), &[u8]) = decode_with_tail(&with_tail).unwrap();
        assert_eq!((back, tail), (v, &b"{\"raw\": 1}"[..]));
    }
}
