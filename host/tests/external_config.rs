//! The `command`, `env` and `service` keys of an external plugin's table in
//! services.toml: what is accepted, and each refusal with its line.
#![allow(clippy::unwrap_used)]

use node_host::config::{Config, MAX_COMMAND_ARGS, MAX_EXTERNAL_PLUGINS};

const KNOWN: &[&str] = &["calculator", "echo"];

fn parse(text: &str) -> Result<Config, String> {
    Config::parse(text, "conf/services.toml", KNOWN, None).map_err(|e| e.to_string())
}

fn refused(text: &str) -> String {
    match parse(text) {
        Ok(c) => panic!("accepted: {c:?}"),
        Err(e) => e,
    }
}

#[test]
fn an_external_table_runs_in_the_files_directory() {
    let c = parse(
        r#"
[plugins.calculator]
weight = 2

[plugins.inventory]
command = ["python3", "plugins/inventory.py", "--verbose"]
env = { INVENTORY_DB = "/tmp/inv.json" }
service = "inventory.v1.Inventory"
weight = 3
metadata = { version = "0.1" }
"#,
    )
    .unwrap();
    assert!(c.plugins["calculator"].external.is_none());
    let inv = &c.plugins["inventory"];
    assert_eq!(inv.weight, 3);
    let spec = inv.external.as_ref().unwrap();
    assert_eq!(
        spec.command,
        ["python3", "plugins/inventory.py", "--verbose"]
    );
    assert_eq!(spec.env["INVENTORY_DB"], "/tmp/inv.json");
    assert_eq!(spec.service.as_deref(), Some("inventory.v1.Inventory"));
    assert_eq!(spec.dir, std::path::Path::new("conf"));
}

#[test]
fn refusals_name_the_line_and_the_problem() {
    assert_eq!(
        refused("[plugins.calculator]\ncommand = [\"python3\", \"calc.py\"]\n"),
        "conf/services.toml:1: plugin `calculator` is built in: an external plugin (with `command`) needs another name"
    );
    assert_eq!(
        refused("[plugins.inv]\ncommand = []\n"),
        "conf/services.toml:2: plugin `inv`: `command` must name a program, e.g. [\"python3\", \"plugin.py\"]"
    );
    assert_eq!(
        refused("[plugins.inv]\ncommand = [\"x\"]\nenv = { PLUGIN_LISTEN = \"1.2.3.4:5\" }\n"),
        "conf/services.toml:3: plugin `inv`: environment variable `PLUGIN_LISTEN` cannot be set (empty, has `=` or NUL, or is PLUGIN_LISTEN, which the node sets)"
    );
    assert_eq!(
        refused("[plugins.echo]\nservice = \"echo.v1.Echo\"\n"),
        "conf/services.toml:2: plugin `echo`: `service` and `env` are for external plugins (a table with `command`)"
    );
    assert_eq!(
        refused("[plugins.nowhere]\nweight = 1\n"),
        "conf/services.toml:1: unknown plugin `nowhere`, known: calculator, echo"
    );
    let e = refused("[plugins.\"bad name\"]\ncommand = [\"x\"]\n");
    assert!(e.starts_with("conf/services.toml:1: plugin `bad name`: an external plugin's name is registered as its service name"), "{e}");
    let e = refused("[plugins.inv]\ncommand = [\"x\"]\nservice = \"\"\n");
    assert!(e.starts_with("conf/services.toml:3: "), "{e}");
    let e = refused("[plugins.inv]\ncommand = \"python3 inv.py\"\n");
    assert!(e.starts_with("conf/services.toml:2: "), "{e}");
}

#[test]
fn at_most_so_many_external_plugins_and_arguments() {
    let table = |i: usize| format!("[plugins.p{i}]\ncommand = [\"x\"]\n");
    let at_limit: String = (0..MAX_EXTERNAL_PLUGINS).map(table).collect();
    assert_eq!(
        parse(&at_limit).unwrap().plugins.len(),
        MAX_EXTERNAL_PLUGINS
    );
    let over: String = (0..=MAX_EXTERNAL_PLUGINS).map(table).collect();
    let e = refused(&over);
    assert!(
        e.ends_with(&format!(
            "more than {MAX_EXTERNAL_PLUGINS} external plugins (the limit)"
        )),
        "{e}"
    );
    // A disabled one does not count.
    let disabled = format!("{at_limit}[plugins.off]\ncommand = [\"x\"]\nenabled = false\n");
    assert_eq!(
        parse(&disabled).unwrap().plugins.len(),
        MAX_EXTERNAL_PLUGINS
    );

    let args: Vec<String> = (0..=MAX_COMMAND_ARGS)
        .map(|i| format!("\"a{i}\""))
        .collect();
    let e = refused(&format!("[plugins.inv]\ncommand = [{}]\n", args.join(", ")));
    assert!(
        e.contains(&format!("at most {MAX_COMMAND_ARGS} arguments")),
        "{e}"
    );
}
