//! File access: opening under the root and reading body chunks.
//!
//! Opening and a response's first chunk, when the page cache holds it, run on the calling
//! thread; the rest of a body is read on the blocking pool. A hop to the pool and back is two
//! wake-ups across CPUs (~100–150 µs on the project's 2-vCPU machines), more than a cached
//! lookup or copy; for a small file it was two hops per GET (issue 13: the connection rate).
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
///
/// Runs inline, as [`reopen`] does: opening is a metadata operation.
pub(crate) fn open(root: &Path, rel: &str) -> Option<(File, u64)> {
    let path = root.join(rel);
    match open_regular(&path) {
        Ok(opened) => Some(opened),
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "cannot serve file");
            None
        }
    }
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

/// A chunk being read: the file back, the buffer, and whether it was filled.
pub(crate) enum ChunkTask {
    /// Read already, on the calling thread: every byte was in the page cache.
    Ready(Option<(File, Vec<u8>, io::Result<()>)>),
    /// Being read on the blocking pool.
    Pool(JoinHandle<(File, Vec<u8>, io::Result<()>)>),
}

impl ChunkTask {
    pub(crate) async fn done(self) -> io::Result<(File, Vec<u8>, io::Result<()>)> {
        match self {
            ChunkTask::Ready(r) => Ok(r.expect("a ready chunk is taken once")),
            ChunkTask::Pool(h) => h.await.map_err(join_error),
        }
    }
}

/// Reads exactly `len` bytes at `offset` into `buf[prefix..prefix + len]` (the first `prefix`
/// bytes of `buf` are kept) on the blocking pool. Running out of file is an error, never a
/// short chunk.
pub(crate) fn spawn_read(
    file: File,
    buf: Vec<u8>,
    prefix: usize,
    offset: u64,
    len: usize,
) -> ChunkTask {
    pool_read(file, buf, prefix + len, prefix, offset)
}

/// Reads `buf[at..size]` from `offset` on the blocking pool, `buf` grown to `size` there first
/// (buffers are reused at full length, so this zero-fills only when a buffer grows).
fn pool_read(file: File, mut buf: Vec<u8>, size: usize, at: usize, offset: u64) -> ChunkTask {
    ChunkTask::Pool(tokio::task::spawn_blocking(move || {
        buf.resize(size, 0);
        let result = read_exact_at(&file, &mut buf[at..], offset).map_err(shorter);
        (file, buf, result)
    }))
}

/// [`spawn_read`], but what the page cache holds is read at once on this thread (`preadv2` with
/// `RWF_NOWAIT`, which never waits for the disk), and only the rest on the blocking pool.
///
/// For the first chunk of a response (a new one, or one resumed after a move): its first byte
/// waits for it, and a hop to the blocking pool and back is two wake-ups across CPUs
/// (~100–150 µs on the project's 2-vCPU machines, `mtcp bench migration --breakdown`), more
/// than copying a cached chunk. Only that chunk: read inline every time, a busy response would
/// keep this thread from its connection's writer and every other connection.
pub(crate) fn read_cached_first(
    file: File,
    mut buf: Vec<u8>,
    prefix: usize,
    offset: u64,
    len: usize,
) -> ChunkTask {
    buf.resize(prefix + len, 0);
    let done = read_cached(&file, &mut buf[prefix..], offset);
    if done == len {
        return ChunkTask::Ready(Some((file, buf, Ok(()))));
    }
    pool_read(file, buf, prefix + len, prefix + done, offset + done as u64)
}

fn shorter(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "file became shorter while its response was being sent",
        )
    } else {
        e
    }
}

/// Reads what the page cache holds of `buf.len()` bytes at `offset` without waiting for the
/// disk; returns how many bytes were read (the rest is left to a blocking read).
#[cfg(target_os = "linux")]
fn read_cached(file: &File, buf: &mut [u8], offset: u64) -> usize {
    use std::os::fd::AsRawFd;
    let mut done = 0usize;
    while done < buf.len() {
        let iov = libc::iovec {
            iov_base: buf[done..].as_mut_ptr().cast(),
            iov_len: buf.len() - done,
        };
        // SAFETY: the iovec points into `buf`, which outlives the call; the descriptor is the
        // open file's.
        let n = unsafe {
            libc::preadv2(
                file.as_raw_fd(),
                &iov,
                1,
                (offset + done as u64) as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        if n <= 0 {
            // EAGAIN (not cached), the end of the file, or no RWF_NOWAIT: the blocking read
            // decides.
            break;
        }
        done += n as usize;
    }
    done
}

#[cfg(not(target_os = "linux"))]
fn read_cached(_file: &File, _buf: &mut [u8], _offset: u64) -> usize {
    0
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
