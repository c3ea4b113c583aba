//! Reading a user-supplied webhook URL into a [`WebUrl`].
//!
//! Only `http://` and `https://` URLs with a plain host are accepted. Hosts
//! are read the way a browser's URL parser reads them, so that an address
//! written in a disguise is seen as the address it means: `2130706433`,
//! `0x7f.1`, `0177.0.0.1`, `127.1`, `127.0.0.1.` and `%31%32%37.0.0.1` are
//! all `127.0.0.1`. What a browser would repair or read two ways is refused
//! instead: userinfo, fragments, backslashes, whitespace and control
//! characters, slashes missing after the scheme. Non-ASCII hosts are refused
//! (write their `xn--` form).
//!
//! Pure: no I/O.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::Refusal;

/// The longest URL accepted, in bytes.
pub const URL_BYTES_MAX: usize = 2048;
/// The longest host name accepted, in bytes (the DNS limit).
const NAME_BYTES_MAX: usize = 253;
/// The longest label of a host name, in bytes (the DNS limit).
const LABEL_BYTES_MAX: usize = 63;

/// The scheme of a [`WebUrl`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    /// 80 or 443.
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

/// The host of a [`WebUrl`]: a lower-case ASCII name, or the address an IP
/// literal means.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    /// A DNS name, lower case, with its trailing dot if it had one.
    Name(String),
    Ip(IpAddr),
}

impl fmt::Display for Host {
    /// As written in a URL: IPv6 addresses in brackets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(name) => f.write_str(name),
            Host::Ip(IpAddr::V4(v4)) => write!(f, "{v4}"),
            Host::Ip(IpAddr::V6(v6)) => write!(f, "[{v6}]"),
        }
    }
}

/// An `http` or `https` URL that passed [`parse`]: its parts, normalised.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WebUrl {
    scheme: Scheme,
    host: Host,
    port: u16,
    /// The request target: starts with `/`, ASCII, percent-encoded where
    /// needed.
    path_and_query: String,
}

impl WebUrl {
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The port, the scheme's default when the URL names none.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The request target, such as `/hooks/ripen?team=7`.
    pub fn path_and_query(&self) -> &str {
        &self.path_and_query
    }

    /// The `Host` header: the host, and the port unless it is the
    /// scheme's default.
    pub fn authority(&self) -> String {
        if self.port == self.scheme.default_port() {
            self.host.to_string()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for WebUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}://{}{}",
            self.scheme.as_str(),
            self.authority(),
            self.path_and_query
        )
    }
}

/// Reads a webhook URL. A refusal says what is wrong and, where it can,
/// what to write instead. Nothing is resolved here: see
/// [`check`](super::check).
pub fn parse(url: &str) -> Result<WebUrl, Refusal> {
    if url.len() > URL_BYTES_MAX {
        return Err(Refusal::TooLong { bytes: url.len() });
    }
    if let Some((at, ch)) = url
        .char_indices()
        .find(|(_, ch)| ch.is_control() || ch.is_whitespace())
    {
        return Err(Refusal::Control { ch, at });
    }
    if url.contains('\\') {
        return Err(Refusal::Syntax(
            "the URL contains a backslash, which URL parsers read in different ways; \
             write / or %5C"
                .into(),
        ));
    }
    let (scheme, rest) = split_scheme(url)?;
    if rest.contains('#') {
        return Err(Refusal::Fragment);
    }
    let Some(rest) = rest.strip_prefix("//") else {
        return Err(Refusal::Syntax(format!(
            "write {}:// before the host",
            scheme.as_str()
        )));
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, target) = rest.split_at(end);
    if authority.contains('@') {
        return Err(Refusal::UserInfo);
    }
    let (host, port) = split_port(authority)?;
    if host.is_empty() {
        return Err(Refusal::EmptyHost);
    }
    let host = parse_host(host)?;
    let port = parse_port(port, scheme)?;
    Ok(WebUrl {
        scheme,
        host,
        port,
        path_and_query: encode_target(target),
    })
}

/// The scheme (case-insensitive) and what follows its colon.
fn split_scheme(url: &str) -> Result<(Scheme, &str), Refusal> {
    let colon = url.find(':');
    let scheme = colon.map(|i| &url[..i]);
    let valid = scheme.filter(|s| {
        let mut bytes = s.bytes();
        bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
            && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'-' || b == b'.')
    });
    match (valid, colon) {
        (Some(s), Some(i)) => {
            let rest = &url[i + 1..];
            if s.eq_ignore_ascii_case("http") {
                Ok((Scheme::Http, rest))
            } else if s.eq_ignore_ascii_case("https") {
                Ok((Scheme::Https, rest))
            } else {
                let mut shown = s.to_ascii_lowercase();
                shown.truncate(32);
                Err(Refusal::Scheme(Some(shown)))
            }
        }
        _ => Err(Refusal::Scheme(None)),
    }
}

/// The host and the port text (`None` without a colon) of an authority.
fn split_port(authority: &str) -> Result<(&str, Option<&str>), Refusal> {
    if authority.starts_with('[') {
        let Some(close) = authority.find(']') else {
            return Err(Refusal::Host(
                "the IPv6 address is not closed with ]".into(),
            ));
        };
        let (host, after) = authority.split_at(close + 1);
        return match after {
            "" => Ok((host, None)),
            _ => match after.strip_prefix(':') {
                Some(port) => Ok((host, Some(port))),
                None => Err(Refusal::Host(
                    "only :port may follow the ] of an IPv6 address".into(),
                )),
            },
        };
    }
    Ok(match authority.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    })
}

fn parse_port(text: Option<&str>, scheme: Scheme) -> Result<u16, Refusal> {
    let text = match text {
        None | Some("") => return Ok(scheme.default_port()),
        Some(text) => text,
    };
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Refusal::Port(
            "the port is not a number from 1 to 65535".into(),
        ));
    }
    let digits = text.trim_start_matches('0');
    let port = if digits.len() > 5 {
        None
    } else if digits.is_empty() {
        Some(0)
    } else {
        digits.parse::<u16>().ok()
    };
    match port {
        None => Err(Refusal::Port(
            "the port is more than 65535, the largest TCP port".into(),
        )),
        Some(0) => Err(Refusal::Port("port 0 cannot be connected to".into())),
        Some(port) => Ok(port),
    }
}

/// A host as a browser reads it: a bracketed IPv6 address, or
/// percent-decoded, lower-cased, and an IPv4 address if it ends in a
/// number.
fn parse_host(text: &str) -> Result<Host, Refusal> {
    if let Some(inner) = text.strip_prefix('[') {
        let inner = inner.strip_suffix(']').unwrap_or(inner);
        if inner.contains('%') {
            return Err(Refusal::ZoneId);
        }
        return inner
            .parse::<Ipv6Addr>()
            .map(|v6| Host::Ip(IpAddr::V6(v6)))
            .map_err(|_| Refusal::Host(format!("[{inner}] is not an IPv6 address")));
    }
    let bytes = percent_decode(text)?;
    if !bytes.is_ascii() {
        return Err(Refusal::NonAsciiHost);
    }
    let mut name = String::with_capacity(bytes.len());
    for b in bytes {
        let ch = char::from(b.to_ascii_lowercase());
        if !(ch.is_ascii_alphanumeric() || ch == '-' || ch == '_' || ch == '.') {
            return Err(Refusal::Host(format!(
                "the host contains {ch:?}, which a host name may not"
            )));
        }
        name.push(ch);
    }
    if ends_in_a_number(&name) {
        return parse_ipv4(&name)
            .map(|v4| Host::Ip(IpAddr::V4(v4)))
            .ok_or_else(|| {
                Refusal::Host(format!(
                    "{name} ends in a number but is not an IPv4 address (at most 4 parts, \
                 each decimal, 0x hex or 0 octal, within 32 bits)"
                ))
            });
    }
    check_labels(&name)?;
    Ok(Host::Name(name))
}

fn check_labels(name: &str) -> Result<(), Refusal> {
    let bare = name.strip_suffix('.').unwrap_or(name);
    if bare.len() > NAME_BYTES_MAX {
        return Err(Refusal::Host(format!(
            "the host name is longer than {NAME_BYTES_MAX} bytes"
        )));
    }
    for label in bare.split('.') {
        if label.is_empty() {
            return Err(Refusal::Host(format!("the host {name} has an empty label")));
        }
        if label.len() > LABEL_BYTES_MAX {
            return Err(Refusal::Host(format!(
                "a label of the host is longer than {LABEL_BYTES_MAX} bytes"
            )));
        }
    }
    Ok(())
}

fn percent_decode(text: &str) -> Result<Vec<u8>, Refusal> {
    fn hex(b: u8) -> Option<u8> {
        char::from(b)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        let high = bytes.get(i + 1).copied().and_then(hex);
        let low = bytes.get(i + 2).copied().and_then(hex);
        match (high, low) {
            (Some(high), Some(low)) => out.push(high << 4 | low),
            _ => {
                return Err(Refusal::Host(
                    "the host has a % that is not followed by two hex digits".into(),
                ))
            }
        }
        i += 3;
    }
    Ok(out)
}

/// The URL standard's "ends in a number": the last label (after a
/// trailing dot) is all digits, or parses as an IPv4 number (`0x7f`).
fn ends_in_a_number(host: &str) -> bool {
    let mut parts: Vec<&str> = host.split('.').collect();
    if parts.last() == Some(&"") {
        if parts.len() == 1 {
            return false;
        }
        parts.pop();
    }
    let last = parts.last().copied().unwrap_or("");
    (!last.is_empty() && last.bytes().all(|b| b.is_ascii_digit())) || ipv4_number(last).is_some()
}

/// One part of an IPv4 address: `0x` hex, `0` octal, or decimal; `0x`
/// alone is 0. `None` if it is no number or does not fit 64 bits (which is
/// too large for any part anyway).
fn ipv4_number(text: &str) -> Option<u64> {
    if text.is_empty() {
        return None;
    }
    let (digits, radix) =
        if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
            (hex, 16)
        } else if text.len() >= 2 && text.starts_with('0') {
            (&text[1..], 8)
        } else {
            (text, 10)
        };
    digits.chars().try_fold(0u64, |n, ch| {
        let digit = ch.to_digit(radix)?;
        n.checked_mul(u64::from(radix))?
            .checked_add(u64::from(digit))
    })
}

/// The URL standard's IPv4 parser: one to four parts, the last filling the
/// bytes the others leave.
fn parse_ipv4(host: &str) -> Option<Ipv4Addr> {
    let mut parts: Vec<&str> = host.split('.').collect();
    if parts.len() > 1 && parts.last() == Some(&"") {
        parts.pop();
    }
    if parts.len() > 4 {
        return None;
    }
    let numbers = parts
        .iter()
        .map(|p| ipv4_number(p))
        .collect::<Option<Vec<u64>>>()?;
    let (last, init) = numbers.split_last()?;
    if init.iter().any(|n| *n > 255) {
        return None;
    }
    let last_bits = 8 * (5 - numbers.len() as u32);
    if *last >= 1u64 << last_bits {
        return None;
    }
    let mut address = *last;
    for (i, n) in init.iter().enumerate() {
        address += n << (8 * (3 - i as u32));
    }
    u32::try_from(address).ok().map(Ipv4Addr::from)
}

/// The path and query as an ASCII request target: `/` first, and bytes
/// outside the characters a request target may hold percent-encoded. A `%`
/// is kept as it is.
fn encode_target(target: &str) -> String {
    let mut out = String::with_capacity(target.len() + 1);
    if !target.starts_with('/') {
        out.push('/');
    }
    for &b in target.as_bytes() {
        let keep = b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b);
        if keep {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_numbers() {
        assert_eq!(ipv4_number("0x"), Some(0));
        assert_eq!(ipv4_number("0X1f"), Some(31));
        assert_eq!(ipv4_number("017"), Some(15));
        assert_eq!(ipv4_number("0"), Some(0));
        assert_eq!(ipv4_number("08"), None);
        assert_eq!(ipv4_number("+1"), None);
        assert_eq!(ipv4_number(""), None);
        assert_eq!(ipv4_number("99999999999999999999999"), None);
        assert_eq!(ipv4_number("0x0000000000000000000000001"), Some(1));
    }

    #[test]
    fn ends_in_a_number_as_the_standard_says() {
        assert!(ends_in_a_number("127.0.0.1"));
        assert!(ends_in_a_number("foo.0x7f"));
        assert!(ends_in_a_number("foo.09"));
        assert!(ends_in_a_number("1."));
        assert!(!ends_in_a_number("foo.0x7g"));
        assert!(!ends_in_a_number("example.com"));
        assert!(!ends_in_a_number("."));
        assert!(!ends_in_a_number("1a"));
    }

    #[test]
    fn targets_are_encoded() {
        assert_eq!(encode_target(""), "/");
        assert_eq!(encode_target("?a=1"), "/?a=1");
        assert_eq!(
            encode_target("/a%20b/ä\"<>^`{|}[]"),
            "/a%20b/%C3%A4%22%3C%3E%5E%60%7B%7C%7D%5B%5D"
        );
    }
}
