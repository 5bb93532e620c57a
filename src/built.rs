//! What a build produces: manifests with their exact bytes and digests, the
//! artifacts (the SBOM) attached to them, and for an image index its children.

use crate::manifest::ManifestFormat;
use crate::reference::Digest;
use bytes::Bytes;
use serde::Deserialize;
use std::sync::Arc;

/// A manifest's exact bytes, served verbatim so its digest holds.
#[derive(Debug, Clone)]
pub struct StoredManifest {
    pub digest: Digest,
    pub bytes: Bytes,
}

impl StoredManifest {
    pub fn of(bytes: Bytes) -> Self {
        StoredManifest {
            digest: Digest::of(&bytes),
            bytes,
        }
    }
}

/// An image, or an image index, in both formats.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// The Docker schema 2 manifest, or for an index the Docker manifest list.
    pub docker: StoredManifest,
    /// The OCI manifest, or for an index the OCI image index.
    pub oci: StoredManifest,
    /// Artifacts (the SBOM) whose subject is one of the two manifests.
    pub referrers: Vec<Referrer>,
    /// For an index, the image of each platform it names; empty for an image.
    pub children: Vec<Arc<BuiltImage>>,
    /// What [`BuiltImage::blobs`] answers, worked out once: every manifest served by
    /// tag asks for it, and parsing the manifests each time was most of the cost
    /// of a warm request.
    blobs: Option<Arc<[Digest]>>,
}

/// An artifact manifest attached to an image manifest, as the referrers API lists it.
#[derive(Debug, Clone)]
pub struct Referrer {
    pub subject: Digest,
    pub artifact_type: String,
    pub manifest: StoredManifest,
}

impl Referrer {
    /// Reads an artifact manifest this registry wrote; None for anything else.
    pub fn parse(bytes: Bytes) -> Option<Referrer> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Artifact {
            artifact_type: String,
            subject: Subject,
        }
        #[derive(Deserialize)]
        struct Subject {
            digest: String,
        }
        let a: Artifact = serde_json::from_slice(&bytes).ok()?;
        Some(Referrer {
            subject: Digest::parse(&a.subject.digest).ok()?,
            artifact_type: a.artifact_type,
            manifest: StoredManifest {
                digest: Digest::of(&bytes),
                bytes,
            },
        })
    }
}

impl BuiltImage {
    pub fn new(
        docker: StoredManifest,
        oci: StoredManifest,
        referrers: Vec<Referrer>,
        children: Vec<Arc<BuiltImage>>,
    ) -> Self {
        let mut image = BuiltImage {
            docker,
            oci,
            referrers,
            children,
            blobs: None,
        };
        image.blobs = image.named_blobs().map(Into::into);
        image
    }

    /// An image (or index) with an OCI manifest only, which stands in for the Docker
    /// one: its layers are zstd, which Docker manifests have no type for.
    pub fn oci_only(&self) -> bool {
        self.docker.digest == self.oci.digest
    }

    pub fn manifest(&self, format: ManifestFormat) -> &StoredManifest {
        match format {
            ManifestFormat::Docker => &self.docker,
            ManifestFormat::Oci => &self.oci,
        }
    }

    /// The media type the manifest of `format` is served with.
    pub fn media_type(&self, format: ManifestFormat) -> &'static str {
        let format = if self.oci_only() {
            ManifestFormat::Oci
        } else {
            format
        };
        if self.children.is_empty() {
            format.media_type()
        } else {
            format.index_media_type()
        }
    }

    /// Every blob the image names: its manifests, artifacts, configs and layers,
    /// and those of its children, sorted; None when a manifest is not one this
    /// registry wrote.
    pub fn blobs(&self) -> Option<&[Digest]> {
        self.blobs.as_deref()
    }

    fn named_blobs(&self) -> Option<Vec<Digest>> {
        #[derive(Deserialize)]
        struct Desc {
            digest: String,
        }
        #[derive(Deserialize)]
        struct Parsed {
            config: Desc,
            layers: Vec<Desc>,
        }
        let mut blobs = vec![self.docker.digest.clone(), self.oci.digest.clone()];
        if self.children.is_empty() {
            let artifacts = self.referrers.iter().map(|r| &r.manifest);
            for m in std::iter::once(&self.docker).chain(artifacts) {
                let parsed: Parsed = serde_json::from_slice(&m.bytes).ok()?;
                if m.digest != self.docker.digest {
                    blobs.push(m.digest.clone());
                }
                for d in std::iter::once(&parsed.config).chain(parsed.layers.iter()) {
                    blobs.push(Digest::parse(&d.digest).ok()?);
                }
            }
        }
        for child in &self.children {
            blobs.extend_from_slice(child.blobs()?);
        }
        blobs.sort_by_cached_key(|d| d.to_string());
        blobs.dedup();
        Some(blobs)
    }
}
