//! The bus against a real Redis server: messages cross instances (and never come back to their
//! sender), a Redis restart or a join while Redis is down ends in a resync, a gap in a stream is
//! noticed, and an instance that stops heartbeating is reported gone.

mod support;

use std::time::Duration;

use bytes::Bytes;
use moai_cluster::{Bus, BusConfig, BusEvent, BusStatus, Topic};
use support::redis::RedisServer;

fn config(redis: &RedisServer) -> BusConfig {
    let mut c = BusConfig::new(redis.url());
    c.heartbeat_interval = Duration::from_millis(100);
    c.instance_ttl = Duration::from_millis(500);
    c.gap_check_interval = Duration::from_millis(100);
    c.read_block = Duration::from_millis(50);
    c.reconnect_min = Duration::from_millis(20);
    c.reconnect_max = Duration::from_millis(200);
    c
}

async fn connected(bus: &Bus) {
    let mut status = bus.status();
    tokio::time::timeout(Duration::from_secs(10), status.wait_for(|s| *s == BusStatus::Connected))
        .await
        .expect("the bus connects")
        .unwrap();
}

async fn next(topic: &mut Topic) -> BusEvent {
    tokio::time::timeout(Duration::from_secs(10), topic.recv()).await.expect("an event within 10 s").expect("open")
}

/// Waits for an event matching `want`, skipping others (resyncs after reconnects, say).
async fn next_matching(topic: &mut Topic, want: impl Fn(&BusEvent) -> bool) -> BusEvent {
    loop {
        let e = next(topic).await;
        if want(&e) {
            return e;
        }
    }
}

#[tokio::test]
async fn messages_cross_instances_and_never_return_to_their_sender() {
    let redis = RedisServer::start();
    let (a, b) = (Bus::start(config(&redis)).unwrap(), Bus::start(config(&redis)).unwrap());
    connected(&a).await;
    connected(&b).await;
    let mut ta = a.join("doc").await;
    let mut tb = b.join("doc").await;
    let _other = b.join("other").await;

    ta.publish(b'u', Bytes::from_static(b"from a"));
    assert_eq!(
        next(&mut tb).await,
        BusEvent::Message { from: a.instance(), kind: b'u', payload: Bytes::from_static(b"from a") }
    );
    tb.publish(b'a', Bytes::from_static(b"from b"));
    // A's first event is B's message: its own never came back.
    assert_eq!(
        next(&mut ta).await,
        BusEvent::Message { from: b.instance(), kind: b'a', payload: Bytes::from_static(b"from b") }
    );
    // In order, many of them.
    for i in 0..300u32 {
        ta.publish(b'u', Bytes::from(i.to_be_bytes().to_vec()));
    }
    for i in 0..300u32 {
        match next(&mut tb).await {
            BusEvent::Message { payload, .. } => assert_eq!(&payload[..], &i.to_be_bytes()),
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_redis_restart_degrades_the_bus_then_every_topic_resyncs_and_messages_flow_again() {
    let mut redis = RedisServer::start();
    let (a, b) = (Bus::start(config(&redis)).unwrap(), Bus::start(config(&redis)).unwrap());
    connected(&a).await;
    connected(&b).await;
    let ta = a.join("doc").await;
    let mut tb = b.join("doc").await;
    redis.stop();
    // Both notice before Redis comes back (else one could publish on its dead connection).
    for bus in [&a, &b] {
        let mut status = bus.status();
        tokio::time::timeout(Duration::from_secs(10), status.wait_for(|s| s.is_degraded())).await.unwrap().unwrap();
    }
    // Published while Redis is down: dropped and counted, never queued without bound.
    ta.publish(b'u', Bytes::from_static(b"lost"));
    redis.restart();
    connected(&a).await;
    connected(&b).await;
    assert_eq!(next_matching(&mut tb, |e| *e == BusEvent::Resync).await, BusEvent::Resync);
    ta.publish(b'u', Bytes::from_static(b"after"));
    let got = next_matching(&mut tb, |e| matches!(e, BusEvent::Message { .. })).await;
    assert_eq!(got, BusEvent::Message { from: a.instance(), kind: b'u', payload: Bytes::from_static(b"after") });
    assert!(moai_cluster::BusStats::get(&a.stats().publish_dropped) >= 1);
}

#[tokio::test]
async fn a_topic_joined_while_redis_is_down_resyncs_once_it_is_back() {
    let mut redis = RedisServer::start();
    redis.stop();
    let a = Bus::start(config(&redis)).unwrap();
    let mut ta = a.join("doc").await;
    let mut status = a.status();
    tokio::time::timeout(Duration::from_secs(10), status.wait_for(|s| matches!(s, BusStatus::Degraded(_))))
        .await
        .unwrap()
        .unwrap();
    redis.restart();
    assert_eq!(next(&mut ta).await, BusEvent::Resync);
    let b = Bus::start(config(&redis)).unwrap();
    connected(&b).await;
    let tb = b.join("doc").await;
    tb.publish(b'u', Bytes::from_static(b"hi"));
    let got = next_matching(&mut ta, |e| matches!(e, BusEvent::Message { .. })).await;
    assert_eq!(got, BusEvent::Message { from: b.instance(), kind: b'u', payload: Bytes::from_static(b"hi") });
}

#[tokio::test]
async fn entries_deleted_before_they_were_read_are_a_gap_and_the_topic_resyncs() {
    let redis = RedisServer::start();
    let a = Bus::start(config(&redis)).unwrap();
    connected(&a).await;
    let mut ta = a.join("doc").await;
    // An entry added and deleted in one transaction: the reader can never see it.
    let value = {
        let client = redis::Client::open(redis.url()).unwrap();
        let mut conn = client.get_connection().unwrap();
        redis::pipe()
            .atomic()
            .cmd("XADD")
            .arg("moai:s:doc")
            .arg("*")
            .arg("x")
            .arg("1")
            .cmd("XTRIM")
            .arg("moai:s:doc")
            .arg("MAXLEN")
            .arg(0)
            .query::<redis::Value>(&mut conn)
            .unwrap()
    };
    drop(value);
    assert_eq!(next(&mut ta).await, BusEvent::Resync);
}

#[tokio::test]
async fn an_instance_that_stops_heartbeating_is_reported_gone_where_it_published() {
    let redis = RedisServer::start();
    let (a, b) = (Bus::start(config(&redis)).unwrap(), Bus::start(config(&redis)).unwrap());
    connected(&a).await;
    connected(&b).await;
    let ta = a.join("doc").await;
    let mut tb = b.join("doc").await;
    ta.publish(b'a', Bytes::from_static(b"present"));
    assert!(matches!(next(&mut tb).await, BusEvent::Message { .. }));
    // A stops: its tasks end and its heartbeat key is gone (a killed instance's key expires;
    // crates/moai/tests/cluster.rs kills one).
    a.shutdown().await;
    assert_eq!(next(&mut tb).await, BusEvent::InstanceGone(a.instance()));
}

#[tokio::test]
async fn an_inbox_receives_many_topics_tagged_and_leaves_a_topic_when_its_membership_drops() {
    let redis = RedisServer::start();
    let (a, b) = (Bus::start(config(&redis)).unwrap(), Bus::start(config(&redis)).unwrap());
    connected(&a).await;
    connected(&b).await;
    let mut inbox = b.inbox();
    let one = inbox.join("c:one").await;
    let two = inbox.joiner().join("c:two").await;
    let (pa1, pa2) = (a.join("c:one").await, a.join("c:two").await);
    pa1.publish(b'k', Bytes::from_static(b"1"));
    pa2.publish(b'k', Bytes::from_static(b"2"));
    let mut got = Vec::new();
    for _ in 0..2 {
        let (topic, event) = tokio::time::timeout(Duration::from_secs(10), inbox.recv()).await.unwrap().unwrap();
        let BusEvent::Message { payload, .. } = event else { panic!("{event:?}") };
        got.push((topic.to_string(), payload));
    }
    got.sort();
    assert_eq!(got, vec![("c:one".into(), Bytes::from_static(b"1")), ("c:two".into(), Bytes::from_static(b"2"))]);
    // Left "c:one": only "c:two" arrives.
    drop(one);
    pa1.publish(b'k', Bytes::from_static(b"ignored"));
    pa2.publish(b'k', Bytes::from_static(b"3"));
    let (topic, _) = tokio::time::timeout(Duration::from_secs(10), inbox.recv()).await.unwrap().unwrap();
    assert_eq!(&*topic, "c:two");
    assert_eq!(two.name(), "c:two");
}

/// A topic joined while the reader is blocked on others is read at once, not when the block
/// times out (the first messages of a document an instance just opened used to come late).
#[tokio::test]
async fn a_topic_joined_during_a_blocking_read_gets_its_messages_at_once() {
    let redis = RedisServer::start();
    let mut slow = config(&redis);
    slow.read_block = Duration::from_secs(20);
    let (a, b) = (Bus::start(config(&redis)).unwrap(), Bus::start(slow).unwrap());
    connected(&a).await;
    connected(&b).await;
    let _busy = b.join("other").await; // B's reader now blocks for up to 20 s
    let ta = a.join("doc").await;
    let mut tb = b.join("doc").await;
    ta.publish(b'u', Bytes::from_static(b"now"));
    let got = tokio::time::timeout(Duration::from_secs(3), tb.recv()).await.expect("well before the 20 s block ends");
    assert!(matches!(got, Some(BusEvent::Message { .. })), "{got:?}");
}
