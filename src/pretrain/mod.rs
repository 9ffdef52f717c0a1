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

pub mod embeddings;
pub mod sgns;

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;
use serde_json::json;
use xxhash_rust::xxh3::xxh3_64;

use crate::checkpoint;
use crate::config::PretrainConfig;
use crate::data::dataset::Dataset;
use crate::data::shard::{Shard, SplitKind};
use crate::data::tokenize::{Tokenizer, TOKENIZER_ALGORITHM};
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
    pub threads: usize,
    /// Words the vocabulary holds, and those trained (seen `min_count` times).
    pub vocab_words: usize,
    pub trained_words: usize,
    /// Word tokens of the chosen splits, and those of trained words (one epoch).
    pub tokens: u64,
    pub trained_tokens: u64,
    /// Mean loss per predicted word over the last epoch run.
    pub loss: f64,
    /// Trained-word tokens read per second of the epochs run in this process (before
    /// subsampling, as fastText counts), in total and per thread.
    pub words_per_s: f64,
    pub words_per_s_per_thread: f64,
    /// Seconds of the epochs run here, and of the whole call.
    pub train_seconds: f64,
    pub seconds: f64,
}

/// A contiguous run of documents of one shard, read by one thread.
#[derive(Debug, Clone, Copy)]
struct Segment {
    shard: usize,
    docs: (usize, usize),
}

/// The trajectory hash of a pretraining config: every field except where files go and how
/// often checkpoints are written (the thread count stays in: it changes the result).
fn config_hash(cfg: &PretrainConfig) -> u64 {
    let mut c = cfg.clone();
    c.data.dir = PathBuf::new();
    c.train.out_dir = PathBuf::new();
    c.train.checkpoint_every = 0;
    c.train.keep_checkpoints = 0;
    xxh3_64(serde_json::to_string(&c).expect("config serialises").as_bytes())
}

/// Runs `dtrain pretrain` as `cfg` says.
pub fn pretrain(cfg: &PretrainConfig, opts: &PretrainOptions) -> Result<PretrainReport> {
    let started = Instant::now();
    let ds = Dataset::open(&cfg.data.dir)?;
    let manifest = ds.manifest();
    let vocab = ds.vocab()?;
    let splits: Vec<SplitKind> =
        cfg.data.splits.iter().map(|s| SplitKind::from_name(s).expect("validated split name")).collect();
    let shards: Vec<&Shard> = splits.iter().flat_map(|&s| ds.shards(s)).collect();
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
    };
    let tsv = embeddings::words_tsv(&words, &kept_counts);
    let ckpt_root = t.out_dir.join("checkpoints");
    let resume_from = match &opts.resume {
        Resume::No => {
            if checkpoint::list_named(&ckpt_root, "epoch")?.last().is_some() {
                return Err(Error::bad_file(
                    &ckpt_root,
                    "holds checkpoints of an earlier run: pass --resume auto to continue it, or choose another train.out_dir",
                ));
            }
            None
        }
        Resume::Auto => checkpoint::list_named(&ckpt_root, "epoch")?.pop(),
        Resume::From(dir) => Some(dir.clone()),
    };
    let mut params = match &resume_from {
        Some(dir) => {
            let e = embeddings::read(dir)?;
            if e.meta.config_hash != hash || e.meta.data_checksum != meta.data_checksum {
                return Err(Error::bad_file(
                    dir,
                    "the checkpoint was written with a different pretraining config or data set",
                ));
            }
            if e.words != words || e.meta.epochs_done > t.epochs {
                return Err(Error::bad_file(dir, "the checkpoint's words or epochs do not match this run"));
            }
            meta.epochs_done = e.meta.epochs_done;
            e.params
        }
        None => {
            let mut p = crate::hostmem::zeroed::<f32>(layout.total());
            fill_uniform(&mut p[layout.tensors()[0].slot.range()], t.seed, 0, 1.0 / m.dim as f64);
            p
        }
    };
    std::fs::create_dir_all(&t.out_dir).at(&t.out_dir)?;
    let metrics_path = t.out_dir.join("metrics.jsonl");
    let mut metrics = open_metrics(&metrics_path, meta.epochs_done)?;

    // 4. Threads and their document ranges.
    let threads = if t.threads == 0 { rayon::current_num_threads() } else { t.threads };
    let (segments, per_thread) = split_documents(&shards, &lex.keep, threads);
    let hyper = Hyper { objective: m.objective, window: m.window, negatives: m.negatives };
    let total_epochs = t.epochs;
    let first_epoch = meta.epochs_done;
    let bar = if opts.progress && first_epoch < total_epochs {
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
    let mut train_secs = 0.0f64;
    let mut read_here = 0u64;
    let mut last_loss = f64::NAN;
    for epoch in first_epoch..total_epochs {
        let epoch_start = Instant::now();
        let (input, output) = params.split_at_mut(layout.tensors()[1].slot.offset);
        let output = &mut output[..words.len() * m.dim];
        let input = &mut input[..buckets * m.dim];
        let shared = SharedTables::new(input, output, m.dim);
        let read = AtomicU64::new(0);
        let live: Vec<(AtomicU64, AtomicU64)> =
            (0..threads).map(|_| (AtomicU64::new(0), AtomicU64::new(0))).collect();
        let results: Vec<(f64, u64, u64)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|k| {
                    let (lex, tables, segs, shards, read, live) =
                        (&lex, &shared, &segments[k], &shards, &read, &live[k]);
                    let mine = per_thread[k].max(1);
                    let lr0 = t.lr;
                    s.spawn(move || {
                        let mut stream =
                            Stream::new(t.seed, Purpose::Pretrain, u64::from(epoch) << 20 | k as u64);
                        let mut w = Worker::new(hyper, lex, tables, Fast::from_stream(&mut stream));
                        let (total, done_before) = (mine * u64::from(total_epochs), mine * u64::from(epoch));
                        let mut done = 0u64;
                        for seg in segs {
                            let shard = shards[seg.shard];
                            for i in seg.docs.0..seg.docs.1 {
                                let progress = (done_before + done) as f64 / total as f64;
                                let lr = (lr0 * (1.0 - progress)).max(0.0) as f32;
                                let n = w.document(shard.doc_words(i), lr);
                                done += n;
                                read.fetch_add(n, Ordering::Relaxed);
                                live.0.store(w.loss_sum.to_bits(), Ordering::Relaxed);
                                live.1.store(w.predictions, Ordering::Relaxed);
                            }
                        }
                        (w.loss_sum, w.predictions, done)
                    })
                })
                .collect();
            let base = trained_tokens * u64::from(epoch);
            while !handles.iter().all(|h| h.is_finished()) {
                std::thread::sleep(Duration::from_millis(100));
                let n = read.load(Ordering::Relaxed);
                let (l, p) = live.iter().fold((0.0, 0u64), |(l, p), (a, b)| {
                    (l + f64::from_bits(a.load(Ordering::Relaxed)), p + b.load(Ordering::Relaxed))
                });
                let secs = epoch_start.elapsed().as_secs_f64().max(1e-9);
                bar.set_position(base + n);
                bar.set_message(format!(
                    "epoch {}/{total_epochs} loss {:.4} {:.0}k words/s/thread",
                    epoch + 1,
                    l / p.max(1) as f64,
                    n as f64 / secs / threads as f64 / 1e3
                ));
            }
            handles.into_iter().map(|h| h.join().expect("a pretraining thread panicked")).collect()
        });
        let secs = epoch_start.elapsed().as_secs_f64();
        train_secs += secs;
        let (loss_sum, preds, n) =
            results.iter().fold((0.0, 0u64, 0u64), |a, r| (a.0 + r.0, a.1 + r.1, a.2 + r.2));
        read_here += n;
        last_loss = loss_sum / preds.max(1) as f64;
        if !last_loss.is_finite() {
            return Err(Error::Data(format!(
                "the pretraining loss became {last_loss} in epoch {}: lower train.lr",
                epoch + 1
            )));
        }
        meta.epochs_done = epoch + 1;
        let record = json!({
            "epoch": epoch + 1, "loss": last_loss, "lr_end": t.lr * (1.0 - f64::from(epoch + 1) / f64::from(total_epochs)),
            "words_per_s": n as f64 / secs, "words_per_s_per_thread": n as f64 / secs / threads as f64,
            "seconds": secs, "threads": threads,
        });
        writeln!(metrics, "{record}").at(&metrics_path)?;
        let stop = opts.stop_after == Some(epoch + 1);
        let due = t.checkpoint_every > 0 && (epoch + 1) % t.checkpoint_every == 0;
        if (due || stop) && epoch + 1 < total_epochs {
            checkpoint::stage(&ckpt_root, &format!("epoch-{:06}", epoch + 1), t.keep_checkpoints, |dir| {
                embeddings::write(dir, &meta, &layout, &params, &tsv)
            })?;
        }
        if stop {
            break;
        }
    }
    bar.finish_and_clear();
    if meta.epochs_done == total_epochs {
        embeddings::write(&t.out_dir, &meta, &layout, &params, &tsv)?;
        if ckpt_root.exists() {
            std::fs::remove_dir_all(&ckpt_root).at(&ckpt_root)?;
        }
    }
    Ok(PretrainReport {
        out_dir: t.out_dir.clone(),
        epochs: meta.epochs_done,
        threads,
        vocab_words: vocab.len(),
        trained_words: words.len(),
        tokens,
        trained_tokens,
        loss: last_loss,
        words_per_s: read_here as f64 / train_secs.max(1e-9),
        words_per_s_per_thread: read_here as f64 / train_secs.max(1e-9) / threads as f64,
        train_seconds: train_secs,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Opens `metrics.jsonl` keeping the records of the first `epochs` epochs (a resumed run
/// writes the later ones again).
fn open_metrics(path: &std::path::Path, epochs: u32) -> Result<std::fs::File> {
    let kept: String = std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("epoch").and_then(|e| e.as_u64()))
                .is_some_and(|e| e <= u64::from(epochs))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    crate::fsutil::write_atomic(path, kept.as_bytes())?;
    std::fs::OpenOptions::new().append(true).open(path).at(path)
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
