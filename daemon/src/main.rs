//! hearthd: the on-device AI system service. Owns the model and the accelerator, serves
//! `org.hearth.Hearth1` on the system bus (or `--bus-address`), and stops cleanly on
//! SIGTERM/SIGINT: in-flight requests end with `Cancelled`, the name is released, exit 0.

#![forbid(unsafe_code)]

mod config;
mod engine;
mod error;
mod models;
mod request;
mod service;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use futures_util::StreamExt;
use signal_hook::consts::{SIGINT, SIGTERM};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::Config;
use crate::engine::EngineHandle;
use crate::models::Catalog;
use crate::service::{CallerCache, HearthService, InFlight};

/// How long shutdown waits for callers to receive their final messages.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

#[derive(Debug, Parser)]
#[command(name = "hearthd", version, about = "Hearth: the phone's own AI service")]
struct Args {
    /// Configuration file (instead of /usr/share/hearth/hearthd.toml + /etc/hearth/hearthd.toml).
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// D-Bus address to serve on instead of the system bus (tests, demos).
    #[arg(long, value_name = "ADDRESS")]
    bus_address: Option<String>,
}

#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Catalog(#[from] models::CatalogError),
    #[error("cannot start the engine: {0}")]
    Engine(#[from] engine::StartError),
    #[error("D-Bus: {0}")]
    Bus(#[from] zbus::Error),
    #[error("cannot set up the runtime or signals: {0}")]
    Io(#[from] std::io::Error),
}

fn init_logging() {
    let filter = EnvFilter::try_from_env("HEARTH_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Under systemd, stderr is already the journal; the native journald layer keeps fields.
    let journald = std::env::var_os("JOURNAL_STREAM").and_then(|_| tracing_journald::layer().ok());
    let registry = tracing_subscriber::registry().with(filter);
    match journald {
        Some(layer) => registry.with(layer).init(),
        None => registry.with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr)).init(),
    }
}

fn main() -> ExitCode {
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
    let config = Config::load(args.config.as_deref())?;
    let catalog = Arc::new(Catalog::scan(&config.models.dirs)?);
    tracing::info!(version = env!("CARGO_PKG_VERSION"), models = catalog.len(), "hearthd starting");
    if catalog.is_empty() {
        tracing::warn!(dirs = ?config.models.dirs, "no model manifests found");
    }
    let (engine, engine_thread) = EngineHandle::start(&config, &catalog)?;
    // The engine thread does the compute; D-Bus work is I/O and fits one runtime thread,
    // which also keeps it from competing with the compute threads for cores.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let served = runtime.block_on(serve(args, &config, catalog, engine.clone()));
    // Whatever happened on the bus, stop the engine before leaving.
    runtime.block_on(engine.shutdown());
    drop(engine);
    if engine_thread.join().is_err() {
        tracing::error!("engine thread panicked");
    }
    tracing::info!("hearthd stopped");
    served
}

async fn serve(args: Args, config: &Config, catalog: Arc<Catalog>, engine: EngineHandle) -> Result<(), MainError> {
    let mut signals = signal_hook_tokio::Signals::new([SIGTERM, SIGINT])?;
    let in_flight = InFlight::default();
    let callers = CallerCache::default();
    let service = HearthService::new(
        engine.clone(),
        catalog,
        config.limits.default_max_tokens,
        in_flight.clone(),
        callers.clone(),
    );
    let builder = match &args.bus_address {
        Some(address) => zbus::connection::Builder::address(address.as_str())?,
        None => zbus::connection::Builder::system()?,
    };
    let conn = builder.serve_at(hearth_dbus::OBJECT_PATH, service)?.name(hearth_dbus::BUS_NAME)?.build().await?;
    tracing::info!(name = hearth_dbus::BUS_NAME, unique = ?conn.unique_name().map(|n| n.as_str()), "serving");
    let status_task = tokio::spawn(service::publish_status_changes(conn.clone(), engine.status()));
    let disconnect_task = tokio::spawn(service::watch_disconnects(conn.clone(), engine.clone(), callers));

    let signal = signals.next().await;
    tracing::info!(signal = ?signal, "stopping: cancelling in-flight requests");
    engine.shutdown().await;
    if !in_flight.drained(DRAIN_LIMIT).await {
        tracing::warn!("some callers did not get their final message within {DRAIN_LIMIT:?}");
    }
    status_task.abort();
    disconnect_task.abort();
    // Let the final replies queued on the connection go out before leaving the bus.
    tokio::task::yield_now().await;
    if let Err(e) = conn.release_name(hearth_dbus::BUS_NAME).await {
        tracing::warn!(error = %e, "cannot release the bus name");
    }
    signals.handle().close();
    Ok(())
}
