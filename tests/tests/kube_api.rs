//! The API server stand-in on the wire, with a raw HTTP/1.1 client: what the agent's tests
//! rely on it to do (list, chunked watch streams, selectors, 410 Gone, bookmarks,
//! authentication, TokenReview), checked independently of kube-rs.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};
use mesh_tests::kube_api::{self, KubeApi, TokenUser};
use serde_json::{Value, json};

const TOKEN: &str = "t0ken";

fn pod(name: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": "shop", "labels": { "app": name } },
        "spec": { "nodeName": node, "containers": [] },
    })
}

/// A request; returns the connection positioned after the response headers, the status and
/// the headers.
fn send(
    api: &KubeApi,
    method: &str,
    target: &str,
    token: Option<&str>,
    body: &str,
) -> anyhow::Result<(BufReader<TcpStream>, u16, String)> {
    let mut s = TcpStream::connect(api.addr())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {target} HTTP/1.1\r\nhost: kube\r\n{auth}content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut r = BufReader::new(s);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            bail!("connection closed in the headers: {head}");
        }
        if line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("status")?;
    Ok((r, status, head.to_ascii_lowercase()))
}

/// The body of a response with a content-length.
fn body(mut r: BufReader<TcpStream>, head: &str) -> anyhow::Result<Value> {
    if head.contains("transfer-encoding: chunked") {
        let mut text = String::new();
        while let Some(chunk) = next_chunk(&mut r)? {
            text.push_str(&chunk);
        }
        return Ok(serde_json::from_str(&text)?);
    }
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .context("content-length")?
        .trim()
        .parse()?;
    let mut buf = vec![0; len];
    r.read_exact(&mut buf)?;
    Ok(serde_json::from_slice(&buf)?)
}

/// One chunk of a chunked body; None at its end.
fn next_chunk(r: &mut BufReader<TcpStream>) -> anyhow::Result<Option<String>> {
    let mut size = String::new();
    r.read_line(&mut size)?;
    let size = usize::from_str_radix(size.trim(), 16).context("chunk size")?;
    let mut data = vec![0; size + 2];
    r.read_exact(&mut data)?;
    if size == 0 {
        return Ok(None);
    }
    Ok(Some(String::from_utf8_lossy(&data[..size]).into_owned()))
}

/// Watch events (one JSON object per line), read until `n` are in or the stream ends.
fn events(r: &mut BufReader<TcpStream>, n: usize) -> anyhow::Result<Vec<Value>> {
    let mut pending = String::new();
    let mut out = Vec::new();
    while out.len() < n {
        let Some(chunk) = next_chunk(r)? else { break };
        pending.push_str(&chunk);
        while let Some((line, rest)) = pending.split_once('\n') {
            out.push(serde_json::from_str(line)?);
            pending = rest.to_string();
        }
    }
    Ok(out)
}

#[test]
fn lists_watches_and_expires_like_an_api_server() -> anyhow::Result<()> {
    let api = KubeApi::start_plain()?;
    api.require_token(TOKEN);
    api.set_bookmark_interval(Duration::from_millis(200));
    api.apply(pod("a", "n1"))?;
    api.apply(pod("b", "n2"))?;

    // Authentication.
    let (_, status, _) = send(&api, "GET", "/api/v1/pods", None, "")?;
    ensure!(status == 401);

    // A list: current resourceVersion, items without kind/apiVersion, field selector.
    let (r, status, head) = send(
        &api,
        "GET",
        "/api/v1/pods?fieldSelector=spec.nodeName%3Dn1&limit=500",
        Some(TOKEN),
        "",
    )?;
    ensure!(status == 200);
    let list = body(r, &head)?;
    ensure!(list["kind"] == "PodList", "{list}");
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .context("rv")?
        .to_string();
    ensure!(rv == api.resource_version().to_string());
    let items = list["items"].as_array().context("items")?;
    ensure!(items.len() == 1 && items[0]["metadata"]["name"] == "a");
    ensure!(items[0].get("kind").is_none(), "list items carry no kind");
    // An unsupported field selector is a 400, as on a real server.
    let (r, status, head) = send(
        &api,
        "GET",
        "/api/v1/services?fieldSelector=spec.nodeName%3Dn1",
        Some(TOKEN),
        "",
    )?;
    ensure!(status == 400);
    ensure!(body(r, &head)?["reason"] == "BadRequest");

    // A watch from the list's version: a chunked stream; leaving the selection is a DELETED.
    let (mut w, status, head) = send(
        &api,
        "GET",
        &format!(
            "/api/v1/pods?watch=1&resourceVersion={rv}&allowWatchBookmarks=true&fieldSelector=spec.nodeName%3Dn1"
        ),
        Some(TOKEN),
        "",
    )?;
    ensure!(
        status == 200 && head.contains("transfer-encoding: chunked"),
        "{head}"
    );
    api.update(kube_api::PODS, "shop", "a", |p| {
        p["metadata"]["labels"]["v"] = json!("2");
    })?;
    api.update(kube_api::PODS, "shop", "a", |p| {
        p["spec"]["nodeName"] = json!("n2");
    })?;
    // Until both changes and a bookmark (every 200 ms) are in.
    let mut kinds: Vec<String> = Vec::new();
    while kinds.iter().filter(|k| *k != "BOOKMARK").count() < 2
        || !kinds.iter().any(|k| k == "BOOKMARK")
    {
        ensure!(kinds.len() < 100, "{kinds:?}");
        let e = events(&mut w, 1)?;
        let e = e.first().context("the watch ended")?;
        if e["type"] == "BOOKMARK" {
            ensure!(
                e["object"]["metadata"]["resourceVersion"].is_string(),
                "{e}"
            );
        }
        kinds.push(e["type"].as_str().unwrap_or("").to_string());
    }
    let changes: Vec<&String> = kinds.iter().filter(|k| *k != "BOOKMARK").collect();
    ensure!(changes == ["MODIFIED", "DELETED"], "{kinds:?}");

    // Compacted history: resuming from the old version is a 410 ERROR event.
    api.compact();
    let (mut w, status, _) = send(
        &api,
        "GET",
        &format!("/api/v1/pods?watch=1&resourceVersion={rv}"),
        Some(TOKEN),
        "",
    )?;
    ensure!(status == 200);
    let got = events(&mut w, 1)?;
    ensure!(got[0]["type"] == "ERROR", "{got:?}");
    ensure!(got[0]["object"]["code"] == 410 && got[0]["object"]["reason"] == "Expired");
    ensure!(api.expired_watches() == 1);

    // TokenReview.
    api.add_token_review(
        "sa-token",
        TokenUser::service_account("trellis-system", "mesh-agent", "mesh-agent-x", "n1"),
    );
    let review = json!({ "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": { "token": "sa-token" } });
    let (r, status, head) = send(
        &api,
        "POST",
        "/apis/authentication.k8s.io/v1/tokenreviews",
        Some(TOKEN),
        &review.to_string(),
    )?;
    ensure!(status == 201);
    let answer = body(r, &head)?;
    ensure!(answer["status"]["authenticated"] == true, "{answer}");
    ensure!(
        answer["status"]["user"]["username"] == "system:serviceaccount:trellis-system:mesh-agent"
    );
    ensure!(answer["status"]["user"]["extra"]["authentication.kubernetes.io/node-name"][0] == "n1");
    Ok(())
}

#[test]
fn an_outage_refuses_connections_until_the_server_is_back() -> anyhow::Result<()> {
    let api = KubeApi::start_plain()?;
    api.apply(pod("a", "n1"))?;
    let (mut w, _, _) = send(
        &api,
        "GET",
        "/api/v1/pods?watch=true&resourceVersion=0",
        None,
        "",
    )?;
    ensure!(events(&mut w, 1)?[0]["type"] == "ADDED");
    api.stop();
    ensure!(TcpStream::connect(api.addr()).is_err(), "still accepting");
    // The open watch was cut.
    ensure!(events(&mut w, 1).map_or(true, |e| e.is_empty()));
    api.start_again()?;
    let (r, status, head) = send(&api, "GET", "/api/v1/namespaces/shop/pods/a", None, "")?;
    ensure!(status == 200);
    ensure!(body(r, &head)?["metadata"]["name"] == "a");
    Ok(())
}
