//! Which version of the package set a pull gets, known without evaluating it.
//!
//! A warm pull must not run Nix, yet an edit of the package set must be seen. So
//! every source has a cheap version: a path source a count of the changes inotify
//! reported (or, where it cannot watch, the fingerprint of its files every
//! `source.watch_interval_secs`), a git branch the commit it pointed at when last
//! asked (at most every `source.ref_ttl_secs`), a commit itself. The version is part
//! of the request key, so a new version is a new evaluation and an unchanged one is
//! answered from memory.

use crate::config::{PackageSource, Settings};
use crate::nix::{NixpkgsConfig, SourceArgs};
use std::collections::HashMap;
use std::hash::Hasher;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

/// The package set a request is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedSource {
    /// What the Nix expression is given.
    pub args: SourceArgs,
    /// Changes whenever the package set may have changed.
    pub version: String,
    /// The same name always gives the same image (a commit), so results may be
    /// recorded in storage for other processes.
    pub pinned: bool,
    /// The nixpkgs config in force: the unfree switch and the config file's digest.
    pub config: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    #[error("tag {tag:?} does not exist: this registry builds the latest version of its package set; pull the tag latest")]
    OnlyLatest { tag: String },
    #[error("tag {tag:?} names no branch or tag of the package set's repository; use latest, a branch, or a full commit")]
    UnknownRef { tag: String },
    #[error("the package set's repository cannot be reached: {0}")]
    Unavailable(String),
}

pub struct Sources {
    source: PackageSource,
    channel_url: String,
    ref_ttl: Duration,
    config: NixpkgsConfig,
    /// Path version and config file digest, refreshed by the watchers.
    watched: Arc<RwLock<Watched>>,
    /// Kept alive for the events it delivers.
    _events: Mutex<Option<notify::RecommendedWatcher>>,
    refs: Mutex<HashMap<String, (String, Instant)>>,
    /// Tags a manifest was served for (git sources list them).
    served: Mutex<std::collections::BTreeSet<String>>,
    resolving: tokio::sync::Mutex<()>,
    git: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Watched {
    /// A count of change events, or the fingerprint when polling.
    path: String,
    config: String,
}

/// Counts changes under `root` as the kernel reports them (inotify), so an idle
/// package set costs nothing and an edit is seen at once. Reads (Nix evaluating the
/// set) and `.git` are not changes.
fn watch_events(
    root: &Path,
    watched: &Arc<RwLock<Watched>>,
) -> notify::Result<notify::RecommendedWatcher> {
    use notify::{EventKind, RecursiveMode, Watcher};
    let shared = Arc::downgrade(watched);
    let mut changes = 0u64;
    let started = Instant::now();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let counts = match &event {
            Ok(e) => {
                !matches!(e.kind, EventKind::Access(_))
                    && !e
                        .paths
                        .iter()
                        .all(|p| p.components().any(|c| c.as_os_str() == ".git"))
            }
            // A lost event (queue overflow) may have been anything.
            Err(_) => true,
        };
        if !counts {
            return;
        }
        if let Some(shared) = shared.upgrade() {
            changes += 1;
            shared.write().expect("source watch lock").path = format!("changes:{changes}");
            if changes == 1 || changes.is_multiple_of(1000) {
                log::info!("package set changed; the next pulls evaluate it again");
            }
        }
    })?;
    watcher.watch(root, RecursiveMode::Recursive)?;
    log::info!(
        "watching the package set {} for changes ({} ms to set up)",
        root.display(),
        started.elapsed().as_millis()
    );
    Ok(watcher)
}

impl Sources {
    /// Reads the source once (so the first pull needs no wait) and starts watching
    /// what can change under a running server.
    pub fn start(settings: &Settings) -> Result<Arc<Sources>, String> {
        let source = settings.package_source().map_err(|e| e.to_string())?;
        let config = NixpkgsConfig {
            allow_unfree: settings.source.allow_unfree,
            file: settings.source.nixpkgs_config.clone(),
        };
        if !config.file.is_empty() && !Path::new(&config.file).is_file() {
            return Err(format!(
                "source.nixpkgs_config {}: no such file",
                config.file
            ));
        }
        let watched = Arc::new(RwLock::new(Watched {
            path: String::new(),
            config: file_digest(&config.file),
        }));
        let interval = Duration::from_secs(settings.source.watch_interval_secs);
        let mut events = None;
        let mut poll = None;
        if let PackageSource::Path(p) = &source {
            let p = PathBuf::from(p);
            if !p.exists() {
                return Err(format!(
                    "source.path (NIXERY_PKGS_PATH) {}: no such file or directory",
                    p.display()
                ));
            }
            if settings.source.watch_events {
                match watch_events(&p, &watched) {
                    Ok(w) => events = Some(w),
                    Err(e) => log::warn!(
                        "cannot watch the package set {} for changes ({e}); checking it every \
                         {} s instead (raise fs.inotify.max_user_watches to watch it)",
                        p.display(),
                        interval.as_secs()
                    ),
                }
            }
            if events.is_none() {
                let started = Instant::now();
                watched.write().expect("source watch lock").path = fingerprint(&p);
                // The watcher repeats this walk every interval: its cost is worth knowing.
                log::info!(
                    "fingerprinted the package set {} in {} ms; checking it every {} s",
                    p.display(),
                    started.elapsed().as_millis(),
                    interval.as_secs()
                );
                poll = Some(p);
            }
        }
        if poll.is_some() || !config.file.is_empty() {
            let shared = Arc::downgrade(&watched);
            let file = config.file.clone();
            std::thread::Builder::new()
                .name("source-watcher".into())
                .spawn(move || loop {
                    std::thread::sleep(interval);
                    let path = poll.as_deref().map(fingerprint);
                    let config = file_digest(&file);
                    let Some(shared) = shared.upgrade() else {
                        return;
                    };
                    let mut current = shared.write().expect("source watch lock");
                    if path.as_ref().is_some_and(|p| *p != current.path) {
                        log::info!("package set changed; the next pulls evaluate it again");
                        current.path = path.unwrap_or_default();
                    }
                    if config != current.config {
                        log::info!("source.nixpkgs_config changed; the next pulls evaluate again");
                        current.config = config;
                    }
                })
                .map_err(|e| format!("starting the source watcher: {e}"))?;
        }
        Ok(Arc::new(Sources {
            source,
            channel_url: settings.source.channel_url.clone(),
            ref_ttl: Duration::from_secs(settings.source.ref_ttl_secs),
            config,
            watched,
            _events: Mutex::new(events),
            refs: Mutex::default(),
            served: Mutex::default(),
            resolving: tokio::sync::Mutex::new(()),
            git: "git".into(),
        }))
    }

    pub fn source(&self) -> &PackageSource {
        &self.source
    }

    pub fn nixpkgs_config(&self) -> &NixpkgsConfig {
        &self.config
    }

    /// The tags that exist: `latest`, and for a git source every tag a manifest was
    /// served for.
    pub fn tags(&self) -> Vec<String> {
        let mut tags = vec!["latest".to_string()];
        if matches!(self.source, PackageSource::Git(_)) {
            tags.extend(
                self.served
                    .lock()
                    .expect("served tags lock")
                    .iter()
                    .cloned(),
            );
        }
        tags
    }

    /// Notes that a manifest was served for `tag`.
    pub fn served(&self, tag: &str) {
        if matches!(self.source, PackageSource::Git(_)) && tag != "latest" {
            let mut served = self.served.lock().expect("served tags lock");
            if !served.contains(tag) {
                served.insert(tag.to_string());
            }
        }
    }

    /// The package set for a tag, without running Nix.
    pub async fn resolve(&self, tag: &str) -> Result<ResolvedSource, SourceError> {
        if !matches!(self.source, PackageSource::Git(_)) && tag != "latest" {
            return Err(SourceError::OnlyLatest {
                tag: tag.to_string(),
            });
        }
        let watched = self.watched.read().expect("source watch lock").clone();
        let mut resolved = match &self.source {
            PackageSource::Path(p) => ResolvedSource {
                args: SourceArgs {
                    src_type: "path",
                    src_args: p.clone(),
                },
                version: watched.path,
                pinned: false,
                config: String::new(),
            },
            PackageSource::Channel(c) => channel(&self.channel_url, c, self.ref_ttl),
            PackageSource::Git(url) => {
                let commit = if is_commit(tag) {
                    tag.to_string()
                } else {
                    self.branch_commit(url, tag).await?
                };
                git(url, &commit)
            }
        };
        resolved.config = format!(
            "unfree={};config={}",
            self.config.allow_unfree, watched.config
        );
        Ok(resolved)
    }

    /// The commit a branch (or `latest`: the remote HEAD) points at, asked of the
    /// remote at most once per TTL. A remote that cannot be reached is answered
    /// with the last commit known, if any.
    async fn branch_commit(&self, url: &str, tag: &str) -> Result<String, SourceError> {
        let fresh = |refs: &HashMap<String, (String, Instant)>| {
            refs.get(tag)
                .filter(|(_, at)| at.elapsed() < self.ref_ttl)
                .map(|(c, _)| c.clone())
        };
        if let Some(c) = fresh(&self.refs.lock().expect("refs lock")) {
            return Ok(c);
        }
        // One question to the remote at a time; the waiters then find its answer.
        let _one = self.resolving.lock().await;
        if let Some(c) = fresh(&self.refs.lock().expect("refs lock")) {
            return Ok(c);
        }
        let stale = self
            .refs
            .lock()
            .expect("refs lock")
            .get(tag)
            .map(|(c, _)| c.clone());
        match ls_remote(&self.git, url, tag).await {
            Ok(Some(commit)) => {
                if stale.as_deref().is_some_and(|s| s != commit) {
                    log::info!("branch {tag} of the package set moved to {commit}");
                }
                self.refs
                    .lock()
                    .expect("refs lock")
                    .insert(tag.to_string(), (commit.clone(), Instant::now()));
                Ok(commit)
            }
            Ok(None) => Err(SourceError::UnknownRef {
                tag: tag.to_string(),
            }),
            Err(e) => match stale {
                Some(c) => {
                    log::warn!("resolving {tag} of {url}: {e}; keeping {c}");
                    Ok(c)
                }
                None => {
                    log::warn!("resolving {tag} of {url}: {e}");
                    Err(SourceError::Unavailable(e))
                }
            },
        }
    }
}

fn channel(template: &str, channel: &str, ttl: Duration) -> ResolvedSource {
    let url = template.replace("{channel}", channel);
    let pinned = is_commit(channel);
    // A branch tarball is fetched again by Nix after tarball-ttl, which is set to the
    // same TTL: one evaluation per period.
    let version = if pinned {
        url.clone()
    } else {
        let period = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs() / ttl.as_secs().max(1))
            .unwrap_or(0);
        format!("{url}@{period}")
    };
    ResolvedSource {
        args: SourceArgs {
            src_type: "tarball",
            src_args: url,
        },
        version,
        pinned,
        config: String::new(),
    }
}

fn git(url: &str, commit: &str) -> ResolvedSource {
    let mut spec = serde_json::Map::new();
    spec.insert("url".into(), url.into());
    spec.insert("rev".into(), commit.into());
    // A commit need not be on the default branch.
    spec.insert("allRefs".into(), true.into());
    ResolvedSource {
        args: SourceArgs {
            src_type: "git",
            src_args: serde_json::Value::Object(spec).to_string(),
        },
        version: commit.to_string(),
        pinned: true,
        config: String::new(),
    }
}

pub fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The refs `git ls-remote` is asked for a tag: `latest` is the remote HEAD,
/// anything else a branch or a tag (annotated tags peeled to their commit).
fn remote_refs(tag: &str) -> Vec<String> {
    if tag == "latest" {
        vec!["HEAD".into()]
    } else {
        vec![
            format!("refs/heads/{tag}"),
            format!("refs/tags/{tag}"),
            format!("refs/tags/{tag}^{{}}"),
        ]
    }
}

/// The commit of the first of `wanted` that `git ls-remote` output names.
fn parse_ls_remote(output: &str, wanted: &[String]) -> Option<String> {
    let refs: HashMap<&str, &str> = output
        .lines()
        .filter_map(|l| {
            let (commit, name) = l.split_once('\t')?;
            is_commit(commit).then_some((name.trim(), commit))
        })
        .collect();
    // A branch first; then a peeled annotated tag, which names the commit where the
    // tag itself names a tag object.
    [0, 2, 1]
        .iter()
        .filter_map(|&i| wanted.get(i))
        .find_map(|w| refs.get(w.as_str()).map(|c| c.to_string()))
}

async fn ls_remote(git: &str, url: &str, tag: &str) -> Result<Option<String>, String> {
    let wanted = remote_refs(tag);
    let mut cmd = tokio::process::Command::new(git);
    cmd.arg("ls-remote")
        .arg("--")
        .arg(url)
        .args(&wanted)
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .map_err(|_| "git ls-remote took longer than 30 s".to_string())?
        .map_err(|e| format!("cannot run git: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "git ls-remote failed: {}",
            err.lines().last().unwrap_or("").trim()
        ));
    }
    Ok(parse_ls_remote(
        &String::from_utf8_lossy(&out.stdout),
        &wanted,
    ))
}

/// Digest of a file's contents; empty when there is none.
fn file_digest(path: &str) -> String {
    if path.is_empty() {
        return String::new();
    }
    match std::fs::read(path) {
        Ok(bytes) => hex::encode(ring::digest::digest(&ring::digest::SHA256, &bytes)),
        Err(e) => format!("unreadable: {e}"),
    }
}

/// A digest of every file's name, size, times and inode under `root` (not following
/// symlinks, skipping `.git`): any write, rename, creation or deletion changes it.
/// A 44,000-file nixpkgs checkout takes tens of milliseconds when cached.
pub fn fingerprint(root: &Path) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    fn walk(dir: &Path, rel: &str, h: &mut impl Hasher) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            h.write(b"unreadable");
            return;
        };
        let mut names: Vec<_> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        names.sort();
        for name in names {
            if name == ".git" {
                continue;
            }
            let path = dir.join(&name);
            let child = format!("{rel}/{}", name.to_string_lossy());
            h.write(child.as_bytes());
            let Ok(m) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            for v in [
                m.size() as i64,
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec(),
                m.ino() as i64,
                m.mode() as i64,
            ] {
                h.write_i64(v);
            }
            if m.is_dir() {
                walk(&path, &child, h);
            }
        }
    }
    match std::fs::symlink_metadata(root) {
        Ok(m) if m.is_dir() => walk(root, "", &mut h),
        Ok(m) => {
            for v in [m.size() as i64, m.mtime(), m.mtime_nsec(), m.ctime_nsec()] {
                h.write_i64(v);
            }
        }
        Err(_) => h.write(b"missing"),
    }
    format!("{:016x}", h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_tags_resolve_to_pinned_commits() {
        let rev = "0123456789abcdef0123456789abcdef01234567";
        let r = git("https://example.org/pkgs.git", rev);
        assert!(r.pinned);
        assert_eq!(
            r.args.src_args,
            format!(r#"{{"allRefs":true,"rev":"{rev}","url":"https://example.org/pkgs.git"}}"#)
        );
        assert_eq!(remote_refs("latest"), ["HEAD"]);
        let wanted = remote_refs("v1");
        let out = format!(
            "{a}\trefs/heads/v1\n{b}\trefs/tags/v1\n{c}\trefs/tags/v1^{{}}\n",
            a = "a".repeat(40),
            b = "b".repeat(40),
            c = "c".repeat(40)
        );
        // A branch wins over a tag of the same name; a peeled tag over the tag object.
        assert_eq!(parse_ls_remote(&out, &wanted), Some("a".repeat(40)));
        let tag_only = format!(
            "{b}\trefs/tags/v1\n{c}\trefs/tags/v1^{{}}\n",
            b = "b".repeat(40),
            c = "c".repeat(40)
        );
        assert_eq!(parse_ls_remote(&tag_only, &wanted), Some("c".repeat(40)));
        assert_eq!(parse_ls_remote("", &wanted), None);
        assert_eq!(
            parse_ls_remote(
                &format!("{}\tHEAD\n", "d".repeat(40)),
                &remote_refs("latest")
            ),
            Some("d".repeat(40))
        );
    }

    #[test]
    fn channels_come_from_the_url_template() {
        let rev = "0123456789abcdef0123456789abcdef01234567";
        let t = "file:///srv/{channel}.tar.gz";
        let pinned = channel(t, rev, Duration::from_secs(60));
        assert!(pinned.pinned);
        assert_eq!(pinned.args.src_args, format!("file:///srv/{rev}.tar.gz"));
        assert_eq!(pinned.args.src_type, "tarball");
        let branch = channel(t, "nixos-24.11", Duration::from_secs(60));
        assert!(!branch.pinned);
        assert!(branch
            .version
            .starts_with("file:///srv/nixos-24.11.tar.gz@"));
    }

    #[test]
    fn fingerprint_sees_edits_creations_and_deletions() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/a.nix"), "1").unwrap();
        let first = fingerprint(dir.path());
        assert_eq!(first, fingerprint(dir.path()));
        // Same size, new content: the times change.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(dir.path().join("sub/a.nix"), "2").unwrap();
        let edited = fingerprint(dir.path());
        assert_ne!(first, edited);
        std::fs::write(dir.path().join("b.nix"), "").unwrap();
        let created = fingerprint(dir.path());
        assert_ne!(edited, created);
        std::fs::remove_file(dir.path().join("b.nix")).unwrap();
        assert_ne!(created, fingerprint(dir.path()));
        // .git is not the package set.
        let before = fingerprint(dir.path());
        std::fs::create_dir(dir.path().join(".git")).unwrap();
        std::fs::write(dir.path().join(".git/index"), "x").unwrap();
        assert_eq!(before, fingerprint(dir.path()));
        assert_ne!(before, fingerprint(dir.path().join("missing").as_path()));
    }
}
