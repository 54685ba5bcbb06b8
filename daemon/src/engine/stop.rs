//! Stop sequences: the generated text ends just before the first place any of them appears,
//! and no text that could still turn out to begin one is streamed before that is known.
//!
//! Each token's text is held back only while the text so far ends with the beginning of a
//! stop sequence; it is released, in order and whole, once that can no longer complete. So
//! the streamed pieces always add up to the final text, and every token still gets exactly
//! one event (a token wholly inside a stop sequence or after it gets an empty piece).

use std::collections::VecDeque;

use hearth_ffi::Token;

/// A token's event, once its text may be streamed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    pub index: u32,
    pub id: Token,
    pub text: String,
}

#[derive(Debug, Default)]
pub struct StopFilter {
    stops: Vec<String>,
    /// Tokens whose text is not streamed yet, in order.
    pending: VecDeque<Released>,
    /// Bytes of the text released so far. No stop sequence can begin before this.
    released: usize,
}

impl StopFilter {
    /// Empty stop strings are ignored.
    pub fn new(stops: &[String]) -> Self {
        let stops = stops.iter().filter(|s| !s.is_empty()).cloned().collect();
        Self { stops, ..Self::default() }
    }

    /// Takes the next token, whose `piece` was just appended to `text` (the whole text so
    /// far), and puts what may be streamed now into `out`. Returns true when a stop sequence
    /// ended the text: `text` is then cut before it and everything pending is released.
    pub fn push(&mut self, text: &mut String, index: u32, id: Token, piece: String, out: &mut Vec<Released>) -> bool {
        self.pending.push_back(Released { index, id, text: piece });
        if self.stops.is_empty() {
            self.release(text.len(), out);
            return false;
        }
        // `released` is a character boundary: it is the length of whole pieces.
        let from = self.released;
        let found = self.stops.iter().filter_map(|s| text[from..].find(s.as_str())).min();
        if let Some(at) = found.map(|p| from + p) {
            text.truncate(at);
            self.cut(at, out);
            return true;
        }
        let hold = self.stops.iter().map(|s| open_prefix(text, s)).max().unwrap_or(0);
        self.release(text.len() - hold, out);
        false
    }

    /// Releases everything still held (the generation ended some other way).
    pub fn flush(&mut self, out: &mut Vec<Released>) {
        self.release(usize::MAX, out);
    }

    /// Releases pending tokens, whole, while the text they end at is within `upto` bytes.
    fn release(&mut self, upto: usize, out: &mut Vec<Released>) {
        while let Some(next) = self.pending.front() {
            if self.released.saturating_add(next.text.len()) > upto {
                break;
            }
            self.released += next.text.len();
            out.extend(self.pending.pop_front());
        }
    }

    /// Releases every pending token, their texts cut so they end at byte `at` of the text.
    fn cut(&mut self, at: usize, out: &mut Vec<Released>) {
        for mut r in self.pending.drain(..) {
            let keep = at.saturating_sub(self.released).min(r.text.len());
            // `at` and `released` are character boundaries of the text, so `keep` is one of
            // this piece.
            r.text.truncate(keep);
            self.released += keep;
            out.push(r);
        }
    }
}

/// The length of the longest end of `text` that is a proper beginning of `stop`.
fn open_prefix(text: &str, stop: &str) -> usize {
    (1..stop.len()).rev().filter(|&k| stop.is_char_boundary(k)).find(|&k| text.ends_with(&stop[..k])).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `pieces` through a filter of `stops`: (the final text, the streamed pieces, stopped).
    fn run(stops: &[&str], pieces: &[&str]) -> (String, Vec<String>, bool) {
        let stops: Vec<String> = stops.iter().map(|s| (*s).to_owned()).collect();
        let mut f = StopFilter::new(&stops);
        let (mut text, mut out, mut stopped) = (String::new(), Vec::new(), false);
        for (i, p) in pieces.iter().enumerate() {
            text.push_str(p);
            if f.push(&mut text, i as u32, i as Token, (*p).to_owned(), &mut out) {
                stopped = true;
                break;
            }
        }
        if !stopped {
            f.flush(&mut out);
        }
        let indices: Vec<u32> = out.iter().map(|r| r.index).collect();
        assert_eq!(indices, (0..indices.len() as u32).collect::<Vec<_>>(), "one event per token, in order");
        let streamed: String = out.iter().map(|r| r.text.as_str()).collect();
        assert_eq!(streamed, text, "the streamed pieces add up to the text");
        (text, out.into_iter().map(|r| r.text).collect(), stopped)
    }

    #[test]
    fn the_text_ends_exactly_before_the_first_stop() {
        assert_eq!(
            run(&["\n\n"], &["Hello", "\n", "\n", "World"]),
            ("Hello".into(), vec!["Hello".into(), String::new(), String::new()], true)
        );
        // Inside one piece, with text after it.
        assert_eq!(run(&["END"], &["abcENDxyz"]).0, "abc");
        // The earliest of several, whichever is listed first.
        assert_eq!(run(&["zz", "b"], &["a", "bzz"]).0, "a");
        // At the very start.
        assert_eq!(run(&["x"], &["x", "y"]), (String::new(), vec![String::new()], true));
    }

    #[test]
    fn text_is_held_only_while_it_may_begin_a_stop() {
        let stops: Vec<String> = vec!["</answer>".into()];
        let mut f = StopFilter::new(&stops);
        let (mut text, mut out) = (String::new(), Vec::new());
        for (i, p) in ["one ", "</ans", "wer!"].iter().enumerate() {
            text.push_str(p);
            assert!(!f.push(&mut text, i as u32, 0, (*p).to_owned(), &mut out));
            let streamed: Vec<&str> = out.iter().map(|r| r.text.as_str()).collect();
            match i {
                0 => assert_eq!(streamed, ["one "]),
                1 => assert_eq!(streamed, ["one "], "'</ans' may begin the stop"),
                _ => assert_eq!(streamed, ["one ", "</ans", "wer!"], "'</answer!' cannot"),
            }
        }
    }

    #[test]
    fn a_false_start_overlapping_the_real_stop_is_found() {
        // "aab": the first 'a' begins a false start; the stop begins at the second.
        assert_eq!(run(&["ab"], &["a", "a", "b"]).0, "a");
        assert_eq!(run(&["abab"], &["ab", "ab", "ab"]).0, "");
        assert_eq!(run(&["bab"], &["ab", "ab"]).0, "a");
    }

    #[test]
    fn multibyte_text_and_stops_are_cut_on_characters() {
        assert_eq!(run(&["é!"], &["caf", "é", "!", "x"]).0, "caf");
        assert_eq!(run(&["ü"], &["grün"]).0, "gr");
        // "é" is two bytes: the held end is a whole character or nothing.
        let (text, _, stopped) = run(&["éa"], &["é", "b"]);
        assert_eq!((text.as_str(), stopped), ("éb", false));
    }

    #[test]
    fn without_stops_or_a_match_nothing_is_lost() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), vec!["a".into(), "b".into()], false));
        assert_eq!(run(&[""], &["a"]).0, "a");
        // Held at the end, released by the flush.
        assert_eq!(run(&["\n\n"], &["a", "\n"]), ("a\n".into(), vec!["a".into(), "\n".into()], false));
    }
}
