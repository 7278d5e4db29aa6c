//! The fast path's own reads of the client's socket.

use super::recv_uninit;
use std::time::Duration;
use tokio::io::{AsyncWriteExt, Interest, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// A short read clears the read readiness (the next read is not tried until the socket
/// signals again), and data that arrives afterwards signals again: no wasted `recv`, no
/// lost wake-up.
#[tokio::test]
async fn a_short_read_clears_readiness_and_later_data_wakes_the_reader() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut peer = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (sock, _) = l.accept().await.unwrap();
    let mut mem = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
    let mut got = Vec::new();
    for piece in [&b"first"[..], b"second piece"] {
        peer.write_all(piece).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), sock.readable())
            .await
            .expect("the reader is woken by data that arrived after a short read")
            .unwrap();
        let mut buf = ReadBuf::uninit(&mut mem);
        let n = recv_uninit(&sock, &mut buf).unwrap();
        assert_eq!(buf.filled(), piece);
        assert_eq!(n, piece.len());
        got.extend_from_slice(buf.filled());
        // Readiness is cleared: `try_io` answers WouldBlock without trying a read.
        let tried = sock.try_io(Interest::READABLE, || -> std::io::Result<()> {
            panic!("a read was tried on a socket drained by a short read")
        });
        assert_eq!(tried.unwrap_err().kind(), std::io::ErrorKind::WouldBlock);
    }
    assert_eq!(got, b"firstsecond piece");
}
