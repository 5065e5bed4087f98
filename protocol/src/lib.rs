//! The wire format between nvembed's Postgres backends and its model server: length-prefixed
//! JSON frames over a Unix socket. Shared by both sides so they cannot drift apart; knows
//! nothing of Postgres or of the model.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

/// File name of the model server's socket, relative to the data directory (the working directory
/// of every Postgres process). Relative, so long data-directory paths never hit the 108-byte
/// limit of socket addresses; private, because the data directory is mode 0700.
pub const SOCKET_NAME: &str = "nvembed.sock";

/// Largest frame either side accepts: 32768 tokens of text is a few hundred KB, a batch of them
/// a few MB; anything far beyond is not a request from us.
pub const MAX_FRAME_BYTES: usize = 256 << 20;

/// Which model to serve; a request naming another one makes the server reload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Directory or hub id.
    pub model: String,
    /// f32, f16 or bf16.
    pub dtype: String,
    /// cpu or cuda.
    pub device: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    Embed {
        spec: ModelSpec,
        instruction: String,
        texts: Vec<String>,
        max_length: usize,
    },
    Status,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The model could not be loaded (missing or corrupt files, bad config).
    Load,
    /// The request itself is wrong (e.g. nothing left to pool).
    InvalidInput,
    /// Anything else inside the server.
    Internal,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub loaded: bool,
    pub model: Option<String>,
    pub dtype: Option<String>,
    pub device: Option<String>,
    pub dimension: Option<usize>,
    pub load_seconds: Option<f64>,
    pub requests: u64,
    pub tokens: u64,
    pub waiting: u64,
    /// How many times the supervisor had to start the server again after it died.
    pub restarts: u64,
    /// OS process id of the model server.
    pub pid: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Response {
    Embeddings(Vec<Vec<f32>>),
    Status(Status),
    Error { kind: ErrorKind, message: String },
}

/// Writes one frame: a 4-byte big-endian length, then that many bytes of JSON.
pub fn write_frame<T: Serialize>(out: &mut impl Write, value: &T) -> std::io::Result<()> {
    let body = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    if body.len() > MAX_FRAME_BYTES {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "frame too large"));
    }
    out.write_all(&(body.len() as u32).to_be_bytes())?;
    out.write_all(&body)?;
    out.flush()
}

/// Splits a buffer into a decoded frame and the number of bytes it used, or None if the buffer
/// does not yet hold a whole frame. Used by readers that must not block (Postgres backends).
pub fn decode_frame<T: for<'de> Deserialize<'de>>(buf: &[u8]) -> std::io::Result<Option<(T, usize)>> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "frame too large"));
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    let value = serde_json::from_slice(&buf[4..4 + len]).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    Ok(Some((value, 4 + len)))
}

/// Reads one whole frame, blocking.
pub fn read_frame<T: for<'de> Deserialize<'de>>(input: &mut impl Read) -> std::io::Result<T> {
    let mut len = [0u8; 4];
    input.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "frame too large"));
    }
    let mut body = vec![0u8; len];
    input.read_exact(&mut body)?;
    serde_json::from_slice(&body).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_partial_buffers_wait() {
        let request = Request::Embed {
            spec: ModelSpec {
                model: "m".into(),
                dtype: "f32".into(),
                device: "cpu".into(),
            },
            instruction: "i".into(),
            texts: vec!["a".into(), "é".into()],
            max_length: 7,
        };
        let mut buf = Vec::new();
        write_frame(&mut buf, &request).unwrap();
        assert!(decode_frame::<Request>(&buf[..buf.len() - 1]).unwrap().is_none());
        let (decoded, used) = decode_frame::<Request>(&buf).unwrap().unwrap();
        assert_eq!(used, buf.len());
        assert!(matches!(decoded, Request::Embed { max_length: 7, .. }));
        let vectors = Response::Embeddings(vec![vec![0.1f32, -1.0e-7, 3.4028235e38]]);
        let mut buf = Vec::new();
        write_frame(&mut buf, &vectors).unwrap();
        match read_frame::<Response>(&mut buf.as_slice()).unwrap() {
            Response::Embeddings(v) => assert_eq!(v, vec![vec![0.1f32, -1.0e-7, 3.4028235e38]]),
            other => panic!("{other:?}"),
        }
        let mut garbage: &[u8] = &[0xff, 0xff, 0xff, 0xff, 1, 2];
        assert!(read_frame::<Request>(&mut garbage).is_err());
    }
}
