//! The main process's log: bounded, timestamped, on disk in the sandbox's state directory.
//!
//! The supervisor reads the main process's stdout and stderr from two pipes and appends what it reads, as
//! records, to `main.log` ([`LogWriter`]). When `main.log` would grow past half the configured bound it is
//! renamed to `main.log.1` (replacing the previous one) and a fresh `main.log` is started: the two files
//! together never exceed the bound, and at least the newest half of it is always kept. The daemon reads
//! them with [`LogReader`], also while they are being written and rotated.
//!
//! # Format (all integers little-endian)
//!
//! Each file starts with a 16-byte header: the magic `SBXLOG1\n` and the file's *generation* (`u64`).
//! Generations count up from 0 with each rotation: when `main.log` holds generation `g`, `main.log.1`
//! holds `g - 1`. Then come records, each a 16-byte header followed by its data:
//!
//! | bytes | field |
//! |---|---|
//! | 1 | magic `0xA7` |
//! | 1 | stream: 1 = stdout, 2 = stderr |
//! | 2 | flags (0) |
//! | 4 | data length (at most [`MAX_RECORD_DATA`]) |
//! | 8 | timestamp: nanoseconds since the Unix epoch when the supervisor wrote the record (never decreasing within a log) |
//!
//! The data are raw bytes (any encoding, binary included). Records are split at newlines: a record's data
//! is one line with its `\n`, except a *partial* line (no trailing `\n`): a line longer than
//! [`MAX_RECORD_DATA`] (cut into pieces), the last bytes before the stream ended, or bytes that waited for
//! their newline longer than the supervisor's flush interval.
//!
//! # Concurrency rules
//!
//! One writer (the supervisor), any number of readers. The writer only appends and renames: a new
//! generation is written (header) under a temporary name, the current file is renamed to `main.log.1`,
//! and the new one renamed to `main.log`, so every file a reader opens has a complete header. A reader
//! keeps its file open across renames and, once it has read to the end of it, moves to the next
//! generation only after seeing that one exists *and* re-reading its own file once more (the writer never
//! writes to a generation after starting the next): no record is lost or read twice unless the reader fell
//! a whole generation behind (then it was rotated away; the reader goes on with the oldest one left).
//! A record cut short at the end of a file that is still current is not yet complete: it is read again
//! later. Writes are batched, one `write` per batch of records.
//!
//! Sandboxes created before this format have `stdout.log` and `stderr.log` (raw bytes, no timestamps); a
//! reader that finds neither `main.log` nor `main.log.1` but one of those serves their content (the last
//! [`LEGACY_CAP`] bytes of each) as records timestamped with the file's modification time.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

/// The current log file.
pub const LOG_FILE: &str = "main.log";
/// The previous generation.
pub const ROTATED_FILE: &str = "main.log.1";
/// Where the next generation is prepared.
const NEW_FILE: &str = ".main.log.new";
/// Default bound on `main.log` + `main.log.1`.
pub const DEFAULT_MAX_BYTES: u64 = 16 << 20;
/// Smallest accepted bound (two files of at least two full records each).
pub const MIN_MAX_BYTES: u64 = 64 << 10;
/// Largest data of one record.
pub const MAX_RECORD_DATA: usize = 16 << 10;
/// Of each legacy file, at most this much is read.
pub const LEGACY_CAP: u64 = 16 << 20;

const FILE_MAGIC: &[u8; 8] = b"SBXLOG1\n";
const FILE_HEADER: u64 = 16;
const RECORD_MAGIC: u8 = 0xA7;
const RECORD_HEADER: usize = 16;
/// How much a reader asks the kernel for at once.
const READ_CHUNK: usize = 64 << 10;

/// Errors of the log reader and writer.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// A file operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LogError + 'a {
    move |source| LogError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Which output of the main process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl Stream {
    fn code(self) -> u8 {
        match self {
            Self::Stdout => 1,
            Self::Stderr => 2,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(Self::Stdout),
            2 => Some(Self::Stderr),
            _ => None,
        }
    }

    fn index(self) -> usize {
        match self {
            Self::Stdout => 0,
            Self::Stderr => 1,
        }
    }

    /// `stdout` or `stderr`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
        }
    }
}

/// One record of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Nanoseconds since the Unix epoch.
    pub timestamp_ns: u64,
    /// The stream the bytes came from.
    pub stream: Stream,
    /// The bytes: one line with its newline, or a partial line.
    pub data: Vec<u8>,
}

impl Record {
    /// True when the data do not end a line.
    pub fn is_partial(&self) -> bool {
        !self.data.ends_with(b"\n")
    }
}

/// A place in the log: a generation and a byte offset in its file. Ordered as the records are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    /// The file's generation.
    pub generation: u64,
    /// Offset of a record in that file (the file header counts).
    pub offset: u64,
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn file_header(generation: u64) -> [u8; FILE_HEADER as usize] {
    let mut h = [0u8; FILE_HEADER as usize];
    h[..8].copy_from_slice(FILE_MAGIC);
    h[8..].copy_from_slice(&generation.to_le_bytes());
    h
}

/// The generation in a file header, if it is one.
fn parse_file_header(h: &[u8]) -> Option<u64> {
    if h.len() < FILE_HEADER as usize || &h[..8] != FILE_MAGIC {
        return None;
    }
    let mut g = [0u8; 8];
    g.copy_from_slice(&h[8..16]);
    Some(u64::from_le_bytes(g))
}

fn encode_record(out: &mut Vec<u8>, timestamp_ns: u64, stream: Stream, data: &[u8]) {
    out.push(RECORD_MAGIC);
    out.push(stream.code());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(&timestamp_ns.to_le_bytes());
    out.extend_from_slice(data);
}

// ------------------------------------------------------------------------------------------- writer

/// Appends the main process's output to the log (the supervisor's side). Not thread-safe; one per log.
#[derive(Debug)]
pub struct LogWriter {
    dir: PathBuf,
    /// Bound of one file (half the total).
    file_cap: u64,
    file: File,
    /// Bytes in `file`.
    size: u64,
    generation: u64,
    last_ts: u64,
    /// Encoded records not yet written.
    out: Vec<u8>,
    /// Per stream, the bytes of a line still waiting for its newline.
    partial: [Vec<u8>; 2],
}

impl LogWriter {
    /// Opens the log in `dir` bounded to `max_bytes` in all (at least [`MIN_MAX_BYTES`]): continues an
    /// existing `main.log`, else starts generation 0.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, LogError> {
        let path = dir.join(LOG_FILE);
        let existing = match File::open(&path) {
            Ok(mut f) => {
                let mut h = [0u8; FILE_HEADER as usize];
                match f.read_exact(&mut h) {
                    Ok(()) => parse_file_header(&h),
                    Err(_) => None,
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err("opening", &path)(e)),
        };
        let mut w = Self {
            dir: dir.to_path_buf(),
            file_cap: max_bytes.max(MIN_MAX_BYTES) / 2,
            file: File::open("/dev/null").map_err(io_err("opening", Path::new("/dev/null")))?,
            size: 0,
            generation: 0,
            last_ts: 0,
            out: Vec::with_capacity(READ_CHUNK + 1024),
            partial: [Vec::new(), Vec::new()],
        };
        match existing {
            Some(g) => {
                w.file = OpenOptions::new()
                    .append(true)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(&path)
                    .map_err(io_err("opening", &path))?;
                w.size = w.file.metadata().map_err(io_err("stat", &path))?.len();
                w.generation = g;
                if w.size > w.file_cap {
                    w.start_generation(g + 1)?;
                }
            }
            None => w.start_generation(0)?,
        }
        Ok(w)
    }

    /// Writes a new generation under a temporary name and moves it into place (the current file, if
    /// any, becomes `main.log.1`).
    fn start_generation(&mut self, generation: u64) -> Result<(), LogError> {
        let tmp = self.dir.join(NEW_FILE);
        let _ = std::fs::remove_file(&tmp);
        let mut f = OpenOptions::new()
            .append(true)
            .create_new(true)
            .mode(0o640)
            .custom_flags(libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(io_err("creating", &tmp))?;
        f.write_all(&file_header(generation))
            .map_err(io_err("writing", &tmp))?;
        let cur = self.dir.join(LOG_FILE);
        if generation > 0 {
            match std::fs::rename(&cur, self.dir.join(ROTATED_FILE)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("rotating", &cur)(e)),
            }
        }
        std::fs::rename(&tmp, &cur).map_err(io_err("renaming", &tmp))?;
        self.file = f;
        self.size = FILE_HEADER;
        self.generation = generation;
        Ok(())
    }

    fn stamp(&mut self) -> u64 {
        self.last_ts = now_ns().max(self.last_ts);
        self.last_ts
    }

    /// Encodes one record (at most [`MAX_RECORD_DATA`] bytes), rotating first when it would not fit.
    fn push_record(&mut self, stream: Stream, data: &[u8]) -> Result<(), LogError> {
        let len = (RECORD_HEADER + data.len()) as u64;
        if self.size + self.out.len() as u64 + len > self.file_cap {
            self.flush_out()?;
            self.start_generation(self.generation + 1)?;
        }
        let ts = self.stamp();
        encode_record(&mut self.out, ts, stream, data);
        Ok(())
    }

    /// Encodes `data` as records of at most [`MAX_RECORD_DATA`] bytes.
    fn push_data(&mut self, stream: Stream, data: &[u8]) -> Result<(), LogError> {
        for chunk in data.chunks(MAX_RECORD_DATA) {
            self.push_record(stream, chunk)?;
        }
        Ok(())
    }

    fn flush_out(&mut self) -> Result<(), LogError> {
        if self.out.is_empty() {
            return Ok(());
        }
        let n = self.out.len() as u64;
        let res = self.file.write_all(&self.out);
        self.out.clear();
        match res {
            Ok(()) => {
                self.size += n;
                Ok(())
            }
            Err(e) => {
                // Whatever part was written counts; the rest is lost.
                if let Ok(m) = self.file.metadata() {
                    self.size = m.len();
                }
                Err(io_err("writing", &self.dir.join(LOG_FILE))(e))
            }
        }
    }

    /// Appends bytes read from `stream`: complete lines become records at once, a line without its
    /// newline waits (see [`LogWriter::flush_partial`]) unless it reached [`MAX_RECORD_DATA`].
    pub fn write(&mut self, stream: Stream, mut data: &[u8]) -> Result<(), LogError> {
        let i = stream.index();
        let res = (|| {
            while !data.is_empty() {
                match data.iter().position(|b| *b == b'\n') {
                    Some(nl) => {
                        let (line, rest) = data.split_at(nl + 1);
                        if self.partial[i].is_empty() {
                            self.push_data(stream, line)?;
                        } else {
                            let mut p = std::mem::take(&mut self.partial[i]);
                            p.extend_from_slice(line);
                            let r = self.push_data(stream, &p);
                            p.clear();
                            self.partial[i] = p;
                            r?;
                        }
                        data = rest;
                    }
                    None => {
                        self.partial[i].extend_from_slice(data);
                        data = &[];
                        while self.partial[i].len() >= MAX_RECORD_DATA {
                            let p = std::mem::take(&mut self.partial[i]);
                            let r = self.push_record(stream, &p[..MAX_RECORD_DATA]);
                            self.partial[i] = p[MAX_RECORD_DATA..].to_vec();
                            r?;
                        }
                    }
                }
            }
            Ok(())
        })();
        let flushed = self.flush_out();
        res.and(flushed)
    }

    /// True when some stream has a line waiting for its newline.
    pub fn has_partial(&self) -> bool {
        self.partial.iter().any(|p| !p.is_empty())
    }

    /// Writes the lines waiting for their newline as partial records (after a pause in the output, and at
    /// the end).
    pub fn flush_partial(&mut self) -> Result<(), LogError> {
        let res = (|| {
            for stream in [Stream::Stdout, Stream::Stderr] {
                let p = std::mem::take(&mut self.partial[stream.index()]);
                if !p.is_empty() {
                    self.push_data(stream, &p)?;
                }
            }
            Ok(())
        })();
        let flushed = self.flush_out();
        res.and(flushed)
    }

    /// Bytes on disk now (both files).
    pub fn disk_bytes(&self) -> u64 {
        let rotated = std::fs::metadata(self.dir.join(ROTATED_FILE)).map_or(0, |m| m.len());
        self.size + rotated
    }
}

// ------------------------------------------------------------------------------------------- reader

/// One generation's file, open, with a read buffer.
#[derive(Debug)]
struct GenFile {
    generation: u64,
    file: File,
    /// File offset of `buf[0]`.
    buf_off: u64,
    buf: Vec<u8>,
    /// Offset of the next record.
    pos: u64,
}

enum ReadOutcome {
    Record(Record),
    /// Nothing complete at `pos` (yet).
    Incomplete,
}

impl GenFile {
    /// `Ok(None)` when the file does not exist or has no valid header.
    fn open(path: &Path) -> Result<Option<Self>, LogError> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("opening", path)(e)),
        };
        let mut h = [0u8; FILE_HEADER as usize];
        let n = read_full_at(&file, &mut h, 0).map_err(io_err("reading", path))?;
        let Some(generation) = parse_file_header(&h[..n]) else {
            return Ok(None);
        };
        Ok(Some(Self {
            generation,
            file,
            buf_off: 0,
            buf: Vec::new(),
            pos: FILE_HEADER,
        }))
    }

    /// Makes `buf` cover `[at, at + n)` if the file has that much; false when it has not (yet).
    fn ensure(&mut self, at: u64, n: usize) -> io::Result<bool> {
        let end = at + n as u64;
        if at >= self.buf_off && end <= self.buf_off + self.buf.len() as u64 {
            return Ok(true);
        }
        let want = n.max(READ_CHUNK);
        self.buf.clear();
        self.buf.resize(want, 0);
        let got = read_full_at(&self.file, &mut self.buf, at)?;
        self.buf.truncate(got);
        self.buf_off = at;
        Ok(got >= n)
    }

    fn read(&mut self) -> io::Result<ReadOutcome> {
        if !self.ensure(self.pos, RECORD_HEADER)? {
            return Ok(ReadOutcome::Incomplete);
        }
        let s = (self.pos - self.buf_off) as usize;
        let h = &self.buf[s..s + RECORD_HEADER];
        let stream = Stream::from_code(h[1]);
        let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&h[8..16]);
        let (Some(stream), RECORD_MAGIC, true) = (stream, h[0], len <= MAX_RECORD_DATA) else {
            // Not a record: a torn write of a supervisor that died. Nothing after it is readable.
            return Ok(ReadOutcome::Incomplete);
        };
        if !self.ensure(self.pos, RECORD_HEADER + len)? {
            return Ok(ReadOutcome::Incomplete);
        }
        let s = (self.pos - self.buf_off) as usize + RECORD_HEADER;
        let data = self.buf[s..s + len].to_vec();
        self.pos += (RECORD_HEADER + len) as u64;
        Ok(ReadOutcome::Record(Record {
            timestamp_ns: u64::from_le_bytes(ts),
            stream,
            data,
        }))
    }
}

/// Reads as many bytes as the file has at `off`, up to `buf.len()`.
fn read_full_at(f: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], off + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Reads the log of one sandbox in order, following generations; usable while the log grows (see the
/// module documentation for why no record is lost or repeated across a rotation).
#[derive(Debug)]
pub struct LogReader {
    dir: PathBuf,
    cur: Option<GenFile>,
    /// Where to start: the first record at or after this position.
    start: Position,
    /// Records of a legacy log (`stdout.log`/`stderr.log`), when that is what the directory has.
    legacy: Option<VecDeque<Record>>,
}

impl LogReader {
    /// A reader from the oldest record kept.
    pub fn new(dir: &Path) -> Self {
        Self::at(dir, Position::default())
    }

    /// A reader from `pos` (a position returned by [`LogReader::position`] or [`tail_start`]); when that
    /// generation is gone, from the oldest one after it.
    pub fn at(dir: &Path, pos: Position) -> Self {
        Self {
            dir: dir.to_path_buf(),
            cur: None,
            start: pos,
            legacy: None,
        }
    }

    /// The position of the next record to be read.
    pub fn position(&self) -> Position {
        match &self.cur {
            Some(c) => Position {
                generation: c.generation,
                offset: c.pos,
            },
            None => self.start,
        }
    }

    /// The open generation with the smallest number at least `min`. A rotation between the two opens can
    /// hide one generation; a result past `min` is therefore confirmed by a second look.
    fn open_generation(dir: &Path, min: u64) -> Result<Option<GenFile>, LogError> {
        let mut best: Option<GenFile> = None;
        for _ in 0..3 {
            best = None;
            for name in [ROTATED_FILE, LOG_FILE] {
                let path = dir.join(name);
                if let Some(f) = GenFile::open(&path)? {
                    if f.generation >= min
                        && best.as_ref().is_none_or(|b| f.generation < b.generation)
                    {
                        best = Some(f);
                    }
                }
            }
            match &best {
                Some(b) if b.generation > min => continue,
                _ => break,
            }
        }
        Ok(best)
    }

    /// The next record; `Ok(None)` when there is none (yet): a later call may find more.
    pub fn next_record(&mut self) -> Result<Option<Record>, LogError> {
        if let Some(l) = &mut self.legacy {
            return Ok(l.pop_front());
        }
        loop {
            if self.cur.is_none() {
                match Self::open_generation(&self.dir, self.start.generation)? {
                    Some(mut f) => {
                        if f.generation == self.start.generation {
                            f.pos = self.start.offset.max(FILE_HEADER);
                        }
                        self.cur = Some(f);
                    }
                    None => {
                        if self.start == Position::default() && self.try_legacy()? {
                            let l = self.legacy.as_mut().map(VecDeque::pop_front);
                            return Ok(l.flatten());
                        }
                        return Ok(None);
                    }
                }
            }
            let Some(cur) = self.cur.as_mut() else {
                return Ok(None);
            };
            let path = self.dir.join(LOG_FILE);
            if let ReadOutcome::Record(r) = cur.read().map_err(io_err("reading", &path))? {
                return Ok(Some(r));
            }
            let g = cur.generation;
            let Some(newer) = Self::open_generation(&self.dir, g + 1)? else {
                return Ok(None);
            };
            // A newer generation exists, so this one is final: what was appended to it before the rotation
            // is read first.
            if let ReadOutcome::Record(r) = cur.read().map_err(io_err("reading", &path))? {
                return Ok(Some(r));
            }
            self.start = Position {
                generation: newer.generation,
                offset: FILE_HEADER,
            };
            self.cur = Some(newer);
        }
    }

    /// Loads `stdout.log` and `stderr.log` when the directory has them and no new-format log.
    fn try_legacy(&mut self) -> Result<bool, LogError> {
        let mut records = VecDeque::new();
        let mut found = false;
        for (name, stream) in [
            ("stdout.log", Stream::Stdout),
            ("stderr.log", Stream::Stderr),
        ] {
            let path = self.dir.join(name);
            let data = match read_legacy_tail(&path) {
                Ok(Some(d)) => d,
                Ok(None) => continue,
                Err(e) => return Err(io_err("reading", &path)(e)),
            };
            found = true;
            let (ts, bytes) = data;
            for line in bytes.split_inclusive(|b| *b == b'\n') {
                for chunk in line.chunks(MAX_RECORD_DATA) {
                    records.push_back(Record {
                        timestamp_ns: ts,
                        stream,
                        data: chunk.to_vec(),
                    });
                }
            }
        }
        if found {
            self.legacy = Some(records);
        }
        Ok(found)
    }
}

fn read_legacy_tail(path: &Path) -> io::Result<Option<(u64, Vec<u8>)>> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = f.metadata()?;
    let ts = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    let len = meta.len();
    let start = len.saturating_sub(LEGACY_CAP);
    let mut buf = vec![0u8; (len - start) as usize];
    let n = read_full_at(&f, &mut buf, start)?;
    buf.truncate(n);
    Ok(Some((ts, buf)))
}

/// Which streams a read is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamFilter {
    /// Include stdout.
    pub stdout: bool,
    /// Include stderr.
    pub stderr: bool,
}

impl Default for StreamFilter {
    fn default() -> Self {
        Self {
            stdout: true,
            stderr: true,
        }
    }
}

impl StreamFilter {
    /// Whether records of `s` pass.
    pub fn allows(self, s: Stream) -> bool {
        match s {
            Stream::Stdout => self.stdout,
            Stream::Stderr => self.stderr,
        }
    }
}

/// Where to start reading to get the last `lines` lines of the streams `filter` allows, in order over both.
///
/// A line ends with a record that ends with a newline, or with the last record of its stream when that is
/// partial. (Pieces of a line longer than [`MAX_RECORD_DATA`] that precede the cut are left out when the
/// other stream wrote in between.)
pub fn tail_start(dir: &Path, lines: u64, filter: StreamFilter) -> Result<Position, LogError> {
    let mut r = LogReader::new(dir);
    if r.next_is_legacy()? {
        // Legacy logs have no positions; the caller gets everything.
        return Ok(Position::default());
    }
    let keep = usize::try_from(lines)
        .unwrap_or(usize::MAX)
        .saturating_add(1);
    let mut ends: VecDeque<Position> = VecDeque::new();
    let mut last_partial: [Option<Position>; 2] = [None, None];
    while let Some(rec) = r.next_record()? {
        if !filter.allows(rec.stream) {
            continue;
        }
        let after = r.position();
        if rec.is_partial() {
            last_partial[rec.stream.index()] = Some(after);
        } else {
            last_partial[rec.stream.index()] = None;
            ends.push_back(after);
            if ends.len() > keep {
                ends.pop_front();
            }
        }
    }
    let mut all: Vec<Position> = ends
        .into_iter()
        .chain(last_partial.into_iter().flatten())
        .collect();
    all.sort();
    let n = usize::try_from(lines).unwrap_or(usize::MAX);
    if all.len() > n {
        Ok(all[all.len() - n - 1])
    } else {
        Ok(Position::default())
    }
}

impl LogReader {
    /// True when this reader serves a legacy log (checked before the first record).
    fn next_is_legacy(&mut self) -> Result<bool, LogError> {
        if self.legacy.is_some() {
            return Ok(true);
        }
        if self.cur.is_some() || Self::open_generation(&self.dir, 0)?.is_some() {
            return Ok(false);
        }
        self.try_legacy()
    }
}

/// The last `cap` bytes of each stream, concatenated (for the logs answer that is not a stream).
pub fn read_streams(dir: &Path, cap: usize) -> Result<(Vec<u8>, Vec<u8>), LogError> {
    let mut out: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    let mut r = LogReader::new(dir);
    while let Some(rec) = r.next_record()? {
        let b = &mut out[rec.stream.index()];
        b.extend_from_slice(&rec.data);
        if b.len() > cap.saturating_mul(2).max(MAX_RECORD_DATA) {
            let cut = b.len() - cap;
            b.drain(..cut);
        }
    }
    for b in &mut out {
        if b.len() > cap {
            let cut = b.len() - cap;
            b.drain(..cut);
        }
    }
    let [o, e] = out;
    Ok((o, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(dir: &Path) -> Vec<Record> {
        let mut r = LogReader::new(dir);
        let mut v = Vec::new();
        while let Some(rec) = r.next_record().unwrap() {
            v.push(rec);
        }
        v
    }

    fn text(recs: &[Record]) -> Vec<String> {
        recs.iter()
            .map(|r| format!("{}:{}", r.stream.as_str(), String::from_utf8_lossy(&r.data)))
            .collect()
    }

    #[test]
    fn lines_become_records_and_partials_wait() {
        let d = tempfile::tempdir().unwrap();
        let mut w = LogWriter::open(d.path(), DEFAULT_MAX_BYTES).unwrap();
        w.write(Stream::Stdout, b"a\nb").unwrap();
        w.write(Stream::Stderr, b"e1\n").unwrap();
        assert!(w.has_partial());
        w.write(Stream::Stdout, b"c\nd").unwrap();
        assert_eq!(
            text(&all(d.path())),
            ["stdout:a\n", "stderr:e1\n", "stdout:bc\n"]
        );
        w.flush_partial().unwrap();
        assert!(!w.has_partial());
        let recs = all(d.path());
        assert_eq!(
            text(&recs),
            ["stdout:a\n", "stderr:e1\n", "stdout:bc\n", "stdout:d"]
        );
        assert!(recs[3].is_partial() && !recs[2].is_partial());
        // Timestamps never decrease.
        assert!(recs
            .windows(2)
            .all(|w| w[0].timestamp_ns <= w[1].timestamp_ns));
        assert!(recs[0].timestamp_ns > 1_600_000_000_000_000_000);
        let (o, e) = read_streams(d.path(), 1 << 20).unwrap();
        assert_eq!(
            (o.as_slice(), e.as_slice()),
            (&b"a\nbc\nd"[..], &b"e1\n"[..])
        );
    }

    #[test]
    fn long_lines_are_cut_and_binary_survives() {
        let d = tempfile::tempdir().unwrap();
        let mut w = LogWriter::open(d.path(), DEFAULT_MAX_BYTES).unwrap();
        let long = vec![b'x'; MAX_RECORD_DATA * 2 + 10];
        w.write(Stream::Stdout, &long).unwrap();
        // Two full pieces are out at once; the rest waits for its newline.
        assert_eq!(all(d.path()).len(), 2);
        w.write(Stream::Stdout, b"\n").unwrap();
        let bin: Vec<u8> = (0..=255u8).chain(0..=255u8).collect();
        w.write(Stream::Stderr, &bin).unwrap();
        w.flush_partial().unwrap();
        let recs = all(d.path());
        // 2 pieces and the end of the long line; the binary data has two newlines: 3 records.
        assert_eq!(recs.len(), 6);
        assert!(recs[5].is_partial() && recs[5].stream == Stream::Stderr);
        assert!(recs[..2]
            .iter()
            .all(|r| r.data.len() == MAX_RECORD_DATA && r.is_partial()));
        assert_eq!(recs[2].data.len(), 11);
        let (o, e) = read_streams(d.path(), 1 << 20).unwrap();
        let mut want = long.clone();
        want.push(b'\n');
        assert_eq!(o, want);
        assert_eq!(e, bin);
    }

    #[test]
    fn rotation_bounds_the_size_and_keeps_the_tail_in_order() {
        let d = tempfile::tempdir().unwrap();
        let max = MIN_MAX_BYTES;
        let mut w = LogWriter::open(d.path(), max).unwrap();
        // A reader that follows along, reading a little after each write, across many rotations.
        let mut follower = LogReader::new(d.path());
        let mut followed = Vec::new();
        for i in 0..5000u32 {
            w.write(Stream::Stdout, format!("line {i}\n").as_bytes())
                .unwrap();
            if i % 7 == 0 {
                while let Some(r) = follower.next_record().unwrap() {
                    followed.push(r);
                }
            }
            let on_disk = std::fs::metadata(d.path().join(LOG_FILE)).unwrap().len()
                + std::fs::metadata(d.path().join(ROTATED_FILE)).map_or(0, |m| m.len());
            assert!(on_disk <= max, "{on_disk} > {max}");
            assert_eq!(on_disk, w.disk_bytes());
        }
        while let Some(r) = follower.next_record().unwrap() {
            followed.push(r);
        }
        // The follower saw every line exactly once, in order.
        let want: Vec<String> = (0..5000).map(|i| format!("stdout:line {i}\n")).collect();
        assert_eq!(text(&followed), want);
        // A reader starting now sees a contiguous tail ending with the last line.
        let recs = all(d.path());
        let t = text(&recs);
        assert!(t.len() > 1000, "{}", t.len());
        assert_eq!(t[..], want[want.len() - t.len()..]);
        assert!(!d.path().join(NEW_FILE).exists());
        // Re-opening continues the generation count.
        drop(w);
        let mut w = LogWriter::open(d.path(), max).unwrap();
        w.write(Stream::Stderr, b"after\n").unwrap();
        let t = text(&all(d.path()));
        assert_eq!(t.last().map(String::as_str), Some("stderr:after\n"));
        assert_eq!(t[t.len() - 2], "stdout:line 4999\n");
    }

    #[test]
    fn a_slow_reader_skips_to_the_oldest_generation_left() {
        let d = tempfile::tempdir().unwrap();
        let mut w = LogWriter::open(d.path(), MIN_MAX_BYTES).unwrap();
        let mut r = LogReader::new(d.path());
        w.write(Stream::Stdout, b"first\n").unwrap();
        assert_eq!(
            text(&[r.next_record().unwrap().unwrap()]),
            ["stdout:first\n"]
        );
        for i in 0..20000u32 {
            w.write(Stream::Stdout, format!("l{i}\n").as_bytes())
                .unwrap();
        }
        // The reader still holds generation 0 open: it finishes it, then goes on with the oldest file left.
        let mut got = Vec::new();
        while let Some(rec) = r.next_record().unwrap() {
            got.push(rec);
        }
        let t = text(&got);
        assert_eq!(t.last().map(String::as_str), Some("stdout:l19999\n"));
        let nums: Vec<u32> = t
            .iter()
            .map(|s| s.trim_start_matches("stdout:l").trim_end().parse().unwrap())
            .collect();
        assert!(nums.windows(2).all(|w| w[0] < w[1]), "out of order");
    }

    #[test]
    fn tail_counts_lines_over_both_streams() {
        let d = tempfile::tempdir().unwrap();
        let mut w = LogWriter::open(d.path(), DEFAULT_MAX_BYTES).unwrap();
        w.write(Stream::Stdout, b"o1\no2\n").unwrap();
        w.write(Stream::Stderr, b"e1\n").unwrap();
        w.write(Stream::Stdout, b"o3\n").unwrap();
        w.write(Stream::Stderr, b"e2-partial").unwrap();
        w.flush_partial().unwrap();
        let read_from = |pos: Position| {
            let mut r = LogReader::at(d.path(), pos);
            let mut v = Vec::new();
            while let Some(rec) = r.next_record().unwrap() {
                v.push(rec);
            }
            text(&v)
        };
        let both = StreamFilter::default();
        assert_eq!(
            read_from(tail_start(d.path(), 2, both).unwrap()),
            ["stdout:o3\n", "stderr:e2-partial"]
        );
        assert_eq!(read_from(tail_start(d.path(), 3, both).unwrap()).len(), 3);
        assert_eq!(read_from(tail_start(d.path(), 100, both).unwrap()).len(), 5);
        assert!(read_from(tail_start(d.path(), 0, both).unwrap()).is_empty());
        let out_only = StreamFilter {
            stdout: true,
            stderr: false,
        };
        let t: Vec<String> = read_from(tail_start(d.path(), 2, out_only).unwrap())
            .into_iter()
            .filter(|l| l.starts_with("stdout"))
            .collect();
        assert_eq!(t, ["stdout:o2\n", "stdout:o3\n"]);
    }

    #[test]
    fn torn_records_and_missing_logs() {
        let d = tempfile::tempdir().unwrap();
        assert!(all(d.path()).is_empty());
        assert_eq!(read_streams(d.path(), 10).unwrap(), (vec![], vec![]));
        let mut w = LogWriter::open(d.path(), DEFAULT_MAX_BYTES).unwrap();
        w.write(Stream::Stdout, b"ok\n").unwrap();
        // Half a record (a write still in progress, or cut short): not returned, and reading goes on later.
        let mut f = OpenOptions::new()
            .append(true)
            .open(d.path().join(LOG_FILE))
            .unwrap();
        let mut rec = Vec::new();
        encode_record(&mut rec, 1, Stream::Stdout, b"later\n");
        f.write_all(&rec[..10]).unwrap();
        let mut r = LogReader::new(d.path());
        assert_eq!(text(&[r.next_record().unwrap().unwrap()]), ["stdout:ok\n"]);
        assert!(r.next_record().unwrap().is_none());
        f.write_all(&rec[10..]).unwrap();
        assert_eq!(
            text(&[r.next_record().unwrap().unwrap()]),
            ["stdout:later\n"]
        );
    }

    #[test]
    fn legacy_logs_are_read() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("stdout.log"), b"a\nb\n").unwrap();
        std::fs::write(d.path().join("stderr.log"), b"err").unwrap();
        assert_eq!(
            text(&all(d.path())),
            ["stdout:a\n", "stdout:b\n", "stderr:err"]
        );
        assert_eq!(
            tail_start(d.path(), 1, StreamFilter::default()).unwrap(),
            Position::default()
        );
        let (o, e) = read_streams(d.path(), 1).unwrap();
        assert_eq!((o.as_slice(), e.as_slice()), (&b"\n"[..], &b"r"[..]));
    }
}
