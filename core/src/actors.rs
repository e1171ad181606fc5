//! Bootstrap of the actor system, and async calls run on it.
//!
//! shoal's actors (process actors, executors, pool supervisors) are actix actors living on one
//! actix system that runs on its own thread (`shoal-actors`), so they work whatever the user's
//! threads do, blocking calls included. User-facing handles send messages to them with
//! `Addr::send` and wait for the reply on their own thread.
//!
//! # Async calls
//!
//! The async forms of the primitives (`Queue::get_async`, `Lock::acquire_async`...) run their
//! Redis work as a task on that system's Tokio runtime ([`spawn_call`]) and hand the result back
//! through a `futures` oneshot channel. The caller's future ([`AsyncCall`]) is only the
//! receiving end, so it needs no particular executor: a Tokio current-thread or multi-thread
//! runtime, actix's, or `futures::executor` all await it, and no thread is parked per call.
//!
//! The async calls of actors and of the Manager run their task on the caller's own Tokio runtime
//! instead when they are awaited in a task of one (`Context::spawn_near_caller`).
//!
//! Dropping an [`AsyncCall`] never cancels what Redis already did: the task runs on to its end.
//! It can see that nobody waits any more ([`Caller::is_gone`]) and give up the way a timeout
//! would; and a result handed over with an *undo* ([`Caller::hand_over`]) that the caller never
//! takes (its future was dropped before or after the result arrived) is undone on the actor
//! runtime: an item goes back to its queue, a permit is released.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::thread::JoinHandle;

use actix_rt::{ArbiterHandle, System};
use futures::channel::oneshot;

use crate::error::{Error, Result};

/// A running actix system on a dedicated thread; dropping it stops the system.
#[derive(Debug)]
pub struct ActorSystem {
    system: System,
    arbiter: ArbiterHandle,
    runtime: tokio::runtime::Handle,
    thread: Option<JoinHandle<()>>,
}

impl ActorSystem {
    /// Starts the system on a thread called `name`.
    pub fn start(name: &str) -> Result<ActorSystem> {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let runner = actix_rt::System::new();
                runner.block_on(async {
                    let _ = tx.send((
                        System::current(),
                        actix_rt::Arbiter::current(),
                        tokio::runtime::Handle::current(),
                    ));
                });
                if let Err(e) = runner.run() {
                    tracing::error!("actor system stopped with an error: {e}");
                }
            })
            .map_err(|e| Error::io("starting the actor system thread", e))?;
        let (system, arbiter, runtime) = rx
            .recv()
            .map_err(|_| Error::Backend("the actor system thread died during start".into()))?;
        Ok(ActorSystem {
            system,
            arbiter,
            runtime,
            thread: Some(thread),
        })
    }

    /// The arbiter actors are started on (`Actor::start_in_arbiter`).
    pub fn arbiter(&self) -> &ArbiterHandle {
        &self.arbiter
    }

    /// The Tokio runtime the system runs on: where async calls run ([`spawn_call`]).
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.runtime
    }

    /// Stops the system and waits for its thread. Idempotent.
    pub fn stop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.system.stop();
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

impl Drop for ActorSystem {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A boxed future run on the actor runtime.
pub type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// What undoes a result its caller never took.
type Undo<T> = Box<dyn FnOnce(T) -> BoxFuture + Send>;

/// A result on its way to the caller, with what undoes it if the caller never takes it.
struct Handoff<T: Send + 'static> {
    value: Option<T>,
    undo: Option<Undo<T>>,
    runtime: tokio::runtime::Handle,
}

impl<T: Send + 'static> Handoff<T> {
    fn take(mut self) -> Option<T> {
        self.undo = None;
        self.value.take()
    }
}

impl<T: Send + 'static> Drop for Handoff<T> {
    /// Never taken: the caller's future was dropped, before or after the result arrived. The
    /// undo runs on the actor runtime (this may be the caller's thread: it must not block).
    fn drop(&mut self) {
        if let (Some(value), Some(undo)) = (self.value.take(), self.undo.take()) {
            drop(self.runtime.spawn(undo(value)));
        }
    }
}

type Answer<T> = Result<Handoff<T>>;

/// The task's side of an async call: answers the caller, or learns that it left.
pub struct Caller<T: Send + 'static> {
    reply: oneshot::Sender<Answer<T>>,
    runtime: tokio::runtime::Handle,
}

impl<T: Send + 'static> std::fmt::Debug for Caller<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caller")
            .field("gone", &self.is_gone())
            .finish()
    }
}

impl<T: Send + 'static> Caller<T> {
    /// True once the caller dropped its future: nobody will take the result.
    pub fn is_gone(&self) -> bool {
        self.reply.is_canceled()
    }

    /// Answers with `result`; there is nothing to undo if nobody takes it.
    pub fn finish(self, result: Result<T>) {
        let answer = result.map(|value| Handoff {
            value: Some(value),
            undo: None,
            runtime: self.runtime.clone(),
        });
        let _ = self.reply.send(answer);
    }

    /// Answers with `value`; if the caller never takes it (its future is dropped before or
    /// after it arrives), `undo(value)` runs on the actor runtime.
    pub fn hand_over(self, value: T, undo: impl FnOnce(T) -> BoxFuture + Send + 'static) {
        let handoff = Handoff {
            value: Some(value),
            undo: Some(Box::new(undo)),
            runtime: self.runtime.clone(),
        };
        // A refused handoff is dropped here, which runs the undo.
        let _ = self.reply.send(Ok(handoff));
    }
}

/// The caller's side of an async call: a future that resolves to the call's result. It needs no
/// particular executor. Dropping it does not stop the call (see the module docs).
#[must_use = "an async call does nothing useful unless awaited"]
pub struct AsyncCall<T: Send + 'static> {
    state: CallState<T>,
}

enum CallState<T: Send + 'static> {
    Failed(Option<Error>),
    Waiting(oneshot::Receiver<Answer<T>>),
}

impl<T: Send + 'static> std::fmt::Debug for AsyncCall<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            CallState::Failed(_) => "failed",
            CallState::Waiting(_) => "waiting",
        };
        f.debug_struct("AsyncCall").field("state", &state).finish()
    }
}

impl<T: Send + 'static> AsyncCall<T> {
    /// A call that failed before it started.
    pub fn failed(error: Error) -> AsyncCall<T> {
        AsyncCall {
            state: CallState::Failed(Some(error)),
        }
    }
}

impl<T: Send + 'static> Future for AsyncCall<T> {
    type Output = Result<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        match &mut self.state {
            CallState::Failed(error) => Poll::Ready(Err(error.take().unwrap_or_else(|| {
                Error::invalid_state("an async call was polled after it completed")
            }))),
            CallState::Waiting(receiver) => {
                match Pin::new(receiver).poll(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Ok(Ok(handoff))) => Poll::Ready(handoff.take().ok_or_else(|| {
                        Error::invalid_state("an async call answered without a value")
                    })),
                    Poll::Ready(Ok(Err(e))) => Poll::Ready(Err(e)),
                    Poll::Ready(Err(oneshot::Canceled)) => Poll::Ready(Err(Error::invalid_state(
                        "the runtime running the call (shoal's, or the caller's Tokio runtime) \
                         stopped before it finished; what it had sent to Redis stands",
                    ))),
                }
            }
        }
    }
}

/// Runs `work` as a task on `runtime` (the actor system's) and returns the future its answer
/// arrives on. `work` gets the [`Caller`] to answer.
pub fn spawn_call<T, F, Fut>(runtime: &tokio::runtime::Handle, work: F) -> AsyncCall<T>
where
    T: Send + 'static,
    F: FnOnce(Caller<T>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (reply, receiver) = oneshot::channel();
    let caller = Caller {
        reply,
        runtime: runtime.clone(),
    };
    drop(runtime.spawn(work(caller)));
    AsyncCall {
        state: CallState::Waiting(receiver),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    #[test]
    fn a_result_nobody_takes_is_undone_on_the_actor_runtime() {
        let system = ActorSystem::start("test-actors").expect("actors");
        let undone = Arc::new(AtomicU32::new(0));
        // Taken: no undo.
        let taken = {
            let undone = undone.clone();
            spawn_call(system.runtime(), move |caller: Caller<u32>| async move {
                caller.hand_over(7, move |v| {
                    Box::pin(async move {
                        undone.fetch_add(v, Ordering::SeqCst);
                    })
                });
            })
        };
        assert_eq!(futures::executor::block_on(taken).expect("answer"), 7);
        // Dropped before the answer: the task sees it and its answer is undone.
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = oneshot::channel::<()>();
        let dropped = {
            let undone = undone.clone();
            spawn_call(system.runtime(), move |caller: Caller<u32>| async move {
                let _ = started_tx.send(());
                let _ = go_rx.await;
                assert!(caller.is_gone());
                caller.hand_over(5, move |v| {
                    Box::pin(async move {
                        undone.fetch_add(v, Ordering::SeqCst);
                    })
                });
            })
        };
        started_rx.recv().expect("started");
        drop(dropped);
        go_tx.send(()).expect("go");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while undone.load(Ordering::SeqCst) != 5 {
            assert!(std::time::Instant::now() < deadline, "never undone");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Answered, then dropped without being polled: undone too.
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let unpolled = {
            let undone = undone.clone();
            spawn_call(system.runtime(), move |caller: Caller<u32>| async move {
                caller.hand_over(10, move |v| {
                    Box::pin(async move {
                        undone.fetch_add(v, Ordering::SeqCst);
                    })
                });
                let _ = done_tx.send(());
            })
        };
        done_rx.recv().expect("answered");
        drop(unpolled);
        while undone.load(Ordering::SeqCst) != 15 {
            assert!(std::time::Instant::now() < deadline, "never undone");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_call_whose_runtime_stopped_is_an_error() {
        let mut system = ActorSystem::start("test-actors").expect("actors");
        let call = spawn_call(system.runtime(), |caller: Caller<u32>| async move {
            std::future::pending::<()>().await;
            caller.finish(Ok(1));
        });
        system.stop();
        assert!(matches!(
            futures::executor::block_on(call),
            Err(Error::InvalidState(_))
        ));
    }
}
