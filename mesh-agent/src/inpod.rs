//! Opening sockets inside a pod's network namespace.
//!
//! A socket belongs to the network namespace of the thread that called `socket()`. Each
//! enrolled pod gets one [`PodNetns`] thread that enters the pod's namespace once (`setns`)
//! and stays there, creating listeners and upstream sockets on request; everything after
//! `socket()` (bind, connect, accept, I/O) happens on the tokio runtime as usual.
//!
//! The thread also owns the pod's reply route for inbound relays: the agent connects to the
//! app on `127.0.0.1` from the client's real address (IP_TRANSPARENT), so the app's replies
//! have a loopback source and a remote destination. One policy rule sends exactly those
//! packets (`from 127.0.0.0/8`, which can never leave the pod anyway) back to `lo`, where
//! the agent's socket receives them. The rule is removed when the last user of the thread
//! is gone.
use std::{
    fs::File,
    io,
    net::SocketAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
};

use anyhow::{Context as _, anyhow};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::oneshot;
use tracing::{debug, warn};

/// Routing table and rule priority of the inbound reply route (see module docs).
const REPLY_ROUTE_TABLE: &str = "15006";
const REPLY_RULE_PRIORITY: &str = "15006";

/// The kernel's `SO_NETNS_COOKIE` (not in every libc crate yet).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// IPv4 sockets kept ready per pod, so that a new connection does not wait for a round trip
/// to the netns thread. Refilled by the thread when it falls to half.
const POOL_TARGET: usize = 32;

/// Socket requests that may wait for the netns thread; beyond that a connection fails
/// instead of queueing without bound (the pool serves the common case without the queue).
const MAX_QUEUED_REQUESTS: usize = 4096;

enum Request {
    Socket {
        domain: Domain,
        reply: oneshot::Sender<io::Result<Socket>>,
    },
    /// Top the IPv4 socket pool up to [`POOL_TARGET`].
    Refill,
}

/// Pre-created IPv4 TCP sockets of one pod's namespace.
#[derive(Default)]
struct SocketPool {
    sockets: Mutex<Vec<Socket>>,
    refill_requested: AtomicBool,
}

impl SocketPool {
    fn fill(&self) {
        let missing = POOL_TARGET.saturating_sub(self.len());
        let mut fresh = Vec::with_capacity(missing);
        for _ in 0..missing {
            match new_tcp_socket(Domain::IPV4) {
                Ok(s) => fresh.push(s),
                Err(e) => {
                    warn!(error = %e, "could not pre-create a pod socket");
                    break;
                }
            }
        }
        if let Ok(mut pool) = self.sockets.lock() {
            pool.extend(fresh);
        }
        self.refill_requested.store(false, Ordering::Release);
    }

    fn len(&self) -> usize {
        self.sockets.lock().map(|p| p.len()).unwrap_or(0)
    }

    fn take(&self) -> (Option<Socket>, bool) {
        let Ok(mut pool) = self.sockets.lock() else {
            return (None, false);
        };
        let socket = pool.pop();
        let low = pool.len() < POOL_TARGET / 2;
        (socket, low)
    }
}

/// A thread living in one pod's network namespace. Cloning shares the thread; it exits and
/// removes the reply route when every clone is dropped.
#[derive(Clone)]
pub struct PodNetns {
    requests: mpsc::SyncSender<Request>,
    pool: Arc<SocketPool>,
    netns_cookie: u64,
    /// Set when another agent takes the pod over: its reply route must stay.
    keep_route: Arc<AtomicBool>,
}

impl PodNetns {
    /// Starts the thread for the namespace at `netns_path`, installs the reply route, and
    /// returns once the thread is inside the namespace.
    pub fn enter(
        netns_path: &Path,
        pod_name: &str,
    ) -> anyhow::Result<(Self, thread::JoinHandle<()>)> {
        let netns = File::open(netns_path)
            .with_context(|| format!("opening network namespace {}", netns_path.display()))?;
        let (requests, inbox) = mpsc::sync_channel::<Request>(MAX_QUEUED_REQUESTS);
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<anyhow::Result<u64>>(1);
        let path = netns_path.to_path_buf();
        let pool = Arc::new(SocketPool::default());
        let thread_pool = pool.clone();
        let keep_route = Arc::new(AtomicBool::new(false));
        let thread_keep_route = keep_route.clone();
        let handle = thread::Builder::new()
            .name(format!("netns-{pod_name}"))
            .spawn(move || {
                netns_thread(netns, path, inbox, thread_pool, thread_keep_route, ready_tx)
            })
            .context("spawning the pod netns thread")?;
        let netns_cookie = match ready_rx.recv() {
            Ok(Ok(cookie)) => cookie,
            Ok(Err(e)) => {
                let _ = handle.join();
                return Err(e);
            }
            Err(_) => return Err(anyhow!("the pod netns thread died while starting")),
        };
        Ok((
            Self {
                requests,
                pool,
                netns_cookie,
                keep_route,
            },
            handle,
        ))
    }

    /// The namespace's cookie, as BPF's `bpf_get_netns_cookie` reports it.
    pub fn netns_cookie(&self) -> u64 {
        self.netns_cookie
    }

    /// Leaves the reply route in place when the thread exits (a successor agent uses it).
    pub fn keep_route_on_exit(&self) {
        self.keep_route.store(true, Ordering::Release);
    }

    /// A new non-blocking TCP socket in the pod's namespace.
    pub async fn socket(&self, domain: Domain) -> io::Result<Socket> {
        if domain == Domain::IPV4 {
            let (socket, low) = self.pool.take();
            if low && !self.pool.refill_requested.swap(true, Ordering::AcqRel) {
                // A full queue has work for the thread already; the refill can wait.
                let _ = self.requests.try_send(Request::Refill);
            }
            if let Some(socket) = socket {
                return Ok(socket);
            }
        }
        let (reply, answer) = oneshot::channel();
        self.requests
            .try_send(Request::Socket { domain, reply })
            .map_err(|e| match e {
                mpsc::TrySendError::Full(_) => {
                    io::Error::other("pod netns thread has too many socket requests queued")
                }
                mpsc::TrySendError::Disconnected(_) => {
                    io::Error::other("pod netns thread has exited")
                }
            })?;
        answer
            .await
            .map_err(|_| io::Error::other("pod netns thread dropped the request"))?
    }

    /// A non-blocking listening socket bound to `addr` in the pod's namespace, registered
    /// with no runtime yet (each worker registers its own dup).
    pub async fn listen(&self, addr: SocketAddr) -> io::Result<std::net::TcpListener> {
        let socket = self.socket(Domain::for_address(addr)).await?;
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        Ok(socket.into())
    }
}

fn netns_thread(
    netns: File,
    path: PathBuf,
    inbox: mpsc::Receiver<Request>,
    pool: Arc<SocketPool>,
    keep_route: Arc<AtomicBool>,
    ready: mpsc::SyncSender<anyhow::Result<u64>>,
) {
    let started = (|| -> anyhow::Result<u64> {
        // SAFETY: setns on this thread only, with a valid namespace fd.
        if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("entering network namespace {}", path.display()));
        }
        install_reply_route().context("installing the inbound reply route in the pod")?;
        netns_cookie().context("reading the pod netns cookie")
    })();
    let ok = started.is_ok();
    let _ = ready.send(started);
    if !ok {
        return;
    }
    pool.fill();
    while let Ok(request) = inbox.recv() {
        match request {
            Request::Socket { domain, reply } => {
                let _ = reply.send(new_tcp_socket(domain));
            }
            Request::Refill => pool.fill(),
        }
    }
    drop(pool);
    if !keep_route.load(Ordering::Acquire) {
        remove_reply_route();
    }
    debug!(netns = %path.display(), "pod netns thread finished");
}

/// A non-blocking TCP socket in the calling thread's network namespace.
fn new_tcp_socket(domain: Domain) -> io::Result<Socket> {
    Socket::new(
        domain,
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )
}

fn netns_cookie() -> io::Result<u64> {
    let probe = Socket::new(Domain::IPV4, Type::STREAM.cloexec(), None)?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd and an out-buffer of the advertised size.
    let rc = unsafe {
        libc::getsockopt(
            probe.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Runs `ip` in this thread's network namespace (a child process inherits it).
fn ip(args: &[&str]) -> io::Result<std::process::Output> {
    Command::new("ip").args(args).output()
}

/// Installs the reply route, or keeps the one in place: a predecessor agent's relays may be
/// using it right now (handover), so it is never removed and re-added.
fn install_reply_route() -> anyhow::Result<()> {
    let out = ip(&[
        "-4",
        "route",
        "replace",
        "local",
        "0.0.0.0/0",
        "dev",
        "lo",
        "table",
        REPLY_ROUTE_TABLE,
    ])
    .context("running `ip route` (is iproute2 installed?)")?;
    if !out.status.success() {
        return Err(anyhow!(
            "ip route: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let existing =
        ip(&["-4", "rule", "show", "pref", REPLY_RULE_PRIORITY]).context("running `ip rule`")?;
    if existing.status.success() && !existing.stdout.is_empty() {
        return Ok(());
    }
    let out = ip(&[
        "-4",
        "rule",
        "add",
        "from",
        "127.0.0.0/8",
        "lookup",
        REPLY_ROUTE_TABLE,
        "pref",
        REPLY_RULE_PRIORITY,
    ])
    .context("running `ip rule`")?;
    if !out.status.success() {
        return Err(anyhow!(
            "ip rule: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

fn remove_reply_route() {
    // Delete every copy of our rule (a crashed agent may have left one), then the table.
    for _ in 0..8 {
        match ip(&["-4", "rule", "del", "pref", REPLY_RULE_PRIORITY]) {
            Ok(out) if out.status.success() => continue,
            _ => break,
        }
    }
    match ip(&["-4", "route", "flush", "table", REPLY_ROUTE_TABLE]) {
        Ok(_) => {}
        Err(e) => warn!(error = %e, "could not flush the reply route table"),
    }
}
