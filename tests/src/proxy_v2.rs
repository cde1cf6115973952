//! Reading a PROXY protocol v2 header as a service behind a target agent
//! would, by the HAProxy specification (`proxy-protocol.txt`, 2.2).

use anyhow::{Result, bail, ensure};

/// The 12 bytes every v2 header starts with.
pub const SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// A parsed v2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyHeader {
    /// `0x20` LOCAL or `0x21` PROXY.
    pub version_command: u8,
    /// Address family and transport (`0x00`: unspecified).
    pub family: u8,
    /// The address block (empty for `AF_UNSPEC`).
    pub addresses: Vec<u8>,
    /// Its TLVs, in order.
    pub tlvs: Vec<(u8, Vec<u8>)>,
}

impl ProxyHeader {
    /// The value of the first TLV of `kind`, as text.
    pub fn tlv_text(&self, kind: u8) -> Option<String> {
        self.tlvs
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
}

/// Splits `bytes` into the header at its start and what follows.
pub fn split(bytes: &[u8]) -> Result<(ProxyHeader, &[u8])> {
    ensure!(
        bytes.len() >= 16 && bytes.starts_with(SIGNATURE),
        "no PROXY v2 signature at the start of {} bytes",
        bytes.len()
    );
    let version_command = bytes[12];
    ensure!(
        version_command >> 4 == 2,
        "version {}",
        version_command >> 4
    );
    let family = bytes[13];
    let len = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    let Some(body) = bytes.get(16..16 + len) else {
        bail!("header of {len} bytes cut short");
    };
    let addr_len = match family >> 4 {
        0 => 0,
        1 => 12,
        2 => 36,
        3 => 216,
        f => bail!("address family {f}"),
    };
    ensure!(body.len() >= addr_len, "address block cut short");
    let (addresses, mut rest) = body.split_at(addr_len);
    let mut tlvs = Vec::new();
    while !rest.is_empty() {
        ensure!(rest.len() >= 3, "TLV header cut short");
        let n = usize::from(u16::from_be_bytes([rest[1], rest[2]]));
        let Some(value) = rest.get(3..3 + n) else {
            bail!("TLV {:#x} cut short", rest[0]);
        };
        tlvs.push((rest[0], value.to_vec()));
        rest = &rest[3 + n..];
    }
    Ok((
        ProxyHeader {
            version_command,
            family,
            addresses: addresses.to_vec(),
            tlvs,
        },
        &bytes[16 + len..],
    ))
}
