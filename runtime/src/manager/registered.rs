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
//! `<namespace>|<typeid>` for each instance: the `shoal.namespace` of the process that made it,
//! whose actor hosts run it (a process may connect to a manager from another namespace), so
//! that the shutdown sends its stop there. A value without a namespace (an older shoal's, the
//! type id alone) is stopped in the namespace of the process shutting down.
//!
//! Round trips: `register`: 1 (a script that checks the manager runs, registers and refreshes
//! the record). `create`: 1 (the manager's state and the type registered, a read that refreshes
//! the record), the instance's creation (see [`crate::spawn_actor`]), then 1 (a script that
//! records the instance if the manager still runs, so a shutdown that came in between finds it
//! and stops it, or refuses, and the instance is stopped: 1 more).

use shoal_core::context::{self, AuthKey};
use shoal_core::error::{Error, Result};
use shoal_core::hosted::Actor;
use shoal_core::store::KeySpace;
use shoal_executor::actor::{Mailbox, Outgoing, STOP_KIND};

use super::container::{RuntimeRequest, on_runtime};
use super::{Manager, RECORD, Refreshed, read_reply};
use crate::actor::{ActorOptions, ActorRef, spawn_actor_with};

/// What the read before a creation finds: the manager's state and the type registered under
/// the type id.
type TypeReply = (Option<String>, Option<String>);

impl Manager {
    /// Registers the actor type `T` under `typeid` (Python's `register(typeid, callable)`), for
    /// every process using this manager. Registering the same type again is fine; another type
    /// under a taken id is [`Error::InvalidState`].
    ///
    /// The type is recorded by its full path ([`std::any::type_name`]), the name by which actor
    /// hosts restore an actor and message kinds are named, which Rust keeps the same only
    /// within one build: processes that register or create a type should run the same build of
    /// the program (as every caller of an actor does); another build may be refused with
    /// [`Error::InvalidState`] "registered ... as ..., not ...".
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
        self.check_not_shut_down_here()?;
        let type_name = std::any::type_name::<T>();
        let (store, _) = self.meta()?;
        let invocation = self.registration_script(typeid, type_name, store.expiry_secs());
        let registered: String = store
            .with_conn(
                || format!("registering {typeid} in {}", self.describe()),
                |c| invocation.invoke(c),
            )
            .map_err(|e| super::manager_error(&self.inner.address, e))?;
        self.registration(typeid, type_name, &registered)
    }

    /// The async form of [`Manager::register`]: the same script, sent from a task (see "Async
    /// forms" in the `manager` module docs); no thread waits.
    pub fn register_async<T: Actor>(
        &self,
        typeid: &str,
    ) -> impl Future<Output = Result<()>> + Send + use<T> {
        let manager = self.clone();
        let typeid = typeid.to_string();
        async move {
            manager.check_not_shut_down_here()?;
            let type_name = std::any::type_name::<T>();
            let (store, _) = manager.meta()?;
            let invocation = manager.registration_script(&typeid, type_name, store.expiry_secs());
            let reply = on_runtime::<String>(RuntimeRequest::Script(invocation))
                .await
                .and_then(|reply| {
                    reply.map_err(|e| {
                        Error::redis(format!("registering {typeid} in {}", manager.describe()), e)
                    })
                });
            let registered = reply.map_err(|e| super::manager_error(&manager.inner.address, e))?;
            manager.registration(&typeid, type_name, &registered)
        }
    }

    /// The script that registers `type_name` under `typeid` if the manager runs and the id is
    /// free, and refreshes the record (`manager_record.lua` with `nx`): one round trip, the
    /// check and the write in one script, so that a shutdown cannot come between them.
    fn registration_script(
        &self,
        typeid: &str,
        type_name: &str,
        expiry_secs: u64,
    ) -> redis::ScriptInvocation<'static> {
        let mut invocation = RECORD.prepare_invoke();
        invocation
            .key(self.inner.address.keys().key("meta"))
            .arg(format!("t:{typeid}"))
            .arg(type_name)
            .arg(expiry_secs)
            .arg("nx");
        invocation
    }

    /// What a registration found under `typeid`: `type_name` (registered), or another type.
    fn registration(&self, typeid: &str, type_name: &str, registered: &str) -> Result<()> {
        if registered == type_name {
            return Ok(());
        }
        Err(Error::invalid_state(format!(
            "type id {typeid} is registered in {} as {registered}, not {type_name}",
            self.describe()
        )))
    }

    /// Makes an instance of the type registered as `typeid` with state `init` and returns its
    /// proxy (Python's `manager.<typeid>(...)`). [`Error::InvalidState`] when `typeid` is not
    /// registered, or registered as another type; [`Error::Authentication`] when this
    /// process's authkey is not the manager's (see the module docs).
    pub fn create<T: Actor>(&self, typeid: &str, init: T) -> Result<ActorRef<T>> {
        self.check_not_shut_down_here()?;
        let type_name = std::any::type_name::<T>();
        let (store, meta) = self.meta()?;
        let address = &self.inner.address;
        let read = Self::type_read(&meta, typeid, store.expiry_secs());
        let (state, registered): TypeReply = store
            .with_conn(
                || format!("reading type id {typeid} of {}", self.describe()),
                |c| read.query(c).and_then(read_reply),
            )
            .map_err(|e| super::manager_error(address, e))?;
        super::running(address, state)?;
        self.may_create(typeid, type_name, registered)?;
        let actor = spawn_actor_with(init, ActorOptions { authenticate: true })?
            .signed_with(self.inner.authkey.clone());
        let namespace = store.keys().namespace();
        let record =
            Self::instance_record(&meta, actor.id(), namespace, typeid, store.expiry_secs());
        let recorded = store
            .with_conn(
                || format!("recording an instance of {typeid} in {}", self.describe()),
                |c| record.invoke::<i64>(c),
            )
            .map_err(|e| super::manager_error(address, e));
        if let Err(e) = recorded {
            // Not in the record, the shutdown would never stop it: stopped here.
            self.stop_instances(&[Instance::new(actor.id(), namespace)]);
            return Err(e);
        }
        Ok(actor)
    }

    /// The async form of [`Manager::create`]: the same read and script, each sent from a task
    /// (see "Async forms" in the `manager` module docs; the instance is made with
    /// [`crate::spawn_actor_with_async`], on shoal's actor runtime); `init` is encoded when
    /// this is called. The record of the instance (or its stop, when the record is refused) is
    /// sent from a task of shoal's actor runtime, so a future dropped once the instance was made
    /// does not leave it running unrecorded.
    pub fn create_async<T: Actor>(
        &self,
        typeid: &str,
        init: T,
    ) -> impl Future<Output = Result<ActorRef<T>>> + Send + use<T> {
        let manager = self.clone();
        let typeid = typeid.to_string();
        async move {
            manager.check_not_shut_down_here()?;
            let type_name = std::any::type_name::<T>();
            let (store, meta) = manager.meta()?;
            let address = manager.inner.address.clone();
            let read = Self::type_read(&meta, &typeid, store.expiry_secs());
            let reply = on_runtime::<Refreshed<TypeReply>>(RuntimeRequest::Pipe(read))
                .await
                .and_then(|reply| {
                    reply.and_then(read_reply).map_err(|e| {
                        Error::redis(
                            format!("reading type id {typeid} of {}", manager.describe()),
                            e,
                        )
                    })
                });
            let (state, registered) = reply.map_err(|e| super::manager_error(&address, e))?;
            super::running(&address, state)?;
            manager.may_create(&typeid, type_name, registered)?;
            let actor =
                crate::actor::spawn_actor_with_async(init, ActorOptions { authenticate: true })
                    .await?
                    .signed_with(manager.inner.authkey.clone());
            let namespace = store.keys().namespace();
            let record =
                Self::instance_record(&meta, actor.id(), namespace, &typeid, store.expiry_secs());
            let stops = manager.instance_stops(&store, &[Instance::new(actor.id(), namespace)]);
            let context = format!(
                "recording an instance of {typeid} in {}",
                manager.describe()
            );
            let recorded = context::current()?
                .spawn(move |store, caller| async move {
                    let recorded = match store.shared().await {
                        Ok(mut conn) => record
                            .invoke_async::<i64>(&mut conn)
                            .await
                            .map(drop)
                            .map_err(|e| Error::redis(context, e)),
                        Err(e) => Err(e),
                    };
                    if recorded.is_err() {
                        // Not in the record, the shutdown would never stop it: stopped here.
                        for stop in stops {
                            if let Err(e) = stop.mailbox.send_async(&store, &stop.outgoing()).await
                            {
                                tracing::debug!("stopping actor {}: {e}", stop.mailbox.actor_id);
                            }
                        }
                    }
                    caller.finish(recorded);
                })
                .await;
            recorded.map_err(|e| super::manager_error(&address, e))?;
            Ok(actor)
        }
    }

    /// The read before a creation: the manager's state and the type registered under `typeid`,
    /// in one `HMGET` that refreshes the record's TTL ([`super::refreshing`]).
    fn type_read(meta: &str, typeid: &str, expiry_secs: u64) -> redis::Pipeline {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(meta).arg("state").arg(format!("t:{typeid}"));
        super::refreshing(cmd, meta, expiry_secs)
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

    /// The record of an instance in the manager's meta hash (`a:<actor id>` →
    /// `<namespace>|<typeid>`, `namespace` the one whose hosts run it), which the shutdown
    /// stops: `manager_record.lua`, which writes it only while the manager runs (and refreshes
    /// the record's TTL).
    fn instance_record(
        meta: &str,
        actor_id: &str,
        namespace: &str,
        typeid: &str,
        expiry_secs: u64,
    ) -> redis::ScriptInvocation<'static> {
        let mut invocation = RECORD.prepare_invoke();
        invocation
            .key(meta)
            .arg(format!("a:{actor_id}"))
            .arg(format!("{namespace}|{typeid}"))
            .arg(expiry_secs);
        invocation
    }

    /// Stops the registered-type `instances`, as part of a shutdown: each gets a signed stop
    /// message, in the namespace whose hosts run it.
    pub(super) fn stop_instances(&self, instances: &[Instance]) {
        let Ok((store, _)) = self.meta() else {
            return;
        };
        for stop in self.instance_stops(&store, instances) {
            if let Err(e) = stop.mailbox.send(&store, &stop.outgoing()) {
                tracing::debug!(
                    "stopping actor {} of {}: {e}",
                    stop.mailbox.actor_id,
                    self.describe()
                );
            }
        }
    }

    /// The stop message of each registered-type instance of `instances`.
    pub(super) fn instance_stops(
        &self,
        store: &shoal_core::store::Store,
        instances: &[Instance],
    ) -> Vec<InstanceStop> {
        let hold = store
            .settings()
            .response_timeout
            .min(std::time::Duration::from_secs(2));
        instances
            .iter()
            .map(|Instance { id, namespace }| InstanceStop {
                mailbox: Mailbox::new(&KeySpace::new(namespace.as_str()), id, hold),
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

/// A registered-type instance to stop: its actor id and the namespace whose hosts run it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Instance {
    id: String,
    namespace: String,
}

impl Instance {
    fn new(id: &str, namespace: &str) -> Self {
        Instance {
            id: id.to_string(),
            namespace: namespace.to_string(),
        }
    }
}

/// The instances the shutdown script found (`a:<actor id>`, its value, ...: see the module
/// docs). A value without a valid namespace before its `|` (an older shoal wrote the type id
/// alone) is an instance of `own_namespace` (the shutting-down process's), where that shoal
/// sent the stop.
pub(super) fn recorded_instances(own_namespace: &str, recorded: &[String]) -> Vec<Instance> {
    recorded
        .chunks_exact(2)
        .filter_map(|pair| {
            let id = pair[0].strip_prefix("a:")?;
            let namespace = pair[1]
                .split_once('|')
                .map(|(namespace, _)| namespace)
                .filter(|namespace| is_namespace(namespace))
                .unwrap_or(own_namespace);
            Some(Instance::new(id, namespace))
        })
        .collect()
}

/// Whether `s` can be a `shoal.namespace` (1 to 64 of A-Z, a-z, 0-9, `_`, `-`, `.`, as the
/// configuration requires).
fn is_namespace(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_are_stopped_in_their_recorded_namespace() {
        let recorded: Vec<String> = [
            "a:1",
            "other-ns|Counter",
            // An older shoal's record: the type id alone, or with a '|' of its own.
            "a:2",
            "Counter",
            "a:3",
            "not a namespace|Counter",
            // Not an instance.
            "o:x",
            "v",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            recorded_instances("own", &recorded),
            [
                Instance::new("1", "other-ns"),
                Instance::new("2", "own"),
                Instance::new("3", "own"),
            ]
        );
    }
}
