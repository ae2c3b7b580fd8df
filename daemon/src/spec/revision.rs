//! Revisions: immutable, numbered snapshots of a spec, each with the human reason it was made
//! ("image changed, env FOO changed"). Any change of code or configuration makes one; an update
//! that changes nothing does not.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::ServiceSpec;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revision {
    pub service: String,
    /// 1, 2, ...
    pub number: u64,
    /// RFC 3339, UTC, whole seconds (`2026-11-26T10:00:00Z`).
    #[serde(with = "rfc3339")]
    pub created_at: DateTime<Utc>,
    pub spec: ServiceSpec,
    pub cause: String,
}

impl Revision {
    /// Revision 1 of a new service.
    pub fn first(spec: ServiceSpec, now: DateTime<Utc>) -> Revision {
        Revision {
            service: spec.name.clone(),
            number: 1,
            created_at: now,
            spec,
            cause: "created".to_string(),
        }
    }

    /// The revision after `self` for `spec`, or `None` when nothing changed.
    pub fn next(&self, spec: ServiceSpec, now: DateTime<Utc>) -> Option<Revision> {
        let changes = changes(&self.spec, &spec);
        if changes.is_empty() {
            return None;
        }
        Some(self.successor(spec, changes.join(", "), now))
    }

    /// The revision after `self` with a cause given by the caller ("rollback to 3", or
    /// [`secret_changed_cause`] when a secret's value changed under an unchanged spec).
    pub fn successor(&self, spec: ServiceSpec, cause: String, now: DateTime<Utc>) -> Revision {
        Revision {
            service: self.service.clone(),
            number: self.number + 1,
            created_at: now,
            spec,
            cause,
        }
    }
}

/// The cause of a revision made because secret `name`'s value changed.
pub fn secret_changed_cause(name: &str) -> String {
    format!("secret {name} changed")
}

/// What differs from `old` to `new`, one phrase per change, in field order: `image changed`,
/// `env FOO added`, `env BAR changed`, `secret DB_PASS removed`, `size.memory changed`,
/// `health_check.path changed`. Empty when the specs are the same.
pub fn changes(old: &ServiceSpec, new: &ServiceSpec) -> Vec<String> {
    let (old_json, new_json) = (old.to_json(), new.to_json());
    let (Value::Object(a), Value::Object(b)) = (&old_json, &new_json) else {
        return Vec::new();
    };
    let mut keys: Vec<&String> = FIELD_ORDER
        .iter()
        .filter_map(|k| b.get_key_value(*k).map(|(k, _)| k))
        .collect();
    keys.extend(b.keys().filter(|k| !FIELD_ORDER.contains(&k.as_str())));
    let mut out = Vec::new();
    for key in keys {
        let new_value = &b[key];
        let old_value = a.get(key).unwrap_or(&Value::Null);
        if old_value == new_value {
            continue;
        }
        match key.as_str() {
            "source" => out.push("image changed".to_string()),
            "env" => keyed(&mut out, "env", old_value, new_value, |v| v["name"].clone()),
            "secrets" => keyed(&mut out, "secret", old_value, new_value, |v| {
                if v["env"].is_string() {
                    v["env"].clone()
                } else {
                    v["file"].clone()
                }
            }),
            _ => nested(&mut out, key, old_value, new_value),
        }
    }
    out
}

/// The JSON form's fields in the order causes list them.
const FIELD_ORDER: &[&str] = &[
    "name",
    "source",
    "hostnames",
    "command",
    "args",
    "port",
    "env",
    "secrets",
    "size",
    "min_instances",
    "max_instances",
    "scaling",
    "volumes",
    "pids_limit",
    "max_concurrency",
    "queue",
    "timeouts",
    "health_check",
    "cpu_mode",
    "idle_delay",
    "freeze_after",
    "https_redirect",
    "hsts",
];

/// Changes of a list of entries named by `id`.
fn keyed(out: &mut Vec<String>, what: &str, old: &Value, new: &Value, id: fn(&Value) -> Value) {
    let empty = Vec::new();
    let old = old.as_array().unwrap_or(&empty);
    let new = new.as_array().unwrap_or(&empty);
    let name = |v: &Value| match id(v) {
        Value::String(s) => s,
        other => other.to_string(),
    };
    let mut local = Vec::new();
    for entry in new {
        match old.iter().find(|o| id(o) == id(entry)) {
            None => local.push(format!("{what} {} added", name(entry))),
            Some(o) if o != entry => local.push(format!("{what} {} changed", name(entry))),
            Some(_) => {}
        }
    }
    for entry in old {
        if !new.iter().any(|n| id(n) == id(entry)) {
            local.push(format!("{what} {} removed", name(entry)));
        }
    }
    if local.is_empty() && old != new {
        local.push(format!("{what} order changed"));
    }
    out.extend(local);
}

/// `a.b changed` for each leaf that differs in two objects; `a changed` otherwise.
fn nested(out: &mut Vec<String>, path: &str, old: &Value, new: &Value) {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = b.keys().collect();
            keys.extend(a.keys().filter(|k| !b.contains_key(*k)));
            for key in keys {
                let (x, y) = (
                    a.get(key).unwrap_or(&Value::Null),
                    b.get(key).unwrap_or(&Value::Null),
                );
                if x != y {
                    nested(out, &format!("{path}.{key}"), x, y);
                }
            }
        }
        _ => out.push(format!("{path} changed")),
    }
}

mod rfc3339 {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&value.to_rfc3339_opts(SecondsFormat::AutoSi, true))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let text = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&text)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| serde::de::Error::custom(format!("{text:?} is not an RFC 3339 time: {e}")))
    }
}

impl Revision {
    /// `created_at` as RFC 3339 UTC text.
    pub fn created_at_text(&self) -> String {
        self.created_at.to_rfc3339_opts(SecondsFormat::AutoSi, true)
    }
}
