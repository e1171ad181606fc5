//! A receive or a poll on one end of a pipe, as a state machine of round trips (`op`).

use super::*;

/// Numbers the landing lists of this process's receives (see [`Reader`]).
static LANDINGS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// What a [`Reader`] produced.
pub(super) enum Read {
    Message(Message),
    Polled(bool),
}

/// A receive (`poll: None`) or a poll (`poll: Some(deadline)`) on one end. A receive takes the
/// head of the inbox with slices of `BLMOVE` into a list of its own (`inbox:<end>:landing:<process>:<n>`,
/// empty again at once) and the `LPOP` of that list behind it, in one round trip; a poll waits for one without taking it, with slices
/// of `BLMOVE` from the inbox to itself. After each empty slice, `check.lua` reaps lapsed
/// holds (a writer that died shows as end of file) and reports a closed end; a handle closed
/// meanwhile in this process ends the wait too. End of file is left in the inbox for the next
/// reader.
pub(super) struct Reader {
    pub(super) address: Address,
    pub(super) end: u8,
    pub(super) keys: PipeKeys,
    pub(super) inbox: String,
    pub(super) phase: Arc<Mutex<Phase>>,
    pub(super) poll: Option<Option<Instant>>,
    pub(super) state: ReaderState,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum ReaderState {
    Waiting,
    Checking,
    Marking,
}

impl Reader {
    fn slice(&mut self) -> Step<Read> {
        self.state = ReaderState::Waiting;
        match self.poll {
            None => {
                // The head of the inbox moves to a list of this receive's own and is taken from
                // there in the same round trip: a wait whose read a stop signal interrupted
                // still gets it (see `Request::move_then_take`).
                let landing = format!(
                    "{}:landing:{}:{}",
                    self.inbox,
                    common::process_holder(),
                    LANDINGS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                );
                let mut wait = redis::cmd("BLMOVE");
                wait.arg(&self.inbox)
                    .arg(&landing)
                    .arg("LEFT")
                    .arg("RIGHT")
                    .arg(blpop_seconds(common::SLICE));
                let mut take = redis::cmd("LPOP");
                take.arg(&landing);
                Step::Next(Request::move_then_take(
                    "waiting for",
                    wait,
                    take,
                    common::SLICE,
                ))
            }
            Some(deadline) => match next_slice(deadline) {
                None => Step::Done(Ok(Read::Polled(false))),
                Some(block) => {
                    // Moving the head of the inbox to the head of the inbox waits without
                    // taking it.
                    let mut cmd = redis::cmd("BLMOVE");
                    cmd.arg(&self.inbox)
                        .arg(&self.inbox)
                        .arg("LEFT")
                        .arg("LEFT")
                        .arg(blpop_seconds(block));
                    Step::Next(Request::blocking("polling", cmd, block))
                }
            },
        }
    }

    /// `check.lua`, unless this handle was closed meanwhile.
    fn check(&mut self, store: &Store) -> Step<Read> {
        if *self.phase.lock().unwrap_or_else(|p| p.into_inner()) == Phase::Closed {
            return Step::Done(Err(Error::Closed(format!(
                "handle of {} is closed",
                self.address.describe()
            ))));
        }
        self.state = ReaderState::Checking;
        Step::Next(check_request(store, &self.keys, self.end))
    }
}

impl Operation for Reader {
    type Output = Read;

    fn describe(&self) -> String {
        self.address.describe()
    }

    fn start(&mut self, store: &Store) -> Step<Read> {
        // A poll whose deadline passed already (`poll(Some(Duration::ZERO))`): one check.
        if let Some(Some(deadline)) = self.poll
            && deadline <= Instant::now()
        {
            return self.check(store);
        }
        self.slice()
    }

    fn reply(&mut self, store: &Store, reply: Result<redis::Value>) -> Step<Read> {
        match self.state {
            ReaderState::Waiting => {
                let popped = op::parse::<Option<Vec<u8>>>(reply, "a message");
                match popped {
                    // A poll takes nothing, and a receive reads what its wait moved even when
                    // the wait's read was interrupted: a wait a stop signal interrupted (see
                    // `Error::is_interrupted`) checks and goes on.
                    Err(e) if e.is_interrupted() => self.check(store),
                    Err(e) => Step::Done(Err(self.address.error(e))),
                    Ok(None) => self.check(store),
                    Ok(Some(_)) if self.poll.is_some() => Step::Done(Ok(Read::Polled(true))),
                    Ok(Some(message)) if message.is_empty() => {
                        // Leave the marker for the next reader: end of file stays end of file.
                        self.state = ReaderState::Marking;
                        let mut marker = redis::pipe();
                        marker
                            .cmd("LPUSH")
                            .arg(&self.inbox)
                            .arg("")
                            .ignore()
                            .expire(&self.inbox, ttl(store) as i64)
                            .ignore();
                        Step::Next(Request::pipe("keeping the end-of-file marker of", marker))
                    }
                    Ok(Some(message)) if message.first() != Some(&DATA) => {
                        Step::Done(Err(Error::Codec {
                            key: self.inbox.clone(),
                            expected: "a pipe message".into(),
                            reason: "it does not start with the message marker".into(),
                        }))
                    }
                    Ok(Some(mut message)) => {
                        message.remove(0);
                        Step::Done(Ok(Read::Message(Message::Data(message))))
                    }
                }
            }
            ReaderState::Checking => match checked(&self.address, reply) {
                Err(e) => Step::Done(Err(e)),
                Ok((waiting, _)) if waiting > 0 && self.poll.is_some() => {
                    Step::Done(Ok(Read::Polled(true)))
                }
                // The writer closed and nothing waits: end of file, even if its marker was
                // lost (a reader that died between taking it and putting it back), and during
                // another reader's taking it back (Python's poll() is true at end of file).
                Ok((0, true)) if self.poll.is_some() => Step::Done(Ok(Read::Polled(true))),
                Ok((0, true)) => Step::Done(Ok(Read::Message(Message::EndOfFile))),
                Ok(_) => self.slice(),
            },
            ReaderState::Marking => Step::Done(Ok(Read::Message(Message::EndOfFile))),
        }
    }
}
