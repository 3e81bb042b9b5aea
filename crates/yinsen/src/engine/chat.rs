//! Chat templates: turns a conversation into the prompt text a chat model was
//! trained on, by running the model's Jinja template (HF `chat_template`,
//! GGUF `tokenizer.chat_template`) the way transformers does.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, ErrorKind, Value};

use crate::{Error, Result};

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Meta's Llama-3-Instruct template (header format), used when a model ships none.
pub const LLAMA3_TEMPLATE: &str = "{% set loop_messages = messages %}\
{% for message in loop_messages %}\
{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}\
{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}\
{{ content }}\
{% endfor %}\
{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// Renders `messages` with `template` (or the built-in Llama-3 one).
/// Template errors, including `raise_exception(...)`, come back as `Error::Input`.
pub fn render_chat(
    template: Option<&str>,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    let env = environment()?;
    let source = template.unwrap_or(LLAMA3_TEMPLATE);
    let tmpl = env
        .template_from_str(source)
        .map_err(|e| Error::input(format!("chat template does not parse: {e}")))?;
    let msgs: Vec<Value> = messages.iter().map(message_value).collect();
    let ctx = BTreeMap::from([
        ("messages".to_string(), Value::from(msgs)),
        ("add_generation_prompt".to_string(), Value::from(add_generation_prompt)),
        ("bos_token".to_string(), Value::from(bos_token)),
        ("eos_token".to_string(), Value::from(eos_token)),
        ("tools".to_string(), Value::from(())),
    ]);
    // A template comes with the model file, which may lie: its running time
    // is bounded by fuel and its output by CHAT_MAX_BYTES (minijinja itself
    // caps `range` and string repetition, not loops in loops).
    let mut out = CappedWriter {
        buf: Vec::new(),
        over: false,
    };
    match tmpl.render_captured_to(Value::from(ctx), &mut out).map(drop) {
        Ok(_) => String::from_utf8(out.buf).map_err(|_| Error::input("chat template output is not UTF-8")),
        Err(_) if out.over => Err(Error::input(format!(
            "chat template output is larger than {} MiB",
            CHAT_MAX_BYTES >> 20
        ))),
        Err(e) if e.kind() == ErrorKind::OutOfFuel => Err(Error::input(format!(
            "chat template runs too long (more than {CHAT_FUEL} steps)"
        ))),
        Err(e) => Err(Error::input(format!("chat template failed: {e}"))),
    }
}

/// Instructions a chat template may run (minijinja fuel): a Llama-3
/// conversation takes ~30 a message.
pub const CHAT_FUEL: u64 = 20_000_000;
/// Bytes of prompt text a chat template may render (far more than any
/// model's context holds).
pub const CHAT_MAX_BYTES: usize = 16 << 20;

/// An output that refuses to grow past CHAT_MAX_BYTES.
struct CappedWriter {
    buf: Vec<u8>,
    over: bool,
}

impl std::io::Write for CappedWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + b.len() > CHAT_MAX_BYTES {
            self.over = true;
            return Err(std::io::Error::other("chat template output too large"));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn message_value(m: &ChatMessage) -> Value {
    Value::from(BTreeMap::from([
        ("role".to_string(), Value::from(m.role.as_str())),
        ("content".to_string(), Value::from(m.content.as_str())),
    ]))
}

/// A Jinja environment configured like transformers' chat-template sandbox.
fn environment() -> Result<Environment<'static>> {
    let mut env = Environment::new();
    // transformers compiles templates with trim_blocks and lstrip_blocks.
    let syntax = SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .map_err(|e| Error::input(format!("chat template syntax: {e}")))?;
    env.set_syntax(syntax);
    env.set_fuel(Some(CHAT_FUEL));
    // Python string/dict methods (`.strip()`, `.items()`, ...) used by HF templates.
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    minijinja_contrib::add_to_environment(&mut env);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    Ok(env)
}

fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// `strftime_now(fmt)`: the current UTC date/time, as transformers provides.
fn strftime_now(fmt: String) -> std::result::Result<String, minijinja::Error> {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    strftime(&fmt, secs)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Civil (year, month 1-12, day 1-31) from days since 1970-01-01 (H. Hinnant).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The subset of C strftime that chat templates use, in UTC.
fn strftime(fmt: &str, unix_secs: u64) -> std::result::Result<String, minijinja::Error> {
    let days = (unix_secs / 86_400) as i64;
    let sod = unix_secs % 86_400;
    let (y, mo, d) = civil_from_days(days);
    let (h, mi, s) = (sod / 3600, sod % 3600 / 60, sod % 60);
    let month = MONTHS[(mo - 1) as usize];
    // 1970-01-01 was a Thursday (index 3 from Monday).
    let weekday = WEEKDAYS[((days + 3).rem_euclid(7)) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let spec = chars.next().unwrap_or('%');
        let piece = match spec {
            'Y' => y.to_string(),
            'y' => format!("{:02}", y.rem_euclid(100)),
            'm' => format!("{mo:02}"),
            'd' => format!("{d:02}"),
            'e' => format!("{d:>2}"),
            '-' => match chars.next() {
                Some('d') => d.to_string(),
                Some('m') => mo.to_string(),
                other => return Err(bad_strftime(format!("%-{}", other.unwrap_or(' ')))),
            },
            'B' => month.to_string(),
            'b' | 'h' => month[..3].to_string(),
            'A' => weekday.to_string(),
            'a' => weekday[..3].to_string(),
            'H' => format!("{h:02}"),
            'I' => format!("{:02}", (h + 11) % 12 + 1),
            'p' => (if h < 12 { "AM" } else { "PM" }).to_string(),
            'M' => format!("{mi:02}"),
            'S' => format!("{s:02}"),
            '%' => "%".to_string(),
            other => return Err(bad_strftime(format!("%{other}"))),
        };
        out.push_str(&piece);
    }
    Ok(out)
}

fn bad_strftime(spec: String) -> minijinja::Error {
    minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("strftime_now: unsupported format {spec}"),
    )
}

/// `tojson` as transformers defines it: Python `json.dumps(..., ensure_ascii=False)`
/// (", " and ": " separators, optional indent, no HTML escaping).
fn tojson(value: Value, indent: Option<usize>, kwargs: Kwargs) -> std::result::Result<String, minijinja::Error> {
    let indent = match kwargs.get::<Option<usize>>("indent")? {
        Some(i) => Some(i),
        None => indent,
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&mut out, &value, indent, sort_keys, 0)?;
    Ok(out)
}

fn write_json(
    out: &mut String,
    v: &Value,
    indent: Option<usize>,
    sort_keys: bool,
    depth: usize,
) -> std::result::Result<(), minijinja::Error> {
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&v.to_string()),
        ValueKind::String => write_json_str(out, v.as_str().unwrap_or_default()),
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if sort_keys {
                keys.sort();
            }
            let items = keys
                .into_iter()
                .map(|k| {
                    let val = v.get_item(&k)?;
                    Ok((k, val))
                })
                .collect::<std::result::Result<Vec<_>, minijinja::Error>>()?;
            write_container(out, ('{', '}'), items.len(), indent, depth, |out, i| {
                write_json_str(out, &items[i].0.to_string());
                out.push_str(": ");
                write_json(out, &items[i].1, indent, sort_keys, depth + 1)
            })?;
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            write_container(out, ('[', ']'), items.len(), indent, depth, |out, i| {
                write_json(out, &items[i], indent, sort_keys, depth + 1)
            })?;
        }
        _ => write_json_str(out, &v.to_string()),
    }
    Ok(())
}

fn write_container(
    out: &mut String,
    (open, close): (char, char),
    n: usize,
    indent: Option<usize>,
    depth: usize,
    mut item: impl FnMut(&mut String, usize) -> std::result::Result<(), minijinja::Error>,
) -> std::result::Result<(), minijinja::Error> {
    out.push(open);
    if n == 0 {
        out.push(close);
        return Ok(());
    }
    for i in 0..n {
        if i > 0 {
            out.push(',');
        }
        match indent {
            Some(w) => {
                out.push('\n');
                out.push_str(&" ".repeat(w * (depth + 1)));
            }
            None if i > 0 => out.push(' '),
            None => {}
        }
        item(out, i)?;
    }
    if let Some(w) = indent {
        out.push('\n');
        out.push_str(&" ".repeat(w * depth));
    }
    out.push(close);
    Ok(())
}

fn write_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Templates from a lying model file end with an error, soon: loops in
    /// loops (10^10 steps) run out of fuel, a flood of output stops at
    /// CHAT_MAX_BYTES, a macro calling itself at minijinja's recursion limit.
    /// A long real conversation still renders.
    #[test]
    fn hostile_templates_are_bounded() {
        let m = [ChatMessage::new("user", "hi")];
        for (t, want) in [
            (
                "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
                "runs too long",
            ),
            (
                "{% for i in range(1000) %}{{ 'a' * 100000 }}{% endfor %}",
                "larger than 16 MiB",
            ),
            (
                "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
                "chat template failed",
            ),
            ("{{ 'a' * 1000000000 }}", "chat template failed"),
        ] {
            let t0 = std::time::Instant::now();
            let e = render_chat(Some(t), &m, true, "<s>", "</s>").unwrap_err().to_string();
            assert!(e.contains(want), "{t}: {e}");
            assert!(t0.elapsed().as_secs() < 20, "{t}: {:?}", t0.elapsed());
        }
        // Just under the output cap renders.
        let t = "{% for i in range(160) %}{{ 'a' * 100000 }}{% endfor %}";
        assert_eq!(render_chat(Some(t), &m, true, "<s>", "</s>").unwrap().len(), 16_000_000);
        let long: Vec<ChatMessage> = (0..20_000)
            .map(|i| ChatMessage::new(if i % 2 == 0 { "user" } else { "assistant" }, format!("message {i}")))
            .collect();
        let text = render_chat(None, &long, true, "<s>", "</s>").unwrap();
        assert!(text.ends_with("<|start_header_id|>assistant<|end_header_id|>\n\n"));
        assert_eq!(text.matches("<|eot_id|>").count(), 20_000);
    }

    #[test]
    fn civil_dates_known_points() {
        // Independent facts: 2000-03-01 is day 11017; 2024-02-29 is day 19782.
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_017), (2000, 3, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        // 2024-02-29 12:34:56 UTC was a Thursday.
        let t = 19_782 * 86_400 + 12 * 3600 + 34 * 60 + 56;
        assert_eq!(
            strftime("%d %b %Y %A %H:%M:%S %p %%", t).unwrap(),
            "29 Feb 2024 Thursday 12:34:56 PM %"
        );
        assert!(strftime("%Q", t).is_err());
    }

    #[test]
    fn raise_exception_and_syntax_errors_are_input_errors() {
        let msgs = [ChatMessage::new("user", "hi")];
        let t = "{% if messages[0]['role'] == 'user' %}{{ raise_exception('no users here') }}{% endif %}";
        match render_chat(Some(t), &msgs, true, "<s>", "</s>") {
            Err(Error::Input(m)) => assert!(m.contains("no users here"), "{m}"),
            other => panic!("expected Input error, got {other:?}"),
        }
        assert!(matches!(
            render_chat(Some("{% for %}"), &msgs, true, "", ""),
            Err(Error::Input(_))
        ));
    }

    #[test]
    fn python_methods_tojson_and_loop_controls() {
        let msgs = [
            ChatMessage::new("system", "  sys  "),
            ChatMessage::new("user", "a\"<b>"),
        ];
        let t = "{% for m in messages %}{% if loop.index0 == 1 %}{% break %}{% endif %}\
                 [{{ m.content.strip() }}]{% endfor %}{{ messages[1].content | tojson }}\
                 {{ {'k': [1, 2]} | tojson }}";
        let out = render_chat(Some(t), &msgs, false, "", "").unwrap();
        assert_eq!(out, "[sys]\"a\\\"<b>\"{\"k\": [1, 2]}");
    }
}
