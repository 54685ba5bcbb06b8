//! Images in: a vision model's projector (libmtmd's `mtmd_context`), which turns RGB pixels
//! into embeddings the language model decodes in place of tokens.
//!
//! Only RGB pixels cross into C: decoding PNG/JPEG is the caller's (in Rust, with its own
//! limits), never libmtmd's helper, whose fallbacks spawn ffmpeg on data it cannot read.
//! App text never passes through libmtmd either: the image is tokenized alone (the marker
//! and nothing else), so whatever text a projector type puts around an image (begin/end
//! tokens, slice markers) comes back as [`ImagePiece::Text`], and the caller tokenizes the
//! app's text itself.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;

use llama_cpp_sys_2 as sys;

use crate::{Error, Model, Pos, Result, SeqId, Token};

/// Largest side, in pixels, of an image handed to the projector. Callers cap what they
/// decode well below this; this is the last line against a huge allocation in C.
pub const MAX_SIDE: u32 = 16_384;

/// One piece of an image's tokenization, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum ImagePiece {
    /// Text tokens the projector type puts around (or between) image embeddings.
    Text(Vec<Token>),
    /// Embeddings: `n_tokens` rows of the language model's input width, row-major.
    Embeddings { n_tokens: usize, data: Vec<f32> },
}

/// A loaded projector, bound to the language model it was made for.
#[derive(Debug)]
pub struct Projector {
    ptr: NonNull<sys::mtmd_context>,
    /// The language model the projector refers to: kept alive as long as the projector.
    model: Arc<Model>,
}

// SAFETY: the mtmd_context is owned exclusively by this value; its encode calls are not
// thread-safe, and every one takes `&mut self`, so one thread at a time uses it.
unsafe impl Send for Projector {}

impl Projector {
    /// Loads the projector file at `path` for `model`, running its encoder on the CPU with
    /// `n_threads` threads. Fails when the file is not a vision projector, or one for a
    /// model of another embedding width.
    pub fn load(path: &Path, model: Arc<Model>, n_threads: i32) -> Result<Self> {
        let c_path =
            CString::new(path.as_os_str().as_bytes()).map_err(|_| Error::InteriorNul { what: "projector path" })?;
        // SAFETY: returns a plain struct of defaults.
        let mut params = unsafe { sys::mtmd_context_params_default() };
        params.use_gpu = false;
        params.print_timings = false;
        params.n_threads = n_threads.max(1);
        // SAFETY: `c_path` is NUL-terminated and lives across the call; the model pointer is
        // valid (the Arc is kept in the result, so it outlives the context); `params` is the
        // library's own default with plain fields changed (media_marker stays the default).
        let raw = unsafe { sys::mtmd_init_from_file(c_path.as_ptr(), model.as_ptr(), params) };
        let ptr = NonNull::new(raw).ok_or_else(|| Error::ProjectorLoad { path: path.to_owned() })?;
        let projector = Self { ptr, model };
        let refuse = |reason: &str| Error::ProjectorUnsupported { path: path.to_owned(), reason: reason.to_owned() };
        // SAFETY: valid context; plain queries.
        let (vision, mrope, non_causal) = unsafe {
            let ctx = projector.ptr.as_ptr();
            (
                sys::mtmd_support_vision(ctx),
                sys::mtmd_decode_use_mrope(ctx),
                sys::mtmd_decode_use_non_causal(ctx, std::ptr::null()),
            )
        };
        if !vision {
            return Err(refuse("it has no vision encoder"));
        }
        // M-RoPE models take several positions per embedding row (a 2-D grid): a batch made
        // here holds one, and llama.cpp would read past it.
        if mrope {
            return Err(refuse("its model places image rows on a 2-D grid (M-RoPE), which Hearth does not decode"));
        }
        // Non-causal image attention needs the whole image in one micro-batch with causal
        // attention off for the context: not how Hearth's shared batches run.
        if non_causal {
            return Err(refuse("its image rows need non-causal attention, which Hearth does not decode"));
        }
        Ok(projector)
    }

    /// Width of one embedding row: the language model's input width.
    pub fn n_embd(&self) -> usize {
        // SAFETY: valid model pointer (owned by the Arc).
        usize::try_from(unsafe { sys::llama_model_n_embd_inp(self.model.as_ptr()) }).unwrap_or(0)
    }

    /// Tokenizes and encodes one image of `nx` x `ny` RGB pixels (`rgb` holds exactly
    /// `nx * ny * 3` bytes): what the language model decodes for it, in order.
    pub fn encode(&mut self, rgb: &[u8], nx: u32, ny: u32) -> Result<Vec<ImagePiece>> {
        let bad = |reason: String| Error::Image { reason };
        if nx == 0 || ny == 0 || nx > MAX_SIDE || ny > MAX_SIDE {
            return Err(bad(format!("{nx}x{ny} pixels is outside 1..={MAX_SIDE} a side")));
        }
        if rgb.len() as u64 != u64::from(nx) * u64::from(ny) * 3 {
            return Err(bad(format!("{} bytes is not {nx}x{ny} RGB pixels", rgb.len())));
        }
        let bitmap = Bitmap::new(rgb, nx, ny).ok_or_else(|| bad("libmtmd could not hold the pixels".into()))?;
        let chunks = Chunks::new().ok_or_else(|| bad("libmtmd could not allocate chunks".into()))?;
        // SAFETY: returns a static NUL-terminated string owned by libmtmd.
        let marker = unsafe { sys::mtmd_default_marker() };
        // SAFETY: `marker` is libmtmd's static NUL-terminated string.
        let marker_len = unsafe { std::ffi::CStr::from_ptr(marker) }.to_bytes().len();
        let text = sys::mtmd_input_text { text: marker, text_len: marker_len, add_special: false, parse_special: true };
        let bitmaps = [bitmap.ptr.as_ptr().cast_const()];
        // SAFETY: valid context and chunk list; `text` names one marker and exactly one bitmap
        // is passed (pointer and count agree); all live across the call.
        let rc = unsafe { sys::mtmd_tokenize(self.ptr.as_ptr(), chunks.ptr.as_ptr(), &text, bitmaps.as_ptr(), 1) };
        if rc != 0 {
            return Err(bad(format!("libmtmd could not tokenize the image (status {rc})")));
        }
        let n_embd = self.n_embd();
        let mut out = Vec::new();
        // SAFETY: valid chunk list.
        let n = unsafe { sys::mtmd_input_chunks_size(chunks.ptr.as_ptr()) };
        for i in 0..n {
            // SAFETY: `i` < size; the chunk is owned by the list, which outlives this loop body.
            let chunk = unsafe { sys::mtmd_input_chunks_get(chunks.ptr.as_ptr(), i) };
            // SAFETY: `chunk` is a valid chunk of the list.
            let kind = unsafe { sys::mtmd_input_chunk_get_type(chunk) };
            if kind == sys::MTMD_INPUT_CHUNK_TYPE_TEXT {
                let mut len = 0usize;
                // SAFETY: valid text chunk; the returned array holds `len` tokens owned by the
                // chunk, copied out at once.
                let tokens = unsafe { sys::mtmd_input_chunk_get_tokens_text(chunk, &mut len) };
                if !tokens.is_null() && len > 0 {
                    // SAFETY: see above.
                    out.push(ImagePiece::Text(unsafe { std::slice::from_raw_parts(tokens, len) }.to_vec()));
                }
                continue;
            }
            if kind != sys::MTMD_INPUT_CHUNK_TYPE_IMAGE {
                return Err(bad("libmtmd made a chunk that is neither text nor image".into()));
            }
            // SAFETY: valid image chunk.
            let n_tokens = unsafe { sys::mtmd_input_chunk_get_n_tokens(chunk) };
            if n_tokens == 0 {
                return Err(bad("libmtmd made an image of no tokens".into()));
            }
            // SAFETY: valid image chunk.
            let n_pos = unsafe { sys::mtmd_input_chunk_get_n_pos(chunk) };
            if usize::try_from(n_pos).ok() != Some(n_tokens) {
                // M-RoPE projectors place image tokens on a 2-D grid: not supported here.
                return Err(bad("this projector's image positions are not one per token (M-RoPE)".into()));
            }
            // SAFETY: valid context and one of its chunks; not thread-safe, hence `&mut self`.
            let rc = unsafe { sys::mtmd_encode_chunk(self.ptr.as_ptr(), chunk) };
            if rc != 0 {
                return Err(bad(format!("libmtmd could not encode the image (status {rc})")));
            }
            // SAFETY: valid context; after a successful encode the buffer holds
            // n_tokens * n_embd floats, valid until the next encode (copied out at once).
            let embd = unsafe { sys::mtmd_get_output_embd(self.ptr.as_ptr()) };
            if embd.is_null() || n_embd == 0 {
                return Err(bad("libmtmd returned no embeddings".into()));
            }
            // SAFETY: see above.
            let data = unsafe { std::slice::from_raw_parts(embd, n_tokens * n_embd) }.to_vec();
            if data.iter().any(|x| !x.is_finite()) {
                return Err(bad("the projector's embeddings are not finite".into()));
            }
            out.push(ImagePiece::Embeddings { n_tokens, data });
        }
        Ok(out)
    }
}

impl Drop for Projector {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from mtmd_init_from_file and is freed exactly once, before the
        // model (a later field) is released.
        unsafe { sys::mtmd_free(self.ptr.as_ptr()) };
    }
}

/// An mtmd_bitmap, freed on drop.
struct Bitmap {
    ptr: NonNull<sys::mtmd_bitmap>,
}

impl Bitmap {
    fn new(rgb: &[u8], nx: u32, ny: u32) -> Option<Self> {
        // SAFETY: `rgb` holds nx * ny * 3 bytes (checked by the caller); libmtmd copies them.
        NonNull::new(unsafe { sys::mtmd_bitmap_init(nx, ny, rgb.as_ptr()) }).map(|ptr| Self { ptr })
    }
}

impl Drop for Bitmap {
    fn drop(&mut self) {
        // SAFETY: from mtmd_bitmap_init, freed once.
        unsafe { sys::mtmd_bitmap_free(self.ptr.as_ptr()) };
    }
}

/// An mtmd_input_chunks list, freed on drop.
struct Chunks {
    ptr: NonNull<sys::mtmd_input_chunks>,
}

impl Chunks {
    fn new() -> Option<Self> {
        // SAFETY: allocates an empty list.
        NonNull::new(unsafe { sys::mtmd_input_chunks_init() }).map(|ptr| Self { ptr })
    }
}

impl Drop for Chunks {
    fn drop(&mut self) {
        // SAFETY: from mtmd_input_chunks_init, freed once (with the chunks it owns).
        unsafe { sys::mtmd_input_chunks_free(self.ptr.as_ptr()) };
    }
}

impl crate::Context {
    /// Decodes `n` rows of embeddings (`data` holds `n * n_embd` floats) into `seq` at
    /// positions `pos..pos + n`, in micro-batches of at most `n_batch` rows; no logits. On
    /// an error the rows of the failed batch are not in the KV, earlier batches' are.
    pub fn decode_embeddings(&mut self, data: &[f32], n_embd: usize, pos: Pos, seq: SeqId) -> Result<()> {
        if n_embd == 0 || !data.len().is_multiple_of(n_embd) {
            return Err(Error::Image { reason: format!("{} floats are not rows of {n_embd}", data.len()) });
        }
        let n_batch = (self.params().n_batch as usize).max(1);
        let rows = data.len() / n_embd;
        let mut done = 0;
        while done < rows {
            let n = (rows - done).min(n_batch);
            let mut batch = EmbdBatch::new(n, n_embd);
            batch.fill(&data[done * n_embd..(done + n) * n_embd], pos + done as Pos, seq);
            // SAFETY: valid, exclusively borrowed context; the batch's arrays hold `n` rows.
            let rc = unsafe { sys::llama_decode(self.as_ptr(), batch.raw) };
            crate::context::decode_status(rc)?;
            done += n;
        }
        Ok(())
    }
}

/// A llama_batch of embedding rows in one sequence.
struct EmbdBatch {
    raw: sys::llama_batch,
    rows: usize,
    n_embd: usize,
}

impl EmbdBatch {
    fn new(rows: usize, n_embd: usize) -> Self {
        // SAFETY: allocates `rows` entries of `n_embd` floats, one sequence id each; freed in
        // Drop.
        let raw = unsafe {
            sys::llama_batch_init(i32::try_from(rows).unwrap_or(i32::MAX), i32::try_from(n_embd).unwrap_or(0), 1)
        };
        Self { raw, rows, n_embd }
    }

    /// Fills every row: `data` holds `rows * n_embd` floats.
    fn fill(&mut self, data: &[f32], pos: Pos, seq: SeqId) {
        assert_eq!(data.len(), self.rows * self.n_embd);
        // SAFETY: llama_batch_init allocated `rows * n_embd` floats in `embd` and `rows`
        // entries in every other array (one seq id each); `data` has exactly that many floats.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.raw.embd, data.len());
            for i in 0..self.rows {
                *self.raw.pos.add(i) = pos + i as Pos;
                *self.raw.n_seq_id.add(i) = 1;
                **self.raw.seq_id.add(i) = seq;
                *self.raw.logits.add(i) = 0;
            }
        }
        self.raw.n_tokens = self.rows as i32;
    }
}

impl Drop for EmbdBatch {
    fn drop(&mut self) {
        // SAFETY: from llama_batch_init, freed once.
        unsafe { sys::llama_batch_free(self.raw) };
    }
}
