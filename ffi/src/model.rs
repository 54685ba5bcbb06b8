//! A loaded GGUF model: weights (mmap'd), vocabulary, metadata, tokenizer, chat template.

use std::ffi::{CString, c_char, c_void};
use std::path::Path;
use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use crate::backend::{Backend, cstr_or_empty};
use crate::{Error, Result, Token};

/// How to load a model.
#[derive(Debug, Clone)]
pub struct ModelParams {
    /// Layers to offload to the accelerator; 0 keeps everything on the CPU (no GPU is used,
    /// not even for llama.cpp's offload of large batched operations), -1 offloads all.
    pub n_gpu_layers: i32,
    /// Map the file instead of reading it into anonymous memory (shared, evictable pages).
    pub use_mmap: bool,
    /// ggml device names (see [`Backend::devices`]) the model may use; empty lets llama.cpp
    /// use every GPU/accelerator it finds.
    pub devices: Vec<String>,
}

impl Default for ModelParams {
    fn default() -> Self {
        Self { n_gpu_layers: 0, use_mmap: true, devices: Vec::new() }
    }
}

/// The shape of a model's KV cache, enough to size a context before creating it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvGeometry {
    pub n_layer: u32,
    /// Key + value width per token per layer (`2 * n_embd / n_head * n_head_kv`).
    pub kv_width: u64,
}

impl KvGeometry {
    /// Bytes of a KV cache of `kv_type` holding `tokens` tokens.
    pub fn bytes(&self, tokens: u32, kv_type: crate::KvType) -> u64 {
        u64::from(self.n_layer).saturating_mul(kv_type.bytes(self.kv_width.saturating_mul(u64::from(tokens))))
    }
}

/// The progress callback's user data: a thin pointer to the caller's closure.
type ProgressFn<'a> = &'a mut dyn FnMut(f32);

unsafe extern "C" fn report_progress(progress: f32, data: *mut c_void) -> bool {
    // SAFETY: `data` is the address of the boxed `ProgressFn` of a `RawParams`, which outlives
    // the llama_model_load_* call that invokes this callback.
    let f = unsafe { &mut *data.cast::<ProgressFn<'_>>() };
    f(progress);
    true
}

/// llama's model parameters for one load, with the device list and progress closure they
/// point to kept alive beside them.
struct RawParams<'p> {
    params: sys::llama_model_params,
    _devices: Vec<sys::ggml_backend_dev_t>,
    _progress: Box<ProgressFn<'p>>,
}

impl<'p> RawParams<'p> {
    fn new(params: &ModelParams, progress: ProgressFn<'p>) -> Result<Self> {
        let mut devices = Vec::with_capacity(params.devices.len() + 1);
        for name in &params.devices {
            let c_name = CString::new(name.as_str()).map_err(|_| Error::InteriorNul { what: "device name" })?;
            // SAFETY: the backend is initialised; `c_name` is a valid C string for the call; the
            // returned device (or null) is owned by ggml's registry for the whole process.
            let dev = unsafe { sys::ggml_backend_dev_by_name(c_name.as_ptr()) };
            if dev.is_null() {
                return Err(Error::NoSuchDevice { name: name.clone() });
            }
            devices.push(dev);
        }
        devices.push(std::ptr::null_mut());
        let mut progress = Box::new(progress);
        // SAFETY: returns a plain struct of defaults.
        let mut mp = unsafe { sys::llama_model_default_params() };
        mp.n_gpu_layers = params.n_gpu_layers;
        mp.load_mode = if params.use_mmap { sys::LLAMA_LOAD_MODE_MMAP } else { sys::LLAMA_LOAD_MODE_NONE };
        // No layer offloaded: an empty device list, so llama.cpp starts no GPU backend at all
        // (with every GPU listed it would still run large batched operations on one).
        if params.n_gpu_layers == 0 {
            // The terminator alone (the named devices are left out).
            devices.clear();
            devices.push(std::ptr::null_mut());
        }
        if !params.devices.is_empty() || params.n_gpu_layers == 0 {
            // The Vec's heap buffer does not move when the Vec is moved into Self.
            mp.devices = devices.as_mut_ptr();
        }
        mp.progress_callback = Some(report_progress);
        // The boxed closure reference has a stable address for as long as Self lives.
        mp.progress_callback_user_data = (&raw mut *progress).cast::<c_void>();
        Ok(Self { params: mp, _devices: devices, _progress: progress })
    }

    fn get(&self) -> sys::llama_model_params {
        self.params
    }
}

/// A LoRA adapter of the model: contexts apply it with `scale` unless told otherwise
/// ([`crate::Context::set_lora_scales`]).
#[derive(Debug)]
struct Lora {
    ptr: NonNull<sys::llama_adapter_lora>,
    name: String,
    scale: f32,
}

/// One chat turn handed to the model's chat template.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A loaded model. Immutable after load, so it is shared between threads behind an `Arc`.
#[derive(Debug)]
pub struct Model {
    ptr: NonNull<sys::llama_model>,
    vocab: NonNull<sys::llama_vocab>,
    loras: Vec<Lora>,
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
    pub fn load(backend: Backend, path: &Path, params: &ModelParams) -> Result<Self> {
        Self::load_with_progress(backend, path, params, &mut |_| {})
    }

    /// Like [`Model::load`], calling `progress` with the loaded fraction (0..=1) as it goes.
    pub fn load_with_progress(
        backend: Backend,
        path: &Path,
        params: &ModelParams,
        progress: ProgressFn<'_>,
    ) -> Result<Self> {
        let c_path =
            CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| Error::InteriorNul { what: "model path" })?;
        // llama.cpp aborts the process on some header values instead of failing the load.
        crate::gguf::check(path).map_err(|reason| Error::ModelHeader { path: path.to_owned(), reason })?;
        let params = RawParams::new(params, progress)?;
        // SAFETY: `c_path` is a valid NUL-terminated string for the duration of the call; the
        // params (and the device list and progress closure they point to) outlive the call,
        // which is the only time llama.cpp reads them; backend is initialised.
        let raw = unsafe { sys::llama_model_load_from_file(c_path.as_ptr(), params.get()) };
        Self::from_raw(raw, backend, path)
    }

    /// Loads the GGUF file open as `file` (read from its start), so a process without access
    /// to the file system can load a model it was handed. Verification as for [`Model::load`].
    pub fn load_from_file(
        backend: Backend,
        file: &std::fs::File,
        params: &ModelParams,
        progress: ProgressFn<'_>,
    ) -> Result<Self> {
        use std::io::{Seek, SeekFrom};
        use std::os::fd::IntoRawFd;
        let origin = Path::new("(open file)");
        let header_error = |reason: String| Error::ModelHeader { path: origin.to_owned(), reason };
        let size = file.metadata().map_err(|e| header_error(format!("cannot read it: {e}")))?.len();
        let mut start = file;
        start.seek(SeekFrom::Start(0)).map_err(|e| header_error(format!("cannot read it: {e}")))?;
        let mut reader = std::io::BufReader::with_capacity(64 * 1024, file);
        crate::gguf::check_reader(&mut reader, size).map_err(header_error)?;
        // llama.cpp reads from the stream's position; the duplicate shares the file offset.
        let mut dup = file.try_clone().map_err(|_| Error::ModelLoad { path: origin.to_owned() })?;
        dup.seek(SeekFrom::Start(0)).map_err(|_| Error::ModelLoad { path: origin.to_owned() })?;
        let fd = dup.into_raw_fd();
        // SAFETY: `fd` is an open descriptor this function owns (the duplicate above); on
        // success the returned stream owns it and closes it in fclose below.
        let fp = unsafe { libc::fdopen(fd, c"rb".as_ptr()) };
        if fp.is_null() {
            // SAFETY: fdopen failed, so `fd` is still ours alone; closed once here.
            unsafe { libc::close(fd) };
            return Err(Error::ModelLoad { path: origin.to_owned() });
        }
        let params = RawParams::new(params, progress)?;
        // SAFETY: `fp` is a valid stream for the call (llama.cpp does not take ownership of
        // it: its file wrapper is built with owns_fp = false, and the mapping it makes does not
        // need the descriptor afterwards); the params outlive the call as above.
        let raw = unsafe { sys::llama_model_load_from_file_ptr(fp.cast(), params.get()) };
        // SAFETY: `fp` came from fdopen above and is closed exactly once, after the load.
        unsafe { libc::fclose(fp) };
        Self::from_raw(raw, backend, origin)
    }

    fn from_raw(raw: *mut sys::llama_model, backend: Backend, path: &Path) -> Result<Self> {
        let ptr = NonNull::new(raw).ok_or_else(|| Error::ModelLoad { path: path.to_owned() })?;
        // SAFETY: `ptr` is a valid model; the vocab it returns lives as long as the model.
        let vocab = unsafe { sys::llama_model_get_vocab(ptr.as_ptr()) };
        let Some(vocab) = NonNull::new(vocab.cast_mut()) else {
            // SAFETY: `ptr` is valid and not yet owned by a Model, so we free it exactly once.
            unsafe { sys::llama_model_free(ptr.as_ptr()) };
            return Err(Error::ModelLoad { path: path.to_owned() });
        };
        Ok(Self { ptr, vocab, loras: Vec::new(), _backend: backend })
    }

    /// Loads a LoRA adapter called `name` that every context created from this model
    /// afterwards applies with `scale` by default (0: only when a context asks for it). As
    /// with the model, the caller must have verified the file's bytes.
    pub fn attach_lora(&mut self, path: &Path, name: &str, scale: f32) -> Result<()> {
        let c_path = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| Error::InteriorNul { what: "adapter path" })?;
        // SAFETY: the model is valid and exclusively borrowed; `c_path` is a valid C string.
        let raw = unsafe { sys::llama_adapter_lora_init(self.as_ptr(), c_path.as_ptr()) };
        let ptr = NonNull::new(raw).ok_or_else(|| Error::LoraLoad { path: path.to_owned() })?;
        self.loras.push(Lora { ptr, name: name.to_owned(), scale });
        Ok(())
    }

    /// The adapters and scales contexts apply (pointers stay valid as long as the model).
    pub(crate) fn lora_table(&self) -> (Vec<*mut sys::llama_adapter_lora>, Vec<f32>) {
        self.loras.iter().map(|l| (l.ptr.as_ptr(), l.scale)).unzip()
    }

    pub(crate) fn vocab_ptr(&self) -> *const sys::llama_vocab {
        self.vocab.as_ptr()
    }

    /// Width of the model's hidden state (the length of its embeddings).
    pub fn n_embd(&self) -> usize {
        // SAFETY: plain query on a valid model.
        let n = unsafe { sys::llama_model_n_embd(self.as_ptr()) };
        usize::try_from(n).unwrap_or(0)
    }

    /// Number of LoRA adapters attached.
    pub fn lora_count(&self) -> usize {
        self.loras.len()
    }

    /// The attached adapters' names, in attachment order (the order of a scale table).
    pub fn lora_names(&self) -> impl Iterator<Item = &str> {
        self.loras.iter().map(|l| l.name.as_str())
    }

    /// The scale of each adapter that contexts apply by default, in attachment order.
    pub fn lora_default_scales(&self) -> Vec<f32> {
        self.loras.iter().map(|l| l.scale).collect()
    }

    /// The KV cache shape, to size contexts before creating them.
    pub fn kv_geometry(&self) -> KvGeometry {
        // SAFETY: plain queries on a valid model.
        let (n_layer, n_embd, n_head, n_head_kv) = unsafe {
            (
                sys::llama_model_n_layer(self.as_ptr()),
                sys::llama_model_n_embd(self.as_ptr()),
                sys::llama_model_n_head(self.as_ptr()),
                sys::llama_model_n_head_kv(self.as_ptr()),
            )
        };
        let n_head = u64::try_from(n_head.max(1)).unwrap_or(1);
        let per_head = u64::try_from(n_embd.max(0)).unwrap_or(0) / n_head;
        KvGeometry {
            n_layer: u32::try_from(n_layer.max(0)).unwrap_or(0),
            kv_width: 2 * per_head * u64::try_from(n_head_kv.max(0)).unwrap_or(0),
        }
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

    /// The texts of the vocabulary's BOS and EOS tokens (empty where it has none), as chat
    /// templates name them (`bos_token`, `eos_token`).
    pub fn bos_eos_text(&self) -> (String, String) {
        // SAFETY: plain queries on a valid vocab; they return LLAMA_TOKEN_NULL (-1) for none.
        let (bos, eos) = unsafe { (sys::llama_vocab_bos(self.vocab()), sys::llama_vocab_eos(self.vocab())) };
        let text = |t: Token| match self.is_valid_token(t) {
            true => String::from_utf8_lossy(&self.token_to_piece(t, true)).into_owned(),
            false => String::new(),
        };
        (text(bos), text(eos))
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
        for lora in self.loras.drain(..) {
            // SAFETY: each adapter came from llama_adapter_lora_init on this model, is owned only
            // by this value, and no context outlives the model (each holds an Arc<Model>).
            unsafe { sys::llama_adapter_lora_free(lora.ptr.as_ptr()) };
        }
        // SAFETY: `ptr` came from llama_model_load_from_file, is owned only by this value, and
        // every Context holds an Arc<Model>, so no context outlives it.
        unsafe { sys::llama_model_free(self.ptr.as_ptr()) };
    }
}
