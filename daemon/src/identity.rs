//! Who is calling: the app id of a D-Bus caller, derived from what the kernel and the bus say,
//! never from what the caller claims.
//!
//! As xdg-desktop-portal does: a Flatpak app by its `.flatpak-info` (read through the caller's
//! /proc root, where hearthd may) or its `app-flatpak-<id>-<n>.scope` cgroup; a snap by its
//! `snap.<name>.<app>` cgroup; an app launched by a desktop/phone shell by its systemd
//! `app-[<launcher>-]<id>[@<n>].service` or `app-[<launcher>-]<id>-<n>.scope` unit; anything
//! else as `uid:<uid>:<executable>`. The pid is pinned with a pidfd (from the bus when it
//! gives one, else opened here) and checked alive after reading, so a pid reused in between
//! fails the call instead of naming the wrong app. Any failure is an error (fail closed).
//!
//! What each kind of id guarantees, and why a bare `uid:UID:EXE` may not Seal by default: see
//! [`AppKind`].

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

/// How the app id was found, and so what it is worth.
///
/// What hearthd can check is kernel state: the caller's uid (the bus's SO_PEERCRED), its
/// cgroup and its mount namespace (read through /proc with the pid pinned). None of it tells
/// apart two *unsandboxed* programs of one uid that set out to look alike: such a program
/// may move itself into a unit of any name (`systemd-run --user --scope --unit=…`; the user's
/// service manager runs as that user), make a user namespace with its own `/.flatpak-info`,
/// or simply ptrace the app or read its files. hearthd does not claim to separate the user's
/// unsandboxed programs from each other (neither does xdg-desktop-portal); what the kinds
/// differ in is whether the id names one app even when nobody lies:
///
/// - Flatpak: vouched by the sandbox. bwrap mounts `/.flatpak-info` read-only and flatpak
///   starts the app in `app-flatpak-ID-N.scope`; inside, the app cannot write cgroups, reach
///   the service manager or make namespaces, so it cannot pass for another app. May Seal.
///   (An app granted a way out, such as `--talk-name=org.freedesktop.Flatpak`, is as good as
///   unsandboxed: its id holds like a unit's.)
/// - Snap: vouched by the `snap.NAME.APP.*.scope` snapd starts it in; strict confinement
///   (AppArmor, seccomp) keeps it there. May Seal. (A *classic* snap is unsandboxed: its id
///   holds like a unit's.)
/// - Unit: vouched by the launcher (desktop or phone shell) that started the app in its own
///   `app-[LAUNCHER-]ID-N.scope` or `app-[LAUNCHER-]ID@N.service`: one app per id for apps
///   that do not lie, and sandboxed apps cannot make units. May Seal.
/// - Process (`uid:UID:EXE`): vouched by nothing but the uid and `/proc/PID/exe`. Not one app
///   per id even when nobody lies: every script one interpreter runs (`uid:1000:/usr/bin/
///   python3`) and every copy of a program is the same id. Seal is NotAuthorized unless the
///   app's policy sets `seal_unsandboxed = true` (the admin accepts that everything running
///   that executable as that uid shares what it seals).
///
/// For sessions, quotas and policy the kind changes nothing: a session (and the KV hearthd
/// parks for it) belongs to the bus connection that opened it, whatever its app id; quotas
/// (`requests_per_minute`) and the apps.d policy are per app id, so all programs that share a
/// `uid:UID:EXE` id share one quota and one policy file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppKind {
    /// A Flatpak app: its `[Application] name=` read from `/proc/PID/root/.flatpak-info` (the
    /// sandbox's own root, bind-mounted read-only by bwrap) and/or its `app-flatpak-ID-N.scope`
    /// cgroup; when both are there they must agree.
    Flatpak,
    /// A snap: its `snap.NAME.APP.*.scope` cgroup.
    Snap,
    /// A systemd app unit (service or scope) named after the app by whatever launched it.
    Unit,
    /// No sandbox or app unit: identified by uid and executable, a name shared by every
    /// program that executable runs (interpreters) and taken by any program of that uid that
    /// runs it. Not vouched for: see [`AppKind::vouched`].
    Process,
}

impl AppKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Flatpak => "flatpak",
            Self::Snap => "snap",
            Self::Unit => "systemd-unit",
            Self::Process => "process",
        }
    }

    /// Whether the id names one app, so that data sealed for it is that app's: true for a
    /// sandbox or an app unit, false for a bare process (see the table on [`AppKind`]).
    pub fn vouched(self) -> bool {
        !matches!(self, Self::Process)
    }
}

/// A caller's identity as resolved from the bus credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub app_id: String,
    pub kind: AppKind,
    pub uid: u32,
    pub pid: u32,
    /// The LSM label the bus reported (SELinux context, AppArmor profile), if any.
    pub label: Option<String>,
}

/// The app id from a Flatpak `.flatpak-info` file (`[Application] name=`).
pub fn flatpak_app_id(info: &str) -> Option<String> {
    let mut in_application = false;
    for line in info.lines().map(str::trim) {
        if line.starts_with('[') {
            in_application = line == "[Application]";
        } else if in_application && let Some(name) = line.strip_prefix("name=") {
            return valid_app_id(name).then(|| name.to_owned());
        }
    }
    None
}

/// Undoes systemd's unit-name escaping of `-` and other bytes (`\x2d`).
fn unescape_unit(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && b.get(i + 1) == Some(&b'x') && i + 3 < b.len() {
            out.push(u8::from_str_radix(std::str::from_utf8(&b[i + 2..i + 4]).ok()?, 16).ok()?);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A reverse-DNS-ish app id: letters, digits, `_`, `-` and `.`, starting with a letter or `_`.
fn valid_app_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// The app id from the unified (cgroup v2) path in a `/proc/<pid>/cgroup` file.
pub fn app_from_cgroup(cgroup_file: &str) -> Option<(AppKind, String)> {
    let path = cgroup_file.lines().find_map(|l| l.strip_prefix("0::"))?;
    // The innermost app unit wins (an app may run inside a user service's slice).
    for unit in path.split('/').rev() {
        if let Some(found) = app_from_unit(unit) {
            return Some(found);
        }
    }
    None
}

fn app_from_unit(unit: &str) -> Option<(AppKind, String)> {
    if let Some(rest) = unit.strip_prefix("snap.") {
        let name = rest.split('.').next()?;
        return valid_app_id(name).then(|| (AppKind::Snap, format!("snap.{name}")));
    }
    let (body, is_scope) =
        if let Some(b) = unit.strip_suffix(".scope") { (b, true) } else { (unit.strip_suffix(".service")?, false) };
    let body = body.strip_prefix("app-")?;
    if let Some(rest) = body.strip_prefix("flatpak-") {
        // app-flatpak-<id>-<pid>.scope
        let (id, n) = rest.rsplit_once('-')?;
        let id = unescape_unit(id)?;
        return (n.bytes().all(|b| b.is_ascii_digit()) && valid_app_id(&id)).then_some((AppKind::Flatpak, id));
    }
    // Strip the random suffix: "@<random>" (services) or "-<random>" (scopes).
    let body = match body.split_once('@') {
        Some((b, _)) => b,
        None if is_scope => body.rsplit_once('-')?.0,
        None => body,
    };
    // An optional launcher prefix ("gnome-", "phosh-" ...): the id is the last dash-separated
    // part once escaped dashes are kept (ids contain dots, launchers do not).
    let id = match body.rsplit_once('-') {
        Some((_, id)) if id.contains('.') => id,
        _ => body,
    };
    let id = unescape_unit(id)?;
    valid_app_id(&id).then_some((AppKind::Unit, id))
}

/// The pid a pidfd refers to (`Pid:` in its fdinfo).
fn pidfd_pid(fd: &OwnedFd) -> Result<u32, String> {
    use std::os::fd::AsRawFd;
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))
        .map_err(|e| format!("cannot read the pidfd's fdinfo: {e}"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|p| p.trim().parse::<i64>().ok())
        .and_then(|p| u32::try_from(p).ok())
        .ok_or_else(|| "the caller's process has exited".to_owned())
}

/// Whether the process behind `fd` is still running (a pidfd polls readable once it exits).
fn alive(fd: &OwnedFd) -> bool {
    let borrowed = fd.as_fd();
    let mut fds = [rustix::event::PollFd::new(&borrowed, rustix::event::PollFlags::IN)];
    matches!(rustix::event::poll(&mut fds, Some(&rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 })), Ok(0))
}

/// Resolves the identity of the process `pid` of user `uid`. `pidfd` is the bus's ProcessFD
/// when it sent one; `proc_root` is normally `/proc` (tests point it at a real-format tree).
pub fn resolve(
    uid: u32,
    pid: u32,
    pidfd: Option<OwnedFd>,
    label: Option<String>,
    proc_root: &Path,
) -> Result<Identity, String> {
    let pidfd = match pidfd {
        Some(fd) => {
            let fd_pid = pidfd_pid(&fd)?;
            if fd_pid != pid {
                return Err(format!("the bus's ProcessFD names pid {fd_pid}, its ProcessID {pid}"));
            }
            Some(fd)
        }
        // Pin the pid now; reading /proc below is then checked against this process.
        None if proc_root == Path::new("/proc") => Some(
            rustix::process::pidfd_open(
                rustix::process::Pid::from_raw(i32::try_from(pid).map_err(|_| "pid out of range")?).ok_or("pid 0")?,
                rustix::process::PidfdFlags::empty(),
            )
            .map_err(|e| format!("cannot pin the caller's process {pid}: {e}"))?,
        ),
        None => None,
    };
    let dir = proc_root.join(pid.to_string());
    let cgroup = std::fs::read_to_string(dir.join("cgroup"))
        .map_err(|e| format!("cannot read the caller's cgroup ({}): {e}", dir.display()))?;
    let from_cgroup = app_from_cgroup(&cgroup);
    // .flatpak-info inside the sandbox's root: readable when hearthd may look into the
    // caller's mount namespace; the cgroup must agree that it is a Flatpak app.
    let flatpak = std::fs::read_to_string(dir.join("root/.flatpak-info")).ok().and_then(|i| flatpak_app_id(&i));
    let (kind, app_id) = match (flatpak, from_cgroup) {
        (Some(id), Some((AppKind::Flatpak, cg))) if id == cg => (AppKind::Flatpak, id),
        (Some(id), Some((AppKind::Flatpak, cg))) => {
            return Err(format!("the caller's .flatpak-info says {id:?}, its cgroup {cg:?}"));
        }
        (Some(id), _) => (AppKind::Flatpak, id),
        (None, Some(found)) => found,
        (None, None) => {
            let exe =
                std::fs::read_link(dir.join("exe")).map_err(|e| format!("cannot read the caller's executable: {e}"))?;
            (AppKind::Process, format!("uid:{uid}:{}", exe.display()))
        }
    };
    if let Some(fd) = &pidfd
        && !alive(fd)
    {
        return Err("the caller's process exited while it was being identified".into());
    }
    Ok(Identity { app_id, kind, uid, pid, label })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flatpak_info() {
        let info = "[Application]\nname=org.gnome.Maps\nruntime=runtime/org.gnome.Platform/x86_64/46\n\n[Instance]\ninstance-id=123\n";
        assert_eq!(flatpak_app_id(info).as_deref(), Some("org.gnome.Maps"));
        assert_eq!(flatpak_app_id("[Instance]\nname=evil\n"), None);
        assert_eq!(flatpak_app_id("[Application]\nname=../../etc\n"), None);
    }

    #[test]
    fn cgroups_of_apps() {
        let cases = [
            (
                "0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-flatpak-org.gnome.Maps-4242.scope\n",
                Some((AppKind::Flatpak, "org.gnome.Maps")),
            ),
            (
                "0::/user.slice/user-1000.slice/user@1000.service/app.slice/snap.firefox.firefox.1b2c.scope\n",
                Some((AppKind::Snap, "snap.firefox")),
            ),
            (
                "0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-gnome-org.gnome.Calculator-99.scope\n",
                Some((AppKind::Unit, "org.gnome.Calculator")),
            ),
            (
                "0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-org.example.Notes@a1b2.service\n",
                Some((AppKind::Unit, "org.example.Notes")),
            ),
            (
                "0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-phosh-sm.puri.Chatty-7.scope\n",
                Some((AppKind::Unit, "sm.puri.Chatty")),
            ),
            (
                "0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-my\\x2dapp-7.scope\n",
                Some((AppKind::Unit, "my-app")),
            ),
            ("0::/user.slice/user-1000.slice/session-2.scope\n", None),
            ("0::/system.slice/ssh.service\n", None),
            ("0::/\n", None),
            ("1:name=systemd:/\n", None),
        ];
        for (cgroup, want) in cases {
            let got = app_from_cgroup(cgroup);
            assert_eq!(got.as_ref().map(|(k, s)| (*k, s.as_str())), want, "{cgroup}");
        }
    }

    #[test]
    fn resolves_from_a_real_format_proc_tree() {
        let proc_root = tempfile::tempdir().unwrap();
        let dir = proc_root.path().join("4242");
        std::fs::create_dir_all(dir.join("root")).unwrap();
        std::fs::write(
            dir.join("cgroup"),
            "0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-flatpak-org.gnome.Maps-4242.scope\n",
        )
        .unwrap();
        std::os::unix::fs::symlink("/usr/bin/gnome-maps", dir.join("exe")).unwrap();
        let id = resolve(1000, 4242, None, None, proc_root.path()).unwrap();
        assert_eq!((id.kind, id.app_id.as_str()), (AppKind::Flatpak, "org.gnome.Maps"));
        // A .flatpak-info that disagrees with the cgroup is refused.
        std::fs::write(dir.join("root/.flatpak-info"), "[Application]\nname=org.bank.App\n").unwrap();
        assert!(resolve(1000, 4242, None, None, proc_root.path()).is_err());
        // No app unit: uid and executable.
        std::fs::remove_file(dir.join("root/.flatpak-info")).unwrap();
        std::fs::write(dir.join("cgroup"), "0::/user.slice/user-1000.slice/session-2.scope\n").unwrap();
        let id = resolve(1000, 4242, None, None, proc_root.path()).unwrap();
        assert_eq!((id.kind, id.app_id.as_str()), (AppKind::Process, "uid:1000:/usr/bin/gnome-maps"));
        // Nothing readable: an error, never a default identity.
        assert!(resolve(1000, 9999, None, None, proc_root.path()).is_err());
    }

    #[test]
    fn resolves_this_process_with_a_pidfd() {
        let me = std::process::id();
        let id = resolve(0, me, None, None, Path::new("/proc")).unwrap();
        assert!(!id.app_id.is_empty());
        let fd = rustix::process::pidfd_open(
            rustix::process::Pid::from_raw(me as i32).unwrap(),
            rustix::process::PidfdFlags::empty(),
        )
        .unwrap();
        assert_eq!(resolve(0, me, Some(fd.try_clone().unwrap()), None, Path::new("/proc")).unwrap().app_id, id.app_id);
        // A ProcessFD that names another process than ProcessID is refused.
        assert!(resolve(0, 1, Some(fd), None, Path::new("/proc")).is_err());
    }
}
