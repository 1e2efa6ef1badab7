//! End-to-end tests of the outbound L7 proxy's HTTP/2 (h2c, prior knowledge) handling: a raw
//! HTTP/2 client in one pod calls a Service VIP whose port is declared `appProtocol: http2`,
//! a raw HTTP/2 server in another pod answers (both `tests/fixtures/h2_peer.py`, on the
//! Python `h2` library), and each test pushes one corner of RFC 9113 through the agent:
//! flow control with small windows (and the windows of streams dropped half-way), a
//! backend's stream limit, CONTINUATION, trailers, resets, GOAWAY, protocol errors, rapid
//! reset, PING and SETTINGS; and the route features (filters, redirects, faults, timeouts,
//! rate limits, retries) and the agent's drain, over HTTP/2.
//!
//! Every test runs its scenario twice, against a fresh agent each time: with the default
//! settings and with `TRELLIS_H2_FAST_PATH=off` (hyper). So they assert only what RFC 9113
//! mandates or any correct proxy shows, and hold on either path. Every scenario also checks
//! that neither peer's `h2` saw a protocol violation.
//!
//! Need root and a BPF-capable kernel, like every end-to-end test, and `h2` for python3
//! (`cargo xtask setup` installs Debian's python3-h2); they fail, not skip, without them.
use std::{
    fs,
    net::Ipv4Addr,
    process::{Child, Stdio},
    sync::OnceLock,
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};
use mesh_tests::{
    Agent, Background, Node, Pod,
    agent::{field, http_get, message},
    wait_until,
};
use serde_json::{Value, json};

const H2_PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/h2_peer.py");
const APP_PORT: u16 = 8080;
/// The agents each scenario runs against: (name, extra environment).
const PATHS: [(&str, &[(&str, &str)]); 2] = [
    ("default", &[]),
    ("hyper", &[("TRELLIS_H2_FAST_PATH", "off")]),
];

/// A python3 that imports `h2`: the one on PATH, or Debian's own (python3-h2 is installed
/// for it, and PATH may name another Python, e.g. pyenv's).
fn python_with_h2() -> anyhow::Result<&'static str> {
    static FOUND: OnceLock<Option<&'static str>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            ["python3", "/usr/bin/python3"].into_iter().find(|python| {
                std::process::Command::new(python)
                    .args(["-c", "import h2, hpack, hyperframe"])
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
        })
        .context("no python3 imports h2; `cargo xtask setup` installs python3-h2")
}

/// A node with a client pod and a backend pod running the HTTP/2 server, behind a Service
/// VIP whose port 80 is declared `appProtocol: http2`.
struct Peers {
    node: Node,
    client: Pod,
    backend: Pod,
    vip: Ipv4Addr,
    python: &'static str,
    _server: Background,
}

impl Peers {
    fn new() -> anyhow::Result<Self> {
        let python = python_with_h2()?;
        let mut node = Node::new()?;
        let client = node.add_pod("client")?;
        let backend = node.add_pod("h2server")?;
        let mut server = backend.command(python)?;
        server.args([H2_PEER, "server", &APP_PORT.to_string()]);
        let server = Background::spawn_ready(server, "listening")?;
        // An address of the node's own subnet that no pod has: the Service VIP.
        let vip = Ipv4Addr::new(node.subnet[0], node.subnet[1], node.subnet[2], 200);
        Ok(Self {
            node,
            client,
            backend,
            vip,
            python,
            _server: server,
        })
    }

    /// The agent config, then `routes` (YAML: `httpRoutes:` for the Service `shop/h2`).
    fn config(&self, routes: &str) -> String {
        format!(
            "node: {node}\npods:\n{client}  - {{name: {name}, namespace: shop, serviceAccount: backend, ip: {ip}, netns: {netns}, cgroup: {cgroup}, labels: {{app: h2}}}}\nservices:\n  - name: h2\n    namespace: shop\n    vips: [{vip}]\n    selector: {{app: h2}}\n    ports: [{{name: http2, port: 80, targetPort: {APP_PORT}, appProtocol: http2}}]\n{routes}",
            node = self.node.id,
            client = self.client.config_entry("shop", "frontend", true),
            name = self.backend.name,
            ip = self.backend.ip,
            netns = self.backend.netns_path.display(),
            cgroup = self.backend.cgroup.display(),
            vip = self.vip,
        )
    }

    /// Runs the client side of `scenario` in the client pod: its JSON observations.
    fn scenario(&self, scenario: &str) -> anyhow::Result<Value> {
        let out = self
            .client
            .command(self.python)?
            .args([H2_PEER, "client", &self.vip.to_string(), "80", scenario])
            .output()
            .context("running the h2 client")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "the h2 client ({scenario}) failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(&stdout).with_context(|| format!("h2 client output: {stdout}"))
    }
}

/// Runs `scenario` against an agent on each of [`PATHS`] in turn and hands its observations
/// to `check`, after the checks every scenario shares: the backend saw no protocol error and
/// failed no request, the client's `h2` saw no protocol violation, the agent did not panic.
fn on_both_paths(
    test: &str,
    scenario: &str,
    check: impl Fn(&Value, &Agent) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    on_both_paths_with_routes(test, "", scenario, check)
}

/// [`on_both_paths`] with `routes` in the agents' config.
fn on_both_paths_with_routes(
    test: &str,
    routes: &str,
    scenario: &str,
    check: impl Fn(&Value, &Agent) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let peers = Peers::new()?;
    for (path, env) in PATHS {
        let mut agent =
            Agent::start_with_env(&format!("{test}-{path}"), &peers.config(routes), None, env)?;
        let result = peers.scenario(scenario).and_then(|r| {
            no_errors(&r)?;
            check(&r, &agent).with_context(|| format!("observations: {r}"))?;
            served_on(&agent, path)
        });
        result.with_context(|| format!("on the {path} path ({})", agent.log_path.display()))?;
        no_panic(&agent, path)?;
        agent.terminate()?;
    }
    Ok(())
}

/// The backend saw no protocol error and failed no request; the client's `h2` saw no
/// protocol violation.
fn no_errors(r: &Value) -> anyhow::Result<()> {
    ensure!(
        r["server"]["errors"].as_array().is_some_and(Vec::is_empty),
        "the backend saw errors: {}",
        r["server"]["errors"]
    );
    ensure!(
        r.get("client_errors")
            .is_none_or(|e| e.as_array().is_some_and(Vec::is_empty)),
        "the client saw protocol violations: {}",
        r["client_errors"]
    );
    Ok(())
}

/// The agent served its HTTP/2 connections on `path` (of [`PATHS`]), and only there.
fn served_on(agent: &Agent, path: &str) -> anyhow::Result<()> {
    let (fast, hyper) = agent.http2_connections()?;
    match path {
        "default" => ensure!(fast >= 1 && hyper == 0, "fast path {fast}, hyper {hyper}"),
        _ => ensure!(fast == 0 && hyper >= 1, "fast path {fast}, hyper {hyper}"),
    }
    Ok(())
}

fn no_panic(agent: &Agent, path: &str) -> anyhow::Result<()> {
    let log = agent.log_text();
    ensure!(
        !log.contains("panicked"),
        "the agent panicked on the {path} path:\n{log}"
    );
    Ok(())
}

fn is(r: &Value, pointer: &str, expected: Value) -> anyhow::Result<()> {
    let got = r.pointer(pointer).unwrap_or(&Value::Null);
    ensure!(*got == expected, "{pointer}: {got}, expected {expected}");
    Ok(())
}

/// The client connection itself was never sent a GOAWAY.
fn no_goaway(r: &Value) -> anyhow::Result<()> {
    is(r, "/goaway", Value::Null)
}

/// 3 MiB up to a server that advertises 16 KiB stream windows and credits only what it has
/// read, 5 MiB down to a client that advertises 32 KiB and credits 8 KiB at a time, and
/// 1 MiB echoed back as it arrives, on three streams of one connection at once: every byte
/// arrives, in order, and neither peer sees its windows overrun (its `h2` would raise).
#[test]
fn large_bodies_cross_small_flow_control_windows_both_ways() -> anyhow::Result<()> {
    on_both_paths("h2-flow", "flow-control", |r, _| {
        is(r, "/upload/status", json!(200))?;
        is(r, "/upload/server/bytes", json!(3 << 20))?;
        is(
            r,
            "/upload/server/sha256",
            r["upload"]["sent_sha256"].clone(),
        )?;
        is(r, "/download/status", json!(200))?;
        is(r, "/download/ended", json!(true))?;
        is(r, "/download/bytes", json!(5 << 20))?;
        is(
            r,
            "/download/sha256",
            r["download"]["expected_sha256"].clone(),
        )?;
        is(r, "/echo/status", json!(200))?;
        is(r, "/echo/ended", json!(true))?;
        is(r, "/echo/bytes", json!(1 << 20))?;
        is(r, "/echo/sha256", r["echo"]["sent_sha256"].clone())?;
        no_goaway(r)
    })
}

/// 150 streams at once on one client connection to a backend that allows 10 at a time:
/// every one is answered 200 with its own answer, the proxy queueing them (or spreading
/// them over connections). A REFUSED_STREAM that reaches the client is retried by it (RFC
/// 9113 §8.7: the request was not processed); a 5xx or any other reset fails the test.
#[test]
fn more_streams_than_the_backend_allows_all_complete() -> anyhow::Result<()> {
    on_both_paths("h2-streams", "streams", |r, _| {
        is(r, "/warm", json!(200))?;
        is(r, "/failed", json!({}))?;
        is(r, "/ok", json!(150))?;
        no_goaway(r)
    })
}

/// A request whose header block (a 30000-character field: at least 18750 bytes whatever
/// the Huffman coding) cannot fit one frame reaches the server whole, so the proxy sent it
/// as HEADERS + CONTINUATION (mandatory: the server allows 16 KiB frames); 200 request
/// fields plus 50 lines of one repeated field arrive with their values, the repeated one in
/// order; and a response head the server splits into HEADERS + CONTINUATION frames of 3000
/// bytes reaches the client whole.
#[test]
fn header_blocks_in_continuation_frames_arrive_whole() -> anyhow::Result<()> {
    on_both_paths("h2-headers", "headers", |r, _| {
        is(r, "/one/status", json!(200))?;
        is(
            r,
            "/one/big/x-big-request",
            r["one"]["expected_big"].clone(),
        )?;
        ensure!(
            r["one"]["server_continuations"]
                .as_u64()
                .is_some_and(|n| n >= 1),
            "a request header block over the server's frame size came without CONTINUATION"
        );
        is(r, "/one/response_header_intact", json!(true))?;
        is(r, "/many/status", json!(200))?;
        is(r, "/many/fields_intact", json!(true))?;
        is(r, "/many/response_header_intact", json!(true))?;
        no_goaway(r)
    })
}

/// gRPC-shaped exchanges: request trailers after a body, and request trailers with no body
/// at all, reach the server; the server's response trailers (`grpc-status` and friends)
/// after a body, and right after the response head, reach the client.
#[test]
fn trailers_pass_in_both_directions() -> anyhow::Result<()> {
    on_both_paths("h2-trailers", "trailers", |r, _| {
        is(r, "/with_body/status", json!(200))?;
        is(r, "/with_body/ended", json!(true))?;
        is(
            r,
            "/with_body/body",
            json!("\u{0}\u{0}\u{0}\u{0}\u{5}hello"),
        )?;
        is(r, "/with_body/trailers/grpc-status", json!("0"))?;
        is(r, "/with_body/trailers/grpc-message", json!("done"))?;
        is(
            r,
            "/with_body/trailers/x-seen-trailers",
            json!(r#"[["x-checksum", "1234"], ["x-client-trailer", "ct-1"]]"#),
        )?;
        is(r, "/with_body/trailers/x-seen-body", json!("8"))?;
        is(r, "/only_trailers/status", json!(200))?;
        is(r, "/only_trailers/ended", json!(true))?;
        is(r, "/only_trailers/body", json!(""))?;
        is(r, "/only_trailers/trailers/grpc-status", json!("0"))?;
        is(
            r,
            "/only_trailers/trailers/x-seen-trailers",
            json!(r#"[["x-client-trailer", "ct-2"]]"#),
        )?;
        is(r, "/only_trailers/trailers/x-seen-body", json!("0"))?;
        no_goaway(r)
    })
}

/// A client's RST_STREAM(CANCEL) of a streaming response, and of an upload half-way, ends
/// the server's stream too (reset, or its connection closed); a server's RST_STREAM before
/// any response reaches the client as a 5xx or a reset of that stream. After each, the
/// same client connection serves the next request.
#[test]
fn resets_from_either_side_end_only_their_stream() -> anyhow::Result<()> {
    on_both_paths("h2-resets", "resets", |r, _| {
        ensure!(
            r["streamed_before_cancel"]
                .as_u64()
                .is_some_and(|n| n >= 4096),
            "the stream never flowed"
        );
        for key in ["server_saw", "server_saw_upload"] {
            let outcome = r[key]["outcome"].as_str().unwrap_or("");
            ensure!(
                outcome == "reset" || outcome == "closed",
                "{key}: the server's stream was not ended by the client's cancel: {}",
                r[key]
            );
        }
        is(r, "/after_cancel", json!(200))?;
        is(r, "/after_upload_cancel", json!(200))?;
        let answer = &r["server_reset"];
        ensure!(
            answer["status"]
                .as_u64()
                .is_some_and(|s| (500..600).contains(&s))
                || !answer["reset"].is_null(),
            "a stream the server reset got {answer}"
        );
        is(r, "/after_server_reset", json!(200))?;
        no_goaway(r)
    })
}

/// The server answers a request, sends GOAWAY(NO_ERROR) naming that stream the last, and
/// closes: the answer reaches the client, and the client's next requests on the same
/// connection are served (on a new upstream connection). Three times over.
#[test]
fn a_backend_goaway_moves_the_next_requests_to_a_new_connection() -> anyhow::Result<()> {
    on_both_paths("h2-goaway", "goaway", |r, _| {
        let rounds = r["rounds"].as_array().context("rounds")?;
        ensure!(rounds.len() == 3, "{} rounds", rounds.len());
        for round in rounds {
            let last = &round["goaway_response"];
            ensure!(
                last[0] == 200 && last[1] == "goodbye",
                "the answer sent with the GOAWAY: {last}"
            );
            for following in round["following"].as_array().context("following")? {
                ensure!(
                    following[0] == 200 && following[1] != last[2],
                    "a request after the backend's GOAWAY: {following} (the GOAWAY came on connection {})",
                    last[2]
                );
            }
        }
        no_goaway(r)
    })
}

/// Connection errors from the client (RFC 9113 names each a connection error): the agent
/// closes that connection, with a GOAWAY whose code is an error if it sends one, and keeps
/// serving a new connection and a connection that was open throughout.
#[test]
fn client_protocol_errors_close_only_the_offending_connection() -> anyhow::Result<()> {
    on_both_paths("h2-errors", "protocol-errors", |r, _| {
        is(r, "/before", json!(200))?;
        let cases = r["cases"].as_object().context("cases")?;
        ensure!(cases.len() == 14, "{} cases", cases.len());
        for (name, case) in cases {
            ensure!(
                case["closed"] == true,
                "{name}: the connection stayed open: {case}"
            );
            if let Some(last) = case["goaways"].as_array().and_then(|g| g.last()) {
                ensure!(
                    last != "NO_ERROR",
                    "{name}: GOAWAY without an error: {case}"
                );
            }
            ensure!(
                case["fresh_connection_after"] == 200,
                "{name}: a new connection afterwards: {case}"
            );
            ensure!(
                case["bystander_after"] == 200,
                "{name}: the connection open meanwhile: {case}"
            );
        }
        is(r, "/bystander_after", json!(200))?;
        is(r, "/bystander_goaway", Value::Null)
    })
}

/// 2000 streams opened and reset at once (CVE-2023-44487's pattern) on one connection:
/// the agent either closes that connection, with GOAWAY(ENHANCE_YOUR_CALM or PROTOCOL_ERROR)
/// if any, or keeps serving it; either way it stays up and serves a new connection.
#[test]
fn a_rapid_reset_flood_leaves_the_agent_serving() -> anyhow::Result<()> {
    let backend_before = std::cell::Cell::new(0);
    on_both_paths("h2-rapid", "rapid-reset", |r, agent| {
        let saw = r["backend_saw"].as_u64().unwrap_or(0);
        eprintln!(
            "rapid reset: streams reset {}, GOAWAY {}, closed {}, same connection after {}, requests reaching the backend {}",
            r["streams_reset"],
            r["goaway"],
            r["closed"],
            r["same_connection_after"],
            saw - backend_before.replace(saw)
        );
        let (status, _) = http_get(agent.admin_addr()?, "/healthz")?;
        ensure!(status == 200, "the agent's /healthz answered {status}");
        is(r, "/fresh_connection_after", json!(200))?;
        match r["goaway"][0].as_str() {
            Some("ENHANCE_YOUR_CALM" | "PROTOCOL_ERROR") => Ok(()),
            Some(other) => bail!("the flooding connection got GOAWAY({other})"),
            None if r["closed"] == true => Ok(()),
            None => is(r, "/same_connection_after/status", json!(200)),
        }
    })
}

/// The agent's first frame is SETTINGS (the server preface); three PINGs, one while a
/// request is in flight, each get a PING ACK with the same payload; a SETTINGS with a value
/// and an empty one each get an ACK; the request in flight completes.
#[test]
fn ping_and_settings_are_acknowledged() -> anyhow::Result<()> {
    on_both_paths("h2-ping", "ping-settings", |r, _| {
        is(r, "/first_frame", json!(4))?;
        is(r, "/ping_acks_match", json!(true))?;
        is(r, "/settings_acked", json!(2))?;
        is(r, "/in_flight/status", json!(200))?;
        no_goaway(r)
    })
}

/// Routes on the Service: a rule per feature, each on a path of its own; `/plain`, `/stats`
/// and `/report` (the fixture's own) go straight to the backend, every other path matches
/// nothing.
const ROUTES: &str = "\
httpRoutes:
  - name: h2-routes
    namespace: shop
    parentRefs: [{name: h2, port: 80}]
    rules:
      - matches: [{path: {type: PathPrefix, value: /filtered}}]
        filters:
          - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-set, value: by-route}], add: [{name: x-routed, value: filters}], remove: [x-drop-me]}}
          - {type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: x-served-by, value: mesh}], remove: [x-from-backend]}}
      - matches: [{path: {type: Exact, value: /old}}]
        filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /new}, statusCode: 301}}]
      - matches: [{path: {type: PathPrefix, value: /teapot}}]
        fault: {abort: {httpStatus: 418, percentage: 100}}
      - matches: [{path: {type: PathPrefix, value: /delayed}}]
        fault: {delay: {fixedDelay: 400ms, percentage: 100}}
      - matches: [{path: {type: PathPrefix, value: /late-teapot}}]
        fault: {delay: {fixedDelay: 400ms, percentage: 100}, abort: {httpStatus: 503, percentage: 100}}
      - matches: [{path: {type: PathPrefix, value: /hold}}]
        timeouts: {request: 300ms}
      - matches: [{path: {type: PathPrefix, value: /slow}}]
        filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /hold}}}]
        timeouts: {backendRequest: 300ms}
      - matches: [{path: {type: PathPrefix, value: /limited}}]
        rateLimit: {requestsPerSecond: 1, burst: 3}
      - matches: [{path: {type: PathPrefix, value: /plain}}, {path: {type: Exact, value: /stats}}, {path: {type: Exact, value: /report}}]
";

/// The header the agent flags its own answers with.
const RESPONSE_FLAGS: &str = "x-trellis-response-flags";

/// A local answer: `status`, flagged `flags`.
fn answered_locally(answer: &Value, status: u16, flags: &str) -> anyhow::Result<()> {
    ensure!(
        answer["status"] == status && answer["headers"][RESPONSE_FLAGS] == flags,
        "expected {status} {flags}: {answer}"
    );
    Ok(())
}

/// On one HTTP/2 connection, each stream through a rule of [`ROUTES`]: the backend sees
/// the request header filter's work (a field set, one added, one removed) and the rewritten
/// path, the client the response header filter's (one added, the backend's removed; a rule
/// without filters passes that one); `/old?x=1` is redirected (301 to
/// `http://VIP/new?x=1`); an abort fault answers 418 `FI` and a delay fault answers no
/// sooner than its 400 ms; a request timeout and a backend request timeout of 300 ms answer
/// 504 `UT` to requests the backend holds 3 s, and the backend's stream is reset (or its
/// connection closed); a burst of 12 at a rule allowing 3 at once and 1 a second gets its
/// 3 (plus one a second) 200s and the rest 429 `RL`; a path no rule matches gets 404 `NR`.
/// The requests the agent answered itself never reached the backend; the connection serves
/// a request afterwards and never gets a GOAWAY.
#[test]
fn route_filters_redirects_faults_timeouts_and_rate_limits_apply_to_http2_streams()
-> anyhow::Result<()> {
    on_both_paths_with_routes("h2-routes", ROUTES, "routes", |r, _| {
        let filtered = &r["filtered"];
        is(filtered, "/status", json!(200))?;
        let saw = &filtered["backend_saw"];
        ensure!(
            saw["path"] == "/filtered/items" && saw["query"] == "id=7",
            "the backend saw {saw}"
        );
        let headers = &saw["headers"];
        ensure!(
            headers["x-routed"] == "filters"
                && headers["x-set"] == "by-route"
                && headers.get("x-drop-me").is_none(),
            "the request header filter: the backend saw {headers}"
        );
        let head = &filtered["headers"];
        ensure!(
            head["x-served-by"] == "mesh" && head.get("x-from-backend").is_none(),
            "the response header filter: the client saw {head}"
        );
        is(r, "/plain/status", json!(200))?;
        is(r, "/plain/headers/x-from-backend", json!("h2server"))?;
        is(r, "/plain/headers/x-served-by", Value::Null)?;

        is(r, "/redirect/status", json!(301))?;
        let authority = r["authority"].as_str().context("authority")?;
        is(
            r,
            "/redirect/headers/location",
            json!(format!("http://{authority}/new?x=1")),
        )?;

        answered_locally(&r["abort"], 418, "FI")?;
        // A rule with both faults delays, then aborts (as Envoy does).
        answered_locally(&r["late_abort"], 503, "FI")?;
        ensure!(
            r["late_abort"]["head_ms"].as_f64() >= Some(400.0),
            "a 400 ms delay before an abort answered after {} ms",
            r["late_abort"]["head_ms"]
        );

        is(r, "/delay/status", json!(200))?;
        is(r, "/delay/backend_saw/path", json!("/delayed"))?;
        let waited = r["delay"]["head_ms"].as_f64().context("head_ms")?;
        ensure!(
            waited >= 400.0,
            "a 400 ms fault delay answered after {waited} ms"
        );

        for key in ["timeout_request", "timeout_backend"] {
            let answer = &r[key];
            answered_locally(answer, 504, "UT").with_context(|| key.to_string())?;
            let seen = &answer["backend_stream"];
            ensure!(
                !seen.is_null(),
                "{key}: the request never reached the backend within its 300 ms"
            );
            let outcome = seen["outcome"].as_str().unwrap_or("");
            ensure!(
                outcome == "reset" || outcome == "closed",
                "{key}: the backend's stream was not cancelled after the timeout: {seen}"
            );
        }

        let limited = &r["rate_limit"];
        let answers = limited["answers"].as_array().context("answers")?;
        let ok = answers.iter().filter(|a| a[0] == 200).count() as u64;
        let refused = answers
            .iter()
            .filter(|a| a[0] == 429 && a[1] == "RL")
            .count() as u64;
        ensure!(
            ok + refused == answers.len() as u64,
            "a rate-limited request got another answer: {limited}"
        );
        // The burst of 3, plus one a second while the burst ran (however slow the machine).
        let refilled = limited["elapsed_s"].as_f64().unwrap_or(0.0).ceil() as u64 + 1;
        ensure!(
            ok >= 3 && ok <= 3 + refilled && refused >= 1,
            "{ok} of {} passed the rate limit: {limited}",
            answers.len()
        );

        answered_locally(&r["no_route"], 404, "NR")?;

        let reached = &r["backend_requests"];
        for path in ["/teapot", "/late-teapot", "/old", "/new", "/nowhere"] {
            ensure!(
                reached[path].as_u64().unwrap_or(0) == 0,
                "{path} reached the backend: {reached}"
            );
        }
        // `/hold` twice: the request timeout's, and the backend request timeout's (rewritten
        // from `/slow`).
        for (path, expected) in [("/limited", ok), ("/delayed", 1), ("/hold", 2)] {
            ensure!(
                reached[path] == expected,
                "{path} reached the backend {} times, expected {expected}: {reached}",
                reached[path]
            );
        }

        is(r, "/after", json!(200))?;
        no_goaway(r)
    })
}

/// Retry rules on the Service: `/flaky` (503 to a tag's first 2 requests) and `/always-503`
/// retry a 503 up to 3 times; `/slow-first` (holds a tag's first request 3 s) gives each
/// attempt 300 ms; `/plain`, `/stats` and `/report` go straight to the backend.
const RETRY_ROUTES: &str = "\
httpRoutes:
  - name: h2-retries
    namespace: shop
    parentRefs: [{name: h2, port: 80}]
    rules:
      - matches: [{path: {type: PathPrefix, value: /flaky}}, {path: {type: Exact, value: /always-503}}]
        retry: {attempts: 3, codes: [503], backoff: 10ms}
      - matches: [{path: {type: Exact, value: /slow-first}}]
        retry: {attempts: 2, codes: [503], perTryTimeout: 300ms}
      - matches: [{path: {type: PathPrefix, value: /plain}}, {path: {type: Exact, value: /stats}}, {path: {type: Exact, value: /report}}]
";

/// The requests the backend saw for one case: each one's record (see `h2_peer.py`'s
/// `/flaky`), `expected` of them.
fn attempts<'r>(r: &'r Value, case: &str, expected: usize) -> anyhow::Result<&'r Vec<Value>> {
    let saw = r[case]["backend_saw"]
        .as_array()
        .with_context(|| format!("{case}: backend_saw"))?;
    ensure!(
        saw.len() == expected,
        "{case}: the backend saw {} requests, expected {expected}: {saw:?}",
        saw.len()
    );
    Ok(saw)
}

/// The client got the backend's own answer to its `attempt`th request with `status` (not
/// one the agent made up, nor an earlier attempt's).
fn backend_answered(r: &Value, case: &str, status: u16, attempt: u32) -> anyhow::Result<()> {
    let answer = &r[case];
    let head = &answer["headers"];
    ensure!(
        answer["status"] == status
            && answer["ended"] == true
            && head["x-from-backend"] == "h2server"
            && head["x-attempt"].as_str().and_then(|a| a.parse().ok()) == Some(attempt)
            && head.get(RESPONSE_FLAGS).is_none(),
        "{case}: expected the backend's {status} to request {attempt}: {answer}"
    );
    Ok(())
}

/// On one HTTP/2 connection, at once: five GETs to `/flaky`, with tags of their own, each
/// get the backend's 200 to their third request, and the backend saw exactly 3 per tag (two
/// 503s, then the 200); a POST of 20 KB with its `content-length` to `/flaky` gets the same,
/// and each of its three requests carried the whole body (length and sha256); a GET to
/// `/always-503` gets the backend's 503 (not the agent's: the backend's header, no response
/// flags) to its fourth request, after exactly 1 + 3 requests; a GET to `/slow-first`, whose
/// first request the backend holds 3 s, gets 200 from the second, 300 ms later, the first
/// reset (or its connection closed); a POST of the same body without `content-length` may
/// not be sent again, so it gets the backend's 503 to its only request, which carried the
/// whole body. The connection serves a request afterwards and never gets a GOAWAY. A retried
/// answer never reaches the client (its `h2` would raise on a second response head).
#[test]
fn retries_turn_a_flaky_http2_backend_into_success() -> anyhow::Result<()> {
    on_both_paths_with_routes("h2-retries", RETRY_ROUTES, "retries", |r, _| {
        is(r, "/warm", json!(200))?;
        let sent = r["sent_sha256"].clone();
        for case in (0..5).map(|i| format!("flaky_{i}")).chain(["post".into()]) {
            backend_answered(r, &case, 200, 3)?;
            let statuses: Vec<_> = attempts(r, &case, 3)?
                .iter()
                .map(|a| a["outcome"].clone())
                .collect();
            ensure!(
                statuses == [json!(503), json!(503), json!(200)],
                "{case}: the backend answered {statuses:?}"
            );
        }
        for (i, attempt) in attempts(r, "post", 3)?.iter().enumerate() {
            ensure!(
                attempt["method"] == "POST"
                    && attempt["content_length"] == "20000"
                    && attempt["bytes"] == 20_000
                    && attempt["sha256"] == sent,
                "post: request {} did not carry the whole body: {attempt}",
                i + 1
            );
        }

        backend_answered(r, "exhausted", 503, 4)?;
        attempts(r, "exhausted", 4)?;

        backend_answered(r, "slow_first", 200, 2)?;
        let slow = attempts(r, "slow_first", 2)?;
        let first = slow[0]["outcome"].as_str().unwrap_or("");
        ensure!(
            first == "reset" || first == "closed",
            "slow_first: the request held past its 300 ms was not cancelled: {}",
            slow[0]
        );
        is(&slow[1], "/outcome", json!("answered"))?;

        backend_answered(r, "streamed", 503, 1)?;
        let only = &attempts(r, "streamed", 1)?[0];
        ensure!(
            only["bytes"] == 20_000 && only["sha256"] == sent,
            "streamed: the request did not carry the whole body: {only}"
        );

        is(r, "/after", json!(200))?;
        no_goaway(r)
    })
}

/// Routes for [`flow_control_windows_survive_requests_the_agent_answers_or_the_backend_resets`]:
/// `/late-abort` is delayed 300 ms, then answered 503 by the agent; every other path goes
/// to the backend.
const WINDOW_ROUTES: &str = "\
httpRoutes:
  - name: h2-windows
    namespace: shop
    parentRefs: [{name: h2, port: 80}]
    rules:
      - matches: [{path: {type: PathPrefix, value: /late-abort}}]
        fault: {delay: {fixedDelay: 300ms, percentage: 100}, abort: {httpStatus: 503, percentage: 100}}
      - matches: [{path: {type: PathPrefix, value: /}}]
";

/// What a proxy holds of a stream it then drops still counts against its connection's
/// flow-control window, and must be given back; and a stream it stops forwarding must end
/// upstream too. Each case on a client connection of its own:
/// - the agent answers requests whose bodies it holds: six POSTs of 1 MiB (the agent's
///   stream window lets each go whole) to `/late-abort` arrive while the fault delays them,
///   and get the agent's 503 `FI` without reaching the backend; then 3 MiB uploaded on the
///   same connection (had the bodies of the aborted requests not been credited back, the
///   client's connection window would be spent) reach the backend whole (length and
///   sha256), within 20 s;
/// - the backend resets responses the agent holds: ten times over, the backend sends a head
///   and 512 KiB to a client that advertises 16 KiB stream windows and never credits those
///   streams, then RST_STREAM(CANCEL), 5 MiB in all (more than a 4 MiB upstream connection
///   window); the backend could send each 512 KiB (within 5 s), and then 5 MiB downloaded on
///   the same connection arrive whole, within 20 s;
/// - the backend answers a head-only 403 while the request body still flows (64 KiB of a
///   declared 1 MiB sent, then nothing): the client gets the 403, and the backend's stream
///   ends once the client's does: reset (or its connection closed) within 3 s, or, the
///   agent letting the request go on, ended with the whole body the client then sends.
///
/// Then, every client connection still open, the backend holds no stream open (10 s for
/// them to close), and no connection got a GOAWAY.
#[test]
fn flow_control_windows_survive_requests_the_agent_answers_or_the_backend_resets()
-> anyhow::Result<()> {
    const MIB: u64 = 1 << 20;
    on_both_paths_with_routes("h2-windows", WINDOW_ROUTES, "windows", |r, _| {
        let aborts = &r["aborts"];
        is(aborts, "/warm", json!(200))?;
        ensure!(
            aborts["send_windows"][0].as_u64() >= Some(MIB),
            "the agent's windows [stream, connection] let no 1 MiB body go at once: {}",
            aborts["send_windows"]
        );
        let aborted = aborts["aborted"].as_array().context("aborted")?;
        ensure!(aborted.len() == 6, "{} aborted uploads", aborted.len());
        for (i, answer) in aborted.iter().enumerate() {
            answered_locally(answer, 503, "FI").with_context(|| format!("aborted upload {i}"))?;
        }
        let upload = &aborts["upload"];
        ensure!(
            upload["gave_up"].is_null(),
            "the 3 MiB upload after the aborted ones did not complete (the connection window \
             stayed shut?): {upload}"
        );
        is(upload, "/status", json!(200))?;
        is(upload, "/server/bytes", json!(3 * MIB))?;
        is(upload, "/server/sha256", upload["sent_sha256"].clone())?;
        is(aborts, "/goaway", Value::Null)?;
        ensure!(
            r["backend_requests"]["/late-abort"].as_u64().unwrap_or(0) == 0,
            "/late-abort reached the backend: {}",
            r["backend_requests"]
        );

        let resets = &r["resets"];
        is(resets, "/warm", json!(200))?;
        let rounds = resets["resets"].as_array().context("resets")?;
        ensure!(rounds.len() == 10, "{} reset responses", rounds.len());
        for (i, round) in rounds.iter().enumerate() {
            let backend = &round["backend"];
            ensure!(
                backend["outcome"] == "reset sent" && backend["sent"] == 512 * 1024,
                "reset response {i}: the backend could not send its 512 KiB and reset (the \
                 agent's upstream connection window shut?): {backend}"
            );
        }
        let download = &resets["download"];
        ensure!(
            download["gave_up"].is_null(),
            "the 5 MiB download after the reset responses did not complete (the upstream \
             connection window stayed shut?): {download}"
        );
        is(download, "/status", json!(200))?;
        is(download, "/ended", json!(true))?;
        is(download, "/bytes", json!(5 * MIB))?;
        is(download, "/sha256", download["expected_sha256"].clone())?;
        is(resets, "/goaway", Value::Null)?;

        let early = &r["early"];
        is(early, "/warm", json!(200))?;
        is(early, "/answer/status", json!(403))?;
        is(early, "/answer/ended", json!(true))?;
        is(early, "/answer/headers/x-from-backend", json!("h2server"))?;
        let backend = &early["backend"];
        match backend["outcome"].as_str().unwrap_or("") {
            "reset" | "closed" => {}
            "ended" => ensure!(
                backend["body_bytes"] == MIB,
                "the backend's stream ended without the whole request body: {backend}"
            ),
            _ => bail!(
                "the backend's stream stayed open after its head-only 403 (the client's \
                 request {}): {backend}",
                if early["body_finished"] == true {
                    "ended"
                } else {
                    "reset, or waiting for more of its body"
                }
            ),
        }
        is(early, "/goaway", Value::Null)?;

        ensure!(
            r["backend_open_streams"] == 0,
            "the backend still holds {} streams open",
            r["backend_open_streams"]
        );
        no_goaway(r)
    })
}

/// A child process killed (and reaped) if the test ends before it does.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A client holds an HTTP/2 connection with a stream in flight (the backend holds its
/// answer) when a successor agent takes the pods over: the old agent sends that connection
/// GOAWAY(NO_ERROR), naming a last stream no lower than the one in flight, while the stream
/// is still open; the stream, released after the GOAWAY from a new connection, then
/// completes with 200 and its whole 256 KiB body; the old agent closes the connection and,
/// with nothing left, exits by itself; new connections are served, by the new agent.
#[test]
fn a_draining_agent_sends_goaway_and_finishes_the_streams_in_flight() -> anyhow::Result<()> {
    let peers = Peers::new()?;
    for (path, env) in PATHS {
        let mut old =
            Agent::start_with_env(&format!("h2-drain-{path}"), &peers.config(""), None, env)?;
        let progress = old.dir().join("drain-progress.json");
        let output = old.dir().join("drain-output.json");
        let client = peers
            .client
            .command(peers.python)?
            .args([H2_PEER, "client", &peers.vip.to_string(), "80", "drain"])
            .arg(&progress)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&output)?)
            .spawn()
            .context("starting the h2 client")?;
        let mut client = Reaped(client);
        let on_path = |what: &str| format!("on the {path} path: {what}");
        wait_until(
            &on_path("the backend holding the stream"),
            Duration::from_secs(60),
            || {
                let state: Value =
                    serde_json::from_str(&fs::read_to_string(&progress).ok()?).ok()?;
                (state["holding"] == true).then_some(())
            },
        )?;
        // The old agent's metrics go away with the handover: the path is checked now.
        served_on(&old, path).with_context(|| on_path("the old agent"))?;

        let mut new = old.start_successor()?;
        old.wait_for_event("the old agent to hand over", |e| {
            message(e) == "handed over to the new agent; draining open connections"
        })?;
        let status = wait_until(&on_path("the h2 client"), Duration::from_secs(180), || {
            client.0.try_wait().ok().flatten()
        })?;
        let stdout = fs::read_to_string(&output)?;
        ensure!(
            status.success(),
            "{}",
            on_path(&format!("the h2 client failed: {stdout}"))
        );
        let r: Value = serde_json::from_str(&stdout)
            .with_context(|| on_path(&format!("h2 client output: {stdout}")))?;
        let checked = no_errors(&r).and_then(|()| {
            is(&r, "/warm", json!(200))?;
            is(&r, "/server_holding/outcome", json!("holding"))?;
            let held = r["held_stream"].as_u64().context("held_stream")?;
            ensure!(
                r["goaways_before_release"]
                    .as_array()
                    .is_some_and(|g| !g.is_empty()),
                "no GOAWAY came on the drained connection"
            );
            // Every GOAWAY (hyper sends two: 2^31-1 first, RFC 9113 §6.8) is NO_ERROR and
            // lets the stream in flight complete.
            for goaway in r["goaways"].as_array().context("goaways")? {
                ensure!(
                    goaway[0] == "NO_ERROR" && goaway[1].as_u64().is_some_and(|id| id >= held),
                    "GOAWAY {goaway} on a connection with stream {held} in flight"
                );
            }
            is(&r, "/held_before_release/status", Value::Null)?;
            is(&r, "/held_before_release/reset", Value::Null)?;
            is(&r, "/release", json!(200))?;
            is(&r, "/held/status", json!(200))?;
            is(&r, "/held/ended", json!(true))?;
            is(&r, "/held/bytes", json!(256 * 1024))?;
            is(&r, "/held/sha256", r["held"]["expected_sha256"].clone())?;
            is(&r, "/closed_after", json!(true))?;
            is(&r, "/fresh_connection_after", json!(200))
        });
        checked.with_context(|| on_path(&format!("observations: {r}")))?;

        let exit = old.wait_exit(Duration::from_secs(90))?;
        ensure!(
            exit.success()
                && old.count_events(|e| message(e) == "drained: no connections left") == 1,
            "{}",
            on_path(&format!(
                "the old agent did not drain cleanly ({exit}):\n{}",
                old.log_text()
            ))
        );
        for request in ["/release", "/after-drain"] {
            new.wait_for_event(&on_path(&format!("{request} through the new agent")), |e| {
                message(e) == "http request" && field(e, "path") == request
            })?;
        }
        served_on(&new, path).with_context(|| on_path("the new agent"))?;
        no_panic(&old, path)?;
        no_panic(&new, path)?;
        new.terminate()?;
    }
    Ok(())
}

/// An upstream that accepts connections but never speaks HTTP/2 (no SETTINGS): the fast
/// path gives the connection up after its 10 s handshake limit and answers the request
/// that waited for it 503 `UF`, where it would otherwise wait as long as the client does
/// (this route has no timeout). Fast path only: hyper's client waits for such a server.
#[test]
fn an_upstream_that_never_sends_settings_is_given_up() -> anyhow::Result<()> {
    const SILENT_PORT: u16 = 9099;
    let peers = Peers::new()?;
    let mut silent = peers.backend.command(peers.python)?;
    silent.args([
        "-c",
        &format!(
            "import socket\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(('0.0.0.0', {SILENT_PORT}))\ns.listen(16)\nprint('listening', flush=True)\nheld = []\nwhile True:\n    held.append(s.accept())\n"
        ),
    ]);
    let _silent = Background::spawn_ready(silent, "listening")?;
    let vip = Ipv4Addr::new(
        peers.node.subnet[0],
        peers.node.subnet[1],
        peers.node.subnet[2],
        201,
    );
    let silent_service = format!(
        "  - name: silent\n    namespace: shop\n    vips: [{vip}]\n    selector: {{app: h2}}\n    ports: [{{name: http2, port: 80, targetPort: {SILENT_PORT}, appProtocol: http2}}]\n"
    );
    let _agent = Agent::start_with_env("h2-silent", &peers.config(&silent_service), None, &[])?;
    let out = peers
        .client
        .command("curl")?
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-D",
            "-",
            "--http2-prior-knowledge",
            "--max-time",
            "40",
            &format!("http://{vip}/"),
        ])
        .output()
        .context("running curl")?;
    let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    ensure!(
        head.starts_with("http/2 503") && head.contains("x-trellis-response-flags: uf"),
        "expected 503 UF for an upstream that never sent SETTINGS, got: {head:?} (curl exit {})",
        out.status
    );
    Ok(())
}
