//! The config file of `vudev serve` (TOML): one `[[export]]` table per export, whose keys are
//! the options of `vudev export` plus `transport`:
//!
//! ```toml
//! [[export]]
//! transport = "vduse"
//! name = "vdisk1"
//! file = "/srv/disk1.img"
//! num-queues = 4
//! ```
//!
//! Every error names the file and line, and nothing is created when there is one.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;
use toml::Spanned;

use super::spec::{ExportArgs, Spec};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    export: Vec<Spanned<BTreeMap<Spanned<String>, Spanned<toml::Value>>>>,
}

/// A checked config: its exports in file order.
#[derive(Debug, Default)]
pub struct Config {
    /// Each export's spec, and the spec parsed.
    pub exports: Vec<(Spec, ExportArgs)>,
}

/// Reads and checks a config file.
pub fn load(path: &Path) -> Result<Config, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the config {}: {e}", path.display()))?;
    parse(&text, &path.display().to_string())
}

/// Checks a config's text; `name` is what errors call the file.
pub fn parse(text: &str, name: &str) -> Result<Config, String> {
    let line = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
    let file: File = toml::from_str(text).map_err(|e| {
        let at = e
            .span()
            .map_or(String::new(), |s| format!(":{}", line(s.start)));
        format!(
            "{name}{at}: {}: a config holds [[export]] tables only",
            e.message().trim_end()
        )
    })?;
    let mut config = Config::default();
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    let mut sockets: BTreeMap<std::path::PathBuf, usize> = BTreeMap::new();
    for table in &file.export {
        let start = line(table.span().start);
        let mut spec = Spec::new();
        let mut lines = BTreeMap::new();
        for (key, value) in table.get_ref() {
            let at = line(key.span().start);
            let value = json(value.get_ref())
                .map_err(|e| format!("{name}:{at}: {}: {e}", key.get_ref()))?;
            lines.insert(key.get_ref().clone(), at);
            spec.insert(key.get_ref().clone(), value);
        }
        let args = ExportArgs::parse(&spec).map_err(|e| {
            let at = e.key.as_ref().and_then(|k| lines.get(k)).unwrap_or(&start);
            format!("{name}:{at}: {e}")
        })?;
        let export = args.name();
        if let Some(first) = names.insert(export.clone(), start) {
            return Err(format!(
                "{name}:{start}: a second export named '{export}' (the first is at line {first}): \
                 give each export its own name"
            ));
        }
        if let Some(socket) = args.socket() {
            let at = lines.get("socket").copied().unwrap_or(start);
            if let Some(first) = sockets.insert(socket.to_path_buf(), at) {
                return Err(format!(
                    "{name}:{at}: socket {} is already the socket of the export at line {first}: \
                     give each export its own socket",
                    socket.display()
                ));
            }
        }
        config.exports.push((spec, args));
    }
    Ok(config)
}

/// A TOML value as the JSON value the API would carry.
fn json(value: &toml::Value) -> Result<Value, String> {
    Ok(match value {
        toml::Value::String(s) => Value::String(s.clone()),
        toml::Value::Integer(i) => Value::from(*i),
        toml::Value::Boolean(b) => Value::Bool(*b),
        toml::Value::Array(items) => {
            Value::Array(items.iter().map(json).collect::<Result<_, _>>()?)
        }
        toml::Value::Float(_) => return Err("a whole number is needed here".into()),
        toml::Value::Datetime(_) | toml::Value::Table(_) => {
            return Err("give a string, a number, true/false or a list".into())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_exports_in_order() {
        let c = parse(
            "# two disks\n[[export]]\ntransport = \"vduse\"\nname = \"a\"\nnull = \"1G\"\n\
             num-queues = 2\n\n[[export]]\ntransport = \"vhost-user\"\nsocket = \"/run/v/b.sock\"\n\
             memory = \"64M\"\nqueue-cpus = [0]\n",
            "t.toml",
        )
        .unwrap();
        let names: Vec<String> = c.exports.iter().map(|(_, a)| a.name()).collect();
        assert_eq!(names, ["a", "b"]);
    }

    #[test]
    fn errors_name_the_line_and_the_fix() {
        let cases = [
            ("[[export]]\ntransport = \"vduse\"\nname = \"a\"\nnull = \"1G\"\nnum-queue = 2\n",
             "t.toml:5: unknown option 'num-queue'"),
            ("[[export]]\ntransport = \"vduse\"\nname = \"a\"\nnull = \"1G\"\n\
              [[export]]\ntransport = \"vduse\"\nname = \"a\"\nmemory = \"1M\"\n",
             "t.toml:5: a second export named 'a' (the first is at line 1)"),
            ("[[export]]\ntransport = \"vhost-user\"\nsocket = \"/s\"\nnull = \"1G\"\n\
              [[export]]\ntransport = \"vhost-user\"\nname = \"b\"\nsocket = \"/s\"\nnull = \"1G\"\n",
             "t.toml:8: socket /s is already the socket of the export at line 3"),
            ("[[export]]\ntransport = \"vduse\"\nname = \"a\"\nnull = \"12x\"\n", "t.toml:1: invalid size"),
            ("[[export]]\ntransport = \"vduse\"\nname = \"a\"\nnull = \"1G\"\nnum-queues = 1.5\n",
             "t.toml:5: num-queues: a whole number"),
            ("[exports]\n", "t.toml:1: unknown field"),
            ("[[export]]\ntransport = \"vduse\"\nname = \"a\nnull = \"1G\"\n", "t.toml:3:"),
            ("[[export]]\ntransport = \"vduse\"\nname = \"a\"\nnull = \"1G\"\nreadonly = 1\n",
             "t.toml:5: readonly is a switch"),
        ];
        for (text, want) in cases {
            let e = parse(text, "t.toml").unwrap_err();
            assert!(e.starts_with(want), "{text:?}\ngave: {e}\nwanted: {want}");
        }
    }
}
