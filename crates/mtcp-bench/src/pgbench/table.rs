//! The human-readable report.

use super::*;

pub(super) fn print_table(r: &PgReport) {
    let ms = |us: u64| us as f64 / 1e3;
    println!(
        "PostgreSQL front-end: pgbench TPC-B ({} protocol), scale {}, -c {} -j {}, {} s runs, {} rounds (order rotated), fsync {}, loopback",
        r.protocol,
        r.scale,
        r.clients,
        r.threads,
        r.seconds,
        r.rounds,
        if r.fsync { "on" } else { "off" }
    );
    println!(
        "  {:<20} {:>10} {:>7} {:>8}  {:<28} {:>6} {:>7}",
        "configuration", "median tps", "ratio", "per-rnd", "each round (tps)", "failed", "aborted"
    );
    for c in &r.configs {
        let each: Vec<String> = c.tps.iter().map(|t| format!("{t:.0}")).collect();
        let loud = if c.failed_transactions > 0 || c.aborted_clients > 0 {
            "  !!! NOT CLEAN"
        } else {
            ""
        };
        println!(
            "  {:<20} {:>10.1} {:>7.3} {:>8.3}  {:<28} {:>6} {:>7}{loud}",
            c.name,
            c.median_tps,
            c.ratio,
            c.ratio_median_of_rounds,
            each.join(" "),
            c.failed_transactions,
            c.aborted_clients
        );
        if let Some(m) = &c.moves {
            println!(
                "    moves: {} connections moved by {} `migrate --all` requests ({} found none), {} failed, {} ended before they could move, {} errors; request p50 {:.2} ms, p99 {:.2} ms",
                m.moved, m.requests, m.empty, m.failed, m.ended, m.errors, ms(m.request_us_p50), ms(m.request_us_p99)
            );
            println!(
                "    each move in the agent ({} seen): trigger -> RESUMED p50 {:.2} ms p99 {:.2} ms max {:.2} ms; -> first byte from the new server p50 {:.2} ms p99 {:.2} ms max {:.2} ms",
                m.seen_at_agent, ms(m.resumed_us_p50), ms(m.resumed_us_p99), ms(m.resumed_us_max),
                ms(m.first_byte_us_p50), ms(m.first_byte_us_p99), ms(m.first_byte_us_max)
            );
            for a in &m.aborted_at_agent {
                println!("    !!! given up by the agent: {a}");
            }
            for f in &m.failures {
                println!("    !!! move failure: {f}");
            }
        }
    }
    println!("  (ratio: median tps / direct's median tps; per-rnd: median of each round's ratio to direct's run of that round)");
    println!(
        "  CPU µs per transaction   pgbench  postgres  pgbouncer    agent  front-ends    total   (machine CPU others used)"
    );
    let opt = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.0}"));
    for c in &r.configs {
        let u = &c.cpu_us_per_txn;
        println!(
            "    {:<20} {:>9.0} {:>9.0} {:>10} {:>8} {:>11} {:>8.0}   ({:.1} %)",
            c.name,
            u.pgbench,
            u.postgres,
            opt(u.pgbouncer),
            opt(u.agent),
            opt(u.front_ends),
            u.total,
            c.other_cpu_pct
        );
    }
    if let Some(first) = r.configs.first() {
        print!("  statement latency, ms (pgbench -r, mean of the rounds)");
        for c in &r.configs {
            print!(" {:>19}", c.name);
        }
        println!();
        for (i, (name, _)) in first.statement_ms.iter().enumerate() {
            print!("    {name:<51}");
            for c in &r.configs {
                match c.statement_ms.get(i) {
                    Some((_, ms)) => print!(" {ms:>19.3}"),
                    None => print!(" {:>19}", "-"),
                }
            }
            println!();
        }
    }
    let Some(l) = &r.latency else {
        println!(
            "SELECT 1 round trip (p50): direct to PostgreSQL {:.3} ms; move latency not measured (needs agent-2pc-on)",
            ms(r.select1_direct_us_p50)
        );
        println!("clean (0 failed, 0 aborted, every move ok): {}", r.clean);
        return;
    };
    println!(
        "SELECT 1 round trip (p50): direct to PostgreSQL {:.3} ms, through the agent and front-end {:.3} ms",
        ms(r.select1_direct_us_p50),
        ms(l.select1_agent_us_p50)
    );
    println!("move latency, agent-2pc-on cluster, one session moved by the agent's admin API (request -> answer after RESUMED):");
    for (name, m) in [
        ("idle session", &l.idle_moves),
        ("inside a transaction", &l.in_transaction_moves),
    ] {
        println!(
            "  {name:<21} move p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms | move + first query p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms | agent trigger->RESUMED p50 {:.3} ms ({} moves)",
            ms(m.move_us_p50), ms(m.move_us_p99), ms(m.move_us_max),
            ms(m.move_query_us_p50), ms(m.move_query_us_p99), ms(m.move_query_us_max),
            ms(m.resumed_us_p50), m.moves
        );
        let c = m.cpu_us_per_move;
        println!(
            "  {:<21} CPU per move with its queries, less as many quiet rounds: PostgreSQL {:.0} µs, agent {:.0} µs, front-ends {:.0} µs",
            "", c.postgres, c.agent, c.front_ends
        );
    }
    let f = &l.front_end_phases;
    println!(
        "  destination front-end per restart (server logs, {} restarts, {} found the origin's backend alive):",
        f.restarts, f.fenced
    );
    println!(
        "    RESUMED -> session ready p50 {:.3} ms p99 {:.3} ms: backend connect p50 {:.3} ms p99 {:.3} ms, register and fence p50 {:.3} ms p99 {:.3} ms, restore p50 {:.3} ms p99 {:.3} ms",
        ms(f.resumed_to_ready_us_p50), ms(f.resumed_to_ready_us_p99),
        ms(f.connect_us_p50), ms(f.connect_us_p99),
        ms(f.register_and_fence_us_p50), ms(f.register_and_fence_us_p99),
        ms(f.restore_us_p50), ms(f.restore_us_p99)
    );
    println!(
        "clean (0 failed, 0 aborted, every move ok, balances right): {}",
        r.clean
    );
}
