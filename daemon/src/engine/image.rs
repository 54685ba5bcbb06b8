//! Image parts inside the engine: decoding PNG/JPEG (image-rs, memory-safe, with limits),
//! the projector's embeddings, and the placeholder tokens that stand for them in a prompt.
//!
//! A prompt with images is still one token list: each image's embedding rows occupy a run of
//! placeholder tokens, negative ids no vocabulary has, derived from the image's sha256. So
//! everything that works on prompt tokens keeps working: the context length and the
//! scheduler's cost count image tokens; prefix and session KV reuse match a re-sent image
//! (same bytes, same placeholders) and never a different one (a mismatch at its first
//! token: 2^-31 odds per image); the drafter never proposes them. Only prefill looks up the
//! rows ([`ImageSpan`]), which it decodes in a batch of their own.

use std::sync::{Arc, Mutex};

use hearth_ffi::{ImagePiece, Projector, Token};
use sha2::{Digest, Sha256};

use super::EngineError;

/// Largest side of an image the engine decodes, and most pixels.
pub const MAX_SIDE: u32 = 4096;
pub const MAX_PIXELS: u64 = 16 << 20;
/// Most bytes the decoder may allocate for one image (16-bit RGBA of the largest image).
const MAX_ALLOC: u64 = 8 * MAX_PIXELS;

/// Marks where an image goes in the rendered chat template. App text holding it is refused,
/// so an app cannot move or forge an image's place.
pub const MARKER: &str = "<|hearth:image|>";

/// The embedding rows of one image in a prompt: they stand at prompt positions
/// `start..start + n_tokens`.
#[derive(Debug, Clone)]
pub struct ImageSpan {
    pub start: usize,
    pub n_tokens: usize,
    pub n_embd: usize,
    pub data: Arc<[f32]>,
}

impl ImageSpan {
    pub fn end(&self) -> usize {
        self.start + self.n_tokens
    }

    /// The rows from prompt position `from` (inside the span) on.
    pub fn rows_from(&self, from: usize) -> &[f32] {
        &self.data[(from - self.start) * self.n_embd..]
    }
}

/// Whether `t` is an image placeholder rather than a vocabulary token.
pub fn is_placeholder(t: Token) -> bool {
    t < 0
}

/// `n` placeholder tokens for the image whose encoded bytes hash to `hash`.
fn placeholders(hash: &[u8; 32], n: usize) -> impl Iterator<Item = Token> + '_ {
    (0..n as u64).map(move |i| {
        let mut h = Sha256::new();
        h.update(hash);
        h.update(i.to_le_bytes());
        let d = h.finalize();
        let v = u32::from_le_bytes([d[0], d[1], d[2], d[3]]) & 0x7fff_ffff;
        -(v as i32) - 1
    })
}

/// An image decoded to RGB pixels.
#[derive(Debug)]
pub struct Rgb {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

/// Decodes `bytes` (the image named `what`), a PNG or a JPEG, within the limits.
pub fn decode(what: &str, bytes: &[u8]) -> Result<Rgb, EngineError> {
    use image::{ImageError, ImageFormat, ImageReader};
    let bad = |why: String| EngineError::InvalidArgs(format!("{what} {why}"));
    let format = image::guess_format(bytes).ok().filter(|f| matches!(f, ImageFormat::Png | ImageFormat::Jpeg));
    let Some(format) = format else {
        return Err(bad("is neither a PNG nor a JPEG image (the formats taken)".into()));
    };
    let name = if format == ImageFormat::Png { "PNG" } else { "JPEG" };
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_ALLOC);
    let reader = || {
        let mut r = ImageReader::with_format(std::io::Cursor::new(bytes), format);
        r.limits(limits.clone());
        r
    };
    // Messages name the failure's kind only: the decoders' own texts may quote the data.
    let failed = |e: ImageError| match e {
        ImageError::Limits(_) => bad(format!("is larger than {MAX_SIDE}x{MAX_SIDE} pixels or {MAX_PIXELS} pixels")),
        ImageError::Unsupported(_) => bad(format!("uses a {name} feature the decoder does not support")),
        ImageError::IoError(_) => bad(format!("is a truncated {name} image")),
        _ => bad(format!("is not a valid {name} image (corrupt or truncated)")),
    };
    let (width, height) = reader().into_dimensions().map_err(failed)?;
    if width == 0 || height == 0 || u64::from(width) * u64::from(height) > MAX_PIXELS {
        return Err(bad(format!("is {width}x{height} pixels; at most {MAX_PIXELS} pixels, and at least 1x1")));
    }
    let image = reader().decode().map_err(failed)?;
    let rgb = pad_to_ratio(image.into_rgb8());
    let (width, height) = rgb.dimensions();
    Ok(Rgb { width, height, pixels: rgb.into_raw() })
}

/// Widest aspect ratio handed to the projector: libmtmd's resizers scale the short side by
/// the long side's factor, and some (idefics3's, SmolVLM's) abort the process on a side that
/// rounds to 0. A panorama or a long screenshot is padded (centred, in the grey of libmtmd's
/// own padding) rather than refused.
const MAX_RATIO: u32 = 8;

fn pad_to_ratio(img: image::RgbImage) -> image::RgbImage {
    let (w, h) = img.dimensions();
    let (long, short) = (w.max(h), w.min(h));
    if long <= short * MAX_RATIO {
        return img;
    }
    let short = long.div_ceil(MAX_RATIO);
    let (nw, nh) = if w >= h { (w, short) } else { (short, h) };
    let mut canvas = image::RgbImage::from_pixel(nw, nh, image::Rgb([122, 116, 104]));
    image::imageops::replace(&mut canvas, &img, i64::from((nw - w) / 2), i64::from((nh - h) / 2));
    canvas
}

/// What an image encodes to, kept for its app's next request with the same image.
#[derive(Debug)]
enum Piece {
    Text(Vec<Token>),
    Rows { n_tokens: usize, data: Arc<[f32]> },
}

/// Most bytes of embeddings kept for re-sent images (a turn of a conversation about a photo
/// re-sends it: its KV is usually kept too, and then nothing of it is computed again).
const CACHE_BYTES: usize = 64 << 20;

/// Recent encodings by (app, image sha256), the oldest dropped first. Per app: whether an
/// image was encoded recently shows in how fast a request with it is prepared, so one app's
/// images must never make another app's requests faster.
#[derive(Debug, Default)]
struct EncodeCache {
    entries: std::collections::VecDeque<(String, [u8; 32], Arc<Vec<Piece>>)>,
    bytes: usize,
}

impl EncodeCache {
    fn size(pieces: &[Piece]) -> usize {
        pieces.iter().map(|p| if let Piece::Rows { data, .. } = p { data.len() * 4 } else { 0 }).sum()
    }

    fn get(&mut self, app: &str, hash: &[u8; 32]) -> Option<Arc<Vec<Piece>>> {
        let i = self.entries.iter().position(|(a, h, _)| a == app && h == hash)?;
        let entry = self.entries.remove(i)?;
        let pieces = Arc::clone(&entry.2);
        self.entries.push_back(entry);
        Some(pieces)
    }

    fn insert(&mut self, app: &str, hash: [u8; 32], pieces: Arc<Vec<Piece>>) {
        let size = Self::size(&pieces);
        if size > CACHE_BYTES {
            return;
        }
        self.bytes += size;
        self.entries.push_back((app.to_owned(), hash, pieces));
        while self.bytes > CACHE_BYTES {
            let Some((_, _, old)) = self.entries.pop_front() else { break };
            self.bytes -= Self::size(&old);
        }
    }
}

/// The projector of a vision model, shared by the preparer's jobs (one encode at a time).
#[derive(Debug, Clone)]
pub struct Vision {
    projector: Arc<Mutex<Projector>>,
    cache: Arc<Mutex<EncodeCache>>,
    /// The projector's sha256: an image's placeholders are its bytes' under this projector,
    /// so KV kept across a projector change (a parked session) never matches.
    projector_sha256: String,
    /// The width of its rows (fixed by the model), read once, not under the lock.
    n_embd: usize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Vision {
    pub fn new(projector: Projector, projector_sha256: &str) -> Self {
        Self {
            n_embd: projector.n_embd(),
            projector: Arc::new(Mutex::new(projector)),
            cache: Arc::default(),
            projector_sha256: projector_sha256.to_owned(),
        }
    }

    /// Appends image `bytes` (named `what`) of `app`'s request to `prompt`: its text tokens,
    /// and placeholders for its embedding rows, whose span goes to `spans`. Returns the time
    /// decoding and encoding took: none for an image `app` sent recently.
    pub fn append(
        &self,
        app: &str,
        what: &str,
        bytes: &[u8],
        prompt: &mut Vec<Token>,
        spans: &mut Vec<ImageSpan>,
    ) -> Result<std::time::Duration, EngineError> {
        let hash: [u8; 32] = Sha256::new().chain_update(&self.projector_sha256).chain_update(bytes).finalize().into();
        let mut took = std::time::Duration::ZERO;
        let cached = lock(&self.cache).get(app, &hash);
        let pieces = match cached {
            Some(p) => p,
            None => {
                let started = std::time::Instant::now();
                let rgb = decode(what, bytes)?;
                let encoded =
                    lock(&self.projector).encode(&rgb.pixels, rgb.width, rgb.height).map_err(|e| match e {
                        hearth_ffi::Error::Image { reason } => EngineError::InvalidArgs(format!("{what}: {reason}")),
                        e => EngineError::Internal(e.to_string()),
                    })?;
                took = started.elapsed();
                let pieces: Vec<Piece> = encoded
                    .into_iter()
                    .map(|p| match p {
                        ImagePiece::Text(t) => Piece::Text(t),
                        ImagePiece::Embeddings { n_tokens, data } => Piece::Rows { n_tokens, data: data.into() },
                    })
                    .collect();
                let pieces = Arc::new(pieces);
                lock(&self.cache).insert(app, hash, Arc::clone(&pieces));
                pieces
            }
        };
        let n_embd = self.n_embd;
        for piece in pieces.iter() {
            match piece {
                Piece::Text(tokens) => prompt.extend(tokens),
                Piece::Rows { n_tokens, data } => {
                    spans.push(ImageSpan { start: prompt.len(), n_tokens: *n_tokens, n_embd, data: Arc::clone(data) });
                    prompt.extend(placeholders(&hash, *n_tokens));
                }
            }
        }
        Ok(took)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let mut out = Vec::new();
        let img = image::RgbImage::from_fn(width, height, |x, y| image::Rgb([x as u8, y as u8, 7]));
        img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
        out
    }

    #[test]
    fn decodes_a_png_and_refuses_what_is_not_one() {
        let rgb = decode("img", &png(5, 3)).unwrap();
        assert_eq!((rgb.width, rgb.height, rgb.pixels.len()), (5, 3, 45));
        assert_eq!(&rgb.pixels[3..6], &[1, 0, 7]);
        let mut truncated = png(64, 64);
        truncated.truncate(truncated.len() / 2);
        let gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec();
        for (bytes, want) in
            [(truncated, "truncated"), (gif, "neither a PNG nor a JPEG"), (vec![0xff, 0xd8, 0xff], "JPEG")]
        {
            let e = decode("img", &bytes).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn extreme_aspect_ratios_are_padded_not_refused() {
        let rgb = decode("img", &png(4096, 1)).unwrap();
        assert_eq!((rgb.width, rgb.height), (4096, 512));
        // The image's row sits in the middle, on the padding's grey.
        assert_eq!(&rgb.pixels[..3], &[122, 116, 104]);
        let mid = (255 * 4096 + 5) * 3;
        assert_eq!(&rgb.pixels[mid..mid + 3], &[5, 0, 7]);
        let tall = decode("img", &png(3, 100)).unwrap();
        assert_eq!((tall.width, tall.height), (13, 100));
        assert_eq!(decode("img", &png(80, 10)).unwrap().height, 10, "8:1 is kept as it is");
    }

    #[test]
    fn a_huge_header_is_refused_before_any_pixel_is_allocated() {
        // A valid PNG header claiming 60000x60000 pixels, and nothing after it.
        let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = b"IHDR".to_vec();
        ihdr.extend(60_000u32.to_be_bytes());
        ihdr.extend(60_000u32.to_be_bytes());
        ihdr.extend([8, 2, 0, 0, 0]);
        bytes.extend(13u32.to_be_bytes());
        bytes.extend(&ihdr);
        bytes.extend(crc32fast::hash(&ihdr).to_be_bytes());
        let e = decode("img", &bytes).unwrap_err().to_string();
        assert!(e.contains("larger than"), "{e}");
    }

    #[test]
    fn encodings_are_kept_per_app_within_the_byte_cap() {
        let rows = |n: usize| Arc::new(vec![Piece::Rows { n_tokens: 1, data: vec![0.0f32; n].into() }]);
        let mut c = EncodeCache::default();
        c.insert("a", [1; 32], rows(16));
        assert!(c.get("a", &[1; 32]).is_some());
        assert!(c.get("b", &[1; 32]).is_none(), "another app's encoding is never used");
        assert!(c.get("a", &[2; 32]).is_none());
        // Over the cap, the oldest go first; one larger than the cap is not kept at all.
        let quarter = CACHE_BYTES / 4 / 4;
        for k in 0..4u8 {
            c.insert("a", [10 + k; 32], rows(quarter));
        }
        assert!(c.get("a", &[1; 32]).is_none(), "the oldest was dropped");
        assert!(c.get("a", &[13; 32]).is_some());
        assert!(c.bytes <= CACHE_BYTES);
        c.insert("a", [99; 32], rows(CACHE_BYTES));
        assert!(c.get("a", &[99; 32]).is_none());
    }

    #[test]
    fn placeholders_are_negative_and_follow_the_image() {
        let a: Vec<Token> = placeholders(&[1; 32], 16).collect();
        let b: Vec<Token> = placeholders(&[2; 32], 16).collect();
        assert!(a.iter().chain(&b).all(|t| is_placeholder(*t)));
        assert_eq!(a, placeholders(&[1; 32], 16).collect::<Vec<_>>());
        assert_ne!(a[0], b[0]);
    }
}
