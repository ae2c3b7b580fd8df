//! [`MemStore`]: the [`Store`] in memory, for control-plane tests. Same semantics as the SQLite
//! store (conflicts, numbering, sequence numbers), nothing persisted.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

use serde_json::json;

use super::{
    CommittedRevision, EventRecord, EventRetention, NewEvent, NewService, OperationOutcome,
    OperationRecord, OperationState, ProgressLine, RecordKind, RegistryCredentialRecord,
    RevisionCommit, RevisionRecord, SecretRecord, ServiceRecord, Store, StoreError, Timestamp,
    new_operation_id, revision_key,
};

/// The [`Store`] in memory. Every method takes one lock, so each call is atomic.
#[derive(Debug, Default)]
pub struct MemStore {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    services: BTreeMap<String, ServiceRecord>,
    revisions: HashMap<String, Vec<RevisionRecord>>,
    events: BTreeMap<u64, EventRecord>,
    last_event_seq: u64,
    /// Insertion order is creation order.
    operations: Vec<OperationRecord>,
    secrets: BTreeMap<String, SecretRecord>,
    registry_credentials: BTreeMap<String, RegistryCredentialRecord>,
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held happened between whole-record assignments: the maps
        // stay consistent enough for tests, so carry on.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl State {
    fn service_mut(&mut self, name: &str) -> Result<&mut ServiceRecord, StoreError> {
        self.services
            .get_mut(name)
            .ok_or_else(|| StoreError::not_found(RecordKind::Service, name))
    }

    fn push_event(&mut self, event: &NewEvent, time: Timestamp) -> EventRecord {
        self.last_event_seq += 1;
        let record = EventRecord {
            seq: self.last_event_seq,
            service: event.service.clone(),
            time,
            kind: event.kind.clone(),
            message: event.message.clone(),
            fields: event.fields.clone(),
        };
        self.events.insert(record.seq, record.clone());
        record
    }

    fn operation_mut(&mut self, id: &str) -> Result<&mut OperationRecord, StoreError> {
        self.operations
            .iter_mut()
            .find(|operation| operation.id == id)
            .ok_or_else(|| StoreError::not_found(RecordKind::Operation, id))
    }
}

fn check_generation(record: &ServiceRecord, expected: Option<u64>) -> Result<(), StoreError> {
    match expected {
        Some(expected) if expected != record.generation => Err(StoreError::generation_mismatch(
            &record.name,
            expected,
            record.generation,
        )),
        _ => Ok(()),
    }
}

impl Store for MemStore {
    fn create_service(&self, new: &NewService) -> Result<ServiceRecord, StoreError> {
        let mut state = self.lock();
        if state.services.contains_key(&new.name) {
            return Err(StoreError::already_exists(RecordKind::Service, &new.name));
        }
        let now = Timestamp::now();
        let record = ServiceRecord {
            name: new.name.clone(),
            generation: 1,
            current_revision: None,
            state: new.state.clone(),
            doc: new.doc.clone(),
            created_at: now,
            updated_at: now,
        };
        state.services.insert(new.name.clone(), record.clone());
        state.revisions.insert(new.name.clone(), Vec::new());
        Ok(record)
    }

    fn get_service(&self, name: &str) -> Result<ServiceRecord, StoreError> {
        self.lock()
            .services
            .get(name)
            .cloned()
            .ok_or_else(|| StoreError::not_found(RecordKind::Service, name))
    }

    fn list_services(&self) -> Result<Vec<ServiceRecord>, StoreError> {
        Ok(self.lock().services.values().cloned().collect())
    }

    fn put_service(
        &self,
        record: &ServiceRecord,
        expected_generation: u64,
    ) -> Result<ServiceRecord, StoreError> {
        let mut state = self.lock();
        let revision_count = state.revisions.get(&record.name).map_or(0, Vec::len) as u64;
        let stored = state.service_mut(&record.name)?;
        check_generation(stored, Some(expected_generation))?;
        if let Some(number) = record.current_revision
            && (number == 0 || number > revision_count)
        {
            return Err(StoreError::not_found(
                RecordKind::Revision,
                revision_key(&record.name, number),
            ));
        }
        stored.generation += 1;
        stored.current_revision = record.current_revision;
        stored.state = record.state.clone();
        stored.doc = record.doc.clone();
        stored.updated_at = Timestamp::now();
        Ok(stored.clone())
    }

    fn delete_service(
        &self,
        name: &str,
        expected_generation: Option<u64>,
    ) -> Result<(), StoreError> {
        let mut state = self.lock();
        check_generation(state.service_mut(name)?, expected_generation)?;
        state.services.remove(name);
        state.revisions.remove(name);
        Ok(())
    }

    fn commit_revision(&self, commit: &RevisionCommit) -> Result<CommittedRevision, StoreError> {
        let mut state = self.lock();
        check_generation(
            state.service_mut(&commit.service)?,
            commit.expected_generation,
        )?;
        let now = Timestamp::now();
        let revisions = state.revisions.entry(commit.service.clone()).or_default();
        let revision = RevisionRecord {
            service: commit.service.clone(),
            number: revisions.len() as u64 + 1,
            created_at: now,
            cause: commit.cause.clone(),
            doc: commit.doc.clone(),
        };
        revisions.push(revision.clone());
        let service = state.service_mut(&commit.service)?;
        service.generation += 1;
        if commit.make_current {
            service.current_revision = Some(revision.number);
        }
        if let Some(doc) = &commit.service_doc {
            service.doc = doc.clone();
        }
        if let Some(new_state) = &commit.state {
            service.state = new_state.clone();
        }
        service.updated_at = now;
        let service = service.clone();
        let event = commit
            .event
            .as_ref()
            .map(|event| state.push_event(event, now));
        Ok(CommittedRevision {
            service,
            revision,
            event,
        })
    }

    fn get_revision(&self, service: &str, number: u64) -> Result<RevisionRecord, StoreError> {
        let state = self.lock();
        let revisions = state
            .revisions
            .get(service)
            .ok_or_else(|| StoreError::not_found(RecordKind::Service, service))?;
        number
            .checked_sub(1)
            .and_then(|index| revisions.get(index as usize))
            .cloned()
            .ok_or_else(|| {
                StoreError::not_found(RecordKind::Revision, revision_key(service, number))
            })
    }

    fn list_revisions(&self, service: &str) -> Result<Vec<RevisionRecord>, StoreError> {
        self.lock()
            .revisions
            .get(service)
            .cloned()
            .ok_or_else(|| StoreError::not_found(RecordKind::Service, service))
    }

    fn append_event(&self, event: &NewEvent) -> Result<EventRecord, StoreError> {
        Ok(self.lock().push_event(event, Timestamp::now()))
    }

    fn list_events(
        &self,
        service: &str,
        since_seq: u64,
        limit: usize,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let state = self.lock();
        Ok(state
            .events
            .range(since_seq.saturating_add(1)..)
            .map(|(_, event)| event)
            .filter(|event| event.service == service)
            .take(limit)
            .cloned()
            .collect())
    }

    fn prune_events(&self, retention: &EventRetention) -> Result<u64, StoreError> {
        let mut state = self.lock();
        let before = state.events.len();
        if let Some(cutoff) = retention.older_than {
            state.events.retain(|_, event| event.time >= cutoff);
        }
        if let Some(keep) = retention.keep_per_service {
            let mut seen: HashMap<String, usize> = HashMap::new();
            let mut doomed = Vec::new();
            for (seq, event) in state.events.iter().rev() {
                let count = seen.entry(event.service.clone()).or_default();
                *count += 1;
                if *count > keep {
                    doomed.push(*seq);
                }
            }
            for seq in doomed {
                state.events.remove(&seq);
            }
        }
        Ok((before - state.events.len()) as u64)
    }

    fn create_operation(&self, kind: &str, service: &str) -> Result<OperationRecord, StoreError> {
        let mut state = self.lock();
        let mut id = new_operation_id()?;
        while state.operations.iter().any(|operation| operation.id == id) {
            id = new_operation_id()?;
        }
        let now = Timestamp::now();
        let record = OperationRecord {
            id,
            kind: kind.to_owned(),
            service: service.to_owned(),
            state: OperationState::Running,
            created_at: now,
            updated_at: now,
            progress: Vec::new(),
            result: None,
            error: None,
        };
        state.operations.push(record.clone());
        Ok(record)
    }

    fn get_operation(&self, id: &str) -> Result<OperationRecord, StoreError> {
        self.lock()
            .operation_mut(id)
            .map(|operation| operation.clone())
    }

    fn list_operations(&self, service: Option<&str>) -> Result<Vec<OperationRecord>, StoreError> {
        Ok(self
            .lock()
            .operations
            .iter()
            .filter(|operation| service.is_none_or(|service| operation.service == service))
            .cloned()
            .collect())
    }

    fn append_operation_progress(&self, id: &str, line: &str) -> Result<(), StoreError> {
        let mut state = self.lock();
        let operation = state.operation_mut(id)?;
        if operation.state != OperationState::Running {
            return Err(StoreError::conflict(
                RecordKind::Operation,
                id,
                format!("already {}", operation.state),
            ));
        }
        let now = Timestamp::now();
        operation.progress.push(ProgressLine {
            time: now,
            line: line.to_owned(),
        });
        operation.updated_at = now;
        Ok(())
    }

    fn finish_operation(
        &self,
        id: &str,
        outcome: &OperationOutcome,
    ) -> Result<OperationRecord, StoreError> {
        let mut state = self.lock();
        let operation = state.operation_mut(id)?;
        if operation.state != OperationState::Running {
            return Err(StoreError::conflict(
                RecordKind::Operation,
                id,
                format!("already {}", operation.state),
            ));
        }
        match outcome {
            OperationOutcome::Succeeded(result) => {
                operation.state = OperationState::Succeeded;
                operation.result = Some(result.clone());
            }
            OperationOutcome::Failed(error) => {
                operation.state = OperationState::Failed;
                operation.error = Some(error.clone());
            }
        }
        operation.updated_at = Timestamp::now();
        Ok(operation.clone())
    }

    fn fail_interrupted_operations(&self, reason: &str) -> Result<Vec<String>, StoreError> {
        let mut state = self.lock();
        let now = Timestamp::now();
        let mut failed = Vec::new();
        for operation in &mut state.operations {
            if operation.state == OperationState::Running {
                operation.state = OperationState::Failed;
                operation.error = Some(json!({ "message": reason }));
                operation.updated_at = now;
                failed.push(operation.id.clone());
            }
        }
        Ok(failed)
    }

    fn prune_operations(&self, before: Timestamp) -> Result<u64, StoreError> {
        let mut state = self.lock();
        let count = state.operations.len();
        state.operations.retain(|operation| {
            operation.state == OperationState::Running || operation.updated_at >= before
        });
        Ok((count - state.operations.len()) as u64)
    }

    fn put_secret(&self, name: &str, ciphertext: &[u8]) -> Result<SecretRecord, StoreError> {
        let mut state = self.lock();
        let now = Timestamp::now();
        let created_at = state.secrets.get(name).map_or(now, |old| old.created_at);
        let record = SecretRecord {
            name: name.to_owned(),
            ciphertext: ciphertext.to_vec(),
            created_at,
            updated_at: now,
        };
        state.secrets.insert(name.to_owned(), record.clone());
        Ok(record)
    }

    fn get_secret(&self, name: &str) -> Result<SecretRecord, StoreError> {
        self.lock()
            .secrets
            .get(name)
            .cloned()
            .ok_or_else(|| StoreError::not_found(RecordKind::Secret, name))
    }

    fn list_secrets(&self) -> Result<Vec<SecretRecord>, StoreError> {
        Ok(self.lock().secrets.values().cloned().collect())
    }

    fn delete_secret(&self, name: &str) -> Result<(), StoreError> {
        self.lock()
            .secrets
            .remove(name)
            .map(drop)
            .ok_or_else(|| StoreError::not_found(RecordKind::Secret, name))
    }

    fn put_registry_credential(
        &self,
        registry: &str,
        ciphertext: &[u8],
    ) -> Result<RegistryCredentialRecord, StoreError> {
        let mut state = self.lock();
        let now = Timestamp::now();
        let created_at = state
            .registry_credentials
            .get(registry)
            .map_or(now, |old| old.created_at);
        let record = RegistryCredentialRecord {
            registry: registry.to_owned(),
            ciphertext: ciphertext.to_vec(),
            created_at,
            updated_at: now,
        };
        state
            .registry_credentials
            .insert(registry.to_owned(), record.clone());
        Ok(record)
    }

    fn get_registry_credential(
        &self,
        registry: &str,
    ) -> Result<RegistryCredentialRecord, StoreError> {
        self.lock()
            .registry_credentials
            .get(registry)
            .cloned()
            .ok_or_else(|| StoreError::not_found(RecordKind::RegistryCredential, registry))
    }

    fn list_registry_credentials(&self) -> Result<Vec<RegistryCredentialRecord>, StoreError> {
        Ok(self.lock().registry_credentials.values().cloned().collect())
    }

    fn delete_registry_credential(&self, registry: &str) -> Result<(), StoreError> {
        self.lock()
            .registry_credentials
            .remove(registry)
            .map(drop)
            .ok_or_else(|| StoreError::not_found(RecordKind::RegistryCredential, registry))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_store_passes_the_conformance_suite() {
        crate::store::conformance::run(&MemStore::new());
    }
}
