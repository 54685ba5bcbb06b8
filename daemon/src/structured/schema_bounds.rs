//! Bounds and satisfiability checks on a JSON Schema, run before llama.cpp's converter
//! (common/json-schema.cpp builds the schema tree, common/json-schema-to-grammar.cpp writes
//! GBNF).
//!
//! The converter copies the whole schema once per entry of a `type` array (so nesting those
//! multiplies), writes `minLength`/`minItems`/`maxLength`/`maxItems` as GBNF repetitions that
//! llama.cpp expands into rule copies, writes `x{m,n}` with m > n for `minLength > maxLength`
//! (llama.cpp then loops making rules until memory runs out), negates integer bounds in
//! int64 arithmetic, recurses once per character of a property name (`_not_strings`) and
//! once per optional property, and logs a pattern it cannot translate. The limits below keep
//! all of that small; what passes still goes through the GBNF checker as the grammar made.
//!
//! Paths in messages are JSON pointers with each segment cut to 32 characters and anything
//! but `[A-Za-z0-9_.-]` shown as `?`, so an app's text is not echoed.

use serde_json::{Map, Value as Json};

/// Largest schema text.
pub const MAX_BYTES: usize = 64 * 1024;
/// Deepest JSON nesting of a schema document (the converter and both JSON parsers recurse).
pub const MAX_DEPTH: usize = 32;
/// Most subschemas, counting the copies the converter makes for each `type` array entry.
pub const MAX_SUBSCHEMAS: u64 = 1024;
/// Most properties, over all objects of a request.
pub const MAX_PROPERTIES: usize = 256;
/// Most values of one `enum`, and of all of them in a request.
pub const MAX_ENUM: usize = 256;
pub const MAX_ENUM_TOTAL: usize = 1024;
/// Largest `minLength`/`maxLength`/`minItems`/`maxItems` (and `{m,n}` in a pattern): each
/// becomes a GBNF repetition, which llama.cpp expands.
pub const MAX_COUNT: u64 = 1000;
/// Most `$ref`s in a request.
pub const MAX_REFS: usize = 64;
/// Longest property name (the converter's `_not_strings` recurses once per character).
pub const MAX_NAME_BYTES: usize = 256;
/// Longest pattern, and its deepest group nesting.
pub const MAX_PATTERN_BYTES: usize = 512;
pub const MAX_PATTERN_DEPTH: usize = 16;
/// Largest integer bound: the converter writes integer ranges digit by digit in int64.
pub const MAX_INTEGER_BOUND: f64 = 1e15;

const SEGMENT_CHARS: usize = 32;

/// Why a schema is refused. `at` is a sanitized JSON pointer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    #[error("the schema is {len} bytes; the limit is {MAX_BYTES}")]
    TooLong { len: usize },
    #[error("the schema nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("the schema has more than {MAX_SUBSCHEMAS} subschemas (each \"type\" list entry counts its subtree again)")]
    TooManySubschemas,
    #[error("the schemas have more than {MAX_PROPERTIES} properties in all")]
    TooManyProperties,
    #[error("a property name at {at} is longer than {MAX_NAME_BYTES} bytes")]
    NameTooLong { at: String },
    #[error("the enum at {at} has more than {MAX_ENUM} values")]
    EnumTooLarge { at: String },
    #[error("the enums have more than {MAX_ENUM_TOTAL} values in all")]
    TooManyEnumValues,
    #[error("the schemas have more than {MAX_REFS} $refs")]
    TooManyRefs,
    #[error("{key} at {at} is above the limit {MAX_COUNT}")]
    CountTooLarge { at: String, key: &'static str },
    #[error("{key} at {at} is beyond ±{MAX_INTEGER_BOUND:e}, the limit for integer bounds")]
    BoundTooLarge { at: String, key: &'static str },
    #[error("the schema at {at} admits no value: {why}")]
    Unsatisfiable { at: String, why: &'static str },
    #[error("the pattern at {at} is refused: {why}")]
    Pattern { at: String, why: &'static str },
}

type Res<T> = Result<T, SchemaError>;

/// Totals over all schemas of one request (a `json_schema`, or all tools' parameters).
#[derive(Debug, Default)]
pub struct Budget {
    properties: usize,
    enum_values: usize,
    refs: usize,
}

/// Checks the text size, before parsing.
pub fn check_text(text: &str) -> Res<()> {
    if text.len() > MAX_BYTES { Err(SchemaError::TooLong { len: text.len() }) } else { Ok(()) }
}

/// Checks the nesting depth of a parsed document, before anything recursive walks it.
pub fn check_depth(value: &Json) -> Res<()> {
    let mut stack = vec![(value, 1usize)];
    while let Some((v, depth)) = stack.pop() {
        if depth > MAX_DEPTH {
            return Err(SchemaError::TooDeep);
        }
        match v {
            Json::Array(a) => stack.extend(a.iter().map(|c| (c, depth + 1))),
            Json::Object(m) => stack.extend(m.values().map(|c| (c, depth + 1))),
            _ => {}
        }
    }
    Ok(())
}

/// Checks a schema (already depth-checked and valid against the meta-schema).
pub fn check(schema: &Json, budget: &mut Budget) -> Res<()> {
    let mut path = Vec::new();
    walk(schema, &mut path, budget)?;
    Ok(())
}

fn pointer(path: &[String]) -> String {
    let mut out = String::from("#");
    for seg in path {
        out.push('/');
        for (n, c) in seg.chars().enumerate() {
            if n == SEGMENT_CHARS {
                out.push('…');
                break;
            }
            out.push(if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') { c } else { '?' });
        }
    }
    out
}

/// Keywords whose value is a map of subschemas.
const MAP_KEYS: [&str; 5] = ["properties", "patternProperties", "$defs", "definitions", "dependentSchemas"];
/// Keywords whose value is a subschema or a list of them.
const SCHEMA_KEYS: [&str; 15] = [
    "items",
    "prefixItems",
    "allOf",
    "anyOf",
    "oneOf",
    "additionalProperties",
    "not",
    "if",
    "then",
    "else",
    "contains",
    "propertyNames",
    "unevaluatedProperties",
    "unevaluatedItems",
    "additionalItems",
];

/// Checks one schema and its subschemas; returns its size as the converter will see it.
fn walk(schema: &Json, path: &mut Vec<String>, budget: &mut Budget) -> Res<u64> {
    let Json::Object(m) = schema else { return Ok(1) };
    check_node(m, path, budget)?;
    let mut children: u64 = 0;
    for key in MAP_KEYS {
        if let Some(Json::Object(sub)) = m.get(key) {
            for (name, s) in sub {
                path.push(key.to_owned());
                path.push(name.clone());
                let r = walk(s, path, budget);
                path.truncate(path.len() - 2);
                children = children.saturating_add(r?);
            }
        }
    }
    for key in SCHEMA_KEYS {
        match m.get(key) {
            Some(Json::Array(list)) => {
                for (i, s) in list.iter().enumerate() {
                    path.push(key.to_owned());
                    path.push(i.to_string());
                    let r = walk(s, path, budget);
                    path.truncate(path.len() - 2);
                    children = children.saturating_add(r?);
                }
            }
            Some(s @ Json::Object(_)) => {
                path.push(key.to_owned());
                let r = walk(s, path, budget);
                path.pop();
                children = children.saturating_add(r?);
            }
            _ => {}
        }
    }
    // json-schema.cpp's build_node rebuilds the whole subtree for each entry of a type list.
    let copies = match m.get("type") {
        Some(Json::Array(types)) => types.len().max(1) as u64,
        _ => 1,
    };
    let size = copies.saturating_mul(children.saturating_add(1));
    if size > MAX_SUBSCHEMAS {
        return Err(SchemaError::TooManySubschemas);
    }
    Ok(size)
}

fn number(m: &Map<String, Json>, key: &str) -> Option<f64> {
    m.get(key).and_then(Json::as_f64)
}

fn has_type(m: &Map<String, Json>, name: &str) -> bool {
    match m.get("type") {
        Some(Json::String(t)) => t == name,
        Some(Json::Array(list)) => list.iter().any(|t| t.as_str() == Some(name)),
        _ => false,
    }
}

fn check_node(m: &Map<String, Json>, path: &[String], budget: &mut Budget) -> Res<()> {
    let at = || pointer(path);
    let unsat = |why| SchemaError::Unsatisfiable { at: pointer(path), why };

    if let Some(Json::Object(props)) = m.get("properties") {
        budget.properties += props.len();
        if budget.properties > MAX_PROPERTIES {
            return Err(SchemaError::TooManyProperties);
        }
        if props.keys().any(|k| k.len() > MAX_NAME_BYTES) {
            return Err(SchemaError::NameTooLong { at: at() });
        }
    }
    if let Some(Json::Array(values)) = m.get("enum") {
        if values.len() > MAX_ENUM {
            return Err(SchemaError::EnumTooLarge { at: at() });
        }
        budget.enum_values += values.len();
        if budget.enum_values > MAX_ENUM_TOTAL {
            return Err(SchemaError::TooManyEnumValues);
        }
    }
    if m.contains_key("$ref") {
        budget.refs += 1;
        if budget.refs > MAX_REFS {
            return Err(SchemaError::TooManyRefs);
        }
    }

    // Counts. Non-numbers are left to the meta-schema check (which runs first).
    for (lo, hi, bounded) in
        [("minLength", "maxLength", true), ("minItems", "maxItems", true), ("minProperties", "maxProperties", false)]
    {
        let (min, max) = (number(m, lo), number(m, hi));
        for (key, v) in [(lo, min), (hi, max)] {
            if bounded && v.is_some_and(|v| v > MAX_COUNT as f64) {
                return Err(SchemaError::CountTooLarge { at: at(), key });
            }
        }
        if let (Some(min), Some(max)) = (min, max)
            && min > max
        {
            return Err(unsat(match lo {
                "minLength" => "minLength is above maxLength",
                "minItems" => "minItems is above maxItems",
                _ => "minProperties is above maxProperties",
            }));
        }
    }

    // Numeric ranges, with the exclusive forms.
    let (min, max) = (number(m, "minimum"), number(m, "maximum"));
    let (xmin, xmax) = (number(m, "exclusiveMinimum"), number(m, "exclusiveMaximum"));
    if let (Some(a), Some(b)) = (min, max)
        && a > b
    {
        return Err(unsat("minimum is above maximum"));
    }
    for (a, b) in [(xmin, max), (min, xmax), (xmin, xmax)] {
        if let (Some(a), Some(b)) = (a, b)
            && a >= b
        {
            return Err(unsat("the exclusive bounds leave no number"));
        }
    }
    if has_type(m, "integer") {
        for (key, v) in [("minimum", min), ("maximum", max), ("exclusiveMinimum", xmin), ("exclusiveMaximum", xmax)] {
            if v.is_some_and(|v| v.abs() > MAX_INTEGER_BOUND) {
                return Err(SchemaError::BoundTooLarge { at: at(), key });
            }
        }
        let lo = [min.map(f64::ceil), xmin.map(|x| x.floor() + 1.0)].into_iter().flatten().reduce(f64::max);
        let hi = [max.map(f64::floor), xmax.map(|x| x.ceil() - 1.0)].into_iter().flatten().reduce(f64::min);
        if let (Some(lo), Some(hi)) = (lo, hi)
            && lo > hi
        {
            return Err(unsat("no integer lies between the bounds"));
        }
    }

    // Objects: what `required`, `properties` and `additionalProperties: false` leave.
    let props = match m.get("properties") {
        Some(Json::Object(p)) => Some(p),
        _ => None,
    };
    let closed = m.get("additionalProperties") == Some(&Json::Bool(false)) && !m.contains_key("patternProperties");
    let mut required: Vec<&str> =
        m.get("required").and_then(Json::as_array).into_iter().flatten().filter_map(Json::as_str).collect();
    required.sort_unstable();
    required.dedup();
    if closed {
        let known = |name: &str| props.is_some_and(|p| p.contains_key(name));
        if !required.iter().all(|r| known(r)) {
            return Err(unsat("a required property is not in properties and additionalProperties is false"));
        }
        if number(m, "minProperties").is_some_and(|n| n > props.map_or(0, Map::len) as f64) {
            return Err(unsat("minProperties is above the number of properties allowed"));
        }
    }
    if number(m, "maxProperties").is_some_and(|n| n < required.len() as f64) {
        return Err(unsat("more properties are required than maxProperties allows"));
    }

    if let Some(Json::String(p)) = m.get("pattern") {
        check_pattern(p).map_err(|why| SchemaError::Pattern { at: at(), why })?;
    }
    Ok(())
}

/// The parts of the converter's `_pattern_to_rule` that would log the pattern (unanchored,
/// unsupported group syntax, inner anchors) or expand it (repetition counts, nesting).
fn check_pattern(p: &str) -> Result<(), &'static str> {
    if p.len() > MAX_PATTERN_BYTES {
        return Err("it is longer than 512 bytes");
    }
    let inner = p.strip_prefix('^').and_then(|s| s.strip_suffix('$')).ok_or("it must start with ^ and end with $")?;
    let b = inner.as_bytes();
    let (mut i, mut depth) = (0, 0usize);
    while i < b.len() {
        match b[i] {
            b'\\' => i += 1,
            b'[' => {
                i += 1;
                while i < b.len() && b[i] != b']' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'(' => {
                depth += 1;
                if depth > MAX_PATTERN_DEPTH {
                    return Err("groups nest deeper than 16");
                }
                if b.get(i + 1) == Some(&b'?') && b.get(i + 2) != Some(&b':') {
                    return Err("only (?: groups are supported");
                }
            }
            b')' => depth = depth.saturating_sub(1),
            b'^' | b'$' => return Err("anchors are only supported at the ends"),
            b'{' => {
                let end = b[i..].iter().position(|&c| c == b'}').ok_or("unterminated {")? + i;
                let body = &inner[i + 1..end];
                let mut bounds = body.split(',').map(|s| s.trim());
                let parse = |s: &str| if s.is_empty() { Ok(None) } else { s.parse::<u64>().map(Some) };
                let min = bounds.next().map(parse).transpose().ok().flatten().flatten();
                let max = bounds.next().map(parse).transpose().ok().flatten().flatten();
                if min.is_some_and(|v| v > MAX_COUNT) || max.is_some_and(|v| v > MAX_COUNT) {
                    return Err("a repetition count is above 1000");
                }
                if let (Some(a), Some(b)) = (min, max)
                    && a > b
                {
                    return Err("a repetition has its minimum above its maximum");
                }
                i = end;
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn refused(schema: &Json) -> SchemaError {
        let t = std::time::Instant::now();
        let e = check_depth(schema).and_then(|()| check(schema, &mut Budget::default())).expect_err("refused");
        assert!(t.elapsed() < std::time::Duration::from_millis(100), "took {:?}", t.elapsed());
        e
    }

    #[test]
    fn unsatisfiable_and_oversized_schemas_are_refused() {
        let r = |s: Json| refused(&s);
        assert!(matches!(
            r(json!({"type": "string", "minLength": 5, "maxLength": 1})),
            SchemaError::Unsatisfiable { .. }
        ));
        assert!(matches!(r(json!({"type": "array", "minItems": 3, "maxItems": 2})), SchemaError::Unsatisfiable { .. }));
        assert!(matches!(
            r(json!({"type": "object", "minProperties": 3, "maxProperties": 2})),
            SchemaError::Unsatisfiable { .. }
        ));
        assert!(matches!(r(json!({"type": "integer", "minimum": 3, "maximum": 2})), SchemaError::Unsatisfiable { .. }));
        assert!(matches!(
            r(json!({"type": "number", "exclusiveMinimum": 2, "maximum": 2})),
            SchemaError::Unsatisfiable { .. }
        ));
        assert!(matches!(
            r(json!({"type": "integer", "exclusiveMinimum": 1, "exclusiveMaximum": 2})),
            SchemaError::Unsatisfiable { .. }
        ));
        assert!(matches!(
            r(json!({"type": "integer", "minimum": -9.3e18})),
            SchemaError::BoundTooLarge { key: "minimum", .. }
        ));
        assert!(matches!(r(json!({"type": "string", "minLength": 1_000_000})), SchemaError::CountTooLarge { .. }));
        assert!(matches!(r(json!({"type": "array", "maxItems": 5000})), SchemaError::CountTooLarge { .. }));
        assert!(matches!(
            r(json!({"type": "object", "properties": {"a": {}}, "required": ["b"], "additionalProperties": false})),
            SchemaError::Unsatisfiable { .. }
        ));
        assert!(matches!(
            r(json!({"type": "object", "required": ["a", "b"], "maxProperties": 1})),
            SchemaError::Unsatisfiable { .. }
        ));
        let props: Map<String, Json> = (0..5000).map(|i| (format!("p{i}"), json!({"type": "string"}))).collect();
        assert_eq!(r(json!({"type": "object", "properties": props})), SchemaError::TooManyProperties);
        let mut deep = json!({"type": "string"});
        for _ in 0..1000 {
            deep = json!({"type": "array", "items": deep});
        }
        assert_eq!(r(deep), SchemaError::TooDeep);
        let values: Vec<Json> = (0..100_000).map(Json::from).collect();
        assert!(matches!(r(json!({"enum": values})), SchemaError::EnumTooLarge { .. }));
        let mut typed = json!({"type": "string"});
        for _ in 0..8 {
            typed = json!({"type": ["object", "null", "string"], "properties": {"x": typed}});
        }
        assert_eq!(r(typed), SchemaError::TooManySubschemas);
        assert!(matches!(r(json!({"type": "string", "pattern": "[a-z]+"})), SchemaError::Pattern { .. }));
        assert!(matches!(r(json!({"type": "string", "pattern": "^a{5,1}$"})), SchemaError::Pattern { .. }));
        assert!(matches!(r(json!({"type": "string", "pattern": "^a{0,100000}$"})), SchemaError::Pattern { .. }));
        assert!(matches!(r(json!({"type": "string", "pattern": "^(?=a)$"})), SchemaError::Pattern { .. }));
    }

    #[test]
    fn paths_do_not_echo_app_text() {
        let name = format!("secret\n{}", "x".repeat(100));
        let e = refused(&json!({"properties": {name.clone(): {"type": "string", "minLength": 2, "maxLength": 1}}}));
        let msg = e.to_string();
        assert!(msg.starts_with("the schema at #/properties/secret?xxxxxxxxxxxxxxxxxxxxxxxxx…"), "{msg}");
        assert!(!msg.contains(&name));
    }

    #[test]
    fn realistic_schemas_pass() {
        for s in [
            json!({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 100}},
                   "required": ["n"], "additionalProperties": false}),
            json!({"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 64}, "maxItems": 10}),
            json!({"type": "string", "pattern": "^[A-Z]{2}-[0-9]{1,4}$"}),
            json!({"$defs": {"node": {"type": "object", "properties": {"kids": {"type": "array",
                   "items": {"$ref": "#/$defs/node"}}}}}, "$ref": "#/$defs/node"}),
            json!({"enum": ["red", "green", "blue"]}),
            json!({"type": ["string", "null"]}),
        ] {
            check_depth(&s).unwrap();
            check(&s, &mut Budget::default()).unwrap();
        }
    }
}
