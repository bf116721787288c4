//! Raw HTTP/1.1 read off a socket, for tests that pace their reads themselves.

/// The response head at the front of `bytes`, once it is complete: its text (without the blank
/// line), how many bytes it takes with the blank line, and its `Content-Length`, if any.
pub fn response_head(bytes: &[u8]) -> Option<(String, usize, Option<usize>)> {
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
    let text = String::from_utf8_lossy(&bytes[..end]).into_owned();
    let length = text.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim().eq_ignore_ascii_case("content-length").then(|| value.trim().parse().ok())?
    });
    Some((text, end + 4, length))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_found_only_when_complete() {
        assert_eq!(response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"), None);
        let (text, len, length) = response_head(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello").expect("head");
        assert_eq!((text.as_str(), len, length), ("HTTP/1.1 200 OK\r\ncontent-length: 5", 38, Some(5)));
        assert_eq!(response_head(b"HTTP/1.1 204 No Content\r\n\r\n").map(|h| h.2), Some(None));
    }
}
