//! `mtcp::config::Cluster::parse(text, path)` on arbitrary UTF-8: the cluster file an operator
//! writes. Parsing never panics; an accepted cluster is valid (at least one server, ids of 1 to
//! 64 characters and unique, heartbeat within 10 ms..10 s) and its lookups agree with it; a
//! refusal renders to a message naming the file.
//!
//! `key_file` is read from disk relative to the cluster file. The cluster file is placed in a
//! scratch directory holding a valid key file `key` and an invalid one `bad`, and inputs whose
//! `key_file` names anything outside that directory are skipped, so the fuzzer never reads
//! (or blocks on) arbitrary files such as `/dev/zero` or `/dev/stdin`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mtcp::config::{Cluster, ConfigError};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

fn cluster_path() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let dir = std::env::temp_dir().join("mtcp-fuzz-cluster");
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        std::fs::write(
            dir.join("key"),
            format!("{}\n", "0123456789abcdef".repeat(4)),
        )
        .expect("write key");
        std::fs::write(dir.join("bad"), "not a key\n").expect("write bad key");
        dir.join("cluster.toml")
    })
}

/// Whether `key_file` (if any) stays inside the scratch directory.
fn key_file_is_local(text: &str) -> bool {
    let Ok(table) = text.parse::<toml::Table>() else {
        // Not TOML: the parser refuses it before looking at `key_file`.
        return true;
    };
    match table.get("key_file") {
        Some(toml::Value::String(f)) => !f.contains(['/', '\\', '\0']) && f != "..",
        _ => true,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if !key_file_is_local(text) {
        return;
    }
    let path = cluster_path();
    match Cluster::parse(text, path) {
        Ok(c) => {
            assert!(!c.servers.is_empty(), "accepted a cluster without servers");
            assert!(
                c.heartbeat >= Duration::from_millis(10) && c.heartbeat <= Duration::from_secs(10)
            );
            for (i, s) in c.servers.iter().enumerate() {
                assert!(
                    !s.id.is_empty() && s.id.len() <= 64,
                    "server id {:?} accepted",
                    s.id
                );
                assert!(
                    c.servers[..i].iter().all(|o| o.id != s.id),
                    "duplicate id {:?}",
                    s.id
                );
                assert_eq!(c.server(&s.id), Some(s));
                assert_eq!(c.require(&s.id, "x").ok(), Some(s));
                let alt = c.alternates(&s.id);
                assert_eq!(alt.len(), c.servers.len() - 1);
                assert!(alt.iter().all(|a| a.id != s.id));
            }
        }
        Err(e) => {
            let msg = e.to_string();
            match &e {
                ConfigError::Parse { .. } | ConfigError::Invalid { .. } => {
                    assert!(msg.starts_with(&path.display().to_string()), "{msg}")
                }
                _ => assert!(!msg.is_empty()),
            }
        }
    }
});
