//! `Pipe` and `Connection`: two ends that send messages to each other, Python's
//! `multiprocessing.Pipe`.
//!
//! # Semantics
//!
//! [`Pipe::new`]`(true)` returns two ends that both send and receive; `Pipe::new(false)` returns
//! `(receiver, sender)`: the first end only receives, the second only sends.
//! [`Connection::send`] appends a message to the other end; [`Connection::recv`] takes the next
//! one, blocking while there is none. [`Connection::poll`] tells whether one is waiting
//! (`Some(Duration::ZERO)`: without waiting; `Some(t)`: waiting at most `t`; `None`: waiting as
//! long as it takes), without taking it.
//!
//! Byte messages: [`Connection::send_bytes`] sends a slice of a buffer;
//! [`Connection::recv_bytes`] returns the next message's bytes. Both kinds of message have one
//! wire format, as in Python: `recv_bytes` of a `send` message returns its encoded form, and
//! those bytes, relayed with `send_bytes`, decode with `recv` at the other end. A message longer
//! than `recv_bytes`' `maxlength` is consumed and is an error, after which a duplex handle is no
//! longer readable and a receive-only handle is closed (Python's `_bad_message_length`).
//! [`Connection::recv_bytes_into`] writes a message into a buffer at an offset; a buffer too
//! small is [`Error::BufferTooShort`]: the message is consumed, and the error carries it whole
//! (Python's `args[0]`).
//!
//! Errors, as Python's: a wrong direction and a read on a duplex handle after a `maxlength`
//! violation are [`Error::Io`] (`OSError`); an operation on a closed handle, `poll` included, is
//! [`Error::Closed`] (`OSError: handle is closed`); end of file is [`Error::Closed`]
//! (`EOFError`), never a hang, and so is sending once nobody holds the other end any more
//! (`BrokenPipeError`); a bad offset or size is [`Error::InvalidState`] (`ValueError`).
//!
//! # Handles, holders and end of file
//!
//! A `Connection` value is a handle, like a file descriptor: [`Connection::close`] (or dropping
//! it) closes that handle only, a clone is a handle of its own (`dup`), and
//! [`Connection::closed`] tells whether this handle was closed. An end is *held* by every
//! process that has an open handle of it, and the other end reads end of file, after every
//! message sent before, once every process that held the end closed its handles or died. So a
//! parent may close its copy of the end it passed to a child (Python's usual pattern), and the
//! child still uses it.
//!
//! * **Holders.** Each end has a hash of holders in Redis: holder → lease expiry. A process holds
//!   an end once, whatever number of handles it has (this process's handles of each end are
//!   counted here, and the process's hold is removed when the count drops to zero). The
//!   process's heartbeat thread renews its holds every third of `sync.lease_secs` (the lease
//!   that locks use); the holds of a process that died (SIGKILL included) lapse after the lease,
//!   and the next script run on the pipe removes them (*reaps*: every send, a reader's check-in
//!   every second of waiting, `poll`, and the heartbeats of other holders). Leases run on
//!   Redis's clock (the scripts read `TIME`), never a process's.
//! * **Outages.** While Redis is out of reach (down, `CLIENT PAUSE`, a failover), no holder can
//!   renew, and a live holder must not be taken for dead when it ends. Every script but
//!   `send.lua` records when it ran on the pipe (`ran`); since every live holder's heartbeat
//!   runs one every third of the lease, a gap of over half a lease means nobody reached Redis
//!   meanwhile, and the first script after it moves every hold's expiry forward by the gap
//!   before it reaps (a `send` that sees such a gap takes the reaping path). So an outage of any length closes no
//!   live end and loses no message, and a holder that died before or during it lapses about a
//!   lease after Redis is back. A gap with another cause (the heartbeats of every live holder
//!   stalled at once) extends the holds the same way, which only postpones a reap.
//! * **Transfers.** A handle reaches another process as a serde value (a `Process` argument, an
//!   item of a queue...). Serializing it registers a *transfer*, a hold under a fresh id that the
//!   sending process renews, and writes that id into the value; deserializing it *claims* the
//!   transfer: one script adds the receiving process as a holder and removes the transfer. In
//!   between (the child starting, a handle sitting in a queue) the transfer keeps the end open,
//!   however soon the sender closes its own handle, as Python's resource sharer keeps a
//!   descriptor for a receiver until it fetches it. A transfer is never claimed if its value is
//!   never deserialized; it then lasts as long as the sending process (or until its lease lapses
//!   after that process died), except a `Process`'s arguments: the parent gives back the
//!   transfers of a child that exited (or could not start) without claiming them
//!   ([`collect_transfers`]), so a child that dies before decoding its arguments does not keep
//!   the end open. An actor's host gives back the transfers of a state a later commit
//!   replaced, and those of its last state when it stops or fails the actor (a stop that
//!   comes to an activation of its own decodes the state, claiming its ends, to let them go);
//!   an actor creation gives back those of a state it did not use (a named actor that existed,
//!   or an error). The transfers of a state whose commit may have been applied stay. A queue
//!   item or a pipe message that was certainly not written gives its transfers back before its
//!   put or send returns (in the background for the async forms, and for a future dropped
//!   before it was under way): a full queue's `put_nowait`, a `put_timeout` that gave up, a
//!   closed queue, a queue or pipe whose keys are gone, a send refused because either end is
//!   closed, an encoding that failed after a transfer was registered, and the items a queue's
//!   feeder drops after a permanent failure (and the put that reports it). One whose outcome
//!   Redis could not tell (a lost reply) keeps them: the value may be in Redis. Items a queue's
//!   feeder still buffers when its process exits after `cancel_join_thread` keep theirs until
//!   that process is gone (a lease later): the feeder may write them until then. A handle
//!   deserialized without a runtime claims at its first use.
//!   A value deserialized twice (a retried task) claims twice: the second process holds the end
//!   too, unless every holder has let it go by then, and then its handle is closed.
//! * **End of file.** When the last holder of an end lets go (closes, or its lease lapses and is
//!   reaped), the end is marked closed: an end-of-file marker is appended to the other end's
//!   inbox (if this end could send), this end's inbox is deleted (nobody can read it), and
//!   sending to this end is a broken pipe. A closed end stays closed.
//!
//! # Keys (hash tag `{<ns>:pipe:<id>}`)
//!
//! `state` (hash: `duplex`, `closed:0`, `closed:1`, `refreshed`, `reap_at` (no hold lapses
//! before it), `ran` (when a script other than `send` last ran on the pipe); times in ms of
//! Redis's clock), `holders:0`, `holders:1` (hashes: holder → lease expiry in ms of Redis's
//! clock; a holder is a process id or a transfer id),
//! `inbox:0`, `inbox:1` (lists of messages to that end: `0x00` + the payload, which is a codec
//! payload for `send` and the bytes for `send_bytes`; the empty string for end of file),
//! `inbox:<end>:landing:<process>:<n>` (a list of one receive's own, where its wait moves the
//! next message and from which the command written behind the wait takes it: empty, so gone,
//! as soon as the round trip is over).
//!
//! # Round trips
//!
//! `Pipe::new`: 1. `send`/`send_bytes`: 1 (`send.lua`; TTLs are set when the inbox is created
//! and refreshed every tenth of `redis.expiry_secs`), 2 when a hold may have lapsed or an
//! outage just ended (`send_reaping.lua` reaps, then sends). `recv`: 1 (`BLMOVE` into a
//! landing list of the receive's own and the `LPOP` of it behind, written together, plus one
//! `check.lua` per second of waiting: a wait whose read a stop signal interrupted still gets
//! the message it moved). `poll`: 1 (`check.lua`, or `BLMOVE` from the
//! inbox to itself, which waits without taking). Clone: none. Close (or drop) of a handle: none,
//! or 1 for the process's last handle of the end (`close.lua`; a drop inside a Tokio runtime
//! makes it in the background). Passing a handle to another process: 1 to serialize it
//! (`transfer.lua`) and 1 to deserialize it (`claim.lua`).
//! Heartbeat: 1 per pipe this process holds or transfers, every third of the lease
//! (`renew.lua`, which also refreshes every key's TTL).
//!
//! # Async forms
//!
//! [`Connection::send_async`], [`Connection::send_bytes_async`], [`Connection::recv_async`],
//! [`Connection::recv_bytes_async`], [`Connection::recv_bytes_into_async`] and
//! [`Connection::poll_async`] run the same round trips (the same state machine) as a task on
//! shoal's actor runtime, the `BLPOP`/`BLMOVE` on a dedicated
//! connection of that runtime, and hand the result back through a oneshot channel: any executor
//! can await them and no thread is parked per call. A handle received without a runtime claims
//! its end at its first use, with one blocking round trip on the calling thread (handles
//! received as a task's arguments are claimed when they are decoded).
//!
//! Serializing a handle makes its transfer's round trip on the calling thread. Async code that
//! must not block encodes a value with [`encode_without_round_trips`] first (as
//! `Process::start_async` and the async actor creations do): a handle's serialization fails
//! there, nothing is registered, and the caller encodes the value again on a blocking pool.
//!
//! [`Connection::close_async`] closes the handle at its first poll; the round trip of the
//! process's last handle of an end (`close.lua`) is made, as `close` makes it, under this
//! process's lock of the end, so the task runs it on the runtime's blocking pool (a thread of
//! that pool waits for it, never the caller's). Dropping a handle inside a Tokio runtime (the
//! implicit drop at the end of a task or handler) does the same without anyone waiting: the
//! handle is closed at once and a close that takes that round trip, or would wait for that
//! lock, runs on the blocking pool; the other end reads end of file once it lands. Outside a
//! runtime a drop closes on the dropping thread, as `close` does.
//!
//! Receiving a handle ([`Connection::recv_async`] of a message holding one, a queue's
//! `get_async` of such an item) decodes it on the caller's thread, which claims its end for
//! this process: 1 blocking round trip per handle there. The claim is not put off to the
//! handle's first use: until it is made, only the sender's transfer holds the end, and that
//! lapses when the sender exits, so the other end could read end of file while this process
//! holds a handle.
//!
//! Dropping a `recv_async` (or `recv_bytes_into_async`) future loses no message: the task stops
//! before its next wait slice (within a second); a message it took meanwhile is pushed back to
//! the head of the inbox.
//! Until then another receive may see the next message, or end of file, first (so messages can
//! arrive out of order around a dropped receive). `poll_async` takes nothing. A dropped
//! `send_async` still sends if it was under way (at most once).

use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use shoal_core::error::{Error, Result};
use shoal_core::store::Store;

use crate::common::{self, Address, blpop_seconds, deadline, next_slice, process_holder, ttl};
use crate::grants::lease;
use crate::op::{self, Operation, Request, Step};

mod holds;
mod read;

pub(crate) use holds::Unsent;
pub use holds::encode_without_round_trips;
pub use shoal_core::transfers::{SentTransfers, collect_transfers};

use holds::*;
use read::*;

fn script(body: &str) -> redis::Script {
    redis::Script::new(&format!("{}\n{}", include_str!("prelude.lua"), body))
}

/// The hot path stands alone, without the prelude (see the script).
static SEND: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("send.lua")));
static SEND_REAPING: LazyLock<redis::Script> =
    LazyLock::new(|| script(include_str!("send_reaping.lua")));
static CHECK: LazyLock<redis::Script> = LazyLock::new(|| script(include_str!("check.lua")));
static CLOSE: LazyLock<redis::Script> = LazyLock::new(|| script(include_str!("close.lua")));
static TRANSFER: LazyLock<redis::Script> = LazyLock::new(|| script(include_str!("transfer.lua")));
static CLAIM: LazyLock<redis::Script> = LazyLock::new(|| script(include_str!("claim.lua")));
static RENEW: LazyLock<redis::Script> = LazyLock::new(|| script(include_str!("renew.lua")));
static CREATE: LazyLock<redis::Script> = LazyLock::new(|| script(include_str!("create.lua")));

/// First byte of every message (the empty message is end of file).
const DATA: u8 = 0;

/// The keys of one pipe, in the order every pipe script takes them.
#[derive(Clone)]
struct PipeKeys {
    state: String,
    holders: [String; 2],
    inbox: [String; 2],
}

impl PipeKeys {
    fn new(address: &Address) -> PipeKeys {
        let keys = address.keys();
        PipeKeys {
            state: keys.key("state"),
            holders: [keys.key("holders:0"), keys.key("holders:1")],
            inbox: [keys.key("inbox:0"), keys.key("inbox:1")],
        }
    }

    /// An invocation of `script` with the five keys, the lease (ms) and the TTL. The scripts
    /// read the time from Redis's clock, never this process's.
    fn invocation<'a>(
        &self,
        script: &'a redis::Script,
        store: &Store,
    ) -> redis::ScriptInvocation<'a> {
        let mut invocation = script.prepare_invoke();
        invocation
            .key(&self.state)
            .key(&self.holders[0])
            .key(&self.holders[1])
            .key(&self.inbox[0])
            .key(&self.inbox[1])
            .arg(lease().as_millis() as u64)
            .arg(ttl(store));
        invocation
    }
}

/// Creates pipes.
#[derive(Debug)]
pub struct Pipe;

impl Pipe {
    /// A pipe: two connected ends. `duplex = false` gives `(receive-only, send-only)`.
    #[allow(clippy::new_ret_no_self)]
    pub fn new<T: Serialize + DeserializeOwned>(
        duplex: bool,
    ) -> Result<(Connection<T>, Connection<T>)> {
        let (context, address) = Address::create("pipe")?;
        let store = context.store();
        let keys = PipeKeys::new(&address);
        store
            .with_conn(
                || format!("creating {}", address.describe()),
                |c| {
                    keys.invocation(&CREATE, store)
                        .arg(u8::from(duplex))
                        .arg(process_holder())
                        .invoke::<u64>(c)
                },
            )
            .map_err(|e| address.error(e))?;
        // The holds are a lease away from lapsing: the heartbeat knows of them from now on.
        for end in 0..2 {
            let local = local_end(&address, end);
            let mut local = lock(&local);
            local.registered = true;
            local.handles += 1;
        }
        start_heartbeat();
        let end = |end: u8, can_send: bool, can_recv: bool| {
            Connection::with_phase(address.clone(), end, can_send, can_recv, Phase::Open)
        };
        Ok(if duplex {
            (end(0, true, true), end(1, true, true))
        } else {
            (end(0, false, true), end(1, true, false))
        })
    }
}

/// Where a handle stands.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    /// Open: counted among this process's handles of the end, which the process holds.
    Open,
    /// Received (deserialized) and not yet claimed: the transfer id, if the value had one.
    Unclaimed(Option<String>),
    /// Closed by this handle, or received after every holder let the end go.
    Closed,
}

impl Phase {
    /// Whether closing a handle in this phase lets go of something (a hold or a transfer).
    fn holds_something(&self) -> bool {
        matches!(self, Phase::Open | Phase::Unclaimed(Some(_)))
    }
}

/// What closing a handle that was in phase `previous` lets go of: the process's hold of the end
/// with its last handle, or a received transfer never used here.
fn let_go_of_phase(address: &Address, end: u8, previous: Phase) -> Result<()> {
    match previous {
        Phase::Closed | Phase::Unclaimed(None) => Ok(()),
        Phase::Open => release(address, end),
        Phase::Unclaimed(Some(transfer)) => {
            // Never used here: give the transfer back.
            let store = common::store()?;
            let_go(&store, address, end, &transfer)
        }
    }
}

/// One end of a pipe: a handle (see the module docs). Cloning gives another handle of the same
/// end in this process; dropping a handle closes it.
pub struct Connection<T> {
    address: Address,
    end: u8,
    can_send: bool,
    can_recv: bool,
    /// Shared with the async operations under way on this handle, which stop when it closes.
    phase: Arc<Mutex<Phase>>,
    /// Set after a message exceeded `recv_bytes`' maxlength.
    unreadable: AtomicBool,
    _message: PhantomData<fn() -> T>,
}

/// How a handle travels: its address, and the transfer that holds its end meanwhile.
#[derive(Serialize, Deserialize)]
struct Wire {
    address: Address,
    end: u8,
    can_send: bool,
    can_recv: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    transfer: Option<String>,
}

impl<T> Serialize for Connection<T> {
    /// Registers a transfer of the end (1 round trip) and writes its id with the address: the
    /// end stays open until the receiver claims it. A closed handle cannot be sent.
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        if round_trips_refused() {
            return Err(serde::ser::Error::custom(format!(
                "{}: passing a pipe end takes a round trip to Redis, refused here",
                self.address.describe()
            )));
        }
        let transfer = self.transfer().map_err(serde::ser::Error::custom)?;
        Wire {
            address: self.address.clone(),
            end: self.end,
            can_send: self.can_send,
            can_recv: self.can_recv,
            transfer: Some(transfer),
        }
        .serialize(serializer)
    }
}

impl<'de, T> Deserialize<'de> for Connection<T> {
    /// Claims the transfer for this process (1 round trip, on the deserializing thread: in async
    /// code too, see [`Connection::recv_async`]); without a runtime, or if Redis fails, the
    /// handle claims it at its first use.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let wire = Wire::deserialize(deserializer)?;
        // Before the handle exists: its drop may close it in the background.
        register_exit_hook();
        if wire.end > 1 {
            return Err(serde::de::Error::custom(format!(
                "a pipe has ends 0 and 1, not {}",
                wire.end
            )));
        }
        let connection = Connection::with_phase(
            wire.address,
            wire.end,
            wire.can_send,
            wire.can_recv,
            Phase::Unclaimed(wire.transfer),
        );
        if let Ok(store) = common::store() {
            // An error here is reported by the first use, which claims again.
            let _ = connection.ensure_open(&store);
        }
        Ok(connection)
    }
}

impl<T> Clone for Connection<T> {
    /// Another handle of the same end in this process (no round trip). A clone of a closed
    /// handle is closed.
    fn clone(&self) -> Self {
        let phase = self.phase().clone();
        if phase == Phase::Open {
            let local = local_end(&self.address, self.end);
            lock(&local).handles += 1;
        }
        Connection::with_phase(
            self.address.clone(),
            self.end,
            self.can_send,
            self.can_recv,
            phase,
        )
    }
}

impl<T> Drop for Connection<T> {
    /// Closes the handle (Python closes a connection that is garbage collected). Inside a
    /// Tokio runtime (async code: the end of a task or a handler), the drop never blocks: a
    /// close that takes a round trip (the process's last handle of the end, or a received
    /// handle never used) or would wait for this process's lock of the end (which a claim or
    /// a transfer of another handle holds across its round trip) runs in the background, on
    /// the actor runtime's blocking pool; the other end reads end of file once it lands, and a
    /// failure is logged (a hold that was not removed lapses after the lease). Elsewhere it
    /// runs on the dropping thread, as [`Connection::close`] does.
    fn drop(&mut self) {
        let previous = std::mem::replace(&mut *self.phase(), Phase::Closed);
        if !previous.holds_something() {
            return;
        }
        let in_runtime = tokio::runtime::Handle::try_current().is_ok();
        if !in_runtime {
            if let Err(e) = let_go_of_phase(&self.address, self.end, previous) {
                tracing::debug!(
                    "closing a dropped handle of {}: {e}",
                    self.address.describe()
                );
            }
            return;
        }
        if previous == Phase::Open && release_at_once(&self.address, self.end) {
            return;
        }
        close_in_background(self.address.clone(), self.end, previous);
    }
}

impl<T> std::fmt::Debug for Connection<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("pipe", &self.address.describe())
            .field("end", &self.end)
            .field("readable", &self.readable())
            .field("writable", &self.can_send)
            .field("closed", &self.closed())
            .finish()
    }
}

/// What `recv` found.
enum Message {
    /// The payload (without the leading [`DATA`] byte).
    Data(Vec<u8>),
    EndOfFile,
}

impl<T> Connection<T> {
    fn with_phase(address: Address, end: u8, can_send: bool, can_recv: bool, phase: Phase) -> Self {
        Connection {
            address,
            end,
            can_send,
            can_recv,
            phase: Arc::new(Mutex::new(phase)),
            unreadable: AtomicBool::new(false),
            _message: PhantomData,
        }
    }

    fn phase(&self) -> MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this handle is closed ([`Connection::close`], or received after every holder
    /// of its end let it go).
    pub fn closed(&self) -> bool {
        *self.phase() == Phase::Closed
    }

    /// Whether this end can send.
    pub fn writable(&self) -> bool {
        self.can_send
    }

    /// Whether this end can receive (false after a `recv_bytes` maxlength violation).
    pub fn readable(&self) -> bool {
        self.can_recv && !self.unreadable.load(Ordering::Acquire)
    }

    /// Closes this handle: the end stays open while other handles or processes hold it (see the
    /// module docs). Closing twice does nothing.
    pub fn close(&self) -> Result<()> {
        self.close_handle()
    }

    /// The async form of [`Connection::close`]: the handle is closed at the first poll; when it
    /// was this process's last handle of the end, the process lets go of the end (1 round trip)
    /// on shoal's actor runtime. That round trip is made under this process's lock of the end
    /// (a claim and a release of one end must not interleave), so the task runs the blocking
    /// close on the runtime's blocking pool: the caller's thread is never blocked. A close whose
    /// future is dropped after its first poll still completes.
    pub fn close_async(&self) -> impl Future<Output = Result<()>> + Send + use<T> {
        let (phase, address, end) = (self.phase.clone(), self.address.clone(), self.end);
        async move {
            let previous = std::mem::replace(
                &mut *phase.lock().unwrap_or_else(|p| p.into_inner()),
                Phase::Closed,
            );
            if !previous.holds_something() {
                return Ok(());
            }
            let describe = {
                let address = address.clone();
                move || address.describe()
            };
            let request = Request::local("closing a handle of", move || {
                let_go_of_phase(&address, end, previous).map(|()| redis::Value::Nil)
            });
            op::spawn_single(describe, request, |reply| reply.map(|_| ())).await
        }
    }

    fn close_handle(&self) -> Result<()> {
        let previous = std::mem::replace(&mut *self.phase(), Phase::Closed);
        let_go_of_phase(&self.address, self.end, previous)
    }

    fn closed_error(&self) -> Error {
        Error::Closed(format!("handle of {} is closed", self.address.describe()))
    }

    /// Errors unless the handle is open; claims a received handle's transfer on first use.
    fn ensure_open(&self, store: &Store) -> Result<()> {
        let mut phase = self.phase();
        match &*phase {
            Phase::Open => Ok(()),
            Phase::Closed => Err(self.closed_error()),
            Phase::Unclaimed(transfer) => {
                if acquire(store, &self.address, self.end, transfer.as_deref())? {
                    *phase = Phase::Open;
                    Ok(())
                } else {
                    *phase = Phase::Closed;
                    Err(Error::Closed(format!(
                        "{}: every process that held this end closed it before it arrived here",
                        self.address.describe()
                    )))
                }
            }
        }
    }

    /// Registers a transfer of this end for a serialized copy of the handle; its id.
    fn transfer(&self) -> Result<String> {
        let store = common::store()?;
        self.ensure_open(&store)?;
        let id = format!("t:{}", uuid::Uuid::new_v4().simple());
        let local = local_end(&self.address, self.end);
        let mut local = lock(&local);
        let keys = PipeKeys::new(&self.address);
        let result = store.with_conn(
            || format!("passing a handle of {}", self.address.describe()),
            |c| {
                keys.invocation(&TRANSFER, &store)
                    .arg(self.end)
                    .arg(&id)
                    .invoke::<u64>(c)
            },
        );
        match result {
            Ok(_) => {
                local.transfers.push(id.clone());
                drop(local);
                note_transfer(&self.address, self.end, &id);
                start_heartbeat();
                Ok(id)
            }
            Err(Error::Redis { source, .. }) if source.code() == Some("CLOSED") => {
                Err(Error::Closed(format!(
                    "{}: every holder of this end closed it",
                    self.address.describe()
                )))
            }
            Err(e) => Err(self.address.error(e)),
        }
    }
}

impl<T: Serialize + DeserializeOwned> Connection<T> {
    fn os_error(&self, doing: &str, kind: std::io::ErrorKind, what: &str) -> Error {
        Error::io(
            format!("{doing} {}", self.address.describe()),
            std::io::Error::new(kind, what.to_string()),
        )
    }

    fn check_writable(&self) -> Result<()> {
        if !self.can_send {
            return Err(self.os_error(
                "sending on",
                std::io::ErrorKind::Unsupported,
                "connection is read-only",
            ));
        }
        Ok(())
    }

    fn check_readable(&self) -> Result<()> {
        if !self.can_recv {
            return Err(self.os_error(
                "receiving on",
                std::io::ErrorKind::Unsupported,
                "connection is write-only",
            ));
        }
        if self.unreadable.load(Ordering::Acquire) {
            return Err(self.os_error(
                "receiving on",
                std::io::ErrorKind::InvalidData,
                "connection is no longer readable: a message exceeded recv_bytes' maxlength",
            ));
        }
        Ok(())
    }

    /// Sends a message to the other end.
    ///
    /// A message holding pipe ends registers a transfer of each (see the module docs); a send
    /// that certainly wrote nothing (the other end or this one closed: [`Error::Closed`]; the
    /// pipe gone; an encoding that failed) gives them back before it returns, so those ends
    /// close as soon as their real holders let go. A send whose outcome Redis could not tell
    /// (a lost reply) keeps them: the message may be in the inbox.
    pub fn send(&self, message: &T) -> Result<()> {
        let store = common::store()?;
        self.ensure_open(&store)?;
        self.check_writable()?;
        let keys = PipeKeys::new(&self.address);
        let (framed, unsent) = self.frame_message(&store, &keys, message)?;
        self.send_raw(&store, keys, framed, unsent)
    }

    /// The async form of [`Connection::send`] (1 round trip on shoal's actor runtime, 2 when a
    /// hold may have lapsed; the message is encoded when this is called). A send whose future
    /// is dropped still happens if it was under way (at most once); one dropped before it was
    /// under way, or refused, gives back the transfers of the pipe ends in the message (in the
    /// background), as [`Connection::send`] does.
    pub fn send_async<'a>(
        &'a self,
        message: &T,
    ) -> impl Future<Output = Result<()>> + Send + use<'a, T> {
        let framed = common::store()
            .and_then(|store| self.frame_message(&store, &PipeKeys::new(&self.address), message))
            .map(|(framed, unsent)| (framed, unsent.in_background()));
        self.send_raw_async(framed)
    }

    /// The message encoded for the other end's inbox, after the marker byte, and the transfers
    /// its pipe ends registered (given back if the encoding fails).
    fn frame_message(
        &self,
        store: &Store,
        keys: &PipeKeys,
        message: &T,
    ) -> Result<(Vec<u8>, Unsent)> {
        let target = &keys.inbox[usize::from(1 - self.end)];
        let (payload, unsent) = Unsent::encode(store, message, target)?;
        let mut framed = Vec::with_capacity(payload.len() + 1);
        framed.push(DATA);
        framed.extend_from_slice(&payload);
        Ok((framed, unsent))
    }

    /// Sends `buffer[offset..offset + size]` (to the end of the buffer when `size` is `None`)
    /// as one byte message.
    pub fn send_bytes(&self, buffer: &[u8], offset: usize, size: Option<usize>) -> Result<()> {
        let store = common::store()?;
        self.ensure_open(&store)?;
        self.check_writable()?;
        let framed = self.frame_bytes(&store, buffer, offset, size)?;
        // Bytes register no transfer.
        self.send_raw(
            &store,
            PipeKeys::new(&self.address),
            framed,
            Unsent::default(),
        )
    }

    /// The async form of [`Connection::send_bytes`] (the bytes are copied when this is called).
    pub fn send_bytes_async<'a>(
        &'a self,
        buffer: &[u8],
        offset: usize,
        size: Option<usize>,
    ) -> impl Future<Output = Result<()>> + Send + use<'a, T> {
        let framed = common::store()
            .and_then(|store| self.frame_bytes(&store, buffer, offset, size))
            .map(|framed| (framed, Unsent::default()));
        self.send_raw_async(framed)
    }

    /// `buffer[offset..offset + size]` after the marker byte, within the size limit.
    fn frame_bytes(
        &self,
        store: &Store,
        buffer: &[u8],
        offset: usize,
        size: Option<usize>,
    ) -> Result<Vec<u8>> {
        let end = match size {
            Some(size) => offset.checked_add(size),
            None => Some(buffer.len()),
        };
        let slice = end
            .filter(|&end| offset <= end && end <= buffer.len())
            .map(|end| &buffer[offset..end])
            .ok_or_else(|| {
                Error::invalid_state(format!(
                    "offset {offset} and size {size:?} are outside a buffer of {} bytes",
                    buffer.len()
                ))
            })?;
        let limit = store.settings().max_message_bytes;
        if slice.len() > limit {
            return Err(Error::TooLarge {
                key: PipeKeys::new(&self.address).inbox[usize::from(1 - self.end)].clone(),
                size: slice.len(),
                limit,
            });
        }
        let mut framed = Vec::with_capacity(slice.len() + 1);
        framed.push(DATA);
        framed.extend_from_slice(slice);
        Ok(framed)
    }

    /// Sends `message` (framed); `unsent`: the transfers its encoding registered, given back
    /// when it is certainly not sent (see [`Sending`]).
    fn send_raw(
        &self,
        store: &Store,
        keys: PipeKeys,
        message: Vec<u8>,
        unsent: Unsent,
    ) -> Result<()> {
        op::run(store, &mut self.sending(keys, message, unsent))
    }

    /// A send of `message` (framed) from this handle.
    fn sending(&self, keys: PipeKeys, message: Vec<u8>, unsent: Unsent) -> Sending {
        Sending {
            address: self.address.clone(),
            keys,
            end: self.end,
            message,
            reaping: false,
            unsent,
            in_flight: false,
        }
    }

    /// The async form of [`Connection::send_raw`]. A message refused before it is sent (a
    /// closed handle, a wrong direction) gives its transfers back, in the background.
    async fn send_raw_async(&self, message: Result<(Vec<u8>, Unsent)>) -> Result<()> {
        let store = common::store()?;
        self.ensure_open(&store)?;
        self.check_writable()?;
        let (message, unsent) = message?;
        op::spawn(
            self.sending(PipeKeys::new(&self.address), message, unsent),
            None,
        )
        .await
    }

    /// A receive or poll of this handle.
    fn reader(&self, poll: Option<Option<Instant>>) -> Reader {
        let keys = PipeKeys::new(&self.address);
        Reader {
            address: self.address.clone(),
            end: self.end,
            inbox: keys.inbox[usize::from(self.end)].clone(),
            keys,
            phase: self.phase.clone(),
            poll,
            state: ReaderState::Waiting,
        }
    }

    /// Takes the next message, waiting as long as it takes.
    fn next_message(&self, store: &Store) -> Result<Message> {
        self.ensure_open(store)?;
        self.check_readable()?;
        match op::run(store, &mut self.reader(None))? {
            Read::Message(message) => Ok(message),
            Read::Polled(_) => Err(Error::invalid_state("a receive answered like a poll")),
        }
    }

    /// The async form of [`Connection::next_message`]; a message taken for a future that was
    /// dropped goes back to the head of the inbox.
    async fn next_message_async(&self) -> Result<Message> {
        let store = common::store()?;
        self.ensure_open(&store)?;
        self.check_readable()?;
        let reader = self.reader(None);
        let (address, inbox) = (self.address.clone(), reader.inbox.clone());
        let undo: op::Undo<Read> = Box::new(move |store, read| {
            Box::pin(async move {
                let Read::Message(Message::Data(payload)) = read else {
                    // End of file stays in the inbox; a poll takes nothing.
                    return;
                };
                let mut framed = Vec::with_capacity(payload.len() + 1);
                framed.push(DATA);
                framed.extend_from_slice(&payload);
                // The TTL too: the push may have made the inbox again after it expired.
                let mut pipe = redis::pipe();
                pipe.cmd("LPUSH")
                    .arg(&inbox)
                    .arg(framed)
                    .ignore()
                    .expire(&inbox, ttl(store.store()) as i64)
                    .ignore();
                op::undo_request(
                    &store,
                    || address.describe(),
                    Request::pipe("giving a message back to", pipe),
                )
                .await;
            })
        });
        match op::spawn(reader, Some(undo)).await? {
            Read::Message(message) => Ok(message),
            Read::Polled(_) => Err(Error::invalid_state("a receive answered like a poll")),
        }
    }

    fn end_of_file(&self) -> Error {
        Error::Closed(format!(
            "{}: the other end was closed and everything it sent was read (end of file)",
            self.address.describe()
        ))
    }

    /// Receives the next message, waiting as long as it takes; [`Error::Closed`] once the other
    /// end is closed and everything it sent was read.
    pub fn recv(&self) -> Result<T> {
        let store = common::store()?;
        let message = self.next_message(&store)?;
        self.decode(&store, message)
    }

    /// The async form of [`Connection::recv`]: waits on shoal's actor runtime without blocking
    /// the caller's thread; any executor can await it. A message taken for a future that was
    /// dropped goes back to the head of the inbox (see the module docs).
    ///
    /// What runs where: the wait (`BLPOP` slices and checks) runs on the actor runtime; the
    /// message is decoded on the caller's thread once it arrived. A handle received without a
    /// runtime is claimed at the first poll, on the caller's thread (1 blocking round trip).
    ///
    /// Known round trip on the caller's thread: decoding a message that contains pipe
    /// `Connection` handles claims each one's end for this process (`claim.lua`, 1 blocking
    /// round trip per handle). The claim is not put off to the handle's first use: until then
    /// the end is held by the sender's transfer only, which lapses when the sender exits, and
    /// the other end could read end of file while this process holds a handle.
    pub async fn recv_async(&self) -> Result<T> {
        let message = self.next_message_async().await?;
        self.decode(&*common::store()?, message)
    }

    fn decode(&self, store: &Store, message: Message) -> Result<T> {
        match message {
            Message::EndOfFile => Err(self.end_of_file()),
            Message::Data(payload) => {
                let keys = PipeKeys::new(&self.address);
                store.decode(&payload, &keys.inbox[usize::from(self.end)])
            }
        }
    }

    /// Receives the next message's bytes (a `send` message's encoded form). A message longer
    /// than `maxlength` is consumed and is [`Error::Io`]; then, as in Python, a duplex handle is
    /// no longer readable (it still sends), and a receive-only handle is closed (as by
    /// [`Connection::close`]).
    pub fn recv_bytes(&self, maxlength: Option<usize>) -> Result<Vec<u8>> {
        let store = common::store()?;
        let message = self.next_message(&store)?;
        let (result, close) = self.bytes_within(message, maxlength);
        if close && let Err(e) = self.close_handle() {
            tracing::warn!("closing a connection after a bad message length: {e}");
        }
        result
    }

    /// The async form of [`Connection::recv_bytes`] (see [`Connection::recv_async`]).
    pub async fn recv_bytes_async(&self, maxlength: Option<usize>) -> Result<Vec<u8>> {
        let message = self.next_message_async().await?;
        let (result, close) = self.bytes_within(message, maxlength);
        if close && let Err(e) = self.close_async().await {
            tracing::warn!("closing a connection after a bad message length: {e}");
        }
        result
    }

    /// The message's bytes, or the error for one longer than `maxlength`, and whether the
    /// handle must be closed for it (Python's `_bad_message_length`: a handle that also sends
    /// only stops reading; a receive-only one is closed).
    fn bytes_within(&self, message: Message, maxlength: Option<usize>) -> (Result<Vec<u8>>, bool) {
        let bytes = match message {
            Message::EndOfFile => return (Err(self.end_of_file()), false),
            Message::Data(bytes) => bytes,
        };
        if let Some(max) = maxlength
            && bytes.len() > max
        {
            self.unreadable.store(true, Ordering::Release);
            let after = if self.can_send {
                "the connection is no longer readable"
            } else {
                "the connection is closed"
            };
            let error = self.os_error(
                "receiving on",
                std::io::ErrorKind::InvalidData,
                &format!(
                    "bad message length: {} bytes, longer than maxlength {max}; {after}",
                    bytes.len()
                ),
            );
            return (Err(error), !self.can_send);
        }
        (Ok(bytes), false)
    }

    /// Receives the next message into `buffer` at `offset`; returns its length. A buffer too
    /// small is [`Error::BufferTooShort`], which carries the message (it is consumed, as in
    /// Python).
    pub fn recv_bytes_into(&self, buffer: &mut [u8], offset: usize) -> Result<usize> {
        check_offset(buffer, offset)?;
        let store = common::store()?;
        let message = self.next_message(&store)?;
        self.copy_into(message, buffer, offset)
    }

    /// The async form of [`Connection::recv_bytes_into`] (see [`Connection::recv_async`]); the
    /// buffer is written once the message arrived.
    pub async fn recv_bytes_into_async(&self, buffer: &mut [u8], offset: usize) -> Result<usize> {
        check_offset(buffer, offset)?;
        let message = self.next_message_async().await?;
        self.copy_into(message, buffer, offset)
    }

    /// Writes `message` into `buffer` at `offset`; its length, or [`Error::BufferTooShort`]
    /// carrying it.
    fn copy_into(&self, message: Message, buffer: &mut [u8], offset: usize) -> Result<usize> {
        let message = match message {
            Message::EndOfFile => return Err(self.end_of_file()),
            Message::Data(message) => message,
        };
        let len = message.len();
        if len > buffer.len() - offset {
            return Err(Error::BufferTooShort {
                message: message.into(),
                needed: len,
                offset,
                available: buffer.len(),
            });
        }
        buffer[offset..offset + len].copy_from_slice(&message);
        Ok(len)
    }

    /// Whether a message (or end of file) is waiting: without waiting for
    /// `Some(Duration::ZERO)`, at most `t` for `Some(t)`, as long as it takes for `None`.
    pub fn poll(&self, timeout: Option<Duration>) -> Result<bool> {
        let store = common::store()?;
        self.ensure_open(&store)?;
        self.check_readable()?;
        match op::run(&store, &mut self.reader(Some(deadline(timeout))))? {
            Read::Polled(ready) => Ok(ready),
            Read::Message(_) => Err(Error::invalid_state("a poll answered like a receive")),
        }
    }

    /// The async form of [`Connection::poll`] (`timeout` runs from the first poll of the
    /// future); it takes nothing, so a dropped future leaves nothing to give back.
    pub async fn poll_async(&self, timeout: Option<Duration>) -> Result<bool> {
        let store = common::store()?;
        self.ensure_open(&store)?;
        self.check_readable()?;
        match op::spawn(self.reader(Some(deadline(timeout))), None).await? {
            Read::Polled(ready) => Ok(ready),
            Read::Message(_) => Err(Error::invalid_state("a poll answered like a receive")),
        }
    }
}

/// An offset outside `buffer` is [`Error::InvalidState`] (Python's `ValueError`), checked before
/// anything is received.
fn check_offset(buffer: &[u8], offset: usize) -> Result<()> {
    if offset > buffer.len() {
        return Err(Error::invalid_state(format!(
            "offset {offset} is outside a buffer of {} bytes",
            buffer.len()
        )));
    }
    Ok(())
}

/// A send: `send.lua`, and `send_reaping.lua` when that found a hold that may have lapsed
/// (it sent nothing then).
///
/// The transfers of the pipe ends in the message (`unsent`) are given back when the send is
/// dropped having certainly written nothing: never sent, or refused by a script before it
/// wrote (`CLOSED`, `BROKEN`, `GONE`, or `send.lua`'s 0). A send written, or whose outcome is
/// unknown (any other error, a request under way when the send was dropped), keeps them.
struct Sending {
    address: Address,
    keys: PipeKeys,
    end: u8,
    message: Vec<u8>,
    reaping: bool,
    unsent: Unsent,
    /// A request was handed over and its reply has not been read: it may have written.
    in_flight: bool,
}

impl Sending {
    fn request(&mut self, store: &Store) -> Step<()> {
        let script = if self.reaping { &SEND_REAPING } else { &SEND };
        let mut invocation = self.keys.invocation(script, store);
        invocation.arg(self.end).arg(self.message.as_slice());
        self.in_flight = true;
        Step::Next(Request::script("sending on", invocation))
    }

    /// The message was written, or may have been: its transfers stay for the receiver.
    fn keep_transfers(&mut self) {
        std::mem::take(&mut self.unsent).keep();
    }
}

impl Drop for Sending {
    fn drop(&mut self) {
        if self.in_flight {
            // Dropped with its request under way (the async runtime going away): it may land.
            self.keep_transfers();
        }
        // Otherwise `unsent` is given back as it drops.
    }
}

impl Operation for Sending {
    type Output = ();

    fn describe(&self) -> String {
        self.address.describe()
    }

    fn start(&mut self, store: &Store) -> Step<()> {
        self.request(store)
    }

    fn reply(&mut self, store: &Store, reply: Result<redis::Value>) -> Step<()> {
        self.in_flight = false;
        let refused = matches!(
            &reply,
            Err(Error::Redis { source, .. })
                if matches!(source.code(), Some("CLOSED" | "BROKEN" | "GONE"))
        );
        match sent(&self.address, reply) {
            Ok(0) if !self.reaping => {
                self.reaping = true;
                self.request(store)
            }
            Ok(_) => {
                self.keep_transfers();
                Step::Done(Ok(()))
            }
            Err(e) => {
                if !refused {
                    // The message may be in the inbox.
                    self.keep_transfers();
                }
                Step::Done(Err(e))
            }
        }
    }
}

/// Reads a send's reply: 1 sent, 0 (`send.lua` only) a reap is due and nothing was sent.
fn sent(address: &Address, reply: Result<redis::Value>) -> Result<u64> {
    match op::parse::<u64>(reply, "a send") {
        Ok(n) => Ok(n),
        Err(Error::Redis { source, .. }) if source.code() == Some("CLOSED") => {
            Err(Error::Closed(format!(
                "{}: every holder of this end closed it (or its lease lapsed)",
                address.describe()
            )))
        }
        Err(Error::Redis { source, .. }) if source.code() == Some("BROKEN") => {
            Err(Error::Closed(format!(
                "{}: the other end is closed (broken pipe)",
                address.describe()
            )))
        }
        Err(e) => Err(address.error(e)),
    }
}

/// `check.lua` for `end`: reaps lapsed holds, reads the end's state.
fn check_request(store: &Store, keys: &PipeKeys, end: u8) -> Request {
    let mut invocation = keys.invocation(&CHECK, store);
    invocation.arg(end);
    Request::script("checking", invocation)
}

/// Reads a check's reply: the messages waiting, or the error of a closed end.
/// Reads the reply to [`check_request`]: the messages waiting, and whether the writing end
/// is closed (with nothing waiting: end of file).
fn checked(address: &Address, reply: Result<redis::Value>) -> Result<(u64, bool)> {
    let (closed, waiting, writer_closed): (u8, u64, u8) =
        op::parse(reply, "a pipe check").map_err(|e| address.error(e))?;
    if closed == 1 {
        return Err(Error::Closed(format!(
            "{}: every holder of this end closed it (or its lease lapsed)",
            address.describe()
        )));
    }
    Ok((waiting, writer_closed == 1))
}
