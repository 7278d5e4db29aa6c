//! The server over plain TCP on 127.0.0.1: status codes, headers, bodies, keep-alive,
//! pipelining and split request heads, checked against the files on disk.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use mtcp_httpd::{serve, Plain};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// Starts a server for `root` on an ephemeral port; each connection is served by `serve`.
async fn start(root: PathBuf) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let root = root.clone();
            tokio::spawn(async move {
                if let Err(e) = serve(Plain(stream), None, &root).await {
                    eprintln!("connection ended with an error: {e}");
                }
            });
        }
    });
    addr
}

struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, raw: &str) {
        self.stream.write_all(raw.as_bytes()).await.unwrap();
    }

    async fn response(&mut self, head_only: bool) -> Response {
        read_response(&mut self.stream, &mut self.buf, head_only).await
    }

    /// Sends `METHOD path` with extra header lines and reads the response.
    async fn request(&mut self, method: &str, path: &str, extra: &str) -> Response {
        self.send(&format!(
            "{method} {path} HTTP/1.1\r\nHost: test\r\n{extra}\r\n"
        ))
        .await;
        self.response(method == "HEAD").await
    }

    async fn expect_eof(&mut self) {
        expect_eof(&mut self.stream, &self.buf).await;
    }
}

fn sha256(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

#[tokio::test]
async fn get_whole_file() {
    let dir = make_root();
    let addr = start(dir.path().into()).await;
    let mut c = Client::connect(addr).await;
    let r = c.request("GET", "/data.bin", "").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.content_length(), DATA_LEN);
    assert_eq!(sha256(&r.body), sha256(&read(dir.path(), "data.bin")));
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    assert_eq!(r.header("accept-ranges"), Some("bytes"));
    assert_eq!(r.header("server"), Some("mtcp-httpd"));
    assert_eq!(r.header("date"), None);
    assert_eq!(r.header("etag"), None);
    assert_eq!(r.header("content-range"), None);
    assert_eq!(r.header("connection"), None);

    let r = c.request("GET", "/sub/file.json", "").await;
    assert_eq!((r.status, r.body.as_slice()), (200, JSON));
    assert_eq!(r.header("content-type"), Some("application/json"));
    let r = c.request("GET", "/sub/a%20b.txt?x=1", "").await;
    assert_eq!((r.status, r.body.as_slice()), (200, SMALL));
    let r = c.request("GET", "/empty.bin", "").await;
    assert_eq!((r.status, r.content_length()), (200, 0));
}

#[tokio::test]
async fn head_has_headers_and_no_body() {
    let dir = make_root();
    let addr = start(dir.path().into()).await;
    let mut c = Client::connect(addr).await;
    let r = c.request("HEAD", "/data.bin", "").await;
    assert_eq!((r.status, r.content_length()), (200, DATA_LEN));
    assert!(r.body.is_empty());
    // Had the HEAD response carried a body, this response would not parse as one.
    let r = c.request("GET", "/small.txt", "").await;
    assert_eq!((r.status, r.body.as_slice()), (200, SMALL));
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    let r = c
        .request("HEAD", "/data.bin", "Range: bytes=10-19\r\n")
        .await;
    assert_eq!((r.status, r.content_length()), (206, 10));
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes 10-19/{DATA_LEN}").as_str())
    );
    let r = c.request("HEAD", "/nope", "").await;
    assert_eq!(r.status, 404);
    assert!(c.buf.is_empty());
}

#[tokio::test]
async fn ranges() {
    let dir = make_root();
    let data = read(dir.path(), "data.bin");
    let len = data.len();
    let addr = start(dir.path().into()).await;
    let mut c = Client::connect(addr).await;
    let cases: [(&str, usize, usize); 7] = [
        ("bytes=0-0", 0, 1),
        ("bytes=100-199", 100, 200),
        ("bytes=1000000-", 1_000_000, len),
        ("bytes=-5000", len - 5000, len),
        ("bytes=-99999999", 0, len),
        ("bytes=5-99999999", 5, len),
        ("Bytes = 7 - 8", 7, 9),
    ];
    for (range, start, end) in cases {
        let r = c
            .request("GET", "/data.bin", &format!("Range: {range}\r\n"))
            .await;
        assert_eq!(r.status, 206, "{range}");
        assert_eq!(r.content_length(), end - start, "{range}");
        let want = format!("bytes {start}-{}/{len}", end - 1);
        assert_eq!(r.header("content-range"), Some(want.as_str()), "{range}");
        assert!(r.body == data[start..end], "{range}: wrong bytes");
    }
    // Ranges that are ignored (invalid or multiple): the whole file, 200.
    for range in ["bytes=9-3", "bytes=0-1,5-6", "lines=1-2", "bytes=x-"] {
        let r = c
            .request("GET", "/small.txt", &format!("Range: {range}\r\n"))
            .await;
        assert_eq!((r.status, r.body.as_slice()), (200, SMALL), "{range}");
        assert_eq!(r.header("content-range"), None);
    }
}

#[tokio::test]
async fn unsatisfiable_ranges_get_416() {
    let dir = make_root();
    let addr = start(dir.path().into()).await;
    let mut c = Client::connect(addr).await;
    let n = SMALL.len();
    for range in [
        format!("bytes={n}-"),
        format!("bytes={}-{}", n + 5, n + 9),
        "bytes=-0".into(),
    ] {
        let r = c
            .request("GET", "/small.txt", &format!("Range: {range}\r\n"))
            .await;
        assert_eq!(r.status, 416, "{range}");
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes */{n}").as_str())
        );
        assert_eq!(r.body.len(), r.content_length());
    }
    let r = c.request("GET", "/empty.bin", "Range: bytes=0-\r\n").await;
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range"), Some("bytes */0"));
    // The connection goes on.
    let r = c.request("GET", "/small.txt", "").await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn not_found_and_escapes() {
    let dir = make_root();
    // A file next to the root that `..` would reach.
    let secret = dir.path().join("sub/secret.txt");
    std::fs::write(&secret, b"secret").unwrap();
    let root = dir.path().join("sub");
    std::fs::create_dir(root.join("inner")).unwrap();
    let addr = start(root).await;
    let mut c = Client::connect(addr).await;
    for path in ["/missing", "/inner", "/inner/", "/", "/file.json/x"] {
        let r = c.request("GET", path, "").await;
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(r.body.len(), r.content_length());
    }
    for path in [
        "/../sub/secret.txt",
        "/inner/../../sub/secret.txt",
        "/%2e%2e/sub/secret.txt",
        "/a%zz",
        "nonsense",
    ] {
        let r = c.request("GET", path, "").await;
        assert!(r.status == 400 || r.status == 404, "{path}: {}", r.status);
        assert!(!r.body.windows(6).any(|w| w == b"secret"), "{path}");
    }
    let r = c.request("GET", "/secret.txt", "").await;
    assert_eq!((r.status, r.body.as_slice()), (200, b"secret".as_slice()));
}

#[tokio::test]
async fn garbage_request_line_gets_400_and_close() {
    let dir = make_root();
    let addr = start(dir.path().into()).await;
    let mut c = Client::connect(addr).await;
    c.send("\x16\x03\x01 this is not http\r\n\r\n").await;
    let r = c.response(false).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.header("connection"), Some("close"));
    c.expect_eof().await;
}

#[tokio::test]
async fn other_methods_get_405_and_the_connection_goes_on() {
    let dir = make_root();
    let addr = start(dir.path().into()).await;
    let mut c = Client::connect(addr).await;
    // The body is read and discarded before the response, keeping the framing.
    c.send("POST /small.txt HTTP/1.1\r\nContent-Length: 11\r\n\r\nhello world")
        .await;
    let r = c.response(false).await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    assert_eq!(r.header("connection"), None);
    let r = c.request("DELETE", "/small.txt", "").await;
    assert_eq!(r.status, 405);
    let r = c.request("GET", "/small.txt", "").await;
    assert_eq!((r.status, r.body.as_slice()), (200, SMALL));
}

#[tokio::test]
async fn many_requests_on_one_connection() {
    let dir = make_root();
    let data = read(dir.path(), "data.bin");
    let addr = start(dir.path().into()).await;
    let mut c = Client::connect(addr).await;
    for i in 0..24usize {
        match i % 3 {
            0 => {
                let r = c.request("GET", "/small.txt", "").await;
                assert_eq!((r.status, r.body.as_slice()), (200, SMALL), "#{i}");
            }
            1 => {
                let r = c.request("HEAD", "/data.bin", "").await;
                assert_eq!((r.status, r.content_length()), (200, DATA_LEN), "#{i}");
            }
            _ => {
                let start = i * 1000;
                let end = start + 5000 + i;
                let range = format!("Range: bytes={start}-{}\r\n", end - 1);
                let r = c.request("GET", "/data.bin", &range).await;
                assert_eq!(r.status, 206, "#{i}");
                assert!(r.body == data[start..end], "#{i}: wrong bytes");
            }
        }
    }
    let r = c
        .request("GET", "/small.txt", "Connection: close\r\n")
        .await;
    assert_eq!((r.status, r.header("connection")), (200, Some("close")));
    c.expect_eof().await;
}

#[tokio::test]
async fn pipelined_requests_in_one_write() {
    let dir = make_root();
    let data = read(dir.path(), "data.bin");
    let addr = start(dir.path().into()).await;
    let mut c = Client::connect(addr).await;
    c.send(concat!(
        "GET /small.txt HTTP/1.1\r\nHost: t\r\n\r\n",
        "HEAD /data.bin HTTP/1.1\r\nHost: t\r\n\r\n",
        "GET /data.bin HTTP/1.1\r\nRange: bytes=-10\r\n\r\n",
        "POST /x HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody",
        "GET /missing HTTP/1.1\r\n\r\n",
        "GET /sub/file.json HTTP/1.1\r\nConnection: close\r\n\r\n",
        "GET /small.txt HTTP/1.1\r\n\r\n",
    ))
    .await;
    let r = c.response(false).await;
    assert_eq!((r.status, r.body.as_slice()), (200, SMALL));
    let r = c.response(true).await;
    assert_eq!((r.status, r.content_length()), (200, DATA_LEN));
    let r = c.response(false).await;
    assert_eq!((r.status, r.body.as_slice()), (206, &data[DATA_LEN - 10..]));
    assert_eq!(c.response(false).await.status, 405);
    assert_eq!(c.response(false).await.status, 404);
    let r = c.response(false).await;
    assert_eq!((r.status, r.body.as_slice()), (200, JSON));
    // The request after `Connection: close` is not answered.
    c.expect_eof().await;
}

#[tokio::test]
async fn request_split_byte_by_byte() {
    let dir = make_root();
    let addr = start(dir.path().into()).await;
    let mut c = Client::connect(addr).await;
    for _ in 0..2 {
        let req = "GET /sub/file.json HTTP/1.1\r\nHost: test\r\nRange: bytes=1-4\r\n\r\n";
        for b in req.as_bytes() {
            c.stream.write_all(&[*b]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let r = c.response(false).await;
        assert_eq!((r.status, r.body.as_slice()), (206, &JSON[1..5]));
    }
}

#[tokio::test]
async fn http10_closes_unless_keep_alive() {
    let dir = make_root();
    let addr = start(dir.path().into()).await;
    let mut c = Client::connect(addr).await;
    c.send("GET /small.txt HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .await;
    let r = c.response(false).await;
    assert_eq!(
        (r.status, r.header("connection")),
        (200, Some("keep-alive"))
    );
    c.send("GET /small.txt HTTP/1.0\r\n\r\n").await;
    let r = c.response(false).await;
    assert_eq!((r.status, r.body.as_slice()), (200, SMALL));
    assert_eq!(r.header("connection"), Some("close"));
    c.expect_eof().await;
}

#[tokio::test]
async fn oversized_head_gets_431_and_close() {
    let dir = make_root();
    let addr = start(dir.path().into()).await;
    let mut c = Client::connect(addr).await;
    let big = format!(
        "GET /small.txt HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    c.send(&big).await;
    let r = c.response(false).await;
    assert_eq!(r.status, 431);
    c.expect_eof().await;
}

#[tokio::test]
async fn responses_are_deterministic() {
    let dir = make_root();
    let addr = start(dir.path().into()).await;
    let req = "GET /data.bin HTTP/1.1\r\nRange: bytes=5-70000\r\n\r\nGET /missing HTTP/1.1\r\n\r\n\
               HEAD /small.txt HTTP/1.1\r\nConnection: close\r\n\r\n";
    let mut outputs = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut s, &mut out)
            .await
            .unwrap();
        outputs.push(out);
    }
    assert!(outputs[0].len() > 65_000);
    assert_same("second connection", &outputs[1], &outputs[0]);
    assert_same("third connection", &outputs[2], &outputs[0]);
}

/// Throughput over loopback: `cargo test -p mtcp-httpd --release -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn throughput_loopback() {
    let dir = tempfile::tempdir().unwrap();
    const LEN: usize = 256 << 20;
    std::fs::write(dir.path().join("big.bin"), pattern(LEN, 1)).unwrap();
    let addr = start(dir.path().into()).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let rounds = 8;
    let mut buf = vec![0u8; 1 << 20];
    let t = std::time::Instant::now();
    for _ in 0..rounds {
        s.write_all(b"GET /big.bin HTTP/1.1\r\n\r\n").await.unwrap();
        let mut got = 0usize;
        let mut head = None;
        while head.is_none() || got < head.unwrap() + LEN {
            let n = tokio::io::AsyncReadExt::read(&mut s, &mut buf)
                .await
                .unwrap();
            assert!(n > 0);
            if head.is_none() {
                head = buf[..n]
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .map(|p| p + 4);
            }
            got += n;
        }
        assert_eq!(got, head.unwrap() + LEN, "no extra bytes");
    }
    let secs = t.elapsed().as_secs_f64();
    println!("{:.2} GB/s", (rounds * LEN) as f64 / secs / 1e9);
}
