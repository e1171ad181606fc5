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
//! follows the release always finds the waiter queued. A queued waiter checks in every second;
//! one that missed its check-ins for three seconds (dead, or stopped, or cut off for a while)
//! does not count for `notify(n)`, but it is woken all the same, as it may still be alive: it
//! would otherwise queue itself again at its next check-in, and the notification would have gone
//! to nobody. Alive, it returns from `wait` as notified (a spurious wake-up, which
//! [`Condition::wait_for`] absorbs by testing its predicate again); dead, its wake key expires.
//!
//! # Keys
//!
//! Under the lock's hash tag (so one script touches both): `cond:<id>:waiters` (list),
//! `cond:<id>:waiting` (hash: waiter → liveness deadline, ms on Redis's clock),
//! `cond:<id>:wake:<waiter>`; the lock's own keys as in `grants.rs`.
//!
//! # Round trips
//!
//! `wait`: 1 (queue and release) + a `BLPOP` that returns at the notify (plus one check-in per
//! second) + the lock's acquire (1 when free; one per recursion level of an `RLock`).
//! `notify`/`notify_all`: 1.
//!
//! # Async forms
//!
//! [`Condition::wait_async`] and [`Condition::wait_for_async`] (whose predicate stays a plain
//! closure, evaluated with the lock held), [`Condition::notify_async`] and
//! [`Condition::notify_all_async`] (which, like `notify`, need the lock held by the task or
//! thread that polls them), and the lock's `acquire_async`, `lock_async`...
//! (see `lock.rs`), run the same round trips as tasks on shoal's actor runtime and hand the
//! result back through a oneshot channel; any executor can await them and no thread is parked.
//! The owner of a condition's `RLock` is the task (or thread) that polls the future, as for the
//! lock itself.
//!
//! Dropping a `wait_async` future: the lock was released when the wait began, and the caller no
//! longer holds it (it cannot be taken back in a destructor); a [`Guard`](crate::Guard) the
//! lock was held with then holds nothing, and dropping it releases nothing (never the hold
//! another caller took meanwhile), as after a `wait` that failed once it had let go of the
//! lock. Before its next wait slice (within a second) the task leaves the waiters' queue; a
//! notification that reached it, before or after that, is passed on to the next waiter
//! (`waiters_wake.lua`), so a `notify(1)` is not lost on a dropped waiter (after a
//! `notify_all`, that is a spurious wake-up of a later waiter, which `wait_for` absorbs); and
//! the lock, if it was being taken back, is released again (every recursion level taken).

use std::future::Future;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shoal_core::error::{Error, Result};
use shoal_core::store::Store;

use crate::common::{self, deadline, hold_methods, liveness, now_ms};
use crate::event::{WaitList, WakeWait, Woke};
use crate::grants::{self, Acquire, GrantKeys, GrantObject};
use crate::lock::{Lock, RLock};
use crate::op::{self, Operation, Request, Step};

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

    fn waiters(&self) -> WaitList {
        let keys = self.object().address.keys();
        let lock = self.object().keys();
        WaitList {
            waiters: keys.key(&format!("cond:{}:waiters", self.id)),
            waiting: keys.key(&format!("cond:{}:waiting", self.id)),
            wake_prefix: keys.key(&format!("cond:{}:wake:", self.id)),
            // The lock, which the waiter gave up and takes again after the wait.
            keep_alive: vec![lock.state, lock.holders, lock.fence],
        }
    }

    hold_methods!("the lock");

    /// Releases the lock.
    pub fn release(&self) -> Result<()> {
        self.object().release().map(|_| ())
    }

    /// The async form of [`Condition::release`] (1 round trip on shoal's actor runtime).
    pub fn release_async(&self) -> impl Future<Output = Result<()>> + Send + use<> {
        self.object().release_current_async()
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
        let holder = grants::holder(self.object().kind);
        op::run(&store, &mut CondWait::new(self, holder, token, timeout)).map(|w| w.notified)
    }

    /// The async form of [`Condition::wait`], for the task (or thread) that polls it, which
    /// must hold the lock; `timeout` runs from the first poll. See the module docs for a
    /// dropped future.
    pub fn wait_async(
        &self,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<bool>> + Send + use<> {
        let condition = self.clone();
        async move {
            let token = condition.held_token("wait")?;
            let holder = grants::holder(condition.object().kind);
            let waiting = CondWait::new(&condition, holder, token, timeout);
            let object = condition.object().clone();
            let waiters = condition.waiters();
            let undo: op::Undo<CondWaited> = Box::new(move |store, waited| {
                Box::pin(async move {
                    if waited.notified {
                        // Nobody acts on this notification: the next waiter gets it.
                        let request = waiters.wake(store.store(), 1);
                        op::undo_request(&store, || object.address.describe(), request).await;
                    }
                    // Every level taken back is released again (nobody holds it now).
                    if let Some(token) = waited.token {
                        for _ in 0..waited.levels {
                            object
                                .release_detached(&store, waited.holder.clone(), token)
                                .await;
                        }
                    }
                })
            });
            Ok(op::spawn(waiting, Some(undo)).await?.notified)
        }
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
            let Some(left) = time_left(end) else { break };
            self.wait(left)?;
            result = predicate();
        }
        Ok(result)
    }

    /// The async form of [`Condition::wait_for`]: the predicate is a plain closure, evaluated
    /// with the lock held on the polling task; each wait is [`Condition::wait_async`].
    pub fn wait_for_async<P: FnMut() -> bool>(
        &self,
        mut predicate: P,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<bool>> + use<P> {
        let condition = self.clone();
        async move {
            let end = deadline(timeout);
            let mut result = predicate();
            while !result {
                let Some(left) = time_left(end) else { break };
                condition.wait_async(left).await?;
                result = predicate();
            }
            Ok(result)
        }
    }

    /// Wakes up to `n` waiters.
    pub fn notify(&self, n: usize) -> Result<()> {
        self.wake(n as i64)
    }

    /// Wakes every waiter.
    pub fn notify_all(&self) -> Result<()> {
        self.wake(-1)
    }

    /// The async form of [`Condition::notify`]: the task (or thread) that polls it must hold
    /// the lock ([`Error::InvalidState`] otherwise, as for `notify`); one round trip on shoal's
    /// actor runtime. A notify whose future is dropped still happens if it was under way.
    pub fn notify_async(&self, n: usize) -> impl Future<Output = Result<()>> + Send + use<> {
        self.wake_async(n as i64)
    }

    /// The async form of [`Condition::notify_all`] (see [`Condition::notify_async`]).
    pub fn notify_all_async(&self) -> impl Future<Output = Result<()>> + Send + use<> {
        self.wake_async(-1)
    }

    fn wake(&self, n: i64) -> Result<()> {
        let token = self.held_token("notify")?;
        let store = common::store()?;
        let object = self.object();
        op::run_single(
            &store,
            || object.address.describe(),
            self.wake_request(&store, token, n),
            |reply| woken(object, reply),
        )
    }

    /// The async form of [`Condition::wake`]: the lock's holder is the task (or thread) that
    /// polls the future, as for [`Condition::wait_async`].
    fn wake_async(&self, n: i64) -> impl Future<Output = Result<()>> + Send + use<> {
        let condition = self.clone();
        async move {
            let token = condition.held_token("notify")?;
            let store = common::store()?;
            let request = condition.wake_request(&store, token, n);
            let object = condition.object().clone();
            let address = object.address.clone();
            op::spawn_single(
                move || address.describe(),
                request,
                move |reply| woken(&object, reply),
            )
            .await
        }
    }

    /// `condition_notify.lua`: wakes up to `n` waiters (-1: all), checking in the same script
    /// that the caller (holder of grant `token`) holds the lock.
    fn wake_request(&self, store: &Store, token: u64, n: i64) -> Request {
        let object = self.object();
        let waiters = self.waiters();
        let mut invocation = object.keys().invocation(&NOTIFY, store, grants::lease());
        invocation
            .key(&waiters.waiters)
            .key(&waiters.waiting)
            .arg(grants::holder(object.kind))
            .arg(token)
            .arg(n)
            .arg(&waiters.wake_prefix);
        Request::script("notifying a condition of", invocation)
    }
}

/// Reads the reply to [`Condition::wake_request`].
fn woken(object: &GrantObject, reply: Result<redis::Value>) -> Result<()> {
    op::parse::<u64>(reply, "a wake count")
        .map(|_| ())
        .map_err(|e| grants::map_hold_error(object, e))
}

/// The time left until `end`: `Some(None)` without an end, `None` once it passed.
fn time_left(end: Option<Instant>) -> Option<Option<Duration>> {
    match end {
        None => Some(None),
        Some(end) => {
            let left = end.saturating_duration_since(Instant::now());
            (!left.is_zero()).then_some(Some(left))
        }
    }
}

/// What a condition wait did.
struct CondWaited {
    notified: bool,
    /// Recursion levels of the lock taken back (all of them unless the async caller left).
    levels: u64,
    /// The grant taken back.
    token: Option<u64>,
    holder: String,
}

/// `Condition::wait`: `condition_wait.lua` (queue the waiter and release the lock, in one
/// step), a [`WakeWait`] until notified or the deadline, then the lock taken back, one
/// [`Acquire`] per recursion level. An async caller that left: the wait is cancelled and a
/// notification that reached it passed on; an acquire under way gives up (see the module docs).
struct CondWait {
    object: GrantObject,
    lock_keys: GrantKeys,
    waiters: WaitList,
    holder: String,
    token: u64,
    /// Where the caller's hold began (`GrantObject::hold_origin`): the grant taken back
    /// continues it, so a guard made with that hold releases the new grant.
    origin: u64,
    waiter: String,
    timeout: Option<Duration>,
    /// Recursion levels held before the wait, to take back.
    count: u64,
    /// Recursion levels this process counts for the caller's grant when the wait began.
    levels: Option<u64>,
    phase: CondPhase,
    done: CondWaited,
    abandoned: bool,
}

enum CondPhase {
    Queueing,
    Waiting(WakeWait<()>),
    PassingOn,
    Reacquiring(Acquire),
}

impl CondWait {
    fn new(condition: &Condition, holder: String, token: u64, timeout: Option<Duration>) -> Self {
        let object = condition.object().clone();
        CondWait {
            lock_keys: object.keys(),
            object,
            waiters: condition.waiters(),
            holder: holder.clone(),
            token,
            origin: condition.object().hold_origin(token),
            levels: condition.object().levels(token),
            waiter: common::waiter_id(),
            timeout,
            count: 1,
            phase: CondPhase::Queueing,
            done: CondWaited {
                notified: false,
                levels: 0,
                token: None,
                holder,
            },
            abandoned: false,
        }
    }

    fn finish(&mut self) -> Step<CondWaited> {
        let done = CondWaited {
            holder: self.holder.clone(),
            ..std::mem::replace(
                &mut self.done,
                CondWaited {
                    notified: false,
                    levels: 0,
                    token: None,
                    holder: String::new(),
                },
            )
        };
        Step::Done(Ok(done))
    }

    /// Takes the next recursion level of the lock back.
    fn reacquire(&mut self, store: &Store) -> Step<CondWaited> {
        let mut acquire = Acquire::new(&self.object, self.holder.clone(), Some(None));
        let step = acquire.start(store);
        self.phase = CondPhase::Reacquiring(acquire);
        self.after_acquire(store, step)
    }

    fn after_acquire(
        &mut self,
        store: &Store,
        step: Step<Option<grants::Grant>>,
    ) -> Step<CondWaited> {
        match step {
            Step::Next(request) => Step::Next(request),
            Step::Done(Err(e)) => Step::Done(Err(e)),
            Step::Done(Ok(grant)) => {
                if let Some(grant) = grant {
                    // The caller's guard releases it from now on (if the async caller left,
                    // the guard's drop or the undo, whichever comes first, releases each
                    // level: the registry hands a level to one of them).
                    self.object.carry_hold(self.origin, grant.token);
                    self.done.levels += 1;
                    self.done.token = Some(grant.token);
                }
                if self.abandoned || grant.is_none() || self.done.levels >= self.count.max(1) {
                    self.finish()
                } else {
                    self.reacquire(store)
                }
            }
        }
    }

    fn after_wait(&mut self, store: &Store, step: Step<Woke>) -> Step<CondWaited> {
        match step {
            Step::Next(request) => Step::Next(request),
            Step::Done(Err(e)) => Step::Done(Err(self.object.address.error(e))),
            Step::Done(Ok(woke)) if self.abandoned => {
                if woke.woken {
                    // Nobody will act on this notification: the next waiter gets it.
                    self.phase = CondPhase::PassingOn;
                    Step::Next(self.waiters.wake(store, 1))
                } else {
                    self.finish()
                }
            }
            Step::Done(Ok(woke)) => {
                self.done.notified = woke.woken;
                self.reacquire(store)
            }
        }
    }
}

impl Operation for CondWait {
    type Output = CondWaited;

    fn describe(&self) -> String {
        self.object.address.describe()
    }

    fn start(&mut self, store: &Store) -> Step<CondWaited> {
        let mut invocation = self.lock_keys.invocation(&WAIT, store, grants::lease());
        invocation
            .key(&self.waiters.waiters)
            .key(&self.waiters.waiting)
            .arg(&self.holder)
            .arg(self.token)
            .arg(&self.waiter)
            // How long the waiter counts as alive without checking in: the script records the
            // deadline on Redis's clock.
            .arg(liveness().saturating_sub(now_ms()));
        Step::Next(Request::script("waiting on a condition of", invocation))
    }

    fn reply(&mut self, store: &Store, reply: Result<redis::Value>) -> Step<CondWaited> {
        match &mut self.phase {
            CondPhase::Queueing => match op::parse::<u64>(reply, "a recursion count") {
                Err(e) => Step::Done(Err(grants::map_hold_error(&self.object, e))),
                Ok(count) => {
                    // The levels its owner holds, as its process counts them: Redis may count
                    // more while a release of one is on its way (sent by a dropped guard); the
                    // wait just ended the grant, so that release takes nothing off, and the
                    // owner gets back what it holds.
                    self.count = self.levels.unwrap_or(count);
                    grants::forget(&self.lock_keys.state, Some(self.token));
                    let mut waiting = WakeWait::new(
                        self.waiters.clone(),
                        std::mem::take(&mut self.waiter),
                        deadline(self.timeout),
                        (),
                    );
                    let step = waiting.start(store);
                    self.phase = CondPhase::Waiting(waiting);
                    self.after_wait(store, step)
                }
            },
            CondPhase::Waiting(waiting) => {
                let step = waiting.reply(store, reply);
                self.after_wait(store, step)
            }
            CondPhase::PassingOn => {
                if let Err(e) = reply {
                    tracing::warn!("passing on a notification of a dropped wait: {e}");
                }
                self.finish()
            }
            CondPhase::Reacquiring(acquire) => {
                let step = acquire.reply(store, reply);
                self.after_acquire(store, step)
            }
        }
    }

    fn abandon(&mut self, store: &Store) -> Step<CondWaited> {
        self.abandoned = true;
        match &mut self.phase {
            CondPhase::Waiting(waiting) => {
                let step = waiting.cancel(store);
                self.after_wait(store, step)
            }
            CondPhase::Reacquiring(acquire) => {
                let step = acquire.abandon(store);
                self.after_acquire(store, step)
            }
            // No blocking request is sent in these phases.
            CondPhase::Queueing | CondPhase::PassingOn => self.finish(),
        }
    }
}
