//! `lan-probe`: a tiny TCP listener and client for testing the LAN harness
//! itself (testkit::netns) without the project's binaries.
//!
//! - `lan-probe listen IP:PORT`: prints `listening on IP:PORT`, then echoes
//!   every line each connection sends.
//! - `lan-probe connect IP:PORT TIMEOUT_MS`: prints `connected`, `refused`,
//!   `timeout` or `error <kind>`. Once connected, each line read on stdin is
//!   sent and the echo awaited for TIMEOUT_MS: every line that comes back is
//!   printed as `echo <line>`; then `timeout`, `reset` or `closed` when the
//!   echo does not come. Exits when stdin ends.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let result = match args.get(1).map(String::as_str) {
        Some("listen") if args.len() == 3 => listen(&args[2]),
        Some("connect") if args.len() == 4 => connect(&args[2], &args[3]),
        _ => Err("usage: lan-probe listen IP:PORT | lan-probe connect IP:PORT TIMEOUT_MS".into()),
    };
    if let Err(e) = result {
        eprintln!("lan-probe: {e}");
        std::process::exit(2);
    }
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn listen(addr: &str) -> Result<()> {
    let listener = TcpListener::bind(addr)?;
    println!("listening on {}", listener.local_addr()?);
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        std::thread::spawn(move || {
            let Ok(mut writer) = stream.try_clone() else {
                return;
            };
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if writeln!(writer, "{line}").is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

fn connect(addr: &str, timeout_ms: &str) -> Result<()> {
    let addr: SocketAddr = addr.parse()?;
    let timeout = Duration::from_millis(timeout_ms.parse()?);
    let stream = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => s,
        Err(e) => {
            println!("{}", describe(&e));
            return Ok(());
        }
    };
    println!("connected");
    stream.set_read_timeout(Some(timeout))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        if let Err(e) = writeln!(writer, "{line}") {
            println!("{}", describe(&e));
            continue;
        }
        // Read until our own echo comes back: echoes of earlier lines that
        // timed out may arrive first.
        loop {
            let mut got = String::new();
            match reader.read_line(&mut got) {
                Ok(0) => {
                    println!("closed");
                    break;
                }
                Ok(_) => {
                    let got = got.trim_end();
                    println!("echo {got}");
                    if got == line {
                        break;
                    }
                }
                Err(e) => {
                    println!("{}", describe(&e));
                    break;
                }
            }
        }
    }
    Ok(())
}

fn describe(e: &std::io::Error) -> String {
    match e.kind() {
        ErrorKind::ConnectionRefused => "refused".into(),
        ErrorKind::ConnectionReset => "reset".into(),
        ErrorKind::TimedOut | ErrorKind::WouldBlock => "timeout".into(),
        kind => format!("error {kind:?} {e}"),
    }
}
