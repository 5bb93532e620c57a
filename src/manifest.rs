//! Image config, manifest and index bytes, their digests, and the choice between the
//! Docker schema 2 and OCI formats (and whether an index is wanted at all) from a
//! request's `Accept` header lines.
//!
//! Pure: no I/O, no actix. Output bytes depend only on the inputs (struct field
//! order fixes the JSON key order), so the same image always has the same digests.

use crate::compression::Compression;
use crate::image::Arch;
use crate::reference::Digest;
use serde::Serialize;

pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Which manifest format a response carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ManifestFormat {
    Docker,
    Oci,
}

impl ManifestFormat {
    pub fn media_type(self) -> &'static str {
        match self {
            ManifestFormat::Docker => DOCKER_MANIFEST,
            ManifestFormat::Oci => OCI_MANIFEST,
        }
    }

    /// The media type of an index in this format: a Docker manifest list names
    /// Docker manifests, an OCI index OCI manifests.
    pub fn index_media_type(self) -> &'static str {
        match self {
            ManifestFormat::Docker => DOCKER_MANIFEST_LIST,
            ManifestFormat::Oci => OCI_INDEX,
        }
    }

    /// Whether the request's `Accept` lines take an index, and in which format:
    /// the Docker manifest list when Docker manifests are accepted with it (every
    /// Docker-speaking client reads it), else the OCI index. None when no index type
    /// is named: such a client gets a single platform's manifest.
    pub fn negotiate_index<'a>(accept_lines: impl IntoIterator<Item = &'a str>) -> Option<Self> {
        let named = accepted_types(accept_lines);
        let has = |t: &str| named.iter().any(|n| n == t);
        if has(DOCKER_MANIFEST_LIST) && has(DOCKER_MANIFEST) {
            Some(ManifestFormat::Docker)
        } else if has(OCI_INDEX) {
            Some(ManifestFormat::Oci)
        } else {
            None
        }
    }

    /// Picks the format from every `Accept` header line of a request (clients send
    /// several lines, or one comma-joined line). Docker schema 2 is preferred when
    /// accepted because every client reads it; OCI when only OCI is named; Docker
    /// schema 2 again when nothing we make is named, as the most widely understood.
    pub fn negotiate<'a>(accept_lines: impl IntoIterator<Item = &'a str>) -> Self {
        let named = accepted_types(accept_lines);
        if named.iter().any(|t| t == DOCKER_MANIFEST) {
            ManifestFormat::Docker
        } else if named.iter().any(|t| t == OCI_MANIFEST) {
            ManifestFormat::Oci
        } else {
            ManifestFormat::Docker
        }
    }
}

/// The media types a request's `Accept` lines name (clients send several lines, or
/// one comma-joined line), lower case and without parameters.
pub fn accepted_types<'a>(accept_lines: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    accept_lines
        .into_iter()
        .flat_map(|line| line.split(','))
        .map(|item| {
            item.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .filter(|t| !t.is_empty())
        .collect()
}

/// One layer as the manifest and the config see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct LayerEntry {
    pub digest: String,
    pub diff_id: String,
    pub size: u64,
}

/// What goes into the image config besides the layers.
#[derive(Debug, Clone, Default)]
pub struct RuntimeConfig {
    pub env: Vec<String>,
    pub cmd: Option<Vec<String>>,
}

#[derive(Serialize)]
struct ConfigFile<'a> {
    architecture: &'a str,
    config: ContainerConfig<'a>,
    os: &'a str,
    rootfs: RootFs<'a>,
}

#[derive(Serialize)]
struct ContainerConfig<'a> {
    #[serde(rename = "Env")]
    env: &'a [String],
    #[serde(rename = "Cmd", skip_serializing_if = "Option::is_none")]
    cmd: Option<&'a [String]>,
}

#[derive(Serialize)]
struct RootFs<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    diff_ids: Vec<&'a str>,
}

/// The image config blob. The same bytes serve both manifest formats; only the
/// descriptor's media type differs.
pub fn config_blob(arch: Arch, layers: &[LayerEntry], runtime: &RuntimeConfig) -> Vec<u8> {
    let config = ConfigFile {
        architecture: arch.oci(),
        config: ContainerConfig {
            env: &runtime.env,
            cmd: runtime.cmd.as_deref(),
        },
        os: "linux",
        rootfs: RootFs {
            kind: "layers",
            diff_ids: layers.iter().map(|l| l.diff_id.as_str()).collect(),
        },
    };
    serde_json::to_vec(&config).expect("config serialises")
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Manifest<'a> {
    schema_version: u32,
    media_type: &'a str,
    config: Descriptor<'a>,
    layers: Vec<Descriptor<'a>>,
}

/// A content descriptor as the OCI image spec orders its fields.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Descriptor<'a> {
    pub media_type: &'a str,
    pub size: u64,
    pub digest: &'a str,
}

/// The manifest bytes for one format; `config_digest` and `config_size` describe the
/// blob from [`config_blob`]. The manifest carries its own `mediaType` so that it can
/// be served by digest without remembering the format elsewhere.
///
/// zstd layers go only into OCI manifests: a Docker manifest has no standard type
/// for them, and clients reject or misread the non-standard one.
pub fn manifest_bytes(
    format: ManifestFormat,
    config_digest: &str,
    config_size: u64,
    layers: &[LayerEntry],
    compression: Compression,
) -> Vec<u8> {
    let config_type = match format {
        ManifestFormat::Docker => DOCKER_CONFIG,
        ManifestFormat::Oci => OCI_CONFIG,
    };
    let layer_type = layer_media_type(format, compression);
    let manifest = Manifest {
        schema_version: 2,
        media_type: format.media_type(),
        config: Descriptor {
            media_type: config_type,
            size: config_size,
            digest: config_digest,
        },
        layers: layers
            .iter()
            .map(|l| Descriptor {
                media_type: layer_type,
                size: l.size,
                digest: &l.digest,
            })
            .collect(),
    };
    serde_json::to_vec(&manifest).expect("manifest serialises")
}

/// The media type of a layer in a manifest of `format`.
pub fn layer_media_type(format: ManifestFormat, compression: Compression) -> &'static str {
    match (format, compression) {
        (ManifestFormat::Docker, Compression::Gzip) => DOCKER_LAYER,
        (ManifestFormat::Oci, Compression::Gzip) => OCI_LAYER,
        // Not written into Docker manifests (see manifest_bytes).
        (_, Compression::Zstd) => OCI_LAYER_ZSTD,
    }
}

/// One image of an index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    pub arch: Arch,
    /// Digest and size of the image's manifest in the index's format.
    pub digest: String,
    pub size: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Index<'a> {
    schema_version: u32,
    media_type: &'a str,
    manifests: Vec<IndexDescriptor<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct IndexDescriptor<'a> {
    media_type: &'a str,
    size: u64,
    digest: &'a str,
    platform: Platform<'a>,
}

#[derive(Serialize)]
struct Platform<'a> {
    architecture: &'a str,
    os: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    variant: Option<&'a str>,
}

/// The index bytes for one format, naming each image by its manifest in that format.
/// Entries are listed by architecture, so the bytes do not depend on the order in
/// which the platforms were configured or built.
pub fn index_bytes(format: ManifestFormat, entries: &[IndexEntry]) -> Vec<u8> {
    let mut sorted: Vec<&IndexEntry> = entries.iter().collect();
    sorted.sort_by_key(|e| e.arch);
    let index = Index {
        schema_version: 2,
        media_type: format.index_media_type(),
        manifests: sorted
            .into_iter()
            .map(|e| IndexDescriptor {
                media_type: format.media_type(),
                size: e.size,
                digest: &e.digest,
                platform: Platform {
                    architecture: e.arch.oci(),
                    os: "linux",
                    variant: e.arch.variant(),
                },
            })
            .collect(),
    };
    serde_json::to_vec(&index).expect("index serialises")
}

/// The media type a stored manifest or index declares, for serving it by digest.
pub fn declared_media_type(bytes: &[u8]) -> Option<&'static str> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Head {
        media_type: Option<String>,
    }
    let head: Head = serde_json::from_slice(bytes).ok()?;
    let declared = head.media_type?;
    [
        DOCKER_MANIFEST,
        OCI_MANIFEST,
        DOCKER_MANIFEST_LIST,
        OCI_INDEX,
    ]
    .into_iter()
    .find(|t| *t == declared)
}

/// The blobs a stored manifest names: itself, its config and layers, or an index's
/// manifests. None for bytes that are not such a document.
pub fn named_blobs(bytes: &[u8]) -> Option<Vec<Digest>> {
    #[derive(serde::Deserialize)]
    struct Desc {
        digest: String,
    }
    #[derive(serde::Deserialize)]
    struct Named {
        config: Option<Desc>,
        #[serde(default)]
        layers: Vec<Desc>,
        #[serde(default)]
        manifests: Vec<Desc>,
    }
    declared_media_type(bytes)?;
    let named: Named = serde_json::from_slice(bytes).ok()?;
    let mut blobs = vec![Digest::of(bytes)];
    for d in named
        .config
        .iter()
        .chain(&named.layers)
        .chain(&named.manifests)
    {
        blobs.push(Digest::parse(&d.digest).ok()?);
    }
    Some(blobs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layers() -> Vec<LayerEntry> {
        vec![
            LayerEntry {
                digest: format!("sha256:{}", "a".repeat(64)),
                diff_id: format!("sha256:{}", "b".repeat(64)),
                size: 10,
            },
            LayerEntry {
                digest: format!("sha256:{}", "c".repeat(64)),
                diff_id: format!("sha256:{}", "d".repeat(64)),
                size: 20,
            },
        ]
    }

    #[test]
    fn config_bytes_are_exact() {
        let runtime = RuntimeConfig {
            env: vec!["PATH=/bin".into()],
            cmd: Some(vec!["bash".into()]),
        };
        let got = String::from_utf8(config_blob(Arch::Amd64, &layers(), &runtime)).unwrap();
        let want = format!(
            r#"{{"architecture":"amd64","config":{{"Env":["PATH=/bin"],"Cmd":["bash"]}},"os":"linux","rootfs":{{"type":"layers","diff_ids":["sha256:{}","sha256:{}"]}}}}"#,
            "b".repeat(64),
            "d".repeat(64)
        );
        assert_eq!(got, want);
        let no_cmd = config_blob(Arch::Arm64, &[], &RuntimeConfig::default());
        assert_eq!(
            String::from_utf8(no_cmd).unwrap(),
            r#"{"architecture":"arm64","config":{"Env":[]},"os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
        );
    }

    #[test]
    fn docker_manifest_bytes_are_exact() {
        let cfg = format!("sha256:{}", "e".repeat(64));
        let got = String::from_utf8(manifest_bytes(
            ManifestFormat::Docker,
            &cfg,
            5,
            &layers(),
            Compression::Gzip,
        ))
        .unwrap();
        let want = format!(
            concat!(
                r#"{{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","#,
                r#""config":{{"mediaType":"application/vnd.docker.container.image.v1+json","size":5,"digest":"{cfg}"}},"#,
                r#""layers":[{{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","size":10,"digest":"sha256:{a}"}},"#,
                r#"{{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","size":20,"digest":"sha256:{c}"}}]}}"#
            ),
            cfg = cfg,
            a = "a".repeat(64),
            c = "c".repeat(64)
        );
        assert_eq!(got, want);
        assert_eq!(declared_media_type(got.as_bytes()), Some(DOCKER_MANIFEST));
    }

    #[test]
    fn oci_manifest_uses_oci_types() {
        let bytes = manifest_bytes(
            ManifestFormat::Oci,
            "sha256:x",
            1,
            &layers(),
            Compression::Gzip,
        );
        let s = String::from_utf8(bytes.clone()).unwrap();
        assert!(s.contains(OCI_CONFIG) && s.contains(OCI_LAYER) && !s.contains("docker"));
        assert_eq!(declared_media_type(&bytes), Some(OCI_MANIFEST));
        assert_eq!(
            bytes,
            manifest_bytes(
                ManifestFormat::Oci,
                "sha256:x",
                1,
                &layers(),
                Compression::Gzip
            )
        );
        let zstd = manifest_bytes(
            ManifestFormat::Oci,
            "sha256:x",
            1,
            &layers(),
            Compression::Zstd,
        );
        let s = String::from_utf8(zstd).unwrap();
        assert_eq!(s.matches(OCI_LAYER_ZSTD).count(), 2, "{s}");
        assert!(!s.contains(OCI_LAYER));
    }

    #[test]
    fn negotiation() {
        use ManifestFormat::*;
        let oci_and_index = format!("{OCI_MANIFEST}, application/vnd.oci.image.index.v1+json");
        let docker_and_any = format!("{DOCKER_MANIFEST}, */*");
        let cases: Vec<(Vec<&str>, ManifestFormat)> = vec![
            (vec![], Docker),
            (vec!["*/*"], Docker),
            (vec![OCI_MANIFEST, DOCKER_MANIFEST], Docker),
            (vec![&oci_and_index], Oci),
            (vec![&docker_and_any], Docker),
            (
                vec!["application/vnd.oci.image.manifest.v1+json; q=0.5"],
                Oci,
            ),
            (
                vec!["application/vnd.docker.distribution.manifest.v1+prettyjws"],
                Docker,
            ),
        ];
        for (lines, want) in cases {
            assert_eq!(
                ManifestFormat::negotiate(lines.iter().copied()),
                want,
                "{lines:?}"
            );
        }
    }

    #[test]
    fn index_bytes_are_exact_and_sorted_by_architecture() {
        let entries = [
            IndexEntry {
                arch: Arch::Arm64,
                digest: format!("sha256:{}", "2".repeat(64)),
                size: 200,
            },
            IndexEntry {
                arch: Arch::Amd64,
                digest: format!("sha256:{}", "1".repeat(64)),
                size: 100,
            },
        ];
        let got = String::from_utf8(index_bytes(ManifestFormat::Oci, &entries)).unwrap();
        let want = format!(
            concat!(
                r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":["#,
                r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","size":100,"digest":"sha256:{one}","platform":{{"architecture":"amd64","os":"linux"}}}},"#,
                r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","size":200,"digest":"sha256:{two}","platform":{{"architecture":"arm64","os":"linux","variant":"v8"}}}}]}}"#
            ),
            one = "1".repeat(64),
            two = "2".repeat(64)
        );
        assert_eq!(got, want);
        assert_eq!(declared_media_type(got.as_bytes()), Some(OCI_INDEX));
        let reversed: Vec<IndexEntry> = entries.iter().rev().cloned().collect();
        assert_eq!(
            index_bytes(ManifestFormat::Oci, &reversed),
            got.into_bytes()
        );
        let docker = String::from_utf8(index_bytes(ManifestFormat::Docker, &entries)).unwrap();
        assert!(docker.starts_with(
            r#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json","manifests":[{"mediaType":"application/vnd.docker.distribution.manifest.v2+json","#
        ));
        assert_eq!(
            declared_media_type(docker.as_bytes()),
            Some(DOCKER_MANIFEST_LIST)
        );
    }

    #[test]
    fn index_negotiation() {
        use ManifestFormat::*;
        // What docker, podman/skopeo and containerd send: every type.
        let all = format!("{DOCKER_MANIFEST}, {DOCKER_MANIFEST_LIST}, {OCI_MANIFEST}, {OCI_INDEX}");
        let cases: Vec<(Vec<&str>, Option<ManifestFormat>)> = vec![
            (vec![], None),
            (vec!["*/*"], None),
            (vec![DOCKER_MANIFEST], None),
            (vec![OCI_MANIFEST, DOCKER_MANIFEST], None),
            (vec![&all], Some(Docker)),
            (vec![DOCKER_MANIFEST, DOCKER_MANIFEST_LIST], Some(Docker)),
            (vec![OCI_MANIFEST, OCI_INDEX], Some(Oci)),
            (vec![OCI_INDEX], Some(Oci)),
            // A Docker list whose Docker manifests the client would not read.
            (
                vec![DOCKER_MANIFEST_LIST, OCI_MANIFEST, OCI_INDEX],
                Some(Oci),
            ),
            (vec![DOCKER_MANIFEST_LIST], None),
        ];
        for (lines, want) in cases {
            assert_eq!(
                ManifestFormat::negotiate_index(lines.iter().copied()),
                want,
                "{lines:?}"
            );
        }
    }
}
