//! Registered types: user objects made and reached through a manager (Python's
//! `BaseManager.register(typeid, callable)` and `manager.<typeid>(...)`).
//!
//! A registered type is a durable actor (`#[derive(shoal::Actor)]`): [`Manager::register`]
//! records it under a type id, [`Manager::create`] makes an instance and returns its proxy, an
//! [`ActorRef`] whose calls (`ask`, `tell`) are checked at compile time and signed with the
//! manager's authkey. Python's `exposed` (which methods a proxy may call) is the actor's
//! `#[actor(messages(...))]` list: a proxy cannot send anything else. Python's `method_to_typeid`
//! (a method that returns a proxy) is a handler whose reply is an [`ActorRef`] (or another
//! proxy): it arrives live. Concurrent calls from many processes are applied one at a time,
//! exactly once each (see [`crate::spawn_actor`]), so no update is lost.
//!
//! Instances run in the actor hosts of the runtime that creates them, which check every message
//! against their process's authkey before decoding it: the manager's authkey must be that
//! process's (the default for [`Manager::new`]; a process connecting to a manager with another
//! key sets it first with [`crate::set_authkey`], as Python code sets
//! `current_process().authkey`). [`Manager::shutdown`] stops the instances.
//!
//! Keys: the manager's `meta` hash holds `t:<typeid>` → the actor type, and `a:<actor id>` →
//! the type id of each instance.

use shoal_core::context::AuthKey;
use shoal_core::error::{Error, Result};
use shoal_core::hosted::Actor;
use shoal_executor::actor::{Mailbox, Outgoing, STOP_KIND};

use super::Manager;
use super::container::{RuntimeRequest, on_runtime};
use crate::actor::{ActorOptions, ActorRef, spawn_actor_with};

impl Manager {
    /// Registers the actor type `T` under `typeid` (Python's `register(typeid, callable)`), for
    /// every process using this manager. Registering the same type again is fine; another type
    /// under a taken id is [`Error::InvalidState`].
    ///
    /// ```no_run
    /// # use serde::{Deserialize, Serialize};
    /// # use shoal::prelude::*;
    /// #[derive(Serialize, Deserialize, Default, shoal::Actor)]
    /// #[actor(messages(Incr))]
    /// struct Counter { n: u64 }
    /// #[derive(Serialize, Deserialize)]
    /// struct Incr(u64);
    /// impl Handler<Incr> for Counter {
    ///     type Reply = u64;
    ///     fn handle(&mut self, Incr(by): Incr, _: &mut ActorContext) -> u64 { self.n += by; self.n }
    /// }
    /// # fn main() -> shoal::Result<()> {
    /// let _rt = shoal::init()?;
    /// let manager = Manager::new()?;
    /// manager.register::<Counter>("Counter")?;
    /// let counter = manager.create("Counter", Counter::default())?;
    /// assert_eq!(counter.ask(Incr(2), None)?, 2);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// Python's `exposed` is the type's message list: a proxy's call of a method the type does
    /// not expose is refused when the program is compiled, not when it runs:
    ///
    /// ```compile_fail
    /// # use serde::{Deserialize, Serialize};
    /// # use shoal::prelude::*;
    /// #[derive(Serialize, Deserialize, Default, shoal::Actor)]
    /// #[actor(messages(Incr))]
    /// struct Counter { n: u64 }
    /// #[derive(Serialize, Deserialize)]
    /// struct Incr(u64);
    /// #[derive(Serialize, Deserialize)]
    /// struct Reset;
    /// impl Handler<Incr> for Counter {
    ///     type Reply = u64;
    ///     fn handle(&mut self, Incr(by): Incr, _: &mut ActorContext) -> u64 { self.n += by; self.n }
    /// }
    /// impl Handler<Reset> for Counter {
    ///     type Reply = ();
    ///     fn handle(&mut self, _: Reset, _: &mut ActorContext) { self.n = 0 }
    /// }
    /// # fn main() -> shoal::Result<()> {
    /// let manager = Manager::new()?;
    /// manager.register::<Counter>("Counter")?;
    /// let counter = manager.create("Counter", Counter::default())?;
    /// counter.ask(Reset, None)?; // Reset is not in `messages(...)`: not exposed
    /// # Ok(())
    /// # }
    /// ```
    pub fn register<T: Actor>(&self, typeid: &str) -> Result<()> {
        self.check_running()?;
        let type_name = std::any::type_name::<T>();
        let field = format!("t:{typeid}");
        let (store, meta) = self.meta()?;
        let registered: Option<String> = store.with_conn(
            || format!("registering {typeid} in {}", self.describe()),
            |c| {
                redis::cmd("HSETNX")
                    .arg(&meta)
                    .arg(&field)
                    .arg(type_name)
                    .query::<i64>(c)?;
                redis::cmd("HGET").arg(&meta).arg(&field).query(c)
            },
        )?;
        self.registration(typeid, type_name, registered)
    }

    /// The async form of [`Manager::register`]: the same reads and write, each sent from a
    /// task (see "Async forms" in the `manager` module docs); no thread waits.
    pub fn register_async<T: Actor>(
        &self,
        typeid: &str,
    ) -> impl Future<Output = Result<()>> + Send + use<T> {
        let manager = self.clone();
        let typeid = typeid.to_string();
        async move {
            manager.check_running_async().await?;
            let type_name = std::any::type_name::<T>();
            let (_, meta) = manager.meta()?;
            let field = format!("t:{typeid}");
            let context = || format!("registering {typeid} in {}", manager.describe());
            let mut claim = redis::cmd("HSETNX");
            claim.arg(&meta).arg(&field).arg(type_name);
            on_runtime::<i64>(RuntimeRequest::Cmd(claim))
                .await?
                .map_err(|e| Error::redis(context(), e))?;
            let mut read = redis::cmd("HGET");
            read.arg(&meta).arg(&field);
            let registered = on_runtime::<Option<String>>(RuntimeRequest::Cmd(read))
                .await?
                .map_err(|e| Error::redis(context(), e))?;
            manager.registration(&typeid, type_name, registered)
        }
    }

    /// What a registration found under `typeid`: `type_name` (registered), another type, or
    /// nothing (the manager went).
    fn registration(
        &self,
        typeid: &str,
        type_name: &str,
        registered: Option<String>,
    ) -> Result<()> {
        match registered {
            Some(existing) if existing == type_name => Ok(()),
            Some(existing) => Err(Error::invalid_state(format!(
                "type id {typeid} is registered in {} as {existing}, not {type_name}",
                self.describe()
            ))),
            None => Err(Error::invalid_state(format!(
                "{} was shut down",
                self.describe()
            ))),
        }
    }

    /// Makes an instance of the type registered as `typeid` with state `init` and returns its
    /// proxy (Python's `manager.<typeid>(...)`). [`Error::InvalidState`] when `typeid` is not
    /// registered, or registered as another type; [`Error::Authentication`] when this
    /// process's authkey is not the manager's (see the module docs).
    pub fn create<T: Actor>(&self, typeid: &str, init: T) -> Result<ActorRef<T>> {
        self.check_running()?;
        let type_name = std::any::type_name::<T>();
        let (store, meta) = self.meta()?;
        let registered: Option<String> = store.with_conn(
            || format!("reading type id {typeid} of {}", self.describe()),
            |c| {
                redis::cmd("HGET")
                    .arg(&meta)
                    .arg(format!("t:{typeid}"))
                    .query(c)
            },
        )?;
        self.may_create(typeid, type_name, registered)?;
        let actor = spawn_actor_with(init, ActorOptions { authenticate: true })?
            .signed_with(self.inner.authkey.clone());
        store.with_conn(
            || format!("recording an instance of {typeid} in {}", self.describe()),
            |c| Self::instance_record(&meta, &actor, typeid).query::<()>(c),
        )?;
        Ok(actor)
    }

    /// The async form of [`Manager::create`]: the same reads and writes, each sent from a
    /// task (see "Async forms" in the `manager` module docs; the instance is made with
    /// [`crate::spawn_actor_with_async`], on shoal's actor runtime); `init` is encoded when
    /// this is called.
    pub fn create_async<T: Actor>(
        &self,
        typeid: &str,
        init: T,
    ) -> impl Future<Output = Result<ActorRef<T>>> + Send + use<T> {
        let manager = self.clone();
        let typeid = typeid.to_string();
        async move {
            manager.check_running_async().await?;
            let type_name = std::any::type_name::<T>();
            let (_, meta) = manager.meta()?;
            let mut read = redis::cmd("HGET");
            read.arg(&meta).arg(format!("t:{typeid}"));
            let registered = on_runtime::<Option<String>>(RuntimeRequest::Cmd(read))
                .await?
                .map_err(|e| {
                    Error::redis(
                        format!("reading type id {typeid} of {}", manager.describe()),
                        e,
                    )
                })?;
            manager.may_create(&typeid, type_name, registered)?;
            let actor =
                crate::actor::spawn_actor_with_async(init, ActorOptions { authenticate: true })
                    .await?
                    .signed_with(manager.inner.authkey.clone());
            let record = Self::instance_record(&meta, &actor, &typeid);
            on_runtime::<()>(RuntimeRequest::Cmd(record))
                .await?
                .map_err(|e| {
                    Error::redis(
                        format!(
                            "recording an instance of {typeid} in {}",
                            manager.describe()
                        ),
                        e,
                    )
                })?;
            Ok(actor)
        }
    }

    /// Whether this process may make an instance of `type_name` under `typeid`, registered as
    /// `registered`: the type must be the one registered, and this process's authkey the
    /// manager's (its hosts check the instance's messages with it).
    fn may_create(&self, typeid: &str, type_name: &str, registered: Option<String>) -> Result<()> {
        match registered {
            Some(existing) if existing == type_name => {}
            Some(existing) => {
                return Err(Error::invalid_state(format!(
                    "type id {typeid} is registered in {} as {existing}, not {type_name}",
                    self.describe()
                )));
            }
            None => {
                return Err(Error::invalid_state(format!(
                    "type id {typeid} is not registered in {} (Manager::register)",
                    self.describe()
                )));
            }
        }
        if self.inner.authkey != AuthKey::of_this_process() {
            return Err(Error::Authentication(format!(
                "instances of {typeid} run in this process's actor hosts, which check messages \
                 against this process's authkey, and it is not {}'s: set it first with \
                 shoal::set_authkey (Python: current_process().authkey = ...)",
                self.describe()
            )));
        }
        Ok(())
    }

    /// The record of an instance in the manager's meta hash (`a:<actor id>` → its type id),
    /// which the shutdown stops.
    fn instance_record<T: Actor>(meta: &str, actor: &ActorRef<T>, typeid: &str) -> redis::Cmd {
        let mut cmd = redis::cmd("HSET");
        cmd.arg(meta).arg(format!("a:{}", actor.id())).arg(typeid);
        cmd
    }

    /// Stops the registered-type instances listed in `fields` (`a:<actor id>` meta fields), as
    /// part of a shutdown: each gets a signed stop message.
    pub(super) fn stop_instances(&self, fields: &[String]) {
        let Ok((store, _)) = self.meta() else {
            return;
        };
        for stop in self.instance_stops(&store, fields) {
            if let Err(e) = stop.mailbox.send(&store, &stop.outgoing()) {
                tracing::debug!(
                    "stopping actor {} of {}: {e}",
                    stop.mailbox.actor_id,
                    self.describe()
                );
            }
        }
    }

    /// The stop message of each registered-type instance listed in `fields`.
    pub(super) fn instance_stops(
        &self,
        store: &shoal_core::store::Store,
        fields: &[String],
    ) -> Vec<InstanceStop> {
        let hold = store
            .settings()
            .response_timeout
            .min(std::time::Duration::from_secs(2));
        fields
            .iter()
            .filter_map(|f| f.strip_prefix("a:"))
            .map(|id| InstanceStop {
                mailbox: Mailbox::new(store.keys(), id, hold),
                mac: shoal_executor::actor::sign_message(
                    &self.inner.authkey,
                    id,
                    STOP_KIND,
                    &[],
                    "",
                )
                .to_vec(),
                verifier: shoal_executor::actor::verifier(&self.inner.authkey, id).to_vec(),
            })
            .collect()
    }
}

/// A signed stop message for one registered-type instance (see `Manager::shutdown`).
pub(super) struct InstanceStop {
    pub(super) mailbox: Mailbox,
    mac: Vec<u8>,
    verifier: Vec<u8>,
}

impl InstanceStop {
    /// The message to send.
    pub(super) fn outgoing(&self) -> Outgoing<'_> {
        Outgoing {
            kind: STOP_KIND,
            payload: &[],
            reply_to: None,
            mac: Some(&self.mac),
            verifier: Some(&self.verifier),
        }
    }
}
