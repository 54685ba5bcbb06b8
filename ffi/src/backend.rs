//! Process-wide llama.cpp/ggml initialisation and device enumeration.

use std::ffi::{CStr, c_char, c_void};
use std::sync::OnceLock;

use llama_cpp_sys_2 as sys;

static INIT: OnceLock<()> = OnceLock::new();

/// Proof that the llama.cpp backend is initialised. Every loader takes one, so nothing can
/// touch llama.cpp before `llama_backend_init` ran. Cheap to copy; initialisation happens once
/// per process and is never undone (ggml keeps global device registries for the process).
#[derive(Debug, Clone, Copy)]
pub struct Backend {
    _private: (),
}

/// What kind of compute device a ggml backend device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DeviceKind {
    Cpu,
    Gpu,
    IntegratedGpu,
    Accelerator,
    Other,
}

impl DeviceKind {
    /// A stable lower-case name, used on D-Bus.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Gpu => "gpu",
            Self::IntegratedGpu => "igpu",
            Self::Accelerator => "accel",
            Self::Other => "other",
        }
    }
}

/// One ggml backend device (CPU, GPU, NPU...).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceInfo {
    pub name: String,
    pub description: String,
    pub kind: DeviceKind,
    pub memory_free: u64,
    pub memory_total: u64,
}

/// Longest llama.cpp log line passed on.
const MAX_LOG_LINE: usize = 240;

/// What of a llama.cpp log line may reach the daemon's log, which never holds an app's
/// content: llama.cpp quotes the grammar it refuses (and the rule names in it), and may
/// quote a schema's patterns, so such lines are replaced by a note; every line is cut to
/// its first line and [`MAX_LOG_LINE`] bytes. None for a blank line.
fn loggable(text: &str) -> Option<std::borrow::Cow<'_, str>> {
    let first = text.trim_end().lines().next()?.trim_end();
    if first.is_empty() {
        return None;
    }
    let lower = first.to_ascii_lowercase();
    if ["grammar", "rule", "schema", "pattern", "regex", "token text", "prompt"].iter().any(|w| lower.contains(w)) {
        return Some("a message about an app's input (grammar, schema or prompt) was withheld: it may quote it".into());
    }
    if first.len() <= MAX_LOG_LINE {
        return Some(first.into());
    }
    let mut end = MAX_LOG_LINE;
    while !first.is_char_boundary(end) {
        end -= 1;
    }
    Some(format!("{}...", &first[..end]).into())
}

/// Routes llama.cpp/ggml log lines into `tracing` (target `llama`), so they end up in the
/// daemon's log instead of on a raw stderr, filtered by [`loggable`].
unsafe extern "C" fn log_to_tracing(level: sys::ggml_log_level, text: *const c_char, _: *mut c_void) {
    if text.is_null() {
        return;
    }
    // SAFETY: ggml passes a valid NUL-terminated string that lives for the duration of the call.
    let text = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    let Some(text) = loggable(&text) else { return };
    match level {
        sys::GGML_LOG_LEVEL_ERROR => tracing::error!(target: "llama", "{text}"),
        sys::GGML_LOG_LEVEL_WARN => tracing::warn!(target: "llama", "{text}"),
        sys::GGML_LOG_LEVEL_INFO => tracing::debug!(target: "llama", "{text}"),
        _ => tracing::trace!(target: "llama", "{text}"),
    }
}

impl Backend {
    /// Initialises llama.cpp once for this process and returns the token.
    pub fn init() -> Self {
        INIT.get_or_init(|| {
            // SAFETY: the callback is a `'static` function that tolerates any level and a null
            // text; no user data pointer is registered.
            unsafe { sys::llama_log_set(Some(log_to_tracing), std::ptr::null_mut()) };
            // SAFETY: as above, for libmtmd's own logger (projectors and images).
            unsafe { sys::mtmd_log_set(Some(log_to_tracing), std::ptr::null_mut()) };
            // SAFETY: guarded by the OnceLock, so this runs exactly once per process, before any
            // other llama.cpp call made through this crate.
            unsafe { sys::llama_backend_init() };
        });
        Self { _private: () }
    }

    /// The ggml backend devices present in this process, in registry order.
    pub fn devices(self) -> Vec<DeviceInfo> {
        // SAFETY: the backend is initialised (self proves it); the count is a plain query.
        let count = unsafe { sys::ggml_backend_dev_count() };
        let mut out = Vec::with_capacity(count);
        for i in 0..count {
            // SAFETY: `i < count`, so ggml returns a valid device owned by its registry, which
            // lives for the rest of the process.
            let dev = unsafe { sys::ggml_backend_dev_get(i) };
            if dev.is_null() {
                continue;
            }
            // SAFETY: `dev` is a valid device; the returned strings are owned by it (static).
            let name = unsafe { cstr_or_empty(sys::ggml_backend_dev_name(dev)) };
            // SAFETY: as above.
            let description = unsafe { cstr_or_empty(sys::ggml_backend_dev_description(dev)) };
            // SAFETY: `dev` is valid.
            let kind = match unsafe { sys::ggml_backend_dev_type(dev) } {
                sys::GGML_BACKEND_DEVICE_TYPE_CPU => DeviceKind::Cpu,
                sys::GGML_BACKEND_DEVICE_TYPE_GPU => DeviceKind::Gpu,
                sys::GGML_BACKEND_DEVICE_TYPE_IGPU => DeviceKind::IntegratedGpu,
                sys::GGML_BACKEND_DEVICE_TYPE_ACCEL => DeviceKind::Accelerator,
                _ => DeviceKind::Other,
            };
            let (mut free, mut total) = (0usize, 0usize);
            // SAFETY: `dev` is valid and both out-pointers point to live locals.
            unsafe { sys::ggml_backend_dev_memory(dev, &mut free, &mut total) };
            out.push(DeviceInfo { name, description, kind, memory_free: free as u64, memory_total: total as u64 });
        }
        out
    }

    /// llama.cpp's one-line summary of the CPU features it was built with.
    pub fn system_info(self) -> String {
        // SAFETY: returns a pointer to a static buffer inside llama.cpp, valid until the next call;
        // we copy it out at once.
        unsafe { cstr_or_empty(sys::llama_print_system_info()) }
    }

    /// The llama.cpp build this binary links.
    pub fn llama_version(self) -> String {
        // SAFETY: returns a pointer to a static string.
        unsafe { cstr_or_empty(sys::llama_version()) }
    }
}

/// Copies a C string into an owned `String`, mapping null to "".
///
/// # Safety
/// `p` must be null or point to a valid NUL-terminated string for the duration of the call.
pub(crate) unsafe fn cstr_or_empty(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: non-null and valid per the function's contract.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::loggable;

    #[test]
    fn llama_log_lines_never_quote_app_input() {
        let canary = "canary-1234";
        let lines = [
            format!("parse: error parsing grammar: expecting ')' at {canary} ::= x\n\n{canary}"),
            format!("Undefined rule identifier '{canary}'"),
            format!("WARNING: unsupported pattern {canary}"),
        ];
        for line in &lines {
            assert!(!loggable(line).unwrap().contains(canary), "{line}");
        }
        assert_eq!(
            loggable("llama_model_loader: loaded meta data\nmore").unwrap(),
            "llama_model_loader: loaded meta data"
        );
        assert!(loggable(&"x".repeat(10_000)).unwrap().len() <= 243);
        assert!(loggable("\n").is_none());
    }
}
