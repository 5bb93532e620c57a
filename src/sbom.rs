//! An SPDX 2.3 SBOM of an image's Nix closure, and the OCI artifact manifest that
//! attaches it to the image through `subject`, so that the referrers API finds it.
//!
//! Pure, like `manifest`: serde structs fix the key order, every list is sorted, and
//! the timestamp comes from the caller, so the same build always gives the same SBOM
//! digest and a rebuilt image does not gain a second SBOM.

use crate::layers::store_path_name;
use crate::manifest::Descriptor;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

pub const SPDX_MEDIA_TYPE: &str = "application/spdx+json";
pub const EMPTY_CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
pub const EMPTY_CONFIG: &[u8] = b"{}";

const NOASSERTION: &str = "NOASSERTION";
const NIX_BASE32: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// One store path of the image's closure, as `nix-store --dump-db` reports it.
#[derive(Debug, Clone, Copy)]
pub struct PathInfo<'a> {
    /// `/nix/store/<hash>-<name>`.
    pub path: &'a str,
    /// Bare or `sha256:`-prefixed hex (Nix 2.8's dump-db prints bare hex), nix-base32,
    /// or SRI `sha256-<base64>`. Anything else leaves the package without a checksum.
    pub nar_hash: &'a str,
    pub nar_size: u64,
    /// The `.drv` path, or "" when unknown.
    pub deriver: &'a str,
    /// Store paths; may include the path itself.
    pub references: &'a [String],
}

/// A top-level package the image was asked for.
#[derive(Debug, Clone, Copy)]
pub struct TopLevel<'a> {
    /// The attribute path requested, e.g. `openssl.dev`.
    pub attr: &'a str,
    /// Its output path; top-levels whose path is not in the closure are left out.
    pub path: &'a str,
    pub output: &'a str,
    pub drv_path: &'a str,
    /// SPDX ids or nixpkgs short names from `meta.license`.
    pub licenses: &'a [String],
    pub homepage: Option<&'a str>,
}

#[derive(Debug, Clone, Copy)]
pub struct SbomInput<'a> {
    pub image_name: &'a str,
    /// `sha256:<hex>` of the image manifest the SBOM describes.
    pub subject_digest: &'a str,
    pub system: &'a str,
    /// RFC 3339 UTC, chosen by the caller so that the bytes are reproducible.
    pub created: &'a str,
    pub closure: &'a [PathInfo<'a>],
    pub top_level: &'a [TopLevel<'a>],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Document<'a> {
    spdx_version: &'static str,
    data_license: &'static str,
    #[serde(rename = "SPDXID")]
    spdx_id: &'static str,
    name: String,
    document_namespace: String,
    comment: String,
    creation_info: CreationInfo<'a>,
    packages: Vec<Package<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    has_extracted_licensing_infos: Vec<ExtractedLicense>,
    relationships: Vec<Relationship>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ExtractedLicense {
    license_id: String,
    extracted_text: String,
    name: String,
}

#[derive(Serialize)]
struct CreationInfo<'a> {
    created: &'a str,
    creators: [String; 1],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Package<'a> {
    #[serde(rename = "SPDXID")]
    spdx_id: String,
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    version_info: Option<&'a str>,
    download_location: &'static str,
    files_analyzed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    checksums: Option<[Checksum; 1]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    homepage: Option<&'a str>,
    license_concluded: &'static str,
    license_declared: String,
    copyright_text: &'static str,
    comment: String,
    external_refs: [ExternalRef; 1],
    #[serde(skip_serializing_if = "Option::is_none")]
    primary_package_purpose: Option<&'static str>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Checksum {
    algorithm: &'static str,
    checksum_value: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ExternalRef {
    reference_category: &'static str,
    reference_type: &'static str,
    reference_locator: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Relationship {
    spdx_element_id: String,
    relationship_type: &'static str,
    related_spdx_element: String,
}

/// SPDX 2.3 JSON bytes; the same input gives the same bytes, whatever the order of
/// `closure` and `top_level`.
pub fn spdx_json(input: &SbomInput) -> Vec<u8> {
    let mut closure: BTreeMap<&str, &PathInfo> = BTreeMap::new();
    for info in input.closure {
        closure.entry(info.path).or_insert(info);
    }
    // One path may be requested under several attributes ("hello", "hello.out").
    let mut requested: BTreeMap<&str, Vec<&TopLevel>> = BTreeMap::new();
    for top in input.top_level {
        if closure.contains_key(top.path) {
            requested.entry(top.path).or_default().push(top);
        }
    }

    let packages: Vec<Package> = closure
        .values()
        .map(|info| package(info, requested.get(info.path).map(Vec::as_slice)))
        .collect();
    // SPDX rejects a LicenseRef the document does not define, and all we know of
    // one is its name.
    let license_refs: BTreeSet<&str> = packages
        .iter()
        .flat_map(|p| p.license_declared.split(" AND "))
        .filter(|l| l.starts_with("LicenseRef-"))
        .collect();
    let has_extracted_licensing_infos = license_refs
        .into_iter()
        .map(|id| ExtractedLicense {
            license_id: id.into(),
            extracted_text: format!(
                "Not on the SPDX license list; nixpkgs meta.license names it {}.",
                &id["LicenseRef-".len()..]
            ),
            name: id["LicenseRef-".len()..].into(),
        })
        .collect();

    let mut relationships: Vec<Relationship> = requested
        .keys()
        .map(|path| Relationship {
            spdx_element_id: "SPDXRef-DOCUMENT".into(),
            relationship_type: "DESCRIBES",
            related_spdx_element: spdx_id(path),
        })
        .collect();
    for info in closure.values() {
        // References outside the closure would name elements the document lacks.
        let deps: BTreeSet<&str> = info
            .references
            .iter()
            .map(String::as_str)
            .filter(|r| *r != info.path && closure.contains_key(r))
            .collect();
        relationships.extend(deps.into_iter().map(|dep| Relationship {
            spdx_element_id: spdx_id(info.path),
            relationship_type: "DEPENDS_ON",
            related_spdx_element: spdx_id(dep),
        }));
    }

    let subject = input.subject_digest;
    let subject_hex = subject.split_once(':').map_or(subject, |(_, hex)| hex);
    let doc = Document {
        spdx_version: "SPDX-2.3",
        data_license: "CC0-1.0",
        spdx_id: "SPDXRef-DOCUMENT",
        name: format!("nixery image {}", input.image_name),
        // The name is part of it because one image may be served under several names,
        // and SPDX wants a namespace per document.
        document_namespace: format!(
            "https://nixery.invalid/spdx/{}/{}",
            percent_encode(input.image_name, b"-._~/"),
            percent_encode(subject_hex, b"-._~"),
        ),
        comment: format!(
            "The Nix closure of image {} for {}, as built.",
            input.image_name, input.system
        ),
        creation_info: CreationInfo {
            created: input.created,
            creators: [concat!("Tool: nixery-", env!("CARGO_PKG_VERSION")).into()],
        },
        packages,
        has_extracted_licensing_infos,
        relationships,
    };
    serde_json::to_vec_pretty(&doc).expect("SPDX document serialises")
}

fn package<'a>(info: &PathInfo<'a>, requested: Option<&[&TopLevel<'a>]>) -> Package<'a> {
    let store_name = store_path_name(info.path);
    let (name, version) = parse_drv_name(store_name);
    // SPDX and purl both need a name; "-1" parses to an empty one.
    let name = if name.is_empty() { store_name } else { name };
    let first = requested.and_then(|r| r.first());

    // Paths copied from a binary cache may not record their deriver; evaluation knows it.
    let deriver = Some(info.deriver)
        .filter(|d| !d.is_empty())
        .or(first.map(|t| t.drv_path).filter(|d| !d.is_empty()));
    let mut comment = format!("store path {}", info.path);
    if let Some(deriver) = deriver {
        write!(comment, "; derivation {deriver}").unwrap();
    }
    if let Some(tops) = requested {
        let names: Vec<String> = tops
            .iter()
            .map(|t| format!("{} (output {})", t.attr, t.output))
            .collect();
        write!(comment, "; requested as {}", names.join(", ")).unwrap();
    }

    Package {
        spdx_id: spdx_id(info.path),
        name,
        version_info: Some(version).filter(|v| !v.is_empty()),
        download_location: NOASSERTION,
        files_analyzed: false,
        checksums: nar_hash_hex(info.nar_hash).map(|hex| {
            [Checksum {
                algorithm: "SHA256",
                checksum_value: hex,
            }]
        }),
        homepage: first.and_then(|t| t.homepage).filter(|h| is_url(h)),
        license_concluded: NOASSERTION,
        license_declared: first.map_or(NOASSERTION.into(), |t| license_expression(t.licenses)),
        copyright_text: NOASSERTION,
        comment,
        external_refs: [ExternalRef {
            reference_category: "PACKAGE-MANAGER",
            reference_type: "purl",
            reference_locator: purl(name, version, first.map_or("out", |t| t.output)),
        }],
        primary_package_purpose: first.map(|_| "APPLICATION"),
    }
}

/// Name and version as Nix's `builtins.parseDrvName` splits them: the version starts
/// after the first '-' followed by a byte that is not an ASCII letter.
pub fn parse_drv_name(store_name: &str) -> (&str, &str) {
    let split = store_name
        .as_bytes()
        .windows(2)
        .position(|w| w[0] == b'-' && !w[1].is_ascii_alphabetic());
    match split {
        Some(i) => (&store_name[..i], &store_name[i + 1..]),
        None => (store_name, ""),
    }
}

fn base_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// The hash part is unique within a store and already a valid SPDX idstring; other
/// strings get a digest of the path, which cannot collide with a 32-char hash part.
fn spdx_id(path: &str) -> String {
    let base = base_name(path);
    let hash = base.split_once('-').map_or(base, |(hash, _)| hash);
    if !hash.is_empty() && hash.bytes().all(|c| c.is_ascii_alphanumeric()) {
        format!("SPDXRef-Package-{hash}")
    } else {
        let digest = ring::digest::digest(&ring::digest::SHA256, path.as_bytes());
        format!("SPDXRef-Package-{}", hex::encode(digest))
    }
}

/// Lower-case hex of a SHA-256 nar hash in any form Nix prints one.
fn nar_hash_hex(nar_hash: &str) -> Option<String> {
    use base64::Engine;
    if let Some(b64) = nar_hash.strip_prefix("sha256-") {
        let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
        return (bytes.len() == 32).then(|| hex::encode(bytes));
    }
    let hash = nar_hash.strip_prefix("sha256:").unwrap_or(nar_hash);
    match hash.len() {
        64 if hash.bytes().all(|c| c.is_ascii_hexdigit()) => Some(hash.to_ascii_lowercase()),
        52 => nix_base32_decode(hash).map(hex::encode),
        _ => None,
    }
}

/// Nix's base32 (libutil `parseHash32`): its own alphabet, and the last character
/// holds the lowest bits of the first byte, so the string reads back to front.
fn nix_base32_decode(s: &str) -> Option<[u8; 32]> {
    if s.len() != 52 {
        return None;
    }
    let mut out = [0u8; 32];
    for (n, c) in s.bytes().rev().enumerate() {
        let digit = NIX_BASE32.iter().position(|&a| a == c)? as u16;
        let (i, j) = (n * 5 / 8, n * 5 % 8);
        let bits = digit << j;
        out[i] |= bits as u8;
        let carry = (bits >> 8) as u8;
        match out.get_mut(i + 1) {
            Some(next) => *next |= carry,
            // Bits beyond 256: not a hash Nix would print.
            None if carry != 0 => return None,
            None => {}
        }
    }
    Some(out)
}

/// A charset check only: a nixpkgs short name (used where a license has no SPDX id)
/// that looks like an id passes and makes the document invalid, so callers should
/// turn short names into `LicenseRef-<name>`.
fn license_expression(licenses: &[String]) -> String {
    let valid = |l: &String| {
        !l.is_empty()
            && l.bytes()
                .all(|c| c.is_ascii_alphanumeric() || b".-+".contains(&c))
    };
    if !licenses.is_empty() && licenses.iter().all(valid) {
        licenses.join(" AND ")
    } else {
        NOASSERTION.into()
    }
}

/// SPDX validators reject a homepage that is not a URL; `meta.homepage` is free text.
fn is_url(s: &str) -> bool {
    (s.starts_with("https://") || s.starts_with("http://"))
        && !s
            .bytes()
            .any(|c| c.is_ascii_whitespace() || c.is_ascii_control())
}

fn purl(name: &str, version: &str, output: &str) -> String {
    let mut purl = format!("pkg:nix/{}", percent_encode(name, b"-._~"));
    if !version.is_empty() {
        write!(purl, "@{}", percent_encode(version, b"-._~")).unwrap();
    }
    write!(purl, "?output={}", percent_encode(output, b"-._~")).unwrap();
    purl
}

/// Keeps ASCII letters, digits and `keep`; purl wants '+' and the like encoded.
fn percent_encode(s: &str, keep: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || keep.contains(&b) {
            out.push(b as char);
        } else {
            write!(out, "%{b:02X}").unwrap();
        }
    }
    out
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ArtifactManifest<'a> {
    schema_version: u32,
    media_type: &'static str,
    artifact_type: &'static str,
    config: Descriptor<'a>,
    layers: [Descriptor<'a>; 1],
    subject: Descriptor<'a>,
    annotations: Annotations<'a>,
}

#[derive(Serialize)]
struct Annotations<'a> {
    #[serde(rename = "org.opencontainers.image.created")]
    created: &'a str,
}

/// The OCI image manifest that carries the SBOM blob as its one layer and points at
/// the image through `subject`.
pub fn artifact_manifest(
    sbom_digest: &str,
    sbom_size: u64,
    subject_media_type: &str,
    subject_digest: &str,
    subject_size: u64,
    created: &str,
) -> Vec<u8> {
    let empty_digest = format!(
        "sha256:{}",
        hex::encode(ring::digest::digest(&ring::digest::SHA256, EMPTY_CONFIG))
    );
    let manifest = ArtifactManifest {
        schema_version: 2,
        media_type: crate::manifest::OCI_MANIFEST,
        artifact_type: SPDX_MEDIA_TYPE,
        config: Descriptor {
            media_type: EMPTY_CONFIG_MEDIA_TYPE,
            size: EMPTY_CONFIG.len() as u64,
            digest: &empty_digest,
        },
        layers: [Descriptor {
            media_type: SPDX_MEDIA_TYPE,
            size: sbom_size,
            digest: sbom_digest,
        }],
        subject: Descriptor {
            media_type: subject_media_type,
            size: subject_size,
            digest: subject_digest,
        },
        annotations: Annotations { created },
    };
    serde_json::to_vec(&manifest).expect("artifact manifest serialises")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    const HELLO: &str = "/nix/store/amjh0ifvsmppqkmcbj2qpmra2ad1ij2x-hello-2.12.1";
    const LIBFOO: &str = "/nix/store/q9v7l2lbw6f9bk3kfr2a8g0ncd5ccbsm-libfoo-1.0";
    const BUSYBOX: &str = "/nix/store/00cfjc3s9bp0cq2pzh0xx2hrjr5xb6jk-busybox-1.35.0";

    // Pairs captured with `nix-hash --type sha256 --to-base32 <hex>` and checked back
    // with `nix-hash --type sha256 --to-base16 <base32>` (Nix 2.8).
    const HASHES: [(&str, &str); 3] = [
        (
            "094qif9n4cq4fdg459qzbhg1c6wywawwaaivx0k0x8xhbyx4vwic",
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
        ),
        (
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        ),
        (
            "14n0bhm53ls95n4y4y2rx7p2k5wmjd9g44n34ycz6j4g3q36p9i6",
            "26a66b061e8f48f39927c312f25293959729eee95978e2892d49d3512a5cc092",
        ),
    ];

    struct Fixture {
        refs: [Vec<String>; 3],
        licenses: Vec<String>,
    }

    impl Fixture {
        fn new() -> Self {
            let s = |v: &[&str]| v.iter().map(|p| p.to_string()).collect::<Vec<_>>();
            Fixture {
                refs: [
                    s(&[LIBFOO, HELLO, BUSYBOX]),
                    s(&[BUSYBOX, LIBFOO]),
                    s(&[BUSYBOX]),
                ],
                licenses: s(&["GPL-3.0-or-later"]),
            }
        }

        fn closure(&self) -> [PathInfo<'_>; 3] {
            [
                PathInfo {
                    path: HELLO,
                    // Bare hex, as Nix 2.8's dump-db prints it.
                    nar_hash: HASHES[0].1,
                    nar_size: 616,
                    deriver: "/nix/store/01nkfdzin1v8mpdm538rkwwxl72rmq68-hello-2.12.1.drv",
                    references: &self.refs[0],
                },
                PathInfo {
                    path: LIBFOO,
                    nar_hash: "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
                    nar_size: 1000,
                    deriver: "",
                    references: &self.refs[1],
                },
                PathInfo {
                    path: BUSYBOX,
                    nar_hash:
                        "sha256:26A66B061E8F48F39927C312F25293959729EEE95978E2892D49D3512A5CC092",
                    nar_size: 2051456,
                    deriver: "/nix/store/wrz81nr7skir00dfpzz81ripx7ls7kcy-busybox-1.35.0.drv",
                    references: &self.refs[2],
                },
            ]
        }

        fn top(&self) -> [TopLevel<'_>; 1] {
            [TopLevel {
                attr: "hello",
                path: HELLO,
                output: "out",
                drv_path: "/nix/store/01nkfdzin1v8mpdm538rkwwxl72rmq68-hello-2.12.1.drv",
                licenses: &self.licenses,
                homepage: Some("https://www.gnu.org/software/hello/"),
            }]
        }
    }

    fn input<'a>(closure: &'a [PathInfo<'a>], top: &'a [TopLevel<'a>]) -> SbomInput<'a> {
        SbomInput {
            image_name: "shell/hello",
            subject_digest: DIGEST,
            system: "x86_64-linux",
            created: "1970-01-01T00:00:00Z",
            closure,
            top_level: top,
        }
    }

    const DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    #[test]
    fn drv_names_split_like_nix() {
        // Each pair is what `nix-instantiate --eval -E 'builtins.parseDrvName "…"'`
        // printed with Nix 2.8.
        let cases = [
            ("hello-2.12.1", "hello", "2.12.1"),
            ("nss-cacert-3.0", "nss-cacert", "3.0"),
            ("bash-interactive-5.2p37", "bash-interactive", "5.2p37"),
            ("openssl-3.0.13-dev", "openssl", "3.0.13-dev"),
            ("busybox", "busybox", ""),
            ("host-busybox", "host-busybox", ""),
            ("glibc-2.38-44-bin", "glibc", "2.38-44-bin"),
            (
                "perl5.38.2-Mozilla-CA-20230821",
                "perl5.38.2-Mozilla-CA",
                "20230821",
            ),
            (
                "python3.11-requests-2.31.0",
                "python3.11-requests",
                "2.31.0",
            ),
            ("foo--1", "foo", "-1"),
            ("foo-", "foo-", ""),
            ("foo-_bar", "foo", "_bar"),
            ("foo-.1", "foo", ".1"),
            ("foo-Ä", "foo", "Ä"),
            ("-1", "", "1"),
            ("", "", ""),
        ];
        for (full, name, version) in cases {
            assert_eq!(parse_drv_name(full), (name, version), "{full}");
        }
    }

    #[test]
    fn nix_base32_reads_as_nix_hash_prints_it() {
        for (base32, hex) in HASHES {
            assert_eq!(nar_hash_hex(base32).as_deref(), Some(hex), "{base32}");
            assert_eq!(
                nar_hash_hex(&format!("sha256:{base32}")).as_deref(),
                Some(hex)
            );
        }
        // A real store path's hash: `nix-store -q --hash` against what dump-db printed.
        assert_eq!(
            nar_hash_hex("sha256:1kfdg7ilmjskk9ariz7633wcjp6n8j6gwg9vpzai65iydgwxf1g7").as_deref(),
            Some("e705d7f96b3e1613d5bf3b3dfe8c44d65cc9f818e6fc98559a53cb4ae379cdcd")
        );
        // SRI form of the first hash, as newer `nix path-info --json` prints it.
        assert_eq!(
            nar_hash_hex("sha256-LPJNul+wow4m6DsqxbninhsWHlwfp0JecwQzYpOLmCQ=").as_deref(),
            Some(HASHES[0].1)
        );
        // The first character holds the top bit of the last byte: `nix-hash --to-base16`
        // gives this for a leading '1', and refuses a leading 'z' (bits past the 256th).
        assert_eq!(
            nar_hash_hex("194qif9n4cq4fdg459qzbhg1c6wywawwaaivx0k0x8xhbyx4vwic").as_deref(),
            Some("2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b98a4")
        );
        assert_eq!(nar_hash_hex(&format!("z{}", &HASHES[0].0[1..])), None);
        // 'e' is not in Nix's alphabet.
        assert_eq!(nar_hash_hex(&format!("e{}", &HASHES[0].0[1..])), None);
        assert_eq!(nar_hash_hex("sha256:xyz"), None);
    }

    fn packages(doc: &Value) -> &Vec<Value> {
        doc["packages"].as_array().unwrap()
    }

    #[test]
    fn three_path_closure() {
        let f = Fixture::new();
        let (closure, top) = (f.closure(), f.top());
        let bytes = spdx_json(&input(&closure, &top));
        let doc: Value = serde_json::from_slice(&bytes).unwrap();

        assert_eq!(doc["spdxVersion"], "SPDX-2.3");
        assert_eq!(doc["SPDXID"], "SPDXRef-DOCUMENT");
        assert_eq!(
            doc["documentNamespace"],
            "https://nixery.invalid/spdx/shell/hello/1111111111111111111111111111111111111111111111111111111111111111"
        );
        assert_eq!(doc["creationInfo"]["created"], "1970-01-01T00:00:00Z");

        let pkgs = packages(&doc);
        let id = |p: &str| format!("SPDXRef-Package-{}", &base_name(p)[..32]);
        let summary: Vec<_> = pkgs
            .iter()
            .map(|p| {
                (
                    p["SPDXID"].as_str().unwrap(),
                    p["name"].as_str().unwrap(),
                    p["versionInfo"].as_str().unwrap(),
                    p["checksums"][0]["checksumValue"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (&*id(BUSYBOX), "busybox", "1.35.0", HASHES[2].1),
                (&*id(HELLO), "hello", "2.12.1", HASHES[0].1),
                (&*id(LIBFOO), "libfoo", "1.0", HASHES[1].1),
            ]
        );
        for p in pkgs {
            assert_eq!(p["checksums"][0]["algorithm"], "SHA256");
            assert_eq!(p["downloadLocation"], "NOASSERTION");
            assert_eq!(p["filesAnalyzed"], false);
        }

        let (busybox, hello, libfoo) = (&pkgs[0], &pkgs[1], &pkgs[2]);
        assert_eq!(hello["licenseDeclared"], "GPL-3.0-or-later");
        assert_eq!(hello["homepage"], "https://www.gnu.org/software/hello/");
        assert!(doc.get("hasExtractedLicensingInfos").is_none());
        assert_eq!(hello["primaryPackagePurpose"], "APPLICATION");
        assert_eq!(
            hello["externalRefs"],
            json!([{
                "referenceCategory": "PACKAGE-MANAGER",
                "referenceType": "purl",
                "referenceLocator": "pkg:nix/hello@2.12.1?output=out",
            }])
        );
        assert_eq!(
            hello["comment"],
            format!(
                "store path {HELLO}; derivation \
                 /nix/store/01nkfdzin1v8mpdm538rkwwxl72rmq68-hello-2.12.1.drv; \
                 requested as hello (output out)"
            )
        );
        assert_eq!(libfoo["licenseDeclared"], "NOASSERTION");
        assert_eq!(libfoo["comment"], format!("store path {LIBFOO}"));
        assert!(libfoo.get("homepage").is_none());
        assert!(libfoo.get("primaryPackagePurpose").is_none());
        assert_eq!(
            busybox["externalRefs"][0]["referenceLocator"],
            "pkg:nix/busybox@1.35.0?output=out"
        );

        let rel = |a: &str, t: &str, b: &str| json!({"spdxElementId": a, "relationshipType": t, "relatedSpdxElement": b});
        assert_eq!(
            doc["relationships"],
            json!([
                rel("SPDXRef-DOCUMENT", "DESCRIBES", &id(HELLO)),
                rel(&id(HELLO), "DEPENDS_ON", &id(BUSYBOX)),
                rel(&id(HELLO), "DEPENDS_ON", &id(LIBFOO)),
                rel(&id(LIBFOO), "DEPENDS_ON", &id(BUSYBOX)),
            ])
        );
    }

    #[test]
    fn same_input_same_bytes_whatever_the_order() {
        let f = Fixture::new();
        let (closure, top) = (f.closure(), f.top());
        let bytes = spdx_json(&input(&closure, &top));
        assert_eq!(bytes, spdx_json(&input(&closure, &top)));
        let mut reversed = closure;
        reversed.reverse();
        assert_eq!(bytes, spdx_json(&input(&reversed, &top)));
    }

    #[test]
    fn created_changes_only_created() {
        let f = Fixture::new();
        let (closure, top) = (f.closure(), f.top());
        let a = spdx_json(&input(&closure, &top));
        let b = spdx_json(&SbomInput {
            created: "2024-05-01T12:00:00Z",
            ..input(&closure, &top)
        });
        assert_ne!(a, b);
        let a: Value = serde_json::from_slice(&a).unwrap();
        let mut b: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(b["creationInfo"]["created"], "2024-05-01T12:00:00Z");
        b["creationInfo"]["created"] = a["creationInfo"]["created"].clone();
        assert_eq!(a, b);
    }

    #[test]
    fn odd_inputs_stay_valid() {
        let f = Fixture::new();
        let closure = f.closure();
        let licenses = ["MIT".to_string(), "LicenseRef-nixpkgs-unfree".to_string()];
        let free_text = ["BSD-like (see COPYING)".to_string()];
        let top = [
            TopLevel {
                attr: "hello",
                path: HELLO,
                output: "out",
                drv_path: "",
                licenses: &licenses,
                homepage: Some("see README"),
            },
            TopLevel {
                attr: "hello.out",
                path: HELLO,
                output: "out",
                drv_path: "",
                licenses: &free_text,
                homepage: None,
            },
            TopLevel {
                attr: "libfoo",
                path: LIBFOO,
                output: "lib+x",
                drv_path: "/nix/store/5ppp2ag8bwgpyb79z79q3dfjr5g2rqs4-libfoo-1.0.drv",
                licenses: &free_text,
                homepage: None,
            },
            TopLevel {
                attr: "missing",
                path: "/nix/store/zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-gone",
                output: "out",
                drv_path: "",
                licenses: &[],
                homepage: None,
            },
        ];
        let doc: Value = serde_json::from_slice(&spdx_json(&input(&closure, &top))).unwrap();
        let pkgs = packages(&doc);
        let (hello, libfoo) = (&pkgs[1], &pkgs[2]);
        assert_eq!(
            hello["licenseDeclared"],
            "MIT AND LicenseRef-nixpkgs-unfree"
        );
        assert_eq!(
            doc["hasExtractedLicensingInfos"],
            json!([{
                "licenseId": "LicenseRef-nixpkgs-unfree",
                "extractedText": "Not on the SPDX license list; nixpkgs meta.license names it nixpkgs-unfree.",
                "name": "nixpkgs-unfree",
            }])
        );
        assert!(hello.get("homepage").is_none());
        assert!(hello["comment"]
            .as_str()
            .unwrap()
            .ends_with("; requested as hello (output out), hello.out (output out)"));
        assert_eq!(libfoo["licenseDeclared"], "NOASSERTION");
        assert_eq!(
            libfoo["comment"],
            format!(
                "store path {LIBFOO}; derivation \
                 /nix/store/5ppp2ag8bwgpyb79z79q3dfjr5g2rqs4-libfoo-1.0.drv; \
                 requested as libfoo (output lib+x)"
            )
        );
        assert_eq!(
            libfoo["externalRefs"][0]["referenceLocator"],
            "pkg:nix/libfoo@1.0?output=lib%2Bx"
        );
        let describes = doc["relationships"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["relationshipType"] == "DESCRIBES")
            .count();
        assert_eq!(describes, 2);

        assert_eq!(
            purl("gtk+3", "3.24.41", "out"),
            "pkg:nix/gtk%2B3@3.24.41?output=out"
        );
        assert_eq!(purl("busybox", "", "bin"), "pkg:nix/busybox?output=bin");
        let odd = spdx_id("/tmp/not_a+store path");
        assert!(odd.strip_prefix("SPDXRef-Package-").unwrap().len() == 64);
        assert_ne!(odd, spdx_id("/tmp/not_a+store path2"));
    }

    #[test]
    fn artifact_manifest_points_at_the_image() {
        let sbom = format!("sha256:{}", "2".repeat(64));
        let bytes = artifact_manifest(
            &sbom,
            1234,
            crate::manifest::OCI_MANIFEST,
            DIGEST,
            567,
            "1970-01-01T00:00:00Z",
        );
        assert_eq!(
            bytes,
            artifact_manifest(
                &sbom,
                1234,
                crate::manifest::OCI_MANIFEST,
                DIGEST,
                567,
                "1970-01-01T00:00:00Z"
            )
        );
        let m: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            m,
            json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "artifactType": "application/spdx+json",
                "config": {
                    "mediaType": "application/vnd.oci.empty.v1+json",
                    "size": 2,
                    "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
                },
                "layers": [{"mediaType": "application/spdx+json", "size": 1234, "digest": sbom}],
                "subject": {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "size": 567,
                    "digest": DIGEST,
                },
                "annotations": {"org.opencontainers.image.created": "1970-01-01T00:00:00Z"},
            })
        );
    }
}
