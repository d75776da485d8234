//! A TCP proxy that tests switch off and on, to make PostgreSQL, Redis or RabbitMQ "go away"
//! for one test without touching the shared servers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::servers::Server;

pub struct TcpProxy {
    addr: SocketAddr,
    inner: Arc<Inner>,
    accept: AbortHandle,
}

struct Inner {
    upstream: SocketAddr,
    up: AtomicBool,
    /// While true, what the server sends is held back (the client's bytes still go through).
    replies_held: watch::Sender<bool>,
    connections: Mutex<Vec<AbortHandle>>,
}

impl TcpProxy {
    /// Starts a proxy on a free loopback port, forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            upstream,
            up: AtomicBool::new(true),
            replies_held: watch::Sender::new(false),
            connections: Mutex::new(Vec::new()),
        });
        let accept_inner = inner.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if !accept_inner.up.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let upstream = accept_inner.upstream;
                let held = accept_inner.replies_held.subscribe();
                let task = tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut client_reads, mut client_writes) = client.into_split();
                    let (mut server_reads, mut server_writes) = server.into_split();
                    let requests = tokio::io::copy(&mut client_reads, &mut server_writes);
                    let replies = forward_replies(&mut server_reads, &mut client_writes, held);
                    // Either direction ending ends the connection, as a dead server would.
                    tokio::select! {
                        _ = requests => {}
                        _ = replies => {}
                    }
                });
                let mut connections = accept_inner.connections.lock().expect("not poisoned");
                connections.retain(|c| !c.is_finished());
                connections.push(task.abort_handle());
            }
        })
        .abort_handle();
        Ok(Self {
            addr,
            inner,
            accept,
        })
    }

    /// A proxy to one of the test servers, and the server's URL through it (the same
    /// credentials and options). Panics if it cannot listen.
    pub async fn in_front_of(server: &Server) -> (Self, String) {
        let proxy = Self::start(server.addr())
            .await
            .unwrap_or_else(|e| panic!("a proxy in front of {}: {e}", server.name));
        let url = server.url_via(proxy.addr());
        (proxy, url)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cuts every open connection and refuses new ones, as if the server died.
    pub fn go_down(&self) {
        self.inner.up.store(false, Ordering::SeqCst);
        for connection in self
            .inner
            .connections
            .lock()
            .expect("not poisoned")
            .drain(..)
        {
            connection.abort();
        }
    }

    /// Accepts connections again.
    pub fn come_back(&self) {
        self.inner.up.store(true, Ordering::SeqCst);
    }

    /// Holds back everything the server sends, on open connections and new ones, while passing
    /// on what clients send: the server does the work and its answers never arrive (a stalled
    /// broker, a network that drops one direction).
    pub fn hold_replies(&self) {
        self.inner.replies_held.send_replace(true);
    }

    /// Delivers the held replies, and the ones after them.
    pub fn release_replies(&self) {
        self.inner.replies_held.send_replace(false);
    }
}

/// Copies the server's bytes to the client, waiting while replies are held.
async fn forward_replies(
    server: &mut tokio::net::tcp::OwnedReadHalf,
    client: &mut tokio::net::tcp::OwnedWriteHalf,
    mut held: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = server.read(&mut buffer).await?;
        if read == 0 {
            return Ok(());
        }
        if held.wait_for(|held| !held).await.is_err() {
            return Ok(());
        }
        client.write_all(&buffer[..read]).await?;
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.go_down();
        self.accept.abort();
    }
}
