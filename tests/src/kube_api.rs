//! A Kubernetes API server stand-in: there is no real API server on these machines, so the
//! agent's Kubernetes mode and the CA are tested against this.
//!
//! It speaks the real protocol the clients use, with real Kubernetes JSON objects:
//!
//! - `GET` of a collection (`/api/v1/pods`, `/api/v1/namespaces/{ns}/pods`,
//!   `/apis/{group}/{version}/...`) answers a `<Kind>List` whose `metadata.resourceVersion` is
//!   the store's current version; items carry no `kind`/`apiVersion`, as the real server's
//!   lists. `labelSelector` (`=`, `==`, `!=`, `in`, `notin`, `key`, `!key`) and
//!   `fieldSelector` (`=`, `==`, `!=` on the fields the real server supports per kind; others
//!   are a 400) filter it. `limit` is accepted and every item returned at once (no `continue`),
//!   which the protocol allows.
//! - `?watch=1&resourceVersion=N` streams watch events (`ADDED`/`MODIFIED`/`DELETED`, and
//!   `BOOKMARK` every [`KubeApi::set_bookmark_interval`] when `allowWatchBookmarks=true`) as
//!   newline-delimited JSON in a chunked response, from just after version N. An object that
//!   stops (starts) matching the watch's selectors is sent as `DELETED` (`ADDED`), as the real
//!   server's watch cache does. A version older than the compacted history gets one `ERROR`
//!   event with a 410 `Expired` Status ("too old resource version"), so the client relists.
//!   `timeoutSeconds` ends the stream.
//! - `GET` of one object; `POST /apis/authentication.k8s.io/v1/tokenreviews` (TokenReview).
//! - Bearer-token authentication of every request, when tokens are required.
//!
//! Test controls: [`KubeApi::apply`] / [`KubeApi::delete`] (as the scheduler, kubelet or
//! `kubectl` would change objects), [`KubeApi::compact`] (forget history: older versions get
//! 410), [`KubeApi::expire_watches`] (end every watch stream, as the server's watch timeout
//! does), [`KubeApi::stop`] / [`KubeApi::start_again`] (an outage: connections are cut and the
//! port refuses connections until it is back).
//!
//! Not modelled: writes through HTTP (the agent and the CA only read and create
//! TokenReviews), admission, defaulting, field validation, discovery (`/api`, `/apis`: the
//! clients know their resources), client certificates.
//!
//! It serves HTTPS ([`KubeApi::start`]: a certificate for 127.0.0.1 from a CA of its own, in the
//! kubeconfig it writes) or plain HTTP ([`KubeApi::start_plain`]).
use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll},
    time::Duration,
};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::{
    Request, Response, StatusCode,
    body::{Body, Frame, Incoming},
    service::service_fn,
};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

/// Changes kept for watches to resume from; older versions get 410.
const HISTORY_LIMIT: usize = 10_000;

/// A kind of object the stand-in serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Resource {
    /// API group, "" for the core group.
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub namespaced: bool,
    /// Field selectors the real server supports besides `metadata.name` and
    /// `metadata.namespace`.
    fields: &'static [&'static str],
}

impl Resource {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

pub const NAMESPACES: Resource = Resource {
    group: "",
    version: "v1",
    kind: "Namespace",
    plural: "namespaces",
    namespaced: false,
    fields: &["status.phase"],
};
pub const PODS: Resource = Resource {
    group: "",
    version: "v1",
    kind: "Pod",
    plural: "pods",
    namespaced: true,
    fields: &[
        "spec.nodeName",
        "spec.restartPolicy",
        "spec.schedulerName",
        "spec.serviceAccountName",
        "spec.hostNetwork",
        "status.phase",
        "status.podIP",
        "status.nominatedNodeName",
    ],
};
pub const SERVICES: Resource = Resource {
    group: "",
    version: "v1",
    kind: "Service",
    plural: "services",
    namespaced: true,
    fields: &["spec.clusterIP", "spec.type"],
};
pub const SECRETS: Resource = Resource {
    group: "",
    version: "v1",
    kind: "Secret",
    plural: "secrets",
    namespaced: true,
    fields: &["type"],
};
pub const ENDPOINT_SLICES: Resource = Resource {
    group: "discovery.k8s.io",
    version: "v1",
    kind: "EndpointSlice",
    plural: "endpointslices",
    namespaced: true,
    fields: &["addressType"],
};
pub const HTTP_ROUTES: Resource = Resource {
    group: "gateway.networking.k8s.io",
    version: "v1",
    kind: "HTTPRoute",
    plural: "httproutes",
    namespaced: true,
    fields: &[],
};
pub const AUTHORIZATION_POLICIES: Resource = Resource {
    group: "security.trellis.dev",
    version: "v1",
    kind: "AuthorizationPolicy",
    plural: "authorizationpolicies",
    namespaced: true,
    fields: &[],
};

const RESOURCES: [Resource; 7] = [
    NAMESPACES,
    PODS,
    SERVICES,
    SECRETS,
    ENDPOINT_SLICES,
    HTTP_ROUTES,
    AUTHORIZATION_POLICIES,
];

/// What a TokenReview says about a token (the `status.user` of an authenticated review).
#[derive(Clone, Debug)]
pub struct TokenUser {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    /// `status.user.extra` (a bound service-account token carries the pod's and the node's
    /// names there: `authentication.kubernetes.io/pod-name`, `.../node-name`, ...).
    pub extra: BTreeMap<String, Vec<String>>,
    /// Audiences the token is valid for; empty = the API server's default audience only.
    pub audiences: Vec<String>,
}

impl TokenUser {
    /// A projected service-account token of pod `pod` (on `node`) running as
    /// `namespace/service_account`, as the API server's TokenReview describes it.
    pub fn service_account(namespace: &str, service_account: &str, pod: &str, node: &str) -> Self {
        let mut extra = BTreeMap::new();
        extra.insert(
            "authentication.kubernetes.io/pod-name".to_string(),
            vec![pod.to_string()],
        );
        extra.insert(
            "authentication.kubernetes.io/node-name".to_string(),
            vec![node.to_string()],
        );
        Self {
            username: format!("system:serviceaccount:{namespace}:{service_account}"),
            uid: new_uid(),
            groups: vec![
                "system:serviceaccounts".to_string(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".to_string(),
            ],
            extra,
            audiences: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct ObjectKey {
    resource: Resource,
    namespace: String,
    name: String,
}

/// One change, as watches replay it.
struct Change {
    rv: u64,
    resource: Resource,
    /// The object before (None: created).
    old: Option<Value>,
    /// The object after (None: deleted).
    new: Option<Value>,
}

struct Watcher {
    id: u64,
    resource: Resource,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Bytes>,
}

#[derive(Default)]
struct Store {
    /// The newest resource version handed out (etcd's revision: one counter for all kinds).
    rv: u64,
    /// Watches may resume from any version >= this; older ones get 410.
    compacted: u64,
    objects: BTreeMap<ObjectKey, Value>,
    history: VecDeque<Change>,
    watchers: Vec<Watcher>,
    next_watcher: u64,
    /// Accepted bearer tokens; empty = no authentication.
    bearer_tokens: HashSet<String>,
    /// Tokens a TokenReview authenticates.
    token_reviews: HashMap<String, TokenUser>,
    /// `METHOD path?query` of every request, for assertions about what clients asked.
    requests: Vec<String>,
    /// TokenReview requests answered.
    token_reviews_answered: u64,
    /// Watches answered with 410 Gone.
    expired_watches: u64,
}

impl Store {
    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn record(&mut self, change: Change) {
        self.watchers.retain(|w| {
            match watch_event(w, change.old.as_ref(), change.new.as_ref(), change.resource) {
                Some(event) => w.tx.send(event).is_ok(),
                None => !w.tx.is_closed(),
            }
        });
        self.history.push_back(change);
        while self.history.len() > HISTORY_LIMIT {
            if let Some(c) = self.history.pop_front() {
                self.compacted = c.rv;
            }
        }
    }
}

/// The watch event a change makes for one watch, if any (selectors decide, and an object that
/// stops or starts matching is a DELETED or ADDED for that watch).
fn watch_event(
    w: &Watcher,
    old: Option<&Value>,
    new: Option<&Value>,
    resource: Resource,
) -> Option<Bytes> {
    if resource != w.resource {
        return None;
    }
    let (was, is) = (old.filter(|o| w.matches(o)), new.filter(|o| w.matches(o)));
    let (kind, object) = match (was, is) {
        (None, None) => return None,
        (None, Some(n)) => ("ADDED", n),
        (Some(_), Some(n)) => ("MODIFIED", n),
        // Deleted, or no longer selected: the last state the watch may see.
        (Some(o), None) => ("DELETED", new.unwrap_or(o)),
    };
    Some(event_line(kind, object))
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({ "type": kind, "object": object }).to_string();
    line.push('\n');
    Bytes::from(line)
}

impl Watcher {
    fn matches(&self, object: &Value) -> bool {
        if let Some(ns) = &self.namespace
            && meta_str(object, "namespace") != ns
        {
            return false;
        }
        self.labels.matches(object) && self.fields.matches(object)
    }
}

fn meta_str<'a>(object: &'a Value, field: &str) -> &'a str {
    object["metadata"][field].as_str().unwrap_or("")
}

struct Shared {
    store: Mutex<Store>,
    /// Bumped by `stop`: every connection and watch of an older generation ends.
    generation: watch::Sender<u64>,
    bookmark_interval: Mutex<Duration>,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The running stand-in. Dropping it stops it.
pub struct KubeApi {
    shared: Arc<Shared>,
    addr: SocketAddr,
    /// HTTPS: the server's TLS config and the PEM of the CA that signed its certificate.
    tls: Option<(tokio_rustls::TlsAcceptor, String)>,
    runtime: tokio::runtime::Runtime,
    accept: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl KubeApi {
    /// Starts a stand-in serving HTTPS on a free port of 127.0.0.1, as API servers do: its
    /// certificate (for `127.0.0.1`) is signed by a CA of its own, which
    /// [`Self::kubeconfig`] hands to clients as `certificate-authority-data`.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(Some(serving_tls()?))
    }

    /// Starts a stand-in serving plain HTTP.
    pub fn start_plain() -> anyhow::Result<Self> {
        Self::start_with(None)
    }

    fn start_with(tls: Option<(tokio_rustls::TlsAcceptor, String)>) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("kube-api")
            .enable_all()
            .build()
            .context("building the stand-in's runtime")?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .context("binding the stand-in's port")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            store: Mutex::new(Store {
                rv: 1,
                ..Store::default()
            }),
            generation: watch::channel(0).0,
            bookmark_interval: Mutex::new(Duration::from_secs(1)),
        });
        runtime.spawn(bookmarks(shared.clone()));
        let accept = runtime.spawn(serve(
            listener,
            shared.clone(),
            tls.as_ref().map(|(a, _)| a.clone()),
        ));
        Ok(Self {
            shared,
            addr,
            tls,
            runtime,
            accept: Mutex::new(Some(accept)),
        })
    }

    /// `https://127.0.0.1:PORT` (`http://` for [`Self::start_plain`]).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A kubeconfig for this server, authenticating with `token` (see [`Self::require_token`]).
    pub fn kubeconfig(&self, token: &str) -> String {
        use base64::Engine as _;
        let ca = match &self.tls {
            Some((_, pem)) => format!(
                "    certificate-authority-data: {}\n",
                base64::engine::general_purpose::STANDARD.encode(pem)
            ),
            None => String::new(),
        };
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: {}\n{ca}users:\n- name: agent\n  user:\n    token: {token}\ncontexts:\n- name: stand-in\n  context:\n    cluster: stand-in\n    user: agent\ncurrent-context: stand-in\n",
            self.url()
        )
    }

    /// From now on, requests must carry `Authorization: Bearer <token>` with one of the
    /// tokens given here (401 otherwise).
    pub fn require_token(&self, token: &str) {
        self.shared.store().bearer_tokens.insert(token.to_string());
    }

    /// Makes TokenReviews authenticate `token` as `user`.
    pub fn add_token_review(&self, token: &str, user: TokenUser) {
        self.shared
            .store()
            .token_reviews
            .insert(token.to_string(), user);
    }

    /// How many TokenReviews were answered.
    pub fn token_reviews_answered(&self) -> u64 {
        self.shared.store().token_reviews_answered
    }

    /// How often watches that asked for bookmarks get one.
    pub fn set_bookmark_interval(&self, every: Duration) {
        *self
            .shared
            .bookmark_interval
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = every;
    }

    /// Creates or replaces an object (by `kind`, `metadata.namespace` and `metadata.name`),
    /// as the API server stores a create or an update: it gets a new `resourceVersion`, and
    /// on creation a `uid` (unless it has one) and a `creationTimestamp`. Returns the stored
    /// object.
    pub fn apply(&self, mut object: Value) -> anyhow::Result<Value> {
        let resource = resource_of(&object)?;
        let key = object_key(resource, &object)?;
        if resource == SECRETS {
            // As the API server does on write: stringData is merged into data, base64-encoded.
            use base64::Engine as _;
            if let Some(Value::Object(strings)) =
                object.as_object_mut().and_then(|o| o.remove("stringData"))
            {
                let data = object
                    .as_object_mut()
                    .context("a Secret is an object")?
                    .entry("data")
                    .or_insert_with(|| json!({}));
                for (k, v) in strings {
                    let text = v.as_str().unwrap_or("");
                    data[k] = json!(base64::engine::general_purpose::STANDARD.encode(text));
                }
            }
        }
        let mut store = self.shared.store();
        let old = store.objects.get(&key).cloned();
        let rv = store.next_rv();
        let meta = object
            .get_mut("metadata")
            .and_then(Value::as_object_mut)
            .context("object has no metadata")?;
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        match &old {
            Some(old) => {
                for field in ["uid", "creationTimestamp"] {
                    meta.insert(field.into(), old["metadata"][field].clone());
                }
            }
            None => {
                if !meta.get("uid").is_some_and(Value::is_string) {
                    meta.insert("uid".into(), json!(new_uid()));
                }
                meta.insert("creationTimestamp".into(), json!("2026-01-01T00:00:00Z"));
            }
        }
        store.objects.insert(key, object.clone());
        store.record(Change {
            rv,
            resource,
            old,
            new: Some(object.clone()),
        });
        Ok(object)
    }

    /// Changes a stored object with `edit` and stores the result (a new resourceVersion).
    pub fn update(
        &self,
        resource: Resource,
        namespace: &str,
        name: &str,
        edit: impl FnOnce(&mut Value),
    ) -> anyhow::Result<Value> {
        let mut object = self
            .get(resource, namespace, name)
            .with_context(|| format!("no {} {namespace}/{name}", resource.kind))?;
        edit(&mut object);
        self.apply(object)
    }

    /// The stored object, if any.
    pub fn get(&self, resource: Resource, namespace: &str, name: &str) -> Option<Value> {
        let key = ObjectKey {
            resource,
            namespace: if resource.namespaced {
                namespace.to_string()
            } else {
                String::new()
            },
            name: name.to_string(),
        };
        self.shared.store().objects.get(&key).cloned()
    }

    /// Deletes an object; false when there was none.
    pub fn delete(&self, resource: Resource, namespace: &str, name: &str) -> bool {
        let key = ObjectKey {
            resource,
            namespace: if resource.namespaced {
                namespace.to_string()
            } else {
                String::new()
            },
            name: name.to_string(),
        };
        let mut store = self.shared.store();
        let Some(mut old) = store.objects.remove(&key) else {
            return false;
        };
        let rv = store.next_rv();
        // A deleted object's last state carries the deletion's version.
        old["metadata"]["resourceVersion"] = json!(rv.to_string());
        store.record(Change {
            rv,
            resource,
            old: Some(old),
            new: None,
        });
        true
    }

    /// The current resource version.
    pub fn resource_version(&self) -> u64 {
        self.shared.store().rv
    }

    /// Forgets the history up to now (etcd compaction): a watch that resumes from an older
    /// version gets 410 Gone and must list again.
    pub fn compact(&self) {
        let mut store = self.shared.store();
        store.compacted = store.rv;
        store.history.clear();
    }

    /// Ends every open watch stream (as the server does at a watch's timeout, or when it
    /// restarts); clients watch again from the last version they saw.
    pub fn expire_watches(&self) {
        self.shared.store().watchers.clear();
    }

    /// An outage: every connection is cut and the port refuses new ones until
    /// [`Self::start_again`]. The objects and their history stay.
    pub fn stop(&self) {
        if let Some(accept) = self.accept.lock().unwrap_or_else(|p| p.into_inner()).take() {
            accept.abort();
        }
        self.shared.generation.send_modify(|g| *g += 1);
        self.shared.store().watchers.clear();
        // Wait until the listener is really closed (the accept task dropped it).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok()
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Ends an outage: serves again on the same port.
    pub fn start_again(&self) -> anyhow::Result<()> {
        let mut accept = self.accept.lock().unwrap_or_else(|p| p.into_inner());
        if accept.is_some() {
            bail!("the stand-in is already serving");
        }
        let addr = self.addr;
        let listener = self.runtime.block_on(async move {
            // The port may linger briefly after the old listener closed.
            let mut last = None;
            for _ in 0..100 {
                match tokio::net::TcpListener::bind(addr).await {
                    Ok(l) => return Ok(l),
                    Err(e) => last = Some(e),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(last.unwrap_or_else(|| std::io::Error::other("bind failed")))
        });
        let listener = listener.with_context(|| format!("binding {addr} again"))?;
        *accept = Some(self.runtime.spawn(serve(
            listener,
            self.shared.clone(),
            self.tls.as_ref().map(|(a, _)| a.clone()),
        )));
        Ok(())
    }

    /// `METHOD path?query` of every request so far.
    pub fn requests(&self) -> Vec<String> {
        self.shared.store().requests.clone()
    }

    /// How many watches were answered with 410 Gone (too old resource version).
    pub fn expired_watches(&self) -> u64 {
        self.shared.store().expired_watches
    }

    /// How many watch streams are open now.
    pub fn open_watches(&self) -> usize {
        let mut store = self.shared.store();
        store.watchers.retain(|w| !w.tx.is_closed());
        store.watchers.len()
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        if let Some(accept) = self.accept.lock().unwrap_or_else(|p| p.into_inner()).take() {
            accept.abort();
        }
        self.shared.generation.send_modify(|g| *g += 1);
    }
}

/// A random UUID (v4 layout) as the API server assigns to objects.
pub fn new_uid() -> String {
    let mut bytes = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut bytes);
    }
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

fn resource_of(object: &Value) -> anyhow::Result<Resource> {
    let api_version = object["apiVersion"].as_str().unwrap_or("");
    let kind = object["kind"].as_str().unwrap_or("");
    RESOURCES
        .into_iter()
        .find(|r| r.kind == kind && r.api_version() == api_version)
        .with_context(|| format!("the stand-in does not serve {api_version} {kind}"))
}

fn object_key(resource: Resource, object: &Value) -> anyhow::Result<ObjectKey> {
    let name = meta_str(object, "name");
    if name.is_empty() {
        bail!("object has no metadata.name");
    }
    let namespace = meta_str(object, "namespace");
    if resource.namespaced == namespace.is_empty() {
        bail!(
            "{} {name}: metadata.namespace must be {}",
            resource.kind,
            if resource.namespaced { "set" } else { "empty" }
        );
    }
    Ok(ObjectKey {
        resource,
        namespace: namespace.to_string(),
        name: name.to_string(),
    })
}

// ---------------------------------------------------------------------------------------------
// Selectors.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed `labelSelector`.
#[derive(Clone, Debug, Default, PartialEq)]
struct LabelSelector(Vec<LabelRequirement>);

impl LabelSelector {
    fn parse(text: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for term in split_top_level(text) {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            let req = if let Some(key) = term.strip_prefix('!') {
                LabelRequirement::NotExists(label_key(key)?)
            } else if let Some((key, rest)) = term.split_once(" notin ") {
                LabelRequirement::NotIn(label_key(key)?, set_values(rest)?)
            } else if let Some((key, rest)) = term.split_once(" in ") {
                LabelRequirement::In(label_key(key)?, set_values(rest)?)
            } else if let Some((key, value)) = term.split_once("!=") {
                LabelRequirement::NotEquals(label_key(key)?, value.trim().to_string())
            } else if let Some((key, value)) = term.split_once("==").or(term.split_once('=')) {
                LabelRequirement::Equals(label_key(key)?, value.trim().to_string())
            } else {
                LabelRequirement::Exists(label_key(term)?)
            };
            reqs.push(req);
        }
        Ok(Self(reqs))
    }

    fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            LabelRequirement::Equals(k, v) => get(k) == Some(v.as_str()),
            LabelRequirement::NotEquals(k, v) => get(k) != Some(v.as_str()),
            LabelRequirement::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelRequirement::NotIn(k, vs) => !get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelRequirement::Exists(k) => get(k).is_some(),
            LabelRequirement::NotExists(k) => get(k).is_none(),
        })
    }
}

fn label_key(text: &str) -> Result<String, String> {
    let key = text.trim();
    let valid = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
    if valid {
        Ok(key.to_string())
    } else {
        Err(format!("invalid label key {key:?}"))
    }
}

fn set_values(text: &str) -> Result<Vec<String>, String> {
    let inner = text
        .trim()
        .strip_prefix('(')
        .and_then(|t| t.strip_suffix(')'))
        .ok_or_else(|| format!("expected a parenthesized set of values, got {text:?}"))?;
    Ok(inner.split(',').map(|v| v.trim().to_string()).collect())
}

/// Splits on commas outside parentheses.
fn split_top_level(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

/// A parsed `fieldSelector`: (field path, wanted value, equal?).
#[derive(Clone, Debug, Default, PartialEq)]
struct FieldSelector(Vec<(String, String, bool)>);

impl FieldSelector {
    fn parse(text: &str, resource: Resource) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for term in text.split(',') {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            let (field, value, equal) = if let Some((f, v)) = term.split_once("!=") {
                (f, v, false)
            } else if let Some((f, v)) = term.split_once("==").or(term.split_once('=')) {
                (f, v, true)
            } else {
                return Err(format!("invalid field selector: {term:?}"));
            };
            let field = field.trim();
            let supported = ["metadata.name", "metadata.namespace"].contains(&field)
                || resource.fields.contains(&field);
            if !supported {
                // The real server's message for an unsupported field.
                return Err(format!(
                    "field label not supported: {field} (\"{}\" {})",
                    resource.kind, resource.version
                ));
            }
            reqs.push((field.to_string(), value.trim().to_string(), equal));
        }
        Ok(Self(reqs))
    }

    fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(field, value, equal)| {
            let mut v = object;
            for part in field.split('.') {
                v = &v[part];
            }
            let actual = match v {
                Value::String(s) => s.clone(),
                Value::Bool(b) => b.to_string(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            (actual == *value) == *equal
        })
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP.
// ---------------------------------------------------------------------------------------------

type ResponseBody = BoxBody<Bytes, Infallible>;

/// A serving certificate for 127.0.0.1 from a throw-away CA: (acceptor, the CA's PEM).
fn serving_tls() -> anyhow::Result<(tokio_rustls::TlsAcceptor, String)> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kube-api stand-in CA");
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let key = KeyPair::generate()?;
    let params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
    let issuer = Issuer::new(ca_params, ca_key);
    let cert = params.signed_by(&key, &issuer)?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone(), ca_cert.der().clone()],
        rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )?;
    Ok((
        tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        ca_cert.pem(),
    ))
}

async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let mut generation = shared.generation.subscribe();
    let mine = *generation.borrow_and_update();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let shared = shared.clone();
        let mut cut = shared.generation.subscribe();
        let tls = tls.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(req, &shared).await) }
            });
            let http = hyper::server::conn::http1::Builder::new();
            let serving = async {
                match tls {
                    Some(acceptor) => {
                        let Ok(stream) = acceptor.accept(stream).await else {
                            return;
                        };
                        let _ = http
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    }
                    None => {
                        let _ = http
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    }
                }
            };
            tokio::select! {
                _ = serving => {}
                _ = cut.wait_for(|g| *g != mine) => {}
            }
        });
    }
}

/// Sends bookmarks to the watches that asked for them.
async fn bookmarks(shared: Arc<Shared>) {
    loop {
        let every = *shared
            .bookmark_interval
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        tokio::time::sleep(every).await;
        let mut store = shared.store();
        let rv = store.rv;
        store.watchers.retain(|w| {
            if !w.bookmarks {
                return !w.tx.is_closed();
            }
            let object = json!({
                "kind": w.resource.kind,
                "apiVersion": w.resource.api_version(),
                "metadata": { "resourceVersion": rv.to_string() },
            });
            w.tx.send(event_line("BOOKMARK", &object)).is_ok()
        });
    }
}

fn full(body: impl Into<Bytes>) -> ResponseBody {
    Full::new(body.into()).boxed()
}

fn json_response(status: StatusCode, body: &Value) -> Response<ResponseBody> {
    let mut resp = Response::new(full(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// A `Status` failure, as the API server answers errors.
fn status_error(code: StatusCode, reason: &str, message: &str) -> Response<ResponseBody> {
    json_response(code, &status_object(code.as_u16(), reason, message))
}

fn status_object(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_params(query: Option<&str>) -> HashMap<String, String> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// What a request path names.
struct Target {
    resource: Resource,
    namespace: Option<String>,
    name: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let find = |plural: &str| {
        RESOURCES
            .into_iter()
            .find(|r| r.group == group && r.version == version && r.plural == plural)
    };
    let target = |resource: Resource, namespace: Option<&str>, name: Option<&str>| Target {
        resource,
        namespace: namespace.map(str::to_string),
        name: name.map(str::to_string),
    };
    match rest {
        [plural] => Some(target(find(plural)?, None, None)),
        ["namespaces", name] if group.is_empty() => Some(target(NAMESPACES, None, Some(name))),
        ["namespaces", ns, plural] => {
            let r = find(plural).filter(|r| r.namespaced)?;
            Some(target(r, Some(ns), None))
        }
        ["namespaces", ns, plural, name] => {
            let r = find(plural).filter(|r| r.namespaced)?;
            Some(target(r, Some(ns), Some(name)))
        }
        [plural, name] => {
            let r = find(plural).filter(|r| !r.namespaced)?;
            Some(target(r, None, Some(name)))
        }
        _ => None,
    }
}

async fn handle(req: Request<Incoming>, shared: &Shared) -> Response<ResponseBody> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    {
        let mut store = shared.store();
        let line = match &query {
            Some(q) => format!("{} {path}?{}", req.method(), percent_decode(q)),
            None => format!("{} {path}", req.method()),
        };
        store.requests.push(line);
        if !store.bearer_tokens.is_empty() {
            let token = req
                .headers()
                .get(hyper::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("");
            if !store.bearer_tokens.contains(token) {
                return status_error(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
            }
        }
    }
    if path == "/apis/authentication.k8s.io/v1/tokenreviews" {
        if req.method() != hyper::Method::POST {
            return status_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            );
        }
        return token_review(req, shared).await;
    }
    if req.method() != hyper::Method::GET {
        return status_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the stand-in only serves reads and TokenReviews",
        );
    }
    let Some(target) = parse_path(&path) else {
        return status_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    };
    let params = query_params(query.as_deref());
    if let Some(name) = &target.name {
        let key = ObjectKey {
            resource: target.resource,
            namespace: target.namespace.clone().unwrap_or_default(),
            name: name.clone(),
        };
        return match shared.store().objects.get(&key) {
            Some(o) => json_response(StatusCode::OK, o),
            None => status_error(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("{} \"{name}\" not found", target.resource.plural),
            ),
        };
    }
    let labels = match LabelSelector::parse(params.get("labelSelector").map_or("", |s| s)) {
        Ok(s) => s,
        Err(e) => return status_error(StatusCode::BAD_REQUEST, "BadRequest", &e),
    };
    let fields = match FieldSelector::parse(
        params.get("fieldSelector").map_or("", |s| s),
        target.resource,
    ) {
        Ok(s) => s,
        Err(e) => return status_error(StatusCode::BAD_REQUEST, "BadRequest", &e),
    };
    let watcher_template = |tx| Watcher {
        id: 0,
        resource: target.resource,
        namespace: target.namespace.clone(),
        labels: labels.clone(),
        fields: fields.clone(),
        bookmarks: params
            .get("allowWatchBookmarks")
            .is_some_and(|v| v == "true" || v == "1"),
        tx,
    };
    let is_watch = params.get("watch").is_some_and(|v| v == "true" || v == "1");
    if is_watch {
        let timeout = params
            .get("timeoutSeconds")
            .and_then(|t| t.parse::<u64>().ok())
            .map_or(Duration::from_secs(1800), Duration::from_secs);
        let from = params.get("resourceVersion").cloned().unwrap_or_default();
        let (tx, rx) = mpsc::unbounded_channel();
        let mut watcher = watcher_template(tx);
        let mut store = shared.store();
        if from.is_empty() || from == "0" {
            // Start at the current state: synthetic ADDED events first.
            for (key, o) in &store.objects {
                if key.resource == watcher.resource && watcher.matches(o) {
                    let _ = watcher.tx.send(event_line("ADDED", o));
                }
            }
        } else {
            let Ok(from) = from.parse::<u64>() else {
                return status_error(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!("invalid resource version: {from:?}"),
                );
            };
            if from < store.compacted {
                store.expired_watches += 1;
                // The real server answers 200 and one ERROR event, then closes the stream.
                let status = status_object(
                    410,
                    "Expired",
                    &format!("too old resource version: {from} ({})", store.compacted),
                );
                let _ = watcher.tx.send(event_line("ERROR", &status));
                return watch_response(rx, timeout);
            }
            for c in store.history.iter().filter(|c| c.rv > from) {
                if let Some(e) = watch_event(&watcher, c.old.as_ref(), c.new.as_ref(), c.resource) {
                    let _ = watcher.tx.send(e);
                }
            }
        }
        store.next_watcher += 1;
        watcher.id = store.next_watcher;
        store.watchers.push(watcher);
        return watch_response(rx, timeout);
    }
    let store = shared.store();
    let (tx, _) = mpsc::unbounded_channel();
    let watcher = watcher_template(tx);
    let items: Vec<Value> = store
        .objects
        .iter()
        .filter(|(k, o)| k.resource == target.resource && watcher.matches(o))
        .map(|(_, o)| {
            let mut item = o.clone();
            if let Some(m) = item.as_object_mut() {
                m.remove("kind");
                m.remove("apiVersion");
            }
            item
        })
        .collect();
    json_response(
        StatusCode::OK,
        &json!({
            "kind": format!("{}List", target.resource.kind),
            "apiVersion": target.resource.api_version(),
            "metadata": { "resourceVersion": store.rv.to_string() },
            "items": items,
        }),
    )
}

fn watch_response(rx: mpsc::UnboundedReceiver<Bytes>, timeout: Duration) -> Response<ResponseBody> {
    let body = WatchBody {
        rx,
        deadline: Box::pin(tokio::time::sleep(timeout)),
    };
    let mut resp = Response::new(BoxBody::new(body));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// A watch's chunked body: the events its channel delivers, until the deadline.
struct WatchBody {
    rx: mpsc::UnboundedReceiver<Bytes>,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl Body for WatchBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(b)) => Poll::Ready(Some(Ok(Frame::data(b)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

async fn token_review(req: Request<Incoming>, shared: &Shared) -> Response<ResponseBody> {
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return status_error(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string());
        }
    };
    let review: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return status_error(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("decoding the TokenReview: {e}"),
            );
        }
    };
    if review["kind"] != "TokenReview" || review["apiVersion"] != "authentication.k8s.io/v1" {
        return status_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "expected an authentication.k8s.io/v1 TokenReview",
        );
    }
    let token = review["spec"]["token"].as_str().unwrap_or("");
    let wanted: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let mut store = shared.store();
    store.token_reviews_answered += 1;
    let status = match store.token_reviews.get(token) {
        Some(user) => {
            // Audiences: the token must be valid for one of the requested ones (or, with none
            // requested, for the server's default audience: tokens without explicit ones).
            let audiences: Vec<String> = if wanted.is_empty() {
                Vec::new()
            } else {
                wanted
                    .iter()
                    .filter(|a| user.audiences.contains(a))
                    .cloned()
                    .collect()
            };
            let mismatch = if wanted.is_empty() {
                !user.audiences.is_empty()
            } else {
                audiences.is_empty()
            };
            if mismatch {
                json!({ "authenticated": false, "error": "token audiences do not match" })
            } else {
                json!({
                    "authenticated": true,
                    "user": {
                        "username": user.username,
                        "uid": user.uid,
                        "groups": user.groups,
                        "extra": user.extra,
                    },
                    "audiences": audiences,
                })
            }
        }
        None => json!({ "authenticated": false, "error": "invalid bearer token" }),
    };
    let mut answer = review.clone();
    answer["status"] = status;
    answer["metadata"] = json!({ "creationTimestamp": null });
    json_response(StatusCode::CREATED, &answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, node: &str, labels: Value) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": name, "namespace": "shop", "labels": labels },
            "spec": { "nodeName": node },
        })
    }

    #[test]
    fn label_selectors_parse_and_match() {
        let s = LabelSelector::parse("app in (a, b),tier!=db,!legacy,env").expect("parses");
        let o = json!({"metadata": {"labels": {"app": "a", "tier": "web", "env": "x"}}});
        assert!(s.matches(&o));
        let o = json!({"metadata": {"labels": {"app": "c", "env": "x"}}});
        assert!(!s.matches(&o));
        assert!(LabelSelector::parse("a b").is_err());
    }

    #[test]
    fn field_selectors_are_checked_per_kind() {
        let s = FieldSelector::parse("spec.nodeName=n1", PODS).expect("supported");
        assert!(s.matches(&pod("a", "n1", json!({}))));
        assert!(!s.matches(&pod("a", "n2", json!({}))));
        let s = FieldSelector::parse("spec.nodeName!=n1", PODS).expect("supported");
        assert!(s.matches(&pod("a", "n2", json!({}))));
        let e = FieldSelector::parse("spec.nodeName=n1", SERVICES).unwrap_err();
        assert!(e.contains("field label not supported"), "{e}");
    }

    #[test]
    fn paths_name_resources() {
        let t = parse_path("/api/v1/namespaces/shop/pods").expect("pods");
        assert_eq!(t.resource, PODS);
        assert_eq!(t.namespace.as_deref(), Some("shop"));
        let t = parse_path("/api/v1/namespaces/shop").expect("a namespace");
        assert_eq!(t.resource, NAMESPACES);
        let t = parse_path("/apis/gateway.networking.k8s.io/v1/httproutes").expect("routes");
        assert_eq!(t.resource, HTTP_ROUTES);
        assert!(parse_path("/apis/apps/v1/deployments").is_none());
    }

    #[test]
    fn a_change_out_of_the_selection_is_a_delete() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let w = Watcher {
            id: 1,
            resource: PODS,
            namespace: None,
            labels: LabelSelector::default(),
            fields: FieldSelector::parse("spec.nodeName=n1", PODS).expect("ok"),
            bookmarks: false,
            tx,
        };
        let before = pod("a", "n1", json!({}));
        let after = pod("a", "n2", json!({}));
        let e = watch_event(&w, Some(&before), Some(&after), PODS).expect("an event");
        let v: Value = serde_json::from_slice(&e).expect("json");
        assert_eq!(v["type"], "DELETED");
        let e = watch_event(&w, Some(&after), Some(&before), PODS).expect("an event");
        let v: Value = serde_json::from_slice(&e).expect("json");
        assert_eq!(v["type"], "ADDED");
        assert!(watch_event(&w, Some(&after), Some(&after), PODS).is_none());
        drop(w);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%3Db%2Cc+d"), "a=b,c d");
        assert_eq!(percent_decode("100%"), "100%");
    }
}
