//! A benchmark baseline, not part of the gateway: the cheapest reverse proxy the fixed
//! stack (tokio + hyper on both sides) can be, so that `bench/run.sh` can show how much of
//! the gateway's CPU per request is the stack's own floor and how much is the gateway's work.
//!
//! It does nothing but forward: one current-thread runtime per thread, each accepting on the
//! same listening socket and holding its own pooled hyper client (so a request and its
//! upstream call stay on one thread, as in the gateway), every request sent as it came to
//! `UPSTREAM` with its body streamed both ways. No routing, auth, limits, metrics, logs or
//! ledger; no error handling beyond a 502.
//!
//! Usage: `cargo run --release --example hyper_floor -- LISTEN_ADDR UPSTREAM_HOST:PORT [THREADS]`

use std::net::SocketAddr;

use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

type Body = BoxBody<Bytes, hyper::Error>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: hyper_floor LISTEN_ADDR UPSTREAM_HOST:PORT [THREADS]";
    let listen: SocketAddr = args.next().ok_or(usage)?.parse()?;
    let upstream = args.next().ok_or(usage)?;
    let threads: usize = match args.next() {
        Some(n) => n.parse()?,
        None => std::thread::available_parallelism().map_or(1, usize::from),
    };
    let listener = std::net::TcpListener::bind(listen)?;
    listener.set_nonblocking(true)?;
    let mut handles = Vec::new();
    for _ in 0..threads {
        let listener = listener.try_clone()?;
        let upstream = upstream.clone();
        handles.push(std::thread::spawn(move || serve(listener, upstream)));
    }
    for h in handles {
        h.join().map_err(|_| "a proxy thread panicked")??;
    }
    Ok(())
}

fn serve(listener: std::net::TcpListener, upstream: String) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client: Client<HttpConnector, Incoming> =
            Client::builder(TokioExecutor::new()).build(connector);
        // Connections are tracked as the gateway's are (no detached tasks); the floor never
        // drains them: it is killed when the benchmark is done.
        let tasks = tokio_util::task::TaskTracker::new();
        loop {
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            let client = client.clone();
            let upstream = upstream.clone();
            tasks.spawn(async move {
                let service = service_fn(move |req| forward(client.clone(), upstream.clone(), req));
                // A connection that fails only ends itself.
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

async fn forward(
    client: Client<HttpConnector, Incoming>,
    upstream: String,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let uri = format!("http://{upstream}{path}").parse::<Uri>();
    let answer = match uri {
        Ok(uri) => {
            parts.uri = uri;
            client.request(Request::from_parts(parts, body)).await.ok()
        }
        Err(_) => None,
    };
    Ok(match answer {
        Some(resp) => resp.map(BodyExt::boxed),
        None => {
            let mut resp = Response::new(
                Full::new(Bytes::from_static(b"bad gateway"))
                    .map_err(|e| match e {})
                    .boxed(),
            );
            *resp.status_mut() = StatusCode::BAD_GATEWAY;
            resp
        }
    })
}
