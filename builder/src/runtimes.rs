//! App Runner's managed runtimes as lull knows them: which names exist (spelled as App Runner
//! spells them), which lull builds, on which base image, with which default environment and
//! package-manager caches. Pure data and lookups; the daemon maps a runtime's
//! [`Runtime::base_image`] key to an image reference in its own settings.
//!
//! What lull builds:
//!
//! | App Runner name      | lull                                                            |
//! |----------------------|-----------------------------------------------------------------|
//! | `python311`          | Debian 12's Python 3.11                                         |
//! | `python3`            | an alias of `python311` (App Runner's python3 is an older 3.x; |
//! |                      | lull has only Debian 12's 3.11)                                 |
//! | `nodejs18`           | Debian 12's Node 18                                             |
//! | `nodejs20`,`nodejs22`| only when a base image is configured for them                   |
//! | `nodejs12/14/16`     | refused: use nodejs18                                           |
//! | `corretto8/11`, `go1`, `dotnet6`, `php81`, `ruby31` | refused: build an image elsewhere |
//!
//! `run.runtime-version` is checked against the version the base image has, component by
//! component for as many components as both have: python311's `3.11` accepts `3`, `3.11` and
//! `3.11.9` (Debian ships one 3.11 patch level; patch levels do not change the language) but
//! not `3.12` or `3.8.16`; nodejs18's `18` accepts `18`, `18.19.0` and `18.20.4` (Node keeps a
//! major line compatible) but not `20`.

use std::fmt;

/// The language a runtime runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RuntimeKind {
    Python,
    Node,
}

impl fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RuntimeKind::Python => "Python",
            RuntimeKind::Node => "Node.js",
        })
    }
}

/// A directory a package manager keeps its downloads in. Builds mount it from a per-runtime
/// cache so it never lands in a layer and is shared between builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackageCache {
    /// `pip`, `npm`, ...
    pub tool: &'static str,
    /// An absolute path in the build sandbox (builds run as root).
    pub path: &'static str,
}

/// A runtime lull builds.
#[derive(Debug, PartialEq, Eq)]
pub struct Runtime {
    /// The canonical App Runner name (`python311`, never the alias `python3`).
    pub name: &'static str,
    pub kind: RuntimeKind,
    /// The version the base image has, as precise as lull can promise (`3.11`, `18`).
    pub version: &'static str,
    /// The key the daemon's settings map to a base image reference.
    pub base_image: &'static str,
    /// Whether lull knows how to make this base image itself (from Debian 12 packages); when
    /// false, the runtime is usable only when the daemon's settings name an image for
    /// [`Runtime::base_image`].
    pub builtin_image: bool,
    /// Variables set for builds and for the app (the image's `Env`).
    pub env: &'static [(&'static str, &'static str)],
    /// Variables set for builds only (build commands and `run.pre-run`).
    pub build_env: &'static [(&'static str, &'static str)],
    pub caches: &'static [PackageCache],
}

const PYTHON_ENV: &[(&str, &str)] = &[("PYTHONUNBUFFERED", "1")];
/// Debian 12 marks its Python "externally managed" (PEP 668) and pip then refuses to install
/// outside a virtualenv; App Runner's images let `pip install` install system-wide, and files
/// written for App Runner expect that.
const PYTHON_BUILD_ENV: &[(&str, &str)] = &[("PIP_BREAK_SYSTEM_PACKAGES", "1")];
const PYTHON_CACHES: &[PackageCache] = &[
    PackageCache {
        tool: "pip",
        path: "/root/.cache/pip",
    },
    PackageCache {
        tool: "uv",
        path: "/root/.cache/uv",
    },
    PackageCache {
        tool: "pipenv",
        path: "/root/.cache/pipenv",
    },
];
const NODE_CACHES: &[PackageCache] = &[
    PackageCache {
        tool: "npm",
        path: "/root/.npm",
    },
    PackageCache {
        tool: "yarn",
        path: "/usr/local/share/.cache/yarn",
    },
    PackageCache {
        tool: "pnpm",
        path: "/root/.local/share/pnpm/store",
    },
];

const fn node(name: &'static str, version: &'static str, builtin_image: bool) -> Runtime {
    Runtime {
        name,
        kind: RuntimeKind::Node,
        version,
        base_image: name,
        builtin_image,
        // App Runner sets no NODE_ENV; neither does lull.
        env: &[],
        build_env: &[],
        caches: NODE_CACHES,
    }
}

/// Every runtime lull builds.
pub static RUNTIMES: &[Runtime] = &[
    Runtime {
        name: "python311",
        kind: RuntimeKind::Python,
        version: "3.11",
        base_image: "python311",
        builtin_image: true,
        env: PYTHON_ENV,
        build_env: PYTHON_BUILD_ENV,
        caches: PYTHON_CACHES,
    },
    node("nodejs18", "18", true),
    node("nodejs20", "20", false),
    node("nodejs22", "22", false),
];

/// Other App Runner names that mean a runtime of [`RUNTIMES`].
pub const ALIASES: &[(&str, &str)] = &[("python3", "python311")];

/// App Runner names lull does not build, each with what to do instead.
pub const UNSUPPORTED: &[(&str, &str)] = &[
    ("nodejs12", NODE_OLD),
    ("nodejs14", NODE_OLD),
    ("nodejs16", NODE_OLD),
    ("corretto8", ELSEWHERE),
    ("corretto11", ELSEWHERE),
    ("go1", ELSEWHERE),
    ("dotnet6", ELSEWHERE),
    ("php81", ELSEWHERE),
    ("ruby31", ELSEWHERE),
];

const NODE_OLD: &str =
    "use runtime nodejs18 (apps written for older Node versions usually run on 18 unchanged)";
const ELSEWHERE: &str =
    "build an image elsewhere and run it with `lull service create NAME --image REF`";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeError {
    #[error("unknown runtime {name:?} (App Runner's runtimes are {})", known_names().join(", "))]
    Unknown { name: String },
    #[error("unknown runtime {name:?} (App Runner spells it {canonical})")]
    Misspelled {
        name: String,
        canonical: &'static str,
    },
    #[error("lull does not support runtime {name} yet: {advice}")]
    Unsupported { name: String, advice: &'static str },
    #[error("{version:?} is not a version (expected numbers with dots, such as {example})")]
    BadVersion {
        version: String,
        example: &'static str,
    },
    #[error(
        "runtime {runtime} has {kind} {available}, which does not satisfy runtime-version {version} (use {available} or leave runtime-version out)"
    )]
    VersionUnavailable {
        runtime: &'static str,
        kind: RuntimeKind,
        available: &'static str,
        version: String,
    },
}

/// Every name App Runner knows, lull-built or not, in a stable order.
pub fn known_names() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = RUNTIMES
        .iter()
        .map(|r| r.name)
        .chain(ALIASES.iter().map(|(alias, _)| *alias))
        .chain(UNSUPPORTED.iter().map(|(name, _)| *name))
        .collect();
    names.sort_by_key(|name| sort_key(name));
    names
}

/// `nodejs8` before `nodejs18`: the letters, then the number.
fn sort_key(name: &str) -> (String, u32) {
    let split = name
        .find(|c: char| c.is_ascii_digit())
        .unwrap_or(name.len());
    (
        name[..split].to_string(),
        name[split..].parse().unwrap_or(0),
    )
}

/// Whether App Runner knows `name` (whether or not lull builds it).
pub fn is_known(name: &str) -> bool {
    known_names().contains(&name)
}

/// The App Runner name a misspelling means: `python3.11`, `Python-3.11` → `python311`;
/// `nodejs-18`, `node18`, `nodejs18.x` → `nodejs18`; `python-3` → `python3`. `None` when `name`
/// is spelled right or means nothing known.
pub fn canonical_spelling(name: &str) -> Option<&'static str> {
    if is_known(name) {
        return None;
    }
    let mut squashed: String = name
        .to_ascii_lowercase()
        .chars()
        .filter(|c| !matches!(c, '.' | '-' | '_' | ' '))
        .collect();
    if let Some(stripped) = squashed.strip_suffix('x') {
        squashed = stripped.to_string();
    }
    for (from, to) in [
        ("nodejs", "nodejs"),
        ("node", "nodejs"),
        ("python", "python"),
        ("py", "python"),
        ("corretto", "corretto"),
        ("java", "corretto"),
        ("golang", "go"),
        ("go", "go"),
        ("dotnet", "dotnet"),
        ("php", "php"),
        ("ruby", "ruby"),
    ] {
        if let Some(rest) = squashed.strip_prefix(from) {
            let candidate = format!("{to}{rest}");
            return known_names().into_iter().find(|n| *n == candidate);
        }
    }
    None
}

/// The runtime `runtime` names, checked against `runtime_version` when given.
pub fn resolve(
    runtime: &str,
    runtime_version: Option<&str>,
) -> Result<&'static Runtime, RuntimeError> {
    let name = ALIASES
        .iter()
        .find(|(alias, _)| *alias == runtime)
        .map_or(runtime, |(_, target)| *target);
    let Some(found) = RUNTIMES.iter().find(|r| r.name == name) else {
        if let Some((name, advice)) = UNSUPPORTED.iter().find(|(n, _)| *n == runtime) {
            return Err(RuntimeError::Unsupported {
                name: name.to_string(),
                advice,
            });
        }
        return Err(match canonical_spelling(runtime) {
            Some(canonical) => RuntimeError::Misspelled {
                name: runtime.to_string(),
                canonical,
            },
            None => RuntimeError::Unknown {
                name: runtime.to_string(),
            },
        });
    };
    if let Some(version) = runtime_version {
        found.check_version(version)?;
    }
    Ok(found)
}

impl Runtime {
    /// Whether `version` (`run.runtime-version`) is satisfied by this runtime's version; see
    /// the module's docs.
    pub fn check_version(&self, version: &str) -> Result<(), RuntimeError> {
        let example = match self.kind {
            RuntimeKind::Python => "3.11",
            RuntimeKind::Node => "18.19.0",
        };
        let wanted: Option<Vec<u32>> = version
            .trim()
            .split('.')
            .map(|part| part.parse::<u32>().ok())
            .collect();
        let Some(wanted) = wanted else {
            return Err(RuntimeError::BadVersion {
                version: version.to_string(),
                example,
            });
        };
        let have = self
            .version
            .split('.')
            .map(|p| p.parse::<u32>().unwrap_or(0));
        if have.zip(&wanted).all(|(h, w)| h == *w) {
            Ok(())
        } else {
            Err(RuntimeError::VersionUnavailable {
                runtime: self.name,
                kind: self.kind,
                available: self.version,
                version: version.to_string(),
            })
        }
    }

    /// Whether this runtime can build given which base-image keys the daemon's settings name.
    pub fn is_available(&self, configured: impl Fn(&str) -> bool) -> bool {
        self.builtin_image || configured(self.base_image)
    }

    /// The environment of a build before `build.env`: [`Runtime::env`] then
    /// [`Runtime::build_env`].
    pub fn build_defaults(&self) -> impl Iterator<Item = (&'static str, &'static str)> {
        self.env.iter().chain(self.build_env).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolution() {
        struct Case {
            runtime: &'static str,
            version: Option<&'static str>,
            want: Result<&'static str, &'static str>,
        }
        let ok = |runtime, version, name| Case {
            runtime,
            version,
            want: Ok(name),
        };
        let err = |runtime, version, message| Case {
            runtime,
            version,
            want: Err(message),
        };
        let cases = [
            ok("python3", None, "python311"),
            ok("python311", None, "python311"),
            ok("python3", Some("3.11"), "python311"),
            ok("python311", Some("3.11.9"), "python311"),
            ok("python311", Some("3"), "python311"),
            ok("nodejs18", Some("18.19.0"), "nodejs18"),
            ok("nodejs18", Some("18"), "nodejs18"),
            ok("nodejs18", Some("18.20.4"), "nodejs18"),
            ok("nodejs20", None, "nodejs20"),
            ok("nodejs22", Some("22.11.0"), "nodejs22"),
            err(
                "python3",
                Some("3.8.16"),
                "runtime python311 has Python 3.11, which does not satisfy runtime-version 3.8.16 (use 3.11 or leave runtime-version out)",
            ),
            err(
                "python311",
                Some("3.12"),
                "runtime python311 has Python 3.11, which does not satisfy runtime-version 3.12 (use 3.11 or leave runtime-version out)",
            ),
            err(
                "nodejs18",
                Some("20.1.0"),
                "runtime nodejs18 has Node.js 18, which does not satisfy runtime-version 20.1.0 (use 18 or leave runtime-version out)",
            ),
            err(
                "nodejs18",
                Some("18.x"),
                "\"18.x\" is not a version (expected numbers with dots, such as 18.19.0)",
            ),
            err(
                "python3",
                Some(""),
                "\"\" is not a version (expected numbers with dots, such as 3.11)",
            ),
            err(
                "nodejs16",
                None,
                "lull does not support runtime nodejs16 yet: use runtime nodejs18 (apps written for older Node versions usually run on 18 unchanged)",
            ),
            err(
                "go1",
                None,
                "lull does not support runtime go1 yet: build an image elsewhere and run it with `lull service create NAME --image REF`",
            ),
            err(
                "corretto11",
                Some("11"),
                "lull does not support runtime corretto11 yet: build an image elsewhere and run it with `lull service create NAME --image REF`",
            ),
            err(
                "python3.11",
                None,
                "unknown runtime \"python3.11\" (App Runner spells it python311)",
            ),
            err(
                "nodejs-18",
                None,
                "unknown runtime \"nodejs-18\" (App Runner spells it nodejs18)",
            ),
            err(
                "cobol",
                None,
                "unknown runtime \"cobol\" (App Runner's runtimes are corretto8, corretto11, dotnet6, go1, nodejs12, nodejs14, nodejs16, nodejs18, nodejs20, nodejs22, php81, python3, python311, ruby31)",
            ),
        ];
        for case in cases {
            let got = resolve(case.runtime, case.version)
                .map(|r| r.name)
                .map_err(|e| e.to_string());
            assert_eq!(
                got,
                case.want.map_err(str::to_string),
                "{} {:?}",
                case.runtime,
                case.version
            );
        }
    }

    #[test]
    fn misspellings() {
        for (written, canonical) in [
            ("python3.11", Some("python311")),
            ("Python-3.11", Some("python311")),
            ("python-3", Some("python3")),
            ("py311", Some("python311")),
            ("nodejs-18", Some("nodejs18")),
            ("node18", Some("nodejs18")),
            ("nodejs18.x", Some("nodejs18")),
            ("NodeJS 22", Some("nodejs22")),
            ("golang1", Some("go1")),
            ("java11", Some("corretto11")),
            ("python311", None),
            ("nodejs18", None),
            ("python3.8", None),
            ("rust1", None),
        ] {
            assert_eq!(canonical_spelling(written), canonical, "{written}");
        }
    }

    #[test]
    fn data() {
        let python = resolve("python3", None).unwrap();
        assert_eq!(python.kind, RuntimeKind::Python);
        assert_eq!(python.base_image, "python311");
        assert!(python.env.contains(&("PYTHONUNBUFFERED", "1")));
        assert!(python.caches.iter().any(|c| c.path == "/root/.cache/pip"));
        let node = resolve("nodejs18", None).unwrap();
        assert!(node.env.iter().all(|(name, _)| *name != "NODE_ENV"));
        let paths: Vec<&str> = node.caches.iter().map(|c| c.path).collect();
        assert!(paths.contains(&"/root/.npm"));
        assert!(paths.contains(&"/usr/local/share/.cache/yarn"));
        // nodejs22 builds only with a configured base image.
        let n22 = resolve("nodejs22", None).unwrap();
        assert!(!n22.is_available(|_| false));
        assert!(n22.is_available(|key| key == "nodejs22"));
        assert!(node.is_available(|_| false));
    }
}
