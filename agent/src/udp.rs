//! The agent's UDP sockets toward relays.

use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// Socket buffer size asked of the kernel (capped by `net.core.rmem_max` /
/// `wmem_max`; raise those on a busy agent). Bursts of QUIC datagrams that
/// overflow a small receive buffer are dropped and read as congestion.
pub(crate) const SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// The unspecified address of `remote`'s family, any port: where a socket
/// toward `remote` binds.
pub(crate) fn unspecified(remote: SocketAddr) -> SocketAddr {
    if remote.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    }
}

/// A UDP socket bound to `addr` with large kernel buffers.
pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Serve IPv4 too when bound to [::].
        let _ = socket.set_only_v6(false);
    }
    // Best effort: the kernel caps these at its maximums.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}
