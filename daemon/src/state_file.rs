//! State files (the sealing key, run-time app policies, parked session KV) are written whole
//! or not at all: into a temporary file in the same directory, synced, then renamed over the
//! target, and the directory synced. A failed write (a full disk, say) leaves the old file, or
//! none, and no temporary file behind: `tempfile` removes it when it is dropped unpersisted.

use std::io::Write;
use std::path::Path;

const TMP_PREFIX: &str = ".hearth-";
const TMP_SUFFIX: &str = ".tmp";

fn staged(path: &Path, bytes: &[u8]) -> std::io::Result<tempfile::NamedTempFile> {
    let dir = path.parent().unwrap_or(Path::new("."));
    // NamedTempFile is created 0600 with O_EXCL and an unpredictable name.
    let mut tmp = tempfile::Builder::new().prefix(TMP_PREFIX).suffix(TMP_SUFFIX).tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    Ok(tmp)
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all()
}

/// Writes `bytes` to `path` (mode 0600), replacing it atomically.
pub fn replace(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    staged(path, bytes)?.persist(path).map_err(|e| e.error)?;
    sync_dir(path)
}

/// Creates `path` (mode 0600) holding `bytes`, unless it exists: then nothing is written and
/// the answer is false.
pub fn create_new(path: &Path, bytes: &[u8]) -> std::io::Result<bool> {
    match staged(path, bytes)?.persist_noclobber(path) {
        Ok(_) => sync_dir(path).map(|()| true),
        Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e.error),
    }
}

/// Removes the temporary files a crash (or power loss) between writing and renaming left in
/// `dir`; called at start, before anything is written there.
pub fn sweep(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(TMP_PREFIX) && name.ends_with(TMP_SUFFIX) && entry.file_type()?.is_file() {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A 64 KiB tmpfs, mounted while it lives (needs root; None elsewhere).
    pub(crate) struct SmallDisk(pub tempfile::TempDir);

    impl SmallDisk {
        pub(crate) fn mount() -> Option<Self> {
            let dir = tempfile::tempdir().ok()?;
            let ok = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs"])
                .arg(dir.path())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            ok.then_some(Self(dir))
        }

        /// Fills the disk with one file; returns its path.
        pub(crate) fn fill(&self) -> std::path::PathBuf {
            let filler = self.0.path().join("filler");
            let mut f = std::fs::File::create(&filler).unwrap();
            while f.write_all(&[0u8; 4096]).is_ok() {}
            let _ = f.sync_all();
            filler
        }

        pub(crate) fn names(&self) -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(self.0.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        }
    }

    impl Drop for SmallDisk {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0.path()).status();
        }
    }

    #[test]
    fn a_full_disk_leaves_the_old_file_or_none_and_no_temporary_file() {
        let Some(disk) = SmallDisk::mount() else {
            eprintln!("cannot mount a tmpfs (not root?): skipped");
            return;
        };
        let path = disk.0.path().join("state.toml");
        replace(&path, b"old").unwrap();
        let filler = disk.fill();
        assert!(replace(&path, &[7u8; 16384]).is_err());
        assert!(create_new(&disk.0.path().join("new"), &[7u8; 16384]).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(disk.names(), ["filler", "state.toml"]);
        std::fs::remove_file(filler).unwrap();
        replace(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert!(create_new(&disk.0.path().join("key"), b"k").unwrap());
        assert!(!create_new(&disk.0.path().join("key"), b"other").unwrap());
        // What a crash between write and rename leaves is swept at the next start.
        std::fs::write(disk.0.path().join(".hearth-abc123.tmp"), b"x").unwrap();
        sweep(disk.0.path()).unwrap();
        assert_eq!(disk.names(), ["key", "state.toml"]);
        assert_eq!(std::fs::read(disk.0.path().join("key")).unwrap(), b"k");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
