//! An actor host: a worker process (or thread) that takes actors needing a host and runs their
//! messages.
//!
//! * The main loop reads the namespace's `activations` stream (consumer group `hosts`) and
//!   starts a thread for each actor it is asked to host and does not host, or is not
//!   activating, yet: the actor has a placeholder in the host's set from the request on, so a
//!   second request (two senders that both saw no lease) does not activate it again over the
//!   first activation (which the script allows its own host, and counts).
//! * An actor thread activates the actor (`actor_activate.lua`: a new lease and fencing token;
//!   nothing happens when another host holds it), restores its state with the type's registry
//!   entry (`#[derive(shoal::Actor)]`), then reads its mailbox from the first message not yet
//!   applied, in batches, and commits each batch (see the module docs of [`super`]), on a
//!   connection of its own: the read `WATCH`es the lease, so that the commit can be a plain
//!   transaction (see `ActorState::commit`). It stops when its lease is lost (a read finds it
//!   another's, a commit or a renewal is refused), when the actor stops or fails, or after
//!   `actors.idle_secs` without messages (deactivation: the lease is given back, the state is
//!   saved already, and the applied entries leave the mailbox; a message sent after the last
//!   read, while its sender still saw the lease, makes the release ask for a host).
//! * A heartbeat thread renews every lease every third of the lease, and, for a subprocess host,
//!   ends the process when the driver that started it is gone (its liveness key lapsed).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::streams::{StreamId, StreamReadReply};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use shoal_core::TaskErrorKind;
use shoal_core::auth;
use shoal_core::context::{self, AuthKey};
use shoal_core::error::{Error, Result};
use shoal_core::hosted::{self, ActorContext, HostedActor};
use shoal_core::registry::Failure;
use shoal_core::store::{HeldConn, Store};
use shoal_core::transfers::{SentTransfers, collect_transfers};

use super::{
    ACTIVATE, ActorKeys, BATCH, COMMIT, HANDBACK, HOSTS_GROUP, HostKeys, LEASE, Reply, field,
};
use crate::pool::EXIT_DRIVER_GONE;

/// How long a host's reads block before it looks at its stop conditions again.
const READ_BLOCK: Duration = Duration::from_millis(500);

/// What a host needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSpec {
    /// This host's id: its consumer name, and the prefix of its leases.
    pub host_id: String,
    /// The activation lease.
    pub lease_ms: u64,
    /// Idle time before an actor is deactivated.
    pub idle_ms: u64,
    /// Handler panics allowed within `restart_period_ms`.
    pub max_restarts: u32,
    /// The window of `max_restarts`.
    pub restart_period_ms: u64,
    /// The liveness key of the runtime that started the host, and its TTL; `None`: do not
    /// watch it (a host thread of that runtime).
    pub driver: Option<(String, u64)>,
}

/// The actors this host runs: id → the lease value and the flag that stops its thread.
#[derive(Default)]
struct Active {
    actors: Mutex<HashMap<String, ActiveActor>>,
    /// Activations started so far (numbers the placeholders).
    activations: std::sync::atomic::AtomicU64,
}

struct ActiveActor {
    /// The lease value, or a placeholder ([`Active::placeholder`]) while the actor is being
    /// activated.
    lease: String,
    /// Ends the actor's thread (a placeholder's is read by nobody: the thread it stands for
    /// checks the host's termination itself before its first read).
    stop: Arc<AtomicBool>,
    /// For a placeholder: another request for the actor came meanwhile (and was skipped).
    asked_again: AtomicBool,
}

/// How a placeholder's lease value starts (a lease value starts with a host id, a uuid).
const ACTIVATING: &str = "activating:";

impl ActiveActor {
    /// The entry of an actor whose activation is on its way, under a placeholder of its own.
    fn activating(placeholder: String) -> ActiveActor {
        ActiveActor {
            lease: placeholder,
            stop: Arc::new(AtomicBool::new(false)),
            asked_again: AtomicBool::new(false),
        }
    }

    /// Whether the lease is an activation's placeholder (nothing to renew yet).
    fn is_activating(&self) -> bool {
        self.lease.starts_with(ACTIVATING)
    }
}

impl Active {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, ActiveActor>> {
        self.actors.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A placeholder no other activation by this host has: the thread of an earlier
    /// activation of the same actor, ending, removes its own only.
    fn placeholder(&self) -> String {
        let n = self.activations.fetch_add(1, Ordering::Relaxed);
        format!("{ACTIVATING}{n}")
    }
}

/// Runs a host until it is told to stop (a thread host: `shoal::termination_requested()`), or
/// until the pool of actors' streams are gone. `Err` when Redis stays unreachable.
pub fn run_host(store: &Arc<Store>, spec: &HostSpec) -> Result<()> {
    let hosts = HostKeys::new(store.keys());
    super::create_activations(store, &hosts)?;
    let active = Arc::new(Active::default());
    let done = Arc::new(AtomicBool::new(false));
    let heartbeat = {
        let (store, spec, active, done) =
            (store.clone(), spec.clone(), active.clone(), done.clone());
        std::thread::Builder::new()
            .name("shoal-host-leases".into())
            .spawn(move || heartbeat(&store, &spec, &active, &done))
            .map_err(|e| Error::io("starting an actor host's heartbeat", e))?
    };
    let result = read_activations(store, spec, &hosts, &active);
    done.store(true, Ordering::Release);
    for actor in active.lock().values() {
        actor.stop.store(true, Ordering::Release);
    }
    let _ = heartbeat.join();
    let _ = store.with_conn(
        || format!("leaving {}", hosts.live),
        |c| {
            redis::cmd("ZREM")
                .arg(&hosts.live)
                .arg(&spec.host_id)
                .query::<()>(c)
        },
    );
    result
}

fn read_activations(
    store: &Arc<Store>,
    spec: &HostSpec,
    hosts: &HostKeys,
    active: &Arc<Active>,
) -> Result<()> {
    loop {
        if context::termination_requested() {
            return Ok(());
        }
        let read = store.retry_unreachable(|| {
            store.with_blocking_conn(
                Some(READ_BLOCK),
                || format!("reading {}", hosts.activations),
                |c| {
                    redis::cmd("XREADGROUP")
                        .arg("GROUP")
                        .arg(HOSTS_GROUP)
                        .arg(&spec.host_id)
                        .arg("COUNT")
                        .arg(64)
                        .arg("BLOCK")
                        .arg(READ_BLOCK.as_millis() as u64)
                        .arg("STREAMS")
                        .arg(&hosts.activations)
                        .arg(">")
                        .query::<Option<StreamReadReply>>(c)
                },
            )
        });
        let reply = match read {
            Ok(reply) => reply,
            Err(Error::Redis { source, .. }) if source.code() == Some("NOGROUP") => {
                // The stream expired while idle: make it again.
                super::create_activations(store, hosts)?;
                continue;
            }
            Err(e) => return Err(e),
        };
        let entries: Vec<StreamId> = reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .collect();
        if entries.is_empty() {
            continue;
        }
        let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        store.with_conn(
            || format!("acknowledging {}", hosts.activations),
            |c| {
                redis::pipe()
                    .xack(&hosts.activations, HOSTS_GROUP, &ids)
                    .ignore()
                    .xdel(&hosts.activations, &ids)
                    .ignore()
                    .query::<()>(c)
            },
        )?;
        let wanted: HashSet<String> = entries
            .iter()
            .filter_map(|e| e.get::<String>("a"))
            .collect();
        for actor in wanted {
            // An actor this host runs, or is activating: a second request for it (two senders
            // that both saw no lease) must not activate it again over its own activation.
            let placeholder = {
                let mut actors = active.lock();
                if let Some(entry) = actors.get(&actor) {
                    if entry.is_activating() {
                        entry.asked_again.store(true, Ordering::Release);
                    }
                    continue;
                }
                let placeholder = active.placeholder();
                actors.insert(actor.clone(), ActiveActor::activating(placeholder.clone()));
                placeholder
            };
            let name = format!(
                "shoal-actor-{}",
                &actor.chars().take(20).collect::<String>()
            );
            // The thread takes its actor out of `active` itself (see `ActiveEntry`).
            let spawned = {
                let (store, spec, hosts, active) =
                    (store.clone(), spec.clone(), hosts.clone(), active.clone());
                let (actor, placeholder) = (actor.clone(), placeholder.clone());
                std::thread::Builder::new().name(name).spawn(move || {
                    let served = serve_actor(&store, &spec, &hosts, &active, &actor, placeholder);
                    if let Err(e) = served {
                        tracing::warn!("actor {actor}: {e}");
                    }
                })
            };
            if let Err(e) = spawned {
                tracing::error!("cannot start an actor thread: {e}");
                ActiveEntry::placeholder(active, &actor, placeholder).remove();
            }
        }
    }
}

/// Runs one actor until it is deactivated, stops, fails, or its lease is lost.
fn serve_actor(
    store: &Arc<Store>,
    spec: &HostSpec,
    hosts: &HostKeys,
    active: &Active,
    actor_id: &str,
    placeholder: String,
) -> Result<()> {
    // Until the activation below makes it this activation's entry, the actor's place in
    // `active` is the main loop's placeholder: gone with this thread if it goes no further.
    let placeholder = ActiveEntry::placeholder(active, actor_id, placeholder);
    let keys = ActorKeys::new(store.keys(), actor_id);
    let limit = store.settings().max_message_bytes;
    let activated: Result<Vec<redis::Value>> = store.with_conn(
        || format!("activating actor {actor_id}"),
        |c| {
            ACTIVATE
                .key(&keys.state)
                .key(&keys.lease)
                .key(&keys.fence)
                .key(&keys.activating)
                .arg(&spec.host_id)
                .arg(spec.lease_ms)
                .arg(store.expiry_secs())
                .invoke(c)
        },
    );
    let activation = match activated {
        Ok(activation) => activation,
        Err(e) => {
            // A request the main loop skipped for this activation would be lost with it: ask
            // again (the request after the placeholder is gone is taken).
            if placeholder.asked_again() {
                drop(placeholder);
                if let Err(again) = super::request_activation(store, hosts, actor_id) {
                    tracing::warn!("{again}");
                }
            }
            return Err(e);
        }
    };
    let mut fields = activation.into_iter();
    let token: u64 = fields
        .next()
        .and_then(|v| redis::from_redis_value(v).ok())
        .unwrap_or(0);
    if token == 0 {
        // Another host has it.
        return Ok(());
    }
    let mut next_bytes = || -> Vec<u8> {
        fields
            .next()
            .and_then(|v| redis::from_redis_value::<Vec<u8>>(v).ok())
            .unwrap_or_default()
    };
    let actor_type = String::from_utf8_lossy(&next_bytes()).into_owned();
    let data = next_bytes();
    let applied = String::from_utf8_lossy(&next_bytes()).into_owned();
    let authenticated = next_bytes() == b"1";
    let status = String::from_utf8_lossy(&next_bytes()).into_owned();
    let failures_text = String::from_utf8_lossy(&next_bytes()).into_owned();
    let recorded_verifier = next_bytes();
    // Why a failed actor failed: its messages' error says so.
    let reason = String::from_utf8_lossy(&next_bytes()).into_owned();
    let lease = format!("{}:{token}", spec.host_id);
    // Another program may share the namespace: an actor it cannot run (its type is not in this
    // program, or it was created under another authkey, whose messages this host could not
    // check) is given back untouched, for a host of its own program to take at the next request.
    // A failed or stopped actor runs no user code: any host answers its messages.
    let runs_code = status.is_empty() || status == "active";
    let foreign = if !runs_code {
        None
    } else if hosted::lookup_type(&actor_type).is_none() {
        let program = std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        Some(format!(
            "actor type {actor_type} is not registered in {program}, the program of the hosts \
             that took it (#[derive(shoal::Actor)] in another build?)"
        ))
    } else if authenticated
        // An actor signed before verifiers were recorded has none: its messages' MACs decide.
        && !recorded_verifier.is_empty()
        && recorded_verifier[..] != super::verifier(&AuthKey::of_this_process(), actor_id)[..]
    {
        Some(
            "it was created under another authkey than its hosts' (a host checks messages \
             with its own process's key: one set with set_authkey after the hosts started?)"
                .to_string(),
        )
    } else {
        None
    };
    if let Some(why) = foreign {
        // Without the placeholder first: the request the hand-back makes must not be skipped by
        // this host's main loop as one for an actor it is activating.
        drop(placeholder);
        hand_back(store, spec, hosts, &keys, &lease, actor_id, &why);
        return Ok(());
    }
    let stop = Arc::new(AtomicBool::new(false));
    // Replaces the placeholder, whose drop then leaves this entry alone.
    let entry = ActiveEntry::insert(active, actor_id, &lease, &stop);
    let host_set = hosts.host_set(&spec.host_id);
    store.with_conn(
        || format!("recording actor {actor_id} on host {}", spec.host_id),
        |c| {
            redis::pipe()
                .sadd(&host_set, actor_id)
                .ignore()
                .expire(&host_set, store.expiry_secs() as i64)
                .ignore()
                .query::<()>(c)
        },
    )?;
    let mut state = ActorState {
        store,
        spec,
        keys: &keys,
        actor_id,
        actor_type: &actor_type,
        lease: &lease,
        limit,
        saved: data,
        applied,
        status: if status.is_empty() {
            "active".into()
        } else {
            status
        },
        reason,
        failures: failures_text
            .split(',')
            .filter_map(|t| t.parse::<u64>().ok())
            .collect(),
        authkey: authenticated.then(AuthKey::of_this_process),
        actor: None,
        link: HeldConn::default(),
        watching: None,
        unwatched: None,
        ttl_refreshed: None,
        committed_transfers: SentTransfers::default(),
        retired: Vec::new(),
    };
    let outcome = state.run(&stop);
    let _ = store.with_conn(
        || format!("forgetting actor {actor_id} on host {}", spec.host_id),
        |c| {
            redis::cmd("SREM")
                .arg(&host_set)
                .arg(actor_id)
                .query::<()>(c)
        },
    );
    match &outcome {
        Ok(Ending::Release) => {
            // Before the release, which may ask for a host: this host's main loop then takes
            // the request rather than skipping an actor it still runs.
            entry.remove();
            release_lease(store, spec, hosts, &keys, &lease, &state.applied, actor_id)
        }
        Ok(Ending::Lost) | Err(_) => {}
    }
    outcome.map(|_| ())
}

/// Gives back an activation this host cannot serve (see "Authentication" in the protocol's
/// module docs) and asks for another host, or fails the actor past the limit.
fn hand_back(
    store: &Store,
    spec: &HostSpec,
    hosts: &HostKeys,
    keys: &ActorKeys,
    lease: &str,
    actor_id: &str,
    why: &str,
) {
    let outcome: Result<String> = store.with_conn(
        || format!("giving actor {actor_id} back"),
        |c| {
            HANDBACK
                .key(&keys.state)
                .key(&keys.lease)
                .arg(lease)
                .arg(super::HANDBACK_LIMIT)
                .arg(why)
                .invoke(c)
        },
    );
    match outcome.as_deref() {
        Ok("again") => {
            tracing::debug!("host {} gives actor {actor_id} back: {why}", spec.host_id);
            if let Err(e) = super::request_activation(store, hosts, actor_id) {
                tracing::warn!("{e}");
            }
        }
        Ok("failed") => tracing::error!(
            "actor {actor_id} failed: no host could run it after {} tries (last: {why})",
            super::HANDBACK_LIMIT
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!("{e}"),
    }
}

/// An actor's place in this host's [`Active`] set, for as long as its thread serves this
/// activation: removed when the thread ends (whatever ends it), or before a release; only if
/// it is still this activation's (a later one of the same actor has its own).
struct ActiveEntry<'a> {
    active: &'a Active,
    actor_id: &'a str,
    lease: String,
}

impl<'a> ActiveEntry<'a> {
    /// The entry the main loop put in `active` under `placeholder` (see [`Active::placeholder`]).
    fn placeholder(active: &'a Active, actor_id: &'a str, placeholder: String) -> Self {
        ActiveEntry {
            active,
            actor_id,
            lease: placeholder,
        }
    }

    fn insert(
        active: &'a Active,
        actor_id: &'a str,
        lease: &str,
        stop: &Arc<AtomicBool>,
    ) -> ActiveEntry<'a> {
        active.lock().insert(
            actor_id.to_string(),
            ActiveActor {
                lease: lease.to_string(),
                stop: stop.clone(),
                asked_again: AtomicBool::new(false),
            },
        );
        ActiveEntry {
            active,
            actor_id,
            lease: lease.to_string(),
        }
    }

    /// Whether the main loop skipped a request for the actor while this entry stood.
    fn asked_again(&self) -> bool {
        self.active
            .lock()
            .get(self.actor_id)
            .is_some_and(|a| a.lease == self.lease && a.asked_again.load(Ordering::Acquire))
    }

    fn remove(&self) {
        let mut actors = self.active.lock();
        if actors
            .get(self.actor_id)
            .is_some_and(|a| a.lease == self.lease)
        {
            actors.remove(self.actor_id);
        }
    }
}

impl Drop for ActiveEntry<'_> {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Gives an activation lease back (if it is still this host's), with the mailbox's entries up
/// to `applied`, and asks for a host when a message came after the last read (see
/// `actor_lease.lua`).
fn release_lease(
    store: &Store,
    spec: &HostSpec,
    hosts: &HostKeys,
    keys: &ActorKeys,
    lease: &str,
    applied: &str,
    actor_id: &str,
) {
    let released: Result<i64> = store.with_conn(
        || format!("releasing actor {actor_id}"),
        |c| {
            LEASE
                .key(&keys.lease)
                .key(&keys.activating)
                .key(&keys.mailbox)
                .arg("release")
                .arg(lease)
                .arg(spec.lease_ms)
                .arg(applied)
                .invoke(c)
        },
    );
    match released {
        // A message came after the last read, while senders still saw this host.
        Ok(2) => {
            let requested =
                store.retry_unreachable(|| super::request_activation(store, hosts, actor_id));
            if let Err(e) = requested {
                // The marker set for this request would keep senders from asking.
                let _ = store.with_conn(
                    || format!("clearing the activation marker of actor {actor_id}"),
                    |c| redis::cmd("DEL").arg(&keys.activating).query::<()>(c),
                );
                tracing::warn!("{e}; the actor's next message asks for a host");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("{e}; the lease lapses by itself"),
    }
}

/// Why an actor thread ended.
enum Ending {
    /// Idle, stopped or failed: the lease is given back.
    Release,
    /// The lease was lost (another host has the actor).
    Lost,
}

/// One activation of one actor.
struct ActorState<'a> {
    store: &'a Store,
    spec: &'a HostSpec,
    keys: &'a ActorKeys,
    actor_id: &'a str,
    actor_type: &'a str,
    lease: &'a str,
    limit: usize,
    /// The last committed state.
    saved: Vec<u8>,
    applied: String,
    status: String,
    reason: String,
    /// Handler panics within the restart period (Unix ms).
    failures: Vec<u64>,
    /// The key messages must be signed with, for an authenticated actor.
    authkey: Option<AuthKey>,
    /// The live actor, restored from `saved`.
    actor: Option<Box<dyn HostedActor>>,
    /// Instances whose handler panicked, kept until `actor` is restored from `saved` (the
    /// restore is lazy: at the next message not skipped): their handles keep this host's holds
    /// of the state's pipe ends while the restored instance claims them again, without which
    /// an end that only this host holds would close in between.
    retired: Vec<Box<dyn HostedActor>>,
    /// This activation's own connection: its mailbox reads and its commits go on it, so a read
    /// can `WATCH` the lease for the commit after it (see [`ActorState::commit`]).
    link: HeldConn,
    /// The connection of `link` (its generation) on which the lease is watched, when it was
    /// this host's as the watch began.
    watching: Option<u64>,
    /// The connection of `link` (its generation) that watches nothing: its last command was an
    /// `EXEC`, which ends every watch, so the next read needs no `UNWATCH`.
    unwatched: Option<u64>,
    /// When a commit last refreshed the TTLs of the state and the mailbox.
    ttl_refreshed: Option<Instant>,
    /// The transfers this activation registered for the pipe ends in the last state it
    /// committed (see [`ActorState::apply_and_commit`]).
    committed_transfers: SentTransfers,
}

impl ActorState<'_> {
    fn run(&mut self, stop: &AtomicBool) -> Result<Ending> {
        // The mailbox holds the messages not yet applied, after at most a node of applied ones
        // (skipped: see `apply`), so reading it from the start, then after the last entry
        // read, sees every message once, in order, whatever another host read before.
        let mut read_after = "0-0".to_string();
        let mut last_message = Instant::now();
        let idle = Duration::from_millis(self.spec.idle_ms);
        loop {
            if stop.load(Ordering::Acquire) {
                return Ok(Ending::Lost);
            }
            if context::termination_requested() {
                return Ok(Ending::Release);
            }
            let Some(entries) = self.read(&read_after)? else {
                return Ok(Ending::Lost);
            };
            let Some(last) = entries.last() else {
                if last_message.elapsed() >= idle {
                    return Ok(Ending::Release);
                }
                continue;
            };
            read_after = last.id.clone();
            last_message = Instant::now();
            match self.apply_and_commit(&entries)? {
                Some(ending) => return Ok(ending),
                None if self.status != "active" => return Ok(Ending::Release),
                None => {}
            }
        }
    }

    /// The next batch of the mailbox after entry `after`, waiting at most [`READ_BLOCK`] for
    /// one; `None` when the lease is no longer this host's. A plain `XREAD`, not a consumer
    /// group's: a host that lost its lease (paused, cut off) and reads again takes nothing from
    /// its successor.
    ///
    /// The same round trip then `WATCH`es the lease and reads it: when it is this host's, the
    /// commit of what this read returned can be a plain transaction, which fails if anyone
    /// wrote the lease since (see [`ActorState::commit`]). The watch begins once the `XREAD`
    /// has returned (`UNWATCH` first drops the previous one, which a renewal during the wait
    /// may have spoilt, unless the connection's last command was the commit's `EXEC`, which
    /// ended it); a token is never given twice, so a lease that holds this host's token then
    /// has been this host's all along.
    fn read(&mut self, after: &str) -> Result<Option<Vec<StreamId>>> {
        let (store, keys) = (self.store, self.keys);
        // A connection that watches nothing yet (or a new one) needs no UNWATCH.
        let unwatched = self.unwatched.take() == Some(self.link.generation());
        let link = &mut self.link;
        self.watching = None;
        let (reply, holder) = store.retry_unreachable(|| {
            store.with_held_conn(
                link,
                Some(READ_BLOCK),
                || format!("reading {}", keys.mailbox),
                |c| {
                    let mut read = redis::pipe();
                    read.cmd("XREAD")
                        .arg("COUNT")
                        .arg(BATCH)
                        .arg("BLOCK")
                        .arg(READ_BLOCK.as_millis() as u64)
                        .arg("STREAMS")
                        .arg(&keys.mailbox)
                        .arg(after);
                    if !unwatched {
                        read.cmd("UNWATCH").ignore();
                    }
                    read.cmd("WATCH")
                        .arg(&keys.lease)
                        .ignore()
                        .get(&keys.lease)
                        .query::<(Option<StreamReadReply>, Option<String>)>(c)
                },
            )
        })?;
        if holder.as_deref() != Some(self.lease) {
            return Ok(None);
        }
        self.watching = Some(self.link.generation());
        Ok(Some(
            reply
                .into_iter()
                .flat_map(|r| r.keys)
                .flat_map(|k| k.ids)
                .collect(),
        ))
    }

    fn restore(&mut self) -> std::result::Result<&mut Box<dyn HostedActor>, String> {
        if self.actor.is_none() {
            let actor_type = self.actor_type;
            let Some(entry) = hosted::lookup_type(actor_type) else {
                let program = std::env::current_exe()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                return Err(format!(
                    "actor type {actor_type} is not registered in {program}, the program this \
                     host runs (#[derive(shoal::Actor)] in another build?)"
                ));
            };
            let actor = (entry.restore)(&self.saved, self.limit).map_err(|f| {
                format!(
                    "the saved state of actor {} does not decode: {}",
                    self.actor_id, f.message
                )
            })?;
            self.actor = Some(actor);
            self.retired.clear();
        }
        self.actor
            .as_mut()
            .ok_or_else(|| "the actor is not restored".to_string())
    }

    /// Applies a batch and commits it; `Some(ending)` when the actor thread must end.
    fn apply_and_commit(&mut self, entries: &[StreamId]) -> Result<Option<Ending>> {
        let mut poisoned: HashMap<String, String> = HashMap::new();
        let replies = loop {
            match self.apply(entries, &mut poisoned) {
                Ok(replies) => break replies,
                Err(()) => {
                    // A handler panicked: restart from the last committed state, without it
                    // (kept until then: see `retired`).
                    self.retired.extend(self.actor.take());
                }
            }
        };
        // Saving a state that holds pipe ends passes them (a transfer each, for whoever
        // decodes it next: see `shoal_core::transfers`). Once a state is committed, the one it
        // replaces will never be decoded, and its transfers are given back, and so are the
        // committed state's own once the actor is stopped or failed (it is never decoded
        // again); those of a state that could not be saved, at once.
        let (data, transfers) = match &self.actor {
            Some(actor) => match collect_transfers(|| actor.save(self.limit)) {
                (Ok(data), transfers) => (data, Some(transfers)),
                (Err(f), transfers) => {
                    give_back(transfers);
                    self.fail(format!("its state cannot be saved: {}", f.message));
                    (self.saved.clone(), None)
                }
            },
            None => (self.saved.clone(), None),
        };
        // Never back: a batch of entries applied before (a new host reads those the trim by
        // nodes left) changes nothing but their removal.
        let applied = match entries.last() {
            Some(last) if is_after(&last.id, &self.applied) => last.id.clone(),
            _ => self.applied.clone(),
        };
        let committed = self.commit(&data, &applied, &replies);
        match committed {
            Ok(()) => {
                self.saved = data;
                self.applied = applied;
                if let Some(transfers) = transfers {
                    give_back(std::mem::replace(&mut self.committed_transfers, transfers));
                }
                if self.status != "active" {
                    give_back(std::mem::take(&mut self.committed_transfers));
                }
                Ok(None)
            }
            // Not committed, unless an attempt whose answer was lost was (the script then
            // finds the lease gone): the transfers stay, renewed while this host lives.
            Err(Error::Redis { source, .. }) if source.code() == Some("STALE") => {
                Ok(Some(Ending::Lost))
            }
            // Perhaps committed: the same.
            Err(e) => Err(e),
        }
    }

    /// Runs every entry; `Err(())` after the first new panic (recorded in `poisoned`).
    fn apply(
        &mut self,
        entries: &[StreamId],
        poisoned: &mut HashMap<String, String>,
    ) -> std::result::Result<Vec<(String, String, Vec<u8>)>, ()> {
        let mut replies = Vec::with_capacity(entries.len());
        for entry in entries {
            let mut reply_key = entry.get::<String>("r").unwrap_or_default();
            if !reply_key.is_empty() && !reply_key.starts_with(&self.keys.reply_prefix) {
                // Not a reply key of this actor (only a message written by other means has
                // one): a reply is never written outside the actor's keys.
                tracing::warn!(
                    "actor {}: entry {} names reply key {reply_key:?}, not one of the actor's; \
                     no reply is written",
                    self.actor_id,
                    entry.id
                );
                reply_key.clear();
            }
            if !is_after(&entry.id, &self.applied) {
                // Committed already (its reply too): only remove it.
                replies.push((entry.id.clone(), String::new(), Vec::new()));
                continue;
            }
            let reply = self.apply_one(entry, poisoned)?;
            let encoded = if reply_key.is_empty() {
                Vec::new()
            } else {
                self.store.encode(&reply, &reply_key).unwrap_or_else(|e| {
                    self.store
                        .encode(&Reply::Error(e.to_string()), &reply_key)
                        .unwrap_or_default()
                })
            };
            replies.push((entry.id.clone(), reply_key, encoded));
        }
        Ok(replies)
    }

    fn apply_one(
        &mut self,
        entry: &StreamId,
        poisoned: &mut HashMap<String, String>,
    ) -> std::result::Result<Reply, ()> {
        if let Some(message) = poisoned.get(&entry.id) {
            // The panic that restarted the batch (the last one may have failed the actor).
            return Ok(Reply::Panic(message.clone()));
        }
        match self.status.as_str() {
            "failed" => return Ok(Reply::Failed(self.reason.clone())),
            "stopped" => return Ok(Reply::Stopped),
            _ => {}
        }
        let (Some(kind), Some(payload)) = (field(entry, "k"), field(entry, "p")) else {
            let e = super::malformed(&self.keys.mailbox, &entry.id);
            return Ok(Reply::Error(e.to_string()));
        };
        if let Some(key) = &self.authkey {
            let reply_to = field(entry, "r").unwrap_or_default();
            let mac = field(entry, "h").unwrap_or_default();
            if let Err(e) = auth::verify(key, &[&kind, &payload, &reply_to], &mac, self.actor_id) {
                return Ok(Reply::Unauthenticated(e.to_string()));
            }
        }
        let kind = String::from_utf8_lossy(&kind).into_owned();
        if kind == super::STOP_KIND {
            self.status = "stopped".into();
            return Ok(Reply::Ok(ByteBuf::new()));
        }
        let limit = self.limit;
        let mut context = ActorContext::new(self.actor_id);
        let actor = match self.restore() {
            Ok(actor) => actor,
            Err(reason) => {
                self.fail(reason.clone());
                return Ok(Reply::Failed(reason));
            }
        };
        match actor.handle(&kind, &payload, limit, &mut context) {
            Ok(bytes) => {
                if context.stop_requested() {
                    self.status = "stopped".into();
                }
                Ok(Reply::Ok(ByteBuf::from(bytes)))
            }
            Err(Failure {
                kind: TaskErrorKind::Panic,
                message,
            }) => {
                poisoned.insert(entry.id.clone(), message.clone());
                self.record_panic(&message);
                Err(())
            }
            Err(failure) => Ok(Reply::Error(failure.message)),
        }
    }

    fn record_panic(&mut self, message: &str) {
        let now = shoal_core::clock::now_ms();
        let period = self.spec.restart_period_ms;
        self.failures.retain(|t| now.saturating_sub(*t) <= period);
        self.failures.push(now);
        if self.failures.len() > self.spec.max_restarts as usize {
            self.fail(format!(
                "{} handler panics within {} ms exceed actors.max_restarts = {} (last: {message})",
                self.failures.len(),
                period,
                self.spec.max_restarts
            ));
        }
    }

    fn fail(&mut self, reason: String) {
        tracing::error!("actor {} failed: {reason}", self.actor_id);
        self.status = "failed".into();
        self.reason = reason;
    }

    /// Commits a batch: the state after it, the last entry applied, the replies to its asks,
    /// and its removal from the mailbox, only while the lease is this host's.
    ///
    /// When the read that returned the batch found the lease this host's and watched it, the
    /// commit is a `MULTI`/`EXEC` transaction on the same connection: `EXEC` applies it only if
    /// nobody wrote the lease since (a successor taking it, or the lease lapsing, aborts it).
    /// That costs Redis a fraction of a script's run. A transaction that did not run (aborted,
    /// a renewal touched the lease, or the connection failed) is followed by the commit script
    /// (`actor_commit.lua`), which checks the lease itself and is the authority: it commits,
    /// or answers `STALE`. Committing twice (the transaction ran, but its answer was lost) writes
    /// the same state again and a second copy of each reply, under its ask's own key, which
    /// nobody reads and which expires.
    ///
    /// The transaction trims the mailbox by whole stream nodes below the last entry applied
    /// (`XTRIM MINID ~ <applied>`): emptying the stream at every batch, only for the next
    /// message to make a new node, cost Redis more than the rest of the commit. It refreshes
    /// the TTLs of the state and the mailbox once per [`ttl_refresh_every`]. The script trims
    /// every entry applied and refreshes the TTLs every time.
    fn commit(
        &mut self,
        data: &[u8],
        applied: &str,
        replies: &[(String, String, Vec<u8>)],
    ) -> Result<()> {
        let failures = self
            .failures
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let reply_ttl_ms = self.store.expiry_secs().saturating_mul(1000);
        let trim_from = next_entry_id(applied);
        let refresh_ttls = self
            .ttl_refreshed
            .is_none_or(|at| at.elapsed() >= ttl_refresh_every(self.store.expiry_secs()));
        // EXEC ends the watch, whatever its outcome. A connection opened since the read has
        // none: the script then.
        if self.watching.take() == Some(self.link.generation()) {
            let mut transaction = redis::pipe();
            transaction
                .atomic()
                .hset_multiple(
                    &self.keys.state,
                    &[
                        ("data", data),
                        ("applied", applied.as_bytes()),
                        ("status", self.status.as_bytes()),
                        ("reason", self.reason.as_bytes()),
                        ("failures", failures.as_bytes()),
                        ("handbacks", b"0"),
                    ],
                )
                .ignore();
            for (_, key, reply) in replies.iter().filter(|(_, key, _)| !key.is_empty()) {
                transaction
                    .rpush(key, reply.as_slice())
                    .ignore()
                    .pexpire(key, reply_ttl_ms as i64)
                    .ignore();
            }
            // Whole stream nodes below the last entry applied (see "Exactly once" in the
            // protocol's docs): that entry stays, and so does its node, for the next messages.
            transaction
                .cmd("XTRIM")
                .arg(&self.keys.mailbox)
                .arg("MINID")
                .arg("~")
                .arg(applied)
                .ignore();
            if refresh_ttls {
                transaction
                    .expire(&self.keys.state, self.store.expiry_secs() as i64)
                    .ignore()
                    .expire(&self.keys.mailbox, self.store.expiry_secs() as i64)
                    .ignore();
            }
            let executed = self.store.with_held_conn(
                &mut self.link,
                // The read's timeout (0.5 s longer than a commit needs): the socket keeps it,
                // rather than two changes of it per batch.
                Some(READ_BLOCK),
                || format!("committing actor {}", self.actor_id),
                |c| transaction.query::<Option<()>>(c),
            );
            if executed.is_ok() {
                self.unwatched = Some(self.link.generation());
            }
            match executed {
                Ok(Some(())) => {
                    if refresh_ttls {
                        self.ttl_refreshed = Some(Instant::now());
                    }
                    return Ok(());
                }
                // Aborted: the script decides.
                Ok(None) => {}
                // Unknown whether it ran: the script again (see above).
                Err(e) if e.is_store_unreachable() => {}
                Err(e) => return Err(e),
            }
        }
        self.store.retry_unreachable(|| {
            self.store.with_conn(
                || format!("committing actor {}", self.actor_id),
                |c| {
                    let mut invocation = COMMIT.prepare_invoke();
                    invocation
                        .key(&self.keys.state)
                        .key(&self.keys.mailbox)
                        .key(&self.keys.lease)
                        .arg(self.lease)
                        .arg(data)
                        .arg(applied)
                        .arg(&self.status)
                        .arg(&self.reason)
                        .arg(&failures)
                        .arg(self.store.expiry_secs())
                        .arg(reply_ttl_ms)
                        .arg(&trim_from);
                    for (_, key, reply) in replies.iter().filter(|(_, key, _)| !key.is_empty()) {
                        invocation.arg(key).arg(reply.as_slice());
                    }
                    invocation.invoke::<i64>(c)
                },
            )
        })?;
        Ok(())
    }
}

/// Gives back the transfers of a state that will not be decoded (see
/// [`ActorState::apply_and_commit`]); one that cannot be given back lapses after the lease.
fn give_back(transfers: SentTransfers) {
    if let Err(e) = transfers.release() {
        tracing::warn!("giving back the pipe ends of an actor's former state: {e}");
    }
}

/// How long a commit goes without refreshing the TTLs of the actor's state and mailbox, for
/// keys that expire `expiry_secs` after their last refresh: a tenth of that (at most a minute),
/// so that they outlive the last commit by 90% of `expiry_secs` at least.
fn ttl_refresh_every(expiry_secs: u64) -> Duration {
    Duration::from_millis(expiry_secs.saturating_mul(100)).min(Duration::from_secs(60))
}

/// The smallest stream entry id after `applied` (`<ms>-<seq>`): the commit script trims the
/// mailbox below it. An id that does not parse (never one Redis gave) trims below itself.
fn next_entry_id(applied: &str) -> String {
    match applied.split_once('-') {
        Some((ms, seq)) if ms.parse::<u64>().is_ok() => match seq.parse::<u64>() {
            Ok(seq) if seq < u64::MAX => format!("{ms}-{}", seq + 1),
            Ok(_) => match ms.parse::<u64>() {
                Ok(ms) if ms < u64::MAX => format!("{}-0", ms + 1),
                _ => applied.to_string(),
            },
            Err(_) => applied.to_string(),
        },
        _ => applied.to_string(),
    }
}

/// Whether stream entry `id` comes after `applied` (`<ms>-<seq>` ids).
fn is_after(id: &str, applied: &str) -> bool {
    let parse = |s: &str| -> (u64, u64) {
        let (ms, seq) = s.split_once('-').unwrap_or((s, "0"));
        (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
    };
    parse(id) > parse(applied)
}

/// Renews the leases of every active actor every third of the lease, and ends the process when
/// the driver is gone.
fn heartbeat(store: &Store, spec: &HostSpec, active: &Active, done: &AtomicBool) {
    let lease = Duration::from_millis(spec.lease_ms);
    let every = (lease / 3).max(Duration::from_millis(10));
    let step = Duration::from_millis(10).min(every);
    let mut driver_missing_since: Option<Instant> = None;
    let hosts = HostKeys::new(store.keys());
    loop {
        // This host is alive: askers of actors without a host check that one is.
        let _ = store.with_conn(
            || format!("stamping {}", hosts.live),
            |c| {
                redis::pipe()
                    .zadd(&hosts.live, &spec.host_id, shoal_core::clock::now_ms())
                    .ignore()
                    .expire(&hosts.live, store.expiry_secs() as i64)
                    .ignore()
                    .query::<()>(c)
            },
        );
        let leases: Vec<(String, String)> = active
            .lock()
            .iter()
            .filter(|(_, a)| !a.is_activating())
            .map(|(id, a)| (id.clone(), a.lease.clone()))
            .collect();
        for (id, value) in leases {
            let keys = ActorKeys::new(store.keys(), &id);
            let renewed: std::result::Result<i64, Error> = store.with_conn(
                || format!("renewing actor {id}"),
                |c| {
                    LEASE
                        .key(&keys.lease)
                        .key(&keys.activating)
                        .arg("renew")
                        .arg(&value)
                        .arg(spec.lease_ms)
                        .invoke(c)
                },
            );
            // The activation renewed, not a later one of the same actor by this host.
            if let Ok(0) = renewed
                && let Some(actor) = active.lock().get(&id).filter(|a| a.lease == value)
            {
                tracing::warn!("actor {id}: its lease was lost; another host has it");
                actor.stop.store(true, Ordering::Release);
            }
        }
        if let Some((key, ttl_ms)) = &spec.driver {
            let alive: std::result::Result<bool, Error> = store.with_conn(
                || format!("checking {key}"),
                |c| redis::cmd("EXISTS").arg(key).query(c),
            );
            match alive {
                Ok(true) => driver_missing_since = None,
                Ok(false) => {
                    let since = *driver_missing_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= Duration::from_millis(ttl_ms / 2) {
                        eprintln!(
                            "shoal actor host {}: its driver is gone; exiting",
                            spec.host_id
                        );
                        std::process::exit(EXIT_DRIVER_GONE);
                    }
                }
                Err(_) => {}
            }
        }
        let mut slept = Duration::ZERO;
        while slept < every {
            if done.load(Ordering::Acquire) {
                return;
            }
            std::thread::sleep(step);
            slept += step;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{is_after, next_entry_id, ttl_refresh_every};
    use std::time::Duration;

    #[test]
    fn ttls_are_refreshed_every_tenth_of_the_expiry_and_at_least_every_minute() {
        assert_eq!(ttl_refresh_every(1), Duration::from_millis(100));
        assert_eq!(ttl_refresh_every(60), Duration::from_secs(6));
        assert_eq!(ttl_refresh_every(3600), Duration::from_secs(60));
        assert_eq!(ttl_refresh_every(u64::MAX), Duration::from_secs(60));
    }

    #[test]
    fn the_trim_starts_right_after_the_last_entry_applied() {
        assert_eq!(next_entry_id("1796611704851-1"), "1796611704851-2");
        assert_eq!(next_entry_id("5-0"), "5-1");
        assert_eq!(next_entry_id(&format!("5-{}", u64::MAX)), "6-0");
        assert!(is_after(&next_entry_id("9-9"), "9-9"));
        // Never an id Redis gives: trimmed below itself, nothing after it lost.
        assert_eq!(next_entry_id("garbage"), "garbage");
        assert_eq!(next_entry_id("5-x"), "5-x");
        assert_eq!(
            next_entry_id(&format!("{}-{}", u64::MAX, u64::MAX)),
            format!("{}-{}", u64::MAX, u64::MAX)
        );
    }

    #[test]
    fn stream_ids_compare_by_time_then_sequence() {
        assert!(is_after("5-0", "0-0"));
        assert!(is_after("5-1", "5-0"));
        assert!(is_after("10-0", "9-9"));
        assert!(!is_after("5-0", "5-0"));
        assert!(!is_after("4-9", "5-0"));
    }
}
