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
//! draft was taken whole, less after a partial one, and after a draft was refused outright,
//! or while too few of its recent draft tokens were taken to pay for the rows, it waits a
//! few steps before it guesses again (longer after each such draft in a row), so open-ended
//! text, which rarely repeats its input for long, pays little for it.
//!
//! What pays: a step reads the weights once (W) and computes each row (c). Alone, a drafted
//! row costs c and a taken one saves W + c; in a step that n sequences share, a taken row
//! saves only W/n + c. With W ≈ c — the default model on a phone CPU; bigger models read
//! relatively more — drafts pay when more than n/(n + 1) of their tokens are taken: half
//! alone, 8/9 beside 7 others.

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
    /// Steps left before the next guess, and drafts in a row that did not pay.
    cooldown: u32,
    refused: u32,
    /// The share of draft tokens taken, over recent drafts (the newest weighs 1/4), and the
    /// share the last draft had to reach to pay for itself.
    taken: f32,
    pays: f32,
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
            taken: 1.0,
            pays: 0.5,
            drafted: 0,
            accepted: 0,
        }
    }
}

impl Drafter {
    /// Fills `draft` with at most `max` tokens guessed to follow `text` (the prompt and
    /// everything generated, whose last token is the one fed next) in a step that
    /// `decoding` sequences share; empty when there is no guess or the drafter is cooling
    /// down.
    pub fn propose(
        &mut self,
        prompt: &[Token],
        generated: &[Token],
        max: usize,
        decoding: usize,
        draft: &mut Vec<Token>,
    ) {
        draft.clear();
        let n = decoding.max(1) as f32;
        self.pays = n / (n + 1.0);
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
            // An image's placeholders are no tokens to feed: a draft ends before them.
            draft.extend((from..len.min(from + max)).map(at).take_while(|t| !super::image::is_placeholder(*t)));
        }
    }

    /// Takes the verdict on a draft of `drafted` tokens: the first `accepted` were taken.
    pub fn verified(&mut self, drafted: usize, accepted: usize) {
        if drafted == 0 {
            return;
        }
        self.drafted = self.drafted.saturating_add(drafted as u32);
        self.accepted = self.accepted.saturating_add(accepted as u32);
        self.taken = 0.75 * self.taken + 0.25 * accepted as f32 / drafted as f32;
        self.limit = if accepted == drafted {
            (self.limit * 2).min(MAX_DRAFT)
        } else if accepted > 0 {
            (accepted + 1).clamp(2, MAX_DRAFT)
        } else {
            (self.limit / 2).max(2)
        };
        if accepted == 0 || self.taken < self.pays {
            self.refused += 1;
            self.cooldown = self.refused.min(MAX_COOLDOWN);
        } else {
            self.refused = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn propose(d: &mut Drafter, text: &[Token], max: usize) -> Vec<Token> {
        let mut out = Vec::new();
        let (prompt, generated) = text.split_at(text.len() / 2);
        d.propose(prompt, generated, max, 1, &mut out);
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

    #[test]
    fn drafts_mostly_refused_pause_too() {
        // Open-ended text: a token or so of each draft is taken, the rest refused.
        let mut d = Drafter::default();
        let text = [1, 2, 3, 9, 8, 7, 1, 2, 3];
        let mut paused = 0;
        for _ in 0..40 {
            let draft = propose(&mut d, &text, 8);
            if draft.is_empty() {
                paused += 1;
            } else {
                d.verified(draft.len().max(4), 1);
            }
        }
        assert!(paused >= 25, "drafted in {} of 40 steps", 40 - paused);
        // Half or more taken: no pause alone; beside 7 other sequences, pauses.
        let mut d = Drafter::default();
        for _ in 0..10 {
            assert!(!propose(&mut d, &text, 8).is_empty());
            d.verified(2, 1);
        }
        let (mut d, mut out, mut paused) = (Drafter::default(), Vec::new(), 0);
        let (prompt, generated) = text.split_at(4);
        for _ in 0..40 {
            d.propose(prompt, generated, 8, 8, &mut out);
            if out.is_empty() {
                paused += 1;
            } else {
                d.verified(2, 1);
            }
        }
        assert!(paused >= 25, "beside 7 others, drafted in {} of 40 steps", 40 - paused);
    }
}
