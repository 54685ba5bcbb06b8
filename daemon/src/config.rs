//! Daemon configuration: defaults in code, then the vendor file, then the admin's overrides
//! (or exactly one `--config` file on top of the defaults). Unknown keys are errors.

use std::path::PathBuf;

use serde::Deserialize;

/// Vendor defaults shipped with the package.
pub const VENDOR_CONFIG: &str = "/usr/share/hearth/hearthd.toml";
/// Admin overrides.
pub const ADMIN_CONFIG: &str = "/etc/hearth/hearthd.toml";

/// The longest context one request may have (engine.context_length, a manifest's
/// context_length): 1M tokens. Beyond it the KV arithmetic (tokens × sequences × bytes per
/// token) leaves the range the engine and llama.cpp count in.
pub const MAX_CONTEXT_LENGTH: u32 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but cannot be read.
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// The file is not valid TOML or has unknown/mistyped keys.
    #[error("invalid config {path}: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    /// A value is out of its range.
    #[error("invalid config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub daemon: DaemonConfig,
    pub models: ModelsConfig,
    pub engine: EngineConfig,
    pub limits: LimitsConfig,
    pub memory: MemoryConfig,
    pub apps: AppsConfig,
    pub governor: crate::governor::GovernorConfig,
    pub energy: crate::energy::EnergyConfig,
    pub cloud: crate::cloud::CloudConfig,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AppsConfig {
    /// Per-app policy files (`*.toml`), vendor first; a later file for the same app wins.
    pub dirs: Vec<PathBuf>,
    /// The policy of apps without a file.
    pub default: crate::policy::AppPolicy,
}

impl Default for AppsConfig {
    fn default() -> Self {
        Self {
            dirs: vec![PathBuf::from("/usr/share/hearth/apps.d"), PathBuf::from("/etc/hearth/apps.d")],
            default: crate::policy::AppPolicy::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// hearthd's private state (model hash cache; later the sealing key). Created 0700 when
    /// missing; systemd's `StateDirectory=` creates it on a device.
    pub state_dir: PathBuf,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self { state_dir: PathBuf::from("/var/lib/hearth") }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    /// Most bytes all loaded models (weights + KV caches) may take, in MiB; 0: half of the
    /// memory the service may use (its cgroup's memory.max, else MemTotal).
    pub budget_mib: u64,
    /// Most bytes the models' offloaded layers (weights and KV caches) may take of the GPU's
    /// memory, in MiB; 0: the GPU's free memory when hearthd started. A model whose
    /// `engine.gpu_layers` do not fit what is left is refused (ModelUnavailable, with the
    /// numbers and the layer count that would fit), not silently moved to the CPU.
    pub device_budget_mib: u64,
    /// A PSI file (`/proc/pressure/memory` format) to watch; empty: the service cgroup's
    /// `memory.pressure`, else `/proc/pressure/memory`.
    pub pressure_file: PathBuf,
    /// How often the pressure file is read, in milliseconds.
    pub pressure_interval_ms: u64,
    /// `some avg10` (percent of time stalled on memory) at or above which memory is tight.
    pub pressure_some_avg10: f64,
    /// Consecutive readings at or above the threshold before hearthd acts (and below half of
    /// it before it stands down).
    pub pressure_readings: u32,
    /// Anonymous memory (heap: KV caches, compute buffers, grammar state; not the mapped
    /// weights) at which hearthd ends its in-flight device work and refuses new work with
    /// Busy until use falls below 90% of it, in MiB; at 5/4 of it hearthd exits (status 3)
    /// before the kernel's OOM killer picks a victim on the phone. 0: 60% of the memory the
    /// service may use (its cgroup's memory.max, else the RAM size).
    pub ceiling_mib: u64,
    /// Where the ceiling reads memory use: empty, `/proc` (hearthd's and its engines'
    /// `RssAnon`); a file in `/proc/PID/status` format, whose `RssAnon` stands for the whole;
    /// a directory, read instead of `/proc` (`PID/status` of hearthd and of each engine).
    pub usage_file: PathBuf,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            budget_mib: 0,
            device_budget_mib: 0,
            pressure_file: PathBuf::new(),
            pressure_interval_ms: 1000,
            pressure_some_avg10: 10.0,
            pressure_readings: 3,
            ceiling_mib: 0,
            usage_file: PathBuf::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelsConfig {
    /// Directories holding model manifests (`*.toml`) and their files, searched in order.
    pub dirs: Vec<PathBuf>,
    /// The model used when a request names none.
    pub default: String,
    /// Seconds an unpinned model stays loaded after its last request (a manifest's
    /// `keep_alive_s` overrides it).
    pub keep_alive_s: u64,
    /// Models loaded at start and never unloaded for idleness or to make room (a manifest's
    /// `pinned = true` also pins).
    pub pinned: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Compute threads; 0 means one per available CPU.
    pub threads: u32,
    /// Context of one request in tokens (prompt + generated). Every sequence slot has a KV
    /// stream of this size, so the KV cache holds context_length × (max_sequences +
    /// interactive_sequences) tokens.
    pub context_length: u32,
    /// Most tokens per decode step (prompt chunks + one token per running request).
    pub batch_size: u32,
    /// Most normal and background requests decoded together.
    pub max_sequences: u32,
    /// Extra sequences only interactive requests may use, so a flood of other work never
    /// keeps them waiting for a slot.
    pub interactive_sequences: u32,
    /// Layers offloaded to an accelerator (0: CPU only, -1: all).
    pub gpu_layers: i32,
    /// ggml devices hearthd owns and offloads to, by name (the `Backends` property lists
    /// them); empty: every GPU/accelerator present. Naming a missing device stops the start.
    pub devices: Vec<String>,
    /// Keep a finished request's KV for the same app's next prompt (prefix reuse). The kept
    /// KV is parked in the highest free slot and copied down when reused, because llama.cpp
    /// decodes requests in high KV streams measurably slower (hearth-bench: 8 streams in
    /// slots 2..9 at 0.65 of a static batch, in 0..7 at 1.0). Each park and reuse copies one
    /// KV stream (context_length tokens).
    pub prefix_cache: bool,
    /// Flash attention. On by default: it keeps each request's output independent of what
    /// else is batched with it (without it, batching changes greedy outputs).
    pub flash_attn: bool,
    /// How the KV cache stores keys and values: "q8_0" (default; needs flash_attn) keeps
    /// every request's output independent of how its prompt was chunked, whether its prefix
    /// was reused and what shared its decode steps, decodes faster and takes half the
    /// memory; "f16" processes prompts faster (see hearth_ffi::KvType for the numbers).
    pub kv_cache: crate::engine::KvCache,
    /// The engine program hearthd starts for each loaded model; empty: `hearth-engine` next
    /// to hearthd's own executable.
    pub program: PathBuf,
    /// An engine whose loop makes no progress for this long while it has work is killed (its
    /// requests end with EngineFailed) and restarted. One decode step must fit well inside.
    pub hang_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Most requests waiting for a free slot; beyond it callers get `Busy`.
    pub queue_capacity: u32,
    /// Most requests one app may have waiting; beyond it that app gets `Busy`.
    pub queue_per_app: u32,
    /// `max_tokens` of a request that gives none.
    pub default_max_tokens: u32,
    /// Disk the parked KV of idle sessions may take in the state directory, MiB. Past it the
    /// KV parked longest ago is dropped; that session's next turn recomputes it.
    pub parked_sessions_mib: u64,
}

impl Default for ModelsConfig {
    fn default() -> Self {
        Self {
            dirs: vec![PathBuf::from("/usr/share/hearth/models"), PathBuf::from("/var/lib/hearth/models")],
            default: "smollm2-135m-instruct".to_owned(),
            keep_alive_s: 300,
            pinned: Vec::new(),
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            threads: 0,
            context_length: 2048,
            batch_size: 512,
            max_sequences: 4,
            interactive_sequences: 2,
            gpu_layers: 0,
            devices: Vec::new(),
            flash_attn: true,
            kv_cache: crate::engine::KvCache::default(),
            prefix_cache: true,
            program: PathBuf::new(),
            hang_timeout_ms: 30_000,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self { queue_capacity: 32, queue_per_app: 8, default_max_tokens: 256, parked_sessions_mib: 512 }
    }
}

impl Config {
    /// Loads the configuration: the `explicit` files in order on top of the defaults when any
    /// are given, else the vendor then the admin file, each where it exists. Tables merge key
    /// by key.
    pub fn load(explicit: &[PathBuf]) -> Result<Self, ConfigError> {
        let files: Vec<PathBuf> = if explicit.is_empty() {
            [VENDOR_CONFIG, ADMIN_CONFIG].iter().map(PathBuf::from).filter(|p| p.exists()).collect()
        } else {
            explicit.to_vec()
        };
        let mut merged = toml::Table::new();
        for path in &files {
            let text =
                std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
            let table: toml::Table =
                toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.clone(), source })?;
            merge(&mut merged, table);
        }
        let label = files.last().cloned().unwrap_or_else(|| PathBuf::from("<defaults>"));
        let config: Config =
            toml::Value::Table(merged).try_into().map_err(|source| ConfigError::Parse { path: label, source })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let e = &self.engine;
        if !(64..=MAX_CONTEXT_LENGTH).contains(&e.context_length) {
            return Err(ConfigError::Invalid(format!(
                "engine.context_length {} is outside 64..={MAX_CONTEXT_LENGTH}",
                e.context_length
            )));
        }
        if e.kv_cache == crate::engine::KvCache::Q8_0 && !e.flash_attn {
            return Err(ConfigError::Invalid(
                "engine.kv_cache = \"q8_0\" needs flash_attn = true (llama.cpp quantizes the V cache only with flash attention); set kv_cache = \"f16\" to turn flash attention off".into(),
            ));
        }
        if e.batch_size == 0 || e.max_sequences == 0 {
            return Err(ConfigError::Invalid("engine.batch_size and engine.max_sequences must be at least 1".into()));
        }
        if e.batch_size < e.max_sequences + e.interactive_sequences {
            return Err(ConfigError::Invalid(format!(
                "engine.batch_size {} must be at least engine.max_sequences + engine.interactive_sequences = {} (every running request decodes one token per step)",
                e.batch_size,
                e.max_sequences + e.interactive_sequences
            )));
        }
        if e.max_sequences + e.interactive_sequences > 256 {
            return Err(ConfigError::Invalid(format!(
                "engine.max_sequences + engine.interactive_sequences = {} is above 256",
                e.max_sequences + e.interactive_sequences
            )));
        }
        if e.hang_timeout_ms < 100 {
            return Err(ConfigError::Invalid(format!("engine.hang_timeout_ms {} is below 100", e.hang_timeout_ms)));
        }
        if self.limits.default_max_tokens == 0 {
            return Err(ConfigError::Invalid("limits.default_max_tokens must be at least 1".into()));
        }
        if self.models.dirs.is_empty() {
            return Err(ConfigError::Invalid("models.dirs is empty".into()));
        }
        self.energy.check().map_err(ConfigError::Invalid)?;
        // (Only the new key is checked: configs that loaded before still load.)
        if self.governor.background_share_full_pct > 100 {
            return Err(ConfigError::Invalid("governor.background_share_full_pct must be at most 100".into()));
        }
        let m = &self.memory;
        if m.pressure_interval_ms < 10 || m.pressure_readings == 0 {
            return Err(ConfigError::Invalid(
                "memory.pressure_interval_ms must be at least 10 and memory.pressure_readings at least 1".into(),
            ));
        }
        if !(m.pressure_some_avg10 > 0.0 && m.pressure_some_avg10 <= 100.0) {
            return Err(ConfigError::Invalid(format!(
                "memory.pressure_some_avg10 {} is not in (0, 100]",
                m.pressure_some_avg10
            )));
        }
        if m.ceiling_mib != 0 && m.ceiling_mib < 64 {
            return Err(ConfigError::Invalid(format!("memory.ceiling_mib {} is below 64", m.ceiling_mib)));
        }
        Ok(())
    }

    /// The engine program: the configured one, or `hearth-engine` beside hearthd.
    pub fn engine_program(&self) -> PathBuf {
        if !self.engine.program.as_os_str().is_empty() {
            return self.engine.program.clone();
        }
        std::env::current_exe()
            .map(|exe| exe.with_file_name("hearth-engine"))
            .unwrap_or_else(|_| PathBuf::from("/usr/libexec/hearth/hearth-engine"))
    }

    /// The thread count to use: the configured one, or one per available CPU.
    pub fn threads(&self) -> i32 {
        let n = if self.engine.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
        } else {
            self.engine.threads
        };
        i32::try_from(n).unwrap_or(i32::MAX)
    }
}

fn merge(into: &mut toml::Table, from: toml::Table) {
    for (key, value) in from {
        match (into.get_mut(&key), value) {
            (Some(toml::Value::Table(dst)), toml::Value::Table(src)) => merge(dst, src),
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn defaults_apply_under_a_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "a.toml", "[engine]\nthreads = 3\n");
        let c = Config::load(std::slice::from_ref(&p)).unwrap();
        assert_eq!(c.engine.threads, 3);
        assert_eq!(c.engine.context_length, 2048);
        assert_eq!(c.models, ModelsConfig::default());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "a.toml", "[engine]\nthread = 3\n");
        let err = Config::load(std::slice::from_ref(&p)).unwrap_err().to_string();
        assert!(err.contains("unknown field"), "{err}");
        let p = write(dir.path(), "b.toml", "[engine]\ncontext_length = 8\n");
        assert!(matches!(Config::load(std::slice::from_ref(&p)), Err(ConfigError::Invalid(_))));
        for huge in [u32::MAX, MAX_CONTEXT_LENGTH + 1] {
            let p = write(dir.path(), "h.toml", &format!("[engine]\ncontext_length = {huge}\n"));
            assert!(matches!(Config::load(std::slice::from_ref(&p)), Err(ConfigError::Invalid(_))), "{huge}");
        }
        let p = write(dir.path(), "c.toml", "[limits]\nqueue_capacity = \"many\"\n");
        assert!(matches!(Config::load(std::slice::from_ref(&p)), Err(ConfigError::Parse { .. })));
    }

    #[test]
    fn the_shipped_vendor_file_states_the_defaults() {
        let vendor = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/hearthd.toml");
        assert_eq!(Config::load(&[vendor]).unwrap(), Config::default());
    }

    #[test]
    fn tables_merge_key_by_key() {
        let mut a: toml::Table = toml::from_str("[engine]\nthreads = 1\nbatch_size = 64\n").unwrap();
        merge(&mut a, toml::from_str("[engine]\nthreads = 2\n").unwrap());
        let c: Config = toml::Value::Table(a).try_into().unwrap();
        assert_eq!((c.engine.threads, c.engine.batch_size), (2, 64));
    }
}
