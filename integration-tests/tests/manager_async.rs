//! The async forms of the Manager's own calls (`new_async`, `connect_async`...) and of its
//! proxies (`DictProxy::get_async`, `ListProxy::append_async`, `NamespaceProxy::set_async`...)
//! against a real redis-server and real processes, under a Tokio
//! current-thread runtime: the results and errors of the blocking forms and Python's semantics,
//! writes by another process seen by async reads, errors mapped as the blocking forms map them,
//! and a list write waiting for another process's sort without blocking the caller's thread.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::time::{Duration, Instant};

use shoal::Error;
use shoal::prelude::*;
use shoal_integration_tests::{raw_redis, wait_for_async};

shoal::test_support!();

fn runtime() -> shoal::Runtime {
    shoal::init_with(Config::builder().build().expect("config")).expect("runtime")
}

/// Runs `body` to its end on a Tokio current-thread runtime.
fn block_on(body: impl Future<Output = ()>) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("current-thread runtime")
        .block_on(body)
}

/// The manager's key that ends with `suffix` (`:head` of its only list...).
fn manager_key(conn: &mut redis::Connection, address: &ManagerAddress, suffix: &str) -> String {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("shoal:{{default:manager:{}}}:*", address.id()))
        .query(conn)
        .expect("keys");
    keys.into_iter()
        .find(|k| k.ends_with(suffix))
        .expect("the key")
}

fn is_key_error(e: &Error, text: &str) -> bool {
    matches!(e, Error::KeyError(m) if m.contains(text))
}

fn is_index_error(e: &Error, text: &str) -> bool {
    matches!(e, Error::IndexError(m) if m == text)
}

fn is_value_error(e: &Error, text: &str) -> bool {
    matches!(e, Error::InvalidState(m) if m.contains(text))
}

#[shoal::remote]
fn set_from_child(go: Event, d: DictProxy<String, i64>, l: ListProxy<i64>, n: NamespaceProxy) {
    go.wait(None).expect("go");
    d.set("child", 42).expect("d.set");
    d.del("gone").expect("d.del");
    l.append(99).expect("l.append");
    n.set("who", "child").expect("n.set");
}

// ------------------------------------------------------------------------------------ dict --

#[test]
fn dict_async_forms_match_the_blocking_ones() {
    let _rt = runtime();
    let manager = Manager::new().expect("manager");
    let d = manager.dict::<String, i64>().expect("dict");
    let other = manager
        .dict::<String, i64>()
        .expect("a second dict, written blocking");
    block_on(async {
        // Missing keys: None, the default, or KeyError naming the key.
        assert_eq!(d.get_async("a").await.expect("get_async"), None);
        assert_eq!(d.get_or_async("a", 7).await.expect("get_or_async"), 7);
        let e = d
            .getitem_async("a")
            .await
            .expect_err("getitem_async missing");
        assert!(is_key_error(&e, "\"a\""), "{e}");
        assert_eq!(
            e.to_string(),
            d.getitem("a").expect_err("getitem").to_string()
        );
        let e = d.del_async("a").await.expect_err("del_async missing");
        assert!(is_key_error(&e, "\"a\""), "{e}");
        let e = d.pop_async("a").await.expect_err("pop_async missing");
        assert!(is_key_error(&e, "\"a\""), "{e}");
        assert_eq!(d.pop_or_async("a", -1).await.expect("pop_or_async"), -1);
        let e = d.popitem_async().await.expect_err("popitem_async on empty");
        assert!(is_key_error(&e, "dictionary is empty"), "{e}");
        assert!(d.is_empty_async().await.expect("is_empty_async"));
        assert_eq!(d.len_async().await.expect("len_async"), 0);
        assert!(!d.contains_async("a").await.expect("contains_async"));

        // Writes by the async forms, read by the blocking ones (and the other way round).
        d.set_async("b", 1).await.expect("set_async");
        d.set_async("a", 2).await.expect("set_async");
        d.set_async("c", 3).await.expect("set_async");
        d.set_async("b", 10)
            .await
            .expect("set_async replaces in place");
        let expected: Vec<(String, i64)> = vec![("b".into(), 10), ("a".into(), 2), ("c".into(), 3)];
        assert_eq!(d.items().expect("items"), expected);
        assert_eq!(d.items_async().await.expect("items_async"), expected);
        assert_eq!(d.keys_async().await.expect("keys_async"), ["b", "a", "c"]);
        assert_eq!(
            d.keys_async().await.expect("keys_async"),
            d.keys().expect("keys")
        );
        assert_eq!(d.values_async().await.expect("values_async"), [10, 2, 3]);
        let copy: HashMap<String, i64> = d.copy_async().await.expect("copy_async");
        assert_eq!(copy, d.copy::<HashMap<String, i64>>().expect("copy"));
        let ordered: Vec<(String, i64)> = d.copy_async().await.expect("copy_async");
        assert_eq!(ordered, expected);
        assert_eq!(d.len_async().await.expect("len_async"), 3);
        assert!(!d.is_empty_async().await.expect("is_empty_async"));
        assert!(d.contains_async("a").await.expect("contains_async"));
        assert!(!d.contains_async("z").await.expect("contains_async"));
        assert_eq!(d.get_async("b").await.expect("get_async"), Some(10));
        assert_eq!(d.get_or_async("b", 0).await.expect("get_or_async"), 10);
        assert_eq!(d.getitem_async("c").await.expect("getitem_async"), 3);
        d.set("blocking", 5).expect("set");
        assert_eq!(d.getitem_async("blocking").await.expect("getitem_async"), 5);

        // pop, del, popitem (LIFO), as the blocking forms on a twin dict.
        other
            .update(d.items().expect("items"))
            .expect("the twin gets the same pairs");
        assert_eq!(d.pop_async("a").await.expect("pop_async"), 2);
        assert_eq!(other.pop("a").expect("pop"), 2);
        assert_eq!(d.pop_or_async("c", -1).await.expect("pop_or_async"), 3);
        assert_eq!(other.pop_or("c", -1).expect("pop_or"), 3);
        d.set_async("a", 4).await.expect("set again: goes last");
        other.set("a", 4).expect("set again: goes last");
        assert_eq!(
            d.popitem_async().await.expect("popitem_async"),
            other.popitem().expect("popitem")
        );
        assert_eq!(
            d.items_async().await.expect("items"),
            other.items().expect("items")
        );
        d.del_async("b").await.expect("del_async");
        assert!(!d.contains("b").expect("contains"));
        assert_eq!(d.items().expect("items"), vec![("blocking".into(), 5)]);

        // setdefault is atomic get-or-insert; update keeps order and replaces in place.
        assert_eq!(d.setdefault_async("x", 1).await.expect("inserts"), 1);
        assert_eq!(d.setdefault_async("x", 2).await.expect("keeps"), 1);
        assert_eq!(d.getitem("x").expect("getitem"), 1);
        d.update_async(vec![
            ("y".to_string(), 2),
            ("x".to_string(), 5),
            ("z".to_string(), 3),
        ])
        .await
        .expect("update_async");
        d.update_async(Vec::new())
            .await
            .expect("an empty update_async");
        assert_eq!(
            d.copy::<Vec<(String, i64)>>().expect("copy"),
            vec![
                ("blocking".into(), 5),
                ("x".into(), 5),
                ("y".into(), 2),
                ("z".into(), 3)
            ]
        );
        let sorted: BTreeMap<String, i64> = d.copy_async().await.expect("copy_async");
        assert_eq!(sorted.len(), 4);
        d.clear_async().await.expect("clear_async");
        assert_eq!(d.len().expect("len"), 0);
        assert_eq!(d.items_async().await.expect("items_async"), vec![]);
        d.clear_async().await.expect("clear_async on an empty dict");

        // The futures borrow nothing: they can be spawned as 'static tasks.
        let key = String::from("spawned");
        let set = tokio::spawn(d.set_async(key.as_str(), 8));
        drop(key);
        set.await.expect("task").expect("set_async as a task");
        let get = tokio::spawn(d.getitem_async("spawned"));
        assert_eq!(get.await.expect("task").expect("getitem_async"), 8);
        // Several in flight at once on the one thread.
        let (a, b, c) = tokio::join!(
            d.get_async("spawned"),
            d.len_async(),
            d.contains_async("nothing")
        );
        assert_eq!(
            (a.expect("a"), b.expect("b"), c.expect("c")),
            (Some(8), 1, false)
        );
    });
    manager.shutdown().expect("shutdown");
}

#[test]
fn async_reads_see_another_process_write() {
    let _rt = runtime();
    let manager = Manager::new().expect("manager");
    let d = manager.dict::<String, i64>().expect("dict");
    let l = manager.list_from(vec![1i64]).expect("list");
    let n = manager.namespace().expect("namespace");
    let go = Event::new().expect("event");
    let child = Process::new(
        set_from_child,
        (go.clone(), d.clone(), l.clone(), n.clone()),
    );
    child.start().expect("start");
    block_on(async {
        d.set_async("gone", 1).await.expect("set_async");
        n.set_async("who", "parent").await.expect("set_async");
        // Read once before the child writes, so that nothing read later can be a cached copy.
        assert_eq!(d.get_async("child").await.expect("get_async"), None);
        assert_eq!(l.to_vec_async().await.expect("to_vec_async"), vec![1]);
        assert_eq!(
            n.get_async::<String>("who").await.expect("get_async"),
            "parent"
        );
        go.set().expect("go");
        let seen = wait_for_async(Duration::from_secs(30), || async {
            n.get_async::<String>("who").await.expect("get_async") == "child"
        })
        .await;
        assert!(seen, "the child's namespace write was never seen");
        // The child wrote the namespace last: its other writes are there.
        assert_eq!(d.getitem_async("child").await.expect("getitem_async"), 42);
        let e = d
            .getitem_async("gone")
            .await
            .expect_err("the child deleted it");
        assert!(is_key_error(&e, "gone"), "{e}");
        assert!(!d.contains_async("gone").await.expect("contains_async"));
        assert_eq!(
            d.items_async().await.expect("items_async"),
            vec![("child".into(), 42)]
        );
        assert_eq!(l.to_vec_async().await.expect("to_vec_async"), vec![1, 99]);
        assert_eq!(l.get_async(-1).await.expect("get_async"), 99);
        assert_eq!(l.len_async().await.expect("len_async"), 2);
    });
    child.join(Some(Duration::from_secs(30))).expect("join");
    assert_eq!(child.exitcode(), Some(0), "the child failed");
    manager.shutdown().expect("shutdown");
}

// ------------------------------------------------------------------------------------ list --

#[test]
fn list_async_forms_match_the_blocking_ones() {
    let _rt = runtime();
    let manager = Manager::new().expect("manager");
    let l = manager.list::<i64>().expect("list");
    block_on(async {
        // An empty list: IndexError with Python's messages, as the blocking forms.
        let e = l.get_async(0).await.expect_err("get_async on empty");
        assert!(is_index_error(&e, "list index out of range"), "{e}");
        assert_eq!(e.to_string(), l.get(0).expect_err("get").to_string());
        let e = l.pop_async().await.expect_err("pop_async on empty");
        assert!(is_index_error(&e, "pop from empty list"), "{e}");
        assert_eq!(e.to_string(), l.pop().expect_err("pop").to_string());
        assert!(l.is_empty_async().await.expect("is_empty_async"));
        assert_eq!(
            l.to_vec_async().await.expect("to_vec_async"),
            Vec::<i64>::new()
        );

        // Writes: append, extend, insert with Python's clamping.
        l.append_async(1).await.expect("append_async");
        l.extend_async(vec![2, 3, 4]).await.expect("extend_async");
        l.extend_async(Vec::new())
            .await
            .expect("an empty extend_async");
        l.insert_async(0, 0).await.expect("insert_async at 0");
        l.insert_async(-1, 35)
            .await
            .expect("insert_async before the last");
        l.insert_async(100, 5)
            .await
            .expect("insert_async past the end appends");
        l.insert_async(-100, -1)
            .await
            .expect("insert_async before the start");
        let expected = vec![-1, 0, 1, 2, 3, 35, 4, 5];
        assert_eq!(l.to_vec().expect("to_vec"), expected);
        assert_eq!(l.to_vec_async().await.expect("to_vec_async"), expected);
        assert_eq!(l.len_async().await.expect("len_async"), 8);
        assert!(!l.is_empty_async().await.expect("is_empty_async"));

        // Reads by index and slice.
        assert_eq!(l.get_async(0).await.expect("get_async"), -1);
        assert_eq!(l.get_async(-1).await.expect("get_async"), 5);
        let e = l.get_async(8).await.expect_err("get_async outside");
        assert!(is_index_error(&e, "list index out of range"), "{e}");
        for (start, stop) in [
            (Some(2), Some(10)),
            (Some(1), Some(-1)),
            (Some(-3), None),
            (None, None),
            (Some(5), Some(2)),
        ] {
            assert_eq!(
                l.get_range_async(start, stop)
                    .await
                    .expect("get_range_async"),
                l.get_range(start, stop).expect("get_range"),
                "[{start:?}:{stop:?}]"
            );
        }
        assert_eq!(
            l.get_range_async(-3, None).await.expect("l[-3:]"),
            [35, 4, 5]
        );

        // set and del by index.
        l.set_async(-1, 50).await.expect("set_async");
        assert_eq!(l.get(-1).expect("get"), 50);
        let e = l.set_async(8, 0).await.expect_err("set_async outside");
        assert!(
            is_index_error(&e, "list assignment index out of range"),
            "{e}"
        );
        l.del_async(0).await.expect("del_async");
        let e = l.del_async(-8).await.expect_err("del_async outside");
        assert!(
            is_index_error(&e, "list assignment index out of range"),
            "{e}"
        );
        assert_eq!(e.to_string(), l.del(-8).expect_err("del").to_string());
        assert_eq!(l.to_vec().expect("to_vec"), [0, 1, 2, 3, 35, 4, 50]);

        // pop and pop_at.
        assert_eq!(l.pop_async().await.expect("pop_async"), 50);
        assert_eq!(l.pop_at_async(-2).await.expect("pop_at_async"), 35);
        assert_eq!(l.pop_at_async(0).await.expect("pop_at_async"), 0);
        let e = l.pop_at_async(10).await.expect_err("pop_at_async outside");
        assert!(is_index_error(&e, "pop index out of range"), "{e}");
        assert_eq!(l.to_vec().expect("to_vec"), [1, 2, 3, 4]);

        // Searches: index, count, contains, remove (ValueError when absent).
        l.extend(vec![2, 2]).expect("extend");
        assert_eq!(l.index_async(&2).await.expect("index_async"), 1);
        assert_eq!(
            l.index_async(&2).await.expect("index_async"),
            l.index(&2).expect("index")
        );
        let e = l
            .index_async(&7)
            .await
            .expect_err("index_async of an absent item");
        assert!(is_value_error(&e, "not in list"), "{e}");
        assert_eq!(l.count_async(&2).await.expect("count_async"), 3);
        assert_eq!(l.count_async(&7).await.expect("count_async"), 0);
        assert!(l.contains_async(&4).await.expect("contains_async"));
        assert!(!l.contains_async(&7).await.expect("contains_async"));
        l.remove_async(&2)
            .await
            .expect("remove_async removes the first");
        assert_eq!(l.to_vec().expect("to_vec"), [1, 3, 4, 2, 2]);
        let e = l
            .remove_async(&7)
            .await
            .expect_err("remove_async of an absent item");
        assert!(is_value_error(&e, "x not in list"), "{e}");
        assert_eq!(e.to_string(), l.remove(&7).expect_err("remove").to_string());

        // reverse and sort, in place.
        l.reverse_async().await.expect("reverse_async");
        assert_eq!(l.to_vec().expect("to_vec"), [2, 2, 4, 3, 1]);
        l.sort_async().await.expect("sort_async");
        assert_eq!(l.to_vec().expect("to_vec"), [1, 2, 2, 3, 4]);
        l.sort_by_async(|a: &i64, b: &i64| b.cmp(a))
            .await
            .expect("sort_by_async reversed");
        assert_eq!(l.to_vec().expect("to_vec"), [4, 3, 2, 2, 1]);
        // Stable, by a key: the order of equal keys is kept.
        let words = manager
            .list_from(["bb", "a", "ccc", "dd", "e"].map(String::from))
            .expect("words");
        words
            .sort_by_async(|a: &String, b: &String| a.len().cmp(&b.len()))
            .await
            .expect("sort_by_async by length");
        assert_eq!(
            words.to_vec().expect("to_vec"),
            ["a", "e", "bb", "dd", "ccc"]
        );

        // clear.
        l.clear_async().await.expect("clear_async");
        assert_eq!(l.len().expect("len"), 0);
        l.clear_async().await.expect("clear_async on an empty list");
        assert!(l.is_empty_async().await.expect("is_empty_async"));
    });
    manager.shutdown().expect("shutdown");
}

#[test]
fn an_async_list_write_waits_for_a_sort_without_blocking_the_thread() {
    let rt = runtime();
    let mut conn = raw_redis(&rt);
    let manager = Manager::new().expect("manager");
    let l = manager.list_from(vec![1i64, 2, 3]).expect("list");
    let head = manager_key(&mut conn, &manager.address(), ":head");
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as u64
    };
    // Another process's sort froze the list for 25 s (less than a writer waits at most).
    let _: () = redis::cmd("HSET")
        .arg(&head)
        .arg("\0f")
        .arg(format!("other-sorter|{}", now_ms() + 25_000))
        .query(&mut conn)
        .expect("hset");
    block_on(async {
        let started = Instant::now();
        let append = Timed::new(l.append_async(4));
        let meanwhile = async {
            // On the same thread, while the append waits: reads are not frozen, and the
            // append has not happened.
            tokio::time::sleep(Duration::from_secs(2)).await;
            assert_eq!(l.to_vec_async().await.expect("to_vec_async"), vec![1, 2, 3]);
            assert_eq!(l.len_async().await.expect("len_async"), 3);
            // The sort is over: its freeze goes.
            let _: () = redis::cmd("HDEL")
                .arg(&head)
                .arg("\0f")
                .query(&mut conn)
                .expect("hdel");
            started.elapsed()
        };
        let ((appended, inside_polls), lifted_after) = tokio::join!(append, meanwhile);
        appended.expect("append_async after the freeze went");
        assert!(
            lifted_after < Duration::from_secs(15),
            "the thread was blocked by the waiting append for {lifted_after:?}"
        );
        // The append waited about 2 s; a form that paused by blocking the thread would have
        // spent nearly all of it inside its polls.
        assert!(
            inside_polls < Duration::from_secs(1),
            "the waiting append blocked the thread for {inside_polls:?} of {:?}",
            started.elapsed()
        );
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the append waited {:?} after the freeze went",
            started.elapsed()
        );
        assert_eq!(
            l.to_vec_async().await.expect("to_vec_async"),
            vec![1, 2, 3, 4]
        );
    });
    manager.shutdown().expect("shutdown");
}

/// A future that adds up the time its polls take (time it holds the thread).
struct Timed<F: Future> {
    inner: std::pin::Pin<Box<F>>,
    inside_polls: Duration,
}

impl<F: Future> Timed<F> {
    fn new(inner: F) -> Self {
        Timed {
            inner: Box::pin(inner),
            inside_polls: Duration::ZERO,
        }
    }
}

impl<F: Future> Future for Timed<F> {
    type Output = (F::Output, Duration);

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let started = Instant::now();
        let polled = self.inner.as_mut().poll(cx);
        self.inside_polls += started.elapsed();
        let inside_polls = self.inside_polls;
        polled.map(|output| (output, inside_polls))
    }
}

// ------------------------------------------------------------------------------- namespace --

#[test]
fn namespace_async_forms_match_the_blocking_ones() {
    let _rt = runtime();
    let manager = Manager::new().expect("manager");
    let n = manager.namespace().expect("namespace");
    block_on(async {
        let e = n
            .get_async::<i64>("name")
            .await
            .expect_err("get_async missing");
        assert!(
            is_key_error(&e, "'Namespace' object has no attribute 'name'"),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            n.get::<i64>("name").expect_err("get").to_string()
        );
        assert_eq!(
            n.try_get_async::<i64>("name").await.expect("try_get_async"),
            None
        );
        let e = n.del_async("name").await.expect_err("del_async missing");
        assert!(is_key_error(&e, "no attribute 'name'"), "{e}");
        assert!(!n.contains_async("name").await.expect("contains_async"));
        assert_eq!(
            n.names_async().await.expect("names_async"),
            Vec::<String>::new()
        );

        n.set_async("name", "Bob").await.expect("set_async");
        n.set_async("age", 42).await.expect("set_async");
        assert_eq!(n.get::<String>("name").expect("get"), "Bob");
        assert_eq!(
            n.get_async::<String>("name").await.expect("get_async"),
            "Bob"
        );
        assert_eq!(n.get_async::<i64>("age").await.expect("get_async"), 42);
        assert_eq!(
            n.try_get_async::<i64>("age").await.expect("try_get_async"),
            Some(42)
        );
        assert!(n.contains_async("age").await.expect("contains_async"));
        assert_eq!(n.names_async().await.expect("names_async"), ["age", "name"]);
        assert_eq!(
            n.names_async().await.expect("names_async"),
            n.names().expect("names")
        );
        // An attribute read as another type: a codec error, as the blocking form.
        let e = n
            .get_async::<i64>("name")
            .await
            .expect_err("a string read as i64");
        assert!(matches!(&e, Error::Codec { .. }), "{e}");
        assert!(matches!(
            n.to_map_async::<i64>().await,
            Err(Error::Codec { .. })
        ));
        n.del_async("name").await.expect("del_async");
        assert!(!n.contains("name").expect("contains"));
        n.set("blocking", 7).expect("set");
        assert_eq!(
            n.to_map_async::<i64>().await.expect("to_map_async"),
            BTreeMap::from([("age".to_string(), 42), ("blocking".to_string(), 7)])
        );
        assert_eq!(
            n.to_map_async::<i64>().await.expect("to_map_async"),
            n.to_map::<i64>().expect("to_map")
        );
    });
    manager.shutdown().expect("shutdown");
}

// ---------------------------------------------------------------------------------- errors --

#[test]
fn async_forms_map_errors_as_the_blocking_ones() {
    let rt = runtime();
    let mut conn = raw_redis(&rt);
    let manager = Manager::new().expect("manager");
    let address = manager.address();
    let d = manager.dict::<String, i64>().expect("dict");
    d.set("a", 1).expect("set");
    let l = manager.list_from(vec![1i64]).expect("list");
    let n = manager.namespace().expect("namespace");
    n.set("x", 1).expect("set");
    block_on(async {
        // Keys that hold what shoal did not write: the same clear error.
        let data = manager_key(&mut conn, &address, ":data");
        let _: () = redis::cmd("HSET")
            .arg(&data)
            .arg("\0v")
            .arg("x")
            .query(&mut conn)
            .expect("hset");
        let blocking = d.get("a").expect_err("get");
        let async_form = d.get_async("a").await.expect_err("get_async");
        assert!(is_value_error(&async_form, "did not write"), "{async_form}");
        assert_eq!(async_form.to_string(), blocking.to_string());
        let items = manager_key(&mut conn, &address, ":items");
        let _: () = redis::cmd("SET")
            .arg(&items)
            .arg("not a list")
            .query(&mut conn)
            .expect("set");
        let blocking = l.append(2).expect_err("append");
        let async_form = l.append_async(2).await.expect_err("append_async");
        assert!(is_value_error(&async_form, "did not write"), "{async_form}");
        assert_eq!(async_form.to_string(), blocking.to_string());

        // After shutdown: the container no longer exists, whichever form asks.
        manager.shutdown().expect("shutdown");
        let pairs = [
            (
                d.get("a").expect_err("get"),
                d.get_async("a").await.expect_err("get_async"),
            ),
            (
                d.set("b", 1).expect_err("set"),
                d.set_async("b", 1).await.expect_err("set_async"),
            ),
            (
                l.get(0).expect_err("get"),
                l.get_async(0).await.expect_err("get_async"),
            ),
            (
                l.append(1).expect_err("append"),
                l.append_async(1).await.expect_err("append_async"),
            ),
            (
                n.get::<i64>("x").expect_err("get"),
                n.get_async::<i64>("x").await.expect_err("get_async"),
            ),
            (
                n.del("x").expect_err("del"),
                n.del_async("x").await.expect_err("del_async"),
            ),
        ];
        for (blocking, async_form) in pairs {
            assert!(
                matches!(&async_form, Error::InvalidState(m) if m.contains("no longer exists")),
                "{async_form}"
            );
            assert_eq!(async_form.to_string(), blocking.to_string());
        }
    });
}

#[test]
fn async_iterators_read_page_by_page_and_report_changes() {
    use futures::StreamExt;
    let _rt = runtime();
    let manager = Manager::new().expect("manager");
    let d = manager.dict::<i64, String>().expect("dict");
    let l = manager.list::<i64>().expect("list");
    block_on(async {
        // Empty: nothing, then the end.
        let mut pairs = d.iter_async().await.expect("iter_async");
        assert!(pairs.next().await.is_none());
        assert!(
            l.iter_async()
                .await
                .expect("iter_async")
                .next()
                .await
                .is_none()
        );

        // Several pages, in insertion order, as the blocking iterators give them.
        let n = 2500i64;
        d.update_async((0..n).rev().map(|i| (i, i.to_string())))
            .await
            .expect("update");
        l.extend_async(0..n).await.expect("extend");
        let pairs: Vec<(i64, String)> = d
            .iter_async()
            .await
            .expect("iter_async")
            .map(|p| p.expect("pair"))
            .collect()
            .await;
        let blocking: Vec<(i64, String)> =
            d.iter().expect("iter").map(|p| p.expect("pair")).collect();
        assert_eq!(pairs.len(), n as usize);
        assert_eq!(pairs, blocking);
        assert_eq!(pairs[0], (n - 1, (n - 1).to_string()), "insertion order");
        let items: Vec<i64> = l
            .iter_async()
            .await
            .expect("iter_async")
            .map(|i| i.expect("item"))
            .collect()
            .await;
        assert_eq!(items, (0..n).collect::<Vec<_>>());

        // A key added during the iteration: reported at the next page, once, then the end.
        let mut pairs = d.iter_async().await.expect("iter_async");
        for _ in 0..1000 {
            pairs.next().await.expect("a pair").expect("no change yet");
        }
        d.set_async(&n, "new".into()).await.expect("a new key");
        match pairs.next().await {
            Some(Err(Error::InvalidState(m))) => {
                assert!(
                    m.contains("dictionary changed size during iteration"),
                    "{m}"
                )
            }
            other => panic!("expected the change to be reported, got {other:?}"),
        }
        assert!(
            pairs.next().await.is_none(),
            "a stream ends after its error"
        );

        // A small dict read whole by its first page: a key removed after it is still reported
        // before the end.
        let small = manager.dict::<i64, i64>().expect("dict");
        small
            .update_async((0..3).map(|i| (i, i)))
            .await
            .expect("fill");
        let mut pairs = small.iter_async().await.expect("iter_async");
        assert_eq!(pairs.next().await.expect("first").expect("pair"), (0, 0));
        small.del_async(&2).await.expect("del");
        let rest: Vec<_> = pairs.collect().await;
        assert!(
            matches!(rest.last(), Some(Err(Error::InvalidState(m))) if m.contains("changed size")),
            "{rest:?}"
        );

        // An item inserted during a list's iteration: reported at the next page.
        let mut items = l.iter_async().await.expect("iter_async");
        items.next().await.expect("an item").expect("no change yet");
        l.insert_async(0, -1).await.expect("insert");
        let rest: Vec<_> = items.collect().await;
        assert!(
            matches!(rest.last(), Some(Err(Error::InvalidState(m))) if m.contains("list changed size")),
            "{rest:?}"
        );
        assert_eq!(
            rest.len(),
            1000,
            "the rest of the first page, then the error"
        );
    });
    manager.shutdown().expect("shutdown");
}

#[test]
fn containers_are_made_without_blocking_and_not_after_shutdown() {
    let _rt = runtime();
    let manager = Manager::new().expect("manager");
    block_on(async {
        let d = manager
            .dict_async::<String, i64>()
            .await
            .expect("dict_async");
        d.set_async(&"a".to_string(), 1).await.expect("set");
        let l = manager.list_async::<i64>().await.expect("list_async");
        l.append_async(7).await.expect("append");
        let n = manager.namespace_async().await.expect("namespace_async");
        n.set_async("x", &3i64).await.expect("set");
        // The same containers as the blocking forms make: another handle sees them.
        assert_eq!(d.get(&"a".to_string()).expect("get"), Some(1));
        assert_eq!(l.to_vec().expect("to_vec"), vec![7]);
        assert_eq!(n.get::<i64>("x").expect("get"), 3);
    });
    manager.shutdown().expect("shutdown");
    block_on(async {
        assert!(matches!(
            manager.dict_async::<String, i64>().await,
            Err(Error::InvalidState(m)) if m.contains("shut down")
        ));
    });
}

#[test]
fn publish_and_lookup_have_async_forms() {
    let _rt = runtime();
    let manager = Manager::new().expect("manager");
    let jobs: Queue<u64> = Queue::new().expect("queue");
    block_on(async {
        manager.publish_async("jobs", &jobs).await.expect("publish");
        let there: Queue<u64> = manager.lookup_async("jobs").await.expect("lookup");
        there.put(7).expect("put");
        assert!(matches!(
            manager.lookup_async::<Queue<u64>>("nothing").await,
            Err(Error::KeyError(m)) if m.contains("nothing was published")
        ));
    });
    // The blocking lookup sees what the async publish wrote, and the item put through it.
    let again: Queue<u64> = manager.lookup("jobs").expect("lookup");
    assert_eq!(again.get_timeout(Duration::from_secs(10)).expect("get"), 7);
    manager.shutdown().expect("shutdown");
    block_on(async {
        assert!(matches!(
            manager.publish_async("late", &1u8).await,
            Err(Error::InvalidState(m)) if m.contains("shut down")
        ));
        assert!(matches!(
            manager.lookup_async::<Queue<u64>>("jobs").await,
            Err(Error::InvalidState(m)) if m.contains("shut down")
        ));
    });
}

#[test]
fn a_manager_is_made_and_connected_to_async_as_the_blocking_forms_do() {
    let _rt = runtime();
    block_on(async {
        let manager = Manager::new_async().await.expect("new_async");
        let d = manager.dict_async::<String, i64>().await.expect("dict");
        d.set_async(&"a".to_string(), 1).await.expect("set");
        manager
            .publish_async("d", &d)
            .await
            .expect("publish the dict");
        let key = current_process().authkey;

        // Connected with the right key: the same manager, its objects visible.
        let other = Manager::connect_async(manager.address(), key.clone())
            .await
            .expect("connect_async");
        assert_eq!(other.address(), manager.address());
        let seen: DictProxy<String, i64> = other.lookup_async("d").await.expect("lookup");
        assert_eq!(
            seen.get_async(&"a".to_string()).await.expect("get"),
            Some(1)
        );
        // The blocking connect agrees.
        Manager::connect(manager.address(), key.clone()).expect("connect");

        // A wrong key: Authentication, as `connect` says.
        let wrong = shoal::AuthKey::from_bytes(b"not the key".to_vec());
        match Manager::connect_async(manager.address(), wrong.clone()).await {
            Err(Error::Authentication(_)) => {}
            other => panic!("a wrong key connected: {other:?}"),
        }
        assert!(matches!(
            Manager::connect(manager.address(), wrong),
            Err(Error::Authentication(_))
        ));

        // A manager of its own key: only that key connects.
        let keyed = Manager::with_authkey_async(shoal::AuthKey::from_bytes(b"k2".to_vec()))
            .await
            .expect("with_authkey_async");
        assert!(matches!(
            Manager::connect_async(keyed.address(), key.clone()).await,
            Err(Error::Authentication(_))
        ));
        Manager::connect_async(keyed.address(), shoal::AuthKey::from_bytes(b"k2".to_vec()))
            .await
            .expect("its own key");

        // Shut down: connecting is an error naming it.
        manager.shutdown().expect("shutdown");
        match Manager::connect_async(manager.address(), key).await {
            Err(Error::InvalidState(m)) => assert!(m.contains("it was shut down"), "{m}"),
            other => panic!("connected to a manager that was shut down: {other:?}"),
        }
        keyed.shutdown().expect("shutdown");
    });
}

/// Awaited in a task of a Tokio runtime, the proxies' async calls are sent from tasks of that
/// runtime, on connections opened there (their drivers stay there: none when the calls ran on
/// shoal's actor runtime), with the same results and errors; a list sort's comparisons run in
/// the caller's task between its round trips.
#[test]
fn proxy_calls_awaited_in_a_task_run_on_the_callers_runtime() {
    let _rt = runtime();
    let manager = Manager::new().expect("manager");
    let d = manager.dict::<String, i64>().expect("dict");
    let l = manager.list::<i64>().expect("list");
    let tokio_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio");
    let (alive, d, l) = tokio_rt
        .block_on(tokio_rt.spawn(async move {
            d.set_async("a", 1).await.expect("set");
            assert_eq!(d.get_async("a").await.expect("get"), Some(1));
            let e = d.getitem_async("b").await.expect_err("missing key");
            assert!(is_key_error(&e, "b"), "{e}");
            for x in [3, 1, 2] {
                l.append_async(x).await.expect("append");
            }
            l.sort_async().await.expect("sort");
            let alive = tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks();
            (alive, d, l)
        }))
        .expect("task");
    // This task, the one that forgets the runtime at its shutdown, the connection's driver.
    assert!(alive >= 3, "{alive} tasks");
    drop(tokio_rt);
    // Written once each, as the blocking forms read them.
    assert_eq!(d.get("a").expect("get"), Some(1));
    assert_eq!(l.to_vec().expect("to_vec"), vec![1, 2, 3]);
}

/// A write whose future is dropped before its task sent it (polled once, then dropped with the
/// lock that guards it released) is not sent: another holder's write under the lock stays.
/// Before, the queued write landed after that holder's, undoing it.
#[test]
fn a_write_dropped_before_it_went_out_does_not_land_after_the_lock_is_released() {
    let _rt = runtime();
    let manager = Manager::new().expect("manager");
    let d = manager.dict::<String, i64>().expect("dict");
    let lock = Lock::new().expect("lock");
    let (task_dict, task_lock) = (d.clone(), lock.clone());
    // In a task of the caller's runtime: the write's task is one of this runtime too.
    block_on(async move {
        tokio::spawn(async move {
            let (d, lock) = (task_dict, task_lock);
            let guard = lock.lock_async().await.expect("lock");
            {
                let mut write = std::pin::pin!(d.set_async("k", 1));
                assert!(futures::poll!(write.as_mut()).is_pending());
            }
            drop(guard);
            // Without yielding to this runtime (where the dropped write's task waits):
            // another holder takes the lock and writes.
            std::thread::scope(|s| {
                s.spawn(|| {
                    lock.acquire().expect("acquire");
                    d.set("k", 2).expect("set");
                    lock.release().expect("release");
                })
                .join()
                .expect("thread");
            });
            tokio::time::sleep(Duration::from_millis(300)).await;
        })
        .await
        .expect("task");
    });
    assert_eq!(d.get("k").expect("get"), Some(2));
}
