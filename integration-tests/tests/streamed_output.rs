//! A child's streamed output (`multiprocessing.stream_stdout`) is printed by a thread of its
//! own: a stdout that takes nothing (another thread holds its lock, a pipe nobody reads) delays
//! the printing, never the parent's view of its children.

use std::time::{Duration, Instant};

use shoal::prelude::*;

shoal::test_support!();

fn runtime() -> shoal::Runtime {
    let config = Config::builder()
        .stream_stdout(true)
        .build()
        .expect("config");
    shoal::init_with(config).expect("runtime")
}

#[shoal::remote]
fn prints(line: String) {
    println!("{line}");
}

/// The parent's stdout is locked by the joining thread while the child prints and exits: the
/// exit is still seen (the printing used to run on shoal's actor thread, which waited for the
/// lock, so that no exit was handled any more).
#[test]
fn a_held_stdout_lock_does_not_hide_a_childs_exit() {
    let _rt = runtime();
    let p = Process::new(prints, ("printed while stdout was locked".to_string(),));
    let held = std::io::stdout().lock();
    p.start().expect("start");
    let started = Instant::now();
    p.join(Some(Duration::from_secs(20))).expect("join");
    let (alive, waited) = (p.is_alive(), started.elapsed());
    drop(held);
    assert!(!alive, "the child's exit was not seen in {waited:?}");
    assert_eq!(p.exitcode(), Some(0));
    // Once stdout takes output again, children run and print as before.
    let again = Process::new(prints, ("printed after the lock".to_string(),));
    again.start().expect("start");
    again.join(Some(Duration::from_secs(20))).expect("join");
    assert_eq!(again.exitcode(), Some(0));
}
