//! An inference context: the KV cache and decode state over one model.

use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use llama_cpp_sys_2 as sys;

use crate::threadpool::ThreadPool;
use crate::{Batch, Error, Model, Pos, Result, SeqId, Token};

/// How long the compute threads poll for the next graph before they sleep, on ggml's 0–100
/// scale (100 ≈ 13M rounds). Decode steps follow each other within microseconds of the
/// last one's end only while the engine has work, and each step ends with sampling and
/// the daemon's per-token work on the caller's thread. Measured at 2 threads on 2 cores
/// (direct decode of the default model, 200 tokens, 3 runs each; see the commit): 0 — sleep
/// at once, woken by a condition variable — decodes as fast as 50 or 100, and leaves the
/// cores to the rest of the phone between steps.
const POLL: u32 = 0;

/// How the KV cache stores keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvType {
    /// 8-bit blocks (34 bytes per 32 values; needs flash attention). ggml's CPU attention
    /// then runs the same kernel for every batch shape: with f16 it switches to a tiled
    /// kernel for micro-batches of 64 or more tokens of a sequence and to a KV-split one for
    /// a lone one-token step over 512 or more cells, which round differently, so a token's
    /// result would depend on how its prompt was chunked, whether its prefix was reused and
    /// what shared its step. Measured at 2 threads (llama-bench, default model): decode
    /// 195 vs 172 tok/s at an empty context and 108 vs 46 at 1024 tokens; prompt
    /// processing 292 vs 395 tok/s (512 tokens) and 133 vs 302 (512 more after 1024).
    #[default]
    Q8_0,
    /// 16-bit floats: faster prompt processing, results that depend on batch shapes.
    F16,
    /// 32-bit floats: twice f16's memory, and no rounding of keys, values or (on the CPU)
    /// of the queries they are multiplied with, so two backends' results differ only by
    /// their order of summation: for checking a GPU backend against the CPU.
    F32,
}

impl KvType {
    fn ggml(self) -> sys::ggml_type {
        match self {
            KvType::Q8_0 => sys::GGML_TYPE_Q8_0,
            KvType::F16 => sys::GGML_TYPE_F16,
            KvType::F32 => sys::GGML_TYPE_F32,
        }
    }

    /// Bytes of `values` keys or values.
    pub fn bytes(self, values: u64) -> u64 {
        match self {
            KvType::Q8_0 => values.div_ceil(32).saturating_mul(34),
            KvType::F16 => values.saturating_mul(2),
            KvType::F32 => values.saturating_mul(4),
        }
    }
}

/// How to create a context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextParams {
    /// Total KV cache size in tokens. Without `kv_unified` every sequence gets an equal
    /// stream of `n_ctx / n_seq_max` cells.
    pub n_ctx: u32,
    /// Most tokens one `decode` call may submit.
    pub n_batch: u32,
    /// Most sequences alive at once.
    pub n_seq_max: u32,
    /// Threads for single-token decode steps.
    pub n_threads: i32,
    /// Threads for prompt (batch) processing.
    pub n_threads_batch: i32,
    /// Flash attention: None lets llama.cpp decide per device. Hearth turns it on: with it,
    /// a sequence's results do not depend on what else shares the batch and the KV cache.
    pub flash_attn: Option<bool>,
    /// One KV buffer shared by all sequences. Off (per-sequence streams) keeps every
    /// sequence's cells contiguous and in position order, exactly as in a solo run, so
    /// batching cannot change results; on lets one long sequence use the whole cache.
    pub kv_unified: bool,
    /// A context for [`Context::embed`]: mean-pooled, per-sequence embeddings instead of logits.
    pub embeddings: bool,
    /// How the KV cache stores keys and values.
    pub kv_type: KvType,
}

impl Default for ContextParams {
    fn default() -> Self {
        Self {
            n_ctx: 4096,
            n_batch: 512,
            n_seq_max: 8,
            n_threads: 2,
            n_threads_batch: 2,
            flash_attn: Some(true),
            kv_unified: false,
            embeddings: false,
            kv_type: KvType::default(),
        }
    }
}

/// An inference context. Owned by one thread at a time (`Send`, not `Sync`).
#[derive(Debug)]
pub struct Context {
    ptr: NonNull<sys::llama_context>,
    params: ContextParams,
    // Boxed inside an Arc so the pointer given to llama.cpp's abort callback stays valid for
    // the context's whole life, whoever else holds the switch.
    abort: Arc<AbortSwitch>,
    model: Arc<Model>,
    // The compute threads every decode of this context runs on. Freed after llama_free
    // (fields drop after `Drop::drop`): ggml's CPU backend keeps the pointer.
    pool: ThreadPool,
    // Pools replaced by a larger one. The CPU backend still holds the last one it ran on
    // and pauses it when the next graph switches to the new pool (ggml-cpu.cpp,
    // ggml_backend_cpu_set_threadpool), so they too live until llama_free.
    retired: Vec<ThreadPool>,
}

// SAFETY: a llama_context may be used from any thread as long as only one thread uses it at
// a time; `Context` is not `Sync`, and every method that touches it takes `&mut self` or is a
// read-only query.
unsafe impl Send for Context {}

/// When a context's decodes stop early: once an abort is requested (from any thread), the
/// running decode and every later one return [`Error::Aborted`] until the request is
/// cleared, except while the switch is held (the decode then carries work that must not be
/// thrown away).
#[derive(Debug, Default)]
pub struct AbortSwitch {
    requested: AtomicBool,
    held: AtomicBool,
    forced: AtomicBool,
}

impl AbortSwitch {
    /// Asks the running (or next) decode to stop.
    pub fn request(&self) {
        self.requested.store(true, Ordering::Release);
    }

    /// Withdraws the request.
    pub fn clear(&self) {
        self.requested.store(false, Ordering::Release);
    }

    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// While held, requests are kept but no decode aborts.
    pub fn hold(&self, held: bool) {
        self.held.store(held, Ordering::Release);
    }

    /// While forced, every decode aborts, held or not (the engine must end all its work:
    /// the memory ceiling).
    pub fn force(&self, forced: bool) {
        self.forced.store(forced, Ordering::Release);
    }

    fn aborts(&self) -> bool {
        self.forced.load(Ordering::Relaxed)
            || (self.requested.load(Ordering::Relaxed) && !self.held.load(Ordering::Relaxed))
    }
}

unsafe extern "C" fn abort_requested(data: *mut c_void) -> bool {
    // SAFETY: `data` is the address of the AbortSwitch inside the context's Arc, which
    // outlives the llama_context (dropped after llama_free).
    let switch = unsafe { &*data.cast::<AbortSwitch>() };
    switch.aborts()
}

impl Context {
    /// Creates a context.
    pub fn new(model: Arc<Model>, params: ContextParams) -> Result<Self> {
        Self::with_abort_switch(model, params, Arc::new(AbortSwitch::default()))
    }

    /// Creates a context whose decodes abort by `abort`: one switch can stop the work of
    /// several contexts (the engine's generation and embedding contexts share the one an
    /// interactive request throws).
    pub fn with_abort_switch(model: Arc<Model>, params: ContextParams, abort: Arc<AbortSwitch>) -> Result<Self> {
        // SAFETY: returns a plain struct of defaults.
        let mut cp = unsafe { sys::llama_context_default_params() };
        cp.n_ctx = params.n_ctx;
        cp.n_batch = params.n_batch;
        cp.n_ubatch = params.n_batch;
        cp.n_seq_max = params.n_seq_max;
        cp.n_threads = params.n_threads;
        cp.n_threads_batch = params.n_threads_batch;
        cp.kv_unified = params.kv_unified;
        cp.type_k = params.kv_type.ggml();
        cp.type_v = params.kv_type.ggml();
        cp.flash_attn_type = match params.flash_attn {
            None => sys::LLAMA_FLASH_ATTN_TYPE_AUTO,
            Some(true) => sys::LLAMA_FLASH_ATTN_TYPE_ENABLED,
            Some(false) => sys::LLAMA_FLASH_ATTN_TYPE_DISABLED,
        };
        cp.no_perf = true;
        if params.embeddings {
            cp.embeddings = true;
            cp.pooling_type = sys::LLAMA_POOLING_TYPE_MEAN;
        }
        cp.abort_callback = Some(abort_requested);
        cp.abort_callback_data = Arc::as_ptr(&abort).cast_mut().cast::<c_void>();
        // SAFETY: the model is valid and kept alive by the Arc stored in the returned Context;
        // the abort data pointer stays valid for as long as the context (see `abort`).
        let raw = unsafe { sys::llama_init_from_model(model.as_ptr(), cp) };
        let ptr = NonNull::new(raw).ok_or(Error::ContextCreate { n_ctx: params.n_ctx, n_seq_max: params.n_seq_max })?;
        let pool = match ThreadPool::new(params.n_threads.max(params.n_threads_batch), POLL) {
            Ok(pool) => pool,
            Err(e) => {
                // SAFETY: `raw` was just created, is non-null and used by nothing else.
                unsafe { sys::llama_free(raw) };
                return Err(e);
            }
        };
        let mut ctx = Self { ptr, params, abort, model, pool, retired: Vec::new() };
        ctx.attach_pool();
        if ctx.model.lora_count() > 0 {
            let defaults = ctx.model.lora_default_scales();
            ctx.set_lora_scales(&defaults)?;
        }
        Ok(ctx)
    }

    /// Sets the scale of each of the model's adapters (in attachment order; 0 leaves one
    /// out) for the decodes that follow. The whole batch of a decode shares one adapter set,
    /// and KV computed under one set is not valid under another. A no-op when unchanged.
    pub fn set_lora_scales(&mut self, scales: &[f32]) -> Result<()> {
        let (mut adapters, _) = self.model.lora_table();
        if scales.len() != adapters.len() || scales.iter().any(|s| !s.is_finite()) {
            return Err(Error::LoraApply);
        }
        let mut scales = scales.to_vec();
        // SAFETY: the context is valid and exclusively borrowed; `adapters` and `scales` hold
        // `adapters.len()` entries each for the call (llama.cpp copies what it keeps), and
        // every adapter belongs to this context's model, which the context keeps alive.
        let rc = unsafe {
            sys::llama_set_adapters_lora(self.as_ptr(), adapters.as_mut_ptr(), adapters.len(), scales.as_mut_ptr())
        };
        if rc != 0 {
            return Err(Error::LoraApply);
        }
        Ok(())
    }

    /// The KV state of one sequence as bytes (llama.cpp's sequence state format), to be put
    /// back later with [`Context::restore_sequence`] in a context of the same model and shape.
    pub fn save_sequence(&mut self, seq: SeqId) -> Vec<u8> {
        // SAFETY: valid context, exclusively borrowed; a size query only.
        let size = unsafe { sys::llama_state_seq_get_size(self.as_ptr(), seq) };
        let mut buf = vec![0u8; size];
        // SAFETY: `buf` has `size` writable bytes, the size llama.cpp asked for just above,
        // with nothing run on the context in between.
        let written = unsafe { sys::llama_state_seq_get_data(self.as_ptr(), buf.as_mut_ptr(), buf.len(), seq) };
        buf.truncate(written);
        buf
    }

    /// Loads `state` (from [`Context::save_sequence`]) into the empty sequence `seq`.
    pub fn restore_sequence(&mut self, seq: SeqId, state: &[u8]) -> Result<()> {
        // SAFETY: valid context, exclusively borrowed; `state` is readable for its length.
        // llama.cpp validates the bytes (format, sizes, cell room) and returns 0 on failure.
        let read = unsafe { sys::llama_state_seq_set_data(self.as_ptr(), state.as_ptr(), state.len(), seq) };
        if read == 0 {
            return Err(Error::StateRestore { bytes: state.len() });
        }
        Ok(())
    }

    /// The model this context runs.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// The parameters it was created with (threads reflect the latest `set_threads`).
    pub fn params(&self) -> ContextParams {
        self.params
    }

    pub(crate) fn as_ptr(&mut self) -> *mut sys::llama_context {
        self.ptr.as_ptr()
    }

    /// The actual KV size in tokens (llama.cpp may round `n_ctx` up).
    pub fn n_ctx(&self) -> u32 {
        // SAFETY: plain query on a valid context.
        unsafe { sys::llama_n_ctx(self.ptr.as_ptr()) }
    }

    /// KV cells one sequence can hold (`n_ctx`, or its share of it without `kv_unified`).
    pub fn n_ctx_seq(&self) -> u32 {
        // SAFETY: plain query on a valid context.
        unsafe { sys::llama_n_ctx_seq(self.ptr.as_ptr()) }
    }

    /// Points the context's decodes at its thread pool (the same pool for single-token and
    /// batch steps: they never run at once).
    fn attach_pool(&mut self) {
        // SAFETY: valid context, exclusively borrowed; the pool, and every pool it replaced,
        // is freed only after llama_free (see `pool` and `retired`).
        unsafe { sys::llama_attach_threadpool(self.ptr.as_ptr(), self.pool.as_ptr(), std::ptr::null_mut()) };
    }

    /// Changes the thread counts for decode and batch processing. Fewer than the pool has
    /// leaves the rest of its threads asleep; more starts a larger pool once.
    pub fn set_threads(&mut self, n_threads: i32, n_threads_batch: i32) -> Result<()> {
        let wanted = n_threads.max(n_threads_batch);
        if wanted > self.pool.n_threads() {
            let old = std::mem::replace(&mut self.pool, ThreadPool::new(wanted, POLL)?);
            self.retired.push(old);
            self.attach_pool();
        }
        // SAFETY: valid context, exclusively borrowed.
        unsafe { sys::llama_set_n_threads(self.as_ptr(), n_threads, n_threads_batch) };
        self.params.n_threads = n_threads;
        self.params.n_threads_batch = n_threads_batch;
        Ok(())
    }

    /// The context's abort switch (see [`AbortSwitch`]). Safe to use from any thread.
    pub fn abort_switch(&self) -> Arc<AbortSwitch> {
        Arc::clone(&self.abort)
    }

    /// Decodes a batch: appends its tokens to their sequences' KV and computes logits for the
    /// entries that asked for them. On an error (an abort included) llama.cpp has removed the
    /// KV of the micro-batch it stopped in, but keeps that of the micro-batches decoded before
    /// it: a caller that retries cuts its sequences back ([`Context::truncate_sequence`]).
    pub fn decode(&mut self, batch: &Batch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        // SAFETY: the context is valid and exclusively borrowed; the batch's arrays are valid
        // for `batch.len()` entries for the duration of the call.
        let rc = unsafe { sys::llama_decode(self.as_ptr(), batch.raw()) };
        decode_status(rc)
    }

    /// The logits the last decode computed at batch index `idx` (one per vocabulary token),
    /// or None when that entry did not ask for them.
    pub fn logits(&self, idx: i32) -> Option<&[f32]> {
        // SAFETY: valid context; returns null when `idx` has no logits. Its only side effect
        // (waiting for the backend to finish) needs no exclusive borrow: Context is not Sync,
        // so no other thread uses it meanwhile.
        let row = unsafe { sys::llama_get_logits_ith(self.ptr.as_ptr(), idx) };
        if row.is_null() {
            return None;
        }
        let n_vocab = usize::try_from(self.model().n_vocab()).unwrap_or(0);
        // SAFETY: a non-null row holds n_vocab floats, valid until the next decode, which
        // needs `self` mutably and so cannot happen while the returned borrow lives.
        Some(unsafe { std::slice::from_raw_parts(row, n_vocab) })
    }

    /// Removes a whole sequence from the KV cache, freeing its cells at once.
    pub fn remove_sequence(&mut self, seq: SeqId) {
        // SAFETY: valid context; removing a whole sequence (p0 = p1 = -1) never fails.
        unsafe {
            let mem = sys::llama_get_memory(self.as_ptr());
            sys::llama_memory_seq_rm(mem, seq, -1, -1);
        }
    }

    /// Copies all of `src`'s KV into `dst` (which must be empty). Across KV streams llama.cpp
    /// copies the whole stream buffer at the start of the next decode.
    pub fn copy_sequence(&mut self, src: SeqId, dst: SeqId) {
        // SAFETY: valid context, exclusively borrowed; p0 = p1 = -1 selects the whole sequence,
        // the only range llama.cpp supports across streams.
        unsafe {
            let mem = sys::llama_get_memory(self.as_ptr());
            sys::llama_memory_seq_cp(mem, src, dst, -1, -1);
        }
    }

    /// Removes the tokens of `seq` at positions `>= from`, keeping the prefix. Returns false
    /// if the cache cannot drop part of a sequence (then nothing changed).
    pub fn truncate_sequence(&mut self, seq: SeqId, from: Pos) -> bool {
        // SAFETY: valid context, exclusively borrowed.
        unsafe {
            let mem = sys::llama_get_memory(self.as_ptr());
            sys::llama_memory_seq_rm(mem, seq, from, -1)
        }
    }

    /// The highest position stored for `seq`, or -1 when it holds nothing.
    pub fn sequence_max_pos(&mut self, seq: SeqId) -> Pos {
        // SAFETY: valid context, exclusively borrowed.
        unsafe {
            let mem = sys::llama_get_memory(self.as_ptr());
            sys::llama_memory_seq_pos_max(mem, seq)
        }
    }

    /// The embedding of `tokens`: the mean of the model's last hidden states over them, scaled
    /// to unit length. Needs a context made with `embeddings`; uses (and clears) sequence 0.
    pub fn embed(&mut self, tokens: &[Token]) -> Result<Vec<f32>> {
        if !self.params.embeddings {
            return Err(Error::NoEmbedding);
        }
        let mut batch = Batch::new(tokens.len().max(1), 1);
        for (i, &t) in tokens.iter().enumerate() {
            batch.push(t, i as Pos, &[0], true)?;
        }
        self.clear();
        self.decode(&batch)?;
        let n_embd = self.model.n_embd();
        // SAFETY: valid context; with mean pooling llama.cpp keeps one vector of `n_embd`
        // floats per sequence of the last decode, valid until the next decode, and returns
        // null for a sequence it has none for.
        let ptr = unsafe { sys::llama_get_embeddings_seq(self.as_ptr(), 0) };
        if ptr.is_null() {
            return Err(Error::NoEmbedding);
        }
        // SAFETY: checked non-null above; `n_embd` floats are readable (see above), copied
        // out before anything else touches the context.
        let mut v = unsafe { std::slice::from_raw_parts(ptr, n_embd) }.to_vec();
        self.clear();
        let norm = v.iter().map(|x| f64::from(*x) * f64::from(*x)).sum::<f64>().sqrt();
        if norm > 0.0 {
            v.iter_mut().for_each(|x| *x = (f64::from(*x) / norm) as f32);
        }
        Ok(v)
    }

    /// Empties the whole KV cache.
    pub fn clear(&mut self) {
        // SAFETY: valid context, exclusively borrowed.
        unsafe {
            let mem = sys::llama_get_memory(self.as_ptr());
            sys::llama_memory_clear(mem, true);
        }
    }
}

/// What llama_decode's status means.
pub(crate) fn decode_status(rc: i32) -> Result<()> {
    match rc {
        0 => Ok(()),
        1 => Err(Error::NoKvSlot),
        2 => Err(Error::Aborted),
        rc => Err(Error::Decode(rc)),
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from llama_init_from_model and is freed exactly once; the model
        // (Arc), the abort flag (Arc) and the thread pools are dropped only after this, as
        // fields drop after.
        unsafe { sys::llama_free(self.ptr.as_ptr()) };
    }
}

#[cfg(test)]
mod tests {
    use super::KvType;

    #[test]
    fn kv_bytes_follow_the_element_type() {
        // 64 values: two q8_0 blocks of 34 bytes, 2 bytes each in f16, 4 in f32.
        assert_eq!(KvType::Q8_0.bytes(64), 68);
        assert_eq!(KvType::F16.bytes(64), 128);
        assert_eq!(KvType::F32.bytes(64), 256);
        assert_eq!(KvType::F32.bytes(u64::MAX), u64::MAX, "saturates");
    }
}
