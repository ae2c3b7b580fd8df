//! The daemon's state: services, their immutable revisions, events, long-running operations,
//! secrets and registry credentials, written transactionally.
//!
//! Everything goes through the [`Store`] trait so that the embedded [`SqliteStore`] (one file,
//! `state.db`, in the data dir) can be replaced by a shared database when lull spans several
//! machines, and so that control-plane tests can use the in-memory [`MemStore`]. Both
//! implementations pass the same conformance suite.
//!
//! The store is schema-light: the service model lives elsewhere, so service and revision
//! definitions are stored as JSON documents ([`serde_json::Value`]) inside typed envelopes that
//! carry what the store itself must enforce: primary keys, the generation used for optimistic
//! concurrency, revision numbering, event sequence numbers and operation states.
//!
//! # Invariants every implementation keeps
//! - A service's `generation` starts at 1 and grows by one with every write to it; a write that
//!   names an expected generation fails with [`StoreError::Conflict`] unless it matches.
//! - Revisions are append-only and numbered 1, 2, 3, ... per service without gaps;
//!   [`Store::commit_revision`] assigns the next number and makes it the service's current
//!   revision in one transaction, so a crash leaves either both or neither.
//! - Event sequence numbers are global, strictly increasing and never reused, even after pruning.
//! - An operation leaves `running` exactly once, for `succeeded` or `failed`.
//!
//! # Blocking
//! The methods are synchronous. [`SqliteStore`] waits for `fsync` on every commit (a few
//! milliseconds on a disk, more under load): async callers run its writes under
//! `tokio::task::spawn_blocking`. [`MemStore`] never blocks for long.

mod memory;
mod sqlite;

#[cfg(test)]
mod conformance;

use std::fmt;
use std::path::PathBuf;

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use memory::MemStore;
pub use sqlite::{SCHEMA_VERSION, STATE_FILE_NAME, SqliteStore};

/// The error of [`StoreError::Backend`]'s source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The message operations left `running` by a crashed daemon fail with.
pub const DAEMON_RESTARTED: &str = "daemon restarted";

/// What went wrong in the store. Every variant names the record or file concerned.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{kind} {key} not found")]
    NotFound { kind: RecordKind, key: String },
    #[error("{kind} {key} already exists")]
    AlreadyExists { kind: RecordKind, key: String },
    /// An optimistic-concurrency check failed, or a write is not allowed in the record's state.
    #[error("{kind} {key}: conflict: {detail}")]
    Conflict {
        kind: RecordKind,
        key: String,
        detail: String,
    },
    /// The store's file, or a record in it, cannot be read back as written.
    #[error("store {location} is corrupt: {detail}")]
    Corrupt { location: String, detail: String },
    #[error("store {path} has schema version {found}, newer than this lull's {supported}")]
    UnsupportedSchema {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The database itself failed (locked past the busy timeout, disk full, ...).
    #[error("store backend failed while {context}")]
    Backend {
        context: String,
        #[source]
        source: BoxError,
    },
}

impl StoreError {
    pub fn not_found(kind: RecordKind, key: impl Into<String>) -> Self {
        StoreError::NotFound {
            kind,
            key: key.into(),
        }
    }

    pub fn already_exists(kind: RecordKind, key: impl Into<String>) -> Self {
        StoreError::AlreadyExists {
            kind,
            key: key.into(),
        }
    }

    pub fn conflict(kind: RecordKind, key: impl Into<String>, detail: impl Into<String>) -> Self {
        StoreError::Conflict {
            kind,
            key: key.into(),
            detail: detail.into(),
        }
    }

    fn generation_mismatch(service: &str, expected: u64, found: u64) -> Self {
        Self::conflict(
            RecordKind::Service,
            service,
            format!("expected generation {expected}, found {found}"),
        )
    }
}

/// The kinds of record the store keeps, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    Service,
    Revision,
    Event,
    Operation,
    Secret,
    RegistryCredential,
}

impl fmt::Display for RecordKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RecordKind::Service => "service",
            RecordKind::Revision => "revision",
            RecordKind::Event => "event",
            RecordKind::Operation => "operation",
            RecordKind::Secret => "secret",
            RecordKind::RegistryCredential => "registry credential",
        })
    }
}

/// A point in time, UTC, with millisecond precision: what the store records and how it prints
/// (`2026-11-26T12:31:07.123Z`, RFC 3339). Its text form sorts like the time it stands for.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(DateTime<Utc>);

impl Timestamp {
    pub fn now() -> Self {
        Self::from_datetime(Utc::now())
    }

    /// `time` truncated to the millisecond.
    pub fn from_datetime(time: DateTime<Utc>) -> Self {
        let millis = time.timestamp_millis();
        Timestamp(DateTime::from_timestamp_millis(millis).unwrap_or(time))
    }

    /// Parses an RFC 3339 time in any offset.
    pub fn parse(text: &str) -> Result<Self, chrono::ParseError> {
        Ok(Self::from_datetime(
            DateTime::parse_from_rfc3339(text)?.with_timezone(&Utc),
        ))
    }

    pub fn as_datetime(&self) -> DateTime<Utc> {
        self.0
    }

    /// This time minus `delta`, saturating at the earliest representable time.
    pub fn saturating_sub(&self, delta: TimeDelta) -> Self {
        Timestamp(
            self.0
                .checked_sub_signed(delta)
                .unwrap_or(DateTime::<Utc>::MIN_UTC),
        )
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.to_rfc3339_opts(SecondsFormat::Millis, true))
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Timestamp::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A service as stored: its definition is the opaque `doc`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceRecord {
    pub name: String,
    /// 1 on creation, one more after each write; the token for optimistic concurrency.
    pub generation: u64,
    /// The revision made current last, `None` before the first.
    pub current_revision: Option<u64>,
    /// e.g. "active", "paused", "deleted"; the store does not interpret it.
    pub state: String,
    pub doc: Value,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// What [`Store::create_service`] needs.
#[derive(Debug, Clone, PartialEq)]
pub struct NewService {
    pub name: String,
    pub state: String,
    pub doc: Value,
}

/// One immutable revision of a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevisionRecord {
    pub service: String,
    /// 1, 2, 3, ... per service, without gaps.
    pub number: u64,
    pub created_at: Timestamp,
    /// Why it was made: "create", "config change", "secret X changed", "rollback to 3", ...
    pub cause: String,
    pub doc: Value,
}

/// A new revision and the service update that makes it current, applied in one transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct RevisionCommit {
    pub service: String,
    /// `Some(g)`: fail with a conflict unless the service is at generation `g`.
    pub expected_generation: Option<u64>,
    pub doc: Value,
    pub cause: String,
    /// The service's new document; `None` keeps the one it has.
    pub service_doc: Option<Value>,
    /// The service's new state; `None` keeps the one it has.
    pub state: Option<String>,
    /// An event recorded in the same transaction (e.g. "revision created").
    pub event: Option<NewEvent>,
    /// Whether the new revision becomes the service's current one at once. The daemon commits
    /// with `false` and makes a revision current when it serves (`put_service`).
    pub make_current: bool,
}

/// What [`Store::commit_revision`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct CommittedRevision {
    pub service: ServiceRecord,
    pub revision: RevisionRecord,
    pub event: Option<EventRecord>,
}

/// One lifecycle event of a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Global, strictly increasing, never reused.
    pub seq: u64,
    pub service: String,
    pub time: Timestamp,
    /// e.g. "deploy.started", "instance.restarted".
    pub kind: String,
    pub message: String,
    /// Structured details (exit code, revision, instance id, ...); `{}` when there are none.
    pub fields: Value,
}

/// What [`Store::append_event`] needs; the store assigns the sequence number and the time.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub service: String,
    pub kind: String,
    pub message: String,
    pub fields: Value,
}

/// Which events [`Store::prune_events`] removes: those older than `older_than`, and, per
/// service, all but the newest `keep_per_service`. `None` leaves that rule out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventRetention {
    pub older_than: Option<Timestamp>,
    pub keep_per_service: Option<usize>,
}

/// Where a long-running operation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OperationState {
    Running,
    Succeeded,
    Failed,
}

impl OperationState {
    pub fn as_str(&self) -> &'static str {
        match self {
            OperationState::Running => "running",
            OperationState::Succeeded => "succeeded",
            OperationState::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "running" => Some(OperationState::Running),
            "succeeded" => Some(OperationState::Succeeded),
            "failed" => Some(OperationState::Failed),
            _ => None,
        }
    }
}

impl fmt::Display for OperationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One line of an operation's progress log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressLine {
    pub time: Timestamp,
    pub line: String,
}

/// A long-running operation (deploy, build, ...) and its progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperationRecord {
    /// "op-" and 12 hex digits.
    pub id: String,
    pub kind: String,
    pub service: String,
    pub state: OperationState,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub progress: Vec<ProgressLine>,
    /// Set when it succeeded.
    pub result: Option<Value>,
    /// Set when it failed.
    pub error: Option<Value>,
}

/// How an operation ended.
#[derive(Debug, Clone, PartialEq)]
pub enum OperationOutcome {
    Succeeded(Value),
    Failed(Value),
}

/// An encrypted secret as stored (see `crate::secrets` for sealing and opening).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRecord {
    pub name: String,
    pub ciphertext: Vec<u8>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// Encrypted credentials for one registry host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryCredentialRecord {
    pub registry: String,
    pub ciphertext: Vec<u8>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// A fresh operation id: "op-" and 12 random hex digits.
pub fn new_operation_id() -> Result<String, StoreError> {
    let mut bytes = [0u8; 6];
    getrandom::fill(&mut bytes).map_err(|error| StoreError::Backend {
        context: "drawing a random operation id".into(),
        source: Box::new(error),
    })?;
    Ok(format!("op-{}", hex::encode(bytes)))
}

/// The daemon's state. All methods are synchronous (see the module docs on blocking) and every
/// write is one transaction: it happens completely or not at all, crash or no crash.
pub trait Store: Send + Sync + fmt::Debug {
    // Services.

    /// Creates a service at generation 1 with no revision; fails if the name is taken.
    fn create_service(&self, new: &NewService) -> Result<ServiceRecord, StoreError>;
    fn get_service(&self, name: &str) -> Result<ServiceRecord, StoreError>;
    /// All services, ordered by name.
    fn list_services(&self) -> Result<Vec<ServiceRecord>, StoreError>;
    /// Writes `record`'s state, doc and current revision (which must name an existing revision:
    /// that is how a rollback moves it) if the service is at `expected_generation`. The
    /// record's own generation and times are ignored; the stored record is returned.
    fn put_service(
        &self,
        record: &ServiceRecord,
        expected_generation: u64,
    ) -> Result<ServiceRecord, StoreError>;
    /// Deletes a service and its revisions (its events and operations stay, as history).
    fn delete_service(
        &self,
        name: &str,
        expected_generation: Option<u64>,
    ) -> Result<(), StoreError>;

    // Revisions.

    /// Appends the service's next revision and makes it current, in one transaction.
    fn commit_revision(&self, commit: &RevisionCommit) -> Result<CommittedRevision, StoreError>;
    fn get_revision(&self, service: &str, number: u64) -> Result<RevisionRecord, StoreError>;
    /// A service's revisions, oldest first; fails if the service does not exist.
    fn list_revisions(&self, service: &str) -> Result<Vec<RevisionRecord>, StoreError>;

    // Events.

    fn append_event(&self, event: &NewEvent) -> Result<EventRecord, StoreError>;
    /// A service's events with `seq > since_seq`, oldest first, at most `limit`.
    fn list_events(
        &self,
        service: &str,
        since_seq: u64,
        limit: usize,
    ) -> Result<Vec<EventRecord>, StoreError>;
    /// Removes the events `retention` rules out; returns how many.
    fn prune_events(&self, retention: &EventRetention) -> Result<u64, StoreError>;

    // Operations.

    /// Starts an operation in state `running` with a fresh id.
    fn create_operation(&self, kind: &str, service: &str) -> Result<OperationRecord, StoreError>;
    fn get_operation(&self, id: &str) -> Result<OperationRecord, StoreError>;
    /// Operations, oldest first, of one service or of all.
    fn list_operations(&self, service: Option<&str>) -> Result<Vec<OperationRecord>, StoreError>;
    /// Appends a progress line; fails with a conflict once the operation has finished.
    fn append_operation_progress(&self, id: &str, line: &str) -> Result<(), StoreError>;
    /// Ends a running operation; fails with a conflict if it has already ended.
    fn finish_operation(
        &self,
        id: &str,
        outcome: &OperationOutcome,
    ) -> Result<OperationRecord, StoreError>;
    /// Marks every operation still `running` as failed with `{"message": reason}`: called once
    /// at startup, with [`DAEMON_RESTARTED`], for the operations a crashed daemon left behind.
    /// Returns their ids.
    fn fail_interrupted_operations(&self, reason: &str) -> Result<Vec<String>, StoreError>;
    /// Removes finished operations last updated before `before`; returns how many.
    fn prune_operations(&self, before: Timestamp) -> Result<u64, StoreError>;

    // Secrets and registry credentials (ciphertext only; see `crate::secrets`).

    /// Creates or replaces a secret (keeping its creation time).
    fn put_secret(&self, name: &str, ciphertext: &[u8]) -> Result<SecretRecord, StoreError>;
    fn get_secret(&self, name: &str) -> Result<SecretRecord, StoreError>;
    /// All secrets, ordered by name.
    fn list_secrets(&self) -> Result<Vec<SecretRecord>, StoreError>;
    fn delete_secret(&self, name: &str) -> Result<(), StoreError>;

    fn put_registry_credential(
        &self,
        registry: &str,
        ciphertext: &[u8],
    ) -> Result<RegistryCredentialRecord, StoreError>;
    fn get_registry_credential(
        &self,
        registry: &str,
    ) -> Result<RegistryCredentialRecord, StoreError>;
    /// All registry credentials, ordered by registry host.
    fn list_registry_credentials(&self) -> Result<Vec<RegistryCredentialRecord>, StoreError>;
    fn delete_registry_credential(&self, registry: &str) -> Result<(), StoreError>;
}

/// The key of a revision in error messages: "SERVICE/NUMBER".
fn revision_key(service: &str, number: u64) -> String {
    format!("{service}/{number}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_print_rfc3339_utc_milliseconds_and_round_trip() {
        let time = Timestamp::parse("2026-11-26T13:31:07.123456+01:00").unwrap();
        assert_eq!(time.to_string(), "2026-11-26T12:31:07.123Z");
        assert_eq!(Timestamp::parse(&time.to_string()).unwrap(), time);
        let json = serde_json::to_string(&time).unwrap();
        assert_eq!(json, "\"2026-11-26T12:31:07.123Z\"");
        assert_eq!(serde_json::from_str::<Timestamp>(&json).unwrap(), time);
        let earlier = time.saturating_sub(TimeDelta::milliseconds(124));
        assert_eq!(earlier.to_string(), "2026-11-26T12:31:06.999Z");
        assert!(earlier.to_string() < time.to_string());
    }

    #[test]
    fn operation_ids_are_op_and_12_hex_digits_and_differ() {
        let a = new_operation_id().unwrap();
        let b = new_operation_id().unwrap();
        assert_ne!(a, b);
        let digits = a.strip_prefix("op-").unwrap();
        assert_eq!(digits.len(), 12, "{a}");
        assert!(digits.chars().all(|c| c.is_ascii_hexdigit()), "{a}");
    }

    #[test]
    fn errors_name_the_record() {
        let error = StoreError::generation_mismatch("web", 3, 4);
        assert_eq!(
            error.to_string(),
            "service web: conflict: expected generation 3, found 4"
        );
        let error = StoreError::not_found(RecordKind::Revision, revision_key("web", 7));
        assert_eq!(error.to_string(), "revision web/7 not found");
    }
}
