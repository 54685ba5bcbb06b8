//! Reference runs through hearth-ffi directly, prepared exactly as hearthd prepares a request:
//! what the daemon's output and speed are compared against.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use hearth_ffi::{
    Backend, Batch, ChatMessage, Context, ContextParams, Model, ModelParams, Sampler, SamplerParams, Token,
};

use crate::{BATCH, CONTEXT, model_path, threads};

/// The model, loaded once per test process for direct reference runs.
pub fn reference_model() -> Arc<Model> {
    static MODEL: OnceLock<Arc<Model>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            Arc::new(Model::load(Backend::init(), &model_path(), &ModelParams::default()).expect("load model"))
        })
        .clone()
}

/// Timings of a direct run, measured the same way the benchmark measures the daemon.
#[derive(Debug, Clone)]
pub struct DirectRun {
    pub prompt_tokens: usize,
    pub tokens: Vec<Token>,
    pub text: String,
    /// From the start of prefill to the first sampled token.
    pub prefill: Duration,
    /// From the first to the last generated token.
    pub decode: Duration,
}

/// Runs `messages` through hearth-ffi directly, exactly as hearthd prepares a request (chat
/// template, tokenization with special tokens, same context parameters, one sequence, prompt
/// in chunks of the batch size, then one token per decode), with greedy or seeded sampling.
pub fn direct_run(messages: &[(&str, &str)], sampling: SamplerParams, max_tokens: usize) -> DirectRun {
    direct_run_continuing(messages, "", sampling, max_tokens)
}

/// [`direct_run`] with the assistant's turn already begun with `prefix` (as hearthd continues
/// a cloud stream that broke off).
pub fn direct_run_continuing(
    messages: &[(&str, &str)],
    prefix: &str,
    sampling: SamplerParams,
    max_tokens: usize,
) -> DirectRun {
    let model = reference_model();
    let chat: Vec<ChatMessage> =
        messages.iter().map(|(r, c)| ChatMessage { role: (*r).to_owned(), content: (*c).to_owned() }).collect();
    let text = model.apply_chat_template(&chat, true).expect("template") + prefix;
    let prompt = model.tokenize(&text, true, true).expect("tokenize");
    let mut ctx = Context::new(
        Arc::clone(&model),
        // hearthd gives every sequence its own KV stream of CONTEXT cells: one stream here.
        ContextParams {
            n_ctx: CONTEXT,
            n_batch: BATCH,
            n_seq_max: 1,
            n_threads: threads(),
            n_threads_batch: threads(),
            flash_attn: Some(true),
            kv_unified: false,
            embeddings: false,
            kv_type: hearth_ffi::KvType::default(),
        },
    )
    .expect("context");
    let mut sampler = Sampler::new(&model, sampling);
    let mut batch = Batch::new(BATCH as usize, 1);
    let started = Instant::now();
    let mut idx = 0;
    for chunk_start in (0..prompt.len()).step_by(BATCH as usize) {
        batch.clear();
        let end = (chunk_start + BATCH as usize).min(prompt.len());
        for (k, &t) in prompt.iter().enumerate().take(end).skip(chunk_start) {
            idx = batch.push(t, k as i32, &[0], k + 1 == prompt.len()).expect("push");
        }
        ctx.decode(&batch).expect("prefill");
    }
    let mut tokens = Vec::new();
    let mut detok = hearth_ffi::Detokenizer::new();
    let mut out = String::new();
    let mut pos = prompt.len() as i32;
    let mut first = None;
    let mut last = started;
    loop {
        let t = sampler.sample(&mut ctx, idx).expect("sample");
        let now = Instant::now();
        first.get_or_insert(now);
        if model.is_eog(t) {
            break;
        }
        last = now;
        tokens.push(t);
        out.push_str(&detok.push(&model.token_to_piece(t, false)));
        if tokens.len() >= max_tokens {
            break;
        }
        batch.clear();
        idx = batch.push(t, pos, &[0], true).expect("push");
        pos += 1;
        ctx.decode(&batch).expect("decode");
    }
    let first = first.unwrap_or(started);
    DirectRun {
        prompt_tokens: prompt.len(),
        tokens,
        text: out,
        prefill: first - started,
        decode: last.saturating_duration_since(first),
    }
}

/// Greedy sampling, as hearthd does with temperature 0.
pub fn greedy() -> SamplerParams {
    SamplerParams { temperature: 0.0, ..SamplerParams::default() }
}

/// Six short chat prompts of different kinds, for tests that compare runs token by token.
pub const SIX_PROMPTS: [&str; 6] = [
    "What is the capital of France?",
    "Name three colors.",
    "Write a haiku about rain.",
    "Who wrote Hamlet?",
    "What is 2+2?",
    "Give me a tip for sleeping well.",
];
