//! A tiny example service for the demo: answers every request with its own
//! name and the path it was asked for, so round robin and the path rewrite
//! are visible with curl.
//!
//! `cargo run --example emitter -- --listen 127.0.0.1:9001 --name vm101`
//!
//! `GET .../liveness_check` answers 200 while healthy;
//! `POST /health/down` and `POST /health/up` flip that, to show watson at work.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use clap::Parser;

/// An example service instance that says who it is.
#[derive(Parser)]
struct Args {
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:9001")]
    listen: SocketAddr,
    /// The name it answers with (the demo uses vm101..vm103).
    #[arg(long, default_value = "vm101")]
    name: String,
}

struct Emitter {
    name: String,
    healthy: AtomicBool,
}

async fn handle(State(me): State<Arc<Emitter>>, req: Request) -> (StatusCode, String) {
    let path = req.uri().path();
    match (req.method().as_str(), path) {
        ("POST", "/health/down") => {
            me.healthy.store(false, Ordering::SeqCst);
            (StatusCode::OK, format!("{} now fails its liveness check\n", me.name))
        }
        ("POST", "/health/up") => {
            me.healthy.store(true, Ordering::SeqCst);
            (StatusCode::OK, format!("{} now passes its liveness check\n", me.name))
        }
        (_, p) if p.ends_with("/liveness_check") => {
            if me.healthy.load(Ordering::SeqCst) {
                (StatusCode::OK, "alive\n".into())
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, "unhealthy\n".into())
            }
        }
        _ => (StatusCode::OK, format!("emitter {} saw {}\n", me.name, req.uri())),
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let me = Arc::new(Emitter { name: args.name, healthy: AtomicBool::new(true) });
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    eprintln!("emitter {} listening on http://{}", me.name, listener.local_addr()?);
    let app = axum::Router::new().fallback(handle).with_state(me);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            tokio::signal::ctrl_c().await.ok();
        })
        .await
}
