//! Which IP addresses a pack may reach through a wildcard grant: public
//! unicast addresses only. Everything else (the machine itself, private and
//! shared networks, link-local and the cloud metadata services, multicast,
//! documentation and reserved ranges, and the IPv6 forms that embed one of
//! those IPv4 addresses) is refused unless the grant names the host.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why an address is not public; `None` from [`classify`] means it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonPublic {
    Unspecified,
    Loopback,
    Private,
    SharedCgnat,
    LinkLocal,
    Metadata,
    Multicast,
    Broadcast,
    Documentation,
    Benchmarking,
    Reserved,
    UniqueLocal,
}

impl NonPublic {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::Loopback => "loopback",
            Self::Private => "private",
            Self::SharedCgnat => "shared (CGNAT)",
            Self::LinkLocal => "link-local",
            Self::Metadata => "cloud metadata",
            Self::Multicast => "multicast",
            Self::Broadcast => "broadcast",
            Self::Documentation => "documentation",
            Self::Benchmarking => "benchmarking",
            Self::Reserved => "reserved",
            Self::UniqueLocal => "unique local",
        }
    }
}

/// What kind of non-public address `ip` is, or `None` if it is public.
pub fn classify(ip: IpAddr) -> Option<NonPublic> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<NonPublic> {
    let [a, b, c, _] = ip.octets();
    let n = u32::from(ip);
    let within = |net: u32, bits: u32| n >> (32 - bits) == net >> (32 - bits);
    Some(match () {
        _ if ip == Ipv4Addr::new(169, 254, 169, 254) => NonPublic::Metadata,
        _ if a == 0 => NonPublic::Unspecified, // 0.0.0.0/8, "this network"
        _ if a == 127 => NonPublic::Loopback,
        _ if a == 10 => NonPublic::Private,
        _ if a == 172 && (16..32).contains(&b) => NonPublic::Private,
        _ if a == 192 && b == 168 => NonPublic::Private,
        _ if a == 100 && (64..128).contains(&b) => NonPublic::SharedCgnat,
        _ if a == 169 && b == 254 => NonPublic::LinkLocal,
        // 192.0.0.0/24: IETF protocol assignments.
        _ if a == 192 && b == 0 && c == 0 => NonPublic::Reserved,
        _ if within(0xC000_0200, 24) || within(0xC633_6400, 24) || within(0xCB00_7100, 24) => {
            NonPublic::Documentation // 192.0.2/24, 198.51.100/24, 203.0.113/24
        }
        _ if within(0xC612_0000, 15) => NonPublic::Benchmarking, // 198.18/15
        _ if (224..240).contains(&a) => NonPublic::Multicast,
        _ if ip == Ipv4Addr::BROADCAST => NonPublic::Broadcast,
        _ if a >= 240 => NonPublic::Reserved,
        _ => return None,
    })
}

fn classify_v6(ip: Ipv6Addr) -> Option<NonPublic> {
    let s = ip.segments();
    // Forms that carry an IPv4 address: mapped ::ffff:a.b.c.d, compatible
    // ::a.b.c.d (deprecated, still routed by some stacks) and NAT64
    // 64:ff9b::/96 and 64:ff9b:1::/48 are judged by the address they carry.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    if s[..6] == [0; 6] && (s[6] != 0 || s[7] > 1) {
        return classify_v4(Ipv4Addr::from(u128::from(ip) as u32));
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return classify_v4(Ipv4Addr::from(u128::from(ip) as u32));
    }
    if s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1 {
        // Local-use NAT64 prefix: whatever it translates to is local.
        return Some(NonPublic::Private);
    }
    Some(match () {
        _ if ip == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) => NonPublic::Metadata,
        _ if ip.is_unspecified() => NonPublic::Unspecified,
        _ if ip.is_loopback() => NonPublic::Loopback,
        _ if s[0] & 0xfe00 == 0xfc00 => NonPublic::UniqueLocal, // fc00::/7
        _ if s[0] & 0xffc0 == 0xfe80 => NonPublic::LinkLocal,   // fe80::/10
        _ if s[0] & 0xffc0 == 0xfec0 => NonPublic::Reserved,    // fec0::/10, old site-local
        _ if s[0] & 0xff00 == 0xff00 => NonPublic::Multicast,
        _ if s[0] == 0x2001 && s[1] == 0x0db8 => NonPublic::Documentation, // 2001:db8::/32
        _ if s[0] == 0x3fff && s[1] & 0xf000 == 0 => NonPublic::Documentation, // 3fff::/20
        _ if s[0] == 0x2001 && s[1] == 0x0002 && s[2] == 0 => NonPublic::Benchmarking, // 2001:2::/48
        _ if s[0] == 0x0100 && s[1..4] == [0, 0, 0] => NonPublic::Reserved, // 100::/64 discard
        // 2001::/23 holds IETF assignments (Teredo 2001::/32 and ORCHID
        // among them); 2002::/16 is 6to4, which embeds any IPv4 address.
        _ if s[0] == 0x2001 && s[1] < 0x0200 => NonPublic::Reserved,
        _ if s[0] == 0x2002 => NonPublic::Reserved,
        // Only 2000::/3 is allocated global unicast.
        _ if s[0] & 0xe000 != 0x2000 => NonPublic::Reserved,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(ip: &str) -> Option<NonPublic> {
        classify(ip.parse().unwrap())
    }

    #[test]
    fn every_non_public_ipv4_range_is_refused_with_its_kind() {
        use NonPublic::*;
        let cases = [
            ("0.0.0.0", Unspecified),
            ("0.1.2.3", Unspecified),
            ("127.0.0.1", Loopback),
            ("127.255.255.254", Loopback),
            ("10.0.0.1", Private),
            ("172.16.0.1", Private),
            ("172.31.255.255", Private),
            ("192.168.1.1", Private),
            ("100.64.0.1", SharedCgnat),
            ("100.127.255.255", SharedCgnat),
            ("169.254.1.1", LinkLocal),
            ("169.254.169.254", Metadata),
            ("192.0.0.8", Reserved),
            ("192.0.2.1", Documentation),
            ("198.51.100.7", Documentation),
            ("203.0.113.9", Documentation),
            ("198.18.0.1", Benchmarking),
            ("198.19.255.255", Benchmarking),
            ("224.0.0.1", Multicast),
            ("239.255.255.250", Multicast),
            ("240.0.0.1", Reserved),
            ("255.255.255.255", Broadcast),
        ];
        for (ip, expected) in cases {
            assert_eq!(kind(ip), Some(expected), "{ip}");
        }
    }

    #[test]
    fn public_ipv4_addresses_just_outside_the_ranges_are_allowed() {
        for ip in [
            "1.1.1.1",
            "8.8.8.8",
            "172.15.255.255",
            "172.32.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "192.0.1.1",
            "198.17.255.255",
            "198.20.0.0",
            "223.255.255.255",
            "11.0.0.1",
        ] {
            assert_eq!(kind(ip), None, "{ip}");
        }
    }

    #[test]
    fn every_non_public_ipv6_range_is_refused_with_its_kind() {
        use NonPublic::*;
        let cases = [
            ("::", Unspecified),
            ("::1", Loopback),
            ("fc00::1", UniqueLocal),
            ("fd12:3456::1", UniqueLocal),
            ("fd00:ec2::254", Metadata),
            ("fe80::1", LinkLocal),
            ("febf::1", LinkLocal),
            ("fec0::1", Reserved),
            ("ff02::1", Multicast),
            ("2001:db8::1", Documentation),
            ("3fff::1", Documentation),
            ("2001:2::1", Benchmarking),
            ("100::1", Reserved),
            ("2001::1", Reserved),
            ("2002:7f00:1::", Reserved),
            ("4000::1", Reserved),
            ("64:ff9b:1::1", Private),
        ];
        for (ip, expected) in cases {
            assert_eq!(kind(ip), Some(expected), "{ip}");
        }
    }

    #[test]
    fn ipv6_forms_carrying_an_ipv4_address_are_judged_by_it() {
        use NonPublic::*;
        let cases = [
            ("::ffff:127.0.0.1", Some(Loopback)),
            ("::ffff:7f00:1", Some(Loopback)),
            ("::ffff:10.1.2.3", Some(Private)),
            ("::ffff:169.254.169.254", Some(Metadata)),
            ("::127.0.0.1", Some(Loopback)),
            ("::192.168.0.1", Some(Private)),
            ("64:ff9b::127.0.0.1", Some(Loopback)),
            ("64:ff9b::a9fe:a9fe", Some(Metadata)),
            ("::ffff:8.8.8.8", None),
            ("64:ff9b::8.8.8.8", None),
        ];
        for (ip, expected) in cases {
            assert_eq!(kind(ip), expected, "{ip}");
        }
    }

    #[test]
    fn public_ipv6_addresses_are_allowed() {
        for ip in [
            "2606:4700:4700::1111",
            "2a00:1450:4001::200e",
            "2001:4860::8888",
        ] {
            assert_eq!(kind(ip), None, "{ip}");
        }
    }
}
