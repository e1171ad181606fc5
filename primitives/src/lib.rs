//! shoal's shared primitives: Python's `multiprocessing` synchronization and communication
//! objects, kept in Redis so that every process on every machine reaches the same one.
//!
//! Each primitive is its own module, whose docs state its semantics, its keys and the round
//! trips of each operation; its Lua scripts sit beside it. A primitive's state and its queue of
//! waiting callers live under one hash tag, and every check-then-act is one script, so each
//! primitive handles one operation at a time, as an actor does, with no host process that could
//! die. Handles are small serde values (an address) and can be passed to other processes.
//!
//! Every blocking call has an async twin (`get_async`, `acquire_async`, `wait_async`...) with
//! the same semantics and errors. Each operation is written once as a state machine of round
//! trips (`op.rs`): the blocking form runs it on the caller's thread with pooled synchronous
//! connections, the async form as a task on shoal's actor runtime whose result comes back
//! through a oneshot channel, so any executor can await it and no thread is parked per call.
//! Dropping an async future never loses what Redis already did: the task gives up the way a
//! timeout does, and undoes a result nobody took (each module's docs say how).

pub mod barrier;
mod common;
pub mod condition;
pub mod event;
mod grants;
pub mod lock;
mod op;
pub mod pipe;
pub mod queue;
pub mod scalar;
pub mod semaphore;
pub mod value;

pub use barrier::Barrier;
pub use condition::Condition;
pub use event::Event;
pub use lock::{Guard, Lock, RLock};
pub use pipe::{Connection, Pipe};
pub use queue::{JoinableQueue, Queue, SimpleQueue};
pub use scalar::{Integer, Scalar};
pub use semaphore::{BoundedSemaphore, Semaphore};
pub use value::{Array, Value};
