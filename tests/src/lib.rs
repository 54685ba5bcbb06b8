//! Test harness: a private `dbus-daemon` configured like the system bus (deny-by-default,
//! Hearth's real policy file included), the real `hearthd` binary on it, the real default
//! model, and a direct hearth-ffi reference run. When a test panics, the daemon's log is
//! printed so the failure can be read without rerunning.

#![forbid(unsafe_code)]

pub mod cloud_standin;
mod images;
pub use images::{image_message, jpeg, png};
mod reference;
pub mod soc;

pub use reference::{DirectRun, SIX_PROMPTS, direct_run, direct_run_continuing, greedy, reference_model};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hearth_dbus::{Generation, StreamEvent};
use zbus::Connection;
use zbus::Variant;

/// Default compute threads of both the daemon under test and the direct reference run.
pub const DEFAULT_THREADS: i32 = 2;

static THREADS: OnceLock<i32> = OnceLock::new();

/// Sets the compute threads for this process's daemons and direct runs (once, before use).
pub fn set_threads(n: i32) {
    let _ = THREADS.set(n.max(1));
}

/// Compute threads used by both the daemon under test and the direct reference run.
pub fn threads() -> i32 {
    *THREADS.get_or_init(|| DEFAULT_THREADS)
}
/// Context of one request (one sequence's KV stream), used by both.
pub const CONTEXT: u32 = 1024;
/// The default model's name (scripts/fetch-model.sh installs its manifest).
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";
/// Batch size used by both.
pub const BATCH: u32 = 512;
/// Sequences of the daemon's context.
pub const SEQUENCES: u32 = 8;

/// The repository root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned()
}

/// The directory with the default model and its manifest (scripts/fetch-model.sh).
pub fn models_dir() -> PathBuf {
    std::env::var_os("HEARTH_MODELS_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("models"))
}

/// The default model file.
pub fn model_path() -> PathBuf {
    let p = models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} is missing: run scripts/fetch-model.sh", p.display());
    p
}

/// A binary of this workspace, built next to the running test or bench executable.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_owned();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let p = dir.join(name);
    assert!(p.exists(), "{} is missing: run `cargo build --bins` first", p.display());
    p
}

/// A private bus with the system bus's policy.
#[derive(Debug)]
pub struct Bus {
    child: Child,
    address: String,
    _dir: tempfile::TempDir,
}

impl Bus {
    pub fn start() -> Self {
        Self::start_with_policy(&workspace_root().join("dbus/data/org.hearth.Hearth1.conf"))
    }

    /// A bus that includes `policy` as Hearth's bus policy (e.g. an installed copy).
    pub fn start_with_policy(policy: &Path) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let template =
            std::fs::read_to_string(workspace_root().join("tests/data/system-bus.conf.in")).expect("bus template");
        let socket = dir.path().join("bus");
        let user = nix::unistd::User::from_uid(nix::unistd::getuid())
            .ok()
            .flatten()
            .map_or_else(|| "root".to_owned(), |u| u.name);
        let conf = template
            .replace("@SOCKET@", &socket.display().to_string())
            .replace("@POLICY@", &policy.display().to_string())
            .replace("@TEST_USER@", &user);
        let conf_path = dir.path().join("bus.conf");
        std::fs::write(&conf_path, conf).expect("write bus conf");
        let child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", conf_path.display()))
            .arg("--nofork")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dbus-daemon (install dbus-daemon: scripts/setup-deps.sh)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "dbus-daemon did not create its socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, address: format!("unix:path={}", socket.display()), _dir: dir }
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// Kills the bus daemon (every connection on it breaks).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Lets other users reach the bus socket (for tests that connect under another uid).
    pub fn open_to_all_users(&self) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(self._dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod bus dir");
    }

    /// A new client connection.
    pub async fn connect(&self) -> Connection {
        zbus::connection::Builder::address(self.address.as_str()).build().await.expect("connect to test bus")
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Overrides of the test configuration.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// `engine.max_sequences` (default [`SEQUENCES`]).
    pub max_sequences: Option<u32>,
    /// `engine.interactive_sequences` (default 2).
    pub interactive_sequences: Option<u32>,
    /// Extra lines for the `[engine]` table.
    pub engine: String,
    /// Extra lines for the `[limits]` table.
    pub limits: String,
    /// Model directories instead of [`models_dir`].
    pub models_dirs: Option<Vec<PathBuf>>,
    /// Extra lines for the `[models]` table.
    pub models: String,
    /// Extra lines for the `[memory]` table.
    pub memory: String,
    /// Extra environment of the daemon.
    pub env: Vec<(String, String)>,
    /// Extra lines for the `[apps]` table (per-app policy).
    pub apps: String,
    /// Extra lines for the `[cloud]` table.
    pub cloud: String,
    /// Extra lines for the `[governor]` table. Unless they set `sysfs_root`, the governors
    /// read an empty tree, so the host's own sensors never throttle a test.
    pub governor: String,
    /// Extra lines for the `[energy]` table (the ledger reads the governors' sysfs tree).
    pub energy: String,
}

/// The real hearthd on a [`Bus`].
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
    exited: Option<ExitStatus>,
}

impl Daemon {
    /// Starts hearthd with the test configuration and waits until it owns its name.
    pub async fn start(bus: &Bus) -> Self {
        Self::start_with(bus, "").await
    }

    /// Like [`Daemon::start`], with extra TOML lines for the `[limits]` table.
    pub async fn start_with(bus: &Bus, extra_limits: &str) -> Self {
        Self::start_configured(bus, &Settings { limits: extra_limits.to_owned(), ..Settings::default() }).await
    }

    /// Starts hearthd with `settings` over the test configuration.
    pub async fn start_configured(bus: &Bus, settings: &Settings) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("hearthd.toml");
        std::fs::write(&config_path, config_text(settings, dir.path())).expect("write config");
        Self::spawn(bus, &workspace_bin("hearthd"), &[config_path], &settings.env, dir).await
    }

    /// Starts `exe` (e.g. an installed hearthd) with `configs` layered in order, and waits until
    /// it owns its name. `dir` holds its log and lives as long as the daemon.
    pub async fn spawn(
        bus: &Bus,
        exe: &Path,
        configs: &[PathBuf],
        env: &[(String, String)],
        dir: tempfile::TempDir,
    ) -> Self {
        let log = std::fs::File::create(dir.path().join("hearthd.log")).expect("log file");
        let mut cmd = Command::new(exe);
        for c in configs {
            cmd.arg("--config").arg(c);
        }
        let child = cmd
            .arg("--bus-address")
            .arg(bus.address())
            .env("HEARTH_LOG", "debug,zbus=info")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn hearthd");
        let mut daemon = Self { child, dir, exited: None };
        let conn = bus.connect().await;
        let dbus = zbus::fdo::DBusProxy::new(&conn).await.expect("DBus proxy");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let name = zbus::names::BusName::try_from(hearth_dbus::BUS_NAME).expect("name");
            if dbus.name_has_owner(name).await.unwrap_or(false) {
                break;
            }
            if let Some(status) = daemon.try_exit() {
                panic!("hearthd exited during start with {status}:\n{}", daemon.log());
            }
            assert!(Instant::now() < deadline, "hearthd did not take its name within 60 s:\n{}", daemon.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        daemon
    }

    /// The test configuration file (start_configured); rewrite it and send SIGHUP to reload.
    /// The daemon's state directory (sealing key, parked session KV).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("hearthd.toml")
    }

    /// Writes `settings` as the daemon's configuration file (takes effect on SIGHUP).
    pub fn write_config(&self, settings: &Settings) {
        std::fs::write(self.config_path(), config_text(settings, self.dir.path())).expect("write config");
    }

    /// Sends a signal to the daemon.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(self.pid(), signal).expect("signal hearthd");
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("hearthd.log")).unwrap_or_default()
    }

    /// The exit status, if it has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    }

    /// Waits for the process to exit, up to `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.try_exit() {
                return s;
            }
            assert!(Instant::now() < deadline, "hearthd did not exit within {limit:?}:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- hearthd log -----\n{}\n----- end of hearthd log -----", self.log());
        }
        if self.try_exit().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The test configuration for `settings`, with state under `dir`.
fn config_text(settings: &Settings, dir: &Path) -> String {
    let dirs = settings.models_dirs.clone().unwrap_or_else(|| vec![models_dir()]);
    let dirs: Vec<String> = dirs.iter().map(|d| format!("{:?}", d.display().to_string())).collect();
    format!(
        "[daemon]\nstate_dir = {:?}\n\n[models]\ndirs = [{}]\n{}\n\n[memory]\n{}\n\n[engine]\nthreads = {}\ncontext_length = {CONTEXT}\nbatch_size = {BATCH}\nmax_sequences = {}\ninteractive_sequences = {}\n{}\n\n[limits]\n{}\n\n[apps]\n{}\n\n[cloud]\n{}\n\n[governor]\n{}{}\n\n[energy]\n{}\n",
        dir.join("state").display().to_string(),
        dirs.join(", "),
        settings.models,
        settings.memory,
        threads(),
        settings.max_sequences.unwrap_or(SEQUENCES),
        settings.interactive_sequences.unwrap_or(2),
        settings.engine,
        settings.limits,
        settings.apps,
        settings.cloud,
        if settings.governor.contains("sysfs_root") {
            String::new()
        } else {
            format!("sysfs_root = {:?}\n", dir.join("no-sysfs").display().to_string())
        },
        settings.governor,
        settings.energy,
    )
}

/// A proxy of the service that reads properties from the daemon on every call (no cache that
/// PropertiesChanged signals update later), so tests see the current value.
pub async fn hearth(conn: &Connection) -> hearth_dbus::Hearth1Proxy<'static> {
    hearth_dbus::Hearth1Proxy::builder(conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .expect("Hearth1 proxy")
}

/// The live introspection XML of hearthd's object at `path`.
pub async fn introspect(conn: &Connection, path: &str) -> zbus::Result<String> {
    let proxy = zbus::fdo::IntrospectableProxy::builder(conn)
        .destination(hearth_dbus::BUS_NAME)
        .path(path.to_owned())
        .build()
        .await?;
    Ok(proxy.introspect().await?)
}

/// A chat request dictionary for the given user message.
pub fn chat_request(user: &str, max_tokens: u32) -> HashMap<&'static str, Variant<'static>> {
    HashMap::from([
        (hearth_dbus::request_key::MESSAGES, hearth_dbus::messages_value(&[("user", user)])),
        (hearth_dbus::request_key::MAX_TOKENS, Variant::from(max_tokens)),
    ])
}

/// [`chat_request`] with a `priority` ("interactive", "normal" or "background").
pub fn with_priority(user: &str, max_tokens: u32, priority: &str) -> HashMap<&'static str, Variant<'static>> {
    let mut r = chat_request(user, max_tokens);
    r.insert(hearth_dbus::request_key::PRIORITY, Variant::from(priority.to_owned()));
    r
}

/// A result dictionary (Complete's reply, Finished's argument).
pub type ResultDict = hearth_dbus::GenerationResult;

/// Everything a stream sent, until Finished.
#[derive(Debug, Default)]
pub struct Seen {
    pub tokens: usize,
    pub migrated: bool,
    pub result: Option<ResultDict>,
}

/// Consumes `g` in a task, counting tokens into `count` as they come.
pub fn watch_stream(
    mut g: Generation,
    count: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> tokio::task::JoinHandle<Seen> {
    tokio::spawn(async move {
        let mut seen = Seen::default();
        while let Some(event) = g.next().await {
            match event.unwrap() {
                StreamEvent::Token { .. } => {
                    seen.tokens += 1;
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                StreamEvent::Migrated { .. } => seen.migrated = true,
                StreamEvent::Finished(r) => {
                    seen.result = Some(*r);
                    break;
                }
            }
        }
        seen
    })
}

/// Collects a generation's events until Finished: (index, token id, text) per token, and the
/// result. Each event must arrive within `per_event`.
pub async fn collect(mut g: Generation, per_event: Duration) -> (Vec<(u32, i32, String)>, ResultDict) {
    let mut tokens = Vec::new();
    while let Some(ev) = tokio::time::timeout(per_event, g.next()).await.expect("event in time") {
        match ev.expect("event") {
            StreamEvent::Token { index, token_id, text } => tokens.push((index, token_id, text)),
            StreamEvent::Finished(result) => return (tokens, *result),
            StreamEvent::Migrated { .. } => {}
        }
    }
    panic!("stream ended without Finished");
}

/// Path of a file inside the repository.
pub fn repo_file(rel: impl AsRef<Path>) -> PathBuf {
    workspace_root().join(rel)
}

/// A models directory made for one test: the real default model under other names, and
/// broken or untrusted files, each with a manifest.
#[derive(Debug)]
pub struct ModelDir {
    dir: tempfile::TempDir,
}

impl Default for ModelDir {
    fn default() -> Self {
        Self::new()
    }
}

impl ModelDir {
    /// An empty directory (mode 0755, owned by the test's user), on the checkout's file
    /// system so the real model can be hard-linked instead of copied.
    pub fn new() -> Self {
        use std::os::unix::fs::PermissionsExt;
        let base = workspace_root().join("target/test-models");
        std::fs::create_dir_all(&base).expect("create target/test-models");
        let dir = tempfile::tempdir_in(&base).expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The real default model as `file` (hard link, or a copy across file systems).
    pub fn link_default_model(&self, file: &str) -> PathBuf {
        self.link_model(&model_path(), file)
    }

    /// The model file `src` as `file` (hard link, or a copy across file systems).
    pub fn link_model(&self, src: &Path, file: &str) -> PathBuf {
        let dst = self.path().join(file);
        if !dst.exists() && std::fs::hard_link(src, &dst).is_err() {
            std::fs::copy(src, &dst).expect("copy model");
        }
        dst
    }

    /// Writes `bytes` as `file` with `mode`.
    pub fn write_file(&self, file: &str, bytes: &[u8], mode: u32) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = self.path().join(file);
        std::fs::write(&p, bytes).expect("write file");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        p
    }

    /// Writes the manifest `<name>.toml` for `file` with its sha256 (of the bytes there now, or
    /// `sha256` when given) and `extra` TOML lines.
    pub fn manifest(&self, name: &str, file: &str, sha256: Option<&str>, extra: &str) -> PathBuf {
        let sha = sha256.map_or_else(|| sha256_file(&self.path().join(file)), str::to_owned);
        let text = format!("name = {name:?}\nfile = {file:?}\nsha256 = {sha:?}\n{extra}\n");
        self.write_file(&format!("{name}.toml"), text.as_bytes(), 0o644)
    }

    /// Writes a LoRA adapter for the default model as `file`, with tests/tools/make-lora.py
    /// (gguf-py) and its `extra` arguments.
    pub fn make_lora(&self, file: &str, extra: &[&str]) {
        self.run_gguf_tool("make-lora.py", file, extra);
    }

    /// Writes a vision projector for the default model as `file`, with
    /// tests/tools/make-mmproj.py (gguf-py) and its `extra` arguments.
    pub fn make_mmproj(&self, file: &str, extra: &[&str]) {
        self.run_gguf_tool("make-mmproj.py", file, extra);
    }

    /// A copy of the default model as `file` with the chat template `template` (a path from
    /// the workspace root), written by gguf-py's gguf-new-metadata.
    pub fn with_chat_template(&self, file: &str, template: &str) {
        let tool = workspace_root().join(".venv/bin/gguf-new-metadata");
        assert!(tool.exists(), "{} is missing: run scripts/setup-deps.sh", tool.display());
        let out = std::process::Command::new(tool)
            .arg(model_path())
            .arg(self.path().join(file))
            .arg("--chat-template-file")
            .arg(workspace_root().join(template))
            .arg("--force")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run gguf-new-metadata: {e}"));
        assert!(out.status.success(), "gguf-new-metadata: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Runs the gguf-py tool `script` on the default model, writing `file` here.
    fn run_gguf_tool(&self, script: &str, file: &str, extra: &[&str]) {
        let python = workspace_root().join(".venv/bin/python");
        assert!(python.exists(), "{} is missing: run scripts/setup-deps.sh", python.display());
        let out = std::process::Command::new(python)
            .arg(workspace_root().join("tests/tools").join(script))
            .arg(model_path())
            .arg(self.path().join(file))
            .args(extra)
            .output()
            .unwrap_or_else(|e| panic!("run {script}: {e}"));
        assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// A vision model: the default model with a test projector (make-mmproj.py), under the
    /// manifest `name`.
    pub fn vision_model(&self, name: &str) {
        self.vision_model_with(name, &[]);
    }

    /// [`ModelDir::vision_model`] with make-mmproj.py's `extra` arguments (its own projector
    /// file).
    pub fn vision_model_with(&self, name: &str, extra: &[&str]) {
        self.link_default_model("m.gguf");
        let file = format!("{name}.mmproj.gguf");
        self.make_mmproj(&file, extra);
        let sha = sha256_file(&self.path().join(&file));
        let extra = format!("capabilities = [\"chat\", \"vision\"]\n[mmproj]\nfile = {file:?}\nsha256 = {sha:?}\n");
        self.manifest(name, "m.gguf", None, &extra);
    }
}

/// Lower-case hex sha256 of a file.
pub fn sha256_file(path: &Path) -> String {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    let mut f = std::fs::File::open(path).expect("open for hashing");
    std::io::copy(&mut f, &mut hasher).expect("hash");
    hex::encode(hasher.finalize())
}

/// Resident memory of a process in KiB (VmRSS).
pub fn rss_kib(pid: nix::unistd::Pid) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Polls `check` every 50 ms until it returns Some or `limit` passes.
pub async fn wait_for<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The app id hearthd derives for a plain process (no sandbox, no app unit).
pub fn process_app(uid: u32, exe: &Path) -> String {
    format!("uid:{uid}:{}", exe.display())
}

/// The app id hearthd gives this test process.
pub fn this_app() -> String {
    process_app(nix::unistd::geteuid().as_raw(), &std::fs::read_link("/proc/self/exe").expect("/proc/self/exe"))
}

/// A directory of app policy files, readable by everyone (the daemon checks ownership).
pub fn apps_dir(files: &[(&str, String)]) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    for (name, body) in files {
        std::fs::write(dir.path().join(name), body).expect("write policy");
    }
    dir
}

/// The `[apps]` setting that reads policies from `dir`.
pub fn apps_setting(dir: &Path) -> String {
    format!("dirs = [{:?}]\n", dir.display().to_string())
}

/// A datagram socket standing in for systemd's NOTIFY_SOCKET.
#[derive(Debug)]
pub struct NotifySocket {
    sock: std::os::unix::net::UnixDatagram,
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Default for NotifySocket {
    fn default() -> Self {
        Self::new()
    }
}

impl NotifySocket {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        Self { sock, path, _dir: dir }
    }

    /// Messages received within `window`, each with its arrival time.
    pub fn drain(&self, window: Duration) -> Vec<(Instant, String)> {
        let end = Instant::now() + window;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < end {
            if let Ok(n) = self.sock.recv(&mut buf) {
                got.push((Instant::now(), String::from_utf8_lossy(&buf[..n]).into_owned()));
            }
        }
        got
    }
}
