//! Privacy scopes and the routing decision: which data may leave the device, and where a
//! request runs.
//!
//! Every message part has a scope: `public` (may go to the cloud), `personal` (to the cloud
//! only if the app's policy allows personal data there; the default for unlabelled parts),
//! `local` (never leaves the device). Sealed parts are `local`. A request containing any local
//! part is local (taint). `route = "cloud"` with data that may not leave fails with
//! PrivacyViolation; `auto` runs locally. Nothing is ever forwarded silently.
//!
//! Every decision is written to the journal (target `hearth::audit`) with the app, the scopes
//! present, the route and the reason — never content: log and error texts here name scopes,
//! indices and counts only.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::Deserialize;

use crate::engine::{ImageInput, Message};
use crate::error::Error;
use crate::policy::{AppPolicy, Policies};
use crate::seal::{SealError, Sealer};

/// Where a message part may go. Ordered by how private it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Public,
    Personal,
    Local,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Public => "public",
            Self::Personal => "personal",
            Self::Local => "local",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Public, Self::Personal, Self::Local].into_iter().find(|x| x.as_str() == s)
    }
}

/// The route a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteRequest {
    /// hearthd decides (on the device unless the data and policy allow the cloud and the
    /// governors prefer it).
    Auto,
    Local,
    Cloud,
}

impl RouteRequest {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "auto" => Self::Auto,
            "local" => Self::Local,
            "cloud" => Self::Cloud,
            _ => return None,
        })
    }
}

/// What the router knows about the cloud for one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CloudView {
    /// A cloud endpoint is configured.
    pub configured: bool,
    /// Its circuit breaker lets requests through.
    pub available: bool,
    /// Why `auto` would rather use it (heat, battery, queue, size), if it would.
    pub prefer: Option<&'static str>,
}

/// Where a request runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Local,
    Cloud,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Cloud => "cloud",
        }
    }
}

/// A message part's content: text, or bytes sealed by [`Sealer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    Text(String),
    Sealed(Vec<u8>),
}

/// An image of a message, before unsealing: encoded bytes, or bytes sealed by [`Sealer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Image {
    Plain(Vec<u8>),
    Sealed(Vec<u8>),
}

/// One message of a request, before unsealing. Its images share its scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub role: String,
    pub content: Content,
    pub scope: Scope,
    pub images: Vec<Image>,
    /// An assistant turn's tool calls; they share its scope.
    pub tool_calls: Vec<crate::structured::ToolCall>,
    /// A tool turn: the call it answers.
    pub tool_call_id: Option<String>,
}

/// The routing decision for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub route: Route,
    pub reason: &'static str,
    /// The most private scope present.
    pub taint: Scope,
    /// Whether any part of this request may ever run in the cloud: decided here, once, and
    /// carried with the request, so that no later path (the move of a running device request
    /// to the cloud when the device turns critical) decides it again. Only `auto` requests
    /// whose data and app policy allow the cloud, with a cloud configured, may leave;
    /// `route: local` and device-only requests (structured output, tools, adapters) never do.
    pub may_leave: bool,
}

/// What a request may do, decided from the caller's identity and policy.
#[derive(Debug)]
pub struct Admitted {
    pub messages: Vec<Message>,
    /// The messages' images, unsealed, in message order.
    pub images: Vec<ImageInput>,
    pub decision: Decision,
}

/// Checks a request against the caller's policy, unseals its sealed parts (only the sealing
/// app, or apps it shares with, may use them), and decides the route. `cloud_ready` says
/// what the router knows about the cloud.
pub fn admit(
    app_id: &str,
    policy: &AppPolicy,
    policies: &Policies,
    sealer: &Sealer,
    parts: Vec<Part>,
    route: RouteRequest,
    cloud: CloudView,
) -> Result<Admitted, Error> {
    let scopes: BTreeSet<Scope> = parts.iter().map(|p| p.scope).collect();
    let sealed = parts.iter().filter(|p| matches!(p.content, Content::Sealed(_))).count()
        + parts.iter().flat_map(|p| &p.images).filter(|i| matches!(i, Image::Sealed(_))).count();
    let image_count = parts.iter().map(|p| p.images.len()).sum::<usize>();
    let mut messages = Vec::with_capacity(parts.len());
    let mut images = Vec::with_capacity(image_count);
    for (i, part) in parts.into_iter().enumerate() {
        let content = match part.content {
            Content::Text(t) => t,
            Content::Sealed(blob) => {
                let plain = unseal(app_id, policies, sealer, &blob, &format!("messages[{i}].sealed"))?;
                String::from_utf8(plain)
                    .map_err(|_| Error::InvalidArgs(format!("messages[{i}].sealed does not hold UTF-8 text")))?
            }
        };
        for (j, image) in part.images.into_iter().enumerate() {
            let bytes = match image {
                Image::Plain(b) => b,
                Image::Sealed(blob) => {
                    let what = format!("messages[{i}].sealed_images[{j}]");
                    let plain = unseal(app_id, policies, sealer, &blob, &what)?;
                    crate::request::check_image(&what, &plain)?;
                    plain
                }
            };
            images.push(ImageInput { message: i as u32, bytes: Arc::new(serde_bytes::ByteBuf::from(bytes)) });
        }
        messages.push(Message {
            role: part.role,
            content,
            tool_calls: part.tool_calls,
            tool_call_id: part.tool_call_id,
        });
    }
    let taint = scopes.iter().copied().max().unwrap_or(Scope::Personal);
    let outcome = decide(policy, &scopes, route, cloud);
    let scope_list: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
    match &outcome {
        Ok(d) => tracing::info!(
            target: "hearth::audit", app = app_id, scopes = %scope_list.join(","), sealed_parts = sealed,
            images = image_count, requested = ?route, route = d.route.as_str(), reason = d.reason, "routing decision"
        ),
        Err(e) => tracing::info!(
            target: "hearth::audit", app = app_id, scopes = %scope_list.join(","), sealed_parts = sealed,
            images = image_count, requested = ?route, route = "refused", reason = %e, "routing decision"
        ),
    }
    outcome.map(|route| Admitted { messages, images, decision: Decision { taint, ..route } })
}

/// Opens the sealed blob at `what` for `app_id`: only the sealing app, or apps it shares
/// with, may use it.
fn unseal(app_id: &str, policies: &Policies, sealer: &Sealer, blob: &[u8], what: &str) -> Result<Vec<u8>, Error> {
    let at = |e: SealError| match e {
        SealError::Malformed(_) => Error::InvalidArgs(format!("{what}: {e}")),
        SealError::Forged => Error::NotAuthorized(format!("{what}: {e}")),
    };
    let owner = Sealer::sealer_of(blob).map_err(at)?;
    if owner != app_id && !policies.get(&owner).share_sealed_with.iter().any(|a| a == app_id) {
        return Err(Error::NotAuthorized(format!(
            "{what} was sealed by another app that does not share it with this one"
        )));
    }
    let (_, plain) = sealer.open_blob(blob).map_err(at)?;
    Ok(plain)
}

fn decide(
    policy: &AppPolicy,
    scopes: &BTreeSet<Scope>,
    route: RouteRequest,
    cloud: CloudView,
) -> Result<Decision, Error> {
    let taint = scopes.iter().copied().max().unwrap_or(Scope::Personal);
    let data_may_leave = policy.cloud && scopes.iter().all(|s| policy.cloud_allows(*s));
    let may_leave = data_may_leave && cloud.configured && route != RouteRequest::Local;
    let local = |reason| Ok(Decision { route: Route::Local, reason, taint, may_leave });
    match route {
        RouteRequest::Local => local("the caller asked for the device (or the request is device-only)"),
        RouteRequest::Auto if taint == Scope::Local => local("local or sealed data stays on the device"),
        RouteRequest::Auto => match cloud.prefer {
            Some(why) if may_leave && cloud.available => {
                Ok(Decision { route: Route::Cloud, reason: why, taint, may_leave })
            }
            Some(_) if !data_may_leave => {
                local("the cloud would be preferred, but this data or app stays on the device")
            }
            Some(_) => local("the cloud would be preferred, but it is not available"),
            None => local("on-device by default"),
        },
        RouteRequest::Cloud => {
            // Local data never leaves, whatever the policy: that is the error to report,
            // before what this app may do (the order is documented in the XML).
            if taint == Scope::Local {
                return Err(Error::PrivacyViolation(
                    "the request holds local data, which never leaves the device; it was not sent".into(),
                ));
            }
            if !policy.cloud {
                return Err(Error::NotAuthorized("this app's policy does not allow the cloud route".into()));
            }
            if let Some(s) = scopes.iter().rev().find(|s| !policy.cloud_allows(**s)) {
                return Err(Error::PrivacyViolation(format!(
                    "the request holds {} data, which this app's policy keeps on the device; it was not sent",
                    s.as_str()
                )));
            }
            if !cloud.configured {
                return Err(Error::CloudUnavailable("no cloud model is configured".into()));
            }
            Ok(Decision {
                route: Route::Cloud,
                reason: "the caller asked for the cloud and the data may go",
                taint,
                may_leave,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(s: &[Scope]) -> BTreeSet<Scope> {
        s.iter().copied().collect()
    }

    #[test]
    fn local_and_sealed_data_never_take_the_cloud_route() {
        let open =
            AppPolicy { cloud: true, cloud_scopes: vec![Scope::Public, Scope::Personal], ..AppPolicy::default() };
        let public_only = AppPolicy { cloud: true, ..AppPolicy::default() };
        let closed = AppPolicy::default();
        type Case<'a> = (&'a AppPolicy, &'a [Scope], RouteRequest, Result<Route, &'a str>);
        let cases: Vec<Case<'_>> = vec![
            (&open, &[Scope::Public], RouteRequest::Cloud, Ok(Route::Cloud)),
            (&open, &[Scope::Personal], RouteRequest::Cloud, Ok(Route::Cloud)),
            (&open, &[Scope::Public, Scope::Local], RouteRequest::Cloud, Err("PrivacyViolation")),
            (&public_only, &[Scope::Personal], RouteRequest::Cloud, Err("PrivacyViolation")),
            (&closed, &[Scope::Public], RouteRequest::Cloud, Err("NotAuthorized")),
            // Several errors apply: local data is a PrivacyViolation before the policy's word.
            (&closed, &[Scope::Public, Scope::Local], RouteRequest::Cloud, Err("PrivacyViolation")),
            (&closed, &[Scope::Personal], RouteRequest::Cloud, Err("NotAuthorized")),
            (&open, &[Scope::Local], RouteRequest::Auto, Ok(Route::Local)),
            (&open, &[Scope::Public], RouteRequest::Auto, Ok(Route::Local)),
            (&open, &[Scope::Public], RouteRequest::Local, Ok(Route::Local)),
        ];
        for (policy, scopes, route, want) in cases {
            let view = CloudView { configured: true, available: true, prefer: None };
            let got = decide(policy, &set(scopes), route, view);
            match (got, want) {
                (Ok(d), Ok(r)) => assert_eq!(d.route, r, "{scopes:?} {route:?}"),
                (Err(e), Err(name)) => assert!(format!("{e:?}").starts_with(name), "{e:?} vs {name}"),
                (got, want) => panic!("{scopes:?} {route:?}: got {got:?}, want {want:?}"),
            }
        }
        assert!(matches!(
            decide(&open, &set(&[Scope::Public]), RouteRequest::Cloud, CloudView::default()),
            Err(Error::CloudUnavailable(_))
        ));
        // No cloud configured and the data may not go: the privacy error wins.
        assert!(matches!(
            decide(&open, &set(&[Scope::Local]), RouteRequest::Cloud, CloudView::default()),
            Err(Error::PrivacyViolation(_))
        ));
        // auto follows a preference only where the data may go.
        let hot = CloudView { configured: true, available: true, prefer: Some("hot") };
        assert_eq!(decide(&open, &set(&[Scope::Public]), RouteRequest::Auto, hot).unwrap().route, Route::Cloud);
        assert_eq!(decide(&open, &set(&[Scope::Local]), RouteRequest::Auto, hot).unwrap().route, Route::Local);
        assert_eq!(
            decide(&public_only, &set(&[Scope::Personal]), RouteRequest::Auto, hot).unwrap().route,
            Route::Local
        );
        // Whether a request may ever leave is decided here once: never for route local (which
        // device-only requests are given), never for local data, only with a cloud configured.
        let calm = CloudView { configured: true, available: true, prefer: None };
        let leaves = |p: &AppPolicy, sc: &[Scope], r, v| decide(p, &set(sc), r, v).unwrap().may_leave;
        assert!(leaves(&open, &[Scope::Public], RouteRequest::Auto, calm));
        assert!(leaves(&open, &[Scope::Public], RouteRequest::Cloud, calm));
        assert!(!leaves(&open, &[Scope::Public], RouteRequest::Local, calm));
        assert!(!leaves(&open, &[Scope::Public], RouteRequest::Local, hot));
        assert!(!leaves(&open, &[Scope::Public, Scope::Local], RouteRequest::Auto, hot));
        assert!(!leaves(&public_only, &[Scope::Personal], RouteRequest::Auto, hot));
        assert!(!leaves(&open, &[Scope::Public], RouteRequest::Auto, CloudView::default()));
        let down = CloudView { available: false, ..hot };
        assert_eq!(decide(&open, &set(&[Scope::Public]), RouteRequest::Auto, down).unwrap().route, Route::Local);
    }
}
