//! The actor behind a started `Process`: it launches the child through the executor, follows
//! its output and its exit, and records the exit code and the execution details.

use super::*;

/// What the actor launches when asked to start.
pub(super) struct PendingLaunch {
    pub(super) workload: Workload,
    pub(super) record: Option<TaskRecord>,
    pub(super) env: std::collections::BTreeMap<String, String>,
}

/// The actor that owns one child's lifecycle.
pub(super) struct ProcessActor {
    pub(super) id: String,
    pub(super) name: String,
    pub(super) function: String,
    pub(super) method: StartMethod,
    pub(super) store: Arc<Store>,
    pub(super) executor: Executor,
    pub(super) keys: ProcessKeys,
    pub(super) state: Arc<ProcessState>,
    pub(super) pending: Option<PendingLaunch>,
    /// Set while the child's output stream is being printed; the flag tells the reader that the
    /// exit is known.
    pub(super) output: Option<Arc<AtomicBool>>,
    pub(super) exit_code: Option<i32>,
    pub(super) started_at: SystemTime,
    pub(super) started_instant: Instant,
    pub(super) pid: Option<u32>,
    pub(super) details_dir: Option<PathBuf>,
    /// The pipe handles among the arguments, given back if the child never claimed them.
    pub(super) sent_transfers: Option<SentTransfers>,
    /// The exit is being recorded (see `ProcessActor::finish`).
    pub(super) finishing: bool,
}

impl Actor for ProcessActor {
    type Context = Context<Self>;
}

/// Launch the child; answers its pid.
#[derive(Message)]
#[rtype(result = "Result<Option<u32>>")]
pub(super) struct StartChild;

/// Signal the child.
#[derive(Message)]
#[rtype(result = "Result<()>")]
pub(super) struct StopChild(pub(super) StopSignal);

/// The output stream was printed to the end.
#[derive(Message)]
#[rtype(result = "()")]
struct OutputFinished;

impl Handler<StartChild> for ProcessActor {
    // Atomic: no other message (a thread child that ended at once reports its exit) is handled
    // before the start's reply is sent.
    type Result = AtomicResponse<Self, Result<Option<u32>>>;

    fn handle(&mut self, _: StartChild, ctx: &mut Context<Self>) -> Self::Result {
        let Some(pending) = self.pending.take() else {
            return AtomicResponse::new(Box::pin(fut::ready(Err(Error::invalid_state(
                "already started",
            )))));
        };
        let store = self.store.clone();
        let keys = self.keys.clone();
        let executor = self.executor.clone();
        let streaming = pending.record.as_ref().is_some_and(|r| r.stream_output);
        let launch = Launch {
            id: self.id.clone(),
            name: self.name.clone(),
            workload: pending.workload,
            env: pending.env,
            // Nothing runs for nobody: a child does not outlive a parent that died.
            die_with_parent: true,
            notify: ctx.address().recipient(),
        };
        let record = pending.record;
        AtomicResponse::new(Box::pin(
            async move {
                if let Some(record) = &record {
                    record.write(&store, &keys).await?;
                }
                let launched = executor.launch(launch).await;
                if launched.is_err() && record.is_some() {
                    // A worker started all the same (a Kubernetes Job the API server made
                    // although its creation failed) must find nothing to run: no process
                    // tracks it.
                    let deleted = async {
                        let mut conn = store.multiplexed().await?;
                        redis::cmd("DEL")
                            .arg(&keys.task)
                            .query_async::<()>(&mut conn)
                            .await
                            .map_err(|e| Error::redis(format!("deleting {}", keys.task), e))
                    }
                    .await;
                    if let Err(e) = deleted {
                        tracing::warn!("the launch failed, and its task record stays: {e}");
                    }
                }
                launched
            }
            .into_actor(self)
            .map(move |result: Result<Launched>, act, ctx| {
                let launched = match result {
                    Ok(launched) => launched,
                    Err(e) => {
                        // Nothing will claim the handles among its arguments.
                        act.release_transfers();
                        return Err(e);
                    }
                };
                act.started_instant = Instant::now();
                act.started_at = SystemTime::now();
                act.pid = launched.pid;
                if streaming {
                    act.print_output(ctx);
                }
                Ok(launched.pid)
            }),
        ))
    }
}

impl Handler<StopChild> for ProcessActor {
    type Result = ResponseFuture<Result<()>>;

    fn handle(&mut self, msg: StopChild, _: &mut Context<Self>) -> Self::Result {
        let executor = self.executor.clone();
        let id = self.id.clone();
        let exited = self.exit_code.is_some();
        Box::pin(async move {
            if exited {
                return Ok(());
            }
            executor.signal(id, msg.0).await
        })
    }
}

impl Handler<WorkerExited> for ProcessActor {
    type Result = ();

    fn handle(&mut self, msg: WorkerExited, ctx: &mut Context<Self>) {
        self.exit_code = Some(msg.code);
        self.release_transfers();
        match &self.output {
            Some(exit_known) => exit_known.store(true, Ordering::Release),
            None => self.finish(ctx),
        }
    }
}

impl Handler<OutputFinished> for ProcessActor {
    type Result = ();

    fn handle(&mut self, _: OutputFinished, ctx: &mut Context<Self>) {
        self.output = None;
        if self.exit_code.is_some() {
            self.finish(ctx);
        }
    }
}

impl ProcessActor {
    /// Gives back the pipe handles among the child's arguments that it never claimed (it died
    /// or failed before decoding them), so their other ends see end of file once their real
    /// holders let go, not when this process exits. Off the actor's thread: one round trip
    /// per handle.
    fn release_transfers(&mut self) {
        let Some(sent) = self.sent_transfers.take().filter(|s| !s.is_empty()) else {
            return;
        };
        let name = self.name.clone();
        let spawned = std::thread::Builder::new()
            .name("shoal-transfers".into())
            .spawn(move || {
                if let Err(e) = sent.release() {
                    tracing::warn!("giving back the pipe handles passed to {name}: {e}");
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("giving back the pipe handles passed to {}: {e}", self.name);
        }
    }

    /// Prints the child's output stream until `eof`, or until a read after the exit finds
    /// nothing (a child that was killed writes no `eof`).
    fn print_output(&mut self, ctx: &mut Context<Self>) {
        let exit_known = Arc::new(AtomicBool::new(false));
        self.output = Some(exit_known.clone());
        let store = self.store.clone();
        let key = self.keys.output.clone();
        let me = ctx.address();
        actix::spawn(async move {
            print_stream(&store, key, &exit_known).await;
            me.do_send(OutputFinished);
        });
    }

    /// Records the exit once it is known and the output printed: the execution details first
    /// (on the blocking pool, never on the actor's thread), then the state the handles see.
    fn finish(&mut self, ctx: &mut Context<Self>) {
        let Some(code) = self.exit_code else {
            return;
        };
        if self.finishing {
            return;
        }
        self.finishing = true;
        let Some((dir, line)) = self.execution_details(code) else {
            self.exited(code, ctx);
            return;
        };
        // Waited for (the handles learn of the exit once the line is written), without holding
        // the actor's thread: a slow or stuck file system delays this child's exit only.
        ctx.spawn(
            async move {
                let written = tokio::task::spawn_blocking(move || {
                    append_line(&dir, &line).map_err(|e| (dir, e))
                })
                .await;
                match written {
                    Ok(Ok(())) => {}
                    Ok(Err((dir, e))) => {
                        tracing::warn!("writing execution details to {}: {e}", dir.display())
                    }
                    Err(e) => tracing::warn!("writing execution details: {e}"),
                }
            }
            .into_actor(self)
            .map(move |(), act, ctx| act.exited(code, ctx)),
        );
    }

    /// Tells the handles the exit, deletes a subprocess's keys and stops the actor.
    fn exited(&mut self, code: i32, ctx: &mut Context<Self>) {
        self.state.set_exited(code);
        if self.method == StartMethod::Process {
            let store = self.store.clone();
            let keys = self.keys.clone();
            actix::spawn(async move {
                let result = async {
                    let mut conn = store.multiplexed().await?;
                    redis::cmd("DEL")
                        .arg(&keys.task)
                        .arg(&keys.status)
                        .arg(&keys.output)
                        .query_async::<()>(&mut conn)
                        .await
                        .map_err(|e| Error::redis(format!("deleting {}", keys.task), e))
                }
                .await;
                if let Err(e) = result {
                    tracing::debug!("cleaning up a finished process: {e}");
                }
            });
        }
        ctx.stop();
    }

    /// The directory of the execution details and this child's line (JSON and a newline), when
    /// they are exported.
    fn execution_details(&self, code: i32) -> Option<(PathBuf, String)> {
        let dir = self.details_dir.clone()?;
        let secs = |t: SystemTime| {
            t.duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0)
        };
        let record = serde_json::json!({
            "name": self.name,
            "function": self.function,
            "start_method": match self.method {
                StartMethod::Process => "process",
                StartMethod::Thread => "thread",
            },
            "pid": self.pid,
            "started_at": secs(self.started_at),
            "ended_at": secs(SystemTime::now()),
            "duration_secs": self.started_instant.elapsed().as_secs_f64(),
            "exitcode": code,
        });
        let mut line = record.to_string();
        line.push('\n');
        Some((dir, line))
    }
}

/// Appends `line` to the execution details in `dir` with one `write` on a file opened for
/// appending, so that the lines of processes that end together do not interleave.
fn append_line(dir: &std::path::Path, line: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("shoal-execution-details.jsonl"))?
        .write_all(line.as_bytes())
}
