//! One suite, two backends: every case runs against the embedded store and against a real
//! etcd member started for the test. Revisions are compared relative to where each store
//! starts (an empty etcd is at revision 1, an empty embedded store at 0).

use std::sync::Arc;
use std::time::Duration;

use super::{Action, Event, Op, Precondition, Store, StoreError, WatchStream};

/// A store and whatever keeps it alive for the test.
struct Backend {
    store: Arc<dyn Store>,
    _keep: Box<dyn std::any::Any + Send>,
}

impl Backend {
    fn embedded() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(super::Embedded::open(&dir.path().join("s.redb")).unwrap());
        Self {
            store,
            _keep: Box::new(dir),
        }
    }

    async fn etcd() -> Self {
        let etcd = crate::test_util::EtcdProcess::start().await;
        let store = Arc::new(etcd.store().await);
        Self {
            store,
            _keep: Box::new(etcd),
        }
    }
}

macro_rules! on_both_backends {
    ($($case:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let b = super::Backend::embedded();
                    super::$case(&*b.store).await;
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let b = super::Backend::etcd().await;
                    super::$case(&*b.store).await;
                }
            )*
        }
    };
}

on_both_backends!(
    a_transaction_arrives_whole,
    revisions_and_compare_and_swap,
    a_check_fences_a_transaction_without_writing,
    a_transaction_has_a_bounded_size,
    list_is_sorted_by_prefix_across_pages,
    watch_replays_history_then_follows_without_gaps,
    a_watch_from_before_a_compaction_says_so,
    leases_expire_keep_alive_and_revoke,
);

/// The next revision's only event (the tests write one key per transaction).
async fn next(rx: &mut WatchStream) -> Event {
    let mut batch = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("an event in time")
        .expect("the watch is open")
        .expect("no watch error");
    assert_eq!(batch.len(), 1, "{batch:?}");
    batch.remove(0)
}

async fn a_transaction_arrives_whole(s: &dyn Store) {
    let from = s.revision().await.unwrap() + 1;
    let mut rx = s.watch("/", from).await.unwrap();
    let rev = s
        .txn(vec![
            Op::put("/a", b"1".to_vec(), Precondition::Any),
            Op::put("/b", b"2".to_vec(), Precondition::Any),
            Op::put("/other", b"3".to_vec(), Precondition::Any),
        ])
        .await
        .unwrap();
    let batch = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(batch.len(), 3, "{batch:?}");
    assert!(batch.iter().all(|e| e.revision() == rev));
}

async fn revisions_and_compare_and_swap(s: &dyn Store) {
    let base = s.revision().await.unwrap();
    let r1 = s
        .put("/a", b"1".to_vec(), Precondition::Absent)
        .await
        .unwrap();
    let r2 = s
        .put("/a", b"2".to_vec(), Precondition::Revision(r1))
        .await
        .unwrap();
    assert_eq!((r1, r2), (base + 1, base + 2));
    let kv = s.get("/a").await.unwrap().unwrap();
    assert_eq!(
        (kv.create_revision, kv.mod_revision, kv.value.as_slice()),
        (r1, r2, b"2".as_slice())
    );
    let err = s
        .put("/a", b"3".to_vec(), Precondition::Revision(r1))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict { key, actual: Some(a), .. } if key == "/a" && *a == r2),
        "{err}"
    );
    assert!(matches!(
        s.put("/a", b"x".to_vec(), Precondition::Absent).await,
        Err(StoreError::Conflict { .. })
    ));

    // A transaction with one failing precondition writes nothing.
    let err = s
        .txn(vec![
            Op::put("/b", b"b".to_vec(), Precondition::Any),
            Op::put("/a", b"z".to_vec(), Precondition::Revision(r1)),
        ])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict { key, .. } if key == "/a"),
        "{err}"
    );
    assert!(s.get("/b").await.unwrap().is_none());
    assert_eq!(s.get("/a").await.unwrap().unwrap().value, b"2");

    // Delete and re-create resets the create revision; deleting a missing key is fine.
    s.delete("/a", Precondition::Revision(r2)).await.unwrap();
    s.delete("/missing", Precondition::Any).await.unwrap();
    let r = s
        .put("/a", b"again".to_vec(), Precondition::Absent)
        .await
        .unwrap();
    assert_eq!(s.get("/a").await.unwrap().unwrap().create_revision, r);
}

async fn a_check_fences_a_transaction_without_writing(s: &dyn Store) {
    let fence = s
        .put("/leader", b"me".to_vec(), Precondition::Any)
        .await
        .unwrap();
    s.txn(vec![
        Op::check("/leader", Precondition::Revision(fence)),
        Op::put("/t/1", b"placed".to_vec(), Precondition::Absent),
    ])
    .await
    .unwrap();
    let kv = s.get("/leader").await.unwrap().unwrap();
    assert_eq!(
        (kv.mod_revision, kv.value.as_slice()),
        (fence, b"me".as_slice())
    );
    // Leadership moved: the same write under the old fence changes nothing.
    s.put("/leader", b"other".to_vec(), Precondition::Any)
        .await
        .unwrap();
    let err = s
        .txn(vec![
            Op::check("/leader", Precondition::Revision(fence)),
            Op::put("/t/2", b"placed".to_vec(), Precondition::Absent),
        ])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict { key, .. } if key == "/leader"),
        "{err}"
    );
    assert!(s.get("/t/2").await.unwrap().is_none());
}

async fn a_transaction_has_a_bounded_size(s: &dyn Store) {
    let ops = |n: usize| -> Vec<Op> {
        (0..n)
            .map(|i| Op::put(format!("/big/{i:04}"), vec![1], Precondition::Any))
            .collect()
    };
    s.txn(ops(super::MAX_TXN_OPS)).await.unwrap();
    let err = s.txn(ops(super::MAX_TXN_OPS + 1)).await.unwrap_err();
    assert!(
        matches!(err, StoreError::TooLarge { ops, max } if ops == super::MAX_TXN_OPS + 1 && max == super::MAX_TXN_OPS),
        "{err}"
    );
    let (kvs, _) = s.list("/big/").await.unwrap();
    assert_eq!(
        kvs.len(),
        super::MAX_TXN_OPS,
        "the refused one wrote nothing"
    );
}

async fn list_is_sorted_by_prefix_across_pages(s: &dyn Store) {
    // More keys than one etcd page (1,000), written in transactions of 100, in reverse.
    for chunk in (0..2_100u32).rev().collect::<Vec<_>>().chunks(100) {
        let ops = chunk
            .iter()
            .map(|i| {
                Op::put(
                    format!("/x/{i:05}"),
                    i.to_le_bytes().to_vec(),
                    Precondition::Any,
                )
            })
            .collect();
        s.txn(ops).await.unwrap();
    }
    for k in ["/y/a", "/w/a", "/x"] {
        s.put(k, vec![], Precondition::Any).await.unwrap();
    }
    let last = s.revision().await.unwrap();
    let (kvs, rev) = s.list("/x/").await.unwrap();
    assert_eq!(rev, last);
    let keys: Vec<String> = kvs.iter().map(|kv| kv.key.clone()).collect();
    let want: Vec<String> = (0..2_100u32).map(|i| format!("/x/{i:05}")).collect();
    assert_eq!(keys, want, "every key under the prefix, once, sorted");
    assert_eq!(kvs[7].value, 7u32.to_le_bytes());
}

async fn watch_replays_history_then_follows_without_gaps(s: &dyn Store) {
    let base = s.revision().await.unwrap();
    for i in 0..10 {
        s.put(&format!("/w/{i}"), vec![i], Precondition::Any)
            .await
            .unwrap();
    }
    let mut rx = s.watch("/w/", base + 3).await.unwrap();
    let writer = async {
        for i in 10..120u8 {
            s.put(&format!("/w/{i}"), vec![i], Precondition::Any)
                .await
                .unwrap();
            s.put("/other", vec![i], Precondition::Any).await.unwrap();
        }
    };
    let reader = async {
        let mut seen = Vec::new();
        while seen.len() < 118 {
            seen.push(next(&mut rx).await);
        }
        seen
    };
    let ((), seen) = tokio::join!(writer, reader);
    let values: Vec<u8> = seen
        .iter()
        .map(|e| match e {
            Event::Put(kv) => kv.value[0],
            Event::Delete { .. } => 255,
        })
        .collect();
    assert_eq!(
        values,
        (2..120).collect::<Vec<u8>>(),
        "every event once, in order"
    );
    assert!(seen.windows(2).all(|w| w[0].revision() < w[1].revision()));
}

async fn a_watch_from_before_a_compaction_says_so(s: &dyn Store) {
    let base = s.revision().await.unwrap();
    for i in 0..20u8 {
        s.put("/k", vec![i], Precondition::Any).await.unwrap();
    }
    s.compact(base + 16).await.unwrap();
    // The error comes from the call or as the stream's one item; never a gap.
    match s.watch("/", base + 3).await {
        Err(e) => assert!(matches!(e, StoreError::Compacted { .. }), "{e}"),
        Ok(mut rx) => {
            let item = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("an answer in time")
                .expect("an error before the stream closes");
            assert!(
                matches!(item, Err(StoreError::Compacted { .. })),
                "{item:?}"
            );
            assert!(rx.recv().await.is_none(), "the stream ends after the error");
        }
    }
    // From the compaction on, history is still whole.
    let mut rx = s.watch("/", base + 16).await.unwrap();
    assert_eq!(next(&mut rx).await.revision(), base + 16);
}

async fn leases_expire_keep_alive_and_revoke(s: &dyn Store) {
    let put_with = |key: &'static str, lease| {
        s.txn(vec![Op {
            key: key.into(),
            when: Precondition::Any,
            action: Action::Put {
                value: vec![1],
                lease: Some(lease),
            },
        }])
    };
    assert!(matches!(
        put_with("/l/none", 999_999).await,
        Err(StoreError::LeaseNotFound(_))
    ));
    // Two seconds: etcd's shortest TTL with the test members' timing.
    let ttl = Duration::from_secs(2);
    let short = s.grant_lease(ttl).await.unwrap();
    let kept = s.grant_lease(ttl).await.unwrap();
    put_with("/l/short", short).await.unwrap();
    let rev = put_with("/l/kept", kept).await.unwrap();
    let mut rx = s.watch("/l/", rev + 1).await.unwrap();
    for _ in 0..9 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        s.keep_alive(kept).await.unwrap();
    }
    assert!(
        s.get("/l/short").await.unwrap().is_none(),
        "the lease expired and took its key"
    );
    assert!(
        s.get("/l/kept").await.unwrap().is_some(),
        "keep-alive holds the key"
    );
    assert!(
        matches!(next(&mut rx).await, Event::Delete { key, .. } if key == "/l/short"),
        "the expiry is a delete event"
    );
    let expired = s.keep_alive(short).await;
    assert!(
        matches!(expired, Err(StoreError::LeaseNotFound(_))),
        "{expired:?}"
    );
    s.revoke_lease(kept).await.unwrap();
    assert!(s.get("/l/kept").await.unwrap().is_none());
}

/// etcd only: a watch outlives its member's restart, resuming after the last revision it
/// delivered, with nothing lost or repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_watch_resumes_after_its_member_restarts() {
    let mut etcd = crate::test_util::EtcdProcess::start().await;
    let s = etcd.store().await;
    let from = s.revision().await.unwrap() + 1;
    let mut rx = s.watch("/r/", from).await.unwrap();
    for i in 0..5u8 {
        s.put(&format!("/r/{i}"), vec![i], Precondition::Any)
            .await
            .unwrap();
    }
    for _ in 0..5 {
        next(&mut rx).await;
    }
    etcd.restart().await;
    let mut wrote = false;
    for _ in 0..100 {
        if s.put("/r/5", vec![5], Precondition::Any).await.is_ok() {
            wrote = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(wrote, "the client reconnects to the restarted member");
    for i in 6..10u8 {
        s.put(&format!("/r/{i}"), vec![i], Precondition::Any)
            .await
            .unwrap();
    }
    let mut after = Vec::new();
    for _ in 0..5 {
        match next(&mut rx).await {
            Event::Put(kv) => after.push(kv.value[0]),
            e => panic!("{e:?}"),
        }
    }
    assert_eq!(
        after,
        [5, 6, 7, 8, 9],
        "every event after the restart, once, in order"
    );
}

/// etcd only: a member that speaks TLS and requires client certificates takes a client with
/// the CA, a certificate and its key, and refuses one without a certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls_with_a_client_certificate() {
    let etcd = crate::test_util::EtcdProcess::start_tls().await;
    assert!(etcd.url.starts_with("https://"));
    let s = etcd.store().await;
    let rev = s
        .put("/tls/a", b"1".to_vec(), Precondition::Absent)
        .await
        .unwrap();
    assert_eq!(s.get("/tls/a").await.unwrap().unwrap().mod_revision, rev);
    let mut without_cert = etcd.config.clone();
    without_cert.cert = None;
    without_cert.key = None;
    let refused = match super::Etcd::connect(&without_cert).await {
        Err(_) => true,
        Ok(s) => s.get("/tls/a").await.is_err(),
    };
    assert!(refused, "a client without a certificate gets nothing");
}
