//! Batching must not change outputs: greedy tokens of several sequences decoded together in
//! one context — joining at different times, so prompt chunks share batches with other
//! sequences' decode steps, as in hearthd — equal each sequence's solo run.

use std::path::PathBuf;
use std::sync::Arc;

use hearth_ffi::{
    Backend, Batch, ChatMessage, Context, ContextParams, KvType, Model, ModelParams, Sampler, SamplerParams, Token,
};

fn model() -> Arc<Model> {
    let path = std::env::var_os("HEARTH_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    Arc::new(Model::load(Backend::init(), &path, &ModelParams::default()).expect("load model"))
}

fn prompt(m: &Model, text: &str) -> Vec<Token> {
    let p = m.apply_chat_template(&[ChatMessage { role: "user".into(), content: text.into() }], true).unwrap();
    m.tokenize(&p, true, true).unwrap()
}

fn params(flash_attn: Option<bool>) -> ContextParams {
    ContextParams {
        n_ctx: 4096,
        n_batch: 512,
        n_seq_max: 8,
        n_threads: 2,
        n_threads_batch: 2,
        flash_attn,
        kv_unified: false,
        embeddings: false,
        kv_type: KvType::default(),
    }
}

fn solo(m: &Arc<Model>, p: &[Token], steps: usize, fa: Option<bool>) -> Vec<Token> {
    let mut ctx = Context::new(Arc::clone(m), params(fa)).unwrap();
    let mut b = Batch::new(512, 1);
    for (i, &t) in p.iter().enumerate() {
        b.push(t, i as i32, &[0], i + 1 == p.len()).unwrap();
    }
    ctx.decode(&b).unwrap();
    let mut s = Sampler::new(m, SamplerParams::default());
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
}

/// Sequence `s` joins at step `s`: its whole prompt goes into the same batch as the running
/// sequences' decode tokens.
fn one_by_one(s: usize) -> usize {
    s
}

/// Sequences join in pairs: two prompts in one batch, beside the running ones' decode tokens.
fn in_pairs(s: usize) -> usize {
    s / 2
}

/// Every prompt in the first batch.
fn all_at_once(_: usize) -> usize {
    0
}

/// Decodes `prompts` in one context, sequence `s` joining at step `join(s)`.
fn staggered(
    m: &Arc<Model>,
    prompts: &[Vec<Token>],
    steps: usize,
    fa: Option<bool>,
    join: fn(usize) -> usize,
) -> Vec<Vec<Token>> {
    let mut ctx = Context::new(Arc::clone(m), params(fa)).unwrap();
    let mut b = Batch::new(512, 1);
    let n = prompts.len();
    let mut samplers: Vec<Sampler> = (0..n).map(|_| Sampler::new(m, SamplerParams::default())).collect();
    let mut outs: Vec<Vec<Token>> = vec![vec![]; n];
    let mut next: Vec<Option<Token>> = vec![None; n];
    let mut idx: Vec<Option<i32>> = vec![None; n];
    for step in 0.. {
        b.clear();
        for s in 0..n {
            idx[s] = None;
            if let Some(t) = next[s].take() {
                let pos = (prompts[s].len() + outs[s].len() - 1) as i32;
                idx[s] = Some(b.push(t, pos, &[s as i32], true).unwrap());
            } else if step == join(s) && outs[s].is_empty() {
                for (i, &t) in prompts[s].iter().enumerate() {
                    let j = b.push(t, i as i32, &[s as i32], i + 1 == prompts[s].len()).unwrap();
                    if i + 1 == prompts[s].len() {
                        idx[s] = Some(j);
                    }
                }
            }
        }
        if b.is_empty() {
            break;
        }
        ctx.decode(&b).unwrap();
        for s in 0..n {
            if let Some(i) = idx[s] {
                let t = samplers[s].sample(&mut ctx, i).unwrap();
                outs[s].push(t);
                if outs[s].len() < steps {
                    next[s] = Some(t);
                }
            }
        }
    }
    outs
}

#[test]
fn batched_greedy_equals_solo_greedy() {
    let m = model();
    let texts = [
        "What is the capital of France?",
        "Name three colors.",
        "Write a haiku about rain.",
        "Who wrote Hamlet?",
        "What is 2+2?",
        "Give me a tip for sleeping well.",
    ];
    let prompts: Vec<Vec<Token>> = texts.iter().map(|t| prompt(&m, t)).collect();
    let steps = 32;
    // Flash attention makes each sequence's attention independent of where its cells sit in
    // the unified KV cache; without it, batching changes results (seen: "What is 2+2?").
    let fa = Some(true);
    let solo: Vec<Vec<Token>> = prompts.iter().map(|p| solo(&m, p, steps, fa)).collect();
    // Several prompts in one batch, too: llama.cpp cuts such a batch into micro-batches of
    // equal length per sequence, so each prompt is prefilled in chunks that end where the
    // others' do.
    for join in [one_by_one, in_pairs, all_at_once] {
        let batched = staggered(&m, &prompts, steps, fa, join);
        for s in 0..prompts.len() {
            assert_eq!(batched[s], solo[s], "sequence {s} ({:?}) changed under batching", texts[s]);
        }
    }
}

fn argmax(row: &[f32]) -> Token {
    (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap() as Token
}

/// One token per step, as plain decoding runs: the greedy tokens, and the logits row each
/// was chosen from (row j follows the prompt and tokens 0..j).
fn solo_logits(m: &Arc<Model>, p: &[Token], steps: usize, kv: KvType) -> (Vec<Token>, Vec<Vec<f32>>) {
    let mut ctx = Context::new(Arc::clone(m), ContextParams { kv_type: kv, ..params(Some(true)) }).unwrap();
    let mut b = Batch::new(512, 1);
    for (i, &t) in p.iter().enumerate() {
        b.push(t, i as i32, &[0], i + 1 == p.len()).unwrap();
    }
    ctx.decode(&b).unwrap();
    let mut idx = b.len() as i32 - 1;
    let (mut tokens, mut rows) = (vec![], vec![]);
    for k in 0..steps {
        let row = ctx.logits(idx).unwrap().to_vec();
        let t = argmax(&row);
        tokens.push(t);
        rows.push(row);
        b.clear();
        idx = b.push(t, (p.len() + k) as i32, &[0], true).unwrap();
        ctx.decode(&b).unwrap();
    }
    (tokens, rows)
}

/// Speculative decoding verifies drafted tokens in one batch with the sequence's next token:
/// every verified position's logits must equal, bit for bit, those a one-token step computes
/// there, or greedy output would depend on what was drafted. The drafts here are the solo
/// run's own next tokens (accepted) and, every third step, a wrong one (rejected: its KV and
/// everything after it is removed), 0 to 5 per step, beside another sequence's decode steps.
#[test]
fn verified_drafts_equal_one_token_steps() {
    let m = model();
    verify_drafts(&m, &prompt(&m, "Write a haiku about rain."), 40, KvType::default());
}

/// Past 64 prompt tokens and 256 cells, where ggml's f16 attention switches kernels by
/// batch shape (tiled for long micro-batches, KV-split for a lone one-token step): with the
/// q8_0 KV cache, drafts still verify to the bit, and a prompt gives the same logits
/// however it is chunked (whole, or its last token alone after a reused prefix).
#[test]
fn past_the_first_256_cells_too() {
    let m = model();
    let text = "The lighthouse keeper climbed the stairs at dusk, polished the lens and watched the ships. ";
    let p = prompt(&m, &format!("Repeat this text:\n\n{}", text.repeat(15)));
    assert!(p.len() > 256, "{} prompt tokens", p.len());
    verify_drafts(&m, &p, 48, KvType::default());
    let whole = solo_logits(&m, &p, 1, KvType::default()).1.remove(0);
    let mut ctx = Context::new(Arc::clone(&m), params(Some(true))).unwrap();
    let mut b = Batch::new(512, 1);
    for cut in [p.len() - 1, p.len() - 70, 100] {
        ctx.remove_sequence(0);
        for chunk in [&p[..cut], &p[cut..]] {
            b.clear();
            let start = if chunk.len() == p.len() - cut { cut } else { 0 };
            for (i, &t) in chunk.iter().enumerate() {
                b.push(t, (start + i) as i32, &[0], start + i + 1 == p.len()).unwrap();
            }
            ctx.decode(&b).unwrap();
        }
        assert!(
            ctx.logits(b.len() as i32 - 1).unwrap() == whole.as_slice(),
            "prefilled in chunks of {cut} and {}",
            p.len() - cut
        );
    }
}

/// Decodes `p` speculatively, drafting the solo run's own next tokens and, every third
/// step, a wrong one, beside another sequence's decode steps, and checks every verified
/// row against the solo run's to the bit.
fn verify_drafts(m: &Arc<Model>, p: &[Token], steps: usize, kv: KvType) {
    let other = prompt(m, "Who wrote Hamlet?");
    let (tokens, rows) = solo_logits(m, p, steps, kv);
    let mut ctx = Context::new(Arc::clone(m), ContextParams { kv_type: kv, ..params(Some(true)) }).unwrap();
    let mut b = Batch::new(512, 1);
    for (seq, prompt) in [(0, p), (1, other.as_slice())] {
        b.clear();
        for (i, &t) in prompt.iter().enumerate() {
            b.push(t, i as i32, &[seq], i + 1 == prompt.len()).unwrap();
        }
        ctx.decode(&b).unwrap();
        if seq == 0 {
            assert!(ctx.logits(b.len() as i32 - 1).unwrap() == rows[0].as_slice(), "prefill logits differ");
        }
    }
    let mut other_next = argmax(ctx.logits(b.len() as i32 - 1).unwrap());
    let mut other_pos = other.len() as i32;
    // tokens[..n] are emitted; tokens[n - 1] is fed next, at position p.len() + n - 1.
    let (mut n, mut round, mut accepted_total, mut rejected) = (1, 0, 0, 0);
    while n < steps {
        let k = (round % 6).min(steps - n);
        let mut draft: Vec<Token> = tokens[n..n + k].to_vec();
        if round % 3 == 1 && k > 0 {
            draft[k - 1] = (draft[k - 1] + 1) % m.n_vocab();
        }
        b.clear();
        let pos = (p.len() + n - 1) as i32;
        let first = b.push(tokens[n - 1], pos, &[0], true).unwrap();
        for (i, &d) in draft.iter().enumerate() {
            b.push(d, pos + 1 + i as i32, &[0], true).unwrap();
        }
        let other_idx = b.push(other_next, other_pos, &[1], true).unwrap();
        ctx.decode(&b).unwrap();
        let mut accepted = 0;
        for i in 0..=k {
            let row = ctx.logits(first + i as i32).unwrap();
            assert!(row == rows[n + i].as_slice(), "round {round}: verified row {i} of {k} differs from its solo step");
            if i == k || n + i + 1 >= steps {
                break;
            }
            if draft[i] != argmax(row) {
                rejected += 1;
                break;
            }
            accepted += 1;
        }
        // Emitted: the accepted drafts and the token sampled after them.
        n += accepted + 1;
        accepted_total += accepted;
        assert!(ctx.truncate_sequence(0, (p.len() + n - 1) as i32), "rejected drafts' KV removed");
        other_next = argmax(ctx.logits(other_idx).unwrap());
        other_pos += 1;
        round += 1;
    }
    assert!(
        accepted_total > steps / 2 && rejected >= 3,
        "drafts were both accepted ({accepted_total}) and rejected ({rejected})"
    );
}

/// A small llama-architecture model with seeded random `quant` weights (Q4_0 or Q8_0, the
/// types phone models ship in), written by tests/tools/make-phone-model.py.
fn random_model(quant: &str) -> Arc<Model> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("random-tiny-{quant}.gguf"));
    let python = root.join(".venv/bin/python");
    assert!(python.exists(), "{} is missing: run scripts/setup-deps.sh", python.display());
    let status = std::process::Command::new(python)
        .arg(root.join("tests/tools/make-phone-model.py"))
        .arg(root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf"))
        .arg(&path)
        .args(["--size", "tiny", "--type", quant])
        .status()
        .expect("run make-phone-model.py");
    assert!(status.success(), "make-phone-model.py: {status}");
    Arc::new(Model::load(Backend::init(), &path, &ModelParams::default()).expect("load random model"))
}

/// ggml multiplies Q4_0 and Q8_0 weights by several rows on other kernels than by one
/// (llamafile's tinyBLAS, the repacked gemm): batched and verified steps must still equal
/// one-token steps for the weight types phone models use, not only for the default's Q4_1.
#[test]
fn phone_weight_types_too() {
    for quant in ["q4_0", "q8_0"] {
        let m = random_model(quant);
        verify_drafts(&m, &prompt(&m, "Write a haiku about rain."), 32, KvType::default());
        let prompts: Vec<Vec<Token>> =
            ["Name three colors.", "Who wrote Hamlet?", "What is 2+2?"].iter().map(|t| prompt(&m, t)).collect();
        for join in [one_by_one, all_at_once] {
            let batched = staggered(&m, &prompts, 16, Some(true), join);
            for (s, p) in prompts.iter().enumerate() {
                assert_eq!(batched[s], solo(&m, p, 16, Some(true)), "{quant}: sequence {s} changed under batching");
            }
        }
    }
}
