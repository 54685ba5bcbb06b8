//! hearthctl: talk to hearthd from a shell. `status`, `models`, `generate "…"`, `chat`, `embed`,
//! `load`, `unload`.
//! Streams tokens as they arrive; `--json` prints machine-readable output instead.

#![forbid(unsafe_code)]

mod monitor;

use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use hearth_dbus::{Error, Generation, Hearth1Proxy, StreamEvent, request_key};
use serde_json::{Value as Json, json};
use zbus::Connection;
use zbus::{OwnedVariant, Variant};

#[derive(Debug, Parser)]
#[command(name = "hearthctl", version, about = "Client of the Hearth on-device AI service")]
struct Cli {
    /// D-Bus address of the bus hearthd is on (default: the system bus).
    #[arg(long, global = true, value_name = "ADDRESS")]
    bus_address: Option<String>,
    /// Machine-readable output (JSON; JSON Lines for generate).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Version, loaded models, queue, memory and compute devices of the running daemon.
    Status,
    /// The installed models.
    Models,
    /// A live view: requests and tokens/s per app, the queue, thermal and power state (root
    /// sees every app; others their own). Ctrl-C ends it.
    Top {
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Print one frame (tokens/s over one interval) and exit.
        #[arg(long)]
        once: bool,
    },
    /// The energy ledger: what the device drew, and each app's on-device work (root sees
    /// every app; others their own).
    Energy,
    /// Load a model now (admin: polkit org.hearth.Hearth1.manage-models, or root).
    Load {
        name: String,
        /// Keep it loaded until `hearthctl unload`.
        #[arg(long)]
        pin: bool,
    },
    /// Unload a model now (admin, as for load).
    Unload { name: String },
    /// Who hearthd takes this program to be (app id, uid, policy).
    Whoami,
    /// Seal text from stdin with the device key; the blob goes to stdout.
    Seal,
    /// Reload hearthd's configuration, models and app policies (admin).
    Reload,
    /// Ask the model; tokens are printed as they arrive.
    Generate(Box<GenerateArgs>),
    /// How many tokens a request would take of its model's context (the options of
    /// generate; nothing is generated).
    CountTokens(Box<GenerateArgs>),
    /// Whether a model (default: the default model) can serve this program now, and why not.
    Availability { model: Option<String> },
    /// A conversation in a session: each line on stdin is a turn; the answers stream to
    /// stdout. The session keeps the conversation's KV cache between turns.
    Chat(Conversation),
    /// Embeddings of texts (one JSON array of numbers per line), computed on the device.
    Embed {
        #[arg(required = true)]
        texts: Vec<String>,
        #[arg(long)]
        model: Option<String>,
        /// public, personal (default) or local.
        #[arg(long)]
        scope: Option<String>,
    },
    /// A task call: summarize, rewrite or proofread TEXT ("-": stdin), or describe an image
    /// file; options as KEY=VALUE (format=bullets, length=short, tone=formal, question=...).
    Task {
        /// summarize, rewrite, proofread or describe.
        #[arg(value_parser = ["summarize", "rewrite", "proofread", "describe"])]
        task: String,
        /// The text, or for describe the image file.
        input: String,
        #[arg(value_name = "KEY=VALUE")]
        options: Vec<String>,
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        max_tokens: Option<u32>,
        /// public, personal (default) or local.
        #[arg(long)]
        scope: Option<String>,
    },
}

/// What `generate` and `chat` both take.
#[derive(Debug, clap::Args)]
struct Conversation {
    /// A system message to put first.
    #[arg(long)]
    system: Option<String>,
    /// Model name (default: the daemon's default model).
    #[arg(long)]
    model: Option<String>,
    /// Most tokens of an answer.
    #[arg(long)]
    max_tokens: Option<u32>,
}

#[derive(Debug, clap::Args)]
struct GenerateArgs {
    /// The user's message.
    prompt: String,
    #[command(flatten)]
    conversation: Conversation,
    /// 0 is greedy.
    #[arg(long)]
    temperature: Option<f64>,
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long)]
    top_k: Option<u32>,
    #[arg(long)]
    seed: Option<u32>,
    /// End the answer just before this text (repeatable, up to 4).
    #[arg(long = "stop", value_name = "TEXT")]
    stops: Vec<String>,
    /// Divide a repeated token's logit by this (0 < x <= 2; 1 is off).
    #[arg(long)]
    repetition_penalty: Option<f64>,
    /// Lower a token's logit by this per time it was generated (-2..=2).
    #[arg(long)]
    frequency_penalty: Option<f64>,
    /// Lower a token's logit by this once it was generated (-2..=2).
    #[arg(long)]
    presence_penalty: Option<f64>,
    /// Report each token's log-probability with the N likeliest alternatives (0-20); shown
    /// with --json.
    #[arg(long, value_name = "N")]
    logprobs: Option<u32>,
    /// interactive, normal (default) or background.
    #[arg(long)]
    priority: Option<String>,
    /// Cancel the request if it has not finished after this many milliseconds.
    #[arg(long)]
    deadline_ms: Option<u32>,
    /// Privacy scope of the prompt: public, personal (default) or local.
    #[arg(long)]
    scope: Option<String>,
    /// auto (default), local or cloud.
    #[arg(long)]
    route: Option<String>,
    /// A sealed blob (from `hearthctl seal`) sent as a message before the prompt.
    #[arg(long, value_name = "FILE")]
    sealed: Option<std::path::PathBuf>,
    /// A PNG or JPEG image sent with the prompt (repeatable; vision models only).
    #[arg(long = "image", value_name = "FILE")]
    images: Vec<std::path::PathBuf>,
    /// A sealed image (from `hearthctl seal IMAGE`) sent with the prompt (repeatable).
    #[arg(long = "sealed-image", value_name = "FILE")]
    sealed_images: Vec<std::path::PathBuf>,
    /// The answer must be JSON valid against the JSON Schema in FILE.
    #[arg(long, value_name = "FILE")]
    json_schema: Option<std::path::PathBuf>,
    /// The answer must follow the GBNF grammar in FILE.
    #[arg(long, value_name = "FILE")]
    grammar: Option<std::path::PathBuf>,
    /// OpenAI-style tools (a JSON array) in FILE; a call is printed as JSON.
    #[arg(long, value_name = "FILE")]
    tools: Option<std::path::PathBuf>,
    /// With --tools: auto (default), required or none.
    #[arg(long)]
    tool_choice: Option<String>,
    /// A LoRA adapter of the model at a scale, NAME=SCALE (repeatable); without it, the
    /// model's adapters at their manifest scales.
    #[arg(long = "adapter", value_name = "NAME=SCALE")]
    adapters: Vec<String>,
}

/// Puts the image files `images` and the sealed ones `sealed` into the message `m`.
fn attach_images(
    m: &mut HashMap<String, Variant<'static>>,
    images: &[std::path::PathBuf],
    sealed: &[std::path::PathBuf],
) -> std::io::Result<()> {
    for (key, files) in [(request_key::IMAGES, images), (request_key::SEALED_IMAGES, sealed)] {
        if !files.is_empty() {
            let bytes: Vec<Vec<u8>> = files.iter().map(std::fs::read).collect::<Result<_, _>>()?;
            m.insert(key.to_owned(), Variant::from(bytes));
        }
    }
    Ok(())
}

#[derive(Debug)]
enum CliError {
    Bus(Error),
    Io(std::io::Error),
}

impl From<Error> for CliError {
    fn from(e: Error) -> Self {
        Self::Bus(e)
    }
}

impl From<zbus::Error> for CliError {
    fn from(e: zbus::Error) -> Self {
        Self::Bus(e.into())
    }
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Bus(Error::ZBus(e)) => write!(f, "D-Bus: {e}"),
            Self::Bus(e) => write!(f, "{}: {}", e.dbus_name(), e.message()),
            Self::Io(e) => write!(f, "{e}"),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hearthctl: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hearthctl: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn connect(address: Option<&str>) -> Result<Connection, CliError> {
    Ok(match address {
        Some(a) => zbus::connection::Builder::address(a).build().await?,
        None => Connection::system().await?,
    })
}

/// Converts a D-Bus value into JSON for `--json`.
fn to_json(v: &Variant<'_>) -> Json {
    match v {
        Variant::U8(n) => json!(n),
        Variant::Bool(b) => json!(b),
        Variant::I16(n) => json!(n),
        Variant::U16(n) => json!(n),
        Variant::I32(n) => json!(n),
        Variant::U32(n) => json!(n),
        Variant::I64(n) => json!(n),
        Variant::U64(n) => json!(n),
        Variant::F64(n) => json!(n),
        Variant::Str(s) => json!(s.as_str()),
        Variant::ObjectPath(p) => json!(p.as_str()),
        Variant::Variant(inner) => to_json(inner),
        Variant::Array(a) => Json::Array(a.inner().iter().map(to_json).collect()),
        Variant::Structure(s) => Json::Array(s.fields().iter().map(to_json).collect()),
        Variant::Dict(d) => Json::Object(
            d.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Variant::Str(s) => s.as_str().to_owned(),
                        other => to_json(other).to_string(),
                    };
                    (key, to_json(v))
                })
                .collect(),
        ),
        other => json!(other.to_string()),
    }
}

/// One of the service's typed `a{sv}` dictionaries as JSON, with its D-Bus keys (absent
/// ones left out): through its wire form, so the JSON is what the bus carried.
fn typed_json<T: zbus::export::serde::Serialize + zbus::zvariant::Type>(t: &T) -> Json {
    use zbus::wire::serialized::Context;
    let dict = zbus::wire::to_bytes(Context::new(zbus::wire::LE, 0), t)
        .and_then(|bytes| bytes.deserialize::<HashMap<String, OwnedVariant>>().map(|(d, _)| d));
    match dict {
        Ok(d) => dict_json(&d),
        Err(e) => json!({ "error": e.to_string() }),
    }
}

fn dict_json(d: &HashMap<String, OwnedVariant>) -> Json {
    Json::Object(d.iter().map(|(k, v)| (k.clone(), to_json(v))).collect())
}

async fn run(cli: Cli) -> Result<ExitCode, CliError> {
    let conn = connect(cli.bus_address.as_deref()).await?;
    let proxy = Hearth1Proxy::new(&conn).await?;
    let counting = matches!(cli.command, Command::CountTokens(_));
    match cli.command {
        Command::Status => {
            let (version, models, depth) =
                (proxy.version().await?, proxy.loaded_models().await?, proxy.queue_depth().await?);
            let memory = typed_json(&proxy.memory().await?);
            let backends: Vec<Json> = proxy.backends().await?.iter().map(typed_json).collect();
            let (thermal, power) = (proxy.thermal_state().await?, proxy.power_state().await?);
            let throttle = typed_json(&proxy.throttle().await?);
            let cloud = proxy.cloud_available().await?;
            if cli.json {
                println!(
                    "{}",
                    json!({ "version": version, "loaded_models": models, "queue_depth": depth,
                            "memory": memory, "backends": backends, "thermal_state": thermal,
                            "power_state": power, "throttle": throttle, "cloud_available": cloud })
                );
            } else {
                let mib = |k: &str| memory[k].as_u64().unwrap_or(0) as f64 / f64::from(1u32 << 20);
                println!("version:       {version}\nloaded models: {}\nqueue depth:   {depth}", models.join(", "));
                println!(
                    "memory:        {:.0} of {:.0} MiB{}",
                    mib("used_bytes"),
                    mib("budget_bytes"),
                    if memory["pressure"] == json!(true) { " (under pressure)" } else { "" }
                );
                println!(
                    "heap:          {:.0} MiB, ceiling {:.0} MiB{}",
                    mib("anon_bytes"),
                    mib("ceiling_bytes"),
                    if memory["over_ceiling"] == json!(true) { " (over: device work refused)" } else { "" }
                );
                let cap = throttle["rate_cap_tps"].as_f64().unwrap_or(0.0);
                println!(
                    "thermal:       {thermal}{}\npower:         {power}{}\nthrottle:      {}{}",
                    throttle["temperature_c"].as_f64().map(|t| format!(" ({t:.1} °C)")).unwrap_or_default(),
                    throttle["battery_pct"].as_u64().map(|b| format!(" ({b}%)")).unwrap_or_default(),
                    match throttle["duty"].as_f64().filter(|d| *d < 1.0) {
                        Some(d) => format!("{:.0}% duty, ~{cap:.1} tok/s", 100.0 * d),
                        None if cap > 0.0 => format!("{cap:.1} tok/s cap"),
                        None => "none".to_owned(),
                    },
                    if throttle["defer_background"] == json!(true) { ", background deferred" } else { "" }
                );
                // CloudAvailable: configured and its circuit breaker closed or half-open.
                println!("cloud:         {}", if cloud { "available" } else { "not available" });
                for b in &backends {
                    println!(
                        "device:        {} ({}, {}){}",
                        b["name"].as_str().unwrap_or("?"),
                        b["kind"].as_str().unwrap_or("?"),
                        b["description"].as_str().unwrap_or(""),
                        if b["owned"] == json!(true) { "" } else { " not used" }
                    );
                }
            }
        }
        Command::Load { name, pin } => {
            proxy.load_model(&name, HashMap::from([("pin", Variant::from(pin))])).await?;
        }
        Command::Unload { name } => {
            proxy.unload_model(&name).await?;
        }
        Command::Whoami => {
            let info = typed_json(&proxy.caller_info().await?);
            if cli.json {
                println!("{info}");
            } else if let Json::Object(map) = info {
                for (k, v) in map {
                    println!("{k}: {v}");
                }
            }
        }
        Command::Seal => {
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut data)?;
            let blob = proxy.seal(&data, HashMap::new()).await?;
            std::io::stdout().write_all(&blob)?;
        }
        Command::Reload => {
            proxy.reload().await?;
        }
        Command::Top { interval, once } => monitor::top(&proxy, cli.json, interval, once).await?,
        Command::Energy => monitor::energy(&proxy, cli.json).await?,
        Command::Models => {
            let models = proxy.list_models().await?;
            if cli.json {
                println!("{}", Json::Array(models.iter().map(typed_json).collect()));
            } else {
                for m in &models {
                    let loaded = if m.loaded { "loaded" } else { "installed" };
                    let pinned = if m.pinned { ",pinned" } else { "" };
                    let error = m.error.as_ref().map(|e| format!("\terror: {e}")).unwrap_or_default();
                    println!("{}\t{loaded}{pinned}\t{}{error}", m.name, m.file);
                }
            }
        }
        Command::Generate(args) | Command::CountTokens(args) => {
            let GenerateArgs {
                prompt,
                conversation: Conversation { system, model, max_tokens },
                temperature,
                top_p,
                top_k,
                seed,
                stops,
                repetition_penalty,
                frequency_penalty,
                presence_penalty,
                logprobs,
                priority,
                deadline_ms,
                scope,
                route,
                sealed,
                images,
                sealed_images,
                json_schema,
                grammar,
                tools,
                tool_choice,
                adapters,
            } = *args;
            let text = |role: &str, content: &str, scope: Option<&str>| {
                let mut m = HashMap::from([
                    (request_key::ROLE.to_owned(), Variant::from(role.to_owned())),
                    (request_key::CONTENT.to_owned(), Variant::from(content.to_owned())),
                ]);
                if let Some(s) = scope {
                    m.insert(request_key::SCOPE.to_owned(), Variant::from(s.to_owned()));
                }
                m
            };
            let mut messages = Vec::new();
            if let Some(s) = &system {
                messages.push(text("system", s, None));
            }
            if let Some(path) = &sealed {
                let blob = std::fs::read(path)?;
                messages.push(HashMap::from([
                    (request_key::ROLE.to_owned(), Variant::from("user")),
                    (request_key::SEALED.to_owned(), Variant::from(blob)),
                ]));
            }
            let mut user = text("user", &prompt, scope.as_deref());
            attach_images(&mut user, &images, &sealed_images)?;
            messages.push(user);
            let mut request: HashMap<&str, Variant<'_>> =
                HashMap::from([(request_key::MESSAGES, Variant::from(messages))]);
            if let Some(r) = &route {
                request.insert(request_key::ROUTE, Variant::from(r.as_str()));
            }
            if let Some(m) = &model {
                request.insert(request_key::MODEL, Variant::from(m.as_str()));
            }
            if let Some(n) = max_tokens {
                request.insert(request_key::MAX_TOKENS, Variant::from(n));
            }
            if let Some(t) = temperature {
                request.insert(request_key::TEMPERATURE, Variant::from(t));
            }
            if let Some(p) = top_p {
                request.insert(request_key::TOP_P, Variant::from(p));
            }
            if let Some(k) = top_k {
                request.insert(request_key::TOP_K, Variant::from(k));
            }
            if let Some(s) = seed {
                request.insert(request_key::SEED, Variant::from(s));
            }
            if !stops.is_empty() {
                request.insert(request_key::STOP, Variant::from(stops));
            }
            for (key, value) in [
                (request_key::REPETITION_PENALTY, repetition_penalty),
                (request_key::FREQUENCY_PENALTY, frequency_penalty),
                (request_key::PRESENCE_PENALTY, presence_penalty),
            ] {
                if let Some(x) = value {
                    request.insert(key, Variant::from(x));
                }
            }
            if let Some(n) = logprobs {
                request.insert(request_key::LOGPROBS, Variant::from(true));
                request.insert(request_key::TOP_LOGPROBS, Variant::from(n));
            }
            if let Some(p) = &priority {
                request.insert(request_key::PRIORITY, Variant::from(p.as_str()));
            }
            if let Some(d) = deadline_ms {
                request.insert(request_key::DEADLINE_MS, Variant::from(d));
            }
            for (key, file) in
                [(request_key::JSON_SCHEMA, json_schema), (request_key::GRAMMAR, grammar), (request_key::TOOLS, tools)]
            {
                if let Some(path) = file {
                    request.insert(key, Variant::from(std::fs::read_to_string(path)?));
                }
            }
            if let Some(c) = tool_choice {
                request.insert(request_key::TOOL_CHOICE, Variant::from(c));
            }
            if !adapters.is_empty() {
                let mut scales = HashMap::new();
                for a in &adapters {
                    let parsed = a.split_once('=').and_then(|(n, x)| Some((n.to_owned(), x.parse::<f64>().ok()?)));
                    let Some((name, scale)) = parsed else {
                        eprintln!("hearthctl: --adapter takes NAME=SCALE, got {a:?}");
                        return Ok(ExitCode::from(2));
                    };
                    scales.insert(name, scale);
                }
                request.insert(request_key::ADAPTERS, Variant::from(scales));
            }
            if counting {
                let c = proxy.count_tokens(request).await?;
                if cli.json {
                    println!("{}", typed_json(&c));
                } else {
                    println!(
                        "{} prompt tokens ({} of images) of {}'s {} context: {} left{}",
                        c.prompt_tokens,
                        c.image_tokens,
                        c.model,
                        c.context_length,
                        c.remaining,
                        if c.fits { "" } else { " (does not fit)" }
                    );
                }
                return Ok(ExitCode::SUCCESS);
            }
            return generate(&conn, None, request, cli.json).await;
        }
        Command::Chat(Conversation { system, model, max_tokens }) => {
            let mut options: HashMap<&str, Variant<'_>> = HashMap::new();
            if let Some(m) = &model {
                options.insert(request_key::MODEL, Variant::from(m.as_str()));
            }
            let session = proxy.open_session(options).await?;
            let mut system = system;
            let mut status = ExitCode::SUCCESS;
            let mut images = Vec::new();
            for line in std::io::stdin().lines() {
                let line = line?;
                if line.trim().is_empty() {
                    continue;
                }
                // "/image FILE" attaches an image to the next message.
                if let Some(file) = line.strip_prefix("/image ") {
                    images.push(std::path::PathBuf::from(file.trim()));
                    continue;
                }
                let mut turn: Vec<(&str, &str)> = Vec::new();
                let first = system.take();
                if let Some(s) = &first {
                    turn.push(("system", s));
                }
                turn.push(("user", &line));
                let mut messages = hearth_dbus::messages(&turn);
                if let Some(user) = messages.last_mut() {
                    attach_images(user, &std::mem::take(&mut images), &[])?;
                }
                let mut request: HashMap<&str, Variant<'_>> =
                    HashMap::from([(request_key::MESSAGES, Variant::from(messages))]);
                if let Some(n) = max_tokens {
                    request.insert(request_key::MAX_TOKENS, Variant::from(n));
                }
                // A failed turn (too long, busy) leaves the session as it was: say so, go on.
                status = match generate(&conn, Some(&session), request, cli.json).await {
                    Err(CliError::Bus(e)) => {
                        eprintln!("hearthctl: {}: {}", e.dbus_name(), e.message());
                        ExitCode::FAILURE
                    }
                    other => other?,
                };
            }
            hearth_dbus::SessionProxy::builder(&conn).path(session).build().await?.close().await?;
            return Ok(status);
        }
        Command::Task { task, input, options, model, max_tokens, scope } => {
            let mut request: HashMap<&str, Variant<'_>> = HashMap::new();
            if task == "describe" {
                request.insert("image", Variant::from(std::fs::read(&input)?));
            } else if input == "-" {
                request.insert("text", Variant::from(std::io::read_to_string(std::io::stdin())?));
            } else {
                request.insert("text", Variant::from(input.clone()));
            }
            for o in &options {
                let Some((k, v)) = o.split_once('=') else {
                    eprintln!("hearthctl: task options are KEY=VALUE, got {o:?}");
                    return Ok(ExitCode::from(2));
                };
                request.insert(k, Variant::from(v));
            }
            if let Some(m) = &model {
                request.insert(request_key::MODEL, Variant::from(m.as_str()));
            }
            if let Some(n) = max_tokens {
                request.insert(request_key::MAX_TOKENS, Variant::from(n));
            }
            if let Some(s) = &scope {
                request.insert(request_key::SCOPE, Variant::from(s.as_str()));
            }
            let r = match task.as_str() {
                "summarize" => proxy.summarize(request).await?,
                "rewrite" => proxy.rewrite(request).await?,
                "proofread" => proxy.proofread(request).await?,
                _ => proxy.describe(request).await?,
            };
            if cli.json {
                println!("{}", typed_json(&r));
            } else {
                println!("{}", r.text);
            }
        }
        Command::Availability { model } => {
            let a = proxy.availability(model.as_deref().unwrap_or("")).await?;
            if cli.json {
                println!("{}", typed_json(&a));
            } else {
                let reason = if a.reason.is_empty() { String::new() } else { format!(": {}", a.reason) };
                println!("{}\t{}{reason}", a.model, a.state);
            }
        }
        Command::Embed { texts, model, scope } => {
            let mut request: HashMap<&str, Variant<'_>> = HashMap::from([(request_key::TEXTS, Variant::from(texts))]);
            if let Some(m) = model {
                request.insert(request_key::MODEL, Variant::from(m));
            }
            if let Some(s) = scope {
                request.insert(request_key::SCOPE, Variant::from(s));
            }
            for v in proxy.embed(request).await? {
                println!("{}", json!(v));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs one generation (or a session's next turn) and streams it to stdout.
async fn generate(
    conn: &Connection,
    session: Option<&zbus::OwnedObjectPath>,
    request: HashMap<&str, Variant<'_>>,
    json_out: bool,
) -> Result<ExitCode, CliError> {
    static TURN: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = TURN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let token = format!("hearthctl_{}_{n}", std::process::id());
    let started = Instant::now();
    let mut generation = match session {
        Some(path) => Generation::start_turn(conn, path, request, &token).await?,
        None => Generation::start(conn, request, &token).await?,
    };
    let mut first_token: Option<Instant> = None;
    let mut last_token = started;
    let mut stdout = std::io::stdout();
    let mut cancel_sent = false;
    loop {
        let event = tokio::select! {
            e = generation.next() => e,
            _ = tokio::signal::ctrl_c(), if !cancel_sent => {
                cancel_sent = true;
                generation.cancel().await?;
                continue;
            }
        };
        let Some(event) = event else { break };
        match event? {
            StreamEvent::Token { index, token_id, text } => {
                let now = Instant::now();
                first_token.get_or_insert(now);
                last_token = now;
                if json_out {
                    writeln!(stdout, "{}", json!({ "index": index, "token_id": token_id, "text": text }))?;
                } else {
                    write!(stdout, "{text}")?;
                }
                stdout.flush()?;
            }
            StreamEvent::Migrated { from, to, index } => {
                if json_out {
                    writeln!(stdout, "{}", json!({ "migrated": { "from": from, "to": to, "index": index } }))?;
                } else {
                    eprintln!("\n[moved from {from} to {to} at token {index}]");
                }
            }
            StreamEvent::Finished(result) => {
                let tokens = result.tokens;
                // Decode rate as the client sees it: tokens after the first, over the time they took.
                let decode = first_token.map_or(Duration::ZERO, |f| last_token - f);
                let tok_s =
                    if tokens > 1 && !decode.is_zero() { f64::from(tokens - 1) / decode.as_secs_f64() } else { 0.0 };
                if json_out {
                    let mut j = typed_json(&result);
                    j["client_tok_per_s"] = json!(tok_s);
                    j["client_elapsed_ms"] = json!(started.elapsed().as_millis() as u64);
                    writeln!(stdout, "{}", json!({ "finished": j }))?;
                } else {
                    writeln!(stdout)?;
                    if let Some(calls) = &result.tool_calls {
                        println!("tool calls: {}", Json::Array(calls.iter().map(typed_json).collect()));
                    }
                    eprintln!("[{tokens} tokens, {tok_s:.1} tok/s, finish: {}]", result.finish_reason);
                }
                if let Some(name) = &result.error_name {
                    eprintln!("hearthctl: {name}: {}", result.error_message.as_deref().unwrap_or(""));
                    return Ok(ExitCode::FAILURE);
                }
                return Ok(ExitCode::SUCCESS);
            }
        }
    }
    eprintln!("hearthctl: the request ended without a Finished signal");
    Ok(ExitCode::FAILURE)
}
