//! One private test CA and a server certificate it signed, for the HTTPS
//! fakes of the tests (embedding service, schema registry). Test-only keys.

use std::sync::Arc;

/// Test CA (ECDSA P-256, valid 2000–2100) that signed [`LEAF_PEM`].
pub const CA_PEM: &str = "-----BEGIN CERTIFICATE-----
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

/// Server certificate for `127.0.0.1` and `localhost`, valid 2000–2100.
pub const LEAF_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBtzCCAV2gAwIBAgICEAEwCgYIKoZIzj0EAwIwHjEcMBoGA1UEAwwTSGFydG9u
b21vdXMgVGVzdCBDQTAgFw0wMDAxMDEwMDAwMDBaGA8yMTAwMDEwMTAwMDAwMFow
FDESMBAGA1UEAwwJbG9jYWxob3N0MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE
cLX9HS914YWRGQ/41QSXvZasyZK1GixvTa7l1Yx2Hf8dYzfutXwPEo0ivQq/IAN7
793FNrJiVdBnuck+z7uqdaOBkjCBjzAMBgNVHRMBAf8EAjAAMA4GA1UdDwEB/wQE
AwIHgDATBgNVHSUEDDAKBggrBgEFBQcDATAaBgNVHREEEzARhwR/AAABgglsb2Nh
bGhvc3QwHwYDVR0jBBgwFoAUpyuItPFBdut6wcgPqOuMYCzXaVMwHQYDVR0OBBYE
FIjW7JTSDsetAdi+ZEOJbAueehdmMAoGCCqGSM49BAMCA0gAMEUCIQCDiN3E5gZT
TN6AC+Lwldlz//RH0SbuH0ZSvXWuYzKLRQIgDqp1w59U/p77/69Ts79e55aUP5GB
TGbBeb+Ue6e7w7g=
-----END CERTIFICATE-----
";

/// Private key of [`LEAF_PEM`] (test-only).
pub const LEAF_KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg+g+BV5lUdRBuXYJH
KP87cE0joxn3yFaFM7CwFujSxu+hRANCAARwtf0dL3XhhZEZD/jVBJe9lqzJkrUa
LG9NruXVjHYd/x1jN+61fA8SjSK9Cr8gA3vv3cU2smJV0Ge5yT7Pu6p1
-----END PRIVATE KEY-----
";

pub fn server_tls_config() -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = vec![CertificateDer::from_pem_slice(LEAF_PEM.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(LEAF_KEY_PEM.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    Arc::new(config)
}
