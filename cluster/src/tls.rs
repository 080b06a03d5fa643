//! Mutual TLS for the node-to-node QUIC connection.
//!
//! Every node holds a certificate signed by the cluster CA and knows its
//! peer's name. The server side verifies the client chain against the CA
//! (rustls) and then pins the name; the client side verifies the server's
//! chain and name during the handshake. Anything else is refused and
//! counted by the caller. The ring provider is set explicitly so a stray
//! default feature elsewhere can never make the process-level provider
//! ambiguous.

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tandem_proto::ALPN;

#[derive(Debug)]
pub enum TlsError {
    Read { path: PathBuf, err: String },
    Config(String),
    Generate(String),
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::Read { path, err } => write!(f, "{}: {err}", path.display()),
            TlsError::Config(e) => write!(f, "TLS configuration: {e}"),
            TlsError::Generate(e) => write!(f, "certificate generation: {e}"),
        }
    }
}

impl std::error::Error for TlsError {}

/// This node's certificate chain and key, the cluster CA, and the name the
/// peer's certificate must carry.
pub struct TlsIdentity {
    pub ca: CertificateDer<'static>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub peer_name: String,
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        TlsIdentity {
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            peer_name: self.peer_name.clone(),
        }
    }
}

impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("chain_len", &self.chain.len())
            .field("peer_name", &self.peer_name)
            .finish_non_exhaustive()
    }
}

impl TlsIdentity {
    /// Loads PEM files named in the config.
    pub fn load(
        ca: &Path,
        cert: &Path,
        key: &Path,
        peer_name: &str,
    ) -> Result<TlsIdentity, TlsError> {
        let read = |p: &Path, e: rustls_pki_types::pem::Error| TlsError::Read {
            path: p.to_path_buf(),
            err: e.to_string(),
        };
        let ca_der = CertificateDer::from_pem_file(ca).map_err(|e| read(ca, e))?;
        let chain = CertificateDer::pem_file_iter(cert)
            .map_err(|e| read(cert, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| read(cert, e))?;
        if chain.is_empty() {
            return Err(TlsError::Read {
                path: cert.to_path_buf(),
                err: "no certificate in file".into(),
            });
        }
        let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| read(key, e))?;
        Ok(TlsIdentity {
            ca: ca_der,
            chain,
            key: key_der,
            peer_name: peer_name.to_string(),
        })
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.ca.clone())
            .map_err(|e| TlsError::Config(format!("cluster CA: {e}")))?;
        Ok(Arc::new(roots))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Transport settings shared by both ends: windows large enough that a bulk
/// export is not throttled by flow control on a LAN link, a keep-alive
/// under the idle timeout, and enough uni streams for one per RG.
pub fn transport(idle_timeout: Duration) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(idle_timeout.try_into().expect("idle timeout fits")));
    t.keep_alive_interval(Some(idle_timeout / 4));
    t.stream_receive_window((8u32 << 20).into());
    t.receive_window((32u32 << 20).into());
    t.send_window(32 << 20);
    t.max_concurrent_uni_streams(1024u32.into());
    t.max_concurrent_bidi_streams(16u32.into());
    Arc::new(t)
}

pub fn server_config(
    id: &TlsIdentity,
    idle_timeout: Duration,
) -> Result<quinn::ServerConfig, TlsError> {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(id.roots()?, provider())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain.clone(), id.key.clone_key())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    sc.transport_config(transport(idle_timeout));
    Ok(sc)
}

pub fn client_config(
    id: &TlsIdentity,
    idle_timeout: Duration,
) -> Result<quinn::ClientConfig, TlsError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(id.roots()?)
        .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
    let mut cc = quinn::ClientConfig::new(Arc::new(crypto));
    cc.transport_config(transport(idle_timeout));
    Ok(cc)
}

/// After a handshake, checks that the peer's (CA-verified) leaf certificate
/// is issued to `expected`. The server side needs this: rustls verifies a
/// client's chain but not its name.
pub fn verify_peer_name(conn: &quinn::Connection, expected: &str) -> Result<(), String> {
    let certs = conn
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or("peer presented no certificate")?;
    let leaf = certs.first().ok_or("peer presented an empty chain")?;
    let cert =
        webpki::EndEntityCert::try_from(leaf).map_err(|e| format!("peer certificate: {e}"))?;
    let name = ServerName::try_from(expected.to_string())
        .map_err(|e| format!("expected name {expected:?}: {e}"))?;
    cert.verify_is_valid_for_subject_name(&name)
        .map_err(|_| format!("peer certificate is not issued to {expected:?}"))
}

/// PEM text of a generated cluster PKI.
pub struct GeneratedPki {
    pub ca_cert_pem: String,
    /// (name, certificate PEM, key PEM) per node.
    pub nodes: Vec<(String, String, String)>,
}

/// A fresh cluster CA (Ed25519) and one certificate per node name, valid
/// for both client and server use. For the lab and tests; production sites
/// may bring their own PKI.
pub fn generate_pki(cluster: &str, node_names: &[&str]) -> Result<GeneratedPki, TlsError> {
    let gen_err = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(gen_err)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("tandem cluster {cluster} CA"));
    let ca_cert = ca_params.self_signed(&ca_key).map_err(gen_err)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let mut nodes = Vec::new();
    for name in node_names {
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(gen_err)?;
        let mut p = CertificateParams::new(vec![(*name).to_string()]).map_err(gen_err)?;
        p.distinguished_name.push(DnType::CommonName, *name);
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, &issuer).map_err(gen_err)?;
        nodes.push((name.to_string(), cert.pem(), key.serialize_pem()));
    }
    Ok(GeneratedPki {
        ca_cert_pem: ca_cert.pem(),
        nodes,
    })
}

/// Writes `ca.pem` and `<name>.pem` / `<name>.key` (mode 0600) into `dir`.
pub fn write_pki(dir: &Path, pki: &GeneratedPki) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("ca.pem"), &pki.ca_cert_pem)?;
    for (name, cert, key) in &pki.nodes {
        std::fs::write(dir.join(format!("{name}.pem")), cert)?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(dir.join(format!("{name}.key")))?;
        f.write_all(key.as_bytes())?;
    }
    Ok(())
}

/// Identities for a generated PKI without touching the filesystem.
pub fn identity_from_generated(
    pki: &GeneratedPki,
    node: &str,
    peer: &str,
) -> Result<TlsIdentity, TlsError> {
    let (_, cert, key) = pki
        .nodes
        .iter()
        .find(|(n, _, _)| n == node)
        .ok_or_else(|| TlsError::Config(format!("no certificate for {node}")))?;
    let pem_err = |e: rustls_pki_types::pem::Error| TlsError::Config(e.to_string());
    Ok(TlsIdentity {
        ca: CertificateDer::from_pem_slice(pki.ca_cert_pem.as_bytes()).map_err(pem_err)?,
        chain: vec![CertificateDer::from_pem_slice(cert.as_bytes()).map_err(pem_err)?],
        key: PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(pem_err)?,
        peer_name: peer.to_string(),
    })
}
