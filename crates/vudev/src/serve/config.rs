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
//! Top-level keys, before the first table: `user` (and `group`) to serve the data as that
//! user, as `--user`/`--group` would (which win over them).
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
    user: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
    #[serde(default)]
    export: Vec<Spanned<BTreeMap<Spanned<String>, Spanned<toml::Value>>>>,
}

/// A checked config: its exports in file order.
#[derive(Debug, Default)]
pub struct Config {
    /// `user`: the uid to serve as, and the user's primary group if it has an entry.
    pub user: Option<(u32, Option<u32>)>,
    /// `group`: the gid to serve as.
    pub group: Option<u32>,
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
            "{name}{at}: {}: a config holds `user`, `group` and [[export]] tables only",
            e.message().trim_end()
        )
    })?;
    let mut config = Config::default();
    if let Some(user) = &file.user {
        let at = line(user.span().start);
        config.user = Some(
            vudev_core::socket::user_and_group(user.get_ref())
                .map_err(|e| format!("{name}:{at}: user: {e}"))?,
        );
    }
    if let Some(group) = &file.group {
        let at = line(group.span().start);
        if file.user.is_none() {
            return Err(format!(
                "{name}:{at}: group is the group to serve as `user`: give the user too"
            ));
        }
        config.group = Some(
            vudev_core::socket::group_id(group.get_ref())
                .map_err(|e| format!("{name}:{at}: group: {e}"))?,
        );
    }
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
        assert_eq!(c.user, None);
    }

    #[test]
    fn reads_the_user_to_serve_as() {
        let c = parse("user = \"0\"\ngroup = \"0\"\n", "t.toml").unwrap();
        assert_eq!((c.user.map(|u| u.0), c.group), (Some(0), Some(0)));
        let c = parse("user = \"root\"\n", "t.toml").unwrap();
        assert_eq!(c.user, Some((0, Some(0))));
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
            ("user = \"no-such-user-here\"\n", "t.toml:1: user: no such user 'no-such-user-here'"),
            ("group = \"root\"\n", "t.toml:1: group is the group to serve as `user`"),
            ("user = \"root\"\ngroup = \"no-such-group-here\"\n", "t.toml:2: group: "),
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
