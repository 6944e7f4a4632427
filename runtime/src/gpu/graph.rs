//! The forward and backward of a micro-batch as a CUDA graph (issue 5's "the step captured as a
//! CUDA graph and replayed"; [`super::GpuEngine::set_cuda_graphs`]).
//!
//! The first call of a given shape runs directly (whatever is set up lazily on first use, such
//! as cuBLAS's workspace, is then allocated outside any graph). The second queues the work on
//! the engine's stream in capture mode instead of running it and instantiates the graph; this
//! and every later call of the same shape launch it in one call. A capture fails on any host synchronisation or blocking copy
//! on the stream, so a captured step proves that it queues its work without waiting: with the
//! MLP predictors on the device, the whole sparse forward and backward (prediction, selection
//! and the block-sparse operators) is one graph.
//!
//! A graph bakes in everything the host passed when it was captured: kernel arguments (device
//! pointers, shapes, scalars such as the loss scale and the mass targets) and the sequence of
//! launches (the batch's segments). [`GraphKey`] holds all of them, and a call whose key
//! differs captures anew. The batch itself (token ids, positions, targets, the flash-attention
//! block plan) is uploaded into the same device buffers before each launch, outside the graph,
//! and the adapters are read from their device buffers, which the device optimizer updates in
//! place. Graphs are not used with dropout, BitFit or Houlsby adapters (their device state is
//! re-uploaded or re-allocated per call), block-sparse attention's lists, nor while the profiler
//! records spans.

use super::layer::Segment;
use super::ops::{dev_err, R};
use crate::model::ModelError;
use cudarc::driver::{sys, CudaGraph, CudaStream};
use std::sync::Arc;

/// What a captured graph depends on besides the contents of its buffers.
#[derive(Clone, Debug, PartialEq)]
pub struct GraphKey {
    /// Tokens, the packed sequences, and the runs of rows with a target.
    pub t: usize,
    pub segs: Vec<Segment>,
    pub runs: Vec<(usize, usize)>,
    /// `Some(bits of grad_scale)` for a backward, `None` for a forward only.
    pub grad_scale: Option<u32>,
    /// Whether LoRA runs, with its rank and targets.
    pub lora: Option<(usize, String)>,
    /// Device addresses of every buffer the launches name (workspace, adapters, block lists).
    pub buffers: Vec<u64>,
    /// The workspace's sizes (a buffer re-allocated at the same address with other sizes).
    pub caps: String,
    /// Scalars of the launches that settings change (e.g. the MLP mass targets).
    pub settings: String,
}

/// An instantiated graph and what it was captured for.
pub struct StepGraph {
    pub key: GraphKey,
    graph: CudaGraph,
    /// Launches of this graph so far (the first is the capture's).
    pub launches: u64,
}

impl StepGraph {
    /// Captures what `enqueue` queues on `stream` (the engine's). The capture always ends, also when
    /// `enqueue` fails (its error is returned); a queued operation that is not allowed while
    /// capturing (a synchronisation, a blocking copy) fails the capture with CUDA's error.
    pub fn capture(
        stream: &Arc<CudaStream>,
        key: GraphKey,
        enqueue: impl FnOnce() -> R,
    ) -> R<StepGraph> {
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(dev_err("beginning a CUDA graph capture"))?;
        let queued = enqueue();
        let ended = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        queued?;
        let graph = ended
            .map_err(dev_err("capturing the step as a CUDA graph"))?
            .ok_or_else(|| ModelError::Device("the captured CUDA graph is empty".into()))?;
        tracing::debug!(
            t = key.t,
            segments = key.segs.len(),
            "step captured as a CUDA graph"
        );
        Ok(StepGraph {
            key,
            graph,
            launches: 0,
        })
    }

    /// Launches the graph on the stream it was captured on.
    pub fn launch(&mut self) -> R {
        self.graph
            .launch()
            .map_err(dev_err("launching the step's CUDA graph"))?;
        self.launches += 1;
        Ok(())
    }
}
