//! The model registry: manifests in the configured directories, the trust checks on their
//! files, and verification of every model (and adapter) file against its manifest's sha256
//! before llama.cpp ever parses it.
//!
//! Must never hand an unverified path to the loader: crafted GGUF files have repeatedly been
//! memory-corruption bugs in llama.cpp, so only bytes that hash to the manifest are parsed. The
//! file is opened once, checked and hashed through that descriptor, and llama.cpp reads the
//! same descriptor (`/proc/self/fd/N`), so a rename between the check and the load cannot
//! swap the bytes.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// A manifest could not be read or parsed.
    #[error("bad model manifest {path}: {reason}")]
    Manifest { path: PathBuf, reason: String },
    /// The model file could not be read.
    #[error("cannot read model file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// The model file does not match its manifest.
    #[error("model file {path} has sha256 {actual}, its manifest says {expected}")]
    HashMismatch { path: PathBuf, expected: String, actual: String },
    /// A file or directory could be changed by someone other than root (or hearthd itself).
    #[error("refusing {path}: {reason}")]
    Untrusted { path: PathBuf, reason: String },
}

/// What a model can do. Generate and Complete need `chat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Capability {
    Chat,
    Embed,
    Tools,
    Vision,
}

impl Capability {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Embed => "embed",
            Self::Tools => "tools",
            Self::Vision => "vision",
        }
    }
}

fn default_capabilities() -> Vec<Capability> {
    vec![Capability::Chat]
}

/// A LoRA adapter of a model, loaded with it. Requests pick adapters by name (request key
/// `adapters`, name → scale); a request that names none gets each at its `scale`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdapterManifest {
    /// The name requests use; default: the file name without `.gguf`.
    #[serde(default)]
    pub name: Option<String>,
    /// The adapter GGUF, relative to the manifest's directory.
    pub file: PathBuf,
    /// Lower-case hex sha256 of the file.
    pub sha256: String,
    /// Strength for requests that name no adapters (1.0: as trained; 0: only on request).
    /// Default 1.0, or 0 for an adapter with a `task`.
    #[serde(default, rename = "scale")]
    pub scale_given: Option<f32>,
    /// The task API this adapter is trained for (one base model, one adapter per feature):
    /// that task's calls run with it at scale 1, other requests at its scale.
    #[serde(default)]
    pub task: Option<Task>,
}

/// The task APIs (Summarize, Rewrite, Proofread, Describe).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    Summarize,
    Rewrite,
    Proofread,
    Describe,
}

impl Task {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Summarize => "summarize",
            Self::Rewrite => "rewrite",
            Self::Proofread => "proofread",
            Self::Describe => "describe",
        }
    }
}

impl AdapterManifest {
    /// Its strength for requests that name no adapters.
    pub fn scale(&self) -> f32 {
        self.scale_given.unwrap_or(if self.task.is_some() { 0.0 } else { 1.0 })
    }

    /// The name requests use.
    pub fn name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            let file = self.file.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
            file.strip_suffix(".gguf").map(str::to_owned).unwrap_or(file)
        })
    }
}

/// A model manifest (`<dir>/<anything>.toml`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The name requests use.
    pub name: String,
    /// The GGUF file, relative to the manifest's directory.
    pub file: PathBuf,
    /// Lower-case hex sha256 of the file.
    pub sha256: String,
    /// Context of one request in tokens; default: the engine's `context_length`.
    #[serde(default)]
    pub context_length: Option<u32>,
    /// What the model can do; default: chat.
    #[serde(default = "default_capabilities")]
    pub capabilities: Vec<Capability>,
    /// Seconds the model stays loaded after its last request; default: `models.keep_alive_s`.
    #[serde(default)]
    pub keep_alive_s: Option<u64>,
    /// Never unload for idleness or to make room.
    #[serde(default)]
    pub pinned: bool,
    /// LoRA adapters applied on load, in order.
    #[serde(default)]
    pub adapters: Vec<AdapterManifest>,
    /// The vision projector of a model with the `vision` capability (and only of one).
    #[serde(default)]
    pub mmproj: Option<ProjectorManifest>,
}

/// A vision model's projector file (llama.cpp's "mmproj" GGUF): what turns an image into
/// embeddings for the language model. Verified like the model before it is loaded.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProjectorManifest {
    /// The projector GGUF, relative to the manifest's directory.
    pub file: PathBuf,
    /// Lower-case hex sha256 of the file.
    pub sha256: String,
}

/// One installed model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelEntry {
    pub manifest: Manifest,
    /// The manifest file.
    pub manifest_path: PathBuf,
    /// Absolute path of the model file.
    pub path: PathBuf,
    /// Size of the model file, when it could be read at scan time.
    pub file_size: Option<u64>,
}

impl ModelEntry {
    /// Absolute paths of the adapter files.
    pub fn adapter_paths(&self) -> Vec<PathBuf> {
        let dir = self.manifest_path.parent().unwrap_or(Path::new("."));
        self.manifest.adapters.iter().map(|a| dir.join(&a.file)).collect()
    }

    /// Absolute path of the vision projector file, if the model has one.
    pub fn mmproj_path(&self) -> Option<PathBuf> {
        let dir = self.manifest_path.parent().unwrap_or(Path::new("."));
        self.manifest.mmproj.as_ref().map(|p| dir.join(&p.file))
    }

    pub fn has(&self, capability: Capability) -> bool {
        self.manifest.capabilities.contains(&capability)
    }
}

/// All installed models by name. The first directory that defines a name wins.
#[derive(Debug, Default)]
pub struct Catalog {
    models: BTreeMap<String, ModelEntry>,
    /// Manifests that were skipped, and why.
    rejected: Vec<CatalogError>,
}

impl Catalog {
    /// Scans `dirs` for manifests. Missing directories are skipped; a broken or untrusted
    /// manifest is logged and left out (one bad file never takes the others down).
    pub fn scan(dirs: &[PathBuf]) -> Self {
        let mut models = BTreeMap::new();
        let mut rejected = Vec::new();
        for path in toml_files(dirs) {
            match read_manifest(&path) {
                Ok(entry) => {
                    models.entry(entry.manifest.name.clone()).or_insert(entry);
                }
                Err(e) => {
                    tracing::error!(error = %e, "model manifest skipped");
                    rejected.push(e);
                }
            }
        }
        Self { models, rejected }
    }

    pub fn get(&self, name: &str) -> Option<&ModelEntry> {
        self.models.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &ModelEntry> {
        self.models.values()
    }

    pub fn len(&self) -> usize {
        self.models.len()
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    /// Manifests left out at scan time.
    pub fn rejected(&self) -> &[CatalogError] {
        &self.rejected
    }
}

/// The `*.toml` files of `dirs`, directory by directory in order, sorted by name within each;
/// missing directories are skipped.
pub fn toml_files(dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut all = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        paths.sort();
        all.extend(paths);
    }
    all
}

fn check_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

fn check_relative(file: &Path) -> bool {
    !file.is_absolute()
        && file.components().all(|c| matches!(c, std::path::Component::Normal(_)))
        && file.components().next().is_some()
}

fn read_manifest(path: &Path) -> Result<ModelEntry, CatalogError> {
    let bad = |reason: String| CatalogError::Manifest { path: path.to_owned(), reason };
    let mut file = File::open(path).map_err(|e| bad(e.to_string()))?;
    check_trusted(path, &file.metadata().map_err(|e| bad(e.to_string()))?)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    check_trusted(dir, &std::fs::metadata(dir).map_err(|e| bad(e.to_string()))?)?;
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(|e| bad(e.to_string()))?;
    let manifest: Manifest = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if manifest.name.is_empty() || manifest.name.len() > 128 || manifest.name.chars().any(char::is_control) {
        return Err(bad(format!("invalid model name {:?}", manifest.name)));
    }
    let files = std::iter::once((&manifest.file, &manifest.sha256))
        .chain(manifest.adapters.iter().map(|a| (&a.file, &a.sha256)))
        .chain(manifest.mmproj.iter().map(|p| (&p.file, &p.sha256)));
    for (file, sha256) in files {
        if !check_sha256(sha256) {
            return Err(bad(format!("sha256 of {} must be 64 lower-case hex digits", file.display())));
        }
        if !check_relative(file) {
            return Err(bad(format!("file {} must be a plain path inside the manifest's directory", file.display())));
        }
    }
    let max = crate::config::MAX_CONTEXT_LENGTH;
    if manifest.context_length.is_some_and(|n| !(64..=max).contains(&n)) {
        return Err(bad(format!("context_length must be within 64..={max}")));
    }
    if manifest.capabilities.is_empty() {
        return Err(bad("capabilities is empty".into()));
    }
    match (manifest.capabilities.contains(&Capability::Vision), manifest.mmproj.is_some()) {
        (true, false) => return Err(bad("capability vision needs the projector file: an [mmproj] table".into())),
        (false, true) => return Err(bad("an [mmproj] projector is for models with the vision capability".into())),
        _ => {}
    }
    if manifest.adapters.iter().any(|a| !a.scale().is_finite()) {
        return Err(bad("adapter scale must be a finite number".into()));
    }
    let mut tasks = std::collections::BTreeSet::new();
    for task in manifest.adapters.iter().filter_map(|a| a.task) {
        if !tasks.insert(task.as_str()) {
            return Err(bad(format!("two adapters are for the task {:?}", task.as_str())));
        }
    }
    let mut names = std::collections::BTreeSet::new();
    for name in manifest.adapters.iter().map(AdapterManifest::name) {
        if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
            return Err(bad(format!("invalid adapter name {name:?}")));
        }
        if !names.insert(name.clone()) {
            return Err(bad(format!("two adapters are named {name:?}")));
        }
    }
    let file_path = dir.join(&manifest.file);
    let file_size = std::fs::metadata(&file_path).ok().map(|m| m.len());
    Ok(ModelEntry { manifest, manifest_path: path.to_owned(), path: file_path, file_size })
}

/// Refuses a file or directory that anyone but root or hearthd's own user could change:
/// another owner, or group/other write permission.
pub fn check_trusted(path: &Path, meta: &std::fs::Metadata) -> Result<(), CatalogError> {
    let untrusted = |reason: String| CatalogError::Untrusted { path: path.to_owned(), reason };
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != me {
        return Err(untrusted(format!("it is owned by uid {}, not root (or hearthd's uid {me})", meta.uid())));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(untrusted(format!(
            "its mode {:04o} lets {} write it",
            meta.mode() & 0o7777,
            if meta.mode() & 0o002 != 0 { "everyone" } else { "its group" }
        )));
    }
    Ok(())
}

/// A model or adapter file that passed the trust checks and whose bytes hash to the manifest.
/// It is handed on as the open file (the engine process gets the descriptor), never by
/// path, so what was verified is what is loaded.
#[derive(Debug)]
pub struct VerifiedFile {
    file: File,
    /// Where it was found (for messages).
    pub origin: PathBuf,
    pub size: u64,
    /// True when the hash came from the cache (the file's identity had not changed).
    pub cached: bool,
}

impl VerifiedFile {
    /// The verified open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn into_file(self) -> File {
        self.file
    }
}

/// Identity of a file's content as far as the kernel tells: if none of these changed, the
/// bytes did not either (ctime moves on every write or metadata change and cannot be set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

impl FileKey {
    fn of(meta: &std::fs::Metadata) -> Self {
        let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct HashCacheFile {
    #[serde(default)]
    file: Vec<HashCacheEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct HashCacheEntry {
    #[serde(flatten)]
    key: FileKey,
    sha256: String,
}

/// sha256 of files already hashed, by file identity, kept in the state directory so that a
/// restart does not rehash every model.
///
/// File timestamps are only as fine as the kernel's clock tick, so a file changed within the
/// same tick as it was hashed could keep its key. As in git's "racy" check, a hash is only
/// cached once the file's last change (ctime) is `settle` in the past.
#[derive(Debug)]
pub struct HashCache {
    path: Option<PathBuf>,
    entries: Mutex<BTreeMap<FileKey, String>>,
    settle: std::time::Duration,
}

/// How long after its last change a file's hash may be cached.
const SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

impl HashCache {
    /// Opens the cache at `path` (None: in memory only). A missing, unreadable or corrupt
    /// cache file only costs rehashing.
    pub fn open(path: Option<PathBuf>) -> Self {
        let mut entries = BTreeMap::new();
        if let Some(p) = &path {
            let parsed = File::open(p)
                .and_then(|f| {
                    check_trusted(p, &f.metadata()?).map_err(std::io::Error::other)?;
                    Ok(f)
                })
                .and_then(|mut f| {
                    let mut s = String::new();
                    f.read_to_string(&mut s)?;
                    toml::from_str::<HashCacheFile>(&s).map_err(std::io::Error::other)
                });
            match parsed {
                Ok(c) => entries.extend(c.file.into_iter().map(|e| (e.key, e.sha256))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(path = %p.display(), error = %e, "model hash cache ignored"),
            }
        }
        Self { path, entries: Mutex::new(entries), settle: SETTLE }
    }

    #[cfg(test)]
    fn with_settle(mut self, settle: std::time::Duration) -> Self {
        self.settle = settle;
        self
    }

    /// Whether a file whose ctime is `ctime_ns` changed long enough ago to cache its hash.
    fn settled(&self, ctime_ns: i64) -> bool {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        i128::try_from(now.as_nanos()).unwrap_or(i128::MAX) - i128::from(ctime_ns) > self.settle.as_nanos() as i128
    }

    fn get(&self, key: &FileKey) -> Option<String> {
        self.entries.lock().ok()?.get(key).cloned()
    }

    fn insert(&self, key: FileKey, sha256: String) {
        let Ok(mut entries) = self.entries.lock() else { return };
        entries.insert(key, sha256);
        let Some(path) = &self.path else { return };
        let file = HashCacheFile {
            file: entries.iter().map(|(k, v)| HashCacheEntry { key: *k, sha256: v.clone() }).collect(),
        };
        let saved = toml::to_string(&file).map_err(std::io::Error::other).and_then(|text| write_private(path, &text));
        if let Err(e) = saved {
            tracing::warn!(path = %path.display(), error = %e, "cannot save the model hash cache");
        }
    }
}

/// Writes `text` to `path` atomically (temporary file + rename), readable by its owner only.
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    crate::state_file::replace(path, text.as_bytes())
}

/// Opens `path`, checks it and its directory are trusted, and checks its bytes hash to
/// `expected`, reporting the hashed fraction to `progress`. The hash is taken from `cache`
/// when the file's identity matches an earlier verification.
pub fn open_verified(
    path: &Path,
    expected: &str,
    cache: &HashCache,
    progress: &mut dyn FnMut(f64),
) -> Result<VerifiedFile, CatalogError> {
    let read_err = |source| CatalogError::Read { path: path.to_owned(), source };
    let dir = path.parent().unwrap_or(Path::new("."));
    check_trusted(dir, &std::fs::metadata(dir).map_err(read_err)?)?;
    let mut file = File::open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(CatalogError::Untrusted { path: path.to_owned(), reason: "it is not a regular file".into() });
    }
    check_trusted(path, &meta)?;
    let key = FileKey::of(&meta);
    let (actual, cached) = match cache.get(&key) {
        Some(h) => (h, true),
        None => (hash(&mut file, meta.size(), progress).map_err(read_err)?, false),
    };
    if actual != expected {
        return Err(CatalogError::HashMismatch { path: path.to_owned(), expected: expected.to_owned(), actual });
    }
    if !cached && cache.settled(key.ctime_ns) {
        cache.insert(key, actual);
    }
    progress(1.0);
    Ok(VerifiedFile { file, origin: path.to_owned(), size: meta.size(), cached })
}

fn hash(file: &mut File, size: u64, progress: &mut dyn FnMut(f64)) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        done += n as u64;
        progress(done as f64 / size.max(1) as f64);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests;
