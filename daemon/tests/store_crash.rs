//! The state store survives `kill -9` at any moment: a child process (`lull-store-crash`)
//! writes to it in a tight loop and is killed at random times; after every kill the store must
//! open cleanly and hold every write the child saw acknowledged, with revisions numbered without
//! gaps and every document whole.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lull_daemon::store::{STATE_FILE_NAME, SqliteStore, Store, StoreError};
use serde_json::{Value, json};

const SERVICES: [&str; 3] = ["crash-a", "crash-b", "crash-c"];
const KILLS: usize = 30;

/// The same function as the child's: the document written at `generation` of `service`.
fn doc(service: &str, generation: u64) -> Value {
    json!({
        "service": service,
        "generation": generation,
        "pad": "x".repeat((generation % 40) as usize * 100),
    })
}

/// Kills and reaps the child if the test fails while it runs.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What the child printed: writes the store acknowledged.
#[derive(Default)]
struct Acknowledged {
    /// (service, number) -> the generation the commit gave the service.
    revisions: BTreeMap<(String, u64), u64>,
    /// service -> the highest generation acknowledged for it.
    generations: BTreeMap<String, u64>,
    events: BTreeSet<u64>,
}

impl Acknowledged {
    fn record(&mut self, line: &str) {
        let fields: Vec<&str> = line.split(' ').collect();
        let number = |text: &str| -> u64 {
            text.parse()
                .unwrap_or_else(|_| panic!("bad line from the child: {line:?}"))
        };
        match fields.as_slice() {
            ["rev", service, revision, generation] => {
                let generation = number(generation);
                self.revisions
                    .insert((service.to_string(), number(revision)), generation);
                self.bump(service, generation);
            }
            ["put", service, generation] => self.bump(service, number(generation)),
            ["event", seq] => {
                self.events.insert(number(seq));
            }
            _ => panic!("bad line from the child: {line:?}"),
        }
    }

    fn bump(&mut self, service: &str, generation: u64) {
        let highest = self.generations.entry(service.to_string()).or_default();
        assert!(
            generation > *highest,
            "{service}: generation {generation} acknowledged after {highest}"
        );
        *highest = generation;
    }
}

fn random_below(bound: u64) -> u64 {
    getrandom::u64().expect("random bytes") % bound
}

/// Opens the store as a restarted daemon would and checks everything the test knows must hold.
fn verify(dir: &Path, acknowledged: &Acknowledged, round: usize) {
    let store = SqliteStore::open(dir)
        .unwrap_or_else(|error| panic!("round {round}: reopening the store failed: {error}"));
    store.quick_check().expect("quick_check after reopening");
    let mut seen_events = BTreeSet::new();
    for service in SERVICES {
        let record = match store.get_service(service) {
            Ok(record) => record,
            Err(StoreError::NotFound { .. }) => {
                assert!(
                    !acknowledged.generations.contains_key(service),
                    "round {round}: acknowledged service {service} is gone"
                );
                continue;
            }
            Err(error) => panic!("round {round}: {error}"),
        };
        // The service is whole, and at least as new as the last acknowledged write.
        assert_eq!(
            record.doc,
            doc(service, record.generation),
            "round {round}: {service}'s document does not match its generation"
        );
        let acknowledged_generation = acknowledged.generations.get(service).copied();
        assert!(
            Some(record.generation) >= acknowledged_generation,
            "round {round}: {service} is at generation {}, but {acknowledged_generation:?} was acknowledged",
            record.generation
        );

        // Revisions: 1..=n without gaps, the last one current, each document whole.
        let revisions = store.list_revisions(service).expect("list revisions");
        let numbers: Vec<u64> = revisions.iter().map(|revision| revision.number).collect();
        let expected: Vec<u64> = (1..=revisions.len() as u64).collect();
        assert_eq!(
            numbers, expected,
            "round {round}: {service}'s revision numbers"
        );
        assert_eq!(
            record.current_revision,
            revisions.last().map(|revision| revision.number),
            "round {round}: {service}'s current revision"
        );
        let mut revision_generations = BTreeSet::new();
        let mut previous = 0;
        for revision in &revisions {
            let generation = revision.doc["generation"].as_u64().unwrap_or_else(|| {
                panic!(
                    "round {round}: {service}/{} has no generation",
                    revision.number
                )
            });
            assert_eq!(
                revision.doc,
                doc(service, generation),
                "round {round}: {service}/{}",
                revision.number
            );
            assert!(
                generation > previous,
                "round {round}: {service}/{} is older than the one before",
                revision.number
            );
            previous = generation;
            revision_generations.insert(generation);
        }
        for ((acked_service, number), generation) in &acknowledged.revisions {
            if acked_service != service {
                continue;
            }
            let revision = revisions.get(*number as usize - 1).unwrap_or_else(|| {
                panic!("round {round}: acknowledged revision {service}/{number} is gone")
            });
            assert_eq!(
                revision.doc,
                doc(service, *generation),
                "round {round}: {service}/{number}"
            );
        }

        // Events: increasing sequence numbers, and exactly one "revision.created" per
        // revision, written in the same transaction.
        let events = store
            .list_events(service, 0, usize::MAX)
            .expect("list events");
        let mut last_seq = 0;
        let mut event_generations = BTreeSet::new();
        for event in &events {
            assert!(
                event.seq > last_seq,
                "round {round}: event sequence went backwards"
            );
            last_seq = event.seq;
            seen_events.insert(event.seq);
            if event.kind == "revision.created" {
                let generation = event.fields["generation"]
                    .as_u64()
                    .expect("generation field");
                assert!(
                    event_generations.insert(generation),
                    "round {round}: duplicate event"
                );
            }
        }
        assert_eq!(
            event_generations, revision_generations,
            "round {round}: {service}'s revisions and their events disagree"
        );
    }
    let lost: Vec<_> = acknowledged.events.difference(&seen_events).collect();
    assert!(
        lost.is_empty(),
        "round {round}: acknowledged events lost: {lost:?}"
    );

    // SQLite's side files are as private as the database.
    for suffix in ["", "-wal", "-shm"] {
        let path = dir.join(format!("{STATE_FILE_NAME}{suffix}"));
        if let Ok(metadata) = std::fs::metadata(&path) {
            let mode = metadata.permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{} has mode {mode:o}", path.display());
        }
    }
}

#[test]
fn acknowledged_writes_survive_sigkill_at_random_moments() {
    let dir = tempfile::Builder::new()
        .prefix(&format!("lull-store-crash-{}-", std::process::id()))
        .tempdir()
        .expect("temp dir");
    let started = Instant::now();
    let mut acknowledged = Acknowledged::default();
    let mut acknowledged_per_round = Vec::new();
    for round in 0..KILLS {
        let mut child = KillOnDrop(
            Command::new(env!("CARGO_BIN_EXE_lull-store-crash"))
                .arg(dir.path())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn lull-store-crash"),
        );
        // Anywhere from before the store is open to deep into the write loop.
        std::thread::sleep(Duration::from_millis(random_below(80)));
        child.0.kill().expect("SIGKILL the child");
        let status = child.0.wait().expect("reap the child");
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "round {round}: the child ended on its own: {status}"
        );
        let mut output = String::new();
        child
            .0
            .stdout
            .take()
            .expect("child stdout")
            .read_to_string(&mut output)
            .expect("read the child's output");
        // Only whole lines were acknowledged.
        let complete = output.rfind('\n').map_or("", |end| &output[..end]);
        let lines: Vec<&str> = complete.lines().collect();
        acknowledged_per_round.push(lines.len());
        for line in lines {
            acknowledged.record(line);
        }
        verify(dir.path(), &acknowledged, round);
    }
    let elapsed = started.elapsed();
    eprintln!(
        "{KILLS} kills in {elapsed:?}; writes acknowledged per round: {acknowledged_per_round:?}"
    );
    assert!(
        acknowledged.revisions.len() >= 30,
        "too few revisions were written to test anything: {acknowledged_per_round:?}"
    );
    assert!(
        acknowledged_per_round
            .iter()
            .filter(|count| **count > 0)
            .count()
            >= KILLS / 3,
        "most kills came before the first write: {acknowledged_per_round:?}"
    );
}
