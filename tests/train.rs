//! Training end to end on small data: it learns, it resumes bit for bit, its checkpoints
//! are refused when incomplete or foreign, and `dtrain eval` reports what users expect.

mod common;

use std::path::{Path, PathBuf};

use dtrain::config::{self, Override, TrainConfig};
use dtrain::train::Resume;

/// A data set where each class has its own words plus shared noise words, prepared with
/// `extra` settings.
fn separable_with(dir: &Path, extra: &[&str]) -> PathBuf {
    common::separable(dir, 60, &[&["output.shards=2"], extra].concat())
}

/// The separable data, every document labeled.
fn separable(dir: &Path) -> PathBuf {
    separable_with(dir, &[])
}

/// The separable data with 6 labels per class kept and the rest of the pool unlabeled.
fn semi_supervised(dir: &Path) -> PathBuf {
    separable_with(dir, &["split.labels_per_class=6"])
}

fn cfg(data: &Path, out: &Path, extra: &[&str]) -> TrainConfig {
    common::train_config(
        data,
        out,
        &[&["train.batch_size=8", "model.dim=16", "optim.lr=0.05"], extra].concat(),
    )
}

use common::train_run as run;

#[test]
fn learns_a_separable_problem_and_logs_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let data = separable(dir.path());
    let out = dir.path().join("run");
    let r = run(&cfg(&data, &out, &["train.epochs=10", "train.log_every=5"]), Resume::No, None).unwrap();
    let test = r.test.expect("a test split");
    assert!(test.accuracy > 0.95, "test accuracy {}", test.accuracy);
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = log.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let train_lines: Vec<&serde_json::Value> = lines.iter().filter(|v| v.get("split").is_none()).collect();
    let first = train_lines.first().unwrap()["loss"].as_f64().unwrap();
    let last = train_lines.last().unwrap()["loss"].as_f64().unwrap();
    assert!(last < first / 4.0, "the loss falls: {first} → {last}");
    for key in ["step", "epoch", "lr", "loss", "train_accuracy", "tokens_per_s", "grad_norm"] {
        assert!(train_lines[0].get(key).is_some(), "metrics line lacks {key}");
    }
    assert!(lines.iter().any(|v| v["split"] == "val"));
    assert!(lines.iter().any(|v| v["split"] == "test"));
}

fn read(dir: &Path, f: &str) -> Vec<u8> {
    std::fs::read(dir.join(f)).unwrap()
}

/// Training records of metrics.jsonl without their timing fields.
fn loss_curve(out: &Path) -> Vec<String> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            for k in ["tokens_per_s", "docs_per_s", "step_ms"] {
                v.as_object_mut().unwrap().remove(k);
            }
            v.to_string()
        })
        .collect()
}

/// Trains `extra` straight to 24 steps and with a stop at 11 then a resume, and asserts
/// that the checkpoints and the metrics are identical.
fn assert_resume_is_exact(extra: &[&str]) {
    assert_resume_is_exact_on(separable, extra)
}

/// [`assert_resume_is_exact`] on the data set `make` builds; a Mean Teacher's weights must
/// match too.
fn assert_resume_is_exact_on(make: fn(&Path) -> PathBuf, extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let data = make(dir.path());
    let extra = [&["train.steps=24", "train.log_every=3", "train.eval_every=4"], extra].concat();
    let straight = dir.path().join("straight");
    let a = run(&cfg(&data, &straight, &extra), Resume::No, None).unwrap();
    let interrupted = dir.path().join("interrupted");
    let c = cfg(&data, &interrupted, &extra);
    let half = run(&c, Resume::No, Some(11)).unwrap();
    assert_eq!(half.steps, 11);
    let b = run(&c, Resume::Auto, None).unwrap();
    assert_eq!((a.steps, b.steps), (24, 24));
    assert_eq!((a.resumed_at, half.resumed_at, b.resumed_at), (0, 0, 11), "where each run started");
    for f in [
        "model.safetensors",
        "optimizer.safetensors",
        "state.bin",
        "teacher.safetensors",
        "average.safetensors",
        "teacher.optimizer.safetensors",
        "teacher_mlp.safetensors",
        "teacher_mlp.optimizer.safetensors",
    ] {
        let optional = f.starts_with("teacher") || f.starts_with("average");
        if optional && !a.final_checkpoint.join(f).exists() {
            continue;
        }
        assert!(read(&a.final_checkpoint, f) == read(&b.final_checkpoint, f), "{f} differs after resume");
    }
    // A Temporal Ensembling bank's snapshot too, file by file.
    if let Ok(entries) = std::fs::read_dir(a.final_checkpoint.join("bank")) {
        let mut n = 0;
        for e in entries {
            let name = e.unwrap().file_name();
            let f = format!("bank/{}", name.to_string_lossy());
            assert!(
                read(&a.final_checkpoint, &f) == read(&b.final_checkpoint, &f),
                "{f} differs after resume"
            );
            n += 1;
        }
        assert!(n > 0, "an empty bank snapshot");
    }
    assert_eq!(loss_curve(&straight), loss_curve(&interrupted), "metrics.jsonl continues exactly");
    // And a fresh run with another seed differs (the comparison has teeth).
    let other = run(
        &cfg(&data, &dir.path().join("other"), &[&extra[..], &["train.seed=2"]].concat()),
        Resume::No,
        None,
    )
    .unwrap();
    assert!(
        read(&a.final_checkpoint, "model.safetensors") != read(&other.final_checkpoint, "model.safetensors")
    );
}

/// Every piece of state in play: hidden layer, both dropouts, accumulation, LAMB for the
/// dense part with lazy Adam for the table, a schedule with warmup, plateau reduction.
const FULL_STATE: [&str; 9] = [
    "model.hidden=[8]",
    "model.embed_dropout=0.2",
    "model.hidden_dropout=0.1",
    "optim.grad_accum=2",
    "optim.kind=\"lamb\"",
    "optim.clip_norm=0.5",
    "schedule.warmup_steps=3",
    "schedule.decay=\"cosine\"",
    "schedule.plateau_patience=1",
];

/// fastText's kind of update: plain SGD on the table fused into the backward pass, Nesterov
/// momentum on the dense tensors (their buffer is the only optimizer state).
const FUSED_SGD: [&str; 5] = [
    "model.embed_dropout=0.2",
    "optim.kind=\"sgd\"",
    "optim.table=\"sgd\"",
    "optim.nesterov=true",
    "optim.lr=0.5",
];

#[test]
fn resume_is_bitwise_identical_with_a_mean_teacher() {
    // Lazy table rows (the default) and the dense update, each with a checkpoint (step 11,
    // where the run is interrupted) between two evaluations (steps 8 and 12); dropout is
    // the noise, the unlabeled split is read. A lazy teacher is brought up to date at every
    // checkpoint of the run's cadence, in the uninterrupted run too: that is why the
    // interruption falls on the cadence, as a crash's resume point always does.
    let mt = ["method=\"mean_teacher\"", "model.embed_dropout=0.3", "train.checkpoint_every=11"];
    assert_resume_is_exact_on(semi_supervised, &mt);
    assert_resume_is_exact_on(semi_supervised, &[&mt[..], &["mean_teacher.lazy_table=false"]].concat());
    // Student and teacher passes each with their own strong view of every row.
    assert_resume_is_exact_on(semi_supervised, &[&mt[..], &["augment.consistency_passes=true"]].concat());
}

#[test]
fn resume_is_bitwise_identical_with_ema_and_swa_weights() {
    // EMA weights beside a Mean Teacher (two shadows), and SWA every 2 steps from step 7
    // (0.3 of 24), lazy and dense.
    let mt = ["method=\"mean_teacher\"", "model.embed_dropout=0.3", "train.checkpoint_every=11"];
    assert_resume_is_exact_on(
        semi_supervised,
        &[&mt[..], &["average.kind=\"ema\"", "average.decay=0.9"]].concat(),
    );
    let swa =
        ["average.kind=\"swa\"", "average.swa_start=0.3", "average.swa_every=2", "train.checkpoint_every=11"];
    assert_resume_is_exact_on(separable, &swa);
    assert_resume_is_exact_on(separable, &[&swa[..], &["average.lazy_table=false"]].concat());
}

/// SWA weights are evaluated, logged, reported and saved as a model of their own, distinct
/// from the last weights; asking a checkpoint for weights it lacks names the reason.
#[test]
fn averaged_weights_are_saved_evaluated_and_loadable() {
    let dir = tempfile::tempdir().unwrap();
    let data = separable(dir.path());
    let out = dir.path().join("swa");
    let c = cfg(
        &data,
        &out,
        &["average.kind=\"swa\"", "average.swa_start=0.5", "train.epochs=6", "train.log_every=5"],
    );
    let r = run(&c, Resume::No, None).unwrap();
    assert_eq!(r.shadows.len(), 1);
    assert_eq!(r.shadows[0].name, "swa");
    let swa_test = r.shadows[0].test.as_ref().unwrap().accuracy;
    assert!(swa_test > 0.9, "SWA weights test accuracy {swa_test}");
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(log.contains("\"model\":\"swa\"") && log.contains("swa_alpha"));
    let (_, _, student) =
        dtrain::checkpoint::load_weights(&r.final_checkpoint, dtrain::checkpoint::Weights::Student).unwrap();
    let (_, _, avg) =
        dtrain::checkpoint::load_weights(&r.final_checkpoint, dtrain::checkpoint::Weights::Average).unwrap();
    assert_ne!(student, avg, "the average differs from the last weights");
    let e = dtrain::checkpoint::load_weights(&r.final_checkpoint, dtrain::checkpoint::Weights::Teacher)
        .unwrap_err();
    assert!(e.to_string().contains("not trained with a Mean Teacher"), "{e}");
    // The average asked for by a weights file's path: that file reads; the student's file
    // is refused (it once gave the student's weights as the average, without a word).
    let file = |f: &str| r.final_checkpoint.join(f);
    let (_, _, named) =
        dtrain::checkpoint::load_weights(&file("average.safetensors"), dtrain::checkpoint::Weights::Average)
            .unwrap();
    assert_eq!(named, avg);
    let e =
        dtrain::checkpoint::load_weights(&file("model.safetensors"), dtrain::checkpoint::Weights::Average)
            .unwrap_err()
            .to_string();
    assert!(e.contains("names a weights file, and --average reads average.safetensors"), "{e}");
    let e = config::load::<TrainConfig>(
        None,
        &["data.dir=\"x\"", "train.out_dir=\"y\"", "average.swa_start=1.0"]
            .map(|s| Override::parse(s).unwrap()),
    )
    .unwrap_err();
    assert!(e.to_string().contains("average.swa_start"), "{e}");
}

/// Runs the separable task with the exp TSA schedule (the task is soon fitted and η stays
/// low, so whole windows drop every labeled row) and checks that `key` is 0 in each window
/// where TSA dropped every row, and that there was such a window.
fn assert_zero_where_tsa_dropped_every_row(data: &Path, out: &Path, extra: &[&str], key: &str) {
    let sets = [extra, &["loss.tsa=\"exp\"", "train.epochs=8", "train.log_every=5"]].concat();
    run(&cfg(data, out, &sets), Resume::No, None).unwrap();
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let mut all_dropped = 0;
    for v in log.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()) {
        if let (Some(x), Some(1.0)) = (v[key].as_f64(), v["tsa_dropped"].as_f64()) {
            assert_eq!(x, 0.0, "step {}: TSA dropped every row, yet {key} is {x}", v["step"]);
            all_dropped += 1;
        }
    }
    assert!(all_dropped > 0, "no window where TSA dropped every row: the check above checked nothing");
}

/// R-Drop's two cross-entropy terms lose the same rows to TSA (METHODS.md §1 with §8): in a
/// window where TSA dropped every labeled row the supervised loss is 0, not half of it
/// left over from the second pass.
#[test]
fn tsa_drops_rows_from_both_rdrop_passes() {
    let dir = tempfile::tempdir().unwrap();
    let data = separable(dir.path());
    let sets = ["method=\"rdrop\"", "model.embed_dropout=0.2"];
    assert_zero_where_tsa_dropped_every_row(&data, &dir.path().join("rdrop-tsa"), &sets, "loss_supervised");
}

#[test]
fn adversarial_training_learns_and_resumes_exactly() {
    // FGM on a supervised run learns the separable task.
    let dir = tempfile::tempdir().unwrap();
    let data = separable(dir.path());
    let r = run(
        &cfg(
            &data,
            &dir.path().join("fgm"),
            &["adversarial.kind=\"fgm\"", "adversarial.epsilon=0.5", "train.epochs=8", "train.log_every=5"],
        ),
        Resume::No,
        None,
    )
    .unwrap();
    assert!(r.test.unwrap().accuracy > 0.9);
    let log = std::fs::read_to_string(dir.path().join("fgm/metrics.jsonl")).unwrap();
    // The perturbation is an ascent direction: the loss at e + r exceeds the loss at e in
    // every logged window.
    let mut windows = 0;
    for v in log.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()) {
        if let (Some(adv), Some(sup)) = (v["loss_adversarial"].as_f64(), v["loss_supervised"].as_f64()) {
            assert!(adv > sup, "step {}: adversarial loss {adv} ≤ clean loss {sup}", v["step"]);
            windows += 1;
        }
    }
    assert!(windows > 3, "no adversarial loss logged");
    // The rows training-signal annealing drops stay out of the adversarial pass: in a
    // window where TSA dropped every labeled row (the separable task is soon fitted, and
    // the exp schedule keeps η low), the adversarial loss is 0, not the dropped rows' loss.
    assert_zero_where_tsa_dropped_every_row(
        &data,
        &dir.path().join("fgm-tsa"),
        &["adversarial.kind=\"fgm\""],
        "loss_adversarial",
    );
    // Every kind resumes bit for bit (Fast-FGSM's random start and VAT's probe included),
    // with the fused SGD table update turned off by the adversarial pass.
    for kind in ["fgm", "pgd", "fast_fgsm"] {
        let set = format!("adversarial.kind=\"{kind}\"");
        assert_resume_is_exact(&[
            set.as_str(),
            "model.hidden=[8]",
            "model.embed_dropout=0.2",
            "adversarial.norm=\"batch\"",
        ]);
    }
    assert_resume_is_exact(&[&FUSED_SGD[..], &["adversarial.kind=\"fgm\""]].concat());
    assert_resume_is_exact_on(
        semi_supervised,
        &[
            "method=\"mean_teacher\"",
            "adversarial.kind=\"vat\"",
            "adversarial.epsilon=2.0",
            "train.checkpoint_every=11",
        ],
    );
}

/// VAT's targets on the unlabeled rows are the clean pass's own predictions: their spread
/// and their accuracy against the hidden labels are logged as for the consistency methods,
/// and a run without an unlabeled term logs neither.
#[test]
fn vat_logs_its_pseudo_labels() {
    let dir = tempfile::tempdir().unwrap();
    let data = semi_supervised(dir.path());
    let vat = dir.path().join("vat");
    let sets = [
        "adversarial.kind=\"vat\"",
        "adversarial.epsilon=0.1",
        "unlabeled.ratio=2",
        "train.steps=60",
        "train.log_every=10",
    ];
    run(&cfg(&data, &vat, &sets), Resume::No, None).unwrap();
    let recs = train_records(&vat);
    assert_eq!(recs.len(), 6);
    for r in &recs {
        let share = r["pseudo_label_top_share"].as_f64().unwrap_or_else(|| panic!("no spread: {r}"));
        assert!((1.0 / 3.0..=1.0).contains(&share), "{r}");
        assert!(r["pseudo_label_accuracy"].is_f64(), "{r}");
        assert!(r.get("pseudo_label_accuracy_masked").is_none(), "VAT has no mask: {r}");
    }
    // The task is separable: once learned, the unlabeled rows' own predictions are right,
    // which they are only if the diagnostic reads the unlabeled rows' logits.
    let last = recs.last().unwrap()["pseudo_label_accuracy"].as_f64().unwrap();
    assert!(last > 0.9, "pseudo-labels right at the end: {last}");
    let sup = dir.path().join("sup");
    run(&cfg(&data, &sup, &["unlabeled.ratio=2", "train.steps=20", "train.log_every=10"]), Resume::No, None)
        .unwrap();
    for r in train_records(&sup) {
        assert!(r.get("pseudo_label_top_share").is_none() && r.get("pseudo_label_accuracy").is_none(), "{r}");
    }
}

#[test]
fn resume_is_bitwise_identical_with_a_temporal_ensembling_bank() {
    // The bank over labeled and unlabeled rows in f16, and over the labeled rows alone in
    // f32; one epoch of the labeled split is 3 steps, so the weight is on after step 3.
    let te = ["method=\"temporal\"", "model.embed_dropout=0.3", "consistency.ramp_epochs=1"];
    assert_resume_is_exact_on(
        semi_supervised,
        &[&te[..], &["temporal.storage=\"f16\"", "unlabeled.ratio=2"]].concat(),
    );
    assert_resume_is_exact_on(semi_supervised, &[&te[..], &["unlabeled.ratio=0"]].concat());
}

#[test]
fn resume_is_bitwise_identical_with_uda_and_fixmatch_and_their_stabilisers() {
    let noise = ["model.embed_dropout=0.3", "unlabeled.ratio=2"];
    let uda = [
        "method=\"uda\"",
        "consistency.threshold=0.4",
        "consistency.distribution_alignment=true",
        "consistency.adaptive_threshold=\"freematch\"",
        "consistency.stabiliser_momentum=0.9",
        "loss.tsa=\"linear\"",
    ];
    assert_resume_is_exact_on(semi_supervised, &[&noise[..], &uda[..]].concat());
    let fixmatch =
        ["method=\"fixmatch\"", "consistency.threshold=0.5", "consistency.adaptive_threshold=\"flexmatch\""];
    assert_resume_is_exact_on(semi_supervised, &[&noise[..], &fixmatch[..]].concat());
}

#[test]
fn resume_is_bitwise_identical_with_pi_and_rdrop() {
    let noise = ["model.embed_dropout=0.3", "model.hidden=[8]", "model.hidden_dropout=0.2"];
    assert_resume_is_exact_on(
        semi_supervised,
        &[&noise[..], &["method=\"pi\"", "pi.stop_gradient_target=false", "optim.grad_accum=2"]].concat(),
    );
    assert_resume_is_exact_on(
        semi_supervised,
        &[&noise[..], &["method=\"rdrop\"", "unlabeled.ratio=1"]].concat(),
    );
}

#[test]
fn resume_is_bitwise_identical() {
    assert_resume_is_exact(&FULL_STATE);
}

/// A line of metrics.jsonl that is no record (a note with a Latin-1 byte) is kept, with the
/// whole file as it was, in a copy beside the log when a run resumes; the records before the
/// resumed step stay in the log (an unreadable file used to be emptied without a word).
#[test]
fn resuming_keeps_a_damaged_metrics_log_aside() {
    let dir = tempfile::tempdir().unwrap();
    let data = separable(dir.path());
    let out = dir.path().join("run");
    let c = cfg(&data, &out, &["train.steps=12", "train.log_every=2"]);
    run(&c, Resume::No, Some(6)).unwrap();
    let log = out.join("metrics.jsonl");
    let mut bytes = std::fs::read(&log).unwrap();
    bytes.extend_from_slice(b"{\"note\": \"caf\xe9\"}\n");
    std::fs::write(&log, &bytes).unwrap();
    run(&c, Resume::Auto, None).unwrap();
    assert_eq!(std::fs::read(out.join("metrics.jsonl.before-resume")).unwrap(), bytes);
    let steps: Vec<u64> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64())
        .collect();
    assert!(steps.contains(&2) && steps.contains(&12), "{steps:?}");
}

#[test]
fn resume_is_bitwise_identical_with_the_fused_table_sgd() {
    assert_resume_is_exact(&FUSED_SGD);
}

/// Moments are stored only where an optimizer keeps them; the fused SGD update of the table
/// trains the same model as forming its gradient first.
#[test]
fn optimizer_state_and_the_fused_update() {
    let dir = tempfile::tempdir().unwrap();
    let data = separable(dir.path());
    let names = |ckpt: &Path| {
        let bytes = read(ckpt, "optimizer.safetensors");
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut n: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
        n.sort();
        n
    };
    let train = |name: &str, extra: &[&str]| {
        let extra = [&["train.steps=12"], extra].concat();
        run(&cfg(&data, &dir.path().join(name), &extra), Resume::No, None).unwrap().final_checkpoint
    };
    let adam = train("adam", &[]);
    // Lazy Adam: m and v of all three tensors, the table's of the rows batches touched.
    let by_rows = [
        "m.embedding.weight",
        "m.output.bias",
        "m.output.weight",
        "rows.embedding.weight",
        "v.embedding.weight",
        "v.output.bias",
        "v.output.weight",
    ];
    assert_eq!(names(&adam), by_rows);
    let adam_sgd = train("adamw-table-sgd", &["optim.table=\"sgd\""]);
    assert_eq!(names(&adam_sgd), ["m.output.bias", "m.output.weight", "v.output.bias", "v.output.weight"]);
    let fused = train("fused", &FUSED_SGD);
    assert_eq!(names(&fused), ["m.output.bias", "m.output.weight"], "momentum buffers only");
    let plain = train("plain", &["optim.kind=\"sgd\"", "optim.table=\"sgd\"", "optim.momentum=0"]);
    assert!(names(&plain).is_empty(), "plain SGD keeps no state");
    // A clip threshold that never binds turns the fusion off (clipping needs the whole
    // gradient first) without changing the update: the two runs train the same model up to
    // the order of float sums.
    let unfused = train("unfused", &[&FUSED_SGD[..], &["optim.clip_norm=1e30"]].concat());
    let (a, b) = (model_floats(&fused), model_floats(&unfused));
    assert!(a != model_floats(&train("seed2", &[&FUSED_SGD[..], &["train.seed=2"]].concat())));
    let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-5, "fused and unfused SGD differ by {worst}");
}

/// Resuming from an earlier checkpoint while later ones exist: pruning never takes an
/// older checkpoint in place of the abandoned later ones (which the run replaces, through a
/// rename aside, as it reaches their steps), and the run ends where an uninterrupted one
/// does.
#[test]
fn resuming_from_an_earlier_checkpoint_keeps_the_older_ones() {
    let dir = tempfile::tempdir().unwrap();
    let data = separable(dir.path());
    let out = dir.path().join("run");
    let names = || -> Vec<String> {
        dtrain::checkpoint::list(&out.join("checkpoints"))
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    };
    let c = cfg(&data, &out, &["train.steps=8", "train.checkpoint_every=4", "train.keep_checkpoints=2"]);
    let first = run(&c, Resume::No, None).unwrap();
    let want = std::fs::read(first.final_checkpoint.join("model.safetensors")).unwrap();
    assert_eq!(names(), ["step-000000004", "step-000000008"]);
    // From step 4, checkpointing every 2 steps, stopped at 6: step 4 stays (pruning it
    // would leave only 6 and the abandoned 8).
    let c2 = cfg(&data, &out, &["train.steps=8", "train.checkpoint_every=2", "train.keep_checkpoints=2"]);
    let step4 = out.join("checkpoints/step-000000004");
    run(&c2, Resume::From(step4.clone()), Some(6)).unwrap();
    assert_eq!(names(), ["step-000000004", "step-000000006", "step-000000008"]);
    // On to the end: step 8 is replaced (the same weights: the run is deterministic), and
    // the newest two are kept; no aside or pruned directory is left behind.
    let again = run(&c2, Resume::From(out.join("checkpoints/step-000000006")), None).unwrap();
    assert_eq!(names(), ["step-000000006", "step-000000008"]);
    assert_eq!(std::fs::read(again.final_checkpoint.join("model.safetensors")).unwrap(), want);
    // Resuming the finished run trains nothing and says so (its summary's throughput is
    // not a figure of 0 token ids/s).
    let done = run(&c2, Resume::Auto, None).unwrap();
    assert_eq!((done.steps, done.resumed_at), (8, 8));
    assert_eq!(done.final_checkpoint, again.final_checkpoint);
    // The command's summary says so, and shows only the split evaluated again.
    let toml = common::write(dir.path(), "empty.toml", b"");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_dtrain"));
    cmd.args(["--quiet", "train", "--config", toml.to_str().unwrap(), "--resume", "auto"]);
    for set in [
        format!("data.dir={:?}", data.display().to_string()),
        format!("train.out_dir={:?}", out.display().to_string()),
        "train.batch_size=8".into(),
        "model.dim=16".into(),
        "optim.lr=0.05".into(),
        "train.steps=8".into(),
        "train.checkpoint_every=2".into(),
        "train.keep_checkpoints=2".into(),
    ] {
        cmd.arg("--set").arg(set);
    }
    let o = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("the run had already finished at step 8: nothing left to train"), "{stdout}");
    assert!(stdout.contains("student: test accuracy") && !stdout.contains("val accuracy -"), "{stdout}");
    let left: Vec<_> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// The checkpoint cadence is free on resume, except with a lazily updated shadow table
/// (a checkpoint brings its rows up to date, which changes the rounding of what follows).
#[test]
fn the_checkpoint_cadence_counts_only_with_a_lazy_shadow_table() {
    let dir = tempfile::tempdir().unwrap();
    let data = semi_supervised(dir.path());
    for (name, extra, refused) in [
        ("sup", &[][..], false),
        ("mt", &["method=\"mean_teacher\"", "unlabeled.ratio=1"][..], true),
        (
            "mt-dense",
            &["method=\"mean_teacher\"", "unlabeled.ratio=1", "mean_teacher.lazy_table=false"][..],
            false,
        ),
    ] {
        let out = dir.path().join(name);
        let every = |k: &str| cfg(&data, &out, &[&["train.steps=8", k][..], extra].concat());
        run(&every("train.checkpoint_every=4"), Resume::No, Some(4)).unwrap();
        let r = run(&every("train.checkpoint_every=2"), Resume::Auto, None);
        match (refused, r) {
            (true, Err(e)) => {
                assert!(e.to_string().contains("train.checkpoint_every counts too"), "{name}: {e}")
            }
            (false, Ok(_)) => {}
            (_, r) => panic!("{name}: {:?}", r.map(|_| ())),
        }
    }
}

#[test]
fn checkpoints_incomplete_foreign_or_existing_are_handled() {
    let dir = tempfile::tempdir().unwrap();
    let data = separable(dir.path());
    let out = dir.path().join("run");
    let c = cfg(&data, &out, &["train.steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=2"]);
    run(&c, Resume::No, None).unwrap();
    let ckpts = dtrain::checkpoint::list(&out.join("checkpoints")).unwrap();
    let names: Vec<String> =
        ckpts.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["step-000000004", "step-000000006"], "only the newest 2 are kept");
    // A fresh run into the same directory is refused.
    let e = run(&c, Resume::No, None).unwrap_err().to_string();
    assert!(e.contains("--resume auto"), "{e}");
    // An incomplete (interrupted) checkpoint is skipped by auto and refused by name.
    std::fs::remove_file(ckpts[1].join("DONE")).unwrap();
    assert_eq!(dtrain::checkpoint::latest(&out.join("checkpoints")).unwrap().unwrap(), ckpts[0]);
    let e = dtrain::checkpoint::load_model(&ckpts[1]).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("incomplete checkpoint"), "{e}");
    // So is its weights file named alone (it used to be read unchecked); a weights file
    // copied out of a checkpoint by itself reads.
    let e = dtrain::checkpoint::load_model(&ckpts[1].join("model.safetensors")).map(|_| ()).unwrap_err();
    assert!(e.to_string().contains("incomplete checkpoint"), "{e}");
    let alone = dir.path().join("alone");
    std::fs::create_dir(&alone).unwrap();
    std::fs::copy(ckpts[0].join("model.safetensors"), alone.join("model.safetensors")).unwrap();
    assert!(dtrain::checkpoint::load_model(&alone.join("model.safetensors")).is_ok());
    // The run's directory, or its checkpoints/, given as a checkpoint: named for what it is,
    // with the newest complete checkpoint in it.
    for given in [out.clone(), out.join("checkpoints")] {
        let e = dtrain::checkpoint::load_model(&given).map(|_| ()).unwrap_err().to_string();
        assert!(
            e.contains("is not a checkpoint directory: its newest checkpoint is")
                && e.contains("step-000000004"),
            "{e}"
        );
    }
    let e = dtrain::checkpoint::load_model(&data).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("is not a checkpoint directory (it has no DONE marker"), "{e}");
    // A directory given as Noisy Student's logits file.
    let e = dtrain::logits::LogitsFile::open(&data).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("is a directory, not a logits file"), "{e}");
    // Another config cannot resume this run.
    let other = cfg(&data, &out, &["train.steps=6", "train.checkpoint_every=2", "optim.lr=0.01"]);
    let e = run(&other, Resume::Auto, None).unwrap_err().to_string();
    assert!(e.contains("different training config: optim.lr: ") && e.contains(" → 0.01"), "{e}");
    // A longer run is another config too, and says so.
    let longer = cfg(&data, &out, &["train.steps=8", "train.checkpoint_every=2", "train.keep_checkpoints=2"]);
    let e = run(&longer, Resume::Auto, None).unwrap_err().to_string();
    assert!(e.contains("train.steps: 6 → 8") && e.contains("train.steps and train.epochs included"), "{e}");
    // A corrupted state file is named.
    let state = ckpts[0].join("state.bin");
    let mut b = std::fs::read(&state).unwrap();
    let last = b.len() - 1;
    b[last] ^= 1;
    std::fs::write(&state, b).unwrap();
    let e = run(&c, Resume::Auto, None).unwrap_err().to_string();
    assert!(e.contains("state.bin") && e.contains("checksum"), "{e}");
    // A truncated model file is named.
    let model = ckpts[0].join("model.safetensors");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 2]).unwrap();
    let e = dtrain::checkpoint::load_model(&ckpts[0]).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn a_checkpoint_copied_under_another_steps_name_or_named_by_a_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = separable(dir.path());
    let out = dir.path().join("run");
    let c = cfg(&data, &out, &["train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=2"]);
    let r = run(&c, Resume::No, None).unwrap();
    // --resume given a file of a checkpoint names the directory to give.
    let e =
        run(&c, Resume::From(r.final_checkpoint.join("model.safetensors")), None).unwrap_err().to_string();
    assert!(
        e.contains("--resume takes a checkpoint directory")
            && e.contains(&format!("give its checkpoint, {}", r.final_checkpoint.display())),
        "{e}"
    );
    // --resume given the run's directory names its newest checkpoint; given a data set,
    // says that it is none.
    let e = run(&c, Resume::From(out.clone()), None).unwrap_err().to_string();
    assert!(
        e.contains(&format!(
            "is not a checkpoint directory: its newest checkpoint is {}",
            r.final_checkpoint.display()
        )),
        "{e}"
    );
    let e = run(&c, Resume::From(data.clone()), None).unwrap_err().to_string();
    assert!(e.contains("is not a checkpoint directory (it has no DONE marker"), "{e}");
    // --resume given a word that is neither `auto`, `no` nor a directory says what it takes.
    let e = run(&c, Resume::From("yes".into()), None).unwrap_err().to_string();
    assert!(e.starts_with("yes: --resume takes `auto`, `no` or a checkpoint directory"), "{e}");
    // Step 2 copied as step 9 is what --resume auto finds newest: refused, with the name to
    // give it back.
    let ckpts = out.join("checkpoints");
    common::copy_dir(&ckpts.join("step-000000002"), &ckpts.join("step-000000009"));
    let e = run(&c, Resume::Auto, None).unwrap_err().to_string();
    assert!(
        e.contains("step-000000009")
            && e.contains("holds the training state of step 2, but its name says step 9")
            && e.contains("step-000000002 is there already: remove the copy"),
        "{e}"
    );
    std::fs::rename(ckpts.join("step-000000002"), dir.path().join("away")).unwrap();
    let e = run(&c, Resume::Auto, None).unwrap_err().to_string();
    assert!(e.contains("rename it to step-000000002"), "{e}");
    // A checkpoint trimmed for inference (its optimizer moments removed) still evaluates;
    // with another step's weights swapped in it is refused, also when they are named by a
    // bare relative path.
    let slim = dir.path().join("slim");
    common::copy_dir(&r.final_checkpoint, &slim);
    std::fs::remove_file(slim.join("optimizer.safetensors")).unwrap();
    let eval = |cwd: &Path, checkpoint: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_dtrain"))
            .current_dir(cwd)
            .arg("--quiet")
            .arg("eval")
            .arg("--checkpoint")
            .arg(checkpoint)
            .arg("--data")
            .arg(&data)
            .output()
            .unwrap()
    };
    let o = eval(dir.path(), &slim);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::copy(dir.path().join("away/model.safetensors"), slim.join("model.safetensors")).unwrap();
    for (cwd, checkpoint) in [(dir.path(), slim.clone()), (&*slim, PathBuf::from("model.safetensors"))] {
        let o = eval(cwd, &checkpoint);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("differs from the file this checkpoint was written with"),
            "{}: {err}",
            checkpoint.display()
        );
    }
}

/// A run whose loss stops being finite ends with an error naming the step and every setting
/// that drove it: here a learning-rate multiplier of 1e30 on every tensor.
#[test]
fn a_diverging_run_names_what_drove_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = separable(dir.path());
    let out = dir.path().join("run");
    let sets = [
        "optim.kind=\"sgd\"",
        "optim.table=\"sgd\"",
        "optim.lr=10",
        "optim.lr_mult={\"\"=1e30}",
        "train.epochs=20",
    ];
    let e = run(&cfg(&data, &out, &sets), Resume::No, None).unwrap_err().to_string();
    assert!(e.contains("the loss became NaN at step") || e.contains("the loss became inf at step"), "{e}");
    assert!(
        e.contains("lower optim.lr (now 10), optim.lr_mult.\"\" (now 1e30); or set optim.clip_norm"),
        "{e}"
    );
    // With a consistency term and clipping, both are named.
    let sets = [
        &sets[..],
        &[
            "method=\"pi\"",
            "model.embed_dropout=0.1",
            "unlabeled.ratio=0",
            "optim.clip_norm=1e30",
            "consistency.weight=5",
        ],
    ]
    .concat();
    let e = run(&cfg(&data, &dir.path().join("pi"), &sets), Resume::No, None).unwrap_err().to_string();
    assert!(e.contains("consistency.weight (now 5); optim.clip_norm is 1e30"), "{e}");
    // A gradient too large for Adam's moments, under a finite loss (FGM's perturbation of
    // 1e30): the run stops at the step it happens, naming the term (it used to train on
    // with infinite moments and fail at the checkpoint's write, blaming the learning rate).
    let sets =
        ["adversarial.kind=\"fgm\"", "adversarial.epsilon=1e30", "train.epochs=20", "train.log_every=1"];
    let out = dir.path().join("fgm");
    let e = run(&cfg(&data, &out, &sets), Resume::No, None).unwrap_err().to_string();
    assert!(e.contains("the gradient's norm became") && e.contains("adversarial.epsilon (now 1e30)"), "{e}");
    let at: u64 = e.split("at step ").nth(1).and_then(|r| r.split(',').next()).unwrap().parse().unwrap();
    let logged = train_records(&out).last().map_or(0, |r| r["step"].as_u64().unwrap());
    assert_eq!(logged + 1, at, "the error names the step after the last logged one: {e}");
    // A consistency temperature far below 1 is named too (R-Drop divides its logits by it).
    let sets =
        ["method=\"rdrop\"", "model.embed_dropout=0.3", "consistency.temperature=1e-30", "train.epochs=20"];
    let e = run(&cfg(&data, &dir.path().join("rdrop"), &sets), Resume::No, None).unwrap_err().to_string();
    assert!(e.contains("raise consistency.temperature (now 1e-30)"), "{e}");
    // MPL's teacher, the same: its gradient overflows at a finite loss, and the run stops
    // there naming the teacher's settings (it once trained on to the checkpoint's write).
    let semi = dir.path().join("semi");
    std::fs::create_dir(&semi).unwrap();
    let data = semi_supervised(&semi);
    let sets = [
        "method=\"mpl\"",
        "model.embed_dropout=0.2",
        "unlabeled.ratio=2",
        "mpl.teacher_optim={lr=10, lr_mult={embedding=1e30}}",
        "train.steps=20",
        "train.log_every=1",
    ];
    let out = dir.path().join("mpl");
    let e = run(&cfg(&data, &out, &sets), Resume::No, None).unwrap_err().to_string();
    assert!(
        e.contains("the teacher's gradient's norm became")
            && e.contains(
                "mpl.teacher_optim.lr (now 10), mpl.teacher_optim.lr_mult.\"embedding\" (now 1e30)"
            )
            && e.contains("; or set optim.clip_norm or mpl.teacher_optim.clip_norm"),
        "{e}"
    );
    let at: u64 = e.split("at step ").nth(1).and_then(|r| r.split(',').next()).unwrap().parse().unwrap();
    let logged = train_records(&out).last().map_or(0, |r| r["step"].as_u64().unwrap());
    assert!(at < 20 && logged + 1 == at, "stopped at step {at}, after step {logged}: {e}");
}

/// A model whose buffers cannot fit in memory is refused before anything is allocated or
/// written, naming the field of its largest buffer and listing them all: the student's, its
/// shadows', and Meta Pseudo Labels' teacher's.
#[test]
fn a_model_larger_than_memory_is_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    // 2^26 buckets × 65536 dims: a 16 TiB table, beyond any machine's memory.
    let data = common::separable(dir.path(), 12, &["tokenizer.buckets=67108864", "split.labels_per_class=4"]);
    let out = dir.path().join("run");
    let huge = "16384.0 GiB";
    let c = cfg(&data, &out, &["model.dim=65536", "method=\"mean_teacher\"", "average.kind=\"ema\""]);
    let e = run(&c, Resume::No, None).unwrap_err().to_string();
    for part in [
        "field `optim.table`",
        &format!("the model's parameters {huge}"),
        "the model's optimizer moments 32768.0 GiB",
        &format!("the Mean Teacher {huge}"),
        &format!("the averaged weights {huge}"),
        "DTRAIN_MEMORY_CHECK=0",
    ] {
        assert!(e.contains(part), "{part} missing: {e}");
    }
    // Without moments for the table, the parameters themselves are the largest part.
    let c = cfg(
        &data,
        &out,
        &["model.dim=65536", "optim.table=\"sgd\"", "optim.kind=\"sgd\"", "optim.momentum=0"],
    );
    let e = run(&c, Resume::No, None).unwrap_err().to_string();
    assert!(e.contains("field `model.dim`") && !e.contains("moments"), "{e}");
    // Sixteen hidden layers of 2^16 units (a 1 TiB run) outweigh the table: they are named.
    let hidden = format!("model.hidden=[{}]", ["65536"; 16].join(","));
    let c = cfg(&data, &out, &["model.dim=1", &hidden]);
    let e = run(&c, Resume::No, None).unwrap_err().to_string();
    assert!(e.contains("field `optim.kind`") && e.contains("fewer or narrower model.hidden layers"), "{e}");
    // An address-space limit (ulimit -v) lowers what is available: a 3 GiB run on a data set
    // of 4096 buckets is refused under a 2 GB limit, naming it.
    std::fs::create_dir(dir.path().join("small")).unwrap();
    let small = common::separable(&dir.path().join("small"), 4, &[]);
    let toml = common::write(
        dir.path(),
        "ulimit.toml",
        format!(
            "[data]\ndir = {:?}\n[model]\ndim = 65536\n[train]\nout_dir = {:?}\n",
            small,
            dir.path().join("u")
        )
        .as_bytes(),
    );
    let script = format!(
        "ulimit -v 2000000 && exec {} train --quiet --config {}",
        env!("CARGO_BIN_EXE_dtrain"),
        toml.display()
    );
    let o = std::process::Command::new("sh").args(["-c", &script]).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.code() == Some(1) && e.contains("available (the address-space limit (ulimit -v))"),
        "{e}"
    );
    // MPL's teacher joins the account of a student of 2^26 × 1 values.
    let c = cfg(
        &data,
        &out,
        &[
            "method=\"mpl\"",
            "model.dim=1",
            "optim.table=\"sgd\"",
            "mpl.teacher.kind=\"bag\"",
            "mpl.teacher.dim=65536",
        ],
    );
    let e = run(&c, Resume::No, None).unwrap_err().to_string();
    assert!(e.contains("field `mpl.teacher.dim`") && e.contains("the model's parameters 256.0 MiB"), "{e}");
    assert!(e.contains(&format!("MPL's teacher's parameters {huge}")), "{e}");
    assert!(!out.join("metrics.jsonl").exists() && !out.join("checkpoints").exists());
}

#[test]
fn bad_training_configs_name_their_field() {
    let dir = tempfile::tempdir().unwrap();
    let data = separable(dir.path());
    let out = dir.path().join("run");
    let c = cfg(&data, &out, &["train.batch_size=7"]);
    let e = run(&c, Resume::No, None).unwrap_err().to_string();
    assert!(e.contains("train.batch_size") && e.contains("multiple of the data set's 2 shards"), "{e}");
    // An empty path names its field (it was the OS's ": No such file or directory").
    for field in ["mpl.logits", "mpl.train_logits", "noisy_student.logits", "mpl.teacher.encoder.pretrained"]
    {
        let sets = [format!("data.dir={:?}", data.display().to_string()), format!("{field}=\"\"")];
        let o: Vec<_> = sets.iter().map(|s| dtrain::config::Override::parse(s).unwrap()).collect();
        let e = dtrain::config::load::<TrainConfig>(None, &o).unwrap_err().to_string();
        assert!(e.contains(field) && e.contains("is empty: name a path"), "{field}: {e}");
    }
    // Schedules longer than the run (train.steps=10) are refused by field.
    for (set, msg) in [
        ("schedule.warmup_steps=10", "schedule.warmup_steps`: 10 leaves no step of the run's 10"),
        ("schedule.cycles=9", "schedule.cycles`: 9 cycles do not fit the run's 8 steps"),
        ("consistency.rampdown_epochs=1000", "a ramp-down of 1000.0 epochs ("),
        ("consistency.rampdown_epochs=1e30", "a ramp-down of 1e30 epochs (past 2^64 steps)"),
    ] {
        let extra = ["train.steps=10", "schedule.warmup_steps=2", "schedule.decay=\"cosine\"", set];
        let e = run(&cfg(&data, &out, &extra), Resume::No, None).unwrap_err().to_string();
        assert!(e.contains(msg), "{set}: {e}");
    }
    run(
        &cfg(
            &data,
            &dir.path().join("cycles"),
            &["train.steps=10", "schedule.warmup_steps=2", "schedule.decay=\"cosine\"", "schedule.cycles=8"],
        ),
        Resume::No,
        None,
    )
    .unwrap();
    let o = |s: &str| {
        vec![
            Override::parse("data.dir=\"x\"").unwrap(),
            Override::parse("train.out_dir=\"y\"").unwrap(),
            Override::parse(s).unwrap(),
        ]
    };
    for (set, field) in [
        ("optim.lr=0", "optim.lr"),
        ("optim.lr=1e38", "must be in (0, 10]"),
        ("optim.lr=10", ""),
        ("model.init_from=\"\"", "model.init_from"),
        ("noisy_student.logits=\"\"", "noisy_student.logits"),
        ("model.embed_dropout=1.0", "model.embed_dropout"),
        ("loss.kind=\"focal\"", ""),
        ("optim.beta2=1.5", "optim.beta2"),
        ("model.activation=\"swish\"", "model.activation"),
        ("train.epochs=0", "train.epochs"),
        ("method=\"magic\"", "method"),
        ("consistency.weight=-1", "consistency.weight"),
        ("consistency.threshold=1.5", "consistency.threshold"),
        ("consistency.temperature=0", "consistency.temperature"),
        ("consistency.ramp=\"step\"", "consistency.ramp"),
        ("unlabeled.ratio=65", "unlabeled.ratio"),
        // Checked without a Mean Teacher too (a config valid under one method stays valid
        // under another).
        ("mean_teacher.alpha=1.0", "field `mean_teacher.alpha`: must be in (0, 1)"),
        ("pi.stop_gradient_target=3", "pi.stop_gradient_target"),
        // Numbers each field's rule accepts but an f32 cannot hold.
        ("optim.lr=1e-300", "field `optim.lr`: 1e-300 is outside the sizes an f32 holds"),
        ("consistency.temperature=1e-39", "field `consistency.temperature`: 1e-39 is outside"),
        ("adversarial.xi=1e300", "field `adversarial.xi`: 1e300 is outside"),
        ("optim.lr_mult={\"output.\"=1e-40}", "field `optim.lr_mult.output.`"),
        ("optim.eps=1e-30", ""),
        // A decay that zeroes or flips every weight in one step, and an eps that swamps √v̂.
        ("optim.weight_decay=1e30", "largest optim.lr_mult is 1.000e27; it must be below 1"),
        ("optim.weight_decay=1000", "field `optim.weight_decay`"),
        ("optim.weight_decay=999", ""),
        ("optim.eps=1e8", "field `optim.eps`: must be at most 1"),
    ] {
        let r: dtrain::Result<TrainConfig> = config::load(None, &o(set));
        match (r, field) {
            (Ok(_), "") => {}
            (Err(e), f) if !f.is_empty() => assert!(e.to_string().contains(f), "{set}: {e}"),
            (r, f) => panic!("{set}: expected {f:?}, got {:?}", r.map(|_| ())),
        }
    }
    let mut with_smoothing = o("loss.kind=\"focal\"");
    with_smoothing.push(Override::parse("loss.label_smoothing=0.1").unwrap());
    let e = config::load::<TrainConfig>(None, &with_smoothing).unwrap_err().to_string();
    assert!(e.contains("loss.label_smoothing"), "{e}");
    // Method rules: R-Drop's term is sym_kl; sym_kl needs a target that takes gradient.
    let with = |sets: &[&str]| {
        let mut v = o(sets[0]);
        v.extend(sets[1..].iter().map(|s| Override::parse(s).unwrap()));
        config::load::<TrainConfig>(None, &v).map(|_| ()).map_err(|e| e.to_string())
    };
    // The decay's rule takes the largest rate multiplier into account.
    with(&["optim.weight_decay=10", "optim.lr_mult={\"output.\"=99}"]).unwrap();
    let e = with(&["optim.weight_decay=10", "optim.lr_mult={\"output.\"=100}"]).unwrap_err();
    assert!(e.contains("optim.weight_decay") && e.contains("is 1.000e0"), "{e}");
    let e = with(&["method=\"mean_teacher\"", "mean_teacher.alpha=1.0"]).unwrap_err();
    assert!(e.contains("mean_teacher.alpha") && e.contains("(0, 1)"), "{e}");
    // Reduced MPL's teacher takes its own optimizer (checked with mpl.logits kept).
    with(&["method=\"mpl_reduced\"", "mpl.logits=\"x\"", "mpl.teacher_optim={lr=0.001}"]).unwrap();
    let e = with(&["method=\"rdrop\"", "consistency.kind=\"mse\""]).unwrap_err();
    assert!(e.contains("consistency.kind") && e.contains("sym_kl"), "{e}");
    let e = with(&["method=\"mean_teacher\"", "consistency.kind=\"sym_kl\""]).unwrap_err();
    assert!(e.contains("consistency.kind") && e.contains("constant target"), "{e}");
    assert!(with(&[
        "method=\"pi\"",
        "model.embed_dropout=0.1",
        "pi.stop_gradient_target=false",
        "consistency.kind=\"sym_kl\""
    ])
    .is_ok());
    // FreeMatch learns its own τ_g and reads no τ: τ = 0 is no contradiction there.
    assert!(with(&[
        "method=\"fixmatch\"",
        "consistency.adaptive_threshold=\"freematch\"",
        "consistency.threshold=0"
    ])
    .is_ok());
    for (sets, field) in [
        (
            &["method=\"mean_teacher\"", "consistency.distribution_alignment=true"][..],
            "consistency.distribution_alignment",
        ),
        (
            &[
                "method=\"fixmatch\"",
                "consistency.adaptive_threshold=\"flexmatch\"",
                "consistency.threshold=0",
            ][..],
            "consistency.threshold",
        ),
        (&["method=\"uda\"", "unlabeled.ratio=0"][..], "unlabeled.ratio"),
        (&["method=\"uda\"", "consistency.stabiliser_momentum=1"][..], "consistency.stabiliser_momentum"),
        (&["augment.deletion=1"][..], "augment.deletion"),
        (&["augment.span=0"][..], "augment.span"),
        (&["adversarial.epsilon=0"][..], "adversarial.epsilon"),
        (&["adversarial.steps=0"][..], "adversarial.steps"),
        (&["adversarial.kind=\"pgdd\""][..], "adversarial.kind"),
        (&["method=\"uda\"", "augment.consistency_passes=true"][..], "augment.consistency_passes"),
        (&["loss.kind=\"focal\"", "loss.tsa=\"log\""][..], "loss.tsa"),
        (&["method=\"mpl_reduced\""][..], "mpl.logits"),
        (&["method=\"mpl_reduced\"", "mpl.logits=\"x\"", "consistency.weight=1"][..], "consistency.weight"),
        (&["method=\"mpl\"", "mpl.baseline_rate=0"][..], "mpl.baseline_rate"),
        (&["method=\"mpl\"", "mpl.label_smoothing=1"][..], "mpl.label_smoothing"),
        (&["method=\"mpl_reduced\"", "mpl.logits=\"x\"", "mpl.teacher={dim=8}"][..], "mpl.teacher"),
        (
            &["method=\"mpl_reduced\"", "mpl.logits=\"x\"", "mpl.teacher_optim={lr=0}"][..],
            "mpl.teacher_optim.lr",
        ),
        // The teacher's own softmax as the target would zero its MPL gradient.
        (&["method=\"mpl\"", "mpl.pseudo_labels=\"soft\""][..], "mpl.pseudo_labels"),
        (&["method=\"mpl\"", "optim.grad_accum=2"][..], "optim.grad_accum"),
        (&["method=\"mpl\"", "mpl.teacher={dim=0}"][..], "mpl.teacher.dim"),
        (&["method=\"mpl\"", "mpl.teacher_optim={lr=0}"][..], "mpl.teacher_optim.lr"),
        (
            &["method=\"mpl\"", "consistency.distribution_alignment=true"][..],
            "consistency.distribution_alignment",
        ),
        (&["mpl.baseline=true"][..], "mpl"),
        // A section's values are checked under methods that do not read it too.
        (&["temporal.alpha=nan"][..], "temporal.alpha"),
        (&["method=\"uda\"", "mean_teacher.alpha=-5"][..], "mean_teacher.alpha"),
        (&["method=\"temporal\"", "mean_teacher.alpha_late=inf"][..], "mean_teacher.alpha_late"),
    ] {
        let e = with(sets).unwrap_err();
        assert!(e.contains(field), "{sets:?}: {e}");
    }
    // A method that reads unlabeled rows on a data set without them.
    let c = cfg(&data, &dir.path().join("mt"), &["method=\"mean_teacher\""]);
    let e = run(&c, Resume::No, None).unwrap_err().to_string();
    assert!(e.contains("unlabeled.ratio") && e.contains("no unlabeled split"), "{e}");
}

#[test]
fn eval_command_prints_text_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let data = separable(dir.path());
    let out = dir.path().join("run");
    let r = run(&cfg(&data, &out, &["train.epochs=5"]), Resume::No, None).unwrap();
    let bin = env!("CARGO_BIN_EXE_dtrain");
    let ck = r.final_checkpoint.to_str().unwrap();
    let o = std::process::Command::new(bin)
        .args(["eval", "--checkpoint", ck, "--data", data.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for key in ["accuracy", "macro_f1", "ece", "per_class", "confusion"] {
        assert!(v.get(key).is_some(), "eval --json lacks {key}");
    }
    assert_eq!(
        v["accuracy"].as_f64().unwrap(),
        r.test.unwrap().accuracy,
        "same figure as the training run's test report"
    );
    let o = std::process::Command::new(bin)
        .args(["eval", "--checkpoint", ck, "--data", data.to_str().unwrap(), "--split", "val"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("val:") && text.contains("macro-F1") && text.contains("confusion matrix"),
        "{text}"
    );
    assert!(o.stderr.is_empty(), "{}", String::from_utf8_lossy(&o.stderr));
    // The same text split with another seed: its test rows may be ones the model trained
    // on, which eval notes (and still evaluates).
    let other_dir = dir.path().join("other");
    std::fs::create_dir(&other_dir).unwrap();
    let other = separable_with(&other_dir, &["split.seed=2"]);
    let o = std::process::Command::new(bin)
        .args(["eval", "--checkpoint", ck, "--data", other.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("was trained on another data set"), "{err}");
}

#[test]
fn predict_averages_checkpoints_and_mc_dropout_passes() {
    let dir = tempfile::tempdir().unwrap();
    let data = separable(dir.path());
    let a = run(
        &cfg(&data, &dir.path().join("a"), &["train.epochs=4", "model.embed_dropout=0.3"]),
        Resume::No,
        None,
    )
    .unwrap();
    let b = run(
        &cfg(&data, &dir.path().join("b"), &["train.epochs=4", "model.embed_dropout=0.3", "train.seed=2"]),
        Resume::No,
        None,
    )
    .unwrap();
    let input = common::write(dir.path(), "in.txt.gz", b"alpha apple\n\nbanana blue beta\ngreen grape\n");
    let bin = env!("CARGO_BIN_EXE_dtrain");
    let predict = |extra: &[&str]| -> Vec<serde_json::Value> {
        let out = dir.path().join("p.jsonl");
        let mut args = vec![
            "predict",
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--top-k",
            "3",
        ];
        args.extend_from_slice(extra);
        let o = std::process::Command::new(bin).args(&args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let (ca, cb) = (a.final_checkpoint.to_str().unwrap(), b.final_checkpoint.to_str().unwrap());
    let one = predict(&["--checkpoint", ca]);
    assert_eq!(one.len(), 3, "the blank line is skipped");
    assert_eq!(one.iter().map(|v| v["line"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 3, 4]);
    assert_eq!(one.iter().map(|v| v["label"].as_str().unwrap()).collect::<Vec<_>>(), ["c0", "c1", "c2"]);
    let p = |v: &serde_json::Value, c: &str| {
        v["top"].as_array().unwrap().iter().find(|e| e["label"] == c).unwrap()["p"].as_f64().unwrap()
    };
    // Two checkpoints: the average of each one's probabilities.
    let other = predict(&["--checkpoint", cb]);
    let both = predict(&["--checkpoint", ca, "--checkpoint", cb]);
    for i in 0..3 {
        for c in ["c0", "c1", "c2"] {
            assert!((p(&both[i], c) - (p(&one[i], c) + p(&other[i], c)) / 2.0).abs() < 1e-6);
        }
    }
    // Checkpoints whose weights (256 KiB each) exceed the memory are refused before they are
    // loaded, naming the one that overruns it; a malformed limit is refused by name.
    let limited = |limit: &str, cks: &[&str]| {
        let mut cmd = std::process::Command::new(bin);
        cmd.env("DTRAIN_MEMORY_LIMIT", limit).args([
            "predict",
            "--input",
            input.to_str().unwrap(),
            "--output",
        ]);
        cmd.arg(dir.path().join("m.jsonl"));
        for ck in cks {
            cmd.args(["--checkpoint", ck]);
        }
        cmd.output().unwrap()
    };
    assert!(limited("400K", &[ca]).status.success());
    let o = limited("400K", &[ca, cb]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("field `--checkpoint`") && e.contains("400.0 KiB is available"),
        "{e}"
    );
    assert!(e.contains(&format!("{cb}/model.safetensors's weights 256.2 KiB")), "{e}");
    let o = limited("lots", &[ca]);
    let e = String::from_utf8_lossy(&o.stderr);
    let want = "environment variable DTRAIN_MEMORY_LIMIT=\"lots\": not a byte count";
    assert!(!o.status.success() && e.contains(want), "{e}");
    // `args` then the output `out` are refused with every one of `wants` said, and nothing
    // is written.
    let refused = |args: &[&str], out: &str, wants: &[&str]| {
        let out = dir.path().join(out);
        let o = std::process::Command::new(bin).args(args).arg(&out).output().unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && wants.iter().all(|w| e.contains(w)), "{e}");
        assert!(!out.exists());
    };
    // Exporting an empty split (this data set has no unlabeled rows) is refused.
    let (d, i) = (data.to_str().unwrap(), input.to_str().unwrap());
    let export = ["export-logits", "--checkpoint", ca, "--data", d, "--split", "unlabeled", "--out"];
    refused(&export, "u.logits", &["split `unlabeled`", "is empty"]);
    // MC dropout: k noisy passes differ from the deterministic pass, and are reproducible.
    let mc = predict(&["--checkpoint", ca, "--mc-dropout", "8"]);
    assert_ne!(mc, one, "dropout passes change the probabilities");
    assert_eq!(
        mc.iter().map(|v| v["label"].clone()).collect::<Vec<_>>(),
        one.iter().map(|v| v["label"].clone()).collect::<Vec<_>>()
    );
    assert_eq!(mc, predict(&["--checkpoint", ca, "--mc-dropout", "8"]));
    // Errors: MC dropout without dropout; mismatched checkpoints; a bad line.
    let plain = run(&cfg(&data, &dir.path().join("c"), &["train.epochs=1"]), Resume::No, None).unwrap();
    let pc = plain.final_checkpoint.to_str().unwrap();
    let mc_plain = ["predict", "--checkpoint", pc, "--input", i, "--mc-dropout", "3", "--output"];
    refused(&mc_plain, "x.jsonl", &["needs a model with dropout"]);
    // --max-len is an encoder's.
    let predict_at = ["predict", "--checkpoint", ca, "--input", i, "--max-len", "64", "--output"];
    refused(&predict_at, "len.jsonl", &["--max-len", "hashed features"]);
    let bad = common::write(dir.path(), "bad.jsonl", b"{\"text\": \"alpha\"}\n{\"body\": 1}\n");
    let o = std::process::Command::new(bin)
        .args([
            "predict",
            "--checkpoint",
            ca,
            "--input",
            bad.to_str().unwrap(),
            "--output",
            dir.path().join("q.jsonl").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("bad.jsonl:2") && e.contains("missing text field"), "{e}");
    assert!(!dir.path().join("q.jsonl").exists(), "no partial output");
    assert!(!dir.path().join("q.jsonl.tmp").exists(), "no temporary file left");
    // With --skip-bad, an input whose every line is bad predicts nothing and fails.
    let all_bad = common::write(dir.path(), "all_bad.jsonl", b"{\"body\": 1}\n{\"body\": 2}\n");
    let o = std::process::Command::new(bin)
        .args(["predict", "--skip-bad", "--checkpoint", ca, "--input", all_bad.to_str().unwrap(), "--output"])
        .arg(dir.path().join("s.jsonl"))
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("all_bad.jsonl") && e.contains("every line was bad"), "{e}");
    assert!(!dir.path().join("s.jsonl").exists(), "no output");
    // An input of no document (empty, or blank lines only) fails too, and leaves an earlier
    // output under that name as it was.
    let earlier = b"{\"line\":1,\"label\":\"a\",\"confidence\":0.5,\"top\":[]}\n";
    let kept = common::write(dir.path(), "kept.jsonl", earlier);
    for (name, body) in [("empty.txt", &b""[..]), ("blank.txt", &b"\n  \n\n"[..])] {
        let input = common::write(dir.path(), name, body);
        let o = std::process::Command::new(bin)
            .args(["predict", "--checkpoint", ca, "--input", input.to_str().unwrap(), "--output"])
            .arg(&kept)
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains(name) && e.contains("holds no document"), "{e}");
        assert_eq!(std::fs::read(&kept).unwrap(), earlier, "{name}: the earlier output is kept");
    }
    // An output that would destroy an input or a checkpoint's file is refused, and the
    // file is left as it was.
    let text = common::write(dir.path(), "in.txt", b"alpha apple\n");
    let model_file = a.final_checkpoint.join("model.safetensors");
    let model_bytes = std::fs::read(&model_file).unwrap();
    let config = common::write(dir.path(), "run.toml", b"method = \"supervised\"\n");
    // A run's metrics log is JSON lines too; a FIFO (like /dev/null, a device) would be
    // replaced by a plain file by the rename that puts the output in place.
    let metrics = a.final_checkpoint.parent().unwrap().parent().unwrap().join("metrics.jsonl");
    let metrics_bytes = std::fs::read(&metrics).unwrap();
    let fifo = dir.path().join("fifo");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    for (out, want) in [
        (&text, "is the input"),
        (&model_file, "is a checkpoint"),
        (&config, "not a file of the kind this writes"),
        (&metrics, "is a run's metrics log"),
        (&fifo, "is not a regular file"),
    ] {
        let o = std::process::Command::new(bin)
            .args(["predict", "--checkpoint", ca, "--input", text.to_str().unwrap(), "--output"])
            .arg(out)
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains("--output") && e.contains(want), "{e}");
    }
    // An output under a file names that file and the rule, not the OS's bare error.
    let o = std::process::Command::new(bin)
        .args(["predict", "--checkpoint", ca, "--input", text.to_str().unwrap(), "--output"])
        .arg(text.join("p.jsonl"))
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("in.txt is a file, not a directory"), "{e}");
    assert_eq!(std::fs::read(&text).unwrap(), b"alpha apple\n");
    assert_eq!(std::fs::read(&model_file).unwrap(), model_bytes);
    assert_eq!(std::fs::read(&config).unwrap(), b"method = \"supervised\"\n");
    assert_eq!(std::fs::read(&metrics).unwrap(), metrics_bytes);
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&std::fs::metadata(&fifo).unwrap().file_type()));
    // A missing input: nothing is made at all.
    let o = std::process::Command::new(bin)
        .args(["predict", "--checkpoint", ca, "--input", "/nonexistent/in.txt", "--output"])
        .arg(dir.path().join("r.jsonl"))
        .output()
        .unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("/nonexistent/in.txt"));
    assert!(!dir.path().join("r.jsonl").exists() && !dir.path().join("r.jsonl.tmp").exists());
}

#[test]
fn plot_draws_a_png_and_names_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    let data = separable(dir.path());
    let out = dir.path().join("run");
    run(&cfg(&data, &out, &["train.epochs=3", "train.log_every=2"]), Resume::No, None).unwrap();
    let png = dir.path().join("c.png");
    let curves = dtrain::plot::read_metrics(&out.join("metrics.jsonl")).unwrap();
    assert!(curves.train_loss.len() >= 3 && !curves.val_acc.is_empty() && curves.test_acc.len() == 1);
    dtrain::plot::plot(&curves, "t", &png, 600, 300).unwrap();
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));
    // `dtrain plot` takes the run's directory for its metrics log.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_dtrain"))
        .args(["--quiet", "plot", out.to_str().unwrap(), "-o", dir.path().join("d.png").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::read(dir.path().join("d.png")).unwrap().starts_with(b"\x89PNG"));
    // A Mean Teacher's (or EMA's, MPL teacher's) evaluations are not drawn into the
    // student's curves (they made a zig-zag of two points per step).
    let mt = common::write(
        dir.path(),
        "mt.jsonl",
        b"{\"step\": 1, \"loss\": 2.0}\n{\"step\": 1, \"split\": \"val\", \"accuracy\": 0.5}\n\
          {\"step\": 1, \"split\": \"val\", \"model\": \"teacher\", \"accuracy\": 0.9}\n\
          {\"step\": 1, \"split\": \"test\", \"model\": \"ema\", \"accuracy\": 0.9}\n",
    );
    let c = dtrain::plot::read_metrics(&mt).unwrap();
    assert_eq!((c.val_acc.clone(), c.test_acc.len()), (vec![(1.0, 0.5)], 0), "{c:?}");
    let binary = common::write(dir.path(), "b.jsonl", b"{\"step\": 1, \"loss\": 2.0}\n\xff\xfe\n");
    let e = dtrain::plot::read_metrics(&binary).unwrap_err().to_string();
    assert!(e.contains("b.jsonl:2") && e.contains("not UTF-8"), "{e}");
    let bad = common::write(dir.path(), "m.jsonl", b"{\"step\": 1, \"loss\": 2.0}\nnot json\n");
    let e = dtrain::plot::read_metrics(&bad).unwrap_err().to_string();
    assert!(e.contains("m.jsonl:2") && e.contains("invalid JSON"), "{e}");
    // A last line cut short (a run writing it) is left out, and said to be; the same line
    // ended by a newline is damage.
    let torn =
        common::write(dir.path(), "t.jsonl", b"{\"step\": 1, \"loss\": 2.0}\n{\"step\": 2, \"loss\": 1.");
    let c = dtrain::plot::read_metrics(&torn).unwrap();
    assert!(c.torn_last_line && c.train_loss == [(1.0, 2.0)], "{c:?}");
    let ended =
        common::write(dir.path(), "u.jsonl", b"{\"step\": 1, \"loss\": 2.0}\n{\"step\": 2, \"loss\": 1.\n");
    let e = dtrain::plot::read_metrics(&ended).unwrap_err().to_string();
    assert!(e.contains("u.jsonl:2") && e.contains("invalid JSON"), "{e}");
    assert!(!dtrain::plot::read_metrics(&mt).unwrap().torn_last_line);
    for (line, want) in [
        (&b"{\"step\": \"x\", \"loss\": 1}\n"[..], "m.jsonl:1: `step` is \"x\", not a whole number"),
        // Nonsense that used to be drawn, or dropped, without a word.
        (b"{\"step\": -5, \"loss\": 1}\n", "`step` is -5, not a whole number"),
        (b"{\"step\": 1e30, \"loss\": 1}\n", "`step` is 1e+30, not a whole number"),
        (b"{\"step\": 1, \"loss\": null}\n", "`loss` is null, not a number (null is how a NaN is written)"),
        (b"{\"step\": 1, \"loss\": \"abc\"}\n", "`loss` is \"abc\", not a number"),
        (b"{\"step\": 5, \"loss\": 1}\n{\"step\": 2, \"loss\": 1}\n", "m.jsonl:2: step 2 after step 5"),
        (b"{\"epoch\": 1, \"loss\": 1}\n", "this is a skip-gram or CBOW pretraining's metrics.jsonl"),
        (b"{\"loss\": 1}\n", "no `step`: not a training run's metrics.jsonl"),
        (b"{\"step\": 1, \"split\": \"val\", \"accuracy\": 7}\n", "`accuracy` is 7, outside [0, 1]"),
        (b"{\"step\": 1, \"split\": \"val\", \"accuracy\": 1e300}\n", "`accuracy` is 1e300, outside [0, 1]"),
    ] {
        std::fs::write(&bad, line).unwrap();
        let e = dtrain::plot::read_metrics(&bad).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
    // A FIFO (which would wait for a writer) and a directory are named, not opened.
    let fifo = dir.path().join("fifo.jsonl");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    for p in [fifo, dir.path().to_path_buf()] {
        let e = dtrain::plot::read_metrics(&p).unwrap_err().to_string();
        assert!(e.contains("is not a regular file, so not a metrics.jsonl"), "{e}");
    }
}

fn model_floats(dir: &Path) -> Vec<f32> {
    dtrain::checkpoint::load_model(dir).unwrap().2
}

/// Under Adam a gradient summed instead of averaged over the micro-batches would take
/// almost the same step (Adam does not see the gradient's scale), so each optimizer family
/// is run: plain SGD's step is proportional to the gradient, and a control of one
/// micro-batch of 8 without accumulation must differ.
#[test]
fn accumulation_equals_one_larger_batch() {
    let dir = tempfile::tempdir().unwrap();
    let data = separable(dir.path());
    let sgd = ["optim.kind=\"sgd\"", "optim.table=\"sgd\"", "optim.momentum=0.0", "optim.lr=0.5"];
    for (name, extra) in [("adam", &[][..]), ("sgd", &sgd[..])] {
        let train = |tag: &str, sets: &[&str]| {
            let sets: Vec<&str> = ["train.steps=6"].iter().chain(sets).chain(extra).copied().collect();
            let r =
                run(&cfg(&data, &dir.path().join(format!("{name}-{tag}")), &sets), Resume::No, None).unwrap();
            model_floats(&r.final_checkpoint)
        };
        let pa = train("accum", &["train.batch_size=8", "optim.grad_accum=2"]);
        let pb = train("large", &["train.batch_size=16"]);
        let pc = train("small", &["train.batch_size=8"]);
        let diff = |p: &[f32], q: &[f32]| p.iter().zip(q).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        let worst = diff(&pa, &pb);
        assert!(worst < 1e-5, "{name}: largest difference {worst}");
        let control = diff(&pc, &pb);
        assert!(
            control > 1e3 * worst.max(1e-7),
            "{name}: batch 8 without accumulation is as close ({control})"
        );
    }
}

#[test]
fn the_thread_count_does_not_change_training() {
    let dir = tempfile::tempdir().unwrap();
    let data = separable(dir.path());
    let common = ["train.steps=8", "train.batch_size=64"];
    let lazy_adam = ["model.hidden=[8]", "model.embed_dropout=0.2", "optim.clip_norm=0.5"];
    for (name, extra) in [("lazy-adam", &lazy_adam[..]), ("fused-sgd", &FUSED_SGD[..])] {
        let mut outs = Vec::new();
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let c =
                cfg(&data, &dir.path().join(format!("{name}-t{threads}")), &[&common[..], extra].concat());
            let r = pool.install(|| run(&c, Resume::No, None)).unwrap();
            outs.push(read(&r.final_checkpoint, "model.safetensors"));
        }
        assert!(outs[0] == outs[1], "{name}: 1 and 3 threads give different parameters");
    }
}

#[test]
fn corrupted_or_absurd_checkpoints_are_refused_without_aborting() {
    let dir = tempfile::tempdir().unwrap();
    let data = separable(dir.path());
    let r = run(&cfg(&data, &dir.path().join("run"), &["train.steps=3"]), Resume::No, None).unwrap();
    let file = r.final_checkpoint.join("model.safetensors");
    let original = std::fs::read(&file).unwrap();
    // One flipped bit in the tensor data.
    let mut b = original.clone();
    let last = b.len() - 5;
    b[last] ^= 0x10;
    std::fs::write(&file, &b).unwrap();
    let e = dtrain::checkpoint::load_model(&r.final_checkpoint).map(|_| ()).unwrap_err().to_string();
    assert!(
        e.contains("model.safetensors")
            && e.contains("differs from the file this checkpoint was written with"),
        "{e}"
    );
    // DONE's record refuses every edit below before the file format's own checks, which are
    // what the rest of this test is about: DONE is emptied, as in a checkpoint from before
    // the record (and as for a weights file read on its own).
    std::fs::write(r.final_checkpoint.join(dtrain::checkpoint::DONE), "").unwrap();
    let e = dtrain::checkpoint::load_model(&r.final_checkpoint).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("model.safetensors") && e.contains("tensor data does not match its checksum"), "{e}");
    // Metadata asking for a 2^40-row table: refused before any allocation.
    let header_len = u64::from_le_bytes(original[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&original[8..8 + header_len]).unwrap();
    assert!(header.contains("\\\"buckets\\\":4096"), "{header}");
    let forged = header.replace("\\\"buckets\\\":4096", "\\\"buckets\\\":1099511627776");
    let mut f = (forged.len() as u64).to_le_bytes().to_vec();
    f.extend_from_slice(forged.as_bytes());
    f.extend_from_slice(&original[8 + header_len..]);
    std::fs::write(&file, &f).unwrap();
    let e = dtrain::checkpoint::load_model(&r.final_checkpoint).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("metadata"), "{e}");
    // A label renamed in place (same length, still valid JSON and a valid model): only the
    // metadata's own checksum tells.
    let renamed = header.replacen("\\\"c1\\\"", "\\\"c7\\\"", 1);
    assert_ne!(renamed, header, "{header}");
    let mut f = original[..8].to_vec();
    f.extend_from_slice(renamed.as_bytes());
    f.extend_from_slice(&original[8 + header_len..]);
    std::fs::write(&file, &f).unwrap();
    let e = dtrain::checkpoint::load_model(&r.final_checkpoint).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("model.safetensors") && e.contains("metadata does not match its checksum"), "{e}");
    std::fs::write(&file, &original).unwrap();
    // A checkpoint's other files, given as the weights, are named as such with the
    // directory to pass (they used to be "invalid metadata" and "header too large").
    for f in ["optimizer.safetensors", "state.bin"] {
        let e = dtrain::checkpoint::load_weights(
            &r.final_checkpoint.join(f),
            dtrain::checkpoint::Weights::Student,
        )
        .map(|_| ())
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(f)
                && e.contains("holds no classifier's weights")
                && e.contains("pass the checkpoint directory"),
            "{e}"
        );
    }
    assert!(dtrain::checkpoint::load_weights(&file, dtrain::checkpoint::Weights::Student).is_ok());
    // A weights file copied under another name in the directory still loads; a misspelt
    // name is not found (not "another file of the checkpoint").
    let copy = r.final_checkpoint.join("best.safetensors");
    std::fs::copy(&file, &copy).unwrap();
    assert!(dtrain::checkpoint::load_weights(&copy, dtrain::checkpoint::Weights::Student).is_ok());
    std::fs::remove_file(&copy).unwrap();
    let e = dtrain::checkpoint::load_weights(
        &r.final_checkpoint.join("modle.safetensors"),
        dtrain::checkpoint::Weights::Student,
    )
    .map(|_| ())
    .unwrap_err()
    .to_string();
    assert!(e.contains("modle.safetensors") && !e.contains("holds no classifier's weights"), "{e}");
    // The optimizer file is checked the same way.
    let opt = r.final_checkpoint.join("optimizer.safetensors");
    let mut o = std::fs::read(&opt).unwrap();
    let last = o.len() - 3;
    o[last] ^= 1;
    std::fs::write(&opt, &o).unwrap();
    let c = cfg(&data, &dir.path().join("run"), &["train.steps=6"]);
    let e = run(&c, Resume::Auto, None).unwrap_err().to_string();
    assert!(e.contains("optimizer.safetensors") && e.contains("checksum"), "{e}");
}

/// Spec values whose JSON serde_json does not parse back to the same f64 bits (an f32
/// dropout of 0.03 stored as 0.029999999329447746) still load: the metadata's checksum
/// covers the stored text, not a re-serialisation.
#[test]
fn checkpoints_with_awkward_spec_numbers_load() {
    let dir = tempfile::tempdir().unwrap();
    let data = separable(dir.path());
    for p in ["0.03", "0.11", "0.97"] {
        let c = cfg(&data, &dir.path().join(p), &["train.steps=2", &format!("model.embed_dropout={p}")]);
        let r = run(&c, Resume::No, None).unwrap();
        let (meta, _, _) = dtrain::checkpoint::load_model(&r.final_checkpoint).unwrap();
        match meta.model {
            dtrain::model::ModelSpec::Bag(b) => assert_eq!(b.embed_dropout, p.parse::<f32>().unwrap()),
            other => panic!("a bag model was trained, the checkpoint says {other:?}"),
        }
    }
}

/// An out_dir whose run left metrics but no complete checkpoint is not overwritten by a new
/// run; `--resume auto` starts again over it.
#[test]
fn a_new_run_keeps_an_earlier_runs_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let data = separable(dir.path());
    let out = dir.path().join("run");
    std::fs::create_dir_all(&out).unwrap();
    let metrics = common::write(&out, "metrics.jsonl", b"{\"step\":1,\"loss\":2.0}\n");
    let c = cfg(&data, &out, &["train.steps=2"]);
    let e = run(&c, Resume::No, None).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("metrics.jsonl") && e.contains("earlier run"), "{e}");
    assert_eq!(std::fs::read(&metrics).unwrap(), b"{\"step\":1,\"loss\":2.0}\n");
    assert_eq!(run(&c, Resume::Auto, None).unwrap().steps, 2);
}

#[test]
fn resume_checks_the_data_and_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let data = separable(dir.path());
    let out = dir.path().join("run");
    run(&cfg(&data, &out, &["train.steps=4", "optim.lr_mult={ embedding = 2.0 }"]), Resume::No, None)
        .unwrap();
    // Moved data resumes (identified by content, not path).
    let moved = dir.path().join("moved");
    std::fs::rename(&data, &moved).unwrap();
    let r =
        run(&cfg(&moved, &out, &["train.steps=6", "optim.lr_mult={ embedding = 2.0 }"]), Resume::Auto, None);
    assert!(r.is_err(), "train.steps is part of the trajectory");
    let c = cfg(&moved, &out, &["train.steps=4", "optim.lr_mult={ embedding = 2.0 }"]);
    assert_eq!(run(&c, Resume::Auto, None).unwrap().steps, 4);
    // Changed data is refused.
    let other = dir.path().join("other.tsv");
    // Same classes and tokenizer, other documents: only the data checksum tells them apart.
    let text: String =
        (0..40).flat_map(|j| (0..3).map(move |c| format!("c{c}\tother words {j} here {c}\n"))).collect();
    std::fs::write(&other, text).unwrap();
    std::fs::remove_dir_all(&moved).unwrap();
    common::run(&[&other], &[], &moved, &["output.shards=2", "tokenizer.buckets=4096"]).unwrap();
    let e = run(&c, Resume::Auto, None).unwrap_err().to_string();
    assert!(e.contains("another data set"), "{e}");
    // A finished run resumed again writes its test record once.
    let lines = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.matches("\"split\":\"test\"").count(), 1, "{lines}");
    // A multiplier that matches no tensor is an error naming it.
    let e = run(
        &cfg(&data_again(dir.path()), &dir.path().join("typo"), &["optim.lr_mult={ embeding = 2.0 }"]),
        Resume::No,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("optim.lr_mult.embeding") && e.contains("matches no tensor"), "{e}");
}

fn data_again(dir: &Path) -> PathBuf {
    let d = dir.join("again");
    std::fs::create_dir_all(&d).unwrap();
    separable(&d)
}

#[test]
fn mc_dropout_does_not_depend_on_the_batch_size() {
    let dir = tempfile::tempdir().unwrap();
    let data = separable(dir.path());
    let r = run(
        &cfg(&data, &dir.path().join("a"), &["train.epochs=2", "model.embed_dropout=0.4"]),
        Resume::No,
        None,
    )
    .unwrap();
    // The same document 20 times: only dropout masks can tell the rows apart.
    let text = "alpha beta gamma word7 common\n".repeat(20);
    let input = common::write(dir.path(), "in.txt", text.as_bytes());
    let bin = env!("CARGO_BIN_EXE_dtrain");
    let predict = |bs: &str, passes: &str| {
        let out = dir.path().join(format!("p{bs}-{passes}.jsonl"));
        let o = std::process::Command::new(bin)
            .args([
                "predict",
                "--checkpoint",
                r.final_checkpoint.to_str().unwrap(),
                "--input",
                input.to_str().unwrap(),
            ])
            .args(["--output", out.to_str().unwrap(), "--batch-size", bs])
            .args(if passes == "0" { vec![] } else { vec!["--mc-dropout", passes] })
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read_to_string(out).unwrap()
    };
    let (one, many) = (predict("1", "4"), predict("4096", "4"));
    assert_eq!(one, many, "batch size changed MC-dropout results");
    let confidences = |out: &str| -> std::collections::HashSet<String> {
        out.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["confidence"].to_string())
            .collect()
    };
    assert!(confidences(&one).len() > 1, "each row gets its own masks: {one}");
    // Without MC dropout the rows are one prediction, which the averaged passes are not.
    let plain = confidences(&predict("4096", "0"));
    assert_eq!(plain.len(), 1, "{plain:?}");
    assert!(confidences(&one).is_disjoint(&plain), "{plain:?}");
}

/// The logits of the unlabeled split of `ds` under `model`, exported on the CPU to `out`.
fn export_unlabeled(
    model: &dtrain::model::Model,
    params: &[f32],
    ds: &dtrain::data::dataset::Dataset,
    out: &Path,
    jsonl: Option<&Path>,
    batch: usize,
) -> dtrain::Result<dtrain::logits::ExportReport> {
    let be = dtrain::backend::cpu::Cpu::<f32>::new();
    dtrain::logits::export(
        &be,
        model,
        params,
        ds,
        dtrain::data::shard::SplitKind::Unlabeled,
        out,
        jsonl,
        batch,
    )
}

/// `export-logits` writes exactly the model's logits for every unlabeled sample; the file
/// refuses damage and other data; Noisy Student trains on it and resumes bit for bit.
#[test]
fn export_logits_and_noisy_student() {
    use dtrain::data::loader::RowId;
    use dtrain::data::shard::SplitKind;
    use dtrain::logits::LogitsFile;
    let dir = tempfile::tempdir().unwrap();
    let data = semi_supervised(dir.path());
    let teacher =
        run(&cfg(&data, &dir.path().join("teacher"), &["train.steps=12"]), Resume::No, None).unwrap();
    let (_, model, params) = dtrain::checkpoint::load_model(&teacher.final_checkpoint).unwrap();
    let ds = dtrain::data::dataset::Dataset::open(&data).unwrap();
    let file = dir.path().join("teacher.logits");
    let jsonl = dir.path().join("pseudo.jsonl");
    let r = export_unlabeled(&model, &params, &ds, &file, Some(&jsonl), 7).unwrap();
    let n_unlabeled = ds.manifest().splits["unlabeled"].docs;
    assert_eq!(r.rows, n_unlabeled);
    // Writing the file again replaces it; a file of another kind, or one inside the data
    // set, is refused and left alone.
    let export_to = |out: &Path| export_unlabeled(&model, &params, &ds, out, None, 7).map(|_| ());
    export_to(&file).unwrap();
    let shard = data.join("unlabeled-00000.shard");
    let shard_bytes = std::fs::read(&shard).unwrap();
    let e = export_to(&shard).unwrap_err().to_string();
    assert!(e.contains("is a prepared data set"), "{e}");
    assert_eq!(std::fs::read(&shard).unwrap(), shard_bytes);
    let other = common::write(dir.path(), "notes.txt", b"mine");
    let e = export_to(&other).unwrap_err().to_string();
    assert!(e.contains("not a file of the kind this writes"), "{e}");
    assert_eq!(std::fs::read(&other).unwrap(), b"mine");
    // The pseudo-labels may replace only an earlier JSON-lines output, never the logits
    // file itself (however the two paths are spelled), and a `<stem>.tmp` beside the output
    // is not the export's temporary file.
    let e = export_unlabeled(&model, &params, &ds, &file, Some(&other), 7).unwrap_err().to_string();
    assert!(e.contains("--pseudo-labels") && e.contains("not a file of the kind this writes"), "{e}");
    assert_eq!(std::fs::read(&other).unwrap(), b"mine");
    let fresh = dir.path().join("fresh.logits");
    let spelled = dir.path().join(".").join("fresh.logits");
    let e = export_unlabeled(&model, &params, &ds, &fresh, Some(&spelled), 7).unwrap_err().to_string();
    assert!(e.contains("is also --out") && !fresh.exists(), "{e}");
    let stem_tmp = common::write(dir.path(), "fresh.tmp", b"precious");
    export_to(&fresh).unwrap();
    assert_eq!(std::fs::read(&stem_tmp).unwrap(), b"precious");
    assert_eq!(r.known, n_unlabeled, "every unlabeled sample of a simulated split has a hidden label");
    let lines = std::fs::read_to_string(&jsonl).unwrap();
    assert_eq!(lines.lines().count() as u64, n_unlabeled);
    let first: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    for key in ["sample_id", "label", "confidence", "shard", "row"] {
        assert!(first.get(key).is_some(), "a pseudo-label line lacks {key}");
    }
    // Every row equals a fresh forward pass over that document.
    let f = LogitsFile::open(&file).unwrap();
    f.check_matches(&ds, SplitKind::Unlabeled).unwrap();
    let be = dtrain::backend::cpu::Cpu::<f32>::new();
    for (s, shard) in ds.shards(SplitKind::Unlabeled).iter().enumerate() {
        for i in 0..shard.len() {
            let mut b = dtrain::backend::HostBatch::default();
            b.push(shard.doc(i).ids, -1);
            let mut acts = dtrain::model::Acts::new(&be, &model);
            model.forward(&be, &params, &model.input(&be, &b), 1, None, &mut acts);
            let id = RowId { split: SplitKind::Unlabeled, shard: s as u32, row: i as u32 };
            assert_eq!(f.row(id), &acts.logits()[..], "shard {s} row {i}");
        }
    }
    assert!(f.check_matches(&ds, SplitKind::Train).unwrap_err().to_string().contains("split `unlabeled`"));
    std::fs::create_dir(dir.path().join("o")).unwrap();
    let other = separable_with(&dir.path().join("o"), &["split.labels_per_class=5"]);
    let e = f
        .check_matches(&dtrain::data::dataset::Dataset::open(&other).unwrap(), SplitKind::Unlabeled)
        .unwrap_err();
    assert!(e.to_string().contains("another data set") && e.to_string().contains("rows differ"), "{e}");
    // Another split seed: the same number of rows in each shard, other rows in them.
    std::fs::create_dir(dir.path().join("s")).unwrap();
    let reseeded = separable_with(&dir.path().join("s"), &["split.labels_per_class=6", "split.seed=7"]);
    let reseeded = dtrain::data::dataset::Dataset::open(&reseeded).unwrap();
    let sizes = |d: &dtrain::data::dataset::Dataset| -> Vec<usize> {
        d.shards(SplitKind::Unlabeled).iter().map(|s| s.len()).collect()
    };
    assert_eq!(sizes(&reseeded), sizes(&ds));
    let e = f.check_matches(&reseeded, SplitKind::Unlabeled).unwrap_err().to_string();
    assert!(e.contains("rows differ"), "{e}");
    // The same rows prepared with another tokenizer: the rows fingerprint lets a teacher on
    // one tokenizer give targets to a student on another, and Noisy Student learns from them.
    std::fs::create_dir(dir.path().join("t")).unwrap();
    let retok = separable_with(
        &dir.path().join("t"),
        &["split.labels_per_class=6", "tokenizer.word_ngrams=1", "tokenizer.buckets=2048"],
    );
    let retok_ds = dtrain::data::dataset::Dataset::open(&retok).unwrap();
    assert_ne!(retok_ds.manifest().checksum, ds.manifest().checksum);
    let print =
        |d: &dtrain::data::dataset::Dataset| dtrain::logits::rows_fingerprint(d, SplitKind::Unlabeled);
    assert_eq!(print(&retok_ds), print(&ds));
    assert_eq!(f.rows_fingerprint, Some(print(&ds)));
    f.check_matches(&retok_ds, SplitKind::Unlabeled).unwrap();
    let across = run(
        &cfg(
            &retok,
            &dir.path().join("ns-retok"),
            &[
                "method=\"noisy_student\"",
                "train.steps=24",
                &format!("noisy_student.logits={:?}", file.display().to_string()),
            ],
        ),
        Resume::No,
        None,
    )
    .unwrap();
    assert!(across.test.unwrap().accuracy > 0.6);
    let bytes = std::fs::read(&file).unwrap();
    // A version 1 file (no fingerprint; header checksum at 64 over bytes 0..64) is still
    // read, and matches only the data set it was exported from.
    let mut v1 = bytes.clone();
    v1[8..12].copy_from_slice(&1u32.to_le_bytes());
    let hc = xxhash_rust::xxh3::xxh3_64(&v1[..64]);
    v1[64..72].copy_from_slice(&hc.to_le_bytes());
    v1[72..88].fill(0);
    let old = dir.path().join("v1.logits");
    std::fs::write(&old, &v1).unwrap();
    let f1 = LogitsFile::open(&old).unwrap();
    assert_eq!(f1.rows_fingerprint, None);
    f1.check_matches(&ds, SplitKind::Unlabeled).unwrap();
    let e = f1.check_matches(&retok_ds, SplitKind::Unlabeled).unwrap_err().to_string();
    assert!(e.contains("version 1") && e.contains("export it again"), "{e}");
    // A version 2 file (no source; header checksum at 72 over bytes 0..72) is still read.
    let mut v2 = bytes.clone();
    v2[8..12].copy_from_slice(&2u32.to_le_bytes());
    let hc = xxhash_rust::xxh3::xxh3_64(&v2[..72]);
    v2[72..80].copy_from_slice(&hc.to_le_bytes());
    v2[80..88].fill(0);
    std::fs::write(&old, &v2).unwrap();
    let f2 = LogitsFile::open(&old).unwrap();
    assert!(f2.rows_fingerprint.is_some() && f2.source.is_none());
    f2.check_matches(&retok_ds, SplitKind::Unlabeled).unwrap();
    assert!(LogitsFile::open(&file).unwrap().source.is_some(), "this version records the weights");
    let damaged = dir.path().join("damaged.logits");
    let mut b = bytes.clone();
    let last = b.len() - 3;
    b[last] ^= 0x40;
    std::fs::write(&damaged, &b).unwrap();
    let e = LogitsFile::open(&damaged).err().unwrap().to_string();
    assert!(e.contains("damaged.logits") && e.contains("do not match their checksum"), "{e}");
    // The fingerprint is inside the header's checksum.
    let mut b = bytes.clone();
    b[66] ^= 0x01;
    std::fs::write(&damaged, &b).unwrap();
    let e = LogitsFile::open(&damaged).err().unwrap().to_string();
    assert!(e.contains("header does not match its checksum"), "{e}");
    // The reserved bytes after the header's checksum, which it does not cover, must be 0.
    let mut b = bytes.clone();
    b[96] ^= 0x04;
    std::fs::write(&damaged, &b).unwrap();
    let e = LogitsFile::open(&damaged).err().unwrap().to_string();
    assert!(e.contains("damaged.logits") && e.contains("byte 96 of the logits header is 0x04"), "{e}");
    std::fs::write(&damaged, &bytes[..bytes.len() - 4]).unwrap();
    assert!(LogitsFile::open(&damaged).err().unwrap().to_string().contains("truncated"));
    std::fs::write(&damaged, &bytes[..20]).unwrap();
    let e = LogitsFile::open(&damaged).err().unwrap().to_string();
    assert!(e.contains("truncated: 20 bytes, shorter than the"), "{e}");
    // A file whose checksums hold but whose last logit is NaN (what a diverged teacher
    // would have written) is refused, naming the row.
    let mut b = bytes.clone();
    let n = b.len();
    b[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
    let contents = xxhash_rust::xxh3::xxh3_64(&b[128..]);
    b[56..64].copy_from_slice(&contents.to_le_bytes());
    let header = xxhash_rust::xxh3::xxh3_64(&b[..80]);
    b[80..88].copy_from_slice(&header.to_le_bytes());
    std::fs::write(&damaged, &b).unwrap();
    let rows = ds.manifest().splits["unlabeled"].docs;
    let e = LogitsFile::open(&damaged).err().unwrap().to_string();
    assert!(e.contains(&format!("row {} holds a non-finite logit", rows - 1)), "{e}");
    // Noisy Student on those targets: it learns the task, and resumes exactly.
    let logits_set = format!("noisy_student.logits={:?}", file.display().to_string());
    let ns = [
        "method=\"noisy_student\"",
        "model.embed_dropout=0.2",
        "train.steps=24",
        "train.log_every=3",
        "train.eval_every=4",
        &logits_set,
    ];
    // A path that names no file is refused by its field, with the path it resolved to.
    let missing = dir.path().join("no.logits");
    let wrong = format!("noisy_student.logits={:?}", missing.display().to_string());
    let e =
        run(&cfg(&data, &dir.path().join("nsx"), &[&ns[..5], &[wrong.as_str()]].concat()), Resume::No, None)
            .unwrap_err()
            .to_string();
    assert!(e.contains(&format!("field `noisy_student.logits`: {}: No such file", missing.display())), "{e}");
    let straight = run(&cfg(&data, &dir.path().join("ns"), &ns), Resume::No, None).unwrap();
    assert!(straight.test.unwrap().accuracy > 0.6);
    let c = cfg(&data, &dir.path().join("ns2"), &ns);
    run(&c, Resume::No, Some(11)).unwrap();
    let resumed = run(&c, Resume::Auto, None).unwrap();
    assert!(
        read(&straight.final_checkpoint, "model.safetensors")
            == read(&resumed.final_checkpoint, "model.safetensors")
    );
    assert_eq!(loss_curve(&dir.path().join("ns")), loss_curve(&dir.path().join("ns2")));
    // Another logits file at the same path: resuming is refused.
    let (_, m2, p2) = dtrain::checkpoint::load_model(&straight.final_checkpoint).unwrap();
    export_unlabeled(&m2, &p2, &ds, &file, None, 64).unwrap();
    let e = run(&c, Resume::From(resumed.final_checkpoint.clone()), None).unwrap_err().to_string();
    assert!(e.contains("another exported logits file"), "{e}");
    // Without the file, the config names the field.
    let o: Vec<Override> = ["data.dir=\"x\"", "train.out_dir=\"y\"", "method=\"noisy_student\""]
        .iter()
        .map(|s| Override::parse(s).unwrap())
        .collect();
    let e = config::load::<TrainConfig>(None, &o).unwrap_err().to_string();
    assert!(e.contains("noisy_student.logits"), "{e}");
}

#[test]
fn pseudo_label_spread_is_logged_and_a_collapse_is_flagged() {
    use dtrain::data::shard::SplitKind;
    let dir = tempfile::tempdir().unwrap();
    let data = semi_supervised(dir.path());
    // Temporal Ensembling: an unlabeled row has a target only once it was seen, so the first
    // step has none, and neither diagnostic may count it.
    let te = dir.path().join("te");
    let sets = ["method=\"temporal\"", "unlabeled.ratio=2", "train.steps=30", "train.log_every=1"];
    run(&cfg(&data, &te, &sets), Resume::No, None).unwrap();
    let recs = train_records(&te);
    for key in ["pseudo_label_top_share", "pseudo_label_top_class", "pseudo_label_accuracy"] {
        assert!(recs[0].get(key).is_none(), "step 1 has no targets yet, but logs {key}: {}", recs[0]);
    }
    let later: Vec<_> = recs.iter().filter(|r| r.get("pseudo_label_top_share").is_some()).collect();
    assert!(later.len() > 10, "the spread is logged once rows have targets");
    for r in &later {
        let share = r["pseudo_label_top_share"].as_f64().unwrap();
        assert!((1.0 / 3.0..=1.0).contains(&share), "{r}");
        assert!(["c0", "c1", "c2"].contains(&r["pseudo_label_top_class"].as_str().unwrap()), "{r}");
    }
    // The targets are the bank's: on this separable task they end mostly right and spread
    // over the classes, which they are only if the diagnostics read the bank's rows.
    let tail = &later[later.len() - 5..];
    let mean = |key: &str| tail.iter().map(|r| r[key].as_f64().unwrap()).sum::<f64>() / tail.len() as f64;
    let (right, top) = (mean("pseudo_label_accuracy"), mean("pseudo_label_top_share"));
    assert!(right > 0.8 && top < 0.8, "last windows: {right} of the targets right, top class share {top}");
    // Noisy Student on targets that all say c2: every window's pseudo-labels are c2, and the
    // command line warns once, from the second labeled epoch on.
    let teacher = run(&cfg(&data, &dir.path().join("t"), &["train.steps=6"]), Resume::No, None).unwrap();
    let (_, model, mut params) = dtrain::checkpoint::load_model(&teacher.final_checkpoint).unwrap();
    let bias = model.layout().get("output.bias").expect("the head's bias").slot.range();
    params[bias.start + 2] += 100.0;
    let file = dir.path().join("c2.logits");
    let ds = dtrain::data::dataset::Dataset::open(&data).unwrap();
    let be = dtrain::backend::cpu::Cpu::<f32>::new();
    // A model with a NaN weight (a diverged teacher) writes no file at all.
    let mut broken = params.clone();
    broken[bias.start] = f32::NAN;
    let nan_file = dir.path().join("nan.logits");
    let labels = dir.path().join("labels.jsonl");
    // An earlier export's pseudo-labels (which a new one may replace, unlike other JSON lines).
    std::fs::write(&labels, "{\"confidence\": 0.5, \"keep\": \"me\"}\n").unwrap();
    let e =
        dtrain::logits::export(&be, &model, &broken, &ds, SplitKind::Unlabeled, &nan_file, Some(&labels), 64)
            .unwrap_err()
            .to_string();
    assert!(e.contains("logit for document 0 of shard 0 is NaN") && e.contains("no logits file"), "{e}");
    assert!(!nan_file.exists() && !dir.path().join("nan.logits.tmp").exists());
    // The pseudo-labels file already there is untouched, and no temporary one is left.
    assert_eq!(std::fs::read_to_string(&labels).unwrap(), "{\"confidence\": 0.5, \"keep\": \"me\"}\n");
    assert!(!dir.path().join("labels.jsonl.tmp").exists());
    dtrain::logits::export(&be, &model, &params, &ds, SplitKind::Unlabeled, &file, None, 64).unwrap();
    // `dtrain inspect` describes the file, and shows every argmax on class 2.
    let o =
        std::process::Command::new(env!("CARGO_BIN_EXE_dtrain")).arg("inspect").arg(&file).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows = ds.manifest().splits["unlabeled"].docs;
    assert!(out.contains(&format!("logits file of split `unlabeled`: {rows} rows × 3 classes")), "{out}");
    assert!(out.contains(&format!("class 2    {rows:>9} (100.0%)  1.000")), "{out}");
    // With its data set, the classes are named and every argmax is measured against the
    // hidden labels: all say c2, so they are right exactly where the hidden label is c2.
    let inspect_with = |data: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_dtrain"))
            .arg("inspect")
            .arg(&file)
            .arg("--data")
            .arg(data)
            .output()
            .unwrap()
    };
    let o = inspect_with(&data);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let hidden: Vec<u32> = ds
        .shards(SplitKind::Unlabeled)
        .iter()
        .flat_map(|sh| (0..sh.len()).filter_map(move |i| sh.hidden_label(i)))
        .collect();
    assert_eq!(hidden.len() as u64, rows, "the fixture records every hidden label");
    let share = 100.0 * hidden.iter().filter(|&&h| h == 2).count() as f64 / rows as f64;
    assert!(share > 10.0 && share < 60.0, "the hidden labels are mixed: {share}");
    assert!(out.contains(&format!("class 2    c2 {rows:>9} (100.0%)  1.000  {share:5.1}%")), "{out}");
    assert!(out.contains("class 0    c0         0 (  0.0%)  0.000      -"), "{out}");
    assert!(out.contains(&format!("against the hidden labels of {rows} rows: {share:.1}% right")), "{out}");
    assert!(
        out.contains(&format!("confidence ≥ 0.95: {rows:>9} rows (100.0%), {share:5.1}% right")),
        "{out}"
    );
    // The teacher's own logits, sharpened (its head scaled) to mixed confidences: every
    // threshold's figures are those recomputed here from the file and the hidden labels.
    params[bias.start + 2] -= 100.0;
    let weight = model.layout().get("output.weight").expect("the head's weight").slot.range();
    for v in &mut params[weight.start..bias.end] {
        *v *= 8.0;
    }
    let mixed = dir.path().join("mixed.logits");
    dtrain::logits::export(&be, &model, &params, &ds, SplitKind::Unlabeled, &mixed, None, 64).unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_dtrain"))
        .arg("inspect")
        .arg(&mixed)
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let z = dtrain::logits::LogitsFile::open(&mixed).unwrap().all().to_vec();
    let top: Vec<(usize, f64)> = z
        .chunks(3)
        .map(|r| {
            let m = r.iter().cloned().fold(f32::MIN, f32::max);
            let best = r.iter().position(|&v| v == m).unwrap();
            (best, 1.0 / r.iter().map(|&v| f64::from(v - m).exp()).sum::<f64>())
        })
        .collect();
    let mut kept_counts = Vec::new();
    for min in [0.5, 0.8, 0.9, 0.95] {
        let kept: Vec<bool> = top
            .iter()
            .zip(&hidden)
            .filter(|((_, p), _)| *p >= min)
            .map(|((c, _), &h)| *c == h as usize)
            .collect();
        let right = match kept.len() {
            0 => "    -".to_string(),
            k => format!("{:5.1}%", 100.0 * kept.iter().filter(|&&r| r).count() as f64 / k as f64),
        };
        let want = format!(
            "confidence ≥ {min:.2}: {:>9} rows ({:5.1}%), {right} right",
            kept.len(),
            100.0 * kept.len() as f64 / rows as f64
        );
        assert!(out.contains(&want), "{want} in {out}");
        kept_counts.push(kept.len());
    }
    assert!(kept_counts[0] > kept_counts[3], "the thresholds keep different rows: {kept_counts:?}");
    // Another data set is refused by the run's own check, and --data beside anything but a
    // logits file is refused.
    std::fs::create_dir_all(dir.path().join("other")).unwrap();
    let other = separable_with(&dir.path().join("other"), &["split.labels_per_class=5"]);
    let o = inspect_with(&other);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("was exported from another data set"), "{err}");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_dtrain"))
        .arg("inspect")
        .arg(&data)
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("is not a logits file"), "{err}");
    // An empty file named `.logits` is reported as a truncated logits file.
    let empty = dir.path().join("empty.logits");
    std::fs::write(&empty, b"").unwrap();
    let o =
        std::process::Command::new(env!("CARGO_BIN_EXE_dtrain")).arg("inspect").arg(&empty).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("empty.logits") && err.contains("logits header"), "{err}");
    // A checkpoint, or its weights, is named for what it is, not taken for a data set.
    for (path, what) in [
        (teacher.final_checkpoint.clone(), "a training checkpoint"),
        (teacher.final_checkpoint.join("model.safetensors"), "a safetensors file"),
    ] {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_dtrain"))
            .arg("inspect")
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(what) && err.contains("dtrain eval --checkpoint"),
            "{err}"
        );
    }
    let ns = dir.path().join("ns");
    let logits_set = format!("noisy_student.logits={:?}", file.display().to_string());
    let sets = ["method=\"noisy_student\"", "train.steps=12", "train.log_every=2", &logits_set];
    let c = cfg(&data, &ns, &sets);
    let toml = dir.path().join("ns.toml");
    std::fs::write(&toml, toml::to_string(&c).unwrap()).unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_dtrain"))
        .args(["train", "--quiet", "--config", toml.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert_eq!(err.matches("warning: step").count(), 1, "one warning: {err}");
    assert!(err.contains("100% of the unlabeled rows' pseudo-labels are 'c2'"), "{err}");
    let recs = train_records(&ns);
    assert_eq!(recs.len(), 6);
    for r in &recs {
        assert_eq!(
            (r["pseudo_label_top_share"].as_f64(), r["pseudo_label_top_class"].as_str()),
            (Some(1.0), Some("c2"))
        );
    }
}

/// The metrics records of a run that are not evaluations.
fn train_records(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("split").is_none())
        .collect()
}

#[test]
fn mpl_trains_a_teacher_of_its_own_size_logs_h_and_resumes_exactly() {
    let mpl = [
        "method=\"mpl\"",
        "model.embed_dropout=0.2",
        "mpl.teacher={dim=8, hidden=[4], embed_dropout=0.3}",
        "mpl.baseline=true",
        "mpl.finetune_steps=3",
        "unlabeled.ratio=2",
        "train.checkpoint_every=11",
    ];
    assert_resume_is_exact_on(semi_supervised, &mpl);
    let dir = tempfile::tempdir().unwrap();
    let data = semi_supervised(dir.path());
    let out = dir.path().join("mpl");
    let schedule = ["mpl.uda_steps=30", "consistency.ramp_epochs=0", "mpl.teacher_optim={lr=0.02}"];
    let extra = [&mpl[..], &["train.steps=60", "train.log_every=3"], &schedule[..]].concat();
    let r = run(&cfg(&data, &out, &extra), Resume::No, None).unwrap();
    // The teacher is evaluated and reported beside the student, and is a model of its own
    // size that `--teacher` reads.
    let t = r.shadows.iter().find(|s| s.name == "teacher").expect("the teacher's report");
    assert!(t.test.as_ref().unwrap().accuracy > 0.5, "the teacher learns: {:?}", t.test);
    let student = r.test.unwrap().accuracy;
    assert!(student > 0.5, "the student learns: {student}");
    let (meta, _, _) =
        dtrain::checkpoint::load_weights(&r.final_checkpoint, dtrain::checkpoint::Weights::Teacher).unwrap();
    let dtrain::model::ModelSpec::Bag(spec) = &meta.model else { panic!("a bag teacher") };
    assert_eq!((spec.dim, spec.hidden.clone()), (8, vec![4]));
    let recs = train_records(&out);
    let mid = &recs[2];
    for key in [
        "mpl_h",
        "mpl_h_used",
        "mpl_baseline",
        "mpl_ce_old",
        "mpl_ce_new",
        "loss_pseudo",
        "loss_teacher",
        "teacher_train_accuracy",
        "mask_ratio",
        "pseudo_label_accuracy",
    ] {
        assert!(mid.get(key).is_some_and(|v| v.as_f64().unwrap().is_finite()), "record lacks {key}: {mid}");
    }
    let h = mid["mpl_h"].as_f64().unwrap();
    let (old, new) = (mid["mpl_ce_old"].as_f64().unwrap(), mid["mpl_ce_new"].as_f64().unwrap());
    assert!((h - (old - new)).abs() < 1e-9, "h = CE_old − CE_new (means over the window)");
    // The logged weight is the teacher's UDA weight with its ramp min(1, t / uda_steps), t
    // the last step of the window (0-based); the teacher's learning rate is logged beside.
    let late =
        recs.iter().find(|v| v["step"].as_u64() > Some(32)).unwrap()["consistency_weight"].as_f64().unwrap();
    assert!(late > 0.0);
    for v in recs.iter().filter(|v| v["step"].as_u64() <= Some(30)) {
        let t = v["step"].as_f64().unwrap() - 1.0;
        let w = v["consistency_weight"].as_f64().unwrap();
        assert!((w - late * t / 30.0).abs() < 1e-12, "step {t}: weight {w}, not {late}·{t}/30");
        let (lr, tlr) = (v["lr"].as_f64().unwrap(), v["teacher_lr"].as_f64().unwrap());
        assert!((tlr - lr * 0.4).abs() < 1e-12, "teacher lr {tlr}, student lr {lr}");
    }
    // The last window is the finetuning phase: no MPL step in it.
    assert_eq!(recs.last().unwrap()["mpl_steps"].as_u64(), Some(0));
    assert_eq!(mid["mpl_steps"].as_u64(), Some(3));
    // The ramp-down pulls the teacher's β₁ towards 0.5 as it does the student's (METHODS.md
    // §3), each from its own configured value.
    let out = dir.path().join("mpl-down");
    let down = ["consistency.rampdown_epochs=1", "mpl.teacher_optim={lr=0.02, beta1=0.8}"];
    let extra = [&mpl[..], &["train.steps=30", "train.log_every=3"], &down[..]].concat();
    run(&cfg(&data, &out, &extra), Resume::No, None).unwrap();
    let recs = train_records(&out);
    let pulled =
        |v: &serde_json::Value, key: &str, base: f64| (v[key].as_f64().unwrap() - 0.5) / (base - 0.5);
    for v in &recs {
        let (s, t) = (pulled(v, "beta1", 0.9), pulled(v, "teacher_beta1", 0.8));
        assert!(
            (s - t).abs() < 1e-9,
            "step {}: the student's β₁ at {s} of its way, the teacher's at {t}",
            v["step"]
        );
    }
    let last = recs.last().unwrap()["teacher_beta1"].as_f64().unwrap();
    assert!(last < 0.75, "the teacher's β₁ ramped down: {last}");
}

#[test]
fn reduced_mpl_adjusts_exported_logits_and_resumes_exactly() {
    use dtrain::data::shard::SplitKind;
    let dir = tempfile::tempdir().unwrap();
    let data = semi_supervised(dir.path());
    let teacher =
        run(&cfg(&data, &dir.path().join("teacher"), &["train.steps=6"]), Resume::No, None).unwrap();
    let (_, model, params) = dtrain::checkpoint::load_model(&teacher.final_checkpoint).unwrap();
    let ds = dtrain::data::dataset::Dataset::open(&data).unwrap();
    let (u, l) = (dir.path().join("u.logits"), dir.path().join("l.logits"));
    dtrain::logits::export(
        &dtrain::backend::cpu::Cpu::<f32>::new(),
        &model,
        &params,
        &ds,
        SplitKind::Unlabeled,
        &u,
        None,
        64,
    )
    .unwrap();
    dtrain::logits::export(
        &dtrain::backend::cpu::Cpu::<f32>::new(),
        &model,
        &params,
        &ds,
        SplitKind::Train,
        &l,
        None,
        64,
    )
    .unwrap();
    let sets = [
        "method=\"mpl_reduced\"".to_string(),
        "model.embed_dropout=0.2".into(),
        "unlabeled.ratio=2".into(),
        "mpl.reduced_hidden=[8]".into(),
        format!("mpl.logits={:?}", u.display().to_string()),
        format!("mpl.train_logits={:?}", l.display().to_string()),
    ];
    let sets: Vec<&str> = sets.iter().map(|s| s.as_str()).collect();
    // The train split's logits from other weights (another teacher) are refused by field.
    let mut other = params.clone();
    other[0] += 1.0;
    let l2 = dir.path().join("l2.logits");
    dtrain::logits::export(
        &dtrain::backend::cpu::Cpu::<f32>::new(),
        &model,
        &other,
        &ds,
        SplitKind::Train,
        &l2,
        None,
        64,
    )
    .unwrap();
    let l2_set = format!("mpl.train_logits={:?}", l2.display().to_string());
    let mixed = [&sets[..5], &[l2_set.as_str(), "train.steps=2"]].concat();
    let e = run(&cfg(&data, &dir.path().join("mixed"), &mixed), Resume::No, None).unwrap_err().to_string();
    assert!(e.contains("mpl.train_logits") && e.contains("exported by other weights"), "{e}");
    // The teacher MLP's own multipliers must name its tensors.
    let typo =
        [&sets[..], &["train.steps=2", "mpl.teacher_optim={lr=0.01, lr_mult={embedding=2.0}}"]].concat();
    let e = run(&cfg(&data, &dir.path().join("typo"), &typo), Resume::No, None).unwrap_err().to_string();
    assert!(e.contains("mpl.teacher_optim.lr_mult.embedding") && e.contains("matches no tensor"), "{e}");
    let straight = dir.path().join("r1");
    let extra = [&sets[..], &["train.steps=24", "train.log_every=3"]].concat();
    let a = run(&cfg(&data, &straight, &extra), Resume::No, None).unwrap();
    assert!(a.test.unwrap().accuracy > 0.5, "the student learns from the adjusted logits");
    assert!(a.final_checkpoint.join("teacher_mlp.safetensors").is_file());
    let e = dtrain::checkpoint::load_weights(&a.final_checkpoint, dtrain::checkpoint::Weights::Teacher)
        .unwrap_err()
        .to_string();
    assert!(e.contains("reduced MPL"), "{e}");
    let c = cfg(&data, &dir.path().join("r2"), &extra);
    run(&c, Resume::No, Some(11)).unwrap();
    let b = run(&c, Resume::Auto, None).unwrap();
    for f in
        ["model.safetensors", "teacher_mlp.safetensors", "teacher_mlp.optimizer.safetensors", "state.bin"]
    {
        assert!(read(&a.final_checkpoint, f) == read(&b.final_checkpoint, f), "{f} differs after resume");
    }
    assert_eq!(loss_curve(&straight), loss_curve(&dir.path().join("r2")));
    let recs = train_records(&straight);
    assert!(recs[0].get("loss_teacher").is_some(), "train_logits give the teacher CE_T");
}

/// Cosine with restarts (snapshot ensembles): a checkpoint at the end of each cycle, the
/// learning rate back at the peak right after it, and `predict` taking the snapshots together
/// (that it averages checkpoints is `predict_averages_checkpoints_and_mc_dropout_passes`'s
/// test). Pruning keeps the snapshots; a config that would restart a non-cosine decay is refused.
#[test]
fn cosine_restarts_write_a_snapshot_per_cycle() {
    let dir = tempfile::tempdir().unwrap();
    let data = separable(dir.path());
    let out = dir.path().join("snap");
    // Periodic checkpoints every 4 steps, 2 kept: pruning them leaves the snapshots alone.
    let sets = [
        "train.steps=30",
        "train.log_every=1",
        "train.checkpoint_every=4",
        "train.keep_checkpoints=2",
        "schedule.decay=\"cosine\"",
        "schedule.cycles=3",
    ];
    run(&cfg(&data, &out, &sets), Resume::No, None).unwrap();
    let names: Vec<String> = dtrain::checkpoint::list(&out.join("checkpoints"))
        .unwrap()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["step-000000010", "step-000000020", "step-000000028", "step-000000030"]);
    let snaps: Vec<&String> = names
        .iter()
        .filter(|n| out.join("checkpoints").join(n).join(dtrain::checkpoint::SNAPSHOT).is_file())
        .collect();
    assert_eq!(snaps, ["step-000000010", "step-000000020", "step-000000030"]);
    let names: Vec<String> = snaps.into_iter().cloned().collect();
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let lr: std::collections::BTreeMap<u64, f64> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| Some((v["step"].as_u64()?, v["lr"].as_f64()?)))
        .collect();
    // The window of step n logs the rate of step n's update (0-based step n − 1).
    for peak in [1, 11, 21] {
        assert!((lr[&peak] - 0.05).abs() < 1e-9, "step {peak}: {}", lr[&peak]);
        assert!(lr[&(peak + 9)] < 0.005, "step {}: {}", peak + 9, lr[&(peak + 9)]);
    }
    let text = common::write(dir.path(), "in.txt", b"alpha apple\nbeta banana\n");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_dtrain"));
    cmd.arg("--quiet").arg("predict");
    for n in &names {
        cmd.arg("--checkpoint").arg(out.join("checkpoints").join(n));
    }
    let pred = dir.path().join("p.jsonl");
    let o = cmd.arg("--input").arg(&text).arg("--output").arg(&pred).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read_to_string(&pred).unwrap().lines().count(), 2);
    for (set, field) in
        [("schedule.cycles=0", "schedule.cycles"), ("schedule.decay=\"linear\"", "schedule.cycles")]
    {
        let e = dtrain::config::load::<TrainConfig>(
            None,
            &[&sets[..], &["data.dir=\"x\"", "train.out_dir=\"y\"", set]]
                .concat()
                .iter()
                .map(|s| Override::parse(s).unwrap())
                .collect::<Vec<_>>(),
        )
        .map(|_| ())
        .unwrap_err()
        .to_string();
        assert!(e.contains(field), "{set}: {e}");
    }
}

/// Test-time augmentation: `predict --augment-views K` averages the text with K strong
/// views of it, which changes the probabilities, does not depend on the batch size, and
/// repeats exactly with the same seed.
#[test]
fn predict_averages_augmented_views() {
    let dir = tempfile::tempdir().unwrap();
    let data = separable(dir.path());
    let out = dir.path().join("run");
    run(&cfg(&data, &out, &["train.epochs=3"]), Resume::No, None).unwrap();
    let ckpt = common::last_checkpoint(&out);
    let lines: String = (0..40).map(|i| format!("alpha apple banana cherry word{i} beta\n")).collect();
    let text = common::write(dir.path(), "in.txt", lines.as_bytes());
    let predict = |name: &str, extra: &[&str]| -> Vec<serde_json::Value> {
        let path = dir.path().join(name);
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_dtrain"))
            .args(["--quiet", "predict", "--top-k", "2", "--checkpoint"])
            .arg(&ckpt)
            .arg("--input")
            .arg(&text)
            .arg("--output")
            .arg(&path)
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read_to_string(&path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let plain = predict("a.jsonl", &[]);
    let tta = predict("b.jsonl", &["--augment-views", "4"]);
    let small_batches = predict("c.jsonl", &["--augment-views", "4", "--batch-size", "7"]);
    assert_eq!(plain.len(), 40);
    assert_eq!(tta, small_batches, "the views do not depend on the batch size");
    assert_eq!(tta, predict("d.jsonl", &["--augment-views", "4"]), "the same seed, the same views");
    let conf = |rows: &[serde_json::Value]| -> Vec<f64> {
        rows.iter().map(|r| r["confidence"].as_f64().unwrap()).collect()
    };
    assert_ne!(conf(&plain), conf(&tta), "averaging over augmented views changes the probabilities");
    assert_ne!(conf(&tta), conf(&predict("e.jsonl", &["--augment-views", "4", "--seed", "2"])));
    // Both counts of passes are bounded, by flag.
    for flag in ["--mc-dropout", "--augment-views"] {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_dtrain"))
            .args(["--quiet", "predict", flag, "257", "--checkpoint"])
            .arg(&ckpt)
            .arg("--input")
            .arg(&text)
            .arg("--output")
            .arg(dir.path().join("f.jsonl"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(flag) && err.contains("at most 256"), "{err}");
    }
}

/// A bag run's checkpoint is a view for `embed --data` and `propagate`: a row's vector is
/// the unit direction of its pooled embedding (the mean of the table's rows over its
/// feature ids), stored or embedded afresh the same logits file; a data set hashed
/// otherwise is refused by name and nothing is written.
#[test]
fn propagate_reads_a_bag_checkpoint_as_a_view() {
    use dtrain::data::shard::SplitKind;
    let dir = tempfile::tempdir().unwrap();
    let data = semi_supervised(dir.path());
    let out = run(&cfg(&data, &dir.path().join("bag"), &["train.steps=30"]), Resume::No, None).unwrap();
    let ckpt = out.final_checkpoint;
    let path = |p: &Path| p.display().to_string();
    let stored = dir.path().join("v.safetensors");
    let (ok, said, err) =
        common::dtrain(["embed", "--model", &path(&ckpt), "--data", &path(&data), "--out", &path(&stored)]);
    assert!(ok, "{err}");
    assert!(said.contains("width 16 (bag model, pooled embedding)"), "{said}");
    // Each row's vector, computed here from the checkpoint's table and the row's ids.
    let (_, model, params) = dtrain::checkpoint::load_model(&ckpt).unwrap();
    let dtrain::model::Model::Bag(bag) = model else { panic!("a bag checkpoint") };
    let table = &params[bag.table.range()];
    let r = dtrain::rowvec::RowVectors::read(&stored).unwrap();
    let ds = dtrain::data::dataset::Dataset::open(&data).unwrap();
    let (mut at, mut worst) = (0, 0f64);
    for split in SplitKind::ALL {
        for shard in ds.shards(split) {
            for i in 0..shard.len() {
                let doc = shard.doc(i);
                assert_eq!(r.sample_id[at], doc.sample_id, "row {at}");
                let mut sum = [0f64; 16];
                for &id in doc.ids {
                    for (s, &x) in sum.iter_mut().zip(&table[id as usize * 16..id as usize * 16 + 16]) {
                        *s += f64::from(x);
                    }
                }
                let norm = sum.iter().map(|x| x * x).sum::<f64>().sqrt();
                assert!(norm > 0.0, "row {at} has ids");
                for (s, &got) in sum.iter().zip(&r.vectors[at * 16..at * 16 + 16]) {
                    worst = worst.max((s / norm - f64::from(got)).abs());
                }
                at += 1;
            }
        }
    }
    assert_eq!(at, r.len());
    assert!(worst < 1e-6, "stored vectors off the pooled embeddings by {worst}");
    assert_eq!(r.meta.blank, 0);
    // Stored or read from the checkpoint, the same logits file.
    let cli = |model: &Path, data: &Path, out: &Path| {
        common::dtrain([
            "propagate",
            "--k",
            "5",
            "--alpha",
            "0.9",
            "--model",
            &path(model),
            "--data",
            &path(data),
            "--out",
            &path(out),
        ])
    };
    let (a, b) = (dir.path().join("a.logits"), dir.path().join("b.logits"));
    let (ok, said, err) = cli(&ckpt, &data, &a);
    assert!(ok, "{err}");
    assert!(said.contains("test accuracy of the chosen setting"), "{said}");
    let (ok, _, err) = cli(&stored, &data, &b);
    assert!(ok, "{err}");
    assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(), "the two files differ");
    // Rows hashed into other buckets are refused by both commands; nothing is written.
    std::fs::create_dir_all(dir.path().join("other")).unwrap();
    let other =
        separable_with(&dir.path().join("other"), &["split.labels_per_class=6", "tokenizer.buckets=2048"]);
    let refused = dir.path().join("c.logits");
    let (ok, _, err) = cli(&ckpt, &other, &refused);
    assert!(!ok && err.contains("does not match the checkpoint's model") && err.contains("buckets"), "{err}");
    let vectors = dir.path().join("c.safetensors");
    let (ok, _, err) =
        common::dtrain(["embed", "--model", &path(&ckpt), "--data", &path(&other), "--out", &path(&vectors)]);
    assert!(!ok && err.contains("buckets"), "{err}");
    assert!(!refused.exists() && !vectors.exists());
}

/// A run directory is locked while a run uses it: a second run there (a job submitted
/// twice) is refused, naming the directory and the lock, instead of truncating the first
/// run's memory-mapped bank and replacing its metrics; once the holder is gone it runs.
#[test]
fn a_run_directory_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = semi_supervised(dir.path());
    let out = dir.path().join("run");
    let held = dtrain::fsutil::lock_run_dir(&out, "train.out_dir").unwrap();
    let c = cfg(&data, &out, &["method=\"temporal\"", "train.steps=2", "unlabeled.ratio=1"]);
    let e = run(&c, Resume::Auto, None).unwrap_err().to_string();
    assert!(e.contains("is in use by another dtrain run") && e.contains(dtrain::fsutil::RUN_LOCK), "{e}");
    assert!(!out.join("metrics.jsonl").exists(), "the refused run wrote nothing");
    drop(held);
    run(&c, Resume::Auto, None).unwrap();
    // The lock is the run's own: the same process runs again after it.
    run(&c, Resume::Auto, None).unwrap();
}

/// `dtrain inspect` on Temporal Ensembling bank files: a checkpoint's sealed copy and the
/// live bank describe their rows and values; a live bank whose values no average of
/// probabilities can take (a NaN written in by hand) is named damaged, with its row.
#[test]
fn inspect_reads_a_banks_values() {
    let dir = tempfile::tempdir().unwrap();
    let data = semi_supervised(dir.path());
    let out = dir.path().join("run");
    let c = cfg(
        &data,
        &out,
        &["method=\"temporal\"", "train.steps=4", "unlabeled.ratio=1", "train.checkpoint_every=4"],
    );
    let r = run(&c, Resume::No, None).unwrap();
    let inspect = |p: &Path| {
        let o =
            std::process::Command::new(env!("CARGO_BIN_EXE_dtrain")).arg("inspect").arg(p).output().unwrap();
        (
            o.status.success(),
            format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)),
        )
    };
    let sealed = std::fs::read_dir(r.final_checkpoint.join("bank")).unwrap().next().unwrap().unwrap().path();
    let (ok, text) = inspect(&sealed);
    assert!(
        ok && text.contains("sealed (checkpoint snapshot)") && text.contains("values: all finite, in [0, 1]"),
        "{text}"
    );
    let live = out.join("bank").join(sealed.file_name().unwrap());
    let (ok, text) = inspect(&live);
    assert!(
        ok && text.contains("live (unsealed: no checksum)") && text.contains("values: all finite"),
        "{text}"
    );
    // The last 4 bytes are the last row's last value (f32 storage).
    let mut bytes = std::fs::read(&live).unwrap();
    let n = bytes.len();
    bytes[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&live, &bytes).unwrap();
    let (ok, text) = inspect(&live);
    assert!(
        !ok && text.contains("1 stored value is not finite or outside [0, 1], the first in row"),
        "{text}"
    );
    assert!(
        text.contains("the bank is damaged (a resumed run restores a live bank from its checkpoint)"),
        "{text}"
    );
}
