//! The result dictionary of a generation (Complete's reply, Request.Finished, a session's
//! Complete) as a typed `a{sv}`: hearthd builds it, hearthctl and the tests read it, and the
//! keys are the field names (see `result_key` and the XML).

use zbus::{DeserializeDict, SerializeDict, Type};

/// How a generation ended and what it produced. Keys without a value (no error, no schema,
/// no tool call) are absent from the dictionary; unknown keys are ignored when reading, so a
/// newer hearthd can add some.
#[derive(Debug, Clone, Default, PartialEq, SerializeDict, DeserializeDict, Type)]
#[zbus(signature = "a{sv}")]
pub struct GenerationResult {
    /// "stop", "length", "cancelled", "error" or "tool_calls".
    pub finish_reason: String,
    /// The whole text (the device's and the cloud's parts, in order).
    pub text: String,
    /// Token events the caller was sent (device tokens and cloud chunks).
    pub tokens: u32,
    /// The device's generated token ids (empty for cloud text).
    pub token_ids: Vec<i32>,
    pub prompt_tokens: u32,
    /// Prompt tokens whose KV was reused.
    pub cached_tokens: u32,
    /// Speculative decoding: draft tokens verified, and those taken.
    pub draft_tokens: u32,
    pub draft_accepted: u32,
    /// Prompt tokens that were images, and the time decoding and encoding them took.
    pub image_tokens: u32,
    pub image_encode_us: u64,
    pub model: String,
    pub prefill_us: u64,
    pub decode_us: u64,
    /// Where it ran ("local", "cloud", "local+cloud", ...) and why.
    pub route: String,
    pub route_reason: String,
    /// With json_schema: whether the text validates (false only when cut short).
    pub schema_valid: Option<bool>,
    /// The model's tool calls; `finish_reason` is then "tool_calls".
    pub tool_calls: Option<Vec<ToolCall>>,
    /// With logprobs: one entry per generated token, in order (`token_ids`'s).
    pub logprobs: Option<Vec<TokenLogprob>>,
    /// The device compute it took, and what that cost of the battery, mJ, by the energy
    /// source the ledger uses ("rapl", "battery-energy", "battery-power" or "model").
    pub compute_us: u64,
    pub energy_mj: Option<f64>,
    pub energy_source: Option<String>,
    /// With an energy budget in the app's policy: "ok", or "over" (its requests then run at
    /// background priority and its background work waits until it is back under).
    pub energy_budget: Option<String>,
    /// Set when `finish_reason` is "cancelled" or "error": the D-Bus error name and message.
    pub error_name: Option<String>,
    pub error_message: Option<String>,
}

/// One tool call of a result.
#[derive(Debug, Clone, Default, PartialEq, SerializeDict, DeserializeDict, Type)]
#[zbus(signature = "a{sv}")]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as JSON text.
    pub arguments: String,
}

impl ToolCall {
    /// The call as an assistant message's `tool_calls` entry (the next turn's history).
    pub fn message_entry(&self) -> std::collections::HashMap<String, zbus::zvariant::Variant<'static>> {
        std::collections::HashMap::from([
            ("id".to_owned(), self.id.clone().into()),
            ("name".to_owned(), self.name.clone().into()),
            ("arguments".to_owned(), self.arguments.clone().into()),
        ])
    }
}

/// A token's log-probability: (id, text, log-probability, the likeliest alternatives at its
/// step as (id, text, log-probability), likeliest first). Text is lossy where a token is part
/// of a character.
pub type TokenLogprob = (i32, String, f64, Vec<(i32, String, f64)>);

impl GenerationResult {
    /// Whether it ended with an error or was cancelled.
    pub fn failed(&self) -> bool {
        self.error_name.is_some()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use zbus::OwnedVariant;
    use zbus::wire::serialized::Context;
    use zbus::wire::{LE, to_bytes};

    use super::*;

    #[test]
    fn the_wire_form_has_the_documented_keys_and_leaves_out_absent_ones() {
        let r = GenerationResult {
            finish_reason: "tool_calls".into(),
            text: "{}".into(),
            tokens: 3,
            token_ids: vec![1, 2, 3],
            tool_calls: Some(vec![ToolCall { id: "call_0".into(), name: "f".into(), arguments: "{}".into() }]),
            logprobs: Some(vec![(1, "a".into(), -0.5, vec![(1, "a".into(), -0.5), (7, "b".into(), -1.5)])]),
            ..GenerationResult::default()
        };
        let bytes = to_bytes(Context::new(LE, 0), &r).unwrap();
        let d: HashMap<String, OwnedVariant> = bytes.deserialize().unwrap().0;
        for k in [crate::result_key::FINISH_REASON, crate::result_key::TOKEN_IDS, crate::result_key::TOOL_CALLS] {
            assert!(d.contains_key(k), "{k} missing from {d:?}");
        }
        assert!(!d.contains_key(crate::result_key::ERROR_NAME) && !d.contains_key(crate::result_key::SCHEMA_VALID));
        assert_eq!(u32::try_from(&d[crate::result_key::TOKENS]).unwrap(), 3);
        assert_eq!(d[crate::result_key::LOGPROBS].value_signature().to_string(), "a(isda(isd))");
        let back: GenerationResult = bytes.deserialize().unwrap().0;
        assert_eq!(back, r);
    }
}
