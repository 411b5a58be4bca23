//! Every file-system operation the engine performs, behind one small trait: the real one
//! ([`OsDisk`]) and, in tests, a simulated disk that records writes, fsyncs, links and renames
//! and can "lose power" by dropping whatever was not synced (`sim_disk.rs`). The index (redb)
//! goes through the same disk via redb's `StorageBackend`.

use std::{
    fs::{self, File},
    io::{self, Write},
    path::{Path, PathBuf},
    time::SystemTime,
};

use bytes::Bytes;
use redb::{Builder, Database, DatabaseError};

/// A file being written.
pub trait DiskFile: Send {
    /// Appends `data`.
    fn write_all(&mut self, data: &[u8]) -> io::Result<()>;
    /// Makes what was written durable.
    fn sync_data(&mut self) -> io::Result<()>;
}

/// A segment file: chunks written at offsets (each writer owns its range), read back at
/// offsets by anyone. Every method takes `&self` so one open handle serves the writer and all
/// readers (`pwrite`/`pread`).
pub trait SegmentFile: Send + Sync {
    /// Writes `data` at `offset`.
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Reads exactly `buf.len()` bytes at `offset` (`UnexpectedEof` past the end).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Reads exactly `len` bytes at `offset` into a new buffer (`UnexpectedEof` past the end).
    /// The default zero-fills a buffer and calls [`SegmentFile::read_at`]; a file that can read
    /// into uninitialised memory skips the fill (a chunk read's largest CPU cost after hashing).
    fn read_vec(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.read_at(offset, &mut buf)?;
        Ok(buf)
    }
    /// Reads exactly `len` bytes at `offset` as shared bytes (`UnexpectedEof` past the end).
    /// The default reads through [`SegmentFile::read_vec`].
    fn read_bytes(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        Ok(Bytes::from(self.read_vec(offset, len)?))
    }
    /// Makes what was written durable (data and the file's length).
    fn sync_data(&self) -> io::Result<()>;
    /// The file's current length.
    fn len(&self) -> io::Result<u64>;
    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Gives the space of a dead range back to the file system (the length stays); a file
    /// system without hole punching keeps the bytes until compaction.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
}

/// The file-system operations of the engine.
pub trait Disk: Send + Sync + std::fmt::Debug + 'static {
    /// Creates a directory and its parents.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Whether `dir` is a directory.
    fn is_dir(&self, dir: &Path) -> bool;
    /// Makes a directory's entries durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Creates (or truncates) a file for writing.
    fn create(&self, path: &Path) -> io::Result<Box<dyn DiskFile>>;
    /// Reads a whole file.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// Makes an existing file's data durable.
    fn sync_file(&self, path: &Path) -> io::Result<()>;
    /// Gives `src` the additional name `dst`; fails with `AlreadyExists` if `dst` exists.
    fn hard_link(&self, src: &Path, dst: &Path) -> io::Result<()>;
    /// Renames `src` to `dst`, replacing it.
    fn rename(&self, src: &Path, dst: &Path) -> io::Result<()>;
    /// Removes a name.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// The files in `dir` with their modification times.
    fn list(&self, dir: &Path) -> io::Result<Vec<(PathBuf, Option<SystemTime>)>>;
    /// Free bytes on the volume holding `path` (`None`: unknown).
    fn free_bytes(&self, path: &Path) -> Option<u64>;
    /// Size of the volume holding `path` (`None`: unknown).
    fn total_bytes(&self, path: &Path) -> Option<u64>;
    /// Opens a segment file for reading and writing; `create`: a new one (it must not exist).
    fn open_segment(&self, path: &Path, create: bool) -> io::Result<std::sync::Arc<dyn SegmentFile>>;
    /// Opens (or creates) the index database at `path`.
    fn open_index(&self, path: &Path, builder: &Builder) -> Result<Database, DatabaseError>;
}

/// The operating system's file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct OsDisk;

struct OsFile(File);

impl DiskFile for OsFile {
    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.0.write_all(data)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
}

/// Reads at least this long bypass the page cache (when the file system allows it).
const DIRECT_READ_MIN: usize = 256 * 1024;
/// The alignment of offsets, lengths and buffers that `O_DIRECT` asks for.
const DIRECT_ALIGN: usize = 4096;

/// A segment: one handle for writes and small reads, and one opened with `O_DIRECT` (none where
/// the file system refuses it, e.g. tmpfs) for chunk-sized reads. A whole-chunk read through the
/// page cache costs a copy of every byte out of it — on a download the largest CPU cost after
/// TLS and hashing —, and once read a chunk is streamed away, not read again soon. The kernel
/// writes back dirty cached pages of a range before a direct read of it, so both handles see the
/// same bytes.
struct OsSegment {
    file: File,
    direct: Option<File>,
    direct_failed: std::sync::atomic::AtomicBool,
}

impl OsSegment {
    fn open(path: &Path, create: bool) -> io::Result<OsSegment> {
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(create)
            .open(path)?;
        let direct = {
            use std::os::unix::fs::OpenOptionsExt;
            fs::OpenOptions::new()
                .read(true)
                .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
                .open(path)
                .ok()
        };
        Ok(OsSegment {
            file,
            direct,
            direct_failed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// `len` bytes at `offset` read with `O_DIRECT`: the aligned range around them into an
    /// aligned place of a buffer, then sliced (no copy). `None` when a direct read is refused
    /// (the caller reads through the cache instead, and so does every later read).
    fn read_direct(&self, direct: &File, offset: u64, len: usize) -> Option<io::Result<Bytes>> {
        let align = DIRECT_ALIGN as u64;
        let start = offset - offset % align;
        let end = (offset + len as u64).div_ceil(align) * align;
        let span = (end - start) as usize;
        let mut buf = vec![0u8; span + DIRECT_ALIGN];
        let pad = (DIRECT_ALIGN - buf.as_ptr() as usize % DIRECT_ALIGN) % DIRECT_ALIGN;
        let need = (offset - start) as usize + len;
        let mut got = 0usize;
        while got < need {
            let at = start + got as u64;
            let Some(dst) = buf.get_mut(pad + got..pad + span) else {
                return Some(Err(io::Error::other("direct read buffer out of range")));
            };
            match std::os::unix::fs::FileExt::read_at(direct, dst, at) {
                Ok(0) => {
                    return Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("{} bytes missing at offset {}", need - got, at),
                    )));
                }
                Ok(n) => {
                    got += n;
                    // A direct read comes back short only at the end of the file: another read
                    // from an unaligned place would be refused, and there is nothing there.
                    if got < need && !got.is_multiple_of(DIRECT_ALIGN) {
                        return Some(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("{} bytes missing at offset {}", need - got, start + got as u64),
                        )));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                    self.direct_failed.store(true, std::sync::atomic::Ordering::Relaxed);
                    return None;
                }
                Err(e) => return Some(Err(e)),
            }
        }
        let from = pad + (offset - start) as usize;
        Some(Ok(Bytes::from(buf).slice(from..from + len)))
    }
}

impl SegmentFile for OsSegment {
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.file, data, offset)
    }
    fn read_bytes(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        if len >= DIRECT_READ_MIN
            && !self.direct_failed.load(std::sync::atomic::Ordering::Relaxed)
            && let Some(direct) = &self.direct
            && let Some(r) = self.read_direct(direct, offset, len)
        {
            return r;
        }
        Ok(Bytes::from(self.read_vec(offset, len)?))
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.file, buf, offset)
    }
    fn read_vec(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = Vec::with_capacity(len);
        while buf.len() < len {
            let at = offset + buf.len() as u64;
            let want = len - buf.len();
            // `spare_capacity` reads into the uninitialised tail and extends the length by what
            // was read: no zero fill, no unsafe code here.
            let got = match rustix::io::pread(&self.file, rustix::buffer::spare_capacity(&mut buf), at) {
                Ok(n) => n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            };
            if got == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{want} bytes missing at offset {at}"),
                ));
            }
        }
        Ok(buf)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        use rustix::fs::FallocateFlags;
        match rustix::fs::fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(()),
            Err(e) if e == rustix::io::Errno::OPNOTSUPP => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

impl Disk for OsDisk {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }
    fn is_dir(&self, dir: &Path) -> bool {
        dir.is_dir()
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
    fn create(&self, path: &Path) -> io::Result<Box<dyn DiskFile>> {
        Ok(Box::new(OsFile(File::create(path)?)))
    }
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        fs::read(path)
    }
    fn sync_file(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_data()
    }
    fn hard_link(&self, src: &Path, dst: &Path) -> io::Result<()> {
        fs::hard_link(src, dst)
    }
    fn rename(&self, src: &Path, dst: &Path) -> io::Result<()> {
        fs::rename(src, dst)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<(PathBuf, Option<SystemTime>)>> {
        let mut out = Vec::new();
        for e in fs::read_dir(dir)? {
            let e = e?;
            let mtime = e.metadata().and_then(|m| m.modified()).ok();
            out.push((e.path(), mtime));
        }
        Ok(out)
    }
    fn free_bytes(&self, path: &Path) -> Option<u64> {
        rustix::fs::statvfs(path)
            .ok()
            .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
    }
    fn total_bytes(&self, path: &Path) -> Option<u64> {
        rustix::fs::statvfs(path)
            .ok()
            .map(|s| s.f_blocks.saturating_mul(s.f_frsize))
    }
    fn open_segment(&self, path: &Path, create: bool) -> io::Result<std::sync::Arc<dyn SegmentFile>> {
        Ok(std::sync::Arc::new(OsSegment::open(path, create)?))
    }
    fn open_index(&self, path: &Path, builder: &Builder) -> Result<Database, DatabaseError> {
        builder.create(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The read into uninitialised memory returns exactly the bytes asked for, and a range past
    /// the end is `UnexpectedEof` (what the chunk read maps to DATA_LOSS), as `read_at` does.
    #[test]
    fn a_segment_reads_exact_ranges_and_refuses_past_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let seg = OsDisk.open_segment(&dir.path().join("s.seg"), true).unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        seg.write_at(0, &data).unwrap();
        assert_eq!(seg.read_vec(1000, 200_000).unwrap(), &data[1000..201_000]);
        assert_eq!(seg.read_vec(0, 0).unwrap(), Vec::<u8>::new());
        let err = seg.read_vec(299_000, 2000).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let mut buf = vec![0u8; 2000];
        assert_eq!(
            seg.read_at(299_000, &mut buf).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    /// Chunk-sized reads bypass the page cache at any offset and length, see bytes written a
    /// moment before (not yet synced) and stop at the end of the file; a segment without a
    /// direct handle (the open was refused) gives the same bytes through the cache. Also run on
    /// tmpfs when there is one (Linux takes O_DIRECT there since 6.6; older kernels refuse it).
    #[test]
    fn chunk_sized_reads_bypass_the_cache_at_any_alignment_and_match_the_written_bytes() {
        let dirs: Vec<tempfile::TempDir> = std::iter::once(tempfile::tempdir().unwrap())
            .chain(tempfile::tempdir_in("/dev/shm").ok())
            .collect();
        let runs = dirs.iter().enumerate().map(|(i, d)| (i, d, false));
        for (i, dir, cached_only) in runs.chain(dirs.first().map(|d| (0, d, true))) {
            let path = dir.path().join(if cached_only { "c.seg" } else { "s.seg" });
            let mut seg = OsSegment::open(&path, true).unwrap();
            if cached_only {
                seg.direct = None;
            }
            let data: Vec<u8> = (0..3_000_001u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect();
            seg.write_at(0, &data).unwrap();
            for (off, len) in [
                (0usize, 1 << 20),
                (1, 1 << 20),
                (4095, 300_000),
                (4096, 262_144),
                (1_234_567, 1_765_434),
            ] {
                let got = seg.read_bytes(off as u64, len).unwrap();
                assert_eq!(got.len(), len);
                assert!(
                    got[..] == data[off..off + len],
                    "{} at {off}+{len}",
                    dir.path().display()
                );
            }
            let err = seg.read_bytes(2_900_000, 262_144).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
            // A range running past the end is missing bytes, not a reason to give up on O_DIRECT.
            assert!(!seg.direct_failed.load(std::sync::atomic::Ordering::Relaxed));
            // Overwritten in place and read straight back: the direct handle sees the new bytes.
            seg.write_at(10_000, &[7u8; 300_000]).unwrap();
            assert!(
                seg.read_bytes(9_000, 302_000).unwrap()[1_000..301_000]
                    .iter()
                    .all(|b| *b == 7)
            );
            if i == 0 && !cached_only {
                // The temp dir's disk file system takes O_DIRECT: the direct path was walked.
                assert!(seg.direct.is_some() && !seg.direct_failed.load(std::sync::atomic::Ordering::Relaxed));
            }
        }
    }
}
