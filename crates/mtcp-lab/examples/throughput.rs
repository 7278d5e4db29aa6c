//! One TCP stream from s1 to the client through a lab link, for a few seconds (root):
//! `cargo run --release -p mtcp-lab --example throughput -- [DELAY_MS] [SECS]`.
//! A sanity benchmark of the delay line (DELAY_MS > 0) against a plain veth link (0).

use mtcp_lab::{Host, Impairment, Lab, LabOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let delay_ms: u32 = args.get(1).map_or(Ok(20), |s| s.parse())?;
    let secs: u64 = args.get(2).map_or(Ok(3), |s| s.parse())?;
    let lab = Lab::up(LabOptions {
        tag: "thru".into(),
        servers: 1,
        servers_link: Impairment {
            delay_ms,
            ..Default::default()
        },
        ..Default::default()
    })?;
    let to = SocketAddr::from((lab.addr(Host::Server(1)), 5001));
    let l = lab.run_in(Host::Server(1), || TcpListener::bind(to))??;
    let sender = std::thread::spawn(move || {
        if let Ok((mut c, _)) = l.accept() {
            let _ = c.set_write_timeout(Some(Duration::from_secs(2)));
            let b = vec![1u8; 256 << 10];
            while c.write_all(&b).is_ok() {}
        }
    });
    let (n, took, rtt) = lab.run_in(Host::Client, || -> std::io::Result<_> {
        let t0 = Instant::now();
        let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
        let rtt = t0.elapsed();
        c.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut b = vec![0u8; 256 << 10];
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(700) {
            if c.read(&mut b)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        let t1 = Instant::now();
        let mut n = 0usize;
        while t1.elapsed() < Duration::from_secs(secs) {
            n += c.read(&mut b)?;
        }
        Ok((n, t1.elapsed(), rtt))
    })??;
    println!(
        "delay {delay_ms} ms RTT (connect {rtt:.1?}): {:.0} Mbit/s over {took:.1?}",
        n as f64 * 8.0 / took.as_secs_f64() / 1e6
    );
    drop(lab);
    let _ = sender.join();
    Ok(())
}
