//! Speculative decoding by prompt lookup: a sequence's next tokens are guessed from what
//! followed the latest earlier occurrence of its last few tokens, in its prompt or in what
//! it generated. No second model: rewriting, correcting, quoting, JSON and tool calls, code
//! edits repeat long runs of their input, and those runs are guessed right.
//!
//! The worker verifies a draft in the same decode step as the sequence's next token (and
//! the other sequences' steps): the logits at each drafted position are bit for bit those a
//! one-token step computes there (hearth-ffi's batch_exactness tests it), so sampling
//! position by position and keeping a draft token only while it equals the sampled one
//! gives exactly the tokens of plain decoding, under any sampler, seed or grammar: each
//! token is still drawn from the same distribution, by the same sampler, in the same order.
//!
//! A wrong guess costs its place in the batch. The drafter adapts: it drafts more after a
//! draft was taken whole, less after a partial one, and after a draft was refused outright
//! it waits a few steps before it guesses again (longer after each refusal in a row), so
//! open-ended text, which rarely repeats its input, pays little for it.

use std::collections::HashMap;

use hearth_ffi::Token;

/// Tokens that must match before a guess is made: fewer guess wrong too often.
const NGRAM: usize = 3;
/// The longest draft, and the first one's length.
pub(super) const MAX_DRAFT: usize = 12;
const FIRST_DRAFT: usize = 4;
/// The longest wait after refusals in a row, in steps.
const MAX_COOLDOWN: u32 = 16;

/// One sequence's drafter and its counts.
#[derive(Debug)]
pub(super) struct Drafter {
    /// Each n-gram of the text → the index just past its latest occurrence (with at least
    /// one token after it), for n-grams ending before `indexed`.
    index: HashMap<[Token; NGRAM], usize>,
    indexed: usize,
    /// The most tokens the next draft may hold.
    limit: usize,
    /// Steps left before the next guess, and drafts refused in a row.
    cooldown: u32,
    refused: u32,
    /// Draft tokens verified, and those taken.
    pub drafted: u32,
    pub accepted: u32,
}

impl Default for Drafter {
    fn default() -> Self {
        Self {
            index: HashMap::new(),
            indexed: NGRAM,
            limit: FIRST_DRAFT,
            cooldown: 0,
            refused: 0,
            drafted: 0,
            accepted: 0,
        }
    }
}

impl Drafter {
    /// Fills `draft` with at most `max` tokens guessed to follow `text` (the prompt and
    /// everything generated, whose last token is the one fed next); empty when there is no
    /// guess or the drafter is cooling down.
    pub fn propose(&mut self, prompt: &[Token], generated: &[Token], max: usize, draft: &mut Vec<Token>) {
        draft.clear();
        let at = |i: usize| if i < prompt.len() { prompt[i] } else { generated[i - prompt.len()] };
        let len = prompt.len() + generated.len();
        // The n-grams followed by at least one token: all but the last one.
        while self.indexed < len {
            let key = std::array::from_fn(|k| at(self.indexed - NGRAM + k));
            self.index.insert(key, self.indexed);
            self.indexed += 1;
        }
        if self.cooldown > 0 {
            self.cooldown -= 1;
            return;
        }
        let max = max.min(self.limit);
        if len < NGRAM || max == 0 {
            return;
        }
        let key: [Token; NGRAM] = std::array::from_fn(|k| at(len - NGRAM + k));
        if let Some(&from) = self.index.get(&key) {
            draft.extend((from..len.min(from + max)).map(at));
        }
    }

    /// Takes the verdict on a draft of `drafted` tokens: the first `accepted` were taken.
    pub fn verified(&mut self, drafted: usize, accepted: usize) {
        if drafted == 0 {
            return;
        }
        self.drafted = self.drafted.saturating_add(drafted as u32);
        self.accepted = self.accepted.saturating_add(accepted as u32);
        if accepted == drafted {
            self.limit = (self.limit * 2).min(MAX_DRAFT);
            self.refused = 0;
        } else if accepted > 0 {
            self.limit = (accepted + 1).clamp(2, MAX_DRAFT);
            self.refused = 0;
        } else {
            self.limit = (self.limit / 2).max(2);
            self.refused += 1;
            self.cooldown = self.refused.min(MAX_COOLDOWN);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn propose(d: &mut Drafter, text: &[Token], max: usize) -> Vec<Token> {
        let mut out = Vec::new();
        let (prompt, generated) = text.split_at(text.len() / 2);
        d.propose(prompt, generated, max, &mut out);
        out
    }

    #[test]
    fn guesses_what_followed_the_latest_match() {
        let mut d = Drafter::default();
        // "1 2 3" occurs twice before the end; the latest is followed by 7 8.
        let text = [1, 2, 3, 4, 5, 1, 2, 3, 7, 8, 9, 1, 2, 3];
        assert_eq!(propose(&mut d, &text, 2), vec![7, 8]);
        assert_eq!(propose(&mut d, &text, 100), vec![7, 8, 9, 1], "at most the limit (first draft)");
    }

    #[test]
    fn no_match_no_draft_and_short_texts_are_fine() {
        let mut d = Drafter::default();
        assert!(propose(&mut d, &[1, 2, 3, 4, 5, 6], 8).is_empty());
        assert!(propose(&mut Drafter::default(), &[], 8).is_empty());
        assert!(propose(&mut Drafter::default(), &[1, 1], 8).is_empty());
        // A run of one token: the match overlaps the end, the guess is more of it.
        assert_eq!(propose(&mut Drafter::default(), &[5, 5, 5, 5, 5], 8), vec![5]);
        assert!(propose(&mut Drafter::default(), &[1, 2, 3, 1, 2, 3], 0).is_empty());
    }

    #[test]
    fn the_index_grows_with_the_text() {
        let mut d = Drafter::default();
        let mut text = vec![10, 11, 12, 13, 14];
        assert!(propose(&mut d, &text, 8).is_empty());
        text.extend([10, 11, 12]);
        assert_eq!(propose(&mut d, &text, 8), vec![13, 14, 10, 11]);
    }

    #[test]
    fn drafts_grow_when_taken_and_pause_when_refused() {
        let mut d = Drafter::default();
        d.verified(4, 4);
        assert_eq!(d.limit, 8);
        d.verified(8, 8);
        d.verified(12, 12);
        assert_eq!(d.limit, MAX_DRAFT);
        d.verified(12, 3);
        assert_eq!(d.limit, 4);
        let text = [1, 2, 3, 9, 1, 2, 3];
        for refusals in 1..=3u32 {
            d.verified(2, 0);
            for _ in 0..refusals {
                assert!(propose(&mut d, &text, 8).is_empty(), "cooling down after {refusals} refusals");
            }
            assert!(!propose(&mut d, &text, 8).is_empty());
        }
        assert_eq!((d.drafted, d.accepted), (4 + 8 + 12 + 12 + 6, 4 + 8 + 12 + 3));
    }
}
