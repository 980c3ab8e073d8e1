//! Network namespaces and links for container tasks, through nix and rtnetlink: no `ip`.
//!
//! A namespace is made on a fresh thread that `unshare`s and bind-mounts its own
//! `/proc/thread-self/ns/net` onto a file, as `ip netns add` does; the thread then ends. Work
//! inside a namespace runs on a thread that `setns`es first and then opens its own netlink
//! socket on a current-thread runtime: a netlink socket acts in the namespace of the thread that
//! opened it, and a multi-threaded runtime's threads are in the agent's namespace.

use std::fs;
use std::future::Future;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth, RouteMessageBuilder};

fn nix_io(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

fn netlink_io(e: rtnetlink::Error) -> io::Error {
    io::Error::other(e.to_string())
}

/// Creates a network namespace held by a bind mount at `path`.
pub(crate) fn create(path: &Path) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::File::create(path)?;
    let target = path.to_path_buf();
    let made = std::thread::spawn(move || -> io::Result<()> {
        unshare(CloneFlags::CLONE_NEWNET).map_err(nix_io)?;
        mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(nix_io)
    })
    .join()
    .map_err(|_| io::Error::other("the namespace thread panicked"))?;
    if made.is_err() {
        let _ = fs::remove_file(path);
    }
    made
}

/// Unmounts and removes a namespace file; the namespace goes when nothing else holds it.
pub(crate) fn remove(path: &Path) -> io::Result<()> {
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
        Err(e) => return Err(nix_io(e)),
    }
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Runs `f` with a netlink handle inside the namespace at `path`, on a thread of its own.
pub(crate) async fn run_in<F, Fut, T>(path: &Path, f: F) -> io::Result<T>
where
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = io::Result<T>>,
    T: Send + 'static,
{
    let path: PathBuf = path.to_path_buf();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let result = (|| {
            let ns = fs::File::open(&path)?;
            setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(nix_io)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let (conn, handle, _) = rtnetlink::new_connection()?;
                tokio::spawn(conn);
                f(handle).await
            })
        })();
        let _ = tx.send(result);
    });
    rx.await
        .map_err(|_| io::Error::other("the namespace thread ended without an answer"))?
}

pub(crate) async fn index_of(handle: &Handle, name: &str) -> io::Result<Option<u32>> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(link) => Ok(link.map(|l| l.header.index)),
        // The kernel answers "no such device" as an error.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -19 => Ok(None),
        Err(e) => Err(netlink_io(e)),
    }
}

/// Names of the links whose name starts with `prefix`.
pub(crate) async fn links_with_prefix(
    handle: &Handle,
    prefix: &str,
) -> io::Result<Vec<(String, u32)>> {
    use rtnetlink::packet_route::link::LinkAttribute;
    let mut out = Vec::new();
    let mut links = handle.link().get().execute();
    while let Some(link) = links.try_next().await.map_err(netlink_io)? {
        for attr in &link.attributes {
            if let LinkAttribute::IfName(name) = attr
                && name.starts_with(prefix)
            {
                out.push((name.clone(), link.header.index));
            }
        }
    }
    Ok(out)
}

fn ignore_exists(result: Result<(), rtnetlink::Error>) -> io::Result<()> {
    match result {
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -17 => Ok(()),
        other => other.map_err(netlink_io),
    }
}

/// The node's bridge with the gateway address, up. Idempotent.
pub(crate) async fn ensure_bridge(
    handle: &Handle,
    name: &str,
    gateway: Ipv4Addr,
    prefix: u8,
    mtu: u32,
) -> io::Result<u32> {
    let index = match index_of(handle, name).await? {
        Some(i) => i,
        None => {
            ignore_exists(
                handle
                    .link()
                    .add(LinkBridge::new(name).mtu(mtu).build())
                    .execute()
                    .await,
            )?;
            index_of(handle, name)
                .await?
                .ok_or_else(|| io::Error::other("the bridge vanished"))?
        }
    };
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(netlink_io)?;
    ignore_exists(
        handle
            .address()
            .add(index, gateway.into(), prefix)
            .execute()
            .await,
    )?;
    Ok(index)
}

/// A veth pair: `host` on the bridge in the node's namespace, `peer` moved into `netns`.
pub(crate) async fn add_veth(
    handle: &Handle,
    host: &str,
    peer: &str,
    bridge: u32,
    mtu: u32,
    netns: &Path,
) -> io::Result<()> {
    handle
        .link()
        .add(LinkVeth::new(host, peer).mtu(mtu).build())
        .execute()
        .await
        .map_err(netlink_io)?;
    let ns = fs::File::open(netns)?;
    let peer_index = index_of(handle, peer)
        .await?
        .ok_or_else(|| io::Error::other("the veth peer vanished"))?;
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(peer_index)
                .setns_by_fd(ns.as_raw_fd())
                .build(),
        )
        .execute()
        .await
        .map_err(netlink_io)?;
    let host_index = index_of(handle, host)
        .await?
        .ok_or_else(|| io::Error::other("the veth vanished"))?;
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(host_index)
                .controller(bridge)
                .mtu(mtu)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(netlink_io)
}

/// A MAC derived from the container's address (locally administered, 02:42 + the four octets):
/// when an address is handed out again, the node's neighbour entry for it is still right, so a
/// new container is reachable at once instead of after the stale entry times out.
pub(crate) fn mac_for(ip: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = ip.octets();
    [0x02, 0x42, a, b, c, d]
}

/// Inside the container: `peer` becomes `eth0` with `ip`, loopback up, default route via the
/// gateway.
pub(crate) async fn configure_container(
    handle: Handle,
    peer: String,
    ip: Ipv4Addr,
    prefix: u8,
    gateway: Ipv4Addr,
    mtu: u32,
) -> io::Result<()> {
    let lo = index_of(&handle, "lo")
        .await?
        .ok_or_else(|| io::Error::other("no loopback"))?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(lo).up().build())
        .execute()
        .await
        .map_err(netlink_io)?;
    let index = index_of(&handle, &peer)
        .await?
        .ok_or_else(|| io::Error::other("the veth peer is not in the namespace"))?;
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(index)
                .name("eth0".to_string())
                .address(mac_for(ip).to_vec())
                .mtu(mtu)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(netlink_io)?;
    ignore_exists(
        handle
            .address()
            .add(index, ip.into(), prefix)
            .execute()
            .await,
    )?;
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(gateway)
        .output_interface(index)
        .build();
    ignore_exists(handle.route().add(route).execute().await)
}

pub(crate) async fn delete_link(handle: &Handle, name: &str) -> io::Result<()> {
    if let Some(index) = index_of(handle, name).await? {
        match handle.link().del(index).execute().await {
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -19 => {}
            other => other.map_err(netlink_io)?,
        }
    }
    Ok(())
}
