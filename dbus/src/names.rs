//! Names, paths and dictionary keys of the API.

use zbus::{ObjectPath, OwnedObjectPath};

/// The well-known bus name.
pub const BUS_NAME: &str = "org.hearth.Hearth1";
/// The main object.
pub const OBJECT_PATH: &str = "/org/hearth/Hearth1";
/// The main interface.
pub const INTERFACE: &str = "org.hearth.Hearth1";
/// The interface of request objects.
pub const REQUEST_INTERFACE: &str = "org.hearth.Hearth1.Request";
/// Parent of all request objects.
pub const REQUEST_PATH_PREFIX: &str = "/org/hearth/Hearth1/request";
/// Prefix of every error name.
pub const ERROR_PREFIX: &str = "org.hearth.Hearth1.Error";

/// Keys of the request dictionary.
pub mod request_key {
    pub const MESSAGES: &str = "messages";
    pub const MODEL: &str = "model";
    pub const MAX_TOKENS: &str = "max_tokens";
    pub const TEMPERATURE: &str = "temperature";
    pub const TOP_P: &str = "top_p";
    pub const TOP_K: &str = "top_k";
    pub const SEED: &str = "seed";
    pub const HANDLE_TOKEN: &str = "handle_token";
    pub const PRIORITY: &str = "priority";
    pub const DEADLINE_MS: &str = "deadline_ms";
    pub const ROUTE: &str = "route";
    /// A JSON Schema (JSON text) the output must follow.
    pub const JSON_SCHEMA: &str = "json_schema";
    /// A GBNF grammar (start rule `root`) the output must follow.
    pub const GRAMMAR: &str = "grammar";
    /// OpenAI-style function tools (JSON text of the `tools` array).
    pub const TOOLS: &str = "tools";
    /// auto (default), required or none.
    pub const TOOL_CHOICE: &str = "tool_choice";
    /// a{sd}: LoRA adapters of the model by name → scale (on-device only). Without it, each
    /// adapter at its manifest scale; with it, exactly these.
    pub const ADAPTERS: &str = "adapters";
    /// b: speculative decoding by prompt lookup (default true; the output is the same).
    pub const SPECULATIVE: &str = "speculative";
    /// as: up to 4 stop sequences (1-64 bytes each): the text ends just before the first.
    pub const STOP: &str = "stop";
    /// d: penalties on tokens generated so far: repetition (0 < x <= 2, 1 disables; on-device
    /// only), frequency and presence (-2..=2, 0 disables), as OpenAI's.
    pub const REPETITION_PENALTY: &str = "repetition_penalty";
    pub const FREQUENCY_PENALTY: &str = "frequency_penalty";
    pub const PRESENCE_PENALTY: &str = "presence_penalty";
    /// b: report each token's log-probability (on-device only), and u: with the
    /// `top_logprobs` (0-20) likeliest alternatives.
    pub const LOGPROBS: &str = "logprobs";
    pub const TOP_LOGPROBS: &str = "top_logprobs";
    /// Keys of Embed's request.
    pub const TEXTS: &str = "texts";
    /// Keys of one message dictionary.
    pub const ROLE: &str = "role";
    pub const CONTENT: &str = "content";
    pub const SEALED: &str = "sealed";
    pub const SCOPE: &str = "scope";
    /// aay: images (PNG or JPEG bytes) placed before the message's text; vision models only.
    pub const IMAGES: &str = "images";
    /// aay: images sealed with Seal (so local), placed after `images`.
    pub const SEALED_IMAGES: &str = "sealed_images";
    /// s: on a tool message, the id of the call (tool_calls' id) it answers.
    pub const TOOL_CALL_ID: &str = "tool_call_id";
    /// aa{sv}: on an assistant message, the calls it made (id, name, arguments), as a
    /// result's tool_calls gave them.
    pub const TOOL_CALLS: &str = "tool_calls";
}

/// Keys of the result dictionary (Complete's reply and Request.Finished).
pub mod result_key {
    pub const FINISH_REASON: &str = "finish_reason";
    pub const TEXT: &str = "text";
    pub const TOKENS: &str = "tokens";
    pub const TOKEN_IDS: &str = "token_ids";
    pub const PROMPT_TOKENS: &str = "prompt_tokens";
    pub const CACHED_TOKENS: &str = "cached_tokens";
    /// Speculative decoding: draft tokens verified, and those taken.
    pub const DRAFT_TOKENS: &str = "draft_tokens";
    pub const DRAFT_ACCEPTED: &str = "draft_accepted";
    /// Prompt tokens that were images, and the time decoding and encoding them took.
    pub const IMAGE_TOKENS: &str = "image_tokens";
    pub const IMAGE_ENCODE_US: &str = "image_encode_us";
    pub const MODEL: &str = "model";
    pub const PREFILL_US: &str = "prefill_us";
    pub const DECODE_US: &str = "decode_us";
    pub const ERROR_NAME: &str = "error_name";
    pub const ERROR_MESSAGE: &str = "error_message";
    pub const ROUTE: &str = "route";
    pub const ROUTE_REASON: &str = "route_reason";
    /// The model's tool calls (aa{sv}: id, name, arguments as JSON text); `finish_reason` is
    /// then "tool_calls".
    pub const TOOL_CALLS: &str = "tool_calls";
    /// With json_schema: whether the text validates against it (false only when cut short).
    pub const SCHEMA_VALID: &str = "schema_valid";
    /// With logprobs: a(isda(isd)), per generated token (id, text, log-probability, and the
    /// likeliest alternatives as (id, text, log-probability), likeliest first).
    pub const LOGPROBS: &str = "logprobs";
}

/// `finish_reason` of an answer that is a tool call.
pub const FINISH_TOOL_CALLS: &str = "tool_calls";

/// Why a generation ended, as the `finish_reason` string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FinishReason {
    /// The model produced an end-of-generation token.
    Stop,
    /// `max_tokens` was reached, or the context is full.
    Length,
    /// Cancelled by the caller or by shutdown.
    Cancelled,
    /// Failed inside hearthd.
    Error,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Cancelled => "cancelled",
            Self::Error => "error",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "stop" => Self::Stop,
            "length" => Self::Length,
            "cancelled" => Self::Cancelled,
            "error" => Self::Error,
            _ => return None,
        })
    }
}

/// Whether `token` may be used as a `handle_token`: 1–64 ASCII letters, digits or '_'.
pub fn is_valid_handle_token(token: &str) -> bool {
    (1..=64).contains(&token.len()) && token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// The path of the request object that a caller with unique name `sender` (":1.42") gets for
/// `handle_token`, in the spirit of xdg-desktop-portal but flat:
/// `/org/hearth/Hearth1/request/1_42_TOKEN`. One path level only, so removing a finished
/// request leaves no empty intermediate node behind in the daemon (zbus prunes only leaves).
/// Returns None for an invalid token or sender.
pub fn request_path(sender: &str, handle_token: &str) -> Option<OwnedObjectPath> {
    if !is_valid_handle_token(handle_token) {
        return None;
    }
    let sender: String =
        sender.trim_start_matches(':').chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    if sender.is_empty() {
        return None;
    }
    ObjectPath::try_from(format!("{REQUEST_PATH_PREFIX}/{sender}_{handle_token}")).ok().map(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_paths_follow_the_portal_scheme() {
        assert_eq!(request_path(":1.42", "abc_1").unwrap().as_str(), "/org/hearth/Hearth1/request/1_42_abc_1");
        assert!(request_path(":1.42", "a-b").is_none());
        assert!(request_path(":1.42", "").is_none());
        assert!(request_path("", "x").is_none());
        assert!(request_path(":1.2", &"x".repeat(65)).is_none());
    }

    #[test]
    fn finish_reasons_round_trip() {
        for r in [FinishReason::Stop, FinishReason::Length, FinishReason::Cancelled, FinishReason::Error] {
            assert_eq!(FinishReason::parse(r.as_str()), Some(r));
        }
    }
}
