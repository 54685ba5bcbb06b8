//! The model catalog: manifests in the configured directories, and verification of a model
//! file against its manifest's sha256 before llama.cpp ever parses it.
//!
//! Must never hand an unverified path to the loader: crafted GGUF files have repeatedly been
//! memory-corruption bugs in llama.cpp, so only bytes that hash to the manifest are parsed.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// A manifest could not be read or parsed.
    #[error("bad model manifest {path}: {reason}")]
    Manifest { path: PathBuf, reason: String },
    /// The model file could not be read.
    #[error("cannot read model file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// The model file does not match its manifest.
    #[error("model file {path} has sha256 {actual}, its manifest says {expected}")]
    HashMismatch { path: PathBuf, expected: String, actual: String },
}

/// A model manifest (`<dir>/<anything>.toml`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The name requests use.
    pub name: String,
    /// The GGUF file, relative to the manifest's directory.
    pub file: PathBuf,
    /// Lower-case hex sha256 of the file.
    pub sha256: String,
}

/// One installed model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelEntry {
    pub manifest: Manifest,
    /// Absolute path of the model file.
    pub path: PathBuf,
}

/// All installed models by name. The first directory that defines a name wins.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    models: BTreeMap<String, ModelEntry>,
}

impl Catalog {
    /// Scans `dirs` for manifests. Missing directories are skipped; a broken manifest is an
    /// error, so a typo never makes a model silently disappear.
    pub fn scan(dirs: &[PathBuf]) -> Result<Self, CatalogError> {
        let mut models = BTreeMap::new();
        for dir in dirs {
            let Ok(entries) = std::fs::read_dir(dir) else { continue };
            let mut paths: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "toml"))
                .collect();
            paths.sort();
            for path in paths {
                let entry = read_manifest(&path)?;
                models.entry(entry.manifest.name.clone()).or_insert(entry);
            }
        }
        Ok(Self { models })
    }

    pub fn get(&self, name: &str) -> Option<&ModelEntry> {
        self.models.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &ModelEntry> {
        self.models.values()
    }

    pub fn len(&self) -> usize {
        self.models.len()
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }
}

fn read_manifest(path: &Path) -> Result<ModelEntry, CatalogError> {
    let bad = |reason: String| CatalogError::Manifest { path: path.to_owned(), reason };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let manifest: Manifest = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if manifest.name.is_empty() || manifest.name.len() > 128 || manifest.name.chars().any(char::is_control) {
        return Err(bad(format!("invalid model name {:?}", manifest.name)));
    }
    if manifest.sha256.len() != 64 || !manifest.sha256.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return Err(bad("sha256 must be 64 lower-case hex digits".into()));
    }
    if manifest.file.is_absolute() || manifest.file.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(bad(format!(
            "file {} must be a plain path inside the manifest's directory",
            manifest.file.display()
        )));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_path = dir.join(&manifest.file);
    Ok(ModelEntry { manifest, path: file_path })
}

/// Hashes `path` and compares it with `expected` (lower-case hex).
pub fn verify(path: &Path, expected: &str) -> Result<(), CatalogError> {
    let read_err = |source| CatalogError::Read { path: path.to_owned(), source };
    let mut file = std::fs::File::open(path).map_err(read_err)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(read_err)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let actual = hex::encode(hasher.finalize());
    if actual == expected {
        Ok(())
    } else {
        Err(CatalogError::HashMismatch { path: path.to_owned(), expected: expected.to_owned(), actual })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn scans_manifests_and_verifies_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("m.gguf"), b"").unwrap();
        std::fs::write(
            dir.path().join("m.toml"),
            format!("name = \"m\"\nfile = \"m.gguf\"\nsha256 = \"{EMPTY_SHA256}\"\n"),
        )
        .unwrap();
        let cat = Catalog::scan(&[dir.path().to_owned(), PathBuf::from("/nonexistent")]).unwrap();
        let m = cat.get("m").unwrap();
        assert_eq!(m.path, dir.path().join("m.gguf"));
        verify(&m.path, &m.manifest.sha256).unwrap();
        std::fs::write(dir.path().join("m.gguf"), b"tampered").unwrap();
        assert!(matches!(verify(&m.path, &m.manifest.sha256), Err(CatalogError::HashMismatch { .. })));
    }

    #[test]
    fn rejects_bad_manifests() {
        let dir = tempfile::tempdir().unwrap();
        for (i, body) in [
            "name = \"m\"\nfile = \"../x.gguf\"\nsha256 = \"{H}\"\n",
            "name = \"m\"\nfile = \"x.gguf\"\nsha256 = \"ABC\"\n",
            "name = \"m\"\nfile = \"x.gguf\"\nsha256 = \"{H}\"\nextra = 1\n",
        ]
        .iter()
        .enumerate()
        {
            let sub = dir.path().join(i.to_string());
            std::fs::create_dir(&sub).unwrap();
            std::fs::write(sub.join("m.toml"), body.replace("{H}", EMPTY_SHA256)).unwrap();
            assert!(matches!(Catalog::scan(&[sub]), Err(CatalogError::Manifest { .. })), "case {i}");
        }
    }
}
