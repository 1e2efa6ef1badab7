//! The log writer: lines are appended to an in-memory buffer and written to stderr in
//! batches (when the buffer passes [`FLUSH_BYTES`], every [`FLUSH_INTERVAL`] from a small
//! flusher thread, and at exit), so an access log line costs a copy on the data path
//! instead of a write(2). Nothing is dropped: a full buffer is written out by the thread
//! that filled it.
use std::{
    io::Write,
    sync::{Arc, Mutex, MutexGuard},
    thread,
    time::Duration,
};

/// Buffered bytes that trigger a write.
const FLUSH_BYTES: usize = 64 * 1024;
/// Longest a line waits in the buffer.
const FLUSH_INTERVAL: Duration = Duration::from_millis(50);

#[derive(Clone, Default)]
pub struct BatchedStderr {
    buffer: Arc<Mutex<Vec<u8>>>,
}

/// Writes out what is left when dropped (keep it alive until the process exits).
pub struct FlushOnDrop(BatchedStderr);

impl BatchedStderr {
    /// The writer and its exit guard; starts the periodic flusher thread.
    pub fn start() -> (Self, FlushOnDrop) {
        let writer = Self::default();
        let flusher = writer.clone();
        let _ = thread::Builder::new()
            .name("log-flush".into())
            .spawn(move || {
                loop {
                    thread::sleep(FLUSH_INTERVAL);
                    flusher.flush_now();
                }
            });
        (writer.clone(), FlushOnDrop(writer))
    }

    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        self.buffer.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn flush_now(&self) {
        let pending = {
            let mut buffer = self.lock();
            if buffer.is_empty() {
                return;
            }
            std::mem::replace(&mut *buffer, fresh_buffer())
        };
        let _ = std::io::stderr().write_all(&pending);
    }
}

impl Drop for FlushOnDrop {
    fn drop(&mut self) {
        self.0.flush_now();
    }
}

/// A buffer that holds a batch without growing (growing copies what it holds).
fn fresh_buffer() -> Vec<u8> {
    Vec::with_capacity(FLUSH_BYTES + 4096)
}

/// One log line being written.
pub struct LineWriter<'a>(&'a BatchedStderr);

impl Write for LineWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let mut buffer = self.0.lock();
        buffer.extend_from_slice(bytes);
        if buffer.len() >= FLUSH_BYTES {
            let pending = std::mem::replace(&mut *buffer, fresh_buffer());
            drop(buffer);
            std::io::stderr().write_all(&pending)?;
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BatchedStderr {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_wait_in_the_buffer_until_flushed() {
        let w = BatchedStderr::default();
        LineWriter(&w).write_all(b"hello\n").expect("buffered");
        assert_eq!(&*w.lock(), b"hello\n");
        w.flush_now();
        assert!(w.lock().is_empty());
    }
}
