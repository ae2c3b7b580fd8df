//! Secrets and registry credentials through the admin socket, without root: the real store
//! (SQLite), engine and proxy, instances from the fake host. A secret reaches an instance's
//! environment, a new value makes and deploys a new revision, a used secret cannot be deleted,
//! and no value ever shows in an answer, an event, a log line or an operation.

use std::sync::Arc;

use http::Method;
use lull_daemon::api::{Client, ErrorCode};
use lull_daemon::control::secrets::registry_credentials;
use lull_daemon::host::InstanceHost;
use lull_daemon::host::fake::FakeHost;
use lull_daemon::secrets::SecretKey;
use lull_daemon::store::Store;
use lull_daemon::testing::InProcess;
use serde_json::{Value, json};

const FIRST: &str = "s3cr3t-first-value";
const SECOND: &str = "s3cr3t-second-value";
const THIRD: &str = "s3cr3t-third-value";
const PASSWORD: &str = "registry-pa55word";

struct Daemon {
    client: Client,
    host: FakeHost,
    store: Arc<dyn Store>,
    key: Arc<SecretKey>,
    /// Every answer's text, to check no value ever appears in one.
    seen: std::sync::Mutex<Vec<String>>,
    _plane: InProcess,
    _dir: tempfile::TempDir,
}

async fn daemon() -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let plane = InProcess::start(dir.path()).await;
    Daemon {
        client: plane.client.clone(),
        host: plane.host.clone(),
        store: plane.store.clone(),
        key: plane.key.clone(),
        seen: std::sync::Mutex::new(Vec::new()),
        _plane: plane,
        _dir: dir,
    }
}

impl Daemon {
    fn saw(&self, text: String) {
        self.seen.lock().unwrap().push(text);
    }

    async fn call(&self, method: Method, path: &str, body: Value) -> Value {
        let body = (!body.is_null()).then_some(body);
        let answer: Value = self
            .client
            .call(method.clone(), path, body.as_ref())
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        self.saw(answer.to_string());
        answer
    }

    async fn fail(&self, method: Method, path: &str, body: Value) -> lull_daemon::api::ApiError {
        let error = self
            .client
            .call::<_, Value>(method.clone(), path, Some(&body))
            .await
            .expect_err("an error");
        let api = error.api().unwrap_or_else(|| panic!("{error}")).clone();
        self.saw(format!("{api:?}"));
        api
    }

    /// Every JSON line of a stream.
    async fn lines(&self, path: &str) -> Vec<Value> {
        let mut stream = self
            .client
            .stream(Method::GET, path, None::<&()>)
            .await
            .unwrap();
        let mut out = Vec::new();
        while let Some(v) = stream.next().await.unwrap() {
            self.saw(v.to_string());
            out.push(v);
        }
        out
    }

    /// Follows an operation to its end.
    async fn follow(&self, op: &Value) -> Value {
        let op = op.as_str().expect("an operation id");
        let lines = self.lines(&format!("/v1/operations/{op}/progress")).await;
        let end = lines
            .iter()
            .find_map(|v| v.get("end").cloned())
            .unwrap_or_else(|| panic!("no end: {lines:?}"));
        // The stored record too.
        self.call(Method::GET, &format!("/v1/operations/{op}"), Value::Null)
            .await;
        end
    }

    /// The raw output of a revision's one running instance, from the host itself.
    async fn instance_output(&self, service: &str, revision: u64) -> String {
        let ids = self.host.running_of(service, revision);
        assert_eq!(ids.len(), 1, "{service} r{revision}: {ids:?}");
        let lines = self.host.logs(&ids[0]).await.unwrap();
        lines
            .into_iter()
            .map(|l| l.text)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_reach_instances_roll_out_and_never_show() {
    let d = daemon().await;

    // Set: created, no users yet, the value not answered.
    let set = d
        .call(
            Method::PUT,
            "/v1/secrets/greeting",
            json!({ "value": FIRST }),
        )
        .await;
    assert_eq!(set["name"], "greeting");
    assert_eq!(set["created"], true);
    assert_eq!(set["used_by"], json!([]));
    assert_eq!(set["deploys"], json!([]));
    assert!(set["created_at"].as_str().unwrap().ends_with('Z'), "{set}");
    // Sealed at rest under its name.
    let stored = d.store.get_secret("greeting").unwrap();
    assert!(
        !stored
            .ciphertext
            .windows(FIRST.len())
            .any(|w| w == FIRST.as_bytes())
    );
    assert_eq!(
        d.key.open("greeting", &stored.ciphertext).unwrap().as_str(),
        Some(FIRST)
    );

    // Bad names and bodies are refused without quoting the value.
    let bad = d
        .fail(Method::PUT, "/v1/secrets/-bad", json!({ "value": "x" }))
        .await;
    assert_eq!(bad.code, ErrorCode::InvalidRequest);
    assert_eq!(bad.fields[0].field, "name", "{bad:?}");
    let bad = d
        .fail(
            Method::PUT,
            "/v1/secrets/pin",
            json!({ "value": 987654321 }),
        )
        .await;
    assert_eq!(bad.code, ErrorCode::InvalidRequest, "{bad:?}");
    assert!(!format!("{bad:?}").contains("987654321"), "{bad:?}");
    let bad = d
        .fail(
            Method::PUT,
            "/v1/secrets/pin",
            json!({ "value": "x", "other": 1 }),
        )
        .await;
    assert!(bad.message.contains("other"), "{bad:?}");

    // A service using it as an env var: the instance gets the value (FAKE_LOG prints it).
    let started = d
        .call(
            Method::POST,
            "/v1/services",
            json!({
                "name": "web",
                "source": {"type": "image", "reference": "fake/app:1"},
                "secrets": [{"secret": "greeting", "env": "FAKE_LOG"}],
            }),
        )
        .await;
    let end = d.follow(&started["operation"]).await;
    assert_eq!(end["state"], "succeeded", "{end}");
    assert!(
        d.instance_output("web", 1).await.contains(FIRST),
        "the instance did not get the secret"
    );

    // The service shows the secret's name, not its value.
    let shown = d.call(Method::GET, "/v1/services/web", Value::Null).await;
    assert_eq!(
        shown["spec"]["secrets"],
        json!([{"secret": "greeting", "env": "FAKE_LOG"}])
    );
    // The API's logs of the service redact it.
    let logs = d.lines("/v1/services/web/logs").await;
    let texts: Vec<&str> = logs.iter().filter_map(|l| l["text"].as_str()).collect();
    assert!(texts.contains(&"[redacted]"), "{texts:?}");

    // The list names the user; the same value again changes nothing.
    let list = d.call(Method::GET, "/v1/secrets", Value::Null).await;
    assert_eq!(list[0]["name"], "greeting");
    assert_eq!(list[0]["used_by"], json!(["web"]));
    let same = d
        .call(
            Method::PUT,
            "/v1/secrets/greeting",
            json!({ "value": FIRST }),
        )
        .await;
    assert_eq!(same["unchanged"], true, "{same}");
    assert_eq!(same["deploys"][0]["revision"], Value::Null, "{same}");
    assert_eq!(d.store.list_revisions("web").unwrap().len(), 1);

    // A new value: revision 2 of web, same spec, deployed; its instance has the new value.
    let set = d
        .call(
            Method::PUT,
            "/v1/secrets/greeting",
            json!({ "value": SECOND }),
        )
        .await;
    assert_eq!(set["created"], false);
    assert_eq!(set["used_by"], json!(["web"]));
    let deploy = &set["deploys"][0];
    assert_eq!(deploy["service"], "web", "{set}");
    assert_eq!(deploy["revision"], 2, "{set}");
    let end = d.follow(&deploy["operation"]).await;
    assert_eq!(end["state"], "succeeded", "{end}");
    assert!(d.instance_output("web", 2).await.contains(SECOND));
    let revisions = d
        .call(Method::GET, "/v1/services/web/revisions", Value::Null)
        .await;
    assert_eq!(
        revisions[1]["cause"], "secret greeting changed",
        "{revisions}"
    );
    let r1 = d.store.get_revision("web", 1).unwrap();
    let r2 = d.store.get_revision("web", 2).unwrap();
    assert_eq!(r1.doc, r2.doc, "a secret change keeps the spec");

    // In use: delete refused, naming the service.
    let refused = d
        .fail(Method::DELETE, "/v1/secrets/greeting", Value::Null)
        .await;
    assert_eq!(refused.code, ErrorCode::Conflict);
    assert!(refused.message.contains("web"), "{refused:?}");
    assert!(d.store.get_secret("greeting").is_ok());

    // A deploy that fails prints the secret in its last log lines: redacted in the answer.
    let started = d
        .call(
            Method::POST,
            "/v1/services",
            json!({
                "name": "crash",
                "source": {"type": "image", "reference": "fake/app:1"},
                "env": [{"name": "FAKE_EXIT", "value": "3"}],
                "secrets": [{"secret": "greeting", "env": "FAKE_LOG"}],
            }),
        )
        .await;
    let end = d.follow(&started["operation"]).await;
    assert_eq!(end["state"], "failed", "{end}");
    assert!(end.to_string().contains("[redacted]"), "{end}");

    // Events: the secret change is told by name.
    let events = d.lines("/v1/services/web/events").await;
    assert!(
        events.iter().any(|e| e["message"]
            .as_str()
            .unwrap_or("")
            .contains("secret greeting changed")),
        "{events:?}"
    );
    d.lines("/v1/services/crash/events").await;

    // A paused service gets the revision, not a deploy.
    d.call(Method::POST, "/v1/services/web/pause", json!({}))
        .await;
    let set = d
        .call(
            Method::PUT,
            "/v1/secrets/greeting",
            json!({ "value": THIRD }),
        )
        .await;
    let deploys = set["deploys"].as_array().unwrap();
    let deploy = deploys.iter().find(|d| d["service"] == "web").unwrap();
    assert_eq!(deploy["revision"], 3, "{set}");
    assert_eq!(deploy["operation"], Value::Null, "{set}");
    assert!(deploy["note"].as_str().unwrap().contains("paused"), "{set}");
    assert!(d.host.running_of("web", 3).is_empty());
    // The broken service got one too, and fails again, redacted.
    let crash = deploys.iter().find(|d| d["service"] == "crash").unwrap();
    let end = d.follow(&crash["operation"]).await;
    assert_eq!(end["state"], "failed", "{end}");
    // Redacted where they are stored too, not only in answers.
    for service in ["web", "crash"] {
        for event in d.store.list_events(service, 0, 10_000).unwrap() {
            let text = format!("{} {}", event.message, event.fields);
            for value in [FIRST, SECOND, THIRD] {
                assert!(!text.contains(value), "stored event holds a secret: {text}");
            }
        }
    }
    for op in d.store.list_operations(None).unwrap() {
        let text = format!("{:?} {:?} {:?}", op.progress, op.result, op.error);
        for value in [FIRST, SECOND, THIRD] {
            assert!(
                !text.contains(value),
                "stored operation holds a secret: {text}"
            );
        }
    }

    // Resumed, the paused service runs the revision its secret's change made.
    let resumed = d
        .call(Method::POST, "/v1/services/web/resume", json!({}))
        .await;
    let op = resumed["operation"].clone();
    assert!(op.is_string(), "{resumed}");
    assert_eq!(d.follow(&op).await["state"], "succeeded");
    assert!(!d.host.running_of("web", 3).is_empty());

    // Unused again: deleted; then not found.
    for service in ["web", "crash"] {
        d.call(
            Method::DELETE,
            &format!("/v1/services/{service}"),
            Value::Null,
        )
        .await;
    }
    let deleted = d
        .call(Method::DELETE, "/v1/secrets/greeting", Value::Null)
        .await;
    assert_eq!(deleted["deleted"], "greeting");
    let gone = d
        .fail(Method::DELETE, "/v1/secrets/greeting", Value::Null)
        .await;
    assert_eq!(gone.code, ErrorCode::NotFound);
    assert_eq!(
        d.call(Method::GET, "/v1/secrets", Value::Null).await,
        json!([])
    );

    // No answer ever held a value.
    for text in d.seen.lock().unwrap().iter() {
        assert!(
            !text.contains(FIRST) && !text.contains(SECOND) && !text.contains(THIRD),
            "a secret value in an answer: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_credentials_are_stored_sealed_listed_without_passwords_and_removed() {
    let d = daemon().await;
    let lookup = registry_credentials(d.store.clone(), d.key.clone());
    assert_eq!(lookup("docker.io"), None);

    let login = d
        .call(
            Method::PUT,
            "/v1/registries/Index.Docker.IO",
            json!({ "username": "alice", "password": PASSWORD }),
        )
        .await;
    assert_eq!(login["host"], "docker.io");
    assert_eq!(login["username"], "alice");
    d.call(
        Method::PUT,
        "/v1/registries/127.0.0.1:5000",
        json!({ "username": "bob", "password": "other-pw" }),
    )
    .await;

    let list = d.call(Method::GET, "/v1/registries", Value::Null).await;
    assert_eq!(
        list.as_array()
            .unwrap()
            .iter()
            .map(|r| (r["host"].as_str().unwrap(), r["username"].as_str().unwrap()))
            .collect::<Vec<_>>(),
        [("127.0.0.1:5000", "bob"), ("docker.io", "alice")]
    );

    // Sealed at rest; the host's lookup opens them (under any of Docker Hub's names).
    let stored = d.store.get_registry_credential("docker.io").unwrap();
    assert!(
        !stored
            .ciphertext
            .windows(PASSWORD.len())
            .any(|w| w == PASSWORD.as_bytes())
    );
    assert_eq!(
        lookup("docker.io"),
        Some(("alice".to_owned(), PASSWORD.to_owned()))
    );
    assert_eq!(
        lookup("index.docker.io"),
        Some(("alice".to_owned(), PASSWORD.to_owned()))
    );
    assert_eq!(
        lookup("127.0.0.1:5000"),
        Some(("bob".to_owned(), "other-pw".to_owned()))
    );
    assert_eq!(lookup("127.0.0.1:5001"), None);

    // Bad input: each field named.
    let bad = d
        .fail(
            Method::PUT,
            "/v1/registries/ghcr.io",
            json!({ "username": "a:b", "password": "" }),
        )
        .await;
    let fields: Vec<&str> = bad.fields.iter().map(|f| f.field.as_str()).collect();
    assert_eq!(fields, ["username", "password"], "{bad:?}");

    let out = d
        .call(Method::DELETE, "/v1/registries/docker.io", Value::Null)
        .await;
    assert_eq!(out["deleted"], "docker.io");
    assert_eq!(lookup("docker.io"), None);
    let again = d
        .fail(Method::DELETE, "/v1/registries/docker.io", Value::Null)
        .await;
    assert_eq!(again.code, ErrorCode::NotFound);
    assert!(again.message.contains("docker.io"), "{again:?}");

    for text in d.seen.lock().unwrap().iter() {
        assert!(
            !text.contains(PASSWORD) && !text.contains("other-pw"),
            "a password in an answer: {text}"
        );
    }
}
