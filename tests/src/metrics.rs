//! A small parser for the Prometheus text exposition format.

use std::collections::BTreeMap;

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed `/metrics` page (the raw text is kept for canary checks).
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub text: String,
    pub samples: Vec<Sample>,
}

impl Metrics {
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(parse_line)
            .collect();
        Self { text: text.to_string(), samples }
    }

    /// Samples named `name` whose labels include every `(label, value)` in `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// Value of the first matching sample.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.matching(name, labels).next().map(|s| s.value)
    }

    /// Sum over matching samples (0 if none).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// True if any sample of this name (or its `_bucket`/`_sum`/`_count` series) exists.
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|s| {
            s.name == name
                || s.name.strip_prefix(name).is_some_and(|rest| matches!(rest, "_bucket" | "_sum" | "_count"))
        })
    }
}

fn parse_line(line: &str) -> Option<Sample> {
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let name = &line[..open];
            let (labels, consumed) = parse_labels(&line[open + 1..])?;
            (name, labels, &line[open + 1 + consumed..])
        }
        None => {
            let end = line.find(char::is_whitespace)?;
            (&line[..end], BTreeMap::new(), &line[end..])
        }
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample { name: name.trim().to_string(), labels, value })
}

/// Parses `a="x",b="y"}`; returns the labels and the bytes consumed including `}`.
fn parse_labels(s: &str) -> Option<(BTreeMap<String, String>, usize)> {
    let mut labels = BTreeMap::new();
    let bytes: Vec<char> = s.chars().collect();
    let mut i = 0;
    let mut consumed = 0;
    loop {
        while i < bytes.len() && (bytes[i] == ',' || bytes[i] == ' ') {
            consumed += bytes[i].len_utf8();
            i += 1;
        }
        if i < bytes.len() && bytes[i] == '}' {
            consumed += 1;
            return Some((labels, consumed));
        }
        let mut key = String::new();
        while i < bytes.len() && bytes[i] != '=' {
            key.push(bytes[i]);
            consumed += bytes[i].len_utf8();
            i += 1;
        }
        if i + 1 >= bytes.len() || bytes[i + 1] != '"' {
            return None;
        }
        consumed += 2;
        i += 2;
        let mut value = String::new();
        while i < bytes.len() && bytes[i] != '"' {
            if bytes[i] == '\\' && i + 1 < bytes.len() {
                consumed += 1;
                i += 1;
                value.push(match bytes[i] {
                    'n' => '\n',
                    other => other,
                });
            } else {
                value.push(bytes[i]);
            }
            consumed += bytes[i].len_utf8();
            i += 1;
        }
        if i >= bytes.len() {
            return None;
        }
        consumed += 1;
        i += 1;
        labels.insert(key.trim().to_string(), value);
    }
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_prometheus_text() {
        let text = "# HELP x y\n# TYPE portcullis_snapshot_valid gauge\nportcullis_snapshot_valid 1\n\
                    gen_ai_client_token_usage_sum{gen_ai_token_type=\"input\",gen_ai_request_model=\"gpt-4o\"} 17\n\
                    gen_ai_client_token_usage_bucket{gen_ai_token_type=\"output\",le=\"+Inf\"} 2\n\
                    odd{a=\"q\\\"uote,}\"} 3 1700000000\n";
        let m = Metrics::parse(text);
        assert_eq!(m.get("portcullis_snapshot_valid", &[]), Some(1.0));
        assert_eq!(m.sum("gen_ai_client_token_usage_sum", &[("gen_ai_token_type", "input")]), 17.0);
        assert_eq!(m.get("gen_ai_client_token_usage_bucket", &[("le", "+Inf")]), Some(2.0));
        assert_eq!(m.get("odd", &[("a", "q\"uote,}")]), Some(3.0));
        assert!(m.has("gen_ai_client_token_usage"));
    }
}
