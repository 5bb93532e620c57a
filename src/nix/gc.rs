//! Keeping the Nix store from filling its disk without breaking builds in flight.
//!
//! Every build roots the derivations and outputs it evaluated, from evaluation
//! until its layers are stored: a symlink per path in a directory of its own under
//! `nix.gc_roots_dir`, which Nix's garbage collector treats as roots (with their
//! closures). The directory goes when the build ends; a process that died leaves
//! its directory behind, and the next start removes it.
//!
//! The collector runs when free space on the store's filesystem falls under
//! `nix.gc_min_free_mib`, freeing up to `nix.gc_max_free_mib`, and on a schedule.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The roots of the builds of one process.
#[derive(Debug)]
pub struct GcRoots {
    dir: PathBuf,
    next: AtomicU64,
}

/// Roots held by one build; removed when dropped.
#[derive(Debug)]
pub struct HeldRoots {
    dir: PathBuf,
}

impl Drop for HeldRoots {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                log::warn!("removing GC roots {}: {e}", self.dir.display());
            }
        }
    }
}

impl GcRoots {
    /// The roots directory of this process under `base`, after removing those of
    /// processes on this host that no longer run.
    pub fn open(base: &Path) -> Result<Arc<GcRoots>, String> {
        let what = |e: std::io::Error| format!("nix.gc_roots_dir {}: {e}", base.display());
        std::fs::create_dir_all(base).map_err(what)?;
        for entry in std::fs::read_dir(base).map_err(what)?.flatten() {
            let name = entry.file_name();
            if name.to_str().is_some_and(crate::storage::tag_is_dead) {
                log::info!("removing GC roots left by {}", name.to_string_lossy());
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let dir = base.join(crate::storage::holder_tag());
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(what)?;
        Ok(Arc::new(GcRoots {
            dir,
            next: AtomicU64::new(0),
        }))
    }

    /// Roots `paths` (store paths; outputs not built yet are rooted once they are)
    /// until the returned guard is dropped.
    pub fn hold<'a>(&self, paths: impl IntoIterator<Item = &'a str>) -> std::io::Result<HeldRoots> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let dir = self.dir.join(n.to_string());
        std::fs::create_dir_all(&dir)?;
        let held = HeldRoots { dir };
        for (i, path) in paths.into_iter().enumerate() {
            std::os::unix::fs::symlink(path, held.dir.join(i.to_string()))?;
        }
        Ok(held)
    }
}

/// Free and total bytes of the filesystem holding `path`.
pub fn free_space(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let block = st.f_frsize as u64;
    Ok((st.f_bavail as u64 * block, st.f_blocks as u64 * block))
}

/// `nix-store` arguments that free up to `max_freed` bytes (everything
/// unreachable when None). A build in flight roots its derivations, whose inputs'
/// outputs (busybox for hello) it still needs: `keep-outputs` keeps those too.
pub fn gc_args(max_freed: Option<u64>) -> Vec<String> {
    let mut args = vec![
        "--gc".to_string(),
        "--option".to_string(),
        "keep-outputs".to_string(),
        "true".to_string(),
    ];
    if let Some(bytes) = max_freed {
        args.extend(["--max-freed".to_string(), bytes.to_string()]);
    }
    args
}

/// The bytes a collection freed, from its last line
/// (`1234 store paths deleted, 56.78 MiB freed`).
pub fn parse_freed(output: &str) -> Option<u64> {
    let line = output.lines().rev().find(|l| l.contains(" freed"))?;
    let mut words = line.split_whitespace().rev();
    let _freed = words.next()?;
    let unit = words.next()?;
    let number: f64 = words.next()?.parse().ok()?;
    let scale = match unit {
        "bytes" | "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        "TiB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some((number * scale) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_live_as_long_as_the_build_holds_them() {
        let base = tempfile::tempdir().unwrap();
        let roots = GcRoots::open(base.path()).unwrap();
        let held = roots
            .hold(["/nix/store/aaa-hello.drv", "/nix/store/bbb-hello"])
            .unwrap();
        let link = held.dir.join("1");
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            Path::new("/nix/store/bbb-hello")
        );
        let other = roots.hold(["/nix/store/ccc-cowsay"]).unwrap();
        assert_ne!(other.dir, held.dir);
        drop(held);
        assert!(!link.exists() && std::fs::symlink_metadata(&link).is_err());
        assert!(other.dir.join("0").symlink_metadata().is_ok());
    }

    #[test]
    fn roots_of_dead_processes_are_removed_at_start() {
        let base = tempfile::tempdir().unwrap();
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        // A pid above the kernel's maximum never runs.
        let dead = base.path().join(format!("{host}-99999999"));
        std::fs::create_dir_all(dead.join("0")).unwrap();
        let other_host = base.path().join("elsewhere-1");
        std::fs::create_dir_all(&other_host).unwrap();
        GcRoots::open(base.path()).unwrap();
        assert!(!dead.exists());
        assert!(
            other_host.exists(),
            "another host's roots are not ours to judge"
        );
    }

    #[test]
    fn freed_bytes_from_nix_output() {
        assert_eq!(
            parse_freed("deleting '/nix/store/x'\n3 store paths deleted, 1.50 MiB freed\n"),
            Some(1_572_864)
        );
        assert_eq!(
            parse_freed("0 store paths deleted, 0.00 MiB freed"),
            Some(0)
        );
        assert_eq!(parse_freed("nothing"), None);
        assert_eq!(
            gc_args(Some(10)),
            [
                "--gc",
                "--option",
                "keep-outputs",
                "true",
                "--max-freed",
                "10"
            ]
        );
    }

    #[test]
    fn free_space_of_a_real_filesystem() {
        let (free, total) = free_space(Path::new("/")).unwrap();
        assert!(total > 0 && free <= total);
        assert!(free_space(Path::new("/no/such/dir")).is_err());
    }
}
