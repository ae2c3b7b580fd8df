//! File secrets, read-only volumes and the logs of removed instances through the admin socket,
//! without root: the real store, engine and proxy over the fake host. A file secret reaches the
//! host as a file to write (and a new value makes a revision with the new file), mount targets
//! are checked with their field paths, and `logs` merges the lines of live and removed
//! instances by time until the service is deleted.

use http::Method;
use lull_daemon::api::{Client, ErrorCode};
use lull_daemon::host::InstanceHost;
use lull_daemon::host::fake::FakeHost;
use lull_daemon::spec::{self, ServiceSpec};
use lull_daemon::testing::InProcess;
use serde_json::{Value, json};

const FIRST: &str = "file-s3cr3t-one";
const SECOND: &str = "file-s3cr3t-two";

struct Daemon {
    client: Client,
    host: FakeHost,
    _plane: InProcess,
    _dir: tempfile::TempDir,
}

async fn daemon() -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let plane = InProcess::start(dir.path()).await;
    Daemon {
        client: plane.client.clone(),
        host: plane.host.clone(),
        _plane: plane,
        _dir: dir,
    }
}

impl Daemon {
    async fn call(&self, method: Method, path: &str, body: Value) -> Value {
        let body = (!body.is_null()).then_some(body);
        self.client
            .call(method.clone(), path, body.as_ref())
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    async fn fail(&self, method: Method, path: &str, body: Value) -> lull_daemon::api::ApiError {
        let error = self
            .client
            .call::<_, Value>(method, path, Some(&body))
            .await
            .expect_err("an error");
        error.api().unwrap_or_else(|| panic!("{error}")).clone()
    }

    async fn lines(&self, path: &str) -> Vec<Value> {
        let mut stream = self
            .client
            .stream(Method::GET, path, None::<&()>)
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let mut out = Vec::new();
        while let Some(v) = stream.next().await.unwrap() {
            out.push(v);
        }
        out
    }

    /// Follows an operation to its end; asserts it succeeded.
    async fn succeeds(&self, op: &Value) {
        let op = op.as_str().expect("an operation id");
        let lines = self.lines(&format!("/v1/operations/{op}/progress")).await;
        let end = lines
            .iter()
            .find_map(|v| v.get("end").cloned())
            .unwrap_or_else(|| panic!("no end: {lines:?}"));
        assert_eq!(end["state"], "succeeded", "{end}");
    }

    fn only_instance(&self, service: &str, revision: u64) -> String {
        let ids = self.host.running_of(service, revision);
        assert_eq!(ids.len(), 1, "{service} r{revision}: {ids:?}");
        ids[0].clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_secrets_reach_the_host_and_a_new_value_makes_a_revision() {
    let d = daemon().await;
    d.call(
        Method::PUT,
        "/v1/secrets/db-pass",
        json!({ "value": FIRST }),
    )
    .await;
    let started = d
        .call(
            Method::POST,
            "/v1/services",
            json!({
                "name": "web",
                "source": {"type": "image", "reference": "fake/app:1"},
                "secrets": [{"secret": "db-pass", "file": "/run/secrets/db"}],
                "volumes": [{"name": "conf", "path": "/etc/app", "read_only": true}],
                "max_instances": 1,
            }),
        )
        .await;
    d.succeeds(&started["operation"]).await;
    let id = d.only_instance("web", 1);
    let files = d.host.secret_files(&id).unwrap();
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(files[0].target, "/run/secrets/db");
    assert_eq!(files[0].value.as_str(), Some(FIRST));
    // Its Debug form never shows the value.
    assert!(!format!("{files:?}").contains(FIRST));

    // The spec keeps the file target and the read-only volume, by name only.
    let shown = d.call(Method::GET, "/v1/services/web", Value::Null).await;
    assert_eq!(
        shown["spec"]["secrets"],
        json!([{"secret": "db-pass", "file": "/run/secrets/db"}])
    );
    assert_eq!(
        shown["spec"]["volumes"],
        json!([{"name": "conf", "path": "/etc/app", "shared": false, "read_only": true}])
    );
    assert!(!shown.to_string().contains(FIRST));
    // Exported and read back, it is the same service.
    let spec = ServiceSpec::from_json(&shown["spec"].to_string()).unwrap();
    assert_eq!(spec::import(&spec::export(&spec)).unwrap(), spec);

    // A new value: a new revision whose instance gets the new file.
    let set = d
        .call(
            Method::PUT,
            "/v1/secrets/db-pass",
            json!({ "value": SECOND }),
        )
        .await;
    assert_eq!(set["deploys"][0]["revision"], 2, "{set}");
    d.succeeds(&set["deploys"][0]["operation"]).await;
    let id2 = d.only_instance("web", 2);
    let files = d.host.secret_files(&id2).unwrap();
    assert_eq!(files[0].value.as_str(), Some(SECOND));
    let revisions = d
        .call(Method::GET, "/v1/services/web/revisions", Value::Null)
        .await;
    assert_eq!(
        revisions[1]["cause"], "secret db-pass changed",
        "{revisions}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mount_targets_are_checked_with_their_field_paths() {
    let d = daemon().await;
    let cases = [
        (
            json!({"secrets": [{"secret": "s", "file": "run/s"}]}),
            "secrets[0].file",
            "not an absolute path",
        ),
        (
            json!({"secrets": [{"secret": "s", "file": "/proc/1/environ"}]}),
            "secrets[0].file",
            "inside /proc",
        ),
        (
            json!({"secrets": [{"secret": "s", "env": "S"}, {"secret": "s", "file": "/sys/kernel/x"}]}),
            "secrets[1].file",
            "inside /sys",
        ),
        (
            json!({"volumes": [{"name": "d", "path": "/dev/d", "shared": true}]}),
            "volumes[0].path",
            "inside /dev",
        ),
        (
            json!({
                "secrets": [{"secret": "s", "file": "/data"}],
                "volumes": [{"name": "d", "path": "/data", "shared": true}],
            }),
            "volumes[0].path",
            "already the target of secrets[0].file",
        ),
        (
            json!({"secrets": [{"secret": "s", "file": "/a"}, {"secret": "t", "file": "/a"}]}),
            "secrets[1].file",
            "already the target of secrets[0].file",
        ),
    ];
    for (fields, path, message) in cases {
        let mut body =
            json!({"name": "web", "source": {"type": "image", "reference": "fake/app:1"}});
        for (k, v) in fields.as_object().unwrap() {
            body[k] = v.clone();
        }
        let e = d.fail(Method::POST, "/v1/services", body.clone()).await;
        assert_eq!(e.code, ErrorCode::InvalidRequest, "{body}: {e:?}");
        assert_eq!(e.fields.len(), 1, "{body}: {e:?}");
        assert_eq!(e.fields[0].field, path, "{body}: {e:?}");
        assert!(e.fields[0].message.contains(message), "{body}: {e:?}");
    }
    assert!(d.host.running().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_of_removed_instances_stay_merged_by_time_until_the_service_is_deleted() {
    let d = daemon().await;
    let started = d
        .call(
            Method::POST,
            "/v1/services",
            json!({
                "name": "web",
                "source": {"type": "image", "reference": "fake/app:1"},
                "env": [{"name": "FAKE_LOG", "value": "hello from an instance"}],
            }),
        )
        .await;
    d.succeeds(&started["operation"]).await;
    let first = d.only_instance("web", 1);

    // Pausing removes the instance; resuming starts another one.
    d.call(Method::POST, "/v1/services/web/pause", Value::Null)
        .await;
    assert!(d.host.running().is_empty());
    assert_eq!(
        d.host.retained_logs("web").await.unwrap(),
        std::slice::from_ref(&first)
    );
    let resumed = d
        .call(Method::POST, "/v1/services/web/resume", Value::Null)
        .await;
    if let Some(op) = resumed.get("operation").filter(|o| o.is_string()) {
        d.succeeds(op).await;
    }
    let second = d.only_instance("web", 1);
    assert_ne!(first, second);

    // Both instances' lines, oldest first: the removed one's, then the live one's.
    let logs = d.lines("/v1/services/web/logs").await;
    let seen: Vec<(&str, &str)> = logs
        .iter()
        .map(|l| (l["instance"].as_str().unwrap(), l["text"].as_str().unwrap()))
        .collect();
    let want_first = ("hello from an instance", first.as_str());
    let of = |id: &str| {
        seen.iter()
            .filter(|(i, t)| *i == id && *t == want_first.0)
            .count()
    };
    assert_eq!(of(&first), 1, "{seen:?}");
    assert_eq!(of(&second), 1, "{seen:?}");
    let times: Vec<&str> = logs.iter().map(|l| l["time"].as_str().unwrap()).collect();
    let mut sorted = times.clone();
    sorted.sort();
    assert_eq!(times, sorted, "lines are ordered by time");
    let position = |id: &str| seen.iter().position(|(i, _)| *i == id).unwrap();
    assert!(position(&first) < position(&second), "{seen:?}");

    // --instance works for the removed instance, and names both when it is wrong.
    let only = d
        .lines(&format!("/v1/services/web/logs?instance={first}"))
        .await;
    assert!(!only.is_empty());
    assert!(
        only.iter().all(|l| l["instance"] == first.as_str()),
        "{only:?}"
    );
    let e = d
        .client
        .stream(
            Method::GET,
            "/v1/services/web/logs?instance=web-r9-abcdef",
            None::<&()>,
        )
        .await
        .err()
        .expect("an unknown instance is refused");
    let e = e.api().unwrap();
    assert_eq!(e.code, ErrorCode::NotFound);
    assert!(
        e.message.contains(&first) && e.message.contains(&second),
        "{e:?}"
    );

    // Deleted: the retained logs go too, after the event that ends its history.
    d.call(Method::DELETE, "/v1/services/web", Value::Null)
        .await;
    let retained = d.host.retained_logs("web").await.unwrap();
    assert!(retained.is_empty(), "{retained:?}");
    assert!(d.host.logs(&first).await.is_err());
}
