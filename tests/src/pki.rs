//! The lab cluster's credentials: a CA, the API server's serving certificate and the
//! service-account signing key. Tokens identify most users (one line each in the token file);
//! client certificates identify those that Kubernetes expects to present one: kubelets
//! (`system:node:<name>` in `system:nodes`, for the Node authorizer) and the API server itself
//! when it calls kubelets.

use std::net::IpAddr;
use std::path::Path;

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

pub struct Pki {
    pub ca_pem: String,
}

/// A client certificate to issue: written as `<file>.crt` and `<file>.key`.
pub struct Client {
    pub file: String,
    /// The user name Kubernetes sees.
    pub common_name: String,
    /// The group Kubernetes sees (one: rcgen keeps one value per attribute type).
    pub organization: Option<String>,
}

fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// Writes `ca.crt`, `apiserver.crt`/`.key` (valid for `ips` and the usual service names),
/// `sa.key`/`sa.pub`, and a certificate and key per entry of `clients` into `dir`.
pub fn generate(dir: &Path, ips: &[IpAddr], clients: &[Client]) -> Result<Pki> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
    ca.distinguished_name
        .push(DnType::CommonName, "weft-lab CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).context("self-signing the CA")?;
    let issuer = Issuer::new(ca, ca_key);

    let names = [
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "localhost",
    ];
    let mut leaf = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .context("serving certificate parameters")?;
    leaf.subject_alt_names
        .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    leaf.distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    let leaf_key = KeyPair::generate().context("generating the serving key")?;
    let leaf_cert = leaf
        .signed_by(&leaf_key, &issuer)
        .context("signing the serving certificate")?;

    let sa_key = KeyPair::generate().context("generating the service-account key")?;

    for client in clients {
        let mut params = CertificateParams::new(Vec::<String>::new())
            .with_context(|| format!("{} certificate parameters", client.file))?;
        params
            .distinguished_name
            .push(DnType::CommonName, client.common_name.as_str());
        if let Some(org) = &client.organization {
            params
                .distinguished_name
                .push(DnType::OrganizationName, org.as_str());
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key =
            KeyPair::generate().with_context(|| format!("generating the {} key", client.file))?;
        let cert = params
            .signed_by(&key, &issuer)
            .with_context(|| format!("signing the {} certificate", client.file))?;
        let crt = dir.join(format!("{}.crt", client.file));
        std::fs::write(&crt, cert.pem()).with_context(|| format!("writing {}", crt.display()))?;
        write_private(
            &dir.join(format!("{}.key", client.file)),
            &key.serialize_pem(),
        )?;
    }

    let ca_pem = ca_cert.pem();
    std::fs::write(dir.join("ca.crt"), &ca_pem).context("writing ca.crt")?;
    std::fs::write(dir.join("apiserver.crt"), leaf_cert.pem()).context("writing apiserver.crt")?;
    write_private(&dir.join("apiserver.key"), &leaf_key.serialize_pem())?;
    write_private(&dir.join("sa.key"), &sa_key.serialize_pem())?;
    std::fs::write(dir.join("sa.pub"), sa_key.public_key_pem()).context("writing sa.pub")?;
    Ok(Pki { ca_pem })
}
