//! An OpenAI-compatible chat-completions stand-in on loopback, with fault injection, that
//! records every request (body and Authorization header) it receives.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

/// What the stand-in does with the next requests.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Streams every word, then finish_reason "stop" and [DONE].
    None,
    /// Streams this many words, then breaks the connection.
    DropAfter(usize),
    /// Answers with this HTTP status.
    Status(u16),
    /// Waits before answering at all.
    DelayFirstByte(Duration),
    /// Sends an event that is not JSON.
    Malformed,
    /// Waits between words.
    SlowDrip(Duration),
}

/// One recorded request.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub body: String,
    pub authorization: Option<String>,
}

#[derive(Debug)]
struct State {
    fault: Fault,
    words: Vec<String>,
    requests: Vec<Recorded>,
}

/// The running stand-in.
#[derive(Debug)]
pub struct CloudStandIn {
    pub addr: std::net::SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

/// The words the stand-in streams, one per chunk.
pub const WORDS: &[&str] =
    &["Paris", " is", " the", " capital", " of", " France", ",", " on", " the", " Seine", " river", "."];

impl CloudStandIn {
    pub async fn start() -> Self {
        let state = Arc::new(Mutex::new(State {
            fault: Fault::None,
            words: WORDS.iter().map(|w| (*w).to_owned()).collect(),
            requests: Vec::new(),
        }));
        let shared = Arc::clone(&state);
        let app = axum::Router::new().route(
            "/v1/chat/completions",
            axum::routing::post(move |headers: HeaderMap, body: String| {
                completions(Arc::clone(&shared), headers, body)
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, state, task }
    }

    /// The `cloud.endpoint` for hearthd.
    pub fn endpoint(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn set_fault(&self, fault: Fault) {
        self.state.lock().unwrap().fault = fault;
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }
}

impl Drop for CloudStandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn event(data: &str) -> Result<Bytes, std::io::Error> {
    Ok(Bytes::from(format!("data: {data}\n\n")))
}

async fn completions(state: Arc<Mutex<State>>, headers: HeaderMap, body: String) -> Response {
    let authorization = headers.get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (fault, words) = {
        let mut s = state.lock().unwrap();
        s.requests.push(Recorded { body, authorization });
        (s.fault.clone(), s.words.clone())
    };
    match fault {
        Fault::Status(code) => {
            return (StatusCode::from_u16(code).unwrap(), "{\"error\":{\"message\":\"injected\"}}").into_response();
        }
        Fault::DelayFirstByte(d) => tokio::time::sleep(d).await,
        _ => {}
    }
    let drip = match fault {
        Fault::SlowDrip(d) => d,
        _ => Duration::from_millis(2),
    };
    let stop_after = match fault {
        Fault::DropAfter(k) => Some(k),
        _ => None,
    };
    let malformed = fault == Fault::Malformed;
    // (next word index, finished)
    let stream = futures_util::stream::unfold((0usize, false), move |(i, done)| {
        let words = words.clone();
        async move {
            if done {
                return None;
            }
            tokio::time::sleep(drip).await;
            if malformed {
                return Some((event("{not json"), (0, true)));
            }
            if stop_after == Some(i) {
                return Some((Err(std::io::Error::other("injected drop")), (i, true)));
            }
            if i < words.len() {
                let chunk = serde_json::json!({"model": "standin-1", "choices": [{"delta": {"content": words[i]}}]});
                return Some((event(&chunk.to_string()), (i + 1, false)));
            }
            let end = format!(
                "data: {}\n\ndata: [DONE]\n\n",
                serde_json::json!({"choices": [{"delta": {}, "finish_reason": "stop"}]})
            );
            Some((Ok(Bytes::from(end)), (i, true)))
        }
    });
    Response::builder().header("content-type", "text/event-stream").body(Body::from_stream(stream)).unwrap()
}
