use super::*;

fn ov(v: Variant<'_>) -> OwnedVariant {
    OwnedVariant::try_from(v).unwrap()
}

fn message(role: &str, content: &str) -> HashMap<String, OwnedVariant> {
    HashMap::from([("role".to_owned(), ov(Variant::from(role))), ("content".to_owned(), ov(Variant::from(content)))])
}

fn with(mut m: HashMap<String, OwnedVariant>, k: &str, v: Variant<'_>) -> HashMap<String, OwnedVariant> {
    m.insert(k.to_owned(), ov(v));
    m
}

fn sealed() -> HashMap<String, OwnedVariant> {
    HashMap::from([
        ("role".to_owned(), ov(Variant::from("user"))),
        ("sealed".to_owned(), ov(Variant::from(vec![7u8; 64]))),
    ])
}

#[test]
fn scopes_default_to_personal_and_sealed_parts_are_local() {
    let d = req(vec![(
        "messages",
        Variant::from(vec![
            message("user", "a"),
            with(message("user", "b"), "scope", Variant::from("public")),
            sealed(),
        ]),
    )]);
    let p = parse(&d, 16).unwrap();
    let scopes: Vec<Scope> = p.parts.iter().map(|p| p.scope).collect();
    assert_eq!(scopes, [Scope::Personal, Scope::Public, Scope::Local]);
    assert_eq!(p.parts[2].content, Content::Sealed(vec![7u8; 64]));
}

fn req(extra: Vec<(&str, Variant<'_>)>) -> HashMap<String, OwnedVariant> {
    let mut d = HashMap::from([("messages".to_owned(), ov(Variant::from(vec![message("user", "hi")])))]);
    for (k, v) in extra {
        d.insert(k.to_owned(), ov(v));
    }
    d
}

#[test]
fn accepts_a_full_request() {
    let p = parse(
        &req(vec![
            ("model", Variant::from("m")),
            ("max_tokens", Variant::from(7i32)),
            ("temperature", Variant::from(0.5f64)),
            ("top_p", Variant::from(0.9f64)),
            ("top_k", Variant::from(10u32)),
            ("seed", Variant::from(42u64)),
            ("handle_token", Variant::from("t1")),
            ("priority", Variant::from("interactive")),
            ("deadline_ms", Variant::from(1500u32)),
            ("speculative", Variant::from(false)),
        ]),
        256,
    )
    .unwrap();
    assert_eq!(p.request.max_tokens, 7);
    assert!(!p.request.speculative);
    assert!(parse(&req(vec![]), 256).unwrap().request.speculative, "speculative decoding is on by default");
    assert_eq!(p.request.model.as_deref(), Some("m"));
    assert_eq!(
        p.request.sampling,
        SamplerParams {
            temperature: 0.5,
            top_k: 10,
            top_p: 0.9,
            seed: 42,
            penalty_last_n: 7,
            ..SamplerParams::default()
        }
    );
    assert_eq!(p.handle_token.as_deref(), Some("t1"));
    assert_eq!(p.request.priority, Priority::Interactive);
    assert_eq!(p.request.deadline, Some(std::time::Duration::from_millis(1500)));
    assert_eq!(
        p.parts[0],
        Part {
            role: "user".into(),
            content: Content::Text("hi".into()),
            scope: Scope::Personal,
            images: Vec::new(),
            tool_calls: Vec::new(),
            tool_call_id: None
        }
    );
    assert_eq!(p.route, RouteRequest::Auto);
}

#[test]
fn structured_and_adapter_requests_are_device_only() {
    let adapters = Variant::from(HashMap::from([("style".to_owned(), Variant::from(1.0f64))]));
    let device_only: Vec<(&str, Variant<'_>)> = vec![
        ("grammar", Variant::from("root ::= \"a\"")),
        ("json_schema", Variant::from(r#"{"type": "integer"}"#)),
        ("tools", Variant::from(r#"[{"type": "function", "function": {"name": "f"}}]"#)),
        ("adapters", adapters),
        ("logprobs", Variant::from(true)),
        ("repetition_penalty", Variant::from(1.3f64)),
    ];
    for (k, v) in device_only {
        for route in ["auto", "local"] {
            let p = parse(&req(vec![(k, v.clone()), ("route", Variant::from(route))]), 16);
            assert_eq!(p.unwrap().route, RouteRequest::Local, "{k} with route {route}");
        }
        let p = parse(&req(vec![(k, v), ("route", Variant::from("cloud"))]), 16);
        assert!(matches!(p, Err(Error::InvalidArgs(m)) if m.contains("run on the device")), "{k}");
    }
}

#[test]
fn stop_penalties_and_logprobs_are_parsed_and_bounded() {
    let p = parse(
        &req(vec![
            ("stop", Variant::from(vec!["\n\n", "END"])),
            ("frequency_penalty", Variant::from(0.5f64)),
            ("presence_penalty", Variant::from(-1.0f64)),
            ("logprobs", Variant::from(true)),
            ("top_logprobs", Variant::from(5u32)),
        ]),
        16,
    )
    .unwrap();
    assert_eq!(p.request.stop, ["\n\n", "END"]);
    assert_eq!((p.request.sampling.frequency_penalty, p.request.sampling.presence_penalty), (0.5, -1.0));
    assert_eq!(p.request.sampling.penalty_last_n, 16, "penalties look back over what it may generate");
    assert!(p.request.sampling.has_penalties());
    assert_eq!(p.request.logprobs, Some(5));
    // Frequency and presence penalties and stop sequences also go to the cloud.
    let p = parse(&req(vec![("stop", Variant::from(vec!["x"])), ("presence_penalty", Variant::from(1.0f64))]), 16);
    assert_eq!(p.unwrap().route, RouteRequest::Auto);
    let p = parse(&req(vec![("logprobs", Variant::from(true))]), 16).unwrap();
    assert_eq!(p.request.logprobs, Some(0), "logprobs alone: the chosen token's only");
    let defaults = parse(&req(vec![]), 16).unwrap().request;
    assert!(defaults.stop.is_empty() && defaults.logprobs.is_none() && !defaults.sampling.has_penalties());
    let long = "x".repeat(65);
    let bad: Vec<(Vec<(&str, Variant<'_>)>, &str)> = vec![
        (vec![("stop", Variant::from("END"))], "stop must be an array of strings"),
        (vec![("stop", Variant::from(vec!["a", "b", "c", "d", "e"]))], "at most 4"),
        (vec![("stop", Variant::from(vec![""]))], "stop[0] must be 1-64 bytes"),
        (vec![("stop", Variant::from(vec![long.as_str()]))], "stop[0] must be 1-64 bytes"),
        (vec![("stop", Variant::from(vec![1u32]))], "stop[0] must be a string"),
        (vec![("repetition_penalty", Variant::from(0.0f64))], "repetition_penalty must be within (0, 2]"),
        (vec![("repetition_penalty", Variant::from(f64::NAN))], "finite"),
        (vec![("frequency_penalty", Variant::from(2.5f64))], "frequency_penalty must be within -2..=2"),
        (vec![("presence_penalty", Variant::from(-3.0f64))], "presence_penalty must be within -2..=2"),
        (vec![("logprobs", Variant::from(1u32))], "logprobs must be a boolean"),
        (vec![("top_logprobs", Variant::from(21u32))], "top_logprobs must be within 0..=20"),
        (vec![("top_logprobs", Variant::from(u64::MAX))], "top_logprobs must be within 0..=20"),
        (vec![("top_logprobs", Variant::from(3u32))], "top_logprobs needs logprobs"),
        (
            vec![("stop", Variant::from(vec!["}"])), ("json_schema", Variant::from(r#"{"type": "object"}"#))],
            "stop cannot be combined",
        ),
    ];
    for (extra, want) in bad {
        let e = parse(&req(extra), 16).unwrap_err();
        assert!(matches!(&e, Error::InvalidArgs(m) if m.contains(want)), "{want}: {e:?}");
    }
}

#[test]
fn rejects_bad_requests_with_a_reason() {
    let cases: Vec<(HashMap<String, OwnedVariant>, &str)> = vec![
        (HashMap::new(), "messages is missing"),
        (req(vec![("messages", Variant::from(Vec::<HashMap<String, OwnedVariant>>::new()))]), "messages is empty"),
        (req(vec![("messages", Variant::from("hi"))]), "messages must be an array"),
        (req(vec![("max_tokens", Variant::from(0u32))]), "at least 1"),
        (req(vec![("max_tokens", Variant::from(-3i32))]), "must not be negative"),
        (req(vec![("max_tokens", Variant::from(u64::MAX))]), "absurdly large"),
        (req(vec![("max_tokens", Variant::from("ten"))]), "must be an integer"),
        (req(vec![("temperature", Variant::from(9.0f64))]), "temperature"),
        (req(vec![("top_p", Variant::from(0.0f64))]), "top_p"),
        (req(vec![("bogus", Variant::from(1u32))]), "unknown request key"),
        (req(vec![("speculative", Variant::from(1u32))]), "speculative must be a boolean"),
        (req(vec![("handle_token", Variant::from("a/b"))]), "handle_token"),
        (req(vec![("priority", Variant::from("urgent"))]), "is not one of interactive"),
        (req(vec![("deadline_ms", Variant::from(0u32))]), "deadline_ms"),
        (req(vec![("messages", Variant::from(vec![message("robot", "x")]))]), "is not one of"),
        (req(vec![("route", Variant::from("moon"))]), "route"),
        (
            req(vec![("messages", Variant::from(vec![with(message("user", "x"), "scope", Variant::from("secret"))]))]),
            "public, personal, local",
        ),
        (
            req(vec![(
                "messages",
                Variant::from(vec![with(message("user", "x"), "tool_call_id", Variant::from("c1"))]),
            )]),
            "only tool messages may",
        ),
        (
            req(vec![(
                "messages",
                Variant::from(vec![with(message("tool", "x"), "tool_call_id", Variant::from("a b"))]),
            )]),
            "tool_call_id must be 1-64",
        ),
        (
            req(vec![(
                "messages",
                Variant::from(vec![with(message("user", "x"), "sealed", Variant::from(vec![1u8, 2]))]),
            )]),
            "both content and sealed",
        ),
        (
            req(vec![("messages", Variant::from(vec![with(sealed(), "scope", Variant::from("public"))]))]),
            "scope is local",
        ),
        (
            req(vec![("messages", Variant::from(vec![with(sealed(), "sealed", Variant::from("text"))]))]),
            "must be bytes",
        ),
        (req(vec![("app_id", Variant::from("org.bank.App"))]), "unknown request key"),
    ];
    for (d, expect) in cases {
        match parse(&d, 256) {
            Err(Error::InvalidArgs(m)) => assert!(m.contains(expect), "{m:?} should contain {expect:?}"),
            other => panic!("expected InvalidArgs containing {expect:?}, got {other:?}"),
        }
    }
    let p = parse(&req(vec![("handle_token", Variant::from("t"))]), 256).unwrap();
    assert_eq!(p.handle_token.as_deref(), Some("t"), "Complete takes a handle token too");
    assert!(parse(&req(vec![("handle_token", Variant::from("a/b"))]), 256).is_err());
}

#[test]
fn tool_messages_may_name_the_call_they_answer() {
    let m = with(message("tool", "42"), "tool_call_id", Variant::from("call_0"));
    let p = parse(&req(vec![("messages", Variant::from(vec![message("user", "x"), m]))]), 16).unwrap();
    assert_eq!(p.parts[1].role, "tool");
}
