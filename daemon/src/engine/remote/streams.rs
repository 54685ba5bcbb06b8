//! The engine process's streams, seen from hearthd: the start frame, the writer, the reader
//! (dispatching what the engine says to the requests waiting for it), the ordered store of
//! parked KV, the governors' demands, and the supervisor that reaps the process.

use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio_util::codec::{FramedRead, FramedWrite};

use super::super::protocol::{self, FromEngine, SessionKv, Start, ToEngine};
use super::super::{EngineStatus, Event, Throttle};
use super::{EngineHandle, Pending, PendingTable, Remote, SessionVault};

/// Sends the start frame with the model's and adapters' descriptors attached.
pub(super) fn send_start(
    socket: &std::os::unix::net::UnixStream,
    start: &Start,
    fds: &[BorrowedFd<'_>],
) -> std::io::Result<()> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, sendmsg};
    use std::io::Write;
    let frame = protocol::frame(start)?;
    let mut space = vec![std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut ancillary = SendAncillaryBuffer::new(&mut space);
    if !ancillary.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(std::io::Error::other("too many descriptors"));
    }
    let sent = sendmsg(socket, &[std::io::IoSlice::new(&frame)], &mut ancillary, SendFlags::empty())?;
    let mut rest = socket;
    rest.write_all(&frame[sent..])
}

pub(super) async fn write_frames(
    mut sink: FramedWrite<tokio::net::unix::OwnedWriteHalf, tokio_util::codec::LengthDelimitedCodec>,
    mut rx: mpsc::UnboundedReceiver<ToEngine>,
) {
    while let Some(msg) = rx.recv().await {
        let Ok(payload) = protocol::encode(&msg) else { continue };
        if sink.send(payload).await.is_err() {
            break;
        }
    }
}

/// Handles what the engine says until its socket closes.
pub(super) async fn read_frames(
    remote: Arc<Remote>,
    mut frames: FramedRead<tokio::net::unix::OwnedReadHalf, tokio_util::codec::LengthDelimitedCodec>,
    status: watch::Sender<EngineStatus>,
    throttle: Arc<Throttle>,
    compute: Arc<super::super::Compute>,
) {
    fn pending(r: &Remote) -> std::sync::MutexGuard<'_, PendingTable> {
        r.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    // Parked KV is sealed and written in order by a task of its own, so the stream (other
    // apps' tokens, heartbeats) does not wait for the disk.
    let (parks, parks_rx) = mpsc::unbounded_channel();
    let parker = tokio::spawn(store_parked(Arc::clone(&remote.sessions), remote.model.name.clone(), parks_rx));
    while let Some(frame) = frames.next().await {
        let payload = match frame {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(model = %remote.model.name, error = %e, "the engine's stream broke: killing it");
                let _ = remote.kill.send("its stream broke");
                break;
            }
        };
        let msg = match protocol::decode::<FromEngine>(&payload) {
            Ok(msg) => msg,
            Err(e) => {
                tracing::error!(model = %remote.model.name, error = %e, "the engine sent an undecodable frame: killing it");
                let _ = remote.kill.send("it sent an undecodable frame");
                break;
            }
        };
        match msg {
            FromEngine::Verdict { key, result } => {
                let mut p = pending(&remote);
                let refused = result.is_err();
                if let Some(Pending::Generate { verdict, prompt_tokens, .. }) = p.by_key.get_mut(&key) {
                    if let Ok(a) = &result {
                        *prompt_tokens = a.prompt_tokens;
                    }
                    if let Some(v) = verdict.take() {
                        let _ = v.send(result);
                    }
                    if refused {
                        p.by_key.remove(&key);
                    }
                }
            }
            FromEngine::Event { key, event } => {
                let mut p = pending(&remote);
                let last = matches!(event, Event::Finished(_));
                if let Some(Pending::Generate { events, verdict: None, .. }) = p.by_key.get(&key) {
                    let _ = events.send(event);
                    if last {
                        p.by_key.remove(&key);
                    }
                }
            }
            FromEngine::Embedded { key, result } => {
                let mut p = pending(&remote);
                if matches!(p.by_key.get(&key), Some(Pending::Embed { .. }))
                    && let Some(Pending::Embed { reply, .. }) = p.by_key.remove(&key)
                {
                    let _ = reply.send(result);
                }
            }
            FromEngine::Counted { key, result } => {
                let mut p = pending(&remote);
                if matches!(p.by_key.get(&key), Some(Pending::Count { .. }))
                    && let Some(Pending::Count { reply }) = p.by_key.remove(&key)
                {
                    let _ = reply.send(result);
                }
            }
            FromEngine::Parked { session, kv } => {
                // Only sessions this engine was given, and KV no larger than its context.
                let given = pending(&remote).sessions.contains(&session);
                if !given || kv.tokens.len() > remote.model.context_length as usize {
                    tracing::warn!(model = %remote.model.name, session, "the engine parked KV of a session it was not given: ignored");
                    continue;
                }
                let _ = parks.send((session, kv));
            }
            FromEngine::Status { status: now, kv } => {
                remote.kv.store(kv);
                status.send_if_modified(|s| {
                    let changed = *s != now;
                    *s = now;
                    changed
                });
            }
            FromEngine::Compute(gathered) => compute.merge(gathered),
            FromEngine::Heartbeat { beat_ago_ms, idle, kv, potential_mtps } => {
                remote.liveness.observe(Duration::from_millis(beat_ago_ms), idle);
                remote.kv.store(kv);
                if potential_mtps > 0 {
                    throttle.potential_mtps.store(potential_mtps, Ordering::Relaxed);
                }
            }
            FromEngine::Progress(_) | FromEngine::Ready { .. } | FromEngine::Failed(_) => {}
        }
    }
    drop(parks);
    let _ = parker.await;
    // The engine is gone: its queue is empty.
    status.send_if_modified(|s| {
        let changed = *s != EngineStatus::default();
        *s = EngineStatus::default();
        changed
    });
}

/// Seals and stores parked session KV in the order the engine handed it over.
async fn store_parked(
    sessions: Arc<dyn SessionVault>,
    model: String,
    mut rx: mpsc::UnboundedReceiver<(u64, SessionKv)>,
) {
    while let Some((session, kv)) = rx.recv().await {
        let (sessions, model) = (Arc::clone(&sessions), model.clone());
        let (tokens, bytes) = (kv.tokens.len(), kv.state.len());
        let stored = tokio::task::spawn_blocking(move || {
            if !sessions.runs(session, &model) {
                return Ok(false);
            }
            sessions.keep(session, kv)
        })
        .await;
        match stored {
            Ok(Ok(true)) => tracing::info!(session, tokens, bytes, "session KV parked"),
            Ok(Ok(false)) => tracing::debug!(session, "session closed while parking: KV dropped"),
            Ok(Err(e)) => tracing::warn!(session, error = %e, "cannot park session KV: its next turn recomputes it"),
            Err(e) => tracing::warn!(session, error = %e, "session KV park task failed"),
        }
    }
}

/// Sends the governors' demands to the engine whenever they change (`sent`: what it
/// started with).
pub(super) async fn forward_throttle(remote: Arc<Remote>, throttle: Arc<Throttle>, sent: super::super::ThrottleState) {
    let mut version = throttle.subscribe();
    let mut exited = remote.exited.clone();
    let mut last = sent;
    loop {
        let now = throttle.state();
        if now != last {
            last = now.clone();
            if remote.out.send(ToEngine::Throttle(now)).is_err() {
                return;
            }
        }
        tokio::select! {
            changed = version.changed() => if changed.is_err() { return },
            _ = exited.changed() => return,
        }
    }
}

/// Reaps the process; kills it when asked, or when its loop has made no progress for
/// `hang_limit` while it has work. Then ends what was still in it and says why it ended.
pub(super) async fn supervise(
    handle: EngineHandle,
    mut child: super::Process,
    reader: tokio::task::JoinHandle<()>,
    mut kill: mpsc::UnboundedReceiver<&'static str>,
    exited: watch::Sender<Option<String>>,
    hang_limit: Duration,
) {
    let name = handle.inner.model.name.clone();
    let mut tick = tokio::time::interval(Duration::from_millis(250).min(hang_limit / 2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut killed: Option<&'static str> = None;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            why = kill.recv() => if let Some(why) = why {
                killed.get_or_insert(why);
                child.kill();
            },
            _ = tick.tick() => {
                let r = &handle.inner;
                let busy = !r.liveness.idle() || !handle.pending().by_key.is_empty();
                if killed.is_none() && busy && r.liveness.since_beat() > hang_limit {
                    tracing::error!(
                        model = %name, pid = r.pid, limit_ms = hang_limit.as_millis() as u64,
                        "engine loop makes no progress: killing it"
                    );
                    killed = Some("its loop made no progress");
                    child.kill();
                }
            }
        }
    };
    // What it said before it went is handled first (finished requests, parked KV).
    let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
    let why = match killed {
        Some(why) => format!("killed: {why}"),
        None => status,
    };
    if handle.stopping() {
        tracing::debug!(model = %name, pid = handle.inner.pid, why = %why, "engine stopped");
    } else {
        tracing::error!(model = %name, pid = handle.inner.pid, why = %why, "engine process died");
    }
    let _ = exited.send(Some(why));
    handle.fail_all();
}
