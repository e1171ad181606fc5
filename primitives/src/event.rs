//! `Event`: a flag processes wait for, Python's `multiprocessing.Event`.
//!
//! # Semantics
//!
//! The flag starts false. [`Event::set`] makes it true and wakes every waiter;
//! [`Event::clear`] makes it false; [`Event::is_set`] reads it; [`Event::wait`] returns at once
//! when it is true, otherwise blocks until it is set or the timeout passes, and returns the flag
//! (true when set, false after a timeout).
//!
//! # Keys (hash tag `{<ns>:event:<id>}`)
//!
//! `state` (hash: `flag` `0`/`1`), `waiters` (list), `waiting` (hash: waiter → liveness
//! deadline), `wake:<waiter>` (list).
//!
//! # Round trips
//!
//! `set`, `clear`, `is_set`: 1. `wait` when set: 1. `wait` that blocks: 1 to queue, then a
//! `BLPOP` that returns at the `set` (plus one check-in per second of waiting, and 1 to leave the
//! queue after a timeout).

use std::sync::LazyLock;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_core::error::Result;
use shoal_core::store::Store;

use crate::common::{self, Address, blpop, deadline, next_slice, now_ms, ttl};

static BEGIN: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("event_begin.lua")));
static SET: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("event_set.lua")));
pub(crate) static CHECK_IN: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("waiters.lua")));
pub(crate) static WAKE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("waiters_wake.lua")));

/// A flag shared by processes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Event {
    address: Address,
}

struct Keys {
    state: String,
    waiters: String,
    waiting: String,
    wake_prefix: String,
}

impl Event {
    /// A new event, not set.
    pub fn new() -> Result<Event> {
        let (context, address) = Address::create("event")?;
        let event = Event { address };
        let keys = event.keys();
        let store = context.store();
        store
            .with_conn(
                || format!("creating {}", event.address.describe()),
                |c| {
                    redis::pipe()
                        .hset(&keys.state, "flag", 0)
                        .ignore()
                        .expire(&keys.state, ttl(store) as i64)
                        .ignore()
                        .query::<()>(c)
                },
            )
            .map_err(|e| event.address.error(e))?;
        Ok(event)
    }

    fn keys(&self) -> Keys {
        let keys = self.address.keys();
        Keys {
            state: keys.key("state"),
            waiters: keys.key("waiters"),
            waiting: keys.key("waiting"),
            wake_prefix: keys.key("wake:"),
        }
    }

    /// Sets the flag and wakes every waiter.
    pub fn set(&self) -> Result<()> {
        self.write_flag("1")
    }

    /// Clears the flag.
    pub fn clear(&self) -> Result<()> {
        self.write_flag("0")
    }

    fn write_flag(&self, flag: &str) -> Result<()> {
        let store = common::store()?;
        let keys = self.keys();
        store
            .with_conn(
                || format!("setting {}", self.address.describe()),
                |c| {
                    SET.key(&keys.state)
                        .key(&keys.waiters)
                        .key(&keys.waiting)
                        .arg(ttl(&store))
                        .arg(&keys.wake_prefix)
                        .arg(flag)
                        .invoke::<u64>(c)
                },
            )
            .map(|_| ())
            .map_err(|e| self.address.error(e))
    }

    /// Whether the flag is set.
    pub fn is_set(&self) -> Result<bool> {
        let store = common::store()?;
        let keys = self.keys();
        let flag: Option<String> = store
            .with_conn(
                || format!("reading {}", self.address.describe()),
                |c| redis::cmd("HGET").arg(&keys.state).arg("flag").query(c),
            )
            .map_err(|e| self.address.error(e))?;
        match flag.as_deref() {
            Some("1") => Ok(true),
            Some("0") => Ok(false),
            None => Err(self.address.gone()),
            Some(other) => Err(shoal_core::Error::Codec {
                key: keys.state,
                expected: "event flag".into(),
                reason: format!("{other:?} is not 0 or 1"),
            }),
        }
    }

    /// Waits until the flag is set, at most `timeout`; returns the flag.
    pub fn wait(&self, timeout: Option<Duration>) -> Result<bool> {
        let store = common::store()?;
        let keys = self.keys();
        let waiter = common::waiter_id();
        let set: u64 = store
            .with_conn(
                || format!("waiting for {}", self.address.describe()),
                |c| {
                    BEGIN
                        .key(&keys.state)
                        .key(&keys.waiters)
                        .key(&keys.waiting)
                        .arg(now_ms())
                        .arg(ttl(&store))
                        .arg(&waiter)
                        .arg(liveness())
                        .invoke(c)
                },
            )
            .map_err(|e| self.address.error(e))?;
        if set == 1 {
            return Ok(true);
        }
        let deadline = deadline(timeout);
        let wake = format!("{}{waiter}", keys.wake_prefix);
        loop {
            let Some(block) = next_slice(deadline) else {
                return check_in(
                    &store,
                    &self.address,
                    &keys.waiters,
                    &keys.waiting,
                    &keys.wake_prefix,
                    &waiter,
                    "cancel",
                );
            };
            if blpop(&store, &wake, block)
                .map_err(|e| self.address.error(e))?
                .is_some()
            {
                return Ok(true);
            }
            if check_in(
                &store,
                &self.address,
                &keys.waiters,
                &keys.waiting,
                &keys.wake_prefix,
                &waiter,
                "refresh",
            )? {
                return Ok(true);
            }
            // A set() that found this waiter dropped (a stalled slice) woke nobody: read the
            // flag. A deleted event is reported here too.
            if self.is_set()? {
                return Ok(true);
            }
        }
    }
}

/// How long a queued waiter counts as alive without checking in.
pub(crate) fn liveness() -> u64 {
    now_ms() + 3 * common::SLICE.as_millis() as u64
}

/// Runs `waiters.lua`; true when a wake-up reached the waiter.
pub(crate) fn check_in(
    store: &Store,
    address: &Address,
    waiters: &str,
    waiting: &str,
    wake_prefix: &str,
    waiter: &str,
    mode: &str,
) -> Result<bool> {
    let woken: u64 = store
        .with_conn(
            || format!("waiting for {}", address.describe()),
            |c| {
                CHECK_IN
                    .key(waiters)
                    .key(waiting)
                    .arg(now_ms())
                    .arg(ttl(store))
                    .arg(wake_prefix)
                    .arg(waiter)
                    .arg(mode)
                    .arg(liveness())
                    .invoke(c)
            },
        )
        .map_err(|e| address.error(e))?;
    Ok(woken == 1)
}
