//! Who is calling: the client address every per-client limit is keyed on.
//!
//! Behind proxies, the peer is the nearest proxy and the client is in `X-Forwarded-For`, where
//! every proxy appends the address it received the request from. Only the entries appended by
//! our own proxies can be trusted; everything to their left was written by the client. So with
//! `TRUST_PROXY=N` (N trusted hops) the client is the entry N places from the right, and
//! anything that is not a clean address there falls back to the peer: never to an entry further
//! left, which the client chose. `TRUSTED_PROXIES` restricts whose header is read at all.
//!
//! Limits are kept per [`ClientKey`]: an IPv4 address, or an IPv6 /64, since one host is
//! usually given a whole /64 and would otherwise have 2^64 buckets.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::HeaderMap;
use axum::http::request::Parts;

use crate::error::ApiError;
use crate::state::AppState;

/// An address block in CIDR notation, e.g. `10.0.0.0/8` or `2001:db8::/32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    network: IpAddr,
    prefix: u8,
}

impl IpNet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for IpNet {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network = canonical(
            address
                .trim()
                .parse::<IpAddr>()
                .map_err(|_| format!("{text:?} is not an address or CIDR block"))?,
        );
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(prefix) => prefix
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?} has a bad prefix length"))?,
        };
        Ok(Self { network, prefix })
    }
}

/// How the client address is found (`TRUST_PROXY`, `TRUSTED_PROXIES`).
#[derive(Debug, Clone, Default)]
pub struct ClientIpPolicy {
    /// Proxies between the internet and us that append to `X-Forwarded-For`; 0: use the peer.
    pub trusted_hops: usize,
    /// When set, `X-Forwarded-For` is read only on connections from these networks.
    pub trusted_proxies: Option<Vec<IpNet>>,
}

impl ClientIpPolicy {
    /// The client's address for a request from `peer` carrying `headers`.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if self.trusted_hops == 0 {
            return peer;
        }
        if let Some(trusted) = &self.trusted_proxies
            && !trusted.iter().any(|net| net.contains(peer))
        {
            return peer;
        }
        // Split as bytes: an entry the client forged with bytes outside ASCII must spoil only
        // itself, not the entries our proxies appended to the same line.
        let entries: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .flat_map(|value| value.as_bytes().split(|&b| b == b','))
            .map(|entry| std::str::from_utf8(entry).unwrap_or(""))
            .collect();
        entries
            .len()
            .checked_sub(self.trusted_hops)
            .and_then(|index| parse_forwarded(entries[index]))
            .map_or(peer, canonical)
    }
}

/// One `X-Forwarded-For` entry: `1.2.3.4`, `1.2.3.4:5555`, `2001:db8::1` or `[2001:db8::1]:443`.
fn parse_forwarded(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(socket) = entry.parse::<SocketAddr>() {
        return Some(socket.ip());
    }
    entry
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .and_then(|ip| ip.parse::<Ipv6Addr>().ok())
        .map(IpAddr::V6)
}

/// IPv4 as IPv4 even when it arrives mapped into IPv6 (`::ffff:1.2.3.4` on a dual-stack socket).
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The bucket of per-client limits: the IPv4 address, or the IPv6 /64.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientKey(String);

impl ClientKey {
    pub fn of(ip: IpAddr) -> Self {
        match canonical(ip) {
            IpAddr::V4(v4) => Self(v4.to_string()),
            IpAddr::V6(v6) => {
                let s = v6.segments();
                Self(format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3]))
            }
        }
    }

    /// The IPv6 /48 around `ip` (a site: one tunnel or customer often routes a whole /48, 65,536
    /// /64s); `None` for IPv4.
    pub fn site_of(ip: IpAddr) -> Option<Self> {
        match canonical(ip) {
            IpAddr::V4(_) => None,
            IpAddr::V6(v6) => {
                let s = v6.segments();
                Some(Self(format!("{:x}:{:x}:{:x}::/48", s[0], s[1], s[2])))
            }
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The client address of a request, as [`ClientIpPolicy`] finds it.
#[derive(Debug, Clone, Copy)]
pub struct ClientIp(pub IpAddr);

impl FromRequestParts<AppState> for ClientIp {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), |ConnectInfo(addr)| {
                addr.ip()
            });
        Ok(Self(state.config.client_ip.client_ip(peer, &parts.headers)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append("x-forwarded-for", value.parse().unwrap());
        }
        headers
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn without_trust_the_peer_is_the_client() {
        let policy = ClientIpPolicy::default();
        let forwarded = headers(&["203.0.113.9"]);
        assert_eq!(policy.client_ip(ip("10.0.0.7"), &forwarded), ip("10.0.0.7"));
    }

    #[test]
    fn the_entry_n_hops_from_the_right_is_the_client() {
        let one = ClientIpPolicy {
            trusted_hops: 1,
            trusted_proxies: None,
        };
        let peer = ip("10.0.0.1");
        // Ports and brackets are stripped; the client's own claims to the left are ignored.
        for (value, expected) in [
            ("198.51.100.7, 203.0.113.2", "203.0.113.2"),
            ("203.0.113.5, 10.0.0.7:5555", "10.0.0.7"),
            ("[2001:db8::1]:443", "2001:db8::1"),
            ("2001:db8::2", "2001:db8::2"),
            ("::ffff:192.0.2.1", "192.0.2.1"),
        ] {
            assert_eq!(
                one.client_ip(peer, &headers(&[value])),
                ip(expected),
                "{value}"
            );
        }
        // Entries spread over several header lines count as one list.
        assert_eq!(
            one.client_ip(peer, &headers(&["198.51.100.7", "203.0.113.2"])),
            ip("203.0.113.2")
        );
        let two = ClientIpPolicy {
            trusted_hops: 2,
            trusted_proxies: None,
        };
        assert_eq!(
            two.client_ip(peer, &headers(&["1.1.1.1, 203.0.113.2, 10.0.0.9"])),
            ip("203.0.113.2")
        );
    }

    #[test]
    fn bytes_outside_ascii_spoil_only_their_own_entry() {
        let one = ClientIpPolicy {
            trusted_hops: 1,
            trusted_proxies: None,
        };
        // The client forged "ü" (UTF-8) into the header; the proxy appended the real address to
        // the same line.
        let mut forwarded = HeaderMap::new();
        let line = axum::http::HeaderValue::from_bytes(b"\xc3\xbc, 203.0.113.2").unwrap();
        forwarded.append("x-forwarded-for", line);
        assert_eq!(one.client_ip(ip("10.0.0.1"), &forwarded), ip("203.0.113.2"));
    }

    #[test]
    fn junk_or_too_few_entries_fall_back_to_the_peer_never_further_left() {
        let policy = ClientIpPolicy {
            trusted_hops: 1,
            trusted_proxies: None,
        };
        let peer = ip("10.0.0.1");
        for value in [
            "203.0.113.9, garbage",
            "203.0.113.9, ",
            "unknown",
            "203.0.113.9,[::1",
        ] {
            assert_eq!(policy.client_ip(peer, &headers(&[value])), peer, "{value}");
        }
        assert_eq!(policy.client_ip(peer, &HeaderMap::new()), peer);
        let two = ClientIpPolicy {
            trusted_hops: 2,
            trusted_proxies: None,
        };
        assert_eq!(two.client_ip(peer, &headers(&["203.0.113.2"])), peer);
    }

    #[test]
    fn only_trusted_proxies_are_believed() {
        let policy = ClientIpPolicy {
            trusted_hops: 1,
            trusted_proxies: Some(vec!["10.0.0.0/8".parse().unwrap(), "::1".parse().unwrap()]),
        };
        let forwarded = headers(&["203.0.113.2"]);
        assert_eq!(
            policy.client_ip(ip("10.1.2.3"), &forwarded),
            ip("203.0.113.2")
        );
        assert_eq!(policy.client_ip(ip("::1"), &forwarded), ip("203.0.113.2"));
        assert_eq!(
            policy.client_ip(ip("192.0.2.50"), &forwarded),
            ip("192.0.2.50")
        );
    }

    #[test]
    fn parses_cidr_blocks() {
        let net: IpNet = "192.168.0.0/16".parse().unwrap();
        assert!(net.contains(ip("192.168.44.1")));
        assert!(!net.contains(ip("192.169.0.1")));
        assert!(net.contains(ip("::ffff:192.168.1.1")));
        let all: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("8.8.8.8")));
        let v6: IpNet = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        for bad in ["10.0.0.0/33", "nope", "10.0.0.0/x", "::/129"] {
            assert!(bad.parse::<IpNet>().is_err(), "{bad}");
        }
    }

    #[test]
    fn ipv6_clients_share_a_key_per_64() {
        assert_eq!(
            ClientKey::of(ip("2001:db8:1:2:aaaa::1")),
            ClientKey::of(ip("2001:db8:1:2:bbbb::9"))
        );
        assert_ne!(
            ClientKey::of(ip("2001:db8:1:2::1")),
            ClientKey::of(ip("2001:db8:1:3::1"))
        );
        assert_eq!(ClientKey::of(ip("::ffff:192.0.2.1")).as_str(), "192.0.2.1");
        assert_eq!(
            ClientKey::of(ip("2001:db8::1")).as_str(),
            "2001:db8:0:0::/64"
        );
    }
}
