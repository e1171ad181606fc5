//! `Barrier`: `parties` processes wait until all of them arrive, Python's
//! `multiprocessing.Barrier`.
//!
//! # Semantics
//!
//! [`Barrier::wait`] blocks until `parties` callers have called it, then releases them all and
//! returns each a distinct arrival index in `0..parties`. The barrier is then ready for the next
//! generation; it can be used any number of times. An action ([`Barrier::with_action`]: a
//! `#[shoal::remote]` function and its arguments, so any process can run it) runs exactly once per
//! generation, in the last caller to arrive, before the others are released; if it fails, the
//! barrier breaks and that caller gets the action's error. A caller cannot time out while the
//! action runs (Python's action holds the lock a waiter needs to): it is released (or broken)
//! with the others when the action ends. If the process running the action dies in it, the
//! barrier breaks as for an action that failed: the runner holds a lease (`sync.lease_secs`,
//! on Redis's clock) that its heartbeat renews while the action runs, and once it lapsed and
//! stayed lapsed for half a lease after a waiter saw it lapsed (so a runner cut off by an outage
//! has that long to renew once Redis is back), the next waiter to check in breaks the barrier:
//! every waiter gets [`Error::BrokenBarrier`] about a lease and a half after the runner died, or
//! at its timeout if that is later. The runner's release (or failure) is sent again while
//! Redis is out of reach (for at most `redis.response_timeout_secs`); both are harmless to
//! repeat. A timeout (the call's, else the
//! barrier's default) or [`Barrier::abort`] breaks the barrier: every current and later waiter
//! gets [`Error::BrokenBarrier`] until [`Barrier::reset`], which also breaks the current waiters
//! and starts a new generation. [`Barrier::parties`], [`Barrier::n_waiting`],
//! [`Barrier::broken`] read its state.
//!
//! # Keys (hash tag `{<ns>:barrier:<id>}`)
//!
//! `state` (hash: `parties`, `count`, `generation`, `broken`; `acting`: the lease expiry (ms,
//! Redis's clock) of the runner of the action that runs, 0 when none does; `suspect`: when a
//! waiter first saw that lease lapsed, 0 when none did; `released`: the last generation whose
//! action's release was recorded), `waiters` (list of the current
//! generation's waiters), `entering` (list of the callers that came while the last arrival ran
//! the action: as in Python, they wait for that generation to end, then arrive again, in the
//! next one), `wake:<waiter>` (list).
//!
//! # Round trips
//!
//! One per caller and pass: the arrival (`barrier_arrive.lua`) and a `BLPOP` on the caller's
//! own wake key are written together on one connection. A caller that must wait is released
//! by the last arrival's push to that key, which the `BLPOP` already waits on; every other
//! outcome (passed, broken, run the action) is pushed to the caller's key by its own arrival,
//! so its `BLPOP` returns at once. A pass of two processes thus costs each one write and one
//! wake-up, where it cost the first arrival two round trips in a row (arrive, then wait). With
//! an action: 2 for the last arrival (arrive, release), and its heartbeat renews its lease (1
//! every third of the lease) while the action runs. A wait longer than the first slice
//! (100 ms) checks that the barrier exists and waits again, in one-second slices; while every
//! party arrived and the action runs (or past its deadline, held on for the action), a waiter
//! checks in with `barrier_finish.lua` (`probe`) after each slice instead. `Barrier::new`
//! loads the arrival script: after `NOSCRIPT` (Redis lost its scripts) the first slice is
//! waited out before the script is loaded and the arrival written again (nothing had run).
//!
//! # Async forms
//!
//! [`Barrier::reset_async`], [`Barrier::abort_async`], [`Barrier::n_waiting_async`] and
//! [`Barrier::broken_async`] send the same single script (or command) from shoal's actor runtime,
//! on its shared multiplexed connection, and hand the reply back through a oneshot channel; a reset
//! or abort whose future is dropped happens or not, depending on whether it was sent already, never
//! twice. [`Barrier::wait_async`] runs the same round trips as a task on shoal's actor runtime (the
//! action, user code, on that runtime's blocking pool) and hands the arrival index back through a
//! oneshot channel: any executor can await it and no thread is parked for it. Dropping its future
//! *withdraws* the arrival before the task's next wait slice (within a second), as
//! `asyncio.Barrier` does for a cancelled waiter: the caller no longer counts as arrived, and the
//! barrier is not broken (`barrier_finish.lua`, `withdraw`). If the barrier had already released
//! (or broken) the caller's generation, that stands. An arrival that completed the barrier always
//! releases the others, and its action runs, whether or not its future is still there. As in
//! `asyncio`, an arrival index may then repeat within that generation.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shoal_core::codec;
use shoal_core::error::{Error, Result, TaskError};
use shoal_core::registry::{self, RemoteFn};
use shoal_core::store::Store;

use crate::common::{self, Address, PIPELINED_SLICE, next_slice, ttl};
use crate::grants::lease;
use crate::op::{self, Operation, Request, Step};

/// Loaded when the barrier is created: a wait written behind an arrival that meets `NOSCRIPT`
/// waits out its first slice.
const ARRIVE_CODE: &str = include_str!("barrier_arrive.lua");
static ARRIVE: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(ARRIVE_CODE));
static FINISH: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("barrier_finish.lua")));

/// An action a barrier runs once per generation.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
struct Action {
    function: String,
    #[serde(with = "serde_bytes")]
    args: Vec<u8>,
}

/// A barrier for `parties` processes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Barrier {
    address: Address,
    parties: u32,
    action: Option<Action>,
    timeout: Option<Duration>,
}

struct Keys {
    state: String,
    waiters: String,
    entering: String,
    wake_prefix: String,
}

impl Barrier {
    /// A barrier for `parties` (at least 1) callers.
    pub fn new(parties: u32) -> Result<Barrier> {
        Self::create(parties, None, None)
    }

    /// A barrier whose last arrival runs `action(args...)` before releasing the others.
    pub fn with_action<F, A>(parties: u32, action: F, args: A) -> Result<Barrier>
    where
        F: RemoteFn<A>,
        A: Serialize,
    {
        let function = action.name();
        registry::resolve(function)?;
        let args = codec::encode(&args, &format!("arguments of {function}"), usize::MAX)?;
        Self::create(
            parties,
            Some(Action {
                function: function.to_string(),
                args,
            }),
            None,
        )
    }

    /// The same barrier with a default timeout for [`Barrier::wait`].
    pub fn timeout(mut self, timeout: Duration) -> Barrier {
        self.timeout = Some(timeout);
        self
    }

    fn create(parties: u32, action: Option<Action>, timeout: Option<Duration>) -> Result<Barrier> {
        if parties == 0 {
            return Err(Error::invalid_state("a barrier needs at least 1 party"));
        }
        let (context, address) = Address::create("barrier")?;
        let barrier = Barrier {
            address,
            parties,
            action,
            timeout,
        };
        let keys = barrier.keys();
        let store = context.store();
        store
            .with_conn(
                || format!("creating {}", barrier.address.describe()),
                |c| {
                    redis::pipe()
                        .hset_multiple(
                            &keys.state,
                            &[
                                ("parties", parties as u64),
                                ("count", 0),
                                ("generation", 0),
                                ("broken", 0),
                            ],
                        )
                        .ignore()
                        .expire(&keys.state, ttl(store) as i64)
                        .ignore()
                        .cmd("SCRIPT")
                        .arg("LOAD")
                        .arg(ARRIVE_CODE)
                        .ignore()
                        .query::<()>(c)
                },
            )
            .map_err(|e| barrier.address.error(e))?;
        Ok(barrier)
    }

    fn keys(&self) -> Keys {
        let keys = self.address.keys();
        Keys {
            state: keys.key("state"),
            waiters: keys.key("waiters"),
            entering: keys.key("entering"),
            wake_prefix: keys.key("wake:"),
        }
    }

    /// Waits for every party; returns this caller's arrival index. `timeout` overrides the
    /// barrier's default.
    pub fn wait(&self, timeout: Option<Duration>) -> Result<u32> {
        let store = common::store()?;
        op::run(
            &store,
            &mut BarrierWait::new(self, timeout.or(self.timeout)),
        )
    }

    /// The async form of [`Barrier::wait`]: waits on shoal's actor runtime without blocking the
    /// caller's thread; `timeout` runs from the first poll. A dropped future withdraws the
    /// arrival (see the module docs).
    pub fn wait_async(
        &self,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<u32>> + Send + use<> {
        let barrier = self.clone();
        async move {
            let timeout = timeout.or(barrier.timeout);
            op::spawn(BarrierWait::new(&barrier, timeout), None).await
        }
    }

    /// `barrier_finish.lua`: `op` for `generation`, or for `waiter`.
    fn finish_request(&self, store: &Store, op: &str, generation: u64, waiter: &str) -> Request {
        let keys = self.keys();
        let mut invocation = FINISH.prepare_invoke();
        invocation
            .key(&keys.state)
            .key(&keys.waiters)
            .key(&keys.entering)
            .arg(ttl(store))
            .arg(&keys.wake_prefix)
            .arg(op)
            .arg(generation)
            .arg(waiter)
            .arg(lease_ms());
        let what = match op {
            "renew" => "renewing the lease of the action of",
            "probe" => "checking in at",
            "timeout" | "withdraw" => "giving up on",
            "reset" => "resetting",
            "abort" => "aborting",
            _ => "ending a generation of",
        };
        Request::script(what, invocation)
    }

    fn finish(&self, op: &str, generation: u64, waiter: &str) -> Result<String> {
        let store = common::store()?;
        op::run_single(
            &store,
            || self.address.describe(),
            self.finish_request(&store, op, generation, waiter),
            |reply| self.finished(reply),
        )
    }

    /// The async form of [`Barrier::finish`] for `reset` and `abort` (whole-barrier operations).
    fn finish_async(&self, op: &'static str) -> impl Future<Output = Result<()>> + Send + use<> {
        let barrier = self.clone();
        async move {
            let store = common::store()?;
            let request = barrier.finish_request(&store, op, 0, "");
            let address = barrier.address.clone();
            op::spawn_single(
                move || address.describe(),
                request,
                move |reply| barrier.finished(reply).map(|_| ()),
            )
            .await
        }
    }

    /// Reads the reply to [`Barrier::finish_request`]: the outcome.
    fn finished(&self, reply: Result<redis::Value>) -> Result<String> {
        op::parse(reply, "a barrier outcome").map_err(|e| self.address.error(e))
    }

    /// Breaks the barrier for the current waiters and starts a new, unbroken generation.
    pub fn reset(&self) -> Result<()> {
        self.finish("reset", 0, "").map(|_| ())
    }

    /// The async form of [`Barrier::reset`]: the same script, one round trip on shoal's actor
    /// runtime. A reset whose future is dropped still happens if it was under way.
    pub fn reset_async(&self) -> impl Future<Output = Result<()>> + Send + use<> {
        self.finish_async("reset")
    }

    /// Puts the barrier in the broken state: current and later waiters get
    /// [`Error::BrokenBarrier`] until [`Barrier::reset`].
    pub fn abort(&self) -> Result<()> {
        self.finish("abort", 0, "").map(|_| ())
    }

    /// The async form of [`Barrier::abort`]: the same script, one round trip on shoal's actor
    /// runtime. An abort whose future is dropped still happens if it was under way.
    pub fn abort_async(&self) -> impl Future<Output = Result<()>> + Send + use<> {
        self.finish_async("abort")
    }

    /// The number of callers needed to pass.
    pub fn parties(&self) -> u32 {
        self.parties
    }

    /// Callers waiting now.
    pub fn n_waiting(&self) -> Result<u32> {
        Ok(waiting_of(self.read_state()?))
    }

    /// The async form of [`Barrier::n_waiting`] (one round trip on shoal's actor runtime).
    pub fn n_waiting_async(&self) -> impl Future<Output = Result<u32>> + Send + use<> {
        let state = self.read_state_async();
        async move { Ok(waiting_of(state.await?)) }
    }

    /// Whether the barrier is broken.
    pub fn broken(&self) -> Result<bool> {
        Ok(self.read_state()?.1)
    }

    /// The async form of [`Barrier::broken`] (one round trip on shoal's actor runtime).
    pub fn broken_async(&self) -> impl Future<Output = Result<bool>> + Send + use<> {
        let state = self.read_state_async();
        async move { Ok(state.await?.1) }
    }

    fn read_state(&self) -> Result<(u32, bool)> {
        let store = common::store()?;
        op::run_single(
            &store,
            || self.address.describe(),
            self.read_state_request(),
            |reply| self.state_from(reply),
        )
    }

    /// The async form of [`Barrier::read_state`].
    fn read_state_async(&self) -> impl Future<Output = Result<(u32, bool)>> + Send + use<> {
        let barrier = self.clone();
        async move {
            let request = barrier.read_state_request();
            let address = barrier.address.clone();
            op::spawn_single(
                move || address.describe(),
                request,
                move |reply| barrier.state_from(reply),
            )
            .await
        }
    }

    fn read_state_request(&self) -> Request {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(self.keys().state).arg("count").arg("broken");
        Request::cmd("reading", cmd)
    }

    /// A waiter's check between slices: [`Barrier::read_state_request`], and the TTLs of the
    /// state and the waiters refreshed (waiting is using the barrier, however long the wait).
    fn check_request(&self, store: &Store) -> Request {
        let keys = self.keys();
        let mut pipe = redis::pipe();
        pipe.cmd("HMGET")
            .arg(&keys.state)
            .arg("count")
            .arg("broken")
            .expire(&keys.state, ttl(store) as i64)
            .ignore()
            .expire(&keys.waiters, ttl(store) as i64)
            .ignore()
            .expire(&keys.entering, ttl(store) as i64)
            .ignore();
        Request::pipe("checking", pipe)
    }

    /// Reads the reply to [`Barrier::check_request`] (what [`Barrier::state_from`] reads, in a
    /// pipeline's array of one).
    fn checked_from(&self, reply: Result<redis::Value>) -> Result<(u32, bool)> {
        self.state_from(reply.map(|value| match value {
            redis::Value::Array(mut replies) if replies.len() == 1 => replies.remove(0),
            other => other,
        }))
    }

    fn state_from(&self, reply: Result<redis::Value>) -> Result<(u32, bool)> {
        let (count, broken): (Option<String>, Option<String>) =
            op::parse(reply, "a barrier state").map_err(|e| self.address.error(e))?;
        let state = || self.keys().state;
        match (count, broken) {
            (None, None) => Err(self.address.gone()),
            (Some(count), Some(broken)) => match (count.parse::<u32>(), broken.as_str()) {
                (Ok(count), "0" | "1") => Ok((count, broken == "1")),
                _ => Err(Error::Codec {
                    key: state(),
                    expected: "barrier state".into(),
                    reason: format!("count {count:?}, broken {broken:?}"),
                }),
            },
            other => Err(Error::Codec {
                key: state(),
                expected: "barrier state".into(),
                reason: format!("{other:?}"),
            }),
        }
    }
}

/// The callers waiting, from a state `(count, broken)`: none while broken.
fn waiting_of((count, broken): (u32, bool)) -> u32 {
    if broken { 0 } else { count }
}

/// The lease of the runner of an action (`sync.lease_secs`), in ms, for the scripts.
fn lease_ms() -> u64 {
    lease().as_millis() as u64
}

/// The actions this process runs now (each from its arrival until its release or failure is
/// recorded), by a number of their own: the barrier and the generation. The heartbeat renews
/// their runner's leases.
static RUNNING: LazyLock<Mutex<HashMap<u64, (Barrier, u64)>>> = LazyLock::new(Default::default);

fn running() -> std::sync::MutexGuard<'static, HashMap<u64, (Barrier, u64)>> {
    RUNNING.lock().unwrap_or_else(|p| p.into_inner())
}

/// This process runs the action of a generation: its lease (taken by the arrival that made it
/// the runner) is renewed every third of the lease until this is dropped.
struct RunnerLease(u64);

impl RunnerLease {
    fn start(barrier: &Barrier, generation: u64) -> RunnerLease {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        running().insert(id, (barrier.clone(), generation));
        common::on_heartbeat(renew_runners);
        RunnerLease(id)
    }
}

impl Drop for RunnerLease {
    fn drop(&mut self) {
        running().remove(&self.0);
    }
}

/// The heartbeat: renews the lease of every action this process runs (`renew`), one script
/// each. A failure is logged: the waiters break the barrier only once the lease stayed lapsed
/// for half a lease after one of them saw it lapsed.
fn renew_runners() {
    let actions: Vec<(Barrier, u64)> = running().values().cloned().collect();
    if actions.is_empty() {
        return;
    }
    let Ok(store) = common::store() else {
        return;
    };
    for (barrier, generation) in actions {
        let renewed = op::run_single(
            &store,
            || barrier.address.describe(),
            barrier.finish_request(&store, "renew", generation, ""),
            |reply| barrier.finished(reply),
        );
        if let Err(e) = renewed {
            tracing::warn!("{e}");
        }
    }
}

/// Runs a barrier's action in this process; its failure is a task error.
fn run_action(action: &Action, limit: usize) -> Result<()> {
    let outcome = match registry::resolve(&action.function) {
        Ok(f) => registry::call(f, &action.args, limit)
            .and_then(registry::Returned::into_process_outcome),
        Err(e) => Err(registry::Failure::error(e)),
    };
    outcome.map_err(|failure| {
        Error::Task(TaskError {
            function: action.function.clone(),
            message: failure.message,
            kind: failure.kind,
            attempts: 1,
            item: None,
        })
    })
}

/// `Barrier::wait`: `barrier_arrive.lua`; the last arrival runs the action (if any) and
/// releases the generation; the others wait on their wake key in slices, checking that the
/// barrier still exists after each, and at the deadline give up (`timeout`: the barrier breaks,
/// unless a wake-up reached them). An async caller that left withdraws its arrival.
struct BarrierWait {
    barrier: Barrier,
    waiter: String,
    timeout: Option<Duration>,
    deadline: Option<Instant>,
    index: u32,
    generation: u64,
    state: BarrierState,
    action_error: Option<Error>,
    /// The async caller left: a wake-up found now ends the wait, whatever it says.
    withdrawing: bool,
    /// Past its deadline, the caller waits on for the end of a generation whose action runs
    /// (it came during it, or every party had arrived): Python's caller cannot time out while
    /// the action holds the barrier's lock. A caller that then arrives late gives up after
    /// its arrival, as Python's does. It checks in after each slice all the same (`probe`):
    /// the barrier breaks if the action's runner is gone.
    hold_on: bool,
    /// This caller runs the action: its lease, renewed until the release (or the failure) is
    /// recorded.
    runner: Option<RunnerLease>,
    /// The release (or failure) could not reach Redis since then: it is sent again, for at most
    /// `redis.response_timeout_secs`.
    unreachable_since: Option<Instant>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum BarrierState {
    Arriving,
    Acting,
    Releasing,
    Breaking,
    /// Waiting to send the release (`Releasing`) or the failure (`Breaking`) again.
    Retrying(bool),
    Popping,
    Checking,
    Probing,
    GivingUp,
}

impl BarrierWait {
    fn new(barrier: &Barrier, timeout: Option<Duration>) -> BarrierWait {
        BarrierWait {
            barrier: barrier.clone(),
            waiter: common::waiter_id(),
            timeout,
            deadline: None,
            index: 0,
            generation: 0,
            state: BarrierState::Arriving,
            action_error: None,
            withdrawing: false,
            hold_on: false,
            runner: None,
            unreachable_since: None,
        }
    }

    fn slice(&mut self, store: &Store) -> Step<u32> {
        let slice = match next_slice(self.deadline) {
            None if self.hold_on => Some(common::SLICE),
            slice => slice,
        };
        match slice {
            None => self.give_up(store, "timeout"),
            Some(block) => {
                self.state = BarrierState::Popping;
                let wake = format!("{}{}", self.barrier.keys().wake_prefix, self.waiter);
                Step::Next(Request::pop_wake_up(&wake, block))
            }
        }
    }

    /// A check-in after a slice while the action runs (`probe`): a wake-up that came, `wait`,
    /// or `broken` once the action's runner is gone.
    fn probe(&mut self, store: &Store) -> Step<u32> {
        self.state = BarrierState::Probing;
        Step::Next(self.barrier.finish_request(store, "probe", 0, &self.waiter))
    }

    /// The action's outcome for its generation: `release` (`ok`) or `fail`.
    fn finish_action(&mut self, store: &Store, ok: bool) -> Step<u32> {
        self.state = if ok {
            BarrierState::Releasing
        } else {
            BarrierState::Breaking
        };
        let how = if ok { "release" } else { "fail" };
        Step::Next(self.barrier.finish_request(store, how, self.generation, ""))
    }

    /// After the release or failure failed with `e`: sends it again in 200 ms if Redis is out of
    /// reach (both are harmless to repeat), for at most the response timeout.
    fn retry_action_outcome(&mut self, store: &Store, ok: bool, e: Error) -> Step<u32> {
        let limit = store.settings().response_timeout;
        let since = *self.unreachable_since.get_or_insert_with(Instant::now);
        if !e.is_store_unreachable() || since.elapsed() >= limit {
            self.runner = None;
            return Step::Done(Err(self.barrier.address.error(e)));
        }
        tracing::debug!("{e}; retrying");
        self.state = BarrierState::Retrying(ok);
        let pause = Duration::from_millis(200).min(limit);
        Step::Next(Request::local("waiting to retry", move || {
            std::thread::sleep(pause);
            Ok(redis::Value::Okay)
        }))
    }

    fn give_up(&mut self, store: &Store, how: &str) -> Step<u32> {
        self.state = BarrierState::GivingUp;
        self.withdrawing = how == "withdraw";
        Step::Next(self.barrier.finish_request(store, how, 0, &self.waiter))
    }

    /// What a wake-up or an outcome says.
    fn outcome(&mut self, store: &Store, message: &[u8]) -> Step<u32> {
        if message == b"wait" && self.state == BarrierState::Probing {
            // Nothing came, and the action (if any) runs on.
            return self.slice(store);
        }
        self.hold_on = false;
        match message {
            b"go" => Step::Done(Ok(self.index)),
            b"withdrawn" => Step::Done(Err(op::abandoned())),
            // The generation this caller came during (its action running) ended: arrive in
            // the next one, unless the caller is leaving (it had not arrived).
            b"again" if self.withdrawing => Step::Done(Err(op::abandoned())),
            b"again" => self.arrive(store),
            b"wait" => {
                self.hold_on = true;
                self.slice(store)
            }
            _ => Step::Done(Err(Error::BrokenBarrier)),
        }
    }
}

impl Operation for BarrierWait {
    type Output = u32;

    fn describe(&self) -> String {
        self.barrier.address.describe()
    }

    fn start(&mut self, store: &Store) -> Step<u32> {
        self.deadline = common::deadline(self.timeout);
        self.arrive(store)
    }

    fn reply(&mut self, store: &Store, reply: Result<redis::Value>) -> Step<u32> {
        self.step(store, reply)
    }

    fn abandon(&mut self, store: &Store) -> Step<u32> {
        match self.state {
            BarrierState::Popping | BarrierState::Checking | BarrierState::Probing => {
                self.give_up(store, "withdraw")
            }
            _ => Step::Done(Err(op::abandoned())),
        }
    }
}

impl BarrierWait {
    /// The arrival (`barrier_arrive.lua`) with the first slice of the wait behind it; again
    /// when the caller came while an action ran.
    fn arrive(&mut self, store: &Store) -> Step<u32> {
        self.state = BarrierState::Arriving;
        // At least a millisecond: a timeout that passed already still arrives (the last
        // arrival passes), and gives up after the reply.
        let block = next_slice(self.deadline)
            .unwrap_or(Duration::from_millis(1))
            .min(PIPELINED_SLICE);
        let keys = self.barrier.keys();
        let wake = format!("{}{}", keys.wake_prefix, self.waiter);
        let mut invocation = ARRIVE.prepare_invoke();
        invocation
            .key(&keys.state)
            .key(&keys.waiters)
            .key(&keys.entering)
            .arg(ttl(store))
            .arg(&keys.wake_prefix)
            .arg(&self.waiter)
            .arg(if self.barrier.action.is_some() {
                "1"
            } else {
                "0"
            })
            .arg(lease_ms());
        Step::Next(Request::script_then_blocking(
            "arriving at",
            invocation,
            Request::blpop_cmd(&wake, block),
            block,
        ))
    }

    fn step(&mut self, store: &Store, reply: Result<redis::Value>) -> Step<u32> {
        let address = &self.barrier.address;
        match self.state {
            BarrierState::Arriving => {
                let (reply, woken) =
                    match op::parse::<(Vec<u64>, Option<(String, Vec<u8>)>)>(reply, "an arrival") {
                        Ok(reply) => reply,
                        Err(e) => return Step::Done(Err(address.error(e))),
                    };
                let [code, index, generation] = reply.as_slice() else {
                    return Step::Done(Err(Error::invalid_state(format!(
                        "{}: unexpected reply {reply:?}",
                        address.describe()
                    ))));
                };
                self.index = *index as u32;
                self.generation = *generation;
                // Came while the action ran: waits for its generation to end, then arrives.
                self.hold_on = *code == 4;
                match code {
                    0 => Step::Done(Err(Error::BrokenBarrier)),
                    2 => Step::Done(Ok(self.index)),
                    3 => {
                        let Some(action) = self.barrier.action.clone() else {
                            return Step::Done(Ok(self.index));
                        };
                        self.runner = Some(RunnerLease::start(&self.barrier, self.generation));
                        self.state = BarrierState::Acting;
                        let limit = store.settings().max_message_bytes;
                        Step::Next(Request::local("running the action of", move || {
                            run_action(&action, limit).map(|()| redis::Value::Okay)
                        }))
                    }
                    _ => match woken {
                        // Released (or broken) before the wait behind the arrival ended.
                        Some((_, message)) => self.outcome(store, &message),
                        None => {
                            self.state = BarrierState::Checking;
                            Step::Next(self.barrier.check_request(store))
                        }
                    },
                }
            }
            BarrierState::Acting => {
                let ok = match reply {
                    Ok(_) => true,
                    Err(e) => {
                        self.action_error = Some(e);
                        false
                    }
                };
                self.finish_action(store, ok)
            }
            BarrierState::Retrying(ok) => self.finish_action(store, ok),
            BarrierState::Breaking => match reply {
                Err(e) => self.retry_action_outcome(store, false, e),
                Ok(_) => {
                    self.runner = None;
                    Step::Done(Err(self
                        .action_error
                        .take()
                        .unwrap_or(Error::BrokenBarrier)))
                }
            },
            BarrierState::Releasing => match reply {
                Err(e) => self.retry_action_outcome(store, true, e),
                Ok(reply) => {
                    self.runner = None;
                    match op::parse::<Vec<u8>>(Ok(reply), "a barrier outcome") {
                        Err(e) => Step::Done(Err(address.error(e))),
                        Ok(message) => self.outcome(store, &message),
                    }
                }
            },
            BarrierState::Probing | BarrierState::GivingUp => {
                match op::parse::<Vec<u8>>(reply, "a barrier outcome") {
                    Err(e) => Step::Done(Err(address.error(e))),
                    Ok(message) => self.outcome(store, &message),
                }
            }
            BarrierState::Popping => {
                match op::parse::<Option<Vec<u8>>>(reply, "a wake-up") {
                    Err(e) => Step::Done(Err(address.error(e))),
                    Ok(Some(message)) => self.outcome(store, &message),
                    // Held on for an action (past the deadline, or come while it runs): still
                    // running, its runner alive? (A deleted barrier is an error there too.)
                    Ok(None) if self.hold_on => self.probe(store),
                    Ok(None) => {
                        // Still there? (a deleted barrier is an error, not a wait forever)
                        self.state = BarrierState::Checking;
                        Step::Next(self.barrier.check_request(store))
                    }
                }
            }
            BarrierState::Checking => match self.barrier.checked_from(reply) {
                Err(e) => Step::Done(Err(e)),
                // Every party arrived: the action runs. Its runner alive?
                Ok((count, false)) if count >= self.barrier.parties => self.probe(store),
                Ok(_) => self.slice(store),
            },
        }
    }
}
