//! Sends without the send script: the sender's checks and the write in one `MULTI`/`EXEC`
//! transaction, for unsigned tells, and for unsigned asks to an actor believed active,
//! pipelined with the wait for the reply.
//!
//! Running `actor_send.lua` costs Redis several times the commands the script runs (on the
//! benchmark's machine, about 20 µs of script against 5 µs of commands, under the load of an
//! ask chain), and every message pays it. So an unsigned tell sends, in 1 round trip as the
//! script did:
//!
//! ```text
//! MULTI
//! HMGET <state> status verifier reason
//! EXISTS <lease>
//! XADD <mailbox> NOMKSTREAM * k <kind> p <payload>
//! EXEC
//! ```
//!
//! and once a handle has seen a reply, its unsigned asks send the same with the reply key
//! (`r <reply key>` in the entry) followed by the wait for the reply (`BLMOVE <reply key>
//! <landing> LEFT RIGHT <slice>` and `LPOP <landing>`: see [`reply_wait`]; `BLPOP` in the async
//! form), in one round trip as the pipelined script did.
//!
//! The transaction reads what the script checks at the instant it writes, so the caller gets
//! the script's outcomes: its errors (no actor, failed, stopped, signed), and an activation
//! request when no host holds the lease. The differences:
//!
//! * The script writes nothing when it refuses; here a refused message is in the mailbox when
//!   the check is read, and the sender deletes it (`XDEL`) at once. It is never applied in
//!   between: a host answers a failed or stopped actor's messages with the error, and refuses
//!   an unsigned message to a signed actor. A signed sender keeps the script.
//! * The mailbox's TTL is not refreshed by the send, only with the state's (by the host that
//!   holds the actor, among others: see "Lifetime" in the protocol's docs).
//! * The activation request, when no host holds the lease, takes 2 round trips after the
//!   transaction (`SET NX` of the activation marker, then the request) where the script's
//!   answer took 1 (the request). The marker is set after the check, so two senders racing a
//!   host's activation (which deletes the marker) may both ask: the host activating the actor
//!   skips the second request, and a script run by any other host refuses it (the lease is
//!   another's).
//!
//! A tell's refusal costs one more round trip (the `XDEL`), and so does a mailbox stream that
//! was not there (nothing written: the script sends it, and makes the stream).
//!
//! The async forms (`tell_async`, `ask_async`) send the same transaction on the async store's
//! shared connection (shoal's actor runtime's, or the caller's runtime's); an ask's wait goes
//! at the same time on a dedicated one (an async connection hands a pipeline's replies over
//! only together), and a refusal, a missing stream or a failed transaction ends it with the
//! same marker.
//!
//! An ask's wait is on its way when the checks come back. When they refuse, or there was no mailbox
//! stream to write to (`NOMKSTREAM`: nothing written; the script's send makes it), the sender ends
//! its own wait: it pushes an empty marker (never a reply: a reply is a MessagePack value) to its
//! reply key from another connection and reads it, leaving the connection ready for its next user
//! (a marker that comes too late for this wait is skipped by the next). When no host holds the
//! lease, it asks for an activation from another connection while the wait goes on.
//!
//! Once the transaction wrote the message, the send has succeeded: a failure to set the
//! activation marker or to ask for a host after it is logged, never returned (the caller would
//! send the message again, and it would be applied twice; see "Exactly once" in the protocol's
//! docs), and an ask's wait goes on, its next check asking again. So does a wait that failed
//! (its connection dropped, say): the next one opens a connection.

use std::time::Duration;

use shoal_core::error::{Error, Result};
use shoal_core::store::{AsyncStore, Store};

use super::{
    Mailbox, Outgoing, UNREQUESTED, blpop_seconds, refusal, request_activation_after_marker,
};

/// Puts an unsigned message in the mailbox with the transaction, without waiting for anything
/// (a tell, or an ask whose wait follows); `Ok(false)` when there was no mailbox stream
/// (nothing was written: send it with the script). Refusals are the script's errors, after the
/// entry written is deleted.
pub(super) fn tell(store: &Store, mailbox: &Mailbox, message: &Outgoing<'_>) -> Result<bool> {
    let actor_id = mailbox.actor_id.as_str();
    let transaction = transaction(mailbox, message);
    let exec: redis::Value = store.with_conn(
        || format!("sending to actor {actor_id}"),
        |c| transaction.query(c),
    )?;
    match check(exec, actor_id) {
        Checked::Written { needs_host } => {
            if needs_host {
                activate(store, mailbox);
            }
            Ok(true)
        }
        Checked::NoStream => Ok(false),
        Checked::Refused { error, written } => {
            if written.is_some() {
                take_back(store, mailbox, written.as_deref(), None);
            }
            Err(error)
        }
    }
}

/// The async form of [`tell`], on `store`'s shared connection.
pub(super) async fn tell_async(
    store: &AsyncStore,
    mailbox: &Mailbox,
    message: &Outgoing<'_>,
) -> Result<bool> {
    let actor_id = mailbox.actor_id.as_str();
    let mut conn = store.shared().await?;
    let exec: redis::Value = transaction(mailbox, message)
        .query_async(&mut conn)
        .await
        .map_err(|e| Error::redis(format!("sending to actor {actor_id}"), e))?;
    match check(exec, actor_id) {
        Checked::Written { needs_host } => {
            if needs_host {
                activate_async(store, mailbox).await;
            }
            Ok(true)
        }
        Checked::NoStream => Ok(false),
        Checked::Refused { error, written } => {
            if written.is_some() {
                take_back_async(store, mailbox, written.as_deref(), None).await;
            }
            Err(error)
        }
    }
}

/// The transaction: the checks the send script makes, and the message's entry.
fn transaction(mailbox: &Mailbox, message: &Outgoing<'_>) -> redis::Pipeline {
    let keys = &mailbox.keys;
    let mut transaction = redis::pipe();
    transaction
        .atomic()
        .cmd("HMGET")
        .arg(&keys.state)
        .arg("status")
        .arg("verifier")
        .arg("reason")
        .exists(&keys.lease);
    let xadd = transaction
        .cmd("XADD")
        .arg(&keys.mailbox)
        .arg("NOMKSTREAM")
        .arg("*")
        .arg("k")
        .arg(message.kind)
        .arg("p")
        .arg(message.payload);
    if let Some(reply_key) = message.reply_to {
        xadd.arg("r").arg(reply_key);
    }
    transaction
}

/// The transaction of an ask whose reply goes to `reply_key`.
fn ask_transaction(mailbox: &Mailbox, message: &Outgoing<'_>, reply_key: &str) -> redis::Pipeline {
    let message = Outgoing {
        reply_to: Some(reply_key),
        ..*message
    };
    transaction(mailbox, &message)
}

/// What a direct ask came to.
pub(super) enum DirectAsk {
    /// The message was written; its reply, or `None` when none came within the wait.
    Sent(Option<Vec<u8>>),
    /// Nothing was written (no mailbox stream): send it with the script.
    NotSent,
}

/// What the transaction found.
enum Checked {
    /// The message is in the mailbox; `needs_host` when no host held the lease.
    Written { needs_host: bool },
    /// Nothing written: there was no mailbox stream.
    NoStream,
    /// The script would have refused; `written`: the entry the transaction wrote all the same
    /// (deleted before the caller hears of the refusal).
    Refused {
        error: Error,
        written: Option<String>,
    },
}

/// Sends an unsigned ask to an actor believed active and waits for its reply for `block` (see
/// the module docs).
pub(super) fn ask(
    store: &Store,
    mailbox: &Mailbox,
    message: &Outgoing<'_>,
    reply_key: &str,
    block: Duration,
) -> Result<DirectAsk> {
    let actor_id = mailbox.actor_id.as_str();
    let mut packed = ask_transaction(mailbox, message, reply_key).get_packed_pipeline();
    packed.extend_from_slice(&reply_wait(reply_key, block));
    // Set once the transaction wrote the message: a failure after that (the wait's) is no
    // error of the ask (see the module docs).
    let mut written = false;
    let asked = store.with_blocking_conn(
        Some(block),
        || format!("asking actor {actor_id}"),
        |c| {
            c.send_packed_command(&packed)?;
            // MULTI's OK and a QUEUED per command: a command refused here makes EXEC fail.
            for _ in 0..4 {
                reply(c)?;
            }
            let checked = check(reply(c)?, actor_id);
            let waits = match &checked {
                Checked::Written { needs_host } => {
                    written = true;
                    if *needs_host {
                        activate(store, mailbox);
                    }
                    true
                }
                Checked::NoStream | Checked::Refused { .. } => false,
            };
            if !waits {
                let written = match &checked {
                    Checked::Refused { written, .. } => written.as_deref(),
                    _ => None,
                };
                take_back(store, mailbox, written, Some(reply_key));
            }
            let popped = read_reply_wait(c)?;
            Ok((checked, popped))
        },
    );
    let (checked, popped) = match asked {
        Ok(asked) => asked,
        // The message is in the mailbox: a wait that failed (its connection dropped, say) is
        // a wait that saw nothing; the next one opens a connection.
        Err(e) if written => {
            tracing::debug!("{e}; waiting again");
            return Ok(DirectAsk::Sent(None));
        }
        Err(e) => return Err(e),
    };
    match checked {
        Checked::Refused { error, .. } => Err(error),
        Checked::NoStream => Ok(DirectAsk::NotSent),
        // Nothing ends the wait of a message written but its reply, or its slice.
        Checked::Written { .. } => Ok(DirectAsk::Sent(popped.filter(|r| !r.is_empty()))),
    }
}

/// The async form of [`ask`]. An async connection hands a pipeline's replies over only once
/// they are all there, so the transaction goes on the shared connection and the wait on a
/// dedicated one, both at once (1 round trip in time, as the blocking form): when the checks
/// refuse, or the transaction fails, the sender ends its own wait with the marker as
/// [`ask`] does.
pub(super) async fn ask_async(
    store: &AsyncStore,
    mailbox: &Mailbox,
    message: &Outgoing<'_>,
    reply_key: &str,
    block: Duration,
) -> Result<DirectAsk> {
    let actor_id = mailbox.actor_id.as_str();
    let transaction = ask_transaction(mailbox, message, reply_key);
    let context = || format!("asking actor {actor_id}");
    let send = async {
        let checked = async {
            let mut conn = store.shared().await?;
            let exec: redis::Value = transaction
                .query_async(&mut conn)
                .await
                .map_err(|e| Error::redis(context(), e))?;
            Ok::<_, Error>(check(exec, actor_id))
        }
        .await;
        if let Ok(Checked::Written { needs_host: true }) = &checked {
            activate_async(store, mailbox).await;
        }
        let waits = matches!(checked, Ok(Checked::Written { .. }));
        // Redis out of reach: the marker would not get there either (and would wait for a
        // connection again); the wait ends with its slice.
        let unreachable = matches!(&checked, Err(e) if e.is_store_unreachable());
        if !waits && !unreachable {
            let written = match &checked {
                Ok(Checked::Refused { written, .. }) => written.as_deref(),
                _ => None,
            };
            take_back_async(store, mailbox, written, Some(reply_key)).await;
        }
        checked
    };
    let mut blpop = redis::cmd("BLPOP");
    blpop.arg(reply_key).arg(blpop_seconds(block));
    let wait = store.blocking::<Option<(String, Vec<u8>)>>(block, context, &blpop);
    let (checked, popped) = futures::future::join(send, wait).await;
    let popped = popped.map(|p| p.map(|(_, bytes)| bytes).filter(|b| !b.is_empty()));
    // A reply (never empty: a MessagePack value) on this ask's own key: the message was
    // applied, whatever the sender's side of it said.
    if let Ok(Some(reply)) = popped {
        return Ok(DirectAsk::Sent(Some(reply)));
    }
    match checked? {
        Checked::Refused { error, .. } => Err(error),
        Checked::NoStream => Ok(DirectAsk::NotSent),
        Checked::Written { .. } => match popped {
            // The message is in the mailbox: a wait that failed (its dedicated connection
            // was dead, say) is a wait that saw nothing; the next one opens a connection.
            Err(e) => {
                tracing::debug!("{e}; waiting again");
                Ok(DirectAsk::Sent(None))
            }
            Ok(_) => Ok(DirectAsk::Sent(None)),
        },
    }
}

/// The wait for an ask's reply, packed to be written behind other commands on a synchronous
/// connection: `BLMOVE` of the reply into a landing list of the ask's own, waiting at most
/// `block`, and the `LPOP` of that list behind it. Read its two replies with
/// [`read_reply_wait`]: when a stop signal interrupts the read of the wait's (`EINTR`, see
/// `shoal_core::error::is_interrupted`), the reply it moved comes with the `LPOP`'s all the
/// same (a `BLPOP`'s would be lost).
pub(super) fn reply_wait(reply_key: &str, block: Duration) -> Vec<u8> {
    let landing = format!("{reply_key}:landing");
    let mut pipe = redis::pipe();
    pipe.cmd("BLMOVE")
        .arg(reply_key)
        .arg(&landing)
        .arg("LEFT")
        .arg("RIGHT")
        .arg(blpop_seconds(block))
        .cmd("LPOP")
        .arg(&landing);
    pipe.get_packed_pipeline()
}

/// Reads the two replies of a [`reply_wait`]: the reply it took, if one came.
pub(super) fn read_reply_wait(c: &mut redis::Connection) -> redis::RedisResult<Option<Vec<u8>>> {
    let waited = match reply(c) {
        // redis-rs skips the wait's reply when it comes: the next read is the LPOP's.
        Err(e) if shoal_core::error::is_interrupted(&e) => redis::Value::Nil,
        other => other?,
    };
    let taken = reply(c)?;
    waited.extract_error()?;
    Ok(redis::from_redis_value(taken)?)
}

/// The next reply on `c` (a RESP3 push message is not one).
pub(super) fn reply(c: &mut redis::Connection) -> redis::RedisResult<redis::Value> {
    loop {
        match c.recv_response()? {
            redis::Value::Push { .. } => continue,
            value => return Ok(value),
        }
    }
}

/// Reads the transaction's answer (`EXEC`'s) as the script's checks.
fn check(exec: redis::Value, actor_id: &str) -> Checked {
    type Found = (
        (Option<String>, Option<Vec<u8>>, Option<String>),
        bool,
        Option<String>,
    );
    let found = exec
        .extract_error()
        .and_then(|exec| Ok(redis::from_redis_value::<Found>(exec)?));
    let ((status, verifier, reason), lease_held, entry) = match found {
        Ok(found) => found,
        Err(e) => {
            return Checked::Refused {
                error: Error::redis(format!("sending to actor {actor_id}"), e),
                written: None,
            };
        }
    };
    let refused = match status.as_deref() {
        None => refusal("NOACTOR", "", actor_id),
        Some("failed") => refusal("FAILED", reason.as_deref().unwrap_or(""), actor_id),
        Some("stopped") => refusal("STOPPED", "", actor_id),
        // The sender does not sign (the direct ask is for unsigned messages only).
        Some(_) if verifier.is_some_and(|v| !v.is_empty()) => refusal("AUTH", "", actor_id),
        Some(_) => None,
    };
    match (refused, entry) {
        (Some(error), written) => Checked::Refused { error, written },
        (None, None) => Checked::NoStream,
        (None, Some(_)) => Checked::Written {
            needs_host: !lease_held,
        },
    }
}

/// What a send answered 1 by the script is followed by: the activation marker, and when this
/// sender set it (no request stands), a request for a host. The message is in the mailbox
/// already, so nothing here fails the send: a marker that cannot be set is logged (no request
/// stands for this sender: the next sender, or the asker's next nudge, asks), and so is a
/// request that fails after it (see [`super::request_activation_after_marker`]).
fn activate(store: &Store, mailbox: &Mailbox) {
    let actor_id = mailbox.actor_id.as_str();
    let marked: Result<Option<String>> = store.with_conn(
        || format!("asking a host for actor {actor_id}"),
        |c| activation_marker(mailbox).query(c),
    );
    match marked {
        Ok(Some(_)) => {
            request_activation_after_marker(store, &mailbox.keys, &mailbox.hosts, actor_id)
        }
        Ok(None) => {}
        Err(e) => tracing::warn!("{e}; {UNREQUESTED}"),
    }
}

/// The async form of [`activate`].
async fn activate_async(store: &AsyncStore, mailbox: &Mailbox) {
    let marked = async {
        let mut conn = store.shared().await?;
        activation_marker(mailbox)
            .query_async::<Option<String>>(&mut conn)
            .await
            .map_err(|e| {
                let actor_id = &mailbox.actor_id;
                Error::redis(format!("asking a host for actor {actor_id}"), e)
            })
    };
    match marked.await {
        Ok(Some(_)) => mailbox.request_activation_after_marker_async(store).await,
        Ok(None) => {}
        Err(e) => tracing::warn!("{e}; {UNREQUESTED}"),
    }
}

/// Sets the activation marker unless a request stands (`Some` when this sender set it).
fn activation_marker(mailbox: &Mailbox) -> redis::Cmd {
    let mut set = redis::cmd("SET");
    set.arg(&mailbox.keys.activating)
        .arg(1)
        .arg("NX")
        .arg("PX")
        .arg(mailbox.activation_hold.as_millis() as u64);
    set
}

/// Undoes a direct send that does not go on, from another connection, in 1 round trip: deletes
/// the `written` entry of a refused message, and ends this sender's own wait on `wake` (an
/// empty marker pushed there, which the wait pops). Failing that, the entry is answered with
/// the refusal by the next host (or expires with the mailbox), and the wait ends at its
/// timeout.
fn take_back(store: &Store, mailbox: &Mailbox, written: Option<&str>, wake: Option<&str>) {
    let taken = store.with_conn(
        || format!("taking back a message to actor {}", mailbox.actor_id),
        |c| take_back_pipe(mailbox, written, wake).query::<()>(c),
    );
    if let Err(e) = taken {
        tracing::debug!("{e}; the refusal stands, the rest is left to time");
    }
}

/// The async form of [`take_back`].
async fn take_back_async(
    store: &AsyncStore,
    mailbox: &Mailbox,
    written: Option<&str>,
    wake: Option<&str>,
) {
    let taken = match store.shared().await {
        Ok(mut conn) => take_back_pipe(mailbox, written, wake)
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| {
                let actor_id = &mailbox.actor_id;
                Error::redis(format!("taking back a message to actor {actor_id}"), e)
            }),
        Err(e) => Err(e),
    };
    if let Err(e) = taken {
        tracing::debug!("{e}; the refusal stands, the rest is left to time");
    }
}

/// The commands of [`take_back`].
fn take_back_pipe(mailbox: &Mailbox, written: Option<&str>, wake: Option<&str>) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    if let Some(id) = written {
        pipe.xdel(&mailbox.keys.mailbox, &[id]).ignore();
    }
    if let Some(reply_key) = wake {
        pipe.rpush(reply_key, b"")
            .ignore()
            .pexpire(reply_key, (2 * super::ASK_SLICE.as_millis()) as i64)
            .ignore();
    }
    pipe
}
