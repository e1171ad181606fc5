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
//! Release: 1 (`grants_release.lua`). Giving up after a timeout: 1 (`grants_wait.lua`).
//! `get_value`/`locked`: 1 (`grants_value.lua`). At a clean exit: 1 per object this process
//! still holds (`grants_detach.lua`).

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex, Once};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shoal_core::context;
use shoal_core::error::{Error, Result};
use shoal_core::store::Store;

use crate::common::{self, Address, blpop, next_slice, now_ms, process_holder, ttl};

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
    holders: String,
    waiters: String,
    waiting: String,
    fence: String,
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

    /// Acquires a permit. `wait`: `None` tries once; `Some(None)` waits forever; `Some(Some(t))`
    /// waits until `t`. `Ok(None)` when it was not acquired.
    pub(crate) fn acquire(&self, wait: Option<Option<Instant>>) -> Result<Option<Grant>> {
        let store = common::store()?;
        let lease = lease();
        let keys = self.keys();
        let holder = self.kind.holder();
        let waiter = match wait {
            None => String::new(),
            Some(_) => common::waiter_id(),
        };
        let reply: Vec<u64> = store
            .with_conn(
                || format!("acquiring {}", self.address.describe()),
                |c| {
                    keys.invocation(&ACQUIRE, &store, lease)
                        .arg(&holder)
                        .arg(self.kind.name())
                        .arg(&waiter)
                        .arg(now_ms() + 3 * common::SLICE.as_millis() as u64)
                        .invoke(c)
                },
            )
            .map_err(|e| self.address.error(e))?;
        if reply.first() == Some(&1) {
            let grant = Grant {
                token: reply.get(1).copied().unwrap_or(0),
                count: reply.get(2).copied().unwrap_or(1),
            };
            self.record(grant.token, &holder);
            return Ok(Some(grant));
        }
        let Some(deadline) = wait else {
            return Ok(None);
        };
        let wake = format!("{}{waiter}", keys.wake_prefix);
        loop {
            let Some(block) = next_slice(deadline) else {
                return self.check_in(&store, &keys, &holder, &waiter, "cancel");
            };
            if let Some(token) = blpop(&store, &wake, block).map_err(|e| self.address.error(e))? {
                let token = parse_token(&token)?;
                self.record(token, &holder);
                return Ok(Some(Grant { token, count: 1 }));
            }
            if let Some(grant) = self.check_in(&store, &keys, &holder, &waiter, "refresh")? {
                return Ok(Some(grant));
            }
        }
    }

    fn check_in(
        &self,
        store: &Store,
        keys: &GrantKeys,
        holder: &str,
        waiter: &str,
        mode: &str,
    ) -> Result<Option<Grant>> {
        let reply: Vec<u64> = store
            .with_conn(
                || format!("waiting for {}", self.address.describe()),
                |c| {
                    keys.invocation(&WAIT, store, lease())
                        .arg(holder)
                        .arg(waiter)
                        .arg(mode)
                        .arg(now_ms() + 3 * common::SLICE.as_millis() as u64)
                        .invoke(c)
                },
            )
            .map_err(|e| self.address.error(e))?;
        if reply.first() == Some(&1) {
            let token = reply.get(1).copied().unwrap_or(0);
            self.record(token, holder);
            return Ok(Some(Grant { token, count: 1 }));
        }
        Ok(None)
    }

    /// Releases one permit (see `grants_release.lua` for whose). Returns the recursion level
    /// left (RLock).
    pub(crate) fn release(&self) -> Result<u64> {
        let store = common::store()?;
        let keys = self.keys();
        let holder = self.kind.holder();
        let mine = held_grant(&keys.state, self.kind);
        let reply: std::result::Result<Vec<u64>, Error> = store.with_conn(
            || format!("releasing {}", self.address.describe()),
            |c| {
                keys.invocation(&RELEASE, &store, lease())
                    .arg(&holder)
                    .arg(self.kind.name())
                    .arg(mine.map(|g| g.to_string()).unwrap_or_default())
                    .invoke(c)
            },
        );
        let what = self.address.describe();
        match reply {
            Ok(reply) => {
                let left = reply.get(1).copied().unwrap_or(0);
                if left == 0 {
                    forget(&keys.state, mine);
                }
                if reply.first() == Some(&0) {
                    tracing::warn!("{what}: this hold had lapsed; its permit was already returned");
                }
                Ok(left)
            }
            Err(Error::Redis { source, context }) => {
                let message = match source.code() {
                    Some("LOST") => {
                        forget(&keys.state, mine);
                        format!(
                            "{what} was lost: this hold (fencing token {}) is gone: its lease \
                             lapsed or another process released it, and the lock may have been \
                             granted to someone else",
                            mine.unwrap_or(0)
                        )
                    }
                    Some("UNLOCKED") => format!("release of {what}, which is not held"),
                    Some("NOTOWNER") => {
                        format!("cannot release {what}: it is held by another thread or process")
                    }
                    Some("TOOMANY") => {
                        // The script ended this process's hold all the same.
                        forget(&keys.state, mine);
                        format!("{what} released too many times (above its initial value)")
                    }
                    _ => {
                        return Err(self.address.error(Error::Redis { source, context }));
                    }
                };
                Err(Error::invalid_state(message))
            }
            Err(e) => Err(self.address.error(e)),
        }
    }

    /// Free permits now (`Semaphore.get_value()`; 0 for a held lock), after the permits of dead
    /// holders were reclaimed.
    pub(crate) fn value(&self) -> Result<i64> {
        let store = common::store()?;
        let keys = self.keys();
        store
            .with_conn(
                || format!("reading {}", self.address.describe()),
                |c| keys.invocation(&VALUE, &store, lease()).invoke(c),
            )
            .map_err(|e| self.address.error(e))
    }

    /// The fencing token of this process's (this thread's, for an RLock) current hold.
    pub(crate) fn token(&self) -> Option<u64> {
        held_grant(&self.keys().state, self.kind)
    }

    fn record(&self, token: u64, holder: &str) {
        let mut registry = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
        let held = registry.entry(self.keys().state).or_insert_with(|| Held {
            object: self.clone(),
            grants: Vec::new(),
        });
        match held.grants.iter_mut().find(|g| g.token == token) {
            // An RLock acquired again: the script gave the grant a lease again.
            Some(grant) => grant.detached = false,
            None => held.grants.push(HeldGrant {
                token,
                holder: holder.to_string(),
                lost: false,
                detached: false,
            }),
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
    /// The heartbeat found it gone; release reports it.
    lost: bool,
    /// Its lease was taken off at a clean exit (`grants_detach.lua`): not renewed any more.
    detached: bool,
}

static REGISTRY: LazyLock<Mutex<HashMap<String, Held>>> = LazyLock::new(Default::default);

/// The grant this process (this thread, for an RLock) holds on the object, newest first.
fn held_grant(state: &str, kind: GrantKind) -> Option<u64> {
    let registry = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    let held = registry.get(state)?;
    let me = kind.holder();
    held.grants
        .iter()
        .rev()
        .find(|g| kind != GrantKind::RLock || g.holder == me)
        .map(|g| g.token)
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
                    let lost_now = held
                        .grants
                        .iter_mut()
                        .filter(|g| !g.detached && lost.contains(&g.token));
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

/// The exit hook: takes the lease off every grant this process still holds, so that its holds
/// outlive it (see the module docs). Idempotent; a failure leaves the holds to lapse.
fn detach_all() {
    let work: Vec<(GrantObject, Vec<u64>)> = {
        let registry = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
        registry
            .values()
            .map(|h| {
                let held = h
                    .grants
                    .iter()
                    .filter(|g| !g.lost && !g.detached)
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
