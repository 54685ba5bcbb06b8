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
//!
//! Every grammar, given or made, passes [`gbnf::check`] before llama.cpp sees it, and every
//! schema passes [`schema_bounds`] before llama.cpp's converter does: both run inside the
//! daemon on an app's text, and their failure modes are aborts, stack overflows and unbounded
//! memory, not errors.

mod gbnf;
mod schema_bounds;

use hearth_ffi::ChatMessage;
use serde_json::{Value as Json, json};

use crate::error::Error;

/// Most tools in one request.
const MAX_TOOLS: usize = 64;
/// Largest `tools` text (descriptions included; each parameter schema is bounded on its own).
const MAX_TOOLS_BYTES: usize = 128 * 1024;

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

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidArgs(msg.into())
}

/// Checks `schema` (JSON text) against the JSON Schema meta-schema and compiles it.
fn compile_schema(what: &str, schema: &Json) -> Result<jsonschema::Validator, Error> {
    jsonschema::validator_for(schema).map_err(|e| invalid(format!("{what} is not a valid JSON Schema: {e}")))
}

/// Size and depth bounds on a parsed schema, before anything recursive (the meta-schema
/// compiler, the converter) walks it.
fn check_depth(what: &str, schema: &Json) -> Result<(), Error> {
    schema_bounds::check_depth(schema).map_err(|e| invalid(format!("{what} is refused: {e}")))
}

/// Limits and satisfiability, after the meta-schema check (so keyword types are sound).
fn check_bounds(what: &str, schema: &Json, budget: &mut schema_bounds::Budget) -> Result<(), Error> {
    schema_bounds::check(schema, budget).map_err(|e| invalid(format!("{what} is refused: {e}")))
}

fn check_grammar(what: &str, grammar: &str) -> Result<(), Error> {
    gbnf::check(grammar).map_err(|e| invalid(format!("{what} is refused: {e}")))
}

fn to_grammar(what: &str, schema: &Json) -> Result<String, Error> {
    let grammar = hearth_ffi::json_schema_to_grammar(&schema.to_string())
        .map_err(|e| invalid(format!("{what} cannot be turned into a grammar: {e}")))?;
    // The converter's output is checked like an app's grammar: it writes repetitions and
    // alternatives straight from the schema.
    gbnf::check(&grammar).map_err(|e| invalid(format!("{what}: the grammar made from it is refused: {e}")))?;
    Ok(grammar)
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
            schema_bounds::check_text(text).map_err(|e| invalid(format!("json_schema is refused: {e}")))?;
            let schema: Json =
                serde_json::from_str(text).map_err(|e| invalid(format!("json_schema is not JSON: {e}")))?;
            check_depth("json_schema", &schema)?;
            let validator = compile_schema("json_schema", &schema)?;
            check_bounds("json_schema", &schema, &mut schema_bounds::Budget::default())?;
            let grammar = to_grammar("json_schema", &schema)?;
            return Ok(Some(Self { grammar: Some(grammar), schema: Some(validator), tools: Vec::new(), choice }));
        }
        if let Some(g) = grammar {
            if g.trim().is_empty() {
                return Err(invalid("grammar is empty"));
            }
            check_grammar("grammar", g)?;
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
                let grammar = format!("root ::= tool-call | plain-text\nplain-text ::= [^{{] .*\n{renamed}\n");
                check_grammar("tools", &grammar)?;
                Some(grammar)
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
    if text.len() > MAX_TOOLS_BYTES {
        return Err(invalid(format!("tools is {} bytes; the limit is {MAX_TOOLS_BYTES}", text.len())));
    }
    let list: Json = serde_json::from_str(text).map_err(|e| invalid(format!("tools is not JSON: {e}")))?;
    let Json::Array(list) = list else { return Err(invalid("tools must be a JSON array")) };
    if list.is_empty() || list.len() > MAX_TOOLS {
        return Err(invalid(format!("tools must list 1 to {MAX_TOOLS} tools, got {}", list.len())));
    }
    let mut tools: Vec<Tool> = Vec::with_capacity(list.len());
    // One budget for all tools: together they become one grammar.
    let mut budget = schema_bounds::Budget::default();
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
        let what = format!("tools[{i}].function.parameters");
        check_depth(&what, &parameters)?;
        let validator = compile_schema(&what, &parameters)?;
        check_bounds(&what, &parameters, &mut budget)?;
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

    /// The refusal message, checking that it came quickly.
    fn refused(json_schema: Option<&str>, grammar: Option<&str>, tools: Option<&str>) -> String {
        let t = std::time::Instant::now();
        let r = Structure::parse(json_schema, grammar, tools, None);
        let took = t.elapsed();
        match r {
            Err(Error::InvalidArgs(m)) => {
                assert!(took < std::time::Duration::from_millis(100), "took {took:?}: {m}");
                m
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn hostile_grammars_are_refused_quickly() {
        let g = |text: &str| refused(None, Some(text), None);
        let deep = format!("root ::= {}\"a\"{}", "(".repeat(20_000), ")".repeat(20_000));
        assert!(g(&deep).contains("nest deeper"), "{}", g(&deep));
        let chain: String =
            (0..5000).map(|i| format!("r{i} ::= r{}\n", i + 1)).collect::<String>() + "r5000 ::= \"y\"\nroot ::= r0";
        assert!(g(&chain).contains("bytes"));
        let chain: String =
            (0..3000).map(|i| format!("r{i} ::= r{}\n", i + 1)).collect::<String>() + "r3000 ::= \"y\"\nroot ::= r0";
        assert!(g(&chain).contains("leftmost"), "{}", g(&chain));
        assert!(g("root ::= \"x\"{5,1}").contains("minimum above its maximum"));
        assert!(g("root ::= \"x\"{0,100000}").contains("limit 1000"));
        assert!(g("root ::= [^\\x00-\\U0010FFFF]").contains("admits no finite text"));
        assert!(g("root ::= undefined-rule").contains("rule \"undefined-rule\" is used but never defined"));
        assert!(g("start ::= \"a\"").contains("no root rule"));
        assert!(g("root ::= root \"a\" | \"b\"").contains("left-recursive"));
        assert!(g("root ::= \"a\" root").contains("admits no finite text"));
        assert!(g(&format!("root ::= \"{}\"", "a".repeat(1 << 20))).contains("limit is 65536"));
        assert!(g("root ::= <secret-token>").contains("not supported"));
    }

    #[test]
    fn hostile_schemas_are_refused_quickly() {
        let s = |text: &str| refused(Some(text), None, None);
        assert!(s(r#"{"type": "string", "minLength": 10, "maxLength": 2}"#).contains("minLength is above maxLength"));
        assert!(s(r#"{"type": "string", "minLength": 100000000}"#).contains("limit 1000"));
        assert!(s(r#"{"type": "integer", "minimum": 10, "exclusiveMaximum": 10}"#).contains("admits no value"));
        let props =
            |n: usize| (0..n).map(|i| format!("\"p{i}\": {{\"type\": \"string\"}}")).collect::<Vec<_>>().join(",");
        assert!(s(&format!(r#"{{"type": "object", "properties": {{{}}}}}"#, props(5000))).contains("bytes"));
        assert!(
            s(&format!(r#"{{"type": "object", "properties": {{{}}}}}"#, props(1000))).contains("properties in all")
        );
        let nest = |n: usize| format!("{}{{}}{}", r#"{"items": "#.repeat(n), "}".repeat(n));
        assert!(s(&nest(1000)).contains("not JSON"));
        assert!(s(&nest(100)).contains("deeper than 32"));
        let values = |n: usize| (0..n).map(|i| i.to_string()).collect::<Vec<_>>().join(",");
        assert!(s(&format!(r#"{{"enum": [{}]}}"#, values(100_000))).contains("bytes"));
        assert!(s(&format!(r#"{{"enum": [{}]}}"#, values(1000))).contains("more than 256 values"));
        let tool = r#"[{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
            "properties": {"s": {"type": "string", "minLength": 9, "maxLength": 3}}}}}]"#;
        assert!(refused(None, None, Some(tool)).contains("tools[0].function.parameters is refused"));
        let many: Vec<String> = (0..40)
            .map(|t| {
                format!(
                    r#"{{"type": "function", "function": {{"name": "f{t}", "parameters": {{"type": "object", "properties": {{{}}}}}}}}}"#,
                    props(10)
                )
            })
            .collect();
        assert!(refused(None, None, Some(&format!("[{}]", many.join(",")))).contains("properties in all"));
    }

    #[test]
    fn converter_output_passes_the_checker() {
        let optional: String =
            (0..256).map(|i| format!("\"o{i}\": {{\"type\": \"integer\"}}")).collect::<Vec<_>>().join(",");
        for schema in [
            r#"{"type": "object", "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 100},
                "age": {"type": "integer", "minimum": 0, "maximum": 150},
                "email": {"type": "string", "format": "email"},
                "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 10},
                "role": {"enum": ["admin", "user", "guest"]},
                "born": {"type": "string", "format": "date"},
                "id": {"type": "string", "format": "uuid"},
                "score": {"type": "number", "exclusiveMinimum": 0},
                "nick": {"type": ["string", "null"]}},
               "required": ["name", "age"], "additionalProperties": false}"#,
            r##"{"$defs": {"node": {"type": "object", "properties": {"value": {"type": "integer", "minimum": -5000},
                "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}, "required": ["value"]}},
               "$ref": "#/$defs/node"}"##,
            r#"{"anyOf": [{"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3,5}(x|y)?$"}, {"type": "boolean"},
                {"type": "array", "prefixItems": [{"type": "integer"}, {"const": "k"}]}]}"#,
            r#"{"type": "object", "additionalProperties": {"type": "number"}, "properties": {"fixed": {"type": "null"}}}"#,
            r#"{"type": "object"}"#,
            r#"{}"#,
            &format!(r#"{{"type": "object", "properties": {{{optional}}}}}"#),
        ] {
            let t = std::time::Instant::now();
            let s = Structure::parse(Some(schema), None, None, None).unwrap_or_else(|e| panic!("{e}: {schema}"));
            let g = s.unwrap().grammar.unwrap();
            assert_eq!(gbnf::check(&g), Ok(()));
            assert!(t.elapsed() < std::time::Duration::from_secs(2), "{:?}", t.elapsed());
        }
        for (tools, choice) in [(WEATHER, "auto"), (WEATHER, "required")] {
            let s = Structure::parse(None, None, Some(tools), Some(choice)).unwrap().unwrap();
            assert_eq!(gbnf::check(s.grammar().unwrap()), Ok(()));
        }
        let two = r#"[{"type": "function", "function": {"name": "a", "parameters": {"type": "object",
            "properties": {"q": {"type": "string", "maxLength": 200}, "n": {"type": "integer"}}, "required": ["q"]}}},
            {"type": "function", "function": {"name": "b"}}]"#;
        assert!(Structure::parse(None, None, Some(two), Some("auto")).unwrap().unwrap().grammar().is_some());
    }
}
