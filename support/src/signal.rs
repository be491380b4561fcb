//! The signals that ask a process to stop: SIGINT (Ctrl-C) and SIGTERM.
//!
//! [`Signals::install`] is meant to run first thing: a signal that arrives
//! while the process is still starting (a test that sends SIGTERM as soon as
//! the ready line appears, say) must stop it cleanly, not kill it with the
//! default disposition.

use std::fmt;

/// Which signal arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGINT: Ctrl-C on the terminal.
    Interrupt,
    /// SIGTERM: a supervisor or `kill`.
    Terminate,
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Signal::Interrupt => "SIGINT",
            Signal::Terminate => "SIGTERM",
        })
    }
}

/// Handlers for SIGINT and SIGTERM, installed until dropped.
#[derive(Debug)]
pub struct Signals {
    /// SIGINT.
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    /// SIGTERM.
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs both handlers. Must be called within a tokio runtime.
    #[cfg(unix)]
    pub fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// Installs the Ctrl-C handler (the only one outside Unix).
    #[cfg(not(unix))]
    pub fn install() -> std::io::Result<Signals> {
        Ok(Signals {})
    }

    /// Waits for the next signal.
    #[cfg(unix)]
    pub async fn recv(&mut self) -> Signal {
        tokio::select! {
            _ = self.interrupt.recv() => Signal::Interrupt,
            _ = self.terminate.recv() => Signal::Terminate,
        }
    }

    /// Waits for the next Ctrl-C; never returns if it cannot be listened to.
    #[cfg(not(unix))]
    pub async fn recv(&mut self) -> Signal {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
        Signal::Interrupt
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sigterm_and_sigint_are_told_apart() {
        let mut signals = Signals::install().expect("handlers");
        for (flag, want, name) in [
            ("-TERM", Signal::Terminate, "SIGTERM"),
            ("-INT", Signal::Interrupt, "SIGINT"),
        ] {
            let status = std::process::Command::new("kill")
                .args([flag, &std::process::id().to_string()])
                .status()
                .expect("kill runs");
            assert!(status.success());
            let got = tokio::time::timeout(std::time::Duration::from_secs(5), signals.recv())
                .await
                .expect("signal delivered");
            assert_eq!(got, want);
            assert_eq!(got.to_string(), name);
        }
    }
}
