//! The README's example (the seed's Example 1): a server that streams the file a client names,
//! exporting a restart point before every chunk. Run two of them with one cluster file and an
//! agent in front, and a download survives `mtcp migrate`:
//!
//! ```sh
//! cargo run --release -p mtcp --example fileserver -- cluster.toml s1
//! ```

use mtcp::{Cluster, Limits, Server, Start};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

#[derive(serde::Serialize, serde::Deserialize)]
struct Snap {
    path: String,
    offset: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (file, id) = match &args[..] {
        [_, f, i] => (f.clone(), i.clone()),
        _ => anyhow::bail!("usage: fileserver CLUSTER_FILE SERVER_ID"),
    };
    let mut server = Server::bind(Cluster::load(file)?, &id, Limits::default()).await?;
    while let Some(mut conn) = server.accept().await {
        tokio::spawn(async move {
            let r: anyhow::Result<()> = async {
                // get_state: a new connection names its file; a migrated one carries its snapshot.
                let mut snap = match conn.start().clone() {
                    Start::New => {
                        let mut name = Vec::new();
                        let mut b = [0u8; 1];
                        while conn.read(&mut b).await? == 1 && b[0] != b'\n' {
                            name.push(b[0]);
                        }
                        Snap {
                            path: String::from_utf8(name)?,
                            offset: 0,
                        }
                    }
                    Start::Migrated(b) => postcard::from_bytes(&b)?,
                };
                let mut f = tokio::fs::File::open(&snap.path).await?;
                f.seek(std::io::SeekFrom::Start(snap.offset)).await?;
                let mut buf = vec![0u8; 256 << 10];
                loop {
                    // set_state: this describes everything read and written so far.
                    conn.set_state(postcard::to_stdvec(&snap)?)?;
                    let n = f.read(&mut buf).await?;
                    if n == 0 {
                        return Ok(());
                    }
                    conn.write_all(&buf[..n]).await?; // no buffering across a snapshot
                    snap.offset += n as u64;
                }
            }
            .await;
            if let Err(e) = r {
                eprintln!("connection {}: {e}", conn.cid());
            }
        });
    }
    Ok(())
}
