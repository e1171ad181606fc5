//! One activation of one actor: the actor thread's loop (read a batch of the mailbox, apply
//! it, commit it) from the activation to the end of its lease (see [`ActorState`], and the
//! protocol's module docs in [`super::super`]).

use super::*;

/// Why an actor thread ended.
pub(super) enum Ending {
    /// Idle, stopped or failed: the lease is given back.
    Release,
    /// The lease was lost (another host has the actor).
    Lost,
}

/// One activation of one actor.
pub(super) struct ActorState<'a> {
    pub(super) store: &'a Store,
    pub(super) spec: &'a HostSpec,
    pub(super) keys: &'a ActorKeys,
    pub(super) actor_id: &'a str,
    pub(super) actor_type: &'a str,
    pub(super) lease: &'a str,
    pub(super) limit: usize,
    /// The last committed state.
    pub(super) saved: Vec<u8>,
    pub(super) applied: String,
    pub(super) status: String,
    pub(super) reason: String,
    /// Handler panics within the restart period (Unix ms).
    pub(super) failures: Vec<u64>,
    /// The key messages must be signed with, for an authenticated actor.
    pub(super) authkey: Option<AuthKey>,
    /// The live actor, restored from `saved`.
    pub(super) actor: Option<Box<dyn HostedActor>>,
    /// Instances whose handler panicked, kept until `actor` is restored from `saved` (at the
    /// next message not skipped, or at the end of the batch): their handles keep this host's
    /// holds of the state's pipe ends while the restored instance claims them again, without
    /// which an end that only this host holds would close in between.
    pub(super) retired: Vec<Box<dyn HostedActor>>,
    /// This activation's own connection: its mailbox reads and its commits go on it, so a read
    /// can `WATCH` the lease for the commit after it (see [`ActorState::commit`]).
    pub(super) link: HeldConn,
    /// The connection of `link` (its generation) on which the lease is watched, when it was
    /// this host's as the watch began.
    pub(super) watching: Option<u64>,
    /// The connection of `link` (its generation) that watches nothing: its last command was an
    /// `EXEC`, which ends every watch, so the next read needs no `UNWATCH`.
    pub(super) unwatched: Option<u64>,
    /// When a commit last refreshed the TTLs of the state, the mailbox and the fencing counter.
    pub(super) ttl_refreshed: Option<Instant>,
    /// The transfers this activation registered for the pipe ends in the last state it
    /// committed (see [`ActorState::apply_and_commit`]).
    pub(super) committed_transfers: SentTransfers,
    /// What the activation found of host deaths: suspect mode, and a message to skip.
    pub(super) deaths: HostDeaths,
}

/// What an activation found of the host deaths its actor's messages caused (see "Host deaths"
/// in the protocol's module docs), and what it does about them.
#[derive(Debug, Default)]
pub(super) struct HostDeaths {
    /// Suspect mode, until this entry is applied (the last one pending when the activation
    /// found that the previous holder went without releasing the actor): messages are run one
    /// per batch, each marked `running` before it runs.
    pub(super) suspect_until: Option<String>,
    /// The entry whose host deaths are counted in the state (`deaths_entry`): the commit that
    /// applies it removes the count.
    pub(super) counted: Option<String>,
    /// The entry that killed its host [`HOST_DEATHS_PER_MESSAGE`] times or more, and how many:
    /// answered as a panicking message is, without running.
    pub(super) poisoned: Option<(String, u32)>,
}

impl HostDeaths {
    /// From the activation's answer: `suspect_until` and `deaths_entry` (empty: none) and
    /// `deaths`; none of it for an actor that runs no code (failed or stopped).
    pub(super) fn new(
        runs_code: bool,
        suspect_until: String,
        deaths_entry: String,
        deaths: u32,
    ) -> HostDeaths {
        if !runs_code {
            return HostDeaths::default();
        }
        let counted = (!deaths_entry.is_empty()).then_some(deaths_entry);
        HostDeaths {
            suspect_until: (!suspect_until.is_empty()).then_some(suspect_until),
            poisoned: counted
                .clone()
                .filter(|_| deaths >= HOST_DEATHS_PER_MESSAGE)
                .map(|entry| (entry, deaths)),
            counted,
        }
    }

    /// Whether entry `id` is the one to skip.
    fn is_poisoned(&self, id: &str) -> bool {
        self.poisoned.as_ref().is_some_and(|(entry, _)| entry == id)
    }

    /// The host-death fields a commit up to `applied` removes from the state.
    fn marks_to_clear(&self, applied: &str) -> DeathMarks {
        match &self.counted {
            Some(entry) if !is_after(entry, applied) => DeathMarks::Deaths,
            _ if self.suspect_until.is_some() => DeathMarks::Running,
            _ => DeathMarks::None,
        }
    }

    /// After a commit up to `applied` that removed `cleared`: suspect mode ends once the
    /// entries pending at the activation are applied.
    fn committed(&mut self, applied: &str, cleared: DeathMarks) {
        if cleared == DeathMarks::Deaths {
            self.counted = None;
        }
        if self
            .poisoned
            .as_ref()
            .is_some_and(|(entry, _)| !is_after(entry, applied))
        {
            self.poisoned = None;
        }
        if self
            .suspect_until
            .as_ref()
            .is_some_and(|until| !is_after(until, applied))
        {
            self.suspect_until = None;
        }
    }
}

/// The host-death fields of the state a commit removes (see `actor_commit.lua`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DeathMarks {
    /// None: the hot path.
    None,
    /// `running`, the mark of the message being run (suspect mode).
    Running,
    /// `running` and the count of deaths (`deaths_entry`, `deaths`): the commit applies the
    /// entry counted.
    Deaths,
}

impl DeathMarks {
    /// The commit script's argument.
    fn as_arg(self) -> &'static str {
        match self {
            DeathMarks::None => "",
            DeathMarks::Running => "running",
            DeathMarks::Deaths => "deaths",
        }
    }

    /// The fields removed.
    fn fields(self) -> &'static [&'static str] {
        match self {
            DeathMarks::None => &[],
            DeathMarks::Running => &["running"],
            DeathMarks::Deaths => &["running", "deaths_entry", "deaths"],
        }
    }
}

impl ActorState<'_> {
    pub(super) fn run(&mut self, stop: &AtomicBool) -> Result<Ending> {
        // The mailbox holds the messages not yet applied, after at most a node of applied ones
        // (skipped: see `apply`), so reading it from the start, then after the last entry
        // read, sees every message once, in order, whatever another host read before.
        let mut read_after = "0-0".to_string();
        let mut last_message = Instant::now();
        let idle = Duration::from_millis(self.spec.idle_ms);
        loop {
            if stop.load(Ordering::Acquire) {
                return Ok(Ending::Lost);
            }
            if context::termination_requested() {
                return Ok(Ending::Release);
            }
            // Suspect mode (see `HostDeaths`): the first entry not applied, alone. The entries
            // applied before it that the mailbox still holds are not read: the commit's trim
            // removes them.
            let suspect = self.deaths.suspect_until.is_some();
            let (after, count) = if suspect && is_after(&self.applied, &read_after) {
                (self.applied.clone(), 1)
            } else if suspect {
                (read_after.clone(), 1)
            } else {
                (read_after.clone(), BATCH)
            };
            let Some(entries) = self.read(&after, count)? else {
                return Ok(Ending::Lost);
            };
            let Some(last) = entries.last() else {
                // Nothing left of what was pending at the activation.
                self.deaths.suspect_until = None;
                if last_message.elapsed() >= idle {
                    return Ok(Ending::Release);
                }
                continue;
            };
            read_after = last.id.clone();
            last_message = Instant::now();
            if suspect && !self.mark_running(&entries)? {
                return Ok(Ending::Lost);
            }
            match self.apply_and_commit(&entries)? {
                Some(ending) => return Ok(ending),
                None if self.status != "active" => return Ok(Ending::Release),
                None => {}
            }
        }
    }

    /// The next batch of the mailbox after entry `after`, waiting at most [`READ_BLOCK`] for
    /// one; `None` when the lease is no longer this host's. A plain `XREAD`, not a consumer
    /// group's: a host that lost its lease (paused, cut off) and reads again takes nothing from
    /// its successor.
    ///
    /// The same round trip then `WATCH`es the lease and reads it: when it is this host's, the
    /// commit of what this read returned can be a plain transaction, which fails if anyone
    /// wrote the lease since (see [`ActorState::commit`]). The watch begins once the `XREAD`
    /// has returned (`UNWATCH` first drops the previous one, which a renewal during the wait
    /// may have spoilt, unless the connection's last command was the commit's `EXEC`, which
    /// ended it); a token is never given twice, so a lease that holds this host's token then
    /// has been this host's all along.
    fn read(&mut self, after: &str, count: usize) -> Result<Option<Vec<StreamId>>> {
        let (store, keys) = (self.store, self.keys);
        // A connection that watches nothing yet (or a new one) needs no UNWATCH.
        let unwatched = self.unwatched.take() == Some(self.link.generation());
        let link = &mut self.link;
        self.watching = None;
        let (reply, holder) = store.retry_unreachable(|| {
            store.with_held_conn(
                link,
                Some(READ_BLOCK),
                || format!("reading {}", keys.mailbox),
                |c| {
                    let mut read = redis::pipe();
                    read.cmd("XREAD")
                        .arg("COUNT")
                        .arg(count)
                        .arg("BLOCK")
                        .arg(READ_BLOCK.as_millis() as u64)
                        .arg("STREAMS")
                        .arg(&keys.mailbox)
                        .arg(after);
                    if !unwatched {
                        read.cmd("UNWATCH").ignore();
                    }
                    read.cmd("WATCH")
                        .arg(&keys.lease)
                        .ignore()
                        .get(&keys.lease)
                        .query::<(Option<StreamReadReply>, Option<String>)>(c)
                },
            )
        })?;
        if holder.as_deref() != Some(self.lease) {
            return Ok(None);
        }
        self.watching = Some(self.link.generation());
        Ok(Some(
            reply
                .into_iter()
                .flat_map(|r| r.keys)
                .flat_map(|k| k.ids)
                .collect(),
        ))
    }

    /// In suspect mode, before the batch runs: marks its entry not applied yet (one at most)
    /// `running` in the state (`actor_running.lua`, 1 round trip, on this activation's
    /// connection: the lease stays watched), unless no handler will run it (the actor is not
    /// active, or the entry is the one to skip). `false` when the lease is no longer this
    /// host's.
    fn mark_running(&mut self, entries: &[StreamId]) -> Result<bool> {
        let Some(entry) = entries.iter().find(|e| is_after(&e.id, &self.applied)) else {
            return Ok(true);
        };
        if self.status != "active" || self.deaths.is_poisoned(&entry.id) {
            return Ok(true);
        }
        let (store, keys, lease, actor_id) = (self.store, self.keys, self.lease, self.actor_id);
        let link = &mut self.link;
        let marked = store.retry_unreachable(|| {
            store.with_held_conn(
                link,
                // The read's timeout, which the socket keeps (see `commit`).
                Some(READ_BLOCK),
                || format!("marking the message actor {actor_id} runs"),
                |c| {
                    RUNNING
                        .key(&keys.state)
                        .key(&keys.lease)
                        .arg(lease)
                        .arg(&entry.id)
                        .invoke::<i64>(c)
                },
            )
        });
        match marked {
            Ok(_) => Ok(true),
            Err(Error::Redis { source, .. }) if source.code() == Some("STALE") => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn restore(&mut self) -> std::result::Result<&mut Box<dyn HostedActor>, String> {
        if self.actor.is_none() {
            let actor_type = self.actor_type;
            let Some(entry) = hosted::lookup_type(actor_type) else {
                let program = std::env::current_exe()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                return Err(format!(
                    "actor type {actor_type} is not registered in {program}, the program this \
                     host runs (#[derive(shoal::Actor)] in another build?)"
                ));
            };
            let actor = (entry.restore)(&self.saved, self.limit).map_err(|f| {
                format!(
                    "the saved state of actor {} does not decode: {}",
                    self.actor_id, f.message
                )
            })?;
            self.actor = Some(actor);
            self.retired.clear();
        }
        self.actor
            .as_mut()
            .ok_or_else(|| "the actor is not restored".to_string())
    }

    /// Applies a batch and commits it; `Some(ending)` when the actor thread must end.
    fn apply_and_commit(&mut self, entries: &[StreamId]) -> Result<Option<Ending>> {
        let was_active = self.status == "active";
        let mut panics = Panics::default();
        let mut answers = loop {
            match self.apply(entries, &mut panics) {
                Ok(answers) => break answers,
                Err(()) => {
                    // A handler panicked: restart from the last committed state, without it
                    // (kept until then: see `retired`).
                    self.retired.extend(self.actor.take());
                }
            }
        };
        let restored_to_stop = self.restore_before_commit(was_active);
        let (data, transfers) = self.state_to_commit(restored_to_stop, &mut answers);
        let replies = self.encode_replies(answers);
        // Never back: a batch of entries applied before (a new host reads those the trim by
        // nodes left) changes nothing but their removal.
        let applied = match entries.last() {
            Some(last) if is_after(&last.id, &self.applied) => last.id.clone(),
            _ => self.applied.clone(),
        };
        let marks = self.deaths.marks_to_clear(&applied);
        let committed = self.commit(&data, &applied, &replies, marks);
        match committed {
            Ok(()) => {
                self.deaths.committed(&applied, marks);
                self.saved = data;
                self.applied = applied;
                if let Some(transfers) = transfers {
                    give_back(std::mem::replace(&mut self.committed_transfers, transfers));
                }
                if self.status != "active" {
                    give_back(std::mem::take(&mut self.committed_transfers));
                }
                Ok(None)
            }
            // Not committed, unless an attempt whose answer was lost was (the script then
            // finds the lease gone): the transfers stay, renewed while this host lives.
            Err(Error::Redis { source, .. }) if source.code() == Some("STALE") => {
                Ok(Some(Ending::Lost))
            }
            // Perhaps committed: the same.
            Err(e) => Err(e),
        }
    }

    /// Restores the actor when the batch left no live instance for the state about to be
    /// committed: after a panic (the saved state's transfers were claimed by the instance
    /// that panicked, and are gone: the state is saved again from the restored instance, with
    /// transfers of its own), and when the batch stopped an actor this activation had not
    /// restored (its pipe ends are then claimed, and let go of when the activation ends,
    /// rather than left to a transfer nobody will claim). Whether it restored it only to
    /// stop it.
    fn restore_before_commit(&mut self, was_active: bool) -> bool {
        let stopped_here = was_active && self.status == "stopped";
        let after_panic = self.status == "active" && !self.retired.is_empty();
        if self.actor.is_some() || !(after_panic || stopped_here) {
            return false;
        }
        match self.restore().map(|_| ()) {
            Ok(()) => stopped_here,
            Err(reason) if self.status == "active" => {
                self.fail(reason);
                false
            }
            Err(reason) => {
                tracing::warn!("actor {}: {reason}", self.actor_id);
                false
            }
        }
    }

    /// The state to commit, and the transfers that saving it registered (`None`: the saved
    /// state, whose transfers are the committed ones).
    ///
    /// A state that cannot be saved (too large for `redis.max_message_bytes`, a pipe end that
    /// cannot be passed...) fails the actor: the last committed state is committed again with
    /// the failure, so none of the batch's effects are, and every reply of the batch that said
    /// its message succeeded (`answers`) is turned into the failed actor's error. Replies that
    /// are errors already (a panic, a message that did not decode...) stay.
    ///
    /// Saving a state that holds pipe ends passes them (a transfer each, for whoever decodes it
    /// next: see `shoal_core::transfers`). Once a state is committed, the one it replaces will
    /// never be decoded, and its transfers are given back, and so are the committed state's own
    /// once the actor is stopped or failed (it is never decoded again); those of a state that could
    /// not be saved, at once. An actor restored only to stop it is not saved again: nothing decodes
    /// a stopped actor's state, and a save that failed (an end closed meanwhile) would turn the
    /// stop into a failure.
    fn state_to_commit(
        &mut self,
        restored_to_stop: bool,
        answers: &mut [Answer],
    ) -> (Vec<u8>, Option<SentTransfers>) {
        match &self.actor {
            // Nor is one stopped by this batch (a failed save would turn the stop into a
            // failure).
            Some(_) if restored_to_stop || self.status == "stopped" => (self.saved.clone(), None),
            Some(actor) => match collect_transfers(|| actor.save(self.limit)) {
                (Ok(data), transfers) => (data, Some(transfers)),
                (Err(f), transfers) => {
                    give_back(transfers);
                    let reason = format!(
                        "its state cannot be saved: {} (the changes of its last batch of \
                         messages were not committed)",
                        f.message
                    );
                    self.fail(reason.clone());
                    for answer in answers.iter_mut() {
                        if matches!(answer.reply, Some(Reply::Ok(_))) {
                            answer.reply = Some(Reply::Failed(reason.clone()));
                        }
                    }
                    (self.saved.clone(), None)
                }
            },
            None => (self.saved.clone(), None),
        }
    }

    /// The batch's replies as the commit writes them: `(entry id, reply key, encoded reply)`,
    /// the key empty for a tell or an entry committed before (nothing to write).
    fn encode_replies(&self, answers: Vec<Answer>) -> Vec<(String, String, Vec<u8>)> {
        answers
            .into_iter()
            .map(|answer| match &answer.reply {
                Some(reply) if !answer.reply_key.is_empty() => {
                    let encoded = self
                        .store
                        .encode(reply, &answer.reply_key)
                        .unwrap_or_else(|e| {
                            self.store
                                .encode(&Reply::Error(e.to_string()), &answer.reply_key)
                                .unwrap_or_default()
                        });
                    (answer.id, answer.reply_key, encoded)
                }
                _ => (answer.id, String::new(), Vec::new()),
            })
            .collect()
    }

    /// Runs every entry; `Err(())` after the first new panic (recorded in `panics`).
    fn apply(
        &mut self,
        entries: &[StreamId],
        panics: &mut Panics,
    ) -> std::result::Result<Vec<Answer>, ()> {
        let mut answers = Vec::with_capacity(entries.len());
        for entry in entries {
            let mut reply_key = entry.get::<String>("r").unwrap_or_default();
            if !reply_key.is_empty() && !reply_key.starts_with(&self.keys.reply_prefix) {
                // Not a reply key of this actor (only a message written by other means has
                // one): a reply is never written outside the actor's keys.
                tracing::warn!(
                    "actor {}: entry {} names reply key {reply_key:?}, not one of the actor's; \
                     no reply is written",
                    self.actor_id,
                    entry.id
                );
                reply_key.clear();
            }
            if !is_after(&entry.id, &self.applied) {
                // Committed already (its reply too): only remove it.
                answers.push(Answer {
                    id: entry.id.clone(),
                    reply_key: String::new(),
                    reply: None,
                });
                continue;
            }
            let reply = self.apply_one(entry, panics)?;
            answers.push(Answer {
                id: entry.id.clone(),
                reply_key,
                reply: Some(reply),
            });
        }
        Ok(answers)
    }

    fn apply_one(
        &mut self,
        entry: &StreamId,
        panics: &mut Panics,
    ) -> std::result::Result<Reply, ()> {
        if let Some(message) = panics.by_entry.get(&entry.id) {
            // A panic that restarted the batch. The one that spent the restart budget fails
            // the actor here: after the messages before it, which this run applied.
            let reply = Reply::Panic(message.clone());
            if let Some((id, reason)) = &panics.fatal
                && *id == entry.id
                && self.status == "active"
            {
                self.fail(reason.clone());
            }
            return Ok(reply);
        }
        if self.status == "active"
            && let Some((_, deaths)) = self
                .deaths
                .poisoned
                .take_if(|(poisoned, _)| *poisoned == entry.id)
        {
            return Ok(self.skip_poisoned(entry, deaths, panics));
        }
        match self.status.as_str() {
            "failed" => return Ok(Reply::Failed(self.reason.clone())),
            "stopped" => return Ok(Reply::Stopped),
            _ => {}
        }
        let (Some(kind), Some(payload)) = (field(entry, "k"), field(entry, "p")) else {
            let e = super::super::malformed(&self.keys.mailbox, &entry.id);
            return Ok(Reply::Error(e.to_string()));
        };
        if let Some(key) = &self.authkey {
            let reply_to = field(entry, "r").unwrap_or_default();
            let mac = field(entry, "h").unwrap_or_default();
            let parts = super::super::message_parts(self.actor_id, &kind, &payload, &reply_to);
            if let Err(e) = auth::verify(key, &parts, &mac, self.actor_id) {
                return Ok(Reply::Unauthenticated(e.to_string()));
            }
        }
        let kind = String::from_utf8_lossy(&kind).into_owned();
        if kind == super::super::STOP_KIND {
            self.status = "stopped".into();
            return Ok(Reply::Ok(ByteBuf::new()));
        }
        let limit = self.limit;
        let mut context = ActorContext::new(self.actor_id);
        let actor = match self.restore() {
            Ok(actor) => actor,
            Err(reason) => {
                self.fail(reason.clone());
                return Ok(Reply::Failed(reason));
            }
        };
        match actor.handle(&kind, &payload, limit, &mut context) {
            Ok(bytes) => {
                if context.stop_requested() {
                    self.status = "stopped".into();
                }
                Ok(Reply::Ok(ByteBuf::from(bytes)))
            }
            Err(Failure {
                kind: TaskErrorKind::Panic,
                message,
            }) => {
                if let Some(reason) = self.record_panic(&message) {
                    panics.fatal = Some((entry.id.clone(), reason));
                }
                panics.by_entry.insert(entry.id.clone(), message);
                Err(())
            }
            Err(failure) => Ok(Reply::Error(failure.message)),
        }
    }

    /// Answers a message that killed its host `deaths` times ([`HOST_DEATHS_PER_MESSAGE`] or
    /// more) as one whose handler panicked, without running it: the actor's state stays, and
    /// the deaths count as one panic against the restart budget, past which the actor fails
    /// here, at once (the messages before it in the batch are applied already, those after it
    /// get the failed actor's error, and no handler runs again, so the batch is not re-run).
    /// Recorded in `panics`, so that a re-run of the batch within the budget (a later message
    /// panicked) answers it alike without counting it again.
    fn skip_poisoned(&mut self, entry: &StreamId, deaths: u32, panics: &mut Panics) -> Reply {
        let message = format!(
            "the host process of actor {} died {deaths} times while handling this message (an \
             abort, a stack overflow, a kill...): it was skipped, and the actor's state is \
             unchanged",
            self.actor_id
        );
        tracing::error!("actor {}: message {}: {message}", self.actor_id, entry.id);
        if let Some(reason) = self.record_panic(&message) {
            self.fail(reason);
        }
        panics.by_entry.insert(entry.id.clone(), message.clone());
        Reply::Panic(message)
    }

    /// Counts a handler panic against the restart budget; past it, why the actor fails. The
    /// caller fails it when the batch's re-run reaches the message that panicked (see
    /// [`Panics::fatal`]), not now: the messages before it are applied first.
    fn record_panic(&mut self, message: &str) -> Option<String> {
        let now = shoal_core::clock::now_ms();
        let period = self.spec.restart_period_ms;
        self.failures.retain(|t| now.saturating_sub(*t) <= period);
        self.failures.push(now);
        (self.failures.len() > self.spec.max_restarts as usize).then(|| {
            format!(
                "{} handler panics within {} ms exceed actors.max_restarts = {} (last: {message})",
                self.failures.len(),
                period,
                self.spec.max_restarts
            )
        })
    }

    fn fail(&mut self, reason: String) {
        tracing::error!("actor {} failed: {reason}", self.actor_id);
        self.status = "failed".into();
        self.reason = reason;
    }

    /// Commits a batch: the state after it, the last entry applied, the replies to its asks,
    /// and its removal from the mailbox, only while the lease is this host's.
    ///
    /// When the read that returned the batch found the lease this host's and watched it, the
    /// commit is a `MULTI`/`EXEC` transaction on the same connection: `EXEC` applies it only if
    /// nobody wrote the lease since (a successor taking it, or the lease lapsing, aborts it).
    /// That costs Redis a fraction of a script's run. A transaction that did not run (aborted,
    /// a renewal touched the lease, or the connection failed) is followed by the commit script
    /// (`actor_commit.lua`), which checks the lease itself and is the authority: it commits,
    /// or answers `STALE`. Committing twice (the transaction ran, but its answer was lost) writes
    /// the same state again and a second copy of each reply, under its ask's own key, which
    /// nobody reads and which expires.
    ///
    /// The transaction trims the mailbox by whole stream nodes below the last entry applied
    /// (`XTRIM MINID ~ <applied>`): emptying the stream at every batch, only for the next
    /// message to make a new node, cost Redis more than the rest of the commit. It refreshes
    /// the TTLs of the state, the mailbox and the fencing counter once per
    /// [`ttl_refresh_every`]. The script trims every entry applied and refreshes the TTLs
    /// every time.
    fn commit(
        &mut self,
        data: &[u8],
        applied: &str,
        replies: &[(String, String, Vec<u8>)],
        marks: DeathMarks,
    ) -> Result<()> {
        let failures = self
            .failures
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let reply_ttl_ms = self.store.expiry_secs().saturating_mul(1000);
        let trim_from = next_entry_id(applied);
        let refresh_ttls = self
            .ttl_refreshed
            .is_none_or(|at| at.elapsed() >= ttl_refresh_every(self.store.expiry_secs()));
        // EXEC ends the watch, whatever its outcome. A connection opened since the read has
        // none: the script then.
        if self.watching.take() == Some(self.link.generation()) {
            let mut transaction = redis::pipe();
            transaction
                .atomic()
                .hset_multiple(
                    &self.keys.state,
                    &[
                        ("data", data),
                        ("applied", applied.as_bytes()),
                        ("status", self.status.as_bytes()),
                        ("reason", self.reason.as_bytes()),
                        ("failures", failures.as_bytes()),
                        ("handbacks", b"0"),
                    ],
                )
                .ignore();
            // Only after a host death (see `HostDeaths`): nothing on the hot path.
            if marks != DeathMarks::None {
                transaction.hdel(&self.keys.state, marks.fields()).ignore();
            }
            for (_, key, reply) in replies.iter().filter(|(_, key, _)| !key.is_empty()) {
                transaction
                    .rpush(key, reply.as_slice())
                    .ignore()
                    .pexpire(key, reply_ttl_ms as i64)
                    .ignore();
            }
            // Whole stream nodes below the last entry applied (see "Exactly once" in the
            // protocol's docs): that entry stays, and so does its node, for the next messages.
            transaction
                .cmd("XTRIM")
                .arg(&self.keys.mailbox)
                .arg("MINID")
                .arg("~")
                .arg(applied)
                .ignore();
            if refresh_ttls {
                transaction
                    .expire(&self.keys.state, self.store.expiry_secs() as i64)
                    .ignore()
                    .expire(&self.keys.mailbox, self.store.expiry_secs() as i64)
                    .ignore()
                    .expire(&self.keys.fence, self.store.expiry_secs() as i64)
                    .ignore();
            }
            let executed = self.store.with_held_conn(
                &mut self.link,
                // The read's timeout (0.5 s longer than a commit needs): the socket keeps it,
                // rather than two changes of it per batch.
                Some(READ_BLOCK),
                || format!("committing actor {}", self.actor_id),
                |c| transaction.query::<Option<()>>(c),
            );
            if executed.is_ok() {
                self.unwatched = Some(self.link.generation());
            }
            match executed {
                Ok(Some(())) => {
                    if refresh_ttls {
                        self.ttl_refreshed = Some(Instant::now());
                    }
                    return Ok(());
                }
                // Aborted: the script decides.
                Ok(None) => {}
                // Unknown whether it ran: the script again (see above).
                Err(e) if e.is_store_unreachable() => {}
                Err(e) => return Err(e),
            }
        }
        self.store.retry_unreachable(|| {
            self.store.with_conn(
                || format!("committing actor {}", self.actor_id),
                |c| {
                    let mut invocation = COMMIT.prepare_invoke();
                    invocation
                        .key(&self.keys.state)
                        .key(&self.keys.mailbox)
                        .key(&self.keys.lease)
                        .key(&self.keys.fence)
                        .arg(self.lease)
                        .arg(data)
                        .arg(applied)
                        .arg(&self.status)
                        .arg(&self.reason)
                        .arg(&failures)
                        .arg(self.store.expiry_secs())
                        .arg(reply_ttl_ms)
                        .arg(&trim_from)
                        .arg(marks.as_arg());
                    for (_, key, reply) in replies.iter().filter(|(_, key, _)| !key.is_empty()) {
                        invocation.arg(key).arg(reply.as_slice());
                    }
                    invocation.invoke::<i64>(c)
                },
            )
        })?;
        Ok(())
    }
}

/// The handler panics of one batch, for its re-runs (see [`ActorState::apply_and_commit`]).
#[derive(Default)]
struct Panics {
    /// Entry id → the panic's message: the entry is answered with it and not run again.
    by_entry: HashMap<String, String>,
    /// The panic that spent the restart budget (`actors.max_restarts`): its entry, and why the
    /// actor fails. The re-run fails the actor when it reaches that entry, so the messages
    /// before it are applied and committed as usual, and those after it get the failed actor's
    /// error.
    fatal: Option<(String, String)>,
}

/// What one entry of a batch came to.
struct Answer {
    /// The entry's id.
    id: String,
    /// Its reply key: empty for a tell (or a reply key that is not the actor's).
    reply_key: String,
    /// Its reply; `None` for an entry committed before (only removed).
    reply: Option<Reply>,
}

/// Gives back the transfers of a state that will not be decoded (see
/// [`ActorState::apply_and_commit`]); one that cannot be given back lapses after the lease.
fn give_back(transfers: SentTransfers) {
    if let Err(e) = transfers.release() {
        tracing::warn!("giving back the pipe ends of an actor's former state: {e}");
    }
}

/// How long a commit, or the host's lease renewals, go without refreshing the TTLs of the
/// actor's state, mailbox and fencing counter, for keys that expire `expiry_secs` after their
/// last refresh: a tenth of that (at most a minute), so that they outlive the last commit or
/// renewal by 90% of `expiry_secs` at least.
pub(super) fn ttl_refresh_every(expiry_secs: u64) -> Duration {
    Duration::from_millis(expiry_secs.saturating_mul(100)).min(Duration::from_secs(60))
}

/// The smallest stream entry id after `applied` (`<ms>-<seq>`): the commit script trims the
/// mailbox below it. An id that does not parse (never one Redis gave) trims below itself.
fn next_entry_id(applied: &str) -> String {
    match applied.split_once('-') {
        Some((ms, seq)) if ms.parse::<u64>().is_ok() => match seq.parse::<u64>() {
            Ok(seq) if seq < u64::MAX => format!("{ms}-{}", seq + 1),
            Ok(_) => match ms.parse::<u64>() {
                Ok(ms) if ms < u64::MAX => format!("{}-0", ms + 1),
                _ => applied.to_string(),
            },
            Err(_) => applied.to_string(),
        },
        _ => applied.to_string(),
    }
}

/// Whether stream entry `id` comes after `applied` (`<ms>-<seq>` ids).
fn is_after(id: &str, applied: &str) -> bool {
    let parse = |s: &str| -> (u64, u64) {
        let (ms, seq) = s.split_once('-').unwrap_or((s, "0"));
        (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
    };
    parse(id) > parse(applied)
}

#[cfg(test)]
mod tests {
    use super::{DeathMarks, HostDeaths, is_after, next_entry_id, ttl_refresh_every};
    use std::time::Duration;

    #[test]
    fn an_entry_is_skipped_at_the_limit_of_host_deaths_and_its_count_goes_once_applied() {
        // Two deaths: run again, marked, in suspect mode.
        let deaths = HostDeaths::new(true, "9-0".into(), "5-0".into(), 2);
        assert!(!deaths.is_poisoned("5-0"));
        assert_eq!(deaths.marks_to_clear("4-0"), DeathMarks::Running);
        assert_eq!(deaths.marks_to_clear("5-0"), DeathMarks::Deaths);
        // Three: skipped.
        let mut deaths = HostDeaths::new(true, "9-0".into(), "5-0".into(), 3);
        assert!(deaths.is_poisoned("5-0") && !deaths.is_poisoned("6-0"));
        deaths.committed("5-0", DeathMarks::Deaths);
        assert!(deaths.poisoned.is_none() && deaths.counted.is_none());
        // Suspect mode lasts until the last entry pending at the activation is applied.
        assert_eq!(deaths.marks_to_clear("6-0"), DeathMarks::Running);
        deaths.committed("6-0", DeathMarks::Running);
        assert!(deaths.suspect_until.is_some());
        deaths.committed("9-0", DeathMarks::Running);
        assert!(deaths.suspect_until.is_none());
        // The hot path: nothing to clear.
        assert_eq!(deaths.marks_to_clear("10-0"), DeathMarks::None);
        assert_eq!(DeathMarks::None.as_arg(), "");
        assert!(DeathMarks::None.fields().is_empty());
        // An actor that runs no handler (failed, stopped) is never suspect.
        let idle = HostDeaths::new(false, "9-0".into(), "5-0".into(), 3);
        assert!(idle.suspect_until.is_none() && idle.poisoned.is_none());
        assert_eq!(idle.marks_to_clear("9-0"), DeathMarks::None);
    }

    #[test]
    fn ttls_are_refreshed_every_tenth_of_the_expiry_and_at_least_every_minute() {
        assert_eq!(ttl_refresh_every(1), Duration::from_millis(100));
        assert_eq!(ttl_refresh_every(60), Duration::from_secs(6));
        assert_eq!(ttl_refresh_every(3600), Duration::from_secs(60));
        assert_eq!(ttl_refresh_every(u64::MAX), Duration::from_secs(60));
    }

    #[test]
    fn the_trim_starts_right_after_the_last_entry_applied() {
        assert_eq!(next_entry_id("1796611704851-1"), "1796611704851-2");
        assert_eq!(next_entry_id("5-0"), "5-1");
        assert_eq!(next_entry_id(&format!("5-{}", u64::MAX)), "6-0");
        assert!(is_after(&next_entry_id("9-9"), "9-9"));
        // Never an id Redis gives: trimmed below itself, nothing after it lost.
        assert_eq!(next_entry_id("garbage"), "garbage");
        assert_eq!(next_entry_id("5-x"), "5-x");
        assert_eq!(
            next_entry_id(&format!("{}-{}", u64::MAX, u64::MAX)),
            format!("{}-{}", u64::MAX, u64::MAX)
        );
    }

    #[test]
    fn stream_ids_compare_by_time_then_sequence() {
        assert!(is_after("5-0", "0-0"));
        assert!(is_after("5-1", "5-0"));
        assert!(is_after("10-0", "9-9"));
        assert!(!is_after("5-0", "5-0"));
        assert!(!is_after("4-9", "5-0"));
    }
}
