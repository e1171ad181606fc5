//! This process's claims connection to one Redis ([`Link`]): acks written without waiting for
//! their replies, read before the next script, and written again (and waited for) after a
//! failure, so that no fetch follows a refused ack (see the module docs of `claims`).

use super::*;

/// What became of an ack.
pub(super) enum Ack {
    /// Written (its reply is read later): the item is this process's.
    Written,
    /// Written again after a failure and applied: the item is this process's.
    Applied,
    /// The item was given back to the queue before any ack of it was applied.
    NotOurs,
    /// The batch went stale before the ack could be written: nothing was written.
    TooLate,
}

/// An ack written and not known to be applied.
struct Unconfirmed {
    number: u64,
    /// The queue's fences hash (`claim_ack.lua` records acks written again there).
    fences: String,
}

/// This process's claims connection to one Redis: acks are written without waiting, and their
/// replies read before the next script.
#[derive(Default)]
pub(super) struct Link {
    /// The store whose Redis this is a connection to (the keeper settles it).
    pub(super) store: Option<Arc<Store>>,
    pub(super) conn: Option<redis::Connection>,
    /// Replies not read yet.
    pending: usize,
    /// The last ack written per claim since the replies were last all read.
    unconfirmed: HashMap<String, Unconfirmed>,
    /// Whether a reply read was an error, or the connection failed with replies pending: the
    /// unconfirmed acks are written again (`claim_ack.lua`) and waited for.
    pub(super) failed: bool,
}

impl Link {
    fn conn(&mut self, store: &Store) -> redis::RedisResult<&mut redis::Connection> {
        let conn = match self.conn.take() {
            Some(conn) => conn,
            None => {
                let settings = store.settings();
                let conn = redis::Client::open(store.url())?
                    .get_connection_with_timeout(settings.connect_timeout)?;
                conn.set_read_timeout(Some(settings.response_timeout))?;
                conn.set_write_timeout(Some(settings.response_timeout))?;
                conn
            }
        };
        Ok(self.conn.insert(conn))
    }

    /// Forgets the connection (a reply may be pending on it).
    fn drop_conn(&mut self) {
        self.conn = None;
        self.pending = 0;
        if !self.unconfirmed.is_empty() {
            self.failed = true;
        }
    }

    /// Whether acks wait to be written again.
    pub(super) fn needs_settling(&self) -> bool {
        self.failed || self.pending > 0
    }

    /// Writes the ack of the item `number` of this process's claim on `keys`'s queue, without
    /// waiting. After a failure, or with no connection open (opening one takes time, and the
    /// ack must not reach Redis later than the allowance checked before), the ack is written
    /// as `claim_ack.lua` with the unconfirmed ones and waited for, and its outcome returned.
    pub(super) fn ack(&mut self, store: &Store, keys: &QueueKeys, number: u64) -> Result<Ack> {
        if self.write_ack(keys, number) {
            return Ok(Ack::Written);
        }
        // Not written (a write that fails sends nothing of a command this small, and its
        // connection is dropped): on a new connection, waited for.
        self.confirm(store, Some((keys, number))).map(ours_or_not)
    }

    /// Writes the ack of the item `number` of this process's claim on `keys`'s queue on the
    /// open connection, without waiting and without any other I/O (an async get's, on its
    /// executor's thread); whether it was written. Nothing is written after a failure or with
    /// no connection open, and a write that fails drops the connection (the acks written
    /// before it are then confirmed by the next sync get, fetch or the keeper): the item's ack
    /// was not applied, so it is still the claim's.
    pub(super) fn write_ack(&mut self, keys: &QueueKeys, number: u64) -> bool {
        if self.failed {
            return false;
        }
        let Some(conn) = self.conn.as_mut() else {
            return false;
        };
        let packed = ack_command(&keys.claim, number).get_packed_command();
        match conn.send_packed_command(&packed) {
            Ok(()) => {
                self.pending += 1;
                self.unconfirmed.insert(
                    keys.claim.clone(),
                    Unconfirmed {
                        number,
                        fences: keys.claim_fences.clone(),
                    },
                );
                true
            }
            Err(_) => {
                self.drop_conn();
                false
            }
        }
    }

    /// Whether the item `number` of this process's claim on `keys`'s queue, whose ack's outcome
    /// is not known, is this process's: its ack is written again and waited for.
    pub(super) fn resolve(&mut self, store: &Store, keys: &QueueKeys, number: u64) -> Result<bool> {
        self.confirm(store, Some((keys, number)))
    }

    /// Writes every unconfirmed ack again (`claim_ack.lua`), and `item`'s (a claim's next item,
    /// not returned yet: it is never kept among the unconfirmed, so that only its own get
    /// decides it), and waits for the outcomes; returns `item`'s (`true`: it is this process's).
    fn confirm(&mut self, store: &Store, item: Option<(&QueueKeys, u64)>) -> Result<bool> {
        self.read_pending();
        let mut ours = false;
        let unconfirmed = std::mem::take(&mut self.unconfirmed);
        let result = (|| {
            let conn = self.conn(store)?;
            for (key, ack) in &unconfirmed {
                let _: i64 = ACK
                    .key(key)
                    .key(&ack.fences)
                    .arg(process_holder())
                    .arg(ack.number)
                    .arg(claims_ttl(store))
                    .invoke(conn)?;
            }
            if let Some((keys, number)) = item {
                let applied: i64 = ACK
                    .key(&keys.claim)
                    .key(&keys.claim_fences)
                    .arg(process_holder())
                    .arg(number)
                    .arg(claims_ttl(store))
                    .invoke(conn)?;
                ours = applied == 1;
            }
            Ok(())
        })();
        match result {
            Ok(()) => {
                self.failed = false;
                Ok(ours)
            }
            Err(e) => {
                self.unconfirmed = unconfirmed;
                if !is_reply(&e) {
                    self.drop_conn();
                }
                self.failed = true;
                Err(Error::redis("acknowledging items taken from a queue", e))
            }
        }
    }

    /// Reads the replies pending; notes an error reply, forgets the connection on a failure.
    fn read_pending(&mut self) {
        while self.pending > 0 {
            let Some(conn) = self.conn.as_mut() else {
                self.pending = 0;
                break;
            };
            match conn.recv_response() {
                // An error reply (`MISCONF`, `READONLY`...) comes as a value.
                Ok(redis::Value::ServerError(_)) => {
                    self.pending -= 1;
                    self.failed = true;
                }
                Ok(_) => self.pending -= 1,
                Err(e) if is_reply(&e) => {
                    self.pending -= 1;
                    self.failed = true;
                }
                Err(_) => self.drop_conn(),
            }
        }
    }

    /// Makes sure every ack written was applied.
    pub(super) fn settle(&mut self, store: &Store) -> Result<()> {
        self.read_pending();
        if self.failed {
            self.confirm(store, None).map(|_| ())
        } else {
            self.unconfirmed.clear();
            Ok(())
        }
    }

    /// Runs a claims script once every ack written was applied.
    pub(super) fn invoke(
        &mut self,
        store: &Store,
        what: &str,
        invocation: &redis::ScriptInvocation<'static>,
    ) -> Result<redis::Value> {
        self.settle(store)?;
        let result = self
            .conn(store)
            .and_then(|conn| invocation.invoke::<redis::Value>(conn));
        result.map_err(|e| {
            if !is_reply(&e) {
                self.drop_conn();
            }
            Error::redis(what, e)
        })
    }
}

fn ours_or_not(ours: bool) -> Ack {
    if ours { Ack::Applied } else { Ack::NotOurs }
}

/// The ack of every item numbered up to `number` in `claim`.
fn ack_command(claim: &str, number: u64) -> redis::Cmd {
    let mut cmd = redis::cmd("ZREMRANGEBYSCORE");
    cmd.arg(claim).arg("-inf").arg(number);
    cmd
}

/// Whether `e` is Redis's reply (the connection is still in step) rather than a failure to talk.
fn is_reply(e: &redis::RedisError) -> bool {
    !(e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_unrecoverable_error())
}
