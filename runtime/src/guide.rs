//! Guides: how to use shoal in the situations its docs elsewhere do not walk through.
//!
//! # Use in a service
//!
//! A web service (axum, actix-web) that fans requests out to a [`Pool`](crate::Pool), or talks
//! to actors, embeds one shoal runtime. The rules:
//!
//! 1. **Start-up.** A worker is this same program started again. Nothing may run before shoal
//!    has checked whether this process is a worker: put `#[shoal::main]` above `main` (above
//!    `#[tokio::main]` or `#[actix_web::main]`), or call [`worker_main`](crate::worker_main) (or
//!    [`init`](crate::init)) first thing. Otherwise your server, your runtime and your log lines
//!    start again in every worker.
//! 2. **Logging.** shoal never installs a global `tracing` subscriber: install yours, before or
//!    after `init` ([`log_to_stderr`](crate::log_to_stderr) is the opt-in one for scripts).
//! 3. **Async.** Hold the `Pool` in your state (`Arc<Pool>`). `.await` an
//!    [`AsyncResult`](crate::AsyncResult) (`pool.map_async(...)?.await`), or turn an `imap` into
//!    a `Stream` ([`IMapIterator::into_stream`](crate::IMapIterator::into_stream)); no executor
//!    thread waits: the pool's supervisor wakes your task. The primitives have `_async` forms,
//!    and so do a `Process`'s start and join
//!    ([`Process::start_async`](crate::Process::start_async)) and a pool's making and ending
//!    ([`Pool::new_async`](crate::Pool::new_async), `close_async`, `join_async`), and a
//!    manager's ([`Manager::new_async`](crate::Manager::new_async), `connect_async`). An
//!    actor's [`tell_async`](crate::ActorRef::tell_async), `ask_async` and `stop_async`, and
//!    the Manager's and its proxies' async calls, awaited in your handlers (tasks of your Tokio
//!    runtime), run on your runtime on connections opened there, with no hop to shoal's
//!    threads: build it with IO and timers (`#[tokio::main]` does), never block its threads on
//!    them, and use their blocking forms under a paused clock (`start_paused` tests).
//! 4. **Cancellation.** Dropping an awaited call (your request timed out, the client went away)
//!    cancels it: its items that did not start never run, running tasks see
//!    [`termination_requested`](crate::termination_requested), and a worker that ignores it is
//!    replaced. [`AsyncOptions::deadline`](crate::AsyncOptions::deadline) bounds a call. A
//!    process's start is not cancelled: a dropped
//!    [`Process::start_async`](crate::Process::start_async) starts it all the same (terminate
//!    it if you must), and a dropped [`Pool::new_async`](crate::Pool::new_async) terminates
//!    the pool it made.
//! 5. **Shutdown.** Children run in their own process group, so a terminal's Ctrl-C reaches your
//!    program only. Resolve your server's graceful shutdown with
//!    [`shutdown_signal`](crate::shutdown_signal) (SIGINT or SIGTERM), let it finish its
//!    requests, then call [`Runtime::shutdown_within`](crate::Runtime::shutdown_within): it
//!    refuses new work, lets pool calls in flight finish for the drain time, then stops the
//!    workers, the actor hosts and the embedded store. If your program dies instead, its
//!    children follow it (parent-death signal).
//! 6. **Failures.** Redis going away fails calls with [`Error::Redis`](crate::Error::Redis) once
//!    it stayed unreachable for `redis.response_timeout_secs`; it is never counted as worker
//!    crashes, and connections Redis drops are reopened.
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use shoal::prelude::*;
//!
//! #[shoal::remote]
//! fn square(x: u64) -> u64 {
//!     x * x
//! }
//!
//! #[shoal::main]
//! #[tokio::main(flavor = "current_thread")]
//! async fn main() -> shoal::Result<()> {
//!     let rt = shoal::init()?;
//!     let pool = Arc::new(Pool::new_async(4).await?);
//!     let sum: u64 = pool.map_async(square, 0..100u64)?.await?.iter().sum();
//!     println!("{sum}");
//!     shoal::shutdown_signal().await; // a server would serve until then
//!     rt.shutdown_within(Duration::from_secs(30));
//!     Ok(())
//! }
//! ```
//!
//! The repository's `examples/service.rs` is a complete axum service built this way, with a
//! load test (`--self-test`).
