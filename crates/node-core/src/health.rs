//! Health probes (TCP, HTTP, COMMAND) and the pure bookkeeping of consecutive results.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::model::{HealthCheck, HealthProtocol, ReadinessCheck};

/// Where a probe goes and what it may run.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: Option<SocketAddr>,
    pub env: Vec<(String, String)>,
    /// A container task's process: a COMMAND check runs in its network and mount
    /// namespaces, where the task's own view of the world is.
    pub enter: Option<u32>,
}

/// Runs one probe; `Err` carries a one-line cause for operators.
pub async fn probe(check: &HealthCheck, target: &Target) -> Result<(), String> {
    let run = async {
        match check.protocol {
            HealthProtocol::TCP => {
                let addr = target.addr.ok_or("the task has no port for this check")?;
                TcpStream::connect(addr)
                    .await
                    .map(drop)
                    .map_err(|e| format!("TCP {addr}: {e}"))
            }
            HealthProtocol::HTTP | HealthProtocol::HTTPS => {
                let addr = target.addr.ok_or("the task has no port for this check")?;
                let path = check.path.as_deref().unwrap_or("/");
                let tls = check.protocol == HealthProtocol::HTTPS;
                match http_get(addr, path, tls).await? {
                    200..400 => Ok(()),
                    status => Err(format!("HTTP {addr}{path}: status {status}")),
                }
            }
            HealthProtocol::COMMAND => {
                let cmd = check
                    .command
                    .as_ref()
                    .map(|c| c.value.as_str())
                    .unwrap_or("false");
                let mut command = match target.enter {
                    Some(pid) => {
                        let mut c = tokio::process::Command::new("nsenter");
                        c.arg(format!("--target={pid}"))
                            .args(["--net", "--mount", "--", "/bin/sh"]);
                        c
                    }
                    None => tokio::process::Command::new("/bin/sh"),
                };
                let status = command
                    .arg("-c")
                    .arg(cmd)
                    .envs(target.env.iter().map(|(k, v)| (k, v)))
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .kill_on_drop(true)
                    .status()
                    .await
                    .map_err(|e| format!("command could not start: {e}"))?;
                if status.success() {
                    Ok(())
                } else {
                    Err(format!("command {status}"))
                }
            }
        }
    };
    match tokio::time::timeout(check.timeout(), run).await {
        Ok(result) => result,
        Err(_) => Err(format!("timed out after {}s", check.timeout().as_secs())),
    }
}

/// A readiness check against `addr`: `Ok` once it answers one of the ready codes.
pub async fn ready(check: &ReadinessCheck, addr: SocketAddr) -> Result<(), String> {
    let path = check.path.as_str();
    let tls = check.protocol == "HTTPS";
    match tokio::time::timeout(check.timeout(), http_get(addr, path, tls)).await {
        Ok(Ok(status)) if check.http_status_codes_for_ready.contains(&status) => Ok(()),
        Ok(Ok(status)) => Err(format!("HTTP {addr}{path}: status {status}, not ready")),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("timed out after {}s", check.timeout().as_secs())),
    }
}

/// A minimal HTTP/1.1 GET, over TLS if `tls`: the status code of the answer (2xx and 3xx are
/// healthy, as in Marathon).
async fn http_get(addr: SocketAddr, path: &str, tls: bool) -> Result<u16, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("HTTP {addr}: {e}"))?;
    if !tls {
        return http_exchange(tcp, addr, path).await;
    }
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let stream = tls_connector()
        .connect(name, tcp)
        .await
        .map_err(|e| format!("HTTPS {addr}: TLS: {e}"))?;
    http_exchange(stream, addr, path).await
}

/// The TLS client of HTTPS checks: any certificate is taken (a task's is usually its own,
/// self-signed), the handshake's signatures are still checked.
fn tls_connector() -> tokio_rustls::TlsConnector {
    static CONFIG: std::sync::OnceLock<std::sync::Arc<rustls::ClientConfig>> =
        std::sync::OnceLock::new();
    let config = CONFIG.get_or_init(|| {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(std::sync::Arc::new(AnyCertificate(provider)))
            .with_no_client_auth();
        std::sync::Arc::new(config)
    });
    tokio_rustls::TlsConnector::from(config.clone())
}

#[derive(Debug)]
struct AnyCertificate(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Sends the GET on `stream` and reads the status line of the answer.
async fn http_exchange<S>(mut stream: S, addr: SocketAddr, path: &str) -> Result<u16, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: dcnet-health\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("HTTP {addr}: {e}"))?;
    let mut head = [0u8; 64];
    let mut read = 0;
    while read < 12 {
        let n = stream
            .read(&mut head[read..])
            .await
            .map_err(|e| format!("HTTP {addr}: {e}"))?;
        if n == 0 {
            break;
        }
        read += n;
    }
    let line = String::from_utf8_lossy(&head[..read]);
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("HTTP {addr}{path}: not an HTTP answer"))?;
    Ok(status)
}

/// The state of one check of one task, advanced by each result.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tracker {
    pub alive: Option<bool>,
    pub consecutive_failures: u32,
    pub ever_succeeded: bool,
    pub last_cause: Option<String>,
}

/// What a result means for the task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing an operator needs to hear about changed.
    Unchanged,
    /// The task's health changed; publish it.
    Changed,
    /// Past `maxConsecutiveFailures`: kill and replace the task.
    Kill { cause: String },
}

impl Tracker {
    /// Applies one result. Failures inside the grace period do not count until the task has
    /// passed once, as in Marathon.
    pub fn record(
        &mut self,
        check: &HealthCheck,
        result: Result<(), String>,
        in_grace: bool,
    ) -> Verdict {
        let before = (self.alive, self.consecutive_failures);
        match result {
            Ok(()) => {
                self.alive = Some(true);
                self.consecutive_failures = 0;
                self.ever_succeeded = true;
            }
            Err(cause) => {
                self.last_cause = Some(cause.clone());
                if in_grace && !self.ever_succeeded {
                    return Verdict::Unchanged;
                }
                self.alive = Some(false);
                self.consecutive_failures += 1;
                // 0: never killed for failing, as in Marathon (it is reported unhealthy).
                if check.max_consecutive_failures > 0
                    && self.consecutive_failures >= check.max_consecutive_failures
                {
                    return Verdict::Kill {
                        cause: format!(
                            "failed {} consecutive health checks: {cause}",
                            self.consecutive_failures
                        ),
                    };
                }
            }
        }
        if before == (self.alive, self.consecutive_failures) {
            Verdict::Unchanged
        } else {
            Verdict::Changed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(max: u32) -> HealthCheck {
        serde_json::from_value(
            serde_json::json!({"protocol": "TCP", "maxConsecutiveFailures": max}),
        )
        .unwrap()
    }

    #[test]
    fn grace_period_forgives_until_first_success() {
        let c = check(2);
        let mut t = Tracker::default();
        assert_eq!(
            t.record(&c, Err("refused".into()), true),
            Verdict::Unchanged
        );
        assert_eq!(t.alive, None);
        assert_eq!(t.record(&c, Ok(()), true), Verdict::Changed);
        assert_eq!(t.record(&c, Err("refused".into()), true), Verdict::Changed);
        assert!(matches!(
            t.record(&c, Err("refused".into()), true),
            Verdict::Kill { .. }
        ));
    }

    #[test]
    fn success_resets_the_count() {
        let c = check(3);
        let mut t = Tracker::default();
        t.record(&c, Err("x".into()), false);
        t.record(&c, Err("x".into()), false);
        assert_eq!(t.consecutive_failures, 2);
        t.record(&c, Ok(()), false);
        assert_eq!((t.alive, t.consecutive_failures), (Some(true), 0));
    }

    #[tokio::test]
    async fn probes_hit_real_sockets() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 512];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]);
                let status = if req.starts_with("GET /ok ") {
                    "200 OK"
                } else {
                    "503 Unavailable"
                };
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let target = Target {
            addr: Some(addr),
            env: vec![],
            enter: None,
        };
        let http = |path: &str| -> HealthCheck {
            serde_json::from_value(
                serde_json::json!({"protocol": "HTTP", "path": path, "timeoutSeconds": 2}),
            )
            .unwrap()
        };
        assert_eq!(probe(&http("/ok"), &target).await, Ok(()));
        let err = probe(&http("/bad"), &target).await.unwrap_err();
        assert!(err.contains("status 503"), "{err}");
        assert_eq!(probe(&check(1), &target).await, Ok(()));
        let closed = Target {
            addr: Some("127.0.0.1:1".parse().unwrap()),
            env: vec![],
            enter: None,
        };
        assert!(probe(&check(1), &closed).await.is_err());
        let cmd: HealthCheck = serde_json::from_value(
            serde_json::json!({"protocol": "COMMAND", "command": {"value": "test \"$X\" = yes"}}),
        )
        .unwrap();
        let env = Target {
            addr: None,
            env: vec![("X".into(), "yes".into())],
            enter: None,
        };
        assert_eq!(probe(&cmd, &env).await, Ok(()));
        assert!(
            probe(
                &cmd,
                &Target {
                    addr: None,
                    env: vec![],
                    enter: None,
                }
            )
            .await
            .is_err()
        );
    }

    /// A COMMAND check of a container task runs in the task's network namespace: there, only
    /// loopback exists (three lines of /proc/net/dev).
    #[tokio::test]
    async fn command_checks_run_in_the_task_s_namespaces() {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let is_root = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|uids| uids.split_whitespace().nth(1))
            == Some("0");
        if !is_root {
            eprintln!("skipped: needs root");
            return;
        }
        let name = format!("dcnet-test-{}-health", std::process::id());
        let ns = dcnet_netns::NetnsGuard::create(&name).unwrap();
        let mut task = tokio::process::Command::new("nsenter")
            .arg(format!("--net={}", ns.path().display()))
            .args(["sleep", "30"])
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pid = task.id().unwrap();
        // nsenter becomes sleep once it has entered: wait until the namespace is its.
        let mine = std::fs::read_link("/proc/self/ns/net").unwrap();
        for _ in 0..100 {
            if std::fs::read_link(format!("/proc/{pid}/ns/net")).is_ok_and(|l| l != mine) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let only_lo: HealthCheck = serde_json::from_value(serde_json::json!(
            {"protocol": "COMMAND", "command": {"value": "[ $(wc -l < /proc/net/dev) -eq 3 ] && [ \"$APP\" = web ]"}}
        ))
        .unwrap();
        let inside = Target {
            addr: None,
            env: vec![("APP".into(), "web".into())],
            enter: Some(pid),
        };
        assert_eq!(probe(&only_lo, &inside).await, Ok(()));
        let outside = Target {
            enter: None,
            ..inside
        };
        assert!(
            probe(&only_lo, &outside).await.is_err(),
            "the node has more than loopback"
        );
        task.kill().await.unwrap();
    }

    #[test]
    fn zero_max_failures_never_kills() {
        let mut t = Tracker::default();
        for _ in 0..10 {
            let v = t.record(&check(0), Err("refused".into()), false);
            assert!(!matches!(v, Verdict::Kill { .. }), "{v:?}");
        }
        assert_eq!(t.alive, Some(false));
    }

    /// An HTTPS check speaks TLS to a server with a self-signed certificate (made here with
    /// openssl, served by python's ssl module) and reads its status; plain HTTP to the same
    /// port fails.
    #[tokio::test]
    async fn https_checks_speak_tls_without_checking_the_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let (key, cert) = (dir.path().join("key.pem"), dir.path().join("cert.pem"));
        let made = std::process::Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=task",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("openssl (Debian's openssl)");
        assert!(
            made.status.success(),
            "{}",
            String::from_utf8_lossy(&made.stderr)
        );
        let server = format!(
            "import http.server, ssl, sys\nclass H(http.server.BaseHTTPRequestHandler):\n    def do_GET(self):\n        self.send_response(200 if self.path == '/ok' else 503)\n        self.end_headers()\n    def log_message(self, *a):\n        pass\ns = http.server.HTTPServer(('127.0.0.1', 0), H)\nc = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\nc.load_cert_chain('{}', '{}')\ns.socket = c.wrap_socket(s.socket, server_side=True)\nprint(s.server_address[1], flush=True)\ns.serve_forever()",
            cert.display(),
            key.display()
        );
        let mut child = tokio::process::Command::new("python3")
            .args(["-c", &server])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        tokio::io::AsyncBufReadExt::read_line(&mut out, &mut line)
            .await
            .unwrap();
        let port: u16 = line.trim().parse().unwrap();
        let target = Target {
            addr: Some(SocketAddr::from(([127, 0, 0, 1], port))),
            env: vec![],
            enter: None,
        };
        let checked = |protocol: &str, path: &str| -> HealthCheck {
            serde_json::from_value(
                serde_json::json!({"protocol": protocol, "path": path, "timeoutSeconds": 3}),
            )
            .unwrap()
        };
        assert_eq!(probe(&checked("HTTPS", "/ok"), &target).await, Ok(()));
        assert_eq!(probe(&checked("MESOS_HTTPS", "/ok"), &target).await, Ok(()));
        let err = probe(&checked("HTTPS", "/no"), &target).await.unwrap_err();
        assert!(err.contains("status 503"), "{err}");
        assert!(probe(&checked("HTTP", "/ok"), &target).await.is_err());
        let readiness: ReadinessCheck = serde_json::from_value(
            serde_json::json!({"protocol": "HTTPS", "portName": "https", "path": "/ok"}),
        )
        .unwrap();
        assert_eq!(ready(&readiness, target.addr.unwrap()).await, Ok(()));
        child.kill().await.unwrap();
    }
}
