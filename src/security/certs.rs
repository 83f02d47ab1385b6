//! `gen-certs`: a development CA and certificates for the master, the workers and clients,
//! so TLS can be turned on in one step.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use super::SecurityError;

/// Names every generated certificate is valid for, besides the caller's `hosts`.
const LOCAL_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// The files `generate` writes, relative to its directory.
pub const FILES: [&str; 8] = [
    "ca.pem",
    "ca.key",
    "master.pem",
    "master.key",
    "worker.pem",
    "worker.key",
    "client.pem",
    "client.key",
];

fn gen_err(e: rcgen::Error) -> SecurityError {
    SecurityError::Certs(e.to_string())
}

/// Writes a CA and node certificates into `dir` (created if needed). Every node certificate
/// is valid for localhost and for each of `hosts` (DNS names or IP addresses), and for both
/// server and client use, since daemons are both. Refuses to overwrite existing files.
pub fn generate(dir: &Path, hosts: &[String], days: u32) -> Result<Vec<String>, SecurityError> {
    let werr = |p: &Path| {
        let p = p.display().to_string();
        move |source| SecurityError::Write { path: p, source }
    };
    std::fs::create_dir_all(dir).map_err(werr(dir))?;
    for f in FILES {
        let p = dir.join(f);
        if p.exists() {
            return Err(SecurityError::Invalid(format!(
                "{} already exists; refusing to overwrite certificates",
                p.display()
            )));
        }
    }
    let not_before = time_now();
    let not_after = not_before + std::time::Duration::from_secs(u64::from(days) * 86_400);

    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "dfs development CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.not_before = not_before.into();
    ca_params.not_after = not_after.into();
    let ca_key = KeyPair::generate().map_err(gen_err)?;
    let ca_key_pem = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).map_err(gen_err)?;

    let mut written = Vec::new();
    write_file(dir, "ca.pem", &ca.pem(), false, &mut written)?;
    write_file(dir, "ca.key", &ca_key_pem, true, &mut written)?;

    let mut names: Vec<String> = LOCAL_NAMES.iter().map(|s| s.to_string()).collect();
    for h in hosts {
        if !names.contains(h) {
            names.push(h.clone());
        }
    }
    for role in ["master", "worker", "client"] {
        let mut p = CertificateParams::new(names.clone()).map_err(gen_err)?;
        p.distinguished_name
            .push(DnType::CommonName, format!("dfs {role}"));
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.not_before = not_before.into();
        p.not_after = not_after.into();
        let key = KeyPair::generate().map_err(gen_err)?;
        let cert = p.signed_by(&key, &ca).map_err(gen_err)?;
        write_file(
            dir,
            &format!("{role}.pem"),
            &cert.pem(),
            false,
            &mut written,
        )?;
        write_file(
            dir,
            &format!("{role}.key"),
            &key.serialize_pem(),
            true,
            &mut written,
        )?;
    }
    Ok(written)
}

fn time_now() -> std::time::SystemTime {
    // Back-date by an hour so a peer whose clock is slightly behind still accepts the files.
    std::time::SystemTime::now() - std::time::Duration::from_secs(3600)
}

fn write_file(
    dir: &Path,
    name: &str,
    text: &str,
    secret: bool,
    written: &mut Vec<String>,
) -> Result<(), SecurityError> {
    let path = dir.join(name);
    super::write_new_file(&path, text, if secret { 0o600 } else { 0o644 })?;
    written.push(path.display().to_string());
    Ok(())
}
