//! Learning-rate schedules: SimCLR's linear warm-up + cosine decay, constant, and step decay
//! (the linear probe's ×0.1 at epochs 30/60/90).

/// SimCLR's linear scaling rule: the LR for `batch_size` given the LR at batch 256.
pub fn scaled_lr(base_lr: f64, batch_size: usize) -> f64 {
    base_lr * batch_size as f64 / 256.0
}

/// What happens after the warm-up.
#[derive(Debug, Clone, PartialEq)]
pub enum Decay {
    Constant,
    /// Half a cosine from the peak down to `final_lr`, reached at the last step.
    Cosine {
        final_lr: f64,
    },
    /// Multiply by `gamma` at each milestone step (counted from step 0, warm-up included).
    Step {
        milestones: Vec<usize>,
        gamma: f64,
    },
}

/// The learning rate as a function of the optimizer step (0-based).
///
/// A warm-up rises linearly from 0 at step 0 to the peak at `warmup_steps`, SimCLR style
/// (`lr = step / warmup_steps · peak`, so the very first step has LR 0).
#[derive(Debug, Clone, PartialEq)]
pub struct LrSchedule {
    peak_lr: f64,
    warmup_steps: usize,
    total_steps: usize,
    decay: Decay,
}

impl LrSchedule {
    pub fn constant(lr: f64) -> Self {
        Self { peak_lr: lr, warmup_steps: 0, total_steps: 0, decay: Decay::Constant }
    }

    /// Warm-up over `warmup_steps`, then cosine decay to `final_lr` at `total_steps`.
    pub fn cosine(peak_lr: f64, warmup_steps: usize, total_steps: usize, final_lr: f64) -> Self {
        Self { peak_lr, warmup_steps, total_steps, decay: Decay::Cosine { final_lr } }
    }

    /// Warm-up over `warmup_steps`, then `peak_lr · gamma^(milestones passed)`.
    pub fn step(peak_lr: f64, warmup_steps: usize, milestones: Vec<usize>, gamma: f64) -> Self {
        Self { peak_lr, warmup_steps, total_steps: 0, decay: Decay::Step { milestones, gamma } }
    }

    /// The same schedule with a linear warm-up over `warmup_steps`.
    pub fn with_warmup(mut self, warmup_steps: usize) -> Self {
        self.warmup_steps = warmup_steps;
        self
    }

    pub fn peak_lr(&self) -> f64 {
        self.peak_lr
    }
    pub fn warmup_steps(&self) -> usize {
        self.warmup_steps
    }
    pub fn decay(&self) -> &Decay {
        &self.decay
    }

    /// The learning rate for optimizer step `step`. Past `total_steps` a cosine stays at its
    /// final value.
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * step as f64 / self.warmup_steps as f64;
        }
        match &self.decay {
            Decay::Constant => self.peak_lr,
            Decay::Cosine { final_lr } => {
                let decay_steps = self.total_steps.saturating_sub(self.warmup_steps);
                if decay_steps == 0 {
                    return self.peak_lr;
                }
                let progress = (step - self.warmup_steps).min(decay_steps) as f64 / decay_steps as f64;
                final_lr + (self.peak_lr - final_lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            Decay::Step { milestones, gamma } => {
                let passed = milestones.iter().filter(|&&m| step >= m).count();
                self.peak_lr * gamma.powi(passed as i32)
            }
        }
    }
}

fn default_false() -> bool {
    false
}
fn default_zero() -> f64 {
    0.0
}
fn default_gamma() -> f64 {
    0.1
}
fn default_milestones() -> Vec<f64> {
    vec![30.0, 60.0, 90.0]
}

/// The learning-rate schedule. Durations are in epochs, as papers state them; in YAML:
/// `schedule: { kind: cosine, lr: 0.3, scale_with_batch: true, warmup_epochs: 10 }`.
// Like `OptimizerConfig`, errors inside it carry no line number (serde buffers internally
// tagged enums).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ScheduleConfig {
    /// Linear warm-up, then half a cosine down to `final_lr_fraction` of the peak (SimCLR).
    Cosine {
        /// Peak learning rate (after warm-up); the LR at batch 256 when `scale_with_batch`.
        lr: f64,
        /// Scale `lr` by batch_size / 256 (SimCLR's linear scaling rule).
        #[serde(default = "default_false")]
        scale_with_batch: bool,
        /// Epochs of linear warm-up from 0 to the peak.
        #[serde(default = "default_zero")]
        warmup_epochs: f64,
        /// Where the cosine ends, as a fraction of the peak LR (0 = decay to zero).
        #[serde(default = "default_zero")]
        final_lr_fraction: f64,
    },
    /// The same learning rate throughout (after an optional warm-up).
    Constant {
        /// The learning rate; the LR at batch 256 when `scale_with_batch`.
        lr: f64,
        /// Scale `lr` by batch_size / 256 (SimCLR's linear scaling rule).
        #[serde(default = "default_false")]
        scale_with_batch: bool,
        /// Epochs of linear warm-up from 0 to `lr`.
        #[serde(default = "default_zero")]
        warmup_epochs: f64,
    },
    /// Multiply the learning rate by `gamma` at each milestone epoch (the linear probe).
    Step {
        /// Initial learning rate; the LR at batch 256 when `scale_with_batch`.
        lr: f64,
        /// Scale `lr` by batch_size / 256 (SimCLR's linear scaling rule).
        #[serde(default = "default_false")]
        scale_with_batch: bool,
        /// Epochs of linear warm-up from 0 to `lr`.
        #[serde(default = "default_zero")]
        warmup_epochs: f64,
        /// Epochs at whose start the LR is multiplied by `gamma`, ascending.
        #[serde(default = "default_milestones")]
        milestones: Vec<f64>,
        /// Factor applied at each milestone.
        #[serde(default = "default_gamma")]
        gamma: f64,
    },
}

impl ScheduleConfig {
    fn common(&self) -> (f64, bool, f64) {
        match *self {
            ScheduleConfig::Cosine { lr, scale_with_batch, warmup_epochs, .. }
            | ScheduleConfig::Constant { lr, scale_with_batch, warmup_epochs }
            | ScheduleConfig::Step { lr, scale_with_batch, warmup_epochs, .. } => (lr, scale_with_batch, warmup_epochs),
        }
    }

    /// The peak learning rate at this batch size (after the linear scaling rule, if on): the
    /// derived number to print at start.
    pub fn peak_lr(&self, batch_size: usize) -> f64 {
        let (lr, scale, _) = self.common();
        if scale {
            scaled_lr(lr, batch_size)
        } else {
            lr
        }
    }

    /// The schedule for a run of `total_steps` optimizer steps, `steps_per_epoch` per epoch.
    /// Epoch counts become steps by rounding.
    pub fn build(&self, batch_size: usize, total_steps: usize, steps_per_epoch: usize) -> LrSchedule {
        let peak = self.peak_lr(batch_size);
        let to_steps = |epochs: f64| (epochs * steps_per_epoch as f64).round().max(0.0) as usize;
        let warmup = to_steps(self.common().2);
        match self {
            ScheduleConfig::Cosine { final_lr_fraction, .. } => {
                LrSchedule::cosine(peak, warmup, total_steps, peak * final_lr_fraction)
            }
            ScheduleConfig::Constant { .. } => LrSchedule::constant(peak).with_warmup(warmup),
            ScheduleConfig::Step { milestones, gamma, .. } => {
                LrSchedule::step(peak, warmup, milestones.iter().map(|&m| to_steps(m)).collect(), *gamma)
            }
        }
    }

    /// Every problem with the values (not only the first), one sentence each, naming the key.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = vec![];
        let (lr, _, warmup_epochs) = self.common();
        if !(lr > 0.0 && lr.is_finite()) {
            errors.push(format!("schedule: lr must be > 0, got {lr}"));
        }
        if !(warmup_epochs >= 0.0 && warmup_epochs.is_finite()) {
            errors.push(format!("schedule: warmup_epochs must be >= 0, got {warmup_epochs}"));
        }
        match self {
            ScheduleConfig::Cosine { final_lr_fraction: f, .. } if !(0.0..=1.0).contains(f) => {
                errors.push(format!("schedule: final_lr_fraction must be in [0, 1], got {f}"));
            }
            ScheduleConfig::Step { milestones, gamma, .. } => {
                if milestones.iter().any(|m| !(*m >= 0.0 && m.is_finite())) {
                    errors.push(format!("schedule: milestones must be epochs >= 0, got {milestones:?}"));
                }
                if milestones.windows(2).any(|w| w[0] >= w[1]) {
                    errors.push(format!("schedule: milestones must be strictly ascending, got {milestones:?}"));
                }
                if !(*gamma > 0.0 && gamma.is_finite()) {
                    errors.push(format!("schedule: gamma must be > 0, got {gamma}"));
                }
            }
            _ => {}
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1.0)
    }

    #[test]
    fn cosine_with_warmup_hits_the_landmarks() {
        // SimCLR: peak 0.3 at batch 256 scaled to 4.8 at 4096; 10 of 100 steps warm-up
        let s = LrSchedule::cosine(scaled_lr(0.3, 4096), 10, 110, 0.0);
        assert!(close(s.peak_lr(), 4.8));
        assert_eq!(s.lr(0), 0.0); // warm-up start
        assert!(close(s.lr(5), 2.4)); // warm-up middle
        assert!(close(s.lr(10), 4.8)); // warm-up end = peak
        assert!(close(s.lr(60), 2.4)); // half-way through the cosine
        assert!(close(s.lr(35), 4.8 * 0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos())));
        assert!(s.lr(109) > 0.0 && s.lr(109) < 1e-2);
        assert!(close(s.lr(110), 0.0)); // end
        assert!(close(s.lr(500), 0.0)); // past the end: stays at the floor
        let floor = LrSchedule::cosine(1.0, 0, 100, 0.1);
        assert!(close(floor.lr(0), 1.0) && close(floor.lr(50), 0.55) && close(floor.lr(100), 0.1));
    }

    #[test]
    fn step_and_constant() {
        let s = LrSchedule::step(30.0, 0, vec![30, 60, 90], 0.1);
        let got: Vec<f64> = [0, 29, 30, 59, 60, 90, 99].iter().map(|&i| s.lr(i)).collect();
        let want = [30.0, 30.0, 3.0, 3.0, 0.3, 0.03, 0.03];
        assert!(got.iter().zip(want).all(|(a, b)| close(*a, b)), "{got:?}");
        let c = LrSchedule::constant(0.5).with_warmup(4);
        assert!(close(c.lr(2), 0.25) && close(c.lr(4), 0.5) && close(c.lr(1000), 0.5));
        // degenerate: no decay steps left after the warm-up
        assert!(close(LrSchedule::cosine(1.0, 5, 5, 0.0).lr(7), 1.0));
    }

    #[test]
    fn config_converts_epochs_to_steps_and_scales_the_lr() {
        let yaml = "kind: cosine\nlr: 0.3\nscale_with_batch: true\nwarmup_epochs: 10\n";
        let c: ScheduleConfig = serde_yaml::from_str(yaml).expect("valid yaml");
        assert!(c.validate().is_empty());
        // batch 512, 50 steps per epoch, 100 epochs
        let s = c.build(512, 5000, 50);
        assert!(close(s.peak_lr(), 0.6));
        assert_eq!(s.warmup_steps(), 500);
        assert!(close(s.lr(250), 0.3) && close(s.lr(500), 0.6) && close(s.lr(5000), 0.0));

        // the linear probe: LR 30, ×0.1 at epochs 30/60/90 (the default milestones)
        let c: ScheduleConfig = serde_yaml::from_str("kind: step\nlr: 30\n").expect("valid yaml");
        let s = c.build(256, 100 * 20, 20);
        assert_eq!(s.decay(), &Decay::Step { milestones: vec![600, 1200, 1800], gamma: 0.1 });
        assert!(close(s.lr(599), 30.0) && close(s.lr(600), 3.0));

        let c: ScheduleConfig = serde_yaml::from_str("kind: constant\nlr: 0.001\n").expect("valid yaml");
        assert!(close(c.build(4096, 10, 1).lr(3), 0.001));
    }

    #[test]
    fn yaml_rejects_typos_and_keys_of_other_kinds() {
        for (yaml, needle) in [
            ("kind: cosine\nlr: 0.3\nwarmup_epoch: 10\n", "warmup_epoch"),
            // milestones belong to `step`: under `cosine` they are a mistake, not ignored
            ("kind: cosine\nlr: 0.3\nmilestones: [30, 60]\n", "milestones"),
            ("kind: step\nlr: 0.3\ngama: 0.5\n", "gama"),
            ("kind: cosine\n", "lr"),
            ("kind: linear\nlr: 0.1\n", "linear"),
            ("kind: constant\nlr: fast\n", "invalid type"),
        ] {
            let err = match serde_yaml::from_str::<ScheduleConfig>(yaml) {
                Ok(c) => panic!("accepted {yaml:?} as {c:?}"),
                Err(e) => e.to_string(),
            };
            assert!(err.contains(needle), "error for {yaml:?} does not name `{needle}`: {err}");
        }
    }

    #[test]
    fn validate_lists_every_problem() {
        let c = ScheduleConfig::Step {
            lr: -1.0,
            scale_with_batch: false,
            warmup_epochs: -2.0,
            milestones: vec![60.0, 30.0],
            gamma: 0.0,
        };
        assert_eq!(c.validate().len(), 4, "{:?}", c.validate());
    }

    #[test]
    fn schema_documents_every_kind() {
        let schema = serde_json::to_string(&schemars::schema_for!(ScheduleConfig)).expect("schema serialises");
        for needle in ["cosine", "constant", "step", "warmup_epochs", "linear scaling rule", "milestones"] {
            assert!(schema.contains(needle), "schema lacks {needle}: {schema}");
        }
    }
}
