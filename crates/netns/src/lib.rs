//! The one owner of network namespaces and netlink in dcnet: making and removing a
//! namespace, a netlink handle bound to one, links, addresses and routes, with "already
//! exists" and "no such device" handled in one place, and a guard that removes a namespace
//! when it is dropped. It knows no dcnet types; the container runtime, the l4lb plane, the
//! overlay and the netns tests all go through it, and nothing else depends on rtnetlink.
//!
//! A namespace is made on a fresh thread that `unshare`s and bind-mounts its own
//! `/proc/thread-self/ns/net` onto a file, as `ip netns add` does; the thread then ends. Work
//! inside a namespace runs on a thread that `setns`es first and then opens its own netlink
//! socket on a current-thread runtime: a netlink socket acts in the namespace of the thread
//! that opened it, and a multi-threaded runtime's threads are in the agent's namespace.
//! Nothing here forks (forking a multi-threaded process to make namespaces is unsafe).
#![deny(rust_2018_idioms, clippy::disallowed_methods, clippy::disallowed_types)]
#![forbid(unsafe_code)]

pub mod sockets;

use std::fs;
use std::future::Future;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};
use rtnetlink::packet_route::route::{RouteScope, RouteType};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth, RouteMessageBuilder};

/// Where `ip netns` keeps named namespaces; `nsenter --net=/run/netns/NAME` enters them.
pub const NAMED_DIR: &str = "/run/netns";

const EEXIST: i32 = -17;
const ENODEV: i32 = -19;
const ESRCH: i32 = -3;

fn nix_io(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

fn netlink_io(e: rtnetlink::Error) -> io::Error {
    io::Error::other(e.to_string())
}

/// `Ok` for a result that failed only because the thing already exists.
fn ignore_exists(result: Result<(), rtnetlink::Error>) -> io::Result<()> {
    match result {
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == EEXIST => Ok(()),
        other => other.map_err(netlink_io),
    }
}

/// Creates a network namespace held by a bind mount at `path`.
pub fn create(path: &Path) -> io::Result<()> {
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
pub fn remove(path: &Path) -> io::Result<()> {
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
        Err(e) => return Err(nix_io(e)),
    }
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Moves the calling thread into the namespace at `path`, for good. Its sockets are then
/// that namespace's; other threads are not affected.
pub fn enter(path: &Path) -> io::Result<()> {
    let ns = fs::File::open(path)?;
    setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(nix_io)
}

/// Runs `f` with a netlink handle inside the namespace at `path`, on a thread of its own.
pub async fn run_in<F, Fut, T>(path: &Path, f: F) -> io::Result<T>
where
    F: FnOnce(Netlink) -> Fut + Send + 'static,
    Fut: Future<Output = io::Result<T>>,
    T: Send + 'static,
{
    let path: PathBuf = path.to_path_buf();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let result = (|| {
            enter(&path)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move { f(Netlink::connect()?).await })
        })();
        let _ = tx.send(result);
    });
    rx.await
        .map_err(|_| io::Error::other("the namespace thread ended without an answer"))?
}

/// [`run_in`] from blocking code: a thread of its own, waited for.
pub fn block_in<F, Fut, T>(path: &Path, f: F) -> io::Result<T>
where
    F: FnOnce(Netlink) -> Fut + Send + 'static,
    Fut: Future<Output = io::Result<T>>,
    T: Send + 'static,
{
    let path: PathBuf = path.to_path_buf();
    std::thread::spawn(move || {
        enter(&path)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move { f(Netlink::connect()?).await })
    })
    .join()
    .map_err(|_| io::Error::other("the namespace thread panicked"))?
}

/// A netlink handle, acting in the namespace of the thread that made it.
#[derive(Clone, Debug)]
pub struct Netlink {
    handle: Handle,
}

// === impl Netlink ===

impl Netlink {
    /// A handle for the calling thread's namespace; needs a tokio runtime there.
    pub fn connect() -> io::Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    pub async fn index_of(&self, name: &str) -> io::Result<Option<u32>> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(link) => Ok(link.map(|l| l.header.index)),
            // The kernel answers "no such device" as an error.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == ENODEV => Ok(None),
            Err(e) => Err(netlink_io(e)),
        }
    }

    async fn index_of_existing(&self, name: &str) -> io::Result<u32> {
        self.index_of(name)
            .await?
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no link `{name}`")))
    }

    /// Names and indexes of the links whose name starts with `prefix`.
    pub async fn links_with_prefix(&self, prefix: &str) -> io::Result<Vec<(String, u32)>> {
        use rtnetlink::packet_route::link::LinkAttribute;
        let mut out = Vec::new();
        let mut links = self.handle.link().get().execute();
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

    /// Sets a link up.
    pub async fn set_up(&self, name: &str) -> io::Result<()> {
        let index = self.index_of_existing(name).await?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(netlink_io)
    }

    /// Adds `ip/prefix` to a link; an address it already has is fine.
    pub async fn add_address(&self, name: &str, ip: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let index = self.index_of_existing(name).await?;
        ignore_exists(
            self.handle
                .address()
                .add(index, ip.into(), prefix)
                .execute()
                .await,
        )
    }

    /// A bridge with `gateway/prefix`, up. Idempotent; returns its index.
    pub async fn ensure_bridge(
        &self,
        name: &str,
        gateway: Ipv4Addr,
        prefix: u8,
        mtu: u32,
    ) -> io::Result<u32> {
        if self.index_of(name).await?.is_none() {
            ignore_exists(
                self.handle
                    .link()
                    .add(LinkBridge::new(name).mtu(mtu).build())
                    .execute()
                    .await,
            )?;
        }
        let index = self.index_of_existing(name).await?;
        self.set_up(name).await?;
        self.add_address(name, gateway, prefix).await?;
        Ok(index)
    }

    /// A veth pair: `host` on the bridge `bridge` (an index) here, `peer` moved into the
    /// namespace at `netns`.
    pub async fn add_veth(
        &self,
        host: &str,
        peer: &str,
        bridge: u32,
        mtu: u32,
        netns: &Path,
    ) -> io::Result<()> {
        self.handle
            .link()
            .add(LinkVeth::new(host, peer).mtu(mtu).build())
            .execute()
            .await
            .map_err(netlink_io)?;
        let ns = fs::File::open(netns)?;
        let peer_index = self.index_of_existing(peer).await?;
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(peer_index)
                    .setns_by_fd(ns.as_raw_fd())
                    .build(),
            )
            .execute()
            .await
            .map_err(netlink_io)?;
        let host_index = self.index_of_existing(host).await?;
        self.handle
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

    /// Inside a container: `peer` becomes `eth0` with `ip/prefix` and `mac`, loopback up,
    /// default route via `gateway`.
    pub async fn configure_eth0(
        &self,
        peer: &str,
        ip: Ipv4Addr,
        prefix: u8,
        gateway: Ipv4Addr,
        mac: [u8; 6],
        mtu: u32,
    ) -> io::Result<()> {
        self.set_up("lo").await?;
        let index = self.index_of(peer).await?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("the veth peer `{peer}` is not in the namespace"),
            )
        })?;
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .name("eth0".to_string())
                    .address(mac.to_vec())
                    .mtu(mtu)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(netlink_io)?;
        self.add_address("eth0", ip, prefix).await?;
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gateway)
            .output_interface(index)
            .build();
        ignore_exists(self.handle.route().add(route).execute().await)
    }

    /// Makes every address of `network/prefix` local here (`local NET dev lo`, in the local
    /// table), so that a listener can bind any of them: AnyIP. Idempotent.
    pub async fn add_local_route(&self, network: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let lo = self.index_of_existing("lo").await?;
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(network, prefix)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .table_id(255)
            .output_interface(lo)
            .build();
        ignore_exists(self.handle.route().add(route).execute().await)
    }

    /// Sets a link's MTU and brings it up.
    pub async fn set_mtu_up(&self, name: &str, mtu: u32) -> io::Result<()> {
        let index = self.index_of_existing(name).await?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu).up().build())
            .execute()
            .await
            .map_err(netlink_io)
    }

    /// Sets the most segments a GSO packet handed to the link `name` may carry (the kernel
    /// segments larger ones before they reach it).
    pub async fn set_gso_max_segs(&self, name: &str, segs: u32) -> io::Result<()> {
        use rtnetlink::packet_route::link::LinkAttribute;
        let index = self.index_of_existing(name).await?;
        let mut msg = LinkUnspec::new_with_index(index).build();
        msg.attributes.push(LinkAttribute::GsoMaxSegs(segs));
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(netlink_io)
    }

    /// Routes `network/prefix` out of the link `name` (replacing a route that was there).
    pub async fn replace_route(&self, network: Ipv4Addr, prefix: u8, name: &str) -> io::Result<()> {
        let index = self.index_of_existing(name).await?;
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(network, prefix)
            .output_interface(index)
            .build();
        self.handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(netlink_io)
    }

    /// Removes the route of `network/prefix` out of the link `name`; one that is not there
    /// (or a link that is gone) is fine.
    pub async fn delete_route(&self, network: Ipv4Addr, prefix: u8, name: &str) -> io::Result<()> {
        let Some(index) = self.index_of(name).await? else {
            return Ok(());
        };
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(network, prefix)
            .output_interface(index)
            .build();
        match self.handle.route().del(route).execute().await {
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == ESRCH => Ok(()),
            other => other.map_err(netlink_io),
        }
    }

    /// Deletes a link; one that is not there is fine.
    pub async fn delete_link(&self, name: &str) -> io::Result<()> {
        if let Some(index) = self.index_of(name).await? {
            match self.handle.link().del(index).execute().await {
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == ENODEV => {}
                other => other.map_err(netlink_io)?,
            }
        }
        Ok(())
    }
}

/// A named network namespace (`/run/netns/NAME`, as `ip netns add` makes it) with loopback
/// up, removed when dropped, also when a test panics. Enter it with
/// `nsenter --net=/run/netns/NAME` or [`enter`].
#[derive(Debug)]
pub struct NetnsGuard {
    name: String,
    path: PathBuf,
}

// === impl NetnsGuard ===

impl NetnsGuard {
    pub fn create(name: &str) -> io::Result<Self> {
        let path = Path::new(NAMED_DIR).join(name);
        if path.exists() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("the namespace {} exists already", path.display()),
            ));
        }
        create(&path)?;
        let guard = Self {
            name: name.to_string(),
            path,
        };
        block_in(&guard.path, |nl| async move { nl.set_up("lo").await })?;
        Ok(guard)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = remove(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn a_guard_makes_a_namespace_and_removes_it() {
        if !is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let name = format!("dcnet-test-{}-netns-unit", std::process::id());
        let guard = NetnsGuard::create(&name).unwrap();
        let path = guard.path().to_path_buf();
        assert!(path.exists());
        assert!(
            NetnsGuard::create(&name).is_err(),
            "a second guard of one name"
        );
        let (lo_up, local_bound) = block_in(&path, |nl| async move {
            nl.add_local_route(Ipv4Addr::new(198, 18, 0, 0), 15).await?;
            nl.add_local_route(Ipv4Addr::new(198, 18, 0, 0), 15).await?; // idempotent
            assert_eq!(nl.index_of("nope").await?, None);
            nl.delete_link("nope").await?;
            let lo = nl.index_of("lo").await?.is_some();
            // AnyIP: any address of the range binds without being on a link.
            let bound = std::net::UdpSocket::bind("198.18.7.9:0").is_ok();
            Ok((lo, bound))
        })
        .unwrap();
        assert!(lo_up && local_bound);
        drop(guard);
        assert!(!path.exists(), "dropped guard leaves nothing");
    }
}
