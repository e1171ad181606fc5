//! The `shoal` command-line tool against a real redis-server.

use std::process::Command;
use std::time::Duration;

use shoal_core::store::embedded::EmbeddedRedis;

const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");

fn redis_cmd(url: &str, args: &[&str]) -> redis::RedisResult<redis::Value> {
    let mut conn = redis::Client::open(url)?.get_connection()?;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(&mut conn)
}

#[test]
fn clean_deletes_one_namespace_only() {
    let server =
        EmbeddedRedis::start("redis-server", Duration::from_secs(5)).expect("redis-server");
    let url = server.url();
    for key in [
        "shoal:{jobs:queue:1}:items",
        "shoal:{jobs:lock:2}:state",
        "shoal:{other:queue:1}:items",
    ] {
        redis_cmd(&url, &["SET", key, "x"]).expect("set");
    }
    let out = Command::new(SHOAL)
        .args(["clean", "--namespace", "jobs"])
        .env("SHOAL_REDIS_URL", &url)
        .current_dir(std::env::temp_dir())
        .output()
        .expect("shoal runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("deleted 2 keys of namespace jobs"));
    let left = redis_cmd(&url, &["DBSIZE"]).expect("dbsize");
    assert_eq!(left, redis::Value::Int(1));
}

#[test]
fn clean_without_a_shared_redis_says_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    let empty = dir.path().join("empty.yaml");
    std::fs::write(&empty, "").expect("write");
    let out = Command::new(SHOAL)
        .arg("clean")
        .env_remove("SHOAL_REDIS_URL")
        .env("SHOAL_CONFIG", &empty)
        .output()
        .expect("shoal runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("redis.url"));
}

#[test]
fn config_prints_the_effective_configuration_and_reports_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, "local:\n  start_method: thread\n").expect("write");
    let out = Command::new(SHOAL)
        .arg("config")
        .env("SHOAL_CONFIG", &path)
        .env("SHOAL_NAMESPACE", "jobs")
        .output()
        .expect("shoal runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8_lossy(&out.stdout);
    assert!(yaml.contains("start_method: thread"), "{yaml}");
    assert!(yaml.contains("namespace: jobs"), "{yaml}");

    std::fs::write(&path, "redis:\n  expiry_secs: -5\n").expect("write");
    let out = Command::new(SHOAL)
        .arg("config")
        .env("SHOAL_CONFIG", &path)
        .output()
        .expect("shoal runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("redis.expiry_secs") && stderr.contains("c.yaml"),
        "{stderr}"
    );
}
