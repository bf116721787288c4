//! Histograms that every request observes, without an atomic read-modify-write.
//!
//! The `prometheus` crate's histogram takes four atomic read-modify-writes per observation: a
//! shared counter that picks the hot shard, the bucket, a compare-and-swap loop on the sum, and
//! the count. A request observes four histograms, so that is sixteen locked instructions, the
//! costliest lines of the access record. Here each thread that observes gets a shard of its own
//! and writes it with plain loads and stores. A scrape sums the shards.
//!
//! - A shard has one cell per bucket, one past the last bound, and the sum. The count is the sum
//!   of the bucket cells, so it always agrees with the `+Inf` bucket.
//! - A thread's shard index is handed out once from a process-wide counter, so each private shard
//!   has exactly one writer. Threads past the private shards (more threads than cores) share one
//!   last shard and use atomic read-modify-writes there.
//! - A scrape reads with relaxed loads. It can miss an observation still being written, and
//!   show it in the buckets before the sum (and so in the count, which is the buckets' total).

use std::collections::HashMap;
use std::hash::BuildHasher as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use foldhash::fast::RandomState;
use prometheus::core::{Collector, Desc};
use prometheus::proto;

/// Shards written by one thread each; the rest of the threads share one more.
fn private_shards() -> usize {
    std::thread::available_parallelism().map_or(4, |n| n.get()).clamp(1, 64) + 1
}

static NEXT_THREAD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's index among the threads that ever observed a histogram.
    static THREAD_INDEX: usize = NEXT_THREAD.fetch_add(1, Relaxed);
}

/// A series and the label values it was made for.
type Labelled = (Vec<String>, Histogram);

/// A histogram metric family with labels, like `prometheus::HistogramVec`: cheap to clone, so
/// one clone goes to the registry and the others observe.
#[derive(Clone, Debug)]
pub struct HistogramFamily(Arc<Family>);

impl HistogramFamily {
    /// `bounds` must be finite and increasing (as the `prometheus` crate requires).
    pub fn new(name: &str, help: &str, labels: &[&str], bounds: &[f64]) -> prometheus::Result<Self> {
        Family::new(name, help, labels, bounds).map(|family| Self(Arc::new(family)))
    }

    /// The series with these label values (in the order the family's labels were given).
    pub fn with_label_values(&self, values: &[&str]) -> Histogram {
        self.0.with_label_values(values)
    }
}

impl Collector for HistogramFamily {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.0.desc]
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        vec![self.0.collect()]
    }
}

struct Family {
    desc: Desc,
    bounds: Arc<[f64]>,
    private: usize,
    /// By a hash of the label values; a hash's few series by their values.
    series: Mutex<HashMap<u64, Vec<Labelled>>>,
    hasher: RandomState,
}

impl std::fmt::Debug for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Family").field("name", &self.desc.fq_name).finish_non_exhaustive()
    }
}

impl Family {
    fn new(name: &str, help: &str, labels: &[&str], bounds: &[f64]) -> prometheus::Result<Self> {
        if bounds.is_empty() || bounds.windows(2).any(|w| w[0] >= w[1]) || bounds.iter().any(|b| !b.is_finite()) {
            return Err(prometheus::Error::Msg(format!("{name}: bucket bounds must be finite and increasing")));
        }
        let desc = Desc::new(
            name.to_owned(),
            help.to_owned(),
            labels.iter().map(|l| (*l).to_owned()).collect(),
            HashMap::new(),
        )?;
        Ok(Self {
            desc,
            bounds: bounds.into(),
            private: private_shards(),
            series: Mutex::new(HashMap::new()),
            hasher: RandomState::default(),
        })
    }

    /// Found without allocating: error responses look their series up on every request.
    fn with_label_values(&self, values: &[&str]) -> Histogram {
        // A programming error, as with the `prometheus` crate, which panics here too.
        assert_eq!(values.len(), self.desc.variable_labels.len(), "{}: label count", self.desc.fq_name);
        let hash = self.hasher.hash_one(values);
        let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        let same = |(held, _): &&Labelled| held.iter().map(String::as_str).eq(values.iter().copied());
        if let Some((_, found)) = series.get(&hash).and_then(|bucket| bucket.iter().find(same)) {
            return found.clone();
        }
        let mut labels: Vec<proto::LabelPair> = self
            .desc
            .variable_labels
            .iter()
            .zip(values)
            .map(|(name, value)| {
                let mut pair = proto::LabelPair::default();
                pair.set_name(name.clone());
                pair.set_value((*value).to_owned());
                pair
            })
            .collect();
        labels.sort_by(|a, b| a.name().cmp(b.name()));
        let shards = Shards::new(self.private + 1, self.bounds.len() + 2);
        let histogram =
            Histogram(Arc::new(Series { bounds: self.bounds.clone(), labels, shards, private: self.private }));
        let held = values.iter().map(|v| (*v).to_owned()).collect();
        series.entry(hash).or_default().push((held, histogram.clone()));
        histogram
    }

    fn collect(&self) -> proto::MetricFamily {
        let series: Vec<Histogram> = self
            .series
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .flat_map(|bucket| bucket.iter().map(|(_, histogram)| histogram.clone()))
            .collect();
        let mut family = proto::MetricFamily::default();
        family.set_name(self.desc.fq_name.clone());
        family.set_help(self.desc.help.clone());
        family.set_field_type(proto::MetricType::HISTOGRAM);
        family.set_metric(series.iter().map(Histogram::metric).collect());
        family
    }
}

/// One labelled series; cheap to clone and to keep beside a route.
#[derive(Clone, Debug)]
pub struct Histogram(Arc<Series>);

#[derive(Debug)]
struct Series {
    bounds: Arc<[f64]>,
    labels: Vec<proto::LabelPair>,
    /// `private` single-writer shards, then the shared one, each on whole cache lines of its
    /// own ([`Shards`]).
    shards: Shards,
    private: usize,
}

/// Eight cells on one cache line.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Line([AtomicU64; 8]);

/// Every shard's cells in one allocation. A shard has a count per bucket, one past the last
/// bound, then the sum's bits, and starts on a line of its own, so two threads' shards never
/// share a cache line.
#[derive(Debug)]
struct Shards {
    lines: Box<[Line]>,
    lines_per_shard: usize,
}

impl Shards {
    fn new(shards: usize, cells: usize) -> Self {
        let lines_per_shard = cells.div_ceil(8);
        Self { lines: (0..shards * lines_per_shard).map(|_| Line::default()).collect(), lines_per_shard }
    }

    fn cell(&self, shard: usize, cell: usize) -> &AtomicU64 {
        &self.lines[shard * self.lines_per_shard + cell / 8].0[cell % 8]
    }

    fn count(&self) -> usize {
        self.lines.len() / self.lines_per_shard
    }
}

impl Histogram {
    pub fn observe(&self, value: f64) {
        self.observe_as(THREAD_INDEX.with(|index| *index), value);
    }

    /// Observes as the thread with this index: its own shard if it has one, else the shared one.
    fn observe_as(&self, thread: usize, value: f64) {
        let series = &*self.0;
        // The first bound the value does not exceed; past the last (or NaN): the overflow cell.
        let bucket = series.bounds.iter().position(|bound| value <= *bound).unwrap_or(series.bounds.len());
        let sum = series.bounds.len() + 1;
        let shards = &series.shards;
        if thread < series.private {
            // This thread is the shard's only writer: a load and a store, no lock prefix.
            let cell = shards.cell(thread, bucket);
            cell.store(cell.load(Relaxed) + 1, Relaxed);
            let cell = shards.cell(thread, sum);
            cell.store((f64::from_bits(cell.load(Relaxed)) + value).to_bits(), Relaxed);
        } else {
            let shared = series.private;
            shards.cell(shared, bucket).fetch_add(1, Relaxed);
            let add = |bits| Some((f64::from_bits(bits) + value).to_bits());
            let _ = shards.cell(shared, sum).fetch_update(Relaxed, Relaxed, add);
        }
    }

    /// Observations so far and their sum.
    pub fn count_and_sum(&self) -> (u64, f64) {
        let histogram = self.proto();
        (histogram.get_sample_count(), histogram.get_sample_sum())
    }

    fn proto(&self) -> proto::Histogram {
        let series = &*self.0;
        let shards = &series.shards;
        let cell = |i: usize| -> u64 { (0..shards.count()).map(|shard| shards.cell(shard, i).load(Relaxed)).sum() };
        let mut cumulative = 0;
        let buckets = series
            .bounds
            .iter()
            .enumerate()
            .map(|(i, bound)| {
                cumulative += cell(i);
                let mut bucket = proto::Bucket::default();
                bucket.set_cumulative_count(cumulative);
                bucket.set_upper_bound(*bound);
                bucket
            })
            .collect();
        let count = cumulative + cell(series.bounds.len());
        let sum_cell = series.bounds.len() + 1;
        let sum: f64 =
            (0..shards.count()).map(|shard| f64::from_bits(shards.cell(shard, sum_cell).load(Relaxed))).sum();
        let mut histogram = proto::Histogram::default();
        histogram.set_sample_count(count);
        histogram.set_sample_sum(sum);
        histogram.set_bucket(buckets);
        histogram
    }

    fn metric(&self) -> proto::Metric {
        let mut metric = proto::Metric::default();
        metric.set_label(self.0.labels.clone());
        metric.set_histogram(self.proto());
        metric
    }
}

#[cfg(test)]
mod tests {
    use prometheus::{Encoder, Registry, TextEncoder};

    use super::*;

    fn family() -> HistogramFamily {
        HistogramFamily::new("test_seconds", "A test histogram", &["route", "model"], &[0.1, 1.0, 10.0])
            .expect("valid family")
    }

    fn render(family: HistogramFamily) -> String {
        let registry = Registry::new();
        registry.register(Box::new(family)).expect("registered");
        let mut out = Vec::new();
        TextEncoder::new().encode(&registry.gather(), &mut out).expect("encoded");
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn renders_like_the_prometheus_crates_histogram() {
        // The same observations into the crate's own histogram and into ours give the same text.
        let theirs = prometheus::HistogramVec::new(
            prometheus::HistogramOpts::new("test_seconds", "A test histogram").buckets(vec![0.1, 1.0, 10.0]),
            &["route", "model"],
        )
        .expect("valid");
        let ours = family();
        for value in [0.05, 0.1, 0.5, 3.0, 99.0, 0.0] {
            theirs.with_label_values(&["chat", "gpt-4o"]).observe(value);
            ours.with_label_values(&["chat", "gpt-4o"]).observe(value);
        }
        let registry = Registry::new();
        registry.register(Box::new(theirs)).expect("registered");
        let mut expected = Vec::new();
        TextEncoder::new().encode(&registry.gather(), &mut expected).expect("encoded");
        assert_eq!(render(ours), String::from_utf8(expected).expect("utf-8"));
    }

    #[test]
    fn series_are_kept_apart_and_found_again() {
        let family = family();
        family.with_label_values(&["chat", "a"]).observe(0.5);
        family.with_label_values(&["chat", "a"]).observe(2.0);
        family.with_label_values(&["embeddings", "a"]).observe(20.0);
        assert_eq!(family.with_label_values(&["chat", "a"]).count_and_sum(), (2, 2.5));
        assert_eq!(family.with_label_values(&["embeddings", "a"]).count_and_sum(), (1, 20.0));
        let text = render(family);
        assert!(text.contains("test_seconds_bucket{model=\"a\",route=\"chat\",le=\"1\"} 1\n"), "{text}");
        assert!(text.contains("test_seconds_count{model=\"a\",route=\"embeddings\"} 1\n"), "{text}");
        assert!(text.contains("test_seconds_bucket{model=\"a\",route=\"embeddings\",le=\"+Inf\"} 1\n"), "{text}");
    }

    #[test]
    fn many_threads_lose_no_observation() {
        // Each private shard written by its own thread, and more threads sharing the last one
        // with atomic read-modify-writes. (Indices are given, not drawn from the process-wide
        // counter, which other tests in the same process may have used up.)
        let family = family();
        let series = family.with_label_values(&["chat", "m"]);
        let threads = series.0.private * 2 + 3;
        std::thread::scope(|scope| {
            for thread in 0..threads {
                let series = series.clone();
                scope.spawn(move || {
                    for i in 0..10_000u32 {
                        series.observe_as(thread, f64::from(i % 4) * 0.5);
                    }
                });
            }
        });
        let (count, sum) = series.count_and_sum();
        assert_eq!(count, threads as u64 * 10_000);
        assert_eq!(sum, threads as f64 * 2_500.0 * (0.0 + 0.5 + 1.0 + 1.5));
        let histogram = series.proto();
        let cumulative: Vec<u64> = histogram.get_bucket().iter().map(|b| b.cumulative_count()).collect();
        let per_thread = [2_500, 7_500, 10_000];
        assert_eq!(cumulative, per_thread.map(|n| n * threads as u64).to_vec());
        // Both paths were taken: every private shard and the shared one hold counts.
        let shards = &series.0.shards;
        for shard in 0..=series.0.private {
            assert!(shards.cell(shard, 0).load(Relaxed) > 0, "shard {shard}");
        }
    }

    #[test]
    fn shards_never_share_a_cache_line() {
        // 16 bounds: 18 cells, three lines per shard.
        let bounds: Vec<f64> = (1..=16).map(f64::from).collect();
        let family = HistogramFamily::new("lines", "x", &[], &bounds).expect("valid");
        let series = family.with_label_values(&[]);
        let shards = &series.0.shards;
        let line = |shard: usize, cell: usize| shards.cell(shard, cell) as *const AtomicU64 as usize / 64;
        for shard in 0..shards.count() {
            assert_eq!(shards.cell(shard, 0) as *const AtomicU64 as usize % 64, 0, "shard {shard} starts a line");
            if shard > 0 {
                assert!(line(shard - 1, 17) < line(shard, 0), "shards {} and {shard} apart", shard - 1);
            }
        }
    }

    #[test]
    fn bounds_must_increase() {
        assert!(HistogramFamily::new("x", "x", &[], &[1.0, 1.0]).is_err());
        assert!(HistogramFamily::new("x", "x", &[], &[]).is_err());
        assert!(HistogramFamily::new("x", "x", &[], &[1.0, f64::INFINITY]).is_err());
    }
}
