//! The pool protocol: chunks of work through a Redis Stream consumer group, outcomes back
//! through a results stream, leases kept by heartbeat.
//!
//! # Keys (hash tag `{<ns>:pool:<id>}`)
//!
//! | key | type | contents |
//! | --- | --- | --- |
//! | `shoal:{<ns>:pool:<id>}:tasks` | stream, group `workers` | chunk entries `c` call, `k` chunk index, `a` attempt, `f` function, `p` items; or a stop entry `s`=`1` |
//! | `shoal:{<ns>:pool:<id>}:results` | stream | `c`, `k`, `a`, `w` worker, then `p` (a [`ChunkOutcome`]) or `x` (the chunk crashed: a message) |
//! | `shoal:{<ns>:pool:<id>}:workers` | hash | worker id → last heartbeat (Unix ms) |
//!
//! # A worker ([`run_worker`])
//!
//! runs the initializer once, then loops: `XREADGROUP` chunks (blocking), call the function on
//! each item of a chunk in order until one fails (a panic or an undecodable item ends the chunk,
//! as an exception ends a chunk in Python), then in one pipeline `XADD` each chunk's outcome and
//! `XACK` + `XDEL` all of them (1 round trip). It takes one chunk at a time while chunks take a
//! millisecond or more (so that expensive chunks spread over the workers), and up to
//! [`MAX_PREFETCH`] at a time while they are cheaper: per chunk that is 1 + 3/n commands instead
//! of 4, which is what bounds a map of tiny tasks (the Redis server's command rate). It stops on
//! a stop entry, after `maxtasksperchild` chunks, or when the pool's streams are gone. A heartbeat
//! thread renews the lease of the chunks in hand every third of the lease (`XCLAIM` to itself with
//! idle 0 resets an entry's idle time) and stamps the `workers` hash, so a chunk that runs for
//! hours is never taken from a live worker.
//!
//! # Redelivery ([`requeue_consumer`], [`requeue_idle`])
//!
//! When the executor reports a worker's exit, or a chunk's idle time passes the lease, the
//! supervisor runs `pool_requeue.lua`, which moves each such pending chunk exactly once: added
//! again with `attempt + 1`, or, when `1 + retries` attempts are used up, answered with a crash
//! entry. A slow worker presumed dead may still answer: the supervisor keeps one outcome per chunk.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use redis::streams::{StreamId, StreamReadReply};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use shoal_core::TaskErrorKind;
use shoal_core::context;
use shoal_core::error::{Error, RedisContext, Result};
use shoal_core::registry::{self, Failure};
use shoal_core::store::{KeySpace, Store};

use crate::task::now_ms;

/// The consumer group of a pool's task stream.
pub const GROUP: &str = "workers";

static REQUEUE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("pool_requeue.lua")));

/// How long a worker's `XREADGROUP` blocks before it looks at its stop conditions again.
const READ_BLOCK: Duration = Duration::from_millis(500);
/// Most chunks a worker takes at once (only while chunks are cheap).
pub const MAX_PREFETCH: usize = 16;
/// A chunk that ran for less than this is cheap.
const CHEAP_CHUNK: Duration = Duration::from_millis(1);

/// The keys of one pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolKeys {
    /// The task stream.
    pub tasks: String,
    /// The results stream.
    pub results: String,
    /// The heartbeat hash.
    pub workers: String,
}

impl PoolKeys {
    /// The keys of pool `id`.
    pub fn new(keys: &KeySpace, id: &str) -> Self {
        let object = keys.object("pool", id);
        PoolKeys {
            tasks: object.key("tasks"),
            results: object.key("results"),
            workers: object.key("workers"),
        }
    }
}

/// A function run once by each worker before its first chunk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Initializer {
    /// The registered function.
    pub function: String,
    /// Its encoded argument tuple.
    #[serde(with = "serde_bytes")]
    pub args: Vec<u8>,
}

/// What a pool worker needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolWorkerSpec {
    /// The pool.
    pub pool_id: String,
    /// This worker: its consumer name and executor id.
    pub worker_id: String,
    /// Run once before the first chunk.
    pub initializer: Option<Initializer>,
    /// Exit after this many chunks (Python's `maxtasksperchild`).
    pub maxtasksperchild: Option<u64>,
    /// The chunk lease; the heartbeat renews it every third of it.
    pub lease_ms: u64,
}

/// One chunk as the feeder writes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkEntry {
    /// The call it belongs to.
    pub call: u64,
    /// Its index in the call.
    pub chunk: u64,
    /// The registered function.
    pub function: String,
    /// The encoded items ([`encode_items`]).
    pub payload: Vec<u8>,
}

impl ChunkEntry {
    /// Appends this chunk (attempt 1) to `pipe`.
    pub fn add_to(&self, pipe: &mut redis::Pipeline, keys: &PoolKeys) {
        pipe.cmd("XADD")
            .arg(&keys.tasks)
            .arg("*")
            .arg("c")
            .arg(self.call)
            .arg("k")
            .arg(self.chunk)
            .arg("a")
            .arg(1)
            .arg("f")
            .arg(&self.function)
            .arg("p")
            .arg(&self.payload)
            .ignore();
    }
}

/// Encodes a chunk's items: each item is an encoded argument tuple.
pub fn encode_items(store: &Store, items: Vec<ByteBuf>, key: &str) -> Result<Vec<u8>> {
    store.encode(&items, key)
}

/// One item's failure inside a chunk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemFailure {
    /// The item's index in the chunk; the items before it succeeded.
    pub index: u32,
    /// Panic or error.
    pub kind: TaskErrorKind,
    /// What happened.
    pub message: String,
}

/// What a worker sends back for one chunk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkOutcome {
    /// The encoded results of the items that succeeded, in order.
    pub outputs: Vec<ByteBuf>,
    /// The item that failed, if one did; the items after it did not run.
    pub failure: Option<ItemFailure>,
}

/// One entry of the results stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResultEntry {
    /// The stream entry id.
    pub id: String,
    /// The call.
    pub call: u64,
    /// The chunk index.
    pub chunk: u64,
    /// The attempt that produced it.
    pub attempt: u32,
    /// The worker that produced it (or held it when it crashed).
    pub worker: String,
    /// The outcome.
    pub body: ResultBody,
}

/// What came back for a chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResultBody {
    /// An encoded [`ChunkOutcome`].
    Outcome(Vec<u8>),
    /// The chunk used up its attempts; why.
    Crashed(String),
}

impl ResultEntry {
    /// Parses a results-stream entry; `None` for an entry that is not one.
    pub fn parse(entry: &StreamId) -> Option<ResultEntry> {
        let call: u64 = entry.get("c")?;
        let chunk: u64 = entry.get("k")?;
        let attempt: u32 = entry.get("a")?;
        let worker: String = entry.get("w").unwrap_or_default();
        let body = match entry.get::<Vec<u8>>("p") {
            Some(p) => ResultBody::Outcome(p),
            None => ResultBody::Crashed(entry.get("x")?),
        };
        Some(ResultEntry {
            id: entry.id.clone(),
            call,
            chunk,
            attempt,
            worker,
            body,
        })
    }
}

/// Creates the task stream and its consumer group (idempotent), with the store's TTL.
pub fn create_streams(store: &Store, keys: &PoolKeys) -> Result<()> {
    store.with_conn(
        || format!("creating pool stream {}", keys.tasks),
        |c| {
            let created: redis::RedisResult<()> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(&keys.tasks)
                .arg(GROUP)
                .arg("$")
                .arg("MKSTREAM")
                .query(c);
            match created {
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                other => other?,
            }
            redis::pipe()
                .expire(&keys.tasks, store.expiry_secs() as i64)
                .ignore()
                .query::<()>(c)
        },
    )
}

/// Deletes a pool's keys.
pub fn delete_streams(store: &Store, keys: &PoolKeys) -> Result<()> {
    store.with_conn(
        || format!("deleting pool {}", keys.tasks),
        |c| {
            redis::cmd("DEL")
                .arg(&keys.tasks)
                .arg(&keys.results)
                .arg(&keys.workers)
                .query::<()>(c)
        },
    )
}

/// What [`requeue_consumer`]/[`requeue_idle`] moved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Requeued {
    /// Chunks given another attempt.
    pub requeued: u64,
    /// Chunks that used up their attempts (a crash entry was written).
    pub failed: u64,
    /// Workers whose chunks moved.
    pub workers: Vec<String>,
}

/// Moves every chunk pending on `worker` (which exited) and removes it from the group.
pub async fn requeue_consumer(
    conn: &mut redis::aio::MultiplexedConnection,
    store: &Store,
    keys: &PoolKeys,
    worker: &str,
    attempts: u32,
) -> Result<Requeued> {
    requeue(conn, store, keys, "consumer", worker.to_string(), attempts).await
}

/// Moves every chunk pending longer than `lease`.
pub async fn requeue_idle(
    conn: &mut redis::aio::MultiplexedConnection,
    store: &Store,
    keys: &PoolKeys,
    lease: Duration,
    attempts: u32,
) -> Result<Requeued> {
    requeue(
        conn,
        store,
        keys,
        "idle",
        lease.as_millis().to_string(),
        attempts,
    )
    .await
}

async fn requeue(
    conn: &mut redis::aio::MultiplexedConnection,
    store: &Store,
    keys: &PoolKeys,
    mode: &str,
    target: String,
    attempts: u32,
) -> Result<Requeued> {
    let reply: Vec<redis::Value> = REQUEUE
        .key(&keys.tasks)
        .key(&keys.results)
        .arg(GROUP)
        .arg(mode)
        .arg(&target)
        .arg(attempts)
        .arg(store.expiry_secs())
        .invoke_async(conn)
        .await
        .context(|| format!("redelivering chunks of {}", keys.tasks))?;
    let mut values = reply.into_iter();
    let count = |v: Option<redis::Value>| -> u64 {
        v.and_then(|v| redis::from_redis_value::<u64>(v).ok())
            .unwrap_or(0)
    };
    let requeued = count(values.next());
    let failed = count(values.next());
    let workers = values
        .filter_map(|v| redis::from_redis_value::<String>(v).ok())
        .collect();
    Ok(Requeued {
        requeued,
        failed,
        workers,
    })
}

/// Why a worker's loop ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerEnd {
    /// It read a stop entry.
    Stopped,
    /// It ran `maxtasksperchild` chunks.
    MaxTasks,
    /// The pool's streams are gone.
    PoolGone,
    /// Its thread was asked to terminate.
    Terminated,
}

/// Runs a pool worker until it should stop. `Err` (exit code 1) when the initializer fails or
/// Redis fails.
pub fn run_worker(store: &Arc<Store>, spec: &PoolWorkerSpec) -> Result<WorkerEnd> {
    let keys = PoolKeys::new(store.keys(), &spec.pool_id);
    let limit = store.settings().max_message_bytes;
    if let Some(init) = &spec.initializer {
        run_initializer(init, limit)?;
    }
    let in_hand: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(AtomicBool::new(false));
    let heartbeat = {
        let store = store.clone();
        let keys = keys.clone();
        let worker = spec.worker_id.clone();
        let in_hand = in_hand.clone();
        let done = done.clone();
        let every = Duration::from_millis((spec.lease_ms / 3).max(10));
        std::thread::Builder::new()
            .name("shoal-heartbeat".into())
            .spawn(move || heartbeat(&store, &keys, &worker, &in_hand, &done, every))
            .map_err(|e| Error::io("starting the heartbeat thread", e))?
    };
    let result = serve(store, spec, &keys, &in_hand, limit);
    done.store(true, Ordering::Release);
    let _ = heartbeat.join();
    let _ = store.with_conn(
        || "removing a worker's heartbeat".into(),
        |c| {
            redis::cmd("HDEL")
                .arg(&keys.workers)
                .arg(&spec.worker_id)
                .query::<()>(c)
        },
    );
    result
}

fn run_initializer(init: &Initializer, limit: usize) -> Result<()> {
    let Some(function) = registry::lookup(&init.function) else {
        return Err(Error::NotRegistered {
            function: init.function.clone(),
        });
    };
    registry::call(function, &init.args, limit)
        .and_then(registry::Returned::into_process_outcome)
        .map_err(|failure| {
            Error::from(shoal_core::TaskError {
                function: init.function.clone(),
                message: failure.message,
                kind: failure.kind,
                attempts: 1,
            })
        })
}

fn serve(
    store: &Store,
    spec: &PoolWorkerSpec,
    keys: &PoolKeys,
    in_hand: &Mutex<Vec<String>>,
    limit: usize,
) -> Result<WorkerEnd> {
    let mut chunks_done: u64 = 0;
    let mut prefetch: usize = 1;
    loop {
        if context::termination_requested() {
            return Ok(WorkerEnd::Terminated);
        }
        let count = match spec.maxtasksperchild {
            Some(max) => prefetch.min(max.saturating_sub(chunks_done).max(1) as usize),
            None => prefetch,
        };
        let read = store.with_blocking_conn(
            Some(READ_BLOCK),
            || format!("reading {}", keys.tasks),
            |c| {
                redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(GROUP)
                    .arg(&spec.worker_id)
                    .arg("COUNT")
                    .arg(count)
                    .arg("BLOCK")
                    .arg(READ_BLOCK.as_millis() as u64)
                    .arg("STREAMS")
                    .arg(&keys.tasks)
                    .arg(">")
                    .query::<Option<StreamReadReply>>(c)
            },
        );
        let reply = match read {
            Ok(reply) => reply,
            Err(Error::Redis { source, .. }) if source.code() == Some("NOGROUP") => {
                return Ok(WorkerEnd::PoolGone);
            }
            Err(e) => return Err(e),
        };
        let entries: Vec<StreamId> = reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .collect();
        if entries.is_empty() {
            continue;
        }
        *in_hand.lock().unwrap_or_else(|p| p.into_inner()) =
            entries.iter().map(|e| e.id.clone()).collect();
        let started = std::time::Instant::now();
        let mut stop = false;
        let mut pipe = redis::pipe();
        let mut ids: Vec<&str> = Vec::with_capacity(entries.len());
        let mut ran = 0u32;
        for entry in &entries {
            ids.push(&entry.id);
            if entry.map.contains_key("s") {
                stop = true;
                continue;
            }
            let function: String = entry.get("f").unwrap_or_default();
            let payload: Vec<u8> = entry.get("p").unwrap_or_default();
            let outcome = run_chunk(store, &function, &payload, limit, &keys.tasks);
            let encoded = store.encode(&outcome, &keys.results).or_else(|e| {
                let failed = ChunkOutcome {
                    outputs: Vec::new(),
                    failure: Some(ItemFailure {
                        index: 0,
                        kind: TaskErrorKind::Error,
                        message: format!("the chunk's results cannot be sent: {e}"),
                    }),
                };
                store.encode(&failed, &keys.results)
            })?;
            let call: u64 = entry.get("c").unwrap_or_default();
            let chunk: u64 = entry.get("k").unwrap_or_default();
            let attempt: u32 = entry.get("a").unwrap_or(1);
            pipe.cmd("XADD")
                .arg(&keys.results)
                .arg("*")
                .arg("c")
                .arg(call)
                .arg("k")
                .arg(chunk)
                .arg("a")
                .arg(attempt)
                .arg("w")
                .arg(&spec.worker_id)
                .arg("p")
                .arg(encoded)
                .ignore();
            ran += 1;
        }
        pipe.xack(&keys.tasks, GROUP, &ids).ignore();
        pipe.xdel(&keys.tasks, &ids).ignore();
        store.with_conn(
            || format!("sending results to {}", keys.results),
            |c| pipe.query::<()>(c),
        )?;
        in_hand.lock().unwrap_or_else(|p| p.into_inner()).clear();
        if stop {
            return Ok(WorkerEnd::Stopped);
        }
        chunks_done += u64::from(ran);
        if spec.maxtasksperchild.is_some_and(|max| chunks_done >= max) {
            return Ok(WorkerEnd::MaxTasks);
        }
        let per_chunk = started.elapsed() / ran.max(1);
        prefetch = if per_chunk < CHEAP_CHUNK {
            (prefetch * 2).min(MAX_PREFETCH)
        } else {
            1
        };
    }
}

/// Runs a chunk's items in order until one fails.
fn run_chunk(
    store: &Store,
    function: &str,
    payload: &[u8],
    limit: usize,
    key: &str,
) -> ChunkOutcome {
    let fail = |index: u32, failure: Failure| ChunkOutcome {
        outputs: Vec::new(),
        failure: Some(ItemFailure {
            index,
            kind: failure.kind,
            message: failure.message,
        }),
    };
    let Some(entry) = registry::lookup(function) else {
        let e = Error::NotRegistered {
            function: function.to_string(),
        };
        return fail(0, Failure::error(e));
    };
    let items: Vec<ByteBuf> = match store.decode(payload, key) {
        Ok(items) => items,
        Err(e) => return fail(0, Failure::error(e)),
    };
    let mut outputs = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let result = registry::call(entry, item, limit).and_then(|returned| returned.value);
        match result {
            Ok(bytes) => outputs.push(ByteBuf::from(bytes)),
            Err(failure) => {
                if failure.kind == TaskErrorKind::Panic {
                    // The panic hook printed it; say which task it was.
                    eprintln!("shoal: {function} panicked on item {index} of a chunk");
                }
                return ChunkOutcome {
                    outputs,
                    failure: Some(ItemFailure {
                        index: index as u32,
                        kind: failure.kind,
                        message: failure.message,
                    }),
                };
            }
        }
    }
    ChunkOutcome {
        outputs,
        failure: None,
    }
}

fn heartbeat(
    store: &Store,
    keys: &PoolKeys,
    worker: &str,
    in_hand: &Mutex<Vec<String>>,
    done: &AtomicBool,
    every: Duration,
) {
    let step = Duration::from_millis(10).min(every);
    loop {
        let current = in_hand.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let _ = store.with_conn(
            || format!("heartbeat of {worker}"),
            |c| {
                let mut pipe = redis::pipe();
                pipe.hset(&keys.workers, worker, now_ms()).ignore();
                pipe.expire(&keys.workers, store.expiry_secs() as i64)
                    .ignore();
                if !current.is_empty() {
                    pipe.cmd("XCLAIM")
                        .arg(&keys.tasks)
                        .arg(GROUP)
                        .arg(worker)
                        .arg(0)
                        .arg(&current)
                        .arg("JUSTID")
                        .ignore();
                }
                pipe.query::<()>(c)
            },
        );
        let mut slept = Duration::ZERO;
        while slept < every {
            if done.load(Ordering::Acquire) {
                return;
            }
            std::thread::sleep(step);
            slept += step;
        }
    }
}
