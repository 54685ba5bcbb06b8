//! A token batch for `llama_decode`: tokens of one or several sequences decoded together.

use llama_cpp_sys_2 as sys;

use crate::{Error, Pos, Result, SeqId, Token};

/// A reusable batch. Each entry is a token at a position in one or more sequences, and a flag
/// saying whether its logits are wanted (only those entries can be sampled from).
#[derive(Debug)]
pub struct Batch {
    raw: sys::llama_batch,
    capacity: usize,
    n_seq_max: usize,
}

// SAFETY: the batch's arrays are heap memory owned exclusively by this value; nothing in
// llama.cpp keeps a pointer to them after llama_decode returns.
unsafe impl Send for Batch {}

impl Batch {
    /// A batch with room for `capacity` tokens, each in up to `n_seq_max` sequences.
    pub fn new(capacity: usize, n_seq_max: usize) -> Self {
        let capacity = capacity.max(1);
        let n_seq_max = n_seq_max.max(1);
        // SAFETY: allocates arrays of `capacity` entries (and `n_seq_max` seq ids per entry);
        // embd = 0 means token ids, not embeddings. Freed once in Drop.
        let raw = unsafe {
            sys::llama_batch_init(
                i32::try_from(capacity).unwrap_or(i32::MAX),
                0,
                i32::try_from(n_seq_max).unwrap_or(i32::MAX),
            )
        };
        Self { raw, capacity, n_seq_max }
    }

    /// Number of tokens in the batch.
    pub fn len(&self) -> usize {
        self.raw.n_tokens as usize
    }

    /// Whether the batch holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.raw.n_tokens == 0
    }

    /// Maximum number of tokens.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Room left.
    pub fn remaining(&self) -> usize {
        self.capacity - self.len()
    }

    /// Empties the batch for reuse (keeps the allocation).
    pub fn clear(&mut self) {
        self.raw.n_tokens = 0;
    }

    /// Appends a token and returns its index in the batch (the index to sample from when
    /// `logits` is set).
    pub fn push(&mut self, token: Token, pos: Pos, seqs: &[SeqId], logits: bool) -> Result<i32> {
        let i = self.len();
        if i >= self.capacity {
            return Err(Error::BatchFull { capacity: self.capacity });
        }
        if seqs.is_empty() || seqs.len() > self.n_seq_max {
            return Err(Error::TooManySeqIds { given: seqs.len(), max: self.n_seq_max });
        }
        // SAFETY: `i < capacity`, and llama_batch_init allocated every array with `capacity`
        // entries and every `seq_id[i]` with `n_seq_max >= seqs.len()` entries.
        unsafe {
            *self.raw.token.add(i) = token;
            *self.raw.pos.add(i) = pos;
            *self.raw.n_seq_id.add(i) = seqs.len() as i32;
            let dst = *self.raw.seq_id.add(i);
            std::ptr::copy_nonoverlapping(seqs.as_ptr(), dst, seqs.len());
            *self.raw.logits.add(i) = i8::from(logits);
        }
        self.raw.n_tokens += 1;
        Ok(i as i32)
    }

    pub(crate) fn raw(&self) -> sys::llama_batch {
        self.raw
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        // SAFETY: `raw` came from llama_batch_init and is freed exactly once here.
        unsafe { sys::llama_batch_free(self.raw) };
    }
}
