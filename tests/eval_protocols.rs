//! Evaluation protocols on hand-made features: the linear probe separates separable classes,
//! kNN matches a brute-force reference, t-SNE is reproducible.

use locograph::eval::features::Features;
use locograph::eval::knn::{self, KnnConfig};
use locograph::eval::linear::{self, LinearConfig};
use locograph::eval::tsne::{self, TsneConfig};

/// A small deterministic generator (tests must not depend on `rand`'s stream across versions).
struct Lcg(u64);

impl Lcg {
    fn uniform(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 40) as f32 / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform().max(1e-7), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }
}

/// `n` points of `classes` Gaussian blobs in `dim` dimensions, centres ±`sep` on random axes.
fn blobs(n: usize, dim: usize, classes: usize, sep: f32, noise: f32, seed: u64) -> Features {
    let mut centres = Lcg(99);
    let c: Vec<Vec<f32>> = (0..classes).map(|_| (0..dim).map(|_| sep * centres.normal()).collect()).collect();
    let mut g = Lcg(seed);
    let mut x = Vec::with_capacity(n * dim);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let l = i % classes;
        x.extend(c[l].iter().map(|m| m + noise * g.normal()));
        labels.push(l as u32);
    }
    Features { x, n, dim, labels, num_classes: classes }
}

#[test]
fn linear_probe_separates_linearly_separable_features() {
    // Classes split by the sign of a linear function (not by blobs): only a linear model fits.
    let dim = 16;
    let mut g = Lcg(3);
    let w: Vec<f32> = (0..dim).map(|_| g.normal()).collect();
    let make = |n: usize, g: &mut Lcg| {
        let mut x = vec![];
        let mut labels = vec![];
        while labels.len() < n {
            let p: Vec<f32> = (0..dim).map(|_| g.normal()).collect();
            let s: f32 = p.iter().zip(&w).map(|(a, b)| a * b).sum();
            if s.abs() < 0.1 {
                continue; // a margin, so the classes are strictly separable
            }
            // an offset and scale unlike unit Gaussians, which standardisation must undo
            x.extend(p.iter().map(|v| 3.0 * v + 5.0));
            labels.push(u32::from(s > 0.0));
        }
        Features { x, n, dim, labels, num_classes: 2 }
    };
    let train = make(2000, &mut g);
    let test = make(500, &mut g);
    let cfg = LinearConfig { epochs: 30, ..LinearConfig::default() };
    let r = linear::probe(&train, &test, &cfg).expect("probe");
    assert!(r.test_top1 >= 0.99, "{r:?}");
    assert!(r.train_top1 >= 0.99, "{r:?}");

    let blobs_train = blobs(1000, 32, 10, 1.0, 0.3, 1);
    let blobs_test = blobs(300, 32, 10, 1.0, 0.3, 2);
    let r = linear::probe(&blobs_train, &blobs_test, &cfg).expect("probe");
    assert!(r.test_top1 >= 0.99, "{r:?}");
}

#[test]
fn linear_probe_refuses_bad_settings_listing_all() {
    let f = blobs(20, 4, 2, 1.0, 0.1, 1);
    let cfg = LinearConfig { epochs: 0, lr: -1.0, batch_size: 0, ..LinearConfig::default() };
    let e = linear::probe(&f, &f, &cfg).expect_err("an error").to_string();
    assert!(e.contains("1. epochs") && e.contains("2. batch_size") && e.contains("3. lr"), "{e}");
}

/// The definition, literally: cosine similarity to every training row, sort, vote
/// exp(sim / τ) over the top k, argmax (smallest class on ties).
fn brute_force(train: &Features, test: &Features, k: usize, t: f64) -> Vec<u32> {
    let norm = |r: &[f32]| r.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
    (0..test.n)
        .map(|q| {
            let a = test.row(q);
            let mut sims: Vec<(f64, usize)> = (0..train.n)
                .map(|i| {
                    let b = train.row(i);
                    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
                    (dot / (norm(a) * norm(b)), i)
                })
                .collect();
            sims.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
            let mut score = vec![0f64; train.num_classes];
            for &(s, i) in sims.iter().take(k) {
                score[train.labels[i] as usize] += (s / t).exp();
            }
            let mut best = 0;
            for c in 1..score.len() {
                if score[c] > score[best] {
                    best = c;
                }
            }
            best as u32
        })
        .collect()
}

#[test]
fn knn_equals_brute_force() {
    // Overlapping blobs, so neighbours disagree and the weighting matters.
    let train = blobs(600, 12, 5, 1.0, 1.2, 10);
    let test = blobs(200, 12, 5, 1.0, 1.2, 11);
    for (k, t) in [(1, 0.07), (7, 0.07), (50, 0.5), (600, 0.1), (1000, 1.0)] {
        // a chunk that does not divide the test size exercises the short last chunk
        let cfg = KnnConfig { k, temperature: t, chunk: 64 };
        let got = knn::predict(&train, &test, &cfg).expect("knn");
        let want = brute_force(&train, &test, k.min(train.n), t);
        assert_eq!(got, want, "k={k} τ={t}");
        let acc = knn::knn(&train, &test, &cfg).expect("knn").test_top1;
        let hits = want.iter().zip(&test.labels).filter(|(p, l)| p == l).count();
        assert!((acc - hits as f64 / test.n as f64).abs() < 1e-12);
    }
}

#[test]
fn tsne_is_deterministic_for_a_seed_and_separates_blobs() {
    let f = blobs(150, 20, 3, 3.0, 0.3, 5);
    let cfg = TsneConfig { iterations: 1000, perplexity: 20.0, ..TsneConfig::default() };
    let a = tsne::tsne(&f.x, f.n, f.dim, &cfg).expect("tsne");
    let b = tsne::tsne(&f.x, f.n, f.dim, &cfg).expect("tsne");
    assert_eq!(a, b, "same seed, different embedding");
    let c = tsne::tsne(&f.x, f.n, f.dim, &TsneConfig { seed: 1, ..cfg.clone() }).expect("tsne");
    assert_ne!(a, c, "the seed is ignored");
    // Well-separated blobs: each point's nearest embedded neighbour is of its own class.
    let mut same = 0;
    for i in 0..f.n {
        let d = |j: usize| (a[i][0] - a[j][0]).powi(2) + (a[i][1] - a[j][1]).powi(2);
        let nn = (0..f.n).filter(|&j| j != i).min_by(|&x, &y| d(x).total_cmp(&d(y))).expect("neighbour");
        same += usize::from(f.labels[nn] == f.labels[i]);
    }
    assert!(same as f64 >= 0.98 * f.n as f64, "{same}/{}", f.n);
    assert!(tsne::tsne(&f.x, f.n, f.dim, &TsneConfig { perplexity: 500.0, ..cfg }).is_err());
}

#[test]
fn first_per_class_takes_the_first_of_each_class() {
    let labels = [2, 0, 1, 0, 2, 1, 0, 3];
    assert_eq!(tsne::first_per_class(&labels, 3, 2), vec![1, 3, 2, 5, 0, 4]);
}
