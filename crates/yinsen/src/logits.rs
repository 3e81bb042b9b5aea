//! Picking from logits: the greedy token and the ranked top-k, one order
//! for every path (the sampler, the CPU's screened head, the CUDA top-k
//! kernel match it).

/// Index of the largest logit (lowest index wins ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// (token, logit) by falling logit (lower token first on ties), cut to the
/// first `top_k` (0 = all). With a top-k one pass keeps the k best in a heap
/// whose top is the worst kept (most logits fail one comparison with it) and
/// only they are sorted: sorting the whole vocabulary (128k entries for
/// BitNet) cost 3.25 ms per token here, this 0.1 ms; the same list.
pub fn ranked(l: &[f32], top_k: usize) -> Vec<(u32, f32)> {
    ranked_pairs(l.iter().enumerate().map(|(i, &v)| (i as u32, v)), top_k)
}

/// [`ranked`] over (token, logit) pairs in any order.
pub fn ranked_pairs(pairs: impl IntoIterator<Item = (u32, f32)>, top_k: usize) -> Vec<(u32, f32)> {
    let mut it = pairs.into_iter();
    if top_k == 0 {
        let mut cand: Vec<(u32, f32)> = it.collect();
        cand.sort_unstable_by(rank_order);
        return cand;
    }
    let mut kept: std::collections::BinaryHeap<Ranked> = it.by_ref().take(top_k).map(Ranked).collect();
    if let Some(first_worst) = kept.peek() {
        // A later pair ranks before the worst kept only if it ranks first.
        let mut worst = first_worst.0;
        for p in it {
            if rank_order(&p, &worst).is_lt() {
                *kept.peek_mut().expect("top_k > 0") = Ranked(p);
                worst = kept.peek().expect("top_k > 0").0;
            }
        }
    }
    let mut cand: Vec<(u32, f32)> = kept.into_iter().map(|r| r.0).collect();
    cand.sort_unstable_by(rank_order);
    cand
}

/// Falling logit, then the lower token: `Less` ranks first.
fn rank_order(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// A candidate ordered by [`rank_order`], so a max-heap's top is the worst.
struct Ranked((u32, f32));

impl PartialEq for Ranked {
    fn eq(&self, o: &Self) -> bool {
        rank_order(&self.0, &o.0).is_eq()
    }
}
impl Eq for Ranked {}
impl PartialOrd for Ranked {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Ranked {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        rank_order(&self.0, &o.0)
    }
}
