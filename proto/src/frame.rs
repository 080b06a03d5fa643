//! Length-delimited framing: a 4-byte big-endian length, then one encoded
//! `Envelope`. A frame longer than the cap is an error before any of it is
//! buffered, so a peer cannot make a node allocate more than the cap.

use crate::pb::Envelope;
use bytes::{Buf, BufMut, BytesMut};
use prost::Message;
use std::fmt;

/// Largest frame either side sends or accepts (1 MiB): a delta batch or
/// bulk chunk is ~16-64 KiB, so this only stops garbage.
pub const MAX_FRAME: usize = 1 << 20;

const HEADER: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The length prefix exceeds the cap.
    Oversized { len: usize, max: usize },
    /// The body is not a valid Envelope.
    Malformed(String),
    /// A valid Envelope carrying no message (or one this version does not
    /// know: unknown oneof fields decode to nothing).
    Unknown,
    /// The stream ended inside a frame.
    Truncated { buffered: usize },
}

impl FrameError {
    /// Short, stable name for counters and close reasons.
    pub fn kind(&self) -> &'static str {
        match self {
            FrameError::Oversized { .. } => "oversized",
            FrameError::Malformed(_) => "malformed",
            FrameError::Unknown => "unknown",
            FrameError::Truncated { .. } => "truncated",
        }
    }
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Oversized { len, max } => {
                write!(f, "frame of {len} bytes exceeds cap {max}")
            }
            FrameError::Malformed(e) => write!(f, "malformed frame: {e}"),
            FrameError::Unknown => write!(f, "frame carries no known message"),
            FrameError::Truncated { buffered } => {
                write!(f, "stream ended inside a frame ({buffered} bytes buffered)")
            }
        }
    }
}

impl std::error::Error for FrameError {}

/// Appends one frame to `out`.
pub fn encode_frame(msg: &Envelope, out: &mut BytesMut) {
    let len = msg.encoded_len();
    out.reserve(HEADER + len);
    out.put_u32(len as u32);
    msg.encode(out).expect("reserved capacity");
}

/// Reassembles frames from arbitrary chunks of a stream.
pub struct FrameDecoder {
    buf: BytesMut,
    max: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder::new(MAX_FRAME)
    }
}

impl FrameDecoder {
    pub fn new(max: usize) -> FrameDecoder {
        FrameDecoder {
            buf: BytesMut::new(),
            max,
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Envelope>, FrameError> {
        if self.buf.len() < HEADER {
            return Ok(None);
        }
        let len = u32::from_be_bytes(self.buf[..HEADER].try_into().expect("4 bytes")) as usize;
        if len > self.max {
            return Err(FrameError::Oversized { len, max: self.max });
        }
        if self.buf.len() < HEADER + len {
            return Ok(None);
        }
        self.buf.advance(HEADER);
        let body = self.buf.split_to(len).freeze();
        let env = Envelope::decode(body).map_err(|e| FrameError::Malformed(e.to_string()))?;
        if env.msg.is_none() {
            return Err(FrameError::Unknown);
        }
        Ok(Some(env))
    }

    /// Call at end of stream: an incomplete frame is an error.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Truncated {
                buffered: self.buf.len(),
            })
        }
    }

    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::{self, envelope::Msg};
    use proptest::prelude::*;

    fn ack(seq: u64) -> Envelope {
        Envelope {
            msg: Some(Msg::Ack(pb::Ack {
                rg: 1,
                epoch: 2,
                seq,
            })),
        }
    }

    #[test]
    fn frames_survive_any_chunking() {
        let mut wire = BytesMut::new();
        for s in 0..50 {
            encode_frame(&ack(s), &mut wire);
        }
        for chunk in [1, 3, 7, 64, 4096] {
            let mut d = FrameDecoder::default();
            let mut got = Vec::new();
            for c in wire.chunks(chunk) {
                d.push(c);
                while let Some(env) = d.next_frame().unwrap() {
                    got.push(env);
                }
            }
            d.finish().unwrap();
            assert_eq!(
                got,
                (0..50).map(ack).collect::<Vec<_>>(),
                "chunk size {chunk}"
            );
        }
    }

    #[test]
    fn oversized_length_is_refused_before_buffering_the_body() {
        let mut d = FrameDecoder::new(1024);
        d.push(&(1025u32).to_be_bytes());
        assert_eq!(
            d.next_frame(),
            Err(FrameError::Oversized {
                len: 1025,
                max: 1024
            })
        );
    }

    #[test]
    fn garbage_body_is_malformed_not_a_panic() {
        let mut d = FrameDecoder::default();
        d.push(&5u32.to_be_bytes());
        d.push(&[0xff, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(d.next_frame().unwrap_err().kind(), "malformed");
    }

    #[test]
    fn empty_envelope_is_unknown() {
        let mut d = FrameDecoder::default();
        let mut wire = BytesMut::new();
        encode_frame(&Envelope { msg: None }, &mut wire);
        d.push(&wire);
        assert_eq!(d.next_frame(), Err(FrameError::Unknown));
    }

    #[test]
    fn truncated_stream_is_reported() {
        let mut d = FrameDecoder::default();
        let mut wire = BytesMut::new();
        encode_frame(&ack(1), &mut wire);
        d.push(&wire[..wire.len() - 1]);
        assert_eq!(d.next_frame(), Ok(None));
        assert_eq!(d.finish().unwrap_err().kind(), "truncated");
    }

    proptest! {
        /// Random bytes never panic the decoder; every outcome is a frame,
        /// "need more" or a typed error.
        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut d = FrameDecoder::new(4096);
            d.push(&data);
            for _ in 0..64 {
                match d.next_frame() {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }
}
