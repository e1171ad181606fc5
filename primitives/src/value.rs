//! `Value` and `Array`: typed shared memory, Python's `multiprocessing.Value` and `Array`.
//!
//! # Semantics
//!
//! A [`Value`] holds one C scalar ([`Scalar`]: the Python typecodes map to Rust types, see
//! `scalar.rs`); an [`Array`] holds a fixed number of them. `get` and `set` (`get(i)`, `set(i, v)`,
//! `to_vec`, `get_slice`, `set_slice`) are each atomic. As in Python, a `Value` or `Array` comes
//! with a lock by default ([`Value::get_lock`]) for compound operations such as
//! `v.set(v.get()? + 1)`; [`Value::new_raw`] and [`Array::new_raw`] have none (Python's `lock=False`,
//! `RawValue`, `RawArray`), and `get_lock` on them is [`Error::InvalidState`]. Unlike Python's
//! synchronized wrapper, `get` and `set` do not take the lock (each is one atomic Redis command
//! already), so they cost one round trip, not three.
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
//! Every operation: 1 (`GETEX`, `SET ... XX`, `HMGET`, or a script), refreshing the TTL.

use std::marker::PhantomData;
use std::ops::Range;
use std::sync::LazyLock;

use serde::{Deserialize, Serialize};
use shoal_core::error::{Error, Result};

use crate::common::{self, Address, ttl};
use crate::lock::Lock;
pub use crate::scalar::{Integer, Scalar};

static ADD: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("value_add.lua")));
static ARRAY_SET: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("array_set.lua")));

/// One shared scalar.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub struct Value<T> {
    address: Address,
    lock: Option<Lock>,
    #[serde(skip)]
    _type: PhantomData<fn() -> T>,
}

/// A fixed-size shared array of scalars.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub struct Array<T> {
    address: Address,
    len: usize,
    lock: Option<Lock>,
    #[serde(skip)]
    _type: PhantomData<fn() -> T>,
}

macro_rules! handle {
    ($name:ident, $($field:ident),*) => {
        impl<T> Clone for $name<T> {
            fn clone(&self) -> Self {
                $name { $($field: self.$field.clone(),)* _type: PhantomData }
            }
        }
        impl<T> std::fmt::Debug for $name<T> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($name)).field("at", &self.address.describe()).finish()
            }
        }
        impl<T> PartialEq for $name<T> {
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

fn lock_of(lock: &Option<Lock>) -> Result<&Lock> {
    lock.as_ref()
        .ok_or_else(|| Error::invalid_state("this value was created without a lock (lock=False)"))
}

impl<T: Scalar> Value<T> {
    /// A shared value with a lock.
    pub fn new(value: T) -> Result<Self> {
        Self::create(value, true)
    }

    /// A shared value without a lock (Python's `RawValue`, `Value(..., lock=False)`).
    pub fn new_raw(value: T) -> Result<Self> {
        Self::create(value, false)
    }

    fn create(value: T, with_lock: bool) -> Result<Self> {
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
            lock: if with_lock { Some(Lock::new()?) } else { None },
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
        let text: Option<String> = store
            .with_conn(
                || format!("reading {}", self.address.describe()),
                |c| {
                    redis::cmd("GETEX")
                        .arg(&key)
                        .arg("EX")
                        .arg(ttl(&store))
                        .query(c)
                },
            )
            .map_err(|e| self.address.error(e))?;
        parse(&text.ok_or_else(|| self.address.gone())?, &key)
    }

    /// Sets the value (Python's `.value = v`).
    pub fn set(&self, value: T) -> Result<()> {
        let store = common::store()?;
        let set: Option<String> = store
            .with_conn(
                || format!("writing {}", self.address.describe()),
                |c| {
                    redis::cmd("SET")
                        .arg(self.key())
                        .arg(value.to_stored())
                        .arg("XX")
                        .arg("EX")
                        .arg(ttl(&store))
                        .query(c)
                },
            )
            .map_err(|e| self.address.error(e))?;
        set.map(|_| ()).ok_or_else(|| self.address.gone())
    }

    /// The lock that comes with the value.
    pub fn get_lock(&self) -> Result<&Lock> {
        lock_of(&self.lock)
    }

    /// Python's typecode of `T`.
    pub fn typecode(&self) -> char {
        T::TYPECODE
    }
}

impl<T: Integer> Value<T> {
    /// Adds `delta` atomically and returns the value before (an extension: no lock needed).
    /// A sum outside `T`'s range is [`Error::InvalidState`] and changes nothing.
    pub fn fetch_add(&self, delta: i64) -> Result<T> {
        let new = add(&self.address, &self.key(), "", delta, T::LOW, T::HIGH)?;
        new.checked_sub(delta)
            .and_then(T::from_i64)
            .ok_or_else(|| Error::invalid_state("the previous value is outside the type"))
    }
}

macro_rules! float_add {
    ($t:ty) => {
        impl Value<$t> {
            /// Adds `delta` atomically (`INCRBYFLOAT`) and returns the value before.
            pub fn fetch_add(&self, delta: $t) -> Result<$t> {
                let store = common::store()?;
                let key = self.key();
                let (exists, new): (bool, Option<String>) = store
                    .with_conn(
                        || format!("adding to {}", self.address.describe()),
                        |c| {
                            redis::pipe()
                                .exists(&key)
                                .cmd("INCRBYFLOAT")
                                .arg(&key)
                                .arg(delta.to_stored())
                                .query(c)
                        },
                    )
                    .map_err(|e| self.address.error(e))?;
                if !exists {
                    // INCRBYFLOAT created it: take it back.
                    let _ = store.with_conn(
                        || "undoing".into(),
                        |c| redis::cmd("DEL").arg(&key).query::<()>(c),
                    );
                    return Err(self.address.gone());
                }
                let new: $t = parse(&new.unwrap_or_default(), &key)?;
                Ok(new - delta)
            }
        }
    };
}
float_add!(f32);
float_add!(f64);

fn add(
    address: &Address,
    key: &str,
    index: &str,
    delta: i64,
    low: i128,
    high: i128,
) -> Result<i64> {
    let store = common::store()?;
    let result: std::result::Result<i64, Error> = store.with_conn(
        || format!("adding to {}", address.describe()),
        |c| {
            ADD.key(key)
                .arg(ttl(&store))
                .arg(delta)
                .arg(low.max(i64::MIN as i128) as i64)
                .arg(high.min(i64::MAX as i128) as i64)
                .arg(index)
                .invoke(c)
        },
    );
    match result {
        Err(Error::Redis { source, .. }) if source.code() == Some("OVERFLOW") => {
            Err(Error::invalid_state(format!(
                "adding {delta} to {} leaves its type's range",
                address.describe()
            )))
        }
        other => other.map_err(|e| address.error(e)),
    }
}

impl<T: Scalar> Array<T> {
    /// A shared array holding `values`, with a lock.
    pub fn new(values: Vec<T>) -> Result<Self> {
        Self::create(values, true)
    }

    /// A shared array of `len` zeros, with a lock (Python's `Array('i', 5)`).
    pub fn zeroed(len: usize) -> Result<Self> {
        Self::create(vec![T::ZERO; len], true)
    }

    /// A shared array without a lock (Python's `RawArray`, `Array(..., lock=False)`).
    pub fn new_raw(values: Vec<T>) -> Result<Self> {
        Self::create(values, false)
    }

    fn create(values: Vec<T>, with_lock: bool) -> Result<Self> {
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
            lock: if with_lock { Some(Lock::new()?) } else { None },
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
        let store = common::store()?;
        let key = self.key();
        let fields: Vec<String> = range.clone().map(|i| i.to_string()).collect();
        if fields.is_empty() {
            return Ok(Vec::new());
        }
        let (texts, exists): (Vec<Option<String>>, bool) = store
            .with_conn(
                || format!("reading {}", self.address.describe()),
                |c| {
                    redis::pipe()
                        .cmd("HMGET")
                        .arg(&key)
                        .arg(&fields)
                        .expire(&key, ttl(&store) as i64)
                        .query(c)
                },
            )
            .map_err(|e| self.address.error(e))?;
        if !exists {
            return Err(self.address.gone());
        }
        texts
            .into_iter()
            .map(|text| parse(&text.ok_or_else(|| self.address.gone())?, &key))
            .collect()
    }

    /// Every element (Python's `arr[:]`).
    pub fn to_vec(&self) -> Result<Vec<T>> {
        self.get_slice(0..self.len)
    }

    /// Sets element `index`.
    pub fn set(&self, index: usize, value: T) -> Result<()> {
        self.set_slice(index, &[value])
    }

    /// Sets the elements from `start` on to `values` (Python's `arr[a:b] = values`).
    pub fn set_slice(&self, start: usize, values: &[T]) -> Result<()> {
        self.check(&self.span(start, values.len())?)?;
        if values.is_empty() {
            return Ok(());
        }
        let store = common::store()?;
        store
            .with_conn(
                || format!("writing {}", self.address.describe()),
                |c| {
                    let mut invocation = ARRAY_SET.key(self.key());
                    invocation.arg(ttl(&store));
                    for (i, v) in values.iter().enumerate() {
                        invocation.arg(start + i).arg(v.to_stored());
                    }
                    invocation.invoke::<u64>(c)
                },
            )
            .map(|_| ())
            .map_err(|e| self.address.error(e))
    }

    /// The lock that comes with the array.
    pub fn get_lock(&self) -> Result<&Lock> {
        lock_of(&self.lock)
    }

    /// Python's typecode of `T`.
    pub fn typecode(&self) -> char {
        T::TYPECODE
    }
}

impl<T: Integer> Array<T> {
    /// Adds `delta` to element `index` atomically; returns the element before (an extension).
    pub fn fetch_add(&self, index: usize, delta: i64) -> Result<T> {
        self.check(&self.span(index, 1)?)?;
        let new = add(
            &self.address,
            &self.key(),
            &index.to_string(),
            delta,
            T::LOW,
            T::HIGH,
        )?;
        new.checked_sub(delta)
            .and_then(T::from_i64)
            .ok_or_else(|| Error::invalid_state("the previous value is outside the type"))
    }
}
