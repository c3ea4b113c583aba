//! Properties of the SSRF guard's pure parts: the IPv4 host parser reads
//! every notation of an address as that address, `classify` agrees with
//! the standard library where it has a helper, and no input makes the URL
//! parser panic or normalise unstably.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;
use ripen_notify::ssrf::{classify, parse, Cidr, Forbidden, Host, Policy};

/// How one part of a dotted IPv4 host is written.
#[derive(Clone, Copy, Debug)]
enum Radix {
    Decimal,
    /// `0x` or `0X`, with leading zeros.
    Hex {
        upper: bool,
        zeros: usize,
    },
    /// `0` and leading zeros.
    Octal {
        zeros: usize,
    },
}

fn radix() -> impl Strategy<Value = Radix> {
    prop_oneof![
        Just(Radix::Decimal),
        (any::<bool>(), 0..3usize).prop_map(|(upper, zeros)| Radix::Hex { upper, zeros }),
        (0..3usize).prop_map(|zeros| Radix::Octal { zeros }),
    ]
}

fn write(n: u32, radix: Radix) -> String {
    match radix {
        Radix::Decimal => n.to_string(),
        Radix::Hex { upper, zeros } => {
            let digits = if upper {
                format!("{n:X}")
            } else {
                format!("{n:x}")
            };
            format!(
                "0{}{}{digits}",
                if upper { 'X' } else { 'x' },
                "0".repeat(zeros)
            )
        }
        Radix::Octal { zeros } => format!("0{}{n:o}", "0".repeat(zeros)),
    }
}

/// `ip` written in `parts` parts (1 to 4): the last part fills the bytes
/// the others leave, as in `127.1` or `2130706433`.
fn notation(ip: u32, parts: usize, radixes: &[Radix], trailing_dot: bool) -> String {
    let bytes = ip.to_be_bytes();
    let mut written: Vec<String> = (0..parts - 1)
        .map(|i| write(u32::from(bytes[i]), radixes[i]))
        .collect();
    let rest = bytes[parts - 1..]
        .iter()
        .fold(0u32, |n, b| (n << 8) | u32::from(*b));
    written.push(write(rest, radixes[parts - 1]));
    let mut host = written.join(".");
    if trailing_dot {
        host.push('.');
    }
    host
}

fn host_of(url: &str) -> Result<Host, String> {
    parse(url)
        .map(|u| u.host().clone())
        .map_err(|e| e.to_string())
}

/// IPv4 addresses, with the forbidden ranges' neighbourhoods well covered.
fn ipv4() -> impl Strategy<Value = Ipv4Addr> {
    let prefixes: Vec<u32> = vec![
        0x0000_0000,
        0x0a00_0000,
        0x6440_0000,
        0x7f00_0000,
        0xa9fe_0000,
        0xac10_0000,
        0xc000_0000,
        0xc000_0200,
        0xc0a8_0000,
        0xc612_0000,
        0xc633_6400,
        0xcb00_7100,
        0xe000_0000,
        0xf000_0000,
        0xffff_ff00,
    ];
    prop_oneof![
        any::<u32>().prop_map(Ipv4Addr::from),
        (prop::sample::select(prefixes), any::<u32>(), 0..24u32)
            .prop_map(|(net, noise, bits)| Ipv4Addr::from(net ^ (noise >> (8 + bits)))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn every_notation_of_an_ipv4_address_is_that_address(
        ip in any::<u32>(),
        parts in 1..=4usize,
        radixes in prop::collection::vec(radix(), 4),
        trailing_dot in any::<bool>(),
    ) {
        let host = notation(ip, parts, &radixes, trailing_dot);
        let want = Host::Ip(IpAddr::V4(Ipv4Addr::from(ip)));
        prop_assert_eq!(host_of(&format!("http://{host}/")), Ok(want.clone()), "{}", host);
        prop_assert_eq!(host_of(&format!("https://{host}:8443/x")), Ok(want), "{}", host);
    }

    #[test]
    fn the_four_plain_forms_agree(ip in any::<u32>()) {
        let want = Ok(Host::Ip(IpAddr::V4(Ipv4Addr::from(ip))));
        for host in [
            ip.to_string(),
            format!("0x{ip:x}"),
            format!("0{ip:o}"),
            Ipv4Addr::from(ip).to_string(),
        ] {
            prop_assert_eq!(host_of(&format!("http://{host}/")), want.clone(), "{}", host);
        }
    }

    #[test]
    fn numbers_past_32_bits_are_refused(extra in 1u64..=u64::from(u32::MAX)) {
        let n = u64::from(u32::MAX) + extra;
        for host in [n.to_string(), format!("0x{n:x}"), format!("0{n:o}")] {
            let url = format!("http://{host}/");
            prop_assert_eq!(parse(&url).map_err(|e| e.code()), Err("host"), "{}", host);
        }
    }

    #[test]
    fn classify_agrees_with_the_standard_library_for_ipv4(ip in ipv4()) {
        let class = classify(IpAddr::V4(ip));
        let pairs = [
            (ip.is_unspecified(), Forbidden::Unspecified),
            (ip.is_loopback(), Forbidden::Loopback),
            (ip.is_private(), Forbidden::Private),
            (ip.is_link_local(), Forbidden::LinkLocal),
            (ip.is_multicast(), Forbidden::Multicast),
            (ip.is_broadcast(), Forbidden::Broadcast),
            (ip.is_documentation(), Forbidden::Documentation),
        ];
        for (std_says, forbidden) in pairs {
            prop_assert_eq!(std_says, class == Some(forbidden), "{} is {:?}", ip, class);
        }
    }

    #[test]
    fn classify_agrees_with_the_standard_library_for_ipv6(bits in any::<u128>(), top in any::<u16>()) {
        // Random addresses rarely land in a special range: also try the
        // top 16 bits of each interesting prefix.
        for n in [bits, (u128::from(top) << 112) | (bits >> 16)] {
            let ip = Ipv6Addr::from(n);
            let class = classify(IpAddr::V6(ip));
            if ip.is_loopback() {
                prop_assert_eq!(class, Some(Forbidden::Loopback), "{}", ip);
            }
            if ip.is_unspecified() {
                prop_assert_eq!(class, Some(Forbidden::Unspecified), "{}", ip);
            }
            if ip.is_multicast() {
                prop_assert_eq!(class, Some(Forbidden::Multicast), "{}", ip);
            }
            if ip.is_unique_local() {
                prop_assert_eq!(class, Some(Forbidden::Private), "{}", ip);
            }
            if ip.is_unicast_link_local() {
                prop_assert_eq!(class, Some(Forbidden::LinkLocal), "{}", ip);
            }
            if class.is_none() {
                // Only global unicast addresses may pass, besides NAT64.
                prop_assert!(n >> 125 == 1 || n >> 32 == 0x0064_ff9b << 64, "{}", ip);
            }
        }
    }

    #[test]
    fn an_embedded_ipv4_address_is_judged_as_itself(ip in ipv4()) {
        let v4 = classify(IpAddr::V4(ip));
        let mapped = classify(IpAddr::V6(ip.to_ipv6_mapped()));
        prop_assert_eq!(mapped, Some(v4.unwrap_or(Forbidden::Ipv4Mapped)));
        let nat64 = Ipv6Addr::from((0x0064_ff9b_u128 << 96) | u128::from(u32::from(ip)));
        prop_assert_eq!(classify(IpAddr::V6(nat64)), v4);
        let six_to_four = Ipv6Addr::from((0x2002_u128 << 112) | (u128::from(u32::from(ip)) << 80) | 1);
        prop_assert_eq!(classify(IpAddr::V6(six_to_four)), v4);
    }

    #[test]
    fn an_allowed_range_permits_its_addresses(ip in ipv4(), prefix in 0..=32u8, noise in any::<u32>()) {
        let keep = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
        let network = Ipv4Addr::from(u32::from(ip) & keep);
        let policy = Policy::new(&[format!("{network}/{prefix}")]).unwrap();
        let inside = Ipv4Addr::from((u32::from(ip) & keep) | (noise & !keep));
        prop_assert!(policy.permits(IpAddr::V4(inside)), "{} in {}/{}", inside, network, prefix);
        let cidr: Cidr = format!("{network}/{prefix}").parse().unwrap();
        prop_assert_eq!(cidr.to_string(), format!("{network}/{prefix}"));
        if prefix > 0 {
            // The same address with the range's last network bit flipped.
            let outside = Ipv4Addr::from(u32::from(inside) ^ (1u32 << (32 - u32::from(prefix))));
            prop_assert!(!cidr.contains(IpAddr::V4(outside)));
            prop_assert_eq!(
                policy.permits(IpAddr::V4(outside)),
                classify(IpAddr::V4(outside)).is_none(),
                "{} outside {}/{}", outside, network, prefix
            );
        }
    }

    #[test]
    fn the_parser_never_panics_and_normalises_once(
        tail in "[a-zA-Z0-9.:\\[\\]%@#?/_~ä-]{0,40}",
        scheme in prop::sample::select(vec!["http://", "https://", "HTTP://", "http:", ""]),
    ) {
        let url = format!("{scheme}{tail}");
        if let Ok(parsed) = parse(&url) {
            let again = parse(&parsed.to_string());
            prop_assert_eq!(again.as_ref(), Ok(&parsed), "{} -> {}", url, parsed);
        }
    }
}
