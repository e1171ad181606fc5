//! `Event`: a flag processes wait for, Python's `multiprocessing.Event`.
//!
//! # Semantics
//!
//! The flag starts false. [`Event::set`] makes it true and wakes every waiter;
//! [`Event::clear`] makes it false; [`Event::is_set`] reads it; [`Event::wait`] returns at once
//! when it is true, otherwise blocks until it is set or the timeout passes, and returns the flag
//! (true when set, false after a timeout).
//!
//! # Keys (hash tag `{<ns>:event:<id>}`)
//!
//! `state` (hash: `flag` `0`/`1`), `waiters` (list), `waiting` (hash: waiter → liveness
//! deadline), `wake:<waiter>` (list).
//!
//! # Round trips
//!
//! `set`, `clear`, `is_set`: 1. `wait` when set: 1. `wait` that blocks: 1 to queue, then a
//! `BLPOP` that returns at the `set` (plus one check-in and one read of the flag per second of
//! waiting, and 1 to leave the queue after a timeout).
//!
//! # Async forms
//!
//! [`Event::set_async`], [`Event::clear_async`] and [`Event::is_set_async`] send the same
//! single script (or command) from shoal's actor runtime, on its shared multiplexed connection,
//! and hand the reply back through a oneshot channel; a set or clear whose future is dropped
//! happens or not, depending on whether it was sent already, never twice.
//!
//! [`Event::wait_async`] runs the same round trips as a task on shoal's actor runtime (the
//! `BLPOP` on a dedicated connection of that runtime) and hands the result back through a
//! oneshot channel: any executor can await it and no thread is parked for it. Dropping its
//! future makes the task leave the waiters' queue before its next wait slice (within a second);
//! a wake-up it consumed meanwhile concerns nobody else (`set` wakes every waiter), so there is
//! nothing to give back.

use std::future::Future;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shoal_core::error::Result;
use shoal_core::store::Store;

use crate::common::{self, Address, liveness, next_slice, now_ms, ttl};
use crate::op::{self, Operation, Request, Step};

static BEGIN: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("event_begin.lua")));
static SET: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("event_set.lua")));
static CHECK_IN: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("waiters.lua")));
static WAKE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("waiters_wake.lua")));

/// A flag shared by processes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Event {
    address: Address,
}

struct Keys {
    state: String,
    waiters: WaitList,
}

impl Event {
    /// A new event, not set.
    pub fn new() -> Result<Event> {
        let (context, address) = Address::create("event")?;
        let event = Event { address };
        let keys = event.keys();
        let store = context.store();
        store
            .with_conn(
                || format!("creating {}", event.address.describe()),
                |c| {
                    redis::pipe()
                        .hset(&keys.state, "flag", 0)
                        .ignore()
                        .expire(&keys.state, ttl(store) as i64)
                        .ignore()
                        .query::<()>(c)
                },
            )
            .map_err(|e| event.address.error(e))?;
        Ok(event)
    }

    fn keys(&self) -> Keys {
        let keys = self.address.keys();
        let state = keys.key("state");
        Keys {
            waiters: WaitList {
                waiters: keys.key("waiters"),
                waiting: keys.key("waiting"),
                wake_prefix: keys.key("wake:"),
                keep_alive: vec![state.clone()],
            },
            state,
        }
    }

    /// Sets the flag and wakes every waiter.
    pub fn set(&self) -> Result<()> {
        self.write_flag("1")
    }

    /// Clears the flag.
    pub fn clear(&self) -> Result<()> {
        self.write_flag("0")
    }

    /// The async form of [`Event::set`]: the same script, one round trip on shoal's actor
    /// runtime; any executor can await it. A set whose future is dropped still happens if it
    /// was under way.
    pub fn set_async(&self) -> impl Future<Output = Result<()>> + Send + use<> {
        self.write_flag_async("1")
    }

    /// The async form of [`Event::clear`] (one round trip on shoal's actor runtime).
    pub fn clear_async(&self) -> impl Future<Output = Result<()>> + Send + use<> {
        self.write_flag_async("0")
    }

    fn write_flag(&self, flag: &str) -> Result<()> {
        let store = common::store()?;
        op::run_single(
            &store,
            || self.address.describe(),
            self.write_flag_request(&store, flag),
            |reply| self.flag_written(reply),
        )
    }

    fn write_flag_async(
        &self,
        flag: &'static str,
    ) -> impl Future<Output = Result<()>> + Send + use<> {
        let event = self.clone();
        async move {
            let store = common::store()?;
            let request = event.write_flag_request(&store, flag);
            let address = event.address.clone();
            op::spawn_single(
                move || address.describe(),
                request,
                move |reply| event.flag_written(reply),
            )
            .await
        }
    }

    /// `event_set.lua`: writes `flag`; setting it wakes every waiter.
    fn write_flag_request(&self, store: &Store, flag: &str) -> Request {
        let keys = self.keys();
        let mut invocation = SET.prepare_invoke();
        invocation
            .key(&keys.state)
            .key(&keys.waiters.waiters)
            .key(&keys.waiters.waiting)
            .arg(ttl(store))
            .arg(&keys.waiters.wake_prefix)
            .arg(flag);
        Request::script("setting", invocation)
    }

    fn flag_written(&self, reply: Result<redis::Value>) -> Result<()> {
        op::parse::<u64>(reply, "a wake count")
            .map(|_| ())
            .map_err(|e| self.address.error(e))
    }

    /// Whether the flag is set.
    pub fn is_set(&self) -> Result<bool> {
        let store = common::store()?;
        let keys = self.keys();
        op::run_single(
            &store,
            || self.address.describe(),
            read_flag_request(&keys.state),
            |reply| self.read_flag(&keys.state, reply),
        )
    }

    /// The async form of [`Event::is_set`] (one round trip on shoal's actor runtime).
    pub fn is_set_async(&self) -> impl Future<Output = Result<bool>> + Send + use<> {
        let event = self.clone();
        async move {
            let state = event.keys().state;
            let request = read_flag_request(&state);
            let address = event.address.clone();
            op::spawn_single(
                move || address.describe(),
                request,
                move |reply| event.read_flag(&state, reply),
            )
            .await
        }
    }

    fn read_flag(&self, state: &str, reply: Result<redis::Value>) -> Result<bool> {
        let flag: Option<String> =
            op::parse(reply, "an event flag").map_err(|e| self.address.error(e))?;
        match flag.as_deref() {
            Some("1") => Ok(true),
            Some("0") => Ok(false),
            None => Err(self.address.gone()),
            Some(other) => Err(shoal_core::Error::Codec {
                key: state.to_string(),
                expected: "event flag".into(),
                reason: format!("{other:?} is not 0 or 1"),
            }),
        }
    }

    /// Waits until the flag is set, at most `timeout`; returns the flag.
    pub fn wait(&self, timeout: Option<Duration>) -> Result<bool> {
        let store = common::store()?;
        op::run(&store, &mut EventWait::new(self, timeout))
    }

    /// The async form of [`Event::wait`]: waits on shoal's actor runtime, without blocking the
    /// caller's thread; `timeout` runs from the first poll. Any executor can await it.
    pub fn wait_async(
        &self,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<bool>> + Send + use<> {
        let event = self.clone();
        async move { op::spawn(EventWait::new(&event, timeout), None).await }
    }
}

fn read_flag_request(state: &str) -> Request {
    let mut cmd = redis::cmd("HGET");
    cmd.arg(state).arg("flag");
    Request::cmd("reading", cmd)
}

/// `Event::wait`: `event_begin.lua` (set already, or queue the waiter), then a [`WakeWait`]
/// that also reads the flag after each check-in (a `set` that found this waiter dropped after a
/// stalled slice woke nobody; a deleted event is reported there too).
struct EventWait {
    event: Event,
    keys: Keys,
    waiter: String,
    timeout: Option<Duration>,
    waiting: Option<WakeWait<FlagRecheck>>,
}

struct FlagRecheck {
    event: Event,
    state: String,
}

impl Recheck for FlagRecheck {
    fn request(&self, _: &Store) -> Option<Request> {
        Some(read_flag_request(&self.state))
    }

    fn read(&self, reply: Result<redis::Value>) -> Result<bool> {
        self.event.read_flag(&self.state, reply)
    }
}

impl EventWait {
    fn new(event: &Event, timeout: Option<Duration>) -> EventWait {
        EventWait {
            event: event.clone(),
            keys: event.keys(),
            waiter: common::waiter_id(),
            timeout,
            waiting: None,
        }
    }
}

impl Operation for EventWait {
    type Output = bool;

    fn describe(&self) -> String {
        self.event.address.describe()
    }

    fn start(&mut self, store: &Store) -> Step<bool> {
        let mut invocation = BEGIN.prepare_invoke();
        invocation
            .key(&self.keys.state)
            .key(&self.keys.waiters.waiters)
            .key(&self.keys.waiters.waiting)
            .arg(now_ms())
            .arg(ttl(store))
            .arg(&self.waiter)
            .arg(liveness());
        Step::Next(Request::script("waiting for", invocation))
    }

    fn reply(&mut self, store: &Store, reply: Result<redis::Value>) -> Step<bool> {
        let address = &self.event.address;
        match &mut self.waiting {
            None => match op::parse::<u64>(reply, "an event flag") {
                Err(e) => Step::Done(Err(address.error(e))),
                Ok(1) => Step::Done(Ok(true)),
                Ok(_) => {
                    let recheck = FlagRecheck {
                        event: self.event.clone(),
                        state: self.keys.state.clone(),
                    };
                    let waiting = self.waiting.insert(WakeWait::new(
                        self.keys.waiters.clone(),
                        std::mem::take(&mut self.waiter),
                        common::deadline(self.timeout),
                        recheck,
                    ));
                    waiting.start(store).then(|woke| woken_flag(address, woke))
                }
            },
            Some(waiting) => waiting
                .reply(store, reply)
                .then(|woke| woken_flag(address, woke)),
        }
    }

    fn abandon(&mut self, store: &Store) -> Step<bool> {
        let address = &self.event.address;
        match &mut self.waiting {
            // Nothing to give back: a wake-up from `set` concerns this waiter only.
            Some(waiting) => waiting.cancel(store).then(|woke| woken_flag(address, woke)),
            None => Step::Done(Err(op::abandoned())),
        }
    }
}

fn woken_flag(address: &Address, woke: Result<Woke>) -> Step<bool> {
    Step::Done(woke.map(|w| w.woken).map_err(|e| address.error(e)))
}

/// A queue of waiters, each woken through its own wake key (`wake_prefix` + waiter id):
/// an Event's, a Condition's, a JoinableQueue's joiners, a bounded queue's writers. Waiters
/// check in with `waiters.lua`; `waiters_wake.lua` wakes them in order.
#[derive(Clone, Debug)]
pub(crate) struct WaitList {
    pub(crate) waiters: String,
    pub(crate) waiting: String,
    pub(crate) wake_prefix: String,
    /// The keys of the object waited on, whose TTLs each check-in refreshes: waiting is using
    /// it, however long the wait (an Event set hours later, a writer waiting for room).
    pub(crate) keep_alive: Vec<String>,
}

impl WaitList {
    /// The wake key of `waiter`.
    pub(crate) fn wake_key(&self, waiter: &str) -> String {
        format!("{}{waiter}", self.wake_prefix)
    }

    /// A check-in of `waiter` (`waiters.lua`): `refresh` or `cancel`; its reply reads with
    /// [`woken`].
    pub(crate) fn check_in(&self, store: &Store, waiter: &str, mode: &str) -> Request {
        let mut invocation = CHECK_IN.prepare_invoke();
        invocation.key(&self.waiters).key(&self.waiting);
        for key in &self.keep_alive {
            invocation.key(key);
        }
        invocation
            .arg(now_ms())
            .arg(ttl(store))
            .arg(&self.wake_prefix)
            .arg(waiter)
            .arg(mode)
            .arg(liveness());
        Request::script("waiting for", invocation)
    }

    /// Wakes up to `n` live waiters (-1: all), in order (`waiters_wake.lua`).
    pub(crate) fn wake(&self, store: &Store, n: i64) -> Request {
        let mut invocation = WAKE.prepare_invoke();
        invocation
            .key(&self.waiters)
            .key(&self.waiting)
            .arg(now_ms())
            .arg(ttl(store))
            .arg(&self.wake_prefix)
            .arg(n);
        Request::script("waking a waiter of", invocation)
    }
}

/// Reads a check-in's reply: whether a wake-up reached the waiter.
pub(crate) fn woken(reply: Result<redis::Value>) -> Result<bool> {
    Ok(op::parse::<u64>(reply, "a check-in")? == 1)
}

/// What a [`WakeWait`] also checks after each check-in that found no wake-up.
pub(crate) trait Recheck {
    /// The request, if any.
    fn request(&self, store: &Store) -> Option<Request>;
    /// Reads its reply: true counts as woken; an error ends the wait.
    fn read(&self, reply: Result<redis::Value>) -> Result<bool>;
}

/// Nothing more to check.
impl Recheck for () {
    fn request(&self, _: &Store) -> Option<Request> {
        None
    }

    fn read(&self, _: Result<redis::Value>) -> Result<bool> {
        Ok(false)
    }
}

/// How a [`WakeWait`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Woke {
    /// A wake-up reached the waiter (it owns it).
    pub(crate) woken: bool,
    /// The waiter left the queue (deadline, or the async caller gone); `woken` then says
    /// whether a wake-up had reached it all the same.
    pub(crate) gave_up: bool,
}

/// A queued waiter's wait on its wake key: slices of `BLPOP` (Redis's own timeout), a
/// `refresh` check-in after each (which also tells of a wake-up that arrived meanwhile, and
/// queues the waiter again if it was dropped as dead), then the [`Recheck`]; at the deadline,
/// or when the async caller is gone ([`WakeWait::cancel`]), a `cancel` check-in leaves the
/// queue atomically or finds the wake-up that reached it (Redis rule 3).
pub(crate) struct WakeWait<C> {
    list: WaitList,
    waiter: String,
    deadline: Option<Instant>,
    recheck: C,
    state: WakeState,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum WakeState {
    Popping,
    Refreshing,
    Rechecking,
    Cancelling,
}

impl<C: Recheck> WakeWait<C> {
    /// The wait of `waiter`, already queued on `list`, until `deadline` (`None`: forever).
    pub(crate) fn new(
        list: WaitList,
        waiter: String,
        deadline: Option<Instant>,
        recheck: C,
    ) -> WakeWait<C> {
        WakeWait {
            list,
            waiter,
            deadline,
            recheck,
            state: WakeState::Popping,
        }
    }

    /// The first step.
    pub(crate) fn start(&mut self, store: &Store) -> Step<Woke> {
        self.slice(store)
    }

    fn slice(&mut self, store: &Store) -> Step<Woke> {
        match next_slice(self.deadline) {
            None => self.cancel(store),
            Some(block) => {
                self.state = WakeState::Popping;
                Step::Next(Request::pop_wake_up(
                    &self.list.wake_key(&self.waiter),
                    block,
                ))
            }
        }
    }

    /// Leaves the queue now (or finds the wake-up that reached the waiter).
    pub(crate) fn cancel(&mut self, store: &Store) -> Step<Woke> {
        self.state = WakeState::Cancelling;
        Step::Next(self.list.check_in(store, &self.waiter, "cancel"))
    }

    /// The step after a reply. Errors are the caller's to map.
    pub(crate) fn reply(&mut self, store: &Store, reply: Result<redis::Value>) -> Step<Woke> {
        let woke = |woken, gave_up| Step::Done(Ok(Woke { woken, gave_up }));
        match self.state {
            WakeState::Popping => match op::parse::<Option<Vec<u8>>>(reply, "a wake-up") {
                Err(e) => Step::Done(Err(e)),
                Ok(Some(_)) => woke(true, false),
                Ok(None) => {
                    self.state = WakeState::Refreshing;
                    Step::Next(self.list.check_in(store, &self.waiter, "refresh"))
                }
            },
            WakeState::Refreshing => match woken(reply) {
                Err(e) => Step::Done(Err(e)),
                Ok(true) => woke(true, false),
                Ok(false) => match self.recheck.request(store) {
                    Some(request) => {
                        self.state = WakeState::Rechecking;
                        Step::Next(request)
                    }
                    None => self.slice(store),
                },
            },
            WakeState::Rechecking => match self.recheck.read(reply) {
                Err(e) => Step::Done(Err(e)),
                Ok(true) => woke(true, false),
                Ok(false) => self.slice(store),
            },
            WakeState::Cancelling => match woken(reply) {
                Err(e) => Step::Done(Err(e)),
                Ok(woken) => woke(woken, true),
            },
        }
    }
}
