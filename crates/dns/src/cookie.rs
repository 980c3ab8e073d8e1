//! DNS cookies (RFC 7873, with RFC 9018's server cookie layout) and the amplification bound.
//!
//! A UDP source is unverified until it returns a server cookie that this agent made for it:
//! an answer to an unverified source is at most `max_amplification` times the size of its
//! query (a larger one is truncated, sending the client to TCP or to its next query, which
//! carries the cookie), so a forged source address cannot be used to reflect large answers.
//! Real resolvers and `dig` send cookies, and get whole UDP answers from their second query.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;

/// EDNS option code of COOKIE.
pub(crate) const OPTION: u16 = 10;
/// How long a server cookie stays valid; RFC 9018 suggests an hour.
const LIFETIME_SECS: u32 = 3600;
/// A cookie dated a little in the future (another node's clock) is still taken.
const SKEW_SECS: u32 = 300;

/// Makes and checks server cookies with a key of this process's own.
pub(crate) struct Cookies {
    key: RandomState,
}

impl Cookies {
    pub(crate) fn new() -> Self {
        Self {
            key: RandomState::new(),
        }
    }

    fn hash(&self, client: &[u8], ip: IpAddr, head: &[u8; 8]) -> [u8; 8] {
        let mut h = self.key.build_hasher();
        h.write(client);
        h.write(head);
        match ip {
            IpAddr::V4(v4) => h.write(&v4.octets()),
            IpAddr::V6(v6) => h.write(&v6.octets()),
        }
        h.finish().to_be_bytes()
    }

    /// The 16-byte server cookie for `client` at `ip` at `now` (Unix seconds): version 1,
    /// three reserved bytes, the time, and a keyed hash of the rest.
    pub(crate) fn make(&self, client: &[u8], ip: IpAddr, now: u32) -> [u8; 16] {
        let mut head = [1, 0, 0, 0, 0, 0, 0, 0];
        head[4..].copy_from_slice(&now.to_be_bytes());
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&head);
        out[8..].copy_from_slice(&self.hash(client, ip, &head));
        out
    }

    /// Whether `server` is a cookie this agent made for `client` at `ip`, still fresh.
    pub(crate) fn is_valid(&self, client: &[u8], server: &[u8], ip: IpAddr, now: u32) -> bool {
        let Ok(server) = <[u8; 16]>::try_from(server) else {
            return false;
        };
        let head: [u8; 8] = server[..8].try_into().expect("eight bytes");
        let at = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        head[0] == 1
            && at <= now.saturating_add(SKEW_SECS)
            && now.saturating_sub(at) <= LIFETIME_SECS
            && self.hash(client, ip, &head) == server[8..]
    }
}

/// The COOKIE option of a query, if it has a well-formed one: the client cookie (8 bytes) and
/// the server cookie it returns (empty, or 8 to 32 bytes).
pub(crate) fn of_query(msg: &[u8]) -> Option<(&[u8], &[u8])> {
    of_opt(crate::screen::opt_rdata(msg)?)
}

/// The COOKIE option among the options of an OPT record's RDATA.
pub(crate) fn of_opt(rdata: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut at = 0;
    while at + 4 <= rdata.len() {
        let code = u16::from_be_bytes([rdata[at], rdata[at + 1]]);
        let len = usize::from(u16::from_be_bytes([rdata[at + 2], rdata[at + 3]]));
        let value = rdata.get(at + 4..at + 4 + len)?;
        if code == OPTION {
            let (client, server) = value.split_at_checked(8)?;
            let ok = server.is_empty() || (8..=32).contains(&server.len());
            return ok.then_some((client, server));
        }
        at += 4 + len;
    }
    None
}

pub(crate) fn unix_now() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_cookie_is_valid_only_for_its_client_address_and_time() {
        let cookies = Cookies::new();
        let (ip, other_ip) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let client = [7u8; 8];
        let now = 1_800_000_000;
        let server = cookies.make(&client, ip, now);
        assert!(cookies.is_valid(&client, &server, ip, now));
        assert!(cookies.is_valid(&client, &server, ip, now + LIFETIME_SECS));
        assert!(
            !cookies.is_valid(&client, &server, ip, now + LIFETIME_SECS + 1),
            "expired"
        );
        assert!(
            !cookies.is_valid(&client, &server, other_ip, now),
            "another address"
        );
        assert!(
            !cookies.is_valid(&[8u8; 8], &server, ip, now),
            "another client cookie"
        );
        let mut forged = server;
        forged[15] ^= 1;
        assert!(!cookies.is_valid(&client, &forged, ip, now), "tampered");
        assert!(
            !Cookies::new().is_valid(&client, &server, ip, now),
            "another agent's key"
        );
        assert!(!cookies.is_valid(&client, &server[..8], ip, now));
    }
}
