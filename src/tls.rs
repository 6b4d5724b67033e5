//! TLS shared by the HTTP clients (the ClickHouse store and the embedding
//! client): reading a `ca_file`, and recognising a rejected server
//! certificate in an error chain, so that each client can classify it as a
//! setup problem (fatal) rather than an outage.
//!
//! Every client uses rustls on the ring provider (no aws-lc C build) and
//! trusts the system's root certificates plus the PEM certificates of its
//! `ca_file`, if one is set.

use std::error::Error as StdError;
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// An HTTP client for one service at `root` (its scheme decides): rustls on
/// ring; for `https://` the system roots plus the certificates of
/// `ca_file`, for `http://` no certificate store at all, so a minimal
/// container without one still works. `attempt_timeout` is a backstop: the
/// callers enforce their deadlines on the injected clock. `what` names the
/// service in errors.
pub fn http_client(root: &str, ca_file: Option<&Path>, attempt_timeout: std::time::Duration, what: &str) -> Result<reqwest::Client, String> {
    use std::time::Duration;
    // reqwest is built with `rustls-no-provider`: pick ring for the
    // process. Fails harmlessly if a provider is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let extra_roots = match ca_file {
        Some(path) => read_ca_file(path)?
            .iter()
            .map(|der| reqwest::Certificate::from_der(der))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("ca_file `{}`: {}; give PEM CA certificate(s)", path.display(), crate::outcome::error_chain(&e)))?,
        None => Vec::new(),
    };
    let https = root.trim().to_ascii_lowercase().starts_with("https:");
    let client = reqwest::Client::builder()
        .connect_timeout(attempt_timeout.min(Duration::from_secs(10)))
        .timeout(attempt_timeout)
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(16)
        .tcp_nodelay(true)
        .tcp_keepalive(Duration::from_secs(60))
        .user_agent(concat!("hartonomous/", env!("CARGO_PKG_VERSION")));
    let client = if https { client.tls_certs_merge(extra_roots) } else { client.tls_certs_only(extra_roots) };
    client.build().map_err(|e| {
        let hint = if https { "; if the system has no CA certificates, set ca_file" } else { "" };
        format!("cannot build the HTTP client for {what}: {}{hint}", crate::outcome::error_chain(&e))
    })
}

/// Why an HTTP request got no answer, in the classes every HTTP client here
/// uses; each client words its own message around it.
#[derive(Debug, Clone, PartialEq)]
pub enum NoAnswer {
    /// The server's certificate is not trusted (unknown CA, expired, wrong
    /// host name): a setup problem. Holds the TLS error.
    Untrusted(String),
    /// The request could not be built or was redirected: a setup problem.
    /// Holds the error chain.
    Unusable(String),
    /// It may pass: `timed out: …`, `connection failed: …` or `request failed: …`.
    Transient(String),
}

/// Classifies a request that got no complete HTTP answer.
pub fn no_answer(e: &reqwest::Error) -> NoAnswer {
    if let Some(tls) = certificate_error(e) {
        return NoAnswer::Untrusted(tls);
    }
    let chain = crate::outcome::error_chain(e);
    if e.is_builder() || e.is_redirect() {
        return NoAnswer::Unusable(chain);
    }
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    NoAnswer::Transient(format!("{what}: {chain}"))
}

/// The crypto provider of every TLS client in this crate: ring.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads the PEM certificates of a `ca_file`. Fails, naming `ca_file`, the
/// path and the fix, when the file cannot be read, holds something that is
/// not a PEM certificate (a private key, DER bytes, a truncated block), or
/// holds no certificate at all. Blocks for one small file read.
pub fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    if path.as_os_str().is_empty() {
        return Err("ca_file is empty; give the path of a PEM file with the CA certificate(s), or remove ca_file".into());
    }
    let pem =
        std::fs::read(path).map_err(|e| format!("ca_file `{}` cannot be read ({e}); fix the path or remove ca_file", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>().map_err(|e| {
        format!(
            "ca_file `{}` is not a PEM certificate bundle ({e}); give PEM CA certificate(s) (-----BEGIN CERTIFICATE-----)",
            path.display()
        )
    })?;
    if certs.is_empty() {
        return Err(format!(
            "ca_file `{}` holds no PEM certificate; give the CA certificate(s) as -----BEGIN CERTIFICATE----- blocks, or remove ca_file",
            path.display()
        ));
    }
    // Each block must also parse as a trust anchor, so a garbled certificate
    // is reported here rather than as a handshake failure later.
    for (i, cert) in certs.iter().enumerate() {
        webpki_anchor(cert).map_err(|e| {
            format!("ca_file `{}`: certificate {} cannot be used as a root ({e}); give PEM CA certificate(s)", path.display(), i + 1)
        })?;
    }
    Ok(certs)
}

fn webpki_anchor(cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
    let mut store = rustls::RootCertStore::empty();
    store.add(cert.clone())
}

/// The roots a client trusts: the system's (read with `rustls-native-certs`;
/// unreadable system certificates are skipped) plus `extra`. Fails when the
/// result is empty, since no server certificate could then be trusted.
pub fn root_store(extra: Vec<CertificateDer<'static>>) -> Result<rustls::RootCertStore, String> {
    let mut store = rustls::RootCertStore::empty();
    let system = rustls_native_certs::load_native_certs();
    let (added, ignored) = store.add_parsable_certificates(system.certs);
    if ignored > 0 || !system.errors.is_empty() {
        tracing::debug!(added, ignored, errors = system.errors.len(), "some system root certificates could not be used");
    }
    for cert in extra {
        store.add(cert).map_err(|e| format!("a ca_file certificate cannot be used as a root ({e}); give PEM CA certificate(s)"))?;
    }
    if store.is_empty() {
        return Err("no root certificate to trust: the system has none (install ca-certificates) and ca_file is not set; \
                    set ca_file to the PEM file of the CA that signed the server's certificate"
            .into());
    }
    Ok(store)
}

/// The rustls error that rejected the server's certificate (unknown issuer,
/// expired, wrong host name, ...), if one is somewhere in the chain of `e`.
/// TLS errors arrive wrapped in `io::Error`s, whose `source()` skips the
/// wrapped error itself, so each `io::Error` is also unwrapped with `get_ref`.
pub fn certificate_error(e: &(dyn StdError + 'static)) -> Option<String> {
    rustls_error(e, |tls| matches!(tls, rustls::Error::InvalidCertificate(_)))
}

/// A rustls error saying the peer does not speak TLS at all (typically an
/// `https://` URL pointing at a plain-HTTP port), somewhere in the chain of `e`.
pub fn not_tls_error(e: &(dyn StdError + 'static)) -> Option<String> {
    rustls_error(e, |tls| matches!(tls, rustls::Error::InvalidMessage(_)))
}

fn rustls_error(e: &(dyn StdError + 'static), wanted: impl Fn(&rustls::Error) -> bool) -> Option<String> {
    let mut next: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = next {
        let mut inner: Option<&(dyn StdError + 'static)> = Some(err);
        while let Some(candidate) = inner {
            if let Some(tls) = candidate.downcast_ref::<rustls::Error>()
                && wanted(tls)
            {
                return Some(tls.to_string());
            }
            inner = candidate.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()).map(|e| e as &(dyn StdError + 'static));
        }
        next = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed test CA (ECDSA P-256), the same as tests/confluent_registry.rs uses.
    const CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBcTCCARagAwIBAgICEAAwCgYIKoZIzj0EAwIwHjEcMBoGA1UEAwwTSGFydG9u
b21vdXMgVGVzdCBDQTAgFw0wMDAxMDEwMDAwMDBaGA8yMTAwMDEwMTAwMDAwMFow
HjEcMBoGA1UEAwwTSGFydG9ub21vdXMgVGVzdCBDQTBZMBMGByqGSM49AgEGCCqG
SM49AwEHA0IABPhMYjT8cUxiIprpClLtC6H6Ptrmsqj4i61K/P7MdgKj46yl8U88
VkGWCtoFrF21OOaFzSNEAcY5ahLbjRPzojujQjBAMA8GA1UdEwEB/wQFMAMBAf8w
DgYDVR0PAQH/BAQDAgEGMB0GA1UdDgQWBBSnK4i08UF263rByA+o64xgLNdpUzAK
BggqhkjOPQQDAgNJADBGAiEAny4loud1lGVjOdUrDU0/t630XQLRc7p2HSbvPcGT
VCkCIQD3kYRNt4OoIyN9O7KS38lgaBBAeSwCmH7lIqn1nH9JwQ==
-----END CERTIFICATE-----
";

    #[test]
    fn ca_files_are_read_and_bad_ones_named() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("ca.pem");
        std::fs::write(&good, CA_PEM).unwrap();
        assert_eq!(read_ca_file(&good).unwrap().len(), 1);
        let two = dir.path().join("two.pem");
        std::fs::write(&two, format!("{CA_PEM}{CA_PEM}")).unwrap();
        assert_eq!(read_ca_file(&two).unwrap().len(), 2);

        let cases = [
            ("missing.pem", None, "cannot be read"),
            ("empty.pem", Some(String::new()), "holds no PEM certificate"),
            ("key.pem", Some("-----BEGIN PRIVATE KEY-----\nMIGHAgEA\n-----END PRIVATE KEY-----\n".into()), "holds no PEM certificate"),
            ("cut.pem", Some(CA_PEM.replace("-----END CERTIFICATE-----\n", "")), "not a PEM certificate bundle"),
            ("junk.pem", Some("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into()), "cannot be used as a root"),
        ];
        for (name, content, want) in cases {
            let path = dir.path().join(name);
            if let Some(content) = content {
                std::fs::write(&path, content).unwrap();
            }
            let err = read_ca_file(&path).unwrap_err();
            assert!(err.starts_with("ca_file") && err.contains(want) && err.contains(name), "{name}: {err}");
        }
        assert!(read_ca_file(Path::new("")).unwrap_err().starts_with("ca_file is empty"));
    }

    #[test]
    fn certificate_errors_are_found_inside_io_errors() {
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let wrapped = std::io::Error::other(std::io::Error::new(std::io::ErrorKind::InvalidData, tls));
        let found = certificate_error(&wrapped).expect("found");
        assert!(found.contains("UnknownIssuer"), "{found}");
        assert_eq!(not_tls_error(&wrapped), None);
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused");
        assert_eq!(certificate_error(&refused), None);
        let plain =
            std::io::Error::new(std::io::ErrorKind::InvalidData, rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType));
        assert!(not_tls_error(&plain).is_some());
    }
}
