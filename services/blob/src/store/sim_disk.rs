//! A simulated disk for power-loss tests (test builds only). It keeps, per file, the bytes
//! written and the bytes made durable by fsync, and per directory the entries as they are now
//! and as they were at the directory's last fsync. [`SimDisk::power_loss`] turns the volatile
//! state back into the durable one — keeping, like a real device may, a random prefix of the
//! writes since the last sync — so a test can check that nothing acknowledged depended on
//! state that was never synced. After [`SimDisk::fail_after`] operations every call fails with
//! EIO (the moment power goes), so the engine sees the crash mid-operation.
//!
//! Directories themselves are durable once created (the engine creates them at start-up and
//! fsyncs their parents); everything inside them follows the rules above.

use std::{
    collections::{BTreeMap, HashMap},
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use redb::{Builder, Database, DatabaseError, StorageBackend};

/// What redb's backend methods return (without its experimental API).
type BackendIoError = io::Error;

use super::disk::{Disk, DiskFile};

#[derive(Debug, Default)]
struct Inode {
    data: Vec<u8>,
    durable: Vec<u8>,
    mtime: Option<SystemTime>,
    /// Positioned writes (segment files) since the last sync, in order.
    log: Vec<(u64, Vec<u8>)>,
}

#[derive(Debug, Default)]
struct Dir {
    live: BTreeMap<String, u64>,
    durable: BTreeMap<String, u64>,
}

/// The index file: pages written since the last sync are kept as a log.
#[derive(Debug, Default)]
struct IndexFile {
    live: Vec<u8>,
    durable: Vec<u8>,
    /// (offset, bytes) or a length change (offset, empty with `len`), in order since the sync.
    log: Vec<(u64, Vec<u8>, Option<u64>)>,
}

#[derive(Debug, Default)]
struct State {
    inodes: HashMap<u64, Inode>,
    next: u64,
    dirs: BTreeMap<PathBuf, Dir>,
    index: HashMap<PathBuf, IndexFile>,
    /// Operations left before the power goes (`None`: never).
    budget: Option<u64>,
    rng: u64,
    ops: u64,
}

impl State {
    fn tick(&mut self) -> io::Result<()> {
        self.ops += 1;
        match &mut self.budget {
            Some(0) => Err(io::Error::from_raw_os_error(rustix::io::Errno::IO.raw_os_error())),
            Some(n) => {
                *n -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn rand(&mut self) -> u64 {
        let mut x = self.rng | 1;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    fn split(p: &Path) -> io::Result<(PathBuf, String)> {
        let dir = p.parent().ok_or_else(|| io::Error::other("no parent"))?.to_path_buf();
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| io::Error::other("no name"))?
            .to_string();
        Ok((dir, name))
    }

    fn dir(&mut self, d: &Path) -> io::Result<&mut Dir> {
        self.dirs
            .get_mut(d)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no directory {}", d.display())))
    }

    fn lookup(&self, p: &Path) -> io::Result<u64> {
        let (d, n) = Self::split(p)?;
        self.dirs
            .get(&d)
            .and_then(|d| d.live.get(&n))
            .copied()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no file {}", p.display())))
    }
}

/// The simulated disk. Cheap to clone; clones share the state.
#[derive(Debug, Clone, Default)]
pub struct SimDisk {
    state: Arc<Mutex<State>>,
}

impl SimDisk {
    /// A disk whose random choices follow `seed`.
    pub fn new(seed: u64) -> SimDisk {
        let d = SimDisk::default();
        d.lock().rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        d
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Operations performed so far.
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// Whether the power went (the operation budget ran out).
    pub fn failed(&self) -> bool {
        self.lock().budget == Some(0)
    }

    /// The power goes after `n` more operations: from then on every call fails with EIO.
    pub fn fail_after(&self, n: u64) {
        self.lock().budget = Some(n);
    }

    /// Loses power: every file and directory goes back to what was synced (files keep a
    /// random prefix of the unsynced appends; the index a random prefix of its unsynced
    /// writes), and the disk works again.
    pub fn power_loss(&self) {
        let mut s = self.lock();
        s.budget = None;
        let dirs: Vec<PathBuf> = s.dirs.keys().cloned().collect();
        for d in dirs {
            if let Some(dir) = s.dirs.get_mut(&d) {
                dir.live = dir.durable.clone();
            }
        }
        let inos: Vec<u64> = s.inodes.keys().copied().collect();
        for ino in inos {
            let r = s.rand();
            let torn = s.rand();
            if let Some(i) = s.inodes.get_mut(&ino)
                && !i.log.is_empty()
            {
                // A segment file: a random prefix of its positioned writes reached the device,
                // the next one possibly torn part-way.
                let applied = (r % (i.log.len() as u64 + 1)) as usize;
                let mut d = i.durable.clone();
                for (off, bytes) in i.log.iter().take(applied) {
                    apply(&mut d, *off, bytes, None);
                }
                if let Some((off, bytes)) = i.log.get(applied) {
                    let n = (torn % (bytes.len() as u64 + 1)) as usize;
                    apply(&mut d, *off, bytes.get(..n).unwrap_or_default(), None);
                }
                i.data = d;
                i.log.clear();
                continue;
            }
            if let Some(i) = s.inodes.get_mut(&ino) {
                let keep = if i.data.len() > i.durable.len() && i.data.starts_with(&i.durable) {
                    let extra = (i.data.len() - i.durable.len()) as u64;
                    i.durable.len() + (r % (extra + 1)) as usize
                } else {
                    i.durable.len()
                };
                if keep > i.durable.len() {
                    i.data.truncate(keep);
                } else {
                    i.data = i.durable.clone();
                }
            }
        }
        let files: Vec<PathBuf> = s.index.keys().cloned().collect();
        for f in files {
            let r = s.rand();
            if let Some(ix) = s.index.get_mut(&f) {
                let mut live = ix.durable.clone();
                let applied = (r % (ix.log.len() as u64 + 1)) as usize;
                for (off, bytes, len) in ix.log.iter().take(applied) {
                    apply(&mut live, *off, bytes, *len);
                }
                ix.live = live;
                ix.log.clear();
            }
        }
    }
}

fn apply(buf: &mut Vec<u8>, off: u64, bytes: &[u8], len: Option<u64>) {
    if let Some(l) = len {
        buf.resize(l as usize, 0);
        return;
    }
    let end = off as usize + bytes.len();
    if buf.len() < end {
        buf.resize(end, 0);
    }
    if let Some(dst) = buf.get_mut(off as usize..end) {
        dst.copy_from_slice(bytes);
    }
}

struct SimFile {
    disk: SimDisk,
    ino: u64,
}

impl DiskFile for SimFile {
    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        let mut s = self.disk.lock();
        s.tick()?;
        if let Some(i) = s.inodes.get_mut(&self.ino) {
            i.data.extend_from_slice(data);
            i.mtime = Some(SystemTime::now());
        }
        Ok(())
    }
    fn sync_data(&mut self) -> io::Result<()> {
        let mut s = self.disk.lock();
        s.tick()?;
        if let Some(i) = s.inodes.get_mut(&self.ino) {
            i.durable = i.data.clone();
        }
        Ok(())
    }
}

struct SimSegment {
    disk: SimDisk,
    ino: u64,
}

impl super::disk::SegmentFile for SimSegment {
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut s = self.disk.lock();
        s.tick()?;
        if let Some(i) = s.inodes.get_mut(&self.ino) {
            apply(&mut i.data, offset, data, None);
            i.log.push((offset, data.to_vec()));
            i.mtime = Some(SystemTime::now());
        }
        Ok(())
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut s = self.disk.lock();
        s.tick()?;
        let src = s
            .inodes
            .get(&self.ino)
            .and_then(|i| i.data.get(offset as usize..offset as usize + buf.len()));
        match src {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end")),
        }
    }
    fn sync_data(&self) -> io::Result<()> {
        let mut s = self.disk.lock();
        s.tick()?;
        if let Some(i) = s.inodes.get_mut(&self.ino) {
            i.durable = i.data.clone();
            i.log.clear();
        }
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        let mut s = self.disk.lock();
        s.tick()?;
        Ok(s.inodes.get(&self.ino).map(|i| i.data.len() as u64).unwrap_or(0))
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        // Zeros where the range was (within the file; the length stays), not durable until the
        // next sync, like any write.
        let n = {
            let s = self.disk.lock();
            let flen = s.inodes.get(&self.ino).map(|i| i.data.len() as u64).unwrap_or(0);
            offset.saturating_add(len).min(flen).saturating_sub(offset)
        };
        if n == 0 {
            return Ok(());
        }
        self.write_at(offset, &vec![0; n as usize])
    }
}

impl Disk for SimDisk {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.lock();
        s.tick()?;
        for a in dir.ancestors() {
            s.dirs.entry(a.to_path_buf()).or_default();
        }
        Ok(())
    }
    fn is_dir(&self, dir: &Path) -> bool {
        self.lock().dirs.contains_key(dir)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.lock();
        s.tick()?;
        let d = s.dir(dir)?;
        d.durable = d.live.clone();
        Ok(())
    }
    fn create(&self, path: &Path) -> io::Result<Box<dyn DiskFile>> {
        let mut s = self.lock();
        s.tick()?;
        let (d, n) = State::split(path)?;
        s.next += 1;
        let ino = s.next;
        s.inodes.insert(
            ino,
            Inode {
                mtime: Some(SystemTime::now()),
                ..Default::default()
            },
        );
        s.dir(&d)?.live.insert(n, ino);
        Ok(Box::new(SimFile {
            disk: self.clone(),
            ino,
        }))
    }
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let mut s = self.lock();
        s.tick()?;
        let ino = s.lookup(path)?;
        Ok(s.inodes.get(&ino).map(|i| i.data.clone()).unwrap_or_default())
    }
    fn sync_file(&self, path: &Path) -> io::Result<()> {
        let mut s = self.lock();
        s.tick()?;
        let ino = s.lookup(path)?;
        if let Some(i) = s.inodes.get_mut(&ino) {
            i.durable = i.data.clone();
        }
        Ok(())
    }
    fn hard_link(&self, src: &Path, dst: &Path) -> io::Result<()> {
        let mut s = self.lock();
        s.tick()?;
        let ino = s.lookup(src)?;
        let (d, n) = State::split(dst)?;
        let dir = s.dir(&d)?;
        if dir.live.contains_key(&n) {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, "exists"));
        }
        dir.live.insert(n, ino);
        Ok(())
    }
    fn rename(&self, src: &Path, dst: &Path) -> io::Result<()> {
        let mut s = self.lock();
        s.tick()?;
        let ino = s.lookup(src)?;
        let (sd, sn) = State::split(src)?;
        let (dd, dn) = State::split(dst)?;
        s.dir(&sd)?.live.remove(&sn);
        s.dir(&dd)?.live.insert(dn, ino);
        Ok(())
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut s = self.lock();
        s.tick()?;
        let (d, n) = State::split(path)?;
        match s.dir(&d)?.live.remove(&n) {
            Some(_) => Ok(()),
            None => Err(io::Error::new(io::ErrorKind::NotFound, "no such file")),
        }
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<(PathBuf, Option<SystemTime>)>> {
        let mut s = self.lock();
        s.tick()?;
        let entries: Vec<(String, u64)> = s.dir(dir)?.live.iter().map(|(n, i)| (n.clone(), *i)).collect();
        Ok(entries
            .into_iter()
            .map(|(n, ino)| (dir.join(n), s.inodes.get(&ino).and_then(|i| i.mtime)))
            .collect())
    }
    fn free_bytes(&self, _path: &Path) -> Option<u64> {
        None
    }
    fn total_bytes(&self, _path: &Path) -> Option<u64> {
        None
    }
    fn open_segment(&self, path: &Path, create: bool) -> io::Result<Arc<dyn super::disk::SegmentFile>> {
        let mut s = self.lock();
        s.tick()?;
        let ino = if create {
            let (d, n) = State::split(path)?;
            if s.dir(&d)?.live.contains_key(&n) {
                return Err(io::Error::new(io::ErrorKind::AlreadyExists, "exists"));
            }
            s.next += 1;
            let ino = s.next;
            s.inodes.insert(
                ino,
                Inode {
                    mtime: Some(SystemTime::now()),
                    ..Default::default()
                },
            );
            s.dir(&d)?.live.insert(n, ino);
            ino
        } else {
            s.lookup(path)?
        };
        Ok(Arc::new(SimSegment {
            disk: self.clone(),
            ino,
        }))
    }
    fn open_index(&self, path: &Path, builder: &Builder) -> Result<Database, DatabaseError> {
        self.lock().index.entry(path.to_path_buf()).or_default();
        builder.create_with_backend(SimIndex {
            disk: self.clone(),
            path: path.to_path_buf(),
        })
    }
}

/// The index file on the simulated disk, as redb's storage backend.
#[derive(Debug)]
struct SimIndex {
    disk: SimDisk,
    path: PathBuf,
}

impl SimIndex {
    fn with<T>(&self, f: impl FnOnce(&mut IndexFile) -> T) -> Result<T, BackendIoError> {
        let mut s = self.disk.lock();
        s.tick()?;
        let ix = s.index.entry(self.path.clone()).or_default();
        Ok(f(ix))
    }
}

impl StorageBackend for SimIndex {
    fn len(&self) -> Result<u64, BackendIoError> {
        self.with(|ix| ix.live.len() as u64)
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), BackendIoError> {
        let r = self.with(|ix| {
            let end = offset as usize + out.len();
            match ix.live.get(offset as usize..end) {
                Some(src) => {
                    out.copy_from_slice(src);
                    true
                }
                None => false,
            }
        })?;
        if r {
            Ok(())
        } else {
            Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end"))
        }
    }
    fn set_len(&self, len: u64) -> Result<(), BackendIoError> {
        self.with(|ix| {
            ix.live.resize(len as usize, 0);
            ix.log.push((0, Vec::new(), Some(len)));
        })
    }
    fn sync_data(&self) -> Result<(), BackendIoError> {
        self.with(|ix| {
            ix.durable = ix.live.clone();
            ix.log.clear();
        })
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendIoError> {
        self.with(|ix| {
            apply(&mut ix.live, offset, data, None);
            ix.log.push((offset, data.to_vec(), None));
        })
    }
}
