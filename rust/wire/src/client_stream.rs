//! Client-to-server chunk framing for the relay: complete messages are forwarded,
//! an incomplete one is held back until its last byte arrives (so a policy can still
//! refuse it), and CopyData bodies stream through as they come.

use crate::error::Result;
use crate::forward::OutBuf;
use crate::framer::{parse_header, HEADER_LEN};
use crate::frontend::tag;

#[derive(Debug, Clone, Copy)]
enum State {
    /// Between messages (or collecting a header into `held`).
    Boundary,
    /// Collecting the body of a message into `held` (header already there).
    Holding { tag: u8, body_len: usize },
    /// Passing through the rest of a CopyData body.
    Streaming { remaining: usize },
}

/// Frames client chunks.  `held` keeps the bytes of one incomplete message between
/// calls; its growth follows the bytes received, never the announced length.
#[derive(Debug)]
pub(crate) struct ClientStream {
    state: State,
    held: Vec<u8>,
    max_len: usize,
}

/// Releases the hold buffer after a large message instead of pinning its memory.
const KEEP_CAPACITY: usize = 64 * 1024;

impl ClientStream {
    pub(crate) fn new(max_len: usize) -> Self {
        ClientStream {
            state: State::Boundary,
            held: Vec::new(),
            max_len,
        }
    }

    /// Frames `input`, forwarding into `out`; `on_message(tag, body, start, end)` is
    /// called for each complete message (CopyData excepted) with its range in `out`, and
    /// may return a whole message to forward in its place.
    pub(crate) fn feed<F>(
        &mut self,
        input: &[u8],
        out: &mut OutBuf,
        mut on_message: F,
    ) -> Result<()>
    where
        F: FnMut(u8, &[u8], usize, usize) -> Result<Option<Vec<u8>>>,
    {
        let n = input.len();
        let mut pos = 0;
        while pos < n {
            match self.state {
                State::Streaming { remaining } => {
                    let take = remaining.min(n - pos);
                    out.pass(input, pos, pos + take);
                    pos += take;
                    self.state = if take == remaining {
                        State::Boundary
                    } else {
                        State::Streaming {
                            remaining: remaining - take,
                        }
                    };
                }
                State::Boundary if self.held.is_empty() => {
                    // Fast path: the header is in this chunk.
                    let Some(header) = input.get(pos..pos + HEADER_LEN) else {
                        self.held.extend_from_slice(&input[pos..]);
                        pos = n;
                        continue;
                    };
                    let header: [u8; HEADER_LEN] = header.try_into().expect("5 bytes");
                    let (tag, body_len) = parse_header(header, self.max_len)?;
                    if tag == tag::COPY_DATA {
                        out.pass(input, pos, pos + HEADER_LEN);
                        pos += HEADER_LEN;
                        if body_len > 0 {
                            self.state = State::Streaming {
                                remaining: body_len,
                            };
                        }
                    } else if body_len <= n - pos - HEADER_LEN {
                        // Compared by subtraction: no overflow whatever the length.
                        let end = pos + HEADER_LEN + body_len;
                        let start = out.len();
                        out.pass(input, pos, end);
                        let replacement =
                            on_message(tag, &input[pos + HEADER_LEN..end], start, out.len())?;
                        if let Some(replacement) = replacement {
                            out.truncate(start);
                            out.emit(input, &replacement);
                        }
                        pos = end;
                    } else {
                        self.held.extend_from_slice(&input[pos..]);
                        self.state = State::Holding { tag, body_len };
                        pos = n;
                    }
                }
                State::Boundary => {
                    // A header split across chunks: complete it in `held`.
                    let take = (HEADER_LEN - self.held.len()).min(n - pos);
                    self.held.extend_from_slice(&input[pos..pos + take]);
                    pos += take;
                    if self.held.len() < HEADER_LEN {
                        continue;
                    }
                    let header: [u8; HEADER_LEN] =
                        self.held[..HEADER_LEN].try_into().expect("5 bytes");
                    let (tag, body_len) = parse_header(header, self.max_len)?;
                    if tag == tag::COPY_DATA {
                        out.emit(input, &self.held);
                        self.release();
                        if body_len > 0 {
                            self.state = State::Streaming {
                                remaining: body_len,
                            };
                        }
                    } else if body_len == 0 {
                        self.complete(tag, input, out, &mut on_message)?;
                    } else {
                        self.state = State::Holding { tag, body_len };
                    }
                }
                State::Holding { tag, body_len } => {
                    let need = HEADER_LEN + body_len - self.held.len();
                    let take = need.min(n - pos);
                    self.held.extend_from_slice(&input[pos..pos + take]);
                    pos += take;
                    if take == need {
                        self.complete(tag, input, out, &mut on_message)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Forwards the completed held message and reports it.
    fn complete<F>(
        &mut self,
        tag: u8,
        input: &[u8],
        out: &mut OutBuf,
        on_message: &mut F,
    ) -> Result<()>
    where
        F: FnMut(u8, &[u8], usize, usize) -> Result<Option<Vec<u8>>>,
    {
        let start = out.len();
        out.emit(input, &self.held);
        let result = on_message(tag, &self.held[HEADER_LEN..], start, out.len());
        self.release();
        if let Ok(Some(replacement)) = &result {
            out.truncate(start);
            out.emit(input, replacement);
        }
        result.map(|_| ())
    }

    fn release(&mut self) {
        self.state = State::Boundary;
        if self.held.capacity() > KEEP_CAPACITY {
            self.held = Vec::new();
        } else {
            self.held.clear();
        }
    }

    /// Bytes held back, waiting for the rest of their message.
    pub(crate) fn held_len(&self) -> usize {
        self.held.len()
    }
}
