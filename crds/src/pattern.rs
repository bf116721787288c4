//! Glob patterns for model and provider names: `*` matches any run of characters, `?` one
//! character, everything else itself. Matching never recurses and costs at most
//! O(pattern × text) with both bounded, so a hostile pattern or name cannot make a request slow.

/// Longest pattern accepted in a custom resource.
pub const MAX_PATTERN_LEN: usize = 256;

/// Why a pattern was refused.
pub fn validate(pattern: &str) -> Result<(), &'static str> {
    if pattern.is_empty() {
        return Err("must not be empty");
    }
    // Characters, as the API server counts `maxLength`: a pattern it admitted is not refused here.
    if pattern.chars().count() > MAX_PATTERN_LEN {
        return Err("must be at most 256 characters");
    }
    if pattern.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("must not contain whitespace or control characters");
    }
    Ok(())
}

pub fn is_glob(pattern: &str) -> bool {
    pattern.contains(['*', '?'])
}

/// True when `text` matches `pattern` in full.
pub fn matches(pattern: &str, text: &str) -> bool {
    let p = pattern.as_bytes();
    let t = text.as_bytes();
    let (mut pi, mut ti) = (0usize, 0usize);
    // Position of the last `*` seen and the text index it is currently standing for.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == t[ti]) && p[pi] != b'*' {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((star_pi, star_ti)) = star {
            pi = star_pi + 1;
            ti = star_ti + 1;
            star = Some((star_pi, star_ti + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// True when any pattern matches; an empty list allows everything.
pub fn any_matches_or_empty(patterns: &[String], text: &str) -> bool {
    patterns.is_empty() || patterns.iter().any(|p| matches(p, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let cases = [
            ("gpt-4o", "gpt-4o", true),
            ("gpt-4o", "gpt-4o-mini", false),
            ("gpt-4o*", "gpt-4o-mini", true),
            ("gpt-4o*", "gpt-4", false),
            ("*", "", true),
            ("*", "anything", true),
            ("claude-*-sonnet-*", "claude-3-5-sonnet-20241022", true),
            ("claude-*-sonnet-*", "claude-3-5-haiku-20241022", false),
            ("?pt", "gpt", true),
            ("?pt", "pt", false),
            ("a*b*c", "aXXbYYc", true),
            ("a*b*c", "aXXbYY", false),
            ("**", "x", true),
            ("", "", true),
            ("", "x", false),
        ];
        for (pattern, text, want) in cases {
            assert_eq!(matches(pattern, text), want, "{pattern} vs {text}");
        }
    }

    #[test]
    fn hostile_pattern_is_fast() {
        let pattern = "*a".repeat(100) + "b";
        let text = "a".repeat(10_000);
        let started = std::time::Instant::now();
        assert!(!matches(&pattern, &text));
        // Generous bound: quadratic blow-up would take minutes, not milliseconds.
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn empty_list_allows_all() {
        assert!(any_matches_or_empty(&[], "x"));
        assert!(!any_matches_or_empty(&["y".to_owned()], "x"));
        assert!(validate("").is_err());
        assert!(validate("a b").is_err());
        assert!(validate("gpt-*").is_ok());
    }
}
