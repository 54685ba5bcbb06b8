//! Structured output and tool calls.
//!
//! - `json_schema`: the schema is checked against its meta-schema (the `jsonschema` crate,
//!   which names what is wrong), turned into a GBNF grammar by llama.cpp's own converter, and
//!   the output is validated against it when the generation ends.
//! - `grammar`: GBNF given directly.
//! - `tools` (OpenAI's format: `[{"type": "function", "function": {"name", "description",
//!   "parameters"}}]`) with `tool_choice` (`auto`, `required`, `none`): llama.h's chat template
//!   API takes no tools, so every model gets the constrained fallback: a system message that
//!   lists the functions, and a grammar that lets the answer be either plain text (`auto`) or
//!   exactly one call `{"name": ..., "arguments": {...}}` whose arguments match that function's
//!   parameter schema. A call is returned as structured data in `Finished` (`tool_calls`), its
//!   arguments validated once more.

use hearth_ffi::ChatMessage;
use serde_json::{Value as Json, json};

use crate::error::Error;

/// Most tools in one request.
const MAX_TOOLS: usize = 64;

/// Tool call ids, unique for the daemon's life.
static NEXT_CALL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// What to do with `tools`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model answers in text or calls a tool.
    Auto,
    /// The model must call a tool.
    Required,
    /// The tools are described but the model answers in text.
    None,
}

impl ToolChoice {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "auto" => Self::Auto,
            "required" => Self::Required,
            "none" => Self::None,
            _ => return None,
        })
    }
}

#[derive(Debug)]
struct Tool {
    name: String,
    /// The tool as the model sees it (name, description, parameters).
    spec: Json,
    parameters: jsonschema::Validator,
}

/// A tool call the model made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments, as a JSON object text that validates against the tool's parameters.
    pub arguments: String,
}

/// How a request's output is constrained; shared by the engine (grammar, prompt) and the
/// service (what the finished text means).
#[derive(Debug)]
pub struct Structure {
    grammar: Option<String>,
    schema: Option<jsonschema::Validator>,
    tools: Vec<Tool>,
    choice: ToolChoice,
}

impl PartialEq for Structure {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidArgs(msg.into())
}

/// Checks `schema` (JSON text) against the JSON Schema meta-schema and compiles it.
fn compile_schema(what: &str, schema: &Json) -> Result<jsonschema::Validator, Error> {
    jsonschema::validator_for(schema).map_err(|e| invalid(format!("{what} is not a valid JSON Schema: {e}")))
}

fn to_grammar(what: &str, schema: &Json) -> Result<String, Error> {
    hearth_ffi::json_schema_to_grammar(&schema.to_string())
        .map_err(|e| invalid(format!("{what} cannot be turned into a grammar: {e}")))
}

impl Structure {
    /// Parses the structure keys of a request. None when none of them is given.
    pub fn parse(
        json_schema: Option<&str>,
        grammar: Option<&str>,
        tools: Option<&str>,
        tool_choice: Option<&str>,
    ) -> Result<Option<Self>, Error> {
        let choice = match tool_choice {
            Some(c) => ToolChoice::parse(c)
                .ok_or_else(|| invalid(format!("tool_choice {c:?} is not one of auto, required, none")))?,
            None => ToolChoice::Auto,
        };
        if tool_choice.is_some() && tools.is_none() {
            return Err(invalid("tool_choice needs tools"));
        }
        let given = [json_schema.is_some(), grammar.is_some(), tools.is_some()].iter().filter(|g| **g).count();
        if given > 1 {
            return Err(invalid("json_schema, grammar and tools exclude each other: give one"));
        }
        if let Some(text) = json_schema {
            let schema: Json =
                serde_json::from_str(text).map_err(|e| invalid(format!("json_schema is not JSON: {e}")))?;
            let validator = compile_schema("json_schema", &schema)?;
            let grammar = to_grammar("json_schema", &schema)?;
            return Ok(Some(Self { grammar: Some(grammar), schema: Some(validator), tools: Vec::new(), choice }));
        }
        if let Some(g) = grammar {
            if g.trim().is_empty() {
                return Err(invalid("grammar is empty"));
            }
            return Ok(Some(Self { grammar: Some(g.to_owned()), schema: None, tools: Vec::new(), choice }));
        }
        let Some(text) = tools else { return Ok(None) };
        let tools = parse_tools(text)?;
        let grammar = match choice {
            ToolChoice::None => None,
            ToolChoice::Required => Some(to_grammar("tools", &calls_schema(&tools))?),
            ToolChoice::Auto => {
                let calls = to_grammar("tools", &calls_schema(&tools))?;
                // The converter's start rule becomes one alternative; the other is text that
                // does not open with a brace.
                let renamed: String = calls
                    .lines()
                    .map(|l| match l.strip_prefix("root ::=") {
                        Some(rest) => format!("tool-call ::={rest}"),
                        None => l.to_owned(),
                    })
                    .collect::<Vec<_>>()
                    .join("\n");
                Some(format!("root ::= tool-call | plain-text\nplain-text ::= [^{{] .*\n{renamed}\n"))
            }
        };
        Ok(Some(Self { grammar, schema: None, tools, choice }))
    }

    /// The GBNF grammar the sampler follows, if any.
    pub fn grammar(&self) -> Option<&str> {
        self.grammar.as_deref()
    }

    /// The conversation with the tools described to the model: appended to the first system
    /// message, or in a new one before everything else.
    pub fn messages(&self, messages: &[ChatMessage]) -> Vec<ChatMessage> {
        if self.tools.is_empty() {
            return messages.to_vec();
        }
        let specs: Vec<String> = self.tools.iter().map(|t| t.spec.to_string()).collect();
        let how = match self.choice {
            ToolChoice::None => "Do not call any of them now; answer in text.",
            ToolChoice::Required => {
                "Call one of them now: reply with only a JSON object {\"name\": <function name>, \"arguments\": <arguments object>}."
            }
            ToolChoice::Auto => {
                "To call one, reply with only a JSON object {\"name\": <function name>, \"arguments\": <arguments object>}; otherwise answer in text."
            }
        };
        let text = format!("You can call these functions:\n{}\n{how}", specs.join("\n"));
        let mut out = messages.to_vec();
        match out.first_mut() {
            Some(first) if first.role == "system" => first.content = format!("{}\n\n{text}", first.content),
            _ => out.insert(0, ChatMessage { role: "system".into(), content: text }),
        }
        out
    }

    /// Whether `text` validates against the request's `json_schema` (None without one).
    pub fn schema_valid(&self, text: &str) -> Option<bool> {
        let schema = self.schema.as_ref()?;
        Some(serde_json::from_str::<Json>(text).is_ok_and(|v| schema.is_valid(&v)))
    }

    /// The tool calls in a finished answer: one, when the text is a call of a known tool with
    /// arguments that validate; none otherwise (plain text, or a call cut off by max_tokens).
    pub fn tool_calls(&self, text: &str) -> Vec<ToolCall> {
        if self.tools.is_empty() || self.choice == ToolChoice::None {
            return Vec::new();
        }
        let Ok(Json::Object(call)) = serde_json::from_str::<Json>(text.trim()) else { return Vec::new() };
        let (Some(Json::String(name)), Some(args)) = (call.get("name"), call.get("arguments")) else {
            return Vec::new();
        };
        match self.tools.iter().find(|t| &t.name == name) {
            Some(tool) if args.is_object() && tool.parameters.is_valid(args) => {
                let n = NEXT_CALL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                vec![ToolCall { id: format!("call_{n}"), name: name.clone(), arguments: args.to_string() }]
            }
            _ => Vec::new(),
        }
    }
}

fn parse_tools(text: &str) -> Result<Vec<Tool>, Error> {
    let list: Json = serde_json::from_str(text).map_err(|e| invalid(format!("tools is not JSON: {e}")))?;
    let Json::Array(list) = list else { return Err(invalid("tools must be a JSON array")) };
    if list.is_empty() || list.len() > MAX_TOOLS {
        return Err(invalid(format!("tools must list 1 to {MAX_TOOLS} tools, got {}", list.len())));
    }
    let mut tools: Vec<Tool> = Vec::with_capacity(list.len());
    for (i, entry) in list.iter().enumerate() {
        if entry.get("type").and_then(Json::as_str) != Some("function") {
            return Err(invalid(format!("tools[{i}].type must be \"function\"")));
        }
        let f = entry.get("function").ok_or_else(|| invalid(format!("tools[{i}] has no function")))?;
        let name = f
            .get("name")
            .and_then(Json::as_str)
            .filter(|n| {
                !n.is_empty() && n.len() <= 64 && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            })
            .ok_or_else(|| invalid(format!("tools[{i}].function.name must be 1-64 of [A-Za-z0-9_-]")))?;
        if tools.iter().any(|t| t.name == name) {
            return Err(invalid(format!("tools[{i}]: {name:?} is listed twice")));
        }
        let description = f.get("description").and_then(Json::as_str).unwrap_or("");
        let parameters = f.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object", "properties": {}}));
        if parameters.get("type").and_then(Json::as_str) != Some("object") {
            return Err(invalid(format!("tools[{i}].function.parameters must be an object schema")));
        }
        let validator = compile_schema(&format!("tools[{i}].function.parameters"), &parameters)?;
        let spec = json!({"name": name, "description": description, "parameters": parameters});
        tools.push(Tool { name: name.to_owned(), spec, parameters: validator });
    }
    Ok(tools)
}

/// One schema for "a call of any of the tools".
fn calls_schema(tools: &[Tool]) -> Json {
    let calls: Vec<Json> = tools
        .iter()
        .map(|t| {
            json!({
                "type": "object",
                "properties": {"name": {"const": t.name}, "arguments": t.spec["parameters"]},
                "required": ["name", "arguments"],
                "additionalProperties": false,
            })
        })
        .collect();
    if calls.len() == 1 { calls.into_iter().next().unwrap_or_default() } else { json!({ "anyOf": calls }) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEATHER: &str = r#"[{"type": "function", "function": {"name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}]"#;

    #[test]
    fn schema_errors_say_what_is_wrong() {
        let err = |s: &str| match Structure::parse(Some(s), None, None, None) {
            Err(Error::InvalidArgs(m)) => m,
            other => panic!("{other:?}"),
        };
        assert!(err("{").contains("not JSON"));
        assert!(err(r#"{"type": "strng"}"#).contains("not a valid JSON Schema"), "{}", err(r#"{"type": "strng"}"#));
        assert!(err(r#"{"type": "object", "minProperties": -1}"#).contains("not a valid JSON Schema"));
        let both = Structure::parse(Some("{}"), Some("root ::= \"a\""), None, None);
        assert!(matches!(both, Err(Error::InvalidArgs(m)) if m.contains("exclude")));
        assert!(matches!(Structure::parse(None, None, None, Some("auto")), Err(Error::InvalidArgs(_))));
        assert!(matches!(Structure::parse(None, None, Some(WEATHER), Some("maybe")), Err(Error::InvalidArgs(_))));
        assert!(matches!(Structure::parse(None, None, Some("[]"), None), Err(Error::InvalidArgs(_))));
        assert!(matches!(
            Structure::parse(None, None, Some(r#"[{"type": "function", "function": {"name": "a b"}}]"#), None),
            Err(Error::InvalidArgs(m)) if m.contains("name")
        ));
    }

    #[test]
    fn a_schema_becomes_a_grammar_and_validates_output() {
        let s = Structure::parse(
            Some(r#"{"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}"#),
            None,
            None,
            None,
        )
        .unwrap()
        .unwrap();
        assert!(s.grammar().unwrap().contains("root ::="));
        assert_eq!(s.schema_valid(r#"{"n": 3}"#), Some(true));
        assert_eq!(s.schema_valid(r#"{"n": "three"}"#), Some(false));
        assert_eq!(s.schema_valid(r#"{"n": 3"#), Some(false));
    }

    #[test]
    fn tool_calls_are_recognised_and_validated() {
        let s = Structure::parse(None, None, Some(WEATHER), None).unwrap().unwrap();
        let g = s.grammar().unwrap();
        assert!(g.starts_with("root ::= tool-call | plain-text"), "{g}");
        assert!(g.contains("tool-call ::="), "{g}");
        let calls = s.tool_calls(r#" {"name": "get_weather", "arguments": {"city": "Paris"}} "#);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].name, "get_weather");
        assert_eq!(serde_json::from_str::<Json>(&calls[0].arguments).unwrap(), json!({"city": "Paris"}));
        assert!(s.tool_calls(r#"{"name": "get_weather", "arguments": {}}"#).is_empty(), "city is required");
        assert!(s.tool_calls(r#"{"name": "launch", "arguments": {}}"#).is_empty());
        assert!(s.tool_calls("It is sunny.").is_empty());
        let msgs = s.messages(&[ChatMessage { role: "user".into(), content: "hi".into() }]);
        assert_eq!(msgs[0].role, "system");
        assert!(msgs[0].content.contains("get_weather"));
        let none = Structure::parse(None, None, Some(WEATHER), Some("none")).unwrap().unwrap();
        assert!(none.grammar().is_none());
    }
}
