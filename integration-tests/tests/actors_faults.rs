//! Durable actors when things go wrong around them, against a real redis-server: Redis going
//! away for longer than the response timeout, a host paused past its lease, an activation
//! request its reader never acknowledged, an asker's connection dropped while it waits, a
//! state whose `Serialize` or `Deserialize` panics, hosts that come and go (ended in order or
//! killed), and another program's hosts that cannot run an actor while its own are away.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use shoal::ActorOptions;
use shoal::prelude::*;
use shoal_integration_tests::{TestRedis, children_of, wait_for};

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

/// A tally that counted one, its host stopped (`SIGSTOP`: no exit for the supervisor to see),
/// then three tells: the tally, the host's pid, and whether the tells saw the host's lease
/// (none asked for a host). The caller continues the host.
fn tell_a_stopped_host(c: &mut redis::Connection) -> (ActorRef<Tally>, u32, bool) {
    let tally = shoal::spawn_actor(Tally::default()).expect("spawn");
    assert_eq!(tally.ask(Add(1, 0), T).expect("ask"), 1);
    let pid = host_pid(c, tally.id()).expect("a host holds it");
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
        .query(c)
        .expect("lease");
    (tally, pid, lease_held && !requested)
}

/// A host paused past its lease (no exit for the supervisor to see) while messages were sent
/// to its actor: their senders saw the lease, so none asked for a host. When the host wakes and
/// finds its lease gone, it asks for one: the messages are applied with nothing else sent.
#[test]
fn messages_sent_to_a_host_paused_past_its_lease_are_applied_without_another_send() {
    let rt = runtime_with(1, 1.0, None);
    let mut c = redis_of(&rt);
    let (tally, pid, saw_lease) = tell_a_stopped_host(&mut c);
    assert!(
        saw_lease,
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

/// A host frozen for good (no exit for the supervisor to see, and it never wakes to ask for
/// a host itself) while messages were sent to its actor that saw its lease: another host takes
/// over once the frozen one's heartbeat is ten leases old, and the messages are applied with
/// nothing else sent. They waited for the next send before.
#[test]
fn messages_sent_to_a_host_frozen_for_good_are_applied_by_another_host() {
    let rt = runtime_with(2, 1.0, None);
    let mut c = redis_of(&rt);
    let (tally, pid, saw_lease) = tell_a_stopped_host(&mut c);
    let applied = saw_lease
        && wait_for(Duration::from_secs(30), || {
            committed_tally(&mut c, tally.id()) == Some(4)
        });
    let committed = committed_tally(&mut c, tally.id());
    kill(Pid::from_raw(pid as i32), Signal::SIGCONT).expect("SIGCONT");
    assert!(
        saw_lease,
        "the tells did not see the lease: they asked for a host, the test tests nothing"
    );
    assert!(
        applied,
        "the messages sent to the frozen host's actor wait in the mailbox (committed: \
         {committed:?})"
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
            // An ask waits with `BLMOVE` from a blocking caller, `BLPOP` from async code.
            .filter(|l| {
                (l.contains(" cmd=blpop ") || l.contains(" cmd=blmove "))
                    && flags_of(l).contains('b')
            })
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

/// The scenario program running its own actor hosts (2, with the default lease) in
/// `namespace` for `seconds`, then ending in order; killed when dropped.
struct OtherProgram(Child);

impl OtherProgram {
    fn start(redis_url: &str, namespace: &str, seconds: u32) -> OtherProgram {
        let mut child = Command::new(env!("CARGO_BIN_EXE_scenario"))
            .args(["actor-hosts", &seconds.to_string()])
            .env("SHOAL_REDIS_URL", redis_url)
            .env("SHOAL_NAMESPACE", namespace)
            .env("SHOAL_ACTORS_HOSTS", "2")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the other program starts");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let ready = lines
            .by_ref()
            .map_while(std::result::Result::ok)
            .any(|line| line == "ready");
        assert!(ready, "the other program's hosts run");
        // Whatever it prints later is read, so that it never writes to a closed pipe.
        std::thread::spawn(move || lines.for_each(drop));
        OtherProgram(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for OtherProgram {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A namespace of its own, for a test that shares its Redis with another program.
fn fresh_namespace(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// A runtime of one host with a lease of `lease` seconds, on `url`, in `namespace`.
fn runtime_in(url: &str, namespace: &str, lease: f64) -> shoal::Runtime {
    let mut config = Config::builder().build().expect("config");
    config.redis.url = Some(url.to_string());
    config.shoal.namespace = namespace.to_string();
    config.actors.hosts = 1;
    config.actors.lease_secs = lease;
    shoal::init_with(config).expect("runtime")
}

/// The key `suffix` of the hosts of `namespace` (`activations`, `live`).
fn hosts_key(namespace: &str, suffix: &str) -> String {
    format!("shoal:{{{namespace}:actors:hosts}}:{suffix}")
}

/// The hosts `live` holds.
fn live_hosts(c: &mut redis::Connection, namespace: &str) -> Vec<String> {
    redis::cmd("ZRANGE")
        .arg(hosts_key(namespace, "live"))
        .arg(0)
        .arg(-1)
        .query(c)
        .expect("ZRANGE")
}

/// The consumers of the hosts' group.
fn consumers(c: &mut redis::Connection, namespace: &str) -> Vec<String> {
    let consumers: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(hosts_key(namespace, "activations"))
        .arg("hosts")
        .query(c)
        .unwrap_or_default();
    consumers
        .into_iter()
        .filter_map(|fields| redis::from_redis_value(fields.get("name")?.clone()).ok())
        .collect()
}

/// Hosts that are gone leave neither a consumer in the hosts' group nor a heartbeat in `live`
/// behind, however they went: ended with their program (its supervisor retires them before
/// the program ends), or killed with it (nobody saw them go: the hosts left remove them after
/// ten leases, 5 s at least). However many came and went, the group and `live` end up holding
/// this runtime's host only.
#[test]
fn hosts_that_are_gone_leave_no_consumer_and_no_heartbeat_behind() {
    let redis = TestRedis::tcp();
    let namespace = fresh_namespace("gone");
    let _rt = runtime_in(&redis.url(), &namespace, 0.5);
    let mut c = redis::Client::open(redis.url())
        .and_then(|c| c.get_connection())
        .expect("redis");
    let tally = shoal::spawn_actor(Tally::default()).expect("spawn");
    assert_eq!(tally.ask(Add(1, 0), T).expect("ask"), 1);
    let mut ours = Vec::new();
    assert!(
        wait_for(Duration::from_secs(10), || {
            ours = live_hosts(&mut c, &namespace);
            ours.len() == 1
        }),
        "this runtime's host: {ours:?}"
    );
    // Redis makes a consumer when it first hands it requests: the other program's hosts have
    // one once one of them got its own actor's request. This runtime's may be pruned by theirs
    // when it got nothing for a while, harmless (it holds nothing, and is made again by its
    // next request).
    let only_ours = |c: &mut redis::Connection| {
        consumers(c, &namespace).iter().all(|h| ours.contains(h))
            && live_hosts(c, &namespace) == ours
    };
    // A program's hosts (not seen before), once they run and one of them has a consumer.
    let mut seen = ours.clone();
    let mut theirs_of = |c: &mut redis::Connection, round: u32| {
        let mut theirs = Vec::new();
        assert!(
            wait_for(Duration::from_secs(10), || {
                theirs = live_hosts(c, &namespace);
                theirs.retain(|h| !seen.contains(h));
                theirs.len() == 2 && consumers(c, &namespace).iter().any(|h| theirs.contains(h))
            }),
            "round {round}: the other program's hosts do not run: {theirs:?}"
        );
        seen.extend(theirs.iter().cloned());
        theirs
    };
    assert!(only_ours(&mut c), "{:?}", consumers(&mut c, &namespace));
    // Ended with their program: gone at once (well within the 5 s a killed host is pruned
    // after).
    for round in 0..2 {
        let mut other = OtherProgram::start(&redis.url(), &namespace, 3);
        let theirs = theirs_of(&mut c, round);
        let status = other.0.wait().expect("the other program ends");
        assert!(status.success(), "round {round}: {status:?}");
        assert!(
            wait_for(Duration::from_secs(3), || only_ours(&mut c)),
            "round {round}: hosts {theirs:?} that ended with their program left consumers \
             {:?} and heartbeats {:?}",
            consumers(&mut c, &namespace),
            live_hosts(&mut c, &namespace)
        );
    }
    // Killed with their program: frozen first, so that none of them ends in order when its
    // parent dies (it gets SIGTERM then), and nobody sees them go.
    for round in 2..4 {
        let other = OtherProgram::start(&redis.url(), &namespace, 120);
        let theirs = theirs_of(&mut c, round);
        let hosts = children_of(other.pid());
        assert!(!hosts.is_empty(), "round {round}: no host process");
        for pid in &hosts {
            kill(Pid::from_raw(*pid as i32), Signal::SIGSTOP).expect("SIGSTOP");
        }
        drop(other);
        for pid in &hosts {
            kill(Pid::from_raw(*pid as i32), Signal::SIGKILL).expect("SIGKILL");
        }
        let left = live_hosts(&mut c, &namespace);
        assert!(
            theirs.iter().all(|h| left.contains(h)),
            "round {round}: the killed hosts were removed at once: the test tests nothing"
        );
    }
    assert!(
        wait_for(Duration::from_secs(20), || only_ours(&mut c)),
        "killed hosts left consumers {:?} and heartbeats {:?}",
        consumers(&mut c, &namespace),
        live_hosts(&mut c, &namespace)
    );
    assert_eq!(tally.ask(Get, T).expect("get"), 1);
}

/// The key `suffix` of actor `id` in `namespace`.
fn actor_key_in(namespace: &str, id: &str, suffix: &str) -> String {
    format!("shoal:{{{namespace}:actor:{id}}}:{suffix}")
}

/// The `handbacks` and `status` of actor `id`'s state in `namespace`.
fn handbacks_and_status(c: &mut redis::Connection, namespace: &str, id: &str) -> (u64, String) {
    let (handbacks, status): (Option<u64>, Option<String>) = redis::cmd("HMGET")
        .arg(actor_key_in(namespace, id, "state"))
        .arg("handbacks")
        .arg("status")
        .query(c)
        .expect("HMGET");
    (handbacks.unwrap_or(0), status.unwrap_or_default())
}

/// Freezes the host process that holds actor `id` in `namespace` (no exit for its supervisor
/// to see), and waits until its lease lapsed and its last wait for activation requests ended:
/// from then on, every request goes to the other hosts. Returns its pid.
fn freeze_the_host_of(c: &mut redis::Connection, namespace: &str, id: &str) -> u32 {
    let lease: String = redis::cmd("GET")
        .arg(actor_key_in(namespace, id, "lease"))
        .query(c)
        .expect("a host holds the actor");
    let host = lease.split(':').next().expect("host id").to_string();
    let pid: u32 = redis::cmd("HGET")
        .arg(format!("shoal:{{{namespace}:proc:{host}}}:status"))
        .arg("pid")
        .query(c)
        .expect("the host's pid");
    kill(Pid::from_raw(pid as i32), Signal::SIGSTOP).expect("SIGSTOP");
    assert!(
        wait_for(Duration::from_secs(5), || stopped(pid)),
        "host {pid} did not stop"
    );
    assert!(
        wait_for(Duration::from_secs(10), || !redis::cmd("EXISTS")
            .arg(actor_key_in(namespace, id, "lease"))
            .query::<bool>(c)
            .unwrap_or(true)),
        "the lease did not lapse"
    );
    // A read of activation requests blocks for 500 ms at most.
    std::thread::sleep(Duration::from_millis(600));
    pid
}

/// Another program's hosts share the namespace and cannot run this program's actor (their
/// build lacks its type). While this program's only host is away (frozen: no exit for its
/// supervisor to see, no read of the activation requests), every request for the actor goes to
/// them, and they give it back, soon more often than the limit of give-backs. That fails
/// nothing, until the give-backs have gone on for the window (five of their 2 s leases): back
/// within it, the host applies the message. Away for longer, the actor fails with their reason,
/// after the window and within a bound.
#[test]
fn a_brief_absence_of_an_actors_own_hosts_does_not_fail_it() {
    let redis = TestRedis::tcp();
    let namespace = fresh_namespace("handback");
    let _other = OtherProgram::start(&redis.url(), &namespace, 120);
    let _rt = runtime_in(&redis.url(), &namespace, 1.0);
    let mut c = redis::Client::open(redis.url())
        .and_then(|c| c.get_connection())
        .expect("redis");
    let tally = shoal::spawn_actor(Tally::default()).expect("spawn");
    assert_eq!(tally.ask(Add(1, 0), T).expect("ask"), 1);
    let id = tally.id().to_string();

    // A brief absence.
    let pid = freeze_the_host_of(&mut c, &namespace, &id);
    tally.tell(Add(1, 0)).expect("tell");
    let many = wait_for(Duration::from_secs(5), || {
        handbacks_and_status(&mut c, &namespace, &id).0 >= 32
    });
    let (handbacks, status) = handbacks_and_status(&mut c, &namespace, &id);
    kill(Pid::from_raw(pid as i32), Signal::SIGCONT).expect("SIGCONT");
    assert!(
        many || status == "failed",
        "the other program's hosts gave the actor back {handbacks} times: the test tests nothing"
    );
    assert_eq!(
        status, "active",
        "{handbacks} give-backs within a brief absence of the actor's own hosts failed it"
    );
    assert_eq!(tally.ask(Get, T).expect("get once the host is back"), 2);

    // An absence past the window.
    let pid = freeze_the_host_of(&mut c, &namespace, &id);
    let started = Instant::now();
    tally.tell(Add(1, 0)).expect("tell");
    let failed = wait_for(Duration::from_secs(30), || {
        handbacks_and_status(&mut c, &namespace, &id).1 == "failed"
    });
    let took = started.elapsed();
    kill(Pid::from_raw(pid as i32), Signal::SIGCONT).expect("SIGCONT");
    assert!(failed, "an actor no host ran for 30 s is not failed");
    assert!(
        took >= Duration::from_secs(9),
        "failed after {took:?}, within the window"
    );
    match tally.ask(Get, T) {
        Err(Error::InvalidState(m)) => {
            assert!(m.contains("failed") && m.contains("not registered"), "{m}")
        }
        other => panic!("expected the actor's failure, got {other:?}"),
    }
}
