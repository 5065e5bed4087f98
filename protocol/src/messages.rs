//! The messages. A connection starts with `Hello` both ways (the build check). A client then
//! asks for `Status`, or says who it is (`Identify`, with a token on a network listener) and is
//! admitted (`Ready`, naming the model served once it is loaded) or refused (`Error`, kind
//! `Busy` for the server's connection limits, `Unauthorized` for a missing or wrong token); an admitted client sends `Embed`
//! followed by `Texts` chunks holding exactly `count` texts, and the server answers `Vectors`
//! chunks in input order and `Done`, or `Error` at any point (also while texts still arrive:
//! an oversized call is refused as soon as its size is known). An admitted client may instead
//! send `Chunk` followed by `Texts`: the server cuts each text by the model's tokenizer and
//! answers `Spans` messages (a text's chunks in order, at most `SPANS_PER_MESSAGE` a message,
//! the last one marked, so every text has one) and, after the last text, `Done`. The server
//! answers a `Texts` message's texts before it reads the next, and a client reads those answers
//! before it sends the next (neither side's socket buffer can fill up with the other waiting).

use serde::{Deserialize, Serialize};

use crate::frame::{write_frame, Frame};

/// Identifies a build of the wire format: a backend and a model server must carry the same one.
/// Raise the protocol number whenever a message changes shape.
pub const BUILD_ID: &str = concat!("nvembed ", env!("CARGO_PKG_VERSION"), ", protocol 5");

/// Texts per `Texts` frame are cut at about this many bytes.
pub const TEXT_CHUNK_BYTES: usize = 1 << 20;
/// Longest text a call may carry, in UTF-8 bytes: its JSON (at most 6 bytes per byte, for
/// escaped control characters) still fits one frame. At most `nvembed.max_length` tokens of
/// it are embedded (32,768 tokens are ~130 KB of English), so only the tokenizer reads more.
pub const MAX_TEXT_BYTES: usize = crate::MAX_FRAME_BYTES / 8;
/// Longest instruction a call may carry, in UTF-8 bytes (the model card's are ~100 bytes):
/// the instruction is tokenized with every text, so its length multiplies a call's cost.
pub const MAX_INSTRUCTION_BYTES: usize = 32 << 10;
/// Longest `Hello`, `Identify`, `Status` or `Embed` frame a server reads: an `Embed` with the
/// longest instruction fits (at most 6 bytes of JSON per byte), and a peer cannot make the
/// server buffer more than this before it has been admitted.
pub const MAX_CONTROL_FRAME_BYTES: usize = 256 << 10;
/// Vectors per `Vectors` frame are cut at about this many bytes: neither side ever holds more
/// than a few such chunks of one call's results.
pub const VECTOR_CHUNK_BYTES: usize = 4 << 20;

/// Rows of `dimension` floats that fit in one vector chunk (at least one).
pub fn vectors_per_chunk(dimension: usize) -> usize {
    (VECTOR_CHUNK_BYTES / (dimension.max(1) * 4)).max(1)
}

/// How the model server schedules a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkClass {
    /// Single-text calls: a search waits for them. They go ahead of bulk work at the next
    /// decoder layer.
    Interactive,
    /// Batch functions, backfill: cut into passes, run whenever no interactive call waits.
    Bulk,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbedHeader {
    pub class: WorkClass,
    pub instruction: String,
    /// Truncation limit in tokens, `<s>` included.
    pub max_length: usize,
    /// Admission: the call is refused before any compute if its texts hold more tokens.
    pub max_request_tokens: usize,
    /// Texts that follow in `Texts` frames.
    pub count: usize,
}

/// A call to cut texts into chunks that fit the model's input (`nvembed_engine::chunk_spans`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkHeader {
    /// The instruction the chunks will be embedded with: it takes its share of `max_tokens`.
    pub instruction: String,
    /// The longest input a chunk may make, in tokens, `<s>` and `</s>` included.
    pub max_tokens: usize,
    /// Tokens consecutive chunks share, at most.
    pub overlap: usize,
    /// Texts that follow in `Texts` frames.
    pub count: usize,
}

/// One chunk of a text: its byte offsets in the text's UTF-8.
pub type Span = (u64, u64);

/// Spans per `Spans` message at most (~1.5 MB of JSON): a text may have as many chunks as
/// bytes, and no message may outgrow a frame.
pub const SPANS_PER_MESSAGE: usize = 1 << 16;

/// Who is calling, for the server's per-role connection limit. On the Unix socket, which only
/// the cluster's OS user can reach, that is all; a network listener also wants a token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The session's login role.
    pub role: String,
    /// Connections this role may hold at once (`nvembed.max_calls_per_role` as set for it);
    /// None: `DEFAULT_ROLE_SHARE` of the server's limit.
    pub role_connections: Option<usize>,
    /// Bearer token for a network listener (`--tokens-file`); unused on the Unix socket.
    pub token: Option<String>,
}

/// Never prints the token.
impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("role", &self.role)
            .field("role_connections", &self.role_connections)
            .field("token", &self.token.as_ref().map(|_| "<hidden>"))
            .finish()
    }
}

/// What a server serves, once its model is loaded: clients that spread calls over several
/// servers refuse one whose vectors would differ from the others'.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Served {
    /// The model's name as the server announces it (`--served-model-name`, default `--model`).
    pub model: String,
    /// Fingerprint of the checkpoint's files (`sha256:…`): equal names with different weights
    /// differ here.
    pub revision: String,
    /// The dtype the weights run in (what `auto` chose).
    pub dtype: String,
    pub device: String,
    pub dimension: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The model could not be loaded (missing or corrupt files, bad config).
    Load,
    /// The request itself is wrong (e.g. nothing left to pool).
    InvalidInput,
    /// The request exceeds an admission limit (`nvembed.max_request_tokens`).
    TooLarge,
    /// The model produced NaN or infinity.
    NonFinite,
    /// Anything else inside the server.
    Internal,
    /// A connection limit (the server's, or the role's) is reached: retry later.
    Busy,
    /// A network listener's token is missing or not accepted.
    Unauthorized,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub loaded: bool,
    pub model: String,
    /// Fingerprint of the loaded checkpoint's files (see `Served`).
    pub revision: Option<String>,
    pub dtype: String,
    pub device: String,
    pub dimension: Option<usize>,
    pub load_seconds: Option<f64>,
    /// Calls answered with vectors.
    pub requests: u64,
    /// Tokens embedded (rows that finished, unpadded).
    pub tokens: u64,
    /// Texts embedded.
    pub rows: u64,
    /// Calls queued or in a pass now.
    pub waiting: u64,
    /// Rows in forward passes now.
    pub active_rows: u64,
    /// Rows dropped part-way because their caller cancelled or hung up.
    pub cancelled_rows: u64,
    /// How many times the supervisor had to start the server again after it died.
    pub restarts: u64,
    /// OS process id of the model server.
    pub pid: u32,
    /// Admitted client connections now.
    pub connections: u64,
    /// Connections refused for a connection limit since the server started.
    pub refused_connections: u64,
    /// Model time spent on each class of work since the server started.
    pub interactive_seconds: f64,
    pub bulk_seconds: f64,
    /// Why the last attempt to load the model failed, while none is loaded (absent from older
    /// servers' answers).
    #[serde(default)]
    pub load_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ClientMessage {
    Hello { build: String },
    Status,
    Identify(Identity),
    Embed(EmbedHeader),
    Chunk(ChunkHeader),
    Texts(Vec<String>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum ServerMessage {
    Hello {
        build: String,
    },
    Status(Status),
    /// The client is admitted: it may send calls. `served` is None while the model is not
    /// loaded (a cluster's own server loads it on the first call).
    Ready {
        served: Option<Served>,
    },
    /// Consecutive vectors of the call, in input order, each `dimension` floats.
    Vectors {
        dimension: usize,
        values: Vec<f32>,
    },
    /// More chunks of text `text` (its index in the call) of a `Chunk` call, in order; `last`
    /// on its last message.
    Spans { text: u64, spans: Vec<Span>, last: bool },
    /// Every vector (or every text's chunks) of the call was sent.
    Done,
    Error {
        kind: ErrorKind,
        message: String,
    },
}

mod tag {
    pub const HELLO: u8 = 1;
    pub const STATUS: u8 = 2;
    pub const EMBED: u8 = 3;
    pub const TEXTS: u8 = 4;
    pub const VECTORS: u8 = 5;
    pub const DONE: u8 = 6;
    pub const ERROR: u8 = 7;
    pub const IDENTIFY: u8 = 8;
    pub const READY: u8 = 9;
    pub const CHUNK: u8 = 10;
    pub const SPANS: u8 = 11;
}

fn invalid(what: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string())
}

fn json<T: Serialize>(value: &T) -> std::io::Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(std::io::Error::other)
}

fn from_json<T: for<'de> Deserialize<'de>>(payload: &[u8]) -> std::io::Result<T> {
    serde_json::from_slice(payload).map_err(invalid)
}

#[derive(Serialize, Deserialize)]
struct ErrorPayload {
    kind: ErrorKind,
    message: String,
}

impl ClientMessage {
    /// The tag of `Texts` frames: the only ones a server lets grow to `MAX_FRAME_BYTES`.
    pub const TEXTS_TAG: u8 = tag::TEXTS;

    /// What the message is, for logs (never its content).
    pub fn name(&self) -> &'static str {
        match self {
            ClientMessage::Hello { .. } => "a handshake",
            ClientMessage::Status => "a status request",
            ClientMessage::Identify(_) => "an identification",
            ClientMessage::Embed(_) => "a call",
            ClientMessage::Chunk(_) => "a chunking call",
            ClientMessage::Texts(_) => "texts",
        }
    }

    pub fn write(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        match self {
            ClientMessage::Hello { build } => write_frame(out, tag::HELLO, build.as_bytes()),
            ClientMessage::Status => write_frame(out, tag::STATUS, &[]),
            ClientMessage::Identify(identity) => write_frame(out, tag::IDENTIFY, &json(identity)?),
            ClientMessage::Embed(header) => write_frame(out, tag::EMBED, &json(header)?),
            ClientMessage::Chunk(header) => write_frame(out, tag::CHUNK, &json(header)?),
            ClientMessage::Texts(texts) => write_frame(out, tag::TEXTS, &json(texts)?),
        }
    }

    pub fn decode(frame: Frame) -> std::io::Result<Self> {
        match frame.tag {
            tag::HELLO => Ok(ClientMessage::Hello {
                build: String::from_utf8(frame.payload).map_err(invalid)?,
            }),
            tag::STATUS => Ok(ClientMessage::Status),
            tag::IDENTIFY => Ok(ClientMessage::Identify(from_json(&frame.payload)?)),
            tag::EMBED => Ok(ClientMessage::Embed(from_json(&frame.payload)?)),
            tag::CHUNK => Ok(ClientMessage::Chunk(from_json(&frame.payload)?)),
            tag::TEXTS => Ok(ClientMessage::Texts(from_json(&frame.payload)?)),
            other => Err(invalid(format!("unexpected message tag {other} from a client"))),
        }
    }
}

impl ServerMessage {
    pub fn write(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        match self {
            ServerMessage::Hello { build } => write_frame(out, tag::HELLO, build.as_bytes()),
            ServerMessage::Status(status) => write_frame(out, tag::STATUS, &json(status)?),
            ServerMessage::Ready { served } => write_frame(out, tag::READY, &json(served)?),
            ServerMessage::Vectors { dimension, values } => {
                let mut payload = Vec::with_capacity(4 + values.len() * 4);
                payload.extend_from_slice(&(*dimension as u32).to_le_bytes());
                for value in values {
                    payload.extend_from_slice(&value.to_le_bytes());
                }
                write_frame(out, tag::VECTORS, &payload)
            }
            ServerMessage::Spans { text, spans, last } => write_frame(out, tag::SPANS, &json(&(text, spans, last))?),
            ServerMessage::Done => write_frame(out, tag::DONE, &[]),
            ServerMessage::Error { kind, message } => write_frame(
                out,
                tag::ERROR,
                &json(&ErrorPayload {
                    kind: *kind,
                    message: message.clone(),
                })?,
            ),
        }
    }

    pub fn decode(frame: Frame) -> std::io::Result<Self> {
        match frame.tag {
            tag::HELLO => Ok(ServerMessage::Hello {
                build: String::from_utf8(frame.payload).map_err(invalid)?,
            }),
            tag::STATUS => Ok(ServerMessage::Status(from_json(&frame.payload)?)),
            tag::READY => Ok(ServerMessage::Ready {
                served: from_json(&frame.payload)?,
            }),
            tag::VECTORS => {
                let payload = frame.payload;
                if payload.len() < 4 || (payload.len() - 4) % 4 != 0 {
                    return Err(invalid("malformed vector chunk"));
                }
                let dimension = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]) as usize;
                let values: Vec<f32> = payload[4..]
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                if dimension == 0 || values.len() % dimension != 0 {
                    return Err(invalid("vector chunk is not a whole number of vectors"));
                }
                Ok(ServerMessage::Vectors { dimension, values })
            }
            tag::SPANS => {
                let (text, spans, last) = from_json(&frame.payload)?;
                Ok(ServerMessage::Spans { text, spans, last })
            }
            tag::DONE => Ok(ServerMessage::Done),
            tag::ERROR => {
                let error: ErrorPayload = from_json(&frame.payload)?;
                Ok(ServerMessage::Error {
                    kind: error.kind,
                    message: error.message,
                })
            }
            other => Err(invalid(format!("unexpected message tag {other} from the model server"))),
        }
    }
}

/// Cuts `texts` into `Texts` messages of about `TEXT_CHUNK_BYTES` each (a longer text travels
/// alone), without copying more than one chunk at a time.
pub fn text_chunks(texts: &[String]) -> impl Iterator<Item = &[String]> {
    let mut rest = texts;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let mut n = 0;
        while n < rest.len() && (n == 0 || bytes + rest[n].len() <= TEXT_CHUNK_BYTES) {
            bytes += rest[n].len();
            n += 1;
        }
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        Some(chunk)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode_frame, read_frame};

    fn round_trip_client(message: ClientMessage) -> ClientMessage {
        let mut buf = Vec::new();
        message.write(&mut buf).unwrap();
        assert!(decode_frame(&buf[..buf.len() - 1]).unwrap().is_none(), "a partial frame waits");
        let (frame, used) = decode_frame(&buf).unwrap().unwrap();
        assert_eq!(used, buf.len());
        ClientMessage::decode(frame).unwrap()
    }

    fn round_trip_server(message: ServerMessage) -> ServerMessage {
        let mut buf = Vec::new();
        message.write(&mut buf).unwrap();
        ServerMessage::decode(read_frame(&mut buf.as_slice()).unwrap()).unwrap()
    }

    #[test]
    fn every_message_round_trips() {
        let header = EmbedHeader {
            class: WorkClass::Bulk,
            instruction: "i\n".into(),
            max_length: 7,
            max_request_tokens: 99,
            count: 2,
        };
        for message in [
            ClientMessage::Hello { build: BUILD_ID.into() },
            ClientMessage::Status,
            ClientMessage::Identify(Identity {
                role: "app".into(),
                role_connections: Some(3),
                token: Some("secret-token".into()),
            }),
            ClientMessage::Embed(header),
            ClientMessage::Chunk(ChunkHeader {
                instruction: "q: ".into(),
                max_tokens: 512,
                overlap: 64,
                count: 3,
            }),
            ClientMessage::Texts(vec!["a".into(), "é\u{0}".into()]),
        ] {
            assert_eq!(round_trip_client(message.clone()), message);
        }
        let values = vec![0.1f32, -1.0e-7, 3.4028235e38, f32::MIN_POSITIVE, -0.0, 1.0];
        for message in [
            ServerMessage::Hello { build: "other".into() },
            ServerMessage::Status(Status {
                model: "m".into(),
                pid: 7,
                ..Status::default()
            }),
            ServerMessage::Vectors { dimension: 3, values },
            ServerMessage::Done,
            ServerMessage::Spans {
                text: 2,
                spans: vec![(0, 5), (3, 9), (2, 1 << 40)],
                last: true,
            },
            ServerMessage::Ready { served: None },
            ServerMessage::Ready {
                served: Some(Served {
                    model: "nvidia/NV-Embed-v2".into(),
                    revision: "sha256:0123".into(),
                    dtype: "bf16".into(),
                    device: "cuda".into(),
                    dimension: 4096,
                }),
            },
            ServerMessage::Error {
                kind: ErrorKind::TooLarge,
                message: "m".into(),
            },
        ] {
            assert_eq!(round_trip_server(message.clone()), message);
        }
    }

    #[test]
    fn an_identity_never_prints_its_token() {
        let identity = Identity {
            role: "app".into(),
            role_connections: None,
            token: Some("secret-token".into()),
        };
        let printed = format!("{identity:?} {:?}", ClientMessage::Identify(identity.clone()));
        assert!(!printed.contains("secret-token") && printed.contains("<hidden>"), "{printed}");
    }

    #[test]
    fn vectors_travel_as_four_bytes_per_float_bit_exact() {
        let values: Vec<f32> = (0..4096).map(|i| (i as f32 * 0.37).sin() / 7.0).collect();
        let mut buf = Vec::new();
        ServerMessage::Vectors {
            dimension: 4096,
            values: values.clone(),
        }
        .write(&mut buf)
        .unwrap();
        assert_eq!(buf.len(), 4 + 1 + 4 + 4096 * 4);
        match round_trip_server(ServerMessage::Vectors {
            dimension: 4096,
            values: values.clone(),
        }) {
            ServerMessage::Vectors { values: got, .. } => {
                assert!(got.iter().zip(&values).all(|(a, b)| a.to_bits() == b.to_bits()))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(vectors_per_chunk(4096), 256);
        assert_eq!(vectors_per_chunk(1 << 30), 1);
    }

    #[test]
    fn malformed_frames_are_errors() {
        let mut garbage: &[u8] = &[0xff, 0xff, 0xff, 0xff, 1, 2];
        assert!(read_frame(&mut garbage).is_err());
        assert!(decode_frame(&[0, 0, 0, 0]).is_err());
        let frame = crate::Frame {
            tag: 5,
            payload: vec![3, 0, 0, 0, 1, 2, 3, 4],
        };
        assert!(ServerMessage::decode(frame).is_err(), "one float is not a 3-float vector");
        let frame = crate::Frame {
            tag: 42,
            payload: vec![],
        };
        assert!(ClientMessage::decode(frame).is_err());
    }

    #[test]
    fn texts_are_cut_into_bounded_chunks_in_order() {
        let big = "x".repeat(TEXT_CHUNK_BYTES + 5);
        let texts: Vec<String> = vec![
            "a".into(),
            big.clone(),
            "b".repeat(TEXT_CHUNK_BYTES / 2),
            "c".repeat(TEXT_CHUNK_BYTES / 2),
            "d".into(),
        ];
        let chunks: Vec<&[String]> = text_chunks(&texts).collect();
        assert_eq!(chunks.iter().map(|c| c.len()).collect::<Vec<_>>(), vec![1, 1, 2, 1]);
        assert_eq!(chunks.concat(), texts);
        assert_eq!(text_chunks(&[]).count(), 0);
    }
}
