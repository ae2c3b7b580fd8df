//! [`SqliteStore`]: the [`Store`] in one SQLite file, `<data_dir>/state.db`.
//!
//! Why SQLite: two decades of crash-safety testing; WAL with `synchronous=FULL` makes every
//! commit atomic and durable once it returns; operators can inspect the file with the `sqlite3`
//! shell; and the schema maps table for table onto a shared SQL database later.
//!
//! The file is created with mode 0600 (SQLite gives its `-wal` and `-shm` files the same mode).
//! On open the store runs `PRAGMA quick_check` and refuses a damaged file with
//! [`StoreError::Corrupt`], then brings the schema up to [`SCHEMA_VERSION`] (kept in
//! `PRAGMA user_version`), one transaction per migration. Writes take the write lock at their
//! start (`BEGIN IMMEDIATE`), so a concurrent reader such as the `sqlite3` shell never makes a
//! write fail half way; a busy database is waited for up to [`BUSY_TIMEOUT`].

use std::fs::{self, DirBuilder, OpenOptions, Permissions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{
    Connection, ErrorCode, OptionalExtension, Transaction, TransactionBehavior, params,
};
use serde_json::{Value, json};

use super::{
    CommittedRevision, EventRecord, EventRetention, NewEvent, NewService, OperationOutcome,
    OperationRecord, OperationState, ProgressLine, RecordKind, RegistryCredentialRecord,
    RevisionCommit, RevisionRecord, SecretRecord, ServiceRecord, Store, StoreError, Timestamp,
    new_operation_id, revision_key,
};

/// The store's file name inside the data dir.
pub const STATE_FILE_NAME: &str = "state.db";

/// The schema version this lull writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: u32 = 1;

/// How long a write waits for another connection's lock before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// `MIGRATIONS[n]` takes the schema from version n to n + 1.
const MIGRATIONS: &[&str] = &[
    // 0 -> 1: the first schema.
    "
    CREATE TABLE services (
        name             TEXT PRIMARY KEY,
        generation       INTEGER NOT NULL CHECK (generation >= 1),
        current_revision INTEGER,
        state            TEXT NOT NULL,
        doc              TEXT NOT NULL CHECK (json_valid(doc)),
        created_at       TEXT NOT NULL,
        updated_at       TEXT NOT NULL
    ) STRICT;
    CREATE TABLE revisions (
        service    TEXT NOT NULL REFERENCES services (name) ON DELETE CASCADE,
        number     INTEGER NOT NULL CHECK (number >= 1),
        created_at TEXT NOT NULL,
        cause      TEXT NOT NULL,
        doc        TEXT NOT NULL CHECK (json_valid(doc)),
        PRIMARY KEY (service, number)
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE events (
        seq     INTEGER PRIMARY KEY AUTOINCREMENT,
        service TEXT NOT NULL,
        time    TEXT NOT NULL,
        kind    TEXT NOT NULL,
        message TEXT NOT NULL,
        fields  TEXT NOT NULL CHECK (json_valid(fields))
    ) STRICT;
    CREATE INDEX events_by_service ON events (service, seq);
    CREATE INDEX events_by_time ON events (time);
    CREATE TABLE operations (
        id         TEXT PRIMARY KEY,
        kind       TEXT NOT NULL,
        service    TEXT NOT NULL,
        state      TEXT NOT NULL CHECK (state IN ('running', 'succeeded', 'failed')),
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        result     TEXT CHECK (result IS NULL OR json_valid(result)),
        error      TEXT CHECK (error IS NULL OR json_valid(error))
    ) STRICT;
    CREATE INDEX operations_by_service ON operations (service, created_at);
    CREATE TABLE operation_progress (
        operation_id TEXT NOT NULL REFERENCES operations (id) ON DELETE CASCADE,
        line_no      INTEGER NOT NULL,
        time         TEXT NOT NULL,
        line         TEXT NOT NULL,
        PRIMARY KEY (operation_id, line_no)
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE secrets (
        name       TEXT PRIMARY KEY,
        ciphertext BLOB NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    ) STRICT;
    CREATE TABLE registry_credentials (
        registry   TEXT PRIMARY KEY,
        ciphertext BLOB NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    ) STRICT;
    ",
];

/// The [`Store`] in a SQLite file: one connection behind a mutex.
#[derive(Debug)]
pub struct SqliteStore {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl SqliteStore {
    /// Opens (creating if needed) `<data_dir>/state.db`; creates `data_dir` with mode 0700 if
    /// it is missing.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(data_dir)
            .map_err(|source| StoreError::Io {
                action: "create the data dir",
                path: data_dir.to_owned(),
                source,
            })?;
        Self::open_file(&data_dir.join(STATE_FILE_NAME))
    }

    /// Opens (creating if needed) the store in the file `path`: checks its integrity and
    /// migrates its schema.
    pub fn open_file(path: &Path) -> Result<Self, StoreError> {
        create_private_file(path)?;
        let conn = Connection::open(path).map_err(|error| sql_error(path, "opening", error))?;
        let store = SqliteStore {
            path: path.to_owned(),
            conn: Mutex::new(conn),
        };
        {
            let conn = store.lock();
            conn.busy_timeout(BUSY_TIMEOUT)
                .map_err(|error| store.error("setting the busy timeout", error))?;
            // WAL first: opening in WAL mode replays a WAL a crash left behind.
            let mode: String = conn
                .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
                .map_err(|error| store.error("enabling WAL", error))?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Err(StoreError::Backend {
                    context: format!("enabling WAL on {}", path.display()),
                    source: format!("journal mode stayed {mode}").into(),
                });
            }
            conn.pragma_update(None, "synchronous", "FULL")
                .map_err(|error| store.error("setting synchronous=FULL", error))?;
            conn.pragma_update(None, "foreign_keys", "ON")
                .map_err(|error| store.error("enabling foreign keys", error))?;
            quick_check(&store.path, &conn)?;
        }
        store.migrate()?;
        tracing::debug!(path = %path.display(), "state store open");
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `PRAGMA quick_check`; a damaged file is [`StoreError::Corrupt`].
    pub fn quick_check(&self) -> Result<(), StoreError> {
        quick_check(&self.path, &self.lock())
    }

    /// The schema version in the file.
    pub fn schema_version(&self) -> Result<u32, StoreError> {
        schema_version(&self.path, &self.lock())
    }

    fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let supported = MIGRATIONS.len() as u32;
        loop {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(|error| self.error("starting a migration", error))?;
            // Read inside the write transaction: another process may have migrated meanwhile.
            let version = schema_version(&self.path, &tx)?;
            if version > supported {
                return Err(StoreError::UnsupportedSchema {
                    path: self.path.clone(),
                    found: version,
                    supported,
                });
            }
            if version == supported {
                return Ok(());
            }
            tx.execute_batch(MIGRATIONS[version as usize])
                .map_err(|error| {
                    self.error(format!("migrating to version {}", version + 1), error)
                })?;
            tx.pragma_update(None, "user_version", version + 1)
                .map_err(|error| self.error("recording the schema version", error))?;
            tx.commit().map_err(|error| {
                self.error(format!("committing version {}", version + 1), error)
            })?;
            tracing::info!(path = %self.path.display(), version = version + 1, "state store schema migrated");
        }
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while the lock was held dropped its transaction, which rolled back: the
        // connection is fine to reuse.
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn error(&self, context: impl Into<String>, error: rusqlite::Error) -> StoreError {
        sql_error(&self.path, &context.into(), error)
    }

    /// Runs `body` in an immediate (write-locking) transaction and commits it.
    fn write<T>(
        &self,
        context: &str,
        body: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|error| self.error(context, error))?;
        let value = body(&tx)?;
        tx.commit().map_err(|error| self.error(context, error))?;
        Ok(value)
    }

    /// Runs `body` in a read transaction, so that multi-statement reads see one snapshot.
    fn read<T>(
        &self,
        context: &str,
        body: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Deferred)
            .map_err(|error| self.error(context, error))?;
        let value = body(&tx)?;
        tx.commit().map_err(|error| self.error(context, error))?;
        Ok(value)
    }

    fn query_service(
        &self,
        tx: &Transaction<'_>,
        name: &str,
    ) -> Result<Option<ServiceRecord>, StoreError> {
        tx.query_row(
            "SELECT name, generation, current_revision, state, doc, created_at, updated_at
             FROM services WHERE name = ?1",
            [name],
            RawService::from_row,
        )
        .optional()
        .map_err(|error| self.error(format!("reading service {name}"), error))?
        .map(|raw| raw.into_record(&self.path))
        .transpose()
    }

    fn require_service(
        &self,
        tx: &Transaction<'_>,
        name: &str,
    ) -> Result<ServiceRecord, StoreError> {
        self.query_service(tx, name)?
            .ok_or_else(|| StoreError::not_found(RecordKind::Service, name))
    }

    fn insert_event(
        &self,
        tx: &Transaction<'_>,
        event: &NewEvent,
        time: Timestamp,
    ) -> Result<EventRecord, StoreError> {
        let context = || format!("recording an event of service {}", event.service);
        tx.execute(
            "INSERT INTO events (service, time, kind, message, fields) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                event.service,
                time.to_string(),
                event.kind,
                event.message,
                event.fields.to_string()
            ],
        )
        .map_err(|error| self.error(context(), error))?;
        Ok(EventRecord {
            seq: from_sql_int(tx.last_insert_rowid()),
            service: event.service.clone(),
            time,
            kind: event.kind.clone(),
            message: event.message.clone(),
            fields: event.fields.clone(),
        })
    }

    fn query_operation(
        &self,
        tx: &Transaction<'_>,
        id: &str,
    ) -> Result<OperationRecord, StoreError> {
        let raw = tx
            .query_row(
                "SELECT id, kind, service, state, created_at, updated_at, result, error
                 FROM operations WHERE id = ?1",
                [id],
                RawOperation::from_row,
            )
            .optional()
            .map_err(|error| self.error(format!("reading operation {id}"), error))?
            .ok_or_else(|| StoreError::not_found(RecordKind::Operation, id))?;
        self.complete_operation(tx, raw)
    }

    fn complete_operation(
        &self,
        tx: &Transaction<'_>,
        raw: RawOperation,
    ) -> Result<OperationRecord, StoreError> {
        let context = || format!("reading the progress of operation {}", raw.id);
        let mut statement = tx
            .prepare_cached(
                "SELECT time, line FROM operation_progress WHERE operation_id = ?1 ORDER BY line_no",
            )
            .map_err(|error| self.error(context(), error))?;
        let rows = statement
            .query_map([&raw.id], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
            })
            .map_err(|error| self.error(context(), error))?;
        let mut progress = Vec::new();
        for row in rows {
            let (time, line) = row.map_err(|error| self.error(context(), error))?;
            progress.push(ProgressLine {
                time: parse_time(&self.path, RecordKind::Operation, &raw.id, &time)?,
                line,
            });
        }
        raw.into_record(&self.path, progress)
    }

    fn finish_running(
        &self,
        tx: &Transaction<'_>,
        id: &str,
        state: OperationState,
        result: Option<&Value>,
        error: Option<&Value>,
    ) -> Result<(), StoreError> {
        let changed = tx
            .execute(
                "UPDATE operations SET state = ?2, result = ?3, error = ?4, updated_at = ?5
                 WHERE id = ?1 AND state = 'running'",
                params![
                    id,
                    state.as_str(),
                    result.map(Value::to_string),
                    error.map(Value::to_string),
                    Timestamp::now().to_string()
                ],
            )
            .map_err(|error| self.error(format!("finishing operation {id}"), error))?;
        if changed == 1 {
            return Ok(());
        }
        let current = self.query_operation(tx, id)?;
        Err(StoreError::conflict(
            RecordKind::Operation,
            id,
            format!("already {}", current.state),
        ))
    }

    fn put_blob(
        &self,
        table: BlobTable,
        key: &str,
        ciphertext: &[u8],
    ) -> Result<(Timestamp, Timestamp), StoreError> {
        let context = format!("writing {} {key}", table.kind());
        self.write(&context, |tx| {
            let now = Timestamp::now().to_string();
            let created: String = tx
                .query_row(
                    &format!(
                        "INSERT INTO {table} ({key_column}, ciphertext, created_at, updated_at)
                         VALUES (?1, ?2, ?3, ?3)
                         ON CONFLICT ({key_column}) DO UPDATE
                         SET ciphertext = excluded.ciphertext, updated_at = excluded.updated_at
                         RETURNING created_at, updated_at",
                        table = table.name(),
                        key_column = table.key_column(),
                    ),
                    params![key, ciphertext, now],
                    |row| row.get(0),
                )
                .map_err(|error| self.error(&context, error))?;
            Ok((
                parse_time(&self.path, table.kind(), key, &created)?,
                parse_time(&self.path, table.kind(), key, &now)?,
            ))
        })
    }

    fn get_blob(&self, table: BlobTable, key: &str) -> Result<RawBlob, StoreError> {
        let context = format!("reading {} {key}", table.kind());
        self.read(&context, |tx| {
            tx.query_row(
                &format!(
                    "SELECT {key_column}, ciphertext, created_at, updated_at FROM {table}
                     WHERE {key_column} = ?1",
                    table = table.name(),
                    key_column = table.key_column(),
                ),
                [key],
                RawBlob::from_row,
            )
            .optional()
            .map_err(|error| self.error(&context, error))?
            .ok_or_else(|| StoreError::not_found(table.kind(), key))
        })
    }

    fn list_blobs(&self, table: BlobTable) -> Result<Vec<RawBlob>, StoreError> {
        let context = format!("listing {}s", table.kind());
        self.read(&context, |tx| {
            let mut statement = tx
                .prepare(&format!(
                    "SELECT {key_column}, ciphertext, created_at, updated_at FROM {table}
                     ORDER BY {key_column}",
                    table = table.name(),
                    key_column = table.key_column(),
                ))
                .map_err(|error| self.error(&context, error))?;
            let rows = statement
                .query_map([], RawBlob::from_row)
                .map_err(|error| self.error(&context, error))?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(|error| self.error(&context, error))
        })
    }

    fn delete_blob(&self, table: BlobTable, key: &str) -> Result<(), StoreError> {
        let context = format!("deleting {} {key}", table.kind());
        self.write(&context, |tx| {
            let deleted = tx
                .execute(
                    &format!(
                        "DELETE FROM {table} WHERE {key_column} = ?1",
                        table = table.name(),
                        key_column = table.key_column(),
                    ),
                    [key],
                )
                .map_err(|error| self.error(&context, error))?;
            if deleted == 0 {
                return Err(StoreError::not_found(table.kind(), key));
            }
            Ok(())
        })
    }
}

/// Creates `path` with mode 0600 if it does not exist; tightens an existing file's mode to 0600.
fn create_private_file(path: &Path) -> Result<(), StoreError> {
    let io_error = |action, source| StoreError::Io {
        action,
        path: path.to_owned(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|source| io_error("open", source))?;
    let mode = file
        .metadata()
        .map_err(|source| io_error("stat", source))?
        .permissions()
        .mode()
        & 0o7777;
    if mode != 0o600 {
        tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "state store was not private; setting mode 0600");
        fs::set_permissions(path, Permissions::from_mode(0o600))
            .map_err(|source| io_error("chmod", source))?;
    }
    Ok(())
}

fn quick_check(path: &Path, conn: &Connection) -> Result<(), StoreError> {
    let mut statement = conn
        .prepare("PRAGMA quick_check")
        .map_err(|error| sql_error(path, "checking integrity", error))?;
    let problems = statement
        .query_map([], |row| row.get::<_, String>(0))
        .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
        .map_err(|error| sql_error(path, "checking integrity", error))?;
    if problems.len() == 1 && problems[0] == "ok" {
        return Ok(());
    }
    Err(StoreError::Corrupt {
        location: path.display().to_string(),
        detail: format!("quick_check found: {}", problems.join("; ")),
    })
}

fn schema_version(path: &Path, conn: &Connection) -> Result<u32, StoreError> {
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(|error| sql_error(path, "reading the schema version", error))?;
    u32::try_from(version).map_err(|_| StoreError::Corrupt {
        location: path.display().to_string(),
        detail: format!("schema version {version} is out of range"),
    })
}

/// Maps a SQLite error: damage to the file is [`StoreError::Corrupt`], the rest
/// [`StoreError::Backend`] with `context` saying what the store was doing.
fn sql_error(path: &Path, context: &str, error: rusqlite::Error) -> StoreError {
    if let rusqlite::Error::SqliteFailure(failure, _) = &error
        && matches!(
            failure.code,
            ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase
        )
    {
        return StoreError::Corrupt {
            location: path.display().to_string(),
            detail: format!("{context}: {error}"),
        };
    }
    StoreError::Backend {
        context: format!("{context} in {}", path.display()),
        source: Box::new(error),
    }
}

fn to_sql_int(value: u64) -> i64 {
    // Generations, revision numbers and sequence numbers never get near 2^63.
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn from_sql_int(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn parse_doc(path: &Path, kind: RecordKind, key: &str, text: &str) -> Result<Value, StoreError> {
    serde_json::from_str(text).map_err(|error| StoreError::Corrupt {
        location: format!("{} ({kind} {key})", path.display()),
        detail: format!("document is not valid JSON: {error}"),
    })
}

fn parse_time(
    path: &Path,
    kind: RecordKind,
    key: &str,
    text: &str,
) -> Result<Timestamp, StoreError> {
    Timestamp::parse(text).map_err(|error| StoreError::Corrupt {
        location: format!("{} ({kind} {key})", path.display()),
        detail: format!("bad time {text:?}: {error}"),
    })
}

struct RawService {
    name: String,
    generation: i64,
    current_revision: Option<i64>,
    state: String,
    doc: String,
    created_at: String,
    updated_at: String,
}

impl RawService {
    fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(RawService {
            name: row.get(0)?,
            generation: row.get(1)?,
            current_revision: row.get(2)?,
            state: row.get(3)?,
            doc: row.get(4)?,
            created_at: row.get(5)?,
            updated_at: row.get(6)?,
        })
    }

    fn into_record(self, path: &Path) -> Result<ServiceRecord, StoreError> {
        let kind = RecordKind::Service;
        Ok(ServiceRecord {
            doc: parse_doc(path, kind, &self.name, &self.doc)?,
            created_at: parse_time(path, kind, &self.name, &self.created_at)?,
            updated_at: parse_time(path, kind, &self.name, &self.updated_at)?,
            generation: from_sql_int(self.generation),
            current_revision: self.current_revision.map(from_sql_int),
            state: self.state,
            name: self.name,
        })
    }
}

struct RawRevision {
    service: String,
    number: i64,
    created_at: String,
    cause: String,
    doc: String,
}

impl RawRevision {
    fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(RawRevision {
            service: row.get(0)?,
            number: row.get(1)?,
            created_at: row.get(2)?,
            cause: row.get(3)?,
            doc: row.get(4)?,
        })
    }

    fn into_record(self, path: &Path) -> Result<RevisionRecord, StoreError> {
        let number = from_sql_int(self.number);
        let key = revision_key(&self.service, number);
        let kind = RecordKind::Revision;
        Ok(RevisionRecord {
            doc: parse_doc(path, kind, &key, &self.doc)?,
            created_at: parse_time(path, kind, &key, &self.created_at)?,
            number,
            cause: self.cause,
            service: self.service,
        })
    }
}

struct RawEvent {
    seq: i64,
    service: String,
    time: String,
    kind: String,
    message: String,
    fields: String,
}

impl RawEvent {
    fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(RawEvent {
            seq: row.get(0)?,
            service: row.get(1)?,
            time: row.get(2)?,
            kind: row.get(3)?,
            message: row.get(4)?,
            fields: row.get(5)?,
        })
    }

    fn into_record(self, path: &Path) -> Result<EventRecord, StoreError> {
        let seq = from_sql_int(self.seq);
        let key = seq.to_string();
        let kind = RecordKind::Event;
        Ok(EventRecord {
            seq,
            time: parse_time(path, kind, &key, &self.time)?,
            fields: parse_doc(path, kind, &key, &self.fields)?,
            service: self.service,
            kind: self.kind,
            message: self.message,
        })
    }
}

struct RawOperation {
    id: String,
    kind: String,
    service: String,
    state: String,
    created_at: String,
    updated_at: String,
    result: Option<String>,
    error: Option<String>,
}

impl RawOperation {
    fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(RawOperation {
            id: row.get(0)?,
            kind: row.get(1)?,
            service: row.get(2)?,
            state: row.get(3)?,
            created_at: row.get(4)?,
            updated_at: row.get(5)?,
            result: row.get(6)?,
            error: row.get(7)?,
        })
    }

    fn into_record(
        self,
        path: &Path,
        progress: Vec<ProgressLine>,
    ) -> Result<OperationRecord, StoreError> {
        let kind = RecordKind::Operation;
        let state = OperationState::parse(&self.state).ok_or_else(|| StoreError::Corrupt {
            location: format!("{} (operation {})", path.display(), self.id),
            detail: format!("unknown state {:?}", self.state),
        })?;
        let parse_optional = |text: &Option<String>| {
            text.as_deref()
                .map(|text| parse_doc(path, kind, &self.id, text))
                .transpose()
        };
        Ok(OperationRecord {
            state,
            created_at: parse_time(path, kind, &self.id, &self.created_at)?,
            updated_at: parse_time(path, kind, &self.id, &self.updated_at)?,
            progress,
            result: parse_optional(&self.result)?,
            error: parse_optional(&self.error)?,
            kind: self.kind,
            service: self.service,
            id: self.id,
        })
    }
}

struct RawBlob {
    key: String,
    ciphertext: Vec<u8>,
    created_at: String,
    updated_at: String,
}

impl RawBlob {
    fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(RawBlob {
            key: row.get(0)?,
            ciphertext: row.get(1)?,
            created_at: row.get(2)?,
            updated_at: row.get(3)?,
        })
    }

    fn times(&self, path: &Path, kind: RecordKind) -> Result<(Timestamp, Timestamp), StoreError> {
        Ok((
            parse_time(path, kind, &self.key, &self.created_at)?,
            parse_time(path, kind, &self.key, &self.updated_at)?,
        ))
    }

    fn into_secret(self, path: &Path) -> Result<SecretRecord, StoreError> {
        let (created_at, updated_at) = self.times(path, RecordKind::Secret)?;
        Ok(SecretRecord {
            name: self.key,
            ciphertext: self.ciphertext,
            created_at,
            updated_at,
        })
    }

    fn into_registry_credential(self, path: &Path) -> Result<RegistryCredentialRecord, StoreError> {
        let (created_at, updated_at) = self.times(path, RecordKind::RegistryCredential)?;
        Ok(RegistryCredentialRecord {
            registry: self.key,
            ciphertext: self.ciphertext,
            created_at,
            updated_at,
        })
    }
}

/// The two tables of ciphertext blobs, which share their code.
#[derive(Clone, Copy)]
enum BlobTable {
    Secrets,
    RegistryCredentials,
}

impl BlobTable {
    fn name(self) -> &'static str {
        match self {
            BlobTable::Secrets => "secrets",
            BlobTable::RegistryCredentials => "registry_credentials",
        }
    }

    fn key_column(self) -> &'static str {
        match self {
            BlobTable::Secrets => "name",
            BlobTable::RegistryCredentials => "registry",
        }
    }

    fn kind(self) -> RecordKind {
        match self {
            BlobTable::Secrets => RecordKind::Secret,
            BlobTable::RegistryCredentials => RecordKind::RegistryCredential,
        }
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

impl Store for SqliteStore {
    fn create_service(&self, new: &NewService) -> Result<ServiceRecord, StoreError> {
        let context = format!("creating service {}", new.name);
        self.write(&context, |tx| {
            let now = Timestamp::now();
            let inserted = tx
                .execute(
                    "INSERT INTO services (name, generation, current_revision, state, doc, created_at, updated_at)
                     VALUES (?1, 1, NULL, ?2, ?3, ?4, ?4)
                     ON CONFLICT (name) DO NOTHING",
                    params![new.name, new.state, new.doc.to_string(), now.to_string()],
                )
                .map_err(|error| self.error(&context, error))?;
            if inserted == 0 {
                return Err(StoreError::already_exists(RecordKind::Service, &new.name));
            }
            Ok(ServiceRecord {
                name: new.name.clone(),
                generation: 1,
                current_revision: None,
                state: new.state.clone(),
                doc: new.doc.clone(),
                created_at: now,
                updated_at: now,
            })
        })
    }

    fn get_service(&self, name: &str) -> Result<ServiceRecord, StoreError> {
        self.read(&format!("reading service {name}"), |tx| {
            self.require_service(tx, name)
        })
    }

    fn list_services(&self) -> Result<Vec<ServiceRecord>, StoreError> {
        let context = "listing services";
        self.read(context, |tx| {
            let mut statement = tx
                .prepare_cached(
                    "SELECT name, generation, current_revision, state, doc, created_at, updated_at
                     FROM services ORDER BY name",
                )
                .map_err(|error| self.error(context, error))?;
            let rows = statement
                .query_map([], RawService::from_row)
                .map_err(|error| self.error(context, error))?;
            let mut services = Vec::new();
            for row in rows {
                let raw = row.map_err(|error| self.error(context, error))?;
                services.push(raw.into_record(&self.path)?);
            }
            Ok(services)
        })
    }

    fn put_service(
        &self,
        record: &ServiceRecord,
        expected_generation: u64,
    ) -> Result<ServiceRecord, StoreError> {
        let context = format!("writing service {}", record.name);
        self.write(&context, |tx| {
            let stored = self.require_service(tx, &record.name)?;
            check_generation(&stored, Some(expected_generation))?;
            if let Some(number) = record.current_revision {
                let exists: bool = tx
                    .query_row(
                        "SELECT EXISTS (SELECT 1 FROM revisions WHERE service = ?1 AND number = ?2)",
                        params![record.name, to_sql_int(number)],
                        |row| row.get(0),
                    )
                    .map_err(|error| self.error(&context, error))?;
                if !exists {
                    return Err(StoreError::not_found(
                        RecordKind::Revision,
                        revision_key(&record.name, number),
                    ));
                }
            }
            let now = Timestamp::now();
            let updated = ServiceRecord {
                name: stored.name,
                generation: stored.generation + 1,
                current_revision: record.current_revision,
                state: record.state.clone(),
                doc: record.doc.clone(),
                created_at: stored.created_at,
                updated_at: now,
            };
            tx.execute(
                "UPDATE services
                 SET generation = ?2, current_revision = ?3, state = ?4, doc = ?5, updated_at = ?6
                 WHERE name = ?1",
                params![
                    updated.name,
                    to_sql_int(updated.generation),
                    updated.current_revision.map(to_sql_int),
                    updated.state,
                    updated.doc.to_string(),
                    now.to_string()
                ],
            )
            .map_err(|error| self.error(&context, error))?;
            Ok(updated)
        })
    }

    fn delete_service(
        &self,
        name: &str,
        expected_generation: Option<u64>,
    ) -> Result<(), StoreError> {
        let context = format!("deleting service {name}");
        self.write(&context, |tx| {
            let stored = self.require_service(tx, name)?;
            check_generation(&stored, expected_generation)?;
            tx.execute("DELETE FROM services WHERE name = ?1", [name])
                .map_err(|error| self.error(&context, error))?;
            Ok(())
        })
    }

    fn commit_revision(&self, commit: &RevisionCommit) -> Result<CommittedRevision, StoreError> {
        let context = format!("committing a revision of service {}", commit.service);
        self.write(&context, |tx| {
            let stored = self.require_service(tx, &commit.service)?;
            check_generation(&stored, commit.expected_generation)?;
            let last: i64 = tx
                .query_row(
                    "SELECT COALESCE(MAX(number), 0) FROM revisions WHERE service = ?1",
                    [&commit.service],
                    |row| row.get(0),
                )
                .map_err(|error| self.error(&context, error))?;
            let now = Timestamp::now();
            let revision = RevisionRecord {
                service: commit.service.clone(),
                number: from_sql_int(last) + 1,
                created_at: now,
                cause: commit.cause.clone(),
                doc: commit.doc.clone(),
            };
            tx.execute(
                "INSERT INTO revisions (service, number, created_at, cause, doc)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    revision.service,
                    to_sql_int(revision.number),
                    now.to_string(),
                    revision.cause,
                    revision.doc.to_string()
                ],
            )
            .map_err(|error| self.error(&context, error))?;
            let current = if commit.make_current {
                Some(revision.number)
            } else {
                stored.current_revision
            };
            let service = ServiceRecord {
                generation: stored.generation + 1,
                current_revision: current,
                state: commit.state.clone().unwrap_or(stored.state),
                doc: commit.service_doc.clone().unwrap_or(stored.doc),
                updated_at: now,
                name: stored.name,
                created_at: stored.created_at,
            };
            tx.execute(
                "UPDATE services
                 SET generation = ?2, current_revision = ?3, state = ?4, doc = ?5, updated_at = ?6
                 WHERE name = ?1",
                params![
                    service.name,
                    to_sql_int(service.generation),
                    service.current_revision.map(to_sql_int),
                    service.state,
                    service.doc.to_string(),
                    now.to_string()
                ],
            )
            .map_err(|error| self.error(&context, error))?;
            let event = commit
                .event
                .as_ref()
                .map(|event| self.insert_event(tx, event, now))
                .transpose()?;
            Ok(CommittedRevision {
                service,
                revision,
                event,
            })
        })
    }

    fn get_revision(&self, service: &str, number: u64) -> Result<RevisionRecord, StoreError> {
        let key = revision_key(service, number);
        self.read(&format!("reading revision {key}"), |tx| {
            let raw = tx
                .query_row(
                    "SELECT service, number, created_at, cause, doc FROM revisions
                     WHERE service = ?1 AND number = ?2",
                    params![service, to_sql_int(number)],
                    RawRevision::from_row,
                )
                .optional()
                .map_err(|error| self.error(format!("reading revision {key}"), error))?;
            match raw {
                Some(raw) => raw.into_record(&self.path),
                None => {
                    // Say which is missing: the service or just this revision.
                    self.require_service(tx, service)?;
                    Err(StoreError::not_found(RecordKind::Revision, key.clone()))
                }
            }
        })
    }

    fn list_revisions(&self, service: &str) -> Result<Vec<RevisionRecord>, StoreError> {
        let context = format!("listing the revisions of service {service}");
        self.read(&context, |tx| {
            self.require_service(tx, service)?;
            let mut statement = tx
                .prepare_cached(
                    "SELECT service, number, created_at, cause, doc FROM revisions
                     WHERE service = ?1 ORDER BY number",
                )
                .map_err(|error| self.error(&context, error))?;
            let rows = statement
                .query_map([service], RawRevision::from_row)
                .map_err(|error| self.error(&context, error))?;
            let mut revisions = Vec::new();
            for row in rows {
                let raw = row.map_err(|error| self.error(&context, error))?;
                revisions.push(raw.into_record(&self.path)?);
            }
            Ok(revisions)
        })
    }

    fn append_event(&self, event: &NewEvent) -> Result<EventRecord, StoreError> {
        let context = format!("recording an event of service {}", event.service);
        self.write(&context, |tx| {
            self.insert_event(tx, event, Timestamp::now())
        })
    }

    fn list_events(
        &self,
        service: &str,
        since_seq: u64,
        limit: usize,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let context = format!("listing the events of service {service}");
        self.read(&context, |tx| {
            let mut statement = tx
                .prepare_cached(
                    "SELECT seq, service, time, kind, message, fields FROM events
                     WHERE service = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
                )
                .map_err(|error| self.error(&context, error))?;
            let rows = statement
                .query_map(
                    params![
                        service,
                        to_sql_int(since_seq),
                        i64::try_from(limit).unwrap_or(i64::MAX)
                    ],
                    RawEvent::from_row,
                )
                .map_err(|error| self.error(&context, error))?;
            let mut events = Vec::new();
            for row in rows {
                let raw = row.map_err(|error| self.error(&context, error))?;
                events.push(raw.into_record(&self.path)?);
            }
            Ok(events)
        })
    }

    fn prune_events(&self, retention: &EventRetention) -> Result<u64, StoreError> {
        let context = "pruning events";
        self.write(context, |tx| {
            let mut removed = 0;
            if let Some(cutoff) = retention.older_than {
                removed += tx
                    .execute("DELETE FROM events WHERE time < ?1", [cutoff.to_string()])
                    .map_err(|error| self.error(context, error))?;
            }
            if let Some(keep) = retention.keep_per_service {
                removed += tx
                    .execute(
                        "DELETE FROM events WHERE seq IN (
                             SELECT seq FROM (
                                 SELECT seq, ROW_NUMBER() OVER (
                                     PARTITION BY service ORDER BY seq DESC
                                 ) AS rank
                                 FROM events
                             ) WHERE rank > ?1
                         )",
                        [i64::try_from(keep).unwrap_or(i64::MAX)],
                    )
                    .map_err(|error| self.error(context, error))?;
            }
            Ok(removed as u64)
        })
    }

    fn create_operation(&self, kind: &str, service: &str) -> Result<OperationRecord, StoreError> {
        let context = format!("creating a {kind} operation for service {service}");
        self.write(&context, |tx| {
            let now = Timestamp::now();
            loop {
                let id = new_operation_id()?;
                let inserted = tx
                    .execute(
                        "INSERT INTO operations (id, kind, service, state, created_at, updated_at)
                         VALUES (?1, ?2, ?3, 'running', ?4, ?4)
                         ON CONFLICT (id) DO NOTHING",
                        params![id, kind, service, now.to_string()],
                    )
                    .map_err(|error| self.error(&context, error))?;
                if inserted == 1 {
                    return Ok(OperationRecord {
                        id,
                        kind: kind.to_owned(),
                        service: service.to_owned(),
                        state: OperationState::Running,
                        created_at: now,
                        updated_at: now,
                        progress: Vec::new(),
                        result: None,
                        error: None,
                    });
                }
            }
        })
    }

    fn get_operation(&self, id: &str) -> Result<OperationRecord, StoreError> {
        self.read(&format!("reading operation {id}"), |tx| {
            self.query_operation(tx, id)
        })
    }

    fn list_operations(&self, service: Option<&str>) -> Result<Vec<OperationRecord>, StoreError> {
        let context = "listing operations";
        self.read(context, |tx| {
            let mut statement = tx
                .prepare_cached(
                    "SELECT id, kind, service, state, created_at, updated_at, result, error
                     FROM operations WHERE ?1 IS NULL OR service = ?1
                     ORDER BY created_at, rowid",
                )
                .map_err(|error| self.error(context, error))?;
            let raws = statement
                .query_map([service], RawOperation::from_row)
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(|error| self.error(context, error))?;
            raws.into_iter()
                .map(|raw| self.complete_operation(tx, raw))
                .collect()
        })
    }

    fn append_operation_progress(&self, id: &str, line: &str) -> Result<(), StoreError> {
        let context = format!("appending to the progress of operation {id}");
        self.write(&context, |tx| {
            let state: Option<String> = tx
                .query_row("SELECT state FROM operations WHERE id = ?1", [id], |row| {
                    row.get(0)
                })
                .optional()
                .map_err(|error| self.error(&context, error))?;
            let state = state.ok_or_else(|| StoreError::not_found(RecordKind::Operation, id))?;
            if state != OperationState::Running.as_str() {
                return Err(StoreError::conflict(
                    RecordKind::Operation,
                    id,
                    format!("already {state}"),
                ));
            }
            let now = Timestamp::now().to_string();
            tx.execute(
                "INSERT INTO operation_progress (operation_id, line_no, time, line)
                 SELECT ?1, COALESCE(MAX(line_no), 0) + 1, ?2, ?3
                 FROM operation_progress WHERE operation_id = ?1",
                params![id, now, line],
            )
            .map_err(|error| self.error(&context, error))?;
            tx.execute(
                "UPDATE operations SET updated_at = ?2 WHERE id = ?1",
                params![id, now],
            )
            .map_err(|error| self.error(&context, error))?;
            Ok(())
        })
    }

    fn finish_operation(
        &self,
        id: &str,
        outcome: &OperationOutcome,
    ) -> Result<OperationRecord, StoreError> {
        self.write(&format!("finishing operation {id}"), |tx| {
            match outcome {
                OperationOutcome::Succeeded(result) => {
                    self.finish_running(tx, id, OperationState::Succeeded, Some(result), None)?
                }
                OperationOutcome::Failed(error) => {
                    self.finish_running(tx, id, OperationState::Failed, None, Some(error))?
                }
            }
            self.query_operation(tx, id)
        })
    }

    fn fail_interrupted_operations(&self, reason: &str) -> Result<Vec<String>, StoreError> {
        let context = "failing interrupted operations";
        self.write(context, |tx| {
            let mut statement = tx
                .prepare(
                    "UPDATE operations SET state = 'failed', error = ?1, updated_at = ?2
                     WHERE state = 'running' RETURNING id",
                )
                .map_err(|error| self.error(context, error))?;
            let error = json!({ "message": reason }).to_string();
            let mut ids = statement
                .query_map(params![error, Timestamp::now().to_string()], |row| {
                    row.get::<_, String>(0)
                })
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(|error| self.error(context, error))?;
            ids.sort();
            Ok(ids)
        })
    }

    fn prune_operations(&self, before: Timestamp) -> Result<u64, StoreError> {
        let context = "pruning operations";
        self.write(context, |tx| {
            let removed = tx
                .execute(
                    "DELETE FROM operations WHERE state != 'running' AND updated_at < ?1",
                    [before.to_string()],
                )
                .map_err(|error| self.error(context, error))?;
            Ok(removed as u64)
        })
    }

    fn put_secret(&self, name: &str, ciphertext: &[u8]) -> Result<SecretRecord, StoreError> {
        let (created_at, updated_at) = self.put_blob(BlobTable::Secrets, name, ciphertext)?;
        Ok(SecretRecord {
            name: name.to_owned(),
            ciphertext: ciphertext.to_vec(),
            created_at,
            updated_at,
        })
    }

    fn get_secret(&self, name: &str) -> Result<SecretRecord, StoreError> {
        self.get_blob(BlobTable::Secrets, name)?
            .into_secret(&self.path)
    }

    fn list_secrets(&self) -> Result<Vec<SecretRecord>, StoreError> {
        self.list_blobs(BlobTable::Secrets)?
            .into_iter()
            .map(|raw| raw.into_secret(&self.path))
            .collect()
    }

    fn delete_secret(&self, name: &str) -> Result<(), StoreError> {
        self.delete_blob(BlobTable::Secrets, name)
    }

    fn put_registry_credential(
        &self,
        registry: &str,
        ciphertext: &[u8],
    ) -> Result<RegistryCredentialRecord, StoreError> {
        let (created_at, updated_at) =
            self.put_blob(BlobTable::RegistryCredentials, registry, ciphertext)?;
        Ok(RegistryCredentialRecord {
            registry: registry.to_owned(),
            ciphertext: ciphertext.to_vec(),
            created_at,
            updated_at,
        })
    }

    fn get_registry_credential(
        &self,
        registry: &str,
    ) -> Result<RegistryCredentialRecord, StoreError> {
        self.get_blob(BlobTable::RegistryCredentials, registry)?
            .into_registry_credential(&self.path)
    }

    fn list_registry_credentials(&self) -> Result<Vec<RegistryCredentialRecord>, StoreError> {
        self.list_blobs(BlobTable::RegistryCredentials)?
            .into_iter()
            .map(|raw| raw.into_registry_credential(&self.path))
            .collect()
    }

    fn delete_registry_credential(&self, registry: &str) -> Result<(), StoreError> {
        self.delete_blob(BlobTable::RegistryCredentials, registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn the_sqlite_store_passes_the_conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        crate::store::conformance::run(&store);
    }

    #[test]
    fn state_survives_reopening_and_the_file_is_private_and_versioned() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        {
            let store = SqliteStore::open(&data_dir).unwrap();
            store
                .create_service(&NewService {
                    name: "web".into(),
                    state: "active".into(),
                    doc: json!({"image": "a"}),
                })
                .unwrap();
            store
                .commit_revision(&RevisionCommit {
                    service: "web".into(),
                    expected_generation: Some(1),
                    doc: json!({"image": "a"}),
                    cause: "create".into(),
                    service_doc: None,
                    state: None,
                    event: None,
                    make_current: true,
                })
                .unwrap();
            store.create_operation("deploy", "web").unwrap();
        }
        let path = data_dir.join(STATE_FILE_NAME);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{mode:o}");
        let dir_mode = fs::metadata(&data_dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(dir_mode, 0o700, "{dir_mode:o}");

        let store = SqliteStore::open(&data_dir).unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        let web = store.get_service("web").unwrap();
        assert_eq!(web.generation, 2);
        assert_eq!(web.current_revision, Some(1));
        assert_eq!(
            store.get_revision("web", 1).unwrap().doc,
            json!({"image": "a"})
        );
        // The restart sweep: the deploy above was left running.
        let failed = store
            .fail_interrupted_operations(crate::store::DAEMON_RESTARTED)
            .unwrap();
        assert_eq!(failed.len(), 1);
        let operation = store.get_operation(&failed[0]).unwrap();
        assert_eq!(operation.state, OperationState::Failed);
        assert_eq!(
            operation.error,
            Some(json!({"message": "daemon restarted"}))
        );
        // WAL mode is persistent in the file.
        let mode: String = store
            .lock()
            .pragma_query_value(None, "journal_mode", |row| row.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }

    #[test]
    fn a_lax_file_mode_is_tightened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE_NAME);
        fs::write(&path, b"").unwrap();
        fs::set_permissions(&path, Permissions::from_mode(0o644)).unwrap();
        SqliteStore::open(dir.path()).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{mode:o}");
    }

    #[test]
    fn a_file_that_is_not_a_database_is_reported_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE_NAME);
        let mut file = fs::File::create(&path).unwrap();
        file.write_all(&[0x5a; 8192]).unwrap();
        drop(file);
        let error = SqliteStore::open(dir.path()).unwrap_err();
        assert!(matches!(error, StoreError::Corrupt { .. }), "{error:?}");
        let message = error.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("corrupt"), "{message}");
    }

    #[test]
    fn a_damaged_page_is_reported_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SqliteStore::open(dir.path()).unwrap();
            for i in 0..200 {
                store
                    .create_service(&NewService {
                        name: format!("svc-{i:03}"),
                        state: "active".into(),
                        doc: json!({"padding": "x".repeat(200)}),
                    })
                    .unwrap();
            }
            // Fold the WAL into the main file so the damage below hits live pages.
            store
                .lock()
                .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
                .unwrap();
        }
        let path = dir.path().join(STATE_FILE_NAME);
        let mut bytes = fs::read(&path).unwrap();
        assert!(bytes.len() > 4 * 4096, "{}", bytes.len());
        // Scribble over the middle of page 3 onwards (a b-tree page of the services table).
        for byte in &mut bytes[2 * 4096 + 8..3 * 4096] {
            *byte = 0xff;
        }
        fs::write(&path, &bytes).unwrap();
        let error = SqliteStore::open(dir.path()).unwrap_err();
        assert!(matches!(error, StoreError::Corrupt { .. }), "{error:?}");
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SqliteStore::open(dir.path()).unwrap();
            store
                .lock()
                .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
                .unwrap();
        }
        let error = SqliteStore::open(dir.path()).unwrap_err();
        match error {
            StoreError::UnsupportedSchema {
                found, supported, ..
            } => {
                assert_eq!(found, SCHEMA_VERSION + 1);
                assert_eq!(supported, SCHEMA_VERSION);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_reader_holding_the_file_does_not_break_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        // Like an operator's sqlite3 shell in the middle of a read transaction.
        let mut shell = Connection::open(store.path()).unwrap();
        let tx = shell.transaction().unwrap();
        let count: i64 = tx
            .query_row("SELECT COUNT(*) FROM services", [], |row| row.get(0))
            .unwrap();
        assert_eq!(count, 0);
        store
            .create_service(&NewService {
                name: "web".into(),
                state: "active".into(),
                doc: json!({}),
            })
            .unwrap();
        drop(tx);
        assert_eq!(store.list_services().unwrap().len(), 1);
    }
}
