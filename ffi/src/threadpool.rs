//! ggml's compute threads, kept for a context's whole life.
//!
//! Without a pool attached, ggml's CPU backend starts its worker threads for every graph it
//! computes and joins them afterwards: one thread creation per generated token at two
//! threads. A [`ThreadPool`] starts them once; between graphs they poll for new work for a
//! while (`poll`) and then sleep on a condition variable.

use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use crate::{Error, Result};

/// A ggml thread pool: `n_threads` compute threads, of which the thread that runs a graph is
/// one (the pool starts `n_threads - 1`).
#[derive(Debug)]
pub(crate) struct ThreadPool {
    ptr: NonNull<sys::ggml_threadpool>,
    n_threads: i32,
}

// SAFETY: the pool is a heap object with its own mutex and condition variable; the handle is
// only used by the context that owns it, one thread at a time (`Context` is not `Sync`).
unsafe impl Send for ThreadPool {}

impl ThreadPool {
    /// Starts a pool of `n_threads` (at least 1) that polls for `poll` rounds (ggml's
    /// 0–100 scale; 0 sleeps at once) after each graph before it sleeps.
    pub(crate) fn new(n_threads: i32, poll: u32) -> Result<Self> {
        let n_threads = n_threads.max(1);
        // SAFETY: fills a plain struct with defaults (no affinity, normal priority).
        let mut params = unsafe { sys::ggml_threadpool_params_default(n_threads) };
        params.poll = poll.min(100);
        // SAFETY: `params` is a valid, initialised struct for the call; ggml copies what it
        // keeps. If a thread does not start, ggml aborts the process (GGML_ASSERT), as the
        // per-graph threads this pool replaces would have; a null return is checked anyway.
        let raw = unsafe { sys::ggml_threadpool_new(&mut params) };
        let ptr = NonNull::new(raw).ok_or(Error::ThreadPool { n_threads })?;
        Ok(Self { ptr, n_threads })
    }

    /// Threads the pool was made with: the most a graph computed on it can use.
    pub(crate) fn n_threads(&self) -> i32 {
        self.n_threads
    }

    pub(crate) fn as_ptr(&self) -> sys::ggml_threadpool_t {
        self.ptr.as_ptr()
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from ggml_threadpool_new and is freed exactly once; its owner
        // (a Context) has freed the llama_context that used it before, so no graph runs on
        // it and no backend holds it (ggml_threadpool_free stops and joins the threads).
        unsafe { sys::ggml_threadpool_free(self.ptr.as_ptr()) };
    }
}
