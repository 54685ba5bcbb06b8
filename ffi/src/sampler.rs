//! Token samplers: greedy, or top-k → top-p → temperature → seeded draw, optionally behind a
//! grammar (GBNF) that masks every token the grammar does not allow next.
//!
//! Sampling builds the candidate array itself and accepts a token only once it is known to be
//! allowed: llama.cpp's `llama_sampler_sample` accepts whatever the draw picked, and accepting
//! a token the grammar rejected throws through the C API (std::terminate), or for an
//! end-of-generation token hits `GGML_ABORT`; either way the daemon would die.

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
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplerParams {
    /// 0 (or less) means greedy: always the most likely token.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 disables.
    pub top_k: i32,
    /// Keep the smallest set of tokens whose probability adds up to `top_p`; 1.0 disables.
    pub top_p: f32,
    /// Seed of the random draw, so a seeded request is reproducible.
    pub seed: u32,
    /// Penalties on tokens already generated (not the prompt's), over the last
    /// `penalty_last_n` of them: a repeated token's logit is divided by `repeat_penalty`
    /// (multiplied when negative; 1.0 disables), and lowered by `frequency_penalty` per
    /// occurrence and by `presence_penalty` once (0.0 disables each), as OpenAI's are.
    pub repeat_penalty: f32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    pub penalty_last_n: i32,
}

impl Default for SamplerParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 40,
            top_p: 0.95,
            seed: 0,
            repeat_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            penalty_last_n: 256,
        }
    }
}

impl SamplerParams {
    /// Whether this is greedy decoding.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Whether any penalty is on.
    pub fn has_penalties(&self) -> bool {
        self.penalty_last_n > 0
            && (self.repeat_penalty != 1.0 || self.frequency_penalty != 0.0 || self.presence_penalty != 0.0)
    }
}

/// A token's log-probability under the model's own distribution at one step (the softmax of
/// its raw logits: before penalties, a grammar's mask or the temperature), and the `n`
/// likeliest tokens there, likeliest first (ties: lower id first, as greedy picks).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Logprobs {
    pub logprob: f32,
    pub top: Vec<(Token, f32)>,
}

/// [`Logprobs`] of `token` from one step's `logits` (one per vocabulary token); None when
/// `token` is not in the vocabulary or the logits hold no finite value.
pub fn logprobs(logits: &[f32], token: Token, n: usize) -> Option<Logprobs> {
    let max = logits.iter().copied().filter(|l| l.is_finite()).fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return None;
    }
    // log-sum-exp, in f64 so a large vocabulary's sum loses nothing.
    let sum: f64 = logits.iter().filter(|l| l.is_finite()).map(|&l| f64::from(l - max).exp()).sum();
    let lse = f64::from(max) + sum.ln();
    let lp = |l: f32| (f64::from(l) - lse) as f32;
    let chosen = *logits.get(usize::try_from(token).ok()?)?;
    // The n best, kept sorted: a vocabulary pass with a short insertion list.
    let better = |a: (Token, f32), b: (Token, f32)| a.1 > b.1 || (a.1 == b.1 && a.0 < b.0);
    let mut top: Vec<(Token, f32)> = Vec::with_capacity(n + 1);
    for (id, &l) in (0..).zip(logits) {
        if n == 0 || !l.is_finite() || (top.len() == n && !better((id, l), top[n - 1])) {
            continue;
        }
        let at = top.iter().position(|&t| better((id, l), t)).unwrap_or(top.len());
        top.insert(at, (id, l));
        top.truncate(n);
    }
    Some(Logprobs { logprob: lp(chosen), top: top.into_iter().map(|(id, l)| (id, lp(l))).collect() })
}

/// A llama.cpp sampler chain. Keeps per-generation state (RNG), so each sequence owns one.
pub struct Sampler {
    ptr: NonNull<sys::llama_sampler>,
    /// Whether the chain starts with a grammar, which can leave no token allowed.
    grammar: bool,
    /// Set once the grammar reached a dead end: an accept that threw leaves the grammar with
    /// no stacks, and applying it then hits a `GGML_ASSERT`, so it is never called again.
    dead: bool,
    /// The candidate array, reused across steps (one entry per vocabulary token).
    cur: Vec<sys::llama_token_data>,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the candidates: a vocabulary's worth of numbers.
        f.debug_struct("Sampler")
            .field("ptr", &self.ptr)
            .field("grammar", &self.grammar)
            .field("dead", &self.dead)
            .finish_non_exhaustive()
    }
}

// SAFETY: a sampler chain is plain heap state with no thread affinity; it is owned uniquely
// and only used through `&mut self`.
unsafe impl Send for Sampler {}

impl Sampler {
    /// Builds the chain for `params`, with `grammar` (GBNF, start rule `root`) first when given:
    /// the draw then only ever sees tokens the grammar allows, so the output parses.
    pub fn with_grammar(model: &Model, params: SamplerParams, grammar: Option<&str>) -> Result<Self> {
        let Some(grammar) = grammar else { return Ok(Self::new(model, params)) };
        let c_grammar = CString::new(grammar).map_err(|_| Error::InteriorNul { what: "the grammar" })?;
        // SAFETY: the vocab belongs to `model`, which outlives this call (the sampler keeps no
        // pointer to the grammar text; it copies the parsed rules). The llama-cpp-sys-2
        // wrapper catches any C++ exception (the parser catches its own; allocation failures
        // would escape it) and returns null, as it does when the grammar does not parse.
        let g = unsafe { sys::llama_rs_sampler_init_grammar(model.vocab_ptr(), c_grammar.as_ptr(), c"root".as_ptr()) };
        if g.is_null() {
            return Err(Error::Grammar);
        }
        let mut sampler = Self::empty();
        sampler.grammar = true;
        sampler.add(g);
        sampler.add_draw(model, params);
        Ok(sampler)
    }

    fn empty() -> Self {
        // SAFETY: returns a plain struct of defaults.
        let mut cp = unsafe { sys::llama_sampler_chain_default_params() };
        cp.no_perf = true;
        // SAFETY: creates a new, empty chain that we own.
        let chain = unsafe { sys::llama_sampler_chain_init(cp) };
        let ptr = NonNull::new(chain).expect("llama_sampler_chain_init returned null (out of memory)");
        Self { ptr, grammar: false, dead: false, cur: Vec::new() }
    }

    /// Whether the chain follows a grammar.
    pub fn has_grammar(&self) -> bool {
        self.grammar
    }

    /// Plain greedy decoding, which needs no model to build.
    pub fn greedy() -> Self {
        let sampler = Self::empty();
        // SAFETY: greedy init returns a new sampler whose ownership passes to the chain.
        sampler.add(unsafe { sys::llama_sampler_init_greedy() });
        sampler
    }

    /// Builds the chain for `params`.
    pub fn new(model: &Model, params: SamplerParams) -> Self {
        let sampler = Self::empty();
        sampler.add_draw(model, params);
        sampler
    }

    /// Penalties (after the grammar's mask: a masked token stays masked), then the draw.
    fn add_draw(&self, model: &Model, params: SamplerParams) {
        let sampler = self;
        if params.has_penalties() {
            // SAFETY: returns a new sampler whose ownership passes to the chain; it keeps
            // only its own copies of the numbers.
            sampler.add(unsafe {
                sys::llama_sampler_init_penalties(
                    model.n_vocab(),
                    params.penalty_last_n,
                    params.repeat_penalty,
                    params.frequency_penalty,
                    params.presence_penalty,
                )
            });
        }
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
    /// decode of `ctx`. With a grammar, fails with [`Error::GrammarDeadEnd`] (and accepts
    /// nothing) when the grammar allows no token the model can produce here.
    pub fn sample(&mut self, ctx: &mut Context, idx: i32) -> Result<Token> {
        if self.dead {
            return Err(Error::GrammarDeadEnd);
        }
        let row = ctx.logits(idx).ok_or(Error::NoLogits(idx))?;
        self.cur.clear();
        self.cur.extend(row.iter().zip(0..).map(|(&logit, id)| sys::llama_token_data { id, logit, p: 0.0 }));
        let mut cur_p = sys::llama_token_data_array {
            data: self.cur.as_mut_ptr(),
            size: self.cur.len(),
            selected: -1,
            sorted: false,
        };
        // SAFETY: the chain is valid and exclusively borrowed; `cur_p` points into `self.cur`,
        // which is not touched until the call returns. Applying masks and draws only: the
        // grammar rejects tokens by setting their logit to -inf and never throws here (its
        // stacks are non-empty, since every accept below is of an allowed token).
        unsafe { sys::llama_sampler_apply(self.ptr.as_ptr(), &mut cur_p) };
        // The samplers sort and shrink the array in place, never move it (llama-sampler.cpp).
        debug_assert!(std::ptr::eq(cur_p.data, self.cur.as_ptr()) && cur_p.size <= self.cur.len());
        let kept = &self.cur[..cur_p.size.min(self.cur.len())];
        let selected = usize::try_from(cur_p.selected).ok().and_then(|i| kept.get(i));
        let token = match selected {
            // A masked token keeps -inf even through temperature, so finite means allowed.
            Some(t) if !self.grammar || t.logit.is_finite() => t.id,
            // The draw can land on a masked token when nothing else is left, or (with a zero
            // random number) on a zero-probability one: take the best allowed token if any.
            _ => kept
                .iter()
                .filter(|t| t.logit.is_finite())
                .max_by(|a, b| a.logit.total_cmp(&b.logit))
                .map(|t| t.id)
                .ok_or_else(|| {
                self.dead = self.grammar;
                if self.grammar { Error::GrammarDeadEnd } else { Error::NoCandidate }
            })?,
        };
        // SAFETY: valid chain; `token` is one the grammar (if any) just allowed, so its accept
        // cannot find an empty stack set. The wrapper also catches any C++ exception.
        let status = unsafe { sys::llama_rs_sampler_accept(self.ptr.as_ptr(), token) };
        if status != sys::LLAMA_RS_STATUS_OK {
            self.dead = true;
            return Err(Error::GrammarDeadEnd);
        }
        Ok(token)
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        // SAFETY: the chain was created by llama_sampler_chain_init and is freed exactly once,
        // together with the samplers it owns.
        unsafe { sys::llama_sampler_free(self.ptr.as_ptr()) };
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::{Arc, OnceLock};

    use super::*;
    use crate::{Backend, Batch, ContextParams, ModelParams};

    fn model() -> Option<Arc<Model>> {
        static MODEL: OnceLock<Option<Arc<Model>>> = OnceLock::new();
        MODEL
            .get_or_init(|| {
                let path = std::env::var_os("HEARTH_TEST_MODEL").map(PathBuf::from).unwrap_or_else(|| {
                    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf")
                });
                if !path.exists() {
                    eprintln!("{} is missing (scripts/fetch-model.sh): skipping", path.display());
                    return None;
                }
                Some(Arc::new(Model::load(Backend::init(), &path, &ModelParams::default()).expect("load model")))
            })
            .clone()
    }

    /// Generates under `grammar` until the end, `max` tokens, or an error.
    fn generate(model: &Arc<Model>, grammar: &str, params: SamplerParams, max: usize) -> (String, Option<Error>) {
        let cp = ContextParams { n_ctx: 256, n_batch: 64, n_seq_max: 1, ..ContextParams::default() };
        let mut ctx = Context::new(Arc::clone(model), cp).expect("context");
        let prompt = model.tokenize("Answer yes or no: is the sky blue?", true, true).expect("tokenize");
        let mut batch = Batch::new(64, 1);
        let mut idx = 0;
        // One token per decode: ggml's AMX matmul (used for multi-token batches on CPUs
        // that have AMX) crashes on some machines, and this test is about sampling.
        for (i, &t) in prompt.iter().enumerate() {
            batch.clear();
            idx = batch.push(t, i as i32, &[0], i + 1 == prompt.len()).unwrap();
            ctx.decode(&batch).unwrap();
        }
        let mut sampler = Sampler::with_grammar(model, params, Some(grammar)).expect("grammar");
        let mut text = Vec::new();
        for pos in (prompt.len() as i32..).take(max) {
            let t = match sampler.sample(&mut ctx, idx) {
                Ok(t) => t,
                Err(e) => {
                    // A dead sampler stays dead, without touching the grammar again.
                    assert!(matches!(sampler.sample(&mut ctx, idx), Err(Error::GrammarDeadEnd)));
                    return (String::from_utf8_lossy(&text).into_owned(), Some(e));
                }
            };
            if model.is_eog(t) {
                break;
            }
            text.extend(model.token_to_piece(t, false));
            batch.clear();
            idx = batch.push(t, pos, &[0], true).unwrap();
            ctx.decode(&batch).unwrap();
        }
        (String::from_utf8_lossy(&text).into_owned(), None)
    }

    fn sampled() -> SamplerParams {
        SamplerParams { temperature: 0.8, top_k: 40, top_p: 0.95, seed: 7, ..SamplerParams::default() }
    }

    #[test]
    fn logprobs_are_a_normalised_log_softmax_with_the_best_first() {
        let logits = [1.0f32, 3.0, 3.0, -2.0, f32::NEG_INFINITY, 0.5];
        let l = logprobs(&logits, 1, 3).unwrap();
        let ids: Vec<Token> = l.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 2, 0], "ties go to the lower id, as greedy picks");
        assert_eq!(l.logprob, l.top[0].1);
        let total: f64 = (0..6).map(|i| f64::from(logprobs(&logits, i, 0).unwrap().logprob).exp()).sum();
        assert!((total - 1.0).abs() < 1e-5, "{total}");
        assert!(l.top.windows(2).all(|w| w[0].1 >= w[1].1));
        assert!(logprobs(&logits, 6, 1).is_none() && logprobs(&logits, -1, 1).is_none());
        assert!(logprobs(&[f32::NEG_INFINITY; 3], 0, 1).is_none());
        let masked = logprobs(&logits, 4, 0).unwrap();
        assert!(masked.logprob == f32::NEG_INFINITY && masked.top.is_empty());
    }

    #[test]
    fn a_grammar_that_admits_no_token_is_an_error_not_an_abort() {
        let Some(model) = model() else { return };
        // A token id beyond the vocabulary: the grammar parses but nothing ever matches.
        for params in [SamplerParams::default(), sampled()] {
            let (text, err) = generate(&model, "root ::= <[2000000]>", params, 4);
            assert!(matches!(err, Some(Error::GrammarDeadEnd)), "{err:?}");
            assert!(text.is_empty());
            // Dead after some text: "a" then only that token.
            let (text, err) = generate(&model, "root ::= \"a\" <[2000000]>", params, 8);
            assert!(matches!(err, Some(Error::GrammarDeadEnd)), "{err:?}");
            assert_eq!(text, "a");
        }
    }

    #[test]
    fn a_completed_grammar_ends_with_end_of_generation() {
        let Some(model) = model() else { return };
        for params in [SamplerParams::default(), sampled()] {
            let (text, err) = generate(&model, "root ::= \"yes\" | \"no\"", params, 16);
            assert!(err.is_none(), "{err:?}");
            assert!(text == "yes" || text == "no", "{text:?}");
        }
    }
}
