//! The `dtrain` binary as users run it: help on every command, exit codes, the demo.

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_dtrain");

fn dtrain(args: &[&str]) -> Output {
    Command::new(BIN).args(args).current_dir(env!("CARGO_MANIFEST_DIR")).output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn every_command_has_help() {
    for cmd in [
        &["--help"][..],
        &["prepare", "--help"],
        &["inspect", "--help"],
        &["verify", "--help"],
        &["demo", "--help"],
        &["bench", "--help"],
        &["bench", "prepare", "--help"],
        &["bench", "allreduce", "--help"],
        &["bench", "kernels", "--help"],
        &["bench", "encoder", "--help"],
        &["info", "--help"],
        &["embed", "--help"],
        &["pretrain", "--help"],
        &["neighbors", "--help"],
        &["train", "--help"],
        &["eval", "--help"],
        &["predict", "--help"],
        &["export-logits", "--help"],
        &["propagate", "--help"],
        &["plot", "--help"],
    ] {
        let o = dtrain(cmd);
        assert!(o.status.success(), "{cmd:?}: {}", text(&o));
        assert!(text(&o).contains("Usage: dtrain"), "{cmd:?}: {}", text(&o));
    }
    let o = dtrain(&["prepare", "--help"]);
    for flag in [
        "--input",
        "--unlabeled",
        "--out",
        "--format",
        "--labels-per-class",
        "--test-fraction",
        "--val-fraction",
        "--shards",
        "--seed",
        "--skip-bad",
        "--set",
        "--config",
    ] {
        assert!(text(&o).contains(flag), "prepare --help lacks {flag}");
    }
}

/// `dtrain info` reports every piece it looks for, whatever this machine has; without a
/// CUDA driver it says so and `bench kernels` fails with a message naming the driver.
#[test]
fn info_reports_the_cuda_libraries_and_devices_it_finds() {
    let o = dtrain(&["info"]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    // Text, which grep reads as such (MPI's version string once brought its NUL along).
    assert!(!o.stdout.contains(&0), "{t:?}");
    for line in [
        "features: mpi, cuda",
        "cpu: ",
        "launch: ",
        "mpi: Open MPI",
        "cuda driver: ",
        "nvrtc: ",
        "cublas: ",
        "nccl: ",
    ] {
        assert!(t.contains(line), "info lacks {line:?}: {t}");
    }
    if t.contains("cuda driver: none") {
        assert!(!t.contains("device cuda:") && !t.contains("gpu binding"), "{t}");
        let b = dtrain(&["bench", "kernels"]);
        assert!(!b.status.success(), "bench kernels without a driver: {}", text(&b));
        assert!(text(&b).contains("libcuda (the NVIDIA driver) was not found"), "{}", text(&b));
        // NCCL's all-reduce table needs GPU buffers: without a driver, a clear refusal;
        // on the CPU, a refusal that says what it needs.
        let b = dtrain(&["bench", "allreduce", "--backend", "nccl"]);
        assert!(
            !b.status.success() && text(&b).contains("libcuda (the NVIDIA driver) was not found"),
            "{}",
            text(&b)
        );
        let b = dtrain(&["bench", "allreduce", "--backend", "nccl", "--device", "cpu"]);
        assert!(!b.status.success() && text(&b).contains("needs --device cuda"), "{}", text(&b));
    } else {
        assert!(t.contains("device cuda:0"), "a driver but no device listed: {t}");
    }
}

/// `--device` takes cpu, auto, cuda and cuda:N, and names the choices when it is wrong.
#[test]
fn train_device_flag_is_documented_and_checked() {
    let o = dtrain(&["train", "--help"]);
    assert!(text(&o).contains("--device"), "{}", text(&o));
    let o = dtrain(&["train", "--config", "configs/smoke_gpu.toml", "--device", "gpu"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("use cpu, auto, cuda or cuda:N"), "{}", text(&o));
}

#[test]
fn prepare_inspect_verify_round_trip_and_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.tsv");
    let mut tsv = String::new();
    for i in 0..30 {
        tsv.push_str(&format!("pos\tgood movie number {i}\nneg\tbad film number {i}\n"));
    }
    std::fs::write(&input, tsv).unwrap();
    let out = dir.path().join("ds");
    let (i, o) = (input.to_str().unwrap(), out.to_str().unwrap());
    let r = dtrain(&[
        "prepare",
        "--quiet",
        "--input",
        i,
        "--out",
        o,
        "--labels-per-class",
        "5",
        "--shards",
        "2",
        "--char-ngrams",
        "3..5",
        "--set",
        "split.seed=4",
    ]);
    assert!(r.status.success(), "{}", text(&r));
    assert!(text(&r).contains("documents  60"), "{}", text(&r));

    let r = dtrain(&["inspect", o, "--samples", "2", "--split", "unlabeled", "--explain", "good movie"]);
    assert!(r.status.success(), "{}", text(&r));
    let t = text(&r);
    assert!(t.contains("char n-grams 3..5") && t.contains("\"<go\"") && t.contains("unlabeled[0:0]"), "{t}");
    // A text prepare would refuse (control characters only) is said to be refused.
    let r = dtrain(&["inspect", o, "--samples", "0", "--explain", "\u{1}\u{2}"]);
    assert!(
        r.status.success() && text(&r).contains("prepare and predict refuse such a text"),
        "{}",
        text(&r)
    );

    let r = dtrain(&["verify", o]);
    assert!(r.status.success() && text(&r).contains("all 10 files verified"), "{}", text(&r));

    // A file of the data set stands for the data set; a shard copied out of it, or beside
    // it under a name its manifest does not list, is checked alone.
    for f in ["manifest.json", "vocab.bin", "train-00001.shard"] {
        let r = dtrain(&["verify", out.join(f).to_str().unwrap()]);
        assert!(r.status.success() && text(&r).contains("all 10 files verified"), "{f}: {}", text(&r));
    }
    let r = dtrain(&["inspect", out.join("manifest.json").to_str().unwrap(), "--samples", "0"]);
    assert!(r.status.success() && text(&r).contains("dtrain data set, 2 classes"), "{}", text(&r));
    let r = dtrain(&["inspect", out.join("train-00001.shard").to_str().unwrap()]);
    assert!(r.status.success() && text(&r).contains("dtrain shard 1/2 of split `train`"), "{}", text(&r));
    // A path that is not there, a file of no kind inspect reads, and a shard that is a
    // directory are named as such (they were "manifest.json: No such file", a bare "bad
    // magic", and the OS's "No such device").
    let r = dtrain(&["inspect", dir.path().join("nowhere").to_str().unwrap()]);
    assert!(!r.status.success() && text(&r).contains("nowhere: no such file or directory"), "{}", text(&r));
    // A directory prepare did not make (it was "manifest.json: No such file or directory").
    let plain = dir.path().join("plain");
    std::fs::create_dir(&plain).unwrap();
    let r = dtrain(&["inspect", plain.to_str().unwrap()]);
    let want = "plain: is not a data set directory (one `dtrain prepare` made): it has no manifest.json";
    assert!(!r.status.success() && text(&r).contains(want), "{}", text(&r));
    // verify says the same, and names a path that is not there or is a device.
    let r = dtrain(&["verify", plain.to_str().unwrap()]);
    assert!(!r.status.success() && text(&r).contains(want) && !text(&r).contains("FAILED"), "{}", text(&r));
    let r = dtrain(&["verify", "/dev/null"]);
    assert!(
        !r.status.success() && text(&r).contains("/dev/null: not a regular file or a directory"),
        "{}",
        text(&r)
    );
    let r = dtrain(&["verify", dir.path().join("nowhere").to_str().unwrap()]);
    assert!(!r.status.success() && text(&r).contains("nowhere: no such file or directory"), "{}", text(&r));
    let notes = dir.path().join("notes.txt");
    std::fs::write(&notes, vec![b'x'; 400]).unwrap();
    let r = dtrain(&["inspect", notes.to_str().unwrap()]);
    assert!(!r.status.success() && text(&r).contains("inspect reads a data set"), "{}", text(&r));
    let shard_dir = dir.path().join("d.shard");
    std::fs::create_dir(&shard_dir).unwrap();
    let e = dtrain::data::shard::Shard::open(&shard_dir).err().unwrap().to_string();
    assert!(e.contains("d.shard") && e.contains("is not a regular file"), "{e}");
    let r = dtrain(&["inspect", shard_dir.to_str().unwrap()]);
    assert!(!r.status.success() && text(&r).contains("is a directory, not a shard file"), "{}", text(&r));
    // A data set's flags given for one file are refused, not ignored.
    let r = dtrain(&["inspect", out.join("train-00001.shard").to_str().unwrap(), "--explain", "x"]);
    assert!(
        !r.status.success() && text(&r).contains("--split and --explain read a data set"),
        "{}",
        text(&r)
    );
    let lone = dir.path().join("lone.shard");
    let stray = out.join("stray.shard");
    for copy in [&lone, &stray] {
        std::fs::copy(out.join("unlabeled-00000.shard"), copy).unwrap();
        let r = dtrain(&["verify", copy.to_str().unwrap()]);
        assert!(r.status.success() && text(&r).contains("payload checksum matches"), "{}", text(&r));
        // A flipped payload byte (the last) fails it.
        let mut bytes = std::fs::read(copy).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        std::fs::write(copy, bytes).unwrap();
        let r = dtrain(&["verify", copy.to_str().unwrap()]);
        assert!(!r.status.success() && text(&r).contains("payload checksum"), "{}", text(&r));
    }
    // The data set verifies with the stray copy beside it, and names it as a leftover.
    let r = dtrain(&["verify", o]);
    assert!(
        r.status.success() && text(&r).contains("warning stray.shard: not one of the manifest's files"),
        "{}",
        text(&r)
    );
    // With the manifest unreadable, the shards are not called leftovers (it lists nothing).
    let manifest = std::fs::read(out.join("manifest.json")).unwrap();
    std::fs::write(out.join("manifest.json"), b"garbage").unwrap();
    let r = dtrain(&["verify", o]);
    assert!(!r.status.success() && !text(&r).contains("leftover"), "{}", text(&r));
    std::fs::write(out.join("manifest.json"), manifest).unwrap();
    std::fs::remove_file(&stray).unwrap();
    let r = dtrain(&["verify", input.to_str().unwrap()]);
    assert!(!r.status.success() && text(&r).contains("takes a data set directory"), "{}", text(&r));

    // A flipped byte makes verify fail with a non-zero exit code naming the file.
    let shard = out.join("unlabeled-00000.shard");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[140] ^= 1;
    std::fs::write(&shard, bytes).unwrap();
    let r = dtrain(&["verify", o]);
    assert!(!r.status.success());
    assert!(text(&r).contains("FAILED  unlabeled-00000.shard"), "{}", text(&r));

    // Errors are one clear line and a failure code, never a panic.
    let r = dtrain(&["prepare", "--input", i, "--out", o]);
    assert!(!r.status.success() && text(&r).contains("already exists"), "{}", text(&r));
    let r = dtrain(&["prepare", "--input", i, "--out", o, "--force", "--set", "split.test_fraction=2"]);
    assert!(
        !r.status.success() && text(&r).contains("field `split.test_fraction`: must be in [0, 1)"),
        "{}",
        text(&r)
    );
    let r = dtrain(&["prepare", "--input", i, "--out", o, "--force", "--char-ngrams", "x"]);
    assert!(!r.status.success() && text(&r).contains("--char-ngrams x"), "{}", text(&r));
    let r = dtrain(&["inspect", o, "--split", "nope"]);
    assert!(!r.status.success() && text(&r).contains("--split nope"), "{}", text(&r));
    assert!(!text(&r).contains("panicked"));
}

/// A path that is not UTF-8 is refused with the flag's name, not a panic, and no output
/// directory is made under a mangled name.
#[test]
fn a_path_that_is_not_utf8_is_refused_by_flag() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join(std::ffi::OsStr::from_bytes(b"\xff.tsv"));
    let good = dir.path().join("in.tsv");
    for f in [&bad, &good] {
        std::fs::write(f, "a\tsome text\n").unwrap();
    }
    let bad_out = dir.path().join(std::ffi::OsStr::from_bytes(b"o\xff"));
    for (flag, input, out) in [("--input", &bad, dir.path().join("out")), ("--out", &good, bad_out)] {
        let o = Command::new(BIN)
            .args([
                "prepare".as_ref(),
                "--input".as_ref(),
                input.as_os_str(),
                "--out".as_ref(),
                out.as_os_str(),
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && o.status.code() != Some(101), "{flag}: {err}");
        assert!(
            err.contains(flag) && err.contains("valid UTF-8") && !err.contains("panicked"),
            "{flag}: {err}"
        );
    }
    let made: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(made.len(), 2, "nothing but the two inputs: {made:?}");
}

#[test]
fn prepare_reads_a_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let mut jsonl = String::new();
    for i in 0..20 {
        jsonl.push_str(&format!("{{\"body\": \"text number {i} of a\", \"y\": \"a\"}}\n{{\"body\": \"text number {i} of b\", \"y\": \"b\"}}\n"));
    }
    std::fs::write(&input, jsonl).unwrap();
    let cfg = dir.path().join("p.toml");
    std::fs::write(&cfg, "[input]\ntext_field = \"body\"\nlabel_field = \"y\"\n[split]\nlabels_per_class = 2\n[output]\nshards = 1\n").unwrap();
    let out = dir.path().join("ds");
    let r = dtrain(&[
        "prepare",
        "--quiet",
        "--config",
        cfg.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", text(&r));
    let m = dtrain::data::manifest::Manifest::read(&out).unwrap();
    assert_eq!(m.splits["train"].docs, 4);
    assert_eq!(m.num_shards, 1);
    // A label field that is the text field would make each text its own class: refused.
    let r = dtrain(&[
        "prepare",
        "--quiet",
        "--config",
        cfg.to_str().unwrap(),
        "--label-field",
        "body",
        "--input",
        input.to_str().unwrap(),
        "--out",
        dir.path().join("same").to_str().unwrap(),
    ]);
    assert!(
        !r.status.success()
            && text(&r).contains("input.label_field")
            && text(&r).contains("must differ from input.text_field"),
        "{}",
        text(&r)
    );
    // A config that is a device, or far larger than any config, is refused at once rather
    // than read into memory.
    let huge = dir.path().join("huge.toml");
    std::fs::File::create(&huge).unwrap().set_len(17 << 20).unwrap(); // sparse
    for (config, want) in
        [("/dev/zero", "is not a regular file"), (huge.to_str().unwrap(), "is larger than 16 MiB")]
    {
        let r = dtrain(&["train", "--config", config]);
        assert!(!r.status.success() && text(&r).contains(want), "{config}: {}", text(&r));
    }
}

#[test]
fn demo_prepares_trains_and_evaluates_the_bundled_data() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let r = dtrain(&["demo", "--quiet", "--out", out.to_str().unwrap()]);
    let t = text(&r);
    assert!(r.status.success(), "{t}");
    assert!(t.contains("documents  15638"), "{t}");
    assert!(t.contains("29 duplicates"), "{t}");
    assert!(t.contains("all 34 files verified"), "{t}");
    assert!(t.contains("test: 3130 documents"), "{t}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let acc = report["accuracy"].as_f64().unwrap();
    let png = std::fs::read(out.join("curves.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000, "a real PNG");
    // 15 classes: chance is about 1/15; the fastText CLI reaches 16.9% with 20 labels per class.
    assert!(acc > 0.15, "test accuracy {acc}");
}

/// The demo replaces its data/ and supervised/ on every start, so it refuses a directory it
/// did not make: one holding other files, or a run of the same names without its marker.
#[test]
fn demo_refuses_a_directory_it_did_not_make() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mine");
    std::fs::create_dir_all(out.join("supervised/checkpoints")).unwrap();
    for extra in [Some("notes.txt"), None] {
        if let Some(f) = extra {
            std::fs::write(out.join(f), b"keep").unwrap();
        }
        let r = dtrain(&["demo", "--quiet", "--out", out.to_str().unwrap()]);
        let t = text(&r);
        assert!(!r.status.success() && t.contains("not a directory the demo made"), "{t}");
        if let Some(f) = extra {
            std::fs::remove_file(out.join(f)).unwrap();
        }
    }
    assert!(out.join("supervised/checkpoints").is_dir(), "nothing was removed");
    // An earlier demo's run holding a file of the user's is refused too (it was deleted).
    std::fs::write(out.join("DEMO"), b"made by dtrain demo\n").unwrap();
    std::fs::write(out.join("supervised/mynotes.txt"), b"keep").unwrap();
    let r = dtrain(&["demo", "--quiet", "--out", out.to_str().unwrap()]);
    let t = text(&r);
    assert!(!r.status.success() && t.contains("its supervised/ run, holds other files"), "{t}");
    assert_eq!(std::fs::read(out.join("supervised/mynotes.txt")).unwrap(), b"keep");
    std::fs::remove_file(out.join("supervised/mynotes.txt")).unwrap();
    // The lock file an earlier demo's run leaves is the demo's own (the config error below
    // comes after the check of what the directory holds).
    std::fs::write(out.join("supervised").join(dtrain::fsutil::RUN_LOCK), b"").unwrap();
    // A bad training config is refused before the data set is prepared or the run removed
    // (it used to be read after both).
    std::fs::write(out.join("report.json"), b"{}").unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, b"method = \"bogus\"\n").unwrap();
    let r =
        dtrain(&["demo", "--quiet", "--out", out.to_str().unwrap(), "--train-config", bad.to_str().unwrap()]);
    let t = text(&r);
    assert!(!r.status.success() && t.contains("bogus"), "{t}");
    assert!(
        out.join("supervised/checkpoints").is_dir()
            && out.join("report.json").is_file()
            && !out.join("data").exists()
    );
    // A file as --out is named as one.
    let file = dir.path().join("afile");
    std::fs::write(&file, b"x").unwrap();
    let r = dtrain(&["demo", "--quiet", "--out", file.to_str().unwrap()]);
    assert!(!r.status.success() && text(&r).contains("is a file, not a directory"), "{}", text(&r));
}

/// configs/prepare.example.toml parses, equals the defaults (plus an input file and its
/// labels_per_class line uncommented), and mentions every field the config type has.
#[test]
fn example_config_documents_every_field() {
    use dtrain::config::{load, Override, PrepareConfig};
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/prepare.example.toml");
    let cfg: PrepareConfig =
        load(Some(&path), &[Override::parse("input.labeled=[\"x.tsv\"]").unwrap()]).unwrap();
    let mut want = PrepareConfig::default();
    want.input.labeled = vec!["x.tsv".into()];
    want.output.dir = "runs/example/data".into();
    assert_eq!(cfg, want, "the example's values must be the defaults");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut full = PrepareConfig::default();
    full.split.labels_per_class = Some(1);
    let tree = toml::Value::try_from(&full).unwrap();
    for (section, fields) in tree.as_table().unwrap() {
        assert!(text.contains(&format!("[{section}]")), "section [{section}] undocumented");
        for field in fields.as_table().unwrap().keys() {
            assert!(
                text.contains(&format!("\n{field} =")) || text.contains(&format!("# {field} =")),
                "field {section}.{field} undocumented"
            );
        }
    }
}

/// configs/train.example.toml parses, equals the defaults, and documents every field.
#[test]
fn train_example_config_documents_every_field() {
    use dtrain::config::{load, TrainConfig};
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/train.example.toml");
    let cfg: TrainConfig = load(Some(&path), &[]).unwrap();
    let mut want = TrainConfig::default();
    want.data.dir = "runs/example/data".into();
    want.train.out_dir = "runs/example/supervised".into();
    assert_eq!(cfg, want, "the example's values must be the defaults");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut full = TrainConfig::default();
    full.train.steps = Some(1);
    full.unlabeled.ratio = Some(1);
    full.mean_teacher.alpha_late = Some(0.999);
    full.noisy_student.logits = Some("x".into());
    full.mpl.logits = Some("x".into());
    full.mpl.train_logits = Some("x".into());
    full.mpl.teacher = Some(Default::default());
    full.mpl.teacher_optim = Some(Default::default());
    let c = &mut full.consistency;
    c.kind = Some(dtrain::algo::consistency::ConsistencyKind::Mse);
    (c.weight, c.scale_by_labeled_ratio, c.temperature) = (Some(1.0), Some(true), Some(1.0));
    (c.threshold, c.ramp_epochs) = (Some(0.0), Some(1.0));
    let tree = toml::Value::try_from(&full).unwrap();
    for (section, fields) in tree.as_table().unwrap() {
        let Some(fields) = fields.as_table() else {
            assert!(text.contains(&format!("\n{section} =")), "top-level field {section} undocumented");
            continue;
        };
        assert!(text.contains(&format!("[{section}]")), "section [{section}] undocumented");
        for field in fields.keys() {
            let documented = text.contains(&format!("\n{field} ="))
                || text.contains(&format!("# {field} ="))
                || text.contains(&format!("[{section}.{field}]"));
            assert!(documented, "field {section}.{field} undocumented");
        }
    }
    // Every shipped training config loads.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/brown");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().is_some_and(|n| n != "prepare.toml" && n != "pretrain.toml" && n != "mlm.toml") {
            load::<TrainConfig>(Some(&path), &[]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
    }
}

/// configs/pretrain.example.toml parses, equals the defaults, and documents every field;
/// the shipped pretraining config loads.
#[test]
fn pretrain_example_config_documents_every_field() {
    use dtrain::config::{load, PretrainConfig};
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = root.join("configs/pretrain.example.toml");
    let cfg: PretrainConfig = load(Some(&path), &[]).unwrap();
    let mut want = PretrainConfig::default();
    want.data.dir = "runs/example/data".into();
    want.train.out_dir = "runs/example/pretrain".into();
    assert_eq!(cfg, want, "the example's values must be the defaults");
    let text = std::fs::read_to_string(&path).unwrap();
    let tree = toml::Value::try_from(&want).unwrap();
    for (section, fields) in tree.as_table().unwrap() {
        assert!(text.contains(&format!("[{section}]")), "section [{section}] undocumented");
        for field in fields.as_table().unwrap().keys() {
            assert!(text.contains(&format!("\n{field} =")), "field {section}.{field} undocumented");
        }
    }
    load::<PretrainConfig>(Some(&root.join("configs/brown/pretrain.toml")), &[]).unwrap();
    load::<PretrainConfig>(Some(&root.join("configs/brown/mlm.toml")), &[]).unwrap();
}

/// `dtrain pretrain` then `dtrain neighbors` from the command line, on a tiny corpus.
#[test]
fn pretrain_and_neighbors_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut corpus = String::new();
    for i in 0..200 {
        corpus.push_str(if i % 2 == 0 {
            "red green blue red green blue\n"
        } else {
            "cat dog cow cat dog cow\n"
        });
    }
    let input = dir.path().join("u.txt");
    std::fs::write(&input, corpus).unwrap();
    let data = dir.path().join("data");
    let d = data.to_str().unwrap();
    let o = dtrain(&[
        "--quiet",
        "prepare",
        "--unlabeled",
        input.to_str().unwrap(),
        "--out",
        d,
        "--buckets",
        "4096",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let out = dir.path().join("pre");
    let cfg = dir.path().join("pre.toml");
    std::fs::write(
        &cfg,
        format!(
            "[data]\ndir = {:?}\n[model]\ndim = 8\nmin_count = 1\nsubsample = 0.0\nchar_ngram_max = 0\n[train]\nout_dir = {:?}\nthreads = 1\n",
            d,
            out.to_str().unwrap()
        ),
    )
    .unwrap();
    let o = dtrain(&["--quiet", "pretrain", "--config", cfg.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("6 of 6 words trained"), "{}", text(&o));
    let o = dtrain(&["neighbors", "--model", out.to_str().unwrap(), "-k", "2", "RED", "cat"]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    let lines: Vec<&str> = t.lines().collect();
    assert_eq!(lines.len(), 6, "{t}");
    assert_eq!(lines[0], "red:");
    assert_eq!(lines[3], "cat:");
    for l in &lines[1..3] {
        assert!(l.ends_with("green") || l.ends_with("blue"), "{t}");
    }
    // A query with no word fails the command (after the others are listed), saying so on
    // stderr (stdout holds only neighbour lists); -k 0 is refused.
    let o = dtrain(&["neighbors", "--model", out.to_str().unwrap(), "-k", "2", "red", ""]);
    let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(
        !o.status.success() && stdout.contains("red:") && stderr.contains("holds no word"),
        "{}",
        text(&o)
    );
    assert!(!stdout.contains("holds"), "{stdout}");
    // So does one of two words (only the first was looked up).
    let o = dtrain(&["neighbors", "--model", out.to_str().unwrap(), "-k", "2", "red cat"]);
    let t = text(&o);
    assert!(
        !o.status.success() && t.contains("\"red cat\": holds 2 words; give one word per argument"),
        "{t}"
    );
    let o = dtrain(&["neighbors", "--model", out.to_str().unwrap(), "-k", "0", "red"]);
    assert!(!o.status.success() && text(&o).contains("-k 0"), "{}", text(&o));
    // A bad config names its field.
    let o = dtrain(&["pretrain", "--config", cfg.to_str().unwrap(), "--set", "model.window=0"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("model.window"), "{}", text(&o));
    // Skip-gram has no GPU path: --device cuda is refused (it once ran on the CPU, exit 0).
    let o = dtrain(&["pretrain", "--config", cfg.to_str().unwrap(), "--device", "cuda"]);
    assert!(
        !o.status.success() && text(&o).contains("skip-gram and CBOW pretraining run on the CPU only"),
        "{}",
        text(&o)
    );
}

/// `inspect` names a pretrained model's directory as what it is (it once called it a
/// training checkpoint).
#[test]
fn inspect_names_a_pretrained_encoder() {
    let o = dtrain(&["inspect", "models/minilm"]);
    assert!(!o.status.success() && text(&o).contains("a pretrained encoder"), "{}", text(&o));
}

/// A thread count far past the cores is refused at once (rayon would spawn them all first),
/// and so is a value that is no count.
#[test]
fn an_absurd_thread_count_is_refused() {
    let o = Command::new(BIN).arg("info").env("RAYON_NUM_THREADS", "99999999").output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.code() == Some(1) && err.contains("RAYON_NUM_THREADS=99999999: at most"), "{err}");
    // So is one that is no count (rayon would quietly take every core).
    for v in ["abc", "-1"] {
        let o = Command::new(BIN).arg("info").env("RAYON_NUM_THREADS", v).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.code() == Some(1) && err.contains("must be a thread count"), "{v}: {err}");
    }
}

/// A stdout that cannot be written (a full disk) ends the command with an error line and
/// status 1, not a panic.
#[test]
fn a_full_stdout_is_an_error_not_a_panic() {
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    let o = Command::new(BIN).arg("info").stdout(full).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("error: failed printing to stdout") && !err.contains("panicked"), "{err}");
}

#[test]
fn a_closed_pipe_ends_the_output_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ds");
    let input = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/brown_genre.tsv.gz");
    let script = format!(
        "{} prepare --input {} --out {} --labels-per-class 5 | head -c 10 >/dev/null; echo \"prepare: ${{PIPESTATUS[0]}}\" >&2; \
         {} inspect {} --samples 500 | head -n 1; echo \"inspect: ${{PIPESTATUS[0]}}\" >&2",
        BIN,
        input.display(),
        out.display(),
        BIN,
        out.display()
    );
    let o = Command::new("bash").args(["-c", &script]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{err}");
    // Both commands wrote into a pipe that closed early and ended as Unix tools do there:
    // with success, or killed by SIGPIPE (status 141), not with an error; prepare's data set
    // is whole (its report comes after the files), inspect's first line came through.
    for cmd in ["prepare", "inspect"] {
        assert!(err.contains(&format!("{cmd}: 0")) || err.contains(&format!("{cmd}: 141")), "{err}");
    }
    assert!(out.join("manifest.json").is_file());
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
}

/// `dtrain bench encoder` on the CPU at bf16 products: the JSON says where and at which
/// precision it ran, with the FLOP count of the documented formula; a precision it does not
/// know is refused by name.
#[test]
fn bench_encoder_reports_device_precision_and_flops() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("enc.json");
    let o = dtrain(&[
        "bench",
        "encoder",
        "--model",
        "models/minilm",
        "--batch",
        "2",
        "--len",
        "8",
        "--repeat",
        "1",
        "--matmul",
        "bf16",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("GFLOP/s"), "{}", text(&o));
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(r["device"], "cpu");
    assert_eq!(r["matmul"], "bf16");
    // MiniLM: 6 layers, hidden 384, MLP 1536; 2 x 8 tokens.
    let want = 2.0 * 16.0 * 6.0 * (4.0 * 384.0 * 384.0 + 2.0 * 384.0 * 1536.0 + 2.0 * 8.0 * 384.0);
    assert_eq!(r["forward_flops"].as_f64().unwrap(), want);
    assert!(r["forward_backward"]["median"].as_f64().unwrap() > 0.0);
    let o = dtrain(&["bench", "encoder", "--model", "models/minilm", "--matmul", "fp8"]);
    assert!(!o.status.success() && text(&o).contains("use f32, tf32 or bf16"), "{}", text(&o));
    // An empty batch is refused by the flag (it once panicked in the model).
    let o = dtrain(&["bench", "encoder", "--model", "models/minilm", "--batch", "0"]);
    assert!(
        !o.status.success() && text(&o).contains("--batch") && !text(&o).contains("panicked"),
        "{}",
        text(&o)
    );
    // Activations beyond memory (9 TiB) are refused before allocating (they once aborted).
    let o = dtrain(&["bench", "encoder", "--model", "models/minilm", "--batch", "65536", "--len", "512"]);
    let t = text(&o);
    assert!(
        o.status.code() == Some(1)
            && t.contains("field `--batch`")
            && t.contains("the activations (about) 9411.0 GiB"),
        "{t}"
    );
}

/// `bench prepare` writes to a temporary directory: --out and --force are refused rather than
/// ignored (its help says so), and --repeat has bounds.
#[test]
fn bench_prepare_refuses_out_and_unbounded_repeats() {
    let o = dtrain(&["bench", "prepare", "--input", "data/brown_genre.tsv.gz", "--out", "/tmp/x"]);
    assert!(
        o.status.code() == Some(1) && text(&o).contains("--out /tmp/x: bench prepare writes to a temporary"),
        "{}",
        text(&o)
    );
    let o = dtrain(&["bench", "prepare", "--input", "data/brown_genre.tsv.gz", "--force"]);
    assert!(o.status.code() == Some(1) && text(&o).contains("--force: bench prepare"), "{}", text(&o));
    let o = dtrain(&["bench", "prepare", "--help"]);
    assert!(text(&o).contains("but --out and --force"), "{}", text(&o));
    let o = dtrain(&["bench", "prepare", "--input", "data/brown_genre.tsv.gz", "--repeat", "0"]);
    assert!(
        o.status.code() == Some(1) && text(&o).contains("--repeat`: must be in 1..=100000"),
        "{}",
        text(&o)
    );
}

/// `bench allreduce` sizes beyond 1 TiB, or beyond memory, are refused (they once panicked
/// with a capacity overflow or were killed by the kernel).
#[test]
fn bench_allreduce_refuses_sizes_beyond_memory() {
    let max = u64::MAX.to_string();
    let o = dtrain(&["bench", "allreduce", "--min-bytes", &max, "--max-bytes", &max]);
    assert!(o.status.code() == Some(1) && text(&o).contains("itself at most 1 TiB"), "{}", text(&o));
    let o = dtrain(&["bench", "allreduce", "--max-bytes", "1099511627776"]);
    assert!(o.status.code() == Some(1) && text(&o).contains("field `--max-bytes`"), "{}", text(&o));
}

/// The Slurm scripts start dtrain through srun with `--resume auto` (and `--device auto` on
/// GPUs) unless the options after run.toml give their own: a repeated flag would make
/// clap refuse the job. `srun` here is a stand-in that prints its arguments.
#[test]
fn slurm_scripts_pass_defaults_the_user_can_override() {
    let dir = tempfile::tempdir().unwrap();
    let srun = dir.path().join("srun");
    std::fs::write(&srun, "#!/bin/sh\nfor a in \"$@\"; do echo \"$a\"; done\n").unwrap();
    std::fs::set_permissions(&srun, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", dir.path().display(), std::env::var("PATH").unwrap_or_default());
    let root = env!("CARGO_MANIFEST_DIR");
    for (script, gpu) in [("cpu", false), ("gpu-1node", true), ("gpu-nnodes", true)] {
        let sbatch = |extra: &[&str], command: Option<&str>| -> Output {
            let mut c = Command::new("bash");
            c.arg(format!("launch/slurm/{script}.sbatch")).arg("run.toml").args(extra);
            c.current_dir(root).env("PATH", &path).env("DTRAIN_BIN", BIN).env_remove("DTRAIN_COMMAND");
            if let Some(command) = command {
                c.env("DTRAIN_COMMAND", command);
            }
            c.output().unwrap()
        };
        let args = |extra: &[&str]| -> Vec<String> {
            let o = sbatch(extra, None);
            assert!(o.status.success(), "{script}: {}", text(&o));
            String::from_utf8_lossy(&o.stdout).lines().map(str::to_owned).collect()
        };
        let count = |a: &[String], flag: &str| a.iter().filter(|x| x.starts_with(flag)).count();
        let plain = args(&[]);
        let at = plain.iter().position(|a| a == BIN).expect("the binary is srun's command");
        assert_eq!(plain[at + 1..at + 4], ["train", "--config", "run.toml"], "{script}: {plain:?}");
        assert!(plain.windows(2).any(|w| w == ["--resume", "auto"]), "{script}: {plain:?}");
        assert_eq!(plain.windows(2).any(|w| w == ["--device", "auto"]), gpu, "{script}: {plain:?}");
        let own = args(&["--resume", "no", "--device=cpu", "--set", "optim.lr=0.1"]);
        assert_eq!((count(&own, "--resume"), count(&own, "--device")), (1, 1), "{script}: {own:?}");
        assert!(own.windows(2).any(|w| w == ["--resume", "no"]) && own.contains(&"--device=cpu".to_owned()));
        assert!(own.ends_with(&["--set".to_owned(), "optim.lr=0.1".to_owned()]), "{script}: {own:?}");
        // DTRAIN_COMMAND=pretrain runs pretraining (skip-gram, CBOW or masked-LM) instead;
        // another command is refused before srun.
        let o = sbatch(&[], Some("pretrain"));
        let got = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success() && got.contains(&format!("{BIN}\npretrain\n--config\nrun.toml\n")),
            "{got}"
        );
        let o = sbatch(&[], Some("eval"));
        assert!(
            o.status.code() == Some(2)
                && text(&o)
                    .contains(&format!("{script}.sbatch: DTRAIN_COMMAND=eval: expected train or pretrain"))
                && o.stdout.is_empty(),
            "{script}: {}",
            text(&o)
        );
    }
}
