//! Which IP addresses a webhook may reach: the forbidden ranges, the
//! operator's allowed ranges (`notify.allow_networks`), and the [`Policy`]
//! that combines them.
//!
//! Pure: no I/O. The ranges are data (the tables below), checked in order,
//! the most specific first.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// Why an address is not a place a webhook may go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Forbidden {
    /// `0.0.0.0`, `::`.
    Unspecified,
    /// `0.0.0.0/8`: "this network".
    ThisNetwork,
    /// `127.0.0.0/8`, `::1`.
    Loopback,
    /// RFC 1918 (`10/8`, `172.16/12`, `192.168/16`), IPv6 unique local
    /// `fc00::/7` and the local-use NAT64 prefix `64:ff9b:1::/48`.
    Private,
    /// `100.64.0.0/10`: carrier-grade NAT.
    SharedCgnat,
    /// `169.254.0.0/16`, `fe80::/10`.
    LinkLocal,
    /// `224.0.0.0/4`, `ff00::/8`.
    Multicast,
    /// `255.255.255.255`.
    Broadcast,
    /// `192.0.2/24`, `198.51.100/24`, `203.0.113/24`, `2001:db8::/32`,
    /// `3fff::/20`.
    Documentation,
    /// `198.18.0.0/15`, `2001:2::/48`.
    Benchmarking,
    /// `192.0.0.0/24`, `192.88.99.0/24`, `240.0.0.0/4`, ORCHID, and every
    /// IPv6 address outside the global unicast range `2000::/3` that no
    /// other class names.
    Reserved,
    /// `::ffff:a.b.c.d` whose IPv4 address is not itself forbidden: a
    /// webhook names the IPv4 address directly.
    Ipv4Mapped,
    /// `::a.b.c.d` (deprecated) whose IPv4 address is not itself forbidden.
    Ipv4Compatible,
}

impl Forbidden {
    /// A short stable name, for logs, metrics and problem details.
    pub fn code(self) -> &'static str {
        match self {
            Forbidden::Unspecified => "unspecified",
            Forbidden::ThisNetwork => "this-network",
            Forbidden::Loopback => "loopback",
            Forbidden::Private => "private",
            Forbidden::SharedCgnat => "cgnat",
            Forbidden::LinkLocal => "link-local",
            Forbidden::Multicast => "multicast",
            Forbidden::Broadcast => "broadcast",
            Forbidden::Documentation => "documentation",
            Forbidden::Benchmarking => "benchmarking",
            Forbidden::Reserved => "reserved",
            Forbidden::Ipv4Mapped => "ipv4-mapped",
            Forbidden::Ipv4Compatible => "ipv4-compatible",
        }
    }
}

impl fmt::Display for Forbidden {
    /// The class as a noun phrase: "a link-local address".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Forbidden::Unspecified => "the unspecified address",
            Forbidden::ThisNetwork => "a \"this network\" address (0.0.0.0/8)",
            Forbidden::Loopback => "a loopback address",
            Forbidden::Private => "a private address",
            Forbidden::SharedCgnat => "a shared (carrier-grade NAT) address",
            Forbidden::LinkLocal => "a link-local address",
            Forbidden::Multicast => "a multicast address",
            Forbidden::Broadcast => "the broadcast address",
            Forbidden::Documentation => "a documentation address",
            Forbidden::Benchmarking => "a benchmarking address",
            Forbidden::Reserved => "a reserved address",
            Forbidden::Ipv4Mapped => "an IPv4-mapped IPv6 address",
            Forbidden::Ipv4Compatible => "an IPv4-compatible IPv6 address",
        })
    }
}

/// The forbidden IPv4 ranges: network, prefix length, class. The first
/// match wins.
const V4_RANGES: &[(u32, u8, Forbidden)] = &[
    (0x0000_0000, 32, Forbidden::Unspecified),
    (0xffff_ffff, 32, Forbidden::Broadcast),
    (0x0000_0000, 8, Forbidden::ThisNetwork),
    (0x0a00_0000, 8, Forbidden::Private),
    (0x6440_0000, 10, Forbidden::SharedCgnat),
    (0x7f00_0000, 8, Forbidden::Loopback),
    (0xa9fe_0000, 16, Forbidden::LinkLocal),
    (0xac10_0000, 12, Forbidden::Private),
    (0xc000_0000, 24, Forbidden::Reserved),
    (0xc000_0200, 24, Forbidden::Documentation),
    (0xc058_6300, 24, Forbidden::Reserved),
    (0xc0a8_0000, 16, Forbidden::Private),
    (0xc612_0000, 15, Forbidden::Benchmarking),
    (0xc633_6400, 24, Forbidden::Documentation),
    (0xcb00_7100, 24, Forbidden::Documentation),
    (0xe000_0000, 4, Forbidden::Multicast),
    (0xf000_0000, 4, Forbidden::Reserved),
];

/// The forbidden IPv6 ranges that embed no IPv4 address. The first match
/// wins; an address outside `2000::/3` that matches none is reserved.
const V6_RANGES: &[(u128, u8, Forbidden)] = &[
    (0xfe80 << 112, 10, Forbidden::LinkLocal),
    (0xfc00 << 112, 7, Forbidden::Private),
    (0xff00 << 112, 8, Forbidden::Multicast),
    (0x0064_ff9b_0001 << 80, 48, Forbidden::Private),
    (0x2001_0db8 << 96, 32, Forbidden::Documentation),
    (0x3fff << 112, 20, Forbidden::Documentation),
    (0x2001_0002_0000 << 80, 48, Forbidden::Benchmarking),
    (0x2001_0010 << 96, 28, Forbidden::Reserved),
    (0x2001_0020 << 96, 28, Forbidden::Reserved),
];

/// The NAT64 well-known prefix `64:ff9b::/96`: the low 32 bits are an
/// IPv4 address.
const NAT64: u128 = 0x0064_ff9b << 96;
/// `2002::/16`: 6to4, bits 16..48 are an IPv4 address.
const SIX_TO_FOUR: u128 = 0x2002 << 112;
/// `2001::/32`: Teredo, bits 32..64 are the server's IPv4 address and the
/// low 32 bits the client's, inverted.
const TEREDO: u128 = 0x2001_0000 << 96;
/// `2000::/3`: global unicast.
const GLOBAL_UNICAST: u128 = 0x2000 << 112;

fn in_range_v4(ip: u32, net: u32, prefix: u8) -> bool {
    prefix == 0 || ip >> (32 - prefix) == net >> (32 - prefix)
}

fn in_range_v6(ip: u128, net: u128, prefix: u8) -> bool {
    prefix == 0 || ip >> (128 - prefix) == net >> (128 - prefix)
}

/// The forbidden class of an address, or `None` for an address a webhook
/// may reach. IPv6 forms that embed an IPv4 address (mapped, compatible,
/// NAT64, 6to4, Teredo) are judged by the address they embed.
pub fn classify(ip: IpAddr) -> Option<Forbidden> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<Forbidden> {
    let ip = u32::from(ip);
    V4_RANGES
        .iter()
        .find(|(net, prefix, _)| in_range_v4(ip, *net, *prefix))
        .map(|(_, _, class)| *class)
}

fn classify_v6(ip: Ipv6Addr) -> Option<Forbidden> {
    let n = u128::from(ip);
    let low32 = Ipv4Addr::from(n as u32);
    if n == 0 {
        return Some(Forbidden::Unspecified);
    }
    if n == 1 {
        return Some(Forbidden::Loopback);
    }
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(classify_v4(v4).unwrap_or(Forbidden::Ipv4Mapped));
    }
    if n >> 32 == 0 {
        return Some(classify_v4(low32).unwrap_or(Forbidden::Ipv4Compatible));
    }
    if in_range_v6(n, NAT64, 96) {
        return classify_v4(low32);
    }
    if in_range_v6(n, SIX_TO_FOUR, 16) {
        return classify_v4(Ipv4Addr::from((n >> 80) as u32));
    }
    if in_range_v6(n, TEREDO, 32) {
        let server = Ipv4Addr::from((n >> 64) as u32);
        let client = Ipv4Addr::from(!(n as u32));
        return classify_v4(server).or_else(|| classify_v4(client));
    }
    if let Some((_, _, class)) = V6_RANGES
        .iter()
        .find(|(net, prefix, _)| in_range_v6(n, *net, *prefix))
    {
        return Some(*class);
    }
    if !in_range_v6(n, GLOBAL_UNICAST, 3) {
        return Some(Forbidden::Reserved);
    }
    None
}

/// A CIDR range such as `10.1.0.0/16` or `fd00::/8`. A bare address is a
/// range of one (`/32`, `/128`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The first address of the range.
    pub fn network(&self) -> IpAddr {
        self.network
    }

    /// The prefix length in bits.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is in the range. An IPv4 range holds no IPv6 address,
    /// not even an IPv4-mapped one.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                in_range_v4(u32::from(ip), u32::from(net), self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                in_range_v6(u128::from(ip), u128::from(net), self.prefix)
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = String;

    /// Parses `address/prefix` (strict dotted-quad IPv4 or IPv6, a decimal
    /// prefix length). Host bits must be zero: `10.1.2.3/16` is refused
    /// with the range it probably means.
    fn from_str(text: &str) -> Result<Cidr, String> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = address
            .parse()
            .map_err(|_| format!("{address:?} is not an IPv4 or IPv6 address"))?;
        let bits = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(p) => {
                if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(format!(
                        "the prefix length {p:?} is not a number from 0 to {bits}"
                    ));
                }
                let prefix: u8 = p.parse().map_err(|_| {
                    format!("the prefix length {p:?} is not a number from 0 to {bits}")
                })?;
                if prefix > bits {
                    return Err(format!(
                        "the prefix length {prefix} is more than the {bits} bits of an {} address",
                        if network.is_ipv4() { "IPv4" } else { "IPv6" }
                    ));
                }
                prefix
            }
        };
        let masked = mask(network, prefix);
        if masked != network {
            return Err(format!(
                "{address} has bits set past the prefix length {prefix}; write {masked}/{prefix}"
            ));
        }
        Ok(Cidr { network, prefix })
    }
}

fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let keep = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) & keep))
        }
        IpAddr::V6(v6) => {
            let keep = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & keep))
        }
    }
}

/// Which addresses webhooks may reach: every address that is not
/// forbidden, and the forbidden ones inside a range the operator allowed
/// (`notify.allow_networks`). The default allows nothing forbidden.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    allow: Vec<Cidr>,
}

impl Policy {
    /// A policy from the operator's allowed CIDR ranges, such as
    /// `"127.0.0.0/8"`, `"::1/128"`, `"10.1.0.0/16"`. The error names the
    /// entry and what is wrong with it.
    pub fn new(allow: &[String]) -> Result<Policy, String> {
        let allow = allow
            .iter()
            .enumerate()
            .map(|(i, text)| {
                text.trim().parse::<Cidr>().map_err(|problem| {
                    format!("notify.allow_networks[{i}] = {text:?} is not a CIDR range: {problem}")
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Policy { allow })
    }

    /// The allowed ranges, in the order given.
    pub fn allowed(&self) -> &[Cidr] {
        &self.allow
    }

    /// Why a webhook may not reach `ip`, or `None` if it may: the address
    /// is not forbidden, or it is inside an allowed range.
    pub fn forbids(&self, ip: IpAddr) -> Option<Forbidden> {
        let class = classify(ip)?;
        if self.allow.iter().any(|range| range.contains(ip)) {
            return None;
        }
        Some(class)
    }

    /// Whether a webhook may reach `ip`.
    pub fn permits(&self, ip: IpAddr) -> bool {
        self.forbids(ip).is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn the_tables_are_well_formed() {
        for (net, prefix, class) in V4_RANGES {
            let cidr = Cidr {
                network: IpAddr::V4(Ipv4Addr::from(*net)),
                prefix: *prefix,
            };
            assert_eq!(
                cidr.to_string().parse::<Cidr>(),
                Ok(cidr),
                "{cidr} ({class:?}) has host bits set"
            );
        }
        for (net, prefix, class) in V6_RANGES {
            let cidr = Cidr {
                network: IpAddr::V6(Ipv6Addr::from(*net)),
                prefix: *prefix,
            };
            assert_eq!(
                cidr.to_string().parse::<Cidr>(),
                Ok(cidr),
                "{cidr} ({class:?}) has host bits set"
            );
        }
    }

    #[test]
    fn range_boundaries() {
        let cases = [
            ("100.63.255.255", None),
            ("100.64.0.0", Some(Forbidden::SharedCgnat)),
            ("100.127.255.255", Some(Forbidden::SharedCgnat)),
            ("100.128.0.0", None),
            ("172.15.255.255", None),
            ("172.16.0.0", Some(Forbidden::Private)),
            ("172.31.255.255", Some(Forbidden::Private)),
            ("172.32.0.0", None),
            ("198.17.255.255", None),
            ("198.18.0.0", Some(Forbidden::Benchmarking)),
            ("198.19.255.255", Some(Forbidden::Benchmarking)),
            ("198.20.0.0", None),
            ("223.255.255.255", None),
            ("224.0.0.0", Some(Forbidden::Multicast)),
            ("239.255.255.255", Some(Forbidden::Multicast)),
            ("240.0.0.0", Some(Forbidden::Reserved)),
            ("255.255.255.254", Some(Forbidden::Reserved)),
            ("255.255.255.255", Some(Forbidden::Broadcast)),
            ("0.0.0.0", Some(Forbidden::Unspecified)),
            ("0.255.255.255", Some(Forbidden::ThisNetwork)),
            ("1.0.0.0", None),
            ("1fff:ffff::1", Some(Forbidden::Reserved)),
            ("2000::", None),
            ("3ffe:ffff::1", None),
            ("3fff::1", Some(Forbidden::Documentation)),
            ("4000::1", Some(Forbidden::Reserved)),
            ("2001:db7:ffff::1", None),
            ("2001:db8::", Some(Forbidden::Documentation)),
            ("2001:db9::", None),
            ("64:ff9b::808:808", None),
            ("64:ff9b::a00:1", Some(Forbidden::Private)),
            ("64:ff9b:1::808:808", Some(Forbidden::Private)),
            ("2002:808:808::", None),
            ("2002:a9fe:a9fe::1", Some(Forbidden::LinkLocal)),
            // Teredo: server 65.54.227.120, client 127.0.0.1 (inverted).
            (
                "2001:0:4136:e378:8000:63bf:80ff:fffe",
                Some(Forbidden::Loopback),
            ),
            // Teredo: server 65.54.227.120, client 8.8.8.8 (inverted).
            ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", None),
        ];
        for (text, want) in cases {
            assert_eq!(classify(ip(text)), want, "{text}");
        }
    }

    #[test]
    fn cidr_errors_say_what_to_write() {
        let cases = [
            ("10.1.2.3/16", "write 10.1.0.0/16"),
            ("10.0.0.0/33", "more than the 32 bits of an IPv4 address"),
            ("::1/129", "more than the 128 bits of an IPv6 address"),
            ("10.0.0.0/", "is not a number from 0 to 32"),
            ("10.0.0.0/+8", "is not a number from 0 to 32"),
            ("10.0.0/8", "is not an IPv4 or IPv6 address"),
            ("localhost/8", "is not an IPv4 or IPv6 address"),
        ];
        for (text, want) in cases {
            let e = text.parse::<Cidr>().unwrap_err();
            assert!(e.contains(want), "{text}: {e:?} should contain {want:?}");
        }
        assert_eq!(
            "10.1.2.3".parse::<Cidr>().map(|c| c.to_string()),
            Ok("10.1.2.3/32".to_owned())
        );
        assert_eq!(
            "0.0.0.0/0"
                .parse::<Cidr>()
                .map(|c| c.contains(ip("8.8.8.8"))),
            Ok(true)
        );
    }

    #[test]
    fn policy_errors_name_the_entry() {
        let e = Policy::new(&["127.0.0.0/8".into(), "10.0.0.0/33".into()]).unwrap_err();
        assert!(
            e.starts_with("notify.allow_networks[1] = \"10.0.0.0/33\" is not a CIDR range"),
            "{e}"
        );
    }

    #[test]
    fn an_allowed_range_permits_only_itself() {
        let policy = Policy::new(&["127.0.0.0/8".into(), "fd00:1::/32".into()]).unwrap();
        assert!(policy.permits(ip("127.0.0.1")));
        assert!(policy.permits(ip("127.255.255.254")));
        assert!(policy.permits(ip("fd00:1::5")));
        assert!(policy.permits(ip("8.8.8.8")));
        assert_eq!(policy.forbids(ip("::1")), Some(Forbidden::Loopback));
        assert_eq!(
            policy.forbids(ip("::ffff:127.0.0.1")),
            Some(Forbidden::Loopback)
        );
        assert_eq!(policy.forbids(ip("fd00:2::5")), Some(Forbidden::Private));
        assert_eq!(policy.forbids(ip("10.0.0.1")), Some(Forbidden::Private));
        assert_eq!(
            Policy::default().forbids(ip("127.0.0.1")),
            Some(Forbidden::Loopback)
        );
    }
}
