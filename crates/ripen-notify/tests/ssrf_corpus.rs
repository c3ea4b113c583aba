//! The SSRF guard against a corpus of URLs: every disguise of a forbidden
//! address and every malformed URL must be refused with its class, and
//! public URLs must pass with the addresses they mean.

use std::net::IpAddr;

use ripen_notify::ssrf::{check, parse, Host, Policy, Refusal, TableResolver};

/// Names the corpus resolves, as a user's DNS zone might answer them.
fn resolver() -> TableResolver {
    let ip = |text: &str| text.parse::<IpAddr>().unwrap();
    TableResolver::new()
        .with("localtest.example", &[ip("127.0.0.1")])
        .with("metadata.internal", &[ip("169.254.169.254")])
        .with("mixed.example", &[ip("93.184.215.14"), ip("10.0.0.5")])
        .with(
            "mixed-late.example",
            &[ip("2606:4700::1111"), ip("8.8.8.8"), ip("192.168.7.7")],
        )
        .with("v6local.example", &[ip("::1")])
        .with("ula.example", &[ip("fd00::1")])
        .with("mapped.example", &[ip("::ffff:127.0.0.1")])
        .with("cgnat.example", &[ip("100.64.1.1")])
        .with("empty.example", &[])
        .with("public.example", &[ip("93.184.215.14")])
        .with("public6.example", &[ip("2606:4700::1111")])
        .with(
            "dual.example",
            &[ip("93.184.215.14"), ip("2606:4700::1111")],
        )
}

/// URLs that must be refused, and the refusal's code.
const REFUSED: &[(&str, &str)] = &[
    // Loopback, in every notation.
    ("http://127.0.0.1/", "loopback"),
    ("http://127.0.0.1:8080/admin", "loopback"),
    ("https://127.0.0.1:443/", "loopback"),
    ("HTTP://127.0.0.1/", "loopback"),
    ("http://127.255.255.254/", "loopback"),
    ("http://2130706433/", "loopback"),
    ("http://0x7f000001/", "loopback"),
    ("http://0X7F000001/", "loopback"),
    ("http://017700000001/", "loopback"),
    ("http://0177.0.0.1/", "loopback"),
    ("http://0x7f.0.0.1/", "loopback"),
    ("http://0x7f.1/", "loopback"),
    ("http://127.1/", "loopback"),
    ("http://127.0.1/", "loopback"),
    ("http://0177.1/", "loopback"),
    ("http://0x7f.0x0.0x0.0x1/", "loopback"),
    ("http://0177.0x0.0.01/", "loopback"),
    ("http://127.000.000.001/", "loopback"),
    ("http://127.0.0.0x1/", "loopback"),
    ("http://127.0.0.1./", "loopback"),
    ("http://127.1./", "loopback"),
    ("http://%31%32%37.0.0.1/", "loopback"),
    ("http://127%2E0%2E0%2E1/", "loopback"),
    ("http://[::1]/", "loopback"),
    ("http://[0:0:0:0:0:0:0:1]/", "loopback"),
    ("http://[::ffff:127.0.0.1]/", "loopback"),
    ("http://[::ffff:7f00:1]/", "loopback"),
    ("http://[::FFFF:7F00:1]:8080/", "loopback"),
    ("http://[64:ff9b::7f00:1]/", "loopback"),
    ("http://[64:ff9b::127.0.0.1]/", "loopback"),
    ("http://[::127.0.0.1]/", "loopback"),
    ("http://[2002:7f00:1::]/", "loopback"),
    ("http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/", "loopback"),
    // Unspecified and "this network".
    ("http://0.0.0.0/", "unspecified"),
    ("http://0/", "unspecified"),
    ("http://0x0/", "unspecified"),
    ("http://00/", "unspecified"),
    ("http://0.0/", "unspecified"),
    ("http://0x/", "unspecified"),
    ("http://[::]/", "unspecified"),
    ("http://[0:0:0:0:0:0:0:0]/", "unspecified"),
    ("http://[::ffff:0.0.0.0]/", "unspecified"),
    ("http://0.1.2.3/", "this-network"),
    ("http://1/", "this-network"),
    ("http://0x1/", "this-network"),
    // The cloud metadata address 169.254.169.254, in every notation.
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://2852039166/", "link-local"),
    ("http://0xa9fea9fe/", "link-local"),
    ("http://025177524776/", "link-local"),
    ("http://0251.0376.0251.0376/", "link-local"),
    ("http://0xa9.0xfe.0xa9.0xfe/", "link-local"),
    ("http://0251.254.169.254/", "link-local"),
    ("http://169.254.43518/", "link-local"),
    ("http://169.16689662/", "link-local"),
    ("http://0xa9.16689662/", "link-local"),
    ("http://169.254.169.254./", "link-local"),
    ("http://[::ffff:169.254.169.254]/", "link-local"),
    ("http://[::ffff:a9fe:a9fe]/", "link-local"),
    ("http://[64:ff9b::a9fe:a9fe]/", "link-local"),
    ("http://[2002:a9fe:a9fe::1]/", "link-local"),
    ("http://[fe80::1]/", "link-local"),
    ("http://[fe80::a9fe:a9fe]/", "link-local"),
    ("http://[febf:ffff::1]/", "link-local"),
    // Private networks.
    ("http://10.0.0.1/", "private"),
    ("http://10.255.255.255/", "private"),
    ("http://012.0.0.1/", "private"),
    ("http://0xa.1/", "private"),
    ("http://167772161/", "private"),
    ("http://172.16.0.1/", "private"),
    ("http://172.31.255.254/", "private"),
    ("http://0xac.0x10.0.1/", "private"),
    ("http://192.168.0.1/", "private"),
    ("http://192.168.1.1:8443/", "private"),
    ("http://3232235777/", "private"),
    ("http://0xc0a80101/", "private"),
    ("http://0300.0250.1.1/", "private"),
    ("http://192.168.257/", "private"),
    ("http://[fc00::1]/", "private"),
    ("http://[fd12:3456:789a::1]/", "private"),
    ("http://[::ffff:10.0.0.1]/", "private"),
    ("http://[::ffff:192.168.0.1]/", "private"),
    ("http://[64:ff9b::a00:1]/", "private"),
    ("http://[2002:c0a8:101::1]/", "private"),
    // Carrier-grade NAT.
    ("http://100.64.0.1/", "cgnat"),
    ("http://100.127.255.254/", "cgnat"),
    ("http://1681915905/", "cgnat"),
    // Multicast and broadcast.
    ("http://224.0.0.1/", "multicast"),
    ("http://239.255.255.250/", "multicast"),
    ("http://0xe0000001/", "multicast"),
    ("http://[ff02::1]/", "multicast"),
    ("http://[ff05::2]/", "multicast"),
    ("http://255.255.255.255/", "broadcast"),
    ("http://4294967295/", "broadcast"),
    ("http://0xffffffff/", "broadcast"),
    ("http://[::ffff:255.255.255.255]/", "broadcast"),
    // Documentation, benchmarking, reserved.
    ("http://192.0.2.1/", "documentation"),
    ("http://198.51.100.7/", "documentation"),
    ("http://203.0.113.9/", "documentation"),
    ("http://[2001:db8::1]/", "documentation"),
    ("http://198.18.0.1/", "benchmarking"),
    ("http://198.19.255.255/", "benchmarking"),
    ("http://[2001:2::1]/", "benchmarking"),
    ("http://240.0.0.1/", "reserved"),
    ("http://192.0.0.1/", "reserved"),
    ("http://[100::1]/", "reserved"),
    ("http://[fec0::1]/", "reserved"),
    // IPv4 in IPv6 clothing, even for a public address.
    ("http://[::ffff:8.8.8.8]/", "ipv4-mapped"),
    ("http://[::ffff:808:808]/", "ipv4-mapped"),
    ("http://[::8.8.8.8]/", "ipv4-compatible"),
    // Names that resolve to forbidden addresses.
    ("http://localtest.example/", "loopback"),
    ("http://LocalTest.Example./", "loopback"),
    ("http://metadata.internal/", "link-local"),
    (
        "https://metadata.internal:443/computeMetadata/v1/",
        "link-local",
    ),
    ("http://mixed.example/", "private"),
    ("http://mixed-late.example/", "private"),
    ("http://v6local.example/", "loopback"),
    ("http://ula.example/", "private"),
    ("http://mapped.example/", "loopback"),
    ("http://cgnat.example/", "cgnat"),
    ("http://nowhere.example/", "unresolved"),
    ("http://empty.example/", "unresolved"),
    // Userinfo, which hides the real host from a careless reader.
    ("http://example.com@127.0.0.1/", "userinfo"),
    ("http://user:pass@public.example/", "userinfo"),
    ("http://user@host/", "userinfo"),
    ("http://a@b@c/", "userinfo"),
    ("http://@public.example/", "userinfo"),
    ("http://user:@127.0.0.1/", "userinfo"),
    ("http://127.0.0.1%40public.example/", "host"),
    // Fragments.
    ("http://127.0.0.1#@public.example/", "fragment"),
    ("http://public.example/#frag", "fragment"),
    ("http://public.example#", "fragment"),
    // Schemes.
    ("file:///etc/passwd", "scheme"),
    ("gopher://127.0.0.1:25/", "scheme"),
    ("ftp://public.example/", "scheme"),
    ("javascript:alert(1)", "scheme"),
    ("data:text/plain,hello", "scheme"),
    ("dict://127.0.0.1:11211/", "scheme"),
    ("ws://public.example/", "scheme"),
    ("ldap://public.example/", "scheme"),
    ("//public.example/", "scheme"),
    ("public.example/hook", "scheme"),
    ("", "scheme"),
    // Shapes a browser would repair, or read two ways.
    ("http:public.example", "syntax"),
    ("http:/public.example", "syntax"),
    ("http:\\\\127.0.0.1\\", "syntax"),
    ("http://127.0.0.1\\@public.example/", "syntax"),
    ("http://public.example\\@127.0.0.1/", "syntax"),
    // Whitespace and control characters.
    ("http://exa mple.com/", "control"),
    (" http://public.example/", "control"),
    ("http://public.example/ ", "control"),
    ("http://public.example/\n", "control"),
    ("http://127.0.0.1\t/", "control"),
    ("http://exam\u{0}ple.com/", "control"),
    ("http://public.example\r\nHost: 127.0.0.1/", "control"),
    ("http://public.example/\u{7f}", "control"),
    ("http://public.example/\u{2028}", "control"),
    ("http://public.example/\u{a0}", "control"),
    ("http://public.example/\u{85}", "control"),
    // Empty hosts.
    ("http://", "empty-host"),
    ("http:///", "empty-host"),
    ("http://:80/", "empty-host"),
    ("http://?x=1", "empty-host"),
    ("https:///path", "empty-host"),
    ("http://::1/", "empty-host"),
    // Hosts that are neither a name nor an address.
    ("http://[]/", "host"),
    ("http://1.2.3.4.5/", "host"),
    ("http://256.256.256.256/", "host"),
    ("http://127.0.0.256/", "host"),
    ("http://4294967296/", "host"),
    ("http://0x100000000/", "host"),
    ("http://09.0.0.1/", "host"),
    ("http://127.0.0.1../", "host"),
    ("http://foo.0x7f/", "host"),
    ("http://example..com/", "host"),
    ("http://.example.com/", "host"),
    ("http://exa%00mple.com/", "host"),
    ("http://ex%zzample.com/", "host"),
    ("http://exa<mple.com/", "host"),
    ("http://[::1/", "host"),
    ("http://[::1]x/", "host"),
    ("http://[1:2:3:4:5:6:7:8:9]/", "host"),
    ("http://[::ffff:127.0.0.01]/", "host"),
    (
        "http://aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.example/",
        "host",
    ),
    ("http://[::1%25eth0]/", "zone-id"),
    ("http://[fe80::1%eth0]/", "zone-id"),
    // Non-ASCII hosts.
    ("http://exämple.com/", "non-ascii-host"),
    ("http://１２７.０.０.１/", "non-ascii-host"),
    ("http://ex%C3%A4mple.com/", "non-ascii-host"),
    ("http://ⓛⓞⓒⓐⓛⓗⓞⓢⓣ/", "non-ascii-host"),
    // Ports.
    ("http://public.example:0/", "port"),
    ("http://127.0.0.1:0/", "port"),
    ("http://public.example:00000/", "port"),
    ("http://public.example:65536/", "port"),
    ("http://public.example:99999999999999999999/", "port"),
    ("http://public.example:8o/", "port"),
    ("http://public.example:-1/", "port"),
    ("http://public.example:80:80/", "port"),
];

/// URLs that must pass, and the addresses they must be called at.
const ACCEPTED: &[(&str, &[&str])] = &[
    ("http://93.184.215.14/", &["93.184.215.14:80"]),
    ("https://8.8.8.8/", &["8.8.8.8:443"]),
    ("http://1.1.1.1:8080/hook", &["1.1.1.1:8080"]),
    ("http://134744072/", &["8.8.8.8:80"]),
    ("http://0x08080808:8080/", &["8.8.8.8:8080"]),
    ("http://8.8.8.8./", &["8.8.8.8:80"]),
    ("http://[2606:4700::1111]/", &["[2606:4700::1111]:80"]),
    (
        "https://[2606:4700::1111]:8443/x",
        &["[2606:4700::1111]:8443"],
    ),
    ("http://[64:ff9b::808:808]/", &["[64:ff9b::808:808]:80"]),
    ("http://[2002:808:808::1]/", &["[2002:808:808::1]:80"]),
    ("http://100.63.255.255/", &["100.63.255.255:80"]),
    ("http://100.128.0.0/", &["100.128.0.0:80"]),
    ("http://172.15.255.255/", &["172.15.255.255:80"]),
    ("http://172.32.0.0/", &["172.32.0.0:80"]),
    ("http://169.253.255.255/", &["169.253.255.255:80"]),
    ("http://198.20.0.0/", &["198.20.0.0:80"]),
    ("http://223.255.255.255/", &["223.255.255.255:80"]),
    ("http://public.example/hook", &["93.184.215.14:80"]),
    ("https://Public.Example:8443/x?y=1", &["93.184.215.14:8443"]),
    ("http://public.example/@127.0.0.1", &["93.184.215.14:80"]),
    ("http://public6.example/", &["[2606:4700::1111]:80"]),
    (
        "https://dual.example/",
        &["93.184.215.14:443", "[2606:4700::1111]:443"],
    ),
];

/// URLs as written, and as [`parse`] normalises them.
const NORMALISED: &[(&str, &str)] = &[
    ("HTTP://Public.EXAMPLE/Path", "http://public.example/Path"),
    ("http://public.example:80/", "http://public.example/"),
    ("https://public.example:443", "https://public.example/"),
    ("https://public.example:80", "https://public.example:80/"),
    (
        "http://public.example:08080/a?b",
        "http://public.example:8080/a?b",
    ),
    ("http://public.example:/", "http://public.example/"),
    ("http://public.example?x=1", "http://public.example/?x=1"),
    ("http://public.example./", "http://public.example./"),
    ("http://PUB%4cIC.example/", "http://public.example/"),
    ("http://0x08.0x08.0x08.0x08/", "http://8.8.8.8/"),
    ("http://[2606:4700:0::1111]/", "http://[2606:4700::1111]/"),
    (
        "http://public.example/ä\"<>?q={x}",
        "http://public.example/%C3%A4%22%3C%3E?q=%7Bx%7D",
    ),
    ("http://public.example/a%2Fb", "http://public.example/a%2Fb"),
];

#[tokio::test]
async fn the_corpus_is_refused_with_its_classes() {
    assert!(
        REFUSED.len() >= 100,
        "the corpus has {} cases",
        REFUSED.len()
    );
    let resolver = resolver();
    let policy = Policy::default();
    let mut wrong = Vec::new();
    for (url, want) in REFUSED {
        match check(url, &policy, &resolver).await {
            Err(refusal) if refusal.code() == *want => {}
            Err(refusal) => wrong.push(format!(
                "{url:?}: refused as {} ({refusal}), expected {want}",
                refusal.code()
            )),
            Ok(target) => wrong.push(format!(
                "{url:?}: accepted as {} at {:?}, expected {want}",
                target.url, target.addrs
            )),
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[tokio::test]
async fn public_urls_pass_with_the_addresses_they_mean() {
    let resolver = resolver();
    let policy = Policy::default();
    let mut wrong = Vec::new();
    for (url, want) in ACCEPTED {
        match check(url, &policy, &resolver).await {
            Ok(target) => {
                let got: Vec<String> = target.addrs.iter().map(|a| a.to_string()).collect();
                if got != *want {
                    wrong.push(format!("{url:?}: addresses {got:?}, expected {want:?}"));
                }
            }
            Err(refusal) => wrong.push(format!("{url:?}: refused: {refusal}")),
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn urls_are_normalised() {
    for (url, want) in NORMALISED {
        let parsed = parse(url).unwrap_or_else(|e| panic!("{url:?}: {e}"));
        assert_eq!(parsed.to_string(), *want, "{url:?}");
        assert_eq!(parse(want).as_ref(), Ok(&parsed), "{want:?} reparsed");
    }
    let url = parse("https://Hooks.Example:8443/in?x=1").unwrap();
    assert_eq!(url.host(), &Host::Name("hooks.example".into()));
    assert_eq!(url.port(), 8443);
    assert_eq!(url.authority(), "hooks.example:8443");
    assert_eq!(url.path_and_query(), "/in?x=1");
    let url = parse("http://[::ffff:808:808]/").unwrap();
    assert_eq!(url.host(), &Host::Ip("::ffff:8.8.8.8".parse().unwrap()));
}

#[test]
fn a_url_past_the_limit_is_refused() {
    let long = format!("http://public.example/{}", "a".repeat(3000));
    assert_eq!(parse(&long).map_err(|e| e.code()), Err("too-long"));
    let fits = format!("http://public.example/{}", "a".repeat(1000));
    assert!(parse(&fits).is_ok());
}

#[tokio::test]
async fn refusals_say_what_is_wrong_and_what_to_do() {
    let resolver = resolver();
    let policy = Policy::default();
    let message = |url: &'static str| {
        let (resolver, policy) = (&resolver, &policy);
        async move {
            check(url, policy, resolver)
                .await
                .map(|t| t.url.to_string())
                .unwrap_err()
                .to_string()
        }
    };
    assert_eq!(
        message("http://metadata.internal/").await,
        "the host metadata.internal resolves to 169.254.169.254, a link-local address; \
         webhooks may not target private networks (allow the range with notify.allow_networks)"
    );
    assert_eq!(
        message("http://0x7f.1/").await,
        "the address 127.0.0.1 is a loopback address; \
         webhooks may not target private networks (allow the range with notify.allow_networks)"
    );
    assert!(message("gopher://x/")
        .await
        .contains("the scheme gopher: is not allowed"));
    assert!(message("http://a@b/")
        .await
        .contains("send them in a header"));
    assert!(message("http://exämple.com/").await.contains("xn--"));
    assert!(message("http://x/\n").await.contains("U+000A at byte 9"));
    assert!(message("http://nowhere.example/")
        .await
        .starts_with("the host nowhere.example cannot be resolved"));
    assert!(message("http://1.2.3.4.5/")
        .await
        .contains("is not an IPv4 address"));
}

#[tokio::test]
async fn an_allowed_range_permits_that_range_only() {
    let resolver = resolver();
    let policy = Policy::new(&["127.0.0.0/8".into()]).unwrap();
    for url in [
        "http://127.0.0.1/",
        "http://0x7f.1:8080/",
        "http://127.255.0.9/",
        "http://localtest.example/",
    ] {
        let target = check(url, &policy, &resolver).await;
        assert!(target.is_ok(), "{url}: {target:?}");
    }
    for (url, want) in [
        ("http://10.0.0.1/", "private"),
        ("http://[::1]/", "loopback"),
        ("http://[::ffff:127.0.0.1]/", "loopback"),
        ("http://metadata.internal/", "link-local"),
    ] {
        let refused = check(url, &policy, &resolver).await.map_err(|r| r.code());
        assert_eq!(refused.map(|_| ()), Err(want), "{url}");
    }

    let policy = Policy::new(&["::1/128".into(), "169.254.169.254/32".into()]).unwrap();
    assert!(check("http://[::1]/", &policy, &resolver).await.is_ok());
    assert!(check("http://v6local.example/", &policy, &resolver)
        .await
        .is_ok());
    assert!(check("http://metadata.internal/", &policy, &resolver)
        .await
        .is_ok());
    let refused = check("http://169.254.169.253/", &policy, &resolver).await;
    assert!(
        matches!(refused, Err(Refusal::Address { .. })),
        "{refused:?}"
    );
}
