//! Every reply of the local API and of the migration reports round-trips
//! through JSON, field for field; a reply missing a field names it.

use std::collections::BTreeMap;

use serde::Serialize;
use serde::de::DeserializeOwned;
use xenod_host::daemon::reply::*;
use xenod_host::migrate::report::{
    Adopted, Checkpoint, FetchReply, FinalCopy, MigrationReport as Migrate, PhaseReport, Restore, Round,
};
use xenod_store::ChunkId;

fn round_trip<T: Serialize + DeserializeOwned>(v: &T) {
    let json = serde_json::to_value(v).unwrap();
    let back: T = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(serde_json::to_value(&back).unwrap(), json);
}

fn fetch_report() -> xenod_peer::FetchReport {
    xenod_peer::FetchReport {
        layer: "ab".repeat(32),
        stack: vec!["ab".repeat(32)],
        chunks_fetched: 3,
        chunks_local: 1,
        bytes: 300,
        wire_bytes: 200,
        udp_bytes: 250,
        elapsed_ms: 7,
        providers: vec![xenod_peer::ProviderReport {
            node: "n".into(),
            chunks: 3,
            wire_bytes: 200,
            duplicates: 0,
            bad_chunks: 1,
            dropped: Some("bad chunks".into()),
        }],
        prefetched: 2,
        order_from: Some("n".into()),
    }
}

#[test]
fn every_reply_round_trips() {
    let id = ChunkId::of(b"layer");
    let mut known = BTreeMap::new();
    known.insert(
        "n".to_string(),
        xenod_host::daemon::KnownPeer {
            addrs: vec!["127.0.0.1:1".parse().unwrap()],
            last_seen: 5,
            layers: [id.to_string()].into(),
        },
    );
    round_trip(&Status {
        node: "n".into(),
        addr: Some("n@127.0.0.1:1".into()),
        data_dir: "/d".into(),
        daemon: true,
        counters: Default::default(),
        peers: [("p".to_string(), Default::default())].into(),
        known_peers: known,
        shared: [id.to_string()].into(),
        gossip: Some(Gossip { joined: true, presences: 2 }),
        lazy_fetches: Some([(id.to_string(), "fetching".to_string())].into()),
        capacity: Some(xenod_host::admission::Capacity {
            vcpus: 8.0,
            mem: 1 << 30,
            upper: Some(1 << 32),
            held: xenod_host::admission::Ask { mem: 256 << 20, vcpus: 1, upper: Some(64 << 20) },
            holders: 1,
        }),
        capacity_warnings: vec!["[capacity] vcpus = 64, but this host has 2 CPUs".into()],
        lazy: Some(xenod_host::daemon::reply::LazyCounters { chunk_requests: 5, stalls: 3, prefetched: 9 }),
    });
    round_trip(&Share { layer: id.to_string(), node: "n".into(), addr: "n@a".into(), ticket: "xenod1x".into() });
    round_trip(&Fetch { report: fetch_report(), lazy: true });
    round_trip(&Chunk { data: "00ff".into() });
    round_trip(&Names {
        peers: vec![
            PeerNames {
                peer: "a".into(),
                accepted: Some(vec!["template://me/x/1".into()]),
                unchanged: Some(1),
                refused: Some(vec![("template://me/y/1".into(), "not trusted here".into())]),
                error: None,
            },
            PeerNames { peer: "b".into(), accepted: None, unchanged: None, refused: None, error: Some("x".into()) },
        ],
    });
    round_trip(&Replicate {
        layer: id.to_string(),
        elapsed_ms: 9,
        targets: vec![xenod_peer::PullOutcome {
            node: "t".into(),
            report: Some(serde_json::to_value(fetch_report()).unwrap()),
            error: None,
        }],
    });
    round_trip(&Shutdown { stopping: true });
    round_trip(&Reload {
        trusted: vec![Trusted { key: "ab".repeat(32), publishers: vec!["debian".into(), "acme/*".into()] }],
        accepted: vec!["template://debian/12/1".into()],
        refused_held: 2,
    });
    round_trip(&Checkpoint {
        checkpoint: id.to_string(),
        state: id.to_string(),
        instance: "web".into(),
        new_chunks: 4,
        state_chunks: 3,
        live: true,
        paused_seconds: 0.05,
        seconds: 1.5,
    });
    let adopted = Adopted {
        name: "web".into(),
        domain: "web".into(),
        layer: id,
        port: Some(8080),
        staged: true,
        bytes_written: Some(4096),
        steps: [("state_seconds".to_string(), 0.25)].into(),
    };
    round_trip(&Restore { restored: adopted, on: "here".into(), fetch: Some(FetchReply::default()) });
    // The migration report serializes; its phases carry their names.
    let report = Migrate {
        instance: "web".into(),
        to: "n@a".into(),
        cold: false,
        live: true,
        layer: id,
        precopy_level: Some("ppmd".into()),
        port: Some(8080),
        wire_bytes: 10,
        downtime_seconds: 0.1,
        total_seconds: 2.0,
        phases: vec![
            PhaseReport::Prepare { seconds: 0.1, fetch: FetchReply::default() },
            PhaseReport::PreCopy {
                seconds: 1.0,
                wire_bytes: 5,
                rounds: vec![Round {
                    round: 0,
                    layer: id,
                    blocks_written: 1,
                    bytes_read: 2,
                    fetch: FetchReply::default(),
                }],
                stage: None,
            },
            PhaseReport::StopAndCopy {
                seconds: 0.2,
                save_seconds: 0.1,
                save_downtime_seconds: Some(0.05),
                wire_bytes: 5,
                upper: FinalCopy {
                    blocks_written: 1,
                    bytes_read: 0,
                    wire_bytes: 5,
                    state_pages: None,
                    state_seconds: 0.1,
                    state_encoded_live: true,
                    send_seconds: 0.1,
                },
                layer: id,
                state: Some(id),
            },
            PhaseReport::Resume { seconds: 0.3, target_seconds: 0.2, target_steps: BTreeMap::new() },
            PhaseReport::CleanUp { seconds: 0.1 },
        ],
    };
    let v = serde_json::to_value(&report).unwrap();
    let phases: Vec<&str> = v["phases"].as_array().unwrap().iter().map(|p| p["phase"].as_str().unwrap()).collect();
    assert_eq!(phases, ["prepare", "pre-copy", "stop-and-copy", "resume", "clean-up"]);
    assert_eq!(v["phases"][2]["state"], id.to_string());
}

#[test]
fn a_reply_missing_a_field_names_it() {
    let e = serde_json::from_str::<Share>(r#"{"layer":"x","node":"n","addr":"a"}"#).unwrap_err();
    assert!(e.to_string().contains("missing field `ticket`"), "{e}");
    let e = serde_json::from_str::<FetchReply>(r#"{"chunks_fetched":1}"#).unwrap_err();
    assert!(e.to_string().contains("missing field `wire_bytes`"), "{e}");
}
