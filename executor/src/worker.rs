//! The worker path every backend runs.
//!
//! A worker is this same binary started with a task address in its environment
//! ([`TaskAddress`]). `shoal::init()` (or the `shoal_worker_entry` test of a test binary) sees the
//! address and calls [`run`], which:
//!
//! 1. connects to the store and claims the task (one script call); a task that is missing,
//!    expired or already claimed ends the worker with exit code 1 and a message on stderr;
//! 2. installs the process context (the parent's configuration, this process's name and
//!    identity), so handles received as arguments work;
//! 3. redirects stdout/stderr into the output stream if the parent asked for it and reads it
//!    (a process's parent and a pool's supervisor do; an actor host's output stays on the
//!    backend's own stdout and stderr: the terminal, or the pod's log);
//! 4. looks the function up in the registry and calls it, catching panics (a remote `Process`
//!    also watches the liveness key of the runtime that started it, and exits with
//!    [`EXIT_DRIVER_GONE`] once it lapsed: see `TaskRecord::driver`); or, for a pool worker,
//!    serves the pool ([`crate::pool::run_worker`]) until it is told to stop;
//! 5. runs the caller's end-of-task hook (the runtime joins this worker's own non-daemon
//!    children there, as Python does at exit);
//! 6. records the exit in the status hash and returns the exit code: 0 when the function
//!    returned, 1 when it panicked, returned `Err`, or could not run, and
//!    [`EXIT_STORE_LOST`] (75) when Redis could not be reached before the function ran, or a
//!    pool worker or actor host lost it (nothing is recorded then), and [`EXIT_POOL_GONE`] (77)
//!    when a pool worker found its pool's state gone from Redis (see
//!    [`pool::is_state_lost`]; recorded with the reason). A function that ran keeps
//!    its code when the record cannot be written (Redis went away meanwhile): the backend
//!    reports the code, the record only adds the error's details.
//!
//! A function that calls `std::process::exit(n)` ends the worker at once with code `n`; the
//! backend observes that code (the status hash then still says `running`).
//!
//! # A worker that is PID 1
//!
//! A container's process is PID 1 of its PID namespace unless its pod shares one PID namespace
//! between its containers (then the pod's pause container is PID 1). The Jobs of the Kubernetes
//! backend share it (`shareProcessNamespace: true`, see `crate::kubernetes`), so there a worker
//! is an ordinary process and keeps every default action. A worker run as PID 1 anyway (an
//! image run by hand, a pod made by other means) gets from the kernel no signal it has no
//! handler for (`SIGKILL` from outside the namespace excepted; a `raise(SIGKILL)` of its own
//! does nothing). `SIGTERM`, which a pod deletion sends first, would be ignored:
//! `terminate()` would wait out the pod's grace period and end with `SIGKILL` (-9) instead of
//! -15. So a worker that finds itself PID 1 installs a `SIGTERM` handler that exits at once
//! with 143 (128 + 15, what a shell reports for a process `SIGTERM` ended, and what backends
//! read as -15), doing what `SIGTERM`'s default action does elsewhere. A worker that is not
//! PID 1 keeps the default action, which ends it with the signal itself (reported as 143 by a
//! container runtime, -15 by the local backend). No handler helps a PID 1 that signals itself
//! with `SIGKILL`, which cannot be caught.

use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_core::TaskErrorKind;
use shoal_core::config::Config;
use shoal_core::context::{self, AuthKey, Context, ProcessInfo};
use shoal_core::error::Result;
use shoal_core::registry::{self, Failure};
use shoal_core::store::{Store, StoreSettings};

use crate::output::OutputCapture;
use crate::pool::{self, EXIT_DRIVER_GONE, EXIT_POOL_GONE, EXIT_STORE_LOST, PoolKeys, WorkerEnd};
use crate::task::{ExitRecord, ProcessKeys, TaskAddress, TaskKind, TaskRecord};

/// Exit code of a worker ended by `SIGTERM` while it is PID 1: 128 + 15.
pub const EXIT_TERMINATED: i32 = 143;

/// Runs the task at `address` and returns the exit code the process should exit with.
pub fn run(address: &TaskAddress, on_task_end: &dyn Fn()) -> i32 {
    if std::process::id() == 1 {
        exit_on_sigterm();
    }
    match run_inner(address, on_task_end) {
        Ok(code) => code,
        Err(e) => {
            if e.is_store_unreachable() {
                // Not forwarded at exit: that would wait on the store that is gone.
                OutputCapture::abandon();
            }
            eprintln!("shoal worker {}: {e}", address.id);
            if e.is_store_unreachable() {
                EXIT_STORE_LOST
            } else {
                1
            }
        }
    }
}

fn run_inner(address: &TaskAddress, on_task_end: &dyn Fn()) -> Result<i32> {
    // Read before the task is claimed: a bad value leaves the task unclaimed.
    let env_authkey = crate::task::authkey_from_env()?;
    // The record's own limits are unknown until it is read: accept the largest payload Redis
    // can hold for the record, then apply the parent's settings.
    let mut bootstrap = StoreSettings::from_config(&Config::default());
    bootstrap.namespace = address.namespace.clone();
    bootstrap.max_message_bytes = 512 * 1024 * 1024;
    let store = Store::connect_lazy(&address.redis_url, bootstrap)?;
    let keys = ProcessKeys::new(store.keys(), &address.id);
    let record = TaskRecord::claim(&store, &keys, std::process::id())?;

    let mut config = record.config.clone();
    config.redis.url = Some(address.redis_url.clone());
    let store = Arc::new(store.with_settings(StoreSettings::from_config(&config)));
    context::install(Arc::new(Context::new(
        config,
        store.clone(),
        ProcessInfo {
            name: record.name.clone(),
            identity: record.identity.clone(),
            daemon: record.daemon,
            authkey: env_authkey.unwrap_or_else(AuthKey::generate),
            parent: record.parent.clone(),
        },
    )));

    // A process's parent and a pool's supervisor print their children's output streams; an
    // actor host's output stays where the backend puts it (the terminal, the pod's log) rather
    // than in a stream nobody reads.
    if record.stream_output
        && matches!(record.kind, TaskKind::Call { .. } | TaskKind::PoolWorker(_))
    {
        OutputCapture::start(store.clone(), keys.output.clone())?;
    }

    if let (Some((key, ttl_ms)), TaskKind::Call { .. }) = (&record.driver, &record.kind) {
        watch_driver(
            store.clone(),
            key.clone(),
            Duration::from_millis(*ttl_ms),
            &record.name,
        );
    }

    // The code a failure exits with: 1, unless the outcome says otherwise.
    let mut failure_code = 1;
    let (function, outcome) = match &record.kind {
        TaskKind::Call { function, args } => (
            function.clone(),
            match registry::lookup(function) {
                Some(entry) => registry::call(entry, args, store.settings().max_message_bytes)
                    .and_then(registry::Returned::into_process_outcome),
                None => Err(Failure::error(registry::unknown_here(function))),
            },
        ),
        TaskKind::ActorHost(spec) => (
            format!("actor host {}", spec.host_id),
            match crate::actor::host::run_host(&store, spec) {
                Ok(()) => Ok(()),
                Err(e) if e.is_store_unreachable() => return Err(e),
                Err(e) => Err(Failure::error(e)),
            },
        ),
        TaskKind::PoolWorker(spec) => (
            format!("pool {}", spec.pool_id),
            match pool::run_worker(&store, spec) {
                // Its own exit code: the supervisor must not take it for a worker that
                // stopped and start another, which would find the same.
                Ok(WorkerEnd::PoolGone) => {
                    failure_code = EXIT_POOL_GONE;
                    Err(Failure::error(pool::state_lost(&PoolKeys::new(
                        store.keys(),
                        &spec.pool_id,
                    ))))
                }
                Ok(_) => Ok(()),
                // Nothing can be recorded: exit with the store-lost code.
                Err(e) if e.is_store_unreachable() => return Err(e),
                Err(e) => Err(Failure::error(e)),
            },
        ),
    };
    let exit = match &outcome {
        Ok(()) => ExitRecord {
            code: 0,
            kind: None,
            error: None,
        },
        Err(failure) => {
            // A panic was already printed by the panic hook; an error was not.
            if failure.kind != TaskErrorKind::Panic {
                eprintln!(
                    "Process {} ({}) failed: {}",
                    record.name, function, failure.message
                );
            }
            ExitRecord {
                code: failure_code,
                kind: Some(failure.kind.to_string()),
                error: Some(failure.message.clone()),
            }
        }
    };
    on_task_end();
    if let Err(e) = OutputCapture::finish() {
        eprintln!("shoal worker {}: {e}", address.id);
    }
    // The exit code is the backend's to report (the process's status, the container's): a
    // record that cannot be written costs its details (`kind`, `error`), not the code.
    if let Err(e) = store.retry_unreachable(|| exit.write(&store, &keys)) {
        eprintln!(
            "shoal worker {}: cannot record the exit ({e}); exiting with its code {}",
            address.id, exit.code
        );
    }
    Ok(exit.code)
}

/// Ends this process with [`EXIT_DRIVER_GONE`] once the liveness key of the runtime that
/// started it (`key`, with a TTL of `ttl`) has been missing for half the TTL: a remote child
/// does not outlive its driver (see `TaskRecord::driver`). Only an answer from Redis is
/// evidence; an error is not (the store's own failure handling decides then).
fn watch_driver(store: Arc<Store>, key: String, ttl: Duration, name: &str) {
    let name = name.to_string();
    let every = (ttl / 4).max(Duration::from_millis(10));
    let spawned = std::thread::Builder::new()
        .name("shoal-driver-watch".into())
        .spawn(move || {
            let mut missing_since: Option<Instant> = None;
            loop {
                std::thread::sleep(every);
                let alive = store.with_conn(
                    || format!("checking the driver's liveness key {key}"),
                    |c| redis::cmd("EXISTS").arg(&key).query::<bool>(c),
                );
                match alive {
                    Ok(true) => missing_since = None,
                    Ok(false) => {
                        let since = *missing_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= ttl / 2 {
                            eprintln!(
                                "shoal worker {name}: the runtime that started it is gone (its \
                                 liveness key lapsed); exiting"
                            );
                            std::process::exit(EXIT_DRIVER_GONE);
                        }
                    }
                    Err(_) => {}
                }
            }
        });
    if let Err(e) = spawned {
        eprintln!("shoal worker: cannot watch the driver's liveness: {e}");
    }
}

/// Makes `SIGTERM` end this process with [`EXIT_TERMINATED`] (see the module docs: a PID 1
/// would otherwise ignore it).
#[allow(unsafe_code)]
fn exit_on_sigterm() {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

    extern "C" fn on_sigterm(_: nix::libc::c_int) {
        // SAFETY: `_exit` is async-signal-safe (POSIX.1 lists it); it ends the process at once
        // without running atexit handlers or touching any lock, buffer or allocator state the
        // interrupted code may hold.
        unsafe { nix::libc::_exit(EXIT_TERMINATED) }
    }

    let action = SigAction::new(
        SigHandler::Handler(on_sigterm),
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: the handler only calls `_exit`, which is async-signal-safe, and this replaces the
    // default disposition of SIGTERM, which nothing else in a worker installs.
    if let Err(e) = unsafe { sigaction(Signal::SIGTERM, &action) } {
        eprintln!("shoal worker: cannot handle SIGTERM as PID 1: {e}");
    }
}
