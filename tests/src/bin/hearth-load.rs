//! hearth-load: one app (one process, one connection) running N concurrent streamed
//! generations against hearthd. Prints one JSON line per finished generation, as it ends, with times in ms
//! since the Unix epoch so several processes' lines can be merged. Used by the scheduler
//! tests and the benchmark to play "another app".

#![forbid(unsafe_code)]

use std::time::{SystemTime, UNIX_EPOCH};

use clap::Parser;
use hearth_dbus::{Generation, StreamEvent, request_key};
use hearth_tests::chat_request;
use zbus::Variant;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long)]
    bus_address: String,
    #[arg(long, default_value_t = 1)]
    streams: usize,
    #[arg(long, default_value_t = 16)]
    max_tokens: u32,
    #[arg(long, default_value = "normal")]
    priority: String,
    #[arg(long, default_value = "Write a long story about a lighthouse keeper.")]
    prompt: String,
    /// Milliseconds between the starts of the streams (0: all at once).
    #[arg(long, default_value_t = 0)]
    stagger_ms: u64,
    /// Generations each stream runs one after another (a line for each).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
}

fn now_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    let conn = zbus::connection::Builder::address(args.bus_address.as_str()).build().await.expect("connect");
    let mut tasks = Vec::new();
    for i in 0..args.streams {
        if i > 0 && args.stagger_ms > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(args.stagger_ms)).await;
        }
        let (conn, prompt, priority) = (conn.clone(), args.prompt.clone(), args.priority.clone());
        let (rounds, max_tokens) = (args.rounds, args.max_tokens);
        tasks.push(tokio::spawn(async move {
            for round in 0..rounds {
                let mut request = chat_request(&prompt, max_tokens);
                request.insert(request_key::PRIORITY, Variant::from(priority.clone()));
                let token = if round == 0 { format!("load{i}") } else { format!("load{i}_{round}") };
                let line = stream(&conn, request, &token, i).await;
                // Each line as its generation ends (a run may be stopped at any time).
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            }
        }));
    }
    for t in tasks {
        t.await.expect("stream task");
    }
}

/// One streamed generation, as a JSON line.
async fn stream(
    conn: &zbus::Connection,
    request: std::collections::HashMap<&str, Variant<'_>>,
    token: &str,
    i: usize,
) -> serde_json::Value {
    let started = now_ms();
    let mut g = match Generation::start(conn, request, token).await {
        Ok(g) => g,
        Err(e) => return serde_json::json!({ "stream": i, "error": e.dbus_name() }),
    };
    let (mut first, mut tokens) = (None, 0u32);
    while let Some(ev) = g.next().await {
        match ev {
            Ok(StreamEvent::Token { .. }) => {
                first.get_or_insert_with(now_ms);
                tokens += 1;
            }
            Ok(StreamEvent::Migrated { .. }) => {}
            Ok(StreamEvent::Finished(r)) => {
                return serde_json::json!({
                    "stream": i, "tokens": tokens, "finish_reason": r.finish_reason,
                    "start_ms": started as u64, "first_ms": first.map(|f| f as u64), "end_ms": now_ms() as u64,
                    "prompt_tokens": r.prompt_tokens, "compute_us": r.compute_us, "energy_mj": r.energy_mj,
                    "energy_source": r.energy_source, "energy_budget": r.energy_budget,
                });
            }
            Err(e) => return serde_json::json!({ "stream": i, "error": e.to_string() }),
        }
    }
    serde_json::json!({ "stream": i, "error": "no Finished" })
}
