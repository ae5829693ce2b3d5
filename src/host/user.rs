//! The user mkt runs as, and the CPUs it may use: what builds and guests
//! recreate of the host.

use std::path::{Path, PathBuf};

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
pub(crate) fn name_of(uid: u32) -> String {
    nix::unistd::User::from_uid(uid.into())
        .ok()
        .flatten()
        .map(|u| u.name)
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| uid.to_string())
}

/// The CPUs this process may run on (its affinity mask), at least 1.
pub(crate) fn available_cpus() -> u32 {
    nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
        .map(|set| {
            (0..nix::sched::CpuSet::count())
                .filter(|&i| set.is_set(i).unwrap_or(false))
                .count() as u32
        })
        .unwrap_or(1)
        .max(1)
}

/// CPUs this process may really use: the affinity mask, capped by the
/// cgroup v2 CPU quota of its cgroup and every ancestor.
pub(crate) fn usable_cpus() -> u32 {
    let cpus = available_cpus();
    let quota = procfs::process::Process::myself()
        .and_then(|p| p.cgroups())
        .ok()
        .and_then(|c| c.into_iter().find(|g| g.hierarchy == 0))
        .and_then(|g| cgroup_quota(&g.pathname, |p| std::fs::read_to_string(p).ok()));
    quota.map_or(cpus, |q| q.min(cpus)).max(1)
}

/// The smallest `cpu.max` quota (in CPUs, rounded up) on the path of the
/// cgroup v2 `path` (as `/proc/self/cgroup` names it) and its ancestors.
pub(crate) fn cgroup_quota(path: &str, read: impl Fn(&Path) -> Option<String>) -> Option<u32> {
    let mut dir = PathBuf::from("/sys/fs/cgroup").join(path.trim_start_matches('/'));
    let mut best: Option<u32> = None;
    loop {
        if let Some(q) = read(&dir.join("cpu.max")).and_then(|t| parse_cpu_max(&t)) {
            best = Some(best.map_or(q, |b| b.min(q)));
        }
        if dir == Path::new("/sys/fs/cgroup") || !dir.pop() {
            return best;
        }
    }
}

/// `cpu.max` is `QUOTA PERIOD` or `max PERIOD`: CPUs, rounded up.
pub(crate) fn parse_cpu_max(text: &str) -> Option<u32> {
    let mut it = text.split_whitespace();
    let quota: u64 = it.next()?.parse().ok()?;
    let period: u64 = it.next()?.parse().ok().filter(|&p| p > 0)?;
    Some(quota.div_ceil(period).max(1) as u32)
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

    #[test]
    fn cpu_max_and_cgroup_quota() {
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("150000 100000\n"), Some(2));
        assert_eq!(parse_cpu_max("50000 100000"), Some(1));
        assert_eq!(parse_cpu_max("400000 100000"), Some(4));
        let read = |p: &Path| match p.to_str().unwrap() {
            "/sys/fs/cgroup/a/b/cpu.max" => Some("max 100000".to_string()),
            "/sys/fs/cgroup/a/cpu.max" => Some("300000 100000".to_string()),
            _ => None,
        };
        assert_eq!(cgroup_quota("/a/b", read), Some(3));
        assert_eq!(cgroup_quota("/", read), None);
        assert!(usable_cpus() >= 1);
    }
}
