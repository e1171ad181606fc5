//! `Condition`: wait until notified, Python's `multiprocessing.Condition`.
//!
//! # Semantics
//!
//! A condition has a lock: its own `RLock` ([`Condition::new`]`(None)`), or a given `Lock`
//! ([`Condition::new`]`(Some(lock))`) or `RLock` ([`Condition::with_rlock`]). `acquire`,
//! `release` and `lock` act on it. [`Condition::wait`] must be called with the lock held
//! ([`Error::InvalidState`] otherwise, Python's `RuntimeError`): it releases the lock, waits until
//! notified or the timeout passes, takes the lock back (restoring an `RLock`'s recursion level)
//! and returns whether it was notified. [`Condition::notify`]`(n)` wakes up to `n` waiters in the
//! order they started waiting, [`Condition::notify_all`] all of them; both need the lock held.
//! [`Condition::wait_for`] waits until a predicate (evaluated with the lock held) is true.
//!
//! No lost wake-ups: queueing the waiter and releasing the lock are one script, so a notify that
//! follows the release always finds the waiter queued.
//!
//! # Keys
//!
//! Under the lock's hash tag (so one script touches both): `cond:<id>:waiters` (list),
//! `cond:<id>:waiting` (hash: waiter → liveness deadline), `cond:<id>:wake:<waiter>`; the lock's
//! own keys as in `grants.rs`.
//!
//! # Round trips
//!
//! `wait`: 1 (queue and release) + a `BLPOP` that returns at the notify (plus one check-in per
//! second) + the lock's acquire (1 when free). `notify`/`notify_all`: 1.

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shoal_core::error::{Error, Result};

use crate::common::{self, blpop, deadline, hold_methods, next_slice};
use crate::event::{check_in, liveness};
use crate::grants::{self, GrantObject};
use crate::lock::{Lock, RLock};

fn script(body: &str) -> redis::Script {
    redis::Script::new(&format!("{}\n{}", include_str!("grants_prelude.lua"), body))
}

static WAIT: LazyLock<redis::Script> = LazyLock::new(|| script(include_str!("condition_wait.lua")));
static NOTIFY: LazyLock<redis::Script> =
    LazyLock::new(|| script(include_str!("condition_notify.lua")));

/// The lock of a condition.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
enum ConditionLock {
    Lock(Lock),
    RLock(RLock),
}

/// A condition variable shared by processes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Condition {
    lock: ConditionLock,
    id: String,
}

struct Keys {
    waiters: String,
    waiting: String,
    wake_prefix: String,
}

impl Condition {
    /// A condition with `lock`, or with a new `RLock` of its own when `None` (Python's default).
    pub fn new(lock: Option<Lock>) -> Result<Condition> {
        let lock = match lock {
            Some(lock) => ConditionLock::Lock(lock),
            None => ConditionLock::RLock(RLock::new()?),
        };
        Ok(Condition {
            lock,
            id: uuid::Uuid::new_v4().simple().to_string(),
        })
    }

    /// A condition whose lock is `lock`.
    pub fn with_rlock(lock: RLock) -> Result<Condition> {
        Ok(Condition {
            lock: ConditionLock::RLock(lock),
            id: uuid::Uuid::new_v4().simple().to_string(),
        })
    }

    fn object(&self) -> &GrantObject {
        match &self.lock {
            ConditionLock::Lock(lock) => lock.object(),
            ConditionLock::RLock(lock) => lock.object(),
        }
    }

    fn keys(&self) -> Keys {
        let keys = self.object().address.keys();
        Keys {
            waiters: keys.key(&format!("cond:{}:waiters", self.id)),
            waiting: keys.key(&format!("cond:{}:waiting", self.id)),
            wake_prefix: keys.key(&format!("cond:{}:wake:", self.id)),
        }
    }

    hold_methods!("the lock");

    /// Releases the lock.
    pub fn release(&self) -> Result<()> {
        self.object().release().map(|_| ())
    }

    fn held_token(&self, what: &str) -> Result<u64> {
        self.object()
            .token()
            .ok_or_else(|| Error::invalid_state(format!("cannot {what} on an un-acquired lock")))
    }

    /// Releases the lock, waits until notified or `timeout` passes, takes the lock back;
    /// returns whether it was notified.
    pub fn wait(&self, timeout: Option<Duration>) -> Result<bool> {
        let token = self.held_token("wait")?;
        let store = common::store()?;
        let object = self.object();
        let lock_keys = object.keys();
        let keys = self.keys();
        let waiter = common::waiter_id();
        let holder = grants::holder(object.kind);
        let count: u64 = store
            .with_conn(
                || format!("waiting on a condition of {}", object.address.describe()),
                |c| {
                    let mut invocation = lock_keys.invocation(&WAIT, &store, grants::lease());
                    invocation
                        .key(&keys.waiters)
                        .key(&keys.waiting)
                        .arg(&holder)
                        .arg(token)
                        .arg(&waiter)
                        .arg(liveness());
                    invocation.invoke(c)
                },
            )
            .map_err(|e| grants::map_hold_error(object, e))?;
        grants::forget(&lock_keys.state, Some(token));

        let deadline = deadline(timeout);
        let wake = format!("{}{waiter}", keys.wake_prefix);
        let address = &object.address;
        let notified = loop {
            let Some(block) = next_slice(deadline) else {
                break check_in(
                    &store,
                    address,
                    &keys.waiters,
                    &keys.waiting,
                    &keys.wake_prefix,
                    &waiter,
                    "cancel",
                )?;
            };
            if blpop(&store, &wake, block)
                .map_err(|e| address.error(e))?
                .is_some()
            {
                break true;
            }
            if check_in(
                &store,
                address,
                &keys.waiters,
                &keys.waiting,
                &keys.wake_prefix,
                &waiter,
                "refresh",
            )? {
                break true;
            }
        };
        for _ in 0..count.max(1) {
            object.acquire(Some(None))?;
        }
        Ok(notified)
    }

    /// Waits until `predicate()` is true (it is evaluated with the lock held), at most
    /// `timeout`; returns the predicate's last value.
    pub fn wait_for(
        &self,
        mut predicate: impl FnMut() -> bool,
        timeout: Option<Duration>,
    ) -> Result<bool> {
        let end = deadline(timeout);
        let mut result = predicate();
        while !result {
            let left = match end {
                Some(end) => {
                    let left = end.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    Some(left)
                }
                None => None,
            };
            self.wait(left)?;
            result = predicate();
        }
        Ok(result)
    }

    /// Wakes up to `n` waiters.
    pub fn notify(&self, n: usize) -> Result<()> {
        self.wake(n as i64)
    }

    /// Wakes every waiter.
    pub fn notify_all(&self) -> Result<()> {
        self.wake(-1)
    }

    fn wake(&self, n: i64) -> Result<()> {
        let token = self.held_token("notify")?;
        let store = common::store()?;
        let object = self.object();
        let lock_keys = object.keys();
        let keys = self.keys();
        store
            .with_conn(
                || format!("notifying a condition of {}", object.address.describe()),
                |c| {
                    let mut invocation = lock_keys.invocation(&NOTIFY, &store, grants::lease());
                    invocation
                        .key(&keys.waiters)
                        .key(&keys.waiting)
                        .arg(grants::holder(object.kind))
                        .arg(token)
                        .arg(n)
                        .arg(&keys.wake_prefix);
                    invocation.invoke::<u64>(c)
                },
            )
            .map(|_| ())
            .map_err(|e| grants::map_hold_error(object, e))
    }
}
