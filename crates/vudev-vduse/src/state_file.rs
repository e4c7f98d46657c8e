//! The state file of a VDUSE export (`STATE_DIR/NAME.state`, default `/run/vudev`): what the
//! device was created with, and its in-flight area. The kernel keeps a VDUSE device and its
//! rings when the daemon dies, but not which requests the daemon had taken off the rings; this
//! file does, so that the same `vudev export` command run again can check that it describes
//! the same device, adopt it, and finish those requests.
//!
//! Layout: a 4 KiB header (magic `VUDEVST1`, device id, queue count and size, features, config
//! length and bytes), then the in-flight area in the layout of [`vudev_core::inflight`].

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vudev_core::inflight::{queue_region_size, InflightArea};

const MAGIC: &[u8; 8] = b"VUDEVST1";
const HEADER_SIZE: u64 = 4096;
/// Where the config bytes start in the header.
const CONFIG_AT: usize = 32;

/// What a VDUSE device was created with; a restarted daemon adopts only an equal one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DeviceShape {
    /// virtio device id.
    pub device_id: u32,
    /// Offered features.
    pub features: u64,
    /// Number of queues.
    pub num_queues: u16,
    /// Largest queue size.
    pub queue_size: u16,
    /// Configuration space.
    pub config: Vec<u8>,
}

impl DeviceShape {
    fn area_size(&self) -> u64 {
        u64::from(self.num_queues) * queue_region_size(self.queue_size) as u64
    }

    /// Maps the in-flight area after the header of a state file of this shape.
    fn map_area(&self, file: File) -> io::Result<Arc<InflightArea>> {
        let size = self.area_size();
        InflightArea::map(file, HEADER_SIZE, size, self.num_queues, self.queue_size)
    }

    fn encode(&self) -> io::Result<Vec<u8>> {
        if self.config.len() > HEADER_SIZE as usize - CONFIG_AT {
            return Err(io::Error::other(
                "config space too large for the state file",
            ));
        }
        let mut h = Vec::with_capacity(CONFIG_AT + self.config.len());
        h.extend_from_slice(MAGIC);
        h.extend_from_slice(&self.device_id.to_le_bytes());
        h.extend_from_slice(&self.num_queues.to_le_bytes());
        h.extend_from_slice(&self.queue_size.to_le_bytes());
        h.extend_from_slice(&self.features.to_le_bytes());
        h.extend_from_slice(&(self.config.len() as u32).to_le_bytes());
        h.extend_from_slice(&[0; 4]);
        h.extend_from_slice(&self.config);
        Ok(h)
    }

    fn decode(h: &[u8]) -> Option<DeviceShape> {
        let u16_at = |i: usize| Some(u16::from_le_bytes(h.get(i..i + 2)?.try_into().ok()?));
        let u32_at = |i: usize| Some(u32::from_le_bytes(h.get(i..i + 4)?.try_into().ok()?));
        let u64_at = |i: usize| Some(u64::from_le_bytes(h.get(i..i + 8)?.try_into().ok()?));
        if h.get(..8)? != MAGIC {
            return None;
        }
        let len = usize::try_from(u32_at(24)?).ok()?;
        Some(DeviceShape {
            device_id: u32_at(8)?,
            num_queues: u16_at(12)?,
            queue_size: u16_at(14)?,
            features: u64_at(16)?,
            config: h.get(CONFIG_AT..CONFIG_AT.checked_add(len)?)?.to_vec(),
        })
    }
}

/// An open state file with its in-flight area mapped.
#[derive(Debug)]
pub(crate) struct StateFile {
    path: PathBuf,
    file: File,
    area: Arc<InflightArea>,
}

fn path_of(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.state"))
}

fn open_file(path: &Path, create: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(create)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
}

impl StateFile {
    /// Creates (or replaces) the state file of a newly created device; `opened` is the file
    /// already open (by the authority), else it is opened here by path.
    pub fn create(
        dir: &Path,
        name: &str,
        shape: &DeviceShape,
        opened: Option<&File>,
    ) -> io::Result<StateFile> {
        let with_path = |what: &str, e: io::Error, p: &Path| {
            io::Error::new(e.kind(), format!("{what} {}: {e}", p.display()))
        };
        let path = path_of(dir, name);
        let file = match opened {
            Some(f) => {
                let f = f.try_clone()?;
                f.set_len(0)?;
                f
            }
            None => {
                std::fs::create_dir_all(dir).map_err(|e| with_path("cannot create", e, dir))?;
                open_file(&path, true).map_err(|e| with_path("cannot create", e, &path))?
            }
        };
        file.write_all_at(&shape.encode()?, 0)?;
        file.set_len(HEADER_SIZE + shape.area_size())?;
        let area = shape.map_area(file.try_clone()?)?;
        Ok(StateFile { path, file, area })
    }

    /// Opens the state file a previous daemon left for `name` (`opened`, or by path): `None`
    /// if there is none.
    pub fn open(
        dir: &Path,
        name: &str,
        opened: Option<&File>,
    ) -> io::Result<Option<(StateFile, DeviceShape)>> {
        let path = path_of(dir, name);
        let file = match opened.map(File::try_clone) {
            Some(f) => f?,
            None => match open_file(&path, false) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            },
        };
        let bad = || {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: not a vudev state file", path.display()),
            )
        };
        let mut header = vec![0u8; HEADER_SIZE as usize];
        file.read_exact_at(&mut header, 0).map_err(|_| bad())?;
        let shape = DeviceShape::decode(&header).ok_or_else(bad)?;
        let area = shape.map_area(file.try_clone()?)?;
        Ok(Some((StateFile { path, file, area }, shape)))
    }

    /// Records a changed config space (an online resize), so that a restarted daemon adopts
    /// the device as it is now.
    pub fn set_config(&self, config: &[u8]) -> io::Result<()> {
        if config.len() > HEADER_SIZE as usize - CONFIG_AT {
            return Err(io::Error::other(
                "config space too large for the state file",
            ));
        }
        self.file.write_all_at(config, CONFIG_AT as u64)?;
        self.file
            .write_all_at(&(config.len() as u32).to_le_bytes(), 24)?;
        self.file.sync_data()
    }

    /// The in-flight area.
    pub fn area(&self) -> &Arc<InflightArea> {
        &self.area
    }

    /// Deletes the file (the device is gone).
    pub fn remove(self) {
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            // Removed by whoever destroyed the device (a sandboxed export's helper, which may
            // write the directory when this process may not).
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("cannot remove {}: {e}", self.path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> DeviceShape {
        DeviceShape {
            device_id: 2,
            features: 0x1_3000_0e54,
            num_queues: 2,
            queue_size: 256,
            config: (0..60).collect(),
        }
    }

    #[test]
    fn a_restarted_daemon_finds_the_shape_and_the_records() {
        let dir = std::env::temp_dir().join(format!("vudev-state-{}", std::process::id()));
        let created = StateFile::create(&dir, "d0", &shape(), None).unwrap();
        let mut q = created.area().queue(1, 256).unwrap();
        q.fresh(0);
        q.start(17);
        drop(created);
        let (again, found) = StateFile::open(&dir, "d0", None).unwrap().unwrap();
        assert_eq!(found, shape());
        // A resize records the new config; the records stay.
        let resized: Vec<u8> = (100..160).collect();
        again.set_config(&resized).unwrap();
        let (again, found) = StateFile::open(&dir, "d0", None).unwrap().unwrap();
        assert_eq!(found.config, resized);
        assert_eq!(found.num_queues, 2);
        assert_eq!(
            again.area().queue(1, 256).unwrap().recover(0).heads,
            vec![17]
        );
        again.remove();
        assert!(StateFile::open(&dir, "d0", None).unwrap().is_none());
        std::fs::write(dir.join("junk.state"), b"not a state file").unwrap();
        assert!(StateFile::open(&dir, "junk", None).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_state_file_passed_open_is_used_without_its_path() {
        let dir = std::env::temp_dir().join(format!("vudev-state-fd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("elsewhere");
        let opened = open_file(&path, true).unwrap();
        // Another directory, where nothing may be made: only the open file is written.
        let none = Path::new("/nonexistent-vudev-dir");
        let created = StateFile::create(none, "d1", &shape(), Some(&opened)).unwrap();
        created.area().queue(0, 256).unwrap().fresh(0);
        created.set_config(&[7; 60]).unwrap();
        drop(created);
        let (_, found) = StateFile::open(none, "d1", Some(&opened)).unwrap().unwrap();
        assert_eq!(found.config, vec![7; 60]);
        assert!(!none.exists());
        // An empty file (just made by the helper) is not a state file: the caller makes one.
        let empty = open_file(&dir.join("empty"), true).unwrap();
        assert!(StateFile::open(none, "d2", Some(&empty)).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
