//! The snapshot decoder of `mtcp-httpd` (`inspect_snapshot`, which runs the same decode and
//! validation as a restart): the bytes a migrated connection resumes from. Decoding never
//! panics, wrong versions are refused, and an accepted Body snapshot describes a non-empty
//! body not yet fully sent, for a normalized path inside the root.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mtcp_httpd::fuzzing::normalize_path;
use mtcp_httpd::{inspect_snapshot, SnapshotInfo, SNAPSHOT_VERSION};

fuzz_target!(|data: &[u8]| {
    match inspect_snapshot(data) {
        Ok(info) => {
            assert_eq!(data[..2], SNAPSHOT_VERSION.to_be_bytes());
            match info {
                SnapshotInfo::Idle { leftover } => assert!(leftover < data.len()),
                SnapshotInfo::Body {
                    path,
                    sent,
                    len,
                    leftover,
                } => {
                    assert!(len > 0 && sent < len, "sent {sent} of {len}");
                    assert!(
                        !path.is_empty() && normalize_path(&path).as_deref() == Some(path.as_str()),
                        "path {path:?}"
                    );
                    assert!(leftover + path.len() < data.len());
                }
                _ => {}
            }
        }
        Err(e) => {
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
            assert!(!e.to_string().is_empty());
        }
    }
});
