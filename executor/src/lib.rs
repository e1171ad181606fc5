//! shoal's executors and the worker path.
//!
//! * [`protocol`]: the messages every backend's executor actor answers (launch, signal, exit).
//! * [`local`]: the local backend (subprocesses of this binary, or threads).
//! * [`actor`]: the hosted-actor protocol (mailboxes, leases, commits) and the host loop.
//! * `kubernetes` (feature `kubernetes`): workers as Kubernetes Jobs.
//! * [`task`]: the task record a worker reads and the status it writes, with their keys.
//! * [`worker`]: what a worker process does with its task.
//! * [`output`]: a child's stdout/stderr through a Redis Stream.
//! * [`pool`]: the pool protocol (task and result streams, leases, redelivery) and the pool
//!   worker loop.

pub mod actor;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
pub mod local;
pub mod output;
pub mod pool;
pub mod protocol;
pub mod task;
pub mod worker;

pub use protocol::{Executor, Launch, Launched, StopSignal, WorkerExited, WorkerStatus, Workload};
