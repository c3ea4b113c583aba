//! The SSRF guard on webhook URLs: any text is refused or becomes a target
//! whose every address the policy permits, and no forbidden address gets
//! through. Names resolve from a fixed table that holds both kinds.
#![no_main]

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use libfuzzer_sys::fuzz_target;
use ripen_notify::ssrf::{check, classify, parse, Policy, TableResolver};

/// Polls a future that never waits: the table resolver answers at once.
fn now<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("the check waited on a table resolver"),
    }
}

fuzz_target!(|data: &[u8]| {
    // Any address: the first 16 bytes as an IPv6 one and its low four as IPv4.
    if data.len() >= 16 {
        let bytes: [u8; 16] = data[..16].try_into().expect("16 bytes");
        let v6 = Ipv6Addr::from(bytes);
        let v4 = Ipv4Addr::new(bytes[12], bytes[13], bytes[14], bytes[15]);
        if let Some(inner) = v6.to_ipv4_mapped() {
            // A mapped address is never more permitted than its IPv4 one.
            if classify(IpAddr::V4(inner)).is_some() {
                assert!(classify(IpAddr::V6(v6)).is_some(), "{v6}");
            }
        }
        let _ = classify(IpAddr::V4(v4));
    }
    let Ok(url) = std::str::from_utf8(data) else {
        return;
    };
    let resolver = TableResolver::new()
        .with(
            "public.test",
            &[IpAddr::V4(Ipv4Addr::new(93, 184, 215, 14))],
        )
        .with("inside.test", &[IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))])
        .with(
            "mixed.test",
            &[
                IpAddr::V4(Ipv4Addr::new(93, 184, 215, 14)),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ],
        );
    let policy = Policy::default();
    let parsed = parse(url);
    match now(check(url, &policy, &resolver)) {
        Ok(target) => {
            assert!(parsed.is_ok(), "checked but does not parse: {url:?}");
            assert!(!target.addrs.is_empty(), "{url:?}");
            for addr in &target.addrs {
                assert!(policy.permits(addr.ip()), "{url:?} reaches {addr}");
                assert_eq!(addr.port(), target.url.port());
            }
        }
        Err(_) => {}
    }
});
