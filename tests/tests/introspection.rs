//! Golden test: the running service's introspection equals dbus/data/org.hearth.Hearth1.xml,
//! so the documented API and the implementation cannot drift apart.

use std::collections::BTreeMap;

use hearth_dbus::{Generation, INTROSPECTION_XML, StreamEvent};
use hearth_tests::{Bus, Daemon, chat_request, introspect};

type Args = Vec<(String, String, String)>;

/// An interface reduced to what a client depends on.
#[derive(Debug, Default, PartialEq, Eq)]
struct Shape {
    methods: BTreeMap<String, Args>,
    signals: BTreeMap<String, Args>,
    properties: BTreeMap<String, (String, String)>,
}

fn shapes(xml: &str) -> BTreeMap<String, Shape> {
    let doc = roxmltree::Document::parse_with_options(
        xml,
        roxmltree::ParsingOptions { allow_dtd: true, ..Default::default() },
    )
    .expect("valid introspection XML");
    let mut out = BTreeMap::new();
    for iface in doc.descendants().filter(|n| n.has_tag_name("interface")) {
        let name = iface.attribute("name").unwrap_or_default().to_owned();
        if !name.starts_with("org.hearth.") {
            continue;
        }
        let mut shape = Shape::default();
        for member in iface.children().filter(|n| n.is_element()) {
            let mname = member.attribute("name").unwrap_or_default().to_owned();
            let args = |default_dir: &str| -> Args {
                member
                    .children()
                    .filter(|a| a.has_tag_name("arg"))
                    .map(|a| {
                        (
                            a.attribute("name").unwrap_or_default().to_owned(),
                            a.attribute("type").unwrap_or_default().to_owned(),
                            a.attribute("direction").unwrap_or(default_dir).to_owned(),
                        )
                    })
                    .collect()
            };
            match member.tag_name().name() {
                "method" => {
                    shape.methods.insert(mname, args("in"));
                }
                "signal" => {
                    shape.signals.insert(mname, args("out"));
                }
                "property" => {
                    let ty = member.attribute("type").unwrap_or_default().to_owned();
                    let access = member.attribute("access").unwrap_or_default().to_owned();
                    shape.properties.insert(mname, (ty, access));
                }
                _ => {}
            }
        }
        out.insert(name, shape);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_introspection_equals_the_xml() {
    let golden = shapes(INTROSPECTION_XML);
    assert_eq!(
        golden.keys().collect::<Vec<_>>(),
        ["org.hearth.Hearth1", "org.hearth.Hearth1.Request", "org.hearth.Hearth1.Session"]
    );

    let bus = Bus::start();
    let _daemon = Daemon::start(&bus).await;
    let conn = bus.connect().await;
    let mut live = shapes(&introspect(&conn, hearth_dbus::OBJECT_PATH).await.unwrap());

    let mut g = Generation::start(&conn, chat_request("Write a long story.", 900), "introspect").await.unwrap();
    live.extend(shapes(&introspect(&conn, g.path().as_str()).await.unwrap()));
    let session = hearth_tests::hearth(&conn).await.open_session(std::collections::HashMap::new()).await.unwrap();
    live.extend(shapes(&introspect(&conn, session.as_str()).await.unwrap()));
    g.cancel().await.unwrap();
    while let Some(ev) = g.next().await {
        if let Ok(StreamEvent::Finished(_)) = ev {
            break;
        }
    }

    for (name, shape) in &golden {
        assert_eq!(live.get(name), Some(shape), "interface {name} differs from org.hearth.Hearth1.xml");
    }
    assert_eq!(live.len(), golden.len(), "the service has interfaces the XML does not document");
}

/// Sends a forged Token signal to `dest` at `path` as `uid`, with dbus-send.
fn forge_token(bus: &Bus, uid: u32, dest: &str, path: &str, text: &str) {
    let out = std::process::Command::new("setpriv")
        .args([format!("--reuid={uid}"), format!("--regid={uid}"), "--clear-groups".into()])
        .args(["dbus-send", &format!("--bus={}", bus.address()), "--type=signal", &format!("--dest={dest}"), path])
        .args(["org.hearth.Hearth1.Request.Token", "uint32:0", "int32:1", &format!("string:{text}")])
        .output()
        .expect("setpriv dbus-send");
    assert!(out.status.success(), "dbus-send: {}", String::from_utf8_lossy(&out.stderr));
}

/// Only hearthd's user may emit Hearth's signals: another uid's forged Token for a live
/// request never reaches the caller, even a naive one that matches on the path alone (root,
/// which the policy allows, shows that such a client would have taken it). And the parent of
/// the request objects does not list them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_cannot_be_forged_and_requests_are_not_listed() {
    use futures_util::StreamExt;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("not root: the other-user case needs setpriv as root and was skipped");
        return;
    }
    let bus = Bus::start();
    bus.open_to_all_users();
    let _daemon = Daemon::start(&bus).await;
    let conn = bus.connect().await;
    let mut g = Generation::start(&conn, chat_request("Write a long story.", 900), "victim").await.unwrap();
    let path = g.path().as_str().to_owned();
    let naive_rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .path(path.as_str())
        .interface(hearth_dbus::REQUEST_INTERFACE)
        .member("Token")
        .build()
        .unwrap();
    let mut naive = zbus::MessageStream::for_match_rule(naive_rule, &conn, None).await.unwrap();
    let me = conn.unique_name().unwrap().to_string();
    forge_token(&bus, 65534, &me, &path, "FORGED-BY-NOBODY");
    forge_token(&bus, 0, &me, &path, "FORGED-BY-ROOT");

    let mut naive_texts = Vec::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
    while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(deadline, naive.next()).await {
        let (_, _, text): (u32, i32, String) = msg.body().deserialize().unwrap();
        naive_texts.push(text);
        if naive_texts.iter().any(|t| t == "FORGED-BY-ROOT") {
            break;
        }
    }
    assert!(naive_texts.iter().any(|t| t == "FORGED-BY-ROOT"), "the control signal (root) arrived");
    assert!(!naive_texts.iter().any(|t| t == "FORGED-BY-NOBODY"), "another uid's forged signal arrived");

    let listing = introspect(&conn, hearth_dbus::REQUEST_PATH_PREFIX).await.unwrap();
    assert!(!listing.contains("victim") && !listing.contains("<node name="), "{listing}");
    assert!(introspect(&conn, &path).await.unwrap().contains("org.hearth.Hearth1.Request"));

    // The checking client (hearth-dbus's Generation, which matches the service's unique name)
    // saw only hearthd's own tokens.
    g.cancel().await.unwrap();
    while let Some(ev) = g.next().await {
        match ev.unwrap() {
            StreamEvent::Token { text, .. } => assert!(!text.starts_with("FORGED"), "{text}"),
            StreamEvent::Finished(_) => break,
            StreamEvent::Migrated { .. } => {}
        }
    }
}
