//! The queue operations that may wait, as state machines of round trips (`op`): a put on a
//! bounded or joinable queue, `JoinableQueue::join` and the async `qsize` (the async get is
//! `async_get.rs`).

use super::*;

/// A put written now (`put.lua`); while a bounded queue is full, the writer queues and
/// waits on its wake key ([`WakeWait`] on `putters`), and puts again when woken, or when the
/// check after a slice of its wait finds room (`room.lua`: a wake-up spent on a writer that
/// died leaves room that nobody was told of) or the queue gone. At the deadline, or when the
/// async caller left, it leaves the writers' queue; a wake-up (room) that had reached it is
/// passed on to the next writer. The put after a wake-up is an abandon point: an async caller
/// that left during the wait slice that brought the wake-up gets nothing written, and the
/// wake-up goes on to the next writer.
///
/// The transfers of the pipe ends in the item (`unsent`) are given back when the put is dropped
/// having certainly written nothing: never sent, full (`put_nowait`, a timeout, an abandon),
/// refused before any write (`GONE`, `CORRUPT`), or a failure while it waited for room. A put
/// written, or whose outcome is unknown (any other error of `put.lua`, a request under way
/// when the put was dropped), keeps them: the item may be in the queue.
pub(super) struct Put {
    core: QueueCore,
    keys: Arc<QueueKeys>,
    item: Vec<u8>,
    unsent: Unsent,
    /// A `put.lua` was handed over and its reply has not been read: it may have written.
    in_flight: bool,
    wait: bool,
    deadline: Option<Instant>,
    waiter: String,
    phase: PutPhase,
    abandoned: bool,
}

enum PutPhase {
    Putting,
    /// Putting again after a wake-up or room found: the room is this writer's to use or to
    /// pass on.
    Reputting,
    Waiting(Box<WakeWait<RoomCheck>>),
    PassingOn,
}

impl Put {
    pub(super) fn new(
        core: &QueueCore,
        item: Vec<u8>,
        unsent: Unsent,
        wait: bool,
        deadline: Option<Instant>,
    ) -> Put {
        Put {
            keys: core.keys(),
            core: core.clone(),
            item,
            unsent,
            in_flight: false,
            wait,
            deadline,
            waiter: String::new(),
            phase: PutPhase::Putting,
            abandoned: false,
        }
    }

    /// `put.lua`, in `phase` (putting first, or again after a wake-up).
    fn put(&mut self, store: &Store, phase: PutPhase) -> Step<()> {
        self.waiter = if self.wait {
            common::waiter_id()
        } else {
            String::new()
        };
        let again = matches!(phase, PutPhase::Reputting);
        self.phase = phase;
        let keys = &self.keys;
        let mut invocation = PUT.prepare_invoke();
        invocation
            .key(&keys.items)
            .key(&keys.state)
            .key(&keys.putters.waiters)
            .key(&keys.putters.waiting)
            .key(&keys.unfinished)
            .key(&keys.claims)
            .arg(ttl(store))
            .arg(self.item.as_slice())
            .arg(&self.waiter)
            .arg(liveness())
            .arg(if self.core.joinable { "1" } else { "0" })
            .arg(&keys.claim_prefix);
        let request = Request::script("putting on", invocation);
        self.in_flight = true;
        // After a wake-up, the caller may have left during the slice that brought it: its item
        // must not be written then (see `abandon`).
        Step::Next(if again {
            request.abandon_point()
        } else {
            request
        })
    }

    /// Passes a wake-up (room) this writer will not use on to the next writer.
    fn pass_on(&mut self, store: &Store) -> Step<()> {
        self.phase = PutPhase::PassingOn;
        Step::Next(self.keys.putters.wake(store, 1))
    }

    /// The item was written, or may have been: its transfers stay for the receiver.
    fn keep_transfers(&mut self) {
        std::mem::take(&mut self.unsent).keep();
    }

    fn gave_up(&self) -> Error {
        if self.abandoned {
            op::abandoned()
        } else {
            Error::Full
        }
    }

    fn after_wait(&mut self, store: &Store, step: Step<Woke>) -> Step<()> {
        match step {
            Step::Next(request) => Step::Next(request),
            Step::Done(Err(e)) => Step::Done(Err(self.core.address.error(e))),
            // Room was made: try again.
            Step::Done(Ok(Woke { gave_up: false, .. })) => self.put(store, PutPhase::Reputting),
            Step::Done(Ok(Woke { woken: true, .. })) => self.pass_on(store),
            Step::Done(Ok(_)) => Step::Done(Err(self.gave_up())),
        }
    }
}

impl Operation for Put {
    type Output = ();

    fn describe(&self) -> String {
        self.core.address.describe()
    }

    fn start(&mut self, store: &Store) -> Step<()> {
        self.put(store, PutPhase::Putting)
    }

    fn reply(&mut self, store: &Store, reply: Result<redis::Value>) -> Step<()> {
        match &mut self.phase {
            PutPhase::Putting | PutPhase::Reputting => match op::parse::<u64>(reply, "a put") {
                Err(e) => {
                    self.in_flight = false;
                    // `put.lua` refuses these before it writes anything.
                    let refused = matches!(
                        &e,
                        Error::Redis { source, .. }
                            if matches!(source.code(), Some("GONE" | "CORRUPT"))
                    );
                    if !refused {
                        self.keep_transfers();
                    }
                    Step::Done(Err(self.core.address.error(e)))
                }
                Ok(1) => {
                    self.in_flight = false;
                    self.keep_transfers();
                    Step::Done(Ok(()))
                }
                Ok(_) if !self.wait => {
                    self.in_flight = false;
                    Step::Done(Err(Error::Full))
                }
                Ok(_) => {
                    self.in_flight = false;
                    let mut waiting = WakeWait::new(
                        self.keys.putters.clone(),
                        self.waiter.clone(),
                        self.deadline,
                        RoomCheck {
                            core: self.core.clone(),
                            keys: self.keys.clone(),
                            waiter: self.waiter.clone(),
                        },
                    );
                    let step = waiting.start(store);
                    self.phase = PutPhase::Waiting(Box::new(waiting));
                    self.after_wait(store, step)
                }
            },
            PutPhase::Waiting(waiting) => {
                let step = waiting.reply(store, reply);
                self.after_wait(store, step)
            }
            PutPhase::PassingOn => {
                if let Err(e) = reply {
                    tracing::warn!("passing on room to the next writer: {e}");
                }
                Step::Done(Err(self.gave_up()))
            }
        }
    }

    fn abandon(&mut self, store: &Store) -> Step<()> {
        self.abandoned = true;
        match &mut self.phase {
            PutPhase::Waiting(waiting) => {
                let step = waiting.cancel(store);
                self.after_wait(store, step)
            }
            // Woken (or room found) after the caller left: the item is not written (its put
            // was not sent), and the room goes to the next writer.
            PutPhase::Reputting => {
                self.in_flight = false;
                self.pass_on(store)
            }
            PutPhase::Putting | PutPhase::PassingOn => Step::Done(Err(op::abandoned())),
        }
    }
}

impl Drop for Put {
    fn drop(&mut self) {
        if self.in_flight {
            // Dropped with its put under way (the async runtime going away): it may land.
            self.keep_transfers();
        }
        // Otherwise `unsent` is given back as it drops.
    }
}

/// What a waiting writer checks after each slice (`room.lua`): room counts as a wake-up.
pub(super) struct RoomCheck {
    core: QueueCore,
    keys: Arc<QueueKeys>,
    waiter: String,
}

impl Recheck for RoomCheck {
    fn request(&self, _: &Store) -> Option<Request> {
        let mut invocation = ROOM.prepare_invoke();
        invocation
            .key(&self.keys.items)
            .key(&self.keys.state)
            .key(&self.keys.putters.waiters)
            .key(&self.keys.putters.waiting)
            .arg(&self.waiter);
        Some(Request::script("checking for room on", invocation))
    }

    fn read(&self, reply: Result<redis::Value>) -> Result<bool> {
        let room =
            op::parse::<u64>(reply, "a room check").map_err(|e| self.core.address.error(e))?;
        Ok(room == 1)
    }
}

/// `JoinableQueue::join`: `task_done.lua` (`join`: done already, or queue the joiner),
/// then a [`WakeWait`] on `joiners` that also checks the queue still exists after each
/// check-in. A dropped async join leaves the joiners' queue.
pub(super) struct Join {
    core: QueueCore,
    waiter: String,
    waiting: Option<WakeWait<QueueExists>>,
}

struct QueueExists(QueueCore);

impl Recheck for QueueExists {
    fn request(&self, store: &Store) -> Option<Request> {
        Some(self.0.check_exists(store))
    }

    fn read(&self, reply: Result<redis::Value>) -> Result<bool> {
        self.0.exists(reply).map(|()| false)
    }
}

impl Join {
    pub(super) fn new(core: &QueueCore) -> Join {
        Join {
            core: core.clone(),
            waiter: common::waiter_id(),
            waiting: None,
        }
    }
}

fn joined(address: &Address, step: Step<Woke>) -> Step<()> {
    step.then(|woke| match woke {
        Err(e) => Step::Done(Err(address.error(e))),
        Ok(Woke { woken: true, .. }) => Step::Done(Ok(())),
        Ok(_) => Step::Done(Err(op::abandoned())),
    })
}

impl Operation for Join {
    type Output = ();

    fn describe(&self) -> String {
        self.core.address.describe()
    }

    fn start(&mut self, store: &Store) -> Step<()> {
        Step::Next(self.core.task_done_request(store, "join", &self.waiter))
    }

    fn reply(&mut self, store: &Store, reply: Result<redis::Value>) -> Step<()> {
        let address = &self.core.address;
        match &mut self.waiting {
            None => match op::parse::<i64>(reply, "a join") {
                Err(e) => Step::Done(Err(address.error(e))),
                Ok(1) => Step::Done(Ok(())),
                Ok(_) => {
                    let waiting = self.waiting.insert(WakeWait::new(
                        self.core.keys().joiners.clone(),
                        std::mem::take(&mut self.waiter),
                        None,
                        QueueExists(self.core.clone()),
                    ));
                    joined(address, waiting.start(store))
                }
            },
            Some(waiting) => joined(address, waiting.reply(store, reply)),
        }
    }

    fn abandon(&mut self, store: &Store) -> Step<()> {
        match &mut self.waiting {
            Some(waiting) => joined(&self.core.address, waiting.cancel(store)),
            None => Step::Done(Err(op::abandoned())),
        }
    }
}

/// The async `qsize` (`QueueCore::qsize_async`): this process's acks settled (`claims::settle`,
/// run on the actor runtime's blocking pool: it may wait for the claims connection's lock and
/// read replies), then `size.lua`.
pub(super) struct Measure {
    core: QueueCore,
    /// The store whose acks are settled first; `None`: settled already (or nothing to settle).
    settle: Option<Arc<Store>>,
    /// The feeder's count, read before the acks are settled (as `QueueCore::qsize` reads it).
    queued: Option<Queued>,
    /// The request under way is the settling.
    settling: bool,
}

impl Measure {
    /// Measures `core`, whose feeder count `queued` was read first; `settle`: the store whose
    /// acks must be settled before the measure (`None` when they are).
    pub(super) fn new(core: QueueCore, settle: Option<Arc<Store>>, queued: Option<Queued>) -> Self {
        Measure {
            core,
            settle,
            queued,
            settling: false,
        }
    }
}

impl Operation for Measure {
    type Output = usize;

    fn describe(&self) -> String {
        self.core.address.describe()
    }

    fn start(&mut self, _: &Store) -> Step<usize> {
        match self.settle.take() {
            Some(store) => {
                self.settling = true;
                Step::Next(claims::settle_request(store))
            }
            None => Step::Next(self.core.qsize_request(self.queued.as_ref())),
        }
    }

    fn reply(&mut self, _: &Store, reply: Result<redis::Value>) -> Step<usize> {
        if std::mem::take(&mut self.settling) {
            return match reply {
                Ok(_) => Step::Next(self.core.qsize_request(self.queued.as_ref())),
                // As the blocking `qsize`: acks that could not be confirmed fail the measure.
                Err(e) => Step::Done(Err(e)),
            };
        }
        Step::Done(self.core.qsize_from(self.queued.take(), reply))
    }
}
