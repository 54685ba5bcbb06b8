//! OpenAI's request and response shapes, translated to and from Hearth's D-Bus API: pure
//! functions, so every mapping is unit-tested without a bus.

use std::collections::HashMap;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use hearth_dbus::{GenerationResult, request_key as key};
use serde_json::{Value as Json, json};
use zbus::Variant;

/// A Hearth request dictionary.
pub type Request = HashMap<&'static str, Variant<'static>>;

/// An error as OpenAI's API gives one: an HTTP status and `{"error": {...}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    /// Hearth's error name where it came from Hearth.
    pub code: String,
    pub message: String,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: "invalid_request".into(),
            message: message.into(),
        }
    }

    pub fn body(&self) -> Json {
        json!({"error": {"message": self.message, "type": self.kind, "code": self.code, "param": null}})
    }

    /// From a Hearth error name and message (a call's error, or a failed Finished).
    pub fn from_hearth(name: &str, message: &str) -> Self {
        let short = name.rsplit('.').next().unwrap_or(name);
        let (status, kind) = match short {
            "InvalidArgs" | "ContextLengthExceeded" => (StatusCode::BAD_REQUEST, "invalid_request_error"),
            "ModelNotFound" => (StatusCode::NOT_FOUND, "invalid_request_error"),
            "NotAuthorized" | "PrivacyViolation" => (StatusCode::FORBIDDEN, "permission_error"),
            "Busy" => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"),
            "Cancelled" => (StatusCode::REQUEST_TIMEOUT, "cancelled"),
            "ModelUnavailable" | "CloudUnavailable" | "EngineFailed" => {
                (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable")
            }
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
        };
        let code = if short == "ContextLengthExceeded" { "context_length_exceeded".into() } else { name.to_owned() };
        Self { status, kind, code, message: message.to_owned() }
    }
}

impl From<hearth_dbus::Error> for ApiError {
    fn from(e: hearth_dbus::Error) -> Self {
        match &e {
            hearth_dbus::Error::ZBus(z) => Self {
                status: StatusCode::SERVICE_UNAVAILABLE,
                kind: "service_unavailable",
                code: "hearth_unreachable".into(),
                message: format!("cannot reach hearthd: {z}"),
            },
            _ => Self::from_hearth(&e.dbus_name(), &e.message()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// What the HTTP side needs to know of a chat request beyond Hearth's dictionary.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Shape {
    pub stream: bool,
    /// stream_options.include_usage: a last chunk with usage.
    pub include_usage: bool,
    /// The request has tools: text is held until the end, when it is known whether the
    /// answer is a call.
    pub tools: bool,
    pub logprobs: bool,
    /// The model asked for ("" when none: Hearth's default).
    pub model: String,
}

fn str_field<'a>(body: &'a Json, k: &str) -> Result<Option<&'a str>, ApiError> {
    match body.get(k) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::bad_request(format!("{k} must be a string"))),
    }
}

fn num_field(body: &Json, k: &str) -> Result<Option<f64>, ApiError> {
    match body.get(k) {
        None | Some(Json::Null) => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or_else(|| ApiError::bad_request(format!("{k} must be a number"))),
    }
}

fn uint_field(body: &Json, k: &str) -> Result<Option<u32>, ApiError> {
    match body.get(k) {
        None | Some(Json::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| ApiError::bad_request(format!("{k} must be a non-negative integer"))),
    }
}

/// The sampling and length options shared by chat and text completions.
fn common_options(body: &Json, r: &mut Request, shape: &mut Shape) -> Result<(), ApiError> {
    if let Some(m) = str_field(body, "model")? {
        shape.model = m.to_owned();
        if !m.is_empty() {
            r.insert(key::MODEL, Variant::from(m.to_owned()));
        }
    }
    let max = uint_field(body, "max_completion_tokens")?.or(uint_field(body, "max_tokens")?);
    if let Some(n) = max {
        r.insert(key::MAX_TOKENS, Variant::from(n));
    }
    for (k, hearth) in [
        ("temperature", key::TEMPERATURE),
        ("top_p", key::TOP_P),
        ("frequency_penalty", key::FREQUENCY_PENALTY),
        ("presence_penalty", key::PRESENCE_PENALTY),
    ] {
        if let Some(x) = num_field(body, k)? {
            r.insert(hearth, Variant::from(x));
        }
    }
    if let Some(seed) = body.get("seed").filter(|s| !s.is_null()) {
        // OpenAI's seed is any integer; Hearth's a u32: the low 32 bits.
        let s = seed.as_i64().ok_or_else(|| ApiError::bad_request("seed must be an integer"))?;
        r.insert(key::SEED, Variant::from(s as u32));
    }
    match body.get("stop") {
        None | Some(Json::Null) => {}
        Some(Json::String(s)) => {
            r.insert(key::STOP, Variant::from(vec![s.clone()]));
        }
        Some(Json::Array(a)) => {
            let stops: Option<Vec<String>> = a.iter().map(|s| s.as_str().map(str::to_owned)).collect();
            let stops = stops.ok_or_else(|| ApiError::bad_request("stop must be a string or an array of strings"))?;
            r.insert(key::STOP, Variant::from(stops));
        }
        Some(_) => return Err(ApiError::bad_request("stop must be a string or an array of strings")),
    }
    if body.get("n").and_then(Json::as_u64).is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request("n must be 1: Hearth generates one choice per request"));
    }
    shape.stream = body.get("stream").and_then(Json::as_bool).unwrap_or(false);
    shape.include_usage = body.pointer("/stream_options/include_usage").and_then(Json::as_bool).unwrap_or(false);
    Ok(())
}

/// A data URL's bytes (images come only inline: hearthd fetches nothing).
fn data_url(url: &str) -> Result<Vec<u8>, ApiError> {
    use base64::Engine;
    let rest = url.strip_prefix("data:").ok_or_else(|| {
        ApiError::bad_request("image_url must be a data: URL (base64 PNG or JPEG); Hearth fetches nothing")
    })?;
    let (_, data) =
        rest.split_once(";base64,").ok_or_else(|| ApiError::bad_request("image_url data URLs must be base64"))?;
    base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|e| ApiError::bad_request(format!("image_url is not valid base64: {e}")))
}

/// One OpenAI chat message as a Hearth message dictionary.
fn message(i: usize, m: &Json) -> Result<HashMap<String, Variant<'static>>, ApiError> {
    let role = m
        .get("role")
        .and_then(Json::as_str)
        .ok_or_else(|| ApiError::bad_request(format!("messages[{i}].role is missing")))?;
    // OpenAI's "developer" role is the system prompt of newer models.
    let role = if role == "developer" { "system" } else { role };
    let mut out = HashMap::from([("role".to_owned(), Variant::from(role.to_owned()))]);
    let mut text = String::new();
    let mut images = Vec::new();
    match m.get("content") {
        None | Some(Json::Null) => {}
        Some(Json::String(s)) => text.push_str(s),
        Some(Json::Array(parts)) => {
            for p in parts {
                match p.get("type").and_then(Json::as_str) {
                    Some("text") => text.push_str(p.get("text").and_then(Json::as_str).unwrap_or_default()),
                    Some("image_url") => {
                        let url = p.pointer("/image_url/url").and_then(Json::as_str).unwrap_or_default();
                        images.push(data_url(url)?);
                    }
                    other => {
                        return Err(ApiError::bad_request(format!(
                            "messages[{i}]: content parts of type {other:?} are not supported (text, image_url)"
                        )));
                    }
                }
            }
        }
        Some(_) => return Err(ApiError::bad_request(format!("messages[{i}].content must be a string or parts"))),
    }
    // An assistant turn that called tools: its calls, so the next turn sees what it did.
    if let Some(calls) = m.get("tool_calls").and_then(Json::as_array).filter(|c| !c.is_empty()) {
        let mut list: Vec<HashMap<String, Variant<'static>>> = Vec::with_capacity(calls.len());
        for (j, call) in calls.iter().enumerate() {
            let field = |path: &str| {
                call.pointer(path).and_then(Json::as_str).map(|v| Variant::from(v.to_owned())).ok_or_else(|| {
                    ApiError::bad_request(format!("messages[{i}].tool_calls[{j}]: {path} must be a string"))
                })
            };
            list.push(HashMap::from([
                ("id".to_owned(), field("/id")?),
                ("name".to_owned(), field("/function/name")?),
                ("arguments".to_owned(), field("/function/arguments")?),
            ]));
        }
        out.insert("tool_calls".to_owned(), Variant::from(list));
    }
    if let Some(id) = m.get("tool_call_id").and_then(Json::as_str).filter(|_| role == "tool") {
        out.insert("tool_call_id".to_owned(), Variant::from(id.to_owned()));
    }
    out.insert("content".to_owned(), Variant::from(text));
    if !images.is_empty() {
        out.insert("images".to_owned(), Variant::from(images));
    }
    Ok(out)
}

/// `/v1/chat/completions`' body as a Hearth request.
pub fn chat_request(body: &Json) -> Result<(Request, Shape), ApiError> {
    let mut r = Request::new();
    let mut shape = Shape::default();
    let messages = body
        .get("messages")
        .and_then(Json::as_array)
        .ok_or_else(|| ApiError::bad_request("messages must be an array"))?;
    let messages: Vec<_> = messages.iter().enumerate().map(|(i, m)| message(i, m)).collect::<Result<_, _>>()?;
    r.insert(key::MESSAGES, Variant::from(messages));
    common_options(body, &mut r, &mut shape)?;
    if body.get("logprobs").and_then(Json::as_bool).unwrap_or(false) {
        shape.logprobs = true;
        r.insert(key::LOGPROBS, Variant::from(true));
        if let Some(n) = uint_field(body, "top_logprobs")? {
            r.insert(key::TOP_LOGPROBS, Variant::from(n));
        }
    }
    if let Some(tools) = body.get("tools").filter(|t| t.as_array().is_some_and(|a| !a.is_empty())) {
        shape.tools = true;
        r.insert(key::TOOLS, Variant::from(tools.to_string()));
        match body.get("tool_choice") {
            None | Some(Json::Null) => {}
            Some(Json::String(c)) => {
                r.insert(key::TOOL_CHOICE, Variant::from(c.clone()));
            }
            Some(_) => {
                return Err(ApiError::bad_request(
                    "tool_choice naming one function is not supported: use auto, required or none",
                ));
            }
        }
    }
    match body.get("response_format").and_then(|f| f.get("type")).and_then(Json::as_str) {
        None | Some("text") => {}
        Some("json_object") => {
            r.insert(key::JSON_SCHEMA, Variant::from(r#"{"type": "object"}"#.to_owned()));
        }
        Some("json_schema") => {
            let schema = body
                .pointer("/response_format/json_schema/schema")
                .ok_or_else(|| ApiError::bad_request("response_format.json_schema.schema is missing"))?;
            r.insert(key::JSON_SCHEMA, Variant::from(schema.to_string()));
        }
        Some(other) => return Err(ApiError::bad_request(format!("response_format type {other:?} is not supported"))),
    }
    Ok((r, shape))
}

/// `/v1/completions`' body as a Hearth request: the prompt as one user message (Hearth
/// always applies the model's chat template; there is no raw-text completion).
pub fn completion_request(body: &Json) -> Result<(Request, Shape), ApiError> {
    let prompt = match body.get("prompt") {
        Some(Json::String(s)) => s.clone(),
        Some(Json::Array(a)) if a.len() == 1 && a[0].is_string() => a[0].as_str().unwrap_or_default().to_owned(),
        _ => return Err(ApiError::bad_request("prompt must be a string (one prompt per request)")),
    };
    let mut r = Request::new();
    let mut shape = Shape::default();
    r.insert(key::MESSAGES, hearth_dbus::messages_value(&[("user", &prompt)]));
    common_options(body, &mut r, &mut shape)?;
    Ok((r, shape))
}

/// OpenAI's finish_reason for Hearth's.
pub fn finish_reason(r: &GenerationResult) -> &'static str {
    match r.finish_reason.as_str() {
        "length" => "length",
        "tool_calls" => "tool_calls",
        _ => "stop",
    }
}

pub fn usage(r: &GenerationResult) -> Json {
    let completion = r.tokens;
    json!({"prompt_tokens": r.prompt_tokens, "completion_tokens": completion, "total_tokens": r.prompt_tokens + completion})
}

/// A finite number for JSON (a masked token's log-probability is -inf; JSON has none).
fn finite(x: f64) -> f64 {
    if x.is_finite() { x } else { -9999.0 }
}

fn logprobs(r: &GenerationResult) -> Json {
    let Some(lps) = &r.logprobs else { return Json::Null };
    let content: Vec<Json> = lps
        .iter()
        .map(|(_, text, lp, top)| {
            let top: Vec<Json> =
                top.iter().map(|(_, t, p)| json!({"token": t, "logprob": finite(*p), "bytes": t.as_bytes()})).collect();
            json!({"token": text, "logprob": finite(*lp), "bytes": text.as_bytes(), "top_logprobs": top})
        })
        .collect();
    json!({"content": content})
}

fn tool_calls(r: &GenerationResult) -> Option<Json> {
    let calls = r.tool_calls.as_ref().filter(|c| !c.is_empty())?;
    Some(Json::Array(
        calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                json!({"index": i, "id": c.id, "type": "function",
                       "function": {"name": c.name, "arguments": c.arguments}})
            })
            .collect(),
    ))
}

/// The assistant's message of a finished chat completion.
fn assistant_message(r: &GenerationResult) -> Json {
    match tool_calls(r) {
        Some(calls) => json!({"role": "assistant", "content": null, "tool_calls": calls}),
        None => json!({"role": "assistant", "content": r.text}),
    }
}

/// The whole `chat.completion` object.
pub fn chat_response(id: &str, created: u64, r: &GenerationResult) -> Json {
    json!({
        "id": id, "object": "chat.completion", "created": created, "model": r.model,
        "choices": [{"index": 0, "message": assistant_message(r), "finish_reason": finish_reason(r),
                     "logprobs": logprobs(r)}],
        "usage": usage(r),
        "system_fingerprint": format!("hearth-{}", r.route),
    })
}

/// One `chat.completion.chunk`.
pub fn chat_chunk(id: &str, created: u64, model: &str, delta: &Json, finish: Option<&str>) -> Json {
    json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}]})
}

/// The last chunk(s) of a chat stream: what was held (tool calls, or text held because the
/// answer might have been one), the finish reason with the logprobs, and usage if asked.
pub fn chat_tail(id: &str, created: u64, r: &GenerationResult, shape: &Shape, held: &str) -> Vec<Json> {
    let mut out = Vec::new();
    if let Some(calls) = tool_calls(r) {
        out.push(chat_chunk(id, created, &r.model, &json!({"tool_calls": calls}), None));
    } else if !held.is_empty() {
        out.push(chat_chunk(id, created, &r.model, &json!({"content": held}), None));
    }
    let mut last = chat_chunk(id, created, &r.model, &json!({}), Some(finish_reason(r)));
    if shape.logprobs {
        last["choices"][0]["logprobs"] = logprobs(r);
    }
    out.push(last);
    if shape.include_usage {
        out.push(json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": r.model,
                        "choices": [], "usage": usage(r)}));
    }
    out
}

/// The whole `text_completion` object.
pub fn completion_response(id: &str, created: u64, r: &GenerationResult) -> Json {
    json!({
        "id": id, "object": "text_completion", "created": created, "model": r.model,
        "choices": [{"index": 0, "text": r.text, "finish_reason": finish_reason(r), "logprobs": null}],
        "usage": usage(r),
    })
}

/// One streamed `text_completion` object.
pub fn completion_chunk(id: &str, created: u64, model: &str, text: &str, finish: Option<&str>) -> Json {
    json!({"id": id, "object": "text_completion", "created": created, "model": model,
           "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": null}]})
}

/// `/v1/embeddings`' input: one string or an array of strings (token arrays are not taken).
pub fn embedding_input(body: &Json) -> Result<Vec<String>, ApiError> {
    match body.get("input") {
        Some(Json::String(s)) => Ok(vec![s.clone()]),
        Some(Json::Array(a)) => a
            .iter()
            .map(|s| s.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::bad_request("input must be a string or an array of strings (not tokens)")),
        _ => Err(ApiError::bad_request("input must be a string or an array of strings")),
    }
}

/// The embeddings `list`; `base64`: each vector as little-endian f32 bytes in base64, as
/// OpenAI's encoding_format "base64" (the openai package's default) gives them.
pub fn embeddings_response(vectors: &[Vec<f64>], model: &str, base64: bool) -> Json {
    use base64::Engine;
    let data: Vec<Json> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| (*x as f32).to_le_bytes()).collect();
                Json::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    json!({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": 0, "total_tokens": 0}})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(r: &Request) -> Vec<&str> {
        let mut k: Vec<&str> = r.keys().copied().collect();
        k.sort_unstable();
        k
    }

    #[test]
    fn chat_requests_map_to_hearth_keys() {
        let body = json!({
            "model": "smollm2", "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
                {"role": "assistant", "content": null,
                 "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "42"}],
            "max_completion_tokens": 9, "temperature": 0.5, "stop": "END", "seed": -1,
            "logprobs": true, "top_logprobs": 3, "stream": true, "stream_options": {"include_usage": true},
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
            "user": "ignored"
        });
        let (r, shape) = chat_request(&body).unwrap();
        assert_eq!(
            keys(&r),
            [
                "json_schema",
                "logprobs",
                "max_tokens",
                "messages",
                "model",
                "seed",
                "stop",
                "temperature",
                "top_logprobs"
            ]
        );
        assert_eq!(r[key::MAX_TOKENS], Variant::from(9u32));
        assert_eq!(r[key::SEED], Variant::from(u32::MAX));
        assert_eq!(r[key::STOP], Variant::from(vec!["END".to_owned()]));
        assert!(shape.stream && shape.include_usage && shape.logprobs && !shape.tools);
        let Variant::Array(messages) = &r[key::MESSAGES] else { panic!() };
        let text = |i: usize, k: &str| {
            let Variant::Dict(d) = &messages.inner()[i] else { panic!() };
            let v = d.iter().find(|(key, _)| matches!(key, Variant::Str(s) if s.as_str() == k)).unwrap().1;
            let v = if let Variant::Variant(inner) = v { inner } else { v };
            let Variant::Str(s) = v else { panic!("{v:?}") };
            s.as_str().to_owned()
        };
        assert_eq!((text(0, "role"), text(1, "content")), ("system".into(), "Hi there".into()));
        assert_eq!(text(2, "content"), "");
        let Variant::Dict(d) = &messages.inner()[2] else { panic!() };
        let calls = d.iter().find(|(k, _)| matches!(k, Variant::Str(s) if s.as_str() == "tool_calls")).unwrap().1;
        let calls = if let Variant::Variant(inner) = calls { inner } else { calls };
        let Variant::Array(calls) = calls else { panic!("{calls:?}") };
        assert_eq!(calls.len(), 1);
        assert_eq!(calls.element_signature().to_string(), "a{sv}");
        assert_eq!((text(3, "role"), text(3, "tool_call_id")), ("tool".into(), "c1".into()));
    }

    #[test]
    fn what_hearth_cannot_do_is_a_clear_400() {
        for (body, want) in [
            (json!({"messages": "hi"}), "messages must be an array"),
            (json!({"messages": [{"role": "user", "content": "x"}], "n": 2}), "n must be 1"),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]}),
                "data: URL",
            ),
            (json!({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}), "not supported"),
            (json!({"messages": [{"role": "user", "content": "x"}], "stop": 3}), "stop must be"),
            (json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}), "max_tokens"),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}],
                    "tool_choice": {"type": "function", "function": {"name": "f"}}}),
                "tool_choice",
            ),
        ] {
            let e = chat_request(&body).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert!(e.message.contains(want), "{want}: {}", e.message);
        }
        assert!(completion_request(&json!({"prompt": ["a", "b"]})).is_err());
        assert!(embedding_input(&json!({"input": [[1, 2]]})).is_err());
    }

    #[test]
    fn hearth_errors_get_openai_statuses() {
        let e = ApiError::from_hearth("org.hearth.Hearth1.Error.Busy", "queue full");
        assert_eq!((e.status, e.kind), (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"));
        let e = ApiError::from_hearth("org.hearth.Hearth1.Error.ContextLengthExceeded", "too long");
        assert_eq!((e.status, e.code.as_str()), (StatusCode::BAD_REQUEST, "context_length_exceeded"));
        assert_eq!(ApiError::from_hearth("org.hearth.Hearth1.Error.ModelNotFound", "").status, StatusCode::NOT_FOUND);
        assert_eq!(e.body()["error"]["message"], "too long");
    }

    #[test]
    fn results_map_to_openai_objects() {
        let r = GenerationResult {
            finish_reason: "tool_calls".into(),
            text: "{...}".into(),
            tokens: 4,
            prompt_tokens: 10,
            model: "m".into(),
            tool_calls: Some(vec![hearth_dbus::ToolCall {
                id: "call_0".into(),
                name: "f".into(),
                arguments: "{}".into(),
            }]),
            logprobs: Some(vec![(1, "a".into(), f64::NEG_INFINITY, vec![])]),
            ..GenerationResult::default()
        };
        let c = chat_response("id1", 7, &r);
        assert_eq!(c["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(c["choices"][0]["message"]["content"], Json::Null);
        assert_eq!(c["choices"][0]["message"]["tool_calls"][0]["function"]["name"], "f");
        assert_eq!(c["choices"][0]["logprobs"]["content"][0]["logprob"], -9999.0);
        assert_eq!(c["usage"]["total_tokens"], 14);
        let tail = chat_tail("id1", 7, &r, &Shape { include_usage: true, ..Shape::default() }, "{...}");
        assert_eq!(tail.len(), 3);
        assert!(tail[0]["choices"][0]["delta"]["tool_calls"].is_array());
        let e = embeddings_response(&[vec![1.0, -0.5]], "m", true);
        assert_eq!(e["data"][0]["embedding"], "AACAPwAAAL8=");
    }
}
