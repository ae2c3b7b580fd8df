//! `lull-store-crash DIR`: the process the store's crash test kills. It opens the SQLite store
//! in DIR and writes to it forever (revisions with their events, service updates, lone events),
//! printing a line for each write after the store has acknowledged it:
//!
//! - `rev SERVICE NUMBER GENERATION`: a committed revision and the generation it gave the service
//! - `put SERVICE GENERATION`: a service update
//! - `event SEQ`: an event
//!
//! Every document it writes is `doc(service, generation)`, so the test can tell what each one
//! must hold.

use std::io::Write;
use std::path::PathBuf;

use lull_daemon::store::{NewEvent, NewService, RevisionCommit, SqliteStore, Store, StoreError};
use serde_json::{Value, json};

const SERVICES: [&str; 3] = ["crash-a", "crash-b", "crash-c"];

/// The document written at `generation` of `service` (the crash test has the same function).
fn doc(service: &str, generation: u64) -> Value {
    json!({
        "service": service,
        "generation": generation,
        "pad": "x".repeat((generation % 40) as usize * 100),
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from(
        std::env::args_os()
            .nth(1)
            .ok_or("usage: lull-store-crash DIR")?,
    );
    let store = SqliteStore::open(&dir)?;
    for service in SERVICES {
        match store.create_service(&NewService {
            name: service.into(),
            state: "active".into(),
            doc: doc(service, 1),
        }) {
            Ok(_) | Err(StoreError::AlreadyExists { .. }) => {}
            Err(error) => return Err(error.into()),
        }
    }
    let mut out = std::io::stdout().lock();
    for step in 0u64.. {
        let service = SERVICES[(step % 3) as usize];
        let current = store.get_service(service)?;
        let generation = current.generation + 1;
        match step % 5 {
            0..=2 => {
                let committed = store.commit_revision(&RevisionCommit {
                    service: service.into(),
                    expected_generation: Some(current.generation),
                    doc: doc(service, generation),
                    cause: "crash test".into(),
                    service_doc: Some(doc(service, generation)),
                    state: None,
                    event: Some(NewEvent {
                        service: service.into(),
                        kind: "revision.created".into(),
                        message: "crash test revision".into(),
                        fields: json!({ "generation": generation }),
                    }),
                    make_current: true,
                })?;
                writeln!(
                    out,
                    "rev {service} {} {}",
                    committed.revision.number, committed.service.generation
                )?;
            }
            3 => {
                let mut record = current.clone();
                record.state = if step % 2 == 0 { "active" } else { "paused" }.into();
                record.doc = doc(service, generation);
                let stored = store.put_service(&record, current.generation)?;
                writeln!(out, "put {service} {}", stored.generation)?;
            }
            _ => {
                let event = store.append_event(&NewEvent {
                    service: service.into(),
                    kind: "tick".into(),
                    message: format!("step {step}"),
                    fields: json!({}),
                })?;
                writeln!(out, "event {}", event.seq)?;
            }
        }
        out.flush()?;
    }
    Ok(())
}
