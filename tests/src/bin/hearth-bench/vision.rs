//! Images: the time one image takes to decode and encode (its projector), and the time to
//! first token of a question about it beside the same question without it, through D-Bus.
//! The model is the default one with the tests' projector (tests/tools/make-mmproj.py: 16
//! image tokens, a 2-block ViT of width 64): it measures Hearth's image path (decode in the
//! engine, libmtmd's encode, the rows' own decode), not a real vision model's encoder, whose
//! cost grows with its size (SmolVLM's 93M-parameter encoder is some 10^3 times this one).

use std::collections::HashMap;

use hearth_tests::{Bus, Daemon, ModelDir, Settings, hearth, image_message, png};
use zbus::Variant;

use crate::median;

pub struct VisionRun {
    pub image_tokens: u32,
    /// Decode + encode of a fresh 256x256 PNG, ms.
    pub encode_ms: f64,
    /// Time to first token (prefill_us) of the question with and without the image, ms.
    pub ttft_text_ms: f64,
    pub ttft_image_ms: f64,
    /// The image re-sent: its encoding (and KV) reused.
    pub ttft_resent_ms: f64,
}

pub async fn measure(reps: usize) -> VisionRun {
    let dir = ModelDir::new();
    dir.vision_model("seer");
    let settings = Settings {
        models_dirs: Some(vec![dir.path().to_owned()]),
        models: "default = \"seer\"\n".into(),
        ..Settings::default()
    };
    let bus = Bus::start();
    let _daemon = Daemon::start_configured(&bus, &settings).await;
    let conn = bus.connect().await;
    let proxy = hearth(&conn).await;
    let ask = |text: &str, image: Option<&[u8]>| {
        let images: Vec<&[u8]> = image.into_iter().collect();
        let messages = vec![image_message(text, &images, &[], None)];
        HashMap::from([("messages", Variant::from(messages)), ("max_tokens", Variant::from(1u32))])
    };
    let ms = |us: u64| us as f64 / 1e3;
    let (mut encode, mut text, mut image, mut resent, mut tokens) = (vec![], vec![], vec![], vec![], 0);
    for i in 0..reps + 1 {
        // A fresh image (other bytes) and question each time: no cache hit but the re-send.
        let seed = i as u32;
        let photo = png(256, 256, move |x, y| [(x + seed) as u8, (y * 3 + seed) as u8, ((x ^ y) + seed) as u8]);
        let q = format!("Photo {i}: what does it show, and where was it taken?");
        let t = proxy.complete(ask(&q, None)).await.expect("text");
        let q = format!("Picture {i}: what does it show, and where was it taken?");
        let r = proxy.complete(ask(&q, Some(&photo))).await.expect("image");
        let again = proxy.complete(ask(&q, Some(&photo))).await.expect("image again");
        if i == 0 {
            continue; // warm-up
        }
        tokens = r.image_tokens;
        encode.push(ms(r.image_encode_us));
        text.push(ms(t.prefill_us));
        // The image's time to first token includes its encode, which happens before queueing.
        image.push(ms(r.prefill_us + r.image_encode_us));
        resent.push(ms(again.prefill_us + again.image_encode_us));
    }
    VisionRun {
        image_tokens: tokens,
        encode_ms: median(encode),
        ttft_text_ms: median(text),
        ttft_image_ms: median(image),
        ttft_resent_ms: median(resent),
    }
}

pub fn json(v: &VisionRun) -> serde_json::Value {
    serde_json::json!({
        "image_tokens": v.image_tokens, "image_256px_encode_ms": v.encode_ms,
        "ttft_text_ms": v.ttft_text_ms, "ttft_one_image_ms": v.ttft_image_ms, "ttft_image_resent_ms": v.ttft_resent_ms,
    })
}

pub fn print(v: &VisionRun) {
    println!(
        "one image (256x256 PNG, test projector, {} image tokens): encode {:.1} ms; TTFT {:.1} ms vs {:.1} ms without \
         it, {:.1} ms re-sent",
        v.image_tokens, v.encode_ms, v.ttft_image_ms, v.ttft_text_ms, v.ttft_resent_ms
    );
}
