//! This process's holds of pipe ends: which ends it holds and through how many handles, the
//! transfers it sent, claiming and letting go of an end in Redis, and the heartbeat that renews
//! them (see *Handles, holders and end of file* in the module docs of `pipe`).

use super::*;

/// This process's handles of one end, and the transfers of it that it sent.
#[derive(Default)]
pub(super) struct LocalEnd {
    /// Open handles in this process.
    pub(super) handles: usize,
    /// This process is a holder of the end in Redis.
    pub(super) registered: bool,
    /// Transfers this process registered and nobody claimed yet (renewed by its heartbeat).
    pub(super) transfers: Vec<String>,
}

type EndId = (Address, u8);

static LOCAL: LazyLock<Mutex<HashMap<EndId, Arc<Mutex<LocalEnd>>>>> =
    LazyLock::new(Default::default);

pub(super) fn lock(end: &Mutex<LocalEnd>) -> MutexGuard<'_, LocalEnd> {
    end.lock().unwrap_or_else(|p| p.into_inner())
}

/// This process's record of an end. Its lock is held across the scripts that change the
/// process's hold, so that a claim and a release of one end never interleave.
pub(super) fn local_end(address: &Address, end: u8) -> Arc<Mutex<LocalEnd>> {
    LOCAL
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry((address.clone(), end))
        .or_default()
        .clone()
}

/// A new open handle of the end in this process: claims `transfer` and makes sure the process
/// holds the end. False when every holder already let the end go.
pub(super) fn acquire(
    store: &Store,
    address: &Address,
    end: u8,
    transfer: Option<&str>,
) -> Result<bool> {
    let local = local_end(address, end);
    let mut local = lock(&local);
    if local.registered && transfer.is_none() {
        local.handles += 1;
        return Ok(true);
    }
    let held = claim(store, address, end, transfer)?;
    if held {
        local.registered = true;
        local.handles += 1;
        drop(local);
        start_heartbeat();
    }
    Ok(held)
}

fn claim(store: &Store, address: &Address, end: u8, transfer: Option<&str>) -> Result<bool> {
    let keys = PipeKeys::new(address);
    let held: u64 = store
        .with_conn(
            || format!("taking a handle of {}", address.describe()),
            |c| {
                keys.invocation(&CLAIM, store)
                    .arg(end)
                    .arg(transfer.unwrap_or(""))
                    .arg(process_holder())
                    .invoke(c)
            },
        )
        .map_err(|e| address.error(e))?;
    Ok(held == 1)
}

/// One handle of the end in this process closed: the process lets go of the end with its last.
pub(super) fn release(address: &Address, end: u8) -> Result<()> {
    let local = local_end(address, end);
    let mut local = lock(&local);
    local.handles = local.handles.saturating_sub(1);
    if local.handles > 0 || !local.registered {
        return Ok(());
    }
    // Not renewed any more, whatever the outcome: a hold that could not be removed lapses.
    local.registered = false;
    let store = common::store()?;
    let_go(&store, address, end, process_holder())
}

/// [`release`] when it needs neither a round trip nor a wait: this process's lock of the end is
/// free (a claim or a transfer holds it across a round trip) and this is not the process's last
/// handle of the end (or the process does not hold it). Whether it was done; nothing changed
/// otherwise.
pub(super) fn release_at_once(address: &Address, end: u8) -> bool {
    let local = local_end(address, end);
    let mut local = match local.try_lock() {
        Ok(local) => local,
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => return false,
    };
    let handles = local.handles.saturating_sub(1);
    if handles > 0 || !local.registered {
        local.handles = handles;
        return true;
    }
    false
}

pub(super) fn let_go(store: &Store, address: &Address, end: u8, holder: &str) -> Result<()> {
    let keys = PipeKeys::new(address);
    store
        .with_conn(
            || format!("closing a handle of {}", address.describe()),
            |c| {
                keys.invocation(&CLOSE, store)
                    .arg(end)
                    .arg(holder)
                    .invoke::<u64>(c)
            },
        )
        .map(|_| ())
        .map_err(|e| address.error(e))
}

pub(super) fn start_heartbeat() {
    static STARTED: Once = Once::new();
    STARTED.call_once(|| common::on_heartbeat(renew_all));
    register_exit_hook();
}

/// Closes of dropped handles under way in the background ([`close_in_background`]).
static BACKGROUND_CLOSES: common::BackgroundWork =
    common::BackgroundWork::new("closes of dropped pipe handles");

/// Lets go of what a handle dropped in phase `previous` held, off the dropping thread
/// (`common::run_in_background`): a drop in async code must not block its executor's thread.
/// The exit hooks wait for it (see [`register_exit_hook`]).
pub(super) fn close_in_background(address: Address, end: u8, previous: Phase) {
    let in_flight = BACKGROUND_CLOSES.start();
    common::run_in_background("closing a dropped pipe handle", move || {
        let _in_flight = in_flight;
        if let Err(e) = let_go_of_phase(&address, end, previous) {
            tracing::debug!("closing a dropped handle of {}: {e}", address.describe());
        }
    });
}

/// Registers, once, the exit hook that waits (a lease at most) for the closes of dropped
/// handles still under way in the background, so that the other ends read end of file before
/// this process exits (or a pool worker reports its task), rather than once its holds lapse.
/// Called when this process first holds an end or receives a handle (a hook registered while the
/// exit hooks run runs in that pass too, after the others).
pub(super) fn register_exit_hook() {
    static REGISTERED: Once = Once::new();
    REGISTERED.call_once(|| shoal_core::context::register_exit_hook(await_background_closes));
}

fn await_background_closes() {
    BACKGROUND_CLOSES.wait(lease());
}

/// The heartbeat: renews this process's holds and transfers, one script per pipe.
fn renew_all() {
    let Ok(store) = common::store() else {
        return;
    };
    let mut by_pipe: HashMap<Address, Vec<(u8, String)>> = HashMap::new();
    {
        let mut all = LOCAL.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|(address, end), local| {
            // An end whose hold is changing now (a claim or release under way) is renewed at
            // the next beat; the lease spans three.
            let local = match local.try_lock() {
                Ok(local) => local,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => return true,
            };
            let holds = by_pipe.entry(address.clone()).or_default();
            if local.registered && local.handles > 0 {
                holds.push((*end, process_holder().to_string()));
            }
            holds.extend(local.transfers.iter().map(|t| (*end, t.clone())));
            local.handles > 0 || local.registered || !local.transfers.is_empty()
        });
    }
    for (address, holds) in by_pipe {
        if holds.is_empty() {
            continue;
        }
        let keys = PipeKeys::new(&address);
        let reply: Result<Vec<String>> = store.with_conn(
            || format!("renewing the holds of {}", address.describe()),
            |c| {
                let mut invocation = keys.invocation(&RENEW, &store);
                for (end, holder) in &holds {
                    invocation.arg(*end).arg(holder);
                }
                invocation.invoke(c)
            },
        );
        let reply = match reply {
            Ok(reply) => reply,
            Err(e) => {
                tracing::warn!("{e}");
                continue;
            }
        };
        let exists = reply.first().map(String::as_str) == Some("1");
        let gone: Vec<(u8, String)> = if exists {
            reply[1..]
                .iter()
                .filter_map(|g| {
                    let (end, holder) = g.split_once(':')?;
                    Some((end.parse().ok()?, holder.to_string()))
                })
                .collect()
        } else {
            holds
        };
        for (end, holder) in gone {
            let local = local_end(&address, end);
            let mut local = lock(&local);
            if holder.starts_with("t:") {
                // Claimed by its receiver (or lapsed): no longer this process's to renew.
                local.transfers.retain(|t| *t != holder);
            } else if !exists {
                local.registered = false;
            } else if local.registered && local.handles > 0 {
                // This process's hold lapsed while it lived (stopped, or cut off from Redis):
                // take it again unless the end closed meanwhile.
                tracing::warn!(
                    "{}: this process's hold of end {end} lapsed; taking it again",
                    address.describe()
                );
                match claim(&store, &address, end, None) {
                    Ok(true) => {}
                    Ok(false) => local.registered = false,
                    Err(e) => tracing::warn!("{e}"),
                }
            }
        }
    }
}

thread_local! {
    /// Set while [`encode_without_round_trips`] runs on this thread: `Some(met)`, `met` once
    /// a pipe end was refused.
    static WITHOUT_ROUND_TRIPS: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Whether a handle serialized now must not register its transfer (an
/// [`encode_without_round_trips`] runs on this thread); notes that one was refused.
pub(super) fn round_trips_refused() -> bool {
    WITHOUT_ROUND_TRIPS.with(|w| match w.get() {
        Some(_) => {
            w.set(Some(true));
            true
        }
        None => false,
    })
}

/// Runs `encode` on this thread with pipe ends refused: a handle's serialization, which
/// registers a transfer in Redis (a blocking round trip), fails instead. `None` when `encode`
/// serialized a pipe end, whatever it made of the error (nothing was registered: encode the
/// value again where a blocking call is fine, with [`collect_transfers`]); its result
/// otherwise. Async code encodes a value this way first, so that a value without pipe ends,
/// the usual case, costs no move to another thread.
///
/// ```
/// use shoal_primitives::pipe::encode_without_round_trips;
///
/// // No pipe end in it: encoded here.
/// let encoded =
///     encode_without_round_trips(|| shoal_core::codec::encode(&(1u8, "two"), "a pair", 1 << 20));
/// assert!(matches!(encoded, Some(Ok(_))));
/// ```
pub fn encode_without_round_trips<T>(encode: impl FnOnce() -> T) -> Option<T> {
    /// The enclosing state, put back however `encode` ends (a panicking serializer too); an
    /// enclosing encoding learns of a refusal inside this one, whatever `encode` made of it.
    struct Restore(Option<bool>);
    impl Drop for Restore {
        fn drop(&mut self) {
            WITHOUT_ROUND_TRIPS.with(|w| {
                let met_here = w.get() == Some(true);
                w.set(self.0.map(|met| met || met_here));
            });
        }
    }
    let restore = Restore(WITHOUT_ROUND_TRIPS.with(|w| w.replace(Some(false))));
    let result = encode();
    let met = WITHOUT_ROUND_TRIPS.with(|w| w.get()) == Some(true);
    drop(restore);
    (!met).then_some(result)
}

/// One transfer this process registered: the pipe, the end and the transfer's id.
#[derive(Debug)]
struct SentTransfer {
    address: Address,
    end: u8,
    id: String,
}

/// Notes a transfer just registered, for the [`collect_transfers`] running on this thread.
pub(super) fn note_transfer(address: &Address, end: u8, id: &str) {
    shoal_core::transfers::note(Box::new(SentTransfer {
        address: address.clone(),
        end,
        id: id.to_string(),
    }));
}

impl shoal_core::transfers::Transfer for SentTransfer {
    /// Lets go of the transfer as a holder that closed (one script), so the other end reads
    /// end of file once every real holder let go too; no longer renewed by this process.
    fn give_back(self: Box<Self>) -> Result<()> {
        let local = local_end(&self.address, self.end);
        let mut local = lock(&local);
        let Some(at) = local.transfers.iter().position(|t| *t == self.id) else {
            // The heartbeat saw it claimed (or lapsed).
            return Ok(());
        };
        local.transfers.remove(at);
        let store = common::store()?;
        // Not renewed any more, whatever the outcome: it lapses after the lease.
        let_go(&store, &self.address, self.end, &self.id)
    }
}

/// The transfers of a value encoded for a write (a queue item, a pipe message) whose write has
/// not happened: dropped, it gives them back ([`SentTransfers::release`], one script per
/// transfer), because the value will never be decoded, so that the ends it carries close once
/// their real holders let go rather than when this process exits. A write that happened, or
/// whose outcome is unknown (a lost reply: the value may be in Redis, and a receiver must
/// still be able to claim it), calls [`Unsent::keep`] instead.
///
/// A value without pipe ends has none: nothing is allocated, and the drop does nothing. The
/// give-back runs on the dropping thread, or in the background
/// (`common::run_in_background`, waited for by the exit hook as dropped handles' closes are)
/// inside a Tokio runtime or when [`Unsent::in_background`] asked for it (an async call's
/// value, dropped on an executor's thread that must not block).
#[derive(Debug, Default)]
pub(crate) struct Unsent {
    sent: SentTransfers,
    background: bool,
}

impl Unsent {
    /// Encodes `value` for `key` (see [`Store::encode`]), collecting the transfers its pipe
    /// ends register. An encoding that fails gives back what it registered before it failed.
    pub(crate) fn encode<T: Serialize + ?Sized>(
        store: &Store,
        value: &T,
        key: &str,
    ) -> Result<(Vec<u8>, Unsent)> {
        let (encoded, sent) = collect_transfers(|| store.encode(value, key));
        let unsent = Unsent {
            sent,
            background: false,
        };
        Ok((encoded?, unsent))
    }

    /// The transfers `sent` (a test's).
    #[cfg(test)]
    pub(crate) fn of(sent: SentTransfers) -> Unsent {
        Unsent {
            sent,
            background: false,
        }
    }

    /// Whether the value registered no transfer.
    pub(crate) fn is_empty(&self) -> bool {
        self.sent.is_empty()
    }

    /// This, given back off the dropping thread whatever thread drops it.
    pub(crate) fn in_background(mut self) -> Unsent {
        self.background = true;
        self
    }

    /// The value was written, or may have been: its transfers stay for its receiver, who
    /// claims them when it decodes the value (or they last as long as this process).
    pub(crate) fn keep(mut self) {
        drop(std::mem::take(&mut self.sent));
    }
}

impl Drop for Unsent {
    fn drop(&mut self) {
        if self.sent.is_empty() {
            return;
        }
        let sent = std::mem::take(&mut self.sent);
        let give_back = move || {
            if let Err(e) = sent.release() {
                // Not renewed any more: what was not let go of lapses after the lease.
                tracing::debug!("giving back the pipe ends of a value never written: {e}");
            }
        };
        if !self.background && tokio::runtime::Handle::try_current().is_err() {
            give_back();
            return;
        }
        let in_flight = BACKGROUND_CLOSES.start();
        common::run_in_background(
            "giving back the pipe ends of a value never written",
            move || {
                let _in_flight = in_flight;
                give_back();
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_without_pipe_ends_is_encoded_and_one_with_a_pipe_end_is_refused() {
        assert!(!round_trips_refused(), "handles pass outside an encoding");
        assert_eq!(encode_without_round_trips(|| 7), Some(7));
        // A handle's serialization asks (and fails): refused, whatever the encoder made of it.
        let refused = encode_without_round_trips(|| {
            assert!(round_trips_refused(), "refused inside");
            7
        });
        assert_eq!(refused, None);
        assert!(!round_trips_refused(), "handles pass again after it");
        // A refusal inside a nested encoding is the enclosing one's too.
        let nested = encode_without_round_trips(|| encode_without_round_trips(round_trips_refused));
        assert_eq!(nested, None);
        // A serializer that panics leaves the thread as it was.
        let panicked = std::panic::catch_unwind(|| {
            encode_without_round_trips(|| -> u8 { panic!("a serializer panics") })
        });
        assert!(panicked.is_err());
        assert!(!round_trips_refused(), "handles pass after a panic");
    }
}
