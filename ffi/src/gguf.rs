//! A bounded walk over a GGUF file's header (magic, version, counts, metadata key/values),
//! refusing, before llama.cpp reads it, a header that llama.cpp would abort the process on
//! (its loader `GGML_ASSERT`s some header values instead of failing the load) or whose
//! counts and sizes cannot fit in the file. Nothing is allocated from a size the file
//! claims: strings are skipped unless they are short keys or the architecture name.
//!
//! Hand-written rather than a crate: the `gguf`-style crates parse whole headers into
//! memory (vocabularies included) from the claimed sizes, and hearthd needs only a few
//! integers and a guarantee of bounded work on a hostile file.

use std::collections::HashMap;
use std::io::{BufReader, Read, Seek};
use std::path::Path;

/// llama.cpp's `LLAMA_MAX_LAYERS` (llama-hparams.h).
pub const MAX_LAYERS: u64 = 512;
/// llama.cpp's `LLAMA_MAX_EXPERTS` (llama-hparams.h).
pub const MAX_EXPERTS: u64 = 1024;
/// Longest metadata key accepted (GGUF keys are short dotted names).
const MAX_KEY: u64 = 65_535;
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
const WATCHED: [&str; 6] = [
    "block_count",
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
                if et == T_ARRAY {
                    return Err(format!("its GGUF header nests arrays in {key:?}"));
                }
                if et == T_STRING {
                    if len > self.size.saturating_sub(self.pos) / 8 {
                        return Err(format!(
                            "its GGUF header claims {len} strings in {key:?}, more than the file holds"
                        ));
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
                    return Err(format!(
                        "its GGUF header claims {len} array elements in {key:?}, more than the file holds"
                    ));
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
            t => {
                if keep {
                    if let Some(v) = self.int(t, key)? {
                        return Ok(Some(Int::Scalar(v)));
                    }
                }
                let Some(each) = Self::scalar_size(t) else {
                    return Err(format!("its GGUF header has a value of unknown type {t} in {key:?}"));
                };
                self.skip(each, key)?;
                Ok(None)
            }
        }
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
    let mut ints: HashMap<String, Int> = HashMap::new();
    for _ in 0..kvs {
        let key = w.string(MAX_KEY, "metadata key")?;
        let t = w.u32("a metadata type")?;
        if key == "general.architecture" && t == T_STRING {
            architecture = Some(w.string(1024, "architecture name")?);
            continue;
        }
        let keep = key.rsplit_once('.').is_some_and(|(_, last)| WATCHED.contains(&last));
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
        if let Some(next) = get("nextn_predict_layers").map(Int::max) {
            if next > n {
                return Err(format!("its GGUF header claims {next} next-token layers of {n} layers"));
            }
        }
    }
    let experts = get("expert_count").map_or(0, Int::max);
    if experts > i128::from(MAX_EXPERTS) {
        return Err(format!("its GGUF header claims {experts} experts; llama.cpp supports at most {MAX_EXPERTS}"));
    }
    let used = get("expert_used_count");
    if let Some(Int::Array { len, .. }) = used {
        if layers.is_some_and(|n| i128::from(len) != n) {
            return Err(format!("its GGUF header gives expert_used_count for {len} layers, not for each layer"));
        }
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
    Ok(Header { version, tensors, architecture, block_count: layers.map(|n| n as u64) })
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
