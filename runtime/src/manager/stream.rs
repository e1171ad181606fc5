//! The async page-by-page iterators of the proxies ([`DictStream`], [`ListStream`]): a
//! container read a page at a time, each page one round trip sent from a task (see "Async
//! forms" in the `manager` module docs).

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::stream::{self, BoxStream, Stream, StreamExt};
use shoal_core::error::Result;

/// What fetching the next page gives: its items and what the page after it needs (`None`: this
/// was the last page).
pub(super) type Fetched<T, S> = Result<(Vec<T>, Option<S>)>;

/// A stream of the items of pages: `fetch(state)` reads the page `state` says and returns its
/// items and the state of the next page. An error ends the stream after it is yielded.
pub(super) fn pages<T, S, F, Fut>(first: S, fetch: F) -> BoxStream<'static, Result<T>>
where
    T: Send + 'static,
    S: Send + 'static,
    F: Fn(S) -> Fut + Send + 'static,
    Fut: Future<Output = Fetched<T, S>> + Send + 'static,
{
    stream::unfold((Some(first), fetch), |(state, fetch)| async move {
        let state = state?;
        let (page, next) = match fetch(state).await {
            Ok((items, next)) => (stream::iter(items.into_iter().map(Ok)).left_stream(), next),
            Err(e) => (stream::once(async move { Err(e) }).right_stream(), None),
        };
        Some((page, (next, fetch)))
    })
    .flatten()
    .boxed()
}

/// The async form of [`DictIter`](super::DictIter): the pairs of a
/// [`DictProxy`](super::DictProxy) in insertion order, a page (1000 pairs) per round trip, made
/// by [`DictProxy::iter_async`](super::DictProxy::iter_async). Like the blocking iterator, it
/// yields [`Error::InvalidState`](shoal_core::Error::InvalidState) once ("dictionary changed
/// size during iteration") and ends when keys were added or removed since it was made.
///
/// Await [`DictStream::next`], or use it as a [`futures::Stream`].
///
/// ```no_run
/// # async fn show(d: shoal::DictProxy<String, i64>) -> shoal::Result<()> {
/// let mut pairs = d.iter_async().await?;
/// while let Some(pair) = pairs.next().await {
///     let (key, value) = pair?;
///     println!("{key} = {value}");
/// }
/// # Ok(())
/// # }
/// ```
pub struct DictStream<K, V> {
    pub(super) inner: BoxStream<'static, Result<(K, V)>>,
}

/// The async form of [`ListIter`](super::ListIter): the items of a
/// [`ListProxy`](super::ListProxy) in order, a page (1000 items) per round trip, made by
/// [`ListProxy::iter_async`](super::ListProxy::iter_async). Like the blocking iterator, it
/// yields [`Error::InvalidState`](shoal_core::Error::InvalidState) once ("list changed size
/// during iteration") and ends when items were inserted, removed or moved since it was made.
///
/// Await [`ListStream::next`], or use it as a [`futures::Stream`].
///
/// ```no_run
/// # async fn show(l: shoal::ListProxy<i64>) -> shoal::Result<()> {
/// let mut items = l.iter_async().await?;
/// let mut total = 0;
/// while let Some(item) = items.next().await {
///     total += item?;
/// }
/// println!("{total}");
/// # Ok(())
/// # }
/// ```
pub struct ListStream<T> {
    pub(super) inner: BoxStream<'static, Result<T>>,
}

impl<K, V> DictStream<K, V> {
    /// The next pair; `None` at the end (and after an error).
    pub async fn next(&mut self) -> Option<Result<(K, V)>> {
        self.inner.next().await
    }
}

impl<T> ListStream<T> {
    /// The next item; `None` at the end (and after an error).
    pub async fn next(&mut self) -> Option<Result<T>> {
        self.inner.next().await
    }
}

impl<K, V> Stream for DictStream<K, V> {
    type Item = Result<(K, V)>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.poll_next_unpin(cx)
    }
}

impl<T> Stream for ListStream<T> {
    type Item = Result<T>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.poll_next_unpin(cx)
    }
}

impl<K, V> std::fmt::Debug for DictStream<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DictStream").finish_non_exhaustive()
    }
}

impl<T> std::fmt::Debug for ListStream<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListStream").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_core::error::Error;

    fn run<T>(stream: BoxStream<'static, Result<T>>) -> Vec<Result<T>> {
        futures::executor::block_on(stream.collect())
    }

    #[test]
    fn pages_yield_their_items_in_order_and_stop_after_the_last() {
        let got = run(pages(0u32, |page| async move {
            Ok(match page {
                0 => (vec![1, 2], Some(1)),
                1 => (vec![], Some(2)),
                2 => (vec![3], None),
                _ => unreachable!("fetched past the last page"),
            })
        }));
        let got: Vec<i32> = got.into_iter().map(|r| r.expect("item")).collect();
        assert_eq!(got, vec![1, 2, 3]);
    }

    #[test]
    fn an_error_is_yielded_once_and_ends_the_stream() {
        let got = run(pages(0u32, |page| async move {
            match page {
                0 => Ok((vec![1], Some(1))),
                1 => Err(Error::invalid_state("changed")),
                _ => unreachable!("fetched after the error"),
            }
        }));
        assert_eq!(got.len(), 2);
        assert_eq!(*got[0].as_ref().expect("first"), 1);
        assert!(matches!(got[1], Err(Error::InvalidState(_))));
    }
}
