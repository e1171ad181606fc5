//! # shoal
//!
//! Python's `multiprocessing` API as an actor-based distributed runtime. A program written
//! against [`Process`], [`Pool`], [`Queue`], [`Pipe`], [`Lock`], [`RLock`], [`Semaphore`],
//! [`Event`], [`Condition`], [`Barrier`], [`Value`], [`Array`], [`Manager`] and durable actors
//! ([`spawn_actor`], [`ActorRef`]) runs its children as subprocesses or threads on this machine, or
//! as Kubernetes Jobs (`shoal.backend: kubernetes`, the `kubernetes` feature), with every message
//! and all shared state in Redis, so that any process on any machine reaches any of them.
//!
//! ```no_run
//! use shoal::prelude::*;
//!
//! #[shoal::remote]
//! fn f(name: String) {
//!     println!("hello {name}");
//! }
//!
//! fn main() -> shoal::Result<()> {
//!     let _rt = shoal::init()?; // in a child, runs its task and exits instead of returning
//!     let p = Process::new(f, ("bob".to_string(),));
//!     p.start()?;
//!     p.join(None)?;
//!     Ok(())
//! }
//! ```
//!
//! Where the semantics are: [`process`] (Process, exit codes, start methods), [`pool`] (Pool,
//! fault tolerance, cancellation), [`primitives`] (one module per primitive: semantics, keys,
//! round trips), [`manager`], [`actor`] (durable actors: exactly-once, hosts, leases), and
//! [`guide`] (using shoal in an async service). What is not built yet is listed in the
//! repository's README.
//!
//! ## The same-binary model
//!
//! Rust cannot send closures between processes (a closure runs on a thread of this process
//! with [`Process::thread`]). The program that starts a child is also the child: a subprocess
//! runs this same binary with the task's address in its environment, and [`init`] notices, runs
//! the task and exits. So:
//!
//! * functions that run in a subprocess carry [`#[shoal::remote]`](remote), which registers them
//!   under their full path at link time (a non-generic, non-async free function of 0 to 8
//!   owned serde arguments, returning a serde type; a `Result` return makes `Err` a task error)
//!   and makes the function's name a typed handle ([`Remote`]) that derefs to the function.
//!   The path is the module's and the name's: two such functions defined in function bodies
//!   of one module share it, and a call of either is refused
//!   ([`Error::AmbiguousFunction`]) rather than risk running the other. [`Process::new`], the [`Pool`]'s calls and [`Barrier::with_action`] accept only such handles
//!   ([`RemoteFn`]), so a function without the attribute, or a closure, does not compile:
//!
//! ```compile_fail
//! fn square(x: u64) -> u64 { x * x } // no #[shoal::remote]
//!
//! fn main() -> shoal::Result<()> {
//!     let _rt = shoal::init()?;
//!     let pool = shoal::Pool::new(2)?;
//!     pool.map(square, vec![1u64, 2])?; // error: `square` is not a `#[shoal::remote]` function
//!     Ok(())
//! }
//! ```
//!
//! ```compile_fail
//! fn main() -> shoal::Result<()> {
//!     let _rt = shoal::init()?;
//!     let pool = shoal::Pool::new(2)?;
//!     pool.map(|x: u64| x * x, vec![1u64, 2])?; // error: a closure cannot run elsewhere
//!     Ok(())
//! }
//! ```
//!
//!   With the attribute the same code compiles, and `square` can still be called here:
//!
//! ```no_run
//! #[shoal::remote]
//! fn square(x: u64) -> u64 { x * x }
//!
//! fn main() -> shoal::Result<()> {
//!     let _rt = shoal::init()?;
//!     let pool = shoal::Pool::new(2)?;
//!     assert_eq!(pool.map(square, vec![1u64, 2])?, vec![square(1), square(2)]);
//!     Ok(())
//! }
//! ```
//!
//! * `shoal::init()` must come first in `main`: a child runs nothing before it;
//! * in a **test binary**, invoke [`test_support!()`](test_support) once at the top of the test
//!   file (or module). It adds a test named `shoal_worker_entry` and marks the binary, so that a
//!   child is started as that single test (`--exact`) instead of running the whole suite. Without
//!   it, a child of a test binary would run every test.
//!
//! ## Configuration
//!
//! `config.yaml` (see the repository's documented copy), `SHOAL_<SECTION>_<KEY>` environment
//! overrides, or [`Config::builder`] with [`init_with`]. With no `redis.url`, the runtime starts
//! its own `redis-server` on a private Unix socket and stops it when the [`Runtime`] is dropped.
//!
//! ## Logging
//!
//! shoal logs with `tracing` and never installs a global subscriber in your program: a service
//! keeps its own (installed before or after [`init`]). [`log_to_stderr`] installs one that reads
//! `RUST_LOG` (default `warn`), as Python's `multiprocessing.log_to_stderr()`. Worker processes,
//! which run only shoal's code, log to stderr that way.

extern crate self as shoal;

pub mod actor;
pub mod guide;
mod liveness;
pub mod manager;
pub mod pool;
pub mod process;
mod runtime;

/// The shared primitives' modules, each with its semantics, keys and round trips (`Queue`,
/// `Pipe`, `Lock`... are re-exported at the crate root).
pub use shoal_primitives as primitives;

pub use actor::{
    ActorOptions, ActorRef, get_or_spawn, get_or_spawn_async, get_or_spawn_with,
    get_or_spawn_with_async, spawn_actor, spawn_actor_async, spawn_actor_with,
    spawn_actor_with_async,
};
pub use manager::{
    DictProxy, DictStream, ListProxy, ListStream, Manager, ManagerAddress, NamespaceProxy,
};
pub use pool::{
    AsyncCall, AsyncOptions, AsyncResult, AsyncResultFuture, IMapIterator, IMapStream, Pool,
    PoolBuilder,
};
pub use process::{ChildProcess, Process, active_children};
pub use runtime::{Runtime, init, init_with, log_to_stderr, shutdown_signal, worker_main};
pub use shoal_core::config::{self, Config, ConfigBuilder, StartMethod};
pub use shoal_core::context::{AuthKey, ParentInfo, ProcessInfo, set_authkey};
pub use shoal_core::error::{Error, Result, TaskError, TaskErrorKind};
pub use shoal_core::hosted::{Actor, ActorContext, Handler, Handles};
pub use shoal_core::registry::{Callable, Remote, RemoteFn};
pub use shoal_macros::remote;
pub use shoal_macros::{Actor, main};
pub use shoal_primitives::{
    Array, Barrier, BoundedSemaphore, Condition, Connection, Event, Guard, Integer, JoinableQueue,
    Lock, Pipe, Queue, RLock, Scalar, Semaphore, SimpleQueue, Value,
};

/// Who the calling code runs as: `MainProcess`, a child's name and identity, or a thread
/// child's (Python's `multiprocessing.current_process()`), with its pid, daemon flag,
/// authentication key and parent.
///
/// ```
/// let me = shoal::current_process();
/// assert_eq!(me.name, "MainProcess");
/// assert_eq!(me.pid(), std::process::id());
/// assert!(!me.daemon && me.is_alive() && me.exitcode().is_none());
/// assert_eq!(me.authkey.as_bytes().len(), 32);
/// ```
pub fn current_process() -> ProcessInfo {
    shoal_core::context::current_process()
}

/// The process that started this one, `None` in the main process (Python's
/// `multiprocessing.parent_process()`).
///
/// ```
/// assert!(shoal::parent_process().is_none());
/// ```
pub fn parent_process() -> Option<ParentInfo> {
    shoal_core::context::current_process().parent
}

/// True in a thread child whose `terminate()` or `kill()` was called. A thread cannot be
/// stopped from outside, so a long-running thread target polls this and returns.
pub fn termination_requested() -> bool {
    shoal_core::context::termination_requested()
}

/// Makes a test binary usable as a worker: invoke once at the top of a test file that starts
/// processes with the `process` start method.
///
/// It defines a test `shoal_worker_entry` (a no-op in a normal run) and marks the binary, so
/// that shoal starts each child as that one test. Invoke it at the crate root of the test binary
/// or inside one module; one invocation per binary.
#[macro_export]
macro_rules! test_support {
    () => {
        #[test]
        fn shoal_worker_entry() {
            $crate::__private::run_worker_entry();
        }

        // linkme places the marker in a link section; the marker is plain data.
        #[doc(hidden)]
        #[allow(unsafe_code, non_upper_case_globals)]
        #[$crate::__private::linkme::distributed_slice($crate::__private::TEST_WORKER_ENTRIES)]
        #[linkme(crate = $crate::__private::linkme)]
        static __SHOAL_TEST_WORKER_ENTRY: &str = ::core::module_path!();
    };
}

/// Everything a Python `multiprocessing` user reaches for.
pub mod prelude {
    pub use crate::{
        Actor, ActorContext, ActorRef, Array, AsyncOptions, AsyncResult, Barrier, BoundedSemaphore,
        Condition, Config, Connection, DictProxy, Error, Event, Handler, JoinableQueue, ListProxy,
        Lock, Manager, ManagerAddress, NamespaceProxy, Pipe, Pool, Process, Queue, RLock, Result,
        Semaphore, SimpleQueue, StartMethod, Value, active_children, current_process, get_or_spawn,
        parent_process, remote, spawn_actor, termination_requested,
    };
}

/// Support for shoal's macros; not a public API.
#[doc(hidden)]
pub mod __private {
    pub use linkme;
    pub use shoal_core::hosted::{
        ACTOR_TYPES, ActorType, handle_encoded, kind_of, restore as restore_actor, unknown_message,
    };
    pub use shoal_core::registry::{
        DescribeDebug, DescribeDisplay, DescribeOpaque, Described, EncodeFallback, EncodeSerialize,
        Encoded, Failure, REMOTE_FUNCTIONS, RemoteFunction, Returned, TEST_WORKER_ENTRIES,
        decode_args,
    };

    /// Runs the worker if this process is one (never returns then); returns otherwise.
    pub fn run_worker_entry() {
        crate::runtime::run_worker_if_requested();
    }
}
