//! The pool protocol: chunks of work through a Redis Stream consumer group, outcomes back
//! through a results stream, leases kept by heartbeat.
//!
//! # Keys (hash tag `{<ns>:pool:<id>}`)
//!
//! | key | type | contents |
//! | --- | --- | --- |
//! | `shoal:{<ns>:pool:<id>}:tasks` | stream, group `workers` | chunk entries `h` = `call.chunk.attempt.first.done`, with `.1` at the end for a careful chunk (the call, the chunk's index, the attempt, the index of its first item in the input, and its items already done by earlier attempts, skipped; see *Redelivery*), `f` function, `p` items (one array of argument tuples, [`ArrayWriter::payload`]); or a stop entry `s`=`1` |
//! | `shoal:{<ns>:pool:<id>}:results` | stream, made with the task stream (through a group `made` nobody reads) | the final outcomes of the chunks of one worker read: `w` worker, `h` their `call.chunk.attempt.offset`s, `b` a [`BatchedOutcome`] list; or one chunk's: `c`, `k`, `a`, `w` worker, `o` offset in the chunk of the first item it covers, `n`=`1` on a partial outcome, then `p` (a [`ChunkOutcome`]) or `x` (the chunk crashed: a message) |
//! | `shoal:{<ns>:pool:<id>}:progress` | hash | task entry id → items of that chunk done and reported |
//! | `shoal:{<ns>:pool:<id>}:workers` | hash | worker id → its last heartbeat, `<Unix ms>:<entry id of the chunk it runs>` (empty between chunks); `<worker id>/running` → the entry id of the chunk it runs, written before each chunk of a careful read only (see *Redelivery*) |
//! | `shoal:{<ns>:pool:<id>}:driver` | string | present while the pool's driver lives (short TTL, refreshed by the supervisor) |
//! | `shoal:{<ns>:pool:<id>}:cancelled` | set | the calls that were cancelled |
//! | `shoal:{<ns>:pool:<id>}:added`, `…:added_old` | hash | call → the index of the last chunk of it the feeder added: how a batch sent again after a lost reply is added once (see [`chunks_invocation`]); records are kept for a while, not for the pool's life (two generations that rotate) |
//!
//! A chunk entry has three fields, not one per number: a worker parses every field of every
//! entry it reads, and for tiny tasks that parsing is a good part of a task's cost. The index of
//! the chunk's first item in the call's input is there for errors and logs.
//!
//! # A worker ([`run_worker`])
//!
//! runs the initializer once, then loops: `XREADGROUP` chunks (blocking), call the function on each
//! item of a chunk in order until one fails (a panic or an undecodable item ends the chunk, as an
//! exception ends a chunk in Python), then `XADD` the outcomes of all the chunks it read as one
//! results entry and `XACK` them, in one `MULTI`/`EXEC` (a write Redis refuses, at `maxmemory`,
//! aborts both: a chunk is never acknowledged without its outcome; the worker fails and its chunks,
//! still pending, are redelivered), in the same pipeline as its next `XREADGROUP` (1 round trip per
//! read). It does not delete them: `XDEL` costs the server a walk through the entry's stream node
//! per id, while the supervisor removes every entry the workers are done with in one `XTRIM MINID`
//! now and then ([`trim_tasks`], `pool/trim.lua`). A chunk's items are one MessagePack array and
//! its results another ([`shoal_core::codec::ArrayWriter`]): an item costs its own decoding, call
//! and encoding, and error texts are built only when an item fails. How many chunks it asks for at
//! once adapts to what they cost: as many as fit in [`READ_BUDGET`] of work at the rate of its last
//! read (at most twice as many as last time, up to [`MAX_PREFETCH`]), so one chunk at a time while
//! chunks take 2 ms or more (expensive chunks spread over the workers) and up to 64 while they are
//! tiny: per chunk that is 5/n commands (the read, and the outcomes' `XADD` and `XACK` in their
//! `MULTI`/`EXEC`) besides the feeder's `XADD`, which is what bounds a map of tiny tasks (the Redis
//! server's command rate and, on a VM, the cost of waking a process), at any pool size. The feeder
//! adds a batch of chunks in one script (`pool/add_chunks.lua`, [`chunks_invocation`]: one
//! `EVALSHA`, one round trip per batch), so that a worker blocked in `XREADGROUP` is woken once
//! with up to n of them rather than once per chunk; the script adds nothing for a call in the
//! `cancelled` set, checked in the same atomic step as the writes, so a chunk written after its
//! call's cancel never reaches a worker; and it records the last chunk it added of each call
//! (the `added` hash), so that a batch sent again because its reply was lost is not added twice
//! (each chunk would run twice). It stops on a stop entry (a read that
//! holds several keeps one and adds the others back, so that every worker gets its own), after
//! `maxtasksperchild` chunks, or when the pool's state is lost. A heartbeat thread renews the
//! lease of the chunks in hand every third of the lease (`XCLAIM` to itself with idle 0 resets an
//! entry's idle time) and stamps the `workers` hash, so a chunk that runs for hours is never taken
//! from a live worker. After the chunks of one read, the worker runs the process's exit hooks
//! (queue feeders flush, and forget a `close()`) before it sends their outcomes, so what a task put
//! on a queue is there before its result, and the next task starts clean. A worker that is a
//! thread of its driver (`StartMethod::Thread`) runs them too, but there the hooks concern the
//! thread only, not the whole process they share with the driver: the queue feeder waits for the
//! items this thread put (not the driver's), and no queue mark, lock or semaphore hold of the
//! process is touched (a queue the driver closed stays closed); managers made by its tasks are
//! shut down, the driver's are not.
//!
//! A read whose reply was lost (the connection dropped) is sent again; since the lost one may have
//! been served, the retry asks for the chunks pending on this worker instead (`XREADGROUP ... 0`,
//! which does not block) and takes those in hand: no chunk is left pending on a live worker that
//! does not know it has it (its lease would lapse, and the worker be killed for it).
//!
//! # A worker's driver and its store
//!
//! A worker must not run on for nobody. Its heartbeat thread also checks the `driver` key
//! ([`PoolWorkerSpec::driver_ttl_ms`]); when the key has been missing for half its TTL (so a
//! Redis stall that outlived the TTL does not count: the driver refreshes it right after), the
//! driver is gone and the worker exits at once with [`EXIT_DRIVER_GONE`], whatever it runs:
//! within the task lease plus 1 s of the driver's death or freeze (the TTL is half the lease,
//! between `min(1 s, (lease + 1 s) / 2)` and 5 s; see [`driver_ttl`] for the bound). A local
//! worker is usually ended before that by its parent-death signal.
//!
//! The heartbeat thread starts before the initializer, so a worker whose initializer runs for long
//! leaves a dead driver as promptly as one that runs chunks.
//!
//! When Redis cannot be reached (refused, dropped, timed out), a worker retries its read or its
//! send for `redis.response_timeout_secs`, then exits with [`EXIT_STORE_LOST`]. The supervisor
//! does not count that exit as a crash; it judges the store itself.
//!
//! When Redis answers but the pool's task stream or its consumer group is gone
//! ([`is_state_lost`]: Redis restarted without persistence, failed over to a replica that lagged,
//! evicted the key), the chunks went with it and no replacement could read anything: a worker
//! that finds this in its read, or a worker process in its heartbeat (whatever its task), exits
//! with [`EXIT_POOL_GONE`]; the supervisor's redelivery of its chunks then meets `NOGROUP`, and
//! it breaks the pool with [`state_lost`] rather than start another (a task that exits 77 itself
//! while the state is there is an ordinary failure). Writes to the task stream (chunks, stop
//! entries, redelivered chunks) use `NOMKSTREAM`: none of them makes the stream again without its
//! group.
//!
//! # Long chunks keep their progress
//!
//! A chunk that runs for longer than [`FIRST_PROGRESS`] sends the outcomes of the items it has
//! done so far as a partial outcome, and records how far it got in the `progress` hash, in one
//! pipeline; then again every [`PROGRESS_EVERY`] (chunks shorter than [`FIRST_PROGRESS`] never
//! do). A chunk whose worker dies is redelivered from there (`done` in its header); when its
//! worker got further
//! than where the attempt started, the death is not the chunk's doing and its attempts count
//! starts again at 1: only a chunk that kills `1 + retries` workers in a row without progress
//! fails. So a map of long chunks completes while workers are
//! killed at random faster than a chunk's run time, and a chunk that always kills its worker
//! still fails. The supervisor puts a chunk's parts together when its final outcome arrives.
//!
//! # Redelivery ([`requeue_consumer`], [`requeue_idle`])
//!
//! When the executor reports a worker's exit, or a chunk's idle time passes the lease, the
//! supervisor runs `pool/requeue.lua`, which moves each such pending chunk exactly once: added
//! again from its progress. A slow worker presumed dead may still answer: the supervisor keeps
//! one outcome per chunk.
//!
//! A death is charged to one chunk at most: the one the worker was running. A worker holds the
//! chunks of one read (up to [`MAX_PREFETCH`]) and runs them in order; when it dies, those before
//! the one it ran are done but their outcomes were not sent, and those after it never started:
//! they are added again with their attempt unchanged. The one it ran is added again with
//! `attempt + 1` when it made no progress, or, when its `1 + retries` attempts are used up,
//! answered with a crash entry. Which one it ran is known when the worker held one chunk (as it
//! does while chunks take 2 ms or more), or when its heartbeat stamp names its last pending
//! chunk. Otherwise (a worker that took many tiny chunks and died in one within microseconds,
//! before its heartbeat could name it) none is charged: the chunks that may have been running
//! are added again *careful* (`.1` in their header), and a worker whose read holds a careful
//! chunk names each chunk of that read in the `workers` hash (`<worker id>/running`) before it
//! runs it (one round trip per chunk: only after such a death, never in the steady state). A
//! second death there is charged exactly. So a chunk that always kills its worker fails after
//! `1 + retries` charged attempts (one death more, at most, when it came in a large read), and
//! its neighbours do not fail with it. A worker killed by a cancel sweep ([`Blame::Nobody`]) has
//! none of its chunks charged: the one it ran was removed.
//!
//! Delivery is at least once: a chunk whose items all ran but whose worker died before it sent
//! their outcomes (they go together, after the read's last chunk) runs again, as does the part
//! of a long chunk done since its last progress report.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use redis::streams::StreamId;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use shoal_core::TaskErrorKind;
use shoal_core::codec::{ArrayReader, ArrayWriter};
use shoal_core::context;
use shoal_core::error::{Error, RedisContext, Result};
use shoal_core::registry::{self, Failure};
use shoal_core::store::{KeySpace, Store};

use crate::task::now_ms;

mod worker;

pub use worker::{WorkerEnd, run_worker};

/// The consumer group of a pool's task stream.
pub const GROUP: &str = "workers";

static REQUEUE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("requeue.lua")));
static ADD_CHUNKS: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("add_chunks.lua")));
static CANCEL: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("cancel.lua")));
static TRIM: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("trim.lua")));

/// How long a worker's `XREADGROUP` blocks before it looks at its stop conditions again.
const READ_BLOCK: Duration = Duration::from_millis(500);
/// Most chunks a worker takes at once (only while chunks are cheap).
pub const MAX_PREFETCH: usize = 64;
/// The work a worker takes in one read: as many chunks as ran in this time last read.
pub const READ_BUDGET: Duration = Duration::from_millis(2);

/// Exit code of a worker that gave up because Redis could not be reached (`EX_TEMPFAIL`).
pub const EXIT_STORE_LOST: i32 = 75;
/// Exit code of a pool worker whose driver is gone.
pub const EXIT_DRIVER_GONE: i32 = 76;
/// Exit code of a pool worker that found the pool's state gone from Redis: its task stream or
/// the stream's consumer group no longer exists (see [`is_state_lost`]). Its replacement would
/// find the same, so the supervisor breaks the pool instead (see [`state_lost`]) once its
/// redelivery of the worker's chunks confirms it (a task may exit 77 for its own reasons).
pub const EXIT_POOL_GONE: i32 = 77;
/// How often a long chunk reports the items it has done.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// When a chunk first reports its progress: early, so that a worker killed soon after it took a
/// chunk has rarely left it without progress; chunks shorter than this never report.
pub const FIRST_PROGRESS: Duration = Duration::from_millis(10);

/// The keys of one pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolKeys {
    /// The task stream.
    pub tasks: String,
    /// The results stream.
    pub results: String,
    /// The heartbeat hash.
    pub workers: String,
    /// The driver's liveness key.
    pub driver: String,
    /// How far long chunks got.
    pub progress: String,
    /// The calls that were cancelled.
    pub cancelled: String,
    /// The last chunk added of each call (this generation of records).
    pub added: String,
    /// The generation of records before `added`.
    pub added_old: String,
}

impl PoolKeys {
    /// The keys of pool `id`.
    pub fn new(keys: &KeySpace, id: &str) -> Self {
        let object = keys.object("pool", id);
        PoolKeys {
            tasks: object.key("tasks"),
            results: object.key("results"),
            workers: object.key("workers"),
            driver: object.key("driver"),
            progress: object.key("progress"),
            cancelled: object.key("cancelled"),
            added: object.key("added"),
            added_old: object.key("added_old"),
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
    /// TTL of the driver's liveness key; 0: do not watch it (a worker thread of the driver).
    #[serde(default)]
    pub driver_ttl_ms: u64,
}

/// The TTL of a pool driver's liveness key for a chunk `lease`: half the lease, at most 5 s and
/// at least `min(1 s, (lease + 1 s) / 2)`.
///
/// The driver sets the key every quarter of the TTL; workers check it every
/// [`driver_check_every`] (`c`, at most a quarter of the TTL) and exit once it has been missing
/// for half the TTL. So a worker exits at most `1.5 × TTL + 2c ≤ 2 × TTL` after its driver's
/// last refresh (plus the check's round trip), which is within `lease + 1 s` for every lease:
/// `≤ lease` from a 2 s lease up, `≤ 2 s` from 1 to 2 s, `≤ lease + 1 s` below 1 s.
///
/// The floor keeps the key from lapsing under ordinary latency: with the 1 s floor, a short
/// lease gave `1.5 s + 2c`, over `lease + 1 s` below a lease of about 0.75 s, so below 1 s the
/// floor is `(lease + 1 s) / 2` (0.55 s for the shortest lease, 0.1 s): the driver may then miss
/// its refreshes for about 0.8 s before its workers leave.
pub fn driver_ttl(lease: Duration) -> Duration {
    // Saturating: a lease near `Duration::MAX` must not overflow (the pool's builder refuses
    // leases over a day, but this is public).
    let floor = (lease.saturating_add(Duration::from_secs(1)) / 2).min(Duration::from_secs(1));
    (lease / 2).clamp(floor, Duration::from_secs(5))
}

/// How often a worker checks its driver's liveness key (and renews its lease).
pub fn driver_check_every(lease: Duration, driver_ttl: Duration) -> Duration {
    (lease / 3)
        .min(driver_ttl / 4)
        .max(Duration::from_millis(10))
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
    /// The items: one array of argument tuples ([`ArrayWriter::payload`]).
    pub payload: Vec<u8>,
    /// The index of its first item in the call's input.
    pub first_item: u64,
}

impl ChunkEntry {
    /// Its header `h`: `call.chunk.attempt.first.done`, attempt 1, nothing done yet.
    fn header(&self) -> String {
        format!("{}.{}.1.{}.0", self.call, self.chunk, self.first_item)
    }
}

/// What [`chunks_added`] found: the chunks were added, or their call was cancelled first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunksAdded {
    /// Every chunk was added: by this send, or by an earlier send of the same batch (whose
    /// reply was lost).
    Added,
    /// The call is in the cancelled set: none was added.
    Cancelled,
}

/// The script that adds `chunks` (attempt 1 each), all of one call, to the task stream, unless
/// the call was cancelled (`pool/add_chunks.lua`), refreshing both streams' TTL with
/// `refresh_ttl` seconds when given: one `EVALSHA`, one round trip, in place of a
/// `MULTI`/`EXEC` of one `XADD` per chunk. The cancelled set is checked in the same atomic step
/// as the writes, so a chunk written after its call's cancel never reaches a worker (a check by
/// the writer beforehand leaves a window, in which the cancel's removal of the undelivered
/// chunks would miss the batch). Like `MULTI`/`EXEC`, it wakes a worker blocked in
/// `XREADGROUP` once for the whole batch. `NOMKSTREAM`: a task stream that is gone (the pool's
/// state was lost: see [`is_state_lost`]) is not made again without its consumer group, where
/// no worker could read the chunks; nothing is added then and the reply is nil. Read the reply
/// with [`chunks_added`].
///
/// At most once: the script records the index of the last chunk it added of the call (in the
/// `added` hash; see the module docs) and adds only the chunks past it, so the same invocation
/// sent again, because its reply was lost after Redis ran it (a dropped connection, a timeout),
/// adds nothing and answers as if it had. This holds because a call's chunks are written by one
/// writer, in order of their index, each batch once the one before was answered: so `chunks`
/// must be one call's, with consecutive indices (anything else is refused). A record is kept
/// for `remember_secs` at least (and twice that at most): longer than the writer goes on
/// sending the batch again.
///
/// Chunks of several calls, or of several functions, are refused: the script checks one call.
pub fn chunks_invocation(
    keys: &PoolKeys,
    chunks: &[ChunkEntry],
    refresh_ttl: Option<u64>,
    remember_secs: u64,
) -> Result<redis::ScriptInvocation<'static>> {
    let (Some(first), Some(last)) = (chunks.first(), chunks.last()) else {
        return Err(Error::invalid_state(format!(
            "no chunks to add to {}",
            keys.tasks
        )));
    };
    if chunks
        .iter()
        .any(|c| c.call != first.call || c.function != first.function)
    {
        return Err(Error::invalid_state(format!(
            "chunks of several calls added to {} at once",
            keys.tasks
        )));
    }
    if chunks
        .iter()
        .enumerate()
        .any(|(k, c)| first.chunk.checked_add(k as u64) != Some(c.chunk))
    {
        return Err(Error::invalid_state(format!(
            "chunks added to {} out of order: a batch holds consecutive chunks of a call",
            keys.tasks
        )));
    }
    let mut invocation = ADD_CHUNKS.prepare_invoke();
    invocation
        .key(&keys.tasks)
        .key(&keys.cancelled)
        .key(&keys.results)
        .key(&keys.added)
        .key(&keys.added_old)
        .arg(first.call)
        .arg(refresh_ttl.unwrap_or(0))
        .arg(&first.function)
        .arg(first.chunk)
        .arg(last.chunk)
        // A record kept for 0 s would be rotated away by the next batch; the script doubles
        // it, as a Lua number that must print as an integer.
        .arg(remember_secs.clamp(1, 1 << 30));
    for chunk in chunks {
        invocation.arg(chunk.header()).arg(&chunk.payload);
    }
    Ok(invocation)
}

/// The outcome of [`chunks_invocation`]'s reply: [`state_lost`] when it is nil (the task stream
/// is gone, so no chunk was added), [`ChunksAdded::Cancelled`] when the call was cancelled.
pub fn chunks_added(keys: &PoolKeys, reply: Option<i64>) -> Result<ChunksAdded> {
    match reply {
        None => Err(state_lost(keys)),
        Some(n) if n < 0 => Ok(ChunksAdded::Cancelled),
        Some(_) => Ok(ChunksAdded::Added),
    }
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
    /// The results of the items that succeeded, in order: one MessagePack array
    /// ([`ArrayWriter`]; read it with [`ArrayReader::array`]).
    pub outputs: ByteBuf,
    /// The item that failed, if one did; the items after it did not run.
    pub failure: Option<ItemFailure>,
}

impl ChunkOutcome {
    /// An outcome without results: the item at `index` failed.
    pub fn failed(index: u32, kind: TaskErrorKind, message: String) -> Self {
        ChunkOutcome {
            outputs: ByteBuf::from(ArrayWriter::new().finish()),
            failure: Some(ItemFailure {
                index,
                kind,
                message,
            }),
        }
    }
}

/// A [`ChunkOutcome`] as it is written without copying the results (the same encoding).
#[derive(Serialize)]
struct PartialOutcome<'a> {
    outputs: &'a serde_bytes::Bytes,
    failure: Option<ItemFailure>,
}

/// One chunk's final outcome in a results entry that carries those of a whole worker read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchedOutcome {
    /// The call.
    pub call: u64,
    /// The chunk index.
    pub chunk: u64,
    /// The attempt that produced it.
    pub attempt: u32,
    /// The offset in the chunk of the first item it covers.
    pub offset: u64,
    /// The outcome.
    pub outcome: ChunkOutcome,
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
    /// The offset in the chunk of the first item it covers (for a crash: how far the chunk
    /// got).
    pub offset: u64,
    /// A partial outcome of a long chunk: more follows.
    pub partial: bool,
    /// The outcome.
    pub body: ResultBody,
}

/// What came back for a chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResultBody {
    /// Its [`ChunkOutcome`], or why it could not be decoded.
    Outcome(std::result::Result<ChunkOutcome, String>),
    /// The chunk used up its attempts; why.
    Crashed(String),
}

impl ResultEntry {
    /// Parses a results-stream entry into the chunk outcomes it carries (one, or those of a
    /// worker's read); none for an entry that is not one. `store` decodes the outcomes.
    pub fn parse(store: &Store, key: &str, entry: &StreamId) -> Vec<ResultEntry> {
        let worker: String = entry.get("w").unwrap_or_default();
        if let Some(headers) = entry.get::<String>("h") {
            return Self::parse_batch(store, key, entry, worker, &headers);
        }
        let single = || -> Option<ResultEntry> {
            let body = match entry.get::<Vec<u8>>("p") {
                Some(p) => ResultBody::Outcome(
                    store
                        .decode::<ChunkOutcome>(&p, key)
                        .map_err(|e| e.to_string()),
                ),
                None => ResultBody::Crashed(entry.get("x")?),
            };
            Some(ResultEntry {
                id: entry.id.clone(),
                call: entry.get("c")?,
                chunk: entry.get("k")?,
                attempt: entry.get("a")?,
                worker: worker.clone(),
                offset: entry.get("o").unwrap_or_default(),
                partial: entry.map.contains_key("n"),
                body,
            })
        };
        single().into_iter().collect()
    }

    /// A batch entry: `h` names its chunks (so that they fail, rather than wait forever, when
    /// `b` cannot be decoded), `b` holds their outcomes in the same order.
    fn parse_batch(
        store: &Store,
        key: &str,
        entry: &StreamId,
        worker: String,
        headers: &str,
    ) -> Vec<ResultEntry> {
        let decoded = entry
            .get::<Vec<u8>>("b")
            .ok_or_else(|| "the batch has no outcomes".to_string())
            .and_then(|b| {
                store
                    .decode::<Vec<BatchedOutcome>>(&b, key)
                    .map_err(|e| e.to_string())
            });
        match decoded {
            Ok(outcomes) => outcomes
                .into_iter()
                .map(|o| ResultEntry {
                    id: entry.id.clone(),
                    call: o.call,
                    chunk: o.chunk,
                    attempt: o.attempt,
                    worker: worker.clone(),
                    offset: o.offset,
                    partial: false,
                    body: ResultBody::Outcome(Ok(o.outcome)),
                })
                .collect(),
            Err(why) => headers
                .split(',')
                .filter_map(|h| {
                    let mut parts = h.split('.').map(|n| n.parse::<u64>().ok());
                    let (call, chunk, attempt, offset) = (
                        parts.next()??,
                        parts.next()??,
                        parts.next()??,
                        parts.next()??,
                    );
                    Some(ResultEntry {
                        id: entry.id.clone(),
                        call,
                        chunk,
                        attempt: u32::try_from(attempt).unwrap_or(u32::MAX),
                        worker: worker.clone(),
                        offset,
                        partial: false,
                        body: ResultBody::Outcome(Err(why.clone())),
                    })
                })
                .collect(),
        }
    }
}

/// Whether `error` is Redis saying that the pool's state is gone: the task stream or its
/// consumer group does not exist (`NOGROUP`, from `XREADGROUP`, `XCLAIM`, `XPENDING` and the
/// scripts that use it), or the stream a blocked `XREADGROUP` waited on was deleted
/// (`UNBLOCKED ... no longer exists`). A pool's supervisor creates both before it starts any
/// worker and deletes them only once its workers are gone, so while it runs this means Redis
/// lost them: a restart without persistence, a failover to a replica that lagged, eviction, or
/// someone deleted them. Nothing in flight can complete then (the chunks went with the stream).
pub fn is_state_lost(error: &Error) -> bool {
    match error {
        Error::Redis { source, .. } => match source.code() {
            Some("NOGROUP") => true,
            Some("UNBLOCKED") => source
                .detail()
                .is_some_and(|detail| detail.contains("no longer exists")),
            _ => false,
        },
        _ => false,
    }
}

/// The error a pool's calls get once its state in Redis is found lost (see [`is_state_lost`]).
pub fn state_lost(keys: &PoolKeys) -> Error {
    Error::invalid_state(format!(
        "the pool's state in Redis was lost: its task stream {} or the stream's consumer group \
         is gone (Redis restarted without persistence, failed over to a replica that lagged \
         behind, evicted the key, or it was deleted), and with it the chunks of its calls; the \
         pool is broken",
        keys.tasks
    ))
}

/// Adds one stop entry (`s`=`1`) to the task stream `tasks` in `pipe`: the worker that reads it
/// exits once its chunks in hand are done (see the module docs). Not to a stream that is gone
/// (`NOMKSTREAM`): that would make it again without its consumer group.
///
/// ```
/// let mut pipe = redis::pipe();
/// shoal_executor::pool::add_stop_entry(&mut pipe, "shoal:{default:pool:p1}:tasks");
/// assert_eq!(pipe.cmd_iter().count(), 1);
/// ```
pub fn add_stop_entry(pipe: &mut redis::Pipeline, tasks: &str) {
    pipe.cmd("XADD")
        .arg(tasks)
        .arg("NOMKSTREAM")
        .arg("*")
        .arg("s")
        .arg(1)
        .ignore();
}

/// Creates the task stream and its consumer group, and the results stream (idempotent), both
/// with the store's TTL: one round trip ([`streams_creation`]). The results stream is made
/// here, not by a worker's first result, so that it expires even when the driver is killed
/// before its first lease check (which refreshes both TTLs); a group of its own
/// ([`RESULTS_GROUP`], never read) is how one command makes an empty stream.
pub fn create_streams(store: &Store, keys: &PoolKeys) -> Result<()> {
    let replies = store.with_conn(
        || format!("creating pool stream {}", keys.tasks),
        |c| streams_creation(store, keys).query(c),
    )?;
    streams_created(keys, replies)
}

/// What [`streams_creation`] answers: the task group's creation and the task stream's TTL, then
/// the results stream's creation and TTL.
pub type StreamsCreated = (
    redis::RedisResult<()>,
    redis::RedisResult<()>,
    redis::RedisResult<()>,
    redis::RedisResult<()>,
);

/// The consumer group [`streams_creation`] makes on the results stream so as to make the stream
/// (`XGROUP CREATE ... MKSTREAM`): nobody reads through it (the supervisor reads with `XREAD`),
/// so it holds no entry.
pub const RESULTS_GROUP: &str = "made";

/// The pipeline of [`create_streams`], for a caller that sends it itself (an async one); read
/// its replies with [`streams_created`].
pub fn streams_creation(store: &Store, keys: &PoolKeys) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.cmd("XGROUP")
        .arg("CREATE")
        .arg(&keys.tasks)
        .arg(GROUP)
        .arg("$")
        .arg("MKSTREAM")
        .expire(&keys.tasks, store.expiry_secs() as i64)
        .cmd("XGROUP")
        .arg("CREATE")
        .arg(&keys.results)
        .arg(RESULTS_GROUP)
        .arg("$")
        .arg("MKSTREAM")
        .expire(&keys.results, store.expiry_secs() as i64);
    // Each reply on its own: a group that exists already (BUSYGROUP) is fine.
    pipe.ignore_errors();
    pipe
}

/// The outcome of [`streams_creation`]'s replies.
pub fn streams_created(keys: &PoolKeys, replies: StreamsCreated) -> Result<()> {
    let busy_is_fine = |reply: redis::RedisResult<()>| match reply {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => other,
    };
    let (tasks, tasks_ttl, results, results_ttl) = replies;
    busy_is_fine(tasks)
        .and(tasks_ttl)
        .and(busy_is_fine(results))
        .and(results_ttl)
        .map_err(|e| Error::redis(format!("creating pool stream {}", keys.tasks), e))
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
                .arg(&keys.driver)
                .arg(&keys.progress)
                .arg(&keys.cancelled)
                .arg(&keys.added)
                .arg(&keys.added_old)
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
    /// The chunks charged with their worker's death (requeued with another attempt, or
    /// failed), each with the attempt that ended; the other chunks moved kept their attempt.
    pub chunks: Vec<MovedChunk>,
}

/// Which chunk of a dead (or silent) worker's read [`requeue_consumer`] charges with an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blame {
    /// The chunk it was running, when that is known (see *Redelivery* in the module docs);
    /// none otherwise.
    Running,
    /// None: the worker was killed for a reason that is none of its chunks' doing (a cancel
    /// sweep, which removed the chunk it ran).
    Nobody,
}

/// A chunk [`requeue_consumer`]/[`requeue_idle`] charged: its attempt ended without an outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MovedChunk {
    /// The call it belongs to.
    pub call: u64,
    /// Its index in the call.
    pub chunk: u64,
    /// The attempt that ended (1 for the first delivery).
    pub attempt: u32,
    /// The index in the call's input of the item the attempt had reached (the first item not
    /// done).
    pub item: u64,
}

impl MovedChunk {
    /// Parses `call.chunk.attempt.item`, as `pool/requeue.lua` writes it.
    fn parse(text: &str) -> Option<MovedChunk> {
        let mut parts = text.split('.');
        let chunk = MovedChunk {
            call: parts.next()?.parse().ok()?,
            chunk: parts.next()?.parse().ok()?,
            attempt: parts.next()?.parse().ok()?,
            item: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(chunk)
    }
}

/// Moves every chunk pending on `worker` (which exited) and removes it from the group; charges
/// an attempt to the chunk it was running when `blame` says so and that chunk is known (see
/// *Redelivery* in the module docs).
pub async fn requeue_consumer(
    conn: &mut (impl redis::aio::ConnectionLike + Send),
    store: &Store,
    keys: &PoolKeys,
    worker: &str,
    attempts: u32,
    blame: Blame,
) -> Result<Requeued> {
    requeue(
        conn,
        store,
        keys,
        "consumer",
        worker.to_string(),
        attempts,
        blame,
    )
    .await
}

/// Moves every chunk pending longer than `lease`, charging an attempt to the chunk each of
/// their workers was running, when it is known (see *Redelivery* in the module docs).
pub async fn requeue_idle(
    conn: &mut (impl redis::aio::ConnectionLike + Send),
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
        Blame::Running,
    )
    .await
}

async fn requeue(
    conn: &mut (impl redis::aio::ConnectionLike + Send),
    store: &Store,
    keys: &PoolKeys,
    mode: &str,
    target: String,
    attempts: u32,
    blame: Blame,
) -> Result<Requeued> {
    let reply: Vec<redis::Value> = REQUEUE
        .key(&keys.tasks)
        .key(&keys.results)
        .key(&keys.progress)
        .key(&keys.cancelled)
        .key(&keys.workers)
        .arg(GROUP)
        .arg(mode)
        .arg(&target)
        .arg(attempts)
        .arg(store.expiry_secs())
        .arg(match blame {
            Blame::Running => "blame",
            Blame::Nobody => "none",
        })
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
    let strings = |v: Option<redis::Value>| -> Vec<String> {
        v.and_then(|v| redis::from_redis_value::<Vec<String>>(v).ok())
            .unwrap_or_default()
    };
    let workers = strings(values.next());
    let chunks = strings(values.next())
        .iter()
        .filter_map(|text| MovedChunk::parse(text))
        .collect();
    Ok(Requeued {
        requeued,
        failed,
        workers,
        chunks,
    })
}

/// What [`cancel_call`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cancelled {
    /// The chunks removed.
    pub removed: u64,
    /// A sweep's chunks still pending on a worker that runs another chunk (it holds them
    /// behind that one, and skips them when it gets there): left for a later sweep.
    pub deferred: u64,
    /// A sweep's workers to stop: each runs a chunk of the call.
    pub workers: Vec<String>,
}

/// Cancels `call`: removes its chunks no worker took yet, and marks it cancelled, which its
/// running tasks see (`termination_requested()`) and redelivery respects. With `sweep`, also
/// removes its chunks still pending whose worker runs them (it did not stop) and returns those
/// workers; the chunks a worker holds behind another call's chunk are left (`deferred`; see
/// `pool/cancel.lua`). One round trip.
pub async fn cancel_call(
    conn: &mut (impl redis::aio::ConnectionLike + Send),
    store: &Store,
    keys: &PoolKeys,
    call: u64,
    sweep: bool,
) -> Result<Cancelled> {
    let reply: Vec<redis::Value> = CANCEL
        .key(&keys.tasks)
        .key(&keys.cancelled)
        .key(&keys.workers)
        .arg(call)
        .arg(store.expiry_secs())
        .arg(if sweep { "sweep" } else { "cancel" })
        .arg(GROUP)
        .invoke_async(conn)
        .await
        .context(|| format!("cancelling call {call} of {}", keys.tasks))?;
    let mut values = reply.into_iter();
    let mut count = || {
        values
            .next()
            .and_then(|v| redis::from_redis_value::<u64>(v).ok())
            .unwrap_or(0)
    };
    let removed = count();
    let deferred = count();
    let workers = values
        .filter_map(|v| redis::from_redis_value::<String>(v).ok())
        .collect();
    Ok(Cancelled {
        removed,
        deferred,
        workers,
    })
}

/// Removes the task-stream entries the workers are done with (delivered and acknowledged; see
/// `pool/trim.lua`); returns how many. One round trip.
pub async fn trim_tasks(
    conn: &mut (impl redis::aio::ConnectionLike + Send),
    keys: &PoolKeys,
) -> Result<u64> {
    TRIM.key(&keys.tasks)
        .arg(GROUP)
        .invoke_async(conn)
        .await
        .context(|| format!("trimming {}", keys.tasks))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error a command gets for the reply `-<reply>\r\n`, as it comes from Redis.
    fn server_error(reply: &str) -> Error {
        let value = redis::parse_redis_value(format!("-{reply}\r\n").as_bytes())
            .and_then(redis::Value::extract_error);
        match value {
            Err(e) => Error::redis("reading", e),
            Ok(v) => Error::invalid_state(format!("not an error: {v:?}")),
        }
    }

    #[test]
    fn the_state_is_lost_only_when_redis_says_the_stream_or_its_group_is_gone() {
        for lost in [
            "NOGROUP No such key 'shoal:{d:pool:p}:tasks' or consumer group 'workers' in \
             XREADGROUP with GROUP option",
            "NOGROUP No such key 'k' or consumer group 'workers' script: 76a, on @user_script:1.",
            "UNBLOCKED the stream key no longer exists",
            "UNBLOCKED the consumer group this client was blocked on no longer exists",
        ] {
            assert!(is_state_lost(&server_error(lost)), "{lost}");
        }
        for other in [
            "UNBLOCKED client unblocked via CLIENT UNBLOCK",
            "WRONGTYPE Operation against a key holding the wrong kind of value",
            "OOM command not allowed when used memory > 'maxmemory'.",
        ] {
            assert!(!is_state_lost(&server_error(other)), "{other}");
        }
        let dropped = Error::redis(
            "reading",
            redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
        );
        assert!(!is_state_lost(&dropped));
        let keys = PoolKeys::new(&KeySpace::new("d"), "p");
        assert!(
            state_lost(&keys)
                .to_string()
                .contains("the pool's state in Redis was lost")
        );
        assert_eq!(chunks_added(&keys, Some(2)).ok(), Some(ChunksAdded::Added));
        assert_eq!(
            chunks_added(&keys, Some(-1)).ok(),
            Some(ChunksAdded::Cancelled)
        );
        assert!(chunks_added(&keys, None).is_err());
    }

    #[test]
    fn a_batch_holds_consecutive_chunks_of_one_call() {
        let keys = PoolKeys::new(&KeySpace::new("d"), "p");
        let chunk = |call, chunk| ChunkEntry {
            call,
            chunk,
            function: "f".into(),
            payload: vec![0x90],
            first_item: chunk,
        };
        for fine in [
            vec![chunk(1, 0)],
            vec![chunk(1, 3), chunk(1, 4), chunk(1, 5)],
        ] {
            assert!(
                chunks_invocation(&keys, &fine, None, 60).is_ok(),
                "{fine:?}"
            );
        }
        for refused in [
            vec![],
            vec![chunk(1, 0), chunk(2, 1)],
            vec![chunk(1, 0), chunk(1, 2)],
            vec![chunk(1, 1), chunk(1, 0)],
            vec![chunk(1, u64::MAX), chunk(1, 0)],
        ] {
            assert!(
                chunks_invocation(&keys, &refused, Some(60), 60).is_err(),
                "{refused:?}"
            );
        }
        assert_eq!(keys.added, "shoal:{d:pool:p}:added");
        assert_eq!(keys.added_old, "shoal:{d:pool:p}:added_old");
    }

    /// The longest a worker can take to leave after its driver's last refresh: the key lapses
    /// after the TTL, is first seen missing at most one check later, and must stay missing for
    /// half the TTL, seen at most one check after that.
    fn worst_exit(lease: Duration) -> Duration {
        let ttl = driver_ttl(lease);
        let check = driver_check_every(lease, ttl);
        ttl + check + ttl / 2 + check
    }

    #[test]
    fn workers_leave_within_the_lease_and_a_second_for_every_lease() {
        let mut ms = 100;
        while ms <= 86_400_000 {
            let lease = Duration::from_millis(ms);
            let worst = worst_exit(lease);
            assert!(
                worst <= lease + Duration::from_secs(1),
                "lease {lease:?}: a worker may take {worst:?}"
            );
            ms += if ms < 3_000 { 50 } else { ms / 3 };
        }
    }

    #[test]
    fn the_key_outlasts_several_refreshes_and_ordinary_latency() {
        for ms in [100, 300, 750, 1_000, 2_000, 10_000, 60_000] {
            let lease = Duration::from_millis(ms);
            let ttl = driver_ttl(lease);
            // The driver refreshes every quarter of the TTL; a worker leaves only after
            // 1.5 × TTL without the key: refreshes may be late by that much.
            assert!(
                ttl >= Duration::from_millis(550),
                "lease {lease:?}: ttl {ttl:?}"
            );
            assert!(
                ttl <= Duration::from_secs(5),
                "lease {lease:?}: ttl {ttl:?}"
            );
        }
        assert_eq!(driver_ttl(Duration::from_secs(10)), Duration::from_secs(5));
        assert_eq!(driver_ttl(Duration::from_secs(4)), Duration::from_secs(2));
        assert_eq!(
            driver_ttl(Duration::from_millis(1500)),
            Duration::from_secs(1)
        );
        assert_eq!(
            driver_ttl(Duration::from_millis(100)),
            Duration::from_millis(550)
        );
    }
}
