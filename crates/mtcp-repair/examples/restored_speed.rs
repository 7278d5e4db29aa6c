//! Throughput of a restored socket against a fresh one (root): `cargo run --release --example
//! restored_speed -p mtcp-repair`.
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

fn blast(mut s: TcpStream, mut c: TcpStream, label: &str) {
    let n: usize = 2 << 30;
    let t = std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 << 10];
        let mut got = 0;
        while got < n {
            let k = c.read(&mut buf).unwrap();
            assert!(k > 0);
            got += k;
        }
    });
    let buf = vec![7u8; 256 << 10];
    let t0 = Instant::now();
    let mut sent = 0;
    while sent < n {
        s.write_all(&buf).unwrap();
        sent += buf.len();
    }
    t.join().unwrap();
    let secs = t0.elapsed().as_secs_f64();
    println!("{label}: {:.0} MiB/s", n as f64 / secs / (1 << 20) as f64);
}

fn main() {
    for round in 0..2 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        blast(s, c, &format!("fresh {round}"));
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        c.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(10));
        let f = mtcp_repair::freeze(s).unwrap();
        let st = f.discard();
        let s = mtcp_repair::restore(&st).unwrap();
        if std::env::var("KICK").is_ok() {
            mtcp_repair::window_probe(&s).unwrap();
        }
        blast(s, c, &format!("restored {round}"));
    }
}
