//! The wire format of every payload shoal stores in Redis.
//!
//! A payload is one format-version byte ([`FORMAT_VERSION`]) followed by the value in
//! MessagePack (rmp-serde, structs as maps so that `#[serde(default)]` and
//! `skip_serializing_if` fields round-trip). A payload with another version byte is rejected, not
//! guessed. Both ends enforce `redis.max_message_bytes`: the writer refuses to write a larger
//! payload and the reader refuses to decode one (a peer with a larger limit wrote it). Every error
//! names the key or mailbox and the Rust type involved.
//!
//! # Arrays built and read one element at a time
//!
//! A pool chunk carries many items: its arguments and its results are each one MessagePack array
//! ([`ArrayWriter`], [`ArrayReader`]) rather than an array of separately encoded payloads, so an
//! item costs one element's encoding and nothing more. The writer reserves a 5-byte `array 32`
//! header and fills in the count when the array is finished, so items are appended as they are
//! read from the caller's iterator, and the results of a long chunk can be sent in parts while it
//! runs ([`ArrayWriter::as_finished`], [`ArrayWriter::clear`]). Error context (which key, which function) is a closure, called
//! only when an element fails.

use serde::Serialize;
use serde::de::{DeserializeOwned, IgnoredAny};

use crate::error::{Error, Result};

/// The version byte that starts every payload.
pub const FORMAT_VERSION: u8 = 1;

/// How deep arrays and maps (a struct is a map) may nest in a value that is decoded: a value
/// nested deeper is a codec error. Decoding recurses once per level, and a forged payload of
/// 1 KB can nest a thousand deep (rmp-serde's own limit is 1024): at 2 to 4 KB of stack per
/// level in an unoptimized build, that overflows a thread's 2 MB stack, which aborts the
/// process. 128 levels, as `serde_json` allows, take 0.5 MB at most there. A value nested
/// deeper can still be encoded: the reader refuses it. The other ways decoding recurses are
/// limited by [`MAX_RECURSION`].
pub const MAX_DEPTH: usize = 128;

/// How many levels decoding may recurse through in all: each array, map and ext as in
/// [`MAX_DEPTH`], and also each enum variant, `Some` and newtype struct, which rmp-serde does not
/// count (an enum variant with data is a one-entry map that it reads itself; `Some` and a newtype
/// take no byte at all). Without this limit, 1 MB of nested `{"Variant": ...}` maps, or 2 bytes
/// read as `struct L(Option<Box<L>>)`, recurse until the stack overflows. Four times
/// [`MAX_DEPTH`] leaves room for a few of these around each array or map of a value nested
/// [`MAX_DEPTH`] deep (`struct Tree(Option<Vec<Tree>>)` takes three levels per array); in an
/// unoptimized build, such a `Tree` or 512 nested enum variants take less than 1 MB of stack.
pub const MAX_RECURSION: usize = 4 * MAX_DEPTH;

/// The MessagePack deserializer of a payload's body.
type Rmp<'a> = rmp_serde::Deserializer<rmp_serde::decode::ReadReader<&'a [u8]>>;

/// A deserializer of MessagePack `bytes` under [`MAX_DEPTH`] (the [`MAX_RECURSION`] limit is
/// [`read`]'s).
fn deserializer(bytes: &[u8]) -> Rmp<'_> {
    let mut de = rmp_serde::Deserializer::new(bytes);
    de.set_max_depth(MAX_DEPTH);
    de
}

/// Reads one `T` from `de`, under [`MAX_DEPTH`] and [`MAX_RECURSION`]: every decoding goes
/// through here.
fn read<T: DeserializeOwned>(de: &mut Rmp<'_>) -> std::result::Result<T, rmp_serde::decode::Error> {
    T::deserialize(limited::Limited::new(de, MAX_RECURSION))
}

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
            let mut de = deserializer(body);
            let value =
                read::<T>(&mut de).map_err(|e| codec_error(format!("cannot decode: {e}")))?;
            let trailing = de.get_ref().len();
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

/// The `array 32` marker: its header is always 5 bytes, so a count can be written in place.
const ARRAY32: u8 = 0xdd;
/// Size of the header an [`ArrayWriter`] reserves.
const ARRAY_HEADER: usize = 5;

/// A MessagePack array written one element at a time (see the module docs).
#[derive(Debug)]
pub struct ArrayWriter {
    bytes: Vec<u8>,
    /// Where the array's header starts in `bytes` (after the version byte of a payload).
    header: usize,
    count: u32,
}

impl Default for ArrayWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl ArrayWriter {
    /// An empty array.
    pub fn new() -> Self {
        Self::starting_with(&[], 0)
    }

    /// An empty array that is a whole payload: the format version byte comes first, so
    /// [`ArrayWriter::finish`] gives what [`ArrayReader::payload`] reads.
    pub fn payload() -> Self {
        Self::starting_with(&[FORMAT_VERSION], 0)
    }

    /// [`ArrayWriter::new`] with room for `bytes` of elements (an estimate: it grows as needed).
    pub fn with_capacity(bytes: usize) -> Self {
        Self::starting_with(&[], bytes)
    }

    /// [`ArrayWriter::payload`] with room for `bytes` of elements.
    pub fn payload_with_capacity(bytes: usize) -> Self {
        Self::starting_with(&[FORMAT_VERSION], bytes)
    }

    fn starting_with(prefix: &[u8], capacity: usize) -> Self {
        let mut bytes = Vec::with_capacity(prefix.len() + ARRAY_HEADER + capacity);
        bytes.extend_from_slice(prefix);
        bytes.extend_from_slice(&[ARRAY32, 0, 0, 0, 0]);
        ArrayWriter {
            bytes,
            header: prefix.len(),
            count: 0,
        }
    }

    /// Appends `value` as the next element, refusing one larger than `limit` bytes. On failure
    /// the array is as it was, and the error names `key()` (called only then) and `T`.
    pub fn push<T: Serialize + ?Sized>(
        &mut self,
        value: &T,
        limit: usize,
        key: impl FnOnce() -> String,
    ) -> Result<()> {
        let start = self.bytes.len();
        if let Err(e) = rmp_serde::encode::write_named(&mut self.bytes, value) {
            self.bytes.truncate(start);
            return Err(Error::Codec {
                key: key(),
                expected: std::any::type_name::<T>().to_string(),
                reason: format!("cannot encode: {e}"),
            });
        }
        let size = self.bytes.len() - start;
        if size > limit {
            self.bytes.truncate(start);
            return Err(Error::TooLarge {
                key: key(),
                size,
                limit,
            });
        }
        self.count += 1;
        Ok(())
    }

    /// Removes the elements after the first `count` written since the writer was made or last
    /// taken from; `mark` is [`ArrayWriter::mark`] taken when there were `count`.
    pub fn rewind(&mut self, mark: Mark) {
        if mark.count <= self.count && mark.len <= self.bytes.len() {
            self.bytes.truncate(mark.len);
            self.count = mark.count;
        }
    }

    /// Where the array is now, to [`rewind`](ArrayWriter::rewind) to.
    pub fn mark(&self) -> Mark {
        Mark {
            len: self.bytes.len(),
            count: self.count,
        }
    }

    /// The number of elements.
    pub fn len(&self) -> u32 {
        self.count
    }

    /// No element yet.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The size of the finished array (or payload) in bytes.
    pub fn byte_len(&self) -> usize {
        self.bytes.len()
    }

    /// The finished array (or payload).
    pub fn finish(mut self) -> Vec<u8> {
        self.write_count();
        self.bytes
    }

    /// The array so far, finished (the writer goes on appending after it).
    pub fn as_finished(&mut self) -> &[u8] {
        self.write_count();
        &self.bytes
    }

    /// Removes every element.
    pub fn clear(&mut self) {
        self.bytes.truncate(self.header + ARRAY_HEADER);
        self.count = 0;
    }

    fn write_count(&mut self) {
        let at = self.header + 1;
        self.bytes[at..at + 4].copy_from_slice(&self.count.to_be_bytes());
    }
}

/// A position in an [`ArrayWriter`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark {
    len: usize,
    count: u32,
}

/// Reads a MessagePack array one element at a time, each as its own type (see the module docs).
pub struct ArrayReader<'a> {
    de: Rmp<'a>,
    remaining: u32,
    /// Reading a single value, not an array: the payload must end after it.
    single: bool,
}

impl std::fmt::Debug for ArrayReader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArrayReader")
            .field("remaining", &self.remaining)
            .finish_non_exhaustive()
    }
}

impl<'a> ArrayReader<'a> {
    /// Reads the array `bytes` (no version byte: an array inside a payload). `key()` names it
    /// in the error when it is not an array.
    pub fn array(bytes: &'a [u8], key: impl FnOnce() -> String) -> Result<Self> {
        let (remaining, body) = split_array_header(bytes).ok_or_else(|| Error::Codec {
            key: key(),
            expected: "an array".into(),
            reason: "not a MessagePack array, or a header claiming more elements than follow"
                .into(),
        })?;
        Ok(ArrayReader {
            de: deserializer(body),
            remaining,
            single: false,
        })
    }

    /// Reads a payload that [`ArrayWriter::payload`] wrote (version byte, then the array),
    /// refusing one over `limit` bytes.
    pub fn payload(bytes: &'a [u8], limit: usize, key: impl Fn() -> String) -> Result<Self> {
        let body = payload_body(bytes, limit, &key, "an array")?;
        Self::array(body, key)
    }

    /// Reads a payload holding a single value (what [`encode`] wrote), as a reader of one
    /// element that must be all the payload holds.
    pub fn single(bytes: &'a [u8], limit: usize, key: impl Fn() -> String) -> Result<Self> {
        let body = payload_body(bytes, limit, &key, "a value")?;
        Ok(ArrayReader {
            de: deserializer(body),
            remaining: 1,
            single: true,
        })
    }

    /// Elements not read yet.
    pub fn remaining(&self) -> u32 {
        self.remaining
    }

    /// Decodes the next element as a `T`. On failure the error names `key()` (called only
    /// then) and `T`, and the reader moves past the element when it can (else nothing is left
    /// to read).
    pub fn next<T: DeserializeOwned>(&mut self, key: impl FnOnce() -> String) -> Result<T> {
        let codec_error = |reason: String| Error::Codec {
            key: key(),
            expected: std::any::type_name::<T>().to_string(),
            reason,
        };
        if self.remaining == 0 {
            return Err(codec_error("no element left".into()));
        }
        self.remaining -= 1;
        let start: &'a [u8] = self.de.get_ref();
        match read::<T>(&mut self.de) {
            Ok(value) => {
                if self.single && !self.de.get_ref().is_empty() {
                    let trailing = self.de.get_ref().len();
                    return Err(codec_error(format!(
                        "{trailing} bytes left after the value (not a {} payload)",
                        std::any::type_name::<T>()
                    )));
                }
                Ok(value)
            }
            Err(e) => {
                // The element may have been read part way: read it again, as anything.
                self.de = deserializer(start);
                if read::<IgnoredAny>(&mut self.de).is_err() {
                    self.remaining = 0;
                }
                Err(codec_error(format!("cannot decode: {e}")))
            }
        }
    }

    /// Moves past the next element without decoding it as any type. `false` when there is
    /// none or it is not valid MessagePack (nothing is left to read then).
    pub fn skip(&mut self) -> bool {
        if self.remaining == 0 {
            return false;
        }
        self.remaining -= 1;
        if read::<IgnoredAny>(&mut self.de).is_err() {
            self.remaining = 0;
            return false;
        }
        true
    }
}

/// The count and the elements of a MessagePack array; `None` when `bytes` does not start with
/// an array header, or when its count is more than the bytes after it could hold (every element
/// takes one byte at least): callers size buffers by the count, and a forged 5-byte header
/// claiming four billion elements must not make them allocate for it.
fn split_array_header(bytes: &[u8]) -> Option<(u32, &[u8])> {
    let (&marker, rest) = bytes.split_first()?;
    let (count, elements) = match marker {
        0x90..=0x9f => (u32::from(marker & 0x0f), rest),
        0xdc => {
            let (n, rest) = rest.split_first_chunk::<2>()?;
            (u32::from(u16::from_be_bytes(*n)), rest)
        }
        ARRAY32 => {
            let (n, rest) = rest.split_first_chunk::<4>()?;
            (u32::from_be_bytes(*n), rest)
        }
        _ => return None,
    };
    let possible = usize::try_from(count).is_ok_and(|count| count <= elements.len());
    possible.then_some((count, elements))
}

/// The number of elements of the MessagePack array `bytes`; `None` when it is not one, or its
/// header claims more elements than the bytes after it can hold.
pub fn array_len(bytes: &[u8]) -> Option<u32> {
    split_array_header(bytes).map(|(n, _)| n)
}

/// A payload's body after its version byte, checked against `limit`.
fn payload_body<'a>(
    bytes: &'a [u8],
    limit: usize,
    key: &impl Fn() -> String,
    expected: &str,
) -> Result<&'a [u8]> {
    if bytes.len() > limit {
        return Err(Error::TooLarge {
            key: key(),
            size: bytes.len(),
            limit,
        });
    }
    match bytes.split_first() {
        Some((&FORMAT_VERSION, body)) => Ok(body),
        Some((&version, _)) => Err(Error::Codec {
            key: key(),
            expected: expected.to_string(),
            reason: format!(
                "unknown format version {version} (this build reads version {FORMAT_VERSION})"
            ),
        }),
        None => Err(Error::Codec {
            key: key(),
            expected: expected.to_string(),
            reason: "empty payload".into(),
        }),
    }
}

/// A serde deserializer adapter that counts every level decoding recurses through (see
/// [`MAX_RECURSION`]): each `deserialize_*` call goes to the wrapped deserializer with the
/// visitor wrapped, and the wrapped visitor takes one level from the budget when it enters a
/// `Some`, a newtype struct, a sequence, a map or an enum, handing the rest on to the
/// deserializers, seeds and accesses it passes down. A value that would go past the budget is an
/// error, before any recursion.
mod limited {
    use serde::de::{self, DeserializeSeed, Deserializer, Visitor};
    use std::fmt;

    /// The error for a value nested past the budget.
    #[cold]
    fn too_deep<E: de::Error>() -> E {
        E::custom(format_args!(
            "depth limit exceeded: nested deeper than {} levels (arrays, maps, enum variants, \
             options and newtypes counted)",
            super::MAX_RECURSION
        ))
    }

    /// What is left of `left` levels after entering one more.
    #[inline]
    fn enter<E: de::Error>(left: usize) -> Result<usize, E> {
        left.checked_sub(1).ok_or_else(too_deep)
    }

    /// A deserializer that may recurse `left` more levels.
    pub(super) struct Limited<D> {
        de: D,
        left: usize,
    }

    impl<D> Limited<D> {
        /// `de`, allowed to recurse `left` levels.
        pub(super) fn new(de: D, left: usize) -> Self {
            Limited { de, left }
        }
    }

    /// A visitor of a value that may recurse `left` more levels.
    struct Visit<V> {
        visitor: V,
        left: usize,
    }

    /// A seed of a value that may recurse `left` more levels.
    struct Seed<S> {
        seed: S,
        left: usize,
    }

    /// The elements of a sequence, or the entries of a map, or an enum and its variant, each of
    /// which may recurse `left` more levels.
    struct Access<A> {
        access: A,
        left: usize,
    }

    macro_rules! forward_deserialize {
        ($($method:ident($($arg:ident: $ty:ty),*);)*) => {
            $(
                #[inline]
                fn $method<V: Visitor<'de>>(
                    self,
                    $($arg: $ty,)*
                    visitor: V,
                ) -> Result<V::Value, D::Error> {
                    self.de.$method($($arg,)* Visit { visitor, left: self.left })
                }
            )*
        };
    }

    impl<'de, D: Deserializer<'de>> Deserializer<'de> for Limited<D> {
        type Error = D::Error;

        forward_deserialize! {
            deserialize_any();
            deserialize_bool();
            deserialize_i8();
            deserialize_i16();
            deserialize_i32();
            deserialize_i64();
            deserialize_i128();
            deserialize_u8();
            deserialize_u16();
            deserialize_u32();
            deserialize_u64();
            deserialize_u128();
            deserialize_f32();
            deserialize_f64();
            deserialize_char();
            deserialize_str();
            deserialize_string();
            deserialize_bytes();
            deserialize_byte_buf();
            deserialize_option();
            deserialize_unit();
            deserialize_unit_struct(name: &'static str);
            deserialize_newtype_struct(name: &'static str);
            deserialize_seq();
            deserialize_tuple(len: usize);
            deserialize_tuple_struct(name: &'static str, len: usize);
            deserialize_map();
            deserialize_struct(name: &'static str, fields: &'static [&'static str]);
            deserialize_enum(name: &'static str, variants: &'static [&'static str]);
            deserialize_identifier();
            deserialize_ignored_any();
        }

        #[inline]
        fn is_human_readable(&self) -> bool {
            self.de.is_human_readable()
        }
    }

    macro_rules! forward_visit {
        ($($method:ident($ty:ty);)*) => {
            $(
                #[inline]
                fn $method<E: de::Error>(self, v: $ty) -> Result<V::Value, E> {
                    self.visitor.$method(v)
                }
            )*
        };
    }

    impl<'de, V: Visitor<'de>> Visitor<'de> for Visit<V> {
        type Value = V::Value;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            self.visitor.expecting(f)
        }

        forward_visit! {
            visit_bool(bool);
            visit_i8(i8);
            visit_i16(i16);
            visit_i32(i32);
            visit_i64(i64);
            visit_i128(i128);
            visit_u8(u8);
            visit_u16(u16);
            visit_u32(u32);
            visit_u64(u64);
            visit_u128(u128);
            visit_f32(f32);
            visit_f64(f64);
            visit_char(char);
            visit_str(&str);
            visit_borrowed_str(&'de str);
            visit_string(String);
            visit_bytes(&[u8]);
            visit_borrowed_bytes(&'de [u8]);
            visit_byte_buf(Vec<u8>);
        }

        #[inline]
        fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
            self.visitor.visit_none()
        }

        #[inline]
        fn visit_unit<E: de::Error>(self) -> Result<V::Value, E> {
            self.visitor.visit_unit()
        }

        #[inline]
        fn visit_some<D: Deserializer<'de>>(self, de: D) -> Result<V::Value, D::Error> {
            let left = enter(self.left)?;
            self.visitor.visit_some(Limited { de, left })
        }

        #[inline]
        fn visit_newtype_struct<D: Deserializer<'de>>(self, de: D) -> Result<V::Value, D::Error> {
            let left = enter(self.left)?;
            self.visitor.visit_newtype_struct(Limited { de, left })
        }

        #[inline]
        fn visit_seq<A: de::SeqAccess<'de>>(self, access: A) -> Result<V::Value, A::Error> {
            let left = enter(self.left)?;
            self.visitor.visit_seq(Access { access, left })
        }

        #[inline]
        fn visit_map<A: de::MapAccess<'de>>(self, access: A) -> Result<V::Value, A::Error> {
            let left = enter(self.left)?;
            self.visitor.visit_map(Access { access, left })
        }

        #[inline]
        fn visit_enum<A: de::EnumAccess<'de>>(self, access: A) -> Result<V::Value, A::Error> {
            let left = enter(self.left)?;
            self.visitor.visit_enum(Access { access, left })
        }
    }

    impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Seed<S> {
        type Value = S::Value;

        #[inline]
        fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<S::Value, D::Error> {
            self.seed.deserialize(Limited {
                de,
                left: self.left,
            })
        }
    }

    impl<'de, A: de::SeqAccess<'de>> de::SeqAccess<'de> for Access<A> {
        type Error = A::Error;

        #[inline]
        fn next_element_seed<T: DeserializeSeed<'de>>(
            &mut self,
            seed: T,
        ) -> Result<Option<T::Value>, A::Error> {
            let left = self.left;
            self.access.next_element_seed(Seed { seed, left })
        }

        #[inline]
        fn size_hint(&self) -> Option<usize> {
            self.access.size_hint()
        }
    }

    impl<'de, A: de::MapAccess<'de>> de::MapAccess<'de> for Access<A> {
        type Error = A::Error;

        #[inline]
        fn next_key_seed<K: DeserializeSeed<'de>>(
            &mut self,
            seed: K,
        ) -> Result<Option<K::Value>, A::Error> {
            let left = self.left;
            self.access.next_key_seed(Seed { seed, left })
        }

        #[inline]
        fn next_value_seed<T: DeserializeSeed<'de>>(
            &mut self,
            seed: T,
        ) -> Result<T::Value, A::Error> {
            let left = self.left;
            self.access.next_value_seed(Seed { seed, left })
        }

        #[inline]
        fn next_entry_seed<K: DeserializeSeed<'de>, T: DeserializeSeed<'de>>(
            &mut self,
            key: K,
            value: T,
        ) -> Result<Option<(K::Value, T::Value)>, A::Error> {
            let left = self.left;
            self.access
                .next_entry_seed(Seed { seed: key, left }, Seed { seed: value, left })
        }

        #[inline]
        fn size_hint(&self) -> Option<usize> {
            self.access.size_hint()
        }
    }

    impl<'de, A: de::EnumAccess<'de>> de::EnumAccess<'de> for Access<A> {
        type Error = A::Error;
        type Variant = Access<A::Variant>;

        #[inline]
        fn variant_seed<T: DeserializeSeed<'de>>(
            self,
            seed: T,
        ) -> Result<(T::Value, Self::Variant), A::Error> {
            let left = self.left;
            let (value, access) = self.access.variant_seed(Seed { seed, left })?;
            Ok((value, Access { access, left }))
        }
    }

    impl<'de, A: de::VariantAccess<'de>> de::VariantAccess<'de> for Access<A> {
        type Error = A::Error;

        #[inline]
        fn unit_variant(self) -> Result<(), A::Error> {
            self.access.unit_variant()
        }

        #[inline]
        fn newtype_variant_seed<T: DeserializeSeed<'de>>(
            self,
            seed: T,
        ) -> Result<T::Value, A::Error> {
            let left = self.left;
            self.access.newtype_variant_seed(Seed { seed, left })
        }

        #[inline]
        fn tuple_variant<V: Visitor<'de>>(
            self,
            len: usize,
            visitor: V,
        ) -> Result<V::Value, A::Error> {
            let left = self.left;
            self.access.tuple_variant(len, Visit { visitor, left })
        }

        #[inline]
        fn struct_variant<V: Visitor<'de>>(
            self,
            fields: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, A::Error> {
            let left = self.left;
            self.access.struct_variant(fields, Visit { visitor, left })
        }
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

    #[test]
    fn arrays_are_written_and_read_element_by_element() {
        let mut w = ArrayWriter::payload();
        w.push(&(1u64,), 1024, || "k".into()).expect("push");
        w.push(&(2u64,), 1024, || "k".into()).expect("push");
        let mark = w.mark();
        w.push(&("three".to_string(),), 1024, || "k".into())
            .expect("push");
        w.rewind(mark);
        w.push(&(3u64,), 1024, || "k".into()).expect("push");
        assert_eq!(w.len(), 3);
        let payload = w.finish();
        // A standard payload: one decode reads the whole array.
        assert_eq!(
            decode::<Vec<(u64,)>>(&payload, "k", 1024).expect("whole"),
            vec![(1,), (2,), (3,)]
        );
        let mut r = ArrayReader::payload(&payload, 1024, || "k".into()).expect("reader");
        assert_eq!(r.remaining(), 3);
        assert!(r.skip());
        assert_eq!(r.next::<(u64,)>(|| "k".into()).expect("2"), (2,));
        assert_eq!(r.next::<(u64,)>(|| "k".into()).expect("3"), (3,));
        assert!(r.next::<(u64,)>(|| "k".into()).is_err(), "nothing left");
    }

    #[test]
    fn a_bad_element_is_reported_and_skipped() {
        let mut w = ArrayWriter::new();
        w.push(&"text", 1024, || "k".into()).expect("push");
        w.push(&7u32, 1024, || "k".into()).expect("push");
        let bytes = w.finish();
        assert_eq!(array_len(&bytes), Some(2));
        let mut r = ArrayReader::array(&bytes, || "k".into()).expect("reader");
        match r.next::<u32>(|| "results of f".into()) {
            Err(Error::Codec { key, expected, .. }) => {
                assert_eq!(key, "results of f");
                assert_eq!(expected, "u32");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(r.next::<u32>(|| "k".into()).expect("next one"), 7);
        assert!(ArrayReader::array(&[0xc0], || "k".into()).is_err());
    }

    #[test]
    fn an_array_can_be_sent_in_parts() {
        let mut w = ArrayWriter::new();
        for i in 0..3u8 {
            w.push(&i, 1024, || "k".into()).expect("push");
        }
        let first = w.as_finished().to_vec();
        w.clear();
        w.push(&9u8, 1024, || "k".into()).expect("push");
        let second = w.finish();
        let mut r = ArrayReader::array(&first, || "k".into()).expect("first");
        assert_eq!(r.remaining(), 3);
        assert_eq!(r.next::<u8>(|| "k".into()).expect("0"), 0);
        let mut r = ArrayReader::array(&second, || "k".into()).expect("second");
        assert_eq!(r.remaining(), 1);
        assert_eq!(r.next::<u8>(|| "k".into()).expect("9"), 9);
    }

    #[test]
    fn an_array_header_claiming_more_elements_than_follow_is_refused() {
        // `array 32` of 4294967295 elements, and nothing after it.
        let forged = [ARRAY32, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(array_len(&forged), None);
        match ArrayReader::array(&forged, || "results of f".into()) {
            Err(Error::Codec { key, .. }) => assert_eq!(key, "results of f"),
            other => panic!("{other:?}"),
        }
        let mut payload = vec![FORMAT_VERSION];
        payload.extend_from_slice(&forged);
        assert!(matches!(
            ArrayReader::payload(&payload, 1024, || "k".into()),
            Err(Error::Codec { .. })
        ));
        assert!(matches!(
            decode::<Vec<u8>>(&payload, "k", 1024),
            Err(Error::Codec { .. })
        ));
        assert!(matches!(
            decode::<IgnoredAny>(&payload, "k", 1024),
            Err(Error::Codec { .. })
        ));
        // One element short, in each header size; a count the bytes can hold is read.
        assert_eq!(array_len(&[0x93, 1, 2]), None);
        assert_eq!(array_len(&[0xdc, 0, 3, 1, 2]), None);
        assert_eq!(array_len(&[ARRAY32, 0, 0, 0, 3, 1, 2]), None);
        assert_eq!(array_len(&[0x93, 1, 2, 3]), Some(3));
        assert_eq!(array_len(&[0xdc, 0, 3, 1, 2, 3]), Some(3));
        assert_eq!(array_len(&[ARRAY32, 0, 0, 0, 0]), Some(0));
    }

    #[test]
    fn deep_nesting_is_refused_without_exhausting_the_stack() {
        // 1 KB of nested one-element arrays around a nil.
        let mut payload = vec![FORMAT_VERSION];
        payload.extend(std::iter::repeat_n(0x91u8, 1023));
        payload.push(0xc0);
        let mut array = vec![0x91u8];
        array.extend_from_slice(&payload[1..]);
        // A small stack, as a thread of a pool or of the actor system may have: decoding must
        // fail before it runs out (an overflow aborts the whole process).
        let refused = std::thread::Builder::new()
            .stack_size(1024 * 1024)
            .spawn(move || {
                let whole = decode::<IgnoredAny>(&payload, "k", 4096);
                let mut reader = ArrayReader::array(&array, || "k".into()).expect("reader");
                let element = reader.next::<IgnoredAny>(|| "k".into());
                let mut reader = ArrayReader::array(&array, || "k".into()).expect("reader");
                (whole, element, reader.skip())
            })
            .expect("thread")
            .join()
            .expect("no overflow");
        match refused.0 {
            Err(Error::Codec { reason, .. }) => assert!(reason.contains("depth"), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(refused.1, Err(Error::Codec { .. })));
        assert!(!refused.2, "skipped");
        // A value of MAX_DEPTH - 1 nested arrays round-trips; one more level is refused.
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Nested(Vec<Nested>);
        let mut deep = Nested(Vec::new());
        for _ in 1..MAX_DEPTH - 1 {
            deep = Nested(vec![deep]);
        }
        let bytes = encode(&deep, "k", 4096).expect("encodes");
        assert_eq!(decode::<Nested>(&bytes, "k", 4096).expect("decodes"), deep);
        let deeper = encode(&Nested(vec![deep]), "k", 4096).expect("encodes");
        assert!(matches!(
            decode::<Nested>(&deeper, "k", 4096),
            Err(Error::Codec { .. })
        ));
    }

    /// An enum whose variants nest through one-entry maps that rmp-serde reads itself.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Expr {
        Lit(i64),
        Neg(Box<Expr>),
    }

    /// A type that recurses through newtypes and options alone: no byte read per level.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct L(Option<Box<L>>);

    /// An array, an option and a newtype per level.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Tree(Option<Vec<Tree>>);

    /// Runs `f` on a thread with a 2 MiB stack, as a thread of a pool or of the actor system may
    /// have: a stack overflow aborts the whole test binary.
    fn on_small_stack<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
        std::thread::Builder::new()
            .stack_size(2 * 1024 * 1024)
            .spawn(f)
            .expect("thread")
            .join()
            .expect("no overflow")
    }

    fn assert_too_deep<T: std::fmt::Debug>(result: Result<T>) {
        match result {
            Err(Error::Codec { reason, .. }) => assert!(reason.contains("depth"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn nested_enum_variants_are_refused_without_exhausting_the_stack() {
        // 1 MB of nested `{"Neg": ...}` maps around a `{"Lit": 0}`.
        let mut payload = vec![FORMAT_VERSION];
        for _ in 0..200_000 {
            payload.extend_from_slice(&[0x81, 0xa3, b'N', b'e', b'g']);
        }
        payload.extend_from_slice(&[0x81, 0xa3, b'L', b'i', b't', 0x00]);
        let (whole, element, skipped) = on_small_stack(move || {
            let whole = decode::<Expr>(&payload, "k", 2 << 20);
            let mut array = vec![0x91];
            array.extend_from_slice(&payload[1..]);
            let mut reader = ArrayReader::array(&array, || "k".into()).expect("reader");
            let element = reader.next::<Expr>(|| "k".into());
            let mut reader = ArrayReader::array(&array, || "k".into()).expect("reader");
            (whole, element, reader.skip())
        });
        assert_too_deep(whole);
        assert_too_deep(element);
        assert!(!skipped, "skipped");
    }

    #[test]
    fn options_and_newtypes_are_refused_without_exhausting_the_stack() {
        // Not nil: read as `L` it is `L(Some(L(Some(...))))` for ever, without reading a byte.
        let payload = [FORMAT_VERSION, 0x01];
        let (whole, element) = on_small_stack(move || {
            let whole = decode::<L>(&payload, "k", 64);
            let element = ArrayReader::single(&payload, 64, || "k".into())
                .expect("reader")
                .next::<L>(|| "k".into());
            (whole, element)
        });
        assert_too_deep(whole);
        assert_too_deep(element);
    }

    #[test]
    fn values_nested_up_to_the_limits_decode() {
        on_small_stack(|| {
            // One level per variant: MAX_RECURSION variants decode, one more is refused.
            let mut expr = Expr::Lit(7);
            for _ in 1..MAX_RECURSION {
                expr = Expr::Neg(Box::new(expr));
            }
            let bytes = encode(&expr, "k", 1 << 20).expect("encodes");
            assert_eq!(decode::<Expr>(&bytes, "k", 1 << 20).expect("decodes"), expr);
            let deeper = encode(&Expr::Neg(Box::new(expr)), "k", 1 << 20).expect("encodes");
            assert_too_deep(decode::<Expr>(&deeper, "k", 1 << 20));
            // A newtype, a `Some` and an array per level (`L` has no such test: `L(Some(..))` is
            // written as what it holds, so every `L` is written as nil): as deep as MAX_DEPTH
            // lets arrays nest.
            let mut tree = Tree(None);
            for _ in 1..MAX_DEPTH {
                tree = Tree(Some(vec![tree, Tree(None)]));
            }
            let bytes = encode(&tree, "k", 1 << 20).expect("encodes");
            let mut reader = ArrayReader::single(&bytes, 1 << 20, || "k".into()).expect("single");
            assert_eq!(reader.next::<Tree>(|| "k".into()).expect("decodes"), tree);
            let deeper = encode(&Tree(Some(vec![tree])), "k", 1 << 20).expect("encodes");
            assert_too_deep(decode::<Tree>(&deeper, "k", 1 << 20));
        });
    }

    #[test]
    fn elements_and_payloads_respect_the_limit() {
        let mut w = ArrayWriter::payload();
        assert!(matches!(
            w.push(&vec![0u8; 100], 50, || "arguments of f".into()),
            Err(Error::TooLarge { ref key, .. }) if key == "arguments of f"
        ));
        assert!(w.is_empty());
        let payload = w.finish();
        assert!(matches!(
            ArrayReader::payload(&payload, 2, || "k".into()),
            Err(Error::TooLarge { .. })
        ));
        let single = encode(&(4u8, 5u8), "k", 64).expect("encode");
        let mut r = ArrayReader::single(&single, 64, || "k".into()).expect("single");
        assert_eq!(r.next::<(u8, u8)>(|| "k".into()).expect("tuple"), (4, 5));
        let mut r = ArrayReader::single(&single, 64, || "k".into()).expect("single");
        assert!(r.next::<(u8,)>(|| "k".into()).is_err(), "trailing bytes");
    }
}
