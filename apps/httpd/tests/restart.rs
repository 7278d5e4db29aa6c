//! Restart determinism: a server resumed from any snapshot it took, fed the input that followed
//! the snapshot, writes exactly the output that followed it in the original run.

mod common;

use std::io;
use std::path::Path;

use bytes::Bytes;
use common::*;
use mtcp_httpd::{inspect_snapshot, serve_with, Config, SnapshotInfo, MAX_SNAPSHOT_LEN};
use proptest::prelude::*;

const EVERY: u64 = 64 * 1024;

fn config(root: &Path) -> Config {
    Config {
        root: root.to_path_buf(),
        snapshot_every: EVERY,
        chunk_size: 48 * 1024,
        scramble: None,
        head_timeout: mtcp_httpd::DEFAULT_HEAD_TIMEOUT,
    }
}

/// A keep-alive conversation ending with `Connection: close` (plus a request after it that must
/// stay unanswered), and for each response whether it answers HEAD.
fn conversation() -> (Vec<u8>, Vec<bool>) {
    let requests: [(&str, bool); 11] = [
        ("GET /small.txt HTTP/1.1\r\nHost: t\r\n\r\n", false),
        ("HEAD /data.bin HTTP/1.1\r\nHost: t\r\n\r\n", true),
        ("GET /data.bin HTTP/1.1\r\nHost: t\r\n\r\n", false),
        (
            "GET /data.bin HTTP/1.1\r\nRange: bytes=100000-2500000\r\n\r\n",
            false,
        ),
        ("GET /missing HTTP/1.1\r\n\r\n", false),
        (
            "POST /small.txt HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
            false,
        ),
        (
            "GET /data.bin HTTP/1.1\r\nRange: bytes=99999999-\r\n\r\n",
            false,
        ),
        ("GET /empty.bin HTTP/1.1\r\n\r\n", false),
        (
            "GET /data.bin HTTP/1.1\r\nRange: bytes=-70000\r\n\r\n",
            false,
        ),
        (
            "GET /small.txt HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
            false,
        ),
        (
            "GET /sub/file.json HTTP/1.1\r\nConnection: close\r\n\r\n",
            false,
        ),
    ];
    let mut input: Vec<u8> = requests.iter().flat_map(|(r, _)| r.bytes()).collect();
    input.extend_from_slice(b"GET /small.txt HTTP/1.1\r\n\r\n");
    (input, requests.iter().map(|&(_, h)| h).collect())
}

struct Run {
    result: io::Result<()>,
    output: Vec<u8>,
    snaps: Vec<Snap>,
    shutdown: bool,
}

async fn run(
    conn: MemConn,
    log: std::sync::Arc<std::sync::Mutex<Log>>,
    restart: Option<Bytes>,
    cfg: &Config,
) -> Run {
    let result = serve_with(conn, restart, cfg).await;
    let mut log = log.lock().unwrap();
    Run {
        result,
        output: std::mem::take(&mut log.output),
        snaps: std::mem::take(&mut log.snaps),
        shutdown: log.shutdown,
    }
}

async fn run_input(
    input: Vec<u8>,
    restart: Option<Bytes>,
    cfg: &Config,
    seed: u64,
    max_read: usize,
) -> Run {
    let (conn, log) = MemConn::new(input, seed, max_read);
    run(conn, log, restart, cfg).await
}

/// The original run's output checked against the files: right statuses and bytes.
fn check_original(root: &Path, output: &[u8], head_only: &[bool]) {
    let data = read(root, "data.bin");
    let rs = parse_all(output, head_only);
    let statuses: Vec<u16> = rs.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        [200, 200, 200, 206, 404, 405, 416, 200, 206, 200, 200]
    );
    assert_eq!(rs[0].body, SMALL);
    assert_eq!(rs[1].content_length(), DATA_LEN);
    assert!(rs[2].body == data, "full body");
    assert!(rs[3].body == data[100_000..=2_500_000], "range body");
    assert!(rs[8].body == data[DATA_LEN - 70_000..], "suffix body");
    assert_eq!(rs[10].body, JSON);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_from_every_snapshot_regenerates_the_same_bytes() {
    let dir = make_root();
    let cfg = config(dir.path());
    let (input, head_only) = conversation();
    let original = run_input(input.clone(), None, &cfg, 1, usize::MAX).await;
    original.result.as_ref().expect("the original run succeeds");
    assert!(original.shutdown);
    check_original(dir.path(), &original.output, &head_only);

    // The snapshots: one Idle after each keep-alive response, a Body at the start of each
    // non-empty GET body, and one every 64 KiB of body.
    let infos: Vec<SnapshotInfo> = original
        .snaps
        .iter()
        .map(|s| inspect_snapshot(&s.snapshot).unwrap())
        .collect();
    let idle = infos
        .iter()
        .filter(|i| matches!(i, SnapshotInfo::Idle { .. }))
        .count();
    let body_start = infos
        .iter()
        .filter(|i| matches!(i, SnapshotInfo::Body { sent: 0, .. }))
        .count();
    let body_mid = infos.len() - idle - body_start;
    assert_eq!(idle, 10);
    assert_eq!(body_start, 6);
    let expect_mid = [DATA_LEN as u64, 2_400_001, 70_000]
        .iter()
        .map(|len| (len - 1) / EVERY)
        .sum::<u64>() as usize;
    assert_eq!(body_mid, expect_mid);
    for (s, info) in original.snaps.iter().zip(&infos) {
        assert!(s.snapshot.len() <= MAX_SNAPSHOT_LEN && s.snapshot.len() < 4096);
        if let SnapshotInfo::Body { sent, .. } = info {
            assert_eq!(sent % EVERY, 0);
        }
    }
    // Snapshots are taken in order along both streams.
    assert!(original
        .snaps
        .windows(2)
        .all(|w| w[0].read <= w[1].read && w[0].written <= w[1].written));

    for (i, snap) in original.snaps.iter().enumerate() {
        let max_read = [usize::MAX, 1, 7, 300][i % 4];
        let restarted = run_input(
            input[snap.read..].to_vec(),
            Some(snap.snapshot.clone()),
            &cfg,
            i as u64 + 100,
            max_read,
        )
        .await;
        restarted
            .result
            .as_ref()
            .unwrap_or_else(|e| panic!("restart {i} ({:?}): {e}", infos[i]));
        assert_same(
            &format!("restart {i} from {:?}", infos[i]),
            &restarted.output,
            &original.output[snap.written..],
        );
        // The restarted server takes the same later restart points as the original.
        let again: Vec<Point> = restarted
            .snaps
            .iter()
            .map(|s| {
                point(&Snap {
                    snapshot: s.snapshot.clone(),
                    read: s.read + snap.read,
                    written: s.written + snap.written,
                })
            })
            .collect();
        let want: Vec<Point> = original.snaps[i + 1..].iter().map(point).collect();
        assert_eq!(again, want, "restart {i}: later snapshots");
    }
}

/// A snapshot's position: (input consumed, output written, what it describes). The input read
/// at a snapshot depends on read sizes, but read minus carried leftover does not.
type Point = (usize, usize, String);

fn point(s: &Snap) -> Point {
    let (leftover, what) = match inspect_snapshot(&s.snapshot).unwrap() {
        SnapshotInfo::Idle { leftover } => (leftover, "idle".to_string()),
        SnapshotInfo::Body {
            path,
            sent,
            len,
            leftover,
        } => (leftover, format!("{path} {sent}/{len}")),
        other => panic!("unknown snapshot {other:?}"),
    };
    (s.read - leftover, s.written, what)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_carries_unconsumed_pipelined_input() {
    let dir = make_root();
    let cfg = config(dir.path());
    // Everything in one read: the Idle snapshot after the first response must carry the rest.
    let input =
        b"GET /small.txt HTTP/1.1\r\n\r\nGET /sub/file.json HTTP/1.1\r\nConnection: close\r\n\r\n"
            .to_vec();
    let original = run_input(input.clone(), None, &cfg, 1, usize::MAX).await;
    original.result.unwrap();
    // Snapshot 0 is the Body snapshot at the start of the first response, 1 the Idle after it.
    let first = &original.snaps[1];
    assert_eq!(first.read, input.len(), "the whole input was read at once");
    let info = inspect_snapshot(&first.snapshot).unwrap();
    assert_eq!(
        info,
        SnapshotInfo::Idle {
            leftover: input.len() - 27
        }
    );
    // The restarted server gets no more input, yet answers the second request from the leftover.
    let restarted = run_input(
        Vec::new(),
        Some(first.snapshot.clone()),
        &cfg,
        2,
        usize::MAX,
    )
    .await;
    restarted.result.unwrap();
    assert_same(
        "restart",
        &restarted.output,
        &original.output[first.written..],
    );
    assert_eq!(parse_all(&restarted.output, &[false])[0].body, JSON);
}

/// Runs the conversation, returns the first Body snapshot with `sent > 0` and the expected
/// output after it.
async fn mid_body_snapshot(cfg: &Config) -> (Vec<u8>, Snap, Vec<u8>) {
    let (input, _) = conversation();
    let original = run_input(input.clone(), None, cfg, 1, usize::MAX).await;
    original.result.unwrap();
    let snap = original
        .snaps
        .iter()
        .find(|s| matches!(inspect_snapshot(&s.snapshot), Ok(SnapshotInfo::Body { sent, .. }) if sent > 0))
        .expect("a mid-body snapshot")
        .clone();
    let rest = original.output[snap.written..].to_vec();
    (input[snap.read..].to_vec(), snap, rest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_a_shorter_file_is_an_error() {
    let dir = make_root();
    let cfg = config(dir.path());
    let (input, snap, _) = mid_body_snapshot(&cfg).await;
    let path = dir.path().join("data.bin");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(DATA_LEN as u64 / 2)
        .unwrap();
    let r = run_input(input, Some(snap.snapshot), &cfg, 3, usize::MAX).await;
    let err = r.result.expect_err("a shorter file must not be resumed");
    assert!(err.to_string().contains("length"), "{err}");
    assert!(r.output.is_empty(), "no byte written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_a_missing_or_longer_file_is_an_error() {
    let dir = make_root();
    let cfg = config(dir.path());
    let (input, snap, _) = mid_body_snapshot(&cfg).await;
    let path = dir.path().join("data.bin");

    let mut longer = read(dir.path(), "data.bin");
    longer.push(0);
    std::fs::write(&path, &longer).unwrap();
    let r = run_input(
        input.clone(),
        Some(snap.snapshot.clone()),
        &cfg,
        3,
        usize::MAX,
    )
    .await;
    assert!(r.result.is_err() && r.output.is_empty());

    std::fs::remove_file(&path).unwrap();
    let r = run_input(input, Some(snap.snapshot), &cfg, 3, usize::MAX).await;
    assert_eq!(r.result.unwrap_err().kind(), io::ErrorKind::NotFound);
    assert!(r.output.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_an_unchanged_file_after_copy_works() {
    // The destination server has its own copy of the files (same content, other directory).
    let dir = make_root();
    let cfg = config(dir.path());
    let (input, snap, rest) = mid_body_snapshot(&cfg).await;
    let other = make_root();
    let r = run_input(input, Some(snap.snapshot), &config(other.path()), 4, 5).await;
    r.result.unwrap();
    assert_same("restart on a copy", &r.output, &rest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_shrinking_mid_body_ends_the_connection_with_an_error() {
    let dir = make_root();
    let cfg = config(dir.path());
    let (input, head_only) = conversation();
    let expected = run_input(input.clone(), None, &cfg, 1, usize::MAX).await;
    check_original(dir.path(), &expected.output, &head_only);

    // Truncate the file as soon as the first mid-body snapshot is taken.
    let path = dir.path().join("data.bin");
    let (conn, log) = MemConn::new(input, 1, usize::MAX);
    let conn = conn.with_hook(move |s| {
        if let Ok(SnapshotInfo::Body { sent, .. }) = inspect_snapshot(&s.snapshot) {
            if sent > 0 {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)?
                    .set_len(300_000)?;
            }
        }
        Ok(())
    });
    let r = run(conn, log, None, &cfg).await;
    let err = r.result.expect_err("a shrinking file is an error");
    assert!(err.to_string().contains("shorter"), "{err}");
    assert!(r.output.len() < expected.output.len());
    assert_same(
        "output before the error",
        &r.output,
        &expected.output[..r.output.len()],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_state_errors_end_the_connection() {
    let dir = make_root();
    let cfg = config(dir.path());
    let (input, _) = conversation();
    let expected = run_input(input.clone(), None, &cfg, 1, usize::MAX).await;
    for fail_at in [0usize, 3, 20] {
        let (conn, log) = MemConn::new(input.clone(), 1, usize::MAX);
        let count = std::sync::atomic::AtomicUsize::new(0);
        let conn = conn.with_hook(move |_| {
            if count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == fail_at {
                Err(io::Error::new(io::ErrorKind::ConnectionAborted, "migrated"))
            } else {
                Ok(())
            }
        });
        let r = run(conn, log, None, &cfg).await;
        assert_eq!(r.result.unwrap_err().to_string(), "migrated");
        assert_eq!(r.snaps.len(), fail_at + 1);
        // Nothing was written after the failed snapshot.
        assert_eq!(r.output.len(), r.snaps[fail_at].written);
        assert_same("output", &r.output, &expected.output[..r.output.len()]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_inputs_give_the_same_output_whatever_the_splits() {
    let dir = make_root();
    let cfg = config(dir.path());
    let get = "GET /small.txt HTTP/1.1\r\n\r\n";
    let inputs = [
        format!("{get}\x01\x02"), // garbage without a line end, then EOF
        format!("{get}GET /small.txt HTTP/1.1\r\nHo"), // a head cut by EOF
        format!("{get}POST / HTTP/1.1\r\nContent-Length: 9\r\n\r\nabc"), // a body cut by EOF
        format!("{get}GET / HTTP/1.1\r\nX: {}", "a".repeat(20_000)), // oversized head
        format!("{get}\r\n\r\nGET /sub/file.json HTTP/1.1\r\n\r\n"), // blank lines between
    ];
    for input in inputs {
        let input = input.into_bytes();
        let whole = run_input(input.clone(), None, &cfg, 1, usize::MAX).await;
        whole.result.unwrap();
        for (seed, max_read) in [(2, 1), (3, 2), (4, 5), (5, 1000)] {
            let split = run_input(input.clone(), None, &cfg, seed, max_read).await;
            split.result.unwrap();
            assert_same(
                &format!("max_read {max_read}"),
                &split.output,
                &whole.output,
            );
        }
    }
}

#[tokio::test]
async fn bad_snapshots_are_rejected() {
    let dir = make_root();
    let cfg = config(dir.path());
    for bad in [&b""[..], b"\x00", b"\x00\x09\x00", b"\x00\x01\x07\x07\x07"] {
        let r = run_input(Vec::new(), Some(Bytes::copy_from_slice(bad)), &cfg, 1, 1).await;
        assert_eq!(
            r.result.unwrap_err().kind(),
            io::ErrorKind::InvalidData,
            "{bad:?}"
        );
        assert!(r.output.is_empty());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Whatever the read sizes, the original run writes the same bytes, and a restart from a
    /// random snapshot with other read sizes writes the rest of them.
    #[test]
    fn output_does_not_depend_on_read_splits(seed in any::<u64>(), max_read in 1usize..2000, pick in any::<prop::sample::Index>()) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let dir = make_root();
        let cfg = Config { root: dir.path().into(), snapshot_every: 256 * 1024, chunk_size: 100_000, scramble: None, head_timeout: mtcp_httpd::DEFAULT_HEAD_TIMEOUT };
        let (input, _) = conversation();
        rt.block_on(async {
            let baseline = run_input(input.clone(), None, &cfg, 0, usize::MAX).await;
            let split = run_input(input.clone(), None, &cfg, seed, max_read).await;
            prop_assert!(split.result.is_ok());
            prop_assert!(split.output == baseline.output, "output differs with read splits");
            let snap = &split.snaps[pick.index(split.snaps.len())];
            let restarted = run_input(input[snap.read..].to_vec(), Some(snap.snapshot.clone()), &cfg, seed ^ 1, max_read / 2 + 1).await;
            prop_assert!(restarted.result.is_ok());
            prop_assert!(restarted.output == baseline.output[snap.written..], "restart output differs");
            Ok(())
        })?;
    }
}
