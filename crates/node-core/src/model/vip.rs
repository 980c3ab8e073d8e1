//! VIP labels as DC/OS writes them on ports: a key starting with `VIP` whose value is
//! `/name:port` (a named VIP, groups allowed: `/mygroup/myapp:80`) or `ip:port` (an IP VIP).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::{App, AppId, Protocol};

/// A named VIP's address, written by the l4lb plane at `/dcnet/vips/<label>` (see
/// [`crate::keys::vip`]) and read by every plane through `ClusterState::vips`. Older stores
/// also kept each node's readiness here (`readyOn`); it is ignored, see [`VipReadiness`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipAllocation {
    /// The VIP's name as the app's label gives it, lower case: `/mygroup/myapp`.
    pub name: String,
    pub ip: IpAddr,
}

/// Which named VIPs one node's data plane serves, written by that node's l4lb plane alone at
/// `/dcnet/vipready/<node>` (see [`crate::keys::vip_ready`]). DNS on a node answers a VIP only
/// while its own agent's data plane serves it; an entry of an earlier boot does not count.
/// (One key per node, not a set of nodes in each VIP's key: with many nodes, every node
/// compare-and-swapping every VIP's one key made O(nodes x VIPs) contended writes, each sent
/// to every node.)
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipReadiness {
    /// The boot id of the agent that wrote it.
    pub boot: String,
    /// The labels (`mygroupmyapp`) of the VIPs it serves.
    pub vips: std::collections::BTreeSet<String>,
}

impl VipReadiness {
    /// Whether the agent of boot `boot` serves the VIP `label`.
    pub fn serves(&self, label: &str, boot: &str) -> bool {
        self.boot == boot && self.vips.contains(label)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum VipTarget {
    /// `/web`, `/mygroup/myapp`: gets an address from the VIP range.
    Named(String),
    Ip(IpAddr),
}

/// One VIP label of one port of an app.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipSpec {
    pub app: AppId,
    /// Which port of the app (portDefinitions or portMappings) backs the VIP.
    pub port_index: usize,
    /// The label key, for error messages (`VIP_0`).
    pub label: String,
    pub target: VipTarget,
    pub port: u16,
    pub protocol: Protocol,
}

/// Parses `/name:port` or `ip:port` (`[v6]:port` for IPv6).
pub fn parse_vip(value: &str) -> Result<(VipTarget, u16), String> {
    let (host, port) = value
        .rsplit_once(':')
        .ok_or_else(|| format!("`{value}` is not `/name:port` or `ip:port`"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("`{value}` has no valid port"))?;
    if let Some(name) = host.strip_prefix('/') {
        let valid = !name.is_empty()
            && name.split('/').all(|seg| {
                !seg.is_empty()
                    && seg
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
            });
        if !valid {
            return Err(format!(
                "`{host}` is not a VIP name like /web or /group/web"
            ));
        }
        return Ok((
            VipTarget::Named(format!("/{}", name.to_ascii_lowercase())),
            port,
        ));
    }
    let ip: IpAddr = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| format!("`{host}` is neither a /name nor an IP address"))?;
    Ok((VipTarget::Ip(ip), port))
}

impl App {
    /// The app's VIP labels, with the errors of those that do not parse (path, message).
    pub fn vips(&self) -> (Vec<VipSpec>, Vec<(String, String)>) {
        let mut specs = Vec::new();
        let mut errors = Vec::new();
        let ports: Vec<(String, &super::app::PortLabels, Protocol)> = if self.is_container_network()
        {
            self.port_mappings()
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    (
                        format!("/container/portMappings/{i}/labels"),
                        &m.labels,
                        m.protocol,
                    )
                })
                .collect()
        } else {
            self.port_definitions
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    (
                        format!("/portDefinitions/{i}/labels"),
                        &p.labels,
                        p.protocol,
                    )
                })
                .collect()
        };
        for (index, (path, labels, protocol)) in ports.into_iter().enumerate() {
            for (key, value) in labels.iter().filter(|(k, _)| k.starts_with("VIP")) {
                match parse_vip(value) {
                    Ok((target, port)) => specs.push(VipSpec {
                        app: self.id.clone(),
                        port_index: index,
                        label: key.clone(),
                        target,
                        port,
                        protocol,
                    }),
                    Err(e) => errors.push((format!("{path}/{key}"), e)),
                }
            }
        }
        (specs, errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse_app;

    #[test]
    fn labels_parse_into_named_and_ip_vips() {
        assert_eq!(
            parse_vip("/web:80").unwrap(),
            (VipTarget::Named("/web".into()), 80)
        );
        assert_eq!(
            parse_vip("/MyGroup/myapp:8080").unwrap(),
            (VipTarget::Named("/mygroup/myapp".into()), 8080)
        );
        assert_eq!(
            parse_vip("10.1.2.3:5000").unwrap(),
            (VipTarget::Ip("10.1.2.3".parse().unwrap()), 5000)
        );
        assert_eq!(
            parse_vip("[fd00::1]:53").unwrap(),
            (VipTarget::Ip("fd00::1".parse().unwrap()), 53)
        );
        assert!(parse_vip("/web").is_err());
        assert!(parse_vip("/web:0").is_err());
        assert!(parse_vip("web:80").is_err());
        assert!(parse_vip("//x:80").is_err());
    }

    #[test]
    fn any_key_starting_with_vip_on_any_port() {
        let body = br#"{"id": "/a", "cmd": "x", "portDefinitions": [
                {"port": 0, "labels": {"VIP_0": "/web:80", "other": "x"}},
                {"port": 0, "protocol": "udp", "labels": {"VIP_1": "198.18.9.9:53", "VIPX": "bad"}}]}"#;
        // Validation refuses the bad label, naming it; the raw definition shows the parsing.
        let err = parse_app(body).unwrap_err().to_string();
        assert!(err.contains("/portDefinitions/1/labels/VIPX"), "{err}");
        let app: App = serde_json::from_slice(body).unwrap();
        let (specs, errors) = app.vips();
        assert_eq!(specs.len(), 2);
        assert_eq!((specs[1].port_index, specs[1].protocol), (1, Protocol::Udp));
        assert_eq!(errors[0].0, "/portDefinitions/1/labels/VIPX");
    }
}
