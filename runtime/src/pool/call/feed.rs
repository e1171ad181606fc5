//! A call's feeder: reads the caller's input (behind [`GuardedInput`]), encodes it into chunks
//! (a panicking `Serialize` caught as well, see [`push_item`]) and adds them to the task stream
//! in batches, within the call's window (see *Flow control* and *A failing input* in the module
//! docs of `call`).

use shoal_executor::pool::ChunksAdded;

use super::*;

/// Most chunks sent in one pipeline: a quarter of the call's window, within these bounds. Workers
/// blocked in `XREADGROUP` share a batch, each taking as many as it asks for.
pub(super) const MIN_BATCH: usize = 64;
pub(super) const MAX_BATCH: usize = 1024;
/// A batch is sent once its chunks hold this many bytes, however few they are: large chunks go
/// one by one, as soon as each is encoded, so that workers start on them while the next are.
const MAX_BATCH_BYTES: usize = 64 * 1024;

/// A feeder thread's stack: a main thread's usual 8 MiB (Linux's default `ulimit -s`), since
/// a blocking `map` called on the main thread encodes the same input there. Only the pages used
/// are resident.
const FEEDER_STACK: usize = 8 * 1024 * 1024;

/// What a feeder needs.
pub(crate) struct Feeder {
    pub(crate) store: Arc<Store>,
    pub(crate) keys: PoolKeys,
    pub(crate) call: u64,
    pub(crate) function: String,
    pub(crate) chunksize: usize,
    pub(crate) shared: Arc<CallShared>,
    pub(crate) supervisor: Addr<PoolSupervisor>,
    /// The supervisor's answer to the call's registration, awaited before the first chunk.
    pub(crate) registration: Option<Registration>,
}

impl Feeder {
    /// Sends the items (argument tuples) on a thread of their own.
    pub(crate) fn spawn<A, I>(self, items: I) -> Result<()>
    where
        A: Serialize,
        I: Iterator<Item = Result<A>> + Send + 'static,
    {
        std::thread::Builder::new()
            .name("shoal-feeder".into())
            // The caller's iterator and its items' `Serialize` run here: as much stack as a
            // main thread has (a blocking `map` reads the same input there), since an overflow
            // cannot be caught and would abort the program.
            .stack_size(FEEDER_STACK)
            .spawn(move || self.run(items))
            .map(|_| ())
            .map_err(|e| Error::io("starting a feeder thread", e))
    }

    /// Sends the items on this thread.
    pub(crate) fn run<A, I>(mut self, mut items: I)
    where
        A: Serialize,
        I: Iterator<Item = Result<A>>,
    {
        // A call the pool refused reads none of its input (the refusal ended it).
        if let Some(registration) = self.registration.take()
            && !registration.confirm()
        {
            return;
        }
        // The caller's code runs here (its iterator, behind `GuardedInput`, and its items'
        // `Serialize`, caught in `feed`): whatever else panics must still end the call, or its
        // caller and `join()` would wait forever for a feeder that is gone.
        let fed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.feed(&mut items)))
            .unwrap_or_else(|payload| {
                Err(Error::invalid_state(format!(
                    "the feeder of a call on {} panicked: {}",
                    self.keys.tasks,
                    panic_message(payload.as_ref())
                )))
            });
        match fed {
            Ok(Some((total, input_error))) => {
                self.shared.set_total(total, input_error.clone());
                self.supervisor.do_send(FeedDone {
                    call: self.call,
                    total: total as u64,
                    input_error,
                });
            }
            // Cancelled: the supervisor already knows.
            Ok(None) => {}
            Err(error) => self.supervisor.do_send(FeedFailed {
                call: self.call,
                error,
            }),
        }
    }

    /// Returns the number of chunks sent and the input's failure, if it failed part way; `None`
    /// when the call was cancelled; `Err` when Redis failed. Each chunk's items are encoded
    /// straight into its arguments array. The first chunk is sent alone, as soon as it is read,
    /// so that a worker starts on it while the next are encoded; batches then double up to a
    /// quarter of the window (64 to [`MAX_BATCH`] chunks, or [`MAX_BATCH_BYTES`]).
    fn feed<A, I>(&self, items: &mut I) -> Result<Option<(usize, Option<Error>)>>
    where
        A: Serialize,
        I: Iterator<Item = Result<A>>,
    {
        let limit = self.store.settings().max_message_bytes;
        let function = self.function.as_str();
        let mut chunk = 0usize;
        let mut input_error = None;
        let mut exhausted = false;
        let mut refreshed: Option<Instant> = None;
        let mut batch_size = 1;
        let batch_limit = self.shared.batch_limit();
        // Room for a chunk's arguments: as much as the last chunk took.
        let mut chunk_bytes = 0;
        while !exhausted {
            let Some(room) = self.shared.wait_for_room() else {
                return Ok(None);
            };
            let mut batch: Vec<ChunkEntry> = Vec::new();
            let mut batch_bytes = 0;
            while batch.len() < room.min(batch_size) && batch_bytes < MAX_BATCH_BYTES {
                // A call cancelled (or ended) while its batch is read takes no more input:
                // items read after cancel() returned must not run.
                if self.shared.is_cancelled() {
                    return Ok(None);
                }
                let mut args = ArrayWriter::payload_with_capacity(chunk_bytes);
                while (args.len() as usize) < self.chunksize {
                    match items.next() {
                        Some(Ok(item)) => {
                            if let Err(e) = push_item(&mut args, &item, limit, function) {
                                // The input ends here, as with an iterator that fails.
                                input_error = Some(e);
                                exhausted = true;
                                break;
                            }
                        }
                        Some(Err(e)) => {
                            input_error = Some(e);
                            exhausted = true;
                            break;
                        }
                        None => {
                            exhausted = true;
                            break;
                        }
                    }
                }
                if args.is_empty() {
                    break;
                }
                if args.byte_len() > limit {
                    return Err(Error::TooLarge {
                        key: self.keys.tasks.clone(),
                        size: args.byte_len(),
                        limit,
                    });
                }
                batch_bytes += args.byte_len();
                chunk_bytes = args.byte_len();
                batch.push(ChunkEntry {
                    call: self.call,
                    chunk: chunk as u64,
                    function: self.function.clone(),
                    payload: args.finish(),
                    first_item: (chunk as u64).saturating_mul(self.chunksize as u64),
                });
                chunk += 1;
                if exhausted {
                    break;
                }
            }
            if batch.is_empty() {
                break;
            }
            // Nor is a batch written once its call was cancelled or ended meanwhile (after a
            // terminate, the write would find the task stream deleted, and fail the call). A
            // cancel that lands between this check and the write is the script's to see: it
            // adds nothing for a call in the cancelled set.
            if self.shared.is_cancelled() {
                return Ok(None);
            }
            self.shared.reserve(batch.len());
            // The streams' TTL is refreshed at most once a second, not per batch.
            let refresh = refreshed.is_none_or(|t| t.elapsed() >= TTL_REFRESH);
            if send_chunks(&self.store, &self.keys, &batch, refresh)? == ChunksAdded::Cancelled {
                // Cancelled in Redis: the supervisor that cancelled it ended the call.
                return Ok(None);
            }
            if refresh {
                refreshed = Some(Instant::now());
            }
            batch_size = (batch_size * 2).min(batch_limit);
        }
        Ok(Some((chunk, input_error)))
    }
}

/// Encodes one item (an argument tuple) into its chunk's array. The item's `Serialize` is the
/// caller's code: a panic in it fails this item with [`Error::Input`] (what was written of it
/// is removed), as a panic in the input's iterator does, instead of killing the feeder thread.
fn push_item<A: Serialize>(
    args: &mut ArrayWriter,
    item: &A,
    limit: usize,
    function: &str,
) -> Result<()> {
    let mark = args.mark();
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        args.push(item, limit, || format!("arguments of {function}"))
    })) {
        Ok(pushed) => pushed,
        Err(payload) => {
            args.rewind(mark);
            Err(Error::Input(format!(
                "encoding an item's arguments for {function} panicked: {}",
                panic_message(payload.as_ref())
            )))
        }
    }
}

/// The caller's input, read so that a panic in its iterator ends the input with
/// [`Error::Input`] instead of killing the thread that reads it. Nothing is read after a
/// failure.
pub(crate) struct GuardedInput<I> {
    inner: I,
    failed: bool,
}

impl<I> GuardedInput<I> {
    pub(crate) fn new(inner: I) -> Self {
        GuardedInput {
            inner,
            failed: false,
        }
    }
}

impl<I: Iterator> Iterator for GuardedInput<I> {
    type Item = Result<I::Item>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.inner.next())) {
            Ok(item) => item.map(Ok),
            Err(payload) => {
                self.failed = true;
                Some(Err(Error::Input(format!(
                    "its iterator panicked: {}",
                    panic_message(payload.as_ref())
                ))))
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        if self.failed {
            (0, Some(0))
        } else {
            self.inner.size_hint()
        }
    }
}

/// How often a feeder refreshes the streams' TTL.
const TTL_REFRESH: Duration = Duration::from_secs(1);

/// The least time the script that adds chunks keeps its record of a call's last chunk added.
const REMEMBER_AT_LEAST: Duration = Duration::from_secs(60);

/// How long the script that adds chunks keeps its record of a call's last chunk added (at
/// least; see [`shoal_executor::pool::chunks_invocation`]), in seconds: longer than a batch can
/// be sent again. [`Store::retry_unreachable`] sends it again only within the response timeout
/// of the first failed send, and each send waits for its reply at most that long: so every
/// send of a batch reaches Redis within about twice the response timeout of the first. Four
/// times that, and a minute at least.
fn remember_secs(store: &Store) -> u64 {
    store
        .settings()
        .response_timeout
        .saturating_mul(4)
        .max(REMEMBER_AT_LEAST)
        .as_secs_f64()
        .ceil() as u64
}

/// Sends chunks, all of one call, in one script (`EVALSHA`, one round trip), refreshing the
/// streams' TTL if asked, unless their call was cancelled: the script checks the call's mark in
/// the cancelled set atomically with the writes (see
/// [`shoal_executor::pool::chunks_invocation`]), so a chunk written after its call's cancel is
/// never run, whatever the writer saw of the cancel before it sent. When Redis cannot be reached
/// the send is repeated (see `Store::retry_unreachable`); a send whose reply was lost may have
/// been run, and the script adds a batch once however often it is sent (it records the last
/// chunk of the call it added): so a chunk is never added twice, and never runs twice.
/// That takes one writer per call that sends its chunks in order of their index, consecutive in
/// a batch, a batch only once the one before was answered: a call's feeder (`map`, `imap`, the
/// `_async` forms: one thread per call, [`Feeder::feed`]) and an `apply_async`'s one chunk
/// (chunk 0, sent once by the pool's task writer) do. The chunks are added in one atomic step: a
/// worker blocked in `XREADGROUP` is then served once, with as many of them as it asked for,
/// rather than once per chunk (which would cost a read and an acknowledgement per chunk when
/// many workers wait).
pub(crate) fn send_chunks(
    store: &Store,
    keys: &PoolKeys,
    chunks: &[ChunkEntry],
    refresh_ttl: bool,
) -> Result<ChunksAdded> {
    let invocation = shoal_executor::pool::chunks_invocation(
        keys,
        chunks,
        refresh_ttl.then(|| store.expiry_secs()),
        remember_secs(store),
    )?;
    store.retry_unreachable(|| {
        store
            .with_conn(
                || format!("sending chunks to {}", keys.tasks),
                // The reply is nil when the task stream is gone (the pool's state was lost),
                // which fails the call rather than leaving it to wait for a worker.
                |c| invocation.invoke::<Option<i64>>(c),
            )
            .and_then(|reply| shoal_executor::pool::chunks_added(keys, reply))
    })
}
