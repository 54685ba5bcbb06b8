//! hearthd: the on-device AI system service. Owns the model and the accelerator, serves
//! `org.hearth.Hearth1` on the system bus (or `--bus-address`), and stops cleanly on
//! SIGTERM/SIGINT: in-flight requests end with `Cancelled`, the name is released, exit 0.
//! Losing the bus is fatal: the engines stop and hearthd exits non-zero.
//!
//! One library, two programs: `hearthd` ([`hearthd_main`]) and `hearth-engine`
//! ([`engine::child::main`]), the sandboxed process hearthd starts for each loaded model.

#![forbid(unsafe_code)]

pub mod cloud;
pub mod config;
pub mod energy;
pub mod engine;
pub mod error;
pub mod gate;
pub mod governor;
pub mod identity;
pub mod manager;
pub mod memory;
pub mod models;
pub mod parked;
pub mod policy;
pub mod polkit;
pub mod privacy;
pub mod request;
pub mod seal;
pub mod service;
pub mod state_file;
pub mod structured;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use futures_util::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::Config;
use crate::gate::Gate;
use crate::manager::ModelManager;
use crate::models::Catalog;
use crate::service::{CallerCache, HearthService, InFlight};

/// How long shutdown waits for callers to receive their final messages.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

#[derive(Debug, Parser)]
#[command(name = "hearthd", version, about = "Hearth: the phone's own AI service")]
struct Args {
    /// Configuration file, instead of /usr/share/hearth/hearthd.toml + /etc/hearth/hearthd.toml;
    /// repeat it to layer several (later files override earlier ones key by key).
    #[arg(long, value_name = "PATH")]
    config: Vec<PathBuf>,
    /// D-Bus address to serve on instead of the system bus (tests, demos).
    #[arg(long, value_name = "ADDRESS")]
    bus_address: Option<String>,
}

#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Models(#[from] manager::ManagerError),
    #[error(transparent)]
    Gate(#[from] gate::GateError),
    #[error("cloud: {0}")]
    Cloud(String),
    #[error("D-Bus: {0}")]
    Bus(#[from] zbus::Error),
    #[error("cannot prepare the sessions directory in the state directory: {0}")]
    Sessions(std::io::Error),
    #[error("cannot set up the runtime or signals: {0}")]
    Io(#[from] std::io::Error),
    /// The bus connection closed under us: every caller is gone and nobody can reach us, so
    /// decoding on is pointless. Exiting non-zero lets `Restart=on-failure` bring us back.
    #[error("lost the connection to the bus: exiting so the service manager restarts hearthd")]
    BusLost,
}

fn init_logging() {
    let filter = EnvFilter::try_from_env("HEARTH_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Under systemd, stderr is already the journal; the native journald layer keeps fields.
    let journald = std::env::var_os("JOURNAL_STREAM").and_then(|_| tracing_journald::layer().ok());
    let registry = tracing_subscriber::registry().with(filter);
    match journald {
        Some(layer) => registry.with(layer).init(),
        None => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .init(),
    }
}

/// hearthd's `main`.
pub fn hearthd_main() -> ExitCode {
    let args = Args::parse();
    init_logging();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("hearthd: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), MainError> {
    let config = Config::load(&args.config)?;
    let catalog = Arc::new(Catalog::scan(&config.models.dirs));
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        models = catalog.len(),
        rejected = catalog.rejected().len(),
        "hearthd starting"
    );
    if catalog.is_empty() {
        tracing::warn!(dirs = ?config.models.dirs, "no usable model manifests found");
    }
    let gate = Arc::new(Gate::new(&config)?);
    let budget = memory::budget(&config.memory);
    let throttle = Arc::new(engine::Throttle::default());
    let sessions = parked::SessionStore::new(
        &config.daemon.state_dir,
        Arc::clone(gate.sealer()),
        config.limits.parked_sessions_mib << 20,
    )
    .map_err(MainError::Sessions)?;
    let devices = manager::probe_devices(&config)?;
    let models =
        ModelManager::new(config.clone(), catalog, budget, Arc::clone(&throttle), Arc::new(sessions), devices)?;
    let governor = governor::Governor::new(config.governor.clone(), throttle, config.threads().max(1) as u32);
    for manager::BackendReport { device: d, owned, .. } in models.backends() {
        tracing::info!(device = %d.name, kind = d.kind.as_str(), memory_total = d.memory_total, owned, "compute device");
    }
    tracing::info!(budget_mib = budget >> 20, "memory budget for models");
    models.watch_ceiling(&config.memory)?;
    // The engines do the compute on their own threads; D-Bus work is I/O and fits one
    // runtime thread, which also keeps it from competing with the compute threads for cores.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let served = runtime.block_on(serve(args, &config, models.clone(), gate, governor));
    // Whatever happened on the bus, stop the engines before leaving.
    runtime.block_on(models.shutdown());
    tracing::info!("hearthd stopped");
    served
}

async fn serve(
    args: Args,
    config: &Config,
    models: ModelManager,
    gate: Arc<Gate>,
    governor: governor::Governor,
) -> Result<(), MainError> {
    let mut signals = signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    let in_flight = InFlight::default();
    let callers = CallerCache::default();
    let governor_status = governor.status();
    let cloud = cloud::Cloud::new(&config.cloud).map_err(MainError::Cloud)?.map(Arc::new);
    let service = HearthService::new(
        models.clone(),
        Arc::clone(&gate),
        governor_status.clone(),
        cloud.clone(),
        args.config.clone(),
        in_flight.clone(),
        callers.clone(),
    );
    let builder = match &args.bus_address {
        Some(address) => zbus::connection::Builder::address(address.as_str()),
        None => zbus::connection::Builder::system(),
    };
    let conn = builder.serve_at(hearth_dbus::OBJECT_PATH, service).name(hearth_dbus::BUS_NAME).build().await?;
    tracing::info!(name = hearth_dbus::BUS_NAME, unique = ?conn.unique_name().map(|n| n.as_str()), "serving");
    let tasks = [
        tokio::spawn(service::publish_status_changes(conn.clone(), models.status())),
        tokio::spawn(service::watch_disconnects(conn.clone(), models.clone(), callers)),
        tokio::spawn(expire_idle_models(models.clone())),
        tokio::spawn(watch_memory_pressure(models.clone(), config.memory.clone())),
        tokio::spawn({
            let models = models.clone();
            async move { models.preload_pinned().await }
        }),
        tokio::spawn(ping_watchdog(models.clone())),
        tokio::spawn(run_governor(governor, conn.clone(), config.governor.enabled)),
        tokio::spawn(service::publish_governor_changes(conn.clone(), governor_status, models.throttle())),
        tokio::spawn(service::publish_cloud_changes(conn.clone(), cloud.clone())),
    ];
    notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status("serving")]);

    let stop = loop {
        tokio::select! {
            signal = signals.next() => match signal {
                Some(SIGHUP) => reload(&args, &models, &gate),
                other => break Ok(other),
            },
            () = conn.closed() => break Err(MainError::BusLost),
        }
    };
    match &stop {
        Ok(signal) => tracing::info!(signal = ?signal, "stopping: cancelling in-flight requests"),
        Err(e) => tracing::error!("{e}"),
    }
    notify(&[sd_notify::NotifyState::Stopping]);
    for task in &tasks {
        task.abort();
    }
    models.shutdown().await;
    // Without a bus no final message can go out: nothing to wait for.
    if stop.is_ok() && !in_flight.drained(DRAIN_LIMIT).await {
        tracing::warn!("some callers did not get their final message within {DRAIN_LIMIT:?}");
    }
    // Let the final replies queued on the connection go out before leaving the bus.
    tokio::task::yield_now().await;
    if stop.is_ok()
        && let Err(e) = conn.release_name(hearth_dbus::BUS_NAME).await
    {
        tracing::warn!(error = %e, "cannot release the bus name");
    }
    signals.handle().close();
    stop.map(|_| ())
}

/// Tells the service manager (systemd, Type=notify) about a state change; a no-op when not
/// started by one.
fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// SIGHUP: reads the configuration and the model directories again and puts them in force.
/// Streams in flight and loaded models carry on; a bad configuration is refused, loudly, and
/// the running one stays.
fn reload(args: &Args, models: &ModelManager, gate: &Gate) {
    notify(&[sd_notify::NotifyState::Reloading]);
    let _ = reload_all(&args.config, models, gate);
    notify(&[sd_notify::NotifyState::Ready]);
}

/// Reads the configuration, the model directories and the app policies again and puts them
/// in force, all or nothing; the error says why when the running configuration stays.
pub(crate) fn reload_all(paths: &[PathBuf], models: &ModelManager, gate: &Gate) -> Result<(), String> {
    let result = Config::load(paths).map_err(|e| e.to_string()).and_then(|config| {
        // Policies first: they can fail on a bad file, and nothing has changed yet then.
        let apps = gate.reload(&config).map_err(|e| e.to_string())?;
        let catalog = Catalog::scan(&config.models.dirs);
        let installed = catalog.len();
        models.reload(config, catalog).map_err(|e| e.to_string()).map(|()| (installed, apps))
    });
    match result {
        Ok((installed, apps)) => {
            tracing::info!(models = installed, apps, "configuration reloaded");
            Ok(())
        }
        Err(e) => {
            tracing::error!(error = %e, "configuration not reloaded; the running one stays");
            Err(format!("configuration not reloaded: {e}"))
        }
    }
}

/// Pings the systemd watchdog (WatchdogSec=) while hearthd's own runtime turns: the one
/// thread that serves the bus, supervises the engines and runs the governors. An engine that
/// hangs is not hearthd hanging: its supervisor kills and restarts it (engine.hang_timeout_ms),
/// and the other models keep serving. Does nothing unless systemd asked for pings.
async fn ping_watchdog(models: ModelManager) {
    let Some(period) = sd_notify::watchdog_enabled() else { return };
    let every = period / 2;
    tracing::info!(period_ms = period.as_millis() as u64, "pinging the systemd watchdog");
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // The manager's table must be reachable too (its lock is never held across an await).
        let _ = models.engine_pids();
        notify(&[sd_notify::NotifyState::Watchdog]);
    }
}

/// Runs the power and thermal governors (when enabled), reading power-profiles-daemon's
/// profile every few seconds when it is on the bus.
async fn run_governor(mut governor: governor::Governor, conn: zbus::Connection, enabled: bool) {
    if !enabled {
        tracing::info!("governors disabled by configuration");
        return;
    }
    let mut tick = tokio::time::interval(governor.interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut power_saver = false;
    let mut next_profile = std::time::Instant::now();
    loop {
        tick.tick().await;
        if governor.follows_power_profiles() && std::time::Instant::now() >= next_profile {
            next_profile = std::time::Instant::now() + Duration::from_secs(5);
            power_saver = governor::active_power_profile(&conn).await.as_deref() == Some("power-saver");
        }
        governor.tick(power_saver);
    }
}

/// Unloads models whose keep-alive ran out.
async fn expire_idle_models(models: ModelManager) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        models.expire_idle().await;
    }
}

/// Samples memory pressure (PSI) and lets the model manager act on sustained pressure.
async fn watch_memory_pressure(models: ModelManager, config: config::MemoryConfig) {
    let Some(path) = memory::pressure_file(&config) else {
        tracing::info!("no memory pressure information (PSI) on this system: pressure is not watched");
        return;
    };
    tracing::info!(file = %path.display(), "watching memory pressure");
    let mut config = config;
    let mut detector = memory::PressureDetector::new(&config);
    let mut failing = false;
    loop {
        tokio::time::sleep(memory::interval(&config)).await;
        // Thresholds follow a reload (SIGHUP); the file stays the one chosen at start.
        let now = models.config().memory.clone();
        if now != config {
            detector = memory::PressureDetector::new(&now);
            config = now;
        }
        match memory::read_pressure(&path) {
            Ok(reading) => {
                failing = false;
                let sustained = detector.update(reading);
                models.on_pressure(reading, sustained).await;
            }
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(file = %path.display(), error = %e, "cannot read memory pressure");
            }
            Err(_) => {}
        }
    }
}
