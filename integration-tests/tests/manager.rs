//! `Manager` and its proxies against a real redis-server, across real processes: CPython's
//! manager tests (test_dict, test_list, test_namespace, test_dict_iter, test_list_iter,
//! test_dict_proxy_nested, test_list_proxy_in_list, test_remote/authkey), concurrent writers,
//! iteration under change, shutdown, and keys that hold garbage.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shoal::prelude::*;
use shoal::{AuthKey, Error};
use shoal_integration_tests::raw_redis;

shoal::test_support!();

fn runtime() -> shoal::Runtime {
    shoal::init_with(Config::builder().build().expect("config")).expect("runtime")
}

/// Every key of the manager at `address`.
fn manager_keys(conn: &mut redis::Connection, address: &ManagerAddress) -> Vec<String> {
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("shoal:{{default:manager:{}}}:*", address.id()))
        .query(conn)
        .expect("keys");
    keys.sort();
    keys
}

/// The `head` key of the manager's (only) list: its freeze field lives there.
fn list_head_key(conn: &mut redis::Connection, manager: &Manager) -> String {
    manager_keys(conn, &manager.address())
        .into_iter()
        .find(|k| k.ends_with(":head"))
        .expect("head")
}

/// Whether a sort's freeze is on the list whose head key is `head`.
fn frozen(conn: &mut redis::Connection, head: &str) -> bool {
    redis::cmd("HEXISTS")
        .arg(head)
        .arg("\0f")
        .query(conn)
        .expect("hexists")
}

fn is_key_error(e: &Error, key: &str) -> bool {
    matches!(e, Error::KeyError(m) if m.contains(key))
}

// ------------------------------------------------------------------------------------ dict --

#[test]
fn dict_has_python_semantics() {
    let _rt = runtime();
    let manager = Manager::new().expect("manager");
    // test_dict
    let d = manager.dict::<i64, String>().expect("dict");
    let indices: Vec<i64> = (65..70).collect();
    for &i in &indices {
        d.set(&i, char::from(i as u8).to_string()).expect("set");
    }
    let copy: HashMap<i64, String> = d.copy().expect("copy");
    let expected: HashMap<i64, String> = indices
        .iter()
        .map(|&i| (i, char::from(i as u8).to_string()))
        .collect();
    assert_eq!(copy, expected);
    assert_eq!(d.keys().expect("keys"), indices);
    assert_eq!(d.values().expect("values"), vec!["A", "B", "C", "D", "E"]);
    assert_eq!(d.items().expect("items")[0], (65, "A".to_string()));
    assert_eq!(d.len().expect("len"), 5);

    // Missing keys: KeyError naming the key, or a default.
    let d = manager.dict::<String, i64>().expect("dict");
    assert_eq!(d.get("a").expect("get"), None);
    assert_eq!(d.get_or("a", 7).expect("get_or"), 7);
    let e = d.getitem("a").expect_err("missing");
    assert!(is_key_error(&e, "\"a\""), "{e}");
    assert!(is_key_error(&d.del("a").expect_err("del missing"), "a"));
    assert!(is_key_error(&d.pop("a").expect_err("pop missing"), "a"));
    assert_eq!(d.pop_or("a", -1).expect("pop_or"), -1);
    let e = d.popitem().expect_err("popitem on empty");
    assert!(is_key_error(&e, "dictionary is empty"), "{e}");
    assert!(d.is_empty().expect("empty"));

    // Insertion order is kept; replacing a value keeps the key's place.
    d.set("b", 1).expect("set");
    d.set("a", 2).expect("set");
    d.set("c", 3).expect("set");
    d.set("b", 10).expect("replace");
    assert_eq!(
        d.items().expect("items"),
        vec![("b".into(), 10), ("a".into(), 2), ("c".into(), 3)]
    );
    assert!(d.contains("a").expect("contains"));
    assert!(!d.contains("z").expect("contains"));
    assert_eq!(d.getitem("b").expect("getitem"), 10);

    // pop, del, popitem (LIFO).
    assert_eq!(d.pop("a").expect("pop"), 2);
    assert!(!d.contains("a").expect("contains"));
    d.set("a", 4).expect("set again: goes last");
    assert_eq!(d.popitem().expect("popitem"), ("a".into(), 4));
    assert_eq!(d.popitem().expect("popitem"), ("c".into(), 3));
    d.del("b").expect("del");
    assert_eq!(d.len().expect("len"), 0);

    // setdefault is atomic get-or-insert.
    assert_eq!(d.setdefault("x", 1).expect("setdefault inserts"), 1);
    assert_eq!(d.setdefault("x", 2).expect("setdefault keeps"), 1);
    // update keeps the order of new keys and replaces existing ones in place.
    d.update(vec![
        ("y".to_string(), 2),
        ("x".to_string(), 5),
        ("z".to_string(), 3),
    ])
    .expect("update");
    assert_eq!(
        d.copy::<Vec<(String, i64)>>().expect("copy"),
        vec![("x".into(), 5), ("y".into(), 2), ("z".into(), 3)]
    );
    let sorted: BTreeMap<String, i64> = d.copy().expect("copy");
    assert_eq!(sorted.len(), 3);
    d.clear().expect("clear");
    assert_eq!(d.len().expect("len"), 0);
    assert_eq!(d.items().expect("items"), vec![]);
    d.clear().expect("clear an empty dict");

    // A value fetched is a copy.
    let lists = manager.dict::<String, Vec<i64>>().expect("dict");
    lists.set("l", vec![1, 2]).expect("set");
    let mut fetched = lists.getitem("l").expect("get");
    fetched.push(3);
    assert_eq!(lists.getitem("l").expect("get"), vec![1, 2]);

    // Tuple keys encode deterministically.
    let pairs = manager.dict::<(i64, String), bool>().expect("dict");
    pairs.set(&(1, "a".to_string()), true).expect("set");
    assert!(pairs.getitem(&(1, "a".to_string())).expect("same key"));
    manager.shutdown().expect("shutdown");
}

#[test]
fn dict_iteration_detects_changes() {
    let _rt = runtime();
    let manager = Manager::new().expect("manager");
    // test_dict_iter
    let d = manager.dict::<i64, String>().expect("dict");
    for i in 65..70 {
        d.set(&i, char::from(i as u8).to_string()).expect("set");
    }
    let mut it = d.iter().expect("iter");
    let keys: Vec<i64> = it.by_ref().map(|p| p.expect("pair").0).collect();
    assert_eq!(keys, (65..70).collect::<Vec<_>>());
    assert!(it.next().is_none(), "exhausted");
    let mut it = d.iter().expect("iter");
    d.clear().expect("clear");
    match it.next() {
        Some(Err(Error::InvalidState(m))) => {
            assert!(m.contains("changed size during iteration"), "{m}")
        }
        other => panic!("expected the change to be reported, got {other:?}"),
    }
    assert!(it.next().is_none(), "an iterator ends after its error");

    // Several pages; replacing values is not a change of size, adding a key is.
    let n = 2500i64;
    d.update((0..n).map(|i| (i, i.to_string())))
        .expect("update");
    let mut it = d.iter().expect("iter");
    let first: Vec<(i64, String)> = it.by_ref().take(10).map(|p| p.expect("pair")).collect();
    assert_eq!(first[9], (9, "9".to_string()));
    d.set(&5000, "replaced".into()).expect("a new key");
    d.del(&5000).expect("and gone again");
    // Still inside the first page: handed out from it.
    let rest_of_page: Vec<_> = it.by_ref().take(990).collect();
    assert!(rest_of_page.iter().all(|p| p.is_ok()));
    match it.next() {
        Some(Err(Error::InvalidState(m))) => assert!(m.contains("changed size")),
        other => panic!("expected the change at the next page, got {other:?}"),
    }
    let mut it = d.iter().expect("iter");
    let _ = it.by_ref().take(1500).count();
    d.set(&0, "replaced".into()).expect("replace a value");
    let all: Vec<(i64, String)> = d
        .iter()
        .expect("iter")
        .map(|p| p.expect("a replaced value is no change of size"))
        .collect();
    assert_eq!(all.len(), n as usize);
    assert_eq!(it.count(), 1000, "the rest of the first iteration");
    manager.shutdown().expect("shutdown");
}

/// The rest of `it`: the pairs it still yields, then the error that ended it, if any.
fn drain<I: Iterator<Item = Result<(i64, String)>>>(it: I) -> (Vec<i64>, Option<Error>) {
    let mut keys = Vec::new();
    for pair in it {
        match pair {
            Ok((k, _)) => keys.push(k),
            Err(e) => return (keys, Some(e)),
        }
    }
    (keys, None)
}

fn is_changed_size(e: &Option<Error>) -> bool {
    matches!(e, Some(Error::InvalidState(m)) if m.contains("dictionary changed size during iteration"))
}

#[test]
fn small_dict_iteration_reports_a_change_after_its_only_page() {
    // A dict of one page is fetched whole by the first `next`; a key added or removed after it
    // is still reported before the iterator ends, as CPython's `RuntimeError`.
    let _rt = runtime();
    let manager = Manager::new().expect("manager");
    let d = manager.dict::<i64, String>().expect("dict");
    d.update((0..5).map(|i| (i, i.to_string()))).expect("fill");

    // Unchanged: all five, then the end, for good.
    let mut it = d.iter().expect("iter");
    let (keys, error) = drain(it.by_ref());
    assert_eq!(keys, vec![0, 1, 2, 3, 4]);
    assert!(error.is_none(), "{error:?}");
    assert!(it.next().is_none(), "an exhausted iterator stays exhausted");

    // A key inserted mid-iteration.
    let mut it = d.iter().expect("iter");
    assert_eq!(it.next().expect("a pair").expect("first").0, 0);
    d.set(&99, "new".into()).expect("insert");
    let (keys, error) = drain(it.by_ref());
    assert_eq!(keys, vec![1, 2, 3, 4], "the rest of the page read before");
    assert!(is_changed_size(&error), "{error:?}");
    assert!(it.next().is_none(), "an iterator ends after its error");

    // A key deleted mid-iteration (the dict holds 0..=4 and 99 now).
    let mut it = d.iter().expect("iter");
    assert!(it.next().expect("a pair").is_ok());
    d.del(&99).expect("delete");
    let (keys, error) = drain(it);
    assert_eq!(
        keys,
        vec![1, 2, 3, 4, 99],
        "the rest of the page read before"
    );
    assert!(is_changed_size(&error), "{error:?}");

    // Deleted after the last pair was handed out, before the iterator was asked for more:
    // CPython raises there too.
    let mut it = d.iter().expect("iter");
    assert_eq!(it.by_ref().take(5).filter(|p| p.is_ok()).count(), 5);
    d.del(&4).expect("delete");
    let (keys, error) = drain(it);
    assert!(keys.is_empty());
    assert!(is_changed_size(&error), "{error:?}");

    // Replacing a value is no change of size.
    let mut it = d.iter().expect("iter");
    assert!(it.next().expect("a pair").is_ok());
    d.set(&3, "replaced".into()).expect("replace");
    let (keys, error) = drain(it);
    assert_eq!(keys, vec![1, 2, 3]);
    assert!(error.is_none(), "{error:?}");
    manager.shutdown().expect("shutdown");
}

#[shoal::remote]
fn churn_dict(d: DictProxy<i64, i64>, started: Event, stop: Event) {
    let mut k = 1_000_000i64;
    while !stop.is_set().expect("is_set") {
        d.set(&k, k * 2).expect("set");
        d.del(&k).expect("del");
        started.set().expect("set");
        k += 1;
    }
}

#[test]
fn iteration_under_concurrent_change_never_yields_garbage() {
    let _rt = runtime();
    let manager = Manager::new().expect("manager");
    let d = manager.dict::<i64, i64>().expect("dict");
    d.update((0..3000).map(|i| (i, i * 2))).expect("fill");
    let (started, stop) = (Event::new().expect("event"), Event::new().expect("event"));
    let child = Process::new(churn_dict, (d.clone(), started.clone(), stop.clone()));
    child.start().expect("start");
    assert!(
        started
            .wait(Some(Duration::from_secs(30)))
            .expect("the child writes")
    );
    let (mut completed, mut interrupted) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let mut seen = HashSet::new();
        let mut error = false;
        for pair in d.iter().expect("iter") {
            match pair {
                Ok((k, v)) => {
                    assert_eq!(v, k * 2, "a pair from one consistent state");
                    assert!(seen.insert(k), "key {k} yielded twice");
                }
                Err(Error::InvalidState(m)) => {
                    assert!(m.contains("changed size during iteration"), "{m}");
                    error = true;
                }
                Err(e) => panic!("{e}"),
            }
        }
        if error {
            interrupted += 1;
        } else {
            // A complete iteration saw every original key.
            assert!((0..3000).all(|k| seen.contains(&k)));
            completed += 1;
        }
    }
    stop.set().expect("stop");
    child.join(None).expect("join");
    assert_eq!(child.exitcode(), Some(0));
    assert!(
        interrupted > 0,
        "the child's writes interrupted no iteration ({completed} completed)"
    );
    manager.shutdown().expect("shutdown");
}

// ------------------------------------------------------------------------------------ list --

#[test]
fn list_has_python_semantics() {
    let _rt = runtime();
    let manager = Manager::new().expect("manager");
    // test_list
    let a = manager.list_from(0..10i64).expect("list");
    assert_eq!(
        a.get_range(None, None).expect("a[:]"),
        (0..10).collect::<Vec<_>>()
    );
    let b = manager.list::<i64>().expect("list");
    assert_eq!(b.to_vec().expect("b[:]"), Vec::<i64>::new());
    b.extend(0..5).expect("extend");
    assert_eq!(b.to_vec().expect("b[:]"), vec![0, 1, 2, 3, 4]);
    assert_eq!(b.get(2).expect("b[2]"), 2);
    assert_eq!(b.get_range(2, 10).expect("b[2:10]"), vec![2, 3, 4]);
    assert_eq!(b.get_range(-2, None).expect("b[-2:]"), vec![3, 4]);
    assert_eq!(b.get_range(None, -3).expect("b[:-3]"), vec![0, 1]);
    assert_eq!(b.get_range(1, -1).expect("b[1:-1]"), vec![1, 2, 3]);
    assert_eq!(b.get_range(4, 2).expect("b[4:2]"), Vec::<i64>::new());
    assert_eq!(
        b.get_range(-100, 100).expect("clamped"),
        vec![0, 1, 2, 3, 4]
    );
    b.extend(b.to_vec().expect("b[:]")).expect("b *= 2");
    assert_eq!(
        b.to_vec().expect("b[:]"),
        vec![0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    );
    assert_eq!(a.to_vec().expect("a"), (0..10).collect::<Vec<_>>());

    // Indexes: negative from the end; outside is IndexError.
    assert_eq!(b.get(-1).expect("b[-1]"), 4);
    assert_eq!(b.get(-10).expect("b[-10]"), 0);
    assert!(matches!(b.get(10), Err(Error::IndexError(m)) if m.contains("out of range")));
    assert!(matches!(b.get(-11), Err(Error::IndexError(_))));
    b.set(-1, 40).expect("b[-1] = 40");
    assert_eq!(b.get(9).expect("b[9]"), 40);
    assert!(matches!(b.set(10, 0), Err(Error::IndexError(m)) if m.contains("assignment")));
    b.del(0).expect("del b[0]");
    b.del(-1).expect("del b[-1]");
    b.del(3).expect("del b[3]");
    assert_eq!(b.to_vec().expect("b"), vec![1, 2, 3, 0, 1, 2, 3]);
    assert!(matches!(b.del(7), Err(Error::IndexError(_))));

    // insert clamps as Python's.
    let c = manager.list_from(vec![1i64, 2, 3]).expect("list");
    c.insert(1, 10).expect("insert");
    c.insert(-1, 20).expect("insert before the last");
    c.insert(100, 30).expect("insert past the end appends");
    c.insert(-100, 40)
        .expect("insert before the start prepends");
    assert_eq!(c.to_vec().expect("c"), vec![40, 1, 10, 2, 20, 3, 30]);
    let empty = manager.list::<i64>().expect("list");
    empty.insert(5, 1).expect("insert into an empty list");
    assert_eq!(empty.to_vec().expect("list"), vec![1]);

    // pop.
    assert_eq!(c.pop().expect("pop"), 30);
    assert_eq!(c.pop_at(0).expect("pop(0)"), 40);
    assert_eq!(c.pop_at(-2).expect("pop(-2)"), 20);
    assert_eq!(c.pop_at(1).expect("pop(1)"), 10);
    assert_eq!(c.to_vec().expect("c"), vec![1, 2, 3]);
    assert!(matches!(c.pop_at(3), Err(Error::IndexError(m)) if m == "pop index out of range"));
    let e = manager.list::<i64>().expect("list");
    assert!(matches!(e.pop(), Err(Error::IndexError(m)) if m == "pop from empty list"));
    assert!(matches!(e.pop_at(0), Err(Error::IndexError(m)) if m == "pop from empty list"));

    // remove, index, count, contains: by value; absent is ValueError (InvalidState).
    let d = manager
        .list_from(["a", "b", "a", "c"].map(String::from))
        .expect("list");
    assert_eq!(d.index("a").expect("index"), 0);
    assert_eq!(d.index("c").expect("index"), 3);
    assert_eq!(d.count("a").expect("count"), 2);
    assert_eq!(d.count("z").expect("count"), 0);
    assert!(d.contains("b").expect("contains"));
    assert!(matches!(d.index("z"), Err(Error::InvalidState(m)) if m.contains("not in list")));
    d.remove("a").expect("remove the first a");
    assert_eq!(d.to_vec().expect("d"), vec!["b", "a", "c"]);
    assert!(matches!(d.remove("z"), Err(Error::InvalidState(m)) if m.contains("not in list")));
    assert_eq!(d.len().expect("len"), 3);

    // reverse and sort, atomically.
    d.reverse().expect("reverse");
    assert_eq!(d.to_vec().expect("d"), vec!["c", "a", "b"]);
    d.sort().expect("sort");
    assert_eq!(d.to_vec().expect("d"), vec!["a", "b", "c"]);
    let f = manager
        .list_from([(2, "x"), (1, "y"), (2, "a"), (1, "b")].map(|(n, s)| (n, s.to_string())))
        .expect("list");
    f.sort_by(|a, b| b.0.cmp(&a.0))
        .expect("sort, reversed, stable");
    assert_eq!(
        f.to_vec().expect("f"),
        [(2, "x"), (2, "a"), (1, "y"), (1, "b")].map(|(n, s)| (n, s.to_string()))
    );
    d.clear().expect("clear");
    assert!(d.is_empty().expect("empty"));

    // A value fetched is a copy.
    let nested = manager.list_from(vec![vec![1i64]]).expect("list");
    let mut item = nested.get(0).expect("get");
    item.push(2);
    assert_eq!(nested.get(0).expect("get"), vec![1]);

    // Long lists: removing and inserting in the middle keeps the others in order.
    let long = manager.list_from(0..3000i64).expect("list");
    long.del(1000).expect("del near the start");
    long.del(2000).expect("del near the end");
    long.insert(500, -1).expect("insert near the start");
    long.insert(2500, -2).expect("insert near the end");
    let mut expected: Vec<i64> = (0..3000).filter(|&x| x != 1000 && x != 2001).collect();
    expected.insert(500, -1);
    expected.insert(2500, -2);
    assert_eq!(long.to_vec().expect("long"), expected);
    long.reverse().expect("reverse");
    expected.reverse();
    assert_eq!(long.to_vec().expect("long"), expected);
    long.sort().expect("sort");
    expected.sort();
    assert_eq!(long.to_vec().expect("long"), expected);
    manager.shutdown().expect("shutdown");
}

#[test]
fn list_iteration_detects_changes() {
    let _rt = runtime();
    let manager = Manager::new().expect("manager");
    // test_list_iter
    let a = manager.list_from(0..10i64).expect("list");
    let mut it = a.iter().expect("iter");
    assert_eq!(
        it.by_ref().collect::<Result<Vec<_>>>().expect("items"),
        (0..10).collect::<Vec<_>>()
    );
    assert!(it.next().is_none(), "exhausted");
    let mut it = a.iter().expect("iter");
    a.set(0, 100).expect("a[0] = 100");
    assert_eq!(it.next().expect("item").expect("no change of size"), 100);
    let mut it = a.iter().expect("iter");
    a.append(10).expect("append");
    assert!(matches!(
        it.next(),
        Some(Err(Error::InvalidState(m))) if m.contains("list changed size during iteration")
    ));
    assert!(it.next().is_none());
    // A list of one page is read whole by the first `next`: a change after that is not
    // reported, as CPython's list iterator never reports one; the iterator ends with what it
    // read (a dict's reports it: `small_dict_iteration_reports_a_change_after_its_only_page`).
    let mut it = a.iter().expect("iter");
    assert_eq!(it.next().expect("item").expect("first"), 100);
    a.append(11).expect("append");
    assert_eq!(
        it.collect::<Result<Vec<_>>>().expect("no error"),
        (1..=10).collect::<Vec<_>>()
    );

    // Pages.
    let long = manager.list_from(0..2500i64).expect("list");
    let all: Vec<i64> = long
        .iter()
        .expect("iter")
        .collect::<Result<_>>()
        .expect("items");
    assert_eq!(all, (0..2500).collect::<Vec<_>>());
    let mut it = long.iter().expect("iter");
    assert_eq!(it.by_ref().take(1000).count(), 1000);
    long.pop_at(0).expect("pop");
    assert!(matches!(it.next(), Some(Err(Error::InvalidState(_)))));
    manager.shutdown().expect("shutdown");
}

// ------------------------------------------------------------------------------- namespace --

#[test]
fn namespace_has_python_semantics() {
    let _rt = runtime();
    let manager = Manager::new().expect("manager");
    // test_namespace
    let n = manager.namespace().expect("namespace");
    n.set("name", "Bob").expect("n.name = 'Bob'");
    n.set("job", "Builder").expect("n.job = 'Builder'");
    n.set("age", 42).expect("an attribute of another type");
    assert_eq!(
        (
            n.get::<String>("name").expect("name"),
            n.get::<String>("job").expect("job")
        ),
        ("Bob".to_string(), "Builder".to_string())
    );
    n.del("job").expect("del n.job");
    assert!(n.contains("name").expect("hasattr"));
    assert!(!n.contains("job").expect("hasattr"));
    match n.get::<String>("job") {
        Err(Error::KeyError(m)) => {
            assert_eq!(m, "'Namespace' object has no attribute 'job'")
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(n.del("job"), Err(Error::KeyError(m)) if m.contains("'job'")));
    assert_eq!(n.try_get::<String>("job").expect("try_get"), None);
    assert_eq!(n.names().expect("names"), vec!["age", "name"]);
    assert!(matches!(n.get::<String>("age"), Err(Error::Codec { .. })));
    n.del("age").expect("del");
    let map: BTreeMap<String, String> = n.to_map().expect("to_map");
    assert_eq!(
        map,
        BTreeMap::from([("name".to_string(), "Bob".to_string())])
    );
    manager.shutdown().expect("shutdown");
}

// --------------------------------------------------------------------------------- nesting --

#[test]
fn dict_proxy_nested() {
    let _rt = runtime();
    let manager = Manager::new().expect("manager");
    // test_dict_proxy_nested
    let pets = manager
        .dict_from(vec![
            ("ferrets".to_string(), 2i64),
            ("hamsters".to_string(), 4),
        ])
        .expect("pets");
    let supplies = manager
        .dict_from(vec![("water".to_string(), 10i64), ("feed".to_string(), 3)])
        .expect("supplies");
    let d = manager
        .dict_from(vec![
            ("pets".to_string(), pets.clone()),
            ("supplies".to_string(), supplies.clone()),
        ])
        .expect("d");
    assert_eq!(supplies.getitem("water").expect("water"), 10);
    assert_eq!(
        d.getitem("supplies")
            .expect("d")
            .getitem("water")
            .expect("water"),
        10
    );
    d.getitem("supplies")
        .expect("d")
        .set("blankets", 5)
        .expect("set through d");
    assert_eq!(supplies.getitem("blankets").expect("blankets"), 5);
    assert_eq!(
        d.getitem("supplies")
            .expect("d")
            .getitem("blankets")
            .expect("b"),
        5
    );
    d.getitem("supplies")
        .expect("d")
        .set("water", 7)
        .expect("set");
    assert_eq!(supplies.getitem("water").expect("water"), 7);
    drop(pets);
    drop(supplies);
    assert_eq!(
        d.getitem("pets").expect("d").getitem("ferrets").expect("f"),
        2
    );
    d.getitem("supplies")
        .expect("d")
        .set("blankets", 11)
        .expect("set");
    assert_eq!(
        d.getitem("supplies")
            .expect("d")
            .getitem("blankets")
            .expect("b"),
        11
    );
    let pets = d.getitem("pets").expect("pets");
    let supplies = d.getitem("supplies").expect("supplies");
    supplies.set("water", 7).expect("set");
    assert_eq!(
        d.getitem("supplies")
            .expect("d")
            .getitem("water")
            .expect("w"),
        7
    );
    d.clear().expect("clear");
    assert_eq!(d.len().expect("len"), 0);
    assert_eq!(supplies.getitem("water").expect("still there"), 7);
    assert_eq!(pets.getitem("hamsters").expect("still there"), 4);

    let l = manager
        .list_from(vec![pets.clone(), supplies.clone()])
        .expect("l");
    l.get(0).expect("l[0]").set("marmots", 1).expect("set");
    assert_eq!(pets.getitem("marmots").expect("marmots"), 1);
    assert_eq!(l.get(0).expect("l[0]").getitem("marmots").expect("m"), 1);
    drop(pets);
    drop(supplies);
    assert_eq!(l.get(0).expect("l[0]").getitem("marmots").expect("m"), 1);

    // outer = [[88, 99], l]: a plain list beside a proxy.
    #[derive(Debug, Serialize, Deserialize)]
    enum Item {
        Plain(Vec<i64>),
        Shared(ListProxy<DictProxy<String, i64>>),
    }
    let outer = manager
        .list_from(vec![Item::Plain(vec![88, 99]), Item::Shared(l.clone())])
        .expect("outer");
    assert!(matches!(outer.get(0).expect("outer[0]"), Item::Plain(v) if v == vec![88, 99]));
    let Item::Shared(inner) = outer.get(-1).expect("outer[-1]") else {
        panic!("a proxy decodes as a proxy");
    };
    assert_eq!(
        inner.get(-1).expect("[-1]").getitem("feed").expect("feed"),
        3
    );

    // A proxy read back as another kind is a codec error, not a handle to the wrong keys.
    let typed = manager
        .dict::<String, DictProxy<String, i64>>()
        .expect("dict");
    typed.set("x", inner.get(0).expect("pets")).expect("set");
    let wrong: DictProxy<String, ListProxy<i64>> =
        serde_json::from_str(&serde_json::to_string(&typed).expect("json")).expect("same dict");
    match wrong.getitem("x") {
        Err(Error::Codec { reason, .. }) => {
            assert!(
                reason.contains("expected a list proxy, found a dict proxy"),
                "{reason}"
            )
        }
        other => panic!("{other:?}"),
    }
    manager.shutdown().expect("shutdown");
}

#[derive(Debug, Serialize, Deserialize)]
enum Node {
    Leaf(i64),
    List(ListProxy<Node>),
}

#[test]
fn list_proxy_in_list() {
    let _rt = runtime();
    let manager = Manager::new().expect("manager");
    // test_list_proxy_in_list
    let inners: Vec<ListProxy<i64>> = (0..3)
        .map(|_| manager.list_from(0..3i64).expect("inner"))
        .collect();
    let a = manager.list_from(inners).expect("a");
    let contents: Vec<Vec<i64>> = a
        .to_vec()
        .expect("a")
        .iter()
        .map(|inner| inner.to_vec().expect("inner"))
        .collect();
    assert_eq!(contents, vec![vec![0, 1, 2]; 3]);
    a.get(0).expect("a[0]").set(-1, 55).expect("a[0][-1] = 55");
    assert_eq!(
        a.get(0).expect("a[0]").to_vec().expect("a[0]"),
        vec![0, 1, 55]
    );
    for i in 1..3 {
        assert_eq!(
            a.get(i).expect("a[i]").to_vec().expect("a[i]"),
            vec![0, 1, 2]
        );
    }
    assert_eq!(a.get(1).expect("a[1]").pop().expect("pop"), 2);
    assert_eq!(a.get(1).expect("a[1]").len().expect("len"), 2);
    for i in [0, 2] {
        assert_eq!(a.get(i).expect("a[i]").len().expect("len"), 3);
    }
    // b.append(b): a list that holds itself.
    let b = manager.list::<Node>().expect("b");
    b.append(Node::List(b.clone())).expect("b.append(b)");
    b.append(Node::Leaf(1)).expect("append");
    let Node::List(same) = b.get(0).expect("b[0]") else {
        panic!("a proxy");
    };
    assert_eq!(same, b);
    assert_eq!(same.len().expect("len"), 2);
    manager.shutdown().expect("shutdown");
}

#[shoal::remote]
fn set_nested(d: DictProxy<String, DictProxy<String, i64>>, outer: String, inner: String, v: i64) {
    // The seed's f(d, key1, key2, value): d[key1][key2] = value + 1
    d.getitem(outer.as_str())
        .expect("d[key1]")
        .set(inner.as_str(), v + 1)
        .expect("d[key1][key2] = value + 1");
}

#[test]
fn nested_proxies_cross_processes() {
    let _rt = runtime();
    let manager = Manager::new().expect("manager");
    let d = manager.dict::<String, DictProxy<String, i64>>().expect("d");
    d.set("dict1", manager.dict().expect("dict1")).expect("set");
    d.set("dict2", manager.dict().expect("dict2")).expect("set");
    let args = [
        ("dict1", "key1", 11),
        ("dict1", "key2", 12),
        ("dict2", "key1", 21),
        ("dict2", "key2", 22),
    ];
    let children: Vec<Process> = args
        .iter()
        .map(|(a, b, v)| Process::new(set_nested, (d.clone(), a.to_string(), b.to_string(), *v)))
        .collect();
    for p in &children {
        p.start().expect("start");
    }
    for p in &children {
        p.join(None).expect("join");
        assert_eq!(p.exitcode(), Some(0));
    }
    let dict1: BTreeMap<String, i64> = d.getitem("dict1").expect("dict1").copy().expect("copy");
    let dict2: BTreeMap<String, i64> = d.getitem("dict2").expect("dict2").copy().expect("copy");
    assert_eq!(
        dict1,
        BTreeMap::from([("key1".into(), 12), ("key2".into(), 13)])
    );
    assert_eq!(
        dict2,
        BTreeMap::from([("key1".into(), 22), ("key2".into(), 23)])
    );
    manager.shutdown().expect("shutdown");
}

// ------------------------------------------------------------------------------ concurrency --

#[shoal::remote]
fn fill(d: DictProxy<String, i64>, l: ListProxy<i64>, worker: i64, n: i64) {
    for i in 0..n {
        d.set(&format!("{worker}:{i}"), i).expect("set");
        l.append(worker * 1000 + i).expect("append");
        // A shared key every worker writes: setdefault never loses the first write.
        d.setdefault("first", worker).expect("setdefault");
    }
}

#[test]
fn concurrent_writers_lose_nothing() {
    let _rt = runtime();
    let manager = Manager::new().expect("manager");
    let d = manager.dict::<String, i64>().expect("dict");
    let l = manager.list::<i64>().expect("list");
    let (workers, n) = (4i64, 200i64);
    let children: Vec<Process> = (0..workers)
        .map(|w| Process::new(fill, (d.clone(), l.clone(), w, n)))
        .collect();
    for p in &children {
        p.start().expect("start");
    }
    for p in &children {
        p.join(None).expect("join");
        assert_eq!(p.exitcode(), Some(0));
    }
    assert_eq!(d.len().expect("len"), (workers * n + 1) as usize);
    for w in 0..workers {
        for i in 0..n {
            assert_eq!(
                d.getitem(format!("{w}:{i}").as_str()).expect("every write"),
                i
            );
        }
    }
    assert!((0..workers).contains(&d.getitem("first").expect("first")));
    let mut items = l.to_vec().expect("items");
    assert_eq!(items.len(), (workers * n) as usize);
    // Each worker's appends keep its order.
    for w in 0..workers {
        let mine: Vec<i64> = items.iter().copied().filter(|x| x / 1000 == w).collect();
        assert_eq!(mine, (0..n).map(|i| w * 1000 + i).collect::<Vec<_>>());
    }
    items.sort();
    items.dedup();
    assert_eq!(items.len(), (workers * n) as usize, "no item twice");
    manager.shutdown().expect("shutdown");
}

#[shoal::remote]
fn sort_while_appending(l: ListProxy<i64>, n: i64) {
    for i in 0..n {
        l.append(-i).expect("append");
    }
}

#[test]
fn sort_is_atomic_under_concurrent_writes() {
    let _rt = runtime();
    let manager = Manager::new().expect("manager");
    let l = manager.list_from((0..500i64).rev()).expect("list");
    let child = Process::new(sort_while_appending, (l.clone(), 300i64));
    child.start().expect("start");
    for _ in 0..20 {
        l.sort().expect("sort");
    }
    child.join(None).expect("join");
    assert_eq!(child.exitcode(), Some(0));
    let items = l.to_vec().expect("items");
    assert_eq!(items.len(), 800, "no append was lost by a sort");
    let mut expected: Vec<i64> = (0..500).chain((0..300).map(|i| -i)).collect();
    let mut sorted = items.clone();
    sorted.sort();
    expected.sort();
    assert_eq!(sorted, expected);
    manager.shutdown().expect("shutdown");
}

#[shoal::remote]
fn square_into(d: DictProxy<i64, i64>, x: i64) -> i64 {
    d.set(&x, x * x).expect("set");
    x
}

#[test]
fn proxy_passed_to_pool_tasks() {
    let _rt = runtime();
    let manager = Manager::new().expect("manager");
    let d = manager.dict::<i64, i64>().expect("dict");
    let pool = Pool::new(2).expect("pool");
    let out = pool
        .starmap(
            square_into,
            (0..20i64).map(|x| (d.clone(), x)).collect::<Vec<_>>(),
        )
        .expect("starmap");
    assert_eq!(out, (0..20).collect::<Vec<_>>());
    let squares: BTreeMap<i64, i64> = d.copy().expect("copy");
    assert_eq!(squares, (0..20).map(|x| (x, x * x)).collect());
    drop(pool);
    manager.shutdown().expect("shutdown");
}

#[shoal::remote]
fn make_manager_in_task(x: i64) -> ManagerAddress {
    let manager = Manager::new().expect("manager");
    manager
        .dict::<i64, i64>()
        .expect("dict")
        .set(&x, x)
        .expect("set");
    manager.address()
}

#[test]
fn thread_pool_tasks_leave_the_drivers_managers_running() {
    let _rt = runtime();
    let manager = Manager::new().expect("manager");
    let d = manager.dict::<i64, i64>().expect("dict");
    // Pool workers that are threads of this process run the end-of-task hooks here.
    let pool = Pool::builder()
        .processes(2)
        .start_method(StartMethod::Thread)
        .build()
        .expect("pool");
    pool.starmap(
        square_into,
        (0..10i64).map(|x| (d.clone(), x)).collect::<Vec<_>>(),
    )
    .expect("starmap");
    // A manager made by a task is shut down when the task ends, as in a worker process.
    let made = pool.map(make_manager_in_task, vec![1i64]).expect("map");
    drop(pool);
    assert_eq!(d.len().expect("the driver's manager still runs"), 10);
    manager.dict::<i64, i64>().expect("and makes containers");
    assert!(matches!(
        Manager::connect(made[0].clone(), shoal::current_process().authkey),
        Err(Error::InvalidState(_))
    ));
    manager.shutdown().expect("shutdown");
}

/// The manager and the dict a pool worker's initializer made (Python's initializer storing a
/// `Manager()` in a global): they live in the worker process.
static KEPT: std::sync::OnceLock<(Manager, DictProxy<i64, i64>)> = std::sync::OnceLock::new();

#[shoal::remote]
fn init_keep_manager() {
    let manager = Manager::new().expect("manager");
    let d = manager.dict::<i64, i64>().expect("dict");
    assert!(KEPT.set((manager, d)).is_ok(), "the initializer runs once");
}

/// Writes `x` into the initializer's dict; returns the dict and what it holds.
#[shoal::remote]
fn write_into_kept(x: i64) -> (ManagerAddress, DictProxy<i64, i64>, BTreeMap<i64, i64>) {
    let (manager, d) = KEPT.get().expect("the initializer ran");
    d.set(&x, x * 10)
        .expect("the initializer's manager still runs");
    (manager.address(), d.clone(), d.copy().expect("copy"))
}

#[test]
fn a_manager_made_by_the_initializer_lives_as_long_as_the_worker() {
    let _rt = runtime();
    let pool = Pool::builder()
        .processes(1)
        .initializer(init_keep_manager, ())
        .build()
        .expect("pool");
    // Two calls: two batches of tasks in the one worker, with the exit hooks run after each.
    let (_, _, first) = pool.apply(write_into_kept, (1i64,)).expect("first task");
    assert_eq!(first, BTreeMap::from([(1, 10)]));
    let (address, d, second) = pool
        .apply(write_into_kept, (2i64,))
        .expect("the second task finds the initializer's manager running");
    assert_eq!(second, BTreeMap::from([(1, 10), (2, 20)]));
    // The driver reaches it too, by address and through the proxy.
    Manager::connect(address.clone(), shoal::current_process().authkey)
        .expect("connect to the worker's manager");
    let held: BTreeMap<i64, i64> = d.copy().expect("copy");
    assert_eq!(held, BTreeMap::from([(1, 10), (2, 20)]));
    // A manager a task makes is still shut down at the end of its batch.
    let made = pool.apply(make_manager_in_task, (3i64,)).expect("apply");
    assert!(matches!(
        Manager::connect(made, shoal::current_process().authkey),
        Err(Error::InvalidState(_))
    ));
    // The worker process exits: its manager is shut down with it.
    pool.close().expect("close");
    pool.join().expect("join");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Manager::connect(address.clone(), shoal::current_process().authkey) {
            Err(Error::InvalidState(_)) => break,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "the manager outlived its worker: {other:?}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// As [`KEPT`], for the workers of a pool whose workers are threads.
static KEPT_BY_THREAD: std::sync::OnceLock<(Manager, DictProxy<i64, i64>)> =
    std::sync::OnceLock::new();

#[shoal::remote]
fn init_keep_manager_in_thread() {
    let manager = Manager::new().expect("manager");
    let d = manager.dict::<i64, i64>().expect("dict");
    assert!(KEPT_BY_THREAD.set((manager, d)).is_ok(), "one worker");
}

#[shoal::remote]
fn write_into_kept_by_thread(x: i64) -> BTreeMap<i64, i64> {
    let (_, d) = KEPT_BY_THREAD.get().expect("the initializer ran");
    d.set(&x, x * 10)
        .expect("the initializer's manager still runs");
    d.copy().expect("copy")
}

#[test]
fn a_thread_workers_initializer_manager_lives_as_long_as_the_worker() {
    let _rt = runtime();
    let pool = Pool::builder()
        .processes(1)
        .start_method(StartMethod::Thread)
        .initializer(init_keep_manager_in_thread, ())
        .build()
        .expect("pool");
    for x in 1..=3i64 {
        let seen = pool.apply(write_into_kept_by_thread, (x,)).expect("apply");
        assert_eq!(seen, (1..=x).map(|k| (k, k * 10)).collect());
    }
    let address = KEPT_BY_THREAD.get().expect("initialized").0.address();
    // The worker thread ends: its manager is shut down with it.
    pool.close().expect("close");
    pool.join().expect("join");
    assert!(matches!(
        Manager::connect(address, shoal::current_process().authkey),
        Err(Error::InvalidState(_))
    ));
}

// ------------------------------------------------------------------------- authentication --

/// Connects with this process's (inherited) authkey, makes a list in the manager and stores it
/// in `results` (test_remote: a client that connected puts, the creator reads).
#[shoal::remote]
fn connect_and_report(address: ManagerAddress, results: DictProxy<String, ListProxy<String>>) {
    let manager =
        Manager::connect(address, shoal::current_process().authkey).expect("the right authkey");
    let l = manager
        .list::<String>()
        .expect("list in the connected manager");
    l.extend(vec!["hello world".to_string(), "2.25".to_string()])
        .expect("extend");
    results.set("from child", l).expect("set");
    assert!(matches!(manager.shutdown(), Err(Error::InvalidState(_))));
}

#[shoal::remote]
fn connect_with_wrong_key(address: ManagerAddress) -> String {
    match Manager::connect(address, AuthKey::from_bytes(b"not the key".to_vec())) {
        Ok(_) => "connected".into(),
        Err(Error::Authentication(m)) => format!("authentication: {m}"),
        Err(e) => format!("other: {e}"),
    }
}

#[test]
fn connect_checks_the_authkey() {
    let rt = runtime();
    let manager = Manager::new().expect("manager");
    let results = manager.dict::<String, ListProxy<String>>().expect("dict");
    let child = Process::new(connect_and_report, (manager.address(), results.clone()));
    child.start().expect("start");
    child.join(None).expect("join");
    assert_eq!(child.exitcode(), Some(0));
    let l = results.getitem("from child").expect("the child's list");
    assert_eq!(l.to_vec().expect("items"), vec!["hello world", "2.25"]);

    let mut conn = raw_redis(&rt);
    let before = manager_keys(&mut conn, &manager.address());
    let meta = format!("shoal:{{default:manager:{}}}:meta", manager.address().id());
    let meta_before: Vec<(String, Vec<u8>)> = redis::cmd("HGETALL")
        .arg(&meta)
        .query(&mut conn)
        .expect("meta");
    let pool = Pool::new(1).expect("pool");
    let outcome = pool
        .apply(connect_with_wrong_key, (manager.address(),))
        .expect("apply");
    assert!(
        outcome.starts_with("authentication:") && outcome.contains("digest received was wrong"),
        "{outcome}"
    );
    drop(pool);
    // Here too, and nothing was touched.
    let wrong = Manager::connect(manager.address(), AuthKey::from_bytes(b"x".to_vec()));
    assert!(matches!(wrong, Err(Error::Authentication(_))));
    assert_eq!(manager_keys(&mut conn, &manager.address()), before);
    let meta_after: Vec<(String, Vec<u8>)> = redis::cmd("HGETALL")
        .arg(&meta)
        .query(&mut conn)
        .expect("meta");
    assert_eq!(meta_after, meta_before);

    // A manager made with a given authkey: the process's own key does not connect.
    let key = AuthKey::from_bytes(b"a shared secret".to_vec());
    let other = Manager::with_authkey(key.clone()).expect("manager");
    assert!(matches!(
        Manager::connect(other.address(), shoal::current_process().authkey),
        Err(Error::Authentication(_))
    ));
    let connected = Manager::connect(other.address(), key).expect("the given key");
    let n = connected.namespace().expect("namespace");
    n.set("x", 1).expect("set");
    // The address is a serde value.
    let text = serde_json::to_string(&other.address()).expect("json");
    let parsed: ManagerAddress = serde_json::from_str(&text).expect("address");
    assert_eq!(parsed, other.address());
    other.shutdown().expect("shutdown");
    assert!(
        n.get::<i64>("x").is_err(),
        "the owner's shutdown removed it"
    );
    manager.shutdown().expect("shutdown");
}

// ------------------------------------------------------------------------------- lifetime --

#[test]
fn shutdown_deletes_everything_and_proxies_say_so() {
    let rt = runtime();
    let mut conn = raw_redis(&rt);
    let manager = Manager::new().expect("manager");
    let d = manager.dict::<String, i64>().expect("dict");
    d.set("a", 1).expect("set");
    let l = manager.list_from(0..3i64).expect("list");
    let n = manager.namespace().expect("namespace");
    n.set("x", 1).expect("set");
    let connected =
        Manager::connect(manager.address(), shoal::current_process().authkey).expect("connect");
    let theirs = connected
        .dict::<i64, i64>()
        .expect("a dict made by a connected manager");
    theirs.set(&1, 1).expect("set");
    assert!(!manager_keys(&mut conn, &manager.address()).is_empty());

    manager.shutdown().expect("shutdown");
    assert_eq!(
        manager_keys(&mut conn, &manager.address()),
        Vec::<String>::new()
    );
    for e in [
        d.get("a").expect_err("dict"),
        l.get(0).expect_err("list"),
        n.get::<i64>("x").expect_err("namespace"),
        theirs.get(&1).expect_err("a connected manager's dict"),
    ] {
        assert!(
            matches!(&e, Error::InvalidState(m) if m.contains("no longer exists") && m.contains("shut down")),
            "{e}"
        );
    }
    assert!(
        matches!(manager.dict::<i64, i64>(), Err(Error::InvalidState(m)) if m.contains("shut down"))
    );
    assert!(matches!(
        connected.list::<i64>(),
        Err(Error::InvalidState(_))
    ));
    assert!(matches!(
        connected.queue::<i64>(),
        Err(Error::InvalidState(_))
    ));
    assert!(matches!(manager.lock(), Err(Error::InvalidState(_))));
    manager
        .shutdown()
        .expect("shutting down twice does nothing");
    assert!(matches!(
        Manager::connect(manager.address(), shoal::current_process().authkey),
        Err(Error::InvalidState(m)) if m.contains("does not exist")
    ));
}

#[shoal::remote]
fn make_manager_and_leave(out: Queue<ManagerAddress>) {
    let manager = Manager::new().expect("manager");
    let d = manager.dict::<String, i64>().expect("dict");
    d.set("x", 1).expect("set");
    out.put(manager.address()).expect("put");
    // Dropped without shutdown: the worker's runtime shuts it down when the task ends.
}

#[test]
fn a_dropped_manager_shuts_down_with_its_creators_runtime() {
    let rt = runtime();
    let out: Queue<ManagerAddress> = Queue::new().expect("queue");
    let child = Process::new(make_manager_and_leave, (out.clone(),));
    child.start().expect("start");
    let address = out.get_timeout(Duration::from_secs(30)).expect("address");
    child.join(None).expect("join");
    assert_eq!(child.exitcode(), Some(0));
    let mut conn = raw_redis(&rt);
    assert_eq!(manager_keys(&mut conn, &address), Vec::<String>::new());
    assert!(matches!(
        Manager::connect(address, shoal::current_process().authkey),
        Err(Error::InvalidState(_))
    ));
    // Dropping a Manager value here does not shut it down.
    let manager = Manager::new().expect("manager");
    let d = manager.dict::<i64, i64>().expect("dict");
    let address = manager.address();
    drop(manager);
    d.set(&1, 1).expect("still running");
    let again = Manager::connect(address, shoal::current_process().authkey).expect("connect");
    again.namespace().expect("still running");
}

// ------------------------------------------------------------------------------ primitives --

#[shoal::remote]
fn use_primitives(q: Queue<i64>, lock: Lock, event: Event, value: shoal::Value<i64>) {
    let _guard = lock.lock().expect("lock");
    value.set(value.get().expect("get") + 1).expect("set");
    q.put(123).expect("put");
    event.set().expect("set");
}

#[test]
fn manager_makes_shared_primitives() {
    let _rt = runtime();
    let manager = Manager::new().expect("manager");
    // test_nested_queue: a queue inside a list and a dict.
    let a = manager.list::<Queue<i64>>().expect("list");
    a.append(manager.queue().expect("queue")).expect("append");
    a.get(0).expect("a[0]").put(123).expect("put");
    assert_eq!(a.get(0).expect("a[0]").get().expect("get"), 123);
    let b = manager.dict::<i64, Queue<i64>>().expect("dict");
    b.set(&0, manager.queue().expect("queue")).expect("set");
    b.getitem(&0).expect("b[0]").put(456).expect("put");
    assert_eq!(b.getitem(&0).expect("b[0]").get().expect("get"), 456);

    let q = manager.queue::<i64>().expect("queue");
    let lock = manager.lock().expect("lock");
    let event = manager.event().expect("event");
    let value = manager.value(41i64).expect("value");
    let child = Process::new(
        use_primitives,
        (q.clone(), lock, event.clone(), value.clone()),
    );
    child.start().expect("start");
    assert!(event.wait(Some(Duration::from_secs(30))).expect("wait"));
    assert_eq!(q.get_timeout(Duration::from_secs(10)).expect("get"), 123);
    child.join(None).expect("join");
    assert_eq!(value.get().expect("value"), 42);
    let array = manager.array(vec![1i32, 2, 3]).expect("array");
    assert_eq!(array.to_vec().expect("array"), vec![1, 2, 3]);
    let bounded = manager.queue_with_maxsize::<i64>(1).expect("queue");
    bounded.put(1).expect("put");
    assert!(matches!(bounded.put_nowait(2), Err(Error::Full)));
    let jq = manager.joinable_queue::<i64>().expect("joinable");
    jq.put(1).expect("put");
    jq.get().expect("get");
    jq.task_done().expect("task_done");
    jq.join().expect("join");
    assert!(
        manager
            .rlock()
            .expect("rlock")
            .try_acquire()
            .expect("acquire")
    );
    assert!(
        manager
            .semaphore(2)
            .expect("semaphore")
            .try_acquire()
            .expect("acquire")
    );
    assert!(
        manager
            .bounded_semaphore(1)
            .expect("bs")
            .try_acquire()
            .expect("acquire")
    );
    let cond = manager.condition().expect("condition");
    cond.acquire().expect("acquire");
    cond.notify_all().expect("notify");
    cond.release().expect("release");
    let barrier = manager.barrier(1).expect("barrier");
    barrier
        .wait(Some(Duration::from_secs(5)))
        .expect("a barrier of one");
    manager.shutdown().expect("shutdown");
}

// --------------------------------------------------------------------------------- garbage --

#[test]
fn garbage_in_manager_keys_is_a_clear_error() {
    let rt = runtime();
    let mut conn = raw_redis(&rt);
    let manager = Manager::new().expect("manager");
    let address = manager.address();
    let find = |conn: &mut redis::Connection, suffix: &str| -> String {
        manager_keys(conn, &address)
            .into_iter()
            .find(|k| k.ends_with(suffix))
            .expect("key")
    };
    let started = Instant::now();

    // A value that is not a payload: a codec error naming the type.
    let before = manager_keys(&mut conn, &address);
    let d = manager.dict::<String, i64>().expect("dict");
    d.set("a", 1).expect("set");
    let data = find(&mut conn, ":data");
    let encoded_key: Vec<u8> = {
        let fields: Vec<Vec<u8>> = redis::cmd("HKEYS")
            .arg(&data)
            .query(&mut conn)
            .expect("hkeys");
        fields
            .into_iter()
            .find(|f| f.first() == Some(&1))
            .expect("the key")
    };
    let _: () = redis::cmd("HSET")
        .arg(&data)
        .arg(&encoded_key)
        .arg(b"\x01\xc1garbage".as_slice())
        .query(&mut conn)
        .expect("hset");
    assert!(
        matches!(d.getitem("a"), Err(Error::Codec { expected, .. }) if expected.contains("i64"))
    );
    assert!(matches!(d.items(), Err(Error::Codec { .. })));
    // A version that is not a number.
    let _: () = redis::cmd("HSET")
        .arg(&data)
        .arg("\0v")
        .arg("x")
        .query(&mut conn)
        .expect("hset");
    for e in [
        d.get("a").expect_err("get"),
        d.set("b", 2).expect_err("set"),
    ] {
        assert!(
            matches!(&e, Error::InvalidState(m) if m.contains("did not write")),
            "{e}"
        );
    }
    // Keys of another type.
    let _: () = redis::cmd("SET")
        .arg(&data)
        .arg("garbage")
        .query(&mut conn)
        .expect("set");
    assert!(matches!(d.len(), Err(Error::InvalidState(m)) if m.contains("did not write")));
    let _: () = redis::cmd("DEL").arg(&data).query(&mut conn).expect("del");
    assert!(matches!(d.len(), Err(Error::InvalidState(m)) if m.contains("no longer exists")));
    let order = manager_keys(&mut conn, &address)
        .into_iter()
        .find(|k| k.ends_with(":order") && !before.contains(k))
        .expect("order");
    let d2 = manager.dict::<String, i64>().expect("dict");
    d2.set("a", 1).expect("set");
    let order2 = manager_keys(&mut conn, &address)
        .into_iter()
        .find(|k| k.ends_with(":order") && *k != order)
        .expect("order");
    let _: () = redis::cmd("SET")
        .arg(&order2)
        .arg("garbage")
        .query(&mut conn)
        .expect("set");
    assert!(matches!(d2.set("b", 2), Err(Error::InvalidState(m)) if m.contains("did not write")));
    assert!(matches!(d2.len(), Err(Error::InvalidState(_))));
    let _: () = redis::cmd("DEL")
        .arg(&order2)
        .query(&mut conn)
        .expect("del");

    // A list whose shape is garbage, whose items are garbage.
    let l = manager.list_from(0..3i64).expect("list");
    let items = find(&mut conn, ":items");
    let _: () = redis::cmd("LSET")
        .arg(&items)
        .arg(1)
        .arg("junk")
        .query(&mut conn)
        .expect("lset");
    assert!(matches!(l.get(1), Err(Error::Codec { .. })));
    assert!(matches!(l.to_vec(), Err(Error::Codec { .. })));
    assert_eq!(l.get(0).expect("the others still read"), 0);
    let head = find(&mut conn, ":head");
    let _: () = redis::cmd("HSET")
        .arg(&head)
        .arg("\0s")
        .arg("x")
        .query(&mut conn)
        .expect("hset");
    assert!(matches!(l.append(1), Err(Error::InvalidState(m)) if m.contains("did not write")));
    let _: () = redis::cmd("DEL").arg(&head).query(&mut conn).expect("del");
    assert!(matches!(l.len(), Err(Error::InvalidState(m)) if m.contains("no longer exists")));

    // The manager's record.
    let meta = format!("shoal:{{default:manager:{}}}:meta", address.id());
    let _: () = redis::cmd("SET")
        .arg(&meta)
        .arg("garbage")
        .query(&mut conn)
        .expect("set");
    assert!(
        matches!(manager.namespace(), Err(Error::InvalidState(m)) if m.contains("did not write"))
    );
    assert!(matches!(
        Manager::connect(address.clone(), shoal::current_process().authkey),
        Err(Error::InvalidState(_))
    ));
    let _: () = redis::cmd("DEL").arg(&meta).query(&mut conn).expect("del");
    let _: () = redis::cmd("HSET")
        .arg(&meta)
        .arg("state")
        .arg("running")
        .arg("nonce")
        .arg("n")
        .arg("verifier")
        .arg("not a tag")
        .query(&mut conn)
        .expect("hset");
    assert!(matches!(
        Manager::connect(address.clone(), shoal::current_process().authkey),
        Err(Error::Authentication(_))
    ));
    assert!(started.elapsed() < Duration::from_secs(30), "no hang");
    manager.shutdown().expect("shutdown");
}

/// The same dict, seen with other types (its values may not decode as one).
fn as_dict_of<K, V, K2, V2>(dict: &DictProxy<K, V>) -> DictProxy<K2, V2> {
    let json = serde_json::to_string(dict).expect("json");
    serde_json::from_str(&json).expect("a dict proxy")
}

fn is_codec_error<T: std::fmt::Debug>(result: Result<T>) -> bool {
    matches!(result, Err(Error::Codec { .. }))
}

#[test]
fn keys_do_not_read_values_and_pops_remove_what_does_not_decode() {
    let _rt = runtime();
    let manager = Manager::new().expect("manager");
    let d = manager.dict::<String, String>().expect("dict");
    d.update([("a".to_string(), "x".to_string()), ("b".into(), "y".into())])
        .expect("update");
    // Values that do not decode as i64: keys() reads only the keys, values() and items() fail.
    let wrong = as_dict_of::<_, _, String, i64>(&d);
    assert_eq!(wrong.keys().expect("keys"), vec!["a", "b"]);
    assert_eq!(
        block_on(wrong.keys_async()).expect("keys_async"),
        vec!["a", "b"]
    );
    assert!(is_codec_error(wrong.values()));
    assert!(is_codec_error(block_on(wrong.values_async())));
    assert!(is_codec_error(wrong.items()));
    // Values that decode, keys that do not: values() reads only the values.
    let wrong_keys = as_dict_of::<_, _, i64, String>(&d);
    assert_eq!(wrong_keys.values().expect("values"), vec!["x", "y"]);
    assert!(is_codec_error(wrong_keys.keys()));
    assert_eq!(d.values().expect("values"), vec!["x", "y"]);
    // As documented: a pop removes the value even when it does not decode.
    assert!(is_codec_error(wrong.pop("b")));
    assert!(is_codec_error(wrong.popitem()));
    assert!(d.is_empty().expect("is_empty"));
    let l = manager.list_from(vec!["x".to_string()]).expect("list");
    assert!(is_codec_error(as_list_of::<_, i64>(&l).pop()));
    assert!(l.is_empty().expect("is_empty"));
    manager.shutdown().expect("shutdown");
}

// ------------------------------------------------------------------------------ freeze, TTL --

#[test]
fn a_dead_sorters_freeze_lapses() {
    let rt = runtime();
    let mut conn = raw_redis(&rt);
    let manager = Manager::new().expect("manager");
    let l = manager.list_from(vec![3i64, 1, 2]).expect("list");
    let head = list_head_key(&mut conn, &manager);
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as u64
    };
    // A sort that froze the list and died: writes wait until its freeze lapses, reads do not.
    let _: () = redis::cmd("HSET")
        .arg(&head)
        .arg("\0f")
        .arg(format!("dead-sorter|{}", now_ms() + 1500))
        .query(&mut conn)
        .expect("hset");
    let started = Instant::now();
    assert_eq!(l.to_vec().expect("a read is not frozen"), vec![3, 1, 2]);
    assert!(started.elapsed() < Duration::from_millis(1000));
    l.append(4).expect("append after the freeze lapsed");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(1200), "{waited:?}");
    assert!(waited < Duration::from_secs(20), "{waited:?}");
    // A sort waits as well, then sorts.
    let _: () = redis::cmd("HSET")
        .arg(&head)
        .arg("\0f")
        .arg(format!("dead-sorter|{}", now_ms() + 1000))
        .query(&mut conn)
        .expect("hset");
    let started = Instant::now();
    l.sort().expect("sort");
    assert!(started.elapsed() >= Duration::from_millis(700));
    assert_eq!(l.to_vec().expect("items"), vec![1, 2, 3, 4]);
    // A lapsed freeze does not stop anything.
    let _: () = redis::cmd("HSET")
        .arg(&head)
        .arg("\0f")
        .arg(format!("dead-sorter|{}", now_ms() - 1))
        .query(&mut conn)
        .expect("hset");
    let started = Instant::now();
    l.set(0, 0).expect("set");
    assert!(started.elapsed() < Duration::from_millis(1000));
    manager.shutdown().expect("shutdown");
}

/// A list script as the runtime sends it: the container prelude, the list prelude, `body`.
fn list_script(body: &str) -> redis::Script {
    redis::Script::new(&format!(
        "{}\n{}\n{}",
        include_str!("../../runtime/src/manager/container_prelude.lua"),
        include_str!("../../runtime/src/manager/list_prelude.lua"),
        body
    ))
}

/// Runs list script `body` on the manager's (only) list as a process whose clock reads `now`
/// would: its keys, `now`, the TTL, then `args`.
fn run_list_script(
    conn: &mut redis::Connection,
    manager: &Manager,
    body: &str,
    now: u64,
    args: &[Vec<u8>],
) -> redis::RedisResult<redis::Value> {
    let keys = manager_keys(conn, &manager.address());
    let key = |suffix: &str| {
        keys.iter()
            .find(|k| k.ends_with(suffix))
            .expect("key")
            .clone()
    };
    let script = list_script(body);
    let mut invocation = script.prepare_invoke();
    invocation
        .key(key(":head"))
        .key(key(":items"))
        .key(key(":containers"))
        .key(key(":meta"))
        .arg(now)
        .arg(3600);
    for arg in args {
        invocation.arg(arg.as_slice());
    }
    invocation.invoke(conn)
}

#[test]
fn the_freeze_is_timed_by_redis_clock_not_the_callers() {
    let rt = runtime();
    let mut conn = raw_redis(&rt);
    let manager = Manager::new().expect("manager");
    let l = manager.list_from(vec![3i64, 1, 2]).expect("list");
    let head = list_head_key(&mut conn, &manager);
    let hour = 3_600_000;
    // A sorter whose clock is an hour ahead reads (and freezes for 300 ms), then dies.
    run_list_script(
        &mut conn,
        &manager,
        include_str!("../../runtime/src/manager/list_sort_begin.lua"),
        now_ms() + hour,
        &[b"skewed-sorter".to_vec(), b"300".to_vec()],
    )
    .expect("sort begin");
    assert!(frozen(&mut conn, &head));
    // Its freeze lapses 300 ms later, not an hour later: a write goes through.
    let (done, appended) = std::sync::mpsc::channel();
    let writer = l.clone();
    std::thread::spawn(move || {
        let _ = done.send(timed_append(&writer, 4));
    });
    let waited = appended
        .recv_timeout(Duration::from_secs(10))
        .expect("the write waited for the skewed sorter's clock");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    // A writer whose clock is an hour behind does not wait for a freeze that lapsed.
    let _: () = redis::cmd("HSET")
        .arg(&head)
        .arg("\0f")
        .arg(format!("dead-sorter|{}", now_ms() - 1))
        .query(&mut conn)
        .expect("hset");
    let item = shoal_core::codec::encode(&5i64, "item", usize::MAX).expect("encode");
    run_list_script(
        &mut conn,
        &manager,
        include_str!("../../runtime/src/manager/list_push.lua"),
        now_ms() - hour,
        &[item],
    )
    .expect("a write by a caller whose clock is behind");
    assert_eq!(l.to_vec().expect("items"), vec![3, 1, 2, 4, 5]);
    manager.shutdown().expect("shutdown");
}

#[test]
fn every_manager_key_has_a_ttl() {
    let rt = runtime();
    let mut conn = raw_redis(&rt);
    let manager = Manager::new().expect("manager");
    let d = manager.dict::<i64, i64>().expect("dict");
    let l = manager.list::<i64>().expect("list");
    let n = manager.namespace().expect("namespace");
    // Containers emptied and filled again (Redis deletes an empty list).
    d.set(&1, 1).expect("set");
    d.del(&1).expect("del");
    d.set(&2, 2).expect("set");
    d.clear().expect("clear");
    d.set(&3, 3).expect("set");
    l.append(1).expect("append");
    l.pop().expect("pop");
    l.append(2).expect("append");
    l.clear().expect("clear");
    l.insert(0, 3).expect("insert");
    l.pop().expect("pop");
    l.extend(vec![4, 5]).expect("extend");
    l.reverse().expect("reverse");
    l.sort().expect("sort");
    n.set("x", 1).expect("set");
    let keys = manager_keys(&mut conn, &manager.address());
    // The record, the container index, and the containers' 5.
    assert_eq!(keys.len(), 7, "{keys:?}");
    for key in keys {
        let ttl: i64 = redis::cmd("TTL").arg(&key).query(&mut conn).expect("ttl");
        assert!(ttl > 0, "{key} has no TTL ({ttl})");
    }
    manager.shutdown().expect("shutdown");
}

// ------------------------------------------------------- a sort that ends without writing --

/// Runs `body` to its end on a Tokio current-thread runtime.
fn block_on<T>(body: impl Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("current-thread runtime")
        .block_on(body)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

/// The same list, seen as a list of `U` (its items do not decode as one).
fn as_list_of<T, U>(list: &ListProxy<T>) -> ListProxy<U> {
    let json = serde_json::to_string(list).expect("json");
    serde_json::from_str(&json).expect("a list proxy")
}

/// Times a write to `l`: another process's writes wait while a sort freezes it.
fn timed_append(l: &ListProxy<i64>, value: i64) -> Duration {
    let started = Instant::now();
    l.append(value).expect("append");
    started.elapsed()
}

#[test]
fn a_failed_sort_lifts_its_freeze_at_once() {
    let rt = runtime();
    let mut conn = raw_redis(&rt);
    let manager = Manager::new().expect("manager");
    let l = manager.list_from(vec![3i64, 1, 2]).expect("list");
    let head = list_head_key(&mut conn, &manager);

    // `compare` panics between the read (which froze the list) and the write.
    let sorted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        l.sort_by(|_, _| panic!("compare panics"))
    }));
    assert!(sorted.is_err(), "the panic goes on to the caller");
    let waited = timed_append(&l, 4);
    assert!(waited < Duration::from_secs(1), "writes waited {waited:?}");
    assert!(!frozen(&mut conn, &head), "the freeze is lifted");
    assert_eq!(
        l.to_vec().expect("items"),
        vec![3, 1, 2, 4],
        "nothing sorted"
    );

    // The items do not decode as the proxy's type: an error, and the freeze is lifted.
    let strings: ListProxy<String> = as_list_of(&l);
    assert!(matches!(
        strings.sort(),
        Err(Error::Codec { .. }) | Err(Error::InvalidState(_))
    ));
    let waited = timed_append(&l, 5);
    assert!(waited < Duration::from_secs(1), "writes waited {waited:?}");

    // Only the sort's own freeze is lifted: when its freeze lapsed and another sort froze the
    // list meanwhile, that one holds.
    let sorted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        l.sort_by(|_, _| {
            let _: () = redis::cmd("HSET")
                .arg(&head)
                .arg("\0f")
                .arg(format!("another-sort|{}", now_ms() + 1500))
                .query(&mut conn)
                .expect("hset");
            panic!("compare panics")
        })
    }));
    assert!(sorted.is_err());
    let waited = timed_append(&l, 6);
    assert!(
        waited >= Duration::from_millis(1200),
        "another sort's freeze was lifted: writes waited {waited:?}"
    );
    assert_eq!(l.to_vec().expect("items"), vec![3, 1, 2, 4, 5, 6]);
    l.sort().expect("a sort after all that");
    assert_eq!(l.to_vec().expect("items"), vec![1, 2, 3, 4, 5, 6]);
    manager.shutdown().expect("shutdown");
}

#[test]
fn a_dropped_or_failed_async_sort_lifts_its_freeze() {
    use futures::FutureExt;

    let rt = runtime();
    let mut conn = raw_redis(&rt);
    let manager = Manager::new().expect("manager");
    let l = manager.list_from(vec![3i64, 1, 2]).expect("list");
    let head = list_head_key(&mut conn, &manager);

    // Dropped while its read is in flight: polled once (the read, which freezes the list, is
    // sent), then dropped before the reply comes.
    drop(l.sort_by_async(|a: &i64, b: &i64| a.cmp(b)).now_or_never());
    std::thread::sleep(Duration::from_millis(500));
    assert!(!frozen(&mut conn, &head), "the freeze is lifted");
    let waited = timed_append(&l, 4);
    assert!(waited < Duration::from_secs(1), "writes waited {waited:?}");

    // `compare` panics in a task: the future is dropped while unwinding.
    block_on(async {
        let sorted = tokio::spawn(l.sort_by_async(|_: &i64, _: &i64| panic!("compare panics")));
        assert!(sorted.await.is_err_and(|e| e.is_panic()));
    });
    let waited = timed_append(&l, 5);
    assert!(waited < Duration::from_secs(1), "writes waited {waited:?}");

    // The items do not decode: an error, and the freeze is lifted.
    let strings: ListProxy<String> = as_list_of(&l);
    assert!(block_on(strings.sort_async()).is_err());
    let waited = timed_append(&l, 6);
    assert!(waited < Duration::from_secs(1), "writes waited {waited:?}");
    assert!(!frozen(&mut conn, &head));

    block_on(l.sort_async()).expect("sort");
    let items = l.to_vec().expect("items");
    assert_eq!(items, {
        let mut sorted = items.clone();
        sorted.sort();
        sorted
    });
    manager.shutdown().expect("shutdown");
}

// ------------------------------------------------------------------------ list del message --

#[test]
fn del_on_an_empty_list_is_an_assignment_index_error() {
    let _rt = runtime();
    let manager = Manager::new().expect("manager");
    let e = manager.list::<i64>().expect("list");
    // CPython: `del [][0]` is IndexError("list assignment index out of range").
    for index in [0, -1, 3] {
        let err = e.del(index).expect_err("empty");
        assert!(
            matches!(&err, Error::IndexError(m) if m == "list assignment index out of range"),
            "del({index}): {err}"
        );
        let err = block_on(e.del_async(index)).expect_err("empty");
        assert!(
            matches!(&err, Error::IndexError(m) if m == "list assignment index out of range"),
            "del_async({index}): {err}"
        );
    }
    // pop keeps its own message.
    assert!(matches!(e.pop(), Err(Error::IndexError(m)) if m == "pop from empty list"));
    manager.shutdown().expect("shutdown");
}

// ------------------------------------------------------------------- a manager in use lives --

#[derive(Serialize, Deserialize, Default, shoal::Actor)]
#[actor(messages(Bump))]
struct Tally {
    n: u64,
}

#[derive(Serialize, Deserialize)]
struct Bump;

impl Handler<Bump> for Tally {
    type Reply = u64;
    fn handle(&mut self, _: Bump, _: &mut ActorContext) -> u64 {
        self.n += 1;
        self.n
    }
}

#[test]
fn a_manager_in_use_does_not_expire() {
    const EXPIRY: u64 = 3;
    // Every lease within the expiry, as the configuration requires.
    let mut config = Config::default();
    config.redis.expiry_secs = EXPIRY;
    config.sync.lease_secs = 1.0;
    config.pool.task_lease_secs = 1.0;
    config.actors.lease_secs = 1.0;
    let rt = shoal::init_with(config).expect("runtime");
    let mut conn = raw_redis(&rt);
    let manager = Manager::new().expect("manager");
    let jobs: Queue<i32> = manager.queue().expect("queue");
    manager.publish("x", &1).expect("publish");
    manager.publish("jobs", &jobs).expect("publish");

    // Used longer than its expiry by lookups alone: each refreshes it.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(2 * EXPIRY + 1) {
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(manager.lookup::<i32>("x").expect("lookup"), 1);
    }
    let jobs: Queue<i32> = manager.lookup("jobs").expect("lookup");
    jobs.put(7).expect("put");

    // Each use alone refreshes the record: its TTL cut to 1 s, then the use.
    let meta = format!("shoal:{{default:manager:{}}}:meta", manager.address().id());
    let key = current_process().authkey;
    type Use<'a> = Box<dyn Fn() -> shoal::Result<()> + 'a>;
    let uses: Vec<(&str, Use)> = vec![
        ("publish", Box::new(|| manager.publish("y", &2))),
        ("lookup", Box::new(|| manager.lookup::<i32>("y").map(drop))),
        (
            "connect",
            Box::new(|| Manager::connect(manager.address(), key.clone()).map(drop)),
        ),
        ("register", Box::new(|| manager.register::<Tally>("Tally"))),
        (
            "create",
            Box::new(|| manager.create("Tally", Tally::default()).map(drop)),
        ),
        ("queue", Box::new(|| manager.queue::<i32>().map(drop))),
        ("lock", Box::new(|| manager.lock().map(drop))),
        (
            "publish_async",
            Box::new(|| block_on(manager.publish_async("z", &3))),
        ),
        (
            "lookup_async",
            Box::new(|| block_on(manager.lookup_async::<i32>("z")).map(drop)),
        ),
        (
            "connect_async",
            Box::new(|| block_on(Manager::connect_async(manager.address(), key.clone())).map(drop)),
        ),
        (
            "register_async",
            Box::new(|| block_on(manager.register_async::<Tally>("Tally"))),
        ),
        (
            "create_async",
            Box::new(|| block_on(manager.create_async("Tally", Tally::default())).map(drop)),
        ),
    ];
    for (name, used) in uses {
        let _: i64 = redis::cmd("EXPIRE")
            .arg(&meta)
            .arg(1)
            .query(&mut conn)
            .expect("expire");
        used().unwrap_or_else(|e| panic!("{name}: {e}"));
        let ttl: i64 = redis::cmd("TTL").arg(&meta).query(&mut conn).expect("ttl");
        assert!(
            ttl >= 2,
            "{name} did not refresh the manager's record (TTL {ttl})"
        );
    }
    manager.shutdown().expect("shutdown");
}

// ------------------------------------------------------------ a dict's keys stay together --

/// The key of `manager` whose name ends with `suffix` (`:order`, `:meta`...).
fn key_of(conn: &mut redis::Connection, manager: &Manager, suffix: &str) -> String {
    manager_keys(conn, &manager.address())
        .into_iter()
        .find(|k| k.ends_with(suffix))
        .unwrap_or_else(|| panic!("no key ending {suffix}"))
}

/// Whether `e` is the error of a container whose keys hold something shoal did not write.
fn is_corrupt(e: &Error) -> bool {
    matches!(e, Error::InvalidState(m) if m.contains("did not write"))
}

#[test]
fn a_cleared_dict_keeps_its_keys_expiring_together() {
    let rt = runtime();
    let mut conn = raw_redis(&rt);
    let manager = Manager::new().expect("manager");
    let d = manager.dict::<String, i64>().expect("dict");
    d.set("a", 1).expect("set");
    d.set("b", 2).expect("set");
    // As if the dict's TTLs were last refreshed almost redis.expiry_secs ago: every key of the
    // manager (the dict's data and order, the record and the container index) expires in 1.5 s.
    let keys = manager_keys(&mut conn, &manager.address());
    for key in &keys {
        let _: i64 = redis::cmd("PEXPIRE")
            .arg(key)
            .arg(1500)
            .query(&mut conn)
            .expect("pexpire");
    }
    d.clear().expect("clear");
    // Had clear given a fresh TTL to the data alone (it makes it again), the order and the
    // record would expire first, and the set below would make the order again without its
    // sentinel and without a TTL.
    std::thread::sleep(Duration::from_millis(1800));
    d.set("c", 3).expect("set after the clear");
    assert_eq!(d.len().expect("len"), 1);
    assert_eq!(d.keys().expect("keys"), vec!["c".to_string()]);
    assert_eq!(d.items().expect("items"), vec![("c".to_string(), 3)]);
    for key in manager_keys(&mut conn, &manager.address()) {
        let ttl: i64 = redis::cmd("TTL").arg(&key).query(&mut conn).expect("ttl");
        assert!(ttl > 60, "{key}: TTL {ttl} s after the clear");
    }
    manager.shutdown().expect("shutdown");
    assert_eq!(
        manager_keys(&mut conn, &manager.address()),
        Vec::<String>::new()
    );
}

#[test]
fn a_dict_without_its_order_is_reported_and_its_order_not_made_again() {
    let rt = runtime();
    let mut conn = raw_redis(&rt);
    let manager = Manager::new().expect("manager");
    let d = manager.dict::<String, i64>().expect("dict");
    d.set("a", 1).expect("set");
    d.set("b", 2).expect("set");
    let mut started = d.iter().expect("iter");
    let order = key_of(&mut conn, &manager, ":order");
    // The order gone, the data left (expired apart, or deleted by hand).
    let _: i64 = redis::cmd("DEL").arg(&order).query(&mut conn).expect("del");
    let errors = [
        ("set", d.set("c", 3).expect_err("set of a new key")),
        (
            "setdefault",
            d.setdefault("c", 3).expect_err("setdefault of a new key"),
        ),
        (
            "update",
            d.update(vec![("c".to_string(), 3)]).expect_err("update"),
        ),
        ("len", d.len().expect_err("len")),
        ("items", d.items().expect_err("items")),
        ("keys", d.keys().expect_err("keys")),
        ("popitem", d.popitem().expect_err("popitem")),
        ("clear", d.clear().expect_err("clear")),
        ("iter", d.iter().map(drop).expect_err("iter")),
        (
            "a started iteration",
            started
                .next()
                .expect("an item or an error")
                .expect_err("the page after the order went"),
        ),
        ("len_async", block_on(d.len_async()).expect_err("len_async")),
        (
            "set_async",
            block_on(d.set_async("c", 3)).expect_err("set_async"),
        ),
    ];
    for (what, e) in errors {
        assert!(is_corrupt(&e), "{what}: {e}");
    }
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&order)
        .query(&mut conn)
        .expect("exists");
    assert_eq!(exists, 0, "the order was made again");
    assert!(
        !d.contains("c").expect("contains"),
        "no write was half done"
    );
    manager.shutdown().expect("shutdown");
    assert_eq!(
        manager_keys(&mut conn, &manager.address()),
        Vec::<String>::new()
    );
}

// ---------------------------------------------------------------- a shutdown that failed --

#[test]
fn a_shutdown_that_failed_half_way_is_done_when_retried() {
    let rt = runtime();
    let mut conn = raw_redis(&rt);
    let acl = |conn: &mut redis::Connection, rule: &str| {
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg("default")
            .arg(rule)
            .query(conn)
            .expect("acl setuser");
    };
    for asynchronous in [false, true] {
        let manager = Manager::new().expect("manager");
        let d = manager.dict::<String, i64>().expect("dict");
        d.set("a", 1).expect("set");
        let l = manager.list_from(0..3i64).expect("list");
        let shutdown = || {
            if asynchronous {
                block_on(manager.shutdown_async())
            } else {
                manager.shutdown()
            }
        };
        // The deletion fails after the record was marked shut down (as it would if the
        // connection were lost between the two round trips): DEL is refused meanwhile.
        acl(&mut conn, "-del");
        let failed = shutdown();
        acl(&mut conn, "+del");
        let e = failed.expect_err("a shutdown whose deletion failed");
        assert!(
            e.to_string().contains("deleting the keys"),
            "async {asynchronous}: {e}"
        );
        assert!(!manager_keys(&mut conn, &manager.address()).is_empty());
        // Shut down in Redis already: nothing is made in it any more.
        assert!(
            matches!(manager.dict::<i64, i64>(), Err(Error::InvalidState(m)) if m.contains("shut down"))
        );
        // A retry deletes what is left.
        shutdown().expect("the retried shutdown");
        assert_eq!(
            manager_keys(&mut conn, &manager.address()),
            Vec::<String>::new(),
            "async {asynchronous}: the retry deleted nothing"
        );
        assert!(
            matches!(d.get("a"), Err(Error::InvalidState(m)) if m.contains("no longer exists"))
        );
        assert!(matches!(l.len(), Err(Error::InvalidState(_))));
        shutdown().expect("a third shutdown does nothing");
    }
}

// --------------------------------------------------------- the record does not grow forever --

/// A container proxy's capability (its serde form carries it).
fn capability_of<T: Serialize>(proxy: &T) -> String {
    let value = serde_json::to_value(proxy).expect("json");
    value["capability"]
        .as_str()
        .expect("a capability")
        .to_string()
}

#[test]
fn the_manager_forgets_containers_that_expired_and_deletes_the_others_page_by_page() {
    let rt = runtime();
    let mut conn = raw_redis(&rt);
    let manager = Manager::new().expect("manager");
    let id = manager.address().id().to_string();
    let meta = format!("shoal:{{default:manager:{id}}}:meta");
    let index = format!("shoal:{{default:manager:{id}}}:containers");
    let prefix = format!("shoal:{{default:manager:{id}}}:dict:");
    let hlen = |conn: &mut redis::Connection| -> i64 {
        redis::cmd("HLEN").arg(&meta).query(conn).expect("hlen")
    };
    let zcard = |conn: &mut redis::Connection| -> i64 {
        redis::cmd("ZCARD").arg(&index).query(conn).expect("zcard")
    };
    let fields = hlen(&mut conn);

    // A service that makes a dict per request: the record does not grow with them.
    let dicts: Vec<DictProxy<i64, i64>> = (0..40).map(|_| manager.dict().expect("dict")).collect();
    assert_eq!(
        hlen(&mut conn),
        fields,
        "a field in the record per container"
    );
    assert_eq!(zcard(&mut conn), 40);

    // Most of them were last used three hours ago and expired: their keys are gone, and their
    // entries in the index are that old. 5 of those old ones are used now (a refresh of their
    // TTLs, forced by a stale refresh time, records itself in the index), 5 are recent.
    let three_hours_ago = now_ms() - 3 * 3600 * 1000;
    for (i, d) in dicts.iter().enumerate().skip(5) {
        let capability = capability_of(d);
        let _: i64 = redis::cmd("ZADD")
            .arg(&index)
            .arg("XX")
            .arg(three_hours_ago)
            .arg(format!("dict:{capability}"))
            .query(&mut conn)
            .expect("zadd");
        if i < 10 {
            let _: i64 = redis::cmd("HSET")
                .arg(format!("{prefix}{capability}:data"))
                .arg("\0r")
                .arg(0)
                .query(&mut conn)
                .expect("hset");
            d.set(&1, 1).expect("a dict in use");
        } else {
            let _: i64 = redis::cmd("DEL")
                .arg(format!("{prefix}{capability}:data"))
                .arg(format!("{prefix}{capability}:order"))
                .query(&mut conn)
                .expect("del");
        }
    }
    // The next container made prunes the entries of the expired ones.
    let last = manager.dict::<i64, i64>().expect("dict");
    assert_eq!(
        zcard(&mut conn),
        11,
        "the expired containers' entries are pruned"
    );
    for d in dicts.iter().take(10).chain([&last]) {
        d.set(&2, 2).expect("a live dict");
    }
    manager.shutdown().expect("shutdown");
    assert_eq!(
        manager_keys(&mut conn, &manager.address()),
        Vec::<String>::new()
    );

    // More containers than a shutdown deletes per round trip: all of them are deleted.
    let manager = Manager::new().expect("manager");
    let many: Vec<NamespaceProxy> = (0..1201)
        .map(|_| manager.namespace().expect("namespace"))
        .collect();
    assert_eq!(manager_keys(&mut conn, &manager.address()).len(), 1203);
    manager.shutdown().expect("shutdown");
    assert_eq!(
        manager_keys(&mut conn, &manager.address()),
        Vec::<String>::new()
    );
    assert!(
        matches!(many[1200].get::<i64>("x"), Err(Error::InvalidState(m)) if m.contains("no longer exists"))
    );
}
