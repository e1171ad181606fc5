//! `Semaphore` and `BoundedSemaphore`: a counter of permits shared by processes.
//!
//! # Semantics
//!
//! Python's: a semaphore is a counter. [`Semaphore::acquire`] takes a permit, waiting while none
//! is free; [`Semaphore::release`] gives back the permit this process holds or, when it holds
//! none, adds one (a semaphore used as a signal: `Semaphore(0)`, released by one process and
//! acquired by another), waking the first waiter. A release never takes a permit another process
//! holds. [`Semaphore::get_value`] is the number of free permits. A release that would raise a
//! [`BoundedSemaphore`]'s free permits above its initial value is [`Error::InvalidState`]
//! (Python's `ValueError`), whoever makes it; it still ends the caller's own hold.
//!
//! Permits are leased like locks (see `lock.rs`): the permits of a process that died without
//! exiting (killed, host lost) return after `sync.lease_secs`, and each hold has a fencing token.
//! A process that exits normally keeps the permits it took, as in Python (a consumed signal stays
//! consumed); another process may release them.
//!
//! Async forms (`acquire_async`, `acquire_timeout_async`, `try_acquire_async`, `lock_async`,
//! `release_async`, [`Semaphore::get_value_async`], [`BoundedSemaphore::get_value_async`]) and
//! what dropping them does: see `lock.rs`. Keys, scripts and round trips:
//! see the grant core (`grants.rs`).

use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_core::error::{Error, Result};

use crate::common::hold_methods;
use crate::grants::{GrantKind, GrantObject};

/// A counting semaphore.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Semaphore {
    object: GrantObject,
}

/// A semaphore that may never hold more permits than it started with.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BoundedSemaphore {
    object: GrantObject,
    bound: u64,
}

macro_rules! semaphore_methods {
    () => {
        hold_methods!("a permit");

        /// Gives back this process's permit, or adds one when it holds none.
        pub fn release(&self) -> Result<()> {
            self.object.release().map(|_| ())
        }

        /// The async form of `release` (1 round trip on shoal's actor runtime).
        pub fn release_async(&self) -> impl Future<Output = Result<()>> + Send + use<> {
            self.object.release_current_async()
        }

        /// Free permits now (the permits of dead holders whose lease lapsed count as free).
        pub fn get_value(&self) -> Result<i64> {
            self.object.value()
        }

        /// The async form of `get_value` (1 round trip on shoal's actor runtime).
        pub fn get_value_async(&self) -> impl Future<Output = Result<i64>> + Send + use<> {
            self.object.value_async()
        }

        fn object(&self) -> &GrantObject {
            &self.object
        }
    };
}

impl Semaphore {
    /// A semaphore with `value` permits (Python's default is 1). More than 2^53 − 1 is an
    /// [`Error::InvalidState`]: the count is kept exact.
    pub fn new(value: u64) -> Result<Semaphore> {
        Ok(Semaphore {
            object: GrantObject::create(GrantKind::Semaphore, value, None)?,
        })
    }

    semaphore_methods!();
}

impl BoundedSemaphore {
    /// A bounded semaphore with `value` permits, never more. More than 2^53 − 1 is an
    /// [`Error::InvalidState`]: the count is kept exact.
    pub fn new(value: u64) -> Result<BoundedSemaphore> {
        Ok(BoundedSemaphore {
            object: GrantObject::create(GrantKind::Bounded, value, Some(value))?,
            bound: value,
        })
    }

    semaphore_methods!();

    /// The initial (and largest) number of permits.
    pub fn bound(&self) -> u64 {
        self.bound
    }
}
