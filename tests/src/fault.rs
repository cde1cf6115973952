//! A fault-injecting UDP proxy between one agent and a relay: pass,
//! blackhole, or drop a share of datagrams and delay the rest. Loopback
//! only; bounded in clients and queued datagrams.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

/// Most client addresses tracked (agents reconnect from new ports).
const MAX_CLIENTS: usize = 64;
/// Most datagrams waiting out a delay at once; beyond, they are dropped.
const MAX_DELAYED: usize = 10_000;

/// What the proxy does to datagrams, both ways.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything.
    Pass,
    /// Forward nothing.
    Blackhole,
    /// Drop `drop_percent` of datagrams, delay the others by `delay`.
    Lossy {
        /// Share dropped, 0 to 100.
        drop_percent: u8,
        /// Added one-way delay.
        delay: Duration,
    },
}

struct Shared {
    fault: Mutex<Fault>,
    delayed: std::sync::atomic::AtomicUsize,
}

/// A running proxy. Stops when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy on 127.0.0.1 forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Result<Self> {
        Self::start_on(std::net::UdpSocket::bind("127.0.0.1:0")?, upstream)
    }

    /// Starts a proxy on an already bound socket (so its address can be
    /// written into a config before the proxy runs).
    pub fn start_on(front: std::net::UdpSocket, upstream: SocketAddr) -> Result<Self> {
        front.set_nonblocking(true)?;
        let front = Arc::new(UdpSocket::from_std(front)?);
        let addr = front.local_addr()?;
        let shared = Arc::new(Shared {
            fault: Mutex::new(Fault::Pass),
            delayed: Default::default(),
        });
        let task = tokio::spawn(run(front, upstream, shared.clone()));
        Ok(Self { addr, shared, task })
    }

    /// The address agents should dial instead of the relay's.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes what happens to datagrams from now on.
    pub fn set(&self, fault: Fault) {
        *self.shared.fault.lock().unwrap_or_else(|p| p.into_inner()) = fault;
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends `data` on `sock` (to `to`, or connected) subject to the fault.
fn forward(shared: &Arc<Shared>, sock: Arc<UdpSocket>, to: Option<SocketAddr>, data: Vec<u8>) {
    use std::sync::atomic::Ordering;
    let fault = *shared.fault.lock().unwrap_or_else(|p| p.into_inner());
    let delay = match fault {
        Fault::Pass => Duration::ZERO,
        Fault::Blackhole => return,
        Fault::Lossy {
            drop_percent,
            delay,
        } => {
            if rand::random_range(0..100u8) < drop_percent {
                return;
            }
            delay
        }
    };
    let send = move |sock: Arc<UdpSocket>, data: Vec<u8>| async move {
        let _ = match to {
            Some(to) => sock.send_to(&data, to).await,
            None => sock.send(&data).await,
        };
    };
    if delay.is_zero() {
        if let Some(to) = to {
            let _ = sock.try_send_to(&data, to);
        } else {
            let _ = sock.try_send(&data);
        }
        return;
    }
    if shared.delayed.fetch_add(1, Ordering::Relaxed) >= MAX_DELAYED {
        shared.delayed.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    let shared = shared.clone();
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        send(sock, data).await;
        shared.delayed.fetch_sub(1, Ordering::Relaxed);
    });
}

async fn run(front: Arc<UdpSocket>, upstream: SocketAddr, shared: Arc<Shared>) {
    let mut clients: HashMap<SocketAddr, (Arc<UdpSocket>, JoinHandle<()>)> = HashMap::new();
    let mut order: Vec<SocketAddr> = Vec::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, client)) = front.recv_from(&mut buf).await else {
            return;
        };
        if !clients.contains_key(&client) {
            let Ok(back) = UdpSocket::bind("127.0.0.1:0").await else {
                continue;
            };
            if back.connect(upstream).await.is_err() {
                continue;
            }
            let back = Arc::new(back);
            let reply = {
                let (back, front, shared) = (back.clone(), front.clone(), shared.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65_536];
                    while let Ok(n) = back.recv(&mut buf).await {
                        forward(&shared, front.clone(), Some(client), buf[..n].to_vec());
                    }
                })
            };
            if order.len() >= MAX_CLIENTS {
                let oldest = order.remove(0);
                if let Some((_, t)) = clients.remove(&oldest) {
                    t.abort();
                }
            }
            order.push(client);
            clients.insert(client, (back, reply));
        }
        if let Some((back, _)) = clients.get(&client) {
            forward(&shared, back.clone(), None, buf[..n].to_vec());
        }
    }
}
