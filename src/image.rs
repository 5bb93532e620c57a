//! From a repository name to the image it stands for: the sorted, de-duplicated
//! package list and the target architecture, if the name picks one.
//!
//! Pure: no I/O, no actix. The name has already passed the OCI grammar
//! (`reference::parse_route`), so components hold only `[a-z0-9._-]`.

use crate::compression::Compression;
use serde::Serialize;

/// Packages added by the `shell` meta-package.
const SHELL_PACKAGES: [&str; 4] = ["bashInteractive", "coreutils", "moreutils", "nano"];

/// Packages every image gets when the package set has them (certificates and the
/// protocol/service databases that most network programs expect).
pub const OPTIONAL_PACKAGES: [&str; 2] = ["cacert", "iana-etc"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
pub enum Arch {
    #[serde(rename = "amd64")]
    Amd64,
    #[serde(rename = "arm64")]
    Arm64,
}

impl Arch {
    /// Every architecture the registry can serve, in the order image indexes list them.
    pub const ALL: [Arch; 2] = [Arch::Amd64, Arch::Arm64];

    /// The Nix system string the packages are built for.
    pub fn nix_system(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64-linux",
            Arch::Arm64 => "aarch64-linux",
        }
    }

    /// The architecture of a Nix system string, if the registry serves it.
    pub fn from_nix_system(system: &str) -> Option<Arch> {
        Arch::ALL.into_iter().find(|a| a.nix_system() == system)
    }

    /// The architecture this server runs on, as the platform it serves by default.
    pub fn host() -> Option<Arch> {
        match std::env::consts::ARCH {
            "x86_64" => Some(Arch::Amd64),
            "aarch64" => Some(Arch::Arm64),
            _ => None,
        }
    }

    /// The architecture as the OCI image config names it.
    pub fn oci(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }

    /// The CPU variant an image index names, as clients match it (`v8` for arm64,
    /// which containerd normalises every arm64 platform to).
    pub fn variant(self) -> Option<&'static str> {
        match self {
            Arch::Amd64 => None,
            Arch::Arm64 => Some("v8"),
        }
    }

    /// `linux/arm64/v8`, as clients name platforms.
    pub fn platform(self) -> String {
        match self.variant() {
            Some(v) => format!("linux/{}/{v}", self.oci()),
            None => format!("linux/{}", self.oci()),
        }
    }

    /// The name component that selects this architecture.
    fn from_prefix(component: &str) -> Option<Arch> {
        Arch::ALL.into_iter().find(|a| a.oci() == component)
    }
}

/// What one repository name asks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct ImageRequest {
    /// Attribute paths in the package set, sorted and unique.
    pub packages: Vec<String>,
    /// The architecture a prefix (`arm64/`, `amd64/`) picked; None asks for every
    /// platform the registry serves.
    pub arch: Option<Arch>,
    /// How layers are compressed: zstd when the name starts with `zstd/`, else the
    /// server's default, filled in before the request is keyed. Left out of keys
    /// for gzip, so gzip images keep the keys they had before zstd existed.
    #[serde(skip_serializing_if = "is_gzip")]
    pub compression: Option<Compression>,
}

fn is_gzip(c: &Option<Compression>) -> bool {
    matches!(c, None | Some(Compression::Gzip))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    #[error("an image may name at most {max} packages, this one names {count}")]
    TooManyPackages { count: usize, max: usize },
}

impl ImageRequest {
    /// Meta-packages (`shell`, `arm64`, `amd64`, `zstd`) count only in the leading run of
    /// components, so `htop/shell` asks for a package called `shell`, as users of other
    /// Nixery instances expect (and `hello/zstd` for the zstd tool).
    pub fn from_name(name: &str, max_packages: usize) -> Result<Self, ImageError> {
        let mut arch = None;
        let mut compression = None;
        let mut packages: Vec<String> = Vec::new();
        let mut leading = true;
        for component in name.split('/') {
            if leading {
                match component {
                    "shell" => {
                        packages.extend(SHELL_PACKAGES.iter().map(|p| p.to_string()));
                        continue;
                    }
                    "zstd" => {
                        compression = Some(Compression::Zstd);
                        continue;
                    }
                    other => match Arch::from_prefix(other) {
                        Some(a) => {
                            arch = Some(a);
                            continue;
                        }
                        None => leading = false,
                    },
                }
            }
            packages.push(component.to_string());
        }
        packages.sort();
        packages.dedup();
        if packages.len() > max_packages {
            return Err(ImageError::TooManyPackages {
                count: packages.len(),
                max: max_packages,
            });
        }
        Ok(ImageRequest {
            packages,
            arch,
            compression,
        })
    }

    /// The optional packages not already requested.
    pub fn optional_packages(&self) -> Vec<String> {
        OPTIONAL_PACKAGES
            .iter()
            .filter(|p| !self.packages.iter().any(|q| q == *p))
            .map(|p| p.to_string())
            .collect()
    }

    /// The same packages for one architecture.
    pub fn for_arch(&self, arch: Arch) -> ImageRequest {
        ImageRequest {
            packages: self.packages.clone(),
            arch: Some(arch),
            compression: self.compression,
        }
    }

    /// The server's compression unless the name chose one.
    pub fn with_default_compression(mut self, default: Compression) -> ImageRequest {
        self.compression.get_or_insert(default);
        self
    }

    /// The compression of a request whose default was filled in.
    pub fn compression(&self) -> Compression {
        self.compression.unwrap_or_default()
    }

    /// The architecture of a single-platform request.
    pub fn arch_or(&self, default: Arch) -> Arch {
        self.arch.unwrap_or(default)
    }

    /// A readable name for logs and the build page: `arm64/git/htop`. amd64 goes
    /// unnamed, as it did before the registry served more than one platform.
    pub fn display_name(&self) -> String {
        let mut parts = Vec::new();
        if self.compression() == Compression::Zstd {
            parts.push("zstd".to_string());
        }
        if let Some(a) = self.arch.filter(|a| *a != Arch::Amd64) {
            parts.push(a.oci().to_string());
        }
        parts.extend(self.packages.iter().cloned());
        if parts.is_empty() {
            "(empty)".into()
        } else {
            parts.join("/")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkgs(name: &str) -> Vec<String> {
        ImageRequest::from_name(name, 64).unwrap().packages
    }

    #[test]
    fn zstd_is_a_meta_package_only_at_the_front() {
        let zstd = ImageRequest::from_name("zstd/arm64/hello", 64).unwrap();
        assert_eq!(zstd.compression, Some(Compression::Zstd));
        assert_eq!(zstd.packages, ["hello"]);
        assert_eq!(zstd.display_name(), "zstd/arm64/hello");
        let tool = ImageRequest::from_name("hello/zstd", 64).unwrap();
        assert_eq!(tool.compression, None);
        assert_eq!(tool.packages, ["hello", "zstd"]);
        // A gzip request serialises as it did before compression was a choice, so
        // the keys of images already built stay the same.
        let gzip = ImageRequest::from_name("hello", 64)
            .unwrap()
            .with_default_compression(Compression::Gzip);
        assert_eq!(
            serde_json::to_string(&gzip).unwrap(),
            r#"{"packages":["hello"],"arch":null}"#
        );
        let by_default = ImageRequest::from_name("hello", 64)
            .unwrap()
            .with_default_compression(Compression::Zstd);
        assert_eq!(by_default.compression(), Compression::Zstd);
        assert_eq!(
            serde_json::to_string(&by_default).unwrap(),
            r#"{"packages":["hello"],"arch":null,"compression":"zstd"}"#
        );
        assert_eq!(
            by_default.for_arch(Arch::Arm64).compression(),
            Compression::Zstd
        );
    }

    #[test]
    fn sorted_and_deduplicated() {
        assert_eq!(pkgs("htop/git/hello"), ["git", "hello", "htop"]);
        assert_eq!(pkgs("git/git"), ["git"]);
        assert_eq!(pkgs("hello/cowsay"), pkgs("cowsay/hello"));
    }

    #[test]
    fn shell_expands_only_at_the_front() {
        assert_eq!(
            pkgs("shell/htop"),
            ["bashInteractive", "coreutils", "htop", "moreutils", "nano"]
        );
        assert_eq!(pkgs("htop/shell"), ["htop", "shell"]);
        assert_eq!(
            pkgs("shell/coreutils"),
            ["bashInteractive", "coreutils", "moreutils", "nano"]
        );
    }

    #[test]
    fn arm64_selects_the_architecture() {
        let r = ImageRequest::from_name("arm64/shell/htop", 64).unwrap();
        assert_eq!(r.arch, Some(Arch::Arm64));
        assert_eq!(r.arch_or(Arch::Amd64).nix_system(), "aarch64-linux");
        let s = ImageRequest::from_name("shell/arm64/htop", 64).unwrap();
        assert_eq!(r, s);
        let only = ImageRequest::from_name("arm64", 64).unwrap();
        assert!(only.packages.is_empty());
        assert_eq!(only.arch, Some(Arch::Arm64));
        assert_eq!(
            ImageRequest::from_name("htop/arm64", 64).unwrap().arch,
            None
        );
        let amd = ImageRequest::from_name("amd64/htop", 64).unwrap();
        assert_eq!(amd.arch, Some(Arch::Amd64));
        assert_eq!(amd.display_name(), "htop");
        assert_eq!(
            r.display_name(),
            "arm64/bashInteractive/coreutils/htop/moreutils/nano"
        );
        assert_eq!(ImageRequest::from_name("htop", 64).unwrap().arch, None);
    }

    #[test]
    fn platforms_as_clients_name_them() {
        assert_eq!(Arch::Arm64.platform(), "linux/arm64/v8");
        assert_eq!(Arch::Amd64.platform(), "linux/amd64");
        assert_eq!(Arch::from_nix_system("aarch64-linux"), Some(Arch::Arm64));
        assert_eq!(Arch::from_nix_system("s390x-linux"), None);
    }

    #[test]
    fn nested_attributes_pass_through() {
        assert_eq!(pkgs("tools.figlet"), ["tools.figlet"]);
    }

    #[test]
    fn optional_packages_skip_requested_ones() {
        let r = ImageRequest::from_name("cacert/hello", 64).unwrap();
        assert_eq!(r.optional_packages(), ["iana-etc"]);
    }

    #[test]
    fn package_limit() {
        let name = (0..10)
            .map(|i| format!("p{i}"))
            .collect::<Vec<_>>()
            .join("/");
        assert_eq!(
            ImageRequest::from_name(&name, 5),
            Err(ImageError::TooManyPackages { count: 10, max: 5 })
        );
    }
}
