//! Token samplers: greedy, or top-k → top-p → temperature → seeded draw.

use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use crate::{Context, Error, Result, Token};

/// Sampling settings of one generation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerParams {
    /// 0 (or less) means greedy: always the most likely token.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 disables.
    pub top_k: i32,
    /// Keep the smallest set of tokens whose probability adds up to `top_p`; 1.0 disables.
    pub top_p: f32,
    /// Seed of the random draw, so a seeded request is reproducible.
    pub seed: u32,
}

impl Default for SamplerParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 40, top_p: 0.95, seed: 0 }
    }
}

impl SamplerParams {
    /// Whether this is greedy decoding.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

/// A llama.cpp sampler chain. Keeps per-generation state (RNG), so each sequence owns one.
#[derive(Debug)]
pub struct Sampler {
    ptr: NonNull<sys::llama_sampler>,
}

// SAFETY: a sampler chain is plain heap state with no thread affinity; it is owned uniquely
// and only used through `&mut self`.
unsafe impl Send for Sampler {}

impl Sampler {
    /// Builds the chain for `params`.
    pub fn new(params: SamplerParams) -> Self {
        // SAFETY: returns a plain struct of defaults.
        let mut cp = unsafe { sys::llama_sampler_chain_default_params() };
        cp.no_perf = true;
        // SAFETY: creates a new, empty chain that we own.
        let chain = unsafe { sys::llama_sampler_chain_init(cp) };
        let ptr = NonNull::new(chain).expect("llama_sampler_chain_init returned null (out of memory)");
        let sampler = Self { ptr };
        if params.is_greedy() {
            // SAFETY: greedy init returns a new sampler whose ownership passes to the chain.
            sampler.add(unsafe { sys::llama_sampler_init_greedy() });
        } else {
            if params.top_k > 0 {
                // SAFETY: as above; ownership passes to the chain.
                sampler.add(unsafe { sys::llama_sampler_init_top_k(params.top_k) });
            }
            if params.top_p < 1.0 {
                // SAFETY: as above.
                sampler.add(unsafe { sys::llama_sampler_init_top_p(params.top_p, 1) });
            }
            // SAFETY: as above.
            sampler.add(unsafe { sys::llama_sampler_init_temp(params.temperature) });
            // SAFETY: as above.
            sampler.add(unsafe { sys::llama_sampler_init_dist(params.seed) });
        }
        sampler
    }

    fn add(&self, smpl: *mut sys::llama_sampler) {
        assert!(!smpl.is_null(), "llama.cpp returned a null sampler (out of memory)");
        // SAFETY: `ptr` is a valid chain; the chain takes ownership of `smpl` and frees it with
        // the chain.
        unsafe { sys::llama_sampler_chain_add(self.ptr.as_ptr(), smpl) };
    }

    /// Samples (and accepts) the next token from the logits at batch index `idx` of the last
    /// decode of `ctx`.
    pub fn sample(&mut self, ctx: &mut Context, idx: i32) -> Result<Token> {
        // SAFETY: valid context; returns null (without side effects) when `idx` has no logits.
        let logits = unsafe { sys::llama_get_logits_ith(ctx.as_ptr(), idx) };
        if logits.is_null() {
            return Err(Error::NoLogits(idx));
        }
        // SAFETY: the chain and the context are valid and exclusively borrowed, and `idx` was
        // just checked to have logits.
        Ok(unsafe { sys::llama_sampler_sample(self.ptr.as_ptr(), ctx.as_ptr(), idx) })
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        // SAFETY: the chain was created by llama_sampler_chain_init and is freed exactly once,
        // together with the samplers it owns.
        unsafe { sys::llama_sampler_free(self.ptr.as_ptr()) };
    }
}
