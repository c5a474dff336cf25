//! [`AuditSpool`]: the append-only, memory-mapped audit spool of one gateway process.
//!
//! The spool is a directory of *streams*, one per writer process lifetime:
//!
//! ```text
//! <spool>/<stream>/writer.lock            flock held by the writer while it lives
//! <spool>/<stream>/00000000000000000001.seg
//! <spool>/<stream>/00000000000000004711.seg   (named after the seq of its first record)
//! ```
//!
//! Records are sealed lines ([`crate::audit_record`]).  A segment file is allocated
//! whole (`fallocate`), mapped shared and pre-faulted by a background thread, so storing
//! a record is a `memcpy` into the page cache: once [`AuditSpool::append`] returns, the
//! record survives the death of this process (kill -9 included).  Surviving a crash of
//! the machine needs `fdatasync`, which the [`FsyncPolicy`] schedules.
//!
//! Unwritten space after the last record is zero bytes, so a reader knows where the data
//! ends.  Each segment starts with an `open` (first segment) or `segment` record that
//! carries the previous record's hash as `prev`, and ends with a `segment_end` record:
//! a reader moves to the next segment only after it, and a verifier can check any
//! suffix of a stream.  A clean shutdown writes `close` and trims the last segment.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use memmap2::{Advice, MmapRaw, UncheckedAdvice};

use crate::audit_record::{hex, RecordBody, RecordChain, HASH_LEN};
use crate::record::json_str;

/// When records are forced to stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// After every group of records; callers wait for [`AuditSpool::synced_seq`].
    Always,
    /// Every interval, in a background thread.
    Interval(Duration),
    /// Never explicitly (the kernel writes back on its own schedule).
    Never,
}

/// Options of an [`AuditSpool`].
#[derive(Debug, Clone)]
pub struct SpoolOptions {
    /// The spool directory (holds one subdirectory per stream).
    pub directory: PathBuf,
    /// This writer's stream id: a file name, unique per process lifetime.
    pub stream: String,
    /// HMAC key of the hash chain.
    pub key: Vec<u8>,
    /// Size of a segment file.
    pub segment_bytes: usize,
    /// Bound on the disk space of the whole spool directory (every stream).
    pub max_bytes: u64,
    pub fsync: FsyncPolicy,
    /// How often the spool's disk usage is measured.
    pub usage_interval: Duration,
    /// JSON members (without braces) added to the stream's `open` record.
    pub open_members: String,
}

/// Why a record was not stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpoolError {
    /// Storing the record would take the spool past its bound.
    #[error("audit spool is full: {usage} bytes in use, limit {limit}")]
    Full { usage: u64, limit: u64 },
    #[error("audit spool I/O error: {0}")]
    Io(String),
    #[error("audit spool is closed")]
    Closed,
}

impl From<io::Error> for SpoolError {
    fn from(e: io::Error) -> Self {
        SpoolError::Io(e.to_string())
    }
}

/// Whether a record may take the spool past its bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// A new statement: refused when the spool is full.
    New,
    /// The end of something already admitted: stored while any space can be had.
    Continuation,
}

/// Room kept at the end of every segment for its `segment_end` record.
const END_RESERVE: usize = 512;
const WRITER_LOCK: &str = "writer.lock";
pub const SEGMENT_SUFFIX: &str = ".seg";
const PREPARED_PREFIX: &str = ".prepared-";
/// A shipped segment the shipper handed back for reuse.
pub const FREE_PREFIX: &str = ".free-";

fn now_us() -> u64 {
    micros(SystemTime::now())
}

/// A record's `ts`: microseconds since the epoch.
fn micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// One mapped segment file.  The mapping is shared with the sync thread, which flushes
/// the written range only (`msync`): `fdatasync` would also clean the pre-faulted pages
/// ahead, and each would fault again at its first record.
struct Segment {
    file: Arc<File>,
    map: Arc<MmapRaw>,
    path: PathBuf,
    pos: usize,
}

impl Segment {
    fn capacity(&self) -> usize {
        self.map.len()
    }

    fn room(&self) -> usize {
        self.capacity().saturating_sub(self.pos)
    }

    /// Copies `line` (ending in a newline) in and publishes the new length in `written`.
    /// The newline is stored last, after a release fence, so a reader that sees it sees
    /// the whole record.
    fn put(&mut self, line: &[u8], written: &AtomicUsize) {
        let n = line.len();
        assert!(n <= self.room() && line.last() == Some(&b'\n'));
        // SAFETY: `pos + n <= len` (checked above); only the writer (behind the spool's
        // mutex) writes to the mapping, and nothing reads these bytes through it.
        unsafe {
            let at = self.map.as_mut_ptr().add(self.pos);
            std::ptr::copy_nonoverlapping(line.as_ptr(), at, n - 1);
            fence(Ordering::Release);
            *at.add(n - 1) = b'\n';
        }
        self.pos += n;
        written.store(self.pos, Ordering::Release);
    }
}

/// Allocates, maps and (optionally) pre-faults a segment file at `path`.
fn create_segment(path: &Path, size: usize, prefault: bool) -> io::Result<Segment> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)?;
    let result = (|| {
        allocate(&file, size)?;
        // SAFETY: the file is ours (created above, never truncated while mapped), so the
        // mapping stays backed; fallocate reserved its blocks, so a write fault cannot
        // hit ENOSPC.
        let map = MmapRaw::map_raw(&file)?;
        if prefault {
            prefault_pages(&map);
        }
        Ok(Segment {
            file: Arc::new(file),
            map: Arc::new(map),
            path: path.to_owned(),
            pos: 0,
        })
    })();
    if result.is_err() {
        let _ = fs::remove_file(path);
    }
    result
}

/// Reserves `size` bytes of disk for `file`; zero-fills where `fallocate` is missing.
fn allocate(file: &File, size: usize) -> io::Result<()> {
    // SAFETY: plain syscall on a valid descriptor.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, size as libc::off_t) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => {
            // Write real zeros: ENOSPC then surfaces here, not as SIGBUS on a page fault.
            let zeros = vec![0u8; 1 << 16];
            let mut left = size;
            let mut f = file;
            while left > 0 {
                let n = left.min(zeros.len());
                f.write_all(&zeros[..n])?;
                left -= n;
            }
            Ok(())
        }
        _ => Err(err),
    }
}

/// Faults every page in now, so that storing a record later costs no page fault.
fn prefault_pages(map: &MmapRaw) {
    if map.advise(Advice::PopulateWrite).is_err() {
        // Kernels before 5.14: reading each page at least maps it.
        let mut sum = 0u8;
        for i in (0..map.len()).step_by(4096) {
            // SAFETY: i < len; a read of the mapping.
            sum = sum.wrapping_add(unsafe { std::ptr::read_volatile(map.as_ptr().add(i)) });
        }
        std::hint::black_box(sum);
    }
}

/// Sum of the sizes of the segment files under `spool` (every stream).
pub fn spool_usage(spool: &Path) -> u64 {
    let mut total = 0;
    let Ok(streams) = fs::read_dir(spool) else {
        return 0;
    };
    for stream in streams.flatten() {
        let Ok(files) = fs::read_dir(stream.path()) else {
            continue;
        };
        for f in files.flatten() {
            if f.file_name().to_string_lossy().ends_with(SEGMENT_SUFFIX) {
                total += f.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
    }
    total
}

/// State shared with the background threads.
struct Shared {
    spool_dir: PathBuf,
    stream_dir: PathBuf,
    segment_bytes: usize,
    max_bytes: u64,
    stop: AtomicBool,
    /// Seq of the last record stored in the mapping.
    written_seq: AtomicU64,
    /// Seq of the last record known to be on stable storage.
    synced_seq: AtomicU64,
    /// Disk usage of the spool at the last measurement...
    usage_measured: AtomicU64,
    /// ...and this writer's `allocated_total` when that measurement began.
    usage_alloc_mark: AtomicU64,
    /// Bytes of segment files this writer ever allocated.
    allocated_total: AtomicU64,
    /// Bytes written to the active segment (its records end there).
    active_written: AtomicUsize,
    prep: Mutex<PrepState>,
    prep_wake: Condvar,
    sync: Mutex<SyncState>,
    sync_wake: Condvar,
    /// eventfd written after each sync (fsync = always), for an event loop to watch.
    notify: Option<OwnedFd>,
}

#[derive(Default)]
struct PrepState {
    ready: Option<Segment>,
    /// Retired segments to unmap and trim off the writer's thread.
    retired: Vec<Segment>,
    counter: u64,
    wanted: bool,
}

/// A segment as the sync thread sees it.
#[derive(Clone)]
struct Synced {
    map: Arc<MmapRaw>,
    /// The first bytes whose pages [`Synced::flush`] unmapped already.
    released: Arc<AtomicUsize>,
}

impl Synced {
    fn new(map: Arc<MmapRaw>) -> Self {
        Synced {
            map,
            released: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Writes the first `len` bytes (the records stored so far) to disk.
    ///
    /// The whole pages among them, which the writer has left for good, are unmapped first
    /// (`MADV_DONTNEED`; for a shared file mapping the page cache keeps them, dirty).
    /// Writing back pages that are still mapped write-protects them with TLB shootdowns,
    /// interrupts to the writer's CPU (0.010 per transaction under `pgbench -S`);
    /// unmapping a range costs one (0.001 per transaction).
    fn flush(&self, len: usize) -> io::Result<()> {
        let whole = len / page_size() * page_size();
        let from = self.released.load(Ordering::Acquire);
        if whole > from {
            // SAFETY: nothing accesses `from..whole` through this mapping any more: the
            // writer stores records at `len` and beyond only, and readers use read(2).
            let unmapped = unsafe {
                self.map
                    .unchecked_advise_range(UncheckedAdvice::DontNeed, from, whole - from)
            };
            // Should it fail, msync writes those pages all the same, only dearer.
            if unmapped.is_ok() {
                self.released.store(whole, Ordering::Release);
            }
        }
        self.map.flush_range(0, len)
    }
}

fn page_size() -> usize {
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    *PAGE.get_or_init(|| match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => 4096,
    })
}

#[derive(Default)]
struct SyncState {
    current: Option<Synced>,
    /// Segments left behind, with their final length, not yet synced.
    retired: Vec<(Synced, usize)>,
}

impl Shared {
    fn usage_estimate(&self) -> u64 {
        let measured = self.usage_measured.load(Ordering::Acquire);
        let mark = self.usage_alloc_mark.load(Ordering::Acquire);
        let now = self.allocated_total.load(Ordering::Acquire);
        measured + now.saturating_sub(mark)
    }

    fn measure_usage(&self) {
        let mark = self.allocated_total.load(Ordering::Acquire);
        let usage = spool_usage(&self.spool_dir);
        self.usage_alloc_mark.store(mark, Ordering::Release);
        self.usage_measured.store(usage, Ordering::Release);
    }

    fn lock_prep(&self) -> MutexGuard<'_, PrepState> {
        self.prep.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_sync(&self) -> MutexGuard<'_, SyncState> {
        self.sync.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn prepared_path(&self, counter: u64) -> PathBuf {
        self.stream_dir
            .join(format!("{PREPARED_PREFIX}{counter}{SEGMENT_SUFFIX}"))
    }

    /// Forces everything written so far to disk (the written ranges only, `msync`,
    /// which also commits the metadata they need); returns the seq now durable.
    fn sync_now(&self) -> io::Result<u64> {
        let target = self.written_seq.load(Ordering::Acquire);
        let ranges: Vec<(Synced, usize)> = {
            let mut s = self.lock_sync();
            let mut ranges = std::mem::take(&mut s.retired);
            if let Some(current) = &s.current {
                // Read under the lock: activating a segment swaps both together.
                ranges.push((current.clone(), self.active_written.load(Ordering::Acquire)));
            }
            ranges
        };
        for (segment, len) in &ranges {
            if *len > 0 {
                segment.flush(*len)?;
            }
        }
        self.synced_seq.fetch_max(target, Ordering::AcqRel);
        if let Some(fd) = &self.notify {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writing 8 bytes to an eventfd we own.
            unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        }
        Ok(target)
    }
}

/// The writer's own state (behind the spool's mutex).
struct Writer {
    chain: RecordChain,
    seq: u64,
    stream_json: String,
    body: RecordBody,
    line: Vec<u8>,
    active: Option<Segment>,
    closed: bool,
    _lock: File,
    records_dropped: u64,
}

/// The append-only audit spool of one process.  Thread-safe; cheap to share in an `Arc`.
pub struct AuditSpool {
    writer: Mutex<Writer>,
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    fsync: FsyncPolicy,
    stream: String,
}

impl std::fmt::Debug for AuditSpool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditSpool")
            .field("stream", &self.stream)
            .field("dir", &self.shared.stream_dir)
            .finish()
    }
}

impl AuditSpool {
    /// Creates the stream directory, its first segment and the background threads, and
    /// writes the `open` record.
    pub fn open(options: SpoolOptions) -> Result<Arc<AuditSpool>, SpoolError> {
        if options.segment_bytes < 4 * END_RESERVE {
            return Err(SpoolError::Io(format!(
                "segment size {} is too small",
                options.segment_bytes
            )));
        }
        let stream_dir = options.directory.join(&options.stream);
        fs::create_dir_all(&options.directory)?;
        fs::create_dir(&stream_dir)?;
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(stream_dir.join(WRITER_LOCK))?;
        // SAFETY: plain syscall on a valid descriptor.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(io::Error::last_os_error().into());
        }
        let notify = if options.fsync == FsyncPolicy::Always {
            // SAFETY: eventfd returns a new descriptor or -1.
            let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
            if fd < 0 {
                return Err(io::Error::last_os_error().into());
            }
            // SAFETY: fd is a fresh descriptor we own.
            Some(unsafe { OwnedFd::from_raw_fd(fd) })
        } else {
            None
        };
        let shared = Arc::new(Shared {
            spool_dir: options.directory.clone(),
            stream_dir: stream_dir.clone(),
            segment_bytes: options.segment_bytes,
            max_bytes: options.max_bytes,
            stop: AtomicBool::new(false),
            written_seq: AtomicU64::new(0),
            synced_seq: AtomicU64::new(0),
            usage_measured: AtomicU64::new(0),
            usage_alloc_mark: AtomicU64::new(0),
            allocated_total: AtomicU64::new(0),
            active_written: AtomicUsize::new(0),
            prep: Mutex::new(PrepState::default()),
            prep_wake: Condvar::new(),
            sync: Mutex::new(SyncState::default()),
            sync_wake: Condvar::new(),
            notify,
        });
        shared.measure_usage();
        let mut stream_json = Vec::new();
        json_str(&mut stream_json, &options.stream);
        let spool = Arc::new(AuditSpool {
            writer: Mutex::new(Writer {
                chain: RecordChain::new(&options.key, [0; HASH_LEN]),
                seq: 0,
                stream_json: String::from_utf8(stream_json).expect("JSON is UTF-8"),
                body: RecordBody::default(),
                line: Vec::with_capacity(4096),
                active: None,
                closed: false,
                _lock: lock,
                records_dropped: 0,
            }),
            shared: shared.clone(),
            threads: Mutex::new(Vec::new()),
            fsync: options.fsync,
            stream: options.stream.clone(),
        });
        {
            let mut w = spool.lock_writer();
            let first = spool.new_segment(1, options.segment_bytes, true)?;
            spool.activate(&mut w, first);
            let members = options.open_members.clone();
            spool.store(&mut w, "open", Admission::Continuation, now_us(), |b| {
                b.raw("prev", format!("\"{}\"", hex(&[0; HASH_LEN])).as_bytes());
                b.u64("segment_bytes", options.segment_bytes as u64);
                b.members(&members);
            })?;
        }
        spool.start_threads(options.usage_interval);
        Ok(spool)
    }

    fn lock_writer(&self) -> MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn start_threads(self: &Arc<Self>, usage_interval: Duration) {
        let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        let shared = self.shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("audit-spool-prep".into())
                .spawn(move || prep_loop(&shared, usage_interval))
                .expect("spawn spool thread"),
        );
        let policy = self.fsync;
        if policy != FsyncPolicy::Never {
            let shared = self.shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("audit-spool-sync".into())
                    .spawn(move || sync_loop(&shared, policy))
                    .expect("spawn spool thread"),
            );
        }
    }

    /// Stores one record: `fill` appends its members after the common head.  Returns its
    /// seq.  The record is in the page cache when this returns.
    pub fn append(
        &self,
        kind: &str,
        admission: Admission,
        fill: impl FnOnce(&mut RecordBody),
    ) -> Result<u64, SpoolError> {
        self.append_at(kind, admission, SystemTime::now(), fill)
    }

    /// [`append`](Self::append) with the record's time given: a codec derives it from the
    /// clock reading it took for the message.
    pub fn append_at(
        &self,
        kind: &str,
        admission: Admission,
        at: SystemTime,
        fill: impl FnOnce(&mut RecordBody),
    ) -> Result<u64, SpoolError> {
        let mut w = self.lock_writer();
        let result = self.store(&mut w, kind, admission, micros(at), fill);
        if result.is_err() {
            w.records_dropped += 1;
        }
        result
    }

    fn store(
        &self,
        w: &mut Writer,
        kind: &str,
        admission: Admission,
        ts: u64,
        fill: impl FnOnce(&mut RecordBody),
    ) -> Result<u64, SpoolError> {
        if w.closed {
            return Err(SpoolError::Closed);
        }
        if admission == Admission::New {
            // Over the bound (a continuation may have taken one segment more): nothing new
            // until the shipper has freed space, even if the active segment has room.
            let usage = self.shared.usage_estimate();
            if usage > self.shared.max_bytes {
                return Err(SpoolError::Full {
                    usage,
                    limit: self.shared.max_bytes,
                });
            }
        }
        let mut line = std::mem::take(&mut w.line);
        line.clear();
        let (head_len, mut hash) = {
            let Writer {
                body,
                stream_json,
                chain,
                seq,
                ..
            } = &mut *w;
            body.begin(*seq + 1, stream_json, ts, kind);
            let head_len = body.len();
            fill(body);
            (head_len, chain.seal(body.finish(), &mut line))
        };
        let room = w.active.as_ref().map_or(0, Segment::room);
        if line.len() + END_RESERVE > room {
            // Rare: keep the members (closing brace included) and renumber the record
            // after the rotation, which uses seqs of its own.
            let members = w.body.bytes()[head_len..].to_vec();
            let need = line.len();
            w.line = line;
            self.rotate(w, need, admission)?;
            line = std::mem::take(&mut w.line);
            line.clear();
            let mut body = RecordBody::default();
            body.begin(w.seq + 1, &w.stream_json, ts, kind);
            let mut bytes = body.bytes().to_vec();
            bytes.extend_from_slice(&members);
            hash = w.chain.seal(&bytes, &mut line);
        }
        let seg = w.active.as_mut().expect("a segment is active");
        seg.put(&line, &self.shared.active_written);
        w.chain.commit(hash);
        w.seq += 1;
        w.line = line;
        self.shared.written_seq.store(w.seq, Ordering::Release);
        if self.fsync == FsyncPolicy::Always {
            // Taking the mutex orders this wake-up after the sync thread's check.
            drop(self.shared.lock_sync());
            self.shared.sync_wake.notify_one();
        }
        Ok(w.seq)
    }

    /// Ends the active segment and starts the next, big enough for `need` bytes.
    fn rotate(&self, w: &mut Writer, need: usize, admission: Admission) -> Result<(), SpoolError> {
        let size = self.shared.segment_bytes.max(need + 2 * END_RESERVE + 1024);
        let mut prepared = None;
        if size == self.shared.segment_bytes {
            let mut p = self.shared.lock_prep();
            prepared = p.ready.take();
            p.wanted = true;
            self.shared.prep_wake.notify_one();
        }
        if admission == Admission::New {
            // A prepared segment was admitted when it was made; a new one must fit now.
            let extra = if prepared.is_some() { 0 } else { size as u64 };
            let usage = self.shared.usage_estimate();
            if usage + extra > self.shared.max_bytes {
                if let Some(p) = prepared {
                    self.shared.lock_prep().ready = Some(p);
                }
                return Err(SpoolError::Full {
                    usage,
                    limit: self.shared.max_bytes,
                });
            }
        }
        let next_seq = w.seq + 2; // after the segment_end record
        let name = segment_name(next_seq);
        let next = match prepared {
            Some(seg) => {
                let path = self.shared.stream_dir.join(&name);
                fs::rename(&seg.path, &path)?;
                Segment { path, ..seg }
            }
            None => self.new_segment(next_seq, size, false)?,
        };
        // segment_end fits: every segment keeps END_RESERVE free for it.
        let ts = now_us();
        let mut body = RecordBody::default();
        body.begin(w.seq + 1, &w.stream_json, ts, "segment_end");
        body.str("next", &name);
        let mut line = Vec::new();
        let hash = w.chain.seal(body.finish(), &mut line);
        if let Some(seg) = w.active.as_mut() {
            seg.put(&line, &self.shared.active_written);
        }
        w.chain.commit(hash);
        w.seq += 1;
        self.activate(w, next);
        let prev = format!("\"{}\"", hex(&w.chain.prev()));
        let mut body = RecordBody::default();
        body.begin(w.seq + 1, &w.stream_json, ts, "segment");
        body.raw("prev", prev.as_bytes());
        let mut line = Vec::new();
        let hash = w.chain.seal(body.finish(), &mut line);
        w.active
            .as_mut()
            .expect("just activated")
            .put(&line, &self.shared.active_written);
        w.chain.commit(hash);
        w.seq += 1;
        Ok(())
    }

    /// Creates a segment named after `first_seq` directly (no prepared one at hand).
    fn new_segment(
        &self,
        first_seq: u64,
        size: usize,
        prefault: bool,
    ) -> Result<Segment, SpoolError> {
        let path = self.shared.stream_dir.join(segment_name(first_seq));
        let seg = create_segment(&path, size, prefault)?;
        self.shared
            .allocated_total
            .fetch_add(size as u64, Ordering::AcqRel);
        Ok(seg)
    }

    /// Makes `seg` the active segment; the old one goes to the threads to sync and trim.
    fn activate(&self, w: &mut Writer, seg: Segment) {
        {
            let old_len = w.active.as_ref().map_or(0, |s| s.pos);
            let mut s = self.shared.lock_sync();
            let next = Synced::new(seg.map.clone());
            if let Some(old) = s.current.replace(next) {
                if self.fsync != FsyncPolicy::Never {
                    s.retired.push((old, old_len));
                }
            }
            self.shared.active_written.store(seg.pos, Ordering::Release);
        }
        if let Some(old) = w.active.replace(seg) {
            self.shared.lock_prep().retired.push(old);
            self.shared.prep_wake.notify_one();
        }
    }

    /// Writes the `close` record, syncs, trims the last segment and stops the threads.
    /// Later appends fail with [`SpoolError::Closed`].
    pub fn close(&self) -> Result<(), SpoolError> {
        let result = {
            let mut w = self.lock_writer();
            if w.closed {
                return Ok(());
            }
            let r = self.store(&mut w, "close", Admission::Continuation, now_us(), |_| {});
            w.closed = true;
            let active = w.active.take();
            if let Some(seg) = active {
                let _ = seg.map.flush_range(0, seg.pos);
                let pos = seg.pos;
                let file = seg.file.clone();
                drop(seg);
                let _ = file.set_len(pos as u64);
                let _ = file.sync_all();
            }
            r.map(|_| ())
        };
        self.stop_threads();
        let mut p = self.shared.lock_prep();
        if let Some(seg) = p.ready.take() {
            let _ = fs::remove_file(&seg.path);
        }
        for seg in p.retired.drain(..) {
            retire(seg);
        }
        result
    }

    fn stop_threads(&self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.prep_wake.notify_all();
        self.shared.sync_wake.notify_all();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }

    pub fn stream(&self) -> &str {
        &self.stream
    }

    pub fn stream_dir(&self) -> &Path {
        &self.shared.stream_dir
    }

    /// Seq of the last record stored.
    pub fn written_seq(&self) -> u64 {
        self.shared.written_seq.load(Ordering::Acquire)
    }

    /// Seq of the last record on stable storage (fsync = always or interval).
    pub fn synced_seq(&self) -> u64 {
        self.shared.synced_seq.load(Ordering::Acquire)
    }

    /// Estimated disk usage of the whole spool.
    pub fn usage_bytes(&self) -> u64 {
        self.shared.usage_estimate()
    }

    pub fn max_bytes(&self) -> u64 {
        self.shared.max_bytes
    }

    /// Whether a new statement's record would be refused for lack of space right now
    /// (conservative: the active segment may still have room).
    pub fn is_full(&self) -> bool {
        let usage = self.shared.usage_estimate();
        if usage > self.shared.max_bytes {
            return true;
        }
        let w = self.lock_writer();
        let room = w.active.as_ref().map_or(0, Segment::room);
        room < 4 * END_RESERVE
            && usage + self.shared.segment_bytes as u64 > self.shared.max_bytes
            && self.shared.lock_prep().ready.is_none()
    }

    /// Records that could not be stored.
    pub fn records_dropped(&self) -> u64 {
        self.lock_writer().records_dropped
    }

    /// Descriptor an event loop can watch: readable after each sync (fsync = always).
    pub fn notify_fd(&self) -> Option<i32> {
        self.shared.notify.as_ref().map(|fd| fd.as_raw_fd())
    }

    /// Forces everything stored so far to stable storage now; returns the durable seq.
    pub fn sync(&self) -> Result<u64, SpoolError> {
        Ok(self.shared.sync_now()?)
    }

    /// Re-measures the spool's disk usage now (normally done every `usage_interval`).
    pub fn refresh_usage(&self) {
        self.shared.measure_usage();
    }
}

impl Drop for AuditSpool {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// `00000000000000004711.seg`
pub fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}{SEGMENT_SUFFIX}")
}

/// Unmaps a segment left behind.  It keeps its full size: once shipped, the shipper
/// hands it back for reuse (`.free-*.seg`).
fn retire(seg: Segment) {
    drop(seg);
}

/// A shipped segment of this stream, zeroed and mapped again: reusing its blocks and its
/// page-cache pages costs a `memset` instead of allocating and faulting in a new file.
fn recycle(shared: &Shared, path: &Path) -> io::Result<Option<Segment>> {
    let Ok(entries) = fs::read_dir(&shared.stream_dir) else {
        return Ok(None);
    };
    let free = entries.flatten().find(|e| {
        let name = e.file_name();
        let name = name.to_string_lossy();
        name.starts_with(FREE_PREFIX) && name.ends_with(SEGMENT_SUFFIX)
    });
    let Some(free) = free else { return Ok(None) };
    fs::rename(free.path(), path)?;
    let file = OpenOptions::new().read(true).write(true).open(path)?;
    if file.metadata()?.len() != shared.segment_bytes as u64 {
        drop(file);
        fs::remove_file(path)?;
        return Ok(None);
    }
    let map = MmapRaw::map_raw(&file)?;
    // SAFETY: a mapping of `len` bytes of a file only this thread uses now.
    unsafe { std::ptr::write_bytes(map.as_mut_ptr(), 0, map.len()) };
    Ok(Some(Segment {
        file: Arc::new(file),
        map: Arc::new(map),
        path: path.to_owned(),
        pos: 0,
    }))
}

fn prep_loop(shared: &Shared, usage_interval: Duration) {
    let mut guard = shared.lock_prep();
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let retired = std::mem::take(&mut guard.retired);
        let want = guard.ready.is_none();
        let counter = guard.counter;
        drop(guard);
        for seg in retired {
            retire(seg);
        }
        shared.measure_usage();
        if want {
            let size = shared.segment_bytes;
            let path = shared.prepared_path(counter);
            if let Ok(Some(seg)) = recycle(shared, &path) {
                let mut g = shared.lock_prep();
                g.counter += 1;
                g.ready = Some(seg);
            } else if shared.usage_estimate() + size as u64 <= shared.max_bytes {
                match create_segment(&path, size, true) {
                    Ok(seg) => {
                        shared
                            .allocated_total
                            .fetch_add(size as u64, Ordering::AcqRel);
                        let mut g = shared.lock_prep();
                        g.counter += 1;
                        g.ready = Some(seg);
                    }
                    Err(_) => {
                        // Retried at the next tick; the writer creates one itself meanwhile.
                        let mut g = shared.lock_prep();
                        g.counter += 1;
                    }
                }
            }
        }
        guard = shared.lock_prep();
        if guard.retired.is_empty() && !(guard.wanted && guard.ready.is_none()) {
            guard = shared
                .prep_wake
                .wait_timeout(guard, usage_interval)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        guard.wanted = false;
    }
}

fn sync_loop(shared: &Shared, policy: FsyncPolicy) {
    loop {
        {
            let guard = shared.lock_sync();
            let _unused = match policy {
                FsyncPolicy::Interval(every) => {
                    shared
                        .sync_wake
                        .wait_timeout(guard, every)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
                _ => shared
                    .sync_wake
                    .wait_while(guard, |_| {
                        !shared.stop.load(Ordering::Acquire)
                            && shared.written_seq.load(Ordering::Acquire)
                                <= shared.synced_seq.load(Ordering::Acquire)
                    })
                    .unwrap_or_else(|p| p.into_inner()),
            };
        }
        let stopping = shared.stop.load(Ordering::Acquire);
        if shared.written_seq.load(Ordering::Acquire) > shared.synced_seq.load(Ordering::Acquire) {
            let _ = shared.sync_now();
        }
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit_record::verify_line;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "pgwarden-spool-test-{tag}-{}-{}",
            std::process::id(),
            now_us()
        ));
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn options(dir: &Path, segment: usize, max: u64, fsync: FsyncPolicy) -> SpoolOptions {
        SpoolOptions {
            directory: dir.to_owned(),
            stream: "s1".into(),
            key: b"test-key".to_vec(),
            segment_bytes: segment,
            max_bytes: max,
            fsync,
            usage_interval: Duration::from_millis(20),
            open_members: "\"pid\":1".into(),
        }
    }

    /// Every record line of a stream, in order, following segment_end links.
    fn read_stream(dir: &Path) -> Vec<Vec<u8>> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(SEGMENT_SUFFIX) && !n.starts_with('.'))
            .collect();
        names.sort();
        let mut lines = Vec::new();
        for n in names {
            let data = fs::read(dir.join(n)).unwrap();
            for line in data.split(|&b| b == b'\n') {
                if line.is_empty() || line[0] == 0 {
                    break;
                }
                lines.push(line.to_vec());
            }
        }
        lines
    }

    #[test]
    fn records_chain_across_segments() {
        let dir = temp_dir("chain");
        let spool = AuditSpool::open(options(&dir, 4096, 1 << 30, FsyncPolicy::Never)).unwrap();
        for i in 0..100u64 {
            let seq = spool
                .append("stmt", Admission::New, |b| {
                    b.str("sql", &format!("SELECT {i}"));
                })
                .unwrap();
            assert!(seq > i);
        }
        spool.close().unwrap();
        let lines = read_stream(&dir.join("s1"));
        let mut prev = [0u8; HASH_LEN];
        let mut kinds = Vec::new();
        for (i, l) in lines.iter().enumerate() {
            prev = verify_line(b"test-key", &prev, l).unwrap_or_else(|e| panic!("line {i}: {e:?}"));
            let v: serde_json::Value = serde_json::from_slice(l).unwrap();
            assert_eq!(v["seq"].as_u64().unwrap(), i as u64 + 1);
            kinds.push(v["type"].as_str().unwrap().to_owned());
        }
        assert_eq!(kinds.first().unwrap(), "open");
        assert_eq!(kinds.last().unwrap(), "close");
        assert_eq!(kinds.iter().filter(|k| *k == "stmt").count(), 100);
        let segments = kinds.iter().filter(|k| *k == "segment").count();
        assert!(segments > 3, "rotated {segments} times");
        assert_eq!(
            segments,
            kinds.iter().filter(|k| *k == "segment_end").count()
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn shipped_segments_are_reused() {
        let dir = temp_dir("recycle");
        let spool = AuditSpool::open(options(&dir, 4096, 1 << 30, FsyncPolicy::Never)).unwrap();
        let stream = dir.join("s1");
        let segments = |d: &Path| -> Vec<String> {
            let mut v: Vec<String> = fs::read_dir(d)
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(SEGMENT_SUFFIX) && !n.starts_with('.'))
                .collect();
            v.sort();
            v
        };
        for _ in 0..60 {
            spool
                .append("stmt", Admission::New, |b| b.str("sql", &"x".repeat(100)))
                .unwrap();
        }
        let first = segments(&stream)[0].clone();
        // What the shipper does with a segment it delivered.
        fs::rename(
            stream.join(&first),
            stream.join(format!("{FREE_PREFIX}1.seg")),
        )
        .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut reused = false;
        while std::time::Instant::now() < deadline && !reused {
            for _ in 0..20 {
                spool
                    .append("stmt", Admission::New, |b| b.str("sql", &"y".repeat(100)))
                    .unwrap();
            }
            reused = !fs::read_dir(&stream)
                .unwrap()
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(FREE_PREFIX));
        }
        assert!(reused, "the free segment was taken back");
        spool.close().unwrap();
        // Every remaining record still verifies, from the first remaining segment on.
        let lines = read_stream(&stream);
        let first: serde_json::Value = serde_json::from_slice(&lines[0]).unwrap();
        let mut prev = [0u8; HASH_LEN];
        let hex_prev = first["prev"].as_str().unwrap();
        for (i, b) in prev.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex_prev[2 * i..2 * i + 2], 16).unwrap();
        }
        for l in &lines {
            prev = verify_line(b"test-key", &prev, l).unwrap();
        }
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn oversized_record_gets_its_own_segment() {
        let dir = temp_dir("big");
        let spool = AuditSpool::open(options(&dir, 4096, 1 << 30, FsyncPolicy::Never)).unwrap();
        let big = "x".repeat(20_000);
        spool
            .append("stmt", Admission::New, |b| b.str("sql", &big))
            .unwrap();
        spool.close().unwrap();
        let lines = read_stream(&dir.join("s1"));
        assert!(lines.iter().any(|l| l.len() > 20_000));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn full_spool_refuses_new_statements_only() {
        let dir = temp_dir("full");
        let spool = AuditSpool::open(options(&dir, 4096, 3 * 4096, FsyncPolicy::Never)).unwrap();
        let mut refused = None;
        for i in 0..1000 {
            match spool.append("stmt", Admission::New, |b| b.str("sql", "SELECT 1")) {
                Ok(_) => {}
                Err(e) => {
                    refused = Some((i, e));
                    break;
                }
            }
        }
        let (i, e) = refused.expect("the spool fills up");
        assert!(i > 10);
        assert!(matches!(e, SpoolError::Full { .. }), "{e}");
        assert!(spool.is_full() || spool.usage_bytes() > 0);
        // Continuations still get in, even when that takes a segment beyond the bound...
        for _ in 0..40 {
            spool
                .append("end", Admission::Continuation, |b| {
                    b.str("pad", &"x".repeat(100))
                })
                .unwrap();
        }
        // ...and the room they leave is not for new statements.
        assert!(spool.is_full());
        assert!(matches!(
            spool.append("stmt", Admission::New, |b| b.str("sql", "SELECT 1")),
            Err(SpoolError::Full { .. })
        ));
        spool.close().unwrap();
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn synced_pages_are_unmapped_and_keep_their_records() {
        let dir = temp_dir("release");
        let spool = AuditSpool::open(options(&dir, 1 << 20, 1 << 30, FsyncPolicy::Always)).unwrap();
        let text = "x".repeat(300);
        let mut last = 0;
        for i in 0..150 {
            last = spool
                .append("stmt", Admission::New, |b| {
                    b.str("sql", &format!("SELECT {i} {text}"));
                })
                .unwrap();
            if i % 10 == 9 {
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                while spool.synced_seq() < last {
                    assert!(std::time::Instant::now() < deadline);
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        // The synced whole pages of the active segment were unmapped; what follows them
        // was still written through the mapping.
        let released = {
            let s = spool.shared.lock_sync();
            let current = s.current.as_ref().unwrap();
            current.released.load(Ordering::Acquire)
        };
        assert!(released >= 8 * page_size(), "released {released} bytes");
        assert_eq!(released % page_size(), 0);
        // Read before close: what the page cache holds for unmapped pages is intact.
        let lines = read_stream(&dir.join("s1"));
        let mut prev = [0u8; HASH_LEN];
        let mut sql = Vec::new();
        for (i, l) in lines.iter().enumerate() {
            prev = verify_line(b"test-key", &prev, l).unwrap_or_else(|e| panic!("line {i}: {e:?}"));
            let v: serde_json::Value = serde_json::from_slice(l).unwrap();
            if let Some(text) = v["sql"].as_str() {
                sql.push(text.to_owned());
            }
        }
        assert_eq!(sql.len(), 150);
        assert_eq!(sql[149], format!("SELECT 149 {text}"));
        assert_eq!(lines.len() as u64, last);
        spool.close().unwrap();
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn fsync_always_reports_synced_seq() {
        let dir = temp_dir("sync");
        let spool = AuditSpool::open(options(&dir, 1 << 16, 1 << 30, FsyncPolicy::Always)).unwrap();
        assert!(spool.notify_fd().is_some());
        let seq = spool
            .append("stmt", Admission::New, |b| b.str("sql", "SELECT 1"))
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while spool.synced_seq() < seq {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(1));
        }
        spool.close().unwrap();
        fs::remove_dir_all(dir).unwrap();
    }
}
