//! TLS with certificates that can be replaced while the server runs: each new
//! handshake takes the certificate read last; connections already open keep theirs.
//! The files are read again when they change (checked every second) or on SIGHUP;
//! a pair that does not load (half-written, key not matching) leaves the old one
//! in place until a good pair appears.

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

const RECHECK: Duration = Duration::from_secs(1);

/// The certificate and key files and what was read from them last.
#[derive(Debug)]
pub struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    /// Modification times and lengths of both files as last loaded.
    seen: Mutex<Fingerprint>,
}

type Fingerprint = [(SystemTime, u64); 2];

fn fingerprint(paths: [&Path; 2]) -> std::io::Result<Fingerprint> {
    let one = |p: &Path| -> std::io::Result<(SystemTime, u64)> {
        let m = std::fs::metadata(p)?;
        Ok((m.modified()?, m.len()))
    };
    Ok([one(paths[0])?, one(paths[1])?])
}

fn load(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect())
        .map_err(|e| format!("server.tls_cert {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "server.tls_cert {}: no certificate",
            cert.display()
        ));
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("server.tls_key {}: {e}", key.display()))?;
    CertifiedKey::from_der(chain, key_der, provider).map_err(|e| {
        format!(
            "server.tls_cert {} and server.tls_key {}: {e}",
            cert.display(),
            key.display()
        )
    })
}

impl ReloadingCert {
    pub fn open(cert_path: PathBuf, key_path: PathBuf) -> Result<Arc<ReloadingCert>, String> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let seen = fingerprint([&cert_path, &key_path])
            .map_err(|e| format!("server.tls_cert/server.tls_key: {e}"))?;
        let first = load(&cert_path, &key_path, &provider)?;
        Ok(Arc::new(ReloadingCert {
            cert_path,
            key_path,
            provider,
            current: RwLock::new(Arc::new(first)),
            seen: Mutex::new(seen),
        }))
    }

    /// The server configuration whose handshakes use this certificate.
    pub fn server_config(self: &Arc<Self>) -> Result<ServerConfig, String> {
        let config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        Ok(config)
    }

    /// Reads the files again if they changed since they were last loaded, or
    /// always when `force`. Returns whether a new certificate is in use.
    pub fn reload(&self, force: bool) -> bool {
        let now = match fingerprint([&self.cert_path, &self.key_path]) {
            Ok(f) => f,
            Err(e) => {
                log::warn!("TLS certificate files: {e}; keeping the current certificate");
                return false;
            }
        };
        if !force && *self.seen.lock().expect("tls lock") == now {
            return false;
        }
        match load(&self.cert_path, &self.key_path, &self.provider) {
            Ok(key) => {
                *self.current.write().expect("tls lock") = Arc::new(key);
                *self.seen.lock().expect("tls lock") = now;
                log::info!("TLS certificate reloaded from {}", self.cert_path.display());
                true
            }
            Err(e) => {
                // Files being replaced one after the other load as a mismatched
                // pair for a moment; the next check tries again.
                log::warn!("{e}; keeping the current certificate");
                false
            }
        }
    }

    /// Checks the files every second, and reloads on SIGHUP, for as long as the
    /// server runs.
    pub fn watch(self: &Arc<Self>) {
        let me = self.clone();
        actix_web::rt::spawn(async move {
            let mut hangup =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        log::warn!("cannot listen for SIGHUP: {e}");
                        None
                    }
                };
            loop {
                let force = match &mut hangup {
                    Some(h) => tokio::select! {
                        _ = h.recv() => true,
                        _ = tokio::time::sleep(RECHECK) => false,
                    },
                    None => {
                        tokio::time::sleep(RECHECK).await;
                        false
                    }
                };
                if force {
                    log::info!("SIGHUP: reading the TLS certificate again");
                }
                let m = me.clone();
                let _ = actix_web::rt::task::spawn_blocking(move || m.reload(force)).await;
            }
        });
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().expect("tls lock").clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_or_mismatched_files_are_reported_by_setting() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        let e = ReloadingCert::open(cert.clone(), key.clone()).unwrap_err();
        assert!(e.contains("server.tls_cert"), "{e}");
        std::fs::write(&cert, "not pem").unwrap();
        std::fs::write(&key, "not pem").unwrap();
        let e = ReloadingCert::open(cert, key).unwrap_err();
        assert!(e.contains("server.tls_cert"), "{e}");
    }
}
