//! The push target guard: which IP addresses the broker may push to.
//!
//! A push subscription names a URL, and the broker then sends HTTP requests there from inside
//! the network it runs in. Without a guard, anyone allowed to subscribe could make the broker
//! call its own admin ports on loopback, services on the private network, or the cloud metadata
//! endpoint that hands out credentials (server-side request forgery). So every address a push
//! would go to is classified here, and only public addresses are allowed unless
//! [`crate::DeliveryConfig::push_allow`] says otherwise.
//!
//! The module is pure (no I/O besides the name lookup helper): classification and the
//! allow/refuse decision are plain functions, tested on their own, and used twice: when a
//! subscription's endpoint is set, and again by the HTTP transport at connect time, because a
//! name may resolve differently by then (DNS rebinding).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use crate::config::PushAllow;
use crate::error::{Error, Result};

/// What kind of address an IP is, as far as the guard cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AddressClass {
    /// Globally routable: always allowed.
    Public,
    /// 127.0.0.0/8 and ::1.
    Loopback,
    /// 10/8, 172.16/12, 192.168/16, fc00::/7 (except metadata), fec0::/10 and the local-use
    /// NAT64 prefix 64:ff9b:1::/48.
    Private,
    /// 169.254/16 and fe80::/10 (except metadata).
    LinkLocal,
    /// Cloud instance metadata services (169.254.169.254, 169.254.170.2, fd00:ec2::254): named
    /// apart from link-local so that allowing link-local never opens them.
    Metadata,
    /// 100.64/10, carrier-grade NAT.
    Shared,
    /// 0.0.0.0/8 and ::, which many stacks treat as "this host".
    Unspecified,
    /// 224/4 and ff00::/8.
    Multicast,
    /// 255.255.255.255.
    Broadcast,
    /// 192.0.2/24, 198.51.100/24, 203.0.113/24, 2001:db8::/32 and 3fff::/20.
    Documentation,
    /// Everything else that is not globally routable: 192.0.0/24, 198.18/15, 240/4, 100::/64,
    /// Teredo 2001::/32, and IPv6 outside 2000::/3.
    Reserved,
}

impl AddressClass {
    /// The class as it reads in a sentence: "a loopback address".
    fn article_name(self) -> &'static str {
        match self {
            AddressClass::Public => "a public",
            AddressClass::Loopback => "a loopback",
            AddressClass::Private => "a private",
            AddressClass::LinkLocal => "a link-local",
            AddressClass::Metadata => "a cloud metadata",
            AddressClass::Shared => "a shared (carrier-grade NAT)",
            AddressClass::Unspecified => "an unspecified",
            AddressClass::Multicast => "a multicast",
            AddressClass::Broadcast => "a broadcast",
            AddressClass::Documentation => "a documentation",
            AddressClass::Reserved => "a reserved",
        }
    }
}

/// The IPv4 address embedded in an IPv6 one that a stack would actually reach: IPv4-mapped
/// (::ffff:a.b.c.d), IPv4-compatible (::a.b.c.d, deprecated but still routed by some stacks),
/// NAT64 (64:ff9b::/96) and 6to4 (2002:AABB:CCDD::/48). Classifying the embedded address is what
/// stops `http://[::ffff:127.0.0.1]/` from slipping past a loopback check.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        // IPv4-mapped.
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some(low),
        // IPv4-compatible; :: and ::1 are IPv6's own unspecified and loopback.
        [0, 0, 0, 0, 0, 0, _, _] if u32::from(low) > 1 => Some(low),
        // NAT64 well-known prefix.
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(low),
        // 6to4.
        [0x2002, a, b, ..] => Some(Ipv4Addr::new(
            (a >> 8) as u8,
            a as u8,
            (b >> 8) as u8,
            b as u8,
        )),
        _ => None,
    }
}

/// Classifies an IPv4 address.
fn classify_v4(ip: Ipv4Addr) -> AddressClass {
    let [a, b, c, _] = ip.octets();
    let bits = u32::from(ip);
    let within = |net: u32, len: u32| bits >> (32 - len) == net >> (32 - len);
    if ip == Ipv4Addr::new(169, 254, 169, 254) || ip == Ipv4Addr::new(169, 254, 170, 2) {
        AddressClass::Metadata
    } else if ip.is_broadcast() {
        AddressClass::Broadcast
    } else if a == 0 {
        AddressClass::Unspecified
    } else if a == 127 {
        AddressClass::Loopback
    } else if a == 10 || (a == 172 && (16..32).contains(&b)) || (a == 192 && b == 168) {
        AddressClass::Private
    } else if a == 169 && b == 254 {
        AddressClass::LinkLocal
    } else if within(0x6440_0000, 10) {
        AddressClass::Shared
    } else if (a == 192 && b == 0 && c == 2)
        || (a == 198 && b == 51 && c == 100)
        || (a == 203 && b == 0 && c == 113)
    {
        AddressClass::Documentation
    } else if (224..240).contains(&a) {
        AddressClass::Multicast
    } else if (a == 192 && b == 0 && c == 0) || within(0xc612_0000, 15) || a >= 240 {
        AddressClass::Reserved
    } else {
        AddressClass::Public
    }
}

/// Classifies an IPv6 address, through its embedded IPv4 address when it has one.
fn classify_v6(ip: Ipv6Addr) -> AddressClass {
    if let Some(v4) = embedded_v4(ip) {
        return classify_v4(v4);
    }
    let s = ip.segments();
    if ip.is_unspecified() {
        AddressClass::Unspecified
    } else if ip.is_loopback() {
        AddressClass::Loopback
    } else if ip == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
        AddressClass::Metadata
    } else if s[0] & 0xff00 == 0xff00 {
        AddressClass::Multicast
    } else if s[0] & 0xffc0 == 0xfe80 {
        AddressClass::LinkLocal
    } else if s[0] & 0xfe00 == 0xfc00
        || s[0] & 0xffc0 == 0xfec0
        || (s[0], s[1], s[2]) == (0x64, 0xff9b, 1)
    {
        AddressClass::Private
    } else if (s[0], s[1]) == (0x2001, 0xdb8) || s[0] & 0xfff0 == 0x3ff0 {
        AddressClass::Documentation
    } else if (s[0], s[1]) == (0x2001, 0) || s[0] & 0xe000 != 0x2000 {
        AddressClass::Reserved
    } else {
        AddressClass::Public
    }
}

/// Classifies any IP address.
pub(crate) fn classify(ip: IpAddr) -> AddressClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

/// One `address/prefix` range from `push_allow.cidrs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Cidr {
    network: IpAddr,
    prefix_len: u8,
}

impl Cidr {
    /// Parses `10.20.0.0/16`, `fd12::/16` or a bare address (a single host). Host bits must be
    /// zero, so that `10.0.0.1/8` (probably meant as `10.0.0.0/8`, possibly as one host) is a
    /// clear error rather than a silent guess.
    pub(crate) fn parse(text: &str) -> std::result::Result<Cidr, String> {
        let (addr, len) = match text.trim().split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (text.trim(), None),
        };
        let network: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{text}`: `{addr}` is not an IP address"))?;
        let bits = if network.is_ipv4() { 32 } else { 128 };
        let prefix_len = match len {
            None => bits,
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= bits)
                .ok_or_else(|| format!("`{text}`: the prefix length must be 0 to {bits}"))?,
        };
        let cidr = Cidr {
            network,
            prefix_len,
        };
        if cidr.mask(network) != network {
            return Err(format!(
                "`{text}`: host bits are set after the /{prefix_len} prefix"
            ));
        }
        Ok(cidr)
    }

    /// `ip` with the bits after the prefix cleared (IP family unchanged).
    fn mask(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(v4) => {
                let keep = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(v4) & keep))
            }
            IpAddr::V6(v6) => {
                let keep = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & keep))
            }
        }
    }

    /// Whether `ip` is in this range (an address of the other family never is).
    fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.network.is_ipv4() && self.mask(ip) == self.network
    }
}

/// Why the guard refused an address; its text completes "push target refused: ".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Refused {
    /// The address refused.
    pub ip: IpAddr,
    /// What kind of address it is.
    pub class: AddressClass,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} is {} address", self.ip, self.class.article_name())
    }
}

impl std::error::Error for Refused {}

impl Refused {
    /// The refusal as an apposition, for "`host` resolves to 10.0.0.5, a private address".
    pub(crate) fn apposition(&self) -> String {
        format!("{}, {} address", self.ip, self.class.article_name())
    }
}

/// The host of `url` when it is an IP literal. The URL parser has already normalised the odd
/// IPv4 spellings (`2130706433`, `0x7f.1`) to dotted form, so they are caught here too.
pub(crate) fn literal_ip(url: &reqwest::Url) -> Option<IpAddr> {
    url.host_str()?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// The allow/refuse decision, built once from the configuration at broker open.
#[derive(Clone, Debug, Default)]
pub(crate) struct PushGuard {
    loopback: bool,
    private: bool,
    link_local: bool,
    cidrs: Vec<Cidr>,
}

impl PushGuard {
    /// The guard for `allow`; a malformed CIDR is a configuration error naming it.
    pub(crate) fn new(allow: &PushAllow) -> Result<PushGuard> {
        let cidrs = allow
            .cidrs
            .iter()
            .map(|c| Cidr::parse(c))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::invalid("delivery.push_allow.cidrs", e))?;
        Ok(PushGuard {
            loopback: allow.loopback,
            private: allow.private,
            link_local: allow.link_local,
            cidrs,
        })
    }

    /// Allows `ip` or says why not. An address listed in `cidrs` is allowed whatever its class,
    /// matched both as written and through its embedded IPv4 address, so that listing
    /// `10.1.0.0/16` also covers `::ffff:10.1.2.3`.
    pub(crate) fn check(&self, ip: IpAddr) -> std::result::Result<(), Refused> {
        let class = classify(ip);
        let allowed = match class {
            AddressClass::Public => true,
            AddressClass::Loopback => self.loopback,
            AddressClass::Private => self.private,
            AddressClass::LinkLocal => self.link_local,
            // Metadata, unspecified, multicast, broadcast, documentation, shared and reserved
            // addresses are only ever allowed by an explicit range.
            _ => false,
        };
        let embedded = match ip {
            IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        if allowed
            || self
                .cidrs
                .iter()
                .any(|c| c.contains(ip) || embedded.is_some_and(|e| c.contains(e)))
        {
            Ok(())
        } else {
            Err(Refused { ip, class })
        }
    }
}

/// Resolves a host name to its addresses with the system resolver (getaddrinfo on a blocking
/// thread), giving up after `timeout` so that a slow DNS server cannot hold a caller for long.
pub(crate) async fn lookup(
    host: &str,
    timeout: Duration,
) -> std::result::Result<Vec<IpAddr>, String> {
    match tokio::time::timeout(timeout, tokio::net::lookup_host((host, 0))).await {
        Err(_) => Err(format!(
            "`{host}` did not resolve within {} ms",
            timeout.as_millis()
        )),
        Ok(Err(e)) => Err(format!("`{host}` does not resolve: {e}")),
        Ok(Ok(addrs)) => {
            let mut ips: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
            ips.sort_unstable();
            ips.dedup();
            if ips.is_empty() {
                Err(format!("`{host}` resolves to no address"))
            } else {
                Ok(ips)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AddressClass::*;

    fn class(s: &str) -> AddressClass {
        classify(s.parse().expect("test literal"))
    }

    #[test]
    fn ipv4_classes() {
        for (ip, want) in [
            ("8.8.8.8", Public),
            ("1.1.1.1", Public),
            ("172.15.255.255", Public),
            ("172.32.0.0", Public),
            ("100.63.255.255", Public),
            ("100.128.0.0", Public),
            ("127.0.0.1", Loopback),
            ("127.255.255.254", Loopback),
            ("10.0.0.5", Private),
            ("172.16.0.1", Private),
            ("172.31.255.255", Private),
            ("192.168.1.1", Private),
            ("169.254.0.1", LinkLocal),
            ("169.254.169.254", Metadata),
            ("169.254.170.2", Metadata),
            ("100.64.0.1", Shared),
            ("100.127.255.255", Shared),
            ("0.0.0.0", Unspecified),
            ("0.1.2.3", Unspecified),
            ("224.0.0.1", Multicast),
            ("239.255.255.255", Multicast),
            ("255.255.255.255", Broadcast),
            ("192.0.2.1", Documentation),
            ("198.51.100.7", Documentation),
            ("203.0.113.9", Documentation),
            ("192.0.0.8", Reserved),
            ("198.18.0.1", Reserved),
            ("198.19.255.255", Reserved),
            ("240.0.0.1", Reserved),
        ] {
            assert_eq!(class(ip), want, "{ip}");
        }
    }

    #[test]
    fn ipv6_classes() {
        for (ip, want) in [
            ("2a00:1450:4009:81f::200e", Public),
            ("2606:4700::1111", Public),
            ("::1", Loopback),
            ("::", Unspecified),
            ("fc00::1", Private),
            ("fd12:3456::1", Private),
            ("fec0::1", Private),
            ("64:ff9b:1::a", Private),
            ("fe80::1", LinkLocal),
            ("febf::1", LinkLocal),
            ("fd00:ec2::254", Metadata),
            ("ff02::1", Multicast),
            ("2001:db8::1", Documentation),
            ("3fff::1", Documentation),
            ("2001::1", Reserved),
            ("100::1", Reserved),
            ("4000::1", Reserved),
        ] {
            assert_eq!(class(ip), want, "{ip}");
        }
    }

    /// IPv6 forms that carry an IPv4 address are judged by that address.
    #[test]
    fn embedded_ipv4_forms() {
        for (ip, want) in [
            ("::ffff:127.0.0.1", Loopback),
            ("::ffff:7f00:1", Loopback),
            ("::ffff:10.1.2.3", Private),
            ("::ffff:169.254.169.254", Metadata),
            ("::ffff:8.8.8.8", Public),
            ("::127.0.0.1", Loopback),
            ("::10.0.0.1", Private),
            ("64:ff9b::127.0.0.1", Loopback),
            ("64:ff9b::a9fe:a9fe", Metadata),
            ("64:ff9b::8.8.8.8", Public),
            ("2002:7f00:1::", Loopback),
            ("2002:c0a8:101::1", Private),
            ("2002:808:808::1", Public),
        ] {
            assert_eq!(class(ip), want, "{ip}");
        }
    }

    fn guard(loopback: bool, private: bool, link_local: bool, cidrs: &[&str]) -> PushGuard {
        PushGuard::new(&PushAllow {
            loopback,
            private,
            link_local,
            cidrs: cidrs.iter().map(|s| s.to_string()).collect(),
        })
        .expect("valid test config")
    }

    fn allows(g: &PushGuard, ip: &str) -> bool {
        g.check(ip.parse().expect("test literal")).is_ok()
    }

    #[test]
    fn the_default_refuses_everything_but_public() {
        let g = guard(false, false, false, &[]);
        assert!(allows(&g, "8.8.8.8"));
        assert!(allows(&g, "2606:4700::1111"));
        for ip in [
            "127.0.0.1",
            "::1",
            "::ffff:127.0.0.1",
            "10.0.0.5",
            "169.254.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
        ] {
            assert!(!allows(&g, ip), "{ip}");
        }
        let refused = g
            .check("10.0.0.5".parse().expect("literal"))
            .expect_err("private is refused");
        assert_eq!(refused.to_string(), "10.0.0.5 is a private address");
    }

    #[test]
    fn each_flag_opens_its_class_only() {
        let g = guard(true, false, false, &[]);
        assert!(allows(&g, "127.0.0.1"));
        assert!(allows(&g, "::ffff:127.0.0.1"));
        assert!(allows(&g, "::1"));
        assert!(!allows(&g, "10.0.0.5"));
        let g = guard(false, true, false, &[]);
        assert!(allows(&g, "192.168.0.1"));
        assert!(allows(&g, "fd12::1"));
        assert!(!allows(&g, "127.0.0.1"));
        assert!(!allows(&g, "100.64.0.1"), "CGNAT is not private");
        let g = guard(false, false, true, &[]);
        assert!(allows(&g, "169.254.1.1"));
        assert!(allows(&g, "fe80::1"));
        assert!(
            !allows(&g, "169.254.169.254"),
            "link-local never opens metadata"
        );
        assert!(!allows(&g, "fd00:ec2::254"));
        let g = guard(true, true, true, &[]);
        for ip in ["0.0.0.0", "::", "224.0.0.1", "169.254.169.254"] {
            assert!(!allows(&g, ip), "{ip} needs an explicit range");
        }
    }

    #[test]
    fn cidrs_open_exactly_their_range() {
        let g = guard(
            false,
            false,
            false,
            &["10.20.0.0/16", "169.254.169.254", "fd00::/8"],
        );
        assert!(allows(&g, "10.20.3.4"));
        assert!(
            allows(&g, "::ffff:10.20.3.4"),
            "matched through the mapped form"
        );
        assert!(!allows(&g, "10.21.0.1"));
        assert!(allows(&g, "169.254.169.254"));
        assert!(!allows(&g, "169.254.169.253"));
        assert!(allows(&g, "fd12::1"));
        assert!(!allows(&g, "fc00::1"));
    }

    #[test]
    fn cidr_parsing() {
        assert!(Cidr::parse("10.0.0.0/8").is_ok());
        assert!(Cidr::parse("0.0.0.0/0").is_ok());
        assert!(Cidr::parse("::/0").is_ok());
        assert!(Cidr::parse("fd00::/8").is_ok());
        assert!(Cidr::parse("192.168.1.7").is_ok());
        for (bad, says) in [
            ("10.0.0.1/8", "host bits"),
            ("10.0.0.0/33", "0 to 32"),
            ("fd00::/129", "0 to 128"),
            ("10.0.0.0/x", "0 to 32"),
            ("example.org/8", "not an IP address"),
            ("", "not an IP address"),
        ] {
            let e = Cidr::parse(bad).expect_err(bad);
            assert!(e.contains(says), "{bad}: {e}");
        }
        let e = PushGuard::new(&PushAllow {
            cidrs: vec!["10.0.0.0/8".into(), "10.0.0.0/40".into()],
            ..PushAllow::default()
        })
        .expect_err("bad range refused");
        assert_eq!(e.code(), "invalid_input");
        assert!(e.to_string().contains("delivery.push_allow.cidrs"), "{e}");
        assert!(e.to_string().contains("10.0.0.0/40"), "{e}");
    }
}
