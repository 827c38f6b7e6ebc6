//! What the bench learns from `/proc`: the machine it runs on (cores, CPU model,
//! memory, kernel, the filesystem under the data dir) and, per process, CPU time by
//! thread name and resident memory.
//!
//! CPU times are read in clock ticks from `/proc/<pid>/stat`; Linux reports them in
//! `USER_HZ`, which is 100 on every mainstream architecture (reading `sysconf` would
//! need `unsafe`, which the workspace denies).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Value, json};

/// Clock ticks per second of `/proc/<pid>/stat` times.
const USER_HZ: f64 = 100.0;

/// The machine the bench ran on.
#[derive(Debug, Clone)]
pub struct Machine {
    /// Logical CPUs available to this process.
    pub cpus: usize,
    /// `model name` from `/proc/cpuinfo`.
    pub cpu_model: String,
    /// `MemTotal` in bytes.
    pub mem_bytes: u64,
    /// Kernel release.
    pub kernel: String,
}

impl Machine {
    /// Reads the machine's description from `/proc`.
    pub fn detect() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == "model name").then(|| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        Machine {
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            cpu_model,
            mem_bytes: meminfo_kib("MemTotal").unwrap_or(0) * 1024,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into()),
        }
    }

    /// One line for the report header.
    pub fn describe(&self) -> String {
        format!(
            "{} CPUs ({}), {:.1} GiB RAM, Linux {}",
            self.cpus,
            self.cpu_model,
            self.mem_bytes as f64 / (1u64 << 30) as f64,
            self.kernel
        )
    }

    /// JSON form.
    pub fn to_json(&self) -> Value {
        json!({
            "cpus": self.cpus,
            "cpu_model": self.cpu_model,
            "mem_bytes": self.mem_bytes,
            "kernel": self.kernel,
        })
    }
}

fn meminfo_kib(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The filesystem a path is on: `(fstype, device, mount point)` from `/proc/mounts`
/// (the longest mount point that is a prefix of the path).
pub fn filesystem_of(path: &Path) -> (String, String, String) {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut best: Option<(usize, (String, String, String))> = None;
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        let mount = Path::new(f[1]);
        if path.starts_with(mount) {
            let depth = mount.components().count();
            if best.as_ref().is_none_or(|(d, _)| depth >= *d) {
                best = Some((
                    depth,
                    (f[2].to_string(), f[0].to_string(), f[1].to_string()),
                ));
            }
        }
    }
    best.map(|(_, v)| v)
        .unwrap_or_else(|| ("unknown".into(), "unknown".into(), "/".into()))
}

/// Fields of `/proc/<pid>/stat` after the command name (field 3 onwards).
fn stat_fields(text: &str) -> Option<(String, Vec<&str>)> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_string();
    Some((comm, text[close + 1..].split_whitespace().collect()))
}

fn ticks_of(fields: &[&str]) -> u64 {
    // utime and stime are fields 14 and 15, i.e. indexes 11 and 12 after the name.
    let get = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    get(11) + get(12)
}

/// CPU time of a process (all threads) in seconds; `pid` may be `"self"`.
pub fn process_cpu_secs(pid: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|t| stat_fields(&t).map(|(_, f)| ticks_of(&f)))
        .unwrap_or(0) as f64
        / USER_HZ
}

/// CPU seconds of a process's live threads, summed by thread name (tokio workers and
/// blocking threads share `tokio-runtime-w`; the log writer is `eventlog-writer`).
pub fn thread_cpu_secs(pid: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some((comm, fields)) = stat_fields(&text) {
            *out.entry(comm).or_insert(0.0) += ticks_of(&fields) as f64 / USER_HZ;
        }
    }
    out
}

/// Machine-wide CPU time from the `cpu` line of `/proc/stat`, in seconds:
/// `(busy, steal)` where busy is everything but idle and iowait (steal included).
pub fn machine_cpu_secs() -> (f64, f64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return (0.0, 0.0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal (guest is inside user).
    let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
    (busy as f64 / USER_HZ, get(7) as f64 / USER_HZ)
}

/// A `kB` line of `/proc/<pid>/status` (e.g. `VmRSS`, `VmHWM`), in bytes.
pub fn status_bytes(pid: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        Some(rest.split_whitespace().next()?.parse::<u64>().ok()? * 1024)
    })
}

/// Bytes a process has caused to be written to storage (`/proc/<pid>/io`
/// `write_bytes`), when the kernel exposes it.
pub fn write_bytes(pid: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("write_bytes:")?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_spaces_in_the_name() {
        let line = "42 (tokio runtime) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0";
        let (comm, f) = stat_fields(line).unwrap();
        assert_eq!(comm, "tokio runtime");
        assert_eq!(ticks_of(&f), 300);
    }

    #[test]
    fn reads_this_process() {
        assert!(status_bytes("self", "VmRSS").unwrap() > 0);
        assert!(!thread_cpu_secs("self").is_empty());
        assert!(Machine::detect().cpus >= 1);
        assert!(machine_cpu_secs().0 > 0.0);
        assert_ne!(filesystem_of(Path::new("/")).0, "unknown");
    }
}
