//! Bad input never panics and never yields a silently wrong data set: each case below is an
//! error naming the file (and line), or with `skip_bad` a skipped and counted line.

mod common;

use std::path::Path;

use dtrain::data::dataset::Dataset;

/// Runs prepare on one labeled file with `content` and returns the error message.
fn error_for(name: &str, content: &[u8], extra: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let f = common::write(dir.path(), name, content);
    let out = dir.path().join("ds");
    let e = common::run(&[&f], &[], &out, extra).map(|_| ()).unwrap_err().to_string();
    assert!(!out.exists(), "a failed prepare must not leave an output directory");
    e
}

#[test]
fn bad_lines_are_errors_with_file_and_line() {
    let good = common::tsv(2, 10);
    let cases: [(&str, Vec<u8>, &str); 8] = [
        ("x.tsv", format!("{good}no tab on this line\n").into_bytes(), "x.tsv:21: no tab"),
        ("x.tsv", format!("{good}class0\t   \n").into_bytes(), "x.tsv:21: empty text"),
        ("x.tsv", [good.as_bytes(), b"class0\tbad \xff\xfe utf8\n"].concat(), "x.tsv:21: invalid UTF-8"),
        (
            "x.jsonl",
            b"{\"text\": \"a b\", \"label\": \"x\"}\n{\"text\": \"oops\"\n".to_vec(),
            "x.jsonl:2: invalid JSON",
        ),
        ("x.jsonl", b"{\"text\": \"a b\"}\n".to_vec(), "x.jsonl:1: missing label field `label`"),
        // Lines ending in CR alone (old Mac line ends) would read as one document.
        (
            "x.tsv",
            format!("{good}class0\tone\rclass1\ttwo\r").into_bytes(),
            "x.tsv:21: a carriage return (CR)",
        ),
        ("x.tsv.gz", format!("{good}\tno label\n").into_bytes(), "x.tsv.gz:21: empty label"),
        (
            "x.tsv",
            format!("{good}class0\tsee {}\n", "a".repeat(70_000)).into_bytes(),
            "x.tsv:21: a word of 70000 bytes",
        ),
    ];
    for (name, content, want) in cases {
        let e = error_for(name, &content, &[]);
        assert!(e.contains(want), "expected `{want}` in: {e}");
        assert!(e.contains("--skip-bad"), "the message says how to skip: {e}");
    }
}

#[test]
fn skip_bad_skips_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = common::tsv(2, 10).into_bytes();
    text.extend_from_slice(b"no tab\nclass0\t\nclass1\tbad \xff utf8\n\n");
    let f = common::write(dir.path(), "x.tsv", &text);
    let out = dir.path().join("ds");
    let r = common::run(&[&f], &[], &out, &["input.skip_bad=true"]).unwrap();
    assert_eq!(r.manifest.stats.skipped, 3);
    assert_eq!(r.manifest.stats.blank, 1);
    assert_eq!(r.manifest.stats.documents, 20);
    assert_eq!(r.skipped_examples.len(), 3);
    assert!(r.skipped_examples[0].contains("x.tsv:21: no tab"), "{:?}", r.skipped_examples);
}

#[test]
fn documents_without_features_are_bad_lines() {
    let e = error_for(
        "x.tsv",
        format!("{}class0\t!!! ...\n", common::tsv(2, 5)).as_bytes(),
        &["tokenizer.punctuation=\"drop\""],
    );
    assert!(e.contains("x.tsv:11: no features after tokenizing"), "{e}");
}

#[test]
fn unknown_labels_against_a_fixed_list() {
    let e = error_for("x.tsv", common::tsv(3, 5).as_bytes(), &["input.labels=[\"class0\", \"class1\"]"]);
    assert!(e.contains("x.tsv:3: unknown label `class2`"), "{e}");
}

#[test]
fn whole_input_problems_are_clear_errors() {
    // An empty file, or one with only blank lines, or only bad lines under skip_bad.
    let e = error_for("x.tsv", b"", &[]);
    assert!(e.contains("x.tsv: holds no document: 0 lines"), "{e}");
    let e = error_for("x.tsv", b"\n  \n", &[]);
    assert!(e.contains("x.tsv: holds no document: 2 lines, 2 blank"), "{e}");
    let e = error_for("x.tsv", b"no tab\n", &["input.skip_bad=true"]);
    assert!(e.contains("x.tsv: holds no document: 1 lines, 0 blank, 1 skipped"), "{e}");
    // An empty unlabeled file beside good labeled ones.
    let e = error_for(
        "x.tsv",
        common::tsv(2, 5).as_bytes(),
        &["input.unlabeled=[\"/dev/null\"]", "input.format=\"tsv\""],
    );
    assert!(e.contains("/dev/null: holds no document"), "{e}");
    // An output path that is a file.
    let dir = tempfile::tempdir().unwrap();
    let f = common::write(dir.path(), "x.tsv", common::tsv(2, 5).as_bytes());
    let e = common::run(&[&f], &[], &f, &["output.force=true"]).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("not a dtrain data set"), "{e}");
    assert!(f.is_file(), "the file is untouched");
    // An unknown format.
    let e = error_for("x.csv", b"a,b\n", &[]);
    assert!(e.contains("x.csv") && e.contains("unknown format"), "{e}");
    // Plain text given as labeled input.
    let e = error_for("x.txt", b"hello\n", &[]);
    assert!(e.contains("x.txt") && e.contains("--unlabeled"), "{e}");
    // K larger than a class.
    let e = error_for("x.tsv", common::tsv(2, 10).as_bytes(), &["split.labels_per_class=8"]);
    assert!(e.contains("labels_per_class 8 is larger than class `class0`"), "{e}");
    // A label that occurs only in the test split.
    let text = format!("{}lonely\tthe only one of its class\n", common::tsv(2, 10));
    let e = error_for("x.tsv", text.as_bytes(), &["split.test_fraction=0.5"]);
    assert!(e.contains("label `lonely` occurs only in the test split"), "{e}");
    // A file that does not exist.
    let e = error_for("x.tsv", b"", &["input.unlabeled=[\"/nonexistent/u.txt\"]"]);
    assert!(e.contains("/nonexistent/u.txt"), "{e}");
}

#[test]
fn corrupted_gzip_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = common::write(dir.path(), "x.tsv.gz", common::tsv(2, 200).as_bytes());
    let mut bytes = std::fs::read(&f).unwrap();
    let n = bytes.len();
    bytes.truncate(n / 2);
    std::fs::write(&f, &bytes).unwrap();
    let e = common::run(&[&f], &[], &dir.path().join("ds"), &[]).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("x.tsv.gz") && e.contains("read failed"), "{e}");
    // Gzip data under a plain name: said to be gzip, not bad UTF-8.
    let whole = std::fs::read(common::write(dir.path(), "y.tsv.gz", common::tsv(2, 20).as_bytes())).unwrap();
    let plain = common::write(dir.path(), "y.tsv", &whole);
    let e = common::run(&[&plain], &[], &dir.path().join("ds2"), &[]).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("y.tsv") && e.contains("is gzip-compressed") && e.contains("end in .gz"), "{e}");
}

#[test]
fn existing_output_is_never_lost() {
    let dir = tempfile::tempdir().unwrap();
    let f = common::write(dir.path(), "x.tsv", common::tsv(2, 10).as_bytes());
    let out = dir.path().join("ds");
    common::run(&[&f], &[], &out, &[]).unwrap();
    let before = std::fs::read(out.join("manifest.json")).unwrap();
    // Without --force: refused.
    let e = common::run(&[&f], &[], &out, &[]).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("already exists") && e.contains("--force"), "{e}");
    // With --force but a failing run: the old data set is untouched.
    let bad = common::write(dir.path(), "bad.tsv", b"no tab\n");
    assert!(common::run(&[&bad], &[], &out, &["output.force=true"]).is_err());
    assert_eq!(std::fs::read(out.join("manifest.json")).unwrap(), before);
    Dataset::open(&out).unwrap();
    // With --force and a good run: replaced, and no staging directories are left behind.
    common::run(&[&f], &[], &out, &["output.force=true", "split.seed=9"]).unwrap();
    assert_ne!(std::fs::read(out.join("manifest.json")).unwrap(), before);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with("ds."))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

fn prepared(dir: &Path) -> std::path::PathBuf {
    let f = common::write(dir, "x.tsv", common::tsv(3, 20).as_bytes());
    let out = dir.join("ds");
    common::run(&[&f], &[], &out, &["split.labels_per_class=4", "output.shards=2"]).unwrap();
    out
}

#[test]
fn corrupted_or_truncated_shards_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = prepared(dir.path());
    let shard = out.join("train-00001.shard");
    let original = std::fs::read(&shard).unwrap();

    // One flipped payload byte: open still works (structure intact), verify names the file.
    let mut flipped = original.clone();
    flipped[200] ^= 0x40;
    std::fs::write(&shard, &flipped).unwrap();
    let report = dtrain::data::dataset::verify(&out);
    assert!(!report.ok());
    let bad: Vec<_> = report.files.iter().filter(|(_, p)| p.is_some()).collect();
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0].0, "train-00001.shard");
    assert!(bad[0].1.as_ref().unwrap().contains("payload checksum"), "{bad:?}");
    // Training checks the payloads it will read before its first step.
    let c = common::train_config(&out, &dir.path().join("run"), &["train.steps=2"]);
    let e = common::train_run(&c, dtrain::train::Resume::No, None).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("train-00001.shard") && e.contains("payload checksum"), "{e}");
    let ds = Dataset::open(&out).unwrap();
    assert!(ds.verify_payloads(|k, i| k == dtrain::data::shard::SplitKind::Train && i == 0).is_ok());
    // The checksum is read from the file by its path: a file put in the mapped one's place
    // (another inode) is named as replaced, not checked in its stead.
    let copy = out.join("copy.tmp");
    std::fs::write(&copy, &original).unwrap();
    std::fs::rename(&copy, &shard).unwrap();
    let e = ds
        .verify_payloads(|k, i| k == dtrain::data::shard::SplitKind::Train && i == 1)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("train-00001.shard") && e.contains("was replaced while this run had it open"), "{e}");
    drop(ds);
    std::fs::write(&shard, &flipped).unwrap();
    // `inspect` decodes the sound shard's samples and names the damaged one instead of
    // showing its documents.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_dtrain"))
        .args(["inspect", out.to_str().unwrap(), "--samples", "100"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        text.contains("(not decoded: ") && text.contains("train-00001.shard: corrupted: payload checksum"),
        "{text}"
    );
    assert!(text.contains("train[0:0]") && !text.contains("train[1:"), "{text}");
    // A file of the data set where its directory is wanted is named, with its data set.
    let e = Dataset::open(&out.join("manifest.json")).map(|_| ()).unwrap_err().to_string();
    assert!(
        e.contains("is a file, not a data set directory")
            && e.contains(&format!("its data set is {}", out.display())),
        "{e}"
    );

    // A flipped header byte: refused at open.
    let mut header = original.clone();
    header[20] ^= 1;
    std::fs::write(&shard, &header).unwrap();
    let e = Dataset::open(&out).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("train-00001.shard") && e.contains("header checksum"), "{e}");
    // A header that counts more documents than 32-bit row numbers address (its checksum
    // made to match): refused by name, not read with truncated row numbers.
    let mut many = original.clone();
    many[16..24].copy_from_slice(&(1u64 << 32).to_le_bytes());
    let sum = xxhash_rust::xxh3::xxh3_64(&many[..152]);
    many[152..160].copy_from_slice(&sum.to_le_bytes());
    std::fs::write(&shard, &many).unwrap();
    let e = Dataset::open(&out).map(|_| ()).unwrap_err().to_string();
    assert!(
        e.contains("train-00001.shard") && e.contains("holds 4294967296 documents, more than a shard may"),
        "{e}"
    );

    // Truncated: refused at open, whatever the cut.
    for cut in [0, 10, 127, 128, original.len() / 2, original.len() - 1] {
        std::fs::write(&shard, &original[..cut]).unwrap();
        let e = Dataset::open(&out).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("train-00001.shard") && e.contains("truncated"), "cut {cut}: {e}");
    }

    // Not a shard at all, also when shorter than a shard's header.
    for len in [original.len(), 44] {
        std::fs::write(&shard, vec![b'{'; len]).unwrap();
        let e = Dataset::open(&out).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("not a dtrain shard") && !e.contains("truncated"), "{len} bytes: {e}");
    }

    // Missing.
    std::fs::remove_file(&shard).unwrap();
    let e = Dataset::open(&out).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("train-00001.shard"), "{e}");
}

#[test]
fn shard_swapped_in_from_another_data_set_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = prepared(dir.path());
    // Same inputs, another tokenizer: its shard carries another tokenizer hash.
    let f = dir.path().join("x.tsv");
    let other = dir.path().join("other");
    common::run(
        &[&f],
        &[],
        &other,
        &["split.labels_per_class=4", "output.shards=2", "tokenizer.word_ngrams=1"],
    )
    .unwrap();
    std::fs::copy(other.join("val-00000.shard"), out.join("val-00000.shard")).unwrap();
    let e = Dataset::open(&out).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("val-00000.shard") && e.contains("another tokenizer"), "{e}");
}

#[test]
fn corrupted_manifest_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = prepared(dir.path());
    let path = out.join("manifest.json");
    let text = std::fs::read_to_string(&path).unwrap();

    // An edited value: the checksum catches it.
    std::fs::write(&path, text.replacen("\"seed\": 1", "\"seed\": 2", 1)).unwrap();
    let e = Dataset::open(&out).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("manifest.json") && e.contains("checksum"), "{e}");

    // Truncated JSON.
    std::fs::write(&path, &text[..text.len() / 2]).unwrap();
    let e = Dataset::open(&out).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("manifest.json") && e.contains("not a valid dtrain manifest"), "{e}");
    let report = dtrain::data::dataset::verify(&out);
    assert!(!report.ok());

    // Missing.
    std::fs::remove_file(&path).unwrap();
    let e = Dataset::open(&out).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("manifest.json"), "{e}");
}

#[test]
fn force_never_replaces_what_is_not_a_data_set_or_holds_an_input() {
    let dir = tempfile::tempdir().unwrap();
    // A directory that is not a data set, holding the input itself.
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let f = common::write(&data, "x.tsv", common::tsv(2, 10).as_bytes());
    let e = common::run(&[&f], &[], &data, &["output.force=true"]).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("not a dtrain data set"), "{e}");
    assert!(f.exists(), "the input survives");
    // A data set directory that holds an input.
    let out = dir.path().join("ds");
    common::run(&[&f], &[], &out, &[]).unwrap();
    let inside = common::write(&out, "more.tsv", common::tsv(2, 10).as_bytes());
    let e = common::run(&[&inside], &[], &out, &["output.force=true"]).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("more.tsv") && e.contains("inside the output directory"), "{e}");
    assert!(inside.exists());
    // An existing output without --force is refused before any work.
    let e = common::run(&[&f], &[], &out, &[]).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("already exists"), "{e}");
    // A data set holding a file of the user's: --force would delete it, so it is refused;
    // without it, --force replaces the data set.
    std::fs::remove_file(&inside).unwrap();
    let notes = common::write(&out, "my_notes.txt", b"keep me");
    let e = common::run(&[&f], &[], &out, &["output.force=true"]).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("my_notes.txt") && e.contains("not written by dtrain prepare"), "{e}");
    assert_eq!(std::fs::read(&notes).unwrap(), b"keep me");
    std::fs::remove_file(&notes).unwrap();
    common::run(&[&f], &[], &out, &["output.force=true"]).unwrap();
}

/// An output directory under an existing file (prepare's --out, train's out_dir) is refused
/// naming that file and the rule, not with the OS's bare "File exists" or "Not a
/// directory"; the file is left as it was.
#[test]
fn an_output_directory_under_a_file_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = common::write(dir.path(), "x.tsv", common::tsv(2, 10).as_bytes());
    let e = common::run(&[&f], &[], &f.join("ds"), &[]).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("x.tsv") && e.contains("is a file, not a directory"), "{e}");
    let data = dir.path().join("ds");
    common::run(&[&f], &[], &data, &["output.shards=1"]).unwrap();
    for out in [f.join("run"), f.clone()] {
        let cfg = common::train_config(&data, &out, &["train.epochs=1"]);
        let e = common::train_run(&cfg, dtrain::train::Resume::No, None).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("x.tsv") && e.contains("is a file, not a directory"), "{}: {e}", out.display());
    }
    assert_eq!(std::fs::read_to_string(&f).unwrap(), common::tsv(2, 10));
    // A symbolic link in a loop where the run's checkpoints go.
    let out = dir.path().join("run");
    std::fs::create_dir(&out).unwrap();
    std::os::unix::fs::symlink("checkpoints", out.join("checkpoints")).unwrap();
    let cfg = common::train_config(&data, &out, &["train.epochs=1"]);
    let e = common::train_run(&cfg, dtrain::train::Resume::No, None).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("checkpoints") && e.contains("is a symbolic link that leads nowhere"), "{e}");
}

/// A tokenizer.json with an empty vocabulary is refused by name (it once divided by zero).
#[test]
fn a_tokenizer_without_a_vocabulary_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tok = common::write(
        dir.path(),
        "tok.json",
        br###"{"model":{"type":"WordPiece","vocab":{},"unk_token":"[UNK]","continuing_subword_prefix":"##","max_input_chars_per_word":100}}"###,
    );
    let set = format!("tokenizer.subword.path={:?}", tok.display().to_string());
    let e = error_for("x.tsv", common::tsv(2, 10).as_bytes(), &[&set]);
    assert!(e.contains("tok.json") && e.contains("vocabulary is empty"), "{e}");
}

/// A tokenizer that adds no [CLS] … [SEP] frame (its post_processor removed) is refused:
/// pooling, truncation, augmentation and masked-LM would otherwise treat the first and last
/// words as the frame. MiniLM's own tokenizer, the control, is accepted.
#[test]
fn a_tokenizer_without_its_special_token_frame_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let original = std::fs::read_to_string(common::minilm().join("tokenizer.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&original).unwrap();
    json["post_processor"] = serde_json::Value::Null;
    let bare = common::write(dir.path(), "bare.json", json.to_string().as_bytes());
    let set = format!("tokenizer.subword.path={:?}", bare.display().to_string());
    let e = error_for("x.tsv", common::tsv(2, 10).as_bytes(), &[&set]);
    assert!(e.contains("bare.json") && e.contains("opening and one closing special token"), "{e}");
    let good = common::write(dir.path(), "good.json", original.as_bytes());
    let set = format!("tokenizer.subword.path={:?}", good.display().to_string());
    let f = common::write(dir.path(), "x.tsv", common::tsv(2, 10).as_bytes());
    common::run(&[&f], &[], &dir.path().join("ds"), &[&set]).unwrap();
}

#[test]
fn byte_order_mark_is_not_part_of_the_first_label() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!("\u{feff}{}", common::tsv(2, 10));
    let f = common::write(dir.path(), "x.tsv", text.as_bytes());
    let r = common::run(&[&f], &[], &dir.path().join("ds"), &[]).unwrap();
    assert_eq!(r.manifest.labels, ["class0", "class1"]);
    let j = common::write(
        dir.path(),
        "x.jsonl",
        "\u{feff}{\"text\": \"a b\", \"label\": \"x\"}\n{\"text\": \"c\", \"label\": \"y\"}\n".as_bytes(),
    );
    let r = common::run(
        &[&j],
        &[],
        &dir.path().join("ds2"),
        &["split.test_fraction=0.0", "split.val_fraction=0.0"],
    )
    .unwrap();
    assert_eq!(r.manifest.labels, ["x", "y"]);
    // A zero-byte .gz is an empty input, not a read failure.
    let e = error_for("x.tsv.gz", b"", &[]);
    assert!(e.contains("holds no document"), "{e}");
}

/// A damaged vocabulary is reported once, by `verify`, without blaming every shard for
/// the word ids it can no longer check.
#[test]
fn a_damaged_vocabulary_is_blamed_alone() {
    let dir = tempfile::tempdir().unwrap();
    let out = prepared(dir.path());
    let vocab = out.join("vocab.bin");
    let b = std::fs::read(&vocab).unwrap();
    std::fs::write(&vocab, &b[..b.len() / 2]).unwrap();
    let report = dtrain::data::dataset::verify(&out);
    assert!(!report.ok());
    let bad: Vec<_> = report.files.iter().filter(|(_, p)| p.is_some()).map(|(f, _)| f.as_str()).collect();
    assert_eq!(bad, ["vocab.bin"], "{:?}", report.files);
}

/// A document is checked against its data set's limits before a model reads it: an id
/// past the bucket count, or more tokens than `subword.max_len`, is an error naming the
/// shard (what a corrupted payload that passed the structural checks would show).
#[test]
fn documents_past_their_data_sets_limits_are_named() {
    use dtrain::data::shard::DocLimits;
    let dir = tempfile::tempdir().unwrap();
    let out = prepared(dir.path());
    let ds = Dataset::open(&out).unwrap();
    let shard = &ds.shards(dtrain::data::shard::SplitKind::Train)[0];
    let doc = shard.doc(0);
    let ok = DocLimits::of(&ds.manifest().tokenizer);
    assert_eq!(shard.doc_checked(0, ok).unwrap().ids, doc.ids);
    let top = *doc.ids.iter().max().unwrap();
    let e = shard.doc_checked(0, DocLimits { buckets: top, max_len: None }).err().unwrap().to_string();
    assert!(
        e.contains("train-00000.shard")
            && e.contains(&format!("has id {top}, not below the bucket count {top}")),
        "{e}"
    );
    let n = doc.ids.len();
    let e = shard.doc_checked(0, DocLimits { max_len: Some(n - 1), ..ok }).err().unwrap().to_string();
    assert!(
        e.contains("train-00000.shard")
            && e.contains(&format!("has {n} tokens, more than the data set's subword.max_len {}", n - 1)),
        "{e}"
    );
}

/// Rewrites a shard's header fields and recomputes its header checksum, as a deliberate
/// forger would: only the structural rules can catch such a file.
fn forge(path: &Path, edit: impl Fn(&mut Vec<u8>)) {
    let mut b = std::fs::read(path).unwrap();
    edit(&mut b);
    let sum = xxhash_rust::xxh3::xxh3_64(&b[..152]);
    b[152..160].copy_from_slice(&sum.to_le_bytes());
    std::fs::write(path, b).unwrap();
}

/// A shard of format version 1 (before word sequences) is refused with what to do.
#[test]
fn old_shard_versions_ask_for_a_new_prepare() {
    let dir = tempfile::tempdir().unwrap();
    let out = prepared(dir.path());
    forge(&out.join("train-00000.shard"), |b| b[8..12].copy_from_slice(&1u32.to_le_bytes()));
    let e = Dataset::open(&out).map(|_| ()).unwrap_err().to_string();
    assert!(
        e.contains("train-00000.shard") && e.contains("version 1") && e.contains("prepare the data again"),
        "{e}"
    );
}

#[test]
fn forged_sections_and_labels_are_refused_without_panics() {
    let dir = tempfile::tempdir().unwrap();
    let out = prepared(dir.path());
    let shard = out.join("train-00000.shard");
    let original = std::fs::read(&shard).unwrap();
    // The labels section pointed at the hidden-label section (overlapping sections).
    forge(&shard, |b| {
        let hidden = b[112..120].to_vec();
        b[96..104].copy_from_slice(&hidden);
    });
    let e = Dataset::open(&out).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("train-00000.shard") && e.contains("section table"), "{e}");
    assert!(!dtrain::data::dataset::verify(&out).ok());

    // A label out of range in the payload: open refuses it, and so does the CLI, without a panic.
    std::fs::write(&shard, &original).unwrap();
    let labels_at = u64::from_le_bytes(original[96..104].try_into().unwrap()) as usize;
    let mut bad = original.clone();
    bad[labels_at..labels_at + 4].copy_from_slice(&7i32.to_le_bytes());
    std::fs::write(&shard, &bad).unwrap();
    let e = Dataset::open(&out).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("train-00000.shard") && e.contains("label 7"), "{e}");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_dtrain"))
        .args(["inspect", out.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && text.contains("label 7") && !text.contains("panicked"), "{text}");

    // An unlabeled document with a label.
    std::fs::write(&shard, &original).unwrap();
    let u = out.join("unlabeled-00000.shard");
    let ub = std::fs::read(&u).unwrap();
    let at = u64::from_le_bytes(ub[96..104].try_into().unwrap()) as usize;
    let mut ub2 = ub.clone();
    ub2[at..at + 4].copy_from_slice(&0i32.to_le_bytes());
    std::fs::write(&u, &ub2).unwrap();
    let e = Dataset::open(&out).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("unlabeled-00000.shard") && e.contains("no label is allowed"), "{e}");
}

#[test]
fn labels_that_differ_only_in_unicode_composition_are_one_class() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::new();
    for i in 0..10 {
        // "café" composed (U+00E9) and decomposed (e + U+0301), and another class.
        text.push_str(&format!(
            "caf\u{e9}\tcoffee number {i}\ncafe\u{301}\tespresso number {i}\ntea\tgreen number {i}\n"
        ));
    }
    let f = common::write(dir.path(), "x.tsv", text.as_bytes());
    let r = common::run(&[&f], &[], &dir.path().join("ds"), &[]).unwrap();
    assert_eq!(r.manifest.labels, ["caf\u{e9}", "tea"]);
    assert_eq!(r.manifest.splits.values().flat_map(|s| &s.per_class).sum::<u64>(), 30);
    // A fixed label list is read the same way, either spelling matching either.
    let r = common::run(&[&f], &[], &dir.path().join("ds2"), &["input.labels=[\"tea\", \"cafe\u{301}\"]"])
        .unwrap();
    assert_eq!(r.manifest.labels, ["tea", "caf\u{e9}"]);
    let e = common::config(&[
        format!("input.labeled=[{:?}]", f.display().to_string()),
        "input.labels=[\"caf\u{e9}\", \"cafe\u{301}\"]".to_string(),
    ])
    .map(|_| ())
    .unwrap_err()
    .to_string();
    assert!(e.contains("input.labels") && e.contains("listed twice"), "{e}");
}

#[test]
fn forged_but_checksummed_manifest_inconsistencies_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = prepared(dir.path());
    let path = out.join("manifest.json");
    let original = std::fs::read_to_string(&path).unwrap();
    let forged = |edit: &dyn Fn(&mut dtrain::data::manifest::Manifest)| {
        let mut m: dtrain::data::manifest::Manifest = serde_json::from_str(&original).unwrap();
        edit(&mut m);
        m.write(&out).unwrap(); // recomputes the checksum
        Dataset::open(&out).map(|_| ()).unwrap_err().to_string()
    };
    // Two classes of one name.
    let e = forged(&|m| m.labels[1] = m.labels[0].clone());
    assert!(e.contains("manifest.json") && e.contains("is listed twice"), "{e}");
    // A class name prepare never writes.
    let e = forged(&|m| m.labels[1] = "a\tb".into());
    assert!(e.contains("manifest.json") && e.contains("control character"), "{e}");
    // Per-class counts that the shards' label columns do not hold; verify says so too.
    let e = forged(&|m| {
        let t = m.splits.get_mut("train").unwrap();
        t.per_class[0] += 1;
        t.per_class[1] -= 1;
    });
    assert!(
        e.contains("manifest.json") && e.contains("split `train` lists [5, 3, 4] documents per class"),
        "{e}"
    );
    let report = dtrain::data::dataset::verify(&out);
    assert!(report
        .files
        .iter()
        .any(|(f, p)| f == "manifest.json" && p.as_deref().is_some_and(|p| p.contains("label columns"))));
    std::fs::write(&path, &original).unwrap();
    let mut m: dtrain::data::manifest::Manifest = serde_json::from_str(&original).unwrap();
    m.labels.push("extra".into());
    m.write(&out).unwrap(); // recomputes the checksum
    let e = Dataset::open(&out).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("manifest.json") && e.contains("per-class counts"), "{e}");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_dtrain"))
        .args(["inspect", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!o.status.success() && !String::from_utf8_lossy(&o.stderr).contains("panicked"));
}

/// Runs the dtrain binary with `args`; its exit status and stderr.
fn dtrain_cli(args: &[&std::ffi::OsStr]) -> (bool, String) {
    let o =
        std::process::Command::new(env!("CARGO_BIN_EXE_dtrain")).arg("--quiet").args(args).output().unwrap();
    (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// Outputs that would destroy data are refused before any work, and the file is left as it
/// was: `bench --json` onto its own input or into a data set, `plot --output` onto a file
/// that is not a PNG or with another extension, a run's out_dir inside a checkpoint or a
/// data set.
#[test]
fn outputs_never_replace_inputs_data_sets_or_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let f = common::write(dir.path(), "x.tsv", common::tsv(2, 10).as_bytes());
    let text = std::fs::read(&f).unwrap();
    let os = |s: &str| std::ffi::OsString::from(s);
    let (ok, e) = dtrain_cli(&[
        &os("bench"),
        &os("prepare"),
        &os("--input"),
        f.as_os_str(),
        &os("--json"),
        f.as_os_str(),
    ]);
    assert!(!ok && e.contains("--json") && e.contains("is the input"), "{e}");
    assert_eq!(std::fs::read(&f).unwrap(), text);
    let data = dir.path().join("ds");
    common::run(&[&f], &[], &data, &["output.shards=1"]).unwrap();
    let into = data.join("b.json");
    let (ok, e) = dtrain_cli(&[
        &os("bench"),
        &os("padding"),
        &os("--data"),
        data.as_os_str(),
        &os("--json"),
        into.as_os_str(),
    ]);
    assert!(!ok && e.contains("a prepared data set") && !into.exists(), "{e}");
    // bench padding measures an encoder's batches: hashed features are refused by name.
    let (ok, e) = dtrain_cli(&[&os("bench"), &os("padding"), &os("--data"), data.as_os_str()]);
    assert!(!ok && e.contains("holds hashed features"), "{e}");
    // A run, then its checkpoint as another run's out_dir, and the data set itself.
    let run_dir = dir.path().join("run");
    let cfg = common::train_config(&data, &run_dir, &["train.epochs=1"]);
    common::train_run(&cfg, dtrain::train::Resume::No, None).unwrap();
    let ckpt = common::last_checkpoint(&run_dir);
    for (out, what) in [(ckpt.join("nested"), "a checkpoint"), (data.clone(), "a prepared data set")] {
        let cfg = common::train_config(&data, &out, &["train.epochs=1"]);
        let e = common::train_run(&cfg, dtrain::train::Resume::No, None).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("train.out_dir") && e.contains(what), "{e}");
    }
    assert!(!ckpt.join("nested").exists() && !data.join("checkpoints").exists());
    // plot: only a .png, only over a PNG, only in an existing directory; never the metrics.
    let metrics = run_dir.join("metrics.jsonl");
    let m = std::fs::read(&metrics).unwrap();
    for (out, want) in [
        (metrics.clone(), "must be a .png file"),
        (f.clone(), "must be a .png file"),
        (dir.path().join("missing/c.png"), "does not exist"),
    ] {
        let (ok, e) = dtrain_cli(&[&os("plot"), metrics.as_os_str(), &os("--output"), out.as_os_str()]);
        assert!(!ok && e.contains(want), "{}: {e}", out.display());
    }
    let fake = common::write(dir.path(), "fake.png", b"not a png");
    let (ok, e) = dtrain_cli(&[&os("plot"), metrics.as_os_str(), &os("--output"), fake.as_os_str()]);
    assert!(!ok && e.contains("not a file of the kind this writes"), "{e}");
    assert_eq!(std::fs::read(&fake).unwrap(), b"not a png");
    assert_eq!(std::fs::read(&metrics).unwrap(), m);
    assert_eq!(std::fs::read(&f).unwrap(), text);
    // A real plot, then another over it: PNG over PNG is allowed, and no temporary is left.
    let png = dir.path().join("c.png");
    for _ in 0..2 {
        let (ok, e) = dtrain_cli(&[&os("plot"), metrics.as_os_str(), &os("--output"), png.as_os_str()]);
        assert!(ok, "{e}");
    }
    assert!(std::fs::read(&png).unwrap().starts_with(dtrain::plot::PNG_MAGIC));
    assert!(!dir.path().join("c.png.tmp.png").exists());
    // predict: never over a JSON-lines corpus (its records hold the text) nor the tokenizer
    // it was given; over its own earlier output, yes.
    let input = common::write(
        dir.path(),
        "in.txt",
        b"alpha beta
",
    );
    let corpus = common::write(dir.path(), "corpus.jsonl", b"{\"label\": \"c0\", \"text\": \"kept\"}\n");
    let tok = common::write(dir.path(), "tokenizer.json", b"{\"model\": {}}\n");
    let arg = std::ffi::OsStr::new;
    let predict = |out: &Path, extra: &[&std::ffi::OsStr]| {
        let mut args =
            vec![arg("predict"), arg("--checkpoint"), ckpt.as_os_str(), arg("--input"), input.as_os_str()];
        args.extend_from_slice(extra);
        args.extend([arg("--output"), out.as_os_str()]);
        dtrain_cli(&args)
    };
    let (ok, e) = predict(Path::new("-"), &[]);
    assert!(!ok && e.contains("`-` (standard input or output) is not supported"), "{e}");
    assert!(!Path::new("-").exists());
    let (ok, e) = predict(&corpus, &[]);
    assert!(!ok && e.contains("not dtrain's predictions"), "{e}");
    let (ok, e) = predict(&tok, &[arg("--tokenizer"), tok.as_os_str()]);
    assert!(!ok && e.contains("is the input"), "{e}");
    assert_eq!(std::fs::read(&corpus).unwrap(), b"{\"label\": \"c0\", \"text\": \"kept\"}\n");
    assert_eq!(std::fs::read(&tok).unwrap(), b"{\"model\": {}}\n");
    let preds = dir.path().join("preds.jsonl");
    for _ in 0..2 {
        let (ok, e) = predict(&preds, &[]);
        assert!(ok, "{e}");
    }
}

/// A class name of any length prepares, is described, trains and is reported: the text
/// reports cap their name column's width (a width taken from the name itself panicked
/// from 65,536 bytes on, past Rust's limit on format widths).
#[test]
fn a_very_long_class_name_never_panics_a_report() {
    let dir = tempfile::tempdir().unwrap();
    let long = "L".repeat(70_000);
    let mut tsv = String::new();
    for i in 0..60 {
        let label = if i % 2 == 0 { long.as_str() } else { "short" };
        tsv.push_str(&format!("{label}\tword{} shared x {i}\n", i % 2));
    }
    let f = common::write(dir.path(), "x.tsv", tsv.as_bytes());
    let data = dir.path().join("ds");
    common::run(&[&f], &[], &data, &["split.labels_per_class=10"]).unwrap();
    let manifest = Dataset::open(&data).unwrap().manifest().clone();
    let text = dtrain::data::dataset::describe(&manifest);
    assert!(text.contains(&long) && text.contains("short"), "both classes are listed");
    let cfg = common::train_config(&data, &dir.path().join("run"), &["train.steps=2"]);
    let r = common::train_run(&cfg, dtrain::train::Resume::No, None).unwrap();
    let report = r.test.expect("a test split").to_text();
    assert!(report.contains(&long) && report.contains("confusion matrix"), "the report names the class");
}

/// What is likely a mistake is made, and warned of: fractions of classes too small to round
/// to a document (an empty split), a single class, labels that differ only in case or in
/// invisible characters.
#[test]
fn prepare_warns_of_empty_splits_one_class_and_case_only_labels() {
    let dir = tempfile::tempdir().unwrap();
    let f = common::write(dir.path(), "x.tsv", common::tsv(3, 2).as_bytes());
    let r = common::run(&[&f], &[], &dir.path().join("ds"), &["output.shards=1"]).unwrap();
    assert_eq!((r.manifest.splits["test"].docs, r.manifest.splits["val"].docs), (0, 0));
    assert!(
        r.warnings.iter().any(|w| w.contains("split.test_fraction = 0.2 holds out no document"))
            && r.warnings.iter().any(|w| w.contains("split.val_fraction = 0.1")),
        "{:?}",
        r.warnings
    );
    let f = common::write(dir.path(), "y.tsv", common::tsv(3, 40).as_bytes());
    let r = common::run(&[&f], &[], &dir.path().join("ok"), &["output.shards=1"]).unwrap();
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    // One class, and two labels that differ only in case: made, and warned of.
    let mut one = String::new();
    for i in 0..20 {
        one.push_str(&format!("news\tstory number {i}\n"));
    }
    let f = common::write(dir.path(), "one.tsv", one.as_bytes());
    let r = common::run(&[&f], &[], &dir.path().join("one"), &["output.shards=1"]).unwrap();
    assert!(r.warnings.iter().any(|w| w.contains("one class (\"news\")")), "{:?}", r.warnings);
    // The pool with the first rows' label spelled `label`: its warnings and classes.
    let relabelled = |name: &str, label: &str, rows: usize| {
        let mut text = one.clone();
        for i in 1..=rows {
            text =
                text.replace(&format!("news\tstory number {i}\n"), &format!("{label}\tstory number {i}\n"));
        }
        let f = common::write(dir.path(), &format!("{name}.tsv"), text.as_bytes());
        let r = common::run(&[&f], &[], &dir.path().join(name), &["output.shards=1"]).unwrap();
        (r.warnings, r.manifest.labels.len())
    };
    let (w, _) = relabelled("case", "News", 1);
    assert!(w.iter().any(|w| w.contains("\"News\" and \"news\" differ only in case")), "{w:?}");
    // A zero-width space pasted into a label makes a second class that looks like the first.
    let (w, classes) = relabelled("zwsp", "ne\u{200B}ws", 1);
    assert_eq!(classes, 2, "two classes, as the bytes say");
    assert!(w.iter().any(|w| w.contains("differ only in invisible characters (U+200B)")), "{w:?}");
    // In case as well, and the character named once.
    let (w, _) = relabelled("both", "Ne\u{200B}ws", 2);
    assert!(
        w.iter().any(|w| w.contains("differ only in case and invisible characters (U+200B), and")),
        "{w:?}"
    );
}
