//! The hearthd ↔ hearth-engine protocol: typed messages, postcard-encoded, in frames of
//! tokio-util's length-delimited codec (a 4-byte big-endian length, then the message).
//!
//! The first frame is [`Start`], sent with the model's (and adapters') open file descriptors
//! attached (`SCM_RIGHTS`): the engine opens no file itself. The engine answers with
//! [`FromEngine::Progress`] while loading and then [`FromEngine::Ready`] or
//! [`FromEngine::Failed`]; after that both sides stream. hearthd trusts nothing the engine
//! says beyond what it asked for: frames are bounded, keys it does not know are ignored, and
//! a frame that does not decode ends the engine.

use std::path::PathBuf;

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

use super::EngineError;
use super::{
    Accepted, AdapterSet, Caller, CancelReason, EngineSettings, EngineStatus, Event, GenerateRequest, KvSnapshot,
    LoadedModelInfo, ThrottleState, TokenCount,
};

/// Bumped on every incompatible change; hearthd and hearth-engine of different versions
/// refuse each other (they are installed together, so this catches a stale binary).
pub const VERSION: u32 = 9;

/// The largest frame either side accepts: a parked session's KV (a whole context of one
/// sequence) travels in one frame.
pub const MAX_FRAME: usize = 512 << 20;

/// The codec both ends frame with.
pub fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder().max_frame_length(MAX_FRAME).new_codec()
}

/// Encodes `msg` as one frame's payload.
pub fn encode<T: Serialize>(msg: &T) -> Result<Bytes, postcard::Error> {
    postcard::to_stdvec(msg).map(Bytes::from)
}

/// Decodes one frame's payload.
pub fn decode<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(payload)
}

/// `msg` as a whole frame (length prefix included), for the synchronous start-up exchange.
pub fn frame<T: Serialize>(msg: &T) -> std::io::Result<BytesMut> {
    let payload = encode(msg).map_err(std::io::Error::other)?;
    let mut out = BytesMut::new();
    codec().encode(payload, &mut out)?;
    Ok(out)
}

/// Takes one whole frame's payload off the front of `buf`, if it holds one.
pub fn unframe(buf: &mut BytesMut) -> std::io::Result<Option<BytesMut>> {
    codec().decode(buf)
}

/// How to load the model (the file itself comes as a descriptor).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelLoad {
    pub gpu_layers: i32,
    pub devices: Vec<String>,
    /// The model's LoRA adapters in manifest order: (name, default scale). Their files come
    /// as descriptors after the model's, in this order.
    pub adapters: Vec<(String, f32)>,
    /// The sha256 of the model's vision projector, if it has one: its file comes as the last
    /// descriptor.
    pub mmproj: Option<String>,
}

/// The first message: what to load and how to run it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Start {
    pub version: u32,
    pub model: String,
    pub load: ModelLoad,
    pub settings: EngineSettings,
    pub throttle: ThrottleState,
    /// Paths the engine must not be able to open (the state directory, the key): it tries
    /// each once sandboxed, and reports what happened in [`SandboxReport`].
    pub probes: Vec<PathBuf>,
}

/// A session's KV, as the engine saves it: the tokens it covers, the adapters it was
/// computed under, and llama.cpp's sequence state. hearthd seals and stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionKv {
    pub tokens: Vec<hearth_ffi::Token>,
    pub adapters: AdapterSet,
    #[serde(with = "serde_bytes")]
    pub state: Vec<u8>,
}

/// hearthd → engine.
#[derive(Debug, Serialize, Deserialize)]
pub enum ToEngine {
    /// A generation. `kv`: the session's parked KV, if it has some (hearthd opened it).
    Submit {
        key: u64,
        request: Box<GenerateRequest>,
        caller: Caller,
        kv: Option<SessionKv>,
    },
    /// Cancels the generation or Embed call `key`.
    Cancel {
        key: u64,
        reason: CancelReason,
    },
    Embed {
        key: u64,
        caller: Caller,
        texts: Vec<String>,
    },
    /// Renders and tokenizes a request (images encoded) without running it.
    CountTokens {
        key: u64,
        caller: Caller,
        request: Box<GenerateRequest>,
    },
    /// A session closed: its resident KV goes.
    CloseSession(u64),
    /// A bus connection closed: its requests end.
    ConnectionClosed(String),
    /// The governors' demands changed.
    Throttle(ThrottleState),
    /// End every request as Cancelled and exit; with `park`, idle sessions' KV is handed
    /// over first (the model is unloaded or restarted), else dropped (hearthd is stopping).
    Shutdown {
        park: bool,
    },
}

/// What the engine's sandbox is, as the engine found it (hearthd shows it, tests check it
/// against /proc).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxReport {
    /// "full", "partial" or "none" (the kernel's landlock, as `restrict_self` reported it).
    pub landlock: String,
    /// The kernel's landlock ABI version (0: none).
    pub landlock_abi: u32,
    /// Whether the syscall allowlist is installed.
    pub seccomp: bool,
    /// What opening each of [`Start::probes`] (and "/") did, as an errno name ("EACCES"...),
    /// or "opened" when it must not have.
    pub probes: Vec<(PathBuf, String)>,
    /// What creating a socket did.
    pub socket: String,
    /// What the GPU it offloads to was allowed beyond the CPU allowlist ("none",
    /// "drm-ioctl", "exec-memory": sandbox.rs's `GpuAccess`).
    pub gpu_access: String,
}

/// engine → hearthd.
#[derive(Debug, Serialize, Deserialize)]
pub enum FromEngine {
    /// Loading: the fraction of the weights read.
    Progress(f32),
    /// Loaded and sandboxed: serving from now on.
    Ready { info: LoadedModelInfo, weights: u64, kv: u64, sandbox: SandboxReport },
    /// The load failed; the engine exits.
    Failed(String),
    /// The verdict on Submit `key`.
    Verdict { key: u64, result: Result<Accepted, EngineError> },
    /// An event of generation `key` (Finished is its last).
    Event { key: u64, event: Event },
    /// The vectors (or the error) of Embed `key`.
    Embedded { key: u64, result: Result<Vec<Vec<f32>>, EngineError> },
    /// The count (or the error) of CountTokens `key`.
    Counted { key: u64, result: Result<TokenCount, EngineError> },
    /// An idle session's KV left its slot: hearthd seals and stores it.
    Parked { session: u64, kv: SessionKv },
    /// The queue changed; with the KV gauges of the moment.
    Status { status: EngineStatus, kv: KvSnapshot },
    /// Sent every [`HEARTBEAT`] while the loop works (and once when it goes idle): when it
    /// last beat, whether it idles, the KV gauges, the uncapped decode rate.
    Heartbeat { beat_ago_ms: u64, idle: bool, kv: KvSnapshot, potential_mtps: u64 },
    /// Each app's compute time since the last report, µs, and background requests' of it
    /// ([`super::Compute`]): with every heartbeat that has some, and ahead of each
    /// request's end, so the energy ledger books (and judges budgets on) work within one
    /// of its intervals of its end.
    Compute(super::signals::Gathered),
}

/// How often a busy engine reports its heartbeat.
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_millis(250);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_oversized_frames_are_refused() {
        let kv = SessionKv { tokens: vec![1, 2, 3], adapters: AdapterSet::new(&[0.5]), state: vec![7; 100_000] };
        let mut buf = frame(&FromEngine::Parked { session: 9, kv: kv.clone() }).unwrap();
        // 100 kB of state costs 100 kB (plus a few bytes), not a varint per byte.
        assert!(buf.len() < 100_100, "{}", buf.len());
        let payload = unframe(&mut buf).unwrap().unwrap();
        let FromEngine::Parked { session, kv: back } = decode(&payload).unwrap() else { panic!() };
        assert_eq!((session, back), (9, kv));
        assert!(buf.is_empty());
        // A length prefix past MAX_FRAME is an error, not an allocation.
        let mut huge = BytesMut::from(&((MAX_FRAME as u32) + 1).to_be_bytes()[..]);
        assert!(unframe(&mut huge).is_err());
        // Garbage does not decode as a message.
        assert!(decode::<ToEngine>(&[0xff, 0xff, 0xff]).is_err());
    }
}
