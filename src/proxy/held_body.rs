//! A whole response body handed to the connection in slices, holding the request's
//! concurrency permit and in-flight count until the connection has taken the last slice.
//! hyper asks for the next slice only when its write buffer has room, so at most about one
//! slice of an answer a slow client has not read yet is outside `max_concurrent_requests`.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::sync::OwnedSemaphorePermit;

use crate::runtime::metrics::InFlight;

/// Bytes handed to the connection per poll.
const SLICE: usize = 64 * 1024;

/// Held for as long as the request (its body, or its stream) lives; only dropping it does
/// anything.
#[derive(Debug)]
#[expect(dead_code, reason = "held for their Drop")]
pub(crate) struct Guards {
    pub(crate) permit: OwnedSemaphorePermit,
    pub(crate) in_flight: InFlight,
}

/// The rest of a whole body, and the guards it keeps until it is all taken (or dropped).
#[derive(Debug)]
pub(crate) struct HeldBody {
    rest: Bytes,
    guards: Option<Guards>,
}

impl HeldBody {
    pub(crate) fn new(body: Bytes, guards: Guards) -> Self {
        Self {
            rest: body,
            guards: Some(guards),
        }
    }
}

impl http_body::Body for HeldBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.rest.is_empty() {
            this.guards = None;
            return Poll::Ready(None);
        }
        let slice = this.rest.split_to(this.rest.len().min(SLICE));
        if this.rest.is_empty() {
            this.guards = None;
        }
        Poll::Ready(Some(Ok(Frame::data(slice))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.rest.len() as u64)
    }
}
