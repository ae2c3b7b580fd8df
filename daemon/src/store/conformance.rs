//! The conformance suite every [`Store`] implementation passes: one generic function, called by
//! each implementation's tests with a fresh, empty store.

use std::sync::Arc;
use std::thread;

use chrono::TimeDelta;
use serde_json::json;

use super::*;

pub(crate) fn run(store: &dyn Store) {
    services(store);
    revisions(store);
    revisions_made_current_later(store);
    concurrent_commits_get_distinct_contiguous_numbers(store);
    events(store);
    operations(store);
    secrets(store);
    registry_credentials(store);
}

fn new_service(name: &str) -> NewService {
    NewService {
        name: name.into(),
        state: "active".into(),
        doc: json!({"image": format!("{name}:1"), "port": 8080}),
    }
}

fn commit(service: &str, expected_generation: Option<u64>, image: &str) -> RevisionCommit {
    RevisionCommit {
        service: service.into(),
        expected_generation,
        doc: json!({"image": image}),
        cause: format!("deploy {image}"),
        service_doc: Some(json!({"image": image})),
        state: None,
        event: None,
        make_current: true,
    }
}

fn event(service: &str, kind: &str) -> NewEvent {
    NewEvent {
        service: service.into(),
        kind: kind.into(),
        message: format!("{kind} happened"),
        fields: json!({"kind": kind}),
    }
}

fn services(store: &dyn Store) {
    let created = store.create_service(&new_service("svc-b")).unwrap();
    assert_eq!(created.generation, 1);
    assert_eq!(created.current_revision, None);
    assert_eq!(created.state, "active");
    assert_eq!(created.created_at, created.updated_at);
    assert_eq!(store.get_service("svc-b").unwrap(), created);

    let error = store.create_service(&new_service("svc-b")).unwrap_err();
    assert!(
        matches!(&error, StoreError::AlreadyExists { kind: RecordKind::Service, key } if key == "svc-b"),
        "{error:?}"
    );
    store.create_service(&new_service("svc-a")).unwrap();
    let names: Vec<_> = store
        .list_services()
        .unwrap()
        .into_iter()
        .map(|service| service.name)
        .collect();
    assert_eq!(names, ["svc-a", "svc-b"]);

    // Optimistic concurrency.
    let mut record = store.get_service("svc-b").unwrap();
    record.state = "paused".into();
    record.doc = json!({"image": "svc-b:2"});
    let updated = store.put_service(&record, 1).unwrap();
    assert_eq!(updated.generation, 2);
    assert_eq!(updated.state, "paused");
    assert_eq!(updated.created_at, created.created_at);
    assert!(updated.updated_at >= created.updated_at);
    assert_eq!(store.get_service("svc-b").unwrap(), updated);
    let error = store.put_service(&record, 1).unwrap_err();
    assert!(
        matches!(&error, StoreError::Conflict { kind: RecordKind::Service, key, detail }
            if key == "svc-b" && detail == "expected generation 1, found 2"),
        "{error:?}"
    );
    assert_eq!(
        store.get_service("svc-b").unwrap(),
        updated,
        "a conflict wrote"
    );

    // The current revision can only point at a revision that exists.
    record.current_revision = Some(1);
    let error = store.put_service(&record, 2).unwrap_err();
    assert!(
        matches!(&error, StoreError::NotFound { kind: RecordKind::Revision, key } if key == "svc-b/1"),
        "{error:?}"
    );

    let missing = ServiceRecord {
        name: "nope".into(),
        ..updated.clone()
    };
    assert!(matches!(
        store.put_service(&missing, 1),
        Err(StoreError::NotFound {
            kind: RecordKind::Service,
            ..
        })
    ));
    assert!(matches!(
        store.get_service("nope"),
        Err(StoreError::NotFound { .. })
    ));

    // Delete: generation-checked, then gone; the name can be reused.
    assert!(matches!(
        store.delete_service("svc-b", Some(1)),
        Err(StoreError::Conflict { .. })
    ));
    store.delete_service("svc-b", Some(2)).unwrap();
    assert!(matches!(
        store.get_service("svc-b"),
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.delete_service("svc-b", None),
        Err(StoreError::NotFound { .. })
    ));
    store.delete_service("svc-a", None).unwrap();
    assert!(store.list_services().unwrap().is_empty());
}

fn revisions(store: &dyn Store) {
    let created = store.create_service(&new_service("rev")).unwrap();
    assert!(store.list_revisions("rev").unwrap().is_empty());

    let first = store
        .commit_revision(&commit("rev", Some(1), "rev:1"))
        .unwrap();
    assert_eq!(first.revision.number, 1);
    assert_eq!(first.revision.service, "rev");
    assert_eq!(first.revision.cause, "deploy rev:1");
    assert_eq!(first.service.generation, 2);
    assert_eq!(first.service.current_revision, Some(1));
    assert_eq!(first.service.doc, json!({"image": "rev:1"}));
    assert_eq!(first.service.state, "active");
    assert_eq!(first.service.created_at, created.created_at);
    assert_eq!(first.event, None);
    assert_eq!(store.get_service("rev").unwrap(), first.service);

    // A stale generation writes nothing: no revision, no service change, no event.
    let mut stale = commit("rev", Some(1), "rev:stale");
    stale.event = Some(event("rev", "revision.created"));
    let error = store.commit_revision(&stale).unwrap_err();
    assert!(matches!(error, StoreError::Conflict { .. }), "{error:?}");
    assert_eq!(store.list_revisions("rev").unwrap().len(), 1);
    assert!(store.list_events("rev", 0, 100).unwrap().is_empty());

    // With an event, a new state and no new service doc.
    let second = store
        .commit_revision(&RevisionCommit {
            service_doc: None,
            state: Some("deploying".into()),
            event: Some(event("rev", "revision.created")),
            ..commit("rev", Some(2), "rev:2")
        })
        .unwrap();
    assert_eq!(second.revision.number, 2);
    assert_eq!(second.service.generation, 3);
    assert_eq!(second.service.state, "deploying");
    assert_eq!(second.service.doc, json!({"image": "rev:1"}), "doc kept");
    let recorded = second.event.clone().unwrap();
    assert_eq!(recorded.kind, "revision.created");
    assert_eq!(store.list_events("rev", 0, 100).unwrap(), vec![recorded]);

    // Unconditional commits still number on.
    let third = store
        .commit_revision(&commit("rev", None, "rev:3"))
        .unwrap();
    assert_eq!(third.revision.number, 3);

    let listed = store.list_revisions("rev").unwrap();
    let numbers: Vec<_> = listed.iter().map(|revision| revision.number).collect();
    assert_eq!(numbers, [1, 2, 3]);
    assert_eq!(listed[1], second.revision);
    assert_eq!(store.get_revision("rev", 2).unwrap(), second.revision);
    assert!(matches!(
        store.get_revision("rev", 4),
        Err(StoreError::NotFound { kind: RecordKind::Revision, key }) if key == "rev/4"
    ));
    assert!(matches!(
        store.get_revision("rev", 0),
        Err(StoreError::NotFound {
            kind: RecordKind::Revision,
            ..
        })
    ));
    assert!(matches!(
        store.get_revision("ghost", 1),
        Err(StoreError::NotFound { kind: RecordKind::Service, key }) if key == "ghost"
    ));
    assert!(matches!(
        store.list_revisions("ghost"),
        Err(StoreError::NotFound {
            kind: RecordKind::Service,
            ..
        })
    ));
    assert!(matches!(
        store.commit_revision(&commit("ghost", None, "x")),
        Err(StoreError::NotFound {
            kind: RecordKind::Service,
            ..
        })
    ));

    // Rollback moves the pointer to an existing revision without adding one.
    let mut service = store.get_service("rev").unwrap();
    service.current_revision = Some(1);
    let rolled_back = store.put_service(&service, service.generation).unwrap();
    assert_eq!(rolled_back.current_revision, Some(1));
    assert_eq!(store.list_revisions("rev").unwrap().len(), 3);
    // The next commit still takes the next number.
    let fourth = store
        .commit_revision(&commit("rev", None, "rev:4"))
        .unwrap();
    assert_eq!(fourth.revision.number, 4);

    // Deleting the service deletes its revisions; a new service of that name starts at 1.
    store.delete_service("rev", None).unwrap();
    store.create_service(&new_service("rev")).unwrap();
    assert!(store.list_revisions("rev").unwrap().is_empty());
    let again = store
        .commit_revision(&commit("rev", None, "rev:1"))
        .unwrap();
    assert_eq!(again.revision.number, 1);
    store.delete_service("rev", None).unwrap();
}

/// A revision committed without becoming current leaves the service's current revision and
/// document alone; `put_service` makes it current once it serves.
fn revisions_made_current_later(store: &dyn Store) {
    let created = store.create_service(&new_service("later")).unwrap();
    let first = store
        .commit_revision(&commit("later", Some(created.generation), "img:1"))
        .unwrap();
    assert_eq!(first.service.current_revision, Some(1));
    let mut pending = commit("later", Some(first.service.generation), "img:2");
    pending.make_current = false;
    pending.service_doc = None;
    let second = store.commit_revision(&pending).unwrap();
    assert_eq!(second.revision.number, 2);
    assert_eq!(second.service.current_revision, Some(1));
    assert_eq!(second.service.doc, first.service.doc);
    let stored = store.get_service("later").unwrap();
    assert_eq!(stored.current_revision, Some(1));
    assert_eq!(stored.generation, second.service.generation);
    let serving = ServiceRecord {
        current_revision: Some(2),
        doc: second.revision.doc.clone(),
        ..stored.clone()
    };
    let put = store.put_service(&serving, stored.generation).unwrap();
    assert_eq!(put.current_revision, Some(2));
    assert_eq!(store.get_service("later").unwrap().doc, second.revision.doc);
    store.delete_service("later", None).unwrap();
}

fn concurrent_commits_get_distinct_contiguous_numbers(store: &dyn Store) {
    store.create_service(&new_service("race")).unwrap();
    // Scoped threads share the borrowed store.
    let numbers = Arc::new(std::sync::Mutex::new(Vec::new()));
    thread::scope(|scope| {
        for thread in 0..4 {
            let numbers = Arc::clone(&numbers);
            scope.spawn(move || {
                for i in 0..10 {
                    let committed = store
                        .commit_revision(&commit("race", None, &format!("race:{thread}-{i}")))
                        .unwrap();
                    numbers.lock().unwrap().push(committed.revision.number);
                }
            });
        }
    });
    let mut numbers = numbers.lock().unwrap().clone();
    numbers.sort();
    assert_eq!(numbers, (1..=40).collect::<Vec<u64>>());
    let service = store.get_service("race").unwrap();
    assert_eq!(service.generation, 41);
    assert_eq!(service.current_revision, Some(40));
    store.delete_service("race", None).unwrap();
}

fn events(store: &dyn Store) {
    let first = store
        .append_event(&event("ev-a", "deploy.started"))
        .unwrap();
    let second = store
        .append_event(&event("ev-b", "deploy.started"))
        .unwrap();
    let third = store
        .append_event(&event("ev-a", "deploy.succeeded"))
        .unwrap();
    assert!(first.seq < second.seq && second.seq < third.seq);
    assert_eq!(first.fields, json!({"kind": "deploy.started"}));
    assert_eq!(first.message, "deploy.started happened");
    assert!(third.time >= first.time);

    assert_eq!(
        store.list_events("ev-a", 0, 100).unwrap(),
        vec![first.clone(), third.clone()]
    );
    assert_eq!(
        store.list_events("ev-a", first.seq, 100).unwrap(),
        vec![third.clone()]
    );
    assert_eq!(
        store.list_events("ev-a", 0, 1).unwrap(),
        vec![first.clone()]
    );
    assert!(
        store
            .list_events("ev-a", third.seq, 100)
            .unwrap()
            .is_empty()
    );
    assert!(store.list_events("ev-none", 0, 100).unwrap().is_empty());

    // Keep the newest per service.
    for i in 0..5 {
        store
            .append_event(&event("ev-a", &format!("tick.{i}")))
            .unwrap();
    }
    let removed = store
        .prune_events(&EventRetention {
            older_than: None,
            keep_per_service: Some(2),
        })
        .unwrap();
    assert_eq!(removed, 5, "ev-a had 7, ev-b 1");
    let kinds: Vec<_> = store
        .list_events("ev-a", 0, 100)
        .unwrap()
        .into_iter()
        .map(|event| event.kind)
        .collect();
    assert_eq!(kinds, ["tick.3", "tick.4"]);
    assert_eq!(store.list_events("ev-b", 0, 100).unwrap(), vec![second]);

    // Sequence numbers are never reused after pruning.
    let before_prune_max = store.list_events("ev-a", 0, 100).unwrap()[1].seq;
    assert_eq!(
        store
            .prune_events(&EventRetention {
                older_than: Some(Timestamp::now().saturating_sub(TimeDelta::hours(1))),
                keep_per_service: None,
            })
            .unwrap(),
        0,
        "nothing is an hour old"
    );
    let removed = store
        .prune_events(&EventRetention {
            older_than: Some(Timestamp::now().saturating_sub(TimeDelta::hours(-1))),
            keep_per_service: None,
        })
        .unwrap();
    assert_eq!(
        removed, 4,
        "ev-a's 2, ev-b's 1 and the revision event of service rev"
    );
    let next = store.append_event(&event("ev-a", "after")).unwrap();
    assert!(
        next.seq > before_prune_max,
        "{} <= {before_prune_max}",
        next.seq
    );
    assert_eq!(store.list_events("ev-a", 0, 100).unwrap(), vec![next]);
    store
        .prune_events(&EventRetention {
            older_than: None,
            keep_per_service: Some(0),
        })
        .unwrap();
}

fn operations(store: &dyn Store) {
    let deploy = store.create_operation("deploy", "op-svc").unwrap();
    assert_eq!(deploy.state, OperationState::Running);
    assert!(
        deploy.id.starts_with("op-") && deploy.id.len() == 15,
        "{}",
        deploy.id
    );
    assert!(deploy.progress.is_empty());
    let other = store.create_operation("build", "op-other").unwrap();
    assert_ne!(deploy.id, other.id);

    store
        .append_operation_progress(&deploy.id, "pulling image")
        .unwrap();
    store
        .append_operation_progress(&deploy.id, "starting 2 instances")
        .unwrap();
    let fetched = store.get_operation(&deploy.id).unwrap();
    let lines: Vec<_> = fetched
        .progress
        .iter()
        .map(|line| line.line.as_str())
        .collect();
    assert_eq!(lines, ["pulling image", "starting 2 instances"]);
    assert!(fetched.updated_at >= deploy.updated_at);

    let done = store
        .finish_operation(
            &deploy.id,
            &OperationOutcome::Succeeded(json!({"revision": 3})),
        )
        .unwrap();
    assert_eq!(done.state, OperationState::Succeeded);
    assert_eq!(done.result, Some(json!({"revision": 3})));
    assert_eq!(done.error, None);
    assert_eq!(done.progress.len(), 2);
    assert_eq!(store.get_operation(&deploy.id).unwrap(), done);

    // Finished means finished.
    let error = store
        .finish_operation(
            &deploy.id,
            &OperationOutcome::Failed(json!({"message": "x"})),
        )
        .unwrap_err();
    assert!(
        matches!(&error, StoreError::Conflict { kind: RecordKind::Operation, detail, .. }
            if detail == "already succeeded"),
        "{error:?}"
    );
    assert!(matches!(
        store.append_operation_progress(&deploy.id, "late"),
        Err(StoreError::Conflict { .. })
    ));
    assert!(matches!(
        store.get_operation("op-000000000000"),
        Err(StoreError::NotFound {
            kind: RecordKind::Operation,
            ..
        })
    ));
    assert!(matches!(
        store.append_operation_progress("op-000000000000", "x"),
        Err(StoreError::NotFound { .. })
    ));

    let ids = |service| -> Vec<String> {
        store
            .list_operations(service)
            .unwrap()
            .into_iter()
            .map(|operation| operation.id)
            .collect()
    };
    assert_eq!(ids(None), [deploy.id.clone(), other.id.clone()]);
    assert_eq!(ids(Some("op-other")), vec![other.id.clone()]);

    // The restart sweep fails what was running, and only that.
    let failed = store.fail_interrupted_operations(DAEMON_RESTARTED).unwrap();
    assert_eq!(failed, vec![other.id.clone()]);
    let other = store.get_operation(&other.id).unwrap();
    assert_eq!(other.state, OperationState::Failed);
    assert_eq!(other.error, Some(json!({"message": "daemon restarted"})));
    assert_eq!(store.get_operation(&deploy.id).unwrap(), done);
    assert!(
        store
            .fail_interrupted_operations(DAEMON_RESTARTED)
            .unwrap()
            .is_empty()
    );

    // Pruning removes finished operations only.
    let running = store.create_operation("deploy", "op-svc").unwrap();
    let removed = store
        .prune_operations(Timestamp::now().saturating_sub(TimeDelta::hours(-1)))
        .unwrap();
    assert_eq!(removed, 2);
    assert_eq!(ids(None), vec![running.id.clone()]);
    store
        .finish_operation(&running.id, &OperationOutcome::Failed(json!({})))
        .unwrap();
    store
        .prune_operations(Timestamp::now().saturating_sub(TimeDelta::hours(-1)))
        .unwrap();
}

fn secrets(store: &dyn Store) {
    let first = store.put_secret("DB_PASSWORD", b"\x00sealed-1").unwrap();
    assert_eq!(first.ciphertext, b"\x00sealed-1");
    assert_eq!(first.created_at, first.updated_at);
    assert_eq!(store.get_secret("DB_PASSWORD").unwrap(), first);
    let replaced = store.put_secret("DB_PASSWORD", b"sealed-2").unwrap();
    assert_eq!(replaced.created_at, first.created_at);
    assert!(replaced.updated_at >= first.updated_at);
    assert_eq!(store.get_secret("DB_PASSWORD").unwrap(), replaced);
    store.put_secret("API_KEY", b"sealed-3").unwrap();
    let names: Vec<_> = store
        .list_secrets()
        .unwrap()
        .into_iter()
        .map(|secret| secret.name)
        .collect();
    assert_eq!(names, ["API_KEY", "DB_PASSWORD"]);
    store.delete_secret("API_KEY").unwrap();
    assert!(matches!(
        store.delete_secret("API_KEY"),
        Err(StoreError::NotFound { kind: RecordKind::Secret, key }) if key == "API_KEY"
    ));
    assert!(matches!(
        store.get_secret("API_KEY"),
        Err(StoreError::NotFound { .. })
    ));
    store.delete_secret("DB_PASSWORD").unwrap();
    assert!(store.list_secrets().unwrap().is_empty());
}

fn registry_credentials(store: &dyn Store) {
    let first = store
        .put_registry_credential("registry.example:5000", b"sealed-1")
        .unwrap();
    assert_eq!(
        store
            .get_registry_credential("registry.example:5000")
            .unwrap(),
        first
    );
    let replaced = store
        .put_registry_credential("registry.example:5000", b"sealed-2")
        .unwrap();
    assert_eq!(replaced.created_at, first.created_at);
    assert_eq!(replaced.ciphertext, b"sealed-2");
    store.put_registry_credential("a.example", b"x").unwrap();
    let hosts: Vec<_> = store
        .list_registry_credentials()
        .unwrap()
        .into_iter()
        .map(|credential| credential.registry)
        .collect();
    assert_eq!(hosts, ["a.example", "registry.example:5000"]);
    store.delete_registry_credential("a.example").unwrap();
    assert!(matches!(
        store.get_registry_credential("a.example"),
        Err(StoreError::NotFound {
            kind: RecordKind::RegistryCredential,
            ..
        })
    ));
    assert!(matches!(
        store.delete_registry_credential("a.example"),
        Err(StoreError::NotFound { .. })
    ));
    store
        .delete_registry_credential("registry.example:5000")
        .unwrap();
}
