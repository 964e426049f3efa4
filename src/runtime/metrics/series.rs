//! A metric family whose series can be dropped by their labels (`retain`): what a reload
//! needs to forget the series of removed models and backends, which prometheus-client's
//! `Family` cannot do (it removes one exact label set at a time).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, PoisonError, RwLock};

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Series of one metric by label set `S`; new series are made by `new_metric`. Label sets
/// come from fixed sets and the configuration (never from a request), so the map is
/// bounded by the configuration and its keys need no DoS-resistant hash.
pub struct Series<S, M> {
    map: Arc<RwLock<HashMap<S, M, foldhash::fast::RandomState>>>,
    new_metric: fn() -> M,
}

impl<S, M> Clone for Series<S, M> {
    fn clone(&self) -> Self {
        Self {
            map: Arc::clone(&self.map),
            new_metric: self.new_metric,
        }
    }
}

impl<S, M> std::fmt::Debug for Series<S, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Series")
    }
}

impl<S, M: Default> Default for Series<S, M> {
    fn default() -> Self {
        Self::new(M::default)
    }
}

impl<S, M> Series<S, M> {
    /// An empty family whose series start as `new_metric()`.
    pub fn new(new_metric: fn() -> M) -> Self {
        Self {
            map: Arc::new(RwLock::new(HashMap::default())),
            new_metric,
        }
    }
}

impl<S: Clone + Hash + Eq, M> Series<S, M> {
    /// Runs `f` on the series of `labels`, creating it first if it does not exist.
    pub fn with<R>(&self, labels: &S, f: impl FnOnce(&M) -> R) -> R {
        {
            let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(m) = map.get(labels) {
                return f(m);
            }
        }
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        let m = map
            .entry(labels.clone())
            .or_insert_with(|| (self.new_metric)());
        f(m)
    }

    /// Keeps only the series whose labels pass `keep`.
    pub fn retain(&self, mut keep: impl FnMut(&S) -> bool) {
        self.map
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|labels, _| keep(labels));
    }
}

impl<S, M: TypedMetric> TypedMetric for Series<S, M> {
    const TYPE: MetricType = M::TYPE;
}

impl<S, M> EncodeMetric for Series<S, M>
where
    S: EncodeLabelSet,
    M: EncodeMetric + TypedMetric,
{
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
        for (labels, m) in map.iter() {
            m.encode(encoder.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        M::TYPE
    }

    fn is_empty(&self) -> bool {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::Series;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::registry::Registry;

    #[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
    struct L {
        model: &'static str,
    }

    #[test]
    fn retained_series_keep_counting_and_dropped_ones_are_not_encoded() {
        let series = Series::<L, Counter>::default();
        let mut registry = Registry::default();
        registry.register("hits", "Hits", series.clone());
        for model in ["a", "b", "a"] {
            series.with(&L { model }, |c| c.inc());
        }
        series.retain(|l| l.model != "b");
        series.with(&L { model: "a" }, |c| c.inc());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("hits_total{model=\"a\"} 3\n"), "{text}");
        assert!(!text.contains("model=\"b\""), "{text}");
    }
}
