//! The seeds' Manager examples: a shared dictionary of dictionaries filled by four processes
//! (`d[key1][key2] = value + 1`), a shared dict and list filled by several processes with a
//! Namespace for their status, a registered type (Python's `BaseManager.register`) that several
//! processes update at once, and Lithops' example (a child reverses a shared list).
//!
//! ```text
//! cargo run -p shoal-examples --example manager
//! ```
//! Every proxy is a serde value: the children receive them as arguments, and the dict of dicts
//! holds proxies as values, which decode as live proxies (Python's nested proxies). Exits
//! non-zero on a wrong result.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal::prelude::*;

/// A registered type: a tally of votes per option, hosted by the manager's runtime and called
/// through a typed proxy. Its `exposed` methods (Python's term) are the messages listed here.
#[derive(Serialize, Deserialize, Default, shoal::Actor)]
#[actor(messages(Vote, Totals))]
struct Tally {
    votes: BTreeMap<String, u64>,
}

/// `Vote(option)`: one more vote for `option`; replies with its count.
#[derive(Serialize, Deserialize)]
struct Vote(String);

/// Every option's count.
#[derive(Serialize, Deserialize)]
struct Totals;

impl Handler<Vote> for Tally {
    type Reply = u64;
    fn handle(&mut self, Vote(option): Vote, _: &mut ActorContext) -> u64 {
        let count = self.votes.entry(option).or_default();
        *count += 1;
        *count
    }
}

impl Handler<Totals> for Tally {
    type Reply = BTreeMap<String, u64>;
    fn handle(&mut self, _: Totals, _: &mut ActorContext) -> BTreeMap<String, u64> {
        self.votes.clone()
    }
}

/// Casts `n` votes, alternating between "red" and "blue": one-way calls, then one call that
/// waits for its reply (by then every earlier vote of this process is counted).
#[shoal::remote]
fn voter(tally: ActorRef<Tally>, n: u64) -> shoal::Result<()> {
    for i in 1..n {
        let option = if i.is_multiple_of(2) { "red" } else { "blue" };
        tally.tell(Vote(option.to_string()))?;
    }
    let option = if n.is_multiple_of(2) { "red" } else { "blue" };
    tally.ask(Vote(option.to_string()), Some(Duration::from_secs(60)))?;
    Ok(())
}

#[shoal::remote]
fn f(d: DictProxy<String, DictProxy<String, i64>>, key1: String, key2: String, value: i64) {
    d.getitem(key1.as_str())
        .expect("d[key1]")
        .set(key2.as_str(), value + 1)
        .expect("d[key1][key2] = value + 1");
}

#[shoal::remote]
fn worker(
    squares: DictProxy<i64, i64>,
    log: ListProxy<String>,
    status: NamespaceProxy,
    i: i64,
) -> shoal::Result<()> {
    squares.set(&i, i * i)?;
    log.append(format!("worker {i} done"))?;
    status.set(&format!("worker{i}"), "finished")?;
    Ok(())
}

#[shoal::remote]
fn reverse(l: ListProxy<i64>) -> shoal::Result<()> {
    l.reverse()
}

fn run_all(processes: &[Process]) -> shoal::Result<bool> {
    for p in processes {
        p.start()?;
    }
    let mut ok = true;
    for p in processes {
        p.join(None)?;
        ok &= p.exitcode() == Some(0);
    }
    Ok(ok)
}

fn main() -> shoal::Result<()> {
    let _rt = shoal::init()?;
    let manager = Manager::new()?;
    let mut ok = true;

    // Create a manager and a dictionary of dictionaries
    let d = manager.dict::<String, DictProxy<String, i64>>()?;
    d.set("dict1", manager.dict()?)?;
    d.set("dict2", manager.dict()?)?;
    let arg_list = [
        ("dict1", "key1", 11),
        ("dict1", "key2", 12),
        ("dict2", "key1", 21),
        ("dict2", "key2", 22),
    ];
    let processes: Vec<Process> = arg_list
        .iter()
        .map(|(k1, k2, v)| Process::new(f, (d.clone(), k1.to_string(), k2.to_string(), *v)))
        .collect();
    ok &= run_all(&processes)?;
    let dict1: BTreeMap<String, i64> = d.getitem("dict1")?.copy()?;
    let dict2: BTreeMap<String, i64> = d.getitem("dict2")?.copy()?;
    println!("dict1: {dict1:?}");
    println!("dict2: {dict2:?}");
    ok &= dict1 == BTreeMap::from([("key1".into(), 12), ("key2".into(), 13)]);
    ok &= dict2 == BTreeMap::from([("key1".into(), 22), ("key2".into(), 23)]);

    // A shared dict and list filled by several processes, and a Namespace for their status.
    let squares = manager.dict::<i64, i64>()?;
    let log = manager.list::<String>()?;
    let status = manager.namespace()?;
    status.set("job", "squares")?;
    let workers: Vec<Process> = (0..4)
        .map(|i| Process::new(worker, (squares.clone(), log.clone(), status.clone(), i)))
        .collect();
    ok &= run_all(&workers)?;
    let squares: BTreeMap<i64, i64> = squares.copy()?;
    let mut lines = log.to_vec()?;
    lines.sort();
    println!("squares: {squares:?}");
    println!("log: {lines:?}");
    println!(
        "status: job = {}, attributes: {:?}",
        status.get::<String>("job")?,
        status.names()?
    );
    ok &= squares == (0..4).map(|i| (i, i * i)).collect();
    ok &= lines
        == (0..4)
            .map(|i| format!("worker {i} done"))
            .collect::<Vec<_>>();
    ok &= status.names()?.len() == 5;

    // A registered type (Python: BaseManager.register("Tally", Tally); manager.Tally()), used
    // by four processes at once: no vote is lost.
    manager.register::<Tally>("Tally")?;
    let tally = manager.create("Tally", Tally::default())?;
    let voters: Vec<Process> = (0..4)
        .map(|_| Process::new(voter, (tally.clone(), 50u64)))
        .collect();
    ok &= run_all(&voters)?;
    let totals = tally.ask(Totals, Some(Duration::from_secs(60)))?;
    println!("tally: {totals:?}");
    ok &= totals == BTreeMap::from([("blue".into(), 100), ("red".into(), 100)]);

    // Lithops' example: l = manager.list(range(10)); a child calls l.reverse().
    let l = manager.list_from(0..10i64)?;
    ok &= run_all(&[Process::new(reverse, (l.clone(),))])?;
    let reversed = l.to_vec()?;
    println!("reversed: {reversed:?}");
    ok &= reversed == (0..10).rev().collect::<Vec<_>>();

    manager.shutdown()?;
    if !ok {
        eprintln!("wrong result");
        std::process::exit(1);
    }
    println!("Manager: every check passed");
    Ok(())
}
