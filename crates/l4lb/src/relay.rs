//! Moving a proxied TCP connection's bytes both ways. With `splice(2)` the bytes go socket →
//! pipe → socket inside the kernel and never reach this process: one iperf3 stream through a
//! VIP went from 8.1 Gbit/s with tokio's 8 KiB `copy_bidirectional` (0.62x HAProxy) to 14-16
//! (1.0-1.2x HAProxy) in bench/l4lb.sh. Making two pipes per connection cost 15% of
//! connections/s, so pipes are kept between connections (HAProxy does the same): a connection
//! that ends cleanly leaves them empty. Without pipes (out of descriptors) it copies.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Mutex;

use nix::fcntl::{OFlag, SpliceFFlags, splice};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};

/// Bytes moved per splice: the default pipe capacity.
const CHUNK: usize = 64 * 1024;
/// Idle pipe pairs kept at most (four descriptors each).
const IDLE_PAIRS: usize = 256;

/// A non-blocking pipe that carries one direction's bytes between the two sockets.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        Ok(Self { read, write })
    }
}

/// Empty pipe pairs for the next connections.
#[derive(Default)]
pub(crate) struct Pipes {
    idle: Mutex<Vec<(Pipe, Pipe)>>,
}

impl Pipes {
    fn take(&self) -> io::Result<(Pipe, Pipe)> {
        if let Some(pair) = self.idle.lock().expect("pipes lock").pop() {
            return Ok(pair);
        }
        Ok((Pipe::new()?, Pipe::new()?))
    }

    /// Keeps a pair that is known to be empty.
    fn give(&self, pair: (Pipe, Pipe)) {
        let mut idle = self.idle.lock().expect("pipes lock");
        if idle.len() < IDLE_PAIRS {
            idle.push(pair);
        }
    }
}

/// Relays between `client` and `upstream` until both directions have ended; each end's
/// EOF is passed on as a write shutdown of the other, as `copy_bidirectional` does.
pub(crate) async fn relay(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    pipes: &Pipes,
) -> io::Result<()> {
    let Ok(pair) = pipes.take() else {
        tokio::io::copy_bidirectional_with_sizes(client, upstream, CHUNK, CHUNK).await?;
        return Ok(());
    };
    let (client_read, client_write) = client.split();
    let (upstream_read, upstream_write) = upstream.split();
    let ended = tokio::try_join!(
        one_way(client_read, upstream_write, &pair.0),
        one_way(upstream_read, client_write, &pair.1),
    );
    // Only a clean end guarantees that no bytes were left in a pipe.
    if ended.is_ok() {
        pipes.give(pair);
    }
    ended.map(|_| ())
}

async fn one_way(src: ReadHalf<'_>, mut dst: WriteHalf<'_>, pipe: &Pipe) -> io::Result<()> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        // The pipe is empty here (every byte read is written below before the next read),
        // so EAGAIN can only mean that the socket has nothing, and try_io may clear its
        // readiness.
        let src_sock: &TcpStream = src.as_ref();
        let n = loop {
            src_sock.readable().await?;
            // A short read almost always drained the socket: it reports WouldBlock too, so
            // that tokio clears the readiness now rather than after one more splice that
            // only finds EAGAIN (a syscall per message and direction). Safe: tokio clears
            // only the readiness it saw before the call, and data that came since raises
            // readiness anew.
            let mut moved = 0;
            match src_sock.try_io(Interest::READABLE, || {
                moved = splice(src_sock, None, &pipe.write, None, CHUNK, flags)?;
                if moved > 0 && moved < CHUNK {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(moved)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && moved > 0 => break moved,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            dst.shutdown().await?;
            return Ok(());
        }
        let dst_sock: &TcpStream = dst.as_ref();
        let mut left = n;
        while left > 0 {
            dst_sock.writable().await?;
            match dst_sock.try_io(Interest::WRITABLE, || {
                splice(&pipe.read, None, dst_sock, None, left, flags).map_err(io::Error::from)
            }) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// Bytes and both half-closes pass through, in both directions, larger than a pipe.
    #[tokio::test]
    async fn relays_both_ways_and_passes_half_closes_on() {
        let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (backend_addr, proxy_addr) =
            (backend.local_addr().unwrap(), proxy.local_addr().unwrap());
        // The backend answers with its input reversed, after the client's EOF.
        let echo = tokio::spawn(async move {
            let (mut s, _) = backend.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            got.reverse();
            s.write_all(&got).await.unwrap();
        });
        let relayed = tokio::spawn(async move {
            let (mut client, _) = proxy.accept().await.unwrap();
            let mut upstream = TcpStream::connect(backend_addr).await.unwrap();
            let pipes = Pipes::default();
            relay(&mut client, &mut upstream, &pipes).await?;
            assert_eq!(
                pipes.idle.lock().unwrap().len(),
                1,
                "the clean pair is kept"
            );
            Ok::<_, io::Error>(())
        });
        let sent: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut c = TcpStream::connect(proxy_addr).await.unwrap();
        let (mut r, mut w) = c.split();
        let send = async {
            w.write_all(&sent).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut back = Vec::new();
        let recv = async { r.read_to_end(&mut back).await.unwrap() };
        tokio::join!(send, recv);
        let mut want = sent.clone();
        want.reverse();
        assert_eq!(back.len(), want.len());
        assert!(back == want, "the bytes came back changed");
        echo.await.unwrap();
        relayed.await.unwrap().unwrap();
    }
}
