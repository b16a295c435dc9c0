//! The training renderer: per-epoch metrics for `run.json`, a stop on a non-finite loss, and
//! either burn-train's TUI (on a terminal) or one clean line per epoch (logs, CI).

use burn::train::logger::{EvaluationProgressLogger, TrainingProgressLogger};
use burn::train::metric::{MetricDefinition, MetricId, NumericEntry};
use burn::train::renderer::{EvaluationName, MetricState, MetricsRenderer, MetricsRendererEvaluation, MetricsRendererTraining};
use burn::train::{Interrupter, LearnerSummary};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

/// One epoch's end-of-epoch metric values (`loss`, `accuracy`, `lr`) per split.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// Epoch number (1-based).
    pub epoch: usize,
    /// Training split: metric name -> value.
    pub train: BTreeMap<String, f64>,
    /// Validation split: metric name -> value.
    pub valid: BTreeMap<String, f64>,
}

/// What the renderer saw, shared with the run.
#[derive(Debug, Default)]
pub struct RunLog {
    /// Completed epochs, in order.
    pub epochs: Vec<EpochMetrics>,
    /// Set when a non-finite loss stopped training: `(epoch, iteration, value)`.
    pub non_finite: Option<(usize, usize, f64)>,
    /// Where `epochs` is written (atomically) after every epoch, so an interrupted run keeps its
    /// history for `--resume`.
    pub persist: Option<std::path::PathBuf>,
}

/// Records per-epoch metrics and stops training on a NaN/inf loss; draws through `inner` (the
/// TUI) when given, otherwise prints one line per epoch.
pub struct EpochRenderer {
    log: Arc<Mutex<RunLog>>,
    interrupter: Interrupter,
    inner: Option<Box<dyn MetricsRenderer>>,
    names: HashMap<MetricId, String>,
    current: EpochMetrics,
    epoch: usize,
    iteration: usize,
    /// Training iterations seen in the current epoch.
    epoch_iteration: usize,
    /// The run's checkpoint folder (the fault injection waits for the previous epoch's seal).
    ckpt_dir: Option<std::path::PathBuf>,
}

/// Fault injection for the crash tests: `VQT_TEST_ABORT_AT=E:I` aborts the process (as a kill
/// would: no unwinding, no flushing) when training reaches iteration I of epoch E. So that the
/// kill lands after epoch E-1's checkpoint is complete (burn-train writes it on another thread,
/// which may still be sealing it), the abort first waits, up to a minute, for that checkpoint to
/// be usable.
fn abort_at() -> Option<(usize, usize)> {
    static AT: std::sync::OnceLock<Option<(usize, usize)>> = std::sync::OnceLock::new();
    *AT.get_or_init(|| {
        let v = std::env::var("VQT_TEST_ABORT_AT").ok()?;
        let (e, i) = v.split_once(':')?;
        Some((e.trim().parse().ok()?, i.trim().parse().ok()?))
    })
}

impl EpochRenderer {
    /// A renderer that writes into `log` and stops `interrupter` on a non-finite loss.
    pub fn new(log: Arc<Mutex<RunLog>>, interrupter: Interrupter, inner: Option<Box<dyn MetricsRenderer>>) -> Self {
        Self { log, interrupter, inner, names: HashMap::new(), current: EpochMetrics::default(), epoch: 1, iteration: 0, epoch_iteration: 0, ckpt_dir: None }
    }

    /// Names the run's checkpoint folder, which the crash tests' fault injection watches.
    pub fn with_checkpoints(mut self, dir: &std::path::Path) -> Self {
        self.ckpt_dir = Some(dir.to_path_buf());
        self
    }

    fn record(&mut self, state: &MetricState, train: bool) {
        let MetricState::Numeric(entry, Some(value)) = state else { return };
        let Some(name) = self.names.get(&entry.metric_id).cloned() else { return };
        match value {
            NumericEntry::Final(v) => {
                let split = if train { &mut self.current.train } else { &mut self.current.valid };
                split.insert(name, *v);
            }
            NumericEntry::Value(v) | NumericEntry::Aggregated { aggregated_value: v, .. } if train && name == "Loss" => {
                self.iteration += 1;
                self.epoch_iteration += 1;
                if abort_at() == Some((self.epoch, self.epoch_iteration)) {
                    if let Some(dir) = &self.ckpt_dir {
                        let t0 = std::time::Instant::now();
                        while self.epoch > 1
                            && crate::checkpoint::TrainableCheckpointer::latest(dir).is_none_or(|e| e + 1 < self.epoch)
                            && t0.elapsed().as_secs() < 60
                        {
                            std::thread::sleep(std::time::Duration::from_millis(10));
                        }
                    }
                    eprintln!("VQT_TEST_ABORT_AT: aborting at epoch {}, iteration {}", self.epoch, self.epoch_iteration);
                    std::process::abort();
                }
                if !v.is_finite() {
                    let mut log = self.log.lock().expect("run log");
                    if log.non_finite.is_none() {
                        log.non_finite = Some((self.epoch, self.iteration, *v));
                        self.interrupter.stop(Some(&format!("loss is {v} at epoch {}, iteration {}", self.epoch, self.iteration)));
                    }
                }
            }
            _ => {}
        }
    }
}

/// `Loss` -> `loss`, `Accuracy` -> `accuracy`, `Learning Rate` -> `lr`.
fn short(name: &str) -> String {
    match name {
        "Learning Rate" | "LearningRate" => "lr".into(),
        other => other.to_lowercase().replace(' ', "_"),
    }
}

impl MetricsRendererTraining for EpochRenderer {
    fn update_train(&mut self, state: MetricState) {
        self.record(&state, true);
        if let Some(i) = self.inner.as_mut() {
            i.update_train(state);
        }
    }

    fn update_valid(&mut self, state: MetricState) {
        self.record(&state, false);
        if let Some(i) = self.inner.as_mut() {
            i.update_valid(state);
        }
    }

    fn on_train_end(&mut self, summary: Option<LearnerSummary>) -> Result<(), Box<dyn core::error::Error>> {
        match self.inner.as_mut() {
            Some(i) => i.on_train_end(summary),
            None => Ok(()),
        }
    }
}

impl TrainingProgressLogger for EpochRenderer {
    fn start(&mut self, total_epochs: usize, starting_epoch: usize, total_items: Option<usize>, label: Option<&str>) {
        self.epoch = starting_epoch.max(1);
        if let Some(i) = self.inner.as_mut() {
            i.start(total_epochs, starting_epoch, total_items, label);
        }
    }

    fn update_epoch(&mut self, epoch: usize) {
        let mut done = std::mem::take(&mut self.current);
        done.epoch = self.epoch;
        let fmt = |m: &BTreeMap<String, f64>| m.iter().map(|(k, v)| format!("{}={}", short(k), fmt_value(k, *v))).collect::<Vec<_>>().join(" ");
        if self.inner.is_none() {
            println!("epoch {:>3} | train {} | valid {}", done.epoch, fmt(&done.train), fmt(&done.valid));
        }
        done.train = done.train.into_iter().map(|(k, v)| (short(&k), v)).collect();
        done.valid = done.valid.into_iter().map(|(k, v)| (short(&k), v)).collect();
        {
            let mut log = self.log.lock().expect("run log");
            log.epochs.push(done);
            if let Some(p) = &log.persist {
                if let Err(e) = vqt_core::fs::write_atomic(p, serde_json::to_string_pretty(&log.epochs).expect("json").as_bytes()) {
                    eprintln!("warning: {}: {e}", p.display());
                }
            }
        }
        self.epoch += 1;
        self.epoch_iteration = 0;
        if let Some(i) = self.inner.as_mut() {
            i.update_epoch(epoch);
        }
    }

    fn start_split(&mut self, split: &str, total_items: usize) {
        if split.eq_ignore_ascii_case("train") {
            self.iteration = 0;
        }
        if let Some(i) = self.inner.as_mut() {
            i.start_split(split, total_items);
        }
    }

    fn update_split(&mut self, items_processed: usize) {
        if let Some(i) = self.inner.as_mut() {
            i.update_split(items_processed);
        }
    }

    fn end_split(&mut self) {
        if let Some(i) = self.inner.as_mut() {
            i.end_split();
        }
    }

    fn end(&mut self) {
        if let Some(i) = self.inner.as_mut() {
            i.end();
        }
    }

    fn log_event_training(&mut self, event: String) {
        if let Some(i) = self.inner.as_mut() {
            i.log_event_training(event);
        }
    }
}

fn fmt_value(name: &str, v: f64) -> String {
    if name.to_lowercase().contains("learning") {
        format!("{v:.3e}")
    } else {
        format!("{v:.4}")
    }
}

impl EvaluationProgressLogger for EpochRenderer {
    fn start_global_progress(&mut self, total_tests: usize) {
        if let Some(i) = self.inner.as_mut() {
            i.start_global_progress(total_tests);
        }
    }
    fn start_test(&mut self, name: &str, total_items: usize) {
        if let Some(i) = self.inner.as_mut() {
            i.start_test(name, total_items);
        }
    }
    fn update_test_progress(&mut self, items_processed: usize) {
        if let Some(i) = self.inner.as_mut() {
            i.update_test_progress(items_processed);
        }
    }
    fn end_test(&mut self) {
        if let Some(i) = self.inner.as_mut() {
            i.end_test();
        }
    }
    fn end_global_progress(&mut self) {
        if let Some(i) = self.inner.as_mut() {
            i.end_global_progress();
        }
    }
    fn log_event_evaluation(&mut self, event: String) {
        if let Some(i) = self.inner.as_mut() {
            i.log_event_evaluation(event);
        }
    }
}

impl MetricsRendererEvaluation for EpochRenderer {
    fn update_test(&mut self, name: EvaluationName, state: MetricState) {
        if let Some(i) = self.inner.as_mut() {
            i.update_test(name, state);
        }
    }
}

impl MetricsRenderer for EpochRenderer {
    fn manual_close(&mut self) {
        if let Some(i) = self.inner.as_mut() {
            i.manual_close();
        }
    }

    fn register_metric(&mut self, definition: MetricDefinition) {
        self.names.insert(definition.metric_id.clone(), definition.name.to_string());
        if let Some(i) = self.inner.as_mut() {
            i.register_metric(definition);
        }
    }
}
