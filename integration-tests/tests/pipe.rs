//! `Pipe` and `Connection` against a real redis-server, across real processes: Python's
//! test_connection cases, one wire format for `send`/`send_bytes`, per-process `close`, end of
//! file once every holder of the sending end closed it or died (SIGKILL included), and
//! Python's error kinds.

use std::time::{Duration, Instant};

use shoal::Error;
use shoal::prelude::*;
use shoal_integration_tests::{TestRedis, assert_timing, pause_writes};

shoal::test_support!();

/// Lease of this binary's runtime: short, so the SIGKILL test is quick.
const LEASE: Duration = Duration::from_millis(1500);

fn runtime() -> shoal::Runtime {
    let mut config = Config::builder().build().expect("config");
    config.sync.lease_secs = LEASE.as_secs_f64();
    shoal::init_with(config).expect("runtime")
}

/// A runtime on `server` (a private redis-server the test may pause), with the same lease.
fn runtime_on(server: &TestRedis) -> shoal::Runtime {
    let mut config = Config::builder()
        .redis_url(server.url())
        .build()
        .expect("config");
    config.sync.lease_secs = LEASE.as_secs_f64();
    shoal::init_with(config).expect("runtime")
}

// ----------------------------------------------------------------------------- basics --

#[shoal::remote]
fn echo(conn: Connection<i64>, rounds: u32) {
    for _ in 0..rounds {
        let x = conn.recv().expect("recv");
        conn.send(&(x * 2)).expect("send");
    }
}

#[test]
fn a_duplex_pipe_talks_both_ways_across_processes() {
    let _rt = runtime();
    let (a, b) = Pipe::new::<i64>(true).expect("pipe");
    let p = Process::new(echo, (b, 50u32));
    p.start().expect("start");
    for i in 0..50 {
        a.send(&i).expect("send");
        assert_eq!(a.recv().expect("recv"), i * 2);
    }
    p.join(None).expect("join");
    assert_eq!(p.exitcode(), Some(0));
}

#[test]
fn a_one_way_pipe_refuses_the_wrong_direction() {
    let _rt = runtime();
    let (receiver, sender) = Pipe::new::<String>(false).expect("pipe");
    assert!(receiver.readable() && !receiver.writable());
    assert!(sender.writable() && !sender.readable());
    // Python's OSError: Error::Io.
    assert!(matches!(
        receiver.send(&"x".to_string()),
        Err(Error::Io { .. })
    ));
    assert!(matches!(sender.recv(), Err(Error::Io { .. })));
    assert!(matches!(
        sender.poll(Some(Duration::ZERO)),
        Err(Error::Io { .. })
    ));
    sender.send(&"hello".to_string()).expect("send");
    assert_eq!(receiver.recv().expect("recv"), "hello");
}

#[test]
fn poll_waits_without_taking() {
    let _rt = runtime();
    let (a, b) = Pipe::new::<u8>(true).expect("pipe");
    assert!(!a.poll(Some(Duration::ZERO)).expect("poll"));
    let started = Instant::now();
    assert!(!a.poll(Some(Duration::from_millis(300))).expect("poll"));
    assert_timing(started, Duration::from_millis(300));
    let sender = b.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        sender.send(&7).expect("send");
    });
    let started = Instant::now();
    assert!(a.poll(None).expect("poll"));
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(a.poll(Some(Duration::ZERO)).expect("still there"));
    assert_eq!(a.recv().expect("recv"), 7);
    t.join().expect("thread");
}

/// End of file is the writer's state, not only its marker: a reader that died between taking
/// the marker and putting it back (made here by taking it by hand) leaves the next readers
/// their end of file all the same, and `poll` says it is readable.
#[test]
fn end_of_file_outlives_a_lost_marker() {
    let rt = runtime();
    let (a, b) = Pipe::new::<u32>(true).expect("pipe");
    b.close().expect("close");
    let mut raw = shoal_integration_tests::raw_redis(&rt);
    let inboxes: Vec<String> = redis::cmd("KEYS")
        .arg("shoal:{*:pipe:*}:inbox:0")
        .query(&mut raw)
        .expect("keys");
    assert_eq!(inboxes.len(), 1, "{inboxes:?}");
    let marker: Option<Vec<u8>> = redis::cmd("LPOP")
        .arg(&inboxes[0])
        .query(&mut raw)
        .expect("lpop");
    assert_eq!(marker.as_deref(), Some(&b""[..]), "the end-of-file marker");
    let started = Instant::now();
    assert!(
        a.poll(Some(Duration::from_secs(5))).expect("poll"),
        "end of file is readable"
    );
    assert!(matches!(a.recv(), Err(Error::Closed(_))), "end of file");
    assert!(matches!(a.recv(), Err(Error::Closed(_))), "and again");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn end_of_file_after_close_never_hangs() {
    let _rt = runtime();
    let (a, b) = Pipe::new::<u32>(true).expect("pipe");
    b.send(&1).expect("send");
    b.send(&2).expect("send");
    b.close().expect("close");
    b.close().expect("closing twice does nothing");
    assert_eq!(a.recv().expect("1"), 1);
    assert_eq!(a.recv().expect("2"), 2);
    assert!(
        matches!(a.recv(), Err(Error::Closed(_))),
        "EOF after the data"
    );
    assert!(matches!(a.recv(), Err(Error::Closed(_))), "and EOF again");
    assert!(a.poll(Some(Duration::ZERO)).expect("EOF is readable"));
    assert!(matches!(a.send(&3), Err(Error::Closed(_))), "broken pipe");
    assert!(matches!(b.send(&3), Err(Error::Closed(_))), "closed end");

    // A reader blocked before the close wakes up with EOF.
    let (a, b) = Pipe::new::<u32>(true).expect("pipe");
    let reader = std::thread::spawn(move || {
        let started = Instant::now();
        (a.recv(), started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(300));
    b.close().expect("close");
    let (result, waited) = reader.join().expect("reader");
    assert!(matches!(result, Err(Error::Closed(_))), "{result:?}");
    assert!(waited < Duration::from_secs(1), "{waited:?}");
}

#[test]
fn byte_messages_with_offsets_limits_and_short_buffers() {
    let _rt = runtime();
    let (a, b) = Pipe::new::<()>(true).expect("pipe");
    b.send_bytes(b"0123456789", 2, Some(5)).expect("send_bytes");
    assert_eq!(a.recv_bytes(None).expect("recv_bytes"), b"23456");
    b.send_bytes(b"", 0, None)
        .expect("an empty message is a message");
    assert_eq!(a.recv_bytes(Some(0)).expect("empty"), b"");
    assert!(matches!(
        b.send_bytes(b"abc", 2, Some(5)),
        Err(Error::InvalidState(_))
    ));

    b.send_bytes(b"hello", 0, None).expect("send");
    let mut small = [0u8; 6];
    match a.recv_bytes_into(&mut small, 3) {
        Err(Error::BufferTooShort {
            message,
            needed,
            offset,
            available,
        }) => {
            assert_eq!((needed, offset, available), (5, 3, 6));
            assert_eq!(&*message, b"hello");
        }
        other => panic!("{other:?}"),
    }
    // Python: the exception carries the whole message, which is consumed.
    b.send_bytes(b"hello", 0, None).expect("send");
    let mut big = [0u8; 8];
    assert_eq!(a.recv_bytes_into(&mut big, 3).expect("fits"), 5);
    assert_eq!(&big, b"\0\0\0hello");

    b.send_bytes(&[7u8; 100], 0, None).expect("send");
    b.send_bytes(b"later", 0, None).expect("send");
    // Python's OSError: Error::Io.
    assert!(matches!(a.recv_bytes(Some(10)), Err(Error::Io { .. })));
    assert!(
        matches!(a.recv_bytes(None), Err(Error::Io { .. })),
        "no longer readable"
    );

    let (a, b) = Pipe::new::<u32>(true).expect("pipe");
    b.send_bytes(b"raw", 0, None).expect("send");
    assert!(matches!(a.recv(), Err(Error::Codec { .. })));
}

// ------------------------------------------------------------ Python's test_connection --

type Seq = (i32, f64, Option<u8>);

/// Python's `_echo`: relays byte messages until an empty one, then closes.
#[shoal::remote]
fn echo_bytes(conn: Connection<Seq>) {
    loop {
        let message = conn.recv_bytes(None).expect("recv_bytes");
        if message.is_empty() {
            break;
        }
        conn.send_bytes(&message, 0, None).expect("send_bytes");
    }
    conn.close().expect("close");
}

#[test]
fn relayed_bytes_decode_and_eof_follows_the_last_holder() {
    let _rt = runtime();
    let (conn, child_conn) = Pipe::new::<Seq>(true).expect("pipe");
    let p = Process::new(echo_bytes, (child_conn.clone(),));
    p.start().expect("start");

    // send/recv through a child that relays with recv_bytes/send_bytes: one wire format.
    let seq: Seq = (1, 2.25, None);
    conn.send(&seq).expect("send");
    assert_eq!(conn.recv().expect("recv"), seq);
    conn.send_bytes(b"hello world", 0, None)
        .expect("send_bytes");
    assert_eq!(conn.recv_bytes(None).expect("recv_bytes"), b"hello world");

    // BufferTooShort: the whole message, consumed.
    let longmsg = b"hello world".repeat(10);
    conn.send_bytes(&longmsg, 0, None).expect("send_bytes");
    conn.send_bytes(b"next", 0, None).expect("send_bytes");
    let mut buffer = [b' '; 40];
    match conn.recv_bytes_into(&mut buffer, 0) {
        Err(Error::BufferTooShort {
            message,
            needed,
            offset,
            available,
        }) => {
            assert_eq!((needed, offset, available), (110, 0, 40));
            assert_eq!(
                &*message,
                &longmsg[..],
                "the exception carries the whole message"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(conn.recv_bytes(None).expect("the next message"), b"next");

    // poll
    assert!(!conn.poll(Some(Duration::ZERO)).expect("poll"));
    let started = Instant::now();
    assert!(!conn.poll(Some(Duration::from_millis(100))).expect("poll"));
    assert_timing(started, Duration::from_millis(100));
    conn.send(&(0, 0.0, Some(1))).expect("send");
    std::thread::sleep(Duration::from_millis(100));
    assert!(conn.poll(Some(Duration::from_millis(100))).expect("poll"));
    assert_eq!(conn.recv().expect("recv"), (0, 0.0, Some(1)));

    // The child still holds its end: closing the parent's copy does not end the pipe.
    child_conn.close().expect("close");
    assert!(child_conn.closed() && !conn.closed());
    conn.send_bytes(b"still there?", 0, None)
        .expect("send_bytes");
    assert_eq!(conn.recv_bytes(None).expect("echo"), b"still there?");

    conn.send_bytes(b"", 0, None)
        .expect("tell the child to quit");
    let started = Instant::now();
    assert!(matches!(conn.recv(), Err(Error::Closed(_))), "EOF");
    assert!(
        matches!(conn.recv_bytes(None), Err(Error::Closed(_))),
        "EOF"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(conn.readable() && conn.writable());
    p.join(None).expect("join");
    assert_eq!(p.exitcode(), Some(0));
}

/// Python's test_spawn_close: the parent closes the child's end at once after start.
#[test]
fn closing_the_parent_copy_right_after_start_does_not_cut_the_child_off() {
    let _rt = runtime();
    for method in [StartMethod::Process, StartMethod::Thread] {
        let (conn, child_conn) = Pipe::new::<Seq>(true).expect("pipe");
        let p = Process::new(echo_bytes, (child_conn.clone(),)).start_method(method);
        p.start().expect("start");
        child_conn
            .close()
            .expect("this might complete before the child starts");
        drop(child_conn);
        conn.send_bytes(b"hello", 0, None).expect("send_bytes");
        assert_eq!(conn.recv_bytes(None).expect("recv_bytes"), b"hello");
        conn.send_bytes(b"", 0, None).expect("send_bytes");
        assert!(matches!(conn.recv(), Err(Error::Closed(_))), "{method:?}");
        conn.close().expect("close");
        p.join(None).expect("join");
        assert_eq!(p.exitcode(), Some(0), "{method:?}");
    }
}

#[shoal::remote]
fn send_three(conn: Connection<u32>) {
    for i in 0..3 {
        conn.send(&i).expect("send");
    }
    // No close: the handle is dropped when the function returns.
}

#[test]
fn eof_comes_when_every_process_that_held_the_sending_end_let_go() {
    let _rt = runtime();
    let (reader, writer) = Pipe::new::<u32>(false).expect("pipe");
    let children: Vec<Process> = (0..2)
        .map(|_| Process::new(send_three, (writer.clone(),)))
        .collect();
    for p in &children {
        p.start().expect("start");
    }
    writer.close().expect("close");
    let mut got = Vec::new();
    let started = Instant::now();
    loop {
        match reader.recv() {
            Ok(x) => got.push(x),
            Err(Error::Closed(_)) => break,
            Err(e) => panic!("{e}"),
        }
        assert!(started.elapsed() < Duration::from_secs(20), "no EOF");
    }
    got.sort_unstable();
    assert_eq!(got, vec![0, 0, 1, 1, 2, 2]);
    for p in &children {
        p.join(None).expect("join");
        assert_eq!(p.exitcode(), Some(0));
    }
    assert!(reader.poll(Some(Duration::ZERO)).expect("EOF is readable"));
}

/// An argument that encodes but never decodes: a child given it fails before it decodes the
/// arguments after it.
struct Undecodable;

impl serde::Serialize for Undecodable {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_unit()
    }
}

impl<'de> serde::Deserialize<'de> for Undecodable {
    fn deserialize<D: serde::Deserializer<'de>>(_: D) -> std::result::Result<Self, D::Error> {
        Err(serde::de::Error::custom("this argument never decodes"))
    }
}

#[shoal::remote]
fn never_runs(_: Undecodable, _conn: Connection<u32>) {
    unreachable!("its arguments do not decode");
}

#[test]
fn eof_comes_when_a_child_dies_before_claiming_the_handle_it_was_given() {
    // The child fails on its first argument, so it never claims the handle after it: the
    // transfer held for it is given back once its exit is known, and the reader sees end of
    // file while the parent still runs (not only when the parent exits).
    let _rt = runtime();
    let (reader, writer) = Pipe::new::<u32>(false).expect("pipe");
    let p = Process::new(never_runs, (Undecodable, writer.clone()));
    p.start().expect("start");
    writer.close().expect("close");
    p.join(Some(Duration::from_secs(20))).expect("join");
    assert_eq!(p.exitcode(), Some(1), "its arguments did not decode");
    assert!(
        reader
            .poll(Some(Duration::from_secs(10)))
            .expect("end of file is readable"),
        "no end of file while the parent lives"
    );
    assert!(matches!(reader.recv(), Err(Error::Closed(_))));
}

#[shoal::remote]
fn hold_and_wait(conn: Connection<u32>, ready: Event) {
    conn.send(&7).expect("send");
    ready.set().expect("set");
    std::thread::sleep(Duration::from_secs(120));
}

#[test]
fn a_holder_killed_with_sigkill_stops_counting_after_its_lease() {
    let _rt = runtime();
    let (reader, writer) = Pipe::new::<u32>(false).expect("pipe");
    let ready = Event::new().expect("event");
    let p = Process::new(hold_and_wait, (writer.clone(), ready.clone()));
    p.start().expect("start");
    writer.close().expect("close");
    assert!(ready.wait(Some(Duration::from_secs(20))).expect("ready"));
    assert_eq!(reader.recv().expect("recv"), 7);
    assert!(
        !reader
            .poll(Some(Duration::from_millis(300)))
            .expect("the child holds it")
    );
    p.kill().expect("SIGKILL");
    let started = Instant::now();
    assert!(
        matches!(reader.recv(), Err(Error::Closed(_))),
        "EOF once the lease lapsed"
    );
    let waited = started.elapsed();
    assert!(
        waited < LEASE + Duration::from_secs(5),
        "EOF after {waited:?} (lease {LEASE:?})"
    );
    p.join(None).expect("join");
}

#[test]
fn wrong_direction_closed_handles_and_bad_lengths_are_os_errors() {
    let _rt = runtime();
    // Python's test_duplex_false: OSError.
    let (reader, writer) = Pipe::new::<u32>(false).expect("pipe");
    assert!(matches!(reader.send(&2), Err(Error::Io { .. })));
    assert!(matches!(writer.recv(), Err(Error::Io { .. })));
    assert!(matches!(
        writer.poll(Some(Duration::ZERO)),
        Err(Error::Io { .. })
    ));

    // Python's test_context: a closed handle is closed, and says so (OSError).
    let (a, b) = Pipe::new::<u32>(true).expect("pipe");
    a.send(&1729).expect("send");
    assert_eq!(b.recv().expect("recv"), 1729);
    assert!(!a.closed() && !b.closed());
    a.close().expect("close");
    b.close().expect("close");
    assert!(a.closed() && b.closed());
    assert!(matches!(a.recv(), Err(Error::Closed(_))));
    assert!(matches!(b.recv(), Err(Error::Closed(_))));
    assert!(matches!(
        a.poll(Some(Duration::ZERO)),
        Err(Error::Closed(_))
    ));
    assert!(matches!(a.send(&1), Err(Error::Closed(_))));
    assert!(matches!(a.recv_bytes(None), Err(Error::Closed(_))));
    // A clone is a handle of its own (a dup'd descriptor).
    let (a, b) = Pipe::new::<u32>(true).expect("pipe");
    let a2 = a.clone();
    a.close().expect("close");
    assert!(a.closed() && !a2.closed());
    a2.send(&5).expect("the clone still sends");
    assert_eq!(b.recv().expect("recv"), 5);

    // Python: a message longer than maxlength is an OSError and the connection is then no
    // longer readable.
    let (a, b) = Pipe::new::<u32>(true).expect("pipe");
    b.send_bytes(&[7u8; 100], 0, None).expect("send");
    b.send_bytes(b"later", 0, None).expect("send");
    assert!(matches!(a.recv_bytes(Some(10)), Err(Error::Io { .. })));
    assert!(!a.readable());
    assert!(matches!(a.recv_bytes(None), Err(Error::Io { .. })));
    assert!(matches!(
        a.poll(Some(Duration::ZERO)),
        Err(Error::Io { .. })
    ));
    // A duplex end stays open (Python only clears `_readable`): it still sends.
    assert!(!a.closed());
    a.send(&9).expect("a duplex end still sends");
    assert_eq!(b.recv().expect("recv"), 9);

    // A one-way reader is closed by the violation (Python's `_bad_message_length` closes a
    // connection that is not writable), so its end is let go: the writer's sends break.
    let (r, w) = Pipe::new::<u32>(false).expect("pipe");
    w.send_bytes(&[7u8; 100], 0, None).expect("send");
    assert!(matches!(r.recv_bytes(Some(10)), Err(Error::Io { .. })));
    assert!(
        r.closed(),
        "a one-way reader is closed after a maxlength violation"
    );
    assert!(matches!(r.recv_bytes(None), Err(Error::Closed(_))));
    assert!(matches!(
        r.poll(Some(Duration::ZERO)),
        Err(Error::Closed(_))
    ));
    assert!(matches!(w.send(&1), Err(Error::Closed(_))));
    // The async form too.
    let (r, w) = Pipe::new::<u32>(false).expect("pipe");
    w.send_bytes(&[7u8; 100], 0, None).expect("send");
    assert!(matches!(
        futures::executor::block_on(r.recv_bytes_async(Some(10))),
        Err(Error::Io { .. })
    ));
    assert!(r.closed());
    assert!(matches!(w.send(&1), Err(Error::Closed(_))));
}

#[test]
fn python_poll_cases() {
    let _rt = runtime();
    // test_empty_string
    let (a, b) = Pipe::new::<()>(true).expect("pipe");
    assert!(!a.poll(Some(Duration::ZERO)).expect("poll"));
    b.send_bytes(b"", 0, None).expect("send");
    assert!(a.poll(Some(Duration::ZERO)).expect("poll"));
    assert!(a.poll(Some(Duration::ZERO)).expect("poll"));
    assert_eq!(a.recv_bytes(None).expect("empty message"), b"");
    // test_sendbytes
    let msg = b"abcdefghijklmnopqrstuvwxyz";
    for (offset, size, expected) in [
        (0, None, &msg[..]),
        (5, None, &msg[5..]),
        (7, Some(8), &msg[7..15]),
        (26, None, &b""[..]),
        (26, Some(0), &b""[..]),
    ] {
        a.send_bytes(msg, offset, size).expect("send_bytes");
        assert_eq!(b.recv_bytes(None).expect("recv_bytes"), expected);
    }
    for (offset, size) in [(27, None), (22, Some(5)), (26, Some(1))] {
        assert!(matches!(
            a.send_bytes(msg, offset, size),
            Err(Error::InvalidState(_))
        ));
    }
}

// ------------------------------------------------- ends in messages that were not sent --

/// A value that never encodes: a message holding a pipe end before it fails to encode after
/// the end's transfer was registered.
struct Unencodable;

impl serde::Serialize for Unencodable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> std::result::Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("this value never encodes"))
    }
}

impl<'de> serde::Deserialize<'de> for Unencodable {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        <()>::deserialize(d).map(|()| Unencodable)
    }
}

/// `reader` reads end of file within a lease (its writer's last holder let go): not only once
/// this process exits.
fn assert_prompt_end_of_file(reader: &Connection<u32>, what: &str) {
    let started = Instant::now();
    assert!(
        reader.poll(Some(2 * LEASE)).expect("poll"),
        "{what}: no end of file while this process lives"
    );
    assert!(matches!(reader.recv(), Err(Error::Closed(_))), "{what}");
    assert!(started.elapsed() < LEASE, "{what}: {:?}", started.elapsed());
}

/// A message holding a pipe end that was not sent (refused: the other end closed; its encoding
/// failed after the end's transfer was registered) gives that transfer back before the send
/// returns: the end closes as soon as its real holders let go, while the sending process lives.
/// A message that was sent keeps its transfer until its receiver claims it.
#[test]
fn a_pipe_end_in_a_message_that_was_not_sent_is_given_back_at_once() {
    let _rt = runtime();
    // Sent: the transfer holds the end while the message waits in the inbox.
    let (reader, writer) = Pipe::new::<u32>(false).expect("pipe");
    let (carrier_in, carrier_out) = Pipe::new::<Connection<u32>>(false).expect("carrier");
    carrier_out.send(&writer).expect("send");
    writer.close().expect("close");
    assert!(
        !reader
            .poll(Some(Duration::from_millis(300)))
            .expect("the message in the inbox holds the end"),
    );
    let received = carrier_in.recv().expect("recv");
    received.send(&5).expect("the received end sends");
    received.close().expect("close");
    assert_eq!(reader.recv().expect("recv"), 5);
    assert_prompt_end_of_file(&reader, "a sent end closed by its receiver");

    // Refused: the carrier's other end is closed (a broken pipe).
    let (reader, writer) = Pipe::new::<u32>(false).expect("pipe");
    carrier_in.close().expect("close");
    assert!(
        matches!(carrier_out.send(&writer), Err(Error::Closed(_))),
        "a broken pipe"
    );
    writer.close().expect("close");
    assert_prompt_end_of_file(&reader, "a send refused by a broken pipe");

    // The same through `send_async` (given back in the background).
    let (reader, writer) = Pipe::new::<u32>(false).expect("pipe");
    let sent = futures::executor::block_on(carrier_out.send_async(&writer));
    assert!(matches!(sent, Err(Error::Closed(_))), "{sent:?}");
    writer.close().expect("close");
    assert_prompt_end_of_file(&reader, "a send_async refused by a broken pipe");

    // An encoding that fails after the end's transfer was registered.
    let (reader, writer) = Pipe::new::<u32>(false).expect("pipe");
    let (_carrier_in, carrier_out) =
        Pipe::new::<(Connection<u32>, Unencodable)>(false).expect("carrier");
    let sent = carrier_out.send(&(writer.clone(), Unencodable));
    assert!(matches!(sent, Err(Error::Codec { .. })), "{sent:?}");
    writer.close().expect("close");
    assert_prompt_end_of_file(&reader, "a message that did not encode");
}

// ----------------------------------------------------------------------------- outages --

/// Redis not running scripts for longer than the lease (`CLIENT PAUSE WRITE`, as a failover
/// does) is nobody's death: the holds of the live ends are renewed when it ends, the ends stay
/// open and what was sent before is still read, and no end of file comes.
#[test]
fn an_outage_longer_than_the_lease_closes_no_live_end() {
    let server = TestRedis::tcp();
    let _rt = runtime_on(&server);
    let (reader, writer) = Pipe::new::<u32>(false).expect("pipe");
    let (a, b) = Pipe::new::<u32>(true).expect("duplex pipe");
    writer.send(&1).expect("send");
    a.send(&10).expect("send");
    pause_writes(&server.url(), 2 * LEASE.as_millis() as u64);
    std::thread::sleep(2 * LEASE + Duration::from_millis(100));
    writer.send(&2).expect("the writer still holds its end");
    assert_eq!(reader.recv().expect("sent before the outage"), 1);
    assert_eq!(reader.recv().expect("sent after it"), 2);
    assert!(
        !reader
            .poll(Some(Duration::from_millis(300)))
            .expect("no end of file: the writer lives"),
    );
    assert_eq!(b.recv().expect("sent before the outage"), 10);
    b.send(&20).expect("both ends of the duplex pipe are open");
    assert_eq!(a.recv().expect("recv"), 20);
}

/// A holder that died just before an outage longer than the lease is still reaped, about a
/// lease after the outage ended: the other end reads end of file.
#[test]
fn a_holder_that_died_before_an_outage_is_reaped_a_lease_after_it() {
    let server = TestRedis::tcp();
    let _rt = runtime_on(&server);
    let (reader, writer) = Pipe::new::<u32>(false).expect("pipe");
    let ready = Event::new().expect("event");
    let p = Process::new(hold_and_wait, (writer.clone(), ready.clone()));
    p.start().expect("start");
    writer.close().expect("close");
    assert!(ready.wait(Some(Duration::from_secs(20))).expect("ready"));
    assert_eq!(reader.recv().expect("recv"), 7);
    p.kill().expect("SIGKILL");
    p.join(None).expect("join");
    pause_writes(&server.url(), 2 * LEASE.as_millis() as u64);
    std::thread::sleep(2 * LEASE + Duration::from_millis(100));
    let started = Instant::now();
    assert!(
        matches!(reader.recv(), Err(Error::Closed(_))),
        "EOF once the lease lapsed after the outage"
    );
    let waited = started.elapsed();
    assert!(
        waited < LEASE + Duration::from_secs(3),
        "EOF after {waited:?} (lease {LEASE:?})"
    );
}
