//! The gate every request passes: the caller's app policy (models, priority, tokens, quota),
//! sealed data, and the routing decision (privacy.rs). Holds the app policies (reloaded on
//! SIGHUP) and the device sealing key.

use std::collections::{HashMap, VecDeque};
use std::os::unix::fs::DirBuilderExt;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::engine::GenerateRequest;
use crate::error::Error;
use crate::policy::{AppPolicy, Policies, PolicyError};
use crate::privacy::{self, Admitted, CloudView, Part, RouteRequest};
use crate::seal::Sealer;

#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("cannot set up the state directory {dir} or the sealing key in it: {source}")]
    Key { dir: String, source: std::io::Error },
}

#[derive(Debug)]
pub struct Gate {
    policies: RwLock<Arc<Policies>>,
    /// Policies set at run time (SetAppPolicy), kept in the state directory; they override
    /// the files of `apps.dirs`.
    runtime_dir: std::path::PathBuf,
    sealer: Arc<Sealer>,
    /// Request times of the last minute, per app with a requests_per_minute quota.
    recent: Mutex<HashMap<String, VecDeque<Instant>>>,
}

impl Gate {
    pub fn new(config: &Config) -> Result<Self, GateError> {
        let dir = &config.daemon.state_dir;
        let key_err = |source| GateError::Key { dir: dir.display().to_string(), source };
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(key_err)?;
        crate::state_file::sweep(dir).map_err(key_err)?;
        let sealer = Sealer::open(dir).map_err(key_err)?;
        tracing::info!(key = %sealer.source, "sealing key ready");
        let runtime_dir = dir.join("apps.d");
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&runtime_dir)
            .or_else(|e| if e.kind() == std::io::ErrorKind::AlreadyExists { Ok(()) } else { Err(key_err(e)) })?;
        crate::state_file::sweep(&runtime_dir).map_err(key_err)?;
        let gate = Self {
            policies: RwLock::new(Arc::new(Policies::default())),
            runtime_dir,
            sealer: Arc::new(sealer),
            recent: Mutex::new(HashMap::new()),
        };
        let n = gate.reload(config)?;
        tracing::info!(apps = n, "app policies loaded");
        Ok(gate)
    }

    /// Re-reads the app policies (SIGHUP). On error the old ones stay.
    pub fn reload(&self, config: &Config) -> Result<usize, PolicyError> {
        let mut dirs = config.apps.dirs.clone();
        dirs.push(self.runtime_dir.clone());
        let policies = Policies::load(&dirs, config.apps.default.clone())?;
        let n = policies.len();
        *self.policies.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(policies);
        Ok(n)
    }

    /// Admin: sets `app_id`'s policy at run time (None: removes the run-time policy, so the
    /// files decide again), persisted in the state directory, and puts it in force.
    pub fn set_app_policy(&self, config: &Config, app_id: &str, policy: Option<&AppPolicy>) -> Result<(), Error> {
        use sha2::Digest;
        let name = format!("{}.toml", hex::encode(sha2::Sha256::digest(app_id.as_bytes())));
        let path = self.runtime_dir.join(name);
        let io = |e: std::io::Error| Error::Internal(format!("cannot store the app policy: {e}"));
        match policy {
            Some(p) => crate::models::write_private(&path, &p.to_toml(app_id)).map_err(io)?,
            None => match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
                _ => {}
            },
        }
        self.reload(config).map(|_| ()).map_err(|e| Error::InvalidArgs(e.to_string()))
    }

    fn policies(&self) -> Arc<Policies> {
        Arc::clone(&self.policies.read().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    pub fn policy(&self, app_id: &str) -> Arc<AppPolicy> {
        self.policies().get(app_id)
    }

    pub fn sealer(&self) -> &Arc<Sealer> {
        &self.sealer
    }

    /// Checks `request` against `app_id`'s policy, unseals its parts and decides its route.
    pub fn admit(
        &self,
        app_id: &str,
        request: &GenerateRequest,
        default_model: &str,
        parts: Vec<Part>,
        route: RouteRequest,
        cloud: CloudView,
    ) -> Result<Admitted, Error> {
        let policies = self.policies();
        let policy = policies.get(app_id);
        let model = request.model.as_deref().unwrap_or(default_model);
        if !policy.allows_model(model) {
            return Err(Error::NotAuthorized(format!("this app's policy does not allow model {model:?}")));
        }
        if request.priority > policy.max_priority {
            return Err(Error::NotAuthorized(format!(
                "this app's policy allows priority up to {}",
                policy.max_priority.as_str()
            )));
        }
        if policy.max_tokens > 0 && request.max_tokens > policy.max_tokens {
            return Err(Error::NotAuthorized(format!(
                "this app's policy allows max_tokens up to {}",
                policy.max_tokens
            )));
        }
        self.take_quota(app_id, policy.requests_per_minute)?;
        privacy::admit(app_id, &policy, &policies, &self.sealer, parts, route, cloud)
    }

    fn take_quota(&self, app_id: &str, per_minute: u32) -> Result<(), Error> {
        if per_minute == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut recent = self.recent.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let times = recent.entry(app_id.to_owned()).or_default();
        while times.front().is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60)) {
            times.pop_front();
        }
        if times.len() >= per_minute as usize {
            let retry = Duration::from_secs(60).saturating_sub(now.duration_since(times[0]));
            return Err(Error::Quota {
                used: times.len(),
                limit: per_minute,
                retry_after_ms: retry.as_millis() as u64,
            });
        }
        times.push_back(now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Priority;
    use crate::privacy::{Content, Scope};

    fn gate(default: AppPolicy) -> (Gate, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.daemon.state_dir = dir.path().join("state");
        config.apps.dirs = Vec::new();
        config.apps.default = default;
        (Gate::new(&config).unwrap(), dir)
    }

    fn request(priority: Priority, max_tokens: u32) -> GenerateRequest {
        GenerateRequest {
            messages: Vec::new(),
            model: None,
            max_tokens,
            sampling: hearth_ffi::SamplerParams::default(),
            priority,
            deadline: None,
            assistant_prefix: None,
            grammar: None,
            tools: None,
            adapters: None,
            session: None,
            speculative: true,
            images: Vec::new(),
            stop: Vec::new(),
            logprobs: None,
        }
    }

    fn admit(gate: &Gate, app: &str, r: &GenerateRequest) -> Result<Admitted, Error> {
        let parts = vec![Part {
            role: "user".into(),
            content: Content::Text("hi".into()),
            scope: Scope::Public,
            images: Vec::new(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }];
        gate.admit(app, r, "m", parts, RouteRequest::Local, CloudView::default())
    }

    #[test]
    fn the_requests_per_minute_quota_is_per_app_and_says_when_to_retry() {
        let (gate, _dir) = gate(AppPolicy { requests_per_minute: 2, ..AppPolicy::default() });
        let r = request(Priority::Normal, 8);
        admit(&gate, "a", &r).unwrap();
        admit(&gate, "a", &r).unwrap();
        match admit(&gate, "a", &r) {
            Err(Error::Quota { used: 2, limit: 2, retry_after_ms }) => {
                assert!(retry_after_ms > 59_000 && retry_after_ms <= 60_000, "{retry_after_ms}")
            }
            other => panic!("{other:?}"),
        }
        // Another app has its own minute.
        admit(&gate, "b", &r).unwrap();
        // A refused request does not count against the quota, and neither does one the policy refuses.
        let (gate, _dir) = gate_with_limits();
        assert!(matches!(admit(&gate, "a", &request(Priority::Interactive, 8)), Err(Error::NotAuthorized(_))));
        admit(&gate, "a", &r).unwrap();
    }

    fn gate_with_limits() -> (Gate, tempfile::TempDir) {
        gate(AppPolicy {
            requests_per_minute: 1,
            max_priority: Priority::Normal,
            max_tokens: 16,
            models: vec!["m".into()],
            ..AppPolicy::default()
        })
    }

    #[test]
    fn the_policy_bounds_priority_tokens_and_models_before_the_quota() {
        let (gate, _dir) = gate_with_limits();
        let refused = |r: Result<Admitted, Error>| match r {
            Err(Error::NotAuthorized(m)) => m,
            other => panic!("{other:?}"),
        };
        assert!(refused(admit(&gate, "a", &request(Priority::Interactive, 8))).contains("priority"));
        assert!(refused(admit(&gate, "a", &request(Priority::Normal, 17))).contains("max_tokens"));
        let mut other_model = request(Priority::Normal, 8);
        other_model.model = Some("big".into());
        assert!(refused(admit(&gate, "a", &other_model)).contains("\"big\""));
        // None of the refusals used the one request a minute.
        admit(&gate, "a", &request(Priority::Normal, 16)).unwrap();
        assert!(matches!(admit(&gate, "a", &request(Priority::Normal, 16)), Err(Error::Quota { .. })));
    }
}
