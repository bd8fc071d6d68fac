//! dw's standard output. Every command prints through [`line`] and [`text`],
//! never `println!`: when the reader goes away (`dw route list | head -1`),
//! `println!` panics on the broken pipe, while these end dw quietly with
//! exit 0, as ripgrep does.

use std::fmt::Display;
use std::io::{ErrorKind, Write};

use super::Failure;

/// Writes `text` and a newline to stdout.
pub fn line(text: impl Display) -> Result<(), Failure> {
    write_to(&mut std::io::stdout().lock(), format_args!("{text}\n"))
}

/// Writes `text` to stdout as it is (a table that ends in its own newline,
/// or a progress line that `\r` rewrites).
pub fn text(text: impl Display) -> Result<(), Failure> {
    write_to(&mut std::io::stdout().lock(), format_args!("{text}"))
}

/// Progress of a change already under way (`dw apply` after its commit,
/// `dw rollback` after its revert): a closed stdout must not stop a push
/// half done, so any write error is ignored and the change goes on to its
/// real exit code.
pub fn progress(text: impl Display) {
    let _ = write_to(&mut std::io::stdout().lock(), format_args!("{text}"));
}

/// Writes and flushes, so that a closed pipe is found here and not in the
/// flush at exit; a broken pipe becomes [`Failure::stdout_closed`].
fn write_to(out: &mut impl Write, args: std::fmt::Arguments) -> Result<(), Failure> {
    out.write_fmt(args).and_then(|()| out.flush()).map_err(|e| match e.kind() {
        ErrorKind::BrokenPipe => Failure::stdout_closed(),
        _ => Failure::error(format!("writing to stdout: {e}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stdout whose reader has gone, or that fails some other way.
    struct Closed(ErrorKind);

    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(self.0.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Err(self.0.into())
        }
    }

    #[test]
    fn a_broken_pipe_is_a_quiet_success_and_other_errors_are_errors() {
        let quiet = write_to(&mut Closed(ErrorKind::BrokenPipe), format_args!("barker\n")).unwrap_err();
        assert_eq!((quiet.code, quiet.is_quiet()), (super::super::EXIT_OK, true));
        let full = write_to(&mut Closed(ErrorKind::StorageFull), format_args!("barker\n")).unwrap_err();
        assert_eq!(full.code, super::super::EXIT_ERROR);
        assert!(!full.is_quiet() && full.message.starts_with("writing to stdout: "), "{}", full.message);

        let mut buffer = Vec::new();
        write_to(&mut buffer, format_args!("{} {}\n", "barker", 90)).unwrap();
        assert_eq!(buffer, b"barker 90\n");
    }
}
