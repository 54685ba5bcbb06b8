//! Parsing and validation of the `a{sv}` request dictionary of Generate and Complete.
//! Every rejection is an `InvalidArgs` that names the key and what was wrong with it.

use std::collections::HashMap;

use hearth_dbus::request_key as key;
use hearth_ffi::SamplerParams;
use zbus::{OwnedVariant, Variant};

use crate::engine::{GenerateRequest, Priority};
use crate::error::Error;
use crate::privacy::{Content, Image, Part, RouteRequest, Scope};
use crate::structured::{MAX_CALLS, Structure, ToolCall};

/// Most messages in one request.
const MAX_MESSAGES: usize = 1024;
/// Most bytes of all message contents together (the context bounds tokens later).
const MAX_CONTENT_BYTES: usize = 1 << 20;

/// Most images in one request, the most bytes of one (encoded), and of all together. The
/// projectors of small vision models see 224 to 512 pixels a side: an app sends a photo
/// downscaled, not the camera's file. (zbus holds a received `ay` as one value per byte,
/// so hearthd briefly holds some 30 times a request's image bytes.)
pub const MAX_IMAGES: usize = 8;
pub const MAX_IMAGE_BYTES: usize = 4 << 20;
const MAX_IMAGE_TOTAL_BYTES: usize = 8 << 20;

/// Checks that `bytes` (the image at `what`) is a PNG or a JPEG by its signature: the only
/// formats the engine decodes. Nothing else of it is read here: decoding happens in the
/// sandboxed engine.
pub fn check_image(what: &str, bytes: &[u8]) -> Result<(), Error> {
    if bytes.is_empty() {
        return Err(invalid(format!("{what} is empty")));
    }
    if bytes.len() > MAX_IMAGE_BYTES {
        return Err(invalid(format!("{what} has {} bytes; at most {MAX_IMAGE_BYTES}", bytes.len())));
    }
    if !has_image_signature(bytes) {
        return Err(invalid(format!("{what} is neither a PNG nor a JPEG image (the formats taken)")));
    }
    Ok(())
}

/// Whether `bytes` begin like a PNG or a JPEG file.
pub fn has_image_signature(bytes: &[u8]) -> bool {
    const PNG: &[u8] = b"\x89PNG\r\n\x1a\n";
    const JPEG: &[u8] = &[0xff, 0xd8, 0xff];
    bytes.starts_with(PNG) || bytes.starts_with(JPEG)
}

/// Checks the images of `parts` (what `whose` holds) against one request's limits.
pub fn check_image_limits(parts: &[Part], whose: &str) -> Result<(), Error> {
    let images = parts.iter().flat_map(|p| &p.images);
    let count = images.clone().count();
    if count > MAX_IMAGES {
        return Err(invalid(format!("{whose} hold {count} images; at most {MAX_IMAGES}")));
    }
    let bytes: usize = images
        .map(|i| match i {
            Image::Plain(b) | Image::Sealed(b) => b.len(),
        })
        .sum();
    if bytes > MAX_IMAGE_TOTAL_BYTES {
        return Err(invalid(format!("{whose} hold images of {bytes} bytes together; at most {MAX_IMAGE_TOTAL_BYTES}")));
    }
    Ok(())
}

/// `images` or `sealed_images` of message `i`: an array of byte arrays.
fn parse_images(i: usize, k: &str, v: &Variant<'_>, sealed: bool, out: &mut Vec<Image>) -> Result<(), Error> {
    let Variant::Array(array) = unwrap_variant(v) else {
        return Err(invalid(format!(
            "messages[{i}].{k} must be an array of byte arrays (aay), got {}",
            v.value_signature()
        )));
    };
    for (j, item) in array.inner().iter().enumerate() {
        let what = format!("messages[{i}].{k}[{j}]");
        let bytes = as_bytes(&what, item)?;
        if sealed {
            if bytes.len() > MAX_IMAGE_BYTES + 4096 {
                return Err(invalid(format!("{what} has {} bytes; at most {MAX_IMAGE_BYTES} sealed", bytes.len())));
            }
            out.push(Image::Sealed(bytes));
        } else {
            check_image(&what, &bytes)?;
            out.push(Image::Plain(bytes));
        }
    }
    Ok(())
}

/// Most adapters one request may name, and the largest scale magnitude.
const MAX_ADAPTERS: usize = 16;
const MAX_ADAPTER_SCALE: f64 = 8.0;

/// Most stop sequences, and the longest one, in bytes (OpenAI's limits are 4 and none).
const MAX_STOPS: usize = 4;
const MAX_STOP_BYTES: usize = 64;

/// Most alternatives `top_logprobs` may ask for (OpenAI's limit).
const MAX_TOP_LOGPROBS: u8 = 20;

/// Generated tokens penalties look back at, at most.
const MAX_PENALTY_WINDOW: u32 = 4096;

/// Longest deadline accepted: one day.
const MAX_DEADLINE_MS: u64 = 86_400_000;

/// A parsed request. `request.messages` is empty until the privacy gate has unsealed
/// `parts` and admitted them.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub request: GenerateRequest,
    pub parts: Vec<Part>,
    pub route: RouteRequest,
    pub handle_token: Option<String>,
    /// The schema, grammar or tools the output follows: compiled to `request.grammar` and
    /// the tools' description at admission, and applied to the result after the engine.
    pub structure: Option<std::sync::Arc<Structure>>,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidArgs(msg.into())
}

/// Strips variant wrappers (`v` inside `v`) that some bindings add.
fn unwrap_variant<'a>(v: &'a Variant<'a>) -> &'a Variant<'a> {
    match v {
        Variant::Variant(inner) => unwrap_variant(inner),
        v => v,
    }
}

pub(crate) fn as_str<'a>(k: &str, v: &'a Variant<'a>) -> Result<&'a str, Error> {
    match unwrap_variant(v) {
        Variant::Str(s) => Ok(s.as_str()),
        other => Err(invalid(format!("{k} must be a string (s), got {}", other.value_signature()))),
    }
}

fn as_bool(k: &str, v: &Variant<'_>) -> Result<bool, Error> {
    match unwrap_variant(v) {
        Variant::Bool(b) => Ok(*b),
        other => Err(invalid(format!("{k} must be a boolean (b), got {}", other.value_signature()))),
    }
}

fn as_u64(k: &str, v: &Variant<'_>) -> Result<u64, Error> {
    let n: i128 = match unwrap_variant(v) {
        Variant::U8(n) => (*n).into(),
        Variant::U16(n) => (*n).into(),
        Variant::U32(n) => (*n).into(),
        Variant::U64(n) => (*n).into(),
        Variant::I16(n) => (*n).into(),
        Variant::I32(n) => (*n).into(),
        Variant::I64(n) => (*n).into(),
        other => return Err(invalid(format!("{k} must be an integer (u), got {}", other.value_signature()))),
    };
    u64::try_from(n).map_err(|_| invalid(format!("{k} must not be negative, got {n}")))
}

fn as_f64(k: &str, v: &Variant<'_>) -> Result<f64, Error> {
    let x = match unwrap_variant(v) {
        Variant::F64(x) => *x,
        Variant::U32(n) => (*n).into(),
        Variant::I32(n) => (*n).into(),
        other => return Err(invalid(format!("{k} must be a number (d), got {}", other.value_signature()))),
    };
    if x.is_finite() { Ok(x) } else { Err(invalid(format!("{k} must be finite"))) }
}

/// `adapters`: a{sd}, adapter name → scale. Whether the names exist is the engine's to say
/// (it knows the model's adapters).
fn parse_adapters(v: &Variant<'_>) -> Result<std::collections::BTreeMap<String, f32>, Error> {
    let Variant::Dict(dict) = unwrap_variant(v) else {
        return Err(invalid(format!(
            "adapters must be a dictionary of name → scale (a{{sd}}), got {}",
            v.value_signature()
        )));
    };
    let mut out = std::collections::BTreeMap::new();
    for (name, scale) in dict.iter() {
        let name = as_str("an adapter name", name)?;
        if name.is_empty() || name.len() > 128 {
            return Err(invalid("adapter names are 1-128 bytes"));
        }
        let what = format!("adapters[{name:?}]");
        let scale = as_f64(&what, scale)?;
        if scale.abs() > MAX_ADAPTER_SCALE {
            return Err(invalid(format!(
                "{what} must be within -{MAX_ADAPTER_SCALE}..={MAX_ADAPTER_SCALE}, got {scale}"
            )));
        }
        out.insert(name.to_owned(), scale as f32);
    }
    if out.len() > MAX_ADAPTERS {
        return Err(invalid(format!("adapters names {} adapters; at most {MAX_ADAPTERS}", out.len())));
    }
    Ok(out)
}

/// `stop`: as, up to [`MAX_STOPS`] non-empty strings of at most [`MAX_STOP_BYTES`] bytes.
fn parse_stop(v: &Variant<'_>) -> Result<Vec<String>, Error> {
    let Variant::Array(a) = unwrap_variant(v) else {
        return Err(invalid(format!("stop must be an array of strings (as), got {}", v.value_signature())));
    };
    if a.len() > MAX_STOPS {
        return Err(invalid(format!("stop has {} strings; at most {MAX_STOPS}", a.len())));
    }
    let mut out = Vec::with_capacity(a.len());
    for (i, s) in a.inner().iter().enumerate() {
        let s = as_str(&format!("stop[{i}]"), s)?;
        if s.is_empty() || s.len() > MAX_STOP_BYTES {
            return Err(invalid(format!("stop[{i}] must be 1-{MAX_STOP_BYTES} bytes, got {}", s.len())));
        }
        out.push(s.to_owned());
    }
    Ok(out)
}

/// An assistant message's `tool_calls` (aa{sv}: id, name, arguments), as a result gave them.
fn parse_tool_calls(i: usize, v: &Variant<'_>) -> Result<Vec<ToolCall>, Error> {
    let what = format!("messages[{i}].tool_calls");
    let Variant::Array(a) = unwrap_variant(v) else {
        return Err(invalid(format!(
            "{what} must be an array of dictionaries (aa{{sv}}), got {}",
            v.value_signature()
        )));
    };
    if a.is_empty() || a.len() > MAX_CALLS {
        return Err(invalid(format!("{what} must hold 1 to {MAX_CALLS} calls, got {}", a.len())));
    }
    let mut out = Vec::with_capacity(a.len());
    for (j, call) in a.inner().iter().enumerate() {
        let what = format!("{what}[{j}]");
        let Variant::Dict(dict) = unwrap_variant(call) else {
            return Err(invalid(format!("{what} must be a dictionary (a{{sv}}), got {}", call.value_signature())));
        };
        let (mut id, mut name, mut arguments) = (None, None, None);
        for (k, v) in dict.iter() {
            let Variant::Str(k) = k else { return Err(invalid(format!("{what} keys must be strings"))) };
            let slot = match k.as_str() {
                "id" => &mut id,
                "name" => &mut name,
                "arguments" => &mut arguments,
                other => return Err(invalid(format!("{what} has unknown key {other:?} (id, name, arguments)"))),
            };
            *slot = Some(as_str(&format!("{what}.{k}"), v)?.to_owned());
        }
        let (Some(id), Some(name), Some(arguments)) = (id, name, arguments) else {
            return Err(invalid(format!("{what} needs id, name and arguments")));
        };
        for (key, value) in [("id", &id), ("name", &name)] {
            if !crate::structured::is_tool_name(value) {
                return Err(invalid(format!("{what}.{key} must be 1-64 ASCII letters, digits, '_' or '-'")));
            }
        }
        if arguments.len() > MAX_CONTENT_BYTES {
            return Err(invalid(format!("message contents exceed {MAX_CONTENT_BYTES} bytes")));
        }
        if !matches!(serde_json::from_str::<serde_json::Value>(&arguments), Ok(serde_json::Value::Object(_))) {
            return Err(invalid(format!("{what}.arguments must be a JSON object text")));
        }
        out.push(ToolCall { id, name, arguments });
    }
    Ok(out)
}

fn parse_messages(v: &Variant<'_>) -> Result<Vec<Part>, Error> {
    let Variant::Array(array) = unwrap_variant(v) else {
        return Err(invalid(format!(
            "messages must be an array of dictionaries (aa{{sv}}), got {}",
            v.value_signature()
        )));
    };
    if array.is_empty() {
        return Err(invalid("messages is empty: give at least one message"));
    }
    if array.len() > MAX_MESSAGES {
        return Err(invalid(format!("messages has {} entries; at most {MAX_MESSAGES}", array.len())));
    }
    let mut total = 0usize;
    let mut out = Vec::with_capacity(array.len());
    for (i, item) in array.inner().iter().enumerate() {
        let Variant::Dict(dict) = unwrap_variant(item) else {
            return Err(invalid(format!(
                "messages[{i}] must be a dictionary (a{{sv}}), got {}",
                item.value_signature()
            )));
        };
        let (mut role, mut content, mut scope) = (None, None, None);
        let (mut images, mut sealed_images) = (Vec::new(), Vec::new());
        let (mut tool_call_id, mut tool_calls) = (None, Vec::new());
        for (k, v) in dict.iter() {
            let Variant::Str(k) = k else {
                return Err(invalid(format!("messages[{i}] keys must be strings")));
            };
            let set = |content: &mut Option<Content>, c: Content| {
                if content.replace(c).is_some() {
                    return Err(invalid(format!("messages[{i}] has both content and sealed")));
                }
                Ok(())
            };
            match k.as_str() {
                key::ROLE => role = Some(as_str(&format!("messages[{i}].role"), v)?.to_owned()),
                key::CONTENT => {
                    set(&mut content, Content::Text(as_str(&format!("messages[{i}].content"), v)?.to_owned()))?
                }
                key::SEALED => set(&mut content, Content::Sealed(as_bytes(&format!("messages[{i}].sealed"), v)?))?,
                key::SCOPE => {
                    let s = as_str(&format!("messages[{i}].scope"), v)?;
                    scope = Some(Scope::parse(s).ok_or_else(|| {
                        invalid(format!("messages[{i}].scope {s:?} is not one of public, personal, local"))
                    })?);
                }
                key::TOOL_CALL_ID => {
                    let id = as_str(&format!("messages[{i}].tool_call_id"), v)?;
                    if !crate::structured::is_tool_name(id) {
                        return Err(invalid(format!(
                            "messages[{i}].tool_call_id must be 1-64 ASCII letters, digits, '_' or '-'"
                        )));
                    }
                    tool_call_id = Some(id.to_owned());
                }
                key::TOOL_CALLS => tool_calls = parse_tool_calls(i, v)?,
                key::IMAGES => parse_images(i, key::IMAGES, v, false, &mut images)?,
                key::SEALED_IMAGES => parse_images(i, key::SEALED_IMAGES, v, true, &mut sealed_images)?,
                other => return Err(invalid(format!("messages[{i}] has unknown key {other:?}"))),
            }
        }
        images.append(&mut sealed_images);
        let role = role.ok_or_else(|| invalid(format!("messages[{i}] has no role")))?;
        if !matches!(role.as_str(), "system" | "user" | "assistant" | "tool") {
            return Err(invalid(format!("messages[{i}].role {role:?} is not one of system, user, assistant, tool")));
        }
        // A message of images alone, or of tool calls alone, has empty text.
        let content = match content {
            Some(c) => c,
            None if !images.is_empty() || !tool_calls.is_empty() => Content::Text(String::new()),
            None => return Err(invalid(format!("messages[{i}] has no content (or sealed, or images)"))),
        };
        if tool_call_id.is_some() && role != "tool" {
            return Err(invalid(format!("messages[{i}] has a tool_call_id, which only tool messages may")));
        }
        if !tool_calls.is_empty() && role != "assistant" {
            return Err(invalid(format!("messages[{i}] has tool_calls, which only assistant messages may")));
        }
        if !images.is_empty() && role != "user" {
            return Err(invalid(format!("messages[{i}] holds images, which only user messages may")));
        }
        total += match &content {
            Content::Text(t) => t.len(),
            Content::Sealed(b) => b.len(),
        };
        total += tool_calls.iter().map(|c| c.id.len() + c.name.len() + c.arguments.len()).sum::<usize>();
        if total > MAX_CONTENT_BYTES {
            return Err(invalid(format!("message contents exceed {MAX_CONTENT_BYTES} bytes")));
        }
        // Sealed data is local by definition (text or image); unlabelled text is personal.
        let sealed = matches!(content, Content::Sealed(_)) || images.iter().any(|i| matches!(i, Image::Sealed(_)));
        let scope = match (sealed, scope) {
            (true, Some(s)) if s != Scope::Local => {
                return Err(invalid(format!("messages[{i}] is sealed, so its scope is local, not {}", s.as_str())));
            }
            (true, _) => Scope::Local,
            (false, s) => s.unwrap_or(Scope::Personal),
        };
        out.push(Part { role, content, scope, images, tool_calls, tool_call_id });
    }
    check_image_limits(&out, "the messages")?;
    Ok(out)
}

pub(crate) fn as_bytes(k: &str, v: &Variant<'_>) -> Result<Vec<u8>, Error> {
    match unwrap_variant(v) {
        Variant::Array(a) if a.element_signature() == &zbus::Signature::U8 => a
            .inner()
            .iter()
            .map(|b| match b {
                Variant::U8(b) => Ok(*b),
                _ => Err(invalid(format!("{k} must be bytes (ay)"))),
            })
            .collect(),
        other => Err(invalid(format!("{k} must be bytes (ay), got {}", other.value_signature()))),
    }
}

/// Most texts in one Embed call.
const MAX_TEXTS: usize = 256;

/// A parsed Embed request.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbedRequest {
    pub texts: Vec<String>,
    pub model: Option<String>,
    /// The texts' scope (default personal); embeddings of local text are local too, and every
    /// embedding is computed on the device.
    pub scope: Scope,
}

/// Parses Embed's dictionary: `texts` (as), optional `model` (s) and `scope` (s).
pub fn parse_embed(dict: &HashMap<String, OwnedVariant>) -> Result<EmbedRequest, Error> {
    let (mut texts, mut model, mut scope) = (None, None, Scope::Personal);
    for (k, v) in dict {
        let v: &Variant<'_> = v;
        match k.as_str() {
            key::TEXTS => {
                let Variant::Array(a) = unwrap_variant(v) else {
                    return Err(invalid(format!(
                        "texts must be an array of strings (as), got {}",
                        v.value_signature()
                    )));
                };
                let list: Vec<String> = a
                    .inner()
                    .iter()
                    .enumerate()
                    .map(|(i, t)| as_str(&format!("texts[{i}]"), t).map(str::to_owned))
                    .collect::<Result<_, _>>()?;
                texts = Some(list);
            }
            key::MODEL => model = Some(as_str(k, v)?.to_owned()).filter(|m| !m.is_empty()),
            key::SCOPE => {
                let s = as_str(k, v)?;
                scope = Scope::parse(s)
                    .ok_or_else(|| invalid(format!("scope {s:?} is not one of public, personal, local")))?;
            }
            other => return Err(invalid(format!("unknown Embed key {other:?} (known: texts, model, scope)"))),
        }
    }
    let texts = texts.ok_or_else(|| invalid("texts is missing"))?;
    if texts.is_empty() || texts.len() > MAX_TEXTS {
        return Err(invalid(format!("texts must hold 1 to {MAX_TEXTS} strings, got {}", texts.len())));
    }
    if texts.iter().map(String::len).sum::<usize>() > MAX_CONTENT_BYTES {
        return Err(invalid(format!("texts exceed {MAX_CONTENT_BYTES} bytes")));
    }
    Ok(EmbedRequest { texts, model, scope })
}

/// Conversions (schema, grammar and tools checks, llama.cpp's schema converter) running at
/// once; more requests wait for a turn instead of taking more threads.
static CONVERSIONS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// [`parse`], but never on the D-Bus runtime for a request that carries a schema, grammar or
/// tools: their checks and conversion run on a blocking thread (bounded in size, so they
/// end), so other apps' calls are never held behind them.
pub async fn parse_off_runtime(dict: HashMap<String, OwnedVariant>, default_max_tokens: u32) -> Result<Parsed, Error> {
    if ![key::JSON_SCHEMA, key::GRAMMAR, key::TOOLS].iter().any(|k| dict.contains_key(*k)) {
        return parse(&dict, default_max_tokens);
    }
    // The turn goes with the work: a caller that stops waiting does not free it early.
    let turn = CONVERSIONS.acquire().await.map_err(|_| Error::Internal("the request parser stopped".into()))?;
    tokio::task::spawn_blocking(move || {
        let _turn = turn;
        parse(&dict, default_max_tokens)
    })
    .await
    .map_err(|e| Error::Internal(format!("the request parser failed: {e}")))?
}

/// Parses a request dictionary. `default_max_tokens` applies when the key is absent.
pub fn parse(dict: &HashMap<String, OwnedVariant>, default_max_tokens: u32) -> Result<Parsed, Error> {
    let mut messages = None;
    let mut model = None;
    let mut max_tokens = u64::from(default_max_tokens);
    let mut sampling = SamplerParams::default();
    let mut handle_token = None;
    let mut priority = Priority::Normal;
    let mut deadline = None;
    let mut route = RouteRequest::Auto;
    let (mut json_schema, mut grammar, mut tools, mut tool_choice) = (None, None, None, None);
    let mut adapters = None;
    let mut speculative = true;
    let mut stop = Vec::new();
    let (mut logprobs, mut top_logprobs) = (false, None);
    for (k, v) in dict {
        let v: &Variant<'_> = v;
        match k.as_str() {
            key::MESSAGES => messages = Some(parse_messages(v)?),
            key::MODEL => {
                let name = as_str(k, v)?;
                if name.is_empty() {
                    return Err(invalid("model must not be empty"));
                }
                model = Some(name.to_owned());
            }
            key::MAX_TOKENS => max_tokens = as_u64(k, v)?,
            key::TEMPERATURE => {
                let t = as_f64(k, v)?;
                if !(0.0..=2.0).contains(&t) {
                    return Err(invalid(format!("temperature must be within 0..=2, got {t}")));
                }
                sampling.temperature = t as f32;
            }
            key::TOP_P => {
                let p = as_f64(k, v)?;
                if !(p > 0.0 && p <= 1.0) {
                    return Err(invalid(format!("top_p must be within (0, 1], got {p}")));
                }
                sampling.top_p = p as f32;
            }
            key::TOP_K => {
                let n = as_u64(k, v)?;
                sampling.top_k = i32::try_from(n).map_err(|_| invalid(format!("top_k {n} is too large")))?;
            }
            key::SEED => {
                let n = as_u64(k, v)?;
                sampling.seed = u32::try_from(n).map_err(|_| invalid(format!("seed must fit in 32 bits, got {n}")))?;
            }
            key::PRIORITY => {
                let p = as_str(k, v)?;
                priority = Priority::parse(p)
                    .ok_or_else(|| invalid(format!("priority {p:?} is not one of interactive, normal, background")))?;
            }
            key::DEADLINE_MS => {
                let ms = as_u64(k, v)?;
                if ms == 0 || ms > MAX_DEADLINE_MS {
                    return Err(invalid(format!("deadline_ms must be within 1..={MAX_DEADLINE_MS}, got {ms}")));
                }
                deadline = Some(std::time::Duration::from_millis(ms));
            }
            key::ROUTE => {
                let r = as_str(k, v)?;
                route = RouteRequest::parse(r)
                    .ok_or_else(|| invalid(format!("route {r:?} is not one of auto, local, cloud")))?;
            }
            key::JSON_SCHEMA => json_schema = Some(as_str(k, v)?),
            key::GRAMMAR => grammar = Some(as_str(k, v)?),
            key::TOOLS => tools = Some(as_str(k, v)?),
            key::TOOL_CHOICE => tool_choice = Some(as_str(k, v)?),
            key::ADAPTERS => adapters = Some(parse_adapters(v)?),
            key::SPECULATIVE => speculative = as_bool(k, v)?,
            key::STOP => stop = parse_stop(v)?,
            key::REPETITION_PENALTY => {
                let x = as_f64(k, v)?;
                if !(x > 0.0 && x <= 2.0) {
                    return Err(invalid(format!("repetition_penalty must be within (0, 2], got {x}")));
                }
                sampling.repeat_penalty = x as f32;
            }
            key::FREQUENCY_PENALTY | key::PRESENCE_PENALTY => {
                let x = as_f64(k, v)?;
                if !(-2.0..=2.0).contains(&x) {
                    return Err(invalid(format!("{k} must be within -2..=2, got {x}")));
                }
                if k == key::FREQUENCY_PENALTY {
                    sampling.frequency_penalty = x as f32;
                } else {
                    sampling.presence_penalty = x as f32;
                }
            }
            key::LOGPROBS => logprobs = as_bool(k, v)?,
            key::TOP_LOGPROBS => {
                let n = as_u64(k, v)?;
                top_logprobs =
                    Some(u8::try_from(n).ok().filter(|&n| n <= MAX_TOP_LOGPROBS).ok_or_else(|| {
                        invalid(format!("top_logprobs must be within 0..={MAX_TOP_LOGPROBS}, got {n}"))
                    })?);
            }
            key::HANDLE_TOKEN => {
                let t = as_str(k, v)?;
                if !hearth_dbus::is_valid_handle_token(t) {
                    return Err(invalid("handle_token must be 1-64 ASCII letters, digits or '_'"));
                }
                handle_token = Some(t.to_owned());
            }
            other => return Err(invalid(format!("unknown request key {other:?}"))),
        }
    }
    let parts = messages.ok_or_else(|| invalid("messages is missing"))?;
    if max_tokens == 0 {
        return Err(invalid("max_tokens must be at least 1"));
    }
    let max_tokens =
        u32::try_from(max_tokens).map_err(|_| invalid(format!("max_tokens {max_tokens} is absurdly large")))?;
    if top_logprobs.is_some() && !logprobs {
        return Err(invalid("top_logprobs needs logprobs = true"));
    }
    // Penalties see the last tokens generated, as many as the request may generate (capped).
    sampling.penalty_last_n = max_tokens.min(MAX_PENALTY_WINDOW) as i32;
    let structure = Structure::parse(json_schema, grammar, tools, tool_choice)?.map(std::sync::Arc::new);
    if structure.is_some() && !stop.is_empty() {
        // A stop could cut the grammar's output short: JSON that does not parse, a tool
        // call taken for text.
        return Err(invalid("stop cannot be combined with json_schema, grammar or tools"));
    }
    if structure.is_some() || adapters.is_some() || logprobs || sampling.repeat_penalty != 1.0 {
        // Grammars are applied by the on-device sampler, adapters by the on-device model, and
        // log-probabilities and the repetition penalty are the device's own numbers; the
        // cloud leg has no equivalent that guarantees the same, so such requests stay on the
        // device.
        route = match route {
            RouteRequest::Cloud => {
                return Err(invalid(
                    "json_schema, grammar, tools, adapters, logprobs and repetition_penalty run on the device: \
                     route cannot be cloud",
                ));
            }
            _ => RouteRequest::Local,
        };
    }
    let request = GenerateRequest {
        messages: Vec::new(),
        model,
        max_tokens,
        sampling,
        priority,
        deadline,
        assistant_prefix: None,
        grammar: None,
        tools: None,
        adapters,
        session: None,
        speculative,
        images: Vec::new(),
        stop,
        logprobs: logprobs.then_some(top_logprobs.unwrap_or(0)),
    };
    Ok(Parsed { request, parts, route, handle_token, structure })
}

/// The boolean option `key` of an options dictionary that may hold only `allowed` keys
/// (absent: false).
pub fn options_bool(options: &HashMap<String, OwnedVariant>, key: &str, allowed: &[&str]) -> Result<bool, Error> {
    if let Some(unknown) = options.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(invalid(format!("unknown option {unknown:?} (known: {allowed:?})")));
    }
    options.get(key).map_or(Ok(false), |v| as_bool(key, v))
}

#[cfg(test)]
mod tests;
