//! The pipeline with a fake Nix (store paths are directories of a temporary
//! directory, packed for real) and in-memory storage.

use super::fake::{context, settings, source, FakeNix};
use super::Client;
use super::*;
use crate::reference::Digest;
use crate::storage::memory::MemStorage;
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

fn memory() -> Arc<Storage> {
    Arc::new(Storage::Memory(MemStorage::new()))
}

fn job(name: &str, arch: Arch) -> Job {
    let request = ImageRequest::from_name(name, 64).unwrap();
    Job::new(&request, arch, &source(false))
}

fn config_of(storage: &Storage, image: &BuiltImage) -> serde_json::Value {
    let manifest: serde_json::Value = serde_json::from_slice(&image.oci.bytes).unwrap();
    let digest = Digest::parse(manifest["config"]["digest"].as_str().unwrap()).unwrap();
    let bytes = futures::executor::block_on(storage.read_blob(&digest))
        .unwrap()
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn stored_blobs(storage: &Storage) -> BTreeSet<String> {
    let Storage::Memory(m) = storage else {
        unreachable!()
    };
    m.object_names()
        .into_iter()
        .filter_map(|o| {
            o.strip_prefix("blobs/sha256/")
                .map(|h| format!("sha256:{h}"))
        })
        .collect()
}

#[actix_rt::test]
async fn an_image_is_stored_whole_and_its_bytes_depend_only_on_its_inputs() {
    let nix = FakeNix::new(vec![]);
    let storage = memory();
    let c = context(nix.clone(), storage.clone());
    let image = build_image(&c, &job("hello", Arch::Amd64)).await.unwrap();

    let blobs = image.blobs().expect("our own manifests parse");
    let stored = stored_blobs(&storage);
    for b in blobs {
        assert!(stored.contains(&b.to_string()), "{b} named but not stored");
    }
    // Manifests, config, busybox and hello layers, the symlink layer, the SBOM,
    // its empty config and two artifact manifests.
    assert_eq!(blobs.len(), 10, "{blobs:?}");
    assert_eq!(config_of(&storage, &image)["architecture"], "amd64");
    assert_eq!(image.referrers.len(), 2);
    assert!(image.children.is_empty());

    // Another process with its own storage makes the same bytes.
    let again = build_image(&context(nix.clone(), memory()), &job("hello", Arch::Amd64))
        .await
        .unwrap();
    assert_eq!(again.docker.bytes, image.docker.bytes);
    assert_eq!(again.oci.digest, image.oci.digest);
    assert_eq!(nix.realised("x86_64-linux"), 2);
}

#[actix_rt::test]
async fn known_top_level_paths_and_shared_layers_are_not_built_again() {
    let nix = FakeNix::new(vec![]);
    let storage = memory();
    let c = context(nix.clone(), storage.clone());
    let first = build_image(&c, &job("hello", Arch::Amd64)).await.unwrap();
    let packs = nix.packs.load(Ordering::SeqCst);
    assert_eq!(packs, 3, "busybox, hello and the symlink layer");

    // Same paths under another name: evaluated, not realised, nothing packed.
    let same = build_image(&c, &job("amd64/hello", Arch::Amd64))
        .await
        .unwrap();
    assert_eq!(same.docker.digest, first.docker.digest);
    assert_eq!(nix.realised("x86_64-linux"), 1);
    assert_eq!(nix.packs.load(Ordering::SeqCst), packs);

    // cowsay shares busybox: only its own layer and the symlink layer are packed.
    build_image(&c, &job("cowsay", Arch::Amd64)).await.unwrap();
    assert_eq!(nix.packs.load(Ordering::SeqCst), packs + 2);

    // A replica on the same storage finds the image by its record.
    let replica = context(nix.clone(), storage.clone());
    let found = build_image(&replica, &job("hello", Arch::Amd64))
        .await
        .unwrap();
    assert_eq!(found.docker.digest, first.docker.digest);
    assert_eq!(nix.realised("x86_64-linux"), 2, "hello once, cowsay once");
}

#[actix_rt::test]
async fn a_lost_blob_is_built_again() {
    let nix = FakeNix::new(vec![]);
    let storage = memory();
    let c = context(nix.clone(), storage.clone());
    let image = build_image(&c, &job("hello", Arch::Amd64)).await.unwrap();
    let Storage::Memory(m) = storage.as_ref() else {
        unreachable!()
    };
    let manifest: serde_json::Value = serde_json::from_slice(&image.docker.bytes).unwrap();
    let layer = Digest::parse(manifest["layers"][0]["digest"].as_str().unwrap()).unwrap();
    m.remove(&crate::storage::blob_object(&layer));

    let rebuilt = build_image(&c, &job("hello", Arch::Amd64)).await.unwrap();
    assert_eq!(rebuilt.docker.digest, image.docker.digest);
    assert_eq!(nix.realised("x86_64-linux"), 2);
    assert!(stored_blobs(&storage).contains(&layer.to_string()));
}

#[actix_rt::test]
async fn a_pinned_request_is_answered_from_its_record_without_nix() {
    let nix = FakeNix::new(vec![]);
    let storage = memory();
    let request = ImageRequest::from_name("hello", 64).unwrap();
    let pinned = Job::new(&request, Arch::Amd64, &source(true));
    let first = build_image(&context(nix.clone(), storage.clone()), &pinned)
        .await
        .unwrap();
    let evaluations = nix.evaluations.load(Ordering::SeqCst);
    let restarted = context(nix.clone(), storage.clone());
    let again = build_image(&restarted, &pinned).await.unwrap();
    assert_eq!(again.docker.digest, first.docker.digest);
    assert_eq!(nix.evaluations.load(Ordering::SeqCst), evaluations);
}

#[actix_rt::test]
async fn failures_say_what_failed() {
    let nix = FakeNix::new(vec!["aarch64-linux"]);
    let c = context(nix.clone(), memory());
    let missing = build_image(&c, &job("hello/nosuch", Arch::Amd64)).await;
    assert_eq!(
        missing.unwrap_err(),
        BuildError::NotFound(vec!["nosuch".into()])
    );
    assert_eq!(nix.realised("x86_64-linux"), 0);
    let unbuildable = build_image(&c, &job("hello", Arch::Arm64)).await;
    assert!(
        matches!(&unbuildable, Err(BuildError::BuildFailed(m)) if m.contains("aarch64-linux")),
        "{unbuildable:?}"
    );
    let mut limited = settings(&nix);
    limited.max_image_bytes = 500;
    let c = Arc::new(BuildContext::new(
        nix.clone(),
        UploadActor::new(memory(), 1).start(),
        memory(),
        limited,
        Arc::new(SharedState::default()),
        Arc::new(crate::limits::Limits::new(0, 0)),
    ));
    let large = build_image(&c, &job("hello", Arch::Amd64)).await;
    assert_eq!(
        large.unwrap_err(),
        BuildError::TooLarge {
            size: 1100,
            max: 500
        }
    );
}

#[actix_rt::test]
async fn an_index_names_each_platform_image_in_both_formats() {
    let nix = FakeNix::new(vec![]);
    let storage = memory();
    let c = context(nix.clone(), storage.clone());
    let arm = build_image(&c, &job("hello", Arch::Arm64)).await.unwrap();
    let amd = build_image(&c, &job("hello", Arch::Amd64)).await.unwrap();
    assert_eq!(config_of(&storage, &arm)["architecture"], "arm64");
    assert_ne!(arm.docker.digest, amd.docker.digest);

    let index = build_index(
        &c,
        vec![(Arch::Arm64, arm.clone()), (Arch::Amd64, amd.clone())],
    )
    .await
    .unwrap();
    let oci: serde_json::Value = serde_json::from_slice(&index.oci.bytes).unwrap();
    assert_eq!(oci["mediaType"], manifest::OCI_INDEX);
    assert_eq!(oci["manifests"][0]["digest"], amd.oci.digest.to_string());
    assert_eq!(oci["manifests"][0]["platform"]["architecture"], "amd64");
    assert_eq!(oci["manifests"][1]["digest"], arm.oci.digest.to_string());
    assert_eq!(oci["manifests"][1]["platform"]["variant"], "v8");
    assert_eq!(oci["manifests"][1]["size"], arm.oci.bytes.len());
    let docker: serde_json::Value = serde_json::from_slice(&index.docker.bytes).unwrap();
    assert_eq!(docker["mediaType"], manifest::DOCKER_MANIFEST_LIST);
    assert_eq!(
        docker["manifests"][1]["digest"],
        arm.docker.digest.to_string()
    );
    assert_eq!(index.media_type(ManifestFormat::Oci), manifest::OCI_INDEX);

    // Both indexes are blobs, so any replica serves them by digest, and the
    // index's blobs are those of both images.
    let stored = stored_blobs(&storage);
    assert!(stored.contains(&index.oci.digest.to_string()));
    assert!(stored.contains(&index.docker.digest.to_string()));
    let blobs = index.blobs().unwrap();
    for d in amd.blobs().unwrap().iter().chain(arm.blobs().unwrap()) {
        assert!(blobs.contains(d));
    }

    // The same children in another order give the same bytes.
    let again = build_index(&c, vec![(Arch::Amd64, amd), (Arch::Arm64, arm)])
        .await
        .unwrap();
    assert_eq!(again.oci.bytes, index.oci.bytes);
}

#[test]
fn keys_follow_the_source_and_the_platforms() {
    let hello = ImageRequest::from_name("hello", 64).unwrap();
    let mut v2 = source(false);
    v2.version = "v2".into();
    let key = request_key(&hello.for_arch(Arch::Amd64), &source(false));
    assert_eq!(key, Job::new(&hello, Arch::Amd64, &source(false)).key);
    assert_ne!(key, request_key(&hello.for_arch(Arch::Amd64), &v2));
    assert_ne!(
        key,
        request_key(&hello.for_arch(Arch::Arm64), &source(false))
    );
    let both = index_key(&hello, &source(false), &[Arch::Amd64, Arch::Arm64]);
    assert_ne!(both, key);
    assert_ne!(both, index_key(&hello, &v2, &[Arch::Amd64, Arch::Arm64]));
    assert_ne!(both, index_key(&hello, &source(false), &[Arch::Amd64]));
    let jobs = [Arch::Amd64, Arch::Arm64].map(|a| Job::new(&hello, a, &source(false)).key);
    assert_eq!(both, index_key_of(&jobs));
}

#[actix_rt::test]
async fn new_builds_need_a_caller_allowed_to_build_within_its_allowance() {
    let nix = FakeNix::new(vec![]);
    let c = context(nix.clone(), memory());
    let client = |key: &str, may_build| {
        Some(Client {
            key: key.into(),
            may_build,
        })
    };
    let anonymous = job("hello", Arch::Amd64).for_client(client("10.0.0.1", false));
    let refused = build_image(&c, &anonymous).await.unwrap_err();
    assert_eq!(refused, BuildError::LoginRequired("hello".into()));
    assert_eq!(nix.realised("x86_64-linux"), 0);

    // The fake context allows 2 builds per hour per client.
    let alice = |name: &str| job(name, Arch::Amd64).for_client(client("alice", true));
    build_image(&c, &alice("hello")).await.unwrap();
    build_image(&c, &alice("cowsay")).await.unwrap();
    let over = build_image(&c, &alice("hello/cowsay")).await.unwrap_err();
    assert!(matches!(over, BuildError::BuildLimit(_)), "{over:?}");
    // Images already built cost no allowance, and anonymous callers get them.
    build_image(&c, &alice("hello")).await.unwrap();
    build_image(&c, &anonymous).await.unwrap();
    let bob = job("hello/cowsay", Arch::Amd64).for_client(client("bob", true));
    build_image(&c, &bob).await.unwrap();
}

#[actix_rt::test]
async fn the_config_and_manifests_are_stored_while_the_layers_uploads_end() {
    let nix = FakeNix::new(vec![]);
    let storage = memory();
    let Storage::Memory(m) = storage.as_ref() else {
        unreachable!()
    };
    let gate = m.hold_streams();
    let c = context(nix.clone(), storage.clone());
    let build = job("hello", Arch::Amd64);
    // Every layer is packed and its digest known, but none is stored yet: what
    // the build stores meanwhile shows up before the gate opens.
    let watch = async {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let early = loop {
            let seen = stored_blobs(&storage);
            // The config, both manifests, the SBOM, its empty config and its two
            // artifact manifests: all but the three layers.
            if seen.len() >= 7 || std::time::Instant::now() > end {
                break seen;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        };
        let recorded = m
            .object_names()
            .iter()
            .any(|o| o.starts_with("records/images/"));
        gate.add_permits(tokio::sync::Semaphore::MAX_PERMITS);
        (early, recorded)
    };
    let (image, (early, recorded)) = futures::join!(build_image(&c, &build), watch);
    let image = image.unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&image.oci.bytes).unwrap();
    let layers: BTreeSet<String> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(layers.len(), 3, "{manifest}");
    let mut expected: BTreeSet<String> = image
        .blobs()
        .unwrap()
        .iter()
        .map(|d| d.to_string())
        .collect();
    expected.retain(|d| !layers.contains(d));
    assert_eq!(early, expected, "stored while the layers were held");
    assert!(early.contains(manifest["config"]["digest"].as_str().unwrap()));
    assert!(early.contains(&image.docker.digest.to_string()));
    // The image is recorded only once its layers are stored.
    assert!(!recorded, "an image recorded before its layers were stored");
    assert!(m
        .object_names()
        .iter()
        .any(|o| o.starts_with("records/images/")));
}
