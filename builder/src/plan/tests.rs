use std::collections::BTreeMap;

use super::*;
use crate::apprunner::{BuildCommands, BuildSection, EnvEntry};

const DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

fn config(runtime: &str, pre_build: &[&str], build: &[&str]) -> AppRunnerConfig {
    AppRunnerConfig {
        version: "1.0".into(),
        runtime: Some(runtime.into()),
        build: Some(BuildSection {
            commands: BuildCommands {
                pre_build: pre_build.iter().map(|s| s.to_string()).collect(),
                build: build.iter().map(|s| s.to_string()).collect(),
                post_build: vec!["echo done".into()],
            },
            env: vec![],
        }),
        run: RunSection {
            command: Some("python app.py".into()),
            ..RunSection::default()
        },
    }
}

fn files(list: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
    list.iter()
        .map(|(p, t)| (p.to_string(), t.as_bytes().to_vec()))
        .collect()
}

fn run(
    config: &AppRunnerConfig,
    source: &BTreeMap<String, Vec<u8>>,
) -> Result<BuildPlan, PlanError> {
    let listing: Vec<String> = source.keys().cloned().collect();
    let read = |p: &str| {
        source
            .get(p)
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, p.to_string()))
    };
    plan(config, &listing, &read, DIGEST)
}

fn lines(step: &Step) -> Vec<&str> {
    step.commands.iter().map(|c| c.line.as_str()).collect()
}

fn hoisted(plan: &BuildPlan) -> Vec<&str> {
    plan.dependency_step
        .as_ref()
        .map(|d| d.commands.iter().map(|c| c.line.as_str()).collect())
        .unwrap_or_default()
}

fn manifests(plan: &BuildPlan) -> Vec<&str> {
    plan.dependency_step
        .as_ref()
        .map(|d| d.manifests.iter().map(|m| m.path.as_str()).collect())
        .unwrap_or_default()
}

#[test]
fn hoisting() {
    let py = files(&[
        ("requirements.txt", "flask==3.0\n-r requirements/base.txt\n"),
        (
            "requirements/base.txt",
            "gunicorn # the server\n-c ../constraints.txt\n",
        ),
        ("constraints.txt", "werkzeug<4\n"),
        ("requirements-dev.txt", "pytest\n"),
        ("requirements-edit.txt", "-e .\n"),
        ("requirements-local.txt", "./vendor/pkg\n"),
        ("app.py", "print(1)\n"),
        ("pyproject.toml", "[project]\nname = \"x\"\n"),
        ("uv.lock", "version = 1\n"),
        ("Pipfile", "[packages]\nflask = \"*\"\n"),
        ("Pipfile.lock", "{}\n"),
    ]);
    let node = files(&[
        ("package.json", r#"{"dependencies": {"express": "^4"}}"#),
        ("package-lock.json", "{}"),
        ("yarn.lock", ""),
        (".npmrc", "registry=https://r.example/\n"),
        (".yarnrc.yml", "yarnPath: .yarn/releases/yarn-4.cjs\n"),
        (".yarn/releases/yarn-4.cjs", "//"),
        ("server.js", ""),
    ]);
    let with_postinstall = files(&[(
        "package.json",
        r#"{"scripts": {"postinstall": "prisma generate"}}"#,
    )]);
    let with_local_dep = files(&[("package.json", r#"{"dependencies": {"lib": "file:./lib"}}"#)]);
    struct Case {
        name: &'static str,
        runtime: &'static str,
        source: &'static BTreeMap<String, Vec<u8>>,
        pre_build: &'static [&'static str],
        build: &'static [&'static str],
        hoisted: &'static [&'static str],
        manifests: &'static [&'static str],
        full: &'static [&'static str],
        not_hoisted: Option<&'static str>,
    }
    // Leak the fixtures: the table borrows them for 'static.
    let py: &'static _ = Box::leak(Box::new(py));
    let node: &'static _ = Box::leak(Box::new(node));
    let with_postinstall: &'static _ = Box::leak(Box::new(with_postinstall));
    let with_local_dep: &'static _ = Box::leak(Box::new(with_local_dep));
    let cases = [
        Case {
            name: "leading pip commands, nested requirement files followed",
            runtime: "python3",
            source: py,
            pre_build: &["pip install --upgrade pip"],
            build: &[
                "pip3 install --no-cache-dir -r requirements.txt",
                "python manage.py collectstatic",
                "pip install -r requirements-dev.txt",
            ],
            hoisted: &[
                "pip install --upgrade pip",
                "pip3 install --no-cache-dir -r requirements.txt",
            ],
            manifests: &[
                "constraints.txt",
                "requirements.txt",
                "requirements/base.txt",
            ],
            full: &[
                "python manage.py collectstatic",
                "pip install -r requirements-dev.txt",
                "echo done",
            ],
            not_hoisted: None,
        },
        Case {
            name: "python -m pip, attached and = values, /app paths",
            runtime: "python311",
            source: py,
            pre_build: &[],
            build: &[
                "python3 -m pip install --user -U -rrequirements-dev.txt --index-url=https://pypi.org/simple",
                "python -m pip install -r /app/requirements/base.txt 'uvicorn[standard]'",
            ],
            hoisted: &[
                "python3 -m pip install --user -U -rrequirements-dev.txt --index-url=https://pypi.org/simple",
                "python -m pip install -r /app/requirements/base.txt 'uvicorn[standard]'",
            ],
            manifests: &[
                "constraints.txt",
                "requirements-dev.txt",
                "requirements/base.txt",
            ],
            full: &["echo done"],
            not_hoisted: None,
        },
        Case {
            name: "a non-dependency command first stops hoisting",
            runtime: "python3",
            source: py,
            pre_build: &["cd sub"],
            build: &["pip install -r requirements.txt"],
            hoisted: &[],
            manifests: &[],
            full: &["cd sub", "pip install -r requirements.txt", "echo done"],
            not_hoisted: None,
        },
        Case {
            name: "compound commands are never hoisted",
            runtime: "python3",
            source: py,
            pre_build: &[],
            build: &[
                "pip install -r requirements.txt && pip install -r requirements-dev.txt",
                "pip install gunicorn",
            ],
            hoisted: &[],
            manifests: &[],
            full: &[
                "pip install -r requirements.txt && pip install -r requirements-dev.txt",
                "pip install gunicorn",
                "echo done",
            ],
            not_hoisted: None,
        },
        Case {
            name: "variables, globs, redirections, env prefixes",
            runtime: "python3",
            source: py,
            pre_build: &[],
            build: &[
                "pip install -r $REQS",
                "pip install *.txt",
                "pip install x > log",
                "X=1 pip install x",
            ],
            hoisted: &[],
            manifests: &[],
            full: &[
                "pip install -r $REQS",
                "pip install *.txt",
                "pip install x > log",
                "X=1 pip install x",
                "echo done",
            ],
            not_hoisted: None,
        },
        Case {
            name: "pip install . is never hoisted",
            runtime: "python3",
            source: py,
            pre_build: &[],
            build: &["pip install ."],
            hoisted: &[],
            manifests: &[],
            full: &["pip install .", "echo done"],
            not_hoisted: Some("build.commands.build[0] not cached: installs . from the source"),
        },
        Case {
            name: "an editable requirement keeps the command in the full step",
            runtime: "python3",
            source: py,
            pre_build: &["pip install -U pip"],
            build: &["pip install -r requirements-edit.txt"],
            hoisted: &["pip install -U pip"],
            manifests: &[],
            full: &["pip install -r requirements-edit.txt", "echo done"],
            not_hoisted: Some(
                "build.commands.build[0] not cached: requirements-edit.txt has an editable install (-e .)",
            ),
        },
        Case {
            name: "a local path requirement too",
            runtime: "python3",
            source: py,
            pre_build: &[],
            build: &["pip install -r requirements-local.txt"],
            hoisted: &[],
            manifests: &[],
            full: &["pip install -r requirements-local.txt", "echo done"],
            not_hoisted: Some(
                "build.commands.build[0] not cached: requirements-local.txt installs from the source (./vendor/pkg)",
            ),
        },
        Case {
            name: "pip --target is not hoisted",
            runtime: "python3",
            source: py,
            pre_build: &[],
            build: &["pip install --target deps -r requirements.txt"],
            hoisted: &[],
            manifests: &[],
            full: &["pip install --target deps -r requirements.txt", "echo done"],
            not_hoisted: Some("build.commands.build[0] not cached: pip option --target"),
        },
        Case {
            name: "App Runner's example: pipenv",
            runtime: "python3",
            source: py,
            pre_build: &[],
            build: &["pip install pipenv", "pipenv install --system --deploy"],
            hoisted: &["pip install pipenv", "pipenv install --system --deploy"],
            manifests: &["Pipfile", "Pipfile.lock"],
            full: &["echo done"],
            not_hoisted: None,
        },
        Case {
            name: "uv sync installs the dependencies first, the project in the full step",
            runtime: "python3",
            source: py,
            pre_build: &["pip install uv"],
            build: &["uv sync --locked", "uv run manage.py check"],
            hoisted: &["pip install uv", "uv sync --locked --no-install-project"],
            manifests: &["pyproject.toml", "uv.lock"],
            full: &["uv sync --locked", "uv run manage.py check", "echo done"],
            not_hoisted: None,
        },
        Case {
            name: "npm ci, npm install and a global tool",
            runtime: "nodejs18",
            source: node,
            pre_build: &["npm install -g pnpm@9"],
            build: &["npm ci --omit=dev", "npm install", "npm run build"],
            hoisted: &["npm install -g pnpm@9", "npm ci --omit=dev", "npm install"],
            manifests: &[".npmrc", "package-lock.json", "package.json"],
            full: &["npm run build", "echo done"],
            not_hoisted: None,
        },
        Case {
            name: "npm install with packages is not a manifest command",
            runtime: "nodejs18",
            source: node,
            pre_build: &[],
            build: &["npm install express", "npm ci"],
            hoisted: &[],
            manifests: &[],
            full: &["npm install express", "npm ci", "echo done"],
            not_hoisted: None,
        },
        Case {
            name: "yarn reads its release and rc files",
            runtime: "nodejs18",
            source: node,
            pre_build: &[],
            build: &["yarn --frozen-lockfile", "yarn build"],
            hoisted: &["yarn --frozen-lockfile"],
            manifests: &[
                ".npmrc",
                ".yarn/releases/yarn-4.cjs",
                ".yarnrc.yml",
                "package.json",
                "yarn.lock",
            ],
            full: &["yarn build", "echo done"],
            not_hoisted: None,
        },
        Case {
            name: "a postinstall script needs the source",
            runtime: "nodejs18",
            source: with_postinstall,
            pre_build: &[],
            build: &["npm ci"],
            hoisted: &[],
            manifests: &[],
            full: &["npm ci", "echo done"],
            not_hoisted: Some(
                "build.commands.build[0] not cached: package.json has a postinstall script",
            ),
        },
        Case {
            name: "unless scripts are ignored",
            runtime: "nodejs18",
            source: with_postinstall,
            pre_build: &[],
            build: &["pnpm install --ignore-scripts"],
            hoisted: &["pnpm install --ignore-scripts"],
            manifests: &["package.json"],
            full: &["echo done"],
            not_hoisted: None,
        },
        Case {
            name: "a local dependency needs the source",
            runtime: "nodejs18",
            source: with_local_dep,
            pre_build: &[],
            build: &["yarn install"],
            hoisted: &[],
            manifests: &[],
            full: &["yarn install", "echo done"],
            not_hoisted: Some(
                "build.commands.build[0] not cached: dependencies.lib is in the source",
            ),
        },
    ];
    for case in cases {
        let plan = run(
            &config(case.runtime, case.pre_build, case.build),
            case.source,
        )
        .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        assert_eq!(hoisted(&plan), case.hoisted, "{}", case.name);
        assert_eq!(manifests(&plan), case.manifests, "{}", case.name);
        assert_eq!(lines(&plan.full_step), case.full, "{}", case.name);
        assert_eq!(
            plan.not_hoisted.as_deref(),
            case.not_hoisted,
            "{}",
            case.name
        );
    }
}

#[test]
fn command_keys_name_their_phase() {
    let source = files(&[("requirements.txt", "flask\n")]);
    let plan = run(
        &config(
            "python3",
            &["pip install -r requirements.txt"],
            &["python build.py"],
        ),
        &source,
    )
    .unwrap();
    let step = plan.dependency_step.unwrap();
    assert_eq!(step.commands[0].key, "build.commands.pre-build[0]");
    assert_eq!(plan.full_step.commands[0].key, "build.commands.build[0]");
    assert_eq!(
        plan.full_step.commands[1].key,
        "build.commands.post-build[0]"
    );
    // sha256 of "flask\n"
    assert_eq!(
        step.manifests[0].sha256,
        "76f8bae45e807865955344c1a58882d38c8ceb4f855f58091642b7d48290af97"
    );
}

#[test]
fn manifests_outside_the_source_or_missing_are_refused() {
    let source = files(&[
        ("requirements.txt", "-r ../../etc/reqs.txt\n"),
        ("sub/requirements.txt", "-r ../base.txt\n"),
    ]);
    let cases: &[(&str, &str)] = &[
        (
            "pip install -r requirements.txt",
            "build.commands.build[0]: \"../../etc/reqs.txt\" is outside the source (named by requirements.txt)",
        ),
        (
            "pip install -r /etc/reqs.txt",
            "build.commands.build[0]: \"/etc/reqs.txt\" is outside the source (named by pip install -r /etc/reqs.txt)",
        ),
        (
            "pip install -r ../reqs.txt",
            "build.commands.build[0]: \"../reqs.txt\" is outside the source (named by pip install -r ../reqs.txt)",
        ),
        (
            "pip install -r sub/requirements.txt",
            "build.commands.build[0]: base.txt is not in the source (named by pip install -r sub/requirements.txt)",
        ),
        (
            "pip install -r nowhere.txt",
            "build.commands.build[0]: nowhere.txt is not in the source (named by pip install -r nowhere.txt)",
        ),
    ];
    for (command, want) in cases {
        let e = run(&config("python3", &[], &[command]), &source).unwrap_err();
        assert_eq!(e.to_string(), *want, "{command}");
    }
}

#[test]
fn plan_errors() {
    let empty = files(&[]);
    let mut c = config("python3", &[], &[]);
    c.runtime = None;
    assert!(matches!(run(&c, &empty), Err(PlanError::NoRuntime)));
    let mut c = config("python3", &[], &[]);
    c.run.command = None;
    assert!(matches!(run(&c, &empty), Err(PlanError::NoRunCommand)));
    let c = config("go1", &[], &[]);
    assert_eq!(
        run(&c, &empty).unwrap_err().to_string(),
        "lull does not support runtime go1 yet: build an image elsewhere and run it with `lull service create NAME --image REF`"
    );
    let mut c = config("nodejs18", &[], &[]);
    c.run.runtime_version = Some("20.11.1".into());
    assert_eq!(
        run(&c, &empty).unwrap_err().to_string(),
        "runtime nodejs18 has Node.js 18, which does not satisfy runtime-version 20.11.1 (use 18 or leave runtime-version out)"
    );
    // A listed file that cannot be read.
    let listing = vec!["requirements.txt".to_string()];
    let read = |_: &str| -> io::Result<Vec<u8>> { Err(io::Error::other("gone")) };
    let e = plan(
        &config("python3", &[], &["pip install -r requirements.txt"]),
        &listing,
        &read,
        DIGEST,
    )
    .unwrap_err();
    assert_eq!(e.to_string(), "reading requirements.txt");
}

#[test]
fn environments() {
    let mut c = config("python3", &[], &["pip install -r requirements.txt"]);
    c.build.as_mut().unwrap().env = vec![
        EnvEntry {
            name: "PYTHONUNBUFFERED".into(),
            value: "0".into(),
        },
        EnvEntry {
            name: "DJANGO_SETTINGS".into(),
            value: "prod".into(),
        },
    ];
    c.run.pre_run = vec!["python migrate.py".into()];
    c.run.network.port = Some(8000);
    let plan = run(&c, &files(&[("requirements.txt", "flask\n")])).unwrap();
    let env: Vec<(&str, &str)> = plan
        .build_env
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        env,
        [
            ("PYTHONUNBUFFERED", "0"),
            ("PIP_BREAK_SYSTEM_PACKAGES", "1"),
            ("DJANGO_SETTINGS", "prod")
        ]
    );
    assert!(plan.build_env.iter().all(|(n, _)| n != "PORT"));
    assert_eq!(
        plan.image_env,
        [("PYTHONUNBUFFERED".to_string(), "1".to_string())]
    );
    assert_eq!(plan.working_dir, "/app");
    assert_eq!(lines(&plan.pre_run), ["python migrate.py"]);
    assert_eq!(plan.pre_run.commands[0].key, "run.pre-run[0]");
    assert_eq!(plan.run, c.run);
    assert_eq!(plan.runtime.name, "python311");
    // Node: no NODE_ENV invented.
    let plan = run(&config("nodejs18", &[], &[]), &files(&[])).unwrap();
    assert!(plan.build_env.is_empty() && plan.image_env.is_empty());
    assert!(plan.dependency_step.is_none());
    assert_eq!(lines(&plan.full_step), ["echo done"]);
}

#[test]
fn the_cache_key_follows_every_input() {
    let base_files = [
        ("requirements.txt", "flask==3.0\n-r more.txt\n"),
        ("more.txt", "gunicorn\n"),
        ("app.py", "print(1)\n"),
    ];
    let base_config = || {
        let mut c = config(
            "python3",
            &["pip install -U pip"],
            &["pip install -r requirements.txt", "python build.py"],
        );
        c.build.as_mut().unwrap().env = vec![EnvEntry {
            name: "A".into(),
            value: "1".into(),
        }];
        c
    };
    let key_of = |c: &AppRunnerConfig, source: &BTreeMap<String, Vec<u8>>, digest: &str| {
        let listing: Vec<String> = source.keys().cloned().collect();
        key_with_listing(c, source, &listing, digest)
    };
    let base = key_of(&base_config(), &files(&base_files), DIGEST);
    assert!(
        base.starts_with("sha256:") && base.len() == 7 + 64,
        "{base}"
    );

    // The same inputs, the listing in another order, another non-manifest file, later commands,
    // run settings or the runtime's alias: the same key.
    let source = files(&base_files);
    let mut reversed: Vec<String> = source.keys().cloned().collect();
    reversed.reverse();
    reversed.insert(0, "./app.py".into());
    assert_eq!(
        key_with_listing(&base_config(), &source, &reversed, DIGEST),
        base
    );
    let mut other = files(&base_files);
    other.insert("app.py".into(), b"print(2)\n".to_vec());
    other.insert("README.md".into(), b"hi".to_vec());
    assert_eq!(key_of(&base_config(), &other, DIGEST), base);
    let mut c = base_config();
    c.build.as_mut().unwrap().commands.build[1] = "python other.py".into();
    c.build.as_mut().unwrap().commands.post_build = vec!["rm -rf x".into()];
    c.run.env.push(EnvEntry {
        name: "B".into(),
        value: "2".into(),
    });
    c.run.network.port = Some(9000);
    c.runtime = Some("python311".into());
    assert_eq!(key_of(&c, &files(&base_files), DIGEST), base);

    // Any input of the step changed: another key.
    let mut changed = Vec::new();
    changed.push(key_of(&base_config(), &files(&base_files), "sha256:2222"));
    let mut nested = files(&base_files);
    nested.insert("more.txt".into(), b"gunicorn==22\n".to_vec());
    changed.push(key_of(&base_config(), &nested, DIGEST));
    let mut top = files(&base_files);
    top.insert(
        "requirements.txt".into(),
        b"flask==3.1\n-r more.txt\n".to_vec(),
    );
    changed.push(key_of(&base_config(), &top, DIGEST));
    let mut c = base_config();
    c.build.as_mut().unwrap().env[0].value = "2".into();
    changed.push(key_of(&c, &files(&base_files), DIGEST));
    let mut c = base_config();
    c.build.as_mut().unwrap().env.push(EnvEntry {
        name: "B".into(),
        value: "".into(),
    });
    changed.push(key_of(&c, &files(&base_files), DIGEST));
    let mut c = base_config();
    c.build.as_mut().unwrap().commands.pre_build[0] = "pip install -U pip setuptools".into();
    changed.push(key_of(&c, &files(&base_files), DIGEST));
    let mut c = base_config();
    c.build.as_mut().unwrap().commands.pre_build.clear();
    changed.push(key_of(&c, &files(&base_files), DIGEST));
    // A file moved: same bytes, another path.
    let mut moved = files(&[
        ("requirements.txt", "flask==3.0\n-r deps/more.txt\n"),
        ("deps/more.txt", "gunicorn\n"),
    ]);
    moved.insert("app.py".into(), b"print(1)\n".to_vec());
    changed.push(key_of(&base_config(), &moved, DIGEST));
    for (i, key) in changed.iter().enumerate() {
        assert_ne!(*key, base, "change {i}");
        for other in &changed[..i] {
            assert_ne!(key, other, "change {i}");
        }
    }
}

fn key_with_listing(
    c: &AppRunnerConfig,
    source: &BTreeMap<String, Vec<u8>>,
    listing: &[String],
    digest: &str,
) -> String {
    let read = |p: &str| {
        source
            .get(p)
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, p.to_string()))
    };
    plan(c, listing, &read, digest)
        .unwrap()
        .dependency_step
        .expect("a dependency step")
        .cache_key
}

#[test]
fn simple_commands() {
    for (line, words) in [
        (
            "pip install -r requirements.txt",
            Some(vec!["pip", "install", "-r", "requirements.txt"]),
        ),
        (
            "pip install 'uvicorn[standard]' \"a b\"",
            Some(vec!["pip", "install", "uvicorn[standard]", "a b"]),
        ),
        ("npm\tci", Some(vec!["npm", "ci"])),
        ("npm ci; npm test", None),
        ("npm ci || true", None),
        ("npm ci &", None),
        ("npm ci | tee log", None),
        ("npm ci 2>err", None),
        ("pip install $(cat x)", None),
        ("pip install \"$X\"", None),
        ("pip install `x`", None),
        ("pip install ~/x", None),
        ("npm ci # comment", None),
        ("npm ci\nnpm test", None),
        ("PIP_X=1 pip install x", None),
        ("pip install 'unclosed", None),
        ("", None),
    ] {
        let want = words.map(|w| w.into_iter().map(str::to_string).collect::<Vec<_>>());
        assert_eq!(simple_words(line), want, "{line:?}");
    }
}
