//! The Rust mirrors of the map structs in `bpf/include/dcnet_lb.h`. Addresses are 16 bytes in
//! network order with IPv4 IPv4-mapped, ports in network order, as the programs compare them
//! with a socket's. Every struct spells its padding out, so that no byte is left undefined.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// Slots per VIP, and the Maglev table size (a prime): at most this many backends per VIP.
pub const MAX_SLOTS: usize = 1021;
/// [`Service::flags`]: pick by the Maglev table, keyed by the client's network namespace.
pub const SVC_MAGLEV: u32 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Addr {
    w: [u32; 4],
}

/// `dcnet_services`' key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    ip: Addr,
    port: u16,
    pub proto: u8,
    pad: u8,
}

/// `dcnet_services`' value: replaced whole by one map update.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Service {
    pub count: u32,
    pub flags: u32,
    pub slots: [u32; MAX_SLOTS],
}

/// `dcnet_backends`' value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendAddr {
    ip: Addr,
    port: u16,
    pad: u16,
}

/// `dcnet_reverse`'s key: a socket and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReverseKey {
    cookie: u64,
    ip: Addr,
    port: u16,
    pad: [u16; 3],
}

/// `dcnet_reverse`'s value: the VIP that socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReverseVip {
    ip: Addr,
    port: u16,
    pad: u16,
}

// SAFETY: each type is `repr(C)`, `Copy`, made only of integers, with its padding spelt out
// as fields, so every bit pattern is valid and no byte is uninitialised.
unsafe impl aya::Pod for Addr {}
unsafe impl aya::Pod for ServiceKey {}
unsafe impl aya::Pod for Service {}
unsafe impl aya::Pod for BackendAddr {}
unsafe impl aya::Pod for ReverseKey {}
unsafe impl aya::Pod for ReverseVip {}

// === impl Addr ===

impl From<IpAddr> for Addr {
    fn from(ip: IpAddr) -> Self {
        let octets = match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        let mut w = [0u32; 4];
        for (i, word) in w.iter_mut().enumerate() {
            *word = u32::from_ne_bytes(octets[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
        }
        Self { w }
    }
}

impl Addr {
    pub fn ip(&self) -> IpAddr {
        let mut octets = [0u8; 16];
        for (i, word) in self.w.iter().enumerate() {
            octets[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
        let v6 = Ipv6Addr::from(octets);
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    }
}

/// A port as the programs compare it: network order in memory.
fn net_port(port: u16) -> u16 {
    u16::from_ne_bytes(port.to_be_bytes())
}

fn host_port(port: u16) -> u16 {
    u16::from_be_bytes(port.to_ne_bytes())
}

// === impl ServiceKey ===

impl ServiceKey {
    pub fn new(addr: SocketAddr, proto: u8) -> Self {
        Self {
            ip: addr.ip().into(),
            port: net_port(addr.port()),
            proto,
            pad: 0,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip.ip(), host_port(self.port))
    }
}

// === impl Service ===

impl Service {
    /// Random balancing over `slots` (each backend id as often as its weight), or the Maglev
    /// table when `maglev` (then `slots` is exactly [`MAX_SLOTS`] long). More than
    /// [`MAX_SLOTS`] slots are cut there.
    pub fn new(slots: &[u32], maglev: bool) -> Self {
        let mut s = Self {
            count: slots.len().min(MAX_SLOTS) as u32,
            flags: if maglev { SVC_MAGLEV } else { 0 },
            slots: [0; MAX_SLOTS],
        };
        for (dst, src) in s.slots.iter_mut().zip(slots) {
            *dst = *src;
        }
        s
    }

    /// The slots in use.
    pub fn used(&self) -> &[u32] {
        &self.slots[..(self.count as usize).min(MAX_SLOTS)]
    }
}

// === impl BackendAddr ===

impl BackendAddr {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            ip: addr.ip().into(),
            port: net_port(addr.port()),
            pad: 0,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip.ip(), host_port(self.port))
    }
}

// === impl ReverseKey ===

impl ReverseKey {
    pub fn new(cookie: u64, backend: SocketAddr) -> Self {
        Self {
            cookie,
            ip: backend.ip().into(),
            port: net_port(backend.port()),
            pad: [0; 3],
        }
    }
}

impl ReverseVip {
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip.ip(), host_port(self.port))
    }
}

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};

    use super::*;

    include!(concat!(env!("OUT_DIR"), "/layout.rs"));

    #[test]
    fn the_rust_mirrors_have_the_c_header_s_sizes_and_offsets() {
        let rust: &[(&str, usize)] = &[
            ("dcnet_addr", size_of::<Addr>()),
            ("dcnet_service_key", size_of::<ServiceKey>()),
            ("dcnet_service_key.port", offset_of!(ServiceKey, port)),
            ("dcnet_service_key.proto", offset_of!(ServiceKey, proto)),
            ("dcnet_service", size_of::<Service>()),
            ("dcnet_service.flags", offset_of!(Service, flags)),
            ("dcnet_service.slots", offset_of!(Service, slots)),
            ("dcnet_backend", size_of::<BackendAddr>()),
            ("dcnet_backend.port", offset_of!(BackendAddr, port)),
            ("dcnet_reverse_key", size_of::<ReverseKey>()),
            ("dcnet_reverse_key.ip", offset_of!(ReverseKey, ip)),
            ("dcnet_reverse_key.port", offset_of!(ReverseKey, port)),
            ("dcnet_reverse", size_of::<ReverseVip>()),
            ("dcnet_reverse.port", offset_of!(ReverseVip, port)),
            ("DCNET_MAX_SLOTS", MAX_SLOTS),
            ("DCNET_SVC_MAGLEV", SVC_MAGLEV as usize),
        ];
        assert_eq!(rust, C_LAYOUT, "Rust mirrors vs dcnet_lb.h");
    }

    #[test]
    fn addresses_and_ports_are_kept_as_the_kernel_compares_them() {
        let v4: SocketAddr = "198.18.0.1:80".parse().unwrap();
        let key = ServiceKey::new(v4, IPPROTO_TCP);
        assert_eq!(key.addr(), v4);
        // ::ffff:198.18.0.1 in memory, port 80 as bytes 0x00 0x50.
        let bytes: [u8; 20] = bytes_of(&key);
        assert_eq!(
            &bytes[..16],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 0, 1]
        );
        assert_eq!(&bytes[16..18], &[0, 80]);
        let v6: SocketAddr = "[fd00::5]:53".parse().unwrap();
        assert_eq!(BackendAddr::new(v6).addr(), v6);
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:9".parse().unwrap();
        assert_eq!(
            BackendAddr::new(mapped).addr(),
            "10.0.0.1:9".parse().unwrap(),
            "an IPv4-mapped address is the IPv4 address"
        );
    }

    /// The key's bytes, read field by field (no transmute needed).
    fn bytes_of(key: &ServiceKey) -> [u8; 20] {
        let mut out = [0u8; 20];
        for (i, w) in key.ip.w.iter().enumerate() {
            out[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        out[16..18].copy_from_slice(&key.port.to_ne_bytes());
        out[18] = key.proto;
        out
    }

    #[test]
    fn a_service_holds_at_most_max_slots() {
        let many: Vec<u32> = (0..2000).collect();
        let s = Service::new(&many, false);
        assert_eq!(s.count as usize, MAX_SLOTS);
        assert_eq!(s.used().last(), Some(&(MAX_SLOTS as u32 - 1)));
        assert_eq!(Service::new(&[7, 9], false).used(), &[7, 9]);
    }
}
