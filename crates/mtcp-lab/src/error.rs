//! The lab's errors: one line each, saying what to do where the user can act.

use std::io;

/// Why a lab operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("mtcp lab needs root (network namespaces)")]
    NotRoot,
    #[error("`{tool}` not found: install {package} (apt-get install {package})")]
    MissingTool {
        tool: &'static str,
        package: &'static str,
    },
    #[error("/dev/net/tun is missing: the delay line needs TUN devices (modprobe tun)")]
    NoTun,
    #[error("bad lab tag {0:?}: use 1 to 10 lowercase letters or digits")]
    BadTag(String),
    #[error("unknown host {0:?}: use client, router or s1..sN")]
    UnknownHost(String),
    #[error("lab {tag:?} is in use by process {pid}; choose another tag or stop that process")]
    InUse { tag: String, pid: u32 },
    #[error("no lab {0:?} (see `mtcp lab status`)")]
    NoLab(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {detail}")]
    Command { what: String, detail: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

/// Result of a lab operation.
pub type Result<T> = std::result::Result<T, Error>;

/// `map_err` helper: an I/O error while doing `what`.
pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}
