//! Bearer tokens as the distribution token spec describes them: a JWT naming the
//! user and the repositories it may pull, signed with HS256 under a key every
//! replica shares, so any replica accepts a token another issued; or, where an
//! existing token service issues them, signed with that service's key.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Who issues tokens, in the `iss` claim.
pub const ISSUER: &str = "nixery";

/// Clock difference tolerated between replicas.
const LEEWAY_SECS: u64 = 5;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    /// The user; empty for an anonymous caller.
    pub sub: String,
    pub aud: String,
    pub exp: u64,
    pub nbf: u64,
    pub iat: u64,
    pub jti: String,
    pub access: Vec<Access>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

impl Claims {
    /// Whether the token lets its holder pull `repository`.
    pub fn may_pull(&self, repository: &str) -> bool {
        self.access.iter().any(|a| {
            a.kind == "repository" && a.name == repository && a.actions.iter().any(|x| x == "pull")
        })
    }
}

/// The repositories a `scope` parameter asks to pull, as the token grants them:
/// `repository:NAME:pull` (other actions and types are not granted).
pub fn pull_scopes<'a>(scopes: impl IntoIterator<Item = &'a str>) -> Vec<Access> {
    let mut access: Vec<Access> = Vec::new();
    for scope in scopes {
        let mut parts = scope.splitn(3, ':');
        let (Some("repository"), Some(name), Some(actions)) =
            (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if name.is_empty() || !actions.split(',').any(|a| a == "pull") {
            continue;
        }
        if !access.iter().any(|a| a.name == name) {
            access.push(Access {
                kind: "repository".into(),
                name: name.into(),
                actions: vec!["pull".into()],
            });
        }
    }
    access
}

pub struct TokenKey {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl TokenKey {
    /// A key of at least 32 bytes, for tokens of `service`.
    pub fn new(secret: &[u8], service: &str) -> Result<TokenKey, String> {
        if secret.len() < 32 {
            return Err(format!(
                "the token key has {} bytes; at least 32 are needed",
                secret.len()
            ));
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_audience(&[service]);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        Ok(TokenKey {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
        })
    }

    pub fn sign(&self, claims: &Claims) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.typ = Some("JWT".into());
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("HS256 signing cannot fail")
    }

    /// The claims of a token this key signed that is valid now; why not otherwise.
    /// Only HS256 is accepted, whatever the token's header says.
    pub fn verify(&self, token: &str) -> Result<Claims, String> {
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map(|t| t.claims)
            .map_err(|e| e.to_string())
    }
}

/// An existing token service (Harbor, GitLab, a distribution `auth` server) whose
/// tokens are accepted: its public key (RSA, EC or Ed25519, PEM) and issuer.
pub struct ExternalIssuer {
    decoding: DecodingKey,
    validation: Validation,
}

impl ExternalIssuer {
    pub fn new(public_key_pem: &[u8], issuer: &str, service: &str) -> Result<Self, String> {
        use Algorithm::*;
        let (decoding, algorithms) = if let Ok(k) = DecodingKey::from_ec_pem(public_key_pem) {
            (k, vec![ES256, ES384])
        } else if let Ok(k) = DecodingKey::from_rsa_pem(public_key_pem) {
            (k, vec![RS256, RS384, RS512, PS256, PS384, PS512])
        } else if let Ok(k) = DecodingKey::from_ed_pem(public_key_pem) {
            (k, vec![EdDSA])
        } else {
            return Err("not an RSA, EC or Ed25519 public key in PEM".into());
        };
        let mut validation = Validation::new(algorithms[0]);
        validation.algorithms = algorithms;
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_audience(&[service]);
        validation.set_issuer(&[issuer]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        Ok(ExternalIssuer {
            decoding,
            validation,
        })
    }

    /// The claims of a valid token of this issuer. The key's own family of
    /// algorithms only: an HS256 token "signed" with the public key is refused.
    pub fn verify(&self, token: &str) -> Result<Claims, String> {
        #[derive(Deserialize)]
        struct Loose {
            #[serde(default)]
            sub: String,
            #[serde(default)]
            access: Vec<Access>,
        }
        let data = jsonwebtoken::decode::<Loose>(token, &self.decoding, &self.validation)
            .map_err(|e| e.to_string())?;
        // Only what decides access is read; the rest was checked by validation.
        Ok(Claims {
            iss: String::new(),
            sub: data.claims.sub,
            aud: String::new(),
            exp: 0,
            nbf: 0,
            iat: 0,
            jti: String::new(),
            access: data.claims.access,
        })
    }
}

/// The algorithm a token's header names, if it has a readable header.
pub fn algorithm(token: &str) -> Option<Algorithm> {
    jsonwebtoken::decode_header(token).ok().map(|h| h.alg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(now: u64) -> Claims {
        Claims {
            iss: ISSUER.into(),
            sub: "alice".into(),
            aud: "nixery".into(),
            exp: now + 300,
            nbf: now,
            iat: now,
            jti: "1".into(),
            access: pull_scopes(["repository:hello:pull"]),
        }
    }

    fn now() -> u64 {
        crate::storage::unix_now()
    }

    #[test]
    fn a_signed_token_verifies_and_grants_its_repositories_only() {
        let key = TokenKey::new(&[7; 32], "nixery").unwrap();
        let token = key.sign(&claims(now()));
        let got = key.verify(&token).unwrap();
        assert!(got.may_pull("hello"));
        assert!(!got.may_pull("cowsay"));
        assert!(!got.may_pull("hell"));
    }

    #[test]
    fn expired_foreign_or_unsigned_tokens_are_refused() {
        let key = TokenKey::new(&[7; 32], "nixery").unwrap();
        let mut old = claims(now() - 1000);
        old.exp = now() - 100;
        assert!(key.verify(&key.sign(&old)).is_err());
        let other = TokenKey::new(&[8; 32], "nixery").unwrap();
        assert!(key.verify(&other.sign(&claims(now()))).is_err());
        let mut elsewhere = claims(now());
        elsewhere.aud = "other".into();
        assert!(key.verify(&key.sign(&elsewhere)).is_err());
        let mut stranger = claims(now());
        stranger.iss = "someone".into();
        assert!(key.verify(&key.sign(&stranger)).is_err());
        // alg "none": the signature part is empty.
        let token = key.sign(&claims(now()));
        let mut parts = token.split('.');
        let (_, body) = (parts.next(), parts.next().unwrap());
        let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{body}.");
        assert!(key.verify(&none).is_err());
        assert!(key.verify("garbage").is_err());
        assert!(TokenKey::new(&[1; 31], "nixery").is_err());
    }

    const EC_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQguaPVG7wnpbauMt78
6Xzu07PNhhYJH4v3yI/gMmySZiyhRANCAARHQqdr454guP+VAzmZH3noztfBmJS5
3H46Azd3hj7F5PmG+VPRrIj9UXrcsC2bjRrp3WA5Ehw+6N/ivmWAI5U9
-----END PRIVATE KEY-----
";
    const EC_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAER0Kna+OeILj/lQM5mR956M7XwZiU
udx+OgM3d4Y+xeT5hvlT0ayI/VF63LAtm40a6d1gORIcPujf4r5lgCOVPQ==
-----END PUBLIC KEY-----
";

    #[test]
    fn tokens_of_an_external_issuer_verify_with_its_public_key_only() {
        let issuer = ExternalIssuer::new(EC_PUBLIC.as_bytes(), "harbor", "nixery").unwrap();
        let private = EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap();
        let mut c = claims(now());
        c.iss = "harbor".into();
        let token = jsonwebtoken::encode(&Header::new(Algorithm::ES256), &c, &private).unwrap();
        assert_eq!(algorithm(&token), Some(Algorithm::ES256));
        let got = issuer.verify(&token).unwrap();
        assert!(got.may_pull("hello"));
        assert_eq!(got.sub, "alice");
        // Another issuer name, or HS256 keyed with the public key's bytes: refused.
        let mut other = c.clone();
        other.iss = "nixery".into();
        let token = jsonwebtoken::encode(&Header::new(Algorithm::ES256), &other, &private).unwrap();
        assert!(issuer.verify(&token).is_err());
        let confused = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &c,
            &EncodingKey::from_secret(EC_PUBLIC.as_bytes()),
        )
        .unwrap();
        assert!(issuer.verify(&confused).is_err());
        assert!(ExternalIssuer::new(b"nonsense", "harbor", "nixery").is_err());
    }

    #[test]
    fn scopes_grant_pull_of_repositories_only() {
        let got = pull_scopes([
            "repository:shell/git:pull",
            "repository:hello:push,pull",
            "repository:hello:pull",
            "repository:cowsay:push",
            "registry:catalog:*",
            "repository::pull",
            "nonsense",
        ]);
        let names: Vec<&str> = got.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["shell/git", "hello"]);
    }
}
