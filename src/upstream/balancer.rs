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
        let weights: Vec<u64> = candidates
            .iter()
            .map(|&i| u64::from(routes[i].backend.weight))
            .collect();
        let first = draw(&weights, None, &mut rng);
        let chosen = if candidates.len() > 1 {
            // From the others' total weight: one draw, whatever the weights.
            let second = draw(&weights, Some(first), &mut rng);
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

/// A position in `weights` other than `exclude`, chosen with probability proportional to
/// its weight among the others (one random number, one pass).
fn draw(weights: &[u64], exclude: Option<usize>, rng: &mut impl rand::Rng) -> usize {
    let weight = |pos: usize| {
        if Some(pos) == exclude {
            0
        } else {
            weights[pos]
        }
    };
    let total: u64 = (0..weights.len()).map(weight).sum();
    let mut r = rng.random_range(0..total.max(1));
    let mut last = 0;
    for pos in 0..weights.len() {
        let w = weight(pos);
        if w == 0 {
            continue;
        }
        if r < w {
            return pos;
        }
        r -= w;
        last = pos;
    }
    last
}

#[cfg(test)]
mod tests {
    use super::draw;

    #[test]
    fn the_second_draw_never_repeats_the_first_whatever_the_weights() {
        let mut rng = rand::rng();
        for _ in 0..1000 {
            assert_eq!(draw(&[u64::from(u32::MAX), 1], Some(0), &mut rng), 1);
            assert_eq!(draw(&[1, u64::from(u32::MAX), 1], Some(1), &mut rng) % 2, 0);
        }
    }

    #[test]
    fn draws_follow_the_weights() {
        let mut rng = rand::rng();
        let mut hits = [0u32; 2];
        for _ in 0..10_000 {
            hits[draw(&[3, 1], None, &mut rng)] += 1;
        }
        // Expected 7500 : 2500; far outside chance either way.
        assert!((7000..8000).contains(&hits[0]), "{hits:?}");
    }
}
