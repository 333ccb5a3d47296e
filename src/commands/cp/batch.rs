//! Regular files waiting to be read together (see [`GuestFs::read_files`]): one round
//! trip to the guest per batch instead of per file. Both ways out of `cp` (a directory
//! and a tar stream) fill and run their batches through this one type.
//!
//! [`GuestFs::read_files`]: crate::agent_client::GuestFs::read_files

use crate::agent_client::FileRequest;

/// Most files whose requests go out together.
const BATCH_FILES: usize = 64;
/// Most request bytes in flight: far below what the channel buffers, so sending a batch
/// never waits for the guest, which may be busy writing answers the host has not read.
const BATCH_REQUEST_BYTES: usize = 64 * 1024;

/// Files waiting, each with what the caller knows it by (`T`) and its request.
pub(super) struct Batch<T> {
    items: Vec<T>,
    requests: Vec<FileRequest>,
    bytes: usize,
}

impl<T> Default for Batch<T> {
    fn default() -> Self {
        Batch {
            items: Vec::new(),
            requests: Vec::new(),
            bytes: 0,
        }
    }
}

impl<T> Batch<T> {
    /// Add a file at guest `path`; true when the batch must now be read (full, or a
    /// mapped file, which only the last of a batch may be).
    pub(super) fn push(&mut self, item: T, path: Vec<u8>, mapped: bool) -> bool {
        // JSON writes a byte as up to four characters.
        self.bytes += path.len() * 4 + 64;
        self.items.push(item);
        self.requests.push(FileRequest { path, mapped });
        mapped || self.items.len() >= BATCH_FILES || self.bytes >= BATCH_REQUEST_BYTES
    }

    /// The first file waiting.
    pub(super) fn first(&self) -> Option<&T> {
        self.items.first()
    }

    /// Everything waiting, leaving the batch empty; None when nothing waits.
    pub(super) fn take(&mut self) -> Option<(Vec<T>, Vec<FileRequest>)> {
        if self.items.is_empty() {
            return None;
        }
        let b = std::mem::take(self);
        Some((b.items, b.requests))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_full_at_its_file_count_and_at_a_mapped_file() {
        let mut b = Batch::default();

        let full: Vec<bool> = (0..BATCH_FILES)
            .map(|i| b.push(i, vec![b'f'], false))
            .collect();
        let mut m = Batch::default();
        let mapped = m.push(0, b"/big".to_vec(), true);

        assert_eq!(full.iter().filter(|f| **f).count(), 1);
        assert!(full[BATCH_FILES - 1]);
        assert!(mapped);
        let (items, requests) = b.take().unwrap();
        assert_eq!((items.len(), requests.len()), (BATCH_FILES, BATCH_FILES));
        assert!(b.take().is_none());
    }

    #[test]
    fn long_paths_fill_a_batch_by_their_bytes() {
        let mut b = Batch::default();
        let long = vec![b'x'; 4096];

        let full: Vec<bool> = (0..4).map(|i| b.push(i, long.clone(), false)).collect();

        assert_eq!(full, [false, false, false, true]);
    }
}
