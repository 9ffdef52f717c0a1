//! Skip-gram/CBOW pretraining end to end on small data: it learns co-occurrence, it resumes
//! bit for bit, its files are checked, and `model.init_from` loads it into a classifier.

mod common;

use std::path::{Path, PathBuf};

use dtrain::config::{self, Override, PretrainConfig, TrainConfig};
use dtrain::data::dataset::Dataset;
use dtrain::data::tokenize::Tokenizer;
use dtrain::pretrain::embeddings::{self, EMBEDDINGS_FILE, WORDS_FILE};
use dtrain::pretrain::{pretrain, PretrainOptions, PretrainReport};
use dtrain::train::{train, Resume, RunOptions};

const FRUIT: [&str; 5] = ["apple", "banana", "cherry", "grape", "melon"];
const TOOLS: [&str; 5] = ["engine", "piston", "valve", "gear", "brake"];

/// An unlabeled corpus of two topics: each line draws 8 words from one topic's five, so
/// words co-occur only within their topic. Also a small labeled file (class = topic) so the
/// data set can train a classifier; the pool's labels are kept, with 4 labels per class.
fn corpus(dir: &Path, extra: &[&str]) -> PathBuf {
    let (mut unl, mut lab) = (String::new(), String::new());
    for (line, words) in common::topic_lines(&[&FRUIT, &TOOLS], 600, 12345).iter().enumerate() {
        unl.push_str(&words.join(" "));
        unl.push('\n');
        if line < 80 {
            lab.push_str(&format!("{}\t{} number{line}\n", line % 2, words[..4].join(" ")));
        }
    }
    let u = common::write(dir, "unlabeled.txt", unl.as_bytes());
    let l = common::write(dir, "labeled.tsv", lab.as_bytes());
    let out = dir.join("data");
    let mut sets = vec!["output.shards=2", "tokenizer.buckets=4096", "split.labels_per_class=4"];
    sets.extend_from_slice(extra);
    common::run(&[&l], &[&u], &out, &sets).unwrap();
    out
}

/// The settings of [`corpus`]'s preparation.
const CORPUS_SETS: [&str; 3] = ["output.shards=2", "tokenizer.buckets=4096", "split.labels_per_class=4"];

/// [`corpus`] with one more unlabeled line of words found nowhere else ("zzyzx quuxly"),
/// prepared as `dir/name`: (labeled file, unlabeled file, data set).
fn corpus_with_a_stranger(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    corpus(dir, &[]);
    let mut unl = std::fs::read_to_string(dir.join("unlabeled.txt")).unwrap();
    unl.push_str("zzyzx quuxly\n");
    let u = common::write(dir, "unlabeled.txt", unl.as_bytes());
    let l = dir.join("labeled.tsv");
    let data = dir.join(name);
    common::run(&[&l], &[&u], &data, &CORPUS_SETS).unwrap();
    (l, u, data)
}

/// Checks a propagate logits file of [`corpus_with_a_stranger`]'s unlabeled split against
/// it: at least 20 pool rows with a hidden label, at least 90% of them right by the argmax
/// (chance is one half; the topics share no word), and one row of uniform logits (the
/// stranger line, which no label reaches).
fn assert_pool_spread(data: &Path, logits: &Path) {
    let ds = Dataset::open(data).unwrap();
    let split = dtrain::data::shard::SplitKind::Unlabeled;
    let f = dtrain::logits::LogitsFile::open(logits).unwrap();
    f.check_matches(&ds, split).unwrap();
    let (mut n, mut right, mut uniform) = (0, 0, 0);
    for (si, shard) in ds.shards(split).iter().enumerate() {
        for i in 0..shard.len() {
            let z = f.row(dtrain::data::loader::RowId { split, shard: si as u32, row: i as u32 });
            uniform += usize::from(z.iter().all(|&v| (v - z[0]).abs() < 1e-6));
            if let Some(l) = shard.hidden_label(i) {
                n += 1;
                right += usize::from(dtrain::backend::argmax(z) == l as usize);
            }
        }
    }
    assert!(n >= 20, "{n} pool rows");
    assert!(right * 10 >= n * 9, "only {right} of {n} pool rows labeled right");
    assert_eq!(uniform, 1, "only the zzyzx row has no label: {uniform} uniform rows");
}

fn cfg(data: &Path, out: &Path, extra: &[&str]) -> PretrainConfig {
    let mut o = vec![
        Override::parse(&format!("data.dir={:?}", data.display().to_string())).unwrap(),
        Override::parse(&format!("train.out_dir={:?}", out.display().to_string())).unwrap(),
        Override::parse("model.dim=16").unwrap(),
        Override::parse("model.min_count=1").unwrap(),
        Override::parse("model.subsample=0").unwrap(),
        Override::parse("model.window=3").unwrap(),
        Override::parse("model.char_ngram_max=0").unwrap(),
        Override::parse("train.threads=1").unwrap(),
        Override::parse("train.epochs=4").unwrap(),
    ];
    o.extend(extra.iter().map(|s| Override::parse(s).unwrap()));
    config::load(None, &o).unwrap()
}

fn run(cfg: &PretrainConfig, resume: Resume, stop_after: Option<u32>) -> dtrain::Result<PretrainReport> {
    pretrain(cfg, &PretrainOptions { resume, progress: false, stop_after })
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>() / (n(a) * n(b))
}

#[test]
fn skipgram_and_cbow_learn_which_words_share_contexts() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path(), &[]);
    for objective in ["skipgram", "cbow"] {
        let out = dir.path().join(objective);
        let r =
            run(&cfg(&data, &out, &[&format!("model.objective=\"{objective}\"")]), Resume::No, None).unwrap();
        assert_eq!(r.epochs, 4);
        assert!(r.loss.is_finite() && r.loss > 0.0);
        // 10 topic words plus the labeled file's `numberN` tokens.
        assert!(r.trained_words >= 10);
        let emb = embeddings::read(&out).unwrap();
        let tok = emb.tokenizer();
        let mut feats = Vec::new();
        let vec = |w: &str, feats: &mut Vec<u32>| {
            let mut v = vec![0.0; 16];
            emb.vector(&tok, w, feats, &mut v);
            v
        };
        let (mut within, mut across, mut n_within, mut n_across) = (0.0, 0.0, 0, 0);
        for (i, a) in FRUIT.iter().chain(&TOOLS).enumerate() {
            for (j, b) in FRUIT.iter().chain(&TOOLS).enumerate().skip(i + 1) {
                let c = cosine(&vec(a, &mut feats), &vec(b, &mut feats));
                if (i < 5) == (j < 5) {
                    within += c;
                    n_within += 1;
                } else {
                    across += c;
                    n_across += 1;
                }
            }
        }
        let (within, across) = (within / n_within as f32, across / n_across as f32);
        assert!(within > across + 0.5, "{objective}: within-topic cosine {within}, across {across}");
        // The nearest neighbours of a fruit are fruits.
        let units = emb.unit_vectors();
        let (word, list) = emb.neighbors(&units, "Apple", 4).unwrap();
        assert_eq!(word, "apple", "the query is lower-cased as the tokenizer does");
        // (The labeled lines' `numberN` tokens also occur among fruit words.)
        for (w, _) in &list {
            assert!(!TOOLS.contains(&w.as_str()), "{objective}: {list:?}");
        }
        assert!(FRUIT.contains(&list[0].0.as_str()), "{objective}: {list:?}");
        assert!(list.iter().all(|(w, _)| w != "apple"));
        assert!(emb.neighbors(&units, "   ", 4).is_none());
    }
}

#[test]
fn one_thread_is_deterministic_and_resume_is_bitwise_identical() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path(), &[]);
    let bytes = |d: &Path| std::fs::read(d.join(EMBEDDINGS_FILE)).unwrap();
    let a = dir.path().join("a");
    run(&cfg(&data, &a, &[]), Resume::No, None).unwrap();
    assert!(!a.join("checkpoints").exists(), "checkpoints are deleted once the output is written");
    let again = dir.path().join("again");
    run(&cfg(&data, &again, &[]), Resume::No, None).unwrap();
    assert_eq!(bytes(&a), bytes(&again), "a one-thread run is a function of config and data");
    let seed2 = dir.path().join("seed2");
    run(&cfg(&data, &seed2, &["train.seed=2"]), Resume::No, None).unwrap();
    assert_ne!(bytes(&a), bytes(&seed2));

    // Interrupted after epoch 2, then resumed.
    let b = dir.path().join("b");
    let r = run(&cfg(&data, &b, &[]), Resume::No, Some(2)).unwrap();
    assert_eq!(r.epochs, 2);
    assert!(!b.join(EMBEDDINGS_FILE).exists(), "no final output before the last epoch");
    assert!(b.join("checkpoints/epoch-000002/DONE").is_file());
    let refused = run(&cfg(&data, &b, &[]), Resume::No, None).unwrap_err().to_string();
    assert!(refused.contains("--resume auto"), "{refused}");
    let other = run(&cfg(&data, &b, &["train.lr=0.02"]), Resume::Auto, None).unwrap_err().to_string();
    // The field that differs is named, with both values (the checkpoint keeps its config).
    assert!(
        other.contains("different pretraining config (train.lr: ") && other.contains(" → 0.02)"),
        "{other}"
    );
    // --stop-after counts epochs from the start: at epoch 2, stopping after 2 has nothing to
    // run (it once trained to the end and removed the checkpoints).
    let done = run(&cfg(&data, &b, &[]), Resume::Auto, Some(2)).unwrap_err().to_string();
    assert!(done.contains("--stop-after") && done.contains("already done (the run is at epoch 2)"), "{done}");
    assert!(b.join("checkpoints/epoch-000002/DONE").is_file() && !b.join(EMBEDDINGS_FILE).exists());
    // A copy under a later epoch's name is refused, not resumed as the newest.
    let copy = b.join("checkpoints/epoch-000003");
    common::copy_dir(&b.join("checkpoints/epoch-000002"), &copy);
    let e = run(&cfg(&data, &b, &[]), Resume::Auto, None).unwrap_err().to_string();
    assert!(e.contains("holds embeddings of epoch 2, but its name says epoch 3"), "{e}");
    std::fs::remove_dir_all(&copy).unwrap();
    let r = run(&cfg(&data, &b, &[]), Resume::Auto, None).unwrap();
    assert_eq!(r.epochs, 4);
    assert_eq!(bytes(&a), bytes(&b), "resumed run differs from the uninterrupted one");
    assert_eq!(std::fs::read(a.join(WORDS_FILE)).unwrap(), std::fs::read(b.join(WORDS_FILE)).unwrap());
    let epochs = |d: &Path| std::fs::read_to_string(d.join("metrics.jsonl")).unwrap().lines().count();
    assert_eq!(epochs(&b), 4, "one metrics line per epoch, none repeated");
    // A job requeued after it finished (--resume auto again) has nothing left to do: it
    // succeeds and leaves the output and the metrics as they were; --resume no is refused.
    let r = run(&cfg(&data, &b, &[]), Resume::Auto, None).unwrap();
    assert!(r.already_finished && r.epochs == 4 && r.train_seconds == 0.0, "{r:?}");
    assert_eq!(bytes(&a), bytes(&b));
    assert_eq!(epochs(&b), 4);
    let fresh = run(&cfg(&data, &b, &[]), Resume::No, None).unwrap_err().to_string();
    assert!(fresh.contains(EMBEDDINGS_FILE) && fresh.contains("earlier run"), "{fresh}");
    assert!(!r.loss.is_finite() && !b.join("checkpoints").exists());
    // Tables damaged after their metadata (a value's byte flipped): not a finished run, so
    // the output is refused as another run's, not taken as done.
    let file = b.join(EMBEDDINGS_FILE);
    let good = std::fs::read(&file).unwrap();
    let mut bad = good.clone();
    *bad.last_mut().unwrap() ^= 0x40;
    std::fs::write(&file, &bad).unwrap();
    let damaged = run(&cfg(&data, &b, &[]), Resume::Auto, None).unwrap_err().to_string();
    assert!(
        damaged.contains(EMBEDDINGS_FILE)
            && damaged.contains("earlier run; under --resume auto it is not this run's finished output:"),
        "{damaged}"
    );
    std::fs::write(&file, &good).unwrap();
    // Under another config: the field is named.
    let other = run(&cfg(&data, &b, &["train.lr=0.07"]), Resume::Auto, None).unwrap_err().to_string();
    assert!(other.contains("it was written under another pretraining config (train.lr: "), "{other}");
}

#[test]
fn damaged_files_are_refused_with_their_name() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path(), &[]);
    let out = dir.path().join("e");
    run(&cfg(&data, &out, &["train.epochs=1"]), Resume::No, None).unwrap();
    let words = out.join(WORDS_FILE);
    let good = std::fs::read(&words).unwrap();
    let mut bad = good.clone();
    bad[0] ^= 1;
    std::fs::write(&words, &bad).unwrap();
    let e = embeddings::read(&out).err().unwrap().to_string();
    assert!(e.contains("words.tsv") && e.contains("checksum"), "{e}");
    std::fs::write(&words, &good).unwrap();
    let file = out.join(EMBEDDINGS_FILE);
    let mut t = std::fs::read(&file).unwrap();
    let n = t.len();
    t[n - 5] ^= 0x40;
    std::fs::write(&file, &t).unwrap();
    let e = embeddings::read(&out).err().unwrap().to_string();
    assert!(e.contains("embeddings.safetensors") && e.contains("checksum"), "{e}");
    std::fs::write(&file, &t[..n / 2]).unwrap();
    assert!(embeddings::read(&out).is_err());
    let e = embeddings::read(&dir.path().join("nothing")).err().unwrap().to_string();
    assert!(e.contains("nothing"), "{e}");
    // The word list given for the vectors is named as what it is.
    let e = embeddings::read(&words).err().unwrap().to_string();
    assert!(e.contains("is the word list beside the vectors: give its directory"), "{e}");
    // Config rules name their field.
    let e = config::load::<PretrainConfig>(None, &[Override::parse("data.dir=\"x\"").unwrap()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("train.out_dir"), "{e}");
    for (set, field) in [
        ("data.splits=[\"tset\"]", "data.splits"),
        ("model.window=0", "model.window"),
        ("model.subsample=1.5", "model.subsample"),
        ("model.char_ngram_min=7", "model.char_ngram_min"),
        ("model.objective=\"glove\"", "model.objective"),
        ("train.lr=-1", "train.lr"),
    ] {
        let o = [
            Override::parse("data.dir=\"x\"").unwrap(),
            Override::parse("train.out_dir=\"y\"").unwrap(),
            Override::parse(set).unwrap(),
        ];
        let e = config::load::<PretrainConfig>(None, &o).unwrap_err().to_string();
        assert!(e.contains(field), "{set}: {e}");
    }
    // A shard whose words were changed within the vocabulary (nothing but its payload
    // checksum tells): pretraining refuses it, as training does.
    let damaged = dir.path().join("damaged");
    common::damaged_copy(&data, &damaged, |b| {
        let words_at = u64::from_le_bytes(b[72..80].try_into().unwrap()) as usize;
        b.swap(words_at, words_at + 4);
        b.swap(words_at + 1, words_at + 5);
    });
    let e = run(&cfg(&damaged, &dir.path().join("dmg"), &["train.epochs=1"]), Resume::No, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("unlabeled-00000.shard") && e.contains("checksum"), "{e}");
    // Too high a min_count leaves nothing to train.
    let e = run(&cfg(&data, &dir.path().join("none"), &["model.min_count=1000000"]), Resume::No, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("min_count"), "{e}");
    // Degenerate corpora are refused: one word (negative sampling had no other word to
    // draw, and spun for ever), or documents of one word each (nothing has a neighbour: the
    // run "trained" at loss 0).
    let degenerate = |name: &str, lines: String| {
        let sub = dir.path().join(name);
        std::fs::create_dir(&sub).unwrap();
        let l = common::write(&sub, "l.tsv", lines.as_bytes());
        let sets =
            ["tokenizer.buckets=4096", "split.test_fraction=0", "split.val_fraction=0", "output.shards=1"];
        common::run(&[&l], &[], &sub.join("data"), &sets).unwrap();
        run(&cfg(&sub.join("data"), &sub.join("pre"), &["model.subsample=0"]), Resume::No, None)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let e = degenerate(
        "one-word",
        (1..11).map(|i| format!("{}\t{}\n", i % 2, vec!["word"; i].join(" "))).collect(),
    );
    assert!(e.contains("model.min_count") && e.contains("leaves one word (\"word\")"), "{e}");
    let e = degenerate("singletons", (0..10).map(|i| format!("{}\tword{i}\n", i % 2)).collect());
    assert!(e.contains("holds two trained words"), "{e}");
}

/// A classifier's table filled with 7.0, after `init_table`.
fn init(
    emb: &embeddings::Embeddings,
    data: &Path,
    dim: usize,
) -> (Vec<f32>, dtrain::Result<embeddings::InitSummary>) {
    let spec = Dataset::open(data).unwrap().manifest().tokenizer.clone();
    let mut table = vec![7.0f32; spec.buckets as usize * dim];
    let r = emb.init_table(&spec, dim, &mut table);
    (table, r)
}

#[test]
fn init_from_loads_trained_rows_and_leaves_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    // The classifier's data: words and bigrams, no character n-grams.
    let data = corpus(dir.path(), &[]);
    let ds = Dataset::open(&data).unwrap();
    let tok = Tokenizer::new(ds.manifest().tokenizer.clone());
    let bigram = tok.tokenize("apple banana").ids[2];

    // Same range (none): trained rows are copied as they are.
    let same = dir.path().join("same");
    run(&cfg(&data, &same, &[]), Resume::No, None).unwrap();
    let emb = embeddings::read(&same).unwrap();
    let (table, s) = init(&emb, &data, 16);
    let s = s.unwrap();
    assert!(!s.composed && s.words == emb.words.len() && s.rows >= 10, "{s:?}");
    let mut feats = Vec::new();
    emb.features(&tok, "apple", &mut feats);
    let row = |t: &[f32], f: u32| t[f as usize * 16..(f as usize + 1) * 16].to_vec();
    assert_eq!(row(&table, feats[0]), row(emb.input(), feats[0]));
    // The bigram row keeps the classifier's values.
    assert_eq!(row(&table, bigram), vec![7.0; 16]);
    let written = table.chunks(16).filter(|r| r[0] != 7.0).count();
    assert_eq!(written, s.rows, "exactly the trained rows are written");

    // Pretrained with character n-grams 3..4: the classifier (none) gets composed word rows.
    let sub = dir.path().join("sub");
    run(&cfg(&data, &sub, &["model.char_ngram_min=3", "model.char_ngram_max=4"]), Resume::No, None).unwrap();
    let emb = embeddings::read(&sub).unwrap();
    let (table, s) = init(&emb, &data, 16);
    assert!(s.unwrap().composed);
    let mut v = vec![0.0; 16];
    emb.vector(&emb.tokenizer(), "apple", &mut feats, &mut v);
    assert_eq!(feats.len(), 1 + 5 + 4, "<apple>: the word, 5 trigrams, 4 four-grams");
    assert_eq!(row(&table, feats[0]), v);
    assert_ne!(v, row(emb.input(), feats[0]));

    // Widths must agree (`train` names the field: below).
    let e = init(&emb, &data, 8).1.unwrap_err().to_string();
    assert!(e.contains("model.dim is 8, the embeddings have") && e.contains(": set model.dim = "), "{e}");

    // End to end: a training run starts from the embeddings and differs from scratch.
    let tcfg = |out: &Path, init_from: Option<&Path>| -> TrainConfig {
        let mut o = vec![
            Override::parse(&format!("data.dir={:?}", data.display().to_string())).unwrap(),
            Override::parse(&format!("train.out_dir={:?}", out.display().to_string())).unwrap(),
            Override::parse("model.dim=16").unwrap(),
            Override::parse("train.batch_size=2").unwrap(),
            Override::parse("train.epochs=2").unwrap(),
        ];
        if let Some(p) = init_from {
            o.push(Override::parse(&format!("model.init_from={:?}", p.display().to_string())).unwrap());
        }
        config::load(None, &o).unwrap()
    };
    let opts =
        RunOptions { resume: Resume::No, progress: false, stop_after: None, device: Default::default() };
    let scratch = train(&tcfg(&dir.path().join("t0"), None), &opts).unwrap();
    // `inspect --data` on its logits of the unlabeled split, whose rows from the unlabeled
    // file have no hidden label: only the labeled pool's rows are measured.
    let logits = dir.path().join("u.logits");
    let cli = |args: &[&std::ffi::OsStr]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_dtrain")).args(args).output().unwrap()
    };
    let o = cli(&[
        "--quiet".as_ref(),
        "export-logits".as_ref(),
        "--checkpoint".as_ref(),
        scratch.final_checkpoint.as_os_str(),
        "--data".as_ref(),
        data.as_os_str(),
        "--split".as_ref(),
        "unlabeled".as_ref(),
        "--out".as_ref(),
        logits.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = cli(&["inspect".as_ref(), logits.as_os_str(), "--data".as_ref(), data.as_os_str()]);
    let out = String::from_utf8_lossy(&o.stdout);
    let shards = ds.shards(dtrain::data::shard::SplitKind::Unlabeled);
    let rows: usize = shards.iter().map(|s| s.len()).sum();
    let pool =
        shards.iter().map(|s| (0..s.len()).filter(|&i| s.hidden_label(i).is_some()).count()).sum::<usize>();
    assert!(pool > 0 && pool < rows, "{pool} of {rows} rows have a hidden label");
    assert!(
        out.contains(&format!("{rows} rows × 2 classes"))
            && out.contains(&format!("against the hidden labels of {pool} rows: ")),
        "{out}"
    );
    let pre = train(&tcfg(&dir.path().join("t1"), Some(&sub)), &opts).unwrap();
    let params = |p: &Path| dtrain::checkpoint::load_model(p).unwrap().2;
    assert_ne!(params(&scratch.final_checkpoint), params(&pre.final_checkpoint));
    let mut bad = tcfg(&dir.path().join("t2"), Some(&sub));
    bad.model.dim = 8;
    let e = train(&bad, &opts).unwrap_err().to_string();
    // The field is named once (it used to be named twice over).
    assert!(e.contains("model.dim is 8") && e.matches("model.init_from").count() == 1, "{e}");
    // A training checkpoint given as embeddings is named as what it is not, by field.
    let e =
        train(&tcfg(&dir.path().join("t3"), Some(&scratch.final_checkpoint)), &opts).unwrap_err().to_string();
    assert!(e.contains("field `model.init_from`") && e.contains("has no embeddings.safetensors"), "{e}");
    // A run stopped part-way resumes after its embeddings moved, with `model.init_from`
    // naming the new place (the table comes from the checkpoint), and ends on the bits of
    // the uninterrupted run.
    let out = dir.path().join("t4");
    let stopped = RunOptions { stop_after: Some(3), ..opts.clone() };
    train(&tcfg(&out, Some(&sub)), &stopped).unwrap();
    let moved = dir.path().join("moved-embeddings");
    std::fs::rename(&sub, &moved).unwrap();
    let resumed = RunOptions { resume: Resume::Auto, ..opts };
    let r = train(&tcfg(&out, Some(&moved)), &resumed).unwrap();
    assert_eq!(params(&r.final_checkpoint), params(&pre.final_checkpoint));
}

/// A learning rate far too high makes the loss explode; the run stops with an error that
/// says so, instead of writing meaningless embeddings.
#[test]
fn a_diverging_run_stops_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path(), &[]);
    let out = dir.path().join("hot");
    let e =
        run(&cfg(&data, &out, &["train.lr=10.0", "model.dim=64"]), Resume::No, None).unwrap_err().to_string();
    assert!(e.contains("diverged") && e.contains("lower train.lr"), "{e}");
    assert!(!out.join(EMBEDDINGS_FILE).exists());
    // A subsampling threshold that discards every word makes no prediction: refused by
    // field rather than writing untrained embeddings with a loss of 0.
    let out = dir.path().join("empty");
    let e = run(&cfg(&data, &out, &["model.subsample=1e-30"]), Resume::No, None).unwrap_err().to_string();
    assert!(e.contains("model.subsample") && e.contains("epoch 1 made no prediction"), "{e}");
    assert!(!out.join(EMBEDDINGS_FILE).exists());
}

/// Tables larger than memory are refused before they are allocated, naming model.dim.
#[test]
fn tables_larger_than_memory_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // 2^26 buckets × 65536 dims: a 16 TiB input table.
    let data = corpus(dir.path(), &["tokenizer.buckets=67108864"]);
    let out = dir.path().join("huge");
    let e = run(&cfg(&data, &out, &["model.dim=65536"]), Resume::No, None).unwrap_err().to_string();
    assert!(e.contains("field `model.dim`") && e.contains("the input and output tables 16384"), "{e}");
    assert!(e.contains("DTRAIN_MEMORY_CHECK=0") && !out.exists(), "{e}");
}

/// Pretraining never deletes or overwrites what another run left in its out_dir: a training
/// run's checkpoints and metrics, or an earlier pretraining's embeddings; and its out_dir
/// may not lie inside a data set or a checkpoint. Its own epoch checkpoints go when it ends.
#[test]
fn pretraining_keeps_other_runs_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path(), &[]);
    // A classifier's run: its checkpoints and metrics survive a pretraining aimed at it.
    let run_dir = dir.path().join("run");
    let tc = common::train_config(&data, &run_dir, &["train.epochs=2", "model.dim=8"]);
    common::train_run(&tc, Resume::No, None).unwrap();
    let ckpt = common::last_checkpoint(&run_dir);
    let metrics = std::fs::read(run_dir.join("metrics.jsonl")).unwrap();
    for resume in [Resume::No, Resume::Auto] {
        let e = run(&cfg(&data, &run_dir, &[]), resume.clone(), None).unwrap_err().to_string();
        assert!(e.contains("train.out_dir") || e.contains("not a pretraining checkpoint"), "{resume:?}: {e}");
    }
    assert!(ckpt.join("DONE").exists(), "the training run's checkpoint survives");
    assert_eq!(std::fs::read(run_dir.join("metrics.jsonl")).unwrap(), metrics);
    // A finished pretraining is not overwritten by a new one (with or without --resume
    // auto: it left no checkpoint to continue).
    let pt = dir.path().join("pt");
    run(&cfg(&data, &pt, &["train.checkpoint_every=1"]), Resume::No, None).unwrap();
    assert!(!pt.join("checkpoints").exists(), "its own epoch checkpoints are removed at the end");
    let before = std::fs::read(pt.join(EMBEDDINGS_FILE)).unwrap();
    for resume in [Resume::No, Resume::Auto] {
        let e = run(&cfg(&data, &pt, &["train.seed=7"]), resume, None).unwrap_err().to_string();
        assert!(e.contains("train.out_dir") && e.contains(EMBEDDINGS_FILE) && e.contains(WORDS_FILE), "{e}");
    }
    assert_eq!(std::fs::read(pt.join(EMBEDDINGS_FILE)).unwrap(), before);
    // Training that starts over (--resume auto, no checkpoint of its own) in the
    // pretraining's directory, or pretraining in a training run's that has lost its
    // checkpoints, would rewrite the other's metrics: refused, and the file kept.
    let pt_metrics = std::fs::read(pt.join("metrics.jsonl")).unwrap();
    let tc = common::train_config(&data, &pt, &["train.epochs=1", "model.dim=8"]);
    let e = common::train_run(&tc, Resume::Auto, None).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains(EMBEDDINGS_FILE) && e.contains("pretraining's directory"), "{e}");
    assert_eq!(std::fs::read(pt.join("metrics.jsonl")).unwrap(), pt_metrics);
    let lost = dir.path().join("lost");
    std::fs::create_dir(&lost).unwrap();
    std::fs::copy(run_dir.join("metrics.jsonl"), lost.join("metrics.jsonl")).unwrap();
    let e = run(&cfg(&data, &lost, &[]), Resume::Auto, None).unwrap_err().to_string();
    assert!(e.contains("metrics of another command's run"), "{e}");
    assert_eq!(std::fs::read(lost.join("metrics.jsonl")).unwrap(), metrics);
    // Inside a checkpoint, or a data set.
    for inside in [ckpt.join("nested"), data.clone()] {
        let e = run(&cfg(&data, &inside, &[]), Resume::No, None).unwrap_err().to_string();
        assert!(
            e.contains("train.out_dir") && (e.contains("a checkpoint") || e.contains("a prepared data set")),
            "{e}"
        );
    }
    // The same splits twice would read their text twice.
    let o = [
        Override::parse(&format!("data.dir={:?}", data.display().to_string())).unwrap(),
        Override::parse("data.splits=[\"train\", \"unlabeled\", \"train\"]").unwrap(),
    ];
    let e = config::load::<PretrainConfig>(None, &o).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("data.splits") && e.contains("named twice"), "{e}");
}

/// `dtrain propagate` over pretrained word vectors: every row's vector is the mean of its
/// trained words', and the few training labels spread to the rest of each topic; a row of
/// words pretraining never trained gets no vector and no label; the feature hashing does not
/// matter, the word rules do.
#[test]
fn propagate_spreads_labels_over_averaged_word_vectors() {
    let dir = tempfile::tempdir().unwrap();
    // The zzyzx line's words are seen once: min_count 2 leaves them out.
    let (l, u, data_b) = corpus_with_a_stranger(dir.path(), "data_b");
    let sets = CORPUS_SETS;
    let pre = dir.path().join("pre");
    run(&cfg(&data_b, &pre, &["model.min_count=2"]), Resume::No, None).unwrap();
    let cli = |model: &Path, data: &Path, out: &Path, extra: &[&str]| {
        let paths = [
            "propagate".as_ref(),
            "--model".as_ref(),
            model.as_os_str(),
            "--data".as_ref(),
            data.as_os_str(),
        ];
        common::dtrain(
            paths
                .into_iter()
                .chain(["--out".as_ref(), out.as_os_str()])
                .chain(extra.iter().map(|e| e.as_ref())),
        )
    };
    let out = dir.path().join("u.logits");
    let grid = ["--k", "10", "--alpha", "0.9"];
    let (ok, stdout, err) = cli(&pre, &data_b, &out, &grid);
    assert!(ok, "{err}");
    assert_eq!(stdout.matches("<- chosen").count(), 1, "{stdout}");
    assert!(
        stdout.contains("1 rows hold no word the embeddings") && stdout.contains("no neighbours"),
        "the zzyzx line is not named:\n{stdout}"
    );
    let ds = Dataset::open(&data_b).unwrap();
    let split = dtrain::data::shard::SplitKind::Unlabeled;
    let f = dtrain::logits::LogitsFile::open(&out).unwrap();
    assert_pool_spread(&data_b, &out);
    // The embeddings file itself names them too, and gives the same logits.
    let again = dir.path().join("again.logits");
    let (ok, _, err) = cli(&pre.join(EMBEDDINGS_FILE), &data_b, &again, &grid);
    assert!(ok, "{err}");
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&again).unwrap(), "the two files differ");
    // --pooling is an encoder's.
    let (ok, _, err) = cli(&pre, &data_b, &dir.path().join("p.logits"), &["--pooling", "cls"]);
    assert!(!ok && err.contains("--pooling applies to a pretrained model's directory"), "{err}");
    // Rows are read as words, so a data set that hashes its features otherwise gives the
    // same labels.
    let other = dir.path().join("data_seed");
    common::run(&[&l], &[&u], &other, &[sets.as_slice(), &["tokenizer.hash_seed=7"]].concat()).unwrap();
    let seeded = dir.path().join("seeded.logits");
    let (ok, _, err) = cli(&pre, &other, &seeded, &grid);
    assert!(ok, "{err}");
    let g = dtrain::logits::LogitsFile::open(&seeded).unwrap();
    for (si, shard) in ds.shards(split).iter().enumerate() {
        for i in 0..shard.len() {
            let id = dtrain::data::loader::RowId { split, shard: si as u32, row: i as u32 };
            assert_eq!(f.row(id), g.row(id), "row {i} of shard {si}");
        }
    }
    // A data set whose words are cased otherwise would not find them: refused.
    let cased = dir.path().join("data_cased");
    common::run(&[&l], &[&u], &cased, &[sets.as_slice(), &["tokenizer.lowercase=false"]].concat()).unwrap();
    let (ok, _, err) = cli(&pre, &cased, &dir.path().join("o.logits"), &[]);
    assert!(!ok && err.contains("lowercases words otherwise") && err.contains("data_cased"), "{err}");
    assert!(!dir.path().join("o.logits").exists());
    // Cells that each probe every cell give the exact search's labels (under another
    // source) and a recall of 1; with one probe the run still goes, and says its recall.
    let cells = dir.path().join("cells.logits");
    let all = [&grid[..], &["--search", "cells", "--cells", "3", "--probes", "3"]].concat();
    let (ok, stdout, err) = cli(&pre, &data_b, &cells, &all);
    assert!(ok, "{err}");
    assert!(stdout.contains("3 cells") && stdout.contains("recall 1.0000"), "{stdout}");
    let c = dtrain::logits::LogitsFile::open(&cells).unwrap();
    assert_ne!(c.source, f.source);
    for (si, shard) in ds.shards(split).iter().enumerate() {
        for i in 0..shard.len() {
            let id = dtrain::data::loader::RowId { split, shard: si as u32, row: i as u32 };
            assert_eq!(f.row(id), c.row(id), "row {i} of shard {si}");
        }
    }
    let one = [&grid[..], &["--search", "cells", "--cells", "3", "--probes", "1"]].concat();
    let (ok, stdout, err) = cli(&pre, &data_b, &dir.path().join("one.logits"), &one);
    assert!(ok && stdout.contains("1 probed a row") && stdout.contains("recall "), "{err}{stdout}");
    for (bad, says) in [
        (&["--cells", "3"][..], "--cells and --probes apply to --search cells"),
        (&["--search", "cells", "--probes", "0"][..], "--probes 0"),
        (&["--search", "cells", "--cells", "0"][..], "--cells 0"),
    ] {
        let (ok, _, err) = cli(&pre, &data_b, &dir.path().join("o.logits"), bad);
        assert!(!ok && err.contains(says), "{bad:?}: {err}");
    }
    // The shifts are named, each once.
    let (ok, _, err) = cli(&pre, &data_b, &dir.path().join("o.logits"), &["--shift", "up"]);
    assert!(!ok && err.contains("expected raw, centre or drop-top"), "{err}");
    let (ok, _, err) = cli(&pre, &data_b, &dir.path().join("o.logits"), &["--shift", "raw,centre,raw"]);
    assert!(!ok && err.contains("--shift raw: given twice"), "{err}");
    // Without word vectors beside it, the tensors are not read.
    std::fs::remove_file(pre.join(WORDS_FILE)).unwrap();
    let (ok, _, err) = cli(&pre, &data_b, &dir.path().join("w.logits"), &[]);
    assert!(!ok && err.contains(WORDS_FILE), "{err}");
}

/// `dtrain propagate --tfidf`: rows linked by the words they share, weighted by TF-IDF, with
/// no model at all; beside word vectors it is one more view of the same rows (another
/// source), and its data set must hold those rows.
#[test]
fn propagate_links_rows_by_shared_words_with_tfidf() {
    let dir = tempfile::tempdir().unwrap();
    // The zzyzx line's words are found nowhere else: no TF-IDF vector.
    let (l, u, data) = corpus_with_a_stranger(dir.path(), "data_z");
    let sets = CORPUS_SETS;
    let path = |p: &Path| p.display().to_string();
    let cli = |args: &[String]| {
        common::dtrain(
            ["propagate", "--k", "10", "--alpha", "0.9"]
                .iter()
                .map(|a| a.to_string())
                .chain(args.iter().cloned()),
        )
    };
    let out = dir.path().join("t.logits");
    let labels = dir.path().join("t.jsonl");
    let (ok, stdout, err) = cli(&[
        "--tfidf".into(),
        path(&data),
        "--out".into(),
        path(&out),
        "--pseudo-labels".into(),
        path(&labels),
    ]);
    assert!(ok, "{err}");
    // The pseudo-labels name no class for the row no label reached.
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&labels).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let unnamed: Vec<_> = lines.iter().filter(|v| v["label"].is_null()).collect();
    assert_eq!(unnamed.len(), 1, "one row has no label");
    assert!((unnamed[0]["confidence"].as_f64().unwrap() - 0.5).abs() < 1e-6);
    assert!(lines.iter().filter(|v| !v["label"].is_null()).all(|v| v["label"] == "0" || v["label"] == "1"));
    // `inspect` counts it apart too.
    let (ok, described, _) = common::dtrain(["inspect".to_string(), path(&out)]);
    assert!(ok && described.contains("no class") && described.contains("every logit equal"), "{described}");
    // TF-IDF vectors are not shifted: the default three shifts make one setting.
    assert_eq!(stdout.matches("<- chosen").count(), 1, "{stdout}");
    // Cells are drawn over dense vectors: with TF-IDF alone the search by cells is refused.
    let (ok, _, err) = cli(&[
        "--tfidf".into(),
        path(&data),
        "--out".into(),
        path(&dir.path().join("c.logits")),
        "--search".into(),
        "cells".into(),
    ]);
    assert!(!ok && err.contains("--search cells draws its cells over the --model views"), "{err}");
    assert!(!stdout.contains("centre") && !stdout.contains("drop-top"), "{stdout}");
    assert!(
        stdout.contains("1 rows of")
            && stdout.contains("no TF-IDF vector")
            && stdout.contains("no neighbours"),
        "the zzyzx line is not named:\n{stdout}"
    );
    let ds = Dataset::open(&data).unwrap();
    let split = dtrain::data::shard::SplitKind::Unlabeled;
    let f = dtrain::logits::LogitsFile::open(&out).unwrap();
    assert_pool_spread(&data, &out);
    // Beside word vectors: the same rows, shifted word vectors, another source.
    let pre = dir.path().join("pre");
    run(&cfg(&data, &pre, &[]), Resume::No, None).unwrap();
    let both = |tfidf: &Path, out: &Path| {
        cli(&[
            "--model".into(),
            path(&pre),
            "--data".into(),
            path(&data),
            "--tfidf".into(),
            path(tfidf),
            "--out".into(),
            path(out),
        ])
    };
    let two = dir.path().join("two.logits");
    let (ok, stdout, err) = both(&data, &two);
    assert!(ok, "{err}");
    assert!(
        stdout.contains("centre") && stdout.contains("drop-top"),
        "the word vectors are shifted:\n{stdout}"
    );
    let g = dtrain::logits::LogitsFile::open(&two).unwrap();
    g.check_matches(&ds, split).unwrap();
    assert!(g.source.is_some() && g.source != f.source, "both views' file records TF-IDF alone's source");
    // A TF-IDF data set of other rows (another split) is refused, and nothing is written.
    let other = dir.path().join("data_other");
    common::run(&[&l], &[&u], &other, &[sets.as_slice(), &["split.seed=9"]].concat()).unwrap();
    let refused = dir.path().join("refused.logits");
    let (ok, _, err) = both(&other, &refused);
    assert!(!ok && err.contains("data_other") && err.contains("the same rows"), "{err}");
    assert!(!refused.exists());
    // Neither --model nor --tfidf: nothing to embed.
    let (ok, _, err) = cli(&["--out".into(), path(&refused)]);
    assert!(!ok && err.contains("--model"), "{err}");
    // --weights: a view of weight 0 adds nothing, so weights 0,1 spread as TF-IDF alone did
    // (every shift of the zero-weighted word vectors gives TF-IDF's graph; the first, raw,
    // wins the tie), and 1,0 as the word vectors alone, value for value.
    let weighted = |weights: &[&str], out: &Path| {
        let mut args = vec!["--model".into(), path(&pre), "--data".into(), path(&data)];
        args.extend(["--tfidf".into(), path(&data), "--out".into(), path(out)]);
        for w in weights {
            args.extend(["--weights".to_string(), w.to_string()]);
        }
        cli(&args)
    };
    let alone = dir.path().join("alone.logits");
    let (ok, _, err) =
        cli(&["--model".into(), path(&pre), "--data".into(), path(&data), "--out".into(), path(&alone)]);
    assert!(ok, "{err}");
    // The two views alone spread otherwise (the zzyzx row has a word vector, no TF-IDF
    // vector), so each weighting below must have followed its weights.
    assert!(dtrain::logits::LogitsFile::open(&alone).unwrap().all() != f.all());
    let file = |w: &str| dtrain::logits::LogitsFile::open(&dir.path().join(format!("w{w}.logits"))).unwrap();
    for (w, same_as) in [("0,1", &out), ("1,0", &alone)] {
        let (ok, stdout, err) = weighted(&[w], &dir.path().join(format!("w{w}.logits")));
        assert!(ok, "{err}");
        assert!(stdout.contains(&format!("views weighted {w}:")), "the weights are printed:\n{stdout}");
        let want = dtrain::logits::LogitsFile::open(same_as).unwrap();
        assert!(file(w).all() == want.all(), "--weights {w}: not the view alone's probabilities");
    }
    assert_ne!(file("0,1").source, file("1,0").source, "the same views weighted otherwise: the same source");
    // Two weightings: each its block of the report; val picks one, names it and writes its file.
    let (ok, stdout, err) = weighted(&["1,0", "0,1"], &refused);
    assert!(ok, "{err}");
    assert!(stdout.contains("views weighted 1,0:") && stdout.contains("views weighted 0,1:"), "{stdout}");
    let chosen = stdout.split("<- chosen: weights ").nth(1).and_then(|r| r.split(", align").next()).unwrap();
    assert!(
        dtrain::logits::LogitsFile::open(&refused).unwrap().all() == file(chosen).all(),
        "the file is not the chosen weighting's ({chosen})"
    );
    std::fs::remove_file(&refused).unwrap();
    // Refused before anything is written: a weight per view, no two alike in their ratios,
    // numbers at least 0.
    for (weights, want) in [
        (&["1,1,1"][..], "--weights 1,1,1: 3 weights for 2 views"),
        (&["1,2", "2,4"][..], "--weights 2,4: the same graph as --weights 1,2"),
        (&["1,-2"][..], "a view's weight must be finite and at least 0, not -2"),
        (&["0,0"][..], "at least one view's weight must be above 0"),
    ] {
        let (ok, _, err) = weighted(weights, &refused);
        assert!(!ok && err.contains(want), "{weights:?}: {err}");
        assert!(!refused.exists(), "{weights:?}");
    }
}

/// `dtrain propagate --align`: one val column per power, the chosen power named, each
/// class's prior beside its share of the argmaxes; `--align 0` is plain spreading (another
/// source, no class table); a prior needs rows to count, and bad values are refused before
/// anything is written.
#[test]
fn propagate_aligns_the_class_mass_to_a_prior() {
    let dir = tempfile::tempdir().unwrap();
    let (l, u, data) = corpus_with_a_stranger(dir.path(), "data_a");
    let path = |p: &Path| p.display().to_string();
    let cli = |data: &Path, out: &Path, extra: &[&str]| {
        let args = ["propagate", "--k", "10", "--alpha", "0.9", "--tfidf", &path(data), "--out", &path(out)];
        common::dtrain(args.iter().chain(extra).map(|a| a.to_string()))
    };
    let aligned = dir.path().join("a.logits");
    let (ok, stdout, err) = cli(&data, &aligned, &["--align", "0,0.5,1", "--class-prior", "train"]);
    assert!(ok, "{err}");
    let header = stdout.lines().find(|l| l.contains("alpha")).unwrap_or_default();
    assert_eq!(
        header.split_whitespace().filter(|w| w.starts_with("a=")).collect::<Vec<_>>(),
        ["a=0", "a=0.5", "a=1"]
    );
    for want in ["<- chosen: align ", "prior: the train split's label frequencies"] {
        assert!(stdout.contains(want), "{want:?} missing from:\n{stdout}");
    }
    // Two classes, 4 training labels each, each count plus one: 50% each.
    let shares: Vec<Vec<&str>> = stdout
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|w| {
            w.len() == 4 && (w[0] == "0" || w[0] == "1") && w.iter().skip(1).all(|x| x.ends_with('%'))
        })
        .collect();
    assert_eq!(shares.len(), 2, "{stdout}");
    assert!(shares.iter().all(|w| w[1] == "50.0%"), "{shares:?}");
    assert_pool_spread(&data, &aligned);
    let plain = dir.path().join("p.logits");
    let (ok, stdout, err) = cli(&data, &plain, &["--align", "0"]);
    assert!(ok, "{err}");
    assert!(!stdout.contains("prior:") && stdout.contains("<- chosen: align 0,"), "{stdout}");
    let source = |p: &Path| dtrain::logits::LogitsFile::open(p).unwrap().source;
    assert_ne!(source(&aligned), source(&plain));
    // The topics above share no word, so every row's probabilities are one-hot and there
    // is nothing to align. Here three fruit lines to each tools line, every line with two
    // of five common words (so TF-IDF links the topics), and a full graph: the spread
    // probabilities are mixed, and power 1 towards val's 3:1 writes other logits than
    // plain spreading, labeling the pool as well.
    let mut lab = String::new();
    for (line, words) in common::topic_lines(&[&FRUIT, &FRUIT, &FRUIT, &TOOLS], 160, 7).iter().enumerate() {
        let common = ["alpha", "beta", "gamma", "delta", "omega"];
        let label = if line % 4 == 3 { "t" } else { "f" };
        lab.push_str(&format!(
            "{label}\t{} {} {} line{line}\n",
            words[..3].join(" "),
            common[line % 5],
            common[(line / 5) % 5]
        ));
    }
    let mixed_l = common::write(dir.path(), "mixed.tsv", lab.as_bytes());
    let mixed = dir.path().join("data_mixed");
    common::run(&[&mixed_l], &[], &mixed, &CORPUS_SETS).unwrap();
    let ds = Dataset::open(&mixed).unwrap();
    let split = dtrain::data::shard::SplitKind::Unlabeled;
    let rows = |p: &Path| {
        let f = dtrain::logits::LogitsFile::open(p).unwrap();
        let mut z = Vec::new();
        for (si, shard) in ds.shards(split).iter().enumerate() {
            for i in 0..shard.len() {
                let row = f.row(dtrain::data::loader::RowId { split, shard: si as u32, row: i as u32 });
                z.push((row.to_vec(), shard.hidden_label(i).unwrap()));
            }
        }
        z
    };
    let spread = |align: &str| {
        let out = dir.path().join(format!("mixed-{align}.logits"));
        let args =
            ["propagate", "--k", "130", "--alpha", "0.9", "--tfidf", &path(&mixed), "--out", &path(&out)];
        let (ok, _, err) = common::dtrain(args.iter().chain(&["--align", align]).map(|a| a.to_string()));
        assert!(ok, "{err}");
        rows(&out)
    };
    let (z0, z1) = (spread("0"), spread("1"));
    let right =
        |z: &[(Vec<f32>, u32)]| z.iter().filter(|(r, l)| dtrain::backend::argmax(r) == *l as usize).count();
    assert!(right(&z1) * 10 >= z1.len() * 9, "{} of {} right", right(&z1), z1.len());
    let moved =
        z0.iter().zip(&z1).filter(|((a, _), (b, _))| a.iter().zip(b).any(|(x, y)| (x - y).abs() > 1e-3));
    assert!(moved.count() * 2 > z0.len(), "alignment left most rows as they were");
    // Refused: a power out of range, a prior split of no name, and a val prior with no val rows.
    let never = dir.path().join("never.logits");
    for (extra, want) in [
        (&["--align", "2.5"][..], "--align 2.5: must be in [0, 2]"),
        (&["--align", "0.5,0.5"][..], "--align 0.5: given twice"),
        (&["--class-prior", "test"][..], "expected val or train"),
    ] {
        let (ok, _, err) = cli(&data, &never, extra);
        assert!(!ok && err.contains(want), "{extra:?}: {err}");
    }
    let no_val = dir.path().join("data_no_val");
    common::run(&[&l], &[&u], &no_val, &[CORPUS_SETS.as_slice(), &["split.val_fraction=0"]].concat())
        .unwrap();
    let (ok, _, err) = cli(&no_val, &never, &["--align", "0.5"]);
    assert!(!ok && err.contains("val split is empty") && err.contains("--class-prior train"), "{err}");
    assert!(!never.exists());
    let (ok, _, err) = cli(&no_val, &never, &["--align", "0.5", "--class-prior", "train"]);
    assert!(ok, "{err}");
}

/// `dtrain embed --data` stores one view's vectors of every row; `propagate --model FILE`
/// reads them in place of embedding again and writes the same bytes (the same source), while
/// a file of other rows, a damaged file and outputs that would overwrite other files are
/// refused by name.
#[test]
fn propagate_reads_the_row_vectors_embed_stored() {
    let dir = tempfile::tempdir().unwrap();
    let (l, u, data) = corpus_with_a_stranger(dir.path(), "data_v");
    let pre = dir.path().join("pre");
    run(&cfg(&data, &pre, &["model.min_count=2"]), Resume::No, None).unwrap();
    let path = |p: &Path| p.display().to_string();
    let stored = dir.path().join("v.safetensors");
    let embed = |data: &Path, out: &Path| {
        common::dtrain(["embed", "--model", &path(&pre), "--data", &path(data), "--out", &path(out)])
    };
    let (ok, stdout, err) = embed(&data, &stored);
    assert!(ok, "{err}");
    assert!(stdout.contains("width 16 (word vectors), 1 rows without a vector"), "{stdout}");
    // The file holds every row in propagate's order, with its split, label and sample id.
    let r = dtrain::rowvec::RowVectors::read(&stored).unwrap();
    let ds = Dataset::open(&data).unwrap();
    let mut at = 0;
    for (code, split) in dtrain::data::shard::SplitKind::ALL.into_iter().enumerate() {
        for shard in ds.shards(split) {
            for i in 0..shard.len() {
                let doc = shard.doc(i);
                assert_eq!(r.split[at], code as u8, "row {at}");
                assert_eq!(r.sample_id[at], doc.sample_id, "row {at}");
                let want = if code == 3 { -1 } else { doc.label.unwrap() as i32 };
                assert_eq!(r.label[at], want, "row {at}");
                at += 1;
            }
        }
    }
    assert_eq!(at, r.len());
    assert!(r.label[..r.meta.rows[0]].iter().all(|&l| l >= 0));
    assert_eq!(r.meta.blank, 1);
    for v in r.vectors.chunks(16) {
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!(norm == 0.0 || (norm - 1.0).abs() < 1e-5, "norm {norm}");
    }
    let (ok, said, err) = common::dtrain(["inspect", &path(&stored)]);
    assert!(
        ok && said.contains("row vectors of 681 rows (train 8, val 8, test 16, unlabeled 649), width 16"),
        "{said}{err}"
    );
    assert!(said.contains("rows without a vector: 1"), "{said}");
    // Stored or embedded afresh, the same logits file.
    let cli = |model: &Path, data: &Path, out: &Path, extra: &[&str]| {
        let args =
            ["propagate", "--k", "10", "--alpha", "0.9", "--model", &path(model), "--data", &path(data)];
        common::dtrain(args.iter().chain(&["--out", &path(out)]).chain(extra).map(|a| a.to_string()))
    };
    let (fresh, from_file) = (dir.path().join("a.logits"), dir.path().join("b.logits"));
    let (ok, _, err) = cli(&pre, &data, &fresh, &[]);
    assert!(ok, "{err}");
    let (ok, stdout, err) = cli(&stored, &data, &from_file, &[]);
    assert!(ok, "{err}");
    assert!(stdout.contains("1 rows hold no word"), "{stdout}");
    assert!(std::fs::read(&fresh).unwrap() == std::fs::read(&from_file).unwrap(), "the two files differ");
    assert_pool_spread(&data, &from_file);
    // Vectors of other rows (another split of the same lines) are refused; nothing is written.
    let other = dir.path().join("data_other");
    common::run(&[&l], &[&u], &other, &[CORPUS_SETS.as_slice(), &["split.seed=9"]].concat()).unwrap();
    let refused = dir.path().join("c.logits");
    let (ok, _, err) = cli(&stored, &other, &refused, &[]);
    assert!(!ok && err.contains("v.safetensors") && err.contains("split differs"), "{err}");
    assert!(!refused.exists());
    // A machine with too little memory for the stored vectors is told so before they are
    // read (681 rows of 16 floats, a split, a label and a sample id: 52,437 bytes).
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_dtrain"))
        .args([
            "--quiet",
            "propagate",
            "--model",
            &path(&stored),
            "--data",
            &path(&data),
            "--out",
            &path(&refused),
        ])
        .env("DTRAIN_MEMORY_LIMIT", "50K")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains("config propagate")
            && err.contains("the stored row vectors of")
            && err.contains("51.2 KiB"),
        "{err}"
    );
    assert!(!refused.exists());
    // `inspect` claims the same memory, as its own.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_dtrain"))
        .args(["inspect", &path(&stored)])
        .env("DTRAIN_MEMORY_LIMIT", "50K")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("config inspect") && err.contains("51.2 KiB"), "{err}");
    // --pooling is an encoder directory's.
    let (ok, _, err) = cli(&stored, &data, &refused, &["--pooling", "mean"]);
    assert!(!ok && err.contains("--pooling"), "{err}");
    // A file of row vectors is not written over another kind of file, an input, or a file
    // of a data set.
    let (ok, _, err) = embed(&data, &l);
    assert!(!ok && err.contains("is not a file of row vectors"), "{err}");
    assert!(std::fs::read_to_string(&l).unwrap().starts_with("0\t"), "the labeled file was overwritten");
    let kept = std::fs::read(&fresh).unwrap();
    let (ok, _, err) = embed(&data, &fresh);
    assert!(!ok && err.contains("is not a file of row vectors"), "{err}");
    assert!(std::fs::read(&fresh).unwrap() == kept, "the logits file was overwritten");
    let (ok, _, err) = embed(&data, &pre.join(EMBEDDINGS_FILE));
    assert!(!ok && err.contains("is not a file of row vectors"), "{err}");
    embeddings::read(&pre).unwrap();
    let (ok, _, err) = embed(&data, &data.join("vectors.safetensors"));
    assert!(!ok && err.contains("data set"), "{err}");
    assert!(!data.join("vectors.safetensors").exists());
    // One byte of the metadata changed: still taken for row vectors, and refused as damaged.
    let good = std::fs::read(&stored).unwrap();
    let mut bytes = good.clone();
    let at = bytes.windows(12).position(|w| w == b"word vectors").unwrap();
    bytes[at] = b'W';
    std::fs::write(&stored, &bytes).unwrap();
    let (ok, _, err) = cli(&stored, &data, &refused, &[]);
    assert!(
        !ok && err.contains("v.safetensors") && err.contains("metadata does not match its checksum"),
        "{err}"
    );
    let (ok, _, err) = common::dtrain(["inspect", &path(&stored)]);
    assert!(!ok && err.contains("metadata does not match its checksum"), "{err}");
    std::fs::write(&stored, &good).unwrap();
    // One byte changed in the tensor data: refused as corrupted.
    let mut bytes = std::fs::read(&stored).unwrap();
    let last = bytes.len() - 20;
    bytes[last] ^= 1;
    std::fs::write(&stored, &bytes).unwrap();
    let (ok, _, err) = cli(&stored, &data, &refused, &[]);
    assert!(!ok && err.contains("corrupted"), "{err}");
    assert!(!refused.exists());
    // Stored vectors are not embedded again.
    let (ok, _, err) = common::dtrain([
        "embed",
        "--model",
        &path(&stored),
        "--data",
        &path(&data),
        "--out",
        &path(&dir.path().join("w.safetensors")),
    ]);
    assert!(!ok && err.contains("already stored row vectors"), "{err}");
    // Texts are embedded on the CPU only, and texts and --data are one or the other.
    let (ok, _, err) = common::dtrain(["embed", "--model", &path(&pre), "--device", "cuda", "some text"]);
    assert!(!ok && err.contains("--device applies with --data"), "{err}");
    let (ok, _, err) =
        common::dtrain(["embed", "--model", &path(&pre), "--data", &path(&data), "--out", "x", "some text"]);
    assert!(!ok && err.contains("cannot be used with"), "{err}");
}

/// Pretraining locks its directory as training does: a second run there is refused.
#[test]
fn a_pretraining_directory_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path(), &[]);
    let out = dir.path().join("pre");
    let held = dtrain::fsutil::lock_run_dir(&out, "train.out_dir").unwrap();
    let c = cfg(&data, &out, &["train.epochs=1"]);
    let e = run(&c, Resume::Auto, None).unwrap_err().to_string();
    assert!(e.contains("is in use by another dtrain run"), "{e}");
    drop(held);
    run(&c, Resume::Auto, None).unwrap();
}
