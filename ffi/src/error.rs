//! The one error type of hearth-ffi.

use std::path::PathBuf;

/// Errors from the llama.cpp layer. Each message says what failed and with which input.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A path or string handed to C contained an interior NUL byte.
    #[error("{what} contains a NUL byte")]
    InteriorNul { what: &'static str },
    /// llama.cpp refused to load the model file.
    #[error("llama.cpp could not load model {path}")]
    ModelLoad { path: PathBuf },
    /// The model file's GGUF header is one llama.cpp must not be given (it would abort on
    /// it, or its sizes cannot be right); `reason` says why, without file content.
    #[error("{reason}")]
    ModelHeader { path: PathBuf, reason: String },
    /// llama.cpp refused to load a LoRA adapter for the model.
    #[error("llama.cpp could not load LoRA adapter {path}")]
    LoraLoad { path: PathBuf },
    /// llama.cpp's JSON Schema converter refused the schema.
    #[error("llama.cpp's JSON Schema converter could not turn the schema into a grammar")]
    SchemaConversion,
    /// The GBNF grammar does not parse (or has no `root` rule).
    #[error("the grammar does not parse as GBNF with a `root` rule")]
    Grammar,
    /// A context made for embeddings returned none for a sequence.
    #[error("llama.cpp returned no embedding")]
    NoEmbedding,
    /// llama.cpp could not apply the model's LoRA adapters to a context.
    #[error("llama.cpp could not apply the model's LoRA adapters")]
    LoraApply,
    /// llama.cpp refused a saved sequence state (other model or shape, or no room).
    #[error("llama.cpp could not restore a sequence state of {bytes} bytes")]
    StateRestore { bytes: usize },
    /// No ggml backend device has this name.
    #[error("no compute device named {name:?}")]
    NoSuchDevice { name: String },
    /// llama.cpp could not create an inference context (usually: out of memory).
    #[error("llama.cpp could not create a context (n_ctx={n_ctx}, n_seq_max={n_seq_max})")]
    ContextCreate { n_ctx: u32, n_seq_max: u32 },
    /// ggml returned no compute thread pool.
    #[error("ggml could not start a pool of {n_threads} compute threads")]
    ThreadPool { n_threads: i32 },
    /// Tokenization failed or the text is too long to tokenize.
    #[error("tokenization failed for a text of {len} bytes")]
    Tokenize { len: usize },
    /// The model has no chat template, or llama.cpp does not support it.
    #[error("the model's chat template is missing or unsupported")]
    ChatTemplate,
    /// A batch was filled beyond the capacity it was created with.
    #[error("batch is full (capacity {capacity} tokens)")]
    BatchFull { capacity: usize },
    /// More sequence ids were given for one token than the batch supports.
    #[error("a token was given {given} sequence ids, the batch supports {max}")]
    TooManySeqIds { given: usize, max: usize },
    /// The KV cache has no room for the batch.
    #[error("no KV cache slot for the batch (context full)")]
    NoKvSlot,
    /// Decoding was aborted through the context's abort flag.
    #[error("decode aborted")]
    Aborted,
    /// llama_decode failed with the given status.
    #[error("llama_decode failed with status {0}")]
    Decode(i32),
    /// The grammar allows no token the model can produce at this step (a token it needs is
    /// not in the vocabulary, or the model gives every allowed token zero probability).
    /// Nothing was accepted; the generation cannot go on.
    #[error("the grammar allows no next token here")]
    GrammarDeadEnd,
    /// The sampler chain selected no token (every candidate's logit was not finite).
    #[error("the sampler selected no token")]
    NoCandidate,
    /// libmtmd refused the projector file (not a vision projector, or one made for a model
    /// of another embedding width).
    #[error("libmtmd could not load projector {path} for this model")]
    ProjectorLoad { path: PathBuf },
    /// A projector libmtmd loads but Hearth cannot decode for (`reason` says why).
    #[error("projector {path}: {reason}")]
    ProjectorUnsupported { path: PathBuf, reason: String },
    /// An image the projector cannot take; `reason` says why, without its content.
    #[error("{reason}")]
    Image { reason: String },
    /// A sampler index referred to a batch position that produced no logits.
    #[error("batch position {0} has no logits")]
    NoLogits(i32),
}

/// Result alias for hearth-ffi.
pub type Result<T, E = Error> = std::result::Result<T, E>;
