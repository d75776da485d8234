//! Reading a provider's answer without trusting its length.
//!
//! A provider's body is read into memory to be parsed, so a broken or hostile endpoint (a proxy
//! gone wrong, a DNS record pointing elsewhere) could otherwise answer without end: the worker
//! would hold it all, and the send would hang until its timeout and turn ambiguous, although the
//! status had already said what happened.

use shared::PhoneNumber;

use super::SendError;

/// Far longer than any answer to a send (Twilio's message resource is about 1 KB, Infobip's
/// answer a few hundred bytes, their errors less).
pub const MAX_SEND_ANSWER: usize = 64 * 1024;

/// The start of an answer's body: all of it, or its first `limit` bytes.
pub struct Body {
    pub bytes: Vec<u8>,
    /// Whether the body went on past `limit` (the rest was not read).
    pub cut: bool,
}

/// Reads at most `limit` bytes of `response`'s body. A body that declares a length within the
/// limit is read in one go; any other is read chunk by chunk until it ends or passes the limit.
pub async fn read_at_most(
    response: reqwest::Response,
    limit: usize,
) -> Result<Body, reqwest::Error> {
    if response
        .content_length()
        .is_some_and(|length| length <= limit as u64)
    {
        // hyper refuses a body longer than its Content-Length, so this cannot run over.
        return Ok(Body {
            bytes: response.bytes().await?.into(),
            cut: false,
        });
    }
    let mut response = response;
    let mut bytes = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = limit - bytes.len();
        if chunk.len() > room {
            bytes.extend_from_slice(&chunk[..room]);
            return Ok(Body { bytes, cut: true });
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(Body { bytes, cut: false })
}

/// The start of the answer to a send, at most [`MAX_SEND_ANSWER`] bytes: what is cut off is
/// logged, and the start is parsed as usual. A whole document followed by padding still parses;
/// a cut document parses as no answer (for a success, an SMS accepted without its id). The
/// status alone has already decided whether the send went, so a long answer never turns a sent
/// SMS into a retry.
pub async fn read_send_answer(
    provider: &'static str,
    response: reqwest::Response,
    to: &PhoneNumber,
) -> Result<Vec<u8>, SendError> {
    let status = response.status().as_u16();
    let body = read_at_most(response, MAX_SEND_ANSWER)
        .await
        .map_err(|e| SendError::transport(provider, &e, to))?;
    if body.cut {
        tracing::warn!(
            provider,
            status,
            limit = MAX_SEND_ANSWER,
            "the provider's answer to a send was longer than the limit; only its start was read"
        );
    }
    Ok(body.bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::{Body as HttpBody, Bytes};
    use axum::routing::get;

    /// A server on loopback answering `/sized` with a `Content-Length`, and `/streamed/{n}` with
    /// `n` bytes in 1 KiB chunks and no length.
    async fn server() -> String {
        let app =
            axum::Router::new()
                .route(
                    "/sized/{n}",
                    get(
                        |axum::extract::Path(n): axum::extract::Path<usize>| async move {
                            vec![b'a'; n]
                        },
                    ),
                )
                .route(
                    "/streamed/{n}",
                    get(
                        |axum::extract::Path(n): axum::extract::Path<usize>| async move {
                            let chunks = (0..n.div_ceil(1024)).map(move |i| {
                                let size = (n - i * 1024).min(1024);
                                Ok::<_, std::io::Error>(Bytes::from(vec![b'a'; size]))
                            });
                            HttpBody::from_stream(futures_util::stream::iter(chunks))
                        },
                    ),
                );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    async fn read(url: String, limit: usize) -> Body {
        let response = reqwest::get(url).await.unwrap();
        read_at_most(response, limit).await.unwrap()
    }

    #[tokio::test]
    async fn reads_a_body_up_to_the_limit_and_says_whether_it_went_on() {
        let base = server().await;
        for (path, size) in [("sized", 10_000), ("streamed", 10_000), ("streamed", 0)] {
            let body = read(format!("{base}/{path}/{size}"), 10_000).await;
            assert_eq!((body.bytes.len(), body.cut), (size, false), "{path} {size}");
        }
        for path in ["sized", "streamed"] {
            let body = read(format!("{base}/{path}/10001"), 10_000).await;
            assert_eq!((body.bytes.len(), body.cut), (10_000, true), "{path}");
            let body = read(format!("{base}/{path}/5000000"), 10_000).await;
            assert_eq!((body.bytes.len(), body.cut), (10_000, true), "{path}");
        }
    }
}
