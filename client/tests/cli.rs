//! The `client` binary against a real registry and real node hosts.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use std::time::Duration;
use testkit::{Process, READY_TIMEOUT, Registry, command};

fn value(out: &str) -> f64 {
    let v: serde_json::Value = serde_json::from_str(out).unwrap();
    v["value"]
        .as_f64()
        .unwrap_or_else(|| panic!("no value in {out}"))
}

#[test]
fn every_calculator_and_echo_method_with_json_and_key_value_args() {
    let (registry, node) = registry_with_both(1, 1);
    let reg = registry.addr;

    for (method, expected) in [
        ("Add", 9.0),
        ("Subtract", 3.0),
        ("Multiply", 18.0),
        ("Divide", 2.0),
    ] {
        let target = format!("calculator/{method}");
        assert_eq!(
            value(&client_ok(reg, &["call", &target, "a=6", "b=3"])),
            expected,
            "{method}"
        );
        assert_eq!(
            value(&client_ok(reg, &["call", &target, r#"{"a": 6, "b": 3}"#])),
            expected,
            "{method}"
        );
    }
    // The full protobuf name works too, and negative numbers as values.
    let out = client_ok(
        reg,
        &["call", "calculator.v1.Calculator/Add", "a=-1.5", "b=0.25"],
    );
    assert_eq!(value(&out), -1.25);

    let served_by = node.addr.to_string();
    for args in [
        vec!["message=hello there"],
        vec![r#"{"message": "hello there"}"#],
    ] {
        let mut all = vec!["call", "echo/Echo"];
        all.extend(args);
        let out = client_ok(reg, &all);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["message"], "hello there");
        assert_eq!(v["served_by"], served_by.as_str());
    }

    for args in [
        vec!["message=tick", "count=3"],
        vec![r#"{"message": "tick", "count": 3, "intervalMs": 1}"#],
    ] {
        let mut all = vec!["call", "echo/EchoStream"];
        all.extend(args);
        let replies = json_values(&client_ok(reg, &all));
        assert_eq!(replies.len(), 3, "{replies:?}");
        assert!(
            replies.iter().all(|r| r["message"] == "tick"),
            "{replies:?}"
        );
    }
}

/// The `message` of each reply, checking every one came from `served_by`.
fn messages(out: &str, served_by: &str) -> Vec<String> {
    json_values(out)
        .iter()
        .map(|r| {
            assert_eq!(r["served_by"], served_by, "{out}");
            r["message"].as_str().unwrap().to_string()
        })
        .collect()
}

#[test]
fn client_streaming_and_bidirectional_calls_send_one_message_per_json_object() {
    let registry = Registry::start(&[]);
    let reg = registry.addr;
    let node = Node::start(reg, "[plugins.echo]\nweight = 1\n");
    wait_instances(reg, "echo", 1);
    let served_by = node.addr.to_string();
    let call = |method: &str, args: &[&str]| {
        let target = format!("echo/{method}");
        client_ok(reg, &[&["call", target.as_str()], args].concat())
    };
    let (one, two, three) = (
        r#"{"message": "one"}"#,
        r#"{"message": "two"}"#,
        r#"{"message": "three"}"#,
    );

    // Client streaming: one reply, the messages joined in the order sent,
    // whether the objects come as separate arguments or back to back.
    for args in [
        vec![one, two, three],
        vec![r#"{"message":"one"}{"message":"two"} {"message":"three"}"#],
    ] {
        assert_eq!(
            messages(&call("EchoCollect", &args), &served_by),
            ["one two three"]
        );
    }
    // No argument sends no message; key=value pairs send one.
    assert_eq!(messages(&call("EchoCollect", &[]), &served_by), [""]);
    assert_eq!(
        messages(&call("EchoCollect", &["message=solo"]), &served_by),
        ["solo"]
    );

    // Bidirectional: one reply per message, in order.
    assert_eq!(
        messages(&call("EchoChat", &[one, two, three]), &served_by),
        ["one", "two", "three"]
    );
    assert!(messages(&call("EchoChat", &[]), &served_by).is_empty());
    let out = call("EchoChat", &[one, two, "--repeat", "3"]);
    assert!(
        out.contains("3 calls to echo (weighted-round-robin), 0 failed"),
        "{out}"
    );

    // A bad message is named by its position, and nothing is called.
    let err = client_err(
        reg,
        &["call", "echo/EchoCollect", one, two, r#"{"mesage": "x"}"#],
    );
    assert!(
        err.contains(
            "message 3: no field `mesage` in echo.v1.EchoRequest, did you mean `message`?"
        ),
        "{err}"
    );
    assert!(!err.contains("served by"), "{err}");
    let err = client_err(reg, &["call", "echo/EchoChat", one, r#"{"message": 5}"#]);
    assert!(
        err.contains("message 2: field `message` of echo.v1.EchoRequest expects a string, got 5"),
        "{err}"
    );
    let err = client_err(reg, &["call", "echo/EchoChat", &format!("[{one}, {two}]")]);
    assert!(err.contains("got an array"), "{err}");
    let err = client_err(reg, &["call", "echo/EchoChat", &format!("{one}, {two}")]);
    assert!(
        err.contains("message 2: malformed JSON") && err.contains("not commas"),
        "{err}"
    );
    // The server's own limit, with its code.
    let big = format!(r#"{{"message": "{}"}}"#, "x".repeat(40_000));
    let err = client_err(reg, &["call", "echo/EchoCollect", &big, &big]);
    assert!(
        err.contains(
            "ResourceExhausted: EchoCollect joins at most 65536 bytes; message 2 would make it 80001"
        ),
        "{err}"
    );
}

#[test]
fn at_reads_the_requests_from_stdin_as_grpcurl_does() {
    let (registry, node) = registry_with_both(1, 1);
    let reg = registry.addr;
    let served_by = node.addr.to_string();
    let with_stdin = |target: &str, input: &str| {
        let mut cmd = command("client");
        cmd.env("REGISTRY_ADDR", reg.to_string())
            .args(["call", target, "@"]);
        testkit::run_with_stdin(cmd, Some(input.as_bytes()), Duration::from_secs(60))
    };

    // One message for a unary method, spread over lines as a file holds it.
    let (status, out, err) = with_stdin("calculator/Add", "{\n  \"a\": 2,\n  \"b\": 3\n}\n");
    assert!(status.success(), "{err}");
    assert_eq!(value(&out), 5.0);
    // key=value pairs, as on the command line.
    let (status, out, err) = with_stdin("calculator/Multiply", "a=6\nb=7\n");
    assert!(status.success(), "{err}");
    assert_eq!(value(&out), 42.0);
    // A stream of messages, one per line.
    let (status, out, err) = with_stdin(
        "echo/EchoCollect",
        "{\"message\": \"one\"}\n{\"message\": \"two\"}\n",
    );
    assert!(status.success(), "{err}");
    assert_eq!(messages(&out, &served_by), ["one two"]);
    // A bad one is named by its position, and nothing is sent.
    let (status, out, err) = with_stdin(
        "echo/EchoChat",
        "{\"message\": \"a\"}\n{\"mesage\": \"b\"}\n",
    );
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(err.contains("message 2: no field `mesage`"), "{err}");
    assert!(out.is_empty(), "{out}");
}

#[test]
fn errors_name_the_problem_and_exit_non_zero() {
    let (registry, _node) = registry_with_both(1, 1);
    let reg = registry.addr;

    let err = client_err(reg, &["call", "calculater/Add", "a=1"]);
    assert!(
        err.contains("no service `calculater` is registered, did you mean `calculator`?"),
        "{err}"
    );
    assert!(
        err.contains(
            "registered services: calculator (calculator.v1.Calculator), echo (echo.v1.Echo)"
        ),
        "{err}"
    );

    let err = client_err(reg, &["call", "calculator/add", "a=1"]);
    assert!(
        err.contains("no method `add` in calculator.v1.Calculator, did you mean `Add`?"),
        "{err}"
    );
    assert!(
        err.contains("methods: Add, Subtract, Multiply, Divide"),
        "{err}"
    );

    let err = client_err(reg, &["call", "calculator/Add", "c=1"]);
    assert!(
        err.contains("no field `c` in calculator.v1.BinaryRequest; fields: a (double), b (double)"),
        "{err}"
    );

    let err = client_err(reg, &["call", "calculator/Add", "a=two"]);
    assert!(
        err.contains("field `a` of calculator.v1.BinaryRequest expects a double, got `two`"),
        "{err}"
    );

    let err = client_err(reg, &["call", "calculator/Add", r#"{"a": 1,"#]);
    assert!(err.contains("malformed JSON"), "{err}");

    let err = client_err(reg, &["call", "calculator", "a=1"]);
    assert!(err.contains("expected SERVICE/METHOD"), "{err}");

    // The service's own error, with its code.
    let err = client_err(reg, &["call", "calculator/Divide", "a=1", "b=0"]);
    assert!(err.contains("InvalidArgument"), "{err}");

    let err = client_err(reg, &["describe", "nothing"]);
    assert!(err.contains("no service `nothing`"), "{err}");

    // No registry at all.
    let (status, _, err) = client(
        "127.0.0.1:1".parse().unwrap(),
        &["list", "--wait-ms", "500"],
    );
    assert_eq!(status.code(), Some(1));
    assert!(
        err.contains("cannot reach the registry at 127.0.0.1:1"),
        "{err}"
    );
}

#[test]
fn list_describe_and_the_default_listing() {
    let (registry, node) = registry_with_both(3, 1);
    let reg = registry.addr;

    let v: serde_json::Value = serde_json::from_str(&client_ok(reg, &["list", "--json"])).unwrap();
    let calc = v["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "calculator")
        .unwrap();
    assert_eq!(calc["proto_service"], "calculator.v1.Calculator");
    assert_eq!(calc["instances"][0]["weight"], 3);
    assert_eq!(
        calc["instances"][0]["address"],
        node.addr.to_string().as_str()
    );

    let out = client_ok(reg, &["list"]);
    assert!(
        out.contains("calculator (calculator.v1.Calculator): 1 instance"),
        "{out}"
    );
    // The instance's own row (the address column is padded): its address
    // with its weight.
    assert!(
        out.lines().any(|l| {
            l.split_whitespace()
                .take(2)
                .eq([node.addr.to_string().as_str(), "weight=3"])
        }),
        "{out}"
    );

    let out = client_ok(reg, &["describe", "echo"]);
    assert!(
        out.contains(
            "rpc EchoStream(echo.v1.EchoStreamRequest) returns (stream echo.v1.EchoResponse)"
        ),
        "{out}"
    );
    assert!(
        out.contains("message (string), count (uint32), interval_ms (uint32)"),
        "{out}"
    );
    for signature in [
        "rpc Echo(echo.v1.EchoRequest) returns (echo.v1.EchoResponse)",
        "rpc EchoCollect(stream echo.v1.EchoRequest) returns (echo.v1.EchoResponse)",
        "rpc EchoChat(stream echo.v1.EchoRequest) returns (stream echo.v1.EchoResponse)",
        "(client streaming: call with the request messages as JSON objects one after another)",
    ] {
        assert!(out.contains(signature), "{signature} not in {out}");
    }
    assert!(!out.contains("not callable"), "{out}");
    let out = client_ok(reg, &["describe", "calculator.v1.Calculator"]);
    assert!(
        out.contains("rpc Divide(calculator.v1.BinaryRequest) returns (calculator.v1.Result)"),
        "{out}"
    );

    // No subcommand, stdin not a terminal: the list, then exit.
    let out = client_ok(reg, &[]);
    assert!(
        out.contains("calculator (calculator.v1.Calculator): 1 instance"),
        "{out}"
    );
    assert!(out.contains("echo (echo.v1.Echo): 1 instance"), "{out}");
}

#[test]
fn repeated_calls_spread_over_two_nodes_by_weight() {
    let registry = Registry::start(&[]);
    let reg = registry.addr;
    let _heavy = Node::start(reg, "[plugins.calculator]\nweight = 3\n");
    let _light = Node::start(reg, "[plugins.calculator]\nweight = 1\n");
    wait_instances(reg, "calculator", 2);

    // Smooth WRR: exact over whole cycles.
    let (out, rows) = repeat_400(reg, None);
    for (_, weight, calls) in rows {
        assert_eq!(calls, 100 * weight, "{out}");
    }

    // Weighted random: within 5 sigma of 3:1 (sigma = sqrt(400 * 3/16) ~ 8.7,
    // so a false failure has probability below 1e-6).
    let (out, rows) = repeat_400(reg, Some("weighted-random"));
    for (_, weight, calls) in rows {
        let expected = 400.0 * f64::from(weight) / 4.0;
        assert!((f64::from(calls) - expected).abs() < 44.0, "{out}");
    }

    // Uniform random: 200 each within 5 sigma (sigma = sqrt(400 / 4) = 10).
    let (out, rows) = repeat_400(reg, Some("random"));
    for (_, _, calls) in rows {
        assert!((f64::from(calls) - 200.0).abs() <= 50.0, "{out}");
    }
}

/// `call calculator/Add a=1 b=1 --repeat 400` under `lb` (default: the
/// default policy); asserts none failed over two instances and returns the
/// output with the rows of its spread table.
fn repeat_400(reg: std::net::SocketAddr, lb: Option<&str>) -> (String, Vec<(String, u32, u32)>) {
    let mut args = vec!["call", "calculator/Add", "a=1", "b=1", "--repeat", "400"];
    args.extend(lb.iter().flat_map(|lb| ["--lb", lb]));
    let out = client_ok(reg, &args);
    let name = lb.unwrap_or("weighted-round-robin");
    assert!(
        out.contains(&format!("400 calls to calculator ({name}), 0 failed")),
        "{out}"
    );
    let rows = spread(&out);
    assert_eq!(rows.len(), 2, "{out}");
    (out, rows)
}

#[test]
fn repeated_calls_survive_a_node_killed_midway_and_ctrl_c_prints_the_table() {
    let registry = Registry::start(&[]);
    let reg = registry.addr;
    let mut victim = Node::start(reg, "[plugins.calculator]\nweight = 1\n");
    let survivor = Node::start(reg, "[plugins.calculator]\nweight = 1\n");
    wait_instances(reg, "calculator", 2);

    // More calls than the test will wait for: it ends them with SIGINT,
    // as a person would with Ctrl-C, once the kill is well behind.
    const N: u32 = 1_000_000;
    let mut cmd = command("client");
    cmd.env("REGISTRY_ADDR", reg.to_string())
        .env("RUST_LOG", "warn")
        .args([
            "call",
            "calculator/Add",
            "a=1",
            "b=2",
            "--repeat",
            &N.to_string(),
            "--concurrency",
            "2",
        ]);
    let mut calls = Process::spawn("calls", cmd);
    calls.wait_for_line("\"value\"", READY_TIMEOUT); // under way
    victim.process.kill9();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(calls.is_running(), "a million calls ended within 1.5 s");
    calls.signal(2);
    let status = calls.wait_exit(Duration::from_secs(30));
    let summary = calls.wait_for_line(" calls to calculator (", Duration::from_secs(1));
    let made: u32 = summary
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {summary:?}"));
    assert_eq!(
        summary,
        format!("{made} calls to calculator (weighted-round-robin), 0 failed")
    );
    assert!(made > 0 && made < N, "{summary}");
    calls.wait_for_line(
        &format!("interrupted: {made} of {N} calls made"),
        Duration::from_secs(1),
    );
    assert!(status.success(), "{status:?}");
    // The run spanned the kill: the survivor took most of the calls.
    let table = calls.lines().join("\n");
    let rows: Vec<(String, u32, u32)> = spread(&table);
    assert!(
        calls_to(&rows, survivor.addr) > calls_to(&rows, victim.addr),
        "{table}"
    );
}

#[test]
fn watch_prints_changes_as_they_happen() {
    let registry = Registry::start(&[]);
    let reg = registry.addr;
    let watch = client_watch(reg);

    let mut node = Node::start(reg, "[plugins.calculator]\nweight = 3\n");
    let added = format!("+ calculator {} weight=3", node.addr);
    watch.wait_for_line(&added, READY_TIMEOUT);

    // An edit of the weight is an update.
    std::fs::write(
        &node.config,
        "advertise = \"127.0.0.1\"\n[plugins.calculator]\nweight = 5\n",
    )
    .unwrap();
    watch.wait_for_line(
        &format!("~ calculator {} weight=5", node.addr),
        READY_TIMEOUT,
    );

    node.process.kill9();
    let line = watch.wait_for_line(&format!("- calculator {}", node.addr), READY_TIMEOUT);
    assert!(
        line.ends_with("(node disconnected)") || line.ends_with("(lease expired)"),
        "{line}"
    );
}

#[test]
fn interactive_prompt_on_a_terminal() {
    // `script` (util-linux) gives the client a pseudo-terminal. Missing, the
    // test fails: skipping would pass without testing anything.
    let script = std::process::Command::new("script")
        .arg("--version")
        .output();
    assert!(
        script.is_ok_and(|o| o.status.success()),
        "this test needs `script` (Debian package bsdutils, util-linux)"
    );
    let registry = Registry::start(&[]);
    let reg = registry.addr;
    let _node = Node::start(reg, &both(1, 1));
    wait_instances(reg, "echo", 1);

    let client = testkit::bin_path("client");
    let mut cmd = std::process::Command::new("script");
    cmd.env("REGISTRY_ADDR", reg.to_string())
        .env("TERM", "dumb")
        .args(["-qfc", &client.display().to_string(), "/dev/null"]);
    let mut repl = Process::spawn("repl", cmd);
    repl.wait_for_line("type `help` for commands", READY_TIMEOUT);
    repl.send_line("call calculator/Multiply a=6 b=7");
    repl.wait_for_line("\"value\": 42.0", READY_TIMEOUT);
    repl.send_line("call echo/Echo 'message=two words'");
    repl.wait_for_line("\"message\": \"two words\"", READY_TIMEOUT);
    repl.send_line("call calculator/Mul a=1");
    repl.wait_for_line("did you mean `Multiply`?", READY_TIMEOUT);
    repl.send_line("quit");
    assert!(repl.wait_exit(READY_TIMEOUT).success());
}

/// A terminal in tmux (its own server, on its own socket), read back as the
/// screen shows it.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("this test needs tmux (Debian package tmux)");
        assert!(out.status.success(), "tmux {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "repl"])
    }

    /// Waits until the screen's last prompt line is `line` exactly.
    fn wait_prompt(&self, line: &str) {
        let deadline = std::time::Instant::now() + READY_TIMEOUT;
        loop {
            let screen = self.screen();
            let last = screen.lines().rev().find(|l| l.starts_with("registry> "));
            if last.map(str::trim_end) == Some(line) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no prompt line {line:?}; the screen:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_screen(&self, text: &str) {
        let deadline = std::time::Instant::now() + READY_TIMEOUT;
        loop {
            let screen = self.screen();
            if screen.contains(text) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no {text:?} on the screen:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        // Only this test's own tmux server, by its socket.
        let _ = std::process::Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}

#[test]
fn tab_completes_commands_services_methods_and_fields() {
    let registry = Registry::start(&[]);
    let reg = registry.addr;
    let _node = Node::start(reg, &both(1, 1));
    wait_instances(reg, "calculator", 1);

    let tmux = Tmux {
        socket: format!("client-test-{}", std::process::id()),
    };
    let client = testkit::bin_path("client").display().to_string();
    let env = format!("REGISTRY_ADDR={reg}");
    tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "repl",
        "-x",
        "150",
        "-y",
        "40",
        "-e",
        &env,
        "-e",
        "TERM=xterm",
        &client,
    ]);
    tmux.wait_screen("type `help` for commands");
    let keys = |keys: &[&str]| {
        let mut args = vec!["send-keys", "-t", "repl"];
        args.extend(keys);
        tmux.run(&args);
    };

    // A command, then a service (from the directory).
    keys(&["ca", "Tab"]);
    tmux.wait_prompt("registry> call");
    keys(&[" calc", "Tab"]);
    tmux.wait_prompt("registry> call calculator/");
    // Methods and fields come from the service's descriptors.
    keys(&["Mul", "Tab"]);
    tmux.wait_prompt("registry> call calculator/Multiply");
    keys(&[" a", "Tab"]);
    tmux.wait_prompt("registry> call calculator/Multiply a=");
    keys(&["6 b", "Tab"]);
    tmux.wait_prompt("registry> call calculator/Multiply a=6 b=");
    keys(&["7", "Enter"]);
    tmux.wait_screen("\"value\": 42.0");
    keys(&["quit", "Enter"]);
}

#[test]
fn an_unreachable_registry_is_named_for_what_it_is() {
    // A loopback port nothing listens on (bound, then freed): the kernel
    // refuses at once, so waiting the default 3 s for an answer is pointless.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let started = std::time::Instant::now();
    let (status, _, err) = client(free, &["list"]);
    let took = started.elapsed();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "cannot reach the registry at {free}: connection refused"
        )),
        "{err}"
    );
    assert!(
        !err.contains("--tls-ca"),
        "no TLS hint for a refusal: {err}"
    );
    // Well under the 3 s --wait-ms default (the bound the issue sets is 1 s
    // on loopback; the margin is for a loaded machine).
    assert!(took < Duration::from_millis(2500), "took {took:?}: {err}");
}
