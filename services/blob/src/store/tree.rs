//! The whole-content BLAKE3 key built from per-chunk chaining values.
//!
//! Chunks are a power of two of at least 64 KiB, so each full chunk at offset `k × size` is a
//! complete BLAKE3 subtree; its chaining value (computed while the chunk streams in) is all the
//! whole-content hash needs from it. Keeping those 32-byte values per chunk lets a resumed upload
//! continue the whole-content hash without re-reading what is already stored.

use blake3::hazmat::{ChainingValue, Mode, merge_subtrees_non_root, merge_subtrees_root};

/// Folds the chaining values of equal-size chunks, in order, into the whole-content key.
#[derive(Debug, Clone, Default)]
pub struct TreeHasher {
    stack: Vec<ChainingValue>,
    chunks: u64,
}

impl TreeHasher {
    /// Adds the next full chunk's chaining value.
    pub fn push(&mut self, cv: ChainingValue) {
        merge_stack(&mut self.stack, self.chunks);
        self.stack.push(cv);
        self.chunks += 1;
    }

    /// The root hash of every pushed chunk followed by `last` (the chaining value of the final,
    /// possibly short, chunk). `None` when fewer than two chunks make the object: its key is
    /// then the single chunk's own hash.
    pub fn finalize(&self, last: ChainingValue) -> Option<[u8; 32]> {
        let mut stack = self.stack.clone();
        merge_stack(&mut stack, self.chunks);
        let mut right = last;
        let mut rest = stack.iter().rev().peekable();
        rest.peek()?;
        while let Some(left) = rest.next() {
            if rest.peek().is_none() {
                return Some(*merge_subtrees_root(left, &right, Mode::Hash).as_bytes());
            }
            right = merge_subtrees_non_root(left, &right, Mode::Hash);
        }
        None
    }
}

/// Lazy merging, as BLAKE3's own hasher does before adding chunk number `before`: completed
/// subtrees are merged only once a later chunk shows they are not the tree's right edge.
fn merge_stack(stack: &mut Vec<ChainingValue>, before: u64) {
    let keep = before.count_ones() as usize;
    while stack.len() > keep {
        let (Some(right), Some(left)) = (stack.pop(), stack.pop()) else {
            break;
        };
        stack.push(merge_subtrees_non_root(&left, &right, Mode::Hash));
    }
}

#[cfg(test)]
mod tests {
    use blake3::hazmat::HasherExt;

    use super::*;

    fn chunk_cv(offset: u64, data: &[u8]) -> ChainingValue {
        let mut h = blake3::Hasher::new();
        h.set_input_offset(offset);
        h.update(data);
        h.finalize_non_root()
    }

    fn key_by_chunks(data: &[u8], size: usize) -> [u8; 32] {
        let parts: Vec<&[u8]> = data.chunks(size).collect();
        if parts.len() <= 1 {
            return *blake3::hash(data).as_bytes();
        }
        let mut t = TreeHasher::default();
        let (last, full) = parts.split_last().unwrap();
        for (i, p) in full.iter().enumerate() {
            t.push(chunk_cv((i * size) as u64, p));
        }
        t.finalize(chunk_cv((full.len() * size) as u64, last)).unwrap()
    }

    #[test]
    fn chaining_values_give_the_plain_blake3_key() {
        let size = 64 * 1024;
        let data: Vec<u8> = (0..size * 9 + 77).map(|i| (i * 31 % 251) as u8).collect();
        for len in [
            1,
            size - 1,
            size,
            size + 1,
            2 * size,
            3 * size,
            3 * size + 5,
            4 * size,
            5 * size + 1,
            8 * size,
            9 * size + 77,
        ] {
            let d = &data[..len];
            assert_eq!(key_by_chunks(d, size), *blake3::hash(d).as_bytes(), "length {len}");
        }
    }
}
