//! From a repository name to the image it stands for: the sorted, de-duplicated
//! package list and the target architecture.
//!
//! Pure: no I/O, no actix. The name has already passed the OCI grammar
//! (`reference::parse_route`), so components hold only `[a-z0-9._-]`.

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
    /// The Nix system string the packages are built for.
    pub fn nix_system(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64-linux",
            Arch::Arm64 => "aarch64-linux",
        }
    }

    /// The architecture as the OCI image config names it.
    pub fn oci(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }
}

/// What one repository name asks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct ImageRequest {
    /// Attribute paths in the package set, sorted and unique.
    pub packages: Vec<String>,
    pub arch: Arch,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    #[error("an image may name at most {max} packages, this one names {count}")]
    TooManyPackages { count: usize, max: usize },
}

impl ImageRequest {
    /// Meta-packages (`shell`, `arm64`) count only in the leading run of components,
    /// so `htop/shell` asks for a package called `shell`, as users of other Nixery
    /// instances expect.
    pub fn from_name(name: &str, max_packages: usize) -> Result<Self, ImageError> {
        let mut arch = Arch::Amd64;
        let mut packages: Vec<String> = Vec::new();
        let mut leading = true;
        for component in name.split('/') {
            if leading {
                match component {
                    "shell" => {
                        packages.extend(SHELL_PACKAGES.iter().map(|p| p.to_string()));
                        continue;
                    }
                    "arm64" => {
                        arch = Arch::Arm64;
                        continue;
                    }
                    _ => leading = false,
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
        Ok(ImageRequest { packages, arch })
    }

    /// The optional packages not already requested.
    pub fn optional_packages(&self) -> Vec<String> {
        OPTIONAL_PACKAGES
            .iter()
            .filter(|p| !self.packages.iter().any(|q| q == *p))
            .map(|p| p.to_string())
            .collect()
    }

    /// A readable name for logs and the build page: `arm64/git/htop`.
    pub fn display_name(&self) -> String {
        let mut parts = Vec::new();
        if self.arch == Arch::Arm64 {
            parts.push("arm64".to_string());
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
        assert_eq!(r.arch, Arch::Arm64);
        assert_eq!(r.arch.nix_system(), "aarch64-linux");
        let s = ImageRequest::from_name("shell/arm64/htop", 64).unwrap();
        assert_eq!(r, s);
        let only = ImageRequest::from_name("arm64", 64).unwrap();
        assert!(only.packages.is_empty());
        assert_eq!(only.arch, Arch::Arm64);
        assert_eq!(
            ImageRequest::from_name("htop/arm64", 64).unwrap().arch,
            Arch::Amd64
        );
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
