//! kubesim's certificates: a CA, the API server's serving certificate, and client certificates whose
//! subject names the user (CN) and groups (O), as the apiserver's x509 authenticator reads them (kubesim
//! writes all groups into one O, comma-separated, and reads them back so).

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};

use crate::api::User;

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

    /// A client certificate for `user`.
    ///
    /// # Errors
    ///
    /// A CA that cannot sign.
    pub fn client(&self, user: &User) -> Result<Pair, PkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, user.name.as_str());
        if !user.groups.is_empty() {
            // rcgen keeps one value per attribute type, so groups share one O, comma-separated.
            dn.push(DnType::OrganizationName, user.groups.join(","));
        }
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
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

/// The user a verified client certificate names: CN is the user, each O a group.
pub fn user_of(der: &[u8]) -> Option<User> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let name = subject.iter_common_name().next()?.as_str().ok()?.to_owned();
    let mut groups: Vec<String> = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok())
        .flat_map(|o| o.split(','))
        .filter(|g| !g.is_empty())
        .map(str::to_owned)
        .collect();
    groups.push("system:authenticated".into());
    Some(User { name, groups })
}

/// The groups Kubernetes gives a service account user `system:serviceaccount:NS:NAME`.
pub fn service_account_groups(user: &str) -> Vec<String> {
    match user
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
    {
        Some((ns, _)) => vec!["system:serviceaccounts".into(), format!("system:serviceaccounts:{ns}")],
        None => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    #[test]
    fn a_client_certificate_names_its_user_and_groups() {
        let ca = Ca::generate().unwrap();
        let user = User {
            name: "system:serviceaccount:turnout-system:turnout".into(),
            groups: service_account_groups("system:serviceaccount:turnout-system:turnout"),
        };
        let pair = ca.client(&user).unwrap();
        let der = CertificateDer::from_pem_slice(pair.cert_pem.as_bytes()).unwrap();
        let got = user_of(&der).unwrap();
        assert_eq!(got.name, user.name);
        assert_eq!(
            got.groups,
            vec![
                "system:serviceaccounts",
                "system:serviceaccounts:turnout-system",
                "system:authenticated"
            ]
        );
    }
}
