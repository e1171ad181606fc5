//! Signed actors and the keys they were created under, against a real redis-server with real
//! host processes: a sender holding another authkey is refused at `tell`/`ask`/`get_or_spawn`
//! with nothing sent, and a host of another program sharing the namespace (another build,
//! another key) gives an actor it cannot run back instead of failing it or refusing its
//! messages.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal::prelude::*;
use shoal::{ActorOptions, AuthKey};
use shoal_integration_tests::TestRedis;

shoal::test_support!();

const T: Option<Duration> = Some(Duration::from_secs(20));

#[derive(Serialize, Deserialize, Default, Debug, shoal::Actor)]
#[actor(messages(Incr, Get))]
struct Tally {
    n: u64,
}

#[derive(Serialize, Deserialize)]
struct Incr(u64);

#[derive(Serialize, Deserialize)]
struct Get;

impl Handler<Incr> for Tally {
    type Reply = u64;
    fn handle(&mut self, Incr(by): Incr, _: &mut ActorContext) -> u64 {
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

const SIGNED: ActorOptions = ActorOptions { authenticate: true };

#[test]
fn a_sender_with_another_authkey_is_refused_and_nothing_is_sent() {
    let _rt = shoal::init_with(Config::builder().build().expect("config")).expect("runtime");
    let own = current_process().authkey;
    let tally = shoal::spawn_actor_with(Tally::default(), SIGNED).expect("spawn");
    assert_eq!(tally.ask(Incr(1), T).expect("ask"), 1);
    let named = shoal::get_or_spawn_with("signed-tally", Tally::default, SIGNED).expect("named");
    assert_eq!(named.ask(Incr(1), T).expect("ask"), 1);

    // This process now signs with another key (its hosts, started before, keep the first).
    shoal::set_authkey(AuthKey::from_bytes(
        b"a key the actors do not know".to_vec(),
    ));
    let refused = |r: shoal::Result<u64>| matches!(r, Err(Error::Authentication(_)));
    assert!(matches!(
        tally.tell(Incr(10)),
        Err(Error::Authentication(_))
    ));
    assert!(refused(tally.ask(Incr(100), T)));
    assert!(matches!(
        shoal::get_or_spawn_with("signed-tally", Tally::default, SIGNED),
        Err(Error::Authentication(_))
    ));

    shoal::set_authkey(own);
    // Nothing of what was refused reached the actor.
    assert_eq!(tally.ask(Get, T).expect("get"), 1);
    assert_eq!(named.ask(Get, T).expect("get"), 1);
}

#[test]
fn signed_actors_are_made_async_and_another_key_is_refused_there_too() {
    let _rt = shoal::init_with(Config::builder().build().expect("config")).expect("runtime");
    let own = current_process().authkey;
    futures::executor::block_on(async {
        let tally = shoal::spawn_actor_with_async(Tally::default(), SIGNED)
            .await
            .expect("spawn");
        assert_eq!(tally.ask_async(Incr(1), T).await.expect("ask"), 1);
        let named = shoal::get_or_spawn_with_async("signed-async", Tally::default, SIGNED)
            .await
            .expect("named");
        assert_eq!(named.ask_async(Incr(2), T).await.expect("ask"), 2);
    });
    shoal::set_authkey(AuthKey::from_bytes(b"another key".to_vec()));
    assert!(matches!(
        futures::executor::block_on(shoal::get_or_spawn_with_async(
            "signed-async",
            Tally::default,
            SIGNED
        )),
        Err(Error::Authentication(_))
    ));
    shoal::set_authkey(own);
}

/// The scenario program running its own actor hosts in `namespace`, until it is dropped.
struct OtherProgram(Child);

impl OtherProgram {
    fn start(redis_url: &str, namespace: &str) -> OtherProgram {
        let mut child = Command::new(env!("CARGO_BIN_EXE_scenario"))
            .args(["actor-hosts", "120"])
            .env("SHOAL_REDIS_URL", redis_url)
            .env("SHOAL_NAMESPACE", namespace)
            .env("SHOAL_ACTORS_HOSTS", "2")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the other program starts");
        let stdout = child.stdout.take().expect("stdout");
        let ready = BufReader::new(stdout)
            .lines()
            .map_while(std::result::Result::ok)
            .any(|line| line == "ready");
        assert!(ready, "the other program's hosts run");
        OtherProgram(child)
    }
}

impl Drop for OtherProgram {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_host_of_another_program_gives_an_actor_it_cannot_run_back() {
    // Two programs share a namespace: the other one's hosts wait on the same activation
    // requests, though its build lacks this actor's type and its authkey is its own. Each
    // time the actor goes idle, the next message asks for a host again, and the requests go
    // to the waiting hosts in turn: every one the other program took must come back untouched
    // (it failed the actor for good before), and every message is applied once.
    let redis = TestRedis::tcp();
    let namespace = format!("auth-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let other = OtherProgram::start(&redis.url(), &namespace);
    let mut config = Config::builder().build().expect("config");
    config.redis.url = Some(redis.url());
    config.shoal.namespace = namespace;
    config.actors.hosts = 1;
    config.actors.idle_secs = 1.0;
    let _rt = shoal::init_with(config).expect("runtime");
    for options in [ActorOptions::default(), SIGNED] {
        let tally = shoal::spawn_actor_with(Tally::default(), options).expect("spawn");
        const ROUNDS: u64 = 6;
        for round in 1..=ROUNDS {
            assert_eq!(tally.ask(Incr(1), T).expect("ask"), round, "{options:?}");
            // Idle past actors.idle_secs: the actor is deactivated, the next ask reactivates it.
            std::thread::sleep(Duration::from_millis(1300));
        }
        assert_eq!(tally.ask(Get, T).expect("get"), ROUNDS);
        // Each round needed an activation; the other program's hosts took some of them and
        // gave them back (each a take of its own).
        let activations = tally.activations().expect("activations");
        assert!(
            activations > ROUNDS,
            "{options:?}: {activations} activations"
        );
    }
    drop(other);
}

#[test]
fn an_actor_no_host_can_run_fails_with_the_reason_instead_of_waiting() {
    // The hosts start with this process's key; a signed actor created after `set_authkey`
    // records another key's verifier, so no host of this runtime can check its messages. They
    // give it back until the limit, then it fails: an ask gets the reason, not a hang.
    let rt = shoal::init_with(Config::builder().build().expect("config")).expect("runtime");
    let first = shoal::spawn_actor(Tally::default()).expect("spawn");
    assert_eq!(first.ask(Incr(1), T).expect("ask"), 1);
    let own = current_process().authkey;
    shoal::set_authkey(AuthKey::from_bytes(
        b"a key set after the hosts started".to_vec(),
    ));
    let orphan = shoal::spawn_actor_with(Tally::default(), SIGNED).expect("spawn");
    let started = std::time::Instant::now();
    let outcome = orphan.ask(Incr(1), Some(Duration::from_secs(30)));
    assert!(
        matches!(&outcome, Err(Error::InvalidState(m)) if m.contains("another authkey")),
        "{outcome:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    shoal::set_authkey(own);

    // A signed actor made before actors recorded a verifier (no `verifier` field) is still
    // served: its messages' MACs decide.
    let older = shoal::spawn_actor_with(Tally::default(), SIGNED).expect("spawn");
    assert_eq!(older.ask(Incr(1), T).expect("ask"), 1);
    let mut raw = redis::Client::open(rt.store_url().as_str())
        .and_then(|c| c.get_connection())
        .expect("a connection to the store");
    let state = format!(
        "shoal:{{{}:actor:{}}}:state",
        rt.config().shoal.namespace,
        older.id()
    );
    let removed: u32 = redis::cmd("HDEL")
        .arg(&state)
        .arg("verifier")
        .query(&mut raw)
        .expect("HDEL");
    assert_eq!(removed, 1);
    // Deactivate it, so that the next ask needs a new activation.
    let lease = state.replace(":state", ":lease");
    redis::cmd("DEL")
        .arg(&lease)
        .query::<()>(&mut raw)
        .expect("DEL");
    assert_eq!(older.ask(Incr(1), T).expect("ask"), 2);
}

/// A signed message copied into another signed actor's mailbox (same key, by someone with
/// write access to Redis) is refused there: its tag covers the actor it was sent to.
#[test]
fn a_signed_message_copied_into_another_actors_mailbox_is_refused() {
    let rt = shoal::init_with(Config::builder().build().expect("config")).expect("runtime");
    let first = shoal::spawn_actor_with(Tally::default(), SIGNED).expect("spawn");
    let second = shoal::spawn_actor_with(Tally::default(), SIGNED).expect("spawn");
    first.tell(Incr(5)).expect("tell");
    assert_eq!(first.ask(Get, T).expect("get"), 5);
    assert_eq!(second.ask(Get, T).expect("get"), 0);
    let mut raw = redis::Client::open(rt.store_url().as_str())
        .and_then(|c| c.get_connection())
        .expect("a connection to the store");
    let mailbox = |id: &str| {
        format!(
            "shoal:{{{}:actor:{id}}}:mailbox",
            rt.config().shoal.namespace
        )
    };
    // The tell is the first entry of the first actor's mailbox (applied entries stay until
    // whole stream nodes are trimmed).
    let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(mailbox(first.id()))
        .arg("-")
        .arg("+")
        .query(&mut raw)
        .expect("XRANGE");
    let tell = entries
        .ids
        .first()
        .expect("the tell is still in the mailbox");
    let field = |name: &str| -> Vec<u8> { tell.get(name).unwrap_or_default() };
    assert!(field("r").is_empty(), "the first entry is the tell");
    redis::cmd("XADD")
        .arg(mailbox(second.id()))
        .arg("*")
        .arg("k")
        .arg(field("k"))
        .arg("p")
        .arg(field("p"))
        .arg("r")
        .arg(field("r"))
        .arg("h")
        .arg(field("h"))
        .query::<()>(&mut raw)
        .expect("XADD");
    // The copy is read before this ask, and refused.
    assert_eq!(second.ask(Get, T).expect("get"), 0);
    assert_eq!(first.ask(Get, T).expect("get"), 5);
}
