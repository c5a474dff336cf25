//! Server-to-client chunk scanning for the relay.  Bytes are forwarded as they arrive;
//! only message headers are read, plus the bodies of the few control messages the
//! session needs (assembled aside when they straddle chunks).  A DataRow or CopyData is
//! never buffered unless a row masker asks for that row.

use crate::error::Result;
use crate::forward::OutBuf;
use crate::framer::{parse_header, HEADER_LEN};

/// What the relay needs from a message's body, decided from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyUse {
    /// Not needed: stream it.
    Skip,
    /// Needed whole (control message): `on_message` gets it, the bytes still stream.
    Assemble,
    /// A DataRow to offer to the masker: held until whole, then forwarded or replaced.
    HoldRow,
}

/// The session side of the scanner.
pub(crate) trait ServerSink {
    fn on_header(&mut self, tag: u8, body_len: usize) -> Result<BodyUse>;
    fn on_message(&mut self, tag: u8, body: &[u8]) -> Result<()>;
    /// Writes a replacement DataRow body into `out` and returns true, or returns false.
    fn rewrite_row(&mut self, row: &[u8], out: &mut Vec<u8>) -> bool;
    /// Body bytes of a [`BodyUse::Skip`] message as they stream through (for recording).
    fn skipped(&mut self, _bytes: &[u8]) {}
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// Between messages; `hdr[..hdr_len]` holds a header split across chunks.
    Boundary,
    Skip {
        remaining: usize,
    },
    Assemble {
        tag: u8,
        remaining: usize,
    },
    /// `asm` holds the row's header and body so far.
    HoldRow {
        remaining: usize,
    },
}

#[derive(Debug)]
pub(crate) struct ServerStream {
    state: State,
    hdr: [u8; HEADER_LEN],
    hdr_len: usize,
    asm: Vec<u8>,
    rewritten: Vec<u8>,
    max_len: usize,
}

const KEEP_CAPACITY: usize = 64 * 1024;

impl ServerStream {
    pub(crate) fn new(max_len: usize) -> Self {
        ServerStream {
            state: State::Boundary,
            hdr: [0; HEADER_LEN],
            hdr_len: 0,
            asm: Vec::new(),
            rewritten: Vec::new(),
            max_len,
        }
    }

    /// Scans `input`.  Without a masker every byte is forwarded as received.
    pub(crate) fn feed<S: ServerSink>(
        &mut self,
        input: &[u8],
        out: &mut OutBuf,
        sink: &mut S,
        masking: bool,
    ) -> Result<()> {
        if masking {
            self.scan::<S, true>(input, out, sink)
        } else {
            let r = self.scan::<S, false>(input, out, sink);
            out.pass(input, 0, input.len());
            r
        }
    }

    /// One pass over the chunk.  With `MASKING`, bytes are forwarded explicitly:
    /// `pass_from` is the first input byte not yet forwarded, and a header that straddles
    /// chunks is withheld until it is known not to start a held row.
    fn scan<S: ServerSink, const MASKING: bool>(
        &mut self,
        input: &[u8],
        out: &mut OutBuf,
        sink: &mut S,
    ) -> Result<()> {
        let n = input.len();
        let mut pos = 0;
        let mut pass_from = 0;
        while pos < n {
            match self.state {
                State::Boundary => {
                    // `msg_start`: where this message starts in `input`, if it does.
                    let (header, msg_start) = if self.hdr_len == 0 && n - pos >= HEADER_LEN {
                        let h: [u8; HEADER_LEN] =
                            input[pos..pos + HEADER_LEN].try_into().expect("5 bytes");
                        pos += HEADER_LEN;
                        (h, Some(pos - HEADER_LEN))
                    } else {
                        let take = (HEADER_LEN - self.hdr_len).min(n - pos);
                        let first_here = self.hdr_len == 0;
                        self.hdr[self.hdr_len..self.hdr_len + take]
                            .copy_from_slice(&input[pos..pos + take]);
                        self.hdr_len += take;
                        if self.hdr_len < HEADER_LEN {
                            if MASKING {
                                // Withhold the partial header: it may begin a held row.
                                out.pass(input, pass_from, pos);
                                pass_from = n;
                            }
                            pos = n;
                            continue;
                        }
                        self.hdr_len = 0;
                        let start = if first_here { Some(pos) } else { None };
                        pos += take;
                        (self.hdr, start)
                    };
                    let (tag, body_len) = parse_header(header, self.max_len)?;
                    let body_use = sink.on_header(tag, body_len)?;
                    if MASKING && msg_start.is_none() {
                        // The header began in an earlier chunk and was withheld.
                        if body_use != BodyUse::HoldRow {
                            out.emit(input, &header);
                            pass_from = pos;
                        }
                    }
                    match body_use {
                        BodyUse::Skip => {
                            if n - pos >= body_len {
                                // The common case: the whole body is in this chunk.
                                sink.skipped(&input[pos..pos + body_len]);
                                pos += body_len;
                            } else {
                                sink.skipped(&input[pos..]);
                                self.state = State::Skip {
                                    remaining: body_len - (n - pos),
                                };
                                pos = n;
                            }
                        }
                        BodyUse::Assemble => {
                            if n - pos >= body_len {
                                sink.on_message(tag, &input[pos..pos + body_len])?;
                                pos += body_len;
                            } else {
                                self.asm.clear();
                                self.asm.extend_from_slice(&input[pos..]);
                                self.state = State::Assemble {
                                    tag,
                                    remaining: body_len - (n - pos),
                                };
                                pos = n;
                            }
                        }
                        BodyUse::HoldRow if MASKING => {
                            if let Some(start) = msg_start {
                                out.pass(input, pass_from, start);
                            }
                            if msg_start.is_some() && n - pos >= body_len {
                                // The whole row is in this chunk: no assembly needed.
                                let body = &input[pos..pos + body_len];
                                self.rewritten.clear();
                                let start = msg_start.unwrap_or(pos);
                                if sink.rewrite_row(body, &mut self.rewritten) {
                                    emit_row(out, input, &self.rewritten);
                                    pass_from = pos + body_len;
                                } else {
                                    pass_from = start;
                                }
                                pos += body_len;
                            } else {
                                self.asm.clear();
                                self.asm.extend_from_slice(&header);
                                let take = body_len.min(n - pos);
                                self.asm.extend_from_slice(&input[pos..pos + take]);
                                pos += take;
                                pass_from = pos;
                                if take == body_len {
                                    self.finish_row(input, out, sink);
                                } else {
                                    self.state = State::HoldRow {
                                        remaining: body_len - take,
                                    };
                                }
                            }
                        }
                        BodyUse::HoldRow => {
                            // Only offered when masking; treat as streaming otherwise.
                            if body_len > 0 {
                                self.state = State::Skip {
                                    remaining: body_len,
                                };
                            }
                        }
                    }
                }
                State::Skip { remaining } => {
                    let take = remaining.min(n - pos);
                    sink.skipped(&input[pos..pos + take]);
                    pos += take;
                    self.state = if take == remaining {
                        State::Boundary
                    } else {
                        State::Skip {
                            remaining: remaining - take,
                        }
                    };
                }
                State::Assemble { tag, remaining } => {
                    let take = remaining.min(n - pos);
                    self.asm.extend_from_slice(&input[pos..pos + take]);
                    pos += take;
                    if take == remaining {
                        self.state = State::Boundary;
                        let body = std::mem::take(&mut self.asm);
                        let r = sink.on_message(tag, &body);
                        self.asm = body;
                        self.trim();
                        r?;
                    } else {
                        self.state = State::Assemble {
                            tag,
                            remaining: remaining - take,
                        };
                    }
                }
                State::HoldRow { remaining } => {
                    let take = remaining.min(n - pos);
                    self.asm.extend_from_slice(&input[pos..pos + take]);
                    pos += take;
                    pass_from = pos;
                    if take == remaining {
                        self.state = State::Boundary;
                        self.finish_row(input, out, sink);
                    } else {
                        self.state = State::HoldRow {
                            remaining: remaining - take,
                        };
                    }
                }
            }
        }
        if MASKING {
            out.pass(input, pass_from, n.max(pass_from));
        }
        Ok(())
    }

    /// Forwards the held row in `asm`, rewritten if the masker wants.
    fn finish_row<S: ServerSink>(&mut self, input: &[u8], out: &mut OutBuf, sink: &mut S) {
        self.rewritten.clear();
        if sink.rewrite_row(&self.asm[HEADER_LEN..], &mut self.rewritten) {
            emit_row(out, input, &self.rewritten);
        } else {
            out.emit(input, &self.asm);
        }
        self.trim();
    }

    fn trim(&mut self) {
        if self.asm.capacity() > KEEP_CAPACITY {
            self.asm = Vec::new();
        }
        if self.rewritten.capacity() > KEEP_CAPACITY {
            self.rewritten = Vec::new();
        }
    }
}

/// Emits a DataRow with a replacement body.
fn emit_row(out: &mut OutBuf, input: &[u8], body: &[u8]) {
    let mut header = [crate::backend::tag::DATA_ROW, 0, 0, 0, 0];
    header[1..].copy_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.emit(input, &header);
    out.emit(input, body);
}
