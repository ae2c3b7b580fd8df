//! Secrets at rest: the data dir's key file, sealing and opening secret values, redacting them
//! from text, and the rules for secret names.
//!
//! # The key
//! `<data_dir>/secrets.key` holds 32 random bytes, mode 0600, owned by the user the daemon runs
//! as (root). It is created atomically: written to a private temporary file and then
//! hard-linked into place, which fails if a key already exists, so a crash never leaves a
//! half-written key and two daemons never pick different keys. A key file that group or others
//! may read or write, that another user owns, or that is not exactly 32 bytes is refused.
//!
//! # Blobs
//! [`SecretKey::seal`] encrypts with ChaCha20-Poly1305 (RFC 8439) under a fresh random 96-bit
//! nonce. A blob is `0x01 || nonce (12 bytes) || ciphertext || tag (16 bytes)`; the version byte
//! and the secret's name are the associated data, so a blob moved to another name does not open.
//! Registry credentials are sealed under [`registry_credential_label`]`(host)`, which no secret
//! name can equal.
//!
//! # Names
//! A secret name is 1 to 128 characters from `A-Z a-z 0-9 _ . -`, starting with a letter, a
//! digit or `_`. That admits every environment variable name (`DB_PASSWORD`) and every DNS label
//! (`db-password`), as well as the last path segment of an AWS SSM parameter name, which is how
//! an `apprunner.yaml` `value-from` maps to a lull secret; and it keeps names safe as file names
//! (no `/`, not `.` or `..`), as URL path segments and as command-line arguments (no leading `-`).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use zeroize::{Zeroize, Zeroizing};

/// The key file's name inside the data dir.
pub const KEY_FILE_NAME: &str = "secrets.key";
/// The key's length in bytes.
pub const KEY_LEN: usize = 32;
/// What [`Redactor`] puts in place of a secret value.
pub const REDACTED: &str = "[redacted]";
/// The longest secret name.
pub const MAX_NAME_LEN: usize = 128;

const BLOB_VERSION: u8 = 1;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// What went wrong with the key file, a blob or a name.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("cannot {action} key file {path}")]
    KeyFileIo {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "key file {path} has mode {mode:04o}: group and others must have no access to it (chmod 600)"
    )]
    KeyFileMode { path: PathBuf, mode: u32 },
    #[error("key file {path} is owned by uid {owner}, not by uid {expected} that runs lull")]
    KeyFileOwner {
        path: PathBuf,
        owner: u32,
        expected: u32,
    },
    #[error("key file {path} is not a regular file")]
    KeyFileType { path: PathBuf },
    #[error("key file {path} holds {len} bytes, expected {KEY_LEN}")]
    KeyFileLength { path: PathBuf, len: u64 },
    #[error("cannot draw random bytes for {purpose}")]
    Random {
        purpose: &'static str,
        #[source]
        source: getrandom::Error,
    },
    #[error("cannot seal secret {name}: value too long")]
    Seal { name: String },
    #[error(
        "cannot open secret {name}: it was not sealed under this name with this key, or it was altered"
    )]
    Open { name: String },
    #[error("cannot open secret {name}: {detail}")]
    MalformedBlob { name: String, detail: String },
    #[error("invalid secret name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
}

/// A secret's plaintext. Its `Debug` prints `[redacted]`, it has no `Display`, and its memory is
/// zeroed when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(Zeroizing<Vec<u8>>);

impl SecretValue {
    pub fn new(bytes: Vec<u8>) -> Self {
        SecretValue(Zeroizing::new(bytes))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The value as text, if it is UTF-8 (environment variables need it to be).
    pub fn as_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }
}

impl From<&str> for SecretValue {
    fn from(text: &str) -> Self {
        SecretValue::new(text.as_bytes().to_vec())
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretValue({REDACTED})")
    }
}

/// The key secrets are sealed with. Its `Debug` shows where it came from, never the key.
///
/// It also keeps the [`RedactorCache`] of the secrets sealed with it, so that whoever holds the
/// key (the control plane, the engine's event writer) shares one cache.
pub struct SecretKey {
    cipher: ChaCha20Poly1305,
    path: Option<PathBuf>,
    /// Blobs opened so far (each a decryption).
    opens: AtomicU64,
    redactors: RedactorCache,
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretKey")
            .field("path", &self.path)
            .field("key", &REDACTED)
            .finish()
    }
}

impl SecretKey {
    /// Loads `<data_dir>/secrets.key`, creating it with a fresh random key if it is missing.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, SecretsError> {
        let path = data_dir.join(KEY_FILE_NAME);
        match Self::load(&path) {
            Err(SecretsError::KeyFileIo { source, .. })
                if source.kind() == io::ErrorKind::NotFound =>
            {
                Self::create(&path)
            }
            other => other,
        }
    }

    /// Loads the key in `path`, refusing a file that is not private to this user.
    pub fn load(path: &Path) -> Result<Self, SecretsError> {
        let io_error = |action, source| SecretsError::KeyFileIo {
            action,
            path: path.to_owned(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| io_error("open", source))?;
        let metadata = file.metadata().map_err(|source| io_error("stat", source))?;
        if !metadata.is_file() {
            return Err(SecretsError::KeyFileType {
                path: path.to_owned(),
            });
        }
        let mode = metadata.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(SecretsError::KeyFileMode {
                path: path.to_owned(),
                mode,
            });
        }
        let expected = effective_uid();
        if metadata.uid() != expected {
            return Err(SecretsError::KeyFileOwner {
                path: path.to_owned(),
                owner: metadata.uid(),
                expected,
            });
        }
        if metadata.len() != KEY_LEN as u64 {
            return Err(SecretsError::KeyFileLength {
                path: path.to_owned(),
                len: metadata.len(),
            });
        }
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        file.read_exact(key.as_mut())
            .map_err(|source| io_error("read", source))?;
        let mut key = Self::from_bytes(&key);
        key.path = Some(path.to_owned());
        Ok(key)
    }

    /// Creates `path` holding a fresh random key, mode 0600; fails if it exists.
    pub fn create(path: &Path) -> Result<Self, SecretsError> {
        let io_error = |action, source| SecretsError::KeyFileIo {
            action,
            path: path.to_owned(),
            source,
        };
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        getrandom::fill(key.as_mut()).map_err(|source| SecretsError::Random {
            purpose: "the secrets key",
            source,
        })?;
        let mut suffix = [0u8; 6];
        getrandom::fill(&mut suffix).map_err(|source| SecretsError::Random {
            purpose: "a temporary file name",
            source,
        })?;
        let mut temporary = path.as_os_str().to_owned();
        temporary.push(format!(
            ".tmp-{}-{}",
            std::process::id(),
            hex::encode(suffix)
        ));
        let temporary = PathBuf::from(temporary);
        let written = write_new_private_file(&temporary, key.as_ref())
            .and_then(|()| fs::hard_link(&temporary, path));
        // The temporary name goes whether or not the link worked.
        let removed = fs::remove_file(&temporary);
        match written {
            Ok(()) => {}
            Err(source) if source.kind() == io::ErrorKind::AlreadyExists => {
                // Another process created it first: use theirs.
                return Self::load(path);
            }
            Err(source) => return Err(io_error("create", source)),
        }
        if let Err(error) = removed {
            tracing::warn!(path = %temporary.display(), %error, "cannot remove a temporary key file");
        }
        if let Some(dir) = path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            File::open(dir)
                .and_then(|dir| dir.sync_all())
                .map_err(|source| io_error("sync the directory of", source))?;
        }
        tracing::info!(path = %path.display(), "created the secrets key");
        let mut created = Self::from_bytes(&key);
        created.path = Some(path.to_owned());
        Ok(created)
    }

    /// A key from raw bytes (tests, or a key kept outside the data dir).
    pub fn from_bytes(bytes: &[u8; KEY_LEN]) -> Self {
        let mut key = chacha20poly1305::Key::from(*bytes);
        let cipher = ChaCha20Poly1305::new(&key);
        key.as_mut_slice().zeroize();
        SecretKey {
            cipher,
            path: None,
            opens: AtomicU64::new(0),
            redactors: RedactorCache::default(),
        }
    }

    /// How many blobs this key has opened (decrypted) so far.
    pub fn opens(&self) -> u64 {
        self.opens.load(Ordering::Relaxed)
    }

    /// The cache of redactors of the secrets sealed with this key.
    pub fn redactors(&self) -> &RedactorCache {
        &self.redactors
    }

    /// The file the key came from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Encrypts `plaintext` for the secret `name` (see the module docs for the format).
    pub fn seal(&self, name: &str, plaintext: &[u8]) -> Result<Vec<u8>, SecretsError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|source| SecretsError::Random {
            purpose: "a nonce",
            source,
        })?;
        let aad = associated_data(name);
        let sealed = self
            .cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .map_err(|_| SecretsError::Seal {
                name: name.to_owned(),
            })?;
        let mut blob = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
        blob.push(BLOB_VERSION);
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&sealed);
        Ok(blob)
    }

    /// Decrypts a blob [`seal`](Self::seal) made for the secret `name` with this key.
    pub fn open(&self, name: &str, blob: &[u8]) -> Result<SecretValue, SecretsError> {
        let malformed = |detail: String| SecretsError::MalformedBlob {
            name: name.to_owned(),
            detail,
        };
        let Some((&version, rest)) = blob.split_first() else {
            return Err(malformed("the blob is empty".into()));
        };
        if version != BLOB_VERSION {
            return Err(malformed(format!("unknown blob version {version}")));
        }
        if rest.len() < NONCE_LEN + TAG_LEN {
            return Err(malformed(format!(
                "the blob is {} bytes, shorter than the {} of an empty value",
                blob.len(),
                1 + NONCE_LEN + TAG_LEN
            )));
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce
            .try_into()
            .map_err(|_| malformed("bad nonce".into()))?;
        let aad = associated_data(name);
        self.opens.fetch_add(1, Ordering::Relaxed);
        self.cipher
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: sealed,
                    aad: &aad,
                },
            )
            .map(SecretValue::new)
            .map_err(|_| SecretsError::Open {
                name: name.to_owned(),
            })
    }
}

/// The name a registry's credentials are sealed under: `registry/HOST`, which no valid secret
/// name can equal (secret names have no `/`).
pub fn registry_credential_label(host: &str) -> String {
    format!("registry/{host}")
}

/// Checks a secret name against the rules in the module docs.
pub fn validate_secret_name(name: &str) -> Result<(), SecretsError> {
    let invalid = |reason| {
        Err(SecretsError::InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    let Some(first) = name.chars().next() else {
        return invalid("it is empty");
    };
    if name.len() > MAX_NAME_LEN {
        return invalid("it is longer than 128 characters");
    }
    if !(first.is_ascii_alphanumeric() || first == '_') {
        return invalid("it must start with a letter, a digit or '_'");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return invalid("only letters, digits, '_', '.' and '-' are allowed");
    }
    Ok(())
}

/// Replaces every known secret value in a text with `[redacted]`: for logs, events and API
/// output.
///
/// Besides each value itself it redacts each line of a multi-line value (logs are read line by
/// line) and the value as escaped inside a JSON string. Longer values are matched first, so a
/// value that contains another is redacted whole. Values that are not UTF-8 cannot occur in
/// text and are skipped; the empty value is skipped.
#[derive(Clone, Default)]
pub struct Redactor {
    /// Longest first, no duplicates, none empty.
    patterns: Vec<Zeroizing<String>>,
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Redactor")
            .field("patterns", &self.patterns.len())
            .finish()
    }
}

impl Redactor {
    pub fn new() -> Self {
        Self::default()
    }

    /// A redactor for all of `values`.
    pub fn with_values<'a>(values: impl IntoIterator<Item = &'a SecretValue>) -> Self {
        let mut redactor = Self::new();
        for value in values {
            redactor.add(value);
        }
        redactor
    }

    /// Adds a value to redact.
    pub fn add(&mut self, value: &SecretValue) {
        let Some(text) = value.as_str() else {
            return;
        };
        self.add_pattern(text);
        if text.contains('\n') {
            for line in text.lines() {
                self.add_pattern(line.trim_end_matches('\r'));
            }
        }
        if let Ok(quoted) = serde_json::to_string(text) {
            let escaped = &quoted[1..quoted.len() - 1];
            if escaped != text {
                self.add_pattern(escaped);
            }
        }
    }

    fn add_pattern(&mut self, pattern: &str) {
        if pattern.is_empty() || self.patterns.iter().any(|known| known.as_str() == pattern) {
            return;
        }
        let at = self
            .patterns
            .partition_point(|known| known.len() >= pattern.len());
        self.patterns.insert(at, Zeroizing::new(pattern.to_owned()));
    }

    /// How many patterns it looks for.
    pub fn len(&self) -> usize {
        self.patterns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// `text` with every known value replaced by `[redacted]`; borrowed when there is none.
    pub fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        if !self
            .patterns
            .iter()
            .any(|pattern| text.contains(pattern.as_str()))
        {
            return Cow::Borrowed(text);
        }
        let mut redacted = String::with_capacity(text.len());
        let mut rest = text;
        'scan: while let Some(next) = rest.chars().next() {
            for pattern in &self.patterns {
                if let Some(after) = rest.strip_prefix(pattern.as_str()) {
                    redacted.push_str(REDACTED);
                    rest = after;
                    continue 'scan;
                }
            }
            redacted.push(next);
            rest = &rest[next.len_utf8()..];
        }
        Cow::Owned(redacted)
    }
}

/// The redactor of every stored secret, built once and reused until a secret is set or removed
/// ([`RedactorCache::invalidate`], a generation counter). A rebuild opens only the secrets whose
/// sealed blob changed; the others keep their opened value.
#[derive(Default)]
pub struct RedactorCache {
    generation: AtomicU64,
    built: Mutex<Option<BuiltRedactor>>,
}

struct BuiltRedactor {
    generation: u64,
    redactor: Redactor,
    /// Name to (sealed blob, opened value).
    opened: BTreeMap<String, (Vec<u8>, SecretValue)>,
}

impl fmt::Debug for RedactorCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedactorCache")
            .field("generation", &self.generation())
            .finish_non_exhaustive()
    }
}

impl RedactorCache {
    /// Marks the cached redactor stale: call it after a secret is stored or removed.
    pub fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// The current generation; read it before listing the stored secrets for a rebuild.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The cached redactor, if it was built at `generation`.
    pub fn current(&self, generation: u64) -> Option<Redactor> {
        let built = self.built.lock().unwrap_or_else(|e| e.into_inner());
        built
            .as_ref()
            .filter(|b| b.generation == generation)
            .map(|b| b.redactor.clone())
    }

    /// Builds the redactor of `sealed` (name, blob) as of `generation`, opening with `key` only
    /// the blobs that are new or changed since the last build, and caches it.
    pub fn rebuild(
        &self,
        key: &SecretKey,
        generation: u64,
        sealed: impl IntoIterator<Item = (String, Vec<u8>)>,
    ) -> Redactor {
        let mut built = self.built.lock().unwrap_or_else(|e| e.into_inner());
        let mut previous = built.take().map(|b| b.opened).unwrap_or_default();
        let mut opened = BTreeMap::new();
        for (name, blob) in sealed {
            let value = match previous.remove(&name) {
                Some((old_blob, value)) if old_blob == blob => value,
                _ => match key.open(&name, &blob) {
                    Ok(value) => value,
                    Err(e) => {
                        tracing::debug!(secret = %name, "not redacted: {e}");
                        continue;
                    }
                },
            };
            opened.insert(name, (blob, value));
        }
        let redactor = Redactor::with_values(opened.values().map(|(_, v)| v));
        *built = Some(BuiltRedactor {
            generation,
            redactor: redactor.clone(),
            opened,
        });
        redactor
    }
}

/// The associated data a blob is bound to: its format version and the secret's name.
fn associated_data(name: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(1 + name.len());
    aad.push(BLOB_VERSION);
    aad.extend_from_slice(name.as_bytes());
    aad
}

fn write_new_private_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions, cannot fail and touches no memory of ours.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::Permissions;

    fn key() -> SecretKey {
        SecretKey::from_bytes(&[7u8; KEY_LEN])
    }

    #[test]
    fn a_sealed_value_opens_under_its_name() {
        let key = key();
        let blob = key.seal("DB_PASSWORD", b"hunter2").unwrap();
        assert_eq!(blob.len(), 1 + NONCE_LEN + 7 + TAG_LEN);
        assert_eq!(blob[0], BLOB_VERSION);
        assert!(!blob.windows(7).any(|window| window == b"hunter2"));
        assert_eq!(
            key.open("DB_PASSWORD", &blob).unwrap().as_bytes(),
            b"hunter2"
        );
        // Fresh nonce each time.
        let again = key.seal("DB_PASSWORD", b"hunter2").unwrap();
        assert_ne!(blob, again);
        assert_eq!(
            key.open("DB_PASSWORD", &again).unwrap().as_str(),
            Some("hunter2")
        );
        // The empty value works too.
        let empty = key.seal("EMPTY", b"").unwrap();
        assert_eq!(key.open("EMPTY", &empty).unwrap().as_bytes(), b"");
    }

    #[test]
    fn a_blob_does_not_open_under_another_name_or_key() {
        let key = key();
        let blob = key.seal("DB_PASSWORD", b"hunter2").unwrap();
        let error = key.open("API_KEY", &blob).unwrap_err();
        assert!(
            matches!(&error, SecretsError::Open { name } if name == "API_KEY"),
            "{error:?}"
        );
        assert!(error.to_string().contains("API_KEY"), "{error}");
        let other = SecretKey::from_bytes(&[8u8; KEY_LEN]);
        assert!(matches!(
            other.open("DB_PASSWORD", &blob),
            Err(SecretsError::Open { .. })
        ));
    }

    #[test]
    fn a_tampered_blob_does_not_open() {
        let key = key();
        let blob = key.seal("DB_PASSWORD", b"hunter2").unwrap();
        for index in 0..blob.len() {
            let mut tampered = blob.clone();
            tampered[index] ^= 0x01;
            let result = key.open("DB_PASSWORD", &tampered);
            assert!(result.is_err(), "flipping byte {index} went unnoticed");
        }
        assert!(matches!(
            key.open("DB_PASSWORD", &blob[..blob.len() - 1]),
            Err(SecretsError::Open { .. })
        ));
        assert!(matches!(
            key.open("DB_PASSWORD", &blob[..10]),
            Err(SecretsError::MalformedBlob { .. })
        ));
        assert!(matches!(
            key.open("DB_PASSWORD", &[]),
            Err(SecretsError::MalformedBlob { .. })
        ));
    }

    #[test]
    fn the_key_file_is_created_private_once_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let created = SecretKey::load_or_create(dir.path()).unwrap();
        let path = dir.path().join(KEY_FILE_NAME);
        assert_eq!(created.path(), Some(path.as_path()));
        let metadata = fs::metadata(&path).unwrap();
        assert_eq!(metadata.permissions().mode() & 0o7777, 0o600);
        assert_eq!(metadata.len(), KEY_LEN as u64);
        assert_eq!(metadata.uid(), effective_uid());
        let bytes = fs::read(&path).unwrap();
        // No temporary files left beside it.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, [KEY_FILE_NAME]);

        let blob = created.seal("X", b"value").unwrap();
        let loaded = SecretKey::load_or_create(dir.path()).unwrap();
        assert_eq!(fs::read(&path).unwrap(), bytes, "the key was replaced");
        assert_eq!(loaded.open("X", &blob).unwrap().as_bytes(), b"value");
        // create never overwrites: it falls back to the existing key.
        let racing = SecretKey::create(&path).unwrap();
        assert_eq!(racing.open("X", &blob).unwrap().as_bytes(), b"value");
        assert_eq!(fs::read(&path).unwrap(), bytes);
    }

    #[test]
    fn a_key_file_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        SecretKey::load_or_create(dir.path()).unwrap();
        let path = dir.path().join(KEY_FILE_NAME);
        for mode in [0o644, 0o640, 0o604, 0o620, 0o602] {
            fs::set_permissions(&path, Permissions::from_mode(mode)).unwrap();
            let error = SecretKey::load_or_create(dir.path()).unwrap_err();
            assert!(
                matches!(&error, SecretsError::KeyFileMode { mode: found, .. } if *found == mode),
                "{error:?}"
            );
            let message = error.to_string();
            assert!(message.contains(&path.display().to_string()), "{message}");
            assert!(message.contains(&format!("{mode:04o}")), "{message}");
        }
        fs::set_permissions(&path, Permissions::from_mode(0o400)).unwrap();
        SecretKey::load(&path).unwrap();
    }

    #[test]
    fn a_key_file_of_the_wrong_size_or_kind_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE_NAME);
        write_new_private_file(&path, &[1u8; 16]).unwrap();
        assert!(matches!(
            SecretKey::load(&path),
            Err(SecretsError::KeyFileLength { len: 16, .. })
        ));
        fs::remove_file(&path).unwrap();
        let target = dir.path().join("elsewhere");
        write_new_private_file(&target, &[1u8; KEY_LEN]).unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let error = SecretKey::load(&path).unwrap_err();
        assert!(matches!(error, SecretsError::KeyFileIo { .. }), "{error:?}");
    }

    #[test]
    fn a_key_file_owned_by_another_user_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        SecretKey::load_or_create(dir.path()).unwrap();
        let path = dir.path().join(KEY_FILE_NAME);
        let other = effective_uid().wrapping_add(4242);
        std::os::unix::fs::chown(&path, Some(other), None).unwrap();
        let error = SecretKey::load(&path).unwrap_err();
        assert!(
            matches!(&error, SecretsError::KeyFileOwner { owner, .. } if *owner == other),
            "{error:?}"
        );
    }

    #[test]
    fn debug_output_never_shows_values_or_keys() {
        let value = SecretValue::from("hunter2");
        assert_eq!(format!("{value:?}"), "SecretValue([redacted])");
        let key = key();
        let shown = format!("{key:?}");
        assert!(shown.contains(REDACTED), "{shown}");
        assert!(!shown.contains("7, 7"), "{shown}");
        let redactor = Redactor::with_values([&value]);
        assert!(!format!("{redactor:?}").contains("hunter2"));
    }

    #[test]
    fn the_redactor_replaces_every_known_value() {
        let redactor = Redactor::with_values(&[
            SecretValue::from("hunter2"),
            SecretValue::from("hunter22"),
            SecretValue::from("pa\"ss"),
            SecretValue::from("line-one\nline-two"),
            SecretValue::from(""),
            SecretValue::new(vec![0xff, 0xfe]),
        ]);
        let cases = [
            ("nothing here", "nothing here"),
            ("password=hunter2.", "password=[redacted]."),
            ("hunter22 and hunter2", "[redacted] and [redacted]"),
            ("hunter2hunter2", "[redacted][redacted]"),
            ("{\"p\":\"pa\\\"ss\"}", "{\"p\":\"[redacted]\"}"),
            ("raw pa\"ss", "raw [redacted]"),
            ("got line-two only", "got [redacted] only"),
            ("é hunter2 ü", "é [redacted] ü"),
        ];
        for (input, expected) in cases {
            assert_eq!(redactor.redact(input), expected, "{input}");
        }
        assert!(matches!(redactor.redact("nothing here"), Cow::Borrowed(_)));
        assert!(Redactor::new().redact("hunter2") == "hunter2");
    }

    #[test]
    fn secret_names_follow_the_documented_rules() {
        for name in [
            "DB_PASSWORD",
            "db-password",
            "_x",
            "a",
            "9lives",
            "app.env.key",
            &"a".repeat(128),
        ] {
            validate_secret_name(name).unwrap_or_else(|error| panic!("{name}: {error}"));
        }
        for name in [
            "",
            "-flag",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a b",
            "ключ",
            "a:b",
            "a\n",
            &"a".repeat(129),
        ] {
            let error = validate_secret_name(name).unwrap_err();
            assert!(
                matches!(error, SecretsError::InvalidName { .. }),
                "{name}: {error:?}"
            );
        }
        let error = validate_secret_name("a/b").unwrap_err();
        assert_eq!(
            error.to_string(),
            "invalid secret name \"a/b\": only letters, digits, '_', '.' and '-' are allowed"
        );
        assert!(validate_secret_name(&registry_credential_label("ghcr.io")).is_err());
    }
}
