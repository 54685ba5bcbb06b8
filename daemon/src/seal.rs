//! Sealed data: bytes an app hands hearthd encrypted with a key only hearthd holds, so it can
//! keep personal data on disk that only the on-device model will ever read in the clear.
//!
//! XChaCha20-Poly1305 (RustCrypto's `chacha20poly1305`) with a random 192-bit nonce; the
//! sealing app's id is carried in the blob and bound as associated data, so a blob re-labelled
//! for another app fails authentication. Blob: `HSL1 | u16 app id length | app id | nonce |
//! ciphertext+tag`. The 256-bit key comes from a systemd credential (`hearth-seal-key` in
//! $CREDENTIALS_DIRECTORY, e.g. LoadCredentialEncrypted=) or is created 0600 in the state dir.
//!
//! A blob is worth what the app id it is bound to is worth ([`crate::identity::AppKind`]):
//! - Seal ([`may_seal`]): a Flatpak, snap or systemd-app-unit id may always; a bare-process id
//!   (`uid:UID:EXE`) only when its policy sets `seal_unsandboxed = true`, else NotAuthorized:
//!   every program that executable runs as that uid (all scripts of one interpreter, any copy
//!   the user starts) is that same id, so "only this app may open it" would not hold.
//! - Open (a message's `sealed` part, `privacy::unseal`): by the sealing id, or an id its
//!   policy lists in `share_sealed_with`; not gated by kind. No vouched app can seal a blob
//!   for a bare id (ids of the other kinds never start with `uid:`), and what a bare id sealed
//!   under an opt-in stays usable by that id even if the opt-in is later removed.
//! - The blob is bound to the app id, not to the user: a Flatpak id is the same for every uid,
//!   so keeping blobs from other users is the job of where the app stores them (its files).
//! - Against the user's own unsandboxed programs no kind holds (they can take any unit name or
//!   make a fake `/.flatpak-info`, and can read the app's files and memory anyway).

use std::path::Path;

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

const MAGIC: &[u8; 4] = b"HSL1";
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// Largest text Seal accepts (images: `request::MAX_IMAGE_BYTES`).
pub const MAX_PLAINTEXT: usize = 1 << 20;
/// The systemd credential name of the key.
pub const CREDENTIAL: &str = "hearth-seal-key";

/// Whether `identity` may Seal under `policy` (its app's policy); the error says why not and
/// how an admin opts in.
pub fn may_seal(identity: &crate::identity::Identity, policy: &crate::policy::AppPolicy) -> Result<(), String> {
    if identity.kind.vouched() || policy.seal_unsandboxed {
        return Ok(());
    }
    Err(format!(
        "Seal is not available to {id:?}: it has no Flatpak or snap sandbox and no systemd app unit, \
         so it is named only by its uid and executable, a name every program that executable runs \
         as uid {uid} shares (all scripts of one interpreter) and any of them can take; data sealed \
         for it would not be this app's alone. Start the app in its own app unit (app-ID-N.scope) or \
         a sandbox, or an admin may opt in with `seal_unsandboxed = true` in the apps.d policy \
         of app = {id:?}",
        id = identity.app_id,
        uid = identity.uid,
    ))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// Not a sealed blob, or cut short.
    #[error("the sealed data is malformed ({0})")]
    Malformed(&'static str),
    /// The blob does not authenticate: tampered with, or sealed under another key or app.
    #[error("the sealed data does not authenticate (tampered with, or not sealed by this device for this app)")]
    Forged,
}

/// Where the systemd credential of the key would be, when systemd passes credentials.
pub fn credential_path() -> Option<std::path::PathBuf> {
    std::env::var_os("CREDENTIALS_DIRECTORY").map(|dir| Path::new(&dir).join(CREDENTIAL))
}

/// The key file in the state directory (used when there is no credential).
pub fn key_path(state_dir: &Path) -> std::path::PathBuf {
    state_dir.join("seal.key")
}

/// Holds the device key.
pub struct Sealer {
    cipher: XChaCha20Poly1305,
    /// Where the key came from, for the log.
    pub source: String,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer").field("source", &self.source).finish_non_exhaustive()
    }
}

/// What a blob is for, bound into its associated data so that one kind never opens as
/// another: data apps sealed with Seal, and the KV cache hearthd parks for sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Message,
    SessionKv,
}

fn associated_data(purpose: Purpose, app_id: &str) -> Vec<u8> {
    let domain: &[u8] = match purpose {
        Purpose::Message => b"hearth-seal-v1\0",
        Purpose::SessionKv => b"hearth-session-kv-v1\0",
    };
    [domain, app_id.as_bytes()].concat()
}

impl Sealer {
    /// The key from the systemd credential when present, else `state_dir/seal.key` (created
    /// with 32 random bytes, 0600, when missing).
    pub fn open(state_dir: &Path) -> std::io::Result<Self> {
        if let Some(path) = credential_path().filter(|p| p.exists()) {
            return Self::from_file(&path);
        }
        let path = key_path(state_dir);
        // Whole or not at all: a start on a full disk must not leave an empty key that every
        // later start then refuses.
        let key = XChaCha20Poly1305::generate_key(&mut OsRng);
        if crate::state_file::create_new(&path, &key)? {
            tracing::info!(path = %path.display(), "created the device sealing key");
        }
        Self::from_file(&path)
    }

    fn from_file(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path)?;
        if meta.mode() & 0o077 != 0 {
            return Err(std::io::Error::other(format!(
                "{} has mode {:04o}: the sealing key must be readable by hearthd only",
                path.display(),
                meta.mode() & 0o7777
            )));
        }
        let key = std::fs::read(path)?;
        let cipher = XChaCha20Poly1305::new_from_slice(&key)
            .map_err(|_| std::io::Error::other(format!("{} does not hold a 32-byte key", path.display())))?;
        Ok(Self { cipher, source: path.display().to_string() })
    }

    /// Seals `data` (a message's content) for `app_id`.
    pub fn seal(&self, app_id: &str, data: &[u8]) -> Result<Vec<u8>, SealError> {
        self.seal_for(Purpose::Message, app_id, data)
    }

    /// Seals `data` for `app_id` and `purpose`.
    pub fn seal_for(&self, purpose: Purpose, app_id: &str, data: &[u8]) -> Result<Vec<u8>, SealError> {
        let id = app_id.as_bytes();
        let id_len = u16::try_from(id.len()).map_err(|_| SealError::Malformed("app id too long"))?;
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let aad = associated_data(purpose, app_id);
        let sealed = self
            .cipher
            .encrypt(&nonce, Payload { msg: data, aad: &aad })
            .map_err(|_| SealError::Malformed("encryption failed"))?;
        Ok([MAGIC.as_slice(), &id_len.to_be_bytes(), id, &nonce, &sealed].concat())
    }

    /// The app that sealed `blob` (unauthenticated until [`Sealer::open_blob`] succeeds).
    pub fn sealer_of(blob: &[u8]) -> Result<String, SealError> {
        Ok(split(blob)?.0.to_owned())
    }

    /// Authenticates and decrypts `blob` (a message's content); returns the sealing app and
    /// the plaintext.
    pub fn open_blob(&self, blob: &[u8]) -> Result<(String, Vec<u8>), SealError> {
        self.open_for(Purpose::Message, blob)
    }

    /// Authenticates and decrypts a blob sealed for `purpose`.
    pub fn open_for(&self, purpose: Purpose, blob: &[u8]) -> Result<(String, Vec<u8>), SealError> {
        let (app_id, nonce, sealed) = split(blob)?;
        let aad = associated_data(purpose, app_id);
        let plain = self
            .cipher
            .decrypt(XNonce::from_slice(nonce), Payload { msg: sealed, aad: &aad })
            .map_err(|_| SealError::Forged)?;
        Ok((app_id.to_owned(), plain))
    }
}

fn split(blob: &[u8]) -> Result<(&str, &[u8], &[u8]), SealError> {
    let rest = blob.strip_prefix(MAGIC.as_slice()).ok_or(SealError::Malformed("not a Hearth sealed blob"))?;
    let (len, rest) = rest.split_at_checked(2).ok_or(SealError::Malformed("truncated"))?;
    let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
    let (id, rest) = rest.split_at_checked(len).ok_or(SealError::Malformed("truncated"))?;
    let id = std::str::from_utf8(id).map_err(|_| SealError::Malformed("app id is not UTF-8"))?;
    let (nonce, sealed) = rest.split_at_checked(NONCE_LEN).ok_or(SealError::Malformed("truncated"))?;
    if sealed.len() < TAG_LEN {
        return Err(SealError::Malformed("truncated"));
    }
    Ok((id, nonce, sealed))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_first_start_on_a_full_disk_leaves_no_key_behind() {
        let Some(disk) = crate::state_file::tests::SmallDisk::mount() else {
            eprintln!("cannot mount a tmpfs (not root?): skipped");
            return;
        };
        let filler = disk.fill();
        assert!(Sealer::open(disk.0.path()).is_err(), "no room for the key");
        assert_eq!(disk.names(), ["filler"], "no empty seal.key, no temporary file");
        std::fs::remove_file(filler).unwrap();
        let sealer = Sealer::open(disk.0.path()).expect("the next start creates the key");
        assert_eq!(std::fs::metadata(disk.0.path().join("seal.key")).unwrap().len(), 32);
        let blob = sealer.seal("app", b"x").unwrap();
        assert_eq!(Sealer::open(disk.0.path()).unwrap().open_blob(&blob).unwrap().1, b"x");
    }

    #[test]
    fn round_trip_and_every_forgery_fails() {
        let dir = tempfile::tempdir().unwrap();
        let s = Sealer::open(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join("seal.key")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let blob = s.seal("org.example.Notes", b"my diary").unwrap();
        assert!(!blob.windows(8).any(|w| w == b"my diary"));
        assert_eq!(s.open_blob(&blob).unwrap(), ("org.example.Notes".to_owned(), b"my diary".to_vec()));
        // The same key after a restart.
        assert_eq!(Sealer::open(dir.path()).unwrap().open_blob(&blob).unwrap().1, b"my diary");
        // A flipped ciphertext bit.
        let mut t = blob.clone();
        *t.last_mut().unwrap() ^= 1;
        assert_eq!(s.open_blob(&t), Err(SealError::Forged));
        // Relabelled for another app of the same length.
        let mut r = blob.clone();
        r[6..23].copy_from_slice(b"org.example.Evil!");
        assert_eq!(Sealer::sealer_of(&r).unwrap(), "org.example.Evil!");
        assert_eq!(s.open_blob(&r), Err(SealError::Forged));
        // Truncated anywhere.
        for n in [0, 3, 5, 20, 40, blob.len() - 1] {
            assert!(s.open_blob(&blob[..n]).is_err(), "length {n}");
        }
        // Another device's key.
        let other = Sealer::open(tempfile::tempdir().unwrap().path()).unwrap();
        assert_eq!(other.open_blob(&blob), Err(SealError::Forged));
    }

    #[test]
    fn bare_processes_seal_only_when_their_policy_opts_in() {
        use crate::identity::{AppKind, Identity};
        use crate::policy::AppPolicy;
        let id = |kind, app_id: &str| Identity { app_id: app_id.to_owned(), kind, uid: 1000, pid: 42, label: None };
        let default = AppPolicy::default();
        for (kind, app) in [
            (AppKind::Flatpak, "org.gnome.Maps"),
            (AppKind::Snap, "snap.firefox"),
            (AppKind::Unit, "org.example.Notes"),
        ] {
            assert_eq!(may_seal(&id(kind, app), &default), Ok(()), "{kind:?}");
        }
        // Two scripts of one interpreter are one id: refused by default, with the way out.
        let python = id(AppKind::Process, "uid:1000:/usr/bin/python3");
        let why = may_seal(&python, &default).unwrap_err();
        assert!(why.contains("seal_unsandboxed = true") && why.contains("uid:1000:/usr/bin/python3"), "{why}");
        let opted_in = AppPolicy { seal_unsandboxed: true, ..AppPolicy::default() };
        assert_eq!(may_seal(&python, &opted_in), Ok(()));
    }

    #[test]
    fn a_readable_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        Sealer::open(dir.path()).unwrap();
        std::fs::set_permissions(dir.path().join("seal.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(Sealer::open(dir.path()).unwrap_err().to_string().contains("readable by hearthd only"));
    }
}
