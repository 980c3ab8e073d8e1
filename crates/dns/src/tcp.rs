//! DNS over TCP on a loop of our own, bounded: at most `max_connections` open at once and
//! `max_per_client` from one address (past either, a new connection is closed at once and
//! counted), an idle connection closed after `idle_timeout`, a message that starts but does
//! not arrive whole within `read_timeout` ends its connection, and the messages of one
//! connection answered one at a time, in order (pipelined queries wait in the socket, so one
//! client holds at most one query in flight per connection). 22,500 held connections once
//! exhausted the agent's file descriptors through hickory-server's listener, which has no
//! cap; its error path also echoed a question count it did not send.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::rr::Record;
use hickory_proto::serialize::binary::BinEncoder;
use hickory_server::net::NetError;
use hickory_server::net::runtime::TokioTime;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponse;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use dcnet_node_core::slots::ConnectionSlots;

use crate::screen::{self, Verdict};
use crate::server::Handler;

/// Bounds of the TCP server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpLimits {
    pub max_connections: usize,
    pub max_per_client: usize,
    /// How long a connection may wait for its next query.
    pub idle_timeout: Duration,
    /// How long a query that has started may take to arrive whole.
    pub read_timeout: Duration,
}

impl Default for TcpLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_per_client: 64,
            idle_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(2),
        }
    }
}

/// Serves one listener until `shutdown`; every connection ends with it.
pub(crate) async fn serve(
    listener: TcpListener,
    handler: Arc<Handler>,
    limits: TcpLimits,
    shutdown: CancellationToken,
) {
    let slots = ConnectionSlots::new(limits.max_connections, limits.max_per_client);
    let mut connections = JoinSet::new();
    loop {
        let (stream, client) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors, most likely: wait a little rather than spin.
                    debug!(error = %e, "DNS TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            () = shutdown.cancelled() => return,
        };
        let slot = match slots.take(client.ip()) {
            Ok(slot) => slot,
            Err(bound) => {
                handler.metrics.tcp_refused(bound.as_str());
                drop(stream);
                continue;
            }
        };
        let (handler, stop) = (handler.clone(), shutdown.clone());
        connections.spawn(async move {
            let _slot = slot;
            tokio::select! {
                res = connection(stream, client, &handler, &limits) => {
                    if let Err(e) = res {
                        debug!(%client, error = %e, "DNS TCP connection ended");
                    }
                }
                () = stop.cancelled() => {}
            }
        });
    }
}

async fn connection(
    mut stream: TcpStream,
    client: SocketAddr,
    handler: &Handler,
    limits: &TcpLimits,
) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut out = Vec::with_capacity(512);
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(limits.idle_timeout, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            // Idle past the timeout, or closed by the client: done.
            Ok(Err(_)) | Err(_) => return Ok(()),
        }
        let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
        match tokio::time::timeout(limits.read_timeout, stream.read_exact(&mut msg)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                handler.metrics.tcp_refused("read_timeout");
                return Ok(());
            }
        }
        out.clear();
        match screen::screen(&msg) {
            Verdict::Answer { .. } => {}
            Verdict::Drop(reason) => {
                handler.metrics.refused_packet(reason);
                continue;
            }
            Verdict::FormErr(reason) => {
                handler.metrics.refused_packet(reason);
                screen::formerr(&msg, &mut out);
                write(&mut stream, &out).await?;
                continue;
            }
        }
        let Ok(request) = Request::from_bytes(msg.clone(), client, Protocol::Tcp) else {
            screen::formerr(&msg, &mut out);
            write(&mut stream, &out).await?;
            continue;
        };
        let reply = Buffered(Arc::new(Mutex::new(Vec::new())));
        handler
            .handle_request::<_, TokioTime>(&request, reply.clone())
            .await;
        let bytes = std::mem::take(&mut *reply.0.lock().expect("reply lock"));
        if !bytes.is_empty() {
            write(&mut stream, &bytes).await?;
        }
    }
}

async fn write(stream: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(msg.len()).unwrap_or(u16::MAX);
    let mut framed = Vec::with_capacity(msg.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(&msg[..usize::from(len)]);
    stream.write_all(&framed).await
}

/// Collects the one answer of a request, for the connection loop to write.
#[derive(Clone)]
struct Buffered(Arc<Mutex<Vec<u8>>>);

#[async_trait::async_trait]
impl ResponseHandler for Buffered {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let mut buf = Vec::with_capacity(512);
        let mut encoder = BinEncoder::new(&mut buf);
        encoder.set_max_size(u16::MAX);
        let info = response.destructive_emit(&mut encoder)?;
        *self.0.lock().expect("reply lock") = buf;
        Ok(info)
    }
}
