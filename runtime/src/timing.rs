//! GPU timing with CUDA events, and the device's copy bandwidth (the roofline for
//! memory-bound kernels).

use crate::device::CudaDevice;
use crate::error::{failed, DeviceError, Result};
use cudarc::driver::{sys, CudaEvent};
use tracing::debug;

/// Per-iteration GPU times of a timed closure, in milliseconds, in run order.
#[derive(Clone, Debug, PartialEq)]
pub struct Timing {
    /// Time of each iteration (between the events recorded before and after it).
    pub times_ms: Vec<f64>,
    /// Host wall time spent queuing one iteration, mean over the timed ones (0 where not
    /// measured). When it is not well below the GPU times, the GPU waited for the host between
    /// the events and the GPU times measure the host.
    pub host_ms: f64,
}

impl Timing {
    /// Median iteration time (mean of the two middle ones for an even count); NaN if empty.
    pub fn median(&self) -> f64 {
        let mut t = self.times_ms.clone();
        t.sort_by(f64::total_cmp);
        match t.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => t[n / 2],
            n => (t[n / 2 - 1] + t[n / 2]) / 2.0,
        }
    }

    /// Fastest iteration; NaN if empty.
    pub fn min(&self) -> f64 {
        self.times_ms
            .iter()
            .copied()
            .reduce(f64::min)
            .unwrap_or(f64::NAN)
    }

    /// Slowest iteration; NaN if empty.
    pub fn max(&self) -> f64 {
        self.times_ms
            .iter()
            .copied()
            .reduce(f64::max)
            .unwrap_or(f64::NAN)
    }

    /// Mean iteration time; NaN if empty.
    pub fn mean(&self) -> f64 {
        self.times_ms.iter().sum::<f64>() / self.times_ms.len() as f64
    }
}

/// Creates an event that records timestamps (cudarc's default disables timing).
fn timing_event(dev: &CudaDevice) -> Result<CudaEvent> {
    dev.context()
        .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(failed("creating a timing event"))
}

/// Times `f` on the device's stream: `warmup` untimed calls, then `iters` calls each between
/// its own pair of events. `f` only queues work (launches, copies) on the device's stream;
/// the host waits once, at the end.
///
/// All events are created before the first timed call, so that event creation never lands
/// between two timed iterations.
pub fn time_ms<E: Into<DeviceError>>(
    dev: &CudaDevice,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut() -> std::result::Result<(), E>,
) -> Result<Timing> {
    if iters == 0 {
        return Err(DeviceError::InvalidArgument(
            "time_ms needs at least one iteration".into(),
        ));
    }
    for _ in 0..warmup {
        f().map_err(Into::into)?;
    }
    let events = (0..2 * iters)
        .map(|_| timing_event(dev))
        .collect::<Result<Vec<_>>>()?;
    let stream = dev.stream();
    let host = std::time::Instant::now();
    for pair in events.chunks_exact(2) {
        pair[0]
            .record(stream)
            .map_err(failed("recording a timing event"))?;
        f().map_err(Into::into)?;
        pair[1]
            .record(stream)
            .map_err(failed("recording a timing event"))?;
    }
    let host_ms = host.elapsed().as_secs_f64() * 1e3 / iters as f64;
    dev.synchronize()?;
    let times_ms = events
        .chunks_exact(2)
        .map(|pair| {
            pair[0]
                .elapsed_ms(&pair[1])
                .map(f64::from)
                .map_err(failed("reading a timing event"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Timing { times_ms, host_ms })
}

/// Times `f` replayed from a CUDA graph: `reps` calls of `f` are captured once into one graph,
/// which is replayed `warmup` times untimed and then `iters` times, each replay between its own
/// pair of events; each time is divided by `reps`. The host queues one graph launch per `reps`
/// calls, so these are the GPU's times also where queuing a call costs the host more than the
/// GPU spends on it (which [`time_ms`] would measure instead; see [`Timing::host_ms`]). `f`
/// must only queue work: a synchronisation or blocking copy fails the capture.
pub fn time_graph_ms<E: Into<DeviceError>>(
    dev: &CudaDevice,
    warmup: usize,
    iters: usize,
    reps: usize,
    mut f: impl FnMut() -> std::result::Result<(), E>,
) -> Result<Timing> {
    if iters == 0 || reps == 0 {
        return Err(DeviceError::InvalidArgument(
            "time_graph_ms needs at least one iteration and one call per graph".into(),
        ));
    }
    // One call outside the capture: whatever is set up on first use (module loads, library
    // workspaces) must not happen inside it.
    f().map_err(Into::into)?;
    let stream = dev.stream();
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
        .map_err(failed("beginning a CUDA graph capture"))?;
    let queued = (0..reps).try_for_each(|_| f().map_err(Into::into));
    let ended = stream.end_capture(sys::CUgraphInstantiate_flags(0));
    queued?;
    let graph = ended
        .map_err(failed("capturing the timed calls as a CUDA graph"))?
        .ok_or_else(|| DeviceError::InvalidArgument("the captured CUDA graph is empty".into()))?;
    let mut t = time_ms(dev, warmup, iters, || {
        graph
            .launch()
            .map_err(failed("launching the timed CUDA graph"))
    })?;
    for ms in &mut t.times_ms {
        *ms /= reps as f64;
    }
    t.host_ms /= reps as f64;
    Ok(t)
}

/// Device-to-device copy bandwidth in GB/s (10^9 bytes per second), counting both the bytes
/// read and the bytes written: the speed of light for a memory-bound kernel that reads and
/// writes the same amount. Median of 20 copies of `bytes` bytes after 3 warm-ups.
pub fn copy_bandwidth(dev: &CudaDevice, bytes: usize) -> Result<f64> {
    if bytes == 0 {
        return Err(DeviceError::InvalidArgument(
            "copy_bandwidth of 0 bytes".into(),
        ));
    }
    let stream = dev.stream();
    let context = || format!("allocating {bytes} bytes for the copy benchmark");
    let src = stream.alloc_zeros::<u8>(bytes).map_err(failed(context()))?;
    let mut dst = stream.alloc_zeros::<u8>(bytes).map_err(failed(context()))?;
    let timing = time_ms(dev, 3, 20, || {
        stream
            .memcpy_dtod(&src, &mut dst)
            .map_err(failed("copying for the copy benchmark"))
    })?;
    let seconds = timing.median() * 1e-3;
    let gbps = 2.0 * bytes as f64 / seconds / 1e9;
    debug!(
        bytes,
        median_ms = timing.median(),
        gbps,
        "device copy bandwidth"
    );
    Ok(gbps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics() {
        let t = Timing {
            times_ms: vec![3.0, 1.0, 2.0, 10.0],
            host_ms: 0.0,
        };
        assert_eq!(t.median(), 2.5);
        assert_eq!(t.min(), 1.0);
        assert_eq!(t.max(), 10.0);
        assert_eq!(t.mean(), 4.0);
        let odd = Timing {
            times_ms: vec![5.0, 1.0, 4.0],
            host_ms: 0.0,
        };
        assert_eq!(odd.median(), 4.0);
        let empty = Timing {
            times_ms: vec![],
            host_ms: 0.0,
        };
        assert!(empty.median().is_nan() && empty.min().is_nan() && empty.mean().is_nan());
    }
}
