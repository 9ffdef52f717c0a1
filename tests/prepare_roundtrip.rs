//! Prepare → read back: every field of every shard, de-duplication, stratified sharding,
//! determinism, and the manifest's counts.

mod common;

use std::collections::{HashMap, HashSet};

use dtrain::data::dataset::{verify, Dataset};
use dtrain::data::shard::SplitKind;
use dtrain::data::tokenize::{Tokenizer, TokenizerSpec};

/// One document read back: (split, ids, label, sample id, hidden label).
type DocRow = (SplitKind, Vec<u32>, Option<u32>, u64, Option<u32>);

/// Reads every document of every split.
fn all_docs(ds: &Dataset) -> Vec<DocRow> {
    let mut out = Vec::new();
    for kind in SplitKind::ALL {
        for shard in ds.shards(kind) {
            for i in 0..shard.len() {
                let d = shard.doc(i);
                out.push((kind, d.ids.to_vec(), d.label, d.sample_id, shard.hidden_label(i)));
            }
        }
    }
    out
}

#[test]
fn every_field_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    // Labeled: TSV (gz) + JSONL; unlabeled: plain text; a duplicate in each role.
    let labeled_tsv =
        "b\tthe second class text\na\tfirst class text one\na\tfirst class text two\nb\tanother b text\n\
                       a\tfirst class text three\nb\tthe second class text\n";
    let jsonl =
        "{\"text\": \"json a text\", \"label\": \"a\"}\n{\"text\": \"json b text\", \"label\": \"b\"}\n";
    let plain = "an unlabeled line\n\nanother unlabeled line\nfirst class text one\n";
    let f1 = common::write(dir.path(), "l.tsv.gz", labeled_tsv.as_bytes());
    let f2 = common::write(dir.path(), "l.jsonl", jsonl.as_bytes());
    let f3 = common::write(dir.path(), "u.txt", plain.as_bytes());
    let out = dir.path().join("ds");
    let report = common::run(
        &[&f1, &f2],
        &[&f3],
        &out,
        &["split.test_fraction=0.0", "split.val_fraction=0.0", "output.shards=3"],
    )
    .unwrap();

    let m = &report.manifest;
    assert_eq!(m.labels, ["a", "b"]);
    assert_eq!(m.stats.duplicates, 2, "one labeled and one unlabeled duplicate");
    assert_eq!(m.stats.blank, 1);
    assert_eq!(m.stats.documents, 7 + 2);
    assert_eq!(m.inputs.len(), 3);
    assert_eq!(m.inputs[0].lines, 6);
    assert_eq!(m.inputs[2].blank, 1);

    let ds = Dataset::open(&out).unwrap();
    let tok = Tokenizer::new(TokenizerSpec::default());
    let docs = all_docs(&ds);
    let expected: HashMap<u64, (&str, Option<u32>)> = [
        (0, ("the second class text", Some(1))),
        (1, ("first class text one", Some(0))),
        (2, ("first class text two", Some(0))),
        (3, ("another b text", Some(1))),
        (4, ("first class text three", Some(0))),
        (5, ("json a text", Some(0))),
        (6, ("json b text", Some(1))),
        (7, ("an unlabeled line", None)),
        (8, ("another unlabeled line", None)),
    ]
    .into_iter()
    .collect();
    assert_eq!(docs.len(), expected.len());
    let mut seen = HashSet::new();
    for (kind, ids, label, sample_id, hidden) in &docs {
        let (text, want_label) = expected[sample_id];
        assert!(seen.insert(*sample_id), "sample id {sample_id} twice");
        assert_eq!(ids, &tok.tokenize(text).ids, "ids of {text:?}");
        assert_eq!(*label, want_label, "label of {text:?}");
        assert_eq!(*hidden, None, "no hidden labels without a labels_per_class split");
        let want_kind = if want_label.is_some() { SplitKind::Train } else { SplitKind::Unlabeled };
        assert_eq!(*kind, want_kind);
    }
    // Round-robin sharding: sizes differ by at most one.
    let sizes: Vec<usize> = ds.shards(SplitKind::Train).iter().map(|s| s.len()).collect();
    assert_eq!(sizes, [3, 2, 2]);
    assert!(verify(&out).ok());
}

#[test]
fn low_label_split_hides_labels_and_keeps_test_apart() {
    let dir = tempfile::tempdir().unwrap();
    let f = common::write(dir.path(), "l.tsv", common::tsv(4, 50).as_bytes());
    let out = dir.path().join("ds");
    let r = common::run(&[&f], &[], &out, &["split.labels_per_class=5", "output.shards=4", "split.seed=3"])
        .unwrap();
    let m = &r.manifest;
    for (name, per_class) in [("train", 5), ("val", 5), ("test", 10), ("unlabeled", 30)] {
        assert_eq!(m.splits[name].per_class, vec![per_class; 4], "{name}");
    }
    let ds = Dataset::open(&out).unwrap();
    let docs = all_docs(&ds);
    let mut by_split: HashMap<SplitKind, HashSet<Vec<u32>>> = HashMap::new();
    for (kind, ids, label, _, hidden) in &docs {
        by_split.entry(*kind).or_default().insert(ids.clone());
        match kind {
            SplitKind::Unlabeled => {
                assert!(label.is_none() && hidden.is_some(), "unlabeled keeps only a hidden label")
            }
            _ => assert!(label.is_some() && hidden.is_none()),
        }
    }
    let test = &by_split[&SplitKind::Test];
    for kind in [SplitKind::Train, SplitKind::Val, SplitKind::Unlabeled] {
        assert!(by_split[&kind].is_disjoint(test), "{kind:?} shares a document with test");
    }
    // Every train shard is stratified: 5 per class over 4 shards, round-robin by class.
    for shard in ds.shards(SplitKind::Train) {
        let mut counts = [0; 4];
        for i in 0..shard.len() {
            counts[shard.doc(i).label.unwrap() as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (1..=2).contains(&c)), "{counts:?}");
    }
}

#[test]
fn duplicates_of_test_documents_never_reach_training() {
    let dir = tempfile::tempdir().unwrap();
    // Each text appears twice with the same label; whichever copy lands first wins.
    let mut text = common::tsv(2, 40);
    text.push_str(&common::tsv(2, 40));
    let f = common::write(dir.path(), "l.tsv", text.as_bytes());
    let u = common::write(
        dir.path(),
        "u.txt",
        common::tsv(2, 40)
            .lines()
            .map(|l| l.split('\t').nth(1).unwrap().to_owned() + "\n")
            .collect::<String>()
            .as_bytes(),
    );
    let out = dir.path().join("ds");
    let r = common::run(&[&f], &[&u], &out, &["split.labels_per_class=4"]).unwrap();
    assert_eq!(r.manifest.stats.duplicates, 80 + 80);
    assert_eq!(r.manifest.stats.documents, 80);
    let ds = Dataset::open(&out).unwrap();
    let mut ids_seen = HashSet::new();
    for (_, ids, ..) in all_docs(&ds) {
        assert!(ids_seen.insert(ids), "a document appears twice in the data set");
    }
}

#[test]
fn same_inputs_and_seed_give_identical_files() {
    let dir = tempfile::tempdir().unwrap();
    let f = common::write(dir.path(), "l.tsv", common::tsv(3, 30).as_bytes());
    let (a, b, c) = (dir.path().join("a"), dir.path().join("b"), dir.path().join("c"));
    common::run(&[&f], &[], &a, &["split.labels_per_class=3"]).unwrap();
    common::run(&[&f], &[], &b, &["split.labels_per_class=3"]).unwrap();
    common::run(&[&f], &[], &c, &["split.labels_per_class=3", "split.seed=2"]).unwrap();
    let read = |d: &std::path::Path, n: &str| std::fs::read(d.join(n)).unwrap();
    let mut files: Vec<String> =
        std::fs::read_dir(&a).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    files.sort();
    assert_eq!(files.len(), 2 + 4 * 8, "manifest, vocabulary and 32 shards: {files:?}");
    for name in &files {
        assert_eq!(read(&a, name), read(&b, name), "{name} differs between identical runs");
    }
    assert_ne!(read(&a, "train-00000.shard"), read(&c, "train-00000.shard"), "another seed, another split");
}

#[test]
fn unlabeled_only_data_set_for_pretraining() {
    let dir = tempfile::tempdir().unwrap();
    let u = common::write(dir.path(), "u.txt.gz", b"one sentence\ntwo sentences\n");
    let out = dir.path().join("ds");
    let r = common::run(&[], &[&u], &out, &[]).unwrap();
    assert!(r.manifest.labels.is_empty());
    assert_eq!(r.manifest.splits["unlabeled"].docs, 2);
    assert!(verify(&out).ok());
}

#[test]
fn fixed_test_set_and_fixed_label_list() {
    let dir = tempfile::tempdir().unwrap();
    let f = common::write(dir.path(), "l.tsv", common::tsv(2, 20).as_bytes());
    let t = common::write(dir.path(), "t.tsv", b"class1\ta held out text\nclass0\tanother held out text\n");
    let out = dir.path().join("ds");
    let sets = [
        format!("output.dir={:?}", out.display().to_string()),
        format!("input.labeled=[{:?}]", f.display().to_string()),
        format!("input.test=[{:?}]", t.display().to_string()),
        "split.test_fraction=0.0".into(),
        "input.labels=[\"class1\", \"class0\"]".into(),
    ];
    let r = dtrain::data::prepare::prepare(&common::config(&sets).unwrap(), false).unwrap();
    assert_eq!(r.manifest.labels, ["class1", "class0"], "the given order defines the label ids");
    assert_eq!(r.manifest.splits["test"].per_class, [1, 1]);
    assert!(r.manifest.split.fixed_test);
    let ds = Dataset::open(&out).unwrap();
    let first = ds.shards(SplitKind::Test)[0].doc(0);
    assert_eq!(first.label, Some(0), "class1 is label 0");
    assert_eq!(first.sample_id, 0, "test files are read first");
}

#[test]
fn truncation_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let f = common::write(dir.path(), "l.tsv", b"a\tone two three four five\nb\tsix seven\n");
    let out = dir.path().join("ds");
    let r = common::run(
        &[&f],
        &[],
        &out,
        &[
            "tokenizer.max_words=3",
            "tokenizer.word_ngrams=1",
            "split.test_fraction=0.0",
            "split.val_fraction=0.0",
        ],
    )
    .unwrap();
    assert_eq!(r.manifest.stats.truncated, 1);
    assert_eq!(r.manifest.stats.tokens, 3 + 2);
}

#[test]
fn deduplication_compares_words_not_hashed_ids() {
    let dir = tempfile::tempdir().unwrap();
    // 60 distinct documents into 2 buckets: nearly all collide as ids, none as words.
    let f = common::write(dir.path(), "l.tsv", common::tsv(2, 30).as_bytes());
    let r = common::run(
        &[&f],
        &[],
        &dir.path().join("ds"),
        &["tokenizer.buckets=2", "split.test_fraction=0.0", "split.val_fraction=0.0"],
    )
    .unwrap();
    assert_eq!(r.manifest.stats.duplicates, 0);
    assert_eq!(r.manifest.stats.documents, 60);
    // The same words under another label: a duplicate and a label conflict; case and
    // spacing differences are the same document once lower-cased.
    let g = common::write(dir.path(), "g.tsv", b"a\tSame   text\nb\tsame text\na\tother\nb\tmore\n");
    let r = common::run(
        &[&g],
        &[],
        &dir.path().join("ds2"),
        &["split.test_fraction=0.0", "split.val_fraction=0.0"],
    )
    .unwrap();
    assert_eq!((r.manifest.stats.duplicates, r.manifest.stats.label_conflicts), (1, 1));
}

#[test]
fn a_class_made_only_of_duplicates_is_an_error_not_a_silent_loss() {
    let dir = tempfile::tempdir().unwrap();
    let g = common::write(dir.path(), "g.tsv", b"a\tone text\na\ttwo text\nb\tone text\n");
    let e = common::run(
        &[&g],
        &[],
        &dir.path().join("ds"),
        &["split.test_fraction=0.0", "split.val_fraction=0.0"],
    )
    .map(|_| ())
    .unwrap_err()
    .to_string();
    assert!(e.contains("label `b` has no labeled document"), "{e}");
}

/// The kernel's flags of this process's mappings of `path` (the `VmFlags` lines of
/// /proc/self/smaps under the mapping's header).
fn mapping_flags(path: &std::path::Path) -> Vec<String> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    // smaps names the file by its resolved path (a temporary directory may be a link).
    let path = std::fs::canonicalize(path).unwrap();
    let name = path.to_str().unwrap();
    let mut out = Vec::new();
    let mut inside = false;
    for line in smaps.lines() {
        // A mapping's header: "start-end perms offset dev inode  path".
        let header = line.split_whitespace().next().is_some_and(|a| a.contains('-') && !a.ends_with(':'));
        if header {
            inside = line.ends_with(name);
        } else if inside {
            if let Some(flags) = line.strip_prefix("VmFlags:") {
                out.push(flags.trim().to_string());
            }
        }
    }
    out
}

/// A training loader reads its shards' rows in a shuffled order, so it advises the kernel
/// of random access ("rr" in smaps): no read-around on a fault. Without it a run on a
/// corpus larger than its memory limit re-read 751 GB for 1,000 steps
/// (bench/results/scale-5m.md). Shards no loader reads keep the default.
#[test]
fn a_loader_maps_its_shards_for_random_reads() {
    let dir = tempfile::tempdir().unwrap();
    let f = common::write(dir.path(), "x.tsv", common::tsv(3, 40).as_bytes());
    let out = dir.path().join("ds");
    common::run(&[&f], &[], &out, &["output.shards=2"]).unwrap();
    let ds = Dataset::open(&out).unwrap();
    let _loader = dtrain::data::loader::Loader::new(&ds, SplitKind::Train, 1, 2, 0, vec![0, 1]).unwrap();
    for (split, random) in [(SplitKind::Train, true), (SplitKind::Test, false)] {
        for shard in ds.shards(split) {
            let flags = mapping_flags(shard.path());
            assert_eq!(flags.len(), 1, "{}: one mapping, {flags:?}", shard.path().display());
            let rr = flags[0].split_whitespace().any(|f| f == "rr");
            assert_eq!(rr, random, "{}: VmFlags {}", shard.path().display(), flags[0]);
        }
    }
}
