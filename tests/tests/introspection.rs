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
