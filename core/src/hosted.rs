//! Workloads as actors: the traits a user type implements to be hosted as a durable actor, and
//! the link-time registry of actor types a host process looks them up in.
//!
//! An actor is a serde type (its state) with handlers for serde message types:
//!
//! ```ignore
//! #[derive(Serialize, Deserialize, Default, shoal::Actor)]
//! #[actor(messages(Incr, Get))]
//! struct Counter { n: u64 }
//!
//! #[derive(Serialize, Deserialize)]
//! struct Incr(u64);
//!
//! impl shoal::Handler<Incr> for Counter {
//!     type Reply = u64;
//!     fn handle(&mut self, Incr(by): Incr, _: &mut shoal::ActorContext) -> u64 {
//!         self.n += by;
//!         self.n
//!     }
//! }
//! ```
//!
//! `#[derive(shoal::Actor)]` implements [`Actor`] (the dispatch from a message's kind to its
//! handler), a [`Handles`] marker for each message listed, so that `ActorRef::ask` accepts only
//! those at compile time, and an entry of [`ACTOR_TYPES`] (linkme), so that a host process (this
//! same program) can restore the state and run the handlers. A message's kind is its type's full
//! path ([`std::any::type_name`]), the same in every process running this build.

use std::collections::HashMap;
use std::sync::OnceLock;

use linkme::distributed_slice;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec;
use crate::registry::{Failure, catch_panic};

/// A type hosted as a durable actor: its value is the actor's state, saved after every batch of
/// messages. Implemented by `#[derive(shoal::Actor)]`.
pub trait Actor: Serialize + DeserializeOwned + Send + 'static {
    /// Runs the handler of the message of kind `kind` (encoded as `payload`) and returns the
    /// encoded reply. Generated: a `match` over the kinds listed in `#[actor(messages(...))]`.
    fn dispatch(
        &mut self,
        kind: &str,
        payload: &[u8],
        limit: usize,
        context: &mut ActorContext,
    ) -> Result<Vec<u8>, Failure>;
}

/// Handles messages of type `M`.
pub trait Handler<M>: Actor {
    /// What an `ask` gets back (a `tell` drops it).
    type Reply: Serialize + DeserializeOwned + Send + 'static;

    /// Applies `message` to the actor. A panic fails the message (an `ask` gets the panic as a
    /// task error) and the actor restarts from its state before the message.
    fn handle(&mut self, message: M, context: &mut ActorContext) -> Self::Reply;
}

/// Marks `M` as one of the messages `#[actor(messages(...))]` lists for this actor, so that
/// sending it is checked at compile time. Implemented by the derive only.
pub trait Handles<M>: Handler<M> {}

/// What a handler knows of the actor it runs in, and how it stops it.
#[derive(Debug)]
pub struct ActorContext {
    id: String,
    stop: bool,
}

impl ActorContext {
    /// A context for the actor `id`.
    pub fn new(id: impl Into<String>) -> Self {
        ActorContext {
            id: id.into(),
            stop: false,
        }
    }

    /// The actor's id (its name, for a named actor).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Stops the actor once this message is committed: later messages get an error saying it
    /// stopped.
    pub fn stop(&mut self) {
        self.stop = true;
    }

    /// Whether the handler asked to stop.
    pub fn stop_requested(&self) -> bool {
        self.stop
    }
}

/// The kind of messages of type `M` (its full type path).
pub fn kind_of<M>() -> &'static str {
    std::any::type_name::<M>()
}

/// Decodes a message, runs its handler, encodes the reply (used by the derive).
pub fn handle_encoded<A, M>(
    actor: &mut A,
    payload: &[u8],
    limit: usize,
    context: &mut ActorContext,
) -> Result<Vec<u8>, Failure>
where
    A: Handler<M>,
    M: DeserializeOwned,
{
    let message: M = codec::decode(payload, kind_of::<M>(), limit).map_err(Failure::error)?;
    let reply = actor.handle(message, context);
    codec::encode(&reply, std::any::type_name::<A::Reply>(), limit).map_err(Failure::error)
}

/// The error for a message kind the actor does not list (used by the derive).
pub fn unknown_message<A>(kind: &str) -> Failure {
    Failure::error(format!(
        "actor {} does not handle messages of kind {kind} (list it in #[actor(messages(...))])",
        std::any::type_name::<A>()
    ))
}

/// A hosted actor with its type erased: what a host keeps in memory.
pub trait HostedActor: Send {
    /// Handles one message; a panic is caught and reported as a [`Failure`] of kind `Panic`.
    fn handle(
        &mut self,
        kind: &str,
        payload: &[u8],
        limit: usize,
        context: &mut ActorContext,
    ) -> Result<Vec<u8>, Failure>;

    /// The state, encoded; a panic of the type's `Serialize` is caught and reported as a
    /// [`Failure`] of kind `Panic`.
    fn save(&self, limit: usize) -> Result<Vec<u8>, Failure>;
}

impl<A: Actor> HostedActor for A {
    fn handle(
        &mut self,
        kind: &str,
        payload: &[u8],
        limit: usize,
        context: &mut ActorContext,
    ) -> Result<Vec<u8>, Failure> {
        catch_panic(|| self.dispatch(kind, payload, limit, context)).and_then(|r| r)
    }

    fn save(&self, limit: usize) -> Result<Vec<u8>, Failure> {
        // A panic in the type's `Serialize` fails the actor (see `HostedActor::save`), not the
        // host's thread.
        catch_panic(|| codec::encode(self, std::any::type_name::<A>(), limit))
            .map_err(|f| in_serde("serializing", f))?
            .map_err(Failure::error)
    }
}

/// Restores an actor of one type from its saved state.
pub type Restore = fn(state: &[u8], limit: usize) -> Result<Box<dyn HostedActor>, Failure>;

/// One actor type `#[derive(shoal::Actor)]` registered.
#[derive(Debug)]
pub struct ActorType {
    /// The type's full path.
    pub name: fn() -> &'static str,
    /// Restores an actor of this type from its saved state.
    pub restore: Restore,
}

/// Every actor type registered in this binary.
#[distributed_slice]
pub static ACTOR_TYPES: [ActorType];

/// The registered actor type called `name`.
pub fn lookup_type(name: &str) -> Option<&'static ActorType> {
    static INDEX: OnceLock<HashMap<&'static str, &'static ActorType>> = OnceLock::new();
    INDEX
        .get_or_init(|| ACTOR_TYPES.iter().map(|t| ((t.name)(), t)).collect())
        .get(name)
        .copied()
}

/// Restores an `A` from its saved state (used by the derive's registry entry). A panic of the
/// type's `Deserialize` is caught and reported as a [`Failure`] of kind `Panic`.
pub fn restore<A: Actor>(state: &[u8], limit: usize) -> Result<Box<dyn HostedActor>, Failure> {
    let actor: A = catch_panic(|| codec::decode(state, std::any::type_name::<A>(), limit))
        .map_err(|f| in_serde("deserializing", f))?
        .map_err(Failure::error)?;
    Ok(Box::new(actor))
}

/// A panic caught while `doing` (serializing, deserializing) an actor's state, said so.
fn in_serde(doing: &str, panic: Failure) -> Failure {
    Failure {
        message: format!("{doing} the state panicked: {}", panic.message),
        ..panic
    }
}
