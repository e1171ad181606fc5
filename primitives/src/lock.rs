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
//! Keys, scripts and round trips: see the grant core (`grants.rs`).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_core::error::{Error, Result};

use crate::common::hold_methods;
use crate::grants::{GrantKind, GrantObject};

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
/// [`Guard::release`] to see the error.
#[must_use = "the hold is released when the guard is dropped"]
#[derive(Debug)]
pub struct Guard<'a> {
    object: &'a GrantObject,
    token: u64,
    released: bool,
}

impl Guard<'_> {
    pub(crate) fn new(object: &GrantObject, token: u64) -> Guard<'_> {
        Guard {
            object,
            token,
            released: false,
        }
    }

    /// The fencing token of this hold: larger than every earlier hold's.
    pub fn fencing_token(&self) -> u64 {
        self.token
    }

    /// Releases now, reporting an error (for instance a lapsed lease).
    pub fn release(mut self) -> Result<()> {
        self.released = true;
        self.object.release().map(|_| ())
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        if !self.released
            && let Err(e) = self.object.release()
        {
            tracing::error!("releasing {}: {e}", self.object.address.describe());
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

    /// Whether the lock is held now, by any thread of any process (Python's `locked()`). A hold
    /// whose holder died and whose lease lapsed does not count.
    pub fn locked(&self) -> Result<bool> {
        Ok(self.object.value()? <= 0)
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

    /// Whether the lock is held now, by this or any other thread or process (Python's
    /// `locked()`).
    pub fn locked(&self) -> Result<bool> {
        Ok(self.object.value()? <= 0)
    }

    pub(crate) fn object(&self) -> &GrantObject {
        &self.object
    }
}
