//! DNS on the wire: `dig` against the agent's server inside the test namespace, a loopback
//! upstream for forwarding, and lookups from inside a container.

use std::net::UdpSocket;
use std::process::Command;
use std::time::Duration;

use dcnet_dns::proto::op::{Message, ResponseCode};
use dcnet_dns::proto::rr::rdata::A;
use dcnet_dns::proto::rr::{RData, Record};
use serde_json::{Value, json};

use crate::support::{Agent, NetNs, wait_until};

const NODE_IP: &str = "192.0.2.10";
const NODE_IP6: &str = "2001:db8::10";

/// `dig` from this thread (inside the test namespace) against the agent.
fn dig(args: &[&str]) -> String {
    let out = Command::new("dig")
        .args(["@127.0.0.1", "+time=2", "+tries=1"])
        .args(args)
        .output()
        .expect("dig from dnsutils");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn short(args: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = dig(&[&["+short"], args].concat())
        .lines()
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

/// A one-name upstream on `addr`: `name` A `ip`, NXDOMAIN for every other name.
fn upstream(addr: &str, name: &'static str, ip: [u8; 4]) {
    let socket = UdpSocket::bind(addr).expect("binding a test upstream");
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            let Ok(query) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut answer = Message::response(query.metadata.id, query.metadata.op_code);
            answer.metadata.recursion_available = true;
            answer.add_queries(query.queries.clone());
            match query.queries.first() {
                Some(q) if q.name().to_string() == name => {
                    answer.add_answer(Record::from_rdata(
                        q.name().clone(),
                        60,
                        RData::A(A(ip.into())),
                    ));
                }
                _ => answer.metadata.response_code = ResponseCode::NXDomain,
            }
            let _ = socket.send_to(&answer.to_vec().unwrap(), from);
        }
    });
}

fn deploy(agent: &Agent, def: &Value) {
    let (status, v) = agent
        .http("POST", "/v2/apps", Some(&def.to_string()))
        .unwrap();
    assert_eq!(status, 201, "{v}");
    let dep = v["deployments"][0]["id"].as_str().unwrap().to_string();
    let mut last = Value::Null;
    let ok = wait_until(Duration::from_secs(60), || {
        last = agent.get(&format!("/v1/deployments/{dep}"));
        last["status"] != "running"
    });
    assert!(ok && last["status"] == "succeeded", "{last}");
}

#[test]
fn dig_gets_authoritative_answers_srv_nxdomain_nodata_ptr_tc_and_forwarding() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "needs root (make test)"
    );
    let ns = NetNs::new("dns");
    ns.add_node_address("node0", &format!("{NODE_IP}/24"));
    ns.enter();
    ns.ip(&[
        "addr",
        "add",
        &format!("{NODE_IP6}/64"),
        "dev",
        "node0",
        "nodad",
    ]);
    upstream("127.0.0.2:53", "outside.example.", [203, 0, 113, 7]);
    upstream("127.0.0.3:53", "db.corp.example.", [203, 0, 113, 8]);
    // An upstream that takes every query and never answers.
    let silent = UdpSocket::bind("127.0.0.4:53").unwrap();
    let agent = Agent::start_with_node(
        &ns,
        NODE_IP,
        &format!("ip6 = \"{NODE_IP6}\""),
        r#"[dns]
listen = ["127.0.0.1:53", "[::1]:53"]
upstreams = ["127.0.0.2:53"]
timeout = "500ms"
zones = { "corp.example" = ["127.0.0.3:53"], "silent.example" = ["127.0.0.4:53"] }
"#,
    );
    deploy(
        &agent,
        &json!({"id": "/group/web", "cmd": "sleep 600", "instances": 2, "cpus": 0.01, "mem": 8,
                "portDefinitions": [{"port": 0, "name": "http"}]}),
    );

    // A, case-insensitive, authoritative. Both tasks are on this node: one address, once.
    assert_eq!(short(&["web-group.marathon.mesos"]), [NODE_IP]);
    assert_eq!(short(&["WEB-Group.Marathon.MESOS"]), [NODE_IP]);
    let full = dig(&["web-group.marathon.mesos"]);
    assert!(full.contains("flags: qr aa"), "{full}");
    assert_eq!(short(&["leader.mesos"]), [NODE_IP]);
    assert_eq!(
        short(&["web-group.marathon.agentip.dcos.thisdcos.directory"]),
        [NODE_IP]
    );

    // SRV with the targets' addresses in the additional section.
    let srv = dig(&["_web-group._tcp.marathon.mesos", "SRV"]);
    assert!(srv.contains("ANSWER: 2"), "{srv}");
    assert!(
        srv.contains("ADDITIONAL SECTION") && srv.contains(NODE_IP),
        "{srv}"
    );
    let ports: Vec<u64> = agent
        .running("/group/web")
        .iter()
        .map(|t| t["ports"][0].as_u64().unwrap())
        .collect();
    for port in ports {
        assert!(srv.contains(&format!(" {port} ")), "port {port} in {srv}");
    }

    // NXDOMAIN and NODATA, both with the SOA in the authority section.
    let nx = dig(&["nope.marathon.mesos"]);
    assert!(
        nx.contains("status: NXDOMAIN") && nx.contains("AUTHORITY: 1") && nx.contains("SOA"),
        "{nx}"
    );
    let nodata = dig(&["web-group.marathon.mesos", "TXT"]);
    assert!(
        nodata.contains("status: NOERROR")
            && nodata.contains("ANSWER: 0")
            && nodata.contains("SOA"),
        "{nodata}"
    );

    // PTR for the node address.
    assert_eq!(
        short(&["-x", NODE_IP]),
        ["node-1.agentip.dcos.thisdcos.directory."]
    );

    // A dual-stack node: AAAA beside A for its host tasks and itself, PTR for its IPv6
    // address, and the server answers over IPv6 too.
    assert_eq!(short(&["web-group.marathon.mesos", "AAAA"]), [NODE_IP6]);
    assert_eq!(short(&["leader.mesos", "AAAA"]), [NODE_IP6]);
    assert_eq!(
        short(&["-x", NODE_IP6]),
        ["node-1.agentip.dcos.thisdcos.directory."]
    );
    let over_v6 = Command::new("dig")
        .args([
            "@::1",
            "+short",
            "+time=2",
            "+tries=1",
            "web-group.marathon.mesos",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&over_v6.stdout).trim(), NODE_IP);
    let srv6 = dig(&["_web-group._tcp.marathon.mesos", "SRV"]);
    assert!(
        srv6.contains(NODE_IP6),
        "AAAA in the additional section: {srv6}"
    );

    // Forwarded to the loopback upstream; unknown names come back NXDOMAIN from it.
    assert_eq!(short(&["outside.example"]), ["203.0.113.7"]);
    assert!(dig(&["missing.example"]).contains("status: NXDOMAIN"));
    // A zone with its own forwarder; a silent upstream is SERVFAIL after dns.timeout.
    assert_eq!(short(&["db.corp.example"]), ["203.0.113.8"]);
    assert!(dig(&["outside.corp.example"]).contains("status: NXDOMAIN"));
    assert!(dig(&["www.silent.example"]).contains("status: SERVFAIL"));
    drop(silent);

    // Many tasks: too long for 512 bytes of UDP without EDNS, whole over TCP.
    deploy(
        &agent,
        &json!({"id": "/big", "cmd": "sleep 600", "instances": 60, "cpus": 0.01, "mem": 1,
                "portDefinitions": [{"port": 0}]}),
    );
    // The deployment is done once the tasks run; their records follow within milliseconds
    // (on a loaded machine, a little later), and then all 60 answer.
    let mut tcp = String::new();
    let all = wait_until(Duration::from_secs(10), || {
        tcp = dig(&["+tcp", "_big._tcp.marathon.mesos", "SRV"]);
        tcp.contains("ANSWER: 60")
    });
    assert!(all, "{tcp}");
    let udp = dig(&["+noedns", "+ignore", "_big._tcp.marathon.mesos", "SRV"]);
    assert!(udp.contains(" tc") || udp.contains("tc "), "{udp}");
    // The client's EDNS buffer size is honoured up to 1232 bytes, so that no UDP answer is
    // ever fragmented: a larger buffer gets 1232 and TC, TCP gets the rest. That is for a
    // client that returns our DNS cookie (dig's second query, with the cookie of its first);
    // a source that has not is answered with at most ten times its query.
    let msg_size = |out: &str| -> usize {
        assert!(out.contains(" tc"), "{out}");
        out.split("MSG SIZE  rcvd: ")
            .nth(1)
            .and_then(|r| r.trim().parse().ok())
            .unwrap_or_else(|| panic!("no message size in {out}"))
    };
    let size = |bufsize: u32| -> (usize, usize) {
        let buf = format!("+bufsize={bufsize}");
        let first = dig(&[&buf, "+ignore", "_big._tcp.marathon.mesos", "SRV"]);
        let cookie = first
            .lines()
            .find_map(|l| l.trim().strip_prefix("; COOKIE: "))
            .and_then(|c| c.split_whitespace().next())
            .unwrap_or_else(|| panic!("no cookie returned: {first}"))
            .to_string();
        let again = dig(&[
            &buf,
            "+ignore",
            &format!("+cookie={cookie}"),
            "_big._tcp.marathon.mesos",
            "SRV",
        ]);
        (msg_size(&first), msg_size(&again))
    };
    let ((unverified, small), (_, large)) = (size(800), size(8192));
    assert!(
        unverified < 700,
        "a first, unverified answer is bounded: {unverified} bytes"
    );
    assert!(
        (512..=800).contains(&small),
        "bufsize 800 got {small} bytes"
    );
    assert!(
        (800..=1232).contains(&large),
        "bufsize 8192 got {large} bytes"
    );

    // The Mesos-DNS HTTP API and the CLI see the same records.
    let hosts = agent.get("/v1/hosts/web-group.marathon.mesos");
    assert_eq!(hosts[0]["ip"], NODE_IP, "{hosts}");
    let (ok, out, err) = agent.cli(&["dns", "lookup", "web-group.marathon.mesos"]);
    assert!(
        ok && out.contains("NoError") || out.contains("NOERROR") || out.contains("No Error"),
        "{out}{err}"
    );
    assert_eq!(out.matches(NODE_IP).count(), 1, "{out}");

    // A killed task disappears from the answers.
    let task = agent.running("/group/web").remove(0);
    let pid = task["process"]["pid"].as_i64().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let gone = wait_until(Duration::from_secs(10), || {
        short(&["_web-group._tcp.marathon.mesos", "SRV"]).len() == 1
    });
    assert!(gone, "the dead task is still answered");
}

#[test]
fn forwarding_off_refuses_other_names() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "needs root (make test)"
    );
    let ns = NetNs::new("refuse");
    ns.enter();
    let _agent = Agent::start_with(&ns, "127.0.0.1", "[dns]\nforward = false\n");
    assert!(dig(&["outside.example"]).contains("status: REFUSED"));
    assert!(dig(&["leader.mesos"]).contains("status: NOERROR"));
}

#[test]
fn a_container_resolves_names_through_its_gateway() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "needs root (make test)"
    );
    let ns = NetNs::new("ctrdns");
    ns.add_node_address("node0", &format!("{NODE_IP}/24"));
    ns.enter();
    let agent = Agent::start_on(&ns, NODE_IP);
    deploy(
        &agent,
        &json!({"id": "/group/web", "cmd": "exec sleep 600", "instances": 2, "cpus": 0.01, "mem": 16,
                "networks": [{"mode": "container"}]}),
    );
    let task = agent.running("/group/web").remove(0);
    let pid = task["process"]["pid"].as_u64().unwrap().to_string();
    let ips: Vec<String> = {
        let mut v: Vec<String> = agent
            .running("/group/web")
            .iter()
            .map(|t| {
                t["ipAddresses"][0]["ipAddress"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        v.sort();
        v
    };
    // Inside the container's own namespaces: its resolv.conf names the gateway.
    let in_task = |args: &[&str]| {
        let out = Command::new("nsenter")
            .args(["--target", &pid, "--net", "--mount"])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // RUNNING means the task is inside its namespaces: its resolv.conf is already in place.
    let resolv = in_task(&["cat", "/etc/resolv.conf"]);
    assert!(resolv.contains("nameserver 10.128.0.1"), "{resolv}");
    let dig_out = in_task(&["dig", "+short", "web-group.marathon.mesos"]);
    let mut got: Vec<String> = dig_out.lines().map(str::to_string).collect();
    got.sort();
    assert_eq!(
        got, ips,
        "dig inside the container answers the container addresses"
    );
    let getent = in_task(&["getent", "hosts", "web-group.marathon.mesos"]);
    assert!(
        ips.iter().any(|ip| getent.contains(ip.as_str())),
        "{getent}"
    );
    // The search domain makes the short DC/OS form work.
    let auto = in_task(&["getent", "hosts", "web-group.marathon.autoip.dcos"]);
    assert!(ips.iter().any(|ip| auto.contains(ip.as_str())), "{auto}");
}

/// `packet` to the agent over UDP from this thread; what comes back within `wait`.
fn udp_exchange(packet: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(wait)).unwrap();
    socket.send_to(packet, "127.0.0.1:53").unwrap();
    let mut buf = [0u8; 2048];
    socket.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
}

/// `packet` to the agent over TCP (length-prefixed); the reply, or `None` if the server
/// sends nothing within `wait`.
fn tcp_exchange(packet: &[u8], wait: Duration) -> Option<Vec<u8>> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect("127.0.0.1:53").unwrap();
    stream.set_read_timeout(Some(wait)).unwrap();
    let mut framed = u16::try_from(packet.len()).unwrap().to_be_bytes().to_vec();
    framed.extend_from_slice(packet);
    stream.write_all(&framed).unwrap();
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).ok()?;
    let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut reply).ok()?;
    Some(reply)
}

#[test]
fn responses_are_never_answered_and_malformed_queries_get_a_well_formed_formerr() {
    use dcnet_dns::proto::op::{MessageType, OpCode, Query};
    use dcnet_dns::proto::rr::{Name, RecordType};
    let ns = NetNs::new("dnsbad");
    ns.enter();
    let agent = Agent::start_with(&ns, "127.0.0.1", "[dns]\nforward = false\n");
    assert!(wait_until(Duration::from_secs(10), || !short(&[
        "leader.mesos"
    ])
    .is_empty()));
    let mut q = Message::new(0x4242, MessageType::Query, OpCode::Query);
    q.add_query(Query::query(
        Name::from_ascii("leader.mesos.").unwrap(),
        RecordType::A,
    ));
    let query = q.to_vec().unwrap();
    let wait = Duration::from_millis(500);
    assert!(
        udp_exchange(&query, wait).is_some(),
        "a plain query is answered"
    );

    // A response, as a forged packet "from 127.0.0.1:53" would carry: no reply on either
    // transport, so the server can never be made to answer itself.
    let mut response = query.clone();
    response[2] |= 0x80;
    assert_eq!(
        udp_exchange(&response, wait),
        None,
        "UDP answered a response"
    );
    assert_eq!(
        tcp_exchange(&response, wait),
        None,
        "TCP answered a response"
    );
    let answer = udp_exchange(&query, wait).expect("an answer");
    assert_eq!(
        udp_exchange(&answer, wait),
        None,
        "our own answer sent back is dropped"
    );

    // Trailing bytes, two questions, a question name that points into the header.
    let mut trailing = query.clone();
    trailing.extend_from_slice(&[0xde, 0xad]);
    let mut two = query.clone();
    two[5] = 2;
    let mut pointer = query[..12].to_vec();
    pointer.extend_from_slice(&[0xc0, 0x02, 0, 1, 0, 1]);
    for (what, bad) in [
        ("trailing bytes", &trailing),
        ("two questions", &two),
        ("a pointer into the header", &pointer),
    ] {
        for (transport, reply) in [
            ("udp", udp_exchange(bad, wait)),
            ("tcp", tcp_exchange(bad, wait)),
        ] {
            let reply = reply.unwrap_or_else(|| panic!("{what} over {transport}: no reply"));
            let msg = Message::from_vec(&reply).unwrap_or_else(|e| {
                panic!("{what} over {transport}: a reply that does not parse: {e}")
            });
            assert_eq!(msg.metadata.id, 0x4242, "{what} over {transport}");
            assert_eq!(
                msg.metadata.response_code,
                ResponseCode::FormErr,
                "{what} over {transport}"
            );
        }
    }
    let metrics = agent.http("GET", "/metrics", None).unwrap().1;
    let metrics = metrics.as_str().unwrap();
    for reason in [
        "response",
        "trailing bytes",
        "question count",
        "question name",
    ] {
        assert!(
            metrics.contains(&format!(
                "dcnet_dns_refused_packets_total{{reason=\"{reason}\"}}"
            )),
            "{reason} counted"
        );
    }
}

#[test]
fn tcp_connections_are_capped_per_client_and_slow_or_idle_ones_are_closed() {
    use std::io::{Read, Write};
    let ns = NetNs::new("dnstcp");
    ns.enter();
    let agent = Agent::start_with(
        &ns,
        "127.0.0.1",
        "[dns]\nforward = false\ntcp_max_per_client = 4\ntcp_idle_timeout = \"1s\"\ntcp_read_timeout = \"500ms\"\n",
    );
    assert!(wait_until(Duration::from_secs(10), || !short(&[
        "leader.mesos"
    ])
    .is_empty()));
    let mut q = Message::new(
        7,
        dcnet_dns::proto::op::MessageType::Query,
        dcnet_dns::proto::op::OpCode::Query,
    );
    q.add_query(dcnet_dns::proto::op::Query::query(
        dcnet_dns::proto::rr::Name::from_ascii("leader.mesos.").unwrap(),
        dcnet_dns::proto::rr::RecordType::A,
    ));
    let query = q.to_vec().unwrap();
    let mut framed = u16::try_from(query.len()).unwrap().to_be_bytes().to_vec();
    framed.extend_from_slice(&query);
    // Whether the server answers a query on `stream` (false: it closed the connection).
    let answers = |stream: &mut std::net::TcpStream| -> bool {
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        if stream.write_all(&framed).is_err() {
            return false;
        }
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).is_ok()
    };
    let mut held: Vec<std::net::TcpStream> = (0..4)
        .map(|_| std::net::TcpStream::connect("127.0.0.1:53").unwrap())
        .collect();
    for s in &mut held {
        let mut len = [0u8; 2];
        s.write_all(&framed).unwrap();
        s.read_exact(&mut len)
            .expect("each of the first four is answered");
        let mut rest = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut rest).unwrap();
    }
    let mut fifth = std::net::TcpStream::connect("127.0.0.1:53").unwrap();
    assert!(
        !answers(&mut fifth),
        "a fifth connection from one client is closed"
    );
    // Closing one frees its slot.
    drop(held.pop());
    let mut again = None;
    assert!(
        wait_until(Duration::from_secs(5), || {
            let mut s = std::net::TcpStream::connect("127.0.0.1:53").unwrap();
            let ok = answers(&mut s);
            again = Some(s);
            ok
        }),
        "a freed slot is taken again"
    );
    drop(again);
    drop(held);

    // Half a message: closed after the read timeout, not held. (The slots of the connections
    // just closed come back as the server notices: until then the cap closes it instead, so
    // try until the read timeout is what closed it.)
    let closed = |r: std::io::Result<usize>| {
        matches!(r, Ok(0)) || r.is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset)
    };
    let read_timeouts = || -> u64 {
        let metrics = agent.http("GET", "/metrics", None).unwrap().1;
        metrics
            .as_str()
            .unwrap()
            .lines()
            .find(|l| l.starts_with("dcnet_dns_tcp_refused_total{bound=\"read_timeout\"}"))
            .map_or(0, |l| l.rsplit(' ').next().unwrap().parse().unwrap())
    };
    let mut buf = [0u8; 16];
    let mut timed_out = false;
    for _ in 0..10 {
        let mut slow = std::net::TcpStream::connect("127.0.0.1:53").unwrap();
        slow.write_all(&framed[..5]).unwrap();
        slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert!(
            closed(slow.read(&mut buf)),
            "a half-sent query's connection is closed"
        );
        if read_timeouts() > 0 {
            timed_out = true;
            break;
        }
    }
    assert!(timed_out, "the read timeout never closed a half-sent query");
    // Idle: closed after the idle timeout.
    let mut idle = std::net::TcpStream::connect("127.0.0.1:53").unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(closed(idle.read(&mut buf)), "an idle connection is closed");
    let metrics = agent.http("GET", "/metrics", None).unwrap().1;
    let metrics = metrics.as_str().unwrap();
    assert!(
        metrics.contains("dcnet_dns_tcp_refused_total{bound=\"max_per_client\"}"),
        "max_per_client counted"
    );
}
