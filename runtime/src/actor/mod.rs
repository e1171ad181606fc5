//! Workloads as durable actors: a serde type whose state survives the process that hosts it.
//!
//! ```no_run
//! use serde::{Deserialize, Serialize};
//! use shoal::prelude::*;
//! use shoal::{ActorContext, ActorRef, Handler};
//!
//! #[derive(Serialize, Deserialize, Default, shoal::Actor)]
//! #[actor(messages(Incr))]
//! struct Counter {
//!     n: u64,
//! }
//!
//! #[derive(Serialize, Deserialize)]
//! struct Incr(u64);
//!
//! impl Handler<Incr> for Counter {
//!     type Reply = u64;
//!     fn handle(&mut self, Incr(by): Incr, _: &mut ActorContext) -> u64 {
//!         self.n += by;
//!         self.n
//!     }
//! }
//!
//! fn main() -> shoal::Result<()> {
//!     let _rt = shoal::init()?;
//!     let counter: ActorRef<Counter> = shoal::spawn_actor(Counter::default())?;
//!     counter.tell(Incr(1))?; // durable once it returns
//!     let n = counter.ask(Incr(1), Some(std::time::Duration::from_secs(5)))?;
//!     assert_eq!(n, 2);
//!     Ok(())
//! }
//! ```
//!
//! A message the actor does not list does not compile:
//!
//! ```compile_fail
//! use serde::{Deserialize, Serialize};
//! use shoal::{ActorContext, ActorRef, Handler};
//!
//! #[derive(Serialize, Deserialize, Default, shoal::Actor)]
//! #[actor(messages(Incr))]
//! struct Counter { n: u64 }
//!
//! #[derive(Serialize, Deserialize)]
//! struct Incr(u64);
//!
//! #[derive(Serialize, Deserialize)]
//! struct Reset;
//!
//! impl Handler<Incr> for Counter {
//!     type Reply = u64;
//!     fn handle(&mut self, Incr(by): Incr, _: &mut ActorContext) -> u64 { self.n += by; self.n }
//! }
//!
//! fn send(counter: &ActorRef<Counter>) -> shoal::Result<()> {
//!     counter.tell(Reset) // error: `Counter` does not handle `Reset`
//! }
//! ```
//!
//! # Semantics
//!
//! * An actor is a serde type with handlers (`impl Handler<M>`) for serde message types, listed
//!   in `#[derive(shoal::Actor)] #[actor(messages(...))]`; sending a message it does not list
//!   does not compile.
//! * [`spawn_actor`] creates one; [`get_or_spawn`] finds the actor of that name or creates it
//!   (a named actor is activated on its first message, as Orleans' virtual actors, and
//!   `get_or_spawn` gives it back for as long as it lives: see "Lifetime" below). An
//!   [`ActorRef`] is a serde value: pass it to any process (a `Process` argument, a `Pool`
//!   task, a `Queue` item).
//! * [`ActorRef::tell`] returns once the message is durably in the actor's mailbox;
//!   [`ActorRef::ask`] waits for the reply ([`Error::Timeout`] after its timeout: the message
//!   is still applied once).
//! * **Exactly once**: every message is applied once, in mailbox order, whatever host dies: the
//!   state, the last message applied and the replies are committed together, and a host whose
//!   activation lease lapsed cannot commit (fencing). A host killed with `SIGKILL` is replaced,
//!   and its actors are taken over from their last committed state, at once when its exit is
//!   seen, else when its lease (`actors.lease_secs`) lapses.
//! * A handler that panics fails its message's `ask` with kind `Panic`, and the actor restarts
//!   from its last committed state. Past `actors.max_restarts` panics within
//!   `actors.restart_period_secs` the actor is failed: its messages get an error saying why.
//! * Actors run in host processes the runtime that spawns its first actor starts
//!   (`actors.hosts` of them, through the configured backend, replaced when they die). While
//!   no host runs, messages wait in the mailbox. An actor without messages for
//!   `actors.idle_secs` is deactivated; its next message activates it again.
//! * [`ActorOptions::authenticate`]: every message is signed with the sender's authkey
//!   (HMAC-SHA256) and the host refuses, before decoding it, a message without a valid tag:
//!   the asker gets [`Error::Authentication`] and nothing runs.
//! * Handlers are synchronous and run one message at a time.
//! * **Lifetime**: an actor's keys (its state, its mailbox, its activation count) live
//!   `redis.expiry_secs` from their last refresh. Its creation, a [`get_or_spawn`] that finds
//!   it, each activation and the host that runs it refresh them (that host at least once per
//!   tenth of `redis.expiry_secs`, a minute at most, and when it deactivates the actor), so an
//!   actor never expires while a host runs it, with or without messages. Messages do not
//!   keep it alive: an actor no host runs (deactivated after `actors.idle_secs` without
//!   messages, or with no host to take it) expires `redis.expiry_secs` after its deactivation
//!   (or after its last refresh by a host that died), with the messages waiting in its mailbox
//!   then. After that, sends fail (no actor), and [`get_or_spawn`] creates the named actor
//!   again, from `init()`.
//!
//! See `shoal_executor::actor` for the keys, the scripts and the round trips (a `tell` is 1, an
//! `ask` 1 once the actor is active).

pub(crate) mod hosts;

use std::future::Future;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_core::auth;
use shoal_core::context::{self, AuthKey, ProcessInfo};
use shoal_core::error::{Error, Result};
use shoal_core::hosted::{Actor, Handler, Handles, kind_of};
use shoal_core::store::Store;
use shoal_core::transfers::{SentTransfers, collect_transfers};
use shoal_executor::actor::{self as protocol, ActorKeys, CreateMode, HostKeys, Mailbox, Outgoing};
use shoal_primitives::pipe::encode_without_round_trips;

pub(crate) use hosts::HostSupervisor;

use crate::runtime;

/// How long an activation request stands before another may be made.
fn activation_hold() -> Duration {
    context::current()
        .map(|c| c.config().actors.lease())
        .unwrap_or(Duration::from_secs(2))
}

/// Options of [`spawn_actor_with`] and [`get_or_spawn_with`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ActorOptions {
    /// Messages must be signed with the sender's authkey (the spawner's and its children's):
    /// a message without a valid tag is refused, unread.
    pub authenticate: bool,
}

/// A reference to an actor: a serde value usable from any process of the same namespace.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub struct ActorRef<A> {
    id: String,
    authenticated: bool,
    /// The key this handle signs with, when not this process's (a proxy of a manager reached
    /// with `Manager::connect`). Never sent: a handle passed to another process signs there with
    /// that process's key.
    #[serde(skip)]
    authkey: Option<AuthKey>,
    /// Set once an ask found the actor active: later asks pipeline the send and the wait.
    #[serde(skip)]
    known_active: Arc<AtomicBool>,
    #[serde(skip)]
    _actor: PhantomData<fn() -> A>,
}

impl<A> Clone for ActorRef<A> {
    fn clone(&self) -> Self {
        ActorRef {
            id: self.id.clone(),
            authenticated: self.authenticated,
            authkey: self.authkey.clone(),
            known_active: self.known_active.clone(),
            _actor: PhantomData,
        }
    }
}

impl<A> std::fmt::Debug for ActorRef<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActorRef")
            .field("type", &std::any::type_name::<A>())
            .field("id", &self.id)
            .finish()
    }
}

impl<A> PartialEq for ActorRef<A> {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl<A: Actor> ActorRef<A> {
    /// The actor's id (`name:<name>` for a named actor).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Puts `message` in the actor's mailbox; returns once it is durable there (1 Redis round
    /// trip). The reply, if any, is dropped.
    pub fn tell<M>(&self, message: M) -> Result<()>
    where
        A: Handles<M>,
        M: Serialize,
    {
        let prepared = self.prepare(kind_of::<M>(), &message, false)?;
        prepared.mailbox.send(&prepared.store, &prepared.outgoing())
    }

    /// Sends `message` and waits for the reply, at most `timeout` ([`Error::Timeout`]; the
    /// message stays in the mailbox and is applied once all the same). A panic in the handler
    /// is [`Error::Task`] of kind `Panic`.
    pub fn ask<M>(&self, message: M, timeout: Option<Duration>) -> Result<<A as Handler<M>>::Reply>
    where
        A: Handles<M>,
        M: Serialize,
    {
        let kind = kind_of::<M>();
        let prepared = self.prepare(kind, &message, true)?;
        let deadline = timeout.and_then(|t| std::time::Instant::now().checked_add(t));
        let reply = prepared.mailbox.ask(
            &prepared.store,
            &prepared.outgoing(),
            deadline,
            self.known_active.load(Ordering::Relaxed),
        )?;
        let Some(reply) = reply else {
            return Err(Error::Timeout(timeout.unwrap_or_default()));
        };
        self.known_active.store(true, Ordering::Relaxed);
        let bytes = reply.into_result(&self.id, kind)?;
        prepared
            .store
            .decode(&bytes, std::any::type_name::<<A as Handler<M>>::Reply>())
    }

    /// The async form of [`ActorRef::tell`]: the same round trip, and no thread is parked;
    /// any executor can await it. The message is encoded (and signed) at once; dropping the
    /// future before it completes sends it at most once.
    ///
    /// Where it runs: awaited in a task of a Tokio runtime (`tokio::spawn`, an axum or actix
    /// handler) built with IO and timers, the send is a task of that runtime, on connections
    /// opened there at its first such call and kept until it shuts down (one shared, and up to
    /// 64 idle ones for asks' waits, per runtime): no hop to a thread of shoal's and back. A
    /// runtime without IO or timers is found out at its first call (Tokio reports the missing
    /// driver as a panic, which shoal catches: the panic hook sees it once per runtime) and its
    /// calls run on shoal's actor runtime, as do calls awaited anywhere else (in `block_on`'s
    /// own future, on another executor) and every call in a build where a panic aborts. On the
    /// caller's runtime, the call waits for that runtime: do not block its threads on it
    /// (`futures::executor::block_on` inside a task, or a `spawn_blocking` closure's
    /// `block_on` while nothing drives a current-thread runtime, never return), and on a
    /// runtime whose clock is paused (`start_paused`, in tests) the connections' response
    /// timeouts lapse at once; use [`ActorRef::tell`] there.
    ///
    /// A send whose future was dropped runs on, unless its runtime shuts down first: then it
    /// may stop between the write and the request for a host, and the message, in the
    /// mailbox, waits for the actor's next activation (by a message sent to it once the
    /// activation marker, held for `actors.lease_secs`, has lapsed). A call still pending
    /// when its runtime shuts down is [`Error::InvalidState`]; what it had written stands, so
    /// sending again may apply the message twice.
    ///
    /// ```no_run
    /// # use serde::{Deserialize, Serialize};
    /// # use shoal::{ActorContext, ActorRef, Handler};
    /// # #[derive(Serialize, Deserialize, Default, shoal::Actor)]
    /// # #[actor(messages(Incr))]
    /// # struct Counter { n: u64 }
    /// # #[derive(Serialize, Deserialize)]
    /// # struct Incr(u64);
    /// # impl Handler<Incr> for Counter {
    /// #     type Reply = u64;
    /// #     fn handle(&mut self, Incr(by): Incr, _: &mut ActorContext) -> u64 { self.n += by; self.n }
    /// # }
    /// async fn count(counter: ActorRef<Counter>) -> shoal::Result<u64> {
    ///     counter.tell_async(Incr(1)).await?;
    ///     counter.ask_async(Incr(1), Some(std::time::Duration::from_secs(5))).await
    /// }
    /// ```
    pub fn tell_async<M>(&self, message: M) -> impl Future<Output = Result<()>> + Send + use<A, M>
    where
        A: Handles<M>,
        M: Serialize,
    {
        send_async(self.prepare(kind_of::<M>(), &message, false))
    }

    /// The async form of [`ActorRef::ask`]: the same round trips (1 once the actor is known
    /// active), and no thread is parked; any executor can await it, and it runs where
    /// [`ActorRef::tell_async`] does (on the caller's Tokio runtime, from a task of one). The
    /// timeout runs from the first poll. Dropping the future stops the wait within half a
    /// second; the message is applied once all the same, and its reply expires unread.
    pub fn ask_async<M>(
        &self,
        message: M,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<<A as Handler<M>>::Reply>> + Send + use<A, M>
    where
        A: Handles<M>,
        M: Serialize,
    {
        let kind = kind_of::<M>();
        let prepared = self.prepare(kind, &message, true);
        let known_active = self.known_active.clone();
        let id = self.id.clone();
        async move {
            let prepared = prepared?;
            let deadline = timeout.and_then(|t| std::time::Instant::now().checked_add(t));
            let pipelined = known_active.load(Ordering::Relaxed);
            let context = context::current()?;
            let reply = context
                .spawn_near_caller(move |store, caller| async move {
                    let reply = prepared
                        .mailbox
                        .ask_async(&store, &prepared.outgoing(), deadline, pipelined, || {
                            caller.is_gone()
                        })
                        .await;
                    caller.finish(reply);
                })
                .await?;
            let Some(reply) = reply else {
                return Err(Error::Timeout(timeout.unwrap_or_default()));
            };
            known_active.store(true, Ordering::Relaxed);
            let bytes = reply.into_result(&id, kind)?;
            context
                .store()
                .decode(&bytes, std::any::type_name::<<A as Handler<M>>::Reply>())
        }
    }

    /// A message encoded and signed for this actor, ready to send from another task.
    fn prepare<M: Serialize>(
        &self,
        kind: &'static str,
        message: &M,
        ask: bool,
    ) -> Result<Prepared> {
        let store = store()?;
        let payload = store.encode(message, kind)?;
        let mailbox = self.mailbox(&store);
        let reply_to = ask.then(|| mailbox.keys.new_reply_key());
        let mac = self.sign(kind, &payload, reply_to.as_deref().unwrap_or(""));
        let verifier = self.verifier();
        Ok(Prepared {
            store,
            kind,
            payload,
            reply_to,
            mac,
            verifier,
            mailbox,
        })
    }

    /// Stops the actor after the messages already in its mailbox: later messages are refused
    /// ([`Error::InvalidState`] "was stopped"). Returns once the request is durable.
    pub fn stop(&self) -> Result<()> {
        let prepared = self.prepare_stop()?;
        prepared.mailbox.send(&prepared.store, &prepared.outgoing())
    }

    /// The async form of [`ActorRef::stop`]: the same round trip, and no thread is parked;
    /// any executor can await it, and it runs where [`ActorRef::tell_async`] does.
    ///
    /// ```no_run
    /// # async fn done<A: shoal::Actor>(actor: shoal::ActorRef<A>) -> shoal::Result<()> {
    /// actor.stop_async().await
    /// # }
    /// ```
    pub fn stop_async(&self) -> impl Future<Output = Result<()>> + Send + use<A> {
        send_async(self.prepare_stop())
    }

    /// The stop message, signed when the actor is.
    fn prepare_stop(&self) -> Result<Prepared> {
        let store = store()?;
        let kind = protocol::STOP_KIND;
        let mailbox = self.mailbox(&store);
        Ok(Prepared {
            mac: self.sign(kind, &[], ""),
            verifier: self.verifier(),
            store,
            kind,
            payload: Vec::new(),
            reply_to: None,
            mailbox,
        })
    }

    /// How many times the actor was activated so far (by any host): 1 for an actor that never
    /// moved, one more for each time a host took it over (after a host died or froze, or after
    /// it was deactivated for idleness, or a host of another program sharing the namespace took
    /// it and gave it back); 0 before its first activation, and once its keys expired (see
    /// "Lifetime" in the module docs: never while a host runs it). 1 round trip.
    pub fn activations(&self) -> Result<u64> {
        let store = store()?;
        let keys = ActorKeys::new(store.keys(), &self.id);
        store.with_conn(
            || format!("reading the activations of actor {}", self.id),
            |c| {
                redis::cmd("GET")
                    .arg(&keys.fence)
                    .query::<Option<u64>>(c)
                    .map(Option::unwrap_or_default)
            },
        )
    }

    fn mailbox(&self, store: &Store) -> Mailbox {
        Mailbox::new(store.keys(), &self.id, activation_hold())
    }

    fn sign(&self, kind: &str, payload: &[u8], reply_to: &str) -> Option<[u8; auth::TAG_LEN]> {
        self.authenticated
            .then(|| protocol::sign_message(&self.signing_key(), &self.id, kind, payload, reply_to))
    }

    /// This handle's verifier for the actor, when it signs (see the protocol's module docs).
    fn verifier(&self) -> Option<[u8; auth::TAG_LEN]> {
        self.authenticated
            .then(|| protocol::verifier(&self.signing_key(), &self.id))
    }

    fn signing_key(&self) -> AuthKey {
        self.authkey
            .clone()
            .unwrap_or_else(AuthKey::of_this_process)
    }

    /// The same actor, signing its messages with `authkey` (a manager's proxies reached through
    /// `Manager::connect` sign with the manager's key).
    pub(crate) fn signed_with(mut self, authkey: AuthKey) -> Self {
        self.authkey = Some(authkey);
        self
    }
}

/// An encoded, signed message and where it goes (an async call's owned copy of [`Outgoing`]).
struct Prepared {
    store: Arc<Store>,
    kind: &'static str,
    payload: Vec<u8>,
    reply_to: Option<String>,
    mac: Option<[u8; auth::TAG_LEN]>,
    verifier: Option<[u8; auth::TAG_LEN]>,
    mailbox: Mailbox,
}

/// Sends a prepared message (a tell, a stop) from the caller's Tokio runtime, or shoal's
/// actor runtime without one: 1 round trip.
async fn send_async(prepared: Result<Prepared>) -> Result<()> {
    let prepared = prepared?;
    context::current()?
        .spawn_near_caller(move |store, caller| async move {
            let sent = prepared
                .mailbox
                .send_async(&store, &prepared.outgoing())
                .await;
            caller.finish(sent);
        })
        .await
}

impl Prepared {
    fn outgoing(&self) -> Outgoing<'_> {
        Outgoing {
            kind: self.kind,
            payload: &self.payload,
            reply_to: self.reply_to.as_deref(),
            mac: self.mac.as_ref().map(|m| m.as_slice()),
            verifier: self.verifier.as_ref().map(|v| v.as_slice()),
        }
    }
}

fn store() -> Result<Arc<Store>> {
    Ok(context::current()?.store().clone())
}

/// Creates an actor with `state` and returns a reference to it; starts this runtime's actor
/// hosts if they are not running.
pub fn spawn_actor<A: Actor>(state: A) -> Result<ActorRef<A>> {
    spawn_actor_with(state, ActorOptions::default())
}

/// [`spawn_actor`] with options.
pub fn spawn_actor_with<A: Actor>(state: A, options: ActorOptions) -> Result<ActorRef<A>> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    create(id, state, options, CreateMode::New)
}

/// The actor called `name`, created with `init()` if it does not exist (never created, or
/// expired: see "Lifetime" in the module docs; its state is kept otherwise, and its keys live
/// `redis.expiry_secs` from now); starts this runtime's actor hosts if they are not running.
/// Every process gets the same actor, which runs once at a time whoever asked.
pub fn get_or_spawn<A: Actor>(name: &str, init: impl FnOnce() -> A) -> Result<ActorRef<A>> {
    get_or_spawn_with(name, init, ActorOptions::default())
}

/// [`get_or_spawn`] with options (they apply when the actor is created).
pub fn get_or_spawn_with<A: Actor>(
    name: &str,
    init: impl FnOnce() -> A,
    options: ActorOptions,
) -> Result<ActorRef<A>> {
    create(actor_name(name)?, init(), options, CreateMode::Named)
}

/// The async form of [`spawn_actor`]: the actor's record is written from shoal's actor
/// runtime and no thread waits; any executor. The first actor of a runtime also sets up its
/// hosts there (the activations stream's group, in the same task, then the hosts). The state
/// is encoded when this is called, unless it carries pipe ends: passing one makes a round
/// trip to Redis, so such a state is encoded in that task, on the blocking pool of shoal's
/// actor runtime, and the caller's thread does not wait on Redis (unless the future is dropped
/// before its first poll: the state is dropped with it then, and closing the process's last
/// handle of an end makes a round trip). Once polled, a dropped future may still create the
/// actor; an unnamed one is then referred to by nothing (it expires after `redis.expiry_secs`
/// unused), and the runtime's hosts, if this was its first actor, are started by its next
/// creation.
///
/// ```no_run
/// # use serde::{Deserialize, Serialize};
/// # use shoal::prelude::*;
/// # #[derive(Serialize, Deserialize, Default, shoal::Actor)]
/// # #[actor(messages(Incr))]
/// # struct Counter { n: u64 }
/// # #[derive(Serialize, Deserialize)]
/// # struct Incr(u64);
/// # impl Handler<Incr> for Counter {
/// #     type Reply = u64;
/// #     fn handle(&mut self, Incr(by): Incr, _: &mut ActorContext) -> u64 { self.n += by; self.n }
/// # }
/// # async fn handler() -> shoal::Result<()> {
/// let counter = shoal::spawn_actor_async(Counter::default()).await?;
/// assert_eq!(counter.ask_async(Incr(2), None).await?, 2);
/// # Ok(())
/// # }
/// ```
pub fn spawn_actor_async<A: Actor>(
    state: A,
) -> impl Future<Output = Result<ActorRef<A>>> + Send + use<A> {
    spawn_actor_with_async(state, ActorOptions::default())
}

/// The async form of [`spawn_actor_with`] (see [`spawn_actor_async`]).
pub fn spawn_actor_with_async<A: Actor>(
    state: A,
    options: ActorOptions,
) -> impl Future<Output = Result<ActorRef<A>>> + Send + use<A> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let creation = Creation::new(id, state, options, CreateMode::New, HostsSetup::InTask);
    async move { creation?.send().await }
}

/// The async form of [`get_or_spawn`] (see [`spawn_actor_async`]): `init` runs when this is
/// called.
pub fn get_or_spawn_async<A: Actor>(
    name: &str,
    init: impl FnOnce() -> A,
) -> futures::future::BoxFuture<'static, Result<ActorRef<A>>> {
    get_or_spawn_with_async(name, init, ActorOptions::default())
}

/// The async form of [`get_or_spawn_with`] (see [`get_or_spawn_async`]).
pub fn get_or_spawn_with_async<A: Actor>(
    name: &str,
    init: impl FnOnce() -> A,
    options: ActorOptions,
) -> futures::future::BoxFuture<'static, Result<ActorRef<A>>> {
    // Boxed: an opaque type would keep `init`'s type (and a borrow it holds), which has run.
    let creation = actor_name(name)
        .and_then(|id| Creation::new(id, init(), options, CreateMode::Named, HostsSetup::InTask));
    Box::pin(async move { creation?.send().await })
}

/// `name` as a named actor's id, or why it cannot be one.
fn actor_name(name: &str) -> Result<String> {
    if name.is_empty() || name.len() > 200 || name.contains(['{', '}']) {
        return Err(Error::invalid_state(format!(
            "{name:?} is not an actor name (1 to 200 characters, no braces)"
        )));
    }
    Ok(format!("name:{name}"))
}

fn create<A: Actor>(
    id: String,
    state: A,
    options: ActorOptions,
    mode: CreateMode,
) -> Result<ActorRef<A>> {
    let mut creation = Creation::new(id, state, options, mode, HostsSetup::Blocking)?;
    let invocation = creation
        .invocation
        .take()
        .ok_or_else(|| Error::invalid_state("the creation was sent already"))?;
    let outcome = creation.store.with_conn(
        || format!("creating actor {}", creation.keys.state),
        |c| invocation.invoke(c),
    );
    if let Some(transfers) = creation.transfers.take() {
        give_back_unless_created(transfers, &outcome);
    }
    creation.finish(outcome)
}

/// Gives back the transfers of a creation's state (its pipe ends: see
/// `shoal_core::transfers`) when no actor was created from it (an error, or a named actor that
/// existed), so that they do not hold the ends until this process exits. Kept when the store
/// could not be reached: the state may have been written.
fn give_back_unless_created(transfers: SentTransfers, outcome: &Result<String>) {
    if state_unused(outcome) {
        give_back(transfers);
    }
}

/// Whether the creation script's `outcome` says no actor was created from the state.
fn state_unused(outcome: &Result<String>) -> bool {
    match outcome {
        Ok(reply) => reply != "created",
        Err(e) => !e.is_store_unreachable(),
    }
}

/// Gives back the transfers of a state that will not be decoded; one that cannot be given
/// back lapses after the lease.
fn give_back(transfers: SentTransfers) {
    if let Err(e) = transfers.release() {
        tracing::warn!("giving back the pipe ends of an actor state not used: {e}");
    }
}

/// How a creation sets up its runtime's actor hosts, the first time: the activations stream's
/// group, then the hosts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum HostsSetup {
    /// Before the creation, on the calling thread (one round trip).
    Blocking,
    /// In the task that sends the creation ([`Creation::send`]); a state that carries pipe
    /// ends is encoded there too (see [`Creation::deferred`]).
    InTask,
}

/// An actor's creation ready to send: the hosts set up (or to set up as it is sent), the state
/// encoded, the script call.
struct Creation<A> {
    id: String,
    keys: ActorKeys,
    store: Arc<Store>,
    authenticated: bool,
    /// The script call, until it is sent.
    invocation: Option<redis::ScriptInvocation<'static>>,
    /// The transfers registered while the state was encoded on the calling thread (a blocking
    /// creation's), given back if no actor is created from it.
    transfers: Option<SentTransfers>,
    /// Instead of the script call, the state to encode in the task that sends the creation
    /// (on the blocking pool), when it carries pipe ends and the hosts are set up in that task
    /// too (passing an end makes a round trip to Redis): the script call is made there.
    deferred: Option<Deferred<A>>,
    /// The runtime whose hosts the send starts, after it made the activations' group, and the
    /// process that asked (if the future is dropped before, the next creation starts them). A
    /// weak reference: a runtime dropped meanwhile starts nothing.
    starts_hosts: Option<(Weak<runtime::RuntimeInner>, ProcessInfo)>,
    _actor: PhantomData<fn() -> A>,
}

/// A creation's state still to encode, and what its script call needs besides.
struct Deferred<A> {
    state: A,
    verifier: Option<[u8; auth::TAG_LEN]>,
    mode: CreateMode,
}

impl<A: Actor> Deferred<A> {
    /// The creation's script call, the state encoded on this thread (a pipe end among it makes
    /// its round trip to Redis here).
    fn invocation(
        &self,
        store: &Store,
        keys: &ActorKeys,
    ) -> Result<(redis::ScriptInvocation<'static>, SentTransfers)> {
        let actor_type = std::any::type_name::<A>();
        let (data, transfers) = collect_transfers(|| store.encode(&self.state, actor_type));
        let data = match data {
            Ok(data) => data,
            Err(e) => {
                give_back(transfers);
                return Err(e);
            }
        };
        let invocation = protocol::create_invocation(
            store,
            keys,
            actor_type,
            &data,
            self.verifier.as_ref().map(|v| v.as_slice()),
            self.mode,
        );
        Ok((invocation, transfers))
    }
}

impl<A: Actor> Creation<A> {
    fn new(
        id: String,
        state: A,
        options: ActorOptions,
        mode: CreateMode,
        hosts: HostsSetup,
    ) -> Result<Creation<A>> {
        let runtime = runtime::current_runtime()?;
        let starts_hosts = match hosts {
            HostsSetup::Blocking => {
                runtime.actor_hosts()?;
                None
            }
            HostsSetup::InTask => (!runtime.actor_hosts_started())
                .then(|| (runtime.downgrade(), context::current_process())),
        };
        let store = runtime.context().store().clone();
        let keys = ActorKeys::new(store.keys(), &id);
        let actor_type = std::any::type_name::<A>();
        // Hosts check messages with their process's key, which is this process's (they are
        // its children): the actor records that key's verifier.
        let verifier = options
            .authenticate
            .then(|| protocol::verifier(&AuthKey::of_this_process(), &id));
        let mut transfers = None;
        let data = match hosts {
            HostsSetup::Blocking => {
                let (data, sent) = collect_transfers(|| store.encode(&state, actor_type));
                if data.is_err() {
                    give_back(sent);
                } else {
                    transfers = Some(sent);
                }
                Some(data?)
            }
            HostsSetup::InTask => {
                encode_without_round_trips(|| store.encode(&state, actor_type)).transpose()?
            }
        };
        let (invocation, deferred) = match data {
            Some(data) => {
                let invocation = protocol::create_invocation(
                    &store,
                    &keys,
                    actor_type,
                    &data,
                    verifier.as_ref().map(|v| v.as_slice()),
                    mode,
                );
                (Some(invocation), None)
            }
            None => (
                None,
                Some(Deferred {
                    state,
                    verifier,
                    mode,
                }),
            ),
        };
        Ok(Creation {
            id,
            keys,
            store,
            authenticated: options.authenticate,
            invocation,
            transfers,
            deferred,
            starts_hosts,
            _actor: PhantomData,
        })
    }

    /// Sends the creation from shoal's actor runtime, after the activations' group when this
    /// creation starts the runtime's hosts (which it then starts).
    async fn send(mut self) -> Result<ActorRef<A>> {
        let invocation = self.invocation.take();
        let deferred = self
            .deferred
            .take()
            .map(|deferred| (deferred, self.store.clone(), self.keys.clone()));
        let state_key = self.keys.state.clone();
        let activations = self
            .starts_hosts
            .is_some()
            .then(|| protocol::activations_creation(&HostKeys::new(self.store.keys())));
        let (group_made, outcome) = context::current()?
            .spawn(move |store, caller| async move {
                let mut group_made = activations.is_none();
                let mut sent = None;
                let outcome = async {
                    // A state kept back is encoded first, on the blocking pool, where it is
                    // dropped too, whatever comes next: dropping a pipe end may make a round
                    // trip, which this thread must not wait on.
                    let invocation = match (invocation, deferred) {
                        (Some(invocation), _) => invocation,
                        (None, Some((deferred, store, keys))) => {
                            let (invocation, transfers) = tokio::task::spawn_blocking(move || {
                                deferred.invocation(&store, &keys)
                            })
                            .await
                            .map_err(|e| {
                                Error::Backend(format!("encoding the actor's state failed: {e}"))
                            })??;
                            sent = Some(transfers);
                            invocation
                        }
                        (None, None) => {
                            return Err(Error::invalid_state("the creation was sent already"));
                        }
                    };
                    let mut conn = store.shared().await?;
                    if let Some(group) = activations {
                        let created = group.query_async::<()>(&mut conn).await;
                        protocol::activations_created(created)
                            .map_err(|e| Error::redis("creating the actor hosts' group", e))?;
                        group_made = true;
                    }
                    invocation
                        .invoke_async::<String>(&mut conn)
                        .await
                        .map_err(|e| Error::redis(format!("creating actor {state_key}"), e))
                }
                .await;
                if let Some(transfers) = sent.filter(|_| state_unused(&outcome)) {
                    let _ = tokio::task::spawn_blocking(move || give_back(transfers)).await;
                }
                caller.finish(Ok((group_made, outcome)));
            })
            .await?;
        // Without the group (its creation failed), the next creation makes it and starts them.
        if let Some((runtime, creator)) = self.starts_hosts.take()
            && group_made
            && let Some(runtime) = runtime.upgrade()
        {
            runtime.start_actor_hosts(creator);
            // Not the last reference (`ACTIVE` or a worker's keeps the runtime), but should it
            // be, the teardown must not run on the caller's executor.
            runtime::drop_elsewhere(runtime);
        }
        self.finish(outcome)
    }

    /// The reference to the actor, from the script's answer.
    fn finish(self, outcome: Result<String>) -> Result<ActorRef<A>> {
        let id = self.id;
        protocol::create_outcome(&self.keys, outcome).map_err(|e| match &e {
            Error::Redis { source, .. } if source.code() == Some("TYPE") => {
                Error::invalid_state(format!(
                    "actor {id} exists with another type: {}",
                    source.detail().unwrap_or_default()
                ))
            }
            _ => e,
        })?;
        Ok(ActorRef {
            id,
            authenticated: self.authenticated,
            authkey: None,
            known_active: Arc::default(),
            _actor: PhantomData,
        })
    }
}
