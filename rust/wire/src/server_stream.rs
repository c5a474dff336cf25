//! Server-to-client chunk scanning for the relay.  Bytes are forwarded as they arrive;
//! only message headers are read, plus the bodies of the few control messages the
//! session needs (assembled aside when they straddle chunks).  A DataRow or CopyData is
//! never buffered unless a row masker asks for that row; the only other message ever
//! held back is the server's answer to a statement the gateway refused in place
//! (see [`crate::refusal`]), which is replaced.

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
    /// Held until whole, then forwarded, replaced or dropped ([`ServerSink::rewrite`]): a
    /// DataRow for the masker, the ErrorResponse answering a refused statement, or the
    /// answer to a Describe the gateway sent.  Only honoured in the explicit-forwarding
    /// mode; otherwise the message is assembled and streamed.
    Hold,
}

/// What becomes of a held message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rewrite {
    /// Forwarded as it came.
    Keep,
    /// Forwarded with the body written into `out`.
    Replace,
    /// Not forwarded: the answer to a message the gateway sent itself.
    Drop,
}

/// The session side of the scanner.
pub(crate) trait ServerSink {
    fn on_header(&mut self, tag: u8, body_len: usize) -> Result<BodyUse>;
    fn on_message(&mut self, tag: u8, body: &[u8]) -> Result<()>;
    /// A held message, whole: forwarded as it is, replaced by a body (same tag) written
    /// into `out`, or dropped.
    fn rewrite(&mut self, tag: u8, body: &[u8], out: &mut Vec<u8>) -> Result<Rewrite>;
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
    /// `asm` holds the message's header and body so far.
    Hold {
        tag: u8,
        remaining: usize,
    },
}

#[derive(Debug)]
pub(crate) struct ServerStream {
    state: State,
    hdr: [u8; HEADER_LEN],
    hdr_len: usize,
    /// How many of the `hdr_len` bytes were already forwarded (the mode can change
    /// between calls: explicit forwarding withholds a split header, the fast mode not).
    hdr_passed: usize,
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
            hdr_passed: 0,
            asm: Vec::new(),
            rewritten: Vec::new(),
            max_len,
        }
    }

    /// Scans `input`.  Unless `holding` (a masker, or a refusal awaiting its answer),
    /// every byte is forwarded as received.
    pub(crate) fn feed<S: ServerSink>(
        &mut self,
        input: &[u8],
        out: &mut OutBuf,
        sink: &mut S,
        holding: bool,
    ) -> Result<()> {
        if holding {
            self.scan::<S, true>(input, out, sink)
        } else {
            if self.hdr_passed < self.hdr_len {
                // Header bytes withheld by an earlier call in the holding mode.
                out.emit(input, &self.hdr[self.hdr_passed..self.hdr_len]);
                self.hdr_passed = self.hdr_len;
            }
            let r = self.scan::<S, false>(input, out, sink);
            out.pass(input, 0, input.len());
            r
        }
    }

    /// Bytes of the current message the client is still owed: 0 when what was forwarded
    /// so far ends at a message boundary (a held message or a withheld header counts as
    /// not forwarded).  For a header forwarded in part, the rest of the header: feeding
    /// that much reveals the body length.
    pub(crate) fn owed_to_client(&self) -> usize {
        match self.state {
            State::Boundary if self.hdr_passed > 0 => HEADER_LEN - self.hdr_len,
            State::Boundary | State::Hold { .. } => 0,
            State::Skip { remaining } | State::Assemble { remaining, .. } => remaining,
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
                                // Withhold the partial header: it may begin a held message.
                                out.pass(input, pass_from, pos);
                                pass_from = n;
                            } else {
                                self.hdr_passed = self.hdr_len;
                            }
                            pos = n;
                            continue;
                        }
                        self.hdr_len = 0;
                        let start = if first_here { Some(pos) } else { None };
                        pos += take;
                        (self.hdr, start)
                    };
                    let passed = std::mem::take(&mut self.hdr_passed);
                    let (tag, body_len) = parse_header(header, self.max_len)?;
                    let mut body_use = sink.on_header(tag, body_len)?;
                    if body_use == BodyUse::Hold && (!MASKING || passed > 0) {
                        // Part of it is on its way to the client already: it cannot be
                        // held, but the sink still reads it.
                        body_use = BodyUse::Assemble;
                    }
                    if MASKING && msg_start.is_none() {
                        // The header began in an earlier chunk and was withheld (the part
                        // not already forwarded in the fast mode).
                        if body_use != BodyUse::Hold {
                            out.emit(input, &header[passed..]);
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
                        BodyUse::Hold => {
                            // MASKING only (see above).
                            if let Some(start) = msg_start {
                                out.pass(input, pass_from, start);
                            }
                            if msg_start.is_some() && n - pos >= body_len {
                                // The whole message is in this chunk: no assembly needed.
                                let body = &input[pos..pos + body_len];
                                self.rewritten.clear();
                                let start = msg_start.unwrap_or(pos);
                                match sink.rewrite(tag, body, &mut self.rewritten)? {
                                    Rewrite::Replace => {
                                        emit_message(out, input, tag, &self.rewritten);
                                        pass_from = pos + body_len;
                                    }
                                    Rewrite::Drop => pass_from = pos + body_len,
                                    Rewrite::Keep => pass_from = start,
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
                                    self.finish_held(tag, input, out, sink)?;
                                } else {
                                    self.state = State::Hold {
                                        tag,
                                        remaining: body_len - take,
                                    };
                                }
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
                State::Hold { tag, remaining } => {
                    let take = remaining.min(n - pos);
                    self.asm.extend_from_slice(&input[pos..pos + take]);
                    pos += take;
                    pass_from = pos;
                    if take == remaining {
                        self.state = State::Boundary;
                        self.finish_held(tag, input, out, sink)?;
                    } else {
                        self.state = State::Hold {
                            tag,
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

    /// Forwards the held message in `asm`, rewritten if the sink wants.
    fn finish_held<S: ServerSink>(
        &mut self,
        tag: u8,
        input: &[u8],
        out: &mut OutBuf,
        sink: &mut S,
    ) -> Result<()> {
        self.rewritten.clear();
        let r = sink.rewrite(tag, &self.asm[HEADER_LEN..], &mut self.rewritten);
        match r {
            Ok(Rewrite::Replace) => emit_message(out, input, tag, &self.rewritten),
            Ok(Rewrite::Keep) => out.emit(input, &self.asm),
            Ok(Rewrite::Drop) | Err(_) => {}
        }
        self.trim();
        r.map(|_| ())
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

/// Emits a message with a replacement body.
fn emit_message(out: &mut OutBuf, input: &[u8], tag: u8, body: &[u8]) {
    let mut header = [tag, 0, 0, 0, 0];
    header[1..].copy_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.emit(input, &header);
    out.emit(input, body);
}
