//! What encoding a value leaves behind in Redis until the value is decoded: its *transfers*.
//!
//! A handle that holds something open on its owner's behalf (a pipe end) registers a transfer
//! when it is serialized: a hold, under a fresh id, that keeps the thing open until whoever
//! deserializes the value claims it (see `shoal_primitives::pipe`). A value that is never
//! decoded (a child that died first, an actor's state that a later commit replaced) would keep
//! its transfers for as long as the process that encoded it lives. [`collect_transfers`]
//! gathers the transfers registered while a value is encoded, so that whoever knows the value
//! will not be decoded gives them back ([`SentTransfers::release`]).
//!
//! This module is the collection alone, in the core so that every crate that encodes values
//! (the executor's actor hosts, the runtime's process starts) can use it; the handles that
//! register transfers implement [`Transfer`].
//!
//! ```
//! use shoal_core::transfers::collect_transfers;
//!
//! // A value without such handles registers nothing.
//! let (encoded, sent) = collect_transfers(|| rmp_serde::to_vec(&(1u8, "two")));
//! assert!(encoded.is_ok());
//! assert!(sent.is_empty());
//! ```

use std::cell::RefCell;

use crate::error::Result;

/// A hold registered while a value was encoded, that the value's receiver claims when it
/// decodes it.
pub trait Transfer: Send + std::fmt::Debug {
    /// Lets go of the hold, as a holder that closed: called once the value will not be decoded
    /// (any more). A hold its receiver claimed is no longer there, and letting go of it changes
    /// nothing.
    fn give_back(self: Box<Self>) -> Result<()>;
}

thread_local! {
    /// The transfers registered on this thread while [`collect_transfers`] runs.
    static COLLECTING: RefCell<Option<Vec<Box<dyn Transfer>>>> = const { RefCell::new(None) };
}

/// Notes a transfer just registered, for the [`collect_transfers`] running on this thread (if
/// none runs, nobody gives it back: it lasts as long as the process that registered it).
///
/// ```
/// use shoal_core::transfers::{Transfer, collect_transfers, note};
///
/// /// A hold that needs nothing to let go of (a real one runs a script).
/// #[derive(Debug)]
/// struct Held(&'static str);
///
/// impl Transfer for Held {
///     fn give_back(self: Box<Self>) -> shoal_core::Result<()> {
///         Ok(())
///     }
/// }
///
/// let ((), sent) = collect_transfers(|| note(Box::new(Held("t:1"))));
/// assert!(!sent.is_empty());
/// sent.release().expect("given back");
/// ```
pub fn note(transfer: Box<dyn Transfer>) {
    COLLECTING.with(|c| {
        if let Some(sent) = c.borrow_mut().as_mut() {
            sent.push(transfer);
        }
    });
}

/// Runs `encode`, and returns with its result the transfers it registered (see the module
/// docs). Collections nest: an enclosing one does not see what an inner one collected.
///
/// ```
/// use shoal_core::transfers::collect_transfers;
///
/// let (encoded, sent) = collect_transfers(|| rmp_serde::to_vec(&[1u32, 2, 3]));
/// let encoded = encoded.expect("encoded");
/// // ... the value is sent; if it will never be decoded (its receiver is gone):
/// sent.release().expect("given back");
/// # assert!(!encoded.is_empty());
/// ```
pub fn collect_transfers<T>(encode: impl FnOnce() -> T) -> (T, SentTransfers) {
    /// The enclosing collection, put back however `encode` ends (a panicking serializer too).
    struct Restore(Option<Vec<Box<dyn Transfer>>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            COLLECTING.with(|c| *c.borrow_mut() = self.0.take());
        }
    }
    let restore = Restore(COLLECTING.with(|c| c.borrow_mut().replace(Vec::new())));
    let result = encode();
    let sent = COLLECTING.with(|c| c.borrow_mut().take());
    drop(restore);
    (result, SentTransfers(sent.unwrap_or_default()))
}

/// The transfers registered while one value was encoded (see [`collect_transfers`]).
#[derive(Debug, Default)]
pub struct SentTransfers(Vec<Box<dyn Transfer>>);

impl SentTransfers {
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Gives back every transfer (see [`Transfer::give_back`]), once the value will not be
    /// decoded: each one lets go of its hold, so that what it kept open closes once its real
    /// holders let go too, rather than when this process exits. Every one is tried; the first
    /// error is returned.
    pub fn release(self) -> Result<()> {
        let mut first_error = None;
        for transfer in self.0 {
            if let Err(e) = transfer.give_back() {
                tracing::debug!("{e}");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Debug)]
    struct Recorded(&'static str, Arc<Mutex<Vec<&'static str>>>);

    impl Transfer for Recorded {
        fn give_back(self: Box<Self>) -> Result<()> {
            self.1.lock().expect("record").push(self.0);
            if self.0 == "fails" {
                return Err(crate::Error::invalid_state("refused"));
            }
            Ok(())
        }
    }

    #[test]
    fn a_collection_gets_what_its_encoding_noted_and_gives_every_one_back() {
        let given = Arc::new(Mutex::new(Vec::new()));
        // Noted outside a collection: nobody collects it.
        note(Box::new(Recorded("lost", given.clone())));
        let ((), outer) = collect_transfers(|| {
            note(Box::new(Recorded("outer", given.clone())));
            let ((), inner) =
                collect_transfers(|| note(Box::new(Recorded("fails", given.clone()))));
            note(Box::new(Recorded("after", given.clone())));
            assert!(inner.release().is_err(), "the first error is returned");
        });
        assert!(!outer.is_empty());
        outer.release().expect("released");
        assert_eq!(
            *given.lock().expect("record"),
            vec!["fails", "outer", "after"]
        );
        let panicked =
            std::panic::catch_unwind(|| collect_transfers(|| -> u8 { panic!("a serializer") }));
        assert!(panicked.is_err());
        let ((), after) = collect_transfers(|| ());
        assert!(after.is_empty(), "a panic leaves no collection behind");
    }
}
