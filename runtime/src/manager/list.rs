//! [`ListProxy`]: a shared list of a [`Manager`](super::Manager) (Python's `manager.list()`).
//!
//! # Semantics (Python's `list`)
//!
//! Indexes are `isize`: a negative one counts from the end (`get(-1)` is the last item). An
//! index outside the list is [`Error::IndexError`] (`get`, `set`, `del`, `pop_at`; `pop` on an
//! empty list), with Python's messages. [`ListProxy::insert`] clamps as Python does (an index
//! past the end appends, one before the start prepends). [`ListProxy::get_range`] is a slice
//! with Python's bounds: `get_range(2, 10)` of a 5-item list is items 2, 3 and 4,
//! `get_range(-3, None)` the last three; steps are not supported. `remove` and `index` of an
//! absent item are [`Error::InvalidState`] (Python's `ValueError`). A value fetched is a copy.
//!
//! Items are given by reference to any borrowed form that encodes as `T` does (`&str` for a
//! `String` item) and compared by their encoding (MessagePack, the codec's) in `remove`, `index`,
//! `count` and `contains`: equal values of a deterministic type (numbers, strings, tuples, `Vec`s
//! and structs of them) have equal encodings; a `HashMap` item does not, and `-0.0` is not `0.0`.
//!
//! Every mutation is one script, atomic. [`ListProxy::sort`] sorts by `T`'s `Ord` (stable, as
//! Python's), which Redis cannot evaluate, so the sort runs here between two scripts: the first
//! reads the items and *freezes* the list (writes by other processes wait, reads go on: they see
//! the list before the sort), the second writes the sorted items and lifts the freeze, only if
//! the list's version did not change in between (compare-and-set; a writer whose clock is far
//! enough ahead to ignore the freeze makes the sort start again instead of being overwritten).
//! So the sort applies atomically and no write is lost. A freeze lapses by itself after
//! 30 seconds (a sorter that died); writers wait at most twice that, then fail with
//! [`Error::InvalidState`].
//!
//! # Iteration
//!
//! [`ListProxy::iter`] reads the list's *shape* (one round trip), then fetches pages of
//! [`PAGE`] items by index. The shape changes with every write that inserts, removes or moves
//! items (`append`, `insert`, `pop`, `del`, `remove`, `reverse`, `sort`, `clear`), not with
//! `set`: a page whose shape differs is [`Error::InvalidState`] "list changed size during
//! iteration", after which the iterator ends, so items are never skipped or seen twice. Python's
//! list iterator instead carries on by index; `l[0] = x` during iteration is seen in both.
//!
//! # Keys (hash tag `{<ns>:manager:<manager id>}`, capability `<cap>`)
//!
//! `list:<cap>:head` (hash: `\0v` the version, bumped by every write; `\0s` the shape; `\0f`
//! the freeze of a running sort, `<token>|<deadline ms>`; `\0r` when the TTLs were last
//! refreshed), `list:<cap>:items` (list of encoded items).
//!
//! # Round trips
//!
//! Every method: 1 (a script), except `sort`: 2 (read and freeze, then write). A write that
//! meets another process's sort sends its script again when the sort is done. Iteration: 1 to
//! start, then 1 per page.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use shoal_core::error::{Error, Result};

use super::container::{Container, Kind, Marker, store};

/// Items per page of an iteration.
pub const PAGE: usize = 1000;

/// How often `sort` reads again after another process wrote between its read and its write.
const SORT_ATTEMPTS: usize = 100;

/// How long a sort may freeze the list (writes wait meanwhile): its own work, between its read
/// and its write, must take less.
const FREEZE: Duration = Duration::from_secs(30);

/// Whether a script refused a write because another process's sort froze the list.
fn is_frozen(e: &Error) -> bool {
    matches!(e, Error::Redis { source, .. } if source.code() == Some("FROZEN"))
}

fn script(body: &str) -> redis::Script {
    super::container::script(&format!("{}\n{}", include_str!("list_prelude.lua"), body))
}

static GET: LazyLock<redis::Script> = LazyLock::new(|| script(include_str!("list_get.lua")));
static RANGE: LazyLock<redis::Script> = LazyLock::new(|| script(include_str!("list_range.lua")));
static SET: LazyLock<redis::Script> = LazyLock::new(|| script(include_str!("list_set.lua")));
static POP: LazyLock<redis::Script> = LazyLock::new(|| script(include_str!("list_pop.lua")));
static PUSH: LazyLock<redis::Script> = LazyLock::new(|| script(include_str!("list_push.lua")));
static INSERT: LazyLock<redis::Script> = LazyLock::new(|| script(include_str!("list_insert.lua")));
static REMOVE: LazyLock<redis::Script> = LazyLock::new(|| script(include_str!("list_remove.lua")));
static FIND: LazyLock<redis::Script> = LazyLock::new(|| script(include_str!("list_find.lua")));
static REVERSE: LazyLock<redis::Script> =
    LazyLock::new(|| script(include_str!("list_reverse.lua")));
static SORT_BEGIN: LazyLock<redis::Script> =
    LazyLock::new(|| script(include_str!("list_sort_begin.lua")));
static REPLACE: LazyLock<redis::Script> =
    LazyLock::new(|| script(include_str!("list_replace.lua")));
static PAGE_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| script(include_str!("list_page.lua")));
static LEN: LazyLock<redis::Script> = LazyLock::new(|| script(include_str!("list_len.lua")));
static CLEAR: LazyLock<redis::Script> = LazyLock::new(|| script(include_str!("list_clear.lua")));

/// A proxy to a shared list of a [`Manager`](super::Manager) (Python's `ListProxy`).
///
/// A serde value: pass it to another process, or store it as an item or value inside another
/// container (`ListProxy<ListProxy<i64>>`), and it refers to the same list there.
///
/// ```
/// # fn main() -> shoal::Result<()> {
/// # let _rt = shoal::init()?;
/// let manager = shoal::Manager::new()?;
/// let l = manager.list_from(0..5)?;
/// assert_eq!(l.get(-1)?, 4);
/// assert_eq!(l.get_range(2, 10)?, vec![2, 3, 4]);
/// l.insert(-100, -1)?;
/// assert_eq!(l.pop()?, 4);
/// assert_eq!(l.to_vec()?, vec![-1, 0, 1, 2, 3]);
/// # Ok(()) }
/// ```
pub struct ListProxy<T> {
    container: Container,
    _type: Marker<T>,
}

impl<T> Clone for ListProxy<T> {
    fn clone(&self) -> Self {
        ListProxy {
            container: self.container.clone(),
            _type: Marker::default(),
        }
    }
}

impl<T> Debug for ListProxy<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ListProxy({})", self.container.describe())
    }
}

/// The same shared list.
impl<T> PartialEq for ListProxy<T> {
    fn eq(&self, other: &Self) -> bool {
        self.container == other.container
    }
}

impl<T> Eq for ListProxy<T> {}

impl<T> Serialize for ListProxy<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        self.container.serialize(serializer)
    }
}

impl<'de, T> Deserialize<'de> for ListProxy<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        Ok(ListProxy {
            container: Container::deserialize_kind(deserializer, Kind::List)?,
            _type: Marker::default(),
        })
    }
}

impl<T> ListProxy<T>
where
    T: Serialize + DeserializeOwned,
{
    pub(super) fn new(container: Container) -> Self {
        ListProxy {
            container,
            _type: Marker::default(),
        }
    }

    /// Item `index` (Python's `l[i]`; negative from the end); [`Error::IndexError`] outside.
    pub fn get(&self, index: isize) -> Result<T> {
        let item: Option<Vec<u8>> = self.container.run(&GET, "reading", |i| {
            i.arg(index);
        })?;
        match item {
            Some(bytes) => self.container.decode(&bytes),
            None => Err(Error::IndexError("list index out of range".into())),
        }
    }

    /// The items of a slice (Python's `l[start:stop]`, with its bounds: negative from the end,
    /// clamped to the list, `None` for a missing bound): `get_range(2, 10)` is `l[2:10]`,
    /// `get_range(1, -1)` is `l[1:-1]`, `get_range(-3, None)` is `l[-3:]`, `get_range(None,
    /// None)` is `l[:]`. Steps are not supported.
    pub fn get_range(
        &self,
        start: impl Into<Option<isize>>,
        stop: impl Into<Option<isize>>,
    ) -> Result<Vec<T>> {
        let bound = |b: Option<isize>| b.map(|b| b.to_string()).unwrap_or_default();
        let (start, stop) = (bound(start.into()), bound(stop.into()));
        let items: Vec<Vec<u8>> = self.container.run(&RANGE, "reading", |i| {
            i.arg(start).arg(stop);
        })?;
        self.decode_all(items)
    }

    fn decode_all(&self, items: Vec<Vec<u8>>) -> Result<Vec<T>> {
        let store = store()?;
        items
            .iter()
            .map(|bytes| self.container.decode_with(&store, bytes))
            .collect()
    }

    /// Sets item `index` (Python's `l[i] = x`); [`Error::IndexError`] outside the list.
    pub fn set(&self, index: isize, value: T) -> Result<()> {
        let value = self.container.encode(&value)?;
        let set: i64 = self.write(&SET, "writing", |i| {
            i.arg(index).arg(&value);
        })?;
        if set == 0 {
            return Err(Error::IndexError(
                "list assignment index out of range".into(),
            ));
        }
        Ok(())
    }

    /// Removes item `index` (Python's `del l[i]`); [`Error::IndexError`] outside the list.
    pub fn del(&self, index: isize) -> Result<()> {
        self.take(Some(index), "list assignment index out of range")
            .map(|_| ())
    }

    fn take(&self, index: Option<isize>, out_of_range: &str) -> Result<Vec<u8>> {
        let index = index.map(|i| i.to_string()).unwrap_or_default();
        let reply: (i64, Option<Vec<u8>>) = self.write(&POP, "removing from", |i| {
            i.arg(&index);
        })?;
        match reply {
            (2, Some(bytes)) => Ok(bytes),
            (0, _) => Err(Error::IndexError("pop from empty list".into())),
            (1, _) => Err(Error::IndexError(out_of_range.into())),
            _ => Err(self.container.malformed("pop")),
        }
    }

    /// Removes and returns the last item (Python's `l.pop()`); [`Error::IndexError`] when the
    /// list is empty.
    pub fn pop(&self) -> Result<T> {
        let bytes = self.take(None, "pop index out of range")?;
        self.container.decode(&bytes)
    }

    /// Removes and returns item `index` (Python's `l.pop(i)`); [`Error::IndexError`] when the
    /// list is empty or `index` is outside it.
    pub fn pop_at(&self, index: isize) -> Result<T> {
        let bytes = self.take(Some(index), "pop index out of range")?;
        self.container.decode(&bytes)
    }

    /// Appends `value` (Python's `l.append(x)`).
    pub fn append(&self, value: T) -> Result<()> {
        let value = self.container.encode(&value)?;
        self.write::<i64>(&PUSH, "writing", |i| {
            i.arg(&value);
        })?;
        Ok(())
    }

    /// Appends every item, atomically (Python's `l.extend(xs)`).
    pub fn extend(&self, values: impl IntoIterator<Item = T>) -> Result<()> {
        let encoded = values
            .into_iter()
            .map(|v| self.container.encode(&v))
            .collect::<Result<Vec<_>>>()?;
        if encoded.is_empty() {
            return Ok(());
        }
        self.write::<i64>(&PUSH, "writing", |i| {
            i.arg(&encoded);
        })?;
        Ok(())
    }

    /// Inserts `value` before item `index` (Python's `l.insert(i, x)`: negative from the end;
    /// past the end appends, before the start prepends).
    pub fn insert(&self, index: isize, value: T) -> Result<()> {
        let value = self.container.encode(&value)?;
        self.write::<i64>(&INSERT, "writing", |i| {
            i.arg(index).arg(&value);
        })?;
        Ok(())
    }

    /// Removes the first item equal to `value` (Python's `l.remove(x)`); [`Error::InvalidState`]
    /// (Python's `ValueError`) when there is none.
    pub fn remove<Q>(&self, value: &Q) -> Result<()>
    where
        T: std::borrow::Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        let value = self.container.encode(value)?;
        let removed: i64 = self.write(&REMOVE, "removing from", |i| {
            i.arg(&value);
        })?;
        if removed == 0 {
            return Err(Error::invalid_state("list.remove(x): x not in list"));
        }
        Ok(())
    }

    /// The position of the first item equal to `value` (Python's `l.index(x)`);
    /// [`Error::InvalidState`] (Python's `ValueError`) when there is none.
    pub fn index<Q>(&self, value: &Q) -> Result<usize>
    where
        T: std::borrow::Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        let position = self.find(value, "index")?;
        usize::try_from(position).map_err(|_| Error::invalid_state("x is not in list"))
    }

    /// How many items equal `value` (Python's `l.count(x)`).
    pub fn count<Q>(&self, value: &Q) -> Result<usize>
    where
        T: std::borrow::Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        Ok(usize::try_from(self.find(value, "count")?).unwrap_or(0))
    }

    /// Whether an item equals `value` (Python's `x in l`).
    pub fn contains<Q>(&self, value: &Q) -> Result<bool>
    where
        T: std::borrow::Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        Ok(self.find(value, "index")? >= 0)
    }

    fn find<Q: Serialize + ?Sized>(&self, value: &Q, mode: &str) -> Result<i64> {
        let value = self.container.encode(value)?;
        self.container.run(&FIND, "reading", |i| {
            i.arg(value).arg(mode);
        })
    }

    /// Reverses the list in place, atomically (Python's `l.reverse()`).
    pub fn reverse(&self) -> Result<()> {
        self.write::<i64>(&REVERSE, "reversing", |_| {})?;
        Ok(())
    }

    /// Sorts the list in place by `T`'s order, stably and atomically (Python's `l.sort()`).
    pub fn sort(&self) -> Result<()>
    where
        T: Ord,
    {
        self.sort_by(T::cmp)
    }

    /// Sorts the list in place by `compare`, stably and atomically (Python's `l.sort(key=...)`;
    /// `|a, b| b.cmp(a)` for `reverse=True`). `compare` runs in this process.
    pub fn sort_by(&self, mut compare: impl FnMut(&T, &T) -> std::cmp::Ordering) -> Result<()> {
        let store = store()?;
        for _ in 0..SORT_ATTEMPTS {
            let token = uuid::Uuid::new_v4().simple().to_string();
            let mut reply: VecDeque<Vec<u8>> = self
                .write::<Vec<Vec<u8>>>(&SORT_BEGIN, "sorting", |i| {
                    i.arg(&token).arg(FREEZE.as_millis() as u64);
                })?
                .into();
            let Some(version) = reply.pop_front() else {
                return Err(self.container.malformed("the items to sort"));
            };
            let mut items = reply
                .into_iter()
                .map(|bytes| Ok((self.container.decode_with::<T>(&store, &bytes)?, bytes)))
                .collect::<Result<Vec<(T, Vec<u8>)>>>()?;
            items.sort_by(|a, b| compare(&a.0, &b.0));
            let encoded: Vec<Vec<u8>> = items.into_iter().map(|(_, bytes)| bytes).collect();
            let written = self.container.run::<i64>(&REPLACE, "sorting", |i| {
                i.arg(&token).arg(&version).arg(encoded);
            });
            match written {
                Ok(1) => return Ok(()),
                // Written meanwhile (a writer whose clock ignored the freeze), or the freeze
                // lapsed and another sort holds one: sort again.
                Ok(_) => continue,
                Err(e) if is_frozen(&e) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::invalid_state(format!(
            "{}: other processes wrote to the list during each of {SORT_ATTEMPTS} attempts to \
             sort it",
            self.container.describe()
        )))
    }

    /// Runs a write script, waiting while another process's sort freezes the list (at most
    /// until its freeze lapses, however often sorts follow each other: then the write is
    /// [`Error::InvalidState`]).
    fn write<R: redis::FromRedisValue>(
        &self,
        script: &redis::Script,
        what: &'static str,
        fill: impl Fn(&mut redis::ScriptInvocation<'_>),
    ) -> Result<R> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            match self.container.run(script, what, &fill) {
                Err(e) if is_frozen(&e) => {
                    if started.elapsed() > 2 * FREEZE {
                        return Err(Error::invalid_state(format!(
                            "{}: sorts by other processes kept the list frozen for {:?}",
                            self.container.describe(),
                            started.elapsed()
                        )));
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                other => return other,
            }
        }
    }

    /// The number of items (Python's `len(l)`).
    pub fn len(&self) -> Result<usize> {
        let (len, _, _): (usize, String, String) = self.container.run(&LEN, "reading", |_| {})?;
        Ok(len)
    }

    /// Whether the list has no item.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Every item (Python's `l[:]`): a copy, read atomically.
    pub fn to_vec(&self) -> Result<Vec<T>> {
        let page = self.page(0, 0, "")?;
        self.decode_all(page.items)
    }

    /// Removes every item (Python's `l.clear()`).
    pub fn clear(&self) -> Result<()> {
        self.write::<i64>(&CLEAR, "clearing", |_| {})?;
        Ok(())
    }

    /// An iterator over the items, a page at a time (see the module docs for changes during
    /// iteration). One round trip now (it reads the shape to compare with), then one per page.
    pub fn iter(&self) -> Result<ListIter<T>> {
        let (_, _, shape): (usize, String, String) = self.container.run(&LEN, "reading", |_| {})?;
        Ok(ListIter {
            list: self.clone(),
            shape,
            next_index: 0,
            buffer: VecDeque::new(),
            done: false,
        })
    }

    fn page(&self, start: usize, count: usize, shape: &str) -> Result<ListPage> {
        let mut reply: VecDeque<Vec<u8>> = self
            .container
            .run::<Vec<Vec<u8>>>(&PAGE_SCRIPT, "reading", |i| {
                i.arg(start).arg(count).arg(shape);
            })?
            .into();
        let (Some(_version), Some(shape)) = (reply.pop_front(), reply.pop_front()) else {
            return Err(self.container.malformed("a page"));
        };
        Ok(ListPage {
            shape: String::from_utf8_lossy(&shape).into_owned(),
            items: reply.into(),
        })
    }
}

/// One page of `list_page.lua`.
struct ListPage {
    shape: String,
    items: Vec<Vec<u8>>,
}

/// An iterator over a [`ListProxy`]'s items, a page at a time; yields [`Error::InvalidState`]
/// once and ends when items were inserted, removed or moved since it was made.
pub struct ListIter<T> {
    list: ListProxy<T>,
    shape: String,
    next_index: usize,
    buffer: VecDeque<T>,
    done: bool,
}

impl<T> Debug for ListIter<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListIter")
            .field("list", &self.list)
            .field("next_index", &self.next_index)
            .field("done", &self.done)
            .finish()
    }
}

impl<T: Serialize + DeserializeOwned> ListIter<T> {
    fn fetch(&mut self) -> Result<()> {
        let page = self.list.page(self.next_index, PAGE, &self.shape)?;
        if page.shape != self.shape {
            return Err(Error::invalid_state(format!(
                "list changed size during iteration ({})",
                self.list.container.describe()
            )));
        }
        if page.items.len() < PAGE {
            self.done = true;
        }
        self.next_index += page.items.len();
        self.buffer = self.list.decode_all(page.items)?.into();
        Ok(())
    }
}

impl<T: Serialize + DeserializeOwned> Iterator for ListIter<T> {
    type Item = Result<T>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(item) = self.buffer.pop_front() {
            return Some(Ok(item));
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

impl<T: Serialize + DeserializeOwned> std::iter::FusedIterator for ListIter<T> {}
