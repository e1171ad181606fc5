//! A pool worker: its read loop (`XREADGROUP` with adaptive prefetch, outcomes sent with the
//! next read, its own pending chunks read back after a lost reply), the chunk it runs item by item
//! with progress reports, and its heartbeat (started before the initializer).

use super::*;

/// An entry of the task stream as a worker read it.
#[derive(Debug, Default, PartialEq, Eq)]
struct TaskEntry {
    id: String,
    /// A stop entry.
    stop: bool,
    /// Pending on this worker but deleted from the stream (a read of the worker's own pending
    /// entries gives these without fields): nothing to run, only to acknowledge.
    deleted: bool,
    call: u64,
    chunk: u64,
    attempt: u32,
    function: String,
    /// The index of the chunk's first item in the call's input.
    first_item: u64,
    /// Items of the chunk done by earlier attempts (skipped).
    done: u64,
    /// Redelivered after a death that could not be charged to one chunk (`.1` at the end of its
    /// header): the worker names each chunk of its read before it runs it (see
    /// `pool/requeue.lua`).
    careful: bool,
    payload: Vec<u8>,
}

/// The entries of an `XREADGROUP` reply (RESP2 arrays or RESP3 maps), read straight from the
/// reply: a worker reads many small entries, and a map per entry would cost more than the task.
fn parse_task_entries(reply: redis::Value) -> Vec<TaskEntry> {
    use redis::Value;
    fn pairs(value: Value) -> Vec<(Value, Value)> {
        match value {
            Value::Map(map) => map,
            Value::Array(items) => {
                let mut items = items.into_iter();
                let mut out = Vec::with_capacity(items.len() / 2);
                while let (Some(k), Some(v)) = (items.next(), items.next()) {
                    out.push((k, v));
                }
                out
            }
            _ => Vec::new(),
        }
    }
    fn bytes(value: Value) -> Vec<u8> {
        match value {
            Value::BulkString(b) => b,
            Value::SimpleString(s) => s.into_bytes(),
            Value::Int(i) => i.to_string().into_bytes(),
            _ => Vec::new(),
        }
    }
    let streams = match reply {
        // RESP2: [[key, entries]]; RESP3: {key: entries}.
        Value::Array(streams) => streams
            .into_iter()
            .filter_map(|s| match s {
                Value::Array(mut pair) if pair.len() == 2 => pair.pop(),
                _ => None,
            })
            .collect(),
        Value::Map(map) => map.into_iter().map(|(_, entries)| entries).collect(),
        _ => Vec::new(),
    };
    let mut out = Vec::new();
    for entries in streams {
        let Value::Array(entries) = entries else {
            continue;
        };
        for entry in entries {
            let Value::Array(mut parts) = entry else {
                continue;
            };
            if parts.len() != 2 {
                continue;
            }
            let fields = parts.pop().unwrap_or(Value::Nil);
            let id =
                String::from_utf8(bytes(parts.pop().unwrap_or(Value::Nil))).unwrap_or_default();
            let mut task = TaskEntry {
                id,
                attempt: 1,
                deleted: matches!(fields, Value::Nil),
                ..TaskEntry::default()
            };
            for (name, value) in pairs(fields) {
                match bytes(name).as_slice() {
                    b"s" => task.stop = true,
                    b"h" => {
                        let header = bytes(value);
                        let mut numbers = header
                            .split(|b| *b == b'.')
                            .map(|n| std::str::from_utf8(n).ok()?.parse::<u64>().ok());
                        let mut next = || numbers.next().flatten().unwrap_or_default();
                        task.call = next();
                        task.chunk = next();
                        task.attempt = u32::try_from(next()).unwrap_or(u32::MAX).max(1);
                        task.first_item = next();
                        task.done = next();
                        task.careful = next() == 1;
                    }
                    b"f" => task.function = String::from_utf8(bytes(value)).unwrap_or_default(),
                    b"p" => task.payload = bytes(value),
                    _ => {}
                }
            }
            out.push(task);
        }
    }
    out
}

/// Why a worker's loop ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerEnd {
    /// It read a stop entry.
    Stopped,
    /// It ran `maxtasksperchild` chunks.
    MaxTasks,
    /// The pool's state is gone from Redis (see [`super::is_state_lost`]): the worker exits
    /// with [`EXIT_POOL_GONE`].
    PoolGone,
    /// Its thread was asked to terminate.
    Terminated,
}

/// Runs a pool worker until it should stop. `Err` (exit code 1) when the initializer fails;
/// a store error when Redis stayed unreachable for the response timeout.
pub fn run_worker(store: &Arc<Store>, spec: &PoolWorkerSpec) -> Result<WorkerEnd> {
    let keys = PoolKeys::new(store.keys(), &spec.pool_id);
    let limit = store.settings().max_message_bytes;
    let in_hand: Arc<Mutex<InHand>> = Arc::default();
    // Dropping the sender ends the heartbeat thread at once (it waits on the channel between
    // beats rather than waking up to poll a flag).
    let (done, done_rx) = std::sync::mpsc::channel::<()>();
    // Started before the initializer: it is what ends a worker whose driver is gone, and an
    // initializer may run for long (nothing else would end a remote worker, nor a local one
    // whose driver froze, meanwhile).
    let heartbeat = {
        let store = store.clone();
        let keys = keys.clone();
        let spec = spec.clone();
        let in_hand = in_hand.clone();

        std::thread::Builder::new()
            .name("shoal-heartbeat".into())
            .spawn(move || heartbeat(&store, &keys, &spec, &in_hand, &done_rx))
            .map_err(|e| Error::io("starting the heartbeat thread", e))?
    };
    let result = spec
        .initializer
        .as_ref()
        .map_or(Ok(()), |init| run_initializer(init, limit))
        .and_then(|()| {
            // The tasks this thread runs see their call's cancellation through
            // termination_requested().
            let cancel = in_hand
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .cancelled
                .clone();
            context::set_task_cancel_flag(Some(cancel));
            serve(store, spec, &keys, &in_hand, limit)
        });
    context::set_task_cancel_flag(None);
    if context::in_thread_process() {
        // A worker thread of the driver ends here, not with a process (whose runtime runs the
        // exit hooks): what it made outside its tasks (an initializer's manager) ends with it.
        context::run_exit_hooks();
    }
    drop(done);
    let _ = heartbeat.join();
    let _ = store.with_conn(
        || "removing a worker's heartbeat".into(),
        |c| {
            redis::cmd("HDEL")
                .arg(&keys.workers)
                .arg(&spec.worker_id)
                .arg(running_field(&spec.worker_id))
                .query::<()>(c)
        },
    );
    result
}

fn run_initializer(init: &Initializer, limit: usize) -> Result<()> {
    let Some(function) = registry::lookup(&init.function) else {
        return Err(registry::unknown_here(&init.function));
    };
    registry::call(function, &init.args, limit)
        .and_then(registry::Returned::into_process_outcome)
        .map_err(|failure| {
            Error::from(shoal_core::TaskError {
                function: init.function.clone(),
                message: failure.message,
                kind: failure.kind,
                attempts: 1,
                item: None,
            })
        })
}

fn serve(
    store: &Store,
    spec: &PoolWorkerSpec,
    keys: &PoolKeys,
    in_hand: &Mutex<InHand>,
    limit: usize,
) -> Result<WorkerEnd> {
    let mut chunks_done: u64 = 0;
    let mut prefetch: usize = 1;
    // The outcomes of the last read's chunks: they go in the same round trip as the next read.
    let mut outgoing: Option<redis::Pipeline> = None;
    let send = |pipe: &redis::Pipeline| {
        // A resend after a lost reply may add an outcome twice; the supervisor keeps one.
        store.retry_unreachable(|| {
            store.with_conn(
                || format!("sending results to {}", keys.results),
                |c| pipe.query::<()>(c),
            )
        })
    };
    loop {
        // A cancellation concerns the chunks it was meant for, not the worker.
        in_hand
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .cancelled
            .store(false, Ordering::Release);
        if context::termination_requested() {
            if let Some(pipe) = outgoing.take() {
                send(&pipe)?;
            }
            return Ok(WorkerEnd::Terminated);
        }
        let count = match spec.maxtasksperchild {
            Some(max) => prefetch.min(max.saturating_sub(chunks_done).max(1) as usize),
            None => prefetch,
        };
        let mut pipe = outgoing.take().unwrap_or_else(redis::pipe);
        pipe.cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(&spec.worker_id)
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(READ_BLOCK.as_millis() as u64)
            .arg("STREAMS")
            .arg(&keys.tasks)
            .arg(">");
        // A read whose reply was lost may have been served: its chunks are then pending on this
        // worker, which does not know it has them (its heartbeat would not renew their lease,
        // and the supervisor would kill it once that lapsed). So a retry reads this worker's
        // own pending chunks instead (see `reading_pending`).
        let mut retry: Option<redis::Pipeline> = None;
        let mut attempts = 0u32;
        // One round trip: the last outcomes (if any), then the blocking read. A resend after a
        // lost reply may add those outcomes twice; the supervisor keeps one.
        let read = store.retry_unreachable(|| {
            attempts += 1;
            if attempts > 1 && retry.is_none() {
                retry = Some(reading_pending(&pipe, &spec.worker_id, count, &keys.tasks));
            }
            let pipe = retry.as_ref().unwrap_or(&pipe);
            store.with_blocking_conn(
                Some(READ_BLOCK),
                || format!("reading {}", keys.tasks),
                |c| pipe.query::<(redis::Value,)>(c),
            )
        });
        let reply = match read {
            Ok((reply,)) => reply,
            Err(e) if is_state_lost(&e) => return Ok(WorkerEnd::PoolGone),
            Err(e) => return Err(e),
        };
        let entries = parse_task_entries(reply);
        if entries.is_empty() {
            continue;
        }
        // A read that holds a chunk redelivered careful names each chunk before it runs it, so
        // that a death in it is charged to the right one (see `pool/requeue.lua`): one round
        // trip per chunk, only after a death that could not be charged.
        let careful = entries.iter().any(|e| e.careful && !e.stop && !e.deleted);
        let cancelled = {
            let mut hand = in_hand.lock().unwrap_or_else(|p| p.into_inner());
            hand.ids = entries.iter().map(|e| e.id.clone()).collect();
            hand.calls = entries
                .iter()
                .filter(|e| !e.stop && !e.deleted)
                .map(|e| e.call)
                .collect();
            hand.cancelled.store(false, Ordering::Release);
            hand.cancelled.clone()
        };
        let started = std::time::Instant::now();
        let mut stops = 0usize;
        let mut pipe = redis::pipe();
        let mut ids: Vec<&str> = Vec::with_capacity(entries.len());
        let mut reported: Vec<&str> = Vec::new();
        let mut outcomes: Vec<BatchedOutcome> = Vec::with_capacity(entries.len());
        let mut ran = 0u32;
        // When the chunk before took a while, the next one in hand asks first whether its call
        // was cancelled meanwhile (one round trip, under 1% of a chunk that long): a worker
        // that took many chunks while they were fast (its prefetch adapts to the last read)
        // starts none of a cancelled call's, instead of one more per heartbeat.
        let mut previous_start: Option<std::time::Instant> = None;
        for entry in &entries {
            ids.push(&entry.id);
            if entry.deleted {
                // Removed while pending (its call was cancelled and swept): acknowledged only.
                continue;
            }
            if entry.stop {
                stops += 1;
                continue;
            }
            let chunk = entry;
            if previous_start.is_some_and(|at| at.elapsed() >= CHECK_CANCELLED_FROM) {
                let cancelled = cancelled_among(store, keys, &[chunk.call]);
                if !cancelled.is_empty() {
                    in_hand
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .also_cancelled(&cancelled);
                }
            }
            if careful {
                name_running_chunk(store, keys, &spec.worker_id, &entry.id)?;
            }
            previous_start = Some(std::time::Instant::now());
            in_hand
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .start(chunk.call, &entry.id);
            let mut report = |offset: u64, outputs: &[u8]| {
                report_progress(store, keys, spec, chunk, offset, outputs)
            };
            // What the chunk's tasks make (a manager) is theirs, shut down at the batch's end;
            // what the initializer made lives as long as the worker.
            let task = context::enter_pool_task();
            let (outcome, offset, progressed) =
                run_chunk(chunk, &entry.payload, limit, &keys.tasks, &mut report);
            drop(task);
            if progressed {
                reported.push(&entry.id);
            }
            outcomes.push(BatchedOutcome {
                call: chunk.call,
                chunk: chunk.chunk,
                attempt: chunk.attempt,
                offset,
                outcome,
            });
            ran += 1;
        }
        let per_chunk = started.elapsed() / ran.max(1);
        // The outcomes and the acknowledgement of their chunks apply together or not at all: in
        // a plain pipeline a refused `XADD` (Redis at `maxmemory` refuses it, not `XACK`) would
        // leave its chunks acknowledged with their outcomes lost, and their calls waiting
        // forever. In `MULTI`/`EXEC` a refused command aborts the transaction: the chunks stay
        // pending, the pipeline fails, and the worker's exit has them redelivered. Two commands
        // more per read, in the same round trip; a read of stop entries only needs none.
        let transaction = !outcomes.is_empty();
        if transaction {
            pipe.cmd("MULTI").ignore();
        }
        add_outcomes(&mut pipe, store, keys, &spec.worker_id, outcomes)?;
        if !reported.is_empty() {
            pipe.hdel(&keys.progress, &reported).ignore();
        }
        // Acknowledged, not deleted: the supervisor trims what the workers are done with.
        pipe.xack(&keys.tasks, GROUP, &ids).ignore();
        if transaction {
            pipe.cmd("EXEC").ignore();
        }
        // One stop entry per worker: a read of several (its COUNT is the prefetch) keeps one
        // and puts the others back, for the workers still waiting for theirs.
        for _ in 1..stops {
            super::add_stop_entry(&mut pipe, &keys.tasks);
        }
        if ran > 0 {
            // The tasks ended: what they put on queues reaches Redis before their results, and
            // the next task starts with this process's queues open again (in a worker thread of
            // the driver, the hooks concern this thread only: see the module docs). Managers
            // the tasks made are shut down; those made outside a task (by the initializer) live
            // until the worker ends.
            context::run_pool_batch_end_hooks();
        }
        in_hand.lock().unwrap_or_else(|p| p.into_inner()).clear();
        if cancelled.swap(false, Ordering::AcqRel) {
            tracing::debug!(
                "pool worker {}: a call it ran was cancelled",
                spec.worker_id
            );
        }
        chunks_done += u64::from(ran);
        if stops > 0 {
            send(&pipe)?;
            return Ok(WorkerEnd::Stopped);
        }
        if spec.maxtasksperchild.is_some_and(|max| chunks_done >= max) {
            send(&pipe)?;
            return Ok(WorkerEnd::MaxTasks);
        }
        outgoing = Some(pipe);
        prefetch = next_prefetch(prefetch, per_chunk);
    }
}

/// The field of the pool's `workers` hash where `worker` names the chunk it runs in a careful
/// read (see `pool/requeue.lua`, which reads it).
fn running_field(worker: &str) -> String {
    format!("{worker}/running")
}

/// Names the chunk `id` as the one `worker` runs ([`running_field`]), before it runs it: one
/// round trip, retried while Redis cannot be reached (a worker that cannot name it does not run
/// it, and exits with the store's error).
fn name_running_chunk(store: &Store, keys: &PoolKeys, worker: &str, id: &str) -> Result<()> {
    let field = running_field(worker);
    store.retry_unreachable(|| {
        store.with_conn(
            || format!("naming the chunk {worker} runs in {}", keys.workers),
            |c| {
                redis::pipe()
                    .hset(&keys.workers, &field, id)
                    .ignore()
                    .expire(&keys.workers, store.expiry_secs() as i64)
                    .ignore()
                    .query::<()>(c)
            },
        )
    })
}

/// The pipeline `read` (the last outcomes, each reply ignored, then a read of new chunks) with
/// its read of new chunks replaced by a read of the chunks pending on `worker`, for a retry after
/// a lost reply: `XREADGROUP ... 0` gives the entries delivered to it and not acknowledged, without
/// blocking. The outcomes go again, since the lost attempt may not have been applied; the `XACK`
/// of their chunks comes before the read, so those are not among the pending ones, and what is
/// pending is what the lost read delivered (none if it was not served).
fn reading_pending(
    read: &redis::Pipeline,
    worker: &str,
    count: usize,
    tasks: &str,
) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    for cmd in read.cmd_iter().take(read.len().saturating_sub(1)) {
        pipe.add_command(cmd.clone()).ignore();
    }
    pipe.cmd("XREADGROUP")
        .arg("GROUP")
        .arg(GROUP)
        .arg(worker)
        .arg("COUNT")
        .arg(count)
        .arg("STREAMS")
        .arg(tasks)
        .arg("0");
    pipe
}

/// How many chunks to ask for after a read that took `per_chunk` per chunk with `prefetch`: as
/// many as fit in [`READ_BUDGET`], at most twice as many as before and at most
/// [`MAX_PREFETCH`], at least one.
fn next_prefetch(prefetch: usize, per_chunk: Duration) -> usize {
    let fit = READ_BUDGET.as_nanos() / per_chunk.as_nanos().max(1);
    usize::try_from(fit)
        .unwrap_or(usize::MAX)
        .clamp(1, (prefetch * 2).min(MAX_PREFETCH))
}

/// Chunks at least this long make the next chunk in hand check whether its call was cancelled
/// (one round trip: under 1% of their time; a default-chunksize map of trivial items, whose
/// chunks take a millisecond or two, does not pay it).
const CHECK_CANCELLED_FROM: Duration = Duration::from_millis(5);

/// The calls among `calls` that were cancelled (`SMISMEMBER`, one round trip); none when Redis
/// does not answer (the heartbeat will tell).
fn cancelled_among(store: &Store, keys: &PoolKeys, calls: &[u64]) -> Vec<u64> {
    let found = store.with_conn(
        || format!("checking {} for cancelled calls", keys.cancelled),
        |c| {
            redis::cmd("SMISMEMBER")
                .arg(&keys.cancelled)
                .arg(calls)
                .query::<Vec<bool>>(c)
        },
    );
    match found {
        Ok(found) => flagged(calls, &found),
        Err(_) => Vec::new(),
    }
}

/// The calls `SMISMEMBER` flagged as members (its replies in the order of `calls`).
fn flagged(calls: &[u64], members: &[bool]) -> Vec<u64> {
    calls
        .iter()
        .zip(members)
        .filter(|(_, member)| **member)
        .map(|(call, _)| *call)
        .collect()
}

/// The chunks a worker runs now, for its heartbeat: their entry ids (leases to renew), their
/// calls (to check for cancellation), the call of the chunk running now, and the flag that tells
/// the tasks. A read may hold chunks of several calls: only those of a cancelled call stop.
#[derive(Default)]
struct InHand {
    ids: Vec<String>,
    calls: Vec<u64>,
    /// The call whose chunk runs now.
    running: Option<u64>,
    /// The task-stream entry of the chunk that runs now, for the heartbeat's stamp (a cancel
    /// sweep kills only a worker that runs a chunk of the cancelled call, not one that merely
    /// holds one behind another call's).
    running_id: Option<String>,
    /// The calls in hand the heartbeat found cancelled.
    cancelled_calls: Vec<u64>,
    cancelled: Arc<AtomicBool>,
}

impl InHand {
    fn clear(&mut self) {
        self.ids.clear();
        self.calls.clear();
        self.running = None;
        self.running_id = None;
        self.cancelled_calls.clear();
    }

    /// The chunk `id` of `call` starts: the tasks see a cancellation only if it is that call's.
    fn start(&mut self, call: u64, id: &str) {
        self.running = Some(call);
        self.running_id = Some(id.to_string());
        self.cancelled
            .store(self.cancelled_calls.contains(&call), Ordering::Release);
    }

    /// A check before a chunk found these calls cancelled too.
    fn also_cancelled(&mut self, calls: &[u64]) {
        for call in calls {
            if !self.cancelled_calls.contains(call) {
                self.cancelled_calls.push(*call);
            }
        }
    }

    /// The heartbeat found these calls in hand cancelled.
    fn calls_cancelled(&mut self, calls: Vec<u64>) {
        if self.running.is_some_and(|running| calls.contains(&running)) {
            self.cancelled.store(true, Ordering::Release);
        }
        self.cancelled_calls = calls;
    }
}

/// Adds the final outcomes of the chunks of one read to `pipe`: one results entry for all of
/// them, or, when together they exceed the size limit, one entry per chunk (a chunk whose
/// outcome alone is too large fails with the reason).
fn add_outcomes(
    pipe: &mut redis::Pipeline,
    store: &Store,
    keys: &PoolKeys,
    worker: &str,
    outcomes: Vec<BatchedOutcome>,
) -> Result<()> {
    if outcomes.is_empty() {
        return Ok(());
    }
    if let Ok(batch) = store.encode(&outcomes, &keys.results) {
        let mut headers = String::with_capacity(outcomes.len() * 16);
        for (i, o) in outcomes.iter().enumerate() {
            use std::fmt::Write;
            let sep = if i == 0 { "" } else { "," };
            let _ = write!(
                headers,
                "{sep}{}.{}.{}.{}",
                o.call, o.chunk, o.attempt, o.offset
            );
        }
        pipe.cmd("XADD")
            .arg(&keys.results)
            .arg("*")
            .arg("w")
            .arg(worker)
            .arg("h")
            .arg(headers)
            .arg("b")
            .arg(batch)
            .ignore();
        return Ok(());
    }
    for o in outcomes {
        let encoded = store.encode(&o.outcome, &keys.results).or_else(|e| {
            let failed = ChunkOutcome::failed(
                0,
                TaskErrorKind::Error,
                format!("the chunk's results cannot be sent: {e}"),
            );
            store.encode(&failed, &keys.results)
        })?;
        pipe.cmd("XADD")
            .arg(&keys.results)
            .arg("*")
            .arg("c")
            .arg(o.call)
            .arg("k")
            .arg(o.chunk)
            .arg("a")
            .arg(o.attempt)
            .arg("w")
            .arg(worker)
            .arg("o")
            .arg(o.offset)
            .arg("p")
            .arg(encoded)
            .ignore();
    }
    Ok(())
}

/// Sends the results of a long chunk's items `offset..` (the array `outputs`) as a partial
/// outcome and records the chunk's progress, in one round trip.
fn report_progress(
    store: &Store,
    keys: &PoolKeys,
    spec: &PoolWorkerSpec,
    chunk: &TaskEntry,
    offset: u64,
    outputs: &[u8],
) -> Result<()> {
    let count = u64::from(shoal_core::codec::array_len(outputs).unwrap_or(0));
    let part = PartialOutcome {
        outputs: serde_bytes::Bytes::new(outputs),
        failure: None,
    };
    let encoded = store.encode(&part, &keys.results)?;
    store.with_conn(
        || format!("reporting progress to {}", keys.results),
        |c| {
            redis::pipe()
                .cmd("XADD")
                .arg(&keys.results)
                .arg("*")
                .arg("c")
                .arg(chunk.call)
                .arg("k")
                .arg(chunk.chunk)
                .arg("a")
                .arg(chunk.attempt)
                .arg("w")
                .arg(&spec.worker_id)
                .arg("o")
                .arg(offset)
                .arg("n")
                .arg(1)
                .arg("p")
                .arg(encoded)
                .ignore()
                .hset(&keys.progress, &chunk.id, offset + count)
                .ignore()
                .expire(&keys.progress, store.expiry_secs() as i64)
                .ignore()
                .query::<()>(c)
        },
    )
}

/// Runs a chunk's items in order, from the first one not done yet, until one fails. Every
/// [`PROGRESS_EVERY`], `report(offset, outputs)` sends the results gathered so far (one array;
/// on failure they go with the final outcome instead). Returns the final outcome, the offset in
/// the chunk of its first result, and whether progress was reported.
fn run_chunk(
    chunk: &TaskEntry,
    payload: &[u8],
    limit: usize,
    key: &str,
    report: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
) -> (ChunkOutcome, u64, bool) {
    let function = chunk.function.as_str();
    let mut offset = chunk.done;
    let fail =
        |index: u32, failure: Failure| ChunkOutcome::failed(index, failure.kind, failure.message);
    let Some(entry) = registry::lookup(function) else {
        let e = registry::unknown_here(function);
        return (fail(0, Failure::error(e)), offset, false);
    };
    let mut items = match ArrayReader::payload(payload, limit, || key.to_string()) {
        Ok(items) => items,
        Err(e) => return (fail(0, Failure::error(e)), offset, false),
    };
    let total = u64::from(items.remaining());
    for _ in 0..chunk.done.min(total) {
        if !items.skip() {
            let e = format!("{key}: the chunk's items are not valid MessagePack");
            return (fail(0, Failure::error(e)), offset, false);
        }
    }
    // The results of most functions take about as much room as their arguments.
    let mut outputs = ArrayWriter::with_capacity(payload.len());
    let mut progressed = false;
    let mut since_report = std::time::Instant::now();
    let mut report_after = FIRST_PROGRESS;
    let mut clock = ClockStride::default();
    let finish = |outputs: ArrayWriter, failure: Option<ItemFailure>| ChunkOutcome {
        outputs: ByteBuf::from(outputs.finish()),
        failure,
    };
    // The call was cancelled: the rest of the chunk, from item `index` on, does not run.
    let cancelled = |index: u64, offset: u64| ItemFailure {
        index: u32::try_from(index - offset).unwrap_or(u32::MAX),
        kind: TaskErrorKind::Error,
        message: "the call was cancelled".into(),
    };
    let first = chunk.done.min(total);
    if first < total && context::termination_requested() {
        return (
            finish(outputs, Some(cancelled(first, offset))),
            offset,
            progressed,
        );
    }
    for index in first..total {
        let failed_at = |offset: u64| u32::try_from(index - offset).unwrap_or(u32::MAX);
        if let Err(failure) = registry::call_element(entry, &mut items, &mut outputs, limit) {
            if failure.kind == TaskErrorKind::Panic {
                // The panic hook printed it; say which task it was.
                eprintln!(
                    "shoal: {function} panicked on item {} of the call",
                    chunk.first_item + index
                );
            }
            let failure = ItemFailure {
                index: failed_at(offset),
                kind: failure.kind,
                message: failure.message,
            };
            return (finish(outputs, Some(failure)), offset, progressed);
        }
        // Cancellation is looked at when the clock is read: after every slow item, every few
        // fast ones (it costs two thread-local reads, more than a trivial item).
        let Some(now) = (index + 1 < total).then(|| clock.due()).flatten() else {
            continue;
        };
        if context::termination_requested() {
            let failure = cancelled(index + 1, offset);
            return (finish(outputs, Some(failure)), offset, progressed);
        }
        if now.duration_since(since_report) >= report_after {
            // On failure the outputs stay here and go with the final outcome.
            let count = u64::from(outputs.len());
            match report(offset, outputs.as_finished()) {
                Ok(()) => {
                    offset += count;
                    outputs.clear();
                    progressed = true;
                }
                Err(e) => tracing::warn!("pool worker: {e}"),
            }
            since_report = std::time::Instant::now();
            report_after = PROGRESS_EVERY;
        }
    }
    (finish(outputs, None), offset, progressed)
}

/// How often a chunk's item loop reads the clock (and looks for a cancellation): after every
/// item while items are slow, and every few items (at most [`ClockStride::MAX`]) while they
/// take microseconds: for items of a few nanoseconds, reading the clock after each cost more
/// than the items. A progress report, or the stop of a cancelled chunk, is then late by at
/// most `MAX` items.
#[derive(Debug)]
struct ClockStride {
    every: u32,
    left: u32,
    last: std::time::Instant,
}

impl Default for ClockStride {
    fn default() -> Self {
        ClockStride {
            every: 1,
            left: 1,
            last: std::time::Instant::now(),
        }
    }
}

impl ClockStride {
    const MAX: u32 = 16;
    /// Items that take less than this in all (per stride) widen the stride.
    const FAST: Duration = Duration::from_micros(10);

    /// The time, when the clock is to be read after this item.
    fn due(&mut self) -> Option<std::time::Instant> {
        self.left -= 1;
        if self.left > 0 {
            return None;
        }
        let now = std::time::Instant::now();
        self.every = if now.duration_since(self.last) < Self::FAST {
            (self.every * 2).min(Self::MAX)
        } else {
            1
        };
        self.last = now;
        self.left = self.every;
        Some(now)
    }
}

/// A worker's stamp in the pool's `workers` hash: `<Unix ms>:<entry id of the chunk it runs>`
/// (nothing after the colon between chunks). `pool/cancel.lua` reads the entry id.
fn heartbeat_stamp(now_ms: u64, running: Option<&str>) -> String {
    format!("{now_ms}:{}", running.unwrap_or(""))
}

/// The worker's heartbeat thread: renews the lease of the chunks in hand, stamps the `workers`
/// hash and, when `spec.driver_ttl_ms` is set (a worker process: a thread must not end its
/// driver's process), ends the process once the driver is gone ([`EXIT_DRIVER_GONE`]) or, when
/// its renewal finds the task stream or its group gone, once the pool's state is
/// ([`EXIT_POOL_GONE`]: a chunk that runs for long would otherwise keep the worker from seeing
/// it, and the pool from breaking, until the chunk ends).
fn heartbeat(
    store: &Store,
    keys: &PoolKeys,
    spec: &PoolWorkerSpec,
    in_hand: &Mutex<InHand>,
    done: &std::sync::mpsc::Receiver<()>,
) {
    let lease = Duration::from_millis(spec.lease_ms);
    let driver_ttl = Duration::from_millis(spec.driver_ttl_ms);
    let watch_driver = spec.driver_ttl_ms > 0;
    let every = if watch_driver {
        driver_check_every(lease, driver_ttl)
    } else {
        (lease / 3).max(Duration::from_millis(10))
    };
    let worker = spec.worker_id.as_str();
    let mut driver_missing_since: Option<std::time::Instant> = None;
    loop {
        let (current, calls, stamp) = {
            let hand = in_hand.lock().unwrap_or_else(|p| p.into_inner());
            (
                hand.ids.clone(),
                hand.calls.clone(),
                heartbeat_stamp(now_ms(), hand.running_id.as_deref()),
            )
        };
        let beat = store.with_conn(
            || format!("heartbeat of {worker}"),
            |c| {
                let mut pipe = redis::pipe();
                // Was a call this worker runs cancelled? (SMISMEMBER needs one member at least.)
                pipe.cmd("SMISMEMBER")
                    .arg(&keys.cancelled)
                    .arg(if calls.is_empty() {
                        &[0u64][..]
                    } else {
                        &calls[..]
                    });
                pipe.hset(&keys.workers, worker, &stamp).ignore();
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
                pipe.exists(&keys.driver);
                pipe.query::<(Vec<bool>, bool)>(c)
            },
        );
        if let Ok((cancelled, _)) = &beat
            && !calls.is_empty()
            && cancelled.iter().any(|c| *c)
        {
            let cancelled_calls = flagged(&calls, cancelled);
            let mut hand = in_hand.lock().unwrap_or_else(|p| p.into_inner());
            // Still the chunks the beat asked about (not a later read's).
            if hand.calls == calls {
                hand.calls_cancelled(cancelled_calls);
            }
        }
        if let (true, Err(e)) = (watch_driver, &beat)
            && is_state_lost(e)
        {
            eprintln!(
                "shoal pool worker {worker}: {}; exiting",
                super::state_lost(keys)
            );
            std::process::exit(EXIT_POOL_GONE);
        }
        // Only an answer from Redis is evidence about the driver; an error is not.
        if let (true, Ok((_, driver_alive))) = (watch_driver, beat) {
            if driver_alive {
                driver_missing_since = None;
            } else {
                let since = *driver_missing_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() >= driver_ttl / 2 {
                    eprintln!(
                        "shoal pool worker {worker}: the driver of pool {} is gone; exiting",
                        spec.pool_id
                    );
                    std::process::exit(EXIT_DRIVER_GONE);
                }
            }
        }
        match done.recv_timeout(every) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            // The worker's loop ended (the sender was dropped).
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_chunks_of_a_cancelled_call_see_the_cancellation() {
        let mut hand = InHand {
            calls: vec![1, 2, 1],
            ..InHand::default()
        };
        let flag = hand.cancelled.clone();
        hand.start(1, "1-0");
        hand.calls_cancelled(vec![2]);
        assert!(
            !flag.load(Ordering::Acquire),
            "call 1 runs: call 2's cancel is not its"
        );
        hand.start(2, "2-0");
        assert!(
            flag.load(Ordering::Acquire),
            "call 2's chunk sees it at its start"
        );
        hand.start(1, "3-0");
        assert!(
            !flag.load(Ordering::Acquire),
            "and call 1's next chunk does not"
        );
        assert_eq!(
            heartbeat_stamp(5, hand.running_id.as_deref()),
            "5:3-0",
            "the stamp names the chunk that runs"
        );
        hand.calls_cancelled(vec![1, 2]);
        assert!(
            flag.load(Ordering::Acquire),
            "call 1 cancelled while it runs"
        );
        hand.clear();
        hand.start(1, "9-0");
        assert!(!flag.load(Ordering::Acquire), "a new read starts clear");
        // A check before a chunk found its call cancelled: that chunk sees it at its start.
        hand.also_cancelled(&[3]);
        hand.start(3, "9-0");
        assert!(flag.load(Ordering::Acquire));
        hand.start(1, "9-0");
        assert!(!flag.load(Ordering::Acquire));
    }
    use redis::Value;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn the_clock_is_read_less_often_while_items_are_fast() {
        let mut clock = ClockStride::default();
        let reads = (0..1000).filter(|_| clock.due().is_some()).count();
        // About every MAX items; the margin is for a thread preempted now and then.
        assert!(
            reads < 500,
            "fast items: the clock is read every few items ({reads} reads for 1000)"
        );
        assert!(clock.every <= ClockStride::MAX);
        // A slow item: the next stride is one item again.
        while clock.due().is_none() {}
        std::thread::sleep(Duration::from_millis(1));
        let mut items = 0;
        loop {
            items += 1;
            if clock.due().is_some() {
                break;
            }
        }
        assert!(items <= ClockStride::MAX as usize);
        assert_eq!(clock.every, 1, "slow items: the clock is read after each");
    }

    #[test]
    fn a_retried_read_sends_the_outcomes_again_and_reads_the_pending_chunks() {
        let mut read = redis::pipe();
        read.cmd("MULTI").ignore();
        read.cmd("XACK").arg("t").arg(GROUP).arg("1-0").ignore();
        read.cmd("EXEC").ignore();
        read.cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg("w1")
            .arg("COUNT")
            .arg(4)
            .arg("BLOCK")
            .arg(500)
            .arg("STREAMS")
            .arg("t")
            .arg(">");
        let retry = reading_pending(&read, "w1", 4, "t");
        let packed = |pipe: &redis::Pipeline| {
            pipe.cmd_iter()
                .map(|c| String::from_utf8_lossy(&c.get_packed_command()).into_owned())
                .collect::<Vec<_>>()
        };
        let (sent, again) = (packed(&read), packed(&retry));
        assert_eq!(again.len(), sent.len());
        assert_eq!(again[..3], sent[..3], "the outcomes go again");
        let last = &again[3];
        assert!(
            last.contains("XREADGROUP") && last.ends_with("$1\r\n0\r\n"),
            "{last}"
        );
        assert!(!last.contains("BLOCK"), "{last}");
    }

    #[test]
    fn a_read_takes_what_fits_in_its_budget() {
        let us = Duration::from_micros;
        assert_eq!(next_prefetch(1, us(10)), 2, "grows by doubling");
        assert_eq!(next_prefetch(32, us(10)), 64);
        assert_eq!(next_prefetch(64, us(10)), MAX_PREFETCH, "capped");
        assert_eq!(next_prefetch(64, us(500)), 4, "as many as fit in 2 ms");
        assert_eq!(
            next_prefetch(64, us(3000)),
            1,
            "expensive chunks: one at a time"
        );
        assert_eq!(next_prefetch(8, Duration::ZERO), 16);
    }

    #[test]
    fn task_entries_are_read_from_resp2_and_resp3_replies() {
        let chunk = Value::Array(vec![
            bulk("1-0"),
            Value::Array(vec![
                bulk("h"),
                bulk("7.3.2.30.4"),
                bulk("f"),
                bulk("app::f"),
                bulk("p"),
                Value::BulkString(vec![1, 0x90]),
            ]),
        ]);
        let stop = Value::Array(vec![bulk("1-1"), Value::Map(vec![(bulk("s"), bulk("1"))])]);
        let expected = vec![
            TaskEntry {
                id: "1-0".into(),
                stop: false,
                deleted: false,
                call: 7,
                chunk: 3,
                attempt: 2,
                function: "app::f".into(),
                first_item: 30,
                done: 4,
                careful: false,
                payload: vec![1, 0x90],
            },
            TaskEntry {
                id: "1-1".into(),
                stop: true,
                attempt: 1,
                ..TaskEntry::default()
            },
        ];
        let resp2 = Value::Array(vec![Value::Array(vec![
            bulk("tasks"),
            Value::Array(vec![chunk.clone(), stop.clone()]),
        ])]);
        assert_eq!(parse_task_entries(resp2), expected);
        let resp3 = Value::Map(vec![(bulk("tasks"), Value::Array(vec![chunk, stop]))]);
        assert_eq!(parse_task_entries(resp3), expected);
        assert!(
            parse_task_entries(Value::Nil).is_empty(),
            "a read that timed out"
        );
        // A chunk redelivered careful (`.1` after its header's five numbers).
        let careful = Value::Array(vec![Value::Array(vec![
            bulk("tasks"),
            Value::Array(vec![Value::Array(vec![
                bulk("1-3"),
                Value::Array(vec![bulk("h"), bulk("7.3.2.30.4.1")]),
            ])]),
        ])]);
        let parsed = parse_task_entries(careful);
        assert_eq!(parsed.len(), 1);
        assert!(parsed[0].careful);
        assert_eq!((parsed[0].attempt, parsed[0].done), (2, 4));
        // A read of the worker's own pending entries: one was deleted meanwhile.
        let pending = Value::Array(vec![Value::Array(vec![
            bulk("tasks"),
            Value::Array(vec![Value::Array(vec![bulk("1-2"), Value::Nil])]),
        ])]);
        assert_eq!(
            parse_task_entries(pending),
            vec![TaskEntry {
                id: "1-2".into(),
                deleted: true,
                attempt: 1,
                ..TaskEntry::default()
            }]
        );
    }
}
