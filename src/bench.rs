//! `dtrain bench`: repeatable throughput measurements that print a table and write JSON with
//! the command, date, git revision and machine.

use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use crate::backend::Backend;
use crate::config::PrepareConfig;
use crate::data::prepare::prepare;
use crate::error::{Error, Result};

/// Where and when a benchmark ran.
#[derive(Debug, Clone, Serialize)]
pub struct Provenance {
    /// The command line, as typed.
    pub command: String,
    /// UTC time, ISO 8601.
    pub date: String,
    /// The commit (12 hex digits), with `-dirty` when tracked files other than
    /// `bench/results/` differ from it; "unknown" outside a git checkout.
    pub git_revision: String,
    /// CPU model from /proc/cpuinfo.
    pub cpu: String,
    /// Logical CPUs available.
    pub threads: usize,
    /// Operating system and architecture.
    pub os: String,
}

impl Provenance {
    /// Collects provenance for the current process.
    pub fn collect() -> Provenance {
        let git = |args: &[&str]| {
            std::process::Command::new("git")
                .args(args)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        };
        // "-dirty" when tracked files other than recorded results differ from the revision.
        let git_revision = match git(&["rev-parse", "--short=12", "HEAD"]) {
            Some(rev) => {
                let changes =
                    git(&["status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"]);
                if changes.is_some_and(|c| !c.is_empty()) {
                    format!("{rev}-dirty")
                } else {
                    rev
                }
            }
            None => "unknown".into(),
        };
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        Provenance {
            command: std::env::args().collect::<Vec<_>>().join(" "),
            date: utc_now(),
            git_revision,
            cpu,
            threads: rayon::current_num_threads(),
            os: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
        }
    }
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

/// min / median / max of a sample.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Spread {
    /// Spread of a non-empty sample.
    pub fn of(values: &[f64]) -> Spread {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
        Spread { min: v[0], median, max: v[n - 1] }
    }
}

/// The result of `dtrain bench prepare`.
#[derive(Debug, Clone, Serialize)]
pub struct PrepareBench {
    pub provenance: Provenance,
    pub inputs: Vec<String>,
    pub repeats: usize,
    /// Uncompressed input bytes per run.
    pub text_bytes: u64,
    /// Documents read per run.
    pub documents: u64,
    /// Token ids written per run.
    pub token_ids: u64,
    pub seconds: Spread,
    /// Uncompressed text MB (10^6 bytes) per second.
    pub mb_per_s: Spread,
    pub docs_per_s: Spread,
}

/// Runs `prepare` `repeats` times (after one warm-up) into a temporary directory.
pub fn bench_prepare(cfg: &PrepareConfig, repeats: usize) -> Result<PrepareBench> {
    if !(1..=100_000).contains(&repeats) {
        return Err(Error::config("bench prepare", "--repeat", "must be in 1..=100000"));
    }
    let tmp = std::env::temp_dir().join(format!("dtrain-bench-prepare-{}", std::process::id()));
    let mut cfg = cfg.clone();
    cfg.output.dir = tmp.join("data");
    cfg.output.force = true;
    crate::fsutil::create_dirs(&tmp)?;
    let mut secs = Vec::new();
    let mut last = None;
    for i in 0..=repeats {
        let start = Instant::now();
        let report = prepare(&cfg, false)?;
        if i > 0 {
            secs.push(start.elapsed().as_secs_f64());
        }
        last = Some(report);
    }
    let _ = std::fs::remove_dir_all(&tmp);
    let r = last.expect("at least one run");
    let mb: Vec<f64> = secs.iter().map(|s| r.text_bytes as f64 / 1e6 / s).collect();
    let dps: Vec<f64> = secs.iter().map(|s| r.docs_read as f64 / s).collect();
    Ok(PrepareBench {
        provenance: Provenance::collect(),
        inputs: cfg
            .input
            .labeled
            .iter()
            .chain(&cfg.input.unlabeled)
            .map(|p| p.display().to_string())
            .collect(),
        repeats,
        text_bytes: r.text_bytes,
        documents: r.docs_read,
        token_ids: r.manifest.stats.tokens,
        seconds: Spread::of(&secs),
        mb_per_s: Spread::of(&mb),
        docs_per_s: Spread::of(&dps),
    })
}

/// Writes a benchmark result as pretty JSON.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Data(format!("JSON: {e}")))?;
    crate::fsutil::write_atomic(path, format!("{text}\n").as_bytes())
}

/// One message size of `dtrain bench allreduce`.
#[derive(Debug, Clone, Serialize)]
pub struct AllreduceRow {
    /// Bytes of f32 gradient averaged per all-reduce (before any bf16 wire format).
    pub bytes: u64,
    /// Timed all-reduces (after warm-up ones).
    pub iterations: usize,
    /// Seconds per all-reduce: the slowest rank's, min / median / max over iterations.
    pub seconds: Spread,
    /// Bytes / median seconds, in GB/s (10^9), as nccl-tests reports it.
    pub algbw_gbs: f64,
    /// algbw · 2(W − 1)/W: the bandwidth each link needs for a ring all-reduce.
    pub busbw_gbs: f64,
}

/// The result of `dtrain bench allreduce`.
#[derive(Debug, Clone, Serialize)]
pub struct AllreduceBench {
    pub provenance: Provenance,
    pub world: usize,
    /// The backend the buffers live on (`cpu`, `cuda:N`).
    pub device: String,
    /// The path the gradients took ([`crate::dist::Dist::describe_path`]).
    pub path: String,
    /// The bucket size of `[dist] bucket_mb` the sums ran with.
    pub bucket_mb: f64,
    pub rows: Vec<AllreduceRow>,
}

/// Times the training step's gradient average (`GradSync::average` of a flat buffer on
/// `be`, along the path `dist.bind` chooses: NCCL, or MPI in buckets of non-blocking
/// all-reduces, staged through the host for a GPU's buffer) from `min_bytes` to
/// `max_bytes`, ×4 per row, each timing ending when the device is done. Every rank calls it.
pub fn bench_allreduce<B: Backend>(
    dist: &crate::dist::Dist,
    be: &B,
    min_bytes: u64,
    max_bytes: u64,
) -> Result<AllreduceBench>
where
    crate::dist::Dist: crate::backend::GradSync<B>,
{
    use crate::backend::{GradSync, Real};
    if min_bytes < 4 || min_bytes > max_bytes || max_bytes > 1 << 40 {
        return Err(Error::Data(format!(
            "bench allreduce: --min-bytes {min_bytes} must be at least 4 and at most --max-bytes {max_bytes}, itself at most 1 TiB"
        )));
    }
    if be.is_host() {
        // The largest buffer, its host staging and MPI's send copy.
        let mut budget = crate::hostmem::Budget::new("bench allreduce", dist.local_size())?;
        budget.claim(
            "the largest buffer and its copies",
            3 * max_bytes,
            "--max-bytes",
            "a smaller --max-bytes",
        )?;
    }
    dist.bind(be)?;
    let w = dist.world();
    let mut rows = Vec::new();
    let mut bytes = min_bytes;
    while bytes <= max_bytes {
        let n = (bytes / 4) as usize;
        let mut buf = be.upload(&vec![B::F::of(1.0); n]);
        let mut average = || {
            dist.average(be, &mut buf, None, 0);
            be.synchronize();
        };
        // About 0.5 GB moved per size, within 5..=200 iterations.
        let iterations = ((512u64 << 20) / bytes).clamp(5, 200) as usize;
        for _ in 0..2 {
            average();
        }
        let mut times = Vec::with_capacity(iterations);
        for _ in 0..iterations {
            dist.barrier("bench allreduce");
            let t = Instant::now();
            average();
            times.push(t.elapsed().as_secs_f64());
        }
        // Averages of ones stay ones, on every path and wire type: a wrong reduction or a
        // misplaced bucket shows here.
        if let Some(i) = be.download(&buf).iter().position(|&x| x != B::F::of(1.0)) {
            return Err(Error::Data(format!(
                "bench allreduce: element {i} of {n} is not 1 after averaging ones ({})",
                dist.describe_path()
            )));
        }
        // The slowest rank's time of each iteration.
        let all = dist.all_gather("bench allreduce timings", &times);
        let slowest: Vec<f64> =
            (0..iterations).map(|i| all.iter().map(|r| r[i]).fold(0.0, f64::max)).collect();
        let seconds = Spread::of(&slowest);
        let algbw = bytes as f64 / seconds.median / 1e9;
        rows.push(AllreduceRow {
            bytes,
            iterations,
            seconds,
            algbw_gbs: algbw,
            busbw_gbs: algbw * 2.0 * (w as f64 - 1.0) / w as f64,
        });
        bytes *= 4;
    }
    Ok(AllreduceBench {
        provenance: Provenance::collect(),
        world: w,
        device: be.name(),
        path: dist.describe_path(),
        bucket_mb: dist.config().bucket_mb,
        rows,
    })
}

/// The result of `dtrain bench encoder`.
#[derive(Debug, Clone, Serialize)]
pub struct EncoderBench {
    pub provenance: Provenance,
    pub model: String,
    pub layers: usize,
    pub hidden: usize,
    pub batch: usize,
    pub len: usize,
    /// The backend the passes ran on (`cpu`, `cuda:N`).
    pub device: String,
    /// The linear layers' product precision (`train.matmul`).
    pub matmul: crate::backend::Matmul,
    /// Seconds per forward pass, and per forward + backward pass.
    pub forward: Spread,
    pub forward_backward: Spread,
    /// Activation recomputation on (`model.encoder.recompute`).
    pub recompute: bool,
    /// Bytes the layers' activations hold between the forward and the backward pass.
    pub activation_bytes: usize,
    /// Floating-point operations of one forward pass by the usual count: 2 per
    /// multiply-add of every GEMM (the layers' linear maps and attention's two products;
    /// the classifier head and the elementwise work left out). A forward + backward pass
    /// is counted as 3× this, with activation recomputation 4×.
    pub forward_flops: f64,
}

/// What `dtrain bench encoder` measures: the model, its batch, and how to run it.
#[derive(Debug, Clone)]
pub struct EncoderBenchArgs<'a> {
    pub dir: &'a Path,
    pub batch: usize,
    pub len: usize,
    pub repeats: usize,
    pub recompute: bool,
    pub device: crate::backend::Device,
    pub matmul: crate::backend::Matmul,
}

/// `dtrain bench encoder`: the pretrained encoder in `a.dir` on `a.batch` random sequences
/// of `a.len` tokens, on `a.device` with `a.matmul` products: forward passes, then
/// forward-and-backward passes, `a.repeats` timed runs each after one warm-up (the device
/// is synchronised around each run); with `recompute`, activation recomputation on.
pub fn bench_encoder(a: &EncoderBenchArgs) -> Result<EncoderBench> {
    use crate::backend::{dispatch_with, EncoderOps, OnBackend};
    use crate::model::encoder::{load_pretrained, Encoder, EncoderActs, Pooling, TokenBatch};
    let (mut model, params) = load_pretrained(a.dir, 15, Pooling::Mean, 0)?;
    model.spec.recompute = a.recompute;
    let len = a.len.clamp(2, model.spec.max_positions);
    if a.device == crate::backend::Device::Cpu {
        // The parameters, their copy and gradient, and the layers' activations.
        let acts = model.spec.activation_bytes(a.batch, len, true);
        let mut budget = crate::hostmem::Budget::new("bench encoder", 1)?;
        budget.add(
            "the parameters, their copy and gradient",
            3 * params.len() as u64 * 4,
            "--model",
            "a smaller model",
        );
        budget.add("the activations (about)", acts, "--batch", "a smaller --batch or --len");
        budget.check()?;
    }
    let vocab = model.spec.vocab as u64;
    let seqs: Vec<Vec<u32>> = (0..a.batch as u64)
        .map(|i| (0..len as u64).map(|t| (crate::backend::mix64(i * 1000 + t) % vocab) as u32).collect())
        .collect();
    let tb = TokenBatch::new(&seqs, 0);

    struct Job<'a>(&'a Encoder, &'a [f32], &'a TokenBatch, usize);
    impl OnBackend for Job<'_> {
        type Out = (String, Spread, Spread, usize);
        fn run<B: EncoderOps<F = f32>>(self, be: &B) -> Result<Self::Out> {
            let Job(model, params, tb, repeats) = self;
            let (host_params, params) = (params, be.upload(params));
            let dlogits = be.upload(&vec![1e-2; tb.b * model.spec.classes]);
            let mut acts = EncoderActs::new(be);
            let mut grads = be.zeros(host_params.len());
            let mut time = |backward: bool| {
                let runs: Vec<f64> = (0..=repeats.max(1))
                    .map(|_| {
                        be.synchronize();
                        let t = Instant::now();
                        model.forward(be, &params, tb, None, &mut acts);
                        if backward {
                            model.backward(be, &params, tb, &acts, &dlogits, &mut grads);
                        }
                        be.synchronize();
                        t.elapsed().as_secs_f64()
                    })
                    .collect();
                Spread::of(&runs[1..])
            };
            let (f, fb) = (time(false), time(true));
            model.forward(be, &params, tb, None, &mut acts);
            Ok((be.name(), f, fb, acts.layer_values(be) * std::mem::size_of::<f32>()))
        }
    }
    let (device, forward, forward_backward, activation_bytes) =
        dispatch_with(a.device, 0, true, a.matmul, Job(&model, &params, &tb, a.repeats))?;
    let s = &model.spec;
    let tokens = (a.batch * len) as f64;
    let (h, i) = (s.hidden as f64, s.intermediate as f64);
    // Per token and layer: Q, K, V and the output projection (4·H²), the MLP (2·H·I), and
    // attention's scores and weighted sum (2·len·H); 2 flops per multiply-add.
    let forward_flops = 2.0 * tokens * s.layers as f64 * (4.0 * h * h + 2.0 * h * i + 2.0 * len as f64 * h);
    Ok(EncoderBench {
        provenance: Provenance::collect(),
        model: a.dir.display().to_string(),
        layers: s.layers,
        hidden: s.hidden,
        batch: a.batch,
        len,
        device,
        matmul: a.matmul,
        forward,
        forward_backward,
        recompute: a.recompute,
        activation_bytes,
        forward_flops,
    })
}

/// One `group_by_length` value in `dtrain bench padding`.
#[derive(Debug, Clone, Serialize)]
pub struct PaddingRow {
    pub group_by_length: usize,
    /// Σ real lengths over the epoch's batches.
    pub real_tokens: u64,
    /// Σ batch rows × longest row: what dynamic padding computes on.
    pub padded_tokens: u64,
    /// 1 − real / padded.
    pub padding: f64,
}

/// The result of `dtrain bench padding`.
#[derive(Debug, Clone, Serialize)]
pub struct PaddingBench {
    pub provenance: Provenance,
    pub data: String,
    pub split: String,
    pub batch_size: usize,
    /// Batches in one epoch (the split's documents / batch size, rounded down).
    pub batches: usize,
    /// Documents outside the whole batches: where there are any, each row's batches cover
    /// another set of documents (length grouping orders them), so the rows' real tokens
    /// differ and their padding shares compare only roughly.
    pub left_out: usize,
    pub rows: Vec<PaddingRow>,
}

/// `dtrain bench padding`: one epoch of `split` of the data set in `dir`, read by the
/// training loader (seed 1, every shard) in batches of `batch_size`, for each
/// `group_by_length` value in `groups`; real and padded tokens.
pub fn bench_padding(dir: &Path, split: &str, batch_size: usize, groups: &[usize]) -> Result<PaddingBench> {
    use crate::data::dataset::Dataset;
    use crate::data::loader::Loader;
    use crate::data::shard::SplitKind;
    let kind = SplitKind::from_name(split)
        .filter(|k| matches!(k, SplitKind::Train | SplitKind::Unlabeled))
        .ok_or_else(|| Error::Data(format!("--split {split}: must be train or unlabeled")))?;
    let ds = Dataset::open(dir)?;
    if ds.manifest().tokenizer.subword.is_none() {
        return Err(Error::Data(format!(
            "--data {}: holds hashed features, which a bag model reads without padding; this \
             measures an encoder's batches (prepare with --set tokenizer.subword.path=.../tokenizer.json)",
            dir.display()
        )));
    }
    let shards = ds.shards(kind).len();
    if batch_size == 0 || batch_size % shards != 0 {
        return Err(Error::Data(format!(
            "--batch-size {batch_size}: must be a positive multiple of the {shards} shards of {}",
            dir.display()
        )));
    }
    let docs: usize = ds.shards(kind).iter().map(|s| s.len()).sum();
    let batches = docs / batch_size;
    if batches == 0 {
        let why = if docs == 0 {
            format!("split `{split}` of {} is empty", dir.display())
        } else {
            format!(
                "--batch-size {batch_size}: larger than the {docs} documents of split `{split}` of {}",
                dir.display()
            )
        };
        return Err(Error::Data(format!("{why}: not one batch to measure")));
    }
    if let Some(g) = groups.iter().find(|&&g| g > 1 << 16) {
        return Err(Error::Data(format!(
            "--group {g}: each value must be in 0..=65536, as train.group_by_length (batches per sorted window)"
        )));
    }
    let mut rows = Vec::new();
    for &g in groups {
        let mut loader = Loader::new(&ds, kind, 1, batch_size / shards, g, (0..shards).collect())?;
        let (mut real, mut padded) = (0u64, 0u64);
        for _ in 0..batches {
            let b = loader.next_batch(&ds)?;
            let lens: Vec<u64> = b.offsets.windows(2).map(|w| u64::from(w[1] - w[0])).collect();
            real += lens.iter().sum::<u64>();
            padded += lens.iter().max().unwrap_or(&0) * lens.len() as u64;
        }
        let padding = if padded > 0 { 1.0 - real as f64 / padded as f64 } else { 0.0 };
        rows.push(PaddingRow { group_by_length: g, real_tokens: real, padded_tokens: padded, padding });
    }
    Ok(PaddingBench {
        provenance: Provenance::collect(),
        data: dir.display().to_string(),
        split: kind.name().into(),
        batch_size,
        batches,
        left_out: docs - batches * batch_size,
        rows,
    })
}

/// One kernel at one size in `dtrain bench kernels`.
#[derive(Debug, Clone, Serialize)]
pub struct KernelRow {
    /// The backend operation (`consistency kl`, `ema`, `adamw`, `copy`).
    pub kernel: String,
    /// Elements: logits (B×C) or parameters.
    pub elements: u64,
    /// The shape, for the consistency op (`B x C`).
    pub shape: String,
    /// The bytes the operation must move at the least (its floor), per call.
    pub floor_bytes: u64,
    pub iterations: usize,
    /// Seconds per call.
    pub seconds: Spread,
    /// floor_bytes / median seconds.
    pub gbs: f64,
    /// `gbs` as a share of the copy bandwidth measured in the same run.
    pub percent_of_copy: f64,
}

/// The result of `dtrain bench kernels`.
#[derive(Debug, Clone, Serialize)]
pub struct KernelBench {
    pub provenance: Provenance,
    /// The device (`cuda:0`) and its name.
    pub device: String,
    /// Device-to-device copy bandwidth (read + write bytes / second), GB/s.
    pub copy_gbs: f64,
    pub rows: Vec<KernelRow>,
}

/// Times `f` (which queues work on the device) after two warm-up calls: `iters` calls, each
/// followed by a device synchronisation.
#[cfg(feature = "cuda")]
fn time_device(be: &crate::backend::cuda::Cuda, iters: usize, mut f: impl FnMut()) -> Spread {
    f();
    f();
    be.synchronize();
    let times: Vec<f64> = (0..iters)
        .map(|_| {
            let t = Instant::now();
            f();
            be.synchronize();
            t.elapsed().as_secs_f64()
        })
        .collect();
    Spread::of(&times)
}

/// `dtrain bench kernels`: the fused consistency op (kl, logits, with the target's
/// gradient off: 12 bytes per logit at the floor) at B×C from 2^20 to 2^26, the EMA
/// update (12 bytes per parameter) and AdamW (28 bytes per parameter) from 2^20 to
/// `max_log2` parameters, each against the device-to-device copy bandwidth measured in
/// the same run. Each timing is a whole backend call, as training makes it (the
/// consistency op's call includes downloading its per-row results). Inputs are random.
#[cfg(feature = "cuda")]
pub fn bench_kernels(be: &crate::backend::cuda::Cuda, max_log2: u32) -> Result<KernelBench> {
    use crate::algo::consistency::{ConsistencyKind, ConsistencyOp, TargetForm};
    use crate::backend::{AdamStep, Backend, ConsistencyAux};
    use crate::model::params::Slot;
    let iters = 20;
    let random = |n: usize, seed: u64| -> Vec<f32> {
        (0..n as u64)
            .map(|i| (crate::backend::mix64(seed ^ i) >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
            .collect()
    };
    // Copy bandwidth: a buffer of 2^26 floats (256 MiB), far past every cache.
    let copy_n = 1usize << 26;
    let src = be.upload(&random(copy_n, 1));
    let mut dst = be.zeros(copy_n);
    let t = time_device(be, iters, || be.copy(&mut dst, &src, 0..copy_n));
    let copy_gbs = 8.0 * copy_n as f64 / t.median / 1e9;
    drop((src, dst));
    let mut rows = Vec::new();
    let mut row = |kernel: &str, elements: usize, shape: String, floor: u64, s: Spread| {
        let gbs = floor as f64 / s.median / 1e9;
        rows.push(KernelRow {
            kernel: kernel.into(),
            elements: elements as u64,
            shape,
            floor_bytes: floor,
            iterations: iters,
            seconds: s,
            gbs,
            percent_of_copy: 100.0 * gbs / copy_gbs,
        });
    };
    for log2 in (20..=max_log2.min(26)).step_by(2) {
        let total = 1usize << log2;
        for classes in [16usize, 1024, 32768] {
            let n = total / classes;
            let zs = be.upload(&random(total, 2));
            let zt = be.upload(&random(total, 3));
            let mut ds = be.zeros(total);
            let mut out = be.zeros(3 * n);
            let op = ConsistencyOp {
                kind: ConsistencyKind::Kl,
                form: TargetForm::Logits,
                temperature: 1.0,
                threshold: 0.0,
                scale: 1.0 / n as f64,
            };
            let aux = ConsistencyAux::default();
            let s = time_device(be, iters, || {
                be.consistency(&op, &zs, 0, &zt, n, classes, &aux, &mut ds, None, &mut out);
            });
            row("consistency kl", total, format!("{n} x {classes}"), 12 * total as u64, s);
        }
    }
    for log2 in (20..=max_log2).step_by(2) {
        let n = 1usize << log2;
        let params = be.upload(&random(n, 4));
        let mut shadow = be.upload(&random(n, 5));
        let s = time_device(be, iters, || be.ema(&mut shadow, &params, 0..n, 0.999));
        row("ema", n, String::new(), 12 * n as u64, s);
        drop(shadow);
        let mut p = params;
        let g = be.upload(&random(n, 6));
        let (mut m, mut v) = (be.zeros(n), be.zeros(n));
        let slot = Slot { offset: 0, rows: 1, cols: n };
        let mut t = 0;
        let s = time_device(be, iters, || {
            t += 1;
            let h = AdamStep { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, t };
            be.adamw(&mut p, &g, &mut m, &mut v, slot, h);
        });
        row("adamw", n, String::new(), 28 * n as u64, s);
    }
    Ok(KernelBench { provenance: Provenance::collect(), device: be.describe(), copy_gbs, rows })
}
