//! The test bed's certificates: a CA, serving certificates, and client certificates whose subject
//! names the user (CN) and group (O), as the API server's x509 authenticator reads them.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};

/// Why certificates could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot generate a certificate")]
    Generate(#[source] rcgen::Error),
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The CA, able to sign.
pub struct Ca {
    pub cert_pem: String,
    key_pem: String,
}

/// A certificate and its key, PEM.
#[derive(Clone, Debug)]
pub struct Pair {
    pub cert_pem: String,
    pub key_pem: String,
}

fn validity(params: &mut CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(365);
}

impl Ca {
    /// A new CA.
    ///
    /// # Errors
    ///
    /// Key generation failed.
    pub fn generate() -> Result<Self, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(PkiError::Generate)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "kubesim-ca");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::CrlSign,
        ];
        validity(&mut params);
        let cert = params.self_signed(&key).map_err(PkiError::Generate)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Loads `ca.crt` and `ca.key` from `dir`.
    ///
    /// # Errors
    ///
    /// Missing or unreadable files.
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        let read = |f: &str| {
            let path = dir.join(f);
            std::fs::read_to_string(&path).map_err(|source| PkiError::Read {
                path: path.display().to_string(),
                source,
            })
        };
        Ok(Self {
            cert_pem: read("ca.crt")?,
            key_pem: read("ca.key")?,
        })
    }

    /// Writes `ca.crt` and `ca.key` into `dir`.
    ///
    /// # Errors
    ///
    /// IO errors.
    pub fn save(&self, dir: &Path) -> Result<(), PkiError> {
        for (f, text) in [("ca.crt", &self.cert_pem), ("ca.key", &self.key_pem)] {
            let path = dir.join(f);
            std::fs::write(&path, text).map_err(|source| PkiError::Write {
                path: path.display().to_string(),
                source,
            })?;
        }
        Ok(())
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, PkiError> {
        let key = KeyPair::from_pem(&self.key_pem).map_err(PkiError::Generate)?;
        Issuer::from_ca_cert_pem(&self.cert_pem, key).map_err(PkiError::Generate)
    }

    /// A serving certificate for `hosts` (DNS names or IPs).
    ///
    /// # Errors
    ///
    /// Invalid host names, or a CA that cannot sign.
    pub fn serving(&self, hosts: &[String]) -> Result<Pair, PkiError> {
        let mut params = CertificateParams::new(hosts.to_vec()).map_err(PkiError::Generate)?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        validity(&mut params);
        self.sign(params)
    }

    /// A client certificate for `user` in at most one group (`O`), as the real API server reads them
    /// (one group per `O` attribute; rcgen writes one).
    ///
    /// # Errors
    ///
    /// A CA that cannot sign.
    pub fn client_in_group(&self, user: &str, group: Option<&str>) -> Result<Pair, PkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, user);
        if let Some(group) = group {
            dn.push(DnType::OrganizationName, group);
        }
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        validity(&mut params);
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Result<Pair, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(PkiError::Generate)?;
        let cert = params.signed_by(&key, &self.issuer()?).map_err(PkiError::Generate)?;
        Ok(Pair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A new ECDSA P-256 key pair, e.g. to sign service-account tokens: (private key as PKCS#8 PEM, public
/// key as SubjectPublicKeyInfo PEM).
///
/// # Errors
///
/// Key generation failed.
pub fn signing_key() -> Result<(String, String), PkiError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(PkiError::Generate)?;
    Ok((key.serialize_pem(), key.public_key_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject(pem: &str) -> (Vec<String>, Vec<String>) {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        let s = cert.subject();
        let text = |a: &x509_parser::x509::AttributeTypeAndValue<'_>| a.as_str().unwrap().to_owned();
        (
            s.iter_common_name().map(text).collect(),
            s.iter_organization().map(text).collect(),
        )
    }

    #[test]
    fn a_client_certificate_names_its_user_and_group() {
        let ca = Ca::generate().unwrap();
        let pair = ca.client_in_group("jane", Some("system:masters")).unwrap();
        assert_eq!(
            subject(&pair.cert_pem),
            (vec!["jane".into()], vec!["system:masters".into()])
        );
        let pair = ca.client_in_group("bob", None).unwrap();
        assert_eq!(subject(&pair.cert_pem), (vec!["bob".into()], vec![]));
    }
}
