//! The Kafka implementation of the log contract, against a real broker.
//!
//! The broker address comes from `HARTONOMOUS_TEST_KAFKA` (default
//! `127.0.0.1:19092`; `tests/services.sh up` starts one). Tests that need it
//! fail with a message saying so when it is unreachable. Every test uses its
//! own topics and groups, so they run in parallel, and every wait has a
//! deadline.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use hartonomous::log::kafka::{KafkaConfig, KafkaConsumer, KafkaProducer, ensure_topics};
use hartonomous::log::{LogConsumer, LogError, LogProducer, RevokeHandler};
use hartonomous::record::{Headers, OutgoingRecord, Position, Record, TopicPartition};
use tokio::time::Instant;

/// The longest any single wait in these tests may take.
const DEADLINE: Duration = Duration::from_secs(60);

fn bootstrap() -> String {
    std::env::var("HARTONOMOUS_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

/// The test configuration; fails the test when no broker answers. Logs go
/// to the test output (`RUST_LOG=hartonomous=debug` shows rebalances).
fn broker() -> KafkaConfig {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    let addr = bootstrap();
    let reachable = addr
        .split(',')
        .filter_map(|a| a.trim().to_socket_addrs().ok())
        .flatten()
        .any(|sa| TcpStream::connect_timeout(&sa, Duration::from_secs(3)).is_ok());
    assert!(
        reachable,
        "no Kafka broker reachable at {addr}: start one with `tests/services.sh up`, or set HARTONOMOUS_TEST_KAFKA to a broker's host:port"
    );
    let mut c = KafkaConfig::new(addr);
    // tansu joins a group in about a second with these (INFRA.md); real Kafka needs 6000 or more.
    c.session_timeout_ms = 2000;
    c.heartbeat_interval_ms = 200;
    c.statistics_interval_ms = 200;
    c.properties.insert("message.timeout.ms".into(), "30000".into());
    c
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

async fn topic(config: &KafkaConfig, prefix: &str, partitions: i32) -> String {
    let name = unique(prefix);
    ensure_topics(config, &[(&name, partitions)]).await.expect("create topic");
    name
}

fn rec(topic: &str, partition: Option<i32>, key: &str, payload: &str) -> OutgoingRecord {
    OutgoingRecord { topic: topic.into(), partition, key: Some(key.into()), payload: payload.into(), ..Default::default() }
}

async fn send_all(producer: &KafkaProducer, records: &[OutgoingRecord]) -> Vec<Position> {
    let sent = tokio::time::timeout(DEADLINE, join_all(records.iter().map(|r| producer.send(r.clone())))).await.expect("sends timed out");
    sent.into_iter().collect::<Result<Vec<_>, _>>().expect("send")
}

/// Polls until `want` says enough, or fails after the deadline.
async fn poll_until(c: &mut KafkaConsumer, got: &mut Vec<Record>, what: &str, want: impl Fn(&[Record], &KafkaConsumer) -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !want(got, c) {
        assert!(
            Instant::now() < deadline,
            "{what}: not reached within {DEADLINE:?}; got {} records, assignment {:?}",
            got.len(),
            c.assignment()
        );
        got.extend(c.poll(500, Duration::from_millis(200)).await.expect("poll"));
    }
}

fn offsets_of(records: &[Record], tp: &TopicPartition) -> Vec<i64> {
    records.iter().filter(|r| &r.position.tp == tp).map(|r| r.position.offset).collect()
}

fn header_seq(r: &Record) -> usize {
    r.headers.get_str("seq").and_then(|s| s.parse().ok()).expect("seq header")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_keyed_records_come_back_exactly_with_headers_in_partition_order() {
    let config = broker();
    let t = topic(&config, "roundtrip", 3).await;
    ensure_topics(&config, &[(&t, 3)]).await.expect("creating an existing topic is fine");
    let producer = KafkaProducer::new(&config).unwrap();

    let outgoing: Vec<OutgoingRecord> = (0..1000)
        .map(|i| {
            let mut headers = Headers::new();
            headers.insert("seq", i.to_string());
            headers.push_raw("absent".into(), None);
            headers.insert("dup", "first");
            headers.insert("dup", vec![0u8, 255, 7]);
            headers.insert("empty", Vec::new());
            let mut payload = format!("payload-{i}").into_bytes();
            payload.extend([0u8, 255, 0]);
            OutgoingRecord {
                topic: t.clone(),
                partition: None,
                key: Some(format!("key-{}", i % 17).into_bytes()),
                payload,
                headers,
                event_time_ms: Some(1_700_000_000_000 + i as i64),
            }
        })
        .collect();
    let positions = send_all(&producer, &outgoing).await;

    // The idempotent producer keeps send order within each partition.
    let mut last: BTreeMap<TopicPartition, i64> = BTreeMap::new();
    for p in &positions {
        if let Some(prev) = last.insert(p.tp.clone(), p.offset) {
            assert!(p.offset > prev, "{} sent out of order: {} after {prev}", p.tp, p.offset);
        }
    }
    // One key, one partition.
    let mut key_partition: BTreeMap<&[u8], i32> = BTreeMap::new();
    for (o, p) in outgoing.iter().zip(&positions) {
        let first = *key_partition.entry(o.key.as_deref().unwrap()).or_insert(p.tp.partition);
        assert_eq!(first, p.tp.partition, "records of one key went to two partitions");
    }

    let mut consumer = KafkaConsumer::new(&config, &unique("roundtrip-group"), &[&t]).unwrap();
    let mut got = Vec::new();
    poll_until(&mut consumer, &mut got, "consume 1000", |g, _| g.len() >= 1000).await;
    assert_eq!(got.len(), 1000, "more records than produced");

    let mut seen = BTreeSet::new();
    for r in &got {
        let i = header_seq(r);
        assert!(seen.insert(i), "record {i} delivered twice");
        let o = &outgoing[i];
        let expected = Record {
            position: positions[i].clone(),
            key: o.key.clone(),
            payload: o.payload.clone(),
            headers: o.headers.clone(),
            event_time_ms: o.event_time_ms.unwrap(),
        };
        assert_eq!(r, &expected);
    }
    assert_eq!(consumer.assignment().len(), 3);
    for tp in consumer.assignment() {
        let offs = offsets_of(&got, &tp);
        assert!(offs.windows(2).all(|w| w[1] > w[0]), "{tp} delivered out of order");
        let seqs: Vec<usize> = got.iter().filter(|r| r.position.tp == tp).map(header_seq).collect();
        assert!(seqs.windows(2).all(|w| w[1] > w[0]), "{tp}: send order lost");
    }
    // The absent header value and the repeated key survive as such.
    let r = &got[0];
    let all: Vec<(&str, Option<&[u8]>)> = r.headers.iter().collect();
    assert_eq!(all[1], ("absent", None));
    assert_eq!(all[2..4], [("dup", Some(&b"first"[..])), ("dup", Some(&[0u8, 255, 7][..]))]);
    assert_eq!(all[4], ("empty", Some(&b""[..])));
    consumer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_consumer_in_the_group_resumes_exactly_after_the_committed_offsets() {
    let config = broker();
    let t = topic(&config, "resume", 2).await;
    let producer = KafkaProducer::new(&config).unwrap();
    let records: Vec<_> = (0..30).map(|i| rec(&t, Some(i % 2), &format!("k{i}"), &format!("v{i}"))).collect();
    send_all(&producer, &records).await;
    let (p0, p1) = (TopicPartition::new(t.as_str(), 0), TopicPartition::new(t.as_str(), 1));
    let group = unique("resume-group");

    let mut first = KafkaConsumer::new(&config, &group, &[&t]).unwrap();
    let mut got = Vec::new();
    poll_until(&mut first, &mut got, "first consumer reads all", |g, _| g.len() >= 30).await;
    let positions = first.positions();
    assert_eq!((positions[&p0].next, positions[&p1].next), (15, 15));
    let commit = BTreeMap::from([(p0.clone(), 5), (p1.clone(), 10)]);
    first.commit(&commit).await.unwrap();
    assert_eq!(first.committed(&[p0.clone(), p1.clone()]).await.unwrap(), commit);
    // A partition this consumer does not own is ignored, not committed.
    let foreign = TopicPartition::new(t.as_str(), 7);
    first.commit(&BTreeMap::from([(foreign.clone(), 3)])).await.unwrap();
    assert!(first.committed(&[foreign]).await.unwrap().is_empty());
    tokio::time::timeout(DEADLINE, first.close()).await.expect("close timed out");

    let mut second = KafkaConsumer::new(&config, &group, &[&t]).unwrap();
    let mut resumed = Vec::new();
    poll_until(&mut second, &mut resumed, "second consumer reads the rest", |g, _| g.len() >= 15).await;
    assert_eq!(offsets_of(&resumed, &p0), (5..15).collect::<Vec<_>>());
    assert_eq!(offsets_of(&resumed, &p1), (10..15).collect::<Vec<_>>());
    assert_eq!(resumed.len(), 15);
    assert_eq!(second.committed(&[p0, p1]).await.unwrap(), commit, "reading does not commit");
    second.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_partition_delivers_nothing_until_resumed() {
    let config = broker();
    let t = topic(&config, "pause", 2).await;
    let producer = KafkaProducer::new(&config).unwrap();
    let batch =
        |from: usize| -> Vec<OutgoingRecord> { (from..from + 20).map(|i| rec(&t, Some((i % 2) as i32), "k", &format!("v{i}"))).collect() };
    send_all(&producer, &batch(0)).await;
    let (p0, p1) = (TopicPartition::new(t.as_str(), 0), TopicPartition::new(t.as_str(), 1));

    let mut c = KafkaConsumer::new(&config, &unique("pause-group"), &[&t]).unwrap();
    // Take records one at a time until p0 has given one: the rest of p0 is
    // then typically fetched already and waiting inside librdkafka.
    let mut before = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    while offsets_of(&before, &p0).is_empty() {
        assert!(Instant::now() < deadline, "no record from {p0} within {DEADLINE:?}");
        before.extend(c.poll(1, Duration::from_millis(200)).await.unwrap());
    }
    c.pause(std::slice::from_ref(&p0)).unwrap();
    let p0_before = offsets_of(&before, &p0);
    assert_eq!(c.positions()[&p0].next, p0_before.len() as i64);

    let mut while_paused = Vec::new();
    poll_until(&mut c, &mut while_paused, "p1 keeps flowing", |g, _| offsets_of(&before, &p1).len() + offsets_of(g, &p1).len() >= 10).await;
    send_all(&producer, &batch(20)).await;
    poll_until(&mut c, &mut while_paused, "p1 keeps flowing after more records", |g, _| {
        offsets_of(&before, &p1).len() + offsets_of(g, &p1).len() >= 20
    })
    .await;
    // A few more polls: nothing from p0 may slip through.
    for _ in 0..5 {
        while_paused.extend(c.poll(500, Duration::from_millis(200)).await.unwrap());
    }
    assert_eq!(offsets_of(&while_paused, &p0), Vec::<i64>::new(), "records from a paused partition");
    let p1_all: Vec<i64> = offsets_of(&before, &p1).into_iter().chain(offsets_of(&while_paused, &p1)).collect();
    assert_eq!(p1_all, (0..20).collect::<Vec<_>>());
    assert_eq!(c.positions()[&p0].next, p0_before.len() as i64);

    c.resume(std::slice::from_ref(&p0)).unwrap();
    let mut after = Vec::new();
    poll_until(&mut c, &mut after, "p0 after resume", |g, _| p0_before.len() + offsets_of(g, &p0).len() >= 20).await;
    let p0_all: Vec<i64> = p0_before.iter().copied().chain(offsets_of(&after, &p0)).collect();
    assert_eq!(p0_all, (0..20).collect::<Vec<_>>(), "resume restarts exactly where the partition stopped");
    assert_eq!(offsets_of(&after, &p1), Vec::<i64>::new());
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_report_the_next_offset_and_the_log_end_and_lag_follows_commits() {
    let config = broker();
    let t = topic(&config, "positions", 1).await;
    let producer = KafkaProducer::new(&config).unwrap();
    // Two sends, so the log holds two batches: the end must be past the last one.
    let records: Vec<_> = (0..20).map(|i| rec(&t, None, "k", &format!("v{i}"))).collect();
    send_all(&producer, &records[..10]).await;
    send_all(&producer, &records[10..]).await;
    let tp = TopicPartition::new(t.as_str(), 0);

    let mut c = KafkaConsumer::new(&config, &unique("positions-group"), &[&t]).unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    while got.len() < 5 {
        assert!(Instant::now() < deadline, "no records within {DEADLINE:?}");
        got.extend(c.poll(5 - got.len(), Duration::from_millis(200)).await.unwrap());
    }
    assert_eq!(offsets_of(&got, &tp), (0..5).collect::<Vec<_>>());
    // Hold the partition still, and keep polling so that statistics arrive.
    c.pause(std::slice::from_ref(&tp)).unwrap();
    let mut more = Vec::new();
    poll_until(&mut c, &mut more, "statistics with the log end", |_, c| c.positions()[&tp].end.is_some()).await;
    assert!(more.is_empty());
    let p = c.positions()[&tp];
    assert_eq!((p.next, p.end), (5, Some(20)));
    assert!(c.lag().is_empty(), "no lag before the group commits: {:?}", c.lag());

    c.commit(&BTreeMap::from([(tp.clone(), 5)])).await.unwrap();
    poll_until(&mut c, &mut more, "lag after the commit", |_, c| c.lag().contains_key(&tp)).await;
    assert_eq!(c.lag()[&tp], 15);
    c.close().await;
}

type Calls = Arc<Mutex<Vec<Vec<TopicPartition>>>>;

/// A revoke handler that records its calls and asks to commit `base + partition`.
fn recording_handler(base: i64) -> (RevokeHandler, Calls) {
    let calls: Calls = Arc::default();
    let seen = calls.clone();
    let handler: RevokeHandler = Arc::new(move |tps: &[TopicPartition]| {
        seen.lock().unwrap().push(tps.to_vec());
        tps.iter().map(|tp| (tp.clone(), base + i64::from(tp.partition))).collect()
    });
    (handler, calls)
}

fn revoked(calls: &Calls) -> BTreeSet<TopicPartition> {
    calls.lock().unwrap().iter().flatten().cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_members_split_partitions_and_revoked_offsets_are_committed_before_hand_over() {
    let config = broker();
    let t = topic(&config, "rebalance", 4).await;
    let producer = KafkaProducer::new(&config).unwrap();
    let records: Vec<_> = (0..40).map(|i| rec(&t, Some(i % 4), "k", &format!("v{i}"))).collect();
    send_all(&producer, &records).await;
    let all: BTreeSet<TopicPartition> = (0..4).map(|p| TopicPartition::new(t.as_str(), p)).collect();
    let group = unique("rebalance-group");

    let mut c1 = KafkaConsumer::new(&config, &group, &[&t]).unwrap();
    let (h1, calls1) = recording_handler(1);
    c1.set_revoke_handler(h1);
    let mut got1 = Vec::new();
    poll_until(&mut c1, &mut got1, "c1 owns every partition", |_, c| c.assignment().len() == 4).await;

    let mut c2 = KafkaConsumer::new(&config, &group, &[&t]).unwrap();
    let (h2, calls2) = recording_handler(5);
    c2.set_revoke_handler(h2);
    let mut got2 = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (a1, a2): (BTreeSet<_>, BTreeSet<_>) = (c1.assignment().into_iter().collect(), c2.assignment().into_iter().collect());
        if !a1.is_empty() && !a2.is_empty() && a1.is_disjoint(&a2) && a1.len() + a2.len() == 4 {
            break;
        }
        assert!(Instant::now() < deadline, "the group did not split: c1 {a1:?}, c2 {a2:?}");
        let (r1, r2) = tokio::join!(c1.poll(500, Duration::from_millis(100)), c2.poll(500, Duration::from_millis(100)));
        got1.extend(r1.unwrap());
        got2.extend(r2.unwrap());
    }
    let owned2: BTreeSet<TopicPartition> = c2.assignment().into_iter().collect();
    let owned1: BTreeSet<TopicPartition> = c1.assignment().into_iter().collect();
    assert_eq!(owned1.union(&owned2).cloned().collect::<BTreeSet<_>>(), all);
    assert!(revoked(&calls1).is_superset(&owned2), "c1's handler was not asked about {owned2:?}: {:?}", calls1.lock().unwrap());
    // What c1's handler returned was committed before c2 started reading.
    let expected2: BTreeMap<TopicPartition, i64> = owned2.iter().map(|tp| (tp.clone(), 1 + i64::from(tp.partition))).collect();
    assert_eq!(c2.committed(&owned2.iter().cloned().collect::<Vec<_>>()).await.unwrap(), expected2);
    poll_until(&mut c2, &mut got2, "c2 reads its partitions", |g, _| {
        owned2.iter().all(|tp| offsets_of(g, tp).len() as i64 == 10 - (1 + i64::from(tp.partition)))
    })
    .await;
    for tp in &owned2 {
        assert_eq!(offsets_of(&got2, tp), (1 + i64::from(tp.partition)..10).collect::<Vec<_>>(), "{tp} did not start at the revoke commit");
    }
    assert!(calls2.lock().unwrap().is_empty());

    // c2 leaves: its handler runs for all it owns, and c1 takes everything back.
    let closing = tokio::spawn(c2.close());
    let mut back = Vec::new();
    poll_until(&mut c1, &mut back, "c1 owns every partition again", |_, c| c.assignment().len() == 4).await;
    tokio::time::timeout(DEADLINE, closing).await.expect("close timed out").unwrap();
    assert_eq!(revoked(&calls2), owned2, "c2's handler: {:?}", calls2.lock().unwrap());
    let expected: BTreeMap<TopicPartition, i64> = owned2.iter().map(|tp| (tp.clone(), 5 + i64::from(tp.partition))).collect();
    assert_eq!(c1.committed(&owned2.iter().cloned().collect::<Vec<_>>()).await.unwrap(), expected);
    poll_until(&mut c1, &mut back, "c1 reads the handed-back partitions", |g, _| {
        owned2.iter().all(|tp| offsets_of(g, tp).len() as i64 == 10 - (5 + i64::from(tp.partition)))
    })
    .await;
    for tp in &owned2 {
        assert_eq!(
            offsets_of(&back, tp),
            (5 + i64::from(tp.partition)..10).collect::<Vec<_>>(),
            "{tp} did not resume at c2's revoke commit"
        );
    }
    c1.close().await;
}

/// librdkafka keeps a partition's pause across revoke and re-assignment;
/// the consumer must not: a partition paused when it went to another member
/// (or when the session timed out during a broker outage) is fetched again
/// when it comes back, once the owner's intent says resumed. This is how the
/// runner resumes (its current assignment), and before the fix the handed-
/// back partition was never fetched again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_paused_when_revoked_is_fetched_again_when_it_comes_back() {
    let config = broker();
    let t = topic(&config, "repause", 2).await;
    let producer = KafkaProducer::new(&config).unwrap();
    let records: Vec<_> = (0..20).map(|i| rec(&t, Some(i % 2), "k", &format!("v{i}"))).collect();
    send_all(&producer, &records).await;
    let group = unique("repause-group");

    let mut c1 = KafkaConsumer::new(&config, &group, &[&t]).unwrap();
    let mut ignored = Vec::new();
    poll_until(&mut c1, &mut ignored, "c1 owns both partitions", |_, c| c.assignment().len() == 2).await;
    c1.pause(&c1.assignment()).unwrap();

    let mut c2 = KafkaConsumer::new(&config, &group, &[&t]).unwrap();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (a1, a2) = (c1.assignment(), c2.assignment());
        if a1.len() == 1 && a2.len() == 1 && a1 != a2 {
            break;
        }
        assert!(Instant::now() < deadline, "the group did not split: c1 {a1:?}, c2 {a2:?}");
        let (r1, r2) = tokio::join!(c1.poll(500, Duration::from_millis(100)), c2.poll(500, Duration::from_millis(100)));
        ignored.extend(r1.unwrap());
        r2.unwrap();
    }
    let moved = c2.assignment().remove(0);
    // Backpressure over: the runner resumes what it owns now.
    c1.resume(&c1.assignment()).unwrap();

    let closing = tokio::spawn(c2.close());
    let mut back = Vec::new();
    poll_until(&mut c1, &mut back, "c1 owns both partitions again", |_, c| c.assignment().len() == 2).await;
    tokio::time::timeout(DEADLINE, closing).await.expect("close timed out").unwrap();
    // Nothing was committed, so the handed-back partition is read from its start.
    poll_until(&mut c1, &mut back, "c1 reads the partition it got back", |g, _| offsets_of(g, &moved).len() >= 10).await;
    assert_eq!(offsets_of(&back, &moved), (0..10).collect::<Vec<_>>());
    c1.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicit_partition_is_honoured() {
    let config = broker();
    let t = topic(&config, "explicit", 3).await;
    let producer = KafkaProducer::new(&config).unwrap();
    let records: Vec<_> = (0..9).map(|i| rec(&t, Some(2), &format!("key-{i}"), &format!("v{i}"))).collect();
    let positions = send_all(&producer, &records).await;
    let tp2 = TopicPartition::new(t.as_str(), 2);
    assert!(positions.iter().all(|p| p.tp == tp2), "{positions:?}");
    assert_eq!(positions.iter().map(|p| p.offset).collect::<Vec<_>>(), (0..9).collect::<Vec<_>>());

    let mut c = KafkaConsumer::new(&config, &unique("explicit-group"), &[&t]).unwrap();
    let mut got = Vec::new();
    poll_until(&mut c, &mut got, "9 records", |g, _| g.len() >= 9).await;
    assert_eq!(offsets_of(&got, &tp2), (0..9).collect::<Vec<_>>());
    assert_eq!(got.iter().map(|r| r.payload.clone()).collect::<Vec<_>>(), records.iter().map(|r| r.payload.clone()).collect::<Vec<_>>());
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producing_to_a_partition_that_does_not_exist_is_fatal() {
    let config = broker();
    let t = topic(&config, "nopartition", 1).await;
    let producer = KafkaProducer::new(&config).unwrap();
    let err = tokio::time::timeout(DEADLINE, producer.send(rec(&t, Some(5), "k", "v"))).await.expect("send timed out").unwrap_err();
    assert!(matches!(err, LogError::Fatal(_)), "{err:?}");
    assert!(err.to_string().contains(&t), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_larger_than_the_broker_accepts_is_rejected_for_the_dead_letter_topic() {
    let config = broker();
    let t = topic(&config, "oversized", 1).await;
    let producer = KafkaProducer::new(&config).unwrap();
    let big = OutgoingRecord { topic: t.clone(), payload: vec![7u8; 2 << 20], ..Default::default() };
    let err = tokio::time::timeout(DEADLINE, producer.send(big)).await.expect("send timed out").unwrap_err();
    assert!(matches!(err, LogError::Rejected(_)), "{err:?}");
    // The producer stays usable.
    let ok = send_all(&producer, &[rec(&t, None, "k", "small")]).await;
    assert_eq!(ok[0].offset, 0);
}

#[tokio::test]
async fn configuration_owned_by_hartonomous_is_refused_with_the_reason() {
    // No broker needed: nothing connects before the check.
    let mut config = KafkaConfig::new("127.0.0.1:1");
    config.properties.insert("enable.auto.commit".into(), "true".into());
    let e = config.check().unwrap_err();
    assert!(e.contains("enable.auto.commit") && e.contains("acknowledged"), "{e}");
    let Err(LogError::Fatal(m)) = KafkaConsumer::new(&config, "g", &["t"]) else { panic!("consumer accepted enable.auto.commit") };
    assert!(m.contains("enable.auto.commit"), "{m}");
    let Err(LogError::Fatal(m)) = KafkaProducer::new(&config) else { panic!("producer accepted enable.auto.commit") };
    assert!(m.contains("enable.auto.commit"), "{m}");

    let mut config = KafkaConfig::new("127.0.0.1:1");
    config.properties_env.insert("sasl.password".into(), "HARTONOMOUS_KAFKA_TEST_NO_SUCH_VARIABLE".into());
    let Err(LogError::Fatal(m)) = KafkaProducer::new(&config) else { panic!("missing secret variable accepted") };
    assert!(m.contains("HARTONOMOUS_KAFKA_TEST_NO_SUCH_VARIABLE"), "{m}");
}

/// `hartonomous lag`: per partition the group's committed offset, the end
/// and the lag, read from outside the group. Records go in concurrently, so
/// the broker stores them in batches: tansu's ListOffsets answer (start of
/// the last batch + 1) would undercount the end, which the tail read corrects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_reports_committed_end_and_lag_per_partition() {
    use hartonomous::log::kafka::group_lag;
    let config = broker();
    let t = topic(&config, "lag", 3).await;
    let producer = KafkaProducer::new(&config).unwrap();
    let records: Vec<_> = (0..3).flat_map(|p| (0..(p + 1) * 10).map(move |i| (p, i))).map(|(p, i)| rec(&t, Some(p), &format!("k{i}"), "v")).collect();
    send_all(&producer, &records).await;
    let tp = |p| TopicPartition::new(t.as_str(), p);
    let group = unique("lag-group");
    let mut c = KafkaConsumer::new(&config, &group, &[&t]).unwrap();
    let mut got = Vec::new();
    poll_until(&mut c, &mut got, "the consumer is assigned everything", |g, _| g.len() >= 60).await;
    let commit = BTreeMap::from([(tp(0), 5), (tp(2), 30)]);
    c.commit(&commit).await.unwrap();
    tokio::time::timeout(DEADLINE, c.close()).await.expect("close timed out");

    // Named topic: every partition, a never-committed one counting from the start.
    let rows = group_lag(&config, &group, &[t.clone()]).await.unwrap();
    let seen: Vec<(i32, Option<i64>, i64, i64)> = rows.iter().map(|r| (r.tp.partition, r.committed, r.end, r.lag())).collect();
    assert_eq!(seen, vec![(0, Some(5), 10, 5), (1, None, 20, 20), (2, Some(30), 30, 0)]);
    // No topic named: the partitions the group committed on (other tests'
    // topics have other groups, so none of theirs).
    let rows = group_lag(&config, &group, &[]).await.unwrap();
    assert_eq!(rows.iter().map(|r| (r.tp.clone(), r.lag())).collect::<Vec<_>>(), vec![(tp(0), 5), (tp(2), 0)]);
    // An unknown topic is an error that names it.
    let err = group_lag(&config, &group, &["no-such-topic-for-lag".to_string()]).await.unwrap_err();
    assert!(err.to_string().contains("no-such-topic-for-lag"), "{err}");

    // The command prints the same table.
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("profile.toml");
    let sections = "[store]\nkind = \"embedded\"\n[registry]\nkind = \"file\"\n[embedder]\nkind = \"hashing\"\ndimension = 8\n";
    std::fs::write(&profile, format!("[log]\nkind = \"kafka\"\nbootstrap_servers = \"{}\"\n{sections}", bootstrap())).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hartonomous"))
        .args(["--connectors", profile.to_str().unwrap(), "lag", "--group", &group, "--topic", &t])
        .env("HARTONOMOUS_DATA_DIR", dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let line = |p: i32| stdout.lines().find(|l| l.split_whitespace().take(2).eq([t.as_str(), &p.to_string()])).unwrap_or_else(|| panic!("no row for {p}:\n{stdout}")).split_whitespace().skip(2).collect::<Vec<_>>().join(" ");
    assert_eq!(line(0), "5 10 5");
    assert_eq!(line(1), "- 20 20");
    assert_eq!(line(2), "30 30 0");
    assert!(stdout.contains("total lag 25"), "{stdout}");
}

/// A profile naming only the broker and the embedded defaults, for the CLI.
fn cli_profile(dir: &std::path::Path) -> std::path::PathBuf {
    let profile = dir.join("profile.toml");
    let sections = "[store]\nkind = \"embedded\"\n[registry]\nkind = \"file\"\n[embedder]\nkind = \"hashing\"\ndimension = 8\n";
    std::fs::write(&profile, format!("[log]\nkind = \"kafka\"\nbootstrap_servers = \"{}\"\n{sections}", bootstrap())).unwrap();
    profile
}

fn cli(dir: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hartonomous"))
        .arg("--connectors")
        .arg(cli_profile(dir))
        .args(args)
        .env("HARTONOMOUS_DATA_DIR", dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{args:?}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// `dlq inspect` groups a real dead-letter topic by stage and reason;
/// `dlq redrive` copies the chosen dead letters back to their source topic
/// and partition with their bytes and headers and a redrive count, refuses
/// one redriven to the limit and a truncated copy, and a second run finds
/// nothing new (its group committed its place).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_inspect_groups_and_redrive_copies_back_once_within_the_limit() {
    use hartonomous::dead_letter::{DeadLetter, H_TRUNCATED};
    use hartonomous::dlq::{H_REDRIVE_COUNT, H_REDRIVE_FROM};
    let config = broker();
    let source = topic(&config, "redrive-src", 3).await;
    let dlq = topic(&config, "redrive-dlq", 2).await;
    let elsewhere = topic(&config, "redrive-to", 1).await;
    let dead = |reason: &str, partition: i32, offset: i64, extra: &[(&str, &str)]| {
        let mut headers = Headers::new();
        headers.insert("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        for (k, v) in extra {
            headers.insert(*k, *v);
        }
        let record = Record {
            position: Position { tp: TopicPartition::new(source.as_str(), partition), offset },
            key: Some(format!("key-{partition}-{offset}").into_bytes()),
            payload: format!("payload {partition}/{offset}").into_bytes(),
            headers,
            event_time_ms: 1,
        };
        let stage = if reason.starts_with("embed") { "embed" } else { "validate" };
        DeadLetter { topology: "atom-ingestion", record: &record, stage, reason, error: "why", attempts: 1, failed_at_ms: 10 }.to_outgoing(&dlq)
    };
    let letters = vec![
        dead("embed.unavailable", 0, 5, &[]),
        dead("embed.unavailable", 1, 6, &[]),
        dead("embed.unavailable", 2, 7, &[(H_REDRIVE_COUNT, "1")]),
        dead("embed.unavailable", 2, 8, &[]),
        dead("embed.unavailable", 0, 9, &[(H_REDRIVE_COUNT, "3")]),
        dead("embed.unavailable", 1, 10, &[(H_TRUNCATED, "9000000")]),
        dead("validate.empty", 0, 11, &[]),
        dead("validate.empty", 1, 12, &[]),
    ];
    let producer = KafkaProducer::new(&config).unwrap();
    send_all(&producer, &letters).await;
    let dir = tempfile::tempdir().unwrap();

    let inspect: serde_json::Value = serde_json::from_str(&cli(dir.path(), &["dlq", "inspect", "--topic", &dlq, "--json"])).unwrap();
    assert_eq!(inspect["total"], 8, "{inspect}");
    let groups: Vec<(String, u64)> = inspect["groups"].as_array().unwrap().iter().map(|g| (g["reason"].as_str().unwrap().to_string(), g["count"].as_u64().unwrap())).collect();
    assert_eq!(groups, vec![("embed.unavailable".to_string(), 6), ("validate.empty".to_string(), 2)]);
    assert_eq!(inspect["groups"][0]["examples"][0]["source_topic"], source.as_str(), "{inspect}");
    assert!(cli(dir.path(), &["dlq", "inspect", "--topic", &dlq]).contains("embed / embed.unavailable"));

    let report = cli(dir.path(), &["dlq", "redrive", "--topic", &dlq, "--reason", "embed.unavailable", "--max-redrives", "3", "--group", "redrive-a"]);
    assert!(report.contains("read 8 record(s); redriven 4"), "{report}");
    assert!(report.contains("refused: 1 redriven 3 time(s) already (the limit), 1 truncated"), "{report}");
    assert!(report.contains("left alone: 2 with another reason"), "{report}");

    // Exactly the four, each in its source partition, bytes and headers intact.
    let mut reader = KafkaConsumer::new(&config, &unique("redrive-reader"), &[&source]).unwrap();
    let mut got = Vec::new();
    poll_until(&mut reader, &mut got, "the redriven records", |g, _| g.len() >= 4).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    poll_until(&mut reader, &mut got, "no more", |_, _| true).await;
    let mut seen: Vec<(i32, String, String, String)> = got
        .iter()
        .map(|r| {
            let payload = String::from_utf8(r.payload.clone()).unwrap();
            assert_eq!(r.key.as_deref(), Some(format!("key-{}", payload.trim_start_matches("payload ").replace('/', "-")).as_bytes()));
            assert_eq!(r.headers.get_str("traceparent"), Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"));
            assert!(r.headers.get_str(H_REDRIVE_FROM).is_some_and(|f| f.starts_with(&format!("{dlq}/"))));
            (r.position.tp.partition, payload, r.headers.get_str(H_REDRIVE_COUNT).unwrap().to_string(), r.headers.get_str(hartonomous::dead_letter::H_REASON).unwrap().to_string())
        })
        .collect();
    seen.sort();
    let reason = "embed.unavailable".to_string();
    assert_eq!(
        seen,
        vec![
            (0, "payload 0/5".to_string(), "1".to_string(), reason.clone()),
            (1, "payload 1/6".to_string(), "1".to_string(), reason.clone()),
            (2, "payload 2/7".to_string(), "2".to_string(), reason.clone()),
            (2, "payload 2/8".to_string(), "1".to_string(), reason.clone()),
        ]
    );
    reader.close().await;

    // The same group again: nothing new. Another group, elsewhere: the other reason.
    let again = cli(dir.path(), &["dlq", "redrive", "--topic", &dlq, "--reason", "embed.unavailable", "--group", "redrive-a"]);
    assert!(again.contains("read 0 record(s); redriven 0"), "{again}");
    let other = cli(dir.path(), &["dlq", "redrive", "--topic", &dlq, "--reason", "validate.empty", "--to", &elsewhere, "--group", "redrive-b"]);
    assert!(other.contains("redriven 2") && other.contains(&format!("2 to {elsewhere}")), "{other}");
}
