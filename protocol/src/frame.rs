//! Framing: a 4-byte big-endian length, a 1-byte tag, then the payload. Control messages carry
//! JSON payloads; vectors carry raw little-endian f32 (see `messages`).

use std::io::{Read, Write};

/// Largest frame either side accepts. Texts are sent in chunks of at most `TEXT_CHUNK_BYTES`
/// and vectors in chunks of at most `VECTOR_CHUNK_BYTES`, so only one huge text comes near it.
pub const MAX_FRAME_BYTES: usize = 256 << 20;

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
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len == 0 || len > MAX_FRAME_BYTES {
        return Err(too_large(len));
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    let frame = Frame {
        tag: buf[4],
        payload: buf[5..4 + len].to_vec(),
    };
    Ok(Some((frame, 4 + len)))
}

/// Reads one whole frame, blocking.
pub fn read_frame(input: &mut impl Read) -> std::io::Result<Frame> {
    let mut len = [0u8; 4];
    input.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 || len > MAX_FRAME_BYTES {
        return Err(too_large(len));
    }
    let mut body = vec![0u8; len];
    input.read_exact(&mut body)?;
    Ok(Frame {
        tag: body[0],
        payload: body.split_off(1),
    })
}
