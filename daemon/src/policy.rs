//! Per-app policy: what each app may do, from `apps.d/*.toml` files (vendor, then admin:
//! a later directory's file for the same app replaces an earlier one) and a default for apps
//! without a file.
//!
//! ```toml
//! app = "org.example.Notes"        # the app id hearthd derives (see identity.rs)
//! models = ["*"]                   # models it may use ("*": all)
//! max_priority = "interactive"     # highest priority it may ask for
//! cloud = false                    # may its requests go to the cloud model at all
//! cloud_scopes = ["public"]        # scopes it lets go there ("public", "personal")
//! share_sealed_with = []           # apps that may use the data it sealed
//! seal_unsandboxed = false         # may a bare "uid:UID:EXE" id Seal (see below)
//! requests_per_minute = 0          # quota (0: none)
//! max_tokens = 0                   # most tokens per request (0: the context)
//! energy_per_hour_j = 0            # energy budget of its on-device work (0: none), joules
//! energy_per_day_j = 0             #   over the last hour / day (see energy.rs)
//! energy_cap_per_day_j = 0         # hard cap: past it requests are Busy (0: none)
//! ```
//!
//! An app past a budget is slowed, not failed: its requests run at background priority,
//! its background requests wait in the engine's queue while it is over, and requests whose
//! data may go to the cloud prefer it; its results say `energy_budget: "over"`. Only the
//! admin's hard cap refuses (Busy).
//!
//! `seal_unsandboxed` only matters for an app id of the bare-process kind (`uid:UID:EXE`,
//! no sandbox or app unit; see [`crate::identity::AppKind`]): such an id is shared by every
//! program that executable runs as that uid (all scripts of `/usr/bin/python3`), so Seal is
//! refused for it unless its file sets `seal_unsandboxed = true`, accepting that they all
//! share what any of them seals. Sandboxed and app-unit ids may always Seal.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::engine::Priority;
use crate::models::{check_trusted, toml_files};
use crate::privacy::Scope;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppPolicy {
    pub models: Vec<String>,
    #[serde(deserialize_with = "priority")]
    pub max_priority: Priority,
    pub cloud: bool,
    pub cloud_scopes: Vec<Scope>,
    pub share_sealed_with: Vec<String>,
    /// Whether a bare-process id (`uid:UID:EXE`) may Seal; see the module docs.
    pub seal_unsandboxed: bool,
    pub requests_per_minute: u32,
    pub max_tokens: u32,
    /// Energy budgets of its on-device work over the last hour and day, and a hard cap per
    /// day, J (0: none).
    pub energy_per_hour_j: u32,
    pub energy_per_day_j: u32,
    pub energy_cap_per_day_j: u32,
}

fn priority<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Priority, D::Error> {
    let s = String::deserialize(d)?;
    Priority::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("unknown priority {s:?}")))
}

impl Default for AppPolicy {
    /// Apps without a policy file: every model, any priority, on-device only, no Seal for a
    /// bare-process id.
    fn default() -> Self {
        Self {
            models: vec!["*".to_owned()],
            max_priority: Priority::Interactive,
            cloud: false,
            cloud_scopes: vec![Scope::Public],
            share_sealed_with: Vec::new(),
            seal_unsandboxed: false,
            requests_per_minute: 0,
            max_tokens: 0,
            energy_per_hour_j: 0,
            energy_per_day_j: 0,
            energy_cap_per_day_j: 0,
        }
    }
}

impl AppPolicy {
    /// The policy file for `app_id` (what SetAppPolicy stores).
    pub fn to_toml(&self, app_id: &str) -> String {
        let list = |v: &[String]| v.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ");
        let scopes: Vec<String> = self.cloud_scopes.iter().map(|s| s.as_str().to_owned()).collect();
        format!(
            "app = {app_id:?}\nmodels = [{}]\nmax_priority = {:?}\ncloud = {}\ncloud_scopes = [{}]\nshare_sealed_with = [{}]\nseal_unsandboxed = {}\nrequests_per_minute = {}\nmax_tokens = {}\nenergy_per_hour_j = {}\nenergy_per_day_j = {}\nenergy_cap_per_day_j = {}\n",
            list(&self.models),
            self.max_priority.as_str(),
            self.cloud,
            list(&scopes),
            list(&self.share_sealed_with),
            self.seal_unsandboxed,
            self.requests_per_minute,
            self.max_tokens,
            self.energy_per_hour_j,
            self.energy_per_day_j,
            self.energy_cap_per_day_j,
        )
    }

    /// A policy from SetAppPolicy's dictionary: the keys of a policy file, missing ones at
    /// the default policy's values.
    pub fn from_dict(d: &std::collections::HashMap<String, zbus::OwnedVariant>) -> Result<Self, String> {
        use zbus::Variant;
        let mut table = toml::Table::new();
        for (k, v) in d {
            let v: &Variant<'_> = v;
            let item = match v {
                Variant::Bool(b) => toml::Value::Boolean(*b),
                Variant::Str(s) => toml::Value::String(s.to_string()),
                Variant::U32(n) => toml::Value::Integer(i64::from(*n)),
                Variant::Array(a) => toml::Value::Array(
                    a.inner()
                        .iter()
                        .map(|x| match x {
                            Variant::Str(s) => Ok(toml::Value::String(s.to_string())),
                            _ => Err(format!("{k} must be a list of strings (as)")),
                        })
                        .collect::<Result<_, _>>()?,
                ),
                other => return Err(format!("{k} has an unsupported type {}", other.value_signature())),
            };
            table.insert(k.clone(), item);
        }
        let policy: AppPolicy = toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| e.to_string())?;
        if policy.cloud_scopes.contains(&Scope::Local) {
            return Err("cloud_scopes cannot contain \"local\"".into());
        }
        Ok(policy)
    }

    /// Whether the app has an energy budget.
    pub fn has_energy_budget(&self) -> bool {
        self.energy_per_hour_j > 0 || self.energy_per_day_j > 0
    }

    /// Whether `hour_j` and `day_j` of the app's work are past a budget.
    pub fn over_energy_budget(&self, hour_j: f64, day_j: f64) -> bool {
        (self.energy_per_hour_j > 0 && hour_j >= f64::from(self.energy_per_hour_j))
            || (self.energy_per_day_j > 0 && day_j >= f64::from(self.energy_per_day_j))
    }

    pub fn allows_model(&self, name: &str) -> bool {
        self.models.iter().any(|m| m == "*" || m == name)
    }

    /// Whether data of `scope` may leave the device for this app.
    pub fn cloud_allows(&self, scope: Scope) -> bool {
        self.cloud && scope != Scope::Local && self.cloud_scopes.contains(&scope)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    app: String,
    #[serde(flatten)]
    policy: AppPolicy,
}

#[derive(Debug, thiserror::Error)]
#[error("bad app policy {path}: {reason}")]
pub struct PolicyError {
    pub path: PathBuf,
    pub reason: String,
}

/// All app policies by app id, and the default.
#[derive(Debug, Clone, Default)]
pub struct Policies {
    apps: BTreeMap<String, Arc<AppPolicy>>,
    default: Arc<AppPolicy>,
}

impl Policies {
    /// Reads `dirs` in order (missing ones skipped). A broken or untrusted file is an error:
    /// a policy that silently fell back to the default could grant more than intended.
    pub fn load(dirs: &[PathBuf], default: AppPolicy) -> Result<Self, PolicyError> {
        let mut apps = BTreeMap::new();
        for path in toml_files(dirs) {
            let file = read(&path)?;
            apps.insert(file.app, Arc::new(file.policy));
        }
        Ok(Self { apps, default: Arc::new(default) })
    }

    pub fn get(&self, app_id: &str) -> Arc<AppPolicy> {
        Arc::clone(self.apps.get(app_id).unwrap_or(&self.default))
    }

    pub fn len(&self) -> usize {
        self.apps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.apps.is_empty()
    }
}

fn read(path: &Path) -> Result<PolicyFile, PolicyError> {
    let bad = |reason: String| PolicyError { path: path.to_owned(), reason };
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    check_trusted(path, &meta).map_err(|e| bad(e.to_string()))?;
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let file: PolicyFile = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if file.app.is_empty() {
        return Err(bad("app is empty".into()));
    }
    if file.policy.cloud_scopes.contains(&Scope::Local) {
        return Err(bad("cloud_scopes cannot contain \"local\": local data never leaves the device".into()));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_directories_override_and_unknown_apps_get_the_default() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        std::fs::write(a.path().join("notes.toml"), "app = \"org.example.Notes\"\ncloud = true\n").unwrap();
        std::fs::write(
            b.path().join("notes.toml"),
            "app = \"org.example.Notes\"\nmax_priority = \"normal\"\nmodels = [\"m\"]\n",
        )
        .unwrap();
        let p = Policies::load(&[a.path().to_owned(), b.path().to_owned()], AppPolicy::default()).unwrap();
        let notes = p.get("org.example.Notes");
        assert!(!notes.cloud, "the admin file replaced the vendor one");
        assert_eq!(notes.max_priority, Priority::Normal);
        assert!(notes.allows_model("m") && !notes.allows_model("other"));
        assert_eq!(*p.get("org.unknown.App"), AppPolicy::default());
    }

    #[test]
    fn energy_budgets_are_judged_and_survive_set_app_policy() {
        let none = AppPolicy::default();
        assert!(!none.has_energy_budget() && !none.over_energy_budget(1e9, 1e9));
        let hourly = AppPolicy { energy_per_hour_j: 10, ..AppPolicy::default() };
        assert!(hourly.has_energy_budget());
        assert!(!hourly.over_energy_budget(9.9, 1e9) && hourly.over_energy_budget(10.0, 0.0));
        let daily = AppPolicy { energy_per_day_j: 100, ..AppPolicy::default() };
        assert!(!daily.over_energy_budget(1e9, 99.0) && daily.over_energy_budget(0.0, 100.0));
        let dict = std::collections::HashMap::from([
            ("energy_per_hour_j".to_owned(), zbus::OwnedVariant::try_from(zbus::Variant::from(10u32)).unwrap()),
            ("energy_cap_per_day_j".to_owned(), zbus::OwnedVariant::try_from(zbus::Variant::from(500u32)).unwrap()),
        ]);
        let set = AppPolicy::from_dict(&dict).unwrap();
        assert_eq!((set.energy_per_hour_j, set.energy_per_day_j, set.energy_cap_per_day_j), (10, 0, 500));
        let file: PolicyFile = toml::from_str(&set.to_toml("org.example.Heavy")).unwrap();
        assert_eq!(file.policy, set);
    }

    #[test]
    fn seal_unsandboxed_is_off_unless_a_file_or_set_app_policy_turns_it_on() {
        assert!(!AppPolicy::default().seal_unsandboxed);
        let d = tempfile::tempdir().unwrap();
        let python = "uid:1000:/usr/bin/python3";
        std::fs::write(d.path().join("py.toml"), format!("app = {python:?}\nseal_unsandboxed = true\n")).unwrap();
        let p = Policies::load(&[d.path().to_owned()], AppPolicy::default()).unwrap();
        assert!(p.get(python).seal_unsandboxed);
        assert!(!p.get("uid:1000:/usr/bin/perl").seal_unsandboxed);
        // SetAppPolicy's dictionary, and the file it stores, keep it.
        let dict = std::collections::HashMap::from([(
            "seal_unsandboxed".to_owned(),
            zbus::OwnedVariant::try_from(zbus::Variant::from(true)).unwrap(),
        )]);
        let set = AppPolicy::from_dict(&dict).unwrap();
        assert!(set.seal_unsandboxed);
        let file: PolicyFile = toml::from_str(&set.to_toml(python)).unwrap();
        assert_eq!((file.app.as_str(), &file.policy), (python, &set));
    }

    #[test]
    fn bad_files_are_errors() {
        for body in [
            "app = \"x\"\ncloud_scopes = [\"local\"]\n",
            "app = \"x\"\nmax_priority = \"urgent\"\n",
            "app = \"x\"\ncloud = \"yes\"\n",
            "app = \"x\"\nseal_unsandboxed = \"yes\"\n",
            "cloud = true\n",
        ] {
            let d = tempfile::tempdir().unwrap();
            std::fs::write(d.path().join("a.toml"), body).unwrap();
            assert!(Policies::load(&[d.path().to_owned()], AppPolicy::default()).is_err(), "{body}");
        }
    }
}
