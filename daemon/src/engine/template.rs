//! The model's own chat template (the Jinja text in its GGUF), rendered with minijinja for
//! requests with tools, where it shows tools in a format Hearth reads ([`ToolFormat`]).
//!
//! llama.h's template API (`llama_chat_apply_template`) matches a template against the
//! formats llama.cpp knows and takes no tools, so it serves every other request. A template
//! that shows tools is what the model was trained with: its tools, its earlier calls and their
//! results, written as the model expects them. It is rendered as Hugging Face's transformers
//! renders it (trim_blocks, lstrip_blocks, loop controls, Python's string methods), with a fuel
//! limit so that no template and no conversation runs unbounded, inside the sandboxed engine
//! (the template comes with the model's file, the conversation from an app).
//!
//! A template is used only if it renders a probe conversation (a tool, a call of it and the
//! call's result) showing all three; otherwise its model gets the constrained format.

use minijinja::{Environment, Error, ErrorKind, Value};
use serde_json::{Value as Json, json};

use super::Message;
use crate::structured::{ToolCall, ToolFormat};

/// Instructions one render may run (minijinja's fuel). A typical template takes a few
/// thousand per message, so the largest conversation hearthd admits (1024 messages) fits;
/// a template that loops on its own runs out and fails the request.
const FUEL: u64 = 5_000_000;
/// What the probe conversation names, to find in the rendered text.
const PROBE_TOOL: &str = "hearth_probe_tool";
const PROBE_CALL: &str = "hearth_probe_called";
const PROBE_RESULT: &str = "hearth-probe-result";

/// A model's template that shows tools.
pub struct NativeTemplate {
    env: Environment<'static>,
    format: ToolFormat,
    bos: String,
    eos: String,
}

impl std::fmt::Debug for NativeTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NativeTemplate").field("format", &self.format).finish_non_exhaustive()
    }
}

impl NativeTemplate {
    /// The template `source` (with the model's BOS and EOS texts), if it shows tools in a
    /// format Hearth reads; Ok(None) if it names no such format, Err (why) if it names one
    /// but cannot be compiled or fails the probe.
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Option<Self>, String> {
        let format = match source {
            s if s.contains("<tool_call>") => ToolFormat::Hermes,
            _ => return Ok(None),
        };
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| e.to_string())?;
        env.set_syntax(syntax);
        env.set_fuel(Some(FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", |message: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_template_owned("chat", source.to_owned()).map_err(|e| format!("it does not compile: {e}"))?;
        let template = Self { env, format, bos: bos.to_owned(), eos: eos.to_owned() };
        template.probe()?;
        Ok(Some(template))
    }

    pub fn format(&self) -> ToolFormat {
        self.format
    }

    /// Whether rendered `text` begins with the BOS token itself (so the tokenizer must not
    /// add another).
    pub fn starts_with_bos(&self, text: &str) -> bool {
        !self.bos.is_empty() && text.starts_with(&self.bos)
    }

    /// The prompt text of `messages` with `tools` (a JSON array of OpenAI tools), ending
    /// where the assistant's answer begins.
    pub fn render(&self, messages: &[Message], tools: &Json) -> Result<String, String> {
        let messages: Vec<Json> = messages.iter().map(message_json).collect();
        let ctx = json!({
            "messages": messages,
            "tools": tools,
            "add_generation_prompt": true,
            "bos_token": self.bos,
            "eos_token": self.eos,
        });
        let template = self.env.get_template("chat").map_err(|e| e.to_string())?;
        template.render(Value::from(minijinja::value::Serde(&ctx))).map_err(|e| match e.kind() {
            ErrorKind::OutOfFuel => "the model's chat template ran out of its render budget".to_owned(),
            _ => format!("the model's chat template failed: {e}"),
        })
    }

    /// Renders a conversation of a tool, a call of it and the call's result, and checks
    /// that the text shows all three.
    fn probe(&self) -> Result<(), String> {
        let tools = json!([{"type": "function", "function": {"name": PROBE_TOOL, "description": "Probe.",
            "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}}}}]);
        let call = ToolCall { id: "call_0".into(), name: PROBE_CALL.into(), arguments: r#"{"n": 1}"#.into() };
        let messages = [
            Message::new("user", "Hi"),
            Message { tool_calls: vec![call], ..Message::new("assistant", "") },
            Message { tool_call_id: Some("call_0".into()), ..Message::new("tool", PROBE_RESULT) },
            Message::new("user", "Thanks"),
        ];
        let text = self.render(&messages, &tools)?;
        for (what, needle) in
            [("the tools", PROBE_TOOL), ("an earlier call", PROBE_CALL), ("a call's result", PROBE_RESULT)]
        {
            if !text.contains(needle) {
                return Err(format!("it does not show {what}"));
            }
        }
        Ok(())
    }
}

/// `tojson` as transformers defines it for chat templates: Python's `json.dumps`, text kept
/// as it is (minijinja's own escapes `<`, `>`, `&` and `'` for HTML, which a model's
/// training text never had).
#[allow(clippy::needless_pass_by_value)] // minijinja hands a filter its keyword arguments by value.
fn tojson(value: &Value, kwargs: minijinja::value::Kwargs) -> Result<Value, Error> {
    let fail = |e: serde_json::Error| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}"));
    let indent: Option<usize> = kwargs.get("indent")?;
    let mut out = Vec::new();
    match indent {
        Some(n) => {
            let pad = vec![b' '; n.min(16)];
            let mut ser =
                serde_json::Serializer::with_formatter(&mut out, serde_json::ser::PrettyFormatter::with_indent(&pad));
            serde::Serialize::serialize(value, &mut ser).map_err(fail)?;
        }
        None => {
            let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonSpaced);
            serde::Serialize::serialize(value, &mut ser).map_err(fail)?;
        }
    }
    Ok(Value::from_safe_string(String::from_utf8(out).unwrap_or_default()))
}

/// Python's `json.dumps` separators: `", "` between items, `": "` after keys.
struct PythonSpaced;

impl serde_json::ser::Formatter for PythonSpaced {
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// A turn as chat templates read it (the OpenAI message shape transformers passes; a call's
/// arguments as an object).
fn message_json(m: &Message) -> Json {
    let mut out = json!({"role": m.role, "content": m.content});
    if !m.tool_calls.is_empty() {
        let calls: Vec<Json> = m
            .tool_calls
            .iter()
            .map(|c| {
                let args: Json = serde_json::from_str(&c.arguments).unwrap_or_else(|_| json!({}));
                json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": args}})
            })
            .collect();
        out["tool_calls"] = Json::Array(calls);
    }
    if let Some(id) = &m.tool_call_id {
        out["tool_call_id"] = json!(id);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test tools template (tests/data/tools-template.jinja), hermes style.
    const TOOLS: &str = include_str!("../../../tests/data/tools-template.jinja");
    /// SmolLM2's template: no tools.
    const PLAIN: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    fn weather() -> Json {
        json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}])
    }

    #[test]
    fn a_tools_template_renders_tools_calls_and_results() {
        let t = NativeTemplate::new(TOOLS, "<|endoftext|>", "<|im_end|>").unwrap().expect("hermes");
        assert_eq!(t.format(), ToolFormat::Hermes);
        let call = ToolCall { id: "call_7".into(), name: "get_weather".into(), arguments: r#"{"city":"Oslo"}"#.into() };
        let text = t
            .render(
                &[
                    Message::new("system", "Be brief."),
                    Message::new("user", "Weather in Oslo?"),
                    Message { tool_calls: vec![call], ..Message::new("assistant", "") },
                    Message { tool_call_id: Some("call_7".into()), ..Message::new("tool", "-3 C, snow") },
                ],
                &weather(),
            )
            .unwrap();
        assert!(text.starts_with("<|im_start|>system\nBe brief."), "{text}");
        assert!(text.contains(r#""name": "get_weather""#), "{text}");
        assert!(
            text.contains(
                "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>"
            ),
            "{text}"
        );
        assert!(text.contains("<tool_response>\n-3 C, snow\n</tool_response>"), "{text}");
        assert!(text.ends_with("<|im_start|>assistant\n"), "{text}");
        assert!(!t.starts_with_bos(&text));
        // Text in JSON as it is, with Python's separators.
        let tools = json!([{"type": "function", "function": {"name": "cmp", "description": "a < b & 'c' – é"}}]);
        let text = t.render(&[Message::new("user", "?")], &tools).unwrap();
        assert!(
            text.contains(r#"{"function": {"description": "a < b & 'c' – é", "name": "cmp"}, "type": "function"}"#),
            "{text}"
        );
    }

    #[test]
    fn templates_without_tools_or_that_fail_are_not_used() {
        assert!(NativeTemplate::new(PLAIN, "", "").unwrap().is_none());
        // Names the format but shows no tools.
        let no_tools = format!("{{# <tool_call> #}}{PLAIN}");
        assert!(NativeTemplate::new(&no_tools, "", "").unwrap_err().contains("does not show the tools"));
        assert!(NativeTemplate::new("<tool_call>{% if %}", "", "").unwrap_err().contains("does not compile"));
        let raising = "<tool_call>{{ raise_exception('no tools here') }}";
        assert!(NativeTemplate::new(raising, "", "").unwrap_err().contains("no tools here"));
    }

    #[test]
    fn a_runaway_template_stops_on_its_fuel() {
        // Renders the probe (a few messages) but loops a million times per message.
        let slow = format!(
            "{{% for m in messages %}}{{% for i in range(1000) %}}{{% for j in range(1000) %}}{{% endfor %}}{{% endfor %}}{{% endfor %}}{TOOLS}"
        );
        let t = std::time::Instant::now();
        let e = NativeTemplate::new(&slow, "", "").unwrap_err();
        assert!(e.contains("render budget"), "{e}");
        assert!(t.elapsed() < std::time::Duration::from_secs(5), "{:?}", t.elapsed());
    }
}
