//! Property tests: the tokenizer on arbitrary text, and the shard format on arbitrary data.

use proptest::prelude::*;

use dtrain::data::shard::{Shard, ShardWriter, SplitKind};
use dtrain::data::tokenize::{Tokenizer, TokenizerSpec};

fn spec_strategy() -> impl Strategy<Value = TokenizerSpec> {
    (1u32..4, 0u32..5, 1u32..4, 1u32..5000, 1u32..50, any::<bool>(), any::<u64>()).prop_map(
        |(wn, cmax, cjk, buckets, max_words, lowercase, seed)| TokenizerSpec {
            word_ngrams: wn,
            char_ngram_min: 1.max(cmax.saturating_sub(2)),
            char_ngram_max: cmax,
            cjk_ngram_max: cjk,
            buckets,
            max_words,
            lowercase,
            hash_seed: seed,
            ..TokenizerSpec::default()
        },
    )
}

/// Text mixing ASCII words, accents, CJK, Thai, punctuation, emoji, odd whitespace.
fn text_strategy() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            "[a-zA-Z]{1,8}",
            "[0-9]{1,4}",
            Just("É".to_string()),
            Just("straße".to_string()),
            "[\u{4e00}-\u{4e20}]{1,6}",
            "[\u{3041}-\u{3060}]{1,4}",
            "[\u{0e01}-\u{0e30}]{1,4}",
            "[ \t\u{3000}\u{a0}]{1,2}",
            "[.,!?'\\-`]{1,3}",
            Just("😀\u{200d}👍".to_string()),
            Just("\u{ad}\u{200b}".to_string()),
            any::<String>(),
        ],
        0..30,
    )
    .prop_map(|parts| parts.concat())
}

proptest! {
    // 256 cases by default; PROPTEST_CASES=N runs more.
    #[test]
    fn tokenizer_is_total_deterministic_and_in_range(spec in spec_strategy(), text in text_strategy()) {
        let tok = Tokenizer::new(spec.clone());
        let a = tok.tokenize(&text);
        let b = Tokenizer::new(spec.clone()).tokenize(&text);
        prop_assert_eq!(&a, &b);
        prop_assert!(a.ids.iter().all(|&id| id < spec.buckets));
        prop_assert!(a.units <= spec.max_words);
        // explain() is the same computation, with the texts attached.
        let ids: Vec<u32> = tok.explain(&text).iter().map(|f| f.id).collect();
        prop_assert_eq!(ids, a.ids.clone());
        // Truncation is reported exactly when units were cut: with room for everything,
        // the same text gives the same ids with no truncation.
        let roomy = Tokenizer::new(TokenizerSpec { max_words: 1_000_000, ..spec.clone() }).tokenize(&text);
        prop_assert_eq!(a.truncated, roomy.units > spec.max_words);
        if !a.truncated {
            prop_assert_eq!(&roomy.ids, &a.ids);
        } else {
            // Cutting keeps every unit before the cut with all its features; only the
            // n-grams of a no-space run cut in the middle can differ, at most
            // cjk_ngram_max² ids at the end.
            let slack = (spec.cjk_ngram_max * spec.cjk_ngram_max) as usize;
            prop_assert!(roomy.ids.starts_with(&a.ids[..a.ids.len().saturating_sub(slack)]));
            prop_assert!(roomy.ids.len() > a.ids.len());
        }
    }

    #[test]
    fn lowercasing_makes_case_irrelevant(text in text_strategy(), ascii in "[a-zA-Z ]{0,40}") {
        let tok = Tokenizer::new(TokenizerSpec::default());
        // Lower-casing is applied once, so lower-cased input changes nothing…
        prop_assert_eq!(tok.tokenize(&text), tok.tokenize(&text.to_lowercase()));
        // …and case is invisible where upper/lower map one to one (not so for "ß" → "SS").
        prop_assert_eq!(tok.tokenize(&ascii), tok.tokenize(&ascii.to_uppercase()));
    }

    /// Pretraining's per-word features are exactly the ids the classifier's tokenizer emits
    /// for the same words, so that a pretrained table transfers row for row.
    #[test]
    fn word_features_are_the_classifier_ids(words in prop::collection::vec("[a-zà-ö]{1,9}", 1..12), lo in 1u32..4, extra in 0u32..4) {
        let spec = TokenizerSpec { word_ngrams: 1, char_ngram_min: lo, char_ngram_max: lo + extra, ..TokenizerSpec::default() };
        let tok = Tokenizer::new(spec.clone());
        let text = words.join(" ");
        let (t, units) = tok.tokenize_with_words(&text);
        let units: Vec<&str> = units.iter().collect();
        prop_assert_eq!(&units, &words);
        let mut concat = Vec::new();
        let mut f = Vec::new();
        for w in units {
            tok.word_features(w, spec.char_ngram_min, spec.char_ngram_max, &mut f);
            concat.extend_from_slice(&f);
        }
        prop_assert_eq!(t.ids, concat);
    }

    #[test]
    fn whitespace_runs_do_not_matter(words in prop::collection::vec("[a-z]{1,6}", 1..10), seps in prop::collection::vec("[ \t\u{3000}]{1,3}", 10)) {
        let tok = Tokenizer::new(TokenizerSpec { char_ngram_max: 4, ..TokenizerSpec::default() });
        let single = words.join(" ");
        let mut odd = String::new();
        for (i, w) in words.iter().enumerate() {
            odd.push_str(&seps[i % seps.len()]);
            odd.push_str(w);
        }
        prop_assert_eq!(tok.tokenize(&single), tok.tokenize(&odd));
    }

    #[test]
    fn shards_round_trip_arbitrary_documents(
        docs in prop::collection::vec(
            (prop::collection::vec(0u32..1000, 0..40), prop::collection::vec(0u32..50, 0..20), 0i32..5, any::<u64>()),
            0..60,
        ),
        index in 0u32..4,
        unlabeled in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let split = if unlabeled { SplitKind::Unlabeled } else { SplitKind::Val };
        // Labeled splits carry the label; unlabeled ones a hidden label (or none, -1).
        let columns = |label: i32, sample: u64| if unlabeled { (-1, (sample % 6) as i32 - 1) } else { (label, -1) };
        let mut w = ShardWriter::create(dir.path(), split, index, 4, 0xabcdef).unwrap();
        for (ids, words, label, sample) in &docs {
            let (l, h) = columns(*label, *sample);
            w.push(ids, words, l, *sample, h).unwrap();
        }
        let summary = w.finish().unwrap();
        prop_assert_eq!(summary.docs as usize, docs.len());
        let shard = Shard::open(&dir.path().join(summary.file)).unwrap();
        shard.verify_checksum().unwrap();
        shard.verify_ids(1000).unwrap();
        shard.verify_words(50).unwrap();
        shard.verify_labels(5).unwrap();
        prop_assert_eq!(shard.header().tokenizer_hash, 0xabcdef);
        prop_assert_eq!(shard.header().shard_index, index);
        prop_assert_eq!(shard.header().split, split);
        prop_assert_eq!(shard.len(), docs.len());
        for (i, (ids, words, label, sample)) in docs.iter().enumerate() {
            let (l, h) = columns(*label, *sample);
            let d = shard.doc(i);
            prop_assert_eq!(d.ids, &ids[..]);
            prop_assert_eq!(shard.doc_words(i), &words[..]);
            prop_assert_eq!(d.label, u32::try_from(l).ok());
            prop_assert_eq!(d.sample_id, *sample);
            prop_assert_eq!(shard.hidden_label(i), u32::try_from(h).ok());
        }
    }
}
