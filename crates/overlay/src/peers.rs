//! What the device should hold, from a snapshot: a pure function, tested without a kernel.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use dcnet_node_core::ClusterState;
use dcnet_node_core::ipam::Subnet;
use dcnet_node_core::model::NodeId;

/// One peer: another node, where its WireGuard listens and the container subnets behind it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSpec {
    pub node: NodeId,
    pub endpoint: SocketAddr,
    pub subnets: Vec<Subnet>,
}

/// Peers by public key (base64): a node that changes its key is a new peer, and the old one
/// goes, rather than one node being two peers.
pub type Peers = BTreeMap<String, PeerSpec>;

/// Every node but `me` that publishes an overlay key and holds a container subnet.
pub fn peers_from(state: &ClusterState, me: &NodeId) -> Peers {
    let mut subnets: BTreeMap<&NodeId, Vec<Subnet>> = BTreeMap::new();
    for (subnet, lease) in state.subnets.iter() {
        subnets.entry(&lease.node).or_default().push(*subnet);
    }
    let mut peers = Peers::new();
    for node in state.nodes.values() {
        if &node.id == me {
            continue;
        }
        let (Some(overlay), Some(subnets)) = (&node.overlay, subnets.get(&node.id)) else {
            continue;
        };
        peers.insert(
            overlay.public_key.clone(),
            PeerSpec {
                node: node.id.clone(),
                endpoint: SocketAddr::new(node.ip, overlay.port),
                subnets: subnets.clone(),
            },
        );
    }
    peers
}

#[cfg(test)]
mod tests {
    use dcnet_node_core::ipam::Lease;
    use dcnet_node_core::keys;
    use dcnet_node_core::model::OverlayEndpoint;
    use dcnet_node_core::test_util::{Snapshots, node};

    use super::*;

    fn with_key(id: &str, ip: &str, key: &str) -> dcnet_node_core::model::Node {
        let mut n = node(id, ip);
        n.overlay = Some(OverlayEndpoint {
            public_key: key.into(),
            port: 51820,
        });
        n
    }

    fn subnet(s: &str) -> Subnet {
        s.parse().unwrap()
    }

    #[test]
    fn every_other_node_with_a_key_and_a_subnet_is_a_peer() {
        let mut log = Snapshots::default();
        let a = with_key("a", "10.0.0.1", "KEY-A");
        let b = with_key("b", "10.0.0.2", "KEY-B");
        let c = node("c", "10.0.0.3");
        for n in [&a, &b, &c] {
            log.put(&keys::node(&n.id), n);
        }
        for (s, n) in [
            ("10.128.0.0/24", &a),
            ("10.128.1.0/24", &b),
            ("10.128.2.0/24", &c),
        ] {
            log.put(
                &keys::subnet(&subnet(s)),
                &Lease {
                    node: n.id.clone(),
                    task: None,
                },
            );
        }
        let snap = log.put(&keys::node(&a.id), &a);
        let peers = peers_from(&snap, &a.id);
        assert_eq!(
            peers,
            [(
                "KEY-B".to_string(),
                PeerSpec {
                    node: b.id.clone(),
                    endpoint: "10.0.0.2:51820".parse().unwrap(),
                    subnets: vec![subnet("10.128.1.0/24")],
                }
            )]
            .into(),
            "not itself, not a node without a key"
        );
        // b changes its key (its state dir was wiped): a new peer, the old one gone.
        let b2 = with_key("b", "10.0.0.2", "KEY-B2");
        let snap = log.put(&keys::node(&b2.id), &b2);
        let peers = peers_from(&snap, &a.id);
        assert_eq!(peers.keys().collect::<Vec<_>>(), ["KEY-B2"]);
        // b is lost: no peer.
        let snap = log.delete(&keys::node(&b.id));
        assert!(peers_from(&snap, &a.id).is_empty());
    }
}
