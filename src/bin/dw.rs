//! `dw`: the operator's CLI. See `dstack::dw` for commands and exit codes.

use std::io::Write as _;

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = dstack::dw::Cli::parse();
    match dstack::dw::run(cli).await {
        Ok(code) => std::process::ExitCode::from(code as u8),
        Err(failure) => {
            if !failure.is_quiet() {
                // A closed stderr leaves nothing to report to.
                let _ = writeln!(std::io::stderr(), "dw: {}", failure.message);
            }
            std::process::ExitCode::from(failure.code as u8)
        }
    }
}
