//! What the `client` command prints, as text (and JSON), apart from printing
//! it: each function returns the text, so it can be tested and reused.
//!
//! # Layout
//! - `list.rs`: `list`, the services and their instances, as a table or JSON.
//! - `describe.rs`: `describe`, a service's methods with their fields.
//! - `spread.rs`: the table after `call --repeat`: calls per instance.
//! - `watch.rs`: `watch`, one line per change.
//! - `weight.rs`: how both show an instance's weight.

mod describe;
mod list;
mod spread;
mod watch;
mod weight;

pub use describe::{describe_service, describe_text, signature};
pub use list::{list_json, list_text};
pub use spread::{policy_name, spread_table};
pub use watch::{change_line, connection_line};
pub use weight::weight_text;
