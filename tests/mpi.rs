//! Data parallelism with a real `mpirun` on the CPU backend (METHODS.md §15): 1, 2 and 4
//! ranks train the same model (and pretrain the same encoder by masked-LM), a checkpoint
//! resumes on another world size, the sparse and
//! dense table exchanges agree, a killed or hung rank ends the job within its bound and
//! `--resume auto` finishes it, and ranks that disagree are refused.
//!
//! "Relative error" here is ‖a − b‖ / ‖a‖ over each tensor. Single elements can differ more
//! (a table row that got one tiny gradient, which Adam scales up), which is why the norm is
//! used: the summation order of a gradient differs between world sizes, by f32 rounding.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_dtrain");

/// `mpirun -n world dtrain args…`, as root in a container without ssh if need be, with one
/// rayon thread per rank (several ranks share the machine's cores).
fn mpirun(world: usize) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["-n", &world.to_string(), "--oversubscribe"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_plm", "isolated")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .env("RAYON_NUM_THREADS", "1");
    c
}

/// One job at a time: the tests share two cores, and the failure tests time things.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// What every test starts with: the lock, a check for mpirun, a directory with the data
/// set and the run config.
fn setup() -> (std::sync::MutexGuard<'static, ()>, tempfile::TempDir, PathBuf) {
    let one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let ok = Command::new("mpirun").arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(ok, "mpirun is missing: launch/setup installs openmpi-bin (these tests run in CI for real)");
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    let cfg = config(dir.path(), &data);
    (one, dir, cfg)
}

fn run_ok(mut c: Command) -> Output {
    let out = c.output().expect("mpirun starts");
    assert!(
        out.status.success(),
        "{:?} failed: {}\n{}",
        c,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A small data set in 4 shards per split: 3 classes of their own words plus shared noise,
/// 12 labels per class kept and the rest unlabeled.
fn data(dir: &Path) -> PathBuf {
    common::separable(dir, 80, &["output.shards=4", "split.labels_per_class=12"])
}

/// A run config on `data`: 8 labeled rows per step (2 per shard), dropout on, so that
/// every mask and every per-row quantity must land where one process has it.
fn config(dir: &Path, data: &Path) -> PathBuf {
    let path = dir.join("run.toml");
    std::fs::write(
        &path,
        format!(
            "[data]\ndir = {:?}\n[model]\ndim = 16\nhidden = [8]\nhidden_dropout = 0.3\nembed_dropout = 0.1\n\
             [optim]\nlr = 0.05\n[train]\nbatch_size = 8\nsteps = 20\nlog_every = 5\n[dist]\ntimeout_s = 60\n",
            data.display().to_string()
        ),
    )
    .unwrap();
    path
}

/// `mpirun -n world dtrain train --config cfg --set out_dir=out --set …`.
fn train(world: usize, cfg: &Path, out: &Path, sets: &[&str]) -> Command {
    let mut c = mpirun(world);
    c.args([BIN, "train", "--quiet", "--config"]).arg(cfg);
    c.arg("--set").arg(format!("train.out_dir={:?}", out.display().to_string()));
    for s in sets {
        c.args(["--set", s]);
    }
    c
}

/// The evaluation records (val and test, every model) of a run: split, model, step,
/// accuracy, macro-F1 and loss.
fn eval_records(out: &Path) -> Vec<(String, String, u64, f64, f64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("split").is_some())
        .map(|v| {
            (
                v["split"].as_str().unwrap().to_owned(),
                v.get("model").and_then(|m| m.as_str()).unwrap_or("student").to_owned(),
                v["step"].as_u64().unwrap(),
                v["accuracy"].as_f64().unwrap(),
                v["macro_f1"].as_f64().unwrap(),
                v["loss"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// The training records' loss, train accuracy and pseudo-labels' top-class share (a count
/// over the global batch), by step.
fn train_records(out: &Path) -> Vec<(u64, f64, f64, Option<f64>)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("split").is_none())
        .map(|v| {
            let share = v.get("pseudo_label_top_share").map(|s| s.as_f64().unwrap());
            (
                v["step"].as_u64().unwrap(),
                v["loss"].as_f64().unwrap(),
                v["train_accuracy"].as_f64().unwrap(),
                share,
            )
        })
        .collect()
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * a.abs().max(b.abs()).max(1e-12)
}

/// Same metrics: identical accuracies and macro-F1 (counts of right predictions), losses
/// within `tol`.
fn assert_same_metrics(a: &Path, b: &Path, tol: f64) {
    let (ea, eb) = (eval_records(a), eval_records(b));
    assert_eq!(ea.len(), eb.len(), "{} vs {}", a.display(), b.display());
    assert!(!ea.is_empty());
    for (x, y) in ea.iter().zip(&eb) {
        assert_eq!((&x.0, &x.1, x.2, x.3, x.4), (&y.0, &y.1, y.2, y.3, y.4), "{x:?} vs {y:?}");
        assert!(close(x.5, y.5, tol), "loss {x:?} vs {y:?}");
    }
    let (ta, tb) = (train_records(a), train_records(b));
    assert_eq!(ta.len(), tb.len());
    for (x, y) in ta.iter().zip(&tb) {
        assert_eq!((x.0, x.2, x.3), (y.0, y.2, y.3), "{x:?} vs {y:?}");
        assert!(close(x.1, y.1, tol), "training loss {x:?} vs {y:?}");
    }
}

/// How far VAT's weights (relative error) and metrics may drift across world sizes at
/// ξ = 0.1: its finite-difference probe turns summation-order differences of 1e-7 into
/// about 1e-6/ξ (measured: see the run's stderr).
const VAT_TOL: f64 = 1e-4;

#[test]
fn every_method_trains_the_same_model_on_1_2_and_4_ranks() {
    let (_one, dir, cfg) = setup();
    // (name, method, settings)
    let runs: &[(&str, &str, &[&str])] = &[
        ("supervised", "supervised", &[]),
        ("mean_teacher", "mean_teacher", &["mean_teacher.lazy_table=true"]),
        ("temporal", "temporal", &[]),
        ("mpl", "mpl", &[]),
        // The stabilisers' batch means and FlexMatch's records are global too.
        (
            "fixmatch",
            "fixmatch",
            &["consistency.distribution_alignment=true", "consistency.adaptive_threshold=\"flexmatch\""],
        ),
        // Adversarial random directions are drawn by each row's place in the global batch,
        // and a batch norm is the global batch's.
        (
            "fast_fgsm",
            "supervised",
            &["adversarial.kind=\"fast_fgsm\"", "adversarial.norm=\"batch\"", "adversarial.epsilon=0.5"],
        ),
        // VAT's probe is a finite difference at radius ξ: the last-bit differences of a
        // multi-rank run reach its direction amplified by about 1/ξ (at ξ = 1e-6 they swamp
        // it), so it is compared at ξ = 0.1 and a looser tolerance (`VAT_TOL`).
        (
            "vat",
            "supervised",
            &[
                "adversarial.kind=\"vat\"",
                "adversarial.norm=\"batch\"",
                "adversarial.epsilon=0.5",
                "adversarial.xi=0.1",
                "unlabeled.ratio=1",
            ],
        ),
    ];
    for (name, method, extra) in runs {
        let outs: Vec<PathBuf> = [1usize, 2, 4]
            .iter()
            .map(|&w| {
                let out = dir.path().join(format!("{name}-w{w}"));
                let mut sets = vec![format!("method=\"{method}\"")];
                sets.extend(extra.iter().map(|s| s.to_string()));
                let sets: Vec<&str> = sets.iter().map(|s| s.as_str()).collect();
                run_ok(train(w, &cfg, &out, &sets));
                out
            })
            .collect();
        if !["supervised", "fast_fgsm"].contains(name) {
            assert!(
                train_records(&outs[0]).iter().any(|r| r.3.is_some()),
                "{name} logs the pseudo-labels' spread"
            );
        }
        for out in &outs[1..] {
            let err = common::max_rel_err(&common::last_checkpoint(&outs[0]), &common::last_checkpoint(out));
            eprintln!("{name}: {} vs 1 rank: relative error {err:.2e}", out.display());
            let tol = if *name == "vat" { VAT_TOL } else { 1e-5 };
            assert!(err < tol, "{name}: {} differs from one rank by {err:.2e}", out.display());
            assert_same_metrics(&outs[0], out, tol);
        }
    }
}

#[test]
fn a_checkpoint_resumes_on_another_world_size() {
    let (_one, dir, cfg) = setup();
    let sets = ["train.steps=30", "train.checkpoint_every=10", "train.keep_checkpoints=5"];
    // Temporal Ensembling: each rank restores the bank files of the shards it owns.
    for (method, first, then) in [("temporal", 4usize, [2usize, 1]), ("mpl", 1, [4, 2])] {
        let m = format!("method=\"{method}\"");
        let full = dir.path().join(format!("{method}-full"));
        run_ok(train(first, &cfg, &full, &[&sets[..], &[m.as_str()]].concat()));
        for (k, w) in then.iter().enumerate() {
            let from = full.join("checkpoints").join(dtrain::checkpoint::dir_name(10 * (k as u64 + 1)));
            let out = dir.path().join(format!("{method}-resumed-{w}"));
            let mut c = train(*w, &cfg, &out, &[&sets[..], &[m.as_str()]].concat());
            c.arg("--resume").arg(&from);
            run_ok(c);
            let err = common::max_rel_err(&common::last_checkpoint(&full), &common::last_checkpoint(&out));
            eprintln!(
                "{method}: {first} ranks, resumed at step {} on {w}: relative error {err:.2e}",
                10 * (k + 1)
            );
            assert!(err < 1e-5, "{method} resumed on {w} ranks differs by {err:.2e}");
        }
    }
}

#[test]
fn sparse_and_dense_table_exchanges_agree() {
    let (_one, dir, cfg) = setup();
    for w in [2usize, 4] {
        let run = |how: &str| {
            let out = dir.path().join(format!("{how}-{w}"));
            run_ok(train(w, &cfg, &out, &[&format!("dist.table_exchange=\"{how}\"")]));
            common::last_checkpoint(&out)
        };
        let (sparse, dense) = (run("sparse"), run("dense"));
        let err = common::max_rel_err(&sparse, &dense);
        if w == 2 {
            // Two addends sum the same in either order: bit for bit.
            assert_eq!(err, 0.0, "2 ranks: sparse and dense differ by {err:.2e}");
        } else {
            assert!(err < 1e-6, "4 ranks: sparse and dense differ by {err:.2e}");
        }
    }
}

#[test]
fn gradient_buckets_and_a_bf16_wire_on_two_ranks() {
    let (_one, dir, cfg) = setup();
    let run = |name: &str, sets: &[&str]| {
        let out = dir.path().join(name);
        run_ok(train(2, &cfg, &out, sets));
        common::last_checkpoint(&out)
    };
    let plain = run("f32", &[]);
    // 26 values per bucket (dist::tests::bucket_mb_sizes_the_buckets): the dense gradient
    // leaves in several non-blocking all-reduces, last tensors first; each element is
    // summed as before, so nothing changes.
    let small = run("buckets", &["dist.bucket_mb=0.0001"]);
    assert_eq!(common::max_rel_err(&plain, &small), 0.0, "small buckets changed the run");
    // bf16 on the wire rounds the dense gradient: a different run, but a near one.
    let bf16 = run("bf16", &["dist.allreduce_dtype=\"bf16\""]);
    let err = common::max_rel_err(&plain, &bf16);
    eprintln!("2 ranks, 20 steps: bf16 wire vs f32: relative error {err:.2e}");
    assert!(err > 0.0 && err < 0.05, "bf16 wire vs f32: relative error {err:.2e}");
    // NCCL asked for on CPU ranks: refused, naming the field and the reason.
    let o = train(2, &cfg, &dir.path().join("nccl"), &["dist.backend=\"nccl\""]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("dist.backend") && err.contains("all ranks train on the CPU"), "{err}");
}

/// The dtrain processes that `mpirun` (pid `launcher`) started, in rank order (from
/// their OMPI_COMM_WORLD_RANK).
fn ranks_of(launcher: u32) -> Vec<u32> {
    let out = Command::new("pgrep").args(["-P", &launcher.to_string(), "-f", "dtrain"]).output().unwrap();
    let mut pids: Vec<(usize, u32)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .map(|pid: u32| {
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let rank = env
                .split(|&b| b == 0)
                .find_map(|kv| kv.strip_prefix(b"OMPI_COMM_WORLD_RANK="))
                .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
                .unwrap_or(usize::MAX);
            (rank, pid)
        })
        .collect();
    pids.sort();
    pids.into_iter().map(|(_, pid)| pid).collect()
}

/// Waits for `child` to end, at most `bound`; returns its output and how long it took.
fn wait_bounded(child: std::process::Child, bound: Duration) -> (Output, Duration) {
    let start = Instant::now();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(bound) {
        Ok(out) => (out.unwrap(), start.elapsed()),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("the job did not end within {bound:?}");
        }
    }
}

/// Starts a long 2-rank run that checkpoints every step, and waits until checkpoint
/// `after` exists; returns the launcher and the ranks' pids.
fn start_long_run(cfg: &Path, out: &Path, after: u64, extra: &[&str]) -> (std::process::Child, Vec<u32>) {
    let sets =
        [&["train.steps=400", "train.checkpoint_every=1", "train.keep_checkpoints=2"][..], extra].concat();
    let mut c = train(2, cfg, out, &sets);
    let mut child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let start = Instant::now();
    // Checkpoints come and go (two are kept): wait for one at `after` or later.
    let reached = || {
        dtrain::checkpoint::latest(&out.join("checkpoints")).ok().flatten().is_some_and(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.trim_start_matches("step-").parse::<u64>().is_ok_and(|s| s >= after)
        })
    };
    while !reached() {
        assert!(start.elapsed() < Duration::from_secs(120), "no checkpoint {after} after 2 minutes");
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the run ended ({status}) before checkpoint {after}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let ranks = ranks_of(child.id());
    assert_eq!(ranks.len(), 2, "expected 2 dtrain ranks under mpirun, found {ranks:?}");
    (child, ranks)
}

#[test]
fn a_killed_rank_ends_the_job_and_resume_auto_finishes_the_run() {
    let (_one, dir, cfg) = setup();
    let out = dir.path().join("killed");
    let (child, ranks) = start_long_run(&cfg, &out, 20, &["dist.timeout_s=10"]);
    assert!(Command::new("kill").args(["-9", &ranks[1].to_string()]).status().unwrap().success());
    let (o, took) = wait_bounded(child, Duration::from_secs(30));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "the job must fail");
    eprintln!("killed rank: the job ended {took:?} later:\n{err}");
    assert!(err.contains("rank 1") || err.contains("signal 9"), "{err}");
    // --resume auto continues from the newest complete checkpoint and finishes.
    let mut c =
        train(2, &cfg, &out, &["train.steps=400", "train.checkpoint_every=1", "train.keep_checkpoints=2"]);
    c.args(["--resume", "auto"]);
    run_ok(c);
    assert!(common::last_checkpoint(&out).ends_with(dtrain::checkpoint::dir_name(400)));
    let last = train_records(&out).last().copied().unwrap();
    assert_eq!(last.0, 400);
}

#[test]
fn a_hung_rank_is_named_and_the_job_ends_within_the_timeout() {
    let (_one, dir, cfg) = setup();
    let out = dir.path().join("hung");
    let (child, ranks) = start_long_run(&cfg, &out, 5, &["dist.timeout_s=5"]);
    // Rank 1 stops (as a rank stuck in a system call or a deadlock would): rank 0 names it.
    let stopped = ranks[1];
    assert!(Command::new("kill").args(["-STOP", &stopped.to_string()]).status().unwrap().success());
    let (o, took) = wait_bounded(child, Duration::from_secs(40));
    let _ = Command::new("kill").args(["-9", &stopped.to_string()]).status();
    let err = String::from_utf8_lossy(&o.stderr);
    eprintln!("hung rank: the job ended {took:?} later:\n{err}");
    assert!(!o.status.success());
    assert!(err.contains("did not complete within 5 s"), "{err}");
    assert!(
        err.contains("rank 1 never reached it (dead or hung)")
            || err.contains("rank 1 reached it, then fell silent (dead or hung in it)"),
        "the message must name the rank: {err}"
    );
    assert!(took < Duration::from_secs(25), "took {took:?}");
}

#[test]
fn disagreeing_ranks_and_indivisible_world_sizes_are_refused() {
    let (_one, dir, cfg) = setup();
    let out = dir.path().join("o");
    // Two ranks with different learning rates (MPMD launch: one command line per rank).
    let mut c = mpirun(1);
    let outs = format!("train.out_dir={:?}", out.display().to_string());
    c.args([BIN, "train", "--quiet", "--config"]).arg(&cfg).args(["--set", &outs, "--set", "optim.lr=0.05"]);
    c.args([":", "-n", "1", BIN, "train", "--quiet", "--config"]).arg(&cfg).args([
        "--set",
        &outs,
        "--set",
        "optim.lr=0.06",
    ]);
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("rank 1's config (its file and --set overrides) differs from rank 0's (rank 0 → rank 1: optim.lr: 0.05 → 0.06)"),
        "the error names the field and both values: {err}"
    );
    // Two ranks resuming from different checkpoints (a file system the nodes do not share,
    // or another --resume each) are refused by name, before any step.
    let r = dir.path().join("r");
    run_ok(train(1, &cfg, &r, &["train.checkpoint_every=5"]));
    let ckpts = r.join("checkpoints");
    let (a, b) = (ckpts.join("step-000000015"), ckpts.join("step-000000020"));
    let rs = format!("train.out_dir={:?}", r.display().to_string());
    let mut c = mpirun(1);
    c.args([BIN, "train", "--quiet", "--config"]).arg(&cfg).args(["--set", &rs, "--resume"]).arg(&a);
    c.args([":", "-n", "1", BIN, "train", "--quiet", "--config"])
        .arg(&cfg)
        .args(["--set", &rs, "--resume"])
        .arg(&b);
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("rank 1's checkpoint to resume from differs from rank 0's")
            && err.contains("Every rank must resume from the same checkpoint"),
        "{err}"
    );
    // A command that runs in one process is refused under mpirun, naming the launcher.
    let mut c = mpirun(2);
    c.args([BIN, "predict", "--checkpoint"]).arg(&b).arg("--input").arg(dir.path().join("in.txt"));
    c.arg("--output").arg(dir.path().join("p.jsonl"));
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("dtrain predict runs in one process, and this is one of 2 ranks"), "{err}");
    // 3 ranks cannot share 4 shards.
    let o = train(3, &cfg, &dir.path().join("o3"), &[]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("has 4 shards, which 3 ranks cannot share equally"), "{err}");
    // The ranks of one node share its memory: a model (about 0.8 MiB with its moments) that
    // fits a 1 MiB budget alone is refused when two ranks must share it.
    let o = train(1, &cfg, &dir.path().join("m1"), &[]).env("DTRAIN_MEMORY_LIMIT", "1M").output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = train(2, &cfg, &dir.path().join("m2"), &[]).env("DTRAIN_MEMORY_LIMIT", "1M").output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("512.0 KiB is available (DTRAIN_MEMORY_LIMIT, shared by 2 ranks on this node)"),
        "{err}"
    );
}

#[test]
fn bench_allreduce_reports_nccl_tests_bandwidths() {
    let (_one, dir, _) = setup();
    let json = dir.path().join("ar.json");
    let mut c = mpirun(2);
    c.args([BIN, "bench", "allreduce", "--max-bytes", "65536", "--json"]).arg(&json);
    let o = run_ok(c);
    assert!(String::from_utf8_lossy(&o.stdout).contains("busbw GB/s"));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(v["world"], 2);
    assert_eq!(v["device"], "cpu");
    assert!(v["path"].as_str().unwrap().contains("by MPI on the host in f32"), "{}", v["path"]);
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(
        rows.iter().map(|r| r["bytes"].as_u64().unwrap()).collect::<Vec<_>>(),
        [1024, 4096, 16384, 65536]
    );
    for r in rows {
        let (alg, bus) = (r["algbw_gbs"].as_f64().unwrap(), r["busbw_gbs"].as_f64().unwrap());
        // busbw = algbw · 2(W−1)/W, which is algbw on two ranks.
        assert!(alg > 0.0 && (bus - alg).abs() < 1e-12 * alg, "{r}");
    }
    // bf16 on the wire (a user-defined MPI sum of bf16 values): the bench checks that the
    // averages of ones are ones.
    let mut c = mpirun(2);
    c.args([BIN, "bench", "allreduce", "--dtype", "bf16", "--max-bytes", "65536"]);
    let o = run_ok(c);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("by MPI on the host in bf16"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
}

const TOPICS: [[&str; 5]; 3] = [
    ["apple", "banana", "cherry", "grape", "melon"],
    ["engine", "piston", "valve", "gear", "brake"],
    ["river", "lake", "ocean", "stream", "pond"],
];

/// An unlabeled corpus in 4 shards where words co-occur only within their topic: 2,400
/// lines of 8 words drawn from one of three topics (about 19k words), and a few labeled
/// lines so that it is a data set.
fn topic_data(dir: &Path) -> PathBuf {
    let (mut unl, mut lab) = (String::new(), String::new());
    let topics: Vec<&[&str]> = TOPICS.iter().map(|t| &t[..]).collect();
    for (line, words) in common::topic_lines(&topics, 2400, 99).iter().enumerate() {
        unl.push_str(&words.join(" "));
        unl.push('\n');
        if line < 30 {
            lab.push_str(&format!("{}\t{}\n", line % 3, words[..4].join(" ")));
        }
    }
    let u = common::write(dir, "topics.txt", unl.as_bytes());
    let l = common::write(dir, "topics.tsv", lab.as_bytes());
    let out = dir.join("topics");
    common::run(
        &[&l],
        &[&u],
        &out,
        &["output.shards=4", "tokenizer.buckets=4096", "split.labels_per_class=4"],
    )
    .unwrap();
    out
}

/// `mpirun -n world dtrain pretrain` on `data` into `out`: skip-gram, dim 16, one thread per
/// rank, 4 epochs, the ranks merging every 1,000 words (several rounds per epoch).
fn pretrain(world: usize, data: &Path, out: &Path, extra: &[&str]) -> Command {
    let path = out.with_extension("toml");
    std::fs::write(
        &path,
        format!(
            "[data]\ndir = {:?}\n[model]\ndim = 16\nmin_count = 1\nsubsample = 0.0\nwindow = 3\n\
             char_ngram_max = 0\n[train]\nout_dir = {:?}\nepochs = 4\nthreads = 1\nsync_words = 1000\n\
             [dist]\ntimeout_s = 60\n",
            data.display().to_string(),
            out.display().to_string()
        ),
    )
    .unwrap();
    let mut c = mpirun(world);
    c.args([BIN, "--quiet", "pretrain", "--config"]).arg(&path).args(extra);
    c
}

/// Mean cosine between words of the same topic minus that between words of different
/// topics, in the embeddings of `out`.
fn topic_margin(out: &Path) -> f32 {
    let emb = dtrain::pretrain::embeddings::read(out).unwrap();
    let tok = emb.tokenizer();
    let mut feats = Vec::new();
    let mut vec = |w: &str| {
        let mut v = vec![0.0; emb.meta.dim];
        emb.vector(&tok, w, &mut feats, &mut v);
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect::<Vec<f32>>()
    };
    let words: Vec<(usize, Vec<f32>)> = TOPICS
        .iter()
        .enumerate()
        .flat_map(|(t, ws)| ws.iter().map(move |w| (t, w)))
        .map(|(t, w)| (t, vec(w)))
        .collect();
    let (mut sums, mut counts) = ([0.0f32; 2], [0u32; 2]);
    for (i, (ta, a)) in words.iter().enumerate() {
        for (tb, b) in &words[i + 1..] {
            let same = usize::from(ta == tb);
            sums[same] += a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
            counts[same] += 1;
        }
    }
    sums[1] / counts[1] as f32 - sums[0] / counts[0] as f32
}

fn ranks_in_metrics(out: &Path) -> Vec<u64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["ranks"].as_u64().unwrap())
        .collect()
}

/// Pretraining on 2 and 4 ranks learns the topics as well as one process does (every
/// epoch also checks inside the run that the ranks' tables are identical after merging),
/// and with one thread per rank it is a function of the config, the data and W.
#[test]
fn pretraining_on_2_and_4_ranks_learns_what_one_process_learns() {
    let (_one, dir, _) = setup();
    let data = topic_data(dir.path());
    let bytes = |d: &Path| std::fs::read(d.join("embeddings.safetensors")).unwrap();
    let mut margins = Vec::new();
    for world in [1usize, 2, 4] {
        let out = dir.path().join(format!("w{world}"));
        let o = run_ok(pretrain(world, &data, &out, &[]));
        let text = String::from_utf8_lossy(&o.stdout);
        assert_eq!(text.matches("pretrained 4 epochs").count(), 1, "rank 0 alone reports: {text}");
        if world > 1 {
            assert!(text.contains(&format!("on {world} ranks × 1 threads")), "{text}");
        }
        assert_eq!(ranks_in_metrics(&out), vec![world as u64; 4]);
        margins.push(topic_margin(&out));
    }
    eprintln!("within-topic minus across-topic cosine on 1, 2, 4 ranks: {margins:?}");
    assert!(margins[0] > 0.5, "one process: within-topic minus across-topic cosine {}", margins[0]);
    for (m, w) in margins[1..].iter().zip([2, 4]) {
        assert!(*m > 0.5 && *m > margins[0] - 0.15, "W={w}: margin {m}, one process {}", margins[0]);
    }
    let again = dir.path().join("w2-again");
    run_ok(pretrain(2, &data, &again, &[]));
    assert_eq!(
        bytes(&dir.path().join("w2")),
        bytes(&again),
        "one thread per rank: a function of config, data and W"
    );
}

/// `--stop-after` writes a checkpoint and stops every rank; `--resume auto` finishes the run
/// bit for bit as an uninterrupted one, and the checkpoint also resumes on another W.
#[test]
fn pretraining_stops_and_resumes_bitwise_on_two_ranks() {
    let (_one, dir, _) = setup();
    let data = topic_data(dir.path());
    let bytes = |d: &Path| std::fs::read(d.join("embeddings.safetensors")).unwrap();
    let whole = dir.path().join("whole");
    run_ok(pretrain(2, &data, &whole, &[]));
    let cut = dir.path().join("cut");
    let o = run_ok(pretrain(2, &data, &cut, &["--stop-after", "2"]));
    assert!(String::from_utf8_lossy(&o.stdout).contains("stopped after 2 of 4 epochs"));
    assert!(cut.join("checkpoints/epoch-000002/DONE").is_file());
    assert!(!cut.join("embeddings.safetensors").exists());
    let other = dir.path().join("other");
    std::fs::create_dir_all(other.join("checkpoints")).unwrap();
    common::copy_dir(&cut.join("checkpoints/epoch-000002"), &other.join("checkpoints/epoch-000002"));
    run_ok(pretrain(2, &data, &cut, &["--resume", "auto"]));
    assert_eq!(bytes(&whole), bytes(&cut), "resumed on 2 ranks = uninterrupted");
    assert!(!cut.join("checkpoints").exists());
    // Requeued after it finished: every rank agrees that nothing is left (rank 0 alone
    // reads the tables).
    let o = run_ok(pretrain(2, &data, &cut, &["--resume", "auto"]));
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(text.matches("the run had already finished its 4 epochs").count(), 1, "{text}");
    assert_eq!(bytes(&whole), bytes(&cut));
    run_ok(pretrain(4, &data, &other, &["--resume", "auto"]));
    let (m_other, m_whole) = (topic_margin(&other), topic_margin(&whole));
    assert!(
        m_other > 0.5 && m_other > m_whole - 0.15,
        "resumed on 4 ranks: margin {m_other}, 2 ranks {m_whole}"
    );
    assert_eq!(ranks_in_metrics(&other), vec![4, 4], "epochs 3 and 4 ran on 4 ranks");
}

/// A data set in MiniLM's WordPiece ids (in `dir/wp`, 4 shards a split) of documents of 8
/// to 13 tokens: each rank pads its part of a batch to its own longest.
fn ragged_wordpiece(dir: &Path) -> PathBuf {
    let tok = common::minilm().join("tokenizer.json");
    let sub = dir.join("wp");
    std::fs::create_dir(&sub).unwrap();
    let path = format!("tokenizer.subword.path={:?}", tok.display().to_string());
    common::separable_padded(
        &sub,
        40,
        5,
        &[path.as_str(), "tokenizer.subword.max_len=16", "output.shards=4", "split.labels_per_class=12"],
    )
}

/// An encoder (from scratch, both dropouts on) on 2 ranks trains what one process trains:
/// each rank pads its own rows to their longest, which changes nothing, and the dense
/// gradient (embedding tables included) is averaged.
#[test]
fn an_encoder_trains_the_same_model_on_1_and_2_ranks() {
    let (_one, dir, _) = setup();
    let data = ragged_wordpiece(dir.path());
    // The shared config's bag-model fields would be refused beside model.kind = "encoder".
    let cfg = dir.path().join("encoder.toml");
    let toml = format!(
        "[data]\ndir = {:?}\n[train]\nbatch_size = 8\nsteps = 20\nlog_every = 5\n[dist]\ntimeout_s = 60\n",
        data.display().to_string()
    );
    std::fs::write(&cfg, toml).unwrap();
    // Dropout on (both at 0.1): hidden masks are keyed by (the sequence's global position,
    // the token), attention masks by the sequence's global position, so a rank's shorter
    // padding and its local rows change nothing.
    // Fast-FGSM's random start is drawn by (sequence, token), with none on padding, and
    // its batch norm is the global batch's.
    let fast_fgsm: &[&str] =
        &["adversarial.kind=\"fast_fgsm\"", "adversarial.norm=\"batch\"", "adversarial.epsilon=5.0"];
    for (name, extra) in [("enc", &[][..]), ("enc-fast-fgsm", fast_fgsm)] {
        let mut sets = common::small_encoder(1);
        sets.extend(["train.steps=8".to_string(), "train.log_every=4".to_string()]);
        sets.extend(extra.iter().map(|s| s.to_string()));
        let sets: Vec<&str> = sets.iter().map(|s| s.as_str()).collect();
        let outs: Vec<PathBuf> = [1usize, 2]
            .iter()
            .map(|&w| {
                let out = dir.path().join(format!("{name}-w{w}"));
                run_ok(train(w, &cfg, &out, &sets));
                out
            })
            .collect();
        let (a, b) = (common::last_checkpoint(&outs[0]), common::last_checkpoint(&outs[1]));
        assert_close_encoders(&a, &b, &format!("{name} on 2 ranks"));
        assert_same_metrics(&outs[0], &outs[1], 1e-4);
    }
}

/// Two encoder directories' tensors agree, tensor by tensor, relative to the tensor's norm
/// with a small absolute floor, except the attention keys' biases: their gradient is zero in
/// exact arithmetic (softmax ignores a constant added to every score), so they and their
/// moments hold only rounding noise, which AdamW's normalisation scales up to steps of up to
/// the learning rate; whatever their values, the model computes the same function.
fn assert_close_encoders(a: &Path, b: &Path, what: &str) {
    let (ta, tb) = (common::tensors(a), common::tensors(b));
    assert_eq!(
        ta.iter().map(|t| &t.0).collect::<Vec<_>>(),
        tb.iter().map(|t| &t.0).collect::<Vec<_>>(),
        "{what}: other tensors"
    );
    let mut worst = (0.0f64, "");
    for ((tensor, x), (_, y)) in ta.iter().zip(&tb) {
        if tensor.ends_with("attention.self.key.bias") {
            continue;
        }
        let d: f64 =
            x.iter().zip(y).map(|(&p, &q)| (f64::from(p) - f64::from(q)).powi(2)).sum::<f64>().sqrt();
        let n: f64 = x.iter().map(|&p| f64::from(p).powi(2)).sum::<f64>().sqrt();
        assert!(d <= 1e-4 * n + 1e-6, "{what}, {tensor}: differs from one process by {d:.2e} (norm {n:.2e})");
        let share = d / (1e-4 * n + 1e-6);
        if share > worst.0 {
            worst = (share, tensor);
        }
    }
    eprintln!("{what}: the largest difference is {:.3} of its bound ({})", worst.0, worst.1);
}

/// A small BERT in Hugging Face's layout (2 layers, hidden 16, MiniLM's vocabulary and
/// tokenizer), randomly initialised: a `mlm.pretrained` that several ranks can pretrain in
/// a moment.
fn tiny_bert(dir: &Path) -> PathBuf {
    use dtrain::model::encoder::{Encoder, EncoderSpec, Pooling};
    let out = dir.join("tiny-bert");
    std::fs::create_dir_all(&out).unwrap();
    let spec = EncoderSpec {
        vocab: 30522,
        hidden: 16,
        layers: 2,
        heads: 2,
        intermediate: 32,
        max_positions: 64,
        type_vocab: 2,
        layer_norm_eps: 1e-12,
        activation: dtrain::backend::Activation::GeluErf,
        pre_ln: false,
        pooling: Pooling::Mean,
        classes: 1,
        dropout: 0.1,
        attention_dropout: 0.1,
        recompute: false,
    };
    let config = serde_json::json!({
        "model_type": "bert", "vocab_size": spec.vocab, "hidden_size": spec.hidden,
        "num_hidden_layers": spec.layers, "num_attention_heads": spec.heads,
        "intermediate_size": spec.intermediate, "max_position_embeddings": spec.max_positions,
        "type_vocab_size": spec.type_vocab, "layer_norm_eps": spec.layer_norm_eps, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
    });
    std::fs::write(out.join("config.json"), config.to_string()).unwrap();
    let enc = Encoder::new(spec);
    let params: Vec<f32> = enc.init(7);
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = enc
        .layout
        .tensors()
        .iter()
        .filter(|t| !t.name.starts_with("classifier."))
        .map(|t| (t.name.clone(), bytemuck::cast_slice(&params[t.slot.range()]).to_vec(), t.shape.clone()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(n, b, s)| {
            (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap())
        })
        .collect();
    safetensors::tensor::serialize_to_file(views, None, &out.join("model.safetensors")).unwrap();
    std::fs::copy(common::minilm().join("tokenizer.json"), out.join("tokenizer.json")).unwrap();
    out
}

/// `mpirun -n world dtrain pretrain` of masked-LM on `data` from `model` into `out`: 2 head
/// warm-up steps and 4 full ones of 8 documents (dropout on), a record per step.
fn mlm(world: usize, data: &Path, model: &Path, out: &Path, extra: &[&str]) -> Command {
    let path = out.with_extension("toml");
    std::fs::write(
        &path,
        format!(
            "[data]\ndir = {:?}\n[model]\nobjective = \"mlm\"\n[mlm]\npretrained = {:?}\nbatch_size = 8\n\
             steps = 4\nhead_warmup_steps = 2\nhead_warmup_lr = 0.003\nlog_every = 1\n[train]\nout_dir = {:?}\n\
             lr = 0.003\n[dist]\ntimeout_s = 60\n",
            data.display().to_string(),
            model.display().to_string(),
            out.display().to_string()
        ),
    )
    .unwrap();
    let mut c = mpirun(world);
    c.args([BIN, "--quiet", "pretrain", "--config"]).arg(&path).args(extra);
    c
}

/// A masked-LM run's records: step, phase, learning rate, loss and masked-token accuracy.
fn mlm_records(out: &Path) -> Vec<(u64, String, f64, f64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|v| {
            (
                v["step"].as_u64().unwrap(),
                v["phase"].as_str().unwrap().to_owned(),
                v["lr"].as_f64().unwrap(),
                v["loss"].as_f64().unwrap(),
                v["masked_accuracy"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// Masked-LM pretraining on 2 and 4 ranks takes the steps one process takes (the global
/// batch cut into parts, masks keyed by document, dropout by global row, the gradient
/// scaled to the global batch's mean loss), through the head's warm-up and the full run; a
/// run stopped on 2 ranks resumes on 4; a finished run under --resume auto does nothing.
#[test]
fn masked_lm_pretraining_takes_the_same_steps_on_1_2_and_4_ranks() {
    let (_one, dir, _) = setup();
    let data = ragged_wordpiece(dir.path());
    let model = tiny_bert(dir.path());
    let outs: Vec<PathBuf> = [1usize, 2, 4]
        .iter()
        .map(|&w| {
            let out = dir.path().join(format!("mlm-w{w}"));
            let o = run_ok(mlm(w, &data, &model, &out, &[]));
            let text = String::from_utf8_lossy(&o.stdout);
            assert_eq!(text.matches("masked-LM: 6 steps").count(), 1, "rank 0 alone reports: {text}");
            out
        })
        .collect();
    let one = mlm_records(&outs[0]);
    assert_eq!(
        one.iter().map(|r| (r.0, r.1.as_str())).collect::<Vec<_>>(),
        [(1, "head"), (2, "head"), (3, "full"), (4, "full"), (5, "full"), (6, "full")]
    );
    assert!(one.iter().all(|r| r.3.is_finite() && r.3 > 0.0));
    for (out, w) in outs[1..].iter().zip([2, 4]) {
        assert_close_encoders(
            &outs[0].join("encoder"),
            &out.join("encoder"),
            &format!("masked-LM on {w} ranks"),
        );
        for (a, b) in one.iter().zip(&mlm_records(out)) {
            assert_eq!((a.0, &a.1, a.2, a.4), (b.0, &b.1, b.2, b.4), "{w} ranks: {a:?} vs {b:?}");
            assert!(close(a.3, b.3, 1e-5), "{w} ranks: loss {a:?} vs {b:?}");
        }
    }
    // A global batch of 2 documents on 4 ranks: two ranks hold none in every step and
    // take part in the averages with a zero gradient.
    let small: Vec<PathBuf> = [1usize, 4]
        .iter()
        .map(|&w| {
            let out = dir.path().join(format!("mlm-b2-w{w}"));
            run_ok(mlm(w, &data, &model, &out, &["--set", "mlm.batch_size=2"]));
            out
        })
        .collect();
    assert_close_encoders(&small[0].join("encoder"), &small[1].join("encoder"), "2 documents on 4 ranks");
    // Stopped on 2 ranks in the full run, resumed on 4. The checkpoint's AdamW moments
    // (the second scales with the gradient's square, which the weights barely show) are
    // one process's.
    let cut = dir.path().join("mlm-cut");
    let o = run_ok(mlm(2, &data, &model, &cut, &["--stop-after", "4"]));
    assert!(String::from_utf8_lossy(&o.stdout).contains("stopped after step 4"));
    let step4 = "checkpoints/step-000000004";
    let cut1 = dir.path().join("mlm-cut1");
    run_ok(mlm(1, &data, &model, &cut1, &["--stop-after", "4"]));
    assert_close_encoders(&cut1.join(step4), &cut.join(step4), "the checkpoint of 2 ranks");
    run_ok(mlm(4, &data, &model, &cut, &["--resume", "auto"]));
    assert!(!cut.join("checkpoints").exists(), "rank 0 removes the checkpoints at the end");
    assert_close_encoders(&outs[0].join("encoder"), &cut.join("encoder"), "stopped on 2 ranks, resumed on 4");
    assert_eq!(mlm_records(&cut).len(), 6, "one record per step, none twice");
    // Ranks given different --stop-after values are refused before any step (one rank
    // stopping alone once left the other waiting until dist.timeout_s).
    let mixed = dir.path().join("mlm-mixed");
    let mut c = mlm(1, &data, &model, &mixed, &["--stop-after", "1"]);
    c.args([":", "-n", "1", BIN, "--quiet", "pretrain", "--config"]).arg(mixed.with_extension("toml"));
    let started = Instant::now();
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("rank 1's --stop-after differs from rank 0's"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30), "refused at start, not by the timeout");
    // Requeued after it finished: nothing to do, on every rank.
    let before = std::fs::read(cut.join("encoder/model.safetensors")).unwrap();
    let o = run_ok(mlm(2, &data, &model, &cut, &["--resume", "auto"]));
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(text.matches("the run had already finished").count(), 1, "{text}");
    assert!(before == std::fs::read(cut.join("encoder/model.safetensors")).unwrap());
}

/// launch/mpirun refuses what it cannot run with its own message (not bash's, nor dtrain's
/// help under mpirun), and runs dtrain on W ranks with the cores divided among them.
#[test]
fn launch_mpirun_checks_its_arguments_and_runs_dtrain() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/launch/mpirun");
    let launch = |args: &[&str], bin: &str| {
        let o = Command::new(script).args(args).env("DTRAIN_BIN", bin).output().unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    for (args, want) in [
        (&["-n"][..], "launch/mpirun: -n takes the number of ranks"),
        (&[], "launch/mpirun: no dtrain command"),
        (&["-n", "2"], "launch/mpirun: no dtrain command"),
        (&["-np", "2", "--"], "launch/mpirun: no dtrain command"),
        (&["-n", "0", "info"], "launch/mpirun: -n 0: expected a positive number of ranks"),
        (&["-n", "two", "info"], "launch/mpirun: -n two: expected a positive number of ranks"),
    ] {
        let (code, _, err) = launch(args, BIN);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.trim_end().starts_with(want) && !err.contains("line "), "{args:?}: {err}");
    }
    let (code, _, err) = launch(&["-n", "2", "info"], "/nonexistent/dtrain");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("DTRAIN_BIN=/nonexistent/dtrain is not an executable file"), "{err}");
    let (code, out, err) = launch(&["-n", "2", "info"], BIN);
    assert_eq!(code, Some(0), "{out}\n{err}");
    for r in 0..2 {
        assert!(out.contains(&format!("launch: rank {r} of 2")), "{out}");
    }
}
