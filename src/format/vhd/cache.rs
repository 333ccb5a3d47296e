//! A small byte-bounded LRU of metadata blocks (VHD sector bitmaps, qcow2 L1/L2 tables),
//! shared by all reader threads.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::{Arc, Mutex};

/// Least-recently-used cache of byte blocks keyed by `K` (a block index, a file offset),
/// holding at most `budget` bytes (at least one entry, whatever its size).
pub struct BitmapCache<K = u32> {
    budget: usize,
    inner: Mutex<Inner<K>>,
}

struct Inner<K> {
    /// block → (bitmap, last-use tick)
    map: HashMap<K, (Arc<[u8]>, u64)>,
    /// last-use tick → block, oldest first
    order: BTreeMap<u64, K>,
    tick: u64,
    bytes: usize,
}

impl<K: Copy + Eq + std::hash::Hash> Inner<K> {
    fn touch(&mut self, block: K) -> Option<Arc<[u8]>> {
        self.tick += 1;
        let tick = self.tick;
        let (bm, used) = self.map.get_mut(&block)?;
        self.order.remove(used);
        *used = tick;
        self.order.insert(tick, block);
        Some(bm.clone())
    }
}

impl<K: Copy + Eq + std::hash::Hash> BitmapCache<K> {
    /// An empty cache holding up to `budget` bytes.
    pub fn new(budget: usize) -> Self {
        BitmapCache {
            budget,
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                order: BTreeMap::new(),
                tick: 0,
                bytes: 0,
            }),
        }
    }

    /// The bitmap of `block`, from the cache or from `load` (run without the lock held,
    /// so a slow read does not stall other threads' hits).
    pub fn get_or_load(
        &self,
        block: K,
        load: impl FnOnce() -> io::Result<Vec<u8>>,
    ) -> io::Result<Arc<[u8]>> {
        if let Some(bm) = self.lock().touch(block) {
            return Ok(bm);
        }
        let bm: Arc<[u8]> = load()?.into();
        let mut inner = self.lock();
        if let Some(old) = inner.touch(block) {
            return Ok(old); // another thread loaded it meanwhile
        }
        while inner.bytes + bm.len() > self.budget && !inner.order.is_empty() {
            let Some((_, victim)) = inner.order.pop_first() else {
                break;
            };
            if let Some((old, _)) = inner.map.remove(&victim) {
                inner.bytes -= old.len();
            }
        }
        inner.tick += 1;
        let tick = inner.tick;
        inner.order.insert(tick, block);
        inner.bytes += bm.len();
        inner.map.insert(block, (bm.clone(), tick));
        Ok(bm)
    }

    /// Number of cached bitmaps (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().map.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<K>> {
        // A panic while holding the lock cannot leave Inner inconsistent in a way that
        // matters (worst case a stale byte count), so keep serving after poisoning.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_when_over_budget() {
        let cache: BitmapCache = BitmapCache::new(1024);
        cache.get_or_load(1, || Ok(vec![1; 512])).unwrap();
        cache.get_or_load(2, || Ok(vec![2; 512])).unwrap();
        cache
            .get_or_load(1, || panic!("block 1 should be cached"))
            .unwrap();

        cache.get_or_load(3, || Ok(vec![3; 512])).unwrap();

        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get_or_load(1, || Ok(vec![9; 512])).unwrap()[0], 1);
        assert_eq!(cache.get_or_load(2, || Ok(vec![9; 512])).unwrap()[0], 9);
    }

    #[test]
    fn load_error_is_returned_and_not_cached() {
        let cache: BitmapCache = BitmapCache::new(1024);

        let err = cache
            .get_or_load(5, || Err(io::Error::other("boom")))
            .unwrap_err();

        assert_eq!(err.to_string(), "boom");
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn entry_larger_than_budget_is_still_served() {
        let cache: BitmapCache = BitmapCache::new(100);

        let bm = cache.get_or_load(0, || Ok(vec![7; 512])).unwrap();

        assert_eq!(bm.len(), 512);
    }
}
