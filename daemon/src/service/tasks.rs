//! The task APIs (Summarize, Rewrite, Proofread, Describe): thin calls over Complete. Each
//! turns its dictionary into a Generate request: a tuned system prompt for the task, the
//! app's text (or sealed blob, or image) as the user message with its scope, and the model's
//! adapter for the task when its manifest declares one (one base model, one LoRA adapter
//! per feature). Everything else (admission, scopes, routing, scheduling) is Complete's.

use std::collections::HashMap;

use zbus::{OwnedVariant, Variant};

use crate::error::Error;
use crate::models::Task;
use hearth_dbus::request_key as key;

/// Keys a task call passes through to the request as they are.
const PASSED: [&str; 7] =
    [key::MODEL, key::MAX_TOKENS, key::PRIORITY, key::DEADLINE_MS, key::ROUTE, key::HANDLE_TOKEN, key::SEED];

/// The task's own option keys, with the values each takes (the first is the default).
fn options(task: Task) -> &'static [(&'static str, &'static [&'static str])] {
    match task {
        Task::Summarize => {
            &[("format", &["paragraph", "bullets", "headline"]), ("length", &["short", "medium", "long"])]
        }
        Task::Rewrite => {
            &[("tone", &["neutral", "formal", "casual", "friendly"]), ("length", &["same", "shorter", "longer"])]
        }
        Task::Proofread | Task::Describe => &[],
    }
}

/// The system prompt of `task` with its chosen options (in `options`' order).
fn prompt(task: Task, chosen: &[&str]) -> String {
    match (task, chosen) {
        (Task::Summarize, [format, length]) => {
            let size = match *length {
                "short" => "one or two sentences",
                "long" => "a thorough summary of every main point",
                _ => "a few sentences",
            };
            let shape = match *format {
                "bullets" => "as a bulleted list, one point per line starting with \"- \"",
                "headline" => "as a single headline of at most twelve words",
                _ => "as a paragraph",
            };
            let size = if *format == "headline" { String::new() } else { format!(" in {size}") };
            format!(
                "Summarize the user's text {shape}{size}. Keep its facts and names; add nothing that is not in \
                 it. Reply with the summary only."
            )
        }
        (Task::Rewrite, [tone, length]) => {
            let length = match *length {
                "shorter" => " Make it noticeably shorter.",
                "longer" => " Make it somewhat longer, with more detail.",
                _ => " Keep about the same length.",
            };
            format!(
                "Rewrite the user's text in a {tone} tone, keeping its meaning and its facts.{length} Reply with the \
                 rewritten text only."
            )
        }
        (Task::Proofread, _) => "Correct the spelling, grammar and punctuation of the user's text. Change nothing \
                                 else: keep its words, meaning and style. Reply with the corrected text only."
            .into(),
        (Task::Describe, _) => "Describe the image for someone who cannot see it: what it shows, the main objects \
                                and their colours, and any text in it. Be concise and factual."
            .into(),
        _ => unreachable!("options() gives each task its keys"),
    }
}

fn str_of<'a>(k: &str, v: &'a OwnedVariant) -> Result<&'a str, Error> {
    crate::request::as_str(k, v)
}

fn owned(v: Variant<'_>) -> Result<OwnedVariant, Error> {
    OwnedVariant::try_from(v).map_err(|e| Error::Internal(format!("building the task's request: {e}")))
}

/// The Generate request of a `task` call, with `adapter` (the model's adapter for the task,
/// if it has one) at scale 1.
pub fn request(
    task: Task,
    mut dict: HashMap<String, OwnedVariant>,
    adapter: Option<&str>,
) -> Result<HashMap<String, OwnedVariant>, Error> {
    let name = task.as_str();
    let mut out = HashMap::new();
    for k in PASSED {
        if let Some(v) = dict.remove(k) {
            out.insert(k.to_owned(), v);
        }
    }
    let mut chosen = Vec::new();
    for (k, values) in options(task) {
        let v = match dict.remove(*k) {
            Some(v) => str_of(k, &v)?.to_owned(),
            None => values[0].to_owned(),
        };
        let v = values
            .iter()
            .find(|x| **x == v)
            .ok_or_else(|| Error::InvalidArgs(format!("{name}: {k} {v:?} is not one of {}", values.join(", "))))?;
        chosen.push(*v);
    }
    // The user message: the text (or a sealed blob, or for Describe an image), in its scope.
    let mut user: HashMap<String, OwnedVariant> = HashMap::from([("role".to_owned(), owned(Variant::from("user"))?)]);
    if let Some(scope) = dict.remove(key::SCOPE) {
        user.insert(key::SCOPE.to_owned(), scope);
    }
    let content_keys: &[&str] = match task {
        Task::Describe => &["image", "sealed_image", "question"],
        _ => &["text", key::SEALED],
    };
    let mut given = 0;
    for k in content_keys {
        let Some(v) = dict.remove(*k) else { continue };
        match *k {
            "text" | "question" => {
                let text = str_of(k, &v)?;
                if *k == "text" && text.trim().is_empty() {
                    return Err(Error::InvalidArgs(format!("{name}: text is empty")));
                }
                user.insert(key::CONTENT.to_owned(), v);
                given += usize::from(*k == "text");
            }
            "image" => {
                user.insert(key::IMAGES.to_owned(), owned(Variant::from(vec![bytes_of(k, &v)?]))?);
                given += 1;
            }
            "sealed_image" => {
                user.insert(key::SEALED_IMAGES.to_owned(), owned(Variant::from(vec![bytes_of(k, &v)?]))?);
                given += 1;
            }
            _ => {
                user.insert(k.to_string(), v);
                given += 1;
            }
        }
    }
    if let Some(unknown) = dict.keys().next() {
        let mut known: Vec<&str> = PASSED.to_vec();
        known.extend(options(task).iter().map(|(k, _)| *k));
        known.extend(content_keys);
        known.push(key::SCOPE);
        return Err(Error::InvalidArgs(format!("{name}: unknown key {unknown:?} (known: {})", known.join(", "))));
    }
    let what = if task == Task::Describe { "image or sealed_image" } else { "text or sealed" };
    if given != 1 {
        return Err(Error::InvalidArgs(format!("{name} needs exactly one of {what}")));
    }
    let system: HashMap<String, OwnedVariant> = HashMap::from([
        ("role".to_owned(), owned(Variant::from("system"))?),
        (key::CONTENT.to_owned(), owned(Variant::from(prompt(task, &chosen)))?),
    ]);
    let messages: Vec<HashMap<String, OwnedVariant>> = vec![system, user];
    out.insert(key::MESSAGES.to_owned(), owned(Variant::from(messages))?);
    if let Some(a) = adapter {
        out.insert(key::ADAPTERS.to_owned(), owned(Variant::from(HashMap::from([(a.to_owned(), 1.0f64)])))?);
    }
    Ok(out)
}

fn bytes_of(k: &str, v: &OwnedVariant) -> Result<Vec<u8>, Error> {
    crate::request::as_bytes(k, v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ov(v: Variant<'_>) -> OwnedVariant {
        OwnedVariant::try_from(v).unwrap()
    }

    fn call(pairs: Vec<(&str, Variant<'_>)>) -> HashMap<String, OwnedVariant> {
        pairs.into_iter().map(|(k, v)| (k.to_owned(), ov(v))).collect()
    }

    #[test]
    fn a_task_call_is_a_request_with_its_prompt_text_and_adapter() {
        let d = call(vec![
            ("text", Variant::from("The meeting moved to Friday.")),
            ("tone", Variant::from("formal")),
            ("scope", Variant::from("local")),
            ("max_tokens", Variant::from(40u32)),
        ]);
        let r = request(Task::Rewrite, d, Some("rewriter")).unwrap();
        let mut keys: Vec<&str> = r.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["adapters", "max_tokens", "messages"]);
        // The request parses as any other, with the adapter named and the user's scope kept.
        let parsed = crate::request::parse(&r, 16).unwrap();
        assert_eq!(parsed.request.max_tokens, 40);
        assert_eq!(parsed.request.adapters.unwrap()["rewriter"], 1.0);
        assert_eq!(parsed.parts.len(), 2);
        assert_eq!(parsed.parts[1].scope, crate::privacy::Scope::Local);
        let crate::privacy::Content::Text(system) = &parsed.parts[0].content else { panic!() };
        assert!(system.contains("formal tone") && system.contains("same length"), "{system}");
        // Without an adapter none is named: the manifest's scales (a task adapter's is
        // usually 0) and the cloud stay open to it.
        let d = call(vec![("text", Variant::from("x y z"))]);
        assert!(!request(Task::Summarize, d, None).unwrap().contains_key("adapters"));
    }

    #[test]
    fn bad_task_calls_are_invalid_args_with_the_reason() {
        for (task, pairs, want) in [
            (Task::Summarize, vec![], "exactly one of text or sealed"),
            (Task::Summarize, vec![("text", Variant::from("  "))], "text is empty"),
            (Task::Summarize, vec![("text", Variant::from("a")), ("sealed", Variant::from(vec![1u8]))], "exactly one"),
            (Task::Summarize, vec![("text", Variant::from("a")), ("format", Variant::from("poem"))], "format \"poem\""),
            (Task::Rewrite, vec![("text", Variant::from("a")), ("tone", Variant::from(3u32))], "tone must be a string"),
            (Task::Proofread, vec![("text", Variant::from("a")), ("tone", Variant::from("formal"))], "unknown key"),
            (Task::Describe, vec![("text", Variant::from("a"))], "unknown key \"text\""),
            (Task::Describe, vec![("question", Variant::from("What?"))], "image or sealed_image"),
            (Task::Describe, vec![("image", Variant::from("png"))], "image must be bytes"),
        ] {
            let e = request(task, call(pairs), None).unwrap_err();
            assert!(matches!(&e, Error::InvalidArgs(m) if m.contains(want)), "{want}: {e:?}");
        }
    }
}
