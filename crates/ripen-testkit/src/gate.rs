//! A TCP gate in front of a real server, to make an outage without losing
//! the server's state: [`TcpGate::close`] drops every connection through
//! it and turns new ones away at once; [`TcpGate::open`] lets them through
//! again. The server behind it never stops, so what it stored is still
//! there when the gate opens (an in-memory S3 server keeps its objects).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Forwards `127.0.0.1:{port}` to a target while open. Stops on drop.
pub struct TcpGate {
    addr: SocketAddr,
    open: Arc<watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for TcpGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpGate")
            .field("addr", &self.addr)
            .field("open", &*self.open.borrow())
            .finish()
    }
}

impl TcpGate {
    /// An open gate to `target` on a free loopback port.
    pub async fn start(target: SocketAddr) -> std::io::Result<TcpGate> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (open, _) = watch::channel(true);
        let open = Arc::new(open);
        let gate = open.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if !*gate.borrow() {
                    // Closed: the connection ends before a byte is read.
                    drop(client);
                    continue;
                }
                let changes = gate.subscribe();
                tokio::spawn(forward(client, target, changes));
            }
        });
        Ok(TcpGate { addr, open, task })
    }

    /// The gate's address: what a client connects to instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:{port}`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Drops every connection through the gate and turns new ones away.
    pub fn close(&self) {
        self.open.send_replace(false);
    }

    /// Lets connections through again.
    pub fn open(&self) {
        self.open.send_replace(true);
    }
}

impl Drop for TcpGate {
    fn drop(&mut self) {
        self.close();
        self.task.abort();
    }
}

async fn forward(mut client: TcpStream, target: SocketAddr, mut open: watch::Receiver<bool>) {
    let Ok(mut server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = open.wait_for(|open| !*open) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn echo(addr: SocketAddr) -> std::io::Result<Vec<u8>> {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await?;
        Ok(buf.to_vec())
    }

    #[tokio::test]
    async fn a_closed_gate_ends_connections_and_an_open_one_forwards() {
        let gate = TcpGate::start(echo_server().await).await.expect("gate");
        assert_eq!(echo(gate.addr()).await.expect("open"), b"ping");

        let mut held = TcpStream::connect(gate.addr()).await.expect("connect");
        held.write_all(b"ping").await.expect("write");
        let mut buf = [0u8; 4];
        held.read_exact(&mut buf).await.expect("echo");
        gate.close();
        let mut rest = Vec::new();
        let n = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            held.read_to_end(&mut rest),
        )
        .await
        .expect("ended in time")
        .unwrap_or(0);
        assert_eq!(n, 0, "a held connection is ended");
        assert!(echo(gate.addr()).await.is_err(), "a new one is turned away");

        gate.open();
        assert_eq!(echo(gate.addr()).await.expect("open again"), b"ping");
    }
}
