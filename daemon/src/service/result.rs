//! The dictionaries hearthd answers with: a generation's result (Complete, Request.Finished,
//! Session.Complete) and a ListModels entry.

use std::collections::HashMap;

use hearth_dbus::{Error as BusError, GenerationResult, ToolCall};
use zbus::{OwnedVariant, Variant};

use super::driver::Finish;
use crate::manager::ModelReport;
use crate::privacy::Decision;
use crate::structured::Structure;

pub(crate) fn owned(v: Variant<'_>) -> OwnedVariant {
    // Only values holding file descriptors can fail to convert; ours never do.
    OwnedVariant::try_from(v).expect("value without file descriptors")
}

/// The result of Complete and Request.Finished; `streamed` is how many Token events the
/// caller got (the device's tokens and the cloud's chunks).
pub(crate) fn generation_result(
    finish: &Finish,
    decision: &Decision,
    structure: Option<&Structure>,
    streamed: u32,
) -> GenerationResult {
    let o = &finish.outcome;
    let (route, route_reason) = match &finish.route {
        Some((route, reason)) => (route.clone(), reason.clone()),
        None => (decision.route.as_str().to_owned(), decision.reason.to_owned()),
    };
    let mut r = GenerationResult {
        finish_reason: o.reason.as_str().to_owned(),
        text: o.text.clone(),
        tokens: streamed,
        token_ids: o.token_ids.clone(),
        prompt_tokens: o.prompt_tokens,
        cached_tokens: o.cached_tokens,
        model: o.model.clone(),
        prefill_us: o.prefill.as_micros() as u64,
        decode_us: o.decode.as_micros() as u64,
        route,
        route_reason,
        ..GenerationResult::default()
    };
    if let Some(s) = structure.filter(|_| o.error.is_none()) {
        r.schema_valid = s.schema_valid(&o.text);
        let calls = s.tool_calls(&o.text);
        if !calls.is_empty() {
            r.tool_calls =
                Some(calls.into_iter().map(|c| ToolCall { id: c.id, name: c.name, arguments: c.arguments }).collect());
            r.finish_reason = hearth_dbus::FINISH_TOOL_CALLS.to_owned();
        }
    }
    if let Some(e) = &o.error {
        let bus = BusError::from(e.clone());
        r.error_name = Some(bus.dbus_name().to_owned());
        r.error_message = Some(bus.message().to_owned());
    }
    r
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
    if let Some((pid, sandbox)) = &r.engine {
        let probes: Vec<(String, String)> =
            sandbox.probes.iter().map(|(p, what)| (p.display().to_string(), what.clone())).collect();
        d.insert("engine_pid".to_owned(), owned(Variant::from(*pid)));
        d.insert("sandbox_landlock".to_owned(), owned(Variant::from(sandbox.landlock.as_str())));
        d.insert("sandbox_landlock_abi".to_owned(), owned(Variant::from(sandbox.landlock_abi)));
        d.insert("sandbox_seccomp".to_owned(), owned(Variant::from(sandbox.seccomp)));
        d.insert("sandbox_socket".to_owned(), owned(Variant::from(sandbox.socket.as_str())));
        d.insert("sandbox_probes".to_owned(), owned(Variant::from(probes)));
    }
    if let Some(e) = &r.last_error {
        d.insert("error".to_owned(), owned(Variant::from(e.as_str())));
    }
    d
}

/// A failure of the bus layer itself, as a named `Internal` error: a reply must always carry
/// an org.hearth.Hearth1.Error name, never zbus's own.
pub(super) fn internal(what: &str, e: &dyn std::fmt::Display) -> hearth_dbus::Error {
    hearth_dbus::Error::Internal(format!("{what}: {e}"))
}
