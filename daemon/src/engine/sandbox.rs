//! The engine process's sandbox, applied in steps as it starts (child.rs):
//!
//! 1. [`limit_resources`]: no core dumps, not dumpable (no ptrace by the same uid, no
//!    /proc/PID/mem), at most [`MAX_FDS`] descriptors. Not an address-space limit: the mapped
//!    model, malloc arenas and thread stacks count in full, and a wrong guess kills a load.
//! 2. [`restrict_files`] (landlock, before the model is parsed): every file-system right and
//!    TCP bind/connect is handled and none is granted, except reading the adapter files it
//!    was handed; abstract unix sockets and signals to processes outside are scoped. The
//!    model itself comes as an open descriptor and needs no rule.
//! 3. [`restrict_syscalls`] (seccompiler, after the model and contexts exist): an
//!    allowlist of what decoding needs. Everything else fails with EPERM, so an exploit
//!    cannot open, connect, exec, fork, ptrace or ioctl.
//!
//! Why these crates: landlock (the Landlock maintainers' own crate, best-effort across
//! kernel ABIs) and seccompiler (the Firecracker team's pure-Rust BPF compiler for x86_64
//! and aarch64: no libseccomp to cross-build for the phone image). Neither needs privileges
//! or namespaces, which hearthd's unit denies (RestrictNamespaces=yes).

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, AccessNet, PathBeneath, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};

/// Most descriptors the engine may hold: the socket, stdio, the model and adapter files,
/// the I/O runtime's epoll and event descriptors, with room to spare.
pub const MAX_FDS: u64 = 64;

/// Step 1: resource limits (`prlimit64`, which hearthd's unit allows) and dumpability.
pub fn limit_resources() -> Result<(), String> {
    use rustix::process::{Resource, Rlimit, setrlimit};
    let limit = |r: Resource, n: u64, what: &str| {
        setrlimit(r, Rlimit { current: Some(n), maximum: Some(n) }).map_err(|e| format!("cannot limit {what}: {e}"))
    };
    limit(Resource::Core, 0, "core dumps")?;
    limit(Resource::Nofile, MAX_FDS, "open files")?;
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        .map_err(|e| format!("cannot make the process non-dumpable: {e}"))
}

/// Step 2: landlock. Returns how much of it the kernel enforces ("full", "partial",
/// "none"): a kernel without landlock leaves it unenforced without an error, which the
/// report makes visible.
pub fn restrict_files(readable: &[&OwnedFd]) -> Result<&'static str, String> {
    let abi = ABI::V6;
    let err = |e: landlock::RulesetError| format!("landlock: {e}");
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .map_err(err)?
        .handle_access(AccessNet::from_all(abi))
        .map_err(err)?
        .scope(Scope::from_all(abi))
        .map_err(err)?
        .create()
        .map_err(err)?;
    for fd in readable {
        ruleset = ruleset.add_rule(PathBeneath::new(fd.as_fd(), AccessFs::ReadFile)).map_err(err)?;
    }
    let status = ruleset.restrict_self().map_err(err)?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => "full",
        RulesetStatus::PartiallyEnforced => "partial",
        RulesetStatus::NotEnforced => "none",
    })
}

/// What opening `path` does now: "opened" (it must not be), or the errno's name.
pub fn probe_open(path: &Path) -> String {
    match std::fs::File::open(path) {
        Ok(_) => "opened".into(),
        Err(e) => errno_name(&e),
    }
}

/// What creating a unix and an inet socket does now: "created" if either works, else the
/// last errno's name.
pub fn probe_socket() -> String {
    use rustix::net::{AddressFamily, SocketType, socket};
    let mut last = String::new();
    for family in [AddressFamily::UNIX, AddressFamily::INET] {
        match socket(family, SocketType::STREAM, None) {
            Ok(_) => return "created".into(),
            Err(e) => last = errno_name(&std::io::Error::from(e)),
        }
    }
    last
}

fn errno_name(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EACCES) => "EACCES".into(),
        Some(libc::EPERM) => "EPERM".into(),
        Some(libc::ENOENT) => "ENOENT".into(),
        Some(libc::ENOSYS) => "ENOSYS".into(),
        Some(n) => format!("errno {n}"),
        None => e.kind().to_string(),
    }
}

/// The paths to probe: "/" (landlock's own self-test) and those hearthd named.
pub fn probe_paths(named: &[PathBuf]) -> Vec<PathBuf> {
    std::iter::once(PathBuf::from("/")).chain(named.iter().cloned()).collect()
}

/// What a GPU the engine offloads to needs beyond the CPU allowlist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuAccess {
    /// Nothing: the model runs on the CPU.
    None,
    /// A GPU driver: the DRM ioctls (`'d'`, `DRM_IOCTL_BASE`) on the render node it opened
    /// before the sandbox, to submit work and map buffers. No other ioctl.
    Drm,
    /// A software Vulkan device (Mesa's lavapipe, SwiftShader): it compiles shaders to CPU
    /// code at run time, so the engine may map memory executable, and grows its device
    /// memory (a memfd) with `ftruncate`. A test and development device: a phone's GPU needs
    /// only [`GpuAccess::Drm`].
    Jit,
    /// NVIDIA's CUDA driver: its resource manager's ioctls (type `'F'`) on `/dev/nvidiactl`
    /// and `/dev/nvidia<N>`, and those of `/dev/nvidia-uvm`, which are plain numbers (type
    /// byte 0). Not yet run on a CUDA machine: `scripts/gpu-check.sh` is its test.
    Nvidia,
}

impl GpuAccess {
    /// What the engine offloading to the device ggml calls `name` (its backend and index,
    /// e.g. "Vulkan0", "CUDA0"), described by `description`, needs.
    pub fn for_device(name: &str, description: &str) -> Self {
        const SOFTWARE: [&str; 2] = ["llvmpipe", "SwiftShader"];
        if name.starts_with("CUDA") {
            Self::Nvidia
        } else if SOFTWARE.iter().any(|s| description.contains(s)) {
            Self::Jit
        } else {
            Self::Drm
        }
    }

    /// A stable name, for the sandbox report.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Drm => "drm-ioctl",
            Self::Jit => "exec-memory",
            Self::Nvidia => "nvidia-ioctl",
        }
    }
}

/// Step 3: the syscall allowlist, on every thread of the process (TSYNC). Two filters: the
/// allowlist, failing everything not listed with EPERM, and then one answering `clone3`
/// with ENOSYS (its flags sit in memory, out of BPF's reach; glibc then falls back to
/// `clone`). Of two filters answering with an errno the one installed last decides, so the
/// ENOSYS one goes second (the allowlist lets `seccomp` through for it: filters only ever
/// restrict). `clone` is allowed for threads only, `mmap`/`mprotect` without PROT_EXEC,
/// `prctl` for thread names and no-new-privileges, `ioctl` for FIONBIO; `gpu` widens the
/// last two as [`GpuAccess`] says.
pub fn restrict_syscalls(gpu: GpuAccess) -> Result<(), String> {
    let arch = std::env::consts::ARCH.try_into().map_err(|e| format!("seccomp: {e:?}"))?;
    fn err(e: impl std::fmt::Display) -> String {
        format!("seccomp: {e}")
    }
    let errno = |n: i32| SeccompAction::Errno(n as u32);
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        errno(libc::ENOSYS),
        arch,
    )
    .map_err(err)?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = ALLOWED.iter().map(|&n| (n, Vec::new())).collect();
    let masked = |arg: u8, mask: u64, value: u64| -> Result<SeccompRule, String> {
        let cond =
            SeccompCondition::new(arg, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(mask), value).map_err(err)?;
        SeccompRule::new(vec![cond]).map_err(err)
    };
    let thread = libc::CLONE_THREAD as u64;
    rules.insert(libc::SYS_clone, vec![masked(0, thread, thread)?]);
    let exec = libc::PROT_EXEC as u64;
    let (mmap, mprotect) = match gpu {
        GpuAccess::Jit => (Vec::new(), Vec::new()),
        _ => (vec![masked(2, exec, 0)?], vec![masked(2, exec, 0)?]),
    };
    rules.insert(libc::SYS_mmap, mmap);
    rules.insert(libc::SYS_mprotect, mprotect);
    if gpu == GpuAccess::Jit {
        // lavapipe's device memory is one memfd (made before the sandbox) that it grows.
        rules.insert(libc::SYS_ftruncate, Vec::new());
    }
    // Thread names, and no-new-privileges (installing the second filter sets it again).
    let mut prctl = Vec::new();
    for option in [libc::PR_SET_NAME, libc::PR_SET_NO_NEW_PRIVS] {
        let cond = SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, option as u64).map_err(err)?;
        prctl.push(SeccompRule::new(vec![cond]).map_err(err)?);
    }
    rules.insert(libc::SYS_prctl, prctl);
    // Only FIONBIO (making a descriptor non-blocking); no device ioctls on the CPU.
    #[allow(clippy::unnecessary_cast)] // FIONBIO's integer type differs between targets.
    let fionbio =
        SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, libc::FIONBIO as u64).map_err(err)?;
    let mut ioctl = vec![SeccompRule::new(vec![fionbio]).map_err(err)?];
    // The request's type byte (bits 8..16): DRM's 'd'; NVIDIA's 'F' and UVM's 0.
    let types: &[u8] = match gpu {
        GpuAccess::Drm => b"d",
        GpuAccess::Nvidia => b"F\0",
        GpuAccess::None | GpuAccess::Jit => b"",
    };
    for &t in types {
        ioctl.push(masked(1, 0xff00, u64::from(t) << 8)?);
    }
    rules.insert(libc::SYS_ioctl, ioctl);
    let allow = SeccompFilter::new(rules, errno(libc::EPERM), SeccompAction::Allow, arch).map_err(err)?;
    for filter in [allow, clone3] {
        let program: BpfProgram = filter.try_into().map_err(err)?;
        seccompiler::apply_filter_all_threads(&program).map_err(err)?;
    }
    Ok(())
}

/// Calls allowed without conditions: memory, threads and their synchronisation, time, the
/// socket and stdio it already holds, the I/O runtime's epoll, signals to itself, exit.
const ALLOWED: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_ppoll,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_munmap,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_sigaltstack,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigreturn,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_getrusage,
    libc::SYS_sysinfo,
    libc::SYS_getcpu,
    libc::SYS_restart_syscall,
    libc::SYS_seccomp,
    libc::SYS_exit,
    libc::SYS_exit_group,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_poll,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_epoll_wait,
];

#[cfg(test)]
mod tests {
    use super::GpuAccess;

    #[test]
    fn only_software_vulkan_devices_get_executable_memory() {
        assert_eq!(GpuAccess::for_device("Vulkan0", "llvmpipe (LLVM 15.0.6, 256 bits)"), GpuAccess::Jit);
        assert_eq!(GpuAccess::for_device("Vulkan1", "SwiftShader Device (Subzero)"), GpuAccess::Jit);
        for gpu in ["Turnip Adreno (TM) 740", "Mali-G715 (Panfrost)", "AMD Radeon 780M"] {
            assert_eq!(GpuAccess::for_device("Vulkan0", gpu), GpuAccess::Drm, "{gpu}");
        }
        // CUDA's driver speaks its own ioctls on /dev/nvidia*, not DRM's.
        assert_eq!(GpuAccess::for_device("CUDA0", "NVIDIA H100 80GB HBM3"), GpuAccess::Nvidia);
    }
}
