//! Turning (instruction, text) pairs into the exact token ids and masks the reference feeds its
//! model: `instruction + text + "</s>"`, `<s>` prepended by the tokenizer's post-processor,
//! truncated to `max_length` *after* `</s>` is appended (so it can be cut off), right-padded with
//! the eos id, and a pool mask that hides the first L positions, L being the instruction's token
//! count when tokenized alone without special tokens.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::error::{Error, Result};

pub use nvembed_protocol::QUERY_INSTRUCTION;
/// Passages are embedded with no instruction.
pub const PASSAGE_INSTRUCTION: &str = "";
/// The reference's default truncation limit, in tokens including `<s>`.
pub const DEFAULT_MAX_LENGTH: usize = nvembed_protocol::MAX_LENGTH;

/// The instruction for a custom retrieval task, formatted as in the model card.
pub fn task_instruction(task: &str) -> String {
    format!("{}{task}{}", nvembed_protocol::TASK_INSTRUCTION_PREFIX, nvembed_protocol::TASK_INSTRUCTION_SUFFIX)
}

/// One tokenized input, unpadded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedInput {
    pub ids: Vec<u32>,
    /// Leading positions excluded from pooling (the instruction length, capped at `ids.len()`).
    pub masked_prefix: usize,
}

impl EncodedInput {
    /// Positions that contribute to the pooled embedding.
    pub fn pooled_tokens(&self) -> usize {
        self.ids.len().saturating_sub(self.masked_prefix)
    }
}

/// A right-padded batch exactly as the reference builds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaddedBatch {
    pub input_ids: Vec<Vec<u32>>,
    pub attention_mask: Vec<Vec<u32>>,
    pub pool_mask: Vec<Vec<u32>>,
}

/// Tokens past `max_length` that a text cut before tokenizing still yields: BPE merges are
/// local, so the first `max_length` tokens of the cut text are those of the whole text.
pub const CUT_MARGIN_TOKENS: usize = 256;

pub struct InputEncoder {
    tokenizer: Tokenizer,
    pad_id: u32,
    /// Most bytes of text one token can stand for (its piece, with `▁` standing for one space).
    longest_piece_bytes: usize,
}

impl InputEncoder {
    const EOS_TOKEN: &'static str = "</s>";

    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::MissingFile(path.to_path_buf()));
        }
        let tokenizer = Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        // The reference sets pad = eos at load time; the files leave pad unset.
        let pad_id = tokenizer.token_to_id(Self::EOS_TOKEN).ok_or_else(|| Error::Tokenizer {
            path: path.to_path_buf(),
            reason: format!("the vocabulary has no {} token", Self::EOS_TOKEN),
        })?;
        let longest_piece_bytes = tokenizer
            .get_vocab(true)
            .keys()
            .map(|piece| piece.replace('\u{2581}', " ").len())
            .max()
            .unwrap_or(1)
            .max(1);
        Ok(Self {
            tokenizer,
            pad_id,
            longest_piece_bytes,
        })
    }

    /// The part of `text` that can reach the first `max_length` tokens: a text past
    /// `(max_length + CUT_MARGIN_TOKENS)` of the longest pieces is cut there (at a character
    /// boundary) before tokenizing, so the tokenizer's time and memory follow `max_length`, not
    /// the text's size (a tokenizer holds tens of bytes per byte of text).
    fn reachable<'t>(&self, text: &'t str, max_length: usize) -> &'t str {
        let keep = max_length.saturating_add(CUT_MARGIN_TOKENS).saturating_mul(self.longest_piece_bytes);
        if text.len() <= keep {
            return text;
        }
        let mut end = keep;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        &text[..end]
    }

    /// Token count of `instruction` alone, without special tokens.
    pub fn instruction_len(&self, instruction: &str) -> Result<usize> {
        if instruction.is_empty() {
            return Ok(0);
        }
        let encoding = self
            .tokenizer
            .encode(instruction, false)
            .map_err(|e| Error::Encode(e.to_string()))?;
        Ok(encoding.get_ids().len())
    }

    /// Tokenizes each text with `instruction`; the instruction is measured once for all of them.
    pub fn encode(&self, instruction: &str, texts: &[&str], max_length: usize) -> Result<Vec<EncodedInput>> {
        if max_length == 0 {
            return Err(Error::InvalidArgument("max_length must be at least 1".into()));
        }
        let prefix = self.instruction_len(instruction)?;
        texts
            .iter()
            .map(|text| self.encode_one(instruction, prefix, text, max_length))
            .collect()
    }

    /// Tokenizes one text with `instruction`, whose token count (`instruction_len`) is `prefix`.
    pub fn encode_one(&self, instruction: &str, prefix: usize, text: &str, max_length: usize) -> Result<EncodedInput> {
        let full = format!("{instruction}{}{}", self.reachable(text, max_length), Self::EOS_TOKEN);
        let encoding = self
            .tokenizer
            .encode(full.as_str(), true)
            .map_err(|e| Error::Encode(e.to_string()))?;
        let mut ids = encoding.get_ids().to_vec();
        ids.truncate(max_length);
        Ok(EncodedInput {
            masked_prefix: prefix.min(ids.len()),
            ids,
        })
    }

    /// The tokenizer itself (the chunker reads token offsets from it).
    pub(crate) fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Right-pads `inputs` to their longest member.
    pub fn pad(&self, inputs: &[&EncodedInput]) -> PaddedBatch {
        let width = inputs.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        let mut batch = PaddedBatch {
            input_ids: Vec::with_capacity(inputs.len()),
            attention_mask: Vec::with_capacity(inputs.len()),
            pool_mask: Vec::with_capacity(inputs.len()),
        };
        for input in inputs {
            let len = input.ids.len();
            let mut ids = input.ids.clone();
            ids.resize(width, self.pad_id);
            let attention: Vec<u32> = (0..width).map(|i| u32::from(i < len)).collect();
            let pool: Vec<u32> = (0..width)
                .map(|i| u32::from(i < len && i >= input.masked_prefix))
                .collect();
            batch.input_ids.push(ids);
            batch.attention_mask.push(attention);
            batch.pool_mask.push(pool);
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoder() -> InputEncoder {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nvembed-tiny-a/tokenizer.json");
        InputEncoder::from_file(&dir).unwrap()
    }

    #[test]
    fn a_long_text_cut_before_tokenizing_gives_the_tokens_of_the_whole_text() {
        let encoder = encoder();
        assert_eq!(encoder.longest_piece_bytes, 25);
        // Mixed scripts, digits, runs of spaces and punctuation: pieces of every length.
        let pattern = "Le phare balaie l'eau — 灯台の光が海を照らす. Становништво 1234567   spaces!!! ";
        let long = pattern.repeat(4000);
        for max_length in [1, 16, 100, 1000, 5000] {
            let cut = encoder.reachable(&long, max_length);
            assert!(cut.len() < long.len(), "max_length {max_length} did not cut");
            for instruction in ["", QUERY_INSTRUCTION] {
                let whole = encoder.tokenizer.encode(format!("{instruction}{long}</s>").as_str(), true).unwrap();
                let got = &encoder.encode(instruction, &[&long], max_length).unwrap()[0];
                assert_eq!(got.ids.len(), max_length);
                assert_eq!(got.ids, whole.get_ids()[..max_length], "max_length {max_length}");
            }
        }
        // Short texts are never cut.
        assert_eq!(encoder.reachable("short", 1), "short");
    }
}
