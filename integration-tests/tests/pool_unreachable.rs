//! `Pool` whose workers cannot reach Redis while the driver can (on Kubernetes, a Redis URL
//! Secret naming an address the pods cannot reach): the workers exit with code 75 (store lost),
//! which is never charged to the restart budget; the pool must break rather than restart them
//! forever while its calls hang. Real redis-server, real worker subprocesses, told a closed
//! port for Redis.

use std::time::{Duration, Instant};

use shoal::prelude::*;

/// Set (to anything) in a worker's environment: the worker is told a closed port for Redis.
const CUT_OFF: &str = "SHOAL_TEST_CUT_OFF";

/// The worker entry of `shoal::test_support!()`, which first points a worker whose environment
/// has [`CUT_OFF`] at a closed port (the backend sets the worker's Redis URL after the pool's
/// `multiprocessing.env_vars`, so these cannot override it).
#[test]
fn shoal_worker_entry() {
    if std::env::var_os(CUT_OFF).is_some() && std::env::var_os("SHOAL_WORKER_TASK").is_some() {
        // SAFETY: the worker process has no other thread that reads the environment yet (the
        // test harness's main thread only waits for this test).
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var("SHOAL_WORKER_REDIS", "redis://127.0.0.1:1/");
        }
    }
    shoal::__private::run_worker_entry();
}

// linkme places the marker in a link section; the marker is plain data.
#[doc(hidden)]
#[allow(unsafe_code, non_upper_case_globals)]
#[shoal::__private::linkme::distributed_slice(shoal::__private::TEST_WORKER_ENTRIES)]
#[linkme(crate = shoal::__private::linkme)]
static __SHOAL_TEST_WORKER_ENTRY: &str = ::core::module_path!();

#[shoal::remote]
fn square(x: u64) -> u64 {
    x * x
}

#[test]
fn workers_that_cannot_reach_redis_while_the_driver_can_break_the_pool() {
    let config = Config::builder()
        .response_timeout(Duration::from_secs(1))
        .env_var(CUT_OFF, "1")
        .build()
        .expect("config");
    let _rt = shoal::init_with(config).expect("runtime");
    let pool = Pool::builder()
        .processes(2)
        .start_method(StartMethod::Process)
        .build()
        .expect("pool");
    let started = Instant::now();
    let call = pool.map_async(square, 0..8u64).expect("map_async");
    // The old behaviour: the workers are restarted forever and the call never ends.
    let error = call
        .get(Some(Duration::from_secs(60)))
        .expect_err("no worker can reach Redis");
    let text = error.to_string();
    assert!(
        text.contains("could not reach Redis") && text.contains("driver reaches Redis"),
        "{error:?}"
    );
    assert!(text.contains("redis_url"), "{error:?}");
    // At least the bound's response timeouts went by, and not much more.
    let took = started.elapsed();
    assert!(took < Duration::from_secs(30), "took {took:?}");
    // Later calls fail too: the pool is broken.
    assert!(pool.map(square, 0..2u64).is_err());
}
