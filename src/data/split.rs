//! Stratified, seeded splitting of the labeled pool into test, val, train and unlabeled.
//!
//! For each class c (in label-id order) the pool documents of c are shuffled by the stream
//! `(seed, Split, c)`. The first `round(test_fraction·n_c)` go to test (none when a fixed
//! test set was given), the next `round(val_fraction·n_c)` to val (fractions of the whole
//! class), the next K to train (all
//! that remain when K is unset), and the rest to unlabeled. Because test and val are taken
//! first, the same seed gives the same test and val sets for every K: experiments that vary
//! K compare on identical held-out data.

use crate::config::SplitConfig;
use crate::data::shard::SplitKind;
use crate::error::{Error, Result};
use crate::rng::{Purpose, Stream};

/// Where each pool document goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitPlan {
    /// Pool indices per split (indexed by `SplitKind as usize`), grouped by class in label-id
    /// order and shuffled within each class.
    pub order: [Vec<usize>; 4],
}

impl SplitPlan {
    /// The pool indices assigned to `split`.
    pub fn get(&self, split: SplitKind) -> &[usize] {
        &self.order[split as usize]
    }
}

fn count(fraction: f64, n: usize) -> usize {
    ((fraction * n as f64).round() as usize).min(n)
}

/// Plans the split of a pool whose documents have labels `pool_labels` (ids below
/// `names.len()`). `fixed_test` means test documents come from separate files, and
/// `test_labels` counts those documents per class.
pub fn plan(
    pool_labels: &[u32],
    names: &[String],
    cfg: &SplitConfig,
    test_labels: Option<&[u64]>,
) -> Result<SplitPlan> {
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); names.len()];
    for (i, &l) in pool_labels.iter().enumerate() {
        by_class[l as usize].push(i);
    }
    let mut order: [Vec<usize>; 4] = Default::default();
    for (c, docs) in by_class.iter_mut().enumerate() {
        let name = &names[c];
        let n = docs.len();
        if n == 0 {
            let in_test = test_labels.is_some_and(|t| t[c] > 0);
            return Err(Error::Data(if in_test {
                format!(
                    "label `{name}` occurs only in the test split: the labeled inputs have no document of it \
                     (or only copies of test documents, which de-duplication removes from the pool)"
                )
            } else {
                format!(
                    "label `{name}` has no labeled document in the inputs (or only copies of other documents, \
                     which de-duplication removes)"
                )
            }));
        }
        Stream::new(cfg.seed, Purpose::Split, c as u64).shuffle(docs);
        let n_test = if test_labels.is_some() { 0 } else { count(cfg.test_fraction, n) };
        let n_val = count(cfg.val_fraction, n).min(n - n_test);
        let rest = n - n_test - n_val;
        if n_test == n {
            return Err(Error::Data(format!(
                "label `{name}` occurs only in the test split: all {n} of its documents were held out \
                 (test_fraction {})",
                cfg.test_fraction
            )));
        }
        if rest == 0 {
            return Err(Error::Data(format!(
                "label `{name}` has no training document left: its {n} documents went to test ({n_test}) \
                 and validation ({n_val}); lower test_fraction or val_fraction"
            )));
        }
        let n_train = match cfg.labels_per_class {
            Some(k) if k as usize > rest => {
                return Err(Error::Data(format!(
                    "labels_per_class {k} is larger than class `{name}`: only {rest} of its {n} documents \
                     remain after holding out test ({n_test}) and validation ({n_val})"
                )))
            }
            Some(k) => k as usize,
            None => rest,
        };
        let cuts = [n_test, n_test + n_val, n_test + n_val + n_train, n];
        order[SplitKind::Test as usize].extend_from_slice(&docs[..cuts[0]]);
        order[SplitKind::Val as usize].extend_from_slice(&docs[cuts[0]..cuts[1]]);
        order[SplitKind::Train as usize].extend_from_slice(&docs[cuts[1]..cuts[2]]);
        order[SplitKind::Unlabeled as usize].extend_from_slice(&docs[cuts[2]..cuts[3]]);
    }
    Ok(SplitPlan { order })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("c{i}")).collect()
    }

    fn cfg(k: Option<u32>, test: f64, val: f64, seed: u64) -> SplitConfig {
        SplitConfig { labels_per_class: k, test_fraction: test, val_fraction: val, seed }
    }

    /// 100 docs of class 0, 50 of class 1, 10 of class 2, interleaved.
    fn pool() -> Vec<u32> {
        let mut v = Vec::new();
        for i in 0..100 {
            v.push(0);
            if i % 2 == 0 {
                v.push(1);
            }
            if i % 10 == 0 {
                v.push(2);
            }
        }
        v
    }

    fn per_class(labels: &[u32], idx: &[usize]) -> [usize; 3] {
        let mut c = [0; 3];
        for &i in idx {
            c[labels[i] as usize] += 1;
        }
        c
    }

    #[test]
    fn stratified_counts_and_a_partition() {
        let labels = pool();
        let p = plan(&labels, &names(3), &cfg(Some(3), 0.2, 0.1, 1), None).unwrap();
        assert_eq!(per_class(&labels, p.get(SplitKind::Test)), [20, 10, 2]);
        assert_eq!(per_class(&labels, p.get(SplitKind::Val)), [10, 5, 1]);
        assert_eq!(per_class(&labels, p.get(SplitKind::Train)), [3, 3, 3]);
        assert_eq!(per_class(&labels, p.get(SplitKind::Unlabeled)), [67, 32, 4]);
        let mut all: Vec<usize> = p.order.concat();
        all.sort();
        assert_eq!(all, (0..labels.len()).collect::<Vec<_>>());
    }

    #[test]
    fn seeded_and_test_val_do_not_depend_on_k() {
        let labels = pool();
        let a = plan(&labels, &names(3), &cfg(Some(3), 0.2, 0.1, 7), None).unwrap();
        let b = plan(&labels, &names(3), &cfg(Some(3), 0.2, 0.1, 7), None).unwrap();
        assert_eq!(a, b);
        let c = plan(&labels, &names(3), &cfg(Some(3), 0.2, 0.1, 8), None).unwrap();
        assert_ne!(a.get(SplitKind::Test), c.get(SplitKind::Test));
        let all = plan(&labels, &names(3), &cfg(None, 0.2, 0.1, 7), None).unwrap();
        assert_eq!(a.get(SplitKind::Test), all.get(SplitKind::Test));
        assert_eq!(a.get(SplitKind::Val), all.get(SplitKind::Val));
        assert!(all.get(SplitKind::Unlabeled).is_empty());
        assert_eq!(all.get(SplitKind::Train).len(), labels.len() - 32 - 16);
    }

    #[test]
    fn errors_name_the_class_and_the_rule() {
        let labels = pool();
        let e = plan(&labels, &names(3), &cfg(Some(8), 0.2, 0.1, 1), None).unwrap_err().to_string();
        assert!(e.contains("labels_per_class 8 is larger than class `c2`: only 7 of its 10"), "{e}");
        let e = plan(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], &names(2), &cfg(None, 0.9, 0.0, 1), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`c1` occurs only in the test split"), "{e}");
        let e = plan(&[0, 0], &names(2), &cfg(None, 0.0, 0.0, 1), Some(&[1, 1])).unwrap_err().to_string();
        assert!(e.contains("`c1` occurs only in the test split"), "{e}");
        let e = plan(&[0, 0], &names(2), &cfg(None, 0.0, 0.0, 1), None).unwrap_err().to_string();
        assert!(e.contains("`c1` has no labeled document"), "{e}");
        let e = plan(&[0, 0, 1, 1], &names(2), &cfg(None, 0.3, 0.6, 1), None).unwrap_err().to_string();
        assert!(e.contains("no training document left"), "{e}");
    }

    #[test]
    fn fixed_test_set_takes_nothing_from_the_pool() {
        let labels = pool();
        let p = plan(&labels, &names(3), &cfg(None, 0.0, 0.0, 1), Some(&[5, 5, 5])).unwrap();
        assert!(p.get(SplitKind::Test).is_empty());
        assert_eq!(p.get(SplitKind::Train).len(), labels.len());
    }
}
