//! File access on the blocking pool: opening under the root and reading body chunks.
//!
//! Chunks are read with positional reads into buffers the caller owns, so the server can read
//! chunk `n + 1` while it writes chunk `n`, with no seek state and no copy beyond the read itself.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use tokio::task::JoinHandle;

use crate::snapshot::Body;

/// Opens the regular file `rel` (normalized, relative) under `root`; `None` when there is no
/// such readable regular file (answered with 404). Symlinks are followed.
pub(crate) async fn open(root: &Path, rel: &str) -> io::Result<Option<(File, u64)>> {
    let path = root.join(rel);
    blocking(move || match open_regular(&path) {
        Ok(opened) => Ok(Some(opened)),
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "cannot serve file");
            Ok(None)
        }
    })
    .await
}

/// Reopens the file of a body being resumed from a snapshot. Its length must be the one the
/// response was planned with: a file that is now missing, shorter or longer has changed, and
/// sending from it could put different bytes on the wire.
///
/// Runs inline rather than on the blocking pool: opening is a metadata operation, and a resumed
/// connection's first byte waits for it (one thread hop less per migration).
pub(crate) fn reopen(root: &Path, body: &Body) -> io::Result<File> {
    let path = root.join(&body.path);
    let (file, len) = open_regular(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot resume {}: {e}", path.display())))?;
    if len != body.file_len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "cannot resume {}: its length is {len}, the response was started with {}",
                path.display(),
                body.file_len
            ),
        ));
    }
    Ok(file)
}

fn open_regular(path: &PathBuf) -> io::Result<(File, u64)> {
    // Check before opening: opening a FIFO or device could block or have side effects.
    if !std::fs::metadata(path)?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "not a regular file",
        ));
    }
    let file = File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "not a regular file",
        ));
    }
    Ok((file, meta.len()))
}

/// A chunk read in the background: the file back, the buffer, and whether it was filled.
pub(crate) type ChunkTask = JoinHandle<(File, Vec<u8>, io::Result<()>)>;

/// Reads exactly `len` bytes at `offset` into `buf[prefix..prefix + len]` (the first `prefix`
/// bytes of `buf` are kept). Running out of file is an error, never a short chunk.
pub(crate) fn spawn_read(
    file: File,
    mut buf: Vec<u8>,
    prefix: usize,
    offset: u64,
    len: usize,
) -> ChunkTask {
    tokio::task::spawn_blocking(move || {
        // Buffers are reused at full length, so this zero-fills only when a buffer grows.
        buf.resize(prefix + len, 0);
        let result = read_exact_at(&file, &mut buf[prefix..], offset).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "file became shorter while its response was being sent",
                )
            } else {
                e
            }
        });
        (file, buf, result)
    })
}

#[cfg(unix)]
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(not(unix))]
fn read_exact_at(mut file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(buf)
}

/// Turns a failed blocking task into an I/O error.
pub(crate) fn join_error(e: tokio::task::JoinError) -> io::Error {
    io::Error::other(format!("file task failed: {e}"))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(join_error)?
}
