//! For other crates' tests: the `ClusterState` of a store, published as the agent does.

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::ClusterState;
use crate::keys::SharedStore;

/// Follows `store` into a `ClusterState` watch until `shutdown`, as an agent does, and
/// returns once the first snapshot is loaded. The store needs at least one key (an agent
/// registers its node first): an empty store has no revision to load.
pub async fn follow(
    store: SharedStore,
    shutdown: CancellationToken,
) -> watch::Receiver<Arc<ClusterState>> {
    let (tx, mut rx) = watch::channel(Arc::new(ClusterState::default()));
    tokio::spawn(crate::state::publish(store, tx, shutdown));
    rx.wait_for(|s| s.is_loaded())
        .await
        .expect("the publisher runs until shutdown");
    rx
}
