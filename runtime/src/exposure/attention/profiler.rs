//! The attention exposer's profile (DESIGN.md §7, attention step 1): an [`AttentionHook`] that
//! only observes, accumulating per layer and head the exact block-pooled maps of every batch
//! ([`super::maps`]), and a report of what they show: each head's class ([`super::classes`]),
//! its local and sink mass, and the density that the per-row greedy oracle ([`oracle`]: local
//! window and sinks, then the heaviest blocks) needs to cover 90/95/99% of the mass; plus one
//! heat-map PNG per layer (mean pooled map per head, log colour scale).

use super::classes::{ClassRules, HeadClass, HeadStats};
use super::maps::block_maps;
use super::selection::{head_blocks, oracle, SelectionParams};
use crate::model::attention_hook::{GPU_K_BLOCK, GPU_Q_BLOCK};
use crate::model::{AttentionHook, AttentionInput, AttentionMask};
use plotters::prelude::*;
use serde::Serialize;
use std::path::Path;
use std::sync::Mutex;

/// Mass shares the report gives the oracle density for.
pub const COVER: [f64; 3] = [0.9, 0.95, 0.99];

/// What the profile measures with.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct ProfileSettings {
    /// Query rows per block.
    pub q_block: usize,
    /// Keys per block.
    pub k_block: usize,
    /// Local window (key blocks before the diagonal) and sinks the oracle always keeps.
    pub window: usize,
    /// First key blocks always kept.
    pub sinks: usize,
    /// The classification's thresholds.
    pub rules: ClassRules,
}

impl Default for ProfileSettings {
    fn default() -> Self {
        ProfileSettings {
            q_block: GPU_Q_BLOCK,
            k_block: GPU_K_BLOCK,
            window: 1,
            sinks: 1,
            rules: ClassRules::default(),
        }
    }
}

/// One head's accumulators.
#[derive(Clone, Debug, Default)]
struct HeadAcc {
    stats: HeadStats,
    /// `[qb][kb]`: (query-weighted mass, queries).
    grid: Vec<Vec<(f64, f64)>>,
    /// Per [`COVER`] share: (kept, causal) blocks of the oracle.
    cover: [(usize, usize); 3],
}

/// The profiling hook (module docs).
pub struct AttentionProfiler {
    settings: ProfileSettings,
    layers: Vec<Mutex<Vec<HeadAcc>>>,
}

/// One head in the report.
#[derive(Clone, Debug, Serialize)]
pub struct HeadReport {
    /// Head index.
    pub head: usize,
    /// Its class.
    pub class: HeadClass,
    /// Share of the mass in the local window (diagonal + `window` blocks).
    pub local_mass: f64,
    /// Share of the mass on the first key block (when not local).
    pub sink_mass: f64,
    /// `[share, density]`: oracle density covering `share` of each row's mass.
    pub density_for: Vec<[f64; 2]>,
    /// Best periodic pattern of the far mass: `[period, share, lift]`, if any.
    pub stride: Option<[f64; 3]>,
}

/// One layer in the report.
#[derive(Clone, Debug, Serialize)]
pub struct LayerReport {
    /// Decoder layer.
    pub layer: usize,
    /// `[share, density]` over all heads.
    pub density_for: Vec<[f64; 2]>,
    /// Per head.
    pub heads: Vec<HeadReport>,
}

impl AttentionProfiler {
    /// A profiler for `layers` layers of `heads` heads.
    pub fn new(layers: usize, heads: usize, settings: ProfileSettings) -> AttentionProfiler {
        AttentionProfiler {
            settings,
            layers: (0..layers)
                .map(|_| Mutex::new(vec![HeadAcc::default(); heads]))
                .collect(),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &ProfileSettings {
        &self.settings
    }

    /// The report so far, per layer.
    pub fn report(&self) -> Vec<LayerReport> {
        let rules = self.settings.rules;
        self.layers
            .iter()
            .enumerate()
            .map(|(layer, acc)| {
                let acc = acc.lock().unwrap_or_else(|e| e.into_inner());
                let ratio = |(k, c): (usize, usize)| if c > 0 { k as f64 / c as f64 } else { 1.0 };
                let heads = acc
                    .iter()
                    .enumerate()
                    .map(|(head, h)| HeadReport {
                        head,
                        class: h.stats.classify(&rules),
                        local_mass: h.stats.local_share(),
                        sink_mass: h.stats.sink_share(),
                        density_for: COVER
                            .iter()
                            .zip(&h.cover)
                            .map(|(&s, &kc)| [s, ratio(kc)])
                            .collect(),
                        stride: h
                            .stats
                            .best_stride(rules.max_period, 0.0)
                            .map(|(p, s, l)| [p as f64, s, l]),
                    })
                    .collect();
                let density_for = COVER
                    .iter()
                    .enumerate()
                    .map(|(i, &s)| {
                        let (k, c) = acc
                            .iter()
                            .fold((0, 0), |a, h| (a.0 + h.cover[i].0, a.1 + h.cover[i].1));
                        [s, ratio((k, c))]
                    })
                    .collect();
                LayerReport {
                    layer,
                    density_for,
                    heads,
                }
            })
            .collect()
    }

    /// The mean pooled map of every head of `layer`: `[qb][kb]`, NaN where no query block saw
    /// that key block.
    pub fn mean_maps(&self, layer: usize) -> Vec<Vec<Vec<f64>>> {
        let acc = self.layers[layer].lock().unwrap_or_else(|e| e.into_inner());
        acc.iter()
            .map(|h| {
                h.grid
                    .iter()
                    .map(|row| {
                        row.iter()
                            .map(|&(m, w)| if w > 0.0 { m / w } else { f64::NAN })
                            .collect()
                    })
                    .collect()
            })
            .collect()
    }

    /// Draws `layer`'s heat maps into a PNG at `path`: one panel per head (query block down,
    /// key block across), `log10` of the mean mass from −4 (dark) to 0 (bright).
    ///
    /// # Errors
    /// The drawing backend's error, as text (a plot never fails a run).
    pub fn heatmap_png(&self, layer: usize, title: &str, path: &Path) -> Result<(), String> {
        crate::train::plot::register_font();
        let maps = self.mean_maps(layer);
        let classes: Vec<HeadClass> = self.report()[layer].heads.iter().map(|h| h.class).collect();
        let n = maps.len().max(1);
        let cols = (n as f64).sqrt().ceil() as usize;
        let rows = n.div_ceil(cols);
        let root = BitMapBackend::new(path, (260 * cols as u32, 260 * rows as u32 + 40))
            .into_drawing_area();
        let e = |e: DrawingAreaErrorKind<_>| e.to_string();
        root.fill(&WHITE).map_err(e)?;
        let root = root.titled(title, ("sans-serif", 18)).map_err(e)?;
        for (h, area) in root.split_evenly((rows, cols)).iter().enumerate() {
            let Some(map) = maps.get(h) else { break };
            let nq = map.len().max(1);
            let nk = map.iter().map(Vec::len).max().unwrap_or(1).max(1);
            let mut chart = ChartBuilder::on(area)
                .caption(
                    format!("head {h}: {}", class_name(classes[h])),
                    ("sans-serif", 14),
                )
                .margin(6)
                .x_label_area_size(18)
                .y_label_area_size(22)
                .build_cartesian_2d(0.0..nk as f64, nq as f64..0.0)
                .map_err(e)?;
            chart
                .configure_mesh()
                .disable_mesh()
                .x_labels(4)
                .y_labels(4)
                .x_label_formatter(&|x| format!("{x:.0}"))
                .y_label_formatter(&|y| format!("{y:.0}"))
                .label_style(("sans-serif", 10))
                .draw()
                .map_err(e)?;
            let cells = map.iter().enumerate().flat_map(|(qb, row)| {
                row.iter()
                    .enumerate()
                    .filter(|(_, v)| v.is_finite())
                    .map(move |(kb, &v)| {
                        Rectangle::new(
                            [(kb as f64, qb as f64), (kb as f64 + 1.0, qb as f64 + 1.0)],
                            colour(v).filled(),
                        )
                    })
            });
            chart.draw_series(cells).map_err(e)?;
        }
        root.present().map_err(e)?;
        Ok(())
    }
}

/// A class as a short word.
pub fn class_name(c: HeadClass) -> String {
    match c {
        HeadClass::Local => "local".into(),
        HeadClass::Sink => "sink".into(),
        HeadClass::Strided { period } => format!("strided/{period}"),
        HeadClass::Broad => "broad".into(),
    }
}

/// Colour of a mass: `log10(mass)` on [−4, 0] through dark blue, teal, yellow.
fn colour(mass: f64) -> RGBColor {
    let t = ((mass.max(1e-12).log10() + 4.0) / 4.0).clamp(0.0, 1.0);
    let stops = [
        (20.0, 10.0, 60.0),
        (30.0, 140.0, 140.0),
        (250.0, 230.0, 40.0),
    ];
    let (a, b, f) = if t < 0.5 {
        (stops[0], stops[1], t * 2.0)
    } else {
        (stops[1], stops[2], t * 2.0 - 1.0)
    };
    let mix = |x: f64, y: f64| (x + (y - x) * f) as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

impl AttentionHook for AttentionProfiler {
    fn observe(&self, layer: usize, input: AttentionInput<'_>, _: Option<&AttentionMask>) {
        let Some(acc) = self.layers.get(layer) else {
            return;
        };
        let s = &self.settings;
        let maps = block_maps(&input, s.q_block, s.k_block);
        let masks: Vec<AttentionMask> = COVER
            .iter()
            .map(|&target| {
                oracle(
                    &maps,
                    &SelectionParams {
                        window: s.window,
                        sinks: s.sinks,
                        target,
                        max_density: 1.0,
                    },
                )
            })
            .collect();
        let mut acc = acc.lock().unwrap_or_else(|e| e.into_inner());
        if acc.len() != input.heads {
            return;
        }
        let lay = &maps.layout;
        for (r, &(_, qb, h)) in lay.index.iter().enumerate() {
            let (lo, _) = lay.range(r);
            let w = lay.queries(r) as f64;
            let head = &mut acc[h];
            head.stats.add_row(maps.row(r), lo, w, s.window);
            if head.grid.len() <= qb {
                head.grid.resize(qb + 1, Vec::new());
            }
            let row = &mut head.grid[qb];
            if row.len() < maps.row(r).len() {
                row.resize(maps.row(r).len(), (0.0, 0.0));
            }
            for (cell, &m) in row.iter_mut().zip(maps.row(r)) {
                cell.0 += w * m as f64;
                cell.1 += w;
            }
        }
        for (i, m) in masks.iter().enumerate() {
            for (h, (k, c)) in head_blocks(m, lay).into_iter().enumerate() {
                acc[h].cover[i].0 += k;
                acc[h].cover[i].1 += c;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::SplitMix64;

    #[test]
    fn a_local_and_a_sink_head_are_profiled_and_drawn() {
        let (heads, d, t) = (2, 8, 512);
        let cu = [0i32, 512];
        let mut rng = SplitMix64::new(1);
        let mut q = vec![0.0f32; t * heads * d];
        let mut k = vec![0.0f32; t * heads * d];
        for i in 0..t {
            let base = i * heads * d;
            // Head 0: position-like rotating features, queries match nearby keys.
            for c in 0..d / 2 {
                let ang = i as f32 / (20.0 * (c + 1) as f32);
                q[base + 2 * c] = 4.0 * ang.cos();
                q[base + 2 * c + 1] = 4.0 * ang.sin();
                k[base + 2 * c] = ang.cos();
                k[base + 2 * c + 1] = ang.sin();
            }
            // Head 1: the first 8 keys stick out, every query matches them.
            for c in 0..d {
                q[base + d + c] = 1.0 + 0.1 * (rng.next_u64() % 7) as f32;
                k[base + d + c] = if i < 8 { 3.0 } else { 0.0 };
            }
        }
        let input = AttentionInput {
            q: &q,
            k: &k,
            cu_seqlens: &cu,
            heads,
            head_dim: d,
        };
        let settings = ProfileSettings {
            q_block: 64,
            k_block: 32,
            ..Default::default()
        };
        let p = AttentionProfiler::new(2, heads, settings);
        p.observe(1, input, None);
        p.observe(1, input, None);
        let rep = p.report();
        let l1 = &rep[1];
        assert_eq!(l1.heads[0].class, HeadClass::Local, "{:?}", l1.heads[0]);
        assert_eq!(l1.heads[1].class, HeadClass::Sink, "{:?}", l1.heads[1]);
        // Oracle densities grow with the share, and the local head needs less than the bound.
        for h in &l1.heads {
            let d: Vec<f64> = h.density_for.iter().map(|x| x[1]).collect();
            assert!(d[0] <= d[1] && d[1] <= d[2] && d[2] <= 1.0, "{d:?}");
        }
        // Mean map = the single batch's map (observed twice).
        let maps = block_maps(&input, 64, 32);
        let mean = p.mean_maps(1);
        let r = maps.layout.offsets.len() - 2; // last row: qb 7, head 1
        let (_, qb, h) = maps.layout.index[r];
        for (kb, &m) in maps.row(r).iter().enumerate() {
            assert!((mean[h][qb][kb] - m as f64).abs() < 1e-6);
        }
        // Nothing observed for layer 0: every head defaults (no NaN in the JSON numbers).
        assert!(serde_json::to_string(&rep).is_ok());
        let png = std::env::temp_dir().join(format!("lexp-attn-heat-{}.png", std::process::id()));
        p.heatmap_png(1, "test", &png).unwrap();
        assert!(std::fs::metadata(&png).unwrap().len() > 1000);
        let _ = std::fs::remove_file(&png);
    }
}
