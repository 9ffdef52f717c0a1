//! The fastText-style hashing tokenizer: text → words → hashed feature ids in `0..buckets`.
//!
//! # The algorithm (version [`TOKENIZER_ALGORITHM`]; every step is part of the format)
//! 1. **Normalise.** Drop the invisible format characters of [`is_ignorable`] (soft hyphen
//!    U+00AD, zero-width space U+200B, word joiner U+2060, byte-order mark U+FEFF, variation
//!    selectors U+FE00–FE0F and U+E0100–E01EF); then lower-case with Unicode rules
//!    (`str::to_lowercase`) when `lowercase`.
//! 2. **Segment** into units, scanning characters:
//!    - whitespace (`char::is_whitespace`) separates units;
//!    - a *word* is a maximal run of word characters: alphabetic or numeric
//!      (`char::is_alphanumeric`), any mark (General_Category M: Mn, Mc, Me, as tabled by
//!      the `unicode-properties` crate), or the zero-width (non-)joiner U+200C/U+200D. The
//!      connectors `'` `’` `-` `_` `.` join two word characters into one word (`don't`,
//!      `hard-fought`, `u.s`), and `,` joins two digits (`1,000`);
//!    - a *no-space run* is a maximal run of characters of scripts written without spaces
//!      (Han, Hiragana, Katakana, Thai, Lao, Myanmar, Khmer); see [`is_no_space_script`];
//!    - any other character (punctuation, symbols, emoji) is a *punctuation unit* of its own,
//!      kept or dropped by `punctuation`.
//! 3. **Truncate** to `max_words` units, counting each character of a no-space run as one
//!    unit. A document that loses units is counted as truncated.
//! 4. **Emit features in text order:**
//!    - a word `w`: its word feature `W(w)`; then, if `char_ngram_max > 0`, the character
//!      n-grams of `<w>` for `n` in `char_ngram_min..=char_ngram_max`, by start position then
//!      length, except the whole `<w>` itself: `C(gram)`;
//!    - a punctuation unit `p`: `W(p)`, no character n-grams;
//!    - a no-space run `r`: every character n-gram of `r` with `n` in `1..=cjk_ngram_max`,
//!      by start position then length (no boundary markers): `C(gram)`;
//!    - after each word or punctuation unit, the word n-grams ending at it, for `n` in
//!      `2..=word_ngrams`: `N(u₁ ␟ … ␟ uₙ)` (units joined by U+001F). A no-space run breaks
//!      the sequence: word n-grams never span one.
//! 5. **Hash.** `id = xxh3_64(utf8(payload), seed ^ K) mod buckets`, with `K` per kind:
//!    `W` = [`KIND_WORD`], `C` = [`KIND_CHAR`], `N` = [`KIND_WORD_NGRAM`]. xxh3_64 is the
//!    XXH3 64-bit hash (xxhash-rust), stable across machines and versions; golden values are
//!    pinned in the tests so that ids never change silently.

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{xxh3_64_with_seed, Xxh3};

use crate::error::{Error, Result};

/// Version of the algorithm above. Bump it whenever any step changes: it enters the
/// tokenizer hash, so data prepared by another algorithm is refused.
pub const TOKENIZER_ALGORITHM: u32 = 2;
/// Seed offset of word (and punctuation) features.
pub const KIND_WORD: u64 = 0x5744_5452_4149_4E57; // "WDTRAINW"
/// Seed offset of character n-gram features.
pub const KIND_CHAR: u64 = 0x4344_5452_4149_4E43; // "CDTRAINC"
/// Seed offset of word n-gram features.
pub const KIND_WORD_NGRAM: u64 = 0x4E44_5452_4149_4E4E; // "NDTRAINN"

/// What to do with punctuation and symbol characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Punctuation {
    /// Each punctuation or symbol character is a unit of its own.
    Keep,
    /// Punctuation and symbols are removed.
    Drop,
}

/// The tokenizer's full specification. It is recorded in every dataset manifest, and its
/// hash in every shard header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenizerSpec {
    /// Lower-case the text (Unicode rules) before segmenting.
    pub lowercase: bool,
    /// Longest word n-gram: 1 = words only, 2 = words and bigrams (fastText's `-wordNgrams`).
    pub word_ngrams: u32,
    /// Shortest character n-gram of a word, boundary markers `<` `>` included.
    pub char_ngram_min: u32,
    /// Longest character n-gram of a word; 0 turns word character n-grams off.
    pub char_ngram_max: u32,
    /// Longest character n-gram taken inside runs of scripts written without spaces
    /// (Chinese, Japanese, Thai…); every length from 1 up to this is emitted.
    pub cjk_ngram_max: u32,
    /// Keep or drop punctuation and symbol characters.
    pub punctuation: Punctuation,
    /// Number of hash buckets B: every feature id is in `0..B`.
    pub buckets: u32,
    /// Maximum units (words, punctuation, characters of no-space runs) kept per document.
    pub max_words: u32,
    /// Seed of the feature hash.
    pub hash_seed: u64,
    /// A subword tokenizer whose ids the documents get instead of hashed features (for
    /// encoder models); the hashing tokenizer above still gives each document's words
    /// (de-duplication, the vocabulary, pretraining). None: hashed features.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subword: Option<SubwordSpec>,
}

/// A Hugging Face `tokenizer.json` for a data set's ids.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubwordSpec {
    /// The tokenizer.json: as given in a config; `prepare` records the path as given.
    pub path: String,
    /// Most ids per document, special tokens included (the encoder's positions).
    #[serde(default = "SubwordSpec::default_max_len")]
    pub max_len: u32,
    /// Set by `prepare`: the file's xxh3 (hex), so that a data set names the exact
    /// tokenizer its ids come from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
    /// Set by `prepare`: the vocabulary size, which `buckets` becomes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab: Option<u32>,
}

/// Two specs name the same tokenizer when their checksums agree, wherever the file was
/// and however its path was spelled; without checksums (a config not yet prepared), when
/// their paths do.
impl PartialEq for SubwordSpec {
    fn eq(&self, other: &Self) -> bool {
        let same_file = match (&self.checksum, &other.checksum) {
            (Some(a), Some(b)) => a == b,
            (a, b) => a == b && self.path == other.path,
        };
        same_file && self.max_len == other.max_len && self.vocab == other.vocab
    }
}

impl SubwordSpec {
    fn default_max_len() -> u32 {
        512
    }
}

impl Default for TokenizerSpec {
    fn default() -> Self {
        TokenizerSpec {
            lowercase: true,
            word_ngrams: 2,
            char_ngram_min: 3,
            char_ngram_max: 0,
            cjk_ngram_max: 2,
            punctuation: Punctuation::Keep,
            buckets: 1 << 20,
            max_words: 2048,
            hash_seed: 0,
            subword: None,
        }
    }
}

impl TokenizerSpec {
    /// Checks every field against its rule; `prefix` is the field path (e.g. `tokenizer`).
    pub fn validate(&self, origin: &str, prefix: &str) -> Result<()> {
        let bad = |field: &str, msg: &str| Err(Error::config(origin, format!("{prefix}.{field}"), msg));
        if self.word_ngrams < 1 || self.word_ngrams > 8 {
            return bad("word_ngrams", "must be in 1..=8");
        }
        if self.char_ngram_max > 0 {
            if self.char_ngram_min < 1 {
                return bad("char_ngram_min", "must be at least 1 when char_ngram_max > 0");
            }
            if self.char_ngram_min > self.char_ngram_max {
                return bad("char_ngram_min", "must not exceed char_ngram_max");
            }
            if self.char_ngram_max > 16 {
                return bad("char_ngram_max", "must be at most 16");
            }
        }
        if self.cjk_ngram_max < 1 || self.cjk_ngram_max > 8 {
            return bad("cjk_ngram_max", "must be in 1..=8");
        }
        if self.buckets < 1 {
            return bad("buckets", "must be at least 1");
        }
        if self.max_words < 1 {
            return bad("max_words", "must be at least 1");
        }
        if let Some(sw) = &self.subword {
            if sw.path.is_empty() {
                return bad("subword.path", "must name a tokenizer.json");
            }
            if sw.max_len < 3 {
                return bad(
                    "subword.max_len",
                    "must be at least 3 (the special tokens and one token of the text)",
                );
            }
        }
        Ok(())
    }

    /// The hash that identifies this tokenizer: xxh3_64 of its canonical JSON together with
    /// [`TOKENIZER_ALGORITHM`]. Shards made by a different tokenizer have a different hash.
    pub fn hash(&self) -> u64 {
        let canonical = serde_json::json!({
            "algorithm": TOKENIZER_ALGORITHM,
            "spec": self,
        });
        xxh3_64_with_seed(canonical.to_string().as_bytes(), 0)
    }
}

/// One document after tokenization.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tokenized {
    /// Feature ids in text order, each in `0..buckets`.
    pub ids: Vec<u32>,
    /// Units kept (after truncation).
    pub units: u32,
    /// Whether units were cut by `max_words`.
    pub truncated: bool,
    /// xxh3_64 of the kept units (normalised text, unit kinds and boundaries), before
    /// hashing into buckets: equal keys mean the model sees the same document, whatever
    /// the bucket count. Used for de-duplication.
    pub key: u64,
}

/// The word units of one document, in one string (few allocations on the hot path).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Words {
    text: String,
    /// End byte of each word in `text`.
    ends: Vec<u32>,
}

impl Words {
    /// The words in order.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts.zip(&self.ends).map(|(a, &b)| &self.text[a as usize..b as usize])
    }
}

/// A unit of segmented text: byte range in the normalised string and its kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UnitKind {
    Word,
    Punct,
    NoSpaceRun,
}

#[derive(Debug, Clone, Copy)]
struct Unit {
    start: usize,
    end: usize,
    kind: UnitKind,
}

/// Applies a [`TokenizerSpec`]. Cheap to clone; holds no buffers, so it is shared by threads.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    spec: TokenizerSpec,
}

/// One feature as text, for `dtrain inspect --explain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Feature {
    /// `word`, `char` or `word_ngram`.
    pub kind: &'static str,
    /// The hashed payload (word n-gram parts joined by a space for display).
    pub text: String,
    /// Its id in `0..buckets`.
    pub id: u32,
}

impl Tokenizer {
    /// A tokenizer for a validated spec.
    pub fn new(spec: TokenizerSpec) -> Self {
        Tokenizer { spec }
    }

    /// The spec this tokenizer applies.
    pub fn spec(&self) -> &TokenizerSpec {
        &self.spec
    }

    /// Tokenizes one document into feature ids.
    pub fn tokenize(&self, text: &str) -> Tokenized {
        let mut out = Tokenized::default();
        let mut ids = Vec::new();
        self.run(text, |_, _, id| ids.push(id), |_| {}, &mut out);
        out.ids = ids;
        out
    }

    /// Tokenizes one document into feature ids, and also returns its word units (kind
    /// *word* of step 2, normalised, after truncation) in text order: the sequence that
    /// skip-gram and CBOW train on. Punctuation units and no-space runs are not words.
    pub fn tokenize_with_words(&self, text: &str) -> (Tokenized, Words) {
        let mut out = Tokenized::default();
        let mut ids = Vec::new();
        let mut words = Words::default();
        self.run(
            text,
            |_, _, id| ids.push(id),
            |w| {
                words.text.push_str(w);
                words.ends.push(words.text.len() as u32);
            },
            &mut out,
        );
        out.ids = ids;
        (out, words)
    }

    /// The features of one word unit as the classifier hashes them (step 4), with character
    /// n-grams of lengths `char_min..=char_max` (`char_max = 0`: none) in place of the
    /// spec's: the word feature `W(word)`, then `C(gram)` for the n-grams of `<word>`. With the
    /// spec's own range this is exactly what [`Tokenizer::tokenize`] emits for the word,
    /// word n-grams aside.
    pub fn word_features(&self, word: &str, char_min: u32, char_max: u32, out: &mut Vec<u32>) {
        out.clear();
        out.push(self.id(KIND_WORD, word.as_bytes()));
        let (mut scratch, mut bounds) = (Vec::new(), Vec::new());
        self.char_ngrams(word, char_min, char_max, &mut scratch, &mut bounds, |_, id| out.push(id));
    }

    /// Emits `C(gram)` for every character n-gram of `<word>` with `n` in `lo..=hi`, by start
    /// position then length, except the whole `<word>` (step 4).
    fn char_ngrams(
        &self,
        word: &str,
        lo: u32,
        hi: u32,
        scratch: &mut Vec<u8>,
        bounds: &mut Vec<usize>,
        mut emit: impl FnMut(&[u8], u32),
    ) {
        if hi == 0 {
            return;
        }
        scratch.clear();
        scratch.push(b'<');
        scratch.extend_from_slice(word.as_bytes());
        scratch.push(b'>');
        char_starts(scratch, bounds);
        let nchars = bounds.len() - 1;
        let (lo, hi) = (lo as usize, hi as usize);
        for i in 0..nchars {
            for n in lo..=hi.min(nchars - i) {
                if n == nchars {
                    continue; // the whole "<w>" is the word feature itself
                }
                let gram = &scratch[bounds[i]..bounds[i + n]];
                emit(gram, self.id(KIND_CHAR, gram));
            }
        }
    }

    /// Tokenizes one document and returns every feature with its text (slow; for display).
    pub fn explain(&self, text: &str) -> Vec<Feature> {
        let mut features = Vec::new();
        let mut stats = Tokenized::default();
        self.run(
            text,
            |kind, payload, id| {
                let text = String::from_utf8_lossy(payload).replace('\u{1f}', " ");
                features.push(Feature { kind, text, id })
            },
            |_| {},
            &mut stats,
        );
        features
    }

    /// The id of one feature payload of the given kind seed.
    fn id(&self, kind: u64, payload: &[u8]) -> u32 {
        (xxh3_64_with_seed(payload, self.spec.hash_seed ^ kind) % u64::from(self.spec.buckets)) as u32
    }

    fn run(
        &self,
        text: &str,
        mut emit: impl FnMut(&'static str, &[u8], u32),
        mut on_word: impl FnMut(&str),
        stats: &mut Tokenized,
    ) {
        let spec = &self.spec;
        let normalized = normalize(text, spec.lowercase);
        let (units, kept, truncated) = segment(&normalized, spec);
        stats.units = kept;
        stats.truncated = truncated;
        let mut key = Xxh3::new();
        for unit in &units {
            key.update(&[unit.kind as u8]);
            key.update(&normalized.as_bytes()[unit.start..unit.end]);
        }
        stats.key = key.digest();

        let mut scratch: Vec<u8> = Vec::with_capacity(64);
        let mut char_bounds: Vec<usize> = Vec::with_capacity(64);
        // Word-level units since the last break, for word n-grams.
        let mut window: Vec<&str> = Vec::with_capacity(spec.word_ngrams as usize);
        for unit in &units {
            let s = &normalized[unit.start..unit.end];
            match unit.kind {
                UnitKind::Word | UnitKind::Punct => {
                    emit("word", s.as_bytes(), self.id(KIND_WORD, s.as_bytes()));
                    if unit.kind == UnitKind::Word {
                        on_word(s);
                        let (lo, hi) = (spec.char_ngram_min, spec.char_ngram_max);
                        self.char_ngrams(s, lo, hi, &mut scratch, &mut char_bounds, |gram, id| {
                            emit("char", gram, id)
                        });
                    }
                    if spec.word_ngrams >= 2 {
                        if window.len() == spec.word_ngrams as usize {
                            window.remove(0);
                        }
                        window.push(s);
                        for n in 2..=window.len() {
                            scratch.clear();
                            for (k, part) in window[window.len() - n..].iter().enumerate() {
                                if k > 0 {
                                    scratch.push(0x1f);
                                }
                                scratch.extend_from_slice(part.as_bytes());
                            }
                            emit("word_ngram", &scratch, self.id(KIND_WORD_NGRAM, &scratch));
                        }
                    }
                }
                UnitKind::NoSpaceRun => {
                    window.clear();
                    char_starts(s.as_bytes(), &mut char_bounds);
                    let nchars = char_bounds.len() - 1;
                    for i in 0..nchars {
                        for n in 1..=(spec.cjk_ngram_max as usize).min(nchars - i) {
                            let gram = &s.as_bytes()[char_bounds[i]..char_bounds[i + n]];
                            emit("char", gram, self.id(KIND_CHAR, gram));
                        }
                    }
                }
            }
        }
    }
}

/// Byte offsets of every character start in `s`, plus `s.len()` at the end.
fn char_starts(s: &[u8], out: &mut Vec<usize>) {
    out.clear();
    out.extend(
        s.iter()
            .enumerate()
            .filter(|(_, &b)| (b as i8) >= -0x40) // not a UTF-8 continuation byte
            .map(|(i, _)| i),
    );
    out.push(s.len());
}

/// Characters removed before segmenting: invisible format characters.
pub fn is_ignorable(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}' | '\u{200B}' | '\u{2060}' | '\u{FEFF}' | '\u{FE00}'..='\u{FE0F}' | '\u{E0100}'..='\u{E01EF}'
    )
}

fn normalize(text: &str, lowercase: bool) -> String {
    let cleaned: String = if text.chars().any(is_ignorable) {
        text.chars().filter(|&c| !is_ignorable(c)).collect()
    } else {
        text.to_owned()
    };
    if lowercase {
        cleaned.to_lowercase()
    } else {
        cleaned
    }
}

/// Whether `c` belongs to a script written without spaces between words: Han (with CJK
/// radicals, ideographic iteration marks and the supplementary ideograph planes), Hiragana,
/// Katakana (with its extensions and half-width forms), Thai, Lao, Myanmar and Khmer.
pub fn is_no_space_script(c: char) -> bool {
    matches!(c,
        '\u{0E00}'..='\u{0EFF}'     // Thai, Lao
        | '\u{1000}'..='\u{109F}'   // Myanmar
        | '\u{1780}'..='\u{17FF}'   // Khmer
        | '\u{2E80}'..='\u{2FDF}'   // CJK radicals, Kangxi radicals
        | '\u{3005}'..='\u{3007}'   // 々 〆 〇
        | '\u{3021}'..='\u{3029}'   // Hangzhou numerals
        | '\u{3038}'..='\u{303B}'
        | '\u{3040}'..='\u{30FF}'   // Hiragana, Katakana
        | '\u{31F0}'..='\u{31FF}'   // Katakana phonetic extensions
        | '\u{3400}'..='\u{4DBF}'   // CJK extension A
        | '\u{4E00}'..='\u{9FFF}'   // CJK unified ideographs
        | '\u{F900}'..='\u{FAFF}'   // CJK compatibility ideographs
        | '\u{FF66}'..='\u{FF9F}'   // half-width Katakana
        | '\u{20000}'..='\u{2FA1F}' // CJK extensions B–F, compatibility supplement
        | '\u{30000}'..='\u{323AF}' // CJK extensions G, H
    )
}

fn is_word_char(c: char) -> bool {
    use unicode_properties::{GeneralCategoryGroup, UnicodeGeneralCategory};
    c.is_alphanumeric()
        || matches!(c, '\u{200C}' | '\u{200D}')
        || c.general_category_group() == GeneralCategoryGroup::Mark
}

fn is_connector(c: char) -> bool {
    matches!(c, '\'' | '\u{2019}' | '-' | '_' | '.')
}

/// Splits normalised text into units; returns them with the units kept and whether any were
/// cut by `max_words`.
fn segment(s: &str, spec: &TokenizerSpec) -> (Vec<Unit>, u32, bool) {
    let mut units = Vec::new();
    let chars: Vec<(usize, char)> = s.char_indices().collect();
    let byte_at = |i: usize| chars.get(i).map_or(s.len(), |&(b, _)| b);
    let max = spec.max_words as usize;
    let mut kept = 0usize;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i].1;
        let is_punct = !is_no_space_script(c) && !is_word_char(c);
        if c.is_whitespace() || (is_punct && spec.punctuation == Punctuation::Drop) {
            i += 1;
            continue;
        }
        // A unit that would be kept remains: only now is the document truncated.
        if kept >= max {
            return (units, kept as u32, true);
        }
        if is_no_space_script(c) {
            let start = i;
            while i < chars.len() && is_no_space_script(chars[i].1) && kept < max {
                i += 1;
                kept += 1;
            }
            units.push(Unit { start: byte_at(start), end: byte_at(i), kind: UnitKind::NoSpaceRun });
        } else if is_word_char(c) && !is_no_space_script(c) {
            let start = i;
            i += 1;
            loop {
                match chars.get(i) {
                    Some(&(_, d)) if is_word_char(d) && !is_no_space_script(d) => i += 1,
                    Some(&(_, d)) if is_connector(d) || d == ',' => {
                        let prev = chars[i - 1].1;
                        let joins = match chars.get(i + 1) {
                            Some(&(_, n)) if d == ',' => prev.is_numeric() && n.is_numeric(),
                            Some(&(_, n)) => is_word_char(n) && !is_no_space_script(n),
                            None => false,
                        };
                        if joins {
                            i += 2;
                        } else {
                            break;
                        }
                    }
                    _ => break,
                }
            }
            units.push(Unit { start: byte_at(start), end: byte_at(i), kind: UnitKind::Word });
            kept += 1;
        } else {
            units.push(Unit { start: byte_at(i), end: byte_at(i + 1), kind: UnitKind::Punct });
            kept += 1;
            i += 1;
        }
    }
    (units, kept as u32, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words_only() -> TokenizerSpec {
        TokenizerSpec { word_ngrams: 1, char_ngram_max: 0, ..TokenizerSpec::default() }
    }

    fn texts(spec: TokenizerSpec, text: &str) -> Vec<(&'static str, String)> {
        Tokenizer::new(spec).explain(text).into_iter().map(|f| (f.kind, f.text)).collect()
    }

    fn words(spec: TokenizerSpec, text: &str) -> Vec<String> {
        texts(spec, text).into_iter().filter(|(k, _)| *k == "word").map(|(_, t)| t).collect()
    }

    #[test]
    fn segments_words_connectors_and_punctuation() {
        assert_eq!(
            words(words_only(), "Don't over-all U.S. 1,000 3.5, end."),
            ["don't", "over-all", "u.s", ".", "1,000", "3.5", ",", "end", "."]
        );
        assert_eq!(words(words_only(), "``Hi'' -- a_b"), ["`", "`", "hi", "'", "'", "-", "-", "a_b"]);
        let drop = TokenizerSpec { punctuation: Punctuation::Drop, ..words_only() };
        assert_eq!(words(drop, "Hello, world!"), ["hello", "world"]);
    }

    #[test]
    fn lowercases_with_unicode_rules_and_can_keep_case() {
        assert_eq!(words(words_only(), "ÉCOLE Straße ΣΟΦΊΑ"), ["école", "straße", "σοφία"]);
        let keep = TokenizerSpec { lowercase: false, ..words_only() };
        assert_eq!(words(keep, "ÉCOLE"), ["ÉCOLE"]);
    }

    #[test]
    fn combining_marks_and_invisible_characters_stay_inside_words() {
        // Indic virama (U+094D) and vowel signs, Hebrew points: marks stay inside words.
        assert_eq!(words(words_only(), "हिन्दी தமிழ் שָׁלוֹם"), ["हिन्दी", "தமிழ்", "שָׁלוֹם"]);
        // A supplementary variation selector neither splits a Han run nor becomes a word.
        let t = texts(words_only(), "葛\u{E0100}城");
        assert_eq!(t, [("char", "葛".to_string()), ("char", "葛城".into()), ("char", "城".into())]);
        // "cafe" + U+0301 combining acute; a soft hyphen and a zero-width space inside words.
        assert_eq!(
            words(words_only(), "cafe\u{301} ex\u{AD}ample zero\u{200B}width"),
            ["cafe\u{301}", "example", "zerowidth"]
        );
    }

    #[test]
    fn char_ngrams_use_boundary_markers_and_skip_the_whole_word() {
        let spec = TokenizerSpec {
            word_ngrams: 1,
            char_ngram_min: 2,
            char_ngram_max: 3,
            ..TokenizerSpec::default()
        };
        assert_eq!(
            texts(spec, "abc"),
            [
                ("word", "abc".to_string()),
                ("char", "<a".into()),
                ("char", "<ab".into()),
                ("char", "ab".into()),
                ("char", "abc".into()),
                ("char", "bc".into()),
                ("char", "bc>".into()),
                ("char", "c>".into()),
            ]
        );
        // A one-letter word: "<a>" is the word itself, so only the 2-grams remain.
        let spec = TokenizerSpec {
            word_ngrams: 1,
            char_ngram_min: 2,
            char_ngram_max: 3,
            ..TokenizerSpec::default()
        };
        assert_eq!(
            texts(spec, "a"),
            [("word", "a".to_string()), ("char", "<a".into()), ("char", "a>".into())]
        );
    }

    #[test]
    fn word_ngrams_follow_each_unit() {
        let spec = TokenizerSpec { word_ngrams: 3, ..words_only() };
        assert_eq!(
            texts(spec, "a b c"),
            [
                ("word", "a".to_string()),
                ("word", "b".into()),
                ("word_ngram", "a b".into()),
                ("word", "c".into()),
                ("word_ngram", "b c".into()),
                ("word_ngram", "a b c".into()),
            ]
        );
    }

    #[test]
    fn cjk_runs_give_char_ngrams_not_one_token() {
        let spec = TokenizerSpec { word_ngrams: 2, ..TokenizerSpec::default() };
        let got = texts(spec, "我爱北京 ok");
        assert_eq!(
            got,
            [
                ("char", "我".to_string()),
                ("char", "我爱".into()),
                ("char", "爱".into()),
                ("char", "爱北".into()),
                ("char", "北".into()),
                ("char", "北京".into()),
                ("char", "京".into()),
                ("word", "ok".into()),
            ]
        );
        // Japanese: kana and kanji form one run; CJK punctuation splits runs.
        let got = words(words_only(), "東京へ行きます。はい");
        assert_eq!(got, ["。"]);
        let chars: Vec<String> = texts(words_only(), "東京へ。はい")
            .into_iter()
            .filter(|(k, _)| *k == "char")
            .map(|(_, t)| t)
            .collect();
        assert_eq!(chars, ["東", "東京", "京", "京へ", "へ", "は", "はい", "い"]);
        // Thai has no spaces either.
        let n = Tokenizer::new(words_only()).tokenize("สวัสดีครับ").ids.len();
        assert_eq!(n, 10 + 9);
    }

    #[test]
    fn no_space_run_breaks_word_ngrams() {
        let spec = TokenizerSpec { word_ngrams: 2, ..words_only() };
        let grams: Vec<String> =
            texts(spec, "a 中 b c").into_iter().filter(|(k, _)| *k == "word_ngram").map(|(_, t)| t).collect();
        assert_eq!(grams, ["b c"]);
    }

    #[test]
    fn truncation_counts_units() {
        let spec = TokenizerSpec { max_words: 3, ..words_only() };
        let t = Tokenizer::new(spec.clone()).tokenize("one two three four");
        assert_eq!((t.ids.len(), t.units, t.truncated), (3, 3, true));
        let t = Tokenizer::new(spec.clone()).tokenize("one two three");
        assert_eq!((t.units, t.truncated), (3, false));
        // Exactly max_words units followed by whitespace or dropped punctuation: not cut.
        let t = Tokenizer::new(spec.clone()).tokenize("one two three  \t");
        assert_eq!((t.units, t.truncated), (3, false));
        let drop = TokenizerSpec { punctuation: Punctuation::Drop, ..spec.clone() };
        let t = Tokenizer::new(drop).tokenize("one two three ...!");
        assert_eq!((t.units, t.truncated), (3, false));
        // Characters of a no-space run count one each.
        let t = Tokenizer::new(spec).tokenize("a 北京市");
        assert_eq!((t.units, t.truncated), (3, true));
    }

    #[test]
    fn empty_and_whitespace_text_give_no_ids() {
        let tok = Tokenizer::new(TokenizerSpec::default());
        assert!(tok.tokenize("").ids.is_empty());
        assert!(tok.tokenize(" \t\u{3000} ").ids.is_empty());
    }

    /// Specs with checksums name the same tokenizer when the checksums agree, however the
    /// path was spelled; without checksums, when the paths do.
    #[test]
    fn subword_specs_are_the_same_tokenizer_by_checksum() {
        let spec = |path: &str, checksum: Option<&str>| SubwordSpec {
            path: path.into(),
            max_len: 64,
            checksum: checksum.map(str::to_owned),
            vocab: Some(30522),
        };
        let a = spec("models/minilm/tokenizer.json", Some("00ff"));
        assert_eq!(a, spec("/work/main/models/minilm/./tokenizer.json", Some("00ff")));
        assert_ne!(a, spec("models/minilm/tokenizer.json", Some("00fe")));
        assert_ne!(a, SubwordSpec { max_len: 32, ..a.clone() });
        assert_ne!(a, spec("models/minilm/tokenizer.json", None));
        assert_eq!(spec("x.json", None), spec("x.json", None));
        assert_ne!(spec("x.json", None), spec("./x.json", None));
    }

    /// Golden values: these ids are the on-disk format. If this test fails, the hash, the
    /// segmentation or the defaults changed, and every prepared dataset would silently get
    /// other ids: bump TOKENIZER_ALGORITHM instead of editing the numbers.
    #[test]
    fn golden_hash_values_are_pinned() {
        // The underlying function: XXH3-64 of the empty input with seed 0 (reference value).
        assert_eq!(xxh3_64_with_seed(b"", 0), 0x2D06_8005_38D3_94C2);
        let tok = Tokenizer::new(TokenizerSpec { char_ngram_max: 4, ..TokenizerSpec::default() });
        assert_eq!(tok.tokenize("The jury said, 北京.").ids, GOLDEN_IDS);
        assert_eq!(TokenizerSpec::default().hash(), GOLDEN_SPEC_HASH);
    }

    const GOLDEN_IDS: [u32; 30] = [
        544789, 36077, 1034653, 506113, 568094, 179780, 958192, 697038, 854163, 578410, 683767, 941231,
        484033, 645434, 29612, 656986, 683074, 422690, 286650, 829756, 708684, 394604, 331362, 281055,
        994534, 343614, 276436, 976100, 809813, 369840,
    ];
    const GOLDEN_SPEC_HASH: u64 = 0x8bbc_58df_e80a_26be;
}
