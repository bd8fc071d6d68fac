//! A tiny example service that consumes another: it fetches from `emitter`
//! through its local sherlock (http://localhost:8000/emitter/...) and returns
//! the answer upper-cased. Offered through its own watson, it makes a
//! pipeline: client -> sherlock -> transform -> sherlock -> emitter.
//!
//! `cargo run --example transform -- --listen 127.0.0.1:9100 --upstream http://127.0.0.1:8000/emitter`

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use clap::Parser;

/// An example service that transforms what emitter says.
#[derive(Parser)]
struct Args {
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:9100")]
    listen: SocketAddr,
    /// The service it consumes, through the local sherlock.
    #[arg(long, default_value = "http://127.0.0.1:8000/emitter")]
    upstream: String,
}

struct Transform {
    upstream: String,
    http: reqwest::Client,
}

async fn handle(State(me): State<Arc<Transform>>, req: Request) -> (StatusCode, String) {
    let path = req.uri().path();
    if path.ends_with("/liveness_check") {
        return (StatusCode::OK, "alive\n".into());
    }
    // Everything after the transform's own prefix is passed upstream.
    let rest = path.split_once("/transform").map(|(_, r)| r).unwrap_or(path);
    let url = format!("{}{}", me.upstream.trim_end_matches('/'), if rest.is_empty() { "/" } else { rest });
    match me.http.get(&url).send().await {
        Ok(resp) => {
            let status = resp.status();
            let body = resp.text().await.unwrap_or_default();
            (
                StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY),
                format!("transform: {}", body.to_uppercase()),
            )
        }
        Err(e) => (StatusCode::BAD_GATEWAY, format!("transform: cannot reach {url}: {e}\n")),
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let me = Arc::new(Transform { upstream: args.upstream, http: reqwest::Client::new() });
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    eprintln!("transform listening on http://{}, consuming {}", listener.local_addr()?, me.upstream);
    let app = axum::Router::new().fallback(handle).with_state(me);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            tokio::signal::ctrl_c().await.ok();
        })
        .await
}
