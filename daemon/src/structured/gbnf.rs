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

#[derive(Debug)]
struct Sym<'a> {
    /// The rule's name, or for a synthesized rule the rule it was made in.
    name: &'a str,
    synthesized: bool,
}

struct Parser<'a> {
    text: &'a str,
    src: &'a [u8],
    ids: HashMap<&'a str, u32>,
    syms: Vec<Sym<'a>>,
    rules: Vec<Option<Vec<El>>>,
    /// Elements made so far, an upper bound of what llama.cpp holds.
    elements: u64,
}

type Res<T> = Result<T, GrammarError>;

fn is_word(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'-'
}

impl<'a> Parser<'a> {
    fn at(&self, i: usize) -> u8 {
        // llama.cpp reads a NUL-terminated string; past the end reads as NUL.
        self.src.get(i).copied().unwrap_or(0)
    }

    fn pos(&self, i: usize) -> Pos {
        let before = &self.src[..i.min(self.src.len())];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let col = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
        Pos { line, col }
    }

    fn syntax(&self, i: usize, what: &'static str) -> GrammarError {
        GrammarError::Syntax { at: self.pos(i), what }
    }

    fn new_sym(&mut self, name: &'a str, synthesized: bool, i: usize) -> Res<u32> {
        if self.syms.len() >= MAX_RULES {
            return Err(GrammarError::TooManyRules { at: self.pos(i) });
        }
        self.syms.push(Sym { name, synthesized });
        Ok((self.syms.len() - 1) as u32)
    }

    /// llama.cpp's `get_symbol_id`: a name's id, made on first use.
    fn symbol(&mut self, name: &'a str, i: usize) -> Res<u32> {
        if let Some(&id) = self.ids.get(name) {
            return Ok(id);
        }
        let id = self.new_sym(name, false, i)?;
        self.ids.insert(name, id);
        Ok(id)
    }

    fn push(&mut self, rule: &mut Vec<El>, el: El, i: usize) -> Res<()> {
        self.elements += 1;
        if self.elements > MAX_ELEMENTS {
            return Err(GrammarError::TooBig { at: self.pos(i) });
        }
        rule.push(el);
        Ok(())
    }

    fn add_rule(&mut self, id: u32, rule: Vec<El>) {
        let id = id as usize;
        if self.rules.len() <= id {
            self.rules.resize(id + 1, None);
        }
        self.rules[id] = Some(rule);
    }

    fn space(&self, mut i: usize, newline_ok: bool) -> usize {
        loop {
            match self.at(i) {
                b' ' | b'\t' => i += 1,
                b'\r' | b'\n' if newline_ok => i += 1,
                b'#' => {
                    while !matches!(self.at(i), 0 | b'\r' | b'\n') {
                        i += 1;
                    }
                }
                _ => return i,
            }
        }
    }

    fn name(&self, i: usize) -> Res<usize> {
        let mut end = i;
        while is_word(self.at(end)) {
            end += 1;
        }
        if end == i { Err(self.syntax(i, "expecting a rule name")) } else { Ok(end) }
    }

    /// Digits at `i` (at least one), their value saturated.
    fn int(&self, i: usize) -> (u64, usize) {
        let mut end = i;
        let mut value: u64 = 0;
        while self.at(end).is_ascii_digit() {
            value = value.saturating_mul(10).saturating_add(u64::from(self.at(end) - b'0'));
            end += 1;
        }
        (value, end)
    }

    fn hex(&self, i: usize, n: usize) -> Res<(u32, usize)> {
        let mut value: u32 = 0;
        for k in 0..n {
            let d = char::from(self.at(i + k)).to_digit(16).ok_or_else(|| self.syntax(i, "bad hex escape"))?;
            value = (value << 4) | d;
        }
        Ok((value, i + n))
    }

    /// llama.cpp's `parse_char`: one escape or one UTF-8 character.
    fn one_char(&self, i: usize) -> Res<(u32, usize)> {
        match self.at(i) {
            b'\\' => match self.at(i + 1) {
                b'x' => self.hex(i + 2, 2),
                b'u' => self.hex(i + 2, 4),
                b'U' => self.hex(i + 2, 8),
                b't' => Ok((u32::from('\t'), i + 2)),
                b'r' => Ok((u32::from('\r'), i + 2)),
                b'n' => Ok((u32::from('\n'), i + 2)),
                c @ (b'\\' | b'"' | b'[' | b']' | b'-') => Ok((u32::from(c), i + 2)),
                _ => Err(self.syntax(i, "unknown escape")),
            },
            0 => Err(self.syntax(i, "unexpected end of input")),
            _ => {
                let c = self.text.get(i..).and_then(|s| s.chars().next()).ok_or_else(|| self.syntax(i, "bad UTF-8"))?;
                Ok((u32::from(c), i + c.len_utf8()))
            }
        }
    }

    /// llama.cpp's `parse_token`: only `<[id]>` is accepted here, since `<text>` needs the
    /// model's tokenizer and fails (logging the grammar) when it is not exactly one token.
    fn token(&self, i: usize) -> Res<(u32, usize)> {
        if self.at(i) != b'<' {
            return Err(self.syntax(i, "expecting '<'"));
        }
        if self.at(i + 1) != b'[' {
            return Err(self.syntax(i, "tokens by text (<...>) are not supported; use <[id]>"));
        }
        if !self.at(i + 2).is_ascii_digit() {
            return Err(self.syntax(i + 2, "expecting a token id"));
        }
        let (id, end) = self.int(i + 2);
        if self.at(end) != b']' || self.at(end + 1) != b'>' {
            return Err(self.syntax(end, "expecting ']>'"));
        }
        let id = u32::try_from(id).ok().filter(|&v| i32::try_from(v).is_ok());
        let id = id.ok_or(GrammarError::TokenId { at: self.pos(i) })?;
        Ok((id, end + 2))
    }

    /// llama.cpp's `handle_repetitions`, with its limits checked before anything is copied.
    #[allow(clippy::too_many_arguments)]
    fn repeat(
        &mut self,
        rule: &mut Vec<El>,
        last: usize,
        n_prev_rules: &mut u64,
        min: u64,
        max: Option<u64>,
        base: &'a str,
        i: usize,
    ) -> Res<()> {
        if last == rule.len() {
            return Err(self.syntax(i, "nothing to repeat"));
        }
        let total_rules = match max {
            Some(m) if m > 0 => m,
            _ if min > 0 => min,
            _ => 1,
        };
        if n_prev_rules.saturating_mul(total_rules) > LLAMA_REPETITION_THRESHOLD {
            return Err(GrammarError::RepeatTooComplex { at: self.pos(i) });
        }
        let n_opt = match max {
            None => 1,
            Some(m) => m.checked_sub(min).ok_or(GrammarError::EmptyRange { at: self.pos(i) })?,
        };
        let prev_len = (rule.len() - last) as u64;
        let added = prev_len * (min.saturating_sub(1) + n_opt) + 3 * n_opt + 1;
        if self.elements + added > MAX_ELEMENTS {
            return Err(GrammarError::TooBig { at: self.pos(i) });
        }
        if self.syms.len() as u64 + n_opt > MAX_RULES as u64 {
            return Err(GrammarError::TooManyRules { at: self.pos(i) });
        }
        self.elements += added;
        let prev = rule[last..].to_vec();
        if min == 0 {
            rule.truncate(last);
        } else {
            for _ in 1..min {
                rule.extend_from_slice(&prev);
            }
        }
        let mut last_rec = 0;
        for k in 0..n_opt {
            let id = self.new_sym(base, true, i)?;
            let mut rec = prev.clone();
            if k > 0 || max.is_none() {
                rec.push(El::Ref(if max.is_none() { id } else { last_rec }));
            }
            rec.push(El::Alt);
            rec.push(El::End);
            self.add_rule(id, rec);
            last_rec = id;
        }
        if n_opt > 0 {
            rule.push(El::Ref(last_rec));
        }
        *n_prev_rules *= total_rules;
        Ok(())
    }

    /// llama.cpp's `parse_sequence`.
    fn sequence(&mut self, mut i: usize, base: &'a str, rule: &mut Vec<El>, nested: bool, depth: usize) -> Res<usize> {
        let mut last = rule.len();
        let mut n_prev_rules: u64 = 1;
        loop {
            let c = self.at(i);
            match c {
                b'"' => {
                    i += 1;
                    last = rule.len();
                    n_prev_rules = 1;
                    while self.at(i) != b'"' {
                        let (ch, next) = self.one_char(i)?;
                        self.push(rule, El::Char(ch), i)?;
                        i = next;
                    }
                    i = self.space(i + 1, nested);
                }
                b'[' => {
                    i += 1;
                    let negated = self.at(i) == b'^';
                    if negated {
                        i += 1;
                    }
                    last = rule.len();
                    n_prev_rules = 1;
                    while self.at(i) != b']' {
                        let (ch, next) = self.one_char(i)?;
                        let el = match (last < rule.len(), negated) {
                            (true, _) => El::CharAlt(ch),
                            (false, true) => El::CharNot(ch),
                            (false, false) => El::Char(ch),
                        };
                        self.push(rule, el, i)?;
                        i = next;
                        if self.at(i) == b'-' && self.at(i + 1) != b']' {
                            let (upper, next) = self.one_char(i + 1)?;
                            self.push(rule, El::RngUpper(upper), i)?;
                            i = next;
                        }
                    }
                    i = self.space(i + 1, nested);
                }
                b'<' | b'!' => {
                    let start = if c == b'!' { i + 1 } else { i };
                    let (_, end) = self.token(start)?;
                    last = rule.len();
                    n_prev_rules = 1;
                    self.push(rule, if c == b'!' { El::TokenNot } else { El::Token }, i)?;
                    i = self.space(end, nested);
                }
                b'(' => {
                    if depth >= MAX_DEPTH {
                        return Err(GrammarError::TooDeep { at: self.pos(i) });
                    }
                    let open = i;
                    i = self.space(i + 1, true);
                    let before = self.syms.len();
                    let sub = self.new_sym(base, true, i)?;
                    i = self.alternates(i, base, sub, true, depth + 1)?;
                    n_prev_rules = (self.syms.len() - before).max(1) as u64;
                    last = rule.len();
                    self.push(rule, El::Ref(sub), open)?;
                    if self.at(i) != b')' {
                        return Err(self.syntax(i, "expecting ')'"));
                    }
                    i = self.space(i + 1, nested);
                }
                b'.' => {
                    last = rule.len();
                    n_prev_rules = 1;
                    self.push(rule, El::Any, i)?;
                    i = self.space(i + 1, nested);
                }
                b'*' | b'+' | b'?' => {
                    let at = i;
                    i = self.space(i + 1, nested);
                    let (min, max) = match c {
                        b'*' => (0, None),
                        b'+' => (1, None),
                        _ => (0, Some(1)),
                    };
                    self.repeat(rule, last, &mut n_prev_rules, min, max, base, at)?;
                }
                b'{' => {
                    let at = i;
                    i = self.space(i + 1, nested);
                    if !self.at(i).is_ascii_digit() {
                        return Err(self.syntax(i, "expecting an integer"));
                    }
                    let (min, end) = self.int(i);
                    i = self.space(end, nested);
                    let max = match self.at(i) {
                        b'}' => {
                            i = self.space(i + 1, nested);
                            Some(min)
                        }
                        b',' => {
                            i = self.space(i + 1, nested);
                            let mut max = None;
                            if self.at(i).is_ascii_digit() {
                                let (m, end) = self.int(i);
                                max = Some(m);
                                i = self.space(end, nested);
                            }
                            if self.at(i) != b'}' {
                                return Err(self.syntax(i, "expecting '}'"));
                            }
                            i = self.space(i + 1, nested);
                            max
                        }
                        _ => return Err(self.syntax(i, "expecting ',' or '}'")),
                    };
                    // Stricter than llama.cpp, which turns a maximum above 2000 into "no
                    // maximum" and, for a minimum above the maximum, loops making rules.
                    if min > MAX_REPEAT || max.is_some_and(|m| m > MAX_REPEAT) {
                        return Err(GrammarError::RepeatTooLarge { at: self.pos(at) });
                    }
                    if max.is_some_and(|m| min > m) {
                        return Err(GrammarError::EmptyRange { at: self.pos(at) });
                    }
                    self.repeat(rule, last, &mut n_prev_rules, min, max, base, at)?;
                }
                c if is_word(c) => {
                    let end = self.name(i)?;
                    let text = self.text;
                    let id = self.symbol(&text[i..end], i)?;
                    let at = i;
                    i = self.space(end, nested);
                    last = rule.len();
                    n_prev_rules = 1;
                    self.push(rule, El::Ref(id), at)?;
                }
                _ => return Ok(i),
            }
        }
    }

    /// llama.cpp's `parse_alternates`.
    fn alternates(&mut self, mut i: usize, base: &'a str, id: u32, nested: bool, depth: usize) -> Res<usize> {
        let mut rule = Vec::new();
        i = self.sequence(i, base, &mut rule, nested, depth)?;
        while self.at(i) == b'|' {
            self.push(&mut rule, El::Alt, i)?;
            i = self.space(i + 1, true);
            i = self.sequence(i, base, &mut rule, nested, depth)?;
        }
        self.push(&mut rule, El::End, i)?;
        self.add_rule(id, rule);
        Ok(i)
    }

    /// llama.cpp's `parse_rule`.
    fn rule(&mut self, i: usize) -> Res<usize> {
        let end = self.name(i)?;
        let text = self.text;
        let name = &text[i..end];
        let mut p = self.space(end, false);
        let id = self.symbol(name, i)?;
        if self.src.get(p..p + 3) != Some(b"::=") {
            return Err(self.syntax(p, "expecting ::="));
        }
        p = self.space(p + 3, true);
        p = self.alternates(p, name, id, false, 0)?;
        match self.at(p) {
            b'\r' => p += if self.at(p + 1) == b'\n' { 2 } else { 1 },
            b'\n' => p += 1,
            0 => {}
            _ => return Err(self.syntax(p, "expecting a newline or the end")),
        }
        Ok(self.space(p, true))
    }

    fn rule_name(&self, id: usize) -> RuleName {
        let sym = &self.syms[id];
        let mut name: String = sym.name.chars().take(NAME_CHARS).collect();
        if sym.name.len() > name.len() {
            name.push('…');
        }
        RuleName { name, synthesized: sym.synthesized }
    }
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
                if let Item::Ref(s) = *it {
                    if !reach[s] {
                        reach[s] = true;
                        stack.push(s);
                    }
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
mod tests {
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
}
