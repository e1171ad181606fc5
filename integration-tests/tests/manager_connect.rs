//! `Manager::connect` from another program (not a child of the manager's), as Python's
//! `BaseManager(address, authkey).connect()` from another machine: the address goes as text,
//! the program shares only the Redis, finds the objects the owner published by name (Python's
//! registered `get_queue()`), and a wrong authkey is refused with nothing written.

use shoal::AuthKey;
use shoal::prelude::*;
use shoal_integration_tests::{TestRedis, field, text};

shoal::test_support!();

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn another_program_connects_by_address_and_authkey() {
    let redis = TestRedis::tcp();
    let mut config = Config::builder().build().expect("config");
    config.redis.url = Some(redis.url());
    let _rt = shoal::init_with(config).expect("runtime");
    let key = AuthKey::from_bytes(b"the key both programs were given".to_vec());
    shoal::set_authkey(key.clone());
    let manager = Manager::new().expect("manager");
    // Python's `register('get_queue', callable=lambda: queue)`: named objects for clients.
    let jobs: Queue<String> = manager.queue().expect("queue");
    manager.publish("jobs", &jobs).expect("publish");
    let results = manager.dict::<String, u64>().expect("dict");
    manager.publish("results", &results).expect("publish");
    assert!(matches!(
        manager.lookup::<Queue<String>>("nothing"),
        Err(shoal::Error::KeyError(_))
    ));
    let uri = manager.address().uri();
    let other = |key: &[u8]| {
        shoal_integration_tests::scenario(
            env!("CARGO_BIN_EXE_scenario"),
            &["manager-connect", &uri, &hex(key)],
            &[("SHOAL_REDIS_URL", &redis.url())],
        )
    };

    let out = other(key.as_bytes());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let proxy = field(&stdout, "dict").expect("the other program's dict");
    let d: DictProxy<String, u64> = serde_json::from_str(&proxy).expect("a dict proxy");
    assert_eq!(d.get("from another program").expect("get"), Some(42));
    assert_eq!(
        jobs.get_timeout(std::time::Duration::from_secs(10))
            .expect("the other program's item"),
        "done by another program"
    );
    assert_eq!(results.get("answer").expect("get"), Some(42));

    let keys_before = d.len().expect("len");
    let out = other(b"not the manager's key");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("refused: "), "{stdout}");
    assert!(!stdout.contains("dict="), "{stdout}");
    assert_eq!(d.len().expect("len"), keys_before);

    manager.shutdown().expect("shutdown");
    let out = other(key.as_bytes());
    assert!(
        !out.status.success(),
        "a shut down manager cannot be reached"
    );
    assert!(
        text(&out.stderr).contains("shut down"),
        "{}",
        text(&out.stderr)
    );
}
