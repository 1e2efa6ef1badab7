//! Zero-drop restart: a new agent takes the pods' listening sockets over from the running one.
//!
//! The running agent listens on a Unix socket (`--handover-socket`). A new agent started on the
//! same node connects to it before doing anything else:
//!
//! ```text
//! new → old   HANDOVER 1
//! old → new   POD <namespace>/<name>      + SCM_RIGHTS [outbound, inbound, hbone] listeners
//!             ...                           (one message per enrolled pod)
//! old → new   END
//!     new adopts the pinned links and maps, serves the inherited listeners
//! new → old   READY
//!     old stops accepting, closes its admin ports, keeps its established connections
//! old → new   RELEASED
//!     new binds the admin ports and the handover socket; old drains and exits
//! ```
//!
//! The listening sockets are the same kernel objects in both processes, so connections
//! queued in their backlogs are never lost, and the eBPF programs never stop steering to them.
//! If the new agent dies before READY, the old one simply keeps serving.
use std::{
    collections::HashMap,
    io::{self, BufRead as _, BufReader, Write as _},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use tracing::{info, warn};

use crate::state::PodKey;

/// Listening sockets per pod, in the order outbound (15001), inbound (15006), HBONE (15008).
pub type PodListeners = [OwnedFd; 3];

const HELLO: &str = "HANDOVER 1";
/// How long either side waits for the other's next message.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound of one protocol line (a pod key is at most two DNS names).
const MAX_LINE: usize = 1024;

/// What a new agent received from its predecessor; hold it until the pods are served, then
/// [`Inherited::complete`].
pub struct Inherited {
    pub listeners: HashMap<PodKey, PodListeners>,
    stream: UnixStream,
}

/// Asks the agent listening on `path` to hand over. `Ok(None)` when no agent answers (a
/// fresh start, or the previous agent crashed: its stale socket file is removed).
pub fn request(path: &Path) -> anyhow::Result<Option<Inherited>> {
    let mut stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            if e.kind() == io::ErrorKind::ConnectionRefused {
                let _ = std::fs::remove_file(path);
            }
            return Ok(None);
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("connecting to handover socket {}", path.display()));
        }
    };
    stream.set_read_timeout(Some(STEP_TIMEOUT))?;
    stream.set_write_timeout(Some(STEP_TIMEOUT))?;
    writeln!(stream, "{HELLO}").context("sending the handover request")?;
    let mut listeners = HashMap::new();
    loop {
        let (line, fds) = recv_message(&stream).context("receiving the handover")?;
        if line == "END" {
            if !fds.is_empty() {
                bail!("handover END carried file descriptors");
            }
            break;
        }
        let Some(key) = line.strip_prefix("POD ") else {
            bail!("unexpected handover message {line:?}");
        };
        let key = parse_pod_key(key)?;
        let fds: PodListeners = fds.try_into().map_err(|v: Vec<OwnedFd>| {
            anyhow!("pod {key}: expected 3 listeners, got {}", v.len())
        })?;
        listeners.insert(key, fds);
    }
    info!(
        pods = listeners.len(),
        "received the pods' listeners from the running agent"
    );
    Ok(Some(Inherited { listeners, stream }))
}

impl Inherited {
    /// Tells the predecessor this agent now serves the pods, and waits until it has stopped
    /// accepting and released its admin ports.
    pub fn complete(mut self) -> anyhow::Result<()> {
        writeln!(self.stream, "READY").context("telling the previous agent we are ready")?;
        let mut reader = BufReader::new(&self.stream);
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .context("waiting for the previous agent to release")?;
        if line.trim_end() != "RELEASED" {
            bail!("unexpected handover reply {:?}", line.trim_end());
        }
        Ok(())
    }
}

/// The running agent's side: a listener on the handover socket, served by a thread that
/// passes each connection to the agent's main loop.
pub struct HandoverListener {
    path: PathBuf,
}

impl HandoverListener {
    /// Binds `path` (replacing a stale file) and forwards accepted connections to `tx`.
    pub fn bind(path: &Path, tx: tokio::sync::mpsc::Sender<UnixStream>) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)
            .with_context(|| format!("binding handover socket {}", path.display()))?;
        std::thread::Builder::new()
            .name("handover".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    match stream {
                        Ok(s) => {
                            if tx.blocking_send(s).is_err() {
                                return;
                            }
                        }
                        Err(e) => warn!(error = %e, "accepting on the handover socket"),
                    }
                }
            })
            .context("spawning the handover thread")?;
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A handover in progress on the old agent's side, after the new agent said READY.
pub struct Giving {
    stream: UnixStream,
}

/// Sends every pod's listeners to the new agent and waits for it to be READY. Blocking: run
/// it off the async runtime. On error nothing changed for the old agent.
pub fn give(mut stream: UnixStream, pods: Vec<(PodKey, [RawFd; 3])>) -> anyhow::Result<Giving> {
    stream.set_read_timeout(Some(STEP_TIMEOUT))?;
    stream.set_write_timeout(Some(STEP_TIMEOUT))?;
    let (hello, _) = recv_message(&stream).context("reading the handover request")?;
    if hello != HELLO {
        bail!("unexpected handover request {hello:?}");
    }
    for (key, fds) in &pods {
        send_message(&stream, &format!("POD {key}"), fds)
            .with_context(|| format!("sending pod {key}'s listeners"))?;
    }
    send_message(&stream, "END", &[])?;
    let (ready, _) = recv_message(&stream).context("waiting for the new agent to be ready")?;
    if ready != "READY" {
        bail!("unexpected handover reply {ready:?}");
    }
    stream.flush()?;
    Ok(Giving { stream })
}

impl Giving {
    /// Tells the new agent this one stopped accepting and released its ports.
    pub fn released(mut self) {
        if let Err(e) = writeln!(self.stream, "RELEASED") {
            warn!(error = %e, "telling the new agent we released");
        }
    }
}

fn parse_pod_key(text: &str) -> anyhow::Result<PodKey> {
    let (namespace, name) = text
        .split_once('/')
        .ok_or_else(|| anyhow!("bad pod key {text:?} in handover"))?;
    Ok(PodKey {
        namespace: namespace.to_string(),
        name: name.to_string(),
    })
}

/// Maximum descriptors in one message.
const MAX_FDS: usize = 3;

/// One line (without the newline) with up to [`MAX_FDS`] descriptors attached.
fn send_message(stream: &UnixStream, line: &str, fds: &[RawFd]) -> io::Result<()> {
    let mut data = line.as_bytes().to_vec();
    data.push(b'\n');
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    let mut control = [0u8; 64];
    // SAFETY: msghdr is plain data; every pointer set below outlives the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let payload = std::mem::size_of_val(fds);
        // SAFETY: CMSG_SPACE/CMSG_LEN are pure arithmetic.
        let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: control is large enough for one cmsg of `space` bytes (3 fds: 32 bytes).
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload as u32) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast(), fds.len());
        }
    }
    // SAFETY: valid socket and message.
    let sent = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    if sent as usize != data.len() {
        return Err(io::Error::other("short write on the handover socket"));
    }
    Ok(())
}

/// Receives one line and the descriptors sent with it. Lines are read a byte at a time so
/// that descriptors stay attached to their own line.
fn recv_message(stream: &UnixStream) -> io::Result<(String, Vec<OwnedFd>)> {
    let mut line = Vec::new();
    let mut fds = Vec::new();
    loop {
        let mut byte = 0u8;
        let mut iov = libc::iovec {
            iov_base: (&mut byte as *mut u8).cast(),
            iov_len: 1,
        };
        let mut control = [0u8; 64];
        // SAFETY: plain data; pointers outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len();
        // SAFETY: valid socket and message buffers.
        let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: walking the control buffer the kernel filled, within msg_controllen.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data_len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    let count = data_len / std::mem::size_of::<RawFd>();
                    let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                    for i in 0..count {
                        fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the other agent closed the handover socket",
            ));
        }
        if byte == b'\n' {
            break;
        }
        line.push(byte);
        if line.len() > MAX_LINE || fds.len() > MAX_FDS {
            return Err(io::Error::other("oversized handover message"));
        }
    }
    String::from_utf8(line)
        .map(|l| (l, fds))
        .map_err(|_| io::Error::other("handover message is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_carry_their_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        send_message(&a, "POD ns/web", &[file.as_raw_fd(); 3]).unwrap();
        send_message(&a, "END", &[]).unwrap();
        let (line, fds) = recv_message(&b).unwrap();
        assert_eq!(line, "POD ns/web");
        assert_eq!(fds.len(), 3);
        let (line, fds) = recv_message(&b).unwrap();
        assert_eq!(line, "END");
        assert!(fds.is_empty());
        drop(a);
        assert!(
            recv_message(&b).is_err(),
            "EOF is an error, not an empty line"
        );
    }

    #[test]
    fn pod_keys_parse_and_bad_ones_are_errors() {
        let key = parse_pod_key("shop/web-1").unwrap();
        assert_eq!(
            (key.namespace.as_str(), key.name.as_str()),
            ("shop", "web-1")
        );
        assert!(parse_pod_key("no-slash").is_err());
    }

    #[test]
    fn nobody_listening_is_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sock");
        assert!(request(&path).unwrap().is_none());
        // A stale socket file (its agent crashed) is also a fresh start, and is removed.
        drop(UnixListener::bind(&path).unwrap());
        assert!(request(&path).unwrap().is_none());
        assert!(!path.exists());
    }
}
