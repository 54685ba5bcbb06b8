//! Images in, on the device, with scopes: the real daemon and engine, the real default model,
//! and a projector written by tests/tools/make-mmproj.py (seeded random weights in the layout
//! of libmtmd's "mlp" type: 16 image tokens for any image). These prove the plumbing, not
//! understanding: image tokens are produced and counted, outputs are deterministic, follow
//! the image, batch with text requests without changing, scopes and seals hold, and bad
//! images get named errors from a daemon that keeps serving.

use std::collections::HashMap;

use hearth_tests::cloud_standin::CloudStandIn;
use hearth_tests::{Bus, Daemon, ModelDir, ResultDict, Settings, chat_request, hearth, image_message, jpeg, png};
use zbus::Variant;

const VISION: &str = "seer";
const INVALID: &str = "org.hearth.Hearth1.Error.InvalidArgs";

fn settings(dir: &ModelDir) -> Settings {
    Settings {
        models_dirs: Some(vec![dir.path().to_owned()]),
        models: format!("default = {VISION:?}\n"),
        max_sequences: Some(4),
        interactive_sequences: Some(1),
        ..Settings::default()
    }
}

/// The daemon serving `settings` on a bus of its own, and a connection to it.
struct Served {
    bus: Bus,
    daemon: Daemon,
    conn: zbus::Connection,
    proxy: hearth_dbus::Hearth1Proxy<'static>,
}

async fn serve(settings: &Settings) -> Served {
    let bus = Bus::start();
    let daemon = Daemon::start_configured(&bus, settings).await;
    let conn = bus.connect().await;
    let proxy = hearth(&conn).await;
    Served { bus, daemon, conn, proxy }
}

type Request = HashMap<&'static str, Variant<'static>>;

fn request(messages: Vec<HashMap<String, Variant<'static>>>, max_tokens: u32) -> Request {
    HashMap::from([("messages", Variant::from(messages)), ("max_tokens", Variant::from(max_tokens))])
}

fn with_image(text: &str, image: &[u8], max_tokens: u32) -> Request {
    request(vec![image_message(text, &[image], &[], None)], max_tokens)
}

/// Two images that share nothing: a dark gradient, and bright noise.
fn images() -> (Vec<u8>, Vec<u8>) {
    let dark = png(48, 40, |x, y| [(x * 2) as u8, (y * 3) as u8, 20]);
    let bright = png(48, 40, |x, y| {
        let h = (x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503)).wrapping_mul(2_246_822_519);
        [200 | (h >> 24) as u8, (h >> 16) as u8, 255 - (h >> 8) as u8]
    });
    (dark, bright)
}

async fn error_of(proxy: &hearth_dbus::Hearth1Proxy<'_>, r: Request) -> (String, String) {
    let e = proxy.complete(r).await.expect_err("refused");
    (e.dbus_name().to_owned(), e.message().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_become_counted_tokens_and_steer_the_output_deterministically() {
    let dir = ModelDir::new();
    dir.vision_model(VISION);
    dir.manifest("text-only", "m.gguf", None, "");
    let Served { bus: _bus, daemon, conn: _conn, proxy } = serve(&settings(&dir)).await;
    let (dark, bright) = images();
    let ask = "Describe the image.";

    let models = proxy.list_models().await.unwrap();
    let seer = models.iter().find(|m| m.name == VISION).expect("listed");
    assert!(seer.capabilities.iter().any(|c| c == "vision"), "{:?}", seer.capabilities);

    let text: ResultDict = proxy.complete(chat_request(ask, 12)).await.unwrap();
    let a = proxy.complete(with_image(ask, &dark, 12)).await.unwrap();
    // 16 image tokens, and the line break after them.
    assert!(a.prompt_tokens >= text.prompt_tokens + 16, "{} vs {}", a.prompt_tokens, text.prompt_tokens);
    assert!(a.prompt_tokens <= text.prompt_tokens + 18, "{} vs {}", a.prompt_tokens, text.prompt_tokens);
    // The same image again: the same output, its prompt (image rows too) from the prefix cache
    // (the app's last prompt is kept).
    let again = proxy.complete(with_image(ask, &dark, 12)).await.unwrap();
    assert_eq!(again.token_ids, a.token_ids);
    assert_eq!(again.cached_tokens + 1, again.prompt_tokens, "all but the last prompt token reused");
    assert_eq!((a.image_tokens, again.image_tokens, text.image_tokens), (16, 16, 0));
    assert!(a.image_encode_us > 0);
    assert_eq!(again.image_encode_us, 0, "a re-sent image is not encoded again");
    let b = proxy.complete(with_image(ask, &bright, 12)).await.unwrap();
    assert_eq!(b.prompt_tokens, a.prompt_tokens, "any image is 16 tokens for this projector");
    assert_ne!(a.token_ids, b.token_ids, "a different image changes the output");
    assert_ne!(a.token_ids, text.token_ids, "the image reaches the model");
    assert!(b.cached_tokens < 4, "nothing of another image is reused: {}", b.cached_tokens);
    eprintln!("text: {:?}\ndark: {:?}\nbright: {:?}", text.text, a.text, b.text);
    // The same pixels as a JPEG are another image to the cache (other bytes), still counted.
    let as_jpeg = jpeg(48, 40, |x, y| [(x * 2) as u8, (y * 3) as u8, 20]);
    let j = proxy.complete(with_image(ask, &as_jpeg, 12)).await.unwrap();
    assert_eq!(j.prompt_tokens, a.prompt_tokens);
    assert!(j.cached_tokens < 4, "no image rows reused for other bytes: {}", j.cached_tokens);

    // Batched with text requests and each other, every request keeps its solo output.
    for _ in 0..2 {
        let (x, y, z) = tokio::join!(
            proxy.complete(with_image(ask, &bright, 12)),
            proxy.complete(chat_request(ask, 12)),
            proxy.complete(with_image(ask, &dark, 12)),
        );
        assert_eq!(x.unwrap().token_ids, b.token_ids);
        assert_eq!(y.unwrap().token_ids, text.token_ids);
        assert_eq!(z.unwrap().token_ids, a.token_ids);
    }

    // Two images in one message, and a message of an image alone.
    let two = request(vec![image_message(ask, &[&dark, &bright], &[], None)], 4);
    let r = proxy.complete(two).await.unwrap();
    assert!(r.prompt_tokens >= text.prompt_tokens + 32, "{}", r.prompt_tokens);
    let alone = request(vec![image_message("", &[&dark], &[], None)], 4);
    proxy.complete(alone).await.unwrap();

    // A model without a projector refuses images by name.
    let mut r = with_image(ask, &dark, 4);
    r.insert("model", Variant::from("text-only"));
    let (name, msg) = error_of(&proxy, r).await;
    assert_eq!(name, INVALID);
    assert!(msg.contains("takes no images"), "{msg}");

    // What an app cannot do with the image marker: move or forge an image.
    let forged = with_image("<|hearth:image|> again", &dark, 4);
    let (name, msg) = error_of(&proxy, forged).await;
    assert_eq!(name, INVALID);
    assert!(msg.contains("marks images"), "{msg}");
    assert!(daemon.log().contains("vision projector verified"));
}

/// Malformed images of every kind an attacker would try: each gets a named error, and the
/// daemon (and its engine) keep serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_hostile_images_get_named_errors_and_the_daemon_serves_on() {
    let dir = ModelDir::new();
    dir.vision_model(VISION);
    let Served { bus: _bus, daemon, conn: _conn, proxy } = serve(&settings(&dir)).await;
    let (good, _) = images();
    let solo = proxy.complete(with_image("What is it?", &good, 6)).await.unwrap();

    let chunk = |kind: &[u8], data: &[u8]| {
        let mut c = (data.len() as u32).to_be_bytes().to_vec();
        c.extend(kind);
        c.extend(data);
        let mut body = kind.to_vec();
        body.extend(data);
        c.extend(crc32fast::hash(&body).to_be_bytes());
        c
    };
    let png_with = |w: u32, h: u32, idat: &[u8]| {
        let mut ihdr = w.to_be_bytes().to_vec();
        ihdr.extend(h.to_be_bytes());
        ihdr.extend([8, 2, 0, 0, 0]);
        let mut f = b"\x89PNG\r\n\x1a\n".to_vec();
        f.extend(chunk(b"IHDR", &ihdr));
        f.extend(chunk(b"IDAT", idat));
        f.extend(chunk(b"IEND", b""));
        f
    };
    let mut bad_crc = good.clone();
    bad_crc[29] ^= 0xff; // inside IHDR's CRC
    let mut truncated = good.clone();
    truncated.truncate(good.len() * 2 / 3);
    let mut bad_jpeg = jpeg(64, 64, |x, y| [x as u8, y as u8, 0]);
    let n = bad_jpeg.len();
    bad_jpeg[n / 2..n - 2].fill(0xff);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated PNG", truncated, "PNG"),
        ("bad CRC", bad_crc, "PNG"),
        ("huge dimensions", png_with(100_000, 100_000, b"x"), "larger than"),
        ("a decompression bomb's header", png_with(4096, 4096, &[0x78, 0x9c, 0x03, 0x00]), "PNG"),
        ("zero width", png_with(0, 10, b""), "PNG"),
        ("garbage behind a JPEG magic", [&[0xff, 0xd8, 0xff][..], &[0x42; 300]].concat(), "JPEG"),
        ("a JPEG gone bad", bad_jpeg, "JPEG"),
        ("a GIF", b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;".to_vec(), "neither a PNG nor a JPEG"),
        ("empty", Vec::new(), "empty"),
        ("too many bytes", [&good[..], &vec![0; 4 << 20][..]].concat(), "at most"),
    ];
    for (what, bytes, want) in &cases {
        let (name, msg) = error_of(&proxy, with_image("What is it?", bytes, 6)).await;
        assert_eq!(name, INVALID, "{what}: {msg}");
        assert!(msg.contains(want), "{what}: {msg}");
    }
    let nine: Vec<&[u8]> = vec![&good; 9];
    let (name, msg) = error_of(&proxy, request(vec![image_message("?", &nine, &[], None)], 4)).await;
    assert_eq!(name, INVALID);
    assert!(msg.contains("at most 8"), "{msg}");
    let mut not_bytes = image_message("?", &[], &[], None);
    not_bytes.insert("images".into(), Variant::from(vec!["a string".to_owned()]));
    assert_eq!(error_of(&proxy, request(vec![not_bytes], 4)).await.0, INVALID);
    let mut assistant = image_message("?", &[&good], &[], None);
    assistant.insert("role".into(), Variant::from("assistant"));
    assert_eq!(error_of(&proxy, request(vec![assistant], 4)).await.0, INVALID);

    // Fuzzed: seeded mutations of a valid PNG and JPEG (bit flips, truncations, 0xffffffff
    // over a length or a dimension, a repeated range). Each is served or refused by name.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n.max(1) as u64) as usize
    };
    let seeds = [good.clone(), jpeg(48, 40, |x, y| [(x * 5) as u8, (y * 5) as u8, 128])];
    let (mut served, mut refused) = (0, 0);
    for k in 0..40 {
        let mut f = seeds[k % 2].clone();
        let body = 8..f.len();
        match k % 4 {
            0 => (0..1 + next(8)).for_each(|_| {
                let i = body.start + next(body.len());
                f[i] ^= 1 << next(8);
            }),
            1 => f.truncate(8 + next(f.len() - 8)),
            2 => {
                let i = body.start + next(body.len() - 4);
                f[i..i + 4].fill(0xff);
            }
            _ => {
                let (i, n) = (body.start + next(body.len() / 2), 1 + next(64));
                let range = f[i..(i + n).min(f.len())].to_vec();
                f.splice(i..i, range);
            }
        }
        match proxy.complete(with_image("What is it?", &f, 2)).await {
            Ok(_) => served += 1,
            Err(e) => {
                assert_eq!(e.dbus_name(), INVALID, "mutation {k}: {}", e.message());
                refused += 1;
            }
        }
    }
    eprintln!("fuzzed images: {served} served, {refused} refused");
    assert!(refused > 0);

    // Still serving, with the same engine, and the same answer as before.
    let after = proxy.complete(with_image("What is it?", &good, 6)).await.unwrap();
    assert_eq!(after.token_ids, solo.token_ids);
    let log = daemon.log();
    assert!(!log.contains("engine exited") && !log.contains("restarting"), "{log}");
}

/// Image parts carry scopes like text: a public image may go to the cloud (as a data URL), a
/// personal, local or sealed one never does; a sealed image works on the device like the
/// plain one, for the sealing app only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_scopes_and_seals_hold_towards_a_recording_cloud() {
    use base64::Engine;
    let dir = ModelDir::new();
    dir.vision_model(VISION);
    let standin = CloudStandIn::start().await;
    let apps = hearth_tests::apps_dir(&[(
        "me.toml",
        format!(
            "app = {:?}\ncloud = true\ncloud_scopes = [\"public\"]\nseal_unsandboxed = true\n",
            hearth_tests::this_app()
        ),
    )]);
    let settings = Settings {
        apps: hearth_tests::apps_setting(apps.path()),
        cloud: format!("enabled = true\nendpoint = {:?}\nmodel = \"standin-1\"\nretries = 0\n", standin.endpoint()),
        ..settings(&dir)
    };
    let Served { bus: _bus, daemon, conn: _conn, proxy } = serve(&settings).await;
    // The canary: an image whose bytes (and so its base64) are this run's own.
    let seed = std::process::id();
    let canary = png(40, 40, move |x, y| [(x ^ seed) as u8, (y ^ (seed >> 8)) as u8, (seed >> 16) as u8]);
    let b64 = base64::engine::general_purpose::STANDARD.encode(&canary);
    let public = png(40, 40, |x, y| [x as u8, y as u8, 99]);
    let public_b64 = base64::engine::general_purpose::STANDARD.encode(&public);
    let ask = |images: &[&[u8]], sealed: &[&[u8]], scope: Option<&str>, route: &str| {
        let mut r = request(vec![image_message("What is in this picture?", images, sealed, scope)], 6);
        r.insert("route", Variant::from(route.to_owned()));
        r
    };

    // A public image the app may send goes to the cloud, as an image_url data URL.
    let r = proxy.complete(ask(&[&public], &[], Some("public"), "cloud")).await.unwrap();
    assert_eq!(r.route, "cloud");
    let sent = standin.requests();
    assert_eq!(sent.len(), 1);
    let body: serde_json::Value = serde_json::from_str(&sent[0].body).unwrap();
    let parts = &body["messages"][0]["content"];
    assert_eq!(parts[0]["type"], "image_url");
    assert_eq!(parts[0]["image_url"]["url"], format!("data:image/png;base64,{public_b64}"));
    assert_eq!(parts[1]["text"], "What is in this picture?");

    // Personal (the default) and local images never go; forced, the request is refused.
    for scope in [None, Some("personal"), Some("local")] {
        let (name, _) = error_of(&proxy, ask(&[&canary], &[], scope, "cloud")).await;
        assert_eq!(name, "org.hearth.Hearth1.Error.PrivacyViolation", "{scope:?}");
        let r = proxy.complete(ask(&[&canary], &[], scope, "auto")).await.unwrap();
        assert_eq!(r.route, "local", "{scope:?}");
    }
    // A public text part beside a local image: the image taints the request.
    let mut mixed = request(
        vec![
            hearth_tests::image_message("public words", &[], &[], Some("public")),
            image_message("and a local picture", &[&canary], &[], Some("local")),
        ],
        4,
    );
    mixed.insert("route", Variant::from("cloud"));
    assert_eq!(error_of(&proxy, mixed).await.0, "org.hearth.Hearth1.Error.PrivacyViolation");

    // Sealed: the same answer on the device as the plain image, never to the cloud.
    let plain = proxy.complete(ask(&[&canary], &[], Some("local"), "local")).await.unwrap();
    let blob = proxy.seal(&canary, HashMap::new()).await.unwrap();
    let sealed = proxy.complete(ask(&[], &[&blob], None, "auto")).await.unwrap();
    assert_eq!(sealed.route, "local");
    assert_eq!(sealed.token_ids, plain.token_ids, "the sealed image is the image");
    let (name, _) = error_of(&proxy, ask(&[], &[&blob], None, "cloud")).await;
    assert_eq!(name, "org.hearth.Hearth1.Error.PrivacyViolation");
    let (name, msg) = error_of(&proxy, ask(&[], &[&blob], Some("public"), "auto")).await;
    assert_eq!(name, INVALID);
    assert!(msg.contains("sealed"), "{msg}");
    let mut forged = blob.clone();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    assert_eq!(error_of(&proxy, ask(&[], &[&forged], None, "auto")).await.0, "org.hearth.Hearth1.Error.NotAuthorized");
    // A sealed blob that is not an image is refused like a plain one.
    let text_blob = proxy.seal(b"just words", HashMap::new()).await.unwrap();
    let (name, msg) = error_of(&proxy, ask(&[], &[&text_blob], None, "auto")).await;
    assert_eq!(name, INVALID);
    assert!(msg.contains("neither a PNG nor a JPEG"), "{msg}");

    // The canary never reached the cloud, the log, or an error.
    let sent = standin.requests();
    assert_eq!(sent.len(), 1, "only the public image's request was sent");
    assert!(sent.iter().all(|s| !s.body.contains(&b64[..64])));
    let log = daemon.log();
    assert!(!log.contains(&b64[..64]));
    assert!(!log.contains(&public_b64[..64]));
}

/// A conversation about a photo: the session keeps the image in its transcript, and the next
/// turn reuses its KV (and its encoding) instead of computing it again; the answer equals a
/// fresh run of the whole transcript.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_turn_about_an_image_reuses_its_kv_and_equals_a_fresh_run() {
    let dir = ModelDir::new();
    dir.vision_model(VISION);
    let Served { bus: _bus, daemon: _daemon, conn, proxy } = serve(&settings(&dir)).await;
    let (dark, _) = images();
    let path = proxy.open_session(HashMap::new()).await.expect("OpenSession");
    let s = hearth_dbus::SessionProxy::builder(&conn).path(path).build().await.unwrap();
    let first = HashMap::from([
        ("messages", Variant::from(vec![image_message("What is in this picture?", &[&dark], &[], None)])),
        ("max_tokens", Variant::from(8u32)),
    ]);
    let r1 = s.complete(first).await.expect("turn 1");
    assert_eq!(r1.image_tokens, 16);
    let r2 = s.complete(request(vec![image_message("And its colours?", &[], &[], None)], 8)).await.expect("turn 2");
    assert!(r2.cached_tokens >= r1.prompt_tokens, "cached {} of turn 1's {}", r2.cached_tokens, r1.prompt_tokens);
    assert_eq!((r2.image_tokens, r2.image_encode_us), (16, 0), "the image is in the transcript, not encoded again");
    // The same transcript in one request.
    let transcript = request(
        vec![
            image_message("What is in this picture?", &[&dark], &[], None),
            HashMap::from([
                ("role".to_owned(), Variant::from("assistant")),
                ("content".to_owned(), Variant::from(r1.text.clone())),
            ]),
            image_message("And its colours?", &[], &[], None),
        ],
        8,
    );
    assert_eq!(proxy.complete(transcript).await.unwrap().token_ids, r2.token_ids);
}

/// hearthctl: `generate --image FILE`, and `/image FILE` in `chat`, answer like the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hearthctl_sends_images_in_generate_and_chat() {
    use std::io::Write;
    let dir = ModelDir::new();
    dir.vision_model(VISION);
    let Served { bus, daemon: _daemon, conn: _conn, proxy } = serve(&settings(&dir)).await;
    let (dark, _) = images();
    let file = dir.write_file("photo.png", &dark, 0o644);
    let want = proxy.complete(with_image("What is it?", &dark, 6)).await.unwrap();
    let ctl = || {
        let mut c = std::process::Command::new(hearth_tests::workspace_bin("hearthctl"));
        c.args(["--bus-address", bus.address()]);
        c
    };
    let out = ctl()
        .args(["--json", "generate", "--max-tokens", "6", "--image"])
        .arg(&file)
        .arg("What is it?")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let last = String::from_utf8(out.stdout).unwrap().lines().last().map(str::to_owned).unwrap_or_default();
    let got: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert_eq!(got["finished"]["text"], want.text.as_str(), "{got}");
    assert_eq!(got["finished"]["image_tokens"], 16, "{got}");

    let mut chat = ctl()
        .args(["chat", "--max-tokens", "6"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = chat.stdin.take().unwrap();
    writeln!(stdin, "/image {}\nWhat is it?", file.display()).unwrap();
    drop(stdin);
    let out = chat.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(want.text.as_str()),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let missing = ctl().args(["generate", "--image", "/nonexistent.png", "hi"]).output().unwrap();
    assert!(!missing.status.success());
}

/// An image of more rows than a decode step holds (576 from a 192-pixel projector, batch 512)
/// prefills over several steps, sharing them with other requests, and its output is the same
/// alone and batched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_longer_than_a_step_prefills_over_several_steps() {
    let dir = ModelDir::new();
    dir.vision_model_with(VISION, &["--image-size", "192"]);
    let Served { bus: _bus, daemon: _daemon, conn: _conn, proxy } = serve(&settings(&dir)).await;
    let (dark, bright) = images();
    let solo = proxy.complete(with_image("What is it?", &dark, 8)).await.unwrap();
    assert_eq!(solo.image_tokens, 576);
    assert!(u64::from(solo.prompt_tokens) > u64::from(hearth_tests::BATCH));
    let other = proxy.complete(with_image("What is it?", &bright, 8)).await.unwrap();
    let text = proxy.complete(chat_request("What is it?", 8)).await.unwrap();
    for _ in 0..2 {
        let (a, b, c) = tokio::join!(
            proxy.complete(with_image("What is it?", &dark, 8)),
            proxy.complete(chat_request("What is it?", 8)),
            proxy.complete(with_image("What is it?", &bright, 8)),
        );
        assert_eq!(a.unwrap().token_ids, solo.token_ids);
        assert_eq!(b.unwrap().token_ids, text.token_ids);
        assert_eq!(c.unwrap().token_ids, other.token_ids);
    }
}

/// Encoding is compute: past the thermal trip the engine rests after an image's encode as the
/// decode loop rests after a step (the governor's duty cycle), and not while the phone is cool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_encodes_rest_under_the_thermal_governors_duty_cycle() {
    use hearth_tests::soc::{Soc, SocParams};
    let phone = SocParams::at_rest(40.0, 80.0);
    let soc = Soc::new(phone);
    let dir = ModelDir::new();
    // 576 image tokens: an encode long enough to pace.
    dir.vision_model_with(VISION, &["--image-size", "192"]);
    let settings =
        Settings { governor: format!("{}min_rate_tps = 0.2\n", soc.governor_settings(100)), ..settings(&dir) };
    let Served { bus: _bus, daemon, conn: _conn, proxy } = serve(&settings).await;
    let (dark, bright) = images();
    let cool = proxy.complete(with_image("What is it?", &dark, 1)).await.unwrap();
    assert!(cool.image_encode_us > 0);
    assert!(!daemon.log().contains("image encode paced"), "a cool phone's encodes do not rest");
    soc.set_temp(phone.passive_trip_c + 3.0);
    hearth_tests::wait_for(std::time::Duration::from_secs(10), "the governor to throttle", || {
        let proxy = proxy.clone();
        async move { proxy.throttle().await.ok().filter(|t| t.duty < 0.5) }
    })
    .await;
    proxy.complete(with_image("What is it?", &bright, 1)).await.unwrap();
    let log = daemon.log();
    let paced = log.lines().find(|l| l.contains("image encode paced")).expect("the hot phone's encode rested");
    assert!(paced.contains("pause_ms"), "{paced}");
}

/// The projector is verified like the model: a manifest whose mmproj sha256 does not match
/// makes the model unavailable, naming the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_projector_is_refused_before_it_is_loaded() {
    let dir = ModelDir::new();
    dir.vision_model(VISION);
    let bad = format!(
        "capabilities = [\"chat\", \"vision\"]\n[mmproj]\nfile = \"{VISION}.mmproj.gguf\"\nsha256 = {:?}\n",
        "0".repeat(64)
    );
    dir.manifest("tampered", "m.gguf", None, &bad);
    let Served { bus: _bus, daemon: _daemon, conn: _conn, proxy } = serve(&settings(&dir)).await;
    let (dark, _) = images();
    let mut r = with_image("What is it?", &dark, 2);
    r.insert("model", Variant::from("tampered"));
    let (name, msg) = error_of(&proxy, r).await;
    assert_eq!(name, "org.hearth.Hearth1.Error.ModelUnavailable");
    assert!(msg.contains("mmproj.gguf has sha256"), "{msg}");
    // The good manifest of the same files serves.
    proxy.complete(with_image("What is it?", &dark, 2)).await.unwrap();
}

/// An image's rows are decoded under the request's own LoRA adapters, whatever set the engine
/// ran last: steps of two adapter sets take turns (a base-model stream beside a request with
/// its adapter), and the adapter request's tokens are its solo ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_rows_are_decoded_under_the_requests_own_adapters() {
    let dir = ModelDir::new();
    dir.make_lora("style.gguf", &[]);
    let sha = hearth_tests::sha256_file(&dir.path().join("style.gguf"));
    dir.vision_model(VISION);
    let manifest = std::fs::read_to_string(dir.path().join(format!("{VISION}.toml"))).unwrap();
    let adapters = format!("[[adapters]]\nname = \"style\"\nfile = \"style.gguf\"\nsha256 = {sha:?}\nscale = 0.0\n");
    // The adapters table goes before [mmproj], which would otherwise take its keys.
    let manifest = manifest.replacen("[mmproj]", &format!("{adapters}[mmproj]"), 1);
    dir.write_file(&format!("{VISION}.toml"), manifest.as_bytes(), 0o644);
    let Served { bus: _bus, daemon: _daemon, conn: _conn, proxy } = serve(&settings(&dir)).await;
    let (dark, bright) = images();
    let styled = |k: usize| {
        let image: &[u8] = if k.is_multiple_of(2) { &dark } else { &bright };
        let mut r = with_image(&format!("Picture {k}: what is it?"), image, 8);
        r.insert("adapters", Variant::from(HashMap::from([("style".to_owned(), Variant::from(1.0))])));
        r.insert("speculative", Variant::from(false));
        r
    };
    let mut solo = Vec::new();
    for k in 0..3 {
        solo.push(proxy.complete(styled(k)).await.unwrap().token_ids);
    }
    // Beside a base-model stream the steps alternate sets, so an image's prefill comes right
    // after a base-model step.
    for (k, want) in solo.iter().enumerate() {
        let mut stream = chat_request(&format!("Story {k}: write about the sea."), 48);
        stream.insert("speculative", Variant::from(false));
        let base = proxy.complete(stream);
        let late = async {
            tokio::time::sleep(std::time::Duration::from_millis(150)).await;
            proxy.complete(styled(k)).await
        };
        let (b, r) = tokio::join!(base, late);
        b.unwrap();
        assert_eq!(&r.unwrap().token_ids, want, "request {k}: its rows were decoded under another adapter set");
    }
}
