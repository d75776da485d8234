//! A TCP proxy that tests switch off and on, to make PostgreSQL, Redis or RabbitMQ "go away"
//! for one test without touching the shared servers. In front of RabbitMQ it can also act out a
//! resource alarm for the connections through it ([`TcpProxy::block_like_an_alarm`]), which the
//! shared broker cannot do for one test alone.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
    /// While true, a RabbitMQ resource alarm is acted out (see [`TcpProxy::block_like_an_alarm`]).
    alarm: watch::Sender<bool>,
    /// The server speaks AMQP 0-9-1: replies are passed on whole frames at a time, so that a
    /// frame of the proxy's own can go in between.
    amqp: bool,
    /// Connections accepted so far.
    accepted: AtomicUsize,
    /// Each connection's task, and whether the alarm blocks it.
    connections: Mutex<Vec<(AbortHandle, watch::Receiver<bool>)>>,
}

impl TcpProxy {
    /// Starts a proxy on a free loopback port, forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        Self::start_with(upstream, false).await
    }

    async fn start_with(upstream: SocketAddr, amqp: bool) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            upstream,
            up: AtomicBool::new(true),
            replies_held: watch::Sender::new(false),
            alarm: watch::Sender::new(false),
            amqp,
            accepted: AtomicUsize::new(0),
            connections: Mutex::new(Vec::new()),
        });
        let accept_inner = inner.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if !accept_inner.up.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                accept_inner.accepted.fetch_add(1, Ordering::SeqCst);
                let upstream = accept_inner.upstream;
                let held = accept_inner.replies_held.subscribe();
                let alarm = accept_inner.alarm.subscribe();
                let amqp = accept_inner.amqp;
                // Whether the broker has blocked this connection (it published in an alarm).
                let blocked = watch::Sender::new(false);
                let blocked_now = blocked.subscribe();
                let task = tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut client_reads, mut client_writes) = client.into_split();
                    let (mut server_reads, mut server_writes) = server.into_split();
                    let requests = async {
                        if amqp {
                            forward_amqp_requests(
                                &mut client_reads,
                                &mut server_writes,
                                alarm,
                                &blocked,
                            )
                            .await
                        } else {
                            tokio::io::copy(&mut client_reads, &mut server_writes)
                                .await
                                .map(|_| ())
                        }
                    };
                    let replies = async {
                        if amqp {
                            let blocked = blocked.subscribe();
                            forward_frames(&mut server_reads, &mut client_writes, held, blocked)
                                .await
                        } else {
                            forward_replies(&mut server_reads, &mut client_writes, held).await
                        }
                    };
                    // Either direction ending ends the connection, as a dead server would.
                    tokio::select! {
                        _ = requests => {}
                        _ = replies => {}
                    }
                });
                let mut connections = accept_inner.connections.lock().expect("not poisoned");
                connections.retain(|(c, _)| !c.is_finished());
                connections.push((task.abort_handle(), blocked_now));
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
        let proxy = Self::start_with(server.addr(), server.is_broker())
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
            connection.0.abort();
        }
    }

    /// Cuts every open connection, and takes new ones: the network broke for a moment (or the
    /// server's side of a connection was lost), with the server still there.
    pub fn cut_connections(&self) {
        self.go_down();
        self.come_back();
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

    /// Acts out a RabbitMQ memory or disk alarm, as RabbitMQ does it: a connection that publishes
    /// while the alarm lasts is blocked there. The broker reads nothing more from it (the publish
    /// included) and tells it so with `connection.blocked`; connections that only consume go on.
    /// Only for a proxy made by [`TcpProxy::in_front_of`] the broker.
    pub fn block_like_an_alarm(&self) {
        assert!(
            self.inner.amqp,
            "only a proxy in front of the broker can block"
        );
        self.inner.alarm.send_replace(true);
    }

    /// Ends the alarm: each blocked connection gets `connection.unblocked`, and what it sent
    /// meanwhile goes through.
    pub fn unblock(&self) {
        self.inner.alarm.send_replace(false);
    }

    /// How many connections the proxy has accepted.
    pub fn connections_accepted(&self) -> usize {
        self.inner.accepted.load(Ordering::SeqCst)
    }

    /// How many connections through the proxy are open now.
    pub fn connections_open(&self) -> usize {
        let connections = self.inner.connections.lock().expect("not poisoned");
        connections.iter().filter(|(c, _)| !c.is_finished()).count()
    }

    /// Cuts every connection the alarm does not block, and only those: a client loses its
    /// consuming connection while its publishing one is held (as when the broker's consumer
    /// timeout ends a consumer during a long alarm).
    pub fn cut_unblocked(&self) {
        self.cut_where(false);
    }

    /// Cuts every connection the alarm blocks, and only those, with what they hold unread.
    pub fn cut_blocked(&self) {
        self.cut_where(true);
    }

    fn cut_where(&self, blocked_now: bool) {
        let connections = self.inner.connections.lock().expect("not poisoned");
        for (connection, blocked) in connections.iter() {
            if *blocked.borrow() == blocked_now {
                connection.abort();
            }
        }
    }
}

/// AMQP 0-9-1: a frame is a type octet, a channel (2 octets), a payload size (4), the payload,
/// and the end octet 0xCE.
const FRAME_HEADER: usize = 7;
const FRAME_END: u8 = 0xCE;

/// What an AMQP client sends first, outside any frame: "AMQP", 0, 0, 9, 1.
const PROTOCOL_HEADER: usize = 8;

/// Where the frame at the start of `bytes` ends, once all of it is there.
fn frame_end(bytes: &[u8]) -> Option<usize> {
    let header = bytes.get(..FRAME_HEADER)?;
    let size = u32::from_be_bytes([header[3], header[4], header[5], header[6]]);
    let end = FRAME_HEADER + usize::try_from(size).expect("a frame size") + 1;
    (bytes.len() >= end).then_some(end)
}

/// A method frame of `basic.publish` (class 60, method 40).
fn is_publish(frame: &[u8]) -> bool {
    frame.first() == Some(&1) && frame.get(7..11) == Some(&[0, 60, 0, 40][..])
}

/// Copies an AMQP client's frames to the broker. During an alarm, a `basic.publish` blocks the
/// connection: it and everything after it wait for the alarm to end.
async fn forward_amqp_requests(
    client: &mut tokio::net::tcp::OwnedReadHalf,
    server: &mut tokio::net::tcp::OwnedWriteHalf,
    mut alarm: watch::Receiver<bool>,
    blocked: &watch::Sender<bool>,
) -> std::io::Result<()> {
    let mut buffer = vec![0u8; 16 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    let mut header_left = PROTOCOL_HEADER;
    loop {
        let read = client.read(&mut buffer).await?;
        if read == 0 {
            return Ok(());
        }
        pending.extend_from_slice(&buffer[..read]);
        if header_left > 0 {
            let header = header_left.min(pending.len());
            server.write_all(&pending[..header]).await?;
            pending.drain(..header);
            header_left -= header;
        }
        while let Some(end) = frame_end(&pending) {
            if *alarm.borrow_and_update() && is_publish(&pending[..end]) {
                blocked.send_replace(true);
            }
            if *blocked.borrow() {
                if alarm.wait_for(|on| !on).await.is_err() {
                    return Ok(());
                }
                blocked.send_replace(false);
            }
            server.write_all(&pending[..end]).await?;
            pending.drain(..end);
        }
    }
}

/// `connection.blocked` (class 10, method 60, a reason) or `connection.unblocked` (10, 61), as a
/// method frame on channel 0.
fn blocked_frame(blocked: bool) -> Vec<u8> {
    let mut payload = vec![0, 10];
    if blocked {
        let reason = b"low on memory (the test proxy's alarm)";
        payload.extend_from_slice(&[0, 60]);
        payload.push(u8::try_from(reason.len()).expect("a short string"));
        payload.extend_from_slice(reason);
    } else {
        payload.extend_from_slice(&[0, 61]);
    }
    let mut frame = vec![1, 0, 0];
    let size = u32::try_from(payload.len()).expect("a small payload");
    frame.extend_from_slice(&size.to_be_bytes());
    frame.extend_from_slice(&payload);
    frame.push(FRAME_END);
    frame
}

/// Copies the broker's frames to the client whole, waiting while replies are held, and puts a
/// `connection.blocked` or `connection.unblocked` frame in between when the broker blocks this
/// connection or the alarm ends.
async fn forward_frames(
    server: &mut tokio::net::tcp::OwnedReadHalf,
    client: &mut tokio::net::tcp::OwnedWriteHalf,
    mut held: watch::Receiver<bool>,
    mut blocked: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut buffer = vec![0u8; 16 * 1024];
    // Bytes read but not yet passed on: never more than one incomplete frame, so the client is
    // always between two frames, where one of ours can go.
    let mut partial: Vec<u8> = Vec::new();
    let mut told_blocked = false;
    loop {
        let now_blocked = *blocked.borrow_and_update();
        if now_blocked != told_blocked {
            client.write_all(&blocked_frame(now_blocked)).await?;
            told_blocked = now_blocked;
        }
        tokio::select! {
            read = server.read(&mut buffer) => {
                let read = read?;
                if read == 0 {
                    return Ok(());
                }
                partial.extend_from_slice(&buffer[..read]);
            }
            changed = blocked.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                continue;
            }
        }
        let mut whole = 0;
        while let Some(end) = frame_end(&partial[whole..]) {
            whole += end;
        }
        if whole == 0 {
            continue;
        }
        if held.wait_for(|held| !held).await.is_err() {
            return Ok(());
        }
        client.write_all(&partial[..whole]).await?;
        partial.drain(..whole);
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
