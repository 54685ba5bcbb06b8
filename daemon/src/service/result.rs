//! The dictionaries hearthd answers with: a generation's result (Complete, Request.Finished,
//! Session.Complete) and a ListModels entry.

use std::collections::HashMap;

use hearth_dbus::{Error as BusError, result_key};
use zbus::{OwnedVariant, Variant};

use super::driver::Finish;
use crate::manager::ModelReport;
use crate::privacy::Decision;
use crate::structured::Structure;

pub(crate) fn owned(v: Variant<'_>) -> OwnedVariant {
    // Only values holding file descriptors can fail to convert; ours never do.
    OwnedVariant::try_from(v).expect("value without file descriptors")
}

/// The result dictionary of Complete and Request.Finished; `streamed` is how many Token
/// events the caller got (the device's tokens and the cloud's chunks).
pub(crate) fn outcome_dict(
    finish: &Finish,
    decision: &Decision,
    structure: Option<&Structure>,
    streamed: u32,
) -> HashMap<String, OwnedVariant> {
    let o = &finish.outcome;
    let mut d = HashMap::from([
        (result_key::FINISH_REASON.to_owned(), owned(Variant::from(o.reason.as_str()))),
        (result_key::TEXT.to_owned(), owned(Variant::from(o.text.as_str()))),
        (result_key::TOKENS.to_owned(), owned(Variant::from(streamed))),
        (result_key::TOKEN_IDS.to_owned(), owned(Variant::from(o.token_ids.clone()))),
        (result_key::PROMPT_TOKENS.to_owned(), owned(Variant::from(o.prompt_tokens))),
        (result_key::CACHED_TOKENS.to_owned(), owned(Variant::from(o.cached_tokens))),
        (result_key::MODEL.to_owned(), owned(Variant::from(o.model.as_str()))),
        (result_key::PREFILL_US.to_owned(), owned(Variant::from(o.prefill.as_micros() as u64))),
        (result_key::DECODE_US.to_owned(), owned(Variant::from(o.decode.as_micros() as u64))),
    ]);
    let (route, reason) = match &finish.route {
        Some((route, reason)) => (route.clone(), reason.clone()),
        None => (decision.route.as_str().to_owned(), decision.reason.to_owned()),
    };
    d.insert(result_key::ROUTE.to_owned(), owned(Variant::from(route)));
    d.insert(result_key::ROUTE_REASON.to_owned(), owned(Variant::from(reason)));
    if let Some(s) = structure.filter(|_| o.error.is_none()) {
        if let Some(valid) = s.schema_valid(&o.text) {
            d.insert(result_key::SCHEMA_VALID.to_owned(), owned(Variant::from(valid)));
        }
        let calls = s.tool_calls(&o.text);
        if !calls.is_empty() {
            let calls: Vec<HashMap<&str, Variant<'_>>> = calls
                .into_iter()
                .map(|c| {
                    HashMap::from([
                        ("id", Variant::from(c.id)),
                        ("name", Variant::from(c.name)),
                        ("arguments", Variant::from(c.arguments)),
                    ])
                })
                .collect();
            d.insert(result_key::TOOL_CALLS.to_owned(), owned(Variant::from(calls)));
            d.insert(result_key::FINISH_REASON.to_owned(), owned(Variant::from(hearth_dbus::FINISH_TOOL_CALLS)));
        }
    }
    if let Some(e) = &o.error {
        let bus = BusError::from(e.clone());
        d.insert(result_key::ERROR_NAME.to_owned(), owned(Variant::from(bus.dbus_name())));
        d.insert(result_key::ERROR_MESSAGE.to_owned(), owned(Variant::from(bus.message())));
    }
    d
}

/// One ListModels entry.
pub(super) fn model_dict(r: &ModelReport, default: &str) -> HashMap<String, OwnedVariant> {
    let m = &r.entry.manifest;
    let caps: Vec<&str> = m.capabilities.iter().map(|c| c.as_str()).collect();
    let mut d = HashMap::from([
        ("name".to_owned(), owned(Variant::from(m.name.as_str()))),
        ("file".to_owned(), owned(Variant::from(r.entry.path.display().to_string()))),
        ("sha256".to_owned(), owned(Variant::from(m.sha256.as_str()))),
        ("loaded".to_owned(), owned(Variant::from(r.info.is_some()))),
        ("default".to_owned(), owned(Variant::from(m.name == default))),
        ("pinned".to_owned(), owned(Variant::from(r.pinned))),
        ("verified".to_owned(), owned(Variant::from(r.verified))),
        ("capabilities".to_owned(), owned(Variant::from(caps))),
        ("adapters".to_owned(), owned(Variant::from(m.adapters.len() as u32))),
        ("adapter_names".to_owned(), owned(Variant::from(m.adapters.iter().map(|a| a.name()).collect::<Vec<_>>()))),
        ("file_size".to_owned(), owned(Variant::from(r.entry.file_size.unwrap_or(0)))),
    ]);
    if let Some(n) = m.context_length {
        d.insert("context_length".to_owned(), owned(Variant::from(n)));
    }
    if let Some(info) = &r.info {
        d.insert("n_params".to_owned(), owned(Variant::from(info.n_params)));
        d.insert("size_bytes".to_owned(), owned(Variant::from(info.size_bytes)));
        d.insert("context_length".to_owned(), owned(Variant::from(info.context_length)));
        d.insert("trained_context".to_owned(), owned(Variant::from(info.trained_context)));
        d.insert("description".to_owned(), owned(Variant::from(info.description.as_str())));
        d.insert("memory_bytes".to_owned(), owned(Variant::from(r.memory)));
        d.insert("kv_shrunk".to_owned(), owned(Variant::from(r.shrunk)));
    }
    if let Some(e) = &r.last_error {
        d.insert("error".to_owned(), owned(Variant::from(e.as_str())));
    }
    d
}
