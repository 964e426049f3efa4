//! Weighted power-of-two-choices over a model's usable backends.

use std::time::Instant;

use rand::RngExt;

use super::{Attempt, Route};

/// Why no backend could be picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PickError {
    /// Every untried backend is unhealthy or ejected.
    NoneHealthy,
    /// Some are healthy but all of those are at their concurrency limit.
    Saturated,
}

/// Picks among `routes` (skipping indices in `tried`): two weighted random candidates,
/// the less loaded relative to its weight wins. Returns the index and its claim.
pub fn pick(routes: &[Route], tried: &[usize]) -> Result<(usize, Attempt), PickError> {
    let now = Instant::now();
    let mut usable_but_full = false;
    let mut candidates: Vec<usize> = Vec::with_capacity(routes.len());
    for (i, b) in routes.iter().map(|r| &r.backend).enumerate() {
        if tried.contains(&i) || !b.is_usable(now) {
            continue;
        }
        if b.has_capacity() {
            candidates.push(i);
        } else {
            usable_but_full = true;
        }
    }
    let mut rng = rand::rng();
    while !candidates.is_empty() {
        let first = weighted(&candidates, routes, &mut rng);
        let chosen = if candidates.len() > 1 {
            let second = loop {
                let c = weighted(&candidates, routes, &mut rng);
                if c != first {
                    break c;
                }
            };
            let (a, b) = (
                &routes[candidates[first]].backend,
                &routes[candidates[second]].backend,
            );
            // in_flight_a / weight_a <= in_flight_b / weight_b, without division.
            if a.in_flight() as u64 * u64::from(b.weight)
                <= b.in_flight() as u64 * u64::from(a.weight)
            {
                first
            } else {
                second
            }
        } else {
            first
        };
        let index = candidates[chosen];
        if let Some(attempt) = routes[index].backend.try_start(now) {
            return Ok((index, attempt));
        }
        // Lost a race for the last slot or the half-open probe: drop it and pick again.
        if routes[index].backend.is_usable(now) {
            usable_but_full = true;
        }
        candidates.swap_remove(chosen);
    }
    if usable_but_full {
        Err(PickError::Saturated)
    } else {
        Err(PickError::NoneHealthy)
    }
}

/// A position in `candidates`, chosen with probability proportional to weight.
fn weighted(candidates: &[usize], routes: &[Route], rng: &mut impl rand::Rng) -> usize {
    let total: u64 = candidates
        .iter()
        .map(|&i| u64::from(routes[i].backend.weight))
        .sum();
    let mut r = rng.random_range(0..total.max(1));
    for (pos, &i) in candidates.iter().enumerate() {
        let w = u64::from(routes[i].backend.weight);
        if r < w {
            return pos;
        }
        r -= w;
    }
    candidates.len() - 1
}
