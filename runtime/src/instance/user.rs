//! Resolving an image's `User` (`name`, `uid`, `name:group`, `uid:gid`) against the rootfs's
//! `/etc/passwd` and `/etc/group`, as Docker and runc do.

/// The identity the instance's process runs as.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub home: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    #[error("user {0:?} not found in the image's /etc/passwd")]
    UnknownUser(String),
    #[error("group {0:?} not found in the image's /etc/group")]
    UnknownGroup(String),
    #[error("user spec {0:?} is empty on one side of ':'")]
    Malformed(String),
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

fn passwd_entries(passwd: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    passwd.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 7 || line.starts_with('#') {
            return None;
        }
        Some(PasswdEntry {
            name: fields[0],
            uid: fields[2].parse().ok()?,
            gid: fields[3].parse().ok()?,
            home: fields[5],
        })
    })
}

struct GroupEntry<'a> {
    name: &'a str,
    gid: u32,
    members: Vec<&'a str>,
}

fn group_entries(group: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    group.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 4 || line.starts_with('#') {
            return None;
        }
        Some(GroupEntry {
            name: fields[0],
            gid: fields[2].parse().ok()?,
            members: fields[3].split(',').filter(|m| !m.is_empty()).collect(),
        })
    })
}

/// Resolves `spec` (empty means root). `passwd` and `group` are the files' contents (empty when
/// the image has none).
pub fn resolve_user(spec: &str, passwd: &str, group: &str) -> Result<ResolvedUser, UserError> {
    let spec = spec.trim();
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => {
            if u.is_empty() || g.is_empty() {
                return Err(UserError::Malformed(spec.to_owned()));
            }
            (u, Some(g))
        }
        None => (if spec.is_empty() { "0" } else { spec }, None),
    };

    let entry = passwd_entries(passwd).find(|e| match user_part.parse::<u32>() {
        Ok(uid) => e.uid == uid,
        Err(_) => e.name == user_part,
    });
    let (uid, mut gid, home, name) = match (entry, user_part.parse::<u32>()) {
        (Some(e), _) => (e.uid, e.gid, e.home.to_owned(), Some(e.name.to_owned())),
        // A numeric uid absent from passwd is allowed (group 0, home /), as in Docker.
        (None, Ok(uid)) => (uid, 0, "/".to_owned(), None),
        (None, Err(_)) => return Err(UserError::UnknownUser(user_part.to_owned())),
    };

    if let Some(g) = group_part {
        gid = match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group_entries(group)
                .find(|e| e.name == g)
                .map(|e| e.gid)
                .ok_or_else(|| UserError::UnknownGroup(g.to_owned()))?,
        };
    }

    let mut additional_gids: Vec<u32> = match (&name, group_part) {
        (Some(name), None) => group_entries(group)
            .filter(|e| e.members.contains(&name.as_str()) && e.gid != gid)
            .map(|e| e.gid)
            .collect(),
        _ => Vec::new(),
    };
    additional_gids.sort_unstable();
    additional_gids.dedup();
    Ok(ResolvedUser {
        uid,
        gid,
        additional_gids,
        home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\napp:x:1000:\nstaff:x:50:app,other\n";

    #[test]
    fn resolves_the_forms_docker_accepts() {
        let cases = [
            ("", 0, 0, vec![], "/root"),
            ("root", 0, 0, vec![], "/root"),
            ("app", 1000, 1000, vec![50], "/home/app"),
            ("1000", 1000, 1000, vec![50], "/home/app"),
            ("app:staff", 1000, 50, vec![], "/home/app"),
            ("app:7", 1000, 7, vec![], "/home/app"),
            ("4242", 4242, 0, vec![], "/"),
            ("4242:4242", 4242, 4242, vec![], "/"),
        ];
        for (spec, uid, gid, extra, home) in cases {
            let u = resolve_user(spec, PASSWD, GROUP).unwrap();
            assert_eq!(
                (u.uid, u.gid, u.additional_gids, u.home.as_str()),
                (uid, gid, extra, home),
                "{spec}"
            );
        }
    }

    #[test]
    fn unknown_names_are_errors() {
        assert_eq!(
            resolve_user("nobody", PASSWD, GROUP),
            Err(UserError::UnknownUser("nobody".into()))
        );
        assert_eq!(
            resolve_user("app:wheel", PASSWD, GROUP),
            Err(UserError::UnknownGroup("wheel".into()))
        );
        assert_eq!(
            resolve_user("app:", PASSWD, GROUP),
            Err(UserError::Malformed("app:".into()))
        );
        assert_eq!(
            resolve_user("app", "", ""),
            Err(UserError::UnknownUser("app".into()))
        );
    }
}
