//! Process tasks: how a process's work reaches whatever runs it.
//!
//! The parent writes a [`TaskRecord`] and asks a backend to launch a worker; the backend passes
//! the worker the task's address ([`TaskAddress`]: the Redis URL and the task id, in
//! `SHOAL_WORKER_REDIS` and `SHOAL_WORKER_TASK`, and the store's password in
//! `SHOAL_WORKER_REDIS_PASSWORD` when a backend keeps it apart from the URL, e.g. in a
//! Kubernetes Secret) and the parent's authkey in `SHOAL_WORKER_AUTHKEY`
//! ([`hand_over_authkey`]: the record in Redis leaves it out; a Kubernetes Job takes it from a
//! Secret). The worker removes these variables from its environment as it starts
//! ([`forget_worker_env`]), so that the programs its task runs inherit neither the address nor
//! the key. It claims the record, runs the function, and writes its status. The same path
//! serves every backend.
//!
//! # Keys (hash tag `{<ns>:proc:<id>}`)
//!
//! | key | type | contents |
//! | --- | --- | --- |
//! | `shoal:{<ns>:proc:<id>}:task` | string | the [`TaskRecord`] (codec payload) |
//! | `shoal:{<ns>:proc:<id>}:status` | hash | `state` (`running`/`exited`), `pid`, `started_ms`, `code`, `kind`, `error`, `finished_ms` |
//! | `shoal:{<ns>:proc:<id>}:output` | stream | entries `fd`=`1`/`2` `data`=bytes, then one `eof`=`1` (when output is streamed) |
//!
//! All three expire after `redis.expiry_secs`.
//!
//! # Round trips
//!
//! Parent: one `SET ... EX` to write the task, one `DEL` after the exit is known. Worker: one
//! script call to claim (`task_claim.lua`: read the task, check nobody claimed it, mark it
//! running, refresh TTLs) and one pipeline to record the exit.

use std::ffi::OsString;
use std::sync::{LazyLock, OnceLock};

use serde::{Deserialize, Serialize};
use shoal_core::config::{Config, WORKER_ENV_PREFIX};
use shoal_core::context::{AuthKey, ParentInfo};
use shoal_core::error::{Error, RedisContext, Result};
use shoal_core::store::{KeySpace, Store};

use crate::pool::PoolWorkerSpec;

/// Environment variable carrying the Redis URL to a worker.
pub const ENV_WORKER_REDIS: &str = "SHOAL_WORKER_REDIS";
/// Environment variable carrying the store's password to a worker, when it is not in the URL
/// (it replaces the URL's own).
pub const ENV_WORKER_REDIS_PASSWORD: &str = "SHOAL_WORKER_REDIS_PASSWORD";
/// Environment variable carrying `<namespace>/<task id>` to a worker.
pub const ENV_WORKER_TASK: &str = "SHOAL_WORKER_TASK";
/// Environment variable carrying the parent's authentication key (hex) to a worker: its task
/// record, in Redis, leaves the key out (see [`hand_over_authkey`]).
pub const ENV_WORKER_AUTHKEY: &str = "SHOAL_WORKER_AUTHKEY";

/// Hands a worker its parent's authkey: `SHOAL_WORKER_AUTHKEY` (hex) in the environment of its
/// [`Launch`](crate::protocol::Launch), never in its [`TaskRecord`], which is in Redis, where
/// other programs may read it. The local backend sets the variable in the child's environment;
/// the Kubernetes backend puts the value in a Secret of the runtime and the Job refers to it
/// (a Job's environment is readable by whoever may read Jobs).
pub fn hand_over_authkey(key: &AuthKey, env: &mut std::collections::BTreeMap<String, String>) {
    let hex = key.as_bytes().iter().map(|b| format!("{b:02x}")).collect();
    env.insert(ENV_WORKER_AUTHKEY.to_string(), hex);
}

/// The authkey a worker received in its environment ([`hand_over_authkey`]), if any; after
/// [`forget_worker_env`], the value it kept.
pub fn authkey_from_env() -> Result<Option<AuthKey>> {
    let value = match FORGOTTEN_AUTHKEY.get() {
        Some(kept) => kept.clone(),
        None => std::env::var_os(ENV_WORKER_AUTHKEY),
    };
    value.map(|value| parse_authkey(&value)).transpose()
}

/// The value of `SHOAL_WORKER_AUTHKEY` (if it was set), kept by [`forget_worker_env`] when it
/// removed the variable.
static FORGOTTEN_AUTHKEY: OnceLock<Option<OsString>> = OnceLock::new();

/// The variables a worker is started with, which no program it runs may inherit.
const WORKER_VARIABLES: [&str; 4] = [
    ENV_WORKER_TASK,
    ENV_WORKER_REDIS,
    ENV_WORKER_REDIS_PASSWORD,
    ENV_WORKER_AUTHKEY,
];

/// Removes the worker's variables (`SHOAL_WORKER_TASK`, `SHOAL_WORKER_REDIS`,
/// `SHOAL_WORKER_REDIS_PASSWORD`, `SHOAL_WORKER_AUTHKEY`) from this process's environment, so
/// that a program the task runs neither takes itself for a worker (a shoal program would run
/// this task's address and fail) nor learns the authkey. The authkey is kept for
/// [`authkey_from_env`]; read the address ([`TaskAddress::from_env`]) first.
///
/// Changing the environment is sound only while no other thread reads or writes it, so this
/// removes nothing (and returns false) unless this thread is the process's only one, or, with
/// `in_test_harness` (the caller runs as the worker entry test of a test binary, which a
/// worker is started as: `--exact` with `--test-threads=1`), the only one besides the main
/// thread, which is libtest's. Call it first thing in the worker, before it starts a thread.
/// Linux only (the threads are counted in `/proc/self/task`): elsewhere it removes nothing.
pub fn forget_worker_env(in_test_harness: bool) -> bool {
    let Some(threads) = thread_ids() else {
        return false;
    };
    let me = nix::unistd::gettid().as_raw();
    let main = nix::unistd::getpid().as_raw();
    let alone = threads == [me];
    let beside_libtest = in_test_harness && me != main && {
        let mut expected = [me, main];
        expected.sort_unstable();
        threads == expected
    };
    if !alone && !beside_libtest {
        return false;
    }
    let _ = FORGOTTEN_AUTHKEY.set(std::env::var_os(ENV_WORKER_AUTHKEY));
    for name in WORKER_VARIABLES {
        // SAFETY: no other thread reads or writes the environment while this runs. The threads
        // of this process were just listed: either this one alone (nothing else runs, and
        // only this thread, busy here, could start another), or, in a test binary's worker
        // entry, this one and the main thread. That main thread is libtest's: with one test
        // to run (`--exact`) and `--test-threads=1`, it started the thread that runs this test
        // and waits on a channel for the test's result, touching nothing else (the
        // environment included) until then; this worker never reports one (it exits). The
        // worker's own threads (its runtime, its output forwarders, the task's) are all
        // started after this returns.
        #[allow(unsafe_code)]
        unsafe {
            std::env::remove_var(name)
        };
    }
    true
}

/// The ids of this process's threads, sorted; `None` if they cannot be listed.
fn thread_ids() -> Option<Vec<i32>> {
    let mut ids = std::fs::read_dir("/proc/self/task")
        .ok()?
        .map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .collect::<Option<Vec<i32>>>()?;
    ids.sort_unstable();
    Some(ids)
}

/// An authkey from its hex form ([`hand_over_authkey`]): an even number of hex digits (none:
/// the empty key, which `set_authkey` allows). The error does not show the value.
pub(crate) fn parse_authkey(value: &std::ffi::OsStr) -> Result<AuthKey> {
    let bad = || {
        Error::Backend(format!(
            "{ENV_WORKER_AUTHKEY} is not a key: an even number of hex digits"
        ))
    };
    let hex = value.to_str().ok_or_else(bad)?;
    if !hex.len().is_multiple_of(2) || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                .ok_or_else(bad)
        })
        .collect::<Result<Vec<u8>>>()?;
    Ok(AuthKey::from_bytes(bytes))
}

const _: () = assert!(ENV_WORKER_TASK.len() > WORKER_ENV_PREFIX.len());

static CLAIM: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("task_claim.lua")));

/// Where a worker finds its task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskAddress {
    /// The store's URL.
    pub redis_url: String,
    /// The key namespace.
    pub namespace: String,
    /// The task (process) id.
    pub id: String,
}

impl TaskAddress {
    /// The address in this process's environment, if it is a worker.
    pub fn from_env() -> Option<Result<TaskAddress>> {
        let task = std::env::var(ENV_WORKER_TASK).ok()?;
        Some(Self::parse(
            &task,
            std::env::var(ENV_WORKER_REDIS).ok(),
            std::env::var(ENV_WORKER_REDIS_PASSWORD).ok(),
        ))
    }

    fn parse(
        task: &str,
        redis_url: Option<String>,
        password: Option<String>,
    ) -> Result<TaskAddress> {
        let bad = |reason: &str| {
            Error::Backend(format!(
                "{ENV_WORKER_TASK}={task:?} is not a task address: {reason}"
            ))
        };
        let (namespace, id) = task
            .split_once('/')
            .ok_or_else(|| bad("expected <namespace>/<id>"))?;
        if namespace.is_empty() || id.is_empty() {
            return Err(bad("empty namespace or id"));
        }
        let redis_url =
            redis_url.ok_or_else(|| Error::Backend(format!("{ENV_WORKER_REDIS} is not set")))?;
        let redis_url = match password {
            Some(password) => with_password(&redis_url, &password)?,
            None => redis_url,
        };
        Ok(TaskAddress {
            redis_url,
            namespace: namespace.to_string(),
            id: id.to_string(),
        })
    }

    /// The value of `SHOAL_WORKER_TASK`.
    pub fn task_env_value(&self) -> String {
        format!("{}/{}", self.namespace, self.id)
    }
}

/// What a password's characters become in a URL: all but RFC 3986's unreserved ones encoded.
const PASSWORD_ESCAPES: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `url` with `password` in place of its own (percent-encoded as a URL needs).
fn with_password(url: &str, password: &str) -> Result<String> {
    let bad = |reason: &str| {
        Error::Backend(format!(
            "{ENV_WORKER_REDIS_PASSWORD} is set but the URL in {ENV_WORKER_REDIS} {reason}"
        ))
    };
    let mut parsed = redis::parse_redis_url(url).ok_or_else(|| bad("is not a Redis URL"))?;
    // `set_password` leaves a `%` as it is, and redis-rs percent-decodes the password: encode
    // every byte but the unreserved ones, so that the password arrives as it was given.
    let encoded = percent_encoding::utf8_percent_encode(password, PASSWORD_ESCAPES).to_string();
    parsed
        .set_password(Some(&encoded))
        .map_err(|()| bad("cannot carry a password (no host)"))?;
    Ok(parsed.to_string())
}

/// The keys of one process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessKeys {
    /// The task record.
    pub task: String,
    /// The status hash.
    pub status: String,
    /// The output stream.
    pub output: String,
}

impl ProcessKeys {
    /// The keys of process `id`.
    pub fn new(keys: &KeySpace, id: &str) -> Self {
        let object = keys.object("proc", id);
        ProcessKeys {
            task: object.key("task"),
            status: object.key("status"),
            output: object.key("output"),
        }
    }
}

/// What a worker does.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum TaskKind {
    /// Run one registered function (a `Process`).
    Call {
        /// The registered function's name.
        function: String,
        /// The encoded argument tuple.
        #[serde(with = "serde_bytes")]
        args: Vec<u8>,
    },
    /// Serve a pool until told to stop.
    PoolWorker(PoolWorkerSpec),
    /// Host actors until told to stop.
    ActorHost(crate::actor::host::HostSpec),
}

/// What a worker needs to run a process.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskRecord {
    /// What to do.
    pub kind: TaskKind,
    /// The process's name.
    pub name: String,
    /// The process's identity in the process tree.
    pub identity: Vec<u32>,
    /// Whether the process is daemonic (it may not start children).
    #[serde(default)]
    pub daemon: bool,
    /// The parent's effective configuration (its `redis.url` removed: the worker has its own).
    pub config: Config,
    /// Forward stdout and stderr through the output stream.
    pub stream_output: bool,
    /// Who started the worker.
    #[serde(default)]
    pub parent: Option<ParentInfo>,
    /// The liveness key of the runtime that started it and that key's TTL in milliseconds:
    /// a remote `Process` worker exits ([`EXIT_DRIVER_GONE`](crate::pool::EXIT_DRIVER_GONE))
    /// when the key lapses, as a pool worker does with its pool's (no parent-death signal
    /// reaches a pod). `None` on the local backend, whose children get that signal.
    #[serde(default)]
    pub driver: Option<(String, u64)>,
}

impl TaskRecord {
    /// Writes the record at `keys.task` with the store's TTL (one round trip).
    pub async fn write(&self, store: &Store, keys: &ProcessKeys) -> Result<()> {
        let payload = store.encode(self, &keys.task)?;
        let mut conn = store.multiplexed().await?;
        redis::cmd("SET")
            .arg(&keys.task)
            .arg(payload)
            .arg("EX")
            .arg(store.expiry_secs())
            .query_async::<()>(&mut conn)
            .await
            .context(|| format!("writing task {}", keys.task))
    }

    /// Claims the record at `keys.task` for the worker `pid` (one round trip).
    pub fn claim(store: &Store, keys: &ProcessKeys, pid: u32) -> Result<TaskRecord> {
        let payload: Vec<u8> = store.with_conn(
            || format!("claiming task {}", keys.task),
            |c| {
                CLAIM
                    .key(&keys.task)
                    .key(&keys.status)
                    .arg(pid)
                    .arg(now_ms())
                    .arg(store.expiry_secs())
                    .invoke(c)
            },
        )?;
        store.decode(&payload, &keys.task)
    }
}

/// How a worker's task ended, as recorded in the status hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExitRecord {
    /// The exit code the worker exits with.
    pub code: i32,
    /// `panic` or `error` when the function failed.
    pub kind: Option<String>,
    /// The failure's message.
    pub error: Option<String>,
}

impl ExitRecord {
    /// Records the exit in the status hash (one round trip).
    pub fn write(&self, store: &Store, keys: &ProcessKeys) -> Result<()> {
        store.with_conn(
            || format!("recording the exit of {}", keys.status),
            |c| {
                let mut pipe = redis::pipe();
                pipe.hset_multiple(
                    &keys.status,
                    &[
                        ("state", "exited".to_string()),
                        ("code", self.code.to_string()),
                        ("finished_ms", now_ms().to_string()),
                    ],
                )
                .ignore();
                if let (Some(kind), Some(error)) = (&self.kind, &self.error) {
                    pipe.hset_multiple(&keys.status, &[("kind", kind), ("error", error)])
                        .ignore();
                }
                pipe.expire(&keys.status, store.expiry_secs() as i64)
                    .ignore();
                pipe.query::<()>(c)
            },
        )
    }
}

pub use shoal_core::clock::now_ms;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_authkey_goes_through_the_environment_unchanged_and_bad_values_are_refused() {
        let key = AuthKey::from_bytes(vec![0u8, 1, 0xab, 0xff, 0x10]);
        let mut env = std::collections::BTreeMap::new();
        hand_over_authkey(&key, &mut env);
        let hex = env.get(ENV_WORKER_AUTHKEY).expect("set for the worker");
        assert_eq!(hex, "0001abff10");
        assert_eq!(
            parse_authkey(std::ffi::OsStr::new(hex)).expect("parses"),
            key
        );
        // The empty key (set_authkey allows it) goes through as well.
        let mut env = std::collections::BTreeMap::new();
        hand_over_authkey(&AuthKey::from_bytes(Vec::new()), &mut env);
        let empty = std::ffi::OsStr::new(&env[ENV_WORKER_AUTHKEY]).to_owned();
        assert_eq!(
            parse_authkey(&empty).expect("parses"),
            AuthKey::from_bytes(Vec::new())
        );
        for bad in ["a", "0g", "+f", " 0f", "0f\n", "abc"] {
            let e = parse_authkey(std::ffi::OsStr::new(bad)).expect_err(bad);
            assert!(e.to_string().contains(ENV_WORKER_AUTHKEY), "{e}");
        }
    }

    #[test]
    fn addresses_parse() {
        let a = TaskAddress::parse("jobs/123", Some("unix:///s".into()), None).expect("valid");
        assert_eq!(a.namespace, "jobs");
        assert_eq!(a.id, "123");
        assert_eq!(a.redis_url, "unix:///s");
        assert_eq!(a.task_env_value(), "jobs/123");
        assert!(TaskAddress::parse("nothing", Some("x".into()), None).is_err());
        assert!(TaskAddress::parse("a/b", None, None).is_err());
    }

    #[test]
    fn a_password_from_its_own_variable_goes_into_the_url() {
        let url = |base: &str, password: &str| {
            TaskAddress::parse("a/b", Some(base.into()), Some(password.into())).map(|a| a.redis_url)
        };
        assert_eq!(
            url("redis://redis.shoal.svc:6379/0", "s3cret").expect("valid"),
            "redis://:s3cret@redis.shoal.svc:6379/0"
        );
        // It replaces the URL's own; characters a URL reserves are encoded, and redis-rs
        // decodes them back.
        let encoded = url("rediss://app:old@h:6380", "p@ss:w/rd").expect("valid");
        assert_eq!(encoded, "rediss://app:p%40ss%3Aw%2Frd@h:6380");
        let info = redis::IntoConnectionInfo::into_connection_info(encoded.as_str())
            .expect("a connection address");
        assert_eq!(info.redis_settings().password(), Some("p@ss:w/rd"));
        assert_eq!(info.redis_settings().username(), Some("app"));
        // A `%` is a character of the password, not an escape.
        let odd = url("redis://h:6379", "ab%41cd").expect("valid");
        let info = redis::IntoConnectionInfo::into_connection_info(odd.as_str())
            .expect("a connection address");
        assert_eq!(info.redis_settings().password(), Some("ab%41cd"));
        let e = url("unix:///tmp/r.sock", "x").expect_err("no host");
        assert!(e.to_string().contains("SHOAL_WORKER_REDIS_PASSWORD"), "{e}");
        assert!(url("not a url", "x").is_err());
    }

    #[test]
    fn keys_share_the_process_tag() {
        let k = ProcessKeys::new(&KeySpace::new("ns"), "7");
        assert_eq!(k.task, "shoal:{ns:proc:7}:task");
        assert_eq!(k.status, "shoal:{ns:proc:7}:status");
        assert_eq!(k.output, "shoal:{ns:proc:7}:output");
    }
}
