//! An export as data: the flat object `{"transport": "vduse", "name": "vdisk1", "file": …}`
//! that the config file's `[[export]]` tables and the control API's `add` carry. Its keys are
//! the long options of `vudev export` and it is parsed by the very same definitions
//! (`cli::VduseArgs`, `cli::VhostUserArgs`), so that the command line, the config and the
//! API have one spelling, one set of defaults and one set of errors.

use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Args, Command, FromArgMatches};
use serde_json::{Map, Value};

use crate::cli::{VduseArgs, VhostUserArgs};
use crate::device;

/// A spec: `transport` and the export's options, as given.
pub type Spec = Map<String, Value>;

/// A spec parsed by the command line's definitions.
#[derive(Clone, Debug)]
pub enum ExportArgs {
    /// `vudev export vduse …`.
    Vduse(VduseArgs),
    /// `vudev export vhost-user …`.
    VhostUser(VhostUserArgs),
}

/// What is wrong with a spec; `key` names the option at fault when there is one.
#[derive(Debug)]
pub struct SpecError {
    /// The key at fault.
    pub key: Option<String>,
    /// What is wrong, and what to do.
    pub message: String,
}

impl std::fmt::Display for SpecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

fn error(key: Option<&str>, message: String) -> SpecError {
    SpecError {
        key: key.map(str::to_string),
        message,
    }
}

/// The transports, by the name `transport` gives them.
pub const TRANSPORTS: [&str; 2] = ["vduse", "vhost-user"];

/// The clap definition of a transport's options.
fn command(transport: &str) -> Option<Command> {
    match transport {
        "vduse" => Some(VduseArgs::augment_args(Command::new("vduse"))),
        "vhost-user" => Some(VhostUserArgs::augment_args(Command::new("vhost-user"))),
        _ => None,
    }
    .map(|c| c.no_binary_name(true))
}

impl ExportArgs {
    /// Parses a spec, checking what can be checked without opening anything.
    pub fn parse(spec: &Spec) -> Result<ExportArgs, SpecError> {
        let transport = match spec.get("transport") {
            Some(Value::String(t)) => t.as_str(),
            Some(_) => {
                return Err(error(
                    Some("transport"),
                    format!("transport must be a string: {}", TRANSPORTS.join(" or ")),
                ))
            }
            None => {
                return Err(error(
                    None,
                    format!("no transport: add transport = {}", TRANSPORTS.join(" or ")),
                ))
            }
        };
        let cmd = command(transport).ok_or_else(|| {
            error(
                Some("transport"),
                format!(
                    "unknown transport '{transport}': use {}",
                    TRANSPORTS.join(" or ")
                ),
            )
        })?;
        let argv = arguments(&cmd, spec)?;
        let matches = cmd
            .try_get_matches_from(argv)
            .map_err(|e| error(None, clap_message(&e)))?;
        let parsed = if transport == "vduse" {
            VduseArgs::from_arg_matches(&matches).map(ExportArgs::Vduse)
        } else {
            VhostUserArgs::from_arg_matches(&matches).map(ExportArgs::VhostUser)
        }
        .map_err(|e| error(None, clap_message(&e)))?;
        let (backend, opts, dev) = parsed.parts();
        device::check(backend, opts, dev).map_err(|e| error(None, e))?;
        if transport == "vduse" {
            device::check_vduse(backend, dev).map_err(|e| error(Some("num-queues"), e))?;
        }
        let name = parsed.name();
        let fits = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
        if name.is_empty() || name.len() > 64 || name.starts_with('.') || !name.chars().all(fits) {
            return Err(error(
                Some("name"),
                format!(
                    "invalid name '{name}': use up to 64 letters, digits, '-', '_' and '.' \
                     (not first)"
                ),
            ));
        }
        Ok(parsed)
    }

    /// The export's name.
    pub fn name(&self) -> String {
        match self {
            ExportArgs::Vduse(a) => a.name.clone(),
            ExportArgs::VhostUser(a) => a.export_name(),
        }
    }

    /// The transport, as `transport` names it.
    pub fn transport(&self) -> &'static str {
        match self {
            ExportArgs::Vduse(_) => TRANSPORTS[0],
            ExportArgs::VhostUser(_) => TRANSPORTS[1],
        }
    }

    /// The vhost-user socket, if it is one.
    pub fn socket(&self) -> Option<&std::path::Path> {
        match self {
            ExportArgs::Vduse(_) => None,
            ExportArgs::VhostUser(a) => Some(&a.socket),
        }
    }

    /// The backend, its options and the device options.
    pub fn parts(
        &self,
    ) -> (
        &crate::cli::BackendArgs,
        &crate::cli::BackendOptions,
        &crate::cli::DeviceArgs,
    ) {
        match self {
            ExportArgs::Vduse(a) => (&a.backend, &a.backend_options, &a.device),
            ExportArgs::VhostUser(a) => (&a.backend, &a.backend_options, &a.device),
        }
    }
}

/// The spec's options as command-line arguments, each `--key=value` so that no value is
/// taken for an option.
fn arguments(cmd: &Command, spec: &Spec) -> Result<Vec<String>, SpecError> {
    let mut argv = Vec::new();
    for (key, value) in spec {
        if key == "transport" {
            continue;
        }
        let Some(arg) = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()))
        else {
            return Err(error(
                Some(key),
                format!(
                    "unknown option '{key}' for a {} export: the options are {}",
                    cmd.get_name(),
                    option_names(cmd).join(", ")
                ),
            ));
        };
        let takes_value = arg.get_action().takes_values();
        match value {
            Value::Bool(b) if !takes_value => {
                if *b {
                    argv.push(format!("--{key}"));
                }
            }
            _ if !takes_value => {
                return Err(error(
                    Some(key),
                    format!("{key} is a switch: give it true or false"),
                ))
            }
            Value::String(s) => argv.push(format!("--{key}={s}")),
            Value::Number(n) => argv.push(format!("--{key}={n}")),
            Value::Array(items) => {
                let mut joined = Vec::new();
                for item in items {
                    match item {
                        Value::String(s) => joined.push(s.clone()),
                        Value::Number(n) => joined.push(n.to_string()),
                        _ => {
                            return Err(error(
                                Some(key),
                                format!("{key}: a list holds only numbers and strings"),
                            ))
                        }
                    }
                }
                argv.push(format!("--{key}={}", joined.join(",")));
            }
            _ => {
                return Err(error(
                    Some(key),
                    format!("{key} takes a value (a string or a number), not {value}"),
                ))
            }
        }
    }
    Ok(argv)
}

/// The long options of a transport, as spec keys.
fn option_names(cmd: &Command) -> Vec<&str> {
    cmd.get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|l| *l != "help")
        .collect()
}

/// A clap error in one line: what is wrong, without the usage text.
fn clap_message(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let body = text.split("\n\nUsage:").next().unwrap_or(&text);
    let body = body.trim_start_matches("error: ");
    body.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The spec of options given on a command line (`vudev ctl add vduse …`): only those given,
/// as strings (switches as `true`).
pub fn from_matches(transport: &str, matches: &ArgMatches) -> Spec {
    let mut spec = Spec::new();
    spec.insert("transport".into(), Value::String(transport.into()));
    let Some(cmd) = command(transport) else {
        return spec;
    };
    for arg in cmd.get_arguments() {
        let (id, Some(long)) = (arg.get_id().as_str(), arg.get_long()) else {
            continue;
        };
        if matches.value_source(id) != Some(ValueSource::CommandLine) {
            continue;
        }
        let value = if matches!(arg.get_action(), ArgAction::SetTrue) {
            Value::Bool(true)
        } else {
            let values: Vec<String> = matches
                .get_raw(id)
                .into_iter()
                .flatten()
                .map(|v| v.to_string_lossy().into_owned())
                .collect();
            Value::String(values.join(","))
        };
        spec.insert(long.to_string(), value);
    }
    spec
}

/// The spec as the `vudev export` command line that does the same, for `vudev serve --check`.
pub fn command_line(spec: &Spec) -> String {
    let mut line = format!(
        "vudev export {}",
        spec.get("transport").and_then(Value::as_str).unwrap_or("?")
    );
    for (key, value) in spec.iter().filter(|(k, _)| *k != "transport") {
        match value {
            Value::Bool(true) => line.push_str(&format!(" --{key}")),
            Value::Bool(false) => {}
            Value::String(s) => line.push_str(&format!(" --{key} {}", quoted(s))),
            Value::Array(items) => {
                let items: Vec<String> = items
                    .iter()
                    .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_string))
                    .collect();
                line.push_str(&format!(" --{key} {}", quoted(&items.join(","))));
            }
            other => line.push_str(&format!(" --{key} {other}")),
        }
    }
    line
}

fn quoted(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-:,=+@%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(v: Value) -> Spec {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn parses_what_the_command_line_parses() {
        let s = spec(json!({"transport": "vduse", "name": "d1", "memory": "64M",
                            "num-queues": 4, "readonly": true, "queue-cpus": [0]}));
        let ExportArgs::Vduse(a) = ExportArgs::parse(&s).unwrap() else {
            panic!("not vduse")
        };
        assert_eq!(a.name, "d1");
        assert_eq!(a.device.num_queues, 4);
        assert!(a.device.readonly);
        assert_eq!(a.device.queue_cpus, vec![0]);
        assert_eq!(a.device.queue_size, 256, "the command line's default");
        let v = spec(json!({"transport": "vhost-user", "socket": "/run/x/vm1.sock", "null": "1G"}));
        assert_eq!(ExportArgs::parse(&v).unwrap().name(), "vm1");
    }

    #[test]
    fn a_socket_owner_that_does_not_exist_is_refused_when_parsed() {
        let s = spec(
            json!({"transport": "vhost-user", "socket": "/run/x/a.sock", "null": "1G",
                            "socket-group": "no-such-group-here"}),
        );
        let e = ExportArgs::parse(&s).unwrap_err();
        assert!(
            e.message.contains("no such group 'no-such-group-here'"),
            "{}",
            e.message
        );
        let s = spec(
            json!({"transport": "vhost-user", "socket": "/run/x/a.sock", "null": "1G",
                            "socket-user": "root", "socket-group": "0"}),
        );
        let ExportArgs::VhostUser(a) = ExportArgs::parse(&s).unwrap() else {
            panic!("not vhost-user")
        };
        assert_eq!((a.socket_user, a.socket_group), (Some(0), Some(0)));
    }

    #[test]
    fn refuses_with_the_key_at_fault() {
        let cases = [
            (json!({"name": "d", "null": "1G"}), None, "no transport"),
            (
                json!({"transport": "tap", "null": "1G"}),
                Some("transport"),
                "unknown transport",
            ),
            (
                json!({"transport": "vduse", "name": "d", "null": "1G", "num-queue": 2}),
                Some("num-queue"),
                "unknown option 'num-queue'",
            ),
            (
                json!({"transport": "vduse", "name": "d", "null": "1G", "readonly": "yes"}),
                Some("readonly"),
                "switch",
            ),
            (
                json!({"transport": "vduse", "name": "d", "null": "1G", "num-queues": true}),
                Some("num-queues"),
                "takes a value",
            ),
            (
                json!({"transport": "vduse", "name": "d", "null": "1Q"}),
                None,
                "1Q",
            ),
            (
                json!({"transport": "vduse", "name": "d", "null": "1G", "memory": "1G"}),
                None,
                "cannot be used with",
            ),
            (json!({"transport": "vduse", "null": "1G"}), None, "--name"),
            (
                json!({"transport": "vduse", "name": "d", "null": "1G", "direct": true}),
                None,
                "--direct applies to --file",
            ),
            (
                json!({"transport": "vduse", "name": "a b", "null": "1G"}),
                Some("name"),
                "invalid name",
            ),
            (
                json!({"transport": "vduse", "name": "d", "null": "1G", "serial": "--readonly"}),
                None,
                "",
            ),
        ];
        for (s, key, text) in cases {
            match ExportArgs::parse(&spec(s.clone())) {
                Ok(_) if text.is_empty() => {}
                Ok(_) => panic!("{s} was accepted"),
                Err(e) => {
                    assert_eq!(e.key.as_deref(), key, "{s}: {e}");
                    assert!(e.message.contains(text), "{s}: {e}");
                    assert!(!e.message.contains("Usage"), "{e}");
                }
            }
        }
    }

    #[test]
    fn a_command_line_round_trips() {
        let cmd = command("vduse").unwrap();
        let m = cmd
            .try_get_matches_from([
                "--name",
                "d1",
                "--memory",
                "64M",
                "--readonly",
                "--queue-cpus",
                "0,1",
            ])
            .unwrap();
        let s = from_matches("vduse", &m);
        assert_eq!(
            Value::Object(s.clone()),
            json!({"transport": "vduse", "name": "d1", "memory": "64M", "readonly": true,
                   "queue-cpus": "0,1"})
        );
        assert_eq!(
            command_line(&s),
            "vudev export vduse --memory 64M --name d1 --queue-cpus 0,1 --readonly"
        );
    }
}
