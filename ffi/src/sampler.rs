//! Token samplers: greedy, or top-k → top-p → temperature → seeded draw, optionally behind a
//! grammar (GBNF) that masks every token the grammar does not allow next.

use std::ffi::{CStr, CString};
use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use crate::{Context, Error, Model, Result, Token};

/// Converts a JSON Schema into a GBNF grammar with llama.cpp's own converter
/// (`common/json-schema-to-grammar`): objects, arrays, enums, const, oneOf/anyOf, $ref,
/// string formats and patterns. Fails on malformed JSON or a construct it cannot express.
pub fn json_schema_to_grammar(schema: &str) -> Result<String> {
    let c_schema = CString::new(schema).map_err(|_| Error::InteriorNul { what: "the JSON schema" })?;
    let mut out: *mut std::ffi::c_char = std::ptr::null_mut();
    // SAFETY: `c_schema` is a valid NUL-terminated string for the call; `out` is a valid
    // place for the result pointer, which is either left null or set to a malloc'ed string.
    let status = unsafe { sys::llama_rs_json_schema_to_grammar(c_schema.as_ptr(), true, &mut out) };
    if status != sys::LLAMA_RS_STATUS_OK || out.is_null() {
        if !out.is_null() {
            // SAFETY: `out` came from the converter's allocator and is freed once.
            unsafe { sys::llama_rs_string_free(out) };
        }
        return Err(Error::SchemaConversion);
    }
    // SAFETY: `out` is a valid NUL-terminated string owned by us until freed below.
    let grammar = unsafe { CStr::from_ptr(out) }.to_string_lossy().into_owned();
    // SAFETY: as above; freed exactly once, after the copy.
    unsafe { sys::llama_rs_string_free(out) };
    Ok(grammar)
}

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
    /// Builds the chain for `params`, with `grammar` (GBNF, start rule `root`) first when given:
    /// the draw then only ever sees tokens the grammar allows, so the output parses.
    pub fn with_grammar(model: &Model, params: SamplerParams, grammar: Option<&str>) -> Result<Self> {
        let Some(grammar) = grammar else { return Ok(Self::new(params)) };
        let c_grammar = CString::new(grammar).map_err(|_| Error::InteriorNul { what: "the grammar" })?;
        // SAFETY: the vocab belongs to `model`, which outlives this call (the sampler keeps no
        // pointer to the grammar text; it copies the parsed rules). Returns null when the
        // grammar does not parse.
        let g = unsafe { sys::llama_sampler_init_grammar(model.vocab_ptr(), c_grammar.as_ptr(), c"root".as_ptr()) };
        if g.is_null() {
            return Err(Error::Grammar);
        }
        let sampler = Self::empty();
        sampler.add(g);
        sampler.add_draw(params);
        Ok(sampler)
    }

    fn empty() -> Self {
        // SAFETY: returns a plain struct of defaults.
        let mut cp = unsafe { sys::llama_sampler_chain_default_params() };
        cp.no_perf = true;
        // SAFETY: creates a new, empty chain that we own.
        let chain = unsafe { sys::llama_sampler_chain_init(cp) };
        let ptr = NonNull::new(chain).expect("llama_sampler_chain_init returned null (out of memory)");
        Self { ptr }
    }

    /// Builds the chain for `params`.
    pub fn new(params: SamplerParams) -> Self {
        let sampler = Self::empty();
        sampler.add_draw(params);
        sampler
    }

    fn add_draw(&self, params: SamplerParams) {
        let sampler = self;
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
