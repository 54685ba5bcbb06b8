//! A burst: `streams` requests arriving at once, as when several apps ask together. For
//! each, the time from the burst's start to its first token, and the aggregate tok/s from
//! the start to the last token; through hearthd (D-Bus, its own slots) and through
//! llama-server with as many slots (streamed over HTTP), alternating which goes first.
//! The same prompts, greedy, `tokens` each; every repetition asks in other names, so no
//! prompt is a prefix-cache hit.

use std::time::Instant;

use futures_util::future::join_all;
use hearth_dbus::Generation;
use hearth_dbus::request_key as key;
use hearth_tests::chat_request;
use zbus::Variant;

use super::contention::{Peer, llama_tool};
use super::{ASKERS, drain, median, stream_prompt};

/// One side's burst: each stream's first-token time (ms, sorted) and the aggregate tok/s.
#[derive(Debug, Clone)]
pub struct Side {
    pub first_ms: Vec<f64>,
    pub tok_s: f64,
}

#[derive(Debug, Clone)]
pub struct Burst {
    pub streams: usize,
    pub tokens: u32,
    pub hearth: Side,
    /// llama-server's, when one was built.
    pub server: Option<Side>,
}

fn prompt(i: usize, rep: usize) -> String {
    format!("{} (take {rep}) asks: {}", ASKERS[(i + rep) % ASKERS.len()], stream_prompt(i))
}

/// The medians over repetitions, rank by rank.
fn combine(runs: &[(Vec<f64>, f64)]) -> Side {
    let ranks = runs.first().map_or(0, |r| r.0.len());
    Side {
        first_ms: (0..ranks).map(|k| median(runs.iter().map(|r| r.0[k]).collect())).collect(),
        tok_s: median(runs.iter().map(|r| r.1).collect()),
    }
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

async fn hearth(conn: &zbus::Connection, streams: usize, tokens: u32, rep: usize) -> (Vec<f64>, f64) {
    let started = Instant::now();
    let runs = join_all((0..streams).map(|i| async move {
        let mut r = chat_request(&prompt(i, rep), tokens);
        // llama-server's slots decode plainly: so do these.
        r.insert(key::SPECULATIVE, Variant::from(false));
        let g = Generation::start(conn, r, &format!("burst{rep}x{i}")).await.expect("Generate");
        let (first, n) = drain(g, started).await;
        (first.expect("a token"), n)
    }))
    .await;
    let total: usize = runs.iter().map(|r| r.1).sum();
    (sorted(runs.iter().map(|r| r.0).collect()), total as f64 / started.elapsed().as_secs_f64())
}

async fn server(peer: &Peer, streams: usize, tokens: u32, rep: usize) -> (Vec<f64>, f64) {
    let started = Instant::now();
    let runs = join_all((0..streams).map(|i| peer.stream(prompt(i, rep), tokens, started))).await;
    let total: usize = runs.iter().map(|r| r.1).sum();
    (sorted(runs.iter().map(|r| r.0).collect()), total as f64 / started.elapsed().as_secs_f64())
}

/// Runs `reps` bursts of `streams` requests of `tokens` tokens on each side.
pub async fn measure(conn: &zbus::Connection, streams: usize, tokens: u32, reps: usize) -> Burst {
    let slots = streams.to_string();
    let peer = match llama_tool("llama-server", "HEARTH_LLAMA_SERVER") {
        Some(bin) => Peer::start_slots(&bin, streams, &[]).await,
        None => None,
    };
    if peer.is_none() {
        eprintln!("warning: llama-server with {slots} slots is not available; the burst's peer is left out");
    }
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for rep in 0..reps.max(1) {
        let ours_first = rep % 2 == 0;
        if ours_first {
            ours.push(hearth(conn, streams, tokens, rep).await);
        }
        if let Some(p) = &peer {
            theirs.push(server(p, streams, tokens, rep).await);
        }
        if !ours_first {
            ours.push(hearth(conn, streams, tokens, rep).await);
        }
    }
    Burst { streams, tokens, hearth: combine(&ours), server: peer.is_some().then(|| combine(&theirs)) }
}

pub fn json(b: &Burst) -> serde_json::Value {
    let side = |s: &Side| serde_json::json!({ "first_token_ms": s.first_ms, "aggregate_tok_s": s.tok_s });
    serde_json::json!({
        "streams": b.streams, "tokens": b.tokens, "dbus": side(&b.hearth), "llama_server": b.server.as_ref().map(side),
        "last_first_token_over_llama_server": b.server.as_ref().map(|s| b.hearth.first_ms.last().unwrap_or(&0.0) / s.first_ms.last().unwrap_or(&1.0)),
        "aggregate_over_llama_server": b.server.as_ref().map(|s| b.hearth.tok_s / s.tok_s),
    })
}

pub fn print(b: &Burst) {
    let line = |name: &str, s: &Side| {
        let firsts: Vec<_> = s.first_ms.iter().map(|ms| format!("{ms:.0}")).collect();
        println!("  {name:<13} first tokens at {} ms; aggregate {:.1} tok/s", firsts.join(", "), s.tok_s);
    };
    println!("burst of {} requests × {} tokens, same slots:", b.streams, b.tokens);
    line("D-Bus", &b.hearth);
    match &b.server {
        Some(s) => {
            line("llama-server", s);
            println!(
                "  last first token D-Bus/llama-server {:.2}, aggregate {:.3}",
                b.hearth.first_ms.last().unwrap_or(&0.0) / s.first_ms.last().unwrap_or(&1.0),
                b.hearth.tok_s / s.tok_s
            );
        }
        None => println!("  llama-server not built"),
    }
}
