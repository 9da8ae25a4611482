//! What a migration, a checkpoint and a restore report, and what the
//! target answers the source: typed, with layer ids as hex.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use xenod_store::LayerId;

use super::statepages::EncodeStats;

/// The target's report of one fetch.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FetchReply {
    #[serde(default, skip_serializing_if = "Option::is_none", with = "crate::api::hex_id::option")]
    pub layer: Option<LayerId>,
    pub chunks_fetched: u64,
    #[serde(default)]
    pub bytes: u64,
    pub wire_bytes: u64,
    #[serde(default)]
    pub elapsed_ms: u64,
}

impl FetchReply {
    /// Both fetches' counts together.
    pub fn add(&mut self, o: &FetchReply) {
        self.chunks_fetched += o.chunks_fetched;
        self.bytes += o.bytes;
        self.wire_bytes += o.wire_bytes;
    }
}

/// The target's report of the resume: its fetch, and the instance it runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResumeReply {
    pub fetch: FetchReply,
    pub instance: Adopted,
    pub resume_seconds: f64,
}

/// The instance as it runs on the target.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Adopted {
    pub name: String,
    pub domain: String,
    #[serde(with = "crate::api::hex_id")]
    pub layer: LayerId,
    pub port: Option<u16>,
    pub staged: bool,
    /// Written into the staged mount (staged resumes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_written: Option<u64>,
    /// Seconds per step of the resume.
    #[serde(default)]
    pub steps: BTreeMap<String, f64>,
}

/// A phase's report.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "phase", rename_all = "kebab-case")]
pub enum PhaseReport {
    Prepare {
        seconds: f64,
        fetch: FetchReply,
    },
    PreCopy {
        seconds: f64,
        wire_bytes: u64,
        rounds: Vec<Round>,
        /// The target staged the guest (or why not); none when cold.
        stage: Option<Value>,
    },
    StopAndCopy {
        seconds: f64,
        save_seconds: f64,
        save_downtime_seconds: Option<f64>,
        wire_bytes: u64,
        upper: FinalCopy,
        #[serde(with = "crate::api::hex_id")]
        layer: LayerId,
        #[serde(with = "crate::api::hex_id::option")]
        state: Option<LayerId>,
    },
    Resume {
        seconds: f64,
        target_seconds: f64,
        target_steps: BTreeMap<String, f64>,
    },
    CleanUp {
        seconds: f64,
    },
}

/// One pre-copy round.
#[derive(Clone, Debug, Serialize)]
pub struct Round {
    pub round: usize,
    #[serde(with = "crate::api::hex_id")]
    pub layer: LayerId,
    pub blocks_written: u64,
    pub bytes_read: u64,
    pub fetch: FetchReply,
}

/// What stop-and-copy sent.
#[derive(Clone, Debug, Serialize)]
pub struct FinalCopy {
    pub blocks_written: u64,
    pub bytes_read: u64,
    pub wire_bytes: u64,
    pub state_pages: Option<EncodeStats>,
    pub state_seconds: f64,
    pub state_encoded_live: bool,
    pub send_seconds: f64,
}

/// A whole migration's report.
#[derive(Clone, Debug, Serialize)]
pub struct MigrationReport {
    pub instance: String,
    pub to: String,
    pub cold: bool,
    /// The memory was saved while the guest ran.
    pub live: bool,
    #[serde(with = "crate::api::hex_id")]
    pub layer: LayerId,
    /// Pre-copy's codec: a zstd level, or "ppmd".
    pub precopy_level: Option<Value>,
    pub port: Option<u16>,
    pub wire_bytes: u64,
    pub downtime_seconds: f64,
    pub total_seconds: f64,
    pub phases: Vec<PhaseReport>,
}

/// `checkpoint`: the checkpoint layer and its state layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub checkpoint: String,
    pub state: String,
    pub instance: String,
    pub new_chunks: u64,
    pub state_chunks: u64,
    pub live: bool,
    pub paused_seconds: f64,
    pub seconds: f64,
}

/// `restore`: the instance as it runs, and where.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Restore {
    pub restored: Adopted,
    /// "here", or the peer.
    pub on: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch: Option<FetchReply>,
}
