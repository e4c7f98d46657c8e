//! The backend-to-frontend channel of the session being served, and the one message vudev
//! sends on it: CONFIG_CHANGE_MSG (an online resize).

use std::io;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use crate::wire::{send_whole, HDR_LEN, HDR_VERSION};

/// Backend request: the device's config space changed; the frontend reads it again.
const CONFIG_CHANGE_MSG: u32 = 2;

/// The channel of the session being served, shared with whoever has something to tell the
/// frontend (an online resize). Empty when no frontend is connected or none gave a channel.
#[derive(Clone, Debug, Default)]
pub struct FrontendChannel(Arc<Mutex<Option<UnixStream>>>);

impl FrontendChannel {
    pub(crate) fn set(&self, channel: Option<UnixStream>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = channel;
    }

    /// Tells the frontend that the config space changed (it then reads it with GET_CONFIG):
    /// false if there is no channel to tell it on. Never blocks: a frontend that does not
    /// read its channel gets an error here, not a stalled caller.
    pub fn config_changed(&self) -> io::Result<bool> {
        let guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let Some(channel) = guard.as_ref() else {
            return Ok(false);
        };
        let mut msg = [0u8; HDR_LEN];
        msg[0..4].copy_from_slice(&CONFIG_CHANGE_MSG.to_le_bytes());
        msg[4..8].copy_from_slice(&HDR_VERSION.to_le_bytes());
        send_whole(channel, &msg).map_err(|e| {
            io::Error::other(format!(
                "the frontend does not take messages on its channel ({e})"
            ))
        })?;
        Ok(true)
    }
}
