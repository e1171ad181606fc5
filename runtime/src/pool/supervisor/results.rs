//! The task that reads a pool's results stream and hands batches to the supervisor.
//!
//! It reads with `XREAD BLOCK` on a dedicated connection, [`READ_BATCH`] entries at a time (an
//! entry holds the outcomes of the chunks of one worker read, decoded here), and
//! trims what it read in the pipeline of a later read, every [`TRIM_EVERY`] entries or once a
//! second (one round trip per batch). Then it also trims the task stream of the chunks the
//! workers acknowledged (`shoal_executor::pool::trim_tasks`: one more round trip), since the
//! workers do not delete them. A failed read is reported to the supervisor (the store's
//! health, see `health`) and retried on a new connection; the next successful read reports
//! that Redis answers again.

use std::time::{Duration, Instant};

use actix::prelude::*;
use redis::streams::StreamReadReply;
use shoal_core::error::Error;
use shoal_executor::pool::{ResultEntry, trim_tasks};

use super::PoolSupervisor;

/// Most results read per round trip.
const READ_BATCH: usize = 512;
/// Results read between two trims of the results stream.
const TRIM_EVERY: usize = 1024;
/// How long the reader blocks before it checks that the pool still exists.
const READ_BLOCK: Duration = Duration::from_millis(200);

impl PoolSupervisor {
    pub(super) fn start_reader(&self, ctx: &mut Context<Self>) {
        let store = self.store.clone();
        let keys = self.keys.clone();
        let key = self.keys.results.clone();
        let me = ctx.address();
        actix::spawn(async move {
            let mut conn = None;
            let mut failing = false;
            let mut last = "0-0".to_string();
            let mut untrimmed = 0usize;
            let mut trimmed_at = Instant::now();
            while me.connected() {
                let started = Instant::now();
                let c = match &mut conn {
                    Some(c) => c,
                    None => match store.dedicated(Some(READ_BLOCK)).await {
                        Ok(c) => conn.insert(c),
                        Err(e) => {
                            failing = true;
                            me.do_send(StoreReport {
                                started,
                                error: Some(e),
                            });
                            actix::clock::sleep(READ_BLOCK).await;
                            continue;
                        }
                    },
                };
                let mut pipe = redis::pipe();
                if untrimmed > 0
                    && (untrimmed >= TRIM_EVERY || trimmed_at.elapsed() >= Duration::from_secs(1))
                {
                    pipe.cmd("XTRIM").arg(&key).arg("MINID").arg(&last).ignore();
                    untrimmed = 0;
                    trimmed_at = Instant::now();
                    if let Err(e) = trim_tasks(c, &keys).await {
                        // Harmless: the next trim removes them.
                        tracing::debug!("pool result reader: {e}");
                    }
                }
                pipe.cmd("XREAD")
                    .arg("COUNT")
                    .arg(READ_BATCH)
                    .arg("BLOCK")
                    .arg(READ_BLOCK.as_millis() as u64)
                    .arg("STREAMS")
                    .arg(&key)
                    .arg(&last);
                let read: redis::RedisResult<(Option<StreamReadReply>,)> =
                    pipe.query_async(c).await;
                let reply = match read {
                    Ok((reply,)) => reply,
                    Err(e) => {
                        let error = Error::redis(format!("reading {key}"), e);
                        tracing::warn!("pool result reader: {error}");
                        if error.is_store_unreachable() {
                            // The connection may be out of step or dead: open another.
                            conn = None;
                        }
                        failing = true;
                        me.do_send(StoreReport {
                            started,
                            error: Some(error),
                        });
                        actix::clock::sleep(READ_BLOCK).await;
                        continue;
                    }
                };
                if failing {
                    failing = false;
                    me.do_send(StoreReport {
                        started,
                        error: None,
                    });
                }
                let mut read = 0;
                let entries: Vec<ResultEntry> = reply
                    .into_iter()
                    .flat_map(|r| r.keys)
                    .flat_map(|k| k.ids)
                    .flat_map(|id| {
                        read += 1;
                        last = id.id.clone();
                        // A worker's entry carries the outcomes of all the chunks it read.
                        ResultEntry::parse(&store, &key, &id)
                    })
                    .collect();
                untrimmed += read;
                if !entries.is_empty() && me.send(Results(entries)).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// A batch from the results stream.
#[derive(Message)]
#[rtype(result = "()")]
struct Results(Vec<ResultEntry>);

impl Handler<Results> for PoolSupervisor {
    type Result = ();

    fn handle(&mut self, msg: Results, ctx: &mut Context<Self>) {
        for entry in msg.0 {
            self.on_result(entry);
        }
        self.maybe_stop(ctx);
    }
}

/// The outcome of a reader operation started at `started`: `None` when Redis answered again
/// after failures.
#[derive(Message)]
#[rtype(result = "()")]
struct StoreReport {
    started: Instant,
    error: Option<Error>,
}

impl Handler<StoreReport> for PoolSupervisor {
    type Result = ();

    fn handle(&mut self, msg: StoreReport, ctx: &mut Context<Self>) {
        let outcome = match &msg.error {
            Some(e) => Err(e),
            None => Ok(()),
        };
        self.store_report(ctx, msg.started, outcome);
    }
}
