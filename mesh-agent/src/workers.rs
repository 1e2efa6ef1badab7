//! The data-plane workers: one thread per `--workers`, each running its own single-threaded
//! tokio runtime (thread per core, as Envoy and haproxy do). Every pod listener is accepted on
//! every worker (each worker holds its own dup of the listening socket; the kernel hands a
//! new connection to whichever worker accepts first), and a connection then lives on the
//! worker that accepted it, together with every task it spawns.
//!
//! Why not one multi-threaded runtime: its work stealing and "run the task just woken next"
//! slot made HTTP/2 write one frame per syscall (a stream's response woke the connection
//! task, which flushed at once), and moved tasks between threads with a futex wake each time.
//! A single-threaded runtime runs the woken tasks in order, so the connection task flushes
//! the responses of all streams that finished meanwhile in one write.
//!
//! The control plane (config, certificates, enrolment, admin) stays on the main runtime.
use std::{
    cell::Cell,
    future::Future,
    sync::OnceLock,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{runtime::Handle, sync::oneshot, task::AbortHandle};
use tracing::warn;

/// The workers of this process, once started (see [`DataPlane::start`]). Without them (unit
/// tests, tools) work is spawned on the current runtime.
static HANDLES: OnceLock<Vec<Handle>> = OnceLock::new();

thread_local! {
    /// Which worker this thread is (0 on threads that are not workers).
    static WORKER_INDEX: Cell<usize> = const { Cell::new(0) };
}

/// The running workers; [`DataPlane::shutdown`] stops them.
pub struct DataPlane {
    threads: Vec<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl DataPlane {
    /// Starts `count` workers (at least one) and makes them the process's data plane.
    pub fn start(count: usize) -> anyhow::Result<Self> {
        if HANDLES.get().is_some() {
            anyhow::bail!("the data plane was already started in this process");
        }
        let count = count.max(1);
        let mut handles = Vec::with_capacity(count);
        let mut threads = Vec::with_capacity(count);
        for index in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("building a data-plane runtime")?;
            handles.push(runtime.handle().clone());
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("dataplane-{index}"))
                .spawn(move || {
                    WORKER_INDEX.with(|i| i.set(index));
                    runtime.block_on(async {
                        let _ = stopped.await;
                    });
                    // Dropping the runtime drops every connection task of this worker.
                    runtime.shutdown_timeout(Duration::from_secs(1));
                })
                .context("starting a data-plane thread")?;
            threads.push((stop, thread));
        }
        if HANDLES.set(handles).is_err() {
            anyhow::bail!("the data plane was already started in this process");
        }
        Ok(Self { threads })
    }

    /// Stops every worker, dropping the connections they serve, and waits (bounded) for the
    /// threads to end.
    pub fn shutdown(self, grace: Duration) {
        let deadline = Instant::now() + grace;
        for (stop, thread) in self.threads {
            let _ = stop.send(());
            if !join_by(thread, deadline) {
                warn!("a data-plane worker did not stop in time");
            }
        }
    }
}

/// Joins `thread` if it ends by `deadline`; false (and the thread left running) if not.
pub fn join_by(thread: JoinHandle<()>, deadline: Instant) -> bool {
    while !thread.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let finished = thread.is_finished();
    if finished {
        let _ = thread.join();
    }
    finished
}

/// How many workers there are (1 when none were started).
pub fn count() -> usize {
    HANDLES.get().map_or(1, Vec::len)
}

/// The worker the calling thread is, in `0..count()`.
pub fn current() -> usize {
    WORKER_INDEX.with(Cell::get)
}

/// Runs `make(worker)` on every worker (or once on the current runtime when no workers
/// were started). Returns handles to abort the tasks.
pub fn spawn_on_each<F, Fut>(mut make: F) -> Vec<AbortHandle>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    match HANDLES.get() {
        Some(handles) => handles
            .iter()
            .enumerate()
            .map(|(index, handle)| handle.spawn(make(index)).abort_handle())
            .collect(),
        None => vec![tokio::spawn(make(0)).abort_handle()],
    }
}
