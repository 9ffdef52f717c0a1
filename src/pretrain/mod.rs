//! `dtrain pretrain`: skip-gram or CBOW on a prepared data set's word sequences, training
//! the table of hashed word and character n-gram features that the bag classifier then
//! starts from (METHODS.md §12b); epochs, threads, progress, checkpoints and exact resume.
//!
//! The run, in order:
//! 1. count every vocabulary word over the chosen splits; keep those seen `min_count` times,
//!    most frequent first (the output matrix's rows);
//! 2. hash each kept word's features (the word and its character n-grams) with the data
//!    set's own tokenizer, so input row `i` is the classifier's feature `i`;
//! 3. build the negative table (unigram^power) and the subsampling probabilities;
//! 4. per epoch, cut the documents into one contiguous range per thread (equal numbers of
//!    trained words) and run the threads over the shared tables ([`sgns`], Hogwild); the
//!    learning rate decays linearly with each thread's own progress, so a one-thread run is
//!    a pure function of the config and the data;
//! 5. checkpoint at epoch boundaries; finally write `embeddings.safetensors` and `words.tsv`
//!    into `train.out_dir` and delete the checkpoints.
//!
//! # Across ranks
//! Under MPI the documents are cut into one range per thread of every rank, each rank keeps
//! its own copy of the tables, and an epoch runs in rounds of about `train.sync_words`
//! words per rank. Before a round a rank snapshots the rows it may change (the features of
//! the words in its documents, and the whole output matrix); after it, the ranks exchange
//! their changed rows ([`Dist::sum_rows`], sparse or dense) and every rank adds the sum
//! of the changes divided by W: model averaging, with each rank stepping at W times
//! `train.lr` (local SGD's linear scaling). A row only one rank touched (a rare word's)
//! then moves as one process would move it at `train.lr`, and so does a row that every
//! rank moved a little (the ranks' updates add up); a row every rank moved most of the way to
//! where its data pulls it (a frequent word's output row, updated by thousands of negative
//! draws per round) moves to the average of those places, where summing W such moves
//! overshoots W-fold (it diverged at W = 4). Averaging at `train.lr` alone was stable but
//! slowed every shared row W-fold and cost accuracy downstream; docs/results.md has the
//! measurements. The replicas are then identical, which each epoch checks by hash. Rank 0
//! writes the files; with one thread per rank a run is a function of the config, the data and W.

pub mod embeddings;
pub mod mlm;
pub mod sgns;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;
use serde_json::json;
use xxhash_rust::xxh3::xxh3_64;

use crate::backend::SparseRows;
use crate::checkpoint;
use crate::config::PretrainConfig;
use crate::data::dataset::Dataset;
use crate::data::shard::{Shard, SplitKind};
use crate::data::tokenize::{Tokenizer, TOKENIZER_ALGORITHM};
use crate::dist::Dist;
use crate::error::{Error, IoContext, Result};
use crate::model::params::fill_uniform;
use crate::rng::{Fast, Purpose, Stream};
use crate::train::Resume;
use embeddings::EmbeddingsMeta;
use sgns::{Hyper, Lexicon, SharedTables, Worker, DROPPED};

/// Options of one `pretrain` call that are not part of the config.
#[derive(Debug, Clone)]
pub struct PretrainOptions {
    pub resume: Resume,
    /// Show the progress bar.
    pub progress: bool,
    /// Stop after this many epochs as if interrupted (after their checkpoint). For tests.
    pub stop_after: Option<u32>,
}

/// What a pretraining run did.
#[derive(Debug, Clone)]
pub struct PretrainReport {
    pub out_dir: PathBuf,
    /// Epochs completed in total (resumed ones included).
    pub epochs: u32,
    /// Processes (MPI ranks), and worker threads in each.
    pub ranks: usize,
    pub threads: usize,
    /// Words the vocabulary holds, and those trained (seen `min_count` times).
    pub vocab_words: usize,
    pub trained_words: usize,
    /// Word tokens of the chosen splits, and those of trained words (one epoch).
    pub tokens: u64,
    pub trained_tokens: u64,
    /// Mean loss per predicted word over the last epoch run.
    pub loss: f64,
    /// Trained-word tokens read per second of the epochs run in this call (before
    /// subsampling, as fastText counts), by all ranks together and per thread.
    pub words_per_s: f64,
    pub words_per_s_per_thread: f64,
    /// Seconds of the epochs run here, and of the whole call.
    pub train_seconds: f64,
    pub seconds: f64,
    /// `--resume auto` found this run's output already written: nothing was trained (and
    /// `loss` is NaN).
    pub already_finished: bool,
}

/// A contiguous run of documents of one shard, read by one thread.
#[derive(Debug, Clone, Copy)]
struct Segment {
    shard: usize,
    docs: (usize, usize),
}

/// The trajectory hash of a pretraining config: every field except where files go and how
/// often checkpoints are written (the thread count stays in: it changes the result). A
/// masked-LM run's checkpoints and encoder record it too.
fn config_hash(cfg: &PretrainConfig) -> u64 {
    xxh3_64(trajectory_config(cfg).as_bytes())
}

/// The config as [`config_hash`] hashes it, as JSON text: each checkpoint keeps it as
/// `config.json`, so that a resume under another config can name the fields that differ.
fn trajectory_config(cfg: &PretrainConfig) -> String {
    let mut c = cfg.clone();
    c.dist = Default::default();
    c.data.dir = PathBuf::new();
    c.train.out_dir = PathBuf::new();
    c.train.checkpoint_every = 0;
    c.train.keep_checkpoints = 0;
    c.mlm.checkpoint_every = crate::config::PretrainMlm::CHECKPOINT_EVERY;
    serde_json::to_string(&c).expect("config serialises")
}

/// Why a checkpoint's config (its `config.json`, when it has one) is not `cfg`: the fields
/// that differ, with both values.
fn config_mismatch(dir: &std::path::Path, cfg: &PretrainConfig) -> String {
    let then = std::fs::read_to_string(dir.join(checkpoint::CONFIG_FILE))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
    format!(
        "the checkpoint was written with a different pretraining config{}: every setting but where files go and how often checkpoints are written must be the same",
        config_fields(then.as_ref(), cfg)
    )
}

/// The fields in which `then` (a trajectory config, [`trajectory_config`]'s JSON, where a
/// file recorded one) differs from `cfg`'s, with both values: ` (a: x → y; …)`, or nothing
/// when unknown.
fn config_fields(then: Option<&serde_json::Value>, cfg: &PretrainConfig) -> String {
    let now: serde_json::Value =
        serde_json::from_str(&trajectory_config(cfg)).expect("the config's own JSON");
    let fields = then.map(|then| crate::config::differences(then, &now, 8)).unwrap_or_default();
    if fields.is_empty() {
        String::new()
    } else {
        format!(" ({})", fields.join("; "))
    }
}

/// Why an output recorded with trajectory hash `then_hash` (and `then_config`, where it
/// recorded the config) on data `then_data` is not the output of this run of `cfg` (hash
/// `hash`) on data `data`; `None` when both match.
fn other_run(
    (then_hash, then_config, then_data): (u64, Option<&serde_json::Value>, &str),
    cfg: &PretrainConfig,
    hash: u64,
    data: &str,
) -> Option<String> {
    if then_data != data {
        return Some(format!(
            "it was written on another data set (checksum {then_data}; {} has {data})",
            cfg.data.dir.display()
        ));
    }
    (then_hash != hash).then(|| {
        format!("it was written under another pretraining config{}", config_fields(then_config, cfg))
    })
}

/// The name of the checkpoint after `epochs` epochs of skip-gram or CBOW.
fn epoch_dir(epochs: u64) -> String {
    format!("epoch-{epochs:06}")
}

/// The checkpoint `resume` continues from among the `{prefix}-N` checkpoints in `ckpt_root`
/// (none: a fresh start); a fresh start (`--resume no`) over such checkpoints is refused.
fn resume_point(resume: &Resume, ckpt_root: &Path, prefix: &str) -> Result<Option<PathBuf>> {
    Ok(match resume {
        Resume::No => {
            if checkpoint::list_named(ckpt_root, prefix)?.last().is_some() {
                return Err(Error::bad_file(
                    ckpt_root,
                    "holds checkpoints of an earlier run: pass --resume auto to continue it, or choose another train.out_dir",
                ));
            }
            None
        }
        Resume::Auto => checkpoint::list_named(ckpt_root, prefix)?.pop(),
        Resume::From(dir) => Some(crate::train::resume_dir(dir)?),
    })
}

/// Refuses a fresh start of a pretraining (`run` names its kind) in `out_dir` over what
/// another run left there: any of `earlier`, a `metrics.jsonl` whose records lack
/// `metrics_key` (another command's), or anything in `checkpoints/` but this kind's own
/// `{prefix}-N` checkpoints (the run removes that directory when it ends). Under `--resume
/// auto`, `unfinished` says why the output there is not this run's finished one.
fn check_fresh_start(
    out_dir: &Path,
    earlier: &[&str],
    run: &str,
    prefix: &str,
    metrics_key: &str,
    unfinished: Option<&str>,
) -> Result<()> {
    let why = match unfinished {
        Some(why) if !why.is_empty() => {
            format!("under --resume auto it is not this run's finished output: {why}; ")
        }
        _ => String::new(),
    };
    crate::fsutil::check_no_earlier_outputs(
        "pretrain",
        "train.out_dir",
        out_dir,
        earlier,
        &format!(
            "{why}choose another train.out_dir, or move them away (a {run} continues only from its own {prefix} \
             checkpoints, with --resume auto)"
        ),
    )?;
    crate::fsutil::check_metrics_kind(&out_dir.join("metrics.jsonl"), metrics_key, &format!("a {run}'s"))?;
    let ckpt_root = out_dir.join("checkpoints");
    if let Some(other) = std::fs::read_dir(&ckpt_root)
        .into_iter()
        .flatten()
        .flatten()
        .find(|e| !e.file_name().to_string_lossy().starts_with(&format!("{prefix}-")))
    {
        return Err(Error::bad_file(
            other.path(),
            format!(
                "is not a {run}'s checkpoint, and the run removes its checkpoints directory when it ends: choose \
                 another train.out_dir"
            ),
        ));
    }
    Ok(())
}

/// Runs `dtrain pretrain` as `cfg` says, in this process alone.
pub fn pretrain(cfg: &PretrainConfig, opts: &PretrainOptions) -> Result<PretrainReport> {
    pretrain_on(cfg, opts, &Dist::single())
}

/// Runs `dtrain pretrain` as `cfg` says as one rank of `dist`: every rank reads its own
/// documents into its own copy of the tables, and the ranks merge their changes every
/// `train.sync_words` words; rank 0 writes the files.
pub fn pretrain_on(cfg: &PretrainConfig, opts: &PretrainOptions, dist: &Dist) -> Result<PretrainReport> {
    let started = Instant::now();
    let root = dist.is_root();
    let progress = opts.progress && root;
    if cfg.model.objective == crate::config::Objective::Mlm {
        return Err(Error::config("pretrain", "model.objective", "mlm runs through pretrain::mlm::pretrain"));
    }
    let ds = Dataset::open(&cfg.data.dir)?;
    let manifest = ds.manifest();
    if manifest.tokenizer.subword.is_some() {
        return Err(Error::config(
            "pretrain",
            "data.dir",
            format!(
                "{} holds subword ids (tokenizer.subword): skip-gram trains hashed word features, so prepare \
                 the text without tokenizer.subword (masked-LM pretraining is for encoders)",
                cfg.data.dir.display()
            ),
        ));
    }
    dist.check_job(&serde_json::to_string(cfg).expect("config serialises"), &manifest.checksum)?;
    dist.check_stop_after(opts.stop_after.map(u64::from))?;
    let vocab = ds.vocab()?;
    let splits: Vec<SplitKind> =
        cfg.data.splits.iter().map(|s| SplitKind::from_name(s).expect("validated split name")).collect();
    let shards: Vec<&Shard> = splits.iter().flat_map(|&s| ds.shards(s)).collect();
    // Word ids are checked against the vocabulary below; the payload checksums catch any
    // other damage (a word swapped for another in range) before training reads it.
    ds.verify_payloads(|split, _| splits.contains(&split))?;
    for s in &shards {
        s.verify_words(vocab.len() as u64)?;
    }

    // 1. Counts and the trained words.
    let counts = shards
        .par_iter()
        .map(|s| {
            let mut c = vec![0u64; vocab.len()];
            for i in 0..s.len() {
                for &w in s.doc_words(i) {
                    c[w as usize] += 1;
                }
            }
            c
        })
        .reduce(
            || vec![0u64; vocab.len()],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                a
            },
        );
    let tokens: u64 = counts.iter().sum();
    let m = &cfg.model;
    let mut kept: Vec<u32> = (0..vocab.len() as u32).filter(|&w| counts[w as usize] >= m.min_count).collect();
    kept.sort_by(|&a, &b| counts[b as usize].cmp(&counts[a as usize]).then(a.cmp(&b)));
    if kept.is_empty() {
        return Err(Error::Data(format!(
            "{}: no word occurs {} times in the splits {:?} ({} word tokens): lower model.min_count or add text",
            cfg.data.dir.display(),
            m.min_count,
            cfg.data.splits,
            tokens
        )));
    }
    if kept.len() < 2 {
        return Err(Error::config(
            "pretrain",
            "model.min_count",
            format!(
                "leaves one word ({:?}) of {}: negative sampling draws other words than the target, and there is none",
                vocab.word(kept[0]),
                cfg.data.dir.display()
            ),
        ));
    }
    let words: Vec<String> = kept.iter().map(|&w| vocab.word(w).to_owned()).collect();
    let kept_counts: Vec<u64> = kept.iter().map(|&w| counts[w as usize]).collect();
    let trained_tokens: u64 = kept_counts.iter().sum();

    // 2.–3. Features, negatives, subsampling.
    let tok = Tokenizer::new(manifest.tokenizer.clone());
    let mut keep = vec![DROPPED; vocab.len()];
    let (mut feat_offsets, mut feat_ids, mut scratch) = (vec![0u32], Vec::new(), Vec::new());
    for (i, (&v, w)) in kept.iter().zip(&words).enumerate() {
        keep[v as usize] = i as u32;
        tok.word_features(w, m.char_ngram_min, m.char_ngram_max, &mut scratch);
        feat_ids.extend_from_slice(&scratch);
        feat_offsets
            .push(u32::try_from(feat_ids.len()).map_err(|_| Error::Data("over 2^32 features".into()))?);
    }
    let lex = Lexicon {
        feat_offsets,
        feat_ids,
        keep,
        keep_prob: kept_counts.iter().map(|&c| sgns::keep_probability(c, tokens, m.subsample)).collect(),
        negatives: sgns::negative_table(
            &kept_counts,
            m.negative_power,
            sgns::NEGATIVE_TABLE_SIZE,
            &mut Stream::new(cfg.train.seed, Purpose::NegativeTable, 0),
        ),
    };

    // The tables: input uniform in ±1/D, output zero (fastText).
    let t = &cfg.train;
    let buckets = manifest.tokenizer.buckets as usize;
    let layout = embeddings::layout(buckets, words.len(), m.dim);
    crate::hostmem::Budget::new("pretrain", dist.local_size())?.claim(
        "the input and output tables",
        layout.total() as u64 * 4,
        "model.dim",
        "lower model.dim, or prepare the data with fewer tokenizer.buckets (the input table holds buckets × dim values, the output table words × dim)",
    )?;
    let hash = config_hash(cfg);
    let mut meta = EmbeddingsMeta {
        format: embeddings::FORMAT.into(),
        objective: m.objective,
        dim: m.dim,
        char_ngram_min: m.char_ngram_min,
        char_ngram_max: m.char_ngram_max,
        tokenizer: manifest.tokenizer.clone(),
        tokenizer_algorithm: TOKENIZER_ALGORITHM,
        words: words.len(),
        words_checksum: String::new(),
        epochs_done: 0,
        config_hash: hash,
        data_checksum: manifest.checksum.clone(),
        config: Some(serde_json::from_str(&trajectory_config(cfg)).expect("the config's own JSON")),
    };
    let tsv = embeddings::words_tsv(&words, &kept_counts);
    let ckpt_root = t.out_dir.join("checkpoints");
    crate::fsutil::check_run_dir_place("pretrain", "train.out_dir", &t.out_dir)?;
    // Held to the run's end: no second run reads or writes this directory meanwhile.
    let _lock = dist.lock_run_dir(&t.out_dir, "train.out_dir")?;
    let resume_from = resume_point(&opts.resume, &ckpt_root, "epoch")?;
    dist.check_resume(resume_from.as_deref())?;
    // Under --resume auto, a run that already wrote its output (a job requeued after it
    // finished) has nothing left to do; any other output there is refused below. Every
    // rank reads the output's metadata and words, which must agree; rank 0 alone also reads
    // its tables (and their checksum), which on a node of many ranks each would otherwise
    // hold at once, and decides.
    // (`unfinished`: why what is there is not this run's finished output.)
    let (head, unfinished) = if resume_from.is_none() && opts.resume == Resume::Auto {
        let head = embeddings::read_head(&t.out_dir).map_err(|e| e.to_string()).and_then(|(_, _, e)| {
            let then = (e.meta.config_hash, e.meta.config.as_ref(), e.meta.data_checksum.as_str());
            match other_run(then, cfg, hash, &meta.data_checksum) {
                Some(why) => Err(why),
                None if e.meta.epochs_done != t.epochs => {
                    Err(format!("it holds {} of the run's {} epochs", e.meta.epochs_done, t.epochs))
                }
                None if e.words != words => {
                    Err(format!("its {} lists other words than this run trains", embeddings::WORDS_FILE))
                }
                None => Ok(()),
            }
        });
        let whole = match &head {
            Ok(()) if root => embeddings::read(&t.out_dir).map(|_| ()).map_err(|e| e.to_string()),
            other => other.clone(),
        };
        (head.is_ok(), whole.err())
    } else {
        (false, Some(String::new()))
    };
    dist.check_agree(
        &["finished pretraining in train.out_dir"],
        &[u64::from(head)],
        "Every rank must see the same train.out_dir: give it on a file system every node shares",
    )?;
    let finished = dist.all_gather("the finished-run check", &[u64::from(unfinished.is_none())])[0][0] == 1;
    if finished {
        return Ok(PretrainReport {
            out_dir: t.out_dir.clone(),
            epochs: t.epochs,
            ranks: dist.world(),
            threads: if t.threads == 0 { rayon::current_num_threads() } else { t.threads },
            vocab_words: vocab.len(),
            trained_words: words.len(),
            tokens,
            trained_tokens,
            loss: f64::NAN,
            words_per_s: 0.0,
            words_per_s_per_thread: 0.0,
            train_seconds: 0.0,
            seconds: started.elapsed().as_secs_f64(),
            already_finished: true,
        });
    }
    if resume_from.is_none() {
        // A fresh start writes these files and, when it ends, removes its checkpoints:
        // nothing of another run may be there (an interrupted pretraining's metrics are
        // started over under --resume auto).
        let mut earlier = vec![embeddings::EMBEDDINGS_FILE, embeddings::WORDS_FILE];
        if opts.resume == Resume::No {
            earlier.push("metrics.jsonl");
        }
        let why = unfinished.filter(|_| opts.resume == Resume::Auto);
        check_fresh_start(&t.out_dir, &earlier, "pretraining", "epoch", "words_per_s", why.as_deref())?;
    }
    let mut params = match &resume_from {
        Some(dir) => {
            checkpoint::check_written(dir, checkpoint::Reading::All)?;
            let e = embeddings::read(dir)?;
            if e.meta.data_checksum != meta.data_checksum {
                return Err(Error::bad_file(
                    dir,
                    format!(
                        "the checkpoint was written on a different data set (checksum {}, {} has {})",
                        e.meta.data_checksum,
                        cfg.data.dir.display(),
                        meta.data_checksum
                    ),
                ));
            }
            if e.meta.config_hash != hash {
                return Err(Error::bad_file(dir, config_mismatch(dir, cfg)));
            }
            if e.words != words || e.meta.epochs_done > t.epochs {
                return Err(Error::bad_file(dir, "the checkpoint's words or epochs do not match this run"));
            }
            let epochs = u64::from(e.meta.epochs_done);
            checkpoint::check_named(dir, "epoch", epochs, &epoch_dir(epochs), "embeddings")?;
            meta.epochs_done = e.meta.epochs_done;
            e.params
        }
        None => {
            let mut p = crate::hostmem::zeroed::<f32>(layout.total());
            fill_uniform(&mut p[layout.tensors()[0].slot.range()], t.seed, 0, 1.0 / m.dim as f64);
            p
        }
    };
    let metrics_path = t.out_dir.join("metrics.jsonl");
    let mut metrics = if root {
        crate::fsutil::create_dirs(&t.out_dir)?;
        Some(open_metrics(&metrics_path, meta.epochs_done)?)
    } else {
        None
    };

    // 4. Threads, rounds and their document ranges. Under MPI each epoch runs in rounds of
    // about `sync_words` words per rank, the ranks' tables merged after each; one process
    // runs an epoch in one round. Piece `(rank · threads + k) · rounds + j` is thread k's
    // part of round j.
    let threads = if t.threads == 0 { rayon::current_num_threads() } else { t.threads };
    let (rank, world) = (dist.rank(), dist.world());
    let rounds =
        if world == 1 { 1 } else { trained_tokens.div_ceil(world as u64 * t.sync_words).max(1) as usize };
    // Skip-gram and CBOW learn from a word and its neighbours: a corpus whose documents
    // hold one trained word each would "train" nothing, at loss 0.
    let pairs = shards.par_iter().any(|s| {
        (0..s.len())
            .any(|i| s.doc_words(i).iter().filter(|&&w| lex.keep[w as usize] != DROPPED).nth(1).is_some())
    });
    if !pairs {
        return Err(Error::Data(format!(
            "{}: no document of the splits {:?} holds two trained words (min_count {}), so no word has a neighbour to learn from",
            cfg.data.dir.display(),
            cfg.data.splits,
            m.min_count
        )));
    }
    let (pieces, piece_words) = split_documents(&shards, &lex.keep, world * threads * rounds);
    let piece = |k: usize, j: usize| (rank * threads + k) * rounds + j;
    let per_thread: Vec<u64> =
        (0..threads).map(|k| (0..rounds).map(|j| piece_words[piece(k, j)]).sum::<u64>().max(1)).collect();
    let hyper = Hyper { objective: m.objective, window: m.window, negatives: m.negatives };
    let total_epochs = t.epochs;
    let first_epoch = meta.epochs_done;
    if let Some(n) = opts.stop_after.filter(|&n| n <= first_epoch) {
        return Err(Error::config(
            "pretrain",
            "--stop-after",
            format!(
                "{n} epochs in total are already done (the run is at epoch {first_epoch}): pass a larger --stop-after, which counts epochs from the start, or none"
            ),
        ));
    }
    let bar = if progress && first_epoch < total_epochs {
        let b = ProgressBar::with_draw_target(
            Some(trained_tokens * u64::from(total_epochs)),
            ProgressDrawTarget::stderr(),
        );
        b.set_style(
            ProgressStyle::with_template("pretrain [{wide_bar}] {percent}% {msg} ETA {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        b.set_position(trained_tokens * u64::from(first_epoch));
        b
    } else {
        ProgressBar::hidden()
    };
    let (dim, input_len, output_len) = (m.dim, buckets * m.dim, words.len() * m.dim);
    let output_at = layout.tensors()[1].slot.offset;
    // Each rank steps at W times the rate; the merges average over the W ranks.
    let rank_lr = t.lr * world as f64;
    let mut train_secs = 0.0f64;
    let mut read_here = 0u64;
    let mut last_loss = f64::NAN;
    for epoch in first_epoch..total_epochs {
        dist.set_step(u64::from(epoch) + 1);
        let epoch_start = Instant::now();
        let mut states: Vec<ThreadState> = (0..threads)
            .map(|k| {
                let index = u64::from(epoch) << 20 | (rank * threads + k) as u64;
                ThreadState {
                    rng: Fast::from_stream(&mut Stream::new(t.seed, Purpose::Pretrain, index)),
                    total: per_thread[k] * u64::from(total_epochs),
                    before: per_thread[k] * u64::from(epoch),
                    done: 0,
                    loss_sum: 0.0,
                    predictions: 0,
                }
            })
            .collect();
        let live = Live::new(threads);
        let mut last_draw = Instant::now();
        let base = trained_tokens * u64::from(epoch);
        let mut draw = |live: &Live| {
            if last_draw.elapsed() < Duration::from_millis(100) {
                return;
            }
            last_draw = Instant::now();
            let (n, loss) = live.read();
            let secs = epoch_start.elapsed().as_secs_f64().max(1e-9);
            // Every rank reads about as much as this one.
            bar.set_position(base + n * world as u64);
            bar.set_message(format!(
                "epoch {}/{total_epochs} loss {loss:.4} {:.0}k words/s/thread",
                epoch + 1,
                n as f64 / secs / threads as f64 / 1e3
            ));
        };
        for j in 0..rounds {
            let work: Vec<&[Segment]> = (0..threads).map(|k| pieces[piece(k, j)].as_slice()).collect();
            let (head, tail) = params.split_at_mut(output_at);
            let (input, output) = (&mut head[..input_len], &mut tail[..output_len]);
            // Under MPI: the rows this round may change here, as they are before it.
            let before = (world > 1).then(|| {
                let rows = touched_inputs(&lex, &shards, work.iter().flat_map(|w| w.iter()));
                (
                    Snapshot::take(input, dim, rows),
                    Snapshot::take(output, dim, (0..words.len() as u32).collect()),
                )
            });
            let shared = SharedTables::new(input, output, dim);
            run_round(&shared, &lex, hyper, &shards, rank_lr, &work, &mut states, &live, &mut draw);
            if let Some((si, so)) = before {
                si.merge(dist, input, dim);
                so.merge(dist, output, dim);
            }
        }
        let secs = epoch_start.elapsed().as_secs_f64();
        train_secs += secs;
        let mut sums = states
            .iter()
            .fold([0.0f64; 3], |a, s| [a[0] + s.loss_sum, a[1] + s.predictions as f64, a[2] + s.done as f64]);
        dist.sum("the epoch's loss and word counts", &mut sums);
        let [loss_sum, preds, n] = sums;
        read_here += n as u64;
        if preds == 0.0 {
            return Err(Error::config(
                "pretrain",
                "model.subsample",
                format!(
                    "epoch {} made no prediction: every word of its {n} was discarded (model.subsample = {}, \
                     model.min_count = {}) or no word had another within model.window; raise model.subsample \
                     (1e-4 as fastText) or lower model.min_count",
                    epoch + 1,
                    m.subsample,
                    m.min_count
                ),
            ));
        }
        last_loss = loss_sum / preds;
        // The loss per prediction starts at (1 + negatives)·ln 2; far above it the run has
        // diverged.
        let start_loss = f64::from(1 + m.negatives) * std::f64::consts::LN_2;
        if !last_loss.is_finite() || last_loss > 10.0 * start_loss {
            return Err(Error::Data(format!(
                "the pretraining loss became {last_loss} in epoch {} (it starts at {start_loss:.2}): \
                 the run diverged; lower train.lr{}",
                epoch + 1,
                if world > 1 { " or train.sync_words" } else { "" }
            )));
        }
        if world > 1 {
            check_replicas(dist, &params, epoch + 1)?;
        }
        meta.epochs_done = epoch + 1;
        if let Some(metrics) = metrics.as_mut() {
            let record = json!({
                "epoch": epoch + 1, "loss": last_loss, "lr_end": t.lr * (1.0 - f64::from(epoch + 1) / f64::from(total_epochs)),
                "words_per_s": n / secs, "words_per_s_per_thread": n / secs / (threads * world) as f64,
                "seconds": secs, "threads": threads, "ranks": world,
            });
            crate::fsutil::append_record(metrics, &record, &metrics_path)?;
        }
        let stop = opts.stop_after == Some(epoch + 1);
        let due = t.checkpoint_every > 0 && (epoch + 1) % t.checkpoint_every == 0;
        if (due || stop) && epoch + 1 < total_epochs && root {
            checkpoint::stage(&ckpt_root, &epoch_dir(u64::from(epoch) + 1), t.keep_checkpoints, |dir| {
                embeddings::write(dir, &meta, &layout, &params, &tsv)?;
                let config = dir.join(checkpoint::CONFIG_FILE);
                crate::fsutil::write_atomic(&config, trajectory_config(cfg).as_bytes())
            })?;
        }
        if stop {
            break;
        }
    }
    bar.finish_and_clear();
    if meta.epochs_done == total_epochs && root {
        embeddings::write(&t.out_dir, &meta, &layout, &params, &tsv)?;
        // This run's epoch checkpoints (finished or interrupted), then the directory if
        // nothing else is in it.
        if ckpt_root.exists() {
            for e in std::fs::read_dir(&ckpt_root).at(&ckpt_root)?.flatten() {
                if e.file_name().to_string_lossy().starts_with("epoch-") {
                    std::fs::remove_dir_all(e.path()).at(&e.path())?;
                }
            }
            let _ = std::fs::remove_dir(&ckpt_root);
        }
    }
    // Every rank returns once the files are in place (or the stop's checkpoint is).
    dist.barrier("the end of pretraining");
    Ok(PretrainReport {
        out_dir: t.out_dir.clone(),
        epochs: meta.epochs_done,
        ranks: world,
        threads,
        vocab_words: vocab.len(),
        trained_words: words.len(),
        tokens,
        trained_tokens,
        loss: last_loss,
        words_per_s: read_here as f64 / train_secs.max(1e-9),
        words_per_s_per_thread: read_here as f64 / train_secs.max(1e-9) / (threads * world) as f64,
        train_seconds: train_secs,
        seconds: started.elapsed().as_secs_f64(),
        already_finished: false,
    })
}

/// Opens `metrics.jsonl` keeping the records of the first `epochs` epochs (a resumed run
/// writes the later ones again).
fn open_metrics(path: &std::path::Path, epochs: u32) -> Result<std::fs::File> {
    crate::fsutil::reopen_metrics(path, "epoch", |e, _| e <= u64::from(epochs))
}

/// Cuts the documents of `shards` (in order) into `threads` contiguous ranges holding about
/// equal numbers of trained words; returns the ranges and each one's trained words.
fn split_documents(shards: &[&Shard], keep: &[u32], threads: usize) -> (Vec<Vec<Segment>>, Vec<u64>) {
    let sizes: Vec<Vec<u64>> = shards
        .par_iter()
        .map(|s| {
            (0..s.len())
                .map(|i| s.doc_words(i).iter().filter(|&&w| keep[w as usize] != DROPPED).count() as u64)
                .collect()
        })
        .collect();
    let total: u64 = sizes.iter().flatten().sum();
    let mut out = vec![Vec::new(); threads];
    let mut words = vec![0u64; threads];
    let (mut k, mut acc) = (0usize, 0u64);
    for (si, docs) in sizes.iter().enumerate() {
        let mut start = 0;
        for (i, &n) in docs.iter().enumerate() {
            acc += n;
            words[k] += n;
            // Thread k takes words up to (k+1)/threads of the total.
            while k + 1 < threads && acc * threads as u64 >= total * (k as u64 + 1) {
                out[k].push(Segment { shard: si, docs: (start, i + 1) });
                start = i + 1;
                k += 1;
            }
        }
        if start < docs.len() {
            out[k].push(Segment { shard: si, docs: (start, docs.len()) });
        }
    }
    (out, words)
}

/// One thread's place in an epoch, carried across the epoch's rounds.
struct ThreadState {
    rng: Fast,
    /// Its trained words over the whole run and before this epoch (the learning-rate
    /// schedule), and those read in this epoch.
    total: u64,
    before: u64,
    done: u64,
    loss_sum: f64,
    predictions: u64,
}

/// What the threads report while they run: words read, and each one's loss sum and
/// prediction count over the epoch.
struct Live {
    read: AtomicU64,
    threads: Vec<(AtomicU64, AtomicU64)>,
}

impl Live {
    fn new(threads: usize) -> Live {
        Live { read: AtomicU64::new(0), threads: (0..threads).map(|_| Default::default()).collect() }
    }

    /// Words read in this epoch, and the mean loss so far.
    fn read(&self) -> (u64, f64) {
        let (l, p) = self.threads.iter().fold((0.0, 0u64), |(l, p), (a, b)| {
            (l + f64::from_bits(a.load(Ordering::Relaxed)), p + b.load(Ordering::Relaxed))
        });
        (self.read.load(Ordering::Relaxed), l / p.max(1) as f64)
    }
}

/// Runs one round: thread k trains on `work[k]` over the shared tables, its learning rate
/// decaying with its own progress; `tick` runs on this thread while they work.
#[allow(clippy::too_many_arguments)]
fn run_round(
    tables: &SharedTables,
    lex: &Lexicon,
    hyper: Hyper,
    shards: &[&Shard],
    lr0: f64,
    work: &[&[Segment]],
    states: &mut [ThreadState],
    live: &Live,
    tick: &mut impl FnMut(&Live),
) {
    std::thread::scope(|s| {
        let handles: Vec<_> = states
            .iter_mut()
            .zip(work)
            .zip(&live.threads)
            .map(|((st, segs), mine)| {
                s.spawn(move || {
                    let mut w = Worker::new(hyper, lex, tables, st.rng.clone());
                    for seg in segs.iter() {
                        let shard = shards[seg.shard];
                        for i in seg.docs.0..seg.docs.1 {
                            let progress = (st.before + st.done) as f64 / st.total as f64;
                            let lr = (lr0 * (1.0 - progress)).max(0.0) as f32;
                            let n = w.document(shard.doc_words(i), lr);
                            st.done += n;
                            live.read.fetch_add(n, Ordering::Relaxed);
                            mine.0.store((st.loss_sum + w.loss_sum).to_bits(), Ordering::Relaxed);
                            mine.1.store(st.predictions + w.predictions, Ordering::Relaxed);
                        }
                    }
                    st.loss_sum += w.loss_sum;
                    st.predictions += w.predictions;
                    st.rng = w.into_rng();
                })
            })
            .collect();
        while !handles.iter().all(|h| h.is_finished()) {
            std::thread::sleep(Duration::from_millis(2));
            tick(live);
        }
        for h in handles {
            h.join().expect("a pretraining thread panicked");
        }
    });
}

/// The input-table rows that training on `segs` may change: the features of every trained
/// word in them (sorted, unique).
fn touched_inputs<'a>(lex: &Lexicon, shards: &[&Shard], segs: impl Iterator<Item = &'a Segment>) -> Vec<u32> {
    let mut seen = vec![false; lex.keep_prob.len()];
    for seg in segs {
        let shard = shards[seg.shard];
        for i in seg.docs.0..seg.docs.1 {
            for &v in shard.doc_words(i) {
                let w = lex.keep[v as usize];
                if w != DROPPED {
                    seen[w as usize] = true;
                }
            }
        }
    }
    let mut rows: Vec<u32> = (0..seen.len() as u32)
        .filter(|&w| seen[w as usize])
        .flat_map(|w| lex.features(w).iter().copied())
        .collect();
    rows.sort_unstable();
    rows.dedup();
    rows
}

/// Rows of one table that a round may change on this rank, with their values before it
/// (the values every rank shares after the last merge).
struct Snapshot {
    rows: Vec<u32>,
    values: Vec<f32>,
}

impl Snapshot {
    fn take(table: &[f32], dim: usize, rows: Vec<u32>) -> Snapshot {
        let values = rows
            .iter()
            .flat_map(|&r| table[r as usize * dim..(r as usize + 1) * dim].iter().copied())
            .collect();
        Snapshot { rows, values }
    }

    /// Merges the ranks' rounds into `table`: every row any rank changed becomes its value
    /// before the round plus the sum of the ranks' changes (in rank order) divided by W,
    /// so the replicas leave identical (model averaging: a rank's untouched rows count as
    /// unchanged).
    fn merge(self, dist: &Dist, table: &mut [f32], dim: usize) {
        let mut changes = self.changes(table, dim);
        dist.sum_rows(&mut changes, table.len() / dim);
        self.apply(table, dim, &changes, dist.world());
    }

    /// This rank's changed rows and their changes.
    fn changes(&self, table: &[f32], dim: usize) -> SparseRows<Vec<f32>> {
        let mut out = SparseRows { rows: Vec::new(), values: Vec::new(), dim };
        for (i, &r) in self.rows.iter().enumerate() {
            let (now, was) =
                (&table[r as usize * dim..(r as usize + 1) * dim], &self.values[i * dim..(i + 1) * dim]);
            if now != was {
                out.rows.push(r);
                out.values.extend(now.iter().zip(was).map(|(a, b)| a - b));
            }
        }
        out
    }

    /// Sets every row of `summed` (the `world` ranks' [`Snapshot::changes`] summed) to its
    /// value before the round plus the summed change over `world`.
    fn apply(&self, table: &mut [f32], dim: usize, summed: &SparseRows<Vec<f32>>, world: usize) {
        let inv = 1.0 / world as f32;
        let mut mine = 0;
        for (i, &r) in summed.rows.iter().enumerate() {
            while mine < self.rows.len() && self.rows[mine] < r {
                mine += 1;
            }
            let row = &mut table[r as usize * dim..(r as usize + 1) * dim];
            if self.rows.get(mine) == Some(&r) {
                row.copy_from_slice(&self.values[mine * dim..(mine + 1) * dim]);
            }
            row.iter_mut().zip(&summed.values[i * dim..(i + 1) * dim]).for_each(|(x, d)| *x += d * inv);
        }
    }
}

/// Checks that the ranks' tables are identical after `epoch` (merges keep them so; a
/// difference is a bug, reported rather than written).
fn check_replicas(dist: &Dist, params: &[f32], epoch: u32) -> Result<()> {
    let hash = xxh3_64(bytemuck::cast_slice(params));
    let all = dist.all_gather("the replica check", &[hash]);
    match all.iter().position(|h| h[0] != all[0][0]) {
        None => Ok(()),
        Some(r) => Err(Error::Data(format!(
            "after epoch {epoch} rank {r}'s embedding tables differ from rank 0's, which the merges rule out: \
             this is a bug in dtrain, please report it"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two ranks' rounds merged by hand (the sum [`Dist::sum_rows`] would compute): each
    /// changed row moves by the ranks' summed change over W, untouched and unchanged rows
    /// stay, and both replicas end identical.
    #[test]
    fn merge_averages_the_ranks_changes_and_leaves_identical_replicas() {
        let dim = 2;
        let start = vec![1.0f32, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0];
        // Rank 0 may change rows 0, 1, 3 and changes 0 and 1; rank 1 may change 1, 2, 3
        // and changes 1 and 2. Row 3 is in both snapshots but nobody changes it.
        let (mut t0, mut t1) = (start.clone(), start.clone());
        let s0 = Snapshot::take(&t0, dim, vec![0, 1, 3]);
        let s1 = Snapshot::take(&t1, dim, vec![1, 2, 3]);
        t0[..4].copy_from_slice(&[1.5, 0.5, 2.5, 2.0]);
        t1[2..6].copy_from_slice(&[1.5, 3.0, 3.0, 4.0]);
        let (c0, c1) = (s0.changes(&t0, dim), s1.changes(&t1, dim));
        assert_eq!((c0.rows.as_slice(), c1.rows.as_slice()), (&[0, 1][..], &[1, 2][..]));
        // The rank-order sum over the union of rows.
        let summed = SparseRows {
            rows: vec![0, 1, 2],
            values: [
                &c0.values[..2],
                &[c0.values[2] + c1.values[0], c0.values[3] + c1.values[1]][..],
                &c1.values[2..],
            ]
            .concat(),
            dim,
        };
        s0.apply(&mut t0, dim, &summed, 2);
        s1.apply(&mut t1, dim, &summed, 2);
        assert_eq!(t0, t1);
        // Row 0: half of rank 0's (+0.5, −0.5); row 1: half of (+0.5, 0) + (−0.5, +1);
        // row 2: half of rank 1's (0, +1); row 3 unchanged.
        assert_eq!(t0, vec![1.25, 0.75, 2.0, 2.5, 3.0, 3.5, 4.0, 4.0]);
    }
}
