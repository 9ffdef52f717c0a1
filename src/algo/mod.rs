//! Semi-supervised methods (METHODS.md §4–§11): which method a run uses, its knobs with
//! each method's published defaults, and the resolved recipe the training loop follows.
//!
//! The methods share one shape, so one generic step serves them all (`train`): a student
//! pass over the labeled rows and the unlabeled rows of the step, cross-entropy on the
//! labeled rows, and a consistency term (`Backend::consistency`) between the student's
//! logits and a target that comes from somewhere else. Only the target's source differs:
//!
//! | method | target of the consistency term | gradient into the target |
//! |---|---|---|
//! | `supervised` | none | — |
//! | `pi` | a second noisy pass of the student | only with `pi.stop_gradient_target = false` |
//! | `temporal` | the sample's bias-corrected moving average in the bank (`bank`) | never |
//! | `mean_teacher` | a noisy pass of the EMA teacher ([`shadow`]) | never |
//! | `rdrop` | a second noisy pass of the student, `sym_kl`, CE on both passes | always |
//! | `noisy_student` | a teacher's logits exported by `dtrain export-logits` (`logits`); the student's unlabeled rows are the strong view | never |
//! | `uda`, `fixmatch` | the student's pass over the weak view of the unlabeled rows; the student's own unlabeled rows are the strong view (`data::augment`) | never |
//!
//! Meta Pseudo Labels (`mpl`, `mpl_reduced`) has a step of its own ([`mpl`]): two models, the
//! student updated on the teacher's pseudo-labels inside the step. It shares the data's
//! shape with UDA (labeled rows, strongly augmented unlabeled rows, their weak view), and
//! its teacher's auxiliary term is UDA's.
//!
//! UDA and FixMatch take the stabilisers of §10b ([`stabilise`]): distribution alignment
//! and FlexMatch or FreeMatch thresholds.

pub mod adversarial;
pub mod consistency;
pub mod mpl;
pub mod ramp;
pub mod shadow;
pub mod stabilise;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use consistency::{ConsistencyKind, ConsistencyOp, TargetForm};
use ramp::{Ramp, RampShape};

/// The training method (`method = "…"` at the top of run.toml).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Cross-entropy on the labeled rows only.
    #[default]
    Supervised,
    /// Π-model (§4).
    Pi,
    /// Temporal Ensembling (§5).
    Temporal,
    /// Mean Teacher (§6).
    MeanTeacher,
    /// R-Drop (§8).
    Rdrop,
    /// UDA (§10): KL to the sharpened weak-view prediction, masked by confidence.
    Uda,
    /// FixMatch (§10): cross-entropy to the weak view's confident argmax.
    Fixmatch,
    /// Noisy Student (§11): a fixed teacher's exported logits as targets, noise on the
    /// student.
    NoisyStudent,
    /// Meta Pseudo Labels (§12): a teacher and a student, the teacher taught by the
    /// student's labeled loss before and after its update ([`mpl`]).
    Mpl,
    /// Reduced MPL (§12): the teacher is an MLP over a fixed teacher's exported logits.
    MplReduced,
}

impl Method {
    /// The name used in configs and logs.
    pub fn name(self) -> &'static str {
        match self {
            Method::Supervised => "supervised",
            Method::Pi => "pi",
            Method::Temporal => "temporal",
            Method::MeanTeacher => "mean_teacher",
            Method::Rdrop => "rdrop",
            Method::Uda => "uda",
            Method::Fixmatch => "fixmatch",
            Method::NoisyStudent => "noisy_student",
            Method::Mpl => "mpl",
            Method::MplReduced => "mpl_reduced",
        }
    }

    /// Whether the method is Meta Pseudo Labels (full or reduced): its step is
    /// [`mpl::step`], not the generic consistency step.
    pub fn is_mpl(self) -> bool {
        matches!(self, Method::Mpl | Method::MplReduced)
    }
}

/// `[unlabeled]`: how many unlabeled rows join each step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UnlabeledConfig {
    /// μ = B_u / B_l: unlabeled rows per labeled row in a step. Unset: the method's
    /// default (1 for `pi`, `temporal` and `mean_teacher`, 3 for `noisy_student`, 7 for
    /// `uda` and `fixmatch`, 0 for `rdrop` and `supervised`).
    pub ratio: Option<u32>,
}

/// `[consistency]`: the consistency term. Unset fields take the method's default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsistencyConfig {
    /// `mse`, `kl`, `ce_hard` or `sym_kl`. Default: `mse` (Π, Temporal Ensembling, Mean
    /// Teacher), `kl` (UDA, Noisy Student, MPL), `ce_hard` (FixMatch), `sym_kl` (R-Drop,
    /// which accepts no other).
    pub kind: Option<ConsistencyKind>,
    /// w_max (R-Drop's α). Default: 100 with `scale_by_labeled_ratio` for Π, Temporal
    /// Ensembling and Mean Teacher (Laine & Aila's w_max = 100·|L|/N), 0 for reduced MPL,
    /// 1 for the others.
    pub weight: Option<f64>,
    /// Multiply w_max by |L| / (|L| + |U|). Default: on for Π, Temporal Ensembling and
    /// Mean Teacher.
    pub scale_by_labeled_ratio: Option<bool>,
    /// Target temperature T (below 1 sharpens). Default 0.4 for UDA and MPL, else 1.
    pub temperature: Option<f64>,
    /// Confidence threshold τ on max q; 0 = no mask. Default 0.8 for UDA and MPL, 0.95 for
    /// FixMatch, else 0. FreeMatch does not read it (its τ_g is learned).
    pub threshold: Option<f64>,
    /// Shape of the ramp-up of the weight.
    pub ramp: RampShape,
    /// Length of the ramp-up in (labeled) epochs. Default: 5 for Π, Temporal Ensembling
    /// and Mean Teacher, 0 for the others.
    pub ramp_epochs: Option<f64>,
    /// Ramp the learning rate and Adam's β₁ down over this many final epochs (the Π-model
    /// paper's exp(−12.5x²)); 0 = none.
    pub rampdown_epochs: f64,
    /// UDA and FixMatch: distribution alignment (ReMixMatch), q ← normalise(q ⊙ π / p̃).
    pub distribution_alignment: bool,
    /// UDA and FixMatch: `fixed` τ, or `flexmatch` / `freematch` adaptive thresholds.
    pub adaptive_threshold: stabilise::AdaptiveThreshold,
    /// λ of the running means of distribution alignment and FreeMatch.
    pub stabiliser_momentum: f64,
}

impl Default for ConsistencyConfig {
    fn default() -> Self {
        ConsistencyConfig {
            kind: None,
            weight: None,
            scale_by_labeled_ratio: None,
            temperature: None,
            threshold: None,
            ramp: RampShape::Sigmoid,
            ramp_epochs: None,
            rampdown_epochs: 0.0,
            distribution_alignment: false,
            adaptive_threshold: stabilise::AdaptiveThreshold::Fixed,
            stabiliser_momentum: 0.999,
        }
    }
}

/// `[pi]`: the Π-model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PiConfig {
    /// Treat the second pass as a constant target (the default); false lets the gradient
    /// flow into it as well, the original paper's form.
    pub stop_gradient_target: bool,
}

impl Default for PiConfig {
    fn default() -> Self {
        PiConfig { stop_gradient_target: true }
    }
}

/// `[mean_teacher]`: the EMA teacher.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeanTeacherConfig {
    /// α of θ' ← α_t θ' + (1 − α_t) θ, α_t = min(1 − 1/(t + 1), α).
    pub alpha: f64,
    /// A second α that takes over once the consistency ramp-up is over (e.g. 0.999).
    pub alpha_late: Option<f64>,
    /// Update the embedding table's teacher rows lazily (METHODS.md §6): a row untouched
    /// for k steps is brought up to date when it is next read, with the product of the α_t
    /// in between. Exact here, because both table optimizers change only touched rows and
    /// take no weight decay; it saves a pass over the whole table every step. The whole
    /// teacher is brought up to date at every evaluation and checkpoint.
    pub lazy_table: bool,
}

impl Default for MeanTeacherConfig {
    fn default() -> Self {
        MeanTeacherConfig { alpha: 0.99, alpha_late: None, lazy_table: true }
    }
}

/// `[temporal]`: the Temporal Ensembling bank.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TemporalConfig {
    /// α of Z_i ← α Z_i + (1 − α) p_i, in (0, 1).
    pub alpha: f64,
    /// How the bank stores its values: `f32`, `f16` or `bf16` (half the disk).
    pub storage: crate::bank::Storage,
}

impl Default for TemporalConfig {
    fn default() -> Self {
        TemporalConfig { alpha: 0.6, storage: crate::bank::Storage::F32 }
    }
}

/// `[noisy_student]`: the teacher's exported logits.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NoisyStudentConfig {
    /// The file `dtrain export-logits --split unlabeled` wrote for this data set. Soft
    /// targets with `consistency.kind = "kl"` (the default), hard with `"ce_hard"`.
    pub logits: Option<std::path::PathBuf>,
}

/// Which averaged weights a run keeps for evaluation and export (METHODS.md §7).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AverageKind {
    #[default]
    None,
    /// An EMA of the weights with `decay` (and the warm-up min(1 − 1/(t + 1), decay)).
    Ema,
    /// The uniform average of the weights every `swa_every` steps from `swa_start`.
    Swa,
}

/// `[average]`: EMA or SWA weights, with any method; evaluated and checkpointed
/// (`average.safetensors`) beside the student.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AverageConfig {
    pub kind: AverageKind,
    /// The EMA's decay, in (0, 1).
    pub decay: f64,
    /// SWA's first average, as a fraction of the run's steps, in [0, 1).
    pub swa_start: f64,
    /// Steps between SWA's averages; 0 = once per labeled epoch.
    pub swa_every: u64,
    /// Update the averaged table's rows lazily (exact; see `mean_teacher.lazy_table`).
    pub lazy_table: bool,
}

impl Default for AverageConfig {
    fn default() -> Self {
        AverageConfig {
            kind: AverageKind::None,
            decay: 0.999,
            swa_start: 0.75,
            swa_every: 0,
            lazy_table: true,
        }
    }
}

impl AverageConfig {
    /// Checks the rules; errors name the field.
    pub fn validate(&self, origin: &str) -> Result<()> {
        if !(self.decay > 0.0 && self.decay < 1.0) {
            return Err(Error::config(origin, "average.decay", "must be in (0, 1)"));
        }
        if !(0.0..1.0).contains(&self.swa_start) {
            return Err(Error::config(
                origin,
                "average.swa_start",
                "must be in [0, 1) (a fraction of the run)",
            ));
        }
        Ok(())
    }

    /// The α rule for a run of `total` steps with `steps_per_epoch`; None without averaging.
    pub fn rule(&self, total: u64, steps_per_epoch: u64) -> Option<shadow::AlphaRule> {
        match self.kind {
            AverageKind::None => None,
            AverageKind::Ema => Some(shadow::AlphaRule::WarmUp { alpha: self.decay, late: None }),
            AverageKind::Swa => Some(shadow::AlphaRule::Swa {
                start: ((self.swa_start * total as f64).floor() as u64).max(1),
                every: if self.swa_every == 0 { steps_per_epoch.max(1) } else { self.swa_every },
            }),
        }
    }

    /// The name of the averaged weights in logs and reports.
    pub fn name(&self) -> &'static str {
        match self.kind {
            AverageKind::None => "none",
            AverageKind::Ema => "ema",
            AverageKind::Swa => "swa",
        }
    }
}

/// Where the consistency target comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetSource {
    /// No consistency term.
    None,
    /// A second noisy pass of the student; `grad`: the gradient flows into it too.
    SecondPass { grad: bool },
    /// A noisy pass of the EMA teacher.
    Teacher,
    /// The Temporal Ensembling bank's bias-corrected average (probabilities).
    Bank,
    /// The student's pass over the weak view of the unlabeled rows (UDA, FixMatch); the
    /// student's own pass sees their strong view.
    WeakView,
    /// An exported logits file (Noisy Student); the student's unlabeled rows are the
    /// strong view.
    File,
}

/// A method resolved against its defaults: what the generic step does.
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    pub method: Method,
    /// μ: unlabeled rows per labeled row.
    pub unlabeled_ratio: u32,
    pub target: TargetSource,
    /// Cross-entropy on the second pass as well, each pass weighted ½ (R-Drop).
    pub ce_both_passes: bool,
    /// The consistency op, its `scale` left at 1 (the step sets w(t)/rows).
    pub op: ConsistencyOp,
    /// w_max before labeled-ratio scaling.
    pub weight: f64,
    pub scale_by_labeled_ratio: bool,
    pub ramp_shape: RampShape,
    pub ramp_epochs: f64,
    /// Epochs at weight 0 before the ramp (Temporal Ensembling's first epoch).
    pub delay_epochs: f64,
    pub rampdown_epochs: f64,
    pub distribution_alignment: bool,
    pub adaptive_threshold: stabilise::AdaptiveThreshold,
    pub stabiliser_momentum: f64,
}

fn unlabeled_ratio_of(k: MethodKnobs<'_>, default: u32) -> u32 {
    k.unlabeled.ratio.unwrap_or(default)
}

/// Every knob of the methods, as they sit in run.toml.
#[derive(Debug, Clone, Copy)]
pub struct MethodKnobs<'a> {
    pub method: Method,
    pub unlabeled: &'a UnlabeledConfig,
    pub consistency: &'a ConsistencyConfig,
    pub pi: &'a PiConfig,
    pub mean_teacher: &'a MeanTeacherConfig,
    pub temporal: &'a TemporalConfig,
    pub noisy_student: &'a NoisyStudentConfig,
    pub mpl: &'a mpl::MplConfig,
}

impl Recipe {
    /// Resolves the knobs against the method's defaults and checks every rule; errors name
    /// the field.
    pub fn resolve(k: MethodKnobs<'_>, origin: &str) -> Result<Recipe> {
        let bad = |field: &str, msg: String| Err(Error::config(origin, field, msg));
        let c = k.consistency;
        let m = k.method;
        let (kind, weight, scale, ramp_epochs, ratio, target) = match m {
            Method::Supervised => (ConsistencyKind::Mse, 0.0, false, 0.0, 0, TargetSource::None),
            Method::Pi => (
                ConsistencyKind::Mse,
                100.0,
                true,
                5.0,
                1,
                TargetSource::SecondPass { grad: !k.pi.stop_gradient_target },
            ),
            Method::MeanTeacher => (ConsistencyKind::Mse, 100.0, true, 5.0, 1, TargetSource::Teacher),
            Method::Temporal => (ConsistencyKind::Mse, 100.0, true, 5.0, 1, TargetSource::Bank),
            Method::Uda => (ConsistencyKind::Kl, 1.0, false, 0.0, 7, TargetSource::WeakView),
            Method::Fixmatch => (ConsistencyKind::CeHard, 1.0, false, 0.0, 7, TargetSource::WeakView),
            Method::NoisyStudent => (ConsistencyKind::Kl, 1.0, false, 0.0, 3, TargetSource::File),
            // The teacher's UDA term reads the weak view; the student's unlabeled rows are
            // the strong view (reduced MPL's teacher reads exported logits instead).
            Method::Mpl => (ConsistencyKind::Kl, 1.0, false, 0.0, 7, TargetSource::WeakView),
            Method::MplReduced => (ConsistencyKind::Kl, 0.0, false, 0.0, 7, TargetSource::File),
            Method::Rdrop => {
                (ConsistencyKind::SymKl, 1.0, false, 0.0, 0, TargetSource::SecondPass { grad: true })
            }
        };
        let kind = c.kind.unwrap_or(kind);
        if m == Method::Rdrop && kind != ConsistencyKind::SymKl {
            return bad("consistency.kind", "R-Drop's term is sym_kl (METHODS.md §8)".into());
        }
        if kind == ConsistencyKind::SymKl
            && m != Method::Supervised
            && target != (TargetSource::SecondPass { grad: true })
        {
            return bad(
                "consistency.kind",
                format!("sym_kl sends gradient into both sides; {} has a constant target", m.name()),
            );
        }
        if kind == ConsistencyKind::SymKl && target == TargetSource::Bank {
            return bad(
                "consistency.kind",
                "sym_kl needs target logits; the bank holds probabilities".into(),
            );
        }
        let (temperature, threshold) = match m {
            Method::Uda | Method::Mpl => (0.4, 0.8),
            Method::Fixmatch => (1.0, 0.95),
            _ => (1.0, 0.0),
        };
        let op = ConsistencyOp {
            kind,
            form: if target == TargetSource::Bank { TargetForm::Probs } else { TargetForm::Logits },
            temperature: c.temperature.unwrap_or(temperature),
            threshold: c.threshold.unwrap_or(threshold),
            scale: 1.0,
        };
        let stabilised =
            c.distribution_alignment || c.adaptive_threshold != stabilise::AdaptiveThreshold::Fixed;
        if stabilised && (target != TargetSource::WeakView || m.is_mpl()) {
            return bad(
                if c.distribution_alignment {
                    "consistency.distribution_alignment"
                } else {
                    "consistency.adaptive_threshold"
                },
                format!(
                    "distribution alignment and adaptive thresholds are options of uda and fixmatch, not {}",
                    m.name()
                ),
            );
        }
        if !(c.stabiliser_momentum > 0.0 && c.stabiliser_momentum < 1.0) {
            return bad("consistency.stabiliser_momentum", "must be in (0, 1)".into());
        }
        // FlexMatch scales τ per class; FreeMatch learns its own τ_g and does not read τ.
        if c.adaptive_threshold == stabilise::AdaptiveThreshold::Flexmatch && op.threshold == 0.0 {
            return bad("consistency.threshold", "flexmatch scales τ per class, and τ is 0 here".into());
        }
        if m == Method::NoisyStudent && k.noisy_student.logits.is_none() {
            return bad(
                "noisy_student.logits",
                "is required: the teacher's logits of the unlabeled split, from `dtrain export-logits`"
                    .into(),
            );
        }
        if m == Method::MplReduced && k.mpl.logits.is_none() {
            return bad(
                "mpl.logits",
                "is required: the fixed teacher's logits of the unlabeled split, from `dtrain export-logits`"
                    .into(),
            );
        }
        if m == Method::MplReduced && c.weight.is_some_and(|w| w != 0.0) {
            return bad(
                "consistency.weight",
                "reduced MPL's teacher reads fixed logits, which have no augmented views for a UDA term: leave it unset or 0".into(),
            );
        }
        if let Err((field, msg)) = k.mpl.validate() {
            return bad(field, msg);
        }
        if matches!(target, TargetSource::WeakView | TargetSource::File) && unlabeled_ratio_of(k, ratio) == 0
        {
            return bad("unlabeled.ratio", format!("{} needs unlabeled rows (ratio ≥ 1)", m.name()));
        }
        let weight = c.weight.unwrap_or(weight);
        if !(weight.is_finite() && weight >= 0.0) {
            return bad("consistency.weight", "must be a finite number at least 0".into());
        }
        if !(op.temperature.is_finite() && op.temperature > 0.0 && op.temperature <= 100.0) {
            return bad("consistency.temperature", "must be in (0, 100]".into());
        }
        if !(0.0..=1.0).contains(&op.threshold) {
            return bad("consistency.threshold", "must be in [0, 1]".into());
        }
        let ramp_epochs = c.ramp_epochs.unwrap_or(ramp_epochs);
        if !(ramp_epochs.is_finite() && ramp_epochs >= 0.0) {
            return bad("consistency.ramp_epochs", "must be at least 0".into());
        }
        if !(c.rampdown_epochs.is_finite() && c.rampdown_epochs >= 0.0) {
            return bad("consistency.rampdown_epochs", "must be at least 0".into());
        }
        let unlabeled_ratio = k.unlabeled.ratio.unwrap_or(ratio);
        if unlabeled_ratio > 64 {
            return bad("unlabeled.ratio", "must be at most 64".into());
        }
        // Checked under every method, as the other sections are: a config valid under one
        // method stays valid under another (a section the method does not read is warned
        // about, not range-checked away).
        let t = k.mean_teacher;
        for (field, a) in [
            ("mean_teacher.alpha", Some(t.alpha)),
            ("mean_teacher.alpha_late", t.alpha_late),
            ("temporal.alpha", Some(k.temporal.alpha)),
        ] {
            if a.is_some_and(|a| !(a > 0.0 && a < 1.0)) {
                return bad(field, "must be in (0, 1)".into());
            }
        }
        Ok(Recipe {
            method: m,
            unlabeled_ratio,
            target,
            ce_both_passes: m == Method::Rdrop,
            op,
            weight,
            scale_by_labeled_ratio: c.scale_by_labeled_ratio.unwrap_or(scale),
            ramp_shape: c.ramp,
            ramp_epochs,
            delay_epochs: if m == Method::Temporal { 1.0 } else { 0.0 },
            rampdown_epochs: c.rampdown_epochs,
            distribution_alignment: c.distribution_alignment,
            adaptive_threshold: c.adaptive_threshold,
            stabiliser_momentum: c.stabiliser_momentum,
        })
    }

    /// The ramp in steps, for `steps_per_epoch`.
    pub fn ramp(&self, steps_per_epoch: u64) -> Ramp {
        Ramp {
            shape: self.ramp_shape,
            up_steps: (self.ramp_epochs * steps_per_epoch as f64).round() as u64,
            delay_steps: (self.delay_epochs * steps_per_epoch as f64).round() as u64,
        }
    }
}
