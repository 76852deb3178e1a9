//! `turnout certs`: a throwaway CA and a serving certificate for the webhook (ECDSA P-256).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use time::{Duration, OffsetDateTime};

/// Generate a CA and a serving certificate signed by it.
#[derive(Clone, Debug, clap::Args)]
#[command(
    after_help = "Example:\n  turnout certs --dir certs --host turnout-webhook.turnout-system.svc --host 127.0.0.1"
)]
pub struct Args {
    /// Directory to write ca.crt, tls.crt and tls.key into (created if missing).
    #[arg(long, env = "TURNOUT_CERTS_DIR", default_value = "certs")]
    pub dir: PathBuf,
    /// A DNS name or IP address the serving certificate is valid for; repeat for more.
    #[arg(long = "host", required = true, value_name = "NAME")]
    pub hosts: Vec<String>,
    /// How many days the certificates are valid.
    #[arg(long, env = "TURNOUT_CERTS_DAYS", default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=3650))]
    pub days: u32,
    /// Replace files that already exist.
    #[arg(long)]
    pub force: bool,
}

/// Why certificates could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("at least one --host is needed")]
    NoHosts,
    #[error("--host {host:?} is neither a DNS name nor an IP address")]
    InvalidHost {
        host: String,
        #[source]
        source: rustls::pki_types::InvalidDnsNameError,
    },
    #[error("cannot generate the certificates")]
    Generate(#[source] rcgen::Error),
    #[error("refusing to overwrite {}; pass --force to replace existing files", .paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    Exists { paths: Vec<PathBuf> },
    #[error("cannot create the directory {dir}")]
    CreateDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// PEM texts of a generated CA and serving pair.
#[derive(Clone, Debug)]
pub struct Bundle {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// The files `turnout certs` writes, in the order it writes them.
pub const FILES: [&str; 3] = ["ca.crt", "tls.crt", "tls.key"];

/// Generates a CA and a serving certificate for `hosts`, valid for a year.
///
/// # Errors
///
/// `hosts` is empty or holds a name that is neither a DNS name nor an IP address.
pub fn generate(hosts: &[String]) -> Result<Bundle, CertsError> {
    generate_for_days(hosts, 365)
}

fn generate_for_days(hosts: &[String], days: u32) -> Result<Bundle, CertsError> {
    if hosts.is_empty() {
        return Err(CertsError::NoHosts);
    }
    for host in hosts {
        rustls::pki_types::ServerName::try_from(host.as_str()).map_err(|source| CertsError::InvalidHost {
            host: host.clone(),
            source,
        })?;
    }
    let now = OffsetDateTime::now_utc();
    let not_before = now - Duration::hours(1);
    let not_after = now + Duration::days(i64::from(days));

    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CertsError::Generate)?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name = name("turnout webhook CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = not_before;
    ca.not_after = not_after;
    let ca_cert = ca.self_signed(&ca_key).map_err(CertsError::Generate)?;
    let issuer = Issuer::new(ca, ca_key);

    let mut leaf = CertificateParams::new(hosts.to_vec()).map_err(CertsError::Generate)?;
    leaf.distinguished_name = name(&hosts[0]);
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.use_authority_key_identifier_extension = true;
    leaf.not_before = not_before;
    leaf.not_after = not_after;
    let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CertsError::Generate)?;
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).map_err(CertsError::Generate)?;

    Ok(Bundle {
        ca_pem: ca_cert.pem(),
        cert_pem: leaf_cert.pem(),
        key_pem: leaf_key.serialize_pem(),
    })
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "turnout");
    dn
}

/// Runs `turnout certs`: generates a bundle and writes it into `args.dir`.
///
/// # Errors
///
/// Invalid hosts, files that exist without `--force`, or a directory that cannot be written.
pub fn run(args: &Args) -> Result<Vec<PathBuf>, CertsError> {
    let bundle = generate_for_days(&args.hosts, args.days)?;
    write(&args.dir, &bundle, args.force)
}

/// Writes `bundle` into `dir` as [`FILES`]; the key is readable by its owner only.
///
/// # Errors
///
/// Existing files without `force`, or IO errors.
pub fn write(dir: &Path, bundle: &Bundle, force: bool) -> Result<Vec<PathBuf>, CertsError> {
    let paths: Vec<PathBuf> = FILES.iter().map(|f| dir.join(f)).collect();
    let existing: Vec<PathBuf> = paths.iter().filter(|p| p.exists()).cloned().collect();
    if !existing.is_empty() && !force {
        return Err(CertsError::Exists { paths: existing });
    }
    std::fs::create_dir_all(dir).map_err(|source| CertsError::CreateDir {
        dir: dir.to_owned(),
        source,
    })?;
    let contents = [&bundle.ca_pem, &bundle.cert_pem, &bundle.key_pem];
    for (path, text) in paths.iter().zip(contents) {
        let secret = path.ends_with("tls.key");
        write_atomically(path, text.as_bytes(), secret).map_err(|source| CertsError::Write {
            path: path.clone(),
            source,
        })?;
    }
    Ok(paths)
}

/// Writes through a temporary file and a rename, so a reader never sees half a file.
fn write_atomically(path: &Path, bytes: &[u8], secret: bool) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options.open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invalid_host_is_named() {
        let err = generate(&["not a host!".into()]).unwrap_err();
        assert!(err.to_string().contains("not a host!"), "{err}");
    }

    #[test]
    fn no_host_is_an_error() {
        assert!(matches!(generate(&[]), Err(CertsError::NoHosts)));
    }

    #[test]
    fn existing_files_are_kept_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = generate(&["localhost".into()]).unwrap();
        write(dir.path(), &bundle, false).unwrap();
        let before = std::fs::read(dir.path().join("tls.key")).unwrap();
        let other = generate(&["localhost".into()]).unwrap();
        let err = write(dir.path(), &other, false).unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
        assert_eq!(std::fs::read(dir.path().join("tls.key")).unwrap(), before);
        write(dir.path(), &other, true).unwrap();
        assert_ne!(std::fs::read(dir.path().join("tls.key")).unwrap(), before);
    }

    #[cfg(unix)]
    #[test]
    fn the_key_is_private_to_its_owner() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &generate(&["127.0.0.1".into()]).unwrap(), false).unwrap();
        let mode = std::fs::metadata(dir.path().join("tls.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
