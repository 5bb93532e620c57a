//! Who may pull and build: the Docker token flow as docker, podman and containerd
//! run it. Registry routes answer 401 with a Bearer challenge; the registry's own
//! `/token` takes Basic credentials (users of an htpasswd file) or none, and issues
//! a short-lived JWT; registry routes then accept that token (or the Basic
//! credentials themselves, for curl).
//!
//! With no `auth` key set this module is not used and nothing changes.

pub mod htpasswd;
pub mod token;

use crate::config::AuthSettings;
use htpasswd::Htpasswd;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use token::{Claims, ExternalIssuer, TokenKey};

/// What callers without credentials may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anonymous {
    /// Pull and build, as without authentication.
    Build,
    /// Pull images already built.
    Pull,
    /// Nothing.
    None,
}

/// The realm of the Basic challenge of `/token` and the status pages.
pub const BASIC_CHALLENGE: &str = r#"Basic realm="nixery""#;

/// How long a password that matched is remembered, so a pull that fetches several
/// tokens costs one bcrypt check.
const LOGIN_MEMORY: Duration = Duration::from_secs(60);

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    User(String),
    Anonymous,
}

impl Caller {
    pub fn user(&self) -> Option<&str> {
        match self {
            Caller::User(u) => Some(u),
            Caller::Anonymous => None,
        }
    }
}

/// What an `Authorization` header holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    None,
    Basic {
        user: String,
        password: String,
    },
    Bearer(String),
    /// Present but unreadable.
    Malformed,
}

impl Credentials {
    pub fn parse(header: Option<&[u8]>) -> Credentials {
        use base64::Engine;
        let Some(raw) = header else {
            return Credentials::None;
        };
        let Ok(text) = std::str::from_utf8(raw) else {
            return Credentials::Malformed;
        };
        let (scheme, value) = text.trim().split_once(' ').unwrap_or((text.trim(), ""));
        let value = value.trim();
        if scheme.eq_ignore_ascii_case("bearer") && !value.is_empty() {
            return Credentials::Bearer(value.to_string());
        }
        if scheme.eq_ignore_ascii_case("basic") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(value)
                .ok()
                .and_then(|d| String::from_utf8(d).ok());
            return match decoded.as_deref().and_then(|d| d.split_once(':')) {
                // skopeo and podman send empty credentials when they have none.
                Some(("", "")) => Credentials::None,
                Some((user, password)) => Credentials::Basic {
                    user: user.to_string(),
                    password: password.to_string(),
                },
                None => Credentials::Malformed,
            };
        }
        Credentials::Malformed
    }
}

/// Why a caller is turned away; the HTTP layer adds the challenge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("authentication required")]
    NoCredentials,
    #[error("invalid username or password")]
    BadPassword,
    #[error("unreadable Authorization header")]
    Malformed,
    #[error("invalid token: {0}")]
    BadToken(String),
    #[error("the token does not grant pull of {0}")]
    NotGranted(String),
}

/// The answer of `/token`, as the token spec names its fields.
#[derive(Debug, Serialize)]
pub struct TokenResponse {
    pub token: String,
    pub access_token: String,
    pub expires_in: u64,
    pub issued_at: String,
}

pub struct Auth {
    users: Option<Htpasswd>,
    /// Signs and checks this registry's own tokens; None when only an external
    /// token service issues them.
    key: Option<TokenKey>,
    external: Option<ExternalIssuer>,
    pub anonymous: Anonymous,
    pub service: String,
    /// The token endpoint's URL; empty: `/token` of the host a request named.
    realm: String,
    ttl_secs: u64,
    logins: Mutex<HashMap<[u8; 32], Instant>>,
}

impl Auth {
    /// None when no `auth` key is set: everyone may pull and build.
    pub fn from_settings(s: &AuthSettings) -> Result<Option<Auth>, String> {
        let external = match s.issuer_key.as_str() {
            "" => None,
            path => {
                let pem =
                    std::fs::read(path).map_err(|e| format!("auth.issuer_key {path}: {e}"))?;
                if s.issuer.is_empty() || s.realm.is_empty() {
                    return Err("auth.issuer and auth.realm: required with auth.issuer_key (the token service's name in its tokens, and its URL)".into());
                }
                Some(
                    ExternalIssuer::new(&pem, &s.issuer, &s.service)
                        .map_err(|e| format!("auth.issuer_key {path}: {e}"))?,
                )
            }
        };
        let anonymous = match (
            s.anonymous.as_str(),
            s.htpasswd.is_empty() && external.is_none(),
        ) {
            ("", true) | ("build", true) => return Ok(None),
            ("build", false) => Anonymous::Build,
            ("", false) | ("pull", _) => Anonymous::Pull,
            ("none", _) => Anonymous::None,
            (other, _) => {
                return Err(format!(
                    "auth.anonymous: {other:?} is not one of build, pull, none"
                ))
            }
        };
        // An external token service alone needs no key of ours: it issues every token.
        let key = match (s.token_key.as_str(), &external) {
            ("", Some(_)) if s.htpasswd.is_empty() => None,
            ("", _) => return Err(
                "auth.token_key: required with authentication: a file of at least 32 random bytes, the same for every replica (e.g. head -c 32 /dev/urandom)".into(),
            ),
            (path, _) => {
                let secret =
                    std::fs::read(path).map_err(|e| format!("auth.token_key {path}: {e}"))?;
                Some(
                    TokenKey::new(&secret, &s.service)
                        .map_err(|e| format!("auth.token_key {path}: {e}"))?,
                )
            }
        };
        let users = if s.htpasswd.is_empty() {
            None
        } else {
            Some(Htpasswd::open(s.htpasswd.clone().into())?)
        };
        Ok(Some(Auth {
            users,
            key,
            external,
            anonymous,
            service: s.service.clone(),
            realm: s.realm.clone(),
            ttl_secs: s.token_ttl_secs,
            logins: Mutex::new(HashMap::new()),
        }))
    }

    /// Whether this registry issues tokens itself (and so answers `/token`).
    pub fn issues_tokens(&self) -> bool {
        self.key.is_some()
    }

    /// The claims of a token this registry or the external issuer signed.
    fn verify(&self, token: &str) -> Result<Claims, String> {
        let own = token::algorithm(token) == Some(jsonwebtoken::Algorithm::HS256);
        match (own, &self.key, &self.external) {
            (true, Some(key), _) => key.verify(token),
            (false, _, Some(external)) => external.verify(token),
            _ => Err("not signed by a key this registry accepts".into()),
        }
    }

    /// The challenge of a registry route: where to get a token, for which service
    /// and scope. The parameters are joined by commas without spaces, the only form
    /// Go clients parse.
    pub fn challenge(&self, base_url: &str, repository: Option<&str>) -> String {
        let realm = if self.realm.is_empty() {
            format!("{base_url}/token")
        } else {
            self.realm.clone()
        };
        let mut c = format!(
            r#"Bearer realm="{}",service="{}""#,
            quote(&realm),
            quote(&self.service)
        );
        if let Some(name) = repository {
            c.push_str(&format!(r#",scope="repository:{}:pull""#, quote(name)));
        }
        c
    }

    /// The user Basic credentials name, once the password is checked; the check runs
    /// on a blocking thread since bcrypt is slow by design.
    pub async fn login(&self, user: &str, password: &str) -> Result<Caller, Denied> {
        let hash = self
            .users
            .as_ref()
            .and_then(|u| u.hash_of(user))
            .ok_or(Denied::BadPassword)?;
        let memo: [u8; 32] = {
            let material = [user.as_bytes(), password.as_bytes(), hash.as_bytes()].join(&0u8);
            let d = ring::digest::digest(&ring::digest::SHA256, &material);
            d.as_ref().try_into().expect("32 bytes")
        };
        {
            let mut logins = self.logins.lock().expect("logins lock");
            logins.retain(|_, at| at.elapsed() < LOGIN_MEMORY);
            if logins.contains_key(&memo) {
                return Ok(Caller::User(user.to_string()));
            }
        }
        let password = password.to_string();
        let ok = actix_web::rt::task::spawn_blocking(move || htpasswd::verify(&password, &hash))
            .await
            .unwrap_or(false);
        if !ok {
            return Err(Denied::BadPassword);
        }
        self.logins
            .lock()
            .expect("logins lock")
            .insert(memo, Instant::now());
        Ok(Caller::User(user.to_string()))
    }

    /// The caller of a registry route naming `repository` (None for `/v2/`).
    pub async fn caller(
        &self,
        credentials: &Credentials,
        repository: Option<&str>,
    ) -> Result<Caller, Denied> {
        match credentials {
            // Anonymous callers fetch a token too (docker always does), under
            // every policy; without one they get the challenge that sends them there.
            Credentials::None => Err(Denied::NoCredentials),
            Credentials::Malformed => Err(Denied::Malformed),
            Credentials::Basic { user, password } => self.login(user, password).await,
            Credentials::Bearer(token) => {
                let claims = self.verify(token).map_err(Denied::BadToken)?;
                if let Some(name) = repository {
                    if !claims.may_pull(name) {
                        return Err(Denied::NotGranted(name.to_string()));
                    }
                }
                if claims.sub.is_empty() {
                    if self.anonymous == Anonymous::None {
                        return Err(Denied::NoCredentials);
                    }
                    Ok(Caller::Anonymous)
                } else {
                    Ok(Caller::User(claims.sub))
                }
            }
        }
    }

    /// The caller `/token` issues a token to: a user whose password matches, or an
    /// anonymous caller where the policy lets them in.
    pub async fn token_caller(&self, credentials: &Credentials) -> Result<Caller, Denied> {
        match credentials {
            Credentials::None if self.anonymous == Anonymous::None => Err(Denied::NoCredentials),
            Credentials::None => Ok(Caller::Anonymous),
            Credentials::Basic { user, password } => self.login(user, password).await,
            Credentials::Bearer(_) | Credentials::Malformed => Err(Denied::Malformed),
        }
    }

    /// A token for `caller` granting pull of the repositories in `scopes`; None
    /// where an external service issues the tokens.
    pub fn issue<'a>(
        &self,
        caller: &Caller,
        scopes: impl IntoIterator<Item = &'a str>,
    ) -> Option<TokenResponse> {
        let key = self.key.as_ref()?;
        let now = crate::storage::unix_now();
        let jti = {
            use rand::Rng;
            hex::encode(rand::rng().random::<[u8; 16]>())
        };
        let claims = Claims {
            iss: token::ISSUER.into(),
            sub: caller.user().unwrap_or("").into(),
            aud: self.service.clone(),
            exp: now + self.ttl_secs,
            nbf: now,
            iat: now,
            jti,
            access: token::pull_scopes(scopes),
        };
        let token = key.sign(&claims);
        Some(TokenResponse {
            access_token: token.clone(),
            token,
            expires_in: self.ttl_secs,
            issued_at: rfc3339(now),
        })
    }

    /// Whether the caller may have new images built.
    pub fn may_build(&self, caller: &Caller) -> bool {
        match caller {
            Caller::User(_) => true,
            Caller::Anonymous => self.anonymous == Anonymous::Build,
        }
    }
}

/// A header parameter value: the quote and backslash escaped.
fn quote(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Seconds since the epoch as `2026-11-29T23:58:05Z`.
fn rfc3339(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(htpasswd: &str, anonymous: &str, key: &str) -> AuthSettings {
        AuthSettings {
            htpasswd: htpasswd.into(),
            token_key: key.into(),
            anonymous: anonymous.into(),
            service: "nixery".into(),
            token_ttl_secs: 300,
            realm: String::new(),
            metrics_token: String::new(),
            issuer: String::new(),
            issuer_key: String::new(),
        }
    }

    #[test]
    fn credentials_as_clients_send_them() {
        let basic = |s: &str| {
            use base64::Engine;
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(s)
            )
        };
        let p = |h: &str| Credentials::parse(Some(h.as_bytes()));
        assert_eq!(Credentials::parse(None), Credentials::None);
        assert_eq!(p(&basic(":")), Credentials::None);
        assert_eq!(
            p(&basic("alice:pa:ss")),
            Credentials::Basic {
                user: "alice".into(),
                password: "pa:ss".into()
            }
        );
        assert_eq!(
            p("Bearer abc.def.ghi"),
            Credentials::Bearer("abc.def.ghi".into())
        );
        for bad in [
            "Basic !!!",
            "Basic",
            &basic("nocolon"),
            "Bearer",
            "Digest x",
            "",
        ] {
            assert_eq!(p(bad), Credentials::Malformed, "{bad:?}");
        }
        assert_eq!(
            Credentials::parse(Some(&[0xff, 0xfe])),
            Credentials::Malformed
        );
    }

    #[test]
    fn the_challenge_is_comma_separated() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, [1u8; 32]).unwrap();
        let auth = Auth::from_settings(&settings("", "pull", key.to_str().unwrap()))
            .unwrap()
            .unwrap();
        assert_eq!(
            auth.challenge("http://127.0.0.1:8080", Some("shell/git")),
            r#"Bearer realm="http://127.0.0.1:8080/token",service="nixery",scope="repository:shell/git:pull""#
        );
        assert_eq!(
            auth.challenge("https://r.example", None),
            r#"Bearer realm="https://r.example/token",service="nixery""#
        );
    }

    #[test]
    fn policies_follow_the_settings() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, [1u8; 32]).unwrap();
        let users = dir.path().join("htpasswd");
        std::fs::write(&users, "").unwrap();
        let (k, u) = (key.to_str().unwrap(), users.to_str().unwrap());
        assert!(Auth::from_settings(&settings("", "", ""))
            .unwrap()
            .is_none());
        assert!(Auth::from_settings(&settings("", "build", ""))
            .unwrap()
            .is_none());
        let anon = |h, a| {
            Auth::from_settings(&settings(h, a, k))
                .unwrap()
                .unwrap()
                .anonymous
        };
        assert_eq!(anon(u, ""), Anonymous::Pull);
        assert_eq!(anon(u, "build"), Anonymous::Build);
        assert_eq!(anon("", "none"), Anonymous::None);
        let e = Auth::from_settings(&settings(u, "", "")).err().unwrap();
        assert!(e.contains("auth.token_key"), "{e}");
        let e = Auth::from_settings(&settings(u, "sometimes", k))
            .err()
            .unwrap();
        assert!(e.contains("auth.anonymous"), "{e}");
    }

    #[actix_rt::test]
    async fn tokens_name_their_caller_and_repositories() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, [1u8; 32]).unwrap();
        let users = dir.path().join("htpasswd");
        std::fs::write(
            &users,
            format!("alice:{}\n", bcrypt::hash("pw", 4).unwrap()),
        )
        .unwrap();
        let auth = Auth::from_settings(&settings(
            users.to_str().unwrap(),
            "pull",
            key.to_str().unwrap(),
        ))
        .unwrap()
        .unwrap();
        let alice = Credentials::Basic {
            user: "alice".into(),
            password: "pw".into(),
        };
        let caller = auth.token_caller(&alice).await.unwrap();
        assert_eq!(caller, Caller::User("alice".into()));
        let wrong = Credentials::Basic {
            user: "alice".into(),
            password: "PW".into(),
        };
        assert_eq!(auth.token_caller(&wrong).await, Err(Denied::BadPassword));
        let t = auth.issue(&caller, ["repository:hello:pull"]).unwrap();
        assert_eq!(t.token, t.access_token);
        let bearer = Credentials::Bearer(t.token);
        assert_eq!(
            auth.caller(&bearer, Some("hello")).await,
            Ok(caller.clone())
        );
        assert_eq!(auth.caller(&bearer, None).await, Ok(caller.clone()));
        assert_eq!(
            auth.caller(&bearer, Some("cowsay")).await,
            Err(Denied::NotGranted("cowsay".into()))
        );
        let anonymous = auth.token_caller(&Credentials::None).await.unwrap();
        let t = auth.issue(&anonymous, ["repository:hello:pull"]).unwrap();
        let got = auth
            .caller(&Credentials::Bearer(t.token), Some("hello"))
            .await;
        assert_eq!(got, Ok(Caller::Anonymous));
        assert!(!auth.may_build(&Caller::Anonymous));
        assert!(auth.may_build(&caller));
    }

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_996_685), "2026-11-29T23:58:05Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
