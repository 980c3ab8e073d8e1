//! The operator's view of the VIPs: what the data plane that runs now really serves, with each
//! backend's state and connections. Each data plane fills it its own way (the proxy from its
//! selectors, the eBPF plane from its maps); `/v1/vips`, `dcnet vip list` and the per-backend
//! metrics read it here and know nothing of any data plane.

use std::sync::{Arc, RwLock};

use serde::Serialize;

use crate::table::{Backend, Lb, VipKey};

/// One VIP as a data plane serves it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServedVip {
    pub key: VipKey,
    /// The VIP's name (`/web`) for named VIPs.
    pub name: Option<String>,
    pub lb: Lb,
    /// The data plane that serves it: what the DATA PLANE column shows.
    pub data_plane: &'static str,
    pub backends: Vec<ServedBackend>,
}

/// Whether a backend gets new connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendHealth {
    Healthy,
    /// Its task is being killed: open connections finish, no new ones.
    Draining,
    /// It refused or timed out lately and is skipped for a while.
    Ejected,
}

impl BackendHealth {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendHealth::Healthy => "healthy",
            BackendHealth::Draining => "draining",
            BackendHealth::Ejected => "ejected",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServedBackend {
    pub backend: Arc<Backend>,
    pub health: BackendHealth,
    /// Open connections (UDP: sessions), where the data plane counts them (the proxy does;
    /// the eBPF plane hands sockets to the kernel and does not).
    pub active: Option<u64>,
    /// Connections (UDP: sessions) sent to it since it joined the table.
    pub total: u64,
    /// Connections that failed and ejected it.
    pub failures: u64,
}

/// What a data plane shows of itself, read at any time from any thread.
pub trait VipView: Send + Sync {
    /// Every VIP served now, in VIP order.
    fn served(&self) -> Vec<ServedVip>;

    /// Whether some VIP sends to the backend at `addr` now.
    fn serves_backend(&self, addr: std::net::SocketAddr) -> bool {
        self.served()
            .iter()
            .any(|v| v.backends.iter().any(|b| b.backend.addr == addr))
    }
}

/// The view of the data plane that runs now: empty before one starts and after it stops, the
/// new one's after a restart.
#[derive(Clone, Default)]
pub struct ViewSlot(Arc<RwLock<Option<Arc<dyn VipView>>>>);

// === impl ViewSlot ===

impl ViewSlot {
    pub(crate) fn set(&self, view: Option<Arc<dyn VipView>>) {
        *self.0.write().expect("view lock") = view;
    }

    /// Whether the data plane that runs now sends to the backend at `addr`.
    pub fn serves_backend(&self, addr: std::net::SocketAddr) -> bool {
        let view = self.0.read().expect("view lock").clone();
        view.is_some_and(|v| v.serves_backend(addr))
    }

    /// What is served now.
    pub fn served(&self) -> Vec<ServedVip> {
        let view = self.0.read().expect("view lock").clone();
        view.map(|v| v.served()).unwrap_or_default()
    }
}

/// How operators name a VIP: `name:port` for a named VIP (`web:80`), else `ip:port`.
pub fn vip_label(key: &VipKey, name: Option<&str>) -> String {
    match name {
        Some(n) => format!("{}:{}", n.trim_start_matches('/'), key.port),
        None => format!("{}:{}", key.ip, key.port),
    }
}
