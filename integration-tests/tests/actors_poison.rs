//! Durable actors whose handler kills its host's process (`std::process::abort()`), against a
//! real redis-server with real host processes: the message is answered as a panicking one once
//! it has killed hosts `HOST_DEATHS_PER_MESSAGE` (3) times, skipped, and counted against the
//! restart budget; the later messages are served.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal::TaskErrorKind;
use shoal::prelude::*;
use shoal_integration_tests::wait_for;

shoal::test_support!();

/// Long enough for a handful of host deaths, the supervisor's replacements and its back-off.
const LONG: Option<Duration> = Some(Duration::from_secs(60));
const T: Option<Duration> = Some(Duration::from_secs(30));

/// A runtime of two host processes (a message that kills one leaves the other to take the
/// actor while the dead one is replaced), with a budget of `max_restarts` panics.
fn runtime_with(max_restarts: u32) -> shoal::Runtime {
    let mut config = Config::builder().build().expect("config");
    config.actors.hosts = 2;
    config.actors.lease_secs = 1.0;
    config.actors.max_restarts = max_restarts;
    config.actors.restart_period_secs = 60.0;
    shoal::init_with(config).expect("runtime")
}

/// A tally whose handler aborts the process on [`BOMB`].
#[derive(Serialize, Deserialize, Default, Debug, shoal::Actor)]
#[actor(messages(Add, Get))]
struct Mine {
    n: u64,
}

/// The value [`Add`] aborts the host's process on.
const BOMB: u64 = 13;

/// `Add(by)`: adds `by`; `Add(BOMB)` aborts the process (after a pause: the host that takes the
/// actor next is then up before the one this kills is gone).
#[derive(Serialize, Deserialize)]
struct Add(u64);

#[derive(Serialize, Deserialize)]
struct Get;

impl Handler<Add> for Mine {
    type Reply = u64;
    fn handle(&mut self, Add(by): Add, _: &mut ActorContext) -> u64 {
        if by == BOMB {
            std::thread::sleep(Duration::from_millis(1500));
            std::process::abort();
        }
        self.n += by;
        self.n
    }
}

impl Handler<Get> for Mine {
    type Reply = u64;
    fn handle(&mut self, _: Get, _: &mut ActorContext) -> u64 {
        self.n
    }
}

/// A plain connection to the runtime's Redis.
fn redis_of(rt: &shoal::Runtime) -> redis::Connection {
    redis::Client::open(rt.store_url())
        .and_then(|c| c.get_connection())
        .expect("redis")
}

/// The key `suffix` of actor `id` in the default namespace.
fn actor_key(id: &str, suffix: &str) -> String {
    format!("shoal:{{default:actor:{id}}}:{suffix}")
}

/// Whether actor `id`'s mailbox holds an entry it has not applied.
fn has_pending(c: &mut redis::Connection, id: &str) -> bool {
    let applied: Option<String> = redis::cmd("HGET")
        .arg(actor_key(id, "state"))
        .arg("applied")
        .query(c)
        .unwrap_or(None);
    let after = format!("({}", applied.unwrap_or_else(|| "0-0".into()));
    redis::cmd("XRANGE")
        .arg(actor_key(id, "mailbox"))
        .arg(after)
        .arg("+")
        .arg("COUNT")
        .arg(1)
        .query::<Vec<(String, Vec<(String, Vec<u8>)>)>>(c)
        .is_ok_and(|entries| !entries.is_empty())
}

/// Asks `mine` for the bomb on a thread of its own, and tells it `Add(later)` once the bomb is
/// in the mailbox (behind it); returns the bomb's answer.
fn ask_the_bomb_then_tell(
    rt: &shoal::Runtime,
    mine: &ActorRef<Mine>,
    later: u64,
) -> shoal::Result<u64> {
    let mut c = redis_of(rt);
    let asker = {
        let mine = mine.clone();
        std::thread::spawn(move || mine.ask(Add(BOMB), LONG))
    };
    assert!(
        wait_for(Duration::from_secs(10), || has_pending(&mut c, mine.id())),
        "the bomb never reached the mailbox"
    );
    mine.tell(Add(later)).expect("tell behind the bomb");
    asker.join().expect("asker")
}

/// The error the bomb's ask gets: a panic's, saying the host died 3 times.
fn assert_host_deaths(answered: shoal::Result<u64>) {
    match answered {
        Err(Error::Task(e)) => {
            assert_eq!(e.kind, TaskErrorKind::Panic, "{e}");
            assert!(
                e.message.contains("host process") && e.message.contains("died 3 times"),
                "{e}"
            );
        }
        other => panic!("expected a panic's error naming the host deaths, got {other:?}"),
    }
}

/// A message whose handler aborts the host's process kills a few hosts (the one that ran it in
/// a batch, then three that ran it alone), then its ask is answered as a panicking message's
/// and it is skipped: the state is the one before it, the message sent after it is applied,
/// the actor (within its budget) serves the next asks, and the host-death marks are gone.
#[test]
fn a_message_that_aborts_its_host_is_answered_as_a_panic_after_three_host_deaths() {
    let rt = runtime_with(2);
    let mine = shoal::spawn_actor(Mine::default()).expect("spawn");
    assert_eq!(mine.ask(Add(1), T).expect("warm-up"), 1);
    let answered = ask_the_bomb_then_tell(&rt, &mine, 5);
    assert_host_deaths(answered);
    assert_eq!(
        mine.ask(Get, T).expect("the actor serves after the bomb"),
        6,
        "the bomb changed nothing, the message after it was applied once"
    );
    assert_eq!(mine.ask(Add(1), T).expect("add"), 7);
    let mut c = redis_of(&rt);
    let fields: Vec<Option<String>> = redis::cmd("HMGET")
        .arg(actor_key(mine.id(), "state"))
        .arg("status")
        .arg("running")
        .arg("deaths_entry")
        .arg("deaths")
        .arg("failures")
        .query(&mut c)
        .expect("HMGET");
    let [status, running, deaths_entry, deaths, failures] =
        <[Option<String>; 5]>::try_from(fields).expect("five fields");
    assert_eq!(status.as_deref(), Some("active"));
    assert_eq!(
        (running, deaths_entry, deaths),
        (None, None, None),
        "the host-death marks stay"
    );
    assert_eq!(
        failures.unwrap_or_default().split(',').count(),
        1,
        "the deaths count as one panic"
    );
}

/// With no panic allowed (`actors.max_restarts` 0), the message that killed its hosts fails the
/// actor as a panic past the budget does: its ask gets the panic's error, and the message
/// after it, and every later one, the failed actor's.
#[test]
fn a_message_that_aborts_its_host_fails_an_actor_with_no_restarts_left() {
    let rt = runtime_with(0);
    let mine = shoal::spawn_actor(Mine::default()).expect("spawn");
    assert_eq!(mine.ask(Add(1), T).expect("warm-up"), 1);
    assert_host_deaths(ask_the_bomb_then_tell(&rt, &mine, 5));
    match mine.ask(Get, T) {
        Err(Error::InvalidState(m)) => assert!(
            m.contains("failed") && m.contains("max_restarts") && m.contains("died 3 times"),
            "{m}"
        ),
        other => panic!("expected the actor's failure, got {other:?}"),
    }
}
