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
//! the list's version did not change in between (compare-and-set; a write after a freeze that
//! lapsed makes the sort start again instead of being overwritten).
//! So the sort applies atomically and no write is lost. A sort that ends between the two
//! without writing (an error, items that do not decode, a panic in `compare`, its async form's
//! future dropped) lifts its own freeze at once: the blocking form before it returns or
//! unwinds, the async form from a task of shoal's actor runtime. A freeze lapses by itself
//! 30 seconds after the sort's read (a sorter that died), timed by Redis's clock, so the
//! processes' clocks do not matter; writers wait at most twice that, then fail with
//! [`Error::InvalidState`].
//!
//! # Iteration
//!
//! [`ListProxy::iter`] reads the list's *shape* (one round trip), then fetches pages of
//! [`PAGE`] items by index. The shape changes with every write that inserts, removes or moves
//! items (`append`, `insert`, `pop`, `del`, `remove`, `reverse`, `sort`, `clear`), not with
//! `set`: a page whose shape differs is [`Error::InvalidState`] "list changed size during
//! iteration", after which the iterator ends, so items are never skipped or seen twice. Python's
//! list iterator instead carries on by index; `l[0] = x` during iteration is seen in both. The
//! shape is checked with each page, not after the last one: a list of fewer than [`PAGE`] items
//! is read whole by the first `next`, and a change after that is not reported (the iterator
//! ends with the items it read), as Python's list iterator never reports a change. (A dict's
//! iterator reads once more to end, because Python's raises there.)
//!
//! # Keys (hash tag `{<ns>:manager:<manager id>}`, capability `<cap>`)
//!
//! `list:<cap>:head` (hash: `\0v` the version, bumped by every write; `\0s` the shape; `\0f`
//! the freeze of a running sort, `<token>|<deadline ms>` by Redis's clock; `\0r` when the TTLs
//! were last refreshed), `list:<cap>:items` (list of encoded items).
//!
//! # Round trips
//!
//! Every method: 1 (a script), except `sort`: 2 (read and freeze, then write; 1 more to lift
//! the freeze when it ends without writing); the same for its async form (`append_async`...;
//! see the `manager` module docs). A write that
//! meets another process's sort sends its script again when the sort is done. Iteration: 1 to
//! start, then 1 per page.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use shoal_core::error::{Error, Result};

use super::container::{Call, Container, Kind, Marker, pause_async, store};
use super::stream::{self, ListStream};

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
static SORT_ABORT: LazyLock<redis::Script> =
    LazyLock::new(|| script(include_str!("list_sort_abort.lua")));
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

/// How a write waits while another process's sort freezes the list, shared by the blocking and
/// the async forms: at most until the freeze lapses, however often sorts follow each other
/// (then the write is [`Error::InvalidState`]), pausing 1 ms, then twice as long each time, up
/// to 50 ms.
struct FrozenWait {
    started: Instant,
    pause: Duration,
}

impl FrozenWait {
    fn new() -> Self {
        FrozenWait {
            started: Instant::now(),
            pause: Duration::from_millis(1),
        }
    }

    /// After a write failed with `e`: the pause before sending it again, or the error to return.
    fn after(&mut self, container: &Container, e: Error) -> Result<Duration> {
        if !is_frozen(&e) {
            return Err(e);
        }
        if self.started.elapsed() > 2 * FREEZE {
            return Err(Error::invalid_state(format!(
                "{}: sorts by other processes kept the list frozen for {:?}",
                container.describe(),
                self.started.elapsed()
            )));
        }
        let pause = self.pause;
        self.pause = (pause * 2).min(Duration::from_millis(50));
        Ok(pause)
    }
}

/// The lifting of sort `token`'s freeze, if the list still has it (`list_sort_abort.lua`).
fn sort_abort_call(token: &str) -> Call<i64, ()> {
    Call::new(&SORT_ABORT, "unfreezing", |_, _: i64| Ok(())).arg(token)
}

/// A drop guard that lifts a sort's freeze when the sort ends without its write having been
/// answered: its read or write failed, `compare` panicked, items did not decode, or its future
/// was dropped. Made before the read, so that no exit path leaves the list frozen until the
/// freeze's deadline (every writer of every process would wait that long); defused by
/// [`SortFreeze::written`]. It lifts only this sort's freeze (by token), never a later sort's.
struct SortFreeze {
    container: Container,
    token: String,
    /// The blocking form's: the freeze is lifted before the guard's drop returns. Else it is
    /// lifted from a task of shoal's actor runtime, and the drop does not wait (it may run on
    /// an executor's thread).
    blocking: bool,
    armed: bool,
}

impl SortFreeze {
    fn new(container: &Container, token: &str, blocking: bool) -> Self {
        SortFreeze {
            container: container.clone(),
            token: token.to_string(),
            blocking,
            armed: true,
        }
    }

    /// After the sort's write was answered with `written`: the write lifted the freeze (it
    /// wrote, or the version differed), or the freeze was no longer this sort's (FROZEN: it
    /// lapsed, another sort holds one), so there is nothing left to lift; any other error
    /// leaves the guard armed.
    fn written(&mut self, written: &Result<i64>) {
        if written.as_ref().map_or_else(is_frozen, |_| true) {
            self.armed = false;
        }
    }
}

impl Drop for SortFreeze {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let call = sort_abort_call(&self.token);
        if !self.blocking {
            return self.container.detach(call);
        }
        if let Err(e) = self.container.send(&call) {
            self.container.clean_up_failed("unfreezing", e);
        }
    }
}

const INDEX_OUT_OF_RANGE: &str = "list index out of range";
const ASSIGNMENT_OUT_OF_RANGE: &str = "list assignment index out of range";
const POP_OUT_OF_RANGE: &str = "pop index out of range";
const POP_FROM_EMPTY: &str = "pop from empty list";

/// The item `list_pop.lua` removed, or the error of an empty list (`empty`: Python's "pop from
/// empty list" for `pop`, "list assignment index out of range" for `del`) or of an index outside
/// it (`out_of_range`).
fn taken(
    container: &Container,
    reply: (i64, Option<Vec<u8>>),
    empty: &str,
    out_of_range: &str,
) -> Result<Vec<u8>> {
    match reply {
        (2, Some(bytes)) => Ok(bytes),
        (0, _) => Err(Error::IndexError(empty.into())),
        (1, _) => Err(Error::IndexError(out_of_range.into())),
        _ => Err(container.malformed("pop")),
    }
}

/// Decodes items read from the list.
fn decode_all<T: DeserializeOwned>(container: &Container, items: Vec<Vec<u8>>) -> Result<Vec<T>> {
    let store = store()?;
    items
        .iter()
        .map(|bytes| container.decode_with(&store, bytes))
        .collect()
}

/// One page of `list_page.lua`'s reply: its version and shape, then items.
fn list_page(container: &Container, reply: Vec<Vec<u8>>) -> Result<ListPage> {
    let mut reply: VecDeque<Vec<u8>> = reply.into();
    let (Some(_version), Some(shape)) = (reply.pop_front(), reply.pop_front()) else {
        return Err(container.malformed("a page"));
    };
    Ok(ListPage {
        shape: String::from_utf8_lossy(&shape).into_owned(),
        items: reply.into(),
    })
}

/// What `list_sort_begin.lua` read: the list's version and its items (encoded).
type SortBegun = (Vec<u8>, Vec<Vec<u8>>);

/// `list_len.lua`'s reply: the length, the version and the shape.
type LenReply = (usize, String, String);

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

    // The calls: each method's request and the reading of its reply, shared by its blocking and
    // its async form. Calls that write go through `write`/`write_async`, which send them again
    // while another process's sort freezes the list.

    fn get_call(index: isize) -> Call<Option<Vec<u8>>, T> {
        Call::new(&GET, "reading", |c, item: Option<Vec<u8>>| match item {
            Some(bytes) => c.decode(&bytes),
            None => Err(Error::IndexError(INDEX_OUT_OF_RANGE.into())),
        })
        .arg(index)
    }

    fn get_range_call(start: Option<isize>, stop: Option<isize>) -> Call<Vec<Vec<u8>>, Vec<T>> {
        let bound = |b: Option<isize>| b.map(|b| b.to_string()).unwrap_or_default();
        Call::new(&RANGE, "reading", decode_all::<T>)
            .arg(bound(start))
            .arg(bound(stop))
    }

    fn set_call(&self, index: isize, value: T) -> Result<Call<i64, ()>> {
        let value = self.container.encode(&value)?;
        Ok(Call::new(&SET, "writing", |_, set: i64| {
            if set == 0 {
                return Err(Error::IndexError(ASSIGNMENT_OUT_OF_RANGE.into()));
            }
            Ok(())
        })
        .arg(index)
        .bytes(value))
    }

    fn del_call(index: isize) -> Call<(i64, Option<Vec<u8>>), ()> {
        Call::new(&POP, "removing from", |c, reply| {
            taken(c, reply, ASSIGNMENT_OUT_OF_RANGE, ASSIGNMENT_OUT_OF_RANGE).map(|_| ())
        })
        .arg(index.to_string())
    }

    /// Removes item `index`, the last when `None`.
    fn pop_call(index: Option<isize>) -> Call<(i64, Option<Vec<u8>>), T> {
        Call::new(&POP, "removing from", |c, reply| {
            c.decode(&taken(c, reply, POP_FROM_EMPTY, POP_OUT_OF_RANGE)?)
        })
        .arg(index.map(|i| i.to_string()).unwrap_or_default())
    }

    fn append_call(&self, value: T) -> Result<Call<i64, ()>> {
        let value = self.container.encode(&value)?;
        Ok(Call::new(&PUSH, "writing", |_, _: i64| Ok(())).bytes(value))
    }

    /// `None` when there is nothing to append (no round trip).
    fn extend_call(&self, values: impl IntoIterator<Item = T>) -> Result<Option<Call<i64, ()>>> {
        let encoded = values
            .into_iter()
            .map(|v| self.container.encode(&v))
            .collect::<Result<Vec<_>>>()?;
        if encoded.is_empty() {
            return Ok(None);
        }
        Ok(Some(
            Call::new(&PUSH, "writing", |_, _: i64| Ok(())).all_bytes(encoded),
        ))
    }

    fn insert_call(&self, index: isize, value: T) -> Result<Call<i64, ()>> {
        let value = self.container.encode(&value)?;
        Ok(Call::new(&INSERT, "writing", |_, _: i64| Ok(()))
            .arg(index)
            .bytes(value))
    }

    fn remove_call<Q: Serialize + ?Sized>(&self, value: &Q) -> Result<Call<i64, ()>> {
        let value = self.container.encode(value)?;
        Ok(Call::new(&REMOVE, "removing from", |_, removed: i64| {
            if removed == 0 {
                return Err(Error::invalid_state("list.remove(x): x not in list"));
            }
            Ok(())
        })
        .bytes(value))
    }

    /// `list_find.lua` in `mode` ("index": the first position or -1; "count"), read by `parse`.
    fn find_call<Q: Serialize + ?Sized, O>(
        &self,
        value: &Q,
        mode: &str,
        parse: fn(&Container, i64) -> Result<O>,
    ) -> Result<Call<i64, O>> {
        let value = self.container.encode(value)?;
        Ok(Call::new(&FIND, "reading", parse).bytes(value).arg(mode))
    }

    fn index_call<Q: Serialize + ?Sized>(&self, value: &Q) -> Result<Call<i64, usize>> {
        self.find_call(value, "index", |_, position| {
            usize::try_from(position).map_err(|_| Error::invalid_state("x is not in list"))
        })
    }

    fn count_call<Q: Serialize + ?Sized>(&self, value: &Q) -> Result<Call<i64, usize>> {
        self.find_call(value, "count", |_, count| {
            Ok(usize::try_from(count).unwrap_or(0))
        })
    }

    fn contains_call<Q: Serialize + ?Sized>(&self, value: &Q) -> Result<Call<i64, bool>> {
        self.find_call(value, "index", |_, position| Ok(position >= 0))
    }

    fn reverse_call() -> Call<i64, ()> {
        Call::new(&REVERSE, "reversing", |_, _: i64| Ok(()))
    }

    /// Reads the items and freezes the list for the sort `token`: the version and the items.
    fn sort_begin_call(token: &str) -> Call<Vec<Vec<u8>>, SortBegun> {
        Call::new(&SORT_BEGIN, "sorting", |c, reply: Vec<Vec<u8>>| {
            let mut reply: VecDeque<Vec<u8>> = reply.into();
            let Some(version) = reply.pop_front() else {
                return Err(c.malformed("the items to sort"));
            };
            Ok((version, reply.into()))
        })
        .arg(token)
        .arg(FREEZE.as_millis() as u64)
    }

    /// The async form of the read of `sort`, sent again while another process's sort freezes
    /// the list (as `write_async` does). Each request is sent from a task of shoal's actor
    /// runtime that, when the caller's future was dropped before the reply came (the sort will
    /// not go on), lifts the freeze the read set.
    async fn sort_begin_async(&self, token: &str) -> Result<SortBegun> {
        let call = Self::sort_begin_call(token);
        let mut wait = FrozenWait::new();
        loop {
            let sent = self
                .container
                .send_async_or_undo(&call, sort_abort_call(token))
                .await;
            match sent {
                Ok(reply) => return call.read(&self.container, reply),
                Err(e) => pause_async(wait.after(&self.container, e)?).await?,
            }
        }
    }

    /// Writes the sorted items, if the list is still at `version` and frozen by `token`: 1 when
    /// written.
    fn replace_call(token: &str, version: Vec<u8>, sorted: Vec<Vec<u8>>) -> Call<i64, i64> {
        Call::new(&REPLACE, "sorting", |_, written: i64| Ok(written))
            .arg(token)
            .bytes(version)
            .all_bytes(sorted)
    }

    /// The items read by `sort_begin_call`, sorted by `compare`: their encodings, in order.
    fn sorted(
        &self,
        items: Vec<Vec<u8>>,
        compare: &mut impl FnMut(&T, &T) -> std::cmp::Ordering,
    ) -> Result<Vec<Vec<u8>>> {
        let store = store()?;
        let mut items = items
            .into_iter()
            .map(|bytes| Ok((self.container.decode_with::<T>(&store, &bytes)?, bytes)))
            .collect::<Result<Vec<(T, Vec<u8>)>>>()?;
        items.sort_by(|a, b| compare(&a.0, &b.0));
        Ok(items.into_iter().map(|(_, bytes)| bytes).collect())
    }

    /// Whether a sort's write (`replace_call`) applied; `false`: sort again.
    fn sort_written(written: Result<i64>) -> Result<bool> {
        match written {
            Ok(1) => Ok(true),
            // Written meanwhile (the freeze lapsed: this sort took longer than FREEZE), or
            // another sort holds a freeze now: sort again.
            Ok(_) => Ok(false),
            Err(e) if is_frozen(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn sort_gave_up(&self) -> Error {
        Error::invalid_state(format!(
            "{}: other processes wrote to the list during each of {SORT_ATTEMPTS} attempts to \
             sort it",
            self.container.describe()
        ))
    }

    fn len_call() -> Call<LenReply, usize> {
        Call::new(&LEN, "reading", |_, (len, _, _): LenReply| Ok(len))
    }

    fn shape_call() -> Call<LenReply, String> {
        Call::new(&LEN, "reading", |_, (_, _, shape): LenReply| Ok(shape))
    }

    fn to_vec_call() -> Call<Vec<Vec<u8>>, Vec<T>> {
        Call::new(&PAGE_SCRIPT, "reading", |c, reply: Vec<Vec<u8>>| {
            decode_all(c, list_page(c, reply)?.items)
        })
        .arg(0)
        .arg(0)
        .arg("")
    }

    fn page_call(start: usize, count: usize, shape: &str) -> Call<Vec<Vec<u8>>, ListPage> {
        Call::new(&PAGE_SCRIPT, "reading", list_page)
            .arg(start)
            .arg(count)
            .arg(shape)
    }

    fn clear_call() -> Call<i64, ()> {
        Call::new(&CLEAR, "clearing", |_, _: i64| Ok(()))
    }

    /// Sends a write, again while another process's sort freezes the list (see [`FrozenWait`]).
    fn write<R: redis::FromRedisValue, O>(&self, call: Call<R, O>) -> Result<O> {
        let mut wait = FrozenWait::new();
        loop {
            match self.container.send(&call) {
                Ok(reply) => return call.read(&self.container, reply),
                Err(e) => std::thread::sleep(wait.after(&self.container, e)?),
            }
        }
    }

    /// The async form of `write`: the pauses run on shoal's actor runtime.
    fn write_async<R, O>(
        &self,
        call: Result<Call<R, O>>,
    ) -> impl Future<Output = Result<O>> + Send + use<R, O, T>
    where
        R: redis::FromRedisValue + Send + 'static,
    {
        let container = self.container.clone();
        async move {
            let call = call?;
            let mut wait = FrozenWait::new();
            loop {
                match container.send_async(&call).await {
                    Ok(reply) => return call.read(&container, reply),
                    Err(e) => pause_async(wait.after(&container, e)?).await?,
                }
            }
        }
    }

    // The blocking forms.

    /// Item `index` (Python's `l[i]`; negative from the end); [`Error::IndexError`] outside.
    pub fn get(&self, index: isize) -> Result<T> {
        self.container.run(Self::get_call(index))
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
        self.container
            .run(Self::get_range_call(start.into(), stop.into()))
    }

    /// Sets item `index` (Python's `l[i] = x`); [`Error::IndexError`] outside the list.
    pub fn set(&self, index: isize, value: T) -> Result<()> {
        self.write(self.set_call(index, value)?)
    }

    /// Removes item `index` (Python's `del l[i]`); [`Error::IndexError`] outside the list.
    pub fn del(&self, index: isize) -> Result<()> {
        self.write(Self::del_call(index))
    }

    /// Removes and returns the last item (Python's `l.pop()`); [`Error::IndexError`] when the
    /// list is empty.
    ///
    /// The removal and the read are one script, and the item is decoded after it, here: an item
    /// that does not decode as `T` (a proxy of the wrong type) is removed all the same and lost,
    /// and the call is [`Error::Codec`]. (Checking first would cost a second round trip on every
    /// pop.)
    pub fn pop(&self) -> Result<T> {
        self.write(Self::pop_call(None))
    }

    /// Removes and returns item `index` (Python's `l.pop(i)`); [`Error::IndexError`] when the
    /// list is empty or `index` is outside it. As [`ListProxy::pop`], an item that does not
    /// decode as `T` is removed and lost, and the call is [`Error::Codec`].
    pub fn pop_at(&self, index: isize) -> Result<T> {
        self.write(Self::pop_call(Some(index)))
    }

    /// Appends `value` (Python's `l.append(x)`).
    pub fn append(&self, value: T) -> Result<()> {
        self.write(self.append_call(value)?)
    }

    /// Appends every item, atomically (Python's `l.extend(xs)`).
    pub fn extend(&self, values: impl IntoIterator<Item = T>) -> Result<()> {
        match self.extend_call(values)? {
            Some(call) => self.write(call),
            None => Ok(()),
        }
    }

    /// Inserts `value` before item `index` (Python's `l.insert(i, x)`: negative from the end;
    /// past the end appends, before the start prepends).
    pub fn insert(&self, index: isize, value: T) -> Result<()> {
        self.write(self.insert_call(index, value)?)
    }

    /// Removes the first item equal to `value` (Python's `l.remove(x)`); [`Error::InvalidState`]
    /// (Python's `ValueError`) when there is none.
    pub fn remove<Q>(&self, value: &Q) -> Result<()>
    where
        T: std::borrow::Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        self.write(self.remove_call(value)?)
    }

    /// The position of the first item equal to `value` (Python's `l.index(x)`);
    /// [`Error::InvalidState`] (Python's `ValueError`) when there is none.
    pub fn index<Q>(&self, value: &Q) -> Result<usize>
    where
        T: std::borrow::Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        self.container.run(self.index_call(value)?)
    }

    /// How many items equal `value` (Python's `l.count(x)`).
    pub fn count<Q>(&self, value: &Q) -> Result<usize>
    where
        T: std::borrow::Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        self.container.run(self.count_call(value)?)
    }

    /// Whether an item equals `value` (Python's `x in l`).
    pub fn contains<Q>(&self, value: &Q) -> Result<bool>
    where
        T: std::borrow::Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        self.container.run(self.contains_call(value)?)
    }

    /// Reverses the list in place, atomically (Python's `l.reverse()`).
    pub fn reverse(&self) -> Result<()> {
        self.write(Self::reverse_call())
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
        for _ in 0..SORT_ATTEMPTS {
            let token = uuid::Uuid::new_v4().simple().to_string();
            let mut freeze = SortFreeze::new(&self.container, &token, true);
            let (version, items) = self.write(Self::sort_begin_call(&token))?;
            let sorted = self.sorted(items, &mut compare)?;
            let written = self
                .container
                .run(Self::replace_call(&token, version, sorted));
            freeze.written(&written);
            if Self::sort_written(written)? {
                return Ok(());
            }
        }
        Err(self.sort_gave_up())
    }

    /// The number of items (Python's `len(l)`).
    pub fn len(&self) -> Result<usize> {
        self.container.run(Self::len_call())
    }

    /// Whether the list has no item.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Every item (Python's `l[:]`): a copy, read atomically.
    pub fn to_vec(&self) -> Result<Vec<T>> {
        self.container.run(Self::to_vec_call())
    }

    /// Removes every item (Python's `l.clear()`).
    pub fn clear(&self) -> Result<()> {
        self.write(Self::clear_call())
    }

    /// An iterator over the items, a page at a time (see the module docs for changes during
    /// iteration). One round trip now (it reads the shape to compare with), then one per page.
    pub fn iter(&self) -> Result<ListIter<T>> {
        let shape = self.container.run(Self::shape_call())?;
        Ok(ListIter {
            list: self.clone(),
            shape,
            next_index: 0,
            buffer: VecDeque::new(),
            done: false,
        })
    }

    fn page(&self, start: usize, count: usize, shape: &str) -> Result<ListPage> {
        self.container.run(Self::page_call(start, count, shape))
    }

    /// What an iterator reports when items were inserted, removed or moved since it was made.
    fn changed_size(&self) -> Error {
        Error::invalid_state(format!(
            "list changed size during iteration ({})",
            self.container.describe()
        ))
    }

    // The async forms (see the module docs).

    /// The async form of [`ListProxy::iter`]: awaiting it reads the shape to compare with (one
    /// round trip); the [`ListStream`] then reads a page per round trip. Items inserted,
    /// removed or moved meanwhile are reported once ([`Error::InvalidState`], "list changed
    /// size during iteration"), and the stream ends.
    ///
    /// ```no_run
    /// # async fn count(l: shoal::ListProxy<i64>) -> shoal::Result<usize> {
    /// let mut items = l.iter_async().await?;
    /// let mut n = 0;
    /// while let Some(item) = items.next().await {
    ///     item?;
    ///     n += 1;
    /// }
    /// # Ok(n)
    /// # }
    /// ```
    pub fn iter_async(&self) -> impl Future<Output = Result<ListStream<T>>> + Send + use<T>
    where
        T: Send + 'static,
    {
        let list = self.clone();
        let shape = self.container.run_async(Ok(Self::shape_call()));
        async move {
            let shape = shape.await?;
            let inner = stream::pages(0usize, move |start| {
                let page = list
                    .container
                    .run_async(Ok(Self::page_call(start, PAGE, &shape)));
                let list = list.clone();
                let shape = shape.clone();
                async move {
                    let page = page.await?;
                    if page.shape != shape {
                        return Err(list.changed_size());
                    }
                    let next = (page.items.len() >= PAGE).then_some(start + page.items.len());
                    Ok((decode_all(&list.container, page.items)?, next))
                }
            });
            Ok(ListStream { inner })
        }
    }

    /// The async form of [`ListProxy::get`]: the same round trip, sent from a task (see
    /// "Async forms" in the `manager` module docs); [`Error::IndexError`] outside the list.
    pub fn get_async(&self, index: isize) -> impl Future<Output = Result<T>> + Send + use<T> {
        self.container.run_async(Ok(Self::get_call(index)))
    }

    /// The async form of [`ListProxy::get_range`].
    pub fn get_range_async<S: Into<Option<isize>>, E: Into<Option<isize>>>(
        &self,
        start: S,
        stop: E,
    ) -> impl Future<Output = Result<Vec<T>>> + Send + use<T, S, E> {
        let call = Self::get_range_call(start.into(), stop.into());
        self.container.run_async(Ok(call))
    }

    /// The async form of [`ListProxy::set`]: [`Error::IndexError`] outside the list. Like every
    /// async write, it waits for another process's sort as the blocking form does, without
    /// blocking the caller's thread.
    pub fn set_async(
        &self,
        index: isize,
        value: T,
    ) -> impl Future<Output = Result<()>> + Send + use<T> {
        self.write_async(self.set_call(index, value))
    }

    /// The async form of [`ListProxy::del`]: [`Error::IndexError`] outside the list.
    pub fn del_async(&self, index: isize) -> impl Future<Output = Result<()>> + Send + use<T> {
        self.write_async(Ok(Self::del_call(index)))
    }

    /// The async form of [`ListProxy::pop`]: [`Error::IndexError`] when the list is empty; an
    /// item that does not decode as `T` is removed and lost ([`Error::Codec`]).
    pub fn pop_async(&self) -> impl Future<Output = Result<T>> + Send + use<T> {
        self.write_async(Ok(Self::pop_call(None)))
    }

    /// The async form of [`ListProxy::pop_at`]: an item that does not decode as `T` is removed
    /// and lost ([`Error::Codec`]).
    pub fn pop_at_async(&self, index: isize) -> impl Future<Output = Result<T>> + Send + use<T> {
        self.write_async(Ok(Self::pop_call(Some(index))))
    }

    /// The async form of [`ListProxy::append`].
    pub fn append_async(&self, value: T) -> impl Future<Output = Result<()>> + Send + use<T> {
        self.write_async(self.append_call(value))
    }

    /// The async form of [`ListProxy::extend`], as atomic. The items are encoded when it is
    /// called (the future does not hold them).
    pub fn extend_async<I: IntoIterator<Item = T>>(
        &self,
        values: I,
    ) -> impl Future<Output = Result<()>> + Send + use<T, I> {
        let extend = match self.extend_call(values) {
            Ok(Some(call)) => Some(self.write_async(Ok(call))),
            Ok(None) => None,
            Err(e) => Some(self.write_async(Err(e))),
        };
        async move {
            match extend {
                Some(extend) => extend.await,
                None => Ok(()),
            }
        }
    }

    /// The async form of [`ListProxy::insert`].
    pub fn insert_async(
        &self,
        index: isize,
        value: T,
    ) -> impl Future<Output = Result<()>> + Send + use<T> {
        self.write_async(self.insert_call(index, value))
    }

    /// The async form of [`ListProxy::remove`]: [`Error::InvalidState`] when no item equals
    /// `value`.
    pub fn remove_async<Q>(&self, value: &Q) -> impl Future<Output = Result<()>> + Send + use<T, Q>
    where
        T: std::borrow::Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        self.write_async(self.remove_call(value))
    }

    /// The async form of [`ListProxy::index`]: [`Error::InvalidState`] when no item equals
    /// `value`.
    pub fn index_async<Q>(
        &self,
        value: &Q,
    ) -> impl Future<Output = Result<usize>> + Send + use<T, Q>
    where
        T: std::borrow::Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        self.container.run_async(self.index_call(value))
    }

    /// The async form of [`ListProxy::count`].
    pub fn count_async<Q>(
        &self,
        value: &Q,
    ) -> impl Future<Output = Result<usize>> + Send + use<T, Q>
    where
        T: std::borrow::Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        self.container.run_async(self.count_call(value))
    }

    /// The async form of [`ListProxy::contains`].
    pub fn contains_async<Q>(
        &self,
        value: &Q,
    ) -> impl Future<Output = Result<bool>> + Send + use<T, Q>
    where
        T: std::borrow::Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        self.container.run_async(self.contains_call(value))
    }

    /// The async form of [`ListProxy::reverse`].
    pub fn reverse_async(&self) -> impl Future<Output = Result<()>> + Send + use<T> {
        self.write_async(Ok(Self::reverse_call()))
    }

    /// The async form of [`ListProxy::sort`]: the same two round trips per attempt, each sent
    /// from a task; the comparisons run in the caller's task, between them.
    pub fn sort_async(&self) -> impl Future<Output = Result<()>> + Send + use<T>
    where
        T: Ord,
    {
        self.sort_by_async(T::cmp)
    }

    /// The async form of [`ListProxy::sort_by`]: `compare` runs in the caller's task, between
    /// the two round trips. The read (which freezes the list) is sent from a task of shoal's
    /// actor runtime, wherever the future is awaited; dropping the future before the sort wrote
    /// lifts the freeze from there, so other processes' writes do not wait for it to lapse.
    pub fn sort_by_async<F>(
        &self,
        mut compare: F,
    ) -> impl Future<Output = Result<()>> + Send + use<T, F>
    where
        F: FnMut(&T, &T) -> std::cmp::Ordering + Send,
    {
        let list = self.clone();
        async move {
            for _ in 0..SORT_ATTEMPTS {
                let token = uuid::Uuid::new_v4().simple().to_string();
                let mut freeze = SortFreeze::new(&list.container, &token, false);
                let (version, items) = list.sort_begin_async(&token).await?;
                let sorted = list.sorted(items, &mut compare)?;
                let written = list
                    .container
                    .run_async(Ok(Self::replace_call(&token, version, sorted)))
                    .await;
                freeze.written(&written);
                if Self::sort_written(written)? {
                    return Ok(());
                }
            }
            Err(list.sort_gave_up())
        }
    }

    /// The async form of [`ListProxy::len`].
    pub fn len_async(&self) -> impl Future<Output = Result<usize>> + Send + use<T> {
        self.container.run_async(Ok(Self::len_call()))
    }

    /// The async form of [`ListProxy::is_empty`].
    pub fn is_empty_async(&self) -> impl Future<Output = Result<bool>> + Send + use<T> {
        let len = self.len_async();
        async move { Ok(len.await? == 0) }
    }

    /// The async form of [`ListProxy::to_vec`]: every item in one round trip, read atomically.
    pub fn to_vec_async(&self) -> impl Future<Output = Result<Vec<T>>> + Send + use<T> {
        self.container.run_async(Ok(Self::to_vec_call()))
    }

    /// The async form of [`ListProxy::clear`].
    pub fn clear_async(&self) -> impl Future<Output = Result<()>> + Send + use<T> {
        self.write_async(Ok(Self::clear_call()))
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
            return Err(self.list.changed_size());
        }
        if page.items.len() < PAGE {
            self.done = true;
        }
        self.next_index += page.items.len();
        self.buffer = decode_all(&self.list.container, page.items)?.into();
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
