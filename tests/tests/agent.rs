//! Agent building blocks against the real daemon and model: structured output (JSON Schema,
//! GBNF), tool calls with a round trip, and embeddings.

use std::collections::HashMap;
use std::time::Duration;

use hearth_dbus::{Generation, messages_value, request_key as key, result_key};
use hearth_tests::{Bus, Daemon, ResultDict, chat_request, collect, hearth, result_str};
use serde_json::{Value as Json, json};
use zbus::{OwnedVariant, Variant};

const PERSON: &str = r#"{
  "type": "object",
  "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 24},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 3},
    "pet": {"enum": ["cat", "dog", "none"]}
  },
  "required": ["name", "age", "hobbies", "pet"],
  "additionalProperties": false
}"#;

const TOOLS: &str = r#"[
  {"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city",
   "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                  "required": ["city"], "additionalProperties": false}}},
  {"type": "function", "function": {"name": "set_alarm", "description": "Set an alarm clock",
   "parameters": {"type": "object", "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23},
                                                  "minute": {"type": "integer", "minimum": 0, "maximum": 59}},
                  "required": ["hour", "minute"], "additionalProperties": false}}}
]"#;

fn with<'a>(mut r: HashMap<&'a str, Variant<'a>>, k: &'a str, v: &str) -> HashMap<&'a str, Variant<'a>> {
    r.insert(k, Variant::from(v.to_owned()));
    r
}

fn error_name(e: &hearth_dbus::Error) -> String {
    e.dbus_name()
}

fn tool_calls(result: &ResultDict) -> Vec<HashMap<String, OwnedVariant>> {
    result
        .get(result_key::TOOL_CALLS)
        .map(|v| Vec::<HashMap<String, OwnedVariant>>::try_from(v.try_clone().unwrap()).expect("aa{sv}"))
        .unwrap_or_default()
}

fn s(d: &HashMap<String, OwnedVariant>, k: &str) -> String {
    <&str>::try_from(d.get(k).unwrap_or_else(|| panic!("no {k}"))).unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_schema_output_always_validates() {
    let bus = Bus::start();
    let _daemon = Daemon::start(&bus).await;
    let conn = bus.connect().await;
    let proxy = hearth(&conn).await;
    let schema: Json = serde_json::from_str(PERSON).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let prompts = [
        "Invent a person who lives by the sea.",
        "Describe a retired teacher.",
        "Make up a character for a children's book.",
        "Who is your favourite chef? Answer as JSON.",
        "Tell me a joke.",
        "Describe a teenager who loves football.",
    ];
    for prompt in prompts {
        let r = with(chat_request(prompt, 200), key::JSON_SCHEMA, PERSON);
        let result = proxy.complete(r).await.unwrap();
        let text = result_str(&result, result_key::TEXT);
        assert_eq!(result_str(&result, result_key::FINISH_REASON), "stop", "{prompt}: {text}");
        let value: Json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{prompt}: {e}: {text}"));
        assert!(validator.is_valid(&value), "{prompt}: {text}");
        assert!(bool::try_from(result.get(result_key::SCHEMA_VALID).unwrap()).unwrap(), "{prompt}: {text}");
        assert_eq!(result_str(&result, result_key::ROUTE), "local");
    }

    // GBNF directly.
    let r = with(chat_request("Is the sky blue?", 8), key::GRAMMAR, r#"root ::= "yes" | "no""#);
    let text = result_str(&proxy.complete(r).await.unwrap(), result_key::TEXT);
    assert!(text == "yes" || text == "no", "{text}");

    // Bad schemas and grammars: InvalidArgs with the reason; the daemon keeps serving.
    let invalid = "org.hearth.Hearth1.Error.InvalidArgs";
    for (k, v, why) in [
        (key::JSON_SCHEMA, "{\"type\": ", "not JSON"),
        (key::JSON_SCHEMA, r#"{"type": "objekt"}"#, "not a valid JSON Schema"),
        (key::GRAMMAR, "root ::= (", "grammar does not parse"),
        (
            key::TOOLS,
            r#"[{"type": "function", "function": {"name": "x", "parameters": {"type": "string"}}}]"#,
            "object schema",
        ),
        (key::TOOL_CHOICE, "auto", "needs tools"),
    ] {
        let e = proxy.complete(with(chat_request("hi", 4), k, v)).await.unwrap_err();
        assert_eq!(error_name(&e), invalid, "{k}={v}: {e}");
        assert!(e.to_string().contains(why), "{k}={v}: {e}");
    }
    let cloud = with(with(chat_request("hi", 4), key::GRAMMAR, r#"root ::= "a""#), key::ROUTE, "cloud");
    assert_eq!(error_name(&proxy.complete(cloud).await.unwrap_err()), invalid);
    assert!(!result_str(&proxy.complete(chat_request("hi", 4)).await.unwrap(), result_key::TEXT).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_call_round_trip() {
    let bus = Bus::start();
    let _daemon = Daemon::start(&bus).await;
    let conn = bus.connect().await;
    let tools: Json = serde_json::from_str(TOOLS).unwrap();
    let question = "What is the weather like in Paris right now?";

    // Turn 1, streamed: the model must call a tool; the call comes back in Finished.
    let r = with(with(chat_request(question, 64), key::TOOLS, TOOLS), key::TOOL_CHOICE, "required");
    let g = Generation::start(&conn, r, "tools1").await.unwrap();
    let (_, result) = collect(g, Duration::from_secs(60)).await;
    assert_eq!(result_str(&result, result_key::FINISH_REASON), "tool_calls", "{result:?}");
    let calls = tool_calls(&result);
    assert_eq!(calls.len(), 1, "{result:?}");
    let (name, arguments) = (s(&calls[0], "name"), s(&calls[0], "arguments"));
    assert!(s(&calls[0], "id").starts_with("call_"));
    let tool =
        tools.as_array().unwrap().iter().find(|t| t["function"]["name"] == name.as_str()).expect("a listed tool");
    let args: Json = serde_json::from_str(&arguments).unwrap();
    let params = jsonschema::validator_for(&tool["function"]["parameters"]).unwrap();
    assert!(params.is_valid(&args), "{name}({arguments}) does not match its parameters");

    // Turn 2: the app ran the tool and sends its result; the model answers in text.
    let call_text = json!({"name": name, "arguments": args}).to_string();
    let messages = messages_value(&[
        ("user", question),
        ("assistant", &call_text),
        ("tool", r#"{"temperature_c": 18, "sky": "light rain"}"#),
    ]);
    let mut r = HashMap::from([(key::MESSAGES, messages), (key::MAX_TOKENS, Variant::from(48u32))]);
    r.insert(key::TOOLS, Variant::from(TOOLS));
    r.insert(key::TOOL_CHOICE, Variant::from("none"));
    let proxy = hearth(&conn).await;
    let result = proxy.complete(r).await.unwrap();
    assert!(tool_calls(&result).is_empty(), "{result:?}");
    assert_ne!(result_str(&result, result_key::FINISH_REASON), "tool_calls");
    assert!(!result_str(&result, result_key::TEXT).trim().is_empty(), "{result:?}");

    // auto: either text or a valid call, never anything else.
    let r = with(chat_request("Wake me up at half past six.", 64), key::TOOLS, TOOLS);
    let result = proxy.complete(r).await.unwrap();
    let text = result_str(&result, result_key::TEXT);
    match tool_calls(&result).first() {
        Some(call) => assert!(["get_weather", "set_alarm"].contains(&s(call, "name").as_str())),
        None => assert!(!text.trim_start().starts_with('{'), "{text}"),
    }
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_are_deterministic_unit_vectors_that_rank_similar_texts_closer() {
    let bus = Bus::start();
    let _daemon = Daemon::start(&bus).await;
    let conn = bus.connect().await;
    let proxy = hearth(&conn).await;
    let texts = [
        "The cat is sleeping on the sofa.",
        "A kitten naps on the couch.",
        "The central bank raised interest rates by half a percentage point.",
        "Inflation figures pushed the bank to increase borrowing costs.",
    ];
    let request = |scope: &str| {
        HashMap::from([
            (key::TEXTS, Variant::from(texts.iter().map(|t| t.to_string()).collect::<Vec<_>>())),
            (key::SCOPE, Variant::from(scope.to_owned())),
        ])
    };
    let a = proxy.embed(request("local")).await.unwrap();
    let b = proxy.embed(request("personal")).await.unwrap();
    assert_eq!(a, b, "same texts, same vectors");
    assert_eq!(a.len(), texts.len());
    for v in &a {
        assert_eq!(v.len(), 576, "SmolLM2-135M's hidden size");
        assert!((cosine(v, v) - 1.0).abs() < 1e-4, "unit length");
    }
    let (cats, banks) = (cosine(&a[0], &a[1]), cosine(&a[2], &a[3]));
    let cross = [cosine(&a[0], &a[2]), cosine(&a[0], &a[3]), cosine(&a[1], &a[2]), cosine(&a[1], &a[3])];
    let max_cross = cross.iter().copied().fold(f64::MIN, f64::max);
    assert!(cats > max_cross && banks > max_cross, "similar {cats:.3}/{banks:.3} vs unrelated {cross:?}");

    // Bad requests: named errors, still serving.
    let invalid = "org.hearth.Hearth1.Error.InvalidArgs";
    let empty: HashMap<&str, Variant<'_>> = HashMap::from([(key::TEXTS, Variant::from(Vec::<String>::new()))]);
    assert_eq!(error_name(&proxy.embed(empty).await.unwrap_err()), invalid);
    assert_eq!(error_name(&proxy.embed(HashMap::new()).await.unwrap_err()), invalid);
    let long = HashMap::from([(key::TEXTS, Variant::from(vec!["word ".repeat(2000)]))]);
    let e = proxy.embed(long).await.unwrap_err();
    assert_eq!(error_name(&e), invalid, "{e}");
    let unknown =
        HashMap::from([(key::TEXTS, Variant::from(vec!["x".to_owned()])), (key::MODEL, Variant::from("nope"))]);
    assert_eq!(error_name(&proxy.embed(unknown).await.unwrap_err()), "org.hearth.Hearth1.Error.ModelNotFound");
    assert_eq!(proxy.embed(request("public")).await.unwrap(), a);
}
