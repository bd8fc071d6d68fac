//! Writes the man pages and the bash, zsh and fish completions of the four
//! programs, from the same clap definitions the binaries parse with, so
//! they cannot drift from the flags. `make packages` runs it and packs the
//! output:
//!
//! `cargo run --release --example gen-docs -- target/dist`
//!
//! writes `target/dist/man/NAME.1` (and `dw-SUBCOMMAND.1` for each of dw's
//! subcommands) and `target/dist/completions/{bash,zsh,fish}/`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;

/// Each program's command line, as its binary parses it.
fn programs() -> [clap::Command; 4] {
    [
        dstack::directory::config::Args::command(),
        dstack::watson::config::Args::command(),
        dstack::sherlock::config::Args::command(),
        dstack::dw::Cli::command(),
    ]
}

/// The file name each shell looks a program's completions up by.
fn completion_file(shell: Shell, name: &str) -> String {
    match shell {
        Shell::Zsh => format!("_{name}"),
        Shell::Fish => format!("{name}.fish"),
        _ => name.to_string(),
    }
}

fn generate(out: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let man_dir = out.join("man");
    std::fs::create_dir_all(&man_dir)?;
    for mut cmd in programs() {
        let name = cmd.get_name().to_string();
        // One page per program and per subcommand (dw-route-set.1, ...).
        clap_mangen::generate_to(cmd.clone(), &man_dir)?;
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let dir = out.join("completions").join(shell.to_string());
            std::fs::create_dir_all(&dir)?;
            let path = dir.join(completion_file(shell, &name));
            let mut file = std::fs::File::create(&path)?;
            clap_complete::generate(shell, &mut cmd, &name, &mut file);
            written.push(path);
        }
    }
    for entry in std::fs::read_dir(&man_dir)? {
        written.push(entry?.path());
    }
    written.sort();
    Ok(written)
}

fn main() -> ExitCode {
    let out = PathBuf::from(std::env::args_os().nth(1).unwrap_or_else(|| "target/dist".into()));
    match generate(&out) {
        Ok(written) => {
            for path in written {
                println!("{}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gen-docs: writing to {}: {e}", out.display());
            ExitCode::FAILURE
        }
    }
}
