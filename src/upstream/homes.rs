//! Where stored responses live: the Responses API keeps a response on the server that made
//! it (vLLM keeps them in its memory), so a follow-up (`previous_response_id`) and
//! `GET`/`DELETE /v1/responses/{id}` must reach that backend. The gateway remembers each
//! stored response's backend and key, for the newest `upstream.stored_responses_max`
//! responses (the oldest is forgotten first), in this process only.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

/// Where one response lives and who may reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Home {
    /// The backend that stored it.
    pub backend: Arc<str>,
    /// The key that created it (`None` in open mode).
    pub key: Option<Arc<str>>,
}

/// What a lookup of a response id finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// Its backend; the caller's key made it.
    Here(Arc<str>),
    /// Made by another key: the caller is told it does not exist.
    NotYours,
    /// Not remembered (never seen, forgotten past the bound, or made before a restart).
    Unknown,
}

/// Response ids to their homes, bounded.
#[derive(Debug)]
pub struct Homes {
    max: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    homes: HashMap<Box<str>, Home>,
    /// Ids in the order they were remembered, to forget the oldest first.
    order: VecDeque<Box<str>>,
}

impl Homes {
    /// Remembers at most `max` responses (0: none).
    pub fn new(max: usize) -> Self {
        Self {
            max,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Remembers that `id` lives on `home`.
    pub fn remember(&self, id: &str, home: Home) {
        if self.max == 0 || id.is_empty() {
            return;
        }
        let mut inner = self.lock();
        if inner.homes.insert(id.into(), home).is_none() {
            inner.order.push_back(id.into());
        }
        while inner.homes.len() > self.max {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            inner.homes.remove(&oldest);
        }
        // Ids forgotten by `forget` leave stale entries in `order`; compact when they
        // dominate, so that `order` stays bounded by about twice the map.
        if inner.order.len() > 2 * self.max.max(inner.homes.len()) {
            let Inner { homes, order } = &mut *inner;
            order.retain(|id| homes.contains_key(id));
        }
    }

    /// Where `id` lives, as far as `key` may know.
    pub fn find(&self, id: &str, key: Option<&str>) -> Found {
        match self.lock().homes.get(id) {
            None => Found::Unknown,
            Some(home) if home.key.as_deref() == key => Found::Here(Arc::clone(&home.backend)),
            Some(_) => Found::NotYours,
        }
    }

    /// Forgets `id` (it was deleted).
    pub fn forget(&self, id: &str) {
        self.lock().homes.remove(id);
    }

    /// Responses remembered.
    pub fn len(&self) -> usize {
        self.lock().homes.len()
    }

    /// Whether none is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn home(backend: &str, key: Option<&str>) -> Home {
        Home {
            backend: Arc::from(backend),
            key: key.map(Arc::from),
        }
    }

    #[test]
    fn a_response_is_found_by_its_own_key_only() {
        let homes = Homes::new(10);
        homes.remember("resp_1", home("b1", Some("k1")));
        homes.remember("resp_2", home("b2", None));
        assert_eq!(
            homes.find("resp_1", Some("k1")),
            Found::Here(Arc::from("b1"))
        );
        assert_eq!(homes.find("resp_1", Some("k2")), Found::NotYours);
        assert_eq!(homes.find("resp_1", None), Found::NotYours);
        assert_eq!(homes.find("resp_2", None), Found::Here(Arc::from("b2")));
        assert_eq!(homes.find("resp_3", Some("k1")), Found::Unknown);
        homes.forget("resp_1");
        assert_eq!(homes.find("resp_1", Some("k1")), Found::Unknown);
    }

    #[test]
    fn the_oldest_is_forgotten_past_the_bound_and_the_order_stays_bounded() {
        let homes = Homes::new(3);
        for i in 0..5 {
            homes.remember(&format!("r{i}"), home("b", None));
        }
        assert_eq!(homes.len(), 3);
        assert_eq!(homes.find("r1", None), Found::Unknown);
        assert_eq!(homes.find("r2", None), Found::Here(Arc::from("b")));
        for i in 0..1000 {
            let id = format!("x{i}");
            homes.remember(&id, home("b", None));
            homes.forget(&id);
        }
        assert!(
            homes.lock().order.len() <= 6,
            "{}",
            homes.lock().order.len()
        );
        let none = Homes::new(0);
        none.remember("r", home("b", None));
        assert!(none.is_empty());
    }
}
