//! Whole-program scenarios for the integration tests: each runs `shoal::init()` the way a user's
//! `main` does, so the tests can observe what only a whole process shows (output reaching the
//! terminal, the embedded Redis stopping at exit or on a signal, daemon children at shutdown).
//!
//! usage: scenario NAME [ARGS...]; prints `key=value` lines the tests parse.

use std::time::Duration;

use shoal::prelude::*;

#[shoal::remote]
fn greet(name: String) {
    println!("hello {name}");
    eprintln!("greeting on stderr for {name}");
}

#[shoal::remote]
fn describe_stdout() {
    let link = std::fs::read_link("/proc/self/fd/1")
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    println!("child_fd1={link}");
}

#[shoal::remote]
fn print_env(name: String) {
    println!(
        "env {name}={}",
        std::env::var(&name).unwrap_or_else(|_| "<unset>".into())
    );
}

#[shoal::remote]
fn print_then_sleep(ms: u64) {
    println!("before sleeping");
    std::thread::sleep(Duration::from_millis(ms));
    println!("after sleeping");
}

#[shoal::remote]
fn sleep_then_touch(ms: u64, path: String) {
    std::thread::sleep(Duration::from_millis(ms));
    std::fs::write(path, "done").expect("write");
}

#[shoal::remote]
fn chatty(lines: u32) {
    for i in 0..lines {
        println!("line {i}");
    }
    panic!("chatty panics at the end");
}

/// Prints `lines` lines, then a last one without a newline (left in Rust's stdout buffer), one
/// on stderr, and ends the process with `std::process::exit(code)`.
#[shoal::remote]
fn chatty_then_exit(lines: u32, code: i32) {
    for i in 0..lines {
        println!("line {i}");
    }
    print!("last words");
    eprintln!("exiting with {code}");
    std::process::exit(code);
}

#[shoal::remote]
fn speak(x: u64) -> u64 {
    let link = std::fs::read_link("/proc/self/fd/1")
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    println!("pool task {x} speaking, worker_fd1={link}");
    // One write: stderr is unbuffered, and `eprintln!` may write a line in pieces, which the
    // other workers' lines on the same inherited stderr can then split.
    let line = format!("pool task {x} on stderr\n");
    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
    x
}

/// An actor type only this program has.
#[derive(serde::Serialize, serde::Deserialize, Default, shoal::Actor)]
#[actor(messages(Poke))]
struct ScenarioOnly {
    pokes: u64,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Poke;

impl Handler<Poke> for ScenarioOnly {
    type Reply = u64;
    fn handle(&mut self, _: Poke, _: &mut ActorContext) -> u64 {
        self.pokes += 1;
        self.pokes
    }
}

#[shoal::remote]
fn sleep_ms(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

fn main() -> shoal::Result<()> {
    let rt = shoal::init()?;
    println!(
        "redis_pid={}",
        rt.embedded_redis_pid()
            .map(|p| p.to_string())
            .unwrap_or_default()
    );
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
    match arg(0).as_str() {
        "hello" => {
            let p = Process::new(greet, ("bob".to_string(),));
            p.start()?;
            p.join(None)?;
            println!("exitcode={}", p.exitcode().unwrap_or(i32::MIN));
        }
        "fd" => {
            let link = std::fs::read_link("/proc/self/fd/1")
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            println!("parent_fd1={link}");
            let p = Process::new(describe_stdout, ());
            p.start()?;
            p.join(None)?;
        }
        "pool-output" => {
            let link = std::fs::read_link("/proc/self/fd/1")
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            println!("parent_fd1={link}");
            let pool = Pool::new(2)?;
            let results = pool.map(speak, 0..6u64)?;
            pool.close()?;
            pool.join()?;
            // After join, everything the workers printed is on this process's terminal.
            println!("joined results={results:?}");
        }
        "env" => {
            let p = Process::new(print_env, (arg(1),));
            p.start()?;
            p.join(None)?;
        }
        "kill-streaming" => {
            let p = Process::new(print_then_sleep, (30_000u64,));
            p.start()?;
            std::thread::sleep(Duration::from_millis(500));
            p.kill()?;
            p.join(Some(Duration::from_secs(10)))?;
            println!("exitcode={}", p.exitcode().unwrap_or(i32::MIN));
        }
        "chatty" => {
            let p = Process::new(chatty, (arg(1).parse::<u32>().unwrap_or(100),));
            p.start()?;
            p.join(None)?;
            println!("exitcode={}", p.exitcode().unwrap_or(i32::MIN));
        }
        "chatty-exit" => {
            let p = Process::new(chatty_then_exit, (arg(1).parse::<u32>().unwrap_or(100), 3));
            p.start()?;
            p.join(None)?;
            println!("\nexitcode={}", p.exitcode().unwrap_or(i32::MIN));
        }
        "daemon" => {
            let daemon = Process::new(sleep_then_touch, (60_000u64, format!("{}/daemon", arg(1))))
                .daemon(true);
            let worker = Process::new(sleep_then_touch, (700u64, format!("{}/worker", arg(1))));
            daemon.start()?;
            worker.start()?;
            println!("daemon_pid={}", daemon.pid().unwrap_or(0));
            println!("worker_pid={}", worker.pid().unwrap_or(0));
            // Return without joining: the runtime terminates the daemon and joins the worker.
        }
        "pool-sleep" => {
            // A pool of 2 whose workers run 60 s tasks; the task lease (seconds) is arg 1.
            let lease = arg(1).parse::<f64>().unwrap_or(2.0);
            let pool = Pool::builder()
                .processes(2)
                .task_lease(Duration::from_secs_f64(lease))
                .build()?;
            let _pending = pool.map_async_with(
                sleep_ms,
                vec![60_000u64; 2],
                AsyncOptions::new().chunksize(1),
            )?;
            std::thread::sleep(Duration::from_millis(1500));
            println!("store={}", rt.store_url());
            println!("ready");
            std::thread::sleep(Duration::from_secs(120));
        }
        "actor-hosts" => {
            // Runs this program's actor hosts in the configured namespace (another program's
            // actors may be asked of them) for `arg(1)` seconds.
            let own = spawn_actor(ScenarioOnly::default())?;
            own.ask(Poke, Some(Duration::from_secs(30)))?;
            println!("ready");
            std::thread::sleep(Duration::from_secs(arg(1).parse().unwrap_or(60)));
        }
        "manager-connect" => {
            // Another program (not a child) reaches a manager by its address's text and its
            // authkey (hex), and fills a dict of its own in it.
            let address: ManagerAddress = arg(1).parse()?;
            let key: Vec<u8> = (0..arg(2).len())
                .step_by(2)
                .filter_map(|i| u8::from_str_radix(arg(2).get(i..i + 2)?, 16).ok())
                .collect();
            match Manager::connect(address, shoal::AuthKey::from_bytes(key)) {
                Err(Error::Authentication(e)) => println!("refused: {e}"),
                Err(e) => return Err(e),
                Ok(manager) => {
                    let d = manager.dict::<String, u64>()?;
                    d.set("from another program", 42)?;
                    println!(
                        "dict={}",
                        serde_json::to_string(&d)
                            .map_err(|e| Error::invalid_state(e.to_string()))?
                    );
                    // The objects the manager's owner published, as Python's `get_queue()`.
                    let jobs: Queue<String> = manager.lookup("jobs")?;
                    jobs.put("done by another program".to_string())?;
                    jobs.close()?;
                    jobs.join_thread()?;
                    let results: DictProxy<String, u64> = manager.lookup("results")?;
                    results.set("answer", 42)?;
                }
            }
        }
        "process-sleep" => {
            // Two processes, a daemon and not, each sleeping 60 s.
            let daemon = Process::new(print_then_sleep, (60_000u64,)).daemon(true);
            let plain = Process::new(print_then_sleep, (60_000u64,));
            daemon.start()?;
            plain.start()?;
            std::thread::sleep(Duration::from_millis(500));
            println!("store={}", rt.store_url());
            println!("ready");
            std::thread::sleep(Duration::from_secs(120));
        }
        "panic" => {
            panic!("the main program panics while the runtime is up");
        }
        "wait" => {
            std::thread::sleep(Duration::from_secs(60));
        }
        "ok" => {}
        other => {
            eprintln!("unknown scenario {other:?}");
            std::process::exit(2);
        }
    }
    Ok(())
}
