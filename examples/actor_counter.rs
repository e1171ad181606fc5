//! A counter actor that 4 processes send 10,000 increments to while its host is killed twice:
//! the final count is exact, and the number of activations shows the host changes.
//!
//! `cargo run -p shoal-examples --example actor_counter [-- MESSAGES_PER_SENDER]`

use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use shoal::prelude::*;

#[derive(Serialize, Deserialize, Default, shoal::Actor)]
#[actor(messages(Add, Total))]
struct Counter {
    total: u64,
}

#[derive(Serialize, Deserialize)]
struct Add(u64);

#[derive(Serialize, Deserialize)]
struct Total;

impl Handler<Add> for Counter {
    type Reply = u64;
    fn handle(&mut self, Add(n): Add, _: &mut ActorContext) -> u64 {
        self.total += n;
        self.total
    }
}

impl Handler<Total> for Counter {
    type Reply = u64;
    fn handle(&mut self, _: Total, _: &mut ActorContext) -> u64 {
        self.total
    }
}

/// Sends `count` increments; every 100th waits for its reply.
#[shoal::remote]
fn sender(counter: ActorRef<Counter>, count: u64) {
    for i in 1..=count {
        if i % 100 == 0 {
            counter.ask(Add(1), None).expect("ask");
        } else {
            counter.tell(Add(1)).expect("tell");
        }
    }
}

/// The pid of the host process that runs the actor now (from its lease and the host's
/// status record).
fn host_pid(rt: &shoal::Runtime, counter: &ActorRef<Counter>) -> Option<i32> {
    let mut c = redis::Client::open(rt.store_url())
        .ok()?
        .get_connection()
        .ok()?;
    let ns = &rt.config().shoal.namespace;
    let lease: Option<String> = redis::cmd("GET")
        .arg(format!("shoal:{{{ns}:actor:{}}}:lease", counter.id()))
        .query(&mut c)
        .ok()?;
    let host = lease?.split(':').next()?.to_string();
    redis::cmd("HGET")
        .arg(format!("shoal:{{{ns}:proc:{host}}}:status"))
        .arg("pid")
        .query(&mut c)
        .ok()?
}

fn main() -> shoal::Result<()> {
    let rt = shoal::init()?;
    let per_sender: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let counter = shoal::spawn_actor(Counter::default())?;
    counter.ask(Total, None)?;
    let senders: Vec<Process> = (0..4)
        .map(|_| Process::new(sender, (counter.clone(), per_sender)))
        .collect();
    for s in &senders {
        s.start()?;
    }
    let mut kills = 0;
    while kills < 2 && senders.iter().any(Process::is_alive) {
        std::thread::sleep(Duration::from_millis(300));
        if let Some(pid) = host_pid(&rt, &counter) {
            kill(Pid::from_raw(pid), Signal::SIGKILL)
                .map_err(|e| shoal::Error::invalid_state(format!("killing the host {pid}: {e}")))?;
            kills += 1;
            println!("killed the host (pid {pid}) with SIGKILL");
        }
    }
    for s in &senders {
        s.join(None)?;
    }
    let total = counter.ask(Total, None)?;
    let activations = counter.activations()?;
    let expected = 4 * per_sender;
    println!(
        "final count {total} (expected {expected}), host killed {kills} times, actor activated \
         {activations} times"
    );
    if total != expected || kills < 2 {
        eprintln!("wrong: every increment must be applied exactly once, with two kills");
        std::process::exit(1);
    }
    println!("every increment applied exactly once");
    Ok(())
}
