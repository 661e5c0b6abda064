//! The deployment files: `deploy/kubernetes/*.yaml`, `deploy/compose.yaml` and the `Dockerfile`.
//!
//! Two kinds of checks. Schemas: every Kubernetes manifest passes kubernetes-validate (the
//! Kubernetes JSON schemas it bundles, strict: unknown fields are errors) for Kubernetes 1.29
//! and 1.37 (the newest it bundles), and the compose file passes the Compose
//! Specification's JSON schema (`tests/deploy/compose-spec.json`: compose-spec/compose-spec's
//! `schema/compose-spec.json` at commit 170098ba, Apache-2.0).
//! The Python validators are installed by pip when missing (`tests/deploy/requirements.txt`),
//! as `cross_client.rs` does. What posthorn needs from the files, which no schema knows: the
//! locked-down sidecar, its probes and secrets, `enableServiceLinks: false`, the migrate Job, the
//! compose services, the image's user and entrypoint; and the environment each file gives
//! posthorn is a configuration `Config::from_vars` accepts, with no unknown `POSTHORN_*` name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Once;

use posthorn::config::Config;
use serde_json::Value;

/// Kubernetes versions to validate against: the first with native sidecars (1.29) and the
/// newest kubernetes-validate 1.37.0 bundles.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.29.0", "1.37.0"];

/// The user the image runs as, and the pods too.
const UID: u64 = 10001;
const HTTP_PORT: u64 = 9187;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn kubernetes_files() -> Vec<PathBuf> {
    let dir = repo().join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    files
}

/// Every document of a YAML file (merge keys applied), as JSON values.
fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = read(path);
    yaml_serde::Deserializer::from_str(&text)
        .map(|document| {
            let mut value = <yaml_serde::Value as serde::Deserialize>::deserialize(document)
                .unwrap_or_else(|e| panic!("{}: invalid YAML: {e}", path.display()));
            value
                .apply_merge()
                .unwrap_or_else(|e| panic!("{}: merge keys: {e}", path.display()));
            serde_json::to_value(value)
                .unwrap_or_else(|e| panic!("{}: not JSON-like: {e}", path.display()))
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// Every Kubernetes object in deploy/kubernetes, by "Kind/name".
fn kubernetes_objects() -> BTreeMap<String, Value> {
    let mut objects = BTreeMap::new();
    for file in kubernetes_files() {
        for object in yaml_documents(&file) {
            let key = format!(
                "{}/{}",
                str_at(&object, "/kind"),
                str_at(&object, "/metadata/name")
            );
            assert!(objects.insert(key.clone(), object).is_none(), "{key} twice");
        }
    }
    objects
}

fn at<'v>(value: &'v Value, pointer: &str) -> &'v Value {
    value
        .pointer(pointer)
        .unwrap_or_else(|| panic!("{pointer} missing in {value:#}"))
}

fn str_at<'v>(value: &'v Value, pointer: &str) -> &'v str {
    at(value, pointer)
        .as_str()
        .unwrap_or_else(|| panic!("{pointer} is not a string: {}", at(value, pointer)))
}

fn container<'v>(pod_spec: &'v Value, name: &str) -> &'v Value {
    at(pod_spec, "/containers")
        .as_array()
        .expect("containers is a list")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name} in {pod_spec:#}"))
}

/// A container's environment with each secretKeyRef resolved from the example Secrets (and a
/// fieldRef to the pod's name as an example pod name).
fn resolved_env(container: &Value, objects: &BTreeMap<String, Value>) -> Vec<(String, String)> {
    at(container, "/env")
        .as_array()
        .expect("env is a list")
        .iter()
        .map(|var| {
            let name = str_at(var, "/name").to_owned();
            let value = match (
                var.pointer("/valueFrom/secretKeyRef"),
                var.pointer("/valueFrom/fieldRef/fieldPath"),
            ) {
                (Some(r), _) => {
                    let secret = &objects[&format!("Secret/{}", str_at(r, "/name"))];
                    let key = str_at(r, "/key");
                    str_at(secret, &format!("/stringData/{key}")).to_owned()
                }
                (None, Some(path)) => {
                    assert_eq!(path, "metadata.name", "{var}");
                    "orders-7d9f8c6b5-x2x4q".to_owned()
                }
                (None, None) => str_at(var, "/value").to_owned(),
            };
            (name, value)
        })
        .collect()
}

fn secret_ref<'v>(env: &'v Value, name: &str) -> Option<&'v Value> {
    env.as_array()?
        .iter()
        .find(|v| v["name"] == name)?
        .pointer("/valueFrom/secretKeyRef")
}

fn plain_value<'v>(env: &'v Value, name: &str) -> Option<&'v str> {
    env.as_array()?
        .iter()
        .find(|v| v["name"] == name)?
        .pointer("/value")?
        .as_str()
}

/// The configuration posthorn would build from `vars`; fails on an unknown `POSTHORN_*` name.
fn accepted_config(what: &str, vars: Vec<(String, String)>) -> Config {
    let config = Config::from_vars(vars.clone())
        .unwrap_or_else(|e| panic!("{what}: posthorn refuses its configuration: {e}\n{vars:?}"));
    assert!(
        config.unknown_vars.is_empty(),
        "{what}: posthorn would warn about unknown variables {:?}",
        config.unknown_vars
    );
    config
}

fn assert_locked_down(what: &str, container: &Value) {
    let sc = at(container, "/securityContext");
    assert_eq!(sc["runAsNonRoot"], true, "{what}: runAsNonRoot");
    assert_eq!(sc["runAsUser"], UID, "{what}: runAsUser");
    assert_eq!(
        sc["readOnlyRootFilesystem"], true,
        "{what}: readOnlyRootFilesystem"
    );
    assert_eq!(
        sc["allowPrivilegeEscalation"], false,
        "{what}: allowPrivilegeEscalation"
    );
    assert_eq!(
        sc["capabilities"]["drop"],
        serde_json::json!(["ALL"]),
        "{what}: capabilities"
    );
    assert_eq!(
        sc["seccompProfile"]["type"], "RuntimeDefault",
        "{what}: seccompProfile"
    );
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                container["resources"][kind][resource].is_string(),
                "{what}: resources.{kind}.{resource} is set"
            );
        }
    }
}

// --- Schemas ------------------------------------------------------------------------------

/// Installs the pinned validators once per test process; about a second when they are there.
fn install_validators() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| crate::support::pip_install("tests/deploy/requirements.txt"));
}

fn kubernetes_validate(files: &[PathBuf]) -> Output {
    install_validators();
    let mut cmd = Command::new("python3");
    cmd.args(["-m", "kubernetes_validate", "--strict"]);
    for version in KUBERNETES_VERSIONS {
        cmd.args(["-k", version]);
    }
    cmd.args(files)
        .stdin(Stdio::null())
        .output()
        .expect("running python3 -m kubernetes_validate")
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn kubernetes_manifests_pass_strict_schema_validation() {
    let files = kubernetes_files();
    let out = kubernetes_validate(&files);
    let text = output_text(&out);
    println!("{text}");
    assert!(out.status.success(), "kubernetes-validate failed:\n{text}");
    // One "passed" line per object and version: nothing was skipped as unknown.
    let n_objects = kubernetes_objects().len();
    assert_eq!(
        text.matches(" passed for resource ").count(),
        n_objects * KUBERNETES_VERSIONS.len(),
        "{text}"
    );
}

/// The validator is not a no-op: a misspelt field (deep in a container) and a wrong type are
/// refused. It reports one error per object, hence one file for each.
#[test]
fn kubernetes_validation_refuses_a_broken_manifest() {
    let job = read(&repo().join("deploy/kubernetes/migrate-job.yaml"));
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let broken = [
        (
            tmp.join("misspelt-field-job.yaml"),
            job.replace(
                "readOnlyRootFilesystem: true",
                "readOnlyRootFilesystem: true\n            runAsNonroot: true",
            ),
            "'runAsNonroot' was unexpected",
        ),
        (
            tmp.join("wrong-type-job.yaml"),
            job.replace("backoffLimit: 3", "backoffLimit: three"),
            "'three' is not of type 'integer'",
        ),
    ];
    for (path, text, _) in &broken {
        std::fs::write(path, text).expect("writing a broken manifest");
    }
    let paths: Vec<PathBuf> = broken.iter().map(|(p, _, _)| p.clone()).collect();
    let out = kubernetes_validate(&paths);
    let text = output_text(&out);
    assert!(!out.status.success(), "broken manifests passed:\n{text}");
    for (path, _, error) in &broken {
        let name = path.file_name().expect("a file name").to_string_lossy();
        assert!(
            text.lines()
                .any(|l| l.contains(&*name) && l.contains(error)),
            "no {error:?} for {name}:\n{text}"
        );
    }
}

/// Validates the compose file, and a copy with a misspelt key that must fail (so the check is
/// not a no-op), against the Compose Specification's schema.
const VALIDATE_COMPOSE: &str = r#"
import json, sys, yaml, jsonschema
schema = json.load(open(sys.argv[1]))
document = yaml.safe_load(open(sys.argv[2]))
validator = jsonschema.Draft7Validator(schema)
errors = sorted(validator.iter_errors(document), key=str)
for e in errors:
    print("compose.yaml:", "/".join(map(str, e.absolute_path)), e.message)
broken = json.loads(json.dumps(document))
broken["services"]["posthorn"]["restrat"] = "always"
if not any(validator.iter_errors(broken)):
    sys.exit("the schema accepted a misspelt key: the check is not working")
print(f"compose.yaml: {len(errors)} schema errors, {len(document['services'])} services")
sys.exit(1 if errors else 0)
"#;

#[test]
fn compose_file_passes_the_compose_specification_schema() {
    install_validators();
    let out = Command::new("python3")
        .arg("-c")
        .arg(VALIDATE_COMPOSE)
        .arg(repo().join("tests/deploy/compose-spec.json"))
        .arg(repo().join("deploy/compose.yaml"))
        .stdin(Stdio::null())
        .output()
        .expect("running python3");
    let text = output_text(&out);
    println!("{text}");
    assert!(out.status.success(), "{text}");
    assert!(text.contains("compose.yaml: 0 schema errors"), "{text}");
}

// --- What posthorn needs from them ------------------------------------------------------------

#[test]
fn the_sidecar_is_locked_down_probed_scraped_and_configured_from_secrets() {
    let objects = kubernetes_objects();
    let deployment = &objects["Deployment/orders"];
    let pod = at(deployment, "/spec/template/spec");
    assert_eq!(
        pod["enableServiceLinks"], false,
        "Service links would inject POSTHORN_* variables"
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    // Several replicas, one publisher: the lease decides which sidecar publishes, and each
    // names itself after its pod so a restarted container takes its own lease back.
    assert!(
        at(deployment, "/spec/replicas").as_i64() > Some(1),
        "replicas share the outbox through the lease"
    );

    let posthorn = container(pod, "posthorn");
    assert_locked_down("posthorn sidecar", posthorn);
    assert_eq!(posthorn["args"], serde_json::json!(["run"]));
    assert_eq!(posthorn["ports"][0]["containerPort"], HTTP_PORT);
    let port_name = str_at(posthorn, "/ports/0/name");
    // Readiness is /healthz in a sidecar: /readyz would take the service out of traffic
    // whenever Kafka is down.
    for (probe, path) in [
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/healthz"),
    ] {
        let get = at(posthorn, &format!("/{probe}/httpGet"));
        assert_eq!(get["path"], path, "{probe}");
        assert!(
            get["port"] == port_name || get["port"] == HTTP_PORT,
            "{probe} port"
        );
    }

    let annotations = at(deployment, "/spec/template/metadata/annotations");
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], HTTP_PORT.to_string());
    assert_eq!(annotations["prometheus.io/path"], "/metrics");

    let env = at(posthorn, "/env");
    for (var, secret) in [
        ("POSTHORN_DATABASE_URL", "posthorn-relay"),
        ("POSTHORN_KAFKA_SASL_USERNAME", "posthorn-relay"),
        ("POSTHORN_KAFKA_SASL_PASSWORD", "posthorn-relay"),
    ] {
        let r = secret_ref(env, var).unwrap_or_else(|| panic!("{var} is not from a Secret"));
        assert_eq!(r["name"], secret, "{var}");
    }
    assert_eq!(
        plain_value(env, "POSTHORN_KAFKA_SECURITY_PROTOCOL"),
        Some("SASL_SSL")
    );
    assert!(plain_value(env, "POSTHORN_KAFKA_SASL_MECHANISM").is_some());

    let config = accepted_config("the sidecar", resolved_env(posthorn, &objects));
    assert!(
        config
            .database
            .url()
            .starts_with("postgres://posthorn_relay:"),
        "the relay connects as the least-privilege role"
    );
    // SIGTERM's wait for acknowledgements ends before the kubelet's SIGKILL.
    let grace_secs = at(pod, "/terminationGracePeriodSeconds")
        .as_u64()
        .expect("a number");
    assert!(
        config.shutdown_timeout.as_secs() < grace_secs,
        "POSTHORN_SHUTDOWN_TIMEOUT_MS {:?} must end before terminationGracePeriodSeconds {grace_secs}",
        config.shutdown_timeout
    );
}

#[test]
fn the_migrate_job_runs_migrate_as_the_migrator() {
    let objects = kubernetes_objects();
    let job = &objects["Job/posthorn-migrate"];
    let pod = at(job, "/spec/template/spec");
    assert_eq!(pod["restartPolicy"], "Never");
    assert_eq!(pod["enableServiceLinks"], false);
    let migrate = container(pod, "migrate");
    assert_locked_down("migrate Job", migrate);
    assert_eq!(migrate["args"], serde_json::json!(["migrate"]));
    let url = secret_ref(at(migrate, "/env"), "POSTHORN_DATABASE_URL").expect("from a Secret");
    assert_eq!(url["name"], "posthorn-migrator");

    let config = accepted_config("the migrate Job", resolved_env(migrate, &objects));
    assert!(config
        .database
        .url()
        .starts_with("postgres://posthorn_migrator:"));
    // Both pods run the same image.
    let sidecar = container(
        at(&objects["Deployment/orders"], "/spec/template/spec"),
        "posthorn",
    );
    assert_eq!(migrate["image"], sidecar["image"]);
}

#[test]
fn compose_runs_postgres_kafka_migrate_posthorn_a_writer_and_a_consumer() {
    let compose = yaml_documents(&repo().join("deploy/compose.yaml"));
    let services = at(&compose[0], "/services");
    for name in [
        "postgres", "kafka", "migrate", "posthorn", "writer", "consumer",
    ] {
        assert!(
            services.get(name).is_some(),
            "compose has no {name} service"
        );
    }
    for name in ["migrate", "posthorn"] {
        let service = &services[name];
        let context = repo()
            .join("deploy")
            .join(str_at(service, "/build/context"));
        let dockerfile = context.join(str_at(service, "/build/dockerfile"));
        assert_eq!(
            dockerfile.canonicalize().expect("the Dockerfile exists"),
            repo().join("Dockerfile")
        );
        let env = at(service, "/environment")
            .as_object()
            .expect("environment is a map")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().expect("string values").to_owned()))
            .collect();
        accepted_config(&format!("compose service {name}"), env);
    }
    assert_eq!(
        services["migrate"]["command"],
        serde_json::json!(["migrate"])
    );
    assert_eq!(services["posthorn"]["command"], serde_json::json!(["run"]));
    assert_eq!(
        services["posthorn"]["depends_on"]["migrate"]["condition"],
        "service_completed_successfully"
    );
    let writer = services["writer"]["command"].to_string();
    for part in ["BEGIN;", "INSERT INTO outbox", "COMMIT;"] {
        assert!(
            writer.contains(part),
            "the writer's loop lacks {part}: {writer}"
        );
    }
    let consumer = services["consumer"]["command"].to_string();
    assert!(consumer.contains("kafka-console-consumer"), "{consumer}");
}

/// Dockerfile instructions with continuation lines joined and comments dropped.
fn dockerfile_instructions() -> Vec<(String, String)> {
    let text = read(&repo().join("Dockerfile"));
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                let (keyword, args) = current.split_once(' ').unwrap_or((&current, ""));
                instructions.push((keyword.to_uppercase(), args.trim().to_owned()));
                current.clear();
            }
        }
    }
    instructions
}

#[test]
fn the_image_runs_posthorn_run_as_a_numeric_non_root_user() {
    let instructions = dockerfile_instructions();
    let find_all = |keyword: &str| -> Vec<&str> {
        instructions
            .iter()
            .filter(|(k, _)| k == keyword)
            .map(|(_, a)| a.as_str())
            .collect()
    };
    // Base images are build arguments with the standard defaults, declared before any FROM.
    let first_from = instructions
        .iter()
        .position(|(k, _)| k == "FROM")
        .expect("FROM");
    let global_args: Vec<&str> = instructions[..first_from]
        .iter()
        .filter(|(k, _)| k == "ARG")
        .map(|(_, a)| a.as_str())
        .collect();
    assert!(
        global_args.contains(&"RUST_IMAGE=rust:1-bookworm"),
        "{global_args:?}"
    );
    assert!(
        global_args.contains(&"RUNTIME_IMAGE=debian:bookworm-slim"),
        "{global_args:?}"
    );
    assert_eq!(
        find_all("FROM"),
        ["${RUST_IMAGE} AS build", "${RUNTIME_IMAGE} AS runtime"]
    );
    assert!(
        find_all("RUN")
            .iter()
            .any(|r| r.contains("cargo build --release --locked")),
        "the build stage builds with --release --locked"
    );

    // The runtime stage: the last value of each instruction is the image's.
    let runtime = &instructions[instructions
        .iter()
        .rposition(|(k, _)| k == "FROM")
        .expect("a runtime stage")..];
    let last = |keyword: &str| {
        runtime
            .iter()
            .rev()
            .find(|(k, _)| k == keyword)
            .map(|(_, a)| a.as_str())
            .unwrap_or_else(|| panic!("no {keyword} in the runtime stage"))
    };
    assert_eq!(last("ENTRYPOINT"), r#"["/usr/local/bin/posthorn"]"#);
    assert_eq!(last("CMD"), r#"["run"]"#);
    assert_eq!(last("EXPOSE"), HTTP_PORT.to_string());
    let user = last("USER");
    let uid: u64 = user
        .split(':')
        .next()
        .and_then(|u| u.parse().ok())
        .unwrap_or_else(|| panic!("USER {user} is not numeric (runAsNonRoot needs a number)"));
    assert_eq!(uid, UID, "the image's user is the one the manifests run as");

    let ignored = read(&repo().join(".dockerignore"));
    for entry in ["target/", ".git"] {
        assert!(
            ignored.lines().any(|l| l.trim() == entry),
            ".dockerignore lacks {entry}"
        );
    }
}
