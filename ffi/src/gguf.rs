//! A bounded walk over a GGUF file's header (magic, version, counts, metadata key/values),
//! refusing, before llama.cpp reads it, a header that llama.cpp would abort the process on
//! (its loader `GGML_ASSERT`s some header values instead of failing the load) or whose
//! counts and sizes cannot fit in the file. Nothing is allocated from a size the file
//! claims: strings are skipped unless they are short keys or the architecture name.
//!
//! The walk goes on through the tensor infos and adds up each layer's bytes, so hearthd can
//! say before loading how much of a device's memory an offload takes.
//!
//! Hand-written rather than a crate: the `gguf`-style crates parse whole headers into
//! memory (vocabularies included) from the claimed sizes, and hearthd needs only a few
//! integers and a guarantee of bounded work on a hostile file.

use std::collections::HashMap;
use std::io::{BufReader, Read, Seek};
use std::path::Path;

use llama_cpp_sys_2 as sys;

use crate::KvGeometry;

/// llama.cpp's `LLAMA_MAX_LAYERS` (llama-hparams.h).
pub const MAX_LAYERS: u64 = 512;
/// llama.cpp's `LLAMA_MAX_EXPERTS` (llama-hparams.h).
pub const MAX_EXPERTS: u64 = 1024;
/// Longest metadata key accepted (GGUF keys are short dotted names).
const MAX_KEY: u64 = 65_535;
/// ggml's `GGML_MAX_DIMS`, and the longest tensor name it takes (`GGML_MAX_NAME` less the NUL).
const MAX_DIMS: u32 = 4;
const MAX_TENSOR_NAME: u64 = 63;
/// Smallest encoding of one metadata pair (empty key, type, a u8) and of one tensor
/// info (empty name, one dimension, type, offset): the counts must fit the file.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
const MIN_TENSOR_BYTES: u64 = 8 + 4 + 8 + 4 + 8;

const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;

/// What the walk learned: enough for llama.cpp's header assertions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub tensors: u64,
    pub architecture: Option<String>,
    pub block_count: Option<u64>,
    /// Bytes of each repeating layer's tensors (`blk.N.*`), by layer index.
    pub layer_bytes: Vec<u64>,
    /// Bytes of the output layer as llama.cpp places it: `output.weight` (or, where the
    /// model ties its output to the token embeddings, a copy of `token_embd.weight`) and
    /// `output_norm.weight`. llama.cpp offloads it first: `n_gpu_layers = k` puts it and the
    /// last k - 1 repeating layers on the device.
    pub output_bytes: u64,
    /// The KV cache's shape from the attention metadata, where the model has it.
    pub kv: Option<KvGeometry>,
    /// The vocabulary's size (`tokenizer.ggml.tokens`), 0 where it has none.
    pub n_vocab: u64,
}

impl Header {
    /// Bytes that offloading the last `layers` repeating layers (and, with `output`, the
    /// output layer) puts on a device: weights, the KV cache of those layers for `kv_tokens`
    /// tokens of `kv_type`, and with the output layer the largest compute buffer, its logits
    /// for a `batch` of tokens (f32). Smaller compute buffers (a few MiB) are not counted.
    /// Sizes come from a header whose tensors fit the file, so the sums cannot overflow;
    /// the KV term saturates.
    pub fn device_bytes(&self, layers: usize, output: bool, kv_tokens: u32, kv_type: crate::KvType, batch: u32) -> u64 {
        let n = self.layer_bytes.len();
        let layers = layers.min(n);
        let weights: u64 = self.layer_bytes[n - layers..].iter().sum();
        let kv_per_layer = self.kv.map_or(0, |g| KvGeometry { n_layer: 1, ..g }.bytes(kv_tokens, kv_type));
        let logits = u64::from(batch).saturating_mul(self.n_vocab).saturating_mul(4);
        let out = if output { self.output_bytes.saturating_add(logits) } else { 0 };
        weights.saturating_add(out).saturating_add(kv_per_layer.saturating_mul(layers as u64))
    }
}

/// An integer metadata value, or the largest element and the length of an integer array.
#[derive(Debug, Clone, Copy)]
enum Int {
    Scalar(i128),
    Array { max: i128, len: u64 },
}

impl Int {
    fn max(self) -> i128 {
        match self {
            Int::Scalar(v) | Int::Array { max: v, .. } => v,
        }
    }
}

/// Keys (after `<arch>.`) whose values llama.cpp asserts on.
const WATCHED: [&str; 11] = [
    "block_count",
    "embedding_length",
    "head_count",
    "head_count_kv",
    "key_length",
    "value_length",
    "nextn_predict_layers",
    "expert_count",
    "expert_used_count",
    "expert_group_count",
    "expert_group_used_count",
];

struct Walker<R> {
    r: R,
    pos: u64,
    size: u64,
}

impl<R: Read + Seek> Walker<R> {
    fn need(&self, n: u64, what: &str) -> Result<(), String> {
        if self.size.saturating_sub(self.pos) < n {
            return Err(format!("its GGUF header is cut short (in {what})"));
        }
        Ok(())
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        self.need(N as u64, what)?;
        let mut b = [0u8; N];
        self.r.read_exact(&mut b).map_err(|e| format!("cannot read its GGUF header: {e}"))?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }

    fn skip(&mut self, n: u64, what: &str) -> Result<(), String> {
        self.need(n, what)?;
        let n = i64::try_from(n).map_err(|_| format!("its GGUF header claims an absurd size in {what}"))?;
        self.r.seek_relative(n).map_err(|e| format!("cannot read its GGUF header: {e}"))?;
        self.pos += n as u64;
        Ok(())
    }

    /// A string's length, checked against the rest of the file.
    fn string_len(&mut self, what: &str) -> Result<u64, String> {
        let len = self.u64(what)?;
        if len > self.size.saturating_sub(self.pos) {
            return Err(format!("its GGUF header claims a {len}-byte string in {what}, longer than the file"));
        }
        Ok(len)
    }

    /// A string read into memory (only short ones: keys and the architecture).
    fn string(&mut self, limit: u64, what: &str) -> Result<String, String> {
        let len = self.string_len(what)?;
        if len > limit {
            return Err(format!("its GGUF header has a {len}-byte {what}; at most {limit} are accepted"));
        }
        let mut b = vec![0u8; len as usize];
        self.r.read_exact(&mut b).map_err(|e| format!("cannot read its GGUF header: {e}"))?;
        self.pos += len;
        String::from_utf8(b).map_err(|_| format!("its GGUF header has a {what} that is not UTF-8"))
    }

    /// Bytes of one scalar of GGUF type `t`; None for strings, arrays and unknown types.
    fn scalar_size(t: u32) -> Option<u64> {
        match t {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        }
    }

    fn int(&mut self, t: u32, what: &str) -> Result<Option<i128>, String> {
        Ok(match t {
            0 => Some(self.bytes::<1>(what)?[0].into()),
            1 => Some(i8::from_le_bytes(self.bytes(what)?).into()),
            2 => Some(u16::from_le_bytes(self.bytes(what)?).into()),
            3 => Some(i16::from_le_bytes(self.bytes(what)?).into()),
            4 => Some(u32::from_le_bytes(self.bytes(what)?).into()),
            5 => Some(i32::from_le_bytes(self.bytes(what)?).into()),
            10 => Some(u64::from_le_bytes(self.bytes(what)?).into()),
            11 => Some(i64::from_le_bytes(self.bytes(what)?).into()),
            _ => None,
        })
    }

    /// One value of type `t`; its integer value (or integer array summary) when `keep`.
    fn value(&mut self, t: u32, keep: bool, key: &str) -> Result<Option<Int>, String> {
        match t {
            T_STRING => {
                let len = self.string_len(key)?;
                self.skip(len, key)?;
                Ok(None)
            }
            T_ARRAY => {
                let et = self.u32(key)?;
                let len = self.u64(key)?;
                self.array(et, len, keep, key)
            }
            t => {
                if keep && let Some(v) = self.int(t, key)? {
                    return Ok(Some(Int::Scalar(v)));
                }
                let Some(each) = Self::scalar_size(t) else {
                    return Err(format!("its GGUF header has a value of unknown type {t} in {key:?}"));
                };
                self.skip(each, key)?;
                Ok(None)
            }
        }
    }

    /// Skips an array's `len` elements of type `et` (its type and count already read).
    fn array_rest(&mut self, et: u32, len: u64, key: &str) -> Result<(), String> {
        self.array(et, len, false, key).map(|_| ())
    }

    /// An array's `len` elements of type `et`: their integer summary when `keep`.
    fn array(&mut self, et: u32, len: u64, keep: bool, key: &str) -> Result<Option<Int>, String> {
        if et == T_ARRAY {
            return Err(format!("its GGUF header nests arrays in {key:?}"));
        }
        if et == T_STRING {
            if len > self.size.saturating_sub(self.pos) / 8 {
                return Err(format!("its GGUF header claims {len} strings in {key:?}, more than the file holds"));
            }
            for _ in 0..len {
                let l = self.string_len(key)?;
                self.skip(l, key)?;
            }
            return Ok(None);
        }
        let Some(each) = Self::scalar_size(et) else {
            return Err(format!("its GGUF header has an array of unknown type {et} in {key:?}"));
        };
        let bytes = len.checked_mul(each).filter(|b| *b <= self.size.saturating_sub(self.pos));
        let Some(bytes) = bytes else {
            return Err(format!("its GGUF header claims {len} array elements in {key:?}, more than the file holds"));
        };
        if !keep || !matches!(et, 0..=5 | 10 | 11) || len > MAX_LAYERS {
            self.skip(bytes, key)?;
            return Ok(keep.then_some(Int::Array { max: 0, len }).filter(|_| len > MAX_LAYERS));
        }
        let mut max = 0i128;
        for _ in 0..len {
            max = max.max(self.int(et, key)?.unwrap_or(0));
        }
        Ok(Some(Int::Array { max, len }))
    }
}

/// Walks the header of the GGUF file at `path`; Err says, without file content, why
/// llama.cpp must not be given it.
pub fn check(path: &Path) -> Result<Header, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open it: {e}"))?;
    let size = file.metadata().map_err(|e| format!("cannot read it: {e}"))?.len();
    check_reader(BufReader::with_capacity(64 * 1024, file), size)
}

/// [`check`] over any reader of a file of `size` bytes.
pub fn check_reader<R: Read + Seek>(r: R, size: u64) -> Result<Header, String> {
    let mut w = Walker { r, pos: 0, size };
    if w.bytes::<4>("the magic").map_err(|_| "it is not a GGUF file (too short)".to_owned())? != *b"GGUF" {
        return Err("it is not a GGUF file (no GGUF magic)".into());
    }
    let version = w.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(format!("its GGUF version is {version}; llama.cpp reads versions 2 and 3"));
    }
    let tensors = w.u64("the tensor count")?;
    let kvs = w.u64("the metadata count")?;
    let rest = size.saturating_sub(w.pos);
    if kvs > rest / MIN_KV_BYTES {
        return Err(format!("its GGUF header claims {kvs} metadata entries, more than the file holds"));
    }
    if tensors > rest / MIN_TENSOR_BYTES {
        return Err(format!("its GGUF header claims {tensors} tensors, more than the file holds"));
    }
    let mut architecture = None;
    let mut n_vocab = 0;
    let mut ints: HashMap<String, Int> = HashMap::new();
    for _ in 0..kvs {
        let key = w.string(MAX_KEY, "metadata key")?;
        let t = w.u32("a metadata type")?;
        if key == "general.architecture" && t == T_STRING {
            architecture = Some(w.string(1024, "architecture name")?);
            continue;
        }
        let keep = key.rsplit_once('.').is_some_and(|(_, last)| WATCHED.contains(&last));
        if key == "tokenizer.ggml.tokens" && t == T_ARRAY {
            // The element type and count lead the array: the count is the vocabulary.
            let (et, len) = (w.u32(&key)?, w.u64(&key)?);
            n_vocab = len;
            w.array_rest(et, len, &key)?;
            continue;
        }
        if let Some(v) = w.value(t, keep, &key)? {
            ints.insert(key, v);
        }
    }
    let get = |k: &str| architecture.as_ref().and_then(|a| ints.get(&format!("{a}.{k}")).copied());
    let block_count = get("block_count");
    if let Some(Int::Array { len, .. }) = block_count {
        return Err(format!("its GGUF header gives block_count as an array of {len}; llama.cpp wants one number"));
    }
    let layers = block_count.map(Int::max);
    if let Some(n) = layers {
        if n < 1 || n > i128::from(MAX_LAYERS) {
            return Err(format!("its GGUF header claims {n} layers; llama.cpp supports 1 to {MAX_LAYERS}"));
        }
        if let Some(next) = get("nextn_predict_layers").map(Int::max)
            && next > n
        {
            return Err(format!("its GGUF header claims {next} next-token layers of {n} layers"));
        }
    }
    let experts = get("expert_count").map_or(0, Int::max);
    if experts > i128::from(MAX_EXPERTS) {
        return Err(format!("its GGUF header claims {experts} experts; llama.cpp supports at most {MAX_EXPERTS}"));
    }
    let used = get("expert_used_count");
    if let Some(Int::Array { len, .. }) = used
        && layers.is_some_and(|n| i128::from(len) != n)
    {
        return Err(format!("its GGUF header gives expert_used_count for {len} layers, not for each layer"));
    }
    let used = used.map_or(0, Int::max);
    let groups = get("expert_group_count").map_or(0, Int::max);
    let group_used = get("expert_group_used_count").map_or(0, Int::max);
    if experts > 0 {
        if used < 1 || used > experts {
            return Err(format!("its GGUF header uses {used} of {experts} experts; llama.cpp needs 1 to {experts}"));
        }
        if groups >= experts {
            return Err(format!("its GGUF header claims {groups} expert groups for {experts} experts"));
        }
        if groups > 1 && (experts % groups != 0 || group_used < 1 || group_used >= groups) {
            return Err(format!(
                "its GGUF header's expert groups ({groups} groups, {group_used} used, {experts} experts) are inconsistent"
            ));
        }
    } else if used != 0 || groups != 0 {
        return Err("its GGUF header uses experts but claims none".into());
    }
    let block_count = layers.map(|n| n as u64);
    let kv = kv_geometry(block_count, |k| get(k).map(Int::max));
    let (layer_bytes, output_bytes) = tensor_bytes(&mut w, tensors, block_count.unwrap_or(0), size)?;
    Ok(Header { version, tensors, architecture, block_count, layer_bytes, output_bytes, kv, n_vocab })
}

/// The KV shape from the attention metadata: (key + value width) × KV heads per token and
/// layer, the key and value widths defaulting to the embedding width per head.
fn kv_geometry(layers: Option<u64>, get: impl Fn(&str) -> Option<i128>) -> Option<KvGeometry> {
    let n_layer = u32::try_from(layers?).ok()?;
    let embd = u64::try_from(get("embedding_length")?).ok()?;
    let heads = u64::try_from(get("attention.head_count")?).ok().filter(|h| *h > 0)?;
    let kv_heads = get("attention.head_count_kv").map_or(Some(heads), |h| u64::try_from(h).ok())?;
    let key = get("attention.key_length").map_or(Some(embd / heads), |v| u64::try_from(v).ok())?;
    let value = get("attention.value_length").map_or(Some(embd / heads), |v| u64::try_from(v).ok())?;
    Some(KvGeometry { n_layer, kv_width: key.checked_add(value)?.checked_mul(kv_heads)? })
}

/// Bytes of one tensor of ggml type `t` and shape `dims`, as ggml allocates it.
fn tensor_size(t: u32, dims: &[u64], name: &str) -> Result<u64, String> {
    if t >= sys::GGML_TYPE_COUNT {
        return Err(format!("its tensor {name:?} has unknown type {t}"));
    }
    // SAFETY: `t` is below GGML_TYPE_COUNT, so both index ggml's static type-traits table.
    let (block, size) = unsafe { (sys::ggml_blck_size(t) as u64, sys::ggml_type_size(t) as u64) };
    if block == 0 {
        return Err(format!("its tensor {name:?} has type {t}, which ggml no longer supports"));
    }
    let (first, rest) = dims.split_first().ok_or_else(|| format!("its tensor {name:?} has no dimensions"))?;
    if first % block != 0 {
        return Err(format!("its tensor {name:?} has rows of {first}, not a multiple of its type's block of {block}"));
    }
    let row = (first / block).checked_mul(size);
    row.and_then(|row| rest.iter().try_fold(row, |acc, d| acc.checked_mul(*d)))
        .ok_or_else(|| format!("its tensor {name:?} claims an absurd size"))
}

/// Walks the tensor infos: each repeating layer's bytes, and the output layer's.
/// The tensors' data lies in the file, one after another (llama.cpp checks it), so their
/// bytes together cannot exceed the file's `size`: a header claiming more is refused, and
/// every sum below stays far from overflowing.
fn tensor_bytes<R: Read + Seek>(
    w: &mut Walker<R>,
    tensors: u64,
    layers: u64,
    size: u64,
) -> Result<(Vec<u64>, u64), String> {
    let mut per_layer = vec![0u64; layers as usize];
    let (mut output, mut output_norm, mut embd, mut total) = (None, 0u64, 0u64, 0u64);
    for _ in 0..tensors {
        let name = w.string(MAX_TENSOR_NAME, "tensor name")?;
        let n_dims = w.u32("a tensor's dimension count")?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(format!("its tensor {name:?} has {n_dims} dimensions; ggml supports 1 to {MAX_DIMS}"));
        }
        let mut dims = [0u64; MAX_DIMS as usize];
        for d in dims.iter_mut().take(n_dims as usize) {
            *d = w.u64("a tensor's dimension")?;
        }
        let t = w.u32("a tensor's type")?;
        w.u64("a tensor's offset")?;
        let bytes = tensor_size(t, &dims[..n_dims as usize], &name)?;
        total = total.saturating_add(bytes);
        if total > size {
            return Err(format!("its tensors claim more bytes than the file holds (at {name:?})"));
        }
        let layer = name.strip_prefix("blk.").and_then(|r| r.split_once('.')).and_then(|(i, _)| i.parse::<u64>().ok());
        match (layer, name.as_str()) {
            (Some(i), _) if i < layers => per_layer[i as usize] += bytes,
            (_, "output.weight") => output = Some(bytes),
            (_, "output_norm.weight") => output_norm = bytes,
            (_, "token_embd.weight") => embd = bytes,
            _ => {}
        }
    }
    Ok((per_layer, output.unwrap_or(embd) + output_norm))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn kv_u32(out: &mut Vec<u8>, key: &str, v: u32) {
        out.extend((key.len() as u64).to_le_bytes());
        out.extend(key.as_bytes());
        out.extend(4u32.to_le_bytes());
        out.extend(v.to_le_bytes());
    }

    fn file(layers: u32, extra: &[(&str, u32)]) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend(0u64.to_le_bytes());
        out.extend((2 + extra.len() as u64).to_le_bytes());
        let (k, a) = ("general.architecture", "llama");
        out.extend((k.len() as u64).to_le_bytes());
        out.extend(k.as_bytes());
        out.extend(8u32.to_le_bytes());
        out.extend((a.len() as u64).to_le_bytes());
        out.extend(a.as_bytes());
        kv_u32(&mut out, "llama.block_count", layers);
        for (k, v) in extra {
            kv_u32(&mut out, k, *v);
        }
        out
    }

    /// `file(layers, [])` with `tensors` (name, shape, ggml type) infos after the metadata.
    fn with_tensors(layers: u32, tensors: &[(&str, &[u64], u32)]) -> Vec<u8> {
        let mut out = file(layers, &[]);
        out[8..16].copy_from_slice(&(tensors.len() as u64).to_le_bytes());
        for (name, dims, t) in tensors {
            out.extend((name.len() as u64).to_le_bytes());
            out.extend(name.as_bytes());
            out.extend((dims.len() as u32).to_le_bytes());
            for d in *dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(t.to_le_bytes());
            out.extend(0u64.to_le_bytes());
        }
        // Room for the tensors' data: their bytes must fit the file.
        out.extend(vec![0u8; 64 * 1024]);
        out
    }

    #[test]
    fn tensor_infos_add_up_per_layer_and_for_the_output() {
        let (f32, f16, q4_0) = (sys::GGML_TYPE_F32, sys::GGML_TYPE_F16, sys::GGML_TYPE_Q4_0);
        let h = run(with_tensors(
            2,
            &[
                ("token_embd.weight", &[64, 100], q4_0),
                ("blk.0.attn_q.weight", &[64, 64], f16),
                ("blk.0.attn_norm.weight", &[64], f32),
                ("blk.1.attn_q.weight", &[64, 64], q4_0),
                ("output_norm.weight", &[64], f32),
            ],
        ))
        .unwrap();
        // Q4_0: 18 bytes per block of 32.
        assert_eq!(h.layer_bytes, vec![64 * 64 * 2 + 64 * 4, 2 * 18 * 64]);
        // Tied output: a copy of the embeddings, and the norm.
        assert_eq!(h.output_bytes, 2 * 18 * 100 + 64 * 4);
        assert_eq!(h.device_bytes(1, false, 0, crate::KvType::F16, 8), 2 * 18 * 64);
        assert_eq!(
            h.device_bytes(5, true, 0, crate::KvType::F16, 0),
            h.layer_bytes.iter().sum::<u64>() + h.output_bytes
        );
        assert_eq!(h.device_bytes(2, false, 0, crate::KvType::F16, 8), h.layer_bytes.iter().sum::<u64>());
        // The output layer counts whenever it is offloaded (llama.cpp offloads it first).
        assert_eq!(h.device_bytes(0, true, 0, crate::KvType::F16, 0), h.output_bytes);
        let untied =
            run(with_tensors(1, &[("token_embd.weight", &[64, 100], q4_0), ("output.weight", &[64, 10], f32)]));
        assert_eq!(untied.unwrap().output_bytes, 64 * 10 * 4);

        let bad = |t: &[(&str, &[u64], u32)]| run(with_tensors(1, t)).unwrap_err();
        assert!(bad(&[("x", &[64], 9999)]).contains("unknown type"));
        assert!(bad(&[("x", &[33], q4_0)]).contains("multiple of its type's block"));
        assert!(bad(&[("x", &[64, u64::MAX, u64::MAX], f32)]).contains("absurd size"));
        assert!(bad(&[("x", &[1, 1, 1, 1, 1], f32)]).contains("5 dimensions"));
        assert!(bad(&[(&"n".repeat(64), &[1], f32)]).contains("tensor name"));
        assert!(bad(&[("x", &[1 << 30, 1 << 20], f32)]).contains("more bytes than the file holds"));
    }

    #[test]
    fn kv_geometry_comes_from_the_attention_metadata() {
        let h = run(file(
            4,
            &[("llama.embedding_length", 256), ("llama.attention.head_count", 8), ("llama.attention.head_count_kv", 2)],
        ))
        .unwrap();
        // (32 + 32) per head × 2 KV heads.
        assert_eq!(h.kv, Some(KvGeometry { n_layer: 4, kv_width: 128 }));
        assert_eq!(run(file(4, &[])).unwrap().kv, None);
    }

    fn run(b: Vec<u8>) -> Result<Header, String> {
        let n = b.len() as u64;
        check_reader(Cursor::new(b), n)
    }

    #[test]
    fn sane_headers_pass_and_absurd_ones_are_refused_with_a_reason() {
        let h = run(file(22, &[])).unwrap();
        assert_eq!((h.architecture.as_deref(), h.block_count), (Some("llama"), Some(22)));
        assert!(run(file(10_000, &[])).unwrap_err().contains("10000 layers"));
        assert!(run(file(0, &[])).unwrap_err().contains("0 layers"));
        assert!(run(file(8, &[("llama.expert_count", 5000)])).unwrap_err().contains("5000 experts"));
        assert!(run(file(8, &[("llama.expert_count", 8), ("llama.expert_used_count", 9)])).is_err());
        assert!(run(file(8, &[("llama.expert_count", 8), ("llama.expert_used_count", 2)])).is_ok());
        let mut v1 = file(8, &[]);
        v1[4] = 1;
        assert!(run(v1).unwrap_err().contains("version is 1"));
        let mut many = file(8, &[]);
        many[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(run(many).unwrap_err().contains("metadata entries"));
        let mut long = file(8, &[]);
        long[24..32].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(run(long).unwrap_err().contains("longer than the file"));
        let cut = file(8, &[]);
        assert!(run(cut[..cut.len() - 2].to_vec()).unwrap_err().contains("cut short"));
        assert!(run(b"GGML\x03\0\0\0".to_vec()).unwrap_err().contains("not a GGUF"));
    }
}
