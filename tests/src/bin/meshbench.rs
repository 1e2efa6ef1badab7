//! Load generator and server for `cargo xtask bench`.
//!
//! `meshbench server PORT`: binds 0.0.0.0:PORT, prints `listening` on stdout once ready, and
//! serves each connection on its own thread.
//!
//! `meshbench client rr|conn|stream ADDR --seconds S [--connections N] [--size B] [--max COUNT]`
//! runs one measurement against a server and prints one JSON line with the results.
//!
//! Protocol: every connection starts with a 5-byte header, the mode byte and the message
//! size (u32, big endian); the client sends it together with its first message.
//! - `R` (rr): the server echoes messages of exactly `size` bytes until the client closes.
//!   The client measures each round trip (write, then read the whole reply).
//! - `C` (conn): one `size`-byte message and its echo, then the SERVER closes first, so the
//!   TIME_WAIT state stays on the server side and the client never runs out of ports.
//! - `S` (stream): the client sends bulk data for S seconds and half-closes; the server
//!   discards it, counts it, and answers with the byte count (u64, big endian).
//!
//! Every loop is bounded by a deadline and a count, every socket has timeouts, and network
//! errors are counted and reported instead of panicking.
use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    thread,
    time::{Duration, Instant},
};

const MODE_RR: u8 = b'R';
const MODE_CONN: u8 = b'C';
const MODE_STREAM: u8 = b'S';
const HEADER_LEN: usize = 5;
/// Largest message size the server accepts for rr and conn.
const MAX_MESSAGE: usize = 1 << 20;
/// The server drops connections idle for this long.
const SERVER_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Latency samples kept per thread (later requests are still counted).
const MAX_SAMPLES_PER_THREAD: usize = 4_000_000;
/// The conn mode gives up after this many failed connections.
const MAX_CONN_ERRORS: u64 = 1000;
/// Bulk write size in stream mode.
const STREAM_CHUNK: usize = 128 * 1024;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("server") => server(&args[1..]),
        Some("client") => client(&args[1..]),
        _ => Err(usage()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshbench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage() -> String {
    "usage: meshbench server PORT | meshbench client rr|conn|stream ADDR --seconds S [--connections N] [--size B] [--max COUNT]".into()
}

// ---------------------------------------------------------------------------------------
// Server

fn server(args: &[String]) -> Result<(), String> {
    let port: u16 = match args {
        [p] => p.parse().map_err(|_| usage())?,
        _ => return Err(usage()),
    };
    let listener = TcpListener::bind(("0.0.0.0", port))
        .map_err(|e| format!("cannot listen on port {port}: {e}"))?;
    println!("listening");
    let _ = io::stdout().flush();
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                let spawned = thread::Builder::new().spawn(move || {
                    let _ = serve(stream);
                });
                if let Err(e) = spawned {
                    // The connection is dropped with the closure; back off a little.
                    eprintln!("meshbench server: cannot start a thread: {e}");
                    thread::sleep(Duration::from_millis(10));
                }
            }
            Err(e) => {
                eprintln!("meshbench server: accept: {e}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn serve(mut stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(SERVER_IDLE_TIMEOUT))?;
    stream.set_write_timeout(Some(SERVER_IDLE_TIMEOUT))?;
    let mut header = [0u8; HEADER_LEN];
    stream.read_exact(&mut header)?;
    let size = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    match header[0] {
        MODE_RR | MODE_CONN if size == 0 || size > MAX_MESSAGE => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad message size",
        )),
        MODE_RR => {
            let mut buf = vec![0u8; size];
            loop {
                match stream.read_exact(&mut buf) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e),
                }
                stream.write_all(&buf)?;
            }
        }
        MODE_CONN => {
            let mut buf = vec![0u8; size];
            stream.read_exact(&mut buf)?;
            stream.write_all(&buf)?;
            // Everything the client sent has been read, so this close is a clean FIN (not a
            // RST) and this side keeps the TIME_WAIT.
            drop(stream);
            Ok(())
        }
        MODE_STREAM => {
            let mut buf = vec![0u8; 256 * 1024];
            let mut total: u64 = 0;
            loop {
                let n = stream.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            stream.write_all(&total.to_be_bytes())?;
            Ok(())
        }
        _ => Err(io::Error::new(io::ErrorKind::InvalidData, "unknown mode")),
    }
}

// ---------------------------------------------------------------------------------------
// Client

struct ClientArgs {
    mode: String,
    addr: SocketAddr,
    seconds: f64,
    connections: usize,
    size: usize,
    max: Option<u64>,
}

fn parse_client(args: &[String]) -> Result<ClientArgs, String> {
    let (mode, addr) = match args {
        [m, a, ..] => (
            m.clone(),
            a.parse::<SocketAddr>()
                .map_err(|e| format!("bad address {a}: {e}"))?,
        ),
        _ => return Err(usage()),
    };
    let mut parsed = ClientArgs {
        mode,
        addr,
        seconds: 3.0,
        connections: 1,
        size: 64,
        max: None,
    };
    let mut rest = args[2..].iter();
    while let Some(flag) = rest.next() {
        let value = rest.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = || format!("bad value for {flag}: {value}");
        match flag.as_str() {
            "--seconds" => parsed.seconds = value.parse().map_err(|_| bad())?,
            "--connections" => parsed.connections = value.parse().map_err(|_| bad())?,
            "--size" => parsed.size = value.parse().map_err(|_| bad())?,
            "--max" => parsed.max = Some(value.parse().map_err(|_| bad())?),
            _ => return Err(usage()),
        }
    }
    if !(parsed.seconds > 0.0 && parsed.seconds <= 3600.0) {
        return Err("--seconds must be in (0, 3600]".into());
    }
    if parsed.connections == 0 || parsed.connections > 1024 {
        return Err("--connections must be in 1..=1024".into());
    }
    if parsed.size == 0 || parsed.size > MAX_MESSAGE {
        return Err(format!("--size must be in 1..={MAX_MESSAGE}"));
    }
    Ok(parsed)
}

fn client(args: &[String]) -> Result<(), String> {
    let args = parse_client(args)?;
    let line = match args.mode.as_str() {
        "rr" => client_rr(&args),
        "conn" => client_conn(&args),
        "stream" => client_stream(&args),
        _ => return Err(usage()),
    };
    println!("{line}");
    Ok(())
}

fn header(mode: u8, size: usize) -> [u8; HEADER_LEN] {
    let s = (size as u32).to_be_bytes();
    [mode, s[0], s[1], s[2], s[3]]
}

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// What one client thread measured.
#[derive(Default)]
struct ThreadResult {
    ok: u64,
    errors: u64,
    addr_not_available: u64,
    first_error: Option<String>,
    /// Per-operation latency in nanoseconds (a bounded sample).
    samples: Vec<u64>,
    elapsed: Duration,
}

impl ThreadResult {
    fn error(&mut self, what: &str, e: &io::Error) {
        self.errors += 1;
        if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) {
            self.addr_not_available += 1;
        }
        if self.first_error.is_none() {
            self.first_error = Some(format!("{what}: {e}"));
        }
    }

    fn sample(&mut self, started: Instant) {
        if self.samples.len() < MAX_SAMPLES_PER_THREAD {
            self.samples.push(started.elapsed().as_nanos() as u64);
        }
    }
}

/// Runs `work` on `n` threads and merges their results.
fn on_threads(
    n: usize,
    work: impl Fn() -> ThreadResult + Send + Sync + Copy + 'static,
) -> ThreadResult {
    let mut handles = Vec::with_capacity(n);
    let mut total = ThreadResult::default();
    for _ in 0..n {
        match thread::Builder::new().spawn(work) {
            Ok(h) => handles.push(h),
            Err(e) => total.error("spawning a client thread", &e),
        }
    }
    for h in handles {
        match h.join() {
            Ok(r) => {
                total.ok += r.ok;
                total.errors += r.errors;
                total.addr_not_available += r.addr_not_available;
                if total.first_error.is_none() {
                    total.first_error = r.first_error;
                }
                total.samples.extend(r.samples);
                total.elapsed = total.elapsed.max(r.elapsed);
            }
            Err(_) => {
                total.errors += 1;
                total
                    .first_error
                    .get_or_insert_with(|| "a client thread panicked".into());
            }
        }
    }
    total
}

/// (p50, p99, max) in microseconds.
fn percentiles(samples: &mut [u64]) -> (f64, f64, f64) {
    if samples.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    samples.sort_unstable();
    let at = |q: f64| {
        let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i] as f64 / 1000.0
    };
    (
        at(0.50),
        at(0.99),
        samples[samples.len() - 1] as f64 / 1000.0,
    )
}

fn per_thread_max(args: &ClientArgs) -> u64 {
    args.max
        .map(|m| m.div_ceil(args.connections as u64))
        .unwrap_or(u64::MAX)
}

fn client_rr(args: &ClientArgs) -> String {
    let (addr, size, seconds, max) = (args.addr, args.size, args.seconds, per_thread_max(args));
    let mut r = on_threads(args.connections, move || {
        rr_thread(addr, size, seconds, max)
    });
    let (p50, p99, pmax) = percentiles(&mut r.samples);
    let secs = r.elapsed.as_secs_f64();
    format!(
        "{{\"mode\":\"rr\",\"connections\":{},\"size\":{},\"requests\":{},\"seconds\":{:.3},\"rps\":{:.1},\"p50_us\":{:.1},\"p99_us\":{:.1},\"max_us\":{:.1},\"errors\":{},\"first_error\":{}}}",
        args.connections,
        size,
        r.ok,
        secs,
        rate(r.ok, secs),
        p50,
        p99,
        pmax,
        r.errors,
        json_string(r.first_error.as_deref()),
    )
}

fn rr_thread(addr: SocketAddr, size: usize, seconds: f64, max: u64) -> ThreadResult {
    let mut r = ThreadResult::default();
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let mut stream = match connect(addr) {
        Ok(s) => s,
        Err(e) => {
            r.error("connect", &e);
            r.elapsed = started.elapsed();
            return r;
        }
    };
    let message = vec![0x5au8; size];
    let mut first = Vec::with_capacity(HEADER_LEN + size);
    first.extend_from_slice(&header(MODE_RR, size));
    first.extend_from_slice(&message);
    let mut reply = vec![0u8; size];
    let mut out: &[u8] = &first;
    let started = Instant::now();
    while r.ok < max && Instant::now() < deadline {
        let t = Instant::now();
        let result = stream
            .write_all(out)
            .and_then(|()| stream.read_exact(&mut reply));
        if let Err(e) = result {
            r.error("request", &e);
            break;
        }
        r.sample(t);
        r.ok += 1;
        out = &message;
    }
    r.elapsed = started.elapsed();
    r
}

fn client_conn(args: &ClientArgs) -> String {
    let (addr, size, seconds, max) = (args.addr, args.size, args.seconds, per_thread_max(args));
    let mut r = on_threads(args.connections, move || {
        conn_thread(addr, size, seconds, max)
    });
    let (p50, p99, pmax) = percentiles(&mut r.samples);
    let secs = r.elapsed.as_secs_f64();
    format!(
        "{{\"mode\":\"conn\",\"connections\":{},\"size\":{},\"completed\":{},\"seconds\":{:.3},\"conn_per_s\":{:.1},\"p50_us\":{:.1},\"p99_us\":{:.1},\"max_us\":{:.1},\"errors\":{},\"addr_not_available\":{},\"first_error\":{}}}",
        args.connections,
        size,
        r.ok,
        secs,
        rate(r.ok, secs),
        p50,
        p99,
        pmax,
        r.errors,
        r.addr_not_available,
        json_string(r.first_error.as_deref()),
    )
}

/// One connection: connect, send a message, read the echo, wait for the server's FIN, close.
fn conn_thread(addr: SocketAddr, size: usize, seconds: f64, max: u64) -> ThreadResult {
    let mut r = ThreadResult::default();
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let mut request = Vec::with_capacity(HEADER_LEN + size);
    request.extend_from_slice(&header(MODE_CONN, size));
    request.resize(HEADER_LEN + size, 0x5a);
    let mut reply = vec![0u8; size];
    while r.ok < max && r.errors < MAX_CONN_ERRORS && Instant::now() < deadline {
        let t = Instant::now();
        let mut stream = match connect(addr) {
            Ok(s) => s,
            Err(e) => {
                r.error("connect", &e);
                // Out of ports or refused: do not spin.
                thread::sleep(Duration::from_millis(1));
                continue;
            }
        };
        let result = stream
            .write_all(&request)
            .and_then(|()| stream.read_exact(&mut reply))
            .and_then(|()| {
                // The server closes first: wait for its FIN before closing our side.
                let mut rest = [0u8; 64];
                match stream.read(&mut rest)? {
                    0 => Ok(()),
                    _ => Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "server sent more than the echo",
                    )),
                }
            });
        drop(stream);
        match result {
            Ok(()) => {
                r.sample(t);
                r.ok += 1;
            }
            Err(e) => r.error("exchange", &e),
        }
    }
    r.elapsed = started.elapsed();
    r
}

fn client_stream(args: &ClientArgs) -> String {
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.seconds);
    let result = (|| -> io::Result<(u64, u64, Duration)> {
        let mut stream = connect(args.addr)?;
        stream.write_all(&header(MODE_STREAM, 0))?;
        let chunk = vec![0xa5u8; STREAM_CHUNK];
        let max = args.max.unwrap_or(u64::MAX);
        let mut sent: u64 = 0;
        let started = Instant::now();
        while sent < max && Instant::now() < deadline {
            stream.write_all(&chunk)?;
            sent += chunk.len() as u64;
        }
        stream.shutdown(Shutdown::Write)?;
        // The server answers once it has drained everything.
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut count = [0u8; 8];
        stream.read_exact(&mut count)?;
        Ok((sent, u64::from_be_bytes(count), started.elapsed()))
    })();
    match result {
        Ok((sent, received, elapsed)) => {
            let secs = elapsed.as_secs_f64();
            format!(
                "{{\"mode\":\"stream\",\"bytes_sent\":{sent},\"bytes_received\":{received},\"seconds\":{secs:.3},\"gbit_s\":{:.3},\"errors\":0,\"first_error\":null}}",
                if secs > 0.0 {
                    received as f64 * 8.0 / secs / 1e9
                } else {
                    0.0
                },
            )
        }
        Err(e) => format!(
            "{{\"mode\":\"stream\",\"bytes_sent\":0,\"bytes_received\":0,\"seconds\":{:.3},\"gbit_s\":0,\"errors\":1,\"first_error\":{}}}",
            started.elapsed().as_secs_f64(),
            json_string(Some(&e.to_string())),
        ),
    }
}

fn rate(count: u64, secs: f64) -> f64 {
    if secs > 0.0 { count as f64 / secs } else { 0.0 }
}

/// A JSON string literal (or `null`).
fn json_string(s: Option<&str>) -> String {
    let Some(s) = s else { return "null".into() };
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
