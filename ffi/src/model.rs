//! A loaded GGUF model: weights (mmap'd), vocabulary, metadata, tokenizer, chat template.

use std::ffi::{CString, c_char};
use std::path::Path;
use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use crate::backend::{Backend, cstr_or_empty};
use crate::{Error, Result, Token};

/// How to load a model.
#[derive(Debug, Clone, Copy)]
pub struct ModelParams {
    /// Layers to offload to the accelerator; 0 keeps everything on the CPU, -1 offloads all.
    pub n_gpu_layers: i32,
    /// Map the file instead of reading it into anonymous memory (shared, evictable pages).
    pub use_mmap: bool,
}

impl Default for ModelParams {
    fn default() -> Self {
        Self { n_gpu_layers: 0, use_mmap: true }
    }
}

/// One chat turn handed to the model's chat template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A loaded model. Immutable after load, so it is shared between threads behind an `Arc`.
#[derive(Debug)]
pub struct Model {
    ptr: NonNull<sys::llama_model>,
    vocab: NonNull<sys::llama_vocab>,
    _backend: Backend,
}

// SAFETY: a llama_model is read-only after llama_model_load_from_file returns; llama.cpp
// documents that one model may back several contexts on different threads, and the tokenizer
// API is thread-safe. The pointer is owned uniquely by this value and freed once in Drop.
unsafe impl Send for Model {}
// SAFETY: see above; no method takes `&self` and mutates the model.
unsafe impl Sync for Model {}

impl Model {
    /// Loads a GGUF file. The caller is responsible for having verified the file's bytes
    /// (Hearth checks a sha256 from the manifest first): llama.cpp's parser trusts its input.
    pub fn load(backend: Backend, path: &Path, params: ModelParams) -> Result<Self> {
        let c_path =
            CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| Error::InteriorNul { what: "model path" })?;
        // SAFETY: returns a plain struct of defaults.
        let mut mp = unsafe { sys::llama_model_default_params() };
        mp.n_gpu_layers = params.n_gpu_layers;
        mp.load_mode = if params.use_mmap { sys::LLAMA_LOAD_MODE_MMAP } else { sys::LLAMA_LOAD_MODE_NONE };
        // SAFETY: `c_path` is a valid NUL-terminated string for the duration of the call; the
        // params struct is fully initialised from llama's defaults; backend is initialised.
        let raw = unsafe { sys::llama_model_load_from_file(c_path.as_ptr(), mp) };
        let ptr = NonNull::new(raw).ok_or_else(|| Error::ModelLoad { path: path.to_owned() })?;
        // SAFETY: `ptr` is a valid model; the vocab it returns lives as long as the model.
        let vocab = unsafe { sys::llama_model_get_vocab(ptr.as_ptr()) };
        let Some(vocab) = NonNull::new(vocab.cast_mut()) else {
            // SAFETY: `ptr` is valid and not yet owned by a Model, so we free it exactly once.
            unsafe { sys::llama_model_free(ptr.as_ptr()) };
            return Err(Error::ModelLoad { path: path.to_owned() });
        };
        Ok(Self { ptr, vocab, _backend: backend })
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::llama_model {
        self.ptr.as_ptr()
    }

    fn vocab(&self) -> *const sys::llama_vocab {
        self.vocab.as_ptr()
    }

    /// A GGUF metadata value as a string (e.g. `general.name`).
    pub fn meta(&self, key: &str) -> Option<String> {
        let c_key = CString::new(key).ok()?;
        let mut buf = vec![0u8; 256];
        loop {
            // SAFETY: the model and key are valid; `buf` is writable for `buf.len()` bytes and
            // llama.cpp writes at most that many, NUL-terminated.
            let n = unsafe {
                sys::llama_model_meta_val_str(
                    self.as_ptr(),
                    c_key.as_ptr(),
                    buf.as_mut_ptr().cast::<c_char>(),
                    buf.len(),
                )
            };
            let n = usize::try_from(n).ok()?;
            if n < buf.len() {
                buf.truncate(n);
                return Some(String::from_utf8_lossy(&buf).into_owned());
            }
            buf.resize(n + 1, 0);
        }
    }

    /// The model's own name (`general.name`), or its description when it has none.
    pub fn name(&self) -> String {
        self.meta("general.name").unwrap_or_else(|| self.description())
    }

    /// llama.cpp's short description, e.g. "llama ?B Q4_1".
    pub fn description(&self) -> String {
        let mut buf = vec![0u8; 256];
        // SAFETY: `buf` is writable for its length; llama.cpp NUL-terminates within it.
        let n = unsafe { sys::llama_model_desc(self.as_ptr(), buf.as_mut_ptr().cast::<c_char>(), buf.len()) };
        buf.truncate(usize::try_from(n).unwrap_or(0).min(buf.len().saturating_sub(1)));
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// Number of parameters.
    pub fn n_params(&self) -> u64 {
        // SAFETY: plain query on a valid model.
        unsafe { sys::llama_model_n_params(self.as_ptr()) }
    }

    /// Size of all tensors in bytes.
    pub fn size_bytes(&self) -> u64 {
        // SAFETY: plain query on a valid model.
        unsafe { sys::llama_model_size(self.as_ptr()) }
    }

    /// Context length the model was trained with.
    pub fn n_ctx_train(&self) -> u32 {
        // SAFETY: plain query on a valid model.
        let n = unsafe { sys::llama_model_n_ctx_train(self.as_ptr()) };
        u32::try_from(n).unwrap_or(0)
    }

    /// Vocabulary size.
    pub fn n_vocab(&self) -> i32 {
        // SAFETY: plain query on a valid vocab.
        unsafe { sys::llama_vocab_n_tokens(self.vocab()) }
    }

    /// The model's default chat template (Jinja source), if it ships one.
    pub fn chat_template(&self) -> Option<String> {
        // SAFETY: a null name selects the default template; the returned string is owned by
        // the model's metadata and copied out at once.
        let p = unsafe { sys::llama_model_chat_template(self.as_ptr(), std::ptr::null()) };
        // SAFETY: `p` is null or a valid C string owned by the model.
        (!p.is_null()).then(|| unsafe { cstr_or_empty(p) })
    }

    /// Converts text to tokens. `add_special` adds BOS/EOS as the model wants;
    /// `parse_special` turns textual control tokens (`<|im_start|>`) into their ids.
    pub fn tokenize(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<Token>> {
        let len = i32::try_from(text.len()).map_err(|_| Error::Tokenize { len: text.len() })?;
        let mut tokens: Vec<Token> = vec![0; text.len() + 2];
        loop {
            let cap = i32::try_from(tokens.len()).map_err(|_| Error::Tokenize { len: text.len() })?;
            // SAFETY: `text` is valid for `len` bytes (no NUL needed, length is passed);
            // `tokens` is writable for `cap` entries and llama.cpp writes at most that many.
            let n = unsafe {
                sys::llama_tokenize(
                    self.vocab(),
                    text.as_ptr().cast::<c_char>(),
                    len,
                    tokens.as_mut_ptr(),
                    cap,
                    add_special,
                    parse_special,
                )
            };
            if n >= 0 {
                tokens.truncate(n as usize);
                return Ok(tokens);
            }
            if n == i32::MIN {
                return Err(Error::Tokenize { len: text.len() });
            }
            tokens.resize(n.unsigned_abs() as usize, 0);
        }
    }

    /// The bytes of one token. Byte-level vocabularies can split a UTF-8 character across
    /// tokens, so this is bytes, not a string: see [`crate::Detokenizer`].
    pub fn token_to_piece(&self, token: Token, special: bool) -> Vec<u8> {
        let mut buf = vec![0u8; 32];
        loop {
            // SAFETY: `buf` is writable for `buf.len()` bytes; llama.cpp writes at most that many
            // and returns the negative required size when the buffer is too small.
            let n = unsafe {
                sys::llama_token_to_piece(
                    self.vocab(),
                    token,
                    buf.as_mut_ptr().cast::<c_char>(),
                    i32::try_from(buf.len()).unwrap_or(i32::MAX),
                    0,
                    special,
                )
            };
            if n >= 0 {
                buf.truncate(n as usize);
                return buf;
            }
            buf.resize(n.unsigned_abs() as usize, 0);
        }
    }

    /// Whether `token` ends generation (EOS, EOT, or any end-of-generation token).
    pub fn is_eog(&self, token: Token) -> bool {
        // SAFETY: plain query on a valid vocab; out-of-range ids are handled by llama.cpp.
        unsafe { sys::llama_vocab_is_eog(self.vocab(), token) }
    }

    /// Whether `token` is a valid id of this vocabulary.
    pub fn is_valid_token(&self, token: Token) -> bool {
        (0..self.n_vocab()).contains(&token)
    }

    /// Renders a conversation with the model's chat template, ending with the assistant
    /// prefix when `add_assistant` is set. Returns the prompt text (with special tokens as text;
    /// tokenize it with `parse_special = true`).
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_assistant: bool) -> Result<String> {
        // SAFETY: a null name selects the default template, owned by the model.
        let tmpl = unsafe { sys::llama_model_chat_template(self.as_ptr(), std::ptr::null()) };
        if tmpl.is_null() {
            return Err(Error::ChatTemplate);
        }
        let owned: Vec<(CString, CString)> = messages
            .iter()
            .map(|m| {
                Ok((
                    CString::new(m.role.as_str()).map_err(|_| Error::InteriorNul { what: "message role" })?,
                    CString::new(m.content.as_str()).map_err(|_| Error::InteriorNul { what: "message content" })?,
                ))
            })
            .collect::<Result<_>>()?;
        let chat: Vec<sys::llama_chat_message> = owned
            .iter()
            .map(|(role, content)| sys::llama_chat_message { role: role.as_ptr(), content: content.as_ptr() })
            .collect();
        let total: usize = messages.iter().map(|m| m.role.len() + m.content.len()).sum();
        let mut buf = vec![0u8; total * 2 + 256];
        loop {
            let cap = i32::try_from(buf.len()).map_err(|_| Error::ChatTemplate)?;
            // SAFETY: `tmpl` is a valid C string owned by the model; `chat` points to
            // `chat.len()` messages whose strings live in `owned` for the whole call; `buf` is
            // writable for `cap` bytes.
            let n = unsafe {
                sys::llama_chat_apply_template(
                    tmpl,
                    chat.as_ptr(),
                    chat.len(),
                    add_assistant,
                    buf.as_mut_ptr().cast::<c_char>(),
                    cap,
                )
            };
            let n = usize::try_from(n).map_err(|_| Error::ChatTemplate)?;
            if n <= buf.len() {
                buf.truncate(n);
                return String::from_utf8(buf).map_err(|_| Error::ChatTemplate);
            }
            buf.resize(n, 0);
        }
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from llama_model_load_from_file, is owned only by this value, and
        // every Context holds an Arc<Model>, so no context outlives it.
        unsafe { sys::llama_model_free(self.ptr.as_ptr()) };
    }
}
