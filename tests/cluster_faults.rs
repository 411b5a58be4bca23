//! Faults between real blob pods (127.0.0.1, mutual TLS, a peer service with static
//! discovery): links cut and restored by the harness's TCP proxies, membership flapping while
//! a large upload streams, wall clocks skewed with libfaketime, and tombstone collection with
//! a pod that was down during the delete.

mod common;

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::{
    WAIT,
    cluster::{
        Cluster, content, download, eventually, expected_owners, file_req, holders, list_all, upload, wait_drained,
    },
    proxy::CutMode,
};
use peervault_proto::v1::{
    AddPeerRequest, FileChunk, FileRecord, FileResponse, GetRecordRequest, PeerRequest,
    file_service_client::FileServiceClient, peer_service_client::PeerServiceClient,
};
use tonic::{Code, transport::Channel};

/// Pod `i`'s own record of `key` (GetRecord on its ReplicationService: local, no read repair).
async fn local_record(cl: &Cluster, i: usize, key: &str) -> Option<FileRecord> {
    cl.repl(i)
        .await
        .get_record(GetRecordRequest { key: key.into() })
        .await
        .unwrap_or_else(|e| panic!("pod {i} GetRecord {key}: {e:?}"))
        .into_inner()
        .record
}

fn hlc_of(r: &FileRecord) -> (u64, u32, String) {
    let h = r.hlc.clone().unwrap_or_default();
    (h.physical_ms, h.logical, h.node_id)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Like `upload`, but one 40 KB message every `pause`, so the stream lasts a while.
async fn upload_slowly(
    c: &mut FileServiceClient<Channel>,
    key: &str,
    data: &[u8],
    pause: Duration,
) -> Result<FileResponse, tonic::Status> {
    use futures_util::StreamExt;
    let piece = 40_000;
    let mut msgs = Vec::new();
    let mut off = 0usize;
    while off < data.len() {
        let end = (off + piece).min(data.len());
        msgs.push(FileChunk {
            file_key: key.to_string(),
            data: Bytes::copy_from_slice(&data[off..end]),
            offset: off as i64,
            is_last: end == data.len(),
            ..Default::default()
        });
        off = end;
    }
    let stream = futures_util::stream::iter(msgs).then(move |m| async move {
        tokio::time::sleep(pause).await;
        m
    });
    c.upload_file(stream).await.map(|r| r.into_inner())
}

/// A refused write said nothing was stored (as opposed to an unknown outcome).
fn nothing_stored(e: &tonic::Status) -> bool {
    e.code() == Code::Unavailable && e.message().contains("nothing was stored")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn links_cut_and_restored_during_writes_lose_no_acknowledged_write_and_replicas_converge_without_reads() {
    let cl = Cluster::start_proxied(3, &[]);
    let ids = cl.ids();
    let mut acked: Vec<(String, Vec<u8>)> = Vec::new();
    let mut refused: Vec<String> = Vec::new();
    let mut n = 0u64;
    // Each phase cuts some links (existing connections dropped, new ones refused or
    // blackholed), writes through every pod, and restores them.
    let phases: [(&[usize], CutMode); 3] = [
        (&[2], CutMode::Blackhole),
        (&[1], CutMode::Refuse),
        (&[1, 2], CutMode::Blackhole),
    ];
    for (cut, mode) in phases {
        let before: Vec<usize> = cut.iter().map(|&i| cl.proxy(i).rejected()).collect();
        // A large upload is already streaming through pod 0 when the links go.
        let big_key = format!("cut/big-{n}");
        let big = content(1000 + n, 600_000);
        let mut c0 = cl.files(0).await;
        let (k2, b2) = (big_key.clone(), big.clone());
        let streaming = tokio::spawn(async move { upload_slowly(&mut c0, &k2, &b2, Duration::from_millis(25)).await });
        tokio::time::sleep(Duration::from_millis(100)).await; // a few messages in
        for &i in cut {
            cl.proxy(i).cut(mode);
        }
        for w in 0..3 {
            n += 1;
            let key = format!("cut/{n:02}");
            let data = content(n, if n.is_multiple_of(2) { 150_000 } else { 3_000 });
            let mut c = cl.files(w).await;
            match upload(&mut c, &key, &data).await {
                Ok(_) => acked.push((key, data)),
                Err(e) if nothing_stored(&e) => refused.push(key),
                Err(e) => assert!(e.code() == Code::Unavailable, "{key}: {e:?}"), // unknown outcome
            }
        }
        match streaming.await.unwrap() {
            Ok(_) => acked.push((big_key, big)),
            Err(e) if nothing_stored(&e) => refused.push(big_key),
            Err(e) => assert!(e.code() == Code::Unavailable, "{big_key}: {e:?}"),
        }
        for (j, &i) in cut.iter().enumerate() {
            // The cut was real: pod-to-pod traffic tried the proxy and was turned away.
            eventually(&format!("traffic to pod {i} refused"), WAIT, || async {
                cl.proxy(i).rejected() > before[j]
            })
            .await;
        }
        for &i in cut {
            cl.proxy(i).restore();
        }
        for &i in cut {
            cl.wait_ready(i, true);
        }
    }
    // After the links came back (the view already says every pod is ready), a pod's channels
    // to the peers it lost may still be reconnecting: writes through it can be refused for a
    // moment. Measured, bounded.
    let healed = Instant::now();
    let refused_after_heal = std::sync::atomic::AtomicUsize::new(0);
    eventually("a write through pod 0 after the links came back", WAIT, || async {
        let mut c = cl.files(0).await;
        match upload(&mut c, "cut/after-heal", b"probe").await {
            Ok(_) => true,
            Err(e) if nothing_stored(&e) => {
                refused_after_heal.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                false
            }
            Err(e) => panic!("after heal: {e:?}"),
        }
    })
    .await;
    acked.push(("cut/after-heal".to_string(), b"probe".to_vec()));
    println!(
        "{}",
        serde_json::json!({"writes_refused_after_heal": refused_after_heal.into_inner(), "until_write_ok_s": healed.elapsed().as_secs_f64()})
    );
    // A slow link (every read to or from pod 2 held 60 ms): writes through every pod are
    // acknowledged by the two fast owners; pod 2 catches up.
    cl.proxy(2).set_delay(Duration::from_millis(60));
    for w in 0..3 {
        n += 1;
        let key = format!("slow/{n:02}");
        let data = content(n, 150_000);
        let mut c = cl.files(w).await;
        upload(&mut c, &key, &data)
            .await
            .unwrap_or_else(|e| panic!("{key} over a slow link: {e:?}"));
        acked.push((key, data));
    }
    cl.proxy(2).set_delay(Duration::ZERO);
    // With one pod cut off every write has a majority; with two, writes through pod 0 have
    // none.
    assert!(acked.len() >= 11, "acknowledged {}: {:?}", acked.len(), refused);
    assert!(!refused.is_empty(), "the two-pod cut refused nothing");
    wait_drained(&cl);
    // No reads: anti-entropy and the hand-off queue bring every replica to the same record.
    let all: BTreeSet<String> = ids.iter().cloned().collect();
    for (key, _) in &acked {
        eventually(&format!("{key} on every pod"), WAIT, || async {
            holders(&cl, key, &[0, 1, 2]).await == all
        })
        .await;
        let clocks: BTreeSet<_> = {
            let mut v = BTreeSet::new();
            for i in 0..3 {
                v.insert(hlc_of(&local_record(&cl, i, key).await.unwrap()));
            }
            v
        };
        assert_eq!(clocks.len(), 1, "{key}: replicas disagree: {clocks:?}");
    }
    for key in &refused {
        for i in 0..3 {
            assert!(local_record(&cl, i, key).await.is_none(), "refused {key} on pod {i}");
        }
    }
    // And the content is whole on every pod.
    for i in 0..3 {
        let mut c = cl.files(i).await;
        for (key, data) in &acked {
            assert_eq!(&download(&mut c, key).await.unwrap(), data, "pod {i} {key}");
        }
    }
    assert_eq!(
        cl.pod(0)
            .metric("peervault_replication_failovers_total", &[])
            .unwrap_or(0.0),
        0.0,
        "every chunk was local when read"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn membership_flapping_during_a_large_write_ends_with_r_replicas_or_a_clean_failure() {
    // Pods 0-2 are listed; pod 3 runs and joins and leaves with AddPeer / RemovePeer, and
    // pod 1 is excluded and re-added, while large uploads stream through pod 0.
    let mut cl = Cluster::new(4, &[]);
    cl.start_peer_listing(3);
    for i in 0..4 {
        cl.start_pod(i);
    }
    for i in 0..3 {
        cl.pod(i)
            .wait_metric("peervault_replication_members", &[], |v| v == 3.0);
    }
    let ids = cl.ids();
    let peer_ch = cl.peer.as_ref().unwrap().channel().await;
    let started = Instant::now();
    let mut outcomes = Vec::new();
    for round in 0..2u64 {
        let key = format!("flap/big-{round}");
        let data = content(77 + round, 1_600_000); // 25 chunks of 64 KiB
        let mut c0 = cl.files(0).await;
        let (k, d) = (key.clone(), data.clone());
        let up = tokio::spawn(async move { upload_slowly(&mut c0, &k, &d, Duration::from_millis(60)).await });
        // Flap until the upload ends: at most 6 changes, at most 20 s.
        let mut peers = PeerServiceClient::new(peer_ch.clone());
        let mut changes = 0;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !up.is_finished() && changes < 6 && Instant::now() < deadline {
            let (port, target) = if changes % 4 < 2 {
                (cl.blob_ports[3], 3)
            } else {
                (cl.blob_ports[1], 1)
            };
            let joining = match (target, changes % 2) {
                (3, 0) => true,  // the 4th pod joins
                (3, _) => false, // and leaves
                (_, 0) => false, // pod 1 is excluded
                _ => true,       // and comes back
            };
            if joining {
                peers
                    .add_peer(AddPeerRequest {
                        address: "127.0.0.1".into(),
                        port: port as i32,
                        ..Default::default()
                    })
                    .await
                    .unwrap();
            } else {
                peers
                    .remove_peer(PeerRequest {
                        id: ids[target].clone(),
                    })
                    .await
                    .unwrap();
            }
            changes += 1;
            let members = if target == 3 && joining {
                4.0
            } else if joining || target == 3 {
                3.0
            } else {
                2.0
            };
            cl.pod(0)
                .wait_metric("peervault_replication_members", &[], |v| v == members);
        }
        let result = up.await.unwrap();
        // Back to pods 0-2 for the check.
        let _ = peers.remove_peer(PeerRequest { id: ids[3].clone() }).await;
        let _ = peers
            .add_peer(AddPeerRequest {
                address: "127.0.0.1".into(),
                port: cl.blob_ports[1] as i32,
                ..Default::default()
            })
            .await;
        for i in 0..3 {
            cl.pod(i)
                .wait_metric("peervault_replication_members", &[], |v| v == 3.0);
        }
        match &result {
            Ok(_) => {
                let want = expected_owners(&ids[..3], &key);
                eventually(&format!("{key} on its three owners"), WAIT, || async {
                    holders(&cl, &key, &[0, 1, 2]).await == want
                })
                .await;
                for i in 0..3 {
                    let mut c = cl.files(i).await;
                    assert_eq!(download(&mut c, &key).await.unwrap(), data, "pod {i} {key}");
                }
            }
            Err(e) => {
                assert!(
                    matches!(e.code(), Code::Unavailable | Code::Aborted),
                    "{key}: not a clean failure: {e:?}"
                );
                assert!(!e.message().is_empty());
                if nothing_stored(e) {
                    for i in 0..4 {
                        assert!(local_record(&cl, i, &key).await.is_none(), "{key} on pod {i}");
                    }
                    for i in 0..3 {
                        let mut c = cl.files(i).await;
                        let got = c.get_file(file_req(&key)).await.unwrap_err();
                        assert_eq!(got.code(), Code::NotFound, "pod {i}");
                    }
                }
            }
        }
        outcomes.push(serde_json::json!({
            "key": key, "membership_changes": changes,
            "result": result.as_ref().map(|_| "ok".to_string()).unwrap_or_else(|e| format!("{:?}: {}", e.code(), e.message())),
        }));
        assert!(changes >= 2, "the upload ended before the membership flapped");
    }
    println!(
        "{}",
        serde_json::json!({"flapping": outcomes, "secs": started.elapsed().as_secs_f64()})
    );
}

/// libfaketime's preload library (Debian's `faketime` package), or `PV_LIBFAKETIME`.
fn libfaketime() -> String {
    if let Ok(p) = std::env::var("PV_LIBFAKETIME") {
        return p;
    }
    for p in [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ] {
        if std::path::Path::new(p).exists() {
            return p.to_string();
        }
    }
    panic!("libfaketime not found: install it (apt-get install -y faketime) or set PV_LIBFAKETIME");
}

/// Environment that runs a pod with its wall clock `offset` away (e.g. "-30s", "+20m");
/// monotonic time (timers, timeouts) stays real.
fn skewed(offset: &str) -> Vec<(String, String)> {
    vec![
        ("LD_PRELOAD".into(), libfaketime()),
        ("FAKETIME".into(), offset.into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn skewed_wall_clocks_keep_last_writer_order_and_a_pod_far_ahead_is_refused() {
    let mut cl = Cluster::new(3, &[]);
    cl.pod_env[1] = skewed("-30s");
    cl.pod_env[2] = skewed("+5s");
    cl.start_peer();
    for i in 0..3 {
        cl.start_pod(i);
    }
    cl.wait_members(3);

    // The skew is real: a first write through each skewed pod carries its wall clock.
    let t = now_ms();
    let mut c1 = cl.files(1).await;
    upload(&mut c1, "skew/probe-behind", b"behind").await.unwrap();
    let behind = local_record(&cl, 1, "skew/probe-behind").await.unwrap();
    let phys = behind.hlc.as_ref().unwrap().physical_ms;
    assert!(
        phys + 25_000 < t && phys + 40_000 > t,
        "pod 1 should be 30 s behind: {phys} vs {t}"
    );

    // Written through the pod 5 s ahead, then overwritten later in real time through the pod
    // 30 s behind: the overwrite wins everywhere (its clock was carried past the first).
    let mut c2 = cl.files(2).await;
    let first = content(1, 150_000);
    let second = content(2, 150_000);
    upload(&mut c2, "skew/k", &first).await.unwrap();
    let t = now_ms();
    let a = local_record(&cl, 2, "skew/k").await.unwrap();
    assert!(
        a.hlc.as_ref().unwrap().physical_ms > t + 3_000,
        "pod 2 should be 5 s ahead"
    );
    upload(&mut c1, "skew/k", &second).await.unwrap();
    wait_drained(&cl);
    for i in 0..3 {
        let r = local_record(&cl, i, "skew/k").await.unwrap();
        assert!(hlc_of(&r) > hlc_of(&a), "pod {i}: {:?} not after {:?}", r.hlc, a.hlc);
        assert_eq!(
            r.hlc.as_ref().unwrap().node_id,
            "blob-1",
            "pod {i}: the later write wins"
        );
        let mut c = cl.files(i).await;
        assert_eq!(download(&mut c, "skew/k").await.unwrap(), second, "pod {i}");
    }
    // A delete through the slow pod also orders after the fast pod's write.
    upload(&mut c2, "skew/d", b"short-lived").await.unwrap();
    c1.delete_file(file_req("skew/d")).await.unwrap();
    for i in 0..3 {
        let mut c = cl.files(i).await;
        let e = c.get_file(file_req("skew/d")).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "pod {i}");
    }

    // Pod 2 comes back 20 minutes ahead: its readings are refused, counted and alerted on,
    // and its write never becomes visible.
    cl.kill(2);
    cl.pod_env[2] = skewed("+20m");
    cl.start_pod(2);
    cl.wait_ready(2, true);
    let mut c2 = cl.files(2).await;
    let e = upload(&mut c2, "skew/from-the-future", &content(3, 100_000))
        .await
        .unwrap_err();
    assert!(
        matches!(e.code(), Code::Unavailable | Code::FailedPrecondition),
        "{e:?}"
    );
    let e = upload(&mut c2, "skew/k", b"from the future").await.unwrap_err();
    assert!(
        matches!(e.code(), Code::Unavailable | Code::FailedPrecondition),
        "{e:?}"
    );
    for i in [0, 1] {
        cl.pod(i)
            .wait_metric("peervault_replication_clock_refusals_total", &[], |v| v >= 1.0);
        cl.pod(i).wait_log(WAIT, |v| {
            v["message"] == "clock reading refused" && v["level"] == "ERROR"
        });
    }
    for i in 0..3 {
        assert!(local_record(&cl, i, "skew/from-the-future").await.is_none(), "pod {i}");
        let mut c = cl.files(i).await;
        assert_eq!(download(&mut c, "skew/k").await.unwrap(), second, "pod {i}");
        assert_eq!(list_all(&mut c, 10).await, ["skew/k", "skew/probe-behind"], "pod {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tombstone_is_collected_only_after_the_pod_that_missed_the_delete_holds_it() {
    let grace = Duration::from_secs(2);
    let mut cl = Cluster::start(3, &["--tombstone-grace", "2s"]);
    let data = content(5, 150_000);
    let mut c0 = cl.files(0).await;
    for k in ["gc/keep", "gc/quick", "gc/gone"] {
        upload(&mut c0, k, &data).await.unwrap();
    }
    wait_drained(&cl);
    let collected = |cl: &Cluster, i: usize| {
        cl.pod(i)
            .metric("peervault_replication_tombstones_collected_total", &[])
            .unwrap_or(0.0)
    };

    // With every pod up, a tombstone goes once the grace period passed.
    let t_del = Instant::now();
    c0.delete_file(file_req("gc/quick")).await.unwrap();
    wait_drained(&cl);
    let tomb = local_record(&cl, 0, "gc/quick").await.unwrap();
    assert!(tomb.deleted);
    if t_del.elapsed() < grace {
        // Not collected before the grace period: every owner still holds it.
        for i in 0..3 {
            let r = local_record(&cl, i, "gc/quick").await;
            assert!(r.is_some_and(|r| r.deleted) || t_del.elapsed() >= grace, "pod {i}");
        }
    }
    for i in 0..3 {
        cl.pod(i)
            .wait_metric("peervault_replication_tombstones_collected_total", &[], |v| v == 1.0);
        assert!(local_record(&cl, i, "gc/quick").await.is_none(), "pod {i}");
    }

    // Pod 2 is down during a delete; the grace period passes; its peers keep the tombstone.
    cl.kill(2);
    cl.wait_ready(2, false);
    c0.delete_file(file_req("gc/gone")).await.unwrap();
    let tomb = local_record(&cl, 0, "gc/gone").await.unwrap();
    assert!(tomb.deleted);
    let due = tomb.hlc.as_ref().unwrap().physical_ms + grace.as_millis() as u64;
    // Past the grace period, then two more completed anti-entropy rounds (1 s apart) on both.
    let rounds = |cl: &Cluster, i: usize| {
        ["in_sync", "differ"]
            .iter()
            .map(|r| {
                cl.pod(i)
                    .metric(
                        "peervault_replication_digest_rounds_total",
                        &[&format!("result=\"{r}\"")],
                    )
                    .unwrap_or(0.0)
            })
            .sum::<f64>()
    };
    eventually("the grace period to pass", WAIT, || async { now_ms() > due }).await;
    let at_due = [rounds(&cl, 0), rounds(&cl, 1)];
    eventually("two anti-entropy rounds past the grace period", WAIT, || async {
        rounds(&cl, 0) >= at_due[0] + 2.0 && rounds(&cl, 1) >= at_due[1] + 2.0
    })
    .await;
    for i in [0, 1] {
        assert!(
            local_record(&cl, i, "gc/gone").await.is_some_and(|r| r.deleted),
            "pod {i} collected a tombstone a down owner lacks"
        );
        assert_eq!(collected(&cl, i), 1.0, "pod {i}");
    }

    // Pod 2 returns with its old live copy: the file stays deleted everywhere, pod 2 gets the
    // tombstone, and only then is it collected (pod 2 counts it too: it collects only what it
    // holds).
    cl.start_pod(2);
    cl.wait_ready(2, true);
    eventually("gc/gone collected on every pod", WAIT, || async {
        for i in 0..3 {
            let mut c = cl.files(i).await;
            let e = c.get_file(file_req("gc/gone")).await.unwrap_err();
            assert_eq!(e.code(), Code::NotFound, "pod {i}: the deleted file came back");
            if i < 2 {
                let r = local_record(&cl, i, "gc/gone").await;
                assert!(r.as_ref().is_none_or(|r| r.deleted), "pod {i} holds it live again");
            }
        }
        let mut gone = true;
        for i in 0..3 {
            gone &= local_record(&cl, i, "gc/gone").await.is_none();
        }
        gone
    })
    .await;
    for i in 0..3 {
        // Pods 0 and 1 collected both tombstones; pod 2 (its counter restarted with it) the
        // one it received after coming back (twice if a hand-off retry delivered it again
        // after it had collected it: then it is collected again).
        let want = if i == 2 { 1.0 } else { 2.0 };
        cl.pod(i)
            .wait_metric("peervault_replication_tombstones_collected_total", &[], |v| v >= want);
        let mut c = cl.files(i).await;
        assert_eq!(list_all(&mut c, 10).await, ["gc/keep"], "pod {i}");
        assert_eq!(download(&mut c, "gc/keep").await.unwrap(), data, "pod {i}");
    }
}

/// A write whose commit round reaches only its coordinator: the two other owners took the
/// pending record and are then stopped (SIGSTOP) at the exact step between the rounds (a pause
/// point in the coordinator, debug builds). The client hears that the outcome is unknown; the
/// coordinator's copy and its hand-off queue make the write appear everywhere once the owners
/// are back, with no read; a retry orders after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_committed_only_by_its_coordinator_is_reported_unknown_and_then_converges() {
    let pauses = tempfile::tempdir().unwrap();
    let mut cl = Cluster::new(3, &[]);
    cl.pod_env[0].push(("PEERVAULT_TEST_PAUSE_DIR".into(), pauses.path().display().to_string()));
    cl.start_peer();
    for i in 0..3 {
        cl.start_pod(i);
    }
    cl.wait_members(3);
    let pause = pauses.path().join("replicate.before_commit.pause");
    let reached = pauses.path().join("replicate.before_commit.reached");
    std::fs::write(&pause, b"").unwrap();
    let data = content(41, 200_000);
    let mut c0 = cl.files(0).await;
    let sent = data.clone();
    let write = tokio::spawn(async move { upload(&mut c0, "u/unknown", &sent).await });
    eventually("the write reaches its commit round", WAIT, || {
        let reached = reached.clone();
        async move { reached.exists() }
    })
    .await;
    cl.pod(1).signal("STOP");
    cl.pod(2).signal("STOP");
    std::fs::remove_file(&pause).unwrap();
    let e = write.await.unwrap().unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("outcome is unknown"), "{e:?}");
    assert_eq!(
        cl.pod(0)
            .metric("peervault_replication_writes_total", &["result=\"unknown\""]),
        Some(1.0)
    );
    assert!(
        local_record(&cl, 0, "u/unknown").await.is_some(),
        "the coordinator applied it"
    );
    assert!(
        cl.pod(0)
            .metric("peervault_replication_handoff_queue_depth", &[])
            .unwrap()
            >= 2.0
    );

    cl.pod(1).signal("CONT");
    cl.pod(2).signal("CONT");
    wait_drained(&cl);
    for i in 0..3 {
        let r = local_record(&cl, i, "u/unknown").await;
        assert!(
            r.is_some_and(|r| !r.deleted),
            "pod {i} holds the write without any read"
        );
    }
    for i in 0..3 {
        let mut c = cl.files(i).await;
        assert!(download(&mut c, "u/unknown").await.unwrap() == data, "pod {i}");
    }
    let mut c1 = cl.files(1).await;
    upload(&mut c1, "u/unknown", b"retried").await.unwrap();
    for i in 0..3 {
        let mut c = cl.files(i).await;
        assert_eq!(download(&mut c, "u/unknown").await.unwrap(), b"retried", "pod {i}");
    }
}
