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
//! barrier breaks and that caller gets the action's error. A timeout (the call's, else the
//! barrier's default) or [`Barrier::abort`] breaks the barrier: every current and later waiter
//! gets [`Error::BrokenBarrier`] until [`Barrier::reset`], which also breaks the current waiters
//! and starts a new generation. [`Barrier::parties`], [`Barrier::n_waiting`],
//! [`Barrier::broken`] read its state.
//!
//! # Keys (hash tag `{<ns>:barrier:<id>}`)
//!
//! `state` (hash: `parties`, `count`, `generation`, `broken`), `waiters` (list of the current
//! generation's waiters), `wake:<waiter>` (list).
//!
//! # Round trips
//!
//! A waiter: 1 to arrive + a `BLPOP` released by the last arrival (plus one check per second).
//! The last arrival: 1 (2 with an action: arrive, release).

use std::sync::LazyLock;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_core::codec;
use shoal_core::error::{Error, Result, TaskError};
use shoal_core::registry::{self, RemoteFn};

use crate::common::{self, Address, blpop, deadline, next_slice, ttl};

static ARRIVE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("barrier_arrive.lua")));
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
        if registry::lookup(function).is_none() {
            return Err(Error::NotRegistered {
                function: function.to_string(),
            });
        }
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
            wake_prefix: keys.key("wake:"),
        }
    }

    /// Waits for every party; returns this caller's arrival index. `timeout` overrides the
    /// barrier's default.
    pub fn wait(&self, timeout: Option<Duration>) -> Result<u32> {
        let store = common::store()?;
        let keys = self.keys();
        let waiter = common::waiter_id();
        let reply: Vec<u64> = store
            .with_conn(
                || format!("arriving at {}", self.address.describe()),
                |c| {
                    ARRIVE
                        .key(&keys.state)
                        .key(&keys.waiters)
                        .arg(ttl(&store))
                        .arg(&keys.wake_prefix)
                        .arg(&waiter)
                        .arg(if self.action.is_some() { "1" } else { "0" })
                        .invoke(c)
                },
            )
            .map_err(|e| self.address.error(e))?;
        let (code, index, generation) = match reply.as_slice() {
            [code, index, generation] => (*code, *index as u32, *generation),
            _ => {
                return Err(Error::invalid_state(format!(
                    "{}: unexpected reply {reply:?}",
                    self.address.describe()
                )));
            }
        };
        match code {
            0 => Err(Error::BrokenBarrier),
            2 => Ok(index),
            3 => self.run_action(index, generation),
            _ => self.await_release(&keys, &waiter, index, timeout.or(self.timeout)),
        }
    }

    fn run_action(&self, index: u32, generation: u64) -> Result<u32> {
        let Some(action) = &self.action else {
            return Ok(index);
        };
        let limit = common::store()?.settings().max_message_bytes;
        let outcome = match registry::lookup(&action.function) {
            Some(f) => registry::call(f, &action.args, limit)
                .and_then(registry::Returned::into_process_outcome),
            None => Err(registry::Failure::error(Error::NotRegistered {
                function: action.function.clone(),
            })),
        };
        match outcome {
            Ok(()) => match self.finish("release", generation, "")?.as_str() {
                "go" => Ok(index),
                _ => Err(Error::BrokenBarrier),
            },
            Err(failure) => {
                self.finish("break", generation, "")?;
                Err(Error::Task(TaskError {
                    function: action.function.clone(),
                    message: failure.message,
                    kind: failure.kind,
                    attempts: 1,
                    item: None,
                }))
            }
        }
    }

    fn await_release(
        &self,
        keys: &Keys,
        waiter: &str,
        index: u32,
        timeout: Option<Duration>,
    ) -> Result<u32> {
        let store = common::store()?;
        let deadline = deadline(timeout);
        let wake = format!("{}{waiter}", keys.wake_prefix);
        loop {
            let Some(block) = next_slice(deadline) else {
                return match self.finish("timeout", 0, waiter)?.as_str() {
                    "go" => Ok(index),
                    _ => Err(Error::BrokenBarrier),
                };
            };
            if let Some(message) = blpop(&store, &wake, block).map_err(|e| self.address.error(e))? {
                return match message.as_slice() {
                    b"go" => Ok(index),
                    _ => Err(Error::BrokenBarrier),
                };
            }
            // Still there? (a deleted barrier is an error, not a wait forever)
            self.n_waiting()?;
        }
    }

    fn finish(&self, op: &str, generation: u64, waiter: &str) -> Result<String> {
        let store = common::store()?;
        let keys = self.keys();
        store
            .with_conn(
                || format!("{op} of {}", self.address.describe()),
                |c| {
                    FINISH
                        .key(&keys.state)
                        .key(&keys.waiters)
                        .arg(ttl(&store))
                        .arg(&keys.wake_prefix)
                        .arg(op)
                        .arg(generation)
                        .arg(waiter)
                        .invoke(c)
                },
            )
            .map_err(|e| self.address.error(e))
    }

    /// Breaks the barrier for the current waiters and starts a new, unbroken generation.
    pub fn reset(&self) -> Result<()> {
        self.finish("reset", 0, "").map(|_| ())
    }

    /// Puts the barrier in the broken state: current and later waiters get
    /// [`Error::BrokenBarrier`] until [`Barrier::reset`].
    pub fn abort(&self) -> Result<()> {
        self.finish("abort", 0, "").map(|_| ())
    }

    /// The number of callers needed to pass.
    pub fn parties(&self) -> u32 {
        self.parties
    }

    /// Callers waiting now.
    pub fn n_waiting(&self) -> Result<u32> {
        let (count, broken) = self.read_state()?;
        Ok(if broken { 0 } else { count })
    }

    /// Whether the barrier is broken.
    pub fn broken(&self) -> Result<bool> {
        Ok(self.read_state()?.1)
    }

    fn read_state(&self) -> Result<(u32, bool)> {
        let store = common::store()?;
        let keys = self.keys();
        let (count, broken): (Option<String>, Option<String>) = store
            .with_conn(
                || format!("reading {}", self.address.describe()),
                |c| {
                    redis::cmd("HMGET")
                        .arg(&keys.state)
                        .arg("count")
                        .arg("broken")
                        .query(c)
                },
            )
            .map_err(|e| self.address.error(e))?;
        match (count, broken) {
            (None, None) => Err(self.address.gone()),
            (Some(count), Some(broken)) => match (count.parse::<u32>(), broken.as_str()) {
                (Ok(count), "0" | "1") => Ok((count, broken == "1")),
                _ => Err(Error::Codec {
                    key: keys.state,
                    expected: "barrier state".into(),
                    reason: format!("count {count:?}, broken {broken:?}"),
                }),
            },
            other => Err(Error::Codec {
                key: keys.state,
                expected: "barrier state".into(),
                reason: format!("{other:?}"),
            }),
        }
    }
}
