//! What the server asks Nix and how it reads the answers: argument lists for
//! `nix-instantiate` and `nix-store`, and parsers for their output.
//!
//! Pure: no processes are started here (the NixWorker actor does that), so every
//! parser is tested on captured output without Nix.

use crate::layers::StorePathInfo;
use serde::Deserialize;

pub mod errors;
pub mod gc;
pub mod progress;
pub mod serve;

pub use progress::RealiseProgress;

/// The expression that resolves an image's packages; written next to the storage at
/// start-up so `nix-instantiate` can read it from a file.
pub const PREPARE_IMAGE_NIX: &str = include_str!("nix/prepare-image.nix");

/// Where the package set comes from, as passed to the expression.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct SourceArgs {
    pub src_type: &'static str,
    pub src_args: String,
}

/// The nixpkgs config of every evaluation, from the registry's settings only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NixpkgsConfig {
    pub allow_unfree: bool,
    /// Absolute path of a Nix file with the rest of the nixpkgs config, or empty.
    pub file: String,
}

/// What every Nix call is told explicitly, so that the host's nix.conf does not
/// decide where store paths come from or how long a dead cache is waited for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NixOptions {
    /// Space-separated, as in nix.conf; empty for none.
    pub substituters: String,
    pub trusted_public_keys: String,
    pub connect_timeout_secs: u64,
    pub stalled_download_timeout_secs: u64,
    /// How long a fetched channel tarball is reused before Nix fetches it again.
    pub tarball_ttl_secs: u64,
    /// Derivations one `nix-store --realise` builds or downloads at once.
    pub max_jobs: usize,
}

impl NixOptions {
    pub fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        let mut option = |name: &str, value: String| {
            args.extend(["--option".to_string(), name.to_string(), value]);
        };
        option("substituters", self.substituters.clone());
        option("trusted-public-keys", self.trusted_public_keys.clone());
        option("connect-timeout", self.connect_timeout_secs.to_string());
        option(
            "stalled-download-timeout",
            self.stalled_download_timeout_secs.to_string(),
        );
        option("tarball-ttl", self.tarball_ttl_secs.to_string());
        // A build that finds a path locked by another image's build looks again
        // after this many seconds (Nix's default is 5, its floor 1): with many new
        // images over shared dependencies, that wait was most of their answer.
        option("build-poll-interval", "1".into());
        option("max-jobs", self.max_jobs.to_string());
        args
    }
}

/// Environment variables through which the server's own account could change what
/// a package set evaluates to (nixpkgs reads NIXPKGS_ALLOW_UNFREE and friends even
/// when given a config); they are removed from every Nix call, and HOME points at
/// an empty directory.
pub fn is_leaky_env(name: &str) -> bool {
    name.starts_with("NIXPKGS_") || name == "NIX_PATH" || name == "XDG_CONFIG_HOME"
}

/// `nix-instantiate` arguments that evaluate which derivations make up an image.
/// The package names travel as JSON in an `--argstr`, never as Nix code.
pub fn eval_args(
    expr_file: &str,
    source: &SourceArgs,
    config: &NixpkgsConfig,
    system: &str,
    packages: &[String],
    optional: &[String],
) -> Vec<String> {
    let json = |v: &[String]| serde_json::to_string(v).expect("string lists serialise");
    let mut args = eval_common_args(expr_file, source, config, system, &json(optional));
    args.extend([
        "--argstr".into(),
        "packages".into(),
        json(packages),
        "-A".into(),
        "info".into(),
    ]);
    args
}

/// `nix-instantiate` arguments that evaluate several images' package lists at once
/// (the package set imported once); see [`parse_batch`].
pub fn eval_batch_args(
    expr_file: &str,
    source: &SourceArgs,
    config: &NixpkgsConfig,
    system: &str,
    requests: &[Vec<String>],
    optional: &[String],
) -> Vec<String> {
    let optional = serde_json::to_string(optional).expect("string lists serialise");
    let mut args = eval_common_args(expr_file, source, config, system, &optional);
    args.extend([
        "--argstr".into(),
        "requests".into(),
        serde_json::to_string(requests).expect("string lists serialise"),
        "-A".into(),
        "batch".into(),
    ]);
    args
}

fn eval_common_args(
    expr_file: &str,
    source: &SourceArgs,
    config: &NixpkgsConfig,
    system: &str,
    optional_json: &str,
) -> Vec<String> {
    vec![
        "--eval".into(),
        "--strict".into(),
        "--json".into(),
        // Evaluating drvPath must write the .drv files so nix-store can realise them.
        "--read-write-mode".into(),
        expr_file.into(),
        "--argstr".into(),
        "srcType".into(),
        source.src_type.into(),
        "--argstr".into(),
        "srcArgs".into(),
        source.src_args.clone(),
        "--argstr".into(),
        "allowUnfree".into(),
        config.allow_unfree.to_string(),
        "--argstr".into(),
        "nixpkgsConfig".into(),
        config.file.clone(),
        "--argstr".into(),
        "system".into(),
        system.into(),
        "--argstr".into(),
        "optional".into(),
        optional_json.into(),
    ]
}

/// One resolved package: the derivation and the output that goes into the image.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedPackage {
    pub name: String,
    pub drv_path: String,
    pub output: String,
    pub path: String,
    /// `meta.license` as SPDX ids or nixpkgs short names, for the SBOM.
    #[serde(default)]
    pub licenses: Vec<String>,
    #[serde(default)]
    pub homepage: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Evaluation {
    pub missing: Vec<String>,
    pub not_packages: Vec<String>,
    pub packages: Vec<ResolvedPackage>,
}

impl Evaluation {
    /// The top-level output paths, sorted and unique: what identifies the image's
    /// contents independently of how the packages were named.
    pub fn output_paths(&self) -> Vec<String> {
        let mut paths: Vec<String> = self.packages.iter().map(|p| p.path.clone()).collect();
        paths.sort();
        paths.dedup();
        paths
    }
}

pub fn parse_evaluation(stdout: &[u8]) -> Result<Evaluation, String> {
    serde_json::from_slice(stdout)
        .map_err(|e| format!("unexpected output from nix-instantiate: {e}"))
}

/// The results of [`eval_batch_args`], in request order: None for a request whose
/// evaluation threw, to be evaluated alone for its error.
pub fn parse_batch(stdout: &[u8]) -> Result<Vec<Option<Evaluation>>, String> {
    #[derive(Deserialize)]
    struct Tried {
        ok: bool,
        info: Option<Evaluation>,
    }
    let tried: Vec<Tried> = serde_json::from_slice(stdout)
        .map_err(|e| format!("unexpected output from nix-instantiate: {e}"))?;
    Ok(tried
        .into_iter()
        .map(|t| if t.ok { t.info } else { None })
        .collect())
}

/// Whether a store path is built, judged without asking Nix: Nix sets every file of
/// a path it registers to mtime 1 (canonicalisation, just before the registration),
/// where a builder writing its output in place (no sandbox) leaves the time of
/// writing. A lock file is no sign: a process that waits for a lock creates one,
/// also on a path long built. In the instant between canonicalisation and
/// registration a path is judged built too early; reading its closure then fails,
/// and the caller realises it instead.
pub fn path_built(path: &str) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| {
        use std::os::unix::fs::MetadataExt;
        m.mtime() == 1
    })
}

/// `nix-store --realise` arguments: each derivation of the images with just the
/// output we use.
pub fn realise_args<'a>(
    evals: impl IntoIterator<Item = &'a Evaluation>,
    timeout_secs: u64,
) -> Vec<String> {
    let mut targets: Vec<String> = evals
        .into_iter()
        .flat_map(|e| &e.packages)
        .map(|p| format!("{}!{}", p.drv_path, p.output))
        .collect();
    targets.sort();
    targets.dedup();
    let mut args = vec![
        "--realise".to_string(),
        "--timeout".to_string(),
        timeout_secs.to_string(),
    ];
    args.extend(targets);
    args
}

/// Parses `nix-store --dump-db` output (the registration format that
/// `nix-store --load-db` reads, stable across Nix versions): per path, the path,
/// its nar hash, nar size, deriver, reference count and references.
pub fn parse_registration(text: &str) -> Result<Vec<StorePathInfo>, String> {
    let mut lines = text.lines();
    let mut out = Vec::new();
    let bad = |what: &str| format!("unexpected nix-store --dump-db output: {what}");
    while let Some(path) = lines.next() {
        if path.is_empty() {
            continue;
        }
        let nar_hash = lines.next().ok_or_else(|| bad("missing hash"))?.trim();
        // Nix 2.8 prints bare base-16 sha256 here; later versions an algorithm prefix.
        let nar_hash = if nar_hash.contains(':') {
            nar_hash.to_string()
        } else {
            format!("sha256:{nar_hash}")
        };
        let nar_size: u64 = lines
            .next()
            .and_then(|l| l.trim().parse().ok())
            .ok_or_else(|| bad("missing or bad size"))?;
        let deriver = lines.next().ok_or_else(|| bad("missing deriver"))?.trim();
        let count: usize = lines
            .next()
            .and_then(|l| l.trim().parse().ok())
            .ok_or_else(|| bad("missing or bad reference count"))?;
        let mut references = Vec::with_capacity(count);
        for _ in 0..count {
            references.push(
                lines
                    .next()
                    .ok_or_else(|| bad("missing reference"))?
                    .to_string(),
            );
        }
        out.push(StorePathInfo {
            path: path.to_string(),
            nar_size,
            references,
            nar_hash,
            deriver: deriver.to_string(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eval_args_carry_names_as_json() {
        let src = SourceArgs {
            src_type: "path",
            src_args: "/pkgs".into(),
        };
        let config = NixpkgsConfig {
            allow_unfree: false,
            file: String::new(),
        };
        let args = eval_args(
            "/x.nix",
            &src,
            &config,
            "x86_64-linux",
            &["a\"b".into(), "${x}".into()],
            &["cacert".into()],
        );
        let i = args.iter().position(|a| a == "packages").unwrap();
        assert_eq!(args[i + 1], r#"["a\"b","${x}"]"#);
        assert_eq!(args[i - 1], "--argstr");
        assert_eq!(&args[args.len() - 2..], ["-A", "info"]);
        let i = args.iter().position(|a| a == "allowUnfree").unwrap();
        assert_eq!(args[i + 1], "false");
    }

    #[test]
    fn options_are_explicit_even_when_empty() {
        let o = NixOptions {
            substituters: String::new(),
            trusted_public_keys: "k:1".into(),
            connect_timeout_secs: 5,
            stalled_download_timeout_secs: 30,
            tarball_ttl_secs: 60,
            max_jobs: 4,
        };
        let args = o.args();
        assert_eq!(&args[..3], ["--option", "substituters", ""]);
        for (name, value) in [
            ("connect-timeout", "5"),
            ("max-jobs", "4"),
            ("build-poll-interval", "1"),
        ] {
            assert!(
                args.windows(3).any(|w| w == ["--option", name, value]),
                "{name} {value}: {args:?}"
            );
        }
        assert!(is_leaky_env("NIXPKGS_ALLOW_UNFREE"));
        assert!(is_leaky_env("NIX_PATH"));
        assert!(!is_leaky_env("NIX_CONFIG"));
    }

    #[test]
    fn batch_args_carry_every_request_as_json_and_parse_in_order() {
        let source = SourceArgs {
            src_type: "path",
            src_args: "/pkgs".into(),
        };
        let config = NixpkgsConfig {
            allow_unfree: false,
            file: String::new(),
        };
        let requests = vec![vec!["hello".to_string()], vec!["a\"b".to_string()]];
        let args = eval_batch_args("e.nix", &source, &config, "x86_64-linux", &requests, &[]);
        let i = args.iter().position(|a| a == "requests").unwrap();
        assert_eq!(args[i + 1], r#"[["hello"],["a\"b"]]"#);
        assert_eq!(&args[args.len() - 2..], ["-A", "batch"]);
        assert!(!args.iter().any(|a| a == "packages"));

        let out = br#"[{"ok":true,"info":{"missing":["x"],"notPackages":[],"packages":[]}},{"ok":false}]"#;
        let parsed = parse_batch(out).unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].as_ref().unwrap().missing, ["x"]);
        assert!(parsed[1].is_none());
        assert!(parse_batch(b"{}").is_err());
    }

    #[test]
    fn parses_evaluation() {
        let out = br#"{"missing":[],"notPackages":[],"packages":[{"drvPath":"/nix/store/a-hello.drv","name":"hello","output":"out","path":"/nix/store/b-hello"},{"drvPath":"/nix/store/c-m.drv","name":"m","output":"bin","path":"/nix/store/d-m-bin"}]}"#;
        let e = parse_evaluation(out).unwrap();
        assert_eq!(
            e.output_paths(),
            ["/nix/store/b-hello", "/nix/store/d-m-bin"]
        );
        assert_eq!(
            realise_args([&e, &e], 60),
            [
                "--realise",
                "--timeout",
                "60",
                "/nix/store/a-hello.drv!out",
                "/nix/store/c-m.drv!bin"
            ]
        );
        let missing = parse_evaluation(
            br#"{"missing":["nope","tools.nope"],"notPackages":["hello.drvpath"],"packages":[]}"#,
        )
        .unwrap();
        assert_eq!(missing.missing, ["nope", "tools.nope"]);
        assert_eq!(missing.not_packages, ["hello.drvpath"]);
        assert!(parse_evaluation(b"error").is_err());
    }

    #[test]
    fn parses_registration() {
        // Captured from `nix-store --dump-db` (Nix 2.8).
        let text = "/nix/store/amjh-hello-1.0\n9b1e61\n616\n/nix/store/arv2-hello-1.0.drv\n2\n/nix/store/8hzb-busybox\n/nix/store/q9v7-libfoo-1.0\n/nix/store/8hzb-busybox\nabcd\n1982568\n\n0\n";
        let infos = parse_registration(text).unwrap();
        assert_eq!(infos.len(), 2);
        assert_eq!(infos[0].nar_size, 616);
        assert_eq!(
            infos[0].references,
            ["/nix/store/8hzb-busybox", "/nix/store/q9v7-libfoo-1.0"]
        );
        assert_eq!(infos[0].nar_hash, "sha256:9b1e61");
        assert_eq!(infos[0].deriver, "/nix/store/arv2-hello-1.0.drv");
        assert_eq!(infos[1].path, "/nix/store/8hzb-busybox");
        assert_eq!(infos[1].deriver, "");
        assert!(infos[1].references.is_empty());
        assert!(parse_registration("/nix/store/x\nh\nnotanumber\n").is_err());
        assert!(parse_registration("/nix/store/x\nh\n1\n\n3\n/a\n").is_err());
    }

    #[test]
    fn a_path_is_built_once_nix_has_canonicalised_it_whatever_lock_files_say() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("abc-hello");
        let out_str = out.to_str().unwrap();
        assert!(!path_built(out_str), "missing");
        let file = std::fs::File::create(&out).unwrap();
        assert!(!path_built(out_str), "being written");
        file.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1))
            .unwrap();
        std::fs::File::create(dir.path().join("abc-hello.lock")).unwrap();
        assert!(path_built(out_str), "registered, with a waiter's lock file");
    }
}
