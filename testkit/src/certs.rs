//! Certificates made at run time for TLS tests (none are committed): a CA,
//! server certificates for given names/IPs, and client certificates.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A test certificate authority that writes PEM files into a directory.
pub struct TestCa {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    /// Path of the CA certificate (what `--tls-ca` takes).
    pub ca_pem: PathBuf,
}

/// A certificate and its key, as files.
pub struct CertFiles {
    /// PEM certificate (`--tls-cert`).
    pub cert: PathBuf,
    /// PEM private key (`--tls-key`).
    pub key: PathBuf,
}

impl TestCa {
    /// Creates a CA named `name` whose files live in `dir`.
    pub fn new(dir: &Path, name: &str) -> TestCa {
        std::fs::create_dir_all(dir).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let ca_pem = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&ca_pem, cert.pem()).unwrap();
        TestCa {
            dir: dir.to_path_buf(),
            issuer: Issuer::new(params, key),
            ca_pem,
        }
    }

    /// A channel to `addr` over TLS trusting this CA only, checking the
    /// server's certificate against `domain`.
    pub async fn channel(
        &self,
        addr: std::net::SocketAddr,
        domain: &str,
    ) -> tonic::transport::Channel {
        use tonic::transport::{Certificate, Channel, ClientTlsConfig};
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(std::fs::read(&self.ca_pem).unwrap()))
            .domain_name(domain);
        Channel::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// A server certificate valid for `names` (DNS names or IP addresses).
    pub fn server(&self, file_stem: &str, names: &[&str]) -> CertFiles {
        self.issue(file_stem, names, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate for mutual TLS.
    pub fn client(&self, file_stem: &str) -> CertFiles {
        self.issue(file_stem, &[file_stem], ExtendedKeyUsagePurpose::ClientAuth)
    }

    /// A certificate valid both as a server for `names` and as a client: a
    /// node host presents one certificate on its listener and to a registry
    /// that requires mutual TLS.
    pub fn server_and_client(&self, file_stem: &str, names: &[&str]) -> CertFiles {
        self.issue_for(
            file_stem,
            names,
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )
    }

    fn issue(&self, stem: &str, names: &[&str], usage: ExtendedKeyUsagePurpose) -> CertFiles {
        self.issue_for(stem, names, vec![usage])
    }

    fn issue_for(
        &self,
        stem: &str,
        names: &[&str],
        usages: Vec<ExtendedKeyUsagePurpose>,
    ) -> CertFiles {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, stem);
        params.extended_key_usages = usages;
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let files = CertFiles {
            cert: self.dir.join(format!("{stem}.pem")),
            key: self.dir.join(format!("{stem}-key.pem")),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }
}
