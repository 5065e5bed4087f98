//! nvembed's model server: one process holding one model for every Postgres session.
//!
//! `connection` speaks the protocol with one client per thread, on the Unix socket or, through
//! `native` and `tls`, on TCP in TLS (handshake, texts in, vectors
//! out in input order, hang-up detection); `limits` bounds what clients may hold (connections,
//! per role and in all; text bytes before tokenizing); `admission` refuses oversized calls as
//! soon as their size is known, before any compute; `scheduler` owns the model's time (interactive before bulk, layer by layer, dropping
//! the rows of callers that left); `model` loads the model once, lazily or at start; `http` is
//! the OpenAI-compatible API, `tokens` the network clients' bearer tokens.

pub mod admission;
pub mod connection;
pub mod crash;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod native;
pub mod scheduler;
pub mod stats;
pub mod tls;
pub mod tokens;
