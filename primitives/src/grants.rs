//! The grant core of `Lock`, `RLock`, `Semaphore` and `BoundedSemaphore`: permits handed out
//! as leased, fenced grants.
//!
//! # Semantics
//!
//! A grant object has permits (1 for locks). Acquiring takes a free permit as a *grant*: a new
//! id from a counter that only grows (the fencing token), recorded with its holder and a lease.
//! When no permit is free the caller queues (first come, first served) and blocks on its own
//! wake key; a release or a lapsed lease hands the permit straight to the first live waiter by
//! pushing a grant id to its wake key, so a wake-up is never lost and a permit is never granted
//! twice. A waiter that gives up runs one script that either removes it from the queue or, if a
//! grant reached it meanwhile, keeps the grant (Redis rule 3).
//!
//! Releasing: a `Lock` releases the caller's grant or, as Python allows, another process's; an
//! `RLock` only its owner's; a `Semaphore` or `BoundedSemaphore` the caller's grant or, when the
//! process holds none, adds a permit (a semaphore is a counter; `Semaphore(0)` is a signal
//! between processes). It never takes another process's grant. A release that would raise a
//! `BoundedSemaphore` above its initial value is [`Error::InvalidState`] (Python's `ValueError`).
//!
//! Crash safety: every process renews the leases of the grants it holds from one heartbeat thread
//! (every third of `sync.lease_secs`). The grants of a process that died without exiting
//! (`SIGKILL`, a lost host) lapse, and the next script run on the object (an acquire, a release,
//! `get_value`/`locked`, or a waiter checking in every second) gives their permits to the
//! waiters. A holder whose lease lapsed while it was alive (stopped, or cut off from Redis)
//! learns it at release: [`Error::InvalidState`] saying the lock was lost.
//!
//! A release nobody waits for (the undo of a grant whose async caller left, a dropped guard)
//! first takes the grant off this process's registry, so that the heartbeat stops renewing it,
//! then is sent, again a few times while Redis cannot be reached: should it never go through,
//! the lease lapses, and the permit is not held for good. It names its grant, and sends nothing
//! when this process no longer holds that grant (it never releases another's). The exit hooks
//! wait for those still under way (a lease at most), so that a process that drops a guard and
//! exits leaves the lock free.
//!
//! An `RLock`'s recursion levels are counted twice: in Redis, and in this process's registry,
//! as its owner holds them. The owner re-enters only the grant its process counts for it
//! (`grants_acquire.lua`): once it released the last level of a grant, that grant is not its
//! hold any more, even while the release is on its way, sent again, or lost (the owner then
//! waits for it to go, like any other caller). So a late or repeated release of that grant
//! never takes a level off a hold its owner believes it has, and the registry's count does not
//! depend on the order in which an acquire and a release sent from another task reach Redis.
//! A re-entry that is already on its way when another task (an undo, a dropped guard) releases
//! the grant's last level keeps the grant registered, at 0 levels, until its reply is read. The
//! re-entry reaches Redis either first, and adds a level to the grant (the release takes off
//! the level let go of, in Redis as in the registry), or after it, and takes a new grant:
//! either way its owner holds one level, counted once. That release is sent again (while Redis
//! cannot be reached) only once the registry no longer counts the grant: a repeat could take
//! off the level the re-entry added.
//!
//! A process that exits normally keeps its holds, as in Python: the runtime's exit hooks (run at
//! the end of a worker's task, even a failed one, and when a `Runtime` shuts down) take the lease
//! off every grant the process still holds (`grants_detach.lua`), so the hold no longer depends
//! on its heartbeat. Such a `Lock` or `Semaphore` permit stays taken until another process
//! releases it; such an `RLock` stays held for good (only its owner may release it), as Python's.
//!
//! # Keys (hash tag `{<ns>:<kind>:<id>}`)
//!
//! `state` (hash: `value`, `bound`, `kind`), `holders` (hash: grant id → holder, lease expiry
//! (0: no lease, its process exited normally), recursion count), `waiters` (list), `waiting`
//! (hash: waiter → liveness deadline, holder), `fence` (counter), `wake:<waiter>` (list, one per
//! blocked caller).
//!
//! # Round trips
//!
//! Acquire when a permit is free: 1 (`grants_acquire.lua`). Acquire that waits: 1 to queue, then
//! one `BLPOP` that returns when the grant arrives (plus one check-in per second of waiting).
//! Release: 1 (`grants_release.lua`). Giving up after a timeout, or because the async caller's
//! future was dropped: 1 (`grants_wait.lua`), plus 1 to release a grant nobody took.
//! `get_value`/`locked` (and their async forms): 1 (`grants_value.lua`). At a clean exit: 1 per
//! object this process still holds (`grants_detach.lua`).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{LazyLock, Mutex, Once};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shoal_core::context;
use shoal_core::error::{Error, Result};
use shoal_core::store::{AsyncStore, Store};

use crate::common::{self, Address, liveness, next_slice, now_ms, process_holder, ttl};
use crate::op::{self, Operation, Request, Step};

/// The most permits a semaphore holds: its scripts count in Lua numbers (doubles), exact up to
/// 2^53.
pub(crate) const MOST_PERMITS: u64 = (1 << 53) - 1;

fn script(body: &str) -> redis::Script {
    redis::Script::new(&format!("{}\n{}", include_str!("grants_prelude.lua"), body))
}

static ACQUIRE: LazyLock<redis::Script> =
    LazyLock::new(|| script(include_str!("grants_acquire.lua")));
static WAIT: LazyLock<redis::Script> = LazyLock::new(|| script(include_str!("grants_wait.lua")));
static RELEASE: LazyLock<redis::Script> =
    LazyLock::new(|| script(include_str!("grants_release.lua")));
static RENEW: LazyLock<redis::Script> = LazyLock::new(|| script(include_str!("grants_renew.lua")));
static DETACH: LazyLock<redis::Script> =
    LazyLock::new(|| script(include_str!("grants_detach.lua")));
static VALUE: LazyLock<redis::Script> = LazyLock::new(|| script(include_str!("grants_value.lua")));

/// How many times a release nobody waits for (an undo, a guard's) is sent while Redis cannot
/// be reached ([`GrantObject::send_retired`]).
const RELEASE_ATTEMPTS: u32 = 5;

/// Which primitive a grant object is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) enum GrantKind {
    Lock,
    RLock,
    Semaphore,
    Bounded,
}

impl GrantKind {
    fn name(self) -> &'static str {
        match self {
            GrantKind::Lock => "lock",
            GrantKind::RLock => "rlock",
            GrantKind::Semaphore => "semaphore",
            GrantKind::Bounded => "bounded",
        }
    }

    fn holder(self) -> String {
        holder(self)
    }
}

/// Who holds a grant of `kind` when the calling thread takes it.
pub(crate) fn holder(kind: GrantKind) -> String {
    match kind {
        GrantKind::RLock => common::thread_holder(),
        _ => process_holder().to_string(),
    }
}

/// Maps a `NOTOWNER` error of a script that needs the hold to [`Error::InvalidState`].
pub(crate) fn map_hold_error(object: &GrantObject, e: Error) -> Error {
    if let Error::Redis { source, .. } = &e
        && source.code() == Some("NOTOWNER")
    {
        let detail = source.detail().unwrap_or("the lock is not held here");
        return Error::invalid_state(format!("{}: {detail}", object.address.describe()));
    }
    object.address.error(e)
}

/// A grant object's keys.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct GrantKeys {
    pub(crate) state: String,
    pub(crate) holders: String,
    waiters: String,
    waiting: String,
    pub(crate) fence: String,
    wake_prefix: String,
}

impl GrantKeys {
    pub(crate) fn new(address: &Address) -> Self {
        let keys = address.keys();
        GrantKeys {
            state: keys.key("state"),
            holders: keys.key("holders"),
            waiters: keys.key("waiters"),
            waiting: keys.key("waiting"),
            fence: keys.key("fence"),
            wake_prefix: keys.key("wake:"),
        }
    }

    /// Sets the five keys and the common arguments of a grant script.
    pub(crate) fn invocation<'a>(
        &self,
        script: &'a redis::Script,
        store: &Store,
        lease: Duration,
    ) -> redis::ScriptInvocation<'a> {
        let mut invocation = script.prepare_invoke();
        invocation
            .key(&self.state)
            .key(&self.holders)
            .key(&self.waiters)
            .key(&self.waiting)
            .key(&self.fence)
            .arg(now_ms())
            .arg(ttl(store))
            .arg(lease.as_millis() as u64)
            .arg(&self.wake_prefix);
        invocation
    }
}

/// A permit this process holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Grant {
    /// The grant id: a fencing token (it only grows).
    pub(crate) token: u64,
    /// The recursion level (RLock), 1 otherwise.
    pub(crate) count: u64,
}

/// A grant object: the shared state of a lock or semaphore.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) struct GrantObject {
    pub(crate) address: Address,
    pub(crate) kind: GrantKind,
}

impl GrantObject {
    /// Creates the object with `permits` free permits; `bound`: the most it may ever have.
    pub(crate) fn create(kind: GrantKind, permits: u64, bound: Option<u64>) -> Result<Self> {
        if permits > MOST_PERMITS {
            // The scripts count in Lua numbers (doubles): past 2^53 a count is not exact.
            return Err(Error::invalid_state(format!(
                "a semaphore holds at most {MOST_PERMITS} permits, not {permits}"
            )));
        }
        let (context, address) = Address::create(match kind {
            GrantKind::Lock => "lock",
            GrantKind::RLock => "rlock",
            GrantKind::Semaphore | GrantKind::Bounded => "semaphore",
        })?;
        let object = GrantObject { address, kind };
        object.create_at(context.store(), permits, bound)?;
        Ok(object)
    }

    /// Creates the object at an address chosen by the caller (a Condition's own lock).
    pub(crate) fn create_at(&self, store: &Store, permits: u64, bound: Option<u64>) -> Result<()> {
        let keys = GrantKeys::new(&self.address);
        let bound = bound.map(|b| b as i64).unwrap_or(-1);
        store
            .with_conn(
                || format!("creating {}", self.address.describe()),
                |c| {
                    redis::pipe()
                        .hset_multiple(&keys.state, &[("value", permits as i64), ("bound", bound)])
                        .ignore()
                        .hset(&keys.state, "kind", self.kind.name())
                        .ignore()
                        .hset(&keys.state, "nwait", 0)
                        .ignore()
                        .hset(&keys.holders, "_", "keeps the hash")
                        .ignore()
                        .expire(&keys.state, ttl(store) as i64)
                        .ignore()
                        .expire(&keys.holders, ttl(store) as i64)
                        .ignore()
                        .query::<()>(c)
                },
            )
            .map_err(|e| self.address.error(e))
    }

    pub(crate) fn keys(&self) -> GrantKeys {
        GrantKeys::new(&self.address)
    }

    /// Acquires a permit for the calling thread (or task: see [`holder`]). `wait`: `None`
    /// tries once; `Some(None)` waits forever; `Some(Some(t))` waits until `t`. `Ok(None)` when
    /// it was not acquired.
    pub(crate) fn acquire(&self, wait: Option<Option<Instant>>) -> Result<Option<Grant>> {
        self.acquire_as(self.kind.holder(), wait)
    }

    /// [`GrantObject::acquire`] for `holder`.
    pub(crate) fn acquire_as(
        &self,
        holder: String,
        wait: Option<Option<Instant>>,
    ) -> Result<Option<Grant>> {
        let store = common::store()?;
        op::run(&store, &mut Acquire::new(self, holder, wait))
    }

    /// The async form of [`GrantObject::acquire`]: the holder is the thread or task that first
    /// polls the future, and `timeout` runs from then. A grant whose caller dropped the future
    /// is released (see `op.rs`). Also returns the holder, for a guard.
    pub(crate) fn acquire_async(
        &self,
        wait: Option<Option<Duration>>,
    ) -> impl Future<Output = Result<Option<(Grant, String)>>> + Send + use<> {
        let object = self.clone();
        async move {
            let holder = object.kind.holder();
            let wait = wait.map(common::deadline);
            let acquire = Acquire::new(&object, holder.clone(), wait);
            let undo_holder = holder.clone();
            let undo: op::Undo<Option<Grant>> = Box::new(move |store, grant| {
                Box::pin(async move {
                    if let Some(grant) = grant {
                        object
                            .release_detached(&store, undo_holder, grant.token)
                            .await;
                    }
                })
            });
            let grant = op::spawn(acquire, Some(undo)).await?;
            Ok(grant.map(|g| (g, holder)))
        }
    }

    /// Releases one permit (see `grants_release.lua` for whose) for the calling thread (or
    /// task). Returns the recursion level left (RLock).
    pub(crate) fn release(&self) -> Result<u64> {
        let mine = held_grant(&self.keys().state, self.kind);
        self.release_as(&self.kind.holder(), mine)
    }

    /// Releases `mine` (the caller's grant, if it has one) on behalf of `holder`.
    pub(crate) fn release_as(&self, holder: &str, mine: Option<u64>) -> Result<u64> {
        let store = common::store()?;
        set_releasing(&self.keys().state, mine, true);
        op::run_single(
            &store,
            || self.address.describe(),
            self.release_request(&store, holder, mine),
            |reply| self.released(mine, reply),
        )
    }

    /// The async form of [`GrantObject::release_as`].
    pub(crate) fn release_async(
        &self,
        holder: String,
        mine: Option<u64>,
    ) -> impl Future<Output = Result<u64>> + Send + use<> {
        let object = self.clone();
        async move {
            let store = common::store()?;
            let state = object.keys().state;
            set_releasing(&state, mine, true);
            let request = object.release_request(&store, &holder, mine);
            let describe = {
                let address = object.address.clone();
                move || address.describe()
            };
            let released =
                op::spawn_single(describe, request, move |reply| object.released(mine, reply))
                    .await;
            if released.is_err() {
                // The release may not have been sent at all: no longer under way.
                set_releasing(&state, mine, false);
            }
            released
        }
    }

    /// The async form of [`GrantObject::release`]: for the task (or thread) that polls it.
    pub(crate) fn release_current_async(&self) -> impl Future<Output = Result<()>> + Send + use<> {
        let object = self.clone();
        async move {
            let holder = object.kind.holder();
            let mine = held_grant(&object.keys().state, object.kind);
            object.release_async(holder, mine).await.map(|_| ())
        }
    }

    /// Releases one level of the grant `token` from a task of the actor runtime (an undo),
    /// logging a failure. The level leaves this process's registry first ([`retire`]), so a
    /// release that fails never leaves a hold that the heartbeat renews for good; one that is
    /// no longer registered (released meanwhile) is left alone.
    pub(crate) async fn release_detached(&self, store: &AsyncStore, holder: String, token: u64) {
        let _in_flight = background_release();
        match retire(&self.keys().state, |g| g.token == token) {
            Some((token, last)) => {
                let released = self.send_retired(store, &holder, token, last, false).await;
                self.report_release(released, last);
            }
            None => tracing::debug!(
                "{}: the hold with fencing token {token} is no longer held here: nothing to \
                 release",
                self.address.describe()
            ),
        }
    }

    /// Takes one level of the hold that began as `origin` (see [`GrantObject::hold_origin`])
    /// off this process's registry, ahead of its release: its grant and whether that was the
    /// last level (the grant left the registry, and the heartbeat no longer renews it).
    /// `None` when this process holds it no longer (released, lost, or given up by a
    /// `Condition` wait that failed or whose future was dropped).
    pub(crate) fn retire_hold(&self, origin: u64) -> Option<(u64, bool)> {
        retire(&self.keys().state, |g| g.origin == origin)
    }

    /// Sends the release of `token`, already taken off the registry ([`retire`]; `last`: its
    /// last level), on the caller's thread: one attempt.
    pub(crate) fn release_retired(&self, holder: &str, token: u64, last: bool) -> Result<u64> {
        let store = common::store()?;
        op::run_single(
            &store,
            || self.address.describe(),
            self.release_request(&store, holder, Some(token)),
            |reply| self.retired_reply(token, last, reply, false),
        )
    }

    /// Sends the release of `token`, already taken off the registry ([`retire`]; `last`: its
    /// last level), from a task of the actor runtime. While Redis cannot be reached (a shared
    /// connection fails the first command after it was cut), a last level is sent again, at
    /// most [`RELEASE_ATTEMPTS`] times in all with growing pauses: the release names its grant,
    /// so a repeat releases nothing else (it finds the grant gone if an earlier attempt went
    /// through before its connection failed). An attempt that timed out may still reach Redis
    /// after its repeat; for an `RLock` that is safe too: its owner's process no longer counts
    /// the grant, so the owner never re-enters it (`grants_acquire.lua`), and the extra level
    /// taken off is one nobody holds. A level of an `RLock` above the last is sent once: a
    /// repeat of one that went through would release a level its owner still holds. So is a
    /// last level while this process still counts its grant (a re-entry naming it was on its
    /// way: [`Held::take_level`]), as that re-entry may have added a level to it; once the
    /// re-entry took a new grant or failed, the grant leaves the registry for good, and the
    /// repeats go on. `tried`: the caller sent it once already, and that attempt failed
    /// without a reply.
    pub(crate) async fn send_retired(
        &self,
        store: &AsyncStore,
        holder: &str,
        token: u64,
        last: bool,
        tried: bool,
    ) -> Result<u64> {
        let attempts = if last { RELEASE_ATTEMPTS } else { 1 };
        let mut pause = Duration::from_millis(100);
        let mut attempt = 1;
        // A level above the last is sent once; a last one again only once that is safe.
        if tried
            && (!last
                || !self
                    .repeatable_now_or_later(token, &mut pause, &mut attempt)
                    .await)
        {
            return Err(Error::invalid_state(
                "its only attempt failed without a reply, and it is not sent again",
            ));
        }
        loop {
            let request = self.release_request(store.store(), holder, Some(token));
            let reply = op::exec_single_async(store, || self.address.describe(), request).await;
            match self.retired_reply(token, last, reply, tried || attempt > 1) {
                Err(e) if attempt < attempts && e.is_store_unreachable() => {
                    tracing::debug!("releasing {}: {e}; trying again", self.address.describe());
                    if !self
                        .wait_until_repeatable(token, &mut pause, &mut attempt)
                        .await
                    {
                        return Err(e);
                    }
                }
                released => return released,
            }
        }
    }

    /// Waits (doubling `pause`, counting `attempt`s up to [`RELEASE_ATTEMPTS`]) until the
    /// release of the last level of `token`, whose last attempt failed without a reply, may
    /// be sent again ([`GrantObject::may_repeat`]: a re-entry of the grant on its way has been
    /// answered); false when the attempts ran out first.
    async fn wait_until_repeatable(
        &self,
        token: u64,
        pause: &mut Duration,
        attempt: &mut u32,
    ) -> bool {
        loop {
            tokio::time::sleep(*pause).await;
            *pause *= 2;
            *attempt += 1;
            if !counts(&self.keys().state, token) {
                return true;
            }
            if *attempt >= RELEASE_ATTEMPTS {
                return self.may_repeat(token);
            }
        }
    }

    /// As [`GrantObject::wait_until_repeatable`], at once when no wait is needed (a first
    /// repeat: the caller already waited for its own attempt).
    async fn repeatable_now_or_later(
        &self,
        token: u64,
        pause: &mut Duration,
        attempt: &mut u32,
    ) -> bool {
        !counts(&self.keys().state, token)
            || self.wait_until_repeatable(token, pause, attempt).await
    }

    /// Sends the release of `token`, already taken off the registry ([`retire`]; `last`: its
    /// last level; `tried`: sent once already, without a reply), from a task of the actor
    /// runtime ([`GrantObject::send_retired`]), logging a failure; the caller does not wait.
    pub(crate) fn release_in_background(
        &self,
        holder: String,
        token: u64,
        last: bool,
        tried: bool,
    ) {
        let in_flight = background_release();
        match context::current().and_then(|c| c.async_store()) {
            Ok(store) => {
                let object = self.clone();
                let runtime = store.runtime().clone();
                drop(runtime.spawn(async move {
                    let _in_flight = in_flight;
                    let released = object
                        .send_retired(&store, &holder, token, last, tried)
                        .await;
                    object.report_release(released, last);
                }));
            }
            Err(e) => self.report_release(Err(e), last),
        }
    }

    /// Whether the release of the last level of grant `token`, whose earlier attempt failed
    /// without a reply, may be sent again: only once this process no longer counts the grant
    /// (see [`GrantObject::send_retired`]), which it never counts again after that (a
    /// re-entry names only a grant the registry counts).
    fn may_repeat(&self, token: u64) -> bool {
        let may = !counts(&self.keys().state, token);
        if !may {
            tracing::debug!(
                "releasing {}: not sent again: a re-entry of this hold (fencing token {token}) \
                 was on its way, and may have added a level its owner holds, which a repeat \
                 could take off; a level left in Redis lapses once its owner released all it \
                 holds",
                self.address.describe()
            );
        }
        may
    }

    /// Logs the failure of a release nobody waits for (`last`: of a hold's last level).
    pub(crate) fn report_release(&self, released: Result<u64>, last: bool) {
        match released {
            Ok(_) => {}
            Err(e) if last && e.is_store_unreachable() => tracing::error!(
                "releasing {}: {e}; this process no longer renews the hold: it lapses after the \
                 lease",
                self.address.describe()
            ),
            Err(e) => tracing::error!("releasing {}: {e}", self.address.describe()),
        }
    }

    /// `grants_release.lua` for `holder`, naming its grant `mine` (`None`: it has none).
    fn release_request(&self, store: &Store, holder: &str, mine: Option<u64>) -> Request {
        let keys = self.keys();
        let mut invocation = keys.invocation(&RELEASE, store, lease());
        invocation
            .arg(holder)
            .arg(self.kind.name())
            .arg(mine.map(|g| g.to_string()).unwrap_or_default());
        Request::script("releasing", invocation)
    }

    /// Reads a release's reply; updates the registry (it forgets the grant once it is gone,
    /// or once its owner released every level it counts). The release was marked under way
    /// ([`set_releasing`]): from the request until its reply is read, the heartbeat may find
    /// the grant gone and must not call it lost.
    fn released(&self, mine: Option<u64>, reply: Result<redis::Value>) -> Result<u64> {
        let (released, ended) = self.read_release(mine, reply, false);
        if mine.is_some() {
            let state = self.keys().state;
            if ended {
                forget(&state, mine);
            } else {
                // An RLock released one level, or the release failed.
                settle(&state, mine, released.is_ok());
            }
        }
        released
    }

    /// Reads the reply to the release of `token`, already taken off the registry ([`retire`];
    /// `last`: its last level; `repeat` as in [`GrantObject::read_release`]), and applies it
    /// to the registry: a grant gone from Redis that this process still counts levels of (a
    /// level above the last whose grant lapsed meanwhile) is lost, so that the heartbeat stops
    /// renewing it and its owner's next release reports it.
    fn retired_reply(
        &self,
        token: u64,
        last: bool,
        reply: Result<redis::Value>,
        repeat: bool,
    ) -> Result<u64> {
        let (released, ended) = self.read_release(Some(token), reply, repeat);
        if ended && !lose(&self.keys().state, token) && !last && released.is_err() {
            // A level above the last (an RLock's), refused as its grant is gone, which this
            // process no longer counts: this process ended the grant meanwhile (a `Condition`
            // wait that let go of every level reached Redis first), and this level went with
            // it. A lapse would have left the grant registered (and marked lost).
            tracing::debug!(
                "{}: the hold with fencing token {token} ended before this release of one of \
                 its levels arrived",
                self.address.describe()
            );
            return Ok(0);
        }
        released
    }

    /// Reads a release's reply without touching the registry: the recursion level left (RLock)
    /// or the error, and whether the caller's hold is over (released, lost, or ended by a
    /// refused release). `repeat`: an earlier attempt of this release failed without a reply,
    /// so finding the grant gone is that attempt having gone through, not a lapse.
    fn read_release(
        &self,
        mine: Option<u64>,
        reply: Result<redis::Value>,
        repeat: bool,
    ) -> (Result<u64>, bool) {
        let what = || self.address.describe();
        match op::parse::<Vec<u64>>(reply, "a release") {
            Ok(reply) => {
                let left = reply.get(1).copied().unwrap_or(0);
                if reply.first() == Some(&0) && !repeat {
                    tracing::warn!(
                        "{}: this hold had lapsed; its permit was already returned",
                        what()
                    );
                }
                (Ok(left), left == 0)
            }
            Err(Error::Redis { source, .. }) if repeat && source.code() == Some("LOST") => {
                tracing::debug!("{}: released by an earlier attempt", what());
                (Ok(0), true)
            }
            Err(Error::Redis { source, context }) => {
                let what = what();
                let (message, ended) = match source.code() {
                    Some("LOST") => (
                        format!(
                            "{what} was lost: this hold (fencing token {}) is gone: its lease \
                             lapsed or another process released it, and the lock may have been \
                             granted to someone else",
                            mine.unwrap_or(0)
                        ),
                        true,
                    ),
                    Some("UNLOCKED") => (format!("release of {what}, which is not held"), false),
                    Some("NOTOWNER") => (
                        format!("cannot release {what}: it is held by another thread or process"),
                        false,
                    ),
                    // The script ended this process's hold all the same.
                    Some("TOOMANY") => (
                        format!("{what} released too many times (above its initial value)"),
                        true,
                    ),
                    _ => {
                        let e = self.address.error(Error::Redis { source, context });
                        return (Err(e), false);
                    }
                };
                (Err(Error::invalid_state(message)), ended)
            }
            Err(e) => (Err(self.address.error(e)), false),
        }
    }

    /// Free permits now (`Semaphore.get_value()`; 0 for a held lock), after the permits of dead
    /// holders were reclaimed.
    pub(crate) fn value(&self) -> Result<i64> {
        let store = common::store()?;
        op::run_single(
            &store,
            || self.address.describe(),
            self.value_request(&store),
            |reply| self.value_from(reply),
        )
    }

    /// The async form of [`GrantObject::value`] (one round trip on shoal's actor runtime).
    pub(crate) fn value_async(&self) -> impl Future<Output = Result<i64>> + Send + use<> {
        let object = self.clone();
        async move {
            let store = common::store()?;
            let request = object.value_request(&store);
            let address = object.address.clone();
            op::spawn_single(
                move || address.describe(),
                request,
                move |reply| object.value_from(reply),
            )
            .await
        }
    }

    /// `grants_value.lua`: reclaims lapsed grants, then reads the free permits.
    fn value_request(&self, store: &Store) -> Request {
        Request::script("reading", self.keys().invocation(&VALUE, store, lease()))
    }

    fn value_from(&self, reply: Result<redis::Value>) -> Result<i64> {
        op::parse(reply, "a permit count").map_err(|e| self.address.error(e))
    }

    /// The fencing token of this process's (this thread's, for an RLock) current hold.
    pub(crate) fn token(&self) -> Option<u64> {
        held_grant(&self.keys().state, self.kind)
    }

    /// The recursion levels (1 but for an `RLock`) of grant `token` that this process holds, as
    /// it counts them (see [`GrantObject::record`]); `None` when it is not registered.
    pub(crate) fn levels(&self, token: u64) -> Option<u64> {
        let registry = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
        registry
            .get(&self.keys().state)
            .and_then(|held| held.grants.iter().find(|g| g.token == token))
            .map(|g| g.levels)
    }

    /// Where the hold of grant `token` began: the grant a guard was made with, which a
    /// `Condition` wait replaces with a new grant ([`GrantObject::carry_hold`]). The token
    /// itself when it is not registered.
    pub(crate) fn hold_origin(&self, token: u64) -> u64 {
        let registry = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
        registry
            .get(&self.keys().state)
            .and_then(|held| held.grants.iter().find(|g| g.token == token))
            .map_or(token, |g| g.origin)
    }

    /// The grant `token`, which a `Condition` wait took back after it gave up the hold that
    /// began as `origin`, continues that hold: a guard made with it releases this grant.
    pub(crate) fn carry_hold(&self, origin: u64, token: u64) {
        let mut registry = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(grant) = registry
            .get_mut(&self.keys().state)
            .and_then(|held| held.grants.iter_mut().find(|g| g.token == token))
        {
            grant.origin = origin;
        }
    }

    /// Registers the grant `token` of `holder`, so that the heartbeat renews its lease: a new
    /// grant at one recursion level, or one more level of an `RLock` grant this process already
    /// counts (the only one `grants_acquire.lua` lets its holder re-enter), which a re-entry
    /// on its way keeps registered, also once its owner released every level it held
    /// meanwhile (at 0 levels: [`Held::take_level`]). `reentry`: the grant the acquire named
    /// as a re-entry, now answered ([`Held::end_reentry`]). The levels count what the owner
    /// holds, not what Redis answered, whatever the order in which this level and the
    /// releases of earlier ones, sent from other tasks, reached Redis; a release that never
    /// got there leaves Redis counting more, and the grant lapses once its owner released all
    /// it holds.
    fn record(&self, token: u64, holder: &str, reentry: Option<u64>) {
        let mut registry = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
        let held = registry.entry(self.keys().state).or_insert_with(|| Held {
            object: self.clone(),
            grants: Vec::new(),
        });
        match held.grants.iter_mut().find(|g| g.token == token) {
            // An RLock acquired again: the script gave the grant a lease again.
            Some(grant) => {
                grant.detached = false;
                grant.levels = grant.levels.saturating_add(1);
            }
            // A new grant; or a re-entry of a grant that left the registry meanwhile (ended by
            // its owner's own release, or by a `Condition` wait, that an acquire of the same
            // owner overtook): the owner holds the one level it just took, whatever Redis
            // counts.
            None => held.grants.push(HeldGrant {
                token,
                holder: holder.to_string(),
                origin: token,
                levels: 1,
                reentries: 0,
                lost: false,
                detached: false,
                releasing: false,
            }),
        }
        if let Some(named) = reentry {
            held.end_reentry(named);
        }
        drop(registry);
        start_heartbeat();
    }
}

fn parse_token(bytes: &[u8]) -> Result<u64> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::Codec {
            key: "wake".into(),
            expected: "grant id".into(),
            reason: format!("{bytes:?} is not a grant id"),
        })
}

/// Acquiring a permit (see [`GrantObject::acquire`]): `grants_acquire.lua`, then, while no
/// permit is free, wait slices on the waiter's wake key with a check-in (`grants_wait.lua`)
/// after each, and a last check-in that leaves the queue at the deadline or when the async
/// caller is gone (a grant that reached the waiter meanwhile is kept: Redis rule 3).
pub(crate) struct Acquire {
    object: GrantObject,
    keys: GrantKeys,
    holder: String,
    waiter: String,
    wait: Option<Option<Instant>>,
    state: AcquireState,
    /// The grant this acquire named as a re-entry (RLock) until its reply is read: it keeps
    /// that grant registered meanwhile ([`HeldGrant::reentries`]).
    reentering: Option<u64>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum AcquireState {
    Asking,
    Popping,
    Refreshing,
    GivingUp,
}

impl Acquire {
    /// Acquiring a permit of `object` for `holder`; `wait` as in [`GrantObject::acquire`].
    pub(crate) fn new(object: &GrantObject, holder: String, wait: Option<Option<Instant>>) -> Self {
        Acquire {
            object: object.clone(),
            keys: object.keys(),
            holder,
            waiter: match wait {
                None => String::new(),
                Some(_) => common::waiter_id(),
            },
            wait,
            state: AcquireState::Asking,
            reentering: None,
        }
    }

    /// The re-entry this acquire sent, if any, is no longer on its way, and added no level to
    /// the grant it named.
    fn end_reentry(&mut self) {
        if let Some(token) = self.reentering.take() {
            end_reentry(&self.keys.state, token);
        }
    }

    fn check_in(&mut self, store: &Store, mode: &str) -> Step<Option<Grant>> {
        self.state = match mode {
            "cancel" => AcquireState::GivingUp,
            _ => AcquireState::Refreshing,
        };
        let mut invocation = self.keys.invocation(&WAIT, store, lease());
        invocation
            .arg(&self.holder)
            .arg(&self.waiter)
            .arg(mode)
            .arg(liveness());
        Step::Next(Request::script("waiting for", invocation))
    }

    /// The next wait slice, or the last check-in once the deadline passed.
    fn slice(&mut self, store: &Store) -> Step<Option<Grant>> {
        match next_slice(self.wait.flatten()) {
            None => self.check_in(store, "cancel"),
            Some(block) => {
                self.state = AcquireState::Popping;
                let wake = format!("{}{}", self.keys.wake_prefix, self.waiter);
                Step::Next(Request::pop_wake_up(&wake, block))
            }
        }
    }

    fn granted(&mut self, token: u64, count: u64) -> Step<Option<Grant>> {
        self.object
            .record(token, &self.holder, self.reentering.take());
        Step::Done(Ok(Some(Grant { token, count })))
    }
}

impl Operation for Acquire {
    type Output = Option<Grant>;

    fn describe(&self) -> String {
        self.object.address.describe()
    }

    fn start(&mut self, store: &Store) -> Step<Option<Grant>> {
        self.state = AcquireState::Asking;
        self.end_reentry();
        // An RLock is re-entered only through the grant this process counts for the holder
        // (see `grants_acquire.lua`), which stays registered until the reply is read, also if
        // another task releases its last level meanwhile (see `Held::take_level`).
        let mine = match self.object.kind {
            GrantKind::RLock => reenter(&self.keys.state, &self.holder),
            _ => None,
        };
        self.reentering = mine;
        let mut invocation = self.keys.invocation(&ACQUIRE, store, lease());
        invocation
            .arg(&self.holder)
            .arg(self.object.kind.name())
            .arg(&self.waiter)
            .arg(liveness())
            .arg(mine.map(|g| g.to_string()).unwrap_or_default());
        Step::Next(Request::script("acquiring", invocation))
    }

    fn reply(&mut self, store: &Store, reply: Result<redis::Value>) -> Step<Option<Grant>> {
        let fail = |e: Error| Step::Done(Err(self.object.address.error(e)));
        if self.state == AcquireState::Popping {
            return match op::parse::<Option<Vec<u8>>>(reply, "a wake-up") {
                Err(e) => fail(e),
                Ok(Some(token)) => match parse_token(&token) {
                    Ok(token) => self.granted(token, 1),
                    Err(e) => Step::Done(Err(e)),
                },
                Ok(None) => self.check_in(store, "refresh"),
            };
        }
        let reply = op::parse::<Vec<u64>>(reply, "a grant");
        if let Ok(reply) = &reply
            && reply.first() == Some(&1)
        {
            let token = reply.get(1).copied().unwrap_or(0);
            let count = match self.state {
                AcquireState::Asking => reply.get(2).copied().unwrap_or(1),
                _ => 1,
            };
            return self.granted(token, count);
        }
        // Not granted (or no reply: a re-entry that timed out may still have added a level in
        // Redis, which nobody holds; it lapses once the grant is no longer renewed).
        self.end_reentry();
        if let Err(e) = reply {
            return Step::Done(Err(self.object.address.error(e)));
        }
        match (self.state, self.wait) {
            (AcquireState::Asking, None) | (AcquireState::GivingUp, _) => Step::Done(Ok(None)),
            _ => self.slice(store),
        }
    }

    fn abandon(&mut self, store: &Store) -> Step<Option<Grant>> {
        self.check_in(store, "cancel")
    }
}

impl Drop for Acquire {
    /// An acquire dropped before its reply was read (its task dropped at shutdown) no longer
    /// keeps the grant it named registered.
    fn drop(&mut self) {
        self.end_reentry();
    }
}

/// The lease of every grant, from the configuration.
pub(crate) fn lease() -> Duration {
    context::try_current()
        .map(|c| c.config().sync.lease())
        .unwrap_or(Duration::from_secs(5))
}

/// Grants this process holds, by grant object.
struct Held {
    object: GrantObject,
    grants: Vec<HeldGrant>,
}

struct HeldGrant {
    token: u64,
    holder: String,
    /// The grant the hold began with: this one's token or, when a `Condition` wait took the
    /// lock back for its caller, the origin of the grant the wait gave up. A guard releases
    /// the grant of its origin (and nothing when there is none).
    origin: u64,
    /// Recursion levels (RLock) as this process counts them; 1 otherwise. 0: its owner released
    /// every level it held while a re-entry naming it was on its way (see `reentries`).
    levels: u64,
    /// Re-entries (RLock) sent naming this grant whose reply is not read yet. While there are
    /// any, the grant stays registered, at 0 levels if its owner released the last one
    /// meanwhile: the re-entry may reach Redis before that release (and is then a level of this
    /// grant) or after it (and then takes a new grant).
    reentries: u32,
    /// The heartbeat found it gone; release reports it.
    lost: bool,
    /// Its lease was taken off at a clean exit (`grants_detach.lua`): not renewed any more.
    detached: bool,
    /// A release of it is under way: a heartbeat that finds it gone meanwhile saw the release,
    /// not a lapse (the registry forgets it once the release's reply is read).
    releasing: bool,
}

static REGISTRY: LazyLock<Mutex<HashMap<String, Held>>> = LazyLock::new(Default::default);

/// The grant this process (this thread or task, for an RLock) holds on the object, newest first.
fn held_grant(state: &str, kind: GrantKind) -> Option<u64> {
    let holder = (kind == GrantKind::RLock).then(|| kind.holder());
    grant_of(state, holder.as_deref())
}

/// The newest grant this process holds on the object for `holder` (`None`: for anyone). A grant
/// at 0 levels (see [`HeldGrant::reentries`]) is not held: its owner released all it held.
fn grant_of(state: &str, holder: Option<&str>) -> Option<u64> {
    let registry = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    let held = registry.get(state)?;
    held.grants
        .iter()
        .rev()
        .find(|g| g.levels > 0 && holder.is_none_or(|h| g.holder == h))
        .map(|g| g.token)
}

/// The grant an `RLock`'s `holder` re-enters (see `grants_acquire.lua`): the newest this
/// process registers for it, also one at 0 levels whose earlier re-entry is still on its way
/// (naming another grant, or none, would have the owner wait for itself should that re-entry
/// reach the grant first). Counted as named by a re-entry on its way
/// ([`HeldGrant::reentries`]) until the reply is read ([`GrantObject::record`],
/// [`end_reentry`]).
fn reenter(state: &str, holder: &str) -> Option<u64> {
    let mut registry = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    let grant = registry
        .get_mut(state)?
        .grants
        .iter_mut()
        .rev()
        .find(|g| g.holder == holder)?;
    grant.reentries = grant.reentries.saturating_add(1);
    Some(grant.token)
}

/// A re-entry that named the grant `token` is no longer on its way and did not add a level to
/// it (it took a new grant, queued, failed, or was never answered): see [`Held::end_reentry`].
fn end_reentry(state: &str, token: u64) {
    let mut registry = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(held) = registry.get_mut(state) {
        held.end_reentry(token);
    }
    remove_if_empty(&mut registry, state);
}

/// Whether this process registers the grant `token` (at any level, lost or not).
fn counts(state: &str, token: u64) -> bool {
    let registry = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    registry
        .get(state)
        .is_some_and(|held| held.grants.iter().any(|g| g.token == token))
}

/// Forgets the grant object `state` once this process registers no grant of it.
fn remove_if_empty(registry: &mut HashMap<String, Held>, state: &str) {
    if registry
        .get(state)
        .is_some_and(|held| held.grants.is_empty())
    {
        registry.remove(state);
    }
}

impl Held {
    /// Takes one recursion level off the grant at `index`; whether that was the last level its
    /// owner held. The grant then leaves the registry, unless a re-entry naming it is on its
    /// way: it stays, at 0 levels, until that re-entry's reply is read, as the re-entry may
    /// reach Redis before the release of this level and add a level to this grant that its
    /// owner holds (Redis counts levels in the order the two arrive, so the release takes off
    /// the level let go of here, not the new one); meanwhile the release is not sent again
    /// ([`GrantObject::send_retired`]).
    fn take_level(&mut self, index: usize) -> bool {
        let grant = &mut self.grants[index];
        grant.levels = grant.levels.saturating_sub(1);
        if grant.levels > 0 {
            return false;
        }
        if grant.reentries == 0 {
            self.grants.remove(index);
        }
        true
    }

    /// A re-entry that named `token` is no longer on its way without adding a level to it: a
    /// grant at 0 levels with none left on its way leaves the registry (the release of its
    /// last level is sent; should it never arrive, the grant lapses, no longer renewed).
    fn end_reentry(&mut self, token: u64) {
        let Some(index) = self.grants.iter().position(|g| g.token == token) else {
            return;
        };
        let grant = &mut self.grants[index];
        grant.reentries = grant.reentries.saturating_sub(1);
        if grant.levels == 0 && grant.reentries == 0 {
            self.grants.remove(index);
        }
    }
}

/// Marks a grant of this process as being released (or no longer: the release failed).
fn set_releasing(state: &str, token: Option<u64>, releasing: bool) {
    let Some(token) = token else {
        return;
    };
    let mut registry = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(grant) = registry
        .get_mut(state)
        .and_then(|held| held.grants.iter_mut().find(|g| g.token == token))
    {
        grant.releasing = releasing;
    }
}

/// Sets what a release that did not end the grant `token` left: no longer under way, and, when
/// it went through (`released`: an RLock released one level), one level fewer. Levels count
/// what the owner holds (see [`GrantObject::record`]), not what Redis answered, which another
/// release of the grant on its way may not have reached yet: the grant leaves the registry
/// with the owner's last level, and then lapses if Redis still counts levels (of releases that
/// never reached it).
fn settle(state: &str, token: Option<u64>, released: bool) {
    let Some(token) = token else {
        return;
    };
    let mut registry = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    let Some(held) = registry.get_mut(state) else {
        return;
    };
    let Some(index) = held.grants.iter().position(|g| g.token == token) else {
        return;
    };
    held.grants[index].releasing = false;
    if !released {
        return;
    }
    held.take_level(index);
    remove_if_empty(&mut registry, state);
}

/// Marks the grant `token`, gone from Redis, as lost if this process still counts it (see
/// [`GrantObject::retired_reply`]); whether it does. A grant at 0 levels (see
/// [`HeldGrant::reentries`]) holds nothing that could be lost: it leaves the registry, and a
/// re-entry naming it still on its way finds it gone in Redis and takes a new grant.
fn lose(state: &str, token: u64) -> bool {
    let mut registry = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    let Some(held) = registry.get_mut(state) else {
        return false;
    };
    let Some(index) = held.grants.iter().position(|g| g.token == token) else {
        return false;
    };
    if held.grants[index].levels == 0 {
        held.grants.remove(index);
        remove_if_empty(&mut registry, state);
    } else {
        held.grants[index].lost = true;
    }
    true
}

/// Takes one recursion level of the first registered grant that `pick` chooses off this
/// process's registry, ahead of a release that nobody may see fail (an undo, a guard): its
/// token, and whether that was its last level (the grant left the registry). A release sent
/// after this can fail without the hold being renewed for good: the heartbeat no longer
/// renews a grant the registry forgot, so its lease lapses; and later calls in this process
/// do not take its token for theirs meanwhile. An `RLock` grant with levels left stays
/// registered (its owner still holds it), and so does one whose last level this was while a
/// re-entry naming it is on its way ([`Held::take_level`]), until that re-entry's reply is
/// read. `None`: no such grant (a grant at 0 levels has none to take).
fn retire(state: &str, pick: impl Fn(&HeldGrant) -> bool) -> Option<(u64, bool)> {
    let mut registry = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    let held = registry.get_mut(state)?;
    let index = held.grants.iter().position(|g| g.levels > 0 && pick(g))?;
    let token = held.grants[index].token;
    let last = held.take_level(index);
    remove_if_empty(&mut registry, state);
    Some((token, last))
}

/// Drops a grant from this process's registry (released by a script).
pub(crate) fn forget(state: &str, token: Option<u64>) {
    let Some(token) = token else {
        return;
    };
    let mut registry = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(held) = registry.get_mut(state) {
        held.grants.retain(|g| g.token != token);
        if held.grants.is_empty() {
            registry.remove(state);
        }
    }
}

/// Puts the renewal of this process's leases on its heartbeat, and registers the exit hook that
/// keeps the holds of a process that exits normally (once).
fn start_heartbeat() {
    static STARTED: Once = Once::new();
    STARTED.call_once(|| {
        context::register_exit_hook(detach_all);
        common::on_heartbeat(renew_all);
    });
}

fn renew_all() {
    let Ok(store) = common::store() else {
        return;
    };
    let work: Vec<(GrantObject, Vec<u64>)> = {
        let registry = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
        registry
            .values()
            .map(|h| {
                let live = h
                    .grants
                    .iter()
                    .filter(|g| !g.lost && !g.detached)
                    .map(|g| g.token)
                    .collect();
                (h.object.clone(), live)
            })
            .collect()
    };
    for (object, tokens) in work {
        if tokens.is_empty() {
            continue;
        }
        let keys = object.keys();
        let lost: Result<Vec<u64>> = store.with_conn(
            || format!("renewing the lease of {}", object.address.describe()),
            |c| {
                let mut invocation = keys.invocation(&RENEW, &store, lease());
                invocation.arg(process_holder());
                for token in &tokens {
                    invocation.arg(*token);
                }
                invocation.invoke(c)
            },
        );
        match lost {
            Ok(lost) if !lost.is_empty() => {
                // A hold released meanwhile by this process is not lost: only those still
                // recorded are.
                let mut registry = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(held) = registry.get_mut(&keys.state) {
                    let lost_now = held.grants.iter_mut().filter(|g| {
                        // A grant at 0 levels found gone: the release of its last level
                        // went through (or it lapsed), and nobody holds it.
                        g.levels > 0 && !g.detached && !g.releasing && lost.contains(&g.token)
                    });
                    for grant in lost_now {
                        tracing::warn!(
                            "{}: the hold with fencing token {} lapsed or was released by \
                             another process",
                            object.address.describe(),
                            grant.token
                        );
                        grant.lost = true;
                    }
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("{e}"),
        }
    }
}

/// Releases nobody waits for under way on the actor runtime ([`background_release`]).
static BACKGROUND_RELEASES: common::BackgroundWork =
    common::BackgroundWork::new("releases of locks or semaphores");

/// Counts a release nobody waits for (a dropped guard's, an undo's, a repeat of a failed one, a
/// `Guard::release_async` whose future may be dropped) from when it is handed to the actor
/// runtime until it ends, however it ends: move the result into the task (dropped with it, also
/// when the runtime drops the task unrun). The exit hook waits for those under way
/// ([`detach_all`]).
pub(crate) fn background_release() -> common::InFlight {
    BACKGROUND_RELEASES.start()
}

/// Waits, a lease at most, for the releases nobody waits for still under way, so that a process
/// that exits right after it dropped a guard (or a pool worker that reports its task) leaves
/// the lock free rather than held until the lease lapses.
fn await_background_releases() {
    BACKGROUND_RELEASES.wait(lease());
}

/// The exit hook: waits for the releases under way in the background
/// ([`await_background_releases`]), then takes the lease off every grant this process still
/// holds, so that its holds outlive it (see the module docs). Idempotent; a failure leaves the
/// holds to lapse.
///
/// In a thread child (a pool worker thread of its driver, which runs the hooks after each batch
/// of tasks) it only waits for the releases: the grants are the whole process's, which goes on
/// (its other threads' holds must keep their lease).
fn detach_all() {
    await_background_releases();
    if context::in_thread_process() {
        return;
    }
    let work: Vec<(GrantObject, Vec<u64>)> = {
        let registry = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
        registry
            .values()
            .map(|h| {
                // A grant at 0 levels is released (its release is on its way or failed): it
                // must not outlive this process.
                let held = h
                    .grants
                    .iter()
                    .filter(|g| g.levels > 0 && !g.lost && !g.detached)
                    .map(|g| g.token)
                    .collect::<Vec<u64>>();
                (h.object.clone(), held)
            })
            .filter(|(_, held)| !held.is_empty())
            .collect()
    };
    if work.is_empty() {
        return;
    }
    let store = match common::store() {
        Ok(store) => store,
        Err(e) => {
            tracing::warn!("keeping this process's holds after it exits: {e}; they will lapse");
            return;
        }
    };
    for (object, tokens) in work {
        let keys = object.keys();
        let detached: Result<Vec<u64>> = store.with_conn(
            || {
                format!(
                    "keeping the holds of {} after exit",
                    object.address.describe()
                )
            },
            |c| {
                let mut invocation = keys.invocation(&DETACH, &store, lease());
                invocation.arg(process_holder());
                for token in &tokens {
                    invocation.arg(*token);
                }
                invocation.invoke(c)
            },
        );
        match detached {
            Ok(detached) => {
                let mut registry = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(held) = registry.get_mut(&keys.state) {
                    for grant in held.grants.iter_mut() {
                        if detached.contains(&grant.token) {
                            grant.detached = true;
                        } else if tokens.contains(&grant.token) {
                            grant.lost = true;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!("{e}; these holds will lapse after the lease"),
        }
    }
}
