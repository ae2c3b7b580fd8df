//! The names the daemon accepts: service and volume names (DNS labels), hostnames, environment
//! variable names and secret names.

/// Why a name was refused; the message says what is expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error(
        "{name:?} is not a DNS label (expected 1 to 63 lowercase letters, digits and hyphens, not starting or ending with a hyphen)"
    )]
    Label { name: String },
    #[error(
        "{name:?} is not a DNS name (expected dot-separated labels of lowercase letters, digits and hyphens, at most 253 characters)"
    )]
    DnsName { name: String },
    #[error(
        "{name:?} is not an environment variable name (expected letters, digits and underscores, not starting with a digit)"
    )]
    EnvName { name: String },
    #[error(
        "{name:?} is not a secret name (expected 1 to 128 letters, digits, '-', '_' and '.', starting with a letter or digit)"
    )]
    SecretName { name: String },
}

/// A DNS label: 1..=63 lowercase ASCII letters, digits and hyphens, no hyphen at either end.
pub fn check_label(name: &str) -> Result<(), NameError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(NameError::Label {
            name: name.to_string(),
        })
    }
}

/// A DNS name of one or more labels (`api.example.com`, `foo.localhost`), without a trailing dot.
pub fn check_dns_name(name: &str) -> Result<(), NameError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| check_label(label).is_ok());
    if ok {
        Ok(())
    } else {
        Err(NameError::DnsName {
            name: name.to_string(),
        })
    }
}

/// A POSIX-portable environment variable name: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn check_env_name(name: &str) -> Result<(), NameError> {
    let mut bytes = name.bytes();
    let ok = matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(NameError::EnvName {
            name: name.to_string(),
        })
    }
}

/// A lull secret's name: 1..=128 of `[A-Za-z0-9._-]`, starting with a letter or digit.
pub fn check_secret_name(name: &str) -> Result<(), NameError> {
    let mut bytes = name.bytes();
    let ok = name.len() <= 128
        && matches!(bytes.next(), Some(b) if b.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(NameError::SecretName {
            name: name.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        for good in ["foo", "a", "a1", "my-app", "0day", &"x".repeat(63)] {
            assert!(check_label(good).is_ok(), "{good}");
        }
        for bad in ["", "-a", "a-", "Foo", "a_b", "a.b", &"x".repeat(64), "é"] {
            assert!(check_label(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn dns_names() {
        for good in ["foo.localhost", "a.b.c", "api.example.com", "foo"] {
            assert!(check_dns_name(good).is_ok(), "{good}");
        }
        for bad in ["", "foo.", ".foo", "a..b", "Foo.com", "a_b.com"] {
            assert!(check_dns_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn env_and_secret_names() {
        for good in ["PORT", "_X", "db_pass2", "a"] {
            assert!(check_env_name(good).is_ok(), "{good}");
        }
        for bad in ["", "1X", "A-B", "A B", "A=B"] {
            assert!(check_env_name(bad).is_err(), "{bad}");
        }
        for good in ["db-pass", "DB_PASS", "prod.db.pass", "x"] {
            assert!(check_secret_name(good).is_ok(), "{good}");
        }
        for bad in ["", "-x", "a/b", "a:b", &"x".repeat(129)] {
            assert!(check_secret_name(bad).is_err(), "{bad}");
        }
    }
}
