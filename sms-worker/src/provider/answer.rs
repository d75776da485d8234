//! Reading a provider's answer without trusting its length or its pace.
//!
//! A provider's body is read into memory to be parsed, so a broken or hostile endpoint (a proxy
//! gone wrong, a DNS record pointing elsewhere) could otherwise answer without end, or a byte at
//! a time: the worker would hold it all, and the send would hang until its timeout and turn
//! ambiguous (tried once more, elsewhere) although the status had already said what happened.

use std::time::Duration;

use shared::PhoneNumber;

use super::Failure;

/// Far longer than any answer to a send (Twilio's message resource is about 1 KB, Infobip's
/// answer a few hundred bytes, their errors less).
pub const MAX_SEND_ANSWER: usize = 64 * 1024;

/// How long the body of an answer may take once its status has come: a real one comes with it.
pub const BODY_WITHIN: Duration = Duration::from_secs(2);

/// The start of an answer's body, and how the reading ended.
pub struct Body {
    pub bytes: Vec<u8>,
    pub end: End,
}

pub enum End {
    /// All of it was read.
    Whole,
    /// It went on past the limit; the rest was not read.
    TooLong,
    /// It had not ended within the time allowed.
    Stalled,
    /// The connection failed while it was read (or the request's own timeout passed).
    Broken(reqwest::Error),
}

impl End {
    fn describe(self) -> String {
        match self {
            End::Whole => "whole".to_owned(),
            End::TooLong => "longer than the limit".to_owned(),
            End::Stalled => "not over in time".to_owned(),
            End::Broken(e) => format!("broken off: {}", e.without_url()),
        }
    }
}

/// Reads `response`'s body until it ends, passes `limit` bytes, takes longer than `within`, or
/// fails; what was read is kept in every case.
pub async fn read_at_most(response: reqwest::Response, limit: usize, within: Duration) -> Body {
    let mut response = response;
    let expected = response.content_length().unwrap_or(0).min(limit as u64);
    let mut bytes = Vec::with_capacity(usize::try_from(expected).unwrap_or(limit));
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let chunk = match tokio::time::timeout_at(deadline, response.chunk()).await {
            Ok(Ok(Some(chunk))) => chunk,
            Ok(Ok(None)) => {
                return Body {
                    bytes,
                    end: End::Whole,
                };
            }
            Ok(Err(e)) => {
                return Body {
                    bytes,
                    end: End::Broken(e),
                };
            }
            Err(_) => {
                return Body {
                    bytes,
                    end: End::Stalled,
                };
            }
        };
        let room = limit - bytes.len();
        if chunk.len() > room {
            bytes.extend_from_slice(&chunk[..room]);
            return Body {
                bytes,
                end: End::TooLong,
            };
        }
        bytes.extend_from_slice(&chunk);
    }
}

/// The answer to a send, as far as it could be read.
pub struct AnswerRead {
    pub bytes: Vec<u8>,
    /// Whether all of it was read.
    pub whole: bool,
}

impl AnswerRead {
    /// `kind`, as sorted from this answer's status and start. A refusal whose reason was cut
    /// off may be wrongly put on the recipient, or on no one (no code read): since a refusal
    /// sent nothing, it is retried instead, rather than judged by a reason never read.
    pub fn sorted(&self, kind: Failure) -> Failure {
        if !self.whole && matches!(kind, Failure::Recipient | Failure::Unrecognised) {
            Failure::Retryable
        } else {
            kind
        }
    }
}

/// The answer to a send, as far as it could be read: at most [`MAX_SEND_ANSWER`] bytes within
/// [`BODY_WITHIN`]. The status has already decided whether the send went, so an answer cut
/// short (too long, too slow, broken off) is logged and counted, and its start parsed as usual:
/// a whole document followed by padding still parses; a cut one parses as no answer, which for
/// a success is an SMS accepted without its id, never a retry that would send it twice.
pub async fn read_send_answer(
    provider: &'static str,
    response: reqwest::Response,
    to: &PhoneNumber,
) -> AnswerRead {
    let status = response.status().as_u16();
    let body = read_at_most(response, MAX_SEND_ANSWER, BODY_WITHIN).await;
    let whole = matches!(body.end, End::Whole);
    if !whole {
        metrics::counter!(crate::metrics::PROVIDER_ANSWERS_CUT, "provider" => provider)
            .increment(1);
        tracing::warn!(
            provider,
            status,
            read = body.bytes.len(),
            how = %super::mask_number(&body.end.describe(), to.as_str()),
            "the provider's answer to a send was cut short; its status decides, and only the start read is parsed"
        );
    }
    AnswerRead {
        bytes: body.bytes,
        whole,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::{Body as HttpBody, Bytes};
    use axum::routing::get;
    use futures_util::StreamExt as _;

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
        let app = app.route(
            "/stalls",
            get(|| async {
                let start = futures_util::stream::once(async {
                    Ok::<_, std::io::Error>(Bytes::from_static(b"{\"sid\":"))
                });
                HttpBody::from_stream(start.chain(futures_util::stream::pending()))
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    async fn read(url: String, limit: usize) -> (usize, bool) {
        let response = reqwest::get(url).await.unwrap();
        let body = read_at_most(response, limit, Duration::from_secs(5)).await;
        (body.bytes.len(), matches!(body.end, End::TooLong))
    }

    #[tokio::test]
    async fn reads_a_body_up_to_the_limit_and_says_whether_it_went_on() {
        let base = server().await;
        for (path, size) in [("sized", 10_000), ("streamed", 10_000), ("streamed", 0)] {
            let read = read(format!("{base}/{path}/{size}"), 10_000).await;
            assert_eq!(read, (size, false), "{path} {size}");
        }
        for path in ["sized", "streamed"] {
            let read_over = read(format!("{base}/{path}/10001"), 10_000).await;
            assert_eq!(read_over, (10_000, true), "{path}");
            let read_far_over = read(format!("{base}/{path}/5000000"), 10_000).await;
            assert_eq!(read_far_over, (10_000, true), "{path}");
        }
    }

    #[tokio::test]
    async fn keeps_what_came_of_a_body_that_stalls() {
        let base = server().await;
        let response = reqwest::get(format!("{base}/stalls")).await.unwrap();
        let read = read_at_most(response, 10_000, Duration::from_millis(300));
        // A deadline on the test, so that a reader that waits for ever fails instead of hanging.
        let body = tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("the read gives up on a stalled body");
        assert!(matches!(body.end, End::Stalled));
        assert_eq!(body.bytes, b"{\"sid\":");
    }
}
