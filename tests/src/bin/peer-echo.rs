//! A tiny server for tests and the demo that tells each client who it appears to be.
//!
//! `peer-echo http PORT`: answers every HTTP/1.1 request with `200` and the body
//! `peer=IP:PORT local=IP:PORT`, then closes (so the server side holds TIME_WAIT).
//! `peer-echo tcp PORT`: echoes bytes back until the client closes.
//! Binds 0.0.0.0; prints `listening` on stdout once ready.
use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    thread,
};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (mode, port) = match (args.get(1), args.get(2).and_then(|p| p.parse::<u16>().ok())) {
        (Some(m), Some(p)) if m == "http" || m == "tcp" => (m.clone(), p),
        _ => {
            eprintln!("usage: peer-echo http|tcp PORT");
            std::process::exit(2);
        }
    };
    let listener = match TcpListener::bind(("0.0.0.0", port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("peer-echo: cannot listen on port {port}: {e}");
            std::process::exit(1);
        }
    };
    println!("listening");
    let _ = std::io::stdout().flush();
    for stream in listener.incoming().flatten() {
        let mode = mode.clone();
        thread::spawn(move || {
            let _ = if mode == "http" {
                serve_http(stream)
            } else {
                echo(stream)
            };
        });
    }
}

fn serve_http(mut stream: TcpStream) -> std::io::Result<()> {
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    // Read the request head (bodies are not used by the tests).
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 || request.len() > 64 * 1024 {
            return Ok(());
        }
        request.extend_from_slice(&buf[..n]);
    }
    let body = format!(
        "peer={} local={}\n",
        stream.peer_addr()?,
        stream.local_addr()?
    );
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())?;
    Ok(())
}

fn echo(mut stream: TcpStream) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n])?;
    }
}
