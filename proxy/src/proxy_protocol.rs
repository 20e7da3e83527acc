//! The PROXY protocol (HAProxy, v1 text and v2 binary): behind an L4 load balancer, the
//! balancer's connection carries the device's real address in a header before any TLS or MQTT
//! byte, so that per-IP limits, logs and ACL decisions see the device, not the balancer.
//!
//! Trust is by source network: a listener configured for PROXY accepts connections only from
//! `proxy_protocol_from` (anyone else could claim any address), and from those it requires a
//! header. A `LOCAL` (v2) or `UNKNOWN` (v1) header — the balancer's own health checks — keeps
//! the socket's address.
//!
//! The header is read exactly, never beyond (TLS or MQTT bytes follow and belong to the next
//! layer): 12 bytes decide the version; v2 then gives its length, v1 ends at CRLF within 107
//! bytes. Parsing and validation are the `ppp` crate's.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncReadExt};

const V2_SIGNATURE: [u8; 12] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A];
/// Longest v1 header, CRLF included (the specification's bound).
const V1_MAX: usize = 107;
/// Longest v2 header we take: addresses plus a generous allowance of TLVs.
const V2_MAX_PAYLOAD: usize = 1024;

/// The networks allowed to send PROXY headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trusted(Vec<IpNet>);

impl Trusted {
    /// Parses `10.0.0.0/8, 192.168.1.7, ::1`: networks or single addresses.
    pub fn parse(s: &str) -> Result<Trusted, String> {
        let nets = s
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(|n| {
                n.parse::<IpNet>()
                    .or_else(|_| n.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("{n:?} is not a network or address"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if nets.is_empty() {
            return Err("no network: list the load balancers' addresses (e.g. 10.0.0.0/8)".into());
        }
        Ok(Trusted(nets))
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.0.iter().any(|n| n.contains(&ip))
    }
}

/// Reads the header; returns the client's address (`None`: keep the socket's).
pub async fn read_header<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Option<SocketAddr>, String> {
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.map_err(|e| format!("no PROXY header: {e}"))?;
    if head == V2_SIGNATURE {
        let mut rest = [0u8; 4];
        stream.read_exact(&mut rest).await.map_err(|e| format!("truncated PROXY v2 header: {e}"))?;
        let len = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
        if len > V2_MAX_PAYLOAD {
            return Err(format!("PROXY v2 header of {len} bytes exceeds {V2_MAX_PAYLOAD}"));
        }
        let mut header = Vec::with_capacity(16 + len);
        header.extend_from_slice(&head);
        header.extend_from_slice(&rest);
        header.resize(16 + len, 0);
        stream.read_exact(&mut header[16..]).await.map_err(|e| format!("truncated PROXY v2 header: {e}"))?;
        let parsed = ppp::v2::Header::try_from(header.as_slice()).map_err(|e| format!("bad PROXY v2 header: {e}"))?;
        for tlv in parsed.tlvs() {
            tlv.map_err(|e| format!("bad PROXY v2 TLV: {e}"))?;
        }
        return Ok(match (parsed.command, parsed.addresses) {
            (ppp::v2::Command::Local, _) => None,
            (_, ppp::v2::Addresses::IPv4(a)) => Some(SocketAddr::from((a.source_address, a.source_port))),
            (_, ppp::v2::Addresses::IPv6(a)) => Some(SocketAddr::from((a.source_address, a.source_port))),
            (_, other) => return Err(format!("PROXY v2 header with an unsupported address family {:?}", other.address_family())),
        });
    }
    if !head.starts_with(b"PROXY ") {
        return Err("no PROXY header (the listener requires one)".into());
    }
    let mut line = head.to_vec();
    while !line.ends_with(b"\r\n") {
        if line.len() >= V1_MAX {
            return Err(format!("PROXY v1 header longer than {V1_MAX} bytes"));
        }
        line.push(stream.read_u8().await.map_err(|e| format!("truncated PROXY v1 header: {e}"))?);
    }
    // The v1 header is US-ASCII. Checked here, not left to `ppp`: its v1 parser slices the text
    // by byte offsets and panics inside a multi-byte character (found by the proxy_header fuzz
    // target).
    if !line.is_ascii() {
        return Err("PROXY v1 header is not ASCII".into());
    }
    let text = std::str::from_utf8(&line).map_err(|_| "PROXY v1 header is not ASCII".to_string())?;
    let parsed = ppp::v1::Header::try_from(text).map_err(|e| format!("bad PROXY v1 header: {e}"))?;
    Ok(match parsed.addresses {
        ppp::v1::Addresses::Unknown => None,
        ppp::v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(source: &str, tlvs: &[(u8, &[u8])]) -> Vec<u8> {
        let source = source.parse::<SocketAddr>().unwrap();
        let destination: SocketAddr = if source.is_ipv4() { "10.0.0.1:1883" } else { "[2001:db8::1]:1883" }.parse().unwrap();
        let addrs: ppp::v2::Addresses = (source, destination).into();
        let mut b = ppp::v2::Builder::with_addresses(ppp::v2::Version::Two | ppp::v2::Command::Proxy, ppp::v2::Protocol::Stream, addrs);
        for (kind, value) in tlvs {
            b = b.write_tlv(*kind, value).unwrap();
        }
        b.build().unwrap()
    }

    async fn read(bytes: &[u8]) -> (Result<Option<SocketAddr>, String>, Vec<u8>) {
        let mut s = bytes;
        let r = read_header(&mut s).await;
        (r, s.to_vec())
    }

    #[tokio::test]
    async fn both_versions_give_the_source_and_leave_what_follows() {
        let mut bytes = b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 1883\r\n".to_vec();
        bytes.extend_from_slice(b"\x10MQTT");
        let (r, rest) = read(&bytes).await;
        assert_eq!(r, Ok(Some("203.0.113.7:51000".parse().unwrap())));
        assert_eq!(rest, b"\x10MQTT");

        let mut bytes = v2("[2001:db8::7]:40000", &[(0x04, b"no-op")]);
        bytes.extend_from_slice(b"\x16\x03\x01");
        let (r, rest) = read(&bytes).await;
        assert_eq!(r, Ok(Some("[2001:db8::7]:40000".parse().unwrap())));
        assert_eq!(rest, b"\x16\x03\x01", "the TLS ClientHello is left for TLS");

        let (r, _) = read(b"PROXY UNKNOWN\r\n\x10").await;
        assert_eq!(r, Ok(None));
    }

    #[tokio::test]
    async fn garbage_missing_and_oversized_headers_are_refused_bad_input_a8() {
        for bad in [
            &b"\x10\x0e\x00\x04MQTT\x04\x02\x00\x3c\x00\x02"[..],
            b"PROXY TCP4 999.0.0.1 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 10.0.0.1 1 2",
            "PROXY TCP4 203.0.113.7 10.0.0.1 51 0\r\u{25b}4 2\r\n".as_bytes(),
            b"PROXY TCP4 1.2.3.4 10.0.0.1 1 2 aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n",
        ] {
            assert!(read(bad).await.0.is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        // v2: a TLV whose length runs past the header; a declared length past the limit.
        let mut broken = v2("192.0.2.1:5", &[(0x04, b"abc")]);
        let n = broken.len();
        broken[n - 4] = 0x00;
        broken[n - 3] = 0x09;
        assert!(read(&broken).await.0.is_err());
        let mut huge = v2("192.0.2.1:5", &[]);
        huge[14] = 0xFF;
        huge[15] = 0xFF;
        assert!(read(&huge).await.0.unwrap_err().contains("exceeds"));
    }

    #[test]
    fn trusted_networks_parse_and_match_mapped_addresses() {
        let t = Trusted::parse("10.0.0.0/8, 192.168.1.7 ,::1").unwrap();
        assert!(t.contains("10.1.2.3".parse().unwrap()));
        assert!(t.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(t.contains("192.168.1.7".parse().unwrap()));
        assert!(!t.contains("192.168.1.8".parse().unwrap()));
        assert!(Trusted::parse("").is_err() && Trusted::parse("10.0.0.0/33").is_err());
    }
}
