//! The daemon's own record of the exports added at run time (`serve-exports.json` in the
//! state directory), so that a restarted daemon serves them again. Written atomically: a
//! crash leaves the old record or the new one, never half of one.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use super::spec::Spec;
use crate::sandbox::helper::Client;

/// The record's name in the state directory: `serve-exports.json`, or for a daemon serving
/// as a user `serve-exports-UID.json` (written by its helper for a process that may be
/// hostile, it is never read by a daemon that runs as root).
pub fn record_name(uid: Option<u32>) -> String {
    match uid {
        Some(uid) => format!("serve-exports-{uid}.json"),
        None => "serve-exports.json".into(),
    }
}

/// The record's file.
pub struct Record {
    path: PathBuf,
    /// A daemon serving as `user` may not write in the state directory: its helper writes
    /// the record (at this very path) for it.
    helper: Option<Arc<Client>>,
}

impl Record {
    /// The record in `dir`, written by this process or (when it serves as `uid`) by its
    /// privileged helper.
    pub fn new(dir: &Path, helper: Option<(Arc<Client>, u32)>) -> Record {
        let uid = helper.as_ref().map(|(_, uid)| *uid);
        Record {
            path: dir.join(record_name(uid)),
            helper: helper.map(|(h, _)| h),
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
        let renamed = match &self.helper {
            Some(helper) => helper.set_aside_record(),
            None => std::fs::rename(&self.path, &aside),
        };
        match renamed {
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
        let text = serde_json::to_string_pretty(&items)?;
        match &self.helper {
            Some(helper) => helper.save_record(text),
            None => crate::durable::replace_file(&self.path, text.as_bytes()),
        }
    }
}
