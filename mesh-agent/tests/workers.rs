//! The data-plane workers (their own test binary: starting them sets process-wide state).
use std::{sync::mpsc, time::Duration};

use mesh_agent::workers::{self, DataPlane};

#[test]
fn each_worker_runs_its_own_copy_on_its_own_thread() {
    let data_plane = DataPlane::start(3).expect("workers start");
    assert_eq!(workers::count(), 3);
    let (tx, rx) = mpsc::channel();
    let tasks = workers::spawn_on_each(|worker| {
        let tx = tx.clone();
        async move {
            // A task spawned from a worker stays on that worker.
            let inner = tokio::spawn(async {
                (
                    workers::current(),
                    std::thread::current().name().map(str::to_string),
                )
            })
            .await
            .expect("inner task");
            let _ = tx.send((worker, inner));
        }
    });
    assert_eq!(tasks.len(), 3);
    let mut seen: Vec<_> = (0..3)
        .map(|_| {
            rx.recv_timeout(Duration::from_secs(30))
                .expect("every worker answers")
        })
        .collect();
    seen.sort();
    for (i, (worker, (current, thread))) in seen.into_iter().enumerate() {
        assert_eq!(worker, i);
        assert_eq!(current, i, "the task ran on the worker it was given");
        assert_eq!(thread.as_deref(), Some(format!("dataplane-{i}").as_str()));
    }
    assert!(
        DataPlane::start(1).is_err(),
        "a second data plane is refused"
    );
    data_plane.shutdown(Duration::from_secs(10));
}
