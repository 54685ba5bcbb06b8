//! Batching must not change outputs: greedy tokens of several sequences decoded together in
//! one context equal each sequence's solo run.

use std::path::PathBuf;
use std::sync::Arc;

use hearth_ffi::{Backend, Batch, ChatMessage, Context, ContextParams, Model, ModelParams, Sampler, SamplerParams, Token};

fn model() -> Arc<Model> {
    let path = std::env::var_os("HEARTH_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    Arc::new(Model::load(Backend::init(), &path, ModelParams::default()).expect("load model"))
}

fn prompt(m: &Model, text: &str) -> Vec<Token> {
    let p = m.apply_chat_template(&[ChatMessage { role: "user".into(), content: text.into() }], true).unwrap();
    m.tokenize(&p, true, true).unwrap()
}

fn params() -> ContextParams {
    ContextParams { n_ctx: 4096, n_batch: 512, n_seq_max: 8, n_threads: 2, n_threads_batch: 2 }
}

#[test]
fn batched_greedy_equals_solo_greedy() {
    let m = model();
    let texts = ["Name three colors.", "What is 2+2?", "Write a haiku about rain.", "Who wrote Hamlet?"];
    let prompts: Vec<Vec<Token>> = texts.iter().map(|t| prompt(&m, t)).collect();
    let steps = 24;
    let solo: Vec<Vec<Token>> = prompts
        .iter()
        .map(|p| {
            let mut ctx = Context::new(Arc::clone(&m), params()).unwrap();
            let mut b = Batch::new(512, 1);
            for (i, &t) in p.iter().enumerate() {
                b.push(t, i as i32, &[0], i + 1 == p.len()).unwrap();
            }
            ctx.decode(&b).unwrap();
            let mut s = Sampler::new(SamplerParams::default());
            let mut idx = b.len() as i32 - 1;
            let mut out = vec![];
            for k in 0..steps {
                let t = s.sample(&mut ctx, idx).unwrap();
                out.push(t);
                b.clear();
                idx = b.push(t, (p.len() + k) as i32, &[0], true).unwrap();
                ctx.decode(&b).unwrap();
            }
            out
        })
        .collect();
    let mut ctx = Context::new(Arc::clone(&m), params()).unwrap();
    let mut b = Batch::new(512, 1);
    let mut idx = vec![0; prompts.len()];
    for (s, p) in prompts.iter().enumerate() {
        for (i, &t) in p.iter().enumerate() {
            let j = b.push(t, i as i32, &[s as i32], i + 1 == p.len()).unwrap();
            if i + 1 == p.len() {
                idx[s] = j;
            }
        }
    }
    ctx.decode(&b).unwrap();
    let mut samplers: Vec<Sampler> = prompts.iter().map(|_| Sampler::new(SamplerParams::default())).collect();
    let mut outs: Vec<Vec<Token>> = vec![vec![]; prompts.len()];
    for k in 0..steps {
        let toks: Vec<Token> = (0..prompts.len()).map(|s| samplers[s].sample(&mut ctx, idx[s]).unwrap()).collect();
        b.clear();
        for (s, &t) in toks.iter().enumerate() {
            outs[s].push(t);
            idx[s] = b.push(t, (prompts[s].len() + k) as i32, &[s as i32], true).unwrap();
        }
        ctx.decode(&b).unwrap();
    }
    for s in 0..prompts.len() {
        assert_eq!(outs[s], solo[s], "sequence {s} ({:?}) changed under batching", texts[s]);
    }
}
