use std::path::PathBuf;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use lull_builder::apprunner::AppRunnerConfig;

use super::*;

fn spec() -> ServiceSpec {
    ServiceSpec::new(
        "foo",
        Source::Image {
            reference: "registry.local:5000/app:1".parse().unwrap(),
        },
    )
}

fn errors(spec: &ServiceSpec) -> Vec<String> {
    match spec.validate() {
        Ok(()) => vec![],
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    }
}

#[test]
fn defaults_are_valid() {
    let s = spec();
    s.validate().unwrap();
    assert_eq!(s.port, 8080);
    assert_eq!(s.traffic.max_concurrency, 100);
    assert_eq!((s.min_instances, s.max_instances), (1, 10));
    assert_eq!(s.scaling.target_utilisation, 0.7);
    assert_eq!(s.scaling.scale_in_window, Duration::from_secs(60));
    assert_eq!(s.hostnames(None), ["foo.localhost"]);
    assert_eq!(
        s.hostnames(Some("apps.example.com")),
        ["foo.localhost", "foo.apps.example.com"]
    );
    assert_eq!(s.environment(), [("PORT".to_string(), "8080".to_string())]);
}

#[test]
fn each_bad_field_is_named_with_its_path() {
    type Change = Box<dyn Fn(&mut ServiceSpec)>;
    let env = |name: &str| EnvVar {
        name: name.into(),
        value: "x".into(),
    };
    let cases: Vec<(Change, &str)> = vec![
        (
            Box::new(|s| s.name = "-foo".into()),
            "name: \"-foo\" is not a DNS label (expected 1 to 63 lowercase letters, digits and hyphens, not starting or ending with a hyphen)",
        ),
        (Box::new(|s| s.name = "x".repeat(64)), "name: \""),
        (
            Box::new(|s| s.hostnames = vec!["ok.example.com".into(), "bad_host".into()]),
            "hostnames[1]: \"bad_host\" is not a DNS name",
        ),
        (
            Box::new(|s| s.command = Some(vec![])),
            "command: is empty (expected a program and its arguments)",
        ),
        (Box::new(|s| s.port = 0), "port: must be 1 to 65535"),
        (
            Box::new(move |s| s.env = vec![env("A"), env("B"), env("1X")]),
            "env[2].name: \"1X\" is not an environment variable name",
        ),
        (
            Box::new(move |s| s.env = vec![env("A"), env("A")]),
            "env[1].name: A is set twice",
        ),
        (
            Box::new(move |s| s.env = vec![env("PORT")]),
            "env[0].name: PORT is set from port (set port instead)",
        ),
        (
            Box::new(move |s| {
                s.env = vec![env("DB")];
                s.secrets = vec![SecretRef {
                    target: SecretTarget::Env("DB".into()),
                    secret: "db".into(),
                }];
            }),
            "secrets[0].env: DB is already set (by env, port or another secret)",
        ),
        (
            Box::new(|s| {
                s.secrets = vec![SecretRef {
                    target: SecretTarget::File("run/x".into()),
                    secret: "db".into(),
                }]
            }),
            "secrets[0].file: run/x is not an absolute path",
        ),
        (
            Box::new(|s| {
                s.secrets = vec![SecretRef {
                    target: SecretTarget::Env("X".into()),
                    secret: "a/b".into(),
                }]
            }),
            "secrets[0].secret: \"a/b\" is not a secret name",
        ),
        (
            Box::new(|s| s.size.cpu = 0.0),
            "size.cpu: 0 is out of range (expected 0.001 to 1024 vCPUs)",
        ),
        (
            Box::new(|s| s.size.memory_bytes = 1 << 20),
            "size.memory: 1M is too small (expected at least 4M)",
        ),
        (
            Box::new(|s| s.traffic.freeze_after = Some(Duration::from_millis(5))),
            "freeze_after: must be at least 100ms (or 0 to never freeze)",
        ),
        (
            Box::new(|s| {
                s.traffic.freeze_after = Some(Duration::from_secs(30));
                s.traffic.cpu = lull_proxy::config::CpuMode::Always;
            }),
            "freeze_after: needs cpu_mode request (an instance with CPU always is never idle)",
        ),
        (
            Box::new(|s| s.scaling.target_utilisation = 1.5),
            "scaling.target_utilisation: 1.5 is not in (0, 1] (expected e.g. 0.7)",
        ),
        (
            Box::new(|s| s.scaling.scale_in_window = Duration::from_millis(10)),
            "scaling.scale_in_window: must be at least 1s",
        ),
        (
            Box::new(|s| s.scaling.scale_to_zero_after = Duration::ZERO),
            "scaling.scale_to_zero_after: must be at least 1s",
        ),
        (
            Box::new(|s| {
                s.min_instances = 5;
                s.max_instances = 2
            }),
            "max_instances: 2 is less than min_instances (5)",
        ),
        (
            Box::new(|s| {
                s.volumes = vec![Volume {
                    name: "data".into(),
                    path: "/data".into(),
                    shared: false,
                    read_only: false,
                }]
            }),
            "max_instances: must be 1: volume data is not shared (mark it shared to run more instances)",
        ),
        (
            Box::new(|s| {
                s.volumes = vec![Volume {
                    name: "Data".into(),
                    path: "/data".into(),
                    shared: true,
                    read_only: false,
                }]
            }),
            "volumes[0].name: \"Data\" is not a DNS label",
        ),
        (
            Box::new(|s| {
                s.volumes = vec![Volume {
                    name: "d".into(),
                    path: "/a/../b".into(),
                    shared: true,
                    read_only: false,
                }]
            }),
            "volumes[0].path: /a/../b must not contain '..'",
        ),
        (
            Box::new(|s| {
                s.secrets = vec![SecretRef {
                    target: SecretTarget::File("/proc/self/environ".into()),
                    secret: "db".into(),
                }]
            }),
            "secrets[0].file: /proc/self/environ is inside /proc, which the runtime mounts itself",
        ),
        (
            Box::new(|s| {
                s.secrets = vec![SecretRef {
                    target: SecretTarget::File("/dev/shm/key".into()),
                    secret: "db".into(),
                }]
            }),
            "secrets[0].file: /dev/shm/key is inside /dev",
        ),
        (
            Box::new(|s| {
                s.volumes = vec![Volume {
                    name: "d".into(),
                    path: "/sys/x".into(),
                    shared: true,
                    read_only: true,
                }]
            }),
            "volumes[0].path: /sys/x is inside /sys",
        ),
        (
            Box::new(|s| {
                s.secrets = vec![SecretRef {
                    target: SecretTarget::File("/etc/hosts".into()),
                    secret: "db".into(),
                }]
            }),
            "secrets[0].file: /etc/hosts is lull's own",
        ),
        (
            Box::new(|s| {
                let file = |path: &str| SecretRef {
                    target: SecretTarget::File(path.into()),
                    secret: "db".into(),
                };
                s.secrets = vec![file("/run/secrets/a"), file("/run/secrets/a/")];
            }),
            "secrets[1].file: /run/secrets/a/ is already the target of secrets[0].file",
        ),
        (
            Box::new(|s| {
                s.secrets = vec![SecretRef {
                    target: SecretTarget::File("/data".into()),
                    secret: "db".into(),
                }];
                s.volumes = vec![Volume {
                    name: "d".into(),
                    path: "/data".into(),
                    shared: true,
                    read_only: false,
                }];
            }),
            "volumes[0].path: /data is already the target of secrets[0].file",
        ),
        (
            Box::new(|s| s.pids_limit = 1),
            "pids_limit: must be at least 16",
        ),
        (
            Box::new(|s| s.traffic.max_concurrency = 0),
            "max_concurrency: must be at least 1",
        ),
        (
            Box::new(|s| s.traffic.queue_timeout = Duration::ZERO),
            "queue.timeout: must be more than 0 when requests may queue",
        ),
        (
            Box::new(|s| s.traffic.timeouts.connect = Duration::ZERO),
            "timeouts.connect: must be more than 0",
        ),
        (
            Box::new(|s| s.traffic.health.timeout = Duration::from_secs(5)),
            "health_check.timeout: the health check timeout must be shorter than its interval (timeout 5s, interval 5s)",
        ),
        (
            Box::new(|s| {
                s.traffic.health.probe = lull_proxy::config::HealthProbe::Http {
                    path: "healthz".into(),
                    min_status: 200,
                    max_status: 399,
                }
            }),
            "health_check.path: \"healthz\" must start with '/'",
        ),
    ];
    for (change, want) in cases {
        let mut s = spec();
        change(&mut s);
        let got = errors(&s);
        assert_eq!(got.len(), 1, "{want}: {got:?}");
        assert!(got[0].starts_with(want), "got {:?}, want {want:?}", got[0]);
    }
}

#[test]
fn every_problem_is_reported_together() {
    let mut s = spec();
    s.name = "Foo".into();
    s.port = 0;
    s.size.cpu = -1.0;
    let got = errors(&s);
    let paths: Vec<&str> = got.iter().map(|e| e.split(':').next().unwrap()).collect();
    assert_eq!(paths, ["name", "port", "size.cpu"]);
    // An unshared volume is fine with one instance.
    let mut s = spec();
    s.max_instances = 1;
    s.volumes = vec![
        Volume {
            name: "data".into(),
            path: "/data".into(),
            shared: false,
            read_only: false,
        },
        Volume {
            name: "conf".into(),
            path: "/etc/app".into(),
            shared: false,
            read_only: true,
        },
    ];
    s.validate().unwrap();
}

#[test]
fn json_form_reads_strictly_with_paths() {
    let s = ServiceSpec::from_json(
        r#"{"name": "foo", "source": {"type": "image", "reference": "registry.local:5000/app:1"},
            "env": [{"name": "A", "value": "1"}], "size": {"cpu": 0.1, "memory": "64M"},
            "health_check": {"protocol": "http", "path": "/healthz"}, "idle_delay": "250ms"}"#,
    )
    .unwrap();
    assert_eq!(s.env_value("A"), Some("1"));
    assert_eq!(s.size.cpu, 0.1);
    assert_eq!(s.size.memory_bytes, 64 << 20);
    assert_eq!(s.traffic.idle_delay, Duration::from_millis(250));
    assert_eq!(
        s.traffic.health.probe,
        lull_proxy::config::HealthProbe::Http {
            path: "/healthz".into(),
            min_status: 200,
            max_status: 399
        }
    );
    // Round trip through JSON.
    let back: ServiceSpec = serde_json::from_value(s.to_json()).unwrap();
    assert_eq!(back, s);

    for (text, path, message) in [
        (
            r#"{"name": "foo", "colour": 1}"#,
            "colour",
            "unknown field `colour`",
        ),
        (
            r#"{"env": [{"name": "A", "value": 1}]}"#,
            "env[0].value",
            "invalid type: integer `1`",
        ),
        (
            r#"{"size": {"memory": "64Q"}}"#,
            "size.memory",
            "unknown unit 'q'",
        ),
        (
            r#"{"health_check": {"interval": "5"}}"#,
            "health_check.interval",
            "without a unit",
        ),
        (
            r#"{"port": 70000}"#,
            "port",
            "invalid value: integer `70000`",
        ),
    ] {
        let e = ServiceUpdate::from_json(text).unwrap_err();
        assert_eq!(e.0[0].path, path, "{text}: {e}");
        assert!(e.0[0].message.contains(message), "{text}: {e}");
    }
    let e = ServiceSpec::from_json("{}").unwrap_err();
    assert_eq!(
        e.0.iter().map(|e| e.path.as_str()).collect::<Vec<_>>(),
        ["name", "source"]
    );
    let e = ServiceSpec::from_json(r#"{"name": "foo", "source": {"type": "image", "reference": "a"}, "secrets": [{"secret": "x"}]}"#).unwrap_err();
    assert_eq!(
        e.to_string(),
        "secrets[0]: give exactly one of env and file"
    );
}

#[test]
fn updates_change_only_what_they_name() {
    let s = spec();
    let u = ServiceUpdate::from_json(
        r#"{"timeouts": {"connect": "1s"}, "health_check": {"interval": "10s"}}"#,
    )
    .unwrap();
    let t = s.updated(&u).unwrap();
    assert_eq!(t.traffic.timeouts.connect, Duration::from_secs(1));
    assert_eq!(t.traffic.timeouts.request, s.traffic.timeouts.request);
    assert_eq!(t.traffic.health.interval, Duration::from_secs(10));
    assert_eq!(t.traffic.health.timeout, s.traffic.health.timeout);
    // Updates are validated after applying.
    let u = ServiceUpdate::from_json(r#"{"health_check": {"timeout": "1m"}}"#).unwrap();
    let e = s.updated(&u).unwrap_err();
    assert_eq!(e.0[0].path, "health_check.timeout");
    let u = ServiceUpdate::from_json(r#"{"name": "bar"}"#).unwrap();
    assert_eq!(s.updated(&u).unwrap_err().0[0].path, "name");
}

#[test]
fn revisions_say_what_changed() {
    let now = Utc.with_ymd_and_hms(2026, 11, 26, 10, 0, 0).unwrap();
    let mut s = spec();
    s.env = vec![
        EnvVar {
            name: "FOO".into(),
            value: "1".into(),
        },
        EnvVar {
            name: "OLD".into(),
            value: "x".into(),
        },
    ];
    s.secrets = vec![SecretRef {
        target: SecretTarget::Env("DB_PASS".into()),
        secret: "db".into(),
    }];
    let r1 = Revision::first(s.clone(), now);
    assert_eq!((r1.number, r1.cause.as_str()), (1, "created"));
    assert_eq!(
        r1.next(s.clone(), now),
        None,
        "a no-op update makes no revision"
    );

    let mut t = s.clone();
    t.source = Source::Image {
        reference: "registry.local:5000/app:2".parse().unwrap(),
    };
    t.env[0].value = "2".into();
    t.env.remove(1);
    t.env.push(EnvVar {
        name: "NEW".into(),
        value: "y".into(),
    });
    t.secrets[0].secret = "db2".into();
    t.size.memory_bytes = 256 << 20;
    t.traffic.health.interval = Duration::from_secs(9);
    let r2 = r1.next(t.clone(), now).unwrap();
    assert_eq!(r2.number, 2);
    assert_eq!(
        r2.cause,
        "image changed, env FOO changed, env NEW added, env OLD removed, secret DB_PASS changed, size.memory changed, health_check.interval changed"
    );
    let r3 = r2.successor(t, secret_changed_cause("DB_PASS"), now);
    assert_eq!(
        (r3.number, r3.cause.as_str()),
        (3, "secret DB_PASS changed")
    );
    let json = serde_json::to_value(&r3).unwrap();
    assert_eq!(json["created_at"], "2026-11-26T10:00:00Z");
    let back: Revision = serde_json::from_value(json).unwrap();
    assert_eq!(back, r3);
}

#[test]
fn apprunner_run_section_applies() {
    let config = AppRunnerConfig::parse(
        "version: 1.0\nrun:\n  command: python -m gunicorn 'app:create_app()' -b 0.0.0.0:8000\n  network:\n    port: 8000\n    env: APP_PORT\n  env:\n    - name: MODE\n      value: prod\n  secrets:\n    - name: DB_PASS\n      value-from: arn:aws:secretsmanager:eu-west-1:1:secret:db-pass\n",
    )
    .unwrap();
    let mut s = spec();
    apply_apprunner_run(&mut s, &config.run).unwrap();
    s.validate().unwrap();
    assert_eq!(
        s.command.as_deref().unwrap(),
        [
            "python",
            "-m",
            "gunicorn",
            "app:create_app()",
            "-b",
            "0.0.0.0:8000"
        ]
    );
    assert_eq!(s.port, 8000);
    assert_eq!(s.env_value("MODE"), Some("prod"));
    assert_eq!(s.env_value("APP_PORT"), Some("8000"));
    assert_eq!(
        s.secrets,
        [SecretRef {
            target: SecretTarget::Env("DB_PASS".into()),
            secret: "db-pass".into()
        }]
    );
    let bad = AppRunnerConfig::parse("version: 1.0\nrun:\n  command: python 'app.py\n").unwrap();
    let e = apply_apprunner_run(&mut spec(), &bad.run).unwrap_err();
    assert_eq!(e.0[0].path, "run.command");
}

#[test]
fn export_reads_back_as_the_same_spec() {
    let mut s = spec();
    s.hostnames = vec!["api.example.com".into()];
    s.command = Some(vec!["sh".into(), "-c".into(), "echo \"it's\" $HOME".into()]);
    s.port = 9000;
    s.env = vec![
        EnvVar {
            name: "A".into(),
            value: "yes".into(),
        },
        EnvVar {
            name: "B".into(),
            value: "line1\nline2: \"q\"".into(),
        },
    ];
    s.secrets = vec![
        SecretRef {
            target: SecretTarget::Env("DB_PASS".into()),
            secret: "db-pass".into(),
        },
        SecretRef {
            target: SecretTarget::File(PathBuf::from("/run/secrets/tls.key")),
            secret: "tls-key".into(),
        },
    ];
    s.size = InstanceSize {
        cpu: 0.25,
        memory_bytes: 64 << 20,
    };
    s.max_instances = 1;
    s.volumes = vec![
        Volume {
            name: "data".into(),
            path: "/data".into(),
            shared: false,
            read_only: false,
        },
        Volume {
            name: "conf".into(),
            path: "/etc/app".into(),
            shared: false,
            read_only: true,
        },
    ];
    s.traffic.idle_delay = Duration::from_millis(500);
    s.traffic.cpu = lull_proxy::config::CpuMode::Always;
    s.validate().unwrap();
    let text = export(&s);
    // App Runner's reader sees a plain apprunner.yaml.
    let config = AppRunnerConfig::parse(&text).unwrap();
    assert_eq!(config.version, "1.0");
    assert_eq!(config.runtime, None);
    assert_eq!(config.run.network.port, Some(9000));
    assert_eq!(config.run.env.len(), 2);
    assert_eq!(config.run.secrets[0].value_from, "db-pass");
    assert!(text.contains("\n---\n"), "{text}");
    assert_eq!(import(&text).unwrap(), s, "{text}");

    // Args besides the command stay in lull's document; no command at all round-trips too.
    let mut s = spec();
    s.args = Some(vec!["--verbose".into()]);
    assert_eq!(import(&export(&s)).unwrap(), s);
    let mut s = spec();
    s.command = Some(vec!["/bin/app".into()]);
    s.args = Some(vec!["serve".into()]);
    assert_eq!(import(&export(&s)).unwrap(), s);

    assert!(matches!(
        import("version: 1.0\nrun:\n  command: x\n"),
        Err(ExportError::MissingLull)
    ));
}

#[test]
fn scaling_settings_read_and_min_zero_is_scale_to_zero() {
    let mut s = ServiceSpec::new(
        "web",
        Source::Image {
            reference: "example.test/app:1".parse().unwrap(),
        },
    );
    let update: ServiceUpdate = serde_json::from_str(
        r#"{"min_instances": 0, "scaling": {"target_utilisation": 0.5, "scale_in_window": "30s", "scale_to_zero_after": "2m"}}"#,
    )
    .unwrap();
    update.apply(&mut s).unwrap();
    s.validate().unwrap();
    assert_eq!(s.min_instances, 0);
    assert_eq!(s.scaling.target_utilisation, 0.5);
    assert_eq!(s.scaling.scale_in_window, Duration::from_secs(30));
    assert_eq!(s.scaling.scale_to_zero_after, Duration::from_secs(120));
    let update: ServiceUpdate = serde_json::from_str(r#"{"freeze_after": "30s"}"#).unwrap();
    update.apply(&mut s).unwrap();
    assert_eq!(s.traffic.freeze_after, Some(Duration::from_secs(30)));
    let update: ServiceUpdate = serde_json::from_str(r#"{"freeze_after": "0"}"#).unwrap();
    update.apply(&mut s).unwrap();
    assert_eq!(s.traffic.freeze_after, None, "0 switches tier 2 off");
    let e = serde_json::from_str::<ServiceUpdate>(r#"{"scaling": {"target": 0.5}}"#).unwrap_err();
    assert!(e.to_string().contains("unknown field `target`"), "{e}");
}

#[test]
fn file_secrets_and_read_only_volumes_read_from_json() {
    let s = ServiceSpec::from_json(
        r#"{"name": "foo", "source": {"type": "image", "reference": "a"},
            "secrets": [{"secret": "db-pass", "file": "/run/secrets/db"}, {"secret": "db-pass", "env": "DB"}],
            "volumes": [{"name": "conf", "path": "/etc/app", "read_only": true}, {"name": "data", "path": "/data"}],
            "max_instances": 1}"#,
    )
    .unwrap();
    assert_eq!(
        s.secrets[0],
        SecretRef {
            target: SecretTarget::File("/run/secrets/db".into()),
            secret: "db-pass".into(),
        }
    );
    assert!(s.volumes[0].read_only);
    assert!(!s.volumes[1].read_only);
    // The JSON form says read_only only when set, and reads back the same.
    let json = s.to_json();
    assert_eq!(json["volumes"][0]["read_only"], true);
    assert!(json["volumes"][1].get("read_only").is_none(), "{json}");
    assert_eq!(json["secrets"][0]["file"], "/run/secrets/db");
    assert_eq!(ServiceSpec::from_json(&json.to_string()).unwrap(), s);
    // A volume turned read-only, or a file secret moved, makes a revision that says so.
    let mut t = s.clone();
    t.volumes[1].read_only = true;
    t.secrets[0].target = SecretTarget::File("/run/secrets/db2".into());
    assert_eq!(
        changes(&s, &t),
        [
            "secret /run/secrets/db2 added",
            "secret /run/secrets/db removed",
            "volumes changed"
        ]
    );
    let e = ServiceSpec::from_json(
        r#"{"name": "foo", "source": {"type": "image", "reference": "a"},
            "volumes": [{"name": "conf", "path": "/etc/app", "read_only": "yes"}]}"#,
    )
    .unwrap_err();
    assert!(e.0[0].path.starts_with("volumes[0].read_only"), "{e}");
}

#[test]
fn https_redirect_and_hsts_read_apply_and_round_trip() {
    let mut s = spec();
    assert!(s.traffic.https_redirect, "redirects are on by default");
    assert_eq!(s.traffic.hsts, None, "HSTS is off by default");
    let json = s.to_json();
    assert_eq!(json["https_redirect"], true);
    assert_eq!(json["hsts"], serde_json::json!({"enabled": false}));

    let update = ServiceUpdate::from_json(
        r#"{"https_redirect": false, "hsts": {"max_age": "365d", "include_subdomains": true}}"#,
    )
    .unwrap();
    let t = s.updated(&update).unwrap();
    assert!(!t.traffic.https_redirect);
    assert_eq!(
        t.traffic.hsts,
        Some(lull_proxy::config::Hsts {
            max_age: Duration::from_secs(31_536_000),
            include_subdomains: true,
            preload: false,
        })
    );
    let json = t.to_json();
    assert_eq!(
        json["hsts"],
        serde_json::json!({"enabled": true, "max_age": "365d", "include_subdomains": true, "preload": false})
    );
    assert_eq!(ServiceSpec::from_json(&json.to_string()).unwrap(), t);
    assert_eq!(
        changes(&s, &t),
        [
            "https_redirect changed",
            "hsts.enabled changed",
            "hsts.include_subdomains changed",
            "hsts.max_age changed",
            "hsts.preload changed"
        ]
    );

    // Fields change one at a time once on; `enabled: false` turns it off.
    let t = t
        .updated(&ServiceUpdate::from_json(r#"{"hsts": {"preload": true}}"#).unwrap())
        .unwrap();
    assert!(t.traffic.hsts.as_ref().unwrap().preload);
    let off = t
        .updated(&ServiceUpdate::from_json(r#"{"hsts": {"enabled": false}}"#).unwrap())
        .unwrap();
    assert_eq!(off.traffic.hsts, None);
    s = off;

    // Turning it on needs a max_age; turning it off takes nothing else.
    for (json, path) in [
        (r#"{"hsts": {"enabled": true}}"#, "hsts.max_age"),
        (r#"{"hsts": {"include_subdomains": true}}"#, "hsts.enabled"),
        (
            r#"{"hsts": {"enabled": false, "max_age": "1d"}}"#,
            "hsts.enabled",
        ),
    ] {
        let e = s
            .updated(&ServiceUpdate::from_json(json).unwrap())
            .unwrap_err();
        assert_eq!(e.0[0].path, path, "{json}: {e}");
    }
    let e = ServiceUpdate::from_json(r#"{"hsts": {"max_age": "1d", "sub": true}}"#).unwrap_err();
    assert!(e.0[0].path.starts_with("hsts"), "{e}");
}

#[test]
fn hsts_rules_name_their_field() {
    let hsts = |max_age: Duration, include_subdomains, preload| {
        let mut s = spec();
        s.traffic.hsts = Some(lull_proxy::config::Hsts {
            max_age,
            include_subdomains,
            preload,
        });
        errors(&s)
    };
    assert_eq!(
        hsts(Duration::from_millis(1500), false, false),
        ["hsts.max_age: 1s500ms is not whole seconds (the header counts seconds)"]
    );
    assert_eq!(
        hsts(Duration::from_secs(31_536_000), false, true),
        ["hsts.preload: needs include_subdomains (browsers' preload lists require it)"]
    );
    assert_eq!(
        hsts(Duration::from_secs(3600), true, true),
        ["hsts.preload: needs a max_age of at least 365d (browsers' preload lists require it)"]
    );
    assert!(
        hsts(Duration::ZERO, false, false).is_empty(),
        "0 retracts an earlier rule"
    );
    assert!(hsts(Duration::from_secs(63_072_000), true, true).is_empty());
}
