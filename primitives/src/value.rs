//! `Value` and `Array`: typed shared memory, Python's `multiprocessing.Value` and `Array`.
//!
//! # Semantics
//!
//! A [`Value`] holds one C scalar ([`Scalar`]: the Python typecodes map to Rust types, see
//! `scalar.rs`); an [`Array`] holds a fixed number of them. `get` and `set` (`get(i)`, `set(i, v)`,
//! `to_vec`, `get_slice`, `set_slice`) are each atomic. As in Python, a `Value` or `Array` comes
//! with a lock ([`Value::get_lock`]) for compound operations such as `v.set(v.get()? + 1)`:
//!
//! * [`Value::new`], [`Array::new`], [`Array::zeroed`]: a new [`Lock`] (Python's default
//!   `lock=True` makes an `RLock`; shoal's default is a `Lock`, which any process may release:
//!   pass an `RLock` to `with_lock` for Python's reentrant one).
//! * [`Value::with_lock`], [`Array::with_lock`]: the given [`Lock`] or [`RLock`] (Python's
//!   `lock=lock`), for instance one lock shared by several values. The lock's type is the second
//!   type parameter: `Value<i32>` has a `Lock`, `Value<i32, RLock>` an `RLock`.
//! * [`Value::new_raw`], [`Array::new_raw`]: no lock (Python's `lock=False`, `RawValue`,
//!   `RawArray`); `get_lock` on them is [`Error::InvalidState`] (Python has no `get_lock` there).
//!
//! [`Value::get_obj`] and [`Array::get_obj`] return the same shared object without its lock
//! (Python's `get_obj()` of a synchronized wrapper), a handle of the lock-less form. Unlike
//! Python's synchronized wrapper, `get` and `set` do not take the lock (each is one atomic Redis
//! command already), so they cost one round trip, not three.
//!
//! Extension: [`Value::fetch_add`] and [`Array::fetch_add`] add to an integer atomically on the
//! server, without the lock, and fail with [`Error::InvalidState`] (changing nothing) when the sum
//! leaves the type's range (Python's `c_int` would wrap silently); `f32`/`f64` values have a
//! float `fetch_add`.
//!
//! An index outside an array is [`Error::InvalidState`] (Python's `IndexError`); a value whose
//! key was deleted is [`Error::InvalidState`], one that holds garbage is [`Error::Codec`].
//!
//! # Keys
//!
//! `shoal:{<ns>:value:<id>}:value` (a string), `shoal:{<ns>:array:<id>}:items` (a hash of index
//! → element); the lock's keys as in `lock.rs`.
//!
//! # Round trips
//!
//! Every operation: 1 (`GETEX`, `SET ... XX`, `HMGET`, or a script), refreshing the TTL; a
//! float `fetch_add` on a deleted value: 2 (the add created it, a `DEL` takes it back).
//!
//! # Async forms
//!
//! [`Value::get_async`], [`Value::set_async`], [`Value::fetch_add_async`], [`Array::get_async`],
//! [`Array::set_async`], [`Array::get_slice_async`], [`Array::set_slice_async`],
//! [`Array::to_vec_async`] and [`Array::fetch_add_async`] send the same single command (or
//! script) from shoal's actor runtime, on its shared multiplexed connection, and hand the reply
//! back through a oneshot channel: any executor can await them, and no thread is parked. A write
//! whose future is dropped happens or not, depending on whether it was sent already, never
//! twice. A float `fetch_add_async` runs the same two steps as `fetch_add` (the add, and the
//! `DEL` of a value the add created because it had been deleted).

use std::future::Future;
use std::marker::PhantomData;
use std::ops::Range;
use std::sync::LazyLock;

use serde::{Deserialize, Serialize};
use shoal_core::error::{Error, Result};
use shoal_core::store::Store;

use crate::common::{self, Address, ttl};
use crate::lock::{Lock, RLock};
use crate::op::{self, Request};
pub use crate::scalar::{Integer, Scalar};

mod sealed {
    pub trait Sealed {}
}

/// A lock a [`Value`] or [`Array`] may come with: [`Lock`] or [`RLock`].
pub trait ValueLock:
    Clone + std::fmt::Debug + Serialize + serde::de::DeserializeOwned + sealed::Sealed
{
}

impl sealed::Sealed for Lock {}
impl ValueLock for Lock {}
impl sealed::Sealed for RLock {}
impl ValueLock for RLock {}

static ADD: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("value_add.lua")));
static ARRAY_SET: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("array_set.lua")));

/// One shared scalar, with a lock of type `L` ([`Lock`] unless chosen with
/// [`Value::with_lock`]).
#[derive(Serialize, Deserialize)]
#[serde(bound(serialize = "L: Serialize", deserialize = "L: Deserialize<'de>"))]
pub struct Value<T, L = Lock> {
    address: Address,
    lock: Option<L>,
    #[serde(skip)]
    _type: PhantomData<fn() -> T>,
}

/// A fixed-size shared array of scalars, with a lock of type `L` ([`Lock`] unless chosen with
/// [`Array::with_lock`]).
#[derive(Serialize, Deserialize)]
#[serde(bound(serialize = "L: Serialize", deserialize = "L: Deserialize<'de>"))]
pub struct Array<T, L = Lock> {
    address: Address,
    len: usize,
    lock: Option<L>,
    #[serde(skip)]
    _type: PhantomData<fn() -> T>,
}

macro_rules! handle {
    ($name:ident, $($field:ident),*) => {
        impl<T, L: Clone> Clone for $name<T, L> {
            fn clone(&self) -> Self {
                $name { $($field: self.$field.clone(),)* _type: PhantomData }
            }
        }
        impl<T, L> std::fmt::Debug for $name<T, L> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($name))
                    .field("at", &self.address.describe())
                    .field("lock", &self.lock.is_some())
                    .finish()
            }
        }
        /// The same shared object (with or without its lock).
        impl<T, L> PartialEq for $name<T, L> {
            fn eq(&self, other: &Self) -> bool {
                self.address == other.address
            }
        }
    };
}
handle!(Value, address, lock);
handle!(Array, address, len, lock);

fn parse<T: Scalar>(text: &str, key: &str) -> Result<T> {
    T::from_stored(text).ok_or_else(|| Error::Codec {
        key: key.to_string(),
        expected: std::any::type_name::<T>().to_string(),
        reason: format!("{text:?} is not a {}", std::any::type_name::<T>()),
    })
}

/// `GETEX` with the TTL: the stored value.
fn value_get_request(store: &Store, key: &str) -> Request {
    let mut cmd = redis::cmd("GETEX");
    cmd.arg(key).arg("EX").arg(ttl(store));
    Request::cmd("reading", cmd)
}

fn value_from<T: Scalar>(address: &Address, key: &str, reply: Result<redis::Value>) -> Result<T> {
    let text: Option<String> = op::parse(reply, "a value").map_err(|e| address.error(e))?;
    parse(&text.ok_or_else(|| address.gone())?, key)
}

/// `SET ... XX` with the TTL: only a value that exists.
fn value_set_request<T: Scalar>(store: &Store, key: &str, value: T) -> Request {
    let mut cmd = redis::cmd("SET");
    cmd.arg(key)
        .arg(value.to_stored())
        .arg("XX")
        .arg("EX")
        .arg(ttl(store));
    Request::cmd("writing", cmd)
}

fn value_set(address: &Address, reply: Result<redis::Value>) -> Result<()> {
    let set: Option<String> = op::parse(reply, "a write").map_err(|e| address.error(e))?;
    set.map(|_| ()).ok_or_else(|| address.gone())
}

/// `HMGET` of the elements of `range` and the TTL refreshed, in one pipeline.
fn slice_get_request(store: &Store, key: &str, range: Range<usize>) -> Request {
    let fields: Vec<String> = range.map(|i| i.to_string()).collect();
    let mut pipe = redis::pipe();
    pipe.cmd("HMGET")
        .arg(key)
        .arg(&fields)
        .expire(key, ttl(store) as i64);
    Request::pipe("reading", pipe)
}

fn slice_from<T: Scalar>(
    address: &Address,
    key: &str,
    reply: Result<redis::Value>,
) -> Result<Vec<T>> {
    let (texts, exists): (Vec<Option<String>>, bool) =
        op::parse(reply, "array elements").map_err(|e| address.error(e))?;
    if !exists {
        return Err(address.gone());
    }
    texts
        .into_iter()
        .map(|text| parse(&text.ok_or_else(|| address.gone())?, key))
        .collect()
}

/// `array_set.lua`: elements from `start` on.
fn slice_set_request<T: Scalar>(store: &Store, key: &str, start: usize, values: &[T]) -> Request {
    let mut invocation = ARRAY_SET.key(key);
    invocation.arg(ttl(store));
    for (i, v) in values.iter().enumerate() {
        invocation.arg(start + i).arg(v.to_stored());
    }
    Request::script("writing", invocation)
}

fn lock_of<L>(lock: &Option<L>) -> Result<&L> {
    lock.as_ref().ok_or_else(|| {
        Error::invalid_state(
            "this value has no lock (created with lock=False, or the raw object of get_obj())",
        )
    })
}

impl<T: Scalar> Value<T> {
    /// A shared value with a new [`Lock`].
    pub fn new(value: T) -> Result<Self> {
        Self::create(value, Some(Lock::new()?))
    }

    /// A shared value without a lock (Python's `RawValue`, `Value(..., lock=False)`).
    pub fn new_raw(value: T) -> Result<Self> {
        Self::create(value, None)
    }
}

impl<T: Scalar, L: ValueLock> Value<T, L> {
    /// A shared value whose lock is `lock`, a [`Lock`] or an [`RLock`] (Python's
    /// `Value(typecode, value, lock=lock)`); [`Value::get_lock`] returns it.
    pub fn with_lock(value: T, lock: L) -> Result<Self> {
        Self::create(value, Some(lock))
    }
}

impl<T: Scalar, L> Value<T, L> {
    fn create(value: T, lock: Option<L>) -> Result<Self> {
        let (context, address) = Address::create("value")?;
        let key = address.keys().key("value");
        let store = context.store();
        store
            .with_conn(
                || format!("creating {}", address.describe()),
                |c| {
                    redis::cmd("SET")
                        .arg(&key)
                        .arg(value.to_stored())
                        .arg("EX")
                        .arg(ttl(store))
                        .query::<()>(c)
                },
            )
            .map_err(|e| address.error(e))?;
        Ok(Value {
            lock,
            address,
            _type: PhantomData,
        })
    }

    fn key(&self) -> String {
        self.address.keys().key("value")
    }

    /// The value (Python's `.value`).
    pub fn get(&self) -> Result<T> {
        let store = common::store()?;
        let key = self.key();
        op::run_single(
            &store,
            || self.address.describe(),
            value_get_request(&store, &key),
            |reply| value_from(&self.address, &key, reply),
        )
    }

    /// The async form of [`Value::get`]: one round trip on shoal's actor runtime (its shared
    /// multiplexed connection); any executor can await it.
    pub fn get_async(&self) -> impl Future<Output = Result<T>> + Send + use<T, L> {
        let address = self.address.clone();
        async move {
            let store = common::store()?;
            let key = address.keys().key("value");
            let request = value_get_request(&store, &key);
            let describe = {
                let address = address.clone();
                move || address.describe()
            };
            op::spawn_single(describe, request, move |reply| {
                value_from(&address, &key, reply)
            })
            .await
        }
    }

    /// Sets the value (Python's `.value = v`).
    pub fn set(&self, value: T) -> Result<()> {
        let store = common::store()?;
        op::run_single(
            &store,
            || self.address.describe(),
            value_set_request(&store, &self.key(), value),
            |reply| value_set(&self.address, reply),
        )
    }

    /// The async form of [`Value::set`]: one round trip on shoal's actor runtime. A set whose
    /// future is dropped still happens if it was under way (at most once).
    pub fn set_async(&self, value: T) -> impl Future<Output = Result<()>> + Send + use<T, L> {
        let address = self.address.clone();
        async move {
            let store = common::store()?;
            let request = value_set_request(&store, &address.keys().key("value"), value);
            let describe = {
                let address = address.clone();
                move || address.describe()
            };
            op::spawn_single(describe, request, move |reply| value_set(&address, reply)).await
        }
    }

    /// The lock that comes with the value; [`Error::InvalidState`] for a value without one.
    pub fn get_lock(&self) -> Result<&L> {
        lock_of(&self.lock)
    }

    /// The same shared value without the lock (Python's `get_obj()`): its `get_lock` is an
    /// error. No round trip.
    pub fn get_obj(&self) -> Value<T, L> {
        Value {
            address: self.address.clone(),
            lock: None,
            _type: PhantomData,
        }
    }

    /// Python's typecode of `T`.
    pub fn typecode(&self) -> char {
        T::TYPECODE
    }
}

impl<T: Integer, L> Value<T, L> {
    /// Adds `delta` atomically and returns the value before (an extension: no lock needed).
    /// A sum outside `T`'s range is [`Error::InvalidState`] and changes nothing.
    pub fn fetch_add(&self, delta: i64) -> Result<T> {
        add::<T>(&self.address, &self.key(), "", delta)
    }

    /// The async form of [`Value::fetch_add`]: the same script, one round trip on shoal's actor
    /// runtime. An add whose future is dropped still happens if it was under way (at most once).
    pub fn fetch_add_async(
        &self,
        delta: i64,
    ) -> impl Future<Output = Result<T>> + Send + use<T, L> {
        add_async::<T>(self.address.clone(), self.key(), String::new(), delta)
    }
}

macro_rules! float_add {
    ($t:ty) => {
        impl<L> Value<$t, L> {
            /// Adds `delta` atomically (`INCRBYFLOAT`) and returns the value before.
            pub fn fetch_add(&self, delta: $t) -> Result<$t> {
                let store = common::store()?;
                op::run(
                    &store,
                    &mut FloatAdd::new(self.address.clone(), self.key(), delta),
                )
            }

            /// The async form of [`Value::fetch_add`] for a float: the same round trips (one,
            /// or two when the value was deleted) on shoal's actor runtime. An add whose future
            /// is dropped still happens if it was under way (at most once).
            pub fn fetch_add_async(
                &self,
                delta: $t,
            ) -> impl Future<Output = Result<$t>> + Send + use<L> {
                let add = FloatAdd::new(self.address.clone(), self.key(), delta);
                async move { op::spawn(add, None).await }
            }
        }
    };
}
float_add!(f32);
float_add!(f64);

/// A float `fetch_add`: `EXISTS`, `INCRBYFLOAT` and `EXPIRE` in one pipeline; when the value did
/// not exist (`INCRBYFLOAT` created it), a `DEL` takes it back and the value is gone.
struct FloatAdd<T> {
    address: Address,
    key: String,
    delta: T,
    /// Set once the `DEL` of a value the add created was sent.
    undoing: bool,
}

impl<T: Scalar + std::ops::Sub<Output = T>> FloatAdd<T> {
    fn new(address: Address, key: String, delta: T) -> Self {
        FloatAdd {
            address,
            key,
            delta,
            undoing: false,
        }
    }
}

impl<T: Scalar + std::ops::Sub<Output = T>> op::Operation for FloatAdd<T> {
    type Output = T;

    fn describe(&self) -> String {
        self.address.describe()
    }

    fn start(&mut self, store: &Store) -> op::Step<T> {
        let mut pipe = redis::pipe();
        pipe.exists(&self.key)
            .cmd("INCRBYFLOAT")
            .arg(&self.key)
            .arg(self.delta.to_stored())
            // INCRBYFLOAT keeps the TTL: an add is a use, as a set is.
            .expire(&self.key, ttl(store) as i64)
            .ignore();
        op::Step::Next(Request::pipe("adding to", pipe))
    }

    fn reply(&mut self, _: &Store, reply: Result<redis::Value>) -> op::Step<T> {
        if self.undoing {
            // The undo's own outcome changes nothing for the caller: the value is gone.
            if let Err(e) = reply {
                tracing::debug!("undoing an add to {}: {e}", self.address.describe());
            }
            return op::Step::Done(Err(self.address.gone()));
        }
        let parsed: Result<(bool, Option<String>)> =
            op::parse(reply, "a float add").map_err(|e| self.address.error(e));
        match parsed {
            Err(e) => op::Step::Done(Err(e)),
            Ok((false, _)) => {
                // INCRBYFLOAT created it: take it back.
                self.undoing = true;
                let mut cmd = redis::cmd("DEL");
                cmd.arg(&self.key);
                op::Step::Next(Request::cmd("undoing an add to", cmd))
            }
            Ok((true, new)) => op::Step::Done(
                parse::<T>(&new.unwrap_or_default(), &self.key).map(|new| new - self.delta),
            ),
        }
    }
}

/// `value_add.lua`: adds `delta` to the integer at `key` (element `index` of an array, `""` for
/// a value) within `T`'s range.
fn add_request<T: Integer>(store: &Store, key: &str, index: &str, delta: i64) -> Request {
    let mut invocation = ADD.key(key);
    invocation
        .arg(ttl(store))
        .arg(delta)
        .arg(T::LOW.max(i64::MIN as i128) as i64)
        .arg(T::HIGH.min(i64::MAX as i128) as i64)
        .arg(index);
    Request::script("adding to", invocation)
}

/// Reads the reply to [`add_request`]: the value before the add.
fn added<T: Integer>(address: &Address, delta: i64, reply: Result<redis::Value>) -> Result<T> {
    let old = match op::parse::<i64>(reply, "a sum") {
        Err(Error::Redis { source, .. }) if source.code() == Some("OVERFLOW") => {
            return Err(Error::invalid_state(format!(
                "adding {delta} to {} leaves its type's range",
                address.describe()
            )));
        }
        other => other.map_err(|e| address.error(e))?,
    };
    T::from_i64(old).ok_or_else(|| Error::invalid_state("the previous value is outside the type"))
}

fn add<T: Integer>(address: &Address, key: &str, index: &str, delta: i64) -> Result<T> {
    let store = common::store()?;
    op::run_single(
        &store,
        || address.describe(),
        add_request::<T>(&store, key, index, delta),
        |reply| added(address, delta, reply),
    )
}

/// The async form of [`add`].
async fn add_async<T: Integer>(
    address: Address,
    key: String,
    index: String,
    delta: i64,
) -> Result<T> {
    let store = common::store()?;
    let request = add_request::<T>(&store, &key, &index, delta);
    let describe = {
        let address = address.clone();
        move || address.describe()
    };
    op::spawn_single(describe, request, move |reply| {
        added(&address, delta, reply)
    })
    .await
}

impl<T: Scalar> Array<T> {
    /// A shared array holding `values`, with a new [`Lock`].
    pub fn new(values: Vec<T>) -> Result<Self> {
        Self::create(values, Some(Lock::new()?))
    }

    /// A shared array of `len` zeros, with a new [`Lock`] (Python's `Array('i', 5)`).
    pub fn zeroed(len: usize) -> Result<Self> {
        Self::create(vec![T::ZERO; len], Some(Lock::new()?))
    }

    /// A shared array without a lock (Python's `RawArray`, `Array(..., lock=False)`).
    pub fn new_raw(values: Vec<T>) -> Result<Self> {
        Self::create(values, None)
    }
}

impl<T: Scalar, L: ValueLock> Array<T, L> {
    /// A shared array holding `values` whose lock is `lock`, a [`Lock`] or an [`RLock`]
    /// (Python's `Array(typecode, values, lock=lock)`); [`Array::get_lock`] returns it.
    pub fn with_lock(values: Vec<T>, lock: L) -> Result<Self> {
        Self::create(values, Some(lock))
    }
}

impl<T: Scalar, L> Array<T, L> {
    fn create(values: Vec<T>, lock: Option<L>) -> Result<Self> {
        let (context, address) = Address::create("array")?;
        let key = address.keys().key("items");
        let store = context.store();
        let mut pipe = redis::pipe();
        // The `len` field exists even for an empty array, so that the key exists.
        pipe.hset(&key, "len", values.len()).ignore();
        for chunk in values.chunks(1024).enumerate() {
            let (n, chunk) = chunk;
            let fields: Vec<(String, String)> = chunk
                .iter()
                .enumerate()
                .map(|(i, v)| ((n * 1024 + i).to_string(), v.to_stored()))
                .collect();
            pipe.hset_multiple(&key, &fields).ignore();
        }
        pipe.expire(&key, ttl(store) as i64).ignore();
        store
            .with_conn(
                || format!("creating {}", address.describe()),
                |c| pipe.query::<()>(c),
            )
            .map_err(|e| address.error(e))?;
        Ok(Array {
            len: values.len(),
            lock,
            address,
            _type: PhantomData,
        })
    }

    fn key(&self) -> String {
        self.address.keys().key("items")
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the array has no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `start..start + len`, or [`Error::InvalidState`] when it overflows.
    fn span(&self, start: usize, len: usize) -> Result<Range<usize>> {
        start.checked_add(len).map(|end| start..end).ok_or_else(|| {
            Error::invalid_state(format!(
                "index {start} out of range for an array of {}",
                self.len
            ))
        })
    }

    fn check(&self, range: &Range<usize>) -> Result<()> {
        if range.start > range.end || range.end > self.len {
            return Err(Error::invalid_state(format!(
                "index {range:?} out of range for an array of {}",
                self.len
            )));
        }
        Ok(())
    }

    /// Element `index`.
    pub fn get(&self, index: usize) -> Result<T> {
        let values = self.get_slice(self.span(index, 1)?)?;
        values
            .into_iter()
            .next()
            .ok_or_else(|| Error::invalid_state(format!("index {index} out of range")))
    }

    /// Elements `range` (Python's `arr[a:b]`).
    pub fn get_slice(&self, range: Range<usize>) -> Result<Vec<T>> {
        self.check(&range)?;
        if range.is_empty() {
            return Ok(Vec::new());
        }
        let store = common::store()?;
        let key = self.key();
        op::run_single(
            &store,
            || self.address.describe(),
            slice_get_request(&store, &key, range),
            |reply| slice_from(&self.address, &key, reply),
        )
    }

    /// The async form of [`Array::get`] (one round trip on shoal's actor runtime).
    pub fn get_async(&self, index: usize) -> impl Future<Output = Result<T>> + Send + use<T, L> {
        let range = self.span(index, 1);
        let slice = self.get_slice_async_with(range);
        async move {
            slice
                .await?
                .into_iter()
                .next()
                .ok_or_else(|| Error::invalid_state(format!("index {index} out of range")))
        }
    }

    /// The async form of [`Array::get_slice`] (one round trip on shoal's actor runtime).
    pub fn get_slice_async(
        &self,
        range: Range<usize>,
    ) -> impl Future<Output = Result<Vec<T>>> + Send + use<T, L> {
        self.get_slice_async_with(Ok(range))
    }

    fn get_slice_async_with(
        &self,
        range: Result<Range<usize>>,
    ) -> impl Future<Output = Result<Vec<T>>> + Send + use<T, L> {
        let range = range.and_then(|range| self.check(&range).map(|()| range));
        let address = self.address.clone();
        async move {
            let range = range?;
            if range.is_empty() {
                return Ok(Vec::new());
            }
            let store = common::store()?;
            let key = address.keys().key("items");
            let request = slice_get_request(&store, &key, range);
            let describe = {
                let address = address.clone();
                move || address.describe()
            };
            op::spawn_single(describe, request, move |reply| {
                slice_from(&address, &key, reply)
            })
            .await
        }
    }

    /// Every element (Python's `arr[:]`).
    pub fn to_vec(&self) -> Result<Vec<T>> {
        self.get_slice(0..self.len)
    }

    /// The async form of [`Array::to_vec`] (one round trip on shoal's actor runtime).
    pub fn to_vec_async(&self) -> impl Future<Output = Result<Vec<T>>> + Send + use<T, L> {
        self.get_slice_async(0..self.len)
    }

    /// Sets element `index`.
    pub fn set(&self, index: usize, value: T) -> Result<()> {
        self.set_slice(index, &[value])
    }

    /// The async form of [`Array::set`] (one round trip on shoal's actor runtime; a set whose
    /// future is dropped still happens if it was under way, at most once).
    pub fn set_async(
        &self,
        index: usize,
        value: T,
    ) -> impl Future<Output = Result<()>> + Send + use<T, L> {
        self.set_slice_async(index, &[value])
    }

    /// Sets the elements from `start` on to `values` (Python's `arr[a:b] = values`).
    pub fn set_slice(&self, start: usize, values: &[T]) -> Result<()> {
        self.check(&self.span(start, values.len())?)?;
        if values.is_empty() {
            return Ok(());
        }
        let store = common::store()?;
        op::run_single(
            &store,
            || self.address.describe(),
            slice_set_request(&store, &self.key(), start, values),
            |reply| {
                op::parse::<u64>(reply, "a write")
                    .map(|_| ())
                    .map_err(|e| self.address.error(e))
            },
        )
    }

    /// The async form of [`Array::set_slice`] (see [`Array::set_async`]).
    pub fn set_slice_async(
        &self,
        start: usize,
        values: &[T],
    ) -> impl Future<Output = Result<()>> + Send + use<T, L> {
        let checked = self
            .span(start, values.len())
            .and_then(|range| self.check(&range));
        let values = values.to_vec();
        let address = self.address.clone();
        async move {
            checked?;
            if values.is_empty() {
                return Ok(());
            }
            let store = common::store()?;
            let request = slice_set_request(&store, &address.keys().key("items"), start, &values);
            let describe = {
                let address = address.clone();
                move || address.describe()
            };
            op::spawn_single(describe, request, move |reply| {
                op::parse::<u64>(reply, "a write")
                    .map(|_| ())
                    .map_err(|e| address.error(e))
            })
            .await
        }
    }

    /// The lock that comes with the array; [`Error::InvalidState`] for an array without one.
    pub fn get_lock(&self) -> Result<&L> {
        lock_of(&self.lock)
    }

    /// The same shared array without the lock (Python's `get_obj()`): its `get_lock` is an
    /// error. No round trip.
    pub fn get_obj(&self) -> Array<T, L> {
        Array {
            address: self.address.clone(),
            len: self.len,
            lock: None,
            _type: PhantomData,
        }
    }

    /// Python's typecode of `T`.
    pub fn typecode(&self) -> char {
        T::TYPECODE
    }
}

impl<T: Integer, L> Array<T, L> {
    /// Adds `delta` to element `index` atomically; returns the element before (an extension).
    pub fn fetch_add(&self, index: usize, delta: i64) -> Result<T> {
        self.check(&self.span(index, 1)?)?;
        add::<T>(&self.address, &self.key(), &index.to_string(), delta)
    }

    /// The async form of [`Array::fetch_add`]: the same script, one round trip on shoal's
    /// actor runtime. An add whose future is dropped still happens if it was under way (at most
    /// once).
    pub fn fetch_add_async(
        &self,
        index: usize,
        delta: i64,
    ) -> impl Future<Output = Result<T>> + Send + use<T, L> {
        let checked = self.span(index, 1).and_then(|range| self.check(&range));
        let adding = add_async::<T>(self.address.clone(), self.key(), index.to_string(), delta);
        async move {
            checked?;
            adding.await
        }
    }
}
