//! The shared async multiplexed connections ([`Store::multiplexed`](super::Store::multiplexed),
//! [`AsyncStore::shared`](super::AsyncStore::shared)): redis-rs's `ConnectionManager`, which
//! reconnects by itself after its connection dropped, made again after its server answered
//! `READONLY`.
//!
//! A `ConnectionManager` reconnects only when its connection fails. A primary demoted in place
//! during a failover (`REPLICAOF`, a managed Redis or an operator moving the primary role behind
//! one address, without closing its clients as Sentinel does) keeps the connection open and
//! refuses every write with `READONLY`: the manager would stay on it until the process
//! restarted, while new connections to the same address reach the new primary. So the first
//! `READONLY` a command meets drops the manager it ran on (the command fails as it did, as a
//! store out of reach: nothing was applied), and the next caller opens a new one; commands
//! already under way on the old one finish there.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};

use super::StoreSettings;

/// Where the current manager is kept, with the number of the one it is.
#[derive(Default)]
pub(super) struct SharedSlot {
    inner: Arc<SlotInner>,
}

#[derive(Default)]
struct SlotInner {
    current: Mutex<Option<(ConnectionManager, u64)>>,
    /// Held while a manager is opened, so that callers arriving meanwhile share it.
    opening: tokio::sync::Mutex<()>,
    made: AtomicU64,
}

impl SharedSlot {
    /// The current manager, opened first when there is none.
    pub(super) async fn get(
        &self,
        client: &redis::Client,
        settings: &StoreSettings,
    ) -> RedisResult<SharedConnection> {
        if let Some(found) = self.current() {
            return Ok(found);
        }
        let _opening = self.inner.opening.lock().await;
        if let Some(found) = self.current() {
            return Ok(found);
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.connect_timeout))
            .set_response_timeout(Some(settings.response_timeout))
            // A failed command is reported at once; the reconnection goes on behind.
            .set_number_of_retries(1)
            .set_max_delay(std::time::Duration::from_millis(500));
        let manager = ConnectionManager::new_with_config(client.clone(), config).await?;
        let number = self.inner.made.fetch_add(1, Ordering::Relaxed);
        *lock(&self.inner.current) = Some((manager.clone(), number));
        Ok(SharedConnection {
            manager,
            number,
            slot: self.inner.clone(),
        })
    }

    fn current(&self) -> Option<SharedConnection> {
        lock(&self.inner.current)
            .as_ref()
            .map(|(manager, number)| SharedConnection {
                manager: manager.clone(),
                number: *number,
                slot: self.inner.clone(),
            })
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// A handle of the shared async connection (a cheap clone): a `ConnectionManager` that is
/// replaced after its server answered `READONLY` (see the module docs). Use it as any redis-rs
/// async connection (`query_async(&mut conn)`).
#[derive(Clone)]
pub struct SharedConnection {
    manager: ConnectionManager,
    number: u64,
    slot: Arc<SlotInner>,
}

impl std::fmt::Debug for SharedConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedConnection")
            .field("number", &self.number)
            .finish_non_exhaustive()
    }
}

impl SharedConnection {
    /// After a reply of `READONLY`: the manager this handle came from is dropped from the slot
    /// (unless another was put there already), so the next caller opens a new connection.
    fn note_refusal(&self) {
        let mut current = lock(&self.slot.current);
        if matches!(&*current, Some((_, number)) if *number == self.number) {
            tracing::debug!(
                "the shared Redis connection's server is no longer a primary (READONLY): \
                 the next command opens a new connection"
            );
            *current = None;
        }
    }
}

/// Whether `e` says the server is no longer a primary: `READONLY`, or a transaction aborted
/// because a command of it was refused so.
fn is_read_only(e: &RedisError) -> bool {
    match e.kind() {
        redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly) => true,
        redis::ErrorKind::Server(redis::ServerErrorKind::ExecAbort) => {
            e.detail().is_some_and(|d| d.contains("READONLY"))
        }
        _ => false,
    }
}

/// Whether a reply (or a pipeline's replies) carries a `READONLY` refusal.
fn refused(value: &Value) -> bool {
    match value {
        Value::ServerError(e) => e.code() == "READONLY",
        Value::Array(values) => values.iter().any(refused),
        _ => false,
    }
}

impl ConnectionLike for SharedConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let result = self.manager.req_packed_command(cmd).await;
            match &result {
                Err(e) if is_read_only(e) => self.note_refusal(),
                Ok(value) if refused(value) => self.note_refusal(),
                _ => {}
            }
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let result = self
                .manager
                .req_packed_commands(pipeline, offset, count)
                .await;
            match &result {
                Err(e) if is_read_only(e) => self.note_refusal(),
                Ok(values) if values.iter().any(refused) => self.note_refusal(),
                _ => {}
            }
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.manager.get_db()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_only_refusals_are_told_apart_from_other_errors() {
        let read_only =
            redis::parse_redis_value(b"-READONLY You can't write against a read only replica.\r\n")
                .expect("a reply");
        assert!(refused(&read_only));
        assert!(refused(&Value::Array(vec![Value::Okay, read_only.clone()])));
        let other = redis::parse_redis_value(b"-ERR wrong number of arguments\r\n").expect("reply");
        assert!(!refused(&other));
        assert!(!refused(&Value::Okay));
        let error = read_only.extract_error().expect_err("an error");
        assert!(is_read_only(&error));
        let aborted = redis::parse_redis_value(
            b"-EXECABORT Transaction discarded because of: -READONLY You can't write\r\n",
        )
        .expect("reply")
        .extract_error()
        .expect_err("an error");
        assert!(is_read_only(&aborted));
        let other = other.extract_error().expect_err("an error");
        assert!(!is_read_only(&other));
    }
}
