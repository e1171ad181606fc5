//! The hosted-actor protocol: durable mailboxes, activation leases with fencing tokens, and
//! commits that apply each message exactly once.
//!
//! # Keys
//!
//! Per actor, under the hash tag `{<ns>:actor:<id>}`:
//!
//! | key | type | contents |
//! | --- | --- | --- |
//! | `state` | hash | `type` (the actor type's path), `data` (its saved state), `applied` (the last mailbox entry applied), `auth` (`1`: messages must be signed), `verifier` (of the creator's authkey, signed actors), `status` (`active`, `failed`, `stopped`), `reason`, `failures` (recent handler panics, and messages skipped for host deaths, Unix ms), `handbacks`, `handback_since`, `handback_last` (the current run of give-backs: see "Authentication"), `held` (the lease of the last activation, until it releases the actor), `running` (the entry a host in suspect mode is running), `deaths_entry`, `deaths` (the entry whose host deaths are counted, and how many: see "Host deaths") |
//! | `mailbox` | stream | the messages not yet applied, after at most a stream node's worth of applied ones (see "Exactly once"): entries `k` kind, `p` payload, `r` reply key (asks), `h` HMAC (signed messages) |
//! | `lease` | string | `<host>:<token>` of the activation, with a TTL the host renews |
//! | `fence` | counter | the last token given (it only grows while the actor's keys live: see "Lifetime") |
//! | `activating` | string | an activation was asked for (short TTL) |
//! | `reply:<uuid>` | list | the reply to one ask, pushed by the commit |
//!
//! Per namespace, under `{<ns>:actors:hosts}`: `activations` (stream, group `hosts`, a
//! consumer per running host that was handed requests: actor ids that need a host),
//! `host:<id>` (set: the actors a host holds) and `live` (sorted set: host ids by their last
//! heartbeat, Unix ms). A host that ends in order, or whose exit its supervisor sees, is taken
//! out of `live` and of the group ([`retire_host`]); the heartbeats and consumers of hosts gone
//! otherwise (killed with their runtime) are removed by the other hosts after ten of their
//! leases, 5 s at least (see `host`).
//!
//! # Lifetime
//!
//! An actor's `state`, `mailbox` and `fence` expire `redis.expiry_secs` after they were last
//! refreshed, together. They are refreshed by the actor's creation, a `get_or_spawn` that finds
//! it, each activation, and, while a host holds the actor, by that host: its commits and its
//! lease renewals, each at least once per tenth of `redis.expiry_secs` (a minute at most), and
//! the release of its lease (deactivation). So an actor never expires while a host holds it,
//! however long it goes without messages; an actor that no host holds (deactivated after
//! `actors.idle_secs` without messages, or waiting for a host) expires `redis.expiry_secs`
//! after its last refresh: after its deactivation, or after its host's last commit or renewal
//! (at most a tenth of `redis.expiry_secs` before that host died). Sends do not refresh the
//! state (a send by the script refreshes the mailbox, one by the transaction of `direct.rs`
//! nothing): messages sent to an actor that no host takes wait in its mailbox, which every
//! refresh of the state refreshes too, until the state expires. Once it expired, sends fail
//! (no actor), and `get_or_spawn` creates a new one.
//!
//! # Exactly once
//!
//! A host applies a batch of messages to the actor's state in memory and commits in one step:
//! the new state, the last entry applied, the reply to each ask, and the removal of the
//! applied entries from the mailbox, together, and only if its lease still carries its token.
//! The step is a `MULTI`/`EXEC` transaction when the read that returned the batch found the
//! lease the host's and `WATCH`ed it (`EXEC` fails if anyone wrote the lease since), and the
//! commit script (`actor_commit.lua`), which checks the lease itself, when the transaction did
//! not run (see [`host`]). A message is therefore either committed (its effect and its reply
//! at once) or still unapplied in the mailbox; a host that dies before committing leaves it
//! there, and the next host, which reads the mailbox from its first entry, applies it to the
//! last committed state. Hosts read with a plain `XREAD` after the last entry they read, not
//! through a consumer group: a group would hand a message to whichever of its readers asks
//! first, and a host that woke up after losing its lease would take messages from its
//! successor, fail to commit them, and leave them behind while later ones overtook them. A host
//! whose lease lapsed (paused, cut off) cannot commit: the token check refuses it, so it cannot
//! overwrite its successor's state.
//!
//! The script removes every applied entry (`XTRIM MINID` past the last one). The transaction
//! removes whole stream nodes below the last entry applied (`XTRIM MINID ~ <applied>`), so
//! that the node the next message goes to is not freed and made again at every batch: the
//! applied entries of the node still being filled (`stream-node-max-entries`, 100 by default,
//! or `stream-node-max-bytes`) stay until the node is full or the host releases the actor,
//! which removes every entry applied. A host skips entries at or below `applied` (a new host
//! reads them first), and `applied` never goes back: a batch of such entries only commits
//! their removal.
//!
//! A handler that panics fails its message (the ask gets a task error of kind `Panic`) and the
//! actor restarts from its last committed state: the batch is run again from there without the
//! message that panicked. Panics are budgeted (`actors.max_restarts` within
//! `actors.restart_period_secs`); past the budget the actor is failed where the panic was in
//! its batch: the messages before it are applied and committed (their asks answered), and the
//! messages after it, and every later one, get an error saying why. A message whose handler
//! kills the host's process instead is answered alike after a few host deaths (see "Host
//! deaths" below).
//!
//! A batch whose state cannot be saved (larger than `redis.max_message_bytes`, say) is not
//! committed: the actor is failed, the last committed state stays, and every ask of the batch
//! is answered with that failure (none with the success of a change that was thrown away).
//!
//! A send (`tell`, and an ask's send) succeeds once its message is in the mailbox: nothing
//! after that is its error, since a caller that sent it again would have it applied twice. An
//! activation request that fails then is logged, and the activation marker the sender set is
//! deleted (best-effort; it lapses after `activation_hold` otherwise): the message waits in the
//! mailbox until the actor's next message, or the asker's next check (every [`ASK_SLICE`]),
//! asks for a host again. Likewise an ask whose wait, or check, fails because Redis cannot be
//! reached (a connection dropped, a server restarting) waits again, until its deadline (then
//! [`Error::Timeout`], which says the message is applied all the same): only an answer from
//! Redis (the actor is gone, no host runs) ends it with an error.
//!
//! ## Host deaths
//!
//! A message whose handling kills the host's process (an abort, a stack overflow, a kill by
//! the handler) is answered like a panicking message once it has killed hosts
//! [`HOST_DEATHS_PER_MESSAGE`] times: its ask gets a task error of kind `Panic` saying that the
//! host process died that many times while handling it, it is committed as applied without
//! running (the state stays), the deaths count as one panic against the budget above (past
//! it, the actor is failed there, as a panic fails it), and the later messages are served. So
//! a message that kills hosts takes down a few of them, not every host that takes its actor.
//!
//! Nothing is written for it on the hot path; a death is found by the activation after it:
//!
//! * Each activation (`actor_activate.lua`) records its lease in the state's `held`; the
//!   release of the lease by its host (`actor_lease.lua`: deactivation, a stop, a failure, an
//!   error of the actor thread) removes it, and so does a give-back (`actor_handback.lua`) by
//!   a host whose activation was not suspect (a suspect one stays so for the next host). A
//!   host process that ends, in order or not, may exit before its actor threads release:
//!   `held` stays then, which only makes the next activation suspect.
//! * An activation that finds `held` set, with entries in the mailbox after `applied`, knows
//!   that the previous holder went without releasing the actor, perhaps killed by one of them:
//!   it runs in *suspect mode* until the mailbox's last entry at the activation is applied (or
//!   the mailbox holds nothing more after `applied`): one message per batch, each marked
//!   `running` in the state before its handler runs (`actor_running.lua`, 1 more round trip
//!   per message, only then; fenced by the lease), the mark removed by the commit of the
//!   message (no more round trips). A failed or stopped actor, which runs no handler, is
//!   never served in suspect mode.
//! * An activation that finds `running` = X with X not applied counts one death of X
//!   (`deaths_entry` = X, `deaths`; a count of another entry starts again at 1), and removes
//!   the mark. At [`HOST_DEATHS_PER_MESSAGE`], that activation's host skips X as above. A
//!   commit that applies X removes the count, and an activation that finds a count of an entry
//!   applied since removes it.
//!
//! The death that made the activation suspect is not counted (no message was marked then: the
//! host ran whole batches), so a message that kills every host that runs it is skipped after
//! [`HOST_DEATHS_PER_MESSAGE`] + 1 deaths. What counts as a death of X is a host that never
//! released the actor while it ran X in suspect mode: besides a crash, a host killed while it
//! ran X (its runtime ending, a node going away, the OOM killer), and a host whose lease
//! lapsed while it ran X (paused, or cut off from Redis past its lease; it cannot commit X,
//! and the next host runs X again) count too. Only in suspect mode, and three of them on the
//! same message are needed, so such a coincidence fails a message only when it happens again
//! and again. A host of an earlier build, which knows none of these fields, neither marks nor
//! counts: deaths of its own are not seen.
//!
//! # Authentication
//!
//! A signed actor (`ActorOptions::authenticate`) takes only messages signed with the authkey it
//! was created under. Its state records a *verifier* of that key ([`verifier`]: HMAC-SHA256 of
//! the actor's id under the key, which reveals nothing of the key). Three checks use it:
//!
//! * a sender presents its own verifier with each message: `actor_send.lua` refuses one that
//!   differs (`AUTH`, [`Error::Authentication`] at `tell` and `ask`) before anything is
//!   written, so a process holding another key learns it at once rather than never (a `tell`
//!   has no reply);
//! * `get_or_spawn` of a named signed actor from a process with another key is refused alike;
//! * a host takes the actor only if its own key gives the same verifier, and only if its
//!   program has the actor's type: a host of another program sharing the namespace (another
//!   key, another build) gives the activation back untouched (`actor_handback.lua`) and asks
//!   for another host at once, instead of refusing every message or failing the actor, and a
//!   host of the actor's own program takes it. The give-backs are counted in runs: a commit
//!   ends a run (a host of the actor's program served it), and so does a window
//!   ([`handback_window`]: five leases of the host giving it back, 2 s at least) without a
//!   give-back. A run that holds [`HANDBACK_LIMIT`] give-backs and has lasted the window fails
//!   the actor with the last host's reason: no host that can run it is there (a type renamed,
//!   an old image, hosts started before `set_authkey`), and its senders get that error instead
//!   of waiting, once the window (and at most one pause, below) is over. Hosts of the actor's own program that are away for
//!   less than the window (a restart) fail nothing, however many give-backs other programs'
//!   hosts make meanwhile; past the limit, each of those hosts pauses half a lease (1 s at
//!   most) before it asks for another host, rather than passing the actor around as fast as
//!   Redis answers. An actor with no message waiting (its host exited, and its actors were put
//!   up for activation all the same) is given back without being counted, and without a
//!   request for another host: its next message makes one. A failed or stopped actor runs no
//!   user code, so any host answers its messages (with the error).
//!
//! The host still checks every message's HMAC before it decodes it (a message written into the
//! mailbox by other means is refused, unread, its ask answered with the error). The tag covers
//! the actor's id ([`message_parts`]), so a signed message copied into another actor's mailbox
//! is refused there too. An ask's reply key must be one of the actor's own (`reply:` prefix): a
//! reply is never written elsewhere. Not covered: a signed message copied again into its own
//! actor's mailbox (by someone who can write to Redis) is applied again; nothing records which
//! messages were applied beyond the last entry's id.
//!
//! # Round trips
//!
//! `tell`: 1 (`actor_send.lua`, or the transaction below), plus 1 when the actor has no host
//! (to ask for one; 2 after the transaction). `ask`: the same send and a wait on the reply
//! key (`BLPOP` from async code; from a blocking caller `BLMOVE` into a landing list of the
//! ask's own and the `LPOP` of it behind, so that a wait whose read a stop signal interrupted
//! still gets the reply it moved), pipelined into 1 round trip once this handle has seen a reply (the first ask of a
//! handle sends, then waits: 2); while it waits, every [`ASK_SLICE`] it checks that a host has
//! the actor (`actor_nudge.lua`).
//!
//! Unsigned sends (tells, and asks), blocking or async, replace the script with a transaction
//! that makes the same checks as it writes (`direct.rs`: cheaper for Redis, the same round
//! trips; a refused message is written, never applied, and deleted; 1 more round trip then,
//! or when the mailbox stream is not there yet, which the script makes). The async forms
//! (`Mailbox::send_async`, `Mailbox::ask_async`) send it on the runtime's shared connection;
//! an ask's wait goes at the same time on a dedicated one (an async connection hands a
//! pipeline's replies over only together, so the wait could not be ended early on a
//! refusal).
//!
//! A host: 1 round trip per batch of up to [`BATCH`] messages to read it (`XREAD`, then
//! `WATCH` and `GET` of the lease) and 1 to commit it (2 when the transaction did not run: a
//! renewal touched the lease while the batch ran); lease renewals every third of the lease
//! (1 per actor, which refreshes the actor's TTLs too once per tenth of `redis.expiry_secs`).
//! In suspect mode (after a holder went without releasing the actor: see "Host deaths"), one
//! message per batch, and 1 more round trip per message to mark it `running`.

mod direct;
pub mod host;

use std::sync::LazyLock;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use shoal_core::auth;
use shoal_core::error::{Error, Result, TaskError, TaskErrorKind};
use shoal_core::store::{AsyncStore, KeySpace, Store};

pub(crate) static CREATE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("actor_create.lua")));
pub(crate) static SEND: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("actor_send.lua")));
pub(crate) static NUDGE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("actor_nudge.lua")));
pub(crate) static ACTIVATE: LazyLock<redis::Script> =
    LazyLock::new(|| with_stream_ids(include_str!("actor_activate.lua")));
pub(crate) static COMMIT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("actor_commit.lua")));
pub(crate) static HANDBACK: LazyLock<redis::Script> =
    LazyLock::new(|| with_stream_ids(include_str!("actor_handback.lua")));

/// `body` with `stream_ids.lua` (the comparison of stream entry ids) before it.
fn with_stream_ids(body: &str) -> redis::Script {
    redis::Script::new(&format!("{}\n{}", include_str!("stream_ids.lua"), body))
}
pub(crate) static RUNNING: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("actor_running.lua")));
pub(crate) static LEASE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("actor_lease.lua")));
pub(crate) static RETIRE_HOST: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("hosts_retire.lua")));
pub(crate) static PRUNE_HOSTS: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("hosts_prune.lua")));

/// What a signed actor's state records of the authkey it was created under, and what a signed
/// sender and a host present for it: HMAC-SHA256 of the actor's id under the key. It tells
/// whether two processes hold the same key without revealing it (see "Authentication" in the
/// module docs).
pub fn verifier(key: &shoal_core::context::AuthKey, actor_id: &str) -> [u8; auth::TAG_LEN] {
    auth::sign(key, &[b"shoal actor verifier", actor_id.as_bytes()])
}

/// The tag of a message to a signed actor (see [`message_parts`]): every sender signs with
/// this, the host checks [`message_parts`].
pub fn sign_message(
    key: &shoal_core::context::AuthKey,
    actor_id: &str,
    kind: &str,
    payload: &[u8],
    reply_to: &str,
) -> [u8; auth::TAG_LEN] {
    auth::sign(
        key,
        &message_parts(actor_id, kind.as_bytes(), payload, reply_to.as_bytes()),
    )
}

/// What a signed message's tag covers: a purpose label, the actor's id (so a message copied
/// into another actor's mailbox is refused there, even under the same key), its kind, payload
/// and reply key.
pub fn message_parts<'a>(
    actor_id: &'a str,
    kind: &'a [u8],
    payload: &'a [u8],
    reply_to: &'a [u8],
) -> [&'a [u8]; 5] {
    [
        b"shoal actor message",
        actor_id.as_bytes(),
        kind,
        payload,
        reply_to,
    ]
}

/// The kind of the message `ActorRef::stop` sends: the actor stops after the messages before it.
pub const STOP_KIND: &str = "shoal::stop";

/// The consumer group of the activations stream.
pub const HOSTS_GROUP: &str = "hosts";
/// Give-backs in a run (see "Authentication") from which an actor may be failed: once its run
/// has also lasted [`handback_window`].
pub const HANDBACK_LIMIT: u32 = 32;
/// The leases of the host giving an actor back in [`handback_window`].
pub const HANDBACK_WINDOW_LEASES: u32 = 5;
/// The shortest [`handback_window`].
pub const MIN_HANDBACK_WINDOW: Duration = Duration::from_secs(2);

/// How long a run of give-backs (see "Authentication") must last, as well as hold
/// [`HANDBACK_LIMIT`] of them, before the actor is failed, for a host whose activation lease
/// is `lease`: [`HANDBACK_WINDOW_LEASES`] leases, [`MIN_HANDBACK_WINDOW`] at least. It is also
/// the gap after which a give-back starts a new run.
pub fn handback_window(lease: Duration) -> Duration {
    lease
        .saturating_mul(HANDBACK_WINDOW_LEASES)
        .max(MIN_HANDBACK_WINDOW)
}

/// The host deaths a message may cause (counted only where its host ran it alone: see "Host
/// deaths" in the module docs) before it is answered as a panicking message is: its ask gets a
/// task error of kind `Panic`, it is committed without running, and it counts as one panic
/// against `actors.max_restarts`.
pub const HOST_DEATHS_PER_MESSAGE: u32 = 3;

/// Most messages a host applies per commit.
pub const BATCH: usize = 256;
/// How long an asker waits before it checks that a host has the actor.
pub const ASK_SLICE: Duration = Duration::from_millis(500);

/// The keys of one actor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActorKeys {
    /// The state hash.
    pub state: String,
    /// The mailbox stream.
    pub mailbox: String,
    /// The activation lease.
    pub lease: String,
    /// The fencing counter.
    pub fence: String,
    /// The activation marker.
    pub activating: String,
    /// The prefix of reply keys (`reply:`).
    pub reply_prefix: String,
}

impl ActorKeys {
    /// The keys of actor `id`.
    pub fn new(keys: &KeySpace, id: &str) -> Self {
        let object = keys.object("actor", id);
        ActorKeys {
            state: object.key("state"),
            mailbox: object.key("mailbox"),
            lease: object.key("lease"),
            fence: object.key("fence"),
            activating: object.key("activating"),
            reply_prefix: object.key("reply:"),
        }
    }

    /// `actor_lease.lua` with its keys (the lease, the marker, the mailbox, the state, the
    /// fence) and `mode` (`release`, `renew`...), for a host to add its own arguments to.
    pub(crate) fn lease_invocation(&self, mode: &str) -> redis::ScriptInvocation<'static> {
        let mut invocation = LEASE.prepare_invoke();
        invocation
            .key(&self.lease)
            .key(&self.activating)
            .key(&self.mailbox)
            .key(&self.state)
            .key(&self.fence)
            .arg(mode);
        invocation
    }

    /// A fresh reply key for one ask.
    pub fn new_reply_key(&self) -> String {
        format!("{}{}", self.reply_prefix, uuid::Uuid::new_v4().simple())
    }
}

/// The namespace-wide keys of the hosts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostKeys {
    /// The activations stream.
    pub activations: String,
    /// The prefix of a host's set of actors (`host:`).
    pub host_prefix: String,
    /// The live hosts: a sorted set of host ids scored by their last heartbeat (Unix ms).
    pub live: String,
}

impl HostKeys {
    /// The hosts' keys of a namespace.
    pub fn new(keys: &KeySpace) -> Self {
        let object = keys.object("actors", "hosts");
        HostKeys {
            activations: object.key("activations"),
            host_prefix: object.key("host:"),
            live: object.key("live"),
        }
    }

    /// The set of actors host `id` holds.
    pub fn host_set(&self, id: &str) -> String {
        format!("{}{id}", self.host_prefix)
    }
}

/// What an ask gets back, as the commit pushes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// The handler's encoded reply.
    Ok(ByteBuf),
    /// The handler panicked (the actor restarted from its last committed state), or the
    /// message killed its host's process [`HOST_DEATHS_PER_MESSAGE`] times (it was skipped).
    Panic(String),
    /// The message could not be applied (it did not decode, or the actor lacks its kind).
    Error(String),
    /// The message was not authenticated: nothing ran.
    Unauthenticated(String),
    /// The actor is failed (restart budget spent): nothing ran.
    Failed(String),
    /// The actor was stopped: nothing ran.
    Stopped,
}

impl Reply {
    /// The reply as the asker's result: the encoded reply, or the error it stands for.
    pub fn into_result(self, actor: &str, kind: &str) -> Result<Vec<u8>> {
        let task = |message: String, kind_of_failure| {
            Error::Task(TaskError {
                function: format!("{actor} <- {kind}"),
                message,
                kind: kind_of_failure,
                attempts: 1,
                item: None,
            })
        };
        match self {
            Reply::Ok(bytes) => Ok(bytes.into_vec()),
            Reply::Panic(message) => Err(task(message, TaskErrorKind::Panic)),
            Reply::Error(message) => Err(task(message, TaskErrorKind::Error)),
            Reply::Unauthenticated(message) => Err(Error::Authentication(message)),
            Reply::Failed(reason) => Err(Error::invalid_state(format!(
                "actor {actor} has failed: {reason}"
            ))),
            Reply::Stopped => Err(Error::invalid_state(format!("actor {actor} was stopped"))),
        }
    }
}

/// How an actor is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CreateMode {
    /// A new actor: an error if the id is taken.
    New,
    /// A named actor: created if absent, found (of the same type) otherwise.
    Named,
}

/// The script call that creates an actor (`actor_create.lua`, 1 round trip), sent by the
/// caller on its own connection (blocking or async); its answer goes through
/// [`create_outcome`].
pub fn create_invocation(
    store: &Store,
    keys: &ActorKeys,
    actor_type: &str,
    state: &[u8],
    verifier: Option<&[u8]>,
    mode: CreateMode,
) -> redis::ScriptInvocation<'static> {
    let mut invocation = CREATE.prepare_invoke();
    invocation
        .key(&keys.state)
        .key(&keys.mailbox)
        .key(&keys.fence)
        .arg(actor_type)
        .arg(state)
        .arg(if verifier.is_some() { "1" } else { "0" })
        .arg(store.expiry_secs())
        .arg(match mode {
            CreateMode::New => "new",
            CreateMode::Named => "named",
        })
        .arg(verifier.unwrap_or(&[]));
    invocation
}

/// What the script of [`create_invocation`] answered (`created` or `exists`), or its error
/// described: `true` when the actor was created.
pub fn create_outcome(keys: &ActorKeys, outcome: Result<String>) -> Result<bool> {
    let outcome = outcome.map_err(|e| match &e {
        Error::Redis { source, .. } if source.code() == Some("AUTH") => {
            Error::Authentication(format!(
                "actor {} exists, and {}",
                keys.state,
                source.detail().unwrap_or_default()
            ))
        }
        _ => e,
    })?;
    Ok(outcome == "created")
}

/// One message on its way to an actor.
#[derive(Clone, Copy, Debug)]
pub struct Outgoing<'a> {
    /// The message's kind.
    pub kind: &'a str,
    /// The encoded message.
    pub payload: &'a [u8],
    /// The reply key, for an ask.
    pub reply_to: Option<&'a str>,
    /// The HMAC, for an actor that wants signed messages.
    pub mac: Option<&'a [u8]>,
    /// The sender's [`verifier`] for the actor, when it signs.
    pub verifier: Option<&'a [u8]>,
}

fn send_invocation<'a>(
    store: &Store,
    keys: &ActorKeys,
    message: &Outgoing<'_>,
    activation_hold: Duration,
) -> redis::ScriptInvocation<'a> {
    let mut invocation = SEND.prepare_invoke();
    invocation
        .key(&keys.state)
        .key(&keys.mailbox)
        .key(&keys.lease)
        .key(&keys.activating)
        .arg(message.kind)
        .arg(message.payload)
        .arg(message.reply_to.unwrap_or(""))
        .arg(message.mac.unwrap_or(&[]))
        .arg(store.expiry_secs())
        .arg(activation_hold.as_millis() as u64)
        .arg(message.verifier.unwrap_or(&[]));
    invocation
}

/// The send script as a plain `EVALSHA` command, to pipeline it with the wait for the reply.
fn send_evalsha(
    store: &Store,
    keys: &ActorKeys,
    message: &Outgoing<'_>,
    activation_hold: Duration,
) -> redis::Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(SEND.get_hash())
        .arg(4)
        .arg(&keys.state)
        .arg(&keys.mailbox)
        .arg(&keys.lease)
        .arg(&keys.activating)
        .arg(message.kind)
        .arg(message.payload)
        .arg(message.reply_to.unwrap_or(""))
        .arg(message.mac.unwrap_or(&[]))
        .arg(store.expiry_secs())
        .arg(activation_hold.as_millis() as u64)
        .arg(message.verifier.unwrap_or(&[]));
    cmd
}

/// Where messages to one actor go: its keys, the namespace's activation stream, and how long
/// an activation request stands.
#[derive(Clone, Debug)]
pub struct Mailbox {
    /// The actor's keys.
    pub keys: ActorKeys,
    /// The hosts' keys.
    pub hosts: HostKeys,
    /// The actor's id.
    pub actor_id: String,
    /// How long an activation request stands before another may be made.
    pub activation_hold: Duration,
}

impl Mailbox {
    /// The mailbox of actor `actor_id` in `keys`' namespace.
    pub fn new(keys: &KeySpace, actor_id: &str, activation_hold: Duration) -> Self {
        Mailbox {
            keys: ActorKeys::new(keys, actor_id),
            hosts: HostKeys::new(keys),
            actor_id: actor_id.to_string(),
            activation_hold,
        }
    }

    /// See [`send`]; an unsigned message goes with a transaction rather than the script (see
    /// "Round trips" in the module docs).
    pub fn send(&self, store: &Store, message: &Outgoing<'_>) -> Result<()> {
        if message.mac.is_none()
            && message.verifier.is_none()
            && direct::tell(store, self, message)?
        {
            return Ok(());
        }
        send(
            store,
            &self.keys,
            &self.hosts,
            &self.actor_id,
            message,
            self.activation_hold,
        )
    }

    /// Sends an ask and waits for its reply until `deadline` (`None`: forever); `Ok(None)` when
    /// it did not come in time. `pipelined`: the actor is believed active, so the send and the
    /// first wait go in one round trip, and an unsigned message is sent with a transaction
    /// rather than the send script (see "Round trips" in the module docs).
    pub fn ask(
        &self,
        store: &Store,
        message: &Outgoing<'_>,
        deadline: Option<std::time::Instant>,
        pipelined: bool,
    ) -> Result<Option<Reply>> {
        ask(store, self, message, deadline, pipelined)
    }
}

impl Mailbox {
    /// The async form of [`Mailbox::send`], on `store`'s shared connection. Call it only from a
    /// task of `store`'s runtime (shoal's actor runtime, or the caller's).
    pub async fn send_async(&self, store: &AsyncStore, message: &Outgoing<'_>) -> Result<()> {
        if message.mac.is_none()
            && message.verifier.is_none()
            && direct::tell_async(store, self, message).await?
        {
            return Ok(());
        }
        self.send_script_async(store, message).await
    }

    /// [`Mailbox::send_async`] with the send script.
    async fn send_script_async(&self, store: &AsyncStore, message: &Outgoing<'_>) -> Result<()> {
        let mut conn = store.shared().await?;
        let needs_host: i64 =
            send_invocation(store.store(), &self.keys, message, self.activation_hold)
                .invoke_async(&mut conn)
                .await
                .map_err(|e| Error::redis(format!("sending to actor {}", self.actor_id), e))
                .map_err(|e| send_error(e, &self.actor_id))?;
        if needs_host == 1 {
            self.request_activation_after_marker_async(store).await;
        }
        Ok(())
    }

    /// The async form of [`Mailbox::ask`]: the same round trips, the waits on a dedicated
    /// connection of `store` (call it only from a task of `store`'s runtime). Before each wait
    /// slice it checks `gone`: once the caller left, it stops waiting (`Ok(None)`); the message
    /// is applied all the same.
    pub async fn ask_async(
        &self,
        store: &AsyncStore,
        message: &Outgoing<'_>,
        deadline: Option<std::time::Instant>,
        pipelined: bool,
        gone: impl Fn() -> bool,
    ) -> Result<Option<Reply>> {
        let actor_id = self.actor_id.as_str();
        let Some(reply_key) = message.reply_to else {
            return Err(Error::invalid_state("an ask needs a reply key"));
        };
        let mut first: Option<Vec<u8>> = None;
        let unsigned = message.mac.is_none() && message.verifier.is_none();
        if pipelined
            && unsigned
            && let Some(block) = ask_slice(deadline)
        {
            match direct::ask_async(store, self, message, reply_key, block).await? {
                direct::DirectAsk::Sent(reply) => first = reply,
                direct::DirectAsk::NotSent => self.send_script_async(store, message).await?,
            }
        } else if pipelined && let Some(block) = ask_slice(deadline) {
            type Replies = (
                redis::RedisResult<i64>,
                redis::RedisResult<Option<(String, Vec<u8>)>>,
            );
            let mut pipe = redis::pipe();
            pipe.add_command(send_evalsha(
                store.store(),
                &self.keys,
                message,
                self.activation_hold,
            ));
            pipe.cmd("BLPOP").arg(reply_key).arg(blpop_seconds(block));
            pipe.ignore_errors();
            let context = || format!("asking actor {actor_id}");
            let (sent, popped): Replies = match store.blocking_pipe(block, context, &pipe).await? {
                // The script is not loaded (first use, or Redis restarted): nothing ran.
                (Err(e), _) if e.code() == Some("NOSCRIPT") => {
                    let mut conn = store.shared().await?;
                    SEND.prepare_invoke()
                        .load_async(&mut conn)
                        .await
                        .map_err(|e| Error::redis(context(), e))?;
                    store.blocking_pipe(block, context, &pipe).await?
                }
                replies => replies,
            };
            let needs_host = sent.map_err(|e| send_error(Error::redis(context(), e), actor_id))?;
            if needs_host == 1 {
                self.request_activation_after_marker_async(store).await;
            }
            // The message is in the mailbox: a wait that failed is one that saw nothing.
            first = match popped {
                Ok(popped) => popped.map(|(_, v)| v),
                Err(e) => {
                    tracing::debug!("{}; waiting again", Error::redis(context(), e));
                    None
                }
            };
        } else {
            self.send_async(store, message).await?;
        }
        // As in the blocking form: from here on, Redis out of reach is no error of the ask.
        let bytes = match first {
            Some(bytes) => bytes,
            None => loop {
                let Some(block) = ask_slice(deadline) else {
                    return Ok(None);
                };
                if gone() {
                    return Ok(None);
                }
                let mut blpop = redis::cmd("BLPOP");
                blpop.arg(reply_key).arg(blpop_seconds(block));
                let popped: Result<Option<(String, Vec<u8>)>> = store
                    .blocking(block, || format!("waiting for actor {actor_id}"), &blpop)
                    .await;
                let checked = match popped {
                    // A direct ask's marker that came after its wait (see `direct.rs`).
                    Ok(Some((_, bytes))) if bytes.is_empty() => continue,
                    Ok(Some((_, bytes))) => break bytes,
                    Ok(None) => self.nudge_async(store).await,
                    Err(e) => Err(e),
                };
                match checked {
                    Ok(()) => {}
                    Err(e) if e.is_store_unreachable() => {
                        tracing::debug!("{e}; the message is in the mailbox: waiting again");
                        tokio::time::sleep(unreachable_pause(deadline)).await;
                    }
                    Err(e) => return Err(e),
                }
            },
        };
        store.store().decode::<Reply>(&bytes, reply_key).map(Some)
    }

    /// The async form of [`nudge`].
    async fn nudge_async(&self, store: &AsyncStore) -> Result<()> {
        let actor_id = self.actor_id.as_str();
        let context = || format!("checking actor {actor_id}");
        let mut conn = store.shared().await?;
        let needs_host: i64 = NUDGE
            .key(&self.keys.state)
            .key(&self.keys.lease)
            .key(&self.keys.activating)
            .arg(self.activation_hold.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| send_error(Error::redis(context(), e), actor_id))?;
        if needs_host == 1 {
            self.request_activation_after_marker_async(store).await;
            let live: u64 = redis::cmd("ZCOUNT")
                .arg(&self.hosts.live)
                .arg(recent_heartbeats(self.activation_hold))
                .arg("+inf")
                .query_async(&mut conn)
                .await
                .map_err(|e| Error::redis(context(), e))?;
            if live == 0 {
                return Err(no_host(store.store(), actor_id));
            }
        }
        Ok(())
    }

    /// The async form of [`request_activation`].
    async fn request_activation_async(&self, store: &AsyncStore) -> Result<()> {
        let mut conn = store.shared().await?;
        activation_pipe(store.store(), &self.hosts, &self.actor_id)
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| Error::redis(format!("asking a host for actor {}", self.actor_id), e))
    }

    /// The async form of [`request_activation_after_marker`].
    async fn request_activation_after_marker_async(&self, store: &AsyncStore) {
        let Err(e) = self.request_activation_async(store).await else {
            return;
        };
        tracing::warn!("{e}; {UNREQUESTED}");
        let cleared = async {
            let mut conn = store.shared().await?;
            redis::cmd("DEL")
                .arg(&self.keys.activating)
                .query_async::<()>(&mut conn)
                .await
                .map_err(|e| Error::redis(clearing_marker(&self.actor_id), e))
        };
        if let Err(e) = cleared.await {
            tracing::debug!("{e}; the marker lapses by itself");
        }
    }
}

/// How long the next wait for a reply lasts: a slice, or what is left before `deadline`
/// (`None` once it passed).
fn ask_slice(deadline: Option<std::time::Instant>) -> Option<Duration> {
    match deadline {
        None => Some(ASK_SLICE),
        Some(d) => {
            let left = d.saturating_duration_since(std::time::Instant::now());
            (!left.is_zero()).then(|| left.min(ASK_SLICE))
        }
    }
}

/// A `BLPOP` timeout in seconds for a wait of `block`: Redis reads decimals, and 0 means
/// forever, so never under 1 ms.
fn blpop_seconds(block: Duration) -> f64 {
    block.as_secs_f64().max(0.001)
}

/// How long an ask whose message is in the mailbox pauses after Redis could not be reached,
/// before it waits again: [`UNREACHABLE_PAUSE`], or what is left before `deadline`.
fn unreachable_pause(deadline: Option<std::time::Instant>) -> Duration {
    match deadline {
        None => UNREACHABLE_PAUSE,
        Some(d) => d
            .saturating_duration_since(std::time::Instant::now())
            .min(UNREACHABLE_PAUSE),
    }
}

/// See [`unreachable_pause`]: a refused connection fails at once, and the ask must not spin.
const UNREACHABLE_PAUSE: Duration = Duration::from_millis(200);

/// The oldest heartbeat (Unix ms) of a host still counted as running.
fn recent_heartbeats(activation_hold: Duration) -> u64 {
    shoal_core::clock::now_ms().saturating_sub(3 * activation_hold.as_millis() as u64)
}

/// The error of an ask no host can answer.
fn no_host(store: &Store, actor_id: &str) -> Error {
    Error::invalid_state(format!(
        "actor {actor_id} has no host, and no actor host runs in namespace {}: hosts run in the \
         runtime that spawned an actor (spawn_actor, get_or_spawn), while it lives; the message \
         waits in the mailbox for one",
        store.keys().namespace()
    ))
}

/// Puts a message in the mailbox (1 round trip) and asks for an activation when no host has
/// the actor (1 more). Returns once the message is durable: `Ok` from then on, even when the
/// activation request fails (see `request_activation_after_marker`): an error would have
/// its caller send the message again, and it would be applied twice.
pub fn send(
    store: &Store,
    keys: &ActorKeys,
    hosts: &HostKeys,
    actor_id: &str,
    message: &Outgoing<'_>,
    activation_hold: Duration,
) -> Result<()> {
    let needs_host: i64 = store
        .with_conn(
            || format!("sending to actor {actor_id}"),
            |c| send_invocation(store, keys, message, activation_hold).invoke(c),
        )
        .map_err(|e| send_error(e, actor_id))?;
    if needs_host == 1 {
        request_activation_after_marker(store, keys, hosts, actor_id);
    }
    Ok(())
}

fn ask(
    store: &Store,
    mailbox: &Mailbox,
    message: &Outgoing<'_>,
    deadline: Option<std::time::Instant>,
    pipelined: bool,
) -> Result<Option<Reply>> {
    let Mailbox {
        keys,
        hosts,
        actor_id,
        activation_hold,
    } = mailbox;
    let (actor_id, activation_hold) = (actor_id.as_str(), *activation_hold);
    let Some(reply_key) = message.reply_to else {
        return Err(Error::invalid_state("an ask needs a reply key"));
    };
    let mut first: Option<Vec<u8>> = None;
    let unsigned = message.mac.is_none() && message.verifier.is_none();
    if pipelined
        && unsigned
        && let Some(block) = ask_slice(deadline)
    {
        match direct::ask(store, mailbox, message, reply_key, block)? {
            direct::DirectAsk::Sent(reply) => first = reply,
            direct::DirectAsk::NotSent => {
                send(store, keys, hosts, actor_id, message, activation_hold)?
            }
        }
    } else if pipelined && let Some(block) = ask_slice(deadline) {
        // The script's answer, once it came: from then on the message is in the mailbox, and
        // a wait that fails is a wait that saw nothing (see "Exactly once").
        let mut sent: Option<i64> = None;
        let asked = store.with_blocking_conn(
            Some(block),
            || format!("asking actor {actor_id}"),
            |c| {
                let mut run = |c: &mut redis::Connection| -> redis::RedisResult<_> {
                    let mut pipe = redis::pipe();
                    pipe.add_command(send_evalsha(store, keys, message, activation_hold));
                    let mut packed = pipe.get_packed_pipeline();
                    packed.extend_from_slice(&direct::reply_wait(reply_key, block));
                    c.send_packed_command(&packed)?;
                    // Each reply on its own: the script's error is the caller's to read, and
                    // the wait's failure is no error of a message the script wrote.
                    let script: redis::RedisResult<i64> = direct::reply(c)?
                        .extract_error()
                        .and_then(|v| Ok(redis::from_redis_value::<i64>(v)?));
                    if let Ok(needs_host) = &script {
                        sent = Some(*needs_host);
                    }
                    let popped = direct::read_reply_wait(c)?;
                    Ok((script, popped))
                };
                match run(c)? {
                    // The script is not loaded (first use, or Redis restarted): nothing ran.
                    (Err(e), _) if e.code() == Some("NOSCRIPT") => {
                        SEND.prepare_invoke().load(c)?;
                        let (script, popped) = run(c)?;
                        Ok((script?, popped))
                    }
                    (script, popped) => Ok((script?, popped)),
                }
            },
        );
        let (needs_host, popped) = match (asked, sent) {
            (Ok(replies), _) => replies,
            (Err(e), Some(needs_host)) => {
                tracing::debug!("{e}; the message is in the mailbox: waiting again");
                (needs_host, None)
            }
            (Err(e), None) => return Err(send_error(e, actor_id)),
        };
        if needs_host == 1 {
            request_activation_after_marker(store, keys, hosts, actor_id);
        }
        first = popped;
    } else {
        mailbox.send(store, message)?;
    }
    // The message is in the mailbox from here on: Redis out of reach is no error of the ask
    // (its caller would send it again, and it would be applied twice) while the deadline
    // allows another wait.
    let bytes = match first {
        Some(bytes) => bytes,
        None => loop {
            let Some(block) = ask_slice(deadline) else {
                return Ok(None);
            };
            let popped: Result<Option<Vec<u8>>> = store.with_blocking_conn(
                Some(block),
                || format!("waiting for actor {actor_id}"),
                |c| {
                    c.send_packed_command(&direct::reply_wait(reply_key, block))?;
                    direct::read_reply_wait(c)
                },
            );
            let checked = match popped {
                // A direct ask's marker that came after its wait (see `direct.rs`).
                Ok(Some(bytes)) if bytes.is_empty() => continue,
                Ok(Some(bytes)) => break bytes,
                Ok(None) => nudge(store, keys, hosts, actor_id, activation_hold),
                Err(e) => Err(e),
            };
            match checked {
                Ok(()) => {}
                Err(e) if e.is_store_unreachable() => {
                    tracing::debug!("{e}; the message is in the mailbox: waiting again");
                    std::thread::sleep(unreachable_pause(deadline));
                }
                Err(e) => return Err(e),
            }
        },
    };
    store.decode::<Reply>(&bytes, reply_key).map(Some)
}

/// Asks for an activation when no host has the actor.
fn nudge(
    store: &Store,
    keys: &ActorKeys,
    hosts: &HostKeys,
    actor_id: &str,
    activation_hold: Duration,
) -> Result<()> {
    let needs_host: i64 = store
        .with_conn(
            || format!("checking actor {actor_id}"),
            |c| {
                NUDGE
                    .key(&keys.state)
                    .key(&keys.lease)
                    .key(&keys.activating)
                    .arg(activation_hold.as_millis() as u64)
                    .invoke(c)
            },
        )
        .map_err(|e| send_error(e, actor_id))?;
    if needs_host == 1 {
        request_activation_after_marker(store, keys, hosts, actor_id);
        // Nobody may be there to take it: say so rather than wait forever.
        let recent = recent_heartbeats(activation_hold);
        let live: u64 = store.with_conn(
            || format!("counting the hosts in {}", hosts.live),
            |c| {
                redis::cmd("ZCOUNT")
                    .arg(&hosts.live)
                    .arg(recent)
                    .arg("+inf")
                    .query(c)
            },
        )?;
        if live == 0 {
            return Err(no_host(store, actor_id));
        }
    }
    Ok(())
}

/// Adds `actor_id` to the activations stream: a host will take it.
pub fn request_activation(store: &Store, hosts: &HostKeys, actor_id: &str) -> Result<()> {
    store.with_conn(
        || format!("asking a host for actor {actor_id}"),
        |c| activation_pipe(store, hosts, actor_id).query::<()>(c),
    )
}

/// What a failed activation request leaves, said in its warning.
const UNREQUESTED: &str = "the message is in the mailbox all the same, and waits there until \
    the next message or ask to the actor asks for a host again";

/// The context of the deletion of an activation marker.
fn clearing_marker(actor_id: &str) -> String {
    format!("clearing the activation marker of actor {actor_id}")
}

/// Asks for an activation after this sender set the actor's activation marker (the send
/// script or the nudge answered 1, or `direct.rs` set it), for a message already in the
/// mailbox. The send has succeeded whatever happens here, so a failed request is no error of
/// the send (its caller would send the message again, and it would be applied twice): it is
/// logged (`warn`), and the marker this sender set is deleted, best-effort, so that the next
/// sender, or the asker's next nudge (every [`ASK_SLICE`]), asks again at once rather than
/// after the marker's TTL (`activation_hold`, which bounds the wait when the deletion fails
/// too). A tell's message then waits in the mailbox for the actor's next message, as one whose
/// sender died between the two round trips would; it is never lost or applied twice.
fn request_activation_after_marker(
    store: &Store,
    keys: &ActorKeys,
    hosts: &HostKeys,
    actor_id: &str,
) {
    let Err(e) = request_activation(store, hosts, actor_id) else {
        return;
    };
    tracing::warn!("{e}; {UNREQUESTED}");
    let cleared = store.with_conn(
        || clearing_marker(actor_id),
        |c| redis::cmd("DEL").arg(&keys.activating).query::<()>(c),
    );
    if let Err(e) = cleared {
        tracing::debug!("{e}; the marker lapses by itself");
    }
}

/// The approximate length the activations stream is trimmed to (`XADD MAXLEN ~`).
const ACTIVATIONS_MAXLEN: u64 = 10_000;

/// The commands of an activation request.
fn activation_pipe(store: &Store, hosts: &HostKeys, actor_id: &str) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.cmd("XADD")
        .arg(&hosts.activations)
        .arg("MAXLEN")
        .arg("~")
        .arg(ACTIVATIONS_MAXLEN)
        .arg("*")
        .arg("a")
        .arg(actor_id)
        .ignore()
        .expire(&hosts.activations, store.expiry_secs() as i64)
        .ignore();
    pipe
}

/// Creates the activations stream and its group (idempotent).
pub fn create_activations(store: &Store, hosts: &HostKeys) -> Result<()> {
    store.with_conn(
        || format!("creating {}", hosts.activations),
        |c| activations_created(activations_creation(hosts).query(c)),
    )
}

/// The command of [`create_activations`], to send on any connection; its answer goes through
/// [`activations_created`].
///
/// The group starts at the stream's first entry (`0`), not after its last (`$`): the stream
/// expires when no request came for `redis.expiry_secs`, and a sender's `XADD` makes it again,
/// without the group; the host whose next read then finds no group (`NOGROUP`) makes it, and a
/// group made at `$` would skip the requests already there, leaving their messages without a
/// host. Reading them all costs nothing wrong: the stream holds only requests not taken yet
/// (hosts delete what they take; `MAXLEN ~ 10000`), and a request for an actor that has a host
/// is skipped (its host runs it already, and another host's activation finds the lease held).
pub fn activations_creation(hosts: &HostKeys) -> redis::Cmd {
    let mut cmd = redis::cmd("XGROUP");
    cmd.arg("CREATE")
        .arg(&hosts.activations)
        .arg(HOSTS_GROUP)
        .arg("0")
        .arg("MKSTREAM");
    cmd
}

/// The outcome of [`activations_creation`]: a group made already is as good as a new one.
pub fn activations_created(created: redis::RedisResult<()>) -> redis::RedisResult<()> {
    match created {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => other,
    }
}

/// Takes a host that is gone out of the hosts' consumer group (`hosts_retire.lua`): the
/// activation requests it read and never acknowledged are made again, for any host, and its
/// consumer is deleted, so that the group does not keep one consumer per host ever started.
/// Call it only once the host reads no more (it exited, or its main loop ended): a consumer
/// that reads again is made again. Returns how many requests were made again.
pub fn retire_host(store: &Store, hosts: &HostKeys, host_id: &str) -> Result<i64> {
    store.with_conn(
        || format!("retiring host {host_id} from {}", hosts.activations),
        |c| {
            RETIRE_HOST
                .key(&hosts.activations)
                .arg(HOSTS_GROUP)
                .arg(host_id)
                .arg(store.expiry_secs())
                .arg(ACTIVATIONS_MAXLEN)
                .invoke(c)
        },
    )
}

/// Deletes the consumers of the hosts' group that hold no request and have been idle (no
/// request handed to them) for `idle` (`hosts_prune.lua`): hosts gone without [`retire_host`]
/// (killed with the runtime that would have retired them), and live hosts that got no request
/// lately, which lose nothing (Redis makes a consumer again when it hands it a request). `own`,
/// the caller's consumer, is kept. Returns how many were deleted.
pub fn prune_hosts(store: &Store, hosts: &HostKeys, own: &str, idle: Duration) -> Result<i64> {
    store.with_conn(
        || format!("pruning the consumers of {}", hosts.activations),
        |c| {
            PRUNE_HOSTS
                .key(&hosts.activations)
                .arg(HOSTS_GROUP)
                .arg(idle.as_millis() as u64)
                .arg(own)
                .invoke(c)
        },
    )
}

/// Removes the leases a dead host held and asks other hosts to take its actors (the host is
/// known to be dead: its exit was seen), takes it out of the live hosts, and retires its
/// consumer of the hosts' group ([`retire_host`]). Returns the actors moved.
pub fn orphan_host(store: &Store, hosts: &HostKeys, host_id: &str) -> Result<Vec<String>> {
    let set = hosts.host_set(host_id);
    let actors: Vec<String> = store.with_conn(
        || format!("reading {set}"),
        |c| redis::cmd("SMEMBERS").arg(&set).query(c),
    )?;
    for actor in &actors {
        let keys = ActorKeys::new(store.keys(), actor);
        let _: i64 = store.with_conn(
            || format!("freeing actor {actor}"),
            |c| {
                LEASE
                    .key(&keys.lease)
                    .key(&keys.activating)
                    .arg("orphan")
                    .arg(host_id)
                    .arg(0)
                    .invoke(c)
            },
        )?;
        request_activation(store, hosts, actor)?;
    }
    store.with_conn(
        || format!("deleting {set}"),
        |c| {
            redis::pipe()
                .del(&set)
                .ignore()
                .zrem(&hosts.live, host_id)
                .ignore()
                .query::<()>(c)
        },
    )?;
    retire_host(store, hosts, host_id)?;
    Ok(actors)
}

/// Turns the send script's errors into shoal's.
fn send_error(e: Error, actor_id: &str) -> Error {
    match &e {
        Error::Redis { source, .. } => source
            .code()
            .and_then(|code| refusal(code, source.detail().unwrap_or_default(), actor_id))
            .unwrap_or(e),
        _ => e,
    }
}

/// The error of a send refused with `code` (the send script's error codes; `detail`: the
/// failure's reason), or `None` for another code.
fn refusal(code: &str, detail: &str, actor_id: &str) -> Option<Error> {
    Some(match code {
        "NOACTOR" => Error::invalid_state(format!(
            "no actor {actor_id}: it was never created, or its keys expired"
        )),
        "FAILED" => Error::invalid_state(format!("actor {actor_id} has failed: {detail}")),
        "STOPPED" => Error::invalid_state(format!("actor {actor_id} was stopped")),
        "AUTH" => Error::Authentication(format!(
            "actor {actor_id} takes only messages signed with the authkey it was created \
             under, and this sender's is another; nothing was sent"
        )),
        _ => return None,
    })
}

/// Reads a stream entry's field as bytes.
pub(crate) fn field(entry: &redis::streams::StreamId, name: &str) -> Option<Vec<u8>> {
    entry.get::<Vec<u8>>(name)
}

/// The error for a stream entry that is not a message (garbage in a mailbox).
pub(crate) fn malformed(key: &str, id: &str) -> Error {
    Error::Codec {
        key: key.to_string(),
        expected: "an actor message (fields k, p)".into(),
        reason: format!("entry {id} is not one"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_slice_never_becomes_a_blpop_that_blocks_forever() {
        for block in [Duration::from_nanos(1), Duration::from_micros(999)] {
            assert_eq!(blpop_seconds(block), 0.001);
        }
        assert_eq!(blpop_seconds(ASK_SLICE), 0.5);
    }

    #[test]
    fn the_handback_window_is_five_leases_and_two_seconds_at_least() {
        assert_eq!(
            handback_window(Duration::from_secs(2)),
            Duration::from_secs(10)
        );
        assert_eq!(
            handback_window(Duration::from_millis(100)),
            MIN_HANDBACK_WINDOW
        );
        assert_eq!(
            handback_window(Duration::from_secs(3600)),
            Duration::from_secs(18_000)
        );
    }
}
