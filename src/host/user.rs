//! The user mkt runs as, and the CPUs it may use: what builds and guests
//! recreate of the host.

use std::path::PathBuf;

/// The invoking user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub group: String,
    /// `$HOME`, not the passwd entry: the home a developer works in is the
    /// one shared at the same path.
    pub home: PathBuf,
}

/// The invoking user (real ids).
pub fn current() -> User {
    let uid = nix::unistd::getuid();
    let gid = nix::unistd::getgid();
    let pw = nix::unistd::User::from_uid(uid).ok().flatten();
    let name = pw
        .as_ref()
        .map(|u| u.name.clone())
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| format!("u{uid}"));
    let group = nix::unistd::Group::from_gid(gid)
        .ok()
        .flatten()
        .map(|g| g.name)
        .unwrap_or_else(|| name.clone());
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .or(pw.map(|u| u.dir))
        .unwrap_or_else(|| "/".into());
    User {
        name,
        uid: uid.as_raw(),
        gid: gid.as_raw(),
        group,
        home,
    }
}

/// The name of `uid` in the passwd database, else `$USER`, else the number.
pub fn name_of(uid: u32) -> String {
    nix::unistd::User::from_uid(uid.into())
        .ok()
        .flatten()
        .map(|u| u.name)
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| uid.to_string())
}

/// The CPUs this process may run on (its affinity mask), at least 1.
pub fn available_cpus() -> u32 {
    nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
        .map(|set| {
            (0..nix::sched::CpuSet::count())
                .filter(|&i| set.is_set(i).unwrap_or(false))
                .count() as u32
        })
        .unwrap_or(1)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_user_matches_the_process() {
        let u = current();
        assert_eq!(u.uid, nix::unistd::getuid().as_raw());
        assert_eq!(u.gid, nix::unistd::getgid().as_raw());
        assert!(!u.name.is_empty() && !u.group.is_empty());
        assert_eq!(name_of(0), "root");
        let cpus = available_cpus();
        assert!(
            cpus >= 1
                && cpus as usize <= std::thread::available_parallelism().unwrap().get().max(1) * 64
        );
    }
}
