//! The GBNF parser, mirroring llama.cpp's `llama_grammar_parser` element for element.

use std::collections::HashMap;

use super::{
    El, GrammarError, LLAMA_REPETITION_THRESHOLD, MAX_DEPTH, MAX_ELEMENTS, MAX_REPEAT, MAX_RULES, NAME_CHARS, Pos,
    RuleName,
};

#[derive(Debug)]
pub(super) struct Sym<'a> {
    /// The rule's name, or for a synthesized rule the rule it was made in.
    pub(super) name: &'a str,
    pub(super) synthesized: bool,
}

pub(super) struct Parser<'a> {
    pub(super) text: &'a str,
    pub(super) src: &'a [u8],
    pub(super) ids: HashMap<&'a str, u32>,
    pub(super) syms: Vec<Sym<'a>>,
    pub(super) rules: Vec<Option<Vec<El>>>,
    /// Elements made so far, an upper bound of what llama.cpp holds.
    pub(super) elements: u64,
}

type Res<T> = Result<T, GrammarError>;

fn is_word(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'-'
}

impl<'a> Parser<'a> {
    pub(super) fn at(&self, i: usize) -> u8 {
        // llama.cpp reads a NUL-terminated string; past the end reads as NUL.
        self.src.get(i).copied().unwrap_or(0)
    }

    pub(super) fn pos(&self, i: usize) -> Pos {
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

    pub(super) fn space(&self, mut i: usize, newline_ok: bool) -> usize {
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
    pub(super) fn rule(&mut self, i: usize) -> Res<usize> {
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

    pub(super) fn rule_name(&self, id: usize) -> RuleName {
        let sym = &self.syms[id];
        let mut name: String = sym.name.chars().take(NAME_CHARS).collect();
        if sym.name.len() > name.len() {
            name.push('…');
        }
        RuleName { name, synthesized: sym.synthesized }
    }
}
