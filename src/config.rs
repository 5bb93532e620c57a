//! Typed configuration: `config/default.toml` (built in), an optional file named by
//! `NIXERY_CONFIG`, then the environment, including the Go Nixery's variable names.
//!
//! Pure after `load`: nothing else in the program reads the environment.

use crate::compression::Compression;
use crate::image::Arch;
use serde::Deserialize;
use std::collections::HashMap;

pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Go Nixery variable names and the keys they set.
pub const ENV_ALIASES: [(&str, &str); 14] = [
    ("PORT", "server.port"),
    ("NIXERY_LISTEN", "server.listen"),
    ("NIXERY_CHANNEL", "source.channel"),
    ("NIXERY_PKGS_REPO", "source.repo"),
    ("NIXERY_PKGS_PATH", "source.path"),
    ("NIXERY_STORAGE_BACKEND", "storage.backend"),
    ("STORAGE_PATH", "storage.path"),
    ("GCS_BUCKET", "storage.bucket"),
    ("S3_BUCKET", "storage.bucket"),
    ("STORAGE_EMULATOR_HOST", "storage.endpoint"),
    ("GOOGLE_APPLICATION_CREDENTIALS", "storage.credentials"),
    ("NIX_TIMEOUT", "nix.timeout_secs"),
    ("NIX_POPULARITY_URL", "layers.popularity_url"),
    ("NIXERY_NIX_WORKERS", "nix.workers"),
];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub server: Server,
    pub source: SourceSettings,
    pub storage: StorageSettings,
    pub nix: NixSettings,
    pub layers: LayerSettings,
    pub limits: Limits,
    pub auth: AuthSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    pub htpasswd: String,
    pub token_key: String,
    pub anonymous: String,
    pub service: String,
    pub token_ttl_secs: u64,
    pub realm: String,
    pub metrics_token: String,
    pub issuer: String,
    pub issuer_key: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    pub listen: String,
    pub port: u16,
    pub http_workers: usize,
    pub shutdown_grace_secs: u64,
    pub client_request_timeout_secs: u64,
    pub keep_alive_secs: u64,
    pub max_connections: usize,
    pub tls_cert: String,
    pub tls_key: String,
    pub metrics_listen: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSettings {
    pub channel: String,
    pub channel_url: String,
    pub repo: String,
    pub path: String,
    pub ref_ttl_secs: u64,
    pub watch_events: bool,
    pub watch_interval_secs: u64,
    pub allow_unfree: bool,
    pub nixpkgs_config: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSettings {
    pub backend: String,
    pub path: String,
    pub bucket: String,
    pub endpoint: String,
    pub region: String,
    pub credentials: String,
    pub signed_url_ttl_secs: u64,
    pub upload_concurrency: usize,
    pub upload_chunk_mib: usize,
    pub upload_chunks_in_flight: usize,
    pub verify_interval_secs: u64,
    pub retention_secs: u64,
    pub sweep: bool,
    pub sweep_interval_secs: u64,
}

impl StorageSettings {
    /// Whole MiB are always the multiple of 256 KiB that GCS requires of chunks.
    pub fn upload_chunk_bytes(&self) -> usize {
        self.upload_chunk_mib << 20
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NixSettings {
    pub timeout_secs: u64,
    pub eval_timeout_secs: u64,
    pub workers: usize,
    pub eval_workers: usize,
    pub eval_gather_ms: u64,
    pub max_jobs: usize,
    pub queue_limit: usize,
    pub failure_cache_secs: u64,
    pub bin_dir: String,
    pub substituters: String,
    pub trusted_public_keys: String,
    pub connect_timeout_secs: u64,
    pub stalled_download_timeout_secs: u64,
    pub systems: String,
    pub gc_roots_dir: String,
    pub gc_min_free_mib: u64,
    pub gc_max_free_mib: u64,
    pub gc_interval_secs: u64,
    pub gc_check_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerSettings {
    pub budget: usize,
    pub popularity_url: String,
    pub popularity_threshold: u64,
    pub size_threshold: u64,
    pub gzip_level: u32,
    pub compression: String,
    pub zstd_level: i32,
    pub compression_threads: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub max_name_length: usize,
    pub max_packages: usize,
    pub max_header_bytes: usize,
    pub max_image_bytes: u64,
    pub pulls_per_minute: u32,
    pub builds_per_hour: u32,
}

/// The package set images are built from, and how a tag selects its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PackageSource {
    /// A nixpkgs branch or commit, fetched from GitHub by Nix.
    Channel(String),
    /// A git repository; the tag names a branch or a commit.
    Git(String),
    /// A local directory.
    Path(String),
}

/// One line naming the key that is wrong.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

impl Settings {
    /// Reads the built-in defaults, `NIXERY_CONFIG`, and the given environment.
    pub fn load(env: &HashMap<String, String>) -> Result<Settings, ConfigError> {
        use config::{Config, Environment, File, FileFormat};
        let mut builder =
            Config::builder().add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml));
        if let Some(path) = env.get("NIXERY_CONFIG").filter(|p| !p.is_empty()) {
            builder = builder.add_source(File::new(path, FileFormat::Toml).required(true));
        }
        // Only NIXERY_<SECTION>__<KEY> reaches the generic mapping; single-underscore
        // NIXERY_ names are the aliases below and would otherwise read as unknown keys.
        let generic: HashMap<String, String> = env
            .iter()
            .filter(|(k, _)| k.starts_with("NIXERY_") && k[7..].contains("__"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        builder = builder.add_source(
            Environment::with_prefix("NIXERY")
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .source(Some(generic)),
        );
        for (var, key) in ENV_ALIASES {
            if let Some(value) = env.get(var) {
                builder = builder
                    .set_override(key, value.clone())
                    .map_err(|e| ConfigError(format!("{var}: {e}")))?;
            }
        }
        let settings: Settings = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ConfigError(e.to_string()))?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.package_source()?;
        let err = |key: &str, why: &str| Err(ConfigError(format!("{key}: {why}")));
        match self.storage.backend.as_str() {
            "filesystem" if self.storage.path.is_empty() => {
                return err(
                    "storage.path (STORAGE_PATH)",
                    "required for the filesystem backend",
                )
            }
            "gcs" if self.storage.bucket.is_empty() => {
                return err(
                    "storage.bucket (GCS_BUCKET)",
                    "required for the gcs backend",
                )
            }
            "s3" if self.storage.bucket.is_empty() => {
                return err("storage.bucket (S3_BUCKET)", "required for the s3 backend")
            }
            "filesystem" | "gcs" | "s3" => {}
            other => {
                return err(
                    "storage.backend (NIXERY_STORAGE_BACKEND)",
                    &format!(
                        "unknown backend {other:?}, expected \"filesystem\", \"gcs\" or \"s3\""
                    ),
                )
            }
        }
        if !(1..=9).contains(&self.layers.gzip_level) {
            return err("layers.gzip_level", "must be between 1 and 9");
        }
        self.compression()?;
        if !(1..=19).contains(&self.layers.zstd_level) {
            return err("layers.zstd_level", "must be between 1 and 19");
        }
        if self.layers.budget == 0 {
            return err("layers.budget", "must be at least 1");
        }
        if self.nix.timeout_secs == 0 {
            return err("nix.timeout_secs (NIX_TIMEOUT)", "must be at least 1");
        }
        if self.storage.upload_concurrency == 0 {
            return err("storage.upload_concurrency", "must be at least 1");
        }
        if !(1..=64).contains(&self.storage.upload_chunks_in_flight) {
            return err(
                "storage.upload_chunks_in_flight",
                "must be between 1 and 64",
            );
        }
        if self.nix.max_jobs > 256 {
            return err("nix.max_jobs", "must be at most 256");
        }
        if !(1..=256).contains(&self.storage.upload_chunk_mib) {
            return err("storage.upload_chunk_mib", "must be between 1 and 256");
        }
        let c = &self.source.nixpkgs_config;
        if !c.is_empty() && !std::path::Path::new(c).is_absolute() {
            return err(
                "source.nixpkgs_config",
                &format!("{c:?} must be an absolute path"),
            );
        }
        if !self.source.channel.is_empty() && self.source.channel_url.is_empty() {
            return err("source.channel_url", "required for a channel source");
        }
        if self.source.watch_interval_secs == 0 || self.source.ref_ttl_secs == 0 {
            return err(
                "source",
                "watch_interval_secs and ref_ttl_secs must be at least 1",
            );
        }
        if self.nix.connect_timeout_secs == 0 || self.nix.stalled_download_timeout_secs == 0 {
            return err(
                "nix",
                "connect_timeout_secs and stalled_download_timeout_secs must be at least 1",
            );
        }
        self.systems()?;
        if self.server.tls_cert.is_empty() != self.server.tls_key.is_empty() {
            return err(
                "server.tls_cert and server.tls_key",
                "set both (PEM files) or neither",
            );
        }
        if self.storage.sweep_interval_secs == 0 {
            return err("storage.sweep_interval_secs", "must be at least 1");
        }
        if self.nix.gc_check_secs == 0 {
            return err("nix.gc_check_secs", "must be at least 1");
        }
        if self.nix.gc_min_free_mib > self.nix.gc_max_free_mib {
            return err(
                "nix.gc_min_free_mib",
                "must not exceed nix.gc_max_free_mib (what a collection frees up to)",
            );
        }
        if self.auth.token_ttl_secs < 60 {
            return err("auth.token_ttl_secs", "must be at least 60");
        }
        if self.limits.max_packages == 0 || self.limits.max_name_length == 0 {
            return err(
                "limits",
                "max_packages and max_name_length must be at least 1",
            );
        }
        Ok(())
    }

    /// How layers are compressed unless the name asks for zstd.
    pub fn compression(&self) -> Result<Compression, ConfigError> {
        Compression::parse(&self.layers.compression).ok_or_else(|| {
            ConfigError(format!(
                "layers.compression: unknown compression {:?}, expected \"gzip\" or \"zstd\"",
                self.layers.compression
            ))
        })
    }

    pub fn package_source(&self) -> Result<PackageSource, ConfigError> {
        let s = &self.source;
        let set: Vec<PackageSource> = [
            (!s.channel.is_empty()).then(|| PackageSource::Channel(s.channel.clone())),
            (!s.repo.is_empty()).then(|| PackageSource::Git(s.repo.clone())),
            (!s.path.is_empty()).then(|| PackageSource::Path(s.path.clone())),
        ]
        .into_iter()
        .flatten()
        .collect();
        match set.as_slice() {
            [one] => {
                if let PackageSource::Path(p) = one {
                    if !std::path::Path::new(p).is_absolute() {
                        return Err(ConfigError(format!(
                            "source.path (NIXERY_PKGS_PATH): {p:?} must be an absolute path"
                        )));
                    }
                }
                Ok(one.clone())
            }
            [] => Err(ConfigError(
                "source: no package source; set one of NIXERY_CHANNEL, NIXERY_PKGS_REPO or NIXERY_PKGS_PATH".into(),
            )),
            _ => Err(ConfigError(
                "source: more than one package source; set only one of NIXERY_CHANNEL, NIXERY_PKGS_REPO, NIXERY_PKGS_PATH".into(),
            )),
        }
    }

    /// The platforms images are built for, sorted and unique; empty `nix.systems`
    /// means the host's own.
    pub fn systems(&self) -> Result<Vec<Arch>, ConfigError> {
        let mut archs = Vec::new();
        for system in self.nix.systems.split([' ', ',', '\t', '\n']) {
            if system.is_empty() {
                continue;
            }
            let arch = Arch::from_nix_system(system).ok_or_else(|| {
                let known: Vec<&str> = Arch::ALL.iter().map(|a| a.nix_system()).collect();
                ConfigError(format!(
                    "nix.systems: {system:?} is not a system this registry serves ({})",
                    known.join(", ")
                ))
            })?;
            archs.push(arch);
        }
        if archs.is_empty() {
            archs.push(Arch::host().ok_or_else(|| {
                ConfigError(format!(
                    "nix.systems: this host ({}) is no platform the registry serves; name the systems to build for",
                    std::env::consts::ARCH
                ))
            })?);
        }
        archs.sort();
        archs.dedup();
        Ok(archs)
    }

    /// Nix worker count, with 0 meaning one per CPU.
    /// Nix builds (realisations) at once: `nix.workers`, or one per CPU. (More Nix
    /// processes over shared paths mostly wait for each other's locks, and with
    /// eight at once Nix 2.8 was seen to deadlock on them.)
    pub fn nix_workers(&self) -> usize {
        if self.nix.workers == 0 {
            cpus()
        } else {
            self.nix.workers
        }
    }

    /// Layers packed at once: one per CPU, as packing uses one.
    pub fn cpu_workers(&self) -> usize {
        cpus()
    }

    /// Evaluations at once: `nix.eval_workers`, or one per CPU.
    pub fn eval_workers(&self) -> usize {
        if self.nix.eval_workers == 0 {
            cpus()
        } else {
            self.nix.eval_workers
        }
    }
}

fn cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_need_a_source() {
        let e = Settings::load(&env(&[])).unwrap_err().to_string();
        assert!(e.contains("NIXERY_PKGS_PATH"), "{e}");
    }

    #[test]
    fn go_names_and_generic_keys_override() {
        let s = Settings::load(&env(&[
            ("NIXERY_PKGS_PATH", "/pkgs"),
            ("PORT", "5000"),
            ("NIX_TIMEOUT", "7"),
            ("NIXERY_NIX__QUEUE_LIMIT", "3"),
            ("NIXERY_LAYERS__GZIP_LEVEL", "1"),
        ]))
        .unwrap();
        assert_eq!(s.server.port, 5000);
        assert_eq!(s.nix.timeout_secs, 7);
        assert_eq!(s.nix.queue_limit, 3);
        assert_eq!(s.layers.gzip_level, 1);
        assert_eq!(
            s.package_source().unwrap(),
            PackageSource::Path("/pkgs".into())
        );
    }

    #[test]
    fn bad_values_name_the_key() {
        for (pairs, key) in [
            (vec![("PORT", "http")], "port"),
            (vec![("NIXERY_STORAGE_BACKEND", "s4")], "storage.backend"),
            (vec![("NIXERY_LAYERS__GZIP_LEVEL", "12")], "gzip_level"),
            (vec![("NIXERY_STORAGE_BACKEND", "gcs")], "GCS_BUCKET"),
            (vec![("NIXERY_STORAGE_BACKEND", "s3")], "S3_BUCKET"),
            (vec![("NIXERY_CHANNEL", "nixos-unstable")], "more than one"),
        ] {
            let mut all = vec![("NIXERY_PKGS_PATH", "/pkgs")];
            all.extend(pairs);
            let e = Settings::load(&env(&all)).unwrap_err().to_string();
            assert!(e.contains(key), "{e} should name {key}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
        let rel = Settings::load(&env(&[("NIXERY_PKGS_PATH", "pkgs")]))
            .unwrap_err()
            .to_string();
        assert!(rel.contains("absolute"), "{rel}");
    }

    #[test]
    fn nix_and_source_keys() {
        let s = Settings::load(&env(&[
            ("NIXERY_PKGS_PATH", "/pkgs"),
            ("NIXERY_NIX__SUBSTITUTERS", ""),
            ("NIXERY_SOURCE__ALLOW_UNFREE", "true"),
        ]))
        .unwrap();
        assert_eq!(s.nix.substituters, "");
        assert!(s.source.allow_unfree);
        let d = Settings::load(&env(&[("NIXERY_PKGS_PATH", "/pkgs")])).unwrap();
        assert_eq!(d.nix.substituters, "https://cache.nixos.org/");
        assert!(!d.source.allow_unfree);
        let e = Settings::load(&env(&[
            ("NIXERY_PKGS_PATH", "/pkgs"),
            ("NIXERY_SOURCE__NIXPKGS_CONFIG", "cfg.nix"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(e.contains("source.nixpkgs_config"), "{e}");
    }

    #[test]
    fn systems_are_a_space_separated_list_defaulting_to_the_host() {
        let base = [("NIXERY_PKGS_PATH", "/pkgs")];
        let d = Settings::load(&env(&base)).unwrap();
        assert_eq!(d.systems().unwrap(), vec![Arch::host().unwrap()]);
        let both = Settings::load(&env(&[
            base[0],
            (
                "NIXERY_NIX__SYSTEMS",
                "aarch64-linux x86_64-linux aarch64-linux",
            ),
        ]))
        .unwrap();
        assert_eq!(both.systems().unwrap(), vec![Arch::Amd64, Arch::Arm64]);
        let e = Settings::load(&env(&[base[0], ("NIXERY_NIX__SYSTEMS", "s390x-linux")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("nix.systems") && e.contains("s390x-linux"),
            "{e}"
        );
    }
}
