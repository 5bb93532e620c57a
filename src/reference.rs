//! The registry's URL grammar: which route a request path names, and whether the
//! repository name, tag and digest in it are valid by the OCI distribution spec.
//!
//! Pure: no I/O, no actix. The path is taken as it arrived on the wire (not
//! percent-decoded), so an encoded `/`, `.` or NUL can never sneak past the grammar:
//! `%` is simply not a character any of the grammars allow.

use std::fmt;

/// A route of the read-only registry API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`: the API version check.
    Base,
    Manifest {
        name: String,
        reference: Reference,
    },
    Blob {
        name: String,
        digest: Digest,
    },
    TagsList {
        name: String,
    },
    /// `/v2/<name>/referrers/<digest>`: artifacts whose subject is that manifest.
    Referrers {
        name: String,
        digest: Digest,
    },
}

impl Route {
    /// The repository the route names; None for `/v2/`.
    pub fn repository(&self) -> Option<&str> {
        match self {
            Route::Base => None,
            Route::Manifest { name, .. }
            | Route::Blob { name, .. }
            | Route::TagsList { name }
            | Route::Referrers { name, .. } => Some(name),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}

/// A validated `sha256:<64 lower-case hex>` digest, the only algorithm served.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

impl Digest {
    /// Parses `sha256:<hex>`; other well-formed algorithms are refused as unsupported.
    pub fn parse(s: &str) -> Result<Self, RouteError> {
        let (algorithm, encoded) = s.split_once(':').ok_or(RouteError::DigestInvalid)?;
        if !valid_algorithm(algorithm) || encoded.is_empty() {
            return Err(RouteError::DigestInvalid);
        }
        if algorithm != "sha256" {
            return Err(RouteError::DigestUnsupported);
        }
        if encoded.len() != 64
            || !encoded
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(RouteError::DigestInvalid);
        }
        Ok(Digest {
            hex: encoded.to_string(),
        })
    }

    /// Builds a digest from raw sha256 bytes or their hex form (already trusted).
    pub fn from_hex(hex: &str) -> Result<Self, RouteError> {
        Self::parse(&format!("sha256:{hex}"))
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Digest {
            hex: hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes)),
        }
    }

    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

/// Why a path is not a valid route; each maps to one registry error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("invalid repository name: {0}")]
    NameInvalid(String),
    #[error("repository name longer than {0} characters")]
    NameTooLong(usize),
    #[error("invalid tag: tags match [a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}}")]
    TagInvalid,
    #[error("invalid digest: digests are sha256:<64 hex characters>")]
    DigestInvalid,
    #[error("unsupported digest algorithm: only sha256 is served")]
    DigestUnsupported,
    #[error("unknown route")]
    UnknownRoute,
}

/// Parses a request path (without query string) under `/v2`.
pub fn parse_route(path: &str, max_name_len: usize) -> Result<Route, RouteError> {
    let rest = match path.strip_prefix("/v2") {
        Some("") | Some("/") => return Ok(Route::Base),
        Some(rest) => rest.strip_prefix('/').ok_or(RouteError::UnknownRoute)?,
        None => return Err(RouteError::UnknownRoute),
    };
    let (name, route) = if let Some(name) = rest.strip_suffix("/tags/list") {
        (name, None)
    } else {
        let (head, last) = rest.rsplit_once('/').ok_or(RouteError::UnknownRoute)?;
        let (name, kind) = head.rsplit_once('/').ok_or(RouteError::UnknownRoute)?;
        match kind {
            "manifests" | "blobs" | "referrers" => (name, Some((kind, last))),
            _ => return Err(RouteError::UnknownRoute),
        }
    };
    let name = validate_name(name, max_name_len)?;
    match route {
        None => Ok(Route::TagsList { name }),
        Some(("manifests", reference)) => Ok(Route::Manifest {
            name,
            reference: parse_reference(reference)?,
        }),
        Some(("referrers", digest)) => Ok(Route::Referrers {
            name,
            digest: Digest::parse(digest)?,
        }),
        Some((_, digest)) => Ok(Route::Blob {
            name,
            digest: Digest::parse(digest)?,
        }),
    }
}

/// A tag, or a digest when the reference contains `:` (tags cannot).
pub fn parse_reference(s: &str) -> Result<Reference, RouteError> {
    if s.contains(':') {
        return Digest::parse(s).map(Reference::Digest);
    }
    if valid_tag(s) {
        Ok(Reference::Tag(s.to_string()))
    } else {
        Err(RouteError::TagInvalid)
    }
}

/// `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`
pub fn valid_tag(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b[1..]
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

fn validate_name(name: &str, max_len: usize) -> Result<String, RouteError> {
    if name.len() > max_len {
        return Err(RouteError::NameTooLong(max_len));
    }
    if name.is_empty() {
        return Err(RouteError::NameInvalid("empty name".into()));
    }
    for component in name.split('/') {
        if !valid_component(component) {
            return Err(RouteError::NameInvalid(format!(
                "component {:?} does not match [a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*",
                truncate(component, 64)
            )));
        }
    }
    Ok(name.to_string())
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
pub fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    let mut i = 0;
    loop {
        let start = i;
        while i < b.len() && alnum(b[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == b.len() {
            return true;
        }
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
    }
}

/// `[a-z0-9]+([+._-][a-z0-9]+)*`
fn valid_algorithm(a: &str) -> bool {
    !a.is_empty()
        && a.split(['+', '.', '_', '-']).all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_of_bytes() {
        assert_eq!(Digest::of(b"").to_string(), format!("sha256:{HEX}"));
        assert_eq!(
            Digest::of(b"abc"),
            Digest::parse(
                "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
            )
            .unwrap()
        );
    }
    use proptest::prelude::*;

    const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn routes() {
        let cases: Vec<(&str, Result<Route, RouteError>)> = vec![
            ("/v2/", Ok(Route::Base)),
            ("/v2", Ok(Route::Base)),
            (
                "/v2/shell/git/manifests/latest",
                Ok(Route::Manifest {
                    name: "shell/git".into(),
                    reference: Reference::Tag("latest".into()),
                }),
            ),
            (
                &*Box::leak(format!("/v2/hello/manifests/sha256:{HEX}").into_boxed_str()),
                Ok(Route::Manifest {
                    name: "hello".into(),
                    reference: Reference::Digest(Digest::from_hex(HEX).unwrap()),
                }),
            ),
            (
                &*Box::leak(format!("/v2/a/b.c/blobs/sha256:{HEX}").into_boxed_str()),
                Ok(Route::Blob {
                    name: "a/b.c".into(),
                    digest: Digest::from_hex(HEX).unwrap(),
                }),
            ),
            (
                "/v2/tools.figlet/tags/list",
                Ok(Route::TagsList {
                    name: "tools.figlet".into(),
                }),
            ),
            (
                &*Box::leak(format!("/v2/shell/git/referrers/sha256:{HEX}").into_boxed_str()),
                Ok(Route::Referrers {
                    name: "shell/git".into(),
                    digest: Digest::from_hex(HEX).unwrap(),
                }),
            ),
            ("/v2/hello/referrers/latest", Err(RouteError::DigestInvalid)),
            ("/v2/hello/blobs/uploads/", Err(RouteError::UnknownRoute)),
            ("/v2/_catalog", Err(RouteError::UnknownRoute)),
            ("/v3/", Err(RouteError::UnknownRoute)),
            (
                "/v2/hello/manifests/bad:tag",
                Err(RouteError::DigestUnsupported),
            ),
            ("/v2/hello/manifests/-tag", Err(RouteError::TagInvalid)),
            (
                "/v2/hello/blobs/md5:abc",
                Err(RouteError::DigestUnsupported),
            ),
            ("/v2/hello/blobs/sha256:ABC", Err(RouteError::DigestInvalid)),
            ("/v2/hello/blobs/latest", Err(RouteError::DigestInvalid)),
        ];
        for (path, want) in cases {
            assert_eq!(parse_route(path, 255), want, "{path}");
        }
    }

    #[test]
    fn hostile_names_are_invalid() {
        for path in [
            "/v2/../etc/manifests/latest",
            "/v2/%2e%2e/manifests/latest",
            "/v2/a%2fb/manifests/latest",
            "/v2/a\0b/manifests/latest",
            "/v2/a;b/manifests/latest",
            "/v2/${x}/manifests/latest",
            "/v2/a\"b/manifests/latest",
            "/v2/`id`/manifests/latest",
            "/v2/Hello/manifests/latest",
            "/v2//manifests/latest",
            "/v2/a//b/manifests/latest",
            "/v2/a./manifests/latest",
            "/v2/.a/manifests/latest",
        ] {
            match parse_route(path, 255) {
                Err(RouteError::NameInvalid(_)) => {}
                other => panic!("{path:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn name_length_limit() {
        let long = format!("/v2/{}/manifests/latest", "a".repeat(300));
        assert_eq!(parse_route(&long, 255), Err(RouteError::NameTooLong(255)));
        let many = format!("/v2/{}x/manifests/latest", "a/".repeat(5000));
        assert_eq!(parse_route(&many, 255), Err(RouteError::NameTooLong(255)));
    }

    #[test]
    fn components() {
        for ok in [
            "a",
            "a0",
            "a.b",
            "a_b",
            "a__b",
            "a---b",
            "7zip",
            "tools.figlet",
        ] {
            assert!(valid_component(ok), "{ok}");
        }
        for bad in ["", "A", "a___b", "a-", "-a", "a..b", "a._b", "ä"] {
            assert!(!valid_component(bad), "{bad}");
        }
    }

    #[test]
    fn tags() {
        assert!(valid_tag("latest"));
        assert!(valid_tag("_x.Y-1"));
        assert!(valid_tag(&"a".repeat(128)));
        assert!(!valid_tag(&"a".repeat(129)));
        assert!(!valid_tag(".x"));
        assert!(!valid_tag(""));
    }

    fn name_regex() -> regex_lite::Regex {
        regex_lite::Regex::new(
            r"^[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*$",
        )
        .unwrap()
    }

    proptest! {
        #[test]
        fn parser_never_panics_and_accepts_only_the_grammar(path in "\\PC{0,300}") {
            if let Ok(route) = parse_route(&path, 255) {
                let re = name_regex();
                match route {
                    Route::Base => prop_assert!(path == "/v2" || path == "/v2/"),
                    Route::Manifest { name, reference } => {
                        prop_assert!(re.is_match(&name));
                        if let Reference::Tag(t) = reference {
                            let tag_re = regex_lite::Regex::new(r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$").unwrap();
                            prop_assert!(tag_re.is_match(&t));
                        }
                    }
                    Route::Blob { name, .. } | Route::TagsList { name } | Route::Referrers { name, .. } => prop_assert!(re.is_match(&name)),
                }
            }
        }

        #[test]
        fn grammar_names_are_accepted(name in "[a-z0-9]{1,5}((\\.|_|__|-{1,3})[a-z0-9]{1,5}){0,2}(/[a-z0-9]{1,5}((\\.|_|__|-{1,3})[a-z0-9]{1,5}){0,2}){0,3}") {
            let path = format!("/v2/{name}/manifests/latest");
            prop_assert_eq!(
                parse_route(&path, 255),
                Ok(Route::Manifest { name: name.clone(), reference: Reference::Tag("latest".into()) })
            );
        }

        #[test]
        fn digest_parser_never_panics(s in "\\PC{0,100}") {
            if let Ok(d) = Digest::parse(&s) {
                prop_assert_eq!(d.to_string(), s);
            }
        }
    }
}
