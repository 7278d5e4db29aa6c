//! Processes inside the lab: starting them in a host, signalling them (faults), waiting.

use crate::*;
use error::io_err;
use ns::wrap_command;
use state::ProcRecord;
use std::ffi::OsStr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

impl Lab {
    /// A command that runs `program` inside `host`'s network namespace (untracked: the caller
    /// waits for it; see [`Lab::spawn`] for processes the lab kills at `down`).
    pub fn command(&self, host: Host, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new(program);
        wrap_command(&mut c, &self.netns(host));
        c
    }

    /// Runs `f` on a thread inside `host`'s network namespace. Sockets made there belong to
    /// that namespace and can be used from any thread afterwards.
    pub fn run_in<T: Send>(&self, host: Host, f: impl FnOnce() -> T + Send) -> Result<T> {
        self.check_host(host)?;
        ns::run_in_netns(&self.netns(host), f)
    }

    /// Starts `argv` inside `host` (own process group, stdin closed, stdout and stderr to
    /// `<log dir>/<host>-<program>-<id>.log`); the lab kills it (by PID) at `down`.
    pub fn spawn<S: AsRef<OsStr>>(&self, host: Host, argv: &[S]) -> Result<LabProc> {
        let Some((prog, args)) = argv.split_first() else {
            return Err(Error::Invalid("an empty command".into()));
        };
        let mut cmd = Command::new(prog);
        cmd.args(args);
        let base = Path::new(prog)
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.spawn_inner(host, cmd, Some(base))
    }

    /// Starts `cmd` (stdio as the caller set it) inside `host`, tracked like [`Lab::spawn`].
    pub fn spawn_command(&self, host: Host, cmd: Command) -> Result<LabProc> {
        self.spawn_inner(host, cmd, None)
    }

    pub(crate) fn spawn_inner(
        &self,
        host: Host,
        mut cmd: Command,
        log_as: Option<String>,
    ) -> Result<LabProc> {
        self.check_host(host)?;
        wrap_command(&mut cmd, &self.netns(host));
        cmd.process_group(0);
        let mut argv = vec![cmd.get_program().to_string_lossy().into_owned()];
        argv.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
        self.update(|inner| {
            let id = inner.state.next_id + 1;
            let mut log = None;
            if let Some(base) = log_as {
                let p = inner.state.log_dir.join(format!("{host}-{base}-{id}.log"));
                let f =
                    std::fs::File::create(&p).map_err(io_err(format!("create {}", p.display())))?;
                cmd.stdin(Stdio::null())
                    .stdout(f.try_clone().map_err(io_err("dup a log file"))?)
                    .stderr(f);
                log = Some(p);
            }
            let child = cmd
                .spawn()
                .map_err(io_err(format!("start {} in {host}", argv[0])))?;
            let pid = child.id();
            let proc = ProcRef::of(pid).unwrap_or(ProcRef { pid, start: 0 });
            inner.state.next_id = id;
            inner.state.procs.push(ProcRecord {
                id,
                host,
                proc,
                argv,
                log: log.clone(),
                stopped: false,
            });
            if self.owned {
                inner.children.insert(id, child);
            }
            Ok(LabProc { id, host, pid, log })
        })
    }

    /// Processes started in the lab and not killed through it (some may have exited).
    pub fn processes(&self) -> Vec<LabProc> {
        self.lock()
            .state
            .procs
            .iter()
            .map(|r| LabProc {
                id: r.id,
                host: r.host,
                pid: r.proc.pid,
                log: r.log.clone(),
            })
            .collect()
    }

    /// SIGKILLs a process started in the lab and waits (bounded) until it is gone.
    pub fn kill(&self, p: &LabProc) -> Result<()> {
        self.signal_procs(|r| r.id == p.id, Fault::Kill).map(drop)
    }

    /// SIGSTOPs a process started in the lab.
    pub fn stop(&self, p: &LabProc) -> Result<()> {
        self.signal_procs(|r| r.id == p.id, Fault::Stop).map(drop)
    }

    /// SIGCONTs a process started in the lab.
    pub fn cont(&self, p: &LabProc) -> Result<()> {
        self.signal_procs(|r| r.id == p.id, Fault::Cont).map(drop)
    }

    /// Applies `fault` to every process started in `host`; returns how many.
    pub fn fault(&self, host: Host, fault: Fault) -> Result<usize> {
        self.check_host(host)?;
        self.signal_procs(|r| r.host == host, fault)
            .map_err(|e| match e {
                Error::Invalid(_) => Error::Invalid(format!(
                    "no process was started in {host} through the lab (`mtcp lab exec --detach`)"
                )),
                e => e,
            })
    }

    pub(crate) fn signal_procs(
        &self,
        which: impl Fn(&ProcRecord) -> bool,
        fault: Fault,
    ) -> Result<usize> {
        self.update(|inner| {
            let ids: Vec<u64> = inner
                .state
                .procs
                .iter()
                .filter(|r| which(r))
                .map(|r| r.id)
                .collect();
            if ids.is_empty() {
                return Err(Error::Invalid("no such process in the lab".into()));
            }
            match fault {
                Fault::Kill => {
                    let mut refs = Vec::new();
                    for id in &ids {
                        if let Some(mut c) = inner.children.remove(id) {
                            let _ = c.kill();
                            wait_child(&mut c, KILL_WAIT);
                        }
                        if let Some(r) = inner.state.procs.iter().find(|r| r.id == *id) {
                            refs.push(r.proc);
                        }
                    }
                    let left = proc::kill_all(&refs, KILL_WAIT);
                    inner.state.procs.retain(|r| !ids.contains(&r.id));
                    if !left.is_empty() {
                        return Err(Error::Invalid(format!(
                            "processes {:?} survived SIGKILL for {KILL_WAIT:?}",
                            left.iter().map(|p| p.pid).collect::<Vec<_>>()
                        )));
                    }
                }
                Fault::Stop | Fault::Cont => {
                    let stop = fault == Fault::Stop;
                    for r in inner.state.procs.iter_mut().filter(|r| ids.contains(&r.id)) {
                        if !r
                            .proc
                            .signal(if stop { libc::SIGSTOP } else { libc::SIGCONT })
                        {
                            return Err(Error::Invalid(format!(
                                "process {} (pid {}) in {} has exited",
                                r.id, r.proc.pid, r.host
                            )));
                        }
                        r.stopped = stop;
                    }
                }
            }
            Ok(ids.len())
        })
    }

    /// Waits up to `limit` for a process this handle started to exit; its status, or `None`
    /// if it still runs.
    pub fn wait(&self, p: &LabProc, limit: Duration) -> Result<Option<ExitStatus>> {
        let t0 = Instant::now();
        loop {
            {
                let mut inner = self.lock();
                let c = inner.children.get_mut(&p.id).ok_or_else(|| {
                    Error::Invalid(format!(
                        "process {} is not a child of this lab handle",
                        p.id
                    ))
                })?;
                if let Some(s) = c.try_wait().map_err(io_err("wait for a lab process"))? {
                    return Ok(Some(s));
                }
            }
            if t0.elapsed() >= limit {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Waits up to `limit` for a child to be reaped.
pub(crate) fn wait_child(c: &mut Child, limit: Duration) {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if !matches!(c.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}
