//! Prometheus metrics: every metric's name and help text, the bound on their
//! labels, and the text `GET /metrics` answers (Prometheus text format 0.0.4).
//!
//! Built on `prometheus-client`: typed families whose label sets are plain
//! structs, and a registry owned here rather than a global one, so each
//! [`Service`](crate::Service) (and each test server) counts on its own.
//!
//! # Labels are bounded
//! Packs and callers must not be able to grow the series without bound:
//! - `node_type_id` and `version` name nodes of the node index only, shared
//!   with the index entry (built once when the pack loads); a request for a
//!   node or version not served is counted under `unknown`.
//! - `code` is one of the executor's own codes or a node error's code, which
//!   the executor has already checked (`[a-z0-9_.]`, at most 128 bytes), but
//!   which a guest still chooses freely. So once a family holds
//!   [`MAX_SERIES`] label sets, a new set is counted with `code="other"`
//!   (a success keeps `code=""`: only a new node can make it new), and once
//!   it holds twice that, with `node_type_id` and `version` `other` too: at
//!   most one series per state more. The duration family has no code, so
//!   past [`MAX_SERIES`] its new sets fold the node at once. Two threads
//!   creating the same set at the same moment count it twice, which only
//!   makes folding start a little early.
//!
//! # The hot path
//! Recording an execution whose series exists takes a read lock, hashes a
//! few short strings and bumps an atomic (the histogram, a short mutex); its
//! labels are reference-counted text or static words, so a success allocates
//! nothing. Gauges the executor already tracks (slots held, requests
//! queued, files failing) are read when `/metrics` is scraped, not kept
//! twice.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arp_types::NodeRunState;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

/// `Content-Type` of the `/metrics` answer.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Prefix of every metric name.
pub const PREFIX: &str = "jarvis_executor";

/// Label sets a family keeps apart before folding new ones into `other`.
pub const MAX_SERIES: usize = 1000;

/// The label value of whatever was folded away.
pub const OTHER: &str = "other";
/// The node and version labels of a request for a node not served.
pub const UNKNOWN: &str = "unknown";

/// Upper bounds, in seconds, of the duration and queue-wait buckets: from
/// 100 µs (an in-process echo takes tens of µs) to the 5-minute range of
/// long nodes, in 1-2.5-5 steps.
const BUCKETS: [f64; 19] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 300.0,
];

// Names (before the prefix and the suffixes the format adds) and help texts.
const EXECUTIONS: (&str, &str) = (
    "executions",
    "Executions finished, by node, version, terminal state and error code (empty for success)",
);
const EXECUTION_DURATION: (&str, &str) = (
    "execution_duration",
    "Time from a request's arrival to its result, by node, version and terminal state",
);
const QUEUE_WAIT: (&str, &str) = (
    "queue_wait",
    "Time an execution waited for a sandbox slot, admitted or not",
);
const IN_FLIGHT: (&str, &str) = (
    "in_flight",
    "Executions holding a sandbox slot (a guest answered timeout holds it until it stops)",
);
const QUEUE_DEPTH: (&str, &str) = ("queue_depth", "Executions waiting for a sandbox slot");
const REJECTIONS: (&str, &str) = (
    "rejections",
    "Execute requests refused without a result, by reason",
);
const PACK_LOADS: (&str, &str) = (
    "pack_loads",
    "Pack files loaded from the packs directory, by result (loaded or failed)",
);
const PACK_RELOADS: (&str, &str) = (
    "pack_reloads",
    "Pack files added or replaced while running and loaded",
);
const PACK_LOAD_FAILURES: (&str, &str) = (
    "pack_load_failures",
    "Pack files whose latest version failed to load",
);
const GUEST_LOG_LINES_DROPPED: (&str, &str) = (
    "guest_log_lines_dropped",
    "Guest log lines dropped over the per-execution budget",
);
const BUILD: (&str, &str) = ("build", "The executor's version");

/// A label value: a fixed word, or text shared with the node index (never
/// copied per execution). Equal by content, so a node error's own code
/// `other` and the fold `other` are one series, not two alike.
#[derive(Clone, Debug)]
enum Text {
    Fixed(&'static str),
    Shared(Arc<str>),
}

impl Text {
    fn as_str(&self) -> &str {
        match self {
            Text::Fixed(s) => s,
            Text::Shared(s) => s,
        }
    }
}

impl PartialEq for Text {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Text {}

impl Hash for Text {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl EncodeLabelValue for Text {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// A served node's labels, built once when its pack loads.
#[derive(Clone, Debug)]
pub struct NodeLabels {
    node_type_id: Text,
    version: Text,
}

impl NodeLabels {
    pub fn new(node_type_id: Arc<str>, version: &str) -> Self {
        Self {
            node_type_id: Text::Shared(node_type_id),
            version: Text::Shared(Arc::from(version)),
        }
    }

    fn unknown() -> Self {
        Self {
            node_type_id: Text::Fixed(UNKNOWN),
            version: Text::Fixed(UNKNOWN),
        }
    }

    fn other() -> Self {
        Self {
            node_type_id: Text::Fixed(OTHER),
            version: Text::Fixed(OTHER),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExecutionLabels {
    node_type_id: Text,
    version: Text,
    state: &'static str,
    code: Text,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DurationLabels {
    node_type_id: Text,
    version: Text,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// Gauges read from the executor when `/metrics` is scraped.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    pub in_flight: usize,
    pub queue_depth: usize,
    pub pack_load_failures: usize,
}

fn buckets() -> Histogram {
    Histogram::new(BUCKETS)
}

/// The executor's metrics, one set per service.
pub struct Metrics {
    registry: Registry,
    executions: Bounded<ExecutionLabels, Counter>,
    durations: Bounded<DurationLabels, Histogram, fn() -> Histogram>,
    queue_wait: Histogram,
    in_flight: Gauge,
    queue_depth: Gauge,
    rejections: Family<ReasonLabels, Counter>,
    pack_loads: Family<ResultLabels, Counter>,
    pack_reloads: Counter,
    pack_load_failures: Gauge,
    guest_log_lines_dropped: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let metrics = Self {
            registry: Registry::with_prefix(PREFIX),
            executions: Bounded::new(Family::default()),
            durations: Bounded::new(Family::new_with_constructor(buckets)),
            queue_wait: buckets(),
            in_flight: Gauge::default(),
            queue_depth: Gauge::default(),
            rejections: Family::default(),
            pack_loads: Family::default(),
            pack_reloads: Counter::default(),
            pack_load_failures: Gauge::default(),
            guest_log_lines_dropped: Counter::default(),
        };
        metrics.registered()
    }

    /// Registers every metric (the registry holds clones sharing their values).
    fn registered(mut self) -> Self {
        // Counted from zero, so a rate is defined before the first event.
        self.rejections
            .get_or_create(&ReasonLabels {
                reason: "overloaded",
            })
            .inc_by(0);
        for result in ["loaded", "failed"] {
            self.pack_loads
                .get_or_create(&ResultLabels { result })
                .inc_by(0);
        }
        let r = &mut self.registry;
        let (name, help) = EXECUTIONS;
        r.register(name, help, self.executions.family.clone());
        let (name, help) = EXECUTION_DURATION;
        r.register_with_unit(name, help, Unit::Seconds, self.durations.family.clone());
        let (name, help) = QUEUE_WAIT;
        r.register_with_unit(name, help, Unit::Seconds, self.queue_wait.clone());
        let (name, help) = IN_FLIGHT;
        r.register(name, help, self.in_flight.clone());
        let (name, help) = QUEUE_DEPTH;
        r.register(name, help, self.queue_depth.clone());
        let (name, help) = REJECTIONS;
        r.register(name, help, self.rejections.clone());
        let (name, help) = PACK_LOADS;
        r.register(name, help, self.pack_loads.clone());
        let (name, help) = PACK_RELOADS;
        r.register(name, help, self.pack_reloads.clone());
        let (name, help) = PACK_LOAD_FAILURES;
        r.register(name, help, self.pack_load_failures.clone());
        let (name, help) = GUEST_LOG_LINES_DROPPED;
        r.register(name, help, self.guest_log_lines_dropped.clone());
        let (name, help) = BUILD;
        let build = BuildLabels {
            version: env!("CARGO_PKG_VERSION"),
        };
        r.register(name, help, Info::new(build));
        self
    }

    /// Counts one finished execution of `node` (`None`: not served) and its
    /// time from arrival to result.
    pub(crate) fn execution(
        &self,
        node: Option<&NodeLabels>,
        state: NodeRunState,
        code: Option<&str>,
        duration: Duration,
    ) {
        let node = node.cloned().unwrap_or_else(NodeLabels::unknown);
        let state = state.as_str();
        let code = match code {
            None => Text::Fixed(""),
            // Failures only: a short copy of a code already checked.
            Some(code) => Text::Shared(Arc::from(code)),
        };
        let durations = DurationLabels {
            node_type_id: node.node_type_id.clone(),
            version: node.version.clone(),
            state,
        };
        let executions = ExecutionLabels {
            node_type_id: node.node_type_id,
            version: node.version,
            state,
            code,
        };
        self.executions.record(executions, fold_execution, |c| {
            c.inc();
        });
        self.durations.record(durations, fold_duration, |h| {
            h.observe(duration.as_secs_f64());
        });
    }

    /// Records how long an execution waited for a sandbox slot.
    pub(crate) fn queue_wait(&self, waited: Duration) {
        self.queue_wait.observe(waited.as_secs_f64());
    }

    /// Counts an execute request answered `overloaded`.
    pub(crate) fn overloaded(&self) {
        self.rejections
            .get_or_create(&ReasonLabels {
                reason: "overloaded",
            })
            .inc();
    }

    /// Counts a pack file loaded; `reload` if it was added or replaced while running.
    pub(crate) fn pack_loaded(&self, reload: bool) {
        self.pack_loads
            .get_or_create(&ResultLabels { result: "loaded" })
            .inc();
        if reload {
            self.pack_reloads.inc();
        }
    }

    /// Counts a pack file that failed to load.
    pub(crate) fn pack_failed(&self) {
        self.pack_loads
            .get_or_create(&ResultLabels { result: "failed" })
            .inc();
    }

    /// Counts guest log lines dropped over an execution's budget.
    pub(crate) fn guest_log_lines_dropped(&self, lines: u64) {
        self.guest_log_lines_dropped.inc_by(lines);
    }

    /// Every metric in the Prometheus text format, with `gauges` as read now.
    pub fn render(&self, gauges: Gauges) -> Result<String, std::fmt::Error> {
        let as_i64 = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.in_flight.set(as_i64(gauges.in_flight));
        self.queue_depth.set(as_i64(gauges.queue_depth));
        self.pack_load_failures
            .set(as_i64(gauges.pack_load_failures));
        let mut text = String::with_capacity(8 << 10);
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// How far a new label set is folded: its code, or its node too.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fold {
    Code,
    All,
}

fn fold_execution(labels: &mut ExecutionLabels, fold: Fold) {
    // A success has no code to fold: it stays `code=""`.
    if !labels.code.as_str().is_empty() {
        labels.code = Text::Fixed(OTHER);
    }
    if fold == Fold::All {
        let other = NodeLabels::other();
        labels.node_type_id = other.node_type_id;
        labels.version = other.version;
    }
}

fn fold_duration(labels: &mut DurationLabels, _: Fold) {
    // No code to fold first: past the bound, the node goes.
    let other = NodeLabels::other();
    labels.node_type_id = other.node_type_id;
    labels.version = other.version;
}

/// A family whose label sets are counted, so new ones can be folded once
/// there are [`MAX_SERIES`] (`Family` does not say how many it holds).
struct Bounded<S, M, C = fn() -> M> {
    family: Family<S, M, C>,
    /// Label sets created. Two threads creating the same new set at once
    /// both count it, which only makes folding start a little early.
    series: AtomicUsize,
}

impl<S, M, C> Bounded<S, M, C>
where
    S: Clone + Hash + Eq,
    C: MetricConstructor<M>,
{
    fn new(family: Family<S, M, C>) -> Self {
        Self {
            family,
            series: AtomicUsize::new(0),
        }
    }

    /// Records into the series of `labels`, or, once the family holds
    /// [`MAX_SERIES`] sets and `labels` is new, into the series it folds to.
    fn record(&self, mut labels: S, fold: impl FnOnce(&mut S, Fold), record: impl FnOnce(&M)) {
        if let Some(metric) = self.family.get(&labels) {
            return record(&metric);
        }
        let series = self.series.load(Ordering::Relaxed);
        if series >= MAX_SERIES {
            let how = if series >= 2 * MAX_SERIES {
                Fold::All
            } else {
                Fold::Code
            };
            fold(&mut labels, how);
            if let Some(metric) = self.family.get(&labels) {
                return record(&metric);
            }
        }
        self.series.fetch_add(1, Ordering::Relaxed);
        record(&self.family.get_or_create(&labels));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str) -> NodeLabels {
        NodeLabels::new(Arc::from(id), "1.0.0")
    }

    fn rendered(metrics: &Metrics) -> String {
        metrics.render(Gauges::default()).unwrap()
    }

    /// Label sets of the executions family, as written.
    fn execution_series(metrics: &Metrics) -> usize {
        rendered(metrics)
            .lines()
            .filter(|l| l.starts_with("jarvis_executor_executions_total{"))
            .count()
    }

    /// Label sets of the duration family, as written.
    fn duration_series(metrics: &Metrics) -> usize {
        rendered(metrics)
            .lines()
            .filter(|l| l.starts_with("jarvis_executor_execution_duration_seconds_count{"))
            .count()
    }

    #[test]
    fn a_success_is_counted_with_an_empty_code_and_timed() {
        let metrics = Metrics::new();
        let n = node("test.a");
        metrics.execution(
            Some(&n),
            NodeRunState::Succeeded,
            None,
            Duration::from_millis(3),
        );
        let text = rendered(&metrics);
        assert!(
            text.contains(
                "jarvis_executor_executions_total{node_type_id=\"test.a\",version=\"1.0.0\",state=\"succeeded\",code=\"\"} 1\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "jarvis_executor_execution_duration_seconds_bucket{node_type_id=\"test.a\",version=\"1.0.0\",state=\"succeeded\",le=\"0.0025\"} 0\n"
            ) && text.contains(
                "jarvis_executor_execution_duration_seconds_bucket{node_type_id=\"test.a\",version=\"1.0.0\",state=\"succeeded\",le=\"0.005\"} 1\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "jarvis_executor_execution_duration_seconds_count{node_type_id=\"test.a\",version=\"1.0.0\",state=\"succeeded\"} 1\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn codes_past_the_bound_fold_into_other_and_then_nodes_do() {
        let metrics = Metrics::new();
        let n = node("test.codes");
        let fail = |code: &str| {
            metrics.execution(Some(&n), NodeRunState::Failed, Some(code), Duration::ZERO)
        };
        for i in 0..MAX_SERIES {
            fail(&format!("code_{i}"));
        }
        assert_eq!(execution_series(&metrics), MAX_SERIES);
        // A code seen before the bound keeps its series.
        fail("code_7");
        // New ones share `other`, including a node's own code `other`.
        fail("code_new_1");
        fail("code_new_2");
        fail("other");
        assert_eq!(execution_series(&metrics), MAX_SERIES + 1);
        let text = rendered(&metrics);
        assert!(
            text.contains("state=\"failed\",code=\"code_7\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("state=\"failed\",code=\"other\"} 3\n"),
            "{text}"
        );

        // Past the bound, a new node's success still gets its series, up
        // to twice the bound; then the node is folded too: one series per
        // state more, at most.
        for i in 0..MAX_SERIES {
            metrics.execution(
                Some(&node(&format!("test.n{i}"))),
                NodeRunState::Succeeded,
                None,
                Duration::ZERO,
            );
        }
        assert_eq!(execution_series(&metrics), 2 * MAX_SERIES + 1);
        for i in 0..10 {
            metrics.execution(
                Some(&node(&format!("test.late{i}"))),
                NodeRunState::Canceled,
                Some("canceled"),
                Duration::ZERO,
            );
        }
        assert_eq!(execution_series(&metrics), 2 * MAX_SERIES + 2);
        let text = rendered(&metrics);
        assert!(
            text.contains(
                "{node_type_id=\"test.n998\",version=\"1.0.0\",state=\"succeeded\",code=\"\"} 1\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "{node_type_id=\"other\",version=\"other\",state=\"succeeded\",code=\"\"} 1\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "{node_type_id=\"other\",version=\"other\",state=\"canceled\",code=\"other\"} 10\n"
            ),
            "{text}"
        );
        // Durations have no code: past the bound, new nodes fold at once.
        assert_eq!(duration_series(&metrics), MAX_SERIES + 2);
    }

    #[test]
    fn unknown_nodes_share_one_label() {
        let metrics = Metrics::new();
        for _ in 0..3 {
            metrics.execution(
                None,
                NodeRunState::Failed,
                Some("unknown_node_type"),
                Duration::ZERO,
            );
        }
        let text = rendered(&metrics);
        assert!(
            text.contains(
                "jarvis_executor_executions_total{node_type_id=\"unknown\",version=\"unknown\",state=\"failed\",code=\"unknown_node_type\"} 3\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn every_metric_but_the_per_node_ones_is_written_from_the_start() {
        let text = rendered(&Metrics::new());
        for line in [
            "# TYPE jarvis_executor_queue_wait_seconds histogram\n",
            "jarvis_executor_in_flight 0\n",
            "jarvis_executor_queue_depth 0\n",
            "jarvis_executor_rejections_total{reason=\"overloaded\"} 0\n",
            "jarvis_executor_pack_loads_total{result=\"loaded\"} 0\n",
            "jarvis_executor_pack_loads_total{result=\"failed\"} 0\n",
            "jarvis_executor_pack_reloads_total 0\n",
            "jarvis_executor_pack_load_failures 0\n",
            "jarvis_executor_guest_log_lines_dropped_total 0\n",
            "jarvis_executor_queue_wait_seconds_count 0\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from\n{text}");
        }
        assert!(
            text.contains(&format!(
                "jarvis_executor_build_info{{version=\"{}\"}} 1\n",
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
    }
}
