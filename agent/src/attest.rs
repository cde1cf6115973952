//! Workload attestation: which process is calling a listener, described by
//! the selectors of [`comsat_protocol::workload`].
//!
//! - A Unix socket caller: its credentials from the kernel (`SO_PEERCRED`:
//!   pid, uid and gid when it connected).
//! - A loopback TCP caller: the kernel's socket table (`/proc/net/tcp`,
//!   `tcp6`) names the owner's uid and the socket's inode; the process is
//!   the one of that uid holding the inode among its file descriptors, as
//!   SPIRE's unix attestor and `ss -p` find it. Several processes sharing
//!   the socket (a fork): the first found.
//!
//! Then, where a rule needs them: the executable (`/proc/PID/exe`), its
//! SHA-256 (of the file the process runs, even if replaced on disk since),
//! and the container and pod from the process's cgroup path. What cannot be
//! read stays unknown and matches no rule: an agent not running as root
//! (or with `CAP_SYS_PTRACE`) sees only its own user's processes, so rules
//! on executables then admit only that user's.

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::sync::{Mutex, OnceLock};

use comsat_protocol::workload::{Needs, Selector, Workload};
use procfs::process::{FDTarget, Process};
use sha2::{Digest, Sha256};

/// Largest executable hashed; a larger one has no `unix:sha256`.
const MAX_HASHED: u64 = 1 << 30;

/// Most hashes remembered (by file identity), so that each new connection
/// of a process does not read its executable again.
const MAX_CACHED_HASHES: usize = 256;

/// Most processes looked through for the holder of a TCP socket.
const MAX_PROCESSES: usize = 1 << 16;

/// Who connected, as the accepted socket tells.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Caller {
    /// A Unix socket peer's credentials.
    Unix {
        pid: Option<i32>,
        uid: u32,
        gid: u32,
    },
    /// A TCP connection: the caller's address and ours.
    Tcp { peer: SocketAddr, local: SocketAddr },
}

/// Attests `caller`, learning what `needs` asks beyond uid and gid.
/// Blocking: reads `/proc`.
pub(crate) fn attest(caller: Caller, needs: Needs) -> Workload {
    let mut w = Workload::default();
    let process = match caller {
        Caller::Unix { pid, uid, gid } => {
            w.uid = Some(uid);
            w.gid = Some(gid);
            w.pid = pid.and_then(|p| u32::try_from(p).ok());
            pid.filter(|_| needs.process)
                .and_then(|p| Process::new(p).ok())
        }
        Caller::Tcp { peer, local } => {
            let Some((uid, inode)) = tcp_socket(peer, local) else {
                return w;
            };
            w.uid = Some(uid);
            let process = holder(inode, uid);
            if let Some(p) = &process {
                w.pid = u32::try_from(p.pid()).ok();
                w.gid = p.status().ok().map(|s| s.egid);
            }
            process
        }
    };
    if let Some(p) = process.filter(|_| needs.process) {
        // A path no selector can name (not UTF-8, a control character in
        // it) stays unknown.
        w.path = p
            .exe()
            .ok()
            .and_then(|e| e.to_str().map(str::to_owned))
            .filter(|path| Selector::parse(&format!("unix:path:{path}")).is_ok());
        if needs.sha256 {
            w.sha256 = executable_sha256(&p);
        }
        if let Ok(groups) = p.cgroups() {
            for g in groups.0 {
                let (container, pod) = container_of(&g.pathname);
                w.container = w.container.or(container);
                w.pod = w.pod.or(pod);
            }
        }
    }
    w
}

/// The owner uid and inode of the TCP socket from `peer` to `local`.
fn tcp_socket(peer: SocketAddr, local: SocketAddr) -> Option<(u32, u64)> {
    let same = |a: SocketAddr, b: SocketAddr| {
        a.port() == b.port() && a.ip().to_canonical() == b.ip().to_canonical()
    };
    let tables = if peer.is_ipv4() {
        [procfs::net::tcp, procfs::net::tcp6]
    } else {
        [procfs::net::tcp6, procfs::net::tcp]
    };
    tables.iter().find_map(|table| {
        table().ok()?.into_iter().find_map(|e| {
            (same(e.local_address, peer) && same(e.remote_address, local) && e.inode != 0)
                .then_some((e.uid, e.inode))
        })
    })
}

/// The process of `uid` that holds socket `inode`.
fn holder(inode: u64, uid: u32) -> Option<Process> {
    procfs::process::all_processes()
        .ok()?
        .take(MAX_PROCESSES)
        .flatten()
        .filter(|p| p.uid().ok() == Some(uid))
        .find(|p| {
            p.fd().is_ok_and(|mut fds| {
                fds.any(|fd| {
                    fd.is_ok_and(|fd| matches!(fd.target, FDTarget::Socket(i) if i == inode))
                })
            })
        })
}

/// A file's device, inode, size and change time (seconds, nanoseconds).
type FileIdentity = (u64, u64, u64, i64, i64);

/// The SHA-256 of the executable `p` runs, remembered by the file's
/// identity (device, inode, size, change time).
fn executable_sha256(p: &Process) -> Option<[u8; 32]> {
    static CACHE: OnceLock<Mutex<HashMap<FileIdentity, [u8; 32]>>> = OnceLock::new();
    let mut file = p.open_relative("exe").ok()?;
    let meta = file.metadata().ok()?;
    if meta.len() > MAX_HASHED {
        return None;
    }
    let key = (
        meta.dev(),
        meta.ino(),
        meta.len(),
        meta.ctime(),
        meta.ctime_nsec(),
    );
    let cache = CACHE.get_or_init(Default::default);
    if let Some(hash) = cache.lock().ok()?.get(&key) {
        return Some(*hash);
    }
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = meta.len();
    while left > 0 {
        let n = file.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        left = left.saturating_sub(n as u64);
    }
    let hash: [u8; 32] = hasher.finalize().into();
    let mut cache = cache.lock().ok()?;
    if cache.len() >= MAX_CACHED_HASHES {
        cache.clear();
    }
    cache.insert(key, hash);
    Some(hash)
}

/// The container id and Kubernetes pod uid a cgroup path names, as
/// Docker, containerd, CRI-O and Podman write them under cgroup v1 and v2:
/// `/docker/ID`, `/system.slice/docker-ID.scope`,
/// `/kubepods/besteffort/podUID/ID`,
/// `/kubepods.slice/kubepods-besteffort-podUID.slice/cri-containerd-ID.scope`.
pub(crate) fn container_of(path: &str) -> (Option<String>, Option<String>) {
    let (mut container, mut pod) = (None, None);
    for segment in path.split('/') {
        let s = segment
            .strip_suffix(".scope")
            .or_else(|| segment.strip_suffix(".slice"))
            .unwrap_or(segment);
        if let Some(at) = s.rfind("pod") {
            let uid = &s[at + 3..];
            if uid.len() == 36
                && uid
                    .bytes()
                    .all(|c| c.is_ascii_hexdigit() || c == b'-' || c == b'_')
            {
                pod = Some(uid.replace('_', "-").to_ascii_lowercase());
            }
        }
        let id = s.rsplit(['-', ':']).next().unwrap_or(s);
        if id.len() == 64 && id.bytes().all(|c| c.is_ascii_hexdigit()) {
            container = Some(id.to_ascii_lowercase());
        }
    }
    (container, pod)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containers_and_pods_from_cgroup_paths() {
        let id = "3f1a".repeat(16);
        let pod = "8d4e0c5a-1b2c-4d3e-9f00-0123456789ab";
        assert_eq!(
            container_of(&format!("/docker/{id}")),
            (Some(id.clone()), None)
        );
        assert_eq!(
            container_of(&format!("/system.slice/docker-{id}.scope")),
            (Some(id.clone()), None)
        );
        assert_eq!(
            container_of(&format!("/kubepods/besteffort/pod{pod}/{id}")),
            (Some(id.clone()), Some(pod.into()))
        );
        assert_eq!(
            container_of(&format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{id}.scope",
                pod.replace('-', "_")
            )),
            (Some(id.clone()), Some(pod.into()))
        );
        assert_eq!(
            container_of("/user.slice/user-1000.slice/session-2.scope"),
            (None, None)
        );
        assert_eq!(container_of("/"), (None, None));
    }

    #[tokio::test]
    async fn a_tcp_caller_is_this_process() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("test setup");
        let client = tokio::net::TcpStream::connect(listener.local_addr().expect("test setup"))
            .await
            .expect("test setup");
        let (accepted, peer) = listener.accept().await.expect("test setup");
        let local = accepted.local_addr().expect("test setup");
        let needs = Needs {
            process: true,
            sha256: true,
        };
        let w = tokio::task::spawn_blocking(move || attest(Caller::Tcp { peer, local }, needs))
            .await
            .expect("test setup");
        let me = std::fs::read_link("/proc/self/exe").expect("test setup");
        assert_eq!(w.pid, Some(std::process::id()));
        assert_eq!(w.uid, Some(rustix_uid()));
        assert_eq!(w.path.as_deref(), me.to_str());
        let hash: [u8; 32] = Sha256::digest(std::fs::read(&me).expect("test setup")).into();
        assert_eq!(w.sha256, Some(hash));
        drop(client);
    }

    #[tokio::test]
    async fn a_unix_caller_is_this_process() {
        let dir = tempfile::tempdir().expect("test setup");
        let path = dir.path().join("s.sock");
        let listener = tokio::net::UnixListener::bind(&path).expect("test setup");
        let _client = tokio::net::UnixStream::connect(&path)
            .await
            .expect("test setup");
        let (accepted, _) = listener.accept().await.expect("test setup");
        let cred = accepted.peer_cred().expect("test setup");
        let caller = Caller::Unix {
            pid: cred.pid(),
            uid: cred.uid(),
            gid: cred.gid(),
        };
        let w = attest(
            caller,
            Needs {
                process: true,
                sha256: false,
            },
        );
        assert_eq!(w.pid, Some(std::process::id()));
        assert_eq!(w.uid, Some(rustix_uid()));
        assert_eq!(
            w.path.as_deref(),
            std::fs::read_link("/proc/self/exe")
                .expect("test setup")
                .to_str()
        );
        assert_eq!(w.sha256, None, "not hashed where no rule names a hash");
    }

    fn rustix_uid() -> u32 {
        std::fs::metadata("/proc/self").expect("test setup").uid()
    }
}
