//! The multi-stage `cp.async` main loop of COMPILER.md §4.1 as an event schedule, and a
//! symbolic checker of its bookkeeping: the codegen emits exactly [`schedule`]'s events, and
//! [`check`] proves (for given `S` stages and `KT` k-tiles) that every tile is complete and
//! published by a barrier before it is computed on, that no slot is overwritten before every
//! read of its previous tile, and that the drain leaves nothing pending. With a *resident*
//! operand (a loop-invariant tile, [`crate::passes::pipeline`]) a group of its own, committed
//! before the ring's first, copies that tile once into its own slot (as the codegen does), and
//! every compute needs it landed and published.
//!
//! Semantics modelled (PTX ISA 9.7.9.25.3): `commit_group` closes a group per thread (possibly
//! empty); `wait_group(n)` waits until at most the `n` most recent groups are pending; data is
//! visible to other threads only after a barrier that follows the wait. All threads run the same
//! schedule, so one thread's view with barriers as publication points is exact.

/// One step of the main loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// Issue the copies of k-tile `tile` into stage slot `slot`.
    Copy { tile: usize, slot: usize },
    /// Issue the copy of the resident tile into its own slot.
    CopyResident,
    /// `cp.async.commit_group`.
    Commit,
    /// `cp.async.wait_group(n)`.
    Wait(usize),
    /// `bar.sync`.
    Barrier,
    /// ldmatrix + mma over slot `slot`, which must hold tile `tile`.
    Compute { tile: usize, slot: usize },
}

/// The schedule of §4.1 for `stages` slots and `kt` k-tiles, with or without a resident tile.
pub fn schedule(stages: usize, kt: usize, resident: bool) -> Vec<Event> {
    let mut ev = vec![];
    if resident {
        if kt > 0 {
            ev.push(Event::CopyResident);
        }
        ev.push(Event::Commit);
    }
    for s in 0..stages.saturating_sub(1) {
        if s < kt {
            ev.push(Event::Copy { tile: s, slot: s });
        }
        ev.push(Event::Commit);
    }
    for t in 0..kt {
        ev.push(Event::Wait(stages.saturating_sub(2)));
        ev.push(Event::Barrier);
        let next = t + stages - 1;
        if next < kt {
            ev.push(Event::Copy {
                tile: next,
                slot: next % stages,
            });
        }
        ev.push(Event::Commit);
        ev.push(Event::Compute {
            tile: t,
            slot: t % stages,
        });
    }
    ev.push(Event::Wait(0));
    ev.push(Event::Barrier);
    ev
}

/// Checks a schedule (with a resident tile read by every compute if `resident`); returns the
/// first violation.
pub fn check(stages: usize, kt: usize, resident: bool, events: &[Event]) -> Result<(), String> {
    // The resident tile is tracked as tile `kt`.
    let res = kt;
    // groups[i] = tiles copied in group i; open = copies not yet committed.
    let mut groups: Vec<Vec<usize>> = vec![];
    let mut open: Vec<(usize, usize)> = vec![];
    let mut landed: Vec<bool> = vec![false; kt + 1];
    let mut published: Vec<bool> = vec![false; kt + 1];
    let mut slot_tile: Vec<Option<usize>> = vec![None; stages];
    // Tiles whose reads of a slot are not yet ordered before later writes by a barrier.
    let mut unfenced_reads: Vec<usize> = vec![];
    let mut computed = vec![false; kt];
    let mut completed_groups = 0usize;
    for (i, e) in events.iter().enumerate() {
        match *e {
            Event::Copy { tile, slot } => {
                if unfenced_reads.contains(&slot) {
                    return Err(format!(
                        "event {i}: slot {slot} overwritten before a barrier after its last read"
                    ));
                }
                slot_tile[slot] = Some(tile);
                open.push((tile, slot));
            }
            Event::CopyResident => open.push((res, usize::MAX)),
            Event::Commit => groups.push(open.drain(..).map(|(t, _)| t).collect()),
            Event::Wait(n) => {
                let keep = n.min(groups.len());
                completed_groups = completed_groups.max(groups.len() - keep);
                for g in &groups[..completed_groups] {
                    for t in g {
                        landed[*t] = true;
                    }
                }
            }
            Event::Barrier => {
                for t in 0..=kt {
                    published[t] |= landed[t];
                }
                unfenced_reads.clear();
            }
            Event::Compute { tile, slot } => {
                if !published[tile] {
                    return Err(format!(
                        "event {i}: tile {tile} computed before it landed and was published"
                    ));
                }
                if resident && !published[res] {
                    return Err(format!(
                        "event {i}: tile {tile} computed before the resident tile was published"
                    ));
                }
                if slot_tile[slot] != Some(tile) {
                    return Err(format!(
                        "event {i}: slot {slot} holds {:?}, not tile {tile}",
                        slot_tile[slot]
                    ));
                }
                computed[tile] = true;
                unfenced_reads.push(slot);
            }
        }
    }
    if !open.is_empty() {
        return Err("copies left uncommitted".into());
    }
    if completed_groups != groups.len() {
        return Err(format!(
            "{} groups still pending after the drain",
            groups.len() - completed_groups
        ));
    }
    if let Some(t) = computed.iter().position(|c| !c) {
        return Err(format!("tile {t} never computed"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_is_correct_for_every_depth_and_length() {
        for stages in 2..=5 {
            for kt in 0..=12 {
                for resident in [false, true] {
                    let ev = schedule(stages, kt, resident);
                    check(stages, kt, resident, &ev)
                        .unwrap_or_else(|e| panic!("S={stages} KT={kt} resident={resident}: {e}"));
                }
            }
        }
    }

    #[test]
    fn the_checker_catches_broken_schedules() {
        // Waiting for one group too few: tile t may still be in flight when computed.
        let mut ev = schedule(3, 6, false);
        for e in ev.iter_mut() {
            if *e == Event::Wait(1) {
                *e = Event::Wait(2);
            }
        }
        assert!(check(3, 6, false, &ev).is_err());
        // Skipping the commit of the iterations that have nothing left to copy breaks the
        // group count: the last tiles' waits then wait for too little.
        let full = schedule(3, 6, false);
        let ev: Vec<Event> = full
            .iter()
            .enumerate()
            .filter(|(i, e)| {
                !(**e == Event::Commit && *i > 0 && !matches!(full[i - 1], Event::Copy { .. }))
            })
            .map(|(_, e)| *e)
            .collect();
        assert!(check(3, 6, false, &ev).is_err());
        // Copying before the barrier overwrites a slot another warp may still read.
        let mut ev = schedule(2, 4, false);
        let j = ev
            .iter()
            .position(|e| matches!(e, Event::Copy { tile: 2, .. }))
            .expect("tile 2 is copied");
        ev.swap(j, j - 1);
        assert!(check(2, 4, false, &ev).is_err());
        // A resident tile copied with the first ring tile instead of in its own group: the
        // first wait (all but the newest S-2 groups) then counts one group too few.
        let mut ev = schedule(3, 6, true);
        ev.retain(|e| *e != Event::CopyResident);
        ev.remove(0); // its commit
        let second = ev
            .iter()
            .position(|e| *e == Event::Copy { tile: 1, slot: 1 })
            .expect("tile 1 is copied in the prologue");
        ev.insert(second, Event::CopyResident);
        assert!(check(3, 6, true, &ev).is_err());
        // Never copied at all.
        let mut ev = schedule(3, 6, true);
        ev.retain(|e| *e != Event::CopyResident);
        assert!(check(3, 6, true, &ev).is_err());
    }
}
