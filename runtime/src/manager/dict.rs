//! [`DictProxy`]: a shared dictionary of a [`Manager`](super::Manager) (Python's
//! `manager.dict()`).
//!
//! # Semantics (Python's `dict`)
//!
//! Keys keep their insertion order (replacing a value keeps the key's place): `keys`, `values`,
//! `items`, `copy` and iteration follow it, and `popitem` removes the last inserted pair. A
//! missing key is [`Error::KeyError`] naming the key (`getitem`, `del`, `pop`, `popitem` on an
//! empty dict); `get` returns `None` and `get_or` the default instead. A value fetched is a copy.
//! Every operation is one script, so `setdefault`, `pop`, `popitem` and `update` are atomic.
//!
//! Keys are stored encoded (MessagePack, the codec's), and two keys are the same key when their
//! encodings are equal: `K` must encode deterministically, as strings, integers, chars, bools
//! and tuples, `Vec`s or structs of them do. A `HashMap` or `HashSet` key does not (its
//! iteration order varies), nor a float key that Python would call equal to an integer (`1.0`
//! and `1` are different keys here). Methods take keys by reference to any borrowed form that
//! encodes as `K` does (`&str` for a `String` key, as `HashMap::get` does).
//!
//! # Iteration
//!
//! [`DictProxy::iter`] reads the dict's version (one round trip), then fetches pages of
//! [`PAGE`] pairs; each page comes with the version, and a page whose version differs (keys were
//! added or removed since the iterator was made) is [`Error::InvalidState`] "dictionary changed
//! size during iteration", after which the iterator ends (Python's `RuntimeError`). Replacing a
//! value is not a change of size. A change made while the pairs of a page are being handed out
//! is noticed at the next page: what the iterator yields always comes from one consistent page,
//! never a mix of two states. After the last page the iterator reads once more (a page past
//! the last pair, empty, with the version) before it ends, so a change made while the last (or
//! only) page was handed out is reported too, as Python reports it at the `next` that would
//! end the iteration.
//!
//! # Keys (hash tag `{<ns>:manager:<manager id>}`, capability `<cap>`)
//!
//! `dict:<cap>:data` (hash: encoded key → encoded value, plus `\0v` the version, counting
//! insertions and deletions of keys, and `\0r` when the TTLs were last refreshed),
//! `dict:<cap>:order` (sorted set: encoded key, scored by the version that inserted it, plus the
//! member `\0` scored -inf, which keeps the set and its TTL while the dict is empty). Both keys
//! get their TTL together, `clear` included, so neither outlives the other; a dict whose data
//! exists without its order (broken apart by hand, or by an older shoal's `clear`) is
//! [`Error::InvalidState`] "its Redis keys hold data shoal did not write" for the operations that
//! use the order, which never make it again.
//!
//! # Round trips
//!
//! Every method: 1 (a script), and so its async form (`get_async`...; see the `manager` module
//! docs). Iteration: 1 to start, 1 per page, and 1 more to end (the empty read past the last
//! pair that checks the version): 3 for a dict of fewer than [`PAGE`] keys, 2 for an empty
//! one. Inside Redis, `get` is
//! one `HMGET`, `set` of an existing key an `HMGET` and an `HSET`, of a new key an `EXISTS` (of
//! the order) and a `ZADD` more
//! (TTLs are refreshed once a tenth of `redis.expiry_secs`, not on every call).

use std::collections::VecDeque;
use std::fmt::Debug;
use std::sync::LazyLock;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use shoal_core::error::{Error, Result};

use super::container::{Call, Container, Kind, Marker, store};
use super::stream::{self, DictStream};

/// Pairs per page of an iteration.
pub const PAGE: usize = 1000;

/// A dict script: the container prelude, the dict prelude (the check that the order exists),
/// then `body`.
fn script(body: &str) -> redis::Script {
    super::container::script(&format!("{}\n{}", include_str!("dict_prelude.lua"), body))
}

static GET: LazyLock<redis::Script> = LazyLock::new(|| script(include_str!("dict_get.lua")));
static SET: LazyLock<redis::Script> = LazyLock::new(|| script(include_str!("dict_set.lua")));
static SETDEFAULT: LazyLock<redis::Script> =
    LazyLock::new(|| script(include_str!("dict_setdefault.lua")));
static POP: LazyLock<redis::Script> = LazyLock::new(|| script(include_str!("dict_pop.lua")));
static POPITEM: LazyLock<redis::Script> =
    LazyLock::new(|| script(include_str!("dict_popitem.lua")));
static UPDATE: LazyLock<redis::Script> = LazyLock::new(|| script(include_str!("dict_update.lua")));
static CLEAR: LazyLock<redis::Script> = LazyLock::new(|| script(include_str!("dict_clear.lua")));
static LEN: LazyLock<redis::Script> = LazyLock::new(|| script(include_str!("dict_len.lua")));
static PAGE_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| script(include_str!("dict_page.lua")));

/// A proxy to a shared dictionary of a [`Manager`](super::Manager) (Python's `DictProxy`).
///
/// A serde value: pass it to another process, or store it as a value inside another container
/// (`DictProxy<String, DictProxy<String, i64>>`), and it refers to the same dictionary there.
///
/// ```
/// # fn main() -> shoal::Result<()> {
/// # let _rt = shoal::init()?;
/// let manager = shoal::Manager::new()?;
/// let d = manager.dict::<String, i64>()?;
/// d.set("a", 1)?;
/// assert_eq!(d.getitem("a")?, 1);
/// assert_eq!(d.get("b")?, None);
/// assert!(matches!(d.getitem("b"), Err(shoal::Error::KeyError(_))));
/// # Ok(()) }
/// ```
pub struct DictProxy<K, V> {
    container: Container,
    _types: Marker<(K, V)>,
}

impl<K, V> Clone for DictProxy<K, V> {
    fn clone(&self) -> Self {
        DictProxy {
            container: self.container.clone(),
            _types: Marker::default(),
        }
    }
}

impl<K, V> Debug for DictProxy<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DictProxy({})", self.container.describe())
    }
}

/// The same shared dictionary.
impl<K, V> PartialEq for DictProxy<K, V> {
    fn eq(&self, other: &Self) -> bool {
        self.container == other.container
    }
}

impl<K, V> Eq for DictProxy<K, V> {}

impl<K, V> Serialize for DictProxy<K, V> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        self.container.serialize(serializer)
    }
}

impl<'de, K, V> Deserialize<'de> for DictProxy<K, V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        Ok(DictProxy {
            container: Container::deserialize_kind(deserializer, Kind::Dict)?,
            _types: Marker::default(),
        })
    }
}

/// `Some(bytes)` or `None`, as a script replies.
type MaybeBytes = Option<Vec<u8>>;

impl<K, V> DictProxy<K, V>
where
    K: Serialize + DeserializeOwned,
    V: Serialize + DeserializeOwned,
{
    pub(super) fn new(container: Container) -> Self {
        DictProxy {
            container,
            _types: Marker::default(),
        }
    }

    fn key_error<Q: Debug + ?Sized>(key: &Q) -> Error {
        Error::KeyError(format!("{key:?}"))
    }

    // The calls: each method's request and the reading of its reply, shared by its blocking and
    // its async form.

    fn get_call<Q: Serialize + ?Sized>(&self, key: &Q) -> Result<Call<MaybeBytes, Option<V>>> {
        let key = self.container.encode(key)?;
        Ok(Call::new(&GET, "reading", |c, value: MaybeBytes| {
            value.map(|v| c.decode(&v)).transpose()
        })
        .bytes(key)
        .arg("0"))
    }

    fn contains_call<Q: Serialize + ?Sized>(&self, key: &Q) -> Result<Call<i64, bool>> {
        let key = self.container.encode(key)?;
        Ok(Call::new(&GET, "reading", |_, found: i64| Ok(found == 1))
            .bytes(key)
            .arg("1"))
    }

    fn set_call<Q: Serialize + ?Sized>(&self, key: &Q, value: V) -> Result<Call<i64, ()>> {
        let key = self.container.encode(key)?;
        let value = self.container.encode(&value)?;
        Ok(Call::new(&SET, "writing", |_, _: i64| Ok(()))
            .bytes(key)
            .bytes(value))
    }

    /// Removes `key`: its value, or `None` when it was missing.
    fn pop_call<Q: Serialize + ?Sized>(&self, key: &Q) -> Result<Call<MaybeBytes, Option<V>>> {
        let key = self.container.encode(key)?;
        Ok(Call::new(&POP, "removing from", |c, value: MaybeBytes| {
            value.map(|v| c.decode(&v)).transpose()
        })
        .bytes(key))
    }

    /// Removes `key`: whether it was there (its value is not decoded: a `del` never fails after
    /// it removed).
    fn del_call<Q: Serialize + ?Sized>(&self, key: &Q) -> Result<Call<MaybeBytes, bool>> {
        let key = self.container.encode(key)?;
        Ok(Call::new(&POP, "removing from", |_, value: MaybeBytes| {
            Ok(value.is_some())
        })
        .bytes(key))
    }

    fn len_call() -> Call<(usize, String), (usize, String)> {
        Call::new(&LEN, "reading", |_, reply| Ok(reply))
    }

    fn popitem_call() -> Call<Vec<Vec<u8>>, (K, V)> {
        Call::new(
            &POPITEM,
            "removing from",
            |c, pair: Vec<Vec<u8>>| match pair.as_slice() {
                [] => Err(Error::KeyError("popitem(): dictionary is empty".into())),
                [k, v] => Ok((c.decode(k)?, c.decode(v)?)),
                _ => Err(c.malformed("popitem")),
            },
        )
    }

    fn setdefault_call<Q: Serialize + ?Sized>(
        &self,
        key: &Q,
        default: V,
    ) -> Result<Call<Vec<u8>, V>> {
        let key = self.container.encode(key)?;
        let default = self.container.encode(&default)?;
        Ok(
            Call::new(&SETDEFAULT, "writing", |c, value: Vec<u8>| c.decode(&value))
                .bytes(key)
                .bytes(default),
        )
    }

    /// `None` when there is nothing to set (no round trip).
    fn update_call(
        &self,
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Option<Call<i64, ()>>> {
        let mut encoded = Vec::new();
        for (k, v) in pairs {
            encoded.push(self.container.encode(&k)?);
            encoded.push(self.container.encode(&v)?);
        }
        if encoded.is_empty() {
            return Ok(None);
        }
        Ok(Some(
            Call::new(&UPDATE, "writing", |_, _: i64| Ok(())).all_bytes(encoded),
        ))
    }

    fn clear_call() -> Call<i64, ()> {
        Call::new(&CLEAR, "clearing", |_, _: i64| Ok(()))
    }

    fn page_call(after: &str, count: usize, version: &str) -> Call<Vec<Vec<u8>>, Page> {
        Call::new(&PAGE_SCRIPT, "reading", |c, reply: Vec<Vec<u8>>| {
            Page::parse(reply).ok_or_else(|| c.malformed("a page"))
        })
        .arg(after)
        .arg(count)
        .arg(version)
        .arg("kvs")
    }

    /// Every pair: one page of them all.
    fn items_call() -> Call<Vec<Vec<u8>>, Vec<(K, V)>> {
        Call::new(&PAGE_SCRIPT, "reading", |c, reply: Vec<Vec<u8>>| {
            Page::parse(reply)
                .ok_or_else(|| c.malformed("a page"))?
                .into_pairs(c)
        })
        .arg("0")
        .arg(0)
        .arg("")
        .arg("kvs")
    }

    /// Every key: one page of them all, without their values (a value that would not decode as
    /// `V` does not make `keys` fail, and none is sent).
    fn keys_call() -> Call<Vec<Vec<u8>>, Vec<K>> {
        Call::new(&PAGE_SCRIPT, "reading", |c, reply: Vec<Vec<u8>>| {
            decode_halves(c, reply)
        })
        .arg("0")
        .arg(0)
        .arg("")
        .arg("k")
    }

    /// Every value: one page of them all, without their keys.
    fn values_call() -> Call<Vec<Vec<u8>>, Vec<V>> {
        Call::new(&PAGE_SCRIPT, "reading", |c, reply: Vec<Vec<u8>>| {
            decode_halves(c, reply)
        })
        .arg("0")
        .arg(0)
        .arg("")
        .arg("v")
    }

    // The blocking forms.

    /// The value under `key`, or `None` (Python's `d.get(key)`).
    pub fn get<Q>(&self, key: &Q) -> Result<Option<V>>
    where
        K: std::borrow::Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        self.container.run(self.get_call(key)?)
    }

    /// The value under `key`, or `default` (Python's `d.get(key, default)`).
    pub fn get_or<Q>(&self, key: &Q, default: V) -> Result<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        Ok(self.get(key)?.unwrap_or(default))
    }

    /// The value under `key` (Python's `d[key]`); [`Error::KeyError`] naming the key when it is
    /// missing.
    pub fn getitem<Q>(&self, key: &Q) -> Result<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Serialize + Debug + ?Sized,
    {
        self.get(key)?.ok_or_else(|| Self::key_error(key))
    }

    /// Sets `key` to `value` (Python's `d[key] = value`); a new key goes last in the order.
    pub fn set<Q>(&self, key: &Q, value: V) -> Result<()>
    where
        K: std::borrow::Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        self.container.run(self.set_call(key, value)?)
    }

    /// Removes `key` (Python's `del d[key]`); [`Error::KeyError`] when it is missing.
    pub fn del<Q>(&self, key: &Q) -> Result<()>
    where
        K: std::borrow::Borrow<Q>,
        Q: Serialize + Debug + ?Sized,
    {
        if self.container.run(self.del_call(key)?)? {
            Ok(())
        } else {
            Err(Self::key_error(key))
        }
    }

    /// Whether `key` is present (Python's `key in d`).
    pub fn contains<Q>(&self, key: &Q) -> Result<bool>
    where
        K: std::borrow::Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        self.container.run(self.contains_call(key)?)
    }

    /// The number of keys (Python's `len(d)`).
    pub fn len(&self) -> Result<usize> {
        Ok(self.container.run(Self::len_call())?.0)
    }

    /// Whether the dict has no key.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Removes `key` and returns its value (Python's `d.pop(key)`); [`Error::KeyError`] when it
    /// is missing.
    ///
    /// The removal and the read are one script, and the value is decoded after it, here: a
    /// value that does not decode as `V` (a proxy of the wrong type) is removed all the same and
    /// lost, and the call is [`Error::Codec`]. (Checking first would cost a second round trip
    /// on every pop.)
    pub fn pop<Q>(&self, key: &Q) -> Result<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Serialize + Debug + ?Sized,
    {
        self.container
            .run(self.pop_call(key)?)?
            .ok_or_else(|| Self::key_error(key))
    }

    /// Removes `key` and returns its value, or `default` when it is missing (Python's
    /// `d.pop(key, default)`). As [`DictProxy::pop`], a value that does not decode as `V` is
    /// removed and lost, and the call is [`Error::Codec`].
    pub fn pop_or<Q>(&self, key: &Q, default: V) -> Result<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        Ok(self.container.run(self.pop_call(key)?)?.unwrap_or(default))
    }

    /// Removes and returns the last inserted pair (Python's `d.popitem()`, LIFO);
    /// [`Error::KeyError`] when the dict is empty. As [`DictProxy::pop`], a pair that does not
    /// decode as `(K, V)` is removed and lost, and the call is [`Error::Codec`].
    pub fn popitem(&self) -> Result<(K, V)> {
        self.container.run(Self::popitem_call())
    }

    /// The value under `key`; when it is missing, inserts `default` and returns it (Python's
    /// `d.setdefault(key, default)`), atomically.
    pub fn setdefault<Q>(&self, key: &Q, default: V) -> Result<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        self.container.run(self.setdefault_call(key, default)?)
    }

    /// Sets every pair, in order, atomically (Python's `d.update(pairs)`).
    pub fn update(&self, pairs: impl IntoIterator<Item = (K, V)>) -> Result<()> {
        match self.update_call(pairs)? {
            Some(call) => self.container.run(call),
            None => Ok(()),
        }
    }

    /// Removes every key (Python's `d.clear()`).
    pub fn clear(&self) -> Result<()> {
        self.container.run(Self::clear_call())
    }

    /// Every pair, in insertion order (Python's `list(d.items())`): a copy, read atomically.
    pub fn items(&self) -> Result<Vec<(K, V)>> {
        self.container.run(Self::items_call())
    }

    /// Every key, in insertion order (Python's `list(d.keys())`): a copy, read atomically. Only
    /// the keys are read (the values are neither sent nor decoded).
    pub fn keys(&self) -> Result<Vec<K>> {
        self.container.run(Self::keys_call())
    }

    /// Every value, in insertion order (Python's `list(d.values())`): a copy, read atomically.
    /// Only the values are read.
    pub fn values(&self) -> Result<Vec<V>> {
        self.container.run(Self::values_call())
    }

    /// A copy of the whole dict as any map (Python's `d.copy()`): `HashMap`, `BTreeMap`, or a
    /// `Vec<(K, V)>` that keeps the order.
    pub fn copy<M: FromIterator<(K, V)>>(&self) -> Result<M> {
        Ok(self.items()?.into_iter().collect())
    }

    /// An iterator over the pairs, in insertion order, a page at a time (Python's
    /// `iter(d.items())`; see the module docs for changes during iteration). One round trip
    /// now (it reads the version to compare with), then one per page and one more to end.
    pub fn iter(&self) -> Result<DictIter<K, V>> {
        let (_, version) = self.container.run(Self::len_call())?;
        Ok(DictIter {
            dict: self.clone(),
            version,
            after: "0".into(),
            buffer: VecDeque::new(),
            done: false,
        })
    }

    fn page(&self, after: &str, count: usize, version: &str) -> Result<Page> {
        self.container.run(Self::page_call(after, count, version))
    }

    /// What an iterator reports when keys were added or removed since it was made.
    fn changed_size(&self) -> Error {
        Error::invalid_state(format!(
            "dictionary changed size during iteration ({})",
            self.container.describe()
        ))
    }

    // The async forms (see the module docs).

    /// The async form of [`DictProxy::get`]: the same round trip, sent from a task (see
    /// "Async forms" in the `manager` module docs).
    pub fn get_async<Q>(
        &self,
        key: &Q,
    ) -> impl Future<Output = Result<Option<V>>> + Send + use<K, V, Q>
    where
        K: std::borrow::Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        self.container.run_async(self.get_call(key))
    }

    /// The async form of [`DictProxy::get_or`].
    pub fn get_or_async<Q>(
        &self,
        key: &Q,
        default: V,
    ) -> impl Future<Output = Result<V>> + Send + use<K, V, Q>
    where
        K: std::borrow::Borrow<Q>,
        Q: Serialize + ?Sized,
        V: Send,
    {
        let value = self.container.run_async(self.get_call(key));
        async move { Ok(value.await?.unwrap_or(default)) }
    }

    /// The async form of [`DictProxy::getitem`]: [`Error::KeyError`] naming the key when it is
    /// missing (the key's name is formatted when the call is made: the future does not borrow
    /// the key).
    pub fn getitem_async<Q>(&self, key: &Q) -> impl Future<Output = Result<V>> + Send + use<K, V, Q>
    where
        K: std::borrow::Borrow<Q>,
        Q: Serialize + Debug + ?Sized,
    {
        let value = self.container.run_async(self.get_call(key));
        let missing = Self::key_error(key);
        async move { value.await?.ok_or(missing) }
    }

    /// The async form of [`DictProxy::set`]. A set whose future is dropped once sent is still
    /// applied (once).
    pub fn set_async<Q>(
        &self,
        key: &Q,
        value: V,
    ) -> impl Future<Output = Result<()>> + Send + use<K, V, Q>
    where
        K: std::borrow::Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        self.container.run_async(self.set_call(key, value))
    }

    /// The async form of [`DictProxy::del`]: [`Error::KeyError`] when the key is missing.
    pub fn del_async<Q>(&self, key: &Q) -> impl Future<Output = Result<()>> + Send + use<K, V, Q>
    where
        K: std::borrow::Borrow<Q>,
        Q: Serialize + Debug + ?Sized,
    {
        let removed = self.container.run_async(self.del_call(key));
        let missing = Self::key_error(key);
        async move { if removed.await? { Ok(()) } else { Err(missing) } }
    }

    /// The async form of [`DictProxy::contains`].
    pub fn contains_async<Q>(
        &self,
        key: &Q,
    ) -> impl Future<Output = Result<bool>> + Send + use<K, V, Q>
    where
        K: std::borrow::Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        self.container.run_async(self.contains_call(key))
    }

    /// The async form of [`DictProxy::len`].
    pub fn len_async(&self) -> impl Future<Output = Result<usize>> + Send + use<K, V> {
        let reply = self.container.run_async(Ok(Self::len_call()));
        async move { Ok(reply.await?.0) }
    }

    /// The async form of [`DictProxy::is_empty`].
    pub fn is_empty_async(&self) -> impl Future<Output = Result<bool>> + Send + use<K, V> {
        let len = self.len_async();
        async move { Ok(len.await? == 0) }
    }

    /// The async form of [`DictProxy::pop`]: [`Error::KeyError`] when the key is missing; a
    /// value that does not decode as `V` is removed and lost ([`Error::Codec`]).
    pub fn pop_async<Q>(&self, key: &Q) -> impl Future<Output = Result<V>> + Send + use<K, V, Q>
    where
        K: std::borrow::Borrow<Q>,
        Q: Serialize + Debug + ?Sized,
    {
        let value = self.container.run_async(self.pop_call(key));
        let missing = Self::key_error(key);
        async move { value.await?.ok_or(missing) }
    }

    /// The async form of [`DictProxy::pop_or`]: a value that does not decode as `V` is removed
    /// and lost ([`Error::Codec`]).
    pub fn pop_or_async<Q>(
        &self,
        key: &Q,
        default: V,
    ) -> impl Future<Output = Result<V>> + Send + use<K, V, Q>
    where
        K: std::borrow::Borrow<Q>,
        Q: Serialize + ?Sized,
        V: Send,
    {
        let value = self.container.run_async(self.pop_call(key));
        async move { Ok(value.await?.unwrap_or(default)) }
    }

    /// The async form of [`DictProxy::popitem`]: [`Error::KeyError`] when the dict is empty; a
    /// pair that does not decode is removed and lost ([`Error::Codec`]).
    pub fn popitem_async(&self) -> impl Future<Output = Result<(K, V)>> + Send + use<K, V> {
        self.container.run_async(Ok(Self::popitem_call()))
    }

    /// The async form of [`DictProxy::setdefault`], as atomic.
    pub fn setdefault_async<Q>(
        &self,
        key: &Q,
        default: V,
    ) -> impl Future<Output = Result<V>> + Send + use<K, V, Q>
    where
        K: std::borrow::Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        self.container.run_async(self.setdefault_call(key, default))
    }

    /// The async form of [`DictProxy::update`], as atomic. The pairs are encoded when it is
    /// called (the future does not hold them).
    pub fn update_async<I: IntoIterator<Item = (K, V)>>(
        &self,
        pairs: I,
    ) -> impl Future<Output = Result<()>> + Send + use<K, V, I> {
        let update = match self.update_call(pairs) {
            Ok(Some(call)) => Some(self.container.run_async(Ok(call))),
            Ok(None) => None,
            Err(e) => Some(self.container.run_async(Err(e))),
        };
        async move {
            match update {
                Some(update) => update.await,
                None => Ok(()),
            }
        }
    }

    /// The async form of [`DictProxy::clear`].
    pub fn clear_async(&self) -> impl Future<Output = Result<()>> + Send + use<K, V> {
        self.container.run_async(Ok(Self::clear_call()))
    }

    /// The async form of [`DictProxy::items`]: every pair in one round trip, read atomically.
    pub fn items_async(&self) -> impl Future<Output = Result<Vec<(K, V)>>> + Send + use<K, V> {
        self.container.run_async(Ok(Self::items_call()))
    }

    /// The async form of [`DictProxy::keys`]: only the keys are read.
    pub fn keys_async(&self) -> impl Future<Output = Result<Vec<K>>> + Send + use<K, V> {
        self.container.run_async(Ok(Self::keys_call()))
    }

    /// The async form of [`DictProxy::values`]: only the values are read.
    pub fn values_async(&self) -> impl Future<Output = Result<Vec<V>>> + Send + use<K, V> {
        self.container.run_async(Ok(Self::values_call()))
    }

    /// The async form of [`DictProxy::iter`]: awaiting it reads the version to compare with
    /// (one round trip); the [`DictStream`] then reads a page per round trip, and one more to
    /// end. The pairs come in insertion order; a key added or removed meanwhile is reported
    /// once ([`Error::InvalidState`], "dictionary changed size during iteration"), and the
    /// stream ends.
    ///
    /// ```no_run
    /// # async fn total(d: shoal::DictProxy<String, i64>) -> shoal::Result<i64> {
    /// let mut pairs = d.iter_async().await?;
    /// let mut total = 0;
    /// while let Some(pair) = pairs.next().await {
    ///     total += pair?.1;
    /// }
    /// # Ok(total)
    /// # }
    /// ```
    pub fn iter_async(&self) -> impl Future<Output = Result<DictStream<K, V>>> + Send + use<K, V>
    where
        K: Send + 'static,
        V: Send + 'static,
    {
        let dict = self.clone();
        let len = self.container.run_async(Ok(Self::len_call()));
        async move {
            let (_, version) = len.await?;
            let inner = stream::pages("0".to_string(), move |after: String| {
                let page = dict
                    .container
                    .run_async(Ok(Self::page_call(&after, PAGE, &version)));
                let dict = dict.clone();
                let version = version.clone();
                async move {
                    let page = page.await?;
                    if page.version != version {
                        return Err(dict.changed_size());
                    }
                    // Past the last pair (an empty page, its version checked too): the end.
                    let next = page
                        .entries
                        .last()
                        .map(|[_, _, score]| String::from_utf8_lossy(score).into_owned());
                    Ok((page.into_pairs(&dict.container)?, next))
                }
            });
            Ok(DictStream { inner })
        }
    }

    /// The async form of [`DictProxy::copy`].
    pub fn copy_async<M: FromIterator<(K, V)>>(
        &self,
    ) -> impl Future<Output = Result<M>> + Send + use<K, V, M> {
        let items = self.items_async();
        async move { Ok(items.await?.into_iter().collect()) }
    }
}

/// The reply of `dict_page.lua` for one half of the pairs (`k` or `v` mode): the version, then
/// keys or values, decoded as `T`.
fn decode_halves<T: DeserializeOwned>(
    container: &Container,
    reply: Vec<Vec<u8>>,
) -> Result<Vec<T>> {
    let store = store()?;
    let mut reply = reply.into_iter();
    if reply.next().is_none() {
        return Err(container.malformed("a page"));
    }
    reply
        .map(|bytes| container.decode_with(&store, &bytes))
        .collect()
}

/// One page of `dict_page.lua`: the version and (key, value, score) triples.
struct Page {
    version: String,
    entries: Vec<[Vec<u8>; 3]>,
}

impl Page {
    fn parse(reply: Vec<Vec<u8>>) -> Option<Page> {
        let mut reply = reply.into_iter();
        let version = String::from_utf8(reply.next()?).ok()?;
        let rest: Vec<Vec<u8>> = reply.collect();
        if !rest.len().is_multiple_of(3) {
            return None;
        }
        let mut entries = Vec::with_capacity(rest.len() / 3);
        let mut rest = rest.into_iter();
        while let (Some(k), Some(v), Some(s)) = (rest.next(), rest.next(), rest.next()) {
            entries.push([k, v, s]);
        }
        Some(Page { version, entries })
    }

    fn into_pairs<K: DeserializeOwned, V: DeserializeOwned>(
        self,
        container: &Container,
    ) -> Result<Vec<(K, V)>> {
        let store = store()?;
        self.entries
            .into_iter()
            .map(|[k, v, _]| {
                Ok((
                    container.decode_with(&store, &k)?,
                    container.decode_with(&store, &v)?,
                ))
            })
            .collect()
    }
}

/// An iterator over a [`DictProxy`]'s pairs, a page at a time; yields
/// [`Error::InvalidState`] once and ends when keys were added or removed since it was made.
pub struct DictIter<K, V> {
    dict: DictProxy<K, V>,
    version: String,
    /// The score of the last pair fetched.
    after: String,
    buffer: VecDeque<(K, V)>,
    done: bool,
}

impl<K, V> Debug for DictIter<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DictIter")
            .field("dict", &self.dict)
            .field("buffered", &self.buffer.len())
            .field("done", &self.done)
            .finish()
    }
}

impl<K, V> DictIter<K, V>
where
    K: Serialize + DeserializeOwned,
    V: Serialize + DeserializeOwned,
{
    fn fetch(&mut self) -> Result<()> {
        let page = self.dict.page(&self.after, PAGE, &self.version)?;
        if page.version != self.version {
            return Err(self.dict.changed_size());
        }
        if page.entries.is_empty() {
            // Past the last pair, and the version checked once more: a key added or removed
            // while the last page was handed out was reported above (a dict of one page is
            // fetched whole by the first `next`, so this is its only check after that).
            self.done = true;
        }
        if let Some([_, _, score]) = page.entries.last() {
            self.after = String::from_utf8_lossy(score).into_owned();
        }
        self.buffer = page.into_pairs(&self.dict.container)?.into();
        Ok(())
    }
}

impl<K, V> Iterator for DictIter<K, V>
where
    K: Serialize + DeserializeOwned,
    V: Serialize + DeserializeOwned,
{
    type Item = Result<(K, V)>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(pair) = self.buffer.pop_front() {
            return Some(Ok(pair));
        }
        if self.done {
            return None;
        }
        if let Err(e) = self.fetch() {
            self.done = true;
            self.buffer.clear();
            return Some(Err(e));
        }
        self.buffer.pop_front().map(Ok)
    }
}

impl<K, V> std::iter::FusedIterator for DictIter<K, V>
where
    K: Serialize + DeserializeOwned,
    V: Serialize + DeserializeOwned,
{
}
