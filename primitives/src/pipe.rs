//! `Pipe` and `Connection`: two ends that send messages to each other, Python's
//! `multiprocessing.Pipe`.
//!
//! # Semantics
//!
//! [`Pipe::new`]`(true)` returns two ends that both send and receive; `Pipe::new(false)` returns
//! `(receiver, sender)`: the first end only receives, the second only sends, and the wrong
//! direction is [`Error::InvalidState`]. [`Connection::send`] appends a message to the other end;
//! [`Connection::recv`] takes the next one, blocking while there is none.
//! [`Connection::poll`] tells whether one is waiting (`Some(Duration::ZERO)`: without waiting;
//! `Some(t)`: waiting at most `t`; `None`: waiting as long as it takes), without taking it.
//!
//! Byte messages: [`Connection::send_bytes`] sends a slice of a buffer;
//! [`Connection::recv_bytes`] returns the next message's bytes, and a message longer than
//! `maxlength` is an error after which the connection is no longer readable (as in Python);
//! [`Connection::recv_bytes_into`] writes it into a buffer at an offset, and a buffer that is too
//! small is [`Error::BufferTooShort`] with the size needed, the message staying in the connection.
//!
//! End of file: [`Connection::close`] closes an end. The other end reads every message sent
//! before, then `recv` is [`Error::Closed`] (Python's `EOFError`), never a hang; sending to a
//! closed end is [`Error::Closed`] (Python's `BrokenPipeError`). An end is one object shared by
//! every process that has its handle: `close()` closes it for all of them (an OS pipe closes one
//! process's descriptor), so a parent should not close an end it handed to a child. An end whose
//! process died without closing it stays open.
//!
//! # Keys (hash tag `{<ns>:pipe:<id>}`)
//!
//! `state` (hash: `duplex`, `closed:0`, `closed:1`), `inbox:0`, `inbox:1` (lists of messages: a
//! codec payload for `send`, `0x00` + the bytes for `send_bytes`, the empty string for end of
//! file).
//!
//! # Round trips
//!
//! `send`/`send_bytes`: 1 (`pipe_send.lua`: checks both ends are open and appends; TTLs are set
//! when the inbox is created and refreshed every tenth of `redis.expiry_secs`). `recv`: 1
//! (`BLPOP`, plus one check per second of waiting). `poll`: 1 (`LLEN`, or `BLMOVE` from the inbox
//! to itself, which waits without taking). `close`: 1.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use shoal_core::error::{Error, Result};
use shoal_core::store::Store;

use crate::common::{self, Address, blpop, blpop_seconds, deadline, next_slice, ttl};

static SEND: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("pipe_send.lua")));
static CLOSE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("pipe_close.lua")));

/// First byte of a `send_bytes` message (a codec payload starts with its version, 1).
const BYTES_MESSAGE: u8 = 0;

/// Creates pipes.
#[derive(Debug)]
pub struct Pipe;

impl Pipe {
    /// A pipe: two connected ends. `duplex = false` gives `(receive-only, send-only)`.
    #[allow(clippy::new_ret_no_self)]
    pub fn new<T: Serialize + DeserializeOwned>(
        duplex: bool,
    ) -> Result<(Connection<T>, Connection<T>)> {
        let (context, address) = Address::create("pipe")?;
        let store = context.store();
        let state = address.keys().key("state");
        store
            .with_conn(
                || format!("creating {}", address.describe()),
                |c| {
                    redis::pipe()
                        .hset_multiple(
                            &state,
                            &[
                                ("duplex", u8::from(duplex)),
                                ("closed:0", 0),
                                ("closed:1", 0),
                            ],
                        )
                        .ignore()
                        .expire(&state, ttl(store) as i64)
                        .ignore()
                        .query::<()>(c)
                },
            )
            .map_err(|e| address.error(e))?;
        let end = |end: u8, can_send: bool, can_recv: bool| Connection {
            address: address.clone(),
            end,
            can_send,
            can_recv,
            unreadable: Arc::new(AtomicBool::new(false)),
            _message: PhantomData,
        };
        Ok(if duplex {
            (end(0, true, true), end(1, true, true))
        } else {
            (end(0, false, true), end(1, true, false))
        })
    }
}

/// One end of a pipe.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub struct Connection<T> {
    address: Address,
    end: u8,
    can_send: bool,
    can_recv: bool,
    /// Set after a message exceeded `recv_bytes`' maxlength (shared by this handle's clones).
    #[serde(skip)]
    unreadable: Arc<AtomicBool>,
    #[serde(skip)]
    _message: PhantomData<fn() -> T>,
}

impl<T> Clone for Connection<T> {
    fn clone(&self) -> Self {
        Connection {
            address: self.address.clone(),
            end: self.end,
            can_send: self.can_send,
            can_recv: self.can_recv,
            unreadable: self.unreadable.clone(),
            _message: PhantomData,
        }
    }
}

impl<T> std::fmt::Debug for Connection<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("pipe", &self.address.describe())
            .field("end", &self.end)
            .field("readable", &self.can_recv)
            .field("writable", &self.can_send)
            .finish()
    }
}

/// What `recv` found.
enum Message {
    Data(Vec<u8>),
    EndOfFile,
}

impl<T: Serialize + DeserializeOwned> Connection<T> {
    fn state_key(&self) -> String {
        self.address.keys().key("state")
    }

    fn inbox(&self, end: u8) -> String {
        self.address.keys().key(&format!("inbox:{end}"))
    }

    /// Whether this end can send.
    pub fn writable(&self) -> bool {
        self.can_send
    }

    /// Whether this end can receive.
    pub fn readable(&self) -> bool {
        self.can_recv
    }

    /// Sends a message to the other end.
    pub fn send(&self, message: &T) -> Result<()> {
        let store = common::store()?;
        let bytes = store.encode(message, &self.inbox(1 - self.end))?;
        self.send_raw(&store, &bytes)
    }

    /// Sends `buffer[offset..offset + size]` (to the end of the buffer when `size` is `None`)
    /// as one byte message.
    pub fn send_bytes(&self, buffer: &[u8], offset: usize, size: Option<usize>) -> Result<()> {
        let end = match size {
            Some(size) => offset.checked_add(size),
            None => Some(buffer.len()),
        };
        let slice = end
            .filter(|&end| offset <= end && end <= buffer.len())
            .map(|end| &buffer[offset..end])
            .ok_or_else(|| {
                Error::invalid_state(format!(
                    "offset {offset} and size {size:?} are outside a buffer of {} bytes",
                    buffer.len()
                ))
            })?;
        let store = common::store()?;
        let limit = store.settings().max_message_bytes;
        if slice.len() + 1 > limit {
            return Err(Error::TooLarge {
                key: self.inbox(1 - self.end),
                size: slice.len() + 1,
                limit,
            });
        }
        let mut message = Vec::with_capacity(slice.len() + 1);
        message.push(BYTES_MESSAGE);
        message.extend_from_slice(slice);
        self.send_raw(&store, &message)
    }

    fn send_raw(&self, store: &Store, message: &[u8]) -> Result<()> {
        if !self.can_send {
            return Err(Error::invalid_state(
                "this end of a one-way pipe only receives",
            ));
        }
        let result = store.with_conn(
            || format!("sending on {}", self.address.describe()),
            |c| {
                SEND.key(self.state_key())
                    .key(self.inbox(1 - self.end))
                    .arg(ttl(store))
                    .arg(self.end)
                    .arg(message)
                    .arg(common::now_ms())
                    .invoke::<u64>(c)
            },
        );
        match result {
            Ok(_) => Ok(()),
            Err(Error::Redis { source, .. }) if source.code() == Some("CLOSED") => {
                Err(Error::Closed("this connection is closed".into()))
            }
            Err(Error::Redis { source, .. }) if source.code() == Some("BROKEN") => Err(
                Error::Closed("the other end of the pipe is closed (broken pipe)".into()),
            ),
            Err(e) => Err(self.address.error(e)),
        }
    }

    fn check_readable(&self) -> Result<()> {
        if !self.can_recv {
            return Err(Error::invalid_state(
                "this end of a one-way pipe only sends",
            ));
        }
        if self.unreadable.load(Ordering::Acquire) {
            return Err(Error::invalid_state(
                "this connection is no longer readable: a message exceeded recv_bytes' maxlength",
            ));
        }
        Ok(())
    }

    /// Takes the next message, waiting as long as it takes.
    fn next_message(&self, store: &Store) -> Result<Message> {
        self.check_readable()?;
        let inbox = self.inbox(self.end);
        loop {
            if let Some(message) =
                blpop(store, &inbox, common::SLICE).map_err(|e| self.address.error(e))?
            {
                if message.is_empty() {
                    // Leave the marker for the next reader: end of file stays end of file.
                    let _ = store.with_conn(
                        || "keeping the end-of-file marker".into(),
                        |c| redis::cmd("LPUSH").arg(&inbox).arg("").query::<()>(c),
                    );
                    return Ok(Message::EndOfFile);
                }
                return Ok(Message::Data(message));
            }
            self.check_open(store)?;
        }
    }

    /// Errors when the pipe is gone or this end was closed.
    fn check_open(&self, store: &Store) -> Result<()> {
        let closed: Option<String> = store
            .with_conn(
                || format!("checking {}", self.address.describe()),
                |c| {
                    redis::cmd("HGET")
                        .arg(self.state_key())
                        .arg(format!("closed:{}", self.end))
                        .query(c)
                },
            )
            .map_err(|e| self.address.error(e))?;
        match closed.as_deref() {
            None => Err(self.address.gone()),
            Some("1") => Err(Error::Closed("this connection is closed".into())),
            _ => Ok(()),
        }
    }

    fn end_of_file(&self, store: &Store) -> Error {
        match self.check_open(store) {
            Err(e) => e,
            Ok(()) => Error::Closed("the other end closed the connection".into()),
        }
    }

    /// Receives the next message, waiting as long as it takes; [`Error::Closed`] once the other
    /// end is closed and everything it sent was read.
    pub fn recv(&self) -> Result<T> {
        let store = common::store()?;
        match self.next_message(&store)? {
            Message::EndOfFile => Err(self.end_of_file(&store)),
            Message::Data(bytes) if bytes.first() == Some(&BYTES_MESSAGE) => Err(Error::Codec {
                key: self.inbox(self.end),
                expected: std::any::type_name::<T>().into(),
                reason: "the message was sent with send_bytes: read it with recv_bytes".into(),
            }),
            Message::Data(bytes) => store.decode(&bytes, &self.inbox(self.end)),
        }
    }

    /// Receives the next message's bytes. A message longer than `maxlength` is an error, and the
    /// connection is no longer readable (Python's behaviour).
    pub fn recv_bytes(&self, maxlength: Option<usize>) -> Result<Vec<u8>> {
        let store = common::store()?;
        let bytes = match self.next_message(&store)? {
            Message::EndOfFile => return Err(self.end_of_file(&store)),
            Message::Data(bytes) => payload(bytes),
        };
        if let Some(max) = maxlength
            && bytes.len() > max
        {
            self.unreadable.store(true, Ordering::Release);
            return Err(Error::invalid_state(format!(
                "a message of {} bytes is longer than maxlength {max}; the connection is no \
                 longer readable",
                bytes.len()
            )));
        }
        Ok(bytes)
    }

    /// Receives the next message into `buffer` at `offset`; returns its length. A buffer too
    /// small is [`Error::BufferTooShort`] and the message stays in the connection.
    pub fn recv_bytes_into(&self, buffer: &mut [u8], offset: usize) -> Result<usize> {
        if offset > buffer.len() {
            return Err(Error::invalid_state(format!(
                "offset {offset} is outside a buffer of {} bytes",
                buffer.len()
            )));
        }
        let store = common::store()?;
        let raw = match self.next_message(&store)? {
            Message::EndOfFile => return Err(self.end_of_file(&store)),
            Message::Data(raw) => raw,
        };
        let start = usize::from(raw.first() == Some(&BYTES_MESSAGE));
        let len = raw.len() - start;
        if offset + len > buffer.len() {
            // Put it back in front: the caller can retry with a larger buffer.
            store
                .with_conn(
                    || format!("returning a message to {}", self.address.describe()),
                    |c| {
                        redis::cmd("LPUSH")
                            .arg(self.inbox(self.end))
                            .arg(&raw)
                            .query::<()>(c)
                    },
                )
                .map_err(|e| self.address.error(e))?;
            return Err(Error::BufferTooShort {
                needed: len,
                offset,
                available: buffer.len(),
            });
        }
        buffer[offset..offset + len].copy_from_slice(&raw[start..]);
        Ok(len)
    }

    /// Whether a message (or end of file) is waiting: without waiting for
    /// `Some(Duration::ZERO)`, at most `t` for `Some(t)`, as long as it takes for `None`.
    pub fn poll(&self, timeout: Option<Duration>) -> Result<bool> {
        self.check_readable()?;
        let store = common::store()?;
        let inbox = self.inbox(self.end);
        if timeout == Some(Duration::ZERO) {
            let (exists, len): (bool, usize) = store
                .with_conn(
                    || format!("polling {}", self.address.describe()),
                    |c| redis::pipe().exists(self.state_key()).llen(&inbox).query(c),
                )
                .map_err(|e| self.address.error(e))?;
            if !exists {
                return Err(self.address.gone());
            }
            return Ok(len > 0);
        }
        let deadline: Option<Instant> = deadline(timeout);
        loop {
            let Some(block) = next_slice(deadline) else {
                return Ok(false);
            };
            // Moving the head of the inbox to the head of the inbox waits without taking it.
            let head: Option<Vec<u8>> = store
                .with_blocking_conn(
                    Some(block),
                    || format!("polling {}", self.address.describe()),
                    |c| {
                        redis::cmd("BLMOVE")
                            .arg(&inbox)
                            .arg(&inbox)
                            .arg("LEFT")
                            .arg("LEFT")
                            .arg(blpop_seconds(block))
                            .query(c)
                    },
                )
                .map_err(|e| self.address.error(e))?;
            if head.is_some() {
                return Ok(true);
            }
            self.check_open(&store)?;
        }
    }

    /// Closes this end (for every process that has it): the other end reads what was sent, then
    /// end of file. Closing twice does nothing.
    pub fn close(&self) -> Result<()> {
        let store = common::store()?;
        let other_receives = self.can_send;
        store
            .with_conn(
                || format!("closing {}", self.address.describe()),
                |c| {
                    CLOSE
                        .key(self.state_key())
                        .key(self.inbox(1 - self.end))
                        .key(self.inbox(self.end))
                        .arg(ttl(&store))
                        .arg(self.end)
                        .arg(if other_receives { "1" } else { "0" })
                        .arg(if self.can_recv { "1" } else { "0" })
                        .invoke::<u64>(c)
                },
            )
            .map(|_| ())
            .map_err(|e| self.address.error(e))
    }
}

/// The bytes of a message: a `send_bytes` message without its marker, a `send` message whole.
fn payload(mut raw: Vec<u8>) -> Vec<u8> {
    if raw.first() == Some(&BYTES_MESSAGE) {
        raw.remove(0);
    }
    raw
}
