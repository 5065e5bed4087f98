//! Framing: a 4-byte big-endian length, a 1-byte tag, then the payload. Control messages carry
//! JSON payloads; vectors carry raw little-endian f32 (see `messages`).

use std::io::{Read, Write};

/// Largest frame either side accepts. Texts are sent in chunks of at most `TEXT_CHUNK_BYTES`
/// and vectors in chunks of at most `VECTOR_CHUNK_BYTES`, so only one huge text comes near it
/// (`MAX_TEXT_BYTES`).
pub const MAX_FRAME_BYTES: usize = 64 << 20;

/// A reader's buffer grows by at most this much ahead of the bytes that arrived, so a length
/// prefix alone (a peer that announces 64 MiB and sends nothing) costs no memory.
const READ_STEP_BYTES: usize = 64 << 10;

/// One undecoded message: its tag and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    pub payload: Vec<u8>,
}

fn too_large(len: usize) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("frame of {len} bytes exceeds the limit of {MAX_FRAME_BYTES}"),
    )
}

/// Writes one frame.
pub fn write_frame(out: &mut impl Write, tag: u8, payload: &[u8]) -> std::io::Result<()> {
    let len = payload.len() + 1;
    if len > MAX_FRAME_BYTES {
        return Err(too_large(len));
    }
    out.write_all(&(len as u32).to_be_bytes())?;
    out.write_all(&[tag])?;
    out.write_all(payload)?;
    out.flush()
}

/// Splits a buffer into a frame and the bytes it used, or None if the buffer does not yet hold a
/// whole frame. Used by readers that must not block (Postgres backends).
pub fn decode_frame(buf: &[u8]) -> std::io::Result<Option<(Frame, usize)>> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = frame_length([buf[0], buf[1], buf[2], buf[3]])?;
    if buf.len() < 4 + len {
        return Ok(None);
    }
    let frame = Frame {
        tag: buf[4],
        payload: buf[5..4 + len].to_vec(),
    };
    Ok(Some((frame, 4 + len)))
}

/// The length a frame header announces (tag included), checked against the limit.
pub fn frame_length(header: [u8; 4]) -> std::io::Result<usize> {
    let len = u32::from_be_bytes(header) as usize;
    if len == 0 || len > MAX_FRAME_BYTES {
        return Err(too_large(len));
    }
    Ok(len)
}

/// Reads the `len` bytes (tag and payload) of a frame whose header was read; memory grows with
/// the bytes that arrive, not with what the length prefix announced.
pub fn read_frame_body(input: &mut impl Read, len: usize) -> std::io::Result<Frame> {
    let mut body = Vec::with_capacity(len.min(READ_STEP_BYTES));
    while body.len() < len {
        let have = body.len();
        body.resize(len.min(have + READ_STEP_BYTES), 0);
        input.read_exact(&mut body[have..])?;
    }
    Ok(Frame {
        tag: body[0],
        payload: body.split_off(1),
    })
}

/// Reads one whole frame, blocking.
pub fn read_frame(input: &mut impl Read) -> std::io::Result<Frame> {
    let mut header = [0u8; 4];
    input.read_exact(&mut header)?;
    read_frame_body(input, frame_length(header)?)
}
