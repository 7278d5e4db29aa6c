//! Applications a server runs: one trait, so `mtcp server` can run any of them, and one accept
//! loop for all.

use crate::{is_migrated, Connection, Server};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;

/// A connection's work, boxed so that different applications fit one registry.
pub type Serving = Pin<Box<dyn Future<Output = io::Result<()>> + Send>>;

/// An application on the state API. [`App::serve`] runs one connection — new or migrated here
/// ([`Connection::start`]) — until it ends; an error that [`is_migrated`] means the connection
/// moved to another server.
pub trait App: Send + Sync + 'static {
    /// A short name for logs (`httpd`, `pgfront`).
    fn name(&self) -> &str;
    fn serve(self: Arc<Self>, conn: Connection) -> Serving;
}

/// Accepts connections and serves each with `app` in its own task until the server stops
/// (`Ctrl-C` and SIGTERM included: the fast path's fence table goes with the server).
pub async fn run(mut server: Server, app: Arc<dyn App>) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let terminated = async move {
        match term.as_mut() {
            Some(t) => t.recv().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(terminated);
    loop {
        tokio::select! {
            c = server.accept() => {
                let Some(conn) = c else { return };
                let app = app.clone();
                tokio::spawn(async move {
                    let cid = conn.cid();
                    let name = app.name().to_string();
                    match app.serve(conn).await {
                        Ok(()) => tracing::debug!(%cid, app = %name, "connection done"),
                        Err(e) if is_migrated(&e) => tracing::debug!(%cid, app = %name, "connection migrated away"),
                        Err(e) => tracing::info!(%cid, app = %name, "connection ended: {e}"),
                    }
                });
            }
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("interrupted; exiting");
                server.close();
                return;
            }
            _ = &mut terminated => {
                tracing::info!("terminated; exiting");
                server.close();
                return;
            }
        }
    }
}
