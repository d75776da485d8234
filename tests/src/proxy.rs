//! A TCP proxy that tests switch off and on, to make PostgreSQL, Redis or RabbitMQ "go away"
//! for one test without touching the shared servers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
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
                let task = tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let mut client = client;
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
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
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.go_down();
        self.accept.abort();
    }
}
