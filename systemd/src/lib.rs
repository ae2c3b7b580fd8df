//! What lull speaks of systemd's service protocols, written from their documentation
//! (sd_notify(3), sd_listen_fds(3), sd_watchdog_enabled(3)) without libsystemd:
//!
//! - [`notify`]: state changes (`READY=1`, `STATUS=...`, `STOPPING=1`, `WATCHDOG=1`,
//!   `MAINPID=...`) sent to `$NOTIFY_SOCKET`, and file descriptors handed to the service
//!   manager's fd store (`FDSTORE=1` with `FDNAME=...`) with [`notify_with_fds`];
//! - [`listen`]: file descriptors passed at exec (`LISTEN_PID`, `LISTEN_FDS`,
//!   `LISTEN_FDNAMES`, starting at fd 3), whether by systemd (socket activation, or its fd
//!   store after a restart) or by a lull daemon replacing itself;
//! - [`watchdog_interval`]: how often the manager wants `WATCHDOG=1`;
//! - [`unit`] and [`install`]: the `lull.service` unit and `lull install`/`lull uninstall`.
//!
//! Nothing here needs systemd to run: without `$NOTIFY_SOCKET` a notification is a no-op and
//! without `LISTEN_PID` there are no inherited fds.

pub mod install;
pub mod listen;
pub mod notify;
pub mod unit;

use std::time::Duration;

pub use listen::{ListenError, ListenFd, listen_fds};
pub use notify::{NotifyError, notify, notify_to, notify_with_fds};

/// Errors reading the watchdog's settings from the environment.
#[derive(Debug, thiserror::Error)]
pub enum WatchdogError {
    #[error("WATCHDOG_USEC is not a positive number of microseconds: {value:?}")]
    Usec { value: String },
    #[error("WATCHDOG_PID is not a process id: {value:?}")]
    Pid { value: String },
}

/// The watchdog interval the service manager asked this process for (`WATCHDOG_USEC`, when
/// `WATCHDOG_PID` is unset or names this process); send `WATCHDOG=1` more often than that,
/// e.g. every half of it. `None` when no watchdog is set up.
pub fn watchdog_interval() -> Result<Option<Duration>, WatchdogError> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    watchdog_from(std::process::id(), usec.as_deref(), pid.as_deref())
}

/// [`watchdog_interval`] for process `me` given the two variables' values.
pub fn watchdog_from(
    me: u32,
    usec: Option<&str>,
    pid: Option<&str>,
) -> Result<Option<Duration>, WatchdogError> {
    let Some(usec) = usec else {
        return Ok(None);
    };
    if let Some(pid) = pid {
        let pid: u32 = pid.trim().parse().map_err(|_| WatchdogError::Pid {
            value: pid.to_owned(),
        })?;
        if pid != me {
            return Ok(None);
        }
    }
    match usec.trim().parse::<u64>() {
        Ok(0) | Err(_) => Err(WatchdogError::Usec {
            value: usec.to_owned(),
        }),
        Ok(us) => Ok(Some(Duration::from_micros(us))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_interval_follows_usec_and_pid() {
        assert_eq!(watchdog_from(7, None, None).unwrap(), None);
        assert_eq!(
            watchdog_from(7, Some("30000000"), None).unwrap(),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            watchdog_from(7, Some("500000"), Some("7")).unwrap(),
            Some(Duration::from_millis(500))
        );
        // Meant for another process (a parent that did not clear its environment).
        assert_eq!(watchdog_from(7, Some("500000"), Some("8")).unwrap(), None);
        assert!(matches!(
            watchdog_from(7, Some("0"), None),
            Err(WatchdogError::Usec { .. })
        ));
        assert!(matches!(
            watchdog_from(7, Some("soon"), None),
            Err(WatchdogError::Usec { .. })
        ));
        assert!(matches!(
            watchdog_from(7, Some("1"), Some("me")),
            Err(WatchdogError::Pid { .. })
        ));
    }
}
