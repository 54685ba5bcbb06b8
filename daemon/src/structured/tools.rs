//! Tool calls: the tools an app lists, how a model is shown them, and what its answer means.
//!
//! Two formats ([`ToolFormat`]):
//! - **constrained**, for every model: a system message lists the functions, and a grammar
//!   lets the answer be either plain text (`auto`) or exactly one call
//!   `{"name": ..., "arguments": {...}}`.
//! - **hermes**, for a model whose own chat template shows tools and calls in `<tool_call>`
//!   blocks (Qwen 2.5 and 3, Hermes, SmolLM3 and their kin): the template renders the tools
//!   and the conversation's earlier calls and results itself (engine/template.rs), and the
//!   grammar lets the answer be plain text or one to [`MAX_CALLS`] blocks
//!   `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`.
//!
//! hearthd parses the tools and makes the grammar rule of one call (llama.cpp's converter,
//! over one schema for "a call of any tool"); the engine picks the format its model supports
//! and composes the grammar around that rule; the outcome says which format ran, and hearthd
//! reads the calls out of the text by it, each call's arguments validated once more.

use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};

use super::{check_bounds, check_depth, check_grammar, compile_schema, invalid, schema_bounds, to_grammar};
use crate::error::Error;

/// Most tools in one request.
const MAX_TOOLS: usize = 64;
/// Largest `tools` text (descriptions included; each parameter schema is bounded on its own).
const MAX_TOOLS_BYTES: usize = 128 * 1024;
/// Most calls in one answer (hermes; the constrained format makes one).
pub const MAX_CALLS: usize = 8;

/// Tool call ids, unique for the daemon's life.
static NEXT_CALL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// What to do with `tools`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

/// How a model is shown tools and writes its calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToolFormat {
    /// Hearth's own, for any model: tools in a system message, a call as a bare JSON object.
    #[default]
    Constrained,
    /// The model's template shows the tools; calls come in `<tool_call>` blocks.
    Hermes,
}

impl ToolFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Constrained => "constrained",
            Self::Hermes => "hermes",
        }
    }
}

/// A tool call: one the model made (ids are hearthd's), or one of an earlier assistant turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments, as a JSON object text.
    pub arguments: String,
}

impl ToolCall {
    /// The call as the constrained format writes it: `{"name": ..., "arguments": {...}}`.
    pub fn constrained_text(&self) -> String {
        let args: Json = serde_json::from_str(&self.arguments).unwrap_or_else(|_| json!({}));
        json!({"name": self.name, "arguments": args}).to_string()
    }
}

/// What the engine needs of a request's tools: the tools themselves for the model's template,
/// the choice, and the grammar rule of one call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolPrompt {
    /// The tools as a JSON array text, each `{"type": "function", "function": {"name",
    /// "description", "parameters"}}`.
    pub tools: String,
    pub choice: ToolChoice,
    /// GBNF rules whose rule `tool-call` is one call object of any of the tools (no root).
    pub call_rules: String,
}

/// Rule names the formats' wrappers define; the converter's rules must not.
const RESERVED_RULES: [&str; 4] = ["hearth-text", "hearth-calls", "hearth-block", "tool-call"];

impl ToolPrompt {
    /// The grammar of an answer in `format`; None for `none` (text, unconstrained).
    pub fn grammar(&self, format: ToolFormat) -> Option<String> {
        let root = match (format, self.choice) {
            (_, ToolChoice::None) => return None,
            (ToolFormat::Constrained, ToolChoice::Required) => "root ::= tool-call\n".to_owned(),
            // Text that does not open with a brace, or a call.
            (ToolFormat::Constrained, ToolChoice::Auto) => {
                "root ::= tool-call | hearth-text\nhearth-text ::= [^{] .*\n".to_owned()
            }
            (ToolFormat::Hermes, choice) => {
                let blocks = format!(
                    "hearth-calls ::= hearth-block (\"\\n\" hearth-block){{0,{}}}\n\
                     hearth-block ::= \"<tool_call>\\n\" tool-call \"\\n</tool_call>\"\n",
                    MAX_CALLS - 1
                );
                match choice {
                    ToolChoice::Required => format!("root ::= hearth-calls\n{blocks}"),
                    _ => format!("root ::= hearth-calls | hearth-text\nhearth-text ::= [^<] .*\n{blocks}"),
                }
            }
        };
        Some(format!("{root}{}", self.call_rules))
    }

    /// The conversation with the tools described the constrained way: appended to the first
    /// system message, or in a new one before everything else.
    pub fn constrained_system(&self, first_system: Option<&str>) -> String {
        let specs: Vec<String> = match serde_json::from_str::<Json>(&self.tools) {
            Ok(Json::Array(tools)) => tools.iter().map(|t| t["function"].to_string()).collect(),
            _ => Vec::new(),
        };
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
        match first_system {
            Some(s) => format!("{s}\n\n{text}"),
            None => text,
        }
    }
}

#[derive(Debug)]
pub(super) struct Tool {
    name: String,
    /// The tool as the model sees it (name, description, parameters).
    spec: Json,
    parameters: jsonschema::Validator,
}

/// The tools of a request, checked, with what the engine needs of them.
#[derive(Debug)]
pub(super) struct Tools {
    list: Vec<Tool>,
    pub prompt: ToolPrompt,
}

impl Tools {
    pub fn parse(text: &str, choice: ToolChoice) -> Result<Self, Error> {
        let list = parse_tools(text)?;
        let converted = to_grammar("tools", &calls_schema(&list)?)?;
        // The converter's start rule becomes `tool-call`, which each format's root uses.
        let mut call_rules = String::with_capacity(converted.len() + 16);
        for line in converted.lines() {
            let (name, rest) = line.split_once("::=").map_or(("", line), |(n, r)| (n.trim(), r));
            if name == "root" {
                call_rules.push_str(&format!("tool-call ::={rest}\n"));
            } else if RESERVED_RULES.contains(&name) {
                return Err(invalid(format!(
                    "tools: their grammar would define the rule {name:?}, which is hearthd's"
                )));
            } else {
                call_rules.push_str(line);
                call_rules.push('\n');
            }
        }
        let tools = Json::Array(list.iter().map(|t| json!({"type": "function", "function": t.spec})).collect());
        let prompt = ToolPrompt { tools: tools.to_string(), choice, call_rules };
        // Every format's grammar is checked here, whichever the model's engine picks.
        for format in [ToolFormat::Constrained, ToolFormat::Hermes] {
            if let Some(g) = prompt.grammar(format) {
                check_grammar("tools", &g)?;
            }
        }
        Ok(Self { list, prompt })
    }

    /// The tool calls in a finished answer written in `format`: the calls, when the text is
    /// nothing but calls of known tools with arguments that validate; none otherwise (plain
    /// text, or a call cut off by max_tokens).
    pub fn calls(&self, text: &str, format: ToolFormat) -> Vec<ToolCall> {
        if self.prompt.choice == ToolChoice::None {
            return Vec::new();
        }
        let objects = match format {
            ToolFormat::Constrained => serde_json::from_str::<Json>(text.trim()).ok().map(|c| vec![c]),
            ToolFormat::Hermes => hermes_blocks(text),
        };
        let Some(objects) = objects else { return Vec::new() };
        let mut calls = Vec::with_capacity(objects.len());
        for call in objects {
            let (Some(Json::String(name)), Some(args)) = (call.get("name"), call.get("arguments")) else {
                return Vec::new();
            };
            match self.list.iter().find(|t| &t.name == name) {
                Some(tool) if args.is_object() && tool.parameters.is_valid(args) => {
                    let n = NEXT_CALL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    calls.push(ToolCall { id: format!("call_{n}"), name: name.clone(), arguments: args.to_string() });
                }
                _ => return Vec::new(),
            }
        }
        calls
    }
}

/// The JSON objects of a text that is one or more `<tool_call>` blocks and nothing else.
fn hermes_blocks(text: &str) -> Option<Vec<Json>> {
    const OPEN: &str = "<tool_call>";
    const CLOSE: &str = "</tool_call>";
    let mut rest = text.trim();
    let mut out = Vec::new();
    while !rest.is_empty() && out.len() < MAX_CALLS {
        let body = rest.strip_prefix(OPEN)?;
        let end = body.find(CLOSE)?;
        out.push(serde_json::from_str(body[..end].trim()).ok()?);
        rest = body[end + CLOSE.len()..].trim_start();
    }
    (rest.is_empty() && !out.is_empty()).then_some(out)
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
            .filter(|n| is_tool_name(n))
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

/// Whether `name` is a tool (or call id) name Hearth takes: 1-64 of `[A-Za-z0-9_-]`.
pub fn is_tool_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// One schema for "a call of any of the tools". Each tool's definitions (`$defs`,
/// `definitions`) move to the root under names of its own (`t<i>-<name>`), and its `$ref`s
/// with them, since its parameters are no longer the root their references start from.
fn calls_schema(tools: &[Tool]) -> Result<Json, Error> {
    let mut defs = serde_json::Map::new();
    let mut calls = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        let prefix = format!("t{i}-");
        let mut parameters = t.spec["parameters"].clone();
        rebase_refs(&mut parameters, &prefix, i)?;
        if let Some(p) = parameters.as_object_mut() {
            for key in ["$defs", "definitions"] {
                if let Some(Json::Object(d)) = p.remove(key) {
                    defs.extend(d.into_iter().map(|(name, def)| (format!("{prefix}{name}"), def)));
                }
            }
        }
        calls.push(json!({
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": parameters},
            "required": ["name", "arguments"],
            "additionalProperties": false,
        }));
    }
    let mut schema = if calls.len() == 1 { calls.remove(0) } else { json!({ "anyOf": calls }) };
    if !defs.is_empty() {
        schema["$defs"] = Json::Object(defs);
    }
    Ok(schema)
}

/// Points tool `i`'s local references at its definitions' new names.
fn rebase_refs(v: &mut Json, prefix: &str, i: usize) -> Result<(), Error> {
    match v {
        Json::Object(o) => {
            if let Some(Json::String(r)) = o.get_mut("$ref") {
                let name = r.strip_prefix("#/$defs/").or_else(|| r.strip_prefix("#/definitions/"));
                match name {
                    Some(name) => *r = format!("#/$defs/{prefix}{name}"),
                    None => {
                        return Err(invalid(format!(
                            "tools[{i}].function.parameters: $ref {r:?} is not supported (only #/$defs/... and #/definitions/...)"
                        )));
                    }
                }
            }
            o.values_mut().try_for_each(|c| rebase_refs(c, prefix, i))
        }
        Json::Array(a) => a.iter_mut().try_for_each(|c| rebase_refs(c, prefix, i)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::structured::Structure;
    use crate::structured::tests::WEATHER;

    fn weather(choice: &str) -> Structure {
        Structure::parse(None, None, Some(WEATHER), Some(choice)).unwrap().unwrap()
    }

    #[test]
    fn constrained_calls_are_recognised_and_validated() {
        let s = weather("auto");
        let p = s.tool_prompt().unwrap();
        let g = p.grammar(ToolFormat::Constrained).unwrap();
        assert!(g.starts_with("root ::= tool-call | hearth-text"), "{g}");
        assert!(g.contains("tool-call ::="), "{g}");
        assert!(!g.contains("\nroot ::= {"), "the converter's root was renamed: {g}");
        let calls =
            s.tool_calls(r#" {"name": "get_weather", "arguments": {"city": "Paris"}} "#, ToolFormat::Constrained);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].name, "get_weather");
        assert_eq!(serde_json::from_str::<Json>(&calls[0].arguments).unwrap(), json!({"city": "Paris"}));
        let none = |text: &str| s.tool_calls(text, ToolFormat::Constrained).is_empty();
        assert!(none(r#"{"name": "get_weather", "arguments": {}}"#), "city is required");
        assert!(none(r#"{"name": "launch", "arguments": {}}"#));
        assert!(none("It is sunny."));
        // A constrained answer is not read as hermes blocks, nor the other way round.
        assert!(
            s.tool_calls(r#"{"name": "get_weather", "arguments": {"city": "Paris"}}"#, ToolFormat::Hermes).is_empty()
        );
        let sys = p.constrained_system(Some("Be brief."));
        assert!(sys.starts_with("Be brief.\n\n") && sys.contains("get_weather") && sys.contains("reply with only"));
        assert!(weather("none").tool_prompt().unwrap().grammar(ToolFormat::Constrained).is_none());
        assert!(
            weather("required")
                .tool_prompt()
                .unwrap()
                .grammar(ToolFormat::Constrained)
                .unwrap()
                .starts_with("root ::= tool-call\n")
        );
    }

    #[test]
    fn hermes_blocks_are_recognised_and_validated() {
        let s = weather("auto");
        let call = |city: &str| {
            format!("<tool_call>\n{{\"name\": \"get_weather\", \"arguments\": {{\"city\": \"{city}\"}}}}\n</tool_call>")
        };
        let calls = s.tool_calls(&call("Paris"), ToolFormat::Hermes);
        assert_eq!((calls.len(), calls[0].name.as_str()), (1, "get_weather"));
        let two = s.tool_calls(&format!("{}\n{}\n", call("Paris"), call("Oslo")), ToolFormat::Hermes);
        assert_eq!(two.len(), 2);
        assert_ne!(two[0].id, two[1].id);
        assert_eq!(serde_json::from_str::<Json>(&two[1].arguments).unwrap(), json!({"city": "Oslo"}));
        let none = |text: &str| s.tool_calls(text, ToolFormat::Hermes).is_empty();
        // Text around the blocks, a block cut off, an invalid call among valid ones, too many.
        assert!(none(&format!("Sure! {}", call("Paris"))));
        assert!(none(&format!("{} and more", call("Paris"))));
        assert!(none("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Par"));
        assert!(none(&format!(
            "{}\n<tool_call>\n{{\"name\": \"get_weather\", \"arguments\": {{}}}}\n</tool_call>",
            call("Paris")
        )));
        assert!(none(&vec![call("Paris"); MAX_CALLS + 1].join("\n")));
        assert_eq!(s.tool_calls(&vec![call("Paris"); MAX_CALLS].join("\n"), ToolFormat::Hermes).len(), MAX_CALLS);
        assert!(none(""));
        assert!(weather("none").tool_calls(&call("Paris"), ToolFormat::Hermes).is_empty());
        let g = |choice: &str| weather(choice).tool_prompt().unwrap().grammar(ToolFormat::Hermes).unwrap();
        assert!(g("required").starts_with("root ::= hearth-calls\n"), "{}", g("required"));
        assert!(g("auto").starts_with("root ::= hearth-calls | hearth-text\n"), "{}", g("auto"));
        assert!(g("auto").contains(&format!("{{0,{}}}", MAX_CALLS - 1)));
    }

    #[test]
    fn tools_definitions_and_references_survive_being_combined() {
        // Two tools with definitions of the same name, one named like a wrapper rule: each
        // tool's references keep pointing at its own.
        let tools = r##"[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object",
             "$defs": {"hearth-text": {"type": "integer"}}, "properties": {"a": {"$ref": "#/$defs/hearth-text"}},
             "required": ["a"]}}},
            {"type": "function", "function": {"name": "g", "parameters": {"type": "object",
             "definitions": {"hearth-text": {"type": "boolean"}}, "properties": {"b": {"$ref": "#/definitions/hearth-text"}},
             "required": ["b"]}}}]"##;
        let s = Structure::parse(None, None, Some(tools), None).unwrap().unwrap();
        for format in [ToolFormat::Constrained, ToolFormat::Hermes] {
            let g = s.tool_prompt().unwrap().grammar(format).unwrap();
            assert_eq!(g.lines().filter(|l| l.starts_with("hearth-text ::=")).count(), 1, "{g}");
            assert_eq!(crate::structured::gbnf::check(&g), Ok(()));
        }
        let calls = s.tool_calls(r#"{"name": "f", "arguments": {"a": 3}}"#, ToolFormat::Constrained);
        assert_eq!(calls.len(), 1);
        assert!(s.tool_calls(r#"{"name": "g", "arguments": {"b": 3}}"#, ToolFormat::Constrained).is_empty());
        // A reference outside the tool's definitions is refused, saying so.
        let outside = r##"[{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"$ref": "#/properties/a"}}}}}]"##;
        match Structure::parse(None, None, Some(outside), None) {
            Err(Error::InvalidArgs(m)) => assert!(m.contains("is not supported"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}
