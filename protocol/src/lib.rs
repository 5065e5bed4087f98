//! What nvembed's Postgres backends and its model server share: the wire format (framed
//! messages over a Unix socket, vectors as binary f32) and the constants both sides and the SQL
//! surface must agree on. Knows nothing of Postgres or of the model.

pub mod constants;
mod frame;
mod messages;

pub use constants::*;
pub use frame::{decode_frame, frame_length, read_frame, read_frame_body, write_frame, Frame, MAX_FRAME_BYTES};
pub use messages::*;
