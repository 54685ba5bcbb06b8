//! hearth-dbus: the `org.hearth.Hearth1` contract shared by hearthd, hearthctl and the tests.
//!
//! `data/org.hearth.Hearth1.xml` is the documentation and the truth; this crate gives it Rust
//! names: bus name and paths, request/result keys, the error enum with stable D-Bus names,
//! and zbus proxies. It holds no behaviour of the daemon.

#![forbid(unsafe_code)]

mod client;
mod error;
mod names;
mod proxy;
mod result;
mod status;

pub use client::{Generation, StreamEvent, messages, messages_value};
pub use error::{ERROR_NAMES, Error};
pub use names::*;
pub use proxy::{Hearth1Proxy, RequestProxy, SessionProxy};
pub use result::{GenerationResult, TokenLogprob, ToolCall};
pub use status::{
    AppActivity, AppEnergy, Availability, Backend, CallerInfo, Energy, KvCache, Memory, ModelInfo, Throttle, TokenCount,
};

/// The introspection XML of the service, as installed in
/// `/usr/share/dbus-1/interfaces/org.hearth.Hearth1.xml`.
pub const INTROSPECTION_XML: &str = include_str!("../data/org.hearth.Hearth1.xml");
/// The system bus policy, as installed in `/usr/share/dbus-1/system.d/`.
pub const BUS_POLICY_CONF: &str = include_str!("../data/org.hearth.Hearth1.conf");
