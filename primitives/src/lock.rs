//! `Lock` and `RLock`: mutual exclusion across processes, with leases and fencing tokens.
//!
//! # Semantics
//!
//! * `Lock`: Python's `multiprocessing.Lock`. [`Lock::acquire`] blocks until the lock is free;
//!   [`Lock::acquire_timeout`] and [`Lock::try_acquire`] return whether it was acquired.
//!   [`Lock::release`] frees it; as in Python, any process or thread may release a held lock.
//!   Releasing a lock that is not held is [`Error::InvalidState`]. [`Lock::lock`] returns a
//!   [`Guard`] that releases on drop (Python's `with lock:`). A thread that acquires a `Lock` it
//!   already holds waits for itself (a `Lock` is not reentrant). [`Lock::locked`] tells whether
//!   anyone holds it (Python 3.14's `locked()`).
//! * `RLock`: reentrant. The owning thread may acquire again (a recursion count); it must
//!   release as many times. Releasing from another thread or process, or once too many, is
//!   [`Error::InvalidState`]. [`RLock::locked`] tells whether any thread of any process holds it.
//!
//! A process that exits normally (its function returned, or failed with an error or a panic, or
//! the main process's `Runtime` shut down) keeps the holds it did not release, as in Python: a
//! child may acquire a `Lock` and exit, and the parent release it. An `RLock` left held by an
//! exited process stays held for good, as Python's: only its owner could release it.
//!
//! # What Python cannot do
//!
//! A hold is a lease (`sync.lease_secs`, 5 s by default) that the holder's process renews by
//! heartbeat. When the holder dies without exiting (killed, even by `SIGKILL`, or its host lost),
//! the lock is released once the lease lapses and a waiter proceeds; a Python lock held by a
//! killed process is held forever. Each hold has a fencing token ([`Guard::fencing_token`],
//! [`Lock::fencing_token`]): a number that only grows, so a resource guarded by the lock can
//! refuse a write from a holder that was presumed dead. That holder's `release()` fails with
//! [`Error::InvalidState`] ("lost").
//!
//! # Async forms
//!
//! `acquire_async`, `acquire_timeout_async`, `try_acquire_async`, `lock_async` (a [`Guard`]) and
//! `release_async` (also on `Semaphore`, `BoundedSemaphore`, and `Condition`'s lock), and
//! [`Lock::locked_async`], [`RLock::locked_async`] (and the semaphores' `get_value_async`) run
//! the same round trips as the blocking forms (the same state machine, `grants.rs`) as a task on
//! shoal's actor runtime, the wait on a dedicated connection of that runtime, and hand the result
//! back through a oneshot channel: any executor can await them and no thread is parked per call.
//! Timeouts run from the first poll.
//!
//! The owner of an `RLock` hold is the thread that takes it or, inside a Tokio task, the task
//! (which moves between threads at each `.await` on a multi-thread runtime); an async form's
//! owner is the task (or thread) that polls its future first. A [`Guard`] remembers its owner:
//! it releases that hold whichever thread drops it.
//!
//! Dropping an `acquire_async` (or `lock_async`) future never leaves the lock held: a caller
//! still queued leaves the waiters' queue before its next wait slice (within a second), in the
//! script that also hands over a grant that reached it meanwhile (Redis rule 3); and a grant
//! made for a future that is gone (granted in that last step, or just as the future was
//! dropped) is released at once by the task. Until then the lock may look held, and a waiter
//! behind the dropped one waits that much longer. A dropped `release_async` still releases if
//! it was sent (at most once); [`Guard::release_async`] sends its release when called, so its
//! future releases even if it is never polled.
//!
//! Keys, scripts and round trips: see the grant core (`grants.rs`).

use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_core::context;
use shoal_core::error::{Error, Result};

use crate::common::hold_methods;
use crate::grants::{self, GrantKind, GrantObject};

/// A lock shared by every process that has its handle.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Lock {
    object: GrantObject,
}

/// A reentrant lock: the thread that holds it may acquire it again.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RLock {
    object: GrantObject,
}

/// A hold released when dropped (Python's `with`). Dropping logs a failed release; call
/// [`Guard::release`] (or [`Guard::release_async`]) to see the error.
///
/// The guard remembers its hold (fencing token and owner), so it releases that hold whatever
/// thread or task drops it, and only that hold: after a [`Condition`](crate::Condition) wait
/// took the lock back, the hold the wait gave its caller; after a wait that failed or whose
/// future was dropped (the lock given up and not taken back), or once the hold was released
/// otherwise, nothing. A guard from an async form (`lock_async`) releases on shoal's actor
/// runtime when dropped, without blocking the thread that drops it; one from `lock` releases
/// on the dropping thread (one round trip). A release nobody waits for (a drop) that cannot
/// reach Redis is sent again a few times from the actor runtime; the hold is no longer renewed
/// from the moment it is released, so at worst its lease lapses. The process's exit waits for
/// the releases still under way (a lease at most). The owner of an `RLock` that takes it again
/// while the release of its last level is on its way waits for that release, as any other
/// caller would: the hold it let go of is not re-entered, so that a late or repeated release
/// cannot take a level off the new one. A re-entry already on its way when the guard of the
/// last level is dropped (by another task) adds its level to the hold if it reaches Redis
/// first, that release then taking off only the level let go of; otherwise it takes the lock
/// anew.
#[must_use = "the hold is released when the guard is dropped"]
#[derive(Debug)]
pub struct Guard<'a> {
    object: &'a GrantObject,
    token: u64,
    /// The grant the hold began with (see `GrantObject::hold_origin`): a `Condition` wait
    /// replaces the grant, and the registry tells which grant continues this hold.
    origin: u64,
    holder: String,
    released: bool,
    /// From an async form: a drop releases on the actor runtime.
    release_in_background: bool,
}

impl Guard<'_> {
    pub(crate) fn new(object: &GrantObject, token: u64, holder: String) -> Guard<'_> {
        Guard {
            object,
            token,
            origin: object.hold_origin(token),
            holder,
            released: false,
            release_in_background: false,
        }
    }

    pub(crate) fn new_async(object: &GrantObject, token: u64, holder: String) -> Guard<'_> {
        let mut guard = Guard::new(object, token, holder);
        guard.release_in_background = true;
        guard
    }

    /// The fencing token of this hold: larger than every earlier hold's.
    pub fn fencing_token(&self) -> u64 {
        self.token
    }

    /// Releases now, reporting an error (for instance a lapsed lease, or a hold that a
    /// `Condition` wait gave up and did not take back). A release that could not reach Redis is
    /// sent again a few times from the actor runtime; the hold is no longer renewed, so at
    /// worst its lease lapses.
    pub fn release(mut self) -> Result<()> {
        self.released = true;
        let (token, last) = self.retire()?;
        let released = self.object.release_retired(&self.holder, token, last);
        if let Err(e) = &released
            && last
            && e.is_store_unreachable()
        {
            // The caller learns of the failure; the release is sent again meanwhile.
            let holder = std::mem::take(&mut self.holder);
            self.object.release_in_background(holder, token, last, true);
        }
        released.map(|_| ())
    }

    /// Releases without blocking the caller's thread (1 round trip on shoal's actor runtime,
    /// sent again a few times while Redis cannot be reached), reporting an error (for instance
    /// a lapsed lease). The release is under way when this returns: dropping the future, even
    /// unpolled, does not keep the hold.
    pub fn release_async(mut self) -> impl Future<Output = Result<()>> + Send + use<> {
        self.released = true;
        let call = self.retire().and_then(|(token, last)| {
            let (object, holder) = (self.object.clone(), std::mem::take(&mut self.holder));
            // Started now rather than at the first poll: a future that is never polled (an
            // early `?`, a `select!`) still releases; and, its caller being free to drop it,
            // the process's exit waits for it as for a dropped guard's.
            let in_flight = grants::background_release();
            let context = context::current()?;
            Ok(context.spawn(move |store, caller| async move {
                let _in_flight = in_flight;
                let released = object
                    .send_retired(&store, &holder, token, last, false)
                    .await;
                if caller.is_gone() {
                    object.report_release(released, last);
                } else {
                    caller.finish(released);
                }
            }))
        });
        async move { call?.await.map(|_| ()) }
    }

    /// Takes one level of this guard's hold off the registry ahead of its release (see
    /// `GrantObject::retire_hold`): its grant and whether it was the last level.
    fn retire(&self) -> Result<(u64, bool)> {
        self.object.retire_hold(self.origin).ok_or_else(|| {
            Error::invalid_state(format!(
                "release of {}: this guard's hold (fencing token {}) is no longer held here: a \
                 Condition wait gave it up and did not take the lock back, or it was released",
                self.object.address.describe(),
                self.token
            ))
        })
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let Some((token, last)) = self.object.retire_hold(self.origin) else {
            // Never another's hold: a guard releases its own or nothing.
            tracing::debug!(
                "{}: the hold of a dropped guard (fencing token {}) is no longer held here; \
                 nothing to release",
                self.object.address.describe(),
                self.token
            );
            return;
        };
        let holder = std::mem::take(&mut self.holder);
        if self.release_in_background {
            self.object
                .release_in_background(holder, token, last, false);
            return;
        }
        match self.object.release_retired(&holder, token, last) {
            Ok(_) => {}
            // Sent again from the actor runtime, rather than blocking this thread.
            Err(e) if last && e.is_store_unreachable() => {
                tracing::debug!(
                    "releasing {}: {e}; trying again",
                    self.object.address.describe()
                );
                self.object.release_in_background(holder, token, last, true);
            }
            Err(e) => self.object.report_release(Err(e), last),
        }
    }
}

impl Lock {
    /// A new, unlocked lock.
    pub fn new() -> Result<Lock> {
        Ok(Lock {
            object: GrantObject::create(GrantKind::Lock, 1, Some(1))?,
        })
    }

    hold_methods!("the lock");

    /// Releases the lock (held by this process or, as Python allows, by another).
    pub fn release(&self) -> Result<()> {
        self.object.release().map(|_| ())
    }

    /// The async form of [`Lock::release`] (1 round trip on shoal's actor runtime).
    pub fn release_async(&self) -> impl Future<Output = Result<()>> + Send + use<> {
        self.object.release_current_async()
    }

    /// Whether the lock is held now, by any thread of any process (Python's `locked()`). A hold
    /// whose holder died and whose lease lapsed does not count.
    pub fn locked(&self) -> Result<bool> {
        Ok(self.object.value()? <= 0)
    }

    /// The async form of [`Lock::locked`] (one round trip on shoal's actor runtime).
    pub fn locked_async(&self) -> impl Future<Output = Result<bool>> + Send + use<> {
        let value = self.object.value_async();
        async move { Ok(value.await? <= 0) }
    }

    pub(crate) fn object(&self) -> &GrantObject {
        &self.object
    }
}

impl RLock {
    /// A new, unlocked reentrant lock.
    pub fn new() -> Result<RLock> {
        Ok(RLock {
            object: GrantObject::create(GrantKind::RLock, 1, Some(1))?,
        })
    }

    hold_methods!("the lock");

    /// Releases one level of this thread's hold.
    pub fn release(&self) -> Result<()> {
        self.object.release().map(|_| ())
    }

    /// The async form of [`RLock::release`]: releases one level of the hold of the task (or
    /// thread) that polls it (1 round trip on shoal's actor runtime).
    pub fn release_async(&self) -> impl Future<Output = Result<()>> + Send + use<> {
        self.object.release_current_async()
    }

    /// Whether the lock is held now, by this or any other thread or process (Python's
    /// `locked()`).
    pub fn locked(&self) -> Result<bool> {
        Ok(self.object.value()? <= 0)
    }

    /// The async form of [`RLock::locked`] (one round trip on shoal's actor runtime).
    pub fn locked_async(&self) -> impl Future<Output = Result<bool>> + Send + use<> {
        let value = self.object.value_async();
        async move { Ok(value.await? <= 0) }
    }

    pub(crate) fn object(&self) -> &GrantObject {
        &self.object
    }
}
