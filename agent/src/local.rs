//! Local sockets: listeners that turn accepted connections into flows, and
//! dialling of targets.

use std::io;
use std::path::Path;
use std::time::Duration;

use bytes::BufMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket, UnixListener, UnixStream, tcp, unix};

use crate::attest::Caller;
use crate::config::LocalSpec;

/// A bound local listener.
#[derive(Debug)]
pub(crate) enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
    /// A `udp://` link's socket: each source address is a flow
    /// ([`crate::datagrams`]).
    Udp(UdpSocket),
}

/// An accepted or dialled local connection.
#[derive(Debug)]
pub(crate) enum LocalConn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// The read half of a local connection.
#[derive(Debug)]
pub(crate) enum LocalRead {
    Tcp(tcp::OwnedReadHalf),
    Unix(unix::OwnedReadHalf),
}

/// The write half of a local connection.
#[derive(Debug)]
pub(crate) enum LocalWrite {
    Tcp(tcp::OwnedWriteHalf),
    Unix(unix::OwnedWriteHalf),
}

impl Listener {
    /// Binds `spec`. A stale Unix socket file (nobody listening) is
    /// replaced; a live one is an error.
    pub(crate) async fn bind(spec: &LocalSpec) -> io::Result<Self> {
        match spec {
            LocalSpec::Tcp(addr) => Ok(Self::Tcp(TcpListener::bind(addr).await?)),
            LocalSpec::Udp(addr) => Ok(Self::Udp(UdpSocket::bind(addr).await?)),
            LocalSpec::Unix(path) => {
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    // The path comes from the controller: never remove
                    // anything but a socket file.
                    if !is_socket(&meta) {
                        return Err(io::Error::new(
                            io::ErrorKind::AlreadyExists,
                            "a file that is not a socket is in the way; comsat only replaces stale sockets",
                        ));
                    }
                    if UnixStream::connect(path).await.is_ok() {
                        return Err(io::Error::new(
                            io::ErrorKind::AddrInUse,
                            "another process is listening on this socket",
                        ));
                    }
                    std::fs::remove_file(path)?;
                }
                Ok(Self::Unix(UnixListener::bind(path)?))
            }
        }
    }

    /// The bound address, for logs (`tcp://IP:PORT` or `unix:///path`).
    pub(crate) fn describe(&self) -> String {
        match self {
            Self::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "tcp://?".into(), |a| format!("tcp://{a}")),
            Self::Unix(l) => l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| format!("unix://{}", p.display())))
                .unwrap_or_else(|| "unix://?".into()),
            Self::Udp(s) => s
                .local_addr()
                .map_or_else(|_| "udp://?".into(), |a| format!("udp://{a}")),
        }
    }

    /// Accepts the next connection, with what it tells of its caller.
    pub(crate) async fn accept(&self) -> io::Result<(LocalConn, Caller)> {
        match self {
            Self::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                let _ = s.set_nodelay(true);
                let local = s.local_addr()?;
                Ok((LocalConn::Tcp(s), Caller::Tcp { peer, local }))
            }
            Self::Unix(l) => {
                let (s, _) = l.accept().await?;
                let cred = s.peer_cred()?;
                let caller = Caller::Unix {
                    pid: cred.pid(),
                    uid: cred.uid(),
                    gid: cred.gid(),
                };
                Ok((LocalConn::Unix(s), caller))
            }
            Self::Udp(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a UDP listener has flows, not connections",
            )),
        }
    }
}

/// Dials a target.
pub(crate) async fn dial(spec: &LocalSpec, timeout: Duration) -> io::Result<LocalConn> {
    let fut = async {
        match spec {
            LocalSpec::Tcp(addr) => {
                let s = TcpStream::connect(addr.as_str()).await?;
                let _ = s.set_nodelay(true);
                Ok(LocalConn::Tcp(s))
            }
            LocalSpec::Unix(path) => Ok(LocalConn::Unix(UnixStream::connect(path).await?)),
            LocalSpec::Udp(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a udp:// target carries datagrams, not streams",
            )),
        }
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "dial timed out"))?
}

impl LocalConn {
    pub(crate) fn split(self) -> (LocalRead, LocalWrite) {
        match self {
            Self::Tcp(s) => {
                let (r, w) = s.into_split();
                (LocalRead::Tcp(r), LocalWrite::Tcp(w))
            }
            Self::Unix(s) => {
                let (r, w) = s.into_split();
                (LocalRead::Unix(r), LocalWrite::Unix(w))
            }
        }
    }
}

/// A local connection taken off the runtime it was registered with, to
/// be registered again with another ([`LocalConn::from_std`]).
#[derive(Debug)]
pub(crate) enum StdConn {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl LocalConn {
    /// Joins the halves of one connection and takes it off its runtime.
    pub(crate) fn into_std(read: LocalRead, write: LocalWrite) -> io::Result<StdConn> {
        match (read, write) {
            (LocalRead::Tcp(r), LocalWrite::Tcp(w)) => Ok(StdConn::Tcp(
                r.reunite(w).map_err(io::Error::other)?.into_std()?,
            )),
            (LocalRead::Unix(r), LocalWrite::Unix(w)) => Ok(StdConn::Unix(
                r.reunite(w).map_err(io::Error::other)?.into_std()?,
            )),
            _ => Err(io::Error::other("halves of different connections")),
        }
    }

    /// Registers a connection with the runtime this is called on.
    pub(crate) fn from_std(conn: StdConn) -> io::Result<Self> {
        Ok(match conn {
            StdConn::Tcp(s) => Self::Tcp(TcpStream::from_std(s)?),
            StdConn::Unix(s) => Self::Unix(UnixStream::from_std(s)?),
        })
    }
}

impl LocalRead {
    /// Reads what is available, at most `max` bytes, after `prefix` zero
    /// bytes and with `spare` bytes of capacity left after them (room for
    /// a record header in front and a tag behind, so the bytes can be
    /// sealed where they lie). Allocates only once data is ready, so an
    /// idle flow holds no buffer. `Ok(None)` at end of stream.
    pub(crate) async fn read_chunk(
        &mut self,
        prefix: usize,
        max: usize,
        spare: usize,
    ) -> io::Result<Option<Vec<u8>>> {
        loop {
            match self {
                Self::Tcp(r) => r.readable().await?,
                Self::Unix(r) => r.readable().await?,
            }
            let mut buf = Vec::with_capacity(prefix + max + spare);
            buf.resize(prefix, 0);
            let mut room = (&mut buf).limit(max);
            let res = match self {
                Self::Tcp(r) => r.try_read_buf(&mut room),
                Self::Unix(r) => r.try_read_buf(&mut room),
            };
            match res {
                Ok(0) => return Ok(None),
                Ok(_) => return Ok(Some(buf)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl LocalWrite {
    fn inner(&mut self) -> &mut (dyn AsyncWrite + Unpin + Send) {
        match self {
            Self::Tcp(w) => w,
            Self::Unix(w) => w,
        }
    }

    /// Writes some of `data`; cancel-safe (nothing is written if the
    /// future is dropped before it completes).
    pub(crate) async fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.inner().write(data).await
    }

    /// Half-closes: the application reads end of stream.
    pub(crate) async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.inner().write_all(data).await
    }

    pub(crate) async fn shutdown(&mut self) -> io::Result<()> {
        self.inner().shutdown().await
    }

    /// Makes the application see a reset rather than a clean end of stream
    /// (TCP: RST via zero linger, sent when the read half is dropped too;
    /// Unix sockets have no reset and just close).
    pub(crate) fn abort(self) {
        match self {
            Self::Tcp(w) => {
                #[allow(deprecated)]
                let _ = w.as_ref().set_linger(Some(Duration::ZERO));
                // Dropping the half would send a FIN first; forgetting it
                // leaves the close (now an RST) to the read half's drop.
                w.forget();
            }
            Self::Unix(w) => drop(w),
        }
    }
}

fn is_socket(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::FileTypeExt;
    meta.file_type().is_socket()
}

/// Removes a Unix socket file we created (and nothing that is not a socket).
pub(crate) fn cleanup(spec: &LocalSpec) {
    if let LocalSpec::Unix(p) = spec {
        let p = Path::new(p);
        if std::fs::symlink_metadata(p).is_ok_and(|m| is_socket(&m)) {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn a_listener_never_removes_a_file_that_is_not_a_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.key");
        std::fs::write(&path, "secret").expect("write");
        let spec = LocalSpec::Unix(path.clone());
        assert!(Listener::bind(&spec).await.is_err());
        cleanup(&spec);
        assert_eq!(
            std::fs::read_to_string(&path).expect("still there"),
            "secret"
        );
    }

    use super::*;
}
