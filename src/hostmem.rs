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

/// The environment variable that, set to `0`, turns [`Budget`]'s refusal off.
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
/// The account is a lower bound of what the command uses: it counts the buffers of parameter
/// size (parameters, gradients, optimizer moments, shadow weights, a teacher) and not the
/// activations, batches or memory-mapped data.
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
    /// (MPI ranks). Unchecked when [`CHECK_VAR`] is `0`.
    pub fn new(command: &'static str, sharers: usize) -> crate::error::Result<Budget> {
        let off = std::env::var(CHECK_VAR).is_ok_and(|v| v.trim() == "0");
        let limit = match std::env::var(LIMIT_VAR) {
            Ok(v) => Some(parse_size(&v).ok_or_else(|| {
                crate::error::Error::config(
                    command,
                    LIMIT_VAR,
                    format!(
                        "{v:?} is not a byte count (a whole number, optionally followed by K, M, G or T)"
                    ),
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
/// the kernel's `MemAvailable`, lowered to the headroom under the control group's limit
/// (its limit less what it uses, page cache excepted) when there is one. `None` where
/// neither can be read (not Linux).
pub fn available() -> Option<(u64, String)> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|text| {
        let kb = text.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?.trim().strip_suffix("kB")?;
        Some((kb.trim().parse::<u64>().ok()? * 1024, "MemAvailable in /proc/meminfo".to_string()))
    });
    let cgroup = cgroup_headroom(std::path::Path::new("/sys/fs/cgroup"));
    match (meminfo, cgroup) {
        (Some(m), Some(c)) => Some(if c.0 < m.0 { c } else { m }),
        (m, c) => m.or(c),
    }
}

/// The headroom under a cgroup v2 (`memory.max`) or v1 (`memory/memory.limit_in_bytes`)
/// limit mounted at `root`: the limit less the usage, the page cache (`file`, `cache`)
/// counted as free since the kernel reclaims it. `None` without a limit.
fn cgroup_headroom(root: &std::path::Path) -> Option<(u64, String)> {
    let read = |rel: &str| std::fs::read_to_string(root.join(rel)).ok();
    let num = |rel: &str| read(rel).and_then(|s| s.trim().parse::<u64>().ok());
    let stat = |rel: &str, key: &str| {
        read(rel).and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse::<u64>().ok())
        })
    };
    let (limit, usage, cache, file) = if let Some(limit) = num("memory.max") {
        (limit, num("memory.current")?, stat("memory.stat", "file").unwrap_or(0), "memory.max")
    } else {
        let limit = num("memory/memory.limit_in_bytes")?;
        (
            limit,
            num("memory/memory.usage_in_bytes")?,
            stat("memory/memory.stat", "cache").unwrap_or(0),
            "memory/memory.limit_in_bytes",
        )
    };
    // cgroup v1 writes "no limit" as a huge multiple of the page size.
    if limit >= 1 << 60 {
        return None;
    }
    let used = usage.saturating_sub(cache);
    Some((limit.saturating_sub(used), format!("the control group's limit in {}", root.join(file).display())))
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
    fn cgroup_headroom_reads_v2_and_v1_limits_and_counts_page_cache_as_free() {
        let dir = std::env::temp_dir().join(format!("dtrain-cgroup-{}", std::process::id()));
        let v2 = dir.join("v2");
        std::fs::create_dir_all(&v2).unwrap();
        std::fs::write(v2.join("memory.max"), "1000000\n").unwrap();
        std::fs::write(v2.join("memory.current"), "600000\n").unwrap();
        std::fs::write(v2.join("memory.stat"), "anon 400000\nfile 200000\n").unwrap();
        assert_eq!(cgroup_headroom(&v2).unwrap().0, 600_000);
        // "max" is no limit.
        std::fs::write(v2.join("memory.max"), "max\n").unwrap();
        assert!(cgroup_headroom(&v2).is_none());
        let v1 = dir.join("v1/memory");
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::write(v1.join("memory.limit_in_bytes"), "2000000\n").unwrap();
        std::fs::write(v1.join("memory.usage_in_bytes"), "1500000\n").unwrap();
        std::fs::write(v1.join("memory.stat"), "cache 500000\nrss 1000000\n").unwrap();
        assert_eq!(cgroup_headroom(&dir.join("v1")).unwrap().0, 1_000_000);
        std::fs::write(v1.join("memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
        assert!(cgroup_headroom(&dir.join("v1")).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
