//! Output streaming: a child's stdout and stderr through a Redis Stream.
//!
//! With `multiprocessing.stream_stdout: true`, the worker redirects its own file descriptors 1
//! and 2 into pipes ([`OutputCapture`]) and two forwarder threads append what they read to the
//! process's output stream (`shoal:{<ns>:proc:<id>}:output`) as entries `fd`=`1`|`2`,
//! `data`=bytes, one `XADD` per read. At the end of the task the worker flushes, puts the original
//! descriptors back (closing the pipes), waits for the forwarders and appends `eof`=`1`.
//!
//! A task that ends the process itself (`std::process::exit`, as Python's `sys.exit` in a child
//! still runs its `finally` and flushes) gets the same end: the capture is kept where an
//! `atexit` handler finds it, and the handler finishes it while the process exits, so what the
//! task printed last (and what sat in the pipes) reaches the stream before the process is gone.
//!
//! The parent reads the stream with `XREAD BLOCK` on a dedicated connection ([`OutputReader`])
//! and hands each entry to a printer thread (one per process), which writes it to the parent's
//! own stdout or stderr: a stdout that blocks (its lock held by another thread, a pipe nobody
//! reads) stops that thread only, never the actor thread the reader runs on (see
//! [`print_stream`]). A stream and not pub/sub: a reader that starts late replays everything,
//! and nothing is lost while nobody listens. The reader stops at `eof`, or, if the child died
//! without writing it, at the first empty read after the exit is known.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Once, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redis::streams::{StreamReadOptions, StreamReadReply};
use shoal_core::error::{Error, RedisContext, Result};
use shoal_core::store::Store;

/// How long the worker waits for its forwarders to drain at exit.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest chunk appended in one entry.
const CHUNK: usize = 64 * 1024;

/// The capture in progress, where the `atexit` handler ([`finish_at_exit`]) finds it.
static CAPTURE: Mutex<Option<OutputCapture>> = Mutex::new(None);

/// The worker side: fds 1 and 2 redirected into the output stream.
#[derive(Debug)]
pub struct OutputCapture {
    store: Arc<Store>,
    key: String,
    saved_stdout: OwnedFd,
    saved_stderr: OwnedFd,
    forwarders: Vec<JoinHandle<()>>,
    drained: mpsc::Receiver<()>,
}

impl OutputCapture {
    /// Redirects this process's stdout and stderr into the stream at `key` until [`OutputCapture::finish`] (or
    /// the process's exit) ends the capture. One capture per process: starting a second one
    /// while the first runs is an error.
    pub fn start(store: Arc<Store>, key: String) -> Result<()> {
        let mut current = CAPTURE.lock().unwrap_or_else(|e| e.into_inner());
        if current.is_some() {
            return Err(Error::invalid_state(
                "this process's output is already captured",
            ));
        }
        *current = Some(OutputCapture::redirect(store, key)?);
        drop(current);
        static AT_EXIT: Once = Once::new();
        AT_EXIT.call_once(|| {
            // SAFETY: `atexit` only records a function pointer; `finish_at_exit` is an
            // `extern "C" fn()` that lets no panic unwind out of it. A registration that fails
            // (a non-zero return) only leaves an exiting task's last output unforwarded.
            #[allow(unsafe_code)]
            let failed = unsafe { nix::libc::atexit(finish_at_exit) } != 0;
            if failed {
                tracing::warn!("cannot register the output capture's exit handler");
            }
        });
        Ok(())
    }

    fn redirect(store: Arc<Store>, key: String) -> Result<OutputCapture> {
        let io = |what: &str, e: std::io::Error| Error::io(format!("capturing output: {what}"), e);
        let saved_stdout = std::io::stdout()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| io("dup stdout", e))?;
        let saved_stderr = std::io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| io("dup stderr", e))?;
        let (out_read, out_write) = std::io::pipe().map_err(|e| io("pipe", e))?;
        let (err_read, err_write) = std::io::pipe().map_err(|e| io("pipe", e))?;
        let (drained_tx, drained) = mpsc::channel();
        let mut forwarders = Vec::new();
        for (fd, reader) in [(1u8, out_read), (2u8, err_read)] {
            let store = store.clone();
            let key = key.clone();
            let done = drained_tx.clone();
            forwarders.push(
                std::thread::Builder::new()
                    .name(format!("shoal-output-{fd}"))
                    .spawn(move || {
                        forward(reader, fd, &store, &key);
                        let _ = done.send(());
                    })
                    .map_err(|e| io("forwarder thread", e))?,
            );
        }
        std::io::stdout().flush().ok();
        nix::unistd::dup2_stdout(&out_write).map_err(|e| io("dup2 stdout", e.into()))?;
        nix::unistd::dup2_stderr(&err_write).map_err(|e| io("dup2 stderr", e.into()))?;
        Ok(OutputCapture {
            store,
            key,
            saved_stdout,
            saved_stderr,
            forwarders,
            drained,
        })
    }

    /// Ends this process's capture, if one runs: flushes, restores the original descriptors,
    /// waits for the forwarders and appends `eof`.
    pub fn finish() -> Result<()> {
        let capture = CAPTURE.lock().unwrap_or_else(|e| e.into_inner()).take();
        capture.map_or(Ok(()), OutputCapture::end)
    }

    /// Ends this process's capture, if one runs, without waiting for the forwarders or writing
    /// `eof`: for a worker that exits because Redis cannot be reached, whose output could not
    /// be forwarded anyway (the parent stops reading once it knows the exit). The original
    /// descriptors are put back, so what the worker prints from now on reaches them.
    pub fn abandon() {
        let capture = CAPTURE.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(capture) = capture {
            let _ = nix::unistd::dup2_stdout(&capture.saved_stdout);
            let _ = nix::unistd::dup2_stderr(&capture.saved_stderr);
        }
    }

    fn end(self) -> Result<()> {
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        let restore = |e: nix::Error| Error::io("restoring stdout/stderr", e.into());
        nix::unistd::dup2_stdout(&self.saved_stdout).map_err(restore)?;
        nix::unistd::dup2_stderr(&self.saved_stderr).map_err(restore)?;
        // A grandchild that inherited the pipe keeps it open; do not wait for it forever.
        let deadline = std::time::Instant::now() + DRAIN_TIMEOUT;
        for _ in 0..self.forwarders.len() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if self.drained.recv_timeout(left).is_err() {
                tracing::warn!("output forwarder did not drain within {DRAIN_TIMEOUT:?}");
                break;
            }
        }
        for forwarder in self.forwarders {
            if forwarder.is_finished() {
                let _ = forwarder.join();
            }
        }
        self.store.with_conn(
            || format!("closing output stream {}", self.key),
            |c| {
                redis::cmd("XADD")
                    .arg(&self.key)
                    .arg("*")
                    .arg("eof")
                    .arg(1)
                    .query::<()>(c)?;
                redis::cmd("EXPIRE")
                    .arg(&self.key)
                    .arg(self.store.expiry_secs())
                    .query::<()>(c)
            },
        )
    }
}

/// The `atexit` handler: a task that called `std::process::exit` (which flushes Rust's stdout
/// into the pipe first) still gets its output forwarded and its `eof` written. A capture that
/// ended as usual was taken already: nothing to do then.
extern "C" fn finish_at_exit() {
    // `try_lock`: an exit called while this process holds the lock (between taking the capture
    // and dropping the guard) must not wait on itself.
    let capture = match CAPTURE.try_lock() {
        Ok(mut current) => current.take(),
        Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner().take(),
        Err(std::sync::TryLockError::WouldBlock) => None,
    };
    if let Some(capture) = capture {
        let ended = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| capture.end()));
        if let Ok(Err(e)) = ended {
            eprintln!("shoal worker: forwarding the output at exit: {e}");
        }
    }
}

fn forward(mut reader: std::io::PipeReader, fd: u8, store: &Store, key: &str) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let result = store.with_conn(
            || format!("appending output to {key}"),
            |c| {
                let mut pipe = redis::pipe();
                pipe.cmd("XADD")
                    .arg(key)
                    .arg("*")
                    .arg("fd")
                    .arg(fd)
                    .arg("data")
                    .arg(&buf[..n])
                    .ignore();
                // In the same round trip; NX: a stream that has its TTL keeps it, one that was
                // deleted and is written again gets one.
                pipe.cmd("EXPIRE")
                    .arg(key)
                    .arg(store.expiry_secs())
                    .arg("NX")
                    .ignore();
                pipe.query::<()>(c)
            },
        );
        if result.is_err() {
            // The store is gone: keep draining so that the process never blocks on a full pipe.
            continue;
        }
    }
}

/// How long the printer may sit in one write (stdout's lock held by another thread, a full pipe
/// that nobody reads) before a reader whose child has exited stops waiting for it.
pub const PRINTER_STALL: Duration = Duration::from_secs(2);
/// How often a reader that waits for the printer checks whether it stalled.
const PRINTER_POLL: Duration = Duration::from_millis(100);
/// Jobs the printer holds before readers wait (with up to [`CHUNK`] bytes each).
const PRINTER_QUEUE: usize = 64;

/// A job of the printer thread.
enum PrintJob {
    /// Bytes for fd 1 or 2.
    Write(Chunk),
    /// Answer once everything given before was written and stdout flushed.
    Flushed(tokio::sync::oneshot::Sender<()>),
}

/// The printer thread's queue, started at first use.
static PRINTER: Mutex<Option<tokio::sync::mpsc::Sender<PrintJob>>> = Mutex::new(None);
/// When the write the printer is in began, in milliseconds after [`PRINTER_EPOCH`] plus one; 0
/// while it is not writing.
static PRINTER_WRITING_SINCE: AtomicU64 = AtomicU64::new(0);
static PRINTER_EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn printer_clock() -> u64 {
    u64::try_from(PRINTER_EPOCH.elapsed().as_millis())
        .unwrap_or(u64::MAX - 1)
        .saturating_add(1)
}

/// Whether the printer has been in one write for longer than [`PRINTER_STALL`].
fn printer_stalled() -> bool {
    let since = PRINTER_WRITING_SINCE.load(Ordering::Acquire);
    since != 0
        && printer_clock().saturating_sub(since)
            > u64::try_from(PRINTER_STALL.as_millis()).unwrap_or(u64::MAX)
}

/// The printer's queue, the thread started if it is not running; `None` if it cannot start.
fn printer() -> Option<tokio::sync::mpsc::Sender<PrintJob>> {
    let mut printer = PRINTER.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(jobs) = printer.as_ref().filter(|jobs| !jobs.is_closed()) {
        return Some(jobs.clone());
    }
    let (jobs, queue) = tokio::sync::mpsc::channel(PRINTER_QUEUE);
    let started = std::thread::Builder::new()
        .name("shoal-printer".into())
        .spawn(move || print_jobs(queue));
    match started {
        Ok(_) => {
            *printer = Some(jobs.clone());
            Some(jobs)
        }
        Err(e) => {
            tracing::warn!("cannot start the thread that prints children's output: {e}");
            None
        }
    }
}

/// The printer thread: writes what readers hand it to this process's stdout and stderr, in
/// order, holding their locks as it writes (so its bytes do not land in the middle of what
/// another thread prints). The only place children's output is written: a blocked stdout
/// (another thread holds its lock, a pipe nobody reads) stops this thread, never shoal's
/// actors.
fn print_jobs(mut queue: tokio::sync::mpsc::Receiver<PrintJob>) {
    while let Some(job) = queue.blocking_recv() {
        match job {
            PrintJob::Write(Chunk { fd, data }) => {
                PRINTER_WRITING_SINCE.store(printer_clock(), Ordering::Release);
                let _ = match fd {
                    2 => std::io::stderr().lock().write_all(&data),
                    _ => {
                        let mut stdout = std::io::stdout().lock();
                        stdout.write_all(&data).and_then(|()| stdout.flush())
                    }
                };
                PRINTER_WRITING_SINCE.store(0, Ordering::Release);
            }
            PrintJob::Flushed(done) => {
                let _ = done.send(());
            }
        }
    }
}

/// Hands `job` to the printer; waits while its queue is full, unless the child's exit is known
/// and the printer stalled (see [`PRINTER_STALL`]): false then, or if the printer is gone.
async fn hand_over(
    printer: &tokio::sync::mpsc::Sender<PrintJob>,
    job: PrintJob,
    exit_known: &AtomicBool,
) -> bool {
    loop {
        match tokio::time::timeout(PRINTER_POLL, printer.reserve()).await {
            Ok(Ok(permit)) => {
                permit.send(job);
                return true;
            }
            Ok(Err(_)) => return false,
            Err(_) if exit_known.load(Ordering::Acquire) && printer_stalled() => return false,
            Err(_) => {}
        }
    }
}

/// Waits until the printer wrote everything handed to it so far, unless the child's exit is
/// known and the printer stalled; returns whether it did.
async fn printed(printer: &tokio::sync::mpsc::Sender<PrintJob>, exit_known: &AtomicBool) -> bool {
    let (done, mut written) = tokio::sync::oneshot::channel();
    if !hand_over(printer, PrintJob::Flushed(done), exit_known).await {
        return false;
    }
    loop {
        match tokio::time::timeout(PRINTER_POLL, &mut written).await {
            Ok(answer) => return answer.is_ok(),
            Err(_) if exit_known.load(Ordering::Acquire) && printer_stalled() => return false,
            Err(_) => {}
        }
    }
}

/// Prints the output stream at `key` on this process's stdout and stderr until the child's
/// `eof`, or until a read made after `exit_known` was set finds nothing (a child that was killed
/// writes no `eof`), and returns once all of it was written. Used by a process's parent and by
/// a pool's supervisor for its workers; run it on the runtime that owns `store`'s connections.
///
/// The writes happen on a thread of their own (one for the whole process), never on the
/// caller's: this task only reads the stream and waits. Once the child's exit is known, it
/// waits for that thread only while it makes progress: when one write has been blocked for
/// [`PRINTER_STALL`] (another thread holds stdout's lock, or nobody reads a full pipe), it
/// returns without waiting for the rest (what it handed over is printed when stdout takes it;
/// what it had not read yet is not printed), so that the child's exit is still reported.
pub async fn print_stream(store: &Store, key: String, exit_known: &AtomicBool) {
    let block = Duration::from_millis(100);
    // A connection the store cannot give now is asked for again until the child's exit is
    // known: its output waits in the stream meanwhile.
    let mut conn = loop {
        let exited = exit_known.load(Ordering::Acquire);
        match store.dedicated(Some(block)).await {
            Ok(conn) => break conn,
            Err(e) if exited => {
                tracing::warn!("cannot print the output of {key}: {e}");
                return;
            }
            Err(e) => {
                tracing::debug!("printing the output of {key}: {e}; trying again");
                tokio::time::sleep(block).await;
            }
        }
    };
    let Some(printer) = printer() else {
        tracing::warn!("the output of {key} is not printed: no thread can print it");
        return;
    };
    let mut reader = OutputReader::new(key.clone());
    let stalled = || {
        tracing::warn!(
            "stdout or stderr took no output for {PRINTER_STALL:?}: the output of {key} may not \
             all be printed"
        );
    };
    loop {
        let exited = exit_known.load(Ordering::Acquire);
        match reader.read_once(&mut conn, block).await {
            Ok(read) => {
                let finished = read.finished;
                let idle = read.chunks.is_empty();
                for chunk in read.chunks {
                    if !hand_over(&printer, PrintJob::Write(chunk), exit_known).await {
                        return stalled();
                    }
                }
                if finished || (idle && exited) {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!("{e}");
                if exited {
                    break;
                }
                tokio::time::sleep(block).await;
            }
        }
    }
    if !printed(&printer, exit_known).await {
        stalled();
    }
}

/// The parent side: reads a child's output stream, for [`print_stream`] to print.
#[derive(Debug)]
pub struct OutputReader {
    key: String,
    last_id: String,
}

/// Bytes the child wrote on one of its descriptors.
#[derive(Debug, PartialEq, Eq)]
pub struct Chunk {
    /// 1 (stdout) or 2 (stderr).
    pub fd: u8,
    /// What it wrote.
    pub data: Vec<u8>,
}

/// What one read of the output stream found.
#[derive(Debug, PartialEq, Eq)]
pub struct ReadOutcome {
    /// What the child wrote, in order: empty when nothing arrived within the block time.
    pub chunks: Vec<Chunk>,
    /// The child wrote `eof`: nothing follows `chunks`.
    pub finished: bool,
}

impl OutputReader {
    /// A reader of the stream at `key`, from its beginning.
    pub fn new(key: String) -> Self {
        OutputReader {
            key,
            last_id: "0-0".into(),
        }
    }

    /// Reads what arrives within `block` (at most 100 entries). Prints nothing: the caller
    /// writes the chunks where it likes.
    pub async fn read_once(
        &mut self,
        conn: &mut (impl redis::aio::ConnectionLike + Send),
        block: Duration,
    ) -> Result<ReadOutcome> {
        let options = StreamReadOptions::default()
            .count(100)
            .block(block.as_millis().max(1) as usize);
        let reply: Option<StreamReadReply> = redis::cmd("XREAD")
            .arg(&options)
            .arg("STREAMS")
            .arg(&self.key)
            .arg(&self.last_id)
            .query_async(conn)
            .await
            .context(|| format!("reading output stream {}", self.key))?;
        let mut outcome = ReadOutcome {
            chunks: Vec::new(),
            finished: false,
        };
        for entry in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
            self.last_id = entry.id.clone();
            if entry.map.contains_key("eof") {
                outcome.finished = true;
                break;
            }
            let fd: Option<u8> = entry.get("fd");
            let data: Option<Vec<u8>> = entry.get("data");
            if let (Some(fd), Some(data)) = (fd, data) {
                outcome.chunks.push(Chunk { fd, data });
            }
        }
        Ok(outcome)
    }
}
