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
//! [`Lock::locked_async`], [`RLock::locked_async`] (and the semaphores' `get_value_async`) run the
//! same round trips as the blocking forms (the same state machine, `grants.rs`) as a task on shoal's
//! actor runtime, the wait on a dedicated connection of that runtime, and hand the result back
//! through a oneshot channel: any executor can await them and no thread is parked per call.
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
//! it was sent (at most once).
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
/// thread or task drops it. A guard from an async form (`lock_async`) releases on shoal's actor
/// runtime when dropped, without blocking the thread that drops it; one from `lock` releases on
/// the dropping thread (one round trip).
#[must_use = "the hold is released when the guard is dropped"]
#[derive(Debug)]
pub struct Guard<'a> {
    object: &'a GrantObject,
    token: u64,
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
            holder,
            released: false,
            release_in_background: false,
        }
    }

    pub(crate) fn new_async(object: &GrantObject, token: u64, holder: String) -> Guard<'_> {
        Guard {
            object,
            token,
            holder,
            released: false,
            release_in_background: true,
        }
    }

    /// The fencing token of this hold: larger than every earlier hold's.
    pub fn fencing_token(&self) -> u64 {
        self.token
    }

    /// Releases now, reporting an error (for instance a lapsed lease).
    pub fn release(mut self) -> Result<()> {
        self.released = true;
        let mine = self.object.token_of(&self.holder);
        self.object.release_as(&self.holder, mine).map(|_| ())
    }

    /// Releases now without blocking the caller's thread (1 round trip on shoal's actor
    /// runtime), reporting an error (for instance a lapsed lease).
    pub fn release_async(mut self) -> impl Future<Output = Result<()>> + Send + use<> {
        self.released = true;
        let mine = self.object.token_of(&self.holder);
        let releasing = self
            .object
            .release_async(std::mem::take(&mut self.holder), mine);
        async move { releasing.await.map(|_| ()) }
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        // The hold as it is now (a `Condition.wait` replaces it with a new one).
        let mine = self.object.token_of(&self.holder);
        if !self.release_in_background {
            if let Err(e) = self.object.release_as(&self.holder, mine) {
                tracing::error!("releasing {}: {e}", self.object.address.describe());
            }
            return;
        }
        if self.object.kind != GrantKind::RLock {
            // The drop ends this one-level hold: later calls in this process must not take its
            // token for theirs while the release is under way (should it fail, the hold, no
            // longer renewed, lapses after the lease).
            grants::forget(&self.object.keys().state, mine);
        }
        match context::current().and_then(|c| c.async_store()) {
            Ok(store) => {
                let (object, holder, token) =
                    (self.object.clone(), std::mem::take(&mut self.holder), mine);
                let runtime = store.runtime().clone();
                drop(runtime.spawn(async move {
                    object.release_detached(&store, holder, token).await;
                }));
            }
            Err(e) => tracing::error!("releasing {}: {e}", self.object.address.describe()),
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
