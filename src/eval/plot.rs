//! Figures with `plotters`: panels of line series (the per-decoder loss curves of the
//! supplementary's Fig. 1) and panels of class-coloured points (the t-SNE of Fig. 2), as PNG or
//! SVG.
//!
//! Text is drawn by plotters' pure-Rust `ab_glyph` renderer with a TrueType font read at run
//! time ([`font_path`]): no fontconfig or freetype is needed, and no font is bundled. PNGs are
//! drawn into an RGB buffer and encoded by the `image` crate the data readers already use, so
//! plotters' own (older) `image` dependency stays out of the build.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;

use super::error::EvalError;
use crate::{Error, Result};

/// Output file type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Png,
    Svg,
}

impl Format {
    /// From a file name's extension (`.png` or `.svg`).
    pub fn from_path(path: &Path) -> Result<Format> {
        match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
            Some("png") => Ok(Format::Png),
            Some("svg") => Ok(Format::Svg),
            _ => Err(EvalError::FigureFormat(path.into()).into()),
        }
    }
}

/// One line: a name for the legend, a colour slot (same slot = same colour in every panel) and
/// its `(x, y)` points. Non-finite points are skipped.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub color: usize,
    pub points: Vec<(f64, f64)>,
}

/// One chart of a figure.
#[derive(Debug, Clone)]
pub struct LinePanel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
}

/// One scatter chart: 2-D points and the class of each.
#[derive(Debug, Clone)]
pub struct ScatterPanel {
    pub title: String,
    pub points: Vec<[f64; 2]>,
    pub labels: Vec<u32>,
}

/// Matplotlib's `tab10`: distinct, colour-blind-tolerable, familiar from papers.
const TAB10: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Colour of slot `i` (cycles after 10).
pub fn color(i: usize) -> RGBColor {
    TAB10[i % TAB10.len()]
}

/// Where the figure font comes from: `$LOCOGRAPH_FONT`, else the first of some common
/// locations of DejaVu Sans / Liberation Sans / Noto Sans / Arial that exists.
pub fn font_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("LOCOGRAPH_FONT") {
        return Some(PathBuf::from(p));
    }
    const CANDIDATES: &[&str] = &[
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
        "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
        "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
        "/usr/share/fonts/noto/NotoSans-Regular.ttf",
        "/Library/Fonts/Arial.ttf",
        "/System/Library/Fonts/Supplemental/Arial.ttf",
        "C:\\Windows\\Fonts\\arial.ttf",
    ];
    CANDIDATES.iter().map(PathBuf::from).find(|p| p.exists())
}

/// Registers the font as `sans-serif` once per process (plotters keeps `'static` font bytes,
/// hence the deliberate leak of one font file).
fn ensure_font() -> Result<()> {
    static FONT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let path = font_path().ok_or_else(|| {
            "no TrueType font found for figure text: install fonts-dejavu-core or set LOCOGRAPH_FONT=/path/to/font.ttf"
                .to_string()
        })?;
        let bytes =
            crate::bounded::read(&path, crate::bounded::IMAGE).map_err(|e| format!("{}: {e}", path.display()))?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{}: not a TrueType/OpenType font", path.display()))
    })
    .clone()
    .map_err(|e| EvalError::Plot(e).into())
}

fn err<E: std::fmt::Display>(e: E) -> Error {
    EvalError::Plot(e.to_string()).into()
}

/// A whole figure, drawable on any backend (plotters backends are distinct types, and a
/// closure cannot be generic over them).
trait Figure {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>;
}

/// Draws `fig` on a `size` canvas and returns the encoded file.
fn render<F: Figure>(format: Format, size: (u32, u32), fig: &F) -> Result<Vec<u8>> {
    ensure_font()?;
    match format {
        Format::Svg => {
            let mut s = String::new();
            {
                let root = SVGBackend::with_string(&mut s, size).into_drawing_area();
                fig.draw(&root)?;
                root.present().map_err(err)?;
            }
            Ok(s.into_bytes())
        }
        Format::Png => {
            let mut buf = vec![0u8; size.0 as usize * size.1 as usize * 3];
            {
                let root = BitMapBackend::with_buffer(&mut buf, size).into_drawing_area();
                fig.draw(&root)?;
                root.present().map_err(err)?;
            }
            let img = image::RgbImage::from_raw(size.0, size.1, buf).ok_or_else(|| err("buffer size"))?;
            let mut out = std::io::Cursor::new(Vec::new());
            img.write_to(&mut out, image::ImageFormat::Png).map_err(err)?;
            Ok(out.into_inner())
        }
    }
}

/// `(rows, cols)` for `n` panels: up to `max_cols` per row.
fn grid(n: usize, max_cols: usize) -> (usize, usize) {
    let cols = n.clamp(1, max_cols);
    (n.div_ceil(cols).max(1), cols)
}

/// A tick label: integers without a decimal point, others with at most 3 decimals.
fn tick(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{}", v.round())
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// A range with some room around `lo..hi`, never empty.
fn padded(lo: f64, hi: f64, frac: f64) -> std::ops::Range<f64> {
    if !(lo.is_finite() && hi.is_finite()) {
        return 0.0..1.0;
    }
    let span = if hi > lo { hi - lo } else { lo.abs().max(1.0) };
    (lo - frac * span)..(hi + frac * span)
}

/// A line panel's layout in pixels: margin on every side, the x axis' and y axis' label areas,
/// and the height a 22-px caption takes.
const MARGIN: u32 = 12;
const X_LABELS: u32 = 42;
const Y_LABELS: u32 = 58;
const CAPTION_HEIGHT: u32 = 34;

fn draw_line_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, p: &LinePanel) -> Result<()> {
    let finite = || p.series.iter().flat_map(|s| s.points.iter()).filter(|(x, y)| x.is_finite() && y.is_finite());
    let (x0, x1) = finite().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), (x, _)| (a.min(*x), b.max(*x)));
    let (y0, y1) = finite().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), (_, y)| (a.min(*y), b.max(*y)));
    let (xr, mut yr) = (padded(x0, x1, 0.0), padded(y0, y1, 0.05));
    // The plot's size in pixels: the area less the margins, label areas and caption set below.
    let (aw, ah) = area.dim_in_pixel();
    let caption = if p.title.is_empty() { 0 } else { CAPTION_HEIGHT };
    let plot = (aw.saturating_sub(2 * MARGIN + Y_LABELS), ah.saturating_sub(2 * MARGIN + X_LABELS + caption));
    let legend = legend_fraction(&p.series, plot);
    let (mut corner, hidden) = legend_corner(&p.series, xr.clone(), yr.clone(), legend);
    // Every corner hides some curve: room above them all for the legend instead.
    if hidden > 0 && legend.1 < 0.5 {
        yr.end += (yr.end - yr.start) * legend.1 / (1.0 - legend.1);
        corner = SeriesLabelPosition::UpperRight;
    }
    let mut builder = ChartBuilder::on(area);
    // A figure with one panel says it all in the figure's title: no caption repeating it.
    if !p.title.is_empty() {
        builder.caption(&p.title, ("sans-serif", 22));
    }
    let mut chart = builder
        .margin(MARGIN)
        .x_label_area_size(X_LABELS)
        .y_label_area_size(Y_LABELS)
        .build_cartesian_2d(xr.clone(), yr.clone())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(&p.x_label)
        .x_label_formatter(&|x| tick(*x))
        .y_label_formatter(&|y| tick(*y))
        .y_desc(&p.y_label)
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(err)?;
    // A run with no curve here (no decoder on this stage) gets no legend entry.
    for s in p.series.iter().filter(|s| s.points.iter().any(|(x, y)| x.is_finite() && y.is_finite())) {
        let c = color(s.color);
        let pts = s.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite());
        chart
            .draw_series(LineSeries::new(pts, c.stroke_width(2)))
            .map_err(err)?
            .label(&s.name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    if !p.series.is_empty() {
        chart
            .configure_series_labels()
            .position(corner)
            .label_font(("sans-serif", 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
    }
    Ok(())
}

/// The legend box as a fraction `(width, height)` of a `plot` of that many pixels: plotters'
/// layout at 14-px labels (a 20-px line sample, ~7.5 px per character, ~20 px per row).
fn legend_fraction(series: &[Series], plot: (u32, u32)) -> (f64, f64) {
    let chars = series.iter().map(|s| s.name.chars().count()).max().unwrap_or(0) as f64;
    let (w, h) = (plot.0.max(1) as f64, plot.1.max(1) as f64);
    (((chars * 7.5 + 45.0) / w).min(1.0), ((series.len() as f64 * 20.0 + 14.0) / h).min(1.0))
}

/// The corner where a legend box of `size` (fractions of the plot) hides the least of the
/// curves, each sampled densely along its segments, and how many samples it hides; ties go to
/// the upper right, then upper left, lower right, lower left. A fixed corner hid the curves that
/// end high (accuracy curves) or low (loss curves) on one figure or the other.
fn legend_corner(
    series: &[Series],
    x: std::ops::Range<f64>,
    y: std::ops::Range<f64>,
    size: (f64, f64),
) -> (SeriesLabelPosition, usize) {
    const SAMPLES: usize = 32;
    let (sx, sy) = ((x.end - x.start).max(f64::MIN_POSITIVE), (y.end - y.start).max(f64::MIN_POSITIVE));
    let mut samples = vec![];
    for s in series {
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .filter(|(a, b)| a.is_finite() && b.is_finite())
            .map(|(a, b)| ((a - x.start) / sx, (b - y.start) / sy))
            .collect();
        samples.extend(pts.first().copied());
        for w in pts.windows(2) {
            samples.extend((1..=SAMPLES).map(|k| {
                let t = k as f64 / SAMPLES as f64;
                (w[0].0 + t * (w[1].0 - w[0].0), w[0].1 + t * (w[1].1 - w[0].1))
            }));
        }
    }
    let (fw, fh) = size;
    let corners = [
        (SeriesLabelPosition::UpperRight, 1.0 - fw..=1.0, 1.0 - fh..=1.0),
        (SeriesLabelPosition::UpperLeft, 0.0..=fw, 1.0 - fh..=1.0),
        (SeriesLabelPosition::LowerRight, 1.0 - fw..=1.0, 0.0..=fh),
        (SeriesLabelPosition::LowerLeft, 0.0..=fw, 0.0..=fh),
    ];
    let hidden = |c: &(SeriesLabelPosition, std::ops::RangeInclusive<f64>, std::ops::RangeInclusive<f64>)| {
        samples.iter().filter(|(a, b)| c.1.contains(a) && c.2.contains(b)).count()
    };
    // `min_by_key` keeps the first of equal counts: the order above is the preference.
    corners.iter().map(|c| (c.0.clone(), hidden(c))).min_by_key(|c| c.1).unwrap_or((SeriesLabelPosition::UpperRight, 0))
}

struct Lines<'a> {
    title: &'a str,
    panels: &'a [LinePanel],
    grid: (usize, usize),
}

impl Figure for Lines<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        root.fill(&WHITE).map_err(err)?;
        let body = root.titled(self.title, ("sans-serif", 28)).map_err(err)?;
        for (area, p) in body.split_evenly(self.grid).iter().zip(self.panels) {
            draw_line_panel(area, p)?;
        }
        Ok(())
    }
}

/// Panels of line series under one title, `max_cols` panels per row.
pub fn line_figure(title: &str, panels: &[LinePanel], max_cols: usize, format: Format) -> Result<Vec<u8>> {
    let (rows, cols) = grid(panels.len(), max_cols);
    let size = (560 * cols as u32, 420 * rows as u32 + 50);
    render(format, size, &Lines { title, panels, grid: (rows, cols) })
}

fn draw_scatter_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    p: &ScatterPanel,
    class_names: &[String],
    legend: bool,
) -> Result<()> {
    let (x0, x1) = p.points.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), q| (a.min(q[0]), b.max(q[0])));
    let (y0, y1) = p.points.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), q| (a.min(q[1]), b.max(q[1])));
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(40)
        // Room on the right for the legend, so it does not hide points.
        .build_cartesian_2d(padded(x0, x1 + if legend { 0.35 * (x1 - x0) } else { 0.0 }, 0.05), padded(y0, y1, 0.05))
        .map_err(err)?;
    // t-SNE coordinates mean nothing in themselves: axes without tick labels.
    chart.configure_mesh().disable_mesh().x_labels(0).y_labels(0).draw().map_err(err)?;
    let classes = p.labels.iter().copied().max().map_or(0, |m| m as usize + 1);
    for c in 0..classes {
        let col = color(c);
        let pts: Vec<(f64, f64)> =
            p.points.iter().zip(&p.labels).filter(|(_, &l)| l as usize == c).map(|(q, _)| (q[0], q[1])).collect();
        let name = class_names.get(c).cloned().unwrap_or_else(|| format!("class {c}"));
        chart
            .draw_series(pts.into_iter().map(move |q| Circle::new(q, 3, col.filled())))
            .map_err(err)?
            .label(name)
            .legend(move |(x, y)| Circle::new((x + 8, y), 4, col.filled()));
    }
    if legend && classes > 0 {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 13))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
    }
    Ok(())
}

struct Scatters<'a> {
    title: &'a str,
    panels: &'a [ScatterPanel],
    class_names: &'a [String],
    grid: (usize, usize),
}

impl Figure for Scatters<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        root.fill(&WHITE).map_err(err)?;
        let body = root.titled(self.title, ("sans-serif", 28)).map_err(err)?;
        let n = self.panels.len();
        for (i, (area, p)) in body.split_evenly(self.grid).iter().zip(self.panels).enumerate() {
            draw_scatter_panel(area, p, self.class_names, i + 1 == n)?;
        }
        Ok(())
    }
}

/// Scatter panels side by side, points coloured by class; the legend (class names, `class k`
/// where a name is missing) sits in the last panel.
pub fn scatter_figure(title: &str, panels: &[ScatterPanel], class_names: &[String], format: Format) -> Result<Vec<u8>> {
    for p in panels {
        if p.points.len() != p.labels.len() {
            return Err(EvalError::Plot(format!(
                "{} points but {} labels in `{}`",
                p.points.len(),
                p.labels.len(),
                p.title
            ))
            .into());
        }
    }
    let (rows, cols) = grid(panels.len(), 3);
    let size = (520 * cols as u32, 480 * rows as u32 + 50);
    render(format, size, &Scatters { title, panels, class_names, grid: (rows, cols) })
}

/// Writes `bytes` to `path`, creating its folder.
pub fn save(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(points: &[(f64, f64)]) -> Series {
        Series { name: "run".into(), color: 0, points: points.to_vec() }
    }

    fn corner(series: &[Series]) -> String {
        format!("{:?}", legend_corner(series, 0.0..10.0, 0.0..10.0, (0.4, 0.3)).0)
    }

    #[test]
    fn the_legend_goes_where_it_hides_no_curve() {
        // Rising curves (accuracy) end in the upper right; falling ones (loss) in the lower right.
        assert_eq!(corner(&[line(&[(0.0, 0.0), (10.0, 10.0)])]), "UpperLeft");
        assert_eq!(corner(&[line(&[(0.0, 10.0), (10.0, 0.0)])]), "UpperRight");
        // Along the top edge: the lower corners are free, the right one first.
        assert_eq!(corner(&[line(&[(0.0, 9.5), (10.0, 9.5)])]), "LowerRight");
        // Nothing anywhere free: the fewest samples hidden, here the lower left's.
        let busy =
            [line(&[(0.0, 0.5), (10.0, 9.5)]), line(&[(0.0, 9.5), (10.0, 9.5)]), line(&[(8.0, 0.0), (10.0, 0.5)])];
        assert_eq!(corner(&busy), "LowerLeft");
        assert!(legend_corner(&busy, 0.0..10.0, 0.0..10.0, (0.4, 0.3)).1 > 0);
        assert_eq!(legend_corner(&[line(&[(0.0, 0.0), (10.0, 10.0)])], 0.0..10.0, 0.0..10.0, (0.4, 0.3)).1, 0);
        // No points at all: the usual corner.
        assert_eq!(corner(&[]), "UpperRight");
    }

    #[test]
    fn the_legend_box_grows_with_names_and_rows() {
        let one = legend_fraction(&[line(&[])], (500, 300));
        let named = legend_fraction(&[Series { name: "a much longer name".into(), ..line(&[]) }], (500, 300));
        let three = legend_fraction(&[line(&[]), line(&[]), line(&[])], (500, 300));
        assert!(named.0 > one.0 && named.1 == one.1);
        assert!(three.1 > one.1 && three.0 == one.0);
        assert!(legend_fraction(&vec![line(&[]); 100], (500, 300)).1 <= 1.0);
    }
}
