//! `dw`: the operator's CLI. See `dstack::dw` for commands and exit codes.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = dstack::dw::Cli::parse();
    match dstack::dw::run(cli).await {
        Ok(code) => std::process::ExitCode::from(code as u8),
        Err(failure) => {
            eprintln!("dw: {}", failure.message);
            std::process::ExitCode::from(failure.code as u8)
        }
    }
}
