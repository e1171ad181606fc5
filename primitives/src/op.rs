//! One operation of a primitive as a sequence of round trips, shared by its blocking and its
//! async form.
//!
//! An [`Operation`] is a small state machine: it says which request to send next
//! ([`Step::Next`]) and decides from each reply what comes after, until it is done
//! ([`Step::Done`]). It does no I/O itself, so the scripts, the keys, the slicing of waits and
//! every decision are written once; two drivers run it:
//!
//! * [`run`]: on the caller's thread, with the store's pooled synchronous connections (the
//!   blocking API);
//! * [`spawn`]: as a task on shoal's actor runtime, with that runtime's async connections (a
//!   shared multiplexed one, dedicated ones for blocking commands), handing the result back to
//!   the caller's future through a oneshot channel (the async API; see `shoal_core::actors`).
//!
//! Cancellation of the async form: before each blocking request (a wait slice of at most
//! [`SLICE`](crate::common::SLICE)) and each request an operation marks
//! ([`Request::abandon_point`]), the async driver checks whether the caller's future is
//! still there. If it is not, the operation is asked to [`Operation::abandon`], which gives up
//! the way a timeout does (leaving the waiters' queue atomically, passing on a wake-up it
//! consumed); a blocking command is never dropped client-side (Redis rule 6). A result that the
//! caller never takes (its future dropped during the last round trip, or after the answer
//! arrived) is undone by the undo given to [`spawn`].

use std::sync::Arc;
use std::time::Duration;

use redis::Value;
use shoal_core::actors::{AsyncCall, BoxFuture};
use shoal_core::context;
use shoal_core::error::{Error, Result};
use shoal_core::store::{AsyncStore, Store};

/// One round trip an operation asks for.
pub(crate) struct Request {
    /// What it does, for errors ("acquiring", "waiting for"); the operation's
    /// [`Operation::describe`] follows.
    what: &'static str,
    kind: Kind,
    /// The async driver asks the operation to [`Operation::abandon`] before sending this when
    /// the caller left (as before every blocking request): see [`Request::abandon_point`].
    abandon_point: bool,
}

enum Kind {
    Script(redis::ScriptInvocation<'static>),
    Cmd(redis::Cmd),
    Pipe(redis::Pipeline),
    /// A blocking command carrying Redis's own timeout `block` (a dedicated connection).
    Blocking {
        cmd: redis::Cmd,
        block: Duration,
    },
    /// A pipeline whose last command blocks, carrying Redis's own timeout `block` (a dedicated
    /// connection); the reply is the pipeline's (the values of the commands not ignored).
    BlockingPipe {
        pipe: redis::Pipeline,
        block: Duration,
    },
    /// A script and a blocking command written behind it on one connection (one round trip);
    /// the reply is `[script's reply, blocking command's reply]`, or the script's error.
    ScriptThenBlocking {
        invocation: redis::ScriptInvocation<'static>,
        cmd: redis::Cmd,
        block: Duration,
    },
    /// A blocking command that moves an element into a list of the caller's own, and the
    /// command behind it that takes it from there, written together (one round trip, a
    /// dedicated connection); the reply is the second command's. On the synchronous driver the
    /// second reply is read even when a stop signal interrupted the read of the first (see
    /// `shoal_core::error::is_interrupted`): what the wait took is not lost with its reply.
    MoveThenTake {
        wait: redis::Cmd,
        take: redis::Cmd,
        block: Duration,
    },
    /// Code that may block for long (a barrier's action): run off the async runtime's thread.
    Local(Box<dyn FnOnce() -> Result<Value> + Send>),
}

impl Request {
    fn of(what: &'static str, kind: Kind) -> Self {
        Request {
            what,
            kind,
            abandon_point: false,
        }
    }

    /// This request, before which the async driver asks the operation to
    /// [`Operation::abandon`] if its caller left (a step that would make something the caller's
    /// that is better given back, as an item's claim). Blocking requests are such points
    /// already.
    pub(crate) fn abandon_point(mut self) -> Self {
        self.abandon_point = true;
        self
    }

    /// Whether the async driver checks for a departed caller before sending this.
    fn may_abandon(&self) -> bool {
        self.abandon_point
            || matches!(
                self.kind,
                Kind::Blocking { .. } | Kind::BlockingPipe { .. } | Kind::MoveThenTake { .. }
            )
    }

    /// A pipeline that ends with a blocking command whose own timeout is `block` (at most a
    /// slice), on one connection: one round trip.
    pub(crate) fn blocking_pipe(
        what: &'static str,
        pipe: redis::Pipeline,
        block: Duration,
    ) -> Self {
        Request::of(what, Kind::BlockingPipe { pipe, block })
    }

    /// `wait`, a blocking command whose own timeout is `block` that moves an element into a
    /// list only this request uses (`BLMOVE inbox landing`), then `take`, which takes it from
    /// there (`LPOP landing`): the reply is `take`'s, and it survives a wait whose read a stop
    /// signal interrupted.
    pub(crate) fn move_then_take(
        what: &'static str,
        wait: redis::Cmd,
        take: redis::Cmd,
        block: Duration,
    ) -> Self {
        Request::of(what, Kind::MoveThenTake { wait, take, block })
    }

    /// A script.
    pub(crate) fn script(what: &'static str, invocation: redis::ScriptInvocation<'static>) -> Self {
        Request::of(what, Kind::Script(invocation))
    }

    /// An ordinary command.
    pub(crate) fn cmd(what: &'static str, cmd: redis::Cmd) -> Self {
        Request::of(what, Kind::Cmd(cmd))
    }

    /// A pipeline.
    pub(crate) fn pipe(what: &'static str, pipe: redis::Pipeline) -> Self {
        Request::of(what, Kind::Pipe(pipe))
    }

    /// A blocking command whose own timeout is `block` (at most a slice).
    pub(crate) fn blocking(what: &'static str, cmd: redis::Cmd, block: Duration) -> Self {
        Request::of(what, Kind::Blocking { cmd, block })
    }

    /// A script, then a blocking command whose own timeout is `block`, written together on one
    /// connection: one round trip (a waiter's arrival and its wait). The reply is the array
    /// `[script's reply, command's reply]`; when the script fails, its error (the command's reply
    /// is then read and dropped: the command must take nothing unless the script ran, as a wait
    /// on a wake key that only the script registers). After `NOSCRIPT` (nothing ran) the script
    /// is loaded and both are written again, so keep `block` short
    /// ([`PIPELINED_SLICE`](crate::common::PIPELINED_SLICE)): a wait whose script was not there
    /// waits it out first.
    pub(crate) fn script_then_blocking(
        what: &'static str,
        invocation: redis::ScriptInvocation<'static>,
        cmd: redis::Cmd,
        block: Duration,
    ) -> Self {
        Request::of(
            what,
            Kind::ScriptThenBlocking {
                invocation,
                cmd,
                block,
            },
        )
    }

    /// `BLPOP key` as a command, waiting at most `block` (Redis's own timeout).
    pub(crate) fn blpop_cmd(key: &str, block: Duration) -> redis::Cmd {
        let mut cmd = redis::cmd("BLPOP");
        cmd.arg(key).arg(crate::common::blpop_seconds(block));
        cmd
    }

    /// Takes the head of the list `key`, waiting at most `block` (Redis's own timeout): the
    /// reply is the element, or nil. As a `BLPOP` would, but the wait moves the element into a
    /// list of the key's own (`<key>:landing`) and an `LPOP` written behind it takes it (see
    /// [`Request::move_then_take`]): a wait whose read a stop signal interrupted still gets
    /// it. Only one waiter may wait on `key` at a time (a waiter's own wake key).
    pub(crate) fn pop_wake_up(key: &str, block: Duration) -> Self {
        let landing = format!("{key}:landing");
        let mut wait = redis::cmd("BLMOVE");
        wait.arg(key)
            .arg(&landing)
            .arg("LEFT")
            .arg("RIGHT")
            .arg(crate::common::blpop_seconds(block));
        let mut take = redis::cmd("LPOP");
        take.arg(&landing);
        Request::move_then_take("waiting for", wait, take, block)
    }

    /// Code that may block (user code); its result is the reply.
    pub(crate) fn local(
        what: &'static str,
        f: impl FnOnce() -> Result<Value> + Send + 'static,
    ) -> Self {
        Request::of(what, Kind::Local(Box::new(f)))
    }
}

/// What an operation does next.
pub(crate) enum Step<T> {
    /// Send this request and pass its reply to [`Operation::reply`].
    Next(Request),
    /// Finished.
    Done(Result<T>),
}

impl<T> Step<T> {
    /// This step, or what `f` makes of the result once done (an operation that runs another
    /// one inside).
    pub(crate) fn then<U>(self, f: impl FnOnce(Result<T>) -> Step<U>) -> Step<U> {
        match self {
            Step::Next(request) => Step::Next(request),
            Step::Done(result) => f(result),
        }
    }
}

/// An operation of a primitive as a state machine (see the module docs).
pub(crate) trait Operation {
    /// What it produces.
    type Output;

    /// The primitive, for errors (`lock 1a2b3c4d`).
    fn describe(&self) -> String;

    /// The first step.
    fn start(&mut self, store: &Store) -> Step<Self::Output>;

    /// The step after the reply to the last request.
    fn reply(&mut self, store: &Store, reply: Result<Value>) -> Step<Self::Output>;

    /// The caller of the async form is gone: give up as a timeout would, undoing what can be.
    /// Called at most once, before a blocking request (or one marked
    /// [`Request::abandon_point`]). By default: stop now (nothing was taken and nothing waits in
    /// Redis on the caller's behalf).
    fn abandon(&mut self, _store: &Store) -> Step<Self::Output> {
        Step::Done(Err(abandoned()))
    }
}

/// The result of an operation whose caller left (never seen by anyone).
pub(crate) fn abandoned() -> Error {
    Error::invalid_state("the caller stopped waiting")
}

/// Parses a reply as `T`; a reply of another shape is an error naming `what`.
pub(crate) fn parse<T: redis::FromRedisValue>(reply: Result<Value>, what: &str) -> Result<T> {
    let value = reply?;
    redis::from_redis_value(value).map_err(|e| Error::redis(what.to_string(), e.into()))
}

/// Runs `op` on the caller's thread with the store's synchronous connections.
pub(crate) fn run<O: Operation>(store: &Store, op: &mut O) -> Result<O::Output> {
    let mut step = op.start(store);
    loop {
        match step {
            Step::Done(result) => return result,
            Step::Next(request) => {
                let reply = exec(store, request, || op.describe());
                step = op.reply(store, reply);
            }
        }
    }
}

/// Sends one request on a synchronous connection.
fn exec(store: &Store, request: Request, describe: impl FnOnce() -> String) -> Result<Value> {
    let what = request.what;
    let context = || format!("{what} {}", describe());
    match request.kind {
        Kind::Script(invocation) => store.with_conn(context, |c| invocation.invoke(c)),
        Kind::Cmd(cmd) => store.with_conn(context, |c| cmd.query(c)),
        Kind::Pipe(pipe) => store.with_conn(context, |c| pipe.query(c)),
        Kind::Blocking { cmd, block } => {
            store.with_blocking_conn(Some(block), context, |c| cmd.query(c))
        }
        Kind::BlockingPipe { pipe, block } => {
            store.with_blocking_conn(Some(block), context, |c| pipe.query(c))
        }
        Kind::MoveThenTake { wait, take, block } => {
            store.with_blocking_conn(Some(block), context, |c| {
                let mut pipe = redis::pipe();
                pipe.add_command(wait).add_command(take);
                c.send_packed_command(&pipe.get_packed_pipeline())?;
                let waited = match c.recv_response() {
                    // redis-rs skips the wait's reply when it comes: the next read is the
                    // take's, which holds what the wait moved.
                    Err(e) if shoal_core::error::is_interrupted(&e) => Value::Nil,
                    other => other?,
                };
                let taken = c.recv_response()?;
                waited.extract_error()?;
                taken.extract_error()
            })
        }
        Kind::ScriptThenBlocking {
            invocation,
            cmd,
            block,
        } => store.with_blocking_conn(Some(block), context, |c| {
            let pipe = script_then(&invocation, cmd);
            // Both replies are read before an error is returned: the connection stays in step.
            let replies = pipe.query(c)?;
            let replies = match script_replies(replies) {
                Err(e) if is_no_script(&e) => {
                    invocation.load(c)?;
                    script_replies(pipe.query(c)?)
                }
                other => other,
            };
            replies.map(|(script, waited)| Value::Array(vec![script, waited]))
        }),
        Kind::Local(f) => f(),
    }
}

fn is_no_script(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
}

/// A script's call and a command behind it, as one pipeline whose error replies are values
/// (read with [`script_replies`]).
fn script_then(invocation: &redis::ScriptInvocation<'static>, cmd: redis::Cmd) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.ignore_errors()
        .invoke_script(invocation)
        .add_command(cmd);
    pipe
}

/// The replies of a [`script_then`] pipeline; the first error reply (the script's first) as
/// an error, with its code.
fn script_replies((script, waited): (Value, Value)) -> redis::RedisResult<(Value, Value)> {
    Ok((script.extract_error()?, waited.extract_error()?))
}

/// Sends one request on the async connections of the actor runtime.
async fn exec_async(
    store: &AsyncStore,
    request: Request,
    describe: impl Fn() -> String,
) -> Result<Value> {
    let what = request.what;
    let context = || format!("{what} {}", describe());
    match request.kind {
        Kind::Script(invocation) => {
            let mut conn = store.shared().await?;
            invocation
                .invoke_async(&mut conn)
                .await
                .map_err(|e| Error::redis(context(), e))
        }
        Kind::Cmd(cmd) => {
            let mut conn = store.shared().await?;
            cmd.query_async(&mut conn)
                .await
                .map_err(|e| Error::redis(context(), e))
        }
        Kind::Pipe(pipe) => {
            let mut conn = store.shared().await?;
            pipe.query_async(&mut conn)
                .await
                .map_err(|e| Error::redis(context(), e))
        }
        Kind::Blocking { cmd, block } => store.blocking(block, context, &cmd).await,
        Kind::BlockingPipe { pipe, block } => store.blocking_pipe(block, context, &pipe).await,
        Kind::MoveThenTake { wait, take, block } => {
            let mut pipe = redis::pipe();
            pipe.add_command(wait).ignore().add_command(take);
            let (taken,): (Value,) = store.blocking_pipe(block, context, &pipe).await?;
            Ok(taken)
        }
        Kind::ScriptThenBlocking {
            invocation,
            cmd,
            block,
        } => {
            let pipe = script_then(&invocation, cmd);
            let replies = store.blocking_pipe(block, &context, &pipe).await?;
            let replies = match script_replies(replies) {
                Err(e) if is_no_script(&e) => {
                    let mut conn = store.shared().await?;
                    invocation
                        .load_async(&mut conn)
                        .await
                        .map_err(|e| Error::redis(context(), e))?;
                    script_replies(store.blocking_pipe(block, &context, &pipe).await?)
                }
                other => other,
            };
            replies
                .map(|(script, waited)| Value::Array(vec![script, waited]))
                .map_err(|e| Error::redis(context(), e))
        }
        Kind::Local(f) => tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
            Err(Error::invalid_state(format!(
                "{}: the code it ran did not finish: {e}",
                context()
            )))
        }),
    }
}

/// Runs `op` on the actor runtime's connections; `gone` tells whether the caller left.
async fn run_async<O: Operation>(
    store: &AsyncStore,
    op: &mut O,
    gone: impl Fn() -> bool,
) -> Result<O::Output> {
    let mut abandoned = false;
    // Described once (the driver's future must not hold a borrow of `op` across an await).
    let describe = op.describe();
    let mut step = op.start(store.store());
    loop {
        match step {
            Step::Done(result) => return result,
            Step::Next(request) => {
                if !abandoned && request.may_abandon() && gone() {
                    abandoned = true;
                    step = op.abandon(store.store());
                    continue;
                }
                let reply = exec_async(store, request, || describe.clone()).await;
                step = op.reply(store.store(), reply);
            }
        }
    }
}

/// What undoes an operation's result that its caller never took.
pub(crate) type Undo<T> = Box<dyn FnOnce(Arc<AsyncStore>, T) -> BoxFuture + Send>;

/// Runs `op` as a task on the actor runtime (see the module docs); the future resolves to its
/// result. `undo` undoes a result the caller never takes.
pub(crate) fn spawn<O>(mut op: O, undo: Option<Undo<O::Output>>) -> AsyncCall<O::Output>
where
    O: Operation + Send + 'static,
    O::Output: Send + 'static,
{
    let context = match context::current() {
        Ok(context) => context,
        Err(e) => return AsyncCall::failed(e),
    };
    context.spawn(move |store, caller| async move {
        let result = run_async(&store, &mut op, || caller.is_gone()).await;
        match (result, undo) {
            (Ok(value), Some(undo)) => {
                caller.hand_over(value, move |value| undo(store, value));
            }
            (result, _) => caller.finish(result),
        }
    })
}

/// Sends one request from a task of the actor runtime (an undo): its reply.
pub(crate) async fn exec_single_async(
    store: &AsyncStore,
    describe: impl Fn() -> String,
    request: Request,
) -> Result<Value> {
    exec_async(store, request, describe).await
}

/// Sends one request from a task of the actor runtime (an undo), logging a failure.
pub(crate) async fn undo_request(
    store: &AsyncStore,
    describe: impl Fn() -> String,
    request: Request,
) {
    if let Err(e) = exec_async(store, request, describe).await {
        tracing::error!("undoing the result of a dropped async call: {e}");
    }
}

/// An operation of one round trip: a request and how its reply is read. `D` describes the
/// primitive for errors (called only on an error).
pub(crate) struct Single<T, D, F> {
    describe: D,
    request: Option<Request>,
    parse: Option<F>,
    _output: std::marker::PhantomData<fn() -> T>,
}

impl<T, D: Fn() -> String, F: FnOnce(Result<Value>) -> Result<T>> Single<T, D, F> {
    /// `request` for the primitive `describe`d, its reply read by `parse`.
    pub(crate) fn new(describe: D, request: Request, parse: F) -> Self {
        Single {
            describe,
            request: Some(request),
            parse: Some(parse),
            _output: std::marker::PhantomData,
        }
    }
}

impl<T, D: Fn() -> String, F: FnOnce(Result<Value>) -> Result<T>> Operation for Single<T, D, F> {
    type Output = T;

    fn describe(&self) -> String {
        (self.describe)()
    }

    fn start(&mut self, _: &Store) -> Step<T> {
        match self.request.take() {
            Some(request) => Step::Next(request),
            None => Step::Done(Err(Error::invalid_state("a request was started twice"))),
        }
    }

    fn reply(&mut self, _: &Store, reply: Result<Value>) -> Step<T> {
        match self.parse.take() {
            Some(parse) => Step::Done(parse(reply)),
            None => Step::Done(Err(Error::invalid_state("a reply came twice"))),
        }
    }
}

/// Runs one request on the caller's thread and reads its reply with `parse`.
pub(crate) fn run_single<T>(
    store: &Store,
    describe: impl Fn() -> String,
    request: Request,
    parse: impl FnOnce(Result<Value>) -> Result<T>,
) -> Result<T> {
    parse(exec(store, request, describe))
}

/// Runs one request on the actor runtime; the future resolves to its reply read by `parse`.
pub(crate) fn spawn_single<T, D, F>(describe: D, request: Request, parse: F) -> AsyncCall<T>
where
    T: Send + 'static,
    D: Fn() -> String + Send + 'static,
    F: FnOnce(Result<Value>) -> Result<T> + Send + 'static,
{
    spawn(Single::new(describe, request, parse), None)
}
