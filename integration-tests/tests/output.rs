//! A child's output and environment: stdout/stderr reach the parent's terminal, directly
//! (inherited) or through a Redis Stream (`multiprocessing.stream_stdout`), and
//! `multiprocessing.env_vars` are set in the child.

use std::process::Output;

use shoal_integration_tests::{field, text};

const SCENARIO: &str = env!("CARGO_BIN_EXE_scenario");

fn scenario(args: &[&str], env: &[(&str, &str)]) -> Output {
    shoal_integration_tests::scenario(SCENARIO, args, env)
}

const STREAM: (&str, &str) = ("SHOAL_MULTIPROCESSING_STREAM_STDOUT", "true");

#[test]
fn child_output_reaches_the_parent_directly_and_through_the_stream() {
    for env in [&[][..], &[STREAM][..]] {
        let out = scenario(&["hello"], env);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let stdout = text(&out.stdout);
        assert!(stdout.contains("hello bob\n"), "{env:?}: {stdout:?}");
        assert!(stdout.contains("exitcode=0"), "{stdout:?}");
        // join() returns after the child's output was printed.
        let hello = stdout.find("hello bob").expect("greeting");
        let exit = stdout.find("exitcode=").expect("exit code");
        assert!(hello < exit, "{stdout:?}");
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains("greeting on stderr for bob"),
            "{env:?}: {stderr:?}"
        );
    }
}

#[test]
fn streamed_output_really_goes_through_redis() {
    // Inherited: the child's fd 1 is the parent's. Streamed: the child writes into its own pipe
    // and the parent prints what it reads from the stream.
    let out = scenario(&["fd"], &[]);
    let stdout = text(&out.stdout);
    let parent = field(&stdout, "parent_fd1").expect("parent fd");
    let child = field(&stdout, "child_fd1").expect("child fd");
    assert_eq!(parent, child);

    let out = scenario(&["fd"], &[STREAM]);
    let stdout = text(&out.stdout);
    let parent = field(&stdout, "parent_fd1").expect("parent fd");
    let child = field(&stdout, "child_fd1").expect("child fd");
    assert_ne!(
        parent, child,
        "the child wrote to the parent's stdout directly"
    );
    assert!(child.starts_with("pipe:"), "{child}");
}

#[test]
fn streamed_output_survives_a_killed_child_and_join_does_not_hang() {
    let out = scenario(&["kill-streaming"], &[STREAM]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("before sleeping"), "{stdout:?}");
    assert!(!stdout.contains("after sleeping"));
    assert_eq!(field(&stdout, "exitcode").as_deref(), Some("-9"));
}

#[test]
fn a_long_streamed_output_arrives_whole_and_in_order() {
    let out = scenario(&["chatty", "5000"], &[STREAM]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with("line ")).collect();
    let expected: Vec<String> = (0..5000).map(|i| format!("line {i}")).collect();
    assert_eq!(lines, expected);
    assert_eq!(field(&stdout, "exitcode").as_deref(), Some("1"));
    assert!(text(&out.stderr).contains("chatty panics at the end"));
}

#[test]
fn a_child_that_calls_exit_still_gets_its_streamed_output_printed() {
    // Python's `sys.exit` in a child unwinds and flushes; `std::process::exit` does neither, so
    // the worker forwards what the pipes still hold from its exit handler.
    let out = scenario(&["chatty-exit", "2000"], &[STREAM]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with("line ")).collect();
    let expected: Vec<String> = (0..2000).map(|i| format!("line {i}")).collect();
    assert_eq!(lines, expected);
    // The last words were flushed by the exit itself; the parent's own line follows them.
    assert!(stdout.contains("last words\nexitcode=3"), "{stdout:?}");
    assert!(text(&out.stderr).contains("exiting with 3"));
}

#[test]
fn pool_workers_output_reaches_the_parent_directly_and_through_the_stream() {
    for (env, streamed) in [(&[][..], false), (&[STREAM][..], true)] {
        let out = scenario(&["pool-output"], env);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let stdout = text(&out.stdout);
        let stderr = text(&out.stderr);
        let parent = field(&stdout, "parent_fd1").expect("parent fd");
        let joined = stdout.find("joined results=").expect("joined");
        for x in 0..6 {
            let line = format!("pool task {x} speaking, worker_fd1=");
            let at = stdout
                .find(&line)
                .unwrap_or_else(|| panic!("{env:?}: {stdout:?}"));
            // Printed before join() returned.
            assert!(at < joined, "{env:?}: {stdout:?}");
            let worker = stdout[at + line.len()..].lines().next().unwrap_or_default();
            // Inherited: the worker writes to the parent's stdout; streamed: to its own pipe,
            // which the supervisor reads from Redis and prints here.
            assert_eq!(worker == parent, !streamed, "{env:?}: {worker} vs {parent}");
            assert!(
                stderr.contains(&format!("pool task {x} on stderr")),
                "{env:?}: {stderr:?}"
            );
        }
    }
}

#[test]
fn env_vars_are_set_in_the_child() {
    let out = scenario(
        &["env", "GREETING"],
        &[(
            "SHOAL_MULTIPROCESSING_ENV_VARS",
            "{GREETING: hola, OTHER: x}",
        )],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("env GREETING=hola"));
    let out = scenario(&["env", "GREETING"], &[("GREETING", "")]);
    assert!(
        text(&out.stdout).contains("env GREETING=\n")
            || text(&out.stdout).contains("env GREETING=<unset>")
    );
}
