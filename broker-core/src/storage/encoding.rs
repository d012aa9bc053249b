//! Keys and values as bytes: a key encodes so that its byte order is its natural order
//! (integers big-endian, strings escaped and terminated, tuples field by field), which is all a
//! backend needs to answer range reads in the right order; values encode as their fixed-width
//! or raw bytes. Split from `txn.rs`, which keeps the transaction and its typed tables.

use crate::error::{Error, Result};

/// A key type: encodes so that byte order is the natural order, and decodes back.
pub(crate) trait Key: Sized {
    /// Appends the encoding.
    fn put(&self, out: &mut Vec<u8>);
    /// Reads one value from the front of `input`, advancing it.
    fn take(input: &mut &[u8]) -> Result<Self>;
}

/// Something that encodes as a key of type `K` (a borrowed form, such as `&str` for `String`).
pub(crate) trait KeyArg<K> {
    /// Appends the encoding, identical to `K`'s.
    fn put_key(&self, out: &mut Vec<u8>);
}

fn short(what: &str) -> Error {
    Error::Storage(format!("stored key: truncated {what}"))
}

macro_rules! int_key {
    ($($t:ty),*) => {$(
        impl Key for $t {
            fn put(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_be_bytes());
            }
            fn take(input: &mut &[u8]) -> Result<Self> {
                const N: usize = std::mem::size_of::<$t>();
                if input.len() < N {
                    return Err(short(stringify!($t)));
                }
                let (head, rest) = input.split_at(N);
                *input = rest;
                let mut b = [0u8; N];
                b.copy_from_slice(head);
                Ok(<$t>::from_be_bytes(b))
            }
        }
        impl KeyArg<$t> for $t {
            fn put_key(&self, out: &mut Vec<u8>) {
                self.put(out)
            }
        }
    )*};
}
int_key!(u32, u64, u128);

/// Strings: each 0x00 byte is written 0x00 0xFF and the end is 0x00 0x00, so that a string
/// sorts before every longer string it begins, and a tuple's later fields never mix into it.
fn put_str(s: &str, out: &mut Vec<u8>) {
    for &b in s.as_bytes() {
        out.push(b);
        if b == 0 {
            out.push(0xFF);
        }
    }
    out.extend_from_slice(&[0, 0]);
}

impl Key for String {
    fn put(&self, out: &mut Vec<u8>) {
        put_str(self, out)
    }
    fn take(input: &mut &[u8]) -> Result<Self> {
        let mut bytes = Vec::new();
        let mut i = 0;
        loop {
            match (input.get(i), input.get(i + 1)) {
                (Some(0), Some(0)) => {
                    *input = &input[i + 2..];
                    break;
                }
                (Some(0), Some(0xFF)) => {
                    bytes.push(0);
                    i += 2;
                }
                (Some(&b), _) if b != 0 => {
                    bytes.push(b);
                    i += 1;
                }
                _ => return Err(short("string")),
            }
        }
        String::from_utf8(bytes).map_err(|_| Error::Storage("stored key: not UTF-8".into()))
    }
}

impl KeyArg<String> for String {
    fn put_key(&self, out: &mut Vec<u8>) {
        put_str(self, out)
    }
}
impl KeyArg<String> for &String {
    fn put_key(&self, out: &mut Vec<u8>) {
        put_str(self, out)
    }
}
impl KeyArg<String> for &str {
    fn put_key(&self, out: &mut Vec<u8>) {
        put_str(self, out)
    }
}

macro_rules! tuple_key {
    ($(($($n:ident $a:ident $i:tt),+)),*) => {$(
        impl<$($n: Key),+> Key for ($($n,)+) {
            fn put(&self, out: &mut Vec<u8>) {
                $(self.$i.put(out);)+
            }
            fn take(input: &mut &[u8]) -> Result<Self> {
                Ok(($($n::take(input)?,)+))
            }
        }
        impl<$($n, $a: KeyArg<$n>),+> KeyArg<($($n,)+)> for ($($a,)+) {
            fn put_key(&self, out: &mut Vec<u8>) {
                $(self.$i.put_key(out);)+
            }
        }
    )*};
}
tuple_key!(
    (A A2 0, B B2 1),
    (A A2 0, B B2 1, C C2 2),
    (A A2 0, B B2 1, C C2 2, D D2 3)
);

/// Encodes a key argument.
pub(crate) fn key_bytes<K, A: KeyArg<K>>(k: &A) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    k.put_key(&mut out);
    out
}

/// Decodes a whole key.
pub(crate) fn key_from<K: Key>(mut bytes: &[u8]) -> Result<K> {
    let k = K::take(&mut bytes)?;
    if !bytes.is_empty() {
        return Err(Error::Storage("stored key: trailing bytes".into()));
    }
    Ok(k)
}

/// A value type of a table.
pub(crate) trait Value: Sized {
    /// Decodes a stored value.
    fn from_bytes(bytes: Vec<u8>) -> Result<Self>;
}

/// Something that encodes as a value of type `V`.
pub(crate) trait ValueArg<V> {
    /// The stored bytes.
    fn to_bytes(&self) -> Vec<u8>;
}

impl Value for Vec<u8> {
    fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        Ok(bytes)
    }
}
impl ValueArg<Vec<u8>> for &[u8] {
    fn to_bytes(&self) -> Vec<u8> {
        self.to_vec()
    }
}
impl ValueArg<Vec<u8>> for Vec<u8> {
    fn to_bytes(&self) -> Vec<u8> {
        self.clone()
    }
}
impl ValueArg<Vec<u8>> for &Vec<u8> {
    fn to_bytes(&self) -> Vec<u8> {
        self.to_vec()
    }
}
impl Value for () {
    fn from_bytes(_: Vec<u8>) -> Result<Self> {
        Ok(())
    }
}
impl ValueArg<()> for () {
    fn to_bytes(&self) -> Vec<u8> {
        Vec::new()
    }
}

macro_rules! fixed_value {
    ($($t:ty),*) => {$(
        impl Value for $t {
            fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
                let mut s = bytes.as_slice();
                let v = <$t as Key>::take(&mut s)?;
                if !s.is_empty() {
                    return Err(Error::Storage("stored value: trailing bytes".into()));
                }
                Ok(v)
            }
        }
        impl ValueArg<$t> for $t {
            fn to_bytes(&self) -> Vec<u8> {
                let mut out = Vec::new();
                self.put(&mut out);
                out
            }
        }
    )*};
}
fixed_value!(
    u64,
    u128,
    (u64, u64),
    (u64, u64, u64),
    (u64, u64, u64, u64),
    (u128, u64, u64)
);
