use super::*;
use crate::engine::{Caller, CancelToken};
use hearth_ffi::Sampler;

fn limits() -> Limits {
    Limits { shared_sequences: 2, interactive_sequences: 1, queue_capacity: 4, queue_per_app: 2 }
}

fn waiting(id: u64, app: &str, priority: Priority, need: u32) -> Waiting {
    Waiting {
        id,
        caller: Caller { connection: format!(":1.{id}"), app: app.to_owned(), uid: 0 },
        priority,
        deadline: None,
        prompt: vec![1; need as usize / 2],
        max_tokens: need - need / 2,
        sampler: Sampler::greedy(),
        adapters: AdapterSet::default(),
        session: None,
        speculative: true,
        images: Vec::new(),
        image_encode: std::time::Duration::ZERO,
        stop: crate::engine::stop::StopFilter::default(),
        logprobs: None,
        tool_format: crate::structured::ToolFormat::Constrained,
        cancel: CancelToken::default(),
        events: tokio::sync::mpsc::unbounded_channel().0,
    }
}

#[test]
fn interactive_keeps_a_slot_of_its_own() {
    let mut s = Scheduler::new(limits());
    for id in 0..3 {
        s.push(waiting(id, "bg", Priority::Background, 100));
    }
    assert!(s.pop_next().is_some());
    assert!(s.pop_next().is_some());
    assert!(s.pop_next().is_none(), "the third background request must wait: shared slots are full");
    s.push(waiting(9, "kbd", Priority::Interactive, 100));
    let (w, _) = s.pop_next().expect("interactive takes the reserved slot");
    assert_eq!(w.id, 9);
    s.push(waiting(10, "kbd", Priority::Interactive, 100));
    assert!(s.pop_next().is_none(), "all slots taken");
}

#[test]
fn same_priority_apps_alternate_by_served_tokens() {
    let mut s = Scheduler::new(Limits { queue_capacity: 100, queue_per_app: 100, ..limits() });
    for id in 0..4 {
        s.push(waiting(id, "a", Priority::Normal, 10));
    }
    for id in 4..8 {
        s.push(waiting(id, "b", Priority::Normal, 10));
    }
    let mut order = Vec::new();
    while let Some((w, slot)) = s.pop_next() {
        order.push(w.caller.app.clone());
        s.charge(&w.caller.app, 100);
        let _ = s.release(&w.caller.app, w.priority, slot.seq, w.kv_need(), Keep::Nothing);
    }
    assert_eq!(order, ["a", "b", "a", "b", "a", "b", "a", "b"]);
}

/// A scheduler with `slots` shared slots, holding one queued request of app "a" whose
/// prompt is the tokens 1..=8.
fn one_app_queued(slots: usize) -> Scheduler {
    let mut s = Scheduler::new(Limits {
        shared_sequences: slots,
        interactive_sequences: 0,
        queue_capacity: 9,
        queue_per_app: 9,
    });
    s.push(prompted(1, "a"));
    s
}

fn prompted(id: u64, app: &str) -> Waiting {
    let mut w = waiting(id, app, Priority::Normal, 20);
    w.prompt = vec![1, 2, 3, 4, 5, 6, 7, 8];
    w
}

#[test]
fn prefixes_are_reused_within_an_app_only() {
    let mut s = one_app_queued(1);
    let (w, slot) = s.pop_next().unwrap();
    assert_eq!(slot, Slot { seq: 0, reuse: 0, evict: false, copy_from: None });
    let released = s.release(
        "a",
        w.priority,
        slot.seq,
        w.kv_need(),
        Keep::Prefix(vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10], AdapterSet::default()),
    );
    assert_eq!(released, Released { dropped: vec![], moved: None }, "the only slot: kept in place");
    assert_eq!(s.cached_tokens(), 10);
    // Another app with the same prompt: no reuse, the warm slot is evicted.
    s.push(prompted(2, "b"));
    let (w, slot) = s.pop_next().unwrap();
    assert_eq!(slot, Slot { seq: 0, reuse: 0, evict: true, copy_from: None });
    let _ = s.release(
        "b",
        w.priority,
        slot.seq,
        w.kv_need(),
        Keep::Prefix(vec![1, 2, 3, 4, 5, 6, 7, 8, 42], AdapterSet::default()),
    );
    // The same app again: reuse up to the shared prefix, keeping the last prompt token.
    s.push(prompted(3, "b"));
    let (_, slot) = s.pop_next().unwrap();
    assert_eq!(slot, Slot { seq: 0, reuse: 7, evict: false, copy_from: None });
}

#[test]
fn kept_kv_parks_high_and_reuse_runs_low() {
    let mut s = one_app_queued(3);
    let (w, slot) = s.pop_next().unwrap();
    assert_eq!(slot.seq, 0, "lowest cold slot");
    let released = s.release(
        "a",
        w.priority,
        slot.seq,
        w.kv_need(),
        Keep::Prefix(vec![1, 2, 3, 4, 5, 6, 7, 8, 9], AdapterSet::default()),
    );
    assert_eq!(released.moved, Some((0, 2)), "kept KV parks in the highest slot");
    s.push(prompted(2, "a"));
    let (_, slot) = s.pop_next().unwrap();
    assert_eq!(slot, Slot { seq: 0, reuse: 7, evict: false, copy_from: Some(2) }, "reuse is copied down to slot 0");
}

fn session_turn(id: u64, session: u64) -> Waiting {
    let mut w = prompted(id, "a");
    w.session = Some(session);
    w
}

const KV: [Token; 9] = [1, 2, 3, 4, 5, 6, 7, 8, 9];

#[test]
fn an_idle_session_keeps_its_slot_until_another_request_needs_it() {
    let mut s = one_app_queued(1);
    let _ = s.remove_waiting(0);
    s.push(session_turn(1, 7));
    let (w, slot) = s.pop_next().unwrap();
    let _ = s.release("a", w.priority, slot.seq, w.kv_need(), Keep::Session(7, KV.to_vec(), AdapterSet::default()));
    assert_eq!((s.resident(7), s.cached_tokens()), (Some(slot.seq), 9));
    // The session's next turn takes its pinned slot and reuses the shared prefix.
    s.push(session_turn(2, 7));
    let (w, next) = s.pop_next().unwrap();
    assert_eq!(next, Slot { seq: slot.seq, reuse: 7, evict: false, copy_from: None });
    let _ = s.release("a", w.priority, next.seq, w.kv_need(), Keep::Session(7, KV.to_vec(), AdapterSet::default()));
    // Another request (even of the same app) finds only the pinned slot: the session is
    // parked first, then the request starts in the freed slot.
    s.push(prompted(3, "a"));
    assert!(s.pop_next().is_none());
    assert_eq!(s.slot_to_unpin(), Some(slot.seq));
    assert_eq!(s.unpin(slot.seq).map(|p| p.session), Some(7));
    assert_eq!(s.resident(7), None);
    let (w, _) = s.pop_next().unwrap();
    assert_eq!(w.id, 3);
    assert_eq!(s.slot_to_unpin(), None);
}

#[test]
fn kv_is_reused_only_under_the_adapters_it_was_computed_with() {
    let mut s = one_app_queued(1);
    let tuned = AdapterSet::new(&[0.5]);
    let (w, slot) = s.pop_next().unwrap();
    let _ = s.release("a", w.priority, slot.seq, w.kv_need(), Keep::Prefix(KV.to_vec(), tuned.clone()));
    s.push(prompted(2, "a"));
    let (w, slot) = s.pop_next().unwrap();
    assert_eq!(slot, Slot { seq: 0, reuse: 0, evict: true, copy_from: None }, "base request: no reuse of tuned KV");
    let _ = s.release("a", w.priority, slot.seq, w.kv_need(), Keep::Prefix(KV.to_vec(), tuned.clone()));
    let mut w3 = prompted(3, "a");
    w3.adapters = tuned;
    s.push(w3);
    let (_, slot) = s.pop_next().unwrap();
    assert_eq!(slot.reuse, 7, "the same adapters reuse it");
}

#[test]
fn full_queues_answer_busy() {
    let mut s = Scheduler::new(limits());
    s.pop_next().map(|_| ()).unwrap_or_default();
    s.push(waiting(90, "x", Priority::Normal, 10));
    s.push(waiting(91, "y", Priority::Normal, 10));
    assert!(s.pop_next().is_some() && s.pop_next().is_some() && s.pop_next().is_none(), "two shared slots");
    s.push(waiting(0, "a", Priority::Normal, 10));
    s.push(waiting(1, "a", Priority::Normal, 10));
    let err = s.check_admission("a", Priority::Normal).unwrap_err();
    assert!(matches!(err, EngineError::Busy { ref scope, .. } if scope == "from this app"), "{err:?}");
    s.push(waiting(2, "b", Priority::Normal, 10));
    s.push(waiting(3, "c", Priority::Normal, 10));
    let err = s.check_admission("d", Priority::Normal).unwrap_err();
    assert!(matches!(err, EngineError::Busy { ref scope, .. } if scope == "in the queue"), "{err:?}");
    // Removing a waiting request frees its place.
    let w = s.remove_waiting(0);
    assert_eq!(w.id, 0);
    assert!(s.check_admission("d", Priority::Normal).is_ok());
}

#[test]
fn an_app_past_its_energy_budget_waits_with_its_background_work_only() {
    let mut s = Scheduler::new(Limits { queue_capacity: 100, queue_per_app: 100, ..limits() });
    s.set_deferred_apps(vec!["heavy".into()]);
    s.push(waiting(1, "heavy", Priority::Background, 10));
    assert!(s.only_deferred_waiting());
    assert!(s.pop_next().is_none(), "the heavy app's background request waits");
    s.push(waiting(2, "other", Priority::Background, 10));
    assert!(!s.only_deferred_waiting());
    assert_eq!(s.pop_next().map(|(w, _)| w.id), Some(2), "another app's background work runs");
    s.push(waiting(3, "heavy", Priority::Normal, 10));
    assert_eq!(s.pop_next().map(|(w, _)| w.id), Some(3), "its normal work is not deferred here (hearthd demotes it)");
    s.set_deferred_apps(Vec::new());
    assert!(!s.only_deferred_waiting());
    assert!(s.pop_next().is_none(), "shared slots are full now");
    assert_eq!(s.waiting().len(), 1);
}
