//! The C heap that llama.cpp and ggml allocate from (glibc malloc), and leaving the process
//! without running C++ teardown.

/// Hands free heap memory back to the kernel (glibc's `malloc_trim(0)`, which also releases
/// free pages inside the heap, not only at its top). After a burst of allocations (grammar
/// stacks, compute buffers) is freed, resident memory falls again, so a memory ceiling that
/// ended the work can be left. A no-op where the C library is not glibc.
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes a plain integer, touches only allocator state under the
    // allocator's own locks, and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Ends the process at once with `status` (`_exit(2)`): no atexit handlers and no C++ static
/// destructors run, so an engine thread still inside llama.cpp cannot crash the exit (and
/// turn a chosen exit status into a signal) by racing with ggml's teardown.
pub fn exit_now(status: i32) -> ! {
    // SAFETY: _exit takes a plain integer and never returns; skipping destructors is its
    // purpose, and the kernel reclaims the process's memory and descriptors.
    unsafe { libc::_exit(status) }
}

/// The landlock ABI version the running kernel offers (0: landlock is absent or disabled),
/// as `landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)` answers.
pub fn landlock_abi() -> u32 {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: with a null attribute pointer, size 0 and the VERSION flag the call reads and
    // writes no memory; it returns the ABI version or -1 with errno set.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    u32::try_from(v).unwrap_or(0)
}
