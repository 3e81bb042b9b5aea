//! One request's generation, on a blocking thread: the engine's session loop
//! plus stop strings, with text handed out as soon as it is final.

use yinsen::engine::sampling::SamplerConfig;
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

/// Generate `job`. `emit` receives the text piece by piece, never a piece that
/// could still turn out to begin a stop string; it returns false when nobody
/// listens any more, which ends generation.
pub(crate) fn run(engine: &Engine, job: &Job, mut emit: impl FnMut(&str) -> bool) -> yinsen::Result<Outcome> {
    let mut session = engine.session(job.prompt.len() + job.max_new)?;
    let params = GenParams {
        max_new: job.max_new,
        sampler: job.sampler.clone(),
        stop_ids: engine.tokenizer.eos_ids().to_vec(),
    };
    let mut decoder = engine.tokenizer.stream(false);
    let mut text = String::new();
    let mut sent = 0;
    let mut stopped = false;
    let mut listening = true;
    let (tokens, reason, _) = session.generate(&job.prompt, &params, |tok| {
        text.push_str(&decoder.push(tok)?);
        if let Some(i) = find_stop(&text, &job.stops) {
            text.truncate(i);
            stopped = true;
            return Ok(false);
        }
        let safe = text.len() - held_back(&text, &job.stops);
        if safe > sent {
            listening = emit(&text[sent..safe]);
            sent = safe;
        }
        Ok(listening)
    })?;
    if !stopped {
        text.push_str(&decoder.finish()?);
        if let Some(i) = find_stop(&text, &job.stops) {
            text.truncate(i);
            stopped = true;
        }
    }
    if listening && text.len() > sent {
        emit(&text[sent..]);
    }
    Ok(Outcome {
        text,
        n_prompt: job.prompt.len(),
        n_gen: tokens.len(),
        finish: if stopped || reason == StopReason::Eos {
            "stop"
        } else {
            "length"
        },
    })
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
}
