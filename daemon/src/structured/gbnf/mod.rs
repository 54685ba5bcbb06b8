//! A bounds checker for GBNF text, run on every grammar before llama.cpp sees it.
//!
//! It parses exactly the syntax of llama.cpp's `llama_grammar_parser` (src/llama-grammar.cpp:
//! `parse_space`, `parse_name`, `parse_char`, `parse_sequence`, `parse_alternates`,
//! `parse_rule`) and builds the same rules and elements, including the rules llama.cpp
//! synthesizes for groups and repetitions, so every limit is measured on what llama.cpp would
//! build. A grammar that passes parses in llama.cpp (which otherwise logs the whole text), does
//! not overflow its recursive parser or its recursive left-recursion check, and is reduced:
//! every alternative of every reachable rule derives some finite text, so the sampler always
//! has a next character or the end to allow, as far as the grammar alone decides.
//!
//! Messages name the limit and a line/column or a rule name (cut to 32 characters), never the
//! grammar text itself.

use std::collections::HashMap;
use std::fmt;

mod parser;

use parser::Parser;

/// Largest grammar text.
pub const MAX_BYTES: usize = 64 * 1024;
/// Most rules, counting those made for groups and repetitions (`x{0,n}` makes n of them).
pub const MAX_RULES: usize = 4096;
/// Deepest nesting of parentheses: llama.cpp's parser recurses twice per group, on the engine
/// thread's stack.
pub const MAX_DEPTH: usize = 32;
/// Largest repetition bound: llama.cpp copies the repeated item m times and makes n - m rules.
pub const MAX_REPEAT: u64 = 1000;
/// Most grammar elements (8 bytes each in llama.cpp, held twice) after expanding repetitions.
pub const MAX_ELEMENTS: u64 = 1 << 18;
/// llama.cpp's own cap (`MAX_REPETITION_THRESHOLD`) on nested repetition products; past it
/// the parser throws, which logs the grammar.
const LLAMA_REPETITION_THRESHOLD: u64 = 2000;
/// Deepest chain of leftmost rule references: `llama_grammar_detect_left_recursion` recurses
/// once per link.
pub const MAX_LEFT_DEPTH: u64 = 1024;
/// Most calls of that check: it does not memoize, so shared left corners multiply.
pub const MAX_LEFT_CALLS: u64 = 1 << 20;
/// Names in messages are cut to this many characters.
const NAME_CHARS: usize = 32;

/// Where in the text a refusal applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    line: usize,
    col: usize,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.col)
    }
}

/// A rule as a message names it: a rule name of the grammar (word characters only, cut), or
/// a rule llama.cpp makes for a group or repetition inside one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleName {
    name: String,
    synthesized: bool,
}

impl fmt::Display for RuleName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.synthesized {
            write!(f, "a group or repetition in rule \"{}\"", self.name)
        } else {
            write!(f, "rule \"{}\"", self.name)
        }
    }
}

/// Why a grammar is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrammarError {
    #[error("the grammar is {len} bytes; the limit is {MAX_BYTES}")]
    TooLong { len: usize },
    #[error("the grammar contains a NUL byte at {at}")]
    Nul { at: Pos },
    #[error("syntax error at {at}: {what}")]
    Syntax { at: Pos, what: &'static str },
    #[error("parentheses nest deeper than {MAX_DEPTH} at {at}")]
    TooDeep { at: Pos },
    #[error("the repetition at {at} has a minimum above its maximum, so it admits nothing")]
    EmptyRange { at: Pos },
    #[error("the repetition at {at} has a bound above the limit {MAX_REPEAT}")]
    RepeatTooLarge { at: Pos },
    #[error(
        "the repetition at {at} repeats nested repetitions more than {LLAMA_REPETITION_THRESHOLD} times in all (llama.cpp's limit)"
    )]
    RepeatTooComplex { at: Pos },
    #[error("the grammar expands to more than {MAX_ELEMENTS} elements (at {at})")]
    TooBig { at: Pos },
    #[error("the grammar has more than {MAX_RULES} rules, counting those made for groups and repetitions (at {at})")]
    TooManyRules { at: Pos },
    #[error("the token id at {at} is out of range")]
    TokenId { at: Pos },
    #[error("{0} is used but never defined")]
    Undefined(RuleName),
    #[error("the grammar has no root rule")]
    NoRoot,
    #[error("{0} is left-recursive: it can reach itself without consuming text, which llama.cpp does not support")]
    LeftRecursion(RuleName),
    #[error(
        "chains of leftmost rule references are too long or too many (limits {MAX_LEFT_DEPTH} deep, {MAX_LEFT_CALLS} paths)"
    )]
    LeftChains,
    #[error("{0} has an alternative that admits no finite text (the grammar would admit no token there)")]
    Unproductive(RuleName),
}

/// One grammar element, laid out as llama.cpp's `llama_grammar_element`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum El {
    End,
    Alt,
    Ref(u32),
    Char(u32),
    CharNot(u32),
    RngUpper(u32),
    CharAlt(u32),
    Any,
    Token,
    TokenNot,
}

/// One item of an alternative: a rule reference, or a terminal and whether it can match.
#[derive(Debug, Clone, Copy)]
enum Item {
    Ref(usize),
    Term(bool),
}

/// Code points a token's text can decode to: NUL ends llama.cpp's decoded strings, and valid
/// UTF-8 has no surrogates and nothing above U+10FFFF.
const MAX_CP: u32 = 0x10FFFF;
const SURROGATES: (u32, u32) = (0xD800, 0xDFFF);

fn range_admits(lo: u32, hi: u32) -> bool {
    let (lo, hi) = (lo.max(1), hi.min(MAX_CP));
    lo <= hi && !(lo >= SURROGATES.0 && hi <= SURROGATES.1)
}

fn negated_admits(mut ranges: Vec<(u32, u32)>) -> bool {
    ranges.push(SURROGATES);
    ranges.sort_unstable();
    let mut next = 1u32;
    for (lo, hi) in ranges {
        if lo > next {
            return true;
        }
        next = next.max(hi.saturating_add(1));
        if next > MAX_CP {
            return false;
        }
    }
    true
}

/// A rule's alternatives as items, grouping char elements the way `llama_grammar_match_char`
/// reads them.
fn alternatives(rule: &[El]) -> Vec<Vec<Item>> {
    let mut alts = Vec::new();
    let mut cur = Vec::new();
    let mut i = 0;
    while i < rule.len() {
        match rule[i] {
            El::End => break,
            El::Alt => alts.push(std::mem::take(&mut cur)),
            El::Ref(r) => cur.push(Item::Ref(r as usize)),
            El::Token | El::TokenNot | El::Any => cur.push(Item::Term(true)),
            El::Char(c) | El::CharNot(c) | El::CharAlt(c) | El::RngUpper(c) => {
                let negated = matches!(rule[i], El::CharNot(_));
                let mut ranges = Vec::new();
                let mut lo = c;
                loop {
                    let hi = match rule.get(i + 1) {
                        Some(El::RngUpper(h)) => {
                            i += 1;
                            *h
                        }
                        _ => lo,
                    };
                    ranges.push((lo, hi));
                    match rule.get(i + 1) {
                        Some(El::CharAlt(n)) => {
                            i += 1;
                            lo = *n;
                        }
                        _ => break,
                    }
                }
                let admits =
                    if negated { negated_admits(ranges) } else { ranges.iter().any(|&(l, h)| range_admits(l, h)) };
                cur.push(Item::Term(admits));
            }
        }
        i += 1;
    }
    alts.push(cur);
    alts
}

/// Least fixpoint over the rules: a rule holds when one of its alternatives has only items
/// that hold (`term` decides terminals). Linear in the items, with a counter per alternative.
fn fixpoint(alts: &[(usize, Vec<Item>)], n_rules: usize, term: impl Fn(bool) -> bool) -> Vec<bool> {
    let mut holds = vec![false; n_rules];
    let mut pending = vec![0usize; alts.len()];
    let mut users: Vec<Vec<usize>> = vec![Vec::new(); n_rules];
    let mut queue = Vec::new();
    for (a, (owner, items)) in alts.iter().enumerate() {
        if items.iter().any(|it| matches!(it, Item::Term(b) if !term(*b))) {
            pending[a] = usize::MAX;
            continue;
        }
        for it in items {
            if let Item::Ref(r) = it {
                pending[a] += 1;
                users[*r].push(a);
            }
        }
        if pending[a] == 0 && !holds[*owner] {
            holds[*owner] = true;
            queue.push(*owner);
        }
    }
    while let Some(r) = queue.pop() {
        for &a in &users[r] {
            if pending[a] == usize::MAX {
                continue;
            }
            pending[a] -= 1;
            let owner = alts[a].0;
            if pending[a] == 0 && !holds[owner] {
                holds[owner] = true;
                queue.push(owner);
            }
        }
    }
    holds
}

/// Checks `text` as llama.cpp would parse it with start rule `root`.
pub fn check(text: &str) -> Result<(), GrammarError> {
    if text.len() > MAX_BYTES {
        return Err(GrammarError::TooLong { len: text.len() });
    }
    let mut p =
        Parser { text, src: text.as_bytes(), ids: HashMap::new(), syms: Vec::new(), rules: Vec::new(), elements: 0 };
    if let Some(i) = text.bytes().position(|b| b == 0) {
        return Err(GrammarError::Nul { at: p.pos(i) });
    }
    let mut i = p.space(0, true);
    while p.at(i) != 0 {
        i = p.rule(i)?;
    }
    // llama.cpp's own validation: every rule up to the highest defined id exists, and so
    // does every rule still referenced (a reference dropped by `x{0}` does not count).
    let n = p.rules.len();
    let referenced = p.rules.iter().flatten().flatten().filter_map(|el| match el {
        El::Ref(r) => Some(*r as usize),
        _ => None,
    });
    if let Some(id) = (0..n).filter(|&id| p.rules[id].is_none()).chain(referenced.filter(|&r| r >= n)).next() {
        return Err(GrammarError::Undefined(p.rule_name(id)));
    }
    // A root that is named but not defined would make llama.cpp index past its rules.
    let root = *p.ids.get("root").ok_or(GrammarError::NoRoot)? as usize;
    if root >= n || p.rules[root].is_none() {
        return Err(GrammarError::Undefined(p.rule_name(root)));
    }

    let per_rule: Vec<Vec<Vec<Item>>> = p.rules.iter().map(|r| alternatives(r.as_deref().unwrap_or(&[]))).collect();
    let flat: Vec<(usize, Vec<Item>)> =
        per_rule.iter().enumerate().flat_map(|(r, alts)| alts.iter().map(move |a| (r, a.clone()))).collect();
    let nullable = fixpoint(&flat, n, |_| false);
    let productive = fixpoint(&flat, n, |admits| admits);

    // Left corners: the rules an alternative can start with (after nullable items). A cycle
    // among them is left recursion; llama.cpp's own check misses those through rules that
    // are nullable only indirectly, and then aborts on an empty stack set.
    let mut corners: Vec<Vec<usize>> = vec![Vec::new(); n];
    // The subset llama.cpp's recursive check follows: it goes past a reference only when
    // that rule has a directly empty alternative.
    let mut llama_corners: Vec<Vec<usize>> = vec![Vec::new(); n];
    let direct_empty: Vec<bool> = per_rule.iter().map(|alts| alts.iter().any(Vec::is_empty)).collect();
    for (r, alts) in per_rule.iter().enumerate() {
        for alt in alts {
            let mut llama_follows = true;
            for it in alt {
                let Item::Ref(s) = *it else { break };
                corners[r].push(s);
                if llama_follows {
                    llama_corners[r].push(s);
                    llama_follows = direct_empty[s];
                }
                if !nullable[s] {
                    break;
                }
            }
        }
    }
    let order = postorder(&corners).map_err(|r| GrammarError::LeftRecursion(p.rule_name(r)))?;

    // What `llama_grammar_detect_left_recursion` will do: calls and depth per start rule, in
    // its own order (rules finished by an earlier start are skipped).
    let mut calls = vec![0u64; n];
    let mut depth = vec![0u64; n];
    for &r in &order {
        calls[r] = llama_corners[r].iter().fold(1u64, |acc, &s| acc.saturating_add(calls[s]));
        depth[r] = 1 + llama_corners[r].iter().map(|&s| depth[s]).max().unwrap_or(0);
    }
    let mut visited = vec![false; n];
    let mut total = 0u64;
    for start in 0..n {
        if visited[start] {
            continue;
        }
        total = total.saturating_add(calls[start]);
        if depth[start] > MAX_LEFT_DEPTH || total > MAX_LEFT_CALLS {
            return Err(GrammarError::LeftChains);
        }
        let mut stack = vec![start];
        visited[start] = true;
        while let Some(r) = stack.pop() {
            for &s in &llama_corners[r] {
                if !visited[s] {
                    visited[s] = true;
                    stack.push(s);
                }
            }
        }
    }

    // Every alternative of every rule reachable from root must derive finite text.
    let mut reach = vec![false; n];
    let mut stack = vec![root];
    reach[root] = true;
    while let Some(r) = stack.pop() {
        for alt in &per_rule[r] {
            let ok = alt.iter().all(|it| match *it {
                Item::Ref(s) => productive[s],
                Item::Term(admits) => admits,
            });
            if !ok {
                return Err(GrammarError::Unproductive(p.rule_name(r)));
            }
            for it in alt {
                if let Item::Ref(s) = *it
                    && !reach[s]
                {
                    reach[s] = true;
                    stack.push(s);
                }
            }
        }
    }
    Ok(())
}

/// Post-order of `edges` (children before parents), or a node on a cycle. Iterative, so a
/// long chain cannot overflow this thread's stack either.
fn postorder(edges: &[Vec<usize>]) -> Result<Vec<usize>, usize> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    let mut mark = vec![Mark::New; edges.len()];
    let mut order = Vec::with_capacity(edges.len());
    for start in 0..edges.len() {
        if mark[start] != Mark::New {
            continue;
        }
        let mut stack = vec![(start, 0usize)];
        mark[start] = Mark::Open;
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            if let Some(&child) = edges[node].get(*next) {
                *next += 1;
                match mark[child] {
                    Mark::Open => return Err(child),
                    Mark::New => {
                        mark[child] = Mark::Open;
                        stack.push((child, 0));
                    }
                    Mark::Done => {}
                }
            } else {
                mark[node] = Mark::Done;
                order.push(node);
                stack.pop();
            }
        }
    }
    Ok(order)
}

#[cfg(test)]
mod tests;
