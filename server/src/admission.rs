//! Admission: a call is tokenized and measured before it may use the model, so one call cannot
//! hold the model for longer than the administrator allows (`nvembed.max_request_tokens`), and
//! inputs the model cannot pool fail before any compute. Texts are counted one by one as they
//! arrive, so a call is refused as soon as what arrived is too much: the rest is never read or
//! tokenized.

use nvembed_engine::{Embedder, EncodedInput, Error, TextEncoder};
use nvembed_protocol::{EmbedHeader, ErrorKind, MAX_INSTRUCTION_BYTES};

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

/// Refuses a call whose instruction is too long, or whose text count alone exceeds the token
/// limit, before any text is read.
pub fn check_count(header: &EmbedHeader) -> Result<(), Refusal> {
    if header.instruction.len() > MAX_INSTRUCTION_BYTES {
        return Err((
            ErrorKind::TooLarge,
            format!(
                "an instruction of {} bytes is longer than the {MAX_INSTRUCTION_BYTES} bytes an instruction may have",
                header.instruction.len()
            ),
        ));
    }
    let least = header.count.saturating_mul(MIN_TOKENS_PER_TEXT);
    if least > header.max_request_tokens {
        return Err(too_large(least, header.count == 0, header));
    }
    Ok(())
}

/// Texts between two checks whether the caller gave up.
const TEXTS_PER_CHECK: usize = 64;

fn refusal(e: Error) -> Refusal {
    let kind = match e {
        Error::NothingToPool { .. } | Error::InvalidArgument(_) | Error::Encode(_) => ErrorKind::InvalidInput,
        _ => ErrorKind::Internal,
    };
    (kind, e.to_string())
}

/// Why texts were not added: refused (the reason for the client), or the client left.
pub enum Stop {
    Refused(Refusal),
    Gone,
}

/// A call's texts, tokenized one by one as they arrive.
pub struct Admission<'a> {
    encoder: TextEncoder<'a>,
    header: &'a EmbedHeader,
    inputs: Vec<EncodedInput>,
    tokens: usize,
}

impl<'a> Admission<'a> {
    /// Fails at once when the instruction alone leaves nothing to pool or `max_length` is
    /// beyond the model.
    pub fn new(embedder: &'a Embedder, header: &'a EmbedHeader) -> Result<Self, Refusal> {
        Ok(Self {
            encoder: embedder.text_encoder(&header.instruction, header.max_length).map_err(refusal)?,
            header,
            inputs: Vec::new(),
            tokens: 0,
        })
    }

    /// Texts admitted so far.
    pub fn received(&self) -> usize {
        self.inputs.len()
    }

    /// Tokenizes the next texts of the call, checking the call's size after each text (the
    /// texts still to come count at their least) and, every few texts, `gave_up`.
    pub fn add(&mut self, texts: &[String], gave_up: impl Fn() -> bool) -> Result<(), Stop> {
        for (n, text) in texts.iter().enumerate() {
            if n > 0 && n % TEXTS_PER_CHECK == 0 && gave_up() {
                return Err(Stop::Gone);
            }
            let input = self
                .encoder
                .encode(self.inputs.len(), text)
                .map_err(|e| Stop::Refused(refusal(e)))?;
            self.tokens += input.ids.len();
            self.inputs.push(input);
            let still_to_come = self.header.count.saturating_sub(self.inputs.len());
            let least = self.tokens + still_to_come * MIN_TOKENS_PER_TEXT;
            if least > self.header.max_request_tokens {
                return Err(Stop::Refused(too_large(least, still_to_come == 0, self.header)));
            }
        }
        Ok(())
    }

    /// The call's inputs, once all its texts were added.
    pub fn finish(self) -> Vec<EncodedInput> {
        self.inputs
    }
}
