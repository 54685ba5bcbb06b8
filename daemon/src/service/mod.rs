//! The D-Bus interface layer: thin `#[interface]` impls that parse, call the engine through
//! its handle, and turn results into replies and signals. No inference state lives here.

mod activity;
mod budgets;
mod callers;
mod driver;
mod in_flight;
mod request_object;
mod result;
mod run;
mod session;
mod tasks;
#[cfg(test)]
mod tests;
mod watch;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use hearth_dbus::Error as BusError;
use zbus::message::Header;
use zbus::{Connection, interface};
use zbus::{OwnedObjectPath, OwnedVariant};

pub use callers::CallerCache;
use callers::{caller, identify};
pub use in_flight::InFlight;
pub(crate) use result::generation_result;
use result::internal;
use result::{availability, model_info};
pub(crate) use run::{Admitted, OnFinish};
pub use watch::{publish_cloud_changes, publish_governor_changes, publish_status_changes, watch_disconnects};

use crate::cloud::Cloud;
use crate::engine::{Caller, CancelToken, GenerateRequest, Priority};
use crate::error::Error;
use crate::gate::Gate;
use crate::governor::GovernorStatus;
use crate::manager::ModelManager;
use crate::models::Task;
use crate::polkit;
use crate::privacy::{CloudView, Content, Part, RouteRequest};
use crate::request::{options_bool, parse_embed, parse_off_runtime};
use crate::structured::Structure;

/// `org.hearth.Hearth1` at `/org/hearth/Hearth1`. Cheap to clone: session objects hold one.
#[derive(Debug, Clone)]
pub struct HearthService {
    models: ModelManager,
    gate: Arc<Gate>,
    governor: tokio::sync::watch::Receiver<GovernorStatus>,
    cloud: Option<Arc<Cloud>>,
    /// The configuration files hearthd was started with (Reload reads them again).
    config_paths: Vec<std::path::PathBuf>,
    next_request: Arc<AtomicU64>,
    in_flight: InFlight,
    callers: CallerCache,
    activity: Arc<activity::Activity>,
    /// The energy ledger (None with energy.enabled = false).
    energy: Option<Arc<crate::energy::Ledger>>,
}

impl HearthService {
    pub fn new(
        models: ModelManager,
        gate: Arc<Gate>,
        governor: tokio::sync::watch::Receiver<GovernorStatus>,
        cloud: Option<Arc<Cloud>>,
        config_paths: Vec<std::path::PathBuf>,
        in_flight: InFlight,
        callers: CallerCache,
    ) -> Self {
        let next_request = Arc::new(AtomicU64::new(1));
        let config = models.config();
        let energy = config.energy.enabled.then(|| {
            let ledger = Arc::new(crate::energy::Ledger::new(
                config.energy.clone(),
                config.energy.sysfs_root.as_ref().unwrap_or(&config.governor.sysfs_root),
                models.compute(),
            ));
            let engines = models.clone();
            tokio::spawn(Arc::clone(&ledger).run(move || engines.queue().running > 0));
            ledger
        });
        let budgets = energy.as_ref().map(|ledger| {
            let budgets = Arc::new(budgets::Budgets::new(ledger, Arc::clone(&gate), models.clone(), governor.clone()));
            tokio::spawn(Arc::clone(&budgets).watch());
            budgets
        });
        let activity = Arc::new(activity::Activity::new(energy.clone(), budgets));
        Self { models, gate, governor, cloud, config_paths, next_request, in_flight, callers, activity, energy }
    }

    /// What the router should know about the cloud for `request`: the documented cost rule
    /// for `auto` — the device hot or low on battery, a deep local queue, or a request too
    /// long for the local context (estimated at 3 bytes a token) prefer the cloud.
    fn cloud_view(&self, request: &GenerateRequest, parts: &[Part]) -> CloudView {
        let Some(cloud) = &self.cloud else { return CloudView::default() };
        let config = self.models.config();
        let bytes: usize = parts
            .iter()
            .map(|p| match &p.content {
                crate::privacy::Content::Text(t) => t.len(),
                crate::privacy::Content::Sealed(b) => b.len(),
            })
            .sum();
        let prefer = if self.governor.borrow().prefer_cloud {
            Some("the device is hot, saving power, or low on battery")
        } else if cloud.queue_depth() > 0 && self.models.queue().queue_depth() >= cloud.queue_depth() {
            Some("the device's queue is deep")
        } else if (bytes / 3) as u64 + u64::from(request.max_tokens) > u64::from(config.engine.context_length) {
            Some("the request is too long for the device's context")
        } else {
            None
        };
        CloudView { configured: true, available: cloud.available(), prefer }
    }

    /// Applies the caller's policy and the privacy rules: the request with its messages
    /// unsealed (and, for structured output, the grammar or the tools set),
    /// where it runs, and the structure its result is checked against.
    fn admit(
        &self,
        who: &Caller,
        mut request: GenerateRequest,
        parts: Vec<Part>,
        route: RouteRequest,
        structure: Option<Arc<Structure>>,
    ) -> Result<Admitted, Error> {
        let energy = self.energy_admission(&who.app, &mut request)?;
        let mut cloud = self.cloud_view(&request, &parts);
        if energy && cloud.available && cloud.prefer.is_none() {
            cloud.prefer = Some("the app is past its energy budget");
        }
        let admitted =
            self.gate.admit(&who.app, &request, &self.models.default_model(), parts, route, cloud).inspect_err(
                |e| tracing::info!(caller = %who.connection, app = %who.app, error = e.kind(), "request refused"),
            )?;
        request.messages = admitted.messages;
        request.images = admitted.images;
        if let Some(s) = &structure {
            request.grammar = s.grammar().map(Arc::from);
            request.tools = s.tool_prompt().cloned().map(Arc::new);
        }
        Ok(Admitted { request, decision: admitted.decision, structure })
    }

    /// The app's energy budgets at admission: past its hard cap, Busy; past a budget, its
    /// request runs at background priority (so it waits while the app stays over) and true
    /// (the cloud is preferred where its data may go).
    fn energy_admission(&self, app: &str, request: &mut GenerateRequest) -> Result<bool, Error> {
        let Some(ledger) = &self.energy else { return Ok(false) };
        let policy = self.gate.policy(app);
        if policy.energy_cap_per_day_j > 0 {
            let day_j = ledger.day_j(app);
            if day_j >= f64::from(policy.energy_cap_per_day_j) {
                return Err(Error::EnergyCap { used_j: day_j.round() as u64, cap_j: policy.energy_cap_per_day_j });
            }
        }
        let over = ledger.over_budget(app) == Some(true);
        if over {
            request.priority = Priority::Background;
        }
        Ok(over)
    }

    /// Complete: parses, admits and runs `request` to its end.
    async fn complete_request(
        &self,
        header: &Header<'_>,
        conn: &Connection,
        request: HashMap<String, OwnedVariant>,
    ) -> Result<hearth_dbus::GenerationResult, Error> {
        let sender = caller(header)?;
        let parsed = parse_off_runtime(request, self.models.config().limits.default_max_tokens).await?;
        let (who, _) = identify(conn, &self.callers, &sender).await?;
        let admitted = self.admit(&who, parsed.request, parsed.parts, parsed.route, parsed.structure)?;
        self.complete_generation(conn, &sender, who, admitted, parsed.handle_token, CancelToken::default(), None).await
    }

    /// A task API call: its request (tasks.rs), with the model's adapter for the task, run
    /// as Complete runs one.
    async fn task(
        &self,
        task: Task,
        header: &Header<'_>,
        conn: &Connection,
        dict: HashMap<String, OwnedVariant>,
    ) -> Result<hearth_dbus::GenerationResult, Error> {
        let model = match dict.get(hearth_dbus::request_key::MODEL) {
            Some(v) => Some(
                String::try_from(v.try_clone().map_err(|e| internal("the model key", &e))?)
                    .map_err(|_| Error::InvalidArgs(format!("{}: model must be a string (s)", task.as_str())))?,
            ),
            None => None,
        };
        let adapter = self.models.task_adapter(model.as_deref().filter(|m| !m.is_empty()), task);
        let request = tasks::request(task, dict, adapter.as_deref())?;
        self.complete_request(header, conn, request).await
    }

    /// Identifies the caller of an admin method and asks polkit whether it may do `action`,
    /// with the caller's bus name as the subject. Fails closed: no answer is a refusal.
    async fn authorize(&self, conn: &Connection, header: &Header<'_>, action: polkit::Action) -> Result<Caller, Error> {
        let sender = caller(header)?;
        let (who, _) = identify(conn, &self.callers, &sender).await?;
        let interactive = header.primary().flags().contains(zbus::message::Flags::ALLOW_INTERACTIVE_AUTH);
        let verdict = polkit::check(conn, &who.connection, who.uid, action, interactive).await;
        tracing::info!(target: "hearth::audit", app = %who.app, uid = who.uid, action = action.id(), verdict = ?verdict, "authorization");
        match verdict {
            Ok(polkit::Verdict::Authorized | polkit::Verdict::NoPolkitRoot) => Ok(who),
            Ok(polkit::Verdict::Denied { challenge }) => Err(Error::NotAuthorized(format!(
                "polkit does not authorize {}{}",
                action.id(),
                if challenge { " without authentication (call with ALLOW_INTERACTIVE_AUTHORIZATION)" } else { "" }
            ))),
            Ok(polkit::Verdict::NoPolkit) => {
                Err(Error::NotAuthorized(format!("polkit is not running, so only root may {}", action.id())))
            }
            Err(e) => Err(Error::NotAuthorized(format!("cannot ask polkit about {}: {e}", action.id()))),
        }
    }
}

#[interface(name = "org.hearth.Hearth1")]
impl HearthService {
    /// Starts a generation; see org.hearth.Hearth1.xml.
    #[zbus(out_args("handle"))]
    async fn generate(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        request: HashMap<String, OwnedVariant>,
    ) -> Result<OwnedObjectPath, BusError> {
        let sender = caller(&header)?;
        let parsed = parse_off_runtime(request, self.models.config().limits.default_max_tokens).await?;
        let (who, _) = identify(conn, &self.callers, &sender).await?;
        let admitted = self.admit(&who, parsed.request, parsed.parts, parsed.route, parsed.structure)?;
        Ok(self
            .start_generation(conn, sender, who, admitted, parsed.handle_token, CancelToken::default(), None)
            .await?)
    }

    /// Generates and returns the whole result; see org.hearth.Hearth1.xml.
    #[zbus(out_args("result"))]
    async fn complete(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        request: HashMap<String, OwnedVariant>,
    ) -> Result<hearth_dbus::GenerationResult, BusError> {
        Ok(self.complete_request(&header, conn, request).await?)
    }

    /// A summary of the text; see org.hearth.Hearth1.xml.
    #[zbus(out_args("result"))]
    async fn summarize(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        request: HashMap<String, OwnedVariant>,
    ) -> Result<hearth_dbus::GenerationResult, BusError> {
        Ok(self.task(Task::Summarize, &header, conn, request).await?)
    }

    /// The text rewritten in a tone and length; see org.hearth.Hearth1.xml.
    #[zbus(out_args("result"))]
    async fn rewrite(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        request: HashMap<String, OwnedVariant>,
    ) -> Result<hearth_dbus::GenerationResult, BusError> {
        Ok(self.task(Task::Rewrite, &header, conn, request).await?)
    }

    /// The text with its spelling and grammar corrected; see org.hearth.Hearth1.xml.
    #[zbus(out_args("result"))]
    async fn proofread(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        request: HashMap<String, OwnedVariant>,
    ) -> Result<hearth_dbus::GenerationResult, BusError> {
        Ok(self.task(Task::Proofread, &header, conn, request).await?)
    }

    /// A description of an image; see org.hearth.Hearth1.xml.
    #[zbus(out_args("result"))]
    async fn describe(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        request: HashMap<String, OwnedVariant>,
    ) -> Result<hearth_dbus::GenerationResult, BusError> {
        Ok(self.task(Task::Describe, &header, conn, request).await?)
    }

    /// Opens a multi-turn session whose KV cache stays between turns; see
    /// org.hearth.Hearth1.xml.
    #[zbus(out_args("session"))]
    async fn open_session(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        options: HashMap<String, OwnedVariant>,
    ) -> Result<OwnedObjectPath, BusError> {
        let sender = caller(&header)?;
        let model = session::parse_options(&options)?.unwrap_or_else(|| self.models.default_model());
        let (who, _) = identify(conn, &self.callers, &sender).await?;
        if !self.models.is_installed(&model) {
            return Err(Error::ModelNotFound(model).into());
        }
        if !self.gate.policy(&who.app).allows_model(&model) {
            return Err(Error::NotAuthorized(format!("this app's policy does not allow model {model:?}")).into());
        }
        Ok(session::open(conn, self, &sender, &who.app, model).await?)
    }

    /// Embeddings of texts, computed on the device; see org.hearth.Hearth1.xml.
    #[zbus(out_args("embeddings"))]
    async fn embed(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        request: HashMap<String, OwnedVariant>,
    ) -> Result<Vec<Vec<f64>>, BusError> {
        let sender = caller(&header)?;
        let parsed = parse_embed(&request)?;
        let (who, _) = identify(conn, &self.callers, &sender).await?;
        // The app's policy (models, quota) applies as to a generation; the route is the device.
        let probe = GenerateRequest {
            messages: Vec::new(),
            model: parsed.model.clone(),
            max_tokens: 1,
            sampling: hearth_ffi::SamplerParams::default(),
            priority: Priority::Normal,
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
        };
        let parts = parsed
            .texts
            .iter()
            .map(|t| Part {
                role: "user".into(),
                content: Content::Text(t.clone()),
                scope: parsed.scope,
                images: Vec::new(),
                tool_calls: Vec::new(),
                tool_call_id: None,
            })
            .collect();
        self.admit(&who, probe, parts, RouteRequest::Local, None)?;
        let _guard = self.in_flight.enter();
        let lease = self.models.acquire(parsed.model.as_deref()).await?;
        let n = parsed.texts.len();
        // Cancelled by the caller leaving (the engine hears of it), or by this future being
        // dropped (the engine sees the answer's receiver go).
        let vectors = lease
            .engine
            .embed(parsed.texts, who.clone(), CancelToken::default())
            .await
            .inspect_err(|e| {
                tracing::info!(caller = %sender, error = Error::from(e.clone()).kind(), "embed refused");
            })
            .map_err(Error::from)?;
        tracing::info!(target: "hearth::audit", app = %who.app, texts = n, scope = parsed.scope.as_str(), "embed on the device");
        Ok(vectors.into_iter().map(|v| v.into_iter().map(f64::from).collect()).collect())
    }

    /// What a request's prompt takes of its model's context; see org.hearth.Hearth1.xml.
    #[zbus(out_args("count"))]
    async fn count_tokens(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        request: HashMap<String, OwnedVariant>,
    ) -> Result<hearth_dbus::TokenCount, BusError> {
        let sender = caller(&header)?;
        let parsed = parse_off_runtime(request, self.models.config().limits.default_max_tokens).await?;
        let (who, _) = identify(conn, &self.callers, &sender).await?;
        // Admitted as a generation would be (policy, quota, sealed parts opened), on the
        // device whatever the route: the tokenizer is the model's.
        let admitted = self.admit(&who, parsed.request, parsed.parts, RouteRequest::Local, parsed.structure)?;
        let _guard = self.in_flight.enter();
        let lease = self.models.acquire(admitted.request.model.as_deref()).await?;
        let max_tokens = admitted.request.max_tokens;
        let model = lease.engine.model().name.clone();
        let count = lease.engine.count_tokens(admitted.request, who).await.map_err(Error::from)?;
        let remaining = count.context_length.saturating_sub(count.prompt_tokens);
        Ok(hearth_dbus::TokenCount {
            model,
            prompt_tokens: count.prompt_tokens,
            image_tokens: count.image_tokens,
            context_length: count.context_length,
            remaining,
            fits: remaining > 0 && max_tokens <= count.context_length,
        })
    }

    /// Whether a model can serve the caller now, and if not, why; see org.hearth.Hearth1.xml.
    #[zbus(out_args("availability"))]
    async fn availability(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        model: String,
    ) -> Result<hearth_dbus::Availability, BusError> {
        let sender = caller(&header)?;
        let (who, _) = identify(conn, &self.callers, &sender).await?;
        let name = if model.is_empty() { self.models.default_model() } else { model };
        let loading = self.models.status().borrow().loading.get(&name).cloned();
        let report = self.models.report().into_iter().find(|r| r.entry.manifest.name == name);
        Ok(availability(&name, report.as_ref(), loading.as_ref(), self.gate.policy(&who.app).allows_model(&name)))
    }

    /// Per app: requests running, requests and tokens since hearthd started (root and
    /// hearthd's own user see every app, others their own); see org.hearth.Hearth1.xml.
    #[zbus(out_args("apps"))]
    async fn activity(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<hearth_dbus::AppActivity>, BusError> {
        let sender = caller(&header)?;
        let (who, _) = identify(conn, &self.callers, &sender).await?;
        let all = who.uid == 0 || who.uid == nix::unistd::geteuid().as_raw();
        Ok(self.activity.snapshot(&who.app, all))
    }

    /// The installed models; see org.hearth.Hearth1.xml.
    #[zbus(out_args("models"))]
    async fn list_models(&self) -> Result<Vec<hearth_dbus::ModelInfo>, BusError> {
        let default = self.models.default_model();
        Ok(self.models.report().into_iter().map(|r| model_info(&r, &default)).collect())
    }

    /// Loads a model now (admin); see org.hearth.Hearth1.xml.
    async fn load_model(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        name: String,
        options: HashMap<String, OwnedVariant>,
    ) -> Result<(), BusError> {
        let who = self.authorize(conn, &header, polkit::Action::ManageModels).await?;
        let pin = options_bool(&options, "pin", &["pin"])?;
        tracing::info!(caller = %who.connection, model = %name, pin, "LoadModel");
        Ok(self.models.load_model(&name, pin).await?)
    }

    /// Unloads a model now (admin); see org.hearth.Hearth1.xml.
    async fn unload_model(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        name: String,
    ) -> Result<(), BusError> {
        let who = self.authorize(conn, &header, polkit::Action::ManageModels).await?;
        tracing::info!(caller = %who.connection, model = %name, "UnloadModel");
        Ok(self.models.unload_model(&name).await?)
    }

    /// Reads the configuration, model directories and app policies again (admin); see
    /// org.hearth.Hearth1.xml.
    async fn reload(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), BusError> {
        self.authorize(conn, &header, polkit::Action::Reload).await?;
        crate::reload_all(&self.config_paths, &self.models, &self.gate).map_err(Error::InvalidArgs)?;
        Ok(())
    }

    /// Sets an app's policy at run time (admin); see org.hearth.Hearth1.xml.
    async fn set_app_policy(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        app_id: String,
        policy: HashMap<String, OwnedVariant>,
    ) -> Result<(), BusError> {
        if app_id.is_empty() || app_id.len() > 4096 || app_id.chars().any(char::is_control) {
            return Err(Error::InvalidArgs("app_id must be 1-4096 printable characters".into()).into());
        }
        let parsed = if policy.is_empty() {
            None
        } else {
            Some(crate::policy::AppPolicy::from_dict(&policy).map_err(|e| Error::InvalidArgs(format!("policy: {e}")))?)
        };
        let who = self.authorize(conn, &header, polkit::Action::SetAppPolicy).await?;
        self.gate.set_app_policy(&self.models.config(), &app_id, parsed.as_ref())?;
        tracing::info!(target: "hearth::audit", by = %who.app, app = %app_id, removed = parsed.is_none(), "app policy set");
        Ok(())
    }

    /// Encrypts data for the caller with the device key; see org.hearth.Hearth1.xml.
    #[zbus(out_args("sealed"))]
    async fn seal(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        data: Vec<u8>,
        options: HashMap<String, OwnedVariant>,
    ) -> Result<Vec<u8>, BusError> {
        if let Some(k) = options.keys().next() {
            return Err(Error::InvalidArgs(format!("Seal has no options; got {k:?}")).into());
        }
        // Text becomes a message's `sealed` content; a PNG or JPEG, one of its `sealed_images`.
        let image = crate::request::has_image_signature(&data);
        let (max, kind) =
            if image { (crate::request::MAX_IMAGE_BYTES, "an image") } else { (crate::seal::MAX_PLAINTEXT, "text") };
        if data.len() > max {
            return Err(
                Error::InvalidArgs(format!("Seal takes at most {max} bytes of {kind}, got {}", data.len())).into()
            );
        }
        if !image && std::str::from_utf8(&data).is_err() {
            return Err(Error::InvalidArgs(
                "Seal takes UTF-8 text (a message's content) or a PNG or JPEG image (a message's image)".into(),
            )
            .into());
        }
        let sender = caller(&header)?;
        let (who, id) = identify(conn, &self.callers, &sender).await?;
        crate::seal::may_seal(&id, &self.gate.policy(&who.app)).map_err(|why| {
            tracing::info!(target: "hearth::audit", app = %who.app, kind = id.kind.as_str(), "seal refused");
            Error::NotAuthorized(why)
        })?;
        let blob = self.gate.sealer().seal(&who.app, &data).map_err(|e| Error::Internal(e.to_string()))?;
        tracing::info!(target: "hearth::audit", app = %who.app, bytes = data.len(), "sealed");
        Ok(blob)
    }

    /// Who hearthd takes the caller to be, and its policy; see org.hearth.Hearth1.xml.
    #[zbus(out_args("info"))]
    async fn caller_info(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<hearth_dbus::CallerInfo, BusError> {
        let sender = caller(&header)?;
        let (who, id) = identify(conn, &self.callers, &sender).await?;
        let policy = self.gate.policy(&who.app);
        Ok(hearth_dbus::CallerInfo {
            app_id: id.app_id.clone(),
            app_kind: id.kind.as_str().to_owned(),
            uid: id.uid,
            pid: id.pid,
            models: policy.models.clone(),
            max_priority: policy.max_priority.as_str().to_owned(),
            cloud: policy.cloud,
            cloud_scopes: policy.cloud_scopes.iter().map(|s| s.as_str().to_owned()).collect(),
            label: id.label.clone(),
        })
    }

    #[zbus(property)]
    async fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_owned()
    }

    #[zbus(property)]
    async fn loaded_models(&self) -> Vec<String> {
        self.models.status().borrow().loaded.clone()
    }

    #[zbus(property)]
    async fn queue_depth(&self) -> u32 {
        self.models.queue().queue_depth()
    }

    #[zbus(property)]
    async fn queue_by_priority(&self) -> HashMap<String, u32> {
        let status = self.models.queue();
        Priority::ALL.iter().map(|&p| (p.as_str().to_owned(), status.count(p))).collect()
    }

    /// Changes every token, so it is read on demand and never signalled.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn kv_cache(&self) -> hearth_dbus::KvCache {
        let [size, reserved, used, cached, draft_tokens, draft_accepted] = self.models.kv_totals();
        let store = self.models.sessions();
        let (parked, parked_bytes) = store.parked();
        let saturated = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
        hearth_dbus::KvCache {
            size,
            reserved,
            used,
            cached,
            sessions: saturated(store.len() as u64),
            parked_sessions: saturated(parked as u64),
            parked_kib: saturated(parked_bytes.div_ceil(1024)),
            parked_dropped: saturated(store.dropped()),
            draft_tokens,
            draft_accepted,
        }
    }

    /// Loads in progress: model name → (phase, fraction of the phase done).
    #[zbus(property)]
    async fn load_progress(&self) -> HashMap<String, (String, f64)> {
        let status = self.models.status().borrow().clone();
        status.loading.iter().map(|(n, p)| (n.clone(), (p.phase.as_str().to_owned(), p.fraction))).collect()
    }

    /// What the device drew, and per app what its work drew (the caller's own row; every
    /// app's for root and hearthd's user); see org.hearth.Hearth1.xml.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn energy(
        &self,
        #[zbus(header)] header: Option<Header<'_>>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<hearth_dbus::Energy, BusError> {
        let Some(ledger) = &self.energy else {
            return Ok(hearth_dbus::Energy { source: "off".into(), ..hearth_dbus::Energy::default() });
        };
        // Without a caller (zbus reading it itself) no app's row is shown.
        let (app, all) = match header {
            Some(h) => {
                let (who, _) = identify(conn, &self.callers, &caller(&h)?).await?;
                let all = who.uid == 0 || who.uid == nix::unistd::geteuid().as_raw();
                (Some(who.app), all)
            }
            None => (None, false),
        };
        // (No caller: an app id no caller has, so no row.)
        Ok(ledger.snapshot(app.as_deref().unwrap_or("\0"), all))
    }

    /// Memory budget, use and pressure; see org.hearth.Hearth1.xml.
    #[zbus(property)]
    async fn memory(&self) -> hearth_dbus::Memory {
        let m = self.models.status().borrow().memory.clone();
        hearth_dbus::Memory {
            budget_bytes: m.budget,
            used_bytes: m.used,
            pressure: m.pressure,
            some_avg10: m.reading.some_avg10,
            full_avg10: m.reading.full_avg10,
            evicted: m.evicted,
            expired: m.expired,
            pressure_unloads: m.pressure_unloads,
            pressure_shrinks: m.pressure_shrinks,
            ceiling_bytes: m.ceiling,
            anon_bytes: m.anon,
            over_ceiling: m.over_ceiling,
            ceiling_hits: m.ceiling_hits,
            engine_failures: m.engine_failures,
        }
    }

    /// Whether the cloud leg may be used now; see org.hearth.Hearth1.xml.
    #[zbus(property)]
    async fn cloud_available(&self) -> bool {
        self.cloud.as_ref().is_some_and(|c| c.available())
    }

    /// The thermal state; see org.hearth.Hearth1.xml.
    #[zbus(property)]
    async fn thermal_state(&self) -> String {
        self.governor.borrow().thermal.as_str().to_owned()
    }

    /// The power state; see org.hearth.Hearth1.xml.
    #[zbus(property)]
    async fn power_state(&self) -> String {
        self.governor.borrow().power.as_str().to_owned()
    }

    /// What the governors ask of the engines now; see org.hearth.Hearth1.xml.
    #[zbus(property)]
    async fn throttle(&self) -> hearth_dbus::Throttle {
        let g = self.governor.borrow().clone();
        hearth_dbus::Throttle {
            rate_cap_tps: g.rate_cap_tps.unwrap_or(0.0),
            duty: g.duty.unwrap_or(1.0),
            potential_tps: g.potential_tps,
            threads: g.threads,
            defer_background: g.defer_background
                || self.models.throttle().background_spent.load(std::sync::atomic::Ordering::Relaxed),
            prefer_cloud: g.prefer_cloud,
            power_saver: g.power_saver,
            temperature_c: g.temperature_c,
            trip_c: g.trip_c,
            battery_pct: g.battery_pct,
            gpu: self.models.gpu(),
        }
    }

    /// The compute devices ggml found; see org.hearth.Hearth1.xml.
    #[zbus(property(emits_changed_signal = "const"))]
    async fn backends(&self) -> Vec<hearth_dbus::Backend> {
        self.models
            .backends()
            .into_iter()
            .map(|b| hearth_dbus::Backend {
                kind: b.device.kind.as_str().to_owned(),
                memory_total: b.device.memory_total,
                memory_free: b.device.memory_free,
                name: b.device.name,
                description: b.device.description,
                owned: b.owned,
                budget_bytes: b.budget.map(|(budget, _)| budget),
                used_bytes: b.budget.map(|(_, used)| used),
            })
            .collect()
    }
}
