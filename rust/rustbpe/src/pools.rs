//! Rayon thread pools for callers that ask for a thread count (`encode_batch(..., num_threads=k)`).
//!
//! A pool per distinct count, kept forever, grows without bound when a caller varies the count (every pool keeps
//! its threads alive). Here the cache holds at most `capacity` pools, least recently used evicted first, and a
//! request is clamped to the CPUs this process may use (more compute threads than CPUs only adds switching).
//! An evicted pool's threads end once the calls still running on it return (each call holds an `Arc`).

use std::sync::{Arc, Mutex};

use rayon::ThreadPool;

use crate::Error;

pub struct PoolCache {
    capacity: usize,
    max_threads: usize,
    pools: Mutex<Vec<(usize, Arc<ThreadPool>)>>, // least recently used first
}

impl PoolCache {
    pub fn new(capacity: usize, max_threads: usize) -> Self {
        PoolCache { capacity: capacity.max(1), max_threads: max_threads.max(1), pools: Mutex::new(Vec::new()) }
    }

    /// `capacity` pools of at most as many threads as this process has CPUs.
    pub fn for_this_machine(capacity: usize) -> Self {
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        Self::new(capacity, cpus)
    }

    /// The pool for `num_threads` (>= 1; clamped to `max_threads`), built on first use.
    pub fn get(&self, num_threads: usize) -> Result<Arc<ThreadPool>, Error> {
        let size = num_threads.clamp(1, self.max_threads);
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = pools.iter().position(|(n, _)| *n == size) {
            let entry = pools.remove(i);
            let pool = entry.1.clone();
            pools.push(entry);
            return Ok(pool);
        }
        let pool = Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(size)
                .build()
                .map_err(|e| Error::Runtime(format!("cannot start {size} threads: {e}")))?,
        );
        pools.push((size, pool.clone()));
        if pools.len() > self.capacity {
            pools.remove(0);
        }
        Ok(pool)
    }

    /// The thread counts of the cached pools, least recently used first.
    pub fn sizes(&self) -> Vec<usize> {
        self.pools.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(n, _)| *n).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_is_bounded_and_reuses_pools() {
        let cache = PoolCache::new(3, 8);
        let first = cache.get(2).unwrap();
        for n in 1..=8 {
            cache.get(n).unwrap();
            assert!(cache.sizes().len() <= 3);
        }
        assert_eq!(cache.sizes(), vec![6, 7, 8]);
        let again = cache.get(7).unwrap();
        assert!(Arc::ptr_eq(&again, &cache.get(7).unwrap()));
        assert_eq!(cache.sizes(), vec![6, 8, 7]); // 7 is now the most recent
        assert!(!Arc::ptr_eq(&first, &cache.get(2).unwrap())); // 2 was evicted and is built again
        assert_eq!(cache.sizes(), vec![8, 7, 2]);
    }

    #[test]
    fn requests_are_clamped_to_the_cpus() {
        let cache = PoolCache::new(4, 3);
        assert_eq!(cache.get(1000).unwrap().current_num_threads(), 3);
        assert_eq!(cache.get(0).unwrap().current_num_threads(), 1);
        assert_eq!(cache.sizes(), vec![3, 1]);
    }

    #[test]
    fn evicted_pool_finishes_the_work_it_holds() {
        let cache = PoolCache::new(1, 4);
        let held = cache.get(2).unwrap();
        cache.get(3).unwrap(); // evicts the 2-thread pool; `held` keeps it alive
        assert_eq!(held.install(|| rayon::current_num_threads()), 2);
    }
}
