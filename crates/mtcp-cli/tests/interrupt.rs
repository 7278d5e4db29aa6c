//! A benchmark stopped half-way by SIGTERM (or Ctrl-C) stops every process it started and
//! removes its working directory, then exits with status 130 and says so.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// PIDs of running processes whose command line mentions `needle`.
fn procs_mentioning(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmd).contains(needle) {
            out.push(pid);
        }
    }
    out
}

#[test]
fn a_benchmark_interrupted_by_sigterm_leaves_nothing_running() {
    let mut bench = Command::new(common::exe())
        .args(["bench", "throughput", "--size-mib", "256", "--rounds", "20"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mtcp bench");
    let tag = format!("mtcp-bench-{}", bench.id());
    let dir = std::env::temp_dir().join(&tag);
    // Its cluster is up once servers and an agent run from its directory.
    let t0 = Instant::now();
    while procs_mentioning(&tag).len() < 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the benchmark's cluster did not start"
        );
        assert!(
            bench.try_wait().unwrap().is_none(),
            "the benchmark ended early"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let started = procs_mentioning(&tag);
    // SAFETY: kill sends a signal to the child we started.
    assert_eq!(unsafe { libc::kill(bench.id() as i32, libc::SIGTERM) }, 0);
    // (Panics if it has not exited within 20 s; its exit status is checked below.)
    common::wait_child(
        &mut bench,
        "the interrupted benchmark",
        Duration::from_secs(20),
    );
    let code = bench.wait().unwrap().code();
    let mut err = String::new();
    std::io::Read::read_to_string(bench.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(code, Some(130), "exit status; stderr:\n{err}");
    assert!(err.contains("interrupted by SIGTERM"), "stderr:\n{err}");
    let left = procs_mentioning(&tag);
    for pid in &left {
        // SAFETY: SIGKILL to a leftover of this test's own benchmark.
        unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
    }
    assert!(
        left.is_empty(),
        "processes left running after the interrupt: {left:?} (of {started:?})"
    );
    assert!(!dir.exists(), "{} left behind", dir.display());
}
