//! The cloud leg: a client of any OpenAI-compatible chat-completions endpoint (vLLM,
//! llama-server, hosted APIs), streaming with server-sent events over reqwest + rustls.
//!
//! Timeouts for connecting, the first byte and the gap between chunks; bounded retries with
//! backoff for failures before anything was received (connect errors, 429, 5xx); a circuit
//! breaker (open after `breaker_failures` failures in a row, half-open after the cooldown)
//! whose state is the `CloudAvailable` property. The API key comes from the systemd credential
//! `hearth-cloud-key` or a 0600 file and never appears in the config, logs or errors.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::sync::watch;

use crate::engine::{GenerateRequest, ImageInput, Message};

/// The systemd credential name of the API key.
pub const KEY_CREDENTIAL: &str = "hearth-cloud-key";

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CloudConfig {
    pub enabled: bool,
    /// Base URL of the OpenAI-compatible API, e.g. "https://llm.example.com/v1".
    pub endpoint: String,
    /// Remote model used for a local model without an entry in `models`.
    pub model: String,
    /// Local model name → remote model name.
    pub models: BTreeMap<String, String>,
    /// A 0600 file holding the API key; empty: the systemd credential, else no key.
    pub api_key_file: PathBuf,
    pub connect_timeout_ms: u64,
    pub first_byte_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    /// Retries of failures before the first byte (connect errors, 429, 5xx).
    pub retries: u32,
    pub breaker_failures: u32,
    pub breaker_cooldown_s: u64,
    /// `auto` goes to the cloud when the local queue holds this many requests (0: never).
    pub queue_depth: u32,
}

impl Default for CloudConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            endpoint: String::new(),
            model: String::new(),
            models: BTreeMap::new(),
            api_key_file: PathBuf::new(),
            connect_timeout_ms: 3000,
            first_byte_timeout_ms: 15000,
            idle_timeout_ms: 15000,
            retries: 2,
            breaker_failures: 3,
            breaker_cooldown_s: 30,
            queue_depth: 8,
        }
    }
}

/// Why the cloud did not (fully) serve a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloudError {
    /// Nothing was streamed: the request may run elsewhere as if it never went.
    #[error("{0}")]
    BeforeFirstToken(String),
    /// The stream broke off after some text.
    #[error("{0}")]
    MidStream(String),
}

#[derive(Debug)]
struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
}

/// How a cloud stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudFinish {
    /// "stop" or "length".
    pub reason: String,
    pub remote_model: String,
}

#[derive(Debug)]
pub struct Cloud {
    client: reqwest::Client,
    config: CloudConfig,
    key: Option<String>,
    breaker: Mutex<Breaker>,
    available: watch::Sender<bool>,
}

/// The chat-completions request: the conversation, and when `assistant_prefix` is given, the
/// assistant's turn begun with it and the flags vLLM and llama-server read to extend it
/// rather than start a new one.
/// A message's images go as OpenAI content parts: `image_url` parts with data URLs, before
/// its text (where the device puts them too). Stop sequences and the frequency and presence
/// penalties go as OpenAI's (a request with device-only options never comes here).
fn request_body(remote_model: &str, request: &GenerateRequest, assistant_prefix: Option<&str>) -> serde_json::Value {
    use base64::Engine;
    let (messages, images, sampling) = (&request.messages, &request.images, request.sampling);
    let turn = |(i, m): (usize, &Message)| {
        let mine: Vec<&ImageInput> = images.iter().filter(|im| im.message as usize == i).collect();
        if mine.is_empty() {
            let mut turn = serde_json::json!({"role": m.role, "content": m.content});
            // Earlier calls and their results, in OpenAI's shape.
            if !m.tool_calls.is_empty() {
                let calls: Vec<serde_json::Value> = m
                    .tool_calls
                    .iter()
                    .map(|c| {
                        serde_json::json!({"id": c.id, "type": "function",
                            "function": {"name": c.name, "arguments": c.arguments}})
                    })
                    .collect();
                turn["tool_calls"] = serde_json::Value::Array(calls);
            }
            if let Some(id) = &m.tool_call_id {
                turn["tool_call_id"] = serde_json::json!(id);
            }
            return turn;
        }
        let mut parts: Vec<serde_json::Value> = mine
            .iter()
            .map(|im| {
                let mime = if im.bytes.starts_with(b"\x89PNG") { "image/png" } else { "image/jpeg" };
                let data = base64::engine::general_purpose::STANDARD.encode(im.bytes.as_slice());
                serde_json::json!({"type": "image_url", "image_url": {"url": format!("data:{mime};base64,{data}")}})
            })
            .collect();
        if !m.content.is_empty() {
            parts.push(serde_json::json!({"type": "text", "text": m.content}));
        }
        serde_json::json!({"role": m.role, "content": parts})
    };
    let mut turns: Vec<serde_json::Value> = messages.iter().enumerate().map(turn).collect();
    let mut body = serde_json::json!({
        "model": remote_model,
        "max_tokens": request.max_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "seed": sampling.seed,
        "stream": true,
    });
    if !request.stop.is_empty() {
        body["stop"] = serde_json::json!(request.stop);
    }
    if sampling.frequency_penalty != 0.0 {
        body["frequency_penalty"] = serde_json::json!(sampling.frequency_penalty);
    }
    if sampling.presence_penalty != 0.0 {
        body["presence_penalty"] = serde_json::json!(sampling.presence_penalty);
    }
    if let Some(prefix) = assistant_prefix {
        turns.push(serde_json::json!({"role": "assistant", "content": prefix}));
        body["continue_final_message"] = serde_json::json!(true);
        body["add_generation_prompt"] = serde_json::json!(false);
    }
    body["messages"] = serde_json::Value::Array(turns);
    body
}

#[derive(Debug, Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    #[serde(default)]
    model: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    delta: Delta,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
}

fn read_key(config: &CloudConfig) -> Result<Option<String>, String> {
    use std::os::unix::fs::MetadataExt;
    let path = if !config.api_key_file.as_os_str().is_empty() {
        config.api_key_file.clone()
    } else if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
        PathBuf::from(dir).join(KEY_CREDENTIAL)
    } else {
        return Ok(None);
    };
    if !path.exists() && config.api_key_file.as_os_str().is_empty() {
        return Ok(None);
    }
    let meta =
        std::fs::metadata(&path).map_err(|e| format!("cannot read the cloud API key file {}: {e}", path.display()))?;
    if meta.mode() & 0o077 != 0 {
        return Err(format!("the cloud API key file {} must be readable by hearthd only (mode 0600)", path.display()));
    }
    let key = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(Some(key.trim().to_owned()).filter(|k| !k.is_empty()))
}

impl Cloud {
    /// None when the cloud is not enabled.
    pub fn new(config: &CloudConfig) -> Result<Option<Self>, String> {
        if !config.enabled {
            return Ok(None);
        }
        if !(config.endpoint.starts_with("https://") || config.endpoint.starts_with("http://")) {
            return Err(format!("cloud.endpoint {:?} is not an http(s) URL", config.endpoint));
        }
        let key = read_key(config)?;
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(config.connect_timeout_ms))
            .use_rustls_tls()
            .build()
            .map_err(|e| format!("cannot set up the HTTP client: {e}"))?;
        let (available, _) = watch::channel(true);
        tracing::info!(endpoint = %config.endpoint, key = key.is_some(), "cloud leg configured");
        Ok(Some(Self {
            client,
            config: config.clone(),
            key,
            breaker: Mutex::new(Breaker { failures: 0, open_until: None }),
            available,
        }))
    }

    /// Whether requests may be sent (the breaker is closed or half-open).
    pub fn available(&self) -> bool {
        let b = self.breaker.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        b.open_until.is_none_or(|t| Instant::now() >= t)
    }

    pub fn available_watch(&self) -> watch::Receiver<bool> {
        self.available.subscribe()
    }

    /// When an open breaker turns half-open (requests may be tried again), if it is open.
    pub fn half_open_at(&self) -> Option<Instant> {
        let b = self.breaker.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        b.open_until.filter(|t| Instant::now() < *t)
    }

    /// Brings [`Cloud::available_watch`] up to date with the clock: an open breaker turns
    /// half-open at its time without any request, and watchers must hear of it.
    pub fn refresh(&self) {
        let open = self.half_open_at().is_some();
        self.available.send_if_modified(|a| {
            let changed = *a == open;
            *a = !open;
            changed
        });
    }

    pub fn queue_depth(&self) -> u32 {
        self.config.queue_depth
    }

    /// The remote model for a local model name (or for the default when None).
    pub fn remote_model(&self, local: &str) -> Option<&str> {
        self.config.models.get(local).map(String::as_str).or(Some(self.config.model.as_str()).filter(|m| !m.is_empty()))
    }

    fn record(&self, ok: bool, why: &str) {
        let mut b = self.breaker.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if ok {
            if b.failures > 0 || b.open_until.is_some() {
                tracing::info!("cloud reachable again");
            }
            b.failures = 0;
            b.open_until = None;
        } else {
            b.failures += 1;
            if b.failures >= self.config.breaker_failures && b.open_until.is_none_or(|t| Instant::now() >= t) {
                let was_open = b.open_until.is_some();
                b.open_until = Some(Instant::now() + Duration::from_secs(self.config.breaker_cooldown_s));
                if !was_open {
                    // One line when the cloud goes away, not one per request.
                    tracing::warn!(
                        failures = b.failures,
                        reason = why,
                        "cloud unreachable: using the device only for now"
                    );
                }
            }
        }
        drop(b);
        self.refresh();
    }

    /// Streams a chat completion, sending each text delta to `on_text`, which returns false
    /// to stop (cancellation: the result is then Ok with reason "cancelled"). Retries failures
    /// that happen before anything arrived.
    pub async fn stream(
        &self,
        remote_model: &str,
        request: &GenerateRequest,
        assistant_prefix: Option<&str>,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<CloudFinish, CloudError> {
        if !self.available() {
            return Err(CloudError::BeforeFirstToken("the cloud circuit breaker is open".into()));
        }
        let body = request_body(remote_model, request, assistant_prefix);
        let mut attempt = 0;
        loop {
            match self.attempt(&body, remote_model, &mut on_text).await {
                Ok(done) => {
                    self.record(true, "");
                    return Ok(done);
                }
                Err((CloudError::BeforeFirstToken(why), retryable)) if retryable && attempt < self.config.retries => {
                    attempt += 1;
                    tracing::debug!(attempt, reason = %why, "retrying the cloud request");
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
                Err((e, _)) => {
                    self.record(false, &e.to_string());
                    return Err(e);
                }
            }
        }
    }

    /// One request of `body`. The bool says whether a failure before the first token may be
    /// retried.
    async fn attempt(
        &self,
        body: &serde_json::Value,
        remote_model: &str,
        on_text: &mut impl FnMut(&str) -> bool,
    ) -> Result<CloudFinish, (CloudError, bool)> {
        let before = |why: String, retry: bool| (CloudError::BeforeFirstToken(why), retry);
        let url = format!("{}/chat/completions", self.config.endpoint.trim_end_matches('/'));
        let mut req = self.client.post(&url).json(body);
        if let Some(key) = &self.key {
            req = req.bearer_auth(key);
        }
        let first_byte = Duration::from_millis(self.config.first_byte_timeout_ms);
        let resp = match tokio::time::timeout(first_byte, req.send()).await {
            Err(_) => return Err(before("no response before the first-byte timeout".into(), true)),
            // reqwest's errors name the URL, never headers: the key cannot leak through them.
            Ok(Err(e)) => return Err(before(format!("cannot reach the cloud: {}", e.without_url()), true)),
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        if !status.is_success() {
            let retry = status.as_u16() == 429 || status.is_server_error();
            return Err(before(format!("the cloud answered HTTP {status}"), retry));
        }
        let mut events = resp.bytes_stream().eventsource();
        let idle = Duration::from_millis(self.config.idle_timeout_ms);
        let mut got_text = false;
        let mut remote = remote_model.to_owned();
        let fail = |why: String, got_text: bool| {
            if got_text { (CloudError::MidStream(why), false) } else { (CloudError::BeforeFirstToken(why), false) }
        };
        loop {
            let wait = if got_text { idle } else { first_byte };
            let event = match tokio::time::timeout(wait, events.next()).await {
                Err(_) => return Err(fail("the cloud stream stalled".into(), got_text)),
                Ok(None) => return Err(fail("the cloud stream ended without [DONE]".into(), got_text)),
                Ok(Some(Err(e))) => return Err(fail(format!("the cloud stream broke: {e}"), got_text)),
                Ok(Some(Ok(ev))) => ev,
            };
            if event.data.trim() == "[DONE]" {
                return Ok(CloudFinish { reason: "stop".into(), remote_model: remote });
            }
            let chunk: Chunk = serde_json::from_str(&event.data)
                .map_err(|_| fail("the cloud sent a malformed event".into(), got_text))?;
            if let Some(m) = chunk.model {
                remote = m;
            }
            for choice in chunk.choices {
                if let Some(text) = choice.delta.content.filter(|t| !t.is_empty()) {
                    got_text = true;
                    if !on_text(&text) {
                        return Ok(CloudFinish { reason: "cancelled".into(), remote_model: remote });
                    }
                }
                if let Some(reason) = choice.finish_reason {
                    let reason = if reason == "length" { "length" } else { "stop" };
                    return Ok(CloudFinish { reason: reason.into(), remote_model: remote });
                }
            }
        }
    }
}
