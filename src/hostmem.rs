//! Host memory for large numeric buffers: zero-filled vectors placed, where the kernel
//! allows, on transparent huge pages.

use num_traits::Zero;

/// A zero-filled buffer of `len` elements. Buffers of 64 MiB and more (embedding tables and
/// their moments) are asked to live on transparent huge pages, before any page is touched:
/// their rows are read at random, and with 4 KiB pages nearly every row costs a TLB miss.
/// Where the kernel does not allow it the advice is ignored (results never depend on it).
pub fn zeroed<F: Zero + Clone>(len: usize) -> Vec<F> {
    let mut buf = vec![F::zero(); len];
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let bytes = std::mem::size_of_val(buf.as_slice());
        if bytes >= 64 << 20 {
            let start = buf.as_mut_ptr() as usize;
            let aligned = start.next_multiple_of(HUGE);
            let end = (start + bytes) / HUGE * HUGE;
            if end > aligned {
                // SAFETY: the range lies inside `buf`'s allocation and is 2 MiB-aligned;
                // MADV_HUGEPAGE changes only how the kernel backs the pages, not their
                // contents, and its failure is harmless.
                unsafe { libc::madvise(aligned as *mut libc::c_void, end - aligned, libc::MADV_HUGEPAGE) };
            }
        }
    }
    buf
}

/// The environment variable that, set to `0` (or `false`, `off`, `no`), turns [`Budget`]'s
/// refusal off.
pub const CHECK_VAR: &str = "DTRAIN_MEMORY_CHECK";

/// The environment variable that replaces the machine's available memory in [`Budget`]: a
/// byte count, with an optional `K`, `M`, `G` or `T` (binary) suffix.
pub const LIMIT_VAR: &str = "DTRAIN_MEMORY_LIMIT";

/// One large buffer (or set of them) a command is about to allocate.
#[derive(Debug, Clone)]
struct Claim {
    what: String,
    bytes: u64,
    /// The config field that sizes it, and what to do about it.
    field: String,
    remedy: String,
}

/// An account of the large buffers a command is about to allocate, against the memory this
/// process may use. A command claims each buffer before allocating it, and a claim that
/// would take the total past what is available is refused with every claim listed, instead
/// of the allocator aborting the process (or the kernel killing it) halfway through.
///
/// The account counts the buffers of parameter size (parameters, gradients, optimizer
/// moments, shadow weights, a teacher) and, for `train`, masked-LM `pretrain` and `predict`
/// on the CPU, an encoder's activations at the data's longest sequences; not a bag model's
/// activations, the backward pass's temporaries, batches, memory-mapped data or the rows a
/// bag model's table exchanges between ranks: what the command uses is more. One part may
/// be less: lazy Adam's moments for table rows no step touches are zero pages the kernel
/// backs only when written, yet they are counted.
#[derive(Debug)]
pub struct Budget {
    command: &'static str,
    /// Bytes available to this process, and where the figure comes from; `None` when unknown
    /// or when the check is turned off.
    available: Option<(u64, String)>,
    claims: Vec<Claim>,
}

impl Budget {
    /// A budget for `command`, sharing this machine's available memory ([`available`], or
    /// [`LIMIT_VAR`] when set) with the other `sharers - 1` processes of the job on this node
    /// (MPI ranks). Unchecked when [`CHECK_VAR`] is `0` (or `false`, `off`, `no`).
    pub fn new(command: &'static str, sharers: usize) -> crate::error::Result<Budget> {
        let env = |var: &str, v: &str, rule: &str| {
            crate::error::Error::Data(format!("environment variable {var}={v:?}: {rule}"))
        };
        let off = match std::env::var(CHECK_VAR) {
            Ok(v) => match v.trim().to_ascii_lowercase().as_str() {
                "0" | "false" | "off" | "no" => true,
                "" | "1" | "true" | "on" | "yes" => false,
                _ => {
                    return Err(env(
                        CHECK_VAR,
                        &v,
                        "must be 0 (or false, off, no) to turn the check off, 1 to keep it",
                    ))
                }
            },
            Err(_) => false,
        };
        let limit = match std::env::var(LIMIT_VAR) {
            Ok(v) => Some(parse_size(&v).ok_or_else(|| {
                env(
                    LIMIT_VAR,
                    &v,
                    "not a byte count below 16 EiB (a whole number, optionally followed by K, M, G or T)",
                )
            })?),
            Err(_) => None,
        };
        let machine = match limit {
            Some(bytes) => Some((bytes, LIMIT_VAR.to_string())),
            None => available(),
        };
        let available = if off { None } else { machine }.map(|(bytes, source)| {
            let n = sharers.max(1) as u64;
            if n == 1 {
                (bytes, source)
            } else {
                (bytes / n, format!("{source}, shared by {n} ranks on this node"))
            }
        });
        Ok(Budget::with_available(command, available))
    }

    /// A budget of exactly `available` bytes (`None`: unchecked).
    pub fn with_available(command: &'static str, available: Option<(u64, String)>) -> Budget {
        Budget { command, available, claims: Vec::new() }
    }

    /// Claims `bytes` for `what`, a buffer sized by config field `field`; `remedy` says how to
    /// make it smaller. Refused as [`Budget::check`] says.
    pub fn claim(
        &mut self,
        what: impl Into<String>,
        bytes: u64,
        field: impl Into<String>,
        remedy: impl Into<String>,
    ) -> crate::error::Result<()> {
        self.add(what, bytes, field, remedy);
        self.check()
    }

    /// Drops the last claim: a buffer held for a moment (a host copy on its way to a
    /// device), checked by [`Budget::claim`] but not kept in the account.
    pub fn release_last(&mut self) {
        self.claims.pop();
    }

    /// Adds a claim, as [`Budget::claim`], without checking: for buffers claimed together.
    pub fn add(
        &mut self,
        what: impl Into<String>,
        bytes: u64,
        field: impl Into<String>,
        remedy: impl Into<String>,
    ) {
        self.claims.push(Claim { what: what.into(), bytes, field: field.into(), remedy: remedy.into() });
    }

    /// Refuses the claims when together they exceed what is available, naming the field of
    /// the largest one and listing them all.
    pub fn check(&self) -> crate::error::Result<()> {
        let Some((available, source)) = &self.available else {
            return Ok(());
        };
        let total = self.claimed();
        let Some(largest) = self.claims.iter().max_by_key(|c| c.bytes).filter(|_| total > *available) else {
            return Ok(());
        };
        let parts: Vec<String> =
            self.claims.iter().map(|c| format!("{} {}", c.what, size_text(c.bytes))).collect();
        Err(crate::error::Error::config(
            self.command,
            largest.field.clone(),
            format!(
                "the run needs at least {} of memory ({}), and {} is available ({source}): {}; \
                 or set {CHECK_VAR}=0 to try anyway",
                size_text(total),
                parts.join(", "),
                size_text(*available),
                largest.remedy
            ),
        ))
    }

    /// One line on the claims and what they are checked against, for a run's first lines.
    pub fn summary(&self) -> String {
        let parts: Vec<String> =
            self.claims.iter().map(|c| format!("{} {}", c.what, size_text(c.bytes))).collect();
        let against = match &self.available {
            Some((bytes, source)) => format!("of {} available ({source})", size_text(*bytes)),
            None => "(not checked)".to_string(),
        };
        format!("{} in buffers ({}), {against}", size_text(self.claimed()), parts.join(", "))
    }

    /// The bytes claimed so far.
    pub fn claimed(&self) -> u64 {
        self.claims.iter().map(|c| c.bytes).fold(0, u64::saturating_add)
    }
}

/// A byte count such as `1048576`, `512M` or `2G` (binary multiples); `None` if malformed.
fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let (digits, shift) = match t.char_indices().last()? {
        (i, 'K' | 'k') => (&t[..i], 10),
        (i, 'M' | 'm') => (&t[..i], 20),
        (i, 'G' | 'g') => (&t[..i], 30),
        (i, 'T' | 't') => (&t[..i], 40),
        _ => (t, 0),
    };
    digits.trim().parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

/// `bytes` in GiB, MiB or KiB, whichever keeps a whole part, for messages.
fn size_text(bytes: u64) -> String {
    let (unit, shift) = match bytes {
        b if b >= 1 << 30 => ("GiB", 30),
        b if b >= 1 << 20 => ("MiB", 20),
        _ => ("KiB", 10),
    };
    format!("{:.1} {unit}", bytes as f64 / (1u64 << shift) as f64)
}

/// The memory this process may still allocate, in bytes, and where the figure comes from:
/// the kernel's `MemAvailable`, lowered to the headroom under the limits of the process's
/// control group and its ancestors, and under its address-space limit (`ulimit -v`), when
/// there are any. `None` where none can be read (not Linux).
pub fn available() -> Option<(u64, String)> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|text| {
        let kb = text.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?.trim().strip_suffix("kB")?;
        Some((kb.trim().parse::<u64>().ok()? * 1024, "MemAvailable in /proc/meminfo".to_string()))
    });
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|own| cgroup_headroom(std::path::Path::new("/sys/fs/cgroup"), &own));
    [meminfo, cgroup, address_space_headroom()].into_iter().flatten().min_by_key(|(bytes, _)| *bytes)
}

/// The address space left under `RLIMIT_AS` (`ulimit -v`): the limit less the process's
/// current size (`VmSize`). `None` without a limit.
fn address_space_headroom() -> Option<(u64, String)> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit through a valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut lim) } != 0 || lim.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = status.lines().find_map(|l| l.strip_prefix("VmSize:"))?.trim().strip_suffix("kB")?;
    let size = kb.trim().parse::<u64>().ok()? * 1024;
    Some((lim.rlim_cur.saturating_sub(size), "the address-space limit (ulimit -v)".to_string()))
}

/// The least headroom under the memory limits of the control group named in `own` (the text
/// of `/proc/self/cgroup`) and of its ancestors, the hierarchy mounted at `root`: cgroup v2
/// (`memory.max`) or v1 (the `memory` controller's `memory.limit_in_bytes`). Headroom is the
/// limit less the usage, with page cache other than shared memory counted as free (the
/// kernel reclaims it; tmpfs and MPI's shared segments it cannot). `None` without a limit.
fn cgroup_headroom(root: &std::path::Path, own: &str) -> Option<(u64, String)> {
    let read = |dir: &std::path::Path, name: &str| std::fs::read_to_string(dir.join(name)).ok();
    let num = |dir: &std::path::Path, name: &str| read(dir, name).and_then(|s| s.trim().parse::<u64>().ok());
    let stat = |dir: &std::path::Path, name: &str, key: &str| {
        read(dir, name).and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse::<u64>().ok())
        })
    };
    // The hierarchy's base, the group's path in it, and the names of the limit and usage
    // files and of the page-cache and shmem keys of memory.stat. A v1 memory controller, if
    // any, holds the limit (hybrid systems also list an empty v2 group, `0::/`).
    let v1 = own.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctrls, rel) = (f.next()?, f.next()?, f.next()?);
        ctrls.split(',').any(|c| c == "memory").then_some(rel)
    });
    let (base, rel, files) = match v1 {
        Some(rel) => (
            root.join("memory"),
            rel,
            ["memory.limit_in_bytes", "memory.usage_in_bytes", "total_cache", "total_shmem"],
        ),
        None => {
            let rel = own.lines().find_map(|l| l.strip_prefix("0::"))?;
            (root.to_path_buf(), rel, ["memory.max", "memory.current", "file", "shmem"])
        }
    };
    let mut dir = base.join(rel.trim().trim_start_matches('/'));
    let mut best: Option<(u64, String)> = None;
    loop {
        if let (Some(limit), Some(usage)) = (num(&dir, files[0]), num(&dir, files[1])) {
            // cgroup v1 writes "no limit" as a huge multiple of the page size.
            if limit < 1 << 60 {
                let cache = stat(&dir, "memory.stat", files[2]).unwrap_or(0);
                let shmem = stat(&dir, "memory.stat", files[3]).unwrap_or(0);
                let used = usage.saturating_sub(cache.saturating_sub(shmem));
                let headroom = limit.saturating_sub(used);
                if best.as_ref().is_none_or(|b| headroom < b.0) {
                    let source = format!("the control group's limit in {}", dir.join(files[0]).display());
                    best = Some((headroom, source));
                }
            }
        }
        if dir == base || !dir.pop() || !dir.starts_with(&base) {
            break;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_refuses_the_claim_that_overruns_it_naming_the_largest_part() {
        let mut b = Budget::with_available("train", Some((10 << 30, "test".into())));
        b.claim("parameters", 4 << 30, "model.dim", "lower model.dim").unwrap();
        b.claim("gradient", 1 << 20, "model.hidden", "fewer hidden units").unwrap();
        let err = b.claim("Adam moments", 8 << 30, "optim.kind", "use SGD").unwrap_err().to_string();
        assert!(err.starts_with("config train: field `optim.kind`:"), "{err}");
        for part in ["parameters 4.0 GiB", "gradient 1.0 MiB", "Adam moments 8.0 GiB", "12.0 GiB", "10.0 GiB"]
        {
            assert!(err.contains(part), "{part} missing from: {err}");
        }
        assert!(err.contains(CHECK_VAR), "{err}");
        // Unchecked budgets only count.
        let mut free = Budget::with_available("train", None);
        free.claim("parameters", u64::MAX / 2, "model.dim", "").unwrap();
        assert_eq!(free.claimed(), u64::MAX / 2);
    }

    #[test]
    fn sizes_parse_with_binary_suffixes_and_refuse_the_rest() {
        assert_eq!(parse_size("1048576"), Some(1 << 20));
        assert_eq!(parse_size(" 512M "), Some(512 << 20));
        assert_eq!(parse_size("2g"), Some(2 << 30));
        assert_eq!(parse_size("1T"), Some(1 << 40));
        for bad in ["", "M", "-1", "1.5G", "12 MB", "99999999999999999999", "20000000T"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
    }

    #[test]
    fn cgroup_headroom_reads_the_own_group_and_its_ancestors_v2_and_v1() {
        let dir = std::env::temp_dir().join(format!("dtrain-cgroup-{}", std::process::id()));
        let w = |rel: &str, name: &str, text: &str| {
            std::fs::create_dir_all(dir.join(rel)).unwrap();
            std::fs::write(dir.join(rel).join(name), text).unwrap();
        };
        // v2: the job's group under a parent; its page cache is free, shared memory is not.
        w("v2/slurm/job1", "memory.max", "1000000\n");
        w("v2/slurm/job1", "memory.current", "600000\n");
        w("v2/slurm/job1", "memory.stat", "anon 300000\nfile 250000\nfile_mapped 9\nshmem 50000\n");
        let own = "0::/slurm/job1\n";
        assert_eq!(cgroup_headroom(&dir.join("v2"), own).unwrap().0, 600_000);
        // A parent's tighter limit wins; "max" and groups without files are no limit.
        w("v2/slurm", "memory.max", "700000\n");
        w("v2/slurm", "memory.current", "650000\n");
        let (room, source) = cgroup_headroom(&dir.join("v2"), own).unwrap();
        assert_eq!(room, 50_000);
        assert!(source.contains("slurm/memory.max"), "{source}");
        w("v2/slurm", "memory.max", "max\n");
        w("v2/slurm/job1", "memory.max", "max\n");
        assert!(cgroup_headroom(&dir.join("v2"), own).is_none());
        assert!(cgroup_headroom(&dir.join("v2"), "0::/elsewhere\n").is_none());
        // v1: the memory controller's line names the group (beside a hybrid system's v2 line).
        let own = "4:memory:/process_api/abc\n3:cpuset:/\n0::/\n";
        w("v1/memory/process_api/abc", "memory.limit_in_bytes", "2000000\n");
        w("v1/memory/process_api/abc", "memory.usage_in_bytes", "1500000\n");
        w(
            "v1/memory/process_api/abc",
            "memory.stat",
            "cache 1\nrss 1000000\ntotal_cache 500000\ntotal_shmem 0\n",
        );
        assert_eq!(cgroup_headroom(&dir.join("v1"), own).unwrap().0, 1_000_000);
        w("v1/memory/process_api/abc", "memory.limit_in_bytes", "9223372036854771712\n");
        assert!(cgroup_headroom(&dir.join("v1"), own).is_none());
        assert!(cgroup_headroom(&dir.join("v1"), "3:cpuset:/\n").is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
