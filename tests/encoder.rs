//! The Transformer encoder: pretrained MiniLM loaded from its safetensors, its tokenizer's
//! ids against pinned reference ids, padding that changes nothing, and clear errors for a
//! foreign checkpoint. (The pooled outputs against an independent numpy BERT are checked in
//! tests/python/test_encoder.py; the layers' gradients in tests/gradcheck.rs.)
//!
//! Needs models/minilm (`launch/fetch-model minilm`, which launch/setup runs).

mod common;

use std::path::Path;

use dtrain::backend::cpu::Cpu;
use dtrain::backend::Activation;
use dtrain::data::subword::SubwordTokenizer;
use dtrain::model::encoder::{load_pretrained, Encoder, EncoderActs, EncoderSpec, Pooling, TokenBatch};

use common::minilm;

/// Reference ids from Hugging Face's Python `tokenizers` 0.23.3 on the same tokenizer.json
/// (padding and truncation off), English and Chinese: characters outside the vocabulary
/// become [UNK] = 100, accents are stripped, punctuation splits.
#[test]
fn tokenizer_ids_match_the_reference() {
    let tok = SubwordTokenizer::open(&minilm().join("tokenizer.json")).unwrap();
    let cases: &[(&str, &[u32])] = &[
        ("Hello world", &[101, 7592, 2088, 102]),
        (
            "The quick brown fox jumps over the lazy dog.",
            &[101, 1996, 4248, 2829, 4419, 14523, 2058, 1996, 13971, 3899, 1012, 102],
        ),
        (
            "Semi-supervised learning doesn't need many labels!",
            &[101, 4100, 1011, 13588, 4083, 2987, 1005, 1056, 2342, 2116, 10873, 999, 102],
        ),
        ("北京是中国的首都", &[101, 1781, 1755, 100, 1746, 1799, 1916, 100, 1961, 102]),
        ("Übermäßig café naïve", &[101, 19169, 2863, 19310, 8004, 7668, 15743, 102]),
    ];
    for (text, want) in cases {
        assert_eq!(tok.encode(text, 512).unwrap(), *want, "{text:?}");
    }
    assert_eq!(tok.pad, 0);
    // Truncation keeps [CLS] … [SEP].
    assert_eq!(
        tok.encode("The quick brown fox jumps over the lazy dog.", 5).unwrap(),
        [101, 1996, 4248, 2829, 102]
    );
}

fn pooled(model: &Encoder, params: &[f32], seqs: &[Vec<u32>]) -> Vec<Vec<f32>> {
    let be = Cpu::<f32>::new();
    let tb = TokenBatch::new(seqs, 0);
    let mut acts = EncoderActs::new(&be);
    model.forward(&be, &params.to_vec(), &tb, None, &mut acts);
    acts.pooled.chunks(model.spec.hidden).map(|c| c.to_vec()).collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// A sequence's pooled vector is the same alone and padded inside a batch with a longer
/// one: padding tokens are masked out of attention and pooling. For MiniLM (post-LN, mean
/// pooling) and for a small pre-LN encoder with [CLS] pooling.
#[test]
fn padding_changes_no_sequence_output() {
    let (mini, mp) = load_pretrained(&minilm(), 3, Pooling::Mean, 1).unwrap();
    // Its dropouts come from its config.json (hidden_dropout_prob, attention_probs_dropout_prob).
    assert_eq!((mini.spec.dropout, mini.spec.attention_dropout), (0.1, 0.1));
    let short = vec![101u32, 7592, 2088, 102];
    let long = vec![101u32, 1996, 4248, 2829, 4419, 14523, 2058, 1996, 13971, 3899, 1012, 102];
    let alone = pooled(&mini, &mp, std::slice::from_ref(&short));
    let batched = pooled(&mini, &mp, &[long.clone(), short.clone()]);
    assert!(max_diff(&alone[0], &batched[1]) < 1e-5, "{}", max_diff(&alone[0], &batched[1]));
    assert!(max_diff(&batched[0], &batched[1]) > 1e-2, "different texts, different vectors");
    let spec = EncoderSpec {
        vocab: 50,
        hidden: 12,
        layers: 2,
        heads: 3,
        intermediate: 20,
        max_positions: 16,
        type_vocab: 2,
        layer_norm_eps: 1e-6,
        activation: Activation::Gelu,
        pre_ln: true,
        pooling: Pooling::Cls,
        classes: 4,
        dropout: 0.0,
        attention_dropout: 0.0,
        recompute: false,
    };
    let pre = Encoder::new(spec);
    assert!(pre.layout.get("encoder.LayerNorm.weight").is_some());
    let pp: Vec<f32> = pre.init(7);
    let (a, b) = (vec![1u32, 5, 9], vec![1u32, 7, 3, 3, 8, 2]);
    let alone = pooled(&pre, &pp, std::slice::from_ref(&a));
    let batched = pooled(&pre, &pp, &[b, a]);
    assert!(max_diff(&alone[0], &batched[1]) < 1e-5);
    assert!(alone[0].iter().all(|v| v.is_finite()) && alone[0].iter().any(|&v| v != 0.0));
}

/// A checkpoint whose config disagrees with its tensors, or that lacks a tensor, is refused
/// with the file and the tensor named.
#[test]
fn a_foreign_checkpoint_is_refused_naming_the_tensor() {
    let src = minilm();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("model.safetensors"), dir.path().join("model.safetensors")).unwrap();
    let cfg = std::fs::read_to_string(src.join("config.json")).unwrap();
    // The error of loading with `from` in config.json replaced by `to`.
    let refused = |from: &str, to: &str| {
        assert!(cfg.contains(from), "{from}");
        std::fs::write(dir.path().join("config.json"), cfg.replace(from, to)).unwrap();
        load_pretrained(dir.path(), 2, Pooling::Mean, 0).unwrap_err().to_string()
    };
    let e = refused("\"intermediate_size\": 1536", "\"intermediate_size\": 1024");
    assert!(
        e.contains("model.safetensors") && e.contains("encoder.layer.0.intermediate.dense.weight"),
        "{e}"
    );
    let e = refused("\"num_hidden_layers\": 6", "\"num_hidden_layers\": 7");
    assert!(e.contains("no tensor encoder.layer.6."), "{e}");
    // Fewer layers in the config than in the file would drop the rest silently.
    let e = refused("\"num_hidden_layers\": 6", "\"num_hidden_layers\": 5");
    assert!(e.contains("encoder.layer.5.") && e.contains("beyond the 5 layers"), "{e}");
    // The tensor named is the first in sorted order, the same on every run.
    let e = refused("\"num_hidden_layers\": 6", "\"num_hidden_layers\": 3");
    assert!(
        e.contains("holds tensor encoder.layer.3.attention.output.LayerNorm.bias, beyond the 3 layers"),
        "{e}"
    );
    // A file holding a tensor both with and without the `bert.` prefix is ambiguous.
    std::fs::write(dir.path().join("config.json"), &cfg).unwrap();
    {
        let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut tensors: Vec<(String, safetensors::tensor::TensorView)> = st.tensors();
        let name = "embeddings.word_embeddings.weight";
        let view = st.tensor(name).unwrap();
        tensors.push((format!("bert.{name}"), view));
        safetensors::serialize_to_file(tensors, None, &dir.path().join("model.safetensors")).unwrap();
    }
    let e = load_pretrained(dir.path(), 2, Pooling::Mean, 0).unwrap_err().to_string();
    assert!(
        e.contains("holds both embeddings.word_embeddings.weight and bert.embeddings.word_embeddings.weight"),
        "{e}"
    );
    std::fs::copy(src.join("model.safetensors"), dir.path().join("model.safetensors")).unwrap();
    // A key of the wrong type, or an option the encoder does not have, is refused by name
    // (not replaced by its default).
    for (from, to, want) in [
        (
            "\"hidden_dropout_prob\": 0.1",
            "\"hidden_dropout_prob\": \"0.9\"",
            "`hidden_dropout_prob` must be a number",
        ),
        ("\"hidden_act\": \"gelu\"", "\"hidden_act\": 5", "`hidden_act` must be a string"),
        ("\"absolute\"", "\"relative_key\"", "`position_embedding_type` \"relative_key\" is not supported"),
        // Another family's keys in BERT's names (RoBERTa counts positions from the padding id).
        (
            "\"model_type\": \"bert\"",
            "\"model_type\": \"roberta\"",
            "`model_type` \"roberta\" is not supported",
        ),
    ] {
        let e = refused(from, to);
        assert!(e.contains("config.json") && e.contains(want), "{e}");
    }
    // Sizes no file can back are refused by key before anything is allocated: they used to
    // overflow the layout (a panic), abort on a 20 PB allocation, allocate 7 GB for 1000
    // layers, or take minutes to lay out 100000 layers. An epsilon an f32 makes infinite
    // made every output the same.
    for (from, to, want) in [
        (
            "\"intermediate_size\": 1536",
            "\"intermediate_size\": 18446744073709551615",
            "`intermediate_size`: 18446744073709551615 is more than 2^32",
        ),
        (
            "\"intermediate_size\": 1536",
            "\"intermediate_size\": 1099511627776",
            "`intermediate_size`: 1099511627776 is more than 2^32",
        ),
        (
            "\"max_position_embeddings\": 512",
            "\"max_position_embeddings\": 18446744073709551615",
            "`max_position_embeddings`",
        ),
        (
            "\"num_hidden_layers\": 6",
            "\"num_hidden_layers\": 100000",
            "`num_hidden_layers`: 100000 is more than 65536",
        ),
        ("\"num_hidden_layers\": 6", "\"num_hidden_layers\": 65536", "no tensor encoder.layer.6."),
        ("\"vocab_size\": 30522", "\"vocab_size\": 2147483648", "the config implies [2147483648, 384]"),
        (
            "\"layer_norm_eps\": 1e-12",
            "\"layer_norm_eps\": 1e39",
            "`layer_norm_eps`: 1e39 is not in [1.1754944e-38, 1]",
        ),
        (
            "\"layer_norm_eps\": 1e-12",
            "\"layer_norm_eps\": 1e-50",
            "e-51 is not in [1.1754944e-38, 1] (an f32 must hold it)",
        ),
        (
            "\"num_attention_heads\": 12",
            "\"num_attention_heads\": 5",
            "`num_attention_heads`: 5 does not divide",
        ),
    ] {
        let t0 = std::time::Instant::now();
        let e = refused(from, to);
        assert!(e.contains(want), "{to}: {e}");
        assert!(t0.elapsed().as_secs() < 20, "{to}: refused after {:?}", t0.elapsed());
    }
    // A non-finite weight is refused at load, naming the tensor (it once trained, and wrote
    // checkpoints every reader refused).
    std::fs::write(dir.path().join("config.json"), &cfg).unwrap();
    let mut bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let name = "encoder.layer.2.attention.output.LayerNorm.bias";
    let at = {
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let view = st.tensor(name).unwrap();
        view.data().as_ptr() as usize - bytes.as_ptr() as usize + 4 * 3
    };
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(dir.path().join("model.safetensors"), &bytes).unwrap();
    let e = load_pretrained(dir.path(), 2, Pooling::Mean, 0).unwrap_err().to_string();
    assert!(e.contains(name) && e.contains("non-finite value (NaN) at element 3"), "{e}");
    // A tensor of integers (the header's dtype F32 made I32, the same width) is refused by
    // name before the model's parameters are allocated.
    let mut bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let key = format!("\"{name}\"");
    let entry = bytes[..header].windows(key.len()).position(|w| w == key.as_bytes()).unwrap();
    let f32_at = entry + bytes[entry..header].windows(5).position(|w| w == b"\"F32\"").unwrap();
    bytes[f32_at + 1] = b'I';
    std::fs::write(dir.path().join("model.safetensors"), &bytes).unwrap();
    let e = load_pretrained(dir.path(), 2, Pooling::Mean, 0).unwrap_err().to_string();
    assert!(e.contains(name) && e.contains("is I32; f32, f16 or bf16 expected"), "{e}");
    // The weights file itself, or a directory that is not there, named as such.
    let e =
        load_pretrained(&dir.path().join("model.safetensors"), 2, Pooling::Mean, 0).unwrap_err().to_string();
    assert!(e.contains("is a file: name the model's directory"), "{e}");
    let e = load_pretrained(&dir.path().join("nowhere"), 2, Pooling::Mean, 0).unwrap_err().to_string();
    assert!(e.contains("nowhere") && e.contains("no such directory"), "{e}");
    std::fs::write(dir.path().join("config.json"), "{\"hidden_size\": 384}").unwrap();
    let e = load_pretrained(dir.path(), 2, Pooling::Mean, 0).unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("vocab_size"), "{e}");
    std::fs::write(dir.path().join("model.safetensors"), b"not safetensors").unwrap();
    std::fs::write(dir.path().join("config.json"), &cfg).unwrap();
    let e = load_pretrained(dir.path(), 2, Pooling::Mean, 0).unwrap_err().to_string();
    assert!(e.contains("not a safetensors file"), "{e}");
    // A skip-gram pretraining checkpoint keeps a config.json too: named as what it is.
    std::fs::write(dir.path().join("embeddings.safetensors"), b"").unwrap();
    let e = load_pretrained(dir.path(), 2, Pooling::Mean, 0).unwrap_err().to_string();
    assert!(e.contains("holds skip-gram embeddings") && e.contains("model.init_from"), "{e}");
}

/// A tokenizer whose ids have gaps (an id at or past its vocabulary size) would index past the
/// embedding table: it is refused on opening, naming the token, and `embed` refuses it too
/// (it used to panic).
#[test]
fn a_tokenizer_with_an_id_past_its_vocabulary_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    std::fs::create_dir(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(minilm().join(f), model.join(f)).unwrap();
    }
    let text = std::fs::read_to_string(minilm().join("tokenizer.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["model"]["vocab"]["hello"] = 99999.into();
    std::fs::write(model.join("tokenizer.json"), json.to_string()).unwrap();
    let e = SubwordTokenizer::open(&model.join("tokenizer.json")).err().unwrap().to_string();
    assert!(e.contains("token \"hello\" has id 99999, not below the vocabulary's 30522 tokens"), "{e}");
    // So is a [CLS] id past it in the post_processor (`embed` panicked on one).
    let mut frame: serde_json::Value = serde_json::from_str(&text).unwrap();
    frame["post_processor"]["special_tokens"]["[CLS]"]["ids"] = serde_json::json!([999999]);
    let bad = common::write(dir.path(), "frame.json", frame.to_string().as_bytes());
    let e = SubwordTokenizer::open(&bad).err().unwrap().to_string();
    assert!(e.contains("post_processor adds id 999999"), "{e}");
    // Another JSON file (the model's config.json) is named as not a tokenizer.json, not
    // with the tokenizers library's parse error.
    let e = SubwordTokenizer::open(&model.join("config.json")).err().unwrap().to_string();
    assert!(e.contains("is JSON but not a Hugging Face tokenizer.json") && !e.contains("expected"), "{e}");
    // A dtrain checkpoint's config.json has a `model` table too, but no vocabulary.
    let ours = common::write(dir.path(), "train-config.json", br#"{"model": {"kind": "bag", "dim": 8}}"#);
    let e = SubwordTokenizer::open(&ours).err().unwrap().to_string();
    assert!(e.contains("is JSON but not a Hugging Face tokenizer.json"), "{e}");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_dtrain"))
        .args(["embed", "--model", model.to_str().unwrap(), "hello"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.code() == Some(1) && err.contains("has id 99999") && !err.contains("panicked"), "{err}");
    // --max-len below the special tokens and one more is refused by flag.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_dtrain"))
        .args(["embed", "--model", minilm().to_str().unwrap(), "--max-len", "2", "hello"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--max-len 2: must be in 3..=512"), "{err}");
    // A text longer than --max-len is cut, and the note says so.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_dtrain"))
        .args([
            "embed",
            "--model",
            minilm().to_str().unwrap(),
            "--max-len",
            "4",
            "hello world, a longer text",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("text 1 is cut to its first 4 tokens"), "{err}");
    // Weights that are finite but overflow the forward pass ([CLS]'s embedding row at
    // 3.4e38) are refused when the pooled vectors are not finite, not printed as nulls.
    std::fs::copy(minilm().join("tokenizer.json"), model.join("tokenizer.json")).unwrap();
    let st_path = model.join("model.safetensors");
    let mut bytes = std::fs::read(&st_path).unwrap();
    let (at, width) = {
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor("embeddings.word_embeddings.weight").unwrap();
        (t.data().as_ptr() as usize - bytes.as_ptr() as usize, t.shape()[1])
    };
    let cls = at + 101 * width * 4;
    for v in bytes[cls..cls + width * 4].chunks_exact_mut(4) {
        v.copy_from_slice(&3.39e38f32.to_le_bytes());
    }
    std::fs::write(&st_path, &bytes).unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_dtrain"))
        .args(["embed", "--model", model.to_str().unwrap(), "hello world"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("the pooled vector of text 1 holds"), "{err}");
    assert!(o.stdout.is_empty(), "{}", String::from_utf8_lossy(&o.stdout));
}

/// Whether a document is kept is the hashing tokenizer's decision with a subword tokenizer
/// too, so the rows match the hashed preparation's: a text with no hashed feature (a
/// zero-width space) is a bad line, and one whose characters the subword tokenizer drops
/// but the hashing tokenizer keeps (lone combining accents) is kept as [CLS] [SEP] alone,
/// counted in the manifest and shown (it used to be stored without a word). A `max_len`
/// below 3 leaves no room for any token and is refused.
#[test]
fn texts_without_a_subword_token_keep_the_hashed_rows() {
    let path = minilm().join("tokenizer.json");
    let dir = tempfile::tempdir().unwrap();
    let mut tsv = String::new();
    for i in 0..8 {
        tsv.push_str(&format!("c{}\tthe team won match number {i}\n", i % 2));
    }
    tsv.push_str("c0\t\u{0300}\u{0301}\n");
    let f = common::write(dir.path(), "in.tsv", tsv.as_bytes());
    let prepare = |name: &str, input: &Path, extra: &[&str]| {
        let mut sets = vec![
            "split.test_fraction=0".to_string(),
            "split.val_fraction=0".to_string(),
            "output.shards=1".to_string(),
        ];
        sets.extend(extra.iter().map(|s| s.to_string()));
        let sets: Vec<&str> = sets.iter().map(|s| s.as_str()).collect();
        common::run(&[input], &[], &dir.path().join(name), &sets)
    };
    let sw = format!("tokenizer.subword.path={:?}", path.display().to_string());
    let hashed = prepare("hashed", &f, &[]).unwrap();
    let r = prepare("wp", &f, &[&sw, "tokenizer.subword.max_len=16"]).unwrap();
    assert_eq!((r.manifest.stats.documents, r.manifest.stats.specials_only), (9, 1));
    assert_eq!(hashed.manifest.stats.documents, 9);
    let ds = dtrain::data::dataset::Dataset::open(&dir.path().join("wp")).unwrap();
    let docs: Vec<Vec<u32>> = ds
        .shards(dtrain::data::shard::SplitKind::Train)
        .iter()
        .flat_map(|s| (0..s.len()).map(|i| s.doc(i).ids.to_vec()).collect::<Vec<_>>())
        .collect();
    assert_eq!(docs.iter().filter(|d| d[..] == [101, 102]).count(), 1, "{docs:?}");
    assert!(dtrain::data::dataset::describe(ds.manifest()).contains("1 documents have no subword token"));
    // A zero-width space has no hashed feature: a bad line in both preparations.
    let g = common::write(dir.path(), "zw.tsv", format!("{tsv}c1\t\u{200b}\n").as_bytes());
    let e = prepare("zw", &g, &[&sw]).unwrap_err().to_string();
    assert!(e.contains("zw.tsv:10") && e.contains("no features after tokenizing"), "{e}");
    let e = prepare("short", &f, &[&sw, "tokenizer.subword.max_len=2"]).unwrap_err().to_string();
    assert!(e.contains("subword.max_len") && e.contains("at least 3"), "{e}");
    // A data set of such rows alone: masked-LM has nothing to mask and is refused (it
    // "trained" at loss 0); an encoder trained on it predicts such a text as prepare kept it
    // (predict refused it as having no features).
    let only: String = ["\u{0300}", "\u{0301}", "\u{0302}", "\u{0300}\u{0301}"]
        .iter()
        .enumerate()
        .map(|(i, t)| format!("c{}\t{t}\n", i % 2))
        .collect();
    let h = common::write(dir.path(), "only.tsv", only.as_bytes());
    prepare("only", &h, &[&sw, "tokenizer.subword.max_len=16"]).unwrap();
    let data = dir.path().join("only");
    let o: Vec<dtrain::config::Override> = [
        format!("data.dir={:?}", data.display().to_string()),
        format!("train.out_dir={:?}", dir.path().join("mlm").display().to_string()),
        "model.objective=\"mlm\"".into(),
        format!("mlm.pretrained={:?}", minilm().display().to_string()),
        "mlm.steps=1".into(),
    ]
    .iter()
    .map(|s| dtrain::config::Override::parse(s).unwrap())
    .collect();
    let cfg = dtrain::config::load::<dtrain::config::PretrainConfig>(None, &o).unwrap();
    let e = common::mlm(&cfg, dtrain::train::Resume::No).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("no document of the splits") && e.contains("to mask"), "{e}");
    let mut sets = common::small_encoder(1);
    sets.push("train.steps=2".into());
    let sets: Vec<&str> = sets.iter().map(|s| s.as_str()).collect();
    let run = dir.path().join("run");
    common::train_run(&common::train_config(&data, &run, &sets), dtrain::train::Resume::No, None).unwrap();
    let text = common::write(dir.path(), "accent.txt", "\u{0300}\n".as_bytes());
    let out = dir.path().join("p.jsonl");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_dtrain"))
        .arg("predict")
        .arg("--checkpoint")
        .arg(common::last_checkpoint(&run))
        .arg("--input")
        .arg(&text)
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 1);
}

/// `prepare` with `tokenizer.subword` stores the subword tokenizer's ids (cut to `max_len`,
/// closing token kept), records the tokenizer's path, checksum and vocabulary size in the
/// manifest with `buckets` = the vocabulary, and keeps the hashing tokenizer's split and
/// de-duplication; a missing file or a checksum that does not match is refused by field.
#[test]
fn prepare_with_a_subword_tokenizer_stores_its_ids() {
    let path = minilm().join("tokenizer.json");
    let tok = SubwordTokenizer::open(&path).unwrap();
    let texts = [
        "the team won the match",
        "北京是中国的首都",
        "a much longer document that the tokenizer will have to cut at eight ids",
        "Semi-supervised learning doesn't need many labels!",
        "the team won the match",
    ];
    let mut tsv = String::new();
    for (i, t) in texts.iter().enumerate() {
        tsv.push_str(&format!("c{}\t{t}\n", i % 2));
    }
    let dir = tempfile::tempdir().unwrap();
    let f = common::write(dir.path(), "in.tsv", tsv.as_bytes());
    let out = dir.path().join("data");
    let sets = [
        format!("tokenizer.subword.path={:?}", path.display().to_string()),
        "tokenizer.subword.max_len=8".to_string(),
        "split.test_fraction=0".to_string(),
        "split.val_fraction=0".to_string(),
        "output.shards=1".to_string(),
    ];
    let sets: Vec<&str> = sets.iter().map(|s| s.as_str()).collect();
    let report = common::run(&[&f], &[], &out, &sets).unwrap();
    assert_eq!(report.manifest.stats.duplicates, 1, "the repeated text is dropped");
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    // A tokenizer that reads every word as [UNK] (here: no word is short enough for it)
    // still makes a data set, with a warning that names it.
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json["model"]["max_input_chars_per_word"] = 0.into();
    let unk = common::write(dir.path(), "unk.json", json.to_string().as_bytes());
    let mut unk_sets = sets.clone();
    let unk_path = format!("tokenizer.subword.path={:?}", unk.display().to_string());
    unk_sets[0] = &unk_path;
    let r = common::run(&[&f], &[], &dir.path().join("unk"), &unk_sets).unwrap();
    assert!(
        r.warnings.len() == 1
            && r.warnings[0].contains("unk.json")
            && r.warnings[0].contains("unknown token"),
        "{:?}",
        r.warnings
    );
    let ds = dtrain::data::dataset::Dataset::open(&out).unwrap();
    let spec = &ds.manifest().tokenizer;
    let sw = spec.subword.as_ref().expect("the manifest records the subword tokenizer");
    assert_eq!((spec.buckets, sw.vocab, sw.max_len), (30522, Some(30522), 8));
    assert_eq!(sw.checksum.as_deref().map(str::len), Some(16));
    let recorded = std::fs::canonicalize(std::path::Path::new(&sw.path)).unwrap();
    assert_eq!(recorded, std::fs::canonicalize(&path).unwrap());
    let mut got: Vec<Vec<u32>> = ds
        .shards(dtrain::data::shard::SplitKind::Train)
        .iter()
        .flat_map(|s| (0..s.len()).map(|i| s.doc(i).ids.to_vec()).collect::<Vec<_>>())
        .collect();
    let mut want: Vec<Vec<u32>> = texts[..4].iter().map(|t| tok.encode(t, 8).unwrap()).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    assert!(want.iter().any(|ids| ids.len() == 8 && ids[7] == 102), "one text was cut, keeping [SEP]");
    // Skip-gram pretraining needs hashed word features: refused on subword ids.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_dtrain"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["--quiet", "pretrain", "--config", "configs/brown/pretrain.toml", "--set"])
        .arg(format!("data.dir={:?}", out.display().to_string()))
        .arg("--set")
        .arg(format!("train.out_dir={:?}", dir.path().join("pre").display().to_string()))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && text.contains("holds subword ids"), "{text}");
    // bench padding needs one batch at least, and bounded group sizes (it once reported
    // "0 batches" and took any --group).
    let padding = |extra: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_dtrain"))
            .args(["bench", "padding", "--split", "train", "--data", out.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap();
        (o.status.success(), String::from_utf8_lossy(&o.stderr).to_string())
    };
    let (ok, e) = padding(&["--batch-size", "4294967296"]);
    assert!(!ok && e.contains("not one batch to measure"), "{e}");
    let (ok, e) = padding(&["--batch-size", "2", "--group", "0,70000"]);
    assert!(!ok && e.contains("--group 70000: each value must be in 0..=65536"), "{e}");
    assert!(padding(&["--batch-size", "2"]).0);
    // The documents outside whole batches are counted; where there are none, every row
    // measures the same documents (the same real tokens).
    let docs = dtrain::data::dataset::Dataset::open(&out).unwrap().manifest().splits["train"].docs as usize;
    for bs in [2, 4] {
        let r = dtrain::bench::bench_padding(&out, "train", bs, &[0, 4]).unwrap();
        assert_eq!(r.left_out, docs - r.batches * bs, "batch size {bs}");
        if r.left_out == 0 {
            assert_eq!(r.rows[0].real_tokens, r.rows[1].real_tokens, "batch size {bs}");
        }
    }
    // A missing tokenizer, and a checksum that does not match, are refused by field.
    let missing = ["tokenizer.subword.path=\"nowhere/tokenizer.json\""];
    let e = common::run(&[&f], &[], &dir.path().join("x"), &missing).unwrap_err().to_string();
    assert!(e.contains("tokenizer.subword.path") && e.contains("nowhere"), "{e}");
    let wrong = [sets[0], "tokenizer.subword.checksum=\"0000000000000000\""];
    let e = common::run(&[&f], &[], &dir.path().join("y"), &wrong).unwrap_err().to_string();
    assert!(e.contains("tokenizer.subword.checksum"), "{e}");
}
