//! The service's other `a{sv}` dictionaries as typed structs: a ListModels entry, the Memory,
//! Throttle, Backends and Energy properties, and CallerInfo's, CountTokens' and Availability's
//! replies. hearthd builds them, hearthctl
//! and the tests read them; the keys are the field names and the XML documents each.
//! Optional fields are keys that may be absent; unknown keys are ignored when reading, so a
//! newer hearthd can add some. The KvCache property, all counters, is an `a{su}`.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use zbus::{DeserializeDict, SerializeDict, Type};
use zbus::{OwnedVariant, Variant};

/// One installed model, as ListModels reports it.
#[derive(Debug, Clone, Default, PartialEq, SerializeDict, DeserializeDict, Type)]
#[zbus(signature = "a{sv}")]
pub struct ModelInfo {
    pub name: String,
    pub file: String,
    pub sha256: String,
    pub loaded: bool,
    /// Whether it is the default model.
    pub default: bool,
    pub pinned: bool,
    /// Whether its file's hash was checked in this run.
    pub verified: bool,
    pub capabilities: Vec<String>,
    pub adapters: u32,
    pub adapter_names: Vec<String>,
    pub file_size: u64,
    /// The manifest's context length, or the loaded engine's.
    pub context_length: Option<u32>,
    // Of a loaded model:
    pub n_params: Option<u64>,
    pub size_bytes: Option<u64>,
    pub trained_context: Option<u32>,
    pub description: Option<String>,
    pub memory_bytes: Option<u64>,
    pub kv_shrunk: Option<bool>,
    /// The GPU its layers are offloaded to, how many (llama.cpp's count: the output layer
    /// is one more), of how many, and what they take of the GPU's memory.
    pub gpu_device: Option<String>,
    pub gpu_layers: Option<u32>,
    pub layers: Option<u32>,
    pub device_bytes: Option<u64>,
    /// How requests with tools are shown to it: "hermes" (its own chat template shows them,
    /// and its calls come in `<tool_call>` blocks) or "constrained" (Hearth's own format).
    pub tool_format: Option<String>,
    // Of its engine process:
    pub engine_pid: Option<u32>,
    /// "full", "partial" or "none".
    pub sandbox_landlock: Option<String>,
    pub sandbox_landlock_abi: Option<u32>,
    pub sandbox_seccomp: Option<bool>,
    pub sandbox_socket: Option<String>,
    /// What the GPU was allowed beyond the CPU's syscalls: "none", "drm-ioctl" (the DRM
    /// ioctls on its render node) or "exec-memory" (a software Vulkan device's shader JIT).
    pub sandbox_gpu_access: Option<String>,
    /// (path, what opening it did).
    pub sandbox_probes: Option<Vec<(String, String)>>,
    /// Why its last load failed.
    pub error: Option<String>,
}

/// The Memory property.
#[derive(Debug, Clone, Default, PartialEq, SerializeDict, DeserializeDict, Type)]
#[zbus(signature = "a{sv}")]
pub struct Memory {
    pub budget_bytes: u64,
    pub used_bytes: u64,
    pub pressure: bool,
    pub some_avg10: f64,
    pub full_avg10: f64,
    pub evicted: u32,
    pub expired: u32,
    pub pressure_unloads: u32,
    pub pressure_shrinks: u32,
    pub ceiling_bytes: u64,
    pub anon_bytes: u64,
    pub over_ceiling: bool,
    pub ceiling_hits: u32,
    pub engine_failures: u32,
}

/// The Throttle property.
#[derive(Debug, Clone, Default, PartialEq, SerializeDict, DeserializeDict, Type)]
#[zbus(signature = "a{sv}")]
pub struct Throttle {
    /// Tokens per second (0: uncapped).
    pub rate_cap_tps: f64,
    /// 0..1 (1: no limit).
    pub duty: f64,
    pub potential_tps: f64,
    /// Compute threads asked for (0: as configured).
    pub threads: u32,
    pub defer_background: bool,
    pub prefer_cloud: bool,
    pub power_saver: bool,
    pub temperature_c: Option<f64>,
    pub trip_c: Option<f64>,
    pub battery_pct: Option<u32>,
    /// The GPU the engines' layers run on, if any: `duty` and `rate_cap_tps` pace its steps
    /// the same way (an engine waits between steps, so the GPU idles for that share), and
    /// `threads` limits only the work left on the CPU.
    pub gpu: Option<String>,
}

/// One entry of the Backends property.
#[derive(Debug, Clone, Default, PartialEq, SerializeDict, DeserializeDict, Type)]
#[zbus(signature = "a{sv}")]
pub struct Backend {
    pub name: String,
    pub description: String,
    /// "cpu", "gpu", "igpu" or "accel".
    pub kind: String,
    pub memory_total: u64,
    pub memory_free: u64,
    /// Whether hearthd's engines use it.
    pub owned: bool,
    /// Of a GPU: what the models' offloaded layers may take of its memory
    /// (memory.device_budget_mib) and take now.
    pub budget_bytes: Option<u64>,
    pub used_bytes: Option<u64>,
}

/// One app's row of Activity.
#[derive(Debug, Clone, Default, PartialEq, SerializeDict, DeserializeDict, Type)]
#[zbus(signature = "a{sv}")]
pub struct AppActivity {
    pub app: String,
    /// Its requests running now (generating, or waiting in the engine's queue).
    pub running: u32,
    /// Requests and streamed tokens since hearthd started.
    pub requests: u64,
    pub tokens: u64,
}

/// The Energy property: what the device drew since hearthd started, and per app what its
/// on-device work drew (the caller's own row; every app's for root and hearthd's user).
#[derive(Debug, Clone, Default, PartialEq, SerializeDict, DeserializeDict, Type)]
#[zbus(signature = "a{sv}")]
pub struct Energy {
    /// "rapl", "battery-energy", "battery-power" or "model".
    pub source: String,
    /// Joules the device drew since hearthd started, and of them what the apps' work drew
    /// above idle.
    pub device_j: f64,
    pub apps_j: f64,
    /// Joules the device drew over the last hour, and today (since the local midnight).
    pub device_hour_j: f64,
    pub device_today_j: f64,
    /// The device's power over the last interval, its idle power, and the joules above
    /// idle one second of engine compute costs.
    pub device_w: f64,
    pub idle_w: f64,
    pub j_per_compute_s: f64,
    /// The length of the ledger's hour, seconds (3600 unless configured otherwise).
    pub hour_s: u64,
    /// Background requests' joules over the last hour, all apps together.
    pub background_hour_j: f64,
    /// With a background share configured: its joules an hour now (shrunk as the battery
    /// runs down), and whether background work is past it and waits.
    pub background_share_j: Option<f64>,
    pub background_deferred: Option<bool>,
    pub apps: Vec<AppEnergy>,
}

/// One app's row of Energy.
#[derive(Debug, Clone, Default, PartialEq, SerializeDict, DeserializeDict, Type)]
#[zbus(signature = "a{sv}")]
pub struct AppEnergy {
    pub app: String,
    /// Joules since hearthd started, over the last hour and the last day (24 hours), and
    /// today (since the local midnight).
    pub total_j: f64,
    pub hour_j: f64,
    pub day_j: f64,
    pub today_j: f64,
    /// Seconds of engine compute its work took.
    pub compute_s: f64,
    /// With an energy budget in its policy: whether it is held, past its budget or with its
    /// next request (at what its requests cost lately) to take it past.
    pub over_budget: Option<bool>,
}

/// CountTokens' reply: what a request's prompt takes of its model's context.
#[derive(Debug, Clone, Default, PartialEq, SerializeDict, DeserializeDict, Type)]
#[zbus(signature = "a{sv}")]
pub struct TokenCount {
    pub model: String,
    /// Prompt tokens after the chat template (and a tools description), images included.
    pub prompt_tokens: u32,
    /// Of them, image embeddings.
    pub image_tokens: u32,
    /// Tokens one request's context holds (prompt and answer).
    pub context_length: u32,
    /// Tokens left for the answer: context_length - prompt_tokens (0 when it does not fit).
    pub remaining: u32,
    /// Whether Generate would take it: the prompt leaves room for at least one token, and
    /// the request's max_tokens is within the context length.
    pub fits: bool,
}

/// Availability's reply: whether a model can serve this caller now, and if not, why.
#[derive(Debug, Clone, Default, PartialEq, SerializeDict, DeserializeDict, Type)]
#[zbus(signature = "a{sv}")]
pub struct Availability {
    pub model: String,
    /// "ready" (loaded), "loading", "installed" (loads on first use), "unavailable" (see
    /// reason) or "not-installed".
    pub state: String,
    /// Why, for every state but ready: what it waits for, or what is wrong.
    pub reason: String,
    pub capabilities: Vec<String>,
    /// While loading: the phase and the fraction of it done.
    pub load_phase: Option<String>,
    pub load_fraction: Option<f64>,
    /// Tokens one request's context holds, once known (loaded, or declared by the manifest).
    pub context_length: Option<u32>,
}

/// CallerInfo's reply: who hearthd takes the caller for, and its policy.
#[derive(Debug, Clone, Default, PartialEq, SerializeDict, DeserializeDict, Type)]
#[zbus(signature = "a{sv}")]
pub struct CallerInfo {
    pub app_id: String,
    /// How the app id was found ("flatpak", "snap", "systemd-unit", "process", ...).
    pub app_kind: String,
    pub uid: u32,
    pub pid: u32,
    /// Models the app may use (empty: all).
    pub models: Vec<String>,
    pub max_priority: String,
    pub cloud: bool,
    pub cloud_scopes: Vec<String>,
    /// The caller's security label, when the bus reports one.
    pub label: Option<String>,
}

/// The KvCache property: the KV cache in tokens, and the sessions' KV.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, Type)]
#[serde(from = "HashMap<String, u32>", into = "HashMap<String, u32>")]
#[zvariant(signature = "a{su}")]
pub struct KvCache {
    pub size: u32,
    /// By admitted requests: prompt + max_tokens.
    pub reserved: u32,
    /// Held by live sequences.
    pub used: u32,
    /// Kept in free slots for prefix reuse, or by idle sessions.
    pub cached: u32,
    /// Open sessions.
    pub sessions: u32,
    /// Sessions whose KV is parked on disk.
    pub parked_sessions: u32,
    pub parked_kib: u32,
    /// Parked KV dropped for the parked-sessions limit since start.
    pub parked_dropped: u32,
    /// Speculative decoding since the engines started: draft tokens verified, and taken.
    pub draft_tokens: u32,
    pub draft_accepted: u32,
}

impl KvCache {
    fn fields(self) -> [(&'static str, u32); 10] {
        [
            ("size", self.size),
            ("reserved", self.reserved),
            ("used", self.used),
            ("cached", self.cached),
            ("sessions", self.sessions),
            ("parked_sessions", self.parked_sessions),
            ("parked_kib", self.parked_kib),
            ("parked_dropped", self.parked_dropped),
            ("draft_tokens", self.draft_tokens),
            ("draft_accepted", self.draft_accepted),
        ]
    }
}

impl From<KvCache> for HashMap<String, u32> {
    fn from(kv: KvCache) -> Self {
        kv.fields().into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }
}

impl From<HashMap<String, u32>> for KvCache {
    /// Missing keys read as 0, unknown keys are ignored.
    fn from(map: HashMap<String, u32>) -> Self {
        let get = |k: &str| map.get(k).copied().unwrap_or(0);
        KvCache {
            size: get("size"),
            reserved: get("reserved"),
            used: get("used"),
            cached: get("cached"),
            sessions: get("sessions"),
            parked_sessions: get("parked_sessions"),
            draft_tokens: get("draft_tokens"),
            draft_accepted: get("draft_accepted"),
            parked_kib: get("parked_kib"),
            parked_dropped: get("parked_dropped"),
        }
    }
}

impl From<KvCache> for Variant<'static> {
    fn from(kv: KvCache) -> Self {
        Variant::from(HashMap::<String, u32>::from(kv))
    }
}

impl TryFrom<OwnedVariant> for KvCache {
    type Error = zbus::Error;

    fn try_from(v: OwnedVariant) -> Result<Self, Self::Error> {
        Ok(HashMap::<String, u32>::try_from(v)?.into())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use zbus::OwnedVariant;
    use zbus::wire::serialized::Context;
    use zbus::wire::{LE, to_bytes};

    use super::*;

    #[test]
    fn optional_keys_are_absent_and_unknown_keys_are_ignored() {
        let ctxt = Context::new(LE, 0);
        let m = ModelInfo { name: "m".into(), engine_pid: Some(7), ..ModelInfo::default() };
        let bytes = to_bytes(ctxt, &m).unwrap();
        let dict: HashMap<String, OwnedVariant> = bytes.deserialize().unwrap().0;
        assert!(dict.contains_key("engine_pid") && !dict.contains_key("error"), "{dict:?}");
        let back: ModelInfo = bytes.deserialize().unwrap().0;
        assert_eq!(back, m);
        // A dictionary with a key this version does not know still reads.
        let mut newer = dict;
        newer.insert("from_the_future".into(), OwnedVariant::from(1u32));
        let bytes = to_bytes(ctxt, &newer).unwrap();
        let read: ModelInfo = bytes.deserialize().unwrap().0;
        assert_eq!(read.name, "m");
    }

    #[test]
    fn the_kv_cache_is_an_a_su_of_its_field_names() {
        let ctxt = Context::new(LE, 0);
        let kv = KvCache { size: 4096, parked_kib: 12, draft_accepted: 3, ..KvCache::default() };
        assert_eq!(KvCache::SIGNATURE.to_string(), "a{su}");
        let bytes = to_bytes(ctxt, &kv).unwrap();
        let dict: HashMap<String, u32> = bytes.deserialize().unwrap().0;
        assert_eq!(
            (dict.len(), dict["size"], dict["parked_kib"], dict["used"], dict["draft_accepted"]),
            (10, 4096, 12, 0, 3)
        );
        assert_eq!(bytes.deserialize::<KvCache>().unwrap().0, kv);
        let back = KvCache::try_from(OwnedVariant::try_from(Variant::from(kv)).unwrap()).unwrap();
        assert_eq!(back, kv);
    }
}
