//! Foundations of shoal: configuration, errors, the codec, the Redis store (connections, key
//! schema, scripts, embedded server), the registry of remote functions, the process-wide context
//! and the actor-system bootstrap.
//!
//! Users depend on the `shoal` crate, which re-exports what they need from here.

pub mod actors;
pub mod auth;
pub mod clock;
pub mod codec;
pub mod config;
pub mod context;
pub mod error;
pub mod hosted;
pub mod registry;
pub mod store;
pub mod transfers;

pub use config::{Config, ConfigBuilder, StartMethod};
pub use error::{Error, Result, TaskError, TaskErrorKind};
