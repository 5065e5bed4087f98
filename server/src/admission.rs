//! Admission: a call is tokenized and measured before it may use the model, so one call cannot
//! hold the model for longer than the administrator allows (`nvembed.max_request_tokens`), and
//! inputs the model cannot pool fail before any compute.

use nvembed_engine::{Embedder, EncodedInput, Error};
use nvembed_protocol::{EmbedHeader, ErrorKind};

/// Why a call was not admitted: the error kind and message sent to the client.
pub type Refusal = (ErrorKind, String);

/// Tokenizes `texts` as `header` says and checks the call's size.
pub fn admit(embedder: &Embedder, header: &EmbedHeader, texts: &[String]) -> Result<Vec<EncodedInput>, Refusal> {
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let inputs = embedder
        .encode(&header.instruction, &refs, header.max_length)
        .map_err(|e| {
            let kind = match e {
                Error::NothingToPool { .. } | Error::InvalidArgument(_) | Error::Encode(_) => ErrorKind::InvalidInput,
                _ => ErrorKind::Internal,
            };
            (kind, e.to_string())
        })?;
    let tokens: usize = inputs.iter().map(|input| input.ids.len()).sum();
    if tokens > header.max_request_tokens {
        return Err((
            ErrorKind::TooLarge,
            format!(
                "the call submits {tokens} tokens in {} texts, more than nvembed.max_request_tokens ({})",
                inputs.len(),
                header.max_request_tokens
            ),
        ));
    }
    Ok(inputs)
}
