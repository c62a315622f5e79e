//! Figures are valid files: PNG signature and IHDR size, SVG that parses as XML and names every
//! series in its legend.

use locograph::eval::plot::{self, Format, LinePanel, ScatterPanel, Series};

fn line_panels() -> Vec<LinePanel> {
    let curve = |a: f64| (0..50).map(|i| (i as f64 * 10.0, a + 4.0 * (-(i as f64) / 15.0).exp())).collect();
    ["res3", "res4", "res5"]
        .iter()
        .map(|stage| LinePanel {
            title: format!("decoder on {stage}"),
            x_label: "step".into(),
            y_label: "NT-Xent loss".into(),
            series: vec![
                Series {
                    name: "SimCLR (L)".into(),
                    color: 0,
                    points: if *stage == "res5" { curve(1.0) } else { vec![] },
                },
                Series { name: "GIM (L3)".into(), color: 1, points: curve(1.5) },
                Series { name: "LoCo (L1)".into(), color: 2, points: curve(1.1) },
                // a NaN row (a diverged log line) must be skipped, not break the axis range
                Series { name: "broken".into(), color: 3, points: vec![(0.0, f64::NAN), (10.0, 2.0)] },
            ],
        })
        .collect()
}

fn scatter_panels() -> Vec<ScatterPanel> {
    let pts: Vec<[f64; 2]> =
        (0..100).map(|i| [(i % 10) as f64 * 3.0 + (i as f64 * 0.37).sin(), (i / 10) as f64]).collect();
    let labels: Vec<u32> = (0..100).map(|i| (i % 10) as u32).collect();
    ["SimCLR", "GIM", "LoCo"]
        .iter()
        .map(|t| ScatterPanel { title: t.to_string(), points: pts.clone(), labels: labels.clone() })
        .collect()
}

/// Width and height from the IHDR chunk, after checking the signature.
fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    assert_eq!(&bytes[12..16], b"IHDR", "first chunk");
    let be = |o: usize| u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
    (be(16), be(20))
}

fn svg_texts(bytes: &[u8]) -> (roxmltree::Document<'_>, Vec<String>) {
    let text = std::str::from_utf8(bytes).expect("utf-8");
    let doc = roxmltree::Document::parse(text).expect("SVG parses as XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let texts = doc
        .descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text())
        .map(|t| t.trim().to_string())
        .collect();
    (doc, texts)
}

#[test]
fn loss_curve_figure_is_a_valid_png_and_svg() {
    let panels = line_panels();
    let png = plot::line_figure("Training loss of each decoder", &panels, 2, Format::Png).expect("png");
    // 3 panels, 2 per row: 2 columns × 2 rows of the fixed panel size plus the title band
    assert_eq!(png_size(&png), (2 * 560, 2 * 420 + 50));
    // Decodes, and is not a blank canvas: text and lines were drawn.
    let img = image::load_from_memory(&png).expect("decodes").to_rgb8();
    let dark = img.pixels().filter(|p| p.0.iter().all(|&c| c < 80)).count();
    assert!(dark > 1000, "only {dark} dark pixels: no text or axes drawn?");
    let coloured = img.pixels().filter(|p| p.0 == [44, 160, 44]).count();
    assert!(coloured > 100, "the LoCo series colour is missing");

    let svg = plot::line_figure("Training loss of each decoder", &panels, 2, Format::Svg).expect("svg");
    let (_, texts) = svg_texts(&svg);
    for want in [
        "Training loss of each decoder",
        "decoder on res3",
        "decoder on res5",
        "SimCLR (L)",
        "GIM (L3)",
        "LoCo (L1)",
        "step",
        "NT-Xent loss",
    ] {
        assert!(texts.iter().any(|t| t == want), "`{want}` not among the SVG's texts: {texts:?}");
    }
    // SimCLR has a curve only on res5: one legend entry, not one per panel.
    assert_eq!(texts.iter().filter(|t| *t == "SimCLR (L)").count(), 1, "{texts:?}");
}

#[test]
fn tsne_figure_is_a_valid_png_and_svg() {
    let panels = scatter_panels();
    let names: Vec<String> = (0..10).map(|c| format!("kind {c}")).collect();
    let png = plot::scatter_figure("t-SNE", &panels, &names, Format::Png).expect("png");
    assert_eq!(png_size(&png), (3 * 520, 480 + 50));
    image::load_from_memory(&png).expect("decodes");
    let svg = plot::scatter_figure("t-SNE", &panels, &names[..8], Format::Svg).expect("svg");
    let (doc, texts) = svg_texts(&svg);
    for want in ["SimCLR", "GIM", "LoCo", "kind 0", "kind 7", "class 8", "class 9"] {
        assert!(texts.iter().any(|t| t == want), "`{want}` missing: {texts:?}");
    }
    let circles = doc.descendants().filter(|n| n.has_tag_name("circle")).count();
    assert!(circles >= 300, "{circles} circles for 3 × 100 points");
    let bad = ScatterPanel { title: "x".into(), points: vec![[0.0, 0.0]], labels: vec![] };
    assert!(plot::scatter_figure("t", &[bad], &[], Format::Svg).is_err());
}

#[test]
fn figure_format_comes_from_the_extension() {
    assert_eq!(Format::from_path("a/fig.PNG".as_ref()).expect("png"), Format::Png);
    assert_eq!(Format::from_path("fig.svg".as_ref()).expect("svg"), Format::Svg);
    assert!(Format::from_path("fig.pdf".as_ref()).is_err());
}

#[test]
fn label_run_pairs_parse() {
    use locograph::eval::figures::label_run;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().display().to_string();
    let (l, p) = label_run(&format!("LoCo={d}")).expect("pair");
    assert_eq!((l.as_str(), p), ("LoCo", dir.path().to_path_buf()));
    let (l, _) = label_run(&d).expect("bare dir");
    assert_eq!(Some(l.as_str()), dir.path().file_name().and_then(|n| n.to_str()));
    assert!(label_run("=x").is_err());
    assert!(label_run("LoCo=/no/such/run").expect_err("missing").to_string().contains("not a run directory"));
}

#[test]
fn smoothing_is_a_debiased_moving_average() {
    use locograph::eval::figures::smooth;
    let pts = [(1.0, 4.0), (2.0, 2.0), (3.0, f64::NAN), (4.0, 2.0)];
    assert_eq!(smooth(&pts, 0.0)[1], (2.0, 2.0));
    let s = smooth(&pts, 0.5);
    // debiased: the first value is itself, then (0.5·0.5·4 + 0.5·2) / (0.5·0.5 + 0.5); the NaN
    // row is skipped, so the last is (0.5·2 + 0.5·2) / (0.5·0.75 + 0.5)
    assert_eq!(s[0], (1.0, 4.0));
    assert!((s[1].1 - 2.0 / 0.75).abs() < 1e-12, "{s:?}");
    assert!(s[2].1.is_nan());
    assert!((s[3].1 - 2.0 / 0.875).abs() < 1e-12, "{s:?}");
}
