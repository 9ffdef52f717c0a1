//! Small helpers shared by the integration tests: writing input files and running prepare.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};

use dtrain::config::{self, Override, PrepareConfig};
use dtrain::data::prepare::{prepare, PrepareReport};

/// Copies the files of directory `src` (not its subdirectories) into a new directory `dst`.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

/// A copy of the data set `data` at `dst` whose `unlabeled-00000.shard` had `edit` applied
/// to its bytes (the header's checksum left as it was), asserting that the edit changed it.
pub fn damaged_copy(data: &Path, dst: &Path, edit: impl FnOnce(&mut Vec<u8>)) {
    copy_dir(data, dst);
    let shard = dst.join("unlabeled-00000.shard");
    let mut b = std::fs::read(&shard).unwrap();
    edit(&mut b);
    assert_ne!(b, std::fs::read(&shard).unwrap(), "the edit changes the shard");
    std::fs::write(&shard, &b).unwrap();
}

/// Writes `text` to `dir/name`, gzipped when the name ends in `.gz`.
pub fn write(dir: &Path, name: &str, text: &[u8]) -> PathBuf {
    let path = dir.join(name);
    if name.ends_with(".gz") {
        let f = std::fs::File::create(&path).unwrap();
        let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
        gz.write_all(text).unwrap();
        gz.finish().unwrap();
    } else {
        std::fs::write(&path, text).unwrap();
    }
    path
}

/// A prepare config from `key=value` overrides (as after `--set`).
pub fn config(sets: &[String]) -> dtrain::Result<PrepareConfig> {
    let o: Vec<Override> = sets.iter().map(|s| Override::parse(s).unwrap()).collect();
    config::load(None, &o)
}

/// Runs prepare on `labeled` (and `unlabeled`) files into `out` with extra `key=value` sets.
pub fn run(
    labeled: &[&Path],
    unlabeled: &[&Path],
    out: &Path,
    extra: &[&str],
) -> dtrain::Result<PrepareReport> {
    let list = |ps: &[&Path]| {
        format!(
            "[{}]",
            ps.iter().map(|p| format!("{:?}", p.display().to_string())).collect::<Vec<_>>().join(", ")
        )
    };
    let mut sets = vec![format!("output.dir={:?}", out.display().to_string())];
    if !labeled.is_empty() {
        sets.push(format!("input.labeled={}", list(labeled)));
    }
    if !unlabeled.is_empty() {
        sets.push(format!("input.unlabeled={}", list(unlabeled)));
    }
    sets.extend(extra.iter().map(|s| s.to_string()));
    prepare(&config(&sets)?, false)
}

/// A labeled TSV of `classes` classes with `per_class` distinct documents each; document j
/// of class c is `c{c} doc {j} words …`.
pub fn tsv(classes: usize, per_class: usize) -> String {
    let mut s = String::new();
    for j in 0..per_class {
        for c in 0..classes {
            s.push_str(&format!("class{c}\tc{c} doc {j} shared words here number {}\n", j * 31 + c));
        }
    }
    s
}

/// `lines` lines of 8 words; line i draws its words from topic `i mod topics.len()` (by a
/// fixed generator seeded with `seed`), so words co-occur only within their topic.
pub fn topic_lines<'a>(topics: &[&[&'a str]], lines: usize, seed: u64) -> Vec<Vec<&'a str>> {
    let mut x = seed;
    let mut next = |n: usize| {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((x >> 33) % n as u64) as usize
    };
    (0..lines)
        .map(|line| {
            let topic = topics[line % topics.len()];
            (0..8).map(|_| topic[next(topic.len())]).collect()
        })
        .collect()
}

/// Every tensor of every safetensors file of a checkpoint directory, by file and name.
pub fn tensors(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut names: Vec<String> = st.names().into_iter().map(|n| n.to_string()).collect();
        names.sort();
        for n in names {
            let t = st.tensor(&n).unwrap();
            let v: Vec<f32> = bytemuck::pod_collect_to_vec(t.data());
            out.push((format!("{}:{n}", f.file_name().unwrap().to_string_lossy()), v));
        }
    }
    assert!(!out.is_empty(), "no tensors in {}", dir.display());
    out
}

/// The largest relative error ‖a − b‖/‖a‖ over the tensors of two checkpoints (same files
/// and names required).
pub fn max_rel_err(a: &Path, b: &Path) -> f64 {
    let (ta, tb) = (tensors(a), tensors(b));
    assert_eq!(
        ta.iter().map(|t| &t.0).collect::<Vec<_>>(),
        tb.iter().map(|t| &t.0).collect::<Vec<_>>(),
        "{} and {} hold different tensors",
        a.display(),
        b.display()
    );
    let mut worst = 0.0f64;
    for ((name, x), (_, y)) in ta.iter().zip(&tb) {
        assert_eq!(x.len(), y.len(), "{name}");
        let d: f64 = x.iter().zip(y).map(|(&p, &q)| (f64::from(p) - f64::from(q)).powi(2)).sum();
        let n: f64 = x.iter().map(|&p| f64::from(p).powi(2)).sum();
        if n > 0.0 {
            worst = worst.max((d / n).sqrt());
        } else {
            assert!(d == 0.0, "{name}: zero in one run, not in the other");
        }
    }
    worst
}

pub fn last_checkpoint(out: &Path) -> PathBuf {
    dtrain::checkpoint::latest(&out.join("checkpoints")).unwrap().expect("a checkpoint")
}

/// A training config on `data` writing to `out`, with `sets` (`key=value`) on top.
pub fn train_config(data: &Path, out: &Path, sets: &[&str]) -> dtrain::config::TrainConfig {
    let mut o = vec![
        Override::parse(&format!("data.dir={:?}", data.display().to_string())).unwrap(),
        Override::parse(&format!("train.out_dir={:?}", out.display().to_string())).unwrap(),
    ];
    o.extend(sets.iter().map(|s| Override::parse(s).unwrap()));
    config::load(None, &o).unwrap()
}

/// Trains `cfg` in this process on the CPU, without a progress bar.
pub fn train_run(
    cfg: &dtrain::config::TrainConfig,
    resume: dtrain::train::Resume,
    stop_after: Option<u64>,
) -> dtrain::Result<dtrain::train::TrainReport> {
    let opts = dtrain::train::RunOptions { resume, progress: false, stop_after, device: Default::default() };
    dtrain::train::train(cfg, &opts)
}

/// Masked-LM pretraining of `cfg` in this process on the CPU, without a progress bar.
pub fn mlm(
    cfg: &dtrain::config::PretrainConfig,
    resume: dtrain::train::Resume,
) -> dtrain::Result<dtrain::pretrain::mlm::MlmReport> {
    mlm_until(cfg, resume, None)
}

/// [`mlm`], stopping after `stop_after` steps in all (with a checkpoint).
pub fn mlm_until(
    cfg: &dtrain::config::PretrainConfig,
    resume: dtrain::train::Resume,
    stop_after: Option<u64>,
) -> dtrain::Result<dtrain::pretrain::mlm::MlmReport> {
    let opts = dtrain::pretrain::mlm::MlmOptions { resume, progress: false, stop_after };
    dtrain::pretrain::mlm::pretrain(cfg, &opts, Default::default(), &dtrain::dist::Dist::single())
}

/// models/minilm (`launch/fetch-model minilm`, which launch/setup runs).
pub fn minilm() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/minilm");
    assert!(
        dir.join("model.safetensors").exists(),
        "{} is missing: run launch/fetch-model minilm",
        dir.display()
    );
    dir
}

/// A data set of 3 classes, each with its own words plus shared filler words: `per_class`
/// documents per class, prepared into `dir/data` with 4096 buckets and `extra` settings.
pub fn separable(dir: &Path, per_class: usize, extra: &[&str]) -> PathBuf {
    separable_padded(dir, per_class, 0, extra)
}

/// [`separable`] with documents of uneven length: document j of each class carries
/// j mod (`ragged` + 1) more filler words, so batches pad differently.
pub fn separable_padded(dir: &Path, per_class: usize, ragged: usize, extra: &[&str]) -> PathBuf {
    let mut tsv = String::new();
    let words = [["alpha", "apple", "amber"], ["beta", "banana", "blue"], ["gamma", "grape", "green"]];
    for j in 0..per_class {
        let more = " filler".repeat(j % (ragged + 1));
        for (c, w) in words.iter().enumerate() {
            tsv.push_str(&format!(
                "c{c}\t{} {} common filler {j} {}{more}\n",
                w[j % 3],
                w[(j + 1) % 3],
                j * 7 + c
            ));
        }
    }
    let f = write(dir, "sep.tsv", tsv.as_bytes());
    let out = dir.join("data");
    run(&[&f], &[], &out, &[&["tokenizer.buckets=4096"], extra].concat()).unwrap();
    out
}

/// A small encoder from scratch (hidden 16, 2 heads, MLP 32) with `layers` layers, both
/// dropouts at 0.1, AdamW at 0.003: the settings of the tests that compare encoder runs.
pub fn small_encoder(layers: usize) -> Vec<String> {
    let mut v: Vec<String> = [
        "model.kind=\"encoder\"",
        "model.encoder.hidden=16",
        "model.encoder.heads=2",
        "model.encoder.intermediate=32",
        "model.encoder.dropout=0.1",
        "model.encoder.attention_dropout=0.1",
        "optim.kind=\"adamw\"",
        "optim.lr=0.003",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push(format!("model.encoder.layers={layers}"));
    v
}

/// Runs the dtrain binary quietly with `args`: whether it succeeded, its stdout, its stderr.
pub fn dtrain<S: AsRef<std::ffi::OsStr>>(args: impl IntoIterator<Item = S>) -> (bool, String, String) {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_dtrain"))
        .arg("--quiet")
        .args(args)
        .output()
        .expect("the dtrain binary runs");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}
