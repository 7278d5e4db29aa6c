//! `mtcp lab` (root): a network lab of namespaces — a client, a router and servers s1..sN —
//! whose links to the router can be delayed, lossy, rate-limited or blackholed, to run M-TCP
//! over a network by hand. The lab itself is the `mtcp-lab` crate; this is its command line.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use mtcp_lab::{DelayRunner, Fault, Host, Impairment, Lab, LabOptions, LabStatus};

const IMPAIRMENTS: &str = "\
Impairments act on one host's link to the router, in both directions:
  --delay-ms D   the link adds D ms of round-trip time (D/2 each way; a TUN delay line, as this
                 kernel has no netem). `up --delay-ms D` sets every server link, so
                 client<->server RTT = D and server<->server RTT = 2*D.
  --loss-pct L   L % of the packets dropped at random each way (by the delay line, per packet)
  --rate-mbit R  each direction limited to R Mbit/s (tc tbf on both ends; 0 = unlimited)
  --blackhole    every packet to and from the host dropped (nftables in the router)

Hosts: client (198.18.0.2), router (198.18.0.1), s1..sN (198.18.i.2), in namespaces
mtcp-<tag>-client, mtcp-<tag>-router, mtcp-<tag>-s<i>. State: /run/mtcp-lab/<tag>/.";

/// `mtcp lab …`
#[derive(Args)]
#[command(after_help = IMPAIRMENTS)]
pub struct LabArgs {
    #[command(subcommand)]
    cmd: LabCmd,
}

#[derive(Subcommand)]
enum LabCmd {
    /// Make a lab (removing a stale one of the same tag first).
    #[command(after_help = IMPAIRMENTS)]
    Up(UpArgs),
    /// Run a command inside a host of the lab (`--detach`: in the background, killed at `down`).
    Exec(ExecArgs),
    /// Change the impairments of a host's link, or kill/stop/continue the processes started in
    /// it with `exec --detach`.
    #[command(after_help = IMPAIRMENTS)]
    Impair(ImpairArgs),
    /// Show a lab (default: every lab).
    Status(StatusArgs),
    /// Remove a lab: its processes, namespaces (and their devices), nftables table and state,
    /// also after a crash.
    Down(DownArgs),
    /// Internal: one link's delay line (started by `up` and `impair`).
    #[command(hide = true)]
    Delayline(DelaylineArgs),
}

#[derive(Args)]
struct UpArgs {
    /// Number of servers (s1..sN).
    #[arg(long, default_value_t = 2)]
    servers: u16,
    /// The lab's name: 1 to 10 lowercase letters or digits.
    #[arg(long, default_value = "lab")]
    tag: String,
    /// Round-trip time each server link adds, ms.
    #[arg(long, default_value_t = 0)]
    delay_ms: u32,
    /// Loss on each server link, percent each way.
    #[arg(long, default_value_t = 0.0)]
    loss_pct: f64,
    /// Rate of each server link, Mbit/s each way.
    #[arg(long)]
    rate_mbit: Option<f64>,
}

#[derive(Args)]
struct ExecArgs {
    #[arg(long, default_value = "lab")]
    tag: String,
    /// client, router or s1..sN.
    host: String,
    /// Start it in the background (output to a log in the lab's directory); `impair --kill`
    /// and `down` kill it.
    #[arg(long)]
    detach: bool,
    /// The command and its arguments (after `--`).
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    cmd: Vec<String>,
}

#[derive(Args)]
struct ImpairArgs {
    #[arg(long, default_value = "lab")]
    tag: String,
    /// client or s1..sN (router: only --kill/--stop/--cont).
    host: String,
    /// Round-trip time the link adds, ms.
    #[arg(long)]
    delay_ms: Option<u32>,
    /// Loss, percent each way.
    #[arg(long)]
    loss_pct: Option<f64>,
    /// Rate, Mbit/s each way (0: unlimited).
    #[arg(long)]
    rate_mbit: Option<f64>,
    /// Drop every packet to and from the host.
    #[arg(long, conflicts_with = "clear")]
    blackhole: bool,
    /// Remove every impairment of the link first (then apply the ones given).
    #[arg(long)]
    clear: bool,
    /// SIGKILL the processes started in the host with `exec --detach`.
    #[arg(long, group = "fault")]
    kill: bool,
    /// SIGSTOP them.
    #[arg(long, group = "fault")]
    stop: bool,
    /// SIGCONT them.
    #[arg(long, group = "fault")]
    cont: bool,
}

#[derive(Args)]
struct StatusArgs {
    /// Only this lab.
    #[arg(long)]
    tag: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct DownArgs {
    #[arg(long, default_value = "lab")]
    tag: String,
}

#[derive(Args)]
struct DelaylineArgs {
    #[arg(long)]
    tag: String,
    #[arg(long)]
    host: String,
}

/// Runs `mtcp lab …` (blocking work, off the async runtime's threads).
pub async fn run(a: LabArgs) -> Result<()> {
    tokio::task::spawn_blocking(move || run_blocking(a)).await?
}

fn run_blocking(a: LabArgs) -> Result<()> {
    match a.cmd {
        LabCmd::Up(a) => up(a),
        LabCmd::Exec(a) => exec(a),
        LabCmd::Impair(a) => impair(a),
        LabCmd::Status(a) => status(a),
        LabCmd::Down(a) => {
            let r = mtcp_lab::down(&a.tag)?;
            if r.namespaces.is_empty() && r.killed.is_empty() {
                println!("no lab {:?} was left", a.tag);
            } else {
                println!(
                    "lab {:?} removed: {} namespace(s), {} process(es) killed",
                    a.tag,
                    r.namespaces.len(),
                    r.killed.len()
                );
            }
            Ok(())
        }
        LabCmd::Delayline(a) => Ok(mtcp_lab::serve_delay_line(&a.tag, host(&a.host)?)?),
    }
}

fn host(s: &str) -> Result<Host> {
    Ok(s.parse::<Host>()?)
}

/// Delay lines of a lab made here outlive this process: each is an `mtcp lab delayline`.
fn process_runner() -> Result<DelayRunner> {
    Ok(DelayRunner::Process {
        program: std::env::current_exe().context("finding the mtcp executable")?,
        args: vec!["lab".into(), "delayline".into()],
    })
}

fn up(a: UpArgs) -> Result<()> {
    let lab = Lab::up(LabOptions {
        tag: a.tag.clone(),
        servers: a.servers,
        servers_link: Impairment {
            delay_ms: a.delay_ms,
            loss_pct: a.loss_pct,
            rate_mbit: a.rate_mbit.filter(|&r| r > 0.0),
            blackhole: false,
        },
        delay_runner: process_runner()?,
        ..Default::default()
    })?;
    lab.detach();
    if let Some(st) = mtcp_lab::status(&a.tag)? {
        print_status(&st);
    }
    let t = if a.tag == "lab" {
        String::new()
    } else {
        format!(" --tag {}", a.tag)
    };
    println!("\ntry: mtcp lab exec{t} client -- ping -c 3 198.18.1.2   |   mtcp lab down{t}");
    Ok(())
}

fn exec(a: ExecArgs) -> Result<()> {
    let lab = Lab::attach(&a.tag)?;
    let h = host(&a.host)?;
    if !lab.hosts().contains(&h) {
        bail!(
            "lab {:?} has no host {h} (it has {} servers)",
            a.tag,
            lab.servers()
        );
    }
    if a.detach {
        let p = lab.spawn(h, &a.cmd)?;
        println!(
            "started #{} in {h}: pid {}, log {}",
            p.id,
            p.pid,
            p.log.map(|l| l.display().to_string()).unwrap_or_default()
        );
        return Ok(());
    }
    let st = lab
        .command(h, &a.cmd[0])
        .args(&a.cmd[1..])
        .status()
        .with_context(|| format!("running {} in {h}", a.cmd[0]))?;
    match st.code() {
        Some(0) => Ok(()),
        Some(c) => std::process::exit(c),
        None => bail!("{} in {h}: {st}", a.cmd[0]),
    }
}

fn impair(a: ImpairArgs) -> Result<()> {
    let mut lab = Lab::attach(&a.tag)?;
    lab.set_delay_runner(process_runner()?);
    let h = host(&a.host)?;
    let changes = a.delay_ms.is_some()
        || a.loss_pct.is_some()
        || a.rate_mbit.is_some()
        || a.blackhole
        || a.clear;
    let fault = match (a.kill, a.stop, a.cont) {
        (true, _, _) => Some(Fault::Kill),
        (_, true, _) => Some(Fault::Stop),
        (_, _, true) => Some(Fault::Cont),
        _ => None,
    };
    if !changes && fault.is_none() {
        bail!("nothing to do: give --delay-ms, --loss-pct, --rate-mbit, --blackhole, --clear, --kill, --stop or --cont");
    }
    if changes {
        let mut imp = if a.clear {
            Impairment::default()
        } else {
            lab.impairment(h)?
        };
        if let Some(d) = a.delay_ms {
            imp.delay_ms = d;
        }
        if let Some(l) = a.loss_pct {
            imp.loss_pct = l;
        }
        if let Some(r) = a.rate_mbit {
            imp.rate_mbit = (r > 0.0).then_some(r);
        }
        imp.blackhole |= a.blackhole;
        lab.impair(h, imp)?;
        println!("{h}: {imp}");
    }
    if let Some(f) = fault {
        let n = lab.fault(h, f)?;
        println!("{h}: {f:?} sent to {n} process(es)");
    }
    Ok(())
}

fn status(a: StatusArgs) -> Result<()> {
    let tags = match a.tag {
        Some(t) => vec![t],
        None => mtcp_lab::tags(),
    };
    let mut all = Vec::new();
    for t in &tags {
        if let Some(s) = mtcp_lab::status(t)? {
            all.push(s);
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    if all.is_empty() {
        println!("no lab");
    }
    for (i, s) in all.iter().enumerate() {
        if i > 0 {
            println!();
        }
        print_status(s);
    }
    Ok(())
}

fn print_status(s: &LabStatus) {
    if !s.recorded {
        println!(
            "lab {:?}: NO STATE (left by a crash?) but namespaces {}; `mtcp lab down --tag {}` removes them",
            s.tag,
            s.namespaces.join(", "),
            s.tag
        );
        return;
    }
    let owner = match s.owner_pid {
        Some(p) => format!(
            "run by process {p} ({})",
            if s.owner_alive { "alive" } else { "GONE" }
        ),
        None => "made by `mtcp lab up`".into(),
    };
    println!(
        "lab {:?}: {} server(s), {owner}, nftables table inet {} in the router",
        s.tag, s.servers, s.nft_table
    );
    println!(
        "  {:<7} {:<11} {:<18} {:<15} {:<28} delay line",
        "host", "address", "namespace", "link", "impairments"
    );
    for h in &s.hosts {
        let ns = if h.netns_exists {
            h.netns.clone()
        } else {
            format!("{} (MISSING)", h.netns)
        };
        let (link, imp, line) = match &h.link {
            None => ("-".to_string(), "-".to_string(), String::new()),
            Some(l) => (
                format!(
                    "{}/{} {}",
                    l.host_dev,
                    l.router_dev,
                    match l.kind {
                        mtcp_lab::LinkKind::Veth => "veth",
                        mtcp_lab::LinkKind::Tun => "tun",
                    }
                ),
                l.impair.to_string(),
                match l.delay_line_pid {
                    Some(p) => format!(
                        "pid {p} ({})",
                        if l.delay_line_alive {
                            "running"
                        } else {
                            "GONE"
                        }
                    ),
                    None => String::new(),
                },
            ),
        };
        println!(
            "  {:<7} {:<11} {:<18} {:<15} {:<28} {line}",
            h.host.to_string(),
            h.addr.to_string(),
            ns,
            link,
            imp
        );
    }
    if !s.procs.is_empty() {
        println!("  processes:");
        for p in &s.procs {
            let state = match (p.alive, p.stopped) {
                (false, _) => "exited",
                (true, true) => "STOPPED",
                (true, false) => "running",
            };
            println!(
                "    #{:<3} {:<7} pid {:<8} {:<8} {}{}",
                p.id,
                p.host.to_string(),
                p.pid,
                state,
                p.argv.join(" "),
                p.log
                    .as_ref()
                    .map(|l| format!("  (log {})", l.display()))
                    .unwrap_or_default()
            );
        }
    }
}
