//! The one error type of shoal.
//!
//! Every fallible operation returns [`Result<T>`](Result). The variants are the
//! ones a caller can act on; they mirror what Python's `multiprocessing` raises
//! (`queue.Empty`, `queue.Full`, `TimeoutError`, `BrokenBarrierError`,
//! `ValueError`/`AssertionError` as [`Error::InvalidState`], `EOFError` as
//! [`Error::Closed`]) plus what a distributed runtime adds (Redis, codec,
//! configuration and backend failures).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// shoal's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in shoal. Cloneable, so that a result can be read more than once
/// (`AsyncResult::get`) and handed to callbacks.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A wait gave up after its timeout (Python's `TimeoutError`).
    #[error("timed out after {0:?}")]
    Timeout(Duration),

    /// A non-blocking or timed `get` found nothing (Python's `queue.Empty`).
    #[error("empty")]
    Empty,

    /// A non-blocking or timed `put` found no room (Python's `queue.Full`).
    #[error("full")]
    Full,

    /// The call was cancelled (`cancel()`, or its future or stream was dropped) before it
    /// completed; what had not started did not run.
    #[error("cancelled: {0}")]
    Cancelled(String),

    /// A barrier was aborted, reset or timed out while this caller used it.
    #[error("broken barrier")]
    BrokenBarrier,

    /// The other end is closed and nothing is left to read, or this end is closed (Python's `EOFError`/`OSError`).
    #[error("closed: {0}")]
    Closed(String),

    /// `recv_bytes_into` was given a buffer too small for the message (Python's `BufferTooShort`):
    /// the message was consumed and is here, whole (Python's `args[0]`).
    #[error(
        "buffer too short: the message needs {needed} bytes from offset {offset}, the buffer has {available}"
    )]
    BufferTooShort {
        /// The whole message.
        message: Arc<[u8]>,
        /// The message's length.
        needed: usize,
        /// Where it would have been written.
        offset: usize,
        /// The buffer's length.
        available: usize,
    },

    /// The call is not valid in the object's current state (Python's `ValueError`, `AssertionError`, `RuntimeError`).
    #[error("invalid state: {0}")]
    InvalidState(String),

    /// A remote function failed.
    #[error(transparent)]
    Task(#[from] TaskError),

    /// A [`Remote`](crate::registry::Remote) handle names a function this binary did not
    /// register. Handles made by `#[shoal::remote]` always are (a plain function or a closure
    /// does not even compile where a remote function is wanted), so this means a handle made by
    /// hand.
    #[error(
        "function `{function}` is not registered: mark it with #[shoal::remote] (closures and \
         unmarked functions can only run on a thread: Process::thread)"
    )]
    NotRegistered {
        /// The function's full path, as the registry knows it.
        function: String,
    },

    /// Two functions of this binary marked `#[shoal::remote]` have the same path, so a worker
    /// could not tell which one to run: functions defined inside function bodies take their
    /// module's path, and a package's library and binary of the same name share their crate
    /// path. Neither runs under that name.
    #[error(
        "`{function}` names {count} different #[shoal::remote] functions in this binary (one \
         defined in a function body takes its module's path): rename one, or move it into a \
         module of its own"
    )]
    AmbiguousFunction {
        /// The path the functions share.
        function: String,
        /// How many functions registered it.
        count: usize,
    },

    /// A worker was sent a function its program does not have: the program that sent the task
    /// and the one running it (a container image, a copy on another host) are different builds.
    #[error(
        "function `{function}` is not registered in {program}, the program this worker runs: it \
         was built from another version of the program than the one that sent the task (rebuild \
         and redeploy the worker image or binary)"
    )]
    UnknownFunction {
        /// The function's registered name.
        function: String,
        /// The worker's program.
        program: String,
    },

    /// A payload could not be encoded or decoded.
    #[error("codec error at `{key}` (type `{expected}`): {reason}")]
    Codec {
        /// The Redis key, mailbox or argument list the payload belongs to.
        key: String,
        /// The Rust type that was written or expected.
        expected: String,
        /// What went wrong.
        reason: String,
    },

    /// A payload is larger than `redis.max_message_bytes`.
    #[error("message of {size} bytes at `{key}` exceeds redis.max_message_bytes = {limit}")]
    TooLarge {
        /// The Redis key or mailbox the payload belongs to.
        key: String,
        /// The payload's size in bytes.
        size: usize,
        /// The configured limit.
        limit: usize,
    },

    /// Redis refused a command, went away, or did not answer in time.
    #[error("redis: {context}: {source}")]
    Redis {
        /// What shoal was doing.
        context: String,
        /// The client's error.
        #[source]
        source: Arc<redis::RedisError>,
    },

    /// The configuration is invalid.
    #[error("configuration error in {origin}: `{key}`: {reason}")]
    Config {
        /// Where the value came from: a file path, an environment variable, code or the defaults.
        origin: String,
        /// The dotted key, e.g. `redis.expiry_secs`.
        key: String,
        /// Why it is wrong.
        reason: String,
    },

    /// An execution backend failed to launch, signal or observe a process.
    #[error("backend: {0}")]
    Backend(String),

    /// The input of a pool call failed part way: its iterator panicked. The items read before
    /// were run and their results delivered first (Python re-raises the iterator's exception).
    #[error("the input of the call failed: {0}")]
    Input(String),

    /// A message failed authentication (a wrong or missing HMAC under the receiver's authkey,
    /// or `Manager::connect` with a wrong authkey); nothing was executed.
    #[error("authentication failed: {0}")]
    Authentication(String),

    /// A key is not in a shared dictionary (Python's `KeyError`).
    #[error("key error: {0}")]
    KeyError(String),

    /// An index is outside a shared list (Python's `IndexError`).
    #[error("index error: {0}")]
    IndexError(String),

    /// An operating-system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What shoal was doing.
        context: String,
        /// The OS error.
        #[source]
        source: Arc<std::io::Error>,
    },
}

/// The first command error of a pipeline's error when the pipeline's own has no code (see
/// [`Error::redis`]); `source` otherwise.
fn first_server_error(source: redis::RedisError) -> redis::RedisError {
    if source.code().is_some() {
        return source;
    }
    match source.clone().into_server_errors() {
        Some(errors) => match errors.first() {
            Some((_, first)) => redis::RedisError::from(first.clone()),
            None => source,
        },
        None => source,
    }
}

impl Error {
    /// Wraps a Redis error with what shoal was doing when it happened.
    ///
    /// A pipeline whose command failed with an error code redis-rs does not know (`NOGROUP`,
    /// `WRONGTYPE`, a script's own `GONE`...) comes back from redis-rs without a code
    /// (`RedisError::code` is `None`): the first failed command's own error stands for it then,
    /// so that [`redis::RedisError::code`] says what failed whether or not the command was
    /// pipelined.
    ///
    /// ```
    /// use shoal_core::Error;
    ///
    /// let refused = redis::RedisError::from(std::io::Error::other("connection reset"));
    /// let Error::Redis { context, .. } = Error::redis("reading the queue", refused) else {
    ///     unreachable!()
    /// };
    /// assert_eq!(context, "reading the queue");
    /// ```
    pub fn redis(context: impl Into<String>, source: redis::RedisError) -> Self {
        Error::Redis {
            context: context.into(),
            source: Arc::new(first_server_error(source)),
        }
    }

    /// Wraps an I/O error with what shoal was doing when it happened.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source: Arc::new(source),
        }
    }

    /// An [`Error::InvalidState`] with the given reason.
    pub fn invalid_state(reason: impl Into<String>) -> Self {
        Error::InvalidState(reason.into())
    }

    /// True when Redis could not be reached or did not answer (connection refused or dropped,
    /// I/O error, timeout), as opposed to a reply Redis gave. Such a failure says nothing about
    /// the operation or the worker that ran it: the store is away. So are the replies by which
    /// Redis refuses a command it did not apply while it cannot serve writes for a while:
    /// `READONLY` (a primary demoted in a failover), `LOADING` (a restart reading its data),
    /// `MASTERDOWN`, `TRYAGAIN` and `CLUSTERDOWN`: sending the command again is safe.
    ///
    /// Not when Redis refused the credentials (a wrong password is not fixed by waiting, and
    /// must not pass for a store that went away), nor when its reply could not be read as the
    /// type asked for (the command ran: doing it again would apply a write twice).
    pub fn is_store_unreachable(&self) -> bool {
        match self {
            // redis-rs's `is_unrecoverable_error` is deliberately not here: it also holds for
            // `AuthenticationFailed` and `Parse` (a reply that did not convert), both answers.
            Error::Redis { source, .. } => {
                use redis::{ErrorKind, ServerErrorKind};
                source.is_io_error()
                    || source.is_timeout()
                    || source.is_connection_dropped()
                    || source.is_connection_refusal()
                    || matches!(
                        source.kind(),
                        ErrorKind::Server(
                            ServerErrorKind::ReadOnly
                                | ServerErrorKind::BusyLoading
                                | ServerErrorKind::MasterDown
                                | ServerErrorKind::TryAgain
                                | ServerErrorKind::ClusterDown
                        )
                    )
            }
            _ => false,
        }
    }

    /// Whether this is a wait on Redis that a stop signal interrupted: Linux fails a socket
    /// read that has a timeout with `EINTR` when the process was stopped (`SIGSTOP`, Ctrl-Z, a
    /// debugger) and continued meanwhile. The reply being read is lost with the connection;
    /// the command may have run (a `BLPOP` may have taken its element).
    pub fn is_interrupted(&self) -> bool {
        match self {
            Error::Redis { source, .. } => is_interrupted(source),
            _ => false,
        }
    }
}

/// Whether redis-rs failed a read because a stop signal interrupted it (see
/// [`Error::is_interrupted`]). redis-rs keeps the connection in step: the reply it was reading
/// is skipped when it comes, and the next one read is the next command's.
pub fn is_interrupted(e: &redis::RedisError) -> bool {
    e.is_io_error() && {
        let eintr = std::io::Error::from_raw_os_error(nix::libc::EINTR).to_string();
        e.to_string().contains(&eintr)
    }
}

/// Extension for attaching context to Redis results.
pub trait RedisContext<T> {
    /// Turns a Redis error into [`Error::Redis`] with the given context.
    fn context(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> RedisContext<T> for std::result::Result<T, redis::RedisError> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::redis(context(), source))
    }
}

/// How a remote function failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TaskErrorKind {
    /// The function panicked.
    Panic,
    /// The function returned `Err`, or its arguments or result could not be decoded.
    Error,
    /// The process running it died (killed, lost, or its lease lapsed) as often as retries allowed.
    Crashed,
}

impl fmt::Display for TaskErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TaskErrorKind::Panic => "panic",
            TaskErrorKind::Error => "error",
            TaskErrorKind::Crashed => "crashed",
        })
    }
}

/// The failure of one remote call, as seen by the caller.
///
/// Displayed as ``task `f` failed (panic, item 12, attempt 1): message``; a panic's message ends
/// with where it happened (`at src/main.rs:10:5`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("task `{function}` failed ({kind}{}{}): {message}", item_part(*.item), attempts_part(*.attempts))]
pub struct TaskError {
    /// The function's registered name.
    pub function: String,
    /// The panic message, the error's `Display`, or what killed the process.
    pub message: String,
    /// How it failed.
    pub kind: TaskErrorKind,
    /// How many times the call was attempted: for a pool call, the attempt of its chunk that
    /// failed. When its pool gave up (kind `Crashed`), the attempt of the chunk failure the call
    /// had recorded, else of its last chunk whose worker died; 0 only when none of its chunks
    /// ran (the workers died before taking any, e.g. in the initializer).
    pub attempts: u32,
    /// For a pool call, the index of the failing item in the whole input (`None` for a
    /// `Process`, or when no single item is to blame: a worker that died in a chunk of several
    /// items, a pool that gave up before running any).
    #[serde(default)]
    pub item: Option<u64>,
}

fn item_part(item: Option<u64>) -> String {
    item.map(|i| format!(", item {i}")).unwrap_or_default()
}

fn attempts_part(attempts: u32) -> String {
    match attempts {
        0 => String::new(),
        n => format!(", attempt {n}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_wait_a_stop_signal_interrupted_is_interrupted() {
        let redis = |e: std::io::Error| Error::redis("waiting", redis::RedisError::from(e));
        assert!(redis(std::io::Error::from_raw_os_error(nix::libc::EINTR)).is_interrupted());
        assert!(!redis(std::io::Error::from(std::io::ErrorKind::TimedOut)).is_interrupted());
        assert!(!redis(std::io::Error::from(std::io::ErrorKind::ConnectionReset)).is_interrupted());
        assert!(!Error::Empty.is_interrupted());
    }

    #[test]
    fn only_a_store_out_of_reach_is_unreachable() {
        let redis = |e: redis::RedisError| Error::redis("doing it", e);
        for kind in [
            std::io::ErrorKind::ConnectionRefused,
            std::io::ErrorKind::ConnectionReset,
            std::io::ErrorKind::BrokenPipe,
            std::io::ErrorKind::UnexpectedEof,
            std::io::ErrorKind::TimedOut,
            std::io::ErrorKind::WouldBlock,
        ] {
            let e = redis(std::io::Error::from(kind).into());
            assert!(e.is_store_unreachable(), "{kind:?}");
        }
        let answers = [
            redis::RedisError::from((
                redis::ErrorKind::AuthenticationFailed,
                "Password authentication failed",
            )),
            redis::RedisError::from((redis::ErrorKind::Parse, "not an integer")),
            redis::RedisError::from((redis::ErrorKind::UnexpectedReturnType, "not a map")),
        ];
        for answer in answers {
            let e = redis(answer);
            assert!(!e.is_store_unreachable(), "{e}");
        }
        assert!(!Error::Timeout(Duration::from_secs(1)).is_store_unreachable());
    }

    #[test]
    fn messages_name_what_failed() {
        let e = Error::NotRegistered {
            function: "app::square".into(),
        };
        assert!(e.to_string().contains("app::square"));
        let e = Error::Config {
            origin: "config.yaml".into(),
            key: "redis.expiry_secs".into(),
            reason: "must be at least 1".into(),
        };
        assert_eq!(
            e.to_string(),
            "configuration error in config.yaml: `redis.expiry_secs`: must be at least 1"
        );
        let e = Error::from(TaskError {
            function: "f".into(),
            message: "boom".into(),
            kind: TaskErrorKind::Panic,
            attempts: 1,
            item: None,
        });
        assert_eq!(e.to_string(), "task `f` failed (panic, attempt 1): boom");
        let e = TaskError {
            function: "f".into(),
            message: "the pool gave up".into(),
            kind: TaskErrorKind::Crashed,
            attempts: 0,
            item: None,
        };
        assert_eq!(e.to_string(), "task `f` failed (crashed): the pool gave up");
        let e = TaskError {
            function: "f".into(),
            message: "boom".into(),
            kind: TaskErrorKind::Error,
            attempts: 2,
            item: Some(12),
        };
        assert_eq!(
            e.to_string(),
            "task `f` failed (error, item 12, attempt 2): boom"
        );
    }
}
