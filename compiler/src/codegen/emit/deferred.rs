//! Deferred waits of warpgroup MMAs (COMPILER.md §8.1): FlashAttention-3's intra-warpgroup
//! overlap, done by the code generator instead of by hand.
//!
//! A `wgmma` runs asynchronously: the instruction returns at once and the tensor cores write
//! the accumulator registers later, when its group completes. A `dot` that waited for its group
//! right after issuing it (`wgmma.wait_group 0`) would leave the warpgroup idle while the tensor
//! cores work, and the tensor cores idle while the warpgroup then runs the code that follows
//! (the softmax's `exp2`, the `dS = P ⊙ (dP − δ)` of the attention backward). Here a `dot` whose
//! operands need no staging is issued as a group of its own and left in flight; the wait is
//! placed before the first instruction that reads its result — `wgmma.wait_group n` with `n`
//! the number of groups issued after it, so younger MMAs stay in flight — and before anything
//! that leaves the block (a nested loop or branch, a `yield`, a `return`, the block's end).
//! So in `s = dot(q, kᵀ); dp = dot(dO, vᵀ); p = exp2(s − lse)` the `exp2` runs while the
//! tensor cores compute `dp`.
//!
//! Not deferred: the MMAs a pipelined loop keeps in flight across iterations (they have their
//! own accounting, `PipelinedLoop::async_dots`), MMAs inside such a loop or a ping-pong loop,
//! and MMAs with an operand staged from registers through shared scratch (the barrier after
//! them hands the scratch to the next user). A register-A MMA (the mma-to-dot shortcut) may be
//! deferred: its A registers are fenced again at its wait, so they stay live until then.

use super::*;

/// A warpgroup MMA in flight: the `dot` it computes and the registers it reads or writes
/// asynchronously (fenced when it is awaited).
pub(super) struct InFlight<'c> {
    /// The `dot`'s result.
    pub result: ValueId,
    /// Its A fragments when A is in registers (empty otherwise).
    pub a_regs: Vec<V<'c>>,
}

impl<'c> Gen<'c, '_> {
    /// Whether a `dot` may be left in flight (see the module doc): a warpgroup MMA with
    /// no staged operand, outside loops that keep MMAs in flight themselves.
    pub(super) fn may_defer(&self, staged: bool) -> bool {
        !staged && self.async_dots.is_empty() && self.pingpong.is_none()
    }

    /// Records an issued, committed and not yet awaited MMA group.
    pub(super) fn defer(&mut self, result: ValueId, a_regs: Vec<V<'c>>) {
        self.in_flight.push(InFlight { result, a_regs });
    }

    /// Before `op` is emitted: waits for the in-flight MMAs whose results it reads, or for all
    /// of them when it leaves the straight-line code (nested blocks, `yield`, `return`).
    pub(super) fn await_for(&mut self, op: &Op) -> R<()> {
        if self.in_flight.is_empty() {
            return Ok(());
        }
        if matches!(
            op,
            Op::For { .. } | Op::If { .. } | Op::Yield { .. } | Op::Return
        ) {
            return self.await_all();
        }
        let reads = op.operands();
        let youngest = self
            .in_flight
            .iter()
            .rposition(|f| reads.contains(&f.result));
        match youngest {
            Some(i) => self.await_through(i),
            None => Ok(()),
        }
    }

    /// Waits for every in-flight MMA.
    pub(super) fn await_all(&mut self) -> R<()> {
        match self.in_flight.len() {
            0 => Ok(()),
            n => self.await_through(n - 1),
        }
    }

    /// Waits until the groups `0 ..= i` (oldest first) are complete, then fences their
    /// results (and A registers) for ordinary use.
    fn await_through(&mut self, i: usize) -> R<()> {
        let younger = self.in_flight.len() - 1 - i;
        self.asm(
            &format!("wgmma.wait_group.sync.aligned {younger};"),
            "",
            None,
            &[],
        )?;
        self.completed(i + 1)
    }

    /// The oldest `n` in-flight groups are known to be complete (a `wgmma.wait_group` has
    /// covered them): fences their results for ordinary use and forgets them.
    pub(super) fn completed(&mut self, n: usize) -> R<()> {
        let done: Vec<InFlight<'c>> = self.in_flight.drain(..n).collect();
        for f in done {
            let vals = self.get(f.result)?.clone();
            let fenced = self.fence_operands(&vals)?;
            self.vals.insert(f.result, fenced);
            if !f.a_regs.is_empty() {
                self.fence_operands(&f.a_regs)?;
            }
        }
        Ok(())
    }
}
