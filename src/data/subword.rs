//! Subword tokenization for encoder models: a Hugging Face `tokenizer.json` (WordPiece,
//! BPE, Unigram) through the `tokenizers` crate, with the model's special tokens and
//! truncation to the model's length.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Refuses a tokenizer that does not frame every text as one opening special token, the
/// text's tokens, and one closing special token (BERT's `[CLS] … [SEP]`, added by the
/// tokenizer's `post_processor`). The encoders rely on that frame: [CLS] pooling reads the
/// first id, truncation keeps the last, and augmentation and masked-LM leave both in place;
/// without it they would silently pool, keep and protect ordinary words.
fn check_frame(inner: &tokenizers::Tokenizer, path: &Path) -> Result<()> {
    let enc = inner
        .encode("a b", true)
        .map_err(|e| Error::bad_file(path, format!("cannot encode a test text: {e}")))?;
    let special = enc.get_special_tokens_mask();
    let n = special.len();
    let framed =
        n >= 3 && special[0] == 1 && special[n - 1] == 1 && special[1..n - 1].iter().all(|&s| s == 0);
    if framed {
        return Ok(());
    }
    Err(Error::bad_file(
        path,
        format!(
            "the tokenizer does not wrap a text in one opening and one closing special token \
             (BERT's [CLS] … [SEP], added by its post_processor): \"a b\" encodes to {:?} with \
             special-token mask {special:?}; dtrain's encoders pool, truncate, augment and mask \
             around those two tokens",
            enc.get_tokens()
        ),
    ))
}

/// A pretrained model's tokenizer.
#[derive(Clone)]
pub struct SubwordTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    /// The padding id (`[PAD]`, else 0).
    pub pad: u32,
    /// The unknown token's id (the model's own setting, else `[UNK]` or `<unk>`), if any.
    unk: Option<u32>,
    /// The ids of the special tokens ([CLS], [SEP], [PAD], …).
    specials: std::collections::HashSet<u32>,
}

impl SubwordTokenizer {
    /// Reads `tokenizer.json`.
    pub fn open(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::bad_file(path, "not found (launch/fetch-model minilm writes models/minilm/)"));
        }
        let mut inner = tokenizers::Tokenizer::from_file(path).map_err(|e| {
            // The library's message speaks of its own parse ("expected `,` or `}`" of a
            // valid JSON file); a JSON file that is some other document (no `model` with a
            // `vocab`, as every tokenizer.json has) is said to be one.
            let other_json = std::fs::read(path)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .filter(|v| v.get("model").and_then(|m| m.get("vocab")).is_none());
            match other_json {
                Some(_) => Error::bad_file(
                    path,
                    "is JSON but not a Hugging Face tokenizer.json (it has no `model` with a `vocab`): \
                     name the tokenizer.json beside the model's config.json",
                ),
                None => Error::bad_file(path, format!("not a Hugging Face tokenizer.json: {e}")),
            }
        })?;
        if inner.get_vocab_size(true) == 0 {
            return Err(Error::bad_file(
                path,
                "the tokenizer's vocabulary is empty: it needs at least one id",
            ));
        }
        // Batches are padded by the encoder's own batching, and cut by `encode`.
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| Error::bad_file(path, format!("cannot turn truncation off: {e}")))?;
        check_frame(&inner, path)?;
        // Ids index the model's embedding rows: they must lie below the vocabulary size, the
        // vocabulary's and those the post_processor adds ([CLS], [SEP]).
        let size = inner.get_vocab_size(true);
        if let Some((token, id)) = inner.get_vocab(true).into_iter().find(|&(_, id)| id as usize >= size) {
            return Err(Error::bad_file(
                path,
                format!("token {token:?} has id {id}, not below the vocabulary's {size} tokens: the ids have gaps"),
            ));
        }
        let framed = inner.encode("a b", true).map(|e| e.get_ids().to_vec()).unwrap_or_default();
        if let Some(id) = framed.iter().find(|&&id| id as usize >= size) {
            return Err(Error::bad_file(
                path,
                format!(
                    "its post_processor adds id {id}, not below the vocabulary's {size} tokens: its special_tokens' ids are wrong"
                ),
            ));
        }
        let pad = inner.token_to_id("[PAD]").or_else(|| inner.token_to_id("<pad>")).unwrap_or(0);
        use tokenizers::models::ModelWrapper;
        let named = match inner.get_model() {
            ModelWrapper::WordPiece(m) => Some(m.unk_token.clone()),
            ModelWrapper::WordLevel(m) => Some(m.unk_token.clone()),
            ModelWrapper::BPE(m) => m.unk_token.clone(),
            ModelWrapper::Unigram(_) => None,
        };
        let unk = named
            .iter()
            .map(String::as_str)
            .chain(["[UNK]", "<unk>", "<UNK>"])
            .find_map(|t| inner.token_to_id(t));
        // [UNK] is listed among the special tokens too, but stands for text.
        let specials = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|&(id, ref t)| t.special && Some(id) != unk)
            .map(|(id, _)| id)
            .collect();
        Ok(SubwordTokenizer { inner, path: path.to_path_buf(), pad, unk, specials })
    }

    /// The tokenizer a data set or checkpoint names: the file at `spec.path`, refused unless
    /// its checksum is the recorded one (ids from another tokenizer would be silently
    /// wrong).
    pub fn for_spec(spec: &crate::data::tokenize::SubwordSpec) -> Result<Self> {
        let path = Path::new(&spec.path);
        let bytes = std::fs::read(path).map_err(|e| {
            Error::bad_file(
                path,
                format!("cannot read the subword tokenizer the model was trained with: {e}"),
            )
        })?;
        let sum = crate::data::manifest::hex64(xxhash_rust::xxh3::xxh3_64(&bytes));
        if let Some(want) = &spec.checksum {
            if *want != sum {
                return Err(Error::bad_file(
                    path,
                    format!(
                        "checksum {sum}, not the {want} of the tokenizer.json the model was trained with"
                    ),
                ));
            }
        }
        Self::open(path)
    }

    /// The id of token `token` (e.g. `[MASK]`), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The ids of an empty text: the special tokens alone ([CLS] [SEP] for BERT).
    pub fn specials(&self) -> Vec<u32> {
        self.inner.encode("", true).map(|e| e.get_ids().to_vec()).unwrap_or_default()
    }

    /// Of the ids [`SubwordTokenizer::encode`] gave a document: how many are its text's (not
    /// special tokens), and how many of those are the unknown token, when the vocabulary
    /// has one.
    pub fn count_text_ids(&self, ids: &[u32]) -> (u64, u64) {
        let text = ids.iter().filter(|i| !self.specials.contains(i));
        let (mut all, mut unknown) = (0, 0);
        for &i in text {
            all += 1;
            unknown += u64::from(Some(i) == self.unk);
        }
        (all, unknown)
    }

    /// The token `id` stands for (for `dtrain inspect --explain`).
    pub fn token(&self, id: u32) -> String {
        self.inner.id_to_token(id).unwrap_or_else(|| format!("<id {id}>"))
    }

    /// The vocabulary size (ids are below it), special tokens included.
    pub fn vocab_size(&self) -> u32 {
        self.inner.get_vocab_size(true) as u32
    }

    /// Whether [`SubwordTokenizer::encode`] cut `text`, given the ids it returned.
    pub fn was_cut(&self, text: &str, kept: usize, max_len: usize) -> bool {
        let read = head(text, max_len);
        kept == max_len
            && (read.len() < text.len()
                || self.inner.encode(read, true).is_ok_and(|e| e.get_ids().len() > max_len))
    }

    /// The ids of `text` with the model's special tokens ([CLS] … [SEP] for BERT), cut to
    /// `max_len` ids keeping the last (closing) special token; none when the text has no
    /// token of its own (only characters the tokenizer drops, such as a zero-width space or
    /// lone combining accents).
    pub fn encode(&self, text: &str, max_len: usize) -> Result<Vec<u32>> {
        let read = head(text, max_len);
        let enc = self.inner.encode(read, true).map_err(|e| {
            let shown: String = read.chars().take(200).collect();
            Error::bad_file(&self.path, format!("cannot encode {shown:?}…: {e}"))
        })?;
        if enc.get_special_tokens_mask().iter().all(|&special| special == 1) {
            return Ok(Vec::new());
        }
        let mut ids = enc.get_ids().to_vec();
        if ids.len() > max_len && max_len > 0 {
            let last = ids[ids.len() - 1];
            ids.truncate(max_len - 1);
            ids.push(last);
        }
        Ok(ids)
    }
}

/// Bytes of text read per id of `max_len`: encoding stops reading a text there, so that a
/// huge line costs memory for what is kept (a 50 MB line once took 5 GB). The first
/// `max_len` tokens lie within it unless they average over a kilobyte each (runs of
/// whitespace that long); a word longer than the tokenizer's limit (100 characters for BERT)
/// is one unknown token, cut or not.
const BYTES_PER_ID: usize = 1024;

/// The part of `text` that encoding to `max_len` ids reads (all of it when `max_len` is 0).
fn head(text: &str, max_len: usize) -> &str {
    let limit = max_len.saturating_mul(BYTES_PER_ID);
    if max_len == 0 || text.len() <= limit {
        return text;
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A huge text is read only as far as its kept ids can lie: the same ids as the whole
    /// text's, marked cut; the cut falls on a character boundary.
    #[test]
    fn a_huge_text_is_encoded_from_its_head() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/minilm/tokenizer.json");
        let tok = SubwordTokenizer::open(&path).unwrap();
        let text = "the jury said é ".repeat(50_000);
        let ids = tok.encode(&text, 16).unwrap();
        let whole = tok.inner.encode(text.as_str(), true).unwrap().get_ids().to_vec();
        assert_eq!(ids[..15], whole[..15]);
        assert_eq!(ids.len(), 16);
        assert!(tok.was_cut(&text, ids.len(), 16));
        assert!(head(&text, 16).len() <= 16 * BYTES_PER_ID);
        assert_eq!(head("é", 0), "é");
        let accents = "é".repeat(1000);
        assert!(head(&accents, 1).len() <= BYTES_PER_ID && head(&accents, 1).chars().all(|c| c == 'é'));
    }
}
