//! The load generator that runs inside a client pod (`soak load ...`), so every connection it
//! opens is captured by the mesh like an application's.
//!
//! Per echo target (a `peer-echo tcp` server):
//! - `l4-conn`: [`L4_CONN_PER_S`] new connections a second, each sending 1 B to 16 KiB of
//!   seeded bytes, half-closing, and comparing everything echoed back until EOF;
//! - `l4-stream`: [`L4_STREAMS`] connections kept for the whole run, each sending a seeded
//!   message every [`STREAM_INTERVAL`] and comparing its echo before the next; at the end a
//!   half-close must bring a clean EOF.
//!
//! Per HTTP target (a Service VIP whose HTTPRoute sends a path prefix to one backend):
//! - `http-keepalive`: [`HTTP_KEEPALIVE_CONNS`] HTTP/1.1 connections, a request every
//!   [`KEEPALIVE_INTERVAL`] on each (every fifth a POST with a body);
//! - `http-new`: [`HTTP_NEW_PER_S`] requests a second, each on a new connection
//!   (`Connection: close`).
//!
//! Every HTTP answer must be a 200 from the expected backend (`x-backend`) whose JSON echo
//! names the path (and body size) that was sent, and carry the `x-soak-gen` header the route
//! adds (the config generation: proof that reloads reach the data path).
//!
//! Per h2c target (a Service VIP port declared `appProtocol: http2`, HTTPRoute as above),
//! with hyper's HTTP/2 client and prior knowledge:
//! - `h2c-keepalive`: [`H2C_CONNS`] connections kept for the run; every
//!   [`H2C_ROUND_INTERVAL`] each sends [`H2C_STREAMS`] requests at once on concurrent
//!   streams; a connection found closed before a round is replaced (a reconnect), one with
//!   a failed request is dropped;
//! - `h2c-new`: [`H2C_NEW_PER_S`] new connections a second, each with [`H2C_NEW_STREAMS`]
//!   concurrent requests.
//!
//! Each h2c connection is closed in the end by dropping its last sender, and must end
//! without an error (one more operation of its class).
//!
//! An h2c request is a GET (one in eight), a POST of more than 64 KiB up to
//! [`H2C_MAX_BYTES`] (one in four) or a POST of 1 B to [`H2C_SMALL_MAX_BYTES`]; the client
//! advertises RFC 9113's default 64 KiB stream window and a connection window smaller than
//! a round's bodies, so large answers wait for its WINDOW_UPDATEs. The backend echoes the
//! body back (`x-echo-body`): every byte is compared, the answer must be a 200 from the
//! expected backend, and the request as the backend saw it (its `x-request` header) must
//! name the path, have arrived as HTTP/2 and carry `x-soak-gen`.
//!
//! Every operation is counted as attempted, then ok or failed (with the reason); bytes sent
//! and bytes verified are counted too. A line of JSON with the counters goes to stdout every
//! second and a final one (`"final": true`, with the failures) once every operation started
//! before the deadline has finished or timed out.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{
    Request,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    task::{JoinHandle, JoinSet},
    time::{MissedTickBehavior, interval, timeout},
};

/// New L4 connections per second per echo target (times `--rate-scale`).
const L4_CONN_PER_S: f64 = 8.0;
/// Long-lived L4 connections per echo target.
const L4_STREAMS: usize = 2;
/// One message per long-lived stream this often.
const STREAM_INTERVAL: Duration = Duration::from_millis(100);
/// Keep-alive HTTP connections per HTTP target.
const HTTP_KEEPALIVE_CONNS: usize = 2;
/// One request per keep-alive connection this often.
const KEEPALIVE_INTERVAL: Duration = Duration::from_millis(100);
/// New-connection HTTP requests per second per HTTP target (times `--rate-scale`).
const HTTP_NEW_PER_S: f64 = 5.0;
/// Largest payload of an `l4-conn` operation.
const L4_CONN_MAX_BYTES: u64 = 16 * 1024;
/// Largest POST body.
const POST_MAX_BYTES: u64 = 8 * 1024;
/// Long-lived h2c connections per h2c target.
const H2C_CONNS: usize = 2;
/// Requests sent at once, each on its own stream, per long-lived h2c connection and round.
const H2C_STREAMS: usize = 8;
/// One round of requests per long-lived h2c connection this often.
const H2C_ROUND_INTERVAL: Duration = Duration::from_secs(1);
/// New h2c connections per second per h2c target (times `--rate-scale`).
const H2C_NEW_PER_S: f64 = 1.0;
/// Requests sent at once on each new h2c connection.
const H2C_NEW_STREAMS: usize = 2;
/// Largest small h2c body.
const H2C_SMALL_MAX_BYTES: u64 = 16 * 1024;
/// Largest h2c body (the large ones start above 64 KiB, a default stream window).
const H2C_MAX_BYTES: u64 = 256 * 1024;
/// The h2c client's stream window: RFC 9113's default, so an echo above 64 KiB cannot be
/// sent to it in one go and the agent has to wait for its WINDOW_UPDATEs.
const H2C_STREAM_WINDOW: u32 = 65_535;
/// The h2c client's connection window: less than its streams' windows together.
const H2C_CONN_WINDOW: u32 = 256 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A whole operation (connect, exchange, verify) must finish within this.
const OP_TIMEOUT: Duration = Duration::from_secs(15);
/// Rate-driven operations in flight per class at most; beyond it the class waits (and its
/// rate drops) rather than piling up.
const MAX_IN_FLIGHT: usize = 64;
/// Failure descriptions kept for the final report.
const MAX_FAILURES_KEPT: usize = 200;

#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    /// Seconds of load; operations started before then are finished.
    #[arg(long)]
    pub seconds: f64,
    /// An echo target, `NAME=IP:PORT` (repeatable).
    #[arg(long = "echo")]
    pub echo: Vec<String>,
    /// An HTTP target, `NAME=IP:PORT,PATH_PREFIX,BACKEND` (repeatable): requests go to
    /// `PATH_PREFIX/...` and must be answered by the backend named BACKEND.
    #[arg(long = "http")]
    pub http: Vec<String>,
    /// An h2c target, as `--http` (repeatable): HTTP/2 with prior knowledge.
    #[arg(long = "h2c")]
    pub h2c: Vec<String>,
    /// Multiplies the rates of the new-connection classes.
    #[arg(long, default_value_t = 1.0)]
    pub rate_scale: f64,
}

#[derive(Clone, Debug)]
struct HttpTarget {
    name: String,
    addr: SocketAddr,
    prefix: String,
    backend: String,
}

#[derive(Default)]
struct ClassStats {
    attempted: u64,
    ok: u64,
    failed: u64,
    bytes_sent: u64,
    bytes_verified: u64,
    /// Connections re-opened after the peer closed them (keep-alive and stream classes).
    reconnects: u64,
}

#[derive(Default)]
struct Stats {
    classes: BTreeMap<String, ClassStats>,
    failures: Vec<String>,
    /// Highest `x-soak-gen` seen in an answer.
    max_gen: u64,
    started: Option<Instant>,
}

type Shared = Arc<Mutex<Stats>>;

fn lock(stats: &Shared) -> std::sync::MutexGuard<'_, Stats> {
    // A panicked task must not hide the counters of the others.
    stats.lock().unwrap_or_else(|p| p.into_inner())
}

fn attempt(stats: &Shared, class: &str, bytes: u64) {
    let mut s = lock(stats);
    let c = s.classes.entry(class.to_string()).or_default();
    c.attempted += 1;
    c.bytes_sent += bytes;
}

fn succeed(stats: &Shared, class: &str, bytes: u64) {
    let mut s = lock(stats);
    let c = s.classes.entry(class.to_string()).or_default();
    c.ok += 1;
    c.bytes_verified += bytes;
}

fn fail(stats: &Shared, class: &str, what: String) {
    let mut s = lock(stats);
    let t = s.started.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
    s.classes.entry(class.to_string()).or_default().failed += 1;
    if s.failures.len() < MAX_FAILURES_KEPT {
        s.failures.push(format!("t={t:.1}s {class}: {what}"));
    }
}

fn reconnected(stats: &Shared, class: &str) {
    lock(stats)
        .classes
        .entry(class.to_string())
        .or_default()
        .reconnects += 1;
}

fn saw_gen(stats: &Shared, generation: u64) {
    let mut s = lock(stats);
    s.max_gen = s.max_gen.max(generation);
}

fn report(stats: &Shared, last: bool) -> Value {
    let s = lock(stats);
    let classes: serde_json::Map<String, Value> = s
        .classes
        .iter()
        .map(|(name, c)| {
            (
                name.clone(),
                json!({
                    "attempted": c.attempted,
                    "ok": c.ok,
                    "failed": c.failed,
                    "bytes_sent": c.bytes_sent,
                    "bytes_verified": c.bytes_verified,
                    "reconnects": c.reconnects,
                }),
            )
        })
        .collect();
    let mut v = json!({
        "elapsed_s": s.started.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0),
        "classes": classes,
        "max_gen": s.max_gen,
        "final": last,
    });
    if last {
        v["failures"] = json!(s.failures);
    }
    v
}

fn parse_echo(spec: &str) -> anyhow::Result<(String, SocketAddr)> {
    let (name, addr) = spec
        .split_once('=')
        .with_context(|| format!("--echo {spec:?} is not NAME=IP:PORT"))?;
    Ok((
        name.to_string(),
        addr.parse()
            .with_context(|| format!("--echo {spec:?}: bad address"))?,
    ))
}

/// An HTTP or h2c target given as `--{flag} NAME=IP:PORT,PREFIX,BACKEND`.
fn parse_http(flag: &str, spec: &str) -> anyhow::Result<HttpTarget> {
    let (name, rest) = spec
        .split_once('=')
        .with_context(|| format!("--{flag} {spec:?} is not NAME=IP:PORT,PREFIX,BACKEND"))?;
    let parts: Vec<&str> = rest.split(',').collect();
    let [addr, prefix, backend] = parts.as_slice() else {
        bail!("--{flag} {spec:?} is not NAME=IP:PORT,PREFIX,BACKEND");
    };
    ensure!(
        prefix.starts_with('/') && !prefix.ends_with('/'),
        "--{flag} {spec:?}: the prefix must start and not end with /"
    );
    Ok(HttpTarget {
        name: name.to_string(),
        addr: addr
            .parse()
            .with_context(|| format!("--{flag} {spec:?}: bad address"))?,
        prefix: prefix.to_string(),
        backend: backend.to_string(),
    })
}

pub fn run(args: LoadArgs) -> anyhow::Result<()> {
    ensure!(
        args.seconds > 0.0 && args.seconds <= 86_400.0,
        "--seconds must be in (0, 86400]"
    );
    ensure!(
        args.rate_scale > 0.0 && args.rate_scale <= 10.0,
        "--rate-scale must be in (0, 10]"
    );
    let echo = args
        .echo
        .iter()
        .map(|s| parse_echo(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let http = args
        .http
        .iter()
        .map(|s| parse_http("http", s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let h2c = args
        .h2c
        .iter()
        .map(|s| parse_http("h2c", s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // One thread: a few hundred operations a second need no more, and the soak must leave
    // the machine's cores to the agents (and to whoever else shares it).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    rt.block_on(load(args.seconds, args.rate_scale, echo, http, h2c))
}

async fn load(
    seconds: f64,
    rate_scale: f64,
    echo: Vec<(String, SocketAddr)>,
    http: Vec<HttpTarget>,
    h2c: Vec<HttpTarget>,
) -> anyhow::Result<()> {
    let stats: Shared = Arc::new(Mutex::new(Stats {
        started: Some(Instant::now()),
        ..Default::default()
    }));
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    let mut tasks = JoinSet::new();
    for (i, (name, addr)) in echo.iter().enumerate() {
        let class = format!("l4-conn {name}");
        let (addr, st) = (*addr, stats.clone());
        let seed = seed ^ (0x1000 + i as u64);
        tasks.spawn(paced(
            class.clone(),
            L4_CONN_PER_S * rate_scale,
            deadline,
            st.clone(),
            move |n| {
                let (class, st) = (class.clone(), st.clone());
                async move {
                    let s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ n;
                    let len = 1 + rand(s) % L4_CONN_MAX_BYTES;
                    attempt(&st, &class, len);
                    match timeout(OP_TIMEOUT, l4_once(addr, s, len as usize)).await {
                        Ok(Ok(())) => succeed(&st, &class, len),
                        Ok(Err(e)) => fail(&st, &class, format!("#{n} ({len} B): {e:#}")),
                        Err(_) => fail(&st, &class, format!("#{n} ({len} B): timed out")),
                    }
                }
            },
        ));
        for k in 0..L4_STREAMS {
            tasks.spawn(stream(
                format!("l4-stream {name}"),
                addr,
                seed ^ (0x2000 + (i * 16 + k) as u64),
                deadline,
                stats.clone(),
            ));
        }
    }
    for target in &http {
        for k in 0..HTTP_KEEPALIVE_CONNS {
            tasks.spawn(keepalive(
                target.clone(),
                k,
                seed ^ (0x3000 + k as u64),
                deadline,
                stats.clone(),
            ));
        }
        let class = format!("http-new {}", target.name);
        let (t, st) = (target.clone(), stats.clone());
        tasks.spawn(paced(
            class.clone(),
            HTTP_NEW_PER_S * rate_scale,
            deadline,
            st.clone(),
            move |n| {
                let (class, st, t) = (class.clone(), st.clone(), t.clone());
                async move {
                    let post = (n % 5 == 4).then(|| 1 + rand(seed ^ n) % POST_MAX_BYTES);
                    let path = format!("{}/new/{n}", t.prefix);
                    attempt(&st, &class, post.unwrap_or(0));
                    let result = timeout(OP_TIMEOUT, async {
                        let mut sender = http_connect(t.addr).await?;
                        exchange(&mut sender, &t, &path, post, true).await
                    })
                    .await;
                    match result {
                        Ok(Ok(generation)) => {
                            saw_gen(&st, generation);
                            succeed(&st, &class, post.unwrap_or(0));
                        }
                        Ok(Err(e)) => fail(&st, &class, format!("{path}: {e:#}")),
                        Err(_) => fail(&st, &class, format!("{path}: timed out")),
                    }
                }
            },
        ));
    }
    for (i, target) in h2c.iter().enumerate() {
        for k in 0..H2C_CONNS {
            tasks.spawn(h2c_keepalive(
                target.clone(),
                k,
                seed ^ (0x4000 + (i * 16 + k) as u64),
                deadline,
                stats.clone(),
            ));
        }
        let class = format!("h2c-new {}", target.name);
        let (t, st) = (target.clone(), stats.clone());
        let seed = seed ^ (0x5000 + i as u64);
        tasks.spawn(paced(
            class.clone(),
            H2C_NEW_PER_S * rate_scale,
            deadline,
            st.clone(),
            move |n| {
                let (class, st, t) = (class.clone(), st.clone(), t.clone());
                async move {
                    let requests: Vec<H2cRequest> = (0..H2C_NEW_STREAMS)
                        .map(|i| {
                            H2cRequest::new(
                                format!("{}/h2-new/{n}/{i}", t.prefix),
                                h2c_seed(seed, n, i),
                            )
                        })
                        .collect();
                    let (sender, conn) = match timeout(OP_TIMEOUT, h2c_connect(t.addr)).await {
                        Ok(Ok(c)) => c,
                        Ok(Err(e)) => return h2c_unsent(&st, &class, &requests, &format!("{e:#}")),
                        Err(_) => {
                            return h2c_unsent(&st, &class, &requests, "connect timed out");
                        }
                    };
                    h2c_round(&sender, &t, requests, &class, &st).await;
                    h2c_close(&st, &class, sender, conn).await;
                }
            },
        ));
    }

    let printer = {
        let st = stats.clone();
        tokio::spawn(async move {
            let mut tick = interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                println!("{}", report(&st, false));
            }
        })
    };
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done {
            // A panic is a bug in this generator: say so instead of losing its counters.
            fail(&stats, "generator", format!("a load task panicked: {e}"));
        }
    }
    printer.abort();
    println!("{}", report(&stats, true));
    Ok(())
}

/// Runs `op(n)` `per_second` times a second until `deadline`, each as its own task, then
/// waits for the ones still running.
async fn paced<F, Fut>(class: String, per_second: f64, deadline: Instant, stats: Shared, op: F)
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut tick = interval(Duration::from_secs_f64(1.0 / per_second));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut running = JoinSet::new();
    let mut n = 0u64;
    loop {
        tick.tick().await;
        if Instant::now() >= deadline {
            break;
        }
        while running.try_join_next().is_some() {}
        while running.len() >= MAX_IN_FLIGHT {
            running.join_next().await;
        }
        running.spawn(op(n));
        n += 1;
    }
    while let Some(done) = running.join_next().await {
        if let Err(e) = done {
            fail(&stats, &class, format!("an operation panicked: {e}"));
        }
    }
}

/// One `l4-conn` operation: connect, send `len` seeded bytes, half-close, read the echo to
/// EOF and compare.
async fn l4_once(addr: SocketAddr, seed: u64, len: usize) -> anyhow::Result<()> {
    let payload = pattern(seed, len);
    let mut s = connect(addr).await?;
    let (mut r, mut w) = s.split();
    // Read while writing: never rely on socket buffers holding the whole echo.
    let write = async {
        w.write_all(&payload).await.context("write")?;
        w.shutdown().await.context("half-close")
    };
    let read = async {
        let mut got = Vec::with_capacity(len);
        r.read_to_end(&mut got).await.context("read")?;
        anyhow::Ok(got)
    };
    let (written, got) = tokio::join!(write, read);
    written?;
    let got = got?;
    compare(&payload, &got)
}

/// A long-lived `l4-stream` connection until `deadline`; each message is one operation.
async fn stream(class: String, addr: SocketAddr, seed: u64, deadline: Instant, stats: Shared) {
    let mut conn: Option<TcpStream> = None;
    let mut tick = interval(STREAM_INTERVAL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let mut opened = 0u64;
    loop {
        tick.tick().await;
        if Instant::now() >= deadline {
            break;
        }
        let s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seq;
        let len = 64 + rand(s) % 4032;
        seq += 1;
        attempt(&stats, &class, len);
        if conn.is_none() {
            match connect(addr).await {
                Ok(c) => {
                    if opened > 0 {
                        reconnected(&stats, &class);
                    }
                    opened += 1;
                    conn = Some(c);
                }
                Err(e) => {
                    fail(&stats, &class, format!("message {seq}: {e:#}"));
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let msg = pattern(s, len as usize);
        let exchange = async {
            c.write_all(&msg).await.context("write")?;
            let mut got = vec![0u8; msg.len()];
            c.read_exact(&mut got).await.context("read")?;
            compare(&msg, &got)
        };
        match timeout(OP_TIMEOUT, exchange).await {
            Ok(Ok(())) => succeed(&stats, &class, len),
            Ok(Err(e)) => {
                fail(&stats, &class, format!("message {seq} ({len} B): {e:#}"));
                conn = None;
            }
            Err(_) => {
                fail(
                    &stats,
                    &class,
                    format!("message {seq} ({len} B): timed out"),
                );
                conn = None;
            }
        }
    }
    // A clean end: half-close, and the echo side must close with nothing left over.
    if let Some(mut c) = conn {
        attempt(&stats, &class, 0);
        let end = async {
            c.shutdown().await.context("half-close")?;
            let mut rest = Vec::new();
            c.read_to_end(&mut rest).await.context("read to EOF")?;
            ensure!(rest.is_empty(), "{} stray bytes before EOF", rest.len());
            anyhow::Ok(())
        };
        match timeout(OP_TIMEOUT, end).await {
            Ok(Ok(())) => succeed(&stats, &class, 0),
            Ok(Err(e)) => fail(&stats, &class, format!("closing: {e:#}")),
            Err(_) => fail(&stats, &class, "closing: no EOF".to_string()),
        }
    }
}

/// One keep-alive HTTP connection until `deadline`; each request is one operation.
async fn keepalive(t: HttpTarget, k: usize, seed: u64, deadline: Instant, stats: Shared) {
    let class = format!("http-keepalive {}", t.name);
    let mut sender: Option<http1::SendRequest<Full<Bytes>>> = None;
    let mut tick = interval(KEEPALIVE_INTERVAL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let mut opened = 0u64;
    loop {
        tick.tick().await;
        if Instant::now() >= deadline {
            break;
        }
        let post = (seq % 5 == 4).then(|| 1 + rand(seed ^ seq) % POST_MAX_BYTES);
        let path = format!("{}/ka/{k}/{seq}", t.prefix);
        seq += 1;
        attempt(&stats, &class, post.unwrap_or(0));
        // The server may close an idle keep-alive connection; a client then opens a new
        // one (counted as a reconnect). A request already sent that fails is a loss.
        if let Some(s) = sender.as_mut()
            && s.ready().await.is_err()
        {
            sender = None;
        }
        if sender.is_none() {
            match timeout(OP_TIMEOUT, http_connect(t.addr)).await {
                Ok(Ok(s)) => {
                    if opened > 0 {
                        reconnected(&stats, &class);
                    }
                    opened += 1;
                    sender = Some(s);
                }
                Ok(Err(e)) => {
                    fail(&stats, &class, format!("{path}: {e:#}"));
                    continue;
                }
                Err(_) => {
                    fail(&stats, &class, format!("{path}: connect timed out"));
                    continue;
                }
            }
        }
        let Some(s) = sender.as_mut() else { continue };
        match timeout(OP_TIMEOUT, exchange(s, &t, &path, post, false)).await {
            Ok(Ok(generation)) => {
                saw_gen(&stats, generation);
                succeed(&stats, &class, post.unwrap_or(0));
            }
            Ok(Err(e)) => {
                fail(&stats, &class, format!("{path}: {e:#}"));
                sender = None;
            }
            Err(_) => {
                fail(&stats, &class, format!("{path}: timed out"));
                sender = None;
            }
        }
    }
}

/// One h2c request: its path, the seed of its body, and the body's length (`None`: a GET).
#[derive(Clone)]
struct H2cRequest {
    path: String,
    seed: u64,
    len: Option<u64>,
}

impl H2cRequest {
    /// A GET one time in eight, else a POST: small, or above 64 KiB one time in four.
    fn new(path: String, seed: u64) -> Self {
        let r = rand(seed);
        let len = match r % 8 {
            0 => None,
            1 | 2 => Some(64 * 1024 + 1 + (r >> 8) % (H2C_MAX_BYTES - 64 * 1024)),
            _ => Some(1 + (r >> 8) % H2C_SMALL_MAX_BYTES),
        };
        Self { path, seed, len }
    }

    fn bytes(&self) -> u64 {
        self.len.unwrap_or(0)
    }
}

type H2cSender = http2::SendRequest<Full<Bytes>>;

/// The seed of request `i` of round (or connection) `n`: every request of a run gets its
/// own body, so a response delivered on the wrong stream cannot pass as the right one.
/// (`rand` ignores bit 0 of its input, hence the shift.)
fn h2c_seed(base: u64, n: u64, i: usize) -> u64 {
    rand(base ^ (n << 16 | (i as u64) << 1))
}

/// A long-lived h2c connection until `deadline`: a round of [`H2C_STREAMS`] concurrent
/// requests every [`H2C_ROUND_INTERVAL`]; each request is one operation.
async fn h2c_keepalive(t: HttpTarget, k: usize, seed: u64, deadline: Instant, stats: Shared) {
    let class = format!("h2c-keepalive {}", t.name);
    let mut conn: Option<(H2cSender, JoinHandle<hyper::Result<()>>)> = None;
    let mut tick = interval(H2C_ROUND_INTERVAL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut round = 0u64;
    let mut opened = 0u64;
    loop {
        tick.tick().await;
        if Instant::now() >= deadline {
            break;
        }
        let requests: Vec<H2cRequest> = (0..H2C_STREAMS)
            .map(|i| {
                H2cRequest::new(
                    format!("{}/h2/{k}/{round}/{i}", t.prefix),
                    h2c_seed(seed, round, i),
                )
            })
            .collect();
        round += 1;
        // As with HTTP/1.1 keep-alive: a connection the server closed between requests is
        // replaced (a reconnect); a request sent on a live connection that fails is a loss.
        if conn.as_ref().is_some_and(|(s, _)| s.is_closed()) {
            conn = None;
        }
        if conn.is_none() {
            match timeout(OP_TIMEOUT, h2c_connect(t.addr)).await {
                Ok(Ok(c)) => {
                    if opened > 0 {
                        reconnected(&stats, &class);
                    }
                    opened += 1;
                    conn = Some(c);
                }
                Ok(Err(e)) => {
                    h2c_unsent(&stats, &class, &requests, &format!("{e:#}"));
                    continue;
                }
                Err(_) => {
                    h2c_unsent(&stats, &class, &requests, "connect timed out");
                    continue;
                }
            }
        }
        let Some((sender, _)) = conn.as_ref() else {
            continue;
        };
        if !h2c_round(sender, &t, requests, &class, &stats).await {
            // Start the next round on a fresh connection, as the other classes do.
            if let Some((_, task)) = conn.take() {
                task.abort();
            }
        }
    }
    if let Some((sender, task)) = conn {
        h2c_close(&stats, &class, sender, task).await;
    }
}

/// A clean end, one more operation: with its last sender dropped, the client closes the
/// connection, which must end without an error.
async fn h2c_close(
    stats: &Shared,
    class: &str,
    sender: H2cSender,
    task: JoinHandle<hyper::Result<()>>,
) {
    attempt(stats, class, 0);
    drop(sender);
    match timeout(OP_TIMEOUT, task).await {
        Ok(Ok(Ok(()))) => succeed(stats, class, 0),
        Ok(Ok(Err(e))) => fail(stats, class, format!("closing: {e:#}")),
        Ok(Err(e)) => fail(stats, class, format!("closing: the task failed: {e}")),
        Err(_) => fail(stats, class, "closing: did not end".to_string()),
    }
}

/// Counts `requests` as attempted and failed because their connection could not be opened.
fn h2c_unsent(stats: &Shared, class: &str, requests: &[H2cRequest], why: &str) {
    for r in requests {
        attempt(stats, class, r.bytes());
        fail(stats, class, format!("{}: {why}", r.path));
    }
}

/// Sends `requests` at once on `sender`, each on its own stream, and counts each; true if
/// all succeeded.
async fn h2c_round(
    sender: &H2cSender,
    t: &HttpTarget,
    requests: Vec<H2cRequest>,
    class: &str,
    stats: &Shared,
) -> bool {
    let mut running = JoinSet::new();
    for r in requests {
        attempt(stats, class, r.bytes());
        let (sender, t) = (sender.clone(), t.clone());
        running.spawn(async move {
            let result = timeout(OP_TIMEOUT, h2c_exchange(sender, &t, &r)).await;
            (r, result)
        });
    }
    let mut all_ok = true;
    while let Some(done) = running.join_next().await {
        let (r, result) = match done {
            Ok(d) => d,
            Err(e) => {
                fail(stats, class, format!("a request task panicked: {e}"));
                all_ok = false;
                continue;
            }
        };
        let what = match r.len {
            Some(n) => format!("POST {} ({n} B)", r.path),
            None => format!("GET {}", r.path),
        };
        match result {
            Ok(Ok(generation)) => {
                saw_gen(stats, generation);
                succeed(stats, class, r.bytes());
            }
            Ok(Err(e)) => {
                fail(stats, class, format!("{what}: {e:#}"));
                all_ok = false;
            }
            Err(_) => {
                fail(stats, class, format!("{what}: timed out"));
                all_ok = false;
            }
        }
    }
    all_ok
}

/// Opens an h2c connection (prior knowledge) with the small client windows; returns the
/// sender and the task driving the connection.
async fn h2c_connect(
    addr: SocketAddr,
) -> anyhow::Result<(H2cSender, JoinHandle<hyper::Result<()>>)> {
    let io = TokioIo::new(connect(addr).await?);
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(H2C_STREAM_WINDOW)
        .initial_connection_window_size(H2C_CONN_WINDOW)
        .handshake(io)
        .await
        .context("HTTP/2 handshake")?;
    Ok((sender, tokio::spawn(conn)))
}

/// Sends one h2c request whose body the backend echoes, and verifies the answer byte for
/// byte; returns the route's `x-soak-gen`.
async fn h2c_exchange(
    mut sender: H2cSender,
    t: &HttpTarget,
    r: &H2cRequest,
) -> anyhow::Result<u64> {
    let body = r
        .len
        .map(|n| Bytes::from(pattern(r.seed, n as usize)))
        .unwrap_or_default();
    // HTTP/2 takes :scheme and :authority from the URI.
    let mut req = Request::builder()
        .uri(format!("http://web.shop{}", r.path))
        .header("x-echo-body", "1");
    req = match r.len {
        Some(n) => req.method("POST").header("content-length", n),
        None => req.method("GET"),
    };
    let req = req
        .body(Full::new(body.clone()))
        .context("building the request")?;
    let resp = sender.send_request(req).await.context("sending")?;
    let (headers, got) = answer_from(resp, &t.backend).await?;
    let seen = headers
        .get("x-request")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    let seen: Value = serde_json::from_str(seen).context("the backend's x-request header")?;
    ensure!(
        seen["path"] == r.path.as_str(),
        "the backend saw path {}, sent {}",
        seen["path"],
        r.path
    );
    ensure!(
        seen["version"] == "HTTP/2.0",
        "the backend got the request as {}",
        seen["version"]
    );
    compare(&body, &got)?;
    let generation = seen["headers"]["x-soak-gen"]
        .as_str()
        .context("no x-soak-gen header reached the backend (route filter not applied)")?;
    generation
        .parse()
        .with_context(|| format!("x-soak-gen {generation:?}"))
}

async fn connect(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let s = timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .with_context(|| format!("connect to {addr} timed out"))?
        .with_context(|| format!("connect to {addr}"))?;
    s.set_nodelay(true).context("TCP_NODELAY")?;
    Ok(s)
}

async fn http_connect(addr: SocketAddr) -> anyhow::Result<http1::SendRequest<Full<Bytes>>> {
    let io = TokioIo::new(connect(addr).await?);
    let (sender, conn) = http1::handshake(io).await.context("HTTP/1.1 handshake")?;
    // The connection task ends when the connection closes; errors surface on the requests.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Sends one request and verifies the answer; returns the route's `x-soak-gen`.
async fn exchange(
    sender: &mut http1::SendRequest<Full<Bytes>>,
    t: &HttpTarget,
    path: &str,
    post: Option<u64>,
    close: bool,
) -> anyhow::Result<u64> {
    let body = post
        .map(|n| Bytes::from(pattern(n, n as usize)))
        .unwrap_or_default();
    let mut req = Request::builder()
        .method(if post.is_some() { "POST" } else { "GET" })
        .uri(path)
        .header("host", "web.shop")
        .header("content-length", body.len());
    if close {
        req = req.header("connection", "close");
    }
    let req = req.body(Full::new(body)).context("building the request")?;
    let resp = sender.send_request(req).await.context("sending")?;
    let (_, body) = answer_from(resp, &t.backend).await?;
    let echo: Value = serde_json::from_slice(&body).context("the backend's JSON")?;
    ensure!(
        echo["path"] == path,
        "the backend saw path {}, sent {path}",
        echo["path"]
    );
    if let Some(n) = post {
        ensure!(
            echo["body_bytes"].as_u64() == Some(n),
            "the backend read {} body bytes, sent {n}",
            echo["body_bytes"]
        );
    }
    let generation = echo["headers"]["x-soak-gen"]
        .as_str()
        .context("no x-soak-gen header reached the backend (route filter not applied)")?;
    generation
        .parse()
        .with_context(|| format!("x-soak-gen {generation:?}"))
}

/// A response's head and body, checked to be a 200 from `backend` (its `x-backend`).
async fn answer_from(
    resp: hyper::Response<hyper::body::Incoming>,
    backend: &str,
) -> anyhow::Result<(hyper::HeaderMap, Bytes)> {
    let (head, body) = resp.into_parts();
    let body = body.collect().await.context("reading the body")?.to_bytes();
    let answered_by = head
        .headers
        .get("x-backend")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    ensure!(
        head.status == 200,
        "status {} from {answered_by}: {}",
        head.status,
        String::from_utf8_lossy(&body[..body.len().min(200)])
    );
    ensure!(
        answered_by == backend,
        "answered by {answered_by}, expected {backend}"
    );
    Ok((head.headers, body))
}

fn compare(sent: &[u8], got: &[u8]) -> anyhow::Result<()> {
    if sent == got {
        return Ok(());
    }
    let at = sent
        .iter()
        .zip(got)
        .position(|(a, b)| a != b)
        .unwrap_or(sent.len().min(got.len()));
    bail!(
        "echo differs: sent {} B, got {} B, first difference at byte {at}",
        sent.len(),
        got.len()
    )
}

/// xorshift64*: cheap, deterministic per seed.
fn rand(seed: u64) -> u64 {
    let mut x = seed | 1;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// `len` bytes derived from `seed`.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut x = seed;
    while out.len() < len {
        x = rand(x);
        let take = (len - out.len()).min(8);
        out.extend_from_slice(&x.to_le_bytes()[..take]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_bad_ones_are_named() {
        let t = parse_http("http", "web=10.0.0.1:80,/n1,web1").expect("valid");
        assert_eq!(
            (t.addr.port(), t.prefix.as_str(), t.backend.as_str()),
            (80, "/n1", "web1")
        );
        assert!(parse_http("http", "web=10.0.0.1:80,n1,web1").is_err());
        let e = parse_http("h2c", "web=10.0.0.1,/n1,web1").expect_err("no port");
        assert!(format!("{e:#}").contains("--h2c"), "{e:#}");
        assert!(parse_echo("echo=10.0.0.1:7070").is_ok());
        assert!(parse_echo("10.0.0.1:7070").is_err());
    }

    #[test]
    fn patterns_are_deterministic_and_differ_by_seed() {
        assert_eq!(pattern(7, 100), pattern(7, 100));
        assert_ne!(pattern(7, 100), pattern(8, 100));
        assert_eq!(pattern(7, 13).len(), 13);
        assert!(compare(&pattern(1, 10), &pattern(1, 10)).is_ok());
        assert!(compare(&pattern(1, 10), &pattern(1, 9)).is_err());
    }

    #[test]
    fn h2c_requests_mix_gets_small_and_large_posts() {
        let lens: Vec<Option<u64>> = (0..4000)
            .map(|n| H2cRequest::new(String::new(), h2c_seed(7, n / 8, n as usize % 8)).len)
            .collect();
        let large = lens.iter().flatten().filter(|&&n| n > 64 * 1024).count();
        let gets = lens.iter().filter(|n| n.is_none()).count();
        assert!((800..1200).contains(&large), "{large} large of 4000");
        assert!((300..700).contains(&gets), "{gets} GETs of 4000");
        assert!(
            lens.iter()
                .flatten()
                .all(|&n| (1..=H2C_MAX_BYTES).contains(&n))
        );
        let seeds: std::collections::BTreeSet<u64> = (0..64)
            .flat_map(|n| (0..H2C_STREAMS).map(move |i| rand(h2c_seed(7, n, i))))
            .collect();
        assert_eq!(seeds.len(), 64 * H2C_STREAMS, "two requests share a body");
    }
}
