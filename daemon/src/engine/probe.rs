//! The compute devices, as an engine process finds them.
//!
//! hearthd never initialises a GPU backend itself: a Vulkan or CUDA driver opens the GPU's
//! device node and maps its memory into whichever process enumerates it. So at start-up
//! hearthd runs `hearth-engine --devices` (the same program, environment and limits as a
//! model's engine) and reads the list it prints; only engines ever hold the GPU.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hearth_ffi::DeviceInfo;

/// How long a driver may take to enumerate its devices.
const PROBE_LIMIT: Duration = Duration::from_secs(60);

/// Runs `program --devices` with `env` and returns the devices it lists.
pub fn devices(program: &Path, env: &[(String, String)]) -> Result<Vec<DeviceInfo>, String> {
    let what = || format!("{} --devices", program.display());
    let mut child = Command::new(program)
        .arg("--devices")
        .env_clear()
        .env("GGML_NO_BACKTRACE", "1")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", what()))?;
    // The list is a few hundred bytes: it fits the pipe, so the child never blocks on it.
    let deadline = Instant::now() + PROBE_LIMIT;
    let status = loop {
        match child.try_wait().map_err(|e| format!("cannot wait for {}: {e}", what()))? {
            Some(status) => break status,
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{} did not answer within {} s", what(), PROBE_LIMIT.as_secs()));
            }
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    if !status.success() {
        return Err(format!("{} failed ({status})", what()));
    }
    let mut out = Vec::new();
    child.stdout.take().map(|mut s| s.read_to_end(&mut out)).transpose().map_err(|e| e.to_string())?;
    let mut buf = bytes::BytesMut::from(&out[..]);
    let payload = super::protocol::unframe(&mut buf)
        .map_err(|e| format!("{} sent a bad frame: {e}", what()))?
        .ok_or_else(|| format!("{} listed nothing", what()))?;
    super::protocol::decode(&payload).map_err(|e| format!("{} sent a bad device list: {e}", what()))
}

/// The GPU an engine offloads `gpu_layers` to among `devices`: the first GPU listed (of
/// those `named`, when some are), None where `gpu_layers` is 0 or there is none. hearthd
/// counts its budget against this device and the engine hands llama.cpp exactly it.
pub fn offload_device<'d>(devices: &'d [DeviceInfo], gpu_layers: i32, named: &[String]) -> Option<&'d DeviceInfo> {
    use hearth_ffi::DeviceKind::{Gpu, IntegratedGpu};
    (gpu_layers != 0).then_some(())?;
    devices.iter().find(|d| matches!(d.kind, Gpu | IntegratedGpu) && (named.is_empty() || named.contains(&d.name)))
}
