//! zbus client proxies for hearthctl, the tests and any Rust app.

use std::collections::HashMap;

use zbus::proxy;
use zbus::{OwnedObjectPath, Variant};

use crate::Error;

/// Client side of `org.hearth.Hearth1`.
#[proxy(interface = "org.hearth.Hearth1", default_service = "org.hearth.Hearth1", default_path = "/org/hearth/Hearth1")]
pub trait Hearth1 {
    /// Starts a generation; tokens arrive on the returned request object.
    fn generate(&self, request: HashMap<&str, Variant<'_>>) -> Result<OwnedObjectPath, Error>;
    /// Generates and returns the whole result.
    fn complete(&self, request: HashMap<&str, Variant<'_>>) -> Result<crate::GenerationResult, Error>;
    /// Opens a multi-turn session (options: `model`); turns go to the returned object.
    fn open_session(&self, options: HashMap<&str, Variant<'_>>) -> Result<OwnedObjectPath, Error>;
    /// Unit-length embeddings of `texts` (request: texts, model, scope), computed on the device.
    fn embed(&self, request: HashMap<&str, Variant<'_>>) -> Result<Vec<Vec<f64>>, Error>;
    /// Task calls over Complete: a summary, a rewrite, a proofread text of `text` (or
    /// `sealed`), and a description of `image`; each with the model's adapter for the task.
    fn summarize(&self, request: HashMap<&str, Variant<'_>>) -> Result<crate::GenerationResult, Error>;
    fn rewrite(&self, request: HashMap<&str, Variant<'_>>) -> Result<crate::GenerationResult, Error>;
    fn proofread(&self, request: HashMap<&str, Variant<'_>>) -> Result<crate::GenerationResult, Error>;
    fn describe(&self, request: HashMap<&str, Variant<'_>>) -> Result<crate::GenerationResult, Error>;
    /// What a request (Generate's dictionary) would take of its model's context.
    fn count_tokens(&self, request: HashMap<&str, Variant<'_>>) -> Result<crate::TokenCount, Error>;
    /// Whether a model ("" for the default) can serve the caller now, and if not, why.
    fn availability(&self, model: &str) -> Result<crate::Availability, Error>;
    /// Per app: requests running, requests and tokens since start (root sees every app).
    fn activity(&self) -> Result<Vec<crate::AppActivity>, Error>;
    /// The installed models.
    fn list_models(&self) -> Result<Vec<crate::ModelInfo>, Error>;
    /// Admin: loads a model now (`pin` (b) option keeps it loaded).
    fn load_model(&self, name: &str, options: HashMap<&str, Variant<'_>>) -> Result<(), Error>;
    /// Admin: unloads a model.
    fn unload_model(&self, name: &str) -> Result<(), Error>;
    /// Admin: sets (or, with an empty dictionary, removes) an app's run-time policy.
    fn set_app_policy(&self, app_id: &str, policy: HashMap<&str, Variant<'_>>) -> Result<(), Error>;
    /// Admin: reloads configuration, models and app policies.
    fn reload(&self) -> Result<(), Error>;
    /// Encrypts data for the calling app with the device key.
    fn seal(&self, data: &[u8], options: HashMap<&str, Variant<'_>>) -> Result<Vec<u8>, Error>;
    /// Who hearthd takes the caller to be.
    fn caller_info(&self) -> Result<crate::CallerInfo, Error>;
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn loaded_models(&self) -> zbus::Result<Vec<String>>;
    #[zbus(property)]
    fn queue_depth(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn queue_by_priority(&self) -> zbus::Result<HashMap<String, u32>>;
    #[zbus(property(emits_changed_signal = "false"))]
    fn kv_cache(&self) -> zbus::Result<crate::KvCache>;
    #[zbus(property)]
    fn load_progress(&self) -> zbus::Result<HashMap<String, (String, f64)>>;
    #[zbus(property)]
    fn memory(&self) -> zbus::Result<crate::Memory>;
    #[zbus(property)]
    fn cloud_available(&self) -> zbus::Result<bool>;
    #[zbus(property)]
    fn thermal_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn power_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn throttle(&self) -> zbus::Result<crate::Throttle>;
    #[zbus(property(emits_changed_signal = "false"))]
    fn energy(&self) -> zbus::Result<crate::Energy>;
    #[zbus(property(emits_changed_signal = "const"))]
    fn backends(&self) -> zbus::Result<Vec<crate::Backend>>;
}

/// Client side of `org.hearth.Hearth1.Request`.
#[proxy(interface = "org.hearth.Hearth1.Request", default_service = "org.hearth.Hearth1")]
pub trait Request {
    /// Cancels the generation.
    fn cancel(&self) -> Result<(), Error>;
    /// One generated token.
    #[zbus(signal)]
    fn token(&self, index: u32, token_id: i32, text: String) -> zbus::Result<()>;
    /// The stream moved between the cloud and the device.
    #[zbus(signal)]
    fn migrated(&self, from: String, to: String, index: u32) -> zbus::Result<()>;
    /// The end of the generation.
    #[zbus(signal)]
    fn finished(&self, result: crate::GenerationResult) -> zbus::Result<()>;
}

/// Client side of `org.hearth.Hearth1.Session`.
#[proxy(interface = "org.hearth.Hearth1.Session", default_service = "org.hearth.Hearth1")]
pub trait Session {
    /// Starts the next turn (the request's messages are the new ones); tokens arrive on the
    /// returned request object.
    fn generate(&self, request: HashMap<&str, Variant<'_>>) -> Result<OwnedObjectPath, Error>;
    /// Runs the next turn and returns its result.
    fn complete(&self, request: HashMap<&str, Variant<'_>>) -> Result<crate::GenerationResult, Error>;
    /// Ends the session and frees what it holds.
    fn close(&self) -> Result<(), Error>;
    /// Tokens of the conversation so far.
    #[zbus(property(emits_changed_signal = "false"))]
    fn tokens(&self) -> zbus::Result<u32>;
    #[zbus(property(emits_changed_signal = "const"))]
    fn model(&self) -> zbus::Result<String>;
    /// The most private scope the session has seen.
    #[zbus(property(emits_changed_signal = "false"))]
    fn taint(&self) -> zbus::Result<String>;
}
