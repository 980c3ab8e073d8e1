//! The etcd backend: the same keys, revisions, preconditions, watches and leases as the
//! embedded store, kept by an etcd cluster (the v3 API through `etcd-client`).
//!
//! - A transaction is one etcd `Txn`: every precondition is a `Compare`, every write an op of
//!   the success branch, and the failure branch reads the compared keys back so that a
//!   conflict names the key and the revision it found.
//! - A list pages through the prefix at one pinned revision, so a large cluster never needs
//!   one response above gRPC's message limit and the pages are one consistent read.
//! - A watch is a task that follows etcd's watch stream and resumes from the revision after
//!   the last one it delivered when the connection breaks; a compacted start revision ends
//!   the stream with [`StoreError::Compacted`] (the consumer lists again), never a silent gap.
//! - Requests require a leader (`require_leader`): without quorum they fail fast with an
//!   error instead of waiting, so the API refuses writes with a 503 at once while every plane
//!   keeps serving from its last snapshot.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, CompactionOptions, Compare, CompareOp, ConnectOptions, DeleteOptions,
    EventType, GetOptions, Identity, PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{
    Action, Event, KeyValue, LeaseId, MAX_TXN_OPS, Op, Precondition, Revision, Store, StoreError,
    WatchStream,
};

/// Keys per page of a list.
const PAGE: i64 = 1000;
/// Whole transactions a watcher may have queued before its watch task waits (etcd then holds
/// the rest: a slow consumer slows its own watch, never a writer).
const WATCH_BUFFER: usize = 1024;
/// The largest response accepted (a page of big app definitions, a large transaction's
/// events); etcd's own request limit is 1.5 MiB, a page of 1,000 values can be more.
const MAX_MESSAGE: usize = 64 << 20;

/// Where the cluster is and how to talk to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client URLs of the members: `http://10.0.0.1:2379` or `https://...` with TLS.
    pub endpoints: Vec<String>,
    /// The CA that signed the members' certificates (PEM); with it the client speaks TLS.
    pub ca: Option<PathBuf>,
    /// The client certificate and key (PEM) for members that require client certificates.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// How long one request may take before it fails (and the API answers 503).
    pub request_timeout: Duration,
}

impl EtcdConfig {
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            ca: None,
            cert: None,
            key: None,
            request_timeout: Duration::from_secs(3),
        }
    }
}

/// A [`Store`] kept by etcd. Clones share one connection.
#[derive(Clone)]
pub struct Etcd {
    client: Client,
}

fn backend(e: etcd_client::Error) -> StoreError {
    StoreError::Backend(format!("etcd: {e}"))
}

fn is_lease_not_found(e: &etcd_client::Error) -> bool {
    // etcd's gRPC status carries the reason only as text: `etcdserver: requested lease not
    // found`; the keep-alive stream says `lease not found`.
    match e {
        etcd_client::Error::GRpcStatus(s) => s.message().contains("lease not found"),
        etcd_client::Error::LeaseKeepAliveError(s) => s.contains("not found"),
        _ => false,
    }
}

fn revision_of(header: Option<&etcd_client::ResponseHeader>) -> Revision {
    header.map_or(0, |h| h.revision().max(0) as Revision)
}

fn to_kv(kv: &etcd_client::KeyValue) -> Result<KeyValue, StoreError> {
    Ok(KeyValue {
        key: kv
            .key_str()
            .map_err(|e| StoreError::Backend(format!("etcd: a key is not UTF-8: {e}")))?
            .to_string(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision() as Revision,
        mod_revision: kv.mod_revision() as Revision,
        lease: (kv.lease() != 0).then_some(kv.lease() as LeaseId),
    })
}

fn compare(op: &Op) -> Option<Compare> {
    match op.when {
        Precondition::Any => None,
        Precondition::Absent => Some(Compare::create_revision(
            op.key.as_str(),
            CompareOp::Equal,
            0,
        )),
        Precondition::Revision(r) => Some(Compare::mod_revision(
            op.key.as_str(),
            CompareOp::Equal,
            r as i64,
        )),
    }
}

impl Etcd {
    /// Connects to the members (lazily: a member that is down now is tried again later).
    pub async fn connect(cfg: &EtcdConfig) -> Result<Self, StoreError> {
        if cfg.endpoints.is_empty() {
            return Err(StoreError::Backend("etcd: no endpoints given".into()));
        }
        let mut options = ConnectOptions::new()
            .with_require_leader(true)
            .with_timeout(cfg.request_timeout)
            .with_connect_timeout(Duration::from_secs(2))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        if cfg.ca.is_some() || cfg.cert.is_some() {
            options = options.with_tls(tls(cfg)?);
        }
        let client = Client::connect(&cfg.endpoints, Some(options))
            .await
            .map_err(|e| {
                StoreError::Backend(format!(
                    "etcd: connecting to {}: {e}",
                    cfg.endpoints.join(",")
                ))
            })?;
        Ok(Self { client })
    }

    fn kv(&self) -> etcd_client::KvClient {
        self.client
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE)
    }

    /// Reads what the failure branch of a transaction returned and names the first
    /// precondition that did not hold.
    fn conflict(ops: &[Op], checked: &[usize], responses: Vec<TxnOpResponse>) -> StoreError {
        for (i, response) in checked.iter().zip(responses) {
            let op = &ops[*i];
            let actual = match response {
                TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.mod_revision() as u64),
                _ => continue,
            };
            if !op.when.holds(actual) {
                return StoreError::Conflict {
                    key: op.key.clone(),
                    expected: op.when,
                    actual,
                };
            }
        }
        // The key changed back between the compare and the read: still a conflict.
        let op = &ops[checked[0]];
        StoreError::Conflict {
            key: op.key.clone(),
            expected: op.when,
            actual: None,
        }
    }
}

fn tls(cfg: &EtcdConfig) -> Result<TlsOptions, StoreError> {
    let read = |path: &PathBuf| {
        std::fs::read(path)
            .map_err(|e| StoreError::Backend(format!("etcd: reading {}: {e}", path.display())))
    };
    let mut tls = TlsOptions::new();
    if let Some(ca) = &cfg.ca {
        tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
    }
    match (&cfg.cert, &cfg.key) {
        (Some(cert), Some(key)) => {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        (None, None) => {}
        _ => {
            return Err(StoreError::Backend(
                "etcd: a client certificate needs both `cert` and `key`".into(),
            ));
        }
    }
    Ok(tls)
}

#[async_trait]
impl Store for Etcd {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let resp = self.kv().get(key, None).await.map_err(backend)?;
        resp.kvs().first().map(to_kv).transpose()
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let mut kv = self.kv();
        let end = {
            // The key after every key under the prefix, as etcd's `with_prefix` makes it.
            let mut end = prefix.as_bytes().to_vec();
            while let Some(last) = end.pop() {
                if last < 0xff {
                    end.push(last + 1);
                    break;
                }
            }
            end
        };
        let mut out = Vec::new();
        let mut from = prefix.as_bytes().to_vec();
        let mut revision = 0i64;
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let resp = kv.get(from.clone(), Some(options)).await.map_err(|e| {
                if let etcd_client::Error::GRpcStatus(s) = &e
                    && s.message().contains("compacted")
                {
                    // The pinned revision went while paging: the caller lists again.
                    StoreError::Compacted {
                        requested: revision as Revision,
                        oldest: revision as Revision + 1,
                    }
                } else {
                    backend(e)
                }
            })?;
            if revision == 0 {
                revision = revision_of(resp.header()) as i64;
            }
            for kv in resp.kvs() {
                out.push(to_kv(kv)?);
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        Ok((out, revision as Revision))
    }

    async fn txn(&self, ops: Vec<Op>) -> Result<Revision, StoreError> {
        if ops.len() > MAX_TXN_OPS {
            return Err(StoreError::TooLarge {
                ops: ops.len(),
                max: MAX_TXN_OPS,
            });
        }
        let mut compares = Vec::new();
        let mut checked = Vec::new();
        let mut writes = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            if let Some(c) = compare(op) {
                compares.push(c);
                checked.push(i);
            }
            match &op.action {
                Action::Put { value, lease } => {
                    let options = lease.map(|l| PutOptions::new().with_lease(l as i64));
                    writes.push(TxnOp::put(op.key.as_str(), value.clone(), options));
                }
                Action::Delete => {
                    writes.push(TxnOp::delete(op.key.as_str(), None::<DeleteOptions>));
                }
                Action::Check => {}
            }
        }
        let reads: Vec<TxnOp> = checked
            .iter()
            .map(|i| TxnOp::get(ops[*i].key.as_str(), None))
            .collect();
        let txn = Txn::new().when(compares).and_then(writes).or_else(reads);
        let resp = self.kv().txn(txn).await.map_err(|e| {
            if is_lease_not_found(&e) {
                let lease = ops.iter().find_map(|op| match op.action {
                    Action::Put { lease, .. } => lease,
                    _ => None,
                });
                StoreError::LeaseNotFound(lease.unwrap_or(0))
            } else {
                backend(e)
            }
        })?;
        if !resp.succeeded() {
            return Err(Self::conflict(&ops, &checked, resp.op_responses()));
        }
        Ok(revision_of(resp.header()))
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let watcher = Watcher {
            client: self.client.clone(),
            prefix: prefix.to_string(),
            next: from.max(1),
            tx,
        };
        // Open the first stream before returning, so that an unreachable cluster is an error
        // of the call, not of the first item.
        let stream = watcher.open().await?;
        tokio::spawn(watcher.follow(stream));
        Ok(rx)
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        // etcd counts whole seconds (and raises a TTL below its minimum, about 2 s).
        let secs = ttl.as_secs_f64().ceil().max(1.0) as i64;
        let resp = self
            .client
            .lease_client()
            .grant(secs, None)
            .await
            .map_err(backend)?;
        Ok(resp.id() as LeaseId)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let not_found = |e: etcd_client::Error| {
            if is_lease_not_found(&e) {
                StoreError::LeaseNotFound(lease)
            } else {
                backend(e)
            }
        };
        let (mut keeper, mut stream) = self
            .client
            .lease_client()
            .keep_alive(lease as i64)
            .await
            .map_err(not_found)?;
        keeper.keep_alive().await.map_err(not_found)?;
        match stream.message().await.map_err(not_found)? {
            Some(resp) if resp.ttl() > 0 => Ok(()),
            Some(_) => Err(StoreError::LeaseNotFound(lease)),
            None => Err(StoreError::Backend(
                "etcd: the keep-alive stream closed".into(),
            )),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        match self.client.lease_client().revoke(lease as i64).await {
            Ok(_) => Ok(()),
            Err(e) if is_lease_not_found(&e) => Err(StoreError::LeaseNotFound(lease)),
            Err(e) => Err(backend(e)),
        }
    }

    async fn revision(&self) -> Result<Revision, StoreError> {
        // A count-only read of one key costs etcd nothing and carries the header revision.
        let resp = self
            .kv()
            .get("/", Some(GetOptions::new().with_count_only()))
            .await
            .map_err(backend)?;
        Ok(revision_of(resp.header()))
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        match self
            .kv()
            .compact(
                revision as i64,
                Some(CompactionOptions::new().with_physical()),
            )
            .await
        {
            Ok(_) => Ok(()),
            // Already compacted that far: nothing to do.
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("compacted") => Ok(()),
            Err(e) => Err(backend(e)),
        }
    }
}

/// One watch: follows etcd's stream and hands whole revisions to the consumer.
struct Watcher {
    client: Client,
    prefix: String,
    /// The first revision not yet delivered.
    next: Revision,
    tx: mpsc::Sender<Result<Vec<Event>, StoreError>>,
}

impl Watcher {
    async fn open(&self) -> Result<etcd_client::WatchStream, StoreError> {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(self.next as i64);
        self.client
            .watch_client()
            .max_decoding_message_size(MAX_MESSAGE)
            .watch(self.prefix.as_str(), Some(options))
            .await
            .map_err(backend)
    }

    async fn follow(mut self, mut stream: etcd_client::WatchStream) {
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.pump(&mut stream).await {
                Ok(()) => return,
                Err(StoreError::Compacted { requested, oldest }) => {
                    let _ = self
                        .tx
                        .send(Err(StoreError::Compacted { requested, oldest }))
                        .await;
                    return;
                }
                Err(e) => {
                    debug!(prefix = %self.prefix, next = self.next, error = %e, "etcd watch broke; resuming");
                }
            }
            // Reconnect from the revision after the last one delivered.
            loop {
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = self.tx.closed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                match self.open().await {
                    Ok(s) => {
                        stream = s;
                        backoff = Duration::from_millis(50);
                        break;
                    }
                    Err(e) => {
                        warn!(prefix = %self.prefix, next = self.next, error = %e, "etcd watch cannot resume yet");
                    }
                }
            }
        }
    }

    /// Delivers responses until the stream breaks (`Err`) or the consumer goes (`Ok`).
    async fn pump(&mut self, stream: &mut etcd_client::WatchStream) -> Result<(), StoreError> {
        loop {
            let resp = tokio::select! {
                resp = stream.message() => resp.map_err(backend)?,
                () = self.tx.closed() => return Ok(()),
            };
            let Some(resp) = resp else {
                return Err(StoreError::Backend("etcd: the watch stream ended".into()));
            };
            if resp.compact_revision() > 0 {
                return Err(StoreError::Compacted {
                    requested: self.next,
                    oldest: resp.compact_revision() as Revision,
                });
            }
            if resp.canceled() {
                return Err(StoreError::Backend(format!(
                    "etcd: the watch was canceled: {}",
                    resp.cancel_reason()
                )));
            }
            // One item per revision: a response may hold several transactions.
            let mut batch: Vec<Event> = Vec::new();
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let revision = kv.mod_revision() as Revision;
                if batch.first().is_some_and(|e| e.revision() != revision) {
                    self.deliver(std::mem::take(&mut batch)).await?;
                }
                batch.push(match ev.event_type() {
                    EventType::Put => Event::Put(to_kv(kv)?),
                    EventType::Delete => Event::Delete {
                        key: to_kv(kv)?.key,
                        revision,
                    },
                });
            }
            if !batch.is_empty() {
                self.deliver(batch).await?;
            }
        }
    }

    async fn deliver(&mut self, batch: Vec<Event>) -> Result<(), StoreError> {
        let revision = batch[0].revision();
        if revision < self.next {
            // Already delivered before a reconnect.
            return Ok(());
        }
        if self.tx.send(Ok(batch)).await.is_err() {
            // The consumer went; `pump` sees the closed channel next.
            return Ok(());
        }
        self.next = revision + 1;
        Ok(())
    }
}
