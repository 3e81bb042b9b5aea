//! Continuous batching (`--batch N`): one thread owns the engine's decode
//! loop. A request joins between steps (its prompt runs as its own call),
//! then every active request's next token goes into one
//! `Backend::forward_batch` step; a request leaves when it ends. Each
//! request's tokens are the ones it would get alone: the batched step's
//! logits are bit-equal to a one-sequence step, and sampling draws from the
//! request's own seeded sampler, as `Session::generate` does.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use tokio::sync::{oneshot, OwnedSemaphorePermit};
use yinsen::backends::{KvCache, Output};
use yinsen::engine::sampling::Sampler;
use yinsen::engine::session::TOP_K_MAX;
use yinsen::engine::Engine;

use crate::generate::{finish_reason, Job, Outcome, TextOut};

pub(crate) type Alive = Box<dyn Fn() -> bool + Send>;
pub(crate) type Emit = Box<dyn FnMut(&str) -> bool + Send>;

/// A request for the batcher: its job, how to hand out its text, where its
/// outcome goes, and its place in the server's limit (held until it ends).
pub(crate) struct Req {
    pub job: Job,
    pub alive: Alive,
    pub emit: Emit,
    pub done: oneshot::Sender<yinsen::Result<Outcome>>,
    pub _permit: OwnedSemaphorePermit,
}

pub(crate) struct Batcher {
    tx: mpsc::Sender<Req>,
    /// The most sequences one step has run (for /health and the tests).
    pub widest: Arc<AtomicUsize>,
}

impl Batcher {
    /// The batching thread over `engine`, at most `max` sequences a step.
    pub fn spawn(engine: Arc<Engine>, max: usize) -> Self {
        let (tx, rx) = mpsc::channel();
        let widest = Arc::new(AtomicUsize::new(0));
        let w = widest.clone();
        std::thread::Builder::new()
            .name("yinsen-batcher".into())
            .spawn(move || run(&engine, rx, max.max(1), &w))
            .expect("spawning the batching thread");
        Self { tx, widest }
    }

    pub fn submit(&self, r: Req) {
        if let Err(mpsc::SendError(r)) = self.tx.send(r) {
            let _ = r
                .done
                .send(Err(yinsen::Error::backend("server", "the batching thread has stopped")));
        }
    }
}

/// One active request.
struct Seq<'e> {
    req: Req,
    cache: Box<dyn KvCache>,
    sampler: Sampler,
    /// Every token fed so far (the repetition penalty's window).
    fed: Vec<u32>,
    text: TextOut<'e>,
    n_gen: usize,
    /// The token the next step feeds.
    next: u32,
}

/// What a step gives a request: its logits, or its pick (greedy: the
/// token first; top-k: ranked).
enum Scores<'a> {
    Logits(&'a [f32]),
    Ranked(Vec<(u32, f32)>),
}

/// How a request's turn ended.
enum Turn {
    Next,
    Done { eos: bool },
}

impl<'e> Seq<'e> {
    /// Run the prompt; the first token is sampled from its logits. On an
    /// error the request gets it and None comes back.
    fn start(engine: &'e Engine, req: Req) -> Option<(Self, Turn)> {
        let job = &req.job;
        let first = engine
            .backend
            .new_cache(job.prompt.len() + job.max_new)
            .and_then(|mut c| Ok((engine.backend.forward(c.as_mut(), &job.prompt, Output::LastLogits)?, c)));
        let (logits, cache) = match first {
            Ok(x) => x,
            Err(e) => {
                let _ = req.done.send(Err(e));
                return None;
            }
        };
        let mut s = Seq {
            sampler: Sampler::new(job.sampler.clone()),
            fed: job.prompt.clone(),
            text: TextOut::new(engine, job),
            n_gen: 0,
            next: 0,
            cache,
            req,
        };
        match s.take(engine, Scores::Logits(&logits)) {
            Ok(turn) => Some((s, turn)),
            Err(e) => {
                let _ = s.req.done.send(Err(e));
                None
            }
        }
    }

    /// What this request can take from a step instead of its logits, as
    /// `Session::generate` takes it: a greedy pick, or a ranked top-k.
    fn pick(&self) -> Option<(usize, bool)> {
        if self.req.job.sampler.is_greedy() {
            return Some((1, true));
        }
        self.sampler.takes_top_k(TOP_K_MAX).map(|k| (k, false))
    }

    /// Sample the next token and hand out its text.
    fn take(&mut self, engine: &Engine, scores: Scores) -> yinsen::Result<Turn> {
        let tok = match scores {
            Scores::Logits(l) => self.sampler.sample(l, &self.fed),
            Scores::Ranked(cand) if self.req.job.sampler.is_greedy() => cand[0].0,
            Scores::Ranked(cand) => self.sampler.sample_ranked(cand),
        };
        if engine.tokenizer.eos_ids().contains(&tok) {
            return Ok(Turn::Done { eos: true });
        }
        self.n_gen += 1;
        let go_on = self.text.on_token(tok, &*self.req.alive, &mut *self.req.emit)?;
        if !go_on || self.n_gen == self.req.job.max_new || self.fed.len() >= self.cache.capacity() {
            return Ok(Turn::Done { eos: false });
        }
        self.next = tok;
        Ok(Turn::Next)
    }

    /// Send the outcome (the permit goes with `self`).
    fn end(self, eos: bool) {
        let Seq { req, text, n_gen, .. } = self;
        let Req {
            job, mut emit, done, ..
        } = req;
        let r = text.finish(&mut *emit).map(|(text, stopped)| Outcome {
            text,
            n_prompt: job.prompt.len(),
            n_gen,
            finish: finish_reason(stopped, eos),
        });
        let _ = done.send(r);
    }
}

fn run(engine: &Engine, rx: mpsc::Receiver<Req>, max: usize, widest: &AtomicUsize) {
    let mut active: Vec<Seq> = Vec::new();
    let vocab = engine.model.config.vocab;
    loop {
        // Join: wait when idle, else take whoever is waiting.
        let mut joining = Vec::new();
        if active.is_empty() {
            match rx.recv() {
                Ok(r) => joining.push(r),
                Err(_) => return,
            }
        }
        while active.len() + joining.len() < max {
            match rx.try_recv() {
                Ok(r) => joining.push(r),
                Err(_) => break,
            }
        }
        for r in joining {
            match Seq::start(engine, r) {
                Some((s, Turn::Next)) => active.push(s),
                Some((s, Turn::Done { eos })) => s.end(eos),
                None => {}
            }
        }
        if active.is_empty() {
            continue;
        }
        widest.fetch_max(active.len(), Ordering::Relaxed);
        // One step for every active request: picks where all can take one
        // (the backend's screened head reads a fraction of the F16 rows),
        // else every logit.
        let tokens: Vec<u32> = active.iter().map(|s| s.next).collect();
        let picks: Option<Vec<(usize, bool)>> = active.iter().map(|s| s.pick()).collect();
        let step = {
            let mut caches: Vec<&mut dyn KvCache> = active.iter_mut().map(|s| s.cache.as_mut() as _).collect();
            match &picks {
                Some(p) => engine.backend.forward_batch_pick(&mut caches, &tokens, p),
                None => Ok(None),
            }
            .and_then(|ranked| match ranked {
                Some(r) => Ok((Vec::new(), Some(r))),
                None => Ok((engine.backend.forward_batch(&mut caches, &tokens)?, None)),
            })
        };
        let (logits, mut ranked) = match step {
            Ok(x) => x,
            Err(e) => {
                // The step failed for all of them: each gets the error.
                for s in active.drain(..) {
                    let _ = s.req.done.send(Err(yinsen::Error::backend("batch", e.to_string())));
                }
                continue;
            }
        };
        let mut still = Vec::with_capacity(active.len());
        for (i, mut s) in active.drain(..).enumerate() {
            s.fed.push(s.next);
            let scores = match ranked.as_mut() {
                Some(r) => Scores::Ranked(std::mem::take(&mut r[i])),
                None => Scores::Logits(&logits[i * vocab..(i + 1) * vocab]),
            };
            match s.take(engine, scores) {
                Ok(Turn::Next) => still.push(s),
                Ok(Turn::Done { eos }) => s.end(eos),
                Err(e) => {
                    let _ = s.req.done.send(Err(e));
                }
            }
        }
        active = still;
    }
}
