//! Training with `model.kind = "encoder"`: a small encoder from scratch learns a separable
//! problem, the semi-supervised methods run on it and resume bit for bit, pretrained MiniLM
//! fine-tunes and its checkpoint evaluates and predicts raw text, and configs the encoder
//! cannot run are refused by field.
//!
//! Needs models/minilm (`launch/fetch-model minilm`, which launch/setup runs) for its
//! tokenizer.json and weights.

mod common;

use std::path::{Path, PathBuf};

use dtrain::config::{self, Override, TrainConfig};
use dtrain::train::Resume;

/// The separable data on MiniLM's WordPiece ids (at most 16 per document), `extra`
/// prepare settings on top.
fn wordpiece(dir: &Path, extra: &[&str]) -> PathBuf {
    let tok = common::minilm().join("tokenizer.json");
    let path = format!("tokenizer.subword.path={:?}", tok.display().to_string());
    common::separable(
        dir,
        30,
        &[&[path.as_str(), "tokenizer.subword.max_len=16", "output.shards=2"], extra].concat(),
    )
}

/// A small encoder from scratch (2 layers, 32 wide), `extra` on top; with
/// `model.encoder.pretrained` in `extra`, the shape is the pretrained model's.
fn cfg(data: &Path, out: &Path, extra: &[&str]) -> TrainConfig {
    let shape = [
        "model.encoder.hidden=32",
        "model.encoder.layers=2",
        "model.encoder.heads=4",
        "model.encoder.intermediate=64",
    ];
    let pretrained = extra.iter().any(|s| s.starts_with("model.encoder.pretrained="));
    let base = [
        "model.kind=\"encoder\"",
        "model.encoder.dropout=0.1",
        "optim.kind=\"adamw\"",
        "optim.lr=0.003",
        "train.batch_size=8",
    ];
    let shape: &[&str] = if pretrained { &[] } else { &shape };
    common::train_config(data, out, &[&base[..], shape, extra].concat())
}

use common::train_run as run;

#[test]
fn an_encoder_from_scratch_learns_a_separable_problem() {
    let dir = tempfile::tempdir().unwrap();
    let data = wordpiece(dir.path(), &[]);
    let out = dir.path().join("run");
    let r = run(&cfg(&data, &out, &["train.epochs=12", "train.log_every=4"]), Resume::No, None).unwrap();
    let test = r.test.expect("a test split");
    assert!(test.accuracy > 0.9, "test accuracy {} (chance 0.33)", test.accuracy);
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let train_lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("split").is_none())
        .collect();
    let first = train_lines.first().unwrap()["loss"].as_f64().unwrap();
    let last = train_lines.last().unwrap()["loss"].as_f64().unwrap();
    assert!(last < first / 3.0, "the loss falls: {first} → {last}");
    // The checkpoint says what it holds, with the encoder's spec.
    let bytes = std::fs::read(r.final_checkpoint.join("model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&meta.metadata().as_ref().unwrap()["dtrain"]).unwrap();
    assert_eq!(meta["format"], "dtrain-encoder");
    assert_eq!(meta["model"]["layers"], 2);
}

/// `train.matmul = "bf16"` and `"tf32"` (operands rounded, emulated on the CPU) train the
/// encoder as well as f32 does and change its weights (so the setting reaches the
/// products); the default is not written into the config, so the trajectory hash of
/// configs from before the setting existed is unchanged, and a run resumes only at its own
/// precision.
#[test]
fn reduced_precision_matmuls_train_the_encoder() {
    let dir = tempfile::tempdir().unwrap();
    let data = wordpiece(dir.path(), &[]);
    let mut weights = Vec::new();
    for m in ["f32", "tf32", "bf16"] {
        let set = format!("train.matmul=\"{m}\"");
        let c = cfg(&data, &dir.path().join(m), &["train.epochs=12", &set]);
        assert_eq!(serde_json::to_string(&c).unwrap().contains("matmul"), m != "f32", "{m}");
        let r = run(&c, Resume::No, None).unwrap();
        let test = r.test.expect("a test split");
        assert!(test.accuracy > 0.9, "{m}: test accuracy {} (chance 0.33)", test.accuracy);
        weights.push(std::fs::read(r.final_checkpoint.join("model.safetensors")).unwrap());
    }
    assert!(weights[0] != weights[1] && weights[0] != weights[2] && weights[1] != weights[2]);
    // The bf16 run's checkpoint does not resume as f32 (the same config otherwise).
    let c = cfg(&data, &dir.path().join("bf16"), &["train.epochs=12"]);
    let e = run(&c, Resume::Auto, None).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("different training config"), "{e}");
}

/// Straight to 10 steps, and 5 + a resume to 10: identical checkpoints. Returns the
/// straight run's metrics records.
fn assert_resume_is_exact(extra: &[&str]) -> Vec<serde_json::Value> {
    let dir = tempfile::tempdir().unwrap();
    let data = wordpiece(dir.path(), &["split.labels_per_class=6"]);
    let extra = [&["train.steps=10", "train.log_every=2", "train.eval_every=5"], extra].concat();
    let a = run(&cfg(&data, &dir.path().join("a"), &extra), Resume::No, None).unwrap();
    let c = cfg(&data, &dir.path().join("b"), &extra);
    assert_eq!(run(&c, Resume::No, Some(5)).unwrap().steps, 5);
    let b = run(&c, Resume::Auto, None).unwrap();
    // Mean Teacher and MPL keep a teacher's weights; the other methods have none.
    let teacher = extra.iter().any(|s| *s == "method=\"mean_teacher\"" || *s == "method=\"mpl\"");
    assert_eq!(a.final_checkpoint.join("teacher.safetensors").exists(), teacher, "{extra:?}");
    for f in ["model.safetensors", "optimizer.safetensors", "state.bin", "teacher.safetensors"] {
        let (x, y) = (a.final_checkpoint.join(f), b.final_checkpoint.join(f));
        if f.starts_with("teacher") && !teacher {
            continue;
        }
        assert!(
            std::fs::read(&x).unwrap() == std::fs::read(&y).unwrap(),
            "{f} differs after resume ({extra:?})"
        );
    }
    records(&dir.path().join("a"))
}

/// Resuming under a config whose encoder differs from the checkpoint's names the fields that
/// differ, with both values (it used to print both specs as Rust debug dumps).
#[test]
fn resuming_with_another_encoder_names_the_fields() {
    let dir = tempfile::tempdir().unwrap();
    let data = wordpiece(dir.path(), &["split.labels_per_class=6"]);
    let out = dir.path().join("a");
    assert_eq!(run(&cfg(&data, &out, &["train.steps=4"]), Resume::No, Some(2)).unwrap().steps, 2);
    let changed =
        cfg(&data, &out, &["train.steps=4", "model.encoder.pooling=\"cls\"", "model.encoder.dropout=0.2"]);
    let e = run(&changed, Resume::Auto, None).unwrap_err().to_string();
    assert!(
        e.contains("pooling: \"mean\" → \"cls\"") && e.contains("dropout: 0.1") && !e.contains("EncoderSpec"),
        "{e}"
    );
}

/// Asserts that a run's logged `key` (e.g. `loss_consistency`) is finite and positive in
/// some window: the method's unlabeled term was computed, not skipped.
fn assert_logs_a_positive(recs: &[serde_json::Value], key: &str, what: &str) {
    let v: Vec<f64> = recs.iter().filter_map(|r| r[key].as_f64()).collect();
    assert!(!v.is_empty() && v.iter().all(|x| x.is_finite()), "{what}: {key} {v:?}");
    assert!(v.iter().any(|&x| x > 0.0), "{what}: {key} is never positive: {v:?}");
}

#[test]
fn semi_supervised_methods_run_on_the_encoder_and_resume_exactly() {
    // Each method's own term is logged, computed, not skipped.
    // Mean Teacher: a second (teacher) pass and its weights in the checkpoint.
    let recs = assert_resume_is_exact(&["method=\"mean_teacher\"", "unlabeled.ratio=2"]);
    assert_logs_a_positive(&recs, "loss_consistency", "mean_teacher");
    // Meta Pseudo Labels with an encoder teacher and student (two models, two optimizers).
    let recs = assert_resume_is_exact(&["method=\"mpl\"", "unlabeled.ratio=2"]);
    assert_logs_a_positive(&recs, "loss_pseudo", "mpl");
    assert_logs_a_positive(&recs, "loss_teacher", "mpl");
    assert!(recs.iter().any(|r| r["mpl_h"].as_f64().is_some_and(|h| h != 0.0)), "mpl: h is always 0");
    // FGM on the token embeddings.
    let recs = assert_resume_is_exact(&["adversarial.kind=\"fgm\""]);
    assert_logs_a_positive(&recs, "loss_adversarial", "fgm");
    // FixMatch: a weak view and a strong (augmented) view of WordPiece ids, with a threshold
    // that some rows pass and some do not.
    let recs =
        assert_resume_is_exact(&["method=\"fixmatch\"", "unlabeled.ratio=2", "consistency.threshold=0.34"]);
    assert_logs_a_positive(&recs, "loss_consistency", "fixmatch");
    let masks: Vec<f64> = recs.iter().filter_map(|r| r["mask_ratio"].as_f64()).collect();
    assert!(masks.iter().any(|&m| m > 0.0 && m < 1.0), "fixmatch: mask ratios {masks:?}");
}

/// The methods the test above leaves out run on the encoder too, each resuming bit for bit:
/// Π (two dropout passes), Temporal Ensembling (its bank of ensembled predictions, restored
/// on resume), R-Drop, UDA (sharpened, masked targets on a strong view), and Noisy Student
/// on the logits an encoder teacher exported.
#[test]
fn the_other_methods_run_on_the_encoder_and_resume_exactly() {
    let consistency = ["unlabeled.ratio=2", "consistency.kind=\"mse\"", "consistency.weight=1.0"];
    for method in ["pi", "temporal"] {
        let m = format!("method={method:?}");
        let recs = assert_resume_is_exact(&[&[m.as_str()], &consistency[..]].concat());
        assert_logs_a_positive(&recs, "loss_consistency", method);
    }
    let recs = assert_resume_is_exact(&["method=\"rdrop\"", "consistency.weight=1.0"]);
    assert_logs_a_positive(&recs, "loss_consistency", "rdrop");
    let recs = assert_resume_is_exact(&[
        "method=\"uda\"",
        "unlabeled.ratio=2",
        "consistency.kind=\"kl\"",
        "consistency.temperature=0.4",
        "consistency.threshold=0.0",
    ]);
    assert_logs_a_positive(&recs, "loss_consistency", "uda");
    // Noisy Student: an encoder teacher's logits of the unlabeled split, from the CLI.
    let dir = tempfile::tempdir().unwrap();
    let data = wordpiece(dir.path(), &["split.labels_per_class=6"]);
    let teacher = run(&cfg(&data, &dir.path().join("t"), &["train.steps=6"]), Resume::No, None).unwrap();
    let logits = dir.path().join("teacher.logits");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_dtrain"))
        .args(["--quiet", "export-logits", "--checkpoint"])
        .arg(&teacher.final_checkpoint)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&logits)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let set = format!("noisy_student.logits={:?}", logits.display().to_string());
    let recs = assert_resume_is_exact(&[
        "method=\"noisy_student\"",
        "unlabeled.ratio=2",
        "consistency.weight=1.0",
        &set,
    ]);
    assert_logs_a_positive(&recs, "loss_consistency", "noisy_student");
}

#[test]
fn fixmatch_on_the_encoder_logs_its_diagnostics() {
    let dir = tempfile::tempdir().unwrap();
    let data = wordpiece(dir.path(), &["split.labels_per_class=6"]);
    let out = dir.path().join("fm");
    let extra = ["method=\"fixmatch\"", "unlabeled.ratio=2", "train.steps=12", "train.log_every=4"];
    run(&cfg(&data, &out, &extra), Resume::No, None).unwrap();
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let last = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .rfind(|v| v.get("split").is_none())
        .unwrap();
    for key in ["mask_ratio", "loss_consistency", "consistency_weight", "pseudo_label_accuracy"] {
        assert!(last[key].as_f64().is_some_and(f64::is_finite), "{key} missing or not finite: {last}");
    }
}

#[test]
fn adversarial_training_perturbs_the_encoders_token_embeddings() {
    let dir = tempfile::tempdir().unwrap();
    let data = wordpiece(dir.path(), &[]);
    for kind in ["fgm", "vat", "pgd"] {
        let out = dir.path().join(kind);
        let extra = [&format!("adversarial.kind={kind:?}") as &str, "train.steps=6", "train.log_every=3"];
        let r = run(&cfg(&data, &out, &extra), Resume::No, None).unwrap();
        assert!(r.test.is_some());
        let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        let adv: Vec<f64> = log
            .lines()
            .filter_map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["loss_adversarial"].as_f64()
            })
            .collect();
        assert_eq!(adv.len(), 2, "{kind}: a loss_adversarial per logged window");
        assert!(adv.iter().all(|v| v.is_finite() && *v > 0.0), "{kind}: {adv:?}");
    }
}

#[test]
fn meta_pseudo_labels_with_an_encoder_teacher_and_a_bag_student() {
    let dir = tempfile::tempdir().unwrap();
    let data = wordpiece(dir.path(), &["split.labels_per_class=6"]);
    let out = dir.path().join("mpl");
    let extra = [
        "method=\"mpl\"",
        "unlabeled.ratio=2",
        "model.kind=\"bag\"",
        "model.dim=16",
        "mpl.teacher.kind=\"encoder\"",
        "mpl.teacher.encoder.hidden=16",
        "mpl.teacher.encoder.layers=1",
        "mpl.teacher.encoder.heads=2",
        "mpl.teacher.encoder.intermediate=32",
        "train.steps=8",
        "train.log_every=4",
        "optim.kind=\"adamw\"",
        "optim.lr=0.003",
        "train.batch_size=8",
    ];
    // The student is a bag model: none of cfg's encoder settings.
    let r = run(&common::train_config(&data, &out, &extra), Resume::No, None).unwrap();
    let teacher = r.shadows.iter().find(|s| s.name == "teacher").expect("the teacher is evaluated");
    assert!(teacher.test.is_some());
    // The checkpoint holds a bag student and an encoder teacher.
    let meta = |f: &str| {
        let bytes = std::fs::read(r.final_checkpoint.join(f)).unwrap();
        let (_, m) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let v: serde_json::Value = serde_json::from_str(&m.metadata().as_ref().unwrap()["dtrain"]).unwrap();
        v["format"].as_str().unwrap().to_string()
    };
    assert_eq!(
        (meta("model.safetensors"), meta("teacher.safetensors")),
        ("dtrain-bag".into(), "dtrain-encoder".into())
    );
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(log.contains("\"mpl_h\""), "h is logged");
}

/// A run from a pretrained encoder resumes without its pretrained directory (moved, or on
/// another node), under the old path or the new one: the checkpoint gives the shape and
/// the weights. MPL, so that both the student and the teacher start from MiniLM; the
/// resumed run ends bit for bit where an uninterrupted one does.
#[test]
fn a_pretrained_run_resumes_without_its_pretrained_directory() {
    let dir = tempfile::tempdir().unwrap();
    let data = wordpiece(dir.path(), &["split.labels_per_class=6"]);
    let pre = dir.path().join("pre");
    std::fs::create_dir(&pre).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(common::minilm().join(f), pre.join(f)).unwrap();
    }
    let set = format!("model.encoder.pretrained={:?}", pre.display().to_string());
    let extra = [set.as_str(), "method=\"mpl\"", "unlabeled.ratio=1", "optim.lr=1e-4", "train.steps=4"];
    let straight = run(&cfg(&data, &dir.path().join("a"), &extra), Resume::No, None).unwrap();
    let c = cfg(&data, &dir.path().join("b"), &extra);
    assert_eq!(run(&c, Resume::No, Some(2)).unwrap().steps, 2);
    let moved = dir.path().join("moved");
    std::fs::rename(&pre, &moved).unwrap();
    // The config as it was (the directory gone), to step 3; then the config naming the new
    // place (the path is not part of what a resume must match), to the end.
    assert_eq!(run(&c, Resume::Auto, Some(3)).unwrap().resumed_at, 2);
    let set_moved = format!("model.encoder.pretrained={:?}", moved.display().to_string());
    let c_moved = cfg(&data, &dir.path().join("b"), &[&[set_moved.as_str()], &extra[1..]].concat());
    let resumed = run(&c_moved, Resume::Auto, None).unwrap();
    assert_eq!((resumed.steps, resumed.resumed_at), (4, 3));
    for f in ["model.safetensors", "teacher.safetensors"] {
        let read = |r: &dtrain::train::TrainReport| std::fs::read(r.final_checkpoint.join(f)).unwrap();
        assert!(
            read(&straight) == read(&resumed),
            "{f} differs after resuming without the pretrained directory"
        );
    }
    // A fresh run still needs the directory, and names it.
    let e = run(&cfg(&data, &dir.path().join("c"), &extra), Resume::No, None).unwrap_err().to_string();
    assert!(e.contains(&pre.display().to_string()) && e.contains("no such directory"), "{e}");
}

#[test]
fn minilm_fine_tunes_and_its_checkpoint_evaluates_and_predicts_raw_text() {
    let dir = tempfile::tempdir().unwrap();
    let data = wordpiece(dir.path(), &[]);
    let out = dir.path().join("mini");
    let pre = format!("model.encoder.pretrained={:?}", common::minilm().display().to_string());
    let c = cfg(&data, &out, &[&pre, "optim.lr=1e-4", "optim.lr_mult.classifier=10.0", "train.steps=12"]);
    let r = run(&c, Resume::No, None).unwrap();
    let test = r.test.expect("a test split");
    assert!(test.accuracy > 0.6, "MiniLM after 12 steps: test accuracy {} (chance 0.33)", test.accuracy);
    // `dtrain eval` on the checkpoint reproduces the run's own test figure.
    let bin = env!("CARGO_BIN_EXE_dtrain");
    let ck = r.final_checkpoint.to_str().unwrap();
    let o = std::process::Command::new(bin)
        .args(["eval", "--checkpoint", ck, "--data", data.to_str().unwrap(), "--split", "test", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!((report["accuracy"].as_f64().unwrap() - test.accuracy).abs() < 1e-12);
    // The same data prepared with the tokenizer's path spelled another way is the same data
    // set for the checkpoint (the checksums agree); it used to be refused.
    let alt = dir.path().join("alt");
    std::fs::create_dir(&alt).unwrap();
    let spelled = common::minilm().join(".").join("tokenizer.json");
    let spelled = format!("tokenizer.subword.path={:?}", spelled.display().to_string());
    let alt =
        common::separable(&alt, 30, &[spelled.as_str(), "tokenizer.subword.max_len=16", "output.shards=2"]);
    let o = std::process::Command::new(bin)
        .args(["eval", "--checkpoint", ck, "--data", alt.to_str().unwrap(), "--split", "test", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let again: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(again["accuracy"], report["accuracy"]);
    // `dtrain predict` tokenizes raw text with the data set's tokenizer.json.
    let input =
        common::write(dir.path(), "in.txt", b"alpha apple amber\n\nbanana blue beta\ngreen grape gamma\n");
    let pred = dir.path().join("p.jsonl");
    let o = std::process::Command::new(bin)
        .args(["predict", "--checkpoint", ck, "--input", input.to_str().unwrap(), "--output"])
        .arg(&pred)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let labels: Vec<String> = std::fs::read_to_string(&pred)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["label"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(labels, ["c0", "c1", "c2"]);
    // A batch of 70 documents is read in parts of 16384 / 512 = 32 (MiniLM's positions),
    // with the same MC-dropout masks as batches of 7, which are never split.
    let texts: Vec<String> =
        (0..70).map(|i| format!("{} apple banana grape {i}\n", ["alpha", "blue", "gamma"][i % 3])).collect();
    let input = common::write(dir.path(), "in70.txt", texts.concat().as_bytes());
    let predict = |batch: &str, limit: Option<String>| {
        let out = dir.path().join(format!("p{batch}.jsonl"));
        let mut cmd = std::process::Command::new(bin);
        cmd.args(["predict", "--checkpoint", ck, "--input", input.to_str().unwrap(), "--mc-dropout", "2"])
            .args(["--batch-size", batch, "--output"])
            .arg(&out);
        if let Some(limit) = limit {
            cmd.env("DTRAIN_MEMORY_LIMIT", limit);
        }
        let o = cmd.output().unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).to_string(),
            std::fs::read(&out).unwrap_or_default(),
        )
    };
    let (ok, err, whole) = predict("70", None);
    assert!(ok, "{err}");
    let (ok, err, small) = predict("7", None);
    assert!(ok, "{err}");
    assert_eq!(whole, small, "predictions depend on the batch size");
    assert_eq!(whole.iter().filter(|&&b| b == b'\n').count(), 70);
    // The forward pass's activations join the budget (32 documents × 16 tokens of MiniLM,
    // 15.4 MiB): 1 MiB beyond the weights refuses the default batch, listing them, and fits
    // a batch of one document.
    let weights = std::fs::metadata(r.final_checkpoint.join("model.safetensors")).unwrap().len();
    let limit = format!("{}K", weights / 1024 + 1024);
    let (ok, err, _) = predict("4096", Some(limit.clone()));
    assert!(
        !ok && err.contains("the activations of a forward pass over 16 tokens per document 15.4 MiB"),
        "{err}"
    );
    let (ok, err, _) = predict("1", Some(limit));
    assert!(ok, "{err}");
    // --max-len reads documents cut at another length than the run's 16 tokens, within the
    // model's 512 positions: a document of more than 16 tokens gets other probabilities at
    // 64, the same at 16; a length past the positions, or below 3, is refused by name.
    let long = common::write(dir.path(), "long.txt", "alpha apple amber blue banana ".repeat(8).as_bytes());
    let at = |len: &str| {
        let out = dir.path().join(format!("l{len}.jsonl"));
        let o = std::process::Command::new(bin)
            .args(["predict", "--checkpoint", ck, "--input", long.to_str().unwrap(), "--top-k", "3"])
            .args(["--max-len", len, "--output"])
            .arg(&out)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).to_string(),
            std::fs::read(&out).unwrap_or_default(),
        )
    };
    let default = std::process::Command::new(bin)
        .args(["predict", "--checkpoint", ck, "--input", long.to_str().unwrap(), "--top-k", "3", "--output"])
        .arg(dir.path().join("ld.jsonl"))
        .output()
        .unwrap();
    assert!(default.status.success());
    let (ok, err, sixteen) = at("16");
    assert!(ok, "{err}");
    assert_eq!(sixteen, std::fs::read(dir.path().join("ld.jsonl")).unwrap());
    let (ok, err, longer) = at("64");
    assert!(ok, "{err}");
    assert_ne!(longer, sixteen, "a 40-token document read at 64 tokens got the probabilities of 16");
    for (len, want) in [("513", "the model's 512 positions"), ("2", "must be from 3")] {
        let (ok, err, _) = at(len);
        assert!(!ok && err.contains("--max-len") && err.contains(want), "{err}");
    }
    // The tokenizer moved: --tokenizer names where it is now, checked by checksum.
    let moved = dir.path().join("moved.json");
    std::fs::copy(common::minilm().join("tokenizer.json"), &moved).unwrap();
    let with_tokenizer = |file: &Path| {
        std::process::Command::new(bin)
            .args(["predict", "--checkpoint", ck, "--input", input.to_str().unwrap(), "--mc-dropout", "2"])
            .arg("--tokenizer")
            .arg(file)
            .arg("--output")
            .arg(dir.path().join("pt.jsonl"))
            .output()
            .unwrap()
    };
    let o = with_tokenizer(&moved);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(dir.path().join("pt.jsonl")).unwrap(), whole);
    let o = with_tokenizer(&common::minilm().join("config.json"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("checksum"), "{err}");
    // A pretrained model directory is not a checkpoint, and is named as what it is.
    let minilm = common::minilm();
    let o = std::process::Command::new(bin)
        .args(["eval", "--checkpoint", minilm.to_str().unwrap(), "--data", data.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains("is a pretrained encoder")
            && err.contains("model.encoder.pretrained"),
        "{err}"
    );
    // `inspect --explain` shows the WordPiece ids the model reads.
    let o = std::process::Command::new(bin)
        .args(["inspect", data.to_str().unwrap(), "--samples", "0", "--explain", "unaffable"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("\"[CLS]\"                  101") && text.contains("\"##ffa\"                  20961"),
        "{text}"
    );
}

/// The tensors of a checkpoint's model by name.
fn weights(ckpt: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    common::tensors(ckpt)
        .into_iter()
        .filter_map(|(n, v)| Some((n.strip_prefix("model.safetensors:")?.to_string(), v)))
        .collect()
}

#[test]
fn layer_wise_decay_slows_the_lower_layers_only() {
    let dir = tempfile::tempdir().unwrap();
    let data = wordpiece(dir.path(), &[]);
    let run_with = |decay: &str| {
        let out = dir.path().join(format!("d{decay}"));
        let c = cfg(&data, &out, &["train.steps=1", &format!("model.encoder.layer_lr_decay={decay}")]);
        weights(&run(&c, Resume::No, None).unwrap().final_checkpoint)
    };
    let (plain, decayed) = (run_with("1.0"), run_with("0.1"));
    // One Adam step from the same initialisation: the head's update is the same (its
    // multiplier is 1), every layer below moves differently.
    assert_eq!(plain["classifier.weight"], decayed["classifier.weight"]);
    assert_ne!(plain["encoder.layer.1.output.dense.weight"], decayed["encoder.layer.1.output.dense.weight"]);
    assert_ne!(plain["embeddings.word_embeddings.weight"], decayed["embeddings.word_embeddings.weight"]);
}

/// MPL's teacher takes its own layer-wise decay (`mpl.teacher.encoder.layer_lr_decay`):
/// after one step its head is where it is without the decay and its lower layers are not,
/// while the student, whose settings are the same in both runs, is unchanged.
#[test]
fn mpl_teachers_layer_wise_decay_slows_its_lower_layers() {
    let dir = tempfile::tempdir().unwrap();
    let data = wordpiece(dir.path(), &["split.labels_per_class=6"]);
    let run_with = |decay: &str| {
        let out = dir.path().join(format!("t{decay}"));
        let extra = [
            "method=\"mpl\"",
            "unlabeled.ratio=1",
            "train.steps=1",
            "mpl.teacher.kind=\"encoder\"",
            "mpl.teacher.encoder.hidden=16",
            "mpl.teacher.encoder.layers=2",
            "mpl.teacher.encoder.heads=2",
            "mpl.teacher.encoder.intermediate=32",
            &format!("mpl.teacher.encoder.layer_lr_decay={decay}"),
        ];
        let ckpt = run(&cfg(&data, &out, &extra), Resume::No, None).unwrap().final_checkpoint;
        let all: std::collections::BTreeMap<String, Vec<f32>> = common::tensors(&ckpt).into_iter().collect();
        all
    };
    let (plain, decayed) = (run_with("1.0"), run_with("0.1"));
    let pick = |w: &std::collections::BTreeMap<String, Vec<f32>>, file: &str| -> Vec<(String, Vec<f32>)> {
        w.iter().filter(|(n, _)| n.starts_with(file)).map(|(n, v)| (n.clone(), v.clone())).collect()
    };
    assert!(!pick(&plain, "model.safetensors:").is_empty());
    assert!(pick(&plain, "model.safetensors:") == pick(&decayed, "model.safetensors:"), "the student moved");
    let t = |name: &str| format!("teacher.safetensors:{name}");
    assert!(plain[&t("classifier.weight")] == decayed[&t("classifier.weight")], "the teacher's head");
    for name in ["encoder.layer.0.output.dense.weight", "embeddings.word_embeddings.weight"] {
        assert!(plain[&t(name)] != decayed[&t(name)], "the teacher's {name} took no decay");
    }
    // The teacher's own multipliers must name its own tensors.
    let extra =
        ["method=\"mpl\"", "unlabeled.ratio=1", "mpl.teacher_optim={lr=0.003, lr_mult={embeding=2.0}}"];
    let e = run(&cfg(&data, &dir.path().join("typo"), &extra), Resume::No, None).unwrap_err().to_string();
    assert!(e.contains("mpl.teacher_optim.lr_mult.embeding") && e.contains("matches no tensor"), "{e}");
}

#[test]
fn length_grouping_cuts_the_padding_and_resumes_exactly() {
    // Distinct documents of 2 to 41 words, so that random batches pad a lot.
    let dir = tempfile::tempdir().unwrap();
    let mut tsv = String::new();
    for j in 0..300usize {
        let word = ["alpha", "beta", "gamma"][j % 3];
        tsv.push_str(&format!("c{}\t{} {j}\n", j % 3, vec![word; 1 + (j * 13) % 40].join(" ")));
    }
    let f = common::write(dir.path(), "lengths.tsv", tsv.as_bytes());
    let tok = common::minilm().join("tokenizer.json");
    let path = format!("tokenizer.subword.path={:?}", tok.display().to_string());
    let data = dir.path().join("data");
    let sets =
        [path.as_str(), "tokenizer.subword.max_len=64", "output.shards=2", "split.labels_per_class=10"];
    common::run(&[&f], &[], &data, &sets).unwrap();
    let r = dtrain::bench::bench_padding(&data, "unlabeled", 8, &[0, 10]).unwrap();
    let (off, on) = (&r.rows[0], &r.rows[1]);
    assert!(r.batches >= 10, "{} batches", r.batches);
    assert!(
        on.padded_tokens * 4 < off.padded_tokens * 3,
        "padded tokens {} → {}",
        off.padded_tokens,
        on.padded_tokens
    );
    let real = (on.real_tokens as f64 / off.real_tokens as f64 - 1.0).abs();
    assert!(real < 0.1, "the same kind of rows: {} vs {} real tokens", off.real_tokens, on.real_tokens);
    // A run with grouping resumes bit for bit (the order is a function of seed and epoch).
    assert_resume_is_exact(&["method=\"uda\"", "unlabeled.ratio=2", "train.group_by_length=3"]);
    // A bag model has nothing to pad.
    let e = config::load::<TrainConfig>(
        None,
        &["train.group_by_length=50", "data.dir=\"x\"", "train.out_dir=\"y\""]
            .map(|o| Override::parse(o).unwrap()),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("train.group_by_length") && e.contains("bag"), "{e}");
}

#[test]
fn activation_recomputation_trains_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    let data = wordpiece(dir.path(), &["split.labels_per_class=6"]);
    let extra =
        ["train.steps=6", "method=\"uda\"", "unlabeled.ratio=1", "model.encoder.attention_dropout=0.1"];
    let a = run(&cfg(&data, &dir.path().join("a"), &extra), Resume::No, None).unwrap();
    let with = [&extra[..], &["model.encoder.recompute=true"]].concat();
    let b = run(&cfg(&data, &dir.path().join("b"), &with), Resume::No, None).unwrap();
    assert_eq!(common::tensors(&a.final_checkpoint), common::tensors(&b.final_checkpoint));
}

#[test]
fn configs_the_encoder_cannot_run_are_refused_by_field() {
    let dir = tempfile::tempdir().unwrap();
    let data = wordpiece(dir.path(), &["split.labels_per_class=6"]);
    let out = dir.path().join("x");
    let refused = |extra: &[&str], field: &str| {
        let mut o: Vec<Override> = [
            format!("data.dir={:?}", data.display().to_string()),
            format!("train.out_dir={:?}", out.display().to_string()),
            "model.kind=\"encoder\"".into(),
        ]
        .iter()
        .map(|s| Override::parse(s).unwrap())
        .collect();
        o.extend(extra.iter().map(|s| Override::parse(s).unwrap()));
        let e = config::load::<TrainConfig>(None, &o).unwrap_err().to_string();
        assert!(e.contains(field), "{extra:?}: {e}");
    };
    refused(&["model.init_from=\"x\""], "model.init_from");
    refused(&["model.encoder.heads=5"], "model.encoder.heads");
    refused(&["model.encoder.dropout=1.0"], "model.encoder.dropout");
    refused(&["model.encoder.attention_dropout=1.0"], "model.encoder.attention_dropout");
    refused(&["model.encoder.layer_lr_decay=0.0"], "model.encoder.layer_lr_decay");
    // A field of the other kind of model, or a from-scratch shape beside a pretrained
    // model, would be ignored without a word.
    let pre = format!("model.encoder.pretrained={:?}", common::minilm().display().to_string());
    for (extra, field) in [
        ("model.dim=64", "model.dim"),
        ("model.hidden=[32]", "model.hidden"),
        ("model.embed_dropout=0.5", "model.embed_dropout"),
        ("model.encoder.layers=3", "model.encoder.layers"),
        ("model.encoder.pre_ln=false", "model.encoder.pre_ln"),
    ] {
        refused(&[pre.as_str(), extra], field);
    }
    refused(&["model.kind=\"bag\"", pre.as_str()], "field `model.encoder`");
    refused(&["model.kind=\"bag\"", "model.encoder.pooling=\"cls\""], "field `model.encoder`");
    // Documents longer than the pretrained model's 512 positions.
    std::fs::create_dir(dir.path().join("long")).unwrap();
    let tok = common::minilm().join("tokenizer.json");
    let path = format!("tokenizer.subword.path={:?}", tok.display().to_string());
    let long =
        common::separable(&dir.path().join("long"), 10, &[path.as_str(), "tokenizer.subword.max_len=600"]);
    let pre = format!("model.encoder.pretrained={:?}", common::minilm().display().to_string());
    let e = run(&cfg(&long, &dir.path().join("z"), &[&pre, "train.steps=1"]), Resume::No, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.encoder.pretrained") && e.contains("512 positions"), "{e}");
    // A hashed data set has no token order for an encoder.
    std::fs::create_dir(dir.path().join("h")).unwrap();
    let hashed = common::separable(&dir.path().join("h"), 10, &[]);
    let e = run(&cfg(&hashed, &dir.path().join("y"), &["train.steps=2"]), Resume::No, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.kind") && e.contains("subword"), "{e}");
}

#[test]
fn masked_lm_pretraining_lowers_its_loss_and_its_encoder_fine_tunes() {
    let dir = tempfile::tempdir().unwrap();
    let data = wordpiece(dir.path(), &["split.labels_per_class=6"]);
    let pcfg =
        mlm_config(&data, &dir.path().join("mlm"), &["mlm.steps=30", "mlm.log_every=10", "train.lr=0.001"]);
    let r = common::mlm(&pcfg, Resume::No).unwrap();
    assert_eq!(r.steps, 30);
    // The fresh head starts near ln(30522) ≈ 10.3 and learns this small, repetitive text.
    // Over seeds 1–5 the last logged loss (a 10-step window) ends at 0.45–0.62 of the first
    // (measured 2026-12-05), so 0.7 leaves room for the masks' luck, not for a stall.
    let first = r.first_loss.expect("three windows were logged");
    assert!(first > 5.0 && r.last_loss < 0.7 * first, "{first} → {}", r.last_loss);
    for f in ["config.json", "tokenizer.json", "model.safetensors", "DONE"] {
        assert!(r.out.join(f).is_file(), "{f} missing from {}", r.out.display());
    }
    // `dtrain plot` draws its loss and masked-token accuracy.
    let curves = dtrain::plot::read_metrics(&dir.path().join("mlm/metrics.jsonl")).unwrap();
    assert!(curves.masked_lm && curves.train_loss.len() == 3 && curves.train_acc.len() == 3, "{curves:?}");
    dtrain::plot::plot(&curves, "mlm", &dir.path().join("mlm.png"), 600, 300).unwrap();
    // The result is a pretrained encoder for fine-tuning.
    let pre = format!("model.encoder.pretrained={:?}", r.out.display().to_string());
    let c = cfg(&data, &dir.path().join("ft"), &[&pre, "optim.lr=1e-4", "train.steps=4"]);
    assert!(run(&c, Resume::No, None).unwrap().test.is_some());
    // Its files are checked against its DONE record, as a checkpoint's are: a damaged copy
    // is refused by file.
    let damaged = dir.path().join("damaged");
    common::copy_dir(&r.out, &damaged);
    let w = damaged.join("model.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&w, &bytes).unwrap();
    let pre = format!("model.encoder.pretrained={:?}", damaged.display().to_string());
    let e = run(&cfg(&data, &dir.path().join("ft2"), &[&pre, "train.steps=1"]), Resume::No, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.safetensors") && e.contains("differs from the file"), "{e}");
    // A tokenizer.json beside it other than the data set's is refused by field: the data's
    // ids would index other rows.
    std::fs::copy(r.out.join("model.safetensors"), &w).unwrap();
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(damaged.join("tokenizer.json")).unwrap()).unwrap();
    tok["model"]["vocab"]["the"] = 999.into();
    let other = dir.path().join("other");
    common::copy_dir(&damaged, &other);
    std::fs::remove_file(other.join(dtrain::checkpoint::DONE)).unwrap();
    std::fs::write(other.join("tokenizer.json"), tok.to_string()).unwrap();
    let pre = format!("model.encoder.pretrained={:?}", other.display().to_string());
    let e = run(&cfg(&data, &dir.path().join("ft3"), &[&pre, "train.steps=1"]), Resume::No, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.encoder.pretrained") && e.contains("not the data set's tokenizer"), "{e}");
    // --resume auto on the finished run (a requeued job) has nothing left to do.
    let again = common::mlm(&pcfg, Resume::Auto).unwrap();
    assert!(again.already_finished && again.out == r.out, "{again:?}");
    // Under another config, or with the encoder damaged, it is not this run's finished
    // output: refused, saying why (the field that changed; the damaged file), and kept.
    let steps31 =
        mlm_config(&data, &dir.path().join("mlm"), &["mlm.steps=31", "mlm.log_every=10", "train.lr=0.001"]);
    let e = common::mlm(&steps31, Resume::Auto).unwrap_err().to_string();
    assert!(
        e.contains("not this run's finished output: it was written under another pretraining config (mlm.steps: 30 → 31)")
            && e.contains("move them away"),
        "{e}"
    );
    let mlm_dir = dir.path().join("mlm");
    let copy = dir.path().join("mlm-copy");
    std::fs::create_dir(&copy).unwrap();
    common::copy_dir(&mlm_dir.join("encoder"), &copy.join("encoder"));
    std::fs::copy(mlm_dir.join("metrics.jsonl"), copy.join("metrics.jsonl")).unwrap();
    let moved = mlm_config(&data, &copy, &["mlm.steps=30", "mlm.log_every=10", "train.lr=0.001"]);
    let w = copy.join("encoder/model.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    let at = bytes.len() - 8;
    bytes[at] ^= 1;
    std::fs::write(&w, &bytes).unwrap();
    let e = common::mlm(&moved, Resume::Auto).unwrap_err().to_string();
    assert!(e.contains("not this run's finished output") && e.contains("model.safetensors: differs"), "{e}");
    std::fs::write(copy.join("encoder").join(dtrain::checkpoint::DONE), "").unwrap();
    let e = common::mlm(&moved, Resume::Auto).unwrap_err().to_string();
    assert!(e.contains("DONE is empty, and a masked-LM run records its files there"), "{e}");
    // A file where the encoder directory goes is refused before any step.
    std::fs::remove_dir_all(copy.join("encoder")).unwrap();
    std::fs::remove_file(copy.join("metrics.jsonl")).unwrap();
    std::fs::write(copy.join("encoder"), "").unwrap();
    let e = common::mlm(&moved, Resume::No).unwrap_err().to_string();
    assert!(e.contains("is in the way of the encoder directory this run writes"), "{e}");
    // A second run into the same out_dir would replace the first's encoder (here even its
    // own input): refused, naming what is there, and the encoder is left as it was.
    let weights = std::fs::read(r.out.join("model.safetensors")).unwrap();
    let own = format!("mlm.pretrained={:?}", r.out.display().to_string());
    let again = mlm_config(&data, &dir.path().join("mlm"), &["mlm.steps=2", &own]);
    let e = common::mlm(&again, Resume::No).unwrap_err().to_string();
    assert!(e.contains("train.out_dir") && e.contains("metrics.jsonl, encoder"), "{e}");
    assert_eq!(std::fs::read(r.out.join("model.safetensors")).unwrap(), weights);
    // Nor may it write into the fine-tuning run's checkpoint.
    let refused = |out: &Path| {
        common::mlm(&mlm_config(&data, out, &["mlm.steps=2"]), Resume::No)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let e = refused(&common::last_checkpoint(&dir.path().join("ft")).join("mlm"));
    assert!(e.contains("train.out_dir") && e.contains("a checkpoint"), "{e}");
    // A directory another run holds is refused, as training's and skip-gram's are.
    let busy = dir.path().join("busy");
    let _held = dtrain::fsutil::lock_run_dir(&busy, "train.out_dir").unwrap();
    let e = refused(&busy);
    assert!(e.contains("is in use by another dtrain run"), "{e}");
}

/// `mlm.matmul` reaches the masked-LM run: 3 steps at bf16 products end with other
/// weights than at f32, and a finite loss.
#[test]
fn masked_lm_takes_the_matmul_precision() {
    let dir = tempfile::tempdir().unwrap();
    let data = wordpiece(dir.path(), &["split.labels_per_class=6"]);
    let weights: Vec<Vec<u8>> = ["f32", "bf16"]
        .iter()
        .map(|m| {
            let set = format!("mlm.matmul=\"{m}\"");
            let pcfg = mlm_config(&data, &dir.path().join(m), &["mlm.steps=3", "train.lr=0.001", &set]);
            let r = common::mlm(&pcfg, Resume::No).unwrap();
            assert!(r.last_loss.is_finite(), "{m}: loss {}", r.last_loss);
            // 3 steps are one logged window (mlm.log_every 10): no "first → last" to report.
            assert_eq!(r.first_loss, None, "{m}: one window has no first loss apart from the last");
            std::fs::read(r.out.join("model.safetensors")).unwrap()
        })
        .collect();
    assert!(weights[0] != weights[1], "bf16 products changed nothing");
    // Weights that an update sends to infinity are not written as an encoder. The config's
    // rules refuse such a decay, so the field is set past them.
    let sets = ["mlm.steps=1", "train.lr=1", "mlm.weight_decay=1e38"];
    let mut o: Vec<Override> = sets.iter().map(|s| Override::parse(s).unwrap()).collect();
    o.push(Override::parse(&format!("data.dir={:?}", data.display().to_string())).unwrap());
    o.push(Override::parse("model.objective=\"mlm\"").unwrap());
    o.push(Override::parse(&format!("mlm.pretrained={:?}", common::minilm().display().to_string())).unwrap());
    o.push(
        Override::parse(&format!("train.out_dir={:?}", dir.path().join("x").display().to_string())).unwrap(),
    );
    let e = config::load::<dtrain::config::PretrainConfig>(None, &o).unwrap_err().to_string();
    assert!(e.contains("field `mlm.weight_decay`") && e.contains("must be below 1"), "{e}");
    let mut pcfg = mlm_config(&data, &dir.path().join("diverged"), &["mlm.steps=1", "train.lr=1"]);
    pcfg.mlm.weight_decay = 1e38;
    let e = common::mlm(&pcfg, Resume::No).unwrap_err().to_string();
    assert!(e.contains("not written: tensor") && e.contains("the weights diverged"), "{e}");
    assert!(
        !dir.path().join("diverged/encoder").exists() && !dir.path().join("diverged/encoder.tmp").exists()
    );
    // A shard whose ids were changed within the vocabulary (only its payload checksum
    // tells) is refused before a step reads it.
    let damaged = dir.path().join("damaged");
    common::damaged_copy(&data, &damaged, |b| {
        let ids_at = u64::from_le_bytes(b[64..72].try_into().unwrap()) as usize;
        b[ids_at + 4..ids_at + 8].copy_from_slice(&1000u32.to_le_bytes());
    });
    let pcfg = mlm_config(&damaged, &dir.path().join("dmg"), &["mlm.steps=1"]);
    let e = common::mlm(&pcfg, Resume::No).unwrap_err().to_string();
    assert!(e.contains("unlabeled-00000.shard") && e.contains("payload checksum"), "{e}");
}

/// `mlm.group_by_length` reaches the masked-LM run: over one epoch of texts from 1 to 24
/// words, batches of similar lengths waste fewer padded token slots, with the same tokens
/// seen.
#[test]
fn masked_lm_groups_batches_by_length() {
    let dir = tempfile::tempdir().unwrap();
    let mut tsv = String::new();
    for j in 0..96 {
        let words: Vec<String> = (0..1 + (j * 7) % 24).map(|k| format!("w{}", (j + k) % 13)).collect();
        tsv.push_str(&format!("c{}\t{}\n", j % 3, words.join(" ")));
    }
    let input = common::write(dir.path(), "lengths.tsv", tsv.as_bytes());
    let data = dir.path().join("data");
    let tok = common::minilm().join("tokenizer.json");
    let sub = format!("tokenizer.subword.path={:?}", tok.display().to_string());
    common::run(&[&input], &[], &data, &[sub.as_str(), "tokenizer.subword.max_len=32", "output.shards=2"])
        .unwrap();
    let padding = |window: usize| {
        let out = dir.path().join(format!("mlm-{window}"));
        let group = format!("mlm.group_by_length={window}");
        let pcfg = mlm_config(&data, &out, &[&group, "train.epochs=1", "train.lr=0.0001"]);
        let r = common::mlm(&pcfg, Resume::No).unwrap();
        let logged = records(&out);
        assert!(logged.iter().all(|r| r["padding"].as_f64().is_some_and(|p| (0.0..1.0).contains(&p))));
        (r.padding, r.steps)
    };
    let (plain, steps) = padding(0);
    let (grouped, steps_grouped) = padding(50);
    eprintln!(
        "masked-LM padding over one epoch: {plain:.3} in shuffled batches, {grouped:.3} grouped by length"
    );
    assert_eq!(steps, steps_grouped);
    // Measured 0.274 → 0.145 (2026-12-05): 8 batches of 8 texts of 3 to 26 tokens.
    assert!(plain > 0.2 && grouped < 0.6 * plain, "padding {plain:.3} → {grouped:.3}");
}

/// `mlm.head_warmup_steps`: the first steps train the fresh head alone. With the full
/// phase at a negligible rate, every tensor of the source encoder, its word table (the
/// tied decoder) included, leaves the run as it came, while the head has learned; the
/// records name each phase.
#[test]
fn masked_lm_head_warm_up_trains_the_head_alone() {
    let dir = tempfile::tempdir().unwrap();
    let data = wordpiece(dir.path(), &["split.labels_per_class=6"]);
    let out = dir.path().join("mlm");
    let sets = [
        "mlm.head_warmup_steps=20",
        "mlm.head_warmup_lr=0.003",
        "mlm.steps=1",
        "mlm.log_every=10",
        "train.lr=1e-12",
    ];
    let r = common::mlm(&mlm_config(&data, &out, &sets), Resume::No).unwrap();
    assert_eq!(r.steps, 21);
    let logged = records(&out);
    let phases: Vec<(u64, &str, f64)> = logged
        .iter()
        .map(|r| (r["step"].as_u64().unwrap(), r["phase"].as_str().unwrap(), r["lr"].as_f64().unwrap()))
        .collect();
    assert_eq!(phases, [(10, "head", 0.003), (20, "head", 0.003), (21, "full", 1e-12)]);
    let loss = |i: usize| logged[i]["loss"].as_f64().unwrap();
    assert!(loss(0) > 5.0 && loss(1) < loss(0), "the head learns: {} → {}", loss(0), loss(1));
    let read = |p: &Path| std::fs::read(p).unwrap();
    let (src_bytes, out_bytes) =
        (read(&common::minilm().join("model.safetensors")), read(&r.out.join("model.safetensors")));
    let (src, got) = (
        safetensors::SafeTensors::deserialize(&src_bytes).unwrap(),
        safetensors::SafeTensors::deserialize(&out_bytes).unwrap(),
    );
    let floats = |t: safetensors::tensor::TensorView<'_>| -> Vec<f32> {
        t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    };
    let mut compared = 0;
    for (name, tensor) in got.tensors() {
        let Ok(before) = src.tensor(&name) else { continue };
        let (a, b) = (floats(before), floats(tensor));
        let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(a.len() == b.len() && worst < 1e-6, "{name} moved by {worst}");
        compared += 1;
    }
    assert!(
        compared > 50 && got.names().iter().any(|n| n.contains("word_embeddings")),
        "{compared} tensors compared"
    );
    // The head learned: its LayerNorm scale left 1 and its output bias left 0.
    let ln = floats(got.tensor("cls.predictions.transform.LayerNorm.weight").unwrap());
    let bias = floats(got.tensor("cls.predictions.bias").unwrap());
    assert!(ln.iter().any(|&v| (v - 1.0).abs() > 1e-3) && bias.iter().any(|&v| v.abs() > 1e-3));
    // After the warm-up the whole encoder trains, on a schedule that counts from there: two
    // head steps at head_warmup_lr (default 1e-3), then the full phase's linear warmup over
    // its own first two steps (5e-4, 1e-3), and the word table moves.
    let out = dir.path().join("mlm2");
    let sets =
        ["mlm.head_warmup_steps=2", "mlm.steps=2", "mlm.warmup_steps=2", "mlm.log_every=1", "train.lr=0.001"];
    let r = common::mlm(&mlm_config(&data, &out, &sets), Resume::No).unwrap();
    let logged = records(&out);
    let phases: Vec<(&str, f64)> =
        logged.iter().map(|r| (r["phase"].as_str().unwrap(), r["lr"].as_f64().unwrap())).collect();
    assert_eq!(phases, [("head", 1e-3), ("head", 1e-3), ("full", 5e-4), ("full", 1e-3)]);
    let out_bytes = read(&r.out.join("model.safetensors"));
    let got = safetensors::SafeTensors::deserialize(&out_bytes).unwrap();
    let name = "embeddings.word_embeddings.weight";
    let (a, b) = (floats(src.tensor(name).unwrap()), floats(got.tensor(name).unwrap()));
    let moved = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(moved > 1e-4, "the full phase trains the word table: it moved {moved}");
}

/// Masked-LM settings that would be ignored or could never take effect are refused by
/// field: a warmup longer than the run (its rate never reached train.lr), a head warm-up
/// rate out of range, skip-gram fields under objective = "mlm", and [mlm] under skip-gram.
#[test]
fn masked_lm_settings_that_cannot_apply_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = wordpiece(dir.path(), &["split.labels_per_class=6"]);
    let e = common::mlm(
        &mlm_config(&data, &dir.path().join("w"), &["mlm.steps=2", "mlm.warmup_steps=3"]),
        Resume::No,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("mlm.warmup_steps") && e.contains("longer than the run's 2 steps"), "{e}");
    // A rate far too high: the loss passes ten times a uniform guess's, and the run stops
    // naming the rate instead of writing the encoder.
    let out = dir.path().join("diverged");
    let e = common::mlm(&mlm_config(&data, &out, &["mlm.steps=15", "train.lr=10"]), Resume::No)
        .unwrap_err()
        .to_string();
    assert!(e.contains("the run diverged; lower train.lr") && e.contains("a uniform guess over the"), "{e}");
    assert!(!out.join("encoder").exists());
    // Documents longer than the model's positions: the positions are named, not the
    // tokenizer (which is the model's own).
    let sub = dir.path().join("long");
    std::fs::create_dir(&sub).unwrap();
    let long = wordpiece(&sub, &["split.labels_per_class=6", "tokenizer.subword.max_len=1024"]);
    let e = common::mlm(&mlm_config(&long, &dir.path().join("l"), &["mlm.steps=2"]), Resume::No)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("has 512 positions, and the data set's documents run to 1024 tokens")
            && e.contains("tokenizer.subword.max_len of at most 512"),
        "{e}"
    );
    let load = |sets: &[&str]| {
        let o: Vec<Override> = sets.iter().map(|s| Override::parse(s).unwrap()).collect();
        config::load::<dtrain::config::PretrainConfig>(None, &o).map(|_| ()).unwrap_err().to_string()
    };
    let mlm = ["data.dir=\"d\"", "model.objective=\"mlm\"", "mlm.pretrained=\"m\""];
    let e = load(&[&mlm[..], &["mlm.head_warmup_lr=11"]].concat());
    assert!(e.contains("mlm.head_warmup_lr") && e.contains("(0, 10]"), "{e}");
    let e = load(&[&mlm[..], &["model.window=3"]].concat());
    assert!(e.contains("model.window") && e.contains("skip-gram"), "{e}");
    // So are skip-gram's [train] settings that a masked-LM run would ignore.
    // (train.keep_checkpoints it reads: its checkpoints come every mlm.checkpoint_every steps.)
    for kv in ["train.threads=4", "train.checkpoint_every=2", "train.sync_words=10"] {
        let e = load(&[&mlm[..], &[kv]].concat());
        let field = kv.split('=').next().unwrap();
        assert!(e.contains(field) && e.contains("mlm.checkpoint_every steps"), "{e}");
    }
    let reads =
        [&mlm[..], &["train.keep_checkpoints=3", "mlm.checkpoint_every=5", "train.out_dir=\"o\""]].concat();
    let o: Vec<Override> = reads.iter().map(|s| Override::parse(s).unwrap()).collect();
    config::load::<dtrain::config::PretrainConfig>(None, &o).unwrap();
    let e = load(&["data.dir=\"d\"", "mlm.head_warmup_steps=5"]);
    assert!(e.contains("field `mlm`") && e.contains("objective = \"mlm\""), "{e}");
}

/// A WordPiece and a hashed-n-gram preparation of the same input and split hold the same
/// rows, so their splits share the rows fingerprint that lets one's logits teach the other.
#[test]
fn a_wordpiece_and_a_hashed_preparation_share_the_rows_fingerprint() {
    use dtrain::data::dataset::Dataset;
    use dtrain::data::shard::SplitKind;
    use dtrain::logits::rows_fingerprint;
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = (dir.path().join("w"), dir.path().join("h"));
    std::fs::create_dir_all(&w).unwrap();
    std::fs::create_dir_all(&h).unwrap();
    let wp = Dataset::open(&wordpiece(&w, &["split.labels_per_class=6"])).unwrap();
    let hashed =
        Dataset::open(&common::separable(&h, 30, &["output.shards=2", "split.labels_per_class=6"])).unwrap();
    assert_ne!(wp.manifest().checksum, hashed.manifest().checksum);
    assert!(wp.manifest().tokenizer.subword.is_some() && hashed.manifest().tokenizer.subword.is_none());
    for split in [SplitKind::Unlabeled, SplitKind::Train, SplitKind::Test] {
        assert_eq!(rows_fingerprint(&wp, split), rows_fingerprint(&hashed, split), "{split:?}");
    }
    assert_ne!(rows_fingerprint(&wp, SplitKind::Unlabeled), rows_fingerprint(&wp, SplitKind::Train));
}

/// The records of a run's metrics.jsonl.
fn records(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A masked-LM run of MiniLM on `data` into `out`, 8 sequences per step, `extra` on top.
fn mlm_config(data: &Path, out: &Path, extra: &[&str]) -> dtrain::config::PretrainConfig {
    let sets = [
        format!("data.dir={:?}", data.display().to_string()),
        format!("train.out_dir={:?}", out.display().to_string()),
        "model.objective=\"mlm\"".into(),
        format!("mlm.pretrained={:?}", common::minilm().display().to_string()),
        "mlm.batch_size=8".into(),
    ];
    let o: Vec<Override> = sets
        .iter()
        .map(|s| s.as_str())
        .chain(extra.iter().copied())
        .map(|s| Override::parse(s).unwrap())
        .collect();
    config::load(None, &o).unwrap()
}

/// A masked-LM run stopped in its head's warm-up and again in the full run, and resumed
/// each time with --resume auto, writes the encoder and the metrics of the uninterrupted
/// run bit for bit (dropout on: each step's batch, masks and noise are keyed by the step).
/// Its checkpoints are kept as train.keep_checkpoints says and removed at the end; a resume
/// under another config names the field, and a fresh start over checkpoints is refused.
#[test]
fn masked_lm_pretraining_stops_and_resumes_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let data = wordpiece(dir.path(), &["split.labels_per_class=6"]);
    let sets = [
        "mlm.steps=6",
        "mlm.head_warmup_steps=2",
        "mlm.log_every=2",
        "mlm.checkpoint_every=2",
        "train.keep_checkpoints=2",
        "train.lr=0.001",
    ];
    let whole = dir.path().join("whole");
    let r = common::mlm(&mlm_config(&data, &whole, &sets), Resume::No).unwrap();
    assert_eq!((r.steps, r.resumed_at), (8, 0));
    assert!(!whole.join("checkpoints").exists(), "the checkpoints go once the encoder is written");
    let cut = dir.path().join("cut");
    let c = mlm_config(&data, &cut, &sets);
    let first = common::mlm_until(&c, Resume::No, Some(1)).unwrap();
    assert_eq!(first.out, cut.join("checkpoints/step-000000001"));
    assert!(!cut.join("encoder").exists());
    // A fresh start over its checkpoints is refused; a resume under another config names
    // the field.
    let e = common::mlm(&c, Resume::No).unwrap_err().to_string();
    assert!(e.contains("--resume auto"), "{e}");
    // --resume given what is not a masked-LM checkpoint says what it is.
    let from = |d: &Path| common::mlm(&c, Resume::From(d.to_owned())).unwrap_err().to_string();
    let e = from(&common::minilm());
    assert!(
        e.contains("is a pretrained model's directory (Hugging Face config.json and model.safetensors)"),
        "{e}"
    );
    let e = from(&whole.join("encoder"));
    assert!(e.contains("is a finished masked-LM run's encoder, not a checkpoint"), "{e}");
    let e = from(Path::new("yes"));
    assert!(e.contains("--resume takes `auto`, `no` or a checkpoint directory"), "{e}");
    // A copy under a later step's name is refused, not resumed as the newest.
    let copy = cut.join("checkpoints/step-000000003");
    common::copy_dir(&first.out, &copy);
    let e = common::mlm(&c, Resume::Auto).unwrap_err().to_string();
    assert!(e.contains("holds the masked-LM state of step 1, but its name says step 3"), "{e}");
    std::fs::remove_dir_all(&copy).unwrap();
    let other = mlm_config(&data, &cut, &[&sets[..], &["train.lr=0.002"]].concat());
    let e = common::mlm(&other, Resume::Auto).unwrap_err().to_string();
    assert!(e.contains("different pretraining config (train.lr: 0.001 → 0.002)"), "{e}");
    let second = common::mlm_until(&c, Resume::Auto, Some(5)).unwrap();
    assert_eq!((second.resumed_at, second.steps), (1, 5));
    let kept: Vec<String> = std::fs::read_dir(cut.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(kept, ["step-000000004", "step-000000005"], "the newest two");
    let last = common::mlm(&c, Resume::Auto).unwrap();
    assert_eq!((last.resumed_at, last.steps), (5, 8));
    assert_eq!(last.last_loss.to_bits(), r.last_loss.to_bits());
    assert_eq!(last.first_loss.map(f64::to_bits), r.first_loss.map(f64::to_bits));
    assert!(!cut.join("checkpoints").exists());
    let weights = |d: &Path| std::fs::read(d.join("encoder/model.safetensors")).unwrap();
    assert!(
        weights(&whole) == weights(&cut),
        "the resumed run's encoder differs from the uninterrupted one's"
    );
    // The metrics: one record per logged window, as the uninterrupted run's (throughput
    // aside).
    let records = |d: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(d.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v.as_object_mut().unwrap().remove("tokens_per_s");
                v
            })
            .collect()
    };
    assert_eq!(records(&whole).len(), 4);
    assert_eq!(records(&whole), records(&cut));
}

/// An encoder's activations join the memory budget before the first step allocates them:
/// UDA with 8 labeled and 240 unlabeled rows per step at 16 tokens holds a student pass
/// with every layer's tape (248 sequences), a weak-view pass with one shared tape (240) and
/// an evaluation batch (64). Their bytes, computed here per token as 2 layers × (9·H + 2·I +
/// heads·len + 4) + 4·H values for a pass a backward pass follows (one layer's tape for the
/// others), exceed a 38 MiB limit, and the run is refused naming `train.batch_size`; with
/// activation recomputation (each layer's input, plus the tape the backward pass refills)
/// the same run fits and trains.
#[test]
fn an_encoders_activations_are_claimed_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let data = wordpiece(dir.path(), &["split.labels_per_class=6"]);
    let toml = format!(
        "method = \"uda\"\n[data]\ndir = {:?}\n[train]\nout_dir = {:?}\n",
        data.display().to_string(),
        dir.path().join("run").display().to_string()
    );
    let toml = common::write(dir.path(), "run.toml", toml.as_bytes());
    let train = |extra: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_dtrain"));
        cmd.env("DTRAIN_MEMORY_LIMIT", "38M").args(["train", "--config", toml.to_str().unwrap()]);
        let sets = [
            "model.kind=\"encoder\"",
            "model.encoder.hidden=32",
            "model.encoder.layers=2",
            "model.encoder.heads=4",
            "model.encoder.intermediate=64",
            "model.encoder.pre_ln=true",
            "train.batch_size=8",
            "unlabeled.ratio=30",
            "train.eval_batch_size=64",
            "train.steps=1",
        ];
        for s in sets.iter().chain(extra) {
            cmd.args(["--set", s]);
        }
        cmd.output().unwrap()
    };
    let (h, i, heads, len) = (32u64, 64u64, 4u64, 16u64);
    let tape = 9 * h + 2 * i + heads * len + 4;
    let mib = |values_x_tokens: u64| format!("{:.1} MiB", (values_x_tokens * 4) as f64 / (1 << 20) as f64);
    let passes = "passes of 248, 240 (no backward), 64 (no backward) sequences × 16 tokens";
    // Beside the tapes: 4·H rows per token, and pre-LN's final LayerNorm input.
    let beside = 5 * h;
    let inference = (240 + 64) * len * (tape + beside);
    let o = train(&[]);
    let err = String::from_utf8_lossy(&o.stderr);
    let kept = mib(248 * len * (2 * tape + beside) + inference);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("field `train.batch_size`") && err.contains("38.0 MiB is available"), "{err}");
    assert!(err.contains(&format!("the model's activations ({passes}) {kept}")), "want {kept}: {err}");
    assert!(err.contains("model.encoder.recompute = true"), "{err}");
    let o = train(&["model.encoder.recompute=true"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let recomputed = mib(248 * len * (2 * h + tape + beside) + inference);
    assert!(
        err.contains(&format!("the model's activations ({passes}) {recomputed}")),
        "want {recomputed}: {err}"
    );
}

/// MPL evaluates its student and its teacher one after the other, so the budget holds one
/// evaluation batch, the larger model's: an encoder teacher twice the student's width claims
/// it, and one half as wide leaves it to the student. The step's passes are the student's
/// (8 labeled or unlabeled rows, one at a time) and the teacher's (8 labeled rows and both
/// views of 8 unlabeled ones).
#[test]
fn meta_pseudo_labels_claims_one_evaluation_batch_the_larger_models() {
    let dir = tempfile::tempdir().unwrap();
    let data = wordpiece(dir.path(), &["split.labels_per_class=6"]);
    let toml = format!("method = \"mpl\"\n[data]\ndir = {:?}\n", data.display().to_string(),);
    let toml = common::write(dir.path(), "run.toml", toml.as_bytes());
    let memory_line = |teacher_hidden: usize| {
        let out = dir.path().join(format!("run{teacher_hidden}"));
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_dtrain"));
        cmd.args(["train", "--config", toml.to_str().unwrap()]);
        let sets = [
            format!("train.out_dir={:?}", out.display().to_string()),
            "model.kind=\"encoder\"".into(),
            "model.encoder.hidden=32".into(),
            "model.encoder.layers=1".into(),
            "model.encoder.heads=2".into(),
            "model.encoder.intermediate=64".into(),
            "mpl.teacher.kind=\"encoder\"".into(),
            format!("mpl.teacher.encoder.hidden={teacher_hidden}"),
            "mpl.teacher.encoder.layers=1".into(),
            "mpl.teacher.encoder.heads=2".into(),
            "mpl.teacher.encoder.intermediate=64".into(),
            "train.batch_size=8".into(),
            "unlabeled.ratio=1".into(),
            "train.eval_batch_size=64".into(),
            "train.steps=1".into(),
        ];
        for s in &sets {
            cmd.args(["--set", s]);
        }
        let o = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "{err}");
        err.lines().find(|l| l.starts_with("memory:")).expect("the memory account is shown").to_string()
    };
    let line = memory_line(64);
    assert!(line.contains("the model's activations (passes of 8 sequences × 16 tokens)"), "{line}");
    assert!(
        line.contains("MPL's teacher's activations (passes of 24, 64 (no backward) sequences × 16 tokens)"),
        "{line}"
    );
    let line = memory_line(16);
    assert!(
        line.contains("the model's activations (passes of 8, 64 (no backward) sequences × 16 tokens)"),
        "{line}"
    );
    assert!(line.contains("MPL's teacher's activations (passes of 24 sequences × 16 tokens)"), "{line}");
}

/// A Mean Teacher's weights follow the whole encoder: after one step, where α₁ = 0.5, every
/// value of the teacher is the mean of the initial weights (a run whose learning rate moves
/// them by at most 1e-30) and the student's. (A teacher that averaged only part of the layout would keep
/// initial values elsewhere.)
#[test]
fn an_encoders_mean_teacher_averages_every_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let data = wordpiece(dir.path(), &["split.labels_per_class=6"]);
    let one_step = |out: &str, lr: &str| {
        let sets = ["method=\"mean_teacher\"", "unlabeled.ratio=2", "train.steps=1", lr];
        run(&cfg(&data, &dir.path().join(out), &sets), Resume::No, None).unwrap().final_checkpoint
    };
    let init = common::tensors(&one_step("still", "optim.lr=1e-30"));
    let moved = common::tensors(&one_step("moved", "optim.lr=0.003"));
    let get = |ts: &[(String, Vec<f32>)], name: &str| ts.iter().find(|(n, _)| n == name).unwrap().1.clone();
    let mut checked = 0;
    for (name, student) in moved.iter().filter(|(n, _)| n.starts_with("model.safetensors:")) {
        let tensor = name.trim_start_matches("model.safetensors:");
        let start = get(&init, name);
        let teacher = get(&moved, &format!("teacher.safetensors:{tensor}"));
        for (k, ((&s, &i), &t)) in student.iter().zip(&start).zip(&teacher).enumerate() {
            let want = 0.5 * i + 0.5 * s;
            assert!(
                (t - want).abs() <= 1e-6 * want.abs().max(1.0),
                "{tensor}[{k}]: teacher {t}, want {want}"
            );
        }
        checked += usize::from(student != &start);
    }
    assert!(checked > 10, "the step moved {checked} tensors");
}

/// `dtrain propagate` on the separable data's WordPiece ids with pretrained MiniLM: the grid
/// is printed with its choice, the logits file matches the unlabeled split and labels most of
/// it right (chance is 1/3), the same inputs write the same bytes, Noisy Student trains on
/// it, an encoder checkpoint serves as the encoder too, and what it cannot use is refused.
#[test]
fn propagate_spreads_the_labels_into_noisy_student_targets() {
    let dir = tempfile::tempdir().unwrap();
    let data = wordpiece(dir.path(), &["split.labels_per_class=3", "split.val_fraction=0.2"]);
    let cli = |args: &[&std::ffi::OsStr]| common::dtrain(args);
    let os = |s: &str| std::ffi::OsString::from(s);
    let propagate = |model: &Path, out: &Path, extra: &[&str]| {
        let mut args = vec![
            os("propagate"),
            os("--model"),
            model.into(),
            os("--data"),
            data.clone().into(),
            os("--out"),
        ];
        args.push(out.into());
        args.extend(extra.iter().map(|s| os(s)));
        let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        cli(&refs)
    };
    let minilm = common::minilm();
    let first = dir.path().join("a.logits");
    let jsonl = dir.path().join("a.jsonl");
    let pl = jsonl.display().to_string();
    let (ok, out, err) =
        propagate(&minilm, &first, &["--k", "3,5", "--alpha", "0.5,0.9", "--pseudo-labels", &pl]);
    assert!(ok, "{err}");
    assert_eq!(out.matches("<- chosen").count(), 1, "{out}");
    for want in [
        "   3    0.5",
        "   5    0.9",
        "test accuracy of the chosen setting",
        "probability ≥ 0.50",
        "against the",
    ] {
        assert!(out.contains(want), "{want:?} missing from:\n{out}");
    }
    let ds = dtrain::data::dataset::Dataset::open(&data).unwrap();
    let split = dtrain::data::shard::SplitKind::Unlabeled;
    let f = dtrain::logits::LogitsFile::open(&first).unwrap();
    f.check_matches(&ds, split).unwrap();
    let (mut n, mut right) = (0, 0);
    for (si, shard) in ds.shards(split).iter().enumerate() {
        for i in 0..shard.len() {
            let z = f.row(dtrain::data::loader::RowId { split, shard: si as u32, row: i as u32 });
            n += 1;
            right += usize::from(dtrain::backend::argmax(z) == shard.hidden_label(i).unwrap() as usize);
            let total: f32 = z.iter().map(|v| v.exp()).sum();
            assert!((total - 1.0).abs() < 1e-4, "row {i}: probabilities sum to {total}");
        }
    }
    eprintln!("propagate on the separable data: {right} of {n} unlabeled rows right");
    assert!(right * 10 >= n * 6, "only {right} of {n} unlabeled rows labeled right");
    assert_eq!(std::fs::read_to_string(&jsonl).unwrap().lines().count(), n);
    // The same inputs give the same file; another grid records another source.
    let again = dir.path().join("b.logits");
    assert!(propagate(&minilm, &again, &["--k", "3,5", "--alpha", "0.5,0.9"]).0);
    assert_eq!(std::fs::read(&first).unwrap(), std::fs::read(&again).unwrap());
    // Vectors stored by `dtrain embed --data` give the same file.
    let stored = dir.path().join("v.safetensors");
    let args =
        [os("embed"), os("--model"), minilm.clone().into(), os("--data"), data.clone().into(), os("--out")];
    let refs: Vec<&std::ffi::OsStr> =
        args.iter().map(|a| a.as_os_str()).chain([stored.as_os_str()]).collect();
    let (ok, said, err) = cli(&refs);
    assert!(ok && said.contains("width 384 (encoder, mean pooling)"), "{said}{err}");
    let from_file = dir.path().join("v.logits");
    assert!(propagate(&stored, &from_file, &["--k", "3,5", "--alpha", "0.5,0.9"]).0);
    assert_eq!(std::fs::read(&first).unwrap(), std::fs::read(&from_file).unwrap());
    let other = dir.path().join("c.logits");
    assert!(propagate(&minilm, &other, &["--k", "4", "--alpha", "0.9"]).0);
    assert_ne!(dtrain::logits::LogitsFile::open(&other).unwrap().source, f.source);
    // Noisy Student reads it.
    let set = format!("noisy_student.logits={:?}", first.display().to_string());
    let sets =
        ["method=\"noisy_student\"", "unlabeled.ratio=2", "consistency.threshold=0.4", "train.steps=2", &set];
    run(&cfg(&data, &dir.path().join("ns"), &sets), Resume::No, None).unwrap();
    // The student's targets are the spread labels of its own rows: right as often as the
    // file is (a file read at the wrong rows would be right about a third of the time).
    let seen: Vec<f64> = records(&dir.path().join("ns"))
        .iter()
        .filter_map(|r| r.get("pseudo_label_accuracy").and_then(|v| v.as_f64()))
        .collect();
    assert!(!seen.is_empty(), "no pseudo_label_accuracy record");
    let mean = seen.iter().sum::<f64>() / seen.len() as f64;
    eprintln!("noisy student on the spread labels: targets right {seen:?}");
    assert!(mean >= 0.55, "the student's targets are right {mean} of the time: {seen:?}");
    // An encoder run's checkpoint serves as the encoder.
    let small = run(&cfg(&data, &dir.path().join("t"), &["train.steps=2"]), Resume::No, None).unwrap();
    let (ok, _, err) =
        propagate(&small.final_checkpoint, &dir.path().join("d.logits"), &["--k", "3", "--alpha", "0.9"]);
    assert!(ok, "{err}");
    // It keeps the pooling it was trained with.
    let d2 = dir.path().join("d2.logits");
    let (ok, _, err) =
        propagate(&small.final_checkpoint, &d2, &["--k", "3", "--alpha", "0.9", "--pooling", "cls"]);
    assert!(!ok && err.contains("--pooling applies to a pretrained model's directory"), "{err}");
    // It reads rows cut at another length than it trained on (16 tokens) within its 16
    // positions (this small model has no more), and refuses rows longer than those, naming
    // them; the vectors then differ from those of the 16-token rows for the rows cut there.
    // Any other tokenizer field must still match.
    let at = |name: &str, len: &str, more: &[&str]| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        let mut extra = vec!["split.labels_per_class=3", "split.val_fraction=0.2"];
        let len = format!("tokenizer.subword.max_len={len}");
        extra.push(&len);
        extra.extend(more);
        let tok = common::minilm().join("tokenizer.json");
        let path = format!("tokenizer.subword.path={:?}", tok.display().to_string());
        common::separable(&d, 30, &[&[path.as_str(), "output.shards=2"], &extra[..]].concat())
    };
    let embed = |data: &Path, out: &Path| {
        let args = [os("embed"), os("--model"), small.final_checkpoint.clone().into(), os("--data")];
        let refs: Vec<&std::ffi::OsStr> = args
            .iter()
            .map(|a| a.as_os_str())
            .chain([data.as_os_str(), "--out".as_ref(), out.as_os_str()])
            .collect();
        cli(&refs)
    };
    let (v16, v8) = (dir.path().join("v16.safetensors"), dir.path().join("v8.safetensors"));
    let (ok, _, err) = embed(&data, &v16);
    assert!(ok, "{err}");
    let short = at("short", "8", &[]);
    let (ok, _, err) = embed(&short, &v8);
    assert!(ok, "{err}");
    let (a, b) =
        (dtrain::rowvec::RowVectors::read(&v16).unwrap(), dtrain::rowvec::RowVectors::read(&v8).unwrap());
    assert_eq!((a.len(), &a.sample_id), (b.len(), &b.sample_id));
    assert_ne!(a.vectors, b.vectors, "rows cut at 8 tokens gave the vectors of rows cut at 16");
    let long = at("long", "24", &[]);
    let (ok, _, err) = embed(&long, &dir.path().join("v24.safetensors"));
    assert!(!ok && err.contains("16 positions") && err.contains("up to 24 tokens"), "{err}");
    assert!(!dir.path().join("v24.safetensors").exists());
    let other = at("other", "8", &["tokenizer.max_words=50"]);
    let (ok, _, err) = embed(&other, &dir.path().join("vo.safetensors"));
    assert!(
        !ok && err.contains("does not match the checkpoint's model") && err.contains("max_words"),
        "{err}"
    );
    // `eval` and `export-logits` read them alike.
    let ckpt = small.final_checkpoint.display().to_string();
    let eval =
        |data: &Path| common::dtrain(["eval", "--checkpoint", &ckpt, "--data", &data.display().to_string()]);
    let (ok, said, err) = eval(&short);
    assert!(ok && said.contains("accuracy"), "{said}{err}");
    let (ok, _, err) = eval(&long);
    assert!(!ok && err.contains("16 positions") && err.contains("up to 24 tokens"), "{err}");
    // Refused, by name: a grid with nothing to choose by (no val rows), a neighbour count
    // past the rows, an alpha outside (0, 0.999], hashed features, an output that is not a
    // logits file.
    std::fs::create_dir_all(dir.path().join("nv")).unwrap();
    std::fs::create_dir_all(dir.path().join("h")).unwrap();
    let no_val = wordpiece(&dir.path().join("nv"), &["split.labels_per_class=3", "split.val_fraction=0"]);
    let mut args =
        vec![os("propagate"), os("--model"), minilm.clone().into(), os("--data"), no_val.clone().into()];
    args.extend([os("--out"), dir.path().join("e.logits").into()]);
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let (ok, _, err) = cli(&refs);
    assert!(
        !ok && err.contains("the val split is empty")
            && err.contains("give one --k, one --alpha, one --shift, one --align and at most one --weights"),
        "{err}"
    );
    // Two weightings are two settings too.
    let mut args = vec![os("propagate")];
    for _ in 0..2 {
        args.extend([os("--model"), minilm.clone().into(), os("--data"), no_val.clone().into()]);
    }
    for a in [
        "--k",
        "5",
        "--alpha",
        "0.9",
        "--shift",
        "raw",
        "--align",
        "0",
        "--weights",
        "1,0",
        "--weights",
        "0,1",
    ] {
        args.push(os(a));
    }
    args.extend([os("--out"), dir.path().join("e.logits").into()]);
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let (ok, _, err) = cli(&refs);
    assert!(!ok && err.contains("nothing can choose among 2 settings"), "{err}");
    assert!(!dir.path().join("e.logits").exists());
    let (ok, _, err) = propagate(&minilm, &dir.path().join("e.logits"), &["--k", "500"]);
    assert!(!ok && err.contains("--k 500: the data set has only"), "{err}");
    let (ok, _, err) = propagate(&minilm, &dir.path().join("e.logits"), &["--alpha", "1.5"]);
    assert!(!ok && err.contains("--alpha 1.5: must be in (0, 0.999]"), "{err}");
    let hashed = common::separable(&dir.path().join("h"), 10, &[]);
    let mut args = vec![os("propagate"), os("--model"), minilm.into(), os("--data"), hashed.into()];
    args.extend([os("--out"), dir.path().join("e.logits").into()]);
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let (ok, _, err) = cli(&refs);
    assert!(!ok && err.contains("hashed features") && err.contains("tokenizer.subword.path"), "{err}");
    let (ok, _, err) = propagate(&common::minilm(), &jsonl, &["--k", "3", "--alpha", "0.9"]);
    assert!(!ok && err.contains("--out"), "{err}");
    assert_eq!(std::fs::read_to_string(&jsonl).unwrap().lines().count(), n, "the JSONL was overwritten");
    // A machine with too little memory for the vectors and the graph is told so before
    // anything is embedded.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_dtrain"))
        .args(["--quiet", "propagate", "--model"])
        .arg(common::minilm())
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(dir.path().join("e.logits"))
        .env("DTRAIN_MEMORY_LIMIT", "100K")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("config propagate") && err.contains("the rows' vectors"),
        "{err}"
    );
    assert!(!dir.path().join("e.logits").exists());
}

/// Two views of the same rows in one graph: MiniLM's pooled vectors of the WordPiece data
/// set and the mean skip-gram vectors of the hashed one. The logits file fits both data
/// sets; views of other rows, or a --model without its --data, are refused.
#[test]
fn propagate_joins_views_of_the_same_rows() {
    let dir = tempfile::tempdir().unwrap();
    let split = ["split.labels_per_class=3", "split.val_fraction=0.2"];
    std::fs::create_dir_all(dir.path().join("w")).unwrap();
    std::fs::create_dir_all(dir.path().join("h")).unwrap();
    std::fs::create_dir_all(dir.path().join("o")).unwrap();
    let words = wordpiece(&dir.path().join("w"), &split);
    let hashed = common::separable(&dir.path().join("h"), 30, &[&split[..], &["output.shards=2"]].concat());
    let pre = dir.path().join("pre");
    let sets: Vec<dtrain::config::Override> = [
        format!("data.dir={:?}", hashed.display().to_string()),
        format!("train.out_dir={:?}", pre.display().to_string()),
        "model.dim=16".into(),
        "model.min_count=1".into(),
        "model.subsample=0".into(),
        "model.char_ngram_max=0".into(),
        "train.threads=1".into(),
        "train.epochs=3".into(),
    ]
    .iter()
    .map(|s| dtrain::config::Override::parse(s).unwrap())
    .collect();
    let opts = dtrain::pretrain::PretrainOptions {
        resume: dtrain::train::Resume::No,
        progress: false,
        stop_after: None,
    };
    dtrain::pretrain::pretrain(&dtrain::config::load(None, &sets).unwrap(), &opts).unwrap();
    // `propagate` over (model, data) views, then any more arguments.
    let propagate = |views: &[(&Path, &Path)], out: &Path, extra: &[&str]| {
        let mut args: Vec<&std::ffi::OsStr> = vec!["propagate".as_ref()];
        for (model, data) in views {
            args.extend(["--model".as_ref(), model.as_os_str(), "--data".as_ref(), data.as_os_str()]);
        }
        args.extend(["--out".as_ref(), out.as_os_str()]);
        common::dtrain(args.into_iter().chain(extra.iter().map(|e| e.as_ref())))
    };
    let minilm = common::minilm();
    let out = dir.path().join("both.logits");
    let grid = ["--k", "3,5", "--alpha", "0.5,0.9"];
    let (ok, stdout, err) = propagate(&[(&minilm, &words), (&pre, &hashed)], &out, &grid);
    assert!(ok, "{err}");
    assert_eq!(stdout.matches("<- chosen").count(), 1, "{stdout}");
    let split_kind = dtrain::data::shard::SplitKind::Unlabeled;
    let f = dtrain::logits::LogitsFile::open(&out).unwrap();
    let (mut n, mut right) = (0, 0);
    for data in [&words, &hashed] {
        let ds = dtrain::data::dataset::Dataset::open(data).unwrap();
        f.check_matches(&ds, split_kind).unwrap();
        for (si, shard) in ds.shards(split_kind).iter().enumerate() {
            for i in 0..shard.len() {
                let z =
                    f.row(dtrain::data::loader::RowId { split: split_kind, shard: si as u32, row: i as u32 });
                n += 1;
                right += usize::from(dtrain::backend::argmax(z) == shard.hidden_label(i).unwrap() as usize);
            }
        }
    }
    assert!(right * 10 >= n * 6, "only {right} of {n} unlabeled rows labeled right");
    // One view alone writes a file of another source.
    let one = dir.path().join("one.logits");
    let (ok, _, err) = propagate(&[(&pre, &hashed)], &one, &grid);
    assert!(ok, "{err}");
    assert_ne!(dtrain::logits::LogitsFile::open(&one).unwrap().source, f.source);
    // Rows split otherwise are not the same rows.
    let other = common::separable(
        &dir.path().join("o"),
        30,
        &[&split[..], &["output.shards=2", "split.seed=9"]].concat(),
    );
    let x = dir.path().join("x.logits");
    let (ok, _, err) = propagate(&[(&minilm, &words), (&pre, &other)], &x, &[]);
    assert!(!ok && err.contains("the same rows in the same order") && err.contains("is sample"), "{err}");
    assert!(!x.exists());
    // The same rows with other words are not the same rows either.
    std::fs::create_dir_all(dir.path().join("c")).unwrap();
    let tsv = std::fs::read_to_string(dir.path().join("w").join("sep.tsv")).unwrap();
    let f = common::write(&dir.path().join("c"), "sep.tsv", tsv.replace("filler", "padding").as_bytes());
    let reworded = dir.path().join("c").join("data");
    let tok = format!("tokenizer.subword.path={:?}", minilm.join("tokenizer.json").display().to_string());
    let sets = [
        &split[..],
        &[tok.as_str(), "tokenizer.subword.max_len=16", "output.shards=2", "tokenizer.buckets=4096"],
    ];
    common::run(&[&f], &[], &reworded, &sets.concat()).unwrap();
    let (ok, _, err) = propagate(&[(&minilm, &words), (&minilm, &reworded)], &x, &[]);
    assert!(!ok && err.contains("the words of the train split differ"), "{err}");
    // Each --model needs its --data.
    let (ok, _, err) = propagate(&[(&minilm, &words)], &x, &["--model", &pre.display().to_string()]);
    assert!(!ok && err.contains("2 --model and 1 --data"), "{err}");
}
