//! Bootstrap of the actor system.
//!
//! shoal's actors (process actors, executors, pool supervisors) are actix actors living on one
//! actix system that runs on its own thread (`shoal-actors`), so they work whatever the user's
//! threads do, blocking calls included. User-facing handles send messages to them with
//! `Addr::send` and wait for the reply on their own thread.

use std::thread::JoinHandle;

use actix_rt::{ArbiterHandle, System};

use crate::error::{Error, Result};

/// A running actix system on a dedicated thread; dropping it stops the system.
#[derive(Debug)]
pub struct ActorSystem {
    system: System,
    arbiter: ArbiterHandle,
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
                    let _ = tx.send((System::current(), actix_rt::Arbiter::current()));
                });
                if let Err(e) = runner.run() {
                    tracing::error!("actor system stopped with an error: {e}");
                }
            })
            .map_err(|e| Error::io("starting the actor system thread", e))?;
        let (system, arbiter) = rx
            .recv()
            .map_err(|_| Error::Backend("the actor system thread died during start".into()))?;
        Ok(ActorSystem {
            system,
            arbiter,
            thread: Some(thread),
        })
    }

    /// The arbiter actors are started on (`Actor::start_in_arbiter`).
    pub fn arbiter(&self) -> &ArbiterHandle {
        &self.arbiter
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
