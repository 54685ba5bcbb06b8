//! The checker against hostile and valid grammars.

use super::*;

/// llama.cpp's grammars/json.gbnf.
const JSON: &str = r#"root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws

object ::=
  "{" ws (
        string ":" ws value
("," ws string ":" ws value)*
  )? "}" ws

array  ::=
  "[" ws (
        value
("," ws value)*
  )? "]" ws

string ::=
  "\"" (
[^"\\\x7F\x00-\x1F] |
"\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) # escapes
  )* "\"" ws

number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws

# Optional space: by convention, applied in this grammar after literal chars when allowed
ws ::= | " " | "\n" [ \t]{0,20}
"#;

fn refused(g: &str) -> GrammarError {
    let t = std::time::Instant::now();
    let e = check(g).expect_err("the grammar should be refused");
    assert!(t.elapsed() < std::time::Duration::from_millis(100), "took {:?} for {e}", t.elapsed());
    e
}

#[test]
fn valid_grammars_pass() {
    for g in [
        "root ::= \"a\"",
        "root ::= [a-z]+ (\",\" [a-z]+)* | \"\"\n",
        "root ::=\n",
        "# comment\nroot ::= x y # trailing\nx ::= \"x\"?\ny ::= [^\\n]{2,5}\n",
        "root ::= ( \"a\" |\n \"b\" ) \"c\"{3} [\\x41-\\u005A\\U0001F600] .",
        "root ::= <[12]> !<[3]> \"\\\\\\\"\\[\\]\\-\\t\\r\\n\"",
        "root ::= [a-] [-a] [\\]] []\r\nz ::= \"é😀\"",
        "root ::= tool-call | plain-text\nplain-text ::= [^{] .*\ntool-call ::= \"{\" [a-z]* \"}\"\n",
        "root ::= x{0}\nx ::= \"a\"",
        "root ::= \"a\" root | \"b\"",
        "root ::= x{0}\n",
        JSON,
    ] {
        assert_eq!(check(g), Ok(()), "{g:?}");
    }
}

#[test]
fn hostile_grammars_are_refused() {
    let deep = format!("root ::= {}\"a\"{}", "(".repeat(20_000), ")".repeat(20_000));
    assert!(matches!(refused(&deep), GrammarError::TooDeep { .. }));
    let chain: String = (0..5000).map(|i| format!("r{i} ::= r{} \"x\"\n", i + 1)).collect::<String>()
        + "r5000 ::= \"y\"\nroot ::= r0\n";
    assert!(matches!(refused(&chain), GrammarError::TooLong { .. }));
    let chain: String =
        (0..4500).map(|i| format!("a{i} ::= a{}\n", i + 1)).collect::<String>() + "a4500 ::= \"y\"\nroot ::= a0\n";
    let e = refused(&chain);
    assert!(matches!(e, GrammarError::TooLong { .. } | GrammarError::TooManyRules { .. }), "{e}");
    let chain: String =
        (0..1500).map(|i| format!("a{i} ::= a{}\n", i + 1)).collect::<String>() + "a1500 ::= \"y\"\nroot ::= a0\n";
    assert_eq!(refused(&chain), GrammarError::LeftChains);
    assert!(matches!(refused("root ::= \"x\"{5,1}"), GrammarError::EmptyRange { .. }));
    assert!(matches!(refused("root ::= \"x\"{0,100000}"), GrammarError::RepeatTooLarge { .. }));
    assert!(matches!(refused("root ::= \"x\"{99999999999999999999999,}"), GrammarError::RepeatTooLarge { .. }));
    // Nested repetitions of groups stay linear in llama.cpp: accepted.
    assert_eq!(check("root ::= ((\"x\"{1000}){1000}){1000}"), Ok(()));
    let wide = format!("root ::= \"{}\"{{1000}}", "x".repeat(1000));
    assert!(matches!(refused(&wide), GrammarError::TooBig { .. }));
    assert!(matches!(refused("root ::= x{100}{100}\nx ::= \"a\""), GrammarError::RepeatTooComplex { .. }));
    let many: String = (0..5).map(|i| format!("r{i} ::= \"a\"{{0,1000}}\n")).collect::<String>() + "root ::= r0";
    assert!(matches!(refused(&many), GrammarError::TooManyRules { .. }));
    assert!(matches!(refused("root ::= [^\\x00-\\U0010FFFF]"), GrammarError::Unproductive(_)));
    assert!(matches!(refused("root ::= [^\\x01-\\uD7FF\\uE000-\\U0010FFFF]"), GrammarError::Unproductive(_)));
    assert!(matches!(refused("root ::= \"a\" | [z-a]"), GrammarError::Unproductive(_)));
    assert!(matches!(refused("root ::= \"\\x00\""), GrammarError::Unproductive(_)));
    assert!(matches!(refused("root ::= x\n"), GrammarError::Undefined(RuleName { ref name, .. }) if name == "x"));
    assert_eq!(refused("a ::= \"a\""), GrammarError::NoRoot);
    assert_eq!(refused(""), GrammarError::NoRoot);
    assert!(matches!(refused("root ::= root \"a\" | \"b\""), GrammarError::LeftRecursion(_)));
    // Nullable only through another rule: llama.cpp's own check misses this one.
    assert!(matches!(refused("root ::= a root | \"x\"\na ::= c\nc ::= \"\""), GrammarError::LeftRecursion(_)));
    assert!(matches!(refused("root ::= (\"a\"?)* \"b\""), GrammarError::LeftRecursion(_)));
    assert!(matches!(refused("root ::= \"a\" root"), GrammarError::Unproductive(_)));
    assert!(matches!(refused("root ::= x\nx ::= \"b\" y\ny ::= \"c\" x"), GrammarError::Unproductive(_)));
    assert!(matches!(refused(&"root ::= \"a\"\n".repeat(90_000)), GrammarError::TooLong { .. }));
    assert!(matches!(refused(&format!("root ::= \"{}\"", "a".repeat(1 << 20))), GrammarError::TooLong { .. }));
    // Exponentially many left-corner paths for llama.cpp's unmemoized check.
    let fan: String = (0..40).map(|i| format!("f{i} ::= f{0} | f{0} \"x\"\n", i + 1)).collect::<String>()
        + "f40 ::= \"y\"\nroot ::= f0\n";
    assert_eq!(refused(&fan), GrammarError::LeftChains);
}

#[test]
fn syntax_llama_cpp_refuses_is_refused() {
    for g in [
        "root ::= \"a",
        "root ::= [a",
        "root ::= (\"a\"",
        "root ::= \"\\q\"",
        "root ::= \"\\x4\"",
        "root := \"a\"",
        "root ::= \"a\" )",
        "root ::= *",
        "root ::= \"\"*",
        "root ::= x{0}*\nx ::= \"a\"",
        "root ::= \"a\"{,3}",
        "root ::= \"a\"{2",
        "root ::= <think>",
        "root ::= <[99999999999]>",
        "root ::= \"a\"\n  | \"b\"",
        "root ::= \"a\" \u{0} \"b\"",
        "_x ::= \"a\"",
    ] {
        let e = refused(g);
        let msg = e.to_string();
        assert!(!msg.contains("think") && !msg.contains("\"a"), "{msg}");
    }
}

#[test]
fn messages_do_not_echo_the_grammar() {
    let name = "secretname".repeat(10);
    let e = refused(&format!("root ::= {name}"));
    let msg = e.to_string();
    assert!(msg.contains("secretnamesecretnamesecretnamese…"), "{msg}");
    assert!(!msg.contains(&name), "{msg}");
    let e = refused("root ::= \"my password is hunter2\" [");
    assert!(!e.to_string().contains("hunter2"), "{e}");
}
