//! Typed configuration: TOML files and `--set key=value` overrides become validated structs,
//! with every error naming its field and rule.
//!
//! Loading goes through one path for every config type ([`load`]): parse the file into a
//! TOML tree (or start from an empty one), apply overrides in order, deserialize with
//! unknown fields rejected (the error names the field's full path), then run the type's
//! [`Validate`] rules.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::backend::Activation;
use crate::data::input::FormatChoice;
use crate::data::tokenize::TokenizerSpec;
use crate::error::{Error, Result};
use crate::optim::schedule::ScheduleConfig;
use crate::optim::OptimConfig;

/// Rules a config must satisfy beyond its types.
pub trait Validate {
    /// Checks the rules; `origin` names where the config came from, for messages.
    fn validate(&self, origin: &str) -> Result<()>;
}

/// One `key.path = value` override. The value is parsed as TOML (`3`, `true`, `"a"`,
/// `[1, 2]`); a value that is not valid TOML is taken as a string.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    pub key: String,
    pub value: toml::Value,
}

impl Override {
    /// Parses `key=value` as written after `--set`.
    pub fn parse(arg: &str) -> Result<Override> {
        let (key, raw) =
            arg.split_once('=').ok_or_else(|| Error::config("--set", arg, "expected key=value"))?;
        let key = key.trim();
        if key_parts(key).is_none() {
            return Err(Error::config(
                "--set",
                arg,
                "the key must be a dotted path such as split.seed (quote a part that holds dots: optim.lr_mult.\"hidden.0\")",
            ));
        }
        let raw = raw.trim();
        // A whole number TOML cannot hold would otherwise pass on as a string, and fail as
        // "invalid type: string".
        let digits = raw.strip_prefix(['-', '+']).unwrap_or(raw);
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) && raw.parse::<i64>().is_err() {
            return Err(Error::config(
                "--set",
                key,
                format!("{raw} is beyond the whole numbers a config holds (±9223372036854775807)"),
            ));
        }
        Ok(Override { key: key.to_owned(), value: parse_value(raw) })
    }

    /// An override from a typed value (used to map command-line flags onto config fields).
    /// `flag` names the flag in the error: a value TOML cannot hold (a path that is not
    /// UTF-8) is refused.
    pub fn typed(flag: &str, key: &str, value: impl Serialize) -> Result<Override> {
        let value = toml::Value::try_from(value).map_err(|_| {
            Error::config(flag, key, "cannot be written into a config: a path must be valid UTF-8")
        })?;
        Ok(Override { key: key.to_owned(), value })
    }
}

fn parse_value(raw: &str) -> toml::Value {
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").expect("parsed key v"),
        Err(_) => toml::Value::String(raw.to_owned()),
    }
}

/// The parts of a dotted key as TOML reads them (`optim.lr_mult."hidden.0"` is three), or
/// `None` when it is not a TOML key.
fn key_parts(key: &str) -> Option<Vec<String>> {
    // One line: a key with a line break would be read as a document of its own.
    if key.contains(['\n', '\r']) {
        return None;
    }
    let mut table = format!("{key} = 0").parse::<toml::Table>().ok()?;
    let mut parts = Vec::new();
    loop {
        let (part, value) = table.into_iter().next()?;
        parts.push(part);
        match value {
            toml::Value::Table(inner) => table = inner,
            _ => return Some(parts),
        }
    }
}

/// Key parts joined as a dotted key, a part that holds a dot quoted.
fn dotted(parts: &[String]) -> String {
    let quoted: Vec<String> =
        parts.iter().map(|p| if p.contains('.') { format!("{p:?}") } else { p.clone() }).collect();
    quoted.join(".")
}

fn apply(root: &mut toml::Table, o: &Override) -> Result<()> {
    let parts = key_parts(&o.key).ok_or_else(|| Error::config("--set", &o.key, "is not a dotted key"))?;
    let mut table = root;
    for (depth, part) in parts[..parts.len() - 1].iter().enumerate() {
        let entry = table.entry(part.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| Error::config("--set", dotted(&parts[..=depth]), "is a value, not a section"))?;
    }
    table.insert(parts[parts.len() - 1].clone(), o.value.clone());
    Ok(())
}

/// Loads a config of type `T`: the TOML file (if any), then `overrides` in order, then
/// deserialization (unknown fields are errors) and validation.
pub fn load<T>(file: Option<&Path>, overrides: &[Override]) -> Result<T>
where
    T: DeserializeOwned + Validate,
{
    let (mut root, origin) = match file {
        Some(path) => {
            let text = crate::fsutil::read_text(path, 16 << 20, "a TOML config")?;
            let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
                Error::bad_file(path, format!("invalid TOML: {}", e.to_string().trim_end()))
            })?;
            (table, path.display().to_string())
        }
        None => (toml::Table::new(), "(defaults)".to_owned()),
    };
    for o in overrides {
        apply(&mut root, o)?;
    }
    let origin = if overrides.is_empty() { origin } else { format!("{origin} with overrides") };
    let value = toml::Value::Table(root);
    let floats = value.clone();
    let cfg: T = serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        let mut msg = e.into_inner().to_string().trim().replace('\n', " ");
        // A number or a boolean where a name is expected reads, from serde, as a "unit
        // variant": say what was given instead.
        if msg.contains("unit variant") {
            if let Some(v) = value_at(&floats, &field) {
                msg = format!(
                    "expects a name in quotes (the example configs list the choices), not the {} {v}",
                    v.type_str()
                );
            }
        }
        Error::config(&origin, if field == "." { "(top level)".into() } else { field }, msg)
    })?;
    cfg.validate(&origin)?;
    check_f32_range(&floats, "", &origin)?;
    Ok(cfg)
}

/// The value at `path` (`a.b[2].c`, as serde_path_to_error writes it) of a TOML tree.
fn value_at<'a>(root: &'a toml::Value, path: &str) -> Option<&'a toml::Value> {
    let mut v = root;
    for seg in path.split('.') {
        let (name, index) = match seg.split_once('[') {
            Some((name, rest)) => (name, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (seg, None),
        };
        v = v.get(name)?;
        if let Some(i) = index {
            v = v.get(i)?;
        }
    }
    Some(v)
}

/// Refuses a real number that the field's own rule accepts but that an f32, in which the
/// numerics run, cannot hold: one so small it would become 0 or lose its precision (below
/// f32's smallest normal, about 1.2e-38), or so large it would become infinite. 0 itself
/// passes; the rules of each field decide whether it is allowed.
fn check_f32_range(value: &toml::Value, path: &str, origin: &str) -> Result<()> {
    match value {
        toml::Value::Float(v) if *v != 0.0 && v.is_finite() => {
            let size = v.abs();
            if size < f64::from(f32::MIN_POSITIVE) || size > f64::from(f32::MAX) {
                return Err(Error::config(
                    origin,
                    path,
                    format!(
                        "{v:e} is outside the sizes an f32 holds (about 1.2e-38 to 3.4e38, or 0): no setting means \
                         anything there, and in dtrain's f32 arithmetic it would become 0 or infinity"
                    ),
                ));
            }
            Ok(())
        }
        toml::Value::Table(t) => {
            for (k, v) in t {
                let sub = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                check_f32_range(v, &sub, origin)?;
            }
            Ok(())
        }
        toml::Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                check_f32_range(v, &format!("{path}[{i}]"), origin)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The configuration of `dtrain prepare`: inputs, tokenizer, splits, output. Every field has a
/// default; configs/prepare.example.toml documents each one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PrepareConfig {
    pub input: InputConfig,
    pub tokenizer: TokenizerSpec,
    pub split: SplitConfig,
    pub output: OutputConfig,
}

/// `[input]`: which files to read and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InputConfig {
    /// Labeled files (TSV or JSONL): the pool the splits are drawn from.
    pub labeled: Vec<PathBuf>,
    /// Unlabeled files (any format; labels in them are ignored).
    pub unlabeled: Vec<PathBuf>,
    /// A fixed test set; when given, `split.test_fraction` must be 0.
    pub test: Vec<PathBuf>,
    /// `auto` (from the file name), `tsv`, `jsonl` or `text`.
    pub format: FormatChoice,
    /// JSONL: name of the text field.
    pub text_field: String,
    /// JSONL: name of the label field.
    pub label_field: String,
    /// The class names, in label-id order. Empty: every label seen, sorted by name. When
    /// given, a label outside the list is a bad line.
    pub labels: Vec<String>,
    /// Skip and count bad lines instead of stopping at the first.
    pub skip_bad: bool,
}

impl Default for InputConfig {
    fn default() -> Self {
        InputConfig {
            labeled: Vec::new(),
            unlabeled: Vec::new(),
            test: Vec::new(),
            format: FormatChoice::Auto,
            text_field: "text".into(),
            label_field: "label".into(),
            labels: Vec::new(),
            skip_bad: false,
        }
    }
}

/// `[split]`: the simulated low-label split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SplitConfig {
    /// Labeled documents kept per class in `train`; the rest of the pool becomes `unlabeled`
    /// (hidden labels kept for diagnostics). Unset: every pool document stays labeled.
    pub labels_per_class: Option<u32>,
    /// Fraction of each class held out as `test`.
    pub test_fraction: f64,
    /// Fraction of each class carved from the pool as `val`.
    pub val_fraction: f64,
    /// Seed of the split.
    pub seed: u64,
}

impl Default for SplitConfig {
    fn default() -> Self {
        SplitConfig { labels_per_class: None, test_fraction: 0.2, val_fraction: 0.1, seed: 1 }
    }
}

/// The largest shard count `prepare` accepts.
pub const MAX_SHARDS: u32 = 1024;

/// `[output]`: where and how the data set is written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputConfig {
    /// The data set directory to create.
    pub dir: PathBuf,
    /// Shards P per split; a run on W ranks needs W to divide P.
    pub shards: u32,
    /// Replace `dir` if it exists.
    pub force: bool,
}

impl Default for OutputConfig {
    fn default() -> Self {
        OutputConfig { dir: PathBuf::new(), shards: 8, force: false }
    }
}

impl Validate for PrepareConfig {
    fn validate(&self, origin: &str) -> Result<()> {
        let bad = |field: &str, msg: &str| Err(Error::config(origin, field, msg));
        if self.input.labeled.is_empty() && self.input.unlabeled.is_empty() {
            return bad("input.labeled", "at least one input file is required (--input or --unlabeled)");
        }
        if self.input.labeled.is_empty() && !self.input.test.is_empty() {
            return bad("input.test", "a fixed test set needs labeled inputs (--input) as well");
        }
        if self.input.text_field.is_empty() {
            return bad("input.text_field", "must not be empty");
        }
        if self.input.label_field.is_empty() {
            return bad("input.label_field", "must not be empty");
        }
        if self.input.label_field == self.input.text_field {
            return bad(
                "input.label_field",
                &format!(
                    "must differ from input.text_field (both `{}`): each text would be its own class",
                    self.input.text_field
                ),
            );
        }
        let mut seen = std::collections::HashSet::new();
        for l in &self.input.labels {
            if l.trim().is_empty() || l.trim() != l {
                return bad("input.labels", "names must be non-empty, without surrounding whitespace");
            }
            if l.chars().any(char::is_control) {
                return bad("input.labels", &format!("`{l}` holds a control character"));
            }
            if !seen.insert(crate::data::input::label_name(l)) {
                return bad(
                    "input.labels",
                    &format!("`{l}` is listed twice (in Unicode's composed form, NFC)"),
                );
            }
        }
        self.tokenizer.validate(origin, "tokenizer")?;
        let s = &self.split;
        if s.labels_per_class == Some(0) {
            return bad("split.labels_per_class", "must be at least 1 (leave it unset to keep every label)");
        }
        if !(0.0..1.0).contains(&s.test_fraction) {
            return bad("split.test_fraction", "must be in [0, 1)");
        }
        if !(0.0..1.0).contains(&s.val_fraction) {
            return bad("split.val_fraction", "must be in [0, 1)");
        }
        if s.test_fraction + s.val_fraction >= 1.0 {
            return bad("split.val_fraction", "test_fraction + val_fraction must be below 1");
        }
        if !self.input.test.is_empty() && s.test_fraction != 0.0 {
            return bad(
                "split.test_fraction",
                "must be 0 when a fixed test set is given (input.test / --test-input)",
            );
        }
        if self.output.dir.as_os_str().is_empty() {
            return bad("output.dir", "is required (--out)");
        }
        if self.output.shards < 1 || self.output.shards > MAX_SHARDS {
            return bad("output.shards", "must be in 1..=1024 (prepare keeps every shard of a split open)");
        }
        Ok(())
    }
}

/// The configuration of `dtrain train` (`run.toml`). Every field has a default;
/// configs/train.example.toml documents each one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// The training method: `supervised`, `pi`, `temporal`, `mean_teacher`, `rdrop`, `uda`,
    /// `fixmatch`, `noisy_student`, `mpl` or `mpl_reduced`.
    pub method: crate::algo::Method,
    pub data: DataConfig,
    pub model: ModelConfig,
    pub loss: LossConfig,
    pub optim: OptimConfig,
    pub schedule: ScheduleConfig,
    pub train: TrainSection,
    pub unlabeled: crate::algo::UnlabeledConfig,
    pub consistency: crate::algo::ConsistencyConfig,
    pub pi: crate::algo::PiConfig,
    pub mean_teacher: crate::algo::MeanTeacherConfig,
    pub temporal: crate::algo::TemporalConfig,
    pub augment: crate::data::augment::AugmentConfig,
    pub noisy_student: crate::algo::NoisyStudentConfig,
    pub average: crate::algo::AverageConfig,
    pub adversarial: crate::algo::adversarial::AdversarialConfig,
    pub mpl: crate::algo::mpl::MplConfig,
    /// `[dist]`: how ranks communicate (bucket size, table exchange, timeout).
    pub dist: crate::dist::DistConfig,
}

impl TrainConfig {
    /// Fields set to other than their default that this run does not read although their
    /// section is read (an option of another variant), with why: `(field, reason)`.
    pub fn ignored_fields(&self) -> Vec<(&'static str, &'static str)> {
        use crate::algo::adversarial::AdversarialKind as K;
        use crate::algo::stabilise::AdaptiveThreshold as T;
        let (a, da) = (&self.adversarial, crate::algo::adversarial::AdversarialConfig::default());
        let (c, dc) = (&self.consistency, crate::algo::ConsistencyConfig::default());
        let (m, dm) = (&self.mpl, crate::algo::mpl::MplConfig::default());
        let mpl = matches!(self.method, crate::algo::Method::Mpl | crate::algo::Method::MplReduced);
        let rules = [
            (a.kind != K::None && a.kind != K::Vat && a.xi != da.xi, "adversarial.xi", "only VAT reads it"),
            (
                a.kind != K::None && !matches!(a.kind, K::Pgd | K::FastFgsm) && a.step_size != da.step_size,
                "adversarial.step_size",
                "only PGD and Fast-FGSM read it",
            ),
            (
                a.kind != K::None && a.kind != K::Pgd && a.steps != da.steps,
                "adversarial.steps",
                "only PGD reads it",
            ),
            (
                c.stabiliser_momentum != dc.stabiliser_momentum
                    && !c.distribution_alignment
                    && c.adaptive_threshold != T::Freematch,
                "consistency.stabiliser_momentum",
                "only distribution alignment and FreeMatch read it",
            ),
            (
                c.threshold.is_some() && c.adaptive_threshold == T::Freematch,
                "consistency.threshold",
                "FreeMatch learns its own threshold",
            ),
            (
                mpl && m.temperature != dm.temperature
                    && m.pseudo_labels == crate::algo::mpl::PseudoLabels::Hard,
                "mpl.temperature",
                "only mpl.pseudo_labels = \"sampled\" reads it",
            ),
            (
                self.method == crate::algo::Method::MplReduced && m.uda_steps != dm.uda_steps,
                "mpl.uda_steps",
                "reduced MPL's teacher has no UDA term",
            ),
        ];
        rules.into_iter().filter(|r| r.0).map(|(_, field, why)| (field, why)).collect()
    }

    /// The method-specific sections set away from their defaults that this config's method
    /// does not read, for a warning: e.g. `[mean_teacher]` under `method = "supervised"`.
    /// (`[mpl]` under another method is refused by validation.)
    pub fn unread_sections(&self) -> Vec<&'static str> {
        use crate::algo::Method as M;
        // Every method but supervised training reads [consistency] (MPL's teacher for its UDA
        // term); so may VAT's term, which is left out of the warning. Its learning-rate
        // ramp-down (`rampdown_epochs`) applies to every method.
        let read_by_all = crate::algo::ConsistencyConfig {
            rampdown_epochs: self.consistency.rampdown_epochs,
            ..Default::default()
        };
        let consistency = self.consistency != read_by_all
            && self.adversarial.kind != crate::algo::adversarial::AdversarialKind::Vat;
        // Every method but supervised training.
        let semi_supervised: &[M] = &[
            M::Pi,
            M::Temporal,
            M::MeanTeacher,
            M::Rdrop,
            M::Uda,
            M::Fixmatch,
            M::NoisyStudent,
            M::Mpl,
            M::MplReduced,
        ];
        // Per-pass augmentation (`consistency_passes`, validated to Π, Temporal Ensembling,
        // Mean Teacher and R-Drop) is what those methods read of [augment].
        let augment_readers: &[M] = if self.augment.consistency_passes {
            semi_supervised
        } else {
            &[M::Uda, M::Fixmatch, M::NoisyStudent, M::Mpl, M::MplReduced]
        };
        // Adversarial training's settings with no adversarial pass (`kind = "none"`).
        let adversarial = self.adversarial.kind == crate::algo::adversarial::AdversarialKind::None
            && self.adversarial != Default::default();
        let sections: [(&'static str, bool, &[M]); 8] = [
            ("consistency", consistency, semi_supervised),
            ("adversarial", adversarial, &[]),
            ("pi", self.pi != Default::default(), &[M::Pi]),
            ("mean_teacher", self.mean_teacher != Default::default(), &[M::MeanTeacher]),
            ("temporal", self.temporal != Default::default(), &[M::Temporal]),
            ("noisy_student", self.noisy_student != Default::default(), &[M::NoisyStudent]),
            ("augment", self.augment != Default::default(), augment_readers),
            // A ratio above 0 that supervised training would load and never read.
            ("unlabeled", self.unlabeled.ratio.is_some_and(|r| r > 0) && !self.reads_unlabeled(), &[]),
        ];
        sections
            .into_iter()
            .filter(|(_, set, readers)| *set && !readers.contains(&self.method))
            .map(|s| s.0)
            .collect()
    }

    /// The method resolved against its defaults (validation has checked it resolves). A
    /// method that reads no unlabeled rows loads none, whatever `unlabeled.ratio` says (the
    /// warning of [`TrainConfig::unread_sections`] tells so).
    pub fn recipe(&self) -> crate::algo::Recipe {
        let mut recipe = crate::algo::Recipe::resolve(self.knobs(), "run.toml").expect("validated config");
        if !self.reads_unlabeled() {
            recipe.unlabeled_ratio = 0;
        }
        recipe
    }

    /// Whether the method reads unlabeled rows: every method but supervised training, which
    /// reads them only for VAT's term.
    fn reads_unlabeled(&self) -> bool {
        self.method != crate::algo::Method::Supervised
            || self.adversarial.kind == crate::algo::adversarial::AdversarialKind::Vat
    }

    /// The dropout field to name when two training passes of the student over the same rows
    /// cannot differ: every dropout is 0 and the passes get no augmentation of their own.
    /// An encoder's unset dropout (the pretrained config's, 0.1 from scratch) counts as noise.
    fn two_identical_passes(&self) -> Option<&'static str> {
        if self.augment.consistency_passes && self.augment.alters_rows() {
            return None;
        }
        let m = &self.model;
        match m.kind {
            ModelKind::Bag => {
                (m.embed_dropout == 0.0 && m.hidden_dropout == 0.0).then_some("model.embed_dropout")
            }
            ModelKind::Encoder => {
                let zero = |p: Option<f32>| p == Some(0.0);
                (zero(m.encoder.dropout) && zero(m.encoder.attention_dropout))
                    .then_some("model.encoder.dropout")
            }
        }
    }

    fn knobs(&self) -> crate::algo::MethodKnobs<'_> {
        crate::algo::MethodKnobs {
            method: self.method,
            unlabeled: &self.unlabeled,
            consistency: &self.consistency,
            pi: &self.pi,
            mean_teacher: &self.mean_teacher,
            temporal: &self.temporal,
            noisy_student: &self.noisy_student,
            mpl: &self.mpl,
        }
    }
}

/// `[data]`: the prepared data set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// A directory written by `dtrain prepare`.
    pub dir: PathBuf,
}

/// Which classifier `[model]` describes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// The fastText-style bag of hashed n-grams (`dim`, `hidden`, dropouts, `init_from`).
    #[default]
    Bag,
    /// A Transformer encoder over a subword data set (`[model.encoder]`).
    Encoder,
}

/// The first of `fields` (name, whether it differs from its default) that is set: what a
/// config is refused for when a field does not apply to it and would be ignored.
fn first_set<'a>(fields: &[(&'a str, bool)]) -> Option<&'a str> {
    fields.iter().find(|(_, set)| *set).map(|&(field, _)| field)
}

/// `[model.encoder]`: a BERT-family encoder, pretrained or from scratch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EncoderConfig {
    /// A directory with `config.json` and `model.safetensors` (Hugging Face names), e.g.
    /// `models/minilm` from `launch/fetch-model minilm`; unset: from scratch with the shape
    /// below.
    pub pretrained: Option<PathBuf>,
    /// `cls` or `mean` pooling.
    pub pooling: crate::model::encoder::Pooling,
    /// Hidden dropout in training; unset: the pretrained model's `hidden_dropout_prob`, or
    /// 0.1 from scratch.
    pub dropout: Option<f32>,
    /// Dropout on the attention probabilities in training; unset: the pretrained model's
    /// `attention_probs_dropout_prob`, or 0.1 from scratch.
    pub attention_dropout: Option<f32>,
    /// Activation recomputation: keep only each layer's input in the forward pass and run
    /// the layer again in the backward pass (less memory, one more forward pass; the
    /// same gradients).
    pub recompute: bool,
    /// From scratch only: width, layers, heads, MLP width, and pre-LN (else BERT's
    /// post-LN). The vocabulary and the positions come from the data set's tokenizer.
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub pre_ln: bool,
    /// Layer-wise learning-rate decay in (0, 1]: the head's rate is the schedule's, the
    /// top layer's × decay, each layer below × decay again, the embeddings' × decay^(L+1).
    /// It multiplies `optim.lr_mult`. 1 = off.
    pub layer_lr_decay: f64,
}

impl Default for EncoderConfig {
    fn default() -> Self {
        EncoderConfig {
            pretrained: None,
            pooling: crate::model::encoder::Pooling::Mean,
            dropout: None,
            attention_dropout: None,
            recompute: false,
            hidden: 256,
            layers: 4,
            heads: 4,
            intermediate: 1024,
            pre_ln: true,
            layer_lr_decay: 1.0,
        }
    }
}

/// `[model]`: the classifier: the bag-of-n-grams model (the default), or a Transformer
/// encoder (`kind = "encoder"`, `[model.encoder]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    pub kind: ModelKind,
    pub encoder: EncoderConfig,
    /// Embedding width D.
    pub dim: usize,
    /// Hidden layer widths; empty = the linear fastText model.
    pub hidden: Vec<usize>,
    pub activation: Activation,
    /// Dropout on the pooled embedding.
    pub embed_dropout: f32,
    /// Dropout after each hidden layer.
    pub hidden_dropout: f32,
    /// Embeddings from `dtrain pretrain` (its output directory or `embeddings.safetensors`)
    /// to start the table from; rows pretraining never trained keep their initialisation.
    pub init_from: Option<PathBuf>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            dim: 100,
            hidden: Vec::new(),
            activation: Activation::Relu,
            embed_dropout: 0.0,
            hidden_dropout: 0.0,
            init_from: None,
            kind: ModelKind::Bag,
            encoder: EncoderConfig::default(),
        }
    }
}

/// The supervised loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossName {
    /// Cross-entropy (with `label_smoothing`).
    Ce,
    /// Focal loss (with `focal_gamma`).
    Focal,
}

/// `[loss]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossConfig {
    pub kind: LossName,
    /// ε of cross-entropy's target (1−ε)·onehot + ε/C.
    pub label_smoothing: f64,
    /// γ of the focal loss.
    pub focal_gamma: f64,
    /// Training-signal annealing (UDA, METHODS.md §1): a labeled row whose p_y exceeds η_t
    /// leaves the supervised loss; η_t rises from 1/C to 1 by this schedule.
    pub tsa: Tsa,
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig { kind: LossName::Ce, label_smoothing: 0.0, focal_gamma: 2.0, tsa: Tsa::None }
    }
}

/// The schedule of training-signal annealing's threshold η_t = a(t)·(1 − 1/C) + 1/C, with t
/// the fraction of training done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tsa {
    /// No annealing.
    #[default]
    None,
    /// a(t) = t.
    Linear,
    /// a(t) = 1 − e^{−5t}.
    Log,
    /// a(t) = e^{5(t−1)}.
    Exp,
}

impl Tsa {
    /// η at 0-based `step` of `total` for `classes` classes; None without annealing.
    pub fn threshold(self, step: u64, total: u64, classes: usize) -> Option<f64> {
        let t = step as f64 / total.max(1) as f64;
        let a = match self {
            Tsa::None => return None,
            Tsa::Linear => t,
            Tsa::Log => 1.0 - (-5.0 * t).exp(),
            Tsa::Exp => (5.0 * (t - 1.0)).exp(),
        };
        let c = classes as f64;
        Some(a * (1.0 - 1.0 / c) + 1.0 / c)
    }
}

/// `[train]`: the loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// Where checkpoints, metrics.jsonl and reports go.
    pub out_dir: PathBuf,
    /// Global batch size: documents per optimizer step (per micro-batch with grad_accum);
    /// a multiple of the data set's shard count.
    pub batch_size: usize,
    /// Passes over the labeled training split.
    pub epochs: u32,
    /// Optimizer steps; overrides `epochs` when set.
    pub steps: Option<u64>,
    /// Seed of initialisation, shuffling and dropout.
    pub seed: u64,
    /// Log a metrics line every this many steps.
    pub log_every: u64,
    /// Evaluate on the validation split every this many steps; 0 = once per epoch.
    pub eval_every: u64,
    /// Write a checkpoint every this many steps; 0 = only at the end. The last step always
    /// gets one. (A bag model's checkpoint holds the whole table and both Adam moments:
    /// 12 bytes × buckets × dim.)
    pub checkpoint_every: u64,
    /// Complete checkpoints kept (the newest); older ones are deleted.
    pub keep_checkpoints: usize,
    /// Documents per evaluation batch.
    pub eval_batch_size: usize,
    /// Length grouping for encoders (`[mlm]` has its own): 0 = off; N = sort each
    /// window of N batches of the shuffled order by length and shuffle its batches, so a
    /// batch pads to a length close to its rows' own (Hugging Face's `group_by_length`
    /// takes 50). A bag model does not pad, so it refuses this.
    pub group_by_length: usize,
    /// Precision of the linear layers' matrix products: `f32` (exact), `tf32` or `bf16`
    /// (operands rounded, f32 accumulation; tensor cores on a GPU, emulated on the CPU,
    /// where it only costs time). The weights stay f32. Not written when `f32`, so configs
    /// from before it keep their trajectory hash.
    #[serde(skip_serializing_if = "crate::backend::Matmul::is_f32")]
    pub matmul: crate::backend::Matmul,
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            out_dir: PathBuf::new(),
            batch_size: 32,
            epochs: 5,
            steps: None,
            seed: 1,
            log_every: 10,
            eval_every: 0,
            checkpoint_every: 0,
            keep_checkpoints: 2,
            eval_batch_size: 1024,
            group_by_length: 0,
            matmul: crate::backend::Matmul::F32,
        }
    }
}

/// A finite number above 0 (NaN fails).
fn positive(v: f64) -> bool {
    v.is_finite() && v > 0.0
}

/// A finite number at least 0 (NaN fails).
fn non_negative(v: f64) -> bool {
    v.is_finite() && v >= 0.0
}

impl Validate for TrainConfig {
    fn validate(&self, origin: &str) -> Result<()> {
        let bad = |field: &str, msg: &str| Err(Error::config(origin, field, msg));
        if self.data.dir.as_os_str().is_empty() {
            return bad("data.dir", "is required: a directory made by `dtrain prepare`");
        }
        for (field, path) in [
            ("model.init_from", self.model.init_from.as_ref()),
            ("model.encoder.pretrained", self.model.encoder.pretrained.as_ref()),
            ("noisy_student.logits", self.noisy_student.logits.as_ref()),
            ("mpl.logits", self.mpl.logits.as_ref()),
            ("mpl.train_logits", self.mpl.train_logits.as_ref()),
            (
                "mpl.teacher.encoder.pretrained",
                self.mpl.teacher.as_ref().and_then(|t| t.encoder.pretrained.as_ref()),
            ),
            ("mpl.teacher.init_from", self.mpl.teacher.as_ref().and_then(|t| t.init_from.as_ref())),
        ] {
            if path.is_some_and(|p| p.as_os_str().is_empty()) {
                return bad(field, "is empty: name a path, or leave the field out");
            }
        }
        if let Err((field, msg)) = self.dist.check() {
            return bad(field, &msg);
        }
        let m = &self.model;
        if m.dim < 1 || m.dim > 65_536 {
            return bad("model.dim", "must be in 1..=65536");
        }
        if m.hidden.iter().any(|h| !(1..=65_536).contains(h)) {
            return bad("model.hidden", "every width must be in 1..=65536");
        }
        for (field, p) in
            [("model.embed_dropout", m.embed_dropout), ("model.hidden_dropout", m.hidden_dropout)]
        {
            if !(0.0..1.0).contains(&p) {
                return bad(field, "must be in [0, 1)");
            }
        }
        // A field of the other kind of model would be ignored without a word.
        let d = ModelConfig::default();
        if m.kind == ModelKind::Encoder {
            if let Some(field) = first_set(&[
                ("model.dim", m.dim != d.dim),
                ("model.hidden", m.hidden != d.hidden),
                ("model.activation", m.activation != d.activation),
                ("model.embed_dropout", m.embed_dropout != d.embed_dropout),
                ("model.hidden_dropout", m.hidden_dropout != d.hidden_dropout),
            ]) {
                return bad(
                    field,
                    "applies to bag models (model.kind = \"bag\"); an encoder's settings are under [model.encoder]",
                );
            }
        } else if m.encoder != d.encoder {
            return bad("model.encoder", "applies to model.kind = \"encoder\"");
        }
        if m.kind == ModelKind::Encoder {
            let e = &m.encoder;
            if e.pretrained.is_some() {
                if let Some(field) = first_set(&[
                    ("model.encoder.hidden", e.hidden != d.encoder.hidden),
                    ("model.encoder.layers", e.layers != d.encoder.layers),
                    ("model.encoder.heads", e.heads != d.encoder.heads),
                    ("model.encoder.intermediate", e.intermediate != d.encoder.intermediate),
                    ("model.encoder.pre_ln", e.pre_ln != d.encoder.pre_ln),
                ]) {
                    return bad(
                        field,
                        "shapes an encoder from scratch; a pretrained encoder's shape comes from its config.json \
                         (leave it out, or leave out model.encoder.pretrained)",
                    );
                }
            }
            if e.dropout.is_some_and(|p| !(0.0..1.0).contains(&p)) {
                return bad("model.encoder.dropout", "must be in [0, 1)");
            }
            if e.attention_dropout.is_some_and(|p| !(0.0..1.0).contains(&p)) {
                return bad("model.encoder.attention_dropout", "must be in [0, 1)");
            }
            if !(e.layer_lr_decay > 0.0 && e.layer_lr_decay <= 1.0) {
                return bad("model.encoder.layer_lr_decay", "must be in (0, 1] (1 = off)");
            }
            if e.pretrained.is_none() {
                for (field, v) in [
                    ("model.encoder.hidden", e.hidden),
                    ("model.encoder.layers", e.layers),
                    ("model.encoder.heads", e.heads),
                    ("model.encoder.intermediate", e.intermediate),
                ] {
                    if !(1..=65_536).contains(&v) {
                        return bad(field, "must be in 1..=65536");
                    }
                }
                if e.hidden % e.heads != 0 {
                    return bad("model.encoder.heads", "must divide model.encoder.hidden");
                }
            }
            if m.init_from.is_some() {
                return bad(
                    "model.init_from",
                    "loads a bag model's embedding table; an encoder starts from model.encoder.pretrained",
                );
            }
        }
        let l = &self.loss;
        if !(0.0..1.0).contains(&l.label_smoothing) {
            return bad("loss.label_smoothing", "must be in [0, 1)");
        }
        if !(0.0..=20.0).contains(&l.focal_gamma) {
            return bad("loss.focal_gamma", "must be in [0, 20]");
        }
        if l.kind == LossName::Focal && l.label_smoothing > 0.0 {
            return bad("loss.label_smoothing", "must be 0 with the focal loss (it has no smoothed target)");
        }
        let o = &self.optim;
        // The same bound as pretraining's `train.lr`: fastText-style SGD runs at up to about
        // 1, adaptive optimizers far below; a larger rate is a typo that would train to
        // huge weights before anything else noticed.
        if !positive(o.lr) || o.lr > 10.0 {
            return bad("optim.lr", "must be in (0, 10]");
        }
        for (field, b) in [("optim.beta1", o.beta1), ("optim.beta2", o.beta2), ("optim.momentum", o.momentum)]
        {
            if !(0.0..1.0).contains(&b) {
                return bad(field, "must be in [0, 1)");
            }
        }
        if !positive(o.eps) {
            return bad("optim.eps", "must be positive");
        }
        if !non_negative(o.weight_decay) {
            return bad("optim.weight_decay", "must be at least 0");
        }
        if !non_negative(o.clip_norm) {
            return bad("optim.clip_norm", "must be at least 0 (0 = no clipping)");
        }
        if !(1..=1 << 16).contains(&o.grad_accum) {
            return bad("optim.grad_accum", "must be in 1..=65536");
        }
        if o.lr_mult.values().any(|&v| !non_negative(v)) {
            return bad("optim.lr_mult", "multipliers must be finite and at least 0");
        }
        // AdamW's decoupled decay takes lr·mult·weight_decay·p off each weight p per step, and
        // SGD's L2 term at least that (momentum adds to it; LAMB's trust ratio rescales it). At
        // 1 or more such a step zeroes or flips every weight.
        let top_mult = o.lr_mult.values().fold(1.0f64, |a, &b| a.max(b));
        if o.lr * top_mult * o.weight_decay >= 1.0 {
            return bad(
                "optim.weight_decay",
                &format!(
                    "times optim.lr and the largest optim.lr_mult is {:.3e}; it must be below 1: each step takes \
                     that fraction of every weight away, so at 1 or more it zeroes or flips them (AdamW's \
                     weight_decay is usually 0.01 to 0.1)",
                    o.lr * top_mult * o.weight_decay
                ),
            );
        }
        if o.eps > 1.0 {
            return bad(
                "optim.eps",
                "must be at most 1: it is added to √v̂, the gradients' typical size, and a larger one \
                 swamps it and stops training (usually 1e-8; a typo for 1e-8?)",
            );
        }
        let s = &self.schedule;
        if !(0.0..=1.0).contains(&s.min_lr_ratio) {
            return bad("schedule.min_lr_ratio", "must be in [0, 1]");
        }
        if !positive(s.plateau_factor) || s.plateau_factor >= 1.0 {
            return bad("schedule.plateau_factor", "must be in (0, 1)");
        }
        if !(1..=10_000).contains(&s.cycles) {
            return bad("schedule.cycles", "must be in 1..=10000 (1: no restarts)");
        }
        if s.cycles > 1 && s.decay != crate::optim::schedule::Decay::Cosine {
            return bad(
                "schedule.cycles",
                "restarts are cosine's (snapshot ensembles): set schedule.decay = \"cosine\"",
            );
        }
        let t = &self.train;
        if t.out_dir.as_os_str().is_empty() {
            return bad("train.out_dir", "is required");
        }
        if !(1..=1 << 20).contains(&t.batch_size) {
            return bad("train.batch_size", "must be in 1..=1048576");
        }
        if t.steps.is_none() && t.epochs < 1 {
            return bad("train.epochs", "must be at least 1 (or set train.steps)");
        }
        if t.steps == Some(0) {
            return bad("train.steps", "must be at least 1");
        }
        if t.log_every < 1 {
            return bad("train.log_every", "must be at least 1");
        }
        if t.keep_checkpoints < 1 {
            return bad("train.keep_checkpoints", "must be at least 1");
        }
        if !(1..=1 << 20).contains(&t.eval_batch_size) {
            return bad("train.eval_batch_size", "must be in 1..=1048576");
        }
        if t.group_by_length > 1 << 16 {
            return bad("train.group_by_length", "must be in 0..=65536 (batches per sorted window)");
        }
        if t.group_by_length > 0 && self.model.kind != ModelKind::Encoder {
            return bad(
                "train.group_by_length",
                "groups batches by length to cut an encoder's padding; a bag model does not pad, so leave it 0",
            );
        }
        crate::algo::Recipe::resolve(self.knobs(), origin)?;
        self.average.validate(origin)?;
        if let Err((field, msg)) = self.adversarial.validate() {
            return bad(field, msg);
        }
        if let Err((field, msg)) = self.augment.validate() {
            return bad(field, msg);
        }
        use crate::algo::Method;
        if self.augment.consistency_passes
            && !matches!(self.method, Method::Pi | Method::Temporal | Method::MeanTeacher | Method::Rdrop)
        {
            return bad(
                "augment.consistency_passes",
                "applies to pi, temporal, mean_teacher and rdrop (uda, fixmatch and noisy_student always augment their unlabeled rows)",
            );
        }
        if matches!(self.method, Method::Pi | Method::Rdrop) {
            if let Some(field) = self.two_identical_passes() {
                return bad(
                    field,
                    "is 0, and pi and rdrop compare two passes of the student over the same rows: with no \
                     dropout and no per-pass augmentation (augment.consistency_passes) the passes are \
                     identical and the consistency term is 0 (a supervised run); set a dropout above 0 \
                     or augment.consistency_passes = true",
                );
            }
        }
        if self.method.is_mpl() {
            if self.optim.grad_accum != 1 {
                return bad("optim.grad_accum", "must be 1 with mpl: the student updates inside the step");
            }
            if self.adversarial.kind != crate::algo::adversarial::AdversarialKind::None {
                return bad("adversarial.kind", "is not available with mpl");
            }
            if self.loss.kind != LossName::Ce || self.loss.tsa != Tsa::None {
                return bad(
                    "loss.kind",
                    "mpl takes cross-entropy without TSA (loss.kind = \"ce\", loss.tsa = \"none\")",
                );
            }
            // The teacher's own sections follow the student's rules; errors name them.
            let renamed = |e: Error, from: &str, to: &str| match e {
                Error::Config { origin, field, msg } if field.starts_with(from) => {
                    Error::config(origin, format!("{to}{}", &field[from.len()..]), msg)
                }
                e => e,
            };
            let defaults = crate::algo::mpl::MplConfig::default();
            let reduced_only = [
                ("mpl.logits", self.mpl.logits.is_some()),
                ("mpl.train_logits", self.mpl.train_logits.is_some()),
                ("mpl.reduced_hidden", self.mpl.reduced_hidden != defaults.reduced_hidden),
            ];
            if let (Method::Mpl, Some((field, _))) = (self.method, reduced_only.iter().find(|f| f.1)) {
                return bad(
                    field,
                    "applies to method = \"mpl_reduced\" (an MLP over a fixed teacher's exported logits): \
                     method = \"mpl\" trains a teacher model of its own (mpl.teacher)",
                );
            }
            if self.mpl.teacher.is_some() && self.method == Method::MplReduced {
                return bad(
                    "mpl.teacher",
                    "applies to method = \"mpl\": mpl_reduced's teacher is the MLP of mpl.reduced_hidden",
                );
            }
            // Checked as the student's sections, in a config whose [mpl] keeps everything
            // but the teacher's own sections (mpl_reduced needs its mpl.logits there).
            let mpl = crate::algo::mpl::MplConfig { teacher: None, teacher_optim: None, ..self.mpl.clone() };
            if let Some(m) = &self.mpl.teacher {
                let t = TrainConfig { model: m.clone(), mpl: mpl.clone(), ..self.clone() };
                t.validate(origin).map_err(|e| renamed(e, "model.", "mpl.teacher."))?;
            }
            if let Some(o) = &self.mpl.teacher_optim {
                let t = TrainConfig { optim: o.clone(), mpl, ..self.clone() };
                t.validate(origin).map_err(|e| renamed(e, "optim.", "mpl.teacher_optim."))?;
            }
        } else if self.mpl != crate::algo::mpl::MplConfig::default() {
            return bad("mpl", "applies to method = \"mpl\" or \"mpl_reduced\"");
        }
        if self.loss.tsa != Tsa::None && self.loss.kind != LossName::Ce {
            return bad("loss.tsa", "applies to cross-entropy (loss.kind = \"ce\")");
        }
        Ok(())
    }
}

/// The configuration of `dtrain pretrain`: skip-gram or CBOW on a prepared data set's word
/// sequences. Every field has a default (fastText's where it has one);
/// configs/pretrain.example.toml documents each one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PretrainConfig {
    pub data: PretrainData,
    pub model: PretrainModel,
    pub train: PretrainTrain,
    pub mlm: PretrainMlm,
    /// How ranks communicate under mpirun/srun (the same section as training's).
    pub dist: crate::dist::DistConfig,
}

/// `[data]` of a pretraining run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PretrainData {
    /// A directory written by `dtrain prepare`.
    pub dir: PathBuf,
    /// The splits whose text is read (labels ignored). The default leaves out `val` and
    /// `test`, so that evaluation text never shapes the embeddings.
    pub splits: Vec<String>,
}

impl Default for PretrainData {
    fn default() -> Self {
        PretrainData { dir: PathBuf::new(), splits: vec!["train".into(), "unlabeled".into()] }
    }
}

/// Skip-gram (predict each context word from the centre word) or CBOW (predict the centre
/// word from the mean of its context).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    Skipgram,
    Cbow,
    /// Masked-LM continued pretraining of an encoder (`[mlm]`) on a subword data set.
    Mlm,
}

/// `[mlm]`: masked-LM continued pretraining (`model.objective = "mlm"`). The run reads
/// `train.lr` (AdamW's peak rate; e.g. 5e-5), `train.epochs`, `train.seed` and
/// `train.out_dir`, and writes `train.out_dir/encoder/` for `model.encoder.pretrained`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PretrainMlm {
    /// The encoder to continue from (config.json + model.safetensors); required.
    pub pretrained: Option<PathBuf>,
    /// Fraction of each document's inner tokens chosen for prediction.
    pub mask_prob: f64,
    pub batch_size: usize,
    /// Steps in all; unset: `train.epochs` passes over the documents.
    pub steps: Option<u64>,
    /// Linear warmup steps, then linear decay to 0.
    pub warmup_steps: u64,
    /// Steps that train the fresh prediction head alone (the encoder and its tied word
    /// table frozen) at `head_warmup_lr`, before the steps above; 0 = off.
    pub head_warmup_steps: u64,
    /// The head's constant learning rate during `head_warmup_steps`.
    pub head_warmup_lr: f64,
    pub weight_decay: f64,
    /// Hidden dropout; unset: the pretrained config's.
    pub dropout: Option<f32>,
    /// Attention-probability dropout; unset: the pretrained config's.
    pub attention_dropout: Option<f32>,
    pub log_every: u64,
    /// Length grouping, as `train.group_by_length` of training: 0 = off; N = sort each
    /// window of N batches by length and shuffle its batches.
    pub group_by_length: usize,
    /// The linear layers' product precision, as `train.matmul` of training (not written
    /// when `f32`, so configs from before it keep their hash).
    #[serde(skip_serializing_if = "crate::backend::Matmul::is_f32")]
    pub matmul: crate::backend::Matmul,
    /// Write a resumable checkpoint every this many steps (0 = none); `train.keep_checkpoints`
    /// of them are kept, and all are deleted once the encoder is written. (Not written at
    /// its default, so that configs from before it keep their hash.)
    #[serde(skip_serializing_if = "PretrainMlm::default_checkpoint_every")]
    pub checkpoint_every: u64,
}

impl PretrainMlm {
    /// `mlm.checkpoint_every`'s default.
    pub const CHECKPOINT_EVERY: u64 = 1000;

    fn default_checkpoint_every(every: &u64) -> bool {
        *every == Self::CHECKPOINT_EVERY
    }
}

impl Default for PretrainMlm {
    fn default() -> Self {
        PretrainMlm {
            pretrained: None,
            mask_prob: 0.15,
            batch_size: 16,
            steps: None,
            warmup_steps: 0,
            head_warmup_steps: 0,
            head_warmup_lr: 1e-3,
            weight_decay: 0.01,
            dropout: None,
            attention_dropout: None,
            log_every: 10,
            group_by_length: 0,
            matmul: crate::backend::Matmul::F32,
            checkpoint_every: PretrainMlm::CHECKPOINT_EVERY,
        }
    }
}

/// `[model]` of a pretraining run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PretrainModel {
    pub objective: Objective,
    /// Embedding width D; the classifier's `model.dim` must equal it to use the result.
    pub dim: usize,
    /// Character n-grams of each word, boundary markers included (fastText's -minn/-maxn);
    /// `char_ngram_max = 0`: the word feature alone.
    pub char_ngram_min: u32,
    pub char_ngram_max: u32,
    /// Largest window: each centre word draws its window size uniformly in 1..=window.
    pub window: u32,
    /// Negative samples per predicted word.
    pub negatives: u32,
    /// Exponent of the unigram counts in the negative-sampling distribution.
    pub negative_power: f64,
    /// Words seen fewer times are dropped from the text before windows are formed.
    pub min_count: u64,
    /// Subsampling threshold t: a word of frequency f is kept with probability
    /// min(1, √(t/f) + t/f); 0 keeps every word.
    pub subsample: f64,
}

impl Default for PretrainModel {
    fn default() -> Self {
        PretrainModel {
            objective: Objective::Skipgram,
            dim: 100,
            char_ngram_min: 3,
            char_ngram_max: 6,
            window: 5,
            negatives: 5,
            negative_power: 0.75,
            min_count: 5,
            subsample: 1e-4,
        }
    }
}

/// `[train]` of a pretraining run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PretrainTrain {
    /// Where `embeddings.safetensors`, `words.tsv`, `metrics.jsonl` and checkpoints go.
    pub out_dir: PathBuf,
    /// Passes over the text.
    pub epochs: u32,
    /// Initial learning rate; it decays linearly to 0 over the run.
    pub lr: f64,
    /// Worker threads updating the shared tables without locks (Hogwild); 0 = one per core
    /// (under launch/mpirun: the cores divided by the ranks on a node). With 1 the run is
    /// deterministic.
    pub threads: usize,
    /// Under MPI: trained words each rank reads between two merges of the ranks' tables
    /// (see `pretrain`'s module docs). Smaller keeps the replicas closer, at more
    /// communication. Unused by one process.
    pub sync_words: u64,

    pub seed: u64,
    /// Write a resumable checkpoint every this many epochs; 0 = none (the final output
    /// only).
    pub checkpoint_every: u32,
    /// Checkpoints kept (the newest); they are deleted once the final output is written.
    pub keep_checkpoints: usize,
}

impl Default for PretrainTrain {
    fn default() -> Self {
        PretrainTrain {
            out_dir: PathBuf::new(),
            epochs: 5,
            lr: 0.05,
            threads: 0,
            sync_words: 100_000,
            seed: 1,
            checkpoint_every: 1,
            keep_checkpoints: 1,
        }
    }
}

impl Validate for PretrainConfig {
    fn validate(&self, origin: &str) -> Result<()> {
        let bad = |field: &str, msg: &str| Err(Error::config(origin, field, msg));
        if self.data.dir.as_os_str().is_empty() {
            return bad("data.dir", "is required: a directory made by `dtrain prepare`");
        }
        if self.mlm.pretrained.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            return bad("mlm.pretrained", "is empty: name a path, or leave the field out");
        }
        if self.data.splits.is_empty() {
            return bad("data.splits", "name at least one split (train, val, test, unlabeled)");
        }
        for (i, s) in self.data.splits.iter().enumerate() {
            if crate::data::shard::SplitKind::from_name(s).is_none() {
                return bad(
                    "data.splits",
                    &format!("`{s}` is not a split: expected train, val, test or unlabeled"),
                );
            }
            if self.data.splits[..i].contains(s) {
                return bad("data.splits", &format!("`{s}` is named twice: its text would be read twice"));
            }
        }
        if self.model.objective != Objective::Mlm && self.mlm != PretrainMlm::default() {
            return bad("mlm", "applies to objective = \"mlm\" (masked-LM pretraining of an encoder)");
        }
        if self.model.objective == Objective::Mlm {
            // Skip-gram's and CBOW's settings, which a masked-LM run would ignore.
            let (p, d, t, dt) =
                (&self.model, PretrainModel::default(), &self.train, PretrainTrain::default());
            let model = [
                ("model.dim", p.dim != d.dim),
                ("model.char_ngram_min", p.char_ngram_min != d.char_ngram_min),
                ("model.char_ngram_max", p.char_ngram_max != d.char_ngram_max),
                ("model.window", p.window != d.window),
                ("model.negatives", p.negatives != d.negatives),
                ("model.negative_power", p.negative_power != d.negative_power),
                ("model.min_count", p.min_count != d.min_count),
                ("model.subsample", p.subsample != d.subsample),
            ];
            let train = [
                ("train.threads", t.threads != dt.threads),
                ("train.sync_words", t.sync_words != dt.sync_words),
                ("train.checkpoint_every", t.checkpoint_every != dt.checkpoint_every),
            ];
            for (fields, why) in [
                (&model[..], "a masked-LM run's encoder is mlm.pretrained's, its settings under [mlm]"),
                (
                    &train[..],
                    "a masked-LM run reads train.out_dir, epochs, lr, seed and keep_checkpoints, and writes a \
                     checkpoint every mlm.checkpoint_every steps",
                ),
            ] {
                if let Some(field) = first_set(fields) {
                    return bad(field, &format!("applies to skip-gram and CBOW; {why}"));
                }
            }
            let m = &self.mlm;
            if m.pretrained.is_none() {
                return bad(
                    "mlm.pretrained",
                    "is required with objective = \"mlm\": the encoder directory to continue from",
                );
            }
            if !(m.mask_prob > 0.0 && m.mask_prob < 1.0) {
                return bad("mlm.mask_prob", "must be in (0, 1)");
            }
            for (field, zero) in [
                ("mlm.batch_size", m.batch_size < 1),
                ("mlm.log_every", m.log_every < 1),
                ("mlm.steps", m.steps == Some(0)),
            ] {
                if zero {
                    return bad(field, "must be at least 1");
                }
            }
            if m.batch_size > 1 << 20 {
                return bad("mlm.batch_size", "must be at most 1048576");
            }
            if m.group_by_length > 1 << 16 {
                return bad("mlm.group_by_length", "must be at most 65536");
            }
            if !non_negative(m.weight_decay) {
                return bad("mlm.weight_decay", "must be at least 0");
            }
            if !(m.head_warmup_lr > 0.0 && m.head_warmup_lr <= 10.0) {
                return bad("mlm.head_warmup_lr", "must be in (0, 10]");
            }
            // AdamW's decoupled decay takes lr·weight_decay of every weight per step (as
            // optim.weight_decay in a run config).
            let top_lr =
                if m.head_warmup_steps > 0 { self.train.lr.max(m.head_warmup_lr) } else { self.train.lr };
            if top_lr * m.weight_decay >= 1.0 {
                return bad(
                    "mlm.weight_decay",
                    &format!(
                        "times the largest rate (train.lr, or mlm.head_warmup_lr during the head's warm-up) is \
                         {:.3e}; it must be below 1: each step takes that fraction of every weight away, so at 1 \
                         or more it zeroes or flips them",
                        top_lr * m.weight_decay
                    ),
                );
            }
            if m.dropout.is_some_and(|p| !(0.0..1.0).contains(&p)) {
                return bad("mlm.dropout", "must be in [0, 1)");
            }
            if m.attention_dropout.is_some_and(|p| !(0.0..1.0).contains(&p)) {
                return bad("mlm.attention_dropout", "must be in [0, 1)");
            }
        }
        let m = &self.model;
        if m.dim < 1 || m.dim > 65_536 {
            return bad("model.dim", "must be in 1..=65536");
        }
        if m.char_ngram_max > 0 {
            if m.char_ngram_min < 1 || m.char_ngram_min > m.char_ngram_max {
                return bad("model.char_ngram_min", "must be in 1..=char_ngram_max when char_ngram_max > 0");
            }
            if m.char_ngram_max > 16 {
                return bad("model.char_ngram_max", "must be at most 16");
            }
        }
        if m.window < 1 || m.window > 100 {
            return bad("model.window", "must be in 1..=100");
        }
        if m.negatives < 1 || m.negatives > 100 {
            return bad("model.negatives", "must be in 1..=100");
        }
        if !(0.0..=1.0).contains(&m.negative_power) {
            return bad("model.negative_power", "must be in [0, 1]");
        }
        if m.min_count < 1 {
            return bad("model.min_count", "must be at least 1");
        }
        if !(0.0..1.0).contains(&m.subsample) {
            return bad("model.subsample", "must be in [0, 1) (0 = no subsampling)");
        }
        let t = &self.train;
        if t.out_dir.as_os_str().is_empty() {
            return bad("train.out_dir", "is required");
        }
        if t.epochs < 1 {
            return bad("train.epochs", "must be at least 1");
        }
        if !positive(t.lr) || t.lr > 10.0 {
            return bad("train.lr", "must be in (0, 10]");
        }
        if t.threads > 1024 {
            return bad("train.threads", "must be at most 1024 (0 = one per core)");
        }
        if t.keep_checkpoints < 1 {
            return bad("train.keep_checkpoints", "must be at least 1");
        }
        if t.sync_words < 1_000 {
            return bad("train.sync_words", "must be at least 1000 (words per rank between table merges)");
        }
        if let Err((field, msg)) = self.dist.check() {
            return bad(field, &msg);
        }
        Ok(())
    }
}

/// The dotted fields whose values differ between two JSON configs, with both values
/// (`field: old → new`), at most `limit` of them.
pub fn differences(old: &serde_json::Value, new: &serde_json::Value, limit: usize) -> Vec<String> {
    fn walk(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
        use serde_json::Value::Object;
        match (a, b) {
            (Object(x), Object(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let null = serde_json::Value::Null;
                    let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                    walk(&p, x.get(k).unwrap_or(&null), y.get(k).unwrap_or(&null), out);
                }
            }
            _ if a != b => out.push(format!("{path}: {a} → {b}")),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk("", old, new, &mut out);
    if out.len() > limit {
        let more = out.len() - limit;
        out.truncate(limit);
        out.push(format!("and {more} more"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A training config of the defaults with `extra` set (and data.dir, train.out_dir).
    fn train_config(extra: &[&str]) -> Result<TrainConfig> {
        let mut all = vec!["data.dir=\"d\"", "train.out_dir=\"o\""];
        all.extend_from_slice(extra);
        load::<TrainConfig>(None, &set(&all))
    }

    fn set(args: &[&str]) -> Vec<Override> {
        args.iter().map(|a| Override::parse(a).unwrap()).collect()
    }

    fn base() -> Vec<Override> {
        set(&["input.labeled=[\"a.tsv\"]", "output.dir=out"])
    }

    fn err(extra: &[&str]) -> String {
        let mut o = base();
        o.extend(set(extra));
        load::<PrepareConfig>(None, &o).unwrap_err().to_string()
    }

    #[test]
    fn defaults_and_overrides() {
        let mut o = base();
        o.extend(set(&[
            "split.labels_per_class=20",
            "tokenizer.word_ngrams=3",
            "tokenizer.punctuation=drop",
        ]));
        let c: PrepareConfig = load(None, &o).unwrap();
        assert_eq!(c.split.labels_per_class, Some(20));
        assert_eq!(c.tokenizer.word_ngrams, 3);
        assert_eq!(c.output.shards, 8);
        assert_eq!(c.input.labeled, [PathBuf::from("a.tsv")]);
        // A bare word that is not TOML is a string.
        assert_eq!(
            Override::parse("a.b=hello world").unwrap().value,
            toml::Value::String("hello world".into())
        );
    }

    #[test]
    fn unknown_fields_name_their_path() {
        assert!(err(&["tokenizer.bukets=5"]).contains("field `tokenizer.bukets`"));
        assert!(err(&["tokenizer.bukets=5"]).contains("unknown field `bukets`"));
        assert!(err(&["nonsense=1"]).contains("unknown field `nonsense`"));
    }

    #[test]
    fn wrong_types_name_their_path() {
        let e = err(&["split.seed=\"x\""]);
        assert!(e.contains("field `split.seed`"), "{e}");
        // A number or boolean where a name is expected says what it was.
        let train = |kv: &str| {
            load::<TrainConfig>(None, &set(&["data.dir=\"d\"", "train.out_dir=\"o\"", kv]))
                .unwrap_err()
                .to_string()
        };
        let e = train("method=3");
        assert!(
            e.contains("field `method`: expects a name in quotes") && e.contains("not the integer 3"),
            "{e}"
        );
        let e = train("model.kind=true");
        assert!(e.contains("field `model.kind`") && e.contains("not the boolean true"), "{e}");
    }

    #[test]
    fn invalid_values_name_field_and_rule() {
        assert!(err(&["split.test_fraction=1.5"]).contains("field `split.test_fraction`: must be in [0, 1)"));
        assert!(err(&["split.labels_per_class=0"]).contains("split.labels_per_class"));
        assert!(err(&["output.shards=0"]).contains("output.shards"));
        assert!(err(&["tokenizer.char_ngram_min=5", "tokenizer.char_ngram_max=3"])
            .contains("tokenizer.char_ngram_min"));
        assert!(err(&["tokenizer.buckets=0"]).contains("tokenizer.buckets"));
        assert!(err(&["input.test=[\"t.tsv\"]"]).contains("split.test_fraction"));
        assert!(err(&["input.labels=[\"a\", \"a\"]"]).contains("listed twice"));
        let e = load::<PrepareConfig>(None, &set(&["output.dir=x"])).unwrap_err().to_string();
        assert!(e.contains("input.labeled"), "{e}");
    }

    /// Sizes that would overflow or exhaust memory downstream are refused up front, by field.
    #[test]
    fn absurd_sizes_are_refused_by_field() {
        let train = |extra: &[&str]| train_config(extra).map(|_| ()).unwrap_err().to_string();
        for (kv, field) in [
            ("train.batch_size=4611686018427387904", "train.batch_size"),
            ("train.eval_batch_size=4611686018427387904", "train.eval_batch_size"),
            ("optim.grad_accum=1000000", "optim.grad_accum"),
            ("train.group_by_length=4611686018427387904", "train.group_by_length"),
        ] {
            let e = train(&[kv]);
            assert!(e.contains(field), "{kv}: {e}");
        }
        let mlm = |extra: &str| {
            let all = [
                "data.dir=\"d\"",
                "train.out_dir=\"o\"",
                "model.objective=\"mlm\"",
                "mlm.pretrained=\"m\"",
                extra,
            ];
            load::<PretrainConfig>(None, &set(&all)).map(|_| ()).unwrap_err().to_string()
        };
        {
            let e = mlm("mlm.attention_dropout=1.0");
            assert!(e.contains("mlm.attention_dropout"), "{e}");
        }
        {
            let e = mlm("mlm.batch_size=4611686018427387904");
            assert!(e.contains("mlm.batch_size"), "{e}");
        }
    }

    #[test]
    fn sections_the_method_does_not_read_are_named() {
        let train = |extra: &[&str]| train_config(extra).unwrap().unread_sections();
        assert!(train(&[]).is_empty());
        assert_eq!(train(&["mean_teacher.alpha=0.9", "temporal.alpha=0.5"]), ["mean_teacher", "temporal"]);
        assert!(train(&["method=\"mean_teacher\"", "mean_teacher.alpha=0.9"]).is_empty());
        assert_eq!(train(&["method=\"uda\"", "pi.stop_gradient_target=false"]), ["pi"]);
        assert_eq!(train(&["method=\"fixmatch\"", "noisy_student.logits=\"t.logits\""]), ["noisy_student"]);
        // Supervised training reads no [consistency], unless VAT's term might.
        assert_eq!(train(&["consistency.weight=5"]), ["consistency"]);
        // Its learning-rate ramp-down applies to every method.
        assert!(train(&["consistency.rampdown_epochs=1"]).is_empty());
        assert_eq!(train(&["consistency.rampdown_epochs=1", "consistency.weight=5"]), ["consistency"]);
        assert!(train(&["consistency.weight=5", "adversarial.kind=\"vat\""]).is_empty());
        assert!(train(&["method=\"mpl\"", "consistency.weight=5"]).is_empty());
        // [adversarial] without an adversarial pass is read by no method.
        assert_eq!(train(&["method=\"uda\"", "adversarial.epsilon=2"]), ["adversarial"]);
        assert!(train(&["adversarial.kind=\"fgm\"", "adversarial.epsilon=2"]).is_empty());
        // Options of another variant of a section that is read are named field by field.
        let ignored = |extra: &[&str]| {
            train_config(extra).unwrap().ignored_fields().into_iter().map(|f| f.0).collect::<Vec<_>>()
        };
        assert!(ignored(&["adversarial.kind=\"vat\"", "adversarial.xi=1e-3"]).is_empty());
        assert_eq!(
            ignored(&["adversarial.kind=\"fgm\"", "adversarial.xi=1e-3", "adversarial.steps=5"]),
            ["adversarial.xi", "adversarial.steps"]
        );
        assert_eq!(
            ignored(&["method=\"uda\"", "consistency.stabiliser_momentum=0.5"]),
            ["consistency.stabiliser_momentum"]
        );
        let free = ["method=\"fixmatch\"", "consistency.adaptive_threshold=\"freematch\""];
        assert!(ignored(&[&free[..], &["consistency.stabiliser_momentum=0.5"]].concat()).is_empty());
        assert_eq!(ignored(&[&free[..], &["consistency.threshold=0.3"]].concat()), ["consistency.threshold"]);
        assert_eq!(ignored(&["method=\"mpl\"", "mpl.temperature=2"]), ["mpl.temperature"]);
        assert!(ignored(&["method=\"mpl\"", "mpl.temperature=2", "mpl.pseudo_labels=\"sampled\""]).is_empty());
        let reduced = ["method=\"mpl_reduced\"", "mpl.logits=\"u.logits\"", "mpl.uda_steps=10"];
        assert_eq!(ignored(&reduced), ["mpl.uda_steps"]);
        // Supervised training loads no unlabeled rows (its recipe's ratio is 0), unless VAT
        // reads them; [augment] is read by the methods that augment unlabeled rows, and by
        // Π, Temporal Ensembling, Mean Teacher and R-Drop with per-pass augmentation only.
        let recipe = |extra: &[&str]| train_config(extra).unwrap().recipe().unlabeled_ratio;
        assert_eq!(train(&["unlabeled.ratio=3"]), ["unlabeled"]);
        assert_eq!(recipe(&["unlabeled.ratio=3"]), 0);
        assert!(train(&["unlabeled.ratio=3", "adversarial.kind=\"vat\""]).is_empty());
        assert_eq!(recipe(&["unlabeled.ratio=3", "adversarial.kind=\"vat\""]), 3);
        assert!(train(&["unlabeled.ratio=0"]).is_empty());
        assert_eq!(recipe(&["method=\"fixmatch\"", "unlabeled.ratio=3"]), 3);
        assert_eq!(train(&["augment.deletion=0.5"]), ["augment"]);
        assert_eq!(train(&["method=\"mean_teacher\"", "augment.deletion=0.5"]), ["augment"]);
        assert!(train(&[
            "method=\"mean_teacher\"",
            "augment.deletion=0.5",
            "augment.consistency_passes=true"
        ])
        .is_empty());
        assert!(train(&["method=\"uda\"", "augment.deletion=0.5"]).is_empty());
        // mpl_reduced's fields under mpl are refused by name.
        for (f, v) in [
            ("mpl.logits", "\"t.logits\""),
            ("mpl.train_logits", "\"t.logits\""),
            ("mpl.reduced_hidden", "[8]"),
        ] {
            let kv = format!("{f}={v}");
            let e = load::<TrainConfig>(
                None,
                &set(&["data.dir=\"d\"", "train.out_dir=\"o\"", "method=\"mpl\"", &kv]),
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains(f) && e.contains("applies to method = \"mpl_reduced\""), "{e}");
        }
    }

    #[test]
    fn tsa_thresholds_are_pinned() {
        assert_eq!(Tsa::None.threshold(5, 10, 4), None);
        // η = a(t)·(1 − 1/C) + 1/C with C = 4, t = 0.5.
        assert_eq!(Tsa::Linear.threshold(5, 10, 4), Some(0.5 * 0.75 + 0.25));
        assert_eq!(Tsa::Log.threshold(5, 10, 4), Some((1.0 - (-2.5f64).exp()) * 0.75 + 0.25));
        assert_eq!(Tsa::Exp.threshold(5, 10, 4), Some((-2.5f64).exp() * 0.75 + 0.25));
        // From 1/C at the start towards 1.
        assert_eq!(Tsa::Linear.threshold(0, 10, 4), Some(0.25));
        assert!((Tsa::Exp.threshold(10, 10, 4).unwrap() - 1.0).abs() < 1e-15);
    }

    #[test]
    fn bad_set_syntax_and_bad_files() {
        assert!(Override::parse("novalue").unwrap_err().to_string().contains("key=value"));
        assert!(Override::parse("a..b=1").is_err());
        assert!(Override::parse("a b=1").unwrap_err().to_string().contains("dotted path"));
        assert!(Override::parse("[[b]]\nc=1").is_err() && Override::parse("[b]\nc=1").is_err());
        let mut root: toml::Table = "[optim]\nlr_mult = 2".parse().unwrap();
        let e = apply(&mut root, &Override::parse("optim.lr_mult.\"hidden.0\"=0.5").unwrap()).unwrap_err();
        assert!(e.to_string().contains("`optim.lr_mult`: is a value, not a section"), "{e}");
        let e = apply(&mut toml::Table::new(), &Override::parse("a.\"b.c\".d=1").unwrap()).map(|_| ());
        assert!(e.is_ok());
        let mut root: toml::Table = "[a]\n\"b.c\" = 1".parse().unwrap();
        let e = apply(&mut root, &Override::parse("a.\"b.c\".d=1").unwrap()).unwrap_err();
        assert!(e.to_string().contains("`a.\"b.c\"`: is a value"), "{e}");
        // A quoted part keeps its dots, as in a TOML file.
        let o = Override::parse("optim.lr_mult.\"hidden.0\"=0.5").unwrap();
        assert_eq!(key_parts(&o.key).unwrap(), ["optim", "lr_mult", "hidden.0"]);
        let mut root = toml::Table::new();
        apply(&mut root, &o).unwrap();
        assert_eq!(root["optim"]["lr_mult"]["hidden.0"].as_float(), Some(0.5));
        let big = Override::parse("train.steps=18446744073709551615").unwrap_err().to_string();
        assert!(big.contains("train.steps") && big.contains("beyond the whole numbers"), "{big}");
        assert!(Override::parse("train.steps=9223372036854775807").is_ok());
        assert!(Override::parse("split.seed=-7").is_ok());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[split\nseed = 1").unwrap();
        let e = load::<PrepareConfig>(Some(&p), &[]).unwrap_err().to_string();
        assert!(e.contains("c.toml") && e.contains("invalid TOML"), "{e}");
        let e = load::<PrepareConfig>(Some(&dir.path().join("missing.toml")), &[]).unwrap_err().to_string();
        assert!(e.contains("missing.toml"), "{e}");
        // A section overridden by a scalar path.
        let e = load::<PrepareConfig>(None, &set(&["split=1", "split.seed=2"])).unwrap_err().to_string();
        assert!(e.contains("not a section"), "{e}");
    }

    /// Π and R-Drop with no dropout and no per-pass augmentation would compare two identical
    /// passes (a consistency term of exactly 0): refused, naming the field and the rule.
    /// The stabilisers of methods that read no weak view are refused by the field set.
    #[test]
    fn stabilisers_outside_uda_and_fixmatch_name_their_field() {
        let train = |extra: &[&str]| train_config(extra).map(|_| ()).unwrap_err().to_string();
        for (field, value) in [("distribution_alignment", "true"), ("adaptive_threshold", "\"flexmatch\"")] {
            let e =
                train(&["method=\"pi\"", "model.embed_dropout=0.5", &format!("consistency.{field}={value}")]);
            assert!(e.contains(&format!("field `consistency.{field}`")) && e.contains("not pi"), "{e}");
        }
    }

    #[test]
    fn two_noiseless_passes_are_refused() {
        let train = |extra: &[&str]| train_config(extra).map(|_| ());
        for method in ["method=\"pi\"", "method=\"rdrop\""] {
            let e = train(&[method]).unwrap_err().to_string();
            assert!(e.contains("field `model.embed_dropout`") && e.contains("identical"), "{e}");
            train(&[method, "model.hidden=[8]", "model.hidden_dropout=0.1"]).unwrap();
            train(&[method, "model.embed_dropout=0.5"]).unwrap();
            train(&[method, "augment.consistency_passes=true"]).unwrap();
            // Per-pass augmentation with every strength 0 is no noise either.
            let none = ["augment.consistency_passes=true", "augment.deletion=0", "augment.replacement=0"];
            let e = train(&[&[method, "augment.swap=0"][..], &none[..]].concat()).unwrap_err().to_string();
            assert!(e.contains("model.embed_dropout"), "{e}");
            // An encoder's dropout left unset is the pretrained config's (0.1 from scratch).
            train(&[method, "model.kind=\"encoder\""]).unwrap();
            let zero =
                ["model.kind=\"encoder\"", "model.encoder.dropout=0", "model.encoder.attention_dropout=0"];
            let e = train(&[&[method][..], &zero[..]].concat()).unwrap_err().to_string();
            assert!(e.contains("field `model.encoder.dropout`"), "{e}");
        }
        // The other consistency methods still learn from a teacher or a bank that differs.
        train(&["method=\"mean_teacher\""]).unwrap();
        train(&["method=\"temporal\""]).unwrap();
    }
}
