//! The dictionaries hearthd answers with: a generation's result (Complete, Request.Finished,
//! Session.Complete) and a ListModels entry.

use hearth_dbus::{Error as BusError, GenerationResult, ToolCall};

use super::driver::Finish;
use crate::engine::FinishReason;
use crate::error::Error;
use crate::manager::ModelReport;
use crate::privacy::Decision;
use crate::structured::Structure;

impl From<FinishReason> for hearth_dbus::FinishReason {
    fn from(r: FinishReason) -> Self {
        match r {
            FinishReason::Stop => Self::Stop,
            FinishReason::Length => Self::Length,
            FinishReason::Cancelled => Self::Cancelled,
            FinishReason::Error => Self::Error,
        }
    }
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
        finish_reason: hearth_dbus::FinishReason::from(o.reason).as_str().to_owned(),
        text: o.text.clone(),
        tokens: streamed,
        token_ids: o.token_ids.clone(),
        prompt_tokens: o.prompt_tokens,
        cached_tokens: o.cached_tokens,
        draft_tokens: o.draft_tokens,
        draft_accepted: o.draft_accepted,
        image_tokens: o.image_tokens,
        image_encode_us: o.image_encode.as_micros() as u64,
        model: o.model.clone(),
        prefill_us: o.prefill.as_micros() as u64,
        decode_us: o.decode.as_micros() as u64,
        route,
        route_reason,
        compute_us: o.compute.as_micros() as u64,
        energy_mj: finish.energy.map(|e| e.0),
        energy_source: finish.energy.map(|e| e.1.to_owned()),
        energy_budget: finish.over_budget.map(|o| if o { "over" } else { "ok" }.to_owned()),
        ..GenerationResult::default()
    };
    if !o.logprobs.is_empty() {
        let entry = |l: &crate::engine::TokenLogprob| {
            let top = l.top.iter().map(|(id, text, p)| (*id, text.clone(), f64::from(*p))).collect();
            (l.id, l.text.clone(), f64::from(l.logprob), top)
        };
        r.logprobs = Some(o.logprobs.iter().map(entry).collect());
    }
    if let Some(s) = structure.filter(|_| finish.error.is_none()) {
        r.schema_valid = s.schema_valid(&o.text);
        let calls = s.tool_calls(&o.text, o.tool_format);
        if !calls.is_empty() {
            r.tool_calls =
                Some(calls.into_iter().map(|c| ToolCall { id: c.id, name: c.name, arguments: c.arguments }).collect());
            r.finish_reason = hearth_dbus::FINISH_TOOL_CALLS.to_owned();
        }
    }
    if let Some(e) = &finish.error {
        let bus = BusError::from(e.clone());
        r.error_name = Some(bus.dbus_name().to_owned());
        r.error_message = Some(bus.message().to_owned());
    }
    r
}

/// One ListModels entry.
pub(super) fn model_info(r: &ModelReport, default: &str) -> hearth_dbus::ModelInfo {
    let m = &r.entry.manifest;
    let info = r.info.as_ref();
    let sandbox = r.engine.as_ref().map(|(_, s)| s);
    hearth_dbus::ModelInfo {
        name: m.name.clone(),
        file: r.entry.path.display().to_string(),
        sha256: m.sha256.clone(),
        loaded: info.is_some(),
        default: m.name == default,
        pinned: r.pinned,
        verified: r.verified,
        capabilities: m.capabilities.iter().map(|c| c.as_str().to_owned()).collect(),
        adapters: m.adapters.len() as u32,
        adapter_names: m.adapters.iter().map(|a| a.name()).collect(),
        file_size: r.entry.file_size.unwrap_or(0),
        context_length: info.map(|i| i.context_length).or(m.context_length),
        n_params: info.map(|i| i.n_params),
        size_bytes: info.map(|i| i.size_bytes),
        trained_context: info.map(|i| i.trained_context),
        description: info.map(|i| i.description.clone()),
        memory_bytes: info.map(|_| r.memory),
        kv_shrunk: info.map(|_| r.shrunk),
        gpu_device: info.and_then(|i| i.gpu_device.clone()),
        gpu_layers: info.map(|i| i.gpu_layers),
        layers: info.map(|i| i.layers),
        device_bytes: info.map(|_| r.device_bytes),
        tool_format: info.map(|i| i.tool_format.as_str().to_owned()),
        engine_pid: r.engine.as_ref().map(|(pid, _)| *pid),
        sandbox_landlock: sandbox.map(|s| s.landlock.clone()),
        sandbox_landlock_abi: sandbox.map(|s| s.landlock_abi),
        sandbox_seccomp: sandbox.map(|s| s.seccomp),
        sandbox_socket: sandbox.map(|s| s.socket.clone()),
        sandbox_gpu_access: sandbox.map(|s| s.gpu_access.clone()),
        sandbox_probes: sandbox
            .map(|s| s.probes.iter().map(|(p, what)| (p.display().to_string(), what.clone())).collect()),
        error: r.last_error.clone(),
    }
}

/// Availability's answer for model `name`: its report (None: not installed), its load in
/// progress, and whether the caller's policy allows it.
pub(super) fn availability(
    name: &str,
    report: Option<&ModelReport>,
    loading: Option<&crate::manager::LoadProgress>,
    allowed: bool,
) -> hearth_dbus::Availability {
    let mut a = hearth_dbus::Availability { model: name.to_owned(), ..Default::default() };
    let Some(r) = report else {
        a.state = "not-installed".into();
        a.reason = format!("no model {name:?} is installed (hearthctl models lists those that are)");
        return a;
    };
    a.capabilities = r.entry.manifest.capabilities.iter().map(|c| c.as_str().to_owned()).collect();
    a.context_length = r.info.as_ref().map(|i| i.context_length).or(r.entry.manifest.context_length);
    let (state, reason) = if !allowed {
        ("unavailable", "this app's policy does not allow this model".to_owned())
    } else if r.info.is_some() {
        ("ready", String::new())
    } else if let Some(p) = loading {
        a.load_phase = Some(p.phase.as_str().to_owned());
        a.load_fraction = Some(p.fraction);
        ("loading", format!("loading: {} {:.0}%", p.phase.as_str(), p.fraction * 100.0))
    } else if let Some(e) = &r.last_error {
        ("unavailable", format!("its last load failed: {e}"))
    } else {
        ("installed", "not loaded: it loads on first use".to_owned())
    };
    (a.state, a.reason) = (state.to_owned(), reason);
    a
}

/// A failure of the bus layer itself, as a named `Internal` error: a reply must always carry
/// an org.hearth.Hearth1.Error name, never zbus's own.
pub(super) fn internal(what: &str, e: &dyn std::fmt::Display) -> Error {
    Error::Internal(format!("{what}: {e}"))
}
