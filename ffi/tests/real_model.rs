//! hearth-ffi against the real default model (fetched by scripts/fetch-model.sh).

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use hearth_ffi::{
    Backend, Batch, ChatMessage, Context, ContextParams, Detokenizer, Model, ModelParams, Sampler, SamplerParams, Token,
};

fn model() -> Arc<Model> {
    static MODEL: OnceLock<Arc<Model>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let path = std::env::var_os("HEARTH_TEST_MODEL").map(PathBuf::from).unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf")
            });
            assert!(path.exists(), "{} is missing: run scripts/fetch-model.sh", path.display());
            Arc::new(Model::load(Backend::init(), &path, &ModelParams::default()).expect("load model"))
        })
        .clone()
}

fn context(n_seq_max: u32) -> Context {
    Context::new(
        model(),
        ContextParams {
            n_ctx: 2048,
            n_batch: 512,
            n_seq_max,
            n_threads: 2,
            n_threads_batch: 2,
            flash_attn: Some(true),
            kv_unified: false,
            embeddings: false,
            kv_type: hearth_ffi::KvType::default(),
        },
    )
    .expect("context")
}

fn chat_prompt(text: &str) -> Vec<Token> {
    let m = model();
    let prompt =
        m.apply_chat_template(&[ChatMessage { role: "user".into(), content: text.into() }], true).expect("template");
    m.tokenize(&prompt, false, true).expect("tokenize")
}

/// Greedy/sampled generation of one sequence, the plain way.
fn generate(ctx: &mut Context, seq: i32, prompt: &[Token], params: SamplerParams, max: usize) -> Vec<Token> {
    generate_at(ctx, seq, prompt, 0, params, max)
}

/// Generation after `prompt` decoded at positions `start..` (the KV holds what came before).
fn generate_at(
    ctx: &mut Context,
    seq: i32,
    prompt: &[Token],
    start: usize,
    params: SamplerParams,
    max: usize,
) -> Vec<Token> {
    let mut batch = Batch::new(512, 1);
    for (i, &t) in prompt.iter().enumerate() {
        batch.push(t, (start + i) as i32, &[seq], i + 1 == prompt.len()).unwrap();
    }
    ctx.decode(&batch).unwrap();
    let mut sampler = Sampler::new(ctx.model(), params);
    let mut idx = batch.len() as i32 - 1;
    let mut out = Vec::new();
    let mut pos = (start + prompt.len()) as i32;
    while out.len() < max {
        let t = sampler.sample(ctx, idx).unwrap();
        if ctx.model().is_eog(t) {
            break;
        }
        out.push(t);
        batch.clear();
        idx = batch.push(t, pos, &[seq], true).unwrap();
        pos += 1;
        ctx.decode(&batch).unwrap();
    }
    out
}

#[test]
fn metadata_of_the_default_model() {
    let m = model();
    assert!(m.name().to_lowercase().contains("smollm2"), "name: {}", m.name());
    let n = m.n_params();
    assert!((100_000_000..200_000_000).contains(&n), "n_params {n}");
    assert_eq!(m.n_ctx_train(), 8192);
    assert!(m.size_bytes() > 50_000_000);
    assert!(m.chat_template().unwrap().contains("<|im_start|>"));
    assert_eq!(m.n_vocab(), 49152);
    assert!(!Backend::init().devices().is_empty());
    assert!(Backend::init().devices().iter().any(|d| d.kind == hearth_ffi::DeviceKind::Cpu));
}

#[test]
fn tokenizer_round_trips_and_parses_special_tokens() {
    let m = model();
    let text = "Hello, world! Grüße 🦀";
    let toks = m.tokenize(text, false, false).unwrap();
    assert!(!toks.is_empty());
    let mut d = Detokenizer::new();
    let mut out: String = toks.iter().map(|&t| d.push(&m.token_to_piece(t, false))).collect();
    out.push_str(&d.finish());
    assert_eq!(out, text);
    let special = m.tokenize("<|im_start|>", false, true).unwrap();
    assert_eq!(special.len(), 1, "control token parsed as one id");
    let plain = m.tokenize("<|im_start|>", false, false).unwrap();
    assert!(plain.len() > 1, "without parse_special it is plain text");
}

#[test]
fn chat_template_renders_chatml() {
    let m = model();
    let p = m
        .apply_chat_template(
            &[
                ChatMessage { role: "system".into(), content: "Be brief.".into() },
                ChatMessage { role: "user".into(), content: "Hi".into() },
            ],
            true,
        )
        .unwrap();
    assert_eq!(p, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
}

#[test]
fn greedy_generation_is_deterministic_and_stops_at_end_of_generation() {
    let prompt = chat_prompt("What is the capital of France?");
    let mut ctx = context(1);
    let a = generate(&mut ctx, 0, &prompt, SamplerParams::default(), 64);
    ctx.remove_sequence(0);
    assert_eq!(ctx.sequence_max_pos(0), -1, "KV of the sequence is freed");
    let b = generate(&mut ctx, 0, &prompt, SamplerParams::default(), 64);
    assert!(!a.is_empty());
    assert_eq!(a, b);
    let text: String =
        a.iter().map(|&t| String::from_utf8_lossy(&model().token_to_piece(t, false)).into_owned()).collect();
    assert!(text.contains("Paris"), "answer: {text}");
    assert!(a.len() < 64, "generation ended with an end-of-generation token");
}

#[test]
fn seeded_sampling_is_reproducible() {
    let prompt = chat_prompt("Tell me a story about a cat.");
    let params = |seed| SamplerParams { temperature: 1.0, top_k: 40, top_p: 0.95, seed, ..SamplerParams::default() };
    let mut ctx = context(1);
    let a = generate(&mut ctx, 0, &prompt, params(7), 24);
    ctx.remove_sequence(0);
    let b = generate(&mut ctx, 0, &prompt, params(7), 24);
    ctx.remove_sequence(0);
    let c = generate(&mut ctx, 0, &prompt, params(8), 24);
    assert_eq!(a, b);
    assert_ne!(a, c, "different seeds should give different samples");
}

#[test]
fn several_sequences_decode_in_one_batch() {
    let m = model();
    let p0 = chat_prompt("Name a color.");
    let p1 = chat_prompt("Name an animal.");
    let mut ctx = context(2);
    let mut batch = Batch::new(512, 2);
    for (i, &t) in p0.iter().enumerate() {
        batch.push(t, i as i32, &[0], i + 1 == p0.len()).unwrap();
    }
    let last0 = batch.len() as i32 - 1;
    for (i, &t) in p1.iter().enumerate() {
        batch.push(t, i as i32, &[1], i + 1 == p1.len()).unwrap();
    }
    let last1 = batch.len() as i32 - 1;
    ctx.decode(&batch).unwrap();
    let mut s0 = Sampler::new(ctx.model(), SamplerParams::default());
    let mut s1 = Sampler::new(ctx.model(), SamplerParams::default());
    let (mut t0, mut t1) = (s0.sample(&mut ctx, last0).unwrap(), s1.sample(&mut ctx, last1).unwrap());
    let (mut pos0, mut pos1) = (p0.len() as i32, p1.len() as i32);
    for _ in 0..8 {
        batch.clear();
        let i0 = batch.push(t0, pos0, &[0], true).unwrap();
        let i1 = batch.push(t1, pos1, &[1], true).unwrap();
        ctx.decode(&batch).unwrap();
        t0 = s0.sample(&mut ctx, i0).unwrap();
        t1 = s1.sample(&mut ctx, i1).unwrap();
        pos0 += 1;
        pos1 += 1;
    }
    assert_eq!(ctx.sequence_max_pos(0), pos0 - 1);
    assert_eq!(ctx.sequence_max_pos(1), pos1 - 1);
    // Dropping one sequence leaves the other intact.
    ctx.remove_sequence(0);
    assert_eq!(ctx.sequence_max_pos(0), -1);
    assert_eq!(ctx.sequence_max_pos(1), pos1 - 1);
    assert!(m.is_valid_token(t1));
    // Sampling from an index without logits is an error, not a crash.
    assert!(s0.sample(&mut ctx, 100).is_err());
}

#[test]
fn batch_bounds_are_enforced() {
    let mut b = Batch::new(2, 1);
    b.push(1, 0, &[0], false).unwrap();
    b.push(2, 1, &[0], false).unwrap();
    assert!(b.push(3, 2, &[0], false).is_err());
    b.clear();
    assert!(b.push(1, 0, &[0, 1], false).is_err(), "more seq ids than the batch supports");
}

#[test]
fn a_saved_sequence_restores_into_another_slot_and_continues_identically() {
    let mut ctx = context(2);
    let prompt = chat_prompt("Name three colors of the rainbow.");
    let fresh = generate(&mut ctx, 0, &prompt, SamplerParams::default(), 24);
    ctx.clear();
    // The prompt but its last token goes into slot 0, is saved, and slot 0 is emptied.
    let (head, last) = prompt.split_at(prompt.len() - 1);
    let mut batch = Batch::new(512, 1);
    for (i, &t) in head.iter().enumerate() {
        batch.push(t, i as i32, &[0], false).unwrap();
    }
    ctx.decode(&batch).unwrap();
    let state = ctx.save_sequence(0);
    assert!(state.len() > head.len() * 1000, "{} bytes for {} tokens", state.len(), head.len());
    ctx.remove_sequence(0);
    assert_eq!(ctx.sequence_max_pos(0), -1);
    ctx.restore_sequence(1, &state).expect("restore into slot 1");
    assert_eq!(ctx.sequence_max_pos(1), head.len() as i32 - 1);
    let resumed = generate_at(&mut ctx, 1, last, head.len(), SamplerParams::default(), 24);
    assert_eq!(resumed, fresh, "the restored KV continues exactly as the original");
    // Bytes that are not a sequence state are refused, and the slot stays usable.
    ctx.remove_sequence(1);
    assert!(ctx.restore_sequence(1, &state[..state.len() / 2]).is_err());
    assert!(ctx.restore_sequence(1, b"not a state").is_err());
}

#[test]
fn thread_counts_change_between_decodes_without_changing_the_output() {
    // A context made for one thread is given two (a new, larger pool while the backend still
    // holds the old one), then one and two again: every decode runs, and greedy output does
    // not depend on the thread count. (More threads than this machine's 2 cores would make
    // ggml's barriers wait out scheduler slices.)
    let prompt = chat_prompt("Name three colours.");
    let greedy = || SamplerParams { temperature: 0.0, ..Default::default() };
    let expected = generate(&mut context(1), 0, &prompt, greedy(), 12);
    let params = ContextParams { n_ctx: 2048, n_seq_max: 1, n_threads: 1, n_threads_batch: 1, ..Default::default() };
    let mut ctx = Context::new(model(), params).expect("context");
    for threads in [1, 2, 1, 2] {
        ctx.set_threads(threads, threads).expect("threads");
        ctx.remove_sequence(0);
        assert_eq!(generate(&mut ctx, 0, &prompt, greedy(), 12), expected, "at {threads} threads");
        assert_eq!(ctx.params().n_threads, threads);
    }
}
