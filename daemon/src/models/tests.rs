use std::os::unix::fs::PermissionsExt;

use super::*;

const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

fn private_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[test]
fn scans_manifests_and_verifies_files() {
    let dir = private_dir();
    std::fs::write(dir.path().join("m.gguf"), b"").unwrap();
    std::fs::write(
        dir.path().join("m.toml"),
        format!("name = \"m\"\nfile = \"m.gguf\"\nsha256 = \"{EMPTY_SHA256}\"\n"),
    )
    .unwrap();
    let cat = Catalog::scan(&[dir.path().to_owned(), PathBuf::from("/nonexistent")]);
    let m = cat.get("m").unwrap();
    assert_eq!(m.path, dir.path().join("m.gguf"));
    assert_eq!(m.manifest.capabilities, vec![Capability::Chat]);
    let cache = HashCache::open(None).with_settle(std::time::Duration::ZERO);
    let v = open_verified(&m.path, &m.manifest.sha256, &cache, &mut |_| {}).unwrap();
    assert!(!v.cached);
    assert!(open_verified(&m.path, &m.manifest.sha256, &cache, &mut |_| {}).unwrap().cached);
    std::fs::write(dir.path().join("m.gguf"), b"tampered").unwrap();
    let err = open_verified(&m.path, &m.manifest.sha256, &cache, &mut |_| {}).unwrap_err();
    assert!(matches!(err, CatalogError::HashMismatch { .. }), "{err}");
}

#[test]
fn hash_cache_survives_a_restart_and_notices_changes() {
    let dir = private_dir();
    let model = dir.path().join("m.gguf");
    std::fs::write(&model, b"").unwrap();
    let cache_path = dir.path().join("hashes.toml");
    // A file changed just now is hashed but not cached: its timestamps could still repeat.
    let fresh = HashCache::open(Some(cache_path.clone()));
    open_verified(&model, EMPTY_SHA256, &fresh, &mut |_| {}).unwrap();
    assert!(!open_verified(&model, EMPTY_SHA256, &fresh, &mut |_| {}).unwrap().cached);
    assert!(!cache_path.exists());
    let settle = std::time::Duration::from_millis(30);
    std::thread::sleep(settle * 2);
    open_verified(&model, EMPTY_SHA256, &HashCache::open(Some(cache_path.clone())).with_settle(settle), &mut |_| {})
        .unwrap();
    let mode = std::fs::metadata(&cache_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let reopened = HashCache::open(Some(cache_path.clone())).with_settle(settle);
    assert!(open_verified(&model, EMPTY_SHA256, &reopened, &mut |_| {}).unwrap().cached);
    // Any change to the file (here its mode, which moves ctime) means hashing again.
    std::fs::set_permissions(&model, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(!open_verified(&model, EMPTY_SHA256, &reopened, &mut |_| {}).unwrap().cached);
}

#[test]
fn refuses_files_others_can_write() {
    let dir = private_dir();
    let model = dir.path().join("m.gguf");
    std::fs::write(&model, b"").unwrap();
    let cache = HashCache::open(None);
    for mode in [0o666, 0o620] {
        std::fs::set_permissions(&model, std::fs::Permissions::from_mode(mode)).unwrap();
        let err = open_verified(&model, EMPTY_SHA256, &cache, &mut |_| {}).unwrap_err();
        assert!(matches!(err, CatalogError::Untrusted { .. }), "{err}");
        assert!(err.to_string().contains("lets"), "{err}");
    }
    std::fs::set_permissions(&model, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = open_verified(&model, EMPTY_SHA256, &cache, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("everyone"), "{err}");
}

#[test]
fn rejects_bad_manifests() {
    let dir = private_dir();
    for (i, body) in [
        "name = \"m\"\nfile = \"../x.gguf\"\nsha256 = \"{H}\"\n",
        "name = \"m\"\nfile = \"x.gguf\"\nsha256 = \"ABC\"\n",
        "name = \"m\"\nfile = \"x.gguf\"\nsha256 = \"{H}\"\nextra = 1\n",
        "name = \"m\"\nfile = \"x.gguf\"\nsha256 = \"{H}\"\ncapabilities = [\"telepathy\"]\n",
        "name = \"m\"\nfile = \"x.gguf\"\nsha256 = \"{H}\"\n[[adapters]]\nfile = \"a.gguf\"\nsha256 = \"x\"\n",
        // vision without a projector, a projector without vision, a projector outside the dir
        "name = \"m\"\nfile = \"x.gguf\"\nsha256 = \"{H}\"\ncapabilities = [\"chat\", \"vision\"]\n",
        "name = \"m\"\nfile = \"x.gguf\"\nsha256 = \"{H}\"\n[mmproj]\nfile = \"p.gguf\"\nsha256 = \"{H}\"\n",
        "name = \"m\"\nfile = \"x.gguf\"\nsha256 = \"{H}\"\ncapabilities = [\"vision\"]\n[mmproj]\nfile = \"/p.gguf\"\nsha256 = \"{H}\"\n",
    ]
    .iter()
    .enumerate()
    {
        let sub = dir.path().join(i.to_string());
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(sub.join("m.toml"), body.replace("{H}", EMPTY_SHA256)).unwrap();
        let cat = Catalog::scan(&[sub]);
        assert!(cat.is_empty(), "case {i}");
        assert!(matches!(cat.rejected(), [CatalogError::Manifest { .. }]), "case {i}: {:?}", cat.rejected());
    }
}
