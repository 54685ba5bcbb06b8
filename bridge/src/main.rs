//! hearth-openai: an OpenAI-compatible HTTP API for one user, served by calling Hearth over
//! the system bus, so existing tools (the openai package, LangChain, curl) work unchanged
//! while Hearth's scheduling and policy apply.
//!
//! It listens on a unix socket (systemd socket activation: hearth-openai.socket, or
//! `--unix PATH`) and optionally on a loopback TCP port (`--tcp 127.0.0.1:PORT`), where every
//! request must carry `Authorization: Bearer TOKEN` with the per-user token it writes to
//! `--token-file` (0600). To Hearth it is one app: every HTTP client of the bridge shares its
//! identity (uid:UID:/usr/bin/hearth-openai, or its app unit's id), its policy and its quota.

mod api;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Request as HttpRequest, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json as JsonBody, Router};
use clap::Parser;
use futures_util::Stream;
use hearth_dbus::{Generation, Hearth1Proxy, StreamEvent};
use serde_json::{Value as Json, json};

use crate::api::{ApiError, Request, Shape};

#[derive(Debug, Parser)]
#[command(version, about = "OpenAI-compatible HTTP API in front of Hearth (org.hearth.Hearth1)")]
struct Args {
    /// D-Bus address of the bus hearthd is on (default: the system bus).
    #[arg(long, value_name = "ADDRESS")]
    bus_address: Option<String>,
    /// Listen on this unix socket (without it, on the socket systemd passes, if any).
    #[arg(long, value_name = "PATH")]
    unix: Option<PathBuf>,
    /// Also listen on this loopback address; requests there need the bearer token.
    #[arg(long, value_name = "ADDR:PORT")]
    tcp: Option<std::net::SocketAddr>,
    /// Where the TCP listener's token is (made, mode 0600, if missing). Default:
    /// $XDG_RUNTIME_DIR/hearth-openai/token.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
}

#[derive(Debug)]
struct App {
    conn: zbus::Connection,
    next: AtomicU64,
}

type Shared = Arc<App>;

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl App {
    /// A fresh request id, and the handle token of its Hearth request.
    fn ids(&self, prefix: &str) -> (String, String) {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        (format!("{prefix}-{}-{n}", std::process::id()), format!("oa{n}"))
    }

    async fn start(&self, request: Request, token: &str) -> Result<Watched, ApiError> {
        let g = Generation::start(&self.conn, request, token).await?;
        Ok(Watched { g: Some(g), done: false })
    }
}

/// A generation that is cancelled in hearthd when the HTTP side drops it unfinished (the
/// client went away), so no device time is spent on an answer nobody reads.
struct Watched {
    g: Option<Generation>,
    done: bool,
}

impl Watched {
    async fn next(&mut self) -> Option<Result<StreamEvent, ApiError>> {
        let ev = self.g.as_mut()?.next().await;
        if matches!(ev, Some(Ok(StreamEvent::Finished(_))) | None) {
            self.done = true;
        }
        ev.map(|e| e.map_err(ApiError::from))
    }

    /// Runs to the end: the result, or its error.
    async fn finish(mut self) -> Result<hearth_dbus::GenerationResult, ApiError> {
        while let Some(ev) = self.next().await {
            if let StreamEvent::Finished(r) = ev? {
                return result_or_error(*r);
            }
        }
        Err(ApiError::from_hearth("org.hearth.Hearth1.Error.Internal", "the stream ended without Finished"))
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Some(g) = self.g.take() {
            tokio::spawn(async move {
                let _ = g.cancel().await;
            });
        }
    }
}

fn result_or_error(r: hearth_dbus::GenerationResult) -> Result<hearth_dbus::GenerationResult, ApiError> {
    match &r.error_name {
        Some(name) => Err(ApiError::from_hearth(name, r.error_message.as_deref().unwrap_or_default())),
        None => Ok(r),
    }
}

fn body_json(body: &[u8]) -> Result<Json, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))
}

fn sse_data(v: &Json) -> Result<Event, std::convert::Infallible> {
    Ok(Event::default().data(v.to_string()))
}

/// A server-sent-events response from a stream of JSON objects, ended by `[DONE]`.
fn sse(items: impl Stream<Item = Json> + Send + 'static) -> Response {
    use futures_util::StreamExt;
    let events = items.map(|v| sse_data(&v)).chain(futures_util::stream::once(async {
        Ok::<_, std::convert::Infallible>(Event::default().data("[DONE]"))
    }));
    Sse::new(events).into_response()
}

/// The stream of a chat completion: a role chunk, one chunk per token (text held while a
/// tools answer may turn out to be a call), and the tail; an error after the start comes as
/// an `{"error": ...}` event, as OpenAI's servers send one.
fn chat_stream(mut w: Watched, id: String, shape: Shape) -> impl Stream<Item = Json> + Send + 'static {
    let created = now();
    async_stream(move |tx| async move {
        let model = shape.model.clone();
        let _ = tx.send(api::chat_chunk(&id, created, &model, &json!({"role": "assistant", "content": ""}), None));
        let mut held = String::new();
        while let Some(ev) = w.next().await {
            match ev {
                Ok(StreamEvent::Token { text, .. }) if shape.tools => held.push_str(&text),
                Ok(StreamEvent::Token { text, .. }) => {
                    if !text.is_empty()
                        && tx.send(api::chat_chunk(&id, created, &model, &json!({"content": text}), None)).is_err()
                    {
                        return;
                    }
                }
                Ok(StreamEvent::Migrated { .. }) => {}
                Ok(StreamEvent::Finished(r)) => {
                    match result_or_error(*r) {
                        Ok(r) => {
                            for chunk in api::chat_tail(&id, created, &r, &shape, &held) {
                                let _ = tx.send(chunk);
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(e.body());
                        }
                    }
                    return;
                }
                Err(e) => {
                    let _ = tx.send(e.body());
                    return;
                }
            }
        }
    })
}

fn completion_stream(mut w: Watched, id: String, model: String) -> impl Stream<Item = Json> + Send + 'static {
    let created = now();
    async_stream(move |tx| async move {
        while let Some(ev) = w.next().await {
            let chunk = match ev {
                Ok(StreamEvent::Token { text, .. }) if text.is_empty() => continue,
                Ok(StreamEvent::Token { text, .. }) => api::completion_chunk(&id, created, &model, &text, None),
                Ok(StreamEvent::Migrated { .. }) => continue,
                Ok(StreamEvent::Finished(r)) => match result_or_error(*r) {
                    Ok(r) => api::completion_chunk(&id, created, &r.model, "", Some(api::finish_reason(&r))),
                    Err(e) => e.body(),
                },
                Err(e) => e.body(),
            };
            let last = chunk.get("error").is_some() || chunk["choices"][0]["finish_reason"].is_string();
            if tx.send(chunk).is_err() || last {
                return;
            }
        }
    })
}

/// A stream fed by a task through a channel: the task ends (and drops what it holds, such
/// as a [`Watched`] generation, which cancels it) when the receiving side goes away.
fn async_stream<F, Fut>(f: F) -> impl Stream<Item = Json> + Send + 'static
where
    F: FnOnce(tokio::sync::mpsc::UnboundedSender<Json>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(f(tx));
    let abort = AbortOnDrop(task);
    futures_util::stream::unfold((rx, abort), |(mut rx, abort)| async move {
        let v = rx.recv().await?;
        Some((v, (rx, abort)))
    })
}

/// Aborts the producing task when the response stream is dropped (the client disconnected).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn chat_completions(State(app): State<Shared>, body: axum::body::Bytes) -> Result<Response, ApiError> {
    let (request, shape) = api::chat_request(&body_json(&body)?)?;
    let (id, token) = app.ids("chatcmpl");
    let w = app.start(request, &token).await?;
    if shape.stream {
        return Ok(sse(chat_stream(w, id, shape)));
    }
    let r = w.finish().await?;
    Ok(JsonBody(api::chat_response(&id, now(), &r)).into_response())
}

async fn completions(State(app): State<Shared>, body: axum::body::Bytes) -> Result<Response, ApiError> {
    let (request, shape) = api::completion_request(&body_json(&body)?)?;
    let (id, token) = app.ids("cmpl");
    let w = app.start(request, &token).await?;
    if shape.stream {
        return Ok(sse(completion_stream(w, id, shape.model)));
    }
    let r = w.finish().await?;
    Ok(JsonBody(api::completion_response(&id, now(), &r)).into_response())
}

async fn embeddings(State(app): State<Shared>, body: axum::body::Bytes) -> Result<Response, ApiError> {
    let body = body_json(&body)?;
    let texts = api::embedding_input(&body)?;
    let model = body.get("model").and_then(Json::as_str).unwrap_or_default().to_owned();
    let base64 = match body.get("encoding_format").and_then(Json::as_str) {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => return Err(ApiError::bad_request(format!("encoding_format {other:?} is not float or base64"))),
    };
    let mut request: Request = Request::from([(hearth_dbus::request_key::TEXTS, zbus::Variant::from(texts))]);
    if !model.is_empty() {
        request.insert(hearth_dbus::request_key::MODEL, zbus::Variant::from(model.clone()));
    }
    let proxy = Hearth1Proxy::new(&app.conn).await.map_err(hearth_dbus::Error::from)?;
    let vectors = proxy.embed(request).await?;
    Ok(JsonBody(api::embeddings_response(&vectors, &model, base64)).into_response())
}

async fn models(State(app): State<Shared>) -> Result<Response, ApiError> {
    let proxy = Hearth1Proxy::new(&app.conn).await.map_err(hearth_dbus::Error::from)?;
    let data: Vec<Json> = proxy
        .list_models()
        .await?
        .iter()
        .map(|m| json!({"id": m.name, "object": "model", "created": 0, "owned_by": "hearth"}))
        .collect();
    Ok(JsonBody(json!({"object": "list", "data": data})).into_response())
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "invalid_request_error",
        code: "unknown_url".into(),
        message: "hearth-openai serves /v1/chat/completions, /v1/completions, /v1/embeddings and /v1/models".into(),
    }
}

fn router(app: Shared) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .fallback(not_found)
        // Requests are small (images at most 8 MiB, base64 makes 11).
        .layer(axum::extract::DefaultBodyLimit::max(12 << 20))
        .with_state(app)
}

/// Refuses TCP requests without the bearer token (compared in constant time).
async fn require_token(token: Arc<String>, headers: HeaderMap, req: HttpRequest, next: Next) -> Response {
    let given = headers.get("authorization").and_then(|h| h.to_str().ok()).and_then(|h| h.strip_prefix("Bearer "));
    let ok = given.is_some_and(|g| {
        g.len() == token.len() && g.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    });
    if !ok {
        return ApiError {
            status: StatusCode::UNAUTHORIZED,
            kind: "invalid_request_error",
            code: "invalid_api_key".into(),
            message: "the TCP listener needs Authorization: Bearer <the token in hearth-openai's token file>".into(),
        }
        .into_response();
    }
    next.run(req).await
}

/// The token of the TCP listener: read, or made (32 random bytes, hex) and written 0600.
fn token(path: &std::path::Path) -> Result<String, String> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if let Ok(t) = std::fs::read_to_string(path) {
        let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(format!("{} must be readable by its owner only (mode 0600)", path.display()));
        }
        let t = t.trim().to_owned();
        if t.len() < 32 {
            return Err(format!("{} holds no token of at least 32 characters: remove it to make one", path.display()));
        }
        return Ok(t);
    }
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| format!("no randomness for the token: {e}"))?;
    let t = hex::encode(raw);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| e.to_string())?;
    }
    // Written whole under another name, then renamed: never a short token file.
    let tmp = path.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::io::Write::write_all(&mut f, t.as_bytes()).and_then(|()| f.sync_all()).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, path).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(t)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hearth-openai: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let conn = match &args.bus_address {
        Some(a) => zbus::connection::Builder::address(a.as_str()).build().await,
        None => zbus::Connection::system().await,
    }
    .map_err(|e| format!("cannot connect to the bus: {e}"))?;
    let app = Arc::new(App { conn, next: AtomicU64::new(0) });

    let unix = match &args.unix {
        Some(path) => {
            let _ = std::fs::remove_file(path);
            let l = tokio::net::UnixListener::bind(path)
                .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|e| e.to_string())?;
            Some(l)
        }
        None => {
            let mut fds = listenfd::ListenFd::from_env();
            match fds.take_unix_listener(0).map_err(|e| format!("the socket systemd passed: {e}"))? {
                Some(l) => {
                    l.set_nonblocking(true).map_err(|e| e.to_string())?;
                    Some(tokio::net::UnixListener::from_std(l).map_err(|e| e.to_string())?)
                }
                None => None,
            }
        }
    };
    let tcp = match args.tcp {
        Some(addr) if !addr.ip().is_loopback() => {
            return Err(format!("--tcp {addr}: only a loopback address (127.0.0.1, ::1) is allowed"));
        }
        Some(addr) => {
            let path = args
                .token_file
                .clone()
                .or_else(|| std::env::var_os("XDG_RUNTIME_DIR").map(|d| PathBuf::from(d).join("hearth-openai/token")));
            let path = path.ok_or("--tcp needs --token-file (or XDG_RUNTIME_DIR)")?;
            let t = Arc::new(token(&path)?);
            let l = tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            Some((l, t))
        }
        None => None,
    };
    if unix.is_none() && tcp.is_none() {
        return Err("nothing to listen on: give --unix or --tcp, or start it from hearth-openai.socket".into());
    }
    let mut servers = tokio::task::JoinSet::new();
    if let Some(l) = unix {
        let r = router(Arc::clone(&app));
        servers.spawn(async move { axum::serve(l, r).await });
    }
    if let Some((l, t)) = tcp {
        let r = router(Arc::clone(&app)).layer(axum::middleware::from_fn(move |h: HeaderMap, req, next| {
            require_token(Arc::clone(&t), h, req, next)
        }));
        servers.spawn(async move { axum::serve(l, r).await });
    }
    tracing::info!("serving");
    match servers.join_next().await {
        Some(Ok(Err(e))) => Err(format!("the server failed: {e}")),
        Some(Err(e)) => Err(format!("the server failed: {e}")),
        _ => Ok(()),
    }
}
