//! The daemon's own record of the exports added at run time (`serve-exports.json` in the
//! state directory), so that a restarted daemon serves them again. Written atomically: a
//! crash leaves the old record or the new one, never half of one.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::spec::Spec;

/// The record's file.
pub struct Record {
    path: PathBuf,
}

impl Record {
    /// The record in `dir`.
    pub fn new(dir: &Path) -> Record {
        Record {
            path: dir.join("serve-exports.json"),
        }
    }

    /// The specs recorded; none if there is no record yet. A record that cannot be read is
    /// reported and set aside (see [`Record::set_aside`]): the daemon then serves its config
    /// only, and nothing recorded is lost for good.
    pub fn load(&self) -> Vec<Spec> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => {
                self.set_aside(&format!("it cannot be read ({e})"));
                return Vec::new();
            }
        };
        match serde_json::from_str::<Vec<Value>>(&text) {
            Ok(items) => items
                .into_iter()
                .filter_map(|v| match v {
                    Value::Object(spec) => Some(spec),
                    _ => None,
                })
                .collect(),
            Err(e) => {
                self.set_aside(&format!("it is not a record of exports ({e})"));
                Vec::new()
            }
        }
    }

    /// Renames the record to `serve-exports.json.bad` (for a person to look at) before a
    /// new one replaces it.
    pub fn set_aside(&self, why: &str) {
        let aside = self.path.with_extension("json.bad");
        match std::fs::rename(&self.path, &aside) {
            Ok(()) => tracing::error!(
                "{}: {why}: kept as {}; the exports in it are not served",
                self.path.display(),
                aside.display()
            ),
            Err(e) => tracing::error!("{}: {why}; cannot set it aside: {e}", self.path.display()),
        }
    }

    /// Replaces the record with `specs`.
    pub fn save<'a>(&self, specs: impl Iterator<Item = &'a Spec>) -> io::Result<()> {
        let items: Vec<&Spec> = specs.collect();
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = self.path.with_extension("json.tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(serde_json::to_string_pretty(&items)?.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        File::open(dir)?.sync_all()
    }
}
