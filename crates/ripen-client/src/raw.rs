//! One request written byte for byte on a fresh connection, and a parser of
//! one HTTP/1.1 answer: what [`crate::Client::raw_request`] needs to send
//! input that hyper would refuse to write.

use bytes::Bytes;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::Response;

/// The size of each read of the answer.
const READ_CHUNK_BYTES: usize = 64 * 1024;

pub(crate) async fn exchange(
    authority: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<Response, String> {
    let stream = TcpStream::connect(authority)
        .await
        .map_err(|e| format!("connect to {authority}: {e}"))?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("set TCP_NODELAY: {e}"))?;
    let (mut rd, mut wr) = stream.into_split();
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nhost: {authority}\r\nconnection: close\r\n");
    // With `transfer-encoding` the caller has framed the body itself.
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("transfer-encoding"))
    {
        head.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        head.push_str("content-type: application/json\r\n");
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let writer = tokio::spawn(async move {
        // A server may stop reading and close early; that is its right.
        if wr.write_all(head.as_bytes()).await.is_ok() {
            let _ = wr.write_all(&body).await;
            let _ = wr.flush().await;
        }
        wr
    });
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    let outcome = loop {
        match parse_response(&buf, false) {
            Ok(Some(resp)) => break Ok(resp),
            Ok(None) => {}
            Err(e) => break Err(e),
        }
        match rd.read(&mut chunk).await {
            Ok(0) => break finish(&buf),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if buf.is_empty() => break Err(format!("read the answer: {e}")),
            // A reset after a complete head and body is how a server that
            // closes without reading the rest of a body ends.
            Err(_) => break finish(&buf),
        }
    };
    writer.abort();
    outcome
}

fn finish(buf: &[u8]) -> Result<Response, String> {
    parse_response(buf, true)?
        .ok_or_else(|| format!("incomplete answer: {:?}", String::from_utf8_lossy(buf)))
}

/// Parses one HTTP/1.1 answer; `None` while incomplete. At `eof` a body
/// without a length runs to the end.
pub(crate) fn parse_response(buf: &[u8], eof: bool) -> Result<Option<Response>, String> {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| "the answer head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut headers = HeaderMap::new();
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            let name = HeaderName::from_bytes(k.trim().as_bytes())
                .map_err(|e| format!("bad header name {k:?}: {e}"))?;
            let value = HeaderValue::from_str(v.trim())
                .map_err(|e| format!("bad header value {v:?}: {e}"))?;
            headers.append(name, value);
        }
    }
    let rest = &buf[head_end + 4..];
    let chunked = headers
        .get("transfer-encoding")
        .is_some_and(|v| v.to_str().unwrap_or("").contains("chunked"));
    let body = if chunked {
        let mut body = Vec::new();
        let mut pos = 0;
        loop {
            let Some(line_end) = rest[pos..].windows(2).position(|w| w == b"\r\n") else {
                return Ok(None);
            };
            let size_text = String::from_utf8_lossy(&rest[pos..pos + line_end]).into_owned();
            let size_hex = size_text.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_hex, 16)
                .map_err(|_| format!("bad chunk size {size_text:?}"))?;
            pos += line_end + 2;
            if size == 0 {
                break;
            }
            if rest.len() < pos + size + 2 {
                return Ok(None);
            }
            body.extend_from_slice(&rest[pos..pos + size]);
            pos += size + 2;
        }
        body
    } else if let Some(len) = headers.get("content-length") {
        let len: usize = len
            .to_str()
            .ok()
            .and_then(|l| l.trim().parse().ok())
            .ok_or_else(|| format!("bad content-length {len:?}"))?;
        if rest.len() < len {
            return Ok(None);
        }
        rest[..len].to_vec()
    } else if status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || status.is_informational()
    {
        Vec::new()
    } else if eof {
        rest.to_vec()
    } else {
        return Ok(None);
    };
    Ok(Some(Response {
        status,
        headers,
        body: Bytes::from(body),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_framed_by_length_chunks_or_the_end() {
        let sized = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 2\r\n\r\n{}";
        assert!(parse_response(&sized[..20], false).unwrap().is_none());
        let resp = parse_response(sized, false).unwrap().unwrap();
        assert_eq!((resp.status.as_u16(), &resp.body[..]), (413, &b"{}"[..]));
        let chunked =
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n1\r\nc\r\n0\r\n\r\n";
        assert_eq!(
            &parse_response(chunked, false).unwrap().unwrap().body[..],
            b"abc"
        );
        let open = b"HTTP/1.1 200 OK\r\n\r\nto the end";
        assert!(parse_response(open, false).unwrap().is_none());
        assert_eq!(
            &parse_response(open, true).unwrap().unwrap().body[..],
            b"to the end"
        );
    }
}
