//! Every setting the deployment files use must be a real configuration key: a typo
//! there would be silently ignored by the server and noticed only in production.

use nixery::config::{Settings, ENV_ALIASES};
use std::collections::HashMap;
use std::path::Path;

/// Variables that are read by something other than the configuration loader.
const OTHER_VARIABLES: [&str; 2] = ["RUST_LOG", "NIXERY_CONFIG"];

fn deploy_file(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `KEY: "value"` lines of the ConfigMap's `data:` block.
fn configmap_env(text: &str) -> HashMap<String, String> {
    let mut env = HashMap::new();
    let mut in_data = false;
    for line in text.lines() {
        if line.starts_with("data:") {
            in_data = true;
            continue;
        }
        if in_data {
            if !line.starts_with("  ") {
                break;
            }
            let line = line.trim();
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let (k, v) = line.split_once(':').expect("key: value");
            env.insert(k.trim().to_string(), v.trim().trim_matches('"').to_string());
        }
    }
    env
}

/// `Environment=KEY=value` lines of a systemd unit.
fn unit_env(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("Environment="))
        .map(|kv| {
            let (k, v) = kv.split_once('=').expect("KEY=value");
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn check(env: &HashMap<String, String>, file: &str) {
    assert!(!env.is_empty(), "{file}: no settings found");
    for key in env.keys() {
        let known = ENV_ALIASES.iter().any(|(alias, _)| alias == key)
            || OTHER_VARIABLES.contains(&key.as_str())
            || (key.starts_with("NIXERY_") && key.contains("__"));
        assert!(known, "{file}: {key} is not a configuration variable");
    }
    // Loading rejects unknown NIXERY_<SECTION>__<KEY> keys and bad values.
    if let Err(e) = Settings::load(env) {
        panic!("{file}: {e}");
    }
}

#[test]
fn configmap_settings_are_real_keys() {
    check(
        &configmap_env(&deploy_file("kubernetes/configmap.yaml")),
        "configmap.yaml",
    );
}

#[test]
fn systemd_settings_are_real_keys() {
    check(
        &unit_env(&deploy_file("systemd/nixery.service")),
        "nixery.service",
    );
}

#[test]
fn a_misspelt_key_is_caught() {
    let mut env = configmap_env(&deploy_file("kubernetes/configmap.yaml"));
    env.insert("NIXERY_NIX__WORKRS".into(), "2".into());
    assert!(Settings::load(&env).is_err());
}

#[test]
fn probes_use_the_health_route_that_needs_no_credentials() {
    let deployment = deploy_file("kubernetes/deployment.yaml");
    assert_eq!(
        deployment.matches("path: /healthz").count(),
        2,
        "readiness and liveness"
    );
    // The ConfigMap turns authentication on, so /v2/ would answer 401.
    let env = configmap_env(&deploy_file("kubernetes/configmap.yaml"));
    assert!(env.contains_key("NIXERY_AUTH__HTPASSWD"));
    assert!(deployment.contains("configMapRef: {name: nixery}"));
}
