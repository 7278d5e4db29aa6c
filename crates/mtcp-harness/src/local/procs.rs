//! The cluster's processes after the start: signals, kills, restarts, reaping, liveness, and
//! stopping them all (also when the cluster is dropped).

use super::*;

impl LocalCluster {
    /// Whether process `name` was started and not killed (it may have exited on its own; see
    /// [`LocalCluster::check_alive`]).
    pub fn is_started(&self, name: &str) -> bool {
        self.children.iter().any(|p| p.name == name)
    }

    /// Whether process `name` is stopped by [`LocalCluster::sigstop`].
    pub fn is_stopped(&self, name: &str) -> bool {
        self.children.iter().any(|p| p.name == name && p.stopped)
    }

    /// SIGKILLs process `name` (by its PID) and reaps it. It can be started again with
    /// [`LocalCluster::restart_server`].
    pub fn kill(&mut self, name: &str) -> Result<()> {
        let i = self
            .children
            .iter()
            .position(|p| p.name == name)
            .with_context(|| format!("no running process {name}"))?;
        let mut p = self.children.remove(i);
        // Child::kill is SIGKILL by PID (a no-op error if it already exited); wait reaps it.
        let _ = p.child.kill();
        p.child.wait().with_context(|| format!("reaping {name}"))?;
        Ok(())
    }

    /// Sends `sig` to process `name` by its PID.
    fn signal(&mut self, name: &str, sig: i32) -> Result<&mut Proc> {
        let p = self.proc_mut(name)?;
        let pid = p.child.id() as libc::pid_t;
        // SAFETY: kill(2) on a child this cluster started and has not reaped (so the PID is
        // still ours).
        if unsafe { libc::kill(pid, sig) } != 0 {
            bail!(
                "kill({pid}, {sig}) for {name}: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(p)
    }

    /// SIGSTOPs process `name`: it stays alive but runs no more (a hung server).
    pub fn sigstop(&mut self, name: &str) -> Result<()> {
        self.signal(name, libc::SIGSTOP)?.stopped = true;
        Ok(())
    }

    /// SIGCONTs process `name` after [`LocalCluster::sigstop`].
    pub fn sigcont(&mut self, name: &str) -> Result<()> {
        self.signal(name, libc::SIGCONT)?.stopped = false;
        Ok(())
    }

    /// Starts a fresh `mtcp server` with the id and arguments server `id` was first started
    /// with (after [`LocalCluster::kill`], or after it exited on its own), and waits until its
    /// data and admin ports listen.
    pub fn restart_server(&mut self, id: &str) -> Result<()> {
        let s = self.spawn_again(id)?;
        self.wait_up(&s.data, id)?;
        self.wait_up(&s.admin, id)
    }

    /// [`LocalCluster::restart_server`] from async code: waits without blocking the thread.
    pub async fn restart_server_async(&mut self, id: &str) -> Result<()> {
        let s = self.spawn_again(id)?;
        wait_listening_async(&s.data, Duration::from_secs(10)).await?;
        wait_listening_async(&s.admin, Duration::from_secs(10)).await
    }

    fn spawn_again(&mut self, id: &str) -> Result<ServerAddrs> {
        let s = self
            .servers
            .iter()
            .find(|s| s.id == id)
            .with_context(|| format!("unknown server {id}"))?
            .clone();
        if let Some(p) = self.children.iter_mut().find(|p| p.name == id) {
            if p.child.try_wait()?.is_none() {
                bail!("server {id} is still running");
            }
            self.children.retain(|p| p.name != id);
        }
        let args = self.args.get(id).cloned().context("no arguments kept")?;
        self.spawn(id, &args, true)?;
        Ok(s)
    }

    /// Removes started processes that exited on their own; returns their names and statuses.
    pub fn reap_exited(&mut self) -> Vec<(String, std::process::ExitStatus)> {
        let mut gone = Vec::new();
        self.children.retain_mut(|p| match p.child.try_wait() {
            Ok(Some(st)) => {
                gone.push((p.name.clone(), st));
                false
            }
            _ => true,
        });
        gone
    }

    /// Checks every child is still running; names the first that died.
    pub fn check_alive(&mut self) -> Result<()> {
        for p in &mut self.children {
            if let Some(st) = p.child.try_wait()? {
                let log = self.dir.join(format!("{}.log", p.name));
                let last = last_log_line(&log);
                bail!("{} exited ({st}): {last}; see {}", p.name, log.display());
            }
        }
        Ok(())
    }

    /// Stops every started process and waits for them: SIGTERM to all that run (servers and
    /// agents remove their fast-path fence tables then), up to 2 s for them to exit, then
    /// SIGCONT for stopped ones and SIGKILL for the rest.
    pub fn stop(&mut self) {
        for p in &self.children {
            if !p.stopped {
                // SAFETY: kill(2) on a child we started and have not reaped.
                unsafe { libc::kill(p.child.id() as libc::pid_t, libc::SIGTERM) };
            }
        }
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(2) {
            let running = self
                .children
                .iter_mut()
                .filter(|p| !p.stopped)
                .any(|p| matches!(p.child.try_wait(), Ok(None)));
            if !running {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        for p in &mut self.children {
            if p.stopped {
                // SAFETY: kill(2) on a child we started and have not reaped.
                unsafe { libc::kill(p.child.id() as libc::pid_t, libc::SIGCONT) };
                p.stopped = false;
            }
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        self.children.clear();
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.stop();
    }
}
