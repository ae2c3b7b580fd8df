//! The systemd unit, sd_notify and the installer (filled by the systemd issue).
