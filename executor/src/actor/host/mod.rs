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
//!   applied, in batches (one message per batch, each marked before it runs, while the
//!   messages left by a holder that went without releasing the actor are run: "Host deaths"
//!   in [`super`]), and commits each batch (see the module docs of [`super`]), on a
//!   connection of its own: the read `WATCH`es the lease, so that the commit can be a plain
//!   transaction (see `ActorState::commit`). It stops when its lease is lost (a read finds it
//!   another's, a commit or a renewal is refused), when the actor stops or fails, or after
//!   `actors.idle_secs` without messages (deactivation: the lease is given back, the state is
//!   saved already, and the applied entries leave the mailbox; a message sent after the last
//!   read, while its sender still saw the lease, makes the release ask for a host). Whatever
//!   ends the thread (a lost lease, an error) ends with the same release: a lease still this
//!   host's is given back, and a lease that lapsed with messages in the mailbox (a host paused
//!   or cut off past its lease) asks for a host, rather than leaving them to the next sender.
//! * Every lease (1 s to 30 s) the main loop also takes over the activation requests left
//!   pending on a consumer that read them and never acknowledged them (a host that died in
//!   between), once they are two leases (2 s at least) old (`XAUTOCLAIM`), and deletes the
//!   consumers of the group that hold no request and were handed none for ten leases (5 s at
//!   least; `hosts_prune.lua`): hosts gone without being retired, and live ones that Redis
//!   makes again when it next hands them a request.
//! * A heartbeat thread renews every lease every third of the lease (and with it, once per
//!   tenth of `redis.expiry_secs`, a minute at most, the TTLs of the actor's state, mailbox and
//!   fencing counter), stamps the host's heartbeat in `live`, takes over from the hosts whose
//!   heartbeats are older than ten leases (5 s at least: killed with their runtime, frozen,
//!   cut off; their actors whose lease lapsed are put up for activation, so that messages sent
//!   while their senders saw the lease do not wait for the next send, and the hosts leave
//!   `live` and the group), and, for a subprocess host, ends the process when the
//!   driver that started it is gone (its liveness key lapsed), after leaving `live` and the
//!   group.
//! * A host that ends in order leaves `live` and the group ([`super::retire_host`]: the
//!   requests it read and did not acknowledge are made again first); so does the supervisor for
//!   a host whose exit it sees ([`super::orphan_host`]).

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
    ACTIVATE, ActorKeys, BATCH, COMMIT, HANDBACK, HOST_DEATHS_PER_MESSAGE, HOSTS_GROUP, HostKeys,
    RUNNING, Reply, field,
};
use crate::pool::EXIT_DRIVER_GONE;

mod activation;

use activation::*;

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
    leave(store, &hosts, &spec.host_id);
    result
}

/// Takes a host that reads no more out of the live hosts and out of the hosts' group (see
/// [`super::retire_host`]), best-effort: what is left is pruned by the other hosts (see
/// [`stale_after`]), and the supervisor that sees the host exit retires it too.
fn leave(store: &Store, hosts: &HostKeys, host_id: &str) {
    let left = store.with_conn(
        || format!("leaving {}", hosts.live),
        |c| {
            redis::cmd("ZREM")
                .arg(&hosts.live)
                .arg(host_id)
                .query::<()>(c)
        },
    );
    if let Err(e) = left.and_then(|()| super::retire_host(store, hosts, host_id)) {
        tracing::debug!("{e}");
    }
}

/// Takes over from a host whose heartbeat is older than [`stale_after`] (killed with its
/// runtime, frozen, cut off): asks for a host for each of its actors whose lease lapsed (a
/// message its senders sent while they saw that lease would otherwise wait for the next
/// send), then takes it out of the live hosts and the hosts' group ([`leave`]). An actor whose
/// lease is still there (a host whose clock runs behind, not gone) is left to it. A host that
/// was only frozen and comes back finds its leases gone (its commits are fenced off), stamps
/// its heartbeat again and reads requests as a new consumer. Best-effort: what fails is tried
/// at the next heartbeat (the host stays in `live` until [`leave`] took it out).
fn take_over(store: &Store, hosts: &HostKeys, host_id: &str) {
    let set = hosts.host_set(host_id);
    let actors: Result<Vec<String>> = store.with_conn(
        || format!("reading {set}"),
        |c| redis::cmd("SMEMBERS").arg(&set).query(c),
    );
    let requested = actors.and_then(|actors| {
        for actor in actors {
            let keys = ActorKeys::new(store.keys(), &actor);
            let held: bool = store.with_conn(
                || format!("reading the lease of actor {actor}"),
                |c| redis::cmd("EXISTS").arg(&keys.lease).query(c),
            )?;
            if !held {
                super::request_activation(store, hosts, &actor)?;
            }
        }
        Ok(())
    });
    match requested {
        Ok(()) => {
            tracing::debug!("host {host_id} is gone: its actors were put up for activation");
            leave(store, hosts, host_id);
        }
        Err(e) => tracing::debug!("taking over from host {host_id}: {e}"),
    }
}

/// How long a host's heartbeat (in `live`) may be old, or its consumer of the hosts' group
/// idle with no request pending, before another host removes it: [`STALE_LEASES`] leases,
/// [`MIN_STALE`] at least. Askers count as running only the hosts stamped within 3 leases of
/// theirs.
fn stale_after(spec: &HostSpec) -> Duration {
    Duration::from_millis(spec.lease_ms)
        .saturating_mul(STALE_LEASES)
        .max(MIN_STALE)
}

/// See [`stale_after`].
const STALE_LEASES: u32 = 10;
/// See [`stale_after`].
const MIN_STALE: Duration = Duration::from_secs(5);

fn read_activations(
    store: &Arc<Store>,
    spec: &HostSpec,
    hosts: &HostKeys,
    active: &Arc<Active>,
) -> Result<()> {
    let mut last_claim = Instant::now();
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
            // The stream expired (no request for `redis.expiry_secs`), perhaps made again since
            // by a sender's request, without the group: Redis ends a read blocked on it then
            // (`UNBLOCKED`: the stream is gone; `NOGROUP`: it came back without the group), and
            // the next read finds no group (`NOGROUP`). Make them again; the group starts at the
            // stream's first entry, so a request already there is read (see
            // `create_activations`).
            Err(Error::Redis { source, .. })
                if matches!(source.code(), Some("NOGROUP" | "UNBLOCKED")) =>
            {
                super::create_activations(store, hosts)?;
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut entries: Vec<StreamId> = reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .collect();
        if last_claim.elapsed() >= claim_every(spec) {
            last_claim = Instant::now();
            entries.extend(claim_abandoned(store, spec, hosts));
            // The consumers of hosts gone without being retired (their pending requests
            // are taken over above first).
            if let Err(e) = super::prune_hosts(store, hosts, &spec.host_id, stale_after(spec)) {
                tracing::debug!("{e}");
            }
        }
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

/// How often a host looks for activation requests abandoned by their reader.
fn claim_every(spec: &HostSpec) -> Duration {
    Duration::from_millis(spec.lease_ms).clamp(Duration::from_secs(1), Duration::from_secs(30))
}

/// How long an activation request stays read and unacknowledged before another host takes it
/// over: a live host acknowledges what it reads at once.
fn claim_idle(spec: &HostSpec) -> Duration {
    Duration::from_millis(spec.lease_ms.saturating_mul(2)).max(Duration::from_secs(2))
}

/// Takes over (`XAUTOCLAIM`) the activation requests a consumer of the group read and never
/// acknowledged for [`claim_idle`]: a host that died between its read and its acknowledgement
/// took them, and their actors' messages would wait for the next sender. Errors are logged: the
/// next round tries again.
fn claim_abandoned(store: &Store, spec: &HostSpec, hosts: &HostKeys) -> Vec<StreamId> {
    let claimed: Result<redis::streams::StreamAutoClaimReply> = store.with_conn(
        || format!("claiming abandoned requests of {}", hosts.activations),
        |c| {
            redis::cmd("XAUTOCLAIM")
                .arg(&hosts.activations)
                .arg(HOSTS_GROUP)
                .arg(&spec.host_id)
                .arg(claim_idle(spec).as_millis() as u64)
                .arg("0-0")
                .arg("COUNT")
                .arg(64)
                .query(c)
        },
    );
    match claimed {
        Ok(reply) => {
            if !reply.claimed.is_empty() {
                tracing::info!(
                    "host {} takes over {} abandoned activation requests",
                    spec.host_id,
                    reply.claimed.len()
                );
            }
            reply.claimed
        }
        Err(e) => {
            tracing::debug!("{e}");
            Vec::new()
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
                .key(&keys.mailbox)
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
    // Host deaths (see "Host deaths" in the protocol's module docs): the last entry pending
    // when the previous holder went without releasing the actor (empty: it released it, or
    // nothing waits), and the entry its hosts died on, with how many times.
    let suspect_until = String::from_utf8_lossy(&next_bytes()).into_owned();
    let deaths_entry = String::from_utf8_lossy(&next_bytes()).into_owned();
    let deaths: u32 = String::from_utf8_lossy(&next_bytes()).parse().unwrap_or(0);
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
        let suspect = !suspect_until.is_empty();
        hand_back(store, spec, hosts, &keys, &lease, actor_id, &why, suspect);
        return Ok(());
    }
    let stop = Arc::new(AtomicBool::new(false));
    // Replaces the placeholder, whose drop then leaves this entry alone.
    let entry = ActiveEntry::insert(active, actor_id, &lease, &stop);
    let host_set = hosts.host_set(&spec.host_id);
    let recorded = store.with_conn(
        || format!("recording actor {actor_id} on host {}", spec.host_id),
        |c| {
            redis::pipe()
                .sadd(&host_set, actor_id)
                .ignore()
                .expire(&host_set, store.expiry_secs() as i64)
                .ignore()
                .query::<()>(c)
        },
    );
    if let Err(e) = recorded {
        entry.remove();
        release_lease(store, spec, hosts, &keys, &lease, "", actor_id);
        return Err(e);
    }
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
        deaths: HostDeaths::new(runs_code, suspect_until, deaths_entry, deaths),
    };
    if state.deaths.suspect_until.is_some() {
        tracing::info!(
            "actor {actor_id}: its previous host went without releasing it; the messages it \
             left are run one by one"
        );
    }
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
    // Before the release, which may ask for a host: this host's main loop then takes the
    // request rather than skipping an actor it still runs.
    entry.remove();
    // Whatever ended the thread: given back when still this host's (idle, stopped, failed, or
    // an error that left it here), and either way a host is asked for when the mailbox holds
    // messages nobody will read otherwise (a lease that lapsed, with messages sent while their
    // senders still saw it: see `actor_lease.lua`). A lease another host holds is its.
    release_lease(store, spec, hosts, &keys, &lease, &state.applied, actor_id);
    outcome.map(|_| ())
}

/// Gives back an activation this host cannot serve (see "Authentication" in the protocol's
/// module docs) and asks for another host (after [`handback_pause`] once the actor's run of
/// give-backs is past the limit, so that hosts that cannot run it do not pass it around as
/// fast as Redis answers until the window is over), or fails the actor past the limit and the
/// window. An actor with no message waiting is only given back: its next message asks for a
/// host. `suspect`: the activation found the actor's previous holder gone without releasing it
/// (its `held` mark then stays, for the host that serves it next: see "Host deaths" in the
/// protocol's module docs).
#[allow(clippy::too_many_arguments)]
fn hand_back(
    store: &Store,
    spec: &HostSpec,
    hosts: &HostKeys,
    keys: &ActorKeys,
    lease: &str,
    actor_id: &str,
    why: &str,
    suspect: bool,
) {
    let window = super::handback_window(Duration::from_millis(spec.lease_ms));
    let outcome: Result<String> = store.with_conn(
        || format!("giving actor {actor_id} back"),
        |c| {
            HANDBACK
                .key(&keys.state)
                .key(&keys.lease)
                .key(&keys.mailbox)
                .arg(lease)
                .arg(super::HANDBACK_LIMIT)
                .arg(why)
                .arg(window.as_millis() as u64)
                .arg(if suspect { "1" } else { "0" })
                .invoke(c)
        },
    );
    match outcome.as_deref() {
        Ok(again @ ("again" | "later")) => {
            tracing::debug!("host {} gives actor {actor_id} back: {why}", spec.host_id);
            if again == "later" {
                pause_unless_terminating(handback_pause(spec));
            }
            if let Err(e) = super::request_activation(store, hosts, actor_id) {
                tracing::warn!("{e}");
            }
        }
        Ok("failed") => tracing::error!(
            "actor {actor_id} failed: no host could run it for {window:?} ({} tries or more; \
             last: {why})",
            super::HANDBACK_LIMIT
        ),
        Ok("idle") => tracing::debug!(
            "host {} gives actor {actor_id} back, with no message waiting: {why}",
            spec.host_id
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!("{e}"),
    }
}

/// The pause before a host asks for another host for an actor it gave back, once the actor's
/// run of give-backs is past [`super::HANDBACK_LIMIT`]: half a lease, between 50 ms and 1 s
/// (well within [`super::handback_window`], so the run goes on).
fn handback_pause(spec: &HostSpec) -> Duration {
    (Duration::from_millis(spec.lease_ms) / 2)
        .clamp(Duration::from_millis(50), Duration::from_secs(1))
}

/// Sleeps for `pause`, or until this host is told to terminate.
fn pause_unless_terminating(pause: Duration) {
    let until = Instant::now() + pause;
    while !context::termination_requested() {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(10)));
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

/// Gives an activation lease back (if it is still this host's: the actor's state, mailbox and
/// fencing counter then live `redis.expiry_secs` from now), with the mailbox's entries up to
/// `applied`, and asks for a host when a message came after the last read, or when the lease
/// lapsed with messages in the mailbox (see `actor_lease.lua`).
fn release_lease(
    store: &Store,
    spec: &HostSpec,
    hosts: &HostKeys,
    keys: &ActorKeys,
    lease: &str,
    applied: &str,
    actor_id: &str,
) {
    // Run again only when Redis could not be reached: most often nothing ran then. (When an
    // attempt ran and its answer was lost, the next one finds the lease nobody's and the
    // marker set: no request is made, and the marker lapses after the lease.)
    let released: Result<i64> = store.retry_unreachable(|| {
        store.with_conn(
            || format!("releasing actor {actor_id}"),
            |c| {
                keys.lease_invocation("release")
                    .arg(lease)
                    .arg(spec.lease_ms)
                    .arg(applied)
                    .arg(store.expiry_secs())
                    .invoke(c)
            },
        )
    });
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

/// Renews the leases of every active actor every third of the lease (and, once per
/// [`ttl_refresh_every`], the TTLs of their state, mailbox and fencing counter: an actor this
/// host holds does not expire, however long it goes without a commit), stamps this host's
/// heartbeat (removing those of hosts gone for [`stale_after`]), and ends the process when the
/// driver is gone.
fn heartbeat(store: &Store, spec: &HostSpec, active: &Active, done: &AtomicBool) {
    let lease = Duration::from_millis(spec.lease_ms);
    let every = (lease / 3).max(Duration::from_millis(10));
    let step = Duration::from_millis(10).min(every);
    let mut driver_missing_since: Option<Instant> = None;
    let mut ttls_refreshed: Option<Instant> = None;
    let hosts = HostKeys::new(store.keys());
    let host_set = hosts.host_set(&spec.host_id);
    let stale_ms = stale_after(spec).as_millis() as u64;
    loop {
        // This host is alive: askers of actors without a host check that one is. Hosts that
        // are gone without leaving (killed with their runtime) are removed.
        let now_ms = shoal_core::clock::now_ms();
        let stale: std::result::Result<(Vec<String>,), Error> = store.with_conn(
            || format!("stamping {}", hosts.live),
            |c| {
                redis::pipe()
                    .zadd(&hosts.live, &spec.host_id, now_ms)
                    .ignore()
                    .cmd("ZRANGEBYSCORE")
                    .arg(&hosts.live)
                    .arg("-inf")
                    .arg(format!("({}", now_ms.saturating_sub(stale_ms)))
                    .expire(&hosts.live, store.expiry_secs() as i64)
                    .ignore()
                    .expire(&host_set, store.expiry_secs() as i64)
                    .ignore()
                    .query(c)
            },
        );
        for gone in stale.map(|(gone,)| gone).unwrap_or_default() {
            if gone != spec.host_id {
                take_over(store, &hosts, &gone);
            }
        }
        let refresh_ttls =
            ttls_refreshed.is_none_or(|at| at.elapsed() >= ttl_refresh_every(store.expiry_secs()));
        if refresh_ttls {
            ttls_refreshed = Some(Instant::now());
        }
        let ttl = if refresh_ttls {
            store.expiry_secs().to_string()
        } else {
            String::new()
        };
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
                    keys.lease_invocation("renew")
                        .arg(&value)
                        .arg(spec.lease_ms)
                        .arg("")
                        .arg(&ttl)
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
                        // Nobody will see this exit: leave the live hosts and the group now.
                        leave(store, &hosts, &spec.host_id);
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
