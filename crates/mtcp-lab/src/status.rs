//! A lab seen from outside: its status, the labs that exist, and tearing one down by tag.

use crate::*;
use net::Tools;
use ns::{check_tag, netns_path};
use serde::Serialize;
use state::State;
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;

/// What [`down`] did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DownReport {
    /// Namespaces removed.
    pub namespaces: Vec<String>,
    /// PIDs killed.
    pub killed: Vec<u32>,
}

/// Removes lab `tag`: kills the processes it recorded and every process inside its
/// namespaces (SIGCONT, SIGKILL, by PID), deletes its nftables table and every namespace it
/// recorded or named `mtcp-<tag>-*` (their devices go with them), and its directory. Works
/// without a state file (after a crash) and on a lab that is already gone.
pub fn down(tag: &str) -> Result<DownReport> {
    check_root()?;
    check_tag(tag)?;
    // A command stuck with the lock must not keep the lab alive: go on without it.
    let _lock = state::lock(tag, LOCK_WAIT).ok();
    let st = State::load(tag).ok().flatten();
    let mut procs: Vec<ProcRef> = Vec::new();
    let mut names: BTreeSet<String> = ns::list_netns()
        .into_iter()
        .filter(|n| ns::host_of_netns(tag, n).is_some())
        .collect();
    if let Some(st) = &st {
        procs.extend(st.procs.iter().map(|r| r.proc));
        procs.extend(st.links.iter().filter_map(|l| l.delay_line));
        names.extend(st.namespaces.iter().cloned());
    }
    names.retain(|n| netns_path(n).exists());
    for n in &names {
        procs.extend(proc::in_netns(&netns_path(n)));
    }
    procs.retain(|p| p.alive() && p.pid != std::process::id());
    procs.sort_by_key(|p| p.pid);
    procs.dedup();
    let mut report = DownReport {
        killed: procs.iter().map(|p| p.pid).collect(),
        ..Default::default()
    };
    let left = proc::kill_all(&procs, KILL_WAIT);
    let mut errors: Vec<String> = left
        .iter()
        .map(|p| format!("process {} survived SIGKILL", p.pid))
        .collect();
    let router = netns_name(tag, Host::Router);
    if names.contains(&router) {
        if let Ok(t) = Tools::find() {
            // Also goes with the namespace; deleted first so that nothing is left if the
            // namespace outlives this command (a process we could not kill holds it).
            let _ = t.nft(
                &router,
                &format!("delete table inet {}", net::nft_table(tag)),
            );
        }
    }
    let ip = Tools::find_ip();
    for n in &names {
        match ip
            .as_ref()
            .map_err(|e| e.to_string())
            .and_then(|t| t.ip_host(&["netns", "del", n]).map_err(|e| e.to_string()))
        {
            Ok(_) => report.namespaces.push(n.clone()),
            Err(e) => errors.push(e),
        }
    }
    let dir = lab_dir(tag);
    if dir.exists() {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            errors.push(format!("remove {}: {e}", dir.display()));
        }
    }
    if errors.is_empty() {
        Ok(report)
    } else {
        Err(Error::Invalid(format!(
            "lab {tag:?} not fully removed: {}",
            errors.join("; ")
        )))
    }
}

/// Tags of every lab that has a state directory or a namespace.
pub fn tags() -> Vec<String> {
    let mut t: BTreeSet<String> = BTreeSet::new();
    if let Ok(rd) = std::fs::read_dir(RUN_DIR) {
        t.extend(rd.filter_map(|e| e.ok()?.file_name().into_string().ok()));
    }
    for n in ns::list_netns() {
        if let Some((tag, host)) = n.strip_prefix("mtcp-").and_then(|r| r.split_once('-')) {
            if check_tag(tag).is_ok() && host.parse::<Host>().is_ok() {
                t.insert(tag.to_string());
            }
        }
    }
    t.retain(|s| check_tag(s).is_ok());
    t.into_iter().collect()
}

/// What a lab has, for `mtcp lab status`.
#[derive(Debug, Clone, Serialize)]
pub struct LabStatus {
    pub tag: String,
    /// False: namespaces named like the lab's but no state (left by a crash; `down` removes
    /// them).
    pub recorded: bool,
    pub servers: u16,
    pub owner_pid: Option<u32>,
    pub owner_alive: bool,
    pub nft_table: String,
    pub hosts: Vec<HostStatus>,
    pub procs: Vec<ProcStatus>,
    /// Namespaces of the lab's pattern that exist (recorded or not).
    pub namespaces: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostStatus {
    pub host: Host,
    pub addr: Ipv4Addr,
    pub netns: String,
    pub netns_exists: bool,
    /// `None` for the router.
    pub link: Option<LinkStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LinkStatus {
    pub kind: LinkKind,
    pub host_dev: String,
    pub router_dev: String,
    pub impair: Impairment,
    pub delay_line_pid: Option<u32>,
    pub delay_line_alive: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProcStatus {
    pub id: u64,
    pub host: Host,
    pub pid: u32,
    pub alive: bool,
    pub stopped: bool,
    pub argv: Vec<String>,
    pub log: Option<PathBuf>,
}

/// The status of lab `tag`, if anything of it exists.
pub fn status(tag: &str) -> Result<Option<LabStatus>> {
    check_tag(tag)?;
    let namespaces: Vec<String> = ns::list_netns()
        .into_iter()
        .filter(|n| ns::host_of_netns(tag, n).is_some())
        .collect();
    let Some(st) = State::load(tag)? else {
        if namespaces.is_empty() {
            return Ok(None);
        }
        return Ok(Some(LabStatus {
            tag: tag.to_string(),
            recorded: false,
            servers: 0,
            owner_pid: None,
            owner_alive: false,
            nft_table: net::nft_table(tag),
            hosts: Vec::new(),
            procs: Vec::new(),
            namespaces,
        }));
    };
    let hosts = st
        .hosts()
        .into_iter()
        .map(|h| {
            let netns = netns_name(tag, h);
            HostStatus {
                host: h,
                addr: h.addr(),
                netns_exists: netns_path(&netns).exists(),
                netns,
                link: st.link(h).map(|l| {
                    let in_process = l.kind == LinkKind::Tun && l.delay_line.is_none();
                    LinkStatus {
                        kind: l.kind,
                        host_dev: h.host_dev(),
                        router_dev: h.router_dev(),
                        impair: l.impair,
                        delay_line_pid: l
                            .delay_line
                            .map(|p| p.pid)
                            .or(st.owner.filter(|_| in_process).map(|o| o.pid)),
                        delay_line_alive: l.delay_line.is_some_and(|p| p.alive())
                            || (in_process && st.owner.is_some_and(|o| o.alive())),
                    }
                }),
            }
        })
        .collect();
    let procs = st
        .procs
        .iter()
        .map(|r| ProcStatus {
            id: r.id,
            host: r.host,
            pid: r.proc.pid,
            alive: r.proc.alive(),
            stopped: r.proc.stopped(),
            argv: r.argv.clone(),
            log: r.log.clone(),
        })
        .collect();
    Ok(Some(LabStatus {
        tag: tag.to_string(),
        recorded: true,
        servers: st.servers,
        owner_pid: st.owner.map(|o| o.pid),
        owner_alive: st.owner.is_some_and(|o| o.alive()),
        nft_table: st.nft_table.clone(),
        hosts,
        procs,
        namespaces,
    }))
}
