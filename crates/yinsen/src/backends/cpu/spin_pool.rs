//! A small persistent thread pool for decode (one token): N - 1 workers plus
//! the caller run one closure on every thread id and join. Between runs the
//! workers spin on a generation counter, so a run starts in well under a
//! microsecond instead of the tens of microseconds a sleeping rayon worker
//! takes to wake (a decode token has ~120 such fork-joins). After
//! [`SPIN_FOR`] without work a worker parks, so an idle engine burns no CPU.
//!
//! No allocation per run. A panic in a worker is caught there and re-raised
//! in the caller after every thread has finished the run.
//!
//! Shared cores: the chunked runs ([`SpinPool::for_chunks`],
//! [`SpinPool::for_ranges`]) never wait for a worker that has not started:
//! the caller closes the run once no chunk is left, and a worker that comes
//! later skips it. Waiting threads yield the core after a short spin. Before
//! this, one busy process on one of 2 cores cut decode from ~35 to ~2.5
//! tok/s: every fork-join waited for a descheduled spinning worker.

use std::any::Any;
use std::cell::UnsafeCell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, TryLockError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rayon::prelude::*;

/// How long an idle worker waits (spinning, then yielding) before it parks.
const SPIN_FOR: Duration = Duration::from_millis(2);

/// How long a waiting thread busy-waits before it yields its core between
/// checks: longer than the gaps between decode's fork-joins, so on a quiet
/// machine nothing yields; shorter than a scheduler slice (ms), so a thread
/// that shares its core with the one it waits for lets that one run. (Yielding
/// after ~1 us instead lost whole slices to other processes: 25 -> 16 tok/s.)
const HOT: Duration = Duration::from_micros(50);

/// Keeps the hot atomics on their own cache lines.
#[repr(align(128))]
struct Padded<T>(T);

/// The erased job: a pointer to the caller's closure and the monomorphised
/// function that calls it.
#[derive(Clone, Copy)]
struct Job {
    data: *const (),
    call: unsafe fn(*const (), usize, usize),
    /// Every worker must run it (`run`); else the caller may close it.
    all: bool,
}

struct Shared {
    /// Bumped (Release) once per run after `job` is written.
    generation: Padded<AtomicU64>,
    /// The last generation closed: workers that have not entered it by then
    /// skip it.
    closed: Padded<AtomicU64>,
    /// Per worker (tid - 1), each on its own line: the generation it is
    /// inside (0: none) and the last one whose job it finished. One line
    /// per worker, written by that worker alone, instead of one counter
    /// every worker updates: on 16 cores the updates of one line queue
    /// behind each other (~5 us per empty fork-join on the device host).
    inside: Box<[Padded<AtomicU64>]>,
    done: Box<[Padded<AtomicU64>]>,
    /// Workers that are (about to be) parked.
    sleepers: Padded<AtomicUsize>,
    /// How long a waiting worker busy-waits before it yields (ns): [`HOT`],
    /// or longer while a many-token forward runs (`SpinPool::set_hot`).
    hot_ns: AtomicU64,
    job: UnsafeCell<Job>,
    /// First panic payload of a worker in the current run.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    shutdown: AtomicBool,
}

// SAFETY: `job` is written only by the thread that holds `SpinPool::run_lock`
// while no worker reads it: the previous run is closed and no worker is inside
// it. A worker reads `job` only after entering the run: it stores the
// generation in its `inside` slot, then finds the run not closed (both
// SeqCst); the caller stores `closed` (SeqCst), then waits until no slot holds
// the generation. In the single order of SeqCst operations either the
// worker's store comes first (the caller then sees it and waits for the
// worker to leave) or the caller's (the worker then sees the run closed and
// skips it). The generation's Release / Acquire orders `job` before a read.
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
            closed: Padded(AtomicU64::new(0)),
            inside: (1..n).map(|_| Padded(AtomicU64::new(0))).collect(),
            done: (1..n).map(|_| Padded(AtomicU64::new(0))).collect(),
            sleepers: Padded(AtomicUsize::new(0)),
            hot_ns: AtomicU64::new(HOT.as_nanos() as u64),
            job: UnsafeCell::new(Job {
                data: std::ptr::null(),
                call: noop,
                all: false,
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

    /// Busy-wait up to `hot` before yielding (workers between runs, the
    /// caller joining them), at most [`SPIN_FOR`]; `None` restores the
    /// default [`HOT`]. For many-token forwards (`YINSEN_PREFILL_HOT_US`),
    /// whose regions can be separated by a matmul's tail of more than 50 us.
    pub fn set_hot(&self, hot: Option<Duration>) {
        let ns = hot.unwrap_or(HOT).min(SPIN_FOR).as_nanos() as u64;
        self.shared.hot_ns.store(ns, Ordering::Relaxed);
    }

    /// Publish `f` as the next run and wake the workers. The caller holds
    /// `run_lock`, and the previous run is closed with no worker inside.
    fn run_locked<F: Fn(usize, usize) + Sync>(&self, f: &F, all: bool) {
        let s = &*self.shared;
        // SAFETY: see `Shared`: no worker reads `job` now. The lifetime of
        // `f` is erased here, and that is sound because the caller does not
        // return (or unwind) before the run is closed and every worker that
        // entered it has left (`close`).
        unsafe {
            *s.job.get() = Job {
                data: f as *const F as *const (),
                call: call_job::<F>,
                all,
            };
        }
        let g = s.generation.0.load(Ordering::Relaxed) + 1;
        // SeqCst pairs with the worker's `sleepers` increment then
        // `generation` load: either it sees this generation or we see it asleep.
        s.generation.0.store(g, Ordering::SeqCst);
        if s.sleepers.0.load(Ordering::SeqCst) > 0 {
            for w in &self.workers {
                w.thread().unpark();
            }
        }
    }

    /// Close the current run (late workers skip it) and wait for the workers
    /// inside it to leave.
    fn close(&self) {
        let s = &*self.shared;
        let g = s.generation.0.load(Ordering::Relaxed);
        s.closed.0.store(g, Ordering::SeqCst);
        wait_until(self.hot(), || s.inside.iter().all(|w| w.0.load(Ordering::SeqCst) != g));
    }

    fn hot(&self) -> Duration {
        Duration::from_nanos(self.shared.hot_ns.load(Ordering::Relaxed))
    }

    /// Re-raise the first worker panic of the run just closed.
    fn raise_worker_panic(&self) {
        let worker_panic = self.shared.panic.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(p) = worker_panic {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            panic!("spin pool worker panicked: {msg}");
        }
    }

    /// Run `f(tid)` on the caller (tid 0) and on every worker that starts
    /// before the caller's `f` returns; `f` must finish the whole job alone
    /// if need be (claim its work, e.g. through [`Claims`]).
    fn run_claim<F: Fn(usize) + Sync>(&self, f: F) {
        if self.n == 1 {
            return f(0);
        }
        let _guard = match self.run_lock.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                (0..self.n).into_par_iter().for_each(&f);
                return;
            }
        };
        let g = |tid: usize, _: usize| f(tid);
        self.run_locked(&g, false);
        let mine = panic::catch_unwind(AssertUnwindSafe(|| f(0)));
        self.close();
        if let Err(p) = mine {
            panic::resume_unwind(p);
        }
        self.raise_worker_panic();
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
        self.run_locked(&f, true);
        let mine = panic::catch_unwind(AssertUnwindSafe(|| f(0, n)));
        // Join: wait until every worker has returned from `f`.
        let s = &*self.shared;
        let g = s.generation.0.load(Ordering::Relaxed);
        wait_until(self.hot(), || s.done.iter().all(|w| w.0.load(Ordering::Acquire) == g));
        self.close();
        if let Err(p) = mine {
            panic::resume_unwind(p);
        }
        self.raise_worker_panic();
    }

    /// Split `out` into `n` contiguous ranges whose starts are multiples of
    /// `align` and call `f(start, &mut out[start..end])` for each non-empty
    /// range, each range once, on whichever thread claims it first.
    pub fn for_ranges<T: Send, F: Fn(usize, &mut [T]) + Sync>(&self, out: &mut [T], align: usize, f: F) {
        let step = split_len(out.len(), self.n, align);
        self.for_chunks(out, step, f)
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
        let claims = Claims::new(n_chunks, self.n);
        let base = SendPtr(out.as_mut_ptr());
        self.run_claim(|tid| {
            let base = &base;
            while let Some(c) = claims.claim(tid) {
                let (r0, r1) = (c * chunk, ((c + 1) * chunk).min(len));
                // SAFETY: each chunk index is claimed once, chunks are
                // disjoint and inside `out`, borrowed until `run` returns.
                let o = unsafe { std::slice::from_raw_parts_mut(base.0.add(r0), r1 - r0) };
                f(r0, o);
            }
        });
    }
}

impl SpinPool {
    /// Run `f` on the caller and on every worker that starts before the
    /// caller's `f` returns (see `run_claim`): `f` must claim its work from a
    /// shared counter and be able to finish it alone.
    pub fn broadcast_claim<F: Fn() + Sync>(&self, f: F) {
        self.run_claim(|_| f())
    }

    /// Call `f(i)` once for every `i` in `0..n`, indices claimed in order
    /// from a shared counter by whichever threads are running.
    pub fn for_each_index<F: Fn(usize) + Sync>(&self, n: usize, f: F) {
        match n {
            0 => {}
            1 => f(0),
            _ => {
                let claims = Claims::new(n, self.n);
                self.run_claim(|tid| {
                    while let Some(i) = claims.claim(tid) {
                        f(i);
                    }
                });
            }
        }
    }
}

/// Where the parallel regions of a many-token forward run: rayon's pool
/// (sleeping workers, woken per region) or the spin pool (workers spin
/// between regions, so a region starts in well under a microsecond).
#[derive(Clone, Copy)]
pub enum Par<'a> {
    Rayon,
    Spin(&'a SpinPool),
}

impl Par<'_> {
    /// Run `f` on every participating thread (rayon: every thread of the
    /// current pool; spin: the caller and the workers that start in time).
    /// `f` must claim its work from a shared counter.
    pub fn broadcast_claim<F: Fn() + Sync>(self, f: F) {
        match self {
            Par::Rayon => {
                rayon::broadcast(|_| f());
            }
            Par::Spin(p) => p.broadcast_claim(f),
        }
    }

    /// `f(i)` for every `i` in `0..n`, in parallel, each index once.
    pub fn for_each_index<F: Fn(usize) + Sync + Send>(self, n: usize, f: F) {
        if n == 1 {
            // One task (decode's RoPE): a rayon job from outside its pool
            // waits for a worker to wake up.
            return f(0);
        }
        match self {
            Par::Rayon => (0..n).into_par_iter().for_each(f),
            Par::Spin(p) => p.for_each_index(n, f),
        }
    }
}

/// The work items `0..n_items` of a claimed run, split into one home range
/// per thread, each with its own counter on its own cache line: a thread
/// takes items from its home range first, then from the others' (so a
/// thread that never starts, or runs slow, is covered). One counter for
/// all threads had every claim queue behind the others' on 16 cores (an
/// empty 64-chunk run: ~8-10 us on the device host).
struct Claims {
    next: Box<[Padded<AtomicUsize>]>,
    ends: Box<[usize]>,
}

impl Claims {
    fn new(n_items: usize, threads: usize) -> Self {
        let t = threads.max(1);
        Self {
            next: (0..t).map(|i| Padded(AtomicUsize::new(i * n_items / t))).collect(),
            ends: (0..t).map(|i| (i + 1) * n_items / t).collect(),
        }
    }

    /// The next unclaimed item for thread `tid`: from its home range, else
    /// from the next thread's on; None once every range is exhausted. Each
    /// item is returned once over all callers.
    fn claim(&self, tid: usize) -> Option<usize> {
        let t = self.next.len();
        (0..t).find_map(|o| {
            let j = (tid + o) % t;
            let c = &self.next[j].0;
            // A plain load first: an exhausted range costs no write.
            if c.load(Ordering::Relaxed) >= self.ends[j] {
                return None;
            }
            let i = c.fetch_add(1, Ordering::Relaxed);
            (i < self.ends[j]).then_some(i)
        })
    }
}

/// Rows per thread: `len / n` rounded up to a multiple of `align`.
pub fn split_len(len: usize, n: usize, align: usize) -> usize {
    let align = align.max(1);
    len.div_ceil(n.max(1)).div_ceil(align).max(1) * align
}

/// A raw pointer that parallel tasks may share; each task must touch a
/// disjoint part of what it points to (the caller's SAFETY argument).
pub struct SendPtr<T>(pub *mut T);
unsafe impl<T: Send> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method, so closures capture the wrapper, not the field).
    pub fn get(&self) -> *mut T {
        self.0
    }
}

/// Spin briefly, then yield the core between checks, until `cond` holds.
fn wait_until(hot_for: Duration, cond: impl Fn() -> bool) {
    let mut spins = 0u32;
    let mut hot = None;
    while !cond() {
        spins = spins.wrapping_add(1);
        if !spins.is_multiple_of(32) {
            std::hint::spin_loop();
            continue;
        }
        let t0 = *hot.get_or_insert_with(Instant::now);
        if t0.elapsed() < hot_for {
            std::hint::spin_loop();
        } else {
            // A descheduled thread (shared core) needs this one's core.
            thread::yield_now();
        }
    }
}

fn worker(s: &Shared, tid: usize, n: usize) {
    let mut seen = 0u64;
    loop {
        // Wait for the next generation: spin, then yield, then park.
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
            if !spins.is_multiple_of(32) {
                std::hint::spin_loop();
                continue;
            }
            let waited = since.elapsed();
            if waited < Duration::from_nanos(s.hot_ns.load(Ordering::Relaxed)) {
                std::hint::spin_loop();
                continue;
            }
            thread::yield_now();
            if waited < SPIN_FOR {
                continue;
            }
            s.sleepers.0.fetch_add(1, Ordering::SeqCst);
            if s.generation.0.load(Ordering::SeqCst) == seen && !s.shutdown.load(Ordering::SeqCst) {
                thread::park();
            }
            s.sleepers.0.fetch_sub(1, Ordering::SeqCst);
            since = Instant::now();
            spins = 0;
        }
        // Enter run `seen` unless it is closed (see `Shared` for why the
        // SeqCst pair is enough); a run already replaced was closed first.
        let inside = &s.inside[tid - 1].0;
        inside.store(seen, Ordering::SeqCst);
        if s.closed.0.load(Ordering::SeqCst) >= seen {
            inside.store(0, Ordering::Release);
            continue;
        }
        // SAFETY: see `Shared`: the job of run `seen` is published, and it
        // stays alive until this worker leaves the run below.
        let job = unsafe { *s.job.get() };
        let r = panic::catch_unwind(AssertUnwindSafe(|| unsafe { (job.call)(job.data, tid, n) }));
        if let Err(p) = r {
            let mut slot = s.panic.lock().unwrap_or_else(|p| p.into_inner());
            if slot.is_none() {
                *slot = Some(p);
            }
        }
        if job.all {
            s.done[tid - 1].0.store(seen, Ordering::Release);
        }
        inside.store(0, Ordering::Release);
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

    /// Every item once: by one thread alone (the others never start), and
    /// by threads claiming at the same time, home ranges uneven.
    #[test]
    fn claims_hand_out_every_item_once() {
        for threads in [1, 3, 4, 16] {
            for n_items in [0, 1, 5, 17, 64, 100] {
                let c = Claims::new(n_items, threads);
                let mut alone: Vec<usize> = std::iter::from_fn(|| c.claim(threads - 1)).collect();
                alone.sort_unstable();
                assert_eq!(
                    alone,
                    (0..n_items).collect::<Vec<_>>(),
                    "alone: {threads} threads, {n_items}"
                );
                let c = Claims::new(n_items, threads);
                let got: Vec<AtomicUsize> = (0..n_items).map(|_| AtomicUsize::new(0)).collect();
                thread::scope(|sc| {
                    for tid in 0..threads.min(4) {
                        let (c, got) = (&c, &got);
                        sc.spawn(move || {
                            while let Some(i) = c.claim(tid) {
                                got[i].fetch_add(1, Ordering::Relaxed);
                            }
                        });
                    }
                });
                assert!(
                    got.iter().all(|g| g.load(Ordering::Relaxed) == 1),
                    "{threads} threads, {n_items}"
                );
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

    /// A longer busy-wait (`YINSEN_PREFILL_HOT_US`) changes nothing
    /// but timing; workers still park once it is back to the default.
    #[test]
    fn hot_setting_keeps_runs_exact_and_restores() {
        let pool = SpinPool::new(3).unwrap();
        pool.set_hot(Some(Duration::from_millis(1)));
        assert_eq!(pool.hot(), Duration::from_millis(1));
        for len in [0, 5, 100] {
            let mut out = vec![0usize; len];
            pool.for_chunks(&mut out, 7, |r0, o| {
                o.iter_mut().enumerate().for_each(|(k, v)| *v = r0 + k)
            });
            assert!(out.iter().enumerate().all(|(i, &v)| v == i));
            let hits = AtomicUsize::new(0);
            pool.for_each_index(len, |_| {
                hits.fetch_add(1, Ordering::Relaxed);
            });
            assert_eq!(hits.load(Ordering::Relaxed), len);
        }
        pool.set_hot(Some(Duration::from_secs(1)));
        assert_eq!(pool.hot(), SPIN_FOR, "capped at the park deadline");
        pool.set_hot(None);
        assert_eq!(pool.hot(), HOT);
        let t0 = Instant::now();
        while pool.shared.sleepers.0.load(Ordering::SeqCst) != 2 && t0.elapsed() < Duration::from_secs(5) {
            thread::sleep(SPIN_FOR);
        }
        assert_eq!(pool.shared.sleepers.0.load(Ordering::SeqCst), 2, "workers did not park");
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

    /// Chunked runs that the caller often finishes (and closes) before a
    /// worker arrives, interleaved with every-tid runs: late workers skip the
    /// closed runs and never run a job twice or miss an every-tid run; more
    /// threads than cores (busy threads) to force descheduled workers.
    #[test]
    fn late_workers_skip_closed_runs() {
        let stop = AtomicBool::new(false);
        thread::scope(|sc| {
            for _ in 0..2 {
                sc.spawn(|| {
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                });
            }
            let n = 4;
            let pool = SpinPool::new(n).unwrap();
            let counts: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            for r in 0..3000 {
                let len = 1 + r % 5;
                let mut out = vec![usize::MAX; len];
                pool.for_chunks(&mut out, 1, |r0, o| {
                    assert_eq!(o[0], usize::MAX, "chunk written twice");
                    o[0] = r0 + r;
                });
                assert!(out.iter().enumerate().all(|(i, &v)| v == i + r), "run {r}");
                if r % 3 == 0 {
                    pool.run(|tid, _| {
                        counts[tid].fetch_add(1, Ordering::Relaxed);
                    });
                    let want = r / 3 + 1;
                    assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == want), "run {r}");
                }
            }
            stop.store(true, Ordering::Relaxed);
        });
    }
}
