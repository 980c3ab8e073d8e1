//! `dcnet dns`: the records the agent serves, and lookups against its server.

use super::*;

#[derive(Subcommand)]
pub enum DnsCommand {
    /// The records the agent serves, all or of one name.
    Records { name: Option<String> },
    /// Ask the agent's DNS server, like dig.
    Lookup {
        name: String,
        /// A, AAAA, SRV, PTR, SOA, NS or ANY; an IP address looks up its PTR.
        #[arg(long = "type", short = 't', default_value = "A")]
        rtype: String,
        /// The DNS server.
        #[arg(long, default_value = "127.0.0.1:53")]
        server: std::net::SocketAddr,
    },
}

impl DnsCommand {
    pub fn run(self, client: &Client, json: bool) -> anyhow::Result<()> {
        match self {
            DnsCommand::Records { name } => dns_records(client, name.as_deref(), json),
            DnsCommand::Lookup {
                name,
                rtype,
                server,
            } => dns_lookup(&name, &rtype, server, json),
        }
    }
}

fn dns_records(client: &Client, name: Option<&str>, as_json: bool) -> anyhow::Result<()> {
    let path = match name {
        Some(n) => format!("/v1/records?name={n}"),
        None => "/v1/records".to_string(),
    };
    let Some(v) = get_for_table(client, &path, as_json)? else {
        return Ok(());
    };
    let mut t = Table::new(["NAME", "TYPE", "DATA"]);
    for (name, lines) in v["records"].as_object().into_iter().flatten() {
        for line in lines.as_array().into_iter().flatten() {
            let line = line.as_str().unwrap_or_default();
            let (rtype, data) = line.split_once(' ').unwrap_or((line, ""));
            t.row([name.clone(), rtype.to_string(), data.to_string()]);
        }
    }
    t.print();
    Ok(())
}

/// One query over UDP (TCP again if truncated), printed like a short dig.
fn dns_lookup(
    name: &str,
    rtype: &str,
    server: std::net::SocketAddr,
    as_json: bool,
) -> anyhow::Result<()> {
    use dcnet_dns::proto::op::{Message, Query};
    use dcnet_dns::proto::rr::{Name, RecordType};
    use std::io::{Read, Write};

    let (qname, qtype) = match name.parse::<std::net::IpAddr>() {
        Ok(ip) => (Name::from(ip), RecordType::PTR),
        Err(_) => (
            Name::from_ascii(name).with_context(|| format!("`{name}` is not a DNS name"))?,
            rtype
                .to_ascii_uppercase()
                .parse::<RecordType>()
                .map_err(|_| anyhow::anyhow!("unknown record type `{rtype}`"))?,
        ),
    };
    let mut msg = Message::query();
    msg.add_query(Query::query(qname, qtype));
    msg.metadata.recursion_desired = true;
    let bytes = msg.to_vec()?;
    let socket = std::net::UdpSocket::bind(if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })?;
    socket.set_read_timeout(Some(Duration::from_secs(3)))?;
    socket
        .send_to(&bytes, server)
        .with_context(|| format!("sending to {server}"))?;
    let mut buf = vec![0u8; 65535];
    let n = socket
        .recv(&mut buf)
        .with_context(|| format!("no answer from {server}"))?;
    let mut answer = Message::from_vec(&buf[..n])?;
    if answer.metadata.truncation {
        let mut tcp = std::net::TcpStream::connect_timeout(&server, Duration::from_secs(3))?;
        tcp.set_read_timeout(Some(Duration::from_secs(3)))?;
        tcp.write_all(&u16::try_from(bytes.len())?.to_be_bytes())?;
        tcp.write_all(&bytes)?;
        let mut len = [0u8; 2];
        tcp.read_exact(&mut len)?;
        let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
        tcp.read_exact(&mut body)?;
        answer = Message::from_vec(&body)?;
    }
    let rcode = answer.metadata.response_code.to_string();
    if as_json {
        let answers: Vec<Value> = answer
            .answers
            .iter()
            .map(|r| json!({"name": r.name.to_string(), "type": r.record_type().to_string(), "ttl": r.ttl, "data": r.data.to_string()}))
            .collect();
        print_json(
            &json!({"rcode": rcode, "authoritative": answer.metadata.authoritative, "answers": answers}),
        );
        return Ok(());
    }
    println!(
        "{rcode}{}",
        if answer.metadata.authoritative {
            " (authoritative)"
        } else {
            ""
        }
    );
    let mut t = Table::new(["NAME", "TTL", "TYPE", "DATA"]);
    for r in answer.answers.iter().chain(&answer.additionals) {
        t.row([
            r.name.to_string(),
            r.ttl.to_string(),
            r.record_type().to_string(),
            r.data.to_string(),
        ]);
    }
    t.print();
    Ok(())
}
