//! Durable actors when things go wrong around them, against a real redis-server: Redis going
//! away for longer than the response timeout, a host paused past its lease, an activation
//! request its reader never acknowledged, an asker's connection dropped while it waits, and a
//! state whose `Serialize` or `Deserialize` panics.

use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use shoal::ActorOptions;
use shoal::prelude::*;
use shoal_integration_tests::{TestRedis, wait_for};

shoal::test_support!();

const T: Option<Duration> = Some(Duration::from_secs(30));

/// A runtime of `hosts` hosts with a lease of `lease` seconds, on the embedded Redis or `url`.
fn runtime_with(hosts: u32, lease: f64, url: Option<String>) -> shoal::Runtime {
    let mut builder = Config::builder();
    if let Some(url) = url {
        builder = builder
            .redis_url(url)
            .response_timeout(Duration::from_millis(500));
    }
    let mut config = builder.build().expect("config");
    config.actors.hosts = hosts;
    config.actors.lease_secs = lease;
    config.actors.max_restarts = 2;
    config.actors.restart_period_secs = 60.0;
    shoal::init_with(config).expect("runtime")
}

/// A tally whose additions may take their time.
#[derive(Serialize, Deserialize, Default, Debug, shoal::Actor)]
#[actor(messages(Add, Get))]
struct Tally {
    n: u64,
}

/// `Add(by, ms)`: adds `by` after `ms` milliseconds.
#[derive(Serialize, Deserialize)]
struct Add(u64, u64);

#[derive(Serialize, Deserialize)]
struct Get;

impl Handler<Add> for Tally {
    type Reply = u64;
    fn handle(&mut self, Add(by, ms): Add, _: &mut ActorContext) -> u64 {
        std::thread::sleep(Duration::from_millis(ms));
        self.n += by;
        self.n
    }
}

impl Handler<Get> for Tally {
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

/// The activations stream and the live hosts of the default namespace.
const ACTIVATIONS: &str = "shoal:{default:actors:hosts}:activations";
const LIVE: &str = "shoal:{default:actors:hosts}:live";

/// The tally's committed count (`None` while nothing decodes), read from Redis without sending
/// the actor anything.
fn committed_tally(c: &mut redis::Connection, id: &str) -> Option<u64> {
    let data: Vec<u8> = redis::cmd("HGET")
        .arg(actor_key(id, "state"))
        .arg("data")
        .query(c)
        .ok()?;
    // The saved state is a format byte and the MessagePack value.
    rmp_serde::from_slice::<Tally>(data.get(1..)?)
        .ok()
        .map(|t| t.n)
}

/// Whether some host stamped its heartbeat in the last few seconds.
fn a_host_is_live(c: &mut redis::Connection) -> bool {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    redis::cmd("ZCOUNT")
        .arg(LIVE)
        .arg(now_ms.saturating_sub(3_000))
        .arg("+inf")
        .query::<u64>(c)
        .is_ok_and(|n| n > 0)
}

/// The pid of the host process that holds `actor` now, from its lease and the host's status.
fn host_pid(c: &mut redis::Connection, id: &str) -> Option<u32> {
    let lease: Option<String> = redis::cmd("GET")
        .arg(actor_key(id, "lease"))
        .query(c)
        .ok()?;
    let host = lease?.split(':').next()?.to_string();
    redis::cmd("HGET")
        .arg(format!("shoal:{{default:proc:{host}}}:status"))
        .arg("pid")
        .query(c)
        .ok()?
}

/// True when every thread of `pid` is stopped (state `T`).
fn stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("stat"))
            .ok()
            .and_then(|stat| {
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().next().map(|s| s == "T"))
            })
            .unwrap_or(true)
    })
}

/// Hosts that cannot reach Redis exit (75), and their replacements cannot even be launched:
/// many more than ten host ends within ten seconds. None of them may stop the hosting: once
/// Redis is back (empty, on the same port), a host runs again and actors are served.
#[test]
fn hosting_outlives_a_redis_outage_longer_than_the_response_timeout() {
    let mut redis = TestRedis::tcp();
    let _rt = runtime_with(1, 1.0, Some(redis.url()));
    let tally = shoal::spawn_actor(Tally::default()).expect("spawn");
    assert_eq!(tally.ask(Add(1, 0), T).expect("ask"), 1);
    redis.kill();
    std::thread::sleep(Duration::from_secs(6));
    redis.restart();
    let mut c = redis::Client::open(redis.url())
        .and_then(|c| c.get_connection())
        .expect("redis");
    let started = Instant::now();
    assert!(
        wait_for(Duration::from_secs(20), || a_host_is_live(&mut c)),
        "no actor host runs again after the outage"
    );
    eprintln!(
        "a host ran again {:?} after Redis came back",
        started.elapsed()
    );
    // The store came back empty: a new actor.
    let tally = shoal::spawn_actor(Tally::default()).expect("spawn after the outage");
    assert_eq!(tally.ask(Add(2, 0), T).expect("ask after the outage"), 2);
}

/// A host paused past its lease (no exit for the supervisor to see) while messages were sent
/// to its actor: their senders saw the lease, so none asked for a host. When the host wakes and
/// finds its lease gone, it asks for one: the messages are applied with nothing else sent.
#[test]
fn messages_sent_to_a_host_paused_past_its_lease_are_applied_without_another_send() {
    let rt = runtime_with(1, 1.0, None);
    let mut c = redis_of(&rt);
    let tally = shoal::spawn_actor(Tally::default()).expect("spawn");
    assert_eq!(tally.ask(Add(1, 0), T).expect("ask"), 1);
    let pid = host_pid(&mut c, tally.id()).expect("a host holds it");
    kill(Pid::from_raw(pid as i32), Signal::SIGSTOP).expect("SIGSTOP");
    assert!(
        wait_for(Duration::from_secs(5), || stopped(pid)),
        "host {pid} did not stop"
    );
    for _ in 0..3 {
        tally.tell(Add(1, 0)).expect("tell");
    }
    let (lease_held, requested): (bool, bool) = redis::pipe()
        .exists(actor_key(tally.id(), "lease"))
        .exists(actor_key(tally.id(), "activating"))
        .query(&mut c)
        .expect("lease");
    assert!(
        lease_held && !requested,
        "the tells did not see the lease: they asked for a host, the test tests nothing"
    );
    assert!(
        wait_for(Duration::from_secs(10), || !redis::cmd("EXISTS")
            .arg(actor_key(tally.id(), "lease"))
            .query::<bool>(&mut c)
            .unwrap_or(true)),
        "the lease did not lapse"
    );
    kill(Pid::from_raw(pid as i32), Signal::SIGCONT).expect("SIGCONT");
    assert!(
        wait_for(Duration::from_secs(10), || committed_tally(
            &mut c,
            tally.id()
        ) == Some(4)),
        "the messages sent while the host was paused wait in the mailbox (committed: {:?})",
        committed_tally(&mut c, tally.id())
    );
    assert_eq!(tally.ask(Get, T).expect("get"), 4);
}

/// Makes every activation request of the default namespace fail (the activations stream's
/// last id is the largest there is: `XADD` refuses), or work again.
fn break_activation_requests(c: &mut redis::Connection, broken: bool) {
    let last_id = if broken {
        format!("{}-{}", u64::MAX, u64::MAX)
    } else {
        "1-0".to_string()
    };
    redis::cmd("XSETID")
        .arg(ACTIVATIONS)
        .arg(last_id)
        .query::<()>(c)
        .expect("XSETID");
}

/// An activation request read by a consumer of the hosts' group that never acknowledged it (a
/// host that died between its read and its acknowledgement) is taken over by a live host, and
/// the message it was made for is applied with nothing else sent.
#[test]
fn an_activation_request_its_reader_never_acknowledged_is_taken_over() {
    let rt = runtime_with(1, 1.0, None);
    let mut c = redis_of(&rt);
    let tally = shoal::spawn_actor(Tally::default()).expect("spawn");
    assert!(
        wait_for(Duration::from_secs(20), || a_host_is_live(&mut c)),
        "no host started"
    );
    // A message in the mailbox, and no request for a host (nor its marker: the sender deletes
    // it when its request fails).
    break_activation_requests(&mut c, true);
    tally.tell(Add(1, 0)).expect("tell");
    break_activation_requests(&mut c, false);
    // A request, read at once by a consumer that then dies: inside the transaction, before
    // the blocked host is served.
    let (_, read): (String, redis::Value) = redis::pipe()
        .atomic()
        .cmd("XADD")
        .arg(ACTIVATIONS)
        .arg("*")
        .arg("a")
        .arg(tally.id())
        .cmd("XREADGROUP")
        .arg("GROUP")
        .arg("hosts")
        .arg("a-host-that-died")
        .arg("COUNT")
        .arg(10)
        .arg("STREAMS")
        .arg(ACTIVATIONS)
        .arg(">")
        .query(&mut c)
        .expect("a request read by a dead consumer");
    assert!(
        format!("{read:?}").contains(tally.id()),
        "the dead consumer did not read the request: {read:?}"
    );
    assert!(
        wait_for(Duration::from_secs(15), || committed_tally(
            &mut c,
            tally.id()
        ) == Some(1)),
        "the message waits for a request nobody will take over"
    );
}

/// Kills the connections blocked in a `BLPOP` (an asker's wait for its reply) once `after`
/// has passed since `started`, within `within`; returns when it killed one.
fn kill_blocked_waits(
    c: &mut redis::Connection,
    started: Instant,
    after: Duration,
    within: Duration,
) -> Option<Duration> {
    while started.elapsed() < after {
        std::thread::sleep(Duration::from_millis(5));
    }
    while started.elapsed() < after + within {
        let clients: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query(c)
            .expect("CLIENT LIST");
        let blocked: Vec<String> = clients
            .lines()
            .filter(|l| l.contains(" cmd=blpop ") && flags_of(l).contains('b'))
            .filter_map(|l| {
                l.split_whitespace()
                    .find_map(|f| f.strip_prefix("id="))
                    .map(str::to_string)
            })
            .collect();
        if !blocked.is_empty() {
            let at = started.elapsed();
            for id in blocked {
                let _: redis::RedisResult<u64> =
                    redis::cmd("CLIENT").arg("KILL").arg("ID").arg(&id).query(c);
            }
            return Some(at);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

/// The `flags=` field of a `CLIENT LIST` line.
fn flags_of(line: &str) -> &str {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix("flags="))
        .unwrap_or("")
}

/// Asks `tally` (a handle that has seen replies) to add 1 slowly, and drops the connection of
/// its wait for the reply after `after`: its message is in the mailbox and will be applied, so
/// the ask must get its reply, not an error its caller would retry (applying it twice).
fn ask_while_its_wait_is_cut(
    rt: &shoal::Runtime,
    tally: &ActorRef<Tally>,
    after: Duration,
    within: Duration,
    asking: impl FnOnce(ActorRef<Tally>) -> shoal::Result<u64> + Send + 'static,
) {
    let mut c = redis_of(rt);
    let before = tally.ask(Get, T).expect("get");
    let started = Instant::now();
    let asker = {
        let tally = tally.clone();
        std::thread::spawn(move || asking(tally))
    };
    let killed = kill_blocked_waits(&mut c, started, after, within);
    assert!(killed.is_some(), "no wait was seen to cut");
    let answered = asker.join().expect("asker");
    eprintln!("the wait was cut after {killed:?}; the ask answered {answered:?}");
    assert_eq!(
        answered.expect("the ask whose wait was cut"),
        before + 1,
        "the ask's own reply"
    );
    assert_eq!(tally.ask(Get, T).expect("get"), before + 1, "applied once");
}

/// The first wait of an ask sent with its checks (a transaction pipelined with the wait).
#[test]
fn an_ask_whose_first_wait_loses_its_connection_still_gets_its_reply() {
    let rt = runtime_with(1, 1.0, None);
    let tally = shoal::spawn_actor(Tally::default()).expect("spawn");
    ask_while_its_wait_is_cut(
        &rt,
        &tally,
        Duration::ZERO,
        Duration::from_millis(400),
        |tally| tally.ask(Add(1, 1500), T),
    );
}

/// A later wait of the ask (after the first slice, with the checks that a host has the actor).
#[test]
fn an_ask_whose_later_wait_loses_its_connection_still_gets_its_reply() {
    let rt = runtime_with(1, 1.0, None);
    let tally = shoal::spawn_actor(Tally::default()).expect("spawn");
    ask_while_its_wait_is_cut(
        &rt,
        &tally,
        Duration::from_millis(800),
        Duration::from_millis(1000),
        |tally| tally.ask(Add(1, 2500), T),
    );
}

/// The first wait of a signed ask (the send script pipelined with the wait).
#[test]
fn a_signed_ask_whose_first_wait_loses_its_connection_still_gets_its_reply() {
    let rt = runtime_with(1, 1.0, None);
    let tally = shoal::spawn_actor_with(Tally::default(), ActorOptions { authenticate: true })
        .expect("spawn");
    ask_while_its_wait_is_cut(
        &rt,
        &tally,
        Duration::ZERO,
        Duration::from_millis(400),
        |tally| tally.ask(Add(1, 1500), T),
    );
}

/// A later wait of an async ask.
#[test]
fn an_async_ask_whose_later_wait_loses_its_connection_still_gets_its_reply() {
    let rt = runtime_with(1, 1.0, None);
    let tally = shoal::spawn_actor(Tally::default()).expect("spawn");
    ask_while_its_wait_is_cut(
        &rt,
        &tally,
        Duration::from_millis(800),
        Duration::from_millis(1000),
        |tally| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio")
                .block_on(tally.ask_async(Add(1, 2500), T))
        },
    );
}

/// A part of a state whose `Serialize` panics when it is 1, and whose `Deserialize` panics
/// when it reads 2.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Trap(u8);

impl Serialize for Trap {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if self.0 == 1 {
            panic!("this state refuses to be saved");
        }
        serializer.serialize_u8(self.0)
    }
}

impl<'de> Deserialize<'de> for Trap {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = u8::deserialize(deserializer)?;
        if value == 2 {
            panic!("this state refuses to be restored");
        }
        Ok(Trap(value))
    }
}

/// An actor whose state can be made to panic when it is saved or restored.
#[derive(Serialize, Deserialize, Default, Debug, shoal::Actor)]
#[actor(messages(Arm, Get))]
struct Fragile {
    n: u64,
    trap: Trap,
}

/// `Arm(t)`: the trap becomes `t`.
#[derive(Serialize, Deserialize)]
struct Arm(u8);

impl Handler<Arm> for Fragile {
    type Reply = u64;
    fn handle(&mut self, Arm(t): Arm, _: &mut ActorContext) -> u64 {
        self.n += 1;
        self.trap = Trap(t);
        self.n
    }
}

impl Handler<Get> for Fragile {
    type Reply = u64;
    fn handle(&mut self, _: Get, _: &mut ActorContext) -> u64 {
        self.n
    }
}

/// The failure an ask to a failed actor gets, with `why` in its reason.
fn assert_failed(answered: shoal::Result<u64>, why: &str) {
    match answered {
        Err(Error::InvalidState(m)) => {
            assert!(m.contains("failed") && m.contains(why), "{m}")
        }
        other => panic!("expected the actor's failure ({why}), got {other:?}"),
    }
}

/// A panic in the state's `Serialize` (at the commit) is the actor's failure, as a state too
/// large to save is: its asks get the reason, rather than the host's actor thread dying and the
/// asks waiting until their timeout.
#[test]
fn a_state_whose_serialize_panics_fails_the_actor_with_the_reason() {
    let _rt = runtime_with(1, 1.0, None);
    let fragile = shoal::spawn_actor(Fragile::default()).expect("spawn");
    assert_eq!(fragile.ask(Arm(0), SHORT).expect("a state that saves"), 1);
    assert_failed(fragile.ask(Arm(1), SHORT), "refuses to be saved");
    assert_failed(fragile.ask(Get, SHORT), "refuses to be saved");
}

/// A panic in the state's `Deserialize` (at the activation) is the actor's failure, as a state
/// that does not decode is.
#[test]
fn a_state_whose_deserialize_panics_fails_the_actor_with_the_reason() {
    let _rt = runtime_with(1, 1.0, None);
    // Saved by the spawner (its `Serialize` is fine), restored by the host.
    let fragile = shoal::spawn_actor(Fragile {
        n: 0,
        trap: Trap(2),
    })
    .expect("spawn");
    assert_failed(fragile.ask(Get, SHORT), "refuses to be restored");
    assert_failed(fragile.ask(Get, SHORT), "refuses to be restored");
}

/// How long the asks to a fragile actor wait.
const SHORT: Option<Duration> = Some(Duration::from_secs(10));
