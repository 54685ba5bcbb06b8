//! Sessions: the latency of turn N of a conversation in a session, against re-sending the
//! whole transcript to Complete, with another app's request between turns; and with a single
//! sequence slot, so the session's KV is parked and restored every turn.

use std::time::Instant;

use hearth_tests::{Bus, Daemon, Settings, chat_request};

use super::{median, stream_prompt};

/// A session's turn N: in the session, re-sent, and parked between turns.
pub struct Sessions {
    pub turns: usize,
    pub prompt_tokens: usize,
    pub session_ms: f64,
    pub resend_ms: f64,
    pub parked_ms: f64,
    pub park_ms: f64,
    pub restore_ms: f64,
    pub parked_bytes: u64,
}

/// Measures turn N `reps` times each way.
pub async fn measure(conn: &zbus::Connection, reps: usize, turns: usize) -> Sessions {
    let (mut resident, mut resend) = (vec![], vec![]);
    for _ in 0..reps {
        resident.push(conversation(conn, true, turns).await);
        resend.push(conversation(conn, false, turns).await);
    }
    // One slot: the session is parked by the request between turns and restored by its turn.
    let one_slot = Settings { max_sequences: Some(1), interactive_sequences: Some(0), ..Settings::default() };
    let bus1 = Bus::start();
    let parking = Daemon::start_configured(&bus1, &one_slot).await;
    let conn1 = bus1.connect().await;
    let mut parked = Vec::new();
    for _ in 0..reps {
        parked.push(conversation(&conn1, true, turns).await);
    }
    let (park_ms, restore_ms, parked_bytes) = park_times(&parking.log());
    drop(parking);
    let last = |v: &[Turns]| median(v.iter().map(|t| t.last_ms).collect());
    let (s_ms, r_ms, p_ms) = (last(&resident), last(&resend), last(&parked));
    let turn_n_tokens = resident[0].last_prompt_tokens;
    Sessions {
        turns,
        prompt_tokens: turn_n_tokens as usize,
        session_ms: s_ms,
        resend_ms: r_ms,
        parked_ms: p_ms,
        park_ms,
        restore_ms,
        parked_bytes,
    }
}

/// What the user says in each turn of the session conversation.
const TURNS: [&str; 8] = [
    "I am planning a trip to Lisbon in May with two friends. What should we pack?",
    "We like food markets and old neighbourhoods. Which ones should we visit?",
    "One of us is vegetarian. Suggest three dishes she can try there.",
    "How do we get from the airport to the city centre cheaply?",
    "Plan a relaxed first day for us, from breakfast to dinner.",
    "What is a good day trip from the city by train?",
    "Remind me what we said about the vegetarian dishes.",
    "Summarise our whole plan in three sentences.",
];

/// One conversation's turn N.
#[derive(Debug, Clone, Copy)]
struct Turns {
    /// Wall time of the last turn's Complete, ms.
    last_ms: f64,
    last_prompt_tokens: u32,
}

/// Runs a conversation of `turns` turns (32 tokens per answer, greedy), in a session or by
/// re-sending the transcript; before every turn another conversation's request runs.
async fn conversation(conn: &zbus::Connection, in_session: bool, turns: usize) -> Turns {
    let proxy = hearth_tests::hearth(conn).await;
    let session = if in_session {
        let path = proxy.open_session(std::collections::HashMap::new()).await.expect("OpenSession");
        Some(hearth_dbus::SessionProxy::builder(conn).path(path).build().await.expect("proxy"))
    } else {
        None
    };
    let mut transcript: Vec<(String, String)> = Vec::new();
    let mut last = Turns { last_ms: 0.0, last_prompt_tokens: 0 };
    for (i, user) in TURNS.iter().cycle().take(turns).enumerate() {
        proxy.complete(chat_request(&stream_prompt(i), 8)).await.expect("the other app's request");
        transcript.push(("user".into(), (*user).into()));
        let started = Instant::now();
        let result = match &session {
            Some(s) => s.complete(chat_request(user, 32)).await,
            None => {
                let messages: Vec<(&str, &str)> = transcript.iter().map(|(r, c)| (r.as_str(), c.as_str())).collect();
                let mut r = chat_request("", 32);
                r.insert(hearth_dbus::request_key::MESSAGES, hearth_dbus::messages_value(&messages));
                proxy.complete(r).await
            }
        }
        .expect("turn");
        last.last_ms = started.elapsed().as_secs_f64() * 1e3;
        last.last_prompt_tokens = result.prompt_tokens;
        let text = result.text.clone();
        transcript.push(("assistant".into(), text));
    }
    if let Some(s) = session {
        s.close().await.expect("Close");
    }
    last
}

/// Median park and restore times (ms) and sealed bytes, from hearthd's log lines.
fn park_times(log: &str) -> (f64, f64, u64) {
    let field = |line: &str, key: &str| -> Option<f64> {
        let rest = &line[line.find(&format!(" {key}="))? + key.len() + 2..];
        rest.split_whitespace().next()?.parse().ok()
    };
    let (mut park, mut restore, mut bytes) = (vec![], vec![], vec![]);
    for line in log.lines() {
        if line.contains("session KV parked") {
            park.extend(field(line, "ms"));
            bytes.extend(field(line, "bytes"));
        } else if line.contains("session KV restored") {
            restore.extend(field(line, "ms"));
        }
    }
    let med = |v: Vec<f64>| if v.is_empty() { 0.0 } else { median(v) };
    (med(park), med(restore), med(bytes) as u64)
}
