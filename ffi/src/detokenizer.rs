//! Incremental detokenization that never splits a UTF-8 character across emitted pieces.

/// Turns a stream of token bytes into text pieces. Byte-level vocabularies may emit a
/// multi-byte character across several tokens; the detokenizer holds back an incomplete
/// trailing sequence until the bytes that complete it arrive. Invalid bytes become U+FFFD.
#[derive(Debug, Default)]
pub struct Detokenizer {
    pending: Vec<u8>,
}

impl Detokenizer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the bytes of one token and returns the text that is now complete (maybe empty).
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // The prefix up to `valid` is checked UTF-8.
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or_default());
                    match e.error_len() {
                        // An incomplete character at the end: keep it for the next token.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        // Bytes that can never become valid: replace and go on.
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Ends the stream: whatever incomplete bytes remain become U+FFFD.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::Detokenizer;

    #[test]
    fn holds_back_split_characters() {
        let mut d = Detokenizer::new();
        let snow = "é☃🦀".as_bytes();
        let mut out = Vec::new();
        for b in snow {
            out.push(d.push(std::slice::from_ref(b)));
        }
        out.push(d.finish());
        assert!(out.iter().all(|p| p.is_empty() || std::str::from_utf8(p.as_bytes()).is_ok()));
        assert_eq!(out.concat(), "é☃🦀");
        // Each character is emitted in one piece, on the byte that completes it.
        assert_eq!(out.iter().filter(|p| !p.is_empty()).count(), 3);
    }

    #[test]
    fn replaces_invalid_bytes_and_dangling_tail() {
        let mut d = Detokenizer::new();
        assert_eq!(d.push(b"a\xffb"), "a\u{fffd}b");
        assert_eq!(d.push(b"\xe2\x98"), "");
        assert_eq!(d.finish(), "\u{fffd}");
    }
}
