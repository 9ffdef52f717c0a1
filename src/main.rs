//! The `dtrain` command line: parses arguments into validated configs and calls the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};

use dtrain::backend::{dispatch, OnBackend};
use dtrain::config::{self, Override, PrepareConfig, PretrainConfig, TrainConfig};
use dtrain::data::dataset::{self, Dataset};
use dtrain::data::input::FormatChoice;
use dtrain::data::manifest::Manifest;
use dtrain::data::prepare::{prepare, PrepareReport};
use dtrain::data::shard::{Shard, SplitKind};
use dtrain::data::tokenize::{Punctuation, Tokenizer};
use dtrain::dist::Dist;
use dtrain::pretrain::{pretrain_on, PretrainOptions};
use dtrain::train::{train, train_on, Resume, RunOptions};

#[derive(Parser)]
#[command(
    name = "dtrain",
    version,
    about = "Semi-supervised text classification, from one CPU core to many GPU nodes"
)]
struct Cli {
    /// No progress bars, nor a run's opening lines (memory account, method settings);
    /// warnings and errors still print.
    #[arg(long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Turn raw text (TSV, JSONL, plain text; .gz too) into a sharded data set directory.
    Prepare(PrepareArgs),
    /// Train a classifier as a run config says (see configs/train.example.toml).
    Train(TrainArgs),
    /// Pretrain on a data set's text: a bag model's embedding table by skip-gram or CBOW
    /// (configs/pretrain.example.toml; `model.init_from` in a run config then uses it), or
    /// an encoder by masked-LM continued pretraining (`objective = "mlm"`,
    /// configs/brown/mlm.toml; its `encoder/` is then a `model.encoder.pretrained`).
    Pretrain(PretrainArgs),
    /// Nearest words by cosine in pretrained embeddings, for a quick look at their quality.
    Neighbors {
        /// A `dtrain pretrain` output directory or its embeddings.safetensors.
        #[arg(long)]
        model: PathBuf,
        /// Words to look up (words never seen in pretraining get a vector from their
        /// character n-grams).
        #[arg(required = true)]
        words: Vec<String>,
        /// Neighbours listed per word.
        #[arg(short, long, default_value_t = 10)]
        k: usize,
    },
    /// Evaluate a checkpoint on a split of a data set: accuracy, macro-F1, per-class
    /// figures, confusion matrix, calibration.
    Eval(EvalArgs),
    /// Classify raw text (txt/tsv/jsonl, .gz too) with one or more checkpoints: one JSON
    /// line per document with label, confidence and top-k probabilities.
    Predict(PredictArgs),
    /// Write a checkpoint's logits for every sample of a prepared split (the targets of
    /// method = "noisy_student"), and optionally its pseudo-labels with confidences as JSONL.
    ExportLogits(ExportArgs),
    /// Pseudo-labels by label spreading: embed every row of a data set with an encoder (or
    /// average its skip-gram word vectors, or a bag model's pooled embedding; or several,
    /// side by side, with TF-IDF besides), link each to its nearest
    /// neighbours, spread the training labels over that graph (shift, k, alpha and class-mass
    /// alignment chosen on val) and write the unlabeled split's logits (method =
    /// "noisy_student"'s targets).
    Propagate(PropagateArgs),
    /// Draw training curves (loss and accuracy) from a metrics.jsonl into a PNG.
    Plot {
        /// The metrics.jsonl of a run (or the run's directory).
        metrics: PathBuf,
        /// Output PNG.
        #[arg(short, long)]
        output: PathBuf,
        /// Title (default: the metrics file's directory).
        #[arg(long)]
        title: Option<String>,
    },
    /// Print a data set's summary and decode a few samples, or describe one shard file,
    /// logits file or Temporal Ensembling bank file.
    Inspect(InspectArgs),
    /// Check every checksum and value of a data set; exits non-zero on any problem.
    Verify {
        /// The data set directory (a file of one, its manifest, vocabulary or a shard,
        /// verifies the whole data set; a shard file outside one is checked on its own).
        dir: PathBuf,
    },
    /// The demo job: prepare the bundled Brown genre data (20 labels per class), verify it,
    /// train the supervised bag model, evaluate it, and write report.json and curves.png.
    Demo(DemoArgs),
    /// Benchmarks that print a table and write JSON with their provenance.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Sentence vectors: of the texts given, one JSON line each with its token ids and pooled
    /// vector, from a pretrained BERT-family encoder (a Hugging Face model directory:
    /// config.json, model.safetensors, tokenizer.json; `launch/fetch-model minilm` gets
    /// one); or, with --data, of every row of a prepared data set, stored in a safetensors
    /// file that `dtrain propagate --model FILE` reads instead of embedding again.
    Embed(EmbedArgs),
    /// What this binary can use here: build features, CPU threads, the MPI launch it runs
    /// under, and the CUDA driver, libraries (NVRTC, cuBLAS, NCCL) and devices it finds.
    Info,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// The training step's gradient average over the ranks (run it under mpirun): time,
    /// algbw and busbw per message size, as nccl-tests defines them. `--backend nccl`
    /// averages GPU buffers with NCCL; `--backend mpi` sums host buffers with MPI, or a
    /// GPU's staged through the host with `--device cuda` (the fallback when NCCL cannot
    /// be used).
    Allreduce {
        /// `nccl` or `mpi` (`[dist] backend`).
        #[arg(long, default_value = "mpi", value_parser = ["nccl", "mpi"])]
        backend: String,
        /// Where the buffers live: `cpu`, `cuda` or `cuda:N` (default: `cuda` with NCCL,
        /// else `cpu`); `cuda` is the rank's local GPU.
        #[arg(long, value_parser = parse_device)]
        device: Option<dtrain::backend::Device>,
        /// The gradient's type on the wire (`[dist] allreduce_dtype`): `f32` or `bf16`.
        #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
        dtype: String,
        /// Smallest message in bytes.
        #[arg(long, default_value_t = 1024)]
        min_bytes: u64,
        /// Largest message in bytes (sizes grow ×4).
        #[arg(long, default_value_t = 256 << 20)]
        max_bytes: u64,
        /// All-reduce bucket size in MiB (`[dist] bucket_mb`).
        #[arg(long, default_value_t = 25.0)]
        bucket_mb: f64,
        /// Write the result as JSON here (rank 0).
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// GPU kernels against their memory-traffic floor: the fused consistency op, the EMA
    /// update and AdamW at several sizes, in GB/s and as a share of the device's copy
    /// bandwidth measured in the same run (needs a CUDA device).
    Kernels {
        /// The CUDA device.
        #[arg(long, default_value_t = 0)]
        device: usize,
        /// The largest EMA/AdamW size as a power of two (the consistency op stops at 2^26).
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(20..=32))]
        max_log2: u32,
        /// Write the result as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The encoder's training-step arithmetic: forward and forward+backward passes of a
    /// pretrained model (e.g. models/minilm) on random token ids, in tokens/s and FLOP/s,
    /// on the CPU or a GPU (`--device`), at any `--matmul` precision.
    Encoder {
        /// A Hugging Face model directory (config.json, model.safetensors).
        #[arg(long)]
        model: PathBuf,
        /// Sequences per batch.
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=65_536))]
        batch: u64,
        /// Tokens per sequence (at most the model's positions: longer is cut to them).
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(2..=1_048_576))]
        len: u64,
        /// Timed repetitions after one warm-up.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        repeat: u64,
        /// Activation recomputation (`model.encoder.recompute`).
        #[arg(long)]
        recompute: bool,
        #[command(flatten)]
        device: DeviceArg,
        /// The linear layers' product precision (`train.matmul`): f32, tf32 or bf16.
        #[arg(long, default_value = "f32", value_parser = parse_matmul)]
        matmul: dtrain::backend::Matmul,
        /// Write the result as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Padding of an encoder's batches, with and without `train.group_by_length`: one epoch
    /// of a prepared split read as training reads it; real and padded tokens per value
    /// (no timing: an encoder's step costs about its padded tokens).
    Padding {
        /// A prepared (subword) data set.
        #[arg(long)]
        data: PathBuf,
        /// The split: train or unlabeled.
        #[arg(long, default_value = "unlabeled")]
        split: String,
        /// Global batch size (a multiple of the shard count).
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
        /// `group_by_length` values to compare (0 = off).
        #[arg(long, value_delimiter = ',', default_value = "0,10,50")]
        group: Vec<usize>,
        /// Write the result as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Throughput of `dtrain prepare` (MB/s of uncompressed text, documents/s). It takes
    /// prepare's flags but --out and --force: it writes to a temporary directory it removes.
    Prepare {
        #[command(flatten)]
        prepare: Box<PrepareArgs>,
        /// Timed runs, after one untimed warm-up.
        #[arg(long, default_value_t = 5)]
        repeat: usize,
        /// Write the result as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

impl BenchCommand {
    /// `--json`, and the files the benchmark reads, which the JSON may not replace.
    fn json_and_inputs(&self) -> (Option<&Path>, Vec<PathBuf>) {
        match self {
            BenchCommand::Allreduce { json, .. } | BenchCommand::Kernels { json, .. } => {
                (json.as_deref(), vec![])
            }
            BenchCommand::Padding { json, .. } => (json.as_deref(), vec![]),
            BenchCommand::Encoder { json, model, .. } => {
                let files = std::fs::read_dir(model).into_iter().flatten().flatten().map(|e| e.path());
                (json.as_deref(), files.collect())
            }
            BenchCommand::Prepare { json, prepare, .. } => {
                let p = prepare.as_ref();
                let files = p.input.iter().chain(&p.unlabeled).chain(&p.test_input).chain(&p.config);
                (json.as_deref(), files.cloned().collect())
            }
        }
    }
}

#[derive(Args, Clone, Default)]
struct PrepareArgs {
    /// A TOML config with [input], [tokenizer], [split] and [output] sections
    /// (see configs/prepare.example.toml). Flags below override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Labeled input files (TSV `label<TAB>text`, or JSONL).
    #[arg(long, num_args = 1.., value_name = "FILE")]
    input: Vec<PathBuf>,
    /// Unlabeled input files (plain text one document per line, TSV or JSONL).
    #[arg(long, num_args = 1.., value_name = "FILE")]
    unlabeled: Vec<PathBuf>,
    /// A fixed test set instead of a held-out fraction (sets the test fraction to 0).
    #[arg(long, num_args = 1.., value_name = "FILE")]
    test_input: Vec<PathBuf>,
    /// Output data set directory.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Input format; `auto` decides from each file's name.
    #[arg(long, value_enum)]
    format: Option<FormatArg>,
    /// JSONL text field name [default: text].
    #[arg(long)]
    text_field: Option<String>,
    /// JSONL label field name [default: label].
    #[arg(long)]
    label_field: Option<String>,
    /// Labeled documents kept per class; the rest of the pool becomes unlabeled [default: all].
    #[arg(long, value_name = "K")]
    labels_per_class: Option<u32>,
    /// Fraction of each class held out for testing [default: 0.2].
    #[arg(long, value_name = "F")]
    test_fraction: Option<f64>,
    /// Fraction of each class carved out for validation [default: 0.1].
    #[arg(long, value_name = "F")]
    val_fraction: Option<f64>,
    /// Shards per split [default: 8]; runs on W ranks need W to divide it.
    #[arg(long, value_name = "P")]
    shards: Option<u32>,
    /// Seed of the split [default: 1].
    #[arg(long, value_name = "S")]
    seed: Option<u64>,
    /// Skip and count bad lines instead of stopping at the first.
    #[arg(long)]
    skip_bad: bool,
    /// Replace the output directory if it exists.
    #[arg(long)]
    force: bool,
    /// Longest word n-gram [default: 2].
    #[arg(long, value_name = "N")]
    word_ngrams: Option<u32>,
    /// Character n-grams of words, as MIN..MAX (e.g. 3..6), or 0 for none [default: 0].
    #[arg(long, value_name = "MIN..MAX")]
    char_ngrams: Option<String>,
    /// Longest character n-gram inside runs of Chinese/Japanese/Thai… text [default: 2].
    #[arg(long, value_name = "N")]
    cjk_ngrams: Option<u32>,
    /// Hash buckets B [default: 1048576].
    #[arg(long, value_name = "B")]
    buckets: Option<u32>,
    /// Maximum units per document [default: 2048].
    #[arg(long, value_name = "N")]
    max_words: Option<u32>,
    /// Keep letter case.
    #[arg(long)]
    keep_case: bool,
    /// Keep or drop punctuation [default: keep].
    #[arg(long, value_enum)]
    punctuation: Option<PunctArg>,
    /// Override any config field: --set tokenizer.buckets=65536 (repeatable; applied last).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(ValueEnum, Clone, Copy, PartialEq)]
enum SearchArg {
    Exact,
    Cells,
}

#[derive(ValueEnum, Clone, Copy)]
enum FormatArg {
    Auto,
    Tsv,
    Jsonl,
    Text,
}

#[derive(ValueEnum, Clone, Copy)]
enum PunctArg {
    Keep,
    Drop,
}

impl PrepareArgs {
    /// Maps the flags onto config fields, then the `--set` overrides, in that order.
    fn overrides(&self) -> anyhow::Result<Vec<Override>> {
        let mut o = Vec::new();
        if !self.input.is_empty() {
            o.push(Override::typed("--input", "input.labeled", &self.input)?);
        }
        if !self.unlabeled.is_empty() {
            o.push(Override::typed("--unlabeled", "input.unlabeled", &self.unlabeled)?);
        }
        if !self.test_input.is_empty() {
            o.push(Override::typed("--test-input", "input.test", &self.test_input)?);
            if self.test_fraction.is_none() {
                o.push(Override::typed("--test-input", "split.test_fraction", 0.0)?);
            }
        }
        if let Some(f) = self.format {
            let f = match f {
                FormatArg::Auto => FormatChoice::Auto,
                FormatArg::Tsv => FormatChoice::Tsv,
                FormatArg::Jsonl => FormatChoice::Jsonl,
                FormatArg::Text => FormatChoice::Text,
            };
            o.push(Override::typed("--format", "input.format", f)?);
        }
        if let Some(out) = &self.out {
            o.push(Override::typed("--out", "output.dir", out)?);
        }
        let mut opt = |key: &str, v: Option<toml::Value>| {
            if let Some(v) = v {
                o.push(Override { key: key.into(), value: v });
            }
        };
        opt("input.text_field", self.text_field.clone().map(Into::into));
        opt("input.label_field", self.label_field.clone().map(Into::into));
        opt("split.labels_per_class", self.labels_per_class.map(|v| i64::from(v).into()));
        opt("split.test_fraction", self.test_fraction.map(Into::into));
        opt("split.val_fraction", self.val_fraction.map(Into::into));
        opt("output.shards", self.shards.map(|v| i64::from(v).into()));
        opt("split.seed", self.seed.map(toml_u64));
        opt("input.skip_bad", self.skip_bad.then_some(true.into()));
        opt("output.force", self.force.then_some(true.into()));
        opt("tokenizer.word_ngrams", self.word_ngrams.map(|v| i64::from(v).into()));
        opt("tokenizer.cjk_ngram_max", self.cjk_ngrams.map(|v| i64::from(v).into()));
        opt("tokenizer.buckets", self.buckets.map(|v| i64::from(v).into()));
        opt("tokenizer.max_words", self.max_words.map(|v| i64::from(v).into()));
        opt("tokenizer.lowercase", self.keep_case.then_some(false.into()));
        opt(
            "tokenizer.punctuation",
            self.punctuation.map(|p| match p {
                PunctArg::Keep => toml::Value::try_from(Punctuation::Keep).expect("enum"),
                PunctArg::Drop => toml::Value::try_from(Punctuation::Drop).expect("enum"),
            }),
        );
        if let Some(spec) = &self.char_ngrams {
            let (lo, hi) = parse_range(spec)
                .with_context(|| format!("--char-ngrams {spec}: expected MIN..MAX (e.g. 3..6) or 0"))?;
            // "0" turns them off and leaves char_ngram_min as it is (it is then unused).
            if hi > 0 {
                o.push(Override::typed("--char-ngrams", "tokenizer.char_ngram_min", i64::from(lo))?);
            }
            o.push(Override::typed("--char-ngrams", "tokenizer.char_ngram_max", i64::from(hi))?);
        }
        for s in &self.set {
            o.push(Override::parse(s)?);
        }
        Ok(o)
    }

    fn load(&self) -> anyhow::Result<PrepareConfig> {
        Ok(config::load::<PrepareConfig>(self.config.as_deref(), &self.overrides()?)?)
    }
}

fn toml_u64(v: u64) -> toml::Value {
    // TOML integers are i64; seeds above i64::MAX are rejected by the config's type check.
    i64::try_from(v).map_or_else(|_| toml::Value::String(v.to_string()), toml::Value::Integer)
}

fn parse_range(spec: &str) -> Option<(u32, u32)> {
    if spec.trim() == "0" {
        return Some((0, 0));
    }
    let (a, b) = spec.split_once("..")?;
    Some((a.trim().parse().ok()?, b.trim().trim_start_matches('=').parse().ok()?))
}

/// The arguments of `train` and `pretrain`: a config file, overrides, and where to resume.
#[derive(Args)]
struct RunArgs {
    /// The config (TOML): see configs/train.example.toml for `train`,
    /// configs/pretrain.example.toml for `pretrain`.
    #[arg(long)]
    config: PathBuf,
    /// Override any config field: --set optim.lr=0.01 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// `auto`: continue from the newest complete checkpoint in train.out_dir, if any (a run
    /// that already finished there has nothing left to do, and says so); `no`: start fresh
    /// (refused if checkpoints exist); or a checkpoint directory.
    #[arg(long, default_value = "no")]
    resume: String,
}

impl RunArgs {
    /// The validated config and the resume choice.
    fn load<T: serde::de::DeserializeOwned + config::Validate>(&self) -> anyhow::Result<(T, Resume)> {
        let overrides = self.set.iter().map(|s| Override::parse(s)).collect::<Result<Vec<_>, _>>()?;
        let resume = match self.resume.as_str() {
            "no" => Resume::No,
            "auto" => Resume::Auto,
            "" => anyhow::bail!("--resume is empty: give `auto`, `no` or a checkpoint directory"),
            path => Resume::From(PathBuf::from(path)),
        };
        Ok((config::load(Some(&self.config), &overrides)?, resume))
    }
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    device: DeviceArg,
}

#[derive(Args, Clone, Copy)]
struct DeviceArg {
    /// Where the model runs: `cpu`, `cuda` (the GPU of the rank's local rank), `cuda:N`, or
    /// `auto` (a GPU when the CUDA driver lists one, else the CPU). The CUDA backend has not
    /// been verified on a GPU yet, so the default is `cpu`.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    device: dtrain::backend::Device,
}

fn parse_device(s: &str) -> Result<dtrain::backend::Device, String> {
    s.parse()
}

fn parse_matmul(s: &str) -> Result<dtrain::backend::Matmul, String> {
    serde_json::from_value(serde_json::Value::String(s.into()))
        .map_err(|_| format!("{s:?} is not a matmul precision: use f32, tf32 or bf16"))
}

#[derive(Args)]
struct PretrainArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Where masked-LM pretraining runs (skip-gram and CBOW run on CPU threads).
    #[command(flatten)]
    device: DeviceArg,
    /// Stop after this many epochs (skip-gram, CBOW) or steps (masked-LM) in total, once
    /// their checkpoint is written; continue later with --resume auto (for jobs with a time
    /// limit).
    #[arg(long, value_name = "N")]
    stop_after: Option<u64>,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    device: DeviceArg,
    /// A checkpoint directory (or its model.safetensors).
    #[arg(long)]
    checkpoint: PathBuf,
    /// The data set directory, prepared as the checkpoint's run's (an encoder's rows may be
    /// cut at another length, within its positions).
    #[arg(long)]
    data: PathBuf,
    /// The split to evaluate: train, val or test.
    #[arg(long, default_value = "test")]
    split: String,
    /// Evaluate the teacher (a Mean Teacher's or MPL's: the checkpoint's teacher.safetensors).
    #[arg(long)]
    teacher: bool,
    /// Evaluate the EMA or SWA weights (the checkpoint's average.safetensors).
    #[arg(long)]
    average: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ExportArgs {
    #[command(flatten)]
    device: DeviceArg,
    /// A checkpoint directory (or its model.safetensors).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Use the checkpoint's teacher (Mean Teacher or MPL: teacher.safetensors).
    #[arg(long)]
    teacher: bool,
    /// Use the checkpoint's EMA or SWA weights (average.safetensors).
    #[arg(long)]
    average: bool,
    /// The data set directory, prepared as the checkpoint's run's (an encoder's rows may be
    /// cut at another length, within its positions).
    #[arg(long)]
    data: PathBuf,
    /// The split: train, val, test or unlabeled.
    #[arg(long, default_value = "unlabeled")]
    split: String,
    /// The logits file to write.
    #[arg(long)]
    out: PathBuf,
    /// Also write one JSON line per sample: sample_id, split, shard, row, label (null where
    /// every logit is equal: no class is preferred), confidence.
    #[arg(long)]
    pseudo_labels: Option<PathBuf>,
    /// Documents per batch.
    #[arg(long, default_value_t = 4096)]
    batch_size: usize,
}

#[derive(Args)]
struct EmbedArgs {
    #[command(flatten)]
    device: DeviceArg,
    /// The model: a pretrained encoder's directory; with --data also an encoder run's
    /// checkpoint (the data set may be cut at another length than the run's, within the
    /// model's positions), a bag run's checkpoint (a row's vector is its pooled embedding:
    /// the mean of the table's rows over its feature ids), or skip-gram word embeddings
    /// (`dtrain pretrain`'s output: a row's vector is the mean of its words').
    #[arg(long)]
    model: PathBuf,
    /// `mean` (sentence-transformers' pooling) or `cls`, for a pretrained encoder's
    /// directory [default: mean]; a checkpoint keeps its own.
    #[arg(long, value_parser = ["mean", "cls"])]
    pooling: Option<String>,
    /// Tokens per text at most, [CLS] and [SEP] included: from 3 to the model's positions
    /// [default: 128, or the model's positions when fewer]. Texts only: a data set's rows
    /// are as long as it was prepared.
    #[arg(long, conflicts_with = "data")]
    max_len: Option<usize>,
    /// A prepared data set whose every row (train, val, test, unlabeled) is embedded: for an
    /// encoder, prepared with its tokenizer.json; for a bag checkpoint, with its run's
    /// tokenizer; for word vectors, words split and cased as in pretraining. Needs --out.
    #[arg(long, requires = "out", conflicts_with = "texts")]
    data: Option<PathBuf>,
    /// The file of --data's row vectors (safetensors: `vectors` [rows, width] at unit length,
    /// `split`, `label` (−1 unlabeled), `sample_id`; see ARCHITECTURE.md).
    #[arg(long, requires = "data")]
    out: Option<PathBuf>,
    /// Documents per encoder batch (--data).
    #[arg(long, default_value_t = 64, requires = "data")]
    batch_size: usize,
    /// The texts.
    #[arg(required_unless_present = "data")]
    texts: Vec<String>,
}

#[derive(Args)]
struct PropagateArgs {
    #[command(flatten)]
    device: DeviceArg,
    /// Where the rows' vectors come from: a pretrained encoder's directory (config.json,
    /// model.safetensors), a checkpoint of an encoder run (its directory or
    /// model.safetensors; its --data may be cut at another length than the run's, within
    /// the model's positions), a checkpoint of a bag run (a row's vector is its pooled
    /// embedding: the mean of the table's rows over its feature ids; e.g. a student of
    /// earlier spread labels), row vectors `dtrain embed --data` stored, or skip-gram word
    /// embeddings (`dtrain pretrain`'s output directory
    /// or its embeddings.safetensors; a row's vector is the mean of its words'). Repeat
    /// it, each with its own --data, for several views of the same rows: the graph's
    /// similarity is then the mean of the views' cosines (weighted by --weights).
    #[arg(long, required_unless_present = "tfidf")]
    model: Vec<PathBuf>,
    /// The pooling of the pretrained models' directories among the --model views: `mean`
    /// (the default) or `cls`. A checkpoint keeps its own, and word vectors are averaged;
    /// refused when no view is a pretrained model's directory.
    #[arg(long, value_parser = ["mean", "cls"])]
    pooling: Option<String>,
    /// The data set directory of the --model before it: for an encoder, prepared with its
    /// tokenizer.json; for a bag checkpoint, with its run's tokenizer (its data set, or one
    /// prepared alike); for embeddings, any preparation whose words are split and cased as
    /// in the data set pretraining read (its rows' words are looked up). The logits file is
    /// the first data set's (and every view's: they hold the same rows).
    #[arg(long, required_unless_present = "tfidf")]
    data: Vec<PathBuf>,
    /// A view of the rows' words weighted by TF-IDF, read from this data set (no model): rows
    /// sharing rare words are near. Any preparation of the same rows whose words are split
    /// and cased as the other views' data sets'; text without spaces between words (Chinese,
    /// Japanese) has no words, so its rows get no vector here. Beside the --model views, or
    /// alone; --shift leaves it as it is (alone, the grid has no shift).
    #[arg(long, value_name = "DATA")]
    tfidf: Option<PathBuf>,
    /// The logits file to write (the unlabeled split's rows).
    #[arg(long)]
    out: PathBuf,
    /// Also write one JSON line per unlabeled sample: sample_id, split, shard, row, label
    /// (null for a row no training label reached), confidence.
    #[arg(long)]
    pseudo_labels: Option<PathBuf>,
    /// Neighbours per row to try (comma-separated); val accuracy picks one.
    #[arg(long, value_delimiter = ',', default_values_t = [5usize, 10, 20])]
    k: Vec<usize>,
    /// Spreading strengths in (0, 0.999] to try (comma-separated); val accuracy picks one.
    #[arg(long, value_delimiter = ',', default_values_t = [0.5f64, 0.8, 0.9, 0.95, 0.99])]
    alpha: Vec<f64>,
    /// What to do to the unit vectors before the neighbour search, to try (comma-separated);
    /// val accuracy picks one: `raw` (as they are), `centre` (subtract the rows' mean), or
    /// `drop-top` (take out the rows' top singular direction). Both shifts take out the
    /// common part that makes every row similar to every other. They apply to the --model
    /// views, not to --tfidf.
    #[arg(long, value_delimiter = ',', default_values = ["raw", "centre", "drop-top"])]
    shift: Vec<dtrain::propagate::Shift>,
    /// Class-mass alignment powers in [0, 2] to try (comma-separated); val accuracy picks one.
    /// Power a multiplies every row's probability of class c by (π_c / m_c)^a, π being
    /// --class-prior's frequencies and m_c the rows' mean probability of c, and normalises
    /// again; 0 leaves the spreading as it is. Spreading starts every class with the same
    /// mass, so where the classes' frequencies differ it favours the rare ones: alignment
    /// moves each class's mean probability towards its prior share.
    #[arg(long, value_delimiter = ',', default_values_t = [0.0f64, 0.5, 1.0])]
    align: Vec<f64>,
    /// The split whose label frequencies (each plus one) are --align's class prior: `val` (a
    /// random sample of every class in `dtrain prepare`'s splits; its labels then also
    /// choose the power, so val accuracy flatters alignment a little and test accuracy is
    /// the check) or `train` (where the training labels are a random sample, not a fixed
    /// number per class).
    #[arg(long, default_value = "val")]
    class_prior: dtrain::propagate::ClassPrior,
    /// The views' weights in the graph's similarity, one per view in order (each --model,
    /// then --tfidf), comma-separated: two rows' similarity is Σ w·cosine / Σ w. Repeat it
    /// for several weightings to try; val accuracy picks one (each is searched again). Only
    /// the ratios count (proportional weightings are refused); a view of weight 0 adds
    /// nothing but still costs its search. Default: every view weighs the same.
    #[arg(long, value_name = "W1,W2,...")]
    weights: Vec<dtrain::propagate::Weights>,
    /// How each row's neighbours are found. `exact`: every row against every row, n²
    /// products (with one 100-wide view on 2 cores, 116k rows take 8 s and a million 10
    /// minutes, per --shift and --weights). `cells`: approximate, an inverted file of
    /// k-means cells; each row is compared with the rows of the --probes cells nearest it
    /// (a million rows of one view with 16 probes: 33 s, each row compared with 3.8% of
    /// them). The run then prints the recall: the share of 256 sampled rows' exact
    /// neighbours of positive similarity (those that make edges) that the search found.
    #[arg(long, value_enum, default_value = "exact")]
    search: SearchArg,
    /// With --search cells: the number of cells [default: the square root of the rows; at
    /// most the rows with a vector].
    #[arg(long)]
    cells: Option<usize>,
    /// With --search cells: the cells nearest a row whose rows it is compared with, its own
    /// included (more where they hold --k rows or fewer); more is slower and nearer the
    /// exact search [default: 16].
    #[arg(long)]
    probes: Option<usize>,
    /// Documents per encoder batch.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
}

#[derive(Args)]
struct PredictArgs {
    #[command(flatten)]
    device: DeviceArg,
    /// Checkpoint directory (repeat to average several models' probabilities).
    #[arg(long, required = true)]
    checkpoint: Vec<PathBuf>,
    /// Input: plain text (one document per line), TSV (label column ignored) or JSONL.
    #[arg(long)]
    input: PathBuf,
    /// Output JSONL file.
    #[arg(long)]
    output: PathBuf,
    /// Input format; `auto` decides from the file name.
    #[arg(long, value_enum, default_value = "auto")]
    format: FormatArg,
    /// JSONL text field name.
    #[arg(long, default_value = "text")]
    text_field: String,
    /// The subword tokenizer.json, where it is no longer at the path the data set recorded
    /// (it must be the same file: its checksum is checked). Encoder checkpoints only.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Tokens per document at most, [CLS] and [SEP] included, for encoder checkpoints: from
    /// 3 to the model's positions [default: the run's tokenizer.subword.max_len]. A model
    /// fine-tuned on short rows may read longer ones (docs/results.md measures it on Brown).
    #[arg(long)]
    max_len: Option<usize>,
    /// Probabilities listed per document.
    #[arg(long, default_value_t = 3)]
    top_k: usize,
    /// Average this many forward passes with dropout on (MC dropout), at most 256; 1 = no
    /// dropout.
    #[arg(long, default_value_t = 1)]
    mc_dropout: usize,
    /// Test-time augmentation: also average over this many strong views of each document
    /// (random deletion, replacement and span swaps of its ids at `[augment]`'s default
    /// strengths, drawn from --seed); 0 = the text as it is only.
    #[arg(long, default_value_t = 0)]
    augment_views: usize,
    /// Use each checkpoint's teacher (Mean Teacher or MPL: teacher.safetensors) instead of its student.
    #[arg(long)]
    teacher: bool,
    /// Use each checkpoint's EMA or SWA weights (average.safetensors) instead of its student.
    #[arg(long)]
    average: bool,
    /// Seed of the MC-dropout masks and the augmented views.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Documents per batch.
    #[arg(long, default_value_t = 4096)]
    batch_size: usize,
    /// Skip and count bad lines instead of stopping.
    #[arg(long)]
    skip_bad: bool,
}

#[derive(Args)]
struct InspectArgs {
    /// A data set directory (or its `manifest.json` or `vocab.bin`), one shard file, a
    /// Temporal Ensembling bank file (`.bank`, live or in a checkpoint's `bank/`), or a
    /// logits file of `export-logits`.
    path: PathBuf,
    /// The split whose samples to decode [default: train].
    #[arg(long)]
    split: Option<String>,
    /// How many samples to decode.
    #[arg(long, default_value_t = 5)]
    samples: usize,
    /// Show how the data set's tokenizer turns this text into features and ids.
    #[arg(long, value_name = "TEXT")]
    explain: Option<String>,
    /// With a logits file: the data set it was exported from. Names the classes and
    /// measures the argmaxes against the split's labels (the unlabeled split's hidden
    /// labels, where the data set recorded them), overall and per confidence threshold.
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
}

#[derive(Args)]
struct DemoArgs {
    /// The labeled data to prepare.
    #[arg(long, default_value = "data/brown_genre.tsv.gz")]
    data: PathBuf,
    /// The prepare config of the demo.
    #[arg(long, default_value = "configs/brown/prepare.toml")]
    config: PathBuf,
    /// The training config of the demo (its data and output directories are replaced).
    #[arg(long, default_value = "configs/brown/supervised.toml")]
    train_config: PathBuf,
    /// Where the demo writes its data set, run and report.
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
}

fn main() -> ExitCode {
    restore_sigpipe();
    stdout_failures_are_errors();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Restores the default SIGPIPE action (Rust ignores it), so that `dtrain … | head` ends
/// quietly when the reader closes the pipe, like other Unix tools, instead of panicking in
/// `println!`.
fn restore_sigpipe() {
    #[cfg(unix)]
    // SAFETY: called first thing in `main`, before any thread exists; setting a signal's
    // disposition to SIG_DFL has no other precondition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Refuses a `RAYON_NUM_THREADS` that is not a count (rayon would silently use every core)
/// or far past the machine's cores (more than 16 a core and 256): rayon would spawn every
/// thread first, for minutes, before any work. 0 (or an empty value) means every core, as
/// in rayon.
fn check_thread_count() -> anyhow::Result<()> {
    let Ok(v) = std::env::var("RAYON_NUM_THREADS") else { return Ok(()) };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let most = (16 * cores).max(256);
    if v.trim().is_empty() {
        return Ok(());
    }
    match v.trim().parse::<usize>() {
        Ok(n) if n > most => {
            bail!("RAYON_NUM_THREADS={v}: at most {most} threads on this machine's {cores} cores (16 a core, or 256)")
        }
        Ok(_) => Ok(()),
        Err(_) => bail!("RAYON_NUM_THREADS={v:?}: must be a thread count (0 or unset: every core)"),
    }
}

/// `println!` panics when stdout cannot be written (a full disk, /dev/full): that ends the
/// command with an error line and status 1, as any other failed write does, instead of a
/// panic's message and status 101. Every other panic keeps the default report.
fn stdout_failures_are_errors() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to stdout") {
            eprintln!("error: {msg}");
            std::process::exit(1);
        }
        default(info);
    }));
}

/// A multi-rank command's result as rank 0 reports it: `Some` on rank 0, `None` on the
/// others (they end quietly). One rank's failure ends every rank at once, since the others
/// would wait for it in their next collective.
fn root_result<T>(dist: &Dist, r: dtrain::Result<T>) -> anyhow::Result<Option<T>> {
    match r {
        Ok(r) => Ok(dist.is_root().then_some(r)),
        Err(e) if dist.world() > 1 => {
            eprintln!("error (rank {} of {}): {e:#}", dist.rank(), dist.world());
            dist.abort(1)
        }
        Err(e) => Err(e.into()),
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let progress = !cli.quiet;
    check_thread_count()?;
    if let Command::Bench(b) = &cli.command {
        // Before the benchmark runs: its JSON may replace only an earlier benchmark JSON
        // (pretty JSON starts with "{" and a newline), never an input or a file in a data
        // set or checkpoint.
        if let (Some(json), inputs) = b.json_and_inputs() {
            let inputs: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
            dtrain::fsutil::check_output("--json", json, &inputs, Some(b"{\n"))?;
        }
    }
    let alone = match &cli.command {
        Command::Prepare(_) => Some("prepare"),
        Command::Eval(_) => Some("eval"),
        Command::Predict(_) => Some("predict"),
        Command::ExportLogits(_) => Some("export-logits"),
        Command::Propagate(_) => Some("propagate"),
        Command::Plot { .. } => Some("plot"),
        Command::Demo(_) => Some("demo"),
        Command::Embed(_) => Some("embed"),
        _ => None,
    };
    if let Some(name) = alone {
        one_process(&format!("dtrain {name}"))?;
    }
    match cli.command {
        Command::Prepare(args) => {
            let cfg = args.load()?;
            let report = prepare(&cfg, progress)?;
            print_prepare_summary(&report);
            Ok(ExitCode::SUCCESS)
        }
        Command::Train(args) => {
            let (cfg, resume): (TrainConfig, _) = args.run.load()?;
            let dist = Dist::from_env(&cfg.dist)?;
            let opts = RunOptions { resume, progress, stop_after: None, device: args.device.device };
            let Some(r) = root_result(&dist, train_on(&cfg, &opts, &dist))? else {
                return Ok(ExitCode::SUCCESS);
            };
            print_train_summary(&r);
            for rep in [&r.val, &r.test].into_iter().flatten() {
                print!("{}", rep.to_text());
            }
            println!("metrics: {}", cfg.train.out_dir.join("metrics.jsonl").display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Pretrain(args) => {
            let (cfg, resume): (PretrainConfig, _) = args.run.load()?;
            if args.stop_after == Some(0) {
                bail!("--stop-after 0: must be at least 1 (epochs in total, counted from the start)");
            }
            let dist = Dist::from_env(&cfg.dist)?;
            if cfg.model.objective == dtrain::config::Objective::Mlm {
                let opts =
                    dtrain::pretrain::mlm::MlmOptions { resume, progress, stop_after: args.stop_after };
                let r = dtrain::pretrain::mlm::pretrain(&cfg, &opts, args.device.device, &dist);
                let Some(r) = root_result(&dist, r)? else {
                    return Ok(ExitCode::SUCCESS);
                };
                if r.already_finished {
                    println!(
                        "the run had already finished: nothing left to train; encoder: {}",
                        r.out.display()
                    );
                    return Ok(ExitCode::SUCCESS);
                }
                let figures = match r.first_loss {
                    _ if r.last_loss.is_nan() => "no window logged yet (mlm.log_every)".to_string(),
                    Some(first) => format!("loss {first:.4} → {:.4}", r.last_loss),
                    None => format!("loss {:.4}", r.last_loss),
                };
                let accuracy = if r.last_accuracy.is_nan() {
                    String::new()
                } else {
                    format!(", masked-token accuracy {:.3}", r.last_accuracy)
                };
                println!("masked-LM: {} steps, {figures}{accuracy}, {:.0} tokens/s", r.steps, r.tokens_per_s);
                if r.resumed_at > 0 {
                    println!("(resumed at step {})", r.resumed_at);
                }
                if args.stop_after == Some(r.steps) {
                    println!(
                        "stopped after step {}: continue with --resume auto (checkpoint {})",
                        r.steps,
                        r.out.display()
                    );
                } else {
                    println!("encoder: {} (set model.encoder.pretrained to it)", r.out.display());
                }
                return Ok(ExitCode::SUCCESS);
            }
            if matches!(args.device.device, dtrain::backend::Device::Cuda(_)) {
                bail!(
                    "--device cuda: skip-gram and CBOW pretraining run on the CPU only (Hogwild threads); \
                     --device picks the backend of masked-LM pretraining (`model.objective = \"mlm\"`). \
                     Leave it out, or give `auto` or `cpu`"
                );
            }
            let stop_after = args.stop_after.map(u32::try_from).transpose().map_err(|_| {
                anyhow::anyhow!("--stop-after: more than 2^32 epochs; a skip-gram or CBOW run has fewer")
            })?;
            let opts = PretrainOptions { resume, progress, stop_after };
            let Some(r) = root_result(&dist, pretrain_on(&cfg, &opts, &dist))? else {
                return Ok(ExitCode::SUCCESS);
            };
            if r.already_finished {
                println!(
                    "the run had already finished its {} epochs: nothing left to train; embeddings: {}",
                    r.epochs,
                    r.out_dir.join(dtrain::pretrain::embeddings::EMBEDDINGS_FILE).display()
                );
                return Ok(ExitCode::SUCCESS);
            }
            let on = match r.ranks {
                1 => format!("{} threads", r.threads),
                w => format!("{w} ranks × {} threads", r.threads),
            };
            println!(
                "pretrained {} epochs on {on}: {} of {} words trained ({} of {} tokens per epoch), final loss {:.4}",
                r.epochs, r.trained_words, r.vocab_words, r.trained_tokens, r.tokens, r.loss
            );
            println!(
                "{:.0} words/s ({:.0} per thread) over {:.1} s of training; {:.1} s in all",
                r.words_per_s, r.words_per_s_per_thread, r.train_seconds, r.seconds
            );
            if r.epochs < cfg.train.epochs {
                println!(
                    "stopped after {} of {} epochs: continue with --resume auto (checkpoints in {})",
                    r.epochs,
                    cfg.train.epochs,
                    r.out_dir.join("checkpoints").display()
                );
            } else {
                println!(
                    "embeddings: {}   words: {}",
                    r.out_dir.join(dtrain::pretrain::embeddings::EMBEDDINGS_FILE).display(),
                    r.out_dir.join(dtrain::pretrain::embeddings::WORDS_FILE).display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Neighbors { model, words, k } => {
            if k == 0 {
                bail!("-k 0: list at least one neighbour");
            }
            let emb = dtrain::pretrain::embeddings::read(&model)?;
            let units = emb.unit_vectors();
            let mut found = true;
            for q in &words {
                match emb.neighbors(&units, q, k) {
                    Some((word, list)) => {
                        println!("{word}:");
                        for (w, s) in list {
                            println!("  {s:7.4}  {w}");
                        }
                    }
                    None => {
                        match emb.query_words(q).len() {
                            0 => eprintln!("error: {q:?}: holds no word"),
                            n => eprintln!("error: {q:?}: holds {n} words; give one word per argument"),
                        }
                        found = false;
                    }
                }
            }
            // A query with no word in it is a failed lookup: scripts see it in the exit code.
            Ok(if found { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Eval(args) => {
            let split = SplitKind::from_name(&args.split)
                .filter(|s| *s != SplitKind::Unlabeled)
                .with_context(|| format!("--split {}: expected train, val or test", args.split))?;
            let (model, params, ds) =
                load_for_data(&args.checkpoint, weights_of(args.teacher, args.average)?, &args.data, split)?;
            struct Job<'a>(&'a dtrain::model::Model, &'a [f32], &'a Dataset, SplitKind);
            impl OnBackend for Job<'_> {
                type Out = Option<dtrain::train::metrics::EvalReport>;
                fn run<B: dtrain::backend::EncoderOps<F = f32>>(self, be: &B) -> dtrain::Result<Self::Out> {
                    dtrain::train::eval::evaluate(be, self.0, &be.upload(self.1), self.2, self.3, 1024)
                }
            }
            let report = dispatch(args.device.device, 0, progress, Job(&model, &params, &ds, split))?
                .with_context(|| format!("split `{}` of {} is empty", args.split, args.data.display()))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.to_text());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::ExportLogits(a) => {
            let split = SplitKind::from_name(&a.split)
                .with_context(|| format!("--split {}: expected train, val, test or unlabeled", a.split))?;
            if a.batch_size < 1 {
                bail!("--batch-size must be at least 1");
            }
            let (model, params, ds) =
                load_for_data(&a.checkpoint, weights_of(a.teacher, a.average)?, &a.data, split)?;
            if ds.manifest().splits.get(split.name()).is_none_or(|s| s.docs == 0) {
                bail!(
                    "--split {}: split `{}` of {} is empty: there is nothing to export",
                    a.split,
                    a.split,
                    a.data.display()
                );
            }
            struct Job<'a>(&'a dtrain::model::Model, &'a [f32], &'a Dataset, SplitKind, &'a ExportArgs);
            impl OnBackend for Job<'_> {
                type Out = dtrain::logits::ExportReport;
                fn run<B: dtrain::backend::EncoderOps<F = f32>>(self, be: &B) -> dtrain::Result<Self::Out> {
                    let a = self.4;
                    dtrain::logits::export(
                        be,
                        self.0,
                        self.1,
                        self.2,
                        self.3,
                        &a.out,
                        a.pseudo_labels.as_deref(),
                        a.batch_size,
                    )
                }
            }
            let r = dispatch(a.device.device, 0, progress, Job(&model, &params, &ds, split, &a))?;
            println!("wrote the logits of {} samples of `{}` to {}", r.rows, split.name(), a.out.display());
            if let Some(p) = &a.pseudo_labels {
                println!("pseudo-labels: {}", p.display());
            }
            print_export_report(&r, split);
            Ok(ExitCode::SUCCESS)
        }
        Command::Propagate(a) => propagate(a, progress),
        Command::Predict(a) => {
            let opts = dtrain::predict::PredictOptions {
                checkpoints: a.checkpoint,
                input: a.input,
                output: a.output.clone(),
                format: match a.format {
                    FormatArg::Auto => FormatChoice::Auto,
                    FormatArg::Tsv => FormatChoice::Tsv,
                    FormatArg::Jsonl => FormatChoice::Jsonl,
                    FormatArg::Text => FormatChoice::Text,
                },
                text_field: a.text_field,
                tokenizer: a.tokenizer,
                max_len: a.max_len,
                top_k: a.top_k,
                mc_dropout: a.mc_dropout,
                augment_views: a.augment_views,
                weights: weights_of(a.teacher, a.average)?,
                seed: a.seed,
                batch_size: a.batch_size,
                skip_bad: a.skip_bad,
                device: a.device.device,
            };
            let s = dtrain::predict::predict(&opts)?;
            println!(
                "predicted {} documents into {} ({} blank lines, {} bad lines skipped)",
                s.documents,
                a.output.display(),
                s.blank,
                s.skipped
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Plot { metrics, output, title } => {
            // A run's directory stands for its metrics log.
            let metrics = if metrics.is_dir() { metrics.join("metrics.jsonl") } else { metrics };
            dtrain::plot::check_png_path(&output)?;
            dtrain::fsutil::check_output("--output", &output, &[&metrics], Some(dtrain::plot::PNG_MAGIC))?;
            let curves = dtrain::plot::read_metrics(&metrics)?;
            if curves.torn_last_line {
                eprintln!(
                    "note: {}'s last line is cut short (a run still writing it?) and is left out",
                    metrics.display()
                );
            }
            let title = title
                .unwrap_or_else(|| metrics.parent().map_or("dtrain run".into(), |p| p.display().to_string()));
            dtrain::plot::plot(&curves, &title, &output, 1200, 500)?;
            println!("wrote {}", output.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect(args) => inspect(&args),
        Command::Verify { dir } => verify_path(&dir),
        Command::Demo(args) => demo(&args, progress),
        Command::Bench(BenchCommand::Allreduce {
            backend,
            device,
            dtype,
            min_bytes,
            max_bytes,
            bucket_mb,
            json,
        }) => {
            use dtrain::dist::{CommBackend, WireDtype};
            let nccl = backend == "nccl";
            let cfg = dtrain::dist::DistConfig {
                bucket_mb,
                backend: if nccl { CommBackend::Nccl } else { CommBackend::Mpi },
                allreduce_dtype: if dtype == "bf16" { WireDtype::Bf16 } else { WireDtype::F32 },
                ..Default::default()
            };
            if let Err((field, msg)) = cfg.check() {
                anyhow::bail!("--bucket-mb ({field}) {msg}");
            }
            let device =
                device.unwrap_or(if nccl { dtrain::backend::Device::Cuda(None) } else { Default::default() });
            if nccl && device == dtrain::backend::Device::Cpu {
                anyhow::bail!(
                    "--backend nccl averages GPU buffers: it needs --device cuda (or auto with a GPU)"
                );
            }
            let dist = Dist::from_env(&cfg)?;
            struct Job<'a>(&'a Dist, u64, u64);
            impl OnBackend for Job<'_> {
                type Out = dtrain::bench::AllreduceBench;
                fn run<B: dtrain::backend::EncoderOps<F = f32>>(self, be: &B) -> dtrain::Result<Self::Out> {
                    dtrain::bench::bench_allreduce(self.0, be, self.1, self.2)
                }
            }
            let r = dispatch(device, dist.local_rank(), dist.is_root(), Job(&dist, min_bytes, max_bytes))?;
            if !dist.is_root() {
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "dtrain bench allreduce: {} rank(s) on {}, {}; buckets of {} MiB; {}",
                r.world, r.device, r.path, r.bucket_mb, r.provenance.cpu
            );
            println!(
                "{:>12} {:>6} {:>12} {:>12} {:>12} {:>10} {:>10}",
                "bytes", "iters", "min µs", "median µs", "max µs", "algbw GB/s", "busbw GB/s"
            );
            for row in &r.rows {
                println!(
                    "{:>12} {:>6} {:>12.1} {:>12.1} {:>12.1} {:>10.3} {:>10.3}",
                    row.bytes,
                    row.iterations,
                    row.seconds.min * 1e6,
                    row.seconds.median * 1e6,
                    row.seconds.max * 1e6,
                    row.algbw_gbs,
                    row.busbw_gbs
                );
            }
            if let Some(path) = json {
                dtrain::bench::write_json(&path, &r)?;
                println!("wrote {}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Kernels { device, max_log2, json }) => {
            bench_kernels(device, max_log2, json)
        }
        Command::Bench(BenchCommand::Encoder {
            model,
            batch,
            len,
            repeat,
            recompute,
            device,
            matmul,
            json,
        }) => {
            let r = dtrain::bench::bench_encoder(&dtrain::bench::EncoderBenchArgs {
                dir: &model,
                batch: batch as usize,
                len: len as usize,
                repeats: repeat as usize,
                recompute,
                device: device.device,
                matmul,
            })?;
            println!(
                "dtrain bench encoder: {} ({} layers, hidden {}), {} x {} tokens, on {} ({:?} products), {} thread(s), {}",
                model.display(),
                r.layers,
                r.hidden,
                r.batch,
                r.len,
                r.device,
                r.matmul,
                r.provenance.threads,
                r.provenance.cpu
            );
            println!(
                "{:<18} {:>10} {:>10} {:>10} {:>12} {:>10}",
                "", "min s", "median s", "max s", "tokens/s", "GFLOP/s"
            );
            let fb = if r.recompute { 4.0 } else { 3.0 };
            for (name, s, flops) in [
                ("forward", &r.forward, r.forward_flops),
                ("forward+backward", &r.forward_backward, fb * r.forward_flops),
            ] {
                let tps = (r.batch * r.len) as f64 / s.median;
                let gf = flops / s.median / 1e9;
                println!(
                    "{name:<18} {:>10.3} {:>10.3} {:>10.3} {tps:>12.0} {gf:>10.1}",
                    s.min, s.median, s.max
                );
            }
            println!(
                "activations held between forward and backward: {:.1} MB (recompute {})",
                r.activation_bytes as f64 / 1e6,
                r.recompute
            );
            if let Some(path) = json {
                dtrain::bench::write_json(&path, &r)?;
                println!("wrote {}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Padding { data, split, batch_size, group, json }) => {
            let r = dtrain::bench::bench_padding(&data, &split, batch_size, &group)?;
            println!(
                "dtrain bench padding: {} split `{}`, {} batches of {} per epoch",
                data.display(),
                r.split,
                r.batches,
                r.batch_size
            );
            println!(
                "{:>15} {:>12} {:>14} {:>10}",
                "group_by_length", "real tokens", "padded tokens", "padding"
            );
            for row in &r.rows {
                println!(
                    "{:>15} {:>12} {:>14} {:>9.1}%",
                    row.group_by_length,
                    row.real_tokens,
                    row.padded_tokens,
                    100.0 * row.padding
                );
            }
            if r.left_out > 0 {
                println!(
                    "note: {} documents lie outside the whole batches, and each row leaves out others (grouping \
                     orders them): the rows' real tokens differ; a --batch-size that divides the split measures \
                     the same documents in every row",
                    r.left_out
                );
            }
            if let Some(path) = json {
                dtrain::bench::write_json(&path, &r)?;
                println!("wrote {}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Info => {
            info();
            Ok(ExitCode::SUCCESS)
        }
        Command::Embed(a) => match (&a.data, &a.out) {
            (Some(data), Some(out)) => embed_data(&a, data, out, progress),
            _ if a.device.device != dtrain::backend::Device::Cpu => {
                bail!("--device: the texts are embedded on the CPU; --device applies with --data")
            }
            _ => embed(&a.model, a.pooling.as_deref().unwrap_or("mean"), a.max_len, &a.texts),
        },
        Command::Bench(BenchCommand::Prepare { prepare, repeat, json }) => {
            let mut args = *prepare;
            if let Some(out) = &args.out {
                bail!(
                    "--out {}: bench prepare writes to a temporary directory it removes, not to --out; drop the flag",
                    out.display()
                );
            }
            if args.force {
                bail!("--force: bench prepare writes to a temporary directory it removes, and replaces nothing; drop the flag");
            }
            args.out = Some(PathBuf::from("(temporary)"));
            let cfg = args.load()?;
            let r = dtrain::bench::bench_prepare(&cfg, repeat)?;
            println!(
                "dtrain bench prepare: {} run(s) after 1 warm-up, {} thread(s), {}",
                r.repeats, r.provenance.threads, r.provenance.cpu
            );
            println!("inputs: {}", r.inputs.join(", "));
            println!(
                "{:.1} MB of text, {} documents, {} token ids per run",
                r.text_bytes as f64 / 1e6,
                r.documents,
                r.token_ids
            );
            println!("{:<12} {:>12} {:>12} {:>12}", "", "min", "median", "max");
            let row = |name: &str, s: &dtrain::bench::Spread| {
                println!("{name:<12} {:>12.2} {:>12.2} {:>12.2}", s.min, s.median, s.max)
            };
            row("seconds", &r.seconds);
            row("MB/s", &r.mb_per_s);
            row("docs/s", &r.docs_per_s);
            if let Some(path) = json {
                dtrain::bench::write_json(&path, &r)?;
                println!("wrote {}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `dtrain bench kernels` on device `device`.
#[cfg(feature = "cuda")]
fn bench_kernels(device: usize, max_log2: u32, json: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let be = dtrain::backend::cuda::Cuda::new(device)?;
    let r = dtrain::bench::bench_kernels(&be, max_log2)?;
    println!("dtrain bench kernels: {}; device-to-device copy {:.1} GB/s", r.device, r.copy_gbs);
    println!(
        "{:<16} {:>14} {:>14} {:>12} {:>10} {:>8}",
        "kernel", "elements", "shape", "median µs", "GB/s", "% copy"
    );
    for row in &r.rows {
        println!(
            "{:<16} {:>14} {:>14} {:>12.1} {:>10.1} {:>7.1}%",
            row.kernel,
            row.elements,
            row.shape,
            row.seconds.median * 1e6,
            row.gbs,
            row.percent_of_copy
        );
    }
    if let Some(path) = json {
        dtrain::bench::write_json(&path, &r)?;
        println!("wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(not(feature = "cuda"))]
fn bench_kernels(_: usize, _: u32, _: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    bail!("this dtrain was built without the `cuda` feature: rebuild with default features")
}

/// `dtrain embed`: the encoder's pooled vectors of `texts`, on the CPU.
fn embed(dir: &Path, pooling: &str, max_len: Option<usize>, texts: &[String]) -> anyhow::Result<ExitCode> {
    use dtrain::model::encoder::{load_pretrained, EncoderActs, Pooling, TokenBatch};
    let pooling = if pooling == "cls" { Pooling::Cls } else { Pooling::Mean };
    let (model, params) = load_pretrained(dir, 1, pooling, 0)?;
    let tok_path = dir.join("tokenizer.json");
    let tok = dtrain::data::subword::SubwordTokenizer::open(&tok_path)?;
    if tok.vocab_size() as usize > model.spec.vocab {
        bail!(
            "{}: {} token ids, more than the {} rows of the model's embedding table (config.json's vocab_size): not this model's tokenizer",
            tok_path.display(),
            tok.vocab_size(),
            model.spec.vocab
        );
    }
    let positions = model.spec.max_positions;
    let max_len = max_len.unwrap_or(positions.min(128));
    if !(3..=positions).contains(&max_len) {
        bail!("--max-len {max_len}: must be in 3..={positions} (the special tokens, at least one more, and the model's positions)");
    }
    // Each text read to one token past the limit: only one that reaches it is cut (and read
    // again at the limit, where the tokenizer closes it with [SEP]).
    let mut seqs = Vec::with_capacity(texts.len());
    for (i, t) in texts.iter().enumerate() {
        let mut ids = tok.encode(t, max_len + 1)?;
        if ids.len() > max_len {
            eprintln!(
                "note: text {} is cut to its first {max_len} tokens, [CLS] and [SEP] included (--max-len; the model reads at most {positions})",
                i + 1
            );
            ids = tok.encode(t, max_len)?;
        }
        seqs.push(ids);
    }
    if let Some(i) = seqs.iter().position(|s| s.is_empty()) {
        bail!(
            "text {} ({:?}) has no token of its own (empty, or only ignorable characters)",
            i + 1,
            texts[i]
        );
    }
    let be = dtrain::backend::cpu::Cpu::<f32>::new();
    let tb = TokenBatch::new(&seqs, tok.pad);
    let mut acts = EncoderActs::inference(&be);
    model.forward(&be, &params, &tb, None, &mut acts);
    let h = model.spec.hidden;
    if let Some(at) = acts.pooled.iter().position(|v| !v.is_finite()) {
        bail!(
            "{}: the pooled vector of text {} holds {} (entry {}): the model's forward pass overflows on it \
             (its weights are finite, but too large); nothing was printed",
            dir.display(),
            at / h + 1,
            acts.pooled[at],
            at % h
        );
    }
    for (i, text) in texts.iter().enumerate() {
        let line =
            serde_json::json!({"text": text, "ids": seqs[i], "pooled": acts.pooled[i * h..(i + 1) * h]});
        println!("{line}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `dtrain embed --data`: every row's vector in one view, stored for `propagate`.
fn embed_data(a: &EmbedArgs, data: &Path, out: &Path, progress: bool) -> anyhow::Result<ExitCode> {
    dtrain::propagate::check_batch_size(a.batch_size)?;
    let ds = Dataset::open(data)?;
    ds.verify_payloads(|_, _| true)?;
    let inputs = [a.model.as_path(), data];
    dtrain::fsutil::check_output("--out", out, &inputs, None)?;
    if std::fs::metadata(out).is_ok_and(|m| m.len() > 0) && !dtrain::rowvec::is_vectors_file(out) {
        bail!(
            "--out {}: exists and is not a file of row vectors (an earlier `dtrain embed --data` output): remove it or choose another path",
            out.display()
        );
    }
    if dtrain::rowvec::is_vectors_file(&a.model) {
        bail!("{}: already stored row vectors; give the model they came from", a.model.display());
    }
    if a.pooling.is_some() && !dtrain::model::encoder::is_pretrained_dir(&a.model) {
        bail!("--pooling applies to a pretrained model's directory: {} keeps its own", a.model.display());
    }
    let loaded = load_propagate_model(&a.model, data, &ds, a.pooling.as_deref())?;
    let kind = match &loaded {
        Loaded::Encoder(enc, _) => {
            format!("encoder, {} pooling", format!("{:?}", enc.spec.pooling).to_lowercase())
        }
        Loaded::Bag(_) => "word vectors".to_string(),
        Loaded::BagModel(..) => "bag model, pooled embedding".to_string(),
        Loaded::Stored(_) => bail!("{}: already stored row vectors", a.model.display()),
    };
    let view = dtrain::propagate::View { vectors: loaded.vectors(), data: &ds };
    struct Job<'a>(&'a dtrain::propagate::View<'a>, usize, bool);
    impl OnBackend for Job<'_> {
        type Out = Vec<f32>;
        fn run<B: dtrain::backend::EncoderOps<F = f32>>(self, be: &B) -> dtrain::Result<Self::Out> {
            self.0.embed_rows(be, self.1, self.2)
        }
    }
    let started = std::time::Instant::now();
    let rows = dispatch(a.device.device, 0, progress, Job(&view, a.batch_size, progress))?;
    let seconds = started.elapsed().as_secs_f64();
    let stored =
        dtrain::rowvec::RowVectors::new(&ds, rows, view.width(), kind, &a.model, &view.source(), seconds);
    stored.write(out)?;
    let m = &stored.meta;
    println!(
        "embedded {} rows (train {}, val {}, test {}, unlabeled {}) in {seconds:.1} s; width {} ({}){}",
        stored.len(),
        m.rows[0],
        m.rows[1],
        m.rows[2],
        m.rows[3],
        m.width,
        m.kind,
        if m.blank > 0 { format!(", {} rows without a vector", m.blank) } else { String::new() }
    );
    println!("wrote {}", out.display());
    Ok(ExitCode::SUCCESS)
}

/// Refuses to run `what` as one of several MPI ranks: it runs in one process, and ranks
/// running it side by side would write the same files.
fn one_process(what: &str) -> anyhow::Result<()> {
    if let Some((var, size)) = dtrain::dist::launched_ranks() {
        bail!(
            "{what} runs in one process, and this is one of {size} ranks ({var}): run it without mpirun or srun \
             (only `train`, skip-gram and CBOW `pretrain` and `bench allreduce` run across ranks)"
        );
    }
    Ok(())
}

/// `dtrain info`.
fn info() {
    let mut features = Vec::new();
    if cfg!(feature = "mpi") {
        features.push("mpi");
    }
    if cfg!(feature = "cuda") {
        features.push("cuda");
    }
    println!("dtrain {} (features: {})", env!("CARGO_PKG_VERSION"), features.join(", "));
    println!("cpu: {} threads", rayon::current_num_threads());
    let env = |k: &str| std::env::var(k).ok();
    match (
        env("OMPI_COMM_WORLD_SIZE").or(env("PMI_SIZE")).or(env("SLURM_NTASKS")),
        env("OMPI_COMM_WORLD_RANK").or(env("PMI_RANK")).or(env("SLURM_PROCID")),
    ) {
        (Some(w), Some(r)) => {
            let world: usize = w.parse().unwrap_or(0);
            match dtrain::dist::local_rank_from(env, world, usize::MAX) {
                (usize::MAX, _) => println!(
                    "launch: rank {r} of {w} (local rank: from MPI's shared-memory split once MPI starts)"
                ),
                (local, from) => println!("launch: rank {r} of {w} (local rank {local}, from {from})"),
            }
        }
        _ => println!("launch: one process (no MPI launcher's environment)"),
    }
    #[cfg(feature = "mpi")]
    println!("mpi: {}", dtrain::dist::mpi_library_version());
    #[cfg(not(feature = "mpi"))]
    println!("mpi: not built in (the `mpi` feature is off)");
    #[cfg(feature = "cuda")]
    {
        use dtrain::backend::cuda::device;
        let p = device::probe();
        match &p.driver {
            Ok(v) => println!("cuda driver: CUDA {}.{}", v / 1000, v % 1000 / 10),
            Err(e) => println!("cuda driver: none ({e}); training runs on the CPU"),
        }
        match p.nvrtc {
            Some((a, b)) => println!("nvrtc: {a}.{b}"),
            None => println!("nvrtc: not found"),
        }
        println!("cublas: {}", if p.cublas { "found" } else { "not found" });
        match p.nccl {
            Some(v) => println!("nccl: {}.{}.{}", v / 10000, v / 100 % 100, v % 100),
            None => println!("nccl: not found (gradients between GPUs then travel by MPI through the host)"),
        }
        if !p.devices.is_empty() {
            let world: usize =
                env("OMPI_COMM_WORLD_SIZE").or(env("PMI_SIZE")).and_then(|w| w.parse().ok()).unwrap_or(1);
            match dtrain::dist::local_rank_from(env, world, usize::MAX) {
                (usize::MAX, _) if world > 1 => {
                    println!(
                        "gpu binding: cuda:(local rank mod {}), the local rank from MPI's split",
                        p.devices.len()
                    )
                }
                (usize::MAX, _) => println!("gpu binding: cuda:0 under --device auto or cuda"),
                (l, from) => {
                    println!("gpu binding: cuda:{} (local rank {l} from {from})", l % p.devices.len())
                }
            }
        }
        for d in &p.devices {
            println!(
                "device cuda:{}: {} (compute {}.{}, {:.1} GiB)",
                d.ordinal,
                d.name,
                d.capability.0,
                d.capability.1,
                d.memory_bytes as f64 / (1u64 << 30) as f64
            );
        }
    }
    #[cfg(not(feature = "cuda"))]
    println!("cuda: not built in (the `cuda` feature is off)");
}

/// A checkpoint's `which` weights and the data set at `data`, checked to share labels and
/// tokenizer, with the payload checksums of `split`'s shards verified (what `eval` and
/// `export-logits` run the model on).
fn load_for_data(
    checkpoint: &Path,
    which: dtrain::checkpoint::Weights,
    data: &Path,
    split: SplitKind,
) -> anyhow::Result<(dtrain::model::Model, Vec<f32>, Dataset)> {
    let (meta, model, params) = dtrain::checkpoint::load_weights(checkpoint, which)?;
    let ds = Dataset::open(data)?;
    ds.verify_payloads(|k, _| k == split)?;
    if let Some(what) = meta.mismatch_reading(ds.labels(), &ds.manifest().tokenizer, "the data set") {
        bail!(
            "{}: the data set does not match the checkpoint's model: {what}; prepare it with the model's options",
            data.display()
        );
    }
    // Another preparation of the same text (another split seed) would hold rows the model
    // trained on in this split: worth a line, though a new test set is also another data set.
    if let Some(theirs) = dtrain::checkpoint::trained_on(checkpoint).filter(|t| *t != ds.manifest().checksum)
    {
        eprintln!(
            "note: {} was trained on another data set (manifest checksum {theirs}, {}'s is {}): if both were \
             prepared from the same text with other split settings, this split may hold rows it trained on",
            checkpoint.display(),
            data.display(),
            ds.manifest().checksum
        );
    }
    Ok((model, params, ds))
}

/// What an exported logits file holds against the labels known for its rows.
fn print_export_report(r: &dtrain::logits::ExportReport, split: SplitKind) {
    if r.known == 0 {
        return;
    }
    let whose = if split == SplitKind::Unlabeled {
        "hidden labels of a simulated split; a diagnostic"
    } else {
        "the split's own labels"
    };
    println!(
        "against the {} known labels ({whose}): accuracy {:.4}",
        r.known,
        r.correct as f64 / r.known as f64
    );
    for (t, n, right) in &r.by_confidence {
        println!(
            "  confidence ≥ {t:.2}: {n} samples ({:.1}%), accuracy {}",
            100.0 * *n as f64 / r.known as f64,
            if *n > 0 { format!("{:.4}", *right as f64 / *n as f64) } else { "-".into() }
        );
    }
}

/// What one `--model` of `dtrain propagate` holds, loaded.
enum Loaded {
    Encoder(dtrain::model::encoder::Encoder, Vec<f32>),
    Bag(dtrain::pretrain::embeddings::Embeddings),
    BagModel(dtrain::model::bag::BagModel, Vec<f32>),
    Stored(dtrain::rowvec::RowVectors),
}

impl Loaded {
    /// The view of `data`'s rows that this model gives.
    fn vectors(&self) -> dtrain::propagate::Vectors<'_> {
        use dtrain::propagate::Vectors;
        match self {
            Loaded::Encoder(enc, params) => Vectors::Encoder { enc, params },
            Loaded::Bag(emb) => Vectors::Bag(emb),
            Loaded::BagModel(model, params) => Vectors::BagModel { model, params },
            Loaded::Stored(r) => Vectors::Stored(r),
        }
    }
}

/// Loads `--model` for the data set `ds` (at `data`): skip-gram embeddings, a pretrained
/// encoder's directory (with `pooling`), a training run's checkpoint (an encoder's or a bag
/// model's), or stored row vectors.
fn load_propagate_model(
    model: &Path,
    data: &Path,
    ds: &Dataset,
    pooling: Option<&str>,
) -> anyhow::Result<Loaded> {
    use dtrain::model::encoder::{load_pretrained, Pooling};
    let m = ds.manifest();
    if dtrain::rowvec::is_vectors_file(model) {
        if pooling.is_some() {
            bail!("--pooling applies to a pretrained encoder; {} holds stored row vectors", model.display());
        }
        // propagate checks them against the rows of `ds`.
        return Ok(Loaded::Stored(dtrain::rowvec::RowVectors::read(model)?));
    }
    let embeddings = model.join(dtrain::pretrain::embeddings::EMBEDDINGS_FILE).is_file()
        || model.file_name().is_some_and(|n| n == dtrain::pretrain::embeddings::EMBEDDINGS_FILE);
    if embeddings {
        if pooling.is_some() {
            bail!(
                "--pooling applies to a pretrained encoder; {} holds word vectors, which are averaged",
                model.display()
            );
        }
        return Ok(Loaded::Bag(dtrain::pretrain::embeddings::read(model)?));
    }
    // A pretrained model's directory, or a training checkpoint.
    if dtrain::model::encoder::is_pretrained_dir(model) {
        let Some(sw) = &m.tokenizer.subword else {
            bail!(
                "{}: the data set holds hashed features; an encoder reads subword ids: prepare it with --set tokenizer.subword.path=<the model's tokenizer.json>",
                data.display()
            );
        };
        let pooling = if pooling == Some("cls") { Pooling::Cls } else { Pooling::Mean };
        dtrain::model::encoder::check_tokenizer(model, sw)?;
        let (enc, params) = load_pretrained(model, 1, pooling, 0)?;
        if let Some(why) = enc.spec.uncovered(m.tokenizer.buckets, sw) {
            bail!("{} {why}", model.display());
        }
        return Ok(Loaded::Encoder(enc, params));
    }
    let (meta, loaded, params) = dtrain::checkpoint::load_model(model)?;
    if let Some(what) = meta.mismatch_reading(ds.labels(), &m.tokenizer, "the data set") {
        bail!("{}: the data set does not match the checkpoint's model: {what}", data.display());
    }
    Ok(match loaded {
        dtrain::model::Model::Encoder(enc) => Loaded::Encoder(enc, params),
        dtrain::model::Model::Bag(bag) => Loaded::BagModel(bag, params),
    })
}

/// `dtrain propagate`.
fn propagate(a: PropagateArgs, progress: bool) -> anyhow::Result<ExitCode> {
    let opts = dtrain::propagate::Options {
        ks: a.k.clone(),
        alphas: a.alpha.clone(),
        shifts: a.shift.clone(),
        aligns: a.align.clone(),
        prior: a.class_prior,
        weights: a.weights.clone(),
        search: match a.search {
            SearchArg::Exact => {
                if a.cells.is_some() || a.probes.is_some() {
                    bail!("--cells and --probes apply to --search cells, not to the exact search");
                }
                dtrain::propagate::Search::Exact
            }
            SearchArg::Cells => dtrain::propagate::Search::Cells {
                cells: a.cells,
                probes: a.probes.unwrap_or(dtrain::knn::DEFAULT_PROBES),
            },
        },
        batch_size: a.batch_size,
        progress,
    };
    dtrain::propagate::check_options(&opts)?;
    if a.model.len() != a.data.len() {
        bail!(
            "{} --model and {} --data: give each view's data set after its model (--model A --data A_DATA --model B --data B_DATA)",
            a.model.len(),
            a.data.len()
        );
    }
    dtrain::propagate::check_weights(&opts, a.model.len() + usize::from(a.tfidf.is_some()))?;
    let mut sets = Vec::new();
    for data in a.data.iter().chain(&a.tfidf) {
        let ds = Dataset::open(data)?;
        ds.verify_payloads(|_, _| true)?;
        sets.push(ds);
    }
    if a.pooling.is_some() && !a.model.iter().any(|m| dtrain::model::encoder::is_pretrained_dir(m)) {
        bail!(
            "--pooling applies to a pretrained model's directory, and no --model is one{}",
            a.model.first().map_or(String::new(), |m| format!(
                ": {} keeps its own (a checkpoint's encoder the pooling it was trained with; word vectors are averaged)",
                m.display()
            ))
        );
    }
    let mut loaded = Vec::new();
    for ((model, data), ds) in a.model.iter().zip(&a.data).zip(&sets) {
        loaded.push(load_propagate_model(model, data, ds, a.pooling.as_deref())?);
    }
    let mut views: Vec<dtrain::propagate::View> = loaded
        .iter()
        .zip(&sets)
        .map(|(l, data)| dtrain::propagate::View { vectors: l.vectors(), data })
        .collect();
    if a.tfidf.is_some() {
        let data = sets.last().expect("opened above");
        views.push(dtrain::propagate::View { vectors: dtrain::propagate::Vectors::Tfidf, data });
    }
    struct Job<'a>(&'a [dtrain::propagate::View<'a>], &'a PropagateArgs, &'a dtrain::propagate::Options);
    impl OnBackend for Job<'_> {
        type Out = dtrain::propagate::Report;
        fn run<B: dtrain::backend::EncoderOps<F = f32>>(self, be: &B) -> dtrain::Result<Self::Out> {
            dtrain::propagate::propagate(be, self.0, &self.1.out, self.1.pseudo_labels.as_deref(), self.2)
        }
    }
    let r = dispatch(a.device.device, 0, progress, Job(&views, &a, &opts))?;
    print_propagate_report(&r, &a);
    Ok(ExitCode::SUCCESS)
}

fn print_propagate_report(r: &dtrain::propagate::Report, a: &PropagateArgs) {
    let [train, val, test, unlabeled] = r.rows;
    println!(
        "embedded {} rows (train {train}, val {val}, test {test}, unlabeled {unlabeled}) in {:.1} s; nearest neighbours in {:.1} s",
        r.rows.iter().sum::<usize>(),
        r.embed_seconds,
        r.search_seconds
    );
    let alone = if r.without_vector.len() == 1 {
        ", hence no neighbours (only a training row's own label reaches it)"
    } else {
        ""
    };
    for (model, &n) in a.model.iter().zip(&r.without_vector) {
        if n > 0 {
            println!(
                "{n} rows hold no word the embeddings {} trained: they have no vector there{alone}",
                model.display()
            );
        }
    }
    if let (Some(data), Some(&n)) = (&a.tfidf, r.without_vector.get(a.model.len())) {
        if n > 0 {
            println!(
                "{n} rows of {} hold no word found in {} rows or more: they have no TF-IDF vector{alone}",
                data.display(),
                dtrain::propagate::TFIDF_MIN_ROWS
            );
        }
    }
    // One line per (shift, k, alpha): its val accuracy at each --align power (the grid's
    // innermost dimension).
    let aligns = a.align.len();
    let powers: String = a.align.iter().map(|p| format!(" {:>8}", format!("a={p}"))).collect();
    let val_of =
        |s: &dtrain::propagate::Setting| s.val_accuracy.map_or("-".to_string(), |v| format!("{v:.4}"));
    println!("   shift     k  alpha{powers}  CG iterations  rows unreached");
    let weighted = !a.weights.is_empty();
    for (line, settings) in r.grid.chunks(aligns).enumerate() {
        let s = &settings[0];
        if weighted && (line == 0 || r.grid[(line - 1) * aligns].weights != s.weights) {
            println!("views weighted {}:", s.weights.name());
        }
        let vals: String = settings.iter().map(|x| format!(" {:>8}", val_of(x))).collect();
        let mark = match (r.chosen / aligns == line, s.converged) {
            (true, _) => {
                let c = &r.grid[r.chosen];
                let w = if weighted { format!("weights {}, ", c.weights.name()) } else { String::new() };
                format!("  <- chosen: {w}align {}, val accuracy {}", c.align, val_of(c))
            }
            (false, false) => "  (did not converge: never chosen)".to_string(),
            _ => String::new(),
        };
        println!(
            "{:>8}  {:>4}  {:>5}{vals}  {:>13}  {:>14}{mark}",
            s.shift.name(),
            s.k,
            s.alpha,
            s.iterations,
            s.unreached
        );
    }
    for (weights, shift, s) in &r.searches {
        let c = &s.cells;
        let w = if weighted { format!("weights {}, ", weights.name()) } else { String::new() };
        let mut notes = Vec::new();
        if c.extended > 0 {
            notes
                .push(format!("{} rows probed more cells, their {} held too few rows", c.extended, c.probes));
        }
        if c.blank > 0 {
            notes.push(format!("{} rows without a vector compared with every row", c.blank));
        }
        let notes = if notes.is_empty() { String::new() } else { format!(" ({})", notes.join("; ")) };
        let sampled = dtrain::knn::RECALL_ROWS.min(r.rows.iter().sum::<usize>() - c.blank);
        let recall = s
            .recall
            .map_or("- (no sampled row has an exact neighbour of positive similarity)".to_string(), |x| {
                format!("{x:.4} of {sampled} sampled rows' exact neighbours")
            });
        println!(
            "{w}{}: {} cells (largest {} rows), {} probed a row, {:.0} candidates a row{notes}, in {:.1} s; recall {recall}",
            shift.name(),
            c.cells,
            c.largest,
            c.probes,
            c.mean_candidates,
            s.seconds,
        );
    }
    for (shift, did) in &r.shifted {
        if did.emptied > 0 {
            println!(
                "{}: {} rows were all common part and lost their vector in a view (counted in the unreached rows where no other view links them)",
                shift.name(),
                did.emptied
            );
        }
        if did.unconverged {
            println!(
                "{}: the top singular direction did not settle within 1000 power iterations (the top two singular values are nearly equal), so a mix of the two was taken out",
                shift.name()
            );
        }
    }
    if let Some(t) = r.test_accuracy {
        println!("test accuracy of the chosen setting: {t:.4} (transductive: the test rows were in the graph, their labels unread)");
    }
    if a.align.iter().any(|&p| p > 0.0) {
        println!(
            "classes among the argmaxes of the rows outside the train split (prior: the {} split's label frequencies, each count plus one):",
            a.class_prior.name()
        );
        println!("  {:<24} {:>7} {:>10} {:>8}", "class", "prior", "unaligned", "chosen");
        for ((name, pi), (plain, chosen)) in r.labels.iter().zip(&r.prior).zip(&r.shares) {
            println!("  {:<24} {:>6.1}% {:>9.1}% {:>7.1}%", name, 100.0 * pi, 100.0 * plain, 100.0 * chosen);
        }
    }
    if val > 0 {
        println!(
            "val rows by the chosen setting's probability (what should pick noisy_student's consistency.threshold, at consistency.temperature = 1):"
        );
        for (t, n, right) in &r.val_by_confidence {
            println!(
                "  probability ≥ {t:.2}: {n} rows ({:.1}%), accuracy {}",
                100.0 * *n as f64 / val as f64,
                if *n > 0 { format!("{:.4}", *right as f64 / *n as f64) } else { "-".into() }
            );
        }
    }
    println!("wrote the logits of {} samples of `unlabeled` to {}", r.export.rows, a.out.display());
    if let Some(p) = &a.pseudo_labels {
        println!("pseudo-labels: {}", p.display());
    }
    print_export_report(&r.export, SplitKind::Unlabeled);
}

/// The weights `--teacher` / `--average` ask for.
fn weights_of(teacher: bool, average: bool) -> anyhow::Result<dtrain::checkpoint::Weights> {
    use dtrain::checkpoint::Weights;
    Ok(match (teacher, average) {
        (false, false) => Weights::Student,
        (true, false) => Weights::Teacher,
        (false, true) => Weights::Average,
        (true, true) => bail!("--teacher and --average exclude each other"),
    })
}

fn print_train_summary(r: &dtrain::train::TrainReport) {
    let ckpt = r.final_checkpoint.display();
    match r.resumed_at {
        0 => println!(
            "trained {} steps in {:.1} s ({:.0} token ids/s of training steps); checkpoint {ckpt}",
            r.steps, r.seconds, r.tokens_per_s
        ),
        at if at == r.steps => {
            println!("the run had already finished at step {at}: nothing left to train; checkpoint {ckpt}")
        }
        at => {
            let steps = if at + 1 == r.steps {
                format!("step {}", r.steps)
            } else {
                format!("steps {} to {}", at + 1, r.steps)
            };
            println!(
                "trained {steps} (resumed at {at}) in {:.1} s ({:.0} token ids/s of training steps); checkpoint {ckpt}",
                r.seconds, r.tokens_per_s
            )
        }
    }
    let line = |who: &str,
                val: &Option<dtrain::train::metrics::EvalReport>,
                test: &Option<dtrain::train::metrics::EvalReport>| {
        // The splits evaluated (a resumed finished run evaluates only the test split again).
        let parts: Vec<String> = [("val", val), ("test", test)]
            .iter()
            .filter_map(|(split, r)| {
                r.as_ref().map(|r| format!("{split} accuracy {:.4} (macro-F1 {:.4})", r.accuracy, r.macro_f1))
            })
            .collect();
        if !parts.is_empty() {
            println!("{who}: {}", parts.join(", "));
        }
    };
    line("student", &r.val, &r.test);
    for s in &r.shadows {
        line(&s.name, &s.val, &s.test);
    }
}

fn print_prepare_summary(r: &PrepareReport) {
    let secs = r.elapsed.as_secs_f64();
    println!(
        "prepared {} in {:.2} s: {:.1} MB/s of text, {:.0} documents/s",
        r.dir.display(),
        secs,
        r.text_bytes as f64 / 1e6 / secs,
        r.docs_read as f64 / secs
    );
    print!("{}", dataset::describe(&r.manifest));
    if !r.skipped_examples.is_empty() {
        println!("first skipped lines:");
        for e in &r.skipped_examples {
            println!("  {e}");
        }
    }
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
}

fn inspect(args: &InspectArgs) -> anyhow::Result<ExitCode> {
    // --split and --explain read a data set: given for a single file, they are refused
    // rather than ignored.
    let data_set_flags = |what: &str| -> anyhow::Result<()> {
        if args.split.is_some() || args.explain.is_some() {
            bail!("--split and --explain read a data set, and {} is {what}", args.path.display());
        }
        Ok(())
    };
    if !args.path.exists() {
        bail!("{}: no such file or directory", args.path.display());
    }
    // A file named `.logits` is read as one, so a truncated one is reported by the logits
    // reader (not as a short shard).
    let is_logits = args.path.is_file()
        && (dtrain::logits::has_magic(&args.path) || args.path.extension().is_some_and(|x| x == "logits"));
    if args.data.is_some() && !is_logits {
        bail!("--data names the data set of a logits file, and {} is not a logits file", args.path.display());
    }
    if !args.path.is_file() && !args.path.is_dir() {
        bail!("{}: not a regular file or a directory (a device or FIFO?)", args.path.display());
    }
    if args.path.is_dir() && args.path.extension().is_some_and(|x| x == "shard") {
        bail!("{}: is a directory, not a shard file", args.path.display());
    }
    if args.path.is_file() && args.path.extension().is_some_and(|x| x == "bank") {
        data_set_flags("a bank file")?;
        let scan = dtrain::bank::verify_sealed(&args.path)?;
        let (h, histogram) = (&scan.header, &scan.histogram);
        println!(
            "{}: dtrain Temporal Ensembling bank of {} shard {}/{}: {} rows × {} classes as {:?}, alpha {}, {}",
            args.path.display(),
            h.split.name(),
            h.shard,
            h.shards,
            h.rows,
            h.classes,
            h.storage,
            h.alpha,
            if h.sealed { "sealed (checkpoint snapshot), contents match their checksum" } else { "live (unsealed: no checksum)" }
        );
        let updated: u64 = histogram.iter().skip(1).sum();
        let mean = histogram.iter().enumerate().map(|(n, &k)| n as f64 * k as f64).sum::<f64>()
            / h.rows.max(1) as f64;
        println!(
            "rows updated at least once: {updated} of {} ({:.1}%); mean updates per row {mean:.2}",
            h.rows,
            100.0 * updated as f64 / h.rows.max(1) as f64
        );
        println!(
            "updates per row: {}",
            histogram
                .iter()
                .enumerate()
                .filter(|(_, &k)| k > 0)
                .map(|(n, k)| format!("{}{n}: {k}", if n == 256 { "≥" } else { "" }))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if let Some(row) = scan.first_bad_row {
            bail!(
                "{}: {} stored {} not finite or outside [0, 1], the first in row {row}: the bank is damaged{}",
                args.path.display(),
                scan.bad_values,
                if scan.bad_values == 1 { "value is" } else { "values are" },
                if h.sealed { "" } else { " (a resumed run restores a live bank from its checkpoint)" }
            );
        }
        println!("values: all finite, in [0, 1]");
        return Ok(ExitCode::SUCCESS);
    }
    if is_logits {
        data_set_flags("a logits file (--data names its data set)")?;
        let data = args.data.as_deref().map(dataset::Dataset::open).transpose()?;
        print!("{}", dtrain::logits::LogitsFile::open(&args.path)?.describe(data.as_ref())?);
        return Ok(ExitCode::SUCCESS);
    }
    let is_checkpoint =
        args.path.join("model.safetensors").is_file() || args.path.join(dtrain::checkpoint::DONE).is_file();
    let is_tensors = args.path.extension().is_some_and(|x| x == "safetensors");
    if args.path.file_name().is_some_and(|n| n == dtrain::pretrain::embeddings::EMBEDDINGS_FILE) {
        bail!(
            "{}: pretrained word embeddings, which inspect does not read: `dtrain neighbors` shows what they learned, \
             and `model.init_from` starts a bag model from them",
            args.path.display()
        );
    }
    if args.path.is_file() && dtrain::rowvec::is_vectors_file(&args.path) {
        data_set_flags("a file of row vectors")?;
        let r = dtrain::rowvec::RowVectors::read_for(&args.path, "inspect", "FILE")?;
        let m = &r.meta;
        println!(
            "{}: dtrain row vectors of {} rows (train {}, val {}, test {}, unlabeled {}), width {}, by {} ({}) from {} in {:.1} s; contents match their checksum",
            args.path.display(),
            r.len(),
            m.rows[0],
            m.rows[1],
            m.rows[2],
            m.rows[3],
            m.width,
            m.model,
            m.kind,
            m.data,
            m.seconds
        );
        println!("classes: {}; rows without a vector: {}", m.labels.join(", "), m.blank);
        return Ok(ExitCode::SUCCESS);
    }
    if dtrain::model::encoder::is_pretrained_dir(&args.path) {
        bail!(
            "{}: a pretrained encoder (Hugging Face config.json + model.safetensors), which inspect does not read: \
             `dtrain embed --model DIR TEXT` runs it, model.encoder.pretrained fine-tunes it",
            args.path.display()
        );
    }
    if is_checkpoint || is_tensors {
        bail!(
            "{}: {}, which inspect does not read: `dtrain eval --checkpoint DIR --data DATA` evaluates a checkpoint",
            args.path.display(),
            if is_checkpoint { "a training checkpoint" } else { "a safetensors file (a checkpoint's weights)" }
        );
    }
    // A shard is described on its own; the manifest or vocabulary stands for its data set.
    let is_shard_file = args.path.extension().is_some_and(|x| x == "shard");
    let dataset_file = (!is_shard_file).then(|| dataset::containing_dataset(&args.path)).flatten();
    if let Some(dir) = &dataset_file {
        println!(
            "{} is a file of the data set {}: inspecting the data set",
            args.path.display(),
            dir.display()
        );
    }
    if args.path.is_file() && dataset_file.is_none() {
        data_set_flags("a single shard file (give its data set's directory)")?;
        let shard = Shard::open(&args.path).map_err(|e| match is_shard_file {
            true => anyhow::Error::from(e),
            false => anyhow::anyhow!(
                "{e}; inspect reads a data set (its directory, or a file in it), a .shard file, a .bank file or a \
                 logits file"
            ),
        })?;
        let h = shard.header();
        println!(
            "{}: dtrain shard {}/{} of split `{}`: {} documents, {} token ids, tokenizer {:016x}, payload checksum {:016x}",
            args.path.display(),
            h.shard_index,
            h.num_shards,
            h.split.name(),
            h.num_docs,
            h.num_ids,
            h.tokenizer_hash,
            h.payload_checksum
        );
        return Ok(ExitCode::SUCCESS);
    }
    let split_name = args.split.as_deref().unwrap_or("train");
    let split = SplitKind::from_name(split_name)
        .with_context(|| format!("--split {split_name}: expected train, val, test or unlabeled"))?;
    let dir = dataset_file.as_deref().unwrap_or(&args.path);
    let ds = Dataset::open(dir)?;
    let m: &Manifest = ds.manifest();
    println!(
        "{}: dtrain data set, {} classes, {} shards per split",
        dir.display(),
        m.labels.len(),
        m.num_shards
    );
    print!("{}", dataset::describe(m));
    if let Some(text) = &args.explain {
        if let Some(sw) = &m.tokenizer.subword {
            // The ids the model reads come from the subword tokenizer (at the recorded path).
            let tok = dtrain::data::subword::SubwordTokenizer::for_spec(sw)
                .context("--explain reads the data set's subword tokenizer")?;
            let ids = tok.encode(text, sw.max_len as usize)?;
            println!("subword tokenization of {text:?} ({}, at most {} ids):", sw.path, sw.max_len);
            if ids.is_empty() {
                println!("  no token of its own: prepare and predict refuse such a text");
            }
            for id in ids {
                println!("  {:<24} {id}", format!("{:?}", tok.token(id)));
            }
        } else {
            println!("tokenization of {text:?}:");
            if dtrain::data::input::is_empty_text(text) {
                println!(
                    "  nothing but whitespace or control characters: prepare and predict refuse such a text"
                );
            } else {
                for f in Tokenizer::new(m.tokenizer.clone()).explain(text) {
                    println!("  {:<10} {:<24} {}", f.kind, format!("{:?}", f.text), f.id);
                }
            }
        }
    }
    if args.samples > 0 {
        println!("samples of `{}`:", split.name());
        print!("{}", dataset::sample_lines(&ds, split, args.samples));
    }
    Ok(ExitCode::SUCCESS)
}

/// `dtrain verify PATH`: a data set directory, a file of one (the whole data set is
/// verified), or a lone shard file (its structure and payload checksum alone).
fn verify_path(path: &Path) -> anyhow::Result<ExitCode> {
    // What is no data set at all is a wrong argument, not a data set that fails.
    if !path.exists() {
        bail!("{}: no such file or directory", path.display());
    }
    if !path.is_file() && !path.is_dir() {
        bail!("{}: not a regular file or a directory (a device or FIFO?)", path.display());
    }
    if path.is_dir() && !path.join(dtrain::data::manifest::MANIFEST_FILE).exists() {
        bail!(
            "{}: is not a data set directory (one `dtrain prepare` made): it has no {}",
            path.display(),
            dtrain::data::manifest::MANIFEST_FILE
        );
    }
    if !path.is_file() {
        return Ok(verify(path));
    }
    if let Some(dir) = dataset::containing_dataset(path) {
        println!(
            "{} is a file of the data set {}: verifying the whole data set",
            path.display(),
            dir.display()
        );
        return Ok(verify(&dir));
    }
    let mut magic = [0u8; 8];
    let is_shard =
        std::fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic)).is_ok()
            && &magic == dtrain::data::shard::SHARD_MAGIC;
    if !is_shard {
        bail!(
            "{}: not a dtrain shard file: `dtrain verify` takes a data set directory made by `dtrain prepare`, \
             or one of its files",
            path.display()
        );
    }
    let shard = Shard::open(path)?;
    shard.verify_checksum()?;
    let h = shard.header();
    println!(
        "ok      {}: shard {}/{} of split `{}`, {} documents, payload checksum matches \
         (not one of a data set's files: its agreement with a manifest, its token ids' range and its vocabulary were not checked)",
        path.display(),
        h.shard_index,
        h.num_shards,
        h.split.name(),
        h.num_docs
    );
    Ok(ExitCode::SUCCESS)
}

fn verify(dir: &Path) -> ExitCode {
    let report = dataset::verify(dir);
    for (file, problem) in &report.files {
        match problem {
            None => println!("ok      {file}"),
            Some(p) => println!("FAILED  {file}: {p}"),
        }
    }
    // Shard files the manifest does not list are never read; named, as a leftover (only
    // where the manifest could be read: otherwise it lists nothing).
    let listed: std::collections::HashSet<&str> = report.files.iter().map(|(f, _)| f.as_str()).collect();
    let manifest_read = report.files.iter().any(|(f, p)| f == "manifest.json" && p.is_none());
    let mut stray: Vec<String> = match manifest_read {
        true => std::fs::read_dir(dir)
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default(),
        false => Vec::new(),
    };
    stray.retain(|n| n.ends_with(".shard") && !listed.contains(n.as_str()));
    stray.sort();
    for n in &stray {
        println!(
            "warning {n}: not one of the manifest's files (never read, not verified): a leftover to remove"
        );
    }
    let bad = report.files.iter().filter(|(_, p)| p.is_some()).count();
    if bad == 0 {
        println!("{}: all {} files verified", dir.display(), report.files.len());
        ExitCode::SUCCESS
    } else {
        println!("{}: {bad} of {} files FAILED verification", dir.display(), report.files.len());
        ExitCode::FAILURE
    }
}

fn demo(args: &DemoArgs, progress: bool) -> anyhow::Result<ExitCode> {
    if !args.data.exists() {
        bail!(
            "{}: the demo data is missing; run the demo from the dtrain checkout's root directory",
            args.data.display()
        );
    }
    if args.out.exists() && !args.out.is_dir() {
        bail!("--out {}: is a file, not a directory", args.out.display());
    }
    // The demo replaces its own data set and run on every start: only in a directory that
    // holds nothing but what it writes (a new one, or an earlier demo's), its run included.
    let marker = args.out.join("DEMO");
    let run = args.out.join("supervised");
    let holds_only = |dir: &Path, own: &[&str]| {
        std::fs::read_dir(dir)
            .map(|d| d.flatten().all(|e| own.iter().any(|o| e.file_name() == *o)))
            .unwrap_or(true)
    };
    let own = ["DEMO", "data", "supervised", "report.json", "curves.png"];
    let run_own = ["checkpoints", "metrics.jsonl", dtrain::bank::DIR, dtrain::fsutil::RUN_LOCK];
    let run_in_the_way = run.exists() && !run.is_dir();
    if !holds_only(&args.out, &own)
        || run_in_the_way
        || !holds_only(&run, &run_own)
        || (run.exists() && !marker.is_file())
    {
        bail!(
            "{}: not a directory the demo made (it, or its supervised/ run, holds other files, or it has no DEMO \
             marker), and the demo replaces its data/ and supervised/ on every start: choose another --out",
            args.out.display()
        );
    }
    // Both configs are read before anything is replaced.
    let data = args.out.join("data");
    let prep = PrepareArgs {
        config: Some(args.config.clone()),
        input: vec![args.data.clone()],
        out: Some(data.clone()),
        force: true,
        ..PrepareArgs::default()
    };
    let cfg = prep.load()?;
    let overrides =
        [Override::typed("demo", "data.dir", &data)?, Override::typed("demo", "train.out_dir", &run)?];
    let tcfg: TrainConfig = config::load(Some(&args.train_config), &overrides)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    // An earlier demo's report would describe a run this one replaces.
    for stale in ["report.json", "curves.png"] {
        let path = args.out.join(stale);
        if path.exists() {
            std::fs::remove_file(&path)
                .with_context(|| format!("removing the previous {}", path.display()))?;
        }
    }
    println!(
        "== 1/4 prepare {} ({} labels per class, the rest unlabeled)",
        args.data.display(),
        cfg.split.labels_per_class.map_or("all".into(), |k| k.to_string())
    );
    let report = prepare(&cfg, progress)?;
    // Marked as the demo's once its data set is: a data/ of the user's that prepare
    // refused leaves the directory unmarked.
    std::fs::write(&marker, b"made by dtrain demo\n")
        .with_context(|| format!("writing {}", marker.display()))?;
    print_prepare_summary(&report);
    println!("\n== 2/4 verify {}", data.display());
    if verify(&data) != ExitCode::SUCCESS {
        bail!("the demo data set failed verification");
    }
    let ds = Dataset::open(&data)?;
    print!("{}", dataset::sample_lines(&ds, SplitKind::Train, 2));
    println!("\n== 3/4 train ({})", args.train_config.display());
    if run.exists() {
        std::fs::remove_dir_all(&run)
            .with_context(|| format!("removing the previous demo run {}", run.display()))?;
    }
    let opts = RunOptions { resume: Resume::No, progress, stop_after: None, device: Default::default() };
    let r = train(&tcfg, &opts)?;
    print_train_summary(&r);
    println!("\n== 4/4 evaluate on the held-out test split");
    let test = r.test.context("the demo data set has no test split")?;
    print!("{}", test.to_text());
    let json = args.out.join("report.json");
    dtrain::bench::write_json(&json, &test)?;
    let png = args.out.join("curves.png");
    let curves = dtrain::plot::read_metrics(&run.join("metrics.jsonl"))?;
    dtrain::plot::plot(&curves, "dtrain demo: Brown genre, 20 labels per class", &png, 1200, 500)?;
    println!(
        "\nreport: {}   metrics: {}   curves: {}",
        json.display(),
        run.join("metrics.jsonl").display(),
        png.display()
    );
    Ok(ExitCode::SUCCESS)
}
