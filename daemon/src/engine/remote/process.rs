//! The engine's process as hearthd's supervisor sees it: started, killed, waited for.

use std::os::fd::OwnedFd;
use std::process::Stdio;

use super::{Launch, SpawnSpec};

/// An engine's process: a child, or (in unit tests) the fake's task.
#[derive(Debug)]
pub(super) enum Process {
    Child(tokio::process::Child),
    #[cfg(test)]
    Fake(crate::engine::fake::Running),
}

impl Process {
    /// Starts what `spec` says on `theirs`, the engine's end of the socket pair.
    pub(super) fn start(spec: &SpawnSpec, theirs: std::os::unix::net::UnixStream) -> Result<Self, String> {
        match &spec.launch {
            Launch::Program(program) => tokio::process::Command::new(program)
                .env_clear()
                // ggml's abort handler would otherwise try to start gdb for a backtrace.
                .env("GGML_NO_BACKTRACE", "1")
                .envs(spec.env.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::from(OwnedFd::from(theirs)))
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .map(Self::Child)
                .map_err(|e| format!("cannot start {}: {e}", program.display())),
            #[cfg(test)]
            Launch::Fake(fake) => fake.start(theirs).map(Self::Fake).map_err(|e| format!("fake engine: {e}")),
        }
    }

    pub(super) fn id(&self) -> u32 {
        match self {
            Self::Child(c) => c.id().unwrap_or(0),
            #[cfg(test)]
            Self::Fake(f) => f.id(),
        }
    }

    pub(super) fn kill(&mut self) {
        match self {
            Self::Child(c) => {
                let _ = c.start_kill();
            }
            #[cfg(test)]
            Self::Fake(f) => f.kill(),
        }
    }

    /// Waits for it to end; says how it ended ("exit status 1", "killed by signal 9").
    pub(super) async fn wait(&mut self) -> String {
        match self {
            Self::Child(c) => describe(c.wait().await),
            #[cfg(test)]
            Self::Fake(f) => f.wait().await,
        }
    }
}

fn describe(status: std::io::Result<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit status {code}"),
            (None, Some(signal)) => format!("killed by signal {signal}"),
            _ => s.to_string(),
        },
        Err(e) => format!("cannot wait for it: {e}"),
    }
}
