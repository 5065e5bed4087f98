//! Admission: a call is tokenized and measured before it may use the model, so one call cannot
//! hold the model for longer than the administrator allows (`nvembed.max_request_tokens`), and
//! inputs the model cannot pool fail before any compute. Texts are counted as they arrive, so a
//! call is refused as soon as what arrived is too much: the rest is never read or tokenized.

use nvembed_engine::{Embedder, EncodedInput, Error};
use nvembed_protocol::{EmbedHeader, ErrorKind};

/// Why a call was not admitted: the error kind and message sent to the client.
pub type Refusal = (ErrorKind, String);

/// Fewest tokens a poolable text has: `<s>` and at least one pooled token (`</s>` at least).
pub const MIN_TOKENS_PER_TEXT: usize = 2;

/// `tokens` is exact when every text was counted, else the least the call can hold.
fn too_large(tokens: usize, exact: bool, header: &EmbedHeader) -> Refusal {
    let at_least = if exact { "" } else { "at least " };
    (
        ErrorKind::TooLarge,
        format!(
            "the call submits {at_least}{tokens} tokens in {} texts, more than nvembed.max_request_tokens ({})",
            header.count, header.max_request_tokens
        ),
    )
}

/// Refuses a call whose text count alone exceeds the token limit, before any text is read.
pub fn check_count(header: &EmbedHeader) -> Result<(), Refusal> {
    let least = header.count.saturating_mul(MIN_TOKENS_PER_TEXT);
    if least > header.max_request_tokens {
        return Err(too_large(least, header.count == 0, header));
    }
    Ok(())
}

/// A call's texts, tokenized chunk by chunk as they arrive.
pub struct Admission<'a> {
    embedder: &'a Embedder,
    header: &'a EmbedHeader,
    inputs: Vec<EncodedInput>,
    tokens: usize,
}

impl<'a> Admission<'a> {
    pub fn new(embedder: &'a Embedder, header: &'a EmbedHeader) -> Self {
        Self {
            embedder,
            header,
            inputs: Vec::new(),
            tokens: 0,
        }
    }

    /// Texts admitted so far.
    pub fn received(&self) -> usize {
        self.inputs.len()
    }

    /// Tokenizes the next texts of the call and checks the call's size so far.
    pub fn add(&mut self, texts: &[String]) -> Result<(), Refusal> {
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let offset = self.inputs.len();
        let inputs = self
            .embedder
            .encode(&self.header.instruction, &refs, self.header.max_length)
            .map_err(|e| match e {
                // Row numbers count from the call's first text, not the chunk's.
                Error::NothingToPool { index, tokens } => Error::NothingToPool {
                    index: index + offset,
                    tokens,
                },
                other => other,
            })
            .map_err(|e| {
                let kind = match e {
                    Error::NothingToPool { .. } | Error::InvalidArgument(_) | Error::Encode(_) => ErrorKind::InvalidInput,
                    _ => ErrorKind::Internal,
                };
                (kind, e.to_string())
            })?;
        self.tokens += inputs.iter().map(|input| input.ids.len()).sum::<usize>();
        self.inputs.extend(inputs);
        // The texts still to come count at their least.
        let still_to_come = self.header.count.saturating_sub(self.inputs.len());
        let least = self.tokens + still_to_come * MIN_TOKENS_PER_TEXT;
        if least > self.header.max_request_tokens {
            return Err(too_large(least, still_to_come == 0, self.header));
        }
        Ok(())
    }

    /// The call's inputs, once all its texts were added.
    pub fn finish(self) -> Vec<EncodedInput> {
        self.inputs
    }
}
