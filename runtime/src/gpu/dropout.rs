//! Dropout in the GPU engine (RUNTIME.md §2, the CPU model's [`crate::model::dropout`]):
//! OPT's residual dropout on the attention block's and `fc2`'s outputs, and LoRA dropout on
//! each adapted branch's input.
//!
//! For each site of a layer, cuRAND fills f32 uniforms of the site's own stream
//! ([`rng::site_seed`](super::rng::site_seed)) and the `dropout_mask` kernel turns them into
//! the mask (`0` or `1/(1−p)`, stored bf16 in [`LayerActs::mask`](super::workspace::LayerActs))
//! while scaling the activation in place; the backward multiplies by the saved mask
//! (`mul_inplace`). Nothing of this runs in evaluation or with `p = 0`.

use super::ops::{copy_rows, dropout_mask, R};
use super::rng::{site_seed, GpuRng};
use super::workspace::Dims;
use crate::buffer::DeviceTensor;
use crate::device::CudaDevice;
use crate::model::dropout::Site;
use crate::peft::{LoraParams, LoraTarget};

/// Where each site's mask lies in a layer's mask buffer, in columns: the mask of a site of
/// width `w` starting at column `c` occupies elements `c·T .. (c + w)·T` (`[T, w]`
/// row-major), for `T` tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MaskLayout {
    /// Residual dropout probability (`p > 0` when the residual sites are present).
    pub p_res: f32,
    /// LoRA dropout probability.
    pub p_lora: f32,
    /// Column of the attention-output mask (`[T, H]`).
    pub attn: Option<usize>,
    /// Column of the `fc2`-output mask (`[T, H]`).
    pub mlp: Option<usize>,
    /// Column of each LoRA target's input mask, in [`LoraTarget::ALL`] order.
    pub lora: [Option<usize>; 6],
    /// Columns in all.
    pub cols: usize,
}

/// Input width of `target`'s projection.
pub fn in_width(d: &Dims, target: LoraTarget) -> usize {
    if target == LoraTarget::Fc2 {
        d.f
    } else {
        d.h
    }
}

impl MaskLayout {
    /// The masks of a training step with residual dropout `p_res` and the adapters `lora`
    /// (LoRA dropout `lora.config.dropout` on every target adapted in some layer); `None`
    /// when no site drops anything.
    pub fn new(d: &Dims, p_res: f32, lora: Option<&LoraParams>) -> Option<MaskLayout> {
        let mut cols = 0;
        let mut take = |w: usize| {
            let c = cols;
            cols += w;
            c
        };
        let (attn, mlp) = if p_res > 0.0 {
            (Some(take(d.h)), Some(take(d.h)))
        } else {
            (None, None)
        };
        let mut masks = [None; 6];
        let p_lora = lora.map_or(0.0, |l| l.config.dropout);
        if let Some(l) = lora.filter(|_| p_lora > 0.0) {
            let mut adapted = [false; 6];
            for (layer, t, _) in l.modules() {
                if layer < d.layers {
                    adapted[t.index()] = true;
                }
            }
            for t in LoraTarget::ALL {
                if adapted[t.index()] {
                    masks[t.index()] = Some(take(in_width(d, t)));
                }
            }
        }
        (cols > 0).then_some(MaskLayout {
            p_res,
            p_lora,
            attn,
            mlp,
            lora: masks,
            cols,
        })
    }

    /// Every site of one layer with its column and width.
    pub fn sites(&self, d: &Dims) -> Vec<(Site, usize, usize)> {
        let mut v = Vec::new();
        if let Some(c) = self.attn {
            v.push((Site::AttnResidual, c, d.h));
        }
        if let Some(c) = self.mlp {
            v.push((Site::MlpResidual, c, d.h));
        }
        for t in LoraTarget::ALL {
            if let Some(c) = self.lora[t.index()] {
                v.push((Site::Lora(t.index()), c, in_width(d, t)));
            }
        }
        v
    }
}

/// Dropout of one training call, as the layer code sees it.
#[derive(Clone, Copy)]
pub struct DropCtx<'a> {
    /// The generator.
    pub rng: &'a GpuRng,
    /// The forward pass's seed (the trainer's [`DropoutRng`](crate::model::DropoutRng)).
    pub seed: u64,
    /// Where the masks go.
    pub layout: MaskLayout,
}

impl DropCtx<'_> {
    /// Draws the mask of `site` of layer `li` (`[t, w]` at column `col`, probability `p`) into
    /// `mask` and applies it to `x` in place, using `rand` for the uniforms.
    #[allow(clippy::too_many_arguments)]
    pub fn apply(
        &self,
        dev: &CudaDevice,
        li: usize,
        (site, col, p): (Site, usize, f32),
        x: &DeviceTensor,
        (t, w): (usize, usize),
        mask: &DeviceTensor,
        rand: &mut DeviceTensor,
    ) -> R {
        self.rng
            .uniform(site_seed(self.seed, li, site), rand, t * w)?;
        dropout_mask(dev, x, rand, mask, col * t, t, w, p)
    }

    /// The LoRA input of `target` in layer `li`: `x` itself without LoRA dropout, else
    /// `x ⊙ mask` in `xd` (the mask drawn and saved).
    #[allow(clippy::too_many_arguments)]
    pub fn lora_input<'b>(
        this: Option<&Self>,
        dev: &CudaDevice,
        li: usize,
        target: LoraTarget,
        x: &'b DeviceTensor,
        (t, w): (usize, usize),
        mask: &DeviceTensor,
        rand: &mut DeviceTensor,
        xd: &'b mut DeviceTensor,
    ) -> R<&'b DeviceTensor> {
        let Some(dc) = this else { return Ok(x) };
        let Some(col) = dc.layout.lora[target.index()] else {
            return Ok(x);
        };
        copy_rows(dev, x, 0, xd, 0, t, w)?;
        let site = (Site::Lora(target.index()), col, dc.layout.p_lora);
        dc.apply(dev, li, site, xd, (t, w), mask, rand)?;
        Ok(xd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::OptConfig;
    use crate::peft::LoraConfig;
    use std::path::Path;

    #[test]
    fn layout_places_every_site_once_without_overlap() {
        let c = OptConfig::from_json(
            r#"{"model_type":"opt","vocab_size":64,"hidden_size":20,"ffn_dim":36,
                "num_hidden_layers":2,"num_attention_heads":2,"max_position_embeddings":16}"#,
            Path::new("t/config.json"),
        )
        .unwrap();
        let d = Dims::of(&c);
        let cfg = LoraConfig {
            r: 2,
            dropout: 0.1,
            targets: vec![LoraTarget::Q, LoraTarget::Fc2],
            ..LoraConfig::default()
        };
        let lora = LoraParams::init(&cfg, &c, 1);
        assert!(MaskLayout::new(&d, 0.0, None).is_none());
        let no_lora_drop = LoraParams::init(
            &LoraConfig {
                dropout: 0.0,
                ..cfg.clone()
            },
            &c,
            1,
        );
        assert!(MaskLayout::new(&d, 0.0, Some(&no_lora_drop)).is_none());
        let l = MaskLayout::new(&d, 0.1, Some(&lora)).unwrap();
        let sites = l.sites(&d);
        assert_eq!(
            sites.iter().map(|s| s.0).collect::<Vec<_>>(),
            vec![
                Site::AttnResidual,
                Site::MlpResidual,
                Site::Lora(LoraTarget::Q.index()),
                Site::Lora(LoraTarget::Fc2.index())
            ]
        );
        assert_eq!(l.cols, 20 + 20 + 20 + 36);
        let mut spans: Vec<(usize, usize)> = sites.iter().map(|s| (s.1, s.1 + s.2)).collect();
        spans.sort();
        assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0));
        assert_eq!(spans.last().unwrap().1, l.cols);
        let only_lora = MaskLayout::new(&d, 0.0, Some(&lora)).unwrap();
        assert_eq!((only_lora.attn, only_lora.cols), (None, 56));
    }
}
