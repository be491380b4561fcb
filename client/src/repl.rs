//! The interactive prompt of `client` (no command given, stdin a terminal):
//! a line editor with history, the commands of [`commands`](crate::commands)
//! typed as on the command line, and TAB completion of commands, services,
//! `SERVICE/METHOD` and field names from the directory and the descriptors
//! already fetched (all of them are fetched in the background, so methods
//! complete soon after the prompt opens).

use crate::commands::{Command, CommandError, execute};
use crate::descriptors::Descriptors;
use crate::resolve::{find_service, split_target};
use clap::Parser;
use rustyline::completion::{Completer, Pair};
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::validate::Validator;

/// A line typed at the interactive prompt.
#[derive(Debug, Parser)]
#[command(multicall = true, disable_help_subcommand = true)]
enum Line {
    #[command(flatten)]
    Command(Command),
    /// Show the commands.
    Help,
    /// Leave the prompt.
    #[command(alias = "exit")]
    Quit,
}

const PROMPT_HELP: &str = "\
commands:
  list [--json]                       services and instances
  describe SERVICE                    methods with request and response fields
  call SERVICE/METHOD [ARGS...] [--lb POLICY] [--repeat N] [--concurrency N] [--no-retry]
                      [--timeout-ms MS]
                                      e.g. call calculator/Add a=2 b=3
                                           call echo/Echo '{\"message\": \"hi\"}'
                                      client-streaming and bidirectional methods take
                                      the request messages as JSON objects one after
                                      another: call echo/EchoChat '{\"message\": \"a\"}' '{\"message\": \"b\"}'
  watch                               follow changes (Ctrl-C stops)
  help                                this text
  quit                                leave (also Ctrl-D)
TAB completes commands, services, SERVICE/METHOD and field names.";

/// Runs the prompt until `quit` or Ctrl-D. Commands run on `runtime`; Ctrl-C
/// stops the one running (a `watch`, a long `--repeat`), not the prompt.
pub fn repl(
    runtime: &tokio::runtime::Runtime,
    descriptors: &Descriptors,
) -> Result<(), CommandError> {
    let mut editor: rustyline::Editor<Helper, rustyline::history::DefaultHistory> =
        rustyline::Editor::new()
            .map_err(|e| CommandError::Terminal("cannot open the terminal", e))?;
    editor.set_helper(Some(Helper {
        descriptors: descriptors.clone(),
    }));
    prefetch_descriptors(runtime, descriptors);
    println!("type `help` for commands");
    loop {
        let line = match editor.readline("registry> ") {
            Ok(line) => line,
            Err(rustyline::error::ReadlineError::Interrupted) => continue,
            Err(rustyline::error::ReadlineError::Eof) => return Ok(()),
            Err(e) => return Err(CommandError::Terminal("cannot read the terminal", e)),
        };
        if line.trim().is_empty() {
            continue;
        }
        let _ = editor.add_history_entry(line.as_str());
        let words = match split_words(&line) {
            Ok(w) => w,
            Err(e) => {
                eprintln!("error: {e}");
                continue;
            }
        };
        let parsed = match Line::try_parse_from(&words) {
            Ok(p) => p,
            Err(e) => {
                let _ = e.print();
                continue;
            }
        };
        match parsed {
            Line::Help => println!("{PROMPT_HELP}"),
            Line::Quit => return Ok(()),
            Line::Command(command) => {
                let outcome = runtime.block_on(async {
                    tokio::select! {
                        r = execute(descriptors, command) => r,
                        _ = tokio::signal::ctrl_c() => Ok(()),
                    }
                });
                if let Err(e) = outcome {
                    eprintln!("error: {e:#}");
                }
                prefetch_descriptors(runtime, descriptors);
            }
        }
    }
}

/// Fetches descriptors of every service in the background, so TAB can
/// complete method names.
fn prefetch_descriptors(runtime: &tokio::runtime::Runtime, descriptors: &Descriptors) {
    for service in descriptors.directory().snapshot().services() {
        if descriptors.cached(&service).is_none() {
            let descriptors = descriptors.clone();
            runtime.spawn(async move {
                let _ = descriptors.get(&service).await;
            });
        }
    }
}

/// Splits a prompt line into words, honouring 'single' and "double" quotes
/// and backslash escapes.
fn split_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = line.chars();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') | (None, '\\') => {
                let next = chars.next().ok_or("a backslash ends the line")?;
                word.get_or_insert_with(String::new).push(next);
            }
            (Some(_), c) => word.get_or_insert_with(String::new).push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                word.get_or_insert_with(String::new);
            }
            (None, c) if c.is_whitespace() => words.extend(word.take()),
            (None, c) => word.get_or_insert_with(String::new).push(c),
        }
    }
    if let Some(q) = quote {
        return Err(format!("unclosed {q}"));
    }
    words.extend(word);
    Ok(words)
}

/// TAB completion for the prompt.
struct Helper {
    /// Where service names and cached descriptors come from.
    descriptors: Descriptors,
}

impl Helper {
    fn candidates(&self, before: &[&str], word: &str) -> Vec<String> {
        const COMMANDS: [&str; 6] = ["call", "list", "describe", "watch", "help", "quit"];
        let snapshot = self.descriptors.directory().snapshot();
        match before {
            [] => COMMANDS.iter().map(|c| c.to_string()).collect(),
            ["describe"] => snapshot.services(),
            ["call"] => match word.split_once('/') {
                Some((service, _)) => find_service(&snapshot, service)
                    .ok()
                    .and_then(|s| self.descriptors.cached(&s))
                    .map(|d| {
                        d.methods()
                            .map(|m| format!("{service}/{}", m.name()))
                            .collect()
                    })
                    .unwrap_or_default(),
                None => snapshot
                    .services()
                    .into_iter()
                    .map(|s| format!("{s}/"))
                    .collect(),
            },
            ["call", target, ..] => {
                if word.starts_with('-') {
                    return [
                        "--lb",
                        "--repeat",
                        "--concurrency",
                        "--no-retry",
                        "--timeout-ms",
                    ]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
                }
                let Ok((service, method)) = split_target(target) else {
                    return Vec::new();
                };
                find_service(&snapshot, service)
                    .ok()
                    .and_then(|s| self.descriptors.cached(&s))
                    .and_then(|d| d.methods().find(|m| m.name() == method))
                    .map(|m| {
                        m.input()
                            .fields()
                            .map(|f| format!("{}=", f.name()))
                            .collect()
                    })
                    .unwrap_or_default()
            }
            _ => Vec::new(),
        }
    }
}

impl Completer for Helper {
    type Candidate = Pair;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _ctx: &rustyline::Context<'_>,
    ) -> rustyline::Result<(usize, Vec<Pair>)> {
        let head = &line[..pos];
        let start = word_start(head);
        let word = &head[start..];
        let before: Vec<&str> = head[..start].split_whitespace().collect();
        let pairs = self
            .candidates(&before, word)
            .into_iter()
            .filter(|c| c.starts_with(word))
            .map(|c| Pair {
                display: c.clone(),
                replacement: c,
            })
            .collect();
        Ok((start, pairs))
    }
}

/// Byte offset of the word being typed at the end of `head`: just after its
/// last whitespace, which may be more than one byte long (U+00A0, U+3000).
fn word_start(head: &str) -> usize {
    head.char_indices()
        .rev()
        .find(|(_, c)| c.is_whitespace())
        .map_or(0, |(i, c)| i + c.len_utf8())
}

impl Hinter for Helper {
    type Hint = String;
}
impl Highlighter for Helper {}
impl Validator for Helper {}
impl rustyline::Helper for Helper {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::CallArgs;
    use crate::lb::PolicyKind;

    #[test]
    fn words_and_quotes() {
        assert_eq!(
            split_words(r#"call calculator/Add '{"a": 1, "b": 2}'"#).unwrap_or_default(),
            vec!["call", "calculator/Add", r#"{"a": 1, "b": 2}"#]
        );
        assert_eq!(
            split_words(r#"call echo/Echo message="hello world""#).unwrap_or_default(),
            vec!["call", "echo/Echo", "message=hello world"]
        );
        assert_eq!(split_words("a ''").unwrap_or_default(), vec!["a", ""]);
        assert!(split_words("'open").is_err());
    }

    #[test]
    fn completion_words_start_after_any_whitespace() {
        assert_eq!(word_start("call calc"), 5);
        assert_eq!(word_start("call"), 0);
        assert_eq!(word_start(""), 0);
        // Multi-byte spaces: slicing at `index + 1` would panic here.
        for head in ["call\u{3000}calc", "call\u{a0}calc"] {
            assert_eq!(&head[word_start(head)..], "calc", "{head:?}");
        }
    }

    #[test]
    fn prompt_lines_parse() {
        assert!(matches!(Line::try_parse_from(["quit"]), Ok(Line::Quit)));
        assert!(matches!(Line::try_parse_from(["exit"]), Ok(Line::Quit)));
        assert!(matches!(
            Line::try_parse_from(["call", "calculator/Add", "a=1", "--lb", "random"]),
            Ok(Line::Command(Command::Call(CallArgs {
                lb: PolicyKind::Random,
                ..
            })))
        ));
        assert!(matches!(
            Line::try_parse_from(["list", "--json"]),
            Ok(Line::Command(Command::List { json: true }))
        ));
    }
}
