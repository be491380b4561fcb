//! Terminal commands: `u` unregisters everything (the node keeps serving),
//! `r` registers it again, `q` deregisters and shuts down cleanly.
//!
//! stdin is read on a plain thread (a blocking read would hold up tokio's
//! shutdown if it ran on tokio's blocking pool). When stdin ends (closed,
//! `/dev/null`, detached) the reader just stops: the node keeps running
//! until SIGINT or SIGTERM.

use std::fmt;
use std::io::{BufRead, Write};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::node::Node;

/// How long `u` and `r` wait for the registry before answering.
pub const COMMAND_WAIT: Duration = Duration::from_secs(3);

/// The command list, printed for `help` and for anything unknown.
pub const HELP: &str = "commands: u = unregister all services (keep serving), r = register them again, q = deregister and quit, help = this list";

/// A command typed on stdin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `u`
    Unregister,
    /// `r`
    Register,
    /// `q`
    Quit,
    /// `help`, `h`, `?`
    Help,
}

impl Command {
    /// Parses one input line; `None` for anything unknown. Empty lines are
    /// `Some(None)`: ignored.
    pub fn parse(line: &str) -> Option<Option<Command>> {
        match line.trim() {
            "" => Some(None),
            "u" => Some(Some(Command::Unregister)),
            "r" => Some(Some(Command::Register)),
            "q" => Some(Some(Command::Quit)),
            "help" | "h" | "?" => Some(Some(Command::Help)),
            _ => None,
        }
    }
}

/// Prints one line on stdout. Unlike `println!`, a closed stdout
/// (`node-host | head -1`, a detached terminal) is ignored instead of
/// panicking: losing a confirmation line must not kill a serving node.
pub(crate) fn say(line: fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

/// Reads stdin on a thread; returns a channel of the commands typed (unknown
/// input is answered with the command list right away).
pub fn read_commands() -> mpsc::UnboundedReceiver<Command> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        // Bytes, not `lines()`: a line that is not UTF-8 is an unknown
        // command, not the end of stdin.
        for line in std::io::stdin().lock().split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line);
            match Command::parse(&line) {
                Some(Some(cmd)) => {
                    if tx.send(cmd).is_err() {
                        break;
                    }
                }
                Some(None) => {}
                None => say(format_args!("unknown command {:?}; {HELP}", line.trim())),
            }
        }
        tracing::debug!("stdin closed: running until SIGINT or SIGTERM");
    });
    rx
}

/// Carries out `u`, `r` or `help`, printing a confirmation line. (`q` is
/// the caller's: it ends the process.)
pub async fn execute(cmd: Command, node: &Arc<Node>) {
    let registrar = node.registrar();
    let names: Vec<String> = registrar.desired().plugins.into_keys().collect();
    let list = names.join(", ");
    match cmd {
        Command::Unregister => {
            if registrar.pause(COMMAND_WAIT).await {
                say(format_args!(
                    "unregistered {} services ({list}); still serving, r registers them again",
                    names.len()
                ));
            } else {
                say(format_args!(
                    "unregistering {} services ({list}): the registry did not confirm in time",
                    names.len()
                ));
            }
        }
        Command::Register => {
            if registrar.resume(COMMAND_WAIT).await {
                say(format_args!("registered {} services ({list})", names.len()));
            } else {
                say(format_args!(
                    "registering {} services ({list}): the registry is not reachable yet, retrying in the background",
                    names.len()
                ));
            }
        }
        Command::Help => say(format_args!("{HELP}")),
        Command::Quit => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands() {
        assert_eq!(Command::parse("u"), Some(Some(Command::Unregister)));
        assert_eq!(Command::parse(" r \n"), Some(Some(Command::Register)));
        assert_eq!(Command::parse("q"), Some(Some(Command::Quit)));
        assert_eq!(Command::parse("help"), Some(Some(Command::Help)));
        assert_eq!(Command::parse("   "), Some(None));
        assert_eq!(Command::parse("quit now"), None);
        assert_eq!(Command::parse("U"), None);
    }
}
