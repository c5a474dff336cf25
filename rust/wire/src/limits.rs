//! Size limits applied to every length read from the wire, before anything is allocated.

/// PostgreSQL's `MAX_STARTUP_PACKET_LENGTH`: a startup packet longer than this is refused.
pub const DEFAULT_MAX_STARTUP_LEN: usize = 10_000;

/// PostgreSQL's `PQ_LARGE_MESSAGE_LIMIT` (`MaxAllocSize - 1`): the largest typed message.
pub const DEFAULT_MAX_MESSAGE_LEN: usize = 0x3FFF_FFFF;

/// Upper bounds for lengths announced by a peer.  Lengths are compared as sent on the
/// wire, i.e. including the 4 bytes of the length field itself (as PostgreSQL does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_startup_len: usize,
    pub max_message_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_startup_len: DEFAULT_MAX_STARTUP_LEN,
            max_message_len: DEFAULT_MAX_MESSAGE_LEN,
        }
    }
}
