//! A small persistent thread pool for decode (one token): N - 1 workers plus
//! the caller run one closure on every thread id and join. Between runs the
//! workers spin on a generation counter, so a run starts in well under a
//! microsecond instead of the tens of microseconds a sleeping rayon worker
//! takes to wake (a decode token has ~120 such fork-joins). After
//! [`SPIN_FOR`] without work a worker parks, so an idle engine burns no CPU.
//!
//! No allocation per run. A panic in a worker is caught there and re-raised
//! in the caller after every thread has finished the run.

use std::any::Any;
use std::cell::UnsafeCell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, TryLockError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rayon::prelude::*;

/// How long an idle worker spins before it parks.
const SPIN_FOR: Duration = Duration::from_millis(2);

/// Keeps the hot atomics on their own cache lines.
#[repr(align(128))]
struct Padded<T>(T);

/// The erased job: a pointer to the caller's closure and the monomorphised
/// function that calls it.
#[derive(Clone, Copy)]
struct Job {
    data: *const (),
    call: unsafe fn(*const (), usize, usize),
}

struct Shared {
    /// Bumped (Release) once per run after `job` is written.
    generation: Padded<AtomicU64>,
    /// Workers that finished the current run.
    done: Padded<AtomicUsize>,
    /// Workers that are (about to be) parked.
    sleepers: Padded<AtomicUsize>,
    job: UnsafeCell<Job>,
    /// First panic payload of a worker in the current run.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    shutdown: AtomicBool,
}

// SAFETY: `job` is written only by the thread that holds `SpinPool::run_lock`
// while no worker reads it (all workers finished the previous run and wait
// for the next generation); workers read it only after observing the new
// generation with Acquire, which orders them after that write.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

pub struct SpinPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    n: usize,
    /// One run at a time; a concurrent or nested run falls back to rayon.
    run_lock: Mutex<()>,
}

unsafe fn call_job<F: Fn(usize, usize) + Sync>(data: *const (), tid: usize, n: usize) {
    // SAFETY: `data` is the `&F` that `run` erased; it outlives the run.
    let f = unsafe { &*(data as *const F) };
    f(tid, n)
}

fn noop(_: *const (), _: usize, _: usize) {}

impl SpinPool {
    /// `threads` threads in total: `threads - 1` workers plus the caller of `run`.
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let n = threads.max(1);
        let shared = Arc::new(Shared {
            generation: Padded(AtomicU64::new(0)),
            done: Padded(AtomicUsize::new(0)),
            sleepers: Padded(AtomicUsize::new(0)),
            job: UnsafeCell::new(Job {
                data: std::ptr::null(),
                call: noop,
            }),
            panic: Mutex::new(None),
            shutdown: AtomicBool::new(false),
        });
        let mut workers = Vec::with_capacity(n - 1);
        for tid in 1..n {
            let s = shared.clone();
            let h = thread::Builder::new()
                .name(format!("yinsen-spin-{tid}"))
                .spawn(move || worker(&s, tid, n));
            match h {
                Ok(h) => workers.push(h),
                Err(e) => {
                    // Stop the ones already started before reporting.
                    drop(Self {
                        shared,
                        workers,
                        n,
                        run_lock: Mutex::new(()),
                    });
                    return Err(e);
                }
            }
        }
        Ok(Self {
            shared,
            workers,
            n,
            run_lock: Mutex::new(()),
        })
    }

    pub fn threads(&self) -> usize {
        self.n
    }

    /// Run `f(tid, n)` once for every `tid` in `0..n` and return when all
    /// have returned. Normally every tid runs on its own thread (tid 0 on the
    /// caller); a run issued while another is in progress (another thread, or
    /// from inside `f`) runs the tids on the current rayon pool instead, so
    /// `f` must not wait for other tids. A panic in any tid is re-raised here.
    pub fn run<F: Fn(usize, usize) + Sync>(&self, f: F) {
        let n = self.n;
        if n == 1 {
            return f(0, 1);
        }
        let _guard = match self.run_lock.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                (0..n).into_par_iter().for_each(|t| f(t, n));
                return;
            }
        };
        let s = &*self.shared;
        // SAFETY: we hold `run_lock` and the previous run has fully joined
        // (done == n - 1 was observed), so no worker reads `job` now. The
        // lifetime of `f` is erased here, and that is sound because this
        // function does not return (or unwind) before every worker has
        // finished calling it: the join below runs on both paths.
        unsafe {
            *s.job.get() = Job {
                data: &f as *const F as *const (),
                call: call_job::<F>,
            };
        }
        s.done.0.store(0, Ordering::Relaxed);
        // SeqCst pairs with the worker's `sleepers` increment then
        // `generation` load: either it sees this generation or we see it asleep.
        s.generation.0.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.0.load(Ordering::SeqCst) > 0 {
            for w in &self.workers {
                w.thread().unpark();
            }
        }
        let mine = panic::catch_unwind(AssertUnwindSafe(|| f(0, n)));
        // Join: wait until every worker has returned from `f`.
        let mut spins = 0u32;
        while s.done.0.load(Ordering::Acquire) != n - 1 {
            spins = spins.wrapping_add(1);
            if spins < 1 << 16 {
                std::hint::spin_loop();
            } else {
                // A descheduled worker: let it have the core.
                thread::yield_now();
            }
        }
        if let Err(p) = mine {
            panic::resume_unwind(p);
        }
        let worker_panic = s.panic.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(p) = worker_panic {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            panic!("spin pool worker panicked: {msg}");
        }
    }

    /// Split `out` into `n` contiguous ranges whose starts are multiples of
    /// `align` and call `f(start, &mut out[start..end])` for each non-empty
    /// range, range `tid` on thread `tid`.
    pub fn for_ranges<T: Send, F: Fn(usize, &mut [T]) + Sync>(&self, out: &mut [T], align: usize, f: F) {
        let len = out.len();
        let step = split_len(len, self.n, align);
        let base = SendPtr(out.as_mut_ptr());
        self.run(|tid, _| {
            let base = &base;
            let r0 = (tid * step).min(len);
            let r1 = ((tid + 1) * step).min(len);
            if r0 < r1 {
                // SAFETY: ranges of different tids are disjoint and inside
                // `out`, which stays mutably borrowed until `run` returns.
                let o = unsafe { std::slice::from_raw_parts_mut(base.0.add(r0), r1 - r0) };
                f(r0, o);
            }
        });
    }
}

impl SpinPool {
    /// Split `out` into chunks of `chunk` elements (the last may be shorter)
    /// and call `f(start, &mut out[start..end])` once per chunk; the threads
    /// claim chunks from a shared counter, so a thread that starts late or
    /// runs slow (a shared core) is covered by the others.
    pub fn for_chunks<T: Send, F: Fn(usize, &mut [T]) + Sync>(&self, out: &mut [T], chunk: usize, f: F) {
        let len = out.len();
        let chunk = chunk.max(1);
        let n_chunks = len.div_ceil(chunk);
        let next = AtomicUsize::new(0);
        let base = SendPtr(out.as_mut_ptr());
        self.run(|_, _| {
            let base = &base;
            loop {
                let c = next.fetch_add(1, Ordering::Relaxed);
                if c >= n_chunks {
                    break;
                }
                let (r0, r1) = (c * chunk, ((c + 1) * chunk).min(len));
                // SAFETY: each chunk index is claimed once, chunks are
                // disjoint and inside `out`, borrowed until `run` returns.
                let o = unsafe { std::slice::from_raw_parts_mut(base.0.add(r0), r1 - r0) };
                f(r0, o);
            }
        });
    }
}

/// Rows per thread: `len / n` rounded up to a multiple of `align`.
pub fn split_len(len: usize, n: usize, align: usize) -> usize {
    let align = align.max(1);
    len.div_ceil(n.max(1)).div_ceil(align).max(1) * align
}

struct SendPtr<T>(*mut T);
unsafe impl<T: Send> Sync for SendPtr<T> {}

fn worker(s: &Shared, tid: usize, n: usize) {
    let mut seen = 0u64;
    loop {
        // Wait for the next generation: spin, then park.
        let mut since = Instant::now();
        let mut spins = 0u32;
        loop {
            let g = s.generation.0.load(Ordering::Acquire);
            if g != seen {
                seen = g;
                break;
            }
            if s.shutdown.load(Ordering::Relaxed) {
                return;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(256) {
                std::hint::spin_loop();
                continue;
            }
            if since.elapsed() < SPIN_FOR {
                continue;
            }
            s.sleepers.0.fetch_add(1, Ordering::SeqCst);
            if s.generation.0.load(Ordering::SeqCst) == seen && !s.shutdown.load(Ordering::SeqCst) {
                thread::park();
            }
            s.sleepers.0.fetch_sub(1, Ordering::SeqCst);
            since = Instant::now();
        }
        // SAFETY: see `Shared`: the job of generation `seen` is published.
        let job = unsafe { *s.job.get() };
        // SAFETY: `run` keeps the closure alive until `done` reaches n - 1.
        let r = panic::catch_unwind(AssertUnwindSafe(|| unsafe { (job.call)(job.data, tid, n) }));
        if let Err(p) = r {
            let mut slot = s.panic.lock().unwrap_or_else(|p| p.into_inner());
            if slot.is_none() {
                *slot = Some(p);
            }
        }
        s.done.0.fetch_add(1, Ordering::Release);
    }
}

impl Drop for SpinPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        for w in &self.workers {
            w.thread().unpark();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tid_runs_exactly_once_per_run() {
        for n in [1, 2, 5] {
            let pool = SpinPool::new(n).unwrap();
            assert_eq!(pool.threads(), n);
            let counts: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            let runs = 2000;
            for r in 0..runs {
                pool.run(|tid, nn| {
                    assert_eq!(nn, n);
                    counts[tid].fetch_add(1, Ordering::Relaxed);
                });
                // Joined: every tid has counted this run before `run` returned.
                for (t, c) in counts.iter().enumerate() {
                    assert_eq!(c.load(Ordering::Relaxed), r + 1, "n {n} run {r} tid {t}");
                }
            }
        }
    }

    #[test]
    fn tids_run_on_distinct_threads() {
        let pool = SpinPool::new(4).unwrap();
        let ids: Vec<Mutex<Option<thread::ThreadId>>> = (0..4).map(|_| Mutex::new(None)).collect();
        pool.run(|tid, _| *ids[tid].lock().unwrap() = Some(thread::current().id()));
        let ids: Vec<_> = ids.into_iter().map(|m| m.into_inner().unwrap().unwrap()).collect();
        assert_eq!(ids[0], thread::current().id());
        for i in 0..4 {
            for j in 0..i {
                assert_ne!(ids[i], ids[j]);
            }
        }
    }

    #[test]
    fn reads_borrowed_data_and_writes_disjoint_ranges() {
        for n in [1, 2, 5] {
            let pool = SpinPool::new(n).unwrap();
            for len in [0, 1, 7, 16, 100, 1000] {
                for align in [1, 16] {
                    // Borrowed from this stack frame, nested in a Vec of Vecs.
                    let src: Vec<Vec<u64>> = (0..len).map(|i| vec![i as u64 * 3 + 1, 7]).collect();
                    let mut out = vec![u64::MAX; len];
                    pool.for_ranges(&mut out, align, |r0, o| {
                        assert!(r0.is_multiple_of(align));
                        for (k, v) in o.iter_mut().enumerate() {
                            assert_eq!(*v, u64::MAX, "written twice");
                            *v = src[r0 + k][0] * src[r0 + k][1];
                        }
                    });
                    for (i, v) in out.iter().enumerate() {
                        assert_eq!(*v, (i as u64 * 3 + 1) * 7, "n {n} len {len} align {align}");
                    }
                }
            }
        }
    }

    #[test]
    fn chunks_cover_out_exactly_once() {
        for n in [1, 2, 5] {
            let pool = SpinPool::new(n).unwrap();
            for (len, chunk) in [(0, 4), (1, 4), (100, 7), (100, 16), (1000, 1), (64, 64), (65, 64)] {
                let src: Vec<u32> = (0..len as u32).map(|i| i * 5 + 3).collect();
                let mut out = vec![u32::MAX; len];
                pool.for_chunks(&mut out, chunk, |r0, o| {
                    assert!(r0.is_multiple_of(chunk) && o.len() <= chunk);
                    for (k, v) in o.iter_mut().enumerate() {
                        assert_eq!(*v, u32::MAX, "written twice");
                        *v = src[r0 + k];
                    }
                });
                assert_eq!(out, src, "n {n} len {len} chunk {chunk}");
            }
        }
    }

    #[test]
    fn worker_panic_propagates_and_pool_stays_usable() {
        let pool = SpinPool::new(3).unwrap();
        let r = panic::catch_unwind(AssertUnwindSafe(|| {
            pool.run(|tid, _| {
                if tid == 2 {
                    panic!("boom in worker");
                }
            })
        }));
        let msg = r.unwrap_err().downcast::<String>().unwrap();
        assert!(msg.contains("boom in worker"), "{msg}");
        // Caller panic: still joins the workers before unwinding.
        let hits = AtomicUsize::new(0);
        let r = panic::catch_unwind(AssertUnwindSafe(|| {
            pool.run(|tid, _| {
                hits.fetch_add(1, Ordering::SeqCst);
                if tid == 0 {
                    panic!("boom in caller");
                }
            })
        }));
        assert!(r.is_err());
        assert_eq!(hits.load(Ordering::SeqCst), 3);
        let hits = AtomicUsize::new(0);
        pool.run(|_, _| {
            hits.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(hits.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn nested_and_concurrent_runs_fall_back_and_complete() {
        let pool = SpinPool::new(3).unwrap();
        let inner = AtomicUsize::new(0);
        pool.run(|_, _| {
            pool.run(|_, _| {
                inner.fetch_add(1, Ordering::SeqCst);
            })
        });
        assert_eq!(inner.load(Ordering::SeqCst), 9);
        let total = AtomicUsize::new(0);
        thread::scope(|sc| {
            for _ in 0..3 {
                sc.spawn(|| {
                    for _ in 0..200 {
                        pool.run(|_, _| {
                            total.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 3 * 200 * 3);
    }

    #[test]
    fn parked_workers_wake_up() {
        let pool = SpinPool::new(3).unwrap();
        let hits = AtomicUsize::new(0);
        for _ in 0..3 {
            // Idle past SPIN_FOR: both workers park (deadline for a busy machine).
            let t0 = Instant::now();
            while pool.shared.sleepers.0.load(Ordering::SeqCst) != 2 && t0.elapsed() < Duration::from_secs(5) {
                thread::sleep(SPIN_FOR);
            }
            assert_eq!(pool.shared.sleepers.0.load(Ordering::SeqCst), 2, "workers did not park");
            pool.run(|_, _| {
                hits.fetch_add(1, Ordering::SeqCst);
            });
        }
        assert_eq!(hits.load(Ordering::SeqCst), 9);
    }
}
