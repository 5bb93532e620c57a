//! A fake Nix for tests of the pipeline and the coordinator: store paths are
//! directories of a temporary directory, packed for real.

use super::*;
use crate::actors::nix_worker::pack_layer;
use crate::nix::{ResolvedPackage, SourceArgs};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A package set of two packages over a shared dependency, per system:
/// `<root>/x86_64_linux-busybox`, and `hello` and `cowsay` referring to it.
pub(crate) struct FakeNix {
    root: tempfile::TempDir,
    pub evaluations: AtomicUsize,
    realisations: Mutex<Vec<&'static str>>,
    pub packs: AtomicUsize,
    /// Systems for which realising fails as Nix does without a builder.
    unbuildable: Vec<&'static str>,
}

impl FakeNix {
    pub fn new(unbuildable: Vec<&'static str>) -> Arc<FakeNix> {
        let root = tempfile::tempdir().unwrap();
        for system in ["x86_64-linux", "aarch64-linux"] {
            for name in ["busybox", "hello", "cowsay"] {
                let bin = root
                    .path()
                    .join(format!("{}/bin", store_name(system, name)));
                std::fs::create_dir_all(&bin).unwrap();
                std::fs::write(bin.join(name), format!("{name} for {system}\n")).unwrap();
            }
        }
        Arc::new(FakeNix {
            root,
            evaluations: AtomicUsize::new(0),
            realisations: Mutex::new(Vec::new()),
            packs: AtomicUsize::new(0),
            unbuildable,
        })
    }

    pub fn path(&self, system: &str, name: &str) -> String {
        self.root
            .path()
            .join(store_name(system, name))
            .display()
            .to_string()
    }

    pub fn realised(&self, system: &str) -> usize {
        let r = self.realisations.lock().unwrap();
        r.iter().filter(|s| **s == system).count()
    }
}

/// A store path's base name: the system stands in for the hash.
fn store_name(system: &str, name: &str) -> String {
    format!("{}-{name}", system.replace('-', "_"))
}

impl NixRunner for FakeNix {
    fn evaluate(&self, job: Evaluate) -> BoxFuture<'static, Result<Evaluation, BuildError>> {
        self.evaluations.fetch_add(1, Ordering::SeqCst);
        let known = ["hello", "cowsay"];
        let missing: Vec<String> = job
            .packages
            .iter()
            .filter(|p| !known.contains(&p.as_str()))
            .cloned()
            .collect();
        let packages = if missing.is_empty() {
            job.packages
                .iter()
                .map(|p| ResolvedPackage {
                    name: p.clone(),
                    drv_path: format!("/nix/store/fake-{p}.drv"),
                    output: "out".into(),
                    path: self.path(job.system, p),
                    licenses: vec!["MIT".into()],
                    homepage: None,
                })
                .collect()
        } else {
            Vec::new()
        };
        let evaluation = Evaluation {
            missing,
            not_packages: Vec::new(),
            packages,
        };
        Box::pin(async move { Ok(evaluation) })
    }

    fn realise(&self, job: Realise) -> BoxFuture<'static, Result<Vec<StorePathInfo>, BuildError>> {
        self.realisations.lock().unwrap().push(job.system);
        if self.unbuildable.contains(&job.system) {
            let e = BuildError::BuildFailed(format!(
                "a '{}' is required to build 'hello.drv', but I am a 'x86_64-linux'",
                job.system
            ));
            return Box::pin(async move { Err(e) });
        }
        let busybox = self.path(job.system, "busybox");
        let mut closure = vec![StorePathInfo {
            path: busybox.clone(),
            nar_size: 1000,
            references: vec![],
            nar_hash: "sha256:0".into(),
            deriver: String::new(),
        }];
        for p in &job.evaluation.packages {
            closure.push(StorePathInfo {
                path: p.path.clone(),
                nar_size: 100,
                references: vec![busybox.clone()],
                nar_hash: "sha256:1".into(),
                deriver: p.drv_path.clone(),
            });
        }
        Box::pin(async move { Ok(closure) })
    }

    fn pack(&self, job: Pack) -> BoxFuture<'static, Result<PackedLayer, BuildError>> {
        self.packs.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || pack_layer(job))
                .await
                .unwrap()
        })
    }
}

pub(crate) fn settings(nix: &FakeNix) -> ImageSettings {
    // busybox is popular enough for a layer of its own, shared by every image.
    // Outside /nix/store a path is its own name.
    let popular = serde_json::json!({
        nix.path("x86_64-linux", "busybox"): 1000,
        nix.path("aarch64-linux", "busybox"): 1000,
    });
    ImageSettings {
        popularity: Popularity::from_json(popular.to_string().as_bytes()).unwrap(),
        popularity_id: "none".into(),
        params: LayerParams {
            budget: 10,
            popularity_threshold: 100,
            size_threshold: 100_000_000,
        },
        gzip_level: 1,
        zstd_level: 3,
        max_image_bytes: 0,
        lease_ttl: Duration::from_secs(60),
    }
}

pub(crate) fn context(nix: Arc<FakeNix>, storage: Arc<Storage>) -> Arc<BuildContext> {
    let uploader = UploadActor::new(storage.clone(), 4).start();
    let settings = settings(&nix);
    Arc::new(BuildContext::new(
        nix,
        uploader,
        storage,
        settings,
        Arc::new(SharedState::default()),
        Arc::new(crate::limits::Limits::new(0, 2)),
    ))
}

pub(crate) fn source(pinned: bool) -> ResolvedSource {
    ResolvedSource {
        args: SourceArgs {
            src_type: "path",
            src_args: "/pkgs".into(),
        },
        version: "v1".into(),
        pinned,
        config: String::new(),
    }
}
