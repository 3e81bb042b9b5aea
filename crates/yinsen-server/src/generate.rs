//! One request's generation: the engine's session loop (or the batcher's
//! steps) plus stop strings, with text handed out as soon as it is final.

use yinsen::engine::sampling::SamplerConfig;
use yinsen::engine::tokenizer::StreamDecoder;
use yinsen::engine::{Engine, GenParams, StopReason};

pub(crate) struct Job {
    pub prompt: Vec<u32>,
    pub max_new: usize,
    pub sampler: SamplerConfig,
    /// Non-empty strings; the text ends before the first one that appears.
    pub stops: Vec<String>,
}

pub(crate) struct Outcome {
    pub text: String,
    pub n_prompt: usize,
    pub n_gen: usize,
    /// OpenAI's finish_reason: "stop" (end token or stop string) or "length".
    pub finish: &'static str,
}

/// A request's text as its tokens come: decoded, checked against the stop
/// strings, handed out when final; the serial and the batched loops share it.
pub(crate) struct TextOut<'e> {
    decoder: StreamDecoder<'e>,
    scan: StopScan,
    listening: bool,
}

impl<'e> TextOut<'e> {
    pub fn new(engine: &'e Engine, job: &Job) -> Self {
        Self {
            decoder: engine.tokenizer.stream(false),
            scan: StopScan::new(job.stops.clone()),
            listening: true,
        }
    }

    /// Token `tok` was generated: whether generation goes on (no stop
    /// string, someone listening, `alive`).
    pub fn on_token(
        &mut self,
        tok: u32,
        alive: &dyn Fn() -> bool,
        emit: &mut dyn FnMut(&str) -> bool,
    ) -> yinsen::Result<bool> {
        let (ready, stopped) = self.scan.push(&self.decoder.push(tok)?);
        if !ready.is_empty() {
            self.listening = emit(ready);
        }
        self.listening &= alive();
        Ok(self.listening && !stopped)
    }

    /// Generation ended: the rest of the text out; the whole text, and
    /// whether a stop string ended it.
    pub fn finish(mut self, emit: &mut dyn FnMut(&str) -> bool) -> yinsen::Result<(String, bool)> {
        let rest = if self.scan.stopped() {
            ""
        } else {
            self.scan.finish(&self.decoder.finish()?)
        };
        if self.listening && !rest.is_empty() {
            emit(rest);
        }
        Ok(self.scan.into_text())
    }
}

/// OpenAI's finish_reason.
pub(crate) fn finish_reason(stopped: bool, eos: bool) -> &'static str {
    if stopped || eos {
        "stop"
    } else {
        "length"
    }
}

/// Generate `job` alone. `emit` receives the text piece by piece, never a
/// piece that could still turn out to begin a stop string; it returns false
/// when nobody listens any more, which ends generation, as `alive` returning
/// false (asked every token) does.
pub(crate) fn run(
    engine: &Engine,
    job: &Job,
    alive: impl Fn() -> bool,
    mut emit: impl FnMut(&str) -> bool,
) -> yinsen::Result<Outcome> {
    let mut session = engine.session(job.prompt.len() + job.max_new)?;
    let params = GenParams {
        max_new: job.max_new,
        sampler: job.sampler.clone(),
        stop_ids: engine.tokenizer.eos_ids().to_vec(),
    };
    let mut text = TextOut::new(engine, job);
    let (tokens, reason, _) = session.generate(&job.prompt, &params, |tok| text.on_token(tok, &alive, &mut emit))?;
    let (text, stopped) = text.finish(&mut emit)?;
    Ok(Outcome {
        text,
        n_prompt: job.prompt.len(),
        n_gen: tokens.len(),
        finish: finish_reason(stopped, reason == StopReason::Eos),
    })
}

/// The text so far against the stop strings: what is final (emitted), what
/// is held back (it may begin a stop string), and whether one appeared.
struct StopScan {
    stops: Vec<String>,
    text: String,
    sent: usize,
    stopped: bool,
}

impl StopScan {
    fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            text: String::new(),
            sent: 0,
            stopped: false,
        }
    }

    /// Add `piece`: the text now final (maybe empty), and whether a stop
    /// string appeared (the text ends before it; nothing more comes).
    fn push(&mut self, piece: &str) -> (&str, bool) {
        if self.stopped {
            return ("", true);
        }
        self.text.push_str(piece);
        let end = match find_stop(&self.text, &self.stops) {
            Some(i) => {
                self.text.truncate(i);
                self.stopped = true;
                i
            }
            None => self.text.len() - held_back(&self.text, &self.stops),
        };
        let from = self.sent;
        self.sent = end.max(from);
        (&self.text[from..self.sent], self.stopped)
    }

    fn stopped(&self) -> bool {
        self.stopped
    }

    /// The last piece (the decoder's tail): everything left is final.
    fn finish(&mut self, piece: &str) -> &str {
        let from = self.sent;
        self.push(piece);
        self.sent = self.text.len();
        &self.text[from..]
    }

    fn into_text(self) -> (String, bool) {
        (self.text, self.stopped)
    }
}

/// Where the first stop string starts in `text`.
fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// Bytes at the end of `text` that are a proper prefix of a stop string (so
/// not yet known to be output).
fn held_back(text: &str, stops: &[String]) -> usize {
    stops
        .iter()
        .filter_map(|s| {
            s.char_indices()
                .map(|(i, _)| i)
                .filter(|&k| k > 0 && text.ends_with(&s[..k]))
                .max()
        })
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn holds_back_only_what_may_start_a_stop_string() {
        let st = stops(&["END", "ünï"]);
        assert_eq!(held_back("abc", &st), 0);
        assert_eq!(held_back("abcE", &st), 1);
        assert_eq!(held_back("abcEN", &st), 2);
        // A whole stop string is found, not held.
        assert_eq!(held_back("abcEND", &st), 0);
        assert_eq!(find_stop("abcENDx", &st), Some(3));
        // Multi-byte prefixes end on character boundaries.
        assert_eq!(held_back("xü", &st), "ü".len());
        assert_eq!(held_back("xün", &st), "ün".len());
        assert_eq!(find_stop("xünï ENDy", &st), Some(1));
        assert_eq!(find_stop("plain", &st), None);
        assert_eq!(held_back("anything", &[]), 0);
    }

    /// Random texts over a small alphabet (so stop strings match partly and
    /// often), cut into random pieces: what the scan emits joins to the text
    /// up to the first stop string found after a piece, and after each piece
    /// it emits everything but the longest tail that begins a stop string
    /// (brute force here).
    #[test]
    fn scan_emits_exactly_the_text_before_a_stop() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut rnd = |n: usize| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) % n as u64) as usize
        };
        let alphabet = ['a', 'b', 'ü', 'c'];
        let mut stopped_cases = 0;
        for _ in 0..20_000 {
            let word = |rnd: &mut dyn FnMut(usize) -> usize, n: usize| -> String {
                (0..n).map(|_| alphabet[rnd(alphabet.len())]).collect()
            };
            let n_stops = rnd(4);
            let stops: Vec<String> = (0..n_stops)
                .map(|_| {
                    let n = 1 + rnd(4);
                    word(&mut rnd, n)
                })
                .collect();
            let n_pieces = rnd(12);
            let pieces: Vec<String> = (0..n_pieces)
                .map(|_| {
                    let n = rnd(4);
                    word(&mut rnd, n)
                })
                .collect();
            let n_tail = rnd(2);
            let tail = word(&mut rnd, n_tail);
            let mut scan = StopScan::new(stops.clone());
            let (mut out, mut text, mut want_stop) = (String::new(), String::new(), None);
            for p in &pieces {
                let (ready, stopped) = scan.push(p);
                out.push_str(ready);
                if want_stop.is_some() {
                    assert!(stopped && ready.is_empty());
                    continue;
                }
                text.push_str(p);
                want_stop = find_stop(&text, &stops);
                assert_eq!(stopped, want_stop.is_some());
                if want_stop.is_none() {
                    let held = (1..=text.len())
                        .filter(|&k| text.is_char_boundary(text.len() - k))
                        .filter(|&k| {
                            stops
                                .iter()
                                .any(|s| s.len() > k && s.starts_with(&text[text.len() - k..]))
                        })
                        .max()
                        .unwrap_or(0);
                    assert_eq!(out.len(), text.len() - held, "{stops:?} {pieces:?}");
                }
            }
            if let Some(i) = want_stop {
                stopped_cases += 1;
                text.truncate(i);
            } else {
                out.push_str(scan.finish(&tail));
                text.push_str(&tail);
                if let Some(i) = find_stop(&text, &stops) {
                    text.truncate(i);
                }
            }
            assert_eq!(out, text, "{stops:?} {pieces:?} {tail:?}");
            assert_eq!(scan.into_text().0, text);
        }
        assert!(stopped_cases > 2_000, "{stopped_cases}");
    }
}
