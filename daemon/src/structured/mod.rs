//! Structured output and tool calls.
//!
//! - `json_schema`: the schema is checked against its meta-schema (the `jsonschema` crate,
//!   which names what is wrong), turned into a GBNF grammar by llama.cpp's own converter, and
//!   the output is validated against it when the generation ends.
//! - `grammar`: GBNF given directly.
//! - `tools` (OpenAI's format: `[{"type": "function", "function": {"name", "description",
//!   "parameters"}}]`) with `tool_choice` (`auto`, `required`, `none`): see [`tools`]. A call
//!   is returned as structured data in `Finished` (`tool_calls`), its arguments validated
//!   once more.
//!
//! Every grammar, given or made, passes [`gbnf::check`] before llama.cpp sees it, and every
//! schema passes [`schema_bounds`] before llama.cpp's converter does: both run inside the
//! daemon on an app's text, and their failure modes are aborts, stack overflows and unbounded
//! memory, not errors.

mod gbnf;
mod schema_bounds;
mod tools;

pub use tools::{MAX_CALLS, ToolCall, ToolChoice, ToolFormat, ToolPrompt, is_tool_name};

use serde_json::Value as Json;

use crate::error::Error;

/// How a request's output is constrained; shared by the engine (grammar, prompt) and the
/// service (what the finished text means).
#[derive(Debug)]
pub struct Structure {
    grammar: Option<String>,
    schema: Option<jsonschema::Validator>,
    tools: Option<tools::Tools>,
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
            return Ok(Some(Self { grammar: Some(grammar), schema: Some(validator), tools: None }));
        }
        if let Some(g) = grammar {
            if g.trim().is_empty() {
                return Err(invalid("grammar is empty"));
            }
            check_grammar("grammar", g)?;
            return Ok(Some(Self { grammar: Some(g.to_owned()), schema: None, tools: None }));
        }
        let Some(text) = tools else { return Ok(None) };
        Ok(Some(Self { grammar: None, schema: None, tools: Some(tools::Tools::parse(text, choice)?) }))
    }

    /// The GBNF grammar of `json_schema` or `grammar` (tools' grammars depend on the model's
    /// format: [`ToolPrompt::grammar`]).
    pub fn grammar(&self) -> Option<&str> {
        self.grammar.as_deref()
    }

    /// What the engine needs of the request's tools, if it has some.
    pub fn tool_prompt(&self) -> Option<&ToolPrompt> {
        self.tools.as_ref().map(|t| &t.prompt)
    }

    /// Whether `text` validates against the request's `json_schema` (None without one).
    pub fn schema_valid(&self, text: &str) -> Option<bool> {
        let schema = self.schema.as_ref()?;
        Some(serde_json::from_str::<Json>(text).is_ok_and(|v| schema.is_valid(&v)))
    }

    /// The tool calls in a finished answer written in `format` ([`tools::Tools::calls`]).
    pub fn tool_calls(&self, text: &str, format: ToolFormat) -> Vec<ToolCall> {
        self.tools.as_ref().map_or_else(Vec::new, |t| t.calls(text, format))
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(super) const WEATHER: &str = r#"[{"type": "function", "function": {"name": "get_weather",
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
            for format in [ToolFormat::Constrained, ToolFormat::Hermes] {
                assert_eq!(gbnf::check(&s.tool_prompt().unwrap().grammar(format).unwrap()), Ok(()));
            }
        }
        let two = r#"[{"type": "function", "function": {"name": "a", "parameters": {"type": "object",
            "properties": {"q": {"type": "string", "maxLength": 200}, "n": {"type": "integer"}}, "required": ["q"]}}},
            {"type": "function", "function": {"name": "b"}}]"#;
        let s = Structure::parse(None, None, Some(two), Some("auto")).unwrap().unwrap();
        assert!(s.grammar().is_none() && s.tool_prompt().unwrap().grammar(ToolFormat::Hermes).is_some());
    }
}
