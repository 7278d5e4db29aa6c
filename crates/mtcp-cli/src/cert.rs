//! `mtcp cert`: makes a cluster CA and a certificate for each server of a cluster file, and the
//! `[tls]` section that points at them (decision 45). A server's certificate names its id (a
//! DNS name: peers and `mtcp drain` check it) and the hosts of its data, peer and admin
//! addresses (agents check the address they dial). The CA's key stays in the output directory
//! (mode 0600): run the command again after adding a server and the same CA signs the new
//! certificate, so agents need no new CA file.

use anyhow::{bail, Context, Result};
use clap::Args;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Args, Debug, Clone)]
pub struct CertArgs {
    /// Cluster file: a certificate is made for each of its servers.
    #[arg(long)]
    pub cluster: PathBuf,
    /// Where to write `ca.crt`, `ca.key` and `<id>.crt` / `<id>.key` (default: `tls` beside the
    /// cluster file). An existing `ca.key` there is reused.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Only these servers (default: every server of the cluster file).
    #[arg(long, value_delimiter = ',')]
    pub ids: Vec<String>,
    /// Days the server certificates are valid (the CA: ten years).
    #[arg(long, default_value_t = 825)]
    pub days: u32,
    /// More names (DNS names or IP addresses) for every server certificate, e.g. a host name
    /// agents dial instead of an address in the cluster file.
    #[arg(long, value_delimiter = ',')]
    pub san: Vec<String>,
    /// Append the `[tls]` section to the cluster file (refused if it has one already);
    /// without it the section is printed.
    #[arg(long)]
    pub update_cluster: bool,
}

const CA_NAME: &str = "M-TCP cluster CA";

/// The CA's parameters, derived from its key alone, so a CA key found on disk signs as before.
/// The name carries a digest of the public key: two clusters' CAs never share a name, and a
/// certificate of the other one is refused as from an unknown issuer, not checked against the
/// wrong key.
fn ca_params(key: &KeyPair) -> Result<CertificateParams> {
    use sha2::Digest;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    let digest = sha2::Sha256::digest(key.public_key_raw());
    dn.push(
        DnType::CommonName,
        format!("{CA_NAME} {}", hex::encode(&digest[..8])),
    );
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(p)
}

/// The host part of `host:port` (brackets of an IPv6 address removed).
fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':')
        .map_or(addr, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']')
}

/// Writes `text` to `path`, readable by its owner only when `secret`.
fn write_file(path: &Path, text: &str, secret: bool) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    if secret {
        o.mode(0o600);
    }
    let mut f = o
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

pub fn run(a: &CertArgs) -> Result<()> {
    let cluster = mtcp::Cluster::load(&a.cluster)?;
    let base = a.cluster.parent().unwrap_or(Path::new("."));
    let out = a.out.clone().unwrap_or_else(|| base.join("tls"));
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let now = time::OffsetDateTime::now_utc();
    // An hour back: servers whose clocks are a little behind accept it at once.
    let from = now - time::Duration::hours(1);

    let (ca_crt, ca_key) = (out.join("ca.crt"), out.join("ca.key"));
    let (ca_kp, made_ca) = if ca_key.exists() && ca_crt.exists() {
        let pem = std::fs::read_to_string(&ca_key)
            .with_context(|| format!("cannot read {}", ca_key.display()))?;
        let kp = KeyPair::from_pem(&pem)
            .with_context(|| format!("{}: not a private key", ca_key.display()))?;
        (kp, false)
    } else {
        let kp = KeyPair::generate()?;
        let mut p = ca_params(&kp)?;
        p.not_before = from;
        p.not_after = now + time::Duration::days(3650);
        let cert = p.self_signed(&kp)?;
        write_file(&ca_crt, &cert.pem(), false)?;
        write_file(&ca_key, &kp.serialize_pem(), true)?;
        (kp, true)
    };
    let issuer = Issuer::new(ca_params(&ca_kp)?, ca_kp);

    let servers: Vec<_> = if a.ids.is_empty() {
        cluster.servers.clone()
    } else {
        let mut v = Vec::new();
        for id in &a.ids {
            v.push(
                cluster
                    .require(id, &a.cluster.display().to_string())?
                    .clone(),
            );
        }
        v
    };
    for s in &servers {
        if mtcp::tls::name_of_id(&s.id).is_err() {
            bail!(
                "server id {:?} is not a DNS name, which its certificate must carry (peers check it): use letters, digits, '-' and '.'",
                s.id
            );
        }
        let mut names = vec![s.id.clone()];
        for addr in [&s.data, &s.peer, &s.admin] {
            let h = host_of(addr).to_string();
            if !names.contains(&h) {
                names.push(h);
            }
        }
        for extra in &a.san {
            if !names.contains(extra) {
                names.push(extra.clone());
            }
        }
        let mut p = CertificateParams::new(names.clone())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, s.id.as_str());
        p.distinguished_name = dn;
        p.not_before = from;
        p.not_after = now + time::Duration::days(i64::from(a.days));
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.use_authority_key_identifier_extension = true;
        let kp = KeyPair::generate()?;
        let cert = p.signed_by(&kp, &issuer)?;
        write_file(&out.join(format!("{}.crt", s.id)), &cert.pem(), false)?;
        write_file(
            &out.join(format!("{}.key", s.id)),
            &kp.serialize_pem(),
            true,
        )?;
        println!(
            "{}: {}.crt, {}.key (names: {})",
            s.id,
            s.id,
            s.id,
            names.join(", ")
        );
    }
    println!(
        "CA: {} ({}); give agents --tls-ca {}",
        ca_crt.display(),
        if made_ca { "new" } else { "reused" },
        ca_crt.display()
    );
    // Paths in the section are relative to the cluster file when the output is beside it.
    let rel = out
        .strip_prefix(base)
        .map(Path::to_path_buf)
        .unwrap_or_else(|_| out.clone());
    let section = format!(
        "\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        rel.join("ca.crt").display(),
        rel.join("{id}.crt").display(),
        rel.join("{id}.key").display()
    );
    if a.update_cluster {
        if cluster.tls.is_some() {
            bail!(
                "{} already has a [tls] section; certificates written, the file left as it is",
                a.cluster.display()
            );
        }
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&a.cluster)
            .with_context(|| format!("cannot append to {}", a.cluster.display()))?;
        f.write_all(section.as_bytes())?;
        println!("added [tls] to {}", a.cluster.display());
    } else if cluster.tls.is_none() {
        println!("add to {}:{section}", a.cluster.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_of_addresses() {
        assert_eq!(host_of("127.0.0.1:7001"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7001"), "::1");
        assert_eq!(host_of("db.example:7001"), "db.example");
    }
}
