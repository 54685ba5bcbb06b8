//! hearth-ffi: the safe face of llama.cpp/ggml for Hearth.
//!
//! This is the only crate in the workspace that contains `unsafe` code. It wraps the bindgen
//! bindings from `llama-cpp-sys-2` in RAII types whose safe methods cannot violate the C API's
//! contracts: every raw pointer is owned by exactly one Rust value, freed once, and never
//! outlives the object it points into. Nothing above this crate sees a raw pointer.
//!
//! Threading model: [`Model`] is immutable after load and may be shared (`Send + Sync`);
//! a [`Context`] (KV cache, decode state) is `Send` but not `Sync`: one thread owns it.

// The workspace denies unsafe code; this crate is the one place it is allowed, and clippy
// (`undocumented_unsafe_blocks`) makes every block carry a SAFETY argument.
#![allow(unsafe_code)]

mod backend;
mod batch;
mod context;
mod detokenizer;
mod error;
pub mod gguf;
mod heap;
mod model;
mod sampler;
mod threadpool;
mod vision;

pub use backend::{Backend, DeviceInfo, DeviceKind};
pub use batch::Batch;
pub use context::{AbortSwitch, Context, ContextParams, KvType};
pub use detokenizer::Detokenizer;
pub use error::{Error, Result};
pub use heap::{exit_now, landlock_abi, release_free_heap};
pub use model::{ChatMessage, KvGeometry, Model, ModelParams};
pub use sampler::{Logprobs, Sampler, SamplerParams, json_schema_to_grammar, logprobs};
pub use vision::{ImagePiece, Projector};

/// A token id of the model's vocabulary.
pub type Token = i32;
/// A sequence id inside a [`Context`]: each concurrent generation owns one.
pub type SeqId = i32;
/// A position of a token inside its sequence.
pub type Pos = i32;
