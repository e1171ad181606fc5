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
//! never a mix of two states.
//!
//! # Keys (hash tag `{<ns>:manager:<manager id>}`, capability `<cap>`)
//!
//! `dict:<cap>:data` (hash: encoded key → encoded value, plus `\0v` the version, counting
//! insertions and deletions of keys, and `\0r` when the TTLs were last refreshed),
//! `dict:<cap>:order` (sorted set: encoded key, scored by the version that inserted it, plus the
//! member `\0` scored -inf, which keeps the set and its TTL while the dict is empty).
//!
//! # Round trips
//!
//! Every method: 1 (a script). Iteration: 1 to start, then 1 per page. Inside Redis, `get` is
//! one `HMGET`, `set` of an existing key an `HMGET` and an `HSET`, of a new key one more `ZADD`
//! (TTLs are refreshed once a tenth of `redis.expiry_secs`, not on every call).

use std::collections::VecDeque;
use std::fmt::Debug;
use std::sync::LazyLock;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use shoal_core::error::{Error, Result};

use super::container::{Container, Kind, Marker, script, store};

/// Pairs per page of an iteration.
pub const PAGE: usize = 1000;

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

    /// The value under `key`, or `None` (Python's `d.get(key)`).
    pub fn get<Q>(&self, key: &Q) -> Result<Option<V>>
    where
        K: std::borrow::Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        let key = self.container.encode(key)?;
        let value: MaybeBytes = self.container.run(&GET, "reading", |i| {
            i.arg(key).arg("0");
        })?;
        value.map(|v| self.container.decode(&v)).transpose()
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
        let key = self.container.encode(key)?;
        let value = self.container.encode(&value)?;
        self.container.run::<i64>(&SET, "writing", |i| {
            i.arg(key).arg(value);
        })?;
        Ok(())
    }

    /// Removes `key` (Python's `del d[key]`); [`Error::KeyError`] when it is missing.
    pub fn del<Q>(&self, key: &Q) -> Result<()>
    where
        K: std::borrow::Borrow<Q>,
        Q: Serialize + Debug + ?Sized,
    {
        self.take(key)?
            .map(|_| ())
            .ok_or_else(|| Self::key_error(key))
    }

    fn take<Q>(&self, key: &Q) -> Result<MaybeBytes>
    where
        Q: Serialize + ?Sized,
    {
        let encoded = self.container.encode(key)?;
        self.container.run(&POP, "removing from", |i| {
            i.arg(encoded);
        })
    }

    /// Whether `key` is present (Python's `key in d`).
    pub fn contains<Q>(&self, key: &Q) -> Result<bool>
    where
        K: std::borrow::Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        let key = self.container.encode(key)?;
        let found: i64 = self.container.run(&GET, "reading", |i| {
            i.arg(key).arg("1");
        })?;
        Ok(found == 1)
    }

    /// The number of keys (Python's `len(d)`).
    pub fn len(&self) -> Result<usize> {
        Ok(self.len_and_version()?.0)
    }

    /// Whether the dict has no key.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    fn len_and_version(&self) -> Result<(usize, String)> {
        let (len, version): (usize, String) = self.container.run(&LEN, "reading", |_| {})?;
        Ok((len, version))
    }

    /// Removes `key` and returns its value (Python's `d.pop(key)`); [`Error::KeyError`] when it
    /// is missing.
    pub fn pop<Q>(&self, key: &Q) -> Result<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Serialize + Debug + ?Sized,
    {
        match self.take(key)? {
            Some(v) => self.container.decode(&v),
            None => Err(Self::key_error(key)),
        }
    }

    /// Removes `key` and returns its value, or `default` when it is missing (Python's
    /// `d.pop(key, default)`).
    pub fn pop_or<Q>(&self, key: &Q, default: V) -> Result<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        match self.take(key)? {
            Some(v) => self.container.decode(&v),
            None => Ok(default),
        }
    }

    /// Removes and returns the last inserted pair (Python's `d.popitem()`, LIFO);
    /// [`Error::KeyError`] when the dict is empty.
    pub fn popitem(&self) -> Result<(K, V)> {
        let pair: Vec<Vec<u8>> = self.container.run(&POPITEM, "removing from", |_| {})?;
        match pair.as_slice() {
            [] => Err(Error::KeyError("popitem(): dictionary is empty".into())),
            [k, v] => Ok((self.container.decode(k)?, self.container.decode(v)?)),
            _ => Err(self.container.malformed("popitem")),
        }
    }

    /// The value under `key`; when it is missing, inserts `default` and returns it (Python's
    /// `d.setdefault(key, default)`), atomically.
    pub fn setdefault<Q>(&self, key: &Q, default: V) -> Result<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        let key = self.container.encode(key)?;
        let default = self.container.encode(&default)?;
        let value: Vec<u8> = self.container.run(&SETDEFAULT, "writing", |i| {
            i.arg(key).arg(default);
        })?;
        self.container.decode(&value)
    }

    /// Sets every pair, in order, atomically (Python's `d.update(pairs)`).
    pub fn update(&self, pairs: impl IntoIterator<Item = (K, V)>) -> Result<()> {
        let mut encoded = Vec::new();
        for (k, v) in pairs {
            encoded.push(self.container.encode(&k)?);
            encoded.push(self.container.encode(&v)?);
        }
        if encoded.is_empty() {
            return Ok(());
        }
        self.container.run::<i64>(&UPDATE, "writing", |i| {
            i.arg(encoded);
        })?;
        Ok(())
    }

    /// Removes every key (Python's `d.clear()`).
    pub fn clear(&self) -> Result<()> {
        self.container.run::<i64>(&CLEAR, "clearing", |_| {})?;
        Ok(())
    }

    /// Every pair, in insertion order (Python's `list(d.items())`): a copy, read atomically.
    pub fn items(&self) -> Result<Vec<(K, V)>> {
        let page = self.page("0", 0, "")?;
        page.into_pairs(&self.container)
    }

    /// Every key, in insertion order (Python's `list(d.keys())`).
    pub fn keys(&self) -> Result<Vec<K>> {
        Ok(self.items()?.into_iter().map(|(k, _)| k).collect())
    }

    /// Every value, in insertion order (Python's `list(d.values())`).
    pub fn values(&self) -> Result<Vec<V>> {
        Ok(self.items()?.into_iter().map(|(_, v)| v).collect())
    }

    /// A copy of the whole dict as any map (Python's `d.copy()`): `HashMap`, `BTreeMap`, or a
    /// `Vec<(K, V)>` that keeps the order.
    pub fn copy<M: FromIterator<(K, V)>>(&self) -> Result<M> {
        Ok(self.items()?.into_iter().collect())
    }

    /// An iterator over the pairs, in insertion order, a page at a time (Python's
    /// `iter(d.items())`; see the module docs for changes during iteration). One round trip
    /// now (it reads the version to compare with), then one per page.
    pub fn iter(&self) -> Result<DictIter<K, V>> {
        let (_, version) = self.len_and_version()?;
        Ok(DictIter {
            dict: self.clone(),
            version,
            after: "0".into(),
            buffer: VecDeque::new(),
            done: false,
        })
    }

    fn page(&self, after: &str, count: usize, version: &str) -> Result<Page> {
        let reply: Vec<Vec<u8>> = self.container.run(&PAGE_SCRIPT, "reading", |i| {
            i.arg(after).arg(count).arg(version);
        })?;
        Page::parse(reply).ok_or_else(|| self.container.malformed("a page"))
    }
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
            return Err(Error::invalid_state(format!(
                "dictionary changed size during iteration ({})",
                self.dict.container.describe()
            )));
        }
        if page.entries.len() < PAGE {
            // The last page: nothing is fetched after it.
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
