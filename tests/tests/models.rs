//! The model manager against the real daemon: verification before parsing, trust checks,
//! the memory budget, keep-alive, memory pressure, admin methods and devices.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hearth_dbus::Generation;
use hearth_tests::{Bus, Daemon, ModelDir, Settings, chat_request, hearth, wait_for};
use zbus::Variant;

/// Per-request context and slots small enough that one model is ~170 MiB (weights + KV).
fn small_engine(dir: &ModelDir) -> Settings {
    Settings {
        models_dirs: Some(vec![dir.path().to_owned()]),
        max_sequences: Some(2),
        interactive_sequences: Some(1),
        ..Settings::default()
    }
}

fn entry<'a>(models: &'a [hearth_dbus::ModelInfo], name: &str) -> &'a hearth_dbus::ModelInfo {
    models.iter().find(|m| m.name == name).unwrap_or_else(|| panic!("{name} not listed"))
}

async fn refused(proxy: &hearth_dbus::Hearth1Proxy<'_>, model: &str) -> (String, String) {
    let mut r = chat_request("Hi", 4);
    r.insert("model", Variant::from(model));
    let e = proxy.complete(r).await.expect_err("the request must be refused");
    (e.dbus_name(), e.message())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unverified_or_untrusted_files_are_refused_before_parsing() {
    let dir = ModelDir::new();
    dir.link_default_model("good.gguf");
    dir.manifest("smollm2-135m-instruct", "good.gguf", None, "");
    // Bytes that do not match the manifest: the real model's hash over other bytes.
    let real = hearth_tests::sha256_file(&hearth_tests::model_path());
    dir.write_file("tampered.gguf", b"GGUF not really", 0o644);
    dir.manifest("tampered", "tampered.gguf", Some(&real), "");
    // Verified bytes that are not a usable GGUF: truncated, and garbage.
    let model = std::fs::read(hearth_tests::model_path()).unwrap();
    dir.write_file("truncated.gguf", &model[..1 << 20], 0o644);
    dir.manifest("truncated", "truncated.gguf", None, "");
    dir.write_file("garbage.gguf", &[0x5a; 4096], 0o644);
    dir.manifest("garbage", "garbage.gguf", None, "");
    // Files others could change.
    dir.write_file("writable.gguf", b"x", 0o666);
    dir.manifest("writable", "writable.gguf", None, "");
    let foreign = dir.write_file("foreign.gguf", b"x", 0o644);
    let as_root = nix::unistd::geteuid().is_root();
    if as_root {
        std::os::unix::fs::chown(&foreign, Some(65534), None).unwrap();
    }
    dir.manifest("foreign", "foreign.gguf", None, "");
    let group_writable = dir.manifest("group-writable-manifest", "good.gguf", None, "");
    std::fs::set_permissions(&group_writable, std::os::unix::fs::PermissionsExt::from_mode(0o664)).unwrap();

    let bus = Bus::start();
    let mut daemon = Daemon::start_configured(&bus, &small_engine(&dir)).await;
    let conn = bus.connect().await;
    let proxy = hearth(&conn).await;
    let unavailable = "org.hearth.Hearth1.Error.ModelUnavailable";

    let (name, msg) = refused(&proxy, "tampered").await;
    assert_eq!(name, unavailable);
    assert!(msg.contains("has sha256") && msg.contains(&real), "{msg}");
    for bad in ["truncated", "garbage"] {
        let (name, msg) = refused(&proxy, bad).await;
        assert_eq!(name, unavailable, "{bad}");
        assert!(msg.contains("llama.cpp cannot load it"), "{bad}: {msg}");
    }
    let (name, msg) = refused(&proxy, "writable").await;
    assert_eq!(name, unavailable);
    assert!(msg.contains("lets everyone write it"), "{msg}");
    if as_root {
        let (name, msg) = refused(&proxy, "foreign").await;
        assert_eq!(name, unavailable);
        assert!(msg.contains("owned by uid 65534"), "{msg}");
    } else {
        eprintln!("not root: the foreign-owner case needs chown and was skipped");
    }
    // A manifest others could change is not installed at all; the log says why.
    let (name, _) = refused(&proxy, "group-writable-manifest").await;
    assert_eq!(name, "org.hearth.Hearth1.Error.ModelNotFound");
    assert!(daemon.log().contains("lets its group write it"), "{}", daemon.log());
    // The tampered file was never handed to llama.cpp: nothing but the good model was parsed.
    assert!(!daemon.log().contains("tampered.gguf passed"), "{}", daemon.log());

    // ListModels says what went wrong, and the daemon still serves.
    let models = proxy.list_models().await.unwrap();
    let t = entry(&models, "tampered");
    assert!(!t.verified && !t.loaded);
    assert!(t.error.as_deref().unwrap_or_default().contains("sha256"));
    // Availability tells an app the same before it offers a feature, and loads nothing.
    let a = proxy.availability("tampered").await.unwrap();
    assert_eq!(a.state, "unavailable", "{a:?}");
    assert!(a.reason.contains("last load failed") && a.reason.contains("sha256"), "{a:?}");
    let a = proxy.availability("no-such-model").await.unwrap();
    assert_eq!((a.state.as_str(), a.capabilities.len()), ("not-installed", 0), "{a:?}");
    let a = proxy.availability("").await.unwrap();
    assert_eq!(a.model, "smollm2-135m-instruct");
    assert!(a.state == "installed" || a.state == "ready", "{a:?}");
    assert!(a.capabilities.iter().any(|c| c == "chat"), "{a:?}");
    let ok = proxy.complete(chat_request("Hi", 4)).await.unwrap();
    let a = proxy.availability("smollm2-135m-instruct").await.unwrap();
    assert_eq!((a.state.as_str(), a.reason.as_str()), ("ready", ""), "{a:?}");
    assert!(a.context_length.is_some_and(|n| n > 0), "{a:?}");
    assert_eq!(ok.model.clone(), "smollm2-135m-instruct");
    assert!(daemon.try_exit().is_none());
}

/// Starts a generation that runs for a while (the model writes a long list greedily).
async fn long_generation(conn: &zbus::Connection, model: &str, token: &str) -> Generation {
    let mut r = chat_request("List the numbers from 1 to 300, one per line.", 600);
    r.insert("model", Variant::from(model.to_owned()));
    Generation::start(conn, r, token).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_for_one_model_evicts_the_idle_one_and_never_an_active_one() {
    let dir = ModelDir::new();
    dir.link_default_model("m.gguf");
    dir.manifest("smollm2-135m-instruct", "m.gguf", None, "");
    dir.manifest("second", "m.gguf", None, "");
    let settings = Settings { memory: "budget_mib = 250\n".into(), ..small_engine(&dir) };
    let bus = Bus::start();
    let _daemon = Daemon::start_configured(&bus, &settings).await;
    let conn = bus.connect().await;
    let proxy = hearth(&conn).await;

    let mut second = chat_request("Hi", 2);
    second.insert("model", Variant::from("second"));
    proxy.complete(chat_request("Hi", 2)).await.unwrap();
    proxy.complete(second.clone()).await.unwrap();
    assert_eq!(proxy.loaded_models().await.unwrap(), vec!["second".to_owned()], "the idle default was evicted");
    assert_eq!(proxy.memory().await.unwrap().evicted, 1);

    // While "second" is generating, the default model cannot have its memory.
    let mut long = long_generation(&conn, "second", "long").await;
    let (name, msg) = refused(&proxy, "smollm2-135m-instruct").await;
    assert_eq!(name, "org.hearth.Hearth1.Error.ModelUnavailable");
    assert!(msg.contains("memory budget is 250.0 MiB") && msg.contains("second") && msg.contains("in use"), "{msg}");
    assert_eq!(proxy.loaded_models().await.unwrap(), vec!["second".to_owned()]);
    let mut tokens = 0;
    let result = loop {
        match long.next().await.expect("stream").expect("event") {
            hearth_dbus::StreamEvent::Token { .. } => tokens += 1,
            hearth_dbus::StreamEvent::Migrated { .. } => {}
            hearth_dbus::StreamEvent::Finished(r) => break r,
        }
    };
    let reason = result.finish_reason.clone();
    assert!(reason == "length" || reason == "stop", "the active model kept serving: {reason} after {tokens} tokens");
    // Idle again, so it gives way.
    proxy.complete(chat_request("Hi", 2)).await.unwrap();
    assert_eq!(proxy.loaded_models().await.unwrap(), vec!["smollm2-135m-instruct".to_owned()]);
    assert_eq!(proxy.memory().await.unwrap().evicted, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_unloads_an_idle_model_and_the_next_request_reloads_it() {
    let dir = ModelDir::new();
    dir.link_default_model("m.gguf");
    dir.manifest("smollm2-135m-instruct", "m.gguf", None, "keep_alive_s = 1");
    // hearthd caches a hash only once the file has been unchanged for 2 s (timestamps are
    // coarse); the link just changed its ctime.
    std::thread::sleep(Duration::from_millis(2100));
    let bus = Bus::start();
    let daemon = Daemon::start_configured(&bus, &small_engine(&dir)).await;
    let conn = bus.connect().await;
    let proxy = hearth(&conn).await;
    let rss_idle = hearth_tests::rss_kib(daemon.pid());

    let t = Instant::now();
    let first = proxy.complete(chat_request("What is the capital of France?", 8)).await.unwrap();
    let cold = t.elapsed();
    let unloaded_after = Instant::now();
    let rss_loaded = hearth_tests::rss_kib(daemon.pid());
    assert_eq!(proxy.loaded_models().await.unwrap().len(), 1);
    wait_for(Duration::from_secs(10), "the keep-alive unload", || async {
        proxy.loaded_models().await.unwrap().is_empty().then_some(())
    })
    .await;
    let idle_for = unloaded_after.elapsed();
    // The keep-alive counts from the end of the request, which is just before its reply.
    assert!(idle_for >= Duration::from_millis(900), "unloaded after {idle_for:?}, keep_alive_s is 1");
    assert_eq!(proxy.memory().await.unwrap().expired, 1);
    let rss_unloaded = hearth_tests::rss_kib(daemon.pid());

    let t = Instant::now();
    let again = proxy.complete(chat_request("What is the capital of France?", 8)).await.unwrap();
    let warm = t.elapsed();
    assert_eq!(first.text.clone(), again.text.clone());
    // The second load found the file unchanged and skipped hashing.
    assert!(daemon.log().contains("cached=true"), "{}", daemon.log());
    eprintln!(
        "first request (hash + load) {cold:?}, after keep-alive unload (cached hash) {warm:?}; \
         RSS idle {rss_idle} KiB, loaded {rss_loaded} KiB, unloaded {rss_unloaded} KiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sustained_memory_pressure_unloads_idle_models_and_shrinks_pinned_ones() {
    let dir = ModelDir::new();
    dir.link_default_model("m.gguf");
    dir.manifest("smollm2-135m-instruct", "m.gguf", None, "pinned = true");
    dir.manifest("second", "m.gguf", None, "");
    let psi = dir.write_file("memory.pressure", b"", 0o644);
    let calm = "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
    let tight = "some avg10=42.00 avg60=20.00 avg300=5.00 total=9000000\nfull avg10=12.00 avg60=6.00 avg300=1.00 total=3000000\n";
    std::fs::write(&psi, calm).unwrap();
    let settings = Settings {
        memory: format!(
            "pressure_file = {:?}\npressure_interval_ms = 50\npressure_readings = 3\n",
            psi.display().to_string()
        ),
        ..small_engine(&dir)
    };
    let bus = Bus::start();
    let _daemon = Daemon::start_configured(&bus, &settings).await;
    let conn = bus.connect().await;
    let proxy = hearth(&conn).await;
    // The pinned model loads at start.
    wait_for(Duration::from_secs(30), "the pinned model", || async {
        (proxy.loaded_models().await.unwrap() == ["smollm2-135m-instruct"]).then_some(())
    })
    .await;
    let full_kv = proxy.kv_cache().await.unwrap().size;
    let mut second = chat_request("Hi", 2);
    second.insert("model", Variant::from("second"));
    proxy.complete(second).await.unwrap();

    std::fs::write(&psi, tight).unwrap();
    let memory = wait_for(Duration::from_secs(10), "the pressure response", || async {
        let m = proxy.memory().await.unwrap();
        (m.pressure_shrinks == 1 && m.pressure_unloads == 1).then_some(m)
    })
    .await;
    assert!(memory.pressure);
    assert_eq!(memory.some_avg10, 42.0);
    assert_eq!(proxy.loaded_models().await.unwrap(), vec!["smollm2-135m-instruct".to_owned()]);
    let models = proxy.list_models().await.unwrap();
    assert_eq!(entry(&models, "smollm2-135m-instruct").kv_shrunk, Some(true));
    let shrunk_kv = proxy.kv_cache().await.unwrap().size;
    assert!(shrunk_kv < full_kv, "KV {full_kv} -> {shrunk_kv} tokens");
    // The shrunk model still serves.
    proxy.complete(chat_request("Hi", 2)).await.unwrap();

    std::fs::write(&psi, calm).unwrap();
    wait_for(Duration::from_secs(10), "the pressure to clear", || async {
        (!proxy.memory().await.unwrap().pressure).then_some(())
    })
    .await;
    // The next request regrows the KV cache.
    proxy.complete(chat_request("Hi", 2)).await.unwrap();
    assert_eq!(proxy.kv_cache().await.unwrap().size, full_kv);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_methods_report_progress_and_refuse_other_users() {
    let bus = Bus::start();
    bus.open_to_all_users();
    let _daemon = Daemon::start(&bus).await;
    let conn = bus.connect().await;
    let proxy = hearth_dbus::Hearth1Proxy::new(&conn).await.unwrap();

    // Watch LoadProgress while an admin loads the model.
    let mut changes = proxy.receive_load_progress_changed().await;
    let watcher = tokio::spawn(async move {
        use futures_util::StreamExt;
        let mut seen = Vec::new();
        while let Ok(Some(change)) = tokio::time::timeout(Duration::from_secs(1), changes.next()).await {
            if let Ok(v) = change.get().await {
                seen.extend(v.into_values());
            }
        }
        seen
    });
    proxy.load_model("smollm2-135m-instruct", HashMap::from([("pin", Variant::from(true))])).await.unwrap();
    let seen = watcher.await.unwrap();
    // PropertiesChanged carries the latest value, not every step: phases may be skipped, but
    // those seen come in order and every fraction is in 0..=1.
    let order = |p: &str| ["verifying", "loading", "starting"].iter().position(|q| *q == p).expect("known phase");
    assert!(!seen.is_empty(), "no LoadProgress change during a load");
    assert!(seen.windows(2).all(|w| order(&w[0].0) <= order(&w[1].0)), "{seen:?}");
    assert!(seen.iter().all(|(_, f)| (0.0..=1.0).contains(f)), "{seen:?}");
    assert!(proxy.load_progress().await.unwrap().is_empty());

    let e = proxy.load_model("nope", HashMap::new()).await.unwrap_err();
    assert_eq!(e.dbus_name(), "org.hearth.Hearth1.Error.ModelNotFound");
    let e =
        proxy.load_model("smollm2-135m-instruct", HashMap::from([("pinn", Variant::from(true))])).await.unwrap_err();
    assert_eq!(e.dbus_name(), "org.hearth.Hearth1.Error.InvalidArgs");

    // Another user may neither load nor unload.
    if nix::unistd::geteuid().is_root() {
        for args in [&["load", "smollm2-135m-instruct"][..], &["unload", "smollm2-135m-instruct"][..]] {
            let out = std::process::Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(hearth_tests::workspace_bin("hearthctl"))
                .args(["--bus-address", bus.address()])
                .args(args)
                .output()
                .expect("setpriv");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success() && stderr.contains("org.hearth.Hearth1.Error.NotAuthorized"), "{stderr}");
        }
    } else {
        eprintln!("not root: the other-user case needs setpriv as root and was skipped");
    }

    // A model serving a request is not unloaded; once idle it is, pinned or not.
    let mut long = long_generation(&conn, "smollm2-135m-instruct", "busy").await;
    let e = proxy.unload_model("smollm2-135m-instruct").await.unwrap_err();
    assert_eq!(e.dbus_name(), "org.hearth.Hearth1.Error.Busy");
    long.cancel().await.unwrap();
    while let Some(ev) = long.next().await {
        if matches!(ev.unwrap(), hearth_dbus::StreamEvent::Finished(_)) {
            break;
        }
    }
    wait_for(Duration::from_secs(10), "the unload", || async {
        proxy.unload_model("smollm2-135m-instruct").await.ok()
    })
    .await;
    assert!(proxy.loaded_models().await.unwrap().is_empty());
    let e = proxy.unload_model("smollm2-135m-instruct").await.unwrap_err();
    assert_eq!(e.dbus_name(), "org.hearth.Hearth1.Error.ModelUnavailable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_are_listed_and_a_missing_one_stops_the_start() {
    let bus = Bus::start();
    let settings = Settings { engine: "devices = [\"NoSuchGPU7\"]\n".into(), ..Settings::default() };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hearthd.toml");
    std::fs::write(
        &config,
        format!(
            "[models]\ndirs = [{:?}]\n[engine]\n{}",
            hearth_tests::models_dir().display().to_string(),
            settings.engine
        ),
    )
    .unwrap();
    let out = std::process::Command::new(hearth_tests::workspace_bin("hearthd"))
        .arg("--config")
        .arg(&config)
        .args(["--bus-address", bus.address()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("NoSuchGPU7") && stderr.contains("CPU"), "{stderr}");
}

/// Offloads every layer where a GPU (or NPU) device exists; on a CPU-only machine there is
/// nothing to offload to, and the test says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_offload_where_a_gpu_exists() {
    let devices = hearth_ffi::Backend::init().devices();
    let Some(gpu) = devices.iter().find(|d| d.kind != hearth_ffi::DeviceKind::Cpu) else {
        eprintln!("no GPU/accelerator device in this build or machine ({devices:?}): offload not exercised");
        return;
    };
    let bus = Bus::start();
    let settings = Settings { engine: format!("gpu_layers = -1\ndevices = [{:?}]\n", gpu.name), ..Settings::default() };
    let daemon = Daemon::start_configured(&bus, &settings).await;
    let conn = bus.connect().await;
    let proxy = hearth(&conn).await;
    let direct = hearth_tests::direct_run(&[("user", "What is the capital of France?")], hearth_tests::greedy(), 8);
    let r = proxy.complete(chat_request("What is the capital of France?", 8)).await.unwrap();
    assert!(!r.text.clone().is_empty());
    let log = daemon.log();
    assert!(log.contains("offloaded"), "{log}");
    eprintln!("GPU run: {:?}, CPU reference: {:?}", r.text.clone(), direct.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_adapters_are_verified_and_applied() {
    let dir = ModelDir::new();
    dir.link_default_model("m.gguf");
    dir.manifest("smollm2-135m-instruct", "m.gguf", None, "");
    dir.make_lora("lora.gguf", &[]);
    dir.make_lora("zero.gguf", &["--zero"]);
    let adapter = |file: &str, sha: Option<&str>| {
        let sha = sha.map_or_else(|| hearth_tests::sha256_file(&dir.path().join(file)), str::to_owned);
        format!("[[adapters]]\nfile = {file:?}\nsha256 = {sha:?}\n")
    };
    dir.manifest("tuned", "m.gguf", None, &adapter("lora.gguf", None));
    dir.manifest("tuned-zero", "m.gguf", None, &adapter("zero.gguf", None));
    dir.manifest("tuned-tampered", "m.gguf", None, &adapter("lora.gguf", Some(&"0".repeat(64))));
    let bus = Bus::start();
    let _daemon = Daemon::start_configured(&bus, &small_engine(&dir)).await;
    let conn = bus.connect().await;
    let proxy = hearth(&conn).await;
    let ids = |model: &str| {
        let mut r = chat_request("Name three colours.", 16);
        r.insert("model", Variant::from(model.to_owned()));
        let proxy = proxy.clone();
        async move { proxy.complete(r).await.unwrap().token_ids.clone() }
    };
    let base = ids("smollm2-135m-instruct").await;
    assert_ne!(ids("tuned").await, base, "the adapter changes the output");
    assert_eq!(ids("tuned-zero").await, base, "an adapter with B = 0 changes nothing");
    let (name, msg) = refused(&proxy, "tuned-tampered").await;
    assert_eq!(name, "org.hearth.Hearth1.Error.ModelUnavailable");
    assert!(msg.contains("lora.gguf has sha256"), "{msg}");
    let models = proxy.list_models().await.unwrap();
    assert_eq!(entry(&models, "tuned").adapters, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_request_adapters_apply_to_their_request_only() {
    let dir = ModelDir::new();
    dir.link_default_model("m.gguf");
    dir.make_lora("style.gguf", &[]);
    let sha = hearth_tests::sha256_file(&dir.path().join("style.gguf"));
    // scale 0: requests that name no adapters run the base model.
    let adapters = format!("[[adapters]]\nname = \"style\"\nfile = \"style.gguf\"\nsha256 = {sha:?}\nscale = 0.0\n");
    dir.manifest("smollm2-135m-instruct", "m.gguf", None, &adapters);
    let bus = Bus::start();
    let _daemon = Daemon::start_configured(&bus, &small_engine(&dir)).await;
    let conn = bus.connect().await;
    let proxy = hearth(&conn).await;
    let request = |scale: Option<f64>| {
        let mut r = chat_request("Name three colours.", 24);
        if let Some(x) = scale {
            r.insert("adapters", Variant::from(HashMap::from([("style".to_owned(), Variant::from(x))])));
        }
        r
    };
    let ids = |scale: Option<f64>| {
        let proxy = proxy.clone();
        async move { proxy.complete(request(scale)).await.unwrap().token_ids }
    };
    let base = ids(None).await;
    assert_eq!(ids(Some(0.0)).await, base, "scale 0 is the base model");
    let tuned = ids(Some(1.0)).await;
    assert_ne!(tuned, base, "the adapter changes the output");
    let half = ids(Some(0.5)).await;
    // Concurrent requests with different adapter sets share the engine (their decode steps
    // take turns) and each gets exactly its solo output, twice over.
    for _ in 0..2 {
        let (a, b, c) = tokio::join!(ids(Some(1.0)), ids(None), ids(Some(0.5)));
        assert_eq!((a, b, c), (tuned.clone(), base.clone(), half.clone()), "no contamination between adapter sets");
    }
    // Bad adapter requests get named errors, and the daemon keeps serving.
    let mut unknown = chat_request("hi", 4);
    unknown.insert("adapters", Variant::from(HashMap::from([("nope".to_owned(), Variant::from(1.0))])));
    let e = proxy.complete(unknown).await.unwrap_err();
    assert_eq!(e.dbus_name(), "org.hearth.Hearth1.Error.InvalidArgs");
    assert!(e.message().contains("\"nope\"") && e.message().contains("style"), "{}", e.message());
    let mut cloud = request(Some(1.0));
    cloud.insert("route", Variant::from("cloud"));
    assert_eq!(proxy.complete(cloud).await.unwrap_err().dbus_name(), "org.hearth.Hearth1.Error.InvalidArgs");
    let mut huge = request(Some(1e9));
    huge.insert("max_tokens", Variant::from(4u32));
    assert_eq!(proxy.complete(huge).await.unwrap_err().dbus_name(), "org.hearth.Hearth1.Error.InvalidArgs");
    assert_eq!(ids(None).await, base);
    let models = proxy.list_models().await.unwrap();
    assert_eq!(entry(&models, "smollm2-135m-instruct").adapter_names, ["style"]);
}

/// The offset of the u32 value of metadata key `want` in a GGUF v2/v3 file's bytes.
fn gguf_u32_offset(f: &[u8], want: &str) -> usize {
    let u32_at = |p: usize| u32::from_le_bytes(f[p..p + 4].try_into().unwrap());
    let u64_at = |p: usize| u64::from_le_bytes(f[p..p + 8].try_into().unwrap()) as usize;
    let size = |t: u32| match t {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        10..=12 => 8,
        t => panic!("GGUF type {t}"),
    };
    assert_eq!(&f[..4], b"GGUF");
    let kvs = u64_at(16);
    let mut pos = 24;
    for _ in 0..kvs {
        let len = u64_at(pos);
        let key = std::str::from_utf8(&f[pos + 8..pos + 8 + len]).unwrap().to_owned();
        pos += 8 + len;
        let t = u32_at(pos);
        pos += 4;
        if key == want {
            assert_eq!(t, 4, "{want} is a u32");
            return pos;
        }
        match t {
            8 => pos += 8 + u64_at(pos),
            9 => {
                let (et, n) = (u32_at(pos), u64_at(pos + 4));
                pos += 12;
                for _ in 0..n {
                    pos += if et == 8 { 8 + u64_at(pos) } else { size(et) };
                }
            }
            t => pos += size(t),
        }
    }
    panic!("no {want} in the GGUF header");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_llama_cpp_would_abort_on_is_refused_with_its_reason() {
    let dir = ModelDir::new();
    dir.link_default_model("m.gguf");
    dir.manifest("smollm2-135m-instruct", "m.gguf", None, "");
    let mut bytes = std::fs::read(hearth_tests::model_path()).unwrap();
    let at = gguf_u32_offset(&bytes, "llama.block_count");
    bytes[at..at + 4].copy_from_slice(&10_000u32.to_le_bytes());
    dir.write_file("layers.gguf", &bytes, 0o644);
    drop(bytes);
    dir.manifest("too-many-layers", "layers.gguf", None, "");

    let bus = Bus::start();
    let mut daemon = Daemon::start_configured(&bus, &small_engine(&dir)).await;
    let conn = bus.connect().await;
    let proxy = hearth(&conn).await;
    let (name, msg) = refused(&proxy, "too-many-layers").await;
    assert_eq!(name, "org.hearth.Hearth1.Error.ModelUnavailable");
    assert!(msg.contains("claims 10000 layers") && msg.contains("512"), "{msg}");
    // ListModels' error says the same, and the daemon is alive and serves the default model.
    let models = proxy.list_models().await.unwrap();
    let t = entry(&models, "too-many-layers");
    assert!(!t.loaded);
    assert!(t.error.as_deref().unwrap_or_default().contains("claims 10000 layers"), "{t:?}");
    let ok = proxy.complete(chat_request("Hi", 4)).await.unwrap();
    assert_eq!(ok.model.clone(), "smollm2-135m-instruct");
    // Asked again, it is refused again the same way (no abort the second time either).
    let (name, msg) = refused(&proxy, "too-many-layers").await;
    assert_eq!(name, "org.hearth.Hearth1.Error.ModelUnavailable");
    assert!(msg.contains("claims 10000 layers"), "{msg}");
    assert!(daemon.try_exit().is_none());
}
