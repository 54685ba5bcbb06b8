//! hearth-polkit-standin: a stand-in for polkitd on a private test bus, where polkitd itself
//! cannot run (it needs the real system bus and logind). It owns org.freedesktop.PolicyKit1,
//! answers CheckAuthorization with a fixed verdict, and appends every call it receives (the
//! subject, action, details and flags, as JSON) to a record file, so tests can check exactly
//! what hearthd asked.
//!
//! usage: hearth-polkit-standin --bus-address ADDR --answer allow|deny|challenge --record FILE
//! Prints "ready" once it owns the name.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use clap::Parser;
use zbus::OwnedVariant;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long)]
    bus_address: String,
    #[arg(long, value_parser = ["allow", "deny", "challenge"])]
    answer: String,
    #[arg(long)]
    record: PathBuf,
}

struct Authority {
    answer: String,
    record: PathBuf,
}

#[zbus::interface(name = "org.freedesktop.PolicyKit1.Authority")]
impl Authority {
    /// polkit's CheckAuthorization(subject, action_id, details, flags, cancellation_id).
    async fn check_authorization(
        &self,
        subject: (String, HashMap<String, OwnedVariant>),
        action_id: String,
        details: HashMap<String, String>,
        flags: u32,
        cancellation_id: String,
    ) -> (bool, bool, HashMap<String, String>) {
        let subject_details: serde_json::Map<String, serde_json::Value> = subject
            .1
            .iter()
            .map(|(k, v)| {
                let v =
                    <&str>::try_from(v).map_or_else(|_| serde_json::json!(format!("{v:?}")), |s| serde_json::json!(s));
                (k.clone(), v)
            })
            .collect();
        let line = serde_json::json!({
            "subject_kind": subject.0,
            "subject": subject_details,
            "action": action_id,
            "details": details,
            "flags": flags,
            "cancellation_id": cancellation_id,
        });
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(&self.record) {
            let _ = writeln!(f, "{line}");
        }
        match self.answer.as_str() {
            "allow" => (true, false, HashMap::new()),
            "challenge" => (false, true, HashMap::new()),
            _ => (false, false, HashMap::new()),
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> zbus::Result<()> {
    let args = Args::parse();
    let _conn = zbus::connection::Builder::address(args.bus_address.as_str())
        .serve_at("/org/freedesktop/PolicyKit1/Authority", Authority { answer: args.answer, record: args.record })
        .name("org.freedesktop.PolicyKit1")
        .build()
        .await?;
    println!("ready");
    std::future::pending::<()>().await;
    Ok(())
}
